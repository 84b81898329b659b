"""``python -m tests.inprocess_run run ...``: a stand-in for ``fedlinear run`` that ``fedlinear sweep --runner
tests.inprocess_run`` can use on a loaded machine. The same ServerApp ``run`` and ClientApp handlers, driven in
one process by :mod:`tests.inprocess` (no SuperLink, no Ray); same seed, same numbers as the simulation runtime
(checked on a DP-FedAvg run: bit-identical weights). Takes the arguments the sweep passes (``--mode``,
``--timeout`` and ``--ray-cpus`` are accepted and ignored) and, under privacy, writes the run's
``statistics.npz`` from the shards as ``fedlinear run`` does.
"""

from __future__ import annotations

import argparse
import os
import sys

from fedlinear.common.config import RunConfig, parse_assignments
from fedlinear.common.shards import find_shards
from fedlinear.scripts.cli.run import write_local_statistics
from tests.inprocess import run_in_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run",))
    for flag in ("--data", "--out", "--mode", "--timeout", "--ray-cpus"):
        parser.add_argument(flag)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--set", action="append")
    args = parser.parse_args(argv)
    shards = find_shards(args.data)[: args.clients]
    config = {"num-server-rounds": args.rounds, "test-uri": os.path.join(args.data, "test.csv"), **parse_assignments(args.set)}
    if RunConfig.from_run_config(config).private:
        os.makedirs(args.out, exist_ok=True)
        config["statistics-uri"] = write_local_statistics(shards, os.path.join(args.out, "statistics.npz"), RunConfig())
    status, _ = run_in_process(shards, args.out, **config)
    print(f"{status['status']}: {status.get('message', '')}")
    return 0 if status["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
