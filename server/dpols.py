"""DP-FedOLS: ``strategy = "fedols"`` with ``dp = "central-client-clip"`` (the math: :mod:`common.dpols`).

Central DP, add-or-remove-one-**row** neighbours: the server is trusted to add the noise. One run:

1. **The clipping space** (:func:`clipping_space`): the public standardization when the pooled
   statistics are declared public (``dp-public-statistics`` = true with ``statistics-uri``; the
   transform ``standardize`` gives, not covered by ε), else raw units. Clipping in a standardized
   space is what makes the bounds meaningful on real tables (raw columns in the thousands beside
   columns near zero, targets with large offsets would need a bound as large as the largest offset,
   and noise to match); the bounds ``dp-feature-bound`` / ``dp-target-bound`` are in that space, and
   0 (auto: ``sqrt(d) + 1`` and 3) is offered only there. Both bounds are public.
2. **Stage ``dpols-gram``**: each party applies the transform, clips its rows and answers with
   ``Σ g gᵀ`` (``g = [x̄, 1, ȳ]``); every reply is checked (:func:`common.dpols.check_gram`) and a bad
   one is a failed party, left out and reported.
3. **The sum** (:func:`sum_statistics`): the parties' matrices added in client-key order, **in the
   clear**: the server sees every party's clipped sums. With ``secure-aggregation = true`` stage 2
   and 3 are one SecAgg+ sum instead (:func:`secure_total`): each party's clipped matrix travels as
   masked fixed-point limbs, and the server learns only the total (to a relative 2**-64 of the
   bounds), which it checks as it checks one party's in the clear.
4. **The release** (:func:`common.dpols.adassp`): three Gaussian noises on the total, once, and the
   AdaSSP solve; the noise is drawn from ``dp-noise-seed``'s generator. The accountant (Flower's
   RdpAccountant, as every DP run) composes the three releases; ``dp-target-epsilon`` (server/privacy.py
   :func:`~server.privacy.resolve_noise`) gives the noise multiplier that spends exactly that ε.
5. The model is folded back to raw units and goes through :func:`server.finish.complete` as any
   fedols run, with the ``privacy`` block in the manifest.

A party that fails the query leaves the total without its rows; the release is still (ε, δ)-DP for
every row of the parties that were summed (the sensitivity is per row, whoever sent it).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedlinear.common import dpols, protocol, scaling
from fedlinear.common import model as lm
from fedlinear.common import privacy as common_privacy
from fedlinear.common.config import RunConfig
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.server import evaluation, finish, privacy, progress
from fedlinear.server.nodes import Parties, ask_each, in_key_order

NOISE_STREAM = 0xD9015
SUMS_CLEAR = "collected in the clear: the server sees each party's clipped sums (central DP, trusted server)"
SUMS_SECURE = (
    "summed through SecAgg+: the server sees only the pooled clipped sums before its noise (central DP, the server "
    "trusted to add the noise)"
)


def clipping_space(cfg: RunConfig, public: scaling.PooledStats | None, num_features: int) -> tuple[scaling.Transform, float, float, str]:
    """(the transform rows are clipped in, B_X, B_Y, a sentence saying which space and bounds)."""
    transform = privacy.build_transform(cfg, public, num_features)
    standardized = transform.kind != "none"
    if not standardized and (cfg.dp_feature_bound == 0 or cfg.dp_target_bound == 0):
        raise FedLinearError(
            "DP-FedOLS on raw variables needs declared bounds in raw units: set 'dp-feature-bound' and "
            "'dp-target-bound', or declare the statistics public ('dp-public-statistics' = true with "
            "'statistics-uri') to clip in standardized units with the automatic bounds"
        )
    auto_x, auto_y = dpols.auto_bounds(num_features)
    bx = cfg.dp_feature_bound or auto_x
    by = cfg.dp_target_bound or auto_y
    where = (
        f"standardized variables ({transform.kind}, from the public statistics {cfg.statistics_uri})"
        if standardized else "raw units"
    )  # fmt: skip
    return transform, bx, by, f"rows clipped in {where}: feature rows to L2 norm {bx:g}, |y| to {by:g}"


def collect_grams(
    grid: Grid, cfg: RunConfig, healthy: dict[int, dict], transform: scaling.Transform, bx: float, by: float,
    failures: list[dict],
) -> dict[int, np.ndarray]:  # fmt: skip
    """Stage ``dpols-gram``: each healthy party's checked clipped Gram matrix (failures appended and said)."""
    d = int(next(iter(healthy.values()))[protocol.SHARD_NUM_FEATURES])
    request = {
        protocol.KEY_STAGE: protocol.STAGE_DPOLS_GRAM,
        protocol.KEY_FEATURE_BOUND: float(bx),
        protocol.KEY_TARGET_BOUND: float(by),
        **protocol.transform_config(transform),
    }
    order = in_key_order(healthy)
    answers = ask_each(
        grid, {nid: RecordDict({protocol.RECORD_CONFIG: ConfigRecord(request)}) for nid in order}, cfg.round_timeout,
        "DP-FedOLS query",
    )  # fmt: skip
    grams: dict[int, np.ndarray] = {}
    for nid in order:
        msg = answers[nid]
        if isinstance(msg, str):
            reason = msg
        else:
            value, reason = _gram_of(msg, d)
            if value is not None:
                reason = dpols.check_gram(value, d, int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]), bx, by)
                if reason is None:
                    grams[nid] = value
                    continue
        failures.append({"node-id": nid, "client-key": healthy[nid].get(protocol.SHARD_CLIENT_KEY), "reason": reason})
        progress.say(f"node {nid} left out: {reason}")
    return grams


