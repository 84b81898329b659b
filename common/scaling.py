"""Pooled statistics from additive per-node sums, the exact least-squares yardstick, and the
standardization transform the clients train in.

Two additive passes, so that the sums could travel under secure aggregation later:

1. :class:`Moments`: each node sends ``n`` and ``Σz`` with ``z = [x, y]``; the server adds them up and
   learns the pooled mean ``μ``.
2. :class:`Scatter`: the server sends ``μ`` back; each node sends ``Σ(z − μ)(z − μ)ᵀ`` (the full
   matrix, or only its diagonal when the cross-products are not wanted). Summed, that is exactly the
   pooled scatter matrix.

Why not ``Σx²`` about the origin: ``Σx²/n − μ²`` cancels catastrophically for a column with a large
offset (a timestamp, a target around 1e6), and so does the uncentred Gram matrix ``[x 1]ᵀ[x 1]`` that
the first version of the reference solved (a timestamp-like column gave an "optimum" with 7000x the
true optimum's train MSE). Centred sums lose nothing to the offset.

:class:`PooledStats` solves least squares from the centred, column-scaled normal equations and gives
the pooled train MSE of any weights as the optimum's MSE plus a non-negative excess, with no
cancellation against ``yᵀy``.

:class:`Transform` is the affine change of variables the clients train in,
``z = (x − shift) @ matrix`` and ``t = (y − y_shift) / y_scale``; :meth:`Transform.to_raw` folds a
model of ``z`` back into raw-space ``kernel`` and ``bias`` (the exported model takes raw ``x``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from typing import Any

import numpy as np

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError

STANDARDIZE_MODES = ("auto", "whiten", "scale", "none")
# A column whose pooled standard deviation is below this fraction of its magnitude is constant
# (an exactly constant column leaves only float rounding, ~1e-16 relative).
CONSTANT_TOLERANCE = 1e-12
# Directions of the correlation matrix with eigenvalue below this fraction of the largest carry no
# information the float64 normal equations can resolve: whitening leaves them out.
EIGEN_TOLERANCE = 1e-10
# Whitening sends a d x d matrix with every task; above this many features "auto" only scales.
WHITEN_MAX_FEATURES = 256


# ----------------------------------------------------------------------------------------------
# The two additive passes
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Moments:
    """First pass: sample count and ``Σz`` (``z = [x, y]``), additive across nodes."""

    count: int
    total: np.ndarray  # (d+1,)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> Moments:
        z = _stack(x, y)
        return cls(count=int(z.shape[0]), total=z.sum(axis=0))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count


@dataclasses.dataclass
class Scatter:
    """Second pass: ``Σ(z − c)(z − c)ᵀ`` around a centre ``c`` fixed by the server (full or diagonal)."""

    count: int
    matrix: np.ndarray  # (d+1, d+1) when full, (d+1,) when only the diagonal was asked for

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, centre: np.ndarray, full: bool) -> Scatter:
        z = _stack(x, y) - np.asarray(centre, np.float64)
        matrix = z.T @ z if full else np.einsum("ij,ij->j", z, z)
        return cls(count=int(z.shape[0]), matrix=matrix)

    def __add__(self, other: Scatter) -> Scatter:
        return Scatter(self.count + other.count, self.matrix + other.matrix)

    @property
    def full(self) -> bool:
        return self.matrix.ndim == 2


def _stack(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.column_stack([np.asarray(x, np.float64), np.asarray(y, np.float64).ravel()])


# ----------------------------------------------------------------------------------------------
# Pooled statistics and the least-squares yardstick
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PooledStats:
    """Pooled count, mean of ``[x, y]`` and scatter about that mean (full or diagonal)."""

    count: int
    mean: np.ndarray  # (d+1,)
    scatter: np.ndarray  # (d+1, d+1) or (d+1,)

    @classmethod
    def combine(cls, moments: Moments, scatter: Scatter, centre: np.ndarray) -> PooledStats:
        """Pooled statistics from summed passes; ``centre`` is what the nodes centred on.

        If the nodes in the scatter sum are those of ``moments``, the centre is their mean and the
        correction below is zero; it makes the result exact when nodes dropped out between passes.
        """
        if scatter.count != moments.count:
            raise FedLinearError(
                f"pooled statistics disagree: {moments.count} samples in the first pass, {scatter.count} in the second"
            )
        if moments.count < 1:
            raise FedLinearError("no samples in the pooled statistics")
        mean = moments.mean
        shift = mean - np.asarray(centre, np.float64)
        if scatter.full:
            matrix = scatter.matrix - moments.count * np.outer(shift, shift)
        else:
            matrix = scatter.matrix - moments.count * shift * shift
        return cls(count=moments.count, mean=mean, scatter=matrix)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, full: bool = True) -> PooledStats:
        """Statistics of one data set (two passes in one place; for tests and local references)."""
        moments = Moments.of(x, y)
        return cls.combine(moments, Scatter.of(x, y, moments.mean, full), moments.mean)

    def save(self, uri: str, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write ``count``, ``mean`` and ``scatter`` (and any ``extra`` arrays: the yardstick's R
        factors, :func:`common.yardstick.local_factors`) as an ``.npz`` (local path or ``s3://``)."""
        buf = io.BytesIO()
        np.savez(buf, count=np.array(self.count), mean=self.mean, scatter=self.scatter, **(extra or {}))
        storage.write_bytes(uri, buf.getvalue())

    @classmethod
    def load(cls, uri: str, num_features: int) -> PooledStats:
        """Read what :meth:`save` wrote, checked against ``num_features`` (config key ``statistics-uri``)."""
        try:
            with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as arrays:
                count = int(arrays["count"])
                mean, scatter = arrays["mean"].astype(np.float64), arrays["scatter"].astype(np.float64)
        except (KeyError, ValueError, OSError) as exc:
            raise FedLinearError(f"{uri} (config key 'statistics-uri'): not a statistics file: {exc}") from None
        d = num_features
        if count < 1 or mean.shape != (d + 1,) or scatter.shape not in ((d + 1, d + 1), (d + 1,)):
            raise FedLinearError(
                f"{uri} (config key 'statistics-uri'): statistics for another shape than {d} features + target"
            )
        return cls(count=count, mean=mean, scatter=scatter)

    @property
    def full(self) -> bool:
        return self.scatter.ndim == 2

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0]) - 1

    def variances(self) -> np.ndarray:
        """Pooled (population) variances of ``[x, y]``, never negative."""
        diag = np.diagonal(self.scatter) if self.full else self.scatter
        return np.maximum(diag, 0.0) / self.count

    def constant_features(self) -> np.ndarray:
        """Boolean mask of the features that do not vary across the pooled data."""
        std = np.sqrt(self.variances()[:-1])
        scale = np.maximum(np.abs(self.mean[:-1]), np.finfo(np.float64).tiny)
        return std <= CONSTANT_TOLERANCE * scale

    def _require_full(self, what: str) -> None:
        if not self.full:
            raise FedLinearError(f"{what} needs the pooled cross-products (config key 'reference' = auto)")

    def solve(self) -> tuple[np.ndarray, float]:
        """Pooled least squares with an intercept: raw-space ``(kernel (d,), bias)``, float64.

        Solved from the centred normal equations with each column scaled to unit variance (so the
        condition number is that of the correlation matrix, not of the raw scales), by SVD with a
        cut-off: collinear or constant columns get the minimum-norm solution, as ``lstsq`` gives.
        """
        self._require_full("the least-squares reference")
        d = self.num_features
        sxx, sxy = self.scatter[:d, :d], self.scatter[:d, d]
        constant = self.constant_features()
        std = np.sqrt(np.maximum(np.diagonal(sxx), 0.0))
        std[constant | (std == 0)] = 1.0
        corr = sxx / np.outer(std, std)
        rhs = sxy / std
        live = ~constant
        beta = np.zeros(d)
        if live.any():
            sub = corr[np.ix_(live, live)]
            solution, *_ = np.linalg.lstsq(sub, rhs[live], rcond=EIGEN_TOLERANCE)
            beta[live] = solution
        kernel = beta / std
        bias = float(self.mean[d] - self.mean[:d] @ kernel)
        return kernel, bias

    def optimum_sse(self, kernel: np.ndarray) -> float:
        """Sum of squared residuals of the optimum ``kernel``: ``Syy − kᵀSxy`` (normal equations)."""
        d = self.num_features
        return float(max(self.scatter[d, d] - kernel @ self.scatter[:d, d], 0.0))

    def excess_mse(self, kernel: np.ndarray, bias: float, opt_kernel: np.ndarray, opt_bias: float) -> float:
        """Pooled train MSE of ``(kernel, bias)`` minus the optimum's, computed without cancellation.

        With ``Δk = k* − k`` and ``Δb = b* − b`` the residuals are those of the optimum plus
        ``(x − μ)ᵀΔk + (μᵀΔk + Δb)``; the cross terms vanish by the normal equations, leaving
        ``ΔkᵀSxxΔk / n + (μᵀΔk + Δb)²``.
        """
        self._require_full("the pooled train MSE")
        d = self.num_features
        dk = np.asarray(opt_kernel, np.float64) - np.asarray(kernel, np.float64)
        shift = float(self.mean[:d] @ dk + (opt_bias - bias))
        return float(max(dk @ self.scatter[:d, :d] @ dk, 0.0) / self.count + shift * shift)


