"""The cases of one ``fedlinear bench`` invocation, their data, and running each one (a subprocess)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import fedlinear
from fedlinear.scripts.experiments.bench.measure import measure, wait_quiet
from fedlinear.scripts.experiments.datasets import made_once
from fedlinear.scripts.local.ray_env import RAY_ENV
from fedlinear.scripts.local.warm_clientapp import WARM_ENV

REPO = fedlinear.app_dir()  # a checkout's root: benchmarks/ holds the floor and the quickstart-style app
NOOP_APP = os.path.join(REPO, "benchmarks", "noop_app")
QUICKSTART_APP = os.path.join(REPO, "benchmarks", "quickstart_app")
PARTS = ("sim", "processes", "inline", "sweep", "scaling", "central")
MODE_LABEL = {"simulation": "sim", "processes": "processes", "inline": "inline", "local": "one process"}
SCALING_CLIENTS = "10,100,1000,10000"  # the defaults of --scaling-clients and --inline-scaling-clients
INLINE_SCALING_CLIENTS = "1000,10000"
ACCURACY_BAR = 1.01
GiB = 1024**3
MiB = 1024**2


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def ensure_data(path: str, clients: int, samples: int, features: int, noise: float, seed: int, test: int) -> str:
    """Synthetic shards in ``path`` (reused when already generated with the same parameters)."""
    params = {"clients": clients, "samples-per-client": samples, "features": features, "noise": noise,
              "seed": seed, "test-samples": test}  # fmt: skip
    from fedlinear.common.shards import write_synthetic

    t0 = time.monotonic()

    def make() -> None:
        os.makedirs(path)
        write_synthetic(path, clients, samples, features, noise, seed, test)  # its summary lines are not shown

    if made_once(path, "bench-data.json", params, make):
        say(f"data: {clients} clients x {samples} samples, d={features} -> {path} ({time.monotonic() - t0:.1f} s)")
    return path


def least_squares_reference(data_dir: str, clients: int) -> dict[str, float]:
    """Pooled least-squares fit of the shards and its test MSE (NumPy only)."""
    import numpy as np

    from fedlinear.common import model as lm
    from fedlinear.common.csvio import load_csv

    parts = [load_csv(os.path.join(data_dir, f"client-{i}.csv")) for i in range(clients)]
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    test = load_csv(os.path.join(data_dir, "test.csv"))
    weights = lm.lstsq_fit(x, y)
    return {"test-mse": lm.mse(weights, test.x, test.y), "train-mse": lm.mse(weights, x, y)}


def test_mse_of_npz(path: str, data_dir: str) -> float | None:
    import numpy as np

    from fedlinear.common import model as lm
    from fedlinear.common.csvio import load_csv

    if not os.path.exists(path):
        return None
    with np.load(path) as arrays:
        weights = lm.LinearWeights.from_dict({"kernel": arrays["kernel"], "bias": arrays["bias"]})
    test = load_csv(os.path.join(data_dir, "test.csv"))
    return lm.mse(weights, test.x, test.y)


# Inline mode's rows: fedlinear with --pool auto (worker processes from 256 nodes on) and serial. The no-op
# app run inline is the ceiling of the mode: Flower's serialization of every message and Flower's FedAvg,
# with no client work at all (what fedlinear inline cannot exceed), in both pools.
INLINE_LABELS = {
    "fedlinear-numpy": "fedlinear (inline)",
    "fedlinear-numpy-serial": "fedlinear (inline/serial)",
    "noop-inline": "no-op app (inline)",
    "noop-inline-procs": "no-op app (inline/procs)",
}
POOL_SERIAL = ("--pool", "serial")
POOL_PROCESSES = ("--pool", "processes")


@dataclasses.dataclass
class Case:
    suite: str  # "main" | "scaling" | "central" | "sweep"
    system: str  # "fedlinear-numpy", "fedlinear-keras", "floor", "floor-tuned", "floor-warm", "quickstart", "lstsq", "keras",
    # "sweep"; inline only: "fedlinear-numpy-serial" (--pool serial), "noop-inline", "noop-inline-procs" (the ceilings)
    mode: str  # "simulation" | "processes" | "local"
    clients: int
    rounds: int
    samples: int  # per client
    data_dir: str
    app: str | None = None
    sets: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the run (the tuned floors' Ray settings, warm ClientApps)
    argv: tuple[str, ...] = ()  # extra arguments of `fedlinear run` (inline: --pool)

    @property
    def key(self) -> str:
        return f"{self.suite}-{MODE_LABEL[self.mode].replace(' ', '')}-{self.system}-{self.clients}x{self.rounds}"

    @property
    def label(self) -> str:
        if self.mode == "inline" and self.system in INLINE_LABELS:
            return INLINE_LABELS[self.system]
        return {
            "fedlinear-numpy": "fedlinear (numpy)",
            "fedlinear-keras": "fedlinear (keras)",
            "floor": "floor (no-op app)",
            "floor-tuned": "floor + launcher Ray env",
            "floor-warm": "floor + warm ClientApps",
            "quickstart": "quickstart-style",
            "lstsq": "pooled lstsq (NumPy)",
            "keras": "centralized Keras",
            "sweep": "privacy/utility sweep",
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
        argv = [sys.executable, "-m", "fedlinear.scripts.experiments.bench.worker", "--central-worker", case.system, "--data", case.data_dir,
                "--clients", str(case.clients), "--rounds", str(case.rounds), "--out", run_dir]  # fmt: skip
    elif case.suite == "sweep":  # the whole `fedlinear sweep` command on its default (synthetic) data, made in run_dir
        argv = [sys.executable, "-m", args.runner, "sweep", "--mode", case.mode, "--out", run_dir,
                "--clients", str(case.clients), "--rounds", str(case.rounds), "--noise", args.sweep_noise,
                "--seeds", str(args.sweep_seeds), "--timeout", str(args.timeout)]  # fmt: skip
        for kv in case.sets:
            argv += ["--set", kv]
    else:
        argv = [sys.executable, "-m", args.runner, "run", "--data", case.data_dir, "--clients", str(case.clients),
                "--rounds", str(case.rounds), "--out", run_dir, "--mode", case.mode,
                "--timeout", str(args.timeout)]  # fmt: skip
        if case.app:
            argv += ["--app", case.app]
        argv += list(case.argv)
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
    env.update(dict(case.env))
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
        "peak-pss": m.peak_pss or None,
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
    if case.suite == "sweep":
        run.update(_sweep_figures(run_dir, args))
        if run.get("error"):
            run["ok"] = False
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
            if line.startswith("wall time ") and "fedlinear run " in line:  # the command's own total
                return float(line.split("fedlinear run ", 1)[1].split()[0])
    return None


def weights_digest(run_dir: str) -> str | None:
    """SHA-256 of the final weights in RUN_DIR/manifest.json (float64, as written): equal digests are
    bit-identical weights (e.g. inline vs simulation at the same seed). None without a manifest."""
    path = os.path.join(run_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        weights = json.load(handle).get("weights")
    if weights is None:
        return None
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:16]


def _sweep_figures(run_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a sweep case must have produced: its table (sweep.md), and one completed run per point x seed."""
    points = len(_csv_list(args.sweep_noise))
    expected = points * args.sweep_seeds
    out: dict[str, Any] = {"sweep-points": points, "sweep-seeds": args.sweep_seeds, "sweep-runs-expected": expected}
    csv_path = os.path.join(run_dir, "sweep.csv")
    if not os.path.exists(csv_path) or not os.path.exists(os.path.join(run_dir, "sweep.md")):
        out["error"] = f"no sweep.csv / sweep.md in {run_dir}"
        return out
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    completed = sum(1 for r in rows if r.get("status") == "completed")
    out["sweep-runs"] = completed
    if completed != expected:
        out["error"] = f"{completed} of {expected} sweep runs completed; see {csv_path}"
    return out


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
        out["weights-digest"] = weights_digest(run_dir)
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
    for field in ("wall-s", "peak-rss", "peak-pss", "round-s", "round1-s", "startup-s", "to-round1-s", "rounds-total-s",
                  "updates-per-s", "serverapp-s", "inner-wall-s", "pre-s", "post-s", "cpu-s", "other-load",
                  "fit-s", "import-s", "process-s"):  # fmt: skip
        value = median([r.get(field) for r in ok])
        if value is not None:
            row[field] = value
    row["wall-s-all"] = [r["wall-s"] for r in ok]
    digests = {r.get("weights-digest") for r in ok if r.get("weights-digest")}
    if digests:  # same seed, same data: every repeat must give the same weights
        row["weights-digest"] = digests.pop() if len(digests) == 1 else "varies"
    if case.suite == "sweep":
        row["sweep-runs"] = min(r.get("sweep-runs") or 0 for r in ok)
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
        if floor is None and row["mode"] == "inline":  # inline has no floor of its own: Flower's simulation engine's
            floor = index.get((row["suite"], "simulation", "floor", row["clients"], row["rounds"]))
        quick = index.get((row["suite"], row["mode"], "quickstart", row["clients"], row["rounds"]))
        if floor and row["system"] != "floor":
            row["x-floor"] = row["wall-s"] / floor["wall-s"]
            if row.get("rounds-total-s") and floor.get("rounds-total-s"):
                row["x-floor-rounds"] = row["rounds-total-s"] / floor["rounds-total-s"]
            if row.get("updates-per-s") and floor.get("updates-per-s"):
                row["updates-vs-floor"] = row["updates-per-s"] / floor["updates-per-s"]
        if quick and row["system"] != "quickstart":
            row["x-quickstart"] = row["wall-s"] / quick["wall-s"]
        sim = index.get((row["suite"], "simulation", "fedlinear-numpy", row["clients"], row["rounds"]))
        if row["mode"] == "inline" and sim and row.get("weights-digest") and sim.get("weights-digest"):
            # same data, same seed: inline must give simulation's weights bit for bit (issue 21)
            row["same-weights-as-sim"] = row["weights-digest"] == sim["weights-digest"] != "varies"