def _gram_of(msg: Message, d: int) -> tuple[np.ndarray | None, str | None]:
    record = msg.content.array_records.get(protocol.RECORD_GRAM)
    if set(msg.content.array_records) != {protocol.RECORD_GRAM} or record is None or set(record.keys()) != {protocol.ARRAY_GRAM}:
        return None, f"malformed DP-FedOLS reply: expected one array '{protocol.ARRAY_GRAM}'"
    array = record[protocol.ARRAY_GRAM]
    if array.dtype != "float64" or len(array.data) > 8 * (d + 2) ** 2 + 4096:
        return None, f"malformed DP-FedOLS reply: {array.dtype} array of {len(array.data)} bytes"
    try:
        return np.asarray(array.numpy(), np.float64), None
    except Exception:  # noqa: BLE001 - undecodable bytes are a bad reply
        return None, "malformed DP-FedOLS reply: the array cannot be decoded"


# a party's |entry| is below its rows times the per-row bound; times this for the float64 rounding of its sum
WINDOW_MARGIN = 4.0


def gram_windows(num_features: int, bx: float, by: float, rows: int) -> np.ndarray:
    """``hi`` per entry of the Gram matrix's upper triangle (row-major, with the diagonal): a party
    with at most ``rows`` clipped rows ``g = [x̄, 1, ȳ]`` has ``|G_ij| <= rows · max|g_i g_j| < 2**hi``
    (``|x̄_i| <= B_X``, ``|ȳ| <= B_Y``; times :data:`WINDOW_MARGIN`). Public: bounds and declared sizes."""
    d = num_features
    row = np.concatenate([np.full(d, float(bx)), [1.0, float(by)]])
    upper = np.outer(row, row)[np.triu_indices(d + 2)] * max(1, int(rows)) * WINDOW_MARGIN
    return (np.floor(np.log2(upper)).astype(np.int64) + 1).clip(-1000, 1024)


