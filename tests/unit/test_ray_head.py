"""The private Ray head the launcher starts for a simulation of fedlinear's own app
(scripts/local/ray_head.py): the ``ray start`` options and the ready line it relies on exist in the
installed Ray (an upgrade that drops one fails here), Flower joins an existing cluster without being
given ``num_cpus`` when the launcher leaves ``init-args-num-cpus`` out, and the bounded wait fails loudly."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local import ray_head


def ray_start_command():
    from ray.scripts.scripts import start

    return start


def test_every_ray_start_option_the_launcher_uses_exists():
    start = ray_start_command()
    params = {p.name: p for p in start.params}
    missing = [name for name in ray_head.RAY_START_OPTIONS if name not in params]
    assert not missing, f"ray start lost options the launcher passes: {missing}"
    flags = {opt for p in start.params for opt in p.opts}
    argv = ray_head.head_argv(6379, 2, "/tmp/x")
    used = [arg for arg in argv[2:] if arg.startswith("--")]
    assert set(used) <= flags, set(used) - flags
    # and every option named in RAY_START_OPTIONS is one head_argv passes
    assert {params[name].opts[0] for name in ray_head.RAY_START_OPTIONS} <= set(used)


def test_ray_start_prints_the_ready_line_the_launcher_waits_for():
    import ray.scripts.scripts as scripts

    assert ray_head.READY_LINE in inspect.getsource(scripts)


def test_flower_passes_no_num_cpus_to_ray_init_without_init_args():
    """Joining a cluster, ``ray.init`` refuses ``num_cpus``: Flower must not add one of its own."""
    from flwr.proto.federation_config_pb2 import SimulationConfig
    from flwr.simulation.app import _run_simulation_settings

    def settings(**fields):
        try:
            return _run_simulation_settings(SimulationConfig(**fields))
        except TypeError:  # a federation config that wraps the simulation one
            pytest.fail("flwr.simulation.app._run_simulation_settings changed its signature")

    joined = settings(num_supernodes=3)
    assert joined[2]["init_args"] == {}
    local = settings(num_supernodes=3, init_args_num_cpus=2)
    assert local[2]["init_args"] == {"num_cpus": 2}


def test_flowers_ray_backend_joins_an_initialised_or_addressed_ray():
    """Flower calls ``ray.init`` without an address, i.e. it honours ``RAY_ADDRESS``, and only when Ray
    is not initialised yet: what the launcher's ``RAY_ADDRESS=<private head>`` relies on."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    source = inspect.getsource(RayBackend.init_ray)
    assert "if not ray.is_initialized():" in source
    assert "address" not in source.replace("runtime_env", "")


def test_head_env_drops_an_address_and_usage_stats():
    env = ray_head.head_env({"RAY_ADDRESS": "local", "PATH": "/bin"})
    assert "RAY_ADDRESS" not in env and env["PATH"] == "/bin" and env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_wait_ready_returns_once_the_line_is_logged(tmp_path):
    log = tmp_path / "ray-head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys, time; print({ray_head.READY_LINE!r}, flush=True); time.sleep(60)"],
            stdout=out,
        )
    try:
        ray_head.wait_ready(proc, str(log), timeout=60)
    finally:
        proc.kill()
        proc.wait()


def test_wait_ready_fails_with_the_log_when_ray_start_exits(tmp_path):
    log = tmp_path / "ray-head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('Error: no such option: --no-monitor'); raise SystemExit(2)"], stdout=out)
    proc.wait()
    with pytest.raises(FedLinearError, match=r"(?s)ray start exited with code 2.*no such option"):
        ray_head.wait_ready(proc, str(log), timeout=60)


def test_wait_ready_is_bounded(tmp_path):
    log = tmp_path / "ray-head.log"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(FedLinearError, match="did not start within"):
            ray_head.wait_ready(proc, str(log), timeout=0.3)
    finally:
        proc.kill()
        proc.wait()
