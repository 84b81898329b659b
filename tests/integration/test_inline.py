"""``--mode inline`` (scripts/local/inline.py): the real ServerApp and ClientApp objects in this process,
every message through Flower 1.42's wire format, each node's Context kept between tasks.

What is checked here: the wire (a message is inflated from its bytes alone; a tampered object, a
reply that answers no task, an invalid message never reach the other side), and that every feature
works over the inline grid or is refused in one line: strategies, DP, SecAgg+ (which needs
``context.state`` to persist), heterogeneous shard sizes, faults, resume after a crash, the target
stop; the pools give the same bytes. tests/e2e/test_inline.py compares with ``--mode simulation``.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

import fedlinear
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.scripts.local import inline
from fedlinear.scripts.local.spec import LaunchSpec
from tests.conftest import task_identity
from tests.inprocess import write_synthetic_shards

SIZES = (150, 200, 250, 300)  # unequal shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("inline-data"), len(SIZES), max(SIZES), 4, 21, 300, list(SIZES))


def spec_for(uris, test, out, **config) -> LaunchSpec:
    run_config = {"run-dir": str(out), "min-available-nodes": len(uris), "test-uri": test, "num-server-rounds": 3,
                  "seed": 5, **config}  # fmt: skip
    node_configs = [{"partition-id": i, "num-partitions": len(uris), "data-uri": u} for i, u in enumerate(uris)]
    return LaunchSpec(app_dir=fedlinear.app_dir(), mode="inline", num_nodes=len(uris), run_config=run_config,
                      workdir=os.path.join(str(out), "logs"), node_configs=node_configs, run_timeout=600)  # fmt: skip


def run(uris, test, out, pool="serial", workers=None, intercept=None, **config):
    lines: list[str] = []
    grid = inline.run_inline(spec_for(uris, test, out, **config), lines.append, pool=pool, workers=workers,
                             intercept=intercept)  # fmt: skip
    store = RunStore(str(out))
    return store.read_status(), store, lines, grid


def checkpoints(out) -> dict[str, bytes]:
    folder = os.path.join(str(out), "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("round-"))
    out_bytes = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as handle:
            out_bytes[name] = handle.read()
    return out_bytes


def manifest_weights(store: RunStore):
    manifest = store.read_manifest()
    return manifest["weights"], manifest.get("standardized-weights")


# ------------------------------------------------------------------------------------------------
# The wire
# ------------------------------------------------------------------------------------------------


def sample_message() -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"kernel": Array(np.arange(6, dtype=np.float32).reshape(3, 2))}),
        "config": ConfigRecord({"server-round": 2, "lr": 0.5, "name": "x", "flags": [True, False]}),
        "metrics": MetricRecord({"n": 7, "loss": 0.25}),
    })  # fmt: skip
    with task_identity(run_id=9, node_id=1, task_id=1):
        return Message(content, dst_node_id=1234, message_type="train", group_id="2")


def test_a_message_crosses_as_deflated_objects_and_is_inflated_from_those_bytes_alone():
    msg = sample_message()
    packet = inline.pack(msg)
    for object_id, content in packet.objects.items():
        assert hashlib.sha256(content).hexdigest() == object_id  # content-addressed, as Flower's object store
    got = inline.unpack(packet, is_reply=False)
    assert got is not msg and got.metadata.message_id == msg.metadata.message_id == msg.object_id
    assert got.metadata.dst_node_id == 1234 and got.metadata.message_type == "train" and got.metadata.group_id == "2"
    np.testing.assert_array_equal(got.content["arrays"]["kernel"].numpy(), np.arange(6, dtype=np.float32).reshape(3, 2))
    assert dict(got.content["config"]) == {"server-round": 2, "lr": 0.5, "name": "x", "flags": [True, False]}
    assert dict(got.content["metrics"]) == {"n": 7, "loss": 0.25}
    assert got.content["arrays"]["kernel"].numpy() is not msg.content["arrays"]["kernel"].numpy()


def test_a_tampered_or_missing_object_never_reaches_the_other_side():
    packet = inline.pack(sample_message())
    victim = next(oid for oid, content in packet.objects.items() if b"Array" in content[:20])
    tampered = dict(packet.objects)
    tampered[victim] = tampered[victim][:-1] + bytes([tampered[victim][-1] ^ 1])
    with pytest.raises(inline.WireError, match="does not match its content hash"):
        inline.unpack(inline.Packet(packet.message, packet.tree, tampered), is_reply=False)
    missing = {k: v for k, v in packet.objects.items() if k != victim}
    with pytest.raises(inline.WireError, match="was not sent"):
        inline.unpack(inline.Packet(packet.message, packet.tree, missing), is_reply=False)


def test_a_message_flowers_superlink_refuses_is_refused():
    msg = sample_message()
    packet = inline.pack(msg)
    with pytest.raises(inline.WireError, match="reply_to_message_id"):  # an instruction is not a reply
        inline.unpack(packet, is_reply=True)
    with task_identity(run_id=9, node_id=1, task_id=1):
        expired = Message(RecordDict(), dst_node_id=5, message_type="train", ttl=1e-9)
    with pytest.raises(inline.WireError, match="TTL has expired"):
        inline.unpack(inline.pack(expired), is_reply=False)


# ------------------------------------------------------------------------------------------------
# A run over the inline grid
# ------------------------------------------------------------------------------------------------


def test_a_run_writes_the_same_outputs_as_the_other_modes(data, tmp_path):
    uris, test = data
    status, store, lines, grid = run(uris, test, tmp_path / "run")
    assert status["status"] == "completed", status
    history = store.read_history()
    assert [row["round"] for row in history["rounds"]] == [0, 1, 2, 3]
    assert all(row["clients-ok"] == len(SIZES) for row in history["rounds"][1:])
    manifest = store.read_manifest()
    assert [s["num-examples"] for s in sorted(manifest["shards"], key=lambda s: s["partition-id"])] == list(SIZES)
    assert os.path.exists(tmp_path / "run" / "model" / "saved_model.pb")
    assert sorted(checkpoints(tmp_path / "run")) == [f"round-{r:04d}.npz" for r in (1, 2, 3)]
    assert lines[0].startswith("inline: 4 nodes in this process")
    assert any(line.startswith("round   3 |") for line in lines)  # the ServerApp's progress lines reach the launcher
    assert grid.dropped == []
    assert len(set(grid.get_node_ids())) == 4 and 1 not in grid.get_node_ids()  # random ids, never the SuperLink's


def test_threads_and_processes_give_the_same_bytes_as_serial(data, tmp_path):
    uris, test = data
    results = {}
    for pool in ("serial", "threads", "processes"):
        status, store, lines, _ = run(uris, test, tmp_path / pool, pool=pool, workers=2)
        assert status["status"] == "completed", (pool, status)
        assert any(f"clients {pool}" in line for line in lines[:1]), lines[:1]
        results[pool] = (checkpoints(tmp_path / pool), manifest_weights(store))
    assert results["threads"] == results["serial"]
    assert results["processes"] == results["serial"]


def test_processes_in_chunks_of_several_tasks_give_the_same_bytes_as_serial(data, tmp_path, monkeypatch):
    """One chunk per worker (2 tasks each): a chunk's replies and node contexts come back in order."""
    uris, test = data
    calls = []
    original = inline._ProcessPool.submit_many

    def counted(pool, fn, args):
        calls.append(len(args))
        return original(pool, fn, args)

    monkeypatch.setattr(inline, "CHUNKS_PER_WORKER", 1)
    monkeypatch.setattr(inline._ProcessPool, "submit_many", counted)
    results = {}
    for pool in ("serial", "processes"):
        status, store, _, grid = run(uris, test, tmp_path / pool, pool=pool, workers=2)
        assert status["status"] == "completed", (pool, status)
        assert grid.dropped == []
        results[pool] = (checkpoints(tmp_path / pool), manifest_weights(store), store.read_history()["rounds"][-1]["test-mse"])
    assert calls and all(count == len(SIZES) for count in calls)  # every push went out in chunks
    assert results["processes"] == results["serial"]


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedtrimmedavg", "fedols"])
def test_strategies_run_inline(data, tmp_path, strategy):
    uris, test = data
    status, store, _, _ = run(uris, test, tmp_path / strategy, strategy=strategy)
    assert status["status"] == "completed", status
    rounds = store.read_history()["rounds"]
    if strategy == "fedols":  # exact in one round
        assert rounds[-1]["test-mse-ratio"] == pytest.approx(1.0, abs=1e-9)
    else:
        assert rounds[-1]["test-mse"] < rounds[0]["test-mse"] / 10


