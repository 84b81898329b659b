"""fedlinear's ClientApp: each node reads only its own shard and trains the linear model locally.

The shard is located by ``--node-config "data-uri=..."`` (deployment: one SuperNode per party) or by
the run config's ``data-uri`` template formatted with the node's ``partition-id`` (simulation).

Three message handlers:

* ``query``: in stage ``describe``, report the shard's feature count, size and fingerprint, plus
  ``n`` and ``Σ[x y]`` when asked; in stage ``scatter``, ``Σ(z − μ)(z − μ)ᵀ`` (or its diagonal)
  around the pooled mean ``μ`` the server sends (see :mod:`common.scaling`), with the R factor of
  stage ``fedols-r`` in the same reply when the request says ``with-r``;
* ``train``: local mini-batch SGD (``numpy`` or ``keras`` engine) from the received weights, in the
  standardized variables the server's transform defines, with the step size the server sends (both
  in the task's config, :mod:`common.protocol`; a task without a step size is refused);
* ``evaluate``: MSE, in the target's own units, of the received weights on the local shard.

A problem with the shard or the config is answered with a one-line error reply: it fails this
node's task, never the run. TensorFlow is imported only by the ``keras`` engine.
"""

from __future__ import annotations

import functools

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.constant import SType
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlinear.clients import secure  # secure aggregation hook
from fedlinear import flower_fixes
from fedlinear.clients import faults
from fedlinear.clients.byname import ClientAppByName
from fedlinear.clients.errors import ERROR_CODE_INTERNAL, ERROR_CODE_USER, error_reply  # noqa: F401 - codes re-exported
from fedlinear.common import model as lm
from fedlinear.common import npy
from fedlinear.common import dpols, dpstats, fedols, privacy, protocol, scaffold, scaling
from fedlinear.common.config import RunConfig, parsed
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.shardcache import load_csv_cached
from fedlinear.common.storage import fingerprint

app = ClientAppByName(__name__)  # pickles as its import path: Ray sends the app with every message (clients/byname.py)
flower_fixes.apply()  # Flower 1.42's fixedclipping_mod divides by a zero update norm

# Shards parsed in this process; the simulation engine keeps workers (and this cache) across rounds.
_SHARDS: dict[tuple[str, int, str], Dataset] = {}


def run_config(context: Context) -> RunConfig:
    """The parsed, validated run config of this task (parsed once per distinct config, common.config.parsed).

    What it holds is the run's own settings (shard location, engine, epochs, batch size, seed); what the
    server resolves for a round (learning rate, standardization, ...) comes only in the task's config.
    """
    return parsed(context.run_config)


def shard_uri(context: Context, cfg: RunConfig) -> str:
    """This node's data URI: node config first, else the run config's template."""
    node = context.node_config
    if "data-uri" in node and str(node["data-uri"]):
        return str(node["data-uri"])
    if not cfg.data_uri:
        raise FedLinearError(
            "no data for this node: start the SuperNode with --node-config \"data-uri=PATH_OR_S3_URI\" "
            "or set the run config key 'data-uri' (a template with {partition-id} in simulation)"
        )
    if "{partition-id}" in cfg.data_uri:
        if "partition-id" not in node:
            raise FedLinearError(
                f"config key 'data-uri' is a template ({cfg.data_uri}) but this node has no partition-id"
            )
        return cfg.data_uri.replace("{partition-id}", str(int(node["partition-id"])))
    return cfg.data_uri


def partition_id(context: Context) -> int | None:
    value = context.node_config.get("partition-id")
    return None if value is None else int(value)


# Content digests of the shards parsed in this process (common.model.shard_digest), as _SHARDS.
_DIGESTS: dict[tuple[str, int, str], bytes] = {}


def client_key(context: Context, cfg: RunConfig, uri: str, data: Dataset) -> int:
    """This party's key (common.model.client_key): ``partition-id`` when the node has one, else the
    node config's ``party-id``, else the shard's path with a digest of its content."""
    pid = partition_id(context)
    if pid is not None:
        return int(pid)
    party = str(context.node_config.get("party-id", "") or "")
    if party:
        return lm.client_key(None, uri, party_id=party)
    cache = (uri, cfg.target_column, cfg.header)
    digest = _DIGESTS.get(cache)
    if digest is None or _SHARDS.get(cache) is not data:
        digest = _DIGESTS[cache] = lm.shard_digest(data.x, data.y)
    return lm.client_key(None, uri, content=digest)


