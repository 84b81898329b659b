"""Synthetic data with known weights: plain, hard on purpose, and heterogeneous parties.

:func:`make_synthetic` draws IID shards and a test set from a known linear model (the hard-data
options scale, offset and correlate the features and offset the target). Four kinds of
heterogeneity (any combination, on top of the hard-data options; :class:`Heterogeneity`,
:func:`make_heterogeneous`), each drawn from its own random stream so that changing one leaves the
others as they were; each stream's seed defaults to the data seed:

- quantity skew (``quantity_alpha``): shard sizes ``min_samples + p * (total - K * min_samples)``
  with ``p ~ Dirichlet(alpha, ..., alpha)``, rounded by largest remainder so they sum to the total
  exactly (``total = K * samples_per_client``); every shard has at least ``min_samples`` rows.
- covariate shift (``covariate_shift = S`` or ``S:T``): party k's features are
  ``mu_k + sigma_k * z`` with ``mu_k ~ N(0, S^2 I)`` and ``log sigma_k ~ N(0, T^2 I)`` per feature
  (``T`` defaults to ``S / 2``); P(y | x) is unchanged.
- concept shift (``concept_spread = s``): party k's true weights ``w_k = w + N(0, s^2 I)`` (the bias
  stays global).
- label-noise skew (``noise_skew = t``): party k's noise level ``noise_k = noise * exp(t * N(0, 1))``
  (log-normal around ``noise``).

The test set is drawn from the mixture of the parties (a row comes from party k with probability
``n_k / total``), so the pooled least-squares optimum is the yardstick for it as for IID data.

The generator returns a summary of how heterogeneous the result is (JSON-able, snake_case keys);
:mod:`scripts.cli` records it in ``truth.json`` and ``fedlinear run`` copies it into the run's
``manifest.json``. With every option off none of that runs: IID data stays byte-for-byte what it
was.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.partition import (
    DEFAULT_MIN_SAMPLES,
    check_room,
    coefficient_of_variation,
    dirichlet_sizes,
    option_integer,
    option_number,
    option_seed,
    stream,
)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticTruth:
    """The generating model in raw space: ``y = x @ weights + bias + noise * N(0, 1)``.

    Hard data (any option of :func:`make_synthetic` on) also records the ``options`` used, the
    per-feature ``feature_scales`` and ``feature_offsets``, the ``latent_weights`` (``beta``: the
    weights of ``y`` on ``z = (x - offset) / scale``) and ``condition_number``, the realised
    condition number of the sample correlation matrix of the pooled training features.
    Heterogeneous parties (:func:`make_heterogeneous`) add each party's ``party_weights``,
    ``party_biases`` and ``party_noise`` (party k: ``y = x @ party_weights[k] + party_biases[k] +
    party_noise[k] * N(0, 1)``; ``weights``/``bias`` are then the global model they are drawn
    around) and the ``heterogeneity`` summary.
    Fields that are ``None`` are left out of the JSON, so plain data keeps its old ``truth.json``.
    """

    weights: list[float]
    bias: float
    noise: float
    seed: int
    options: dict | None = None
    feature_scales: list[float] | None = None
    feature_offsets: list[float] | None = None
    latent_weights: list[float] | None = None
    condition_number: float | None = None
    party_weights: list[list[float]] | None = None
    party_biases: list[float] | None = None
    party_noise: list[float] | None = None
    heterogeneity: dict | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None}, indent=2)


MAX_CONDITION_NUMBER = 1e12  # beyond this a float64 sample cannot show the asked-for spectrum


def parse_range(value: str | tuple[float, float], name: str, positive: bool = False) -> tuple[float, float]:
    """``"LO:HI"`` (or one number, ``"V"`` = ``"V:V"``) or a pair -> ``(lo, hi)``, finite, ``lo <= hi``.

    ``positive`` also requires ``lo > 0``. Errors are one-line :class:`FedLinearError` naming ``name``.
    """
    what = f"a range LO:HI with {'0 < ' if positive else ''}LO <= HI, both finite"
    try:
        parts = value.split(":") if isinstance(value, str) else list(value)
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise ValueError
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise FedLinearError(f"{name}: {value!r} is not {what}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (positive and lo <= 0):
        raise FedLinearError(f"{name}: {value!r} is not {what}")
    return lo, hi


def _givens_to_1(aii: float, ajj: float, aij: float) -> tuple[float, float]:
    """(c, s) of the rotation that makes ``a_ii`` exactly 1 (Davies & Higham 2000, eq. 3.1)."""
    aiid, ajjd = aii - 1.0, ajj - 1.0
    if ajjd == 0.0:
        return 0.0, 1.0  # swap i and j
    dd = math.sqrt(max(aij * aij - aiid * ajjd, 0.0))
    t = (aij + math.copysign(dd, aij)) / ajjd  # the root without cancellation
    c = 1.0 / math.sqrt(1.0 + t * t)
    return (c, c * t) if c > 0 else (0.0, 1.0)


def correlation_matrix(num_features: int, condition_number: float, rng: np.random.Generator) -> np.ndarray:
    """A random correlation matrix whose eigenvalues are geometrically spaced, max / min = ``condition_number``.

    ``Q diag(lambda) Q^T`` with a Haar-random orthogonal ``Q`` from ``rng`` and ``sum(lambda) = d``,
    then Givens rotations (Bendel & Mickey 1978; Davies & Higham 2000) bring each diagonal entry to
    1 without changing the spectrum; a last rescaling makes the diagonal exactly 1.
    """
    d = num_features
    if d == 1:
        return np.ones((1, 1))
    eig = float(condition_number) ** (-np.arange(d) / (d - 1))
    eig *= d / eig.sum()
    q, r = np.linalg.qr(rng.normal(0.0, 1.0, size=(d, d)))
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    m = (q * eig) @ q.T
    m = (m + m.T) / 2
    for i in range(d - 1):
        if m[i, i] == 1.0:
            continue
        above = m[i, i] > 1.0
        j = next((j for j in range(i + 1, d) if (m[j, j] < 1.0 if above else m[j, j] > 1.0)), None)
        if j is None:  # the rest is 1 up to rounding (the trace is d)
            break
        c, s = _givens_to_1(m[i, i], m[j, j], m[i, j])
        ri, rj = m[i].copy(), m[j].copy()
        m[i], m[j] = c * ri - s * rj, s * ri + c * rj
        ci, cj = m[:, i].copy(), m[:, j].copy()
        m[:, i], m[:, j] = c * ci - s * cj, s * ci + c * cj
    root = 1.0 / np.sqrt(np.diag(m))
    m = (m * root[:, None]) * root[None, :]
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def correlation_condition_number(x: np.ndarray) -> float:
    """max / min eigenvalue of the sample correlation matrix of the columns of ``x``."""
    if x.shape[1] == 1:
        return 1.0
    eig = np.linalg.eigvalsh(np.corrcoef(x, rowvar=False))
    return float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf


def make_synthetic(
    num_clients: int,
    samples_per_client: int,
    num_features: int,
    noise: float,
    seed: int,
    test_samples: int,
    *,
    feature_scales: str | tuple[float, float] | None = None,
    feature_offsets: str | tuple[float, float] | None = None,
    condition_number: float | None = None,
    target_offset: float | None = None,
    heterogeneity=None,
) -> tuple[list[Dataset], Dataset, SyntheticTruth]:
    """Gaussian features, known true weights; one shard per client and a held-out test set.

    ``heterogeneity`` (a :class:`Heterogeneity` with any option on) makes the parties differ
    (sizes, feature distributions, true weights, noise): see :func:`make_heterogeneous`.

    With every option off (``None``, or its neutral value: scales ``1:1``, offsets ``0:0``,
    condition number 1, target offset 0): IID standard normal features, ``weights`` and ``bias``
    drawn from N(0, 1), exactly the data of earlier versions for the same seed.

    Hard data, on purpose (any option on): ``beta ~ N(0, I)``, ``z ~ N(0, C)`` with ``C`` a
    correlation matrix whose eigenvalues are geometrically spaced with max / min =
    ``condition_number`` (identity if not given), ``x = offset + scale * z`` with per-feature
    ``scale`` log-spaced over ``feature_scales`` (``"LO:HI"``, first feature LO, last HI) and
    ``offset`` evenly spaced over ``feature_offsets``, and ``y = target_offset + z @ beta +
    noise * N(0, 1)``. The raw-space truth is then ``weights = beta / scale`` and ``bias =
    target_offset - sum(offset * weights)``.
    """
    if num_clients < 1 or samples_per_client < 1 or num_features < 1 or test_samples < 1:
        raise FedLinearError("clients, samples per client, features and test samples must all be >= 1")
    if not noise >= 0 or not math.isfinite(noise):
        raise FedLinearError(f"noise must be a finite number >= 0, got {noise}")
    scales = parse_range(feature_scales, "feature-scales", positive=True) if feature_scales is not None else None
    offsets = parse_range(feature_offsets, "feature-offsets") if feature_offsets is not None else None
    if condition_number is not None:
        try:
            condition_number = float(condition_number)
        except (TypeError, ValueError):
            raise FedLinearError(f"condition-number: {condition_number!r} is not a number") from None
        if not 1.0 <= condition_number <= MAX_CONDITION_NUMBER:  # also NaN
            raise FedLinearError(
                f"condition-number must be between 1 and {MAX_CONDITION_NUMBER:g}, got {condition_number}"
            )
        if condition_number > 1.0 and num_features < 2:
            raise FedLinearError(f"condition-number {condition_number:g} needs at least 2 features, got 1")
    if target_offset is not None:
        try:
            target_offset = float(target_offset)
        except (TypeError, ValueError):
            raise FedLinearError(f"target-offset: {target_offset!r} is not a number") from None
        if not math.isfinite(target_offset):
            raise FedLinearError(f"target-offset must be a finite number, got {target_offset}")
    options = {
        "feature_scales": list(scales) if scales is not None and scales != (1.0, 1.0) else None,
        "feature_offsets": list(offsets) if offsets is not None and offsets != (0.0, 0.0) else None,
        "condition_number": condition_number if condition_number not in (None, 1.0) else None,
        "target_offset": target_offset if target_offset not in (None, 0.0) else None,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if heterogeneity is not None and heterogeneity.active:
        return make_heterogeneous(
            num_clients, samples_per_client, num_features, noise, seed, test_samples, heterogeneity, options
        )
    if options:
        return _make_hard(num_clients, samples_per_client, num_features, noise, seed, test_samples, options)

    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 1.0, size=num_features)
    bias = float(rng.normal(0.0, 1.0))

    def draw(n: int) -> Dataset:
        x = rng.normal(0.0, 1.0, size=(n, num_features))
        y = x @ weights + bias + noise * rng.normal(0.0, 1.0, size=n)
        return Dataset(x=x, y=y)

    shards = [draw(samples_per_client) for _ in range(num_clients)]
    test = draw(test_samples)
    truth = SyntheticTruth(weights=[float(w) for w in weights], bias=bias, noise=noise, seed=seed)
    return shards, test, truth


def _make_hard(
    num_clients: int, samples_per_client: int, d: int, noise: float, seed: int, test_samples: int, options: dict
) -> tuple[list[Dataset], Dataset, SyntheticTruth]:
    """The hard-data generator of :func:`make_synthetic` (``options`` validated, only those on)."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 1.0, size=d)
    scale = np.geomspace(*options["feature_scales"], num=d) if "feature_scales" in options else np.ones(d)
    offset = np.linspace(*options["feature_offsets"], num=d) if "feature_offsets" in options else np.zeros(d)
    target_offset = options.get("target_offset", 0.0)
    factor = None
    if "condition_number" in options:
        eig, vec = np.linalg.eigh(correlation_matrix(d, options["condition_number"], rng))
        factor = vec * np.sqrt(np.clip(eig, 0.0, None))  # factor @ factor.T = C

    def draw(n: int) -> Dataset:
        z = rng.normal(0.0, 1.0, size=(n, d))
        if factor is not None:
            z = z @ factor.T
        x = offset + scale * z
        y = target_offset + z @ beta + noise * rng.normal(0.0, 1.0, size=n)
        return Dataset(x=x, y=y)

    shards = [draw(samples_per_client) for _ in range(num_clients)]
    test = draw(test_samples)
    weights = beta / scale
    truth = SyntheticTruth(
        weights=[float(w) for w in weights],
        bias=float(target_offset - np.sum(offset * weights)),
        noise=noise,
        seed=seed,
        options=options,
        feature_scales=[float(v) for v in scale],
        feature_offsets=[float(v) for v in offset],
        latent_weights=[float(v) for v in beta],
        condition_number=correlation_condition_number(np.concatenate([s.x for s in shards])),
    )
    return shards, test, truth


