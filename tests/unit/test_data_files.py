"""Real files (BOM, CRLF / CR line endings, whitespace-only lines, a bad first row, bad UTF-8) and hard
synthetic data made on purpose (scales, offsets, condition number, target offset)."""

from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlinear.common import csvio
from fedlinear.common.csvio import load_csv, to_csv_bytes
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.common.synth import correlation_matrix, make_synthetic
from fedlinear.scripts import cli
from tests.s3fixtures import bucket, moto_s3, s3env  # noqa: F401 - pytest fixtures

BOM = b"\xef\xbb\xbf"
HINT = "(a first row is a header only when no field is a number or empty: set header to 'yes' or 'no')"


def write(tmp_path, name, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def error_of(uri: str, **kwargs) -> str:
    """The message of the FedLinearError that loading ``uri`` raises (checked to be one line)."""
    with pytest.raises(FedLinearError) as err:
        load_csv(uri, **kwargs)
    message = str(err.value)
    assert message.isprintable() and one_line(err.value) == message
    return message


# --------------------------------------------------------------------------------------------
# What parses, and to what
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"1,2\n3,4\n5,6\n", id="lf"),
        pytest.param(BOM + b"1,2\n3,4\n5,6\n", id="bom"),
        pytest.param(b"1,2\r\n3,4\r\n5,6\r\n", id="crlf"),
        pytest.param(BOM + b"1,2\r\n3,4\r\n5,6", id="bom-crlf-no-final-newline"),
        pytest.param(b"1,2\r3,4\r5,6\r", id="cr-only"),
        pytest.param(b"1,2\r3,4\r5,6", id="cr-only-no-final-newline"),
        pytest.param(b"1,2\r\n3,4\r5,6\n", id="mixed-endings"),
        pytest.param(b"  \n1,2\n \t \n3,4\r\n\t\r5,6\n   ", id="whitespace-only-lines"),
        pytest.param(b" 1 , 2 \n\t3,\t4\n5 ,6\t\n", id="spaces-around-fields"),
    ],
)
def test_line_endings_bom_and_blank_lines_give_the_same_rows(tmp_path, content):
    loaded = load_csv(write(tmp_path, "d.csv", content))
    np.testing.assert_array_equal(loaded.x, [[1.0], [3.0], [5.0]])
    np.testing.assert_array_equal(loaded.y, [2.0, 4.0, 6.0])
    assert loaded.columns is None  # the first numeric row is data, BOM or not


@pytest.mark.parametrize(
    "content", [BOM + b"a,b\n1,2\n3,4\n", BOM + b"a,b\r\n1,2\r\n3,4\r\n", BOM + b"a,b\r1,2\r3,4", b"\n \nA,b\n1,2\n3,4"]
)
def test_header_after_bom_or_blank_lines(tmp_path, content):
    loaded = load_csv(write(tmp_path, "h.csv", content))
    assert loaded.columns[1] == "b" and loaded.columns[0].lower() == "a"  # no BOM left in the name
    np.testing.assert_array_equal(loaded.y, [2.0, 4.0])


def test_utf8_header_names(tmp_path):
    loaded = load_csv(write(tmp_path, "u.csv", BOM + "température,débit\n1,2\n".encode()))
    assert loaded.columns == ("température", "débit")


def test_cr_only_file_longer_than_the_read_buffer(tmp_path):
    rows = 30000
    content = "".join(f"{i},{2 * i}\r" for i in range(rows)).encode()
    loaded = load_csv(write(tmp_path, "big.csv", content))
    assert loaded.num_examples == rows and loaded.y[-1] == 2 * (rows - 1)
    message = error_of(write(tmp_path, "bigbad.csv", content + b"1,2,3\r"))
    assert message.endswith(f"bigbad.csv: line {rows + 1}: expected 2 comma-separated columns, found 3")


def test_header_yes_and_no_still_force(tmp_path):
    path = write(tmp_path, "f.csv", BOM + b"1,n/a\n3,4\n")
    assert load_csv(path, header="yes").columns == ("1", "n/a")
    assert error_of(path, header="no") == f"{path}: line 1: column 2: 'n/a' is not a number"
    empty_name = write(tmp_path, "e.csv", b",a,b\n1,2,3\n")
    assert load_csv(empty_name, header="yes").columns == ("", "a", "b")


