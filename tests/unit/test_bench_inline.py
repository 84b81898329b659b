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


def test_the_floor_is_flowers_engine_as_shipped_and_the_tuned_floor_is_an_extra_row(tmp_path):
    from fedlinear.scripts.local.ray_env import RAY_ENV

    plain, _ = plan(bench_args("--only", "scaling", "--engines", "numpy", "--scaling-clients", "1000"), str(tmp_path))
    assert {c.system for c in plain} == {"fedlinear-numpy", "floor"}
    assert all(c.env == () for c in plain)  # nothing added to the floor's environment
    tuned, _ = plan(bench_args("--only", "scaling", "--engines", "numpy", "--scaling-clients", "1000",
                               "--tuned-floor"), str(tmp_path))  # fmt: skip
    extra = [c for c in tuned if c.system == "floor-tuned"]
    assert len(extra) == 1 and dict(extra[0].env) == RAY_ENV and extra[0].app == plain[1].app
    assert extra[0].label == "floor + launcher Ray env" and len({c.key for c in tuned}) == len(tuned)
    rows = [dict(row("scaling", "simulation", "floor", 40.0, 100.0), clients=1000, rounds=3),
            dict(row("scaling", "simulation", "floor-tuned", 30.0, 150.0), clients=1000, rounds=3),
            dict(row("scaling", "inline", "fedlinear-numpy", 8.0, 1000.0), clients=1000, rounds=3)]
    add_ratios(rows)
    assert rows[2]["updates-vs-floor"] == 10.0  # judged against the floor as Flower ships it
    assert rows[1]["updates-vs-floor"] == 1.5  # and the tuned floor's own speed-up is shown


def test_inline_is_planned_in_both_pools_beside_its_ceiling_the_no_op_app_inline(tmp_path):
    from fedlinear.scripts.experiments.bench.cases import NOOP_APP

    cases, _ = plan(bench_args("--only", "sim,inline,scaling", "--engines", "numpy", "--scaling-clients", "1000",
                               "--inline-scaling-clients", "1000"), str(tmp_path))  # fmt: skip
    inline = {c.system: c for c in cases if (c.suite, c.mode, c.clients) == ("scaling", "inline", 1000)}
    assert set(inline) == {"fedlinear-numpy", "fedlinear-numpy-serial", "noop-inline", "noop-inline-procs"}
    assert inline["noop-inline"].app == inline["noop-inline-procs"].app == NOOP_APP
    assert inline["fedlinear-numpy"].app is None and inline["fedlinear-numpy"].argv == ()  # --pool auto, as users run it
    assert inline["fedlinear-numpy-serial"].argv == inline["noop-inline"].argv == ("--pool", "serial")
    assert inline["noop-inline-procs"].argv == ("--pool", "processes")
    assert len({c.data_dir for c in inline.values()}) == 1 and len({c.label for c in inline.values()}) == 4
    skipped, _ = plan(bench_args("--only", "inline", "--inline-scaling-clients", "1000", "--skip-floor"), str(tmp_path))
    assert not [c for c in skipped if c.system.startswith("noop")]


def test_a_ceiling_is_shown_beside_the_target_and_never_changes_its_status():
    from fedlinear.scripts.experiments.bench.cases import TARGETS
    from fedlinear.scripts.experiments.bench.tables import evaluate_target

    target = next(t for t in TARGETS if t.name.startswith("inline 1000x3 updates/s"))

    def scaled(system, ups):
        return dict(row("scaling", "inline" if system != "floor" else "simulation", system, 10.0, ups),
                    clients=1000, rounds=3, ok=True, label=system)  # fmt: skip

    rows = [scaled("floor", 200.0), scaled("fedlinear-numpy", 600.0), scaled("noop-inline", 1000.0),
            scaled("noop-inline-procs", 1300.0)]  # fmt: skip
    judged = evaluate_target(target, rows)
    assert judged["status"] == "MISSED" and judged["ratio"] == 3.0
    assert judged["ceilings"] == {"noop-inline": 5.0, "noop-inline-procs": 6.5}
    assert "noop-inline-procs 6.50 x" in judged["detail"]
    rows[1]["updates-per-s"] = 2400.0  # above the ceiling: still judged on its own figure
    assert evaluate_target(target, rows)["status"] == "met"
    assert "ceilings" not in evaluate_target(target, rows[:2])  # no ceiling ran: nothing said of one
