"""Heterogeneous parties: non-IID synthetic data and non-IID splits of real tables.

Four kinds of heterogeneity for synthetic data (any combination, on top of the hard-data options of
:func:`common.data.make_synthetic`), each drawn from its own random stream so that changing one
leaves the others as they were; each stream's seed defaults to the data seed:

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

For real tables (:func:`split_quantity`, :func:`split_by_column`): Dirichlet shard sizes over the
shuffled rows, or one shard per distinct value (or equal-width bin) of a column.

Every generator returns a summary of how heterogeneous the result is (JSON-able, snake_case keys);
:mod:`scripts.cli` records it in ``truth.json`` (synthetic) or ``split.json`` (split), and
``fedlinear run`` copies it into the run's ``manifest.json``. With every option off nothing here
runs: IID data stays byte-for-byte what :func:`common.data.make_synthetic` / ``split_iid`` give.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError

DEFAULT_MIN_SAMPLES = 10  # quantity skew: the smallest shard
MAX_SHARDS_BY_COLUMN = 1000  # more distinct values than this: use --bins
# Each kind of heterogeneity draws from np.random.default_rng([seed, TAG]), a stream independent of
# np.random.default_rng(seed) (the data) and of each other even when the seeds are equal.
STREAMS = {"quantity": 1, "covariate": 2, "concept": 3, "noise": 4}


def stream(seed: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), STREAMS[kind]])


def _number(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite float from a CLI string or number, else a one-line error naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FedLinearError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number) or (positive and number <= 0) or (nonnegative and number < 0):
        bound = " > 0" if positive else " >= 0" if nonnegative else ""
        raise FedLinearError(f"{name} must be a finite number{bound}, got {value}")
    return number


def _integer(value, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise FedLinearError(f"{name}: {value!r} is not an integer") from None
    if number < minimum:
        raise FedLinearError(f"{name} must be >= {minimum}, got {value}")
    return number


def _seed(value, name: str) -> int | None:
    return None if value is None else _integer(value, name, 0)


def coefficient_of_variation(sizes) -> float:
    """Population std / mean of the shard sizes (0 for equal shards)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return float(sizes.std() / sizes.mean()) if sizes.size and sizes.mean() > 0 else 0.0


def check_room(total: int, num_parties: int, min_samples: int, what: str = "samples") -> None:
    """Refuse more shards than the rows can fill with ``min_samples`` each (one line)."""
    if num_parties * min_samples > total:
        raise FedLinearError(
            f"{num_parties} shards x --min-samples {min_samples} = {num_parties * min_samples} {what}, "
            f"but there are only {total}: use fewer clients, a smaller --min-samples or more data"
        )


