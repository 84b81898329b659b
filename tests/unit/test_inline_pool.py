"""``--pool auto`` in inline mode: the calling thread for small federations, worker processes for large
ones on the numpy engine (docs/how-to/scaling.md, "Inline mode"), never forked from TensorFlow."""

from __future__ import annotations

import sys

import pytest

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local import inline


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(inline, "usable_cores", lambda: n)

    return set_cores


def test_auto_is_serial_below_the_threshold_and_worker_processes_from_it(cores, monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    cores(2)
    limit = inline.AUTO_PROCESSES_NODES
    assert inline.resolve_pool("auto", None, {"engine": "numpy"}, limit - 1) == ("serial", 1)
    assert inline.resolve_pool("auto", None, {"engine": "numpy"}, limit) == ("processes", 2)
    assert inline.resolve_pool("auto", 3, {}, 10 * limit) == ("processes", 3)  # --workers sizes it
    cores(1)
    assert inline.resolve_pool("auto", None, {"engine": "numpy"}, 10 * limit) == ("serial", 1)


def test_auto_never_forks_workers_from_tensorflow(cores, monkeypatch):
    cores(4)
    big = 10 * inline.AUTO_PROCESSES_NODES
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    assert inline.resolve_pool("auto", None, {"engine": "keras"}, big) == ("serial", 1)
    monkeypatch.setitem(sys.modules, "tensorflow", object())  # a notebook that imported it
    assert inline.resolve_pool("auto", None, {"engine": "numpy"}, big) == ("serial", 1)


def test_explicit_pools_are_taken_as_asked(cores):
    cores(2)
    assert inline.resolve_pool("processes", None, {"engine": "keras"}, 4) == ("processes", 2)
    assert inline.resolve_pool("threads", None, {"engine": "keras"}, 4) == ("serial", 1)  # one model per process
    assert inline.resolve_pool("serial", 8, {}, 10_000) == ("serial", 1)
    with pytest.raises(FedLinearError, match="--pool must be one of"):
        inline.resolve_pool("fibers", None, {}, 4)
    with pytest.raises(FedLinearError, match="--workers must be >= 1"):
        inline.resolve_pool("processes", 0, {}, 4)


def test_a_push_goes_to_the_workers_in_bounded_chunks():
    """About 8 chunks per worker, never more than MAX_CHUNK tasks each (a straggler holds up at most the
    rest of its chunk), every task in exactly one chunk, in order."""
    chunks = []

    class Stub:
        def apply_async(self, fn, args, callback, error_callback):
            chunks.append([call[0] for call in args[0]])

    pool = inline._ProcessPool.__new__(inline._ProcessPool)
    pool.size, pool._pool = 2, Stub()
    for count in (1, 10, 100, 1000, 10_000):
        chunks.clear()
        futures = pool.submit_many(inline.run_task, [(i, None, None) for i in range(count)])
        assert len(futures) == count and [i for chunk in chunks for i in chunk] == list(range(count))
        assert max(map(len, chunks)) <= inline.MAX_CHUNK
        assert len(chunks) >= min(count, pool.size * inline.CHUNKS_PER_WORKER - 1)  # several for each worker


def test_auto_is_serial_off_linux(cores, monkeypatch):
    cores(4)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.setattr(inline.sys, "platform", "darwin")
    assert inline.resolve_pool("auto", None, {"engine": "numpy"}, 10 * inline.AUTO_PROCESSES_NODES) == ("serial", 1)
