"""The stall detector (scripts/local/watch.py): stalled only after an authentication failure in the
SuperLink's log and no progress for the window; progress (output or run-dir files) resets it."""

from __future__ import annotations

import os

from fedlinear.scripts.local.watch import AUTH_FAILURE, StallDetector

REFUSED = (
    f"\x1b[91mERROR \x1b[0m:     [/v1/runtime/send-task-heartbeat][ApiError:1008] {AUTH_FAILURE}.\n"
    '2026-12-07T01:01:38.706Z INFO [uvicorn.access] 127.0.0.1:50670 - "POST /v1/runtime/send-task-heartbeat HTTP/1.1" 401\n'
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stalled_only_with_auth_failures_and_no_progress(tmp_path):
    log = tmp_path / "superlink.log"
    log.write_text("INFO: Starting Flower SuperExec\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    clock = Clock()
    detector = StallDetector(str(log), str(run_dir), stall_seconds=100, clock=clock)
    clock.now = 500  # a long quiet round is no stall without the runtime's failures
    assert detector.check() is None
    with open(log, "a") as handle:
        handle.write(REFUSED)
    cause = detector.check()  # 500 s idle and refused: stalled
    assert cause is not None and "run the same command again to resume" in cause and "\n" not in cause
    assert "task token 1 time(s)" in cause


def test_progress_resets_the_window(tmp_path):
    log = tmp_path / "superlink.log"
    log.write_text(REFUSED)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    clock = Clock()
    detector = StallDetector(str(log), str(run_dir), stall_seconds=100, clock=clock)
    clock.now = 90
    assert detector.check() is None  # refused, but not idle long enough
    (run_dir / "history.json").write_text("{}")  # a round was recorded: the runtime recovered
    clock.now = 150
    assert detector.check() is None
    assert detector.failures == 0
    clock.now = 300  # idle again, but no new failure since the progress
    assert detector.check() is None
    with open(log, "a") as handle:
        handle.write(REFUSED)
    assert detector.check() is not None
    detector.progress()  # an output line of flwr run
    assert detector.check() is None


def test_a_partial_line_is_read_when_complete(tmp_path):
    log = tmp_path / "superlink.log"
    first, second = REFUSED.split("\n", 1)
    log.write_text(first[:30])
    clock = Clock()
    detector = StallDetector(str(log), "", stall_seconds=1, clock=clock)
    clock.now = 10
    assert detector.check() is None
    with open(log, "a") as handle:
        handle.write(first[30:] + "\n")
    assert detector.check() is not None


def test_window_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLINEAR_STALL_SECONDS", "7")
    assert StallDetector(str(tmp_path / "none.log")).stall_seconds == 7.0
    monkeypatch.delenv("FEDLINEAR_STALL_SECONDS")
    assert StallDetector(str(tmp_path / "none.log")).stall_seconds == 120.0
    assert os.path.exists(tmp_path) and StallDetector(str(tmp_path / "none.log")).check() is None
