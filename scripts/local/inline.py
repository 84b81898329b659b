"""``--mode inline``: the whole federation in this process, without Flower's runtime.

The fastest way to run experiments on one machine, not a test of Flower's runtime: no SuperLink, no
SuperNodes, no Ray. What runs is the app's own code, found as Flower finds it (the ``serverapp`` and
``clientapp`` components of the app's ``pyproject.toml``): the ServerApp object is called with a
:class:`InlineGrid` and a Context as ``flwr-serverapp`` would call it, and every task is handed to
the ClientApp object (its handlers and mods) with the node's own Context, as ``flwr-clientapp`` does.

What crosses between them is what crosses the wire in Flower 1.42's deployment runtime, byte for
byte (:class:`Packet`): the message's metadata as the protobuf ``Message`` without content
(``message_to_proto(remove_content_from_message(msg))``), its object tree, and every object of the
tree deflated (``InflatableObject.deflate``); the tasks of one ``push_messages`` call are packed as
``HttpGrid.push_messages`` packs them (:class:`PushBatch`: objects they share hashed and deflated once,
the same bytes for every node). The receiving side checks what the SuperLink checks
(each object's id is the SHA-256 of its bytes, ``validate_object_content``; the message itself with
``validate_message``, a reply against the task it answers) and inflates the message from those bytes
alone (``inflate_object_from_contents``), so no Python object is shared between the two sides and a
message that would not survive a real federation does not survive here. Each node's Context lives
between tasks as the bytes of ``context_to_proto``, as a SuperNode keeps it (``context.state``
persists: SecAgg+ keeps its keys there). The run config is fused from the app's defaults and the
overrides with Flower's own functions (``parse_config_args``, ``get_fused_config_from_dir``), so
the ServerApp and ClientApp see the same typed values as in the other modes; node configs carry
``partition-id`` and ``num-partitions`` as in the simulation engine (and ``data-uri`` when shards are
given one by one, as in processes mode).

Clients run in a pool (``workers``): the calling thread (1), threads, or worker processes. See
:func:`resolve_pool` for what is used when. Tasks of one node never run concurrently (a SuperNode
runs one task at a time); a reply that arrives after the ServerApp stopped waiting for it is
dropped, as the SuperLink would keep it unpulled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.config import get_fused_config_from_dir, get_project_config, parse_config_args
from flwr.common.constant import NODE_ID_NUM_BYTES, RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
    user_config_from_proto,
    user_config_to_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.message_pb2 import ObjectTree
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_id,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, validate_object_content
from flwr.supercore.object_ref import load_app
from flwr.supercore.task_identity import TaskIdentity
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local.flower import config_string
from fedlinear.scripts.local.spec import PROGRESS_MARK, LaunchSpec, RunInterrupted

POOLS = ("auto", "serial", "threads", "processes")


# ------------------------------------------------------------------------------------------------
# The wire: what Flower 1.42's runtime sends for a message, and the checks it makes on arrival
# ------------------------------------------------------------------------------------------------


class WireError(ValueError):
    """A message that Flower's runtime would not deliver (bad object, bad metadata)."""


@dataclasses.dataclass(frozen=True)
class Packet:
    """One message as it crosses the wire: ``message`` (protobuf ``Message`` without content),
    ``tree`` (protobuf ``ObjectTree``) and ``objects`` (object id -> deflated bytes)."""

    message: bytes
    tree: bytes
    objects: dict[str, bytes]

    @property
    def size(self) -> int:
        return len(self.message) + len(self.tree) + sum(map(len, self.objects.values()))


def pack(msg, batch: PushBatch | None = None) -> Packet:
    """``msg`` as Flower's grid (server side) or ``flwr-clientapp`` (reply) pushes it; sets its message id.

    ``batch``: the messages of one ``push_messages`` call share it (see :class:`PushBatch`); without
    it, ``msg`` is packed on its own (a reply, as ``flwr-clientapp`` pushes one message).
    """
    if batch is None:
        with no_object_id_recompute():  # as HttpGrid.push_messages / push_message: each object hashed once
            return _pack(msg, PushBatch())
    return _pack(msg, batch)


def _pack(msg, batch: PushBatch) -> Packet:
    msg.metadata.__dict__["_message_id"] = msg.object_id
    proto = message_to_proto(remove_content_from_message(msg)).SerializeToString()
    tree = batch.tree(msg).SerializeToString()
    objects = {oid: batch.content(oid, obj) for oid, obj in get_all_nested_objects(msg).items()}
    return Packet(proto, tree, objects)


