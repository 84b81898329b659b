"""Nothing is lost: atomic and durable writes, the background writer's order, file modes, what resume
refuses, and a completed run that no second invocation touches."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedlinear.common import model as lm
from fedlinear.common import storage
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.server import resume, server_app
from tests import bounded
from tests.conftest import REPO, run_cli
from tests.inprocess import Crash, InProcessGrid, crash_after, run_in_process, write_synthetic_shards

ROUNDS = 4


def weights(value: float, d: int = 3) -> lm.LinearWeights:
    return lm.LinearWeights(kernel=np.full((d, 1), value, np.float32), bias=np.array([value], np.float32))


def two_rounds(store: RunStore) -> None:
    """History through round 1 and the checkpoint of round 1."""
    store.write_history({"rounds": [{"round": 0}, {"round": 1}]})
    store.write_checkpoint(1, weights(1.0), {"note": "one"})


def snapshot(root, derived: bool = True) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and mode (without ``tensorboard/``, a view rebuilt from
    the history, unless ``derived``)."""
    out = {}
    for folder, _, files in os.walk(root):
        if not derived and os.path.relpath(folder, root).split(os.sep)[0] == "tensorboard":
            continue
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = (handle.read(), os.stat(path).st_mode)
    return out


def hidden(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


# ------------------------------------------------------------------------------------------------
# 1. An interrupted write leaves the previous checkpoint and history readable
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_at", [1, 2], ids=["before-npz-rename", "before-pointer-rename"])
def test_a_crash_between_temp_file_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    store = RunStore(str(tmp_path / "run"))
    two_rounds(store)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise Crash  # the process dies here: nothing may catch it
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        store.write_checkpoint(2, weights(2.0), {"note": "two"})
    monkeypatch.setattr(os, "replace", real_replace)

    pointer, saved = store.read_latest_checkpoint()
    assert pointer["round"] == 1 and pointer["note"] == "one"
    np.testing.assert_array_equal(saved.kernel, weights(1.0).kernel)
    assert [row["round"] for row in store.read_history()["rounds"]] == [0, 1]
    assert hidden(tmp_path / "run" / "checkpoints") == []  # the temp file was removed on the way out
    # and the run resumes after round 1
    cfg = RunConfig(num_server_rounds=3)
    store.write_checkpoint(1, weights(1.0), resume.trajectory_key(cfg, 3))
    assert resume.resume_or_start(store, cfg, 3).first_round == 2


KILLER = r"""
import os, signal, sys
import numpy as np
from fedlinear.common import model as lm
from fedlinear.common.runstore import RunStore
store = RunStore(sys.argv[1])
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # die with the temp file written
store.write_checkpoint(2, lm.LinearWeights(kernel=np.full((3, 1), 2, np.float32), bias=np.full(1, 2, np.float32)), {})
"""


def test_a_process_killed_mid_write_leaves_a_temp_file_that_is_ignored_then_cleaned(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    two_rounds(store)
    done = bounded.run([sys.executable, "-c", KILLER, store.run_dir], cwd=REPO, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    folder = tmp_path / "run" / "checkpoints"
    [left] = hidden(folder)
    assert left.startswith(storage.TEMP_PREFIX) and left.endswith("-round-0002.npz")
    assert (folder / left).stat().st_size > 0  # written, fsync'd, never renamed
    assert store.read_latest_checkpoint()[0]["round"] == 1
    assert storage.list_uris(str(folder) + "/") == [str(folder / "latest.json"), str(folder / "round-0001.npz")]
    store.write_checkpoint(2, weights(2.0), {})  # the next write of that file removes the dead writer's temp
    assert hidden(folder) == []
    assert store.read_latest_checkpoint()[0]["round"] == 2


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    mine = folder / f"{storage.TEMP_PREFIX}{storage.temp_owner()}-abc-x.json"  # alive: maybe mid-write
    mine.write_bytes(b"partial")
    dead_elsewhere = folder / f"{storage.TEMP_PREFIX}999999999.0000abcd.1-abc-x.json"  # another host/namespace
    dead_elsewhere.write_bytes(b"partial")
    storage.write_bytes(str(folder / "x.json"), b"{}")
    assert mine.exists() and dead_elsewhere.exists()


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("latest.json", b'{"round": 1', "not a checkpoint pointer"),
        ("latest.json", b'{"round": 1}', "not a checkpoint pointer"),
        ("round-0001.npz", b"PK\x03\x04 truncated", "not a readable checkpoint"),
        ("round-0001.npz", b"", "not a readable checkpoint"),
    ],
)
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, name, content, problem):
    store = RunStore(str(tmp_path / "run"))
    two_rounds(store)
    (tmp_path / "run" / "checkpoints" / name).write_bytes(content)
    with pytest.raises(FedLinearError, match=rf"^{tmp_path}/run/checkpoints/{name}: {problem} \(") as err:
        store.read_latest_checkpoint()
    assert "\n" not in str(err.value)


