"""One grid point: its ``fedlinear run`` command line, run as a subprocess, bounded in time."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import fedlinear
from fedlinear.scripts.experiments.sweep.settings import FEDOLS_DP, Job, Settings, usable_cores
from fedlinear.scripts.local.processes import SIGINT_STOPS_ENV, running, stop_all

REPO = fedlinear.app_dir()  # the runs' working directory, and on their PYTHONPATH
TIMEOUT_GRACE = 120.0  # a run's command may take this long beyond --timeout (start-up, export, teardown)
STOP_GRACE = 15.0  # on Ctrl-C, seconds a run's command may take to stop by itself before it is signalled


def run_sets(settings: Settings, job: Job) -> list[str]:
    """The ``--set`` arguments of one run: the mechanism, its noise, the seed, the user's keys."""
    strategy = [] if job.epsilon is None else [f"strategy={job.strategy}"]
    if not job.private:
        user = [kv for kv in settings.sets if not kv.split("=", 1)[0].strip().startswith("dp-")]
        return ["dp=none", *strategy, f"seed={job.seed}", *user]
    if job.epsilon is not None:  # --epsilon: the noise multiplier that spends exactly this ε (server/privacy.py)
        mechanism = FEDOLS_DP if job.strategy == "fedols" else settings.dp
        return [f"dp={mechanism}", f"dp-target-epsilon={job.epsilon!r}", *strategy, f"seed={job.seed}", *settings.sets]
    return [f"dp={settings.dp}", f"dp-noise-multiplier={job.noise!r}", f"seed={job.seed}", *settings.sets]


def run_argv(settings: Settings, job: Job, data: str) -> list[str]:
    argv = [sys.executable, "-m", settings.runner_module, "run", "--data", data, "--rounds", str(settings.rounds),
            "--out", job.run_dir, "--mode", settings.mode, "--timeout", f"{settings.timeout:g}"]  # fmt: skip
    if settings.clients is not None:
        argv += ["--clients", str(settings.clients)]
    if settings.mode == "simulation":
        ray_cpus = settings.ray_cpus or max(1, usable_cores() // settings.parallel)
        argv += ["--ray-cpus", str(ray_cpus)]
    for kv in run_sets(settings, job):
        argv += ["--set", kv]
    return argv


@dataclasses.dataclass
class Outcome:
    """What running the command gave: exit code, wall time, a one-line error (or None)."""

    returncode: int | None
    wall_s: float
    error: str | None = None
    timed_out: bool = False


Runner = Callable[[Settings, Job, str, threading.Event], Outcome]


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _error_line(log_path: str) -> str:
    """The command's own one-line error, else its last line."""
    with contextlib.suppress(OSError), open(log_path, "rb") as handle:
        lines = [ln.strip() for ln in handle.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        for line in reversed(lines):
            if line.startswith("fedlinear: error:"):
                return line[len("fedlinear: error:") :].strip()[:400]
        return lines[-1][:400] if lines else ""
    return ""


def subprocess_runner(settings: Settings, job: Job, data: str, stop: threading.Event) -> Outcome:
    """``fedlinear run`` for one grid point, output to OUT/logs/<name>.log, bounded in time.

    ``fedlinear run --timeout`` bounds the federation; this bounds the command too (timeout +
    TIMEOUT_GRACE: start-up, export, teardown). On expiry, or STOP_GRACE after ``stop`` (Ctrl-C), the
    command gets SIGINT (it stops every process it started); 60 s later its whole process tree is killed.
    """
    log_path = os.path.join(settings.out, "logs", f"{job.name}.log")
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env[SIGINT_STOPS_ENV] = "1"  # stopped with SIGINT below, even if this sweep was started with it ignored
    env.setdefault("RAY_ADDRESS", "local")  # a private Ray per run, never a cluster `ray start` left behind
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = run_argv(settings, job, data)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    limit = settings.timeout + TIMEOUT_GRACE
    timed_out = False
    while True:
        try:
            proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            over = time.monotonic() - started > limit
            if over or stop.is_set():
                timed_out = over
                procs = _tree(proc.pid)
                if not over:
                    # Ctrl-C at a terminal reached the command too (same process group): give it time to
                    # stop what it started before a second SIGINT could interrupt that clean-up
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=STOP_GRACE)
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        stop_all(procs)
                        proc.wait(timeout=10)
                left = [p for p in procs[1:] if running(p)]
                if left:
                    stop_all(left)
                break
    wall = time.monotonic() - started
    if timed_out:
        why = f"timed out after {limit:g} s (--timeout {settings.timeout:g} + {TIMEOUT_GRACE:g})"
        return Outcome(proc.returncode, wall, why, True)
    if stop.is_set() and proc.returncode != 0:
        return Outcome(proc.returncode, wall, "interrupted")
    if proc.returncode != 0:
        return Outcome(proc.returncode, wall, f"{_error_line(log_path)} (exit {proc.returncode}; log {log_path})")
    return Outcome(0, wall)
