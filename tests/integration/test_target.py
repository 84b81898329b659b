"""A user-set target for the gap to the optimum: ``target-mse-ratio`` and ``stop-at-target``.

Config validation; the in-process ServerApp (tests/inprocess.py) stopping at the first round that
reaches the target, exporting that round's checkpoint, resuming to the same round; the report; and
``fedlinear run --target R --stop-at-target`` over real Flower processes, once.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from fedlinear.common import target as targets
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.scripts.experiments import report
from tests.conftest import run_cli, write_federation
from tests.inprocess import Crash, InProcessGrid, crash_after, drive, run_in_process, write_synthetic_shards

# 2 parties x 200 rows, d=4, seed 5, 6 rounds: test MSE / optimum by round (measured, deterministic)
# 30.2, 1.65, 1.048, 1.025, 1.014, 1.0056; so 1.05 is first reached at round 3, 1.0001 never.
ROUNDS, LOOSE, REACHED_AT, UNREACHABLE = 6, 1.05, 3, 1.0001


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def parse(**values) -> RunConfig:
    return RunConfig.from_run_config({"test-uri": "/data/test.csv", **values})


def test_no_target_is_the_default_and_a_target_of_at_least_one_is_accepted():
    assert RunConfig().target_mse_ratio == 0 and RunConfig().stop_at_target is False
    assert parse(**{"target-mse-ratio": 0}).target_mse_ratio == 0
    cfg = parse(**{"target-mse-ratio": "1.01", "stop-at-target": "true"})
    assert cfg.target_mse_ratio == 1.01 and cfg.stop_at_target is True
    assert parse(**{"target-mse-ratio": 1}).target_mse_ratio == 1.0
    # no test set is fine without a target
    assert RunConfig.from_run_config({"reference": "none"}).target_mse_ratio == 0


@pytest.mark.parametrize(
    "values,message",
    [
        ({"target-mse-ratio": 0.5}, "config key 'target-mse-ratio' must be 0 (no target) or a finite number >= 1"),
        ({"target-mse-ratio": -1}, "config key 'target-mse-ratio' must be 0 (no target) or a finite number >= 1"),
        ({"target-mse-ratio": float("inf")}, "config key 'target-mse-ratio' must be 0 (no target) or a finite"),
        ({"target-mse-ratio": "inf"}, "config key 'target-mse-ratio' must be 0 (no target) or a finite"),
        ({"target-mse-ratio": "nan"}, "config key 'target-mse-ratio' must be a float, got 'nan'"),
        ({"target-mse-ratio": float("nan")}, "config key 'target-mse-ratio' must be a float, got nan"),
        ({"target-mse-ratio": "close"}, "config key 'target-mse-ratio' must be a float, got 'close'"),
        ({"target-mse-ratio": 1.01, "reference": "none"}, "'reference' = none does not compute"),
        ({"target-mse-ratio": 1.01, "test-uri": ""}, "config key 'target-mse-ratio' needs a test set"),
        ({"target-mse-ratio": 1.01, "strategy": "fedols"}, "'strategy' = fedols computes the least-squares"),
        ({"stop-at-target": True}, "config key 'stop-at-target' = true needs a 'target-mse-ratio'"),
        ({"stop-at-target": "maybe"}, "config key 'stop-at-target' must be a bool, got 'maybe'"),
    ],
)
def test_bad_targets_are_one_line_errors_naming_the_key(values, message):
    with pytest.raises(FedLinearError) as err:
        parse(**values)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_summary_lines_in_plain_words():
    rows = [{"round": 0, "test-mse-ratio": 0.5}, {"round": 1, "test-mse-ratio": 1.5},
            {"round": 2, "test-mse-ratio": 1.004}, {"round": 3, "test-mse-ratio": 1.0035}]  # fmt: skip
    assert targets.reached_at(rows, 1.01) == 2  # round 0 (the initial model) never counts
    history = {"rounds": rows, **targets.outcome(rows, 1.01, False)}
    assert targets.summary_lines(history, 3) == ["target 1.01 x the optimum: reached at round 2, final 1.00350"]
    history = {"rounds": rows[:3], **targets.outcome(rows[:3], 1.01, True)}
    assert targets.summary_lines(history, 5) == [
        "target 1.01 x the optimum: reached at round 2, final 1.00400",
        "stopped at round 2 of 5: target reached",
    ]
    history = {"rounds": rows, **targets.outcome(rows, 1.001, True)}
    assert history["reached-target-at"] is None and history["stopped-at-target"] is False
    assert targets.summary_lines(history, 3) == [
        "target 1.001 x the optimum: not reached in 3 rounds (best 1.00350 at round 3)"
    ]
    assert targets.summary_lines({"rounds": rows, **targets.outcome(rows, 0.0, False)}) == []


# ----------------------------------------------------------------------------------------------
# the ServerApp, in process
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("target-data"), 2, 200, 4, 5, 300)


# batch-size 32 (mini-batches, the default before auto): a run that reaches the target after a few
# rounds, not in the first (batch-size = auto reaches the optimum in round 1 on this data)
def run(shards, run_dir, sabotage=None, grids=None, **config):
    uris, test = shards
    settings = {"test-uri": test, "num-server-rounds": ROUNDS, "seed": 5, "batch-size": 32, **config}
    return run_in_process(uris, str(run_dir), sabotage=sabotage, grids=grids, **settings)


def history_of(run_dir) -> dict:
    with open(os.path.join(str(run_dir), "history.json")) as handle:
        return json.load(handle)


def checkpoint(run_dir, server_round: int) -> np.ndarray:
    with np.load(os.path.join(str(run_dir), "checkpoints", f"round-{server_round:04d}.npz")) as ckpt:
        return np.append(ckpt["kernel"].ravel(), ckpt["bias"])


def standardized(manifest: dict) -> np.ndarray:
    weights = manifest["standardized-weights"]
    return np.array(weights["kernel"] + [weights["bias"]], np.float32)


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    """The same federation with the same target, reporting only: all ROUNDS rounds."""
    out = tmp_path_factory.mktemp("target-full") / "run"
    status, manifest = run(shards, out, **{"target-mse-ratio": LOOSE})
    return out, status, manifest


@pytest.fixture(scope="module")
def stopped_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("target-stop") / "run"
    status, manifest = run(shards, out, **{"target-mse-ratio": LOOSE, "stop-at-target": True})
    return out, status, manifest


def test_without_stop_at_target_the_run_goes_on_and_reports(full_run):
    out, status, manifest = full_run
    history = history_of(out)
    assert status["status"] == "completed" and status["message"] == ""
    assert [row["round"] for row in history["rounds"]] == list(range(ROUNDS + 1))
    ratios = [row["test-mse-ratio"] for row in history["rounds"]]
    assert ratios[REACHED_AT] <= LOOSE < ratios[REACHED_AT - 1]  # the measured figures this file relies on
    for record in (history, manifest):
        assert record["target-mse-ratio"] == LOOSE
        assert record["reached-target-at"] == REACHED_AT
        assert record["stopped-at-target"] is False
    assert "stopped" not in history


def test_stop_at_target_ends_after_the_first_round_that_reaches_it_and_exports_that_round(stopped_run, full_run):
    out, status, manifest = stopped_run
    assert status["status"] == "completed"
    assert status["message"] == (
        f"target {LOOSE:g} x the optimum: reached at round {REACHED_AT}, "
        f"final {history_of(out)['rounds'][-1]['test-mse-ratio']:.5f}; stopped at round {REACHED_AT} of {ROUNDS}: "
        "target reached"
    )
    history = history_of(out)
    assert [row["round"] for row in history["rounds"]] == list(range(REACHED_AT + 1))
    for record in (history, manifest):
        assert record["target-mse-ratio"] == LOOSE
        assert record["reached-target-at"] == REACHED_AT
        assert record["stopped-at-target"] is True
    assert history["stopped"]["round"] == REACHED_AT
    assert manifest["final"]["round"] == REACHED_AT
    names = sorted(os.listdir(os.path.join(str(out), "checkpoints")))
    assert names == ["latest.json"] + [f"round-{r:04d}.npz" for r in range(1, REACHED_AT + 1)]
    # the exported model is round REACHED_AT's checkpoint, the same as the uninterrupted run's at that round
    np.testing.assert_array_equal(standardized(manifest), checkpoint(out, REACHED_AT))
    np.testing.assert_array_equal(checkpoint(out, REACHED_AT), checkpoint(full_run[0], REACHED_AT))
    assert os.path.exists(os.path.join(str(out), "model", "saved_model.pb"))


def test_an_unreachable_target_runs_every_round_and_says_not_reached(shards, tmp_path):
    out = tmp_path / "run"
    status, manifest = run(shards, out, **{"target-mse-ratio": UNREACHABLE, "stop-at-target": True})
    assert status["status"] == "completed" and status["message"] == ""
    history = history_of(out)
    assert [row["round"] for row in history["rounds"]] == list(range(ROUNDS + 1))
    assert manifest["reached-target-at"] is None and manifest["stopped-at-target"] is False
    best = min(history["rounds"][1:], key=lambda row: row["test-mse-ratio"])
    assert targets.summary_lines(history, ROUNDS) == [
        f"target {UNREACHABLE:g} x the optimum: not reached in {ROUNDS} rounds "
        f"(best {best['test-mse-ratio']:.5f} at round {best['round']})"
    ]


def test_a_run_killed_before_the_target_resumes_and_stops_at_the_same_round(shards, stopped_run, tmp_path):
    out = tmp_path / "run"
    config = {"target-mse-ratio": LOOSE, "stop-at-target": True}
    with pytest.raises(Crash):  # the server dies when it sends round 2's first train task
        uris, test = shards
        grid = InProcessGrid(uris, {"run-dir": str(out), "min-available-nodes": 2, "test-uri": test,
                                    "num-server-rounds": ROUNDS, "seed": 5, "batch-size": 32, **config}, crash_after(2))  # fmt: skip
        drive(grid, grid.run_config)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 1
    status, manifest = run(shards, out, **config)
    assert status["status"] == "completed"
    history = history_of(out)
    assert history["resumed-at"] == [1] and history["reached-target-at"] == REACHED_AT
    assert [row["round"] for row in history["rounds"]] == list(range(REACHED_AT + 1))
    np.testing.assert_array_equal(standardized(manifest), standardized(stopped_run[2]))


def test_a_run_killed_after_the_target_round_was_checkpointed_trains_no_further(shards, stopped_run, tmp_path):
    """Killed between the checkpoint of the round that reached the target and the export: the same
    command exports that round's model without running another round."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run[0], out)
    shutil.rmtree(out / "model")
    os.remove(out / "manifest.json")
    history = history_of(out)
    for key in ("reached-target-at", "stopped-at-target", "stopped"):
        del history[key]
    RunStore(str(out)).write_history(history)
    RunStore(str(out)).write_status("running")  # as a killed run leaves it
    grids: list = []
    status, manifest = run(shards, out, grids=grids, **{"target-mse-ratio": LOOSE, "stop-at-target": True})
    assert status["status"] == "completed" and manifest["stopped-at-target"] is True
    assert not [msg for msg in grids[0].sent if msg.metadata.message_type == "train"]
    np.testing.assert_array_equal(standardized(manifest), standardized(stopped_run[2]))


