"""Standardization statistics released under client-level DP (DP-FedAvg, ``dp`` central): the encoding a
party sends, its sensitivity, and the decoding of the noisy sum into pooled statistics. Flower-free; the
server side (asking, validating, noising, accounting) is server/dpstats.py.

**What a party sends** (:func:`encode`): for each column ``j`` of ``z = [x, y]`` (``k = d + 1``
columns) of its shard, its root mean square ``r_j = sqrt(mean z_j²)`` and mean ``μ_j``, encoded
scale-free in two bounded numbers:

* ``a_j = clip(log2(r_j) / R, −1, 1)``, ``R = log2(dp-statistics-max-scale)``: the order of magnitude,
  clipped to the declared range ``[1/M, M]`` of root mean squares (a column whose scale falls outside
  is clipped to the range's end: wrongly scaled, never unbounded);
* ``b_j = μ_j / r_j``, which is in ``[−1, 1]`` for every data set (``|mean| <= rms``, Cauchy–Schwarz), no
  declaration needed (0 for an all-zero column).

The vector ``v = w ⊙ [a, b]`` with fixed, public weights ``w`` (:func:`weights`, ``Σ w² = 1``) has
``‖v‖₂ <= 1`` **whatever the shard holds**. The weights split the release's precision: the target's
scale (which multiplies every error of the model in raw units) gets half of ``Σ w²``, the features'
scales 0.4 between them, the ``b``'s 0.1 (a feature's offset is absorbed by the intercept). Adding or removing
one party changes the sum ``Σ v_i`` by at most 1 in L2 norm: the sum released with ``N(0, z_s² I)``
is a Gaussian mechanism with noise multiplier ``z_s`` under client-level add-or-remove-one neighbours,
the relation the training's accountant uses (server/privacy.py), so it composes with the rounds in one ε.

**What the server makes of it** (:func:`decode`): the mean over the ``m`` parties of the noisy
``a`` and ``b`` (clipped back into ``[−1, 1]``), then per column ``rms = 2^(R a)``, ``mean = b · rms``
and ``std = rms · sqrt(max(1 − b², FLOOR))``: positive and finite for any noise draw, so the
transform built from them is always usable. These are the geometric mean of the parties' scales and
the mean of their ratios, not the pooled moments: good enough to put every column near unit scale
(which is what plain SGD needs), exact only without noise and with equal parties. Shard sizes are
described in the clear as in every private run (the pooled count is their sum; not covered by ε).
"""

from __future__ import annotations

import math

import numpy as np

from fedlinear.common import scaling

# The variance floor, as a fraction of the mean square: std >= rms / 10 whatever the noise did to b.
FLOOR = 1e-2
STREAM = 0x57A75  # the statistics noise stream (dp-noise-seed = seed), apart from the rounds'


def half_range(max_scale: float) -> float:
    """``R = log2(M)``: the half-width of the declared range of log2 root mean squares."""
    return math.log2(max_scale)


def encode(x: np.ndarray, y: np.ndarray, max_scale: float) -> np.ndarray:
    """One party's bounded vector ``w ⊙ [a, b]`` (``(2k,)``, float64, L2 norm <= 1)."""
    z = np.column_stack([np.asarray(x, np.float64), np.asarray(y, np.float64).ravel()])
    k = z.shape[1]
    if z.shape[0] == 0:
        return np.zeros(2 * k)
    # scale each column by its largest |value| first: no overflow of z² on huge values
    peak = np.abs(z).max(axis=0)
    unit = np.where(peak > 0, peak, 1.0)
    rms_unit = np.sqrt(np.mean((z / unit) ** 2, axis=0))
    mean_unit = np.mean(z / unit, axis=0)
    r = half_range(max_scale)
    with np.errstate(divide="ignore"):
        log_rms = np.where(peak > 0, np.log2(np.maximum(rms_unit, np.finfo(float).tiny)) + np.log2(unit), -np.inf)
    a = np.clip(log_rms / r, -1.0, 1.0)
    b = np.where(peak > 0, np.clip(mean_unit / np.where(rms_unit > 0, rms_unit, 1.0), -1.0, 1.0), 0.0)
    return weights(k) * np.concatenate([a, b])


# Shares of Σ w² = 1: the target's scale, the features' scales (together), the k mean/rms ratios (together).
TARGET_SCALE_SHARE, FEATURE_SCALE_SHARE, RATIO_SHARE = 0.5, 0.4, 0.1