def secure_total(
    grid: Grid, cfg: RunConfig, healthy: dict[int, dict], transform: scaling.Transform, bx: float, by: float,
    failures: list[dict],
) -> tuple[np.ndarray | None, list[int]]:  # fmt: skip
    """``secure-aggregation = true``: the total of the parties' clipped Gram matrices through SecAgg+
    (server/secure.py :func:`~server.secure.secure_sum`, the fixed-point limbs of common/fixedpoint.py,
    the clients' ``dpols-gram`` statistic), so the server learns the pooled sum and no party's.

    Each entry travels in a window sized from the public bounds and the largest declared shard
    (:func:`gram_windows`), ``PRECISION_BITS`` bits below it. A party that drops out or sends a
    malformed masked vector is left out (failures appended and said) and the others' total comes back,
    as in the first of the secure statistics' sums (server/securestats.py): there is one sum only, so
    no second sum could reveal a party by difference. The pooled matrix is checked as the clear path
    checks each party's (:func:`common.dpols.check_gram`, with the summed parties' declared rows):
    a failure stops the run, since no single party can be blamed. Returns (total or None, parties summed)."""
    from fedlinear.server import secure

    d = int(next(iter(healthy.values()))[protocol.SHARD_NUM_FEATURES])
    order = in_key_order(healthy)
    size = (d + 2) * (d + 3) // 2
    arguments = {protocol.ARG_BOUNDS: np.array([bx, by], np.float64)}
    if transform.kind != "none":
        arguments.update({f"{protocol.TRANSFORM_PREFIX}{name}": value for name, value in transform.arrays().items()})
    rows = max(int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]) for nid in order)
    result = secure.secure_sum(
        grid, cfg, order, protocol.STAT_DPOLS_GRAM, {"gram": (size,)}, {"gram": gram_windows(d, bx, by, rows)}, arguments
    )
    for failure in result.failures:
        failure = {"node-id": failure["node-id"], "client-key": healthy[failure["node-id"]].get(protocol.SHARD_CLIENT_KEY),
                   "reason": failure["reason"]}  # fmt: skip
        failures.append(failure)
        progress.say(f"node {failure['node-id']} left out: {failure['reason']}")
    if result.sums is None:
        return None, []
    total = np.zeros((d + 2, d + 2))
    rows_i, cols_i = np.triu_indices(d + 2)
    total[rows_i, cols_i] = result.sums["gram"]
    total[cols_i, rows_i] = result.sums["gram"]
    summed = [nid for nid in order if nid in result.aggregated]
    count = sum(int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]) for nid in summed)
    problem = dpols.check_gram(total, d, count, bx, by)
    if problem is not None:
        raise FedLinearError(
            f"DP-FedOLS: the securely summed Gram matrix of {len(summed)} parties is not one ({problem}): a party sent "
            "something else than its clipped sums"
        )
    progress.say(f"DP-FedOLS: the clipped sums of {len(summed)} parties summed through SecAgg+: the server learned only their total")
    return total, summed


def sum_statistics(grams: dict[int, np.ndarray], healthy: dict[int, dict]) -> np.ndarray:
    """The total of the parties' clipped Gram matrices, in client-key order (the seam for a secure sum:
    under secure aggregation this is where the server would get the total and nothing else)."""
    order = [nid for nid in in_key_order(healthy) if nid in grams]
    total = np.zeros_like(grams[order[0]])
    for nid in order:
        total = total + grams[nid]
    return total


def budget_epsilon(cfg: RunConfig, population: int = 1) -> float:
    """ε at ``dp-delta`` of DP-FedOLS's three releases (common/dpols.py ``share_multipliers`` of the run's
    noise multiplier, derived from ``dp-target-epsilon`` when set), on a fresh copy of the run's accountant."""
    from fedlinear.server.resume import with_resolved_noise

    resolved = with_resolved_noise(cfg)
    accountant = privacy.make_accountant(dataclasses.replace(resolved, dp_max_epsilon=0.0), population)
    for z in dpols.share_multipliers(resolved.dp_noise_multiplier):
        accountant.compose(GaussianPrivacyEvent(z, max(1, population), max(1, population)))
    return float(accountant.get_epsilon(cfg.dp_delta))


def refuse_over_budget(cfg: RunConfig, population: int = 1) -> None:
    """Refuse, before any party is asked or anything released, a DP-FedOLS run whose one release (three
    Gaussian releases) would spend more than ``dp-max-epsilon``: it has no earlier model to stop at. The
    accounting has no sampling amplification (every party is in the release), so ``population`` does not
    change ε."""
    if cfg.strategy != "fedols" or cfg.dp == common_privacy.NO_DP or not cfg.dp_max_epsilon:
        return
    spent = budget_epsilon(cfg, population)
    if spent > cfg.dp_max_epsilon:
        how = (f"'dp-target-epsilon' = {cfg.dp_target_epsilon:g}" if cfg.dp_target_epsilon
               else f"'dp-noise-multiplier' = {cfg.dp_noise_multiplier:g}")  # fmt: skip
        raise FedLinearError(
            f"config key 'dp-max-epsilon' = {cfg.dp_max_epsilon:g} is below the ε = {spent:.6g} (δ = {cfg.dp_delta:g}) "
            f"DP-FedOLS's release spends with {how}; raise 'dp-max-epsilon', or set 'dp-target-epsilon' to at most "
            f"{cfg.dp_max_epsilon:g} (or a larger 'dp-noise-multiplier')"
        )