class Full(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, fd):
        self.fd = fd

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):
        return self.fd

    def close(self):
        os.close(self.fd)
        super().close()


def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous_files(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    two_rounds(store)
    before = snapshot(tmp_path / "run", derived=False)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(fd))
    for write in (
        lambda: store.write_history({"rounds": [{"round": 0}, {"round": 1}, {"round": 2}]}),
        lambda: store.write_checkpoint(2, weights(2.0), {}),
    ):
        with pytest.raises(FedLinearError, match=r"/run/(history\.json|checkpoints/round-0002\.npz): cannot write "
                           r"\(No space left on device\)$"):  # fmt: skip
            write()
    monkeypatch.undo()
    assert snapshot(tmp_path / "run", derived=False) == before  # nothing changed, no temp file left
    assert store.read_latest_checkpoint()[0]["round"] == 1


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_keeps_the_previous_checkpoint_and_history(tiny_disk):
    store = RunStore(str(tiny_disk / "run"), background=True)
    two_rounds(store)
    store.flush()
    before = snapshot(tiny_disk / "run")
    big = lm.LinearWeights(kernel=np.ones((20000, 1), np.float32), bias=np.ones(1, np.float32))  # 80 kB
    store.write_checkpoint(2, big, {})
    with pytest.raises(FedLinearError, match=r"round-0002\.npz: cannot write \(No space left on device\)"):
        store.flush()
    assert snapshot(tiny_disk / "run") == before
    assert RunStore(store.run_dir).read_latest_checkpoint()[0]["round"] == 1
    assert [r["round"] for r in RunStore(store.run_dir).read_history()["rounds"]] == [0, 1]


