"""Server pieces without a federation: resume rules, evaluation metrics, seeded sampling, fixed-order aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedlinear.common import model as lm
from fedlinear.common import scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.server.evaluation import Evaluator
from fedlinear.server.resume import resume_or_start, trajectory_key
from fedlinear.server.strategy import build_strategy, fixed_order


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def test_resume_continues_only_the_same_trajectory(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    cfg = RunConfig(seed=3, num_server_rounds=5)
    first = resume_or_start(store, cfg, 4)
    assert first.first_round == 1 and first.transform is None and first.learning_rate is None

    store.write_history({"rounds": [{"round": r} for r in range(4)]})
    saved = lm.LinearWeights(kernel=np.full((4, 1), 0.5, np.float32), bias=np.array([2.0], np.float32))
    transform = scaling.build_transform("whiten", scaling.PooledStats.of(np.eye(5)[:, :4] + 1, np.arange(5.0)), 4)
    state = {**trajectory_key(cfg, 4), "transform": transform.to_json(), "resolved-learning-rate": 0.125}
    store.write_checkpoint(2, saved, state)
    resumed = resume_or_start(store, cfg, 4)
    assert resumed.first_round == 3 and [row["round"] for row in resumed.history["rounds"]] == [0, 1, 2]
    np.testing.assert_array_equal(resumed.weights.kernel, saved.kernel)
    # the recorded transform and step size come back exactly
    assert resumed.learning_rate == 0.125 and resumed.transform.digest() == transform.digest()
    # more rounds than before is fine; a different trajectory is refused, naming what changed
    assert resume_or_start(store, RunConfig(seed=3, num_server_rounds=9), 4).first_round == 3
    with pytest.raises(FedLinearError, match=r"learning-rate 'auto' -> 0.1"):
        resume_or_start(store, RunConfig(seed=3, learning_rate=0.1), 4)
    with pytest.raises(FedLinearError, match=r"num-features 4 -> 6"):
        resume_or_start(store, cfg, 6)


def test_evaluator_reports_the_gap_to_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=400)
    test = Dataset(x=x[300:], y=y[300:])
    evaluate = Evaluator(test, scaling.PooledStats.of(x[:300], y[:300]), scaling.Transform.identity(3))
    optimum = lm.lstsq_fit(x[:300], y[:300])
    at_optimum = evaluate(optimum)
    assert at_optimum["weight-distance"] == pytest.approx(0.0, abs=1e-12)
    assert at_optimum["excess-train-mse"] == pytest.approx(0.0, abs=1e-12)
    assert at_optimum["test-mse-ratio"] == pytest.approx(1.0)
    start = lm.initial_weights(3, 1)
    away = evaluate(start)
    assert away["test-mse"] == pytest.approx(lm.mse(start, test.x, test.y))
    assert away["train-mse"] == pytest.approx(lm.mse(start, x[:300], y[:300]))
    assert away["weight-distance"] == pytest.approx(np.linalg.norm(start.vector() - optimum.vector()))
    assert Evaluator(None, None, scaling.Transform.identity(3))(start) == {}


def test_evaluator_reports_raw_space_figures_for_standardized_weights():
    """Weights in whitened variables are judged as the raw-space model they fold into."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 3)) * [1e-3, 1.0, 1e4] + [5.0, -3.0, 1e6]
    y = x @ np.array([2e3, 1.0, 3e-4]) + 1e5 + rng.normal(size=500)
    pooled = scaling.PooledStats.of(x[:400], y[:400])
    transform = scaling.build_transform("whiten", pooled, 3)
    test = Dataset(x=x[400:], y=y[400:])
    evaluate = Evaluator(test, pooled, transform)
    some = lm.initial_weights(3, 7)
    kernel, bias = transform.to_raw(some.kernel, float(some.bias[0]))
    got = evaluate(some)
    direct = np.mean((x[:400] @ kernel + bias - y[:400]) ** 2)
    assert got["train-mse"] == pytest.approx(direct, rel=1e-9)
    assert got["test-mse"] == pytest.approx(np.mean((test.x @ kernel + bias - test.y) ** 2), rel=1e-12)
    theta = lm.lstsq_theta(x[:400] / x[:400].std(0), y[:400])  # a well-scaled independent solve
    assert evaluate.reference["weights"] == pytest.approx([*(theta[:-1] / x[:400].std(0)), theta[-1]], rel=1e-7)