def load_shard(context: Context, cfg: RunConfig) -> tuple[str, Dataset]:
    uri = shard_uri(context, cfg)
    key = (uri, cfg.target_column, cfg.header)
    data = _SHARDS.get(key)
    if data is None:  # through the run's shard cache, shared by a local simulation's actors (common/shardcache.py)
        data = load_csv_cached(uri, target_column=cfg.target_column, header=cfg.header)
        _SHARDS[key] = data
    return uri, data


# Transformed float32 copies of a shard, per (shard, transform digest), up to _MAX_TRANSFORMED_BYTES in
# all (a process that runs many small clients, as inline mode's, keeps every one across rounds).
_TRANSFORMED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_MAX_TRANSFORMED = 64  # entries of _SAFE_RATES
_MAX_TRANSFORMED_BYTES = 256 << 20
_TRANSFORMED_BYTES = [0]


def training_data(
    uri: str, cfg: RunConfig, data: Dataset, transform: scaling.Transform | None, digest: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(z, t)`` float32 for the engines: the shard in the transform's variables (cached); ``digest``
    is ``transform.digest()`` when the caller has it already."""
    if transform is None:
        return data.float32  # cached with the shard
    key = (uri, cfg.target_column, cfg.header, transform.digest() if digest is None else digest)
    cached = _TRANSFORMED.get(key)
    if cached is None:
        z, t = transform.apply(data.x, data.y)  # float64: offsets removed before rounding to float32
        cached = (z.astype(np.float32), t.astype(np.float32))
        size = cached[0].nbytes + cached[1].nbytes
        if not _TRANSFORMED:  # (emptied from outside too: tests)
            _TRANSFORMED_BYTES[0] = 0
        if _TRANSFORMED_BYTES[0] + size > _MAX_TRANSFORMED_BYTES:
            _TRANSFORMED.clear()
            _TRANSFORMED_BYTES[0] = 0
        _TRANSFORMED[key] = cached
        _TRANSFORMED_BYTES[0] += size
    return cached


_SAFE_RATES: dict[tuple, float] = {}


def _safe_rate(
    uri: str, cfg: RunConfig, transform: scaling.Transform | None, x32: np.ndarray, rate: float, digest: str | None = None
) -> float:
    """:func:`common.dpstats.safe_learning_rate` of this shard, cached per shard, transform and rate."""
    if digest is None:
        digest = transform.digest() if transform is not None else ""
    key = (uri, cfg.target_column, cfg.header, digest, rate, cfg.fit_intercept)
    if key not in _SAFE_RATES:
        if len(_SAFE_RATES) >= _MAX_TRANSFORMED:
            _SAFE_RATES.clear()
        _SAFE_RATES[key] = dpstats.safe_learning_rate(x32, rate, cfg.fit_intercept)
    return _SAFE_RATES[key]


# The transforms tasks carried, parsed (protocol.transform) with their digests, by their exact float64
# values: every train task of a run carries the same one, and parsing, checking and hashing it again
# cost more than the rest of a task's bookkeeping.
_TASK_TRANSFORMS: dict[tuple, tuple[scaling.Transform, str]] = {}
_MAX_TASK_TRANSFORMS = 16
_TRANSFORM_KEYS = tuple(f"{protocol.TRANSFORM_PREFIX}{name}" for name in protocol.TRANSFORM_ARRAYS)


def task_transform(config, num_features: int) -> tuple[scaling.Transform | None, str]:
    """``(protocol.transform(config, num_features), its digest)`` (``(None, "")`` for raw variables),
    parsed once per distinct transform in this process. The cache key is the values exactly as the
    parse reads them (float64 bytes, so -0.0 and 0.0 differ) and the feature count; the cached
    arrays are read-only."""
    if _TRANSFORM_KEYS[0] not in config:
        return None, ""
    try:
        key = (num_features, *(np.asarray(config[name], dtype=np.float64).tobytes() for name in _TRANSFORM_KEYS))
    except (KeyError, TypeError, ValueError):  # malformed: protocol.transform says how
        key = None
    cached = _TASK_TRANSFORMS.get(key) if key is not None else None
    if cached is None:
        transform = protocol.transform(config, num_features)
        for array in (transform.shift, transform.matrix):
            array.setflags(write=False)
        cached = (transform, transform.digest())
        if key is not None:
            if len(_TASK_TRANSFORMS) >= _MAX_TASK_TRANSFORMS:
                _TASK_TRANSFORMS.clear()
            _TASK_TRANSFORMS[key] = cached
    return cached


def _config_record(msg: Message) -> ConfigRecord:
    """The task's config record (an empty one when it has none)."""
    config = flower_fixes.record(msg.content, protocol.RECORD_CONFIG, ConfigRecord)
    return ConfigRecord() if config is None else config


_DTYPE_NAMES: dict[np.dtype, str] = {}


def to_array(a: np.ndarray) -> Array:
    """Flower's Array of ``a`` (the same bytes as ``Array(a)``, with the .npy header cached)."""
    name = _DTYPE_NAMES.get(a.dtype)
    if name is None:  # str(dtype) costs more than the rest of this function
        name = _DTYPE_NAMES.setdefault(a.dtype, str(a.dtype))
    return Array(dtype=name, shape=tuple(a.shape), stype=SType.NUMPY, data=npy.dumps(a))


def to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, with the .npy header parsed once per dtype and shape."""
    return npy.loads(array.data) if array.stype == SType.NUMPY else array.numpy()


def to_record(weights: lm.LinearWeights) -> ArrayRecord:
    return ArrayRecord({name: to_array(np.ascontiguousarray(a)) for name, a in weights.as_dict().items()})


def from_record(record: ArrayRecord, num_features: int, uri: str, fit_intercept: bool = True) -> lm.LinearWeights:
    names = lm.weight_names(fit_intercept)
    missing = [name for name in names if name not in record]
    if missing:
        raise FedLinearError(f"server sent weights without {', '.join(missing)}")
    extra = sorted(set(record.keys()) - set(names))
    if extra:
        raise FedLinearError(f"server sent weights {', '.join(extra)} that 'fit-intercept' = {str(fit_intercept).lower()} has not")
    weights = lm.LinearWeights.from_dict({name: to_numpy(record[name]) for name in names})
    if weights.num_features != num_features:
        raise FedLinearError(
            f"{uri}: shard has {num_features} features but the global model has {weights.num_features}"
        )
    return weights


def _guarded(handler):
    """Turn any failure into an error reply with a one-line reason, so only this task fails."""

    # functools.wraps keeps the module-level name: the simulation engine cloudpickles the ClientApp
    # with every message, and a function found by (module, qualname) pickles as a reference,
    # not by value with all its globals (which cost ~20 ms a message here).
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - reported to the server (and logged when unexpected)
            return error_reply(msg, exc)

    return wrapped


@app.query()
@_guarded
def query(msg: Message, context: Context) -> Message:
    """Describe the shard (stage ``describe``), send its centred scatter (stage ``scatter``) or the R
    factor of its centred block (stage ``fedols-r``, :mod:`common.fedols`)."""
    cfg = run_config(context)
    uri, data = load_shard(context, cfg)
    request = _config_record(msg)
    stage = str(request.get(protocol.KEY_STAGE, protocol.STAGE_DESCRIBE))
    _refuse_under_own_privacy(cfg, stage, request)
    if stage == protocol.STAGE_FEDOLS_R:  # the yardstick (server/yardstick.py) and strategy = fedols, method qr
        r = fedols.local_r(data.x, data.y, _centre(msg, stage, uri, data))
        return Message(RecordDict({protocol.RECORD_R: ArrayRecord({protocol.ARRAY_R: Array(r)})}), reply_to=msg)
    if stage == protocol.STAGE_DPOLS_GRAM:  # strategy = fedols with dp: the clipped Gram matrix (common/dpols.py)
        if cfg.strategy != "fedols" or cfg.dp == "none":
            raise FedLinearError("a DP-FedOLS query in a run that is not strategy = fedols with dp: refused")
        if cfg.secure_aggregation:  # secure aggregation hook: the clipped sums go through SecAgg+ (train.secsum)
            raise FedLinearError("a DP-FedOLS query in the clear refused: this node's run config has 'secure-aggregation' = true")
        return _dpols_gram(msg, request, uri, data)
    if stage == protocol.STAGE_DP_STATISTICS:  # central DP-FedAvg: the bounded statistics encoding (common/dpstats.py)
        if cfg.dp not in privacy.CENTRAL:
            raise FedLinearError("a DP statistics query in a run without central DP: refused")
        encoding = dpstats.encode(data.x, data.y, cfg.dp_statistics_max_scale)  # this node's own declared range
        record = ArrayRecord({protocol.ARRAY_DP_STATISTICS: Array(encoding)})
        return Message(RecordDict({protocol.RECORD_DP_STATISTICS: record}), reply_to=msg)
    if stage == protocol.STAGE_SCATTER:
        centre = _centre(msg, stage, uri, data)
        scatter = scaling.Scatter.of(data.x, data.y, centre, full=bool(request.get(protocol.KEY_FULL, False)))
        content = RecordDict({protocol.RECORD_SCATTER: ArrayRecord({protocol.ARRAY_SCATTER: Array(scatter.matrix)})})
        if bool(request.get(protocol.KEY_WITH_R, False)):  # the yardstick's R factor too: one ClientApp start less
            try:
                r = fedols.local_r(data.x, data.y, _centre(msg, stage, uri, data, protocol.ARRAY_R_CENTRE))
            except Exception:  # noqa: BLE001 - the scatter still goes; the server asks stage fedols-r, which says why
                r = None
            if r is not None:
                content[protocol.RECORD_R] = ArrayRecord({protocol.ARRAY_R: Array(r)})
        return Message(content, reply_to=msg)
    pid = partition_id(context)
    info = {
        protocol.SHARD_NUM_FEATURES: data.num_features,
        protocol.SHARD_NUM_EXAMPLES: data.num_examples,
        protocol.SHARD_CLIENT_KEY: client_key(context, cfg, uri, data),
    }
    if not (cfg.private or bool(request.get(protocol.KEY_PRIVATE, False))):  # under privacy path and hash stay here
        info[protocol.SHARD_DATA_URI] = uri
        info[protocol.SHARD_FINGERPRINTS] = [str(fp) for fp in map(_fingerprint_json, data.sources)]
    if pid is not None:
        info[protocol.SHARD_PARTITION_ID] = pid
    content = RecordDict({protocol.RECORD_SHARD: ConfigRecord(info)})
    if bool(request.get(protocol.KEY_WANT_MOMENTS, False)):
        total = scaling.Moments.of(data.x, data.y).total
        content[protocol.RECORD_MOMENTS] = ArrayRecord({protocol.ARRAY_TOTAL: Array(total)})
    return Message(content, reply_to=msg)


def _refuse_under_own_privacy(cfg: RunConfig, stage: str, request: ConfigRecord) -> None:
    """Under this node's OWN private run config (``dp`` or ``secure-aggregation``, RunConfig.private) the
    server is not trusted: no R factor, no scatter and no column sums leave in the clear, whatever the
    query says. What privacy itself needs stays: DP-FedOLS's clipped Gram (its own stage, checked
    there) and the shard description without statistics; secure statistics go through SecAgg+ in a
    train task (``train.secsum``), not through this query."""
    if not cfg.private:
        return
    why = f"this node's run config is private ({_privacy_keys(cfg)}): the server may not see its"
    if stage == protocol.STAGE_FEDOLS_R:
        raise FedLinearError(f"a fedols-r query refused: {why} R factor in the clear")
    if stage == protocol.STAGE_SCATTER:
        raise FedLinearError(f"a scatter query refused: {why} scatter in the clear")
    if stage == protocol.STAGE_DESCRIBE and bool(request.get(protocol.KEY_WANT_MOMENTS, False)):
        raise FedLinearError(f"a shard query asking for moments refused: {why} column sums in the clear")


def _privacy_keys(cfg: RunConfig) -> str:
    keys = [f"'dp' = {cfg.dp}"] if cfg.dp != privacy.NO_DP else []
    if cfg.secure_aggregation:
        keys.append("'secure-aggregation' = true")
    return ", ".join(keys)


def _dpols_gram(msg: Message, request: ConfigRecord, uri: str, data: Dataset) -> Message:
    """DP-FedOLS: rows in the query's transform (raw without one), clipped to its bounds, and their Gram matrix."""
    bounds = [request.get(key) for key in (protocol.KEY_FEATURE_BOUND, protocol.KEY_TARGET_BOUND)]
    if not all(isinstance(b, float) and 0 < b < float("inf") for b in bounds):
        raise FedLinearError(f"{uri}: the DP-FedOLS query needs finite bounds > 0, got {bounds}")
    transform = protocol.transform(request, data.num_features)
    x, y = (data.x, data.y) if transform is None else transform.apply(data.x, data.y)
    gram = dpols.clipped_gram(x, y, bounds[0], bounds[1])
    return Message(RecordDict({protocol.RECORD_GRAM: ArrayRecord({protocol.ARRAY_GRAM: Array(gram)})}), reply_to=msg)


