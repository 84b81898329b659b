"""Keep TensorFlow out of Flower's simulation engine where nothing needs it.

Flower 1.42's simulation package imports TensorFlow whenever it is installed: ``flwr.simulation``
imports ``flwr/simulation/ray_transport/utils.py``, which starts with ::

    try:
        import tensorflow as TF
    except ModuleNotFoundError:
        TF = None

(for ``enable_tf_gpu_growth``, used only when the backend config asks for ``actor.tensorflow``,
which fedlinear never does). So the ``flwr-simulation`` process and every Ray actor pay TensorFlow's
import, ~6 s of CPU and ~0.5 GB each, although fedlinear's clients import it only for the ``keras``
engine and the server only for the export (both lazily, in their own time).

Flower's files are not touched. For a simulation run of fedlinear's own app the launcher puts
:data:`HOOK_DIR` first on ``PYTHONPATH`` of the processes it starts; Python runs its
``sitecustomize.py`` in each of them (SuperLink, ``flwr-simulation``, Ray's workers inherit the
environment), which answers ``ModuleNotFoundError`` to that one import while that module is being
initialised, so ``TF = None`` as on a machine without TensorFlow, and to nothing else (the ``keras``
engine's own ``import keras`` later works as usual).

It relies on the exact lines above: :func:`guard_applies` checks the installed file for them, and
the launcher leaves the hook out (with a warning) if a Flower upgrade changed them;
tests/unit/test_flower_tf.py fails on such an upgrade, and checks that the guard keeps TensorFlow out of
``flwr.simulation`` while ``import tensorflow`` still works afterwards.
"""

from __future__ import annotations

import importlib.util
import os

HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flower_no_tf")
GUARDED_MODULE = "flwr.simulation.ray_transport.utils"
EXPECTED = """try:
    import tensorflow as TF
except ModuleNotFoundError:
    TF = None
"""


def guarded_source() -> str | None:
    """The text of Flower's ``ray_transport/utils.py`` as installed (None if it is not there)."""
    spec = importlib.util.find_spec("flwr")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "simulation", "ray_transport", "utils.py")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def guard_applies() -> bool:
    """True when the installed Flower imports TensorFlow exactly the way the hook expects."""
    source = guarded_source()
    return source is not None and EXPECTED in source


def with_guard(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`HOOK_DIR` first on ``PYTHONPATH``."""
    out = dict(env)
    out["PYTHONPATH"] = HOOK_DIR + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    return out
