"""A sweep's settings: the grid (noise multipliers x seeds), validated once, its output directory and
its one data set."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.experiments.datasets import made_once

GiB = 1024**3
DEFAULT_DP = "central-server-clip"
# what one run needs: simulation ~1 core and ~1.5 GiB (flwr-simulation, one Ray actor, SuperLink,
# the fedlinear command); processes mode: N SuperNodes plus a clientapp process per task
# inline mode: one process, ~0.8 GiB peak (the TensorFlow import of the export)
RUN_MEMORY = {"simulation": 1.5 * GiB, "processes": 2.5 * GiB, "inline": 1.0 * GiB}
# keys the sweep sets itself; --set may not give them
RESERVED = {
    "dp": "the sweep sets it per noise level (use --dp for the mechanism)",
    "dp-target-epsilon": "use --epsilon",
    "dp-noise-multiplier": "use --noise",
    "seed": "use --seeds / --first-seed",
    "num-server-rounds": "use --rounds",
    "run-dir": "each run has its own under OUT/runs",
    "data-uri": "use --data",
}
# settings that must match when a sweep directory is resumed (the grid itself may grow)
FIXED = ("data", "clients", "rounds", "mode", "dp", "sets", "strategies", "table")
STRATEGIES = ("fedavg", "fedols")  # --strategies: what --epsilon compares
FEDOLS_DP = "central-client-clip"  # the DP mechanism of DP-FedOLS (each party clips its rows, common/dpols.py)
TABLE_CLIENTS = 4  # --table: parties the table is split into unless --clients says otherwise
SYNTH = {"samples_per_client": 1000, "features": 10, "noise": 0.1, "seed": 42, "test_samples": 2000}


def say(text: str) -> None:
    print(f"[sweep] {text}", flush=True)


def parse_noise(
    text: str, option: str = "--noise", what: str = "a noise multiplier", zero: str = "0 = no DP"
) -> list[float]:
    """``0,0.5,1,2,4`` -> sorted distinct noise multipliers (each finite and >= 0); also ``--epsilon``'s list."""
    values: list[float] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise FedLinearError(f"{option} takes a comma list like 0,1,2,4; got '{text}'")
        try:
            value = float(item)
        except ValueError:
            raise FedLinearError(f"{option}: '{item}' is not a number (a comma list like 0,1,2,4)") from None
        if not math.isfinite(value):
            raise FedLinearError(f"{option}: '{item}' is not a finite number")
        if value < 0:
            raise FedLinearError(f"{option}: {item} is negative; {what} is >= 0 ({zero})")
        if value in values:
            raise FedLinearError(f"{option}: {item} is given twice")
        values.append(value)
    return sorted(values)


def noise_label(noise: float) -> str:
    return f"{noise:g}"


def run_name(noise: float, seed: int, strategy: str = "fedavg", epsilon: float | None = None) -> str:
    if epsilon is not None:  # --epsilon: one strategy at one target ε (0: its non-private run)
        return f"{strategy}-e{noise_label(epsilon) if epsilon > 0 else 'none'}-s{seed}"
    return f"z{noise_label(noise)}-s{seed}"


