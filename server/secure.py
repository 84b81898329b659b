"""Secure aggregation of one training round with Flower's SecAgg+ (``secure-aggregation = true``).

The server learns the weighted mean of the sampled clients' **updates** (new weights minus the
global weights) and nothing about any single update: each client quantizes its update to integers,
adds pairwise masks that cancel in the sum and a private mask whose seed it secret-shares with its
neighbours, and sends only that masked vector. Flower 1.42 has SecAgg+ only on its legacy path
(``SecAggPlusWorkflow`` driving a ``LegacyContext`` and a legacy ``Strategy``; ``secaggplus_mod``
expecting legacy ``fitres.*`` replies). This module keeps that path in one place: the rest of the
ServerApp stays on the Message API and calls :func:`train_round` with the train tasks its strategy
configured, instead of sending them in the clear.

How one round runs
------------------
The four SecAgg+ stages (setup, share keys, collect masked vectors, unmask) each send one message to
every party still in the protocol, as message type ``train.secagg``: the clients register SecAgg+ on
that handler alone (``clients/secure.py``), never app-wide. The train task's own content (weights,
config, standardization) travels with stage 3, where the client trains exactly as in the clear path.
Every stage waits at most ``secagg-timeout`` seconds; a party that has not answered by then, or
answers with an error, is dropped from the round.

Dropouts. SecAgg+ recovers a party that drops after sharing its keys (stage 2 or later): the round
gives the mean over the parties whose masked vectors arrived. Flower 1.42 halts the whole round when a
party drops *before* sharing its keys (it counts that party as "dead" and asks the others for key
shares they never received). :class:`_Workflow` removes such parties from the protocol after the
setup and share-keys stages instead, which is what the protocol would do had they never been sampled
(no masks involving them were ever added), so those dropouts cost only the stage's timeout.

Weighting
---------
SecAgg+ returns ``Σ wᵢ·δᵢ / Σ wᵢ`` for per-party weights ``wᵢ`` that travel inside the masked vector.
Without DP the weight is the shard size ``nᵢ`` (as FedAvg weights, so the result is FedAvg's);
under DP (``dp`` not ``none``) every party weighs 1: the noise is calibrated to a mean of equally
weighted, clipped updates. The weight is sent to the server in the clear as ``num_examples`` by
Flower's protocol; the server already knows every shard size from the shard query.

Quantization error
------------------
Flower's ``secaggplus_mod`` sends ``clip(rᵢ·δᵢ, ±c)`` quantized by stochastic rounding to the grid
of step ``s = 2c/Q`` (``c`` = ``secagg-clipping-range``, ``Q`` = ``secagg-quantization-range``),
together with ``rᵢ = round(Q·wᵢ/w_max)/Q``, the party's weight as the protocol carries it
(``w_max`` = the largest weight among the round's sampled parties, so ``rᵢ ≤ 1``); the server divides
the unmasked sum by ``Σ rᵢ``. Clients refuse to send an update with a coordinate outside ``±c``
(clients/secure.py), so nothing is clipped and every rounding error is below one step. Per
coordinate, the secure aggregate then differs from the exact weighted mean ``Σ wᵢδᵢ / Σ wᵢ`` of the
aggregated parties' updates by less than

    s · w_max / mean(w)          rounding of the values (k errors < s each, divided by Σ rᵢ)
  + s · w_max / mean(w) / 2      rounding of the weights (|rᵢ − wᵢ/w_max| ≤ 1/(2Q), |δᵢ − mean| ≤ 2c)

where the second term vanishes for equal weights. Equal weights (DP): ``s = 2c/Q``; shard-size
weights: ``1.5·s·w_max/mean(w)``. :func:`quantization_bound` computes it. The new global weights
differ by as much (plus float32 rounding when stored). With the defaults ``c = 8``, ``Q = 2²²``:
``s = 3.81e-6`` per coordinate, i.e. at most 1.3e-5 relative to the default data's weight vector
(11 coordinates of norm ~1), well inside the 1e-4 asked of it; tests/integration/test_secure.py measures the
error every round. Larger ``Q`` shrinks the step, but the integer sums live modulo 2³²: at most
``2³²/Q − 1`` parties (1023 at the default) can take part in one round, and more is refused.

Secure sums of statistics
-------------------------
:func:`secure_sum` runs the same four stages (:func:`run_protocol`) as message type ``train.secsum``
to sum named arrays that each node computes from its shard (the clients' registry,
``clients.secure.STATISTICS``): every value travels as exact fixed-point limbs (common/fixedpoint.py),
every party weighs 1, so the result is the exact sum (server/securestats.py uses it for the pooled
count, mean and centred scatter under ``secure-aggregation = true``).

What the server still sees: who was sampled and who answered each stage, every party's weight
(shard size, or 1 under DP), the aggregate itself, and the round's timing. Per-node train losses are
not sent under secure aggregation (they would be per-node statistics in the clear), so the round has
no ``train-loss``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedlinear.common import fixedpoint, protocol, secagg_prg
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.server import privacy, progress

# Flower 1.42 expands mask seeds through a 32-bit seed: use full-strength masks (common/secagg_prg.py),
# as clients/secure.py does on the other side
SecAggPlusWorkflow.unmask_stage.__globals__["pseudo_rand_gen"] = secagg_prg.pseudo_rand_gen

# The clients' SecAgg+ handler is ``@app.train(protocol.SECAGG_ACTION)`` (clients/secure.py): message type
# ``train.secagg``; the train config's ``secagg-weighting`` tells the clients which weight to report.
# Masks and sums live modulo 2**32 (Flower's default; its pseudo-random masks are drawn below it).
MODULUS_RANGE = 2**32
STAGE_NAMES = {
    "setup": "setup",
    "share_keys": "share keys",
    "collect_masked_vectors": "collect masked vectors",
    "unmask": "unmask",
}


@dataclasses.dataclass
class SecureRound:
    """The outcome of one securely aggregated training round.

    Attributes
    ----------
    sampled : list[int]
        Node ids of the parties the round started with.
    aggregated : list[int]
        Parties whose update is in the aggregate (their masked vector arrived).
    arrays : ArrayRecord or None
        The new global weights, ``global + update``; None if the round produced no aggregate.
    update : ArrayRecord or None
        The securely aggregated update itself (weighted mean of the parties' updates, float64),
        before anything else touches it: central DP adds its noise to this and calls
        :func:`apply_update`.
    weighting : str
        ``equal`` or ``num-examples`` (see the module docstring).
    failures : list[dict]
        ``{"node-id", "reason"}`` for every sampled party whose update is not in the aggregate.
    metrics : MetricRecord or None
        Always None: per-node train losses are not sent under secure aggregation.
    """

    sampled: list[int]
    aggregated: list[int]
    arrays: ArrayRecord | None
    update: ArrayRecord | None
    weighting: str
    failures: list[dict]
    metrics: MetricRecord | None = None

    @property
    def num_aggregated(self) -> int:
        return len(self.aggregated)


def quantization_bound(cfg: RunConfig, weights: Iterable[float] | None = None, max_weight: float | None = None) -> float:
    """Upper bound on any coordinate's difference between the secure aggregate and the exact
    (float64) weighted mean of the aggregated parties' updates.

    ``weights``: those parties' weights (None: equal weights); ``max_weight``: the largest weight
    among the parties sampled for the round (default: the largest of ``weights``). See the module
    docstring for the derivation.
    """
    step = 2.0 * cfg.secagg_clipping_range / cfg.secagg_quantization_range
    values = [float(w) for w in weights] if weights is not None else [1.0]
    largest = float(max_weight) if max_weight is not None else max(values)
    factor = 1.0 if len(set(values)) == 1 else 1.5
    return factor * step * largest / (sum(values) / len(values))


def apply_update(arrays: ArrayRecord, update: ArrayRecord) -> ArrayRecord:
    """``arrays + update``, name by name, in the dtype of ``arrays``."""
    out = {}
    for name in arrays:
        base = arrays[name].numpy()
        out[name] = Array(np.ascontiguousarray((base.astype(np.float64) + update[name].numpy()).astype(base.dtype)))
    return ArrayRecord(out)


def train_round(
    grid: Grid,
    cfg: RunConfig,
    server_round: int,
    messages: Iterable[Message],
    num_examples: Mapping[int, int] | None = None,
) -> SecureRound:
    """Run the train tasks ``messages`` (as the strategy configured them for the clear path) through
    SecAgg+ and return the securely aggregated result.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    cfg : RunConfig
        The run config (``secagg-*`` keys; ``dp`` decides the weighting).
    server_round : int
        The round number (the protocol's group id).
    messages : iterable of Message
        One train task per sampled node, each with the global weights in ``arrays`` and the task
        config in ``config`` (learning rate, standardization, a DP clipping norm if any).
    num_examples : mapping node id -> shard size, optional
        Needed for shard-size weighting (no DP); without it every party weighs 1.
    """
    messages = list(messages)
    sampled = [msg.metadata.dst_node_id for msg in messages]
    equal = privacy.equal_weights(cfg) or num_examples is None
    weighting = protocol.WEIGHTING_EQUAL if equal else protocol.WEIGHTING_NUM_EXAMPLES
    if len(messages) < 2:
        reason = (
            f"secure aggregation needs at least 2 parties, {len(messages)} sampled "
            "(one party's sum is its update in the clear)"
        )
        return SecureRound(sampled, [], None, None, weighting, [{"node-id": n, "reason": reason} for n in sampled])
    if len(messages) * cfg.secagg_quantization_range >= MODULUS_RANGE:
        raise FedLinearError(
            f"secure aggregation of {len(messages)} parties overflows the 32-bit sums at "
            f"'secagg-quantization-range' = {cfg.secagg_quantization_range}: it must be below "
            f"{MODULUS_RANGE // len(messages)} for this many parties (lower it, or sample fewer with 'fraction-train')"
        )
    if weighting == protocol.WEIGHTING_NUM_EXAMPLES:
        unknown = [nid for nid in sampled if nid not in num_examples]
        if unknown:
            raise FedLinearError(f"secure aggregation: shard sizes of nodes {unknown} are unknown")
        max_weight = float(max(int(num_examples[nid]) for nid in sampled))
    else:
        max_weight = 1.0
    clipping_range = float(cfg.secagg_clipping_range)
    contents: dict[int, RecordDict] = {}
    for msg in messages:
        content = RecordDict(dict(msg.content.items()))  # one RecordDict per party: the workflow writes into it
        config = ConfigRecord(dict(content.config_records.get(protocol.RECORD_CONFIG, ConfigRecord()).items()))
        config[protocol.KEY_SECAGG_WEIGHTING] = weighting
        content[protocol.RECORD_CONFIG] = config
        contents[msg.metadata.dst_node_id] = content

    protocol_run = run_protocol(
        grid, cfg, server_round, contents, protocol.SECAGG_MESSAGE_TYPE, max_weight, clipping_range,
        int(cfg.secagg_quantization_range),
    )  # fmt: skip
    stage_grid, workflow, strategy, halted = protocol_run.grid, protocol_run.workflow, protocol_run.strategy, protocol_run.halted
    failures = stage_grid.failures(cfg.secagg_timeout)
    aggregated = sorted(workflow.aggregated)
    lost = {f["node-id"] for f in failures}
    failures = [f for f in failures if f["node-id"] not in aggregated]  # an unmask-stage dropout is still summed
    update = arrays = None
    if halted is None and strategy.aggregate is not None:
        # a mean of values within ±c lies within ±c: anything else means the masks did not cancel
        # (e.g. parties running mask generators that differ), not an aggregate
        largest = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in strategy.aggregate)
        if not largest <= clipping_range * (1 + 1e-9) + 2 * clipping_range / cfg.secagg_quantization_range:
            halted = f"secure aggregation: the unmasked aggregate has a coordinate of {largest:.3g}, outside ±{clipping_range:g}: the masks did not cancel"
    if halted is None and strategy.aggregate is not None:
        template = messages[0].content[protocol.RECORD_ARRAYS]
        update = _named(strategy.aggregate, template)
        arrays = apply_update(template, update)
    else:
        aggregated = []
        why = halted or "secure aggregation produced no aggregate"
        failures += [{"node-id": nid, "reason": why} for nid in sampled if nid not in {f["node-id"] for f in failures}]
    for nid in sorted(lost & set(aggregated)):
        progress.say(f"round {server_round}: node {nid} dropped out during unmasking; its update is in the aggregate")
    return SecureRound(sampled, aggregated, arrays, update, weighting, failures)



@dataclasses.dataclass
class ProtocolRun:
    """One run of Flower's four SecAgg+ stages (:func:`run_protocol`)."""

    grid: _StageGrid
    workflow: _Workflow
    strategy: _Capture
    halted: str | None


def run_protocol(
    grid: Grid,
    cfg: RunConfig,
    group: int,
    contents: dict[int, RecordDict],
    message_type: str,
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    expected: list[tuple[int, ...]] | None = None,
) -> ProtocolRun:
    """Flower's SecAgg+ over the nodes of ``contents`` (node id -> what its stage 3 carries), as
    message type ``message_type``, protocol group ``group`` (the round; 0 before round 1). The
    training rounds (:func:`train_round`) and the secure sums (:func:`secure_sum`) both run it.
    ``expected``: the shapes of what each party sums, when known: a stage-3 reply of other shapes is
    left out (:func:`masked_vector_problem`)."""
    nodes = list(contents)
    stage_grid = _StageGrid(grid, message_type, expected)
    strategy = _Capture(nodes, stage_grid)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=max(1, group)),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: group})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _Workflow(
        num_shares=_share_setting(cfg.secagg_num_shares),
        reconstruction_threshold=_share_setting(cfg.secagg_reconstruction_threshold),
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=int(quantization_range),
        modulus_range=MODULUS_RANGE,
        timeout=float(cfg.secagg_timeout),
    )
    halted = workflow.run_round(stage_grid, context, contents)
    return ProtocolRun(stage_grid, workflow, strategy, halted)


