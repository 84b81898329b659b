"""``strategy = "fedols"``: the pooled least-squares (or ridge) solution in one round, exactly.

Called by :func:`server.server_app.run` after the shard query (:func:`server.nodes.query_nodes`:
describe + scatter stages), which already gave every healthy party's ``n``, ``Σ[x y]`` and centred
scatter and the pooled statistics:

* ``fedols-method = normal`` solves from those pooled statistics (no further message);
* ``fedols-method = qr`` sends one more query, stage ``fedols-r`` with the pooled mean, and each
  party answers with the R factor of its centred block ``[x − μx, 1, y − μy]``. Every reply is
  checked (:func:`common.fedols.check_r`: shape, finite, upper triangular, intercept column of
  norm² = the rows it declared; and RᵀR against the moments and scatter the party sent in the clear,
  :func:`common.fedols.r_matches_statistics`); a bad one is a failed party, left out and reported, and the solve
  is exact for the remaining parties (the intercept column absorbs the shifted centre).

The float64 solution goes into ``history.json`` and ``manifest.json`` (``fedols`` block), the model is
exported rounded to float32 in raw units (no standardization) by :func:`server.finish.complete`, the
manifest writer of every run, and one history row (round 1) carries the same metrics as any run
(:class:`server.evaluation.Evaluator`). The math is in :mod:`common.fedols`.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedlinear.common import fedols, protocol, yardstick
from fedlinear.common import model as lm
from fedlinear.common import scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.server import evaluation, finish, progress
from fedlinear.server.nodes import Parties, ask_each, in_key_order


def collect_r(
    grid: Grid, cfg: RunConfig, healthy: dict[int, dict], centre: np.ndarray, failures: list[dict],
    left_out: bool = True, statistics: dict | None = None, prefetched: dict[int, Message] | None = None,
) -> dict[int, np.ndarray]:
    """Stage ``fedols-r``: each healthy party's checked R factor (failures are appended, and said when
    the party is ``left_out`` of the solve; the yardstick of a training run says them itself). With the
    ``statistics`` each party sent in the clear (server.nodes.PartyStatistics, full scatter), its R
    must also be the factor of that data (common.fedols.r_matches_statistics). ``prefetched``: node id ->
    its scatter reply that carried the R factor for this ``centre`` too (``with-r``, server.nodes), checked
    the same way; only the other parties are asked."""
    d = int(next(iter(healthy.values()))[protocol.SHARD_NUM_FEATURES])
    order = in_key_order(healthy)
    prefetched = {nid: msg for nid, msg in (prefetched or {}).items() if nid in healthy}

    def request() -> RecordDict:  # a fresh record for every message
        return RecordDict({
            protocol.RECORD_CONFIG: ConfigRecord({protocol.KEY_STAGE: protocol.STAGE_FEDOLS_R}),
            protocol.RECORD_CENTRE: ArrayRecord({protocol.ARRAY_CENTRE: Array(np.ascontiguousarray(centre, np.float64))}),
        })  # fmt: skip

    asked = [nid for nid in order if nid not in prefetched]
    answers = ask_each(grid, {nid: request() for nid in asked}, cfg.round_timeout, "R-factor query") if asked else {}
    answers.update(prefetched)
    factors: dict[int, np.ndarray] = {}
    for nid in order:
        msg = answers[nid]
        if isinstance(msg, str):
            reason = msg
        else:
            also = (protocol.RECORD_SCATTER,) if nid in prefetched else ()
            reason = _check_reply(msg, d, int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]), also)
            if reason is None:
                r = np.asarray(msg.content[protocol.RECORD_R][protocol.ARRAY_R].numpy(), np.float64)
                own = (statistics or {}).get(nid)
                if own is not None and own.scatter.ndim == 2:
                    problem = fedols.r_matches_statistics(r, own.count, own.total, own.scatter, own.centre, centre)
                    reason = None if problem is None else f"R-factor reply rejected: {problem}"
                if reason is None:
                    factors[nid] = r
                    continue
        failures.append({"node-id": nid, "client-key": healthy[nid].get(protocol.SHARD_CLIENT_KEY), "reason": reason})
        if left_out:
            progress.say(f"node {nid} left out: {reason}")
    return factors


def _check_reply(msg: Message, d: int, num_examples: int, also: tuple[str, ...] = ()) -> str | None:
    """Why ``msg`` is not a usable R-factor reply (its array records: ``r`` and only ``also``), or None."""
    record = msg.content.array_records.get(protocol.RECORD_R)
    only_r = set(msg.content.array_records) == {protocol.RECORD_R, *also}
    if not only_r or record is None or set(record.keys()) != {protocol.ARRAY_R}:
        return f"malformed R-factor reply: expected one array '{protocol.ARRAY_R}'"
    array = record[protocol.ARRAY_R]
    if array.dtype != "float64" or len(array.data) > 8 * (d + 2) ** 2 + 4096:
        return f"malformed R-factor reply: {array.dtype} array of {len(array.data)} bytes"
    try:
        value = array.numpy()
    except Exception:  # noqa: BLE001 - undecodable bytes are a bad reply
        return "malformed R-factor reply: the array cannot be decoded"
    problem = fedols.check_r(value, d, num_examples)
    return None if problem is None else f"R-factor reply rejected: {problem}"


def run(
    grid: Grid, context: Context, store: RunStore, cfg: RunConfig, parties: Parties, test: Dataset | None,
    started: float,
) -> None:  # fmt: skip
    """Solve, evaluate, export and record; the run's status is ``completed`` at the end."""
    if cfg.dp != "none":  # DP-FedOLS: clipped sums, noised once (server/dpols.py)
        from fedlinear.server import dpols

        return dpols.run(grid, context, store, cfg, parties, test, started)
    healthy, pooled = parties.healthy, parties.pooled
    if pooled is None or not pooled.full:  # config validation refuses privacy and reference = none
        raise FedLinearError("strategy = fedols needs every party's centred cross-products, which were not gathered")
    num_features = pooled.num_features
    failures: list[dict] = []
    solved_by = parties.in_key_order()
    if cfg.fedols_method == "qr":
        if parties.factors is None:  # gathered with the shard query (server.yardstick) when statistics flow
            centre = pooled.mean if cfg.fit_intercept else np.zeros(num_features + 1)
            factors = collect_r(grid, cfg, healthy, centre, failures, statistics=parties.statistics)
        else:
            factors = parties.factors
            failures.extend(parties.factor_failures or [])
        if not factors:
            raise FedLinearError(
                "no party sent a usable R factor: " + "; ".join(f"node {f['node-id']}: {f['reason']}" for f in failures)
            )
        solved_by = [nid for nid in solved_by if nid in factors]
        centre = pooled.mean if cfg.fit_intercept else np.zeros(num_features + 1)
        solution = fedols.solve_qr(
            [factors[nid] for nid in solved_by], centre, cfg.fedols_l2,
            yardstick.unused_features(pooled, cfg.fit_intercept), cfg.fit_intercept,
        )  # fmt: skip
    else:
        solution = fedols.solve_normal(pooled, cfg.fedols_l2, cfg.fit_intercept)
    kernel, bias = solution.kernel, solution.bias
    for note in solution.notes:
        progress.say(f"fedols: {note}")

    transform = scaling.Transform.identity(num_features)
    evaluate = evaluation.Evaluator(test, pooled, transform, parties.optimum, cfg.fit_intercept)  # same factors
    for note in evaluate.reference.get("notes", []):
        if evaluate.yardstick is not None and evaluate.yardstick.method != "tsqr":
            progress.say(f"yardstick: {note}")
    row = {
        "round": 1,
        "clients-ok": len(solved_by),
        "clients-failed": len(failures),
        "failures": failures,
        **evaluate(lm.LinearWeights(kernel=kernel.reshape(-1, 1), bias=np.array([bias]) if cfg.fit_intercept else None)),
        "elapsed-s": time.monotonic() - started,
    }
    samples = sum(int(healthy[nid][protocol.SHARD_NUM_EXAMPLES]) for nid in solved_by)
    block = {
        **solution.to_json(),
        "parties": len(solved_by),
        "num-examples": samples,
        "objective": "minimise ||y - X w - b||^2 + l2 ||w||^2 over the pooled raw data (bias not penalised)"
        if cfg.fit_intercept else "minimise ||y - X w||^2 + l2 ||w||^2 over the pooled raw data (no intercept)",
    }
    history = {
        "run-id": context.run_id,
        "rounds": [row],
        "reference": evaluate.reference,
        "standardization": transform.to_json(),
        "learning-rate": {"value": None, "how": "strategy = fedols: solved exactly, no training"},
        "query-failures": parties.failures,
        "fedols": block,
    }
    store.write_history(history)
    progress.say(
        f"fedols ({solution.method}, l2 = {solution.l2:g}): exact solution from {len(solved_by)} parties, "
        f"{samples} samples; condition number {solution.condition_number:.4g}; {solution.solver}"
    )
    progress.say(progress.progress_line(row))

    result = finish.Result(
        kernel=kernel,
        bias=bias,
        transform=transform,
        learning_rate=history["learning-rate"],
        method={"fedols": block},
        reference=evaluate.reference,
        final_row=row,
    )
    finish.complete(store, context, cfg, parties, test, started, result)