def test_the_checkpoint_is_durable_before_the_pointer_moves(tmp_path, monkeypatch):
    """fsync(temp npz) -> rename -> fsync(dir) happen before latest.json is renamed into place."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    RunStore(str(tmp_path / "run")).write_checkpoint(7, weights(7.0), {})
    names = [(kind, "temp" if name.startswith(storage.TEMP_PREFIX) else name) for kind, name in events]
    assert names == [
        ("fsync", "temp"), ("rename", "round-0007.npz"), ("fsync", "checkpoints"),
        ("fsync", "temp"), ("rename", "latest.json"), ("fsync", "checkpoints"),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 2. The background writer: nothing after a failed write; flush waits for all, raises the first
# ------------------------------------------------------------------------------------------------


def gated_writes(monkeypatch, fail: tuple[str, ...], gate: threading.Event, slow: tuple[str, ...] = ()):
    """storage.write_bytes that blocks until ``gate`` and fails for names in ``fail``; names in
    ``slow`` take up to 5 s (a write still running)."""
    real = storage.write_bytes
    written = []

    def write_bytes(uri, data, private=False):
        if not threading.current_thread().name.startswith("runstore"):
            return real(uri, data, private)  # the caller's own writes (tensorboard/) are not queued
        assert gate.wait(60)
        name = os.path.basename(uri)
        if name in slow:
            time.sleep(5)
        if name in fail:
            raise FedLinearError(f"{uri}: cannot write (No space left on device)")
        written.append(name)
        return real(uri, data, private)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    return written


def test_a_checkpoint_queued_behind_a_failed_history_write_is_not_written(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"), background=True)
    two_rounds(store)
    store.flush()
    gate = threading.Event()
    written = gated_writes(monkeypatch, fail=("history.json",), gate=gate)
    store.write_history({"rounds": [{"round": r} for r in range(3)]})  # both queued while the writer waits
    store.write_checkpoint(2, weights(2.0), {})
    gate.set()
    with pytest.raises(FedLinearError, match="history.json: cannot write"):
        store.flush()
    assert written == []  # neither metrics.csv (same batch) nor the checkpoint behind it
    monkeypatch.undo()
    assert store.read_latest_checkpoint()[0]["round"] == 1  # history and checkpoint still agree
    with pytest.raises(FedLinearError, match="history.json"):  # every later write refuses, naming the first error
        store.write_checkpoint(3, weights(3.0), {})
    store.write_status("failed", "disk full")  # a failure can still be recorded
    assert store.read_status()["status"] == "failed"


def test_flush_waits_for_every_pending_write_then_raises_the_first_error(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"), background=True)
    gate = threading.Event()
    gated_writes(monkeypatch, fail=("history.json", "latest.json"), gate=gate, slow=("round-0001.npz",))
    store.write_history({"rounds": [{"round": 0}]})
    store.write_checkpoint(1, weights(1.0), {})
    queued = list(store._pending)
    gate.set()
    with pytest.raises(FedLinearError, match="history.json"):  # the first error, not latest.json's
        store.flush()
    assert all(future.done() for future in queued)  # nothing still running behind the raised error
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ------------------------------------------------------------------------------------------------
# 3. File modes follow the umask (like open()); private files are 0600
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_every_file_follows_the_umask(tmp_path, mask):
    from fedlinear.scripts import cli

    expected = 0o666 & ~mask
    with umask(mask):
        store = RunStore(str(tmp_path / "run"))
        two_rounds(store)
        store.write_manifest({"a": 1})
        store.write_status("completed")
        assert cli.main(["data", "synth", "--out", str(tmp_path / "data"), "--clients", "2", "--samples-per-client",
                         "20", "--features", "2", "--seed", "1", "--test-samples", "5"]) == 0  # fmt: skip
        storage.write_bytes(str(tmp_path / "secret"), b"k", private=True)
    files = {**{f"run/{k}": v for k, v in snapshot(tmp_path / "run").items()},
             **{f"data/{k}": v for k, v in snapshot(tmp_path / "data").items()}}  # fmt: skip
    assert {"run/history.json", "run/metrics.csv", "run/manifest.json", "run/status.json", "run/checkpoints/latest.json",
            "run/checkpoints/round-0001.npz", "data/client-0.csv", "data/client-1.csv", "data/test.csv",
            "data/truth.json"} <= set(files)  # fmt: skip
    assert {name: oct(stat.S_IMODE(mode)) for name, (_, mode) in files.items()} == {
        name: oct(expected) for name in files
    }
    assert stat.S_IMODE(os.stat(tmp_path / "secret").st_mode) == 0o600


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_the_exported_model_follows_the_umask(tmp_path, mask):
    from fedlinear.common.export import export_savedmodel

    with umask(mask):
        export_savedmodel(weights(0.5), str(tmp_path / "model"))
    modes = {os.path.relpath(os.path.join(f, n), tmp_path): stat.S_IMODE(os.stat(os.path.join(f, n)).st_mode)
             for f, dirs, names in os.walk(tmp_path / "model") for n in names + dirs}  # fmt: skip
    assert "model/saved_model.pb" in modes
    for name, mode in modes.items():
        is_dir = os.path.isdir(tmp_path / name)
        assert mode == (0o777 if is_dir else 0o666) & ~mask, f"{name}: {oct(mode)}"


# ------------------------------------------------------------------------------------------------
# 4. Resume refuses what would not continue the same run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    uris, test = write_synthetic_shards(root, clients=3, samples=60, features=3, seed=11, test_samples=40)
    return uris, test


SETTINGS = {"num-server-rounds": ROUNDS, "fraction-evaluate": 0.0}


def crashed_run(uris, run_dir, **settings):
    """A run whose server died as round 3's tasks went out: checkpoints of rounds 1 and 2."""
    with pytest.raises(Crash):
        run_in_process(uris, run_dir, sabotage=crash_after(2 * len(uris)), **{**SETTINGS, **settings})
    with open(os.path.join(run_dir, "checkpoints", "latest.json")) as handle:
        assert json.load(handle)["round"] == 2


def refused(uris, run_dir, **settings) -> str:
    """Resume with ``settings``: the message it fails with; the run dir must be left exactly as it was
    (status.json aside, which says failed)."""
    before = snapshot(run_dir)
    status, manifest = run_in_process(uris, run_dir, **{**SETTINGS, **settings})
    assert status["status"] == "failed" and manifest is None
    after = snapshot(run_dir)
    before.pop("status.json"), after.pop("status.json")
    assert after == before
    message = status["message"]
    assert "\n" not in message
    return message