# -- secure sums of statistics -----------------------------------------------------------------------


@dataclasses.dataclass
class SecureSum:
    """The outcome of :func:`secure_sum`.

    Attributes
    ----------
    sums : dict[str, numpy.ndarray] or None
        Name -> the pooled array (float64, the requested shape): the sum over ``aggregated`` of the
        parties' arrays; None when the protocol produced no sum.
    aggregated : list[int]
        Node ids whose arrays are in the sums.
    failures : list[dict]
        ``{"node-id", "reason"}`` for every node asked whose arrays are not in the sums.
    """

    sums: dict[str, np.ndarray] | None
    aggregated: list[int]
    failures: list[dict]


def secure_sum(
    grid: Grid,
    cfg: RunConfig,
    nodes: list[int],
    statistic: str,
    shapes: Mapping[str, tuple[int, ...]],
    windows: Mapping[str, np.ndarray | None] | None = None,
    arguments: Mapping[str, np.ndarray] | None = None,
    group: int = 0,
) -> SecureSum:
    """Sum, over ``nodes``, the named arrays each node's ``statistic`` computes on its shard, through
    SecAgg+: the server learns only the sums.

    Parameters
    ----------
    statistic : str
        A name in the clients' registry (``clients.secure.STATISTICS``): what each node computes from
        its shard and ``arguments``; it must return exactly the arrays of ``shapes``.
    shapes : mapping name -> shape
        The arrays summed, in this order.
    windows : mapping name -> int array of ``shape`` or None, optional
        ``hi`` per element: every party's value is promised to satisfy ``|v| < 2**hi`` (a party whose
        value does not drops out); the sum keeps :data:`common.fixedpoint.PRECISION_BITS` bits below it.
        None (the default, per name): any finite float64, summed exactly (common/fixedpoint.py).
    arguments : mapping name -> array, optional
        What every node's ``statistic`` gets besides its shard (e.g. the pooled mean to centre on).
    group : int
        The protocol's group id (0: before round 1).

    Every party weighs 1; each value travels as fixed-point limbs that SecAgg+ adds exactly, so with
    full windows the result is the exact sum of the parties' float64 values, rounded once. Parties
    that drop out after sharing their keys are recovered (their arrays are then not in the sum) and
    reported in ``failures``; at least 2 parties must be aggregated (one party's sum is its own).
    """
    nodes = list(nodes)
    if len(nodes) < 2:
        reason = f"secure sum needs at least 2 parties, {len(nodes)} asked (one party's sum is its own statistics)"
        return SecureSum(None, [], [{"node-id": n, "reason": reason} for n in nodes])
    windows = dict(windows or {})
    encodings = {}
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        hi = windows.get(name)
        encodings[name] = fixedpoint.full(size, len(nodes)) if hi is None else fixedpoint.window(np.asarray(hi).reshape(size), len(nodes))
    bits = next(iter(encodings.values())).bits
    config = {
        protocol.KEY_STATISTIC: statistic,
        protocol.KEY_SUM_NAMES: list(shapes),
        **{f"{protocol.KEY_SUM_LIMBS_PREFIX}{name}": enc.limbs for name, enc in encodings.items()},
        **{f"{protocol.KEY_SUM_SPAN_PREFIX}{name}": enc.span for name, enc in encodings.items()},
        protocol.KEY_SUM_BITS: bits,
        protocol.KEY_SUM_PARTIES: len(nodes),
    }
    lows = ArrayRecord({name: Array(np.ascontiguousarray(enc.lo)) for name, enc in encodings.items()})
    args = ArrayRecord({name: Array(np.ascontiguousarray(np.asarray(v, np.float64))) for name, v in (arguments or {}).items()})
    contents = {
        nid: RecordDict({protocol.RECORD_CONFIG: ConfigRecord(dict(config)), protocol.RECORD_SUM_LO: lows, protocol.RECORD_ARGUMENTS: args})
        for nid in nodes
    }
    quantization_range = 1 << bits
    run = run_protocol(
        grid, cfg, group, contents, protocol.SECSUM_MESSAGE_TYPE, 1.0, float(quantization_range // 2), quantization_range,
        [(enc.lo.size, enc.limbs) for enc in encodings.values()],
    )
    failures = run.grid.failures(cfg.secagg_timeout)
    aggregated = sorted(run.workflow.aggregated)
    failures = [f for f in failures if f["node-id"] not in aggregated]
    halted = run.halted
    sums = None
    if halted is None and run.strategy.aggregate is not None:
        try:
            if len(run.strategy.aggregate) != len(encodings):
                raise FedLinearError(f"secure sum has {len(run.strategy.aggregate)} arrays, {len(encodings)} asked for")
            sums = {}
            for (name, enc), mean in zip(encodings.items(), run.strategy.aggregate, strict=True):
                limb_sums = fixedpoint.limb_sums_from_mean(mean, enc, len(aggregated))
                sums[name] = fixedpoint.decode(limb_sums, enc, len(aggregated), name).reshape(shapes[name])
        except FedLinearError as exc:
            sums, halted = None, str(exc)
    if sums is None:
        why = halted or "secure sum produced no result"
        failed = {f["node-id"] for f in failures}
        failures += [{"node-id": nid, "reason": why} for nid in nodes if nid not in failed]
        aggregated = []
    return SecureSum(sums, aggregated, failures)


# The training range is at least this many times the largest coordinate of the initial weights and of
# the pooled optimum in the training variables (see training_clipping_range).
RANGE_FACTOR = 8.0


def training_clipping_range(cfg: RunConfig, pooled, transform, initial) -> tuple[float, str]:
    """SecAgg+'s clipping range for the training rounds, in the variables the clients train in, and
    a line saying how it was chosen.

    An update moves the weights from the global model toward the optimum of a party's shard; in a
    stable run the weights stay between where they started and the pooled optimum, so coordinates of
    an update are of the order of those of the initial weights and of the optimum. With the pooled
    statistics known (``pooled`` full: the secure sums, or the clear ones) the range is
    ``max(secagg-clipping-range, 8 x the largest |coordinate| of the initial weights and of the pooled
    optimum, both in the training variables)``: standardized, the optimum is O(1) and the configured
    range (default 8) stands; on raw or collinear variables it grows with them, so no honest update
    is refused for its scale. The quantization step ``2c/Q`` grows in proportion, i.e. stays the same
    relative to the weights. Without the pooled optimum the configured range is used as it is.

    The optimum is the one the run trains toward: with an intercept the pooled least squares, with
    ``fit-intercept = false`` the least squares through the origin (no bias coordinate). ``initial``
    is the run's start: Glorot's, or the continued model's (``init-from``, server/continuation.py).
    """
    configured = float(cfg.secagg_clipping_range)
    if pooled is None or not getattr(pooled, "full", False):
        return configured, f"clipping range ±{configured:g} (secagg-clipping-range)"
    fit_intercept = bool(getattr(cfg, "fit_intercept", True))
    if fit_intercept:
        kernel, bias = pooled.solve()
    else:  # the optimum through the origin, the one this run trains toward (common/yardstick.py)
        from fedlinear.common import yardstick

        kernel, bias = yardstick.from_scatter(pooled, fit_intercept=False).kernel, 0.0
    scale = transform.y_scale
    weights = np.linalg.pinv(transform.matrix) @ (np.asarray(kernel, np.float64) / scale)
    # without an intercept the model has no bias coordinate: none to bound
    bias_t = (bias - transform.y_shift + float(transform.shift @ kernel)) / scale if fit_intercept else 0.0
    start = np.abs(np.asarray(initial.vector(), np.float64)).max()
    largest = max(float(np.abs(weights).max(initial=0.0)), abs(float(bias_t)), float(start))
    chosen = max(configured, RANGE_FACTOR * largest)
    if chosen == configured:
        return configured, f"clipping range ±{configured:g} (secagg-clipping-range; the pooled optimum's largest coordinate in the training variables is {largest:.3g})"
    return chosen, (
        f"clipping range ±{chosen:.4g}: {RANGE_FACTOR:g} x the largest coordinate ({largest:.3g}) of the initial weights and "
        f"of the pooled optimum in the training variables (above secagg-clipping-range = {configured:g})"
    )


def _share_setting(value: float) -> int | float:
    """A config value as Flower's ``num_shares`` / ``reconstruction_threshold``: <= 1 a fraction, else a count."""
    return float(value) if value <= 1 else int(value)


def _named(ndarrays: list[np.ndarray], template: ArrayRecord) -> ArrayRecord:
    """The aggregated arrays under the names (and shapes) of the global weights they update."""
    names = list(template.keys())
    if len(ndarrays) != len(names):
        raise FedLinearError(f"secure aggregate has {len(ndarrays)} arrays, the model {len(names)}")
    out = {}
    for name, value in zip(names, ndarrays, strict=True):
        shape = tuple(template[name].shape)
        if int(np.prod(value.shape)) != int(np.prod(shape)):
            raise FedLinearError(f"secure aggregate: '{name}' has shape {value.shape}, the model {shape}")
        out[name] = Array(np.ascontiguousarray(np.asarray(value, dtype=np.float64).reshape(shape)))
    return ArrayRecord(out)


class _StageGrid:
    """The run's grid as the SecAgg+ workflow sees it: its train messages go out as ``train.secagg``
    (so only the clients' SecAgg+ handler gets them), and every stage's replies are recorded."""

    def __init__(
        self, grid: Grid, message_type: str = protocol.SECAGG_MESSAGE_TYPE, expected: list[tuple[int, ...]] | None = None
    ) -> None:
        self.grid = grid
        self.message_type = message_type
        self.stages: list[tuple[str, list[int], list[Message]]] = []
        # the masked vector's array shapes (after SecAgg+'s weight factor) when known: stage 3 replies
        # are then checked before the workflow touches them (see masked_vector_problem)
        self.expected = expected
        self.rejected: dict[int, str] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = "?"
        for msg in messages:
            msg.metadata.message_type = self.message_type
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, stage))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout)) if messages else []
        if self.expected is not None and stage == "collect_masked_vectors":
            kept = []
            for reply in replies:
                problem = masked_vector_problem(reply, self.expected)
                if problem is None:
                    kept.append(reply)
                else:  # left out as a party that dropped out here: SecAgg+ removes its pairwise masks
                    self.rejected.setdefault(reply.metadata.src_node_id, problem)
            replies = kept
        self.stages.append((STAGE_NAMES.get(stage, stage), [m.metadata.dst_node_id for m in messages], replies))
        return replies

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def failures(self, timeout: float) -> list[dict]:
        """The first stage at which each party failed, and why."""
        failed: dict[int, str] = {}
        for stage, sent, replies in self.stages:
            by_node = {msg.metadata.src_node_id: msg for msg in replies}
            for nid in sent:
                if nid in failed:
                    continue
                reply = by_node.get(nid)
                if reply is None and nid in self.rejected:
                    failed[nid] = f"secure aggregation, stage '{stage}': {self.rejected[nid]}"
                elif reply is None:
                    failed[nid] = (
                        f"secure aggregation, stage '{stage}': no reply within {timeout:g} s (config key 'secagg-timeout')"
                    )
                elif reply.has_error():
                    failed[nid] = f"secure aggregation, stage '{stage}': {reply.error.reason}"
        return [{"node-id": nid, "reason": reason} for nid, reason in failed.items()]


