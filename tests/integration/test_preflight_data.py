"""``fedlinear run`` with user shards (``--data DIR``) on a run directory whose checkpoints were trained on
other shards is refused by the preflight (scripts/cli/preflight.py), with the ServerApp's own rule
(server/resume.py ``refuse_other_data``), before the lock, ``logs/`` or anything else is written.

The checkpoints come from the real ServerApp in-process (tests/inprocess.py); the refused invocation is
the real CLI in-process, refused before any federation starts.
"""

from __future__ import annotations

import shutil

import pytest

from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.scripts.cli import main as cli
from fedlinear.scripts.cli import preflight
from tests.e2e.test_refusal import local_snapshot
from tests.inprocess import run_in_process, write_synthetic_shards

ROUNDS = {"num-server-rounds": 2}


@pytest.fixture()
def interrupted(tmp_path):
    """A run directory with the checkpoints of a 2-party run on ``data/`` whose status says failed."""
    uris, test = write_synthetic_shards(tmp_path / "data", 2, 200, 3, 5, 100)
    run_dir = str(tmp_path / "run")
    status, _ = run_in_process(uris, run_dir, **ROUNDS, **{"test-uri": test})
    assert status["status"] == "completed", status
    store = RunStore(run_dir)
    store.write_status("failed", "killed")
    assert store.read_latest_checkpoint() is not None
    return tmp_path, uris, test, run_dir


def edited_copy(root, name: str, edit) -> str:
    """A copy of ``root/data`` with file ``name`` rewritten by ``edit(bytes) -> bytes``."""
    other = root / f"other-{name}"
    shutil.copytree(root / "data", other)
    path = other / name
    path.write_bytes(edit(path.read_bytes()))
    return str(other)


def one_value_changed(content: bytes) -> bytes:
    lines = content.splitlines(keepends=True)
    first = lines[-1].split(b",", 1)
    lines[-1] = b"12345.5," + first[1]
    return b"".join(lines)


@pytest.mark.parametrize(
    "name, edit, says",
    [
        ("client-1.csv", one_value_changed, "the shard of client key 1 has different content (fingerprint)"),
        ("client-0.csv", lambda b: b"".join(b.splitlines(keepends=True)[:-1]), "the shard of client key 0 has 199 rows, was 200"),
        ("test.csv", one_value_changed, "the test set ('test-uri') has different content"),
    ],
)
def test_other_user_shards_are_refused_before_anything_is_written(interrupted, capsys, name, edit, says):
    root, _, _, run_dir = interrupted
    other = edited_copy(root, name, edit)
    before = local_snapshot(run_dir)
    code = cli(["run", "--data", other, "--rounds", "2", "--out", run_dir, "--isolation", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("fedlinear: error: "), err
    assert "holds checkpoints trained on other data" in err[0] and says in err[0], err
    assert local_snapshot(run_dir) == before  # byte for byte, file list included: no .lock, no logs/


def test_the_preflight_says_what_the_server_app_says_and_passes_the_same_data(interrupted):
    """The same rule: the ServerApp, given the edited shards, refuses with the very message the preflight
    gives; the checkpoint's own shards (another path, the same bytes) pass the preflight."""
    root, uris, test, run_dir = interrupted
    other = edited_copy(root, "client-1.csv", one_value_changed)
    shards = [f"{other}/client-0.csv", f"{other}/client-1.csv"]
    cfg = RunConfig.from_run_config({**ROUNDS, "run-dir": run_dir, "test-uri": f"{other}/test.csv"})
    store = RunStore(run_dir)
    with pytest.raises(FedLinearError) as refused:
        preflight.refuse_other_checkpoint(store, cfg, None, shards, cfg.test_uri)
    status, _ = run_in_process(shards, run_dir, **ROUNDS, **{"test-uri": cfg.test_uri})
    assert status["status"] == "failed" and status["message"] == str(refused.value)
    same = str(root / "same")
    shutil.copytree(root / "data", same)
    copies = [f"{same}/client-0.csv", f"{same}/client-1.csv"]
    preflight.refuse_other_checkpoint(store, cfg, None, copies, f"{same}/test.csv")  # not refused
