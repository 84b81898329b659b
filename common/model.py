"""The linear model, its weight layout, the two local-training engines and the closed-form reference.

Weight layout (shared by clients, server, checkpoints and the export): two float32 arrays named
like the variables of a Keras ``Dense(1)`` layer, in ``Dense.get_weights()`` order:

* ``kernel``: shape ``(d, 1)``
* ``bias``: shape ``(1,)``, only when the model has an intercept (``fit-intercept = true``, the
  default); a model through the origin (``fit-intercept = false``) has the kernel alone, as a Keras
  ``Dense(1, use_bias=False)``

so that ``y_hat = x @ kernel + bias`` with ``x`` of shape ``(n, d)`` and ``y_hat`` of shape ``(n, 1)``.

Engines:

* ``numpy`` performs exactly the update Keras performs for ``Dense(1)`` + ``MeanSquaredError`` +
  ``SGD(learning_rate)`` on each mini-batch, in float32, without importing TensorFlow;
* ``keras`` runs TensorFlow's Keras, with the model built and compiled once per process.

Both visit the samples in the same order (:func:`batch_order`), so they agree to float rounding.

FedProx: with ``proximal_mu = mu > 0`` both engines minimise, on each mini-batch,
``MSE + (mu / 2) * ||theta - theta_global||²`` where ``theta = [kernel, bias]`` (the bias is
included) in whatever variables the caller trains in (the client: the standardized space of the
server's transform), and ``theta_global`` is the weights the task started from. The reported loss
stays the data term (MSE), comparable with FedAvg runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib

import numpy as np

KERNEL = "kernel"
BIAS = "bias"
WEIGHT_NAMES = (KERNEL, BIAS)  # the layout of a model with an intercept (the default)


def weight_names(fit_intercept: bool = True) -> tuple[str, ...]:
    """The arrays of the model: ``(kernel, bias)``, or ``(kernel,)`` without an intercept."""
    return WEIGHT_NAMES if fit_intercept else (KERNEL,)


@dataclasses.dataclass
class LinearWeights:
    """The model's parameters in the documented layout (``bias`` None: a model without an intercept)."""

    kernel: np.ndarray  # (d, 1) float32
    bias: np.ndarray | None  # (1,) float32, or None without an intercept

    @property
    def num_features(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def fit_intercept(self) -> bool:
        return self.bias is not None

    @property
    def bias_value(self) -> float:
        """The intercept as a float (0.0 for a model without one)."""
        return 0.0 if self.bias is None else float(self.bias[0])

    @property
    def names(self) -> tuple[str, ...]:
        return weight_names(self.fit_intercept)

    def arrays(self) -> list[np.ndarray]:
        """The arrays in layout order: ``[kernel, bias]`` or ``[kernel]``."""
        return [self.kernel] if self.bias is None else [self.kernel, self.bias]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> LinearWeights:
        """The inverse of :meth:`arrays`."""
        return cls(kernel=arrays[0], bias=arrays[1] if len(arrays) > 1 else None)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.arrays(), strict=True))

    @classmethod
    def from_dict(cls, arrays: dict[str, np.ndarray]) -> LinearWeights:
        kernel = np.asarray(arrays[KERNEL], dtype=np.float32)
        bias = np.asarray(arrays[BIAS], dtype=np.float32).reshape(1) if BIAS in arrays else None
        return cls(kernel=kernel.reshape(-1, 1), bias=bias)

    def vector(self) -> np.ndarray:
        """``[w_1..w_d, b]`` (``[w_1..w_d]`` without an intercept) as float64."""
        return np.concatenate([a.ravel() for a in self.arrays()]).astype(np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predictions of shape ``(n,)`` (float64)."""
        return x @ self.kernel.astype(np.float64).ravel() + self.bias_value


def initial_weights(num_features: int, seed: int, fit_intercept: bool = True) -> LinearWeights:
    """Glorot-uniform kernel (Keras' Dense default) drawn from ``seed``; zero bias (none without an intercept)."""
    limit = np.sqrt(6.0 / (num_features + 1))
    rng = np.random.default_rng([seed, 0x1A17])
    kernel = rng.uniform(-limit, limit, size=(num_features, 1)).astype(np.float32)
    return LinearWeights(kernel=kernel, bias=np.zeros(1, dtype=np.float32) if fit_intercept else None)


def mse(weights: LinearWeights, x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error over the samples, with matching shapes (n,) vs (n,)."""
    residual = weights.predict(x) - np.asarray(y, dtype=np.float64).ravel()
    return float(np.mean(residual * residual))


def client_key(partition_id: int | None, data_uri: str, party_id: str | None = None, content: bytes | None = None) -> int:
    """A stable integer naming a party: it fixes the party's sampling, batch order and place in the
    aggregation order.

    In order: the ``partition-id`` (simulation, and the local launcher's SuperNodes); a
    ``party-id`` the SuperNode's operator gave (a 48-bit hash of it); the shard's path together
    with a digest of its parsed content (``content``: :func:`shard_digest`), so parties whose shards
    share a path (every party's ``/data/train.csv``) still differ, and a party keeps its key when
    its SuperNode restarts (a node id does not survive that); without ``content``, a CRC of the path.
    """
    if partition_id is not None:
        return int(partition_id)
    if party_id:
        return _key48(b"party-id\0" + party_id.encode("utf-8"))
    if content is not None:
        return _key48(b"shard\0" + data_uri.encode("utf-8") + b"\0" + content)
    return zlib.crc32(data_uri.encode("utf-8"))


def _key48(payload: bytes) -> int:
    """48 bits of BLAKE2b: collisions are unlikely (and detected by the server), and the key fits
    Flower's int64 records and NumPy's seed sequence."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=6).digest(), "big")


def shard_digest(x: np.ndarray, y: np.ndarray) -> bytes:
    """A digest of a shard's parsed content (shape and float64 values): the same file, read again after
    a restart, gives the same digest."""
    h = hashlib.blake2b(digest_size=16)
    x64, y64 = np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64)
    h.update(repr((x64.shape, y64.shape)).encode())
    h.update(x64.tobytes())
    h.update(y64.tobytes())
    return h.digest()


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
    proximal_mu: float = 0.0,
    correction: np.ndarray | None = None,
) -> tuple[LinearWeights, float]:
    """Mini-batch SGD on the MSE, exactly as Keras computes it for Dense(1), in float32.

    With ``proximal_mu > 0`` each step's gradient gains ``mu (theta - theta_start)`` (FedProx); with a
    ``correction`` ``[kernel..., bias]`` (SCAFFOLD's ``c - c_i``, :mod:`common.scaffold`) each step's
    gradient gains that constant vector.
    Returns the new weights and the mean batch MSE of the last epoch (as Keras reports it).
    """
    x32 = np.asarray(x, dtype=np.float32)  # no copy when the caller keeps float32 copies (the client does)
    y32 = np.asarray(y, dtype=np.float32).reshape(-1, 1)
    kernel = weights.kernel.astype(np.float32, copy=True).reshape(-1, 1)
    bias = None if weights.bias is None else weights.bias.astype(np.float32, copy=True).reshape(1)
    lr = np.float32(learning_rate)
    # Per-batch work is a few tiny BLAS calls, so Python overhead dominates: in-place updates and
    # plain-float loss bookkeeping keep it low (the float32 arithmetic is the same as Keras').
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by the caller
        kernel, bias, epoch_loss = _sgd_epochs(
            x32, y32, kernel, bias, lr, batch_size, orders, epochs, _proximal(weights, proximal_mu),
            None if correction is None else _split(correction, kernel.shape[0]),
        )
    return LinearWeights(kernel=kernel, bias=bias), epoch_loss


def _proximal(weights: LinearWeights, mu: float) -> tuple[np.float32, np.ndarray, np.ndarray] | None:
    """``(mu, kernel anchor, bias anchor)`` in float32 for FedProx, None when ``mu`` is 0."""
    mu = float(mu)
    if not (mu >= 0 and np.isfinite(mu)):
        raise ValueError(f"proximal mu must be a finite number >= 0, got {mu}")
    if mu == 0:
        return None
    return (
        np.float32(mu),
        weights.kernel.astype(np.float32, copy=True).reshape(-1, 1),
        None if weights.bias is None else weights.bias.astype(np.float32, copy=True).reshape(1),
    )


def _split(vector: np.ndarray, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """``[kernel..., bias]`` as float32 ``(kernel (d, 1), bias (1,))``."""
    v = np.asarray(vector, np.float32).ravel()
    if v.shape != (num_features + 1,):
        raise ValueError(f"a correction needs {num_features + 1} values, got {v.shape[0]}")
    return v[:-1].reshape(-1, 1).copy(), v[-1:].copy()


def _sgd_epochs(x32, y32, kernel, bias, lr, batch_size, orders, epochs, prox=None, correction=None):
    """The epochs of :func:`train_numpy`, updating ``kernel`` and ``bias`` (None: no intercept) in place;
    ``correction`` (SCAFFOLD's ``c - c_i`` as ``(kernel, bias)``) is added to every step's gradient."""
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
            if bias is not None:
                residual += bias
            residual -= yb  # (B, 1) = prediction - target
            scale = two / np.float32(size)
            grad_kernel = xb.T @ residual
            grad_kernel *= scale
            flat = residual.ravel()
            weighted_loss += float(np.dot(flat, flat))  # = size x the batch's mean squared error
            seen += size
            if prox is not None:  # FedProx: the gradient of (mu / 2) ||theta - theta_start||²
                grad_kernel += prox[0] * (kernel - prox[1])
            if correction is not None:  # SCAFFOLD: the control variates' c - c_i
                grad_kernel += correction[0]
            grad_kernel *= lr
            kernel -= grad_kernel
            if bias is not None:
                grad_bias = residual.sum(axis=0)
                grad_bias *= scale
                if prox is not None:
                    grad_bias += prox[0] * (bias - prox[2])
                if correction is not None:
                    grad_bias += correction[1]
                grad_bias *= lr
                bias -= grad_bias
        epoch_loss = weighted_loss / seen if seen else 0.0
    return kernel, bias, epoch_loss


_KERAS_MODELS: dict[tuple[int, bool, bool], object] = {}


def keras_model(num_features: int, proximal: bool = False, use_bias: bool = True):
    """A compiled Keras Dense(1) model for ``num_features`` inputs, built once per process.

    ``proximal``: the model whose kernel and bias carry FedProx regularizers (``model.proximal``:
    the anchors and ``mu`` are Keras variables, assigned per task without recompiling), compiled
    with an MSE metric so the data term can be reported apart from the proximal one.
    """
    model = _KERAS_MODELS.get((num_features, proximal, use_bias))
    if model is None:
        import keras  # TensorFlow is imported only when the keras engine is used

        if proximal:
            terms = (_keras_proximal(keras, (num_features, 1)), _keras_proximal(keras, (1,)))
            layer = keras.layers.Dense(
                1, use_bias=use_bias, kernel_regularizer=terms[0], bias_regularizer=terms[1] if use_bias else None
            )
        else:
            layer = keras.layers.Dense(1, use_bias=use_bias)
        model = keras.Sequential([keras.Input(shape=(num_features,)), layer])
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.01),
            loss="mean_squared_error",
            metrics=["mean_squared_error"] if proximal else None,
        )
        if proximal:
            model.proximal = terms
        _KERAS_MODELS[(num_features, proximal, use_bias)] = model
    return model


def _keras_proximal(keras, shape: tuple[int, ...]):
    """A Keras regularizer ``(mu / 2) ||w - anchor||²`` with ``mu`` and ``anchor`` as variables."""

    class Proximal(keras.regularizers.Regularizer):
        def __init__(self) -> None:
            self.mu = keras.Variable(0.0, trainable=False, dtype="float32")
            self.anchor = keras.Variable(np.zeros(shape, np.float32), trainable=False, dtype="float32")

        def __call__(self, w):
            diff = w - self.anchor
            return 0.5 * self.mu * keras.ops.sum(diff * diff)

    return Proximal()


def train_keras(
    weights: LinearWeights,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    orders: list[np.ndarray],
    proximal_mu: float = 0.0,
) -> tuple[LinearWeights, float]:
    """The same local training with TensorFlow's Keras (model reused, never recompiled)."""
    prox = _proximal(weights, proximal_mu)
    model = keras_model(weights.num_features, proximal=prox is not None, use_bias=weights.fit_intercept)
    model.optimizer.learning_rate.assign(learning_rate)
    model.set_weights(weights.arrays())
    if prox is not None:  # FedProx: anchor the regularizers at the weights the task started from
        mu, anchor_kernel, anchor_bias = prox
        for term, anchor in zip(model.proximal, (anchor_kernel, anchor_bias), strict=True):
            if anchor is not None:
                term.mu.assign(mu)
                term.anchor.assign(anchor)
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
            out = model.train_on_batch(xs[start : start + batch_size], ys[start : start + batch_size], return_dict=True)
            # the data term: with FedProx "loss" includes the proximal term, the compiled MSE metric does not
            losses.append(float(out["mean_squared_error"] if prox is not None else out["loss"]))
            counts.append(len(xs[start : start + batch_size]))
        loss = float(np.average(losses, weights=counts))
    trained = [np.asarray(a, np.float32) for a in model.get_weights()]
    return LinearWeights.from_arrays(trained), loss


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
