"""Exact federated least squares (``strategy = "fedols"``): what a party sends and how the server solves.

The problem, over the pooled data of every party that answered (``X`` (n, d), ``y`` (n,)):

    minimise  ||y − X w − b||²  +  l2 ||w||²        (``fedols-l2`` >= 0; the bias is not penalised)

Two ways to combine the parties, chosen by ``fedols-method``:

* ``normal``: the centred normal equations. Each party's ``n``, ``Σ[x y]`` and centred scatter
  ``Σ(z − μ)(z − μ)ᵀ`` about the pooled mean ``μ`` are the two additive passes the server already
  makes before training (:mod:`common.scaling`: :class:`~common.scaling.Moments`,
  :class:`~common.scaling.Scatter`, :class:`~common.scaling.PooledStats`); the server solves
  ``(Sxx + l2 I) w = Sxy`` with the columns scaled to unit variance. Additive, so it is the path that
  could travel under secure aggregation; it squares the condition number of the design.
* ``qr`` (TSQR): each party sends the ``R`` of a QR factorisation of its own block
  ``[X − μx, 1, y − μy]`` (centred about the pooled mean, so no large offset meets the intercept
  column); the server stacks the ``R``'s (and ``sqrt(l2) [I 0 0]`` rows for ridge), factorises
  again and solves ``R11 [w, b'] = r12`` by back-substitution: ``XᵀX`` is never formed, the error
  grows with the condition number, not its square. The intercept column makes the result exact
  even when a party drops out after the pooled mean was computed (then the remaining data are
  not centred about ``μ`` any more; with the column the solve does not care).

Nothing here knows Flower: :mod:`server.fedols` sends the queries, :mod:`clients.client_app`
answers them with :func:`local_r`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedlinear.common import scaling

METHODS = ("qr", "normal")
# A triangular factor whose column-scaled smallest singular value is below this fraction of its
# largest is treated as rank-deficient: the minimum-norm solution (SVD of R, still no XᵀX) is used
# instead of back-substitution. Far below what the normal equations can resolve (~1e-8).
RANK_TOLERANCE = 1e-13


def local_r(x: np.ndarray, y: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """One party's ``R`` (``(d+2, d+2)``, upper triangular, non-negative diagonal) of
    ``[x − centre[:d], 1, y − centre[d]]``; zero rows pad it when the party has fewer rows."""
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    centre = np.asarray(centre, np.float64).ravel()
    block = np.column_stack([x - centre[:d], np.ones(x.shape[0]), np.asarray(y, np.float64).ravel() - centre[d]])
    r = np.linalg.qr(block, mode="r")
    if r.shape[0] < d + 2:
        r = np.vstack([r, np.zeros((d + 2 - r.shape[0], d + 2))])
    signs = np.where(np.diagonal(r) < 0, -1.0, 1.0)  # a unique R: the Gram matrix RᵀR does not change
    return np.triu(signs[:, None] * r)


def check_r(r: np.ndarray, num_features: int, num_examples: int) -> str | None:
    """Why a party's ``R`` is unacceptable (one line), or None.

    Checked: shape, finite values, upper-triangular (nothing below the diagonal), and the intercept
    column's norm: ``||R[:, d]||² = n`` exactly for a block with a column of ones, so a party cannot
    weigh itself more than the rows it declared in the shard query.
    """
    d = num_features
    if r.shape != (d + 2, d + 2):
        return f"R factor of shape {r.shape}, expected {(d + 2, d + 2)}"
    if not np.isfinite(r).all():
        return "R factor has non-finite values"
    below = np.tril(r, -1)
    if np.any(below != 0):
        return f"R factor is not upper triangular (largest entry below the diagonal {np.abs(below).max():.3g})"
    ones = float(r[:, d] @ r[:, d])
    if not abs(ones - num_examples) <= 1e-9 * num_examples:
        return f"R factor's intercept column says {ones:.6g} rows, the shard query said {num_examples}"
    return None


# Honest R factors and scatters agree to rounding: QR and the sums are backward stable, so an entry of
# RᵀR differs from the one the statistics give by a few n·ε of the product of its columns' norms.
CONSISTENCY_TOLERANCE = 1e-8


def expected_gram(
    count: int, total: np.ndarray, scatter: np.ndarray, scatter_centre: np.ndarray, centre: np.ndarray
) -> np.ndarray:
    """The Gram matrix ``BᵀB`` of a party's block ``B = [x − c_x, 1, y − c_y]`` (``c`` = ``centre``), from
    what it sent in the clear: ``n``, ``Σ[x y]`` and its scatter ``S = Σ(z − m)(z − m)ᵀ`` about the
    server's centre ``m`` (``scatter_centre``). With ``μ = Σz / n``:
    ``Σ(z − c)(z − c)ᵀ = S + n[(μ − c)(μ − c)ᵀ − (μ − m)(μ − m)ᵀ]``, the ones column gives ``n(μ − c)``
    and ``n``, laid out as the block is (features, ones, target)."""
    n = float(count)
    z_mean = np.asarray(total, np.float64).ravel() / n
    to_c = z_mean - np.asarray(centre, np.float64).ravel()
    to_m = z_mean - np.asarray(scatter_centre, np.float64).ravel()
    zz = np.asarray(scatter, np.float64) + n * (np.outer(to_c, to_c) - np.outer(to_m, to_m))
    d = zz.shape[0] - 1
    gram = np.zeros((d + 2, d + 2))
    z_cols = [*range(d), d + 1]  # block columns of x and y
    gram[np.ix_(z_cols, z_cols)] = zz
    gram[d, z_cols] = gram[z_cols, d] = n * to_c
    gram[d, d] = n
    return gram


def r_matches_statistics(
    r: np.ndarray, count: int, total: np.ndarray, scatter: np.ndarray, scatter_centre: np.ndarray, centre: np.ndarray,
    tolerance: float = CONSISTENCY_TOLERANCE,
) -> str | None:  # fmt: skip
    """Why a party's R factor is not the one of the data whose moments and scatter it sent in the same
    run (one line), or None: ``RᵀR`` must equal :func:`expected_gram` entry by entry to within
    ``tolerance`` x ``sqrt(a_j a_k)``, ``a`` the diagonal of the terms it is computed from (the expected
    diagonal when the scatter's and the factor's centres agree). A party that lies in one of its two
    answers would otherwise bend the solve (R) and the standardization or the yardstick (the statistics)
    differently, or pass the intercept check with another data set."""
    expected = expected_gram(count, total, scatter, scatter_centre, centre)
    got = r.T @ r
    # the scale each entry is computed at: the diagonal of every term of expected_gram (the scatter
    # about m and the two shifts), so cancelling terms (m far from c) do not turn rounding into a mismatch
    n, d = float(count), r.shape[0] - 2
    z_mean = np.asarray(total, np.float64).ravel() / n
    terms = np.diagonal(np.asarray(scatter, np.float64)) + n * (
        (z_mean - np.asarray(centre, np.float64).ravel()) ** 2 + (z_mean - np.asarray(scatter_centre, np.float64).ravel()) ** 2
    )
    diagonal = np.sqrt(np.maximum(np.insert(terms, d, n), 0.0))  # the ones column (n) between x and y
    bound = tolerance * np.maximum(np.outer(diagonal, diagonal), np.finfo(float).tiny)
    excess = np.abs(got - expected) / bound
    if not np.isfinite(excess).all() or excess.max() > 1.0:
        j, k = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(excess), excess, np.inf))), excess.shape)
        names = [*(f"x{i + 1}" for i in range(r.shape[0] - 2)), "1", "y"]
        scale = float(diagonal[j] * diagonal[k])
        return (
            f"R factor disagrees with the moments and scatter this party sent: RᵀR[{names[j]}, {names[k]}] = "
            f"{got[j, k]:.6g}, its statistics give {expected[j, k]:.6g} (off by {abs(got[j, k] - expected[j, k]) / max(scale, np.finfo(float).tiny):.3g} "
            f"of the diagonal, tolerance {tolerance:g})"
        )
    return None


@dataclasses.dataclass
class Solution:
    """The float64 solution and how it was obtained (the manifest's ``fedols`` block)."""

    kernel: np.ndarray  # (d,)
    bias: float
    method: str
    l2: float
    condition_number: float  # 2-norm condition of the centred design with unit-norm columns
    solver: str
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "l2": self.l2,
            "kernel": self.kernel.tolist(),
            "bias": self.bias,
            "condition-number": self.condition_number,
            "solver": self.solver,
            "notes": list(self.notes),
        }


