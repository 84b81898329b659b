"""The in-memory table every layer passes around: features, targets and where they came from."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


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