# --------------------------------------------------------------------------------------------
# Errors: file, exact physical line, column
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "where"),
    [
        pytest.param(BOM + b"1,2\n3,x\n", "line 2: column 2: 'x' is not a number", id="bom"),
        pytest.param(BOM + b"a,b\n1,2\n3,x\n", "line 3: column 2: 'x' is not a number", id="bom-header"),
        pytest.param(b"1,2\r\n3,4\r\n5,x\r\n7,8\r\n", "line 3: column 2: 'x' is not a number", id="crlf"),
        pytest.param(b"1,2\r3,4\r5,x\r7,8\r", "line 3: column 2: 'x' is not a number", id="cr-only"),
        pytest.param(b"1,2\r\n3,4\r5,6\n7,x", "line 4: column 2: 'x' is not a number", id="mixed-endings"),
        pytest.param(b"1,2\r\r\n\r3,x\r", "line 4: column 2: 'x' is not a number", id="cr-blank-lines-counted"),
        pytest.param(b"1,2\n   \n\t\n3,4\n \n5,nan\n", "line 6: column 2: value 'nan' is not finite", id="whitespace"),
        pytest.param(b"1,2\n  \t  \n3,4,5\n", "line 3: expected 2 comma-separated columns, found 3", id="ws-ragged"),
        pytest.param(b"a,b\r\n\r\n1,2\r\n3\r\n", "line 4: expected 2 comma-separated columns, found 1", id="hdr-crlf"),
        pytest.param(b"1,2\n3,\xc3\xa94\n", "line 2: column 2: '\xe94' is not a number", id="utf8-in-value"),
        pytest.param(b"1,2\n3,4\x00\n", "line 2: column 2: '4\\x00' is not a number", id="nul-escaped"),
        pytest.param(b"1,2\n3,4\xe2\x80\xa85\n", "line 2: column 2: '4\\u20285' is not a number", id="u2028-escaped"),
    ],
)
def test_errors_name_file_and_physical_line(tmp_path, content, where):
    path = write(tmp_path, "bad.csv", content)
    assert error_of(path) == f"{path}: {where}"


@pytest.mark.parametrize(
    ("content", "where"),
    [
        pytest.param(b"1,n/a,3\n4,5,6\n", "line 1: column 2: 'n/a' is not a number", id="n/a"),
        pytest.param(b"1,,3\n4,5,6\n", "line 1: column 2: empty value", id="empty-field"),
        pytest.param(b"1,2,\n4,5,6\n", "line 1: column 3: empty value", id="trailing-comma"),
        pytest.param(BOM + b"NA,2,3\n4,5,6\n", "line 1: column 1: 'NA' is not a number", id="bom-NA-first"),
        pytest.param(b"\r\n \r\n1,n/a,3\r\n", "line 3: column 2: 'n/a' is not a number", id="after-blank-lines"),
        pytest.param(b"x,,z\n4,5,6\n", "line 1: column 1: 'x' is not a number", id="header-with-empty-name"),
        pytest.param(b"year,2020,2021\n4,5,6\n", "line 1: column 1: 'year' is not a number", id="numeric-name"),
    ],
)
def test_first_row_with_a_missing_or_bad_value_is_data_not_a_header(tmp_path, content, where):
    path = write(tmp_path, "first.csv", content)
    assert error_of(path) == f"{path}: {where} {HINT}"


@pytest.mark.parametrize(
    ("content", "where"),
    [
        pytest.param(b"1,2\n3,\xff4\n5,6\n", "line 2: not valid UTF-8 (byte 0xff at character 3); save it as UTF-8",
                     id="bad-byte"),  # fmt: skip
        pytest.param(BOM + b"a,b\r\n1,2\r\n3,\xe9\r\n", "line 3: not valid UTF-8 (byte 0xe9 at character 3)",
                     id="latin1-e-acute-crlf"),  # fmt: skip
        pytest.param(b"1,2\r3,4\r\xc3(,6\r", "line 3: not valid UTF-8 (byte 0xc3 at character 1)", id="cr-only"),
        pytest.param(b"\xe9t\xe9,b\n1,2\n", "line 1: not valid UTF-8 (byte 0xe9 at character 1)", id="header"),
        pytest.param(b"1,2\n3,\xed\xa0\x804\n", "line 2: not valid UTF-8 (byte 0xed at character 3)",
                     id="encoded-surrogate"),  # fmt: skip
        pytest.param("1,2\n".encode("utf-16"), "line 1: not valid UTF-8 (byte 0xff at character 1); it looks like "
                     "UTF-16: save it as UTF-8", id="utf-16"),  # fmt: skip
    ],
)
def test_invalid_utf8_names_file_and_line(tmp_path, content, where):
    path = write(tmp_path, "enc.csv", content)
    assert error_of(path).startswith(f"{path}: {where}")


