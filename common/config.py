"""The typed run configuration, parsed and validated once from Flower's ``context.run_config``.

Keys live in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (kebab-case) and may be overridden
with ``flwr run --run-config 'key=value ...'`` or ``fedlinear run --set key=value``. Each key is
documented in the README's config reference; the defaults below are the single source of truth
for anything not given in ``pyproject.toml``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from common.errors import FedLinearError

ENGINES = ("numpy", "keras")
HEADER_MODES = ("auto", "yes", "no")
REFERENCE_MODES = ("auto", "none")
STANDARDIZE_MODES = ("auto", "whiten", "scale", "none")
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every knob of a fedlinear run.

    Attributes
    ----------
    num_server_rounds : int (default: 20)
        Federated rounds to run (``num-server-rounds``).
    local_epochs : int (default: 1)
        Passes over the local shard per round (``local-epochs``).
    batch_size : int (default: 32)
        Mini-batch size of local SGD (``batch-size``).
    learning_rate : float or "auto" (default: "auto")
        Step size of local SGD in the standardized space (``learning-rate``); ``auto`` derives it from
        the pooled statistics (stability, SGD noise floor, rounds): see :mod:`common.scaling`.
    fraction_train : float (default: 1.0)
        Fraction of connected nodes sampled for training each round (``fraction-train``).
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes asked for a federated evaluation each round (``fraction-evaluate``);
        0 skips those tasks, since the server evaluates centrally when it has a test set.
    min_available_nodes : int (default: 2)
        Nodes that must be connected before round 1 (``min-available-nodes``).
    seed : int (default: 42)
        Fixes initialisation, client sampling and every client's batch order (``seed``).
    data_uri : str (default: "")
        Where a node's shard is. In simulation a template with ``{partition-id}``; in deployment
        each SuperNode's ``--node-config data-uri=...`` takes precedence (``data-uri``).
    test_uri : str (default: "")
        Held-out test set for centralized evaluation on the server (``test-uri``).
    run_dir : str (default: "")
        Absolute path or ``s3://`` URI for every output; empty means
        ``~/fedlinear-runs/run-<run id>`` (``run-dir``).
    engine : str (default: "numpy")
        Local training engine, ``numpy`` (no TensorFlow import) or ``keras`` (``engine``).
    target_column : int (default: -1)
        Which CSV column is the target; negative counts from the end (``target-column``).
    header : str (default: "auto")
        ``auto`` takes the first non-blank row as a header only when none of its fields is a
        number and none is empty; ``yes``/``no`` force it (``header``).
    standardize : str (default: "auto")
        The change of variables the clients train in, learned from pooled additive sums before
        round 1 and folded back into the exported model (``standardize``): ``whiten`` (centre and
        decorrelate the features, scale the target), ``scale`` (centre and scale each feature and
        the target), ``none`` (raw data); ``auto`` whitens when the pooled cross-products are known
        (``reference = auto``) and scales otherwise.
    max_failed_rounds : int (default: 3)
        Consecutive rounds without any aggregated client update after which the run stops as
        failed (``max-failed-rounds``).
    reference : str (default: "auto")
        ``auto`` asks each node for its centred second moments (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) before
        round 1 so the server knows the pooled least-squares optimum and reports the gap to it;
        ``none`` keeps the cross-products on the nodes (only per-column sums for ``standardize``)
        (``reference``).
    node_wait_timeout : float (default: 120)
        Seconds the server waits for ``min-available-nodes`` before giving up (``node-wait-timeout``).
    round_timeout : float (default: 600)
        Seconds the server waits for replies in one round (``round-timeout``).
    """

    num_server_rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float | str = AUTO
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    seed: int = 42
    data_uri: str = ""
    test_uri: str = ""
    run_dir: str = ""
    engine: str = "numpy"
    target_column: int = -1
    header: str = "auto"
    standardize: str = "auto"
    max_failed_rounds: int = 3
    reference: str = "auto"
    node_wait_timeout: float = 120.0
    round_timeout: float = 600.0

    @classmethod
    def keys(cls) -> list[str]:
        """The kebab-case config keys, in declaration order."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse and validate Flower's run config; unknown keys are an error naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise FedLinearError(
                    f"unknown config key '{key}'; known keys: {', '.join(cls.keys())}"
                )
            values[name] = _coerce(key, raw, _kind(name))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check ranges and choices; raise FedLinearError naming the offending key."""
        positive = {
            "num-server-rounds": self.num_server_rounds,
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "min-available-nodes": self.min_available_nodes,
            "max-failed-rounds": self.max_failed_rounds,
        }
        for key, value in positive.items():
            if value < 1:
                raise FedLinearError(f"config key '{key}' must be >= 1, got {value}")
        if self.learning_rate != AUTO and not 0 < self.learning_rate < 10:
            raise FedLinearError(f"config key 'learning-rate' must be in (0, 10), got {self.learning_rate}")
        if not 0 < self.fraction_train <= 1:
            raise FedLinearError(f"config key 'fraction-train' must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise FedLinearError(
                f"config key 'fraction-evaluate' must be in [0, 1], got {self.fraction_evaluate}"
            )
        for key, value, choices in (
            ("engine", self.engine, ENGINES),
            ("header", self.header, HEADER_MODES),
            ("reference", self.reference, REFERENCE_MODES),
            ("standardize", self.standardize, STANDARDIZE_MODES),
        ):
            if value not in choices:
                raise FedLinearError(f"config key '{key}' must be one of {', '.join(choices)}, got '{value}'")
        for key, value in (("node-wait-timeout", self.node_wait_timeout), ("round-timeout", self.round_timeout)):
            if not value > 0 or value == float("inf"):  # also refuses NaN
                raise FedLinearError(f"config key '{key}' must be a finite number of seconds > 0, got {value}")
        if self.seed < 0:
            raise FedLinearError(f"config key 'seed' must be >= 0, got {self.seed}")
        if self.run_dir and not (self.run_dir.startswith("s3://") or os.path.isabs(self.run_dir)):
            raise FedLinearError(
                f"config key 'run-dir' must be an absolute path or an s3:// URI, got '{self.run_dir}'"
            )

    def as_dict(self) -> dict[str, Any]:
        """The resolved config with kebab-case keys (for the manifest)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def resolved_run_dir(self, run_id: int | str) -> str:
        """The run directory: ``run-dir`` if set, else ``~/fedlinear-runs/run-<run id>``."""
        if self.run_dir:
            return self.run_dir.rstrip("/") if self.run_dir != "/" else self.run_dir
        return os.path.join(os.path.expanduser("~"), "fedlinear-runs", f"run-{run_id}")


def _kind(name: str) -> type:
    """The type a field's values are coerced to (``learning-rate`` takes a number or "auto")."""
    return float if name == "learning_rate" else type(getattr(RunConfig, name))


def _coerce(key: str, raw: Any, kind: type) -> Any:
    """Convert a TOML/CLI value to the field's type, or raise naming the key."""
    if key == "learning-rate" and isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    if isinstance(raw, bool) and kind is not bool:
        raise FedLinearError(f"config key '{key}' must be a {kind.__name__}, got a boolean")
    try:
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if kind is float:
            value = float(raw)
            if value != value:
                raise ValueError
            return value
        if kind is str:
            return str(raw)
    except (TypeError, ValueError):
        pass
    raise FedLinearError(f"config key '{key}' must be a {kind.__name__}, got {raw!r}")


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` strings (``fedlinear run --set``) into a typed override mapping."""
    out: dict[str, Any] = {}
    defaults = RunConfig()
    for item in items or []:
        if "=" not in item:
            raise FedLinearError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        name = key.replace("-", "_")
        if not hasattr(defaults, name):
            raise FedLinearError(f"unknown config key '{key}'; known keys: {', '.join(RunConfig.keys())}")
        out[key] = _coerce(key, value.strip(), _kind(name))
    return out
