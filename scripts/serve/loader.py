"""One version of one model, loaded: an immutable :class:`Servable`.

TensorFlow loads the SavedModel **once**, here, in the loader thread. For every signature whose one
input is a float32 ``[None, d]`` tensor and whose one output is ``[None, 1]`` or ``[None]``, the
loader reads the affine map the signature computes: the ``kernel``/``bias`` variables when the
module has them (what :func:`common.export.export_savedmodel` writes), otherwise by probing
(``b = f(0)``, ``w_i = f(e_i) - b``). It then checks that map against TensorFlow's own output on
probe inputs (zeros, unit rows, random rows at several scales); only a signature that passes is
answered in NumPy (``engine = numpy``), any other one calls TensorFlow per request
(``engine = tensorflow``), so a non-linear SavedModel is still served correctly, only slower.

NumPy's prediction is ``float64(x as float32) @ float64(kernel) + float64(bias)``: the exact value
of the SavedModel's function on the float32 inputs TensorFlow would receive; TensorFlow's float32
result differs from it by float32 rounding only (the check allows a few units in the last place of
``|x| @ |w| + |b|``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.common.export import _tensorflow, quiet_native_stderr
from fedlinear.common.modelrepo import SAVED_MODEL, VERSION_INFO, model_digest, read_json, tree_hash

F32_MAX = float(np.finfo(np.float32).max)
_EPS32 = float(np.finfo(np.float32).eps)


@dataclasses.dataclass(frozen=True)
class Signature:
    """One servable signature: names, the feature count, and how it is computed."""

    name: str
    input_name: str
    output_name: str
    num_features: int
    output_rank: int  # 2 for [None, 1], 1 for [None]
    kernel: np.ndarray | None  # (d, 1) float64, when answered in NumPy
    bias: float
    tf_function: Any  # the concrete function (TensorFlow path, and the check)

    @property
    def engine(self) -> str:
        return "numpy" if self.kernel is not None else "tensorflow"

    def predict(self, x32: np.ndarray) -> np.ndarray:
        """``x32`` float32 ``(n, d)`` -> float64 ``(n, 1)``."""
        if self.kernel is not None:
            return x32.astype(np.float64) @ self.kernel + self.bias
        tf = _tensorflow()
        out = self.tf_function(**{self.input_name: tf.constant(x32)})[self.output_name].numpy()
        return np.asarray(out, np.float64).reshape(len(x32), 1)


@dataclasses.dataclass(frozen=True)
class Servable:
    """An immutable loaded version: a request that holds it is answered wholly by it."""

    name: str
    version: int
    uri: str
    signatures: dict[str, Signature]
    signature_defs: dict[str, Any]  # TF Serving's JSON of the SignatureDefMap (metadata endpoint)
    info: dict[str, Any]
    model_sha256: str
    keepalive: Any = dataclasses.field(default=None, repr=False, compare=False)  # the loaded module (its variables)

    @property
    def default(self) -> Signature:
        return self.signatures["serving_default"]


def _tensor_json(spec) -> dict[str, Any]:
    return {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}


def _signature_defs(path: str) -> dict[str, Any]:
    """The SignatureDefMap of the SavedModel as TF Serving's metadata endpoint prints it (proto3 JSON,
    default fields included)."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, SAVED_MODEL), "rb") as handle:
        proto.ParseFromString(handle.read())
    meta = proto.meta_graphs[0]
    return {
        name: json_format.MessageToDict(
            sig, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for name, sig in sorted(meta.signature_def.items())
    }


def _variables(loaded, d: int) -> tuple[np.ndarray, float] | None:
    kernel, bias = getattr(loaded, "kernel", None), getattr(loaded, "bias", None)
    try:
        k = np.asarray(kernel.numpy(), np.float64)
        b = np.asarray(bias.numpy(), np.float64).reshape(-1)
    except AttributeError:
        return None
    if k.shape != (d, 1) or b.shape != (1,):
        return None
    return k, float(b[0])


def _probes(d: int) -> np.ndarray:
    rng = np.random.default_rng(20)
    rows = [np.zeros((1, d)), np.eye(d), -np.eye(d)]
    rows += [rng.normal(size=(16, d)) * scale for scale in (1.0, 1e-3, 1e3)]
    rows.append(rng.uniform(-1, 1, size=(16, d)) * rng.uniform(0, 100, size=(1, d)))
    return np.concatenate(rows).astype(np.float32)


def _affine(tf, fn, input_name: str, output_name: str, d: int, loaded, is_default: bool):
    """``(kernel, bias)`` of an affine signature checked against TensorFlow on probes, or None."""
    call = lambda x: np.asarray(fn(**{input_name: tf.constant(x)})[output_name].numpy(), np.float64).reshape(len(x))  # noqa: E731
    parts = _variables(loaded, d) if is_default else None
    if parts is None:  # probe the function itself
        basis = np.concatenate([np.zeros((1, d)), np.eye(d)]).astype(np.float32)
        values = call(basis)
        parts = ((values[1:] - values[0]).reshape(d, 1), float(values[0]))
    kernel, bias = parts
    x = _probes(d)
    got, want = x.astype(np.float64) @ kernel + bias, call(x).reshape(-1, 1)
    scale = np.abs(x.astype(np.float64)) @ np.abs(kernel) + abs(bias)
    if not (np.isfinite(kernel).all() and np.isfinite(bias)):
        return None
    if np.all(np.abs(got - want) <= 8 * (d + 2) * _EPS32 * scale + 1e-30):
        return kernel, bias
    return None


def load(name: str, version: int, uri: str, say=print) -> Servable:
    """Load ``uri`` (local or ``s3://``) as version ``version`` of model ``name``."""
    tf = _tensorflow()
    with storage.local_copy_of_dir(uri) as path:
        if not os.path.isfile(os.path.join(path, SAVED_MODEL)):
            raise FedLinearError(f"{uri}: not a SavedModel (no {SAVED_MODEL})")
        files = model_digest(path)
        info = read_json(os.path.join(path, VERSION_INFO)) or {}
        if info.get("files") and info["files"] != files:
            raise FedLinearError(f"{uri}: its files do not match the hashes in {VERSION_INFO} (a partial or altered upload)")
        try:
            with quiet_native_stderr():
                loaded = tf.saved_model.load(path)
            defs = _signature_defs(path)
        except Exception as exc:  # noqa: BLE001 - anything TF raises on a broken model: one line
            raise FedLinearError(f"{uri}: TensorFlow cannot load it ({one_line(exc)[:300]})") from None
    signatures: dict[str, Signature] = {}
    for sig_name, fn in loaded.signatures.items():
        inputs = fn.structured_input_signature[1]
        outputs = fn.structured_outputs
        if len(inputs) != 1 or len(outputs) != 1:
            continue
        (input_name, spec), (output_name, out_spec) = next(iter(inputs.items())), next(iter(outputs.items()))
        shape, out_shape = spec.shape.as_list(), out_spec.shape.as_list()
        if spec.dtype != tf.float32 or len(shape) != 2 or shape[1] is None or out_shape not in ([None, 1], [None]):
            continue
        d = int(shape[1])
        parts = _affine(tf, fn, input_name, output_name, d, loaded, sig_name == "serving_default")
        kernel, bias = parts if parts is not None else (None, 0.0)
        signatures[sig_name] = Signature(sig_name, input_name, output_name, d, len(out_shape), kernel, bias, fn)
        if parts is None:
            say(f"fedlinear serve: {name} version {version}: signature '{sig_name}' is not affine within float32 "
                "rounding; it is answered by TensorFlow per request")  # fmt: skip
    if "serving_default" not in signatures:
        raise FedLinearError(
            f"{uri}: no 'serving_default' signature taking one float32 [None, d] input to one [None, 1] output"
        )
    return Servable(name, version, uri, signatures, defs, info, tree_hash(files), loaded)
