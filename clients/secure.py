"""Client side of secure aggregation: the ``train.secagg`` handler and the mods around it.

The server's SecAgg+ rounds (server/secure.py) arrive as message type ``train.secagg``, four
messages a round (setup, share keys, collect masked vectors, unmask). Flower's ``secaggplus_mod``
runs the protocol; it is attached to this one handler through :data:`MODS` and never app-wide (it
would read every other task as a protocol message). At the "collect masked vectors" stage the mod
calls :func:`masked_update`, which trains with the same local training as the clear path
(``clients.client_app.fit``, passed in) and hands the mod the **update** (new weights minus the
received global weights) in the legacy ``fitres.*`` format it expects; the mod quantizes and masks
it, and only the masked vector leaves the node.

Before the update is released it is

* clipped to L2 norm ``C`` when the task carries Flower's DP clipping norm
  (``flwr.supercore.differential_privacy.KEY_CLIPPING_NORM``): under secure aggregation the server
  cannot clip individual updates, so the clients must (``dp = central-client-clip``);
* checked against the protocol's clipping range: SecAgg+ would silently clip a coordinate outside
  ``±secagg-clipping-range`` and bias the aggregate, so the node fails the task instead (it then
  drops out of the round, which the protocol survives).

Stochastic rounding in Flower's quantizer draws from NumPy's global RNG. :func:`_as_train` seeds
it from (seed, round, partition id or node id) for the task, so a secure run is reproducible like a clear one,
and restores the previous RNG state afterwards, so nothing else in the process sees a predictable
stream. The masks themselves come from ``os.urandom`` and key agreement, not from that RNG, expanded
by :func:`common.secagg_prg.pseudo_rand_gen` (Flower's own folds each seed to 32 bits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, MessageType, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlinear.common import model as lm
from fedlinear.common import dpols, fixedpoint, protocol, scaling, secagg_prg
from fedlinear.clients.errors import error_reply
from fedlinear.common.config import parsed
from fedlinear.common.errors import FedLinearError

# Flower 1.42 expands mask seeds through a 32-bit seed: use full-strength masks (common/secagg_prg.py),
# as server/secure.py does on the other side
# (the module's global, which the mod function reads; ``flwr.client.mod.secure_aggregation.secaggplus_mod``
# as an attribute is the function itself)
secaggplus_mod.__globals__["pseudo_rand_gen"] = secagg_prg.pseudo_rand_gen

Fit = Callable[[Message, Context], tuple[lm.LinearWeights, MetricRecord]]


def _guard(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: any failure becomes an error reply with a one-line reason (the node drops out
    of this round's protocol; the run goes on)."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - reported to the server (and logged when unexpected)
        return error_reply(msg, exc, "secure aggregation task")


def _as_train(msg: Message, context: Context, call_next) -> Message:
    """Present the task to ``secaggplus_mod`` as a plain ``train`` message (the only type it acts
    on), with NumPy's global RNG seeded for reproducible stochastic rounding; undo both afterwards."""
    original = msg.metadata.message_type
    saved = np.random.get_state()
    np.random.seed(_rounding_seed(msg, context))
    msg.metadata.message_type = MessageType.TRAIN
    try:
        reply = call_next(msg, context)
    finally:
        msg.metadata.message_type = original
        np.random.set_state(saved)
    reply.metadata.message_type = original
    return reply


def _rounding_seed(msg: Message, context: Context) -> int:
    """A 32-bit seed from (run seed, group id = round, node): quantization noise only, not a secret."""
    seed = parsed(context.run_config).seed
    group = msg.metadata.group_id
    round_id = int(group) if str(group).isdigit() else 0
    node = int(context.node_config.get("partition-id", msg.metadata.dst_node_id))
    return int(np.random.SeedSequence([seed, round_id, node, 0x5ECA66]).generate_state(1)[0])


# The mods of the ``train.secagg`` handler, outermost first.
MODS = [_guard, _as_train, secaggplus_mod]