def test_resume_refuses_changed_settings_naming_them(shards, tmp_path):
    uris, test = shards
    run_dir = str(tmp_path / "run")
    crashed_run(uris, run_dir, **{"test-uri": test})
    for key, value, shown in (
        ("target-column", 0, "target-column -1 -> 0"),
        ("header", "no", "header 'auto' -> 'no'"),
        ("reference", "none", "reference 'auto' -> 'none'"),
        ("seed", 43, "seed 42 -> 43"),
    ):
        message = refused(uris, run_dir, **{"test-uri": test, key: value})
        assert "holds checkpoints of a different run" in message and shown in message, message
    message = refused(uris, run_dir, **{"test-uri": test, "num-server-rounds": 1})
    assert "checkpoint after round 2 but 'num-server-rounds' is 1; set it to 2 or more" in message
    status, _ = run_in_process(uris, run_dir, **{**SETTINGS, "test-uri": test})  # the same settings resume
    assert status["status"] == "completed"


def test_a_checkpoint_from_before_a_key_existed_resumes_with_that_key_at_its_default(shards, tmp_path):
    """A checkpoint written by a version without a key added since (server.resume.ADDED_KEYS) ran as that
    key's default does: resuming with the default continues it; another value is refused, naming the
    default as the old value. Any other missing trajectory key is still a different run."""
    uris, test = shards
    run_dir = str(tmp_path / "run")
    crashed_run(uris, run_dir, **{"test-uri": test})
    latest = os.path.join(run_dir, "checkpoints", "latest.json")
    with open(latest) as handle:
        pointer = json.load(handle)
    original = dict(pointer)
    del pointer["max-update-norm-factor"]  # as fedlinear wrote it before that key existed
    with open(latest, "w") as handle:
        json.dump(pointer, handle)
    message = refused(uris, run_dir, **{"test-uri": test, "max-update-norm-factor": 4.0})
    assert "holds checkpoints of a different run (max-update-norm-factor 0.0 -> 4.0)" in message, message
    # only keys listed as added later default: one whose default changed what training does does not
    del original["standardize"]
    with open(latest, "w") as handle:
        json.dump(original, handle)
    message = refused(uris, run_dir, **{"test-uri": test})
    assert "holds checkpoints of a different run (standardize None -> 'auto')" in message, message
    with open(latest, "w") as handle:  # back to the checkpoint without only the added key
        json.dump(pointer, handle)
    status, _ = run_in_process(uris, run_dir, **{**SETTINGS, "test-uri": test})
    assert status["status"] == "completed", status


def copy_files(uris, directory):
    """Copies of the shard files in ``directory`` (same bytes, another path)."""
    directory.mkdir()
    copies = [str(directory / os.path.basename(uri)) for uri in uris]
    for uri, copy in zip(uris, copies, strict=True):
        shutil.copyfile(uri, copy)
    return copies


def test_resume_refuses_changed_data(shards, tmp_path):
    uris, test = shards
    copies = copy_files(uris, tmp_path / "data")
    test_copy = str(tmp_path / "data" / "test.csv")
    with open(test, "rb") as src, open(test_copy, "wb") as dst:
        dst.write(src.read())
    run_dir = str(tmp_path / "run")
    crashed_run(copies, run_dir, **{"test-uri": test_copy})

    message = refused(copies[:2], run_dir, **{"test-uri": test_copy})
    assert "trained on other data: shards of client keys [2] are missing" in message
    original = open(copies[1], "rb").read()
    lines = original.decode().splitlines(keepends=True)
    at = next(i for i, c in enumerate(lines[0]) if c.isdigit())
    changed = lines[0][:at] + str((int(lines[0][at]) + 1) % 10) + lines[0][at + 1 :]
    with open(copies[1], "w") as handle:  # same rows, one digit changed
        handle.write(changed + "".join(lines[1:]))
    message = refused(copies, run_dir, **{"test-uri": test_copy})
    assert "the shard of client key 1 has different content (fingerprint)" in message
    with open(copies[1], "w") as handle:  # a row fewer
        handle.write("".join(lines[:-1]))
    message = refused(copies, run_dir, **{"test-uri": test_copy})
    assert "the shard of client key 1 has 59 rows, was 60" in message
    with open(copies[1], "wb") as handle:
        handle.write(original)
    with open(test_copy, "ab") as handle:
        handle.write(b"1,2,3,4\n")
    message = refused(copies, run_dir, **{"test-uri": test_copy})
    assert message.endswith("the test set ('test-uri') has different content (fingerprint); "
                            "resume with the same data or choose another run-dir")  # fmt: skip
    status, _ = run_in_process(copies, run_dir, **{**SETTINGS, "test-uri": test})
    assert status["status"] == "completed", status  # same bytes at another path are the same data


