"""A refused ``fedlinear run`` writes nothing: a completed run directory (local and on S3) is byte-for-byte
unchanged, file list included, after every invocation that is refused (other --clients, another
heterogeneity option, bad config values, the same command again), and so is an interrupted one that a
changed command may not resume; a fresh directory refused for a bad config value is not even created.

One real completed run (``fedlinear run``, SuperLink and SuperNodes as processes) serves every assertion;
the S3 run directory is a copy of it uploaded to a real ``moto_server`` on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from tests.conftest import run_cli
from tests.s3fixtures import bucket, moto_s3, s3env  # noqa: F401 - pytest fixtures

BASE = ["--clients", "2", "--rounds", "2", "--isolation", "none"]
# Each is refused, whatever the run directory holds: the first by what it holds, the rest by their values too.
REFUSED = [
    ([], "already holds a completed run"),  # the same command again
    (["--clients", "3"], "already holds a completed run"),
    (["--concept-spread", "2"], "already holds a completed run"),
    (["--clients", "3", "--covariate-shift", "1"], "already holds a completed run"),
    (["--set", "dp=central"], "config key 'dp' must be one of"),
    (["--set", "learning-rate=-1"], "config key 'learning-rate'"),
    (["--set", "seed=1", "--set", "no-such-key=1"], "no-such-key"),
]


def local_snapshot(root: str) -> dict[str, str]:
    """Every file under ``root`` (hidden ones and the lock included) -> SHA-256 of its content."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def refused(out: str, extra: list[str], says: str, env: dict[str, str] | None = None) -> None:
    done = run_cli("run", *BASE, *extra, "--out", out, timeout=600, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("fedlinear: error: ") and says in lines[0], done.stderr
    assert "writing synthetic data" not in done.stdout, done.stdout


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("refusal") / "run")
    done = run_cli("run", *BASE, "--out", out, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(os.path.join(out, "status.json")) as handle:
        assert json.load(handle)["status"] == "completed"
    return out


def test_a_completed_local_run_is_untouched_by_every_refused_invocation(completed):
    before = local_snapshot(completed)
    assert {".lock", "status.json", "history.json", "data/client-0.csv", "data/truth.json", "model/saved_model.pb"} <= set(before)
    for extra, says in REFUSED:
        refused(completed, extra, says)
        assert local_snapshot(completed) == before, extra


def test_an_interrupted_run_is_not_resumed_by_another_command_nor_changed(completed, tmp_path):
    """A run dir with checkpoints whose status is not completed: a command that would train on other
    synthetic data, or with other settings, is refused before data/ is rewritten (it used to be)."""
    out = str(tmp_path / "interrupted")
    shutil.copytree(completed, out)
    with open(os.path.join(out, "status.json"), "w") as handle:
        json.dump({"status": "failed", "message": "killed"}, handle)
    before = local_snapshot(out)
    for extra, says in [
        (["--clients", "3"], "holds other data than this run synthesises"),
        (["--concept-spread", "2"], "data holds other data than this run synthesises (client-0.csv differs"),
        (["--set", "seed=7"], "holds checkpoints of a different run (seed 42 -> 7)"),
        (["--set", "learning-rate=0.1"], "holds checkpoints of a different run (learning-rate 'auto' -> 0.1)"),
        (["--rounds", "1"], "holds a checkpoint after round 2 but 'num-server-rounds' is 1"),
        (["--set", "dp=central"], "config key 'dp' must be one of"),
    ]:
        refused(out, extra, says)
        assert local_snapshot(out) == before, extra
    # user shards (--data) other than the checkpoints': refused by the preflight, not by the ServerApp after
    # .lock and logs/ exist (it used to be)
    other = str(tmp_path / "other-data")
    shutil.copytree(os.path.join(out, "data"), other)
    with open(os.path.join(other, "client-1.csv"), "ab") as handle:
        handle.write(b"0,0,0,0,0,0,0,0,0,0,0\n")  # one more row
    refused(out, ["--data", other], "holds checkpoints trained on other data: the shard of client key 1 has 1001 rows, was 1000")
    assert local_snapshot(out) == before


def test_a_refused_config_leaves_no_trace_in_a_fresh_directory(tmp_path):
    out = tmp_path / "fresh" / "run"
    refused(str(out), ["--set", "dp=central"], "config key 'dp' must be one of")
    assert not (tmp_path / "fresh").exists()


def s3_snapshot(admin, bucket_name: str, prefix: str) -> dict[str, str]:
    found = {}
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket_name, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = admin.get_object(Bucket=bucket_name, Key=obj["Key"])["Body"].read()
            found[obj["Key"][len(prefix) :]] = hashlib.sha256(body).hexdigest()
    return found


def test_a_completed_s3_run_is_untouched_by_every_refused_invocation(completed, s3env, bucket, tmp_path):
    admin = s3env.admin()
    prefix = "runs/done/"
    for name, _ in local_snapshot(completed).items():
        if name != ".lock":  # an S3 run's lock is a local file (scripts/local/lock.py)
            admin.upload_file(os.path.join(completed, name), bucket, prefix + name)
    before = s3_snapshot(admin, bucket, prefix)
    assert {"status.json", "data/client-1.csv", "model/saved_model.pb"} <= set(before)
    home = tmp_path / "home"  # where an S3 run's local lock would go (~/.cache/fedlinear/locks)
    home.mkdir()
    for extra, says in REFUSED:
        refused(f"s3://{bucket}/{prefix.rstrip('/')}", extra, says, env={"HOME": str(home)})
        assert s3_snapshot(admin, bucket, prefix) == before, extra
        assert list(home.rglob("*")) == [], extra  # no lock taken
    refused(f"s3://{bucket}/runs/fresh", ["--set", "dp=central"], "config key 'dp' must be one of", env={"HOME": str(home)})
    assert s3_snapshot(admin, bucket, "runs/fresh") == {}