def test_sampling_is_seeded_and_independent_of_node_ids():
    cfg = RunConfig(seed=9, fraction_train=0.5)
    # the same 6 partitions behind two different sets of node ids
    a = build_strategy(cfg, {100 + k: k for k in range(6)}).base
    b = build_strategy(cfg, {9000 - 7 * k: k for k in range(6)}).base
    for server_round in (1, 2, 3):
        ids_a = a._sample(FakeGrid(a.eligible), server_round, 0.5, 1, 1)
        ids_b = b._sample(FakeGrid(b.eligible), server_round, 0.5, 1, 1)
        assert len(ids_a) == 3
        assert sorted(a.eligible[i] for i in ids_a) == sorted(b.eligible[i] for i in ids_b)
    rounds = {tuple(sorted(a._sample(FakeGrid(a.eligible), r, 0.5, 1, 1))) for r in range(1, 8)}
    assert len(rounds) > 1  # different rounds sample different clients
    # a disconnected node is not sampled; nodes that skipped the shard query never are
    grid = FakeGrid([100, 101, 555])
    assert set(a._sample(grid, 1, 1.0, 1, 1)) == {100, 101}


def metadata(node_id):
    return Metadata(
        run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=1, reply_to_message_id="q",
        group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )  # fmt: skip


def reply(node_id, value, n):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"kernel": Array(np.array([[value]], np.float32)), "bias": Array(np.zeros(1, np.float32))}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": value}),
        }
    )
    return make_message(metadata(node_id), content=content)


def vector_reply(node_id, kernel, n):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"kernel": Array(kernel), "bias": Array(np.zeros(1, np.float32))}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
        }
    )
    return make_message(metadata(node_id), content=content)


def test_aggregation_order_does_not_depend_on_reply_order():
    """Every arrival order of the same replies gives bitwise-identical weights through the server's
    path (fixed_order, then Flower's FedAvg), while Flower's FedAvg on the arrival order does not:
    float32 sums depend on their order, so this test fails if fixed_order is bypassed."""
    import itertools

    rng = np.random.default_rng(5)
    eligible = {11: 3, 7: 0, 30: 2, 4: 1, 25: 4}  # node id -> client key; arrival order is neither
    kernels = {nid: (rng.normal(size=(64, 1)) * 10.0 ** rng.integers(-4, 5, size=(64, 1))).astype(np.float32)
               for nid in eligible}  # fmt: skip
    sizes = {nid: int(n) for nid, n in zip(eligible, rng.integers(10, 1000, size=len(eligible)), strict=True)}
    replies = {nid: vector_reply(nid, kernels[nid], sizes[nid]) for nid in eligible}
    strategy = build_strategy(RunConfig(), eligible).strategy
    served, plain = set(), set()
    for arrival in itertools.permutations(eligible):
        received = [replies[nid] for nid in arrival]
        ordered, failures = fixed_order(received, eligible)
        assert [eligible[m.metadata.src_node_id] for m in ordered] == [0, 1, 2, 3, 4] and failures == []
        served.add(strategy.aggregate_train(1, ordered)[0]["kernel"].numpy().tobytes())
        plain.add(strategy.aggregate_train(1, received)[0]["kernel"].numpy().tobytes())
    assert len(served) == 1  # 120 arrival orders, one result, bit for bit
    assert len(plain) > 1  # without the ordering the result depends on who answered first
    expected = sum(kernels[nid].astype(np.float64) * sizes[nid] for nid in eligible) / sum(sizes.values())
    np.testing.assert_allclose(np.frombuffer(served.pop(), np.float32).reshape(64, 1), expected, rtol=1e-5, atol=1e-6)


def test_failed_replies_are_recorded_not_fatal():
    strategy = build_strategy(RunConfig(), {1: 0, 2: 1}).strategy
    ok = reply(1, 0.5, 10)
    bad = make_message(metadata(2), error=Error(code=4001, reason="s3://b/k: no such key"))
    ordered, failures = fixed_order([bad, ok], {1: 0, 2: 1})
    arrays, metrics = strategy.aggregate_train(1, ordered)
    assert arrays["kernel"].numpy()[0, 0] == pytest.approx(0.5)
    assert failures == [{"node-id": 2, "client-key": 1, "reason": "s3://b/k: no such key"}]
    assert metrics["train-loss"] == pytest.approx(0.5)