def dirichlet_sizes(total: int, num_parties: int, alpha: float, min_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Shard sizes: ``min_samples`` each plus a Dirichlet(alpha) share of the rest, summing to ``total``.

    The share ``p * free`` (``free = total - K * min_samples``) is floored and the rows left over go,
    one each, to the largest fractional parts (ties: lower index), so ``|size - min - p * free| < 1``.
    """
    check_room(total, num_parties, min_samples)
    free = total - num_parties * min_samples
    p = rng.dirichlet(np.full(num_parties, float(alpha)))
    raw = p * free
    base = np.floor(raw).astype(np.int64)
    left = int(free - base.sum())
    if left > 0:
        order = np.argsort(-(raw - base), kind="stable")
        base[order[:left]] += 1
    return base + min_samples


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
        alpha = None if quantity_alpha is None else _number(quantity_alpha, "--quantity-alpha", positive=True)
        minimum = DEFAULT_MIN_SAMPLES if min_samples is None else _integer(min_samples, "--min-samples", 1)
        shift = log_scale = None
        if covariate_shift is not None:
            parts = str(covariate_shift).split(":")
            if len(parts) > 2:
                raise FedLinearError(f"--covariate-shift: {covariate_shift!r} is not S or S:T")
            shift = _number(parts[0], "--covariate-shift", nonnegative=True)
            log_scale = _number(parts[1], "--covariate-shift (T)", nonnegative=True) if len(parts) == 2 else shift / 2
            if shift == 0 and log_scale == 0:
                shift = log_scale = None
        spread = None if concept_spread is None else _number(concept_spread, "--concept-spread", nonnegative=True)
        skew = None if noise_skew is None else _number(noise_skew, "--noise-skew", nonnegative=True)
        return cls(
            quantity_alpha=alpha,
            min_samples=minimum,
            covariate_shift=shift,
            covariate_log_scale=log_scale,
            concept_spread=spread or None,
            noise_skew=skew or None,
            quantity_seed=_seed(quantity_seed, "--quantity-seed"),
            covariate_seed=_seed(covariate_seed, "--covariate-seed"),
            concept_seed=_seed(concept_seed, "--concept-seed"),
            noise_seed=_seed(noise_seed, "--noise-skew-seed"),
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

    ``options`` are the validated hard-data options of :func:`common.data.make_synthetic` (maybe
    empty). The base model is drawn from ``default_rng(seed)`` in the same order as there: without
    hard options ``w ~ N(0, I)``, ``b ~ N(0, 1)``, then each shard's ``x`` and noise; so concept
    shift or noise skew alone keep every feature of the IID data as it was.
    """
    from fedlinear.common.data import SyntheticTruth, correlation_condition_number, correlation_matrix
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


# --------------------------------------------------------------------------------------------
# Real tables
# --------------------------------------------------------------------------------------------


def split_iid(data: Dataset, num_clients: int, seed: int, test_fraction: float) -> tuple[list[Dataset], Dataset]:
    """Shuffle with ``seed``, hold out ``test_fraction`` as the test set, deal the rest into shards."""
    n = data.num_examples
    if num_clients < 1:
        raise FedLinearError(f"the number of clients must be >= 1, got {num_clients}")
    if not 0 < test_fraction < 1:
        raise FedLinearError(f"test fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < num_clients:
        raise FedLinearError(
            f"{n} samples cannot give {num_clients} clients at least one sample each after holding out {n_test}"
        )
    order = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    shards = [Dataset(x=data.x[idx], y=data.y[idx]) for idx in np.array_split(train_idx, num_clients)]
    return shards, Dataset(x=data.x[test_idx], y=data.y[test_idx])


def _holdout(n: int, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The IID split's shuffle and hold-out (same rows as ``split_iid``): (test rows, train rows)."""
    if not 0 < test_fraction < 1:
        raise FedLinearError(f"test fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, int(round(n * test_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_test], order[n_test:]


def split_quantity(data, num_clients: int, seed: int, test_fraction: float, alpha: float,
                   min_samples: int | None = None, quantity_seed: int | None = None):  # fmt: skip
    """Quantity skew on a real table: ``(shards, test, summary)``.

    Shuffle and hold out exactly as the IID split does (``seed``); deal the shuffled training rows
    into consecutive shards whose sizes are :func:`dirichlet_sizes` (``quantity_seed``, default ``seed``).
    """
    if num_clients < 1:
        raise FedLinearError(f"the number of clients must be >= 1, got {num_clients}")
    alpha = _number(alpha, "--quantity-alpha", positive=True)
    minimum = DEFAULT_MIN_SAMPLES if min_samples is None else int(min_samples)
    test_idx, train_idx = _holdout(data.num_examples, seed, test_fraction)
    check_room(len(train_idx), num_clients, minimum, what="training rows")
    qseed = seed if quantity_seed is None else quantity_seed
    sizes = dirichlet_sizes(len(train_idx), num_clients, alpha, minimum, stream(qseed, "quantity"))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    shards = [Dataset(x=data.x[train_idx[a:b]], y=data.y[train_idx[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]
    summary = {
        "method": "quantity",
        "seed": seed,
        "test_fraction": test_fraction,
        "test_rows": int(len(test_idx)),
        "alpha": alpha,
        "min_samples": minimum,
        "quantity_seed": qseed,
        "sizes": [int(s) for s in sizes],
        "sizes_cv": coefficient_of_variation(sizes),
    }
    return shards, Dataset(x=data.x[test_idx], y=data.y[test_idx]), summary


def _value_name(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def split_by_column(data, column: int, width: int, target: int, seed: int, test_fraction: float, *,
                    bins: int | None = None, drop: bool = False, min_samples: int = 1, names=None):  # fmt: skip
    """One shard per distinct value (or equal-width bin) of CSV column ``column``: ``(shards, test, summary)``.

    ``data`` is the table loaded with target column ``target`` (``width`` CSV columns in all);
    ``column`` counts CSV columns like ``target-column`` (negative from the end). Shards are ordered
    by value (ascending); rows keep their file order inside a shard. The test set holds out
    ``round(n_v * test_fraction)`` rows of each value's ``n_v`` (at most ``n_v - 1``, chosen with
    ``seed``), in file order, so every value keeps a shard. ``drop`` removes the column from the
    features of shards and test set (it cannot be the target).
    """
    if not -width <= column < width:
        raise FedLinearError(f"--by-column {column} is out of range: the table has {width} columns (0..{width - 1})")
    col = column % width
    if not 0 < test_fraction < 1:
        raise FedLinearError(f"test fraction must be in (0, 1), got {test_fraction}")
    if bins is not None and bins < 1:
        raise FedLinearError(f"--bins must be >= 1, got {bins}")
    if col == target:
        if drop:
            raise FedLinearError(f"--drop-by-column: column {column} is the target; it cannot be dropped")
        values = data.y
        feature = None
    else:
        feature = col if col < target else col - 1
        values = data.x[:, feature]
        if drop and data.num_features == 1:
            raise FedLinearError(f"--drop-by-column: column {column} is the only feature; nothing would be left")
    if bins is not None:
        lo, hi = float(values.min()), float(values.max())
        edges = np.linspace(lo, hi, bins + 1)
        keys = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
        present = np.unique(keys)
        labels = {int(b): f"[{edges[b]:.6g}, {edges[b + 1]:.6g}{']' if b == bins - 1 else ')'}" for b in present}
    else:
        present, keys = np.unique(values, return_inverse=True)
        if len(present) > MAX_SHARDS_BY_COLUMN:
            raise FedLinearError(
                f"--by-column {column} has {len(present)} distinct values, more than {MAX_SHARDS_BY_COLUMN} "
                f"shards: group them with --bins B"
            )
        labels = {i: _value_name(v) for i, v in enumerate(present)}
        present = np.arange(len(present))
    x = np.delete(data.x, feature, axis=1) if drop else data.x
    rng = np.random.default_rng(seed)
    groups, test_rows = [], []
    for key in present:
        rows = np.flatnonzero(keys == key)  # file order
        n_test = min(int(round(len(rows) * test_fraction)), len(rows) - 1)
        held = np.sort(rng.choice(rows, size=n_test, replace=False)) if n_test else rows[:0]
        keep = np.setdiff1d(rows, held, assume_unique=True)
        if len(keep) < min_samples:
            raise FedLinearError(
                f"--by-column {column}: value {labels[int(key)]} leaves {len(keep)} training rows, fewer than "
                f"--min-samples {min_samples}" + ("" if bins else ": group values with --bins B")
            )
        groups.append((labels[int(key)], keep))
        test_rows.append(held)
    test_idx = np.sort(np.concatenate(test_rows))
    if len(test_idx) == 0:
        raise FedLinearError(
            f"--by-column {column}: every value has a single row, so no row is left for the test set: "
            "group values with --bins B"
        )
    shards = [Dataset(x=x[rows], y=data.y[rows]) for _, rows in groups]
    sizes = [len(rows) for _, rows in groups]
    summary = {
        "method": "by-column",
        "seed": seed,
        "test_fraction": test_fraction,
        "test_rows": int(len(test_idx)),
        "column": col,
        "column_name": names[col] if names else None,
        "bins": bins,
        "dropped_column": bool(drop),
        "values": [label for label, _ in groups],
        "sizes": sizes,
        "sizes_cv": coefficient_of_variation(sizes),
        "value_sizes": {label: len(rows) for label, rows in groups},
    }
    return shards, Dataset(x=x[test_idx], y=data.y[test_idx]), summary
