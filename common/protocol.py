"""The wire protocol between fedlinear's ServerApp and its ClientApp: every name that crosses it.

Both sides import these names; nobody else spells them. The values are part of the protocol (a
server and a client of different versions must agree on them) and of what a run directory records,
so they never change.

A Flower Message has a type (Flower's ``MessageType``: ``query``, ``train``, ``evaluate``, or
``train.secagg`` for secure aggregation) and a content of named records:

Query (``query``), the shard query before round 1, one stage per message, named in ``config``:

* ``describe``: config ``{stage, want-moments, private}`` -> ``shard`` ConfigRecord (:data:`SHARD_KEYS`,
  and :data:`OPTIONAL_SHARD_KEYS` unless ``private``), plus ``moments`` ArrayRecord ``{total: Σ[x y]}``
  when ``want-moments``;
* ``scatter``: config ``{stage, full}``, ``centre`` ArrayRecord ``{centre: μ}`` -> ``scatter``
  ArrayRecord ``{scatter: Σ(z − μ)(z − μ)ᵀ}`` (its diagonal unless ``full``);
* ``fedols-r``: config ``{stage}``, ``centre`` -> ``r`` ArrayRecord ``{r: R of [x − μx, 1, y − μy]}``.

Train (``train``): ``arrays`` (the global weights, :data:`WEIGHT_NAMES`) and ``config``: the settings
the server resolved for the round (:func:`train_config`: ``learning-rate``, ``batch-size``, the
standardization transform), ``server-round`` and, by strategy and privacy mechanism, ``proximal-mu`` (FedProx), the
``local-dp-*`` keys (``dp = local``, :mod:`common.privacy`), Flower's ``clipping_norm``
(``flwr.supercore.differential_privacy.KEY_CLIPPING_NORM``, set by Flower's client-side clipping
wrapper). Reply: ``arrays`` (the new weights) and ``metrics`` (:data:`TRAIN_METRICS`). Under
``strategy = scaffold`` the task also carries ``control`` ``{c, c-i}`` and the reply ``control`` ``{delta}``.

Evaluate (``evaluate``): ``arrays`` and ``config`` (:func:`evaluate_config`, ``server-round``) ->
``metrics`` ``{num-examples, eval-mse}``.

Secure train (``train.secagg``): Flower's SecAgg+ stages and records; the stage that collects the
masked vectors carries the train task's ``arrays`` and ``config`` (plus ``secagg-weighting``).

Secure sum (``train.secsum``): the same SecAgg+ stages; the stage that collects the masked vectors
carries ``config`` (``statistic``, ``sum-names``, ``sum-limbs-<name>``, ``sum-span-<name>``, ``sum-bits``,
``sum-parties``),
``secure-sum-lo`` (the grid exponent of every value) and ``arguments``; the node replies with the
masked fixed-point limbs of its statistics only (common/fixedpoint.py).

A task that fails is answered with an error reply: :data:`ERROR_CODE_USER` or :data:`ERROR_CODE_INTERNAL`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlinear.common import scaling
from fedlinear.common.errors import FedLinearError
from fedlinear.common.model import WEIGHT_NAMES  # noqa: F401 - the arrays of ``arrays``: kernel (d, 1), bias (1,)

# -- message types (besides Flower's MessageType.QUERY / TRAIN / EVALUATE) ---------------------------
SECAGG_ACTION = "secagg"  # the clients' ``@app.train("secagg")`` handler
SECAGG_MESSAGE_TYPE = f"train.{SECAGG_ACTION}"  # MessageType.TRAIN + "." + the action
SECSUM_ACTION = "secsum"  # the clients' ``@app.train("secsum")`` handler: statistics summed through SecAgg+
SECSUM_MESSAGE_TYPE = f"train.{SECSUM_ACTION}"

# -- record names: the keys of a message's content ---------------------------------------------------
RECORD_CONFIG = "config"  # every request's ConfigRecord (Flower's strategies' ``configrecord_key``)
RECORD_ARRAYS = "arrays"  # the model's weights, both ways (Flower's strategies' ``arrayrecord_key``)
RECORD_METRICS = "metrics"  # train and evaluate replies
RECORD_SHARD = "shard"  # describe reply: the shard's description
RECORD_MOMENTS = "moments"  # describe reply: column sums
RECORD_CENTRE = "centre"  # scatter and fedols-r requests: the pooled mean
RECORD_SCATTER = "scatter"  # scatter reply
RECORD_R = "r"  # fedols-r reply
RECORD_SUM_LO = "secure-sum-lo"  # secure sum task: the fixed-point grid exponent of every value, per name
RECORD_ARGUMENTS = "arguments"  # secure sum task: what the statistic gets besides the shard (the centre)
RECORD_CONTROL = "control"  # strategy = scaffold: train task {c, c-i}, train reply {delta} (common/scaffold.py)

# -- array names inside those records (``arrays`` holds WEIGHT_NAMES) --------------------------------
ARRAY_TOTAL = "total"  # in ``moments``: Σ[x y], (d + 1,)
ARRAY_CENTRE = "centre"  # in ``centre``: μ, (d + 1,)
ARRAY_R_CENTRE = "r-centre"  # in ``centre`` of a scatter request with ``with-r``: the R factor's centre, (d + 1,)
ARRAY_SCATTER = "scatter"  # in ``scatter``: (d + 1, d + 1), or (d + 1,) for the diagonal
ARRAY_R = "r"  # in ``r``: (d + 2, d + 2) upper triangular
RECORD_GRAM = "gram"  # dpols-gram reply (DP-FedOLS, common/dpols.py)
ARRAY_GRAM = "gram"  # in ``gram``: Σ g gᵀ over the clipped rows g = [x̄, 1, ȳ], (d + 2, d + 2)
RECORD_DP_STATISTICS = "dp-statistics"  # dp-statistics reply (common/dpstats.py)
ARRAY_DP_STATISTICS = "encoding"  # in ``dp-statistics``: w ⊙ [a, b], L2 norm <= 1, (2 (d + 1),)
ARRAY_C = "c"  # in ``control`` (train task): the server control variate [kernel..., bias], float64 (d + 1,)
ARRAY_CI = "c-i"  # in ``control`` (train task): this party's control variate, float64 (d + 1,)
ARRAY_DELTA = "delta"  # in ``control`` (train reply): Δc_i, float64 (d + 1,)

# -- query stages and the query's config keys --------------------------------------------------------
KEY_STAGE = "stage"
STAGE_DESCRIBE = "describe"
STAGE_SCATTER = "scatter"
STAGE_FEDOLS_R = "fedols-r"
STAGE_DPOLS_GRAM = "dpols-gram"  # DP-FedOLS: the clipped Gram matrix (carries the transform and the bounds)
STAGE_DP_STATISTICS = "dp-statistics"  # central DP-FedAvg: the bounded statistics encoding (common/dpstats.py)
KEY_FEATURE_BOUND = "dp-feature-bound"  # dpols-gram: B_X, the L2 bound of a feature row
KEY_TARGET_BOUND = "dp-target-bound"  # dpols-gram: B_Y, the bound of |y|
KEY_WANT_MOMENTS = "want-moments"  # describe: send ``moments`` too
KEY_PRIVATE = "private"  # describe: a privacy mechanism is on, keep the shard's path and hash on the node
KEY_FULL = "full"  # scatter: the full matrix, not only its diagonal
KEY_WITH_R = "with-r"  # scatter: also the fedols-r reply (``r``) for ``r-centre``, in the same reply (one ClientApp less)

# -- secure sum task config (``train.secsum``, server/secure.py secure_sum, clients/secure.py) -------
KEY_STATISTIC = "statistic"  # the name of what each node computes (clients.secure.STATISTICS)
KEY_SUM_NAMES = "sum-names"  # the arrays summed, in order
KEY_SUM_LIMBS_PREFIX = "sum-limbs-"  # + name: limbs per value
KEY_SUM_SPAN_PREFIX = "sum-span-"  # + name: a value must be below 2**(lo + span) in magnitude
KEY_SUM_BITS = "sum-bits"  # bits per limb
KEY_SUM_PARTIES = "sum-parties"  # parties asked (the limbs leave room for this many)
STAT_MOMENTS = "moments"  # -> count (1,), total Σ[x y] (d + 1,)
STAT_DIAGONAL = "scatter-diagonal"  # centre -> diagonal Σ(z − μ)² (d + 1,)
STAT_UPPER = "scatter-upper"  # centre -> strict upper triangle of Σ(z − μ)(z − μ)ᵀ, row-major ((d+1)d/2,)
ARG_CENTRE = "centre"
STAT_DPOLS_GRAM = "dpols-gram"  # bounds (+ transform) -> upper triangle (with diagonal) of Σ g gᵀ, row-major ((d+2)(d+3)/2,)
ARG_BOUNDS = "bounds"  # DP-FedOLS's secure sum: [B_X, B_Y]; the transform travels as "transform-" + TRANSFORM_ARRAYS

# -- the shard description (``shard``) ---------------------------------------------------------------
SHARD_NUM_FEATURES = "num-features"
SHARD_NUM_EXAMPLES = "num-examples"
SHARD_CLIENT_KEY = "client-key"
SHARD_DATA_URI = "data-uri"
SHARD_FINGERPRINTS = "fingerprints"  # JSON texts, one per source file
SHARD_PARTITION_ID = "partition-id"
SHARD_KEYS = frozenset({SHARD_NUM_FEATURES, SHARD_NUM_EXAMPLES, SHARD_CLIENT_KEY})
OPTIONAL_SHARD_KEYS = frozenset({SHARD_DATA_URI, SHARD_FINGERPRINTS, SHARD_PARTITION_ID})

# -- train and evaluate config keys ------------------------------------------------------------------
KEY_SERVER_ROUND = "server-round"  # the name Flower's own strategies use
KEY_LEARNING_RATE = "learning-rate"  # the resolved step size of local SGD (never "auto")
KEY_BATCH_SIZE = "batch-size"  # the resolved batch size of local SGD (never "auto"); absent: the run config's
KEY_PROXIMAL_MU = "proximal-mu"  # FedProx's μ (the name Flower's FedProx uses); absent: no proximal term
TRANSFORM_PREFIX = "transform-"  # + each of TRANSFORM_ARRAYS: the standardization, as float lists
TRANSFORM_ARRAYS = ("x-shift", "x-matrix", "y-shift-scale")  # scaling.Transform.arrays()
KEY_LOCAL_DP_CLIPPING_NORM = "local-dp-clipping-norm"  # dp = local (common/privacy.py LocalDp)
KEY_LOCAL_DP_NOISE_MULTIPLIER = "local-dp-noise-multiplier"
KEY_DP_NOISE_SEED = "dp-noise-seed"
KEY_SECAGG_WEIGHTING = "secagg-weighting"  # secure aggregation: which weight a party reports
WEIGHTING_EQUAL = "equal"  # every party weighs 1
WEIGHTING_NUM_EXAMPLES = "num-examples"  # a party weighs its shard size

# -- metrics -----------------------------------------------------------------------------------------
METRIC_NUM_EXAMPLES = "num-examples"  # FedAvg's weight (Flower's default ``weighted_by_key``)
METRIC_TRAIN_LOSS = "train-loss"
METRIC_CLIENT_KEY = "client-key"
METRIC_UNIT_WEIGHT = "unit-weight"  # always 1: the weight when every client counts the same
METRIC_EVAL_MSE = "eval-mse"
TRAIN_METRICS = frozenset({METRIC_NUM_EXAMPLES, METRIC_TRAIN_LOSS, METRIC_CLIENT_KEY, METRIC_UNIT_WEIGHT})
EVALUATE_METRICS = frozenset({METRIC_NUM_EXAMPLES, METRIC_EVAL_MSE})

# -- error replies -----------------------------------------------------------------------------------
ERROR_CODE_USER = 4001  # a FedLinearError: bad shard, bad config, bad task
ERROR_CODE_INTERNAL = 4002  # anything else

# A learning rate a client accepts (RunConfig refuses any other in the config).
LEARNING_RATE_RANGE = (0.0, 10.0)


# -- the settings the server resolves for a round ----------------------------------------------------


def transform_config(transform: scaling.Transform) -> dict[str, Any]:
    """The standardization transform as config values (none for raw variables).

    It travels in the task's one ConfigRecord: Flower's ``fixedclipping_mod`` refuses a task with a
    second ArrayRecord.
    """
    if transform.kind == "none":
        return {}
    return {f"{TRANSFORM_PREFIX}{name}": value.ravel().tolist() for name, value in transform.arrays().items()}


def train_config(learning_rate: float, transform: scaling.Transform, batch_size: int | None = None) -> dict[str, Any]:
    """What every train task of a run carries in its config, besides the round's own keys."""
    config = {**transform_config(transform), KEY_LEARNING_RATE: float(learning_rate)}
    if batch_size is not None:
        config[KEY_BATCH_SIZE] = int(batch_size)
    return config