def plan(args: argparse.Namespace, out: str) -> tuple[list[Case], dict[str, tuple[str, int]]]:
    """The cases to run, and the data sets they need (name -> (dir, clients))."""
    if args.timeout is None:  # an explicit --timeout holds, --quick or not (a loaded CI machine needs more)
        args.timeout = 300.0 if args.quick else 7200.0
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
    last: list[Case] = []
    # processes mode runs --processes-rounds (5: issue 21's "processes 10 x 5"), its floor the same; its
    # cases run last (the slowest: what ran before is in the outputs, written after each case, if it is cut short)
    for part, mode, engs, r in (("sim", "simulation", engines, rounds),
                                ("processes", "processes", proc_engines, args.processes_rounds)):  # fmt: skip
        if part not in parts:
            continue
        into = last if mode == "processes" else cases
        for engine in engs:
            into.append(Case("main", f"fedlinear-{engine}", mode, n, r, samples, data_main,
                             sets=(f"engine={engine}",)))  # fmt: skip
        if not args.skip_floor:
            into.append(Case("main", "floor", mode, n, r, samples, data_main, app=NOOP_APP))
            if args.tuned_floor and mode == "processes":  # the floor given the launcher's warm ClientApps too
                into.append(Case("main", "floor-warm", mode, n, r, samples, data_main, app=NOOP_APP,
                                 env=((WARM_ENV, "1"),)))  # fmt: skip
        if not args.skip_quickstart and (mode == "simulation" or args.quickstart_processes):
            into.append(Case("main", "quickstart", mode, n, r, samples, data_main, app=QUICKSTART_APP))
    if "inline" in parts:  # the same cases in inline mode; their ratios are to the simulation floor
        cases.append(Case("main", "fedlinear-numpy", "inline", n, rounds, samples, data_main, sets=("engine=numpy",)))
        for count in sorted(int(c) for c in _csv_list(args.inline_scaling_clients)):
            per_client = args.scaling_samples or (args.samples_per_client if count <= 100 else 100)
            data_dir = data_main if (count, per_client) == (n, samples) else os.path.join(out, "data", f"scale-{count}x{per_client}")
            if data_dir != data_main:
                datasets[f"scale-{count}x{per_client}"] = (data_dir, count)
            sets = ("engine=numpy", f"round-timeout={args.timeout:g}")
            cases.append(Case("scaling", "fedlinear-numpy", "inline", count, args.scaling_rounds, per_client, data_dir,
                              sets=sets))  # fmt: skip
            cases.append(Case("scaling", "fedlinear-numpy-serial", "inline", count, args.scaling_rounds, per_client,
                              data_dir, sets=sets, argv=POOL_SERIAL))  # fmt: skip
            if not args.skip_floor:  # the ceilings: the no-op app inline, both pools
                cases.append(Case("scaling", "noop-inline", "inline", count, args.scaling_rounds, per_client, data_dir,
                                  app=NOOP_APP, argv=POOL_SERIAL))  # fmt: skip
                cases.append(Case("scaling", "noop-inline-procs", "inline", count, args.scaling_rounds, per_client,
                                  data_dir, app=NOOP_APP, argv=POOL_PROCESSES))  # fmt: skip
    if "sweep" in parts:  # `fedlinear sweep --mode inline` as a user runs it: its own default data, in its run dir
        cases.append(Case("sweep", "sweep", "inline", args.sweep_clients, args.sweep_rounds, 0, ""))
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
            systems = [("fedlinear-numpy", None, ())]
            if not args.skip_floor:
                systems.append(("floor", NOOP_APP, ()))
                if args.tuned_floor:  # the floor given the Ray settings fedlinear's launcher gives its own app
                    systems.append(("floor-tuned", NOOP_APP, tuple(sorted(RAY_ENV.items()))))
            for system, app, extra_env in systems:
                # a round of 10000 virtual clients can outlast fedlinear's default round-timeout (600 s);
                # the floor's FedAvg waits up to an hour per round, so give fedlinear the run's bound
                sets = ("engine=numpy", f"round-timeout={args.timeout:g}") if app is None else ()
                cases.append(Case("scaling", system, "simulation", count, args.scaling_rounds, per_client, data_dir,
                                  app=app, sets=sets, env=extra_env))  # fmt: skip
    return cases + last, datasets


