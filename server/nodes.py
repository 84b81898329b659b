"""Before round 1: wait for the nodes, ask each about its shard, pool the statistics.

* :func:`wait_for_nodes`: node ids once ``min-available-nodes`` are connected, bounded by
  ``node-wait-timeout`` (Flower's own wait has no bound);
* :func:`query_nodes`: stage ``describe`` of Flower's ``query`` message (feature count, size,
  fingerprint, and the column sums when statistics are wanted), then, when they are, stage
  ``scatter`` (:func:`pooled_statistics`; when the yardstick wants R factors they come in the same
  reply, ``with-r``). Nodes whose shard cannot be read, whose reply is malformed,
  or whose client key collides with another's are left out and reported; shards that disagree on the
  number of features stop the run, naming the nodes.

What is asked for under privacy is decided in :mod:`server.privacy`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlinear.common import protocol, scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError, untrusted_text
from fedlinear.server import exchange, privacy, progress
from fedlinear.server import replies as replies_check


@dataclasses.dataclass
class PartyStatistics:
    """What one party sent in the clear: ``n``, ``Σ[x y]`` and its scatter about the server's ``centre``
    (full or diagonal), kept so its R factor can be checked against them (common.fedols.r_matches_statistics)."""

    count: int
    total: np.ndarray
    scatter: np.ndarray
    centre: np.ndarray


@dataclasses.dataclass
class FactorReplies:
    """The scatter replies that carried an R factor too (``with-r``), by node id, and the centre it was asked about."""

    replies: dict[int, Message] = dataclasses.field(default_factory=dict)
    centre: np.ndarray | None = None


@dataclasses.dataclass
class Parties:
    """The nodes that passed the shard query.

    Attributes
    ----------
    healthy : dict[int, dict]
        Node id -> its shard description (the ``shard`` record of its ``describe`` reply, checked by
        :func:`server.replies.check_shard`), in reply order.
    failures : list[dict]
        ``{"node-id", "reason"}`` for every node left out before round 1.
    pooled : PooledStats or None
        The pooled statistics from the nodes' sums; None when none were asked for.
    factors, factor_failures, optimum
        The parties' R factors (node id -> R), the parties that sent none, and the stable yardstick
        from them (:mod:`server.yardstick`); None when the statistics do not flow (privacy).
    """

    healthy: dict[int, dict]
    failures: list[dict]
    pooled: scaling.PooledStats | None
    factors: dict[int, np.ndarray] | None = None
    factor_failures: list[dict] | None = None
    optimum: Any = None  # common.yardstick.Optimum
    statistics: dict[int, PartyStatistics] | None = None  # what each party sent in the clear (no privacy)
    factor_replies: FactorReplies | None = None  # scatter replies that carry the R factor too (``with-r``)

    @property
    def num_features(self) -> int:
        return int(next(iter(self.healthy.values()))[protocol.SHARD_NUM_FEATURES])

    @property
    def eligible(self) -> dict[int, int]:
        """Node id -> client key: the nodes a round may sample."""
        return {nid: int(info[protocol.SHARD_CLIENT_KEY]) for nid, info in self.healthy.items()}

    def in_key_order(self) -> list[int]:
        """The healthy node ids by client key (the order sums are added in)."""
        return in_key_order(self.healthy)


def ask_each(grid: Grid, requests: dict[int, RecordDict], timeout: float, what: str) -> dict[int, Message | str]:
    """Send each node its query and wait (bounded by ``timeout``): node id -> its reply, or the reason
    there is none to use (no reply in time, or an error reply, whose party-written text is sanitised)."""
    messages = [Message(content, dst_node_id=nid, message_type=MessageType.QUERY) for nid, content in requests.items()]
    got = {msg.metadata.src_node_id: msg for msg in exchange.send_and_receive(grid, messages, timeout)}
    out: dict[int, Message | str] = {}
    for nid in requests:
        msg = got.get(nid)
        if msg is None:
            out[nid] = f"no reply to the {what} within 'round-timeout' ({timeout:g} s)"
        elif msg.has_error():
            out[nid] = untrusted_text(msg.error.reason)
        else:
            out[nid] = msg
    return out


def in_key_order(healthy: dict[int, dict]) -> list[int]:
    """Node ids of ``healthy`` by client key, then node id."""
    return sorted(healthy, key=lambda n: (int(healthy[n][protocol.SHARD_CLIENT_KEY]), n))


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


def valid_vector(record: ArrayRecord | None, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
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


def query_nodes(grid: Grid, cfg: RunConfig, nodes: list[int]) -> Parties:
    """Ask each node about its shard, then for the pooled statistics.

    Stage ``describe``: shard description and, when standardization or the reference needs them,
    ``n`` and ``Σ[x y]``. Stage ``scatter``: the pooled mean goes back to the nodes, each returns its
    scatter about it (full when ``reference = auto``, the diagonal otherwise). Both are sums, added
    in client-key order so the result does not depend on reply order.
    """
    want_moments = privacy.wants_moments(cfg)
    describe = {
        protocol.KEY_STAGE: protocol.STAGE_DESCRIBE,
        protocol.KEY_WANT_MOMENTS: want_moments,
        protocol.KEY_PRIVATE: privacy.withholds_statistics(cfg),
    }
    messages = [
        Message(
            RecordDict({protocol.RECORD_CONFIG: ConfigRecord(describe)}),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in nodes
    ]
    replies = exchange.send_and_receive(grid, messages, cfg.round_timeout)
    answered = {msg.metadata.src_node_id for msg in replies}
    healthy: dict[int, dict] = {}
    failures = [{"node-id": nid, "reason": "no reply to the shard query"} for nid in nodes if nid not in answered]
    totals: dict[int, np.ndarray] = {}
    for msg in replies:
        nid = msg.metadata.src_node_id
        if msg.has_error():
            failures.append({"node-id": nid, "reason": untrusted_text(msg.error.reason)})
            continue
        shard = msg.content.config_records.get(protocol.RECORD_SHARD)
        info = dict(shard) if shard is not None else {}
        problem = replies_check.check_shard(info)
        if problem:
            failures.append({"node-id": nid, "reason": problem})
            continue
        healthy[nid] = info
        if want_moments:
            moments = msg.content.array_records.get(protocol.RECORD_MOMENTS)
            total = valid_vector(moments, protocol.ARRAY_TOTAL, (int(info[protocol.SHARD_NUM_FEATURES]) + 1,))
            if total is None:
                del healthy[nid]
                failures.append({"node-id": nid, "reason": "malformed or non-finite column sums in the shard query"})
            else:
                totals[nid] = total
    failures += colliding_keys(healthy)
    for failure in failures:
        progress.say(f"node {failure['node-id']} left out: {failure['reason']}")
    if not healthy:
        raise FedLinearError(
            "no node could read its shard: " + "; ".join(f"node {f['node-id']}: {f['reason']}" for f in failures)
        )
    widths = {info[protocol.SHARD_NUM_FEATURES] for info in healthy.values()}
    if len(widths) > 1:
        detail = ", ".join(
            f"node {nid} ({info.get(protocol.SHARD_DATA_URI) or 'shard withheld'}): {info[protocol.SHARD_NUM_FEATURES]}"
            for nid, info in sorted(healthy.items())
        )
        raise FedLinearError(f"shards disagree on the number of features: {detail}")
    if privacy.secure_statistics(cfg):  # secure aggregation hook: the sums through SecAgg+ (server/securestats.py)
        from fedlinear.server import securestats

        return Parties(
            healthy, failures, securestats.pooled_statistics(grid, cfg, healthy, in_key_order(healthy), failures, scatter_problem)
        )
    if not want_moments:
        return Parties(healthy, failures, None)
    own: dict[int, PartyStatistics] = {}
    with_r = FactorReplies() if wants_factors(cfg) else None
    pooled = pooled_statistics(grid, cfg, healthy, totals, failures, own, with_r)
    return Parties(healthy, failures, pooled, statistics=own, factor_replies=with_r)


def wants_factors(cfg: RunConfig) -> bool:
    """Whether the yardstick asks for R factors (server.yardstick.gather): the full scatter in the clear."""
    return cfg.reference == "auto" and not cfg.private


def r_centre_for(centre: np.ndarray, fit_intercept: bool) -> np.ndarray:
    """The R factors' centre: the pooled mean with an intercept, the origin without (server.yardstick.centre_for)."""
    return centre.copy() if fit_intercept else np.zeros_like(centre)


