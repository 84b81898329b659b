"""CSV loading and validation, synthetic data, partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from fedlinear.common.csvio import load_csv, to_csv_bytes
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.partition import split_iid
from fedlinear.common.synth import make_synthetic


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text", ["1,2\n3,4\n5,6\n", "1,2\n3,4\n5,6", "1,2\r\n3,4\r\n5,6\r\n", "\n1,2\n\n3,4\n5,6\n\n"])
def test_seed_format_x_y_lines(tmp_path, text):
    data = load_csv(write(tmp_path, "data.txt", text))
    np.testing.assert_array_equal(data.x, [[1.0], [3.0], [5.0]])
    np.testing.assert_array_equal(data.y, [2.0, 4.0, 6.0])
    assert data.x.shape == (3, 1) and data.y.shape == (3,)


def test_header_detected_and_target_column(tmp_path):
    path = write(tmp_path, "h.csv", "a,b,target\n1,2,3\n4,5,6\n")
    data = load_csv(path)
    np.testing.assert_array_equal(data.x, [[1, 2], [4, 5]])
    np.testing.assert_array_equal(data.y, [3, 6])
    assert data.columns == ("a", "b", "target")
    first = load_csv(path, target_column=0)
    np.testing.assert_array_equal(first.y, [1, 4])
    np.testing.assert_array_equal(first.x, [[2, 3], [5, 6]])
    with pytest.raises(FedLinearError, match="target-column"):
        load_csv(path, target_column=3)


def test_header_forced(tmp_path):
    path = write(tmp_path, "n.csv", "1,2\n3,4\n")
    assert load_csv(path, header="yes").num_examples == 1
    with pytest.raises(FedLinearError, match=r"h2.csv: line 1: column 1: 'a' is not a number"):
        load_csv(write(tmp_path, "h2.csv", "a,b\n1,2\n"), header="no")


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.csv", "1,2\n3,4\n5,oops\n7,8\n")
    with pytest.raises(FedLinearError) as err:
        load_csv(path)
    assert str(err.value) == f"{path}: line 3: column 2: 'oops' is not a number"


def test_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, "blank.csv", "1,2\n\n3,4\n5,x\n")
    with pytest.raises(FedLinearError, match=r"blank.csv: line 4: column 2"):
        load_csv(path)


def test_wrong_column_count(tmp_path):
    path = write(tmp_path, "cols.csv", "1,2,3\n4,5,6\n7,8\n")
    with pytest.raises(FedLinearError, match=r"cols.csv: line 3: expected 3 comma-separated columns, found 2"):
        load_csv(path)


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf"])
def test_non_finite_values(tmp_path, bad):
    path = write(tmp_path, "nan.csv", f"1,2\n{bad},4\n")
    with pytest.raises(FedLinearError, match=rf"nan.csv: line 2: column 1: value '{bad}' is not finite"):
        load_csv(path)


@pytest.mark.parametrize("text", ["", "\n", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path, "empty.csv", text)
    with pytest.raises(FedLinearError, match="empty.csv: empty file"):
        load_csv(path)


def test_header_only(tmp_path):
    with pytest.raises(FedLinearError, match="no data rows"):
        load_csv(write(tmp_path, "ho.csv", "x,y\n"))


def test_single_column(tmp_path):
    with pytest.raises(FedLinearError, match="need at least 2"):
        load_csv(write(tmp_path, "one.csv", "1\n2\n"))


def test_missing_file(tmp_path):
    with pytest.raises(FedLinearError, match="no such file"):
        load_csv(str(tmp_path / "nope.csv"))


def test_not_utf8_is_reported_not_crashed(tmp_path):
    path = write(tmp_path, "bin.csv", b"1,2\n\xff\xfe,3\n")
    with pytest.raises(FedLinearError, match="bin.csv: line 2"):
        load_csv(path)


def test_directory_of_parts_concatenates_in_name_order(tmp_path):
    (tmp_path / "parts").mkdir()
    write(tmp_path, "parts/b.csv", "3,4\n")
    write(tmp_path, "parts/a.csv", "1,2\n")
    data = load_csv(str(tmp_path / "parts") + "/")
    np.testing.assert_array_equal(data.y, [2, 4])
    assert len(data.sources) == 2


def test_round_trip_precision(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=50)
    data = load_csv(write(tmp_path, "rt.csv", to_csv_bytes(x, y)))
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)


def test_synthetic_is_seeded_and_follows_truth():
    a_shards, a_test, truth = make_synthetic(3, 100, 4, 0.0, 5, 50)
    b_shards, _, _ = make_synthetic(3, 100, 4, 0.0, 5, 50)
    np.testing.assert_array_equal(a_shards[1].x, b_shards[1].x)
    np.testing.assert_allclose(a_test.x @ truth.weights + truth.bias, a_test.y, atol=1e-12)
    c_shards, _, _ = make_synthetic(3, 100, 4, 0.0, 6, 50)
    assert not np.array_equal(a_shards[0].x, c_shards[0].x)


def test_split_iid_partitions_everything_once():
    x = np.arange(200, dtype=float).reshape(100, 2)
    data = Dataset(x=x, y=x[:, 0])
    shards, test = split_iid(data, 4, seed=1, test_fraction=0.2)
    assert test.num_examples == 20 and [s.num_examples for s in shards] == [20, 20, 20, 20]
    seen = np.sort(np.concatenate([test.y] + [s.y for s in shards]))
    np.testing.assert_array_equal(seen, x[:, 0])
    again, _ = split_iid(data, 4, seed=1, test_fraction=0.2)
    np.testing.assert_array_equal(again[0].y, shards[0].y)
    with pytest.raises(FedLinearError):
        split_iid(Dataset(x=x[:3], y=x[:3, 0]), 4, seed=1, test_fraction=0.2)