def crashed_past_the_target(shards, out, **config):
    """A run with the target but without stop-at-target, killed after round 4 (the target was reached at 3)."""
    uris, test = shards
    with pytest.raises(Crash):  # the server dies when it sends round 5's first train task
        grid = InProcessGrid(uris, {"run-dir": str(out), "min-available-nodes": 2, "test-uri": test,
                                    "num-server-rounds": ROUNDS, "seed": 5, "batch-size": 32, **config}, crash_after(8))  # fmt: skip
        drive(grid, grid.run_config)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 4


def test_stop_at_target_turned_on_after_the_target_round_passed_is_refused_naming_that_round(shards, tmp_path):
    """The run cannot go back to round 3: refused (nothing written), and it resumes as it was started."""
    out = tmp_path / "run"
    crashed_past_the_target(shards, out, **{"target-mse-ratio": LOOSE})
    status, manifest = run(shards, out, **{"target-mse-ratio": LOOSE, "stop-at-target": True})
    assert status["status"] == "failed" and manifest is None
    assert status["message"] == (
        f"{out}: 'target-mse-ratio' {LOOSE:g} was reached at round {REACHED_AT}, before the checkpoint after round 4 "
        f"this run resumes from, so 'stop-at-target' cannot stop there; resume without it (round {REACHED_AT}'s "
        f"weights are in checkpoints/round-{REACHED_AT:04d}.npz), or choose another run-dir"
    )
    status, manifest = run(shards, out, **{"target-mse-ratio": LOOSE})
    assert status["status"] == "completed" and manifest["reached-target-at"] == REACHED_AT
    assert manifest["final"]["round"] == ROUNDS and manifest["stopped-at-target"] is False