# ---------------------------------------------------------------------------------------------
# The targets, declared: each names its case (suite, mode, system, clients, rounds: the sizes the issue
# states, so other sizes, e.g. --quick, leave a target "not run" rather than judging it on the wrong
# run), what is measured, against what (a case of the same invocation, or a fixed figure of the issue
# with its source) and the bound. tables.evaluate_targets() judges them; a case that did not run, or
# that lacks a figure the target ``requires``, gives "not run", never a pass.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    issue: int
    name: str
    case: tuple[str, str, str, Any, Any]  # (suite, mode, system, clients, rounds)
    metric: str  # "wall-ratio" | "updates-ratio" | "speedup" (to ``ref``), "wall-s" (to ``ref_value``), "peak-rss" (GiB)
    op: str  # "<=" | ">="
    limit: float  # the bound on the ratio (wall-ratio, updates-ratio, speedup, wall-s) or on GiB (peak-rss)
    ref: tuple[str, str, str, Any, Any] | None = None  # the reference case of the same invocation
    ref_value: float | None = None  # or a fixed reference figure (seconds)
    ref_label: str = ""
    requires: tuple[tuple[str, Any], ...] = ()  # (field, value) the case's row must have, e.g. the sweep's 15 runs
    # cases that bound what the target's case can reach here (the no-op app in the same mode): their
    # ratios to ``ref`` are shown beside the status, which they never change
    ceilings: tuple[tuple[str, str, str, Any, Any], ...] = ()


