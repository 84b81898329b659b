"""Property-based tests (hypothesis): every input gives a result or the project's one-line error.

* the array decoder (common/npy.py) on arbitrary bytes and on valid ``.npy`` bytes with mutated
  headers: an array equal to what ``np.load(allow_pickle=False)`` reads, or a FedLinearError;
* the run-config parser (RunConfig.from_run_config) on arbitrary dicts of keys to values of any
  type (NaN, inf, huge integers, strings, booleans, None, lists): a RunConfig that parses back to
  itself, or a FedLinearError naming a config key;
* the CSV reader (common/csvio.py) with any target column over well-formed files, and any bytes in a
  directory of parts (tests/unit/test_data_files.py covers single files of any bytes).
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedlinear.common import npy
from fedlinear.common.config import RunConfig
from fedlinear.common.csvio import load_csv, to_csv_bytes
from fedlinear.common.errors import FedLinearError, one_line

FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def assert_one_line(exc: FedLinearError) -> str:
    message = str(exc)
    assert message and message.isprintable(), repr(message)  # no newline or control character
    assert one_line(exc) == " ".join(message.split())  # what the edges print
    return message


# ------------------------------------------------------------------------------------------------
# The array decoder
# ------------------------------------------------------------------------------------------------

_DTYPES = ["<f4", ">f8", "<i8", "|u1", "|b1", "<c16", "<f2", "|S3", "<U2", "|V4"]
_SHAPES = st.lists(st.integers(0, 4), max_size=3).map(tuple)


def np_save(array: np.ndarray, version=None) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array, allow_pickle=False)
    else:
        np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


def np_load(data: bytes):
    """What numpy itself makes of the bytes: an array, or None if it refuses them."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - any refusal
        return None


def check_decoder(data: bytes) -> None:
    try:
        ours = npy.loads(data)
    except FedLinearError as exc:
        assert_one_line(exc)
        assert isinstance(exc, ValueError)  # what np.load raises, for callers that catch that
        return
    theirs = np_load(data)
    assert theirs is not None, "npy.loads accepted bytes that np.load refuses"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert ours.tobytes() == theirs.tobytes()
    assert ours.flags.writeable


@FAST
@given(data=st.binary(max_size=300))
def test_decoder_on_arbitrary_bytes(data):
    check_decoder(data)
    check_decoder(npy.MAGIC + data)  # past the magic string, into the version and header


@st.composite
def mutated_npy(draw):
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(_SHAPES)
    array = np.zeros(shape, dtype=dtype)
    data = np_save(array, draw(st.sampled_from([None, (1, 0), (2, 0), (3, 0)])))
    header_end = data.index(b"\n") + 1
    header = bytearray(data[:header_end])
    body = data[header_end:]
    kind = draw(st.sampled_from(["byte", "text", "shape", "descr", "length", "truncate", "extend"]))
    if kind == "byte":  # any byte of the header replaced
        at = draw(st.integers(0, len(header) - 1))
        header[at] = draw(st.integers(0, 255))
    elif kind == "text":  # a span of the dict literal replaced with anything
        start = draw(st.integers(10, len(header) - 1))
        stop = draw(st.integers(start, len(header)))
        header[start:stop] = draw(st.binary(max_size=20))
    elif kind == "shape":
        dims = draw(st.lists(st.one_of(st.integers(-3, 5), st.integers(2**31, 2**70), st.just(-(2**63))), max_size=3))
        shape_text = "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"
        text = bytes(header).decode("latin1").replace(repr(shape).replace(",)", ",)"), shape_text, 1)
        header = bytearray(text.encode("latin1"))
    elif kind == "descr":
        descr = draw(st.one_of(st.sampled_from(["|O", "<f0", "|V0", "|S0", "<U0", "x", "", "<f16", "[('a', '<f4')]"]),
                               st.text(max_size=6)))  # fmt: skip
        text = bytes(header).decode("latin1").replace(f"'{dtype.str}'", repr(descr), 1)
        header = bytearray(text.encode("latin1", "replace"))
    elif kind == "length":  # the header-length field lies
        width = 2 if header[6] == 1 else 4
        header[8 : 8 + width] = draw(st.integers(0, 256**width - 1)).to_bytes(width, "little")
    elif kind == "truncate":
        body = body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    else:
        body += draw(st.binary(min_size=1, max_size=16))
    return bytes(header) + body


def _v1(header: str, body: bytes = b"\x00" * 4) -> bytes:
    text = header.encode("latin1")
    text += b" " * (117 - len(text)) + b"\n"
    return npy.MAGIC + b"\x01\x00" + len(text).to_bytes(2, "little") + text + body


