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


def test_heartbeat_constants_read_from_flowers_source_equal_the_imported_ones():
    import flwr.common.constant as constant

    from fedlinear.scripts.local import watch

    assert (watch.HEARTBEAT_DEFAULT_INTERVAL, watch.HEARTBEAT_PATIENCE) == (
        constant.HEARTBEAT_DEFAULT_INTERVAL, constant.HEARTBEAT_PATIENCE)  # fmt: skip
    assert watch.STALL_SECONDS == 2.0 * constant.HEARTBEAT_PATIENCE * constant.HEARTBEAT_DEFAULT_INTERVAL


def test_a_name_not_assigned_a_literal_in_the_source_comes_from_the_import_or_fails_loudly():
    import flwr.common.constant as constant
    import pytest

    from fedlinear.scripts.local.watch import flower_constants

    # an f-string in Flower 1.42, not a literal: taken from the imported module
    assert flower_constants("CONTROL_API_DEFAULT_SERVER_ADDRESS") == (constant.CONTROL_API_DEFAULT_SERVER_ADDRESS,)
    with pytest.raises(AttributeError):  # a name Flower no longer has: an error, never a guess
        flower_constants("NO_SUCH_FLOWER_CONSTANT")


def test_the_launcher_imports_no_flower_numpy_or_grpc():
    """The launcher's processes (outer, the namespace's init and its child) only start Flower's processes;
    importing Flower there cost ~50 MiB and ~0.45 s in each (issue 21's profile)."""
    import subprocess
    import sys

    code = ("import sys, fedlinear.scripts.local.launch, fedlinear.scripts.local.watch as w; "
            "w.StallDetector('/nonexistent'); "
            "print(sorted(m for m in ('flwr', 'numpy', 'grpc', 'google.protobuf', 'ray', 'tensorflow') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
