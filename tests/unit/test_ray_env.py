"""The Ray settings the launcher passes to Flower's simulation engine (scripts/local/ray_env.py): they
reach every simulation run's environment, a user's own value wins, and each one still names a setting of
the installed Ray (a Ray upgrade that renames one fails here, not silently)."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest

from fedlinear.scripts.local import launch
from fedlinear.scripts.local.ray_env import RAY_ENV, with_ray_env


def test_user_values_win_and_nothing_else_changes():
    env = with_ray_env({"RAY_enable_worker_prestart": "1", "PATH": "/bin"})
    assert env["RAY_enable_worker_prestart"] == "1"
    assert env["PATH"] == "/bin"
    assert all(env[k] == v for k, v in RAY_ENV.items() if k != "RAY_enable_worker_prestart")


def _ray_dir() -> str:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    return list(spec.submodule_search_locations)[0]


@pytest.mark.parametrize("key", [k for k in RAY_ENV if k != "RAY_USAGE_STATS_ENABLED"])
def test_each_system_config_name_is_in_the_installed_ray(key):
    # RayConfig entries are read from the environment as RAY_<name>; the names are compiled into _raylet
    name = key.removeprefix("RAY_").encode()
    raylet = [f for f in os.listdir(_ray_dir()) if f.startswith("_raylet") and f.endswith(".so")]
    assert raylet, "no _raylet extension in the installed Ray"
    with open(os.path.join(_ray_dir(), raylet[0]), "rb") as handle:
        assert b"\0" + name + b"\0" in handle.read(), f"{name!r} is not a setting of the installed Ray"


def test_usage_stats_variable_is_the_installed_rays():
    from ray._common.usage import usage_constants

    assert usage_constants.USAGE_STATS_ENABLED_ENV_VAR == "RAY_USAGE_STATS_ENABLED"


def superlink_env(monkeypatch, **spec_fields) -> dict[str, str]:
    """The environment ``run_federation`` gives the SuperLink of a launch with ``spec_fields`` (nothing starts)."""
    seen: dict[str, dict[str, str]] = {}

    class Stop(Exception):
        pass

    def fake_start(self, name, argv, env, log, **kwargs):
        seen[name] = env
        if name == "superlink":
            raise Stop
        return subprocess.Popen(["true"])  # what starts before it (processes mode's warm ClientApp executor)

    monkeypatch.setattr(launch.ProcessGroup, "start", fake_start)
    spec = launch.LaunchSpec(num_nodes=2, node_configs=[{}, {}], run_config={}, **spec_fields)
    with pytest.raises(Stop):
        launch.run_federation(spec, print)
    return seen["superlink"]


def test_simulation_runs_get_them_and_processes_runs_do_not(tmp_path, monkeypatch):
    for mode in ("simulation", "processes"):
        env = superlink_env(monkeypatch, mode=mode, app_dir=str(tmp_path), workdir=str(tmp_path / mode))
        if mode == "simulation":
            assert all(env.get(k) == v for k, v in RAY_ENV.items())
        else:
            assert not any(k in env for k in RAY_ENV if k not in os.environ)


def test_another_apps_simulation_runs_on_rays_defaults(tmp_path, monkeypatch):
    """The benchmarks' floor (``fedlinear run --app``) is Flower's engine as Flower starts it: no launcher tuning."""
    for key in RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    env = superlink_env(monkeypatch, mode="simulation", app_dir=str(tmp_path), workdir=str(tmp_path / "sim"),
                        ray_tuning=False)  # fmt: skip
    assert not any(k in env for k in RAY_ENV)
    assert env["RAY_ADDRESS"] == "local"  # still a private Ray, never a stale cluster's


def _shards(tmp_path, count: int, size: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"client-{i}.csv"
        path.write_bytes(b"1,2\n" * (size // 4))
        paths.append(str(path))
    return paths


def test_one_actor_for_a_few_small_local_shards_only(tmp_path):
    from fedlinear.scripts.local.ray_env import SMALL_SIM_BYTES, SMALL_SIM_CLIENTS, one_actor_suffices

    small = _shards(tmp_path, 10, 1000)
    assert one_actor_suffices(small, 10, "numpy", 1, False)
    assert one_actor_suffices(["file://" + small[0]], 1, "numpy", 1, False)
    assert not one_actor_suffices(small, 10, "keras", 1, False)
    assert not one_actor_suffices(small, 10, "numpy", 1, True)  # secure aggregation
    assert not one_actor_suffices(small, 10, "numpy", SMALL_SIM_BYTES // 10_000 + 1, False)  # bytes x epochs
    assert not one_actor_suffices(["s3://bucket/client-0.csv"], 1, "numpy", 1, False)
    assert not one_actor_suffices([str(tmp_path / "missing.csv")], 1, "numpy", 1, False)
    assert not one_actor_suffices([str(tmp_path)], 1, "numpy", 1, False)  # a directory of parts: not sized
    assert not one_actor_suffices([], 0, "numpy", 1, False)
    (tmp_path / "many").mkdir()
    many = _shards(tmp_path / "many", SMALL_SIM_CLIENTS + 1, 4)
    assert one_actor_suffices(many, SMALL_SIM_CLIENTS, "numpy", 1, False)
    assert not one_actor_suffices(many, SMALL_SIM_CLIENTS + 1, "numpy", 1, False)
    big = tmp_path / "big"
    big.mkdir()
    (large,) = _shards(big, 1, SMALL_SIM_BYTES + 8)
    assert not one_actor_suffices([large], 1, "numpy", 1, False)