class PushBatch:
    """What Flower's ``HttpGrid.push_messages`` computes once for all the messages of one call.

    Flower 1.42 pushes a batch inside one ``no_object_id_recompute()`` context (each object's id is
    computed once for the whole batch: the RecordDict that FedAvg's ``_construct_messages`` gives
    every message is hashed once, not once per message), gathers the objects of all messages into
    one dict keyed by object id, and deflates each distinct object once (``push_objects``); the
    SuperLink stores it once and each node pulls those same bytes. So here: one deflation per
    distinct object id (every packet of the batch holds the same ``bytes``) and one subtree per
    object id (an id fixes the object's bytes, hence its children's ids). Use it as a context
    manager (``with PushBatch() as batch``), which enters ``no_object_id_recompute()``.
    """

    def __init__(self) -> None:
        self._contents: dict[str, bytes] = {}
        self._trees: dict[str, ObjectTree] = {}
        self._context: Any = None

    def __enter__(self) -> PushBatch:
        self._context = no_object_id_recompute()
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def content(self, object_id: str, obj) -> bytes:
        content = self._contents.get(object_id)
        if content is None:
            content = self._contents[object_id] = obj.deflate()
        return content

    def tree(self, obj) -> ObjectTree:
        """``get_object_tree(obj)``, each distinct subtree built once."""
        object_id = obj.object_id
        tree = self._trees.get(object_id)
        if tree is None:
            children = obj.children
            tree = ObjectTree(object_id=object_id, children=[self.tree(child) for child in (children or {}).values()])
            self._trees[object_id] = tree
        return tree


def unpack(packet: Packet, is_reply: bool):
    """The Message a receiver inflates from ``packet`` alone; WireError for what the SuperLink refuses."""
    try:
        header = message_from_proto(ProtoMessage.FromString(packet.message))
        tree = ObjectTree.FromString(packet.tree)
        errors = validate_message(header, is_reply_message=is_reply)  # the SuperLink's PushMessages check
        if errors:
            raise WireError("; ".join(errors))
        if header.metadata.message_id != tree.object_id:
            raise WireError("the message id is not its object id")
        contents: dict[str, bytes] = {}
        for node in iterate_object_tree(tree):
            content = packet.objects.get(node.object_id)
            if content is None:
                raise WireError(f"object {node.object_id} of the tree was not sent")
            if get_object_id(content) != node.object_id:  # ObjectStore.put
                raise WireError(f"object {node.object_id} does not match its content hash")
            validate_object_content(content)
            contents[node.object_id] = content
        message = inflate_object_from_contents(tree.object_id, contents)
    except WireError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes make Flower raise: not deliverable
        raise WireError(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(message, Message):
        raise WireError(f"the tree's root is a {type(message).__name__}, not a Message")
    message.metadata.__dict__["_message_id"] = tree.object_id  # as pull_task_input / HttpGrid.pull_messages
    return message


@dataclasses.dataclass(frozen=True)
class NodeContext:
    """A node's Context between tasks: ``state`` as the bytes of the protobuf ``RecordDict`` that
    ``context_to_proto`` writes for ``context.state``; the configs (fixed for the run) as
    ``context_from_proto`` reads them back."""

    run_id: int
    node_id: int
    node_config: dict[str, Any]
    run_config: dict[str, Any]
    state: bytes

    @classmethod
    def of(cls, context: Context) -> NodeContext:
        proto = context_to_proto(context)
        return cls(context.run_id, context.node_id, user_config_from_proto(proto.node_config),
                   user_config_from_proto(proto.run_config), proto.state.SerializeToString())  # fmt: skip

    def with_state(self, context: Context) -> NodeContext:
        return dataclasses.replace(self, state=recorddict_to_proto(context.state).SerializeToString())

    def context(self) -> Context:
        return Context(run_id=self.run_id, node_id=self.node_id, node_config=dict(self.node_config),
                       state=recorddict_from_proto(ProtoRecordDict.FromString(self.state)),
                       run_config=dict(self.run_config))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The node side: one task, as flwr-clientapp runs it
# ------------------------------------------------------------------------------------------------

_CLIENT_APPS: dict[tuple[str, str], Any] = {}


def load_component(app_dir: str, name: str):
    """The app's ``serverapp`` / ``clientapp`` object, as its pyproject names it (Flower's loader)."""

    ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"][name]
    module_name, _, attributes = ref.partition(":")
    try:  # an installed module (fedlinear's own apps): nothing goes on sys.path
        found = importlib.import_module(module_name)
    except ModuleNotFoundError:  # another app's folder: Flower's loader puts it on sys.path, as flwr run does
        return load_app(ref, FedLinearError, app_dir)
    for attribute in attributes.split("."):
        found = getattr(found, attribute)
    return found


def client_app(app_dir: str, ref: str):
    key = (app_dir, ref)
    if key not in _CLIENT_APPS:
        _CLIENT_APPS[key] = load_component(app_dir, ref)
    return _CLIENT_APPS[key]


def run_task(app_dir: str, packet: Packet, context: NodeContext) -> tuple[Packet | None, NodeContext | None, str]:
    """Deliver one task to the ClientApp: (reply packet or None, updated node context or None, note).

    As ``flwr-clientapp``: the message and the context are inflated from bytes, the ClientApp object
    is called, an exception becomes an error reply (the context is then left as it was, as the
    simulation engine does), the reply is pushed as bytes.
    """

    try:
        message = unpack(packet, is_reply=False)
    except WireError as exc:
        return None, None, f"task not delivered: {exc}"
    ctx = context.context()
    updated = None
    try:
        reply = client_app(app_dir, "clientapp")(message=message, context=ctx)
        updated = context.with_state(ctx)
    except Exception as ex:  # noqa: BLE001 - as flwr-clientapp: reported to the server as an error reply
        reply = Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(type(ex)) + ":<'" + str(ex) + "'>"),
            reply_to=message,
        )
    try:
        return pack(reply), updated, ""
    except Exception as exc:  # noqa: BLE001 - a reply that cannot be serialised never leaves the node
        return None, updated, f"reply not sent: {type(exc).__name__}: {exc}"


