"""common/shardcache.py: a shard read back from a local run's cache is bit-identical to a parse, and
a changed, unreadable or uncacheable shard is parsed again."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedlinear.common import shardcache
from fedlinear.common.csvio import load_csv
from fedlinear.common.errors import FedLinearError


def _write(path, rows: np.ndarray, header: str | None = None) -> None:
    lines = ([header] if header else []) + [",".join(repr(float(v)) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _same(a, b) -> None:
    assert a.x.dtype == b.x.dtype == np.float64 and a.y.dtype == np.float64
    assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
    assert a.x.shape == b.x.shape and a.x.flags.c_contiguous and a.x.flags.writeable and a.y.flags.writeable
    assert a.sources == b.sources and a.columns == b.columns


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(shardcache.CACHE_ENV, str(directory))
    return directory


def entries(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if not n.startswith(".")) if directory.exists() else []


def test_read_back_is_bit_identical_to_a_parse(tmp_path, cache, monkeypatch):
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(57, 6)) * 10.0 ** rng.integers(-30, 30, size=(57, 6))
    shard = tmp_path / "client-0.csv"
    _write(shard, rows, header="a,b,c,d,e,target")
    for target_column in (-1, 2):
        parsed = load_csv(str(shard), target_column=target_column)
        first = shardcache.load_csv_cached(str(shard), target_column=target_column)
        _same(first, parsed)
    assert len(entries(cache)) == 2  # one per parse option

    def no_parse(*_a, **_k):
        raise AssertionError("parsed although the cache holds the shard")

    monkeypatch.setattr(shardcache, "load_csv", no_parse)
    for target_column in (-1, 2):
        _same(shardcache.load_csv_cached(str(shard), target_column=target_column), load_csv(str(shard), target_column=target_column))


def test_a_changed_shard_is_parsed_again(tmp_path, cache):
    shard = tmp_path / "client-0.csv"
    _write(shard, np.arange(12.0).reshape(4, 3))
    shardcache.load_csv_cached(str(shard))
    _write(shard, np.arange(15.0).reshape(5, 3) + 0.5)
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime even on a coarse clock
    again = shardcache.load_csv_cached(str(shard))
    _same(again, load_csv(str(shard)))
    assert again.num_examples == 5


def test_a_damaged_entry_is_parsed_again(tmp_path, cache):
    shard = tmp_path / "client-0.csv"
    _write(shard, np.arange(12.0).reshape(4, 3))
    shardcache.load_csv_cached(str(shard))
    (entry,) = entries(cache)
    path = cache / entry
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    _same(shardcache.load_csv_cached(str(shard)), load_csv(str(shard)))


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(shardcache.CACHE_ENV, raising=False)
    shard = tmp_path / "client-0.csv"
    _write(shard, np.arange(12.0).reshape(4, 3))
    _same(shardcache.load_csv_cached(str(shard)), load_csv(str(shard)))
    assert sorted(os.listdir(tmp_path)) == ["client-0.csv"]


def test_directories_and_bad_shards_are_not_cached(tmp_path, cache):
    folder = tmp_path / "parts"
    folder.mkdir()
    _write(folder / "a.csv", np.arange(6.0).reshape(2, 3))
    _write(folder / "b.csv", np.arange(6.0).reshape(2, 3) + 1)
    _same(shardcache.load_csv_cached(str(folder) + "/"), load_csv(str(folder) + "/"))
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,x,6\n")
    with pytest.raises(FedLinearError, match="bad.csv"):
        shardcache.load_csv_cached(str(bad))
    with pytest.raises(FedLinearError):
        shardcache.load_csv_cached(str(tmp_path / "missing.csv"))
    assert entries(cache) == []


def test_an_unwritable_cache_parses_as_usual(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(shardcache.CACHE_ENV, str(blocker / "cache"))
    shard = tmp_path / "client-0.csv"
    _write(shard, np.arange(12.0).reshape(4, 3))
    _same(shardcache.load_csv_cached(str(shard)), load_csv(str(shard)))


def test_the_launcher_names_the_same_variable_without_importing_numpy():
    import subprocess
    import sys

    from fedlinear.scripts.local import launch

    assert launch.SHARD_CACHE_ENV == shardcache.CACHE_ENV
    code = "import sys, fedlinear.scripts.local.launch; assert 'numpy' not in sys.modules, 'numpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
