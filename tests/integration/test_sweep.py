"""``fedlinear sweep`` at unit level: no federation is started here.

Runs are faked: a fake runner writes the run directory a completed (or failed) ``fedlinear run``
leaves behind (status.json, manifest.json with ``final`` and ``privacy``, history.json), or a tiny
module stands in for ``python -m fedlinear.scripts.cli run`` to exercise the real subprocess runner (exit
codes, one-line errors, the time bound). The real sweep (a federation per grid point) is run as a
benchmark, not as a test.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import threading
import time

import pytest

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.cli import build_parser, main
from fedlinear.scripts.cli import sweep as sweep_command
from fedlinear.scripts.experiments.sweep import grid as sweep_grid
from fedlinear.scripts.experiments.sweep import outputs as sweep_outputs
from fedlinear.scripts.experiments.sweep import runner as sweep_runner
from fedlinear.scripts.experiments.sweep import settings as sweep_settings

RATIO = {0.0: 1.001, 0.5: 1.05, 1.0: 1.2, 2.0: 2.0, 4.0: 6.0}
EPS = {0.5: 40.0, 1.0: 12.3, 2.0: 4.1, 4.0: 1.5}


def ratio_of(noise: float, seed: int) -> float:
    return RATIO.get(noise, 1.5 + noise) * (1 + 0.01 * seed)


def write_run(job: sweep_settings.Job, status="completed", ratio=None, epsilon="auto", delta=1e-5, ref=0.0103, rounds=3):
    """What ``fedlinear run`` leaves in RUN_DIR (the contract's fields only)."""
    os.makedirs(job.run_dir, exist_ok=True)
    ratio = ratio_of(job.noise, job.seed) if ratio is None else ratio
    eps = (EPS.get(job.noise, 10.0 / job.noise) if job.noise > 0 else None) if epsilon == "auto" else epsilon
    mse = ratio * ref
    initial = {"round": 0, "test-mse": 1.0, "test-mse-ratio": 1.0 / ref, "epsilon": None}  # the initial model
    history = {
        "rounds": [initial] + [
            {"round": r, "test-mse": mse * (1 + (rounds - r)), "test-mse-ratio": ratio * (1 + (rounds - r)),
             "epsilon": None if eps is None else eps * r / rounds}
            for r in range(1, rounds + 1)
        ],  # fmt: skip
        "reference": {"test-mse": ref},
    }
    with open(os.path.join(job.run_dir, "history.json"), "w") as handle:
        json.dump(history, handle)
    with open(os.path.join(job.run_dir, "status.json"), "w") as handle:
        json.dump({"status": status, "message": "" if status == "completed" else "boom: a client failed"}, handle)
    if status == "completed":
        manifest = {
            "config": {"dp-delta": delta},
            "final": {"round": rounds, "test-mse": mse, "test-mse-ratio": ratio, "reference-test-mse": ref,
                      "epsilon": eps},  # fmt: skip
            "privacy": {"epsilon": eps, "delta": delta if job.noise > 0 else None,
                        "mechanism": "central-server-clip" if job.noise > 0 else "none",
                        "noise-multiplier": job.noise, "clipping-norm": 1.0},  # fmt: skip
        }
        with open(os.path.join(job.run_dir, "manifest.json"), "w") as handle:
            json.dump(manifest, handle)


class FakeRunner:
    """Stands in for ``fedlinear run``: writes the run dir, records calls and concurrency."""

    def __init__(self, fail=(), sleep=0.0):
        self.fail = set(fail)
        self.sleep = sleep
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def __call__(self, settings, job, data, stop):
        with self.lock:
            self.calls.append((job.name, data))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.sleep)
            if job.name in self.fail:
                write_run(job, status="failed")
                return sweep_runner.Outcome(1, 0.5, "boom: a client failed (exit 1)")
            write_run(job)
            return sweep_runner.Outcome(0, 2.0 + job.noise)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def no_plot(monkeypatch):
    """Grid tests stub the plot out (matplotlib takes seconds on a loaded machine); test_plot_* draw it."""
    drawn = []
    monkeypatch.setattr(sweep_outputs, "plot", lambda path, levels, title="": drawn.append(path) or True)
    return drawn


