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
import json
import logging
import platform
import sys
import time
from importlib import metadata
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import model as lm
from common.config import RunConfig
from common.data import Dataset, load_csv
from common.errors import FedLinearError, one_line
from common.export import export_savedmodel
from common.runstore import RunStore
from common.storage import fingerprint
from server.strategy import build_strategy

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


def query_nodes(grid: Grid, cfg: RunConfig, nodes: list[int]) -> tuple[dict[int, dict], list[dict], lm.SufficientStats | None]:
    """Ask each node about its shard; return (healthy node -> info, failures, pooled stats)."""
    want_stats = cfg.reference == "auto"
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"want-stats": want_stats})}),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    answered = {msg.metadata.src_node_id for msg in replies}
    healthy: dict[int, dict] = {}
    failures = [{"node-id": nid, "reason": "no reply to the shard query"} for nid in nodes if nid not in answered]
    stats_by_node: dict[int, lm.SufficientStats] = {}
    for msg in replies:
        nid = msg.metadata.src_node_id
        if msg.has_error():
            failures.append({"node-id": nid, "reason": msg.error.reason})
            continue
        info = dict(msg.content["shard"])
        info["fingerprints"] = [json.loads(fp) for fp in info.get("fingerprints", [])]
        healthy[nid] = info
        if want_stats and "stats" in msg.content:
            arrays = msg.content["stats"]
            stats_by_node[nid] = lm.SufficientStats(
                gram=arrays["gram"].numpy(),
                moment=arrays["moment"].numpy(),
                yty=float(arrays["yty"].numpy()[0]),
                count=int(info["num-examples"]),
            )
    for failure in failures:
        say(f"node {failure['node-id']} left out: {failure['reason']}")
    if not healthy:
        raise FedLinearError(
            "no node could read its shard: " + "; ".join(f"node {f['node-id']}: {f['reason']}" for f in failures)
        )
    widths = {info["num-features"] for info in healthy.values()}
    if len(widths) > 1:
        detail = ", ".join(
            f"node {nid} ({info['data-uri']}): {info['num-features']}" for nid, info in sorted(healthy.items())
        )
        raise FedLinearError(f"shards disagree on the number of features: {detail}")
    pooled = None
    if want_stats and len(stats_by_node) == len(healthy):
        pooled = None
        for nid in sorted(stats_by_node, key=lambda n: healthy[n]["client-key"]):
            pooled = stats_by_node[nid] if pooled is None else pooled + stats_by_node[nid]
    return healthy, failures, pooled


class Evaluator:
    """Centralized evaluation of the global model: test MSE and the gap to least squares."""

    def __init__(self, test: Dataset | None, pooled: lm.SufficientStats | None) -> None:
        self.test = test
        self.pooled = pooled
        self.optimum = pooled.solve() if pooled is not None else None
        self.reference: dict[str, Any] = {}
        if self.optimum is not None:
            self.reference["train-mse"] = pooled.mse(self.optimum)
            self.reference["weights"] = self.optimum.vector().tolist()
            self.reference["num-examples"] = pooled.count
            if test is not None:
                self.reference["test-mse"] = lm.mse(self.optimum, test.x, test.y)

    def __call__(self, weights: lm.LinearWeights) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.test is not None:
            out["test-mse"] = lm.mse(weights, self.test.x, self.test.y)
        if self.optimum is not None:
            out["train-mse"] = self.pooled.mse(weights)
            out["excess-train-mse"] = out["train-mse"] - self.reference["train-mse"]
            out["weight-distance"] = float(np.linalg.norm(weights.vector() - self.optimum.vector()))
            if "test-mse" in out:
                ref = self.reference["test-mse"]
                out["reference-test-mse"] = ref
                out["excess-test-mse"] = out["test-mse"] - ref
                out["test-mse-ratio"] = out["test-mse"] / ref if ref > 0 else float("nan")
        return out


