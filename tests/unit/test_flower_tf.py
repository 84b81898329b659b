"""The guard that keeps TensorFlow out of Flower's simulation engine (scripts/local/flower_tf.py and its
sitecustomize.py): it rests on the exact lines of Flower 1.42's ``ray_transport/utils.py`` (a Flower
upgrade that changes them fails here), keeps ``import flwr.simulation`` free of TensorFlow, and leaves
every later ``import tensorflow`` (the keras engine) alone."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from fedlinear.scripts.local import flower_tf, launch


def flwr_file(*parts: str) -> str:
    root = list(importlib.util.find_spec("flwr").submodule_search_locations)[0]
    with open(os.path.join(root, *parts), encoding="utf-8") as handle:
        return handle.read()


def test_flowers_simulation_utils_import_tensorflow_exactly_as_the_guard_expects():
    source = flwr_file("simulation", "ray_transport", "utils.py")
    assert flower_tf.EXPECTED in source
    assert source.count("import tensorflow") == 1  # nothing else there imports it
    assert flower_tf.guard_applies()
    # TF is used only for the GPU-growth hook, which runs only when the backend config asks for it
    # (fedlinear never does: the default is {"tensorflow": 0})
    assert 'backend_config.setdefault("actor", {"tensorflow": 0})' in flwr_file("simulation", "run_simulation.py")
    raybackend = flwr_file("server", "superlink", "fleet", "vce", "backend", "raybackend.py")
    assert 'use_tf = actor_args.get("tensorflow", False)' in raybackend
    assert 'actor_args["on_actor_init_fn"] = enable_tf_gpu_growth' in raybackend


PROBE = """
import sys
import flwr.simulation
from flwr.simulation.ray_transport import utils
print("tf-before", "tensorflow" in sys.modules, utils.TF is None)
"""


def run_probe(code: str, guard: bool, extra_path: str | None = None) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    if guard:
        env = flower_tf.with_guard(env)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_with_the_guard_flwr_simulation_does_not_import_tensorflow_and_a_later_import_still_works():
    pytest.importorskip("tensorflow")
    out = run_probe(PROBE + "import tensorflow as tf\nprint('tf-after', tf.constant(2.0).numpy() * 2)\n", guard=True)
    assert "tf-before False True" in out
    assert "tf-after 4.0" in out


def test_without_the_guard_flower_imports_tensorflow():
    pytest.importorskip("tensorflow")
    assert "tf-before True False" in run_probe(PROBE, guard=False)


def test_another_sitecustomize_still_runs(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITECUSTOMIZE = True\n")
    out = run_probe("import builtins, sys\nprint(getattr(builtins, 'OTHER_SITECUSTOMIZE', False), "
                    "[f.__name__ for f in sys.meta_path if getattr(f, '__name__', '') == 'FlowerTensorFlowGuard'])",
                    guard=True, extra_path=str(tmp_path))  # fmt: skip
    assert out.strip() == "True ['FlowerTensorFlowGuard']"


def test_the_launcher_applies_the_guard_only_while_it_fits(monkeypatch, capsys):
    env = launch.without_flower_tf({"PYTHONPATH": "/somewhere"})
    assert env["PYTHONPATH"] == flower_tf.HOOK_DIR + os.pathsep + "/somewhere"
    monkeypatch.setattr(flower_tf, "guard_applies", lambda: False)
    assert launch.without_flower_tf({"A": "1"}) == {"A": "1"}
    assert "no longer imports TensorFlow as expected" in capsys.readouterr().err