def masked_update(msg: Message, context: Context, fit: Fit) -> Message:
    """Train locally (``fit``) and reply with the update in the ``fitres`` format ``secaggplus_mod``
    quantizes and masks. Raises FedLinearError when the update cannot be sent faithfully."""
    arrays = msg.content[protocol.RECORD_ARRAYS]
    config = msg.content[protocol.RECORD_CONFIG]
    names = list(arrays.keys())
    received = {name: np.asarray(arrays[name].numpy(), dtype=np.float64) for name in names}
    new_weights, metrics = fit(msg, context)
    trained = new_weights.as_dict()
    update = [np.asarray(trained[name], dtype=np.float64).reshape(received[name].shape) - received[name] for name in names]
    if KEY_CLIPPING_NORM in config:
        update = clip_update(update, float(config[KEY_CLIPPING_NORM]))
    equal = str(config.get(protocol.KEY_SECAGG_WEIGHTING, protocol.WEIGHTING_EQUAL)) == protocol.WEIGHTING_EQUAL
    weight = 1 if equal else int(metrics[protocol.METRIC_NUM_EXAMPLES])
    check_fits(update, weight, context)
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(update),
        num_examples=weight,
        metrics={},  # nothing per node in the clear: no train loss, no client key
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def clip_update(update: list[np.ndarray], clipping_norm: float) -> list[np.ndarray]:
    """Scale the update to L2 norm at most ``clipping_norm`` (a zero update stays zero)."""
    norm = float(np.sqrt(sum(float(np.sum(a * a)) for a in update)))
    if norm <= clipping_norm or norm == 0.0:
        return update
    return [a * (clipping_norm / norm) for a in update]


def check_fits(update: list[np.ndarray], weight: int, context: Context) -> None:
    """Refuse an update SecAgg+ would silently distort or that voids the error bound of
    server/secure.py: a coordinate outside the clipping range, or a weight above the protocol's
    maximum (the mod scales the update by ``weight / max_weight`` before it clips)."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None or "clipping_range" not in state:
        raise FedLinearError("secure aggregation: training task without a protocol setup")
    clipping_range = float(state["clipping_range"])
    max_weight = float(state["max_weight"])
    if not 0 < weight <= max_weight:
        raise FedLinearError(
            f"secure aggregation: this node's weight {weight} exceeds the round's maximum {max_weight:g}"
        )
    largest = max((float(np.max(np.abs(a))) if a.size else 0.0) for a in update)
    if not np.isfinite(largest):
        raise FedLinearError("secure aggregation: the local update is not finite")
    if largest > clipping_range:
        raise FedLinearError(
            f"secure aggregation: the local update has a coordinate outside ±{clipping_range:g}, which "
            "SecAgg+ would clip silently; raise 'secagg-clipping-range' (or standardize the data)"
        )


# -- secure sums of statistics (``train.secsum``, server/secure.py secure_sum) ------------------------

Load = Callable[[Context], tuple[np.ndarray, np.ndarray]]


def _centre(arguments: dict[str, np.ndarray], width: int) -> np.ndarray:
    centre = np.asarray(arguments.get(protocol.ARG_CENTRE, np.empty(0)), np.float64).ravel()
    if centre.shape != (width,) or not np.isfinite(centre).all():
        raise FedLinearError(f"secure sum: the server's centre has {centre.size} values, the shard has {width} columns")
    return centre


def _moments(x: np.ndarray, y: np.ndarray, arguments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    moments = scaling.Moments.of(x, y)
    return {"count": np.array([float(moments.count)]), "total": moments.total}


def _diagonal(x: np.ndarray, y: np.ndarray, arguments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    centre = _centre(arguments, x.shape[1] + 1)
    return {"diagonal": scaling.Scatter.of(x, y, centre, full=False).matrix}


def _upper(x: np.ndarray, y: np.ndarray, arguments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    centre = _centre(arguments, x.shape[1] + 1)
    matrix = scaling.Scatter.of(x, y, centre, full=True).matrix
    return {"upper": matrix[np.triu_indices(matrix.shape[0], k=1)]}


def _dpols_gram(x: np.ndarray, y: np.ndarray, arguments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DP-FedOLS under secure aggregation: the clear query's clipped Gram matrix (common/dpols.py), in
    the server's transform when it sends one, as its upper triangle with the diagonal."""
    bounds = np.asarray(arguments.get(protocol.ARG_BOUNDS, np.empty(0)), np.float64).ravel()
    if bounds.shape != (2,) or not (np.isfinite(bounds).all() and (bounds > 0).all()):
        raise FedLinearError(f"secure sum: the DP-FedOLS sum needs two finite bounds > 0, got {bounds.tolist()}")
    names = [f"{protocol.TRANSFORM_PREFIX}{name}" for name in protocol.TRANSFORM_ARRAYS]
    if any(name in arguments for name in names):
        arrays = {name[len(protocol.TRANSFORM_PREFIX):]: arguments.get(name, np.empty(0)) for name in names}
        x, y = scaling.Transform.from_arrays(arrays, x.shape[1]).apply(x, y)
    gram = dpols.clipped_gram(x, y, float(bounds[0]), float(bounds[1]))
    return {"gram": gram[np.triu_indices(gram.shape[0])]}