def progress_line(row: dict[str, Any]) -> str:
    parts = [f"round {row['round']:>3}"]
    for key, label in (
        ("train-loss", "train loss"),
        ("test-mse", "test MSE"),
        ("test-mse-ratio", "/ LS"),
        ("excess-train-mse", "excess train MSE"),
        ("weight-distance", "|w - w*|"),
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


# What must match for a checkpoint to continue the same trajectory (num-server-rounds may grow).
TRAJECTORY_KEYS = ("seed", "learning-rate", "batch-size", "local-epochs", "fraction-train", "engine")


def trajectory_key(cfg: RunConfig, num_features: int) -> dict[str, Any]:
    settings = cfg.as_dict()
    return {"num-features": num_features, **{key: settings[key] for key in TRAJECTORY_KEYS}}


def resume_or_start(store: RunStore, cfg: RunConfig, num_features: int) -> tuple[lm.LinearWeights, int, dict]:
    """The weights and first round to run: from the last checkpoint if the run dir has one.

    Sampling and batch order are functions of (seed, round, client), not of RNG state carried
    across rounds, so a resumed run continues exactly as the uninterrupted run would have.
    """
    latest = store.read_latest_checkpoint()
    if latest is None:
        return lm.initial_weights(num_features, cfg.seed), 1, {}
    pointer, weights = latest
    expected = trajectory_key(cfg, num_features)
    changed = [key for key, value in expected.items() if pointer.get(key) != value]
    if changed:
        detail = ", ".join(f"{key} {pointer.get(key)!r} -> {expected[key]!r}" for key in changed)
        raise FedLinearError(
            f"{store.run_dir} holds checkpoints of a different run ({detail}); "
            "resume with the same settings or choose another run-dir"
        )
    done = int(pointer["round"])
    history = store.read_history()
    history["rounds"] = [row for row in history["rounds"] if row["round"] <= done]
    return weights, done + 1, history


def run(grid: Grid, context: Context, store: RunStore, cfg: RunConfig) -> None:
    started = time.monotonic()
    previous = store.read_status()
    if previous is not None and previous.get("status") == "completed":
        raise FedLinearError(
            f"{store.run_dir} already holds a completed run (status.json); choose another run-dir or remove it"
        )
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
    evaluate = Evaluator(test, pooled)
    say(
        f"{len(healthy)} shards, {num_features} features, "
        f"{sum(i['num-examples'] for i in healthy.values())} samples"
        + (f"; pooled least-squares test MSE {evaluate.reference['test-mse']:.6g}" if "test-mse" in evaluate.reference else "")
    )

    strategy = build_strategy(cfg, {nid: int(info["client-key"]) for nid, info in healthy.items()})
    weights, start_round, history = resume_or_start(store, cfg, num_features)
    if start_round > 1:
        say(f"resuming after round {start_round - 1} from {store.uri('checkpoints', 'latest.json')}")
    else:
        history = {"run-id": context.run_id, "rounds": []}
        row = {"round": 0, "elapsed-s": time.monotonic() - started, "clients-ok": 0, "clients-failed": 0}
        row.update(evaluate(weights))
        history["rounds"].append(row)
    history["reference"] = evaluate.reference
    history["query-failures"] = query_failures
    history.setdefault("resumed-at", [])
    if start_round > 1:
        history["resumed-at"].append(start_round - 1)
    store.write_history(history)
    arrays = to_record(weights)

    for server_round in range(start_round, cfg.num_server_rounds + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=cfg.round_timeout
        )
        replies = list(replies)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        failures = strategy.last_failures
        row = {
            "round": server_round,
            "clients-ok": len(replies) - len(failures),
            "clients-failed": len(failures),
            "failures": failures,
        }
        for failure in failures:
            say(f"round {server_round}: node {failure['node-id']} failed: {failure['reason']}")
        if new_arrays is None:
            say(f"round {server_round}: no client update; the global model is unchanged")
        else:
            arrays = new_arrays
            weights = from_record(arrays)
        if train_metrics is not None:
            row["train-loss"] = float(train_metrics["train-loss"])
        if cfg.fraction_evaluate > 0:
            eval_replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=cfg.round_timeout
            )
            eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
            if eval_metrics is not None:
                row["eval-mse"] = float(eval_metrics["eval-mse"])
        row.update(evaluate(weights))
        row["elapsed-s"] = time.monotonic() - started
        history["rounds"].append(row)
        store.write_history(history)  # history first: a checkpoint never runs ahead of the history
        store.write_checkpoint(server_round, weights, trajectory_key(cfg, num_features))
        say(progress_line(row))

    model_uri = store.uri("model")
    export_savedmodel(weights, model_uri)
    final = {k: v for k, v in history["rounds"][-1].items() if k not in ("failures",)}
    manifest = {
        "run-id": context.run_id,
        "config": cfg.as_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "num-features": num_features,
        "weights": {"kernel": weights.kernel.ravel().tolist(), "bias": float(weights.bias[0])},
        "model": model_uri,
        "shards": [
            {k: healthy[nid][k] for k in ("data-uri", "num-examples", "fingerprints", "partition-id") if k in healthy[nid]}
            for nid in sorted(healthy, key=lambda n: healthy[n]["client-key"])
        ],
        "test-set": [fingerprint(uri) for uri in test.sources] if test is not None else [],
        "reference": evaluate.reference,
        "final": final,
        "query-failures": query_failures,
        "wall-time-s": time.monotonic() - started,
    }
    store.write_manifest(manifest)
    store.write_status("completed", run_id=context.run_id)
    say(f"done: model exported to {model_uri}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: errors a user can fix end the run with one line in status.json."""
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        store = RunStore(cfg.resolved_run_dir(context.run_id), background=True)
        say(f"run {context.run_id}: writing to {store.run_dir}")
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