def test_invalid_utf8_far_into_a_large_file(tmp_path):
    good = "".join(f"{i},{i}\r\n" for i in range(20000)).encode()
    path = write(tmp_path, "far.csv", good + b"1,\x80\r\n2,2\r\n")
    assert error_of(path).startswith(f"{path}: line 20001: not valid UTF-8 (byte 0x80 at character 3)")


def test_numbers_are_what_numpy_reads_not_what_float_reads(tmp_path):
    # float() takes '1_000' and Arabic-Indic digits; numpy's parser (the fast path) does not, nor does the scan.
    for value in ("1_000", "١", "0x10", "1d5"):
        path = write(tmp_path, "n.csv", f"1,2\n3,{value}\n".encode())
        assert error_of(path) == f"{path}: line 2: column 2: '{value}' is not a number"
    loaded = load_csv(write(tmp_path, "ok.csv", b"+1,.5\n5.,-1E+05\n\xc2\xa07\xc2\xa0,8\n"))
    np.testing.assert_array_equal(loaded.x.ravel(), [1.0, 5.0, 7.0])
    np.testing.assert_array_equal(loaded.y, [0.5, -1e5, 8.0])


# --------------------------------------------------------------------------------------------
# Properties: any bytes give a Dataset or a one-line FedLinearError; the fast path and the
# line-by-line scan agree on what a number is
# --------------------------------------------------------------------------------------------

_TOKENS = [b"1", b"-2.5e3", b"7", b".5", b",", b",", b"\n", b"\r", b"\r\n", b" ", b"\t", BOM, b"\xff", b"\xc3\xa9",
           b"\xc3", b"nan", b"inf", b"a", b"n/a", b"", b"\x00", b"1_0", "١".encode(), b"\xe2\x80\xa8", b"\x0c",
           b"1e999"]  # fmt: skip
_ANY_BYTES = st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(_TOKENS), max_size=40).map(b"".join))


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="fedlinear-prop-") as tmp:
        yield tmp


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=_ANY_BYTES, header=st.sampled_from(["auto", "yes", "no"]))
def test_any_bytes_give_a_dataset_or_a_one_line_error(scratch, content, header):
    path = os.path.join(scratch, "any.csv")
    with open(path, "wb") as handle:
        handle.write(content)
    physical_lines = len(content.decode("utf-8", "surrogateescape").replace("\r\n", "\n").replace("\r", "\n")
                         .split("\n"))  # fmt: skip
    try:
        loaded = load_csv(path, header=header)
    except FedLinearError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ")
        assert message.isprintable()  # one line: no control characters, line or paragraph separators
        assert "could not parse" not in message  # the scan found what the fast path rejected
        line = re.match(rf"{re.escape(path)}: line (\d+):", message)
        if line:
            assert 1 <= int(line.group(1)) <= physical_lines
    else:
        assert loaded.x.ndim == 2 and loaded.x.shape[0] == loaded.y.shape[0] >= 1 and loaded.x.shape[1] >= 1
        assert np.isfinite(loaded.x).all() and np.isfinite(loaded.y).all()


_FIELD_CHARS = st.sampled_from(list("0123456789+-.eEinfatyINFATY _\t") + ["\u00a0", "١", "\x0c", "\u2028", "x"])


