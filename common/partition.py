"""Splitting real tables into shards, and the partition arithmetic the synthetic generator shares.

For real tables: IID (:func:`split_iid`: shuffle, hold out the test set, deal the rest), Dirichlet
shard sizes over the shuffled rows (:func:`split_quantity`), or one shard per distinct value (or
equal-width bin) of a column (:func:`split_by_column`). The shard-size arithmetic
(:func:`dirichlet_sizes`, :func:`check_room`, :func:`coefficient_of_variation`), the independent
random streams (:func:`stream`) and the option validators are shared with the heterogeneous
parties of :mod:`common.synth`.

Every non-IID split returns a summary of how heterogeneous the result is (JSON-able, snake_case
keys); :mod:`scripts.cli` records it in ``split.json``, and ``fedlinear run`` copies it into the
run's ``manifest.json``. With every option off only :func:`split_iid` runs: IID splits stay
byte-for-byte what they were.
"""

from __future__ import annotations

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


def option_number(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite float from a CLI string or number, else a one-line error naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FedLinearError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number) or (positive and number <= 0) or (nonnegative and number < 0):
        bound = " > 0" if positive else " >= 0" if nonnegative else ""
        raise FedLinearError(f"{name} must be a finite number{bound}, got {value}")
    return number


def option_integer(value, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise FedLinearError(f"{name}: {value!r} is not an integer") from None
    if number < minimum:
        raise FedLinearError(f"{name} must be >= {minimum}, got {value}")
    return number


def option_seed(value, name: str) -> int | None:
    return None if value is None else option_integer(value, name, 0)


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
    alpha = option_number(alpha, "--quantity-alpha", positive=True)
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
