"""``fedlinear bench``: the benchmark's options (the benchmark itself: :mod:`fedlinear.scripts.experiments.bench`)."""

from __future__ import annotations

import argparse
import os

from fedlinear.scripts.experiments import bench
from fedlinear.scripts.experiments.bench.cases import INLINE_SCALING_CLIENTS, PARTS, SCALING_CLIENTS


def cmd_bench(args: argparse.Namespace) -> int:
    if args.central_worker:  # what the benchmark spawns is the worker module itself; this stays for callers of the flag
        from fedlinear.scripts.experiments.bench.worker import central_worker

        return central_worker(args)
    from fedlinear.scripts.experiments.bench.harness import run_bench

    return run_bench(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fedlinear bench`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark fedlinear against Flower's floor and a quickstart-style app",
        description=bench.__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default=os.path.join("~", "fedlinear-bench"),
                   help="output directory: data, runs, logs, table, CSV, JSON, PNG (default ~/fedlinear-bench; keep "
                   "it outside the app directory, which 'flwr run' walks file by file on every run)")  # fmt: skip
    p.add_argument("--only", help=f"comma list of parts to run: {', '.join(PARTS)} (default: all)")
    p.add_argument("--skip-scaling", action="store_true", help="leave out the scaling series")
    p.add_argument("--quick", action="store_true",
                   help="a tiny smoke version: 2 clients x 2 rounds, scaling 2 and 4, a 2-point x 1-seed sweep")
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
    p.add_argument("--tuned-floor", action="store_true",
                   help="also run the floor with what fedlinear's launcher gives its own app: in scaling its Ray "
                        "settings (scripts/local/ray_env.py), in processes mode its warm ClientApps "
                        "(scripts/local/warm_clientapp.py); the ratios stay to the floor as Flower starts it")  # fmt: skip
    p.add_argument("--skip-quickstart", action="store_true", help="leave out the quickstart-style reference")
    p.add_argument("--quickstart-processes", action="store_true",
                   help="also run the quickstart-style reference in processes mode (~20 min for 10 x 20)")
    p.add_argument("--scaling-clients", default=SCALING_CLIENTS, help="client counts of the scaling series")
    p.add_argument("--max-clients", type=int, default=10000, help="leave out scaling points above this")
    p.add_argument("--inline-scaling-clients", default=INLINE_SCALING_CLIENTS,
                   help="client counts of the inline scaling rows (part 'inline'; default 1000,10000; ratios to the "
                   "simulation floor of the same size)")  # fmt: skip
    p.add_argument("--processes-rounds", type=int, default=5,
                   help="rounds of the processes-mode runs and their floor (default 5)")
    p.add_argument("--sweep-noise", default="0,0.5,1,2,4",
                   help="part 'sweep': the noise multipliers of 'fedlinear sweep --mode inline' (default 0,0.5,1,2,4)")
    p.add_argument("--sweep-seeds", type=int, default=3, help="part 'sweep': seeds per noise level (default 3)")
    p.add_argument("--sweep-clients", type=int, default=10, help="part 'sweep': clients per run (default 10)")
    p.add_argument("--sweep-rounds", type=int, default=20, help="part 'sweep': rounds per run (default 20)")
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
    p.add_argument("--timeout", type=float, default=None,
                   help="upper bound on one run, seconds (default 7200; 300 with --quick)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to use < 0.25 cores "
                   "(for shared machines; the table's 'other' column shows the load they added anyway)")  # fmt: skip
    p.add_argument("--runner", default="fedlinear.scripts.cli", help=argparse.SUPPRESS)  # module run as `python -m X run ...`
    p.add_argument("--central-worker", choices=("lstsq", "keras"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)  # central worker only
    p.set_defaults(func=cmd_bench, argv=None)
    return p