@settings(max_examples=400, deadline=None, database=None)
@given(field=st.lists(_FIELD_CHARS, min_size=1, max_size=8).map("".join))
def test_is_number_agrees_with_numpy(field):
    try:
        np.loadtxt([f"{field}\n"], delimiter=",", dtype=np.float64, ndmin=2, comments=None)
        numpy_reads = True
    except ValueError:
        numpy_reads = False
    assert csvio._is_number(field.strip()) == numpy_reads


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 30),
    cols=st.integers(2, 4),
    seed=st.integers(0, 2**32 - 1),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    bom=st.booleans(),
    blank=st.sampled_from([b"", b"  ", b"\t", b" \t "]),
    header=st.booleans(),
)
def test_well_formed_variants_parse_to_the_same_matrix(scratch, rows, cols, seed, newline, bom, blank, header):
    matrix = np.random.default_rng(seed).normal(size=(rows, cols)) * 10.0 ** np.arange(cols)
    lines = to_csv_bytes(matrix).splitlines()
    if header:
        lines.insert(0, b",".join(b"c%d" % i for i in range(cols)))
    body = newline.join(line for pair in zip(lines, [blank] * len(lines), strict=True) for line in pair)
    path = os.path.join(scratch, "variant.csv")
    with open(path, "wb") as handle:
        handle.write((BOM if bom else b"") + body)
    loaded = load_csv(path)
    np.testing.assert_array_equal(np.column_stack([loaded.x, loaded.y]), matrix)
    assert (loaded.columns is not None) == header


def _savetxt_bytes(matrix) -> bytes:
    import io

    buf = io.StringIO()
    np.savetxt(buf, matrix, delimiter=",", fmt="%.17g")
    return buf.getvalue().encode("ascii")


SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 1e16,
           123456789012345678.0, -1.5]  # fmt: skip


@settings(max_examples=300, deadline=None, database=None)
@given(
    rows=st.integers(0, 12),
    cols=st.integers(1, 5),
    dtype=st.sampled_from(["float64", "float32", "float16", "int64", "int32", "uint64", "uint8", "bool"]),
    values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.sampled_from(SPECIAL),
                              st.integers(-(2**63), 2**64 - 1)), min_size=60, max_size=60),  # fmt: skip
    target=st.booleans(),
)
def test_csv_bytes_are_the_bytes_savetxt_writes(rows, cols, dtype, values, target):
    with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        flat = np.array([float(v) for v in (values * 2)[: rows * cols]], dtype=np.float64)
        if np.dtype(dtype).kind in "iub":
            flat = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
            info = np.iinfo(dtype) if np.dtype(dtype).kind != "b" else None
            flat = flat if info is None else np.clip(flat, info.min, info.max // 2)
        matrix = flat.astype(dtype).reshape(rows, cols)
    if target and cols > 1:  # as the shards are written: features, then the target column
        x, y = matrix[:, :-1], matrix[:, -1]
        assert to_csv_bytes(x, y) == _savetxt_bytes(np.column_stack([x, y]))
    assert to_csv_bytes(matrix) == _savetxt_bytes(matrix)


def test_csv_bytes_formatted_block_by_block_are_the_same_bytes(monkeypatch):
    monkeypatch.setattr(csvio, "_CSV_BLOCK_VALUES", 7)  # 2 rows of 3 a block: blocks, a ragged last one
    matrix = np.random.default_rng(3).normal(size=(51, 3)) * 1e3
    assert to_csv_bytes(matrix[:, :-1], matrix[:, -1]) == _savetxt_bytes(matrix)


def test_csv_bytes_of_what_savetxt_formats_otherwise_come_from_savetxt():
    for matrix in (np.arange(4.0), np.array([[1 + 2j, 3 - 1j]]), np.ones((2, 3), dtype=np.float64)[:, ::2]):
        assert to_csv_bytes(matrix) == _savetxt_bytes(matrix)


# --------------------------------------------------------------------------------------------
# The same from S3 (a real moto_server): streamed, same arrays, same messages
# --------------------------------------------------------------------------------------------

_CR_BIG = "".join(f"{i * 0.5},{i}\r" for i in range(30000)).encode()  # CR-only, larger than the read buffers


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(BOM + b"a,b\r\n1,2\r\n\r\n  \r\n3,4\r\n", id="bom-header-crlf-ws"),
        pytest.param(b"1,2\r3,4\r", id="cr-only"),
        pytest.param(_CR_BIG, id="cr-only-large"),
        pytest.param(_CR_BIG + b"1,\xff\r", id="cr-only-large-bad-utf8-at-end"),
        pytest.param(_CR_BIG + b"1,n/a\r", id="cr-only-large-bad-value-at-end"),
        pytest.param(b"1,n/a\r\n3,4\r\n", id="n/a-first-row"),
        pytest.param(b"1,,3\n4,5,6\n", id="empty-first-row-field"),
        pytest.param(BOM + b"1,2\n3,\xe9\n", id="bom-latin1"),
    ],
)
def test_s3_objects_load_like_local_files(s3env, bucket, tmp_path, content):  # noqa: F811 - fixtures
    path = write(tmp_path, "data.csv", content)
    key = "files/data.csv"
    s3env.admin().put_object(Bucket=bucket, Key=key, Body=content)
    uri = f"s3://{bucket}/{key}"
    try:
        local = load_csv(path)
    except FedLinearError as exc:
        assert error_of(uri) == str(exc).replace(path, uri)
        return
    remote = load_csv(uri)
    np.testing.assert_array_equal(remote.x, local.x)
    np.testing.assert_array_equal(remote.y, local.y)
    assert remote.columns == local.columns