@FAST
@given(data=mutated_npy())
@example(_v1("{'descr': '|V0', 'fortran_order': False, 'shape': (), }"))  # itemsize 0 (np.load reads it)
@example(_v1("{'descr': '|S0', 'fortran_order': False, 'shape': (2,), }"))
@example(_v1("{'descr': '<f0', 'fortran_order': False, 'shape': (), }"))  # TypeError inside numpy
@example(_v1("\x00'descr': '<f4', 'fortran_order': False, 'shape': (), }"))  # SyntaxError inside numpy
@example(_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (), "))  # TokenError inside numpy
@example(_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 2147483648, 2147483648), }"))  # too big
@example(b"\x93NUMPY\x02\x01t\x00\x00\x00{'descr': '<f4', 'fortran_order': False, 'shape': (), }"
         + b" " * 60 + b"\n\x00\x00\x00\x00")  # version 2.1: accepted once, np.load refuses it (found by CI)
@example(_v1("{'descr': '0\x1b', 'fortran_order': False, 'shape': (), }"))  # numpy's message echoed the ESC
def test_decoder_on_mutated_headers(data):
    check_decoder(data)


@FAST
@given(dtype=st.sampled_from(_DTYPES), shape=_SHAPES, seed=st.integers(0, 2**32 - 1))
def test_decoder_reads_what_np_save_writes(dtype, shape, seed):
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    array = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
    for version in (None, (2, 0)):
        back = npy.loads(np_save(array, version))
        assert back.dtype == array.dtype and back.shape == array.shape and back.tobytes() == array.tobytes()
    assert npy.dumps(array) == np_save(array)


# ------------------------------------------------------------------------------------------------
# The run-config parser
# ------------------------------------------------------------------------------------------------

_VALUES = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 5e-324, -0.0, 0, 1, 2**64, 10**5000]),
    st.text(max_size=12),
    st.sampled_from(["auto", "true", "False", " 3 ", "1e3", "nan", "inf", "-inf", "0x10", "1_000", "/abs", "s3://b/k",
                     "whiten", "numpy", "keras", "central-server-clip", "yes", "no", "none", "\n", "a\nb", "\x00"]),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.binary(max_size=4),
)  # fmt: skip
_KEYS = st.one_of(st.sampled_from(RunConfig.keys()), st.text(max_size=10))


@FAST
@given(run_config=st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_run_config_gives_a_config_or_a_one_line_error(run_config):
    try:
        cfg = RunConfig.from_run_config(run_config)
    except FedLinearError as exc:
        message = assert_one_line(exc)
        assert "config key" in message
        return
    # a valid config is a fixed point: its resolved dict parses back to the same config
    assert RunConfig.from_run_config(cfg.as_dict()) == cfg


@FAST
@given(key=st.sampled_from(RunConfig.keys()), value=_VALUES)
@example("secagg-quantization-range", 10**5000)  # the range message formatted a 5000-digit int: ValueError
@example("dp-delta", 10**400)  # float(10**400): OverflowError
@example("data-uri", None)  # was accepted as the path "None"
@example("engine", "\x1b[2J")  # echoed a terminal escape into the message
def test_each_key_alone_with_any_value(key, value):
    try:
        RunConfig.from_run_config({key: value})
    except FedLinearError as exc:
        assert f"'{key}'" in assert_one_line(exc)


# ------------------------------------------------------------------------------------------------
# The CSV reader
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="fedlinear-props-") as tmp:
        yield tmp


@FAST
@given(
    rows=st.integers(1, 6), cols=st.integers(1, 5), target=st.integers(-(2**70), 2**70) | st.integers(-7, 7),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_csv_any_target_column(scratch, rows, cols, target, seed):
    matrix = np.random.default_rng(seed).normal(size=(rows, cols))
    path = os.path.join(scratch, "target.csv")
    with open(path, "wb") as handle:
        handle.write(to_csv_bytes(matrix))
    try:
        data = load_csv(path, target_column=target)
    except FedLinearError as exc:
        message = assert_one_line(exc)
        assert message.startswith(path) or "'target-column'" in message
        assert cols < 2 or not -cols <= target < cols
        return
    assert -cols <= target < cols
    np.testing.assert_array_equal(data.y, matrix[:, target])
    np.testing.assert_array_equal(data.x, np.delete(matrix, target % cols, axis=1))


_PART = st.one_of(
    st.binary(max_size=60),
    st.lists(st.sampled_from([b"1", b"2.5", b",", b"\n", b"\r\n", b"a", b"-", b"e9", b" ", b"nan", b"\xef\xbb\xbf"]),
             max_size=20).map(b"".join),
)  # fmt: skip


@FAST
@given(parts=st.lists(_PART, min_size=1, max_size=3), header=st.sampled_from(["auto", "yes", "no"]))
def test_csv_directory_of_any_parts(scratch, parts, header):
    folder = tempfile.mkdtemp(dir=scratch)
    for i, content in enumerate(parts):
        with open(os.path.join(folder, f"part-{i}.csv"), "wb") as handle:
            handle.write(content)
    try:
        data = load_csv(folder + "/", header=header)
    except FedLinearError as exc:
        message = assert_one_line(exc)
        assert message.startswith(folder)
        return
    assert data.x.shape[0] == data.y.shape[0] >= len(parts) and data.x.shape[1] >= 1
    assert np.isfinite(data.x).all() and np.isfinite(data.y).all()
    assert data.sources == tuple(os.path.join(folder, f"part-{i}.csv") for i in range(len(parts)))