def test_differential_privacy_runs_inline_and_accounts_every_round(data, tmp_path):
    uris, test = data
    status, store, _, _ = run(uris, test, tmp_path / "dp", dp="central-server-clip", **{"dp-noise-multiplier": 0.5})
    assert status["status"] == "completed", status
    epsilons = [row["epsilon"] for row in store.read_history()["rounds"][1:]]
    assert all(e > 0 for e in epsilons) and epsilons == sorted(epsilons)


def test_secure_aggregation_works_over_the_inline_grid(data, tmp_path):
    """SecAgg+ keeps each party's keys in ``context.state`` between its four stages: this passes only if
    the node's Context persists (as bytes) from task to task."""
    uris, test = data
    same = {"standardize": "none", "learning-rate": 0.05}
    status, clear, _, _ = run(uris, test, tmp_path / "clear", **same)
    assert status["status"] == "completed", status
    status, secured, _, grid = run(uris, test, tmp_path / "secure", **same, **{"secure-aggregation": True})
    assert status["status"] == "completed", status
    assert grid.dropped == []
    (w_clear, _), (w_secure, _) = manifest_weights(clear), manifest_weights(secured)
    np.testing.assert_allclose(np.array(w_secure["kernel"]), np.array(w_clear["kernel"]), atol=1e-4)
    assert [row["clients-ok"] for row in secured.read_history()["rounds"][1:]] == [4, 4, 4]


