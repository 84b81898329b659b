"""Validation of every reply a party sends, before anything of it reaches the aggregate.

A party is someone else's machine: a reply may be malformed by accident or crafted. Each check
here returns a one-line reason (or None when the reply is acceptable); the server records a
rejected reply as that node's failure for the round, and it never reaches aggregation. What is
checked:

* shard descriptions (the ``describe`` query): the expected keys with sane types and ranges;
  fingerprints that parse; a feature count within limits;
* train replies: exactly the weight arrays of the model (``kernel`` (d, 1), ``bias`` (1,)),
  float32, finite, a plausible payload size; exactly the metrics the app sends, finite, with
  ``num-examples`` equal to what the node declared in the shard query (FedAvg weighs by it: a
  node claiming 1e12 examples would otherwise take the global model over) and its own client key.
* if configured, the update's L2 norm: at most ``max-update-norm``, and at most
  ``max-update-norm-factor`` x the median norm of the round's replies that passed everything else.

:func:`answers_to` keeps only the replies that answer one of the round's own messages (a straggler's
late reply of an earlier round is rejected); :func:`validated` applies the checks above to a round's
replies and records each rejected one as that node's failure.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID, SType

from fedlinear import flower_fixes
from fedlinear.common import model as lm
from fedlinear.common import npy
from fedlinear.common import protocol
from fedlinear.common.errors import untrusted_text
from fedlinear.server import progress

MAX_FEATURES = 1_000_000


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_shard(info: dict[str, Any]) -> str | None:
    """Why a ``describe`` reply's shard record is unacceptable, or None. Fingerprints are parsed in place."""
    missing = protocol.SHARD_KEYS - set(info)
    if missing:
        return f"malformed shard description: missing {', '.join(sorted(missing))}"
    extra = set(info) - protocol.SHARD_KEYS - protocol.OPTIONAL_SHARD_KEYS
    if extra:
        return f"malformed shard description: unexpected {', '.join(sorted(extra))}"
    for key in (protocol.SHARD_NUM_FEATURES, protocol.SHARD_NUM_EXAMPLES, protocol.SHARD_CLIENT_KEY):
        if not isinstance(info[key], int) or isinstance(info[key], bool):
            return f"malformed shard description: {key} is not an integer"
    if not 1 <= info[protocol.SHARD_NUM_FEATURES] <= MAX_FEATURES:
        return f"malformed shard description: num-features {info[protocol.SHARD_NUM_FEATURES]}"
    if info[protocol.SHARD_NUM_EXAMPLES] < 1:
        return f"malformed shard description: num-examples {info[protocol.SHARD_NUM_EXAMPLES]}"
    uri = protocol.SHARD_DATA_URI
    if uri in info and not isinstance(info[uri], str):
        return "malformed shard description: data-uri is not text"
    if uri in info:  # printed and stored: one printable line, bounded
        info[uri] = untrusted_text(info[uri])
    try:
        fingerprints = [json.loads(fp) for fp in info.get(protocol.SHARD_FINGERPRINTS, [])]
    except (TypeError, ValueError):
        return "malformed shard description: fingerprints are not JSON"
    if not all(isinstance(fp, dict) for fp in fingerprints):
        return "malformed shard description: fingerprints are not JSON objects"
    info[protocol.SHARD_FINGERPRINTS] = fingerprints
    return None


def check_train_reply(
    msg: Message, num_features: int, declared: dict[str, Any], max_norm: float, names: tuple[str, ...] = lm.WEIGHT_NAMES
) -> str | None:
    """Why a train reply is unacceptable, or None.

    ``declared`` is what the node said in the shard query; ``max_norm`` bounds the weights' L2 norm
    (far above anything training produces: a reply past it is garbage or an attack on the scale).
    """
    content = msg.content
    arrays_names = flower_fixes.record_names(content, ArrayRecord)  # no RecordDict views: they cost ~50 µs each
    metrics_names = flower_fixes.record_names(content, MetricRecord)
    if (arrays_names, metrics_names) != ({protocol.RECORD_ARRAYS}, {protocol.RECORD_METRICS}):
        return f"malformed train reply: records {sorted(arrays_names) + sorted(metrics_names)}, expected arrays and metrics"
    arrays = content[protocol.RECORD_ARRAYS]
    if set(arrays.keys()) != set(names):  # ``names``: the arrays the global model has (no bias without an intercept)
        return f"malformed train reply: arrays {sorted(arrays.keys())}, expected {sorted(names)}"
    expected = {name: shape for name, shape in ((lm.KERNEL, (num_features, 1)), (lm.BIAS, (1,))) if name in names}
    total = 0.0
    for name, shape in expected.items():
        array = arrays[name]
        if array.dtype != "float32" or tuple(array.shape) != shape:
            return f"malformed train reply: {name} is {array.dtype} {tuple(array.shape)}, expected float32 {shape}"
        if len(array.data) > 4 * math.prod(shape) + 4096:
            return f"malformed train reply: {name} payload of {len(array.data)} bytes for {math.prod(shape)} values"
        try:  # npy.loads: what array.numpy() (np.load) accepts and gives, its header parsed once per shape
            value = npy.loads(array.data) if array.stype == SType.NUMPY else array.numpy()
        except Exception:  # noqa: BLE001 - undecodable bytes are a bad reply
            return f"malformed train reply: {name} cannot be decoded"
        if value.dtype != np.float32 or value.shape != shape:
            return f"malformed train reply: {name} decodes to {value.dtype} {value.shape}"
        if not np.isfinite(value).all():
            return f"train reply rejected: {name} has non-finite values"
        total += float(np.sum(value.astype(np.float64) ** 2))
    if math.sqrt(total) > max_norm:
        return f"train reply rejected: weights of norm {math.sqrt(total):.3g}, above the plausible bound {max_norm:.3g}"
    metrics = content[protocol.RECORD_METRICS]
    if set(metrics.keys()) != protocol.TRAIN_METRICS:
        return f"malformed train reply: metrics {sorted(metrics.keys())}, expected {sorted(protocol.TRAIN_METRICS)}"
    if not all(_number(metrics[key]) for key in protocol.TRAIN_METRICS):
        return "malformed train reply: a metric is not a finite number"
    claimed, said = metrics[protocol.METRIC_NUM_EXAMPLES], declared[protocol.SHARD_NUM_EXAMPLES]
    if claimed != said:
        return f"train reply rejected: claims {claimed} examples, the shard query said {said}"
    same_key = metrics[protocol.METRIC_CLIENT_KEY] == declared[protocol.SHARD_CLIENT_KEY]
    if not same_key or metrics[protocol.METRIC_UNIT_WEIGHT] != 1:
        return "train reply rejected: client key or weight differs from the shard query"
    return None


