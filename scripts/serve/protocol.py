"""Request bodies, checked at the boundary: TF Serving's predict/regress and KServe V2's infer.

Every check raises :class:`BadRequest` (HTTP 400) with a message naming what is wrong; nothing
unchecked reaches a model. Numbers must be JSON numbers (not strings, not booleans), finite (JSON's
``NaN``/``Infinity`` extensions are refused, as TF Serving refuses them for float inputs) and within
float32's range, since the signature takes float32.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - pinned in pyproject; the standard library is the fallback
    orjson = None

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.serve.loader import F32_MAX, Servable, Signature


class BadRequest(FedLinearError):
    """A malformed or invalid request (HTTP 400)."""


def _refuse_constant(name: str):
    raise BadRequest(f"JSON Parse error: {name} is not a valid number (NaN and infinities are refused)")


def parse_json(body: bytes) -> Any:
    """Parse a request body (strict: no NaN/Infinity, bounded nesting).

    orjson is strict JSON already (it refuses NaN and infinities, integers beyond 64 bits, nesting
    deeper than 1024); the standard library's parser is the fallback, made as strict.
    """
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            token = body[exc.pos : exc.pos + 9].lstrip(b"-")
            for name in ("NaN", "Infinity"):
                if token.startswith(name.encode()):
                    _refuse_constant(name)
            raise BadRequest(f"JSON Parse error: {exc}") from None
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("JSON Parse error: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"JSON Parse error: {exc}") from None


def _number(value: Any, where: str) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise BadRequest(f"{where}: {str(value)[:20]}... is out of float32 range") from None
    shown = json.dumps(value)[:40] if not isinstance(value, str) else repr(value[:40])
    raise BadRequest(f"{where}: expected a number, got {shown}")


def _matrix(rows: Any, sig: Signature, where: str) -> np.ndarray:
    """A list of ``n`` rows of ``d`` numbers (or of numbers when d = 1) -> float32 (n, d)."""
    d = sig.num_features
    if not isinstance(rows, list):
        raise BadRequest(f"{where}: expected a list of instances, got {type(rows).__name__}")
    if not rows:
        raise BadRequest(f"{where}: no instances")
    # fast path: a list of d-lists of JSON numbers (one type check per value, one conversion); anything
    # else, or a value that is out of range, goes through the checks below for a message naming it
    if all(type(row) is list and len(row) == d for row in rows) and {type(v) for row in rows for v in row} <= {float, int}:
        try:
            x = np.array(rows, dtype=np.float64)
        except OverflowError:
            x = None
        if x is not None and np.all(np.abs(x) <= F32_MAX):
            return x.astype(np.float32)
    out = np.empty((len(rows), d), np.float64)
    for i, row in enumerate(rows):
        if isinstance(row, dict):  # row format with named inputs: {"x": [...]}
            if set(row) != {sig.input_name}:
                raise BadRequest(f"{where}[{i}]: expected the input '{sig.input_name}', got {sorted(row)[:5]}")
            row = row[sig.input_name]
        if d == 1 and not isinstance(row, list):
            row = [row]
        if not isinstance(row, list) or len(row) != d:
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise BadRequest(f"{where}[{i}]: expected {d} features (input '{sig.input_name}' is float32 [-1, {d}]), got {got}")
        for j, value in enumerate(row):
            out[i, j] = _number(value, f"{where}[{i}][{j}]")
    return _float32(out, where)


def _float32(x: np.ndarray, where: str) -> np.ndarray:
    big = np.abs(x) > F32_MAX
    if big.any():
        i, j = (int(k) for k in np.argwhere(big)[0])
        raise BadRequest(f"{where}[{i}][{j}]: {x[i, j]:g} is out of float32 range")
    return x.astype(np.float32)


def signature_of(servable: Servable, body: dict) -> Signature:
    name = body.get("signature_name", "serving_default")
    if not isinstance(name, str):
        raise BadRequest("'signature_name' must be a string")
    name = name or "serving_default"
    if name not in servable.signatures:
        raise BadRequest(f'Serving signature name: "{name}" not found in signature def')
    return servable.signatures[name]


def predict_input(servable: Servable, body: Any) -> tuple[Signature, np.ndarray, bool]:
    """``(signature, x float32 (n, d), row_format)`` of a TF Serving ``:predict`` body."""
    if not isinstance(body, dict):
        raise BadRequest("JSON Value: expected an object with 'instances' or 'inputs'")
    sig = signature_of(servable, body)
    if "instances" in body and "inputs" in body:
        raise BadRequest("Not both 'instances' and 'inputs' keys may be given: use the row or the columnar format")
    if "instances" in body:
        return sig, _matrix(body["instances"], sig, "instances"), True
    if "inputs" in body:
        inputs = body["inputs"]
        if isinstance(inputs, dict):
            if set(inputs) != {sig.input_name}:
                raise BadRequest(f"inputs: expected the input '{sig.input_name}', got {sorted(inputs)[:5]}")
            inputs = inputs[sig.input_name]
        return sig, _matrix(inputs, sig, "inputs"), False
    raise BadRequest("Missing 'inputs' or 'instances' key")


def predict_output(sig: Signature, y: np.ndarray, row_format: bool) -> dict:
    values = y.reshape(-1).tolist() if sig.output_rank == 1 else y.tolist()
    if row_format:
        return {"predictions": values}
    return {"outputs": values}


def regress_input(servable: Servable, body: Any) -> tuple[Signature, np.ndarray]:
    """TF Serving's ``:regress`` body: ``{"examples": [{"x": [d numbers]}, ...], "context": {...}}``
    (each example names the signature's input; ``context`` features are shared by every example)."""
    if not isinstance(body, dict):
        raise BadRequest("JSON Value: expected an object with 'examples'")
    sig = signature_of(servable, body)
    examples, context = body.get("examples"), body.get("context", {})
    if not isinstance(examples, list) or not examples:
        raise BadRequest("'examples' must be a non-empty list of objects")
    if not isinstance(context, dict):
        raise BadRequest("'context' must be an object")
    rows = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise BadRequest(f"examples[{i}]: expected an object of features")
        clash = set(example) & set(context)
        if clash:
            raise BadRequest(f"examples[{i}]: feature '{sorted(clash)[0]}' is also in 'context'")
        rows.append({**context, **example})
    return sig, _matrix(rows, sig, "examples")


_V2_TYPES = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


def _flatten(data: Any, where: str, limit: int) -> list:
    out: list = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
            if len(stack) > limit:
                raise BadRequest(f"{where}: more values than the shape holds")
        else:
            out.append(item)
    return out


def infer_input(servable: Servable, body: Any) -> tuple[Signature, np.ndarray, dict]:
    """KServe V2 ``infer``: ``{"inputs": [{"name", "shape": [n, d], "datatype", "data"}]}``."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object with 'inputs'")
    sig = servable.default
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"'inputs' must be a list of one tensor (the model has one input, '{sig.input_name}')")
    tensor = inputs[0]
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if name != sig.input_name:
        raise BadRequest(f"unexpected input '{name}': the model's input is '{sig.input_name}'")
    if datatype not in _V2_TYPES:
        raise BadRequest(f"input '{name}': datatype {json.dumps(datatype)[:20]} is not numeric (use FP32)")
    d = sig.num_features
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise BadRequest(f"input '{name}': 'shape' must be a list of non-negative integers")
    if shape[-1:] != [d] or len(shape) != 2 or shape[0] < 1:
        raise BadRequest(f"input '{name}': shape {shape} does not match the model's [-1, {d}]")
    count = shape[0] * d
    values = _flatten(tensor.get("data"), f"input '{name}' data", count)
    if len(values) != count:
        raise BadRequest(f"input '{name}': shape {shape} holds {count} values, 'data' has {len(values)}")
    flat = np.array([_number(v, f"input '{name}' data[{k}]") for k, v in enumerate(values)], np.float64)
    if datatype.startswith(("INT", "UINT")) and not np.all(flat == np.round(flat)):
        raise BadRequest(f"input '{name}': datatype {datatype} but the data has non-integers")
    requested = body.get("outputs")
    extra = {"id": body["id"]} if isinstance(body.get("id"), str) else {}
    if requested is not None:
        if not isinstance(requested, list) or any(not isinstance(o, dict) or o.get("name") != sig.output_name for o in requested):
            raise BadRequest(f"'outputs': the model has one output, '{sig.output_name}'")
    return sig, _float32(flat.reshape(shape[0], d), f"input '{name}' data"), extra


def infer_output(servable: Servable, sig: Signature, y: np.ndarray, extra: dict) -> dict:
    shape = [len(y), 1] if sig.output_rank == 2 else [len(y)]
    return {
        "model_name": servable.name,
        "model_version": str(servable.version),
        **extra,
        "outputs": [{"name": sig.output_name, "datatype": "FP32", "shape": shape, "data": y.reshape(-1).tolist()}],
    }
