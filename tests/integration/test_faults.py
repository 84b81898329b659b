"""Participation rules, stragglers, untrusted text, party identity and fault injection.

In-process (the real ServerApp ``run`` and ClientApp handlers, tests/inprocess.py):
``min-train-nodes`` and ``max-failed-rounds``, their composition with the DP wrappers, a late reply
of round r offered again in round r+1, hostile error text, file content in error replies, client
keys of parties whose shards share a path. Processes mode (real SuperLink, 5 SuperNodes, one
``flwr-clientapp`` per task): a SuperNode SIGKILLed mid-round, a ClientApp that raises and one that
sleeps past ``round-timeout`` (through the FEDLINEAR_TEST_FAULTS hook, clients/faults.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import pytest
from flwr.app import Error, Message

from fedlinear.clients import client_app as ca
from fedlinear.common import model as lm
from fedlinear.common.csvio import load_csv
from fedlinear.common.errors import FedLinearError, untrusted_text
from fedlinear.server import progress
from tests.conftest import run_cli, write_federation
from tests.inprocess import InProcessGrid, run_in_process, write_synthetic_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("faults"), 4, 200, 3, 42, 300)


def history(run_dir) -> dict:
    with open(os.path.join(str(run_dir), "history.json")) as handle:
        return json.load(handle)


def checkpoint(run_dir, r: int) -> np.ndarray:
    with np.load(os.path.join(str(run_dir), "checkpoints", f"round-{r:04d}.npz")) as ckpt:
        return np.append(ckpt["kernel"].ravel(), ckpt["bias"])


def pooled_lstsq_test_mse(uris, test_uri) -> float:
    parts = [load_csv(u) for u in uris]
    theta = lm.lstsq_theta(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    test = load_csv(test_uri)
    return float(np.mean((test.x @ theta[:-1] + theta[-1] - test.y) ** 2))


def fail_train(nodes, rounds):
    """A sabotage: the train tasks of ``nodes`` in ``rounds`` fail with an error reply."""

    def sabotage(node_id, msg):
        if msg.metadata.message_type == "train" and node_id in nodes:
            if int(msg.content["config"]["server-round"]) in rounds:
                return Message(Error(code=4001, reason="injected failure"), reply_to=msg)
        return None

    return sabotage


# ------------------------------------------------------------------------------------------------
# min-train-nodes / max-failed-rounds
# ------------------------------------------------------------------------------------------------


def test_a_round_with_fewer_valid_replies_than_min_train_nodes_is_not_aggregated(data, tmp_path):
    uris, test = data
    run = tmp_path / "run"
    status, manifest = run_in_process(
        uris, str(run), sabotage=fail_train({1001, 1002}, {2}), test_uri=test,
        **{"num-server-rounds": 4, "min-train-nodes": 3, "seed": 3},
    )  # fmt: skip
    assert status["status"] == "completed", status
    rows = history(run)["rounds"]
    assert [row["clients-ok"] for row in rows[1:]] == [4, 2, 4, 4]
    assert rows[2]["not-aggregated"].startswith("2 valid update(s), fewer than 'min-train-nodes' = 3 (3)")
    assert "not-aggregated" not in rows[1] and "not-aggregated" not in rows[3]
    np.testing.assert_array_equal(checkpoint(run, 2), checkpoint(run, 1))  # the model stayed
    assert not np.array_equal(checkpoint(run, 3), checkpoint(run, 2))
    assert rows[-1]["test-mse"] < 1.05 * pooled_lstsq_test_mse(uris, test)

    # a fraction: 0.5 of the 4 eligible parties is 2, which round 2 has: aggregated
    other = tmp_path / "fraction"
    status, _ = run_in_process(
        uris, str(other), sabotage=fail_train({1001, 1002}, {2}), test_uri=test,
        **{"num-server-rounds": 2, "min-train-nodes": 0.5, "seed": 3},
    )  # fmt: skip
    assert status["status"] == "completed"
    assert "not-aggregated" not in history(other)["rounds"][2]
    assert not np.array_equal(checkpoint(other, 2), checkpoint(other, 1))


def test_max_failed_rounds_stops_with_a_resumable_checkpoint(data, tmp_path):
    uris, test = data
    run = tmp_path / "run"
    settings = {"num-server-rounds": 5, "min-train-nodes": 4, "max-failed-rounds": 2, "seed": 3, "test-uri": test}
    status, _ = run_in_process(uris, str(run), sabotage=fail_train({1003}, {2, 3, 4, 5}), **settings)
    assert status["status"] == "failed"
    assert "no client update was aggregated in 2 consecutive rounds (config key 'max-failed-rounds' = 2)" in status["message"]
    assert "run the same command again to resume after round 3" in status["message"]
    assert "\n" not in status["message"]
    with open(run / "checkpoints" / "latest.json") as handle:
        assert json.load(handle)["round"] == 3
    status, manifest = run_in_process(uris, str(run), **settings)  # the cause fixed: it resumes and completes
    assert status["status"] == "completed"
    assert history(run)["resumed-at"] == [3]
    clean = tmp_path / "clean"
    run_in_process(uris, str(clean), sabotage=fail_train({1003}, {2, 3}), **(settings | {"max-failed-rounds": 3}))
    # resumed after two unaggregated rounds = a run whose rounds 2 and 3 were not aggregated
    np.testing.assert_array_equal(checkpoint(run, 5), checkpoint(clean, 5))


def test_min_train_nodes_above_the_sample_is_refused(data, tmp_path):
    uris, test = data
    status, _ = run_in_process(
        uris, str(tmp_path / "run"), **{"num-server-rounds": 1, "fraction-train": 0.5, "min-train-nodes": 3}
    )
    assert status["status"] == "failed"
    assert status["message"].startswith(
        "config key 'min-train-nodes' = 3 asks for 3 valid updates a round, but only 2 of the 4 eligible nodes are sampled"
    )


@pytest.mark.parametrize("dp", ["central-client-clip", "central-server-clip"])
def test_min_train_nodes_composes_with_central_dp(data, tmp_path, dp):
    """A round min-train-nodes voids releases nothing: ε stays, the model stays, later rounds go on."""
    uris, test = data
    run = tmp_path / "run"
    status, _ = run_in_process(
        uris, str(run), sabotage=fail_train({1001}, {2}), test_uri=test,
        **{"num-server-rounds": 3, "dp": dp, "dp-noise-multiplier": 0.5, "min-train-nodes": 4, "seed": 3},
    )  # fmt: skip
    assert status["status"] == "completed", status
    rows = history(run)["rounds"]
    assert "not-aggregated" in rows[2] and "not-aggregated" not in rows[3]
    assert rows[2]["epsilon"] == rows[1]["epsilon"] > 0
    assert rows[3]["epsilon"] > rows[2]["epsilon"]
    np.testing.assert_array_equal(checkpoint(run, 2), checkpoint(run, 1))


# ------------------------------------------------------------------------------------------------
# stragglers: a late reply of round r is never part of round r+1
# ------------------------------------------------------------------------------------------------


class LateGrid(InProcessGrid):
    """Holds back ``late_node``'s train reply of ``late_round`` and hands it back in the next round:
    with its fresh reply (``mode`` "extra") or instead of it ("instead")."""

    def __init__(self, *args, late_node: int, late_round: int, mode: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.late_node, self.late_round, self.mode = late_node, late_round, mode
        self.held: Message | None = None

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if not messages or messages[0].metadata.message_type != "train":
            return replies
        server_round = int(messages[0].content["config"]["server-round"])
        late = [r for r in replies if r.metadata.src_node_id == self.late_node]
        if server_round == self.late_round:
            self.held = late[0]
            return [r for r in replies if r is not self.held]
        if server_round == self.late_round + 1 and self.held is not None:
            if self.mode == "instead":
                replies = [r for r in replies if r.metadata.src_node_id != self.late_node]
            return [*replies, self.held]
        return replies


@pytest.mark.parametrize("mode", ["extra", "instead"])
def test_a_late_reply_of_round_r_is_discarded_in_round_r_plus_1(data, tmp_path, mode):
    uris, test = data
    settings = {"num-server-rounds": 4, "seed": 3, "test-uri": test, "min-available-nodes": 4}
    late_rounds = {2} if mode == "extra" else {2, 3}
    # the yardstick: node 1002 simply failed round 2 (and, "instead", round 3)
    status, expected = run_in_process(uris, str(tmp_path / "base"), sabotage=fail_train({1002}, late_rounds), **settings)
    assert status["status"] == "completed"
    run_config = {"run-dir": str(tmp_path / "late"), **settings}
    grid = LateGrid(uris, run_config, late_node=1002, late_round=2, mode=mode)
    server_app_store = _drive(grid, run_config)
    rows = history(tmp_path / "late")["rounds"]
    assert grid.held is not None and grid.held in grid.received
    round3 = [f for f in rows[3]["failures"] if f["node-id"] == 1002]
    assert len(round3) == 1 and "does not answer a message of this round" in round3[0]["reason"]
    assert rows[3]["clients-ok"] == (4 if mode == "extra" else 3)
    manifest = server_app_store.read_manifest()
    assert manifest["standardized-weights"] == expected["standardized-weights"]


def _drive(grid, run_config):
    from tests.inprocess import drive

    return drive(grid, run_config)


# ------------------------------------------------------------------------------------------------
# untrusted text
# ------------------------------------------------------------------------------------------------

HOSTILE = "\x1b[2J\x1b]0;owned\x07boom\r\n[fedlinear] round  99 | test MSE 0 | fake\u202e\x00" + "x" * 5000


def test_untrusted_text_is_one_printable_bounded_line():
    text = untrusted_text(HOSTILE)
    assert text.isprintable() and "\x1b" not in text and "\n" not in text and "\r" not in text
    assert len(text) <= 300 and text.endswith("...")
    assert text.startswith("?[2J?]0;owned?boom [fedlinear] round 99")
    assert untrusted_text("plain reason: line 5") == "plain reason: line 5"


def test_hostile_error_reasons_are_stored_and_printed_sanitised(data, tmp_path, monkeypatch):
    uris, test = data
    said: list[str] = []
    monkeypatch.setattr(progress, "say", lambda text: said.append(text))

    def sabotage(node_id, msg):
        kind = msg.metadata.message_type
        if (node_id == 1001 and kind == "train") or (node_id == 1003 and kind == "query"):
            return Message(Error(code=4001, reason=HOSTILE), reply_to=msg)
        return None

    run = tmp_path / "run"
    status, _ = run_in_process(uris, str(run), sabotage=sabotage, **{"num-server-rounds": 2, "test-uri": test})
    assert status["status"] == "completed", status
    h = history(run)
    reasons = [f["reason"] for f in h["query-failures"]] + [f["reason"] for row in h["rounds"][1:] for f in row["failures"]]
    assert len(reasons) == 3
    for reason in reasons:
        assert reason == untrusted_text(HOSTILE)
    for line in said:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line and len(line) < 600
    [failure] = h["rounds"][1]["failures"]
    assert failure["node-id"] == 1001 and failure["round"] == 1 and failure["reason"] == untrusted_text(HOSTILE)


def test_an_error_reply_names_file_and_line_but_never_shows_content(data, tmp_path):
    uris, test = data
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$TOPSECRETHASH:19000:0:99999:7:::\ndaemon:*:SECRETDAEMON:0:99999:7:::\n")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("1.0,2.0,3.0,4.0\n4.0,hunter2-password,6.0,7.0\n")
    with pytest.raises(FedLinearError, match="hunter2-password"):
        load_csv(str(mixed))  # the user's own CLI error may show the value: it is their file
    run = tmp_path / "run"
    status, _ = run_in_process([*uris[:2], str(secret), str(mixed)], str(run), **{"num-server-rounds": 1, "test-uri": test})
    assert status["status"] == "completed", status
    text = json.dumps(history(run)) + (run / "status.json").read_text()
    for leaked in ("TOPSECRET", "SECRETDAEMON", "daemon", "hunter2", "root:"):
        assert leaked not in text
    reasons = {f["node-id"]: f["reason"] for f in history(run)["query-failures"]}
    assert reasons[1002] == f"{secret}: line 2: column 1: not a number"
    assert reasons[1003] == f"{mixed}: line 2: column 2: not a number"


def test_an_unexpected_client_error_replies_with_its_type_only():
    from flwr.app import MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlinear.clients.errors import ERROR_CODE_INTERNAL, error_reply

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
        reply = error_reply(msg, ValueError("could not convert string to float: 'root:$6$SECRET'"))
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    assert reply.error.code == ERROR_CODE_INTERNAL
    assert reply.error.reason == "ValueError in the client task (details in the node's log)"


# ------------------------------------------------------------------------------------------------
# identity: parties whose shards share a path
# ------------------------------------------------------------------------------------------------


class SamePathGrid(InProcessGrid):
    """Every node reads ``train.csv`` in its own working directory (as every deployed party reads its
    own ``/data/train.csv``), with no partition id; ``party_ids`` optionally gives node configs a party-id."""

    def __init__(self, dirs, run_config, party_ids=None) -> None:
        super().__init__([os.path.join(d, "train.csv") for d in dirs], run_config)
        self.dirs = dict(zip(self.nodes, dirs, strict=True))
        for i, nid in enumerate(self.nodes):
            self.nodes[nid] = {"data-uri": "train.csv"} | ({"party-id": party_ids[i]} if party_ids else {})

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            with contextlib.chdir(self.dirs[msg.metadata.dst_node_id]):
                ca._SHARDS.clear()  # each deployed party is its own process: nothing shared
                ca._TRANSFORMED.clear()
                ca._DIGESTS.clear()
                replies += super().send_and_receive([msg], timeout=timeout)
        return replies


def same_path_federation(root, contents):
    dirs = []
    for i, text in enumerate(contents):
        d = os.path.join(str(root), f"party-{i}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "train.csv"), "w") as handle:
            handle.write(text)
        dirs.append(d)
    return dirs


def run_same_path(dirs, run_dir, test, party_ids=None):
    config = {"run-dir": str(run_dir), "min-available-nodes": len(dirs), "num-server-rounds": 3, "seed": 9,
              "test-uri": test}  # fmt: skip
    store = _drive(SamePathGrid(dirs, config, party_ids), config)
    return history(run_dir), store.read_manifest()


def test_parties_sharing_a_path_get_distinct_stable_keys(data, tmp_path):
    uris, test = data
    contents = [open(u).read() for u in uris[:3]]
    dirs = same_path_federation(tmp_path / "fed", contents)
    first, manifest = run_same_path(dirs, tmp_path / "a", test)
    keys = [p["client-key"] for p in first["parties"]]
    assert len(set(keys)) == 3 and not set(keys) & {0, 1, 2}
    # each key is the party's own: path + content digest, the same when the party restarts
    for d, text in zip(dirs, contents, strict=True):
        shard = load_csv(os.path.join(d, "train.csv"))
        assert lm.client_key(None, "train.csv", content=lm.shard_digest(shard.x, shard.y)) in keys
    orders = [lm.batch_order(200, 9, 1, key, 0) for key in keys]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    again, manifest2 = run_same_path(dirs, tmp_path / "b", test)  # deterministic: same keys, same model
    assert [p["client-key"] for p in again["parties"]] == keys
    assert manifest2["standardized-weights"] == manifest["standardized-weights"]
    assert first["rounds"][-1]["test-mse"] < 1.05 * pooled_lstsq_test_mse(uris[:3], test)
    # a party-id, when given, names the party whatever its data
    named, _ = run_same_path(dirs, tmp_path / "c", test, party_ids=["alice", "bob", "carol"])
    assert sorted(p["client-key"] for p in named["parties"]) == sorted(
        lm.client_key(None, "train.csv", party_id=name) for name in ("alice", "bob", "carol")
    )


def test_colliding_keys_leave_both_nodes_out(data, tmp_path):
    uris, test = data
    contents = [open(uris[0]).read(), open(uris[0]).read(), open(uris[1]).read()]  # parties 0 and 1 identical
    dirs = same_path_federation(tmp_path / "fed", contents)
    h, manifest = run_same_path(dirs, tmp_path / "run", test)
    assert [p["node-id"] for p in h["parties"]] == [1002]
    left_out = {f["node-id"]: f["reason"] for f in h["query-failures"]}
    assert set(left_out) == {1000, 1001}
    assert "is also reported by node 1001" in left_out[1000] and "party-id" in left_out[1000]
    # with a party-id each, the same shards are three parties
    h, _ = run_same_path(dirs, tmp_path / "named", test, party_ids=["a", "b", "c"])
    assert len(h["parties"]) == 3 and h["query-failures"] == []


# ------------------------------------------------------------------------------------------------
# processes mode: 5 SuperNodes, a node killed mid-round, a task that raises, a straggler
# ------------------------------------------------------------------------------------------------

ROUNDS = 5
ROUND_TIMEOUT = 60
ISOLATION = "auto"  # as a user runs it: a private network namespace where the platform allows
FAULTS = f"1:raise@2,2:sleep={ROUND_TIMEOUT + 15}@2,3:kill-supernode@3"


def processes_run(data_dir, out, faults: str | None):
    args = ["run", "--data", data_dir, "--clients", 5, "--rounds", ROUNDS, "--out", out,
            "--set", "seed=11", "--set", f"round-timeout={ROUND_TIMEOUT}", "--set", "node-wait-timeout=120",
            # full-batch local steps: both runs end at their optimum, not at a point of SGD noise, so the
            # comparison measures what the faults cost (the faulty run loses party 3 from round 3 on)
            "--set", "batch-size=1000", "--set", "local-epochs=5",
            "--timeout", 1500, "--isolation", ISOLATION]  # fmt: skip
    return run_cli(*args, env={"FEDLINEAR_TEST_FAULTS": faults} if faults else None, timeout=1800)


@pytest.fixture(scope="module")
def five_nodes():
    # a directory of its own, not pytest's tmp_path: concurrent pytest sessions prune old basetemps
    root = pathlib.Path(tempfile.mkdtemp(prefix="fedlinear-faults-"))
    write_federation(str(root / "data"), clients=5, samples=1000, features=4, seed=13)
    yield str(root / "data"), root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fault_free(five_nodes):
    data_dir, root = five_nodes
    done = processes_run(data_dir, str(root / "clean"), None)
    assert done.returncode == 0, done.stdout + done.stderr
    return history(root / "clean")


@pytest.mark.e2e  # a real federation (Flower's runtime, real processes)
def test_five_supernodes_survive_a_kill_a_raise_and_a_straggler(five_nodes, fault_free):
    data_dir, root = five_nodes
    out = root / "faulty"
    done = processes_run(data_dir, str(out), FAULTS)
    assert done.returncode == 0, done.stdout + done.stderr
    h = history(out)
    assert [row["round"] for row in h["rounds"]] == list(range(ROUNDS + 1))
    partition = {p["node-id"]: p["partition-id"] for p in h["parties"]}
    failed = {}  # (partition, round) -> reason
    for row in h["rounds"][1:]:
        for f in row["failures"]:
            assert f["round"] == row["round"] and f["reason"]
            failed[(partition[f["node-id"]], row["round"])] = f["reason"]
    assert failed[(1, 2)] == "InjectedFault in the client task (details in the node's log)"
    assert failed[(2, 2)] == f"no reply within 'round-timeout' ({ROUND_TIMEOUT} s)"
    assert (3, 3) in failed, failed  # the SuperNode killed mid-round: no reply
    killed = next(nid for nid, pid in partition.items() if pid == 3)
    for row in h["rounds"][4:]:  # later: a failure while the SuperLink still lists it, then no longer sampled
        assert (3, row["round"]) in failed or killed not in row.get("sampled", [killed]), (row, failed)
        assert row["clients-ok"] == 4, row
    # Flower's grid never hands back the straggler's late round-2 reply (and the server would reject it)
    assert not any("does not answer a message of this round" in reason for reason in failed.values())
    assert h["rounds"][2]["clients-ok"] == 3 and h["rounds"][3]["clients-ok"] >= 3
    final, clean = h["rounds"][-1]["test-mse"], fault_free["rounds"][-1]["test-mse"]
    assert abs(final - clean) <= 0.01 * clean, (final, clean)
    assert all(row["clients-ok"] == 5 for row in fault_free["rounds"][1:])
    assert re.search(r"round 3: node \d+ failed", done.stdout) or "failed" in done.stdout


def test_min_train_nodes_discards_a_smaller_secure_aggregate(data, tmp_path):
    """Under secure aggregation the floor applies to the parties in the secure sum: node 1001 dies in
    round 2 after sharing its keys, SecAgg+ recovers a sum of 3, min-train-nodes = 4 discards it."""
    from tests.integration import test_secure

    uris, test = data
    run = tmp_path / "run"
    _, h = test_secure.run_in_process(
        uris, str(run), {"silent": {1001: "collect_masked_vectors"}, "silent_round": 2},
        **{"secure-aggregation": True, "min-train-nodes": 4, "test-uri": test},
    )  # fmt: skip
    rows = h["rounds"]
    assert rows[1]["clients-ok"] == 4 and "not-aggregated" not in rows[1]
    assert rows[2]["clients-ok"] == 3 and rows[2]["not-aggregated"].startswith("3 valid update(s)")
    np.testing.assert_array_equal(checkpoint(run, 2), checkpoint(run, 1))