def _centre(msg: Message, stage: str, uri: str, data: Dataset, name: str = protocol.ARRAY_CENTRE) -> np.ndarray:
    """The pooled mean of ``[x, y]`` a ``scatter`` or ``fedols-r`` query carries (array ``name``), checked."""
    record = flower_fixes.record(msg.content, protocol.RECORD_CENTRE, ArrayRecord)
    if record is None or name not in record:
        raise FedLinearError(f"{stage} query without the {'pooled' if name == protocol.ARRAY_CENTRE else name} centre")
    centre = to_numpy(record[name]).astype(np.float64).ravel()
    if centre.shape != (data.num_features + 1,) or not np.isfinite(centre).all():
        raise FedLinearError(
            f"{uri}: the server's centre has {centre.shape[0]} values, the shard has {data.num_features + 1} columns"
        )
    return centre


def _fingerprint_json(uri: str) -> str:
    import json

    return json.dumps(fingerprint(uri), sort_keys=True)


def local_dp(
    old: lm.LinearWeights, new: lm.LinearWeights, settings: privacy.LocalDp, cfg: RunConfig, server_round: int,
    key: int,
) -> lm.LinearWeights:  # fmt: skip
    """``dp = local``: clip this node's update and add Gaussian noise before it leaves (common/privacy.py)."""
    rng = privacy.noise_rng(settings.noise_seed, cfg.seed, server_round, key, privacy.LOCAL_DP_STREAM)
    released, _ = privacy.local_dp_release(  # over whatever weights the model has (no bias without an intercept)
        new.arrays(), old.arrays(), settings.clipping_norm, settings.noise_multiplier, rng
    )
    return lm.LinearWeights.from_arrays(released)


