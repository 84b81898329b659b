"""Started by Python in every process of a fedlinear simulation run (the launcher puts this folder first on
``PYTHONPATH``; scripts/local/flower_tf.py says why and how it is checked). Standard library only.

Flower 1.42's ``flwr/simulation/ray_transport/utils.py`` runs ``import tensorflow as TF`` when it is
imported (``except ModuleNotFoundError: TF = None``), so ``flwr-simulation`` and every Ray actor pay
TensorFlow's import (~6 s of CPU, ~0.5 GB) although no fedlinear client needs it there. This finder
answers ``ModuleNotFoundError`` to that one import, while that module is being initialised, and to
nothing else: a later ``import tensorflow`` (the ``keras`` engine) imports it as usual.
"""

import importlib.machinery
import importlib.util
import os
import sys

_GUARDED = "flwr.simulation.ray_transport.utils"


class FlowerTensorFlowGuard:
    """``find_spec`` hook: no TensorFlow for ``flwr.simulation.ray_transport.utils``'s module-level import."""

    blocked = 0

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "tensorflow":
            return None
        module = sys.modules.get(_GUARDED)
        spec = getattr(module, "__spec__", None)
        if module is None or not getattr(spec, "_initializing", False):
            return None
        cls.blocked += 1
        raise ModuleNotFoundError(
            "tensorflow is not imported for Flower's simulation utils (fedlinear's guard)", name="tensorflow"
        )


if not any(getattr(f, "__name__", "") == "FlowerTensorFlowGuard" for f in sys.meta_path):
    sys.meta_path.insert(0, FlowerTensorFlowGuard)

# Another sitecustomize further down the path (a distribution's, a user's) still runs.
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
_other = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _other is not None and _other.loader is not None:
    _other.loader.exec_module(importlib.util.module_from_spec(_other))
