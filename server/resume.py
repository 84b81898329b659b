"""Checkpoint identity: whether a run directory's last checkpoint continues this run, and from where.

Every checkpoint (``checkpoints/latest.json`` beside ``round-NNNN.npz``) records, besides the weights,
the trajectory settings (:data:`TRAJECTORY_KEYS`, :func:`trajectory_key`), the data it was trained on
(:func:`data_identity`), the standardization transform and the resolved learning rate and batch size, the privacy
accountant's state and the strategy's state. :func:`resume_or_start` compares them with this run's
and refuses, naming what changed, a checkpoint of another run. Keys added to the trajectory after
checkpoints without them were written are listed in :data:`ADDED_KEYS` with the value those runs
behaved as, so such a checkpoint still resumes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fedlinear.common import model as lm
from fedlinear.common import protocol
from fedlinear.common import scaling
from fedlinear.common import target as targets
from fedlinear.common.config import RunConfig
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.common.storage import fingerprint

# What must match for a checkpoint to continue the same trajectory (num-server-rounds may grow, down
# to the checkpointed round); the data itself is compared by data_identity.
TRAJECTORY_KEYS = (
    "seed", "learning-rate", "batch-size", "local-epochs", "fraction-train", "engine", "standardize",
    "target-column", "header", "reference",
    "dp", "dp-noise-multiplier", "dp-clipping-norm", "dp-clipping", "dp-target-quantile", "dp-clip-learning-rate",
    "dp-clipped-count-stddev", "dp-noise-seed", "dp-public-statistics",
    "secure-aggregation", "secagg-clipping-range", "secagg-quantization-range",
    "strategy", "proximal-mu", "server-learning-rate", "server-momentum", "eta", "beta-1", "beta-2", "tau",
    "trimmed-beta", "num-malicious-nodes", "num-nodes-to-select", "max-update-norm", "max-update-norm-factor",
    "fit-intercept", "init-from", "dp-target-epsilon",
)  # fmt: skip
# Trajectory keys added after checkpoints without them were written, with the value that behaves as
# those runs did (off). Only keys listed here are defaulted: a checkpoint lacking any other trajectory key
# (e.g. `standardize`, whose default changed what training does) is refused as a different run.
ADDED_KEYS = {"max-update-norm-factor": 0.0, "fit-intercept": True, "init-from": "", "dp-target-epsilon": 0.0}


def targets_epsilon(cfg: RunConfig) -> bool:
    """Whether ``dp-target-epsilon`` derives the noise multiplier (server/privacy.py ``resolve_noise``)."""
    return cfg.dp != "none" and cfg.dp_target_epsilon > 0


def with_resolved_noise(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``dp-noise-multiplier`` as the ServerApp runs it: derived from ``dp-target-epsilon`` (when > 0)
    for the run's releases, as :func:`server.privacy.resolve_noise` does (quietly; the same bisection, so the same
    float); a config already resolved stays the same."""
    if not targets_epsilon(cfg):
        return cfg
    from fedlinear.server import privacy

    z = privacy.noise_for_epsilon(cfg, cfg.dp_target_epsilon, privacy.releases_of(cfg))
    return dataclasses.replace(cfg, dp_noise_multiplier=z)
# What a checkpoint of a dp-target-epsilon run records beside the trajectory: the rounds its z was derived for.
TARGET_ROUNDS_KEY = "num-server-rounds"


def trajectory_key(cfg: RunConfig, num_features: int) -> dict[str, Any]:
    """The settings a checkpoint records and a resumed run must repeat."""
    settings = cfg.as_dict()
    return {"num-features": num_features, **{key: settings[key] for key in TRAJECTORY_KEYS}}


def _content(fp: dict | str) -> dict:
    """A data fingerprint without its path (the same bytes moved elsewhere are the same data)."""
    fp = json.loads(fp) if isinstance(fp, str) else dict(fp)
    return {k: v for k, v in sorted(fp.items()) if k != "uri"}


def data_identity(healthy: dict[int, dict], test: Dataset | None) -> dict[str, Any]:
    """What the run trains and tests on, as recorded in every checkpoint and compared on resume.

    Per shard (by client key): its size and, unless the node withholds them (privacy on), the
    content fingerprints of its files (SHA-256 and size, or S3 ETag and size); the test set's
    fingerprints.
    """
    shards = []
    for info in sorted(healthy.values(), key=lambda info: int(info[protocol.SHARD_CLIENT_KEY])):
        key, size = int(info[protocol.SHARD_CLIENT_KEY]), int(info[protocol.SHARD_NUM_EXAMPLES])
        shard = {"client-key": key, "num-examples": size}
        if info.get(protocol.SHARD_FINGERPRINTS):  # none under privacy
            shard["fingerprints"] = [_content(fp) for fp in info[protocol.SHARD_FINGERPRINTS]]
        shards.append(shard)
    return {"shards": shards, "test-set": [_content(fingerprint(uri)) for uri in test.sources] if test else []}