def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod``, for tasks that carry a clipping norm (``dp = central-client-clip``).

    Attached to the train handler only: Flower's mods do not check the message type.
    """
    config = flower_fixes.record(msg.content, protocol.RECORD_CONFIG, ConfigRecord)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def controls(msg: Message, num_features: int) -> tuple[np.ndarray, np.ndarray] | None:
    """SCAFFOLD's ``(c, c_i)`` the task carries (``strategy = scaffold``), checked; None without them."""
    record = flower_fixes.record(msg.content, protocol.RECORD_CONTROL, ArrayRecord)
    if record is None:
        return None
    out = []
    for name in (protocol.ARRAY_C, protocol.ARRAY_CI):
        if name not in record:
            raise FedLinearError(f"SCAFFOLD task without the control variate '{name}'")
        value = to_numpy(record[name]).astype(np.float64).ravel()
        if value.shape != (num_features + 1,) or not np.isfinite(value).all():
            raise FedLinearError(f"SCAFFOLD task: control variate '{name}' is not {num_features + 1} finite values")
        out.append(value)
    return out[0], out[1]


def fit(msg: Message, context: Context, extras: dict | None = None) -> tuple[lm.LinearWeights, MetricRecord]:
    """Local mini-batch SGD from the global weights: the new weights and the metrics (shared by
    ``train`` and the secure aggregation path, clients/secure.py). Under SCAFFOLD the steps carry the
    correction ``c - c_i`` and ``extras["control"]`` gets ``Δc_i`` (option II, common/scaffold.py)."""
    cfg = run_config(context)
    uri, data = load_shard(context, cfg)
    weights = from_record(msg.content[protocol.RECORD_ARRAYS], data.num_features, uri, cfg.fit_intercept)
    config = msg.content[protocol.RECORD_CONFIG]  # the round's settings, as the server resolved them
    server_round = protocol.server_round(config)
    faults.inject(context, server_round)  # a test hook, inert unless FEDLINEAR_TEST_FAULTS is set
    learning_rate = protocol.learning_rate(config)
    batch_size = protocol.batch_size(config, cfg.batch_size)
    transform, digest = task_transform(config, data.num_features)
    key = client_key(context, cfg, uri, data)
    orders = [
        lm.batch_order(data.num_examples, cfg.seed, server_round, key, epoch) for epoch in range(cfg.local_epochs)
    ]
    x32, y32 = training_data(uri, cfg, data, transform, digest)
    if cfg.dp != privacy.NO_DP:  # noisy or no statistics: a step that would diverge on this shard is capped
        learning_rate = _safe_rate(uri, cfg, transform, x32, learning_rate, digest)
    control = controls(msg, data.num_features)
    if control is not None and cfg.engine != "numpy":
        raise FedLinearError("strategy = scaffold needs engine = numpy")
    extra = {} if control is None else {"correction": control[0] - control[1]}
    new_weights, loss = lm.ENGINES[cfg.engine](
        weights,
        x32,
        y32,
        epochs=cfg.local_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        orders=orders,
        proximal_mu=protocol.proximal_mu(config),
        **extra,
    )
    if not np.isfinite(new_weights.vector()).all():
        raise FedLinearError(
            f"{uri}: local training diverged (non-finite weights); lower 'learning-rate' (now {learning_rate:g}) "
            "or set 'standardize' to auto"
        )
    if control is not None and extras is not None:
        steps = scaffold.local_steps(data.num_examples, batch_size, cfg.local_epochs)
        extras["control"] = scaffold.control_delta(weights.vector(), new_weights.vector(), control[0], steps, learning_rate)
    local = privacy.LocalDp.from_config(config)  # dp = local: the task says so
    if local is not None:
        new_weights = local_dp(weights, new_weights, local, cfg, server_round, key)
    metrics = MetricRecord({
        protocol.METRIC_NUM_EXAMPLES: data.num_examples,
        protocol.METRIC_TRAIN_LOSS: loss,
        protocol.METRIC_CLIENT_KEY: key,
        protocol.METRIC_UNIT_WEIGHT: 1,
    })  # fmt: skip
    return new_weights, metrics