def test_a_failing_client_fails_its_task_not_the_run(data, tmp_path, monkeypatch):
    uris, test = data
    monkeypatch.setenv("FEDLINEAR_TEST_FAULTS", "1:raise@2")
    status, store, _, _ = run(uris, test, tmp_path / "faults")
    assert status["status"] == "completed", status
    rounds = store.read_history()["rounds"]
    assert [r["clients-failed"] for r in rounds[1:]] == [0, 1, 0]


def test_a_straggler_is_left_behind_at_the_round_timeout(data, tmp_path, monkeypatch):
    uris, test = data
    monkeypatch.setenv("FEDLINEAR_TEST_FAULTS", "2:sleep=30@2")
    status, store, _, _ = run(uris, test, tmp_path / "slow", pool="threads", workers=2,
                              **{"round-timeout": 3.0, "num-server-rounds": 2})  # fmt: skip
    assert status["status"] == "completed", status
    assert [r["clients-ok"] for r in store.read_history()["rounds"][1:]] == [4, 3]


def test_what_inline_cannot_do_is_refused_in_one_line_naming_the_mode(data, tmp_path, monkeypatch):
    uris, test = data
    monkeypatch.setenv("FEDLINEAR_TEST_FAULTS", "1:kill-supernode@2")
    with pytest.raises(FedLinearError, match=r"kill-supernode kills a SuperNode process: use --mode processes$"):
        run(uris, test, tmp_path / "kill")
    monkeypatch.delenv("FEDLINEAR_TEST_FAULTS")
    spec = spec_for(uris, test, tmp_path / "ray")
    spec.ray_address = "127.0.0.1:6379"
    with pytest.raises(FedLinearError, match=r"use --mode simulation$"):
        inline.run_inline(spec, print)


class Crash(BaseException):
    pass


def test_a_crashed_run_resumes_bit_identically(data, tmp_path):
    uris, test = data
    config = {"num-server-rounds": 4, "strategy": "fedadam"}  # stateful: the optimizer state is checkpointed
    status, whole, _, _ = run(uris, test, tmp_path / "whole", **config)
    assert status["status"] == "completed"
    sent = []

    def crash_in_round_3(node_id, msg):
        if msg.metadata.message_type == "train":
            sent.append(node_id)
            if len(sent) > 2 * len(uris):
                raise Crash
        return None

    with pytest.raises(Crash):
        run(uris, test, tmp_path / "crashed", intercept=crash_in_round_3, **config)
    assert RunStore(str(tmp_path / "crashed")).read_status()["status"] == "failed"
    status, resumed, _, _ = run(uris, test, tmp_path / "crashed", **config)
    assert status["status"] == "completed", status
    assert checkpoints(tmp_path / "crashed") == checkpoints(tmp_path / "whole")
    assert manifest_weights(resumed) == manifest_weights(whole)


def test_the_target_stop_ends_the_run_early(data, tmp_path):
    uris, test = data
    status, store, _, _ = run(uris, test, tmp_path / "target", **{"num-server-rounds": 30, "target-mse-ratio": 1.5,
                                                                   "stop-at-target": True})  # fmt: skip
    assert status["status"] == "completed", status
    manifest = store.read_manifest()
    assert manifest["stopped-at-target"] is True
    assert len(store.read_history()["rounds"]) - 1 < 30


def test_a_reply_that_answers_no_task_is_dropped_as_the_superlink_drops_it(data, tmp_path):
    uris, test = data
    stale: list[Message] = []

    def replay(node_id, msg):
        if msg.metadata.message_type != "train":
            return None
        if int(msg.content["config"]["server-round"]) == 1:
            stale.append(Message(Error(code=4001, reason="round 1"), reply_to=msg))
            return None
        return stale[0] if int(msg.content["config"]["server-round"]) == 2 else None  # round 1's reply, again

    status, store, _, grid = run(uris, test, tmp_path / "stale", intercept=replay,
                                 **{"min-train-nodes": 1, "round-timeout": 5.0})  # fmt: skip
    assert status["status"] == "completed", status
    assert any("does not answer the task sent to it" in d for d in grid.dropped), grid.dropped
    assert json.dumps(store.read_history())  # the run went on without those replies
