"""Export the linear model as a TensorFlow SavedModel anyone can load and serve.

The SavedModel holds a ``tf.Module`` with two variables (``kernel`` (d, 1), ``bias`` (1,)), or the
kernel alone for a model without an intercept (``fit-intercept = false``), and one signature,
``serving_default``: input ``x`` float32 ``[None, d]`` -> output ``y`` float32 ``[None, 1]``.
Load it with plain TensorFlow, no fedlinear needed::

    m = tf.saved_model.load("RUN_DIR/model")
    y = m.signatures["serving_default"](x=tf.constant(x, tf.float32))["y"]

TensorFlow is imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import NamedTuple

import numpy as np

from fedlinear.common import export_template, storage
from fedlinear.common.errors import FedLinearError
from fedlinear.common.model import LinearWeights


@contextlib.contextmanager
def quiet_native_stderr():
    """Hold back what TensorFlow's C++ runtime writes to fd 2 (CUDA probing on a CPU-only machine).

    The captured text is replayed if the block raises, so a real failure still shows its cause.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tensorflow():
    with quiet_native_stderr():
        import tensorflow as tf

        tf.constant(0.0)  # device discovery happens on first use: keep its noise held back too
    return tf


_tensorflow_saves = 0  # SavedModels TensorFlow wrote in this process (its first one seeds a template)
_fresh: bool | None = None  # whether TensorFlow was not yet imported when this process's first save began


def save_local(weights: LinearWeights, path: str) -> None:
    """The model's definition: TensorFlow writes the SavedModel of ``weights`` to the new local ``path``."""
    global _tensorflow_saves, _fresh
    if _fresh is None:
        _fresh = "tensorflow" not in sys.modules
    tf = _tensorflow()

    num_features = weights.num_features

    class LinearRegression(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="fedlinear")
            self.kernel = tf.Variable(weights.kernel.astype(np.float32), name="kernel")
            if weights.bias is not None:
                self.bias = tf.Variable(weights.bias.astype(np.float32), name="bias")

        @tf.function(input_signature=[tf.TensorSpec([None, num_features], tf.float32, name="x")])
        def serve(self, x):
            y = tf.matmul(x, self.kernel)
            return {"y": y + self.bias if weights.bias is not None else y}

    module = LinearRegression()
    _tensorflow_saves += 1
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def export_savedmodel(weights: LinearWeights, uri: str) -> None:
    """Write the SavedModel to ``uri`` (local dir or ``s3://`` prefix) with TensorFlow, published only when
    complete."""
    with tempfile.TemporaryDirectory(prefix="fedlinear-export-") as tmp:
        path = os.path.join(tmp, "model")
        save_local(weights, path)
        storage.publish_dir(path, uri)


def export(weights: LinearWeights, uri: str) -> str:
    """Write the SavedModel to ``uri`` from this shape's cached template if there is one (no TensorFlow),
    else with TensorFlow, keeping that export as the shape's template when it is this process's first;
    returns which wrote it: ``"template"`` or ``"tensorflow"`` (see :mod:`common.export_template`)."""
    try:
        export_template.export(weights, uri, definition())
        return "template"
    except export_template.Unusable:
        pass
    with tempfile.TemporaryDirectory(prefix="fedlinear-export-") as tmp:
        path = os.path.join(tmp, "model")
        first = _tensorflow_saves == 0
        save_local(weights, path)
        if first:
            with contextlib.suppress(export_template.Unusable, OSError):
                _adopt(path, weights)
        storage.publish_dir(path, uri)
    return "tensorflow"


def definition() -> str:
    """The hash of the model's definition (:func:`save_local`) in its templates' cache key."""
    return export_template.definition_hash(save_local)


def template_available(num_features: int, bias: bool) -> bool:
    """Whether this shape's template is in the cache (exports of it need no TensorFlow)."""
    return export_template.available(num_features, bias, definition())


