"""CSV shards: loading with validation, synthetic data with known weights, IID partitioning.

The format is comma-separated numbers, one sample a line, the target in the last column unless
``target_column`` says otherwise, an optional header line (detected when its fields are not all
numbers), blank lines (such as a trailing newline) ignored. The seed format ``x,y`` is the d=1 case.

Validation happens here, once, at the boundary: every problem raises :class:`FedLinearError` with
the file (URI) and, where there is one, the 1-based line number.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import math
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from common import storage
from common.errors import FedLinearError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Features ``x`` (n, d) and targets ``y`` (n,), float64, plus where they came from."""

    x: np.ndarray
    y: np.ndarray
    sources: tuple[str, ...] = ()
    columns: tuple[str, ...] | None = None

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @functools.cached_property
    def float32(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` as float32, what the training engines compute in; made once per Dataset."""
        return self.x.astype(np.float32), self.y.astype(np.float32)

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _decoded(lines: Iterable[bytes]) -> Iterator[str]:
    for raw in lines:
        yield raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw


def _scan(uri: str, lines: Iterable[str], header: str) -> tuple[list[str] | None, int]:
    """Validate line by line; return (header fields or None, number of data rows).

    This is the slow path that finds the exact line of a problem; the fast path is numpy's parser.
    """
    columns: list[str] | None = None
    width = None
    rows = 0
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        fields = [f.strip() for f in text.split(",")]
        first = width is None and columns is None
        if first and (header == "yes" or (header == "auto" and not all(map(_is_number, fields)))):
            columns = fields
            width = len(fields)
            continue
        if width is None:
            width = len(fields)
        if len(fields) != width:
            raise FedLinearError(
                f"{uri}: line {lineno}: expected {width} comma-separated columns, found {len(fields)}"
            )
        for col, field in enumerate(fields, start=1):
            try:
                value = float(field)
            except ValueError:
                raise FedLinearError(
                    f"{uri}: line {lineno}: column {col}: '{field[:40]}' is not a number"
                ) from None
            if not math.isfinite(value):
                raise FedLinearError(f"{uri}: line {lineno}: column {col}: value '{field}' is not finite")
        rows += 1
    return columns, rows


def _first_nonblank(lines: Iterator[str]) -> tuple[str | None, list[str]]:
    consumed = []
    for line in lines:
        consumed.append(line)
        if line.strip():
            return line, consumed
    return None, consumed


def _parse_one(uri: str, header: str) -> tuple[np.ndarray, list[str] | None]:
    """Parse one CSV file/object into a float64 matrix (rows, columns)."""
    with storage.open_binary(uri) as stream:
        lines = _decoded(stream)
        first, consumed = _first_nonblank(lines)
        if first is None:
            raise FedLinearError(f"{uri}: empty file, expected comma-separated numbers one sample a line")
        fields = [f.strip() for f in first.strip().split(",")]
        has_header = header == "yes" or (header == "auto" and not all(map(_is_number, fields)))
        columns = fields if has_header else None
        body = lines if has_header else itertools.chain(consumed, lines)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
                matrix = np.loadtxt(body, delimiter=",", dtype=np.float64, ndmin=2, comments=None)
            ok = matrix.size > 0 and bool(np.isfinite(matrix).all())
        except ValueError:
            ok = False
    if ok and (columns is None or matrix.shape[1] == len(columns)):
        return matrix, columns
    # Something is off: re-read line by line to name the line (raises), or report no data rows.
    with storage.open_binary(uri) as stream:
        columns, rows = _scan(uri, _decoded(stream), header)
    if rows == 0:
        raise FedLinearError(f"{uri}: no data rows (only a header line)")
    raise FedLinearError(f"{uri}: could not parse as comma-separated numbers")  # pragma: no cover


def load_matrix(uri: str, header: str = "auto") -> tuple[np.ndarray, list[str] | None, list[str]]:
    """Parse and validate every number in a CSV file/object or prefix: (matrix, header, source URIs)."""
    parts = []
    columns = None
    uris = storage.expand(uri)
    for part_uri in uris:
        matrix, cols = _parse_one(part_uri, header)
        if parts and matrix.shape[1] != parts[0].shape[1]:
            raise FedLinearError(
                f"{part_uri}: has {matrix.shape[1]} columns but {uris[0]} has {parts[0].shape[1]}"
            )
        parts.append(matrix)
        columns = columns or cols
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return matrix, columns, uris


def load_csv(uri: str, target_column: int = -1, header: str = "auto") -> Dataset:
    """Load and validate one CSV shard (a path, an ``s3://`` object, or a prefix/directory of them).

    Parameters
    ----------
    uri : str
        Local path, ``s3://bucket/key``, or a directory / prefix ending in ``/`` whose files are
        concatenated in name order (all must have the same number of columns).
    target_column : int (default: -1)
        Index of the target column; negative counts from the end.
    header : str (default: "auto")
        ``auto`` treats a first line with a non-numeric field as a header; ``yes``/``no`` force it.
    """
    matrix, columns, uris = load_matrix(uri, header)
    width = matrix.shape[1]
    if width < 2:
        raise FedLinearError(f"{uri}: found {width} column, need at least 2 (features..., target)")
    if not -width <= target_column < width:
        raise FedLinearError(
            f"config key 'target-column' is {target_column} but {uri} has only {width} columns"
        )
    target = target_column % width
    x = np.delete(matrix, target, axis=1)
    y = matrix[:, target]
    names = None
    if columns is not None:
        names = tuple(c for i, c in enumerate(columns) if i != target) + (columns[target],)
    return Dataset(x=np.ascontiguousarray(x), y=np.ascontiguousarray(y), sources=tuple(uris), columns=names)


def to_csv_bytes(x: np.ndarray, y: np.ndarray | None = None) -> bytes:
    """Serialise features (and target, last) as header-less CSV with round-trip float precision."""
    matrix = x if y is None else np.column_stack([x, y])
    buf = io.StringIO()
    np.savetxt(buf, matrix, delimiter=",", fmt="%.17g")
    return buf.getvalue().encode("ascii")


# --------------------------------------------------------------------------------------------
# Synthetic data and partitioning
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticTruth:
    """The generating model: ``y = x @ weights + bias + noise * N(0, 1)``."""

    weights: list[float]
    bias: float
    noise: float
    seed: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def make_synthetic(
    num_clients: int, samples_per_client: int, num_features: int, noise: float, seed: int, test_samples: int
) -> tuple[list[Dataset], Dataset, SyntheticTruth]:
    """IID Gaussian features, known true weights; one shard per client and a held-out test set."""
    if num_clients < 1 or samples_per_client < 1 or num_features < 1 or test_samples < 1:
        raise FedLinearError("clients, samples per client, features and test samples must all be >= 1")
    if noise < 0:
        raise FedLinearError(f"noise must be >= 0, got {noise}")
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


def split_iid(data: Dataset, num_clients: int, seed: int, test_fraction: float) -> tuple[list[Dataset], Dataset]:
    """Shuffle with ``seed``, hold out ``test_fraction`` as the test set, deal the rest into shards."""
    n = data.num_examples
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
