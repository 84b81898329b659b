"""The run directory's lock: one ``fedlinear run`` at a time on a run directory.

The lock is an ``fcntl.flock`` on ``RUN_DIR/.lock``, which the kernel releases when its holders die
(SIGKILL included). The launcher's watchdog inherits it and holds it until the remains of a killed
run are gone, so a rerun cannot start while they are still being stopped.
"""

from __future__ import annotations

import os
import time

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError

LOCK_FILE = ".lock"
# A lock whose holder has died is still held while its watchdog stops what the dead run left running
# (bounded by processes.WATCHDOG_TIMEOUT); a new run waits that long for it, no longer.
LOCK_CLEANUP_WAIT = 75.0


def lock_path(out: str) -> str:
    """``RUN_DIR/.lock`` for a local run directory. An ``s3://`` one cannot be locked across machines
    (S3 has no lock that its holder's death releases), so its lock is a local file named after the
    URI: two runs on one machine are kept apart, runs on two machines are not."""
    if not storage.is_s3(out):
        return os.path.join(out, LOCK_FILE)
    import hashlib

    digest = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:32]
    return os.path.join(os.path.expanduser("~"), ".cache", "fedlinear", "locks", f"s3-{digest}.lock")


def _lock_holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def lock_run_dir(out: str, cleanup_wait: float = LOCK_CLEANUP_WAIT) -> int:
    """Take the run directory's lock (``fcntl.flock``, released by the kernel when its holders die,
    SIGKILL included) and return its file descriptor, kept open for the life of this process.

    A live holder: refused at once, naming its pid. A holder that has died: its watchdog is still
    stopping what it left running; wait for that (bounded), then go on (the run resumes).
    """
    import fcntl

    path = lock_path(out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + cleanup_wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _lock_holder(fd)
            alive = holder is not None and _pid_alive(holder)
            if alive or time.monotonic() > deadline:
                os.close(fd)
                what = f"pid {holder}" if alive else f"the clean-up after pid {holder}, which has ended"
                raise FedLinearError(
                    f"{out} is in use by another fedlinear run ({what}; lock {path}); "
                    "wait for it to finish, or stop it, then run the same command again"
                ) from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