def update_norm(msg: Message, global_arrays) -> float:
    """The L2 norm of a (well-formed) train reply's update: its weights minus the global weights the
    round sent, in the standardized variables the clients train in, over kernel and bias together."""
    arrays = msg.content[protocol.RECORD_ARRAYS]
    squared = 0.0
    for name in global_arrays.keys():
        delta = arrays[name].numpy().astype(np.float64) - global_arrays[name].numpy().astype(np.float64)
        squared += float(np.sum(delta * delta))
    return math.sqrt(squared)


def check_update_norm(msg: Message, global_arrays, bound: float, node_id: int) -> str | None:
    """Why a (well-formed) train reply's update (:func:`update_norm`) is too long for ``max-update-norm``, or None."""
    norm = update_norm(msg, global_arrays)
    if norm > bound:
        return (
            f"train reply rejected: node {node_id} sent an update of norm {norm:.4g}, "
            f"above 'max-update-norm' = {bound:g}"
        )
    return None


# ``max-update-norm-factor`` needs this many replies for their median to be an honest party's norm
# when fewer than half of them come from attackers (with 2, one attacker is half of them).
MEDIAN_MIN_REPLIES = 3


def median_bound_skipped(norms: dict[int, float]) -> str | None:
    """Why ``max-update-norm-factor`` bounds nothing this round (None: it applies)."""
    if len(norms) < MEDIAN_MIN_REPLIES:
        return (
            f"only {len(norms)} replies passed the other checks, fewer than {MEDIAN_MIN_REPLIES} to take an honest "
            "median from"
        )
    if float(np.median(list(norms.values()))) == 0:  # most parties did not move: no scale to bound the rest by
        return "the median update norm is 0"
    return None


def check_update_norm_factor(norms: dict[int, float], factor: float, server_round: int) -> dict[int, str]:
    """Why each update longer than ``factor`` x the round's median update norm is rejected, by node id
    (``max-update-norm-factor``); ``norms`` are the update norms of the replies that passed every other
    check. Nothing is rejected with fewer than :data:`MEDIAN_MIN_REPLIES` of them."""
    if median_bound_skipped(norms):
        return {}
    median = float(np.median(list(norms.values())))
    bound = factor * median
    return {
        nid: (
            f"train reply rejected: node {nid} sent an update of norm {norm:.4g} in round {server_round}, above "
            f"'max-update-norm-factor' {factor:g} x the round's median update norm {median:.4g} = {bound:.4g}"
        )
        for nid, norm in sorted(norms.items())
        if norm > bound
    }


# A weight vector this long is garbage or an attack: training from standardized data moves weights
# by O(1); raw-space runs (standardize = none) by what the data's scale allows.
WEIGHT_NORM_BOUND = 1e12


def validated(
    ordered: list[Message], failures: list[dict], healthy: dict[int, dict], eligible: dict[int, int],
    num_features: int, arrays: ArrayRecord, max_update_norm: float = 0.0, max_update_norm_factor: float = 0.0,
    server_round: int = 0,
) -> list[Message]:
    """The replies that pass the checks above (and, if > 0, ``max-update-norm`` on their update
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
            else check_train_reply(msg, num_features, healthy[nid], WEIGHT_NORM_BOUND, tuple(arrays.keys()))
        )  # fmt: skip
        if problem is None and max_update_norm > 0:
            problem = check_update_norm(msg, arrays, max_update_norm, nid)
        if problem is None:
            kept.append(msg)
        else:
            failures.append({"node-id": nid, "client-key": eligible.get(nid), "reason": problem})
    if max_update_norm_factor > 0:
        norms = {msg.metadata.src_node_id: update_norm(msg, arrays)
                 for msg in kept if not msg.has_error()}  # fmt: skip
        skipped = median_bound_skipped(norms)
        if skipped and norms:  # with no reply there is nothing to say
            progress.say(f"round {server_round}: 'max-update-norm-factor' not applied: {skipped}")
        rejected = check_update_norm_factor(norms, max_update_norm_factor, server_round)
        failures += [
            {"node-id": msg.metadata.src_node_id, "client-key": eligible.get(msg.metadata.src_node_id),
             "reason": rejected[msg.metadata.src_node_id]}
            for msg in kept if not msg.has_error() and msg.metadata.src_node_id in rejected
        ]  # fmt: skip
        kept = [msg for msg in kept if msg.has_error() or msg.metadata.src_node_id not in rejected]
    return kept


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
