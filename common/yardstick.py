"""The pooled least-squares optimum every ratio is measured against (the yardstick), computed stably.

Two routes, one result type (:class:`Optimum`):

* :func:`from_factors` (no privacy option on: the parties' statistics flow anyway). Each party sends
  the ``R`` of a QR factorisation of its block ``[x − c, 1, y − c_y]`` (:func:`common.fedols.local_r`;
  ``c`` the pooled mean with an intercept, 0 without one); the server stacks them (TSQR), keeps the
  model's columns and factorises again. The optimum is a back-substitution on that triangle, its
  residual sum of squares is the square of the triangle's last diagonal element (the norm of the
  part of the target no column explains), and the train SSE of any other weights is that plus
  ``||F (θ − θ*)||²`` with ``F`` the triangle of the design: residual norms, never
  ``θᵀAθ − 2θᵀc + yᵀy``. ``XᵀX`` is never formed, so the error grows with the condition number of
  the centred, column-scaled design, not with its square (NIST StRD Filip: ~7 digits, where the
  normal equations keep none; tests/integration/test_strd.py).
* :func:`from_scatter` (under privacy, where only the aggregated scatter ``Σ(z − μ)(z − μ)ᵀ`` about
  the pooled mean is known): the normal equations with unit-variance columns, solved by an
  eigendecomposition with directions below :data:`SCATTER_TOLERANCE` of the largest eigenvalue left
  out (the minimum-norm solution in those columns). The scatter has squared the condition number
  ``κ`` already, so about ``16 − 2 log10 κ`` significant digits remain; the optimum says so in its
  notes when that is fewer than 8 (and nothing can recover them from the scatter alone).

"Collinear" is said only where the design is rank-deficient at float64's resolution: on the factor
route when the smallest singular value of the centred design with unit-norm columns (plus the
intercept column) is at most :data:`RANK_TOLERANCE` of the largest; the columns named are those the
null direction involves. An ill-conditioned design (Filip: 3.8e9) is reported as such, with its
condition number, and solved.

Nothing here knows Flower: :mod:`server.yardstick` gathers the factors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from fedlinear.common import scaling
from fedlinear.common.fedols import back_substitute, local_r

# Smallest-to-largest singular value ratio (unit-norm columns) at or below which the design counts as
# rank-deficient on the factor route: ~ n x float64's unit roundoff for the data sizes here.
RANK_TOLERANCE = 1e-13
# Smallest-to-largest eigenvalue ratio of the unit-variance scatter at or below which a direction is
# left out on the scatter route (the eigenvalues of a float64 scatter carry absolute errors of about
# 1e-16 x the largest; below ~1e-15 of it they are rounding noise).
SCATTER_TOLERANCE = 1e-15
# A column of the null direction whose weight is above this fraction of the largest is named.
NULL_SHARE = 0.1


@dataclasses.dataclass
class Optimum:
    """The pooled least-squares optimum, its residual sum of squares, and the train SSE of any weights.

    Attributes
    ----------
    kernel, bias : the optimum in raw units (``bias`` is 0.0 without an intercept).
    fit_intercept : whether the model has an intercept.
    count : rows the optimum is over.
    rss : its residual sum of squares (train MSE = ``rss / count``).
    condition_number : 2-norm condition number of the design the solve sees (centred when there is
        an intercept, features only, columns scaled to unit norm).
    rank, columns : numerical rank of the model's columns (features + intercept) and their number.
    method : ``"tsqr"`` (stacked R factors) or ``"scatter"`` (aggregated centred scatter).
    centre : (d + 1,) the coordinates ``factor`` works in: ``[x − centre[:d], 1]`` (zeros without
        an intercept).
    factor : (d + 1, d + 1) upper-triangular ``F`` with ``FᵀF`` = Gram matrix ``G`` of ``[x − c, 1]``
        (the factor route), or ``G`` itself (the scatter route: ``gram`` true), whose quadratic form
        is the exact excess there.
    residual_sum : ``Σ (x k* + b* − y)`` (zero by the normal equations with an intercept): the cross
        term for weights with a bias the optimum does not have.
    """

    kernel: np.ndarray
    bias: float
    fit_intercept: bool
    count: int
    rss: float
    condition_number: float
    rank: int
    columns: int
    method: str
    solver: str
    centre: np.ndarray
    factor: np.ndarray
    residual_sum: float = 0.0
    notes: tuple[str, ...] = ()
    gram: bool = False

    @property
    def train_mse(self) -> float:
        return self.rss / self.count

    def _coordinates(self, kernel: np.ndarray, bias: float) -> np.ndarray:
        k = np.asarray(kernel, np.float64).ravel()
        d = k.shape[0]
        return np.r_[k, float(bias) + self.centre[:d] @ k - self.centre[d]]

    def excess_sse(self, kernel: np.ndarray, bias: float = 0.0) -> float:
        """Train SSE of ``(kernel, bias)`` minus the optimum's, as ``||F δ||² + 2 s δ_b`` (no ``yᵀy``)."""
        delta = self._coordinates(kernel, bias) - self._coordinates(self.kernel, self.bias)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.gram:
                quadratic = float(delta @ self.factor @ delta)
            else:
                fitted = self.factor @ delta
                quadratic = float(fitted @ fitted)
            return float(max(quadratic + 2.0 * self.residual_sum * delta[-1], 0.0))

    def reference(self) -> dict[str, Any]:
        """The history's / manifest's ``reference`` block (without the test MSE)."""
        return {
            "train-mse": self.train_mse,
            "weights": [*self.kernel.tolist(), self.bias],
            "num-examples": self.count,
            "fit-intercept": self.fit_intercept,
            "method": self.method,
            "solver": self.solver,
            "condition-number": self.condition_number,
            "rank": self.rank,
            "columns": self.columns,
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def unused_features(pooled: scaling.PooledStats, fit_intercept: bool) -> np.ndarray:
    """Features the model cannot use: constant ones with an intercept (the intercept does their
    work), identically zero ones without (a non-zero constant column is an intercept then)."""
    if fit_intercept:
        return pooled.constant_features()
    d = pooled.num_features
    second = pooled.variances()[:d] + pooled.mean[:d] ** 2
    return second <= 0.0


def feature_names(d: int) -> list[str]:
    return [f"feature column {j + 1}" for j in range(d)]


def triangle(blocks: list[np.ndarray]) -> np.ndarray:
    """The square upper-triangular R (non-negative diagonal) of the stacked ``blocks`` (TSQR step)."""
    stacked = np.vstack(blocks)
    p = stacked.shape[1]
    r = np.linalg.qr(stacked, mode="r")
    if r.shape[0] < p:
        r = np.vstack([r, np.zeros((p - r.shape[0], p))])
    signs = np.where(np.diagonal(r) < 0, -1.0, 1.0)
    return np.triu(signs[:, None] * r)


def unit_norm(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(matrix, axis=0)
    norms[norms == 0] = 1.0
    return matrix / norms, norms


def condition_of(matrix: np.ndarray) -> float:
    """2-norm condition number of ``matrix`` with unit-norm columns (1.0 for no columns)."""
    if matrix.shape[1] == 0:
        return 1.0
    singular = np.linalg.svd(unit_norm(matrix)[0], compute_uv=False)
    return float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf


def null_columns(vectors: np.ndarray, names: list[str]) -> str:
    """The columns the (unit-norm-column) null directions ``vectors`` (columns) involve, in words."""
    weight = np.abs(vectors).max(axis=1)
    involved = [names[i] for i in np.flatnonzero(weight > NULL_SHARE * weight.max())]
    return ", ".join(involved)


def solve_triangle(r11: np.ndarray, r12: np.ndarray, names: list[str]) -> tuple[np.ndarray, int, str, list[str]]:
    """``min ||r11 θ − r12||`` for square upper-triangular ``r11``: back-substitution when its
    unit-norm columns have full numerical rank, the minimum-norm solution (SVD, in unit-norm
    columns) otherwise. Returns ``(θ, rank, solver, notes)``."""
    k = r11.shape[0]
    if k == 0:
        return np.zeros(0), 0, "no columns to solve for", []
    scaled, norms = unit_norm(r11)
    _, singular, vt = np.linalg.svd(scaled)
    small = singular <= RANK_TOLERANCE * singular[0]
    rank = int(k - small.sum())
    if not small.any():
        return back_substitute(r11, r12), rank, "back-substitution on the stacked R", []
    theta = np.linalg.lstsq(scaled, r12, rcond=RANK_TOLERANCE)[0] / norms
    notes = [
        f"collinear columns: {null_columns(vt[small].T, names)} (smallest singular value of the design with "
        f"unit-norm columns at most {RANK_TOLERANCE:g} of the largest; rank {rank} of {k}): the minimum-norm "
        "solution in unit-norm columns is given"
    ]
    return theta, rank, "minimum-norm solve of the stacked R (SVD; rank-deficient design)", notes


def constant_notes(unused: np.ndarray, mean: np.ndarray, fit_intercept: bool) -> list[str]:
    what = "constant ({:.6g}) in the pooled data" if fit_intercept else "identically zero{}"
    return [
        f"feature column {j + 1} is " + (what.format(mean[j]) if fit_intercept else what.format(""))
        + ": its weight is 0"
        for j in np.flatnonzero(unused)
    ]


# ----------------------------------------------------------------------------------------------
# the factor route (TSQR)
# ----------------------------------------------------------------------------------------------


def from_factors(
    rs: list[np.ndarray], centre: np.ndarray, unused: np.ndarray, fit_intercept: bool, count: int
) -> Optimum:
    """The optimum from the parties' R factors of ``[x − centre[:d], 1, y − centre[d]]`` (in a fixed order).

    ``centre`` is what the parties centred on (the pooled mean with an intercept, zeros without);
    ``unused`` masks features left out of the solve (weight 0, :func:`unused_features`); ``count``
    the rows of the parties in ``rs``. With an intercept the intercept column makes the result
    exact even if ``centre`` is not the mean of these parties (one dropped out after the mean).
    """
    centre = np.asarray(centre, np.float64).ravel()
    d = centre.shape[0] - 1
    full = triangle(list(rs))  # (d + 2, d + 2): R of [x − c, 1, y − c_y] over every party
    live = [int(j) for j in np.flatnonzero(~np.asarray(unused, bool))]
    model = live + ([d] if fit_intercept else [])
    sub = triangle([full[:, [*model, d + 1]]])
    k = len(model)
    r11, r12, r22 = sub[:k, :k], sub[:k, k], float(sub[k, k])
    names = [*[feature_names(d)[j] for j in live], *(["the intercept"] if fit_intercept else [])]
    theta, rank, solver, notes = solve_triangle(r11, r12, names)
    rss = r22 * r22
    if rank < k:  # the minimum-norm solution leaves a residual inside the columns' span too
        inside = r12 - r11 @ theta
        rss += float(inside @ inside)
    kernel = np.zeros(d)
    kernel[live] = theta[: len(live)]
    shift = float(theta[-1]) if fit_intercept else 0.0
    bias = float(centre[d] + shift - centre[:d] @ kernel) if fit_intercept else 0.0
    # the condition number of the data's features (centred with an intercept), before the intercept column
    condition = condition_of(triangle([full[:, live]])) if live else 1.0
    factor = full[: d + 1, : d + 1]
    residual_sum = 0.0
    if not fit_intercept:  # Σ (x k* − y): ones-column row of the Gram matrix times [k*, 0, −1]
        gram_ones = full[:, d] @ full
        residual_sum = float(gram_ones[:d] @ kernel - gram_ones[d + 1])
    return Optimum(
        kernel=kernel, bias=bias, fit_intercept=fit_intercept, count=int(count), rss=float(rss),
        condition_number=condition, rank=rank, columns=k, method="tsqr", solver=solver, centre=centre,
        factor=factor, residual_sum=residual_sum,
        notes=tuple(constant_notes(np.asarray(unused, bool), centre if fit_intercept else np.zeros(d + 1),
                                   fit_intercept) + notes),
    )  # fmt: skip


# R factors of one machine's data (``fedlinear run`` under privacy: the statistics file)
FILE_FACTORS = {True: "r-centred", False: "r-origin"}  # by fit_intercept


def local_factors(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The R factors a statistics file stores beside the sums: of ``[x − μx, 1, y − μy]`` (for a
    model with an intercept) and of ``[x, 1, y]`` (without), over the data in one place."""
    mean = scaling.Moments.of(x, y).mean
    return {FILE_FACTORS[True]: local_r(x, y, mean), FILE_FACTORS[False]: local_r(x, y, np.zeros_like(mean))}


# ----------------------------------------------------------------------------------------------
# the scatter route (privacy: only aggregated statistics)
# ----------------------------------------------------------------------------------------------


def from_scatter(pooled: scaling.PooledStats, fit_intercept: bool = True) -> Optimum:
    """The optimum from pooled ``n``, mean and full scatter: eigen-solve of the unit-variance normal
    equations (:data:`SCATTER_TOLERANCE`); accurate to about ``κ² x 1e-16`` relative."""
    if not pooled.full:
        raise ValueError("the scatter route needs the full scatter matrix")
    d, n = pooled.num_features, pooled.count
    mean, scatter = pooled.mean, pooled.scatter
    if fit_intercept:
        gram, centre = scatter, mean.copy()  # about the mean
    else:
        gram, centre = scatter + n * np.outer(mean, mean), np.zeros(d + 1)  # about the origin
    unused = unused_features(pooled, fit_intercept)
    live = np.flatnonzero(~unused)
    sxx, sxy, syy = gram[:d, :d], gram[:d, d], float(gram[d, d])
    scale = np.sqrt(np.maximum(np.diagonal(sxx), 0.0))
    scale[scale == 0] = 1.0
    kernel = np.zeros(d)
    notes = constant_notes(unused, mean, fit_intercept)
    condition, rank = 1.0, 0
    if live.size:
        corr = (sxx / np.outer(scale, scale))[np.ix_(live, live)]
        eigenvalues, vectors = np.linalg.eigh(corr)
        keep = eigenvalues > SCATTER_TOLERANCE * eigenvalues[-1]
        rank = int(keep.sum())
        condition = float(np.sqrt(eigenvalues[-1] / eigenvalues[0])) if eigenvalues[0] > 0 else math.inf
        rhs = (sxy / scale)[live]
        beta = vectors[:, keep] @ ((vectors[:, keep].T @ rhs) / eigenvalues[keep])
        kernel[live] = beta / scale[live]
        if not keep.all():
            notes.append(
                f"the aggregated scatter cannot resolve the design: {null_columns(vectors[:, ~keep], [feature_names(d)[j] for j in live])} "
                f"span directions with eigenvalue at most {SCATTER_TOLERANCE:g} of the largest (rank {rank} of "
                f"{live.size} at the scatter's resolution; they may be collinear or only ill-conditioned): "
                "the minimum-norm solution in unit-variance columns is given"
            )
        digits = 16.0 - 2.0 * math.log10(max(condition, 1.0)) if math.isfinite(condition) else 0.0
        if digits < 8:
            notes.append(
                f"condition number {condition:.3g}: from the aggregated scatter (which squares it) about "
                f"{max(digits, 0.0):.0f} significant digits of the optimum remain; without a privacy option the "
                "parties' R factors give it stably"
            )
    bias = float(mean[d] - mean[:d] @ kernel) if fit_intercept else 0.0
    rss = max(syy - float(kernel @ sxy), 0.0)
    if fit_intercept:
        ones = np.zeros((d + 1, d + 1))
        ones[:d, :d] = scatter[:d, :d]
        ones[d, d] = n
    else:
        ones = np.zeros((d + 1, d + 1))
        ones[:d, :d] = sxx
        ones[:d, d] = ones[d, :d] = n * mean[:d]
        ones[d, d] = n
    residual_sum = 0.0 if fit_intercept else float(n * (mean[:d] @ kernel - mean[d]))
    columns = int(live.size) + int(fit_intercept)
    return Optimum(
        kernel=kernel, bias=bias, fit_intercept=fit_intercept, count=int(n), rss=rss, condition_number=condition,
        rank=rank + int(fit_intercept), columns=columns, method="scatter",
        solver=f"normal equations of the aggregated scatter, unit-variance columns (eigendecomposition, cut-off {SCATTER_TOLERANCE:g})",
        centre=centre, factor=ones, residual_sum=residual_sum, notes=tuple(notes), gram=True,
    )  # fmt: skip
