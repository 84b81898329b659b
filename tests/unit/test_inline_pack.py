"""Inline mode's wire (scripts/local/inline.py): a batch packed as one ``push_messages`` call crosses
byte for byte as each message packed on its own (what Flower's runtime sends), sharing the bytes of
the objects the messages share, and every packet still inflates on its own."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from fedlinear.scripts.local.inline import Packet, PushBatch, WireError, pack, unpack


@pytest.fixture(autouse=True)
def _server_identity():
    """Messages are made as the ServerApp makes them (run_inline sets the same identity)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _messages(count: int, shared: bool = True) -> list[Message]:
    def content(seed: int) -> RecordDict:
        rng = np.random.default_rng(seed)
        return RecordDict({
            "arrays": ArrayRecord([rng.normal(size=7), rng.normal(size=(3, 2))]),
            "config": ConfigRecord({"server-round": 2, "lr": 0.5, "tag": "x"}),
            "metrics": MetricRecord({"n": 100}),
        })  # fmt: skip

    record = content(0)
    return [
        Message(record if shared else content(i), dst_node_id=1000 + i, message_type="train", group_id="2")
        for i in range(count)
    ]


def _same(a: Packet, b: Packet) -> None:
    assert a.message == b.message
    assert a.tree == b.tree
    assert list(a.objects) == list(b.objects)  # same ids, same (post-order) order
    assert a.objects == b.objects


@pytest.mark.parametrize("shared", [True, False])
def test_batch_packs_each_message_as_alone(shared: bool) -> None:
    messages = _messages(5, shared)  # the same messages both ways (a Message's id covers its created_at)
    alone = [pack(msg) for msg in messages]
    with PushBatch() as batch:
        batched = [pack(msg, batch) for msg in messages]
    for a, b in zip(alone, batched, strict=True):
        _same(a, b)
    assert len({p.message for p in batched}) == 5  # each message its own metadata (destination)
    assert len({p.tree for p in batched}) == 5  # and its own message id at the root of the tree
    if shared:  # the shared RecordDict and its records: one deflation, the same bytes in every packet
        common = set(batched[0].objects) & set(batched[1].objects)
        assert len(common) == len(batched[0].objects) - 1  # all but the Message itself
        for oid in common:
            assert all(p.objects[oid] is batched[0].objects[oid] for p in batched)


def test_batched_packets_inflate_alone_and_are_checked() -> None:
    messages = _messages(3)
    with PushBatch() as batch:
        packets = [pack(msg, batch) for msg in messages]
    for msg, packet in zip(messages, packets, strict=True):
        task = unpack(packet, is_reply=False)
        assert task.metadata.dst_node_id == msg.metadata.dst_node_id
        assert task.metadata.message_id == msg.metadata.message_id
        got = task.content["arrays"].to_numpy_ndarrays()
        want = msg.content["arrays"].to_numpy_ndarrays()
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        assert task.content is not msg.content  # nothing shared: inflated from the bytes
    # one packet's shared object tampered with: refused by its hash, as the SuperLink would
    oid = next(iter(packets[0].objects))
    bad = dict(packets[0].objects)
    bad[oid] = bad[oid][:-1] + bytes([bad[oid][-1] ^ 1])
    with pytest.raises(WireError, match="content hash"):
        unpack(Packet(packets[0].message, packets[0].tree, bad), is_reply=False)
    unpack(packets[1], is_reply=False)  # the others hold their own reference to the right bytes


def test_batch_context_is_left_on_exit() -> None:
    from flwr.supercore.inflatable.inflatable_object import _is_recompute_enabled

    with PushBatch() as batch:
        assert not _is_recompute_enabled()
        pack(_messages(1)[0], batch)
    assert _is_recompute_enabled()