def _worker_init(app_dir: str, parent: int) -> None:
    """A worker process's start: it dies with the process that runs the federation, leaves Ctrl-C to
    it, and imports the ClientApp once.

    A worker in the middle of a long task (a straggler, a user's slow ClientApp) would otherwise
    outlive a killed run until that task ends, holding the run directory's lock (inherited with the
    fork) and keeping the next ``fedlinear run`` from resuming; on Linux it gets SIGKILL when its parent
    dies (``PR_SET_PDEATHSIG``), and one whose parent died before that was set exits at once. SIGINT is
    ignored: the parent's Ctrl-C ends the run and :meth:`_ProcessPool.close` ends the workers.
    """
    from fedlinear.scripts.local.processes import die_with

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with(parent)  # not Linux: the workers end when their queue closes
    client_app(app_dir, "clientapp")  # the imports, once per worker process


def _processes_task(args: tuple[str, Packet, NodeContext]) -> tuple[Packet | None, NodeContext | None, str]:
    return run_task(*args)


def _processes_chunk(chunk: list[tuple[str, Packet, NodeContext]]) -> list[tuple[Packet | None, NodeContext | None, str]]:
    """Several tasks in one worker call: one pickle each way for the lot, so the bytes the tasks share
    (the objects of one push, the run config) cross once per chunk, not once per task."""
    return [run_task(*args) for args in chunk]


# ------------------------------------------------------------------------------------------------
# Pools
# ------------------------------------------------------------------------------------------------


class _SerialPool:
    """Runs each task in the calling thread when it is submitted."""

    size = 1

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the waiter (Ctrl-C is not: it ends the run)
            future.set_exception(exc)
        return future

    def close(self) -> None:
        pass