# --------------------------------------------------------------------------------------------
# Heterogeneous parties
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Heterogeneity:
    """Validated options of the synthetic generator (``None``: off). See the module docstring."""

    quantity_alpha: float | None = None
    min_samples: int = DEFAULT_MIN_SAMPLES
    covariate_shift: float | None = None
    covariate_log_scale: float | None = None
    concept_spread: float | None = None
    noise_skew: float | None = None
    quantity_seed: int | None = None
    covariate_seed: int | None = None
    concept_seed: int | None = None
    noise_seed: int | None = None

    @classmethod
    def parse(
        cls,
        quantity_alpha=None,
        min_samples=None,
        covariate_shift=None,
        concept_spread=None,
        noise_skew=None,
        quantity_seed=None,
        covariate_seed=None,
        concept_seed=None,
        noise_seed=None,
    ) -> Heterogeneity:
        """From command-line values (strings or numbers); errors are one line naming the option.

        Neutral values (a shift, spread or skew of 0) are off, so they give IID data.
        """
        alpha = None if quantity_alpha is None else option_number(quantity_alpha, "--quantity-alpha", positive=True)
        minimum = DEFAULT_MIN_SAMPLES if min_samples is None else option_integer(min_samples, "--min-samples", 1)
        shift = log_scale = None
        if covariate_shift is not None:
            parts = str(covariate_shift).split(":")
            if len(parts) > 2:
                raise FedLinearError(f"--covariate-shift: {covariate_shift!r} is not S or S:T")
            shift = option_number(parts[0], "--covariate-shift", nonnegative=True)
            log_scale = option_number(parts[1], "--covariate-shift (T)", nonnegative=True) if len(parts) == 2 else shift / 2
            if shift == 0 and log_scale == 0:
                shift = log_scale = None
        spread = None if concept_spread is None else option_number(concept_spread, "--concept-spread", nonnegative=True)
        skew = None if noise_skew is None else option_number(noise_skew, "--noise-skew", nonnegative=True)
        return cls(
            quantity_alpha=alpha,
            min_samples=minimum,
            covariate_shift=shift,
            covariate_log_scale=log_scale,
            concept_spread=spread or None,
            noise_skew=skew or None,
            quantity_seed=option_seed(quantity_seed, "--quantity-seed"),
            covariate_seed=option_seed(covariate_seed, "--covariate-seed"),
            concept_seed=option_seed(concept_seed, "--concept-seed"),
            noise_seed=option_seed(noise_seed, "--noise-skew-seed"),
        )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.quantity_alpha, self.covariate_shift, self.concept_spread, self.noise_skew))

    def check(self, num_clients: int, samples_per_client: int, noise: float) -> None:
        """What can be refused before any data is made (the generator calls it too)."""
        if self.quantity_alpha is not None:
            check_room(num_clients * samples_per_client, num_clients, self.min_samples)
        if self.noise_skew is not None and noise == 0:
            raise FedLinearError("--noise-skew scales the label noise: it needs --noise > 0")