def test_under_privacy_resume_compares_what_the_nodes_reveal(shards, tmp_path):
    """Nodes withhold fingerprints under privacy: a changed row count is caught, changed values are not."""
    uris, _ = shards
    copies = copy_files(uris, tmp_path / "data")
    private = {"dp": "central-server-clip", "standardize": "none"}
    run_dir = str(tmp_path / "run")
    crashed_run(copies, run_dir, **private)
    with open(os.path.join(run_dir, "checkpoints", "latest.json")) as handle:
        recorded = json.load(handle)["data"]
    assert recorded["shards"] == [{"client-key": k, "num-examples": 60} for k in range(3)]  # no fingerprints
    lines = open(copies[0]).read().splitlines(keepends=True)
    with open(copies[0], "w") as handle:
        handle.write("".join(lines[:-1]))
    assert "the shard of client key 0 has 59 rows, was 60" in refused(copies, run_dir, **private)


# ------------------------------------------------------------------------------------------------
# 5. A completed run is never touched again; the same seed twice is bit-identical
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def completed(shards, tmp_path_factory):
    uris, test = shards
    run_dir = str(tmp_path_factory.mktemp("done") / "run")
    status, manifest = run_in_process(uris, run_dir, **{**SETTINGS, "test-uri": test})
    assert status["status"] == "completed"
    return run_dir


def test_a_completed_run_is_byte_for_byte_unchanged_by_later_invocations(shards, completed, capsys):
    uris, test = shards
    before = snapshot(completed)
    assert {"status.json", "manifest.json", "history.json", "model/saved_model.pb"} <= set(before)
    run_config = {"run-dir": completed, "min-available-nodes": len(uris), **SETTINGS, "test-uri": test}
    for _ in range(2):  # the ServerApp itself, as Flower calls it, twice
        grid = InProcessGrid(uris, run_config)
        context = Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        with pytest.raises(SystemExit) as exit_info:
            server_app.main(grid, context)
        assert exit_info.value.code == 1 and grid.sent == []  # refused before asking any node anything
        assert "already holds a completed run" in capsys.readouterr().out
        assert snapshot(completed) == before
    data_dir = os.path.dirname(uris[0])
    outputs = lambda: {k: v for k, v in snapshot(completed).items() if k != ".lock"}  # noqa: E731 - the CLI's flock file
    for _ in range(2):  # and the command line, twice
        done = run_cli("run", "--data", data_dir, "--clients", 3, "--rounds", ROUNDS, "--out", completed, timeout=300)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            f"fedlinear: error: {completed} already holds a completed run (status.json); choose another --out or remove it"
        ]
        assert outputs() == before


def test_the_same_seed_twice_gives_byte_identical_checkpoints_and_weights(shards, completed, tmp_path):
    """What docs/explanation/determinism.md promises: bit-identical, not close (compares bytes, not values to a tolerance)."""
    uris, test = shards
    again = str(tmp_path / "again")
    status, manifest = run_in_process(uris, again, **{**SETTINGS, "test-uri": test})
    assert status["status"] == "completed"
    first, second = snapshot(completed), snapshot(again)
    for name in [f"checkpoints/round-{r:04d}.npz" for r in range(1, ROUNDS + 1)] + ["model/variables/variables.data-00000-of-00001"]:
        assert first[name][0] == second[name][0], name
    with open(os.path.join(completed, "manifest.json")) as handle:
        earlier = json.load(handle)
    for key in ("weights", "exported-weights", "standardized-weights", "standardization", "learning-rate"):
        assert manifest[key] == earlier[key], key
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed-s"} for r in h["rounds"]]  # noqa: E731
    assert strip(json.loads(first["history.json"][0])) == strip(json.loads(second["history.json"][0]))
    # and a crashed-then-resumed run ends on the same bytes
    resumed = str(tmp_path / "resumed")
    crashed_run(uris, resumed, **{"test-uri": test})
    status, _ = run_in_process(uris, resumed, **{**SETTINGS, "test-uri": test})
    assert status["status"] == "completed"
    third = snapshot(resumed)
    for name in [f"checkpoints/round-{r:04d}.npz" for r in range(1, ROUNDS + 1)]:
        assert third[name][0] == first[name][0], name