def evaluate_config(transform: scaling.Transform) -> dict[str, Any]:
    """What every evaluate task of a run carries in its config, besides ``server-round``."""
    return transform_config(transform)


# -- reading a task's config (client side) -----------------------------------------------------------


def server_round(config: Mapping[str, Any]) -> int:
    """The task's round number."""
    value = config.get(KEY_SERVER_ROUND)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FedLinearError(f"the task's '{KEY_SERVER_ROUND}' must be an integer >= 0, got {value!r}")
    return value


def learning_rate(config: Mapping[str, Any]) -> float:
    """The step size the server resolved for this task; a task without a usable one is refused."""
    value = config.get(KEY_LEARNING_RATE)
    low, high = LEARNING_RATE_RANGE
    if isinstance(value, bool) or not isinstance(value, int | float) or not low < value < high:
        raise FedLinearError(f"no usable learning rate in the task ({value!r})")
    return float(value)


def batch_size(config: Mapping[str, Any], configured: int | str) -> int:
    """The batch size the server resolved for this task, else the run config's (``configured``); a task
    without a usable one is refused."""
    value = config.get(KEY_BATCH_SIZE, configured)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FedLinearError(f"no usable batch size in the task ({value!r})")
    return value


def proximal_mu(config: Mapping[str, Any]) -> float:
    """FedProx's ``proximal-mu`` of the task (Flower's FedProx sends it), 0 when absent."""
    raw = config.get(KEY_PROXIMAL_MU, 0.0)
    try:
        mu = float(raw)
    except (TypeError, ValueError):
        mu = float("nan")
    if isinstance(raw, bool) or not (0 <= mu < math.inf):
        raise FedLinearError(f"the task's '{KEY_PROXIMAL_MU}' must be a finite number >= 0, got {raw!r}")
    return mu


def transform(config: Mapping[str, Any], num_features: int) -> scaling.Transform | None:
    """The standardization transform a train or evaluate task carries (None: raw variables)."""
    if f"{TRANSFORM_PREFIX}{TRANSFORM_ARRAYS[0]}" not in config:
        return None
    try:
        arrays = {name: np.asarray(config[f"{TRANSFORM_PREFIX}{name}"], dtype=np.float64) for name in TRANSFORM_ARRAYS}
    except (KeyError, TypeError, ValueError) as exc:
        raise FedLinearError(f"malformed standardization transform in the task: {exc}") from None
    return scaling.Transform.from_arrays(arrays, num_features)