def parse(*argv):
    return build_parser().parse_args(["sweep", *map(str, argv)])


def run_cli_error(capsys, *argv) -> str:
    assert main(["sweep", *map(str, argv)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlinear: error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------------------------
# Parsing and validation
# ----------------------------------------------------------------------------------------------


def test_parse_noise():
    assert sweep_settings.parse_noise("0,0.5,1,2,4") == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert sweep_settings.parse_noise(" 4, 1 ,0") == [0.0, 1.0, 4.0]
    for bad, says in [("", "comma list"), ("0,,1", "comma list"), ("0,a", "'a' is not a number"),
                      ("1,-0.5", "negative"), ("nan", "finite"), ("inf", "finite"), ("1,1.0", "twice")]:  # fmt: skip
        with pytest.raises(FedLinearError, match=says):
            sweep_settings.parse_noise(bad)


def test_user_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "s"
    assert "negative" in run_cli_error(capsys, "--noise", "0,-1", "--out", out)
    assert "not a number" in run_cli_error(capsys, "--noise", "0,x", "--out", out)
    assert "--seeds must be >= 1" in run_cli_error(capsys, "--seeds", "0", "--out", out)
    assert "--parallel must be >= 1" in run_cli_error(capsys, "--parallel", "0", "--out", out)
    assert "--rounds must be >= 1" in run_cli_error(capsys, "--rounds", "0", "--out", out)
    assert "use --noise" in run_cli_error(capsys, "--set", "dp-noise-multiplier=2", "--out", out)
    assert "--set seed" in run_cli_error(capsys, "--set", "seed=3", "--out", out)
    assert "unknown config key 'no-such-key'" in run_cli_error(capsys, "--set", "no-such-key=1", "--out", out)
    assert "no client-<i>.csv shards" in run_cli_error(capsys, "--data", tmp_path, "--out", out)
    assert "local directory" in run_cli_error(capsys, "--out", "s3://bucket/sweep")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    err = run_cli_error(capsys, "--noise", "0", "--seeds", "1", "--out", blocker / "sweep")
    assert "cannot write there" in err
    assert not out.exists()  # nothing was started or written for a bad command line


def test_resumed_sweep_must_keep_its_settings(tmp_path, no_plot):
    args = parse("--noise", "0", "--seeds", "1", "--clients", "2", "--rounds", "3", "--out", tmp_path / "s")
    assert sweep_command.cmd_sweep(args, runner=FakeRunner()) == 0
    args = parse("--noise", "0", "--seeds", "1", "--clients", "2", "--rounds", "5", "--out", tmp_path / "s")
    with pytest.raises(FedLinearError, match="rounds = 3, not 5"):
        sweep_command.cmd_sweep(args, runner=FakeRunner())


def test_default_parallel_fits_the_machine():
    assert sweep_settings.default_parallel("simulation", cores=2, available=20 * sweep_settings.GiB) == 2
    assert sweep_settings.default_parallel("simulation", cores=8, available=int(3.2 * sweep_settings.GiB)) == 2
    assert sweep_settings.default_parallel("simulation", cores=1, available=sweep_settings.GiB // 2) == 1
    assert sweep_settings.default_parallel("processes", cores=8, available=6 * sweep_settings.GiB) == 2


def test_run_arguments_map_zero_noise_to_no_dp(tmp_path):
    args = parse("--noise", "0,2", "--seeds", "2", "--out", tmp_path / "s", "--parallel", "2",
                 "--set", "dp-clipping-norm=0.5", "--set", "batch-size=16", "--timeout", "300")  # fmt: skip
    settings = sweep_settings.validate(args)
    jobs = {j.name: j for j in settings.jobs()}
    assert sorted(jobs) == ["z0-s1", "z0-s2", "z2-s1", "z2-s2"]
    assert sweep_runner.run_sets(settings, jobs["z0-s2"]) == ["dp=none", "seed=2", "batch-size=16"]
    private = ["dp=central-server-clip", "dp-noise-multiplier=2.0", "seed=1", "dp-clipping-norm=0.5", "batch-size=16"]
    assert sweep_runner.run_sets(settings, jobs["z2-s1"]) == private
    argv = sweep_runner.run_argv(settings, jobs["z2-s1"], "/data")
    assert argv[1:4] == ["-m", "fedlinear.scripts.cli", "run"]
    for flag, value in [("--data", "/data"), ("--out", jobs["z2-s1"].run_dir), ("--mode", "simulation"),
                        ("--timeout", "300"), ("--clients", "10"), ("--rounds", "20")]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert int(argv[argv.index("--ray-cpus") + 1]) == max(1, sweep_settings.usable_cores() // 2)
    assert jobs["z2-s1"].run_dir == os.path.join(str(tmp_path / "s"), "runs", "z2-s1")


# ----------------------------------------------------------------------------------------------
# From run directories to the table and the plot
# ----------------------------------------------------------------------------------------------


def fake_grid(tmp_path, noise=(0.0, 1.0, 4.0), seeds=(1, 2, 3)):
    rows = []
    for z in noise:
        for s in seeds:
            job = sweep_settings.Job(z, s, str(tmp_path / "runs" / sweep_settings.run_name(z, s)))
            write_run(job)
            row = sweep_grid.read_result(job)
            row["wall-s"] = 10.0 + s
            rows.append(row)
    return rows


def test_read_result_from_a_run_dir(tmp_path):
    job = sweep_settings.Job(1.0, 2, str(tmp_path / "z1-s2"))
    write_run(job, rounds=4)
    row = sweep_grid.read_result(job)
    assert row["status"] == "completed" and row["rounds"] == 4
    assert row["epsilon"] == pytest.approx(12.3) and row["delta"] == 1e-5
    assert row["mse-ratio"] == pytest.approx(1.2 * 1.02)
    assert row["test-mse"] == pytest.approx(1.2 * 1.02 * 0.0103) and row["reference-test-mse"] == 0.0103
    assert sweep_grid.is_completed(job.run_dir)
    plain = sweep_settings.Job(0.0, 1, str(tmp_path / "z0-s1"))
    write_run(plain)
    row = sweep_grid.read_result(plain)
    assert row["epsilon"] is None and row["delta"] is None and row["mse-ratio"] == pytest.approx(1.001 * 1.01)
    failed = sweep_settings.Job(2.0, 1, str(tmp_path / "z2-s1"))
    write_run(failed, status="failed")
    row = sweep_grid.read_result(failed)
    assert row["status"] == "failed" and "boom" in row["error"] and not sweep_grid.is_completed(failed.run_dir)
    budget = sweep_settings.Job(2.0, 3, str(tmp_path / "z2-s3"))
    write_run(budget)
    manifest = json.loads((tmp_path / "z2-s3" / "manifest.json").read_text())
    manifest["privacy"]["stopped"] = "dp-max-epsilon = 3 reached:\n stopped before round 3"
    (tmp_path / "z2-s3" / "manifest.json").write_text(json.dumps(manifest))
    assert sweep_grid.read_result(budget)["stopped"] == "dp-max-epsilon = 3 reached: stopped before round 3"
    row = sweep_grid.read_result(sweep_settings.Job(2.0, 9, str(tmp_path / "never-started")))
    assert row["status"] == "missing" and row["mse-ratio"] is None


def test_aggregate_mean_spread_epsilon_and_reference(tmp_path):
    rows = fake_grid(tmp_path)
    rows.append({"noise": 4.0, "seed": 4, "status": "failed", "error": "boom"})  # a failed run counts, not in stats
    levels = {lv["noise"]: lv for lv in sweep_outputs.aggregate(rows)}
    assert sorted(levels) == [0.0, 1.0, 4.0]
    one = levels[1.0]
    ratios = [1.2 * 1.01, 1.2 * 1.02, 1.2 * 1.03]
    assert one["ratio-mean"] == pytest.approx(sum(ratios) / 3)
    assert one["ratio-std"] == pytest.approx(0.012, rel=1e-6)  # sample std of 1.2 * (1.01, 1.02, 1.03)
    assert (one["ratio-min"], one["ratio-max"]) == (pytest.approx(ratios[0]), pytest.approx(ratios[2]))
    assert one["epsilon"] == pytest.approx(12.3) and one["deltas"] == [1e-5]
    assert one["completed"] == one["runs"] == 3
    four = levels[4.0]
    assert (four["completed"], four["runs"], four["failed"]) == (3, 4, 1)
    assert four["epsilon"] == pytest.approx(1.5)
    ref = levels[0.0]
    assert not ref["private"] and ref["epsilon"] is None
    assert ref["ratio-mean"] == pytest.approx(1.001 * 1.02)
    assert ref["wall-s-mean"] == pytest.approx(12.0)

    table = sweep_outputs.markdown_table(sweep_outputs.aggregate(rows))
    lines = table.splitlines()
    assert lines[0].startswith("| noise z | final ε (δ = 1e-5)")
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:5]}
    assert body["0"][1] == "∞ (no DP)" and body["0"][2] == "3/3"
    assert body["1"][1] == "12.3" and body["1"][3] == f"{sum(ratios) / 3:.5g}" and body["1"][4] == "0.012"
    assert body["4"][1] == "1.5" and body["4"][2] == "3/4"


def test_aggregate_single_seed_and_varying_epsilon(tmp_path):
    a, b = sweep_settings.Job(1.0, 1, str(tmp_path / "a")), sweep_settings.Job(1.0, 2, str(tmp_path / "b"))
    write_run(a, epsilon=3.0)
    write_run(b, epsilon=2.0)  # e.g. a budget stop one round earlier
    (lv,) = sweep_outputs.aggregate([sweep_grid.read_result(a)])
    assert lv["ratio-std"] is None and lv["ratio-min"] == lv["ratio-max"] == lv["ratio-mean"]
    (lv,) = sweep_outputs.aggregate([sweep_grid.read_result(a), sweep_grid.read_result(b)])
    assert lv["epsilon"] == pytest.approx(2.5) and sweep_outputs._eps_cell(lv) == "2.5 (2-3)"


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_a_png(tmp_path):
    levels = sweep_outputs.aggregate(fake_grid(tmp_path))
    path = tmp_path / "sweep.png"
    assert sweep_outputs.plot(str(path), levels, title="test")
    width, height = png_size(path)
    assert 400 <= width <= 3000 and 300 <= height <= 3000
    assert 10_000 < path.stat().st_size < 2_000_000
    # nothing private completed: still a PNG (reference lines and a note), not an exception
    only_plain = [lv for lv in levels if not lv["private"]]
    assert sweep_outputs.plot(str(tmp_path / "plain.png"), only_plain)
    png_size(tmp_path / "plain.png")


# ----------------------------------------------------------------------------------------------
# The grid: outputs, resuming, parallelism
# ----------------------------------------------------------------------------------------------


def test_sweep_writes_csv_table_png_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    argv = ["--noise", "0,1,4", "--seeds", "2", "--clients", "2", "--rounds", "3", "--out", out, "--parallel", "2"]
    runner = FakeRunner(fail={"z1-s2"})
    with pytest.raises(FedLinearError, match=r"1 of 6 runs did not complete \(z1-s2\)"):
        sweep_command.cmd_sweep(parse(*argv), runner=runner)
    assert sorted(name for name, _ in runner.calls) == ["z0-s1", "z0-s2", "z1-s1", "z1-s2", "z4-s1", "z4-s2"]
    data_dirs = {data for _, data in runner.calls}
    assert data_dirs == {str(out / "data")}  # one data set, made once, for every run
    assert sorted(os.listdir(out / "data")) == ["client-0.csv", "client-1.csv", "sweep-data.json", "test.csv",
                                                "truth.json"]  # fmt: skip
    data_mtime = (out / "data" / "client-0.csv").stat().st_mtime_ns
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["noise"], r["seed"], r["status"]) for r in rows] == [
        ("0.0", "1", "completed"), ("0.0", "2", "completed"), ("1.0", "1", "completed"), ("1.0", "2", "failed"),
        ("4.0", "1", "completed"), ("4.0", "2", "completed")]  # fmt: skip
    assert rows[0]["epsilon"] == "" and float(rows[2]["epsilon"]) == pytest.approx(12.3)
    assert float(rows[4]["mse-ratio"]) == pytest.approx(6.0 * 1.01) and float(rows[4]["wall-s"]) == 6.0
    assert "boom" in rows[3]["error"]
    assert "| 1 | 12.3 | 1/2 |" in (out / "sweep.md").read_text()
    png_size(out / "sweep.png")
    printed = capsys.readouterr().out
    assert "| noise z |" in printed and "total wall time" in printed

    # again: only the failed run is rerun (its old directory kept under attempts/), the rest read back
    monkeypatch.setattr(sweep_outputs, "plot", lambda path, levels, title="": True)  # drawn above already
    runner2 = FakeRunner()
    assert sweep_command.cmd_sweep(parse(*argv), runner=runner2) == 0
    assert [name for name, _ in runner2.calls] == ["z1-s2"]
    assert os.path.exists(out / "attempts" / "z1-s2-1" / "status.json")
    assert (out / "data" / "client-0.csv").stat().st_mtime_ns == data_mtime
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["status"] == "completed" for r in rows) and len(rows) == 6
    assert [r["resumed"] for r in rows] == ["True", "True", "True", "False", "True", "True"]
    assert float(rows[0]["wall-s"]) == 2.0  # the wall time of a kept run survives the resume
    assert "| 1 | 12.3 | 2/2 |" in (out / "sweep.md").read_text()

    # a larger grid on the same settings runs only the new points
    runner3 = FakeRunner()
    argv3 = [*argv]
    argv3[1] = "0,1,2,4"
    argv3[3] = "3"
    assert sweep_command.cmd_sweep(parse(*argv3), runner=runner3) == 0
    assert sorted(name for name, _ in runner3.calls) == ["z0-s3", "z1-s3", "z2-s1", "z2-s2", "z2-s3", "z4-s3"]


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_parallel_runs_are_bounded(tmp_path, parallel, no_plot):
    runner = FakeRunner(sleep=0.15)
    args = parse("--noise", "0,1,2,4", "--seeds", "2", "--clients", "2", "--rounds", "2",
                 "--out", tmp_path / "s", "--parallel", parallel)  # fmt: skip
    assert sweep_command.cmd_sweep(args, runner=runner) == 0
    assert len(runner.calls) == 8
    assert runner.max_active == parallel


