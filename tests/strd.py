"""NIST StRD linear least-squares reference data sets (tests/data/strd/*.txt) and an exact check of them.

Each file: ``#`` comment lines (source), then ``key: value`` lines (``model``: ``polynomial k`` or
``columns k``; ``intercept``: true/false; ``certified-coefficients`` in NIST's order, B0 first when the
model has an intercept; ``certified-residual-sum-of-squares``), then ``data: y x...`` and the rows.

:func:`exact_fit` solves the normal equations in rational arithmetic from the decimal text, so the
transcribed data can be checked against every certified digit without trusting floating point.
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction

import numpy as np

DATA = os.path.join(os.path.dirname(__file__), "data", "strd")
NAMES = ("Norris", "Pontius", "NoInt1", "NoInt2", "Filip", "Longley",
         "Wampler1", "Wampler2", "Wampler3", "Wampler4", "Wampler5")  # fmt: skip


@dataclasses.dataclass
class StrdSet:
    name: str
    intercept: bool
    rows: list[list[str]]  # the decimal text: [y, x...] per row
    degree: int | None  # a polynomial in the one x column, or None: the columns as they are
    certified: np.ndarray  # NIST's order: B0 (intercept) first when there is one
    certified_rss: float

    @property
    def n(self) -> int:
        return len(self.rows)

    def design(self, values: list) -> list:
        """The feature row (no intercept column) of one data row's x values."""
        if self.degree is None:
            return list(values)
        return [values[0] ** k for k in range(1, self.degree + 1)]

    @property
    def x(self) -> np.ndarray:
        return np.array([self.design([float(v) for v in row[1:]]) for row in self.rows])

    @property
    def y(self) -> np.ndarray:
        return np.array([float(row[0]) for row in self.rows])

    @property
    def kernel(self) -> np.ndarray:
        return self.certified[1:] if self.intercept else self.certified

    @property
    def bias(self) -> float:
        return float(self.certified[0]) if self.intercept else 0.0


def load(name: str) -> StrdSet:
    with open(os.path.join(DATA, f"{name}.txt")) as handle:
        lines = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    meta, rows = {}, []
    for i, line in enumerate(lines):
        key, _, value = line.partition(":")
        meta[key] = value.strip()
        if key == "data":
            rows = [line.split() for line in lines[i + 1 :]]
            break
    kind, count = meta["model"].split()
    return StrdSet(
        name=name,
        intercept=meta["intercept"] == "true",
        rows=rows,
        degree=int(count) if kind == "polynomial" else None,
        certified=np.array([float(v) for v in meta["certified-coefficients"].split()]),
        certified_rss=float(meta["certified-residual-sum-of-squares"]),
    )


def exact_fit(data: StrdSet) -> tuple[list[Fraction], Fraction]:
    """The least-squares coefficients (NIST's order) and residual sum of squares, in exact rationals."""
    design, target = [], []
    for row in data.rows:
        values = [Fraction(v) for v in row[1:]]
        design.append(([Fraction(1)] if data.intercept else []) + data.design(values))
        target.append(Fraction(row[0]))
    p = len(design[0])
    gram = [[sum(r[i] * r[j] for r in design) for j in range(p)] for i in range(p)]
    rhs = [sum(r[i] * t for r, t in zip(design, target)) for i in range(p)]
    # Gauss-Jordan elimination, exact
    aug = [gram[i] + [rhs[i]] for i in range(p)]
    for col in range(p):
        pivot = next(r for r in range(col, p) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        for r in range(p):
            if r != col and aug[r][col] != 0:
                factor = aug[r][col] / aug[col][col]
                aug[r] = [a - factor * b for a, b in zip(aug[r], aug[col])]
    theta = [aug[i][p] / aug[i][i] for i in range(p)]
    rss = sum((t - sum(a * b for a, b in zip(r, theta))) ** 2 for r, t in zip(design, target))
    return theta, rss
