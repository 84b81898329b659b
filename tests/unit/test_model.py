"""The linear model: reference solver, the numpy engine against Keras, FedAvg against least squares."""

from __future__ import annotations

import numpy as np
import pytest

from fedlinear.common import model as lm
from fedlinear.common.synth import make_synthetic


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(203, 6))
    y = x @ rng.normal(size=6) + 0.5 + 0.2 * rng.normal(size=203)
    return x, y


def test_lstsq_matches_normal_equations(problem):
    x, y = problem
    design = np.column_stack([x, np.ones(len(x))])
    expected = np.linalg.solve(design.T @ design, design.T @ y)
    np.testing.assert_allclose(lm.lstsq_theta(x, y), expected, rtol=1e-10, atol=1e-12)
    fit = lm.lstsq_fit(x, y)
    np.testing.assert_allclose(fit.vector(), expected, rtol=1e-10, atol=1e-12)
    assert fit.kernel.shape == (6, 1) and fit.bias.shape == (1,)


def test_mse_has_no_broadcasting_bug():
    weights = lm.LinearWeights(kernel=np.array([[2.0]], np.float32), bias=np.array([1.0], np.float32))
    x = np.array([[0.0], [1.0], [2.0]])
    y = np.array([1.0, 3.0, 6.0])  # residuals 0, 0, -1
    assert lm.mse(weights, x, y) == pytest.approx(1.0 / 3.0)
    assert lm.mse(weights, x, y.reshape(-1, 1)) == pytest.approx(1.0 / 3.0)


def test_initial_weights_are_seeded():
    a, b, c = lm.initial_weights(5, 1), lm.initial_weights(5, 1), lm.initial_weights(5, 2)
    np.testing.assert_array_equal(a.kernel, b.kernel)
    assert not np.array_equal(a.kernel, c.kernel)
    assert a.kernel.dtype == np.float32 and a.kernel.shape == (5, 1) and a.bias.tolist() == [0.0]


def test_numpy_engine_single_step_is_sgd_on_mse():
    x = np.array([[1.0, 2.0], [3.0, -1.0]])
    y = np.array([1.0, 2.0])
    w0 = lm.LinearWeights(kernel=np.array([[0.5], [-0.5]], np.float32), bias=np.array([0.1], np.float32))
    new, loss = lm.train_numpy(w0, x, y, epochs=1, batch_size=2, learning_rate=0.1, orders=[np.array([0, 1])])
    residual = x @ w0.kernel.ravel() + 0.1 - y
    grad_w = 2 / 2 * x.T @ residual
    grad_b = 2 / 2 * residual.sum()
    np.testing.assert_allclose(new.kernel.ravel(), w0.kernel.ravel() - 0.1 * grad_w, rtol=1e-6)
    np.testing.assert_allclose(new.bias, 0.1 - 0.1 * grad_b, rtol=1e-6)
    assert loss == pytest.approx(np.mean(residual**2), rel=1e-6)


def test_batch_order_is_seeded_per_round_client_epoch():
    base = lm.batch_order(50, 1, 3, 7, 0)
    np.testing.assert_array_equal(base, lm.batch_order(50, 1, 3, 7, 0))
    for other in [(50, 2, 3, 7, 0), (50, 1, 4, 7, 0), (50, 1, 3, 8, 0), (50, 1, 3, 7, 1)]:
        assert not np.array_equal(base, lm.batch_order(*other))
    assert sorted(base.tolist()) == list(range(50))


@pytest.mark.parametrize("epochs,batch_size", [(1, 32), (2, 50)])
def test_numpy_engine_matches_keras(problem, epochs, batch_size):
    """Same data, same batch order (203 samples: a ragged last batch): weights agree to 1e-5."""
    x, y = problem
    w0 = lm.initial_weights(6, 11)
    orders = [lm.batch_order(len(x), 11, 1, 0, e) for e in range(epochs)]
    kwargs = dict(epochs=epochs, batch_size=batch_size, learning_rate=0.05, orders=orders)
    w_np, loss_np = lm.train_numpy(w0, x, y, **kwargs)
    w_keras, loss_keras = lm.train_keras(w0, x, y, **kwargs)
    np.testing.assert_allclose(w_np.kernel, w_keras.kernel, atol=1e-5)
    np.testing.assert_allclose(w_np.bias, w_keras.bias, atol=1e-5)
    assert loss_np == pytest.approx(loss_keras, rel=1e-4)
    # the Keras model is built once per process and reused, not rebuilt per call
    assert lm.keras_model(6) is lm.keras_model(6)


def _train_reply(node_id: int, key: int, new: lm.LinearWeights, n: int, loss: float):
    """A train reply as the ClientApp sends it (weights, num-examples, loss, client key, unit weight)."""
    from flwr.app import Array, ArrayRecord, Metadata, MetricRecord, RecordDict
    from flwr.app.message.message import make_message

    from fedlinear.common.protocol import METRIC_UNIT_WEIGHT as UNIT_WEIGHT

    meta = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=1, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")  # fmt: skip
    arrays = ArrayRecord({"kernel": Array(new.kernel), "bias": Array(new.bias)})
    metrics = MetricRecord({"num-examples": n, "train-loss": loss, "client-key": key, UNIT_WEIGHT: 1})
    return make_message(meta, content=RecordDict({"arrays": arrays, "metrics": metrics}))


