"""FedProx's proximal term in both local engines: closed form, Keras parity, and the client wiring.

With ``proximal_mu = mu`` each engine minimises ``MSE + (mu / 2) ||theta - theta_g||²`` with
``theta = [kernel, bias]``. Keras' MSE has no 1/2, so its gradient is ``2/n Aᵀ(Aθ - y)`` with
``A = [X 1]``, and the fixed point of full-batch gradient descent is

    theta* = (AᵀA/n + (mu/2) I)⁻¹ (Aᵀy/n + (mu/2) theta_g).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlinear.common import model as lm


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(64, 3))
    y = x @ np.array([1.5, -2.0, 0.7]) + 0.4 + 0.3 * rng.normal(size=64)
    start = lm.LinearWeights(kernel=np.array([[0.2], [0.9], [-1.1]], np.float32), bias=np.array([2.0], np.float32))
    return x, y, start


def closed_form(x, y, anchor: np.ndarray, mu: float) -> np.ndarray:
    a = np.column_stack([x, np.ones(len(x))])
    n = len(x)
    return np.linalg.solve(a.T @ a / n + 0.5 * mu * np.eye(a.shape[1]), a.T @ y / n + 0.5 * mu * anchor)


@pytest.mark.parametrize("engine", ["numpy", "keras"])
@pytest.mark.parametrize("mu", [0.5, 4.0])
def test_full_batch_training_reaches_the_proximal_closed_form(problem, engine, mu):
    x, y, start = problem
    epochs = 400
    orders = [np.arange(len(x))] * epochs  # full batch: gradient descent on the proximal objective
    new, loss = lm.ENGINES[engine](
        start, x, y, epochs=epochs, batch_size=len(x), learning_rate=0.2, orders=orders, proximal_mu=mu
    )
    expected = closed_form(x, y, start.vector(), mu)
    np.testing.assert_allclose(new.vector(), expected, atol=2e-5)
    # the proximal solution is not least squares (the term pulls toward the start) ...
    assert np.linalg.norm(new.vector() - lm.lstsq_theta(x, y)) > 0.05
    # ... and the reported loss is the data term, the MSE of the weights before the last step
    assert loss == pytest.approx(lm.mse(new, x, y), rel=1e-3)


@pytest.mark.parametrize("epochs,batch_size,mu", [(1, 32, 0.3), (3, 50, 2.0)])
def test_numpy_engine_matches_keras_with_the_proximal_term(epochs, batch_size, mu):
    """Mini-batches (203 samples: a ragged last batch), the same order: weights agree to 1e-5."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(203, 6))
    y = x @ rng.normal(size=6) + 0.5 + 0.2 * rng.normal(size=203)
    w0 = lm.initial_weights(6, 11)
    orders = [lm.batch_order(len(x), 11, 1, 0, e) for e in range(epochs)]
    kwargs = dict(epochs=epochs, batch_size=batch_size, learning_rate=0.05, orders=orders, proximal_mu=mu)
    w_np, loss_np = lm.train_numpy(w0, x, y, **kwargs)
    w_keras, loss_keras = lm.train_keras(w0, x, y, **kwargs)
    np.testing.assert_allclose(w_np.kernel, w_keras.kernel, atol=1e-5)
    np.testing.assert_allclose(w_np.bias, w_keras.bias, atol=1e-5)
    assert loss_np == pytest.approx(loss_keras, rel=1e-4)
    # mu changes the trajectory (the term is really applied), and mu = 0 is plain SGD in both engines
    plain, _ = lm.train_numpy(w0, x, y, **{**kwargs, "proximal_mu": 0.0})
    assert np.abs(plain.vector() - w_np.vector()).max() > 1e-4
    plain_keras, _ = lm.train_keras(w0, x, y, **{**kwargs, "proximal_mu": 0.0})
    np.testing.assert_allclose(plain.vector(), plain_keras.vector(), atol=1e-5)
    # the anchor is the task's start, reassigned per call: a second call from another start agrees too
    w1 = lm.initial_weights(6, 12)
    again_np, _ = lm.train_numpy(w1, x, y, **kwargs)
    again_keras, _ = lm.train_keras(w1, x, y, **kwargs)
    np.testing.assert_allclose(again_np.vector(), again_keras.vector(), atol=1e-5)


