"""``init-from``: a run that starts from an earlier model (continued, online learning).

The parent is resolved by :func:`common.modelrepo.origin` (a run directory, ``RUN_DIR/model``, a
base path's newest version or ``BASE/N``). Its raw-space weights come from what it recorded (the
manifest's float64 ``weights``, or a published version's ``fedlinear-version.json``), else from the
SavedModel's own variables. This run learns its own standardization from its own data; the old model
is carried into those variables exactly (:meth:`common.scaling.Transform.from_raw`), so round 0 is
the parent's function in raw space. The lineage (parent's URI, version, run id, SHA-256 of each
model file and of the whole model, the parent's own ancestors) goes into ``history.json`` and the
manifest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedlinear.common import model as lm
from fedlinear.common import modelrepo, scaling, storage
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError


@dataclasses.dataclass(frozen=True)
class Continued:
    weights: lm.LinearWeights  # in this run's standardized variables
    raw_kernel: list[float]
    raw_bias: float
    lineage: dict[str, Any]
    note: str


def _recorded(info: dict[str, Any]) -> tuple[np.ndarray, float] | None:
    weights = info.get("weights") or info.get("exported-weights")
    try:
        bias = weights.get("bias")  # absent or None: a model without an intercept
        return np.asarray(weights["kernel"], np.float64).ravel(), 0.0 if bias is None else float(bias)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def start(cfg: RunConfig, num_features: int, transform: scaling.Transform) -> Continued:
    """The start weights of a run with ``init-from`` set."""
    from fedlinear.common.export import read_linear

    origin = modelrepo.origin(cfg.init_from)
    with storage.local_copy_of_dir(origin.uri) as path:
        files = modelrepo.model_digest(path)
        recorded = _recorded(origin.info)
        if recorded is None:
            kernel, bias, _, _ = read_linear(path)  # a model without an intercept: bias 0.0
        else:
            kernel, bias = recorded
    if kernel.shape[0] != num_features:
        raise FedLinearError(
            f"config key 'init-from': {cfg.init_from} is a model of {kernel.shape[0]} features, but this run's "
            f"shards have {num_features}"
        )
    if not (np.isfinite(kernel).all() and np.isfinite(bias)):
        raise FedLinearError(f"config key 'init-from': {cfg.init_from} has non-finite weights")
    if not cfg.fit_intercept and bias != 0.0:
        raise FedLinearError(
            f"config key 'init-from': {cfg.init_from} has an intercept ({bias:.6g}), but this run has "
            "'fit-intercept' = false: continue it with 'fit-intercept' = true, or start afresh"
        )
    w, b, residual = transform.from_raw(kernel, bias)
    weights = lm.LinearWeights(
        kernel=w.astype(np.float32).reshape(-1, 1),
        bias=np.array([b], np.float32) if cfg.fit_intercept else None,
    )
    which = f"version {origin.version} of " if origin.version is not None else ""
    note = f"starting from {which}{origin.uri} (init-from; model sha256 {modelrepo.tree_hash(files)[:12]})"
    if residual > 1e-9 * max(1.0, float(np.max(np.abs(kernel)))):
        note += f"; its weights on features this data holds constant are folded into the bias (residual {residual:.3g})"
    return Continued(weights, kernel.tolist(), float(bias), origin.lineage(files), note)
