"""``fedlinear bench``: how fast fedlinear runs, next to Flower's own floor and a quickstart-style app.

One invocation, on one set of generated data, measures (each run a ``fedlinear run`` subprocess):

* ``sim`` / ``processes``: fedlinear (engines ``numpy`` and ``keras``), **the floor** (the no-op app in
  ``benchmarks/noop_app``, launched by the same launcher) and **the quickstart-style reference**
  (``benchmarks/quickstart_app``; in processes mode only with ``--quickstart-processes``), at
  ``--clients`` x ``--rounds`` (10 x 20);
* ``scaling``: fedlinear and the floor in simulation at 10, 100, 1000, 10000 clients x 3 rounds;
* ``central``: the pooled NumPy least-squares fit and centralized Keras training of the same data.

For every run: wall clock of the whole ``fedlinear run`` command, and the peak RSS of its whole
process tree (every process below it, sampled every 0.2 s, RSS summed over the live processes);
from the run's ``history.json``: per-round times, start-up before round 1, the final test MSE and
the accuracy bar (final test MSE <= 1.01 x the pooled least-squares test MSE). Figures are the
median of ``--repeat`` runs for runs shorter than ``--repeat-limit`` seconds. Ratios (x floor,
x quickstart) are computed within this invocation, between runs of the same mode.

Writes ``OUT/bench.json``, ``OUT/bench.csv``, ``OUT/table.txt`` and ``OUT/scaling.png``.

    fedlinear bench --out bench-results                       # everything (long)
    fedlinear bench --out r --only sim,scaling --max-clients 1000
    fedlinear bench --out r --quick --only sim                # a smoke test in about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOOP_APP = os.path.join(REPO, "benchmarks", "noop_app")
QUICKSTART_APP = os.path.join(REPO, "benchmarks", "quickstart_app")
PARTS = ("sim", "processes", "scaling", "central")
MODE_LABEL = {"simulation": "sim", "processes": "processes", "local": "one process"}
ACCURACY_BAR = 1.01
GiB = 1024**3
MiB = 1024**2


# ----------------------------------------------------------------------------------------------
# Measuring one command: wall clock and the peak RSS of its whole process tree
# ----------------------------------------------------------------------------------------------


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


def _tree(root) -> list:
    import psutil

    procs = [root]
    with contextlib.suppress(psutil.Error):
        procs.extend(root.children(recursive=True))
    return procs


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


def _kill_all(procs, grace: float = 5.0) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


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
    peak = peak_procs = samples = 0
    peak_parts: list[tuple[str, int]] = []
    names: set[str] = set()
    timed_out = False
    marker_s = None
    busy0, children0, self0 = _busy_cpu(), _children_cpu(), _self_cpu()
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    root = psutil.Process(proc.pid)
    try:
        while True:
            procs = _tree(root)
            for p in procs:
                seen.setdefault(p.pid, p)
            total, parts = _rss_sum(procs, cpu_seen)
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
                        _kill_all(_tree(root))
                    break
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        _kill_all([p for p in seen.values() if _running(p)])
        raise
    wall = time.monotonic() - started
    # CPU of the tree: what was reaped up to us (exact for processes whose parents wait for them),
    # or the sum of each process's own CPU time at its last sample, whichever is larger
    cpu = max(_children_cpu() - children0, sum(cpu_seen.values()))
    other = max(0.0, _busy_cpu() - busy0 - cpu - (_self_cpu() - self0))
    left = [p for pid, p in seen.items() if pid != proc.pid and _running(p)]
    leftovers = []
    for p in left:
        with contextlib.suppress(Exception):
            leftovers.append(f"{p.pid}:{p.name()}")
    if left:
        _kill_all(left)
    breakdown: dict[str, list[int]] = {}
    for name, rss in peak_parts:
        entry = breakdown.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += rss
    return Measurement(
        proc.returncode, wall, peak, peak_procs, samples, leftovers, timed_out, cpu, other, marker_s, breakdown, names
    )


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def ensure_data(path: str, clients: int, samples: int, features: int, noise: float, seed: int, test: int) -> str:
    """Synthetic shards in ``path`` (reused when already generated with the same parameters)."""
    params = {"clients": clients, "samples-per-client": samples, "features": features, "noise": noise,
              "seed": seed, "test-samples": test}  # fmt: skip
    marker = os.path.join(path, "bench-data.json")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle) == params:
                return path
    from fedlinear.common.data import make_synthetic
    from fedlinear.common.shards import write_shards

    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    t0 = time.monotonic()
    shards, test_set, truth = make_synthetic(clients, samples, features, noise, seed, test)
    write_shards(path, shards, test_set)
    with open(os.path.join(path, "truth.json"), "w", encoding="utf-8") as handle:
        handle.write(truth.to_json() + "\n")
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(params, handle)
    say(f"data: {clients} clients x {samples} samples, d={features} -> {path} ({time.monotonic() - t0:.1f} s)")
    return path


def least_squares_reference(data_dir: str, clients: int) -> dict[str, float]:
    """Pooled least-squares fit of the shards and its test MSE (NumPy only)."""
    import numpy as np

    from fedlinear.common import model as lm
    from fedlinear.common.data import load_csv

    parts = [load_csv(os.path.join(data_dir, f"client-{i}.csv")) for i in range(clients)]
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    test = load_csv(os.path.join(data_dir, "test.csv"))
    weights = lm.lstsq_fit(x, y)
    return {"test-mse": lm.mse(weights, test.x, test.y), "train-mse": lm.mse(weights, x, y)}


def test_mse_of_npz(path: str, data_dir: str) -> float | None:
    import numpy as np

    from fedlinear.common import model as lm
    from fedlinear.common.data import load_csv

    if not os.path.exists(path):
        return None
    with np.load(path) as arrays:
        weights = lm.LinearWeights.from_dict({"kernel": arrays["kernel"], "bias": arrays["bias"]})
    test = load_csv(os.path.join(data_dir, "test.csv"))
    return lm.mse(weights, test.x, test.y)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    suite: str  # "main" | "scaling" | "central"
    system: str  # "fedlinear-numpy", "fedlinear-keras", "floor", "quickstart", "lstsq", "keras"
    mode: str  # "simulation" | "processes" | "local"
    clients: int
    rounds: int
    samples: int  # per client
    data_dir: str
    app: str | None = None
    sets: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.suite}-{MODE_LABEL[self.mode].replace(' ', '')}-{self.system}-{self.clients}x{self.rounds}"

    @property
    def label(self) -> str:
        return {
            "fedlinear-numpy": "fedlinear (numpy)",
            "fedlinear-keras": "fedlinear (keras)",
            "floor": "floor (no-op app)",
            "quickstart": "quickstart-style",
            "lstsq": "pooled lstsq (NumPy)",
            "keras": "centralized Keras",
        }[self.system]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_case(case: Case, args: argparse.Namespace, out: str, ls_ref: dict[str, float]) -> dict[str, Any]:
    """Run one case ``repeat`` times (once if a run is longer than ``--repeat-limit``).

    A failed run (non-zero exit, failed client updates, Ray outside the tree) or, with
    ``--max-other-load``, a run during which other processes used more CPU than that, is retried up
    to ``--retries`` times; the figures come from the good runs (noisy ones only if nothing else).
    """
    runs: list[dict[str, Any]] = []
    repeat, retries = max(1, args.repeat), max(0, args.retries)
    index = 0

    def good(run: dict[str, Any]) -> bool:
        return run["ok"] and not run.get("noisy")

    while sum(map(good, runs)) < repeat and sum(not good(r) for r in runs) <= retries:
        run = _run_once(case, args, out, index, ls_ref)
        index += 1
        limit = args.max_other_load
        run["noisy"] = bool(limit is not None and run["ok"] and (run.get("other-load") or 0.0) > limit)
        runs.append(run)
        note = "" if run["ok"] else f"  FAILED: {run['error']}"
        if run["noisy"]:
            note = f"  noisy: other processes used {run['other-load']:.2f} cores (> --max-other-load {limit})"
        extra = f", {run['round-s']:.2f} s/round" if run.get("round-s") else ""
        say(
            f"{case.key} run {index}: {run['wall-s']:.1f} s{extra}, peak RSS {run['peak-rss'] / GiB:.2f} GiB"
            f" ({run['peak-procs']} processes){note}"
        )
        if good(run) and run["wall-s"] > args.repeat_limit:
            break
    return summarize(case, runs)


def _run_once(case: Case, args: argparse.Namespace, out: str, index: int, ls_ref: dict[str, float]) -> dict[str, Any]:
    run_dir = os.path.join(out, "runs", f"{case.key}-r{index + 1}")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    log_path = os.path.join(out, "logs", f"{case.key}-r{index + 1}.log")
    if case.suite == "central":
        argv = [sys.executable, "-m", "fedlinear.scripts.bench", "--central-worker", case.system, "--data", case.data_dir,
                "--clients", str(case.clients), "--rounds", str(case.rounds), "--out", run_dir]  # fmt: skip
    else:
        argv = [sys.executable, "-m", args.runner, "run", "--data", case.data_dir, "--clients", str(case.clients),
                "--rounds", str(case.rounds), "--out", run_dir, "--mode", case.mode,
                "--timeout", str(args.timeout)]  # fmt: skip
        if case.app:
            argv += ["--app", case.app]
        if args.client_cpus is not None and case.mode == "simulation":
            argv += ["--client-cpus", str(args.client_cpus)]
        for kv in case.sets:
            argv += ["--set", kv]
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Without an address, ray.init() inside Flower's simulation joins any cluster that `ray start` left
    # on this machine (/tmp/ray/ray_current_cluster): its actors would run outside the measured tree,
    # on someone else's CPUs, and die with that cluster. "local" always starts a private instance.
    env.setdefault("RAY_ADDRESS", "local")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else REPO
    load_before = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    markers = (os.path.join(run_dir, "status.json"), os.path.join(run_dir, "serverapp-started.json"))
    m = measure(argv, log_path, timeout=args.timeout + 120, env=env, marker=markers)
    run: dict[str, Any] = {
        "run-dir": run_dir,
        "log": log_path,
        "wall-s": m.wall_s,
        "cpu-s": m.cpu_s,
        "other-load": m.other_cpu_s / m.wall_s if m.wall_s > 0 else None,
        "other-load-before": load_before,
        "pre-s": m.marker_s,
        "peak-rss": m.peak_rss,
        "peak-procs": m.peak_procs,
        "peak-breakdown-mib": {k: [n, round(v / MiB)] for k, (n, v) in sorted(m.peak_breakdown.items(),
                                                                              key=lambda kv: -kv[1][1])},
        "rss-samples": m.samples,
        "returncode": m.returncode,
        "leftover-processes": m.leftovers,
        "ok": m.returncode == 0 and not m.timed_out,
        "error": None,
    }
    if not run["ok"]:
        run["error"] = (
            "timed out" if m.timed_out else f"exit code {m.returncode}; see {log_path}: {_last_line(log_path)}"
        )
        return run
    if case.suite == "central":
        with open(os.path.join(run_dir, "central.json"), encoding="utf-8") as handle:
            run.update(json.load(handle))
        run["ls-test-mse"] = ls_ref["test-mse"]
        return run
    run.update(_history_figures(case, run_dir, ls_ref))
    run["inner-wall-s"] = _inner_wall(log_path)
    if case.mode == "simulation" and not any("raylet" in name for name in m.names):
        run["ok"] = False
        run["error"] = "Ray ran outside the measured process tree (joined another cluster?)"
    if run.get("failed-updates"):
        run["ok"] = False
        run["error"] = f"{run['failed-updates']} client updates failed; see {run_dir}/logs/flwr-run.log"
    run["worker-crashes"] = _count_in(os.path.join(run_dir, "logs", "flwr-run.log"), "SIGABRT received")
    if run.get("serverapp-s") is not None and run["pre-s"] is not None:
        run["post-s"] = run["wall-s"] - run["pre-s"] - run["serverapp-s"]
    return run


def _last_line(path: str) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        lines = [ln for ln in handle.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""
    return ""


def _count_in(path: str, needle: str) -> int:
    """Lines of ``path`` containing ``needle`` (e.g. Ray workers aborting at start-up, which cost seconds)."""
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if needle in line and "logging.cc" not in line)
    return 0


def _inner_wall(log_path: str) -> float | None:
    with contextlib.suppress(OSError), open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("wall time "):
                return float(line.split()[2])
    return None


def _history_figures(case: Case, run_dir: str, ls_ref: dict[str, float]) -> dict[str, Any]:
    """Per-round times and accuracy from RUN_DIR/history.json (every app writes one)."""
    path = os.path.join(run_dir, "history.json")
    if not os.path.exists(path):
        return {"error-history": f"no {path}"}
    with open(path, encoding="utf-8") as handle:
        history = json.load(handle)
    rounds = history.get("rounds", [])
    elapsed = [r["elapsed-s"] for r in rounds]
    out: dict[str, Any] = {}
    if len(elapsed) >= 2:
        diffs = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
        out["startup-s"] = elapsed[0]  # ServerApp start -> ready for round 1 (fedlinear: node wait + query)
        out["round-times-s"] = diffs
        out["round1-s"] = diffs[0]
        out["to-round1-s"] = elapsed[1]  # ServerApp start -> round 1 done (incl. Ray/actor warm-up)
        out["rounds-total-s"] = elapsed[-1] - elapsed[0]
        out["serverapp-s"] = elapsed[-1]
        # steady state: rounds 2..R (round 1 carries the warm-up, in fedlinear partly moved to the query)
        steady = diffs[1:] or diffs
        out["round-s"] = statistics.median(steady)
        span = (elapsed[-1] - elapsed[1]) if len(diffs) > 1 else diffs[0]
        out["updates-per-s"] = case.clients * len(steady) / span if span > 0 else None
    final = rounds[-1] if rounds else {}
    out["failed-updates"] = sum(int(r.get("clients-failed") or 0) for r in rounds)
    if case.system.startswith("fedlinear"):
        ref = history.get("reference", {}).get("test-mse")
        out["test-mse"] = final.get("test-mse")
        out["ls-test-mse"] = ref
    elif case.system == "quickstart":
        out["test-mse"] = test_mse_of_npz(os.path.join(run_dir, "final-weights.npz"), case.data_dir)
        out["ls-test-mse"] = ls_ref["test-mse"]
    if out.get("test-mse") is not None and out.get("ls-test-mse"):
        out["mse-ratio"] = out["test-mse"] / out["ls-test-mse"]
    return out


def summarize(case: Case, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["ok"] and not r.get("noisy")] or [r for r in runs if r["ok"]]
    row: dict[str, Any] = dataclasses.asdict(case)
    row.update(key=case.key, label=case.label, runs=len(ok), ok=bool(ok))
    row["failed-runs"] = len(runs) - len(ok)  # failed, or noisy and left out
    row["noisy"] = any(r.get("noisy") for r in ok)  # only noisy runs were available
    row["errors"] = [r["error"] for r in runs if r["error"]]
    row["raw"] = runs
    if not ok:
        return row
    for field in ("wall-s", "peak-rss", "round-s", "round1-s", "startup-s", "to-round1-s", "rounds-total-s",
                  "updates-per-s", "serverapp-s", "inner-wall-s", "pre-s", "post-s", "cpu-s", "other-load",
                  "fit-s", "import-s", "process-s"):  # fmt: skip
        value = median([r.get(field) for r in ok])
        if value is not None:
            row[field] = value
    row["wall-s-all"] = [r["wall-s"] for r in ok]
    row["peak-rss-max"] = max(r["peak-rss"] for r in ok)
    row["other-load-max"] = max((r.get("other-load") or 0.0) for r in ok)
    row["worker-crashes"] = sum(r.get("worker-crashes") or 0 for r in ok)
    if row["rounds"]:
        row["e2e-updates-per-s"] = case.clients * case.rounds / row["wall-s"]
    ratios = [r.get("mse-ratio") for r in ok if r.get("mse-ratio") is not None]
    if ratios:
        row["mse-ratio"] = max(ratios)  # worst run
        row["test-mse"] = median([r.get("test-mse") for r in ok])
        row["ls-test-mse"] = ok[0].get("ls-test-mse")
        if case.system.startswith("fedlinear") and case.rounds >= 20:
            row["bar"] = "yes" if all(v <= ACCURACY_BAR for v in ratios) else "NO"
    elif ok[0].get("test-mse") is not None:
        row["test-mse"] = ok[0]["test-mse"]
        row["ls-test-mse"] = ok[0].get("ls-test-mse")
        if row["ls-test-mse"]:
            row["mse-ratio"] = row["test-mse"] / row["ls-test-mse"]
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """x floor / x quickstart: wall-clock ratios to the same-mode, same-size baseline of this invocation."""
    index = {(r["suite"], r["mode"], r["system"], r["clients"], r["rounds"]): r for r in rows if r.get("wall-s")}
    for row in rows:
        if row["suite"] == "central" or not row.get("wall-s"):
            continue
        floor = index.get((row["suite"], row["mode"], "floor", row["clients"], row["rounds"]))
        quick = index.get((row["suite"], row["mode"], "quickstart", row["clients"], row["rounds"]))
        if floor and row["system"] != "floor":
            row["x-floor"] = row["wall-s"] / floor["wall-s"]
            if row.get("rounds-total-s") and floor.get("rounds-total-s"):
                row["x-floor-rounds"] = row["rounds-total-s"] / floor["rounds-total-s"]
            if row.get("updates-per-s") and floor.get("updates-per-s"):
                row["updates-vs-floor"] = row["updates-per-s"] / floor["updates-per-s"]
        if quick and row["system"] != "quickstart":
            row["x-quickstart"] = row["wall-s"] / quick["wall-s"]


# ----------------------------------------------------------------------------------------------
# The central baselines (a worker process, so TensorFlow never loads into the benchmark itself)
# ----------------------------------------------------------------------------------------------


def central_worker(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    import numpy as np

    from fedlinear.common import model as lm
    from fedlinear.common.data import load_csv

    parts = [load_csv(os.path.join(args.data, f"client-{i}.csv")) for i in range(args.clients)]
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    test = load_csv(os.path.join(args.data, "test.csv"))
    t_loaded = time.monotonic()
    result: dict[str, Any] = {"load-s": t_loaded - t_start, "samples": len(x)}
    if args.central_worker == "lstsq":
        t0 = time.monotonic()
        weights = lm.lstsq_fit(x, y)
        result["fit-s"] = time.monotonic() - t0
        result["import-s"] = 0.0
    else:
        t0 = time.monotonic()
        import keras

        result["import-s"] = time.monotonic() - t0
        t0 = time.monotonic()
        keras.utils.set_random_seed(42)
        model = keras.Sequential([keras.Input(shape=(x.shape[1],)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mean_squared_error")
        model.fit(x.astype(np.float32), y.astype(np.float32).reshape(-1, 1), epochs=args.rounds, batch_size=32,
                  shuffle=True, verbose=0)  # fmt: skip
        result["fit-s"] = time.monotonic() - t0
        kernel, bias = model.get_weights()
        weights = lm.LinearWeights(kernel=kernel, bias=bias)
    result["test-mse"] = lm.mse(weights, test.x, test.y)
    result["process-s"] = time.monotonic() - t_start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "central.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0


# ----------------------------------------------------------------------------------------------
# Output: table, CSV, JSON, plot
# ----------------------------------------------------------------------------------------------


def _f(value: Any, fmt: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, str):
        return value.rjust(width)
    return format(value, fmt).rjust(width)


MAIN_LEGEND = """\
  wall s: the whole 'fedlinear run' command; x floor / x qstart: wall / wall of the no-op floor / the
  quickstart-style app in the same mode; pre s: command start -> ServerApp main() running (launcher, SuperLink,
  flwr run, ServerApp process and imports); to r1 s: ServerApp start -> end of round 1 (node wait, fedlinear's
  shard query, Ray/actor warm-up, round 1); s/round: median of rounds 2..R; post s: after the last round
  (fedlinear: SavedModel export; shutdown, teardown); CPU s: CPU time of the process tree; other: CPU cores
  used by other processes on the machine during the run (noise); bar: final test MSE <= 1.01 x least squares;
  runs: good runs (good/attempts when some failed or were noisy; * = only noisy runs were available)"""


def _runs(row: dict[str, Any]) -> str:
    """Successful runs, or ok/attempts when some failed (their errors are in the JSON)."""
    failed = row.get("failed-runs") or 0
    text = f"{row['runs']}/{row['runs'] + failed}" if failed else str(row["runs"])
    return text + ("*" if row.get("noisy") else "")


def main_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("case", 20), ("mode", 9), ("N x R", 6), ("runs", 4), ("wall s", 7), ("x floor", 7), ("x qstart", 8),
        ("pre s", 5), ("to r1 s", 7), ("s/round", 7), ("post s", 6), ("CPU s", 6), ("other", 5),
        ("peak RSS GiB", 12), ("MSE / LS", 8), ("bar", 3),
    ]  # fmt: skip
    lines = ["  ".join(name.ljust(w) if i < 2 else name.rjust(w) for i, (name, w) in enumerate(cols))]
    lines.append("-" * len(lines[0]))
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['label']:<20}  {MODE_LABEL[r['mode']]:<9}  {r['clients']}x{r['rounds']}: FAILED "
                         f"({'; '.join(r['errors'])[:200]})")  # fmt: skip
            continue
        cells = [
            r["label"].ljust(20),
            MODE_LABEL[r["mode"]].ljust(9),
            f"{r['clients']}x{r['rounds']}".rjust(6),
            _runs(r).rjust(4),
            _f(r.get("wall-s"), ".1f", 7),
            _f(r.get("x-floor"), ".2f", 7),
            _f(r.get("x-quickstart"), ".3f", 8),
            _f(r.get("pre-s"), ".1f", 5),
            _f(r.get("to-round1-s"), ".1f", 7),
            _f(r.get("round-s"), ".2f", 7),
            _f(r.get("post-s"), ".1f", 6),
            _f(r.get("cpu-s"), ".0f", 6),
            _f(r.get("other-load-max"), ".2f", 5),
            _f(r["peak-rss"] / GiB, ".2f", 12),
            _f(r.get("mse-ratio"), ".4f", 8),
            _f(r.get("bar"), "", 3),
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    cols = [("system", 18), ("clients", 7), ("rounds", 6), ("n/client", 8), ("runs", 4), ("wall s", 7),
            ("to r1 s", 7), ("s/round", 8), ("updates/s", 9), ("e2e upd/s", 9), ("vs floor", 8), ("CPU s", 6),
            ("other", 5), ("peak RSS GiB", 12)]  # fmt: skip
    lines = ["  ".join(name.ljust(w) if i == 0 else name.rjust(w) for i, (name, w) in enumerate(cols))]
    lines.append("-" * len(lines[0]))
    for r in sorted(rows, key=lambda r: (r["system"] != "fedlinear-numpy", r["clients"])):
        if not r["ok"]:
            lines.append(f"{r['label']:<18}  {r['clients']:>7}: FAILED ({'; '.join(r['errors'])[:200]})")
            continue
        lines.append("  ".join([
            r["label"].ljust(18), str(r["clients"]).rjust(7), str(r["rounds"]).rjust(6), str(r["samples"]).rjust(8),
            _runs(r).rjust(4), _f(r.get("wall-s"), ".1f", 7), _f(r.get("to-round1-s"), ".1f", 7),
            _f(r.get("round-s"), ".2f", 8), _f(r.get("updates-per-s"), ".1f", 9),
            _f(r.get("e2e-updates-per-s"), ".1f", 9), _f(r.get("updates-vs-floor"), ".2f", 8),
            _f(r.get("cpu-s"), ".0f", 6), _f(r.get("other-load-max"), ".2f", 5), _f(r["peak-rss"] / GiB, ".2f", 12),
        ]))  # fmt: skip
    return "\n".join(lines)


def central_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<22}  {'samples':>7}  {'fit s':>8}  {'import s':>8}  {'process s':>9}  {'peak RSS GiB':>12}  "
             f"{'MSE / LS':>8}"]  # fmt: skip
    lines.append("-" * len(lines[0]))
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['label']:<22}  FAILED ({'; '.join(r['errors'])[:200]})")
            continue
        samples = r["clients"] * r["samples"]
        lines.append(
            f"{r['label']:<22}  {samples:>7}  {_f(r.get('fit-s'), '.4f', 8)}  {_f(r.get('import-s'), '.1f', 8)}  "
            f"{_f(r.get('process-s'), '.1f', 9)}  {r['peak-rss'] / GiB:>12.2f}  {_f(r.get('mse-ratio'), '.4f', 8)}"
        )
    return "\n".join(lines)


def evaluate_targets(rows: list[dict[str, Any]], main_clients: int, main_rounds: int) -> list[dict[str, Any]]:
    """The targets of issue 4, judged on this invocation's figures (missing figures: 'not run')."""

    def find(suite, mode, system, clients=main_clients, rounds=main_rounds):
        for r in rows:
            if (r["suite"], r["mode"], r["system"]) == (suite, mode, system) and (r["clients"], r["rounds"]) == (
                clients,
                rounds,
            ):
                return r if r["ok"] else None
        return None

    targets = []

    def add(name, value, limit, met, detail):
        status = "not run" if met is None else ("met" if met else "MISSED")
        targets.append({"target": name, "value": value, "limit": limit, "status": status, "detail": detail})

    r = find("main", "simulation", "fedlinear-numpy")
    v = r.get("x-floor") if r else None
    add("simulation numpy wall <= 1.25 x floor", v, 1.25, None if v is None else v <= 1.25,
        f"{r['wall-s']:.1f} s" if r else "")
    r = find("main", "simulation", "fedlinear-keras")
    q = find("main", "simulation", "quickstart")
    v = q["wall-s"] / r["wall-s"] if r and q else None
    add("simulation keras >= 3 x faster than quickstart", v, 3.0, None if v is None else v >= 3.0,
        f"{q['wall-s']:.1f} s / {r['wall-s']:.1f} s" if r and q else "")
    r = find("main", "simulation", "fedlinear-numpy")
    v = q["wall-s"] / r["wall-s"] if r and q else None
    add("simulation numpy >= 5 x faster than quickstart", v, 5.0, None if v is None else v >= 5.0,
        f"{q['wall-s']:.1f} s / {r['wall-s']:.1f} s" if r and q else "")
    r = find("main", "processes", "fedlinear-numpy")
    v = r.get("x-floor") if r else None
    add("processes numpy wall <= 1.3 x floor", v, 1.3, None if v is None else v <= 1.3,
        f"{r['wall-s']:.1f} s" if r else "")
    for system in ("fedlinear-numpy", "fedlinear-keras"):
        r = find("main", "processes", system)
        if r or system == "fedlinear-numpy":
            v = r["peak-rss-max"] / GiB if r else None
            add(f"processes {system} peak RSS <= 2.4 GiB (25 % of 9.7)", v, 2.425,
                None if v is None else v <= 2.425, "max over runs" if r else "")
    r = next((x for x in rows if x["suite"] == "scaling" and x["system"] == "fedlinear-numpy"
              and x["clients"] == 1000 and x["ok"]), None)  # fmt: skip
    v = r.get("updates-vs-floor") if r else None
    add("1000 clients: >= 80 % of the floor's updates/s", v, 0.8, None if v is None else v >= 0.8,
        f"{r.get('updates-per-s', 0):.1f} updates/s" if r else "")
    big = [x for x in rows if x["suite"] == "scaling" and x["system"] == "fedlinear-numpy" and x["clients"] >= 10000]
    if big:
        r = big[0]
        detail = f"{r['wall-s']:.0f} s, peak RSS {r['peak-rss'] / GiB:.2f} GiB" if r["ok"] else "; ".join(r["errors"])
        add("10000 clients x 3 rounds completes", r["peak-rss"] / GiB if r["ok"] else None, None, r["ok"], detail)
    else:
        add("10000 clients x 3 rounds completes", None, None, None, "")
    bars = [x for x in rows if x.get("bar")]
    add("accuracy bar (test MSE <= 1.01 x LS) in every 20-round fedlinear run",
        max((x["mse-ratio"] for x in bars), default=None), ACCURACY_BAR,
        None if not bars else all(x["bar"] == "yes" for x in bars), f"{len(bars)} cases")
    return targets


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        value = "" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  [{t['status']:^7}] {t['target']}: {value}  {t['detail']}".rstrip())
    return "\n".join(lines)


