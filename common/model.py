"""The linear model, its weight layout, the two local-training engines and the closed-form reference.

Weight layout (shared by clients, server, checkpoints and the export): two float32 arrays named
like the variables of a Keras ``Dense(1)`` layer, in ``Dense.get_weights()`` order:

* ``kernel``: shape ``(d, 1)``
* ``bias``: shape ``(1,)``

so that ``y_hat = x @ kernel + bias`` with ``x`` of shape ``(n, d)`` and ``y_hat`` of shape ``(n, 1)``.

Engines:

* ``numpy`` performs exactly the update Keras performs for ``Dense(1)`` + ``MeanSquaredError`` +
  ``SGD(learning_rate)`` on each mini-batch, in float32, without importing TensorFlow;
* ``keras`` runs TensorFlow's Keras, with the model built and compiled once per process.

Both visit the samples in the same order (:func:`batch_order`), so they agree to float rounding.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

KERNEL = "kernel"
BIAS = "bias"
WEIGHT_NAMES = (KERNEL, BIAS)


@dataclasses.dataclass
class LinearWeights:
    """The model's parameters in the documented layout."""

    kernel: np.ndarray  # (d, 1) float32
    bias: np.ndarray  # (1,) float32

    @property
    def num_features(self) -> int:
        return int(self.kernel.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {KERNEL: self.kernel, BIAS: self.bias}

    @classmethod
    def from_dict(cls, arrays: dict[str, np.ndarray]) -> LinearWeights:
        kernel = np.asarray(arrays[KERNEL], dtype=np.float32)
        bias = np.asarray(arrays[BIAS], dtype=np.float32).reshape(1)
        return cls(kernel=kernel.reshape(-1, 1), bias=bias)

    def vector(self) -> np.ndarray:
        """``[w_1..w_d, b]`` as float64."""
        return np.concatenate([self.kernel.ravel(), self.bias]).astype(np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predictions of shape ``(n,)`` (float64)."""
        return x @ self.kernel.astype(np.float64).ravel() + float(self.bias[0])


def initial_weights(num_features: int, seed: int) -> LinearWeights:
    """Glorot-uniform kernel (Keras' Dense default) drawn from ``seed``; zero bias."""
    limit = np.sqrt(6.0 / (num_features + 1))
    rng = np.random.default_rng([seed, 0x1A17])
    kernel = rng.uniform(-limit, limit, size=(num_features, 1)).astype(np.float32)
    return LinearWeights(kernel=kernel, bias=np.zeros(1, dtype=np.float32))


def mse(weights: LinearWeights, x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error over the samples, with matching shapes (n,) vs (n,)."""
    residual = weights.predict(x) - np.asarray(y, dtype=np.float64).ravel()
    return float(np.mean(residual * residual))


def client_key(partition_id: int | None, data_uri: str) -> int:
    """A stable integer naming a client's shard: its partition id, else a CRC of its data URI."""
    if partition_id is not None:
        return int(partition_id)
    return zlib.crc32(data_uri.encode("utf-8"))


def batch_order(num_examples: int, seed: int, server_round: int, key: int, epoch: int) -> np.ndarray:
    """The permutation of samples for one local epoch, fixed by (run seed, round, client, epoch)."""
    rng = np.random.default_rng([seed, server_round, key, epoch])
    return rng.permutation(num_examples)


def train_numpy(
    weights: LinearWeights,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    orders: list[np.ndarray],
) -> tuple[LinearWeights, float]:
    """Mini-batch SGD on the MSE, exactly as Keras computes it for Dense(1), in float32.

    Returns the new weights and the mean batch loss of the last epoch (as Keras reports it).
    """
    x32 = np.asarray(x, dtype=np.float32)  # no copy when the caller keeps float32 copies (the client does)
    y32 = np.asarray(y, dtype=np.float32).reshape(-1, 1)
    kernel = weights.kernel.astype(np.float32, copy=True).reshape(-1, 1)
    bias = weights.bias.astype(np.float32, copy=True).reshape(1)
    lr = np.float32(learning_rate)
    # Per-batch work is a few tiny BLAS calls, so Python overhead dominates: in-place updates and
    # plain-float loss bookkeeping keep it low (the float32 arithmetic is the same as Keras').
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by the caller
        kernel, bias, epoch_loss = _sgd_epochs(x32, y32, kernel, bias, lr, batch_size, orders, epochs)
    return LinearWeights(kernel=kernel, bias=bias), epoch_loss


def _sgd_epochs(x32, y32, kernel, bias, lr, batch_size, orders, epochs):
    """The epochs of :func:`train_numpy`, updating ``kernel`` and ``bias`` in place."""
    two = np.float32(2.0)
    epoch_loss = 0.0
    for epoch in range(epochs):
        order = orders[epoch]
        xs, ys = x32[order], y32[order]
        weighted_loss, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
            size = xb.shape[0]
            residual = xb @ kernel
            residual += bias
            residual -= yb  # (B, 1) = prediction - target
            scale = two / np.float32(size)
            grad_kernel = xb.T @ residual
            grad_kernel *= scale
            grad_bias = residual.sum(axis=0)
            grad_bias *= scale
            flat = residual.ravel()
            weighted_loss += float(np.dot(flat, flat))  # = size x the batch's mean squared error
            seen += size
            grad_kernel *= lr
            kernel -= grad_kernel
            grad_bias *= lr
            bias -= grad_bias
        epoch_loss = weighted_loss / seen if seen else 0.0
    return kernel, bias, epoch_loss


_KERAS_MODELS: dict[int, object] = {}


def keras_model(num_features: int):
    """A compiled Keras Dense(1) model for ``num_features`` inputs, built once per process."""
    model = _KERAS_MODELS.get(num_features)
    if model is None:
        import keras  # TensorFlow is imported only when the keras engine is used

        model = keras.Sequential([keras.Input(shape=(num_features,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mean_squared_error")
        _KERAS_MODELS[num_features] = model
    return model


def train_keras(
    weights: LinearWeights,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    orders: list[np.ndarray],
) -> tuple[LinearWeights, float]:
    """The same local training with TensorFlow's Keras (model reused, never recompiled)."""
    model = keras_model(weights.num_features)
    model.optimizer.learning_rate.assign(learning_rate)
    model.set_weights([weights.kernel, weights.bias])
    x32 = np.asarray(x, dtype=np.float32)
    y32 = np.asarray(y, dtype=np.float32).reshape(-1, 1)
    loss = 0.0
    for epoch in range(epochs):
        order = orders[epoch]
        xs, ys = x32[order], y32[order]
        # train_on_batch runs the same compiled train step as fit(), minus fit()'s per-call set-up
        # (data adapter, callbacks): 57 ms instead of 135 ms for 1000 samples here.
        losses, counts = [], []
        for start in range(0, len(order), batch_size):
            losses.append(float(model.train_on_batch(xs[start : start + batch_size], ys[start : start + batch_size])))
            counts.append(len(xs[start : start + batch_size]))
        loss = float(np.average(losses, weights=counts))
    kernel, bias = model.get_weights()
    return LinearWeights(kernel=np.asarray(kernel, np.float32), bias=np.asarray(bias, np.float32)), loss


ENGINES = {"numpy": train_numpy, "keras": train_keras}


# --------------------------------------------------------------------------------------------
# The closed-form reference on one machine's data (the federated one is common.scaling.PooledStats)
# --------------------------------------------------------------------------------------------


def _weights_from_theta(theta: np.ndarray) -> LinearWeights:
    # float64 on purpose: the reference is the yardstick, not a model to ship
    return LinearWeights(kernel=theta[:-1].reshape(-1, 1).copy(), bias=np.array([theta[-1]], dtype=np.float64))


def lstsq_theta(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pooled least squares with an intercept via ``numpy.linalg.lstsq``: ``[w_1..w_d, b]`` float64."""
    design = np.column_stack([np.asarray(x, np.float64), np.ones(len(x))])
    theta, *_ = np.linalg.lstsq(design, np.asarray(y, np.float64), rcond=None)
    return theta


def lstsq_fit(x: np.ndarray, y: np.ndarray) -> LinearWeights:
    """The pooled least-squares solution in the model's weight layout."""
    return _weights_from_theta(lstsq_theta(x, y))