# --------------------------------------------------------------------------------------------
# Hard synthetic data
# --------------------------------------------------------------------------------------------


def reference_make_synthetic(num_clients, samples_per_client, num_features, noise, seed, test_samples):
    """make_synthetic as it was before the hard-data options (the generator must not change)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 1.0, size=num_features)
    bias = float(rng.normal(0.0, 1.0))

    def draw(n):
        x = rng.normal(0.0, 1.0, size=(n, num_features))
        return x, x @ weights + bias + noise * rng.normal(0.0, 1.0, size=n)

    shards = [draw(samples_per_client) for _ in range(num_clients)]
    truth = {"weights": [float(w) for w in weights], "bias": bias, "noise": noise, "seed": seed}
    return shards, draw(test_samples), json.dumps(truth, indent=2)


NEUTRAL = {"feature_scales": "1:1", "feature_offsets": (0, 0), "condition_number": 1, "target_offset": 0.0}


@pytest.mark.parametrize("args", [(10, 1000, 10, 0.1, 42, 2000), (3, 7, 1, 0.0, 7, 5), (2, 50, 4, 2.5, 123, 9)])
@pytest.mark.parametrize("options", [{}, NEUTRAL], ids=["defaults", "neutral-values"])
def test_defaults_are_bit_identical_to_the_old_generator(args, options):
    shards, test, truth = make_synthetic(*args, **options)
    ref_shards, ref_test, ref_truth = reference_make_synthetic(*args)
    for shard, (x, y) in zip([*shards, test], [*ref_shards, ref_test], strict=True):
        assert to_csv_bytes(shard.x, shard.y) == to_csv_bytes(x, y)
    assert truth.to_json() == ref_truth
    assert truth.options is None


def test_cli_synth_defaults_write_the_same_bytes(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["data", "synth", "--out", str(out), "--clients", "2", "--samples-per-client", "20",
                     "--features", "3", "--seed", "5", "--test-samples", "4"]) == 0  # fmt: skip
    ref_shards, ref_test, ref_truth = reference_make_synthetic(2, 20, 3, 0.1, 5, 4)
    for name, (x, y) in zip(["client-0.csv", "client-1.csv", "test.csv"], [*ref_shards, ref_test], strict=True):
        assert (out / name).read_bytes() == to_csv_bytes(x, y)
    assert (out / "truth.json").read_text() == ref_truth + "\n"
    assert "hard data" not in capsys.readouterr().out


@pytest.mark.parametrize("d", [2, 5, 10, 40])
@pytest.mark.parametrize("k", [1.0, 10.0, 1e4, 1e8])
def test_correlation_matrix_has_the_asked_spectrum_and_unit_diagonal(d, k):
    c = correlation_matrix(d, k, np.random.default_rng(d))
    assert np.array_equal(np.diag(c), np.ones(d)) and np.array_equal(c, c.T)
    eig = np.linalg.eigvalsh(c)
    assert eig[0] > 0
    assert eig[-1] / eig[0] == pytest.approx(k, rel=1e-5)
    ratios = eig[1:] / eig[:-1]  # geometric spacing
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)
    assert not np.allclose(c, np.eye(d)) or k == 1.0


@pytest.mark.parametrize("k", [10.0, 1e4, 1e6])
def test_realised_condition_number_is_close_to_k(k):
    shards, _, truth = make_synthetic(10, 1000, 10, 0.1, 3, 100, condition_number=k, feature_scales="1e-3:1e4")
    pooled = np.concatenate([s.x for s in shards])
    eig = np.linalg.eigvalsh(np.corrcoef(pooled, rowvar=False))
    assert truth.condition_number == pytest.approx(eig[-1] / eig[0], rel=1e-9)
    assert truth.condition_number == pytest.approx(k, rel=0.1)
    assert truth.options == {"condition_number": k, "feature_scales": [1e-3, 1e4]}


def test_scales_and_offsets_are_as_asked():
    shards, test, truth = make_synthetic(
        8, 2000, 6, 0.1, 11, 100, feature_scales="1e-3:1e4", feature_offsets="-10:1e3", target_offset=1e5
    )
    scales, offsets = np.geomspace(1e-3, 1e4, 6), np.linspace(-10, 1e3, 6)
    assert truth.feature_scales == list(scales) and truth.feature_offsets == list(offsets)
    assert truth.feature_scales[0] == 1e-3 and truth.feature_scales[-1] == 1e4
    pooled = np.concatenate([s.x for s in shards])
    n = pooled.shape[0]
    np.testing.assert_allclose(pooled.std(axis=0) / scales, 1.0, rtol=0.05)
    assert np.all(np.abs(pooled.mean(axis=0) - offsets) < 5 * scales / np.sqrt(n))
    y = np.concatenate([s.y for s in shards])
    assert abs(y.mean() - 1e5) < 5 * np.sqrt(len(truth.weights) + 1) and y.std() > 0.5
    assert truth.condition_number == pytest.approx(1.0, abs=0.2)  # no --condition-number: uncorrelated


@pytest.mark.parametrize(
    "options",
    [
        {"feature_scales": "1e-3:1e4", "feature_offsets": "0:1e3", "condition_number": 1e4, "target_offset": 1e5},
        {"target_offset": -3e7},
        {"feature_offsets": (-1e6, 1e6)},
        {"condition_number": 1e6, "feature_scales": "0.5:2"},
    ],
)
def test_truth_weights_reproduce_y_exactly_without_noise(options):
    shards, test, truth = make_synthetic(4, 500, 6, 0.0, 9, 300, **options)
    w, b = np.array(truth.weights), truth.bias
    x = np.concatenate([s.x for s in shards] + [test.x])
    y = np.concatenate([s.y for s in shards] + [test.y])
    design = np.column_stack([x, np.ones(len(x))])
    theta, *_ = np.linalg.lstsq(design, y, rcond=None)
    truth_residual = np.abs(design @ np.append(w, b) - y).max()
    lstsq_residual = np.abs(design @ theta - y).max()
    scale = np.abs(y).max() + 1.0
    assert truth_residual <= 1e-12 * scale * 1e3  # float rounding only
    assert truth_residual <= 10 * lstsq_residual + 1e-12 * scale  # as good a fit as least squares finds
    # and the latent form: y = target_offset + z @ beta with z = (x - offset) / scale
    z = (x - np.array(truth.feature_offsets)) / np.array(truth.feature_scales)
    latent = options.get("target_offset", 0.0) + z @ truth.latent_weights
    np.testing.assert_allclose(latent, y, rtol=0, atol=1e-9 * scale)


def test_truth_weights_match_lstsq_on_moderate_data():
    shards, _, truth = make_synthetic(4, 500, 5, 0.0, 2, 10, feature_scales="0.1:10", feature_offsets="0:100",
                                      condition_number=10, target_offset=1e3)  # fmt: skip
    x = np.concatenate([s.x for s in shards])
    y = np.concatenate([s.y for s in shards])
    theta, *_ = np.linalg.lstsq(np.column_stack([x, np.ones(len(x))]), y, rcond=None)
    np.testing.assert_allclose(theta[:-1], truth.weights, rtol=1e-8)
    assert theta[-1] == pytest.approx(truth.bias, rel=1e-8)


def test_noise_is_the_residual_scale():
    shards, _, truth = make_synthetic(5, 2000, 4, 0.5, 4, 10, feature_scales="1e-2:1e2", target_offset=50)
    x = np.concatenate([s.x for s in shards])
    y = np.concatenate([s.y for s in shards])
    assert np.std(y - x @ np.array(truth.weights) - truth.bias) == pytest.approx(0.5, rel=0.05)


def test_hard_data_is_seeded():
    options = {"feature_scales": "1e-3:1e4", "condition_number": 100.0, "target_offset": 1.0}
    a, _, ta = make_synthetic(2, 30, 4, 0.1, 5, 10, **options)
    b, _, tb = make_synthetic(2, 30, 4, 0.1, 5, 10, **options)
    c, _, _ = make_synthetic(2, 30, 4, 0.1, 6, 10, **options)
    assert np.array_equal(a[1].x, b[1].x) and ta.to_json() == tb.to_json()
    assert not np.array_equal(a[0].x, c[0].x)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"feature_scales": "1e4:1e-3"}, "feature-scales: '1e4:1e-3' is not a range LO:HI with 0 < LO <= HI"),
        ({"feature_scales": "0:1"}, "feature-scales: '0:1' is not a range"),
        ({"feature_scales": "-1:1"}, "feature-scales: '-1:1' is not a range"),
        ({"feature_scales": "nan:1"}, "feature-scales: 'nan:1' is not a range"),
        ({"feature_scales": "1:inf"}, "feature-scales: '1:inf' is not a range"),
        ({"feature_scales": "a:b"}, "feature-scales: 'a:b' is not a range"),
        ({"feature_scales": ""}, "feature-scales: '' is not a range"),
        ({"feature_offsets": "1:2:3"}, "feature-offsets: '1:2:3' is not a range LO:HI with LO <= HI"),
        ({"feature_offsets": "5:-5"}, "feature-offsets: '5:-5' is not a range"),
        ({"feature_offsets": (float("nan"), 1.0)}, "feature-offsets: (nan, 1.0) is not a range"),
        ({"condition_number": 0.5}, "condition-number must be between 1 and 1e+12, got 0.5"),
        ({"condition_number": float("nan")}, "condition-number must be between 1 and 1e+12, got nan"),
        ({"condition_number": "ten"}, "condition-number: 'ten' is not a number"),
        ({"condition_number": 1e13}, "condition-number must be between 1 and 1e+12"),
        ({"target_offset": float("inf")}, "target-offset must be a finite number, got inf"),
        ({"target_offset": "nan"}, "target-offset must be a finite number, got nan"),
    ],
)
def test_bad_options_are_one_line_errors(options, fragment):
    with pytest.raises(FedLinearError) as err:
        make_synthetic(2, 10, 3, 0.1, 1, 5, **options)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_condition_number_needs_two_features():
    with pytest.raises(FedLinearError, match="condition-number 10 needs at least 2 features, got 1"):
        make_synthetic(2, 10, 1, 0.1, 1, 5, condition_number=10)
    shards, _, truth = make_synthetic(2, 10, 1, 0.1, 1, 5, feature_scales="3:5", condition_number=1)
    assert truth.feature_scales == [3.0] and truth.condition_number == 1.0


def test_cli_synth_hard_options(tmp_path, capsys):
    out = tmp_path / "hard"
    argv = ["data", "synth", "--out", str(out), "--clients", "3", "--samples-per-client", "2000", "--features", "6",
            "--feature-scales", "1e-3:1e4", "--feature-offsets=-5:1e3", "--condition-number", "1e4",
            "--target-offset", "1e5", "--noise", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "hard data: feature-scales [0.001, 10000.0], feature-offsets [-5.0, 1000.0], condition-number 10000.0, "
        "target-offset 100000.0; realised correlation condition number"
    ) in printed
    truth = json.loads((out / "truth.json").read_text())
    assert truth["options"] == {"feature_scales": [1e-3, 1e4], "feature_offsets": [-5.0, 1e3],
                                "condition_number": 1e4, "target_offset": 1e5}  # fmt: skip
    assert truth["condition_number"] == pytest.approx(1e4, rel=0.1)
    test = load_csv(str(out / "test.csv"))
    np.testing.assert_allclose(test.x @ truth["weights"] + truth["bias"], test.y, rtol=1e-12)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--feature-scales", "1e4:1e-3"], "feature-scales: '1e4:1e-3' is not a range LO:HI with 0 < LO <= HI, both"),
        (["--condition-number", "0.5"], "condition-number must be between 1 and 1e+12, got 0.5"),
        (["--condition-number", "nan"], "condition-number must be between 1 and 1e+12, got nan"),
        (["--target-offset", "nan"], "target-offset must be a finite number, got nan"),
        (["--feature-offsets", "x"], "feature-offsets: 'x' is not a range LO:HI with LO <= HI, both finite"),
    ],
)
def test_cli_synth_bad_options_exit_1_with_one_line(tmp_path, capsys, flags, message):
    assert cli.main(["data", "synth", "--out", str(tmp_path / "bad"), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fedlinear: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
