"""``fedlinear sweep``: what privacy costs, as one table and one plot (:mod:`fedlinear.scripts.experiments.sweep`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time

from fedlinear.common import exporter
from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.experiments import sweep
from fedlinear.scripts.experiments.sweep.grid import run_grid
from fedlinear.scripts.experiments.sweep.outputs import write_outputs
from fedlinear.scripts.experiments.sweep.runner import Runner, subprocess_runner
from fedlinear.scripts.experiments.sweep.settings import DEFAULT_DP, ensure_data, prepare_out, say, validate


def cmd_sweep(args: argparse.Namespace, runner: Runner | None = None) -> int:
    """The sweep; ``runner`` (tests) replaces the one ``--start`` chooses."""
    with contextlib.ExitStack() as stack:
        return _sweep(args, runner, stack)


def _sweep(args: argparse.Namespace, runner: Runner | None, stack: contextlib.ExitStack) -> int:
    started = time.monotonic()
    settings = validate(args)
    prepare_out(settings)
    if args.wait_quiet > 0:
        from fedlinear.scripts.experiments.bench.measure import wait_quiet

        load = wait_quiet(args.wait_quiet)
        say(f"other processes use {load:.2f} cores")
    if runner is None and settings.start == "fork":
        from fedlinear.scripts.experiments.sweep.forked import ForkRunner
        from fedlinear.scripts.experiments.sweep.grid import is_completed

        todo = sum(not is_completed(job.run_dir) for job in settings.jobs())
        if todo:  # started now: their imports overlap the data and the exporter's TensorFlow import
            runner = stack.enter_context(ForkRunner(settings, min(settings.parallel, todo)))
    runner = runner or subprocess_runner
    data = ensure_data(settings)
    jobs = settings.jobs()
    if settings.epsilons is not None:
        say(f"{len(settings.strategies)} strategies x {len(settings.epsilons)} target ε x {len(settings.seeds)} seeds = "
            f"{len(jobs)} runs, {settings.parallel} at a time; output in {settings.out}")  # fmt: skip
    else:
        say(f"{len(settings.noise)} noise levels x {len(settings.seeds)} seeds = {len(jobs)} runs, "
            f"{settings.parallel} at a time; output in {settings.out}")  # fmt: skip
    with exporter.shared(os.path.join(settings.out, "logs", "exporter.log")):  # one TensorFlow import for every run
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
        names = ", ".join(os.path.basename(r["run-dir"]) for r in failed)
        raise FedLinearError(
            f"{len(failed)} of {len(rows)} runs did not complete ({names}); see {settings.out}/sweep.csv; "
            f"run the same command again to retry them"
        )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fedlinear sweep`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "sweep",
        help="privacy/utility sweep: noise multipliers x seeds -> CSV, Markdown table, plot",
        description=sweep.__doc__.split("\n\n")[0],
    )
    p.add_argument("--noise", default="0,0.5,1,2,4",
                   help="comma list of DP noise multipliers z (0: the non-private run); default 0,0.5,1,2,4")
    p.add_argument("--epsilon", default=None,
                   help="comma list of target ε (e.g. 1,2,4,8; 0: the non-private run): each run's noise multiplier is "
                   "derived to spend exactly that ε (dp-target-epsilon), and --strategies are compared at equal ε "
                   "(instead of --noise)")  # fmt: skip
    p.add_argument("--strategies", default=None,
                   help="with --epsilon: comma list of fedavg (DP-FedAvg, --dp) and fedols (DP-FedOLS, "
                   "central-client-clip); default fedavg")  # fmt: skip
    p.add_argument("--table", default=None,
                   help="a public table instead of synthetic data: diabetes, longley, macrodata or fair "
                   "(scripts/experiments/realdata.py), split IID into --clients shards (default 4) in OUT/data")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="runs per noise level, seeds --first-seed.. (default 3)")
    p.add_argument("--first-seed", type=int, default=1, help="the first run seed (default 1)")
    p.add_argument("--data", help="directory or s3:// prefix with client-<i>.csv (+ test.csv); default: synthetic "
                   "data made once into OUT/data")  # fmt: skip
    p.add_argument("--clients", type=int, default=None, help="clients per run (default: 10 synthetic, or all shards)")
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (default 20)")
    p.add_argument("--out", required=True, help="sweep directory: data, runs/, logs/, sweep.csv, sweep.md, sweep.png")
    p.add_argument("--mode", choices=("simulation", "processes", "inline"), default="simulation",
                   help="how each run is launched (default simulation; inline: the fastest, see 'fedlinear run --mode')")  # fmt: skip
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
    p.add_argument("--start", choices=("auto", "fork", "process"), default="auto",
                   help="how each run's process starts: fork: forked from a warm worker that imported fedlinear once "
                   "(inline mode; ~3x fewer CPU-seconds a run); process: a fresh 'python -m fedlinear run'; "
                   "default auto: fork for --mode inline, else process")  # fmt: skip
    p.add_argument("--runner", default="fedlinear.scripts.cli", help=argparse.SUPPRESS)  # module run as `python -m X run ...`
    p.set_defaults(func=cmd_sweep)
    return p