def masked_vector_problem(reply: Message, shapes: list[tuple[int, ...]]) -> str | None:
    """Why a party's stage-3 reply (``collect masked vectors``) is not a masked vector of ``shapes``
    (one line), else None. Flower's workflow adds every reply's arrays as they come: an array of
    another shape would stop the sum for everyone (or broadcast into it), a float one change its
    arithmetic. Checked: SecAgg+'s weight factor ``(1,)`` then one int64 array per shape, every value
    in ``[0, 2**32)``, each ``.npy`` payload no larger than its shape needs, decoded without pickle."""
    if reply.has_error():
        return None  # the workflow counts it as a dropout
    from flwr.compat.common import recorddict_compat as compat

    from fedlinear.common import npy

    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
    payload = None if configs is None else configs.get(Key.MASKED_PARAMETERS)
    wanted = [(1,), *[tuple(int(n) for n in shape) for shape in shapes]]
    if not isinstance(payload, list) or len(payload) != len(wanted):
        count = len(payload) if isinstance(payload, list) else 0
        return f"malformed masked vector: {count} arrays, expected {len(wanted)}"
    for i, (data, shape) in enumerate(zip(payload, wanted, strict=True)):
        size = int(np.prod(shape))
        if not isinstance(data, bytes) or len(data) > 8 * size + 1024:
            return f"malformed masked vector: array {i} is not the .npy bytes of {size} integers"
        try:
            array = npy.loads(data)
        except Exception:  # noqa: BLE001 - undecodable bytes are a bad reply
            return f"malformed masked vector: array {i} cannot be decoded"
        if array.dtype != np.int64 or array.shape != shape:
            return f"malformed masked vector: array {i} is {array.dtype} {array.shape}, expected int64 {shape}"
        if array.size and (int(array.min()) < 0 or int(array.max()) >= MODULUS_RANGE):
            return f"malformed masked vector: array {i} has values outside [0, 2**32)"
    try:
        compat.recorddict_to_fitres(reply.content, True)
    except Exception:  # noqa: BLE001 - the workflow reads it next
        return "malformed masked vector: the reply is not a fit result"
    return None


