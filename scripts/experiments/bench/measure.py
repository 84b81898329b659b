"""Measuring one command: wall clock, CPU time and the peak RSS (and PSS) of its whole process tree.

The summed RSS counts a page shared by several processes once per process: forked processes (the
warm ClientApps of processes mode, scripts/local/warm_clientapp.py; Ray's workers) share most of
theirs, so the tree's summed PSS (each shared page divided among its sharers, ``/proc/PID/smaps_rollup``)
is what the tree takes from the machine; both are recorded, the targets are on RSS."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time

from fedlinear.scripts.local.processes import SIGINT_STOPS_ENV, running, stop_all


@dataclasses.dataclass
class Measurement:
    returncode: int
    wall_s: float
    peak_rss: int  # bytes, the max over samples of the summed RSS of every live process in the tree
    peak_procs: int  # processes alive at the largest sample
    samples: int
    leftovers: list[str]  # processes of the tree still alive after the command exited (then killed)
    timed_out: bool = False
    cpu_s: float = 0.0  # CPU time of the command's (reaped) process tree
    other_cpu_s: float = 0.0  # CPU time the machine spent on anything else meanwhile (other users)
    marker_s: float | None = None  # when ``marker`` first existed, seconds after the start
    peak_breakdown: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # name -> [count, RSS] at peak
    names: set[str] = dataclasses.field(default_factory=set)  # every kind of process seen in the tree
    peak_pss: int = 0  # bytes, the max over samples of the summed PSS (0: not readable here)


def _busy_cpu() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 3.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores; return that load."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, self0, t0 = _busy_cpu(), _self_cpu(), time.monotonic()
        time.sleep(window)
        load = (_busy_cpu() - busy0 - (_self_cpu() - self0)) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= deadline:
            return load


PSS_INTERVAL = 1.0  # s between PSS readings at most
PSS_NEAR_PEAK = 0.9  # ... taken only when the summed RSS is within 10 % of its peak so far


def _tree(root) -> list:
    import psutil

    procs = [root]
    with contextlib.suppress(psutil.Error):
        procs.extend(root.children(recursive=True))
    return procs


def _pss_sum(procs) -> int:
    """Summed PSS of the live processes (0 where unreadable)."""
    import psutil

    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error, AttributeError, OSError):
            total += proc.memory_full_info().pss
    return total


def _rss_sum(procs, cpu: dict[tuple[int, float], float]) -> tuple[int, list[tuple[str, int]]]:
    """Summed RSS and (name, RSS) of each live process; records each one's own CPU time in ``cpu``."""
    import psutil

    total = 0
    parts = []
    for proc in procs:
        with contextlib.suppress(psutil.Error), proc.oneshot():
            rss = proc.memory_info().rss
            times = proc.cpu_times()
            cpu[(proc.pid, proc.create_time())] = times.user + times.system
            parts.append((_short_name(proc), rss))
            total += rss
    return total, parts


def _short_name(proc) -> str:
    """``flwr-clientapp``, ``ray::ClientAppActor``, ``raylet``...: what a process is, in a few words."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - a process that just exited
        return "?"
    if not cmd:
        return proc.name()
    words = [os.path.basename(w) for w in cmd[:3]]
    if words[0].startswith("python") and len(words) > 1:
        words = words[1:]
        if words[0] == "-m" and len(words) > 1:
            words = words[1:]
        elif words[0] == "-u" and len(words) > 1:
            words = words[1:]
        elif words[0] == "-c":
            words = ["python -c"]
    return words[0][:40]


def measure(
    argv: list[str], log_path: str, timeout: float, interval: float = 0.2, env=None, marker: tuple[str, ...] = ()
) -> Measurement:
    """Run ``argv`` to completion, sampling the RSS of its process tree every ``interval`` s.

    The launcher starts Flower's processes in new sessions, but they stay descendants of the
    command, so walking the children recursively finds them all (SuperLink, SuperNodes, every
    per-task ``flwr-clientapp``, ``flwr-simulation`` and its Ray processes).
    """
    import psutil

    seen: dict[int, psutil.Process] = {}
    cpu_seen: dict[tuple[int, float], float] = {}
    peak = peak_procs = samples = peak_pss = 0
    pss_at = float("-inf")
    peak_parts: list[tuple[str, int]] = []
    names: set[str] = set()
    timed_out = False
    marker_s = None
    busy0, children0, self0 = _busy_cpu(), _children_cpu(), _self_cpu()
    started = time.monotonic()
    with open(log_path, "wb") as log:
        env = {**(os.environ if env is None else env), SIGINT_STOPS_ENV: "1"}  # stopped with SIGINT on timeout
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    root = psutil.Process(proc.pid)
    try:
        while True:
            procs = _tree(root)
            for p in procs:
                seen.setdefault(p.pid, p)
            # PSS reads every process's smaps (~0.2 of a core at 0.2 s over a Ray tree): only near the RSS
            # peak, at most once a second, so that measuring does not slow what it measures
            total, parts = _rss_sum(procs, cpu_seen)
            if time.monotonic() - pss_at >= PSS_INTERVAL and total >= PSS_NEAR_PEAK * peak:
                peak_pss = max(peak_pss, _pss_sum(procs))
                pss_at = time.monotonic()
            names.update(name for name, _ in parts)
            samples += 1
            if total > peak:
                peak, peak_procs, peak_parts = total, len(parts), parts
            if marker_s is None and any(os.path.exists(m) for m in marker):
                marker_s = time.monotonic() - started
            try:
                proc.wait(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - started > timeout:
                    timed_out = True
                    proc.send_signal(signal.SIGINT)  # fedlinear run stops what it started
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        stop_all(_tree(root))
                    break
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        stop_all([p for p in seen.values() if running(p)])
        raise
    wall = time.monotonic() - started
    # CPU of the tree: what was reaped up to us (exact for processes whose parents wait for them),
    # or the sum of each process's own CPU time at its last sample, whichever is larger
    cpu = max(_children_cpu() - children0, sum(cpu_seen.values()))
    other = max(0.0, _busy_cpu() - busy0 - cpu - (_self_cpu() - self0))
    left = [p for pid, p in seen.items() if pid != proc.pid and running(p)]
    leftovers = []
    for p in left:
        with contextlib.suppress(Exception):
            leftovers.append(f"{p.pid}:{p.name()}")
    if left:
        stop_all(left)
    breakdown: dict[str, list[int]] = {}
    for name, rss in peak_parts:
        entry = breakdown.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += rss
    return Measurement(
        proc.returncode, wall, peak, peak_procs, samples, leftovers, timed_out, cpu, other, marker_s, breakdown, names,
        peak_pss,
    )
