"""server.exchange: Flower's deployment grid polled faster, the same replies; other grids untouched."""

from __future__ import annotations

import inspect

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from fedlinear.server import exchange
from tests.conftest import task_identity


def test_flowers_deployment_grid_still_pulls_every_3_s():
    """The premise of the module: if a Flower upgrade changes HttpGrid's loop, this says to look again."""
    source = inspect.getsource(HttpGrid.send_and_receive)
    assert "time.sleep(3)" in source and "self.pull_messages(msg_ids)" in source and "self.push_messages(messages)" in source


class FakeHttpGrid(HttpGrid):
    """HttpGrid's own send_and_receive, with push/pull answered here: node n replies after n pulls."""

    def __init__(self, answer_after: dict[int, int | None]):
        super().__init__(token="t", insecure=True)
        self.answer_after, self.pulls, self.pushed = answer_after, 0, {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in message_ids:
            msg = self.pushed[mid]
            after = self.answer_after[msg.metadata.dst_node_id]
            if after is not None and self.pulls >= after:
                reply = Message(RecordDict({"config": ConfigRecord({"node": msg.metadata.dst_node_id})}), reply_to=msg)
                out.append(reply)
        return out


def queries(nodes):
    return [Message(RecordDict({"config": ConfigRecord({"stage": "describe"})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]  # fmt: skip


def test_every_reply_is_collected_once_and_pulling_stops_when_all_are_in():
    grid = FakeHttpGrid({1: 1, 2: 3, 3: 2})
    with task_identity(1, 0, 0):
        replies = exchange.send_and_receive(grid, queries([1, 2, 3]), timeout=600)
    assert sorted(int(r.content["config"]["node"]) for r in replies) == [1, 2, 3]
    assert grid.pulls == 3  # no pull after the last reply
    assert all(r.metadata.reply_to_message_id in grid.pushed for r in replies)


def test_a_silent_node_is_given_up_at_the_timeout():
    grid = FakeHttpGrid({1: 1, 2: None})
    with task_identity(1, 0, 0):
        replies = exchange.send_and_receive(grid, queries([1, 2]), timeout=0.3)
    assert [int(r.content["config"]["node"]) for r in replies] == [1]


def test_other_grids_are_asked_through_their_own_send_and_receive():
    class Own:
        def send_and_receive(self, messages, *, timeout=None):
            self.got = (list(messages), timeout)
            return iter(["a reply"])

    grid = Own()
    assert exchange.send_and_receive(grid, ["m"], 5.0) == ["a reply"]
    assert grid.got == (["m"], 5.0)


def test_the_switch_interval_is_lowered_only_inside_the_simulation_engine_and_restored():
    """server.exchange.engine_scheduling: Flower's InMemoryGrid (the ServerApp shares flwr-simulation's
    GIL with the engine's dispatch thread) gets the short interval for the block, any other grid keeps
    the interpreter's, and the previous value comes back afterwards, also after an error."""
    import sys

    import pytest
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = InMemoryGrid.__new__(InMemoryGrid)  # no state needed: only its type is looked at
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        with exchange.engine_scheduling(grid):
            assert sys.getswitchinterval() == pytest.approx(exchange.ENGINE_SWITCH_INTERVAL, abs=2e-6)
        assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)
        with pytest.raises(RuntimeError), exchange.engine_scheduling(grid):
            raise RuntimeError("the run failed")
        assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)
        with exchange.engine_scheduling(FakeHttpGrid({})):
            assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)
        sys.setswitchinterval(0.0001)  # already shorter: left as it is
        with exchange.engine_scheduling(grid):
            assert sys.getswitchinterval() == pytest.approx(0.0001, abs=2e-6)
    finally:
        sys.setswitchinterval(before)