class _Capture(Strategy):
    """The legacy strategy SecAgg+ needs: it names the sampled parties and keeps the aggregate.

    ``unmask_stage`` hands every result the same, already averaged, parameters; they are kept as
    they are (no second averaging)."""

    def __init__(self, node_ids: list[int], grid) -> None:
        self.node_ids = list(node_ids)
        self.grid = grid
        self.aggregate: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        # the content is replaced by the real train task after setup (see _Workflow.run_round)
        return [(GridClientProxy(nid, self.grid, 0), FitIns(Parameters([], ""), {})) for nid in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.aggregate = [np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ stages, driven one round at a time, with parties that drop out before they
    shared their keys removed from the protocol instead of halting it."""

    aggregated: set[int]

    def run_round(self, grid: _StageGrid, context: LegacyContext, contents: dict[int, RecordDict]) -> str | None:
        """Run the four stages; None when an aggregate was computed, else why the round halted."""
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        state = WorkflowState()
        self.aggregated = set()
        try:
            self.setup_stage(grid, context, state)  # its threshold verdict still counts silent parties
            for nid in state.nid_to_fitins:
                state.nid_to_fitins[nid] = contents[nid]  # the real train task, carried by stage 3
            if not self._keep_responsive(state):
                return self._halt("setup", state)
            self.share_keys_stage(grid, context, state)
            if not self._keep_responsive(state):
                return self._halt("share keys", state)
            if not self.collect_masked_vectors_stage(grid, context, state):
                return self._halt("collect masked vectors", state)
            self.aggregated = set(state.active_node_ids)
            if not self.unmask_stage(grid, context, state):
                return self._halt("unmask", state)
        except Exception as exc:  # noqa: BLE001 - a protocol failure fails this round, not the run
            return f"secure aggregation failed: {type(exc).__name__}: {exc}"
        return None

    def _keep_responsive(self, state) -> bool:
        """Forget the parties that did not answer the last stage (before any mask involved them)."""
        alive = set(state.active_node_ids)
        state.sampled_node_ids = set(alive)
        state.nid_to_neighbours = {
            nid: neighbours & alive for nid, neighbours in state.nid_to_neighbours.items() if nid in alive
        }
        return len(alive) >= 2 and self._check_threshold(state)

    def _halt(self, stage: str, state) -> str:
        return (
            f"secure aggregation halted at stage '{stage}': {len(state.active_node_ids)} parties left, "
            f"fewer than the reconstruction threshold {state.threshold} of some party's neighbours "
            "(config keys 'secagg-reconstruction-threshold', 'secagg-num-shares')"
        )


def describe(cfg: RunConfig) -> str:
    """One line for the run's log: the protocol's settings and its error bound."""
    bound = 2.0 * cfg.secagg_clipping_range / cfg.secagg_quantization_range
    return (
        f"secure aggregation (SecAgg+): clipping range ±{cfg.secagg_clipping_range:g}, quantization range "
        f"{cfg.secagg_quantization_range} (step {bound:.3g}), shares {cfg.secagg_num_shares:g}, "
        f"threshold {cfg.secagg_reconstruction_threshold:g}, {cfg.secagg_timeout:g} s a stage at most"
    )


__all__ = ["SecureRound", "SecureSum", "apply_update", "describe", "quantization_bound", "run_protocol", "secure_sum", "train_round", "training_clipping_range"]
