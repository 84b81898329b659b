"""``max-update-norm-factor``: each round, a train reply whose update is longer than F x the median
update norm of the replies that passed every other check is rejected as that node's failure.

Unit tests on crafted replies and the config; the whole-run experiment (one x100 attacker of ten)
is in tests/integration/test_robust.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedlinear.common import model as lm
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.server import replies
from fedlinear.server.replies import validated
from fedlinear.server.resume import resume_or_start, trajectory_key

FEATURES = 3
GLOBAL = ArrayRecord(
    {"kernel": Array(np.full((FEATURES, 1), 0.5, np.float32)), "bias": Array(np.array([1.0], np.float32))}
)


pytestmark = pytest.mark.usefixtures("flower_task")  # building Messages needs a task identity


def reply(nid: int, norm: float | None) -> Message:
    """Node ``nid``'s train reply whose update from GLOBAL has L2 norm ``norm`` (None: an error reply)."""
    request = Message(RecordDict(), dst_node_id=nid, message_type="train")
    if norm is None:
        return Message(Error(code=4001, reason="down"), reply_to=request)
    direction = np.array([1.0, 2.0, -2.0, 4.0]) / 5.0  # unit length over kernel and bias
    kernel = GLOBAL["kernel"].numpy() + (norm * direction[:FEATURES]).reshape(FEATURES, 1).astype(np.float32)
    bias = GLOBAL["bias"].numpy() + np.array([norm * direction[FEATURES]], np.float32)
    metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5, "client-key": nid - 1000, "unit-weight": 1})
    content = RecordDict({"arrays": ArrayRecord({"kernel": Array(kernel), "bias": Array(bias)}), "metrics": metrics})
    return Message(content, reply_to=request)


def check(norms: list[float | None], **knobs) -> tuple[list[int], list[dict]]:
    """(node ids kept, failures) of :func:`validated` on replies from nodes 1000, 1001, ... of these norms."""
    msgs = [reply(1000 + i, norm) for i, norm in enumerate(norms)]
    healthy = {1000 + i: {"num-examples": 10, "client-key": i} for i in range(len(norms))}
    eligible = {nid: info["client-key"] for nid, info in healthy.items()}
    failures: list[dict] = []
    kept = validated(msgs, failures, healthy, eligible, FEATURES, GLOBAL, **knobs)
    return [msg.metadata.src_node_id for msg in kept], failures


def test_crafted_updates_measure_as_built():
    assert replies.update_norm(reply(1000, 2.5), GLOBAL) == pytest.approx(2.5, rel=1e-6)


def test_an_update_above_factor_times_the_median_is_rejected_naming_node_round_norm_bound_and_median():
    kept, failures = check([1.0, 1.1, 0.9, 50.0, 1.05, 3.2], max_update_norm_factor=3.0, server_round=7)
    # median of the six norms: (1.05 + 1.1) / 2 = 1.075; bound 3.225: 3.2 passes, 50 does not
    assert kept == [1000, 1001, 1002, 1004, 1005]
    assert [f["node-id"] for f in failures] == [1003] and failures[0]["client-key"] == 3
    reason = failures[0]["reason"]
    assert reason == (
        "train reply rejected: node 1003 sent an update of norm 50 in round 7, above 'max-update-norm-factor' "
        "3 x the round's median update norm 1.075 = 3.225"
    )


def test_off_by_default_and_exactly_at_the_bound_passes():
    assert check([1.0, 1.0, 1.0, 500.0]) == ([1000, 1001, 1002, 1003], [])
    assert check([1.0, 1.0, 1.0, 2.0], max_update_norm_factor=2.0)[1] == []  # 2.0 == 2 x 1.0: not above


def test_the_median_is_over_the_replies_that_passed_every_other_check():
    """The fixed bound and error replies act first; only the rest make the median."""
    norms = [1.0, None, 1.0, 4.0, 100.0, 100.0]  # with the two 100s counted the median would be 4
    kept, failures = check(norms, max_update_norm=10.0, max_update_norm_factor=3.0, server_round=2)
    assert kept == [1000, 1001, 1002]  # the error reply stays (the strategy sees it as a failure)
    assert [f["node-id"] for f in failures] == [1004, 1005, 1003]
    assert all("'max-update-norm' = 10" in f["reason"] for f in failures[:2])
    assert "median update norm 1 = 3" in failures[2]["reason"]


