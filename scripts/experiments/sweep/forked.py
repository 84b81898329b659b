"""``--start fork``: each grid point forked from a warm worker that imported fedlinear once.

A ``fedlinear run --mode inline`` of the default sweep spends ~3.3 CPU-seconds as a fresh process, of
which the run itself (data, 20 rounds, the export handed to the shared exporter) is ~0.8: the rest is
Python's start-up and the imports (flwr, numpy, scipy through dp-accounting, boto3, fedlinear). So the
sweep starts ``--parallel`` *worker* processes (``python -m fedlinear.scripts.experiments.sweep.forked``,
fresh interpreters started with ``subprocess``), each imports :data:`WARM` once and then, for every run
it is handed, ``os.fork()``s a child that runs the same command line a subprocess would
(``runpy``: ``python -m fedlinear.scripts.cli run ...``, the same code path) and exits.

Every run is therefore a process of its own, as with ``--start process``, and nothing of one run can
leak into the next: caches, loggers and their handlers, signal handlers, cwd, environment variables,
the run directory's lock and any module global die with the child; each child starts from the worker's
state after the imports, which no run ever touches. In the child: the environment is the sweep's own
(``FEDLINEAR_EXPORTER`` included, as a subprocess gets it), cwd and ``PYTHONPATH`` as a subprocess gets
them, stdin is /dev/null, stdout and stderr go to ``OUT/logs/<name>.log``, SIGINT raises
KeyboardInterrupt again (the worker ignores it), and NumPy's global random state is reseeded from the
OS (``random`` reseeds itself after a fork) so no two runs share one.

What the subprocess runner guarantees is kept (:func:`ForkRunner.__call__`): the run is bounded by
``--timeout`` + TIMEOUT_GRACE (then SIGINT, 60 s later its whole process tree is killed, and it is
reported ``timeout``); on Ctrl-C the run gets STOP_GRACE seconds to stop by itself (a Ctrl-C at the
terminal reached it too: same process group), then SIGINT, then SIGKILL; a run that crashes (a signal,
``os._exit``) fails that run only (the worker reports its exit status and serves the next); a worker
that dies or stops answering is killed and replaced, and the run it held is reported failed. Resume
works as before (it is the grid's: :mod:`.grid`). The worker dies with the sweep (``PR_SET_PDEATHSIG``)
and exits when its request pipe closes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from fedlinear.scripts.experiments.sweep.runner import (
    REPO, STOP_GRACE, TIMEOUT_GRACE, Outcome, _error_line, _tree, run_argv,
)  # fmt: skip
from fedlinear.scripts.experiments.sweep.settings import Job, Settings
from fedlinear.scripts.local.processes import die_with, running, stop_all

# What a worker imports once (by name: this layer may not import the CLI statically). Measured: what a
# default-sweep run imports (python -X importtime, and sys.modules before/after one run). A module
# left out costs time in every run, never correctness; TensorFlow is never imported here (the shared
# exporter holds it; the keras engine imports it in its run).
WARM = (
    "fedlinear.scripts.cli",
    "fedlinear.scripts.cli.run",
    "fedlinear.scripts.local.launch",
    "fedlinear.scripts.local.inline",
    "fedlinear.server.server_app",
    "fedlinear.server.privacy",
    "fedlinear.server.dpols",
    "fedlinear.clients.client_app",
    "fedlinear.common.partition",
    "fedlinear.common.synth",
    "fedlinear.common.yardstick",
    "fedlinear.common.exporter",
    "dp_accounting",
    "boto3",
    "multiprocessing.pool",
)
READY_TIMEOUT_S = 180.0  # a worker's imports, on a very busy machine
REPLY_TIMEOUT_S = 30.0  # a worker forks and says the child's pid
EXIT_WAIT_S = 60.0  # after SIGINT, before the run's tree is killed


# ----------------------------------------------------------------------------------------------------
# The worker process
# ----------------------------------------------------------------------------------------------------


def warm(modules: tuple[str, ...] = WARM) -> list[str]:
    """Import ``modules``; the ones that could not be imported (each with its reason)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - then the run imports it (and reports it) itself
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return failed


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict[str, Any], keep: tuple[int, ...]) -> None:
    """In the forked child: become the run's process, run its command line, exit. Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.reconfigure(line_buffering=True, write_through=True)  # PYTHONUNBUFFERED, as a subprocess
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[:0] = extra
        with contextlib.suppress(Exception):
            import numpy as np

            np.random.seed()  # a fresh process's global state: from the OS, not the worker's copy
        import runpy

        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:  # noqa: BLE001 - what python -m would print, then its exit status
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Requests (one JSON line each) on stdin; for each, fork the run and answer its pid, then its exit."""
    parent = os.getppid()
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print cannot corrupt the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runs' (and the sweep's), not the worker's
    die_with(parent, 3)  # no watchdog thread: the worker forks, and must have no thread but its main one then
    failed = warm()
    if threading.active_count() > 1:  # an import started a thread: forking now could copy a held lock
        print(f"fedlinear sweep worker: {threading.active_count()} threads after the imports "
              f"({', '.join(t.name for t in threading.enumerate())}); forking anyway", file=sys.stderr, flush=True)
    for line in failed:
        print(f"fedlinear sweep worker: not preloaded: {line}", file=sys.stderr, flush=True)
    out.write(json.dumps({"ready": os.getpid(), "threads": threading.active_count()}).encode() + b"\n")
    requests = sys.stdin.buffer
    while True:
        line = requests.readline()
        if not line:  # the sweep is done (or gone): nothing to clean up, and a full shutdown costs seconds
            sys.stderr.flush()
            os._exit(0)
        try:
            request = json.loads(line)
            module, args = request["module"], list(request["args"])
            if not isinstance(module, str) or not all(isinstance(a, str) for a in args):
                raise ValueError("module and args must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            out.write(json.dumps({"error": f"bad request: {exc}"}).encode() + b"\n")
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, (out.fileno(), requests.fileno()))
        out.write(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


# ----------------------------------------------------------------------------------------------------
# The sweep's side
# ----------------------------------------------------------------------------------------------------


class WorkerGone(Exception):
    """The worker died or did not answer in time."""


class Worker:
    """One warm worker process and its two pipes."""

    def __init__(self, log_path: str) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                env=env, cwd=REPO,
            )  # fmt: skip
        self.buffer = b""
        self.ready = False

    def hang_up(self) -> None:
        """Close the request pipe: an idle worker exits at once."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()

    def reply(self, timeout: float) -> dict[str, Any] | None:
        """The next reply line, or None if none came within ``timeout``; WorkerGone if the worker is gone."""
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise WorkerGone(f"the sweep's worker process ended (exit {self.proc.poll()}; log {self.log_path})")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            value = json.loads(line)
        except ValueError:
            raise WorkerGone(f"the sweep's worker answered nonsense (log {self.log_path})") from None
        if not isinstance(value, dict):
            raise WorkerGone(f"the sweep's worker answered nonsense (log {self.log_path})")
        return value

    def wait_ready(self) -> None:
        if self.ready:
            return
        value = self.reply(READY_TIMEOUT_S)
        if value is None or "ready" not in value:
            raise WorkerGone(f"the sweep's worker did not start within {READY_TIMEOUT_S:g} s (log {self.log_path})")
        self.ready = True

    def send(self, request: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            raise WorkerGone(f"the sweep's worker process ended (exit {self.proc.poll()}; log {self.log_path})") from None

    def close(self, grace: float = 5.0) -> None:
        self.hang_up()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdout.close()


class ForkRunner:
    """A :data:`~.runner.Runner` that forks each run from one of ``size`` warm workers (see the module docstring)."""

    def __init__(self, settings: Settings, size: int) -> None:
        self.logs = os.path.join(settings.out, "logs")
        self.size = max(1, size)
        self._count = 0
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        self._all: list[Worker] = []
        self._closed = False
        for _ in range(self.size):  # started now: their imports overlap the data and the exporter's start
            self._idle.put(self._new())

    def _new(self) -> Worker:
        with self._lock:
            self._count += 1
            worker = Worker(os.path.join(self.logs, f"worker-{self._count}.log"))
            self._all.append(worker)
            return worker

    def _retire(self, worker: Worker) -> None:
        with contextlib.suppress(Exception):
            worker.proc.kill()
        with contextlib.suppress(Exception):
            worker.close(grace=5.0)
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers = list(self._all)
        for worker in workers:  # all at once, then wait for each
            worker.hang_up()
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.close()

    def __enter__(self) -> ForkRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, settings: Settings, job: Job, data: str, stop: threading.Event) -> Outcome:
        worker = self._idle.get()
        healthy = False
        try:
            outcome, healthy = self._run(worker, settings, job, data, stop)
            return outcome
        finally:
            if healthy:
                self._idle.put(worker)
            else:
                self._retire(worker)
                if not self._closed:
                    self._idle.put(self._new())

    def _run(self, worker: Worker, settings: Settings, job: Job, data: str, stop: threading.Event) -> tuple[Outcome, bool]:
        log_path = os.path.join(settings.out, "logs", f"{job.name}.log")
        argv = run_argv(settings, job, data)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("RAY_ADDRESS", "local")
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        started = time.monotonic()
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(argv) + "  (forked from a warm worker: --start fork)\n").encode())
        request = {"module": settings.runner_module, "args": argv[3:], "log": log_path, "cwd": REPO, "env": env}
        limit = settings.timeout + TIMEOUT_GRACE
        try:
            worker.wait_ready()
            worker.send(request)
            reply = worker.reply(REPLY_TIMEOUT_S)
            if reply is None or "pid" not in reply:
                raise WorkerGone(f"the sweep's worker did not start the run ({(reply or {}).get('error', 'no answer')})")
            pid = int(reply["pid"])
        except WorkerGone as exc:
            return Outcome(None, time.monotonic() - started, str(exc)), False
        timed_out = False
        code: int | None = None
        try:
            while True:
                reply = worker.reply(0.5)
                if reply is not None:
                    code = int(reply["exit"])
                    break
                over = time.monotonic() - started > limit
                if over or stop.is_set():
                    timed_out = over
                    code = self._stop(worker, pid, over)
                    break
        except (WorkerGone, KeyError, TypeError, ValueError) as exc:
            with contextlib.suppress(Exception):
                stop_all([p for p in _tree(pid) if running(p)])
            return Outcome(None, time.monotonic() - started, f"{exc}; the run was stopped"), False
        wall = time.monotonic() - started
        healthy = code is not None
        if timed_out:
            why = f"timed out after {limit:g} s (--timeout {settings.timeout:g} + {TIMEOUT_GRACE:g})"
            return Outcome(code, wall, why, True), healthy
        if code is None:
            return Outcome(None, wall, "interrupted" if stop.is_set() else "the run could not be stopped"), False
        if stop.is_set() and code != 0:
            return Outcome(code, wall, "interrupted"), healthy
        if code != 0:
            return Outcome(code, wall, f"{_error_line(log_path)} (exit {code}; log {log_path})"), healthy
        return Outcome(0, wall), healthy

    def _stop(self, worker: Worker, pid: int, over: bool) -> int | None:
        """Stop the run ``pid`` as the subprocess runner stops its command; its exit code (None: unknown)."""
        procs = _tree(pid)
        reply = None
        if not over:  # Ctrl-C at a terminal reached the run too: time to stop what it started
            reply = worker.reply(STOP_GRACE)
        if reply is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            reply = worker.reply(EXIT_WAIT_S)
            if reply is None:
                stop_all(procs)
                reply = worker.reply(10.0)
        left = [p for p in procs[1:] if running(p)]
        if left:
            stop_all(left)
        return None if reply is None else int(reply["exit"])


if __name__ == "__main__":
    serve()