def _constant_notes(constant: np.ndarray, mean: np.ndarray) -> list[str]:
    return [
        f"feature column {j + 1} is constant ({mean[j]:.6g}) in the pooled data: its weight is 0"
        for j in np.flatnonzero(constant)
    ]


def solve_qr(
    rs: list[np.ndarray], centre: np.ndarray, l2: float, constant: np.ndarray, fit_intercept: bool = True
) -> Solution:
    """TSQR: stack the parties' ``R`` (in a fixed order), factorise, back-substitute.

    ``centre`` is the pooled mean the parties centred on (zeros without an intercept: nothing is
    centred); ``constant`` masks features left out of the solve (weight 0: constant ones with an
    intercept, identically zero ones without). Without an intercept the parties' intercept column
    is dropped before the solve (its norm still checks the rows each party declared).
    """
    centre = np.asarray(centre, np.float64)
    d = centre.shape[0] - 1
    live = np.flatnonzero(~constant)
    columns = [*live, d, d + 1] if fit_intercept else [*live, d + 1]  # live features, (intercept,) target
    stacked = np.vstack([r[:, columns] for r in rs])
    k = live.size
    m = k + int(fit_intercept)  # the model's columns
    condition = _scaled_condition(stacked[:, :k])  # of the data's (centred) design, before any ridge rows
    if l2 > 0:
        ridge = np.zeros((k, m + 1))
        ridge[:, :k] = np.sqrt(l2) * np.eye(k)
        stacked = np.vstack([stacked, ridge])
    r = np.linalg.qr(stacked, mode="r")
    if r.shape[0] < m + 1:
        r = np.vstack([r, np.zeros((m + 1 - r.shape[0], m + 1))])
    r11, r12 = r[:m, :m], r[:m, m]
    norms = np.linalg.norm(r11, axis=0)
    norms[norms == 0] = 1.0
    singular = np.linalg.svd(r11 / norms, compute_uv=False)
    notes = _constant_notes(constant, centre)
    if singular[-1] > RANK_TOLERANCE * singular[0]:
        theta, solver = back_substitute(r11, r12), "back-substitution on the stacked R"
    else:
        scaled, *_ = np.linalg.lstsq(r11 / norms, r12, rcond=RANK_TOLERANCE)
        theta, solver = scaled / norms, "minimum-norm solve of the stacked R (SVD; collinear columns)"
        notes.append(
            f"the design's columns are collinear (smallest singular value with unit-norm columns at most "
            f"{RANK_TOLERANCE:g} of the largest): the minimum-norm solution (in unit-norm columns) is given"
        )
    kernel = np.zeros(d)
    kernel[live] = theta[:k]
    bias = float(centre[d] + theta[k] - centre[:d] @ kernel) if fit_intercept else 0.0
    return Solution(kernel, bias, "qr", float(l2), condition, solver, tuple(notes))