def test_a_resumed_run_says_afresh_why_it_stopped(shards, stopped_run, tmp_path):
    """Stopped at the target, killed before the export, resumed without stop-at-target: it trains on to
    the last round, and nothing of the first invocation's stop is left in its history."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run[0], out)
    shutil.rmtree(out / "model")
    os.remove(out / "manifest.json")
    assert history_of(out)["stopped"]["round"] == REACHED_AT
    RunStore(str(out)).write_status("running")  # as a killed run leaves it
    status, manifest = run(shards, out, **{"target-mse-ratio": LOOSE})
    assert status["status"] == "completed" and status["message"] == ""
    history = history_of(out)
    assert "stopped" not in history and history["stopped-at-target"] is False
    assert history["reached-target-at"] == REACHED_AT and manifest["final"]["round"] == ROUNDS


def test_a_round_that_was_not_aggregated_never_reaches_the_target():
    """Its row evaluates the previous model (here the initial one): nothing was trained to reach it."""
    rows = [{"round": 0, "test-mse-ratio": 1.0}, {"round": 1, "test-mse-ratio": 1.0, "not-aggregated": "1 of 2"},
            {"round": 2, "test-mse-ratio": 1.02}]  # fmt: skip
    assert targets.reached_at(rows, 1.05) == 2


def test_the_ratio_must_exist_at_run_time(shards, tmp_path):
    """Privacy without statistics-uri: no optimum to compare with; refused before round 1."""
    status, _ = run(shards, tmp_path / "run", **{"target-mse-ratio": LOOSE, "dp": "central-server-clip"})
    assert status["status"] == "failed"
    assert status["message"].startswith(
        "config key 'target-mse-ratio' needs test MSE / the optimum's, which this run lacks: no pooled least-squares "
        "optimum (none: privacy is on and no statistics-uri was given)"
    )
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_report_draws_the_target_and_says_whether_it_was_reached(stopped_run, monkeypatch, tmp_path):
    drawn = []
    real = report.line_plot

    def spy(title, *args, **kwargs):
        drawn.append((title, kwargs.get("target")))
        return real(title, *args, **kwargs)

    monkeypatch.setattr(report, "line_plot", spy)
    run_dir = report.load_run(str(stopped_run[0]))
    plots = report.run_plots(run_dir)
    assert ("Test MSE / least-squares test MSE", (f"target {LOOSE:g}", LOOSE)) in drawn
    page = report.report_html(run_dir, plots)
    assert f"Target {LOOSE:g} x the optimum: reached at round {REACHED_AT}, final " in page
    assert f"Stopped at round {REACHED_AT} of {ROUNDS}: target reached." in page
    assert page.count("target reached") == 1  # not a second time as the generic "Stopped after round"


# ----------------------------------------------------------------------------------------------
# fedlinear run, real Flower processes
# ----------------------------------------------------------------------------------------------


@pytest.mark.e2e  # a real federation (Flower's runtime, real processes)
def test_cli_stops_at_the_target_and_a_second_run_is_refused_as_completed(tmp_path):
    data = tmp_path / "data"
    write_federation(str(data), clients=2)
    out = tmp_path / "run"
    args = ["run", "--data", data, "--rounds", 4, "--out", out, "--set", "seed=5", "--target", 1.05, "--stop-at-target"]
    done = run_cli(*args, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    history = history_of(out)
    at = history["reached-target-at"]
    assert at is not None and at < 4 and history["rounds"][-1]["round"] == at
    reached = f"target 1.05 x the optimum: reached at round {at}, final {history['rounds'][-1]['test-mse-ratio']:.5f}"
    stopped = f"stopped at round {at} of 4: target reached"
    lines = done.stdout.splitlines()
    assert lines.count(reached) == 2 and lines.count(stopped) == 2  # the ServerApp's log line, then the summary
    manifest = json.loads((out / "manifest.json").read_text())
    np.testing.assert_array_equal(standardized(manifest), checkpoint(out, at))

    again = run_cli(*args, timeout=300)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"fedlinear: error: {out} already holds a completed run (status.json); choose another --out or remove it"
    ]


def test_cli_target_options_are_checked_before_anything_runs(tmp_path):
    data = tmp_path / "data"
    write_federation(str(data), clients=2)
    for extra, message in (
        (["--target", "0.5"], "config key 'target-mse-ratio' must be 0 (no target) or a finite number >= 1"),
        (["--stop-at-target"], "config key 'stop-at-target' = true needs a 'target-mse-ratio'"),
        (["--target", "1.1", "--set", "target-mse-ratio=1.2"], "give target-mse-ratio one way"),
        (["--target", "1.1", "--set", "reference=none"], "'reference' = none does not compute"),
    ):
        done = run_cli("run", "--data", data, "--rounds", 2, "--out", tmp_path / "run", *extra, timeout=120)
        assert done.returncode == 1
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("fedlinear: error: ") and message in line
        assert not (tmp_path / "run" / "status.json").exists()
