"""``.npy`` bytes for the small arrays sent every round, without re-parsing the same header each time.

Flower's ``Array`` carries a NumPy array as the bytes ``np.save`` writes (``stype "numpy.ndarray"``).
``np.save``/``np.load`` build and parse the header (a Python dict literal, through ``ast``) on every
call: for a ``(10, 1)`` kernel that costs ~0.15 ms a call, more than the data, and a simulated client
decodes and encodes the weights once per task. The header of a given dtype and shape never changes,
so here numpy writes/reads it once and the result is cached; the data is then a concatenation
(encode) or ``np.frombuffer`` (decode).

* :func:`dumps` is byte-identical to ``np.save(..., allow_pickle=False)``.
* :func:`loads` accepts exactly what ``np.load(..., allow_pickle=False)`` accepts (versions 1-3, C or
  Fortran order); object arrays are refused, as there; truncated data is an error. It returns a
  writable copy, like ``np.load``.
"""

from __future__ import annotations

import io
import math

import numpy as np

from fedlinear.common.errors import FedLinearError, untrusted_text

MAGIC = b"\x93NUMPY"
VERSIONS = ((1, 0), (2, 0), (3, 0))  # what np.load reads (numpy.lib.format._check_version)
_MAX_CACHED = 256  # distinct (dtype, shape) pairs kept; a model has a handful

_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_PARSED: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


class NpyError(FedLinearError, ValueError):
    """Bytes that are not an array :func:`loads` accepts (a ValueError, as ``np.load`` raises, and the
    project's one-line error)."""


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value


def dumps(array: np.ndarray) -> bytes:
    """The ``.npy`` bytes of ``array`` (as ``np.save`` writes them)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise NpyError("object arrays cannot be saved without pickle")
    if not array.flags.c_contiguous:  # np.save would write Fortran order or a C copy; keep it simple
        return _np_save(array)
    key = (array.dtype.str, array.shape)
    header = _HEADERS.get(key)
    if header is None:
        full = _np_save(array)
        header = full[: len(full) - array.nbytes]
        _remember(_HEADERS, key, header)
    return header + array.tobytes()


def loads(data: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes (as ``np.load(..., allow_pickle=False)`` reads them).

    A header seen for the first time is parsed here and then confirmed by ``np.load`` itself on the
    whole input (which must agree on dtype and shape), so nothing is accepted that numpy refuses; only
    then is it cached, and later inputs with the same header skip both parsers.
    """
    view = memoryview(data)
    if bytes(view[:6]) != MAGIC or len(view) < 10:
        raise NpyError("not .npy data (bad magic string)")
    major, minor = view[6], view[7]
    if (major, minor) not in VERSIONS:
        raise NpyError(f"unsupported .npy format version {major}.{minor}")
    end = 10 + int.from_bytes(view[8:10], "little") if major == 1 else 12 + int.from_bytes(view[8:12], "little")
    header = bytes(view[:end])
    parsed = _PARSED.get(header)
    known = parsed is not None
    if not known:
        parsed = _parse_header(header)
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if len(view) - end < count * dtype.itemsize:
        raise NpyError(f".npy data truncated: {len(view) - end} bytes for {count} x {dtype}")
    if not known:
        _confirm_with_numpy(data, dtype, shape)
        _remember(_PARSED, header, parsed)
    try:
        if dtype.itemsize == 0:  # "|V0", "|S0", "<U0": nothing to read (np.load gives empty items too)
            return np.ndarray(shape, dtype=dtype, order="F" if fortran else "C")  # np.zeros would widen "S0"
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
        return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")
    except ValueError as exc:  # e.g. shape (0, 2**31, 2**31): no data, but more elements than numpy can index
        raise NpyError(untrusted_text(f".npy header describes an impossible array {shape} x {dtype}: {exc}", 300)) from None


def _confirm_with_numpy(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Refuse what ``np.load`` refuses, or reads differently (a header this module has not seen)."""
    try:
        theirs = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, EOFError, OverflowError, ...
        raise NpyError(untrusted_text(f".npy data is not valid: {exc}", 300)) from None
    if not isinstance(theirs, np.ndarray) or theirs.dtype != dtype or theirs.shape != shape:
        raise NpyError(".npy header is not valid: numpy reads it differently")


def _np_save(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _parse_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(stream)
    except Exception as exc:  # noqa: BLE001 - numpy's parser raises ValueError, SyntaxError, TokenError, ...
        raise NpyError(untrusted_text(f".npy header is not valid: {exc}", 300)) from None
    if dtype.hasobject:
        raise NpyError("object arrays cannot be loaded without pickle")
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise NpyError(untrusted_text(f".npy header has an invalid shape {tuple(shape)}", 300))  # np.load refuses it too
    return dtype, tuple(shape), bool(fortran)