def federated_rounds(shards, rounds: int, batch_size: int, learning_rate: float, seed: int) -> lm.LinearWeights:
    """FedAvg as the server runs it: local numpy SGD on each shard, replies put in client-key order
    (fixed_order) and aggregated by the strategy build_strategy makes (Flower's FedAvg, by num-examples)."""
    from fedlinear.common.config import RunConfig
    from fedlinear.server.strategy import build_strategy, fixed_order
    from fedlinear.server.rounds import from_record, to_record

    eligible = {100 + key: key for key in range(len(shards))}
    strategy = build_strategy(RunConfig(seed=seed), eligible).strategy
    weights = lm.initial_weights(shards[0].x.shape[1], seed)
    for server_round in range(1, rounds + 1):
        replies = []
        for nid, key in reversed(eligible.items()):  # arrival order is not client-key order
            shard = shards[key]
            orders = [lm.batch_order(shard.num_examples, seed, server_round, key, 0)]
            new, loss = lm.train_numpy(weights, shard.x, shard.y, epochs=1, batch_size=batch_size,
                                       learning_rate=learning_rate, orders=orders)  # fmt: skip
            replies.append(_train_reply(nid, key, new, shard.num_examples, loss))
        arrays, _ = strategy.aggregate_train(server_round, fixed_order(replies, eligible)[0])
        weights = from_record(arrays)
        assert to_record(weights)["kernel"].numpy().dtype == np.float32
    return weights


def test_fedavg_of_local_sgd_reaches_least_squares():
    """The acceptance problem (d=10, noise 0.1, 20 rounds, defaults) with unequal shards (100 to 1000
    rows) through the real strategy aggregation: test MSE within 1% of pooled least squares."""
    from fedlinear.common.dataset import Dataset

    parts, test, _ = make_synthetic(10, 1000, 10, 0.1, 42, 2000)
    sizes = np.linspace(100, 1000, 10).astype(int)
    shards = [Dataset(x=p.x[:n], y=p.y[:n]) for p, n in zip(parts, sizes, strict=True)]
    ref = lm.lstsq_fit(np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards]))
    weights = federated_rounds(shards, rounds=20, batch_size=32, learning_rate=0.05, seed=42)
    assert lm.mse(weights, test.x, test.y) <= 1.01 * lm.mse(ref, test.x, test.y)


def test_fedavg_weights_clients_by_their_examples():
    """Clients that disagree (each its own true weights) and hold 60, 300 and 1500 rows. With one
    full-batch local step, FedAvg weighted by num-examples is gradient descent on the pooled MSE, so it
    must reach the pooled least-squares fit; equal client weights would reach the fit of the
    equally-weighted client objectives instead, far from it (this test fails if the strategy's
    weighting is lost)."""
    from fedlinear.common.dataset import Dataset

    rng = np.random.default_rng(8)
    shards = []
    for key, n in enumerate((60, 300, 1500)):
        x = rng.normal(size=(n, 3)) + 0.3 * key
        y = x @ (np.array([1.0, -2.0, 0.5]) + 1.5 * key) + 0.7 * key + 0.05 * rng.normal(size=n)
        shards.append(Dataset(x=x, y=y))
    x_all = np.concatenate([s.x for s in shards])
    y_all = np.concatenate([s.y for s in shards])
    pooled = lm.lstsq_theta(x_all, y_all)
    scale = np.sqrt(np.concatenate([np.full(s.num_examples, 1.0 / s.num_examples) for s in shards]))
    design = np.column_stack([x_all, np.ones(len(x_all))])
    equal = np.linalg.lstsq(design * scale[:, None], y_all * scale, rcond=None)[0]  # equal client weights
    assert np.linalg.norm(pooled - equal) > 1.0  # the two answers are far apart
    weights = federated_rounds(shards, rounds=300, batch_size=1500, learning_rate=0.05, seed=3)
    assert np.linalg.norm(weights.vector() - pooled) < 1e-3 * np.linalg.norm(pooled)


def test_a_model_without_an_intercept_has_no_bias_in_either_engine(problem):
    """``fit-intercept = false``: the layout is the kernel alone; numpy and Keras (Dense(use_bias=False)) agree."""
    x, y = problem
    w0 = lm.initial_weights(6, 11, fit_intercept=False)
    assert w0.bias is None and w0.names == ("kernel",) and list(w0.as_dict()) == ["kernel"]
    orders = [lm.batch_order(len(x), 11, 1, 0, e) for e in range(2)]
    kwargs = dict(epochs=2, batch_size=32, learning_rate=0.05, orders=orders)
    w_np, loss_np = lm.train_numpy(w0, x, y, **kwargs)
    w_keras, loss_keras = lm.train_keras(w0, x, y, **kwargs)
    assert w_np.bias is None and w_keras.bias is None
    np.testing.assert_allclose(w_np.kernel, w_keras.kernel, atol=1e-5)
    assert loss_np == pytest.approx(loss_keras, rel=1e-4)
    # one step is SGD on the MSE of x @ w, with no intercept moving
    one, _ = lm.train_numpy(w0, x[:5], y[:5], epochs=1, batch_size=5, learning_rate=0.1, orders=[np.arange(5)])
    k = w0.kernel.astype(np.float64).ravel()
    expected = k - 0.1 * 2.0 / 5 * x[:5].T @ (x[:5] @ k - y[:5])
    np.testing.assert_allclose(one.kernel.ravel(), expected, rtol=1e-5)
    assert np.array_equal(lm.LinearWeights.from_dict(w_np.as_dict()).kernel, w_np.kernel)
