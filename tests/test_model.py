"""The linear model: reference solver, the numpy engine against Keras, FedAvg against least squares."""

from __future__ import annotations

import numpy as np
import pytest

from common import model as lm
from common.data import make_synthetic


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


def test_fedavg_of_local_sgd_reaches_least_squares():
    """The acceptance problem (10 x 1000, d=10, noise 0.1, 20 rounds, defaults) in-process."""
    shards, test, _ = make_synthetic(10, 1000, 10, 0.1, 42, 2000)
    x = np.concatenate([s.x for s in shards])
    y = np.concatenate([s.y for s in shards])
    ref = lm.lstsq_fit(x, y)
    weights = lm.initial_weights(10, 42)
    for server_round in range(1, 21):
        updates = []
        for key, shard in enumerate(shards):
            orders = [lm.batch_order(1000, 42, server_round, key, 0)]
            new, _ = lm.train_numpy(weights, shard.x, shard.y, epochs=1, batch_size=32, learning_rate=0.05, orders=orders)
            updates.append(new)
        weights = lm.LinearWeights(
            kernel=np.mean([u.kernel for u in updates], axis=0), bias=np.mean([u.bias for u in updates], axis=0)
        )
    assert lm.mse(weights, test.x, test.y) <= 1.01 * lm.mse(ref, test.x, test.y)