CSV_FIELDS = ("key", "suite", "system", "mode", "clients", "rounds", "samples", "runs", "failed-runs", "ok", "wall-s",
              "x-floor", "x-quickstart", "x-floor-rounds", "pre-s", "startup-s", "round1-s", "to-round1-s", "round-s",
              "rounds-total-s", "post-s", "updates-per-s", "e2e-updates-per-s", "updates-vs-floor", "cpu-s",
              "other-load-max", "worker-crashes", "peak-rss", "peak-rss-max", "test-mse", "ls-test-mse", "mse-ratio",
              "bar", "fit-s", "import-s", "process-s")  # fmt: skip


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in CSV_FIELDS})


def plot_scaling(path: str, rows: list[dict[str, Any]]) -> bool:
    rows = [r for r in rows if r["suite"] == "scaling" and r["ok"]]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("round-s", "wall time per round (s)"), ("updates-per-s", "client updates per second"),
              ("peak-rss", "peak RSS of the process tree (GiB)")]  # fmt: skip
    for system, style in (("fedlinear-numpy", "o-"), ("floor", "s--")):
        series = sorted((r for r in rows if r["system"] == system), key=lambda r: r["clients"])
        if not series:
            continue
        xs = [r["clients"] for r in series]
        for ax, (field, title) in zip(axes, panels, strict=True):
            ys = [(r.get(field) or 0) / (GiB if field == "peak-rss" else 1) for r in series]
            ax.plot(xs, ys, style, label=series[0]["label"])
            ax.set_title(title)
            ax.set_xscale("log")
            ax.set_xlabel("virtual clients (simulation)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"fedlinear vs the no-op floor, simulation, {rows[0]['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def code_version() -> dict[str, Any]:
    """The commit measured, and files that differ from it (read-only git calls; no git: empty)."""
    out: dict[str, Any] = {}

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", REPO, *argv], capture_output=True, text=True, timeout=20).stdout

    with contextlib.suppress(Exception):
        out["commit"] = git("rev-parse", "--short", "HEAD").strip()
        out["changed"] = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    return out


def hardware() -> dict[str, Any]:
    import psutil

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    out = {
        "cpus": os.cpu_count(),
        "cpus-usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu-model": model,
        "memory-gib": round(psutil.virtual_memory().total / GiB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("flwr", "tensorflow", "numpy", "ray"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    return out


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def plan(args: argparse.Namespace, out: str) -> tuple[list[Case], dict[str, tuple[str, int]]]:
    """The cases to run, and the data sets they need (name -> (dir, clients))."""
    parts = set(_csv_list(args.only)) if args.only else set(PARTS)
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"fedlinear bench: --only takes a comma list of {', '.join(PARTS)}; got {', '.join(unknown)}")
    if args.skip_scaling:
        parts.discard("scaling")
    engines = _csv_list(args.engines)
    proc_engines = _csv_list(args.processes_engines) if args.processes_engines else engines
    n, rounds, samples = args.clients, args.rounds, args.samples_per_client
    data_main = os.path.join(out, "data", f"main-{n}x{samples}")
    datasets = {"main": (data_main, n)}
    cases: list[Case] = []
    for part, mode, engs in (("sim", "simulation", engines), ("processes", "processes", proc_engines)):
        if part not in parts:
            continue
        for engine in engs:
            cases.append(Case("main", f"fedlinear-{engine}", mode, n, rounds, samples, data_main,
                              sets=(f"engine={engine}",)))  # fmt: skip
        if not args.skip_floor:
            cases.append(Case("main", "floor", mode, n, rounds, samples, data_main, app=NOOP_APP))
        if not args.skip_quickstart and (mode == "simulation" or args.quickstart_processes):
            cases.append(Case("main", "quickstart", mode, n, rounds, samples, data_main, app=QUICKSTART_APP))
    if "central" in parts:
        for system in ("lstsq", "keras"):
            cases.append(Case("central", system, "local", n, rounds, samples, data_main))
    if "scaling" in parts:
        for count in sorted(int(c) for c in _csv_list(args.scaling_clients)):
            if count > args.max_clients:
                continue
            per_client = args.scaling_samples or (args.samples_per_client if count <= 100 else 100)
            name = f"scale-{count}x{per_client}"
            if count == n and per_client == samples:
                data_dir = data_main
            else:
                data_dir = os.path.join(out, "data", name)
                datasets[name] = (data_dir, count)
            for system, app in (("fedlinear-numpy", None), ("floor", NOOP_APP)):
                if system == "floor" and args.skip_floor:
                    continue
                # a round of 10000 virtual clients can outlast fedlinear's default round-timeout (600 s);
                # the floor's FedAvg waits up to an hour per round, so give fedlinear the run's bound
                sets = ("engine=numpy", f"round-timeout={args.timeout:g}") if app is None else ()
                cases.append(Case("scaling", system, "simulation", count, args.scaling_rounds, per_client, data_dir,
                                  app=app, sets=sets))  # fmt: skip
    return cases, datasets


def cmd_bench(args: argparse.Namespace) -> int:
    if args.central_worker:
        return central_worker(args)
    if args.quick:
        args.clients, args.rounds, args.samples_per_client = 2, 2, 50
        args.test_samples = 200
        args.repeat = 1
        args.scaling_clients = "2,4"
        args.scaling_rounds = 2
        args.scaling_samples = 50
        args.timeout = min(args.timeout, 300)
    out = os.path.abspath(os.path.expanduser(args.out))
    if out == REPO or out.startswith(REPO + os.sep):
        say(f"warning: {out} is inside the app directory {REPO}; 'flwr run' walks every file under it on each run, "
            "so the generated data slows every fedlinear run down")  # fmt: skip
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    cases, _ = plan(args, out)
    hw = hardware()
    code = code_version()
    command = " ".join(args.argv) if args.argv else "fedlinear " + " ".join(sys.argv[1:])
    say(f"{len(cases)} cases; output in {out}")
    say(f"hardware: {hw['cpus']} CPUs ({hw['cpu-model']}), {hw['memory-gib']} GiB; flwr {hw.get('flwr')}, "
        f"tensorflow {hw.get('tensorflow')}")  # fmt: skip
    # data first (not timed), and the least-squares yardstick of each data set
    refs: dict[str, dict[str, float]] = {}
    for case in cases:
        if case.data_dir not in refs:
            ensure_data(case.data_dir, case.clients if case.suite == "scaling" else args.clients, case.samples,
                        args.features, args.noise, args.seed, args.test_samples)  # fmt: skip
            refs[case.data_dir] = least_squares_reference(case.data_dir, case.clients)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows.append(run_case(case, args, out, refs[case.data_dir]))
        add_ratios(rows)
        _write_outputs(out, rows, args, hw, command, started, final=False, code=code)
    add_ratios(rows)
    code_end = code_version()
    if code_end != code:
        code["at-end"] = code_end  # the tree changed while the benchmark ran
    text = _write_outputs(out, rows, args, hw, command, started, final=True, code=code)
    print()
    print(text)
    failed = [r["key"] for r in rows if not r["ok"]]
    if failed:
        say(f"{len(failed)} case(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def _write_outputs(out, rows, args, hw, command, started, final: bool, code: dict | None = None) -> str:
    main_rows = [r for r in rows if r["suite"] == "main"]
    scale_rows = [r for r in rows if r["suite"] == "scaling"]
    central_rows = [r for r in rows if r["suite"] == "central"]
    targets = evaluate_targets(rows, args.clients, args.rounds)
    sections = [
        f"command: {command}",
        f"hardware: {hw['cpus']} CPUs ({hw['cpu-model']}), {hw['memory-gib']} GiB RAM; python {hw['python']}, "
        f"flwr {hw.get('flwr')}, tensorflow {hw.get('tensorflow')}, numpy {hw.get('numpy')}, ray {hw.get('ray')}",
    ]
    if code and code.get("commit"):
        changed = code.get("changed") or []
        detail = f", changed files: {', '.join(changed)}" if changed else ""
        sections.append(f"code: commit {code['commit']}{detail}")
        if code.get("at-end"):
            sections.append(f"  (the working tree changed during the benchmark; at the end: {code['at-end']})")
    if main_rows:
        sections += [f"\n{args.clients} clients x {args.rounds} rounds, {args.samples_per_client} samples per client, "
                     f"d={args.features} (median of up to {args.repeat} runs; ratios are wall-clock, same mode):",
                     main_table(main_rows), MAIN_LEGEND]  # fmt: skip
    if central_rows:
        sections += ["\ncentral baselines on the pooled data (one process each):", central_table(central_rows)]
    if scale_rows:
        sections += ["\nscaling, simulation mode (updates/s = client updates in rounds 2..R / their time, the steady "
                     "state; e2e upd/s = clients x rounds / wall; vs floor = updates/s / the floor's):",
                     scaling_table(scale_rows)]  # fmt: skip
    sections += ["\ntargets (issue 4):", targets_table(targets)]
    text = "\n".join(sections)
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    write_csv(os.path.join(out, "bench.csv"), rows)
    payload = {
        "command": command,
        "started": started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds") if final else None,
        "hardware": hw,
        "code": code or {},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "cases": rows,
        "targets": targets,
    }
    with open(os.path.join(out, "bench.json"), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
    if final:
        plot_scaling(os.path.join(out, "scaling.png"), rows)
    return text


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default=os.path.join("~", "fedlinear-bench"),
                   help="output directory: data, runs, logs, table, CSV, JSON, PNG (default ~/fedlinear-bench; keep "
                   "it outside the app directory, which 'flwr run' walks file by file on every run)")  # fmt: skip
    p.add_argument("--only", help=f"comma list of parts to run: {', '.join(PARTS)} (default: all)")
    p.add_argument("--skip-scaling", action="store_true", help="leave out the scaling series")
    p.add_argument("--quick", action="store_true", help="a tiny smoke version: 2 clients x 2 rounds, scaling 2 and 4")
    p.add_argument("--clients", type=int, default=10, help="clients of the main runs (default 10)")
    p.add_argument("--rounds", type=int, default=20, help="rounds of the main runs (default 20)")
    p.add_argument("--samples-per-client", type=int, default=1000)
    p.add_argument("--features", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--engines", default="numpy,keras", help="fedlinear engines to run (default numpy,keras)")
    p.add_argument("--processes-engines", help="engines in processes mode (default: --engines)")
    p.add_argument("--skip-floor", action="store_true", help="leave out the no-op floor (no x floor ratios)")
    p.add_argument("--skip-quickstart", action="store_true", help="leave out the quickstart-style reference")
    p.add_argument("--quickstart-processes", action="store_true",
                   help="also run the quickstart-style reference in processes mode (~20 min for 10 x 20)")
    p.add_argument("--scaling-clients", default="10,100,1000,10000", help="client counts of the scaling series")
    p.add_argument("--max-clients", type=int, default=10000, help="leave out scaling points above this")
    p.add_argument("--scaling-rounds", type=int, default=3)
    p.add_argument("--scaling-samples", type=int, default=None,
                   help="samples per client in the scaling series (default: --samples-per-client up to 100 "
                   "clients, 100 above)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the table shows the median (default 3)")
    p.add_argument("--retries", type=int, default=1,
                   help="extra attempts for a case whose run failed or was noisy (default 1)")
    p.add_argument("--max-other-load", type=float, default=None, metavar="CORES",
                   help="treat a run as noisy, and retry it, when other processes on the machine used more than "
                   "this many cores on average while it ran (shared machines; default: off)")  # fmt: skip
    p.add_argument("--repeat-limit", type=float, default=120.0,
                   help="a case whose run takes longer than this many seconds is run once (default 120)")
    p.add_argument("--client-cpus", type=int, default=None,
                   help="passed to 'fedlinear run --client-cpus' in simulation (default: the launcher's)")
    p.add_argument("--timeout", type=float, default=7200.0, help="upper bound on one run, seconds")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to use < 0.25 cores "
                   "(for shared machines; the table's 'other' column shows the load they added anyway)")  # fmt: skip
    p.add_argument("--runner", default="fedlinear.scripts.cli", help=argparse.SUPPRESS)  # module run as `python -m X run ...`
    p.add_argument("--central-worker", choices=("lstsq", "keras"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)  # central worker only
    p.set_defaults(func=cmd_bench, argv=None)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fedlinear bench`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark fedlinear against Flower's floor and a quickstart-style app",
        description=__doc__.split("\n\n")[0],
    )
    return configure_parser(p)


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="fedlinear bench", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    args.argv = ["fedlinear", "bench", *(sys.argv[1:] if argv is None else argv)]
    try:
        return cmd_bench(args)
    except KeyboardInterrupt:
        print("fedlinear bench: interrupted; the running case was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
