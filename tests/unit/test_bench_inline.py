"""``fedlinear bench``'s inline rows (part ``inline``): planned beside the others in one invocation, their
ratios taken to the simulation floor of the same size (inline mode has no floor of its own)."""

from __future__ import annotations

import argparse

from fedlinear.scripts.cli import bench as bench_cmd
from fedlinear.scripts.experiments.bench.cases import add_ratios, plan


def bench_args(*argv: str) -> argparse.Namespace:
    root = argparse.ArgumentParser()
    bench_cmd.add_parser(root.add_subparsers())
    return root.parse_args(["bench", *argv])


def test_the_inline_rows_are_planned_with_the_floor_in_the_same_invocation(tmp_path):
    cases, datasets = plan(bench_args("--only", "sim,inline,scaling", "--engines", "numpy",
                                      "--scaling-clients", "10,1000"), str(tmp_path))  # fmt: skip
    keys = {(c.suite, c.mode, c.system, c.clients) for c in cases}
    assert ("main", "inline", "fedlinear-numpy", 10) in keys and ("main", "simulation", "floor", 10) in keys
    assert ("scaling", "inline", "fedlinear-numpy", 1000) in keys and ("scaling", "simulation", "floor", 1000) in keys
    inline_1000 = next(c for c in cases if (c.suite, c.mode, c.clients) == ("scaling", "inline", 1000))
    sim_1000 = next(c for c in cases if (c.suite, c.mode, c.system, c.clients) == ("scaling", "simulation", "floor", 1000))
    assert inline_1000.data_dir == sim_1000.data_dir  # the same data as the floor it is compared with
    assert inline_1000.label == "fedlinear (inline)" and len({c.key for c in cases}) == len(cases)


def row(suite, mode, system, wall, ups=None):
    return {"suite": suite, "mode": mode, "system": system, "clients": 10, "rounds": 20, "wall-s": wall,
            "updates-per-s": ups}  # fmt: skip


def test_inline_ratios_are_to_the_simulation_floor():
    rows = [row("main", "simulation", "floor", 20.0, 50.0), row("main", "inline", "fedlinear-numpy", 5.0, 500.0),
            row("main", "processes", "floor", 40.0)]  # fmt: skip
    add_ratios(rows)
    assert rows[1]["x-floor"] == 0.25 and rows[1]["updates-vs-floor"] == 10.0
