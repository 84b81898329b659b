"""The end of a run: the SavedModel in raw units, ``manifest.json``, the ``completed`` status.

Both ways a run ends with a model go through :func:`complete`, the one place that writes the
manifest: the iterative strategies (:mod:`server.rounds`) and ``strategy = fedols``
(:mod:`server.fedols`). What differs between them is in :class:`Result`.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from importlib import metadata
from typing import Any

import numpy as np
from flwr.app import Context

from fedlinear.common import model as lm
from fedlinear.common import protocol
from fedlinear.common.config import RunConfig
from fedlinear.common.dataset import Dataset
from fedlinear.common import exporter
from fedlinear.common.runstore import RunStore
from fedlinear.common.storage import fingerprint
from fedlinear.server import progress
from fedlinear.server.nodes import Parties, in_key_order


@dataclasses.dataclass
class Result:
    """What a run produced, as the manifest records it.

    Attributes
    ----------
    kernel, bias : the model in raw units (float64), the manifest's ``weights``
    transform : the standardization the clients trained in (``standardization``)
    learning_rate : ``{"value", "how"}`` (``learning-rate``)
    method : what produced the weights: ``{"privacy": ...}`` (iterative strategies) or ``{"fedols": ...}``
    reference : the pooled least-squares yardstick (``reference``)
    final_row : the last history row (``final``, without per-node failures and the sample)
    standardized : the global model in the training variables (``standardized-weights``), if any
    outcome : keys appended at the end (``reached-target-at``, ``stopped-at-target``, ...)
    status_message : the ``completed`` status's message
    """

    kernel: np.ndarray
    bias: float
    transform: Any
    learning_rate: dict[str, Any]
    method: dict[str, Any]
    reference: dict[str, Any]
    final_row: dict[str, Any]
    standardized: lm.LinearWeights | None = None
    outcome: dict[str, Any] = dataclasses.field(default_factory=dict)
    status_message: str = ""


def versions() -> dict[str, str]:
    """The versions of Python and of the packages a run's numbers depend on."""
    out = {"python": platform.python_version()}
    for package in ("fedlinear", "flwr", "numpy", "tensorflow", "boto3"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def manifest_data(healthy: dict[int, dict], test: Dataset | None) -> dict[str, list]:
    """The manifest's ``shards`` (in client-key order; paths withheld under privacy) and ``test-set``:
    each shard's description as its node sent it."""
    kept = (
        protocol.SHARD_DATA_URI, protocol.SHARD_NUM_EXAMPLES, protocol.SHARD_FINGERPRINTS, protocol.SHARD_PARTITION_ID
    )  # fmt: skip
    withheld = {protocol.SHARD_DATA_URI: "withheld by the node (privacy on)"}
    return {
        "shards": [
            {k: healthy[nid][k] for k in kept if k in healthy[nid]}
            | ({} if protocol.SHARD_DATA_URI in healthy[nid] else withheld)
            for nid in in_key_order(healthy)
        ],
        "test-set": [fingerprint(uri) for uri in test.sources] if test is not None else [],
    }


def complete(
    store: RunStore, context: Context, cfg: RunConfig, parties: Parties, test: Dataset | None, started: float,
    result: Result,
) -> None:  # fmt: skip
    """Export the model (rounded to float32), write ``manifest.json`` and the ``completed`` status."""
    exported = lm.LinearWeights(
        kernel=np.asarray(result.kernel).astype(np.float32).reshape(-1, 1),
        bias=np.array([result.bias], dtype=np.float32) if cfg.fit_intercept else None,  # no intercept: no bias
    )
    model_uri = store.uri("model")
    export = exporter.export_model(exported, model_uri, progress.say)  # the run's exporter process, if it has one
    manifest = {
        "run-id": context.run_id,
        "config": cfg.as_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "num-features": parties.num_features,
        "weights": {"kernel": result.kernel.tolist(), "bias": result.bias},
        "exported-weights": {"kernel": exported.kernel.ravel().tolist(), "bias": exported.bias_value},
        "fit-intercept": cfg.fit_intercept,
    }
    if result.standardized is not None:
        weights = result.standardized
        manifest["standardized-weights"] = {"kernel": weights.kernel.ravel().tolist(), "bias": weights.bias_value}
    manifest.update({
        "standardization": result.transform.to_json(),
        "learning-rate": result.learning_rate,
        **result.method,
        "model": model_uri,
        "export": export,
        **manifest_data(parties.healthy, test),
        "reference": result.reference,
        "final": {k: v for k, v in result.final_row.items() if k not in ("failures", "sampled")},
        "query-failures": parties.failures,
        "wall-time-s": time.monotonic() - started,
        **result.outcome,
    })  # fmt: skip
    store.write_manifest(manifest)
    store.write_status("completed", result.status_message, run_id=context.run_id)
    progress.say(f"done: model exported to {model_uri}")
