"""``fedlinear sweep``: what privacy costs, as one table and one plot.

Runs the grid noise multiplier x seed, each point one ``fedlinear run`` (a subprocess, its own run
directory ``OUT/runs/z<noise>-s<seed>``), all on ONE data set: ``--data DIR``, or synthetic data made
once into ``OUT/data`` (the default data of ``fedlinear run``: d=10, 1000 samples per client, label
noise 0.1, data seed 42). A noise multiplier of 0 is the non-private run (``dp=none``); any other is
``dp=<--dp>`` (default ``central-server-clip``) with ``dp-noise-multiplier=<noise>``; ``--set`` keys
are passed to every run (``dp-*`` keys to the private runs only).

Several runs go at a time (``--parallel``; default: as many as the machine holds, ~1 core and
~1.5 GiB per simulation run), each bounded by ``--timeout``; a failed run is reported and the sweep
goes on. Run the same command again to resume: completed runs are kept (not rerun), failed or
interrupted ones are moved to ``OUT/attempts/`` and run again, and the grid may grow (more noise
levels, more seeds) as long as the data, clients, rounds, mode and settings stay the same.

Writes ``OUT/sweep.csv`` (one row per run), ``OUT/sweep.md`` (per noise level: the final test MSE
over the pooled least-squares test MSE, mean, std and min-max over seeds; the final epsilon; runs
completed) and ``OUT/sweep.png`` (that ratio against the final epsilon, log x-axis, with the
non-private run and the optimum as reference lines), and prints the table and the total wall time.

    fedlinear sweep --noise 0,0.5,1,2,4 --seeds 3 --out sweep-results
    fedlinear sweep --noise 0,1 --seeds 2 --data DIR --rounds 10 --set dp-clipping-norm=0.5 --out s2
"""

from __future__ import annotations

import textwrap
import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from fedlinear.common.errors import FedLinearError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3
DEFAULT_DP = "central-server-clip"
# what one run needs: simulation ~1 core and ~1.5 GiB (flwr-simulation, one Ray actor, SuperLink,
# the fedlinear command); processes mode: N SuperNodes plus a clientapp process per task
RUN_MEMORY = {"simulation": 1.5 * GiB, "processes": 2.5 * GiB}
# keys the sweep sets itself; --set may not give them
RESERVED = {
    "dp": "the sweep sets it per noise level (use --dp for the mechanism)",
    "dp-noise-multiplier": "use --noise",
    "seed": "use --seeds / --first-seed",
    "num-server-rounds": "use --rounds",
    "run-dir": "each run has its own under OUT/runs",
    "data-uri": "use --data",
}
# settings that must match when a sweep directory is resumed (the grid itself may grow)
TIMEOUT_GRACE = 120.0  # a run's command may take this long beyond --timeout (start-up, export, teardown)
STOP_GRACE = 15.0  # on Ctrl-C, seconds a run's command may take to stop by itself before it is signalled
FIXED = ("data", "clients", "rounds", "mode", "dp", "sets")
SYNTH = {"samples_per_client": 1000, "features": 10, "noise": 0.1, "seed": 42, "test_samples": 2000}
CSV_FIELDS = ("noise", "seed", "status", "epsilon", "delta", "test-mse", "mse-ratio", "reference-test-mse",
              "rounds", "stopped", "wall-s", "resumed", "run-dir", "error")  # fmt: skip


def say(text: str) -> None:
    print(f"[sweep] {text}", flush=True)


# ----------------------------------------------------------------------------------------------
# Parsing and validation
# ----------------------------------------------------------------------------------------------


def parse_noise(text: str) -> list[float]:
    """``0,0.5,1,2,4`` -> sorted distinct noise multipliers (each finite and >= 0)."""
    values: list[float] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise FedLinearError(f"--noise takes a comma list of noise multipliers like 0,0.5,1,2,4; got '{text}'")
        try:
            value = float(item)
        except ValueError:
            raise FedLinearError(f"--noise: '{item}' is not a number (a comma list like 0,0.5,1,2,4)") from None
        if not math.isfinite(value):
            raise FedLinearError(f"--noise: '{item}' is not a finite number")
        if value < 0:
            raise FedLinearError(f"--noise: {item} is negative; a noise multiplier is >= 0 (0 = no DP)")
        if value in values:
            raise FedLinearError(f"--noise: {item} is given twice")
        values.append(value)
    return sorted(values)