def _adopt(path: str, weights: LinearWeights) -> str:
    if _tensorflow_saves != 1 or not _fresh:  # TensorFlow numbers functions per process: only a first save
        raise export_template.Unusable("not a fresh process's first TensorFlow export")  # is a fresh process's
    return export_template.adopt(path, weights, definition(), _tensorflow().__version__)


def make_template(num_features: int, bias: bool) -> str:
    """Make this shape's template in this process (it must not have exported with TensorFlow yet); its path."""
    weights = export_template.probe_weights(num_features, bias)
    with tempfile.TemporaryDirectory(prefix="fedlinear-template-") as tmp:
        path = os.path.join(tmp, "model")
        save_local(weights, path)
        return _adopt(path, weights)


def main(argv: list[str] | None = None) -> None:
    """``python -m fedlinear.common.export template D [--no-bias] [--nice]``: make that shape's template
    (what :func:`common.export_template.create_in_subprocess` runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedlinear.common.export")
    parser.add_argument("what", choices=["template"])
    parser.add_argument("num_features", type=int)
    parser.add_argument("--no-bias", action="store_true")
    parser.add_argument("--nice", action="store_true", help="at a lower priority (a run's rounds come first)")
    args = parser.parse_args(argv)
    if args.num_features < 1:
        parser.error("num_features must be >= 1")
    if args.nice:
        with contextlib.suppress(OSError):
            os.nice(10)
    try:
        print(make_template(args.num_features, not args.no_bias))
    except export_template.Unusable as exc:
        sys.stderr.write(f"export template: {exc}\n")
        raise SystemExit(1) from None


def load_savedmodel(uri: str):
    """Load an exported model; returns ``(predict_fn, num_features)``."""
    tf = _tensorflow()

    with storage.local_copy_of_dir(uri) as path:
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise FedLinearError(f"{uri}: not a SavedModel (no saved_model.pb)")
        loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]
    num_features = int(signature.structured_input_signature[1]["x"].shape[1])

    def predict(x: np.ndarray) -> np.ndarray:
        return signature(x=tf.constant(np.asarray(x, dtype=np.float32)))["y"].numpy()

    return predict, num_features


class ReadModel(NamedTuple):
    """An exported linear model's variables: ``kernel`` (d,) float64, ``bias`` (0.0 without one),
    ``num_features`` d, and whether it has an intercept (a ``bias`` variable)."""

    kernel: np.ndarray
    bias: float
    num_features: int
    intercept: bool


def read_linear(path: str) -> ReadModel:
    """The variables of an exported SavedModel in a local directory: its ``kernel`` and, when the
    model has an intercept, ``bias`` (what :func:`export_savedmodel` writes; a ``fit-intercept = false``
    export has no bias: 0.0, ``intercept`` False)."""
    tf = _tensorflow()
    try:
        with quiet_native_stderr():
            loaded = tf.saved_model.load(path)
        kernel = np.asarray(loaded.kernel.numpy(), np.float64)
        variable = getattr(loaded, "bias", None)
        bias = None if variable is None else np.asarray(variable.numpy(), np.float64).reshape(-1)
    except AttributeError:
        raise FedLinearError(f"{path}: a SavedModel without fedlinear's kernel variable") from None
    except Exception as exc:  # noqa: BLE001 - TF's errors on a broken model: one line
        raise FedLinearError(f"{path}: TensorFlow cannot load it ({type(exc).__name__})") from None
    if kernel.ndim != 2 or kernel.shape[1] != 1 or (bias is not None and bias.shape != (1,)):
        shown = "no bias" if bias is None else f"bias {bias.shape}"
        raise FedLinearError(f"{path}: kernel {kernel.shape} / {shown} is not a linear model's (d, 1) / (1,)")
    return ReadModel(kernel.ravel(), 0.0 if bias is None else float(bias[0]), int(kernel.shape[0]), bias is not None)


if __name__ == "__main__":
    main()