@app.train(mods=[clip_when_asked])
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Local mini-batch SGD from the global weights; reply with new weights and the train loss."""
    extras: dict = {}
    if flower_fixes.record(msg.content, protocol.RECORD_CONTROL, ArrayRecord) is not None:  # strategy = scaffold: Δc_i comes back in extras
        new_weights, metrics = fit(msg, context, extras)
    else:
        new_weights, metrics = fit(msg, context)
    content = RecordDict({protocol.RECORD_ARRAYS: to_record(new_weights), protocol.RECORD_METRICS: metrics})
    if "control" in extras:  # strategy = scaffold
        content[protocol.RECORD_CONTROL] = ArrayRecord({protocol.ARRAY_DELTA: Array(extras["control"])})
    return Message(content, reply_to=msg)


@app.train(protocol.SECAGG_ACTION, mods=secure.MODS)  # secure aggregation hook: SecAgg+ on this handler only
def train_secure(msg: Message, context: Context) -> Message:
    """SecAgg+ rounds (``train.secagg``): the same local training, only the masked update leaves."""
    return secure.masked_update(msg, context, fit)


def _shard_xy(context: Context) -> tuple[np.ndarray, np.ndarray]:
    """This node's shard as float64 ``(x, y)`` (for the secure sums)."""
    _, data = load_shard(context, run_config(context))
    return data.x, data.y


@app.train(protocol.SECSUM_ACTION, mods=secure.MODS)  # secure aggregation hook: statistics summed through SecAgg+
def train_secure_sum(msg: Message, context: Context) -> Message:
    """SecAgg+ sums of statistics (``train.secsum``): only the masked limbs of this shard's sums leave."""
    return secure.masked_statistics(msg, context, _shard_xy)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """MSE of the global weights on this node's shard, in the target's own units."""
    cfg = run_config(context)
    uri, data = load_shard(context, cfg)
    weights = from_record(msg.content[protocol.RECORD_ARRAYS], data.num_features, uri, cfg.fit_intercept)
    config = _config_record(msg)
    transform, _ = task_transform(config, data.num_features)
    if transform is None:
        residual = weights.predict(data.x) - data.y
    else:
        kernel, bias = transform.to_raw(weights.kernel, weights.bias_value)
        residual = data.x @ kernel + bias - data.y
    metrics = MetricRecord({
        protocol.METRIC_NUM_EXAMPLES: data.num_examples,
        protocol.METRIC_EVAL_MSE: float(np.mean(residual * residual)),
    })  # fmt: skip
    return Message(RecordDict({protocol.RECORD_METRICS: metrics}), reply_to=msg)
