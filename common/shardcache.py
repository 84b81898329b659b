"""Parsed shards shared by the processes of one local run (a directory the launcher names).

In Flower's simulation engine a node's messages go to whichever Ray actor is free
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``, ``RayBackend.process_message`` submits
to the actor pool, which hands the job to an idle actor), so the same node lands on a different
actor from round to round, and each actor's in-process shard cache (``clients/client_app.py``,
``_SHARDS``) misses: with 4 actors ~3 in 4 messages of round 2 re-parse their CSV (1-4 ms for 100
rows x 11 columns, more than Flower's own cost of a message). The launcher therefore gives the
processes of a local simulation run a private directory (:data:`CACHE_ENV`, inside the run's
private Ray temp directory, removed with it); the first process to parse a shard stores the
validated arrays there (float64, exactly as parsed), and every other one reads them back
(~0.1 ms) instead of parsing the CSV again. The arrays read back are bit-identical to a parse.

Only plain local files are cached (not ``s3://`` objects, not directories), keyed by the URI, the file's
device, inode, size and mtime (ns) plus the parse options: a file changed during the run
gets a new key, and one changed while it was being parsed is not stored. Without the variable
(every mode but a local simulation, or a user's own Ray cluster) :func:`load_csv_cached` is
:func:`common.csvio.load_csv`. The cache is best effort: a file that cannot be written or read back
(a full disk, a truncated file) is parsed as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile

import numpy as np

from fedlinear.common import storage
from fedlinear.common.csvio import load_csv
from fedlinear.common.dataset import Dataset

CACHE_ENV = "FEDLINEAR_SHARD_CACHE"
_FORMAT = 1


def cache_dir() -> str | None:
    """The directory named by :data:`CACHE_ENV`, or None (no cache)."""
    return os.environ.get(CACHE_ENV) or None


def _entry(uri: str, target_column: int, header: str, st: os.stat_result) -> str:
    ident = [_FORMAT, uri, target_column, header, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def _cacheable(uri: str) -> tuple[str, os.stat_result] | None:
    if storage.is_s3(uri):
        return None
    path = storage._local(uri)  # noqa: SLF001 - the same file:// handling as every local read
    try:
        st = os.stat(path)
    except OSError:
        return None  # load_csv reports it
    return (path, st) if stat.S_ISREG(st.st_mode) else None


# An entry: one JSON line (shapes, sources, column names), padded to a multiple of 8 bytes, then x and
# y as little-endian float64, C order. Read back with one read into a writable buffer (no .npy header
# parsing: ~0.1 ms an array).
_F8 = np.dtype("<f8")


def _read(entry: str) -> Dataset | None:
    try:
        with open(entry, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            buf = bytearray(size)
            if handle.readinto(buf) != size:
                return None
        end = buf.index(b"\n") + 1
        meta = json.loads(bytes(buf[:end]))
        n, d = (int(v) for v in meta["x"])
        if end % 8 or end + 8 * n * (d + 1) != size:
            return None
        x = np.frombuffer(buf, dtype=_F8, count=n * d, offset=end).reshape(n, d)
        y = np.frombuffer(buf, dtype=_F8, count=n, offset=end + 8 * n * d)
        columns = meta["columns"]
        return Dataset(x=x, y=y, sources=tuple(meta["sources"]), columns=None if columns is None else tuple(columns))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or not an entry this module wrote: parse instead


def _write(directory: str, entry: str, data: Dataset) -> None:
    n, d = data.x.shape
    meta = {"x": [n, d], "sources": list(data.sources), "columns": None if data.columns is None else list(data.columns)}
    head = json.dumps(meta).encode("utf-8")
    head += b" " * (-(len(head) + 1) % 8) + b"\n"
    with contextlib.suppress(OSError):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(head)
                handle.write(np.ascontiguousarray(data.x, dtype=_F8).tobytes())
                handle.write(np.ascontiguousarray(data.y, dtype=_F8).tobytes())
            os.replace(tmp, entry)  # atomic: a reader sees the whole entry or none
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def load_csv_cached(uri: str, target_column: int = -1, header: str = "auto") -> Dataset:
    """:func:`common.csvio.load_csv`, through the run's shard cache when there is one."""
    directory = cache_dir()
    found = _cacheable(uri) if directory else None
    if found is None:
        return load_csv(uri, target_column=target_column, header=header)
    path, before = found
    entry = os.path.join(directory, _entry(uri, target_column, header, before))
    data = _read(entry)
    if data is not None:
        return data
    data = load_csv(uri, target_column=target_column, header=header)
    with contextlib.suppress(OSError):
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino):
            _write(directory, entry, data)
    return data
