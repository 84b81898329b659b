"""One ``fedlinear bench`` invocation: the plan, the data, every case, the outputs; and what was measured
on (the machine, the commit)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.experiments.bench.cases import INLINE_SCALING_CLIENTS, REPO, SCALING_CLIENTS, GiB, add_ratios, ensure_data, least_squares_reference, plan, run_case, say
from fedlinear.scripts.experiments.bench.tables import write_outputs


def run_bench(args: argparse.Namespace) -> int:
    """Every planned case, then the outputs; 1 if a case failed. ``args``: ``fedlinear bench``'s options."""
    if args.quick:
        args.clients, args.rounds, args.samples_per_client = 2, 2, 50
        args.test_samples = 200
        args.repeat = 1
        if args.scaling_clients == SCALING_CLIENTS:  # an explicit list (even an empty one) holds
            args.scaling_clients = "2,4"
        if args.inline_scaling_clients == INLINE_SCALING_CLIENTS:
            args.inline_scaling_clients = "4"
        args.scaling_rounds = 2
        args.scaling_samples = 50
        args.processes_rounds = 2
        args.sweep_noise, args.sweep_seeds, args.sweep_clients, args.sweep_rounds = "0,1", 1, 2, 2
    # args.timeout None (no --timeout) is settled by plan(): 300 s a run with --quick, else 7200 s
    out = os.path.abspath(os.path.expanduser(args.out))
    if out == REPO or out.startswith(REPO + os.sep):
        say(f"warning: {out} is inside the app directory {REPO}; 'flwr run' walks every file under it on each run, "
            "so the generated data slows every fedlinear run down")  # fmt: skip
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    cases, _ = plan(args, out)
    missing = sorted({case.app for case in cases if case.app and not os.path.isdir(case.app)})
    if missing:  # a wheel install ships no benchmarks/
        raise FedLinearError(
            f"fedlinear bench needs a checkout of the fedlinear repository: {missing[0]} is missing "
            "(an installed package has no benchmarks/; --skip-floor --skip-quickstart leave its apps out)"
        )
    hw = hardware()
    code = code_version()
    command = " ".join(args.argv) if args.argv else "fedlinear " + " ".join(sys.argv[1:])
    say(f"{len(cases)} cases; output in {out}")
    say(f"hardware: {hw['cpus']} CPUs ({hw['cpu-model']}), {hw['memory-gib']} GiB; flwr {hw.get('flwr')}, "
        f"tensorflow {hw.get('tensorflow')}")  # fmt: skip
    # data first (not timed), and the least-squares yardstick of each data set
    refs: dict[str, dict[str, float]] = {}
    for case in cases:
        if case.suite != "sweep" and case.data_dir not in refs:  # a sweep makes its own default data
            ensure_data(case.data_dir, case.clients if case.suite == "scaling" else args.clients, case.samples,
                        args.features, args.noise, args.seed, args.test_samples)  # fmt: skip
            refs[case.data_dir] = least_squares_reference(case.data_dir, case.clients)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows.append(run_case(case, args, out, refs.get(case.data_dir, {})))
        add_ratios(rows)
        write_outputs(out, rows, args, hw, command, started, final=False, code=code)
    add_ratios(rows)
    code_end = code_version()
    if code_end != code:
        code["at-end"] = code_end  # the tree changed while the benchmark ran
    text = write_outputs(out, rows, args, hw, command, started, final=True, code=code)
    print()
    print(text)
    failed = [r["key"] for r in rows if not r["ok"]]
    if failed:
        say(f"{len(failed)} case(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


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
