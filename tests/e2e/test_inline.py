"""``fedlinear run --mode inline`` against ``--mode simulation`` (Flower's simulation engine, Ray):
the same seed gives bit-identical weights, checkpoints and exported model, and the same run
directory; what inline mode cannot do is refused in one line naming the mode to use."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from tests import bounded
from tests.conftest import run_cli, write_federation

ROUNDS = 4
NAMES = [f"checkpoints/round-{r:04d}.npz" for r in range(1, ROUNDS + 1)] + [
    "model/variables/variables.data-00000-of-00001"
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("inline-fed"))
    write_federation(data, clients=4, samples=250, features=6, seed=13)
    paths = {mode: str(tmp_path_factory.mktemp(mode) / "run") for mode in ("simulation", "inline")}

    def run(mode):
        return run_cli("run", "--data", data, "--rounds", ROUNDS, "--out", paths[mode], "--mode", mode,
                       "--set", "seed=11", "--set", "fraction-train=0.75")  # fmt: skip

    # independent processes: side by side, each bounded by its own wait
    done = bounded.concurrently({mode: (lambda mode=mode: run(mode)) for mode in paths})
    for mode in paths:
        assert done[mode].returncode == 0, mode + ": " + done[mode].stdout + done[mode].stderr
    return {mode: (paths[mode], done[mode]) for mode in paths}


def read(path, name):
    with open(os.path.join(path, name), "rb") as handle:
        return handle.read()


def test_inline_gives_bit_identical_weights_to_simulation(runs):
    (sim, _), (inl, _) = runs["simulation"], runs["inline"]
    for name in NAMES:
        assert read(inl, name) == read(sim, name), name
    sim_m, inl_m = (json.loads(read(p, "manifest.json")) for p in (sim, inl))
    for key in ("weights", "exported-weights", "standardized-weights", "standardization", "learning-rate"):
        assert inl_m[key] == sim_m[key], key
    sim_h, inl_h = (json.loads(read(p, "history.json")) for p in (sim, inl))
    keys = ("train-loss", "test-mse", "clients-ok", "clients-failed")
    assert [[r.get(k) for k in keys] for r in inl_h["rounds"]] == [[r.get(k) for k in keys] for r in sim_h["rounds"]]


def test_inline_writes_the_run_directory_and_summary_of_the_other_modes(runs):
    (sim, _), (inl, done) = runs["simulation"], runs["inline"]
    assert sorted(os.listdir(inl)) == sorted(os.listdir(sim))
    assert sorted(os.listdir(os.path.join(inl, "checkpoints"))) == sorted(os.listdir(os.path.join(sim, "checkpoints")))
    assert json.loads(read(inl, "status.json"))["status"] == "completed"
    assert "inline mode" in done.stdout and "x the pooled least-squares optimum" in done.stdout
    assert f"round {ROUNDS:>3} | train loss" in done.stdout
    assert "INFO" not in done.stdout + done.stderr  # Flower's own log lines go to logs/inline.log
    assert os.path.exists(os.path.join(inl, "logs", "inline.log"))


def test_what_inline_cannot_do_is_refused_in_one_line(tmp_path):
    data = str(tmp_path / "data")
    write_federation(data, clients=2)
    done = run_cli("run", "--data", data, "--rounds", 1, "--out", tmp_path / "run", "--mode", "inline",
                   env={"FEDLINEAR_TEST_FAULTS": "1:kill-supernode@1"})  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "fedlinear: error: FEDLINEAR_TEST_FAULTS kill-supernode kills a SuperNode process: use --mode processes"
    ]


def test_worker_processes_die_with_a_killed_run_and_the_rerun_resumes(tmp_path):
    """``--pool processes`` (what ``auto`` picks from 256 nodes): SIGKILL of ``fedlinear run`` while a
    worker is in the middle of a long task (party 0 sleeps through round 3) takes the workers with it
    (PR_SET_PDEATHSIG; otherwise the sleeping one would hold the run directory's lock for an hour), and
    the rerun resumes from round 2's checkpoint to the weights of an uninterrupted run."""
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import REPO

    data = str(tmp_path / "data")
    write_federation(data, clients=4, samples=200, features=3, seed=7)

    def args(out):
        return ["run", "--mode", "inline", "--pool", "processes", "--workers", "2", "--data", data, "--rounds", "4",
                "--out", out, "--set", "seed=5"]  # fmt: skip

    whole = run_cli(*args(str(tmp_path / "whole")))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    out, marks = str(tmp_path / "killed"), tmp_path / "marks"
    marks.mkdir()
    log_path = tmp_path / "killed.log"
    env = {**os.environ, "FEDLINEAR_TEST_FAULTS": "0:sleep=3600@3", "FEDLINEAR_TEST_FAULTS_MARKS": str(marks)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedlinear.scripts.cli", *args(out)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    workers: list[psutil.Process] = []
    try:
        mark = marks / "0-3-sleep"  # written by party 0's round-3 task, in the worker that runs it, as it starts to sleep

        def asleep_in_a_worker() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            return mark.exists() and mark.read_text().strip().isdigit()

        bounded.wait_until(asleep_in_a_worker, 60, "party 0's round-3 task started", lambda: log_path.read_text())
        parent = psutil.Process(proc.pid)
        workers = [child for child in parent.children() if child.cmdline() == parent.cmdline()]  # forked, not exec'd
        sleeper = int(mark.read_text())
        assert len(workers) == 2 and sleeper in {w.pid for w in workers}, (workers, sleeper)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"worker processes outlived the killed run: {alive}"
    finally:
        for process in [*workers, proc]:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                process.kill()
        proc.wait()
    resumed = run_cli(*args(out))  # no fault this time
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "it resumes from there" in resumed.stdout + resumed.stderr
    for name in NAMES:
        assert read(out, name) == read(str(tmp_path / "whole"), name), name
