"""Centralized evaluation: the yardstick metrics of the global model, every round.

The server evaluates the global model itself (Flower's ``evaluate_fn`` in ``Strategy.start``), in
raw units, on its test set (``test-uri``) and against the pooled least-squares optimum when the
pooled statistics are known: test MSE, the optimum's test MSE and the ratio to it, the pooled train
MSE and its excess over the optimum's, the distance to the optimal weights. The optimum and every
train MSE come from :mod:`common.yardstick`: residual norms of the parties' stacked R factors when
they were gathered (:mod:`server.yardstick`), else the pooled scatter (under privacy). :func:`divergence` says
when those numbers mean the run has diverged; :func:`check_target` refuses, before round 1, a
``target-mse-ratio`` the run could not measure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlinear.common import model as lm
from fedlinear.common import scaling, yardstick
from fedlinear.common.config import RunConfig
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError

# A global model whose error grows past this multiple of the initial model's has diverged.
DIVERGENCE_FACTOR = 1e4


class Evaluator:
    """Centralized evaluation of the global model in raw units: test MSE and the gap to least squares.

    The global weights live in the standardized variables of ``transform``; every figure here is for
    the raw-space model they fold into (what the SavedModel computes).
    """

    def __init__(
        self, test: Dataset | None, pooled: scaling.PooledStats | None, transform: scaling.Transform,
        optimum: yardstick.Optimum | None = None, fit_intercept: bool = True,
    ) -> None:  # fmt: skip
        """``optimum``: the stable yardstick from R factors; without it the pooled scatter's (if full)."""
        self.test = test
        self.pooled = pooled if pooled is not None and pooled.full else None
        self.transform = transform
        if optimum is None and self.pooled is not None:
            optimum = yardstick.from_scatter(self.pooled, fit_intercept)
        self.yardstick = optimum
        self.optimum: tuple[np.ndarray, float] | None = None
        self.reference: dict[str, Any] = {}
        if optimum is not None:
            self.optimum = (optimum.kernel, optimum.bias)
            self.reference.update(optimum.reference())
            self.reference["source"] = (
                "pooled least squares from the parties' R factors of their centred blocks, stacked (TSQR)"
                if optimum.method == "tsqr"
                else "pooled least squares from centred additive sums (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) of every node"
            )
            if test is not None:
                self.reference["test-mse"] = mse(optimum.kernel, optimum.bias, test)

    def raw(self, weights: lm.LinearWeights) -> tuple[np.ndarray, float]:
        return self.transform.to_raw(weights.kernel, weights.bias_value)

    def __call__(self, weights: lm.LinearWeights) -> dict[str, float]:
        kernel, bias = self.raw(weights)
        out: dict[str, float] = {}
        if self.test is not None:
            out["test-mse"] = mse(kernel, bias, self.test)
        if self.optimum is not None:
            opt_kernel, opt_bias = self.optimum
            excess = self.yardstick.excess_sse(kernel, bias) / self.yardstick.count  # a residual norm, no yᵀy
            out["train-mse"] = self.yardstick.train_mse + excess
            out["excess-train-mse"] = excess
            out["weight-distance"] = float(np.linalg.norm(np.r_[kernel - opt_kernel, bias - opt_bias]))
            if "test-mse" in out:
                ref = self.reference["test-mse"]
                out["reference-test-mse"] = ref
                out["excess-test-mse"] = out["test-mse"] - ref
                out["test-mse-ratio"] = out["test-mse"] / ref if ref > 0 else float("nan")
        return out


def mse(kernel: np.ndarray, bias: float, data: Dataset) -> float:
    """Mean squared error of the raw-space model ``(kernel, bias)`` on ``data``."""
    with np.errstate(over="ignore", invalid="ignore"):
        residual = data.x @ kernel + bias - data.y
        return float(np.mean(residual * residual))


def divergence(row: dict[str, Any], baseline: dict[str, Any]) -> str | None:
    """Why the global model after this round counts as diverged, or None."""
    for key, label in (("test-mse", "test MSE"), ("train-mse", "pooled train MSE"), ("train-loss", "train loss")):
        value, base = row.get(key), baseline.get(key)
        if value is None:
            continue
        if not np.isfinite(value):
            return f"has a non-finite {label}"
        if base is not None and np.isfinite(base) and value > DIVERGENCE_FACTOR * max(base, 1e-300):
            return f"has a {label} of {value:.4g}, more than {DIVERGENCE_FACTOR:g} x the initial model's {base:.4g}"
        return None
    return None


def check_target(cfg: RunConfig, evaluate: Evaluator, reference_source: str) -> None:
    """A ``target-mse-ratio`` needs test MSE / the optimum's every round: refuse the run (before round 1)
    when this run cannot compute it. The config already refused ``reference`` = none and no ``test-uri``."""
    if not cfg.target_mse_ratio:
        return
    if evaluate.test is None or evaluate.optimum is None:
        why = "no test set" if evaluate.test is None else f"no pooled least-squares optimum ({reference_source})"
    elif not evaluate.reference.get("test-mse", 0.0) > 0:
        why = "the optimum's test MSE is 0, so the ratio is undefined"
    else:
        return
    raise FedLinearError(f"config key 'target-mse-ratio' needs test MSE / the optimum's, which this run lacks: {why}")
