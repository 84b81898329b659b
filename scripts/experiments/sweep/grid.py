"""The grid: completed runs read back (a sweep resumes), the rest run a few at a time, one CSV row each."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import threading
from collections.abc import Callable
from typing import Any

from fedlinear.scripts.experiments.sweep.runner import Runner, subprocess_runner
from fedlinear.scripts.experiments.sweep.settings import Job, Settings, say


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


def base_row(job: Job) -> dict[str, Any]:
    """A run's identity in the CSV (``--epsilon``: the strategy and the target ε too)."""
    row: dict[str, Any] = {"noise": job.noise, "seed": job.seed, "run-dir": job.run_dir}
    if job.epsilon is not None:
        row.update({"strategy": job.strategy, "target-epsilon": job.epsilon})
    return row


def read_result(job: Job) -> dict[str, Any]:
    """One CSV row from a run directory: status, final epsilon, test MSE, ratio to least squares."""
    row = base_row(job)
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
    row["delta"] = first(privacy.get("delta"), config.get("dp-delta")) if job.private else None
    if job.epsilon is not None and job.private:
        row["noise"] = first(privacy.get("noise-multiplier"))  # derived from the target ε by the run
    if privacy.get("stopped"):  # e.g. dp-max-epsilon reached: fewer rounds than asked for
        row["stopped"] = " ".join(str(privacy["stopped"]).split())[:200]
    return row


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
                row = {**base_row(job), "status": "failed", "error": f"{type(exc).__name__}: {exc}", "resumed": False}
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