# What a node may be asked to sum securely: name -> f(x, y, arguments) -> {array name: float64 array}.
# Each is a sum over the shard's rows (so the pooled value is the sum over the parties'), and nothing
# else is computed on the server's request.
STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    protocol.STAT_MOMENTS: _moments,
    protocol.STAT_DIAGONAL: _diagonal,
    protocol.STAT_UPPER: _upper,
    protocol.STAT_DPOLS_GRAM: _dpols_gram,
}


def masked_statistics(msg: Message, context: Context, load: Load) -> Message:
    """Compute the requested statistic of this node's shard (``load`` gives ``(x, y)``) and reply with
    its fixed-point limbs (common/fixedpoint.py) in the ``fitres`` format ``secaggplus_mod`` masks.
    Raises FedLinearError when the task is malformed or a value does not fit the announced window."""
    config = msg.content.config_records.get(protocol.RECORD_CONFIG)
    if config is None or str(config.get(protocol.KEY_STATISTIC, "")) not in STATISTICS:
        raise FedLinearError("secure sum: unknown statistic")
    compute = STATISTICS[str(config[protocol.KEY_STATISTIC])]
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None or "clipping_range" not in state:
        raise FedLinearError("secure sum: task without a protocol setup")
    bits = int(config[protocol.KEY_SUM_BITS])
    if float(state["clipping_range"]) != float(1 << (bits - 1)) or int(state["target_range"]) != 1 << bits or float(state["max_weight"]) != 1.0:
        raise FedLinearError("secure sum: the protocol's ranges do not carry the fixed-point limbs exactly")
    lows = msg.content.array_records.get(protocol.RECORD_SUM_LO)
    arguments_record = msg.content.array_records.get(protocol.RECORD_ARGUMENTS)
    arguments = {name: arguments_record[name].numpy() for name in arguments_record} if arguments_record is not None else {}
    x, y = load(context)
    values = compute(x, y, arguments)
    names = list(config[protocol.KEY_SUM_NAMES])
    if sorted(names) != sorted(values) or lows is None:
        raise FedLinearError(f"secure sum: the server asked for {names}, the statistic gives {sorted(values)}")
    limbs = []
    for name in names:
        enc = fixedpoint.from_parts(
            lows[name].numpy(),
            {
                "limbs": config[f"{protocol.KEY_SUM_LIMBS_PREFIX}{name}"],
                "span": config[f"{protocol.KEY_SUM_SPAN_PREFIX}{name}"],
                "bits": bits,
                "num-parties": config[protocol.KEY_SUM_PARTIES],
            },
        )
        limbs.append(fixedpoint.encode(values[name], enc, name))
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(limbs),
        num_examples=1,
        metrics={},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