def test_with_fewer_than_three_replies_nothing_is_rejected_and_the_log_says_why(capsys):
    kept, failures = check([1.0, 1000.0, None], max_update_norm_factor=3.0, server_round=4)
    assert kept == [1000, 1001, 1002] and failures == []
    assert capsys.readouterr().out.splitlines() == [
        "[fedlinear] round 4: 'max-update-norm-factor' not applied: only 2 replies passed the other checks, "
        "fewer than 3 to take an honest median from"
    ]
    assert check([1.0, 1.0, 1000.0], max_update_norm_factor=3.0)[0] == [1000, 1001]  # three are enough
    assert capsys.readouterr().out == ""


def test_what_is_rejected_does_not_depend_on_the_order_replies_arrive_in():
    """Through :func:`validated`, every one of the 120 arrival orders of five replies keeps and rejects the
    same nodes with the same reasons (median 0.3, bound 0.9: 7.0 is above, 0.9 is not)."""
    import itertools

    norms = [0.3, 0.2, 7.0, 0.25, 0.9]
    msgs = [reply(1000 + i, norm) for i, norm in enumerate(norms)]
    healthy = {1000 + i: {"num-examples": 10, "client-key": i} for i in range(len(norms))}
    eligible = {nid: info["client-key"] for nid, info in healthy.items()}
    outcomes = set()
    for order in itertools.permutations(msgs):
        failures: list[dict] = []
        kept = validated(list(order), failures, healthy, eligible, FEATURES, GLOBAL, max_update_norm_factor=3.0)
        outcomes.add((frozenset(m.metadata.src_node_id for m in kept), frozenset(f["reason"] for f in failures)))
    assert len(outcomes) == 1
    [(kept, reasons)] = outcomes
    assert kept == {1000, 1001, 1003, 1004} and len(reasons) == 1 and "node 1002 sent an update of norm 7" in next(
        iter(reasons)
    )


def test_a_median_of_zero_bounds_nothing_and_the_log_says_why(capsys):
    """Most parties did not move (converged on noise-free data): a bound of F x 0 would reject every
    party that did, however little."""
    kept, failures = check([0.0, 0.0, 0.0, 0.5], max_update_norm_factor=3.0, server_round=9)
    assert kept == [1000, 1001, 1002, 1003] and failures == []
    assert capsys.readouterr().out.splitlines() == [
        "[fedlinear] round 9: 'max-update-norm-factor' not applied: the median update norm is 0"
    ]


@pytest.mark.parametrize("value", [0.0, 1.5, 3, 1e6])
def test_config_accepts_zero_or_a_finite_factor_above_one(value):
    assert RunConfig.from_run_config({"max-update-norm-factor": value}).max_update_norm_factor == value


@pytest.mark.parametrize(
    "value,expected",
    [
        (1.0, "must be 0 (off) or a finite number > 1, got 1.0"),
        (0.5, "must be 0 (off) or a finite number > 1, got 0.5"),
        (-3.0, "must be 0 (off) or a finite number > 1, got -3.0"),
        (math.inf, "must be 0 (off) or a finite number > 1, got inf"),
        (math.nan, "must be a float, got nan"),  # refused by the config's number parsing already
    ],
)
def test_config_refuses_other_factors_in_one_line(value, expected):
    with pytest.raises(FedLinearError) as info:
        RunConfig.from_run_config({"max-update-norm-factor": value})
    assert str(info.value) == f"config key 'max-update-norm-factor' {expected}"


def test_config_refuses_it_with_secure_aggregation():
    with pytest.raises(FedLinearError, match=r"^config key 'max-update-norm-factor' must be 0 with 'secure-agg"):
        RunConfig.from_run_config({"max-update-norm-factor": 3.0, "secure-aggregation": True})
    ok = RunConfig.from_run_config({"max-update-norm-factor": 3.0, "max-update-norm": 2.0, "strategy": "krum"})
    assert ok.max_update_norm_factor == 3.0 and ok.max_update_norm == 2.0


def test_resume_refuses_a_changed_factor(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    cfg = RunConfig(max_update_norm_factor=3.0)
    store.write_history({"rounds": [{"round": 0}, {"round": 1}]})
    store.write_checkpoint(1, lm.initial_weights(FEATURES, 42), trajectory_key(cfg, FEATURES))
    assert resume_or_start(store, cfg, FEATURES).first_round == 2
    with pytest.raises(FedLinearError, match=r"max-update-norm-factor 3.0 -> 5.0"):
        resume_or_start(store, RunConfig(max_update_norm_factor=5.0), FEATURES)