@dataclasses.dataclass(frozen=True)
class Job:
    noise: float
    seed: int
    run_dir: str
    strategy: str = "fedavg"
    epsilon: float | None = None  # --epsilon: the run's dp-target-epsilon (0: non-private)

    @property
    def name(self) -> str:
        return run_name(self.noise, self.seed, self.strategy, self.epsilon)

    @property
    def private(self) -> bool:
        return self.noise > 0 or bool(self.epsilon)


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
    epsilons: list[float] | None = None  # --epsilon: compare --strategies at these target ε (0: non-private)
    strategies: tuple[str, ...] = ("fedavg",)
    table: str | None = None  # --table: a public table (scripts/experiments/realdata.py) split into OUT/data
    start: str = "process"  # --start: "fork" (from a warm worker, sweep/forked.py) or "process" (a fresh one)

    @property
    def data_dir(self) -> str:
        return self.data or os.path.join(self.out, "data")

    def jobs(self) -> list[Job]:
        if self.epsilons is not None:
            return [
                Job(0.0, s, os.path.join(self.out, "runs", run_name(0.0, s, strategy, e)), strategy, e)
                for strategy in self.strategies for e in self.epsilons for s in self.seeds
            ]  # fmt: skip
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
            "strategies": list(self.strategies) if self.epsilons is not None else None,
            "table": self.table,
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
    epsilons = parse_noise(args.epsilon, "--epsilon", "a target ε", "0 = the non-private run") if getattr(args, "epsilon", None) else None
    strategies = tuple(x.strip() for x in (getattr(args, "strategies", None) or "fedavg").split(","))
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise FedLinearError(f"--strategies: '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if len(set(strategies)) != len(strategies):
        raise FedLinearError("--strategies: a strategy is given twice")
    if epsilons is not None and any(item.split("=", 1)[0].strip() == "strategy" for item in (args.set or [])):
        raise FedLinearError("--set strategy: with --epsilon use --strategies")
    if strategies != ("fedavg",) and epsilons is None:
        raise FedLinearError("--strategies compares strategies at equal ε: give --epsilon (e.g. 1,2,4,8)")
    table = getattr(args, "table", None)
    if table:
        from fedlinear.scripts.experiments.realdata import TABLES

        if table not in TABLES:
            raise FedLinearError(f"--table: '{table}' is not one of {', '.join(TABLES)}")
        if args.data:
            raise FedLinearError("--table and --data are two data sets: give one")
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
    start = resolve_start(getattr(args, "start", "auto") or "auto", args.mode)
    return Settings(
        out=out,
        noise=noise,
        seeds=[args.first_seed + i for i in range(args.seeds)],
        data=data,
        clients=args.clients if (args.clients is not None or data) else (TABLE_CLIENTS if table else 10),
        rounds=args.rounds,
        mode=args.mode,
        dp=args.dp,
        sets=sets,
        parallel=parallel,
        timeout=float(args.timeout),
        ray_cpus=args.ray_cpus,
        runner_module=getattr(args, "runner", "fedlinear.scripts.cli"),
        epsilons=epsilons,
        strategies=strategies,
        table=table or None,
        start=start,
    )


STARTS = ("auto", "fork", "process")


def resolve_start(start: str, mode: str) -> str:
    """``--start``: auto is fork for inline runs where the platform can fork, else process."""
    if start not in STARTS:
        raise FedLinearError(f"--start: '{start}' is not one of {', '.join(STARTS)}")
    can_fork = hasattr(os, "fork") and sys.platform != "win32"
    if start == "auto":
        return "fork" if mode == "inline" and can_fork else "process"
    if start == "fork" and mode != "inline":
        raise FedLinearError(f"--start fork forks inline runs from a warm worker; --mode {mode} starts Flower's "
                             "own processes per run: use --start process (the default there)")  # fmt: skip
    if start == "fork" and not can_fork:
        raise FedLinearError("--start fork needs os.fork (Linux, macOS): use --start process")
    return start


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
    if settings.table:
        return _table_data(settings, path)
    params = {"clients": settings.clients, **SYNTH}
    from fedlinear.common.shards import write_synthetic

    def make() -> None:
        for line in write_synthetic(path, settings.clients, **SYNTH):
            print(line)

    made_once(path, "sweep-data.json", params, make)
    return path


def _table_data(settings: Settings, path: str) -> str:
    """``--table``: the public table written as CSV and split IID (``fedlinear data split``, seed 42, 20 % test)."""
    from fedlinear.scripts.experiments.realdata import write_table

    params = {"table": settings.table, "clients": settings.clients, "seed": 42, "test-fraction": 0.2}

    def make() -> None:
        from fedlinear.common.csvio import load_csv
        from fedlinear.common.partition import split_iid
        from fedlinear.common.shards import write_shards

        csv_path = os.path.join(settings.out, f"{settings.table}.csv")
        write_table(settings.table, csv_path)
        shards, test = split_iid(load_csv(csv_path), settings.clients, 42, 0.2)
        for line in write_shards(path, shards, test):
            print(line)

    made_once(path, "sweep-data.json", params, make)
    return path
