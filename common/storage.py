"""One place to read and write "this URI": a local path or ``s3://bucket/key``.

Data shards, the test set, checkpoints, history, the manifest and the exported SavedModel all go
through these functions. Local writes are atomic (temporary file + ``os.replace``); the S3 backend
lives in :mod:`common.s3` and is imported only when an ``s3://`` URI is used, so a node reading a
local shard never pays for boto3.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from common.errors import FedLinearError

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith(S3_SCHEME)


def _s3():  # the S3 backend, imported on first use
    from common import s3

    return s3


def join(base: str, *parts: str) -> str:
    """Join path parts under ``base`` (``/`` separators for S3)."""
    if is_s3(base):
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out
    return os.path.join(base, *parts)


def _local(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def display_name(uri: str) -> str:
    """The name used in messages: the URI as given."""
    return uri


@contextlib.contextmanager
def open_binary(uri: str) -> Iterator[IO[bytes]]:
    """Open a URI for streaming reads (a file object yielding bytes, iterable by line)."""
    if is_s3(uri):
        with _s3().open_binary(uri) as stream:
            yield stream
        return
    path = _local(uri)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise FedLinearError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise FedLinearError(f"{uri}: is a directory, expected a file") from None
    except PermissionError:
        raise FedLinearError(f"{uri}: permission denied") from None
    with handle:
        yield handle


def read_bytes(uri: str) -> bytes:
    """Read a whole object or file."""
    with open_binary(uri) as stream:
        return stream.read()


def read_text(uri: str) -> str:
    """Read a whole object or file as UTF-8 text."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a partial file."""
    if is_s3(uri):
        _s3().write_bytes(uri, data)
        return
    path = _local(uri)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    """True if the file or object exists."""
    if is_s3(uri):
        return _s3().exists(uri)
    return os.path.exists(_local(uri))


def list_uris(prefix: str) -> list[str]:
    """Every object under an S3 prefix ending in ``/``, or every file in a local directory, sorted."""
    if is_s3(prefix):
        return _s3().list_uris(prefix)
    path = _local(prefix)
    if not os.path.isdir(path):
        raise FedLinearError(f"{prefix}: no such directory")
    return sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if not name.startswith(".") and os.path.isfile(os.path.join(path, name))
    )


def expand(uri: str) -> list[str]:
    """The files a data URI stands for: itself, or everything under it if it ends in ``/``."""
    if uri.endswith("/") or (not is_s3(uri) and os.path.isdir(_local(uri))):
        uris = list_uris(uri if uri.endswith("/") else uri + "/")
        if not uris:
            raise FedLinearError(f"{uri}: no files under this prefix")
        return uris
    return [uri]


def fingerprint(uri: str) -> dict:
    """Identify a data file: SHA-256 and size for local files, ETag and size for S3 objects."""
    if is_s3(uri):
        return _s3().fingerprint(uri)
    path = _local(uri)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"uri": os.path.abspath(path), "sha256": digest.hexdigest(), "size": os.path.getsize(path)}


def publish_dir(local_dir: str, uri: str) -> None:
    """Publish a finished local directory at ``uri`` so that a reader never sees half of it.

    Locally the directory is copied next to its destination and renamed into place. On S3 the
    backend uploads every file and ``saved_model.pb`` last (see :func:`common.s3.publish_dir`).
    """
    if is_s3(uri):
        _s3().publish_dir(local_dir, uri)
        return
    dest = os.path.abspath(_local(uri))
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.staging-")
    shutil.rmtree(staging)
    shutil.copytree(local_dir, staging)
    if os.path.exists(dest):
        trash = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.old-")
        os.replace(dest, os.path.join(trash, "old"))
        os.replace(staging, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, dest)


@contextlib.contextmanager
def local_copy_of_dir(uri: str) -> Iterator[str]:
    """A local directory holding the content at ``uri`` (downloaded for S3, the path itself locally)."""
    if not is_s3(uri):
        path = _local(uri)
        if not os.path.isdir(path):
            raise FedLinearError(f"{uri}: no such directory")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fedlinear-dl-") as tmp:
        _s3().download_dir(uri, tmp)
        yield tmp