def test_a_bad_mu_is_refused():
    x, y = np.ones((4, 1)), np.ones(4)
    w = lm.initial_weights(1, 0)
    for mu in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="proximal mu"):
            lm.train_numpy(w, x, y, epochs=1, batch_size=4, learning_rate=0.1, orders=[np.arange(4)], proximal_mu=mu)


def _train_task(tmp_path, mu):
    from fedlinear.clients import client_app as ca
    from fedlinear.common.csvio import to_csv_bytes

    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 2))
    y = x @ [1.0, -1.0] + 0.5
    shard = tmp_path / "client-0.csv"
    shard.write_bytes(to_csv_bytes(x, y))
    start = lm.LinearWeights(kernel=np.zeros((2, 1), np.float32), bias=np.zeros(1, np.float32))
    config = {"server-round": 1, "learning-rate": 0.2}
    if mu is not None:
        config["proximal-mu"] = mu
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    msg = Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in start.as_dict().items()}), "config": ConfigRecord(config)}),
        dst_node_id=1,
        message_type="train",
    )
    ctx = Context(
        run_id=7, node_id=1, node_config={"partition-id": 0, "data-uri": str(shard)}, state=RecordDict(),
        run_config={"local-epochs": 300, "batch-size": 40, "standardize": "none"},
    )  # fmt: skip
    try:
        reply = ca.app(msg, ctx)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
        ca._SHARDS.clear()
    return reply, x, y, start


@pytest.mark.parametrize("mu", [None, 1.0])
def test_the_client_applies_the_tasks_proximal_mu(tmp_path, mu):
    reply, x, y, start = _train_task(tmp_path, mu)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    got = np.append(reply.content["arrays"]["kernel"].numpy().ravel(), reply.content["arrays"]["bias"].numpy())
    expected = closed_form(x, y, start.vector(), mu) if mu else lm.lstsq_theta(x, y)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_bad_proximal_mu_fails_the_task_with_one_line(tmp_path):
    reply, *_ = _train_task(tmp_path, -2.0)
    assert reply.has_error()
    assert "'proximal-mu' must be a finite number >= 0, got -2.0" in reply.error.reason
    assert "\n" not in reply.error.reason


def test_a_fedprox_run_sends_mu_and_the_clients_use_it(tmp_path):
    """In process (real ServerApp + ClientApp): the train tasks carry proximal-mu, and the round's
    global model moves less from the start than FedAvg's does (same seed, same batches)."""
    from tests.inprocess import run_in_process, write_synthetic_shards

    uris, _ = write_synthetic_shards(tmp_path / "data", 2, 60, 3, 5, 10)
    settings = {"num-server-rounds": 1, "local-epochs": 20, "learning-rate": 0.1, "standardize": "none"}
    grids = []
    _, prox = run_in_process(uris, str(tmp_path / "prox"), grids=grids, **settings, strategy="fedprox", **{"proximal-mu": 5.0})
    _, avg = run_in_process(uris, str(tmp_path / "avg"), **settings, strategy="fedavg")
    sent = [m for m in grids[0].sent if m.metadata.message_type == "train"]
    assert sent and all(m.content["config"]["proximal-mu"] == 5.0 for m in sent)
    start = lm.initial_weights(3, 42).vector()
    moved = {name: np.linalg.norm(np.array(m["weights"]["kernel"] + [m["weights"]["bias"]]) - start)
             for name, m in (("prox", prox), ("avg", avg))}  # fmt: skip
    assert moved["prox"] < 0.8 * moved["avg"]