FLOOR_SIM_MAIN = ("main", "simulation", "floor", 10, 20)
TARGETS: tuple[Target, ...] = (
    # issue 21, acceptance (ratios within one invocation, medians of --repeat)
    Target(21, "inline 10x20 wall <= 0.3 x the floor", ("main", "inline", "fedlinear-numpy", 10, 20),
           "wall-ratio", "<=", 0.3, ref=FLOOR_SIM_MAIN),
    Target(21, "inline 10x20 peak RSS <= 1 GiB", ("main", "inline", "fedlinear-numpy", 10, 20),
           "peak-rss", "<=", 1.0),
    Target(21, "inline 1000x3 updates/s >= 10 x the floor's", ("scaling", "inline", "fedlinear-numpy", 1000, 3),
           "updates-ratio", ">=", 10.0, ref=("scaling", "simulation", "floor", 1000, 3),
           ceilings=(("scaling", "inline", "noop-inline", 1000, 3), ("scaling", "inline", "noop-inline-procs", 1000, 3))),
    Target(21, "inline 10000x3 wall <= 0.1 x 1835 s", ("scaling", "inline", "fedlinear-numpy", 10000, 3),
           "wall-s", "<=", 0.1, ref_value=1835.0, ref_label="simulation before issue 21"),
    Target(21, "inline 10000x3 peak RSS <= 2 GiB", ("scaling", "inline", "fedlinear-numpy", 10000, 3),
           "peak-rss", "<=", 2.0),
    Target(21, "sweep 5 points x 3 seeds wall <= 0.1 x 336 s", ("sweep", "inline", "sweep", 10, 20),
           "wall-s", "<=", 0.1, ref_value=336.0, ref_label="simulation sweep before issue 21",
           requires=(("sweep-runs", 15),)),
    Target(21, "simulation 10x20 wall <= 0.75 x the floor", ("main", "simulation", "fedlinear-numpy", 10, 20),
           "wall-ratio", "<=", 0.75, ref=FLOOR_SIM_MAIN),
    Target(21, "simulation 10x20 peak RSS <= 1.5 GiB", ("main", "simulation", "fedlinear-numpy", 10, 20),
           "peak-rss", "<=", 1.5),
    Target(21, "simulation 1000x3 updates/s >= 1.0 x the floor's", ("scaling", "simulation", "fedlinear-numpy", 1000, 3),
           "updates-ratio", ">=", 1.0, ref=("scaling", "simulation", "floor", 1000, 3)),
    Target(21, "processes 10x5 wall <= 1.1 x the floor", ("main", "processes", "fedlinear-numpy", 10, 5),
           "wall-ratio", "<=", 1.1, ref=("main", "processes", "floor", 10, 5)),
    # issue 4 (kept: the quickstart-style comparison and the processes-mode memory)
    Target(4, "simulation keras >= 3 x faster than quickstart", ("main", "simulation", "fedlinear-keras", 10, 20),
           "speedup", ">=", 3.0, ref=("main", "simulation", "quickstart", 10, 20)),
    Target(4, "simulation numpy >= 5 x faster than quickstart", ("main", "simulation", "fedlinear-numpy", 10, 20),
           "speedup", ">=", 5.0, ref=("main", "simulation", "quickstart", 10, 20)),
    Target(4, "processes numpy peak RSS <= 2.4 GiB", ("main", "processes", "fedlinear-numpy", 10, 5),
           "peak-rss", "<=", 2.425),
)  # fmt: skip
