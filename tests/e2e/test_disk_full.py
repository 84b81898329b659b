"""A run whose disk fills mid-run: one line naming the file and "No space left on device", ``status.json``
``failed`` with that reason, the last checkpoint loads, and the same command resumes once there is room.

The run directory (logs included, as `fedlinear run` puts them there) is on a 4 MiB tmpfs; the data is
elsewhere. Once round 2 is reported, a filler file takes every free byte, so the ServerApp's next write
fails (as does the launcher's log). Real processes: `fedlinear run` with a SuperLink and two SuperNodes.
Needs root to mount the tmpfs; skipped, with the reason printed, where that is not permitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from fedlinear.common.runstore import RESERVE_FILE, RunStore
from tests.conftest import REPO, run_cli, write_federation

ROUNDS = 6
BOUND_S = 1800  # generous: only a hang gets near it


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory) -> str:
    """Take every free byte of ``directory``'s filesystem; return the filler's path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as handle:
        block = b"\0" * 65536
        while True:
            try:
                handle.write(block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    return path


def test_a_full_disk_is_named_and_the_run_resumes_after(small_disk, tmp_path):
    data, out = tmp_path / "data", small_disk / "run"
    write_federation(str(data), clients=2, samples=200, features=3)
    args = ["run", "--data", str(data), "--rounds", str(ROUNDS), "--out", str(out), "--isolation", "none"]
    proc = subprocess.Popen([sys.executable, "-m", "fedlinear.scripts.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    lines: list[str] = []
    filled: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not filled and line.startswith("round   2 |"):
                filled.append(fill(small_disk))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        err = proc.stderr.read()
        proc.wait(timeout=BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=60)
    output = "".join(lines) + err
    assert filled, "round 2 was never reported:\n" + output
    assert proc.returncode == 1, output
    [line] = err.strip().splitlines()
    assert line.startswith(f"fedlinear: error: {out}/") and "cannot write (No space left on device)" in line, output
    store = RunStore(str(out))
    pointer, weights = store.read_latest_checkpoint()  # the checkpoint loads
    assert pointer["round"] >= 1 and np.all(np.isfinite(weights.kernel)), pointer
    assert f"last checkpoint: round {pointer['round']}: " in line and "run the same command again to resume" in line
    status = store.read_status()
    assert status["status"] == "failed" and "No space left on device" in status["message"], status
    assert line.startswith(f"fedlinear: error: {status['message']}")  # the file the ServerApp could not write

    os.remove(filled[0])  # room again: the same command resumes and finishes
    done = run_cli(*args, timeout=BOUND_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming after round {pointer['round']}" in done.stdout, done.stdout
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history["rounds"]] == list(range(ROUNDS + 1))
    assert history["resumed-at"] == [pointer["round"]]
    assert store.read_status()["status"] == "completed"
    assert not (out / RESERVE_FILE).exists()  # the room held for the last status is given back


def test_where_status_json_cannot_be_written_the_line_says_so(tmp_path, monkeypatch):
    """The launcher's own fallback (no room even for the ServerApp's reserve): its line says status.json
    still says running, and why."""
    from fedlinear.common import storage
    from fedlinear.common.errors import FedLinearError
    from fedlinear.scripts.cli.run import mark_interrupted

    store = RunStore(str(tmp_path / "run"))
    store.write_status("running", run_id=1)

    def full(uri, data, private=False):
        raise FedLinearError(f"{uri}: cannot write (No space left on device)")

    monkeypatch.setattr(storage, "write_bytes", full)
    error = mark_interrupted(store, FedLinearError("the ServerApp ended without finishing the run"))
    assert str(error) == (
        "the ServerApp ended without finishing the run; no round was checkpointed: run the same command again to "
        f"resume (status.json still says running: {tmp_path}/run/status.json: cannot write (No space left on device))"
    )