def noise_label(noise: float) -> str:
    return f"{noise:g}"


def run_name(noise: float, seed: int) -> str:
    return f"z{noise_label(noise)}-s{seed}"


@dataclasses.dataclass(frozen=True)
class Job:
    noise: float
    seed: int
    run_dir: str

    @property
    def name(self) -> str:
        return run_name(self.noise, self.seed)


@dataclasses.dataclass
class Settings:
    """A validated sweep: everything needed to start its runs."""

    out: str
    noise: list[float]
    seeds: list[int]
    data: str | None  # None: synthetic data into OUT/data
    clients: int | None  # None with --data: every shard
    rounds: int
    mode: str
    dp: str
    sets: list[str]  # raw key=value strings, validated
    parallel: int
    timeout: float
    ray_cpus: int | None  # simulation: per run (default: cores / parallel)
    runner_module: str = "fedlinear.scripts.cli"

    @property
    def data_dir(self) -> str:
        return self.data or os.path.join(self.out, "data")

    def jobs(self) -> list[Job]:
        return [
            Job(z, s, os.path.join(self.out, "runs", run_name(z, s))) for z in self.noise for s in self.seeds
        ]

    def fixed(self) -> dict[str, Any]:
        return {
            "data": self.data_dir,
            "clients": self.clients,
            "rounds": self.rounds,
            "mode": self.mode,
            "dp": self.dp,
            "sets": sorted(self.sets),
        }


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_parallel(mode: str, cores: int | None = None, available: int | None = None) -> int:
    """Runs at a time that fit on this machine: one core and RUN_MEMORY[mode] each."""
    if cores is None:
        cores = usable_cores()
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    return max(1, min(cores, int(available // RUN_MEMORY[mode])))


def validate(args: argparse.Namespace) -> Settings:
    """Check everything a user can get wrong, before anything runs; one-line errors."""
    from fedlinear.common import storage
    from fedlinear.common.config import parse_assignments

    noise = parse_noise(args.noise)
    if args.seeds < 1:
        raise FedLinearError(f"--seeds must be >= 1 (runs per noise level), got {args.seeds}")
    if args.rounds < 1:
        raise FedLinearError(f"--rounds must be >= 1, got {args.rounds}")
    if args.clients is not None and args.clients < 1:
        raise FedLinearError(f"--clients must be >= 1, got {args.clients}")
    if args.parallel is not None and args.parallel < 1:
        raise FedLinearError(f"--parallel must be >= 1, got {args.parallel}")
    if not args.timeout > 0:
        raise FedLinearError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise FedLinearError(f"--ray-cpus must be >= 1, got {args.ray_cpus}")
    if not args.dp or args.dp == "none":
        raise FedLinearError("--dp names the mechanism of the private runs (noise > 0), e.g. central-server-clip")
    sets = list(args.set or [])
    for item in sets:
        key = item.split("=", 1)[0].strip()
        if key in RESERVED:
            raise FedLinearError(f"--set {key}: {RESERVED[key]}")
    parse_assignments(sets)  # unknown keys, bad values: one line, now, not in every run
    if storage.is_s3(args.out):
        raise FedLinearError(f"--out must be a local directory (the sweep writes its table and plot there): {args.out}")
    out = os.path.abspath(os.path.expanduser(args.out))
    data = None
    if args.data:
        data = args.data if storage.is_s3(args.data) else os.path.abspath(os.path.expanduser(args.data))
        from fedlinear.common.shards import find_shards

        shards = find_shards(data)
        if args.clients is not None and args.clients > len(shards):
            raise FedLinearError(f"--clients {args.clients} but {data} has only {len(shards)} shards")
    parallel = args.parallel or default_parallel(args.mode)
    return Settings(
        out=out,
        noise=noise,
        seeds=[args.first_seed + i for i in range(args.seeds)],
        data=data,
        clients=args.clients if (args.clients is not None or data) else 10,
        rounds=args.rounds,
        mode=args.mode,
        dp=args.dp,
        sets=sets,
        parallel=parallel,
        timeout=float(args.timeout),
        ray_cpus=args.ray_cpus,
        runner_module=getattr(args, "runner", "fedlinear.scripts.cli"),
    )


def prepare_out(settings: Settings) -> None:
    """Create OUT (or find it unwritable), and check a resumed sweep has the same fixed settings."""
    try:
        for sub in ("runs", "logs"):
            os.makedirs(os.path.join(settings.out, sub), exist_ok=True)
        probe = os.path.join(settings.out, ".write-test")
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok\n")
        os.remove(probe)
    except OSError as exc:
        raise FedLinearError(f"--out {settings.out}: cannot write there ({exc.strerror or exc})") from None
    path = os.path.join(settings.out, "sweep.json")
    fixed = settings.fixed()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            before = json.load(handle).get("fixed", {})
        differ = [k for k in FIXED if k in before and before[k] != fixed[k]]
        if differ:
            k = differ[0]
            raise FedLinearError(
                f"{settings.out} holds a sweep with {k} = {before[k]!r}, not {fixed[k]!r}; its completed runs "
                f"would not be comparable: choose another --out (or the same settings to resume it)"
            )
    record = {"fixed": fixed, "noise": settings.noise, "seeds": settings.seeds}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def ensure_data(settings: Settings) -> str:
    """The one data set of the sweep: --data, or synthetic shards made once into OUT/data."""
    if settings.data:
        return settings.data
    path = settings.data_dir
    params = {"clients": settings.clients, **SYNTH}
    marker = os.path.join(path, "sweep-data.json")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle) == params:
                return path
    from fedlinear.common.shards import write_synthetic

    if os.path.isdir(path):
        shutil.rmtree(path)
    for line in write_synthetic(path, settings.clients, **SYNTH):
        print(line)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(params, handle)
    return path


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


def run_sets(settings: Settings, job: Job) -> list[str]:
    """The ``--set`` arguments of one run: the mechanism, its noise, the seed, the user's keys."""
    if job.noise == 0:
        user = [kv for kv in settings.sets if not kv.split("=", 1)[0].strip().startswith("dp-")]
        return ["dp=none", f"seed={job.seed}", *user]
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


def _kill_tree(procs: list, grace: float = 5.0) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


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
                        _kill_tree(procs)
                        proc.wait(timeout=10)
                left = [p for p in procs[1:] if _alive(p)]
                if left:
                    _kill_tree(left)
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


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ----------------------------------------------------------------------------------------------
# Reading a run directory
# ----------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def is_completed(run_dir: str) -> bool:
    status = _read_json(os.path.join(run_dir, "status.json"))
    manifest = _read_json(os.path.join(run_dir, "manifest.json"))
    return bool(status and status.get("status") == "completed" and manifest and isinstance(manifest.get("final"), dict))


def read_result(job: Job) -> dict[str, Any]:
    """One CSV row from a run directory: status, final epsilon, test MSE, ratio to least squares."""
    row: dict[str, Any] = {"noise": job.noise, "seed": job.seed, "run-dir": job.run_dir}
    status = _read_json(os.path.join(job.run_dir, "status.json")) or {}
    manifest = _read_json(os.path.join(job.run_dir, "manifest.json")) or {}
    history = _read_json(os.path.join(job.run_dir, "history.json")) or {}
    rounds = [r for r in history.get("rounds", []) if isinstance(r, dict)]
    last = rounds[-1] if rounds else {}
    final = manifest.get("final") if isinstance(manifest.get("final"), dict) else {}
    privacy = manifest.get("privacy") if isinstance(manifest.get("privacy"), dict) else {}
    row["status"] = status.get("status") or "missing"
    if row["status"] != "completed" and status.get("message"):
        row["error"] = " ".join(str(status["message"]).split())[:400]
    numbers = [int(r["round"]) for r in rounds if _num(r.get("round")) is not None]
    row["rounds"] = max(numbers) if numbers else None  # the last round trained (round 0: the initial model)

    def first(*values: Any) -> float | None:
        for value in values:
            if _num(value) is not None:
                return _num(value)
        return None

    row["test-mse"] = first(final.get("test-mse"), last.get("test-mse"))
    row["reference-test-mse"] = first(
        final.get("reference-test-mse"), (manifest.get("reference") or {}).get("test-mse") if isinstance(
            manifest.get("reference"), dict) else None, (history.get("reference") or {}).get("test-mse")
    )  # fmt: skip
    ratio = first(final.get("test-mse-ratio"), last.get("test-mse-ratio"))
    if ratio is None and row["test-mse"] is not None and row["reference-test-mse"]:
        ratio = row["test-mse"] / row["reference-test-mse"]
    row["mse-ratio"] = ratio
    row["epsilon"] = first(privacy.get("epsilon"), final.get("epsilon"), last.get("epsilon"))
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    row["delta"] = first(privacy.get("delta"), config.get("dp-delta")) if job.noise > 0 else None
    if privacy.get("stopped"):  # e.g. dp-max-epsilon reached: fewer rounds than asked for
        row["stopped"] = " ".join(str(privacy["stopped"]).split())[:200]
    return row


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------


def _record_path(settings: Settings, job: Job) -> str:
    return os.path.join(settings.out, "logs", f"{job.name}.json")


def _move_aside(settings: Settings, job: Job) -> str | None:
    """A failed or interrupted run directory goes to OUT/attempts/<name>-<k> (kept for its logs)."""
    if not os.path.exists(job.run_dir):
        return None
    attempts = os.path.join(settings.out, "attempts")
    os.makedirs(attempts, exist_ok=True)
    k = 1
    while os.path.exists(os.path.join(attempts, f"{job.name}-{k}")):
        k += 1
    dest = os.path.join(attempts, f"{job.name}-{k}")
    os.replace(job.run_dir, dest)
    return dest


def run_job(settings: Settings, job: Job, data: str, runner: Runner, stop: threading.Event) -> dict[str, Any]:
    moved = _move_aside(settings, job)
    if moved:
        say(f"{job.name}: an earlier attempt did not complete; moved it to {moved} and running again")
    outcome = runner(settings, job, data, stop)
    row = read_result(job)
    row["wall-s"] = outcome.wall_s
    row["resumed"] = False
    if outcome.timed_out:
        row["status"] = "timeout"
    if row["status"] == "completed" and outcome.returncode not in (0, None):
        row["status"] = "failed"
    if row["status"] != "completed":
        if row["status"] in ("missing", "running"):
            row["status"] = "interrupted" if stop.is_set() else "failed"
        row["error"] = outcome.error or row.get("error") or "the run did not complete"
    with open(_record_path(settings, job), "w", encoding="utf-8") as handle:
        json.dump({"wall-s": outcome.wall_s, "returncode": outcome.returncode, "error": outcome.error}, handle)
    return row


def run_grid(
    settings: Settings,
    data: str,
    runner: Runner = subprocess_runner,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every grid point: completed ones read back, the rest run, ``settings.parallel`` at a time.

    Returns one row per job, in grid order. Ctrl-C stops the running ones (each gets SIGINT, then
    its tree is killed) and re-raises after the rows so far are passed to ``on_row``.
    """
    jobs = settings.jobs()
    rows: dict[Job, dict[str, Any]] = {}
    todo: list[Job] = []
    for job in jobs:
        if is_completed(job.run_dir):
            row = read_result(job)
            row["resumed"] = True
            record = _read_json(_record_path(settings, job)) or {}
            row["wall-s"] = _num(record.get("wall-s"))
            rows[job] = row
        else:
            todo.append(job)
    if len(todo) < len(jobs):
        say(f"{len(jobs) - len(todo)} of {len(jobs)} runs completed earlier: kept, not rerun")

    def ordered() -> list[dict[str, Any]]:
        return [rows[j] for j in jobs if j in rows]

    if on_row:
        on_row(ordered())
    stop = threading.Event()
    done = len(jobs) - len(todo)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.parallel, thread_name_prefix="sweep")
    try:
        futures = {pool.submit(run_job, settings, job, data, runner, stop): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - one run's trouble must not end the sweep
                row = {"noise": job.noise, "seed": job.seed, "run-dir": job.run_dir, "status": "failed",
                       "error": f"{type(exc).__name__}: {exc}", "resumed": False}  # fmt: skip
            rows[job] = row
            done += 1
            say(f"{job.name} ({done}/{len(jobs)}): {describe(row)}")
            if on_row:
                on_row(ordered())
    except KeyboardInterrupt:
        stop.set()
        say("interrupted: stopping the running runs")
        pool.shutdown(wait=True, cancel_futures=True)
        if on_row:
            on_row(ordered())
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return ordered()


def describe(row: dict[str, Any]) -> str:
    if row.get("status") != "completed":
        return f"{str(row.get('status', 'failed')).upper()}: {row.get('error') or ''}".rstrip(": ")
    parts = ["completed"]
    if row.get("wall-s") is not None:
        parts[0] += f" in {row['wall-s']:.1f} s"
    eps = row.get("epsilon")
    parts.append(f"epsilon {eps:.4g}" if eps is not None else "no epsilon (non-private)")
    if row.get("mse-ratio") is not None:
        parts.append(f"MSE / LS {row['mse-ratio']:.5g}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Aggregation and outputs
# ----------------------------------------------------------------------------------------------


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per noise level: runs, completed, ratio mean/std/min/max over seeds, epsilon, delta."""
    by_noise: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        by_noise.setdefault(float(row["noise"]), []).append(row)
    out = []
    for noise in sorted(by_noise):
        group = by_noise[noise]
        ok = [r for r in group if r.get("status") == "completed"]
        ratios = [r["mse-ratio"] for r in ok if r.get("mse-ratio") is not None]
        mses = [r["test-mse"] for r in ok if r.get("test-mse") is not None]
        eps = [r["epsilon"] for r in ok if r.get("epsilon") is not None]
        deltas = sorted({r["delta"] for r in ok if r.get("delta") is not None})
        walls = [r["wall-s"] for r in group if r.get("wall-s") is not None and r.get("status") == "completed"]
        level: dict[str, Any] = {
            "noise": noise,
            "private": noise > 0,
            "runs": len(group),
            "completed": len(ok),
            "failed": len(group) - len(ok),
            "ratio-n": len(ratios),
            "ratio-mean": statistics.fmean(ratios) if ratios else None,
            "ratio-std": statistics.stdev(ratios) if len(ratios) >= 2 else None,
            "ratio-min": min(ratios) if ratios else None,
            "ratio-max": max(ratios) if ratios else None,
            "test-mse-mean": statistics.fmean(mses) if mses else None,
            "epsilon": statistics.fmean(eps) if eps else None,
            "epsilon-min": min(eps) if eps else None,
            "epsilon-max": max(eps) if eps else None,
            "deltas": deltas,
            "wall-s-mean": statistics.fmean(walls) if walls else None,
        }
        out.append(level)
    return out


def _g(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


def _eps_cell(level: dict[str, Any]) -> str:
    if not level["private"]:
        return "∞ (no DP)"
    if level["epsilon"] is None:
        return "-"
    lo, hi = level["epsilon-min"], level["epsilon-max"]
    if hi - lo > 1e-9 * max(1.0, abs(hi)):
        return f"{level['epsilon']:.4g} ({lo:.4g}-{hi:.4g})"
    return f"{level['epsilon']:.4g}"


def delta_label(levels: list[dict[str, Any]]) -> str:
    deltas = sorted({d for lv in levels for d in lv["deltas"]})
    if not deltas:
        return "δ: -"
    return "δ = " + ", ".join(f"{d:.3g}".replace("e-0", "e-").replace("e+0", "e+") for d in deltas)


def markdown_table(levels: list[dict[str, Any]], title: str = "") -> str:
    """The per-noise-level table (GitHub Markdown)."""
    lines = []
    if title:
        lines += [title, ""]
    lines += [
        f"| noise z | final ε ({delta_label(levels)}) | runs completed | MSE / LS mean | std | min | max "
        "| test MSE mean | wall s mean |",
        "| ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in levels:
        lines.append(
            f"| {noise_label(lv['noise'])} | {_eps_cell(lv)} | {lv['completed']}/{lv['runs']} "
            f"| {_g(lv['ratio-mean'], '.5g')} | {_g(lv['ratio-std'], '.3g')} | {_g(lv['ratio-min'], '.5g')} "
            f"| {_g(lv['ratio-max'], '.5g')} | {_g(lv['test-mse-mean'], '.5g')} | {_g(lv['wall-s-mean'], '.1f')} |"
        )
    lines += [
        "",
        "MSE / LS: final test MSE over the pooled least-squares test MSE (1 = the optimum); mean, sample std and "
        "min-max over the completed seeds. ε: the final ε of the run (the same for every seed unless a run stopped "
        "early; otherwise mean (min-max)). z = 0 is the non-private run (dp = none).",
    ]
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    os.replace(tmp, path)


def plot(path: str, levels: list[dict[str, Any]], title: str = "") -> bool:
    """sweep.png: MSE / LS (mean, min-max bars) against the final ε (log x); reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    private = [lv for lv in levels if lv["private"] and lv["epsilon"] is not None and lv["ratio-mean"] is not None]
    public = [lv for lv in levels if not lv["private"] and lv["ratio-mean"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ratios = [1.0]
    if private:
        xs = [lv["epsilon"] for lv in private]
        ys = [lv["ratio-mean"] for lv in private]
        lo = [lv["ratio-mean"] - lv["ratio-min"] for lv in private]
        hi = [lv["ratio-max"] - lv["ratio-mean"] for lv in private]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=4, color="tab:blue",
                    label="DP runs: mean over seeds (bars: min-max)")  # fmt: skip
        for lv in private:
            ax.annotate(f"z={noise_label(lv['noise'])}", (lv["epsilon"], lv["ratio-mean"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)  # fmt: skip
        ratios += [lv["ratio-max"] for lv in private]
        ax.set_xscale("log")
    else:
        ax.set_xscale("log")
        ax.set_xlim(0.1, 100)
        ax.text(0.5, 0.5, "no completed private run with an ε", transform=ax.transAxes, ha="center", color="gray")
    if public:
        lv = public[0]
        ax.axhline(lv["ratio-mean"], color="tab:green", linestyle="--",
                   label=f"non-private (dp = none): {lv['ratio-mean']:.4g}, mean of {lv['ratio-n']}")  # fmt: skip
        if lv["ratio-max"] > lv["ratio-min"]:
            ax.axhspan(lv["ratio-min"], lv["ratio-max"], color="tab:green", alpha=0.12)
        ratios.append(lv["ratio-max"])
    ax.axhline(1.0, color="black", linestyle=":", label="optimum: pooled least squares (ratio 1)")
    if max(ratios) > 5:
        ax.set_yscale("log")
    ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(ticks)
    lo_x, hi_x = ax.get_xlim()
    few_decades = lo_x > 0 and math.log10(hi_x / lo_x) <= 2
    ax.xaxis.set_minor_formatter(ticks if few_decades else matplotlib.ticker.NullFormatter())
    if ax.get_yscale() == "log":
        lo_y, hi_y = ax.get_ylim()
        ax.yaxis.set_major_formatter(ticks)
        few = lo_y > 0 and math.log10(hi_y / lo_y) <= 1.3
        ax.yaxis.set_minor_formatter(ticks if few else matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"final ε ({delta_label(levels)}), log scale")
    ax.set_ylabel("final test MSE / pooled least-squares test MSE")
    ax.set_title("\n".join(textwrap.wrap(title or "privacy / utility", 90)), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def describe_sweep(settings: Settings) -> str:
    clients = f"{settings.clients} clients" if settings.clients else "all shards"
    seeds = settings.seeds
    seed_text = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    extra = f", --set {' '.join(settings.sets)}" if settings.sets else ""
    return (f"privacy/utility sweep: {clients} x {settings.rounds} rounds, {settings.mode}, dp = {settings.dp}, "
            f"{seed_text}{extra}; data {settings.data_dir}")  # fmt: skip


def write_outputs(settings: Settings, rows: list[dict[str, Any]], final: bool) -> str:
    write_csv(os.path.join(settings.out, "sweep.csv"), rows)
    levels = aggregate(rows)
    text = markdown_table(levels, title=f"**{describe_sweep(settings)}**")
    with open(os.path.join(settings.out, "sweep.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    if final:
        plot(os.path.join(settings.out, "sweep.png"), levels, title=describe_sweep(settings))
    return text


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace, runner: Runner = subprocess_runner) -> int:
    started = time.monotonic()
    settings = validate(args)
    prepare_out(settings)
    if args.wait_quiet > 0:
        from fedlinear.scripts.experiments.bench.measure import wait_quiet

        load = wait_quiet(args.wait_quiet)
        say(f"other processes use {load:.2f} cores")
    data = ensure_data(settings)
    jobs = settings.jobs()
    say(f"{len(settings.noise)} noise levels x {len(settings.seeds)} seeds = {len(jobs)} runs, "
        f"{settings.parallel} at a time; output in {settings.out}")  # fmt: skip
    rows = run_grid(settings, data, runner, on_row=lambda rows: write_outputs(settings, rows, final=False))
    text = write_outputs(settings, rows, final=True)
    wall = time.monotonic() - started
    print()
    print(text)
    print()
    print(f"wrote {settings.out}/sweep.csv, sweep.md, sweep.png")
    print(f"total wall time {wall:.1f} s ({len(jobs)} runs, {settings.parallel} at a time)")
    failed = [r for r in rows if r.get("status") != "completed"]
    if failed:
        names = ", ".join(run_name(r["noise"], r["seed"]) for r in failed)
        raise FedLinearError(
            f"{len(failed)} of {len(rows)} runs did not complete ({names}); see {settings.out}/sweep.csv; "
            f"run the same command again to retry them"
        )
    return 0


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--noise", default="0,0.5,1,2,4",
                   help="comma list of DP noise multipliers z (0: the non-private run); default 0,0.5,1,2,4")
    p.add_argument("--seeds", type=int, default=3, help="runs per noise level, seeds --first-seed.. (default 3)")
    p.add_argument("--first-seed", type=int, default=1, help="the first run seed (default 1)")
    p.add_argument("--data", help="directory or s3:// prefix with client-<i>.csv (+ test.csv); default: synthetic "
                   "data made once into OUT/data")  # fmt: skip
    p.add_argument("--clients", type=int, default=None, help="clients per run (default: 10 synthetic, or all shards)")
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (default 20)")
    p.add_argument("--out", required=True, help="sweep directory: data, runs/, logs/, sweep.csv, sweep.md, sweep.png")
    p.add_argument("--mode", choices=("simulation", "processes"), default="simulation",
                   help="how each run is launched (default simulation)")  # fmt: skip
    p.add_argument("--dp", default=DEFAULT_DP, help=f"the mechanism of the private runs (default {DEFAULT_DP})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a run config key for every run (repeatable); dp-* keys go to the private runs only")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs at a time (default: what fits: one core and ~1.5 GiB per simulation run, "
                   "2.5 GiB per processes run)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800.0, help="upper bound on one run, seconds (default 1800)")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="simulation: CPUs each run's Ray hands out (default: cores / --parallel)")  # fmt: skip
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before the sweep, wait up to this long for other processes to use < 0.25 cores")  # fmt: skip
    p.add_argument("--runner", default="fedlinear.scripts.cli", help=argparse.SUPPRESS)  # module run as `python -m X run ...`
    p.set_defaults(func=cmd_sweep)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fedlinear sweep`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "sweep",
        help="privacy/utility sweep: noise multipliers x seeds -> CSV, Markdown table, plot",
        description=__doc__.split("\n\n")[0],
    )
    return configure_parser(p)
