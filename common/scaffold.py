"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1) for the linear model: control variates that correct client drift.

Vectors are ``[kernel..., bias]`` (float64 on the server) in the clients' training space. Per round,
with global model ``x``, server control ``c`` and client control ``c_i``:

* client ``i`` runs ``K_i`` local steps ``y <- y - η (g_i(y) - c_i + c)`` from ``y = x``
  (:func:`common.model.train_numpy` with ``correction = c - c_i``), ``K_i = local_epochs x
  ceil(n_i / B)`` its mini-batches;
* option II of the paper's control update: ``c_i+ = c_i - c + (x - y_i) / (K_i η)``, so
  ``Δc_i = (x - y_i) / (K_i η) - c`` (:func:`control_delta`), which the server can recompute from the
  reply's weights: it checks the client's ``Δc_i`` against it (:func:`check_delta`);
* server: ``x <- x + η_g Σ_S w_i (y_i - x)`` and ``c <- c + Σ_S (n_i / n) Δc_i``, ``c_i <- c_i+``.

The paper weighs clients equally (``w_i = 1/|S|``, ``c`` moves by ``|S|/N`` of the mean ``Δc_i``),
for the objective ``(1/N) Σ f_i``. fedlinear's objective is the pooled MSE ``Σ (n_i / n) f_i``, so
the weights are the shard sizes: ``w_i = n_i / Σ_S n_j`` and ``c = Σ (n_i / n) c_i`` over all ``N``
parties (``n`` their total). With equal shards both are the paper's rule exactly.

The server keeps ``c`` and every ``c_i`` (by client key) and sends ``c`` and ``c_i`` with each train
task; it checkpoints them, so a resumed run continues bit-identically even though a resumed run is
a new Flower run (a new Context on every node) and SuperNodes may have restarted.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# The client's Δc_i must equal the server's recomputation to this relative tolerance (float32 weights
# and float64 arithmetic on both sides: they agree to rounding).
DELTA_TOLERANCE = 1e-6


def local_steps(num_examples: int, batch_size: int, local_epochs: int) -> int:
    """``K_i``: the mini-batch steps of one round on a shard of ``num_examples``."""
    return max(1, local_epochs * math.ceil(num_examples / batch_size))


def control_delta(x: np.ndarray, y: np.ndarray, c: np.ndarray, steps: int, learning_rate: float) -> np.ndarray:
    """Option II: ``Δc_i = c_i+ - c_i = (x - y_i) / (K_i η) - c`` (float64)."""
    x64, y64 = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    return (x64 - y64) / (steps * float(learning_rate)) - np.asarray(c, np.float64).ravel()


def check_delta(claimed: np.ndarray, expected: np.ndarray) -> str | None:
    """Why a reply's ``Δc_i`` is refused (None: accepted): shape, finiteness, agreement with option II."""
    claimed = np.asarray(claimed, np.float64).ravel()
    if claimed.shape != expected.shape:
        return f"control delta has {claimed.shape[0]} values, expected {expected.shape[0]}"
    if not np.isfinite(claimed).all():
        return "control delta has non-finite values"
    scale = max(float(np.linalg.norm(expected)), 1.0)
    if float(np.linalg.norm(claimed - expected)) > DELTA_TOLERANCE * scale:
        return "control delta disagrees with the reply's weights (SCAFFOLD option II)"
    return None


@dataclasses.dataclass
class Controls:
    """The server's control variates: ``c`` and each party's ``c_i`` (zero until it first trains)."""

    size: int  # d + 1
    c: np.ndarray = None  # type: ignore[assignment]
    clients: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.c is None:
            self.c = np.zeros(self.size)

    def of(self, key: int) -> np.ndarray:
        return self.clients.get(int(key), np.zeros(self.size))

    def update(self, deltas: dict[int, np.ndarray], sizes: dict[int, int], total: int) -> None:
        """``c_i += Δc_i`` for the parties that replied and ``c += Σ (n_i / n) Δc_i`` (in key order)."""
        step = np.zeros(self.size)
        for key in sorted(deltas):
            self.clients[key] = self.of(key) + deltas[key]
            step += (sizes[key] / total) * deltas[key]
        self.c = self.c + step

    def state_dict(self) -> dict:
        return {"c": self.c.tolist(), "clients": {str(k): v.tolist() for k, v in sorted(self.clients.items())}}

    def load_state_dict(self, state: dict) -> None:
        self.c = np.asarray(state["c"], np.float64)
        self.clients = {int(k): np.asarray(v, np.float64) for k, v in state["clients"].items()}
