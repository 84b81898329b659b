"""fedlinear's ServerApp: FedAvg rounds, centralized evaluation, checkpoints and the SavedModel.

One run, in order:

1. parse the run config once; open the run directory (``run-dir``, local or ``s3://``);
2. wait (bounded by ``node-wait-timeout``) for ``min-available-nodes`` nodes;
3. ask every node about its shard (Flower's ``query`` message): feature count, size, fingerprint,
   and, unless ``reference = "none"``, its sufficient statistics for the pooled least-squares
   optimum. Nodes whose shard cannot be read are left out and reported; shards that disagree on
   the number of features stop the run, naming the nodes;
4. run ``num-server-rounds`` rounds of the strategy from :mod:`server.strategy`, evaluating the
   global model on the server's test set after each round, writing history and a checkpoint;
5. export the SavedModel and write ``manifest.json``.

Progress lines start with ``[fedlinear]`` so a launcher can pick them out of Flower's log stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import sys
import time
from importlib import metadata
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp

from fedlinear.common import model as lm
from fedlinear.common import scaling
from fedlinear.common import target as targets
from fedlinear.common.config import RunConfig
from fedlinear.common.csvio import load_csv
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError, one_line, untrusted_text
from fedlinear.common.export import export_savedmodel
from fedlinear.common.runstore import RunStore
from fedlinear.common.storage import fingerprint
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedlinear.common import privacy as private_noise
from fedlinear.server import privacy
from fedlinear.server import replies as replies_check
from fedlinear.server.strategy import build_strategy, fixed_order
from fedlinear.server import secure  # secure aggregation hook

app = ServerApp()
log = logging.getLogger("fedlinear")


def say(text: str) -> None:
    """A progress line: on stdout (Flower streams it) with a prefix launchers can filter on."""
    print(f"[fedlinear] {text}", flush=True)


def to_record(weights: lm.LinearWeights) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in weights.as_dict().items()})


def from_record(record: ArrayRecord) -> lm.LinearWeights:
    return lm.LinearWeights.from_dict({name: record[name].numpy() for name in lm.WEIGHT_NAMES})


def wait_for_nodes(grid: Grid, cfg: RunConfig) -> list[int]:
    """Node ids once ``min-available-nodes`` are connected; an error after ``node-wait-timeout``."""
    deadline = time.monotonic() + cfg.node_wait_timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.min_available_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise FedLinearError(
                f"only {len(nodes)} of {cfg.min_available_nodes} nodes (config key 'min-available-nodes') "
                f"connected within {cfg.node_wait_timeout:g} s (config key 'node-wait-timeout')"
            )
        time.sleep(0.2)


def _valid_vector(record: ArrayRecord | None, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The named float array of a reply if it has the expected shape and finite values, else None."""
    if record is None or name not in record:
        return None
    try:
        value = np.asarray(record[name].numpy(), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a malformed array is a bad reply, not a server error
        return None
    if value.shape != shape or not np.isfinite(value).all():
        return None
    return value


def query_nodes(
    grid: Grid, cfg: RunConfig, nodes: list[int]
) -> tuple[dict[int, dict], list[dict], scaling.PooledStats | None]:
    """Ask each node about its shard, then for the pooled statistics; return (healthy node -> info,
    failures, pooled statistics or None).

    Stage ``describe``: shard description and, when standardization or the reference needs them,
    ``n`` and ``Σ[x y]``. Stage ``scatter``: the pooled mean goes back to the nodes, each returns its
    scatter about it (full when ``reference = auto``, the diagonal otherwise). Both are sums, added
    in client-key order so the result does not depend on reply order.
    """
    # under any privacy mechanism no node sends statistics (nor its shard's path and hash) in the clear
    want_moments = not cfg.private and (cfg.reference == "auto" or cfg.standardize != "none")
    describe = {"stage": "describe", "want-moments": want_moments, "private": cfg.private}
    messages = [
        Message(
            RecordDict({"config": ConfigRecord(describe)}),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    answered = {msg.metadata.src_node_id for msg in replies}
    healthy: dict[int, dict] = {}
    failures = [{"node-id": nid, "reason": "no reply to the shard query"} for nid in nodes if nid not in answered]
    totals: dict[int, np.ndarray] = {}
    for msg in replies:
        nid = msg.metadata.src_node_id
        if msg.has_error():
            failures.append({"node-id": nid, "reason": untrusted_text(msg.error.reason)})
            continue
        shard = msg.content.config_records.get("shard")
        info = dict(shard) if shard is not None else {}
        problem = replies_check.check_shard(info)
        if problem:
            failures.append({"node-id": nid, "reason": problem})
            continue
        healthy[nid] = info
        if want_moments:
            total = _valid_vector(msg.content.array_records.get("moments"), "total", (int(info["num-features"]) + 1,))
            if total is None:
                del healthy[nid]
                failures.append({"node-id": nid, "reason": "malformed or non-finite column sums in the shard query"})
            else:
                totals[nid] = total
    failures += colliding_keys(healthy)
    for failure in failures:
        say(f"node {failure['node-id']} left out: {failure['reason']}")
    if not healthy:
        raise FedLinearError(
            "no node could read its shard: " + "; ".join(f"node {f['node-id']}: {f['reason']}" for f in failures)
        )
    widths = {info["num-features"] for info in healthy.values()}
    if len(widths) > 1:
        detail = ", ".join(
            f"node {nid} ({info.get('data-uri') or 'shard withheld'}): {info['num-features']}"
            for nid, info in sorted(healthy.items())
        )
        raise FedLinearError(f"shards disagree on the number of features: {detail}")
    if not want_moments:
        return healthy, failures, None
    return healthy, failures, pooled_statistics(grid, cfg, healthy, totals, failures)


def colliding_keys(healthy: dict[int, dict]) -> list[dict]:
    """Leave out every node whose client key another node also reports; a failure for each.

    The client key fixes a party's sampling and batch order and the aggregation order. Two nodes
    with one key (the same partition-id or party-id, or identical shards at the same path) are
    both left out, whichever connected first, so the outcome does not depend on node ids.
    """
    by_key: dict[int, list[int]] = {}
    for nid, info in healthy.items():
        by_key.setdefault(int(info["client-key"]), []).append(nid)
    out = []
    for key, nids in sorted(by_key.items()):
        if len(nids) < 2:
            continue
        for nid in sorted(nids):
            del healthy[nid]
            others = ", ".join(str(n) for n in sorted(nids) if n != nid)
            out.append({
                "node-id": nid,
                "reason": f"client key {key} is also reported by node {others} (the same partition-id or party-id, "
                "or identical shards at the same path): give each SuperNode its own --node-config party-id",
            })  # fmt: skip
    return out


def scatter_problem(matrix: np.ndarray) -> str | None:
    """Why a party's scatter Σ(z − μ)(z − μ)ᵀ (or its diagonal) cannot be one, else None.

    A sum of outer products is symmetric and positive semidefinite, a diagonal non-negative: anything
    else would bend the pooled optimum (and the standardization) at one party's will.
    """
    if matrix.ndim == 1:
        return "negative entries in the scatter diagonal of the statistics query" if (matrix < 0).any() else None
    scale = max(float(np.abs(matrix).max()), np.finfo(float).tiny)
    if not np.allclose(matrix, matrix.T, rtol=0.0, atol=1e-12 * scale):
        return "an asymmetric scatter matrix in the statistics query"
    if float(np.linalg.eigvalsh(matrix).min()) < -1e-9 * scale * len(matrix):
        return "a scatter matrix that is not positive semidefinite in the statistics query"
    return None


def manifest_data(healthy: dict[int, dict], test: Dataset | None) -> dict[str, list]:
    """The manifest's ``shards`` (in client-key order; paths withheld under privacy) and ``test-set``."""
    return {
        "shards": [
            {k: healthy[nid][k] for k in ("data-uri", "num-examples", "fingerprints", "partition-id") if k in healthy[nid]}
            | ({} if "data-uri" in healthy[nid] else {"data-uri": "withheld by the node (privacy on)"})
            for nid in _in_key_order(healthy)
        ],
        "test-set": [fingerprint(uri) for uri in test.sources] if test is not None else [],
    }


def _in_key_order(healthy: dict[int, dict]) -> list[int]:
    return sorted(healthy, key=lambda n: (int(healthy[n]["client-key"]), n))


def pooled_statistics(
    grid: Grid, cfg: RunConfig, healthy: dict[int, dict], totals: dict[int, np.ndarray], failures: list[dict]
) -> scaling.PooledStats:
    """Second pass: the scatter of every healthy node about the pooled mean (nodes failing it are left out)."""
    d = int(next(iter(healthy.values()))["num-features"])
    order = _in_key_order(healthy)
    moments = None
    for nid in order:
        part = scaling.Moments(int(healthy[nid]["num-examples"]), totals[nid])
        moments = part if moments is None else moments + part
    centre = moments.mean
    full = cfg.reference == "auto"
    messages = [
        Message(
            RecordDict(
                {
                    "config": ConfigRecord({"stage": "scatter", "full": full}),
                    "centre": ArrayRecord({"centre": Array(np.ascontiguousarray(centre))}),
                }
            ),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in order
    ]
    replies = {msg.metadata.src_node_id: msg for msg in grid.send_and_receive(messages, timeout=cfg.round_timeout)}
    shape = (d + 1, d + 1) if full else (d + 1,)
    parts: dict[int, np.ndarray] = {}
    for nid in order:
        msg = replies.get(nid)
        if msg is None:
            reason = "no reply to the statistics query"
        elif msg.has_error():
            reason = untrusted_text(msg.error.reason)
        else:
            matrix = _valid_vector(msg.content.array_records.get("scatter"), "scatter", shape)
            problem = "malformed or non-finite scatter in the statistics query" if matrix is None else scatter_problem(matrix)
            if problem is None:
                parts[nid] = matrix
                continue
            reason = problem
        failures.append({"node-id": nid, "reason": reason})
        say(f"node {nid} left out: {reason}")
        del healthy[nid]
    if not healthy:
        raise FedLinearError("no node answered the statistics query")
    moments = scatter = None
    for nid in _in_key_order(healthy):
        m = scaling.Moments(int(healthy[nid]["num-examples"]), totals[nid])
        sc = scaling.Scatter(m.count, parts[nid])
        moments = m if moments is None else moments + m
        scatter = sc if scatter is None else scatter + sc
    return scaling.PooledStats.combine(moments, scatter, centre)


class Evaluator:
    """Centralized evaluation of the global model in raw units: test MSE and the gap to least squares.

    The global weights live in the standardized variables of ``transform``; every figure here is for
    the raw-space model they fold into (what the SavedModel computes).
    """

    def __init__(self, test: Dataset | None, pooled: scaling.PooledStats | None, transform: scaling.Transform) -> None:
        self.test = test
        self.pooled = pooled if pooled is not None and pooled.full else None
        self.transform = transform
        self.optimum: tuple[np.ndarray, float] | None = None
        self.reference: dict[str, Any] = {}
        if self.pooled is not None:
            kernel, bias = self.pooled.solve()
            self.optimum = (kernel, bias)
            self.reference["train-mse"] = self.pooled.optimum_sse(kernel) / self.pooled.count
            self.reference["weights"] = [*kernel.tolist(), bias]
            self.reference["num-examples"] = self.pooled.count
            self.reference["source"] = (
                "pooled least squares from centred additive sums (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) of every node"
            )
            if test is not None:
                self.reference["test-mse"] = _mse(kernel, bias, test)

    def raw(self, weights: lm.LinearWeights) -> tuple[np.ndarray, float]:
        return self.transform.to_raw(weights.kernel, float(weights.bias[0]))

    def __call__(self, weights: lm.LinearWeights) -> dict[str, float]:
        kernel, bias = self.raw(weights)
        out: dict[str, float] = {}
        if self.test is not None:
            out["test-mse"] = _mse(kernel, bias, self.test)
        if self.optimum is not None:
            opt_kernel, opt_bias = self.optimum
            excess = self.pooled.excess_mse(kernel, bias, opt_kernel, opt_bias)
            out["train-mse"] = self.reference["train-mse"] + excess
            out["excess-train-mse"] = excess
            out["weight-distance"] = float(np.linalg.norm(np.r_[kernel - opt_kernel, bias - opt_bias]))
            if "test-mse" in out:
                ref = self.reference["test-mse"]
                out["reference-test-mse"] = ref
                out["excess-test-mse"] = out["test-mse"] - ref
                out["test-mse-ratio"] = out["test-mse"] / ref if ref > 0 else float("nan")
        return out


def _mse(kernel: np.ndarray, bias: float, data: Dataset) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        residual = data.x @ kernel + bias - data.y
        return float(np.mean(residual * residual))


def progress_line(row: dict[str, Any]) -> str:
    parts = [f"round {row['round']:>3}"]
    for key, label in (
        ("train-loss", "train loss"),
        ("test-mse", "test MSE"),
        ("test-mse-ratio", "/ LS"),
        ("excess-train-mse", "excess train MSE"),
        ("weight-distance", "|w - w*|"),
        ("epsilon", "ε"),
    ):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.6g}")
    parts.append(f"clients {row['clients-ok']}/{row['clients-ok'] + row['clients-failed']}")
    parts.append(f"{row['elapsed-s']:.1f} s")
    return " | ".join(parts)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("fedlinear", "flwr", "numpy", "tensorflow", "boto3"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


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
)  # fmt: skip
# Trajectory keys added after checkpoints without them were written, with the value that behaves as
# those runs did (off). Only keys listed here are defaulted: a checkpoint lacking any other trajectory key
# (e.g. `standardize`, whose default changed what training does) is refused as a different run.
ADDED_KEYS = {"max-update-norm-factor": 0.0}
# A global model whose error grows past this multiple of the initial model's has diverged.
DIVERGENCE_FACTOR = 1e4


def trajectory_key(cfg: RunConfig, num_features: int) -> dict[str, Any]:
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
    for info in sorted(healthy.values(), key=lambda info: int(info["client-key"])):
        shard = {"client-key": int(info["client-key"]), "num-examples": int(info["num-examples"])}
        if info.get("fingerprints"):  # none under privacy
            shard["fingerprints"] = [_content(fp) for fp in info["fingerprints"]]
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
        return Start(lm.initial_weights(num_features, cfg.seed), 1, {}, None, None)
    pointer, weights = latest
    expected = trajectory_key(cfg, num_features)
    recorded = {**ADDED_KEYS, **pointer}  # a checkpoint from before a key was added ran as its default does
    changed = [key for key, value in expected.items() if recorded.get(key) != value]
    if changed:
        detail = ", ".join(f"{key} {recorded.get(key)!r} -> {expected[key]!r}" for key in changed)
        raise FedLinearError(
            f"{store.run_dir} holds checkpoints of a different run ({detail}); "
            "resume with the same settings or choose another run-dir"
        )
    done = int(pointer["round"])
    if data is not None and "data" in pointer:
        moved = data_changes(pointer["data"], data)
        if moved:
            raise FedLinearError(
                f"{store.run_dir} holds checkpoints trained on other data: {'; '.join(moved)}; "
                "resume with the same data or choose another run-dir"
            )
    if cfg.num_server_rounds < done:
        raise FedLinearError(
            f"{store.run_dir} holds a checkpoint after round {done} but 'num-server-rounds' is {cfg.num_server_rounds}; "
            f"set it to {done} or more to resume, or choose another run-dir"
        )
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
    return Start(weights, done + 1, history, transform, rate, pointer.get("accountant"),
                 pointer.get("strategy-state", {"clipping": pointer["clipping"]} if "clipping" in pointer else None))


def choose_statistics(
    cfg: RunConfig, from_nodes: scaling.PooledStats | None, num_features: int
) -> tuple[scaling.PooledStats | None, str, scaling.PooledStats | None]:
    """(statistics for the yardstick, where they came from, statistics the training may use).

    Without privacy the nodes' sums serve both. Under privacy the nodes send none: the yardstick comes
    from ``statistics-uri`` if given (``fedlinear run`` computes it from the shards on its machine; it
    never reaches the model), and training uses those statistics only when they are declared public.
    """
    if not cfg.private:
        return from_nodes, "pooled least squares from centred additive sums (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) of every node", from_nodes
    if not cfg.statistics_uri:
        return None, "none: privacy is on and no statistics-uri was given", None
    local = scaling.PooledStats.load(cfg.statistics_uri, num_features)
    source = (
        f"pooled least squares from {cfg.statistics_uri}, computed outside the federation (by fedlinear run from the "
        "shards on its machine); no node sent statistics"
    )
    return local, source, local if cfg.dp_public_statistics else None


def build_transform(cfg: RunConfig, stats: scaling.PooledStats | None, num_features: int) -> scaling.Transform:
    """The standardization transform; under privacy only from statistics declared public."""
    if cfg.private and stats is None and cfg.standardize != "none":
        if cfg.standardize != "auto":
            raise FedLinearError(
                f"standardize = {cfg.standardize} needs pooled statistics, which no node sends under privacy: "
                "declare statistics public with 'dp-public-statistics' = true and 'statistics-uri', or set 'standardize' = none"
            )
        transform = scaling.Transform.identity(num_features)
        transform.notes = (
            "standardize = auto trains on raw data under privacy: the statistics would leak; declare them public "
            "('dp-public-statistics' = true with 'statistics-uri') to standardize",
        )
        return transform
    transform = scaling.build_transform(cfg.standardize, stats, num_features)
    if cfg.private and stats is not None and transform.kind != "none":
        transform.notes = (*transform.notes, f"standardization statistics declared public ({cfg.statistics_uri}); not covered by ε")
    return transform


def transform_config(transform: scaling.Transform) -> dict[str, Any]:
    """The transform as train/evaluate config values (one ConfigRecord: Flower's fixedclipping_mod
    refuses a task with a second ArrayRecord)."""
    if transform.kind == "none":
        return {}
    return {f"transform-{name}": value.ravel().tolist() for name, value in transform.arrays().items()}


def local_dp_config(cfg: RunConfig) -> dict[str, Any]:
    if cfg.dp != "local":
        return {}
    return {
        "local-dp-clipping-norm": cfg.dp_clipping_norm,
        "local-dp-noise-multiplier": cfg.dp_noise_multiplier,
        "dp-noise-seed": cfg.dp_noise_seed,
    }


# A weight vector this long is garbage or an attack: training from standardized data moves weights
# by O(1); raw-space runs (standardize = none) by what the data's scale allows.
WEIGHT_NORM_BOUND = 1e12


def validated(
    ordered: list[Message], failures: list[dict], healthy: dict[int, dict], eligible: dict[int, int],
    num_features: int, arrays: ArrayRecord, max_update_norm: float = 0.0, max_update_norm_factor: float = 0.0,
    server_round: int = 0,
) -> list[Message]:
    """The replies that pass :mod:`server.replies` (and, if > 0, ``max-update-norm`` on their update
    from ``arrays``, then ``max-update-norm-factor`` against the median update norm of the replies that
    passed everything else); each rejected one is added to ``failures``: first those of the per-reply
    checks, in ``ordered``'s order, then those of the median bound, in ``ordered``'s order."""
    kept = []
    for msg in ordered:
        nid = msg.metadata.src_node_id
        if msg.has_error():
            kept.append(msg)  # already a failure; the strategy (and Flower's DP wrappers) see it as one
            continue
        problem = (
            "reply from a node that was not asked" if nid not in healthy
            else replies_check.check_train_reply(msg, num_features, healthy[nid], WEIGHT_NORM_BOUND)
        )  # fmt: skip
        if problem is None and max_update_norm > 0:
            problem = replies_check.check_update_norm(msg, arrays, max_update_norm, nid)
        if problem is None:
            kept.append(msg)
        else:
            failures.append({"node-id": nid, "client-key": eligible.get(nid), "reason": problem})
    if max_update_norm_factor > 0:
        norms = {msg.metadata.src_node_id: replies_check.update_norm(msg, arrays)
                 for msg in kept if not msg.has_error()}  # fmt: skip
        skipped = replies_check.median_bound_skipped(norms)
        if skipped and norms:  # with no reply there is nothing to say
            say(f"round {server_round}: 'max-update-norm-factor' not applied: {skipped}")
        rejected = replies_check.check_update_norm_factor(norms, max_update_norm_factor, server_round)
        failures += [
            {"node-id": msg.metadata.src_node_id, "client-key": eligible.get(msg.metadata.src_node_id),
             "reason": rejected[msg.metadata.src_node_id]}
            for msg in kept if not msg.has_error() and msg.metadata.src_node_id in rejected
        ]  # fmt: skip
        kept = [msg for msg in kept if msg.has_error() or msg.metadata.src_node_id not in rejected]
    return kept


def participation_floor(cfg: RunConfig, num_eligible: int, num_sampled: int) -> int:
    """``min-train-nodes`` as a count of valid replies; an error when no round could ever reach it."""
    floor = cfg.min_train_count(num_eligible)
    if floor > num_sampled:
        raise FedLinearError(
            f"config key 'min-train-nodes' = {cfg.min_train_nodes:g} asks for {floor} valid updates a round, but only "
            f"{num_sampled} of the {num_eligible} eligible nodes are sampled a round ('fraction-train' = "
            f"{cfg.fraction_train:g}): no round could be aggregated"
        )
    return floor


def answers_to(
    messages: list[Message], replies: list[Message], eligible: dict[int, int]
) -> tuple[list[Message], list[dict]]:
    """(the replies that answer one of this round's ``messages``, a failure for each that does not).

    A reply must name one of the messages sent in this call (``reply_to_message_id``; Flower's grid sets
    each message id when it pushes it), come from the node that message went to, and carry the round's
    group id, at most once per message. Flower 1.42's grid pulls only the ids it pushed in the same
    ``send_and_receive``, so a straggler's late reply of round r never comes back in round r+1; this
    check holds whatever grid (or SuperLink) the ServerApp runs over.
    """
    by_id = all(msg.metadata.message_id for msg in messages)  # a grid that sets no ids: match by node
    sent = {(msg.metadata.message_id if by_id else msg.metadata.dst_node_id): msg for msg in messages}
    kept, rejected, seen = [], [], set()
    for reply in replies:
        meta = reply.metadata
        key = meta.reply_to_message_id if by_id else meta.src_node_id
        asked = sent.get(key)
        if asked is not None and by_id and reply.has_error() and meta.src_node_id == SUPERLINK_NODE_ID:
            # the SuperLink's own error reply for a node (unavailable, reply lost): that node's failure
            node = asked.metadata.dst_node_id
            reason = f"the SuperLink reports: {reply.error.reason}"
            rejected.append({"node-id": node, "client-key": eligible.get(node), "reason": reason})
            seen.add(key)
            continue
        if asked is None or asked.metadata.dst_node_id != meta.src_node_id or asked.metadata.group_id != meta.group_id:
            reason = "reply rejected: it does not answer a message of this round (a late reply of an earlier round?)"
        elif key in seen:
            reason = "reply rejected: a second reply to the same message"
        else:
            seen.add(key)
            kept.append(reply)
            continue
        rejected.append({"node-id": meta.src_node_id, "client-key": eligible.get(meta.src_node_id), "reason": reason})
    return kept, rejected


def secure_with_dp(cfg: RunConfig, secured, arrays: ArrayRecord, built, server_round: int, population: int):
    """The new global weights from a securely aggregated round, with central DP noise when asked.

    Under ``central-client-clip`` the clients clipped their updates before masking (the server cannot
    clip what it cannot see); the server adds ``N(0, (zC/m)²)`` to the aggregated mean and accounts
    one Gaussian release, exactly as Flower's wrapper does in the clear, and, as there, a round in which
    fewer than the m sampled updates were aggregated releases nothing (the noise is calibrated to m).
    """
    if secured.update is None:
        return None, None
    if cfg.dp not in ("central-client-clip", "central-server-clip"):
        return secure.apply_update(arrays, secured.update), secured.metrics
    strategy = built.strategy
    getattr(strategy, "_pending_events", {}).pop(server_round, None)  # released (below) or voided here
    if secured.num_aggregated != built.num_sampled:
        say(
            f"round {server_round}: {secured.num_aggregated} of {built.num_sampled} updates aggregated: "
            "nothing released (the DP noise is calibrated to all sampled clients)"
        )
        return None, None
    std = cfg.dp_noise_multiplier * cfg.dp_clipping_norm / built.num_sampled
    noisy = ArrayRecord(
        {
            name: Array(value + np.random.normal(0.0, std, value.shape))
            for name, value in ((name, secured.update[name].numpy()) for name in secured.update)
        }
    )
    built.accountant.compose(privacy.release_event(cfg, built.num_sampled, population))
    return secure.apply_update(arrays, noisy), secured.metrics


def initial_weights(num_features: int, seed: int, transform: scaling.Transform) -> lm.LinearWeights:
    """Keras' Glorot-uniform start, with the coordinates the transform leaves out at zero."""
    weights = lm.initial_weights(num_features, seed)
    weights.kernel[transform.unused, 0] = 0.0
    return weights


def divergence(row: dict[str, Any], baseline: dict[str, Any]) -> str | None:
    """Why the global model after this round counts as diverged, or None."""
    for key, label in (("test-mse", "test MSE"), ("train-mse", "pooled train MSE"), ("train-loss", "train loss")):
        value, base = row.get(key), baseline.get(key)
        if value is None:
            continue
        if not np.isfinite(value):
            return f"has a non-finite {label}"
        if base is not None and np.isfinite(base) and value > DIVERGENCE_FACTOR * max(base, 1e-300):
            return f"has a {label} of {value:.4g}, more than {DIVERGENCE_FACTOR:g} x the initial model's {base:.4g}"
        return None
    return None


def check_target(cfg: RunConfig, evaluate: Evaluator, reference_source: str) -> None:
    """A ``target-mse-ratio`` needs test MSE / the optimum's every round: refuse the run (before round 1)
    when this run cannot compute it. The config already refused ``reference`` = none and no ``test-uri``."""
    if not cfg.target_mse_ratio:
        return
    if evaluate.test is None or evaluate.optimum is None:
        why = "no test set" if evaluate.test is None else f"no pooled least-squares optimum ({reference_source})"
    elif not evaluate.reference.get("test-mse", 0.0) > 0:
        why = "the optimum's test MSE is 0, so the ratio is undefined"
    else:
        return
    raise FedLinearError(f"config key 'target-mse-ratio' needs test MSE / the optimum's, which this run lacks: {why}")


def resolve_learning_rate(
    cfg: RunConfig, pooled: scaling.PooledStats | None, transform: scaling.Transform, sizes: list[int]
) -> tuple[float, str]:
    if cfg.learning_rate != "auto":
        return float(cfg.learning_rate), f"learning rate {float(cfg.learning_rate):g} (set in the config)"
    return scaling.auto_learning_rate(
        scaling.design_second_moment(pooled, transform),
        sizes,
        cfg.batch_size,
        cfg.local_epochs,
        cfg.num_server_rounds,
    )


def run(grid: Grid, context: Context, store: RunStore, cfg: RunConfig) -> None:
    started = time.monotonic()
    store.write_status("running", run_id=context.run_id)
    nodes = wait_for_nodes(grid, cfg)
    say(f"{len(nodes)} nodes connected; querying shards")
    healthy, query_failures, pooled = query_nodes(grid, cfg, nodes)
    num_features = next(iter(healthy.values()))["num-features"]
    test = load_csv(cfg.test_uri, cfg.target_column, cfg.header) if cfg.test_uri else None
    if test is not None and test.num_features != num_features:
        raise FedLinearError(
            f"{cfg.test_uri}: test set has {test.num_features} features but the shards have {num_features}"
        )
    if cfg.strategy == "fedols":  # exact least squares in one round: no training rounds, no checkpoints
        from fedlinear.server import fedols

        return fedols.run(grid, context, store, cfg, healthy, query_failures, pooled, test, started)
    data = data_identity(healthy, test)
    start = resume_or_start(store, cfg, num_features, data)
    pooled, reference_source, training_stats = choose_statistics(cfg, pooled, num_features)
    if start.transform is not None:
        transform = start.transform  # a resumed run keeps the transform it trained in
    else:
        transform = build_transform(cfg, training_stats, num_features)
    for note in transform.notes:
        say(f"standardization: {note}")
    sizes = [int(info["num-examples"]) for info in healthy.values()]
    if start.learning_rate is not None:
        learning_rate, rate_note = start.learning_rate, f"learning rate {start.learning_rate:.4g} (from the checkpoint)"
    else:
        learning_rate, rate_note = resolve_learning_rate(cfg, training_stats, transform, sizes)
    evaluate = Evaluator(test, pooled, transform)
    if evaluate.optimum is not None:
        evaluate.reference["source"] = reference_source
    check_target(cfg, evaluate, reference_source)  # before round 1: a target needs the ratio
    say(
        f"{len(healthy)} shards, {num_features} features, {sum(sizes)} samples; "
        f"standardize = {transform.kind}; {rate_note}"
        + (f"; pooled least-squares test MSE {evaluate.reference['test-mse']:.6g}" if "test-mse" in evaluate.reference else "")
    )

    eligible = {nid: int(info["client-key"]) for nid, info in healthy.items()}
    built = build_strategy(cfg, eligible)
    strategy, accountant = built.strategy, built.accountant
    built.base.task_config = transform_config(transform)  # train and evaluate tasks
    built.base.train_config = {"learning-rate": learning_rate, **local_dp_config(cfg)}
    if cfg.secure_aggregation:  # secure aggregation hook
        say(secure.describe(cfg))
    if cfg.dp != "none":
        say(f"privacy: {privacy.MECHANISMS[cfg.dp]}; z = {cfg.dp_noise_multiplier:g}, C = {cfg.dp_clipping_norm:g}, "
            f"δ = {cfg.dp_delta:g}, {built.num_sampled} of {len(eligible)} clients a round"
            + (f", budget ε <= {cfg.dp_max_epsilon:g}" if cfg.dp_max_epsilon else ""))  # fmt: skip
    weights, start_round, history = start.weights, start.first_round, start.history
    if start_round > 1:
        say(f"resuming after round {start_round - 1} from {store.uri('checkpoints', 'latest.json')}")
    else:
        weights = initial_weights(num_features, cfg.seed, transform)
        history = {"run-id": context.run_id, "rounds": []}
        row = {"round": 0, "elapsed-s": time.monotonic() - started, "clients-ok": 0, "clients-failed": 0}
        row.update(evaluate(weights))
        if accountant is not None:
            row["epsilon"] = 0.0
        history["rounds"].append(row)
    history["reference"] = evaluate.reference
    history["standardization"] = transform.to_json()
    history["learning-rate"] = {"value": learning_rate, "how": rate_note}
    history["target-mse-ratio"] = cfg.target_mse_ratio  # the outcome (reached-target-at, ...) after the rounds
    if accountant is not None and start.accountant_state is not None:
        accountant.load_state_dict(start.accountant_state)  # a resumed run never resets ε
    if start.strategy_state is not None:
        built.load_state_dict(start.strategy_state)  # momentum / moments, the adaptive clipping norm reached
    history["query-failures"] = query_failures
    history["parties"] = [  # the report: who took part, by node id
        {"node-id": nid} | {k: healthy[nid][k] for k in ("client-key", "partition-id", "num-examples") if k in healthy[nid]}
        for nid in _in_key_order(healthy)
    ]
    history.setdefault("resumed-at", [])
    if start_round > 1:
        history["resumed-at"].append(start_round - 1)
    store.write_history(history)
    arrays = to_record(weights)
    checkpoint_state = {
        **trajectory_key(cfg, num_features),
        "data": data,
        "transform": transform.to_json(),
        "resolved-learning-rate": learning_rate,
    }
    baseline = dict(history["rounds"][0])
    failed_in_a_row = 0
    stopped = None
    min_train = participation_floor(cfg, len(eligible), built.num_sampled)  # min-train-nodes as a count

    first_round = start_round
    if cfg.stop_at_target and targets.reached_at(history["rounds"], cfg.target_mse_ratio) is not None:
        first_round = cfg.num_server_rounds + 1  # the checkpoint is the round that reached it: done
    for server_round in range(first_round, cfg.num_server_rounds + 1):
        try:
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            if cfg.dp == "local" and accountant.config.max_epsilon is not None:
                event = privacy.release_event(cfg, len(messages), len(eligible))
                if messages and accountant.would_exceed(event):
                    raise PrivacyBudgetExhausted("the next release would exceed max_epsilon")
        except PrivacyBudgetExhausted:
            stopped = (
                f"training stopped before round {server_round}: its release would take ε past the budget "
                f"dp-max-epsilon = {cfg.dp_max_epsilon:g} (ε spent {privacy.epsilon(accountant, cfg.dp_delta):.4g} "
                f"at δ = {cfg.dp_delta:g}); the model of round {server_round - 1} is the result"
            )
            say(stopped)
            history["stopped"] = {"round": server_round - 1, "reason": stopped}
            break
        except ValueError as exc:  # Flower's DP wrapper: fewer nodes connected than the accounted sample
            messages = []
            say(f"round {server_round}: not configured: {one_line(exc)}")
        secured = None
        if cfg.secure_aggregation and messages:  # secure aggregation hook: SecAgg+ instead of clear replies
            sizes_by_node = {nid: int(info["num-examples"]) for nid, info in healthy.items()}
            secured = secure.train_round(grid, cfg, server_round, messages, sizes_by_node)
            replies, ordered, failures = [], [], secured.failures
        else:
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout)) if messages else []
            replies, stale = answers_to(messages, replies, eligible)  # a late reply of an earlier round is not one
            ordered, failures = fixed_order(replies, eligible)
            failures += stale
            ordered = validated(ordered, failures, healthy, eligible, num_features, arrays, cfg.max_update_norm,
                                cfg.max_update_norm_factor, server_round)  # fmt: skip
            answered = {msg.metadata.src_node_id for msg in replies} | {f["node-id"] for f in stale}
            failures += [
                {"node-id": msg.metadata.dst_node_id, "client-key": eligible.get(msg.metadata.dst_node_id),
                 "reason": f"no reply within 'round-timeout' ({cfg.round_timeout:g} s)"}
                for msg in messages if msg.metadata.dst_node_id not in answered
            ]  # fmt: skip
        if cfg.dp != "none":
            # Flower's wrappers draw noise from NumPy's global RNG: seed it per round (dp-noise-seed)
            private_noise.seed_global_numpy(cfg.dp_noise_seed, cfg.seed, server_round, private_noise.CENTRAL_DP_STREAM)
        valid = secured.num_aggregated if secured is not None else sum(1 for msg in ordered if not msg.has_error())
        too_few = valid < min_train  # min-train-nodes: not aggregated (nor noised, nor accounted centrally)
        if too_few:
            getattr(strategy, "_pending_events", {}).pop(server_round, None)  # Flower's DP wrapper: nothing released
            new_arrays, train_metrics = None, None
        else:
            new_arrays, train_metrics = strategy.aggregate_train(server_round, ordered) if ordered else (None, None)
        if secured is not None and not too_few:  # secure aggregation hook: the aggregate (central DP noise goes on secured.update)
            new_arrays, train_metrics = secure_with_dp(cfg, secured, arrays, built, server_round, len(eligible))
        released = any(not msg.has_error() for msg in ordered) or (secured is not None and secured.num_aggregated > 0)
        if cfg.dp == "local" and released:
            accountant.compose(privacy.release_event(cfg, len(messages), len(eligible)))
        row = {
            "round": server_round,
            "clients-ok": sum(1 for msg in ordered if not msg.has_error())
            + (secured.num_aggregated if secured is not None else 0),  # secure aggregation hook
            "clients-failed": len(failures),
            "failures": failures,
        }
        if len(messages) != len(eligible):  # the report's party x round grid: who was asked (absent: everyone)
            row["sampled"] = sorted(msg.metadata.dst_node_id for msg in messages)
        for failure in failures:  # party-supplied text: one printable line, bounded (common.errors)
            failure["round"] = server_round
            failure["reason"] = untrusted_text(failure["reason"])
        if accountant is not None:
            row["epsilon"] = privacy.epsilon(accountant, cfg.dp_delta)
        if hasattr(strategy, "clipping_norm") and cfg.dp_clipping == "adaptive":
            row["clipping-norm"] = strategy.clipping_norm  # for the next round
            row["unclipped-fraction"] = strategy.last_unclipped_fraction
        for failure in failures:
            say(f"round {server_round}: node {failure['node-id']} failed: {failure['reason']}")
        if new_arrays is None:
            failed_in_a_row += 1
            if too_few:
                row["not-aggregated"] = (
                    f"{valid} valid update(s), fewer than 'min-train-nodes' = {cfg.min_train_nodes:g} ({min_train})"
                )
                say(f"round {server_round}: not aggregated: {row['not-aggregated']}; the global model is unchanged")
            else:
                row["not-aggregated"] = "no client update"
                say(f"round {server_round}: no client update; the global model is unchanged")
        else:
            failed_in_a_row = 0
            arrays = new_arrays
            weights = from_record(arrays)
        if train_metrics is not None:
            row["train-loss"] = float(train_metrics["train-loss"])
            baseline.setdefault("train-loss", row["train-loss"])
        if cfg.fraction_evaluate > 0 and new_arrays is not None:
            eval_replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=cfg.round_timeout
            )
            eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
            if eval_metrics is not None:
                row["eval-mse"] = float(eval_metrics["eval-mse"])
        row.update(evaluate(weights))
        row["elapsed-s"] = time.monotonic() - started
        history["rounds"].append(row)
        diverged = "has non-finite weights" if not np.isfinite(weights.vector()).all() else divergence(row, baseline)
        if diverged:
            history["stopped"] = {"round": server_round, "reason": f"diverged: {diverged}"}
            store.write_history(history)
            say(progress_line(row))
            raise FedLinearError(
                f"training diverged in round {server_round}: the global model {diverged}; no model was exported. "
                f"Lower 'learning-rate' (now {learning_rate:.4g}) or set 'standardize' = auto"
                + (" (now none)" if transform.kind == "none" else "")
                + ", and start again in a new run-dir"
            )
        store.write_history(history)  # history first: a checkpoint never runs ahead of the history
        if accountant is not None:
            checkpoint_state["accountant"] = accountant.state_dict()
        checkpoint_state["strategy-state"] = built.state_dict()
        store.write_checkpoint(server_round, weights, checkpoint_state)
        say(progress_line(row))
        if failed_in_a_row >= cfg.max_failed_rounds:
            last = failures[-1]["reason"] if failures else row.get("not-aggregated", "no replies within 'round-timeout'")
            raise FedLinearError(
                f"no client update was aggregated in {failed_in_a_row} consecutive rounds "
                f"(config key 'max-failed-rounds' = {cfg.max_failed_rounds}); last failure: {last}. "
                f"Fix the cause and run the same command again to resume after round {server_round}"
            )
        if cfg.stop_at_target and targets.reached(row, cfg.target_mse_ratio):
            break  # this round is checkpointed: it is the result

    outcome = targets.outcome(history["rounds"], cfg.target_mse_ratio, cfg.stop_at_target)
    history.update(outcome)
    target_lines = targets.summary_lines(history, cfg.num_server_rounds)
    if outcome["stopped-at-target"]:
        history["stopped"] = {"round": history["rounds"][-1]["round"], "reason": "; ".join(target_lines)}
    store.write_history(history)
    for line in target_lines:
        say(line)
    raw_kernel, raw_bias = transform.to_raw(weights.kernel, float(weights.bias[0]))
    exported = lm.LinearWeights(
        kernel=raw_kernel.astype(np.float32).reshape(-1, 1), bias=np.array([raw_bias], dtype=np.float32)
    )
    model_uri = store.uri("model")
    export_savedmodel(exported, model_uri)
    final = {k: v for k, v in history["rounds"][-1].items() if k not in ("failures", "sampled")}
    manifest = {
        "run-id": context.run_id,
        "config": cfg.as_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "num-features": num_features,
        "weights": {"kernel": raw_kernel.tolist(), "bias": raw_bias},
        "exported-weights": {"kernel": exported.kernel.ravel().tolist(), "bias": float(exported.bias[0])},
        "standardized-weights": {"kernel": weights.kernel.ravel().tolist(), "bias": float(weights.bias[0])},
        "standardization": transform.to_json(),
        "learning-rate": {"value": learning_rate, "how": rate_note},
        "privacy": privacy.summary(cfg, accountant, stopped),
        "model": model_uri,
        **manifest_data(healthy, test),
        "reference": evaluate.reference,
        "final": final,
        "query-failures": query_failures,
        "wall-time-s": time.monotonic() - started,
        **outcome,
    }
    store.write_manifest(manifest)
    store.write_status("completed", stopped or (history["stopped"]["reason"] if outcome["stopped-at-target"] else ""),
                       run_id=context.run_id)  # fmt: skip
    say(f"done: model exported to {model_uri}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: errors a user can fix end the run with one line in status.json."""
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        store = RunStore(cfg.resolved_run_dir(context.run_id), background=True)
        say(f"run {context.run_id}: writing to {store.run_dir}")
        previous = store.read_status()
        if previous is not None and previous.get("status") == "completed":
            # refused before anything is written: the completed run's files stay as they are
            raise FedLinearError(
                f"{store.run_dir} already holds a completed run (status.json); choose another run-dir or remove it"
            )
    except FedLinearError as exc:
        say(f"error: {one_line(exc)}")
        raise SystemExit(1) from None
    try:
        run(grid, context, store, cfg)
    except FedLinearError as exc:
        message = one_line(exc)
        say(f"error: {message}")
        with contextlib.suppress(Exception):
            store.write_status("failed", message, run_id=context.run_id)
        raise SystemExit(1) from None
    except BaseException as exc:
        with contextlib.suppress(Exception):
            store.write_status("failed", one_line(exc), run_id=context.run_id)
        raise
    finally:
        sys.stdout.flush()
