"""Bounded waits for tests on a busy machine: "wait until it completes", not a fixed number of seconds.

A test that waits for a process (or a condition) gives the time it takes on a quiet machine, ``quiet_s``
(measured: the figure in the call's comment or docstring). The wait is then bounded by work, not by the
clock: a :class:`Budget` of ``FACTOR x quiet_s`` seconds that is spent at the rate the machine runs this
test, i.e. more slowly while the load per core is above 1 (the 1-minute load average, read again at every
poll, so a load that comes and goes during the wait is accounted as it comes and goes; nothing is sampled
once). A ceiling (``CEILING x quiet_s`` of wall time) still ends a real hang. A wait that runs out fails with
the process's output (the tail of stdout and stderr), never a bare ``TimeoutExpired``.

At load ~12 on 2 cores (6 per core) a 240 s quiet bound becomes ~1440 s of wall time before the ceiling.

The suite runs on two xdist workers (tests/conftest.py): the other worker's processes are in the load
average like anyone else's, so a wait that shares the cores with them is stretched by the load they make.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

FACTOR = 3.0  # the budget: this many times the quiet time, at a quiet machine's rate
CEILING = 20.0  # whatever the load: a wait ends after this many times the quiet time of wall time
POLL_S = 1.0


def slowdown() -> float:
    """How much slower than a quiet machine this one runs now: the load per core, at least 1."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


class Budget:
    """``FACTOR x quiet_s`` seconds of quiet-machine time, spent at ``1 / slowdown()`` per wall second;
    :meth:`spent` is True once it is gone or the wall-time ceiling has passed."""

    def __init__(self, quiet_s: float, factor: float | None = None, ceiling: float | None = None) -> None:
        self.quiet_s = quiet_s
        self.factor = FACTOR if factor is None else factor
        self.total = self.factor * quiet_s
        self.ceiling_at = time.monotonic() + (CEILING if ceiling is None else ceiling) * quiet_s
        self.started = self.last = time.monotonic()
        self.used = 0.0

    def spent(self) -> bool:
        now = time.monotonic()
        self.used += (now - self.last) / slowdown()
        self.last = now
        return self.used >= self.total or now >= self.ceiling_at

    def describe(self) -> str:
        wall = time.monotonic() - self.started
        return (
            f"still not done after {wall:.0f} s of wall time ({self.used:.0f} s at a quiet machine's rate; bound "
            f"{self.total:.0f} s = {self.factor:g} x the quiet time {self.quiet_s:g} s, scaled by the load per core)"
        )


def wait_until(condition: Callable[[], bool], quiet_s: float, what: str, output: Callable[[], str] = str) -> None:
    """Poll ``condition`` until it holds; fail (naming ``what``, with ``output()``) when the budget is spent."""
    budget = Budget(quiet_s)
    while not condition():
        if budget.spent():
            pytest.fail(f"{what}: {budget.describe()}\n{output()}", pytrace=False)
        time.sleep(min(POLL_S, 0.2))


def _tail(text: str | bytes | None, limit: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-limit:]


def communicate(proc: subprocess.Popen, quiet_s: float, what: str | None = None, input=None) -> tuple:
    """``proc.communicate()`` bounded by a :class:`Budget`; on running out the process (its group, if it
    leads one) is killed and the test fails with the tail of its output."""
    budget = Budget(quiet_s)
    first = True
    while True:
        try:
            out, err = proc.communicate(input=input if first else None, timeout=POLL_S)
            return out, err
        except subprocess.TimeoutExpired:
            first = False
            if not budget.spent():
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        out, err = proc.communicate()
        name = what or " ".join(map(str, proc.args if isinstance(proc.args, list) else [proc.args]))[:200]
        pytest.fail(f"{name}: {budget.describe()}\nstdout:\n{_tail(out)}\nstderr:\n{_tail(err)}", pytrace=False)


def wait(proc: subprocess.Popen, quiet_s: float, what: str | None = None, output: Callable[[], str] = str) -> int:
    """``proc.wait()`` bounded by a :class:`Budget`; on running out the process is killed and the test
    fails with ``output()`` (e.g. the log files its output went to)."""
    budget = Budget(quiet_s)
    while True:
        try:
            return proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if budget.spent():
                break
    proc.kill()
    proc.wait()
    name = what or " ".join(map(str, proc.args if isinstance(proc.args, list) else [proc.args]))[:200]
    pytest.fail(f"{name}: {budget.describe()}\n{output()}", pytrace=False)


def run(argv, quiet_s: float | None = None, *, timeout: float | None = None, capture_output: bool = False, input=None,
        check: bool = False, **popen) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run`` whose bound (``quiet_s``, or ``timeout`` as subprocess.run spells it) is a
    quiet-machine time, scaled by the load (see the module docstring)."""
    quiet_s = quiet_s if quiet_s is not None else timeout
    if quiet_s is None:
        raise TypeError("bounded.run needs the quiet-machine time of the command")
    if capture_output:
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        popen.setdefault("stdin", subprocess.PIPE)
    proc = subprocess.Popen(argv, **popen)
    out, err = communicate(proc, quiet_s, input=input)
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def concurrently(calls: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Run independent real-process checks side by side (one thread each, every call bounded by its own
    waits, e.g. :func:`run`); return ``{name: result}`` once all have finished. A call that failed (a
    bounded wait that ran out included) fails the caller with its own exception, after the others ended."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}