def make_heterogeneous(
    num_clients: int,
    samples_per_client: int,
    d: int,
    noise: float,
    seed: int,
    test_samples: int,
    het: Heterogeneity,
    options: dict,
):
    """Synthetic shards with heterogeneous parties: ``(shards, test, SyntheticTruth)``.

    ``options`` are the validated hard-data options of :func:`make_synthetic` (maybe
    empty). The base model is drawn from ``default_rng(seed)`` in the same order as there: without
    hard options ``w ~ N(0, I)``, ``b ~ N(0, 1)``, then each shard's ``x`` and noise; so concept
    shift or noise skew alone keep every feature of the IID data as it was.
    """
    het.check(num_clients, samples_per_client, noise)
    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 1.0, size=d)
    if options:
        scale = np.geomspace(*options["feature_scales"], num=d) if "feature_scales" in options else np.ones(d)
        offset = np.linspace(*options["feature_offsets"], num=d) if "feature_offsets" in options else np.zeros(d)
        intercept = float(options.get("target_offset", 0.0))
    else:
        scale, offset = np.ones(d), np.zeros(d)
        intercept = float(rng.normal(0.0, 1.0))
    factor = None
    if "condition_number" in options:
        eig, vec = np.linalg.eigh(correlation_matrix(d, options["condition_number"], rng))
        factor = vec * np.sqrt(np.clip(eig, 0.0, None))

    k = num_clients
    total = k * samples_per_client
    summary: dict = {"seed": seed}
    if het.quantity_alpha is not None:
        qseed = het.quantity_seed if het.quantity_seed is not None else seed
        sizes = dirichlet_sizes(total, k, het.quantity_alpha, het.min_samples, stream(qseed, "quantity"))
    else:
        sizes = np.full(k, samples_per_client, dtype=np.int64)
    mu, sigma = np.zeros((k, d)), np.ones((k, d))
    if het.covariate_shift is not None:
        cseed = het.covariate_seed if het.covariate_seed is not None else seed
        crng = stream(cseed, "covariate")
        mu = crng.normal(0.0, het.covariate_shift, size=(k, d))
        sigma = np.exp(crng.normal(0.0, het.covariate_log_scale, size=(k, d)))
    betas = np.tile(beta, (k, 1))
    if het.concept_spread is not None:
        wseed = het.concept_seed if het.concept_seed is not None else seed
        betas = beta + stream(wseed, "concept").normal(0.0, het.concept_spread, size=(k, d)) * scale
        # in latent space the raw-space perturbation w_k - w = N(0, s^2) is (beta_k - beta) / scale
    noises = np.full(k, float(noise))
    if het.noise_skew is not None:
        nseed = het.noise_seed if het.noise_seed is not None else seed
        noises = noise * np.exp(stream(nseed, "noise").normal(0.0, het.noise_skew, size=k))

    def latent(n: int) -> np.ndarray:
        z = rng.normal(0.0, 1.0, size=(n, d))
        return z @ factor.T if factor is not None else z

    shards = []
    for i in range(k):
        z = mu[i] + sigma[i] * latent(int(sizes[i]))
        x = offset + scale * z if options else z
        y = intercept + z @ betas[i] + noises[i] * rng.normal(0.0, 1.0, size=int(sizes[i]))
        shards.append(Dataset(x=x, y=y))
    party = rng.choice(k, size=test_samples, p=sizes / sizes.sum())
    z = mu[party] + sigma[party] * latent(test_samples)
    x = offset + scale * z if options else z
    y = intercept + np.einsum("ij,ij->i", z, betas[party]) + noises[party] * rng.normal(0.0, 1.0, size=test_samples)
    test = Dataset(x=x, y=y)

    weights = beta / scale
    party_weights = betas / scale
    bias = intercept - float(np.sum(offset * weights))
    party_biases = intercept - (party_weights * offset).sum(axis=1)

    summary["sizes"] = [int(s) for s in sizes]
    summary["sizes_cv"] = coefficient_of_variation(sizes)
    if het.quantity_alpha is not None:
        summary["quantity"] = {"alpha": het.quantity_alpha, "min_samples": het.min_samples, "seed": qseed}
    if het.covariate_shift is not None:
        means = np.array([s.x.mean(axis=0) for s in shards])
        stds = np.array([s.x.std(axis=0) for s in shards])
        summary["covariate"] = {
            "shift": het.covariate_shift,
            "log_scale": het.covariate_log_scale,
            "seed": cseed,
            "party_shift": mu.tolist(),  # latent means mu_k (x = offset + scale * (mu_k + sigma_k * z))
            "party_scale": sigma.tolist(),
            "feature_means": means.tolist(),  # realised, per party and feature
            "feature_stds": stds.tolist(),
            # realised spread: std over parties of the party means, per feature, then averaged
            "spread_of_means": float((means.std(axis=0) / scale).mean()),
        }
    if het.concept_spread is not None:
        deviation = party_weights - weights
        summary["concept"] = {
            "spread": het.concept_spread,
            "seed": wseed,
            "realised_spread": float(np.sqrt(np.mean(deviation**2))),  # around the known global w
        }
    if het.noise_skew is not None or het.concept_spread is not None or het.covariate_shift is not None:
        realised = [
            float(np.std(s.y - s.x @ party_weights[i] - party_biases[i])) for i, s in enumerate(shards)
        ]
        summary["noise"] = {
            "base": float(noise),
            "skew": het.noise_skew or 0.0,
            "levels": noises.tolist(),
            "realised": realised,  # std of y - x @ w_k - b_k on each shard
            "max_over_min": float(noises.max() / noises.min()) if noises.min() > 0 else None,
        }
        if het.noise_skew is not None:
            summary["noise"]["seed"] = nseed
    truth = SyntheticTruth(
        weights=[float(w) for w in weights],
        bias=bias,
        noise=noise,
        seed=seed,
        options=options or None,
        feature_scales=[float(v) for v in scale] if options else None,
        feature_offsets=[float(v) for v in offset] if options else None,
        latent_weights=[float(v) for v in beta] if options else None,
        condition_number=correlation_condition_number(np.concatenate([s.x for s in shards])) if options else None,
        party_weights=party_weights.tolist(),
        party_biases=[float(v) for v in party_biases],
        party_noise=noises.tolist(),
        heterogeneity=summary,
    )
    return shards, test, truth
