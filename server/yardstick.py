"""The yardstick's statistics: the parties' R factors when no privacy option is on (stage ``fedols-r``).

After the shard query (:func:`server.nodes.query_nodes`) has the pooled mean, and when the statistics
flow anyway (``reference = auto``, no ``dp`` nor ``secure-aggregation``), every healthy party sends
once the R factor of its block ``[x − c, 1, y − c_y]`` (``c`` the pooled mean, or 0 for a model
without an intercept): in its reply to the scatter query (``with-r``, the same ClientApp start), or,
when that reply had none (an older client) or the centre moved (a party left out of the scatter
changes the pooled mean), in a stage ``fedols-r`` of its own. Either way it is checked as ``strategy = fedols`` checks it
(:func:`server.fedols.collect_r`), and the optimum is solved by TSQR (:func:`common.yardstick.from_factors`).

Under privacy no party sends a factor; when ``statistics-uri`` holds one (``fedlinear run`` computes it
with the sums from the shards on its machine) the yardstick is solved from it the same way
(:func:`from_statistics_file`), else from the scatter.

When a party does not send a usable factor, a training run keeps the party (it trains) and the
yardstick falls back to the pooled scatter of every party (:func:`common.yardstick.from_scatter`),
saying so; ``strategy = fedols`` with ``fedols-method = qr`` leaves the party out of its solve and of
the yardstick, as before.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.serverapp import Grid

from fedlinear.common import fedols, protocol, scaling, storage, yardstick
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.server import progress
from fedlinear.server.fedols import collect_r
from fedlinear.server.nodes import Parties


def centre_for(parties: Parties, fit_intercept: bool) -> np.ndarray:
    """What the parties centre their block on: the pooled mean with an intercept, the origin without."""
    pooled = parties.pooled
    return pooled.mean.copy() if fit_intercept else np.zeros(pooled.num_features + 1)


def gather(grid: Grid, cfg: RunConfig, parties: Parties) -> None:
    """Ask for the R factors when the statistics flow; sets ``parties.factors``, ``factor_failures``
    and ``optimum`` (None where the scatter route or no yardstick applies)."""
    pooled = parties.pooled
    if pooled is None or not pooled.full or cfg.private:
        return
    fit_intercept = fit_intercept_of(cfg)
    centre = centre_for(parties, fit_intercept)
    failures: list[dict] = []
    fedols = cfg.strategy == "fedols" and cfg.fedols_method == "qr"  # its solve leaves such parties out too
    prefetched = parties.factor_replies  # R factors that came with the scatter (server.nodes, ``with-r``)
    ready = prefetched.replies if prefetched is not None and np.array_equal(prefetched.centre, centre) else None
    factors = collect_r(
        grid, cfg, parties.healthy, centre, failures, left_out=fedols, statistics=parties.statistics, prefetched=ready
    )
    parties.factors, parties.factor_failures = factors, failures
    order = [nid for nid in parties.in_key_order() if nid in factors]
    if not factors or (failures and not fedols):
        for failure in failures:
            progress.say(f"yardstick: node {failure['node-id']} sent no usable R factor ({failure['reason']})")
        if not fedols:
            progress.say("yardstick: from the pooled scatter instead of the R factors (less accurate when ill-conditioned)")
        return
    count = sum(int(parties.healthy[nid][protocol.SHARD_NUM_EXAMPLES]) for nid in order)
    parties.optimum = yardstick.from_factors(
        [factors[nid] for nid in order], centre, yardstick.unused_features(pooled, fit_intercept), fit_intercept, count
    )


def from_statistics_file(cfg: RunConfig, pooled: scaling.PooledStats | None) -> yardstick.Optimum | None:
    """Under privacy: the stable optimum from the R factor in the ``statistics-uri`` file (``fedlinear run``
    writes it from the shards on its machine, :func:`common.yardstick.local_factors`), or None when the
    file has none (then the scatter route)."""
    if not cfg.statistics_uri or pooled is None or not pooled.full:
        return None
    fit_intercept = fit_intercept_of(cfg)
    key = yardstick.FILE_FACTORS[fit_intercept]
    where = f"{cfg.statistics_uri} (config key 'statistics-uri')"
    try:
        with np.load(io.BytesIO(storage.read_bytes(cfg.statistics_uri)), allow_pickle=False) as arrays:
            if key not in arrays.files:
                return None
            r = np.asarray(arrays[key], np.float64)
    except (ValueError, OSError) as exc:
        raise FedLinearError(f"{where}: not a statistics file: {one_line(exc)}") from None
    problem = fedols.check_r(r, pooled.num_features, pooled.count)
    if problem is not None:
        raise FedLinearError(f"{where}: its '{key}' array is not the R factor of these statistics: {problem}")
    centre = pooled.mean.copy() if fit_intercept else np.zeros(pooled.num_features + 1)
    return yardstick.from_factors([r], centre, yardstick.unused_features(pooled, fit_intercept), fit_intercept, pooled.count)


def fit_intercept_of(cfg: RunConfig) -> bool:
    return bool(getattr(cfg, "fit_intercept", True))