class _ThreadPool:
    """Daemon worker threads (a straggling task never holds the interpreter's exit)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"fedlinear-inline-{i}", daemon=True) for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                future.set_exception(exc)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class _ProcessPool:
    """Worker processes (``multiprocessing``); :meth:`close` ends them, stragglers included."""

    def __init__(self, size: int, app_dir: str) -> None:
        self.size = size
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._pool = multiprocessing.get_context(method).Pool(size, initializer=_worker_init,
                                                              initargs=(app_dir, os.getpid()))  # fmt: skip

    def submit(self, fn: Callable, *args) -> Future:
        assert fn is run_task
        future: Future = Future()
        future.set_running_or_notify_cancel()
        self._pool.apply_async(
            _processes_task, (args,), callback=future.set_result, error_callback=future.set_exception
        )
        return future

    def submit_many(self, fn: Callable, calls: list[tuple]) -> list[Future]:
        """``[submit(fn, *args) for args in calls]``, the calls handed to the workers in chunks
        (about :data:`CHUNKS_PER_WORKER` per worker; one call per chunk when there are few)."""
        assert fn is run_task
        futures: list[Future] = [Future() for _ in calls]
        step = min(MAX_CHUNK, max(1, -(-len(calls) // (self.size * CHUNKS_PER_WORKER))))
        for start in range(0, len(calls), step):
            part = futures[start : start + step]
            for future in part:
                future.set_running_or_notify_cancel()
            self._pool.apply_async(
                _processes_chunk, (calls[start : start + step],),
                callback=functools.partial(_set_results, part), error_callback=functools.partial(_set_exception, part),
            )  # fmt: skip
        return futures

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


# Chunks a push is cut into per worker process: several, so that the parent accepts the replies of one
# chunk while the workers run the next, and a straggling task holds up only the rest of its chunk.
CHUNKS_PER_WORKER = 8
# ... and at most this many tasks a chunk: a task that outlasts 'round-timeout' makes the tasks behind it in
# its chunk late too (their replies are then dropped as late, where a real federation would have them),
# so with 1000 nodes on 2 workers (62 a chunk otherwise) a straggler costs at most 31 other replies.
# (1000 x 4 on a quiet 2-core machine: 905-1042 updates/s with it, 975-1014 without; 16 cost ~12 %.)
MAX_CHUNK = 32


def _set_results(futures: list[Future], results: list) -> None:
    for future, result in zip(futures, results, strict=True):
        future.set_result(result)


def _set_exception(futures: list[Future], exc: BaseException) -> None:
    for future in futures:
        future.set_exception(exc)


def resolve_pool(kind: str, workers: int | None, run_config: dict[str, Any], num_nodes: int) -> tuple[str, int]:
    """(pool kind, size). ``auto``: see docs/how-to/scaling.md ("Inline mode").

    Threads are used only where tasks cannot see each other: the ``keras`` engine shares one compiled
    model per process and SecAgg+ seeds NumPy's global RNG for its stochastic rounding, so those run
    serially in threads mode (processes give each worker its own).
    """
    if kind not in POOLS:
        raise FedLinearError(f"--pool must be one of {', '.join(POOLS)}, got '{kind}'")
    if workers is not None and workers < 1:
        raise FedLinearError(f"--workers must be >= 1, got {workers}")
    shared_state = str(run_config.get("engine", "numpy")) == "keras" or bool(run_config.get("secure-aggregation"))
    cores = usable_cores()
    if kind == "auto":
        kind = auto_pool(run_config, num_nodes)
    size = workers or min(cores, num_nodes)
    if kind == "serial" or size == 1:
        return "serial", 1
    if kind == "threads" and shared_state:
        return "serial", 1
    return kind, size


# `auto`: worker processes from this many nodes on, when the machine has more than one usable core
# (measured on a quiet 2-core machine, docs/how-to/scaling.md "Inline mode": 100 x 5 is faster serial,
# the workers' start-up costing more than they save; 300 x 5, 500 x 5, 1000 x 3 and 10000 x 3 are faster
# with them). Below it, and for what forking could break, the calling thread.
AUTO_PROCESSES_NODES = 256


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_pool(run_config: dict[str, Any], num_nodes: int) -> str:
    """What ``--pool auto`` runs: ``processes`` for a federation of at least :data:`AUTO_PROCESSES_NODES`
    nodes on the ``numpy`` engine with two or more usable cores on Linux, else ``serial``. Never
    processes where the workers would be forked from a process that has TensorFlow loaded (the ``keras``
    engine, an app that imports it, a notebook that did): TensorFlow's threads do not survive a fork.
    Called once the app's components are imported."""
    if num_nodes < AUTO_PROCESSES_NODES or usable_cores() < 2 or not sys.platform.startswith("linux"):
        return "serial"  # (elsewhere a fork may not be safe: macOS's system libraries)
    if str(run_config.get("engine", "numpy")) != "numpy" or "tensorflow" in sys.modules:
        return "serial"
    return "processes"


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Node:
    node_id: int
    context: NodeContext  # as a SuperNode keeps it between tasks
    busy: bool = False
    waiting: list = dataclasses.field(default_factory=list)