def data_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the data a checkpoint was trained on and the data there now."""
    changes = []
    before = {s["client-key"]: s for s in recorded.get("shards", [])}
    now = {s["client-key"]: s for s in current["shards"]}
    if set(before) - set(now):
        changes.append(f"shards of client keys {sorted(set(before) - set(now))} are missing")
    if set(now) - set(before):
        changes.append(f"shards of client keys {sorted(set(now) - set(before))} are new")
    for key in sorted(set(before) & set(now)):
        old, new = before[key], now[key]
        if old["num-examples"] != new["num-examples"]:
            changes.append(f"the shard of client key {key} has {new['num-examples']} rows, was {old['num-examples']}")
        elif "fingerprints" in old and "fingerprints" in new and old["fingerprints"] != new["fingerprints"]:
            changes.append(f"the shard of client key {key} has different content (fingerprint)")
    if recorded.get("test-set", []) != current["test-set"]:
        changes.append("the test set ('test-uri') has different content (fingerprint)")
    return changes


def refuse_other_trajectory(store: RunStore, pointer: dict[str, Any], cfg: RunConfig, num_features: int | None) -> None:
    """Refuse, naming what changed, a checkpoint (``pointer``: its ``latest.json``) of a run with other
    trajectory settings or, when ``num_features`` is given, another number of features; and one after more
    rounds than ``num-server-rounds``. ``fedlinear run`` calls it before writing anything (``num_features``
    None where it does not know it), the ServerApp again with the data in hand.

    With ``dp-target-epsilon`` the noise multiplier is derived before the comparison (the checkpoint holds the
    derived one), and ``num-server-rounds`` must be the one the run started with: the ε fixes the noise for it."""
    refuse_other_target_rounds(store, pointer, cfg)
    expected = trajectory_key(with_resolved_noise(cfg), num_features or 0)
    if num_features is None:
        expected.pop("num-features")
    recorded = {**ADDED_KEYS, **pointer}  # a checkpoint from before a key was added ran as its default does
    changed = [key for key, value in expected.items() if recorded.get(key) != value]
    if changed:
        detail = ", ".join(f"{key} {recorded.get(key)!r} -> {expected[key]!r}" for key in changed)
        raise FedLinearError(
            f"{store.run_dir} holds checkpoints of a different run ({detail}); "
            "resume with the same settings or choose another run-dir"
        )


def refuse_other_target_rounds(store: RunStore, pointer: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse, with ``dp-target-epsilon`` as the checkpoint has it, another ``num-server-rounds`` than the run
    started with: the noise multiplier that spends the ε was derived for that many releases."""
    if not targets_epsilon(cfg) or pointer.get("dp-target-epsilon") != cfg.dp_target_epsilon:
        return  # no target ε, or another one: the general comparison names it
    rounds = pointer.get(TARGET_ROUNDS_KEY)
    if rounds is None or int(rounds) == cfg.num_server_rounds:
        return
    raise FedLinearError(
        f"{store.run_dir} holds checkpoints of a run with 'dp-target-epsilon' = {cfg.dp_target_epsilon:g}, which fixes "
        f"the noise multiplier (z = {float(pointer['dp-noise-multiplier']):.6g}) for the {int(rounds)} rounds it "
        f"started with, but 'num-server-rounds' is now {cfg.num_server_rounds}; resume with 'num-server-rounds' = "
        f"{int(rounds)}, or choose another run-dir for a run over {cfg.num_server_rounds} rounds"
    )


def refuse_other_data(store: RunStore, pointer: dict[str, Any], data: dict[str, Any]) -> None:
    """Refuse, naming what moved, a checkpoint (``pointer``) trained on other data than ``data``
    (:func:`data_identity`); compared when the checkpoint recorded its data. ``fedlinear run`` calls it
    before writing anything (scripts/cli/preflight.py, from the shards it was given), the ServerApp
    again from what the nodes describe."""
    if "data" not in pointer:
        return
    moved = data_changes(pointer["data"], data)
    if moved:
        raise FedLinearError(
            f"{store.run_dir} holds checkpoints trained on other data: {'; '.join(moved)}; "
            "resume with the same data or choose another run-dir"
        )