def colliding_keys(healthy: dict[int, dict]) -> list[dict]:
    """Leave out every node whose client key another node also reports; a failure for each.

    The client key fixes a party's sampling and batch order and the aggregation order. Two nodes
    with one key (the same partition-id or party-id, or identical shards at the same path) are
    both left out, whichever connected first, so the outcome does not depend on node ids.
    """
    by_key: dict[int, list[int]] = {}
    for nid, info in healthy.items():
        by_key.setdefault(int(info[protocol.SHARD_CLIENT_KEY]), []).append(nid)
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


def pooled_statistics(
    grid: Grid, cfg: RunConfig, healthy: dict[int, dict], totals: dict[int, np.ndarray], failures: list[dict],
    own: dict[int, PartyStatistics] | None = None, with_r: FactorReplies | None = None,
) -> scaling.PooledStats:  # fmt: skip
    """Second pass: the scatter of every healthy node about the pooled mean (nodes failing it are left out);
    each party's own statistics go into ``own`` when given. With ``with_r`` (a FactorReplies) each node is asked
    for its R factor in the same reply (stage ``fedols-r``'s, checked by server.fedols.collect_r, which
    asks again whoever sent none): the replies of the nodes kept, and the centre asked about, go into it."""
    d = int(next(iter(healthy.values()))[protocol.SHARD_NUM_FEATURES])
    order = in_key_order(healthy)
    moments = None
    for nid in order:
        part = scaling.Moments(int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]), totals[nid])
        moments = part if moments is None else moments + part
    centre = moments.mean
    full = cfg.reference == "auto"
    config: dict[str, Any] = {protocol.KEY_STAGE: protocol.STAGE_SCATTER, protocol.KEY_FULL: full}
    r_centre = None
    if with_r is not None:  # the yardstick's R factors in the same ClientApp start (server.yardstick)
        r_centre = with_r.centre = r_centre_for(centre, bool(getattr(cfg, "fit_intercept", True)))
        config[protocol.KEY_WITH_R] = True

    def request() -> RecordDict:  # a fresh record for every message
        arrays = {protocol.ARRAY_CENTRE: Array(np.ascontiguousarray(centre))}
        if r_centre is not None:
            arrays[protocol.ARRAY_R_CENTRE] = Array(np.ascontiguousarray(r_centre, np.float64))
        return RecordDict({protocol.RECORD_CONFIG: ConfigRecord(config), protocol.RECORD_CENTRE: ArrayRecord(arrays)})

    answers = ask_each(grid, {nid: request() for nid in order}, cfg.round_timeout, "statistics query")
    shape = (d + 1, d + 1) if full else (d + 1,)
    parts: dict[int, np.ndarray] = {}
    for nid in order:
        msg = answers[nid]
        if isinstance(msg, str):
            reason = msg
        else:
            matrix = valid_vector(msg.content.array_records.get(protocol.RECORD_SCATTER), protocol.ARRAY_SCATTER, shape)
            problem = "malformed or non-finite scatter in the statistics query" if matrix is None else scatter_problem(matrix)
            if problem is None:
                parts[nid] = matrix
                if with_r is not None and protocol.RECORD_R in msg.content.array_records:
                    with_r.replies[nid] = msg  # its R part is checked with the factors (server.fedols.collect_r)
                continue
            reason = problem
        failures.append({"node-id": nid, "reason": reason})
        progress.say(f"node {nid} left out: {reason}")
        del healthy[nid]
    if not healthy:
        raise FedLinearError("no node answered the statistics query")
    if with_r is not None:
        with_r.replies = {nid: msg for nid, msg in with_r.replies.items() if nid in healthy}
    moments = scatter = None
    for nid in in_key_order(healthy):
        m = scaling.Moments(int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]), totals[nid])
        sc = scaling.Scatter(m.count, parts[nid])
        if own is not None:
            own[nid] = PartyStatistics(m.count, totals[nid], parts[nid], centre)
        moments = m if moments is None else moments + m
        scatter = sc if scatter is None else scatter + sc
    return scaling.PooledStats.combine(moments, scatter, centre)