class InlineGrid(Grid):
    """Flower's ``Grid`` over in-process nodes (one per node config), every message through :class:`Packet`.

    ``intercept(node_id, message)``, if given, sees each task as the node received it and may return
    a reply Message to send instead of the node's (tests: fault injection); ``deadline`` (monotonic
    seconds) bounds every wait. With ``record=True``, ``sent`` / ``received`` keep the tasks as the
    nodes inflated them and the replies as the ServerApp got them, in the order they crossed.
    """

    def __init__(
        self,
        app_dir: str,
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any],
        run_id: int,
        pool: str = "serial",
        workers: int = 1,
        intercept: Callable | None = None,
        deadline: float | None = None,
        record: bool = False,
        node_ids: list[int] | None = None,
    ) -> None:
        self.app_dir = app_dir
        self.run_id = run_id
        self.intercept = intercept
        self.deadline = deadline
        self.timeout = None if deadline is None else deadline - time.monotonic()
        self.record = record
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.dropped: list[str] = []  # why a message did not cross (what the SuperLink would log)
        ids = node_ids or _random_node_ids(len(node_configs))
        self.nodes: dict[int, _Node] = {}
        shared: dict[str, Any] | None = None
        for nid, conf in zip(ids, node_configs, strict=True):
            context = Context(run_id=run_id, node_id=nid, node_config=dict(conf), state=RecordDict(),
                              run_config=dict(run_config))  # fmt: skip
            node_context = NodeContext.of(context)
            if shared is None:
                shared = node_context.run_config
            elif node_context.run_config == shared:  # one dict for all (never mutated: context() copies it),
                node_context = dataclasses.replace(node_context, run_config=shared)  # pickled once per chunk
            self.nodes[nid] = _Node(nid, node_context)
        self._lock = threading.Lock()
        self._replies: dict[str, Future] = {}  # message id -> future of the reply Message (None: no reply)
        self._run = None
        if pool == "threads":
            self._pool: Any = _ThreadPool(workers)
        elif pool == "processes":
            self._pool = _ProcessPool(workers, app_dir)
        else:
            self._pool = _SerialPool()

    # Flower's Grid interface -----------------------------------------------------------------

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=nid) for nid in self.nodes]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        check_deadline(self.deadline, self.timeout)
        with PushBatch() as batch:  # as HttpGrid.push_messages: one context, each distinct object once
            packed = [(msg, pack(msg, batch)) for msg in messages]
        # delivered once all are packed (as the SuperLink has them all before a node pulls one), outside
        # the batch's context: a node's own object ids are never taken from it
        starts: list[tuple[_Node, tuple]] = []
        mids = [mid for mid in (self._push(msg, packet, starts) for msg, packet in packed) if mid is not None]
        self._start_many(starts)
        return mids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in list(message_ids):
            future = self._replies.get(mid)
            if future is not None and future.done():
                del self._replies[mid]
                if future.result() is not None:
                    out.append(future.result())
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self.push_messages(messages))
        limits = [t for t in (None if timeout is None else time.monotonic() + timeout, self.deadline) if t is not None]
        replies: list[Message] = []
        while pending:
            replies.extend(self.pull_messages(pending))
            pending = {mid for mid in pending if mid in self._replies}
            left = min(limits) - time.monotonic() if limits else None
            if not pending or (left is not None and left <= 0):
                break
            wait([self._replies[mid] for mid in pending], timeout=left, return_when=FIRST_COMPLETED)
        for mid in pending:  # not waited for any longer: a late reply stays unpulled, as in the SuperLink
            self._replies.pop(mid, None)
        check_deadline(self.deadline, self.timeout)
        if self.record:
            self.received.extend(replies)
        return replies

    def close(self) -> None:
        self._pool.close()

    # Delivery ----------------------------------------------------------------------------------

    def _push(self, msg: Message, packet: Packet, starts: list | None = None) -> str | None:
        """Hand ``packet`` to its node (or queue it behind the node's running task); with ``starts``,
        a task that can start now is appended there for :meth:`_start_many` instead of started."""
        check_deadline(self.deadline, self.timeout)
        node = self.nodes.get(msg.metadata.dst_node_id)
        errors = validate_message(msg, is_reply_message=False)  # the SuperLink's check (the node repeats it)
        if errors or node is None:
            reason = "; ".join(errors) or "no such node"
            self.dropped.append(f"message to node {msg.metadata.dst_node_id} not sent: {reason}")
            return None
        mid = msg.metadata.message_id
        future: Future = Future()
        self._replies[mid] = future
        task = msg
        if self.record or self.intercept is not None:
            task = unpack(packet, is_reply=False)  # the task as the node inflates it
        if self.record:
            self.sent.append(task)
        if self.intercept is not None:
            reply = self.intercept(node.node_id, task)
            if reply is not None:
                future.set_result(self._accept(task, pack(reply)))
                return mid
        job = (task, packet, future)
        with self._lock:
            if node.busy:  # a node runs one task at a time
                node.waiting.append(job)
                return mid
            node.busy = True
        if starts is None:
            self._start(node, job)
        else:
            starts.append((node, job))
        return mid

    def _start(self, node: _Node, job: tuple) -> None:
        done = self._pool.submit(run_task, self.app_dir, job[1], node.context)
        done.add_done_callback(lambda result: self._finished(node, job, result))

    def _start_many(self, starts: list[tuple[_Node, tuple]]) -> None:
        """:meth:`_start` of each (node, job); a pool that takes tasks in chunks gets them all at once."""
        submit_many = getattr(self._pool, "submit_many", None)
        if submit_many is None or len(starts) < 2:
            for node, job in starts:
                self._start(node, job)
            return
        futures = submit_many(run_task, [(self.app_dir, job[1], node.context) for node, job in starts])
        for (node, job), done in zip(starts, futures, strict=True):
            done.add_done_callback(functools.partial(self._finished, node, job))

    def _finished(self, node: _Node, job: tuple, result: Future) -> None:
        task, _, future = job
        try:
            reply_packet, context, note = result.result()
        except Exception as exc:  # noqa: BLE001 - a worker that died: no reply, as from a dead node
            reply_packet, context, note = None, None, f"worker failed: {type(exc).__name__}: {exc}"
        with self._lock:
            if context is not None:
                node.context = context
            nxt = node.waiting.pop(0) if node.waiting else None
            node.busy = nxt is not None
        if note:
            self.dropped.append(f"node {node.node_id}: {note}")
        future.set_result(None if reply_packet is None else self._accept(task, reply_packet))
        if nxt is not None:
            self._start(node, nxt)

    def _accept(self, task: Message, packet: Packet) -> Message | None:
        """The reply as the SuperLink accepts it (store_message_res), inflated for the ServerApp; or None."""
        try:
            reply = unpack(packet, is_reply=True)
        except WireError as exc:
            self.dropped.append(f"reply of node {task.metadata.dst_node_id} refused: {exc}")
            return None
        meta, ins = reply.metadata, task.metadata
        if meta.reply_to_message_id != ins.message_id or meta.src_node_id != ins.dst_node_id or meta.run_id != ins.run_id:
            self.dropped.append(f"reply of node {ins.dst_node_id} refused: it does not answer the task sent to it")
            return None
        return reply