def refuse_fewer_rounds(store: RunStore, pointer: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse ``num-server-rounds`` below the round the checkpoint (``pointer``) holds."""
    done = int(pointer["round"])
    if cfg.num_server_rounds < done:
        raise FedLinearError(
            f"{store.run_dir} holds a checkpoint after round {done} but 'num-server-rounds' is {cfg.num_server_rounds}; "
            f"set it to {done} or more to resume, or choose another run-dir"
        )


@dataclasses.dataclass
class Start:
    """Where the rounds start: weights (standardized space), first round, history, transform, step size."""

    weights: lm.LinearWeights
    first_round: int
    history: dict
    transform: scaling.Transform | None  # None: not in the checkpoint, derive it
    learning_rate: float | None
    accountant_state: dict | None = None
    strategy_state: dict | None = None  # Strategies.state_dict(): optimizer state, adaptive clipping norm
    batch_size: int | None = None  # the resolved batch size (batch-size = auto); None: the config's


def resume_or_start(store: RunStore, cfg: RunConfig, num_features: int, data: dict[str, Any] | None = None) -> Start:
    """The weights and first round to run: from the last checkpoint if the run dir has one.

    Sampling and batch order are functions of (seed, round, client), not of RNG state carried
    across rounds, and the checkpoint holds the standardization transform and the step size the
    run started with, so a resumed run continues exactly as the uninterrupted run would have.
    Refused, naming what changed: a different trajectory (TRAJECTORY_KEYS), different data
    (``data``, see :func:`data_identity`; compared when the checkpoint recorded it), or fewer
    ``num-server-rounds`` than the checkpoint already has.
    """
    latest = store.read_latest_checkpoint()
    if latest is None:
        return Start(lm.initial_weights(num_features, cfg.seed, cfg.fit_intercept), 1, {}, None, None)
    pointer, weights = latest
    refuse_other_trajectory(store, pointer, cfg, num_features)
    done = int(pointer["round"])
    if data is not None:
        refuse_other_data(store, pointer, data)
    refuse_fewer_rounds(store, pointer, cfg)
    history = store.read_history()
    history["rounds"] = [row for row in history["rounds"] if row["round"] <= done]
    for key in ("stopped", "reached-target-at", "stopped-at-target"):  # the end of this run says them again
        history.pop(key, None)
    at = targets.reached_at(history["rounds"], cfg.target_mse_ratio) if cfg.stop_at_target else None
    if at is not None and at < done:
        raise FedLinearError(
            f"{store.run_dir}: 'target-mse-ratio' {cfg.target_mse_ratio:g} was reached at round {at}, before the "
            f"checkpoint after round {done} this run resumes from, so 'stop-at-target' cannot stop there; resume "
            f"without it (round {at}'s weights are in checkpoints/round-{at:04d}.npz), or choose another run-dir"
        )
    transform = scaling.Transform.from_json(pointer["transform"]) if "transform" in pointer else None
    rate = float(pointer["resolved-learning-rate"]) if "resolved-learning-rate" in pointer else None
    batch = int(pointer["resolved-batch-size"]) if "resolved-batch-size" in pointer else None
    return Start(weights, done + 1, history, transform, rate, pointer.get("accountant"),
                 pointer.get("strategy-state", {"clipping": pointer["clipping"]} if "clipping" in pointer else None),
                 batch)


class Checkpoints:
    """Writes the checkpoint of every round with what :func:`resume_or_start` reads back.

    ``latest.json`` holds the trajectory key, the data identity, the transform and the resolved
    learning rate (fixed for the run), the accountant's state (under DP) and the strategy's state
    (:meth:`server.strategy.Strategies.state_dict`), both as of the round written.
    """

    def __init__(
        self, store: RunStore, cfg: RunConfig, num_features: int, data: dict[str, Any],
        transform: scaling.Transform, learning_rate: float, batch_size: int | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.state: dict[str, Any] = {
            **trajectory_key(cfg, num_features),
            "data": data,
            "transform": transform.to_json(),
            "resolved-learning-rate": learning_rate,
        }
        if targets_epsilon(cfg):  # the rounds the target ε's noise multiplier was derived for
            self.state[TARGET_ROUNDS_KEY] = int(cfg.num_server_rounds)
        if batch_size is not None:
            self.state["resolved-batch-size"] = int(batch_size)

    def write(self, server_round: int, weights: lm.LinearWeights, accountant, strategies) -> None:
        if accountant is not None:
            self.state["accountant"] = accountant.state_dict()
        self.state["strategy-state"] = strategies.state_dict()
        self.store.write_checkpoint(server_round, weights, self.state)
