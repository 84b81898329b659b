"""The pooled statistics under secure aggregation: every sum goes through SecAgg+ (server/secure.py
:func:`~server.secure.secure_sum`), so the server learns the pooled count, mean and centred scatter,
and no party's.

Three secure sums over the same parties, before round 1 (``secure-aggregation = true``, no ``dp``):

1. ``moments``: ``n`` and ``Σz`` (``z = [x, y]``), any float64 exactly: the pooled mean ``μ``. The
   pooled count must equal the sum of the shard sizes the parties described (else the run stops);
2. ``scatter-diagonal``: ``Σ(z − μ)²`` per column, exactly;
3. ``scatter-upper`` (when the cross-products are wanted, ``reference = auto``): the off-diagonal
   entries of ``Σ(z − μ)(z − μ)ᵀ``. Each party's scatter about ``μ`` is positive semidefinite and its
   diagonal is at most the pooled one, so by Cauchy–Schwarz every party's entry ``(i, j)`` is below
   ``sqrt(D_i D_j)`` of the pooled diagonal ``D``: that bound (times 4 for rounding) is the entry's
   fixed-point window, kept to 64 bits below it (common/fixedpoint.py).

The three sums must cover the same parties: a party that drops out after the first sum stops the
statistics (the run fails with the reason), because summing again without it would hand the server
that party's own sums as the difference of two pooled ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.serverapp import Grid

from fedlinear.common import protocol, scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.server import progress, secure

# Cauchy–Schwarz bound times this: room for the parties' float64 rounding of their sums.
WINDOW_MARGIN = 4.0


def pooled_statistics(
    grid: Grid, cfg: RunConfig, healthy: dict[int, dict], order: list[int], failures: list[dict],
    scatter_problem: Callable[[np.ndarray], str | None],
) -> scaling.PooledStats:  # fmt: skip
    """The pooled statistics of the parties ``order`` (healthy node ids in client-key order), every
    sum through SecAgg+. Parties left out are removed from ``healthy`` and added to ``failures``;
    ``scatter_problem`` is the clear path's check of a scatter matrix (server/nodes.py)."""
    d = int(next(iter(healthy.values()))[protocol.SHARD_NUM_FEATURES])
    full = cfg.reference == "auto"
    first = _sum(grid, cfg, order, protocol.STAT_MOMENTS, {"count": (1,), "total": (d + 1,)}, None, None, healthy, failures)
    parties = [nid for nid in order if nid in first.aggregated]
    count = float(first.sums["count"][0])
    described = sum(int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]) for nid in parties)
    if count != described:
        raise FedLinearError(
            f"secure statistics: the securely summed count {count:g} differs from the {described} rows the parties "
            "described: a party sent something else than its sums"
        )
    moments = scaling.Moments(described, first.sums["total"])
    centre = moments.mean
    arguments = {protocol.ARG_CENTRE: centre}
    second = _sum(grid, cfg, parties, protocol.STAT_DIAGONAL, {"diagonal": (d + 1,)}, None, arguments, healthy, failures)
    _same_parties(parties, second, "scatter diagonal")
    diagonal = second.sums["diagonal"]
    if (diagonal < 0).any():
        raise FedLinearError("secure statistics: the pooled scatter has a negative diagonal entry: a party sent something else than its sums")
    if not full:
        matrix = diagonal
    else:
        rows, cols = np.triu_indices(d + 1, k=1)
        windows = {"upper": window_exponents(diagonal, rows, cols)}
        third = _sum(grid, cfg, parties, protocol.STAT_UPPER, {"upper": (rows.size,)}, windows, arguments, healthy, failures)
        _same_parties(parties, third, "scatter")
        matrix = np.diag(diagonal)
        matrix[rows, cols] = third.sums["upper"]
        matrix[cols, rows] = third.sums["upper"]
        problem = scatter_problem(matrix)
        if problem is not None:
            raise FedLinearError(f"secure statistics: the pooled scatter is not one ({problem})")
    progress.say(
        f"pooled statistics of {len(parties)} parties through SecAgg+ (count, Σ[x y], centred scatter"
        + ("" if full else " diagonal") + "): the server learned only the pooled sums"
    )
    return scaling.PooledStats.combine(moments, scaling.Scatter(described, matrix), centre)


def window_exponents(diagonal: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``hi`` with ``|S_ij(p)| <= sqrt(D_i D_j) < 2**hi`` for every party (times the margin)."""
    bound = np.sqrt(np.maximum(diagonal[rows], 0.0)) * np.sqrt(np.maximum(diagonal[cols], 0.0)) * WINDOW_MARGIN
    tiny = np.finfo(np.float64).tiny
    exponents = np.floor(np.log2(np.maximum(bound, tiny))).astype(np.int64) + 1
    return np.clip(exponents, -1000, 1024)


def _sum(grid, cfg, nodes, statistic, shapes, windows, arguments, healthy, failures) -> secure.SecureSum:
    result = secure.secure_sum(grid, cfg, nodes, statistic, shapes, windows, arguments)
    for failure in result.failures:
        progress.say(f"node {failure['node-id']} left out: {failure['reason']}")
        failures.append(failure)
        healthy.pop(failure["node-id"], None)
    if result.sums is None:
        reasons = "; ".join(f"node {f['node-id']}: {f['reason']}" for f in result.failures[:3])
        raise FedLinearError(f"secure statistics ({statistic}) failed: {reasons}")
    return result


def _same_parties(parties: list[int], result: secure.SecureSum, what: str) -> None:
    missing = sorted(set(parties) - set(result.aggregated))
    if missing:
        raise FedLinearError(
            f"secure statistics: node(s) {missing} dropped out of the {what} sum after the first one; summing again "
            "without them would reveal their sums to the server, so the run stops: start it again"
        )