def run(
    grid: Grid, context: Context, store: RunStore, cfg: RunConfig, parties: Parties, test: Dataset | None,
    started: float,
) -> None:  # fmt: skip
    """Clip, sum, release once, solve, evaluate, export and record (status ``completed``)."""
    healthy, d = parties.healthy, parties.num_features
    refuse_over_budget(cfg, len(healthy))  # before any party is asked for its sums
    stats, reference_source, public = privacy.choose_statistics(cfg, None, d)
    transform, bx, by, space = clipping_space(cfg, public, d)
    progress.say(f"DP-FedOLS: {space}")
    failures: list[dict] = []
    if cfg.secure_aggregation:  # the sums through SecAgg+: the server gets only the total
        total, summed = secure_total(grid, cfg, healthy, transform, bx, by, failures)
    else:
        grams = collect_grams(grid, cfg, healthy, transform, bx, by, failures)
        summed = [nid for nid in in_key_order(healthy) if nid in grams]
        total = sum_statistics(grams, healthy) if grams else None
    if total is None:
        raise FedLinearError(
            "no party sent a usable DP-FedOLS sum: " + "; ".join(f"node {f['node-id']}: {f['reason']}" for f in failures)
        )
    population = len(healthy)
    accountant = privacy.make_accountant(cfg, population)
    rng = common_privacy.noise_rng(cfg.dp_noise_seed, cfg.seed, NOISE_STREAM)
    released = dpols.adassp(total, bx, by, cfg.dp_noise_multiplier, rng)
    for z in released.multipliers:
        accountant.compose(GaussianPrivacyEvent(z, population, population))
    kernel, bias = transform.to_raw(released.theta[:d], float(released.theta[d]))

    evaluate = evaluation.Evaluator(test, stats, scaling.Transform.identity(d))
    if evaluate.optimum is not None:
        evaluate.reference["source"] = reference_source
    row = {
        "round": 1,
        "clients-ok": len(summed),
        "clients-failed": len(failures),
        "failures": failures,
        **evaluate(lm.LinearWeights(kernel=kernel.reshape(-1, 1), bias=np.array([bias]))),
        "epsilon": privacy.epsilon(accountant, cfg.dp_delta),
        "elapsed-s": time.monotonic() - started,
    }
    samples = sum(int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]) for nid in summed)
    block = {
        "method": "dp-adassp",
        **released.to_json(),
        "solver": released.solver,
        "kernel": kernel.tolist(),
        "bias": bias,
        "clipping-space": space,
        "feature-bound": bx,
        "target-bound": by,
        "parties": len(summed),
        "num-examples": samples,
        "sums": SUMS_SECURE if cfg.secure_aggregation else SUMS_CLEAR,
    }
    summary = privacy.summary(cfg, accountant, None)
    summary.update({
        "description": "central DP, DP-FedOLS: parties clip rows, the server adds Gaussian noise to the summed "
        "sufficient statistics once (" + dpols.CITATION + ")",
        "neighbouring": "add or remove one row of any party (example-level)",
        "clipping-norm": None,
        "clipping-space": space,
        "feature-bound": bx,
        "target-bound": by,
        "accounting": "RDP (Flower RdpAccountant over Google dp-accounting): three Gaussian releases (λ_min, XᵀX, "
        f"Xᵀy) with noise multipliers {', '.join(f'{m:.4g}' for m in released.multipliers)} (together one with z)",
    })  # fmt: skip
    history = {
        "run-id": context.run_id,
        "rounds": [row],
        "reference": evaluate.reference,
        "standardization": transform.to_json(),
        "learning-rate": {"value": None, "how": "strategy = fedols: solved in one round, no training"},
        "query-failures": parties.failures,
        "fedols": block,
        "privacy": summary,
    }
    store.write_history(history)
    progress.say(
        f"DP-FedOLS: {len(summed)} parties, {samples} samples; z = {cfg.dp_noise_multiplier:.4g}, ε = {row['epsilon']:.4g} "
        f"at δ = {cfg.dp_delta:g}; AdaSSP ridge λ = {released.ridge:.4g}"
    )
    progress.say(progress.progress_line(row))
    result = finish.Result(
        kernel=kernel,
        bias=bias,
        transform=scaling.Transform.identity(d),
        learning_rate=history["learning-rate"],
        method={"fedols": block, "privacy": summary},
        reference=evaluate.reference,
        final_row=row,
    )
    finish.complete(store, context, cfg, parties, test, started, result)