# ----------------------------------------------------------------------------------------------
# The transform the clients train in
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Transform:
    """``z = (x − shift) @ matrix``, ``t = (y − y_shift) / y_scale``; the model is fit to ``t ~ z``."""

    kind: str  # "whiten" | "scale" | "none"
    shift: np.ndarray  # (d,)
    matrix: np.ndarray  # (d, d); a zero column is a direction the model does not use
    y_shift: float
    y_scale: float
    notes: tuple[str, ...] = ()

    @classmethod
    def identity(cls, num_features: int) -> Transform:
        return cls("none", np.zeros(num_features), np.eye(num_features), 0.0, 1.0)

    @property
    def num_features(self) -> int:
        return int(self.shift.shape[0])

    @property
    def unused(self) -> np.ndarray:
        """Mask of the transformed coordinates that are identically zero (left out)."""
        return ~np.any(self.matrix != 0.0, axis=0)

    def apply(self, x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Transformed ``(z, t)`` in float64 (``t`` is None when ``y`` is)."""
        z = (np.asarray(x, np.float64) - self.shift) @ self.matrix
        t = None if y is None else (np.asarray(y, np.float64) - self.y_shift) / self.y_scale
        return z, t

    def to_raw(self, kernel: np.ndarray, bias: float) -> tuple[np.ndarray, float]:
        """Fold a model of the transformed variables into raw-space ``(kernel (d,), bias)``, float64.

        ``y = y_shift + y_scale (((x − shift) @ M) @ w + b)`` is linear in ``x`` with kernel
        ``y_scale M w`` and bias ``y_shift + y_scale b − shiftᵀ(y_scale M w)``.
        """
        w = np.asarray(kernel, np.float64).ravel()
        raw_kernel = self.y_scale * (self.matrix @ w)
        raw_bias = self.y_shift + self.y_scale * float(bias) - float(self.shift @ raw_kernel)
        return raw_kernel, float(raw_bias)

    def from_raw(self, kernel: np.ndarray, bias: float) -> tuple[np.ndarray, float, float]:
        """The model of the transformed variables whose raw-space function is ``x @ kernel + bias``:
        ``(w (d,), b, residual)``, the inverse of :meth:`to_raw`.

        ``w`` solves ``y_scale M w = kernel`` (least squares; coordinates the transform leaves out stay
        0) and ``b`` keeps the bias at the transform's centre: ``to_raw(w, b)`` gives back ``kernel`` and
        ``bias`` exactly (to rounding) whenever ``kernel`` is in the range of ``M``. Otherwise (the old
        model uses a feature that is constant in this data) ``residual`` = max ``|kernel - to_raw's
        kernel|`` says by how much, and the predictions agree where those features equal ``shift``.
        """
        k = np.asarray(kernel, np.float64).ravel()
        w = np.linalg.lstsq(self.matrix, k / self.y_scale, rcond=None)[0]
        w[self.unused] = 0.0
        b = (float(bias) + float(self.shift @ k) - self.y_shift) / self.y_scale
        residual = float(np.max(np.abs(self.y_scale * (self.matrix @ w) - k))) if k.size else 0.0
        return w, float(b), residual

    def digest(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        for a in (self.shift, self.matrix, np.array([self.y_shift, self.y_scale])):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        return h.hexdigest()[:16]

    def arrays(self) -> dict[str, np.ndarray]:
        """What a train/evaluate message carries (float64, exact)."""
        return {
            "x-shift": np.ascontiguousarray(self.shift, np.float64),
            "x-matrix": np.ascontiguousarray(self.matrix, np.float64),
            "y-shift-scale": np.array([self.y_shift, self.y_scale], np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], num_features: int, kind: str = "received") -> Transform:
        try:
            shift = np.asarray(arrays["x-shift"], np.float64).reshape(num_features)
            matrix = np.asarray(arrays["x-matrix"], np.float64).reshape(num_features, num_features)
            y_shift, y_scale = (float(v) for v in np.asarray(arrays["y-shift-scale"], np.float64).reshape(2))
        except (KeyError, ValueError) as exc:
            raise FedLinearError(f"malformed standardization transform for {num_features} features: {exc}") from None
        if not (np.isfinite(shift).all() and np.isfinite(matrix).all() and math.isfinite(y_shift)):
            raise FedLinearError("standardization transform has non-finite values")
        if not (math.isfinite(y_scale) and y_scale > 0):
            raise FedLinearError(f"standardization transform has target scale {y_scale}")
        return cls(kind, shift, matrix, y_shift, y_scale)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "x-shift": self.shift.tolist(),
            "x-matrix": self.matrix.tolist(),
            "y-shift": self.y_shift,
            "y-scale": self.y_scale,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transform:
        shift = np.asarray(data["x-shift"], np.float64)
        d = shift.shape[0]
        return cls(
            kind=str(data["kind"]),
            shift=shift,
            matrix=np.asarray(data["x-matrix"], np.float64).reshape(d, d),
            y_shift=float(data["y-shift"]),
            y_scale=float(data["y-scale"]),
            notes=tuple(data.get("notes", ())),
        )


def resolve_mode(mode: str, pooled: PooledStats | None) -> str:
    """What ``standardize`` means for this run: ``auto`` whitens when the cross-products are known."""
    if mode != "auto":
        return mode
    if pooled is not None and pooled.full and pooled.num_features <= WHITEN_MAX_FEATURES:
        return "whiten"
    return "scale"


def about_origin(pooled: PooledStats) -> PooledStats:
    """The statistics of a model without an intercept: "mean" 0 and the second moments about the
    origin, ``Σzzᵀ = scatter + n μμᵀ`` (sums of non-negative terms: no cancellation)."""
    if pooled.full:
        matrix = pooled.scatter + pooled.count * np.outer(pooled.mean, pooled.mean)
    else:
        matrix = pooled.scatter + pooled.count * pooled.mean * pooled.mean
    return PooledStats(pooled.count, np.zeros_like(pooled.mean), matrix)


def build_transform(mode: str, pooled: PooledStats | None, num_features: int, fit_intercept: bool = True) -> Transform:
    """The transform for ``standardize = mode`` from the pooled statistics (identity for ``none``).

    Without an intercept (``fit_intercept`` false) nothing is centred: the columns and the target are
    scaled by their root mean square (whitening uses the second moments about the origin), so the
    model through the origin stays one through the origin.
    """
    kind = resolve_mode(mode, pooled)
    if kind == "none":
        return Transform.identity(num_features)
    if pooled is None:
        raise FedLinearError(f"standardize = {mode} needs the pooled statistics, which were not gathered")
    if kind == "whiten" and not pooled.full:
        raise FedLinearError("standardize = whiten needs the pooled cross-products (config key 'reference' = auto)")
    if not fit_intercept:
        return _origin_notes(build_transform(mode, about_origin(pooled), num_features, True))
    d = num_features
    notes: list[str] = []
    variances = pooled.variances()
    constant = pooled.constant_features()
    std = np.sqrt(variances[:d])
    for j in np.flatnonzero(constant):
        notes.append(
            f"feature column {j + 1} is constant ({pooled.mean[j]:.6g}) in the pooled training data: "
            "it cannot be learned from, and its weight is 0 in the model"
        )
    scale = np.where(constant | (std == 0), 1.0, std)
    matrix = np.diag(np.where(constant, 0.0, 1.0 / scale))
    if kind == "whiten":
        live = np.flatnonzero(~constant)
        matrix = np.zeros((d, d))
        if live.size:
            sxx = pooled.scatter[np.ix_(live, live)] / pooled.count
            corr = sxx / np.outer(scale[live], scale[live])
            eigenvalues, vectors = np.linalg.eigh(corr)
            keep = eigenvalues > EIGEN_TOLERANCE * eigenvalues.max()
            block = vectors[:, keep] / np.sqrt(eigenvalues[keep]) / scale[live][:, None]
            # place the kept directions in the first columns of the live coordinates' slots
            for k, col in enumerate(live[: block.shape[1]]):
                matrix[live, col] = block[:, k]
            dropped = live.size - int(keep.sum())
            if dropped:
                notes.append(
                    f"{dropped} of {live.size} non-constant feature directions are collinear with the others or too "
                    "ill-conditioned for training in float64 (correlation eigenvalue below 1e-10 of the largest, i.e. "
                    "a condition number above 1e5 in those directions): the model uses the remaining "
                    f"{int(keep.sum())}, which gives the minimum-norm least-squares fit"
                )
    y_std = math.sqrt(variances[d])
    y_scale = y_std if y_std > CONSTANT_TOLERANCE * max(abs(pooled.mean[d]), np.finfo(np.float64).tiny) else 1.0
    if y_scale == 1.0 and y_std <= CONSTANT_TOLERANCE * max(abs(pooled.mean[d]), np.finfo(np.float64).tiny):
        notes.append(f"the target is constant ({pooled.mean[d]:.6g}) in the pooled training data")
    return Transform(kind, pooled.mean[:d].copy(), matrix, float(pooled.mean[d]), float(y_scale), tuple(notes))


def _origin_notes(transform: Transform) -> Transform:
    """The notes of a transform built from :func:`about_origin` statistics, in those terms."""
    notes = tuple(
        note.replace("is constant (0) in the pooled training data", "is identically zero in the pooled training data")
        .replace("the target is constant (0)", "the target is identically zero")
        for note in transform.notes
    )
    return dataclasses.replace(transform, notes=notes)


# ----------------------------------------------------------------------------------------------
# learning-rate = "auto"
# ----------------------------------------------------------------------------------------------

# Stability: SGD on a quadratic diverges above 1/λmax of the design's second-moment matrix (the
# Hessian of the MSE is twice it); a quarter of that bound converges fast and leaves a margin.
STABLE_FRACTION = 0.25
# Noise: constant-step mini-batch SGD settles at an excess MSE of about lr * tr(G) / B times the
# noise variance; 0.02 * B / tr(G) keeps that near 2 % for one client, well under 1 % after FedAvg
# averages a few clients (measured on 7 real tables and hard synthetic data, see docs/how-to/real-data.md).
NOISE_FRACTION = 0.02
# Convergence: lr * (local steps over the run) >= 2.5 shrinks the initial error by e^-10 at least.
CONVERGENCE_STEPS = 2.5


def design_matrix(pooled: PooledStats | None, transform: Transform, fit_intercept: bool = True) -> np.ndarray | None:
    """``G = E[[z, 1][z, 1]ᵀ]`` (``(d+1, d+1)``) in the training space (``E[zzᵀ]``, ``(d, d)``, without an
    intercept), or None without the cross-products."""
    if pooled is None or not pooled.full:
        return None
    d = pooled.num_features
    mean_z = (pooled.mean[:d] - transform.shift) @ transform.matrix
    cov_z = transform.matrix.T @ (pooled.scatter[:d, :d] / pooled.count) @ transform.matrix
    if not fit_intercept:
        return cov_z + np.outer(mean_z, mean_z)
    g = np.zeros((d + 1, d + 1))
    g[:d, :d] = cov_z + np.outer(mean_z, mean_z)
    g[:d, d] = g[d, :d] = mean_z
    g[d, d] = 1.0
    return g


def design_second_moment(
    pooled: PooledStats | None, transform: Transform, fit_intercept: bool = True
) -> tuple[float, float] | None:
    """``(λmax, trace)`` of ``G = E[[z, 1][z, 1]ᵀ]`` in the training space (``E[zzᵀ]`` without an
    intercept), or None if unknown."""
    if pooled is None:
        return None
    if not fit_intercept:
        return _second_moment_without_intercept(pooled, transform)
    d = pooled.num_features
    g = design_matrix(pooled, transform)
    if g is not None:
        eigenvalues = np.linalg.eigvalsh(g)
        return float(eigenvalues.max()), float(np.trace(g))
    mean_z = (pooled.mean[:d] - transform.shift) @ transform.matrix
    if not np.allclose(transform.matrix, np.diag(np.diagonal(transform.matrix))):
        return None
    var_z = pooled.variances()[:d] * np.diagonal(transform.matrix) ** 2
    trace = float(var_z.sum() + mean_z @ mean_z + 1.0)
    return trace, trace  # without cross-products λmax is only bounded by the trace


def _second_moment_without_intercept(pooled: PooledStats, transform: Transform) -> tuple[float, float] | None:
    d = pooled.num_features
    mean_z = (pooled.mean[:d] - transform.shift) @ transform.matrix
    if pooled.full:
        g = transform.matrix.T @ (pooled.scatter[:d, :d] / pooled.count) @ transform.matrix + np.outer(mean_z, mean_z)
        eigenvalues = np.linalg.eigvalsh(g) if d else np.zeros(1)
        return float(max(eigenvalues.max(), np.finfo(float).tiny)), float(np.trace(g))
    if not np.allclose(transform.matrix, np.diag(np.diagonal(transform.matrix))):
        return None
    var_z = pooled.variances()[:d] * np.diagonal(transform.matrix) ** 2
    trace = float(max(var_z.sum() + mean_z @ mean_z, np.finfo(float).tiny))
    return trace, trace


def auto_learning_rate(
    second_moment: tuple[float, float] | None,
    shard_sizes: list[int],
    batch_size: int,
    local_epochs: int,
    rounds: int,
    fallback: float = 0.05,
) -> tuple[float, str]:
    """The ``learning-rate = auto`` step size and a one-line account of how it was chosen."""
    if second_moment is None or not shard_sizes:
        return fallback, f"learning rate {fallback:g} (auto, no pooled statistics to derive it from)"
    lam, trace = second_moment
    stable = STABLE_FRACTION / lam
    total = sum(shard_sizes)
    typical = sum(n * n for n in shard_sizes) / total  # the shard size an average sample sits in
    steps = max(1, rounds * local_epochs * math.ceil(typical / batch_size))
    noisy = max(shard_sizes) > batch_size
    noise = NOISE_FRACTION * batch_size / trace if noisy else math.inf
    lr = min(stable, max(noise, CONVERGENCE_STEPS / steps))
    bound = "stability" if lr == stable else ("noise" if lr == noise else "convergence")
    return lr, (
        f"learning rate {lr:.4g} (auto: bound by {bound}; λmax {lam:.4g}, trace {trace:.4g}, "
        f"~{steps} local steps over the run)"
    )



# ----------------------------------------------------------------------------------------------
# batch-size = "auto": the local work
# ----------------------------------------------------------------------------------------------

# Mini-batches when the full-batch rule does not apply (the default batch size before "auto").
MINI_BATCH = 32
# Full-batch local work is chosen when its rounds shrink the weights' error (in every direction the
# data determines) by at least this factor: the excess MSE then shrinks by its square, 1e-6.
FULL_BATCH_CONTRACTION = 1e-3


@dataclasses.dataclass(frozen=True)
class LocalWork:
    """What the clients do in a round: the step size, the batch size, and a one-line account."""

    learning_rate: float
    batch_size: int
    note: str


def full_batch_rate(g: np.ndarray | None, learning_rate: float | None, rounds: int) -> tuple[float, float, float] | None:
    """``(step, contraction after the rounds, condition number)`` of full-batch gradient descent on the
    pooled MSE (Hessian ``2 G``), or None when ``G`` is unknown. ``learning_rate`` None: the optimal
    constant step ``1 / (λmax + λmin)`` over the directions the data determines (eigenvalues above
    :data:`EIGEN_TOLERANCE` of the largest; the others are coordinates the transform left out, whose
    gradient is zero)."""
    if g is None:
        return None
    eigenvalues = np.linalg.eigvalsh(g)
    top = float(eigenvalues.max())
    live = eigenvalues[eigenvalues > EIGEN_TOLERANCE * top]
    low = float(live.min())
    step = 1.0 / (top + low) if learning_rate is None else float(learning_rate)
    per_round = max(abs(1.0 - 2.0 * step * low), abs(1.0 - 2.0 * step * top))
    return step, per_round ** max(rounds, 1), top / low


def auto_local_work(
    pooled: PooledStats | None,
    transform: Transform,
    shard_sizes: list[int],
    *,
    batch_size: int | str,
    learning_rate: float | str,
    local_epochs: int,
    rounds: int,
    exact_mean: bool,
    fit_intercept: bool = True,
) -> LocalWork:
    """The local work of a run: ``batch-size`` and ``learning-rate`` with ``auto`` resolved.

    ``batch-size = auto`` chooses one full-batch gradient step a round (the batch is the largest shard)
    when every reason for it holds: ``exact_mean`` (the aggregate is the example-weighted mean of the
    replies, so the round is exactly one gradient step on the pooled MSE and no party's data can pull
    the model towards its own optimum), one local epoch, the pooled cross-products known, and the
    rounds enough for gradient descent at the step to shrink the error by :data:`FULL_BATCH_CONTRACTION`
    (with whitened data ``G`` is the identity and one step at ``1 / (λmax + λmin)`` = 0.5 is Newton's).
    Otherwise it is :data:`MINI_BATCH`, as before ``auto``, with :func:`auto_learning_rate`'s step.
    """
    auto_rate = learning_rate == "auto"
    if batch_size != "auto":
        batch = int(batch_size)
        why = f"batch size {batch} (set in the config)"
    else:
        batch, why = MINI_BATCH, ""
        reason = _full_batch_blocked(pooled, exact_mean, local_epochs, shard_sizes)
        fit = None if reason else full_batch_rate(
            design_matrix(pooled, transform, fit_intercept), None if auto_rate else float(learning_rate), rounds
        )
        if fit is not None:
            step, contraction, kappa = fit
            if contraction <= FULL_BATCH_CONTRACTION:
                batch = max(shard_sizes)
                how = (
                    f"learning rate {step:.4g} (auto: 1 / (λmax + λmin) of the pooled design, condition number "
                    f"{kappa:.3g})" if auto_rate else f"learning rate {step:g} (set in the config)"
                )
                return LocalWork(step, batch, (
                    f"{how}; batch size auto: full batch ({batch}), one gradient step a round, the FedAvg mean of "
                    f"which is a step on the pooled data (error x {contraction:.2g} after {rounds} rounds)"
                ))  # fmt: skip
            reason = f"full-batch steps would shrink the error only to {contraction:.2g} in {rounds} rounds"
        why = f"batch size auto: mini-batches of {MINI_BATCH} ({reason})"
    if auto_rate:
        step, how = auto_learning_rate(
            design_second_moment(pooled, transform, fit_intercept), shard_sizes, batch, local_epochs, rounds
        )
    else:
        step, how = float(learning_rate), f"learning rate {float(learning_rate):g} (set in the config)"
    return LocalWork(step, batch, f"{how}; {why}")


def _full_batch_blocked(pooled: PooledStats | None, exact_mean: bool, local_epochs: int, shard_sizes: list[int]) -> str:
    """Why the full-batch rule cannot apply ("" when it can)."""
    if not shard_sizes:
        return "no shard sizes"
    if not exact_mean:
        return "the aggregate is not the example-weighted mean of the replies"
    if local_epochs != 1:
        return f"local-epochs = {local_epochs} asks for more local work"
    if pooled is None or not pooled.full:
        return "the pooled cross-products are not known"
    return ""