def weights(k: int) -> np.ndarray:
    """The public weights ``w`` of the ``2k`` encoded numbers ``[a_1..a_d, a_y, b_1..b_k]``, ``Σ w² = 1``."""
    d = k - 1
    if d == 0:
        return np.sqrt(np.array([TARGET_SCALE_SHARE + FEATURE_SCALE_SHARE, RATIO_SHARE]))
    a = np.full(k, math.sqrt(FEATURE_SCALE_SHARE / d))
    a[-1] = math.sqrt(TARGET_SCALE_SHARE)
    return np.concatenate([a, np.full(k, math.sqrt(RATIO_SHARE / k))])


def scale_noise_bits(parties: int, noise_multiplier: float, max_scale: float) -> float:
    """The standard deviation, in bits (log2), of the released target scale, ``R z_s / (m w_y)``, for any
    number of features (``w_y² = 0.5``). Data-independent: deciding on it costs no privacy."""
    w = math.sqrt(TARGET_SCALE_SHARE)
    return half_range(max_scale) * noise_multiplier / (max(parties, 1) * w)


def sensitivity() -> float:
    """The L2 sensitivity of the summed encodings under adding or removing one party: 1 (``‖v‖ <= 1``)."""
    return 1.0


def check_reply(vector: np.ndarray | None, k: int) -> str | None:
    """Why a party's reply cannot be an encoding (None if it can): shape ``(2k,)``, finite, every entry
    within ``±w_j`` (:func:`weights`). A party may send any vector of norm <= 1 (a lie bounded like any other party's
    data); anything else would break the sensitivity bound and is refused."""
    if vector is None:
        return "malformed or non-finite DP statistics"
    if vector.shape != (2 * k,):
        return f"DP statistics of shape {vector.shape}, expected ({2 * k},)"
    if (np.abs(vector) > weights(k) * (1 + 1e-12)).any():
        return "DP statistics outside their bounded encoding (an entry above its weight)"
    return None


def decode(noisy_sum: np.ndarray, parties: int, count: int, max_scale: float) -> scaling.PooledStats:
    """Pooled statistics (diagonal scatter) from the released noisy sum of ``parties`` encodings."""
    k = noisy_sum.shape[0] // 2
    u = np.asarray(noisy_sum, np.float64) / max(parties, 1) / weights(k)
    a, b = np.clip(u[:k], -1.0, 1.0), np.clip(u[k:], -1.0, 1.0)
    rms = np.exp2(half_range(max_scale) * a)
    mean = b * rms
    variance = rms**2 * np.maximum(1.0 - b * b, FLOOR)
    return scaling.PooledStats(count=int(count), mean=mean, scatter=variance * int(count))


def release(vectors: list[np.ndarray], noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """``Σ v_i + N(0, (z_s · 1)² I)``: the one Gaussian release (sensitivity :func:`sensitivity`)."""
    total = np.sum(np.stack(vectors), axis=0)
    return total + rng.normal(0.0, noise_multiplier * sensitivity(), total.shape)


def statistics_noise(train_noise: float, releases: int, share: float) -> float:
    """The statistics release's noise multiplier ``z_s`` such that it takes ``share`` of the run's
    Gaussian budget: RDP (and zCDP) of Gaussian releases add as ``Σ 1/z²``, so with ``T`` rounds at
    ``z``, ``1/z_s² = share / (1 − share) · T / z²`` (then ``1/z_s²`` is ``share`` of the total)."""
    return train_noise / math.sqrt(share / (1.0 - share) * max(releases, 1))


def safe_learning_rate(x32: np.ndarray, learning_rate: float, fit_intercept: bool = True) -> float:
    """A DP client's step size on its own shard (in the variables it trains in): ``learning_rate`` unless
    it exceeds ``1 / λmax(G)`` of the shard's ``G = ZᵀZ / n`` (``Z = [x, 1]``), where full-batch gradient
    descent on the MSE (Hessian ``2G``) already diverges; then ``1 / max_i ‖z_i‖²``, at which every
    mini-batch step is non-expansive (``λmax(G_b) <= max ‖z_i‖²``, so ``I − 2ηG_b`` has spectral
    radius <= 1). Under DP the statistics are noisy or absent, so the server's step may not fit the
    data's scale; a diverged update would fail the round, a slow one only costs accuracy. The shard
    never leaves the client; the update is clipped and noised as before."""
    z = np.asarray(x32, np.float64)
    if fit_intercept:
        z = np.column_stack([z, np.ones(z.shape[0])])
    if z.shape[0] == 0 or not np.isfinite(z).all():
        return learning_rate
    peak = float(np.max(np.sum(z * z, axis=1)))
    if peak <= 0:
        return learning_rate
    if learning_rate * peak <= 1.0:  # even the worst batch is stable: no eigenvalue needed
        return learning_rate
    top = float(np.linalg.eigvalsh(z.T @ z / z.shape[0]).max())
    return learning_rate if learning_rate * top <= 1.0 else 1.0 / peak