# ----------------------------------------------------------------------------------------------
# The real subprocess runner, against a stand-in for `fedlinear run`
# ----------------------------------------------------------------------------------------------

STAND_IN = '''
import json, os, signal, sys, time
if os.environ.pop("FEDLINEAR_SIGINT_STOPS", "") == "1" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as fedlinear's CLI does (restore_sigint_if_asked)
argv = sys.argv[1:]
out = argv[argv.index("--out") + 1]
sets = {}
for i, a in enumerate(argv):
    if a == "--set":
        k, v = argv[i + 1].split("=", 1)
        sets[k] = v
seed = int(sets["seed"])
if seed == 2:
    print("fedlinear: error: the shard is broken", file=sys.stderr)
    sys.exit(1)
if seed == 3:
    time.sleep(60)
os.makedirs(out, exist_ok=True)
z = float(sets.get("dp-noise-multiplier", 0))
json.dump({"status": "completed", "message": ""}, open(os.path.join(out, "status.json"), "w"))
json.dump({"rounds": [{"round": 1, "test-mse": 0.02, "test-mse-ratio": 2.0, "epsilon": None}]},
          open(os.path.join(out, "history.json"), "w"))
json.dump({"final": {"test-mse": 0.02, "test-mse-ratio": 2.0, "reference-test-mse": 0.01},
           "privacy": {"epsilon": 5.0 if z else None, "delta": 1e-5}, "argv": argv},
          open(os.path.join(out, "manifest.json"), "w"))
'''


