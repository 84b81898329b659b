"""A whole fedlinear run in one process: the real ServerApp ``run`` driving the real ClientApp
handlers through a grid that delivers each message by calling the handler (no SuperLink, no Ray).

Fast enough to check accuracy on many data sets; the federations in test_e2e.py check the same app
over Flower's real runtime.
"""

from __future__ import annotations

import contextlib
import os

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlinear.clients import client_app as ca
from fedlinear.common.config import RunConfig
from fedlinear.common.runstore import RunStore
from fedlinear.server import server_app


class InProcessGrid:
    """``get_node_ids`` / ``send_and_receive`` over in-process nodes, one per shard URI.

    ``sabotage(node_id, message)`` may return a reply to use instead of the node's (fault injection).
    ``received`` holds every reply the ServerApp got, in the order of ``sent`` (what crossed the wire).
    """

    def __init__(self, shard_uris: list[str], run_config: dict, sabotage=None) -> None:
        self.nodes = {1000 + i: {"partition-id": i, "num-partitions": len(shard_uris), "data-uri": uri}
                      for i, uri in enumerate(shard_uris)}  # fmt: skip
        self.run_config = run_config
        self.sabotage = sabotage
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            if not msg.metadata.message_id:  # as Flower's grid does when it pushes a message
                msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            context = Context(
                run_id=1, node_id=nid, node_config=dict(self.nodes[nid]), state=RecordDict(), run_config=self.run_config
            )
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, nid, len(self.sent)
            reply = self.sabotage(nid, msg) if self.sabotage else None
            if reply is None:
                reply = ca.app(msg, context)  # dispatch as Flower does, with each handler's mods
            self.received.append(reply)
            replies.append(reply)
        return replies


class Crash(BaseException):
    """A simulated crash of the server process (a BaseException: nothing in the app may catch it)."""


def crash_after(train_tasks: int):
    """A ``sabotage`` that crashes the run when the server sends train task number ``train_tasks + 1``."""
    sent = []

    def sabotage(node_id, msg):
        if msg.metadata.message_type == "train":
            sent.append(node_id)
            if len(sent) > train_tasks:
                raise Crash
        return None

    return sabotage


def write_synthetic_shards(root, clients: int, samples: int, features: int, seed: int, test_samples: int,
                           sizes: list[int] | None = None) -> tuple[list[str], str]:
    """``client-<i>.csv`` shards (the first ``sizes[i]`` rows of each, if given) and ``test.csv`` under ``root``."""
    from fedlinear.common.csvio import to_csv_bytes
    from fedlinear.common.synth import make_synthetic

    parts, test, _ = make_synthetic(clients, samples, features, 0.1, seed, test_samples)
    os.makedirs(str(root), exist_ok=True)
    uris = []
    for i, part in enumerate(parts):
        size = sizes[i] if sizes else part.num_examples
        uri = os.path.join(str(root), f"client-{i}.csv")
        with open(uri, "wb") as handle:
            handle.write(to_csv_bytes(part.x[:size], part.y[:size]))
        uris.append(uri)
    test_uri = os.path.join(str(root), "test.csv")
    with open(test_uri, "wb") as handle:
        handle.write(to_csv_bytes(test.x, test.y))
    return uris, test_uri


def drive(grid, run_config: dict) -> RunStore:
    """Run the real ServerApp ``run`` over ``grid`` in this process (exceptions propagate); its store."""
    cfg = RunConfig.from_run_config(run_config)
    store = RunStore(cfg.run_dir)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - progress lines
            server_app.run(grid, context, store, cfg)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
        ca._SHARDS.clear()
        ca._TRANSFORMED.clear()
    return store


def run_in_process(
    shard_uris: list[str], run_dir: str, sabotage=None, grids: list | None = None, **config
) -> tuple[str, dict | None]:
    """Run fedlinear in-process; return (status, manifest or None). ``grids``, if given, receives the grid."""
    run_config = {"run-dir": run_dir, "min-available-nodes": len(shard_uris), **config}
    grid = InProcessGrid(shard_uris, run_config, sabotage)
    if grids is not None:
        grids.append(grid)
    store = RunStore(run_dir)
    try:
        drive(grid, run_config)
    except Exception as exc:  # the ServerApp's main() turns this into status failed
        store.write_status("failed", str(exc))
    status = store.read_status()
    manifest = store.read_manifest() if status["status"] == "completed" else None
    return status, manifest