def _scaled_condition(design: np.ndarray) -> float:
    """2-norm condition number of ``design`` with its columns scaled to unit norm."""
    if design.shape[1] == 0:
        return 1.0
    norms = np.linalg.norm(design, axis=0)
    norms[norms == 0] = 1.0
    singular = np.linalg.svd(design / norms, compute_uv=False)
    return float(singular[0] / singular[-1]) if singular[-1] > 0 else float("inf")


def back_substitute(r: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``r x = b`` for upper-triangular, non-singular ``r``."""
    n = r.shape[0]
    x = np.zeros(n)
    for i in range(n - 1, -1, -1):
        x[i] = (b[i] - r[i, i + 1 :] @ x[i + 1 :]) / r[i, i]
    return x


def solve_normal(pooled: scaling.PooledStats, l2: float, fit_intercept: bool = True) -> Solution:
    """The centred normal equations from the pooled statistics, columns scaled to unit variance.

    Without an intercept the same solve runs on the second moments about the origin
    (:func:`common.scaling.about_origin`: nothing centred, the bias is 0).

    ``l2 = 0`` is exactly :meth:`common.scaling.PooledStats.solve` (the run's least-squares
    yardstick). Ridge solves ``(C + l2 D⁻²) β = D⁻¹ Sxy``, ``w = D⁻¹ β`` with ``C`` the correlation-
    like scaled scatter and ``D`` the column norms: the same as ``(Sxx + l2 I) w = Sxy``.
    """
    if not fit_intercept:
        pooled = scaling.about_origin(pooled)
    d = pooled.num_features
    sxx, sxy = pooled.scatter[:d, :d], pooled.scatter[:d, d]
    constant = pooled.constant_features()
    live = ~constant
    std = np.sqrt(np.maximum(np.diagonal(sxx), 0.0))
    std[constant | (std == 0)] = 1.0
    corr = (sxx / np.outer(std, std))[np.ix_(live, live)]
    eigenvalues = np.linalg.eigvalsh(corr) if live.any() else np.ones(1)
    condition = float(np.sqrt(eigenvalues[-1] / eigenvalues[0])) if eigenvalues[0] > 0 else float("inf")
    notes = _constant_notes(constant, pooled.mean)
    if l2 == 0:
        kernel, bias = pooled.solve()
        solver = "centred normal equations, unit-variance columns (SVD, cut-off 1e-10)"
        if eigenvalues[0] <= scaling.EIGEN_TOLERANCE * eigenvalues[-1]:
            notes.append(
                f"the centred scatter is numerically singular (correlation eigenvalue at most {scaling.EIGEN_TOLERANCE:g} "
                "of the largest: collinear columns, or a condition number above 1e5 the normal equations cannot "
                "resolve; fedols-method = qr can): the minimum-norm solution (in unit-variance columns) is given"
            )
        return Solution(kernel, bias, "normal", 0.0, condition, solver, tuple(notes))
    scaled = corr + l2 * np.diag(1.0 / std[live] ** 2)
    beta = np.linalg.solve(scaled, (sxy / std)[live])
    kernel = np.zeros(d)
    kernel[live] = beta / std[live]
    bias = float(pooled.mean[d] - pooled.mean[:d] @ kernel)
    return Solution(kernel, bias, "normal", float(l2), condition, "centred ridge normal equations, unit-variance columns", tuple(notes))
