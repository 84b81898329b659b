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
import secrets
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO

from fedlinear.common.errors import FedLinearError

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith(S3_SCHEME)


def _s3():  # the S3 backend, imported on first use
    from fedlinear.common import s3

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


TEMP_PREFIX = ".tmp-"  # temporary files of an unfinished write: hidden from list_uris, never read


def write_bytes(uri: str, data: bytes, private: bool = False) -> None:
    """Write atomically and durably: readers see the old content or the new, never a partial file.

    Locally: a temporary file in the same directory, written and fsync'd, renamed over ``uri``, then
    the directory fsync'd, so once this returns the new content survives a power cut, and a crash at
    any point before the rename leaves the previous file as it was. The file's mode follows the
    umask as ``open()`` would (``0666 & ~umask``); ``private=True`` makes it 0600. A failed write
    (full disk, permissions) is a :class:`FedLinearError` naming ``uri``. Temporary files left by a
    process that died mid-write are removed by the next write to the same file.
    """
    if is_s3(uri):
        _s3().write_bytes(uri, data)
        return
    path = _local(uri)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = _create_temp(directory, os.path.basename(path), 0o600 if private else 0o666)
    except OSError as exc:
        raise FedLinearError(f"{uri}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise FedLinearError(f"{uri}: cannot write ({exc.strerror or exc})") from None
        raise
    _fsync_dir(directory)
    _remove_stale_temps(directory, os.path.basename(path))


def temp_owner(pid: int | None = None) -> str:
    """``<pid>.<host>.<pid namespace>``: who wrote a temporary file. Only a file of this host and PID
    namespace whose pid is dead is known to be abandoned (fedlinear also runs in private namespaces)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    host = zlib.crc32(socket.gethostname().encode("utf-8", "replace"))
    return f"{os.getpid() if pid is None else pid}.{host:08x}.{namespace:x}"


def _create_temp(directory: str, name: str, mode: int) -> tuple[int, str]:
    """A new file ``.tmp-<owner>-<random>-<name>`` opened for writing, created with ``mode`` (the
    kernel applies the umask, as for ``open()``; ``tempfile.mkstemp`` would always give 0600)."""
    for _ in range(100):
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{temp_owner()}-{secrets.token_hex(6)}-{name}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's process: leave its file alone
    return True


def _remove_stale_temps(directory: str, name: str) -> None:
    """Delete temporary files for ``name`` whose writing process (on this host, in this PID
    namespace) no longer exists: it crashed mid-write."""
    suffix = f"-{name}"
    ours = temp_owner(0).split(".", 1)[1]
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if not (entry.startswith(TEMP_PREFIX) and entry.endswith(suffix)):
                continue
            pid, _, owner = entry[len(TEMP_PREFIX) :].split("-", 1)[0].partition(".")
            if owner == ours and pid.isdigit() and int(pid) > 0 and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


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


def list_tree(prefix: str) -> list[str]:
    """Every file under a local directory or S3 prefix, recursively (hidden names included), sorted."""
    if is_s3(prefix):
        return _s3().list_tree(prefix)
    path = _local(prefix)
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(root, name) for root, _dirs, names in os.walk(path) for name in names)


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