def test_subprocess_runner_success_error_and_timeout(tmp_path, monkeypatch, no_plot):
    (tmp_path / "standin.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(sweep_runner, "TIMEOUT_GRACE", 0.0)
    args = parse("--noise", "0,1", "--seeds", "3", "--clients", "2", "--rounds", "1", "--out", tmp_path / "s",
                 "--parallel", "3", "--timeout", "2", "--runner", "standin")  # fmt: skip
    started = time.monotonic()
    with pytest.raises(FedLinearError, match="4 of 6 runs did not complete"):
        sweep_command.cmd_sweep(args)
    assert time.monotonic() - started < 30
    with open(tmp_path / "s" / "sweep.csv", newline="") as handle:
        rows = {(float(r["noise"]), int(r["seed"])): r for r in csv.DictReader(handle)}
    assert rows[(1.0, 1)]["status"] == "completed" and float(rows[(1.0, 1)]["epsilon"]) == 5.0
    assert rows[(0.0, 1)]["status"] == "completed" and rows[(0.0, 1)]["epsilon"] == ""
    assert rows[(1.0, 2)]["status"] == "failed" and rows[(1.0, 2)]["error"].startswith("the shard is broken (exit 1")
    assert rows[(1.0, 3)]["status"] == "timeout" and "timed out after 2 s" in rows[(1.0, 3)]["error"]
    manifest = json.loads((tmp_path / "s" / "runs" / "z1-s1" / "manifest.json").read_text())
    assert manifest["argv"][manifest["argv"].index("--set") + 1] == "dp=central-server-clip"
    assert os.path.exists(tmp_path / "s" / "logs" / "z1-s2.log")


def test_subprocess_runner_stops_a_run_when_the_sweep_is_interrupted(tmp_path, monkeypatch):
    (tmp_path / "standin.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(sweep_runner, "STOP_GRACE", 0.5)
    settings = sweep_settings.validate(parse("--noise", "1", "--seeds", "1", "--first-seed", "3", "--clients", "2",
                                    "--out", tmp_path / "s", "--runner", "standin"))  # fmt: skip
    sweep_settings.prepare_out(settings)
    (job,) = settings.jobs()  # seed 3: the stand-in sleeps for a minute
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.monotonic()
    outcome = sweep_runner.subprocess_runner(settings, job, "/data", stop)
    assert time.monotonic() - started < 20
    assert outcome.error == "interrupted" and outcome.returncode != 0 and not outcome.timed_out


# ----------------------------------------------------------------------------------------------
# --epsilon: strategies side by side at equal ε
# ----------------------------------------------------------------------------------------------


class EpsilonRunner:
    """Stands in for ``fedlinear run`` in --epsilon mode: the run spends its target ε; fedols is the better."""

    def __init__(self):
        self.calls = []

    def __call__(self, settings, job, data, stop):
        self.calls.append(sweep_runner.run_sets(settings, job))
        os.makedirs(job.run_dir, exist_ok=True)
        eps = job.epsilon or None
        ratio = (1.0 if job.strategy == "fedols" else 1.005) if eps is None else (
            1 + 1 / eps if job.strategy == "fedols" else 100 / eps) * (1 + 0.01 * job.seed)  # fmt: skip
        final = {"round": 1, "test-mse": ratio * 0.01, "test-mse-ratio": ratio, "reference-test-mse": 0.01, "epsilon": eps}
        privacy = {"epsilon": eps, "delta": 1e-5 if eps else None, "noise-multiplier": 4.0 / eps if eps else None}
        for name, value in (("status.json", {"status": "completed"}), ("history.json", {"rounds": [final]}),
                            ("manifest.json", {"final": final, "privacy": privacy, "config": {"dp-delta": 1e-5}})):  # fmt: skip
            with open(os.path.join(job.run_dir, name), "w") as handle:
                json.dump(value, handle)
        return sweep_runner.Outcome(0, 1.0)


def test_epsilon_mode_runs_each_strategy_at_each_target_and_tables_them(tmp_path, capsys):
    out = tmp_path / "s"
    args = parse("--epsilon", "0,1,8", "--strategies", "fedavg,fedols", "--seeds", "2", "--clients", "2",
                 "--rounds", "3", "--out", out, "--set", "dp-public-statistics=true")  # fmt: skip
    settings = sweep_settings.validate(args)
    jobs = {j.name: j for j in settings.jobs()}
    assert sorted(jobs) == sorted(f"{s}-{e}-s{k}" for s in ("fedavg", "fedols") for e in ("enone", "e1", "e8") for k in (1, 2))
    assert sweep_runner.run_sets(settings, jobs["fedols-e8-s1"]) == [
        "dp=central-client-clip", "dp-target-epsilon=8.0", "strategy=fedols", "seed=1", "dp-public-statistics=true"]
    assert sweep_runner.run_sets(settings, jobs["fedavg-e1-s2"]) == [
        "dp=central-server-clip", "dp-target-epsilon=1.0", "strategy=fedavg", "seed=2", "dp-public-statistics=true"]
    assert sweep_runner.run_sets(settings, jobs["fedavg-enone-s1"]) == ["dp=none", "strategy=fedavg", "seed=1"]
    runner = EpsilonRunner()
    assert sweep_command.cmd_sweep(args, runner=runner) == 0
    assert len(runner.calls) == 12
    table = (out / "sweep.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert "DP-FedAvg MSE / LS" in lines[0] and "DP-FedOLS MSE / LS" in lines[0] and "better" in lines[0]
    row1 = next(ln for ln in lines if ln.startswith("| 1 |"))
    assert row1.endswith("| DP-FedOLS |") and "101.5 (101-102)" in row1 and "2.03 (2.02-2.04)" in row1
    assert "row-level (add/remove one row)" in table and "client-level" in table
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["strategy"] for r in rows} == {"fedavg", "fedols"} and {r["target-epsilon"] for r in rows} == {"0.0", "1.0", "8.0"}
    assert next(r for r in rows if r["run-dir"].endswith("fedols-e8-s1"))["noise"] == "0.5"  # the derived z
    assert (out / "sweep.png").stat().st_size > 1000


def test_epsilon_mode_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "s"
    assert "give --epsilon" in run_cli_error(capsys, "--strategies", "fedavg,fedols", "--out", out)
    assert "'krum' is not one of" in run_cli_error(capsys, "--epsilon", "1", "--strategies", "fedavg,krum", "--out", out)
    assert "use --epsilon" in run_cli_error(capsys, "--set", "dp-target-epsilon=2", "--out", out)
    assert "use --strategies" in run_cli_error(capsys, "--epsilon", "1", "--set", "strategy=fedols", "--out", out)
    assert "--table: 'iris' is not one of" in run_cli_error(capsys, "--epsilon", "1", "--table", "iris", "--out", out)