def _random_node_ids(count: int) -> list[int]:
    """Node ids as Flower's LinkState draws them (random, never the SuperLink's)."""
    ids: list[int] = []
    while len(ids) < count:
        nid = generate_rand_int_from_bytes(NODE_ID_NUM_BYTES)
        if nid not in ids and nid not in (0, SUPERLINK_NODE_ID):
            ids.append(nid)
    return ids


# ------------------------------------------------------------------------------------------------
# A run
# ------------------------------------------------------------------------------------------------


class _Stop(BaseException):
    """Ends the ServerApp from inside (the launcher's reason is in ``args[0]``); nothing in the app catches it."""


def check_deadline(deadline: float | None, timeout: float | None = None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _Stop(RunInterrupted(f"the run did not finish within {timeout or 0:g} s (--timeout)"))


def fused_run_config(app_dir: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run config the ServerApp and ClientApps get: the app's defaults fused with ``overrides``,
    parsed from the ``--run-config`` string the other modes hand ``flwr run`` (Flower's functions)."""
    parsed = parse_config_args([config_string(overrides)]) if overrides else {}
    try:
        fused = get_fused_config_from_dir(Path(app_dir), parsed)
    except ValueError as exc:
        raise FedLinearError(f"run config: {exc}") from None
    return dict(user_config_from_proto(user_config_to_proto(fused)))


INLINE_REFUSED_FAULTS = ("kill-supernode",)


def check_inline(spec: LaunchSpec) -> None:
    """One-line refusals of what inline mode cannot do, naming the mode that can."""
    from fedlinear.clients.faults import ENV

    if spec.ray_address:
        raise FedLinearError("--ray-address runs clients on a Ray cluster: use --mode simulation")
    if any(action in os.environ.get(ENV, "") for action in INLINE_REFUSED_FAULTS):
        raise FedLinearError(f"{ENV} kill-supernode kills a SuperNode process: use --mode processes")
    if not spec.node_configs or len(spec.node_configs) != spec.num_nodes:
        raise FedLinearError("inline mode needs one node config per client")


@contextlib.contextmanager
def _flower_log_to(path: str):
    """Flower's own log lines (``flwr`` logger) to ``path`` instead of the console, for the run."""
    logger = logging.getLogger("flwr")
    saved = logger.handlers[:]
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s: %(message)s"))
    logger.handlers = [handler]
    try:
        yield
    finally:
        logger.handlers = saved
        handler.close()


@contextlib.contextmanager
def _progress_to(on_progress: Callable[[str], None], log, deadline: float | None, timeout: float):
    """The ServerApp's ``[fedlinear]`` lines (server.progress.say) to ``on_progress``; an exception
    there, or the deadline passing, ends the run (:class:`_Stop`)."""
    from fedlinear.server import progress

    original = progress.say

    def say(text: str) -> None:
        line = f"{progress.PREFIX} {text}"
        log.write(line + "\n")
        log.flush()
        try:
            on_progress(line[len(PROGRESS_MARK) :] if line.startswith(PROGRESS_MARK) else line)
        except Exception as exc:  # noqa: BLE001 - the launcher's decision to stop the run
            raise _Stop(exc) from None
        check_deadline(deadline, timeout)

    progress.say = say
    try:
        yield
    finally:
        progress.say = original


def run_inline(spec: LaunchSpec, on_progress: Callable[[str], None] = print, pool: str = "auto",
               workers: int | None = None, intercept: Callable | None = None) -> InlineGrid:  # fmt: skip
    """Run one federation in this process; raise FedLinearError (one line) if the launcher must stop it.

    Like the other modes, a run the ServerApp ends itself (completed, or failed with status.json
    saying why) returns normally: the caller reads the run directory.
    """
    check_inline(spec)
    os.makedirs(spec.workdir, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the export's TensorFlow, as in Flower's processes (flower_env)
    run_config = fused_run_config(spec.app_dir, spec.run_config)
    resolve_pool(pool, workers, run_config, spec.num_nodes)  # a bad --pool / --workers: refused before any import
    server = load_component(spec.app_dir, "serverapp")
    client_app(spec.app_dir, "clientapp")  # imported before any worker starts (processes: inherited)
    kind, size = resolve_pool(pool, workers, run_config, spec.num_nodes)  # after the app's imports: auto sees them
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    deadline = time.monotonic() + spec.run_timeout
    on_progress(f"inline: {spec.num_nodes} nodes in this process, clients {kind}" + (f" x {size}" if size > 1 else ""))
    grid = None
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = NodeContext.of(Context(
        run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=run_config,
    )).context()  # fmt: skip
    log_path = os.path.join(spec.workdir, "inline.log")
    try:
        with open(log_path, "a", encoding="utf-8") as log, _flower_log_to(log_path), \
                _progress_to(on_progress, log, deadline, spec.run_timeout):  # fmt: skip
            # made here: worker processes are forked with Flower's log already going to the file
            grid = InlineGrid(spec.app_dir, spec.node_configs, run_config, run_id, pool=kind, workers=size,
                              intercept=intercept, deadline=deadline)  # fmt: skip
            try:
                server(grid=grid, context=context)
            except SystemExit as exc:
                if exc.code not in (0, None, 1):  # 1: the ServerApp ended the run with its reason in status.json
                    raise FedLinearError(f"the ServerApp exited with code {exc.code}; log {log_path}") from None
            except _Stop as stop:
                raise stop.args[0] from None
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        if grid is not None:
            grid.close()
    return grid
