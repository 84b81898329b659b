"""Robust aggregation against one attacker out of ten parties, in whole in-process runs.

Party 3 trains honestly, then sends ``w_global + s * (w_local - w_global)``: s = 100 (a scaled
update) or s = -10 (a sign-flipped one, amplified). FedAvg's final test MSE degrades at least 2x
against the clean run; FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan, each configured for one
attacker, stay within 10% of the clean run. ``max-update-norm`` set just above what honest parties
send rejects the attacker (node and norm recorded) whenever its update is above it: that stops a
x1000 attacker on its own, but not a x100 one, whose update falls under the bound once honest
updates shrink near convergence (it only keeps the run from diverging). ``max-update-norm-factor`` = 3,
a bound relative to each round's median update norm, rejects the x100 attacker in every round.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fedlinear.clients import client_app as ca
from tests.inprocess import run_in_process, write_synthetic_shards

ATTACKER = 1003  # partition 3
RUNS = itertools.count()
ROUNDS = 6
ROBUST = {
    "fedmedian": {},
    "fedtrimmedavg": {"trimmed-beta": 0.1},  # int(0.1 * 10) = 1 value cut at each end
    "krum": {"num-malicious-nodes": 1},
    "multikrum": {"num-malicious-nodes": 1},
    "bulyan": {"num-malicious-nodes": 1},  # n = 10 >= 4f + 3
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("robust"), 10, 200, 5, 42, 1000)


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.r_[arrays["kernel"].numpy().ravel(), arrays["bias"].numpy().ravel()]


def attack(scale: float, grids: list):
    """A ``sabotage``: the attacker's honest reply, its update multiplied by ``scale``."""

    def sabotage(node_id, msg):
        if node_id != ATTACKER or msg.metadata.message_type != "train":
            return None
        grid = grids[0]
        context = Context(run_id=1, node_id=node_id, node_config=dict(grid.nodes[node_id]), state=RecordDict(),
                          run_config=grid.run_config)  # fmt: skip
        honest = ca.app(msg, context)
        sent = msg.content["arrays"]
        arrays = ArrayRecord({
            name: Array((sent[name].numpy() + scale * (honest.content["arrays"][name].numpy() - sent[name].numpy()))
                        .astype(np.float32))
            for name in ("kernel", "bias")
        })  # fmt: skip
        return Message(RecordDict({"arrays": arrays, "metrics": honest.content["metrics"]}), reply_to=msg)

    return sabotage


def run(data, tmp_path, name, scale=None, **knobs):
    """(final test MSE from the history (a diverged run has one too), history, grid)."""
    uris, test = data
    run_dir = str(tmp_path / f"{name}-{scale}-{next(RUNS)}")
    grids: list = []
    sabotage = attack(scale, grids) if scale is not None else None
    # batch-size 32 (mini-batches, the default before auto): the measured dynamics these tests are about
    # (honest updates shrinking round by round); batch-size = auto makes FedAvg's first round Newton's step
    run_in_process(uris, run_dir, sabotage=sabotage, grids=grids,
                   **{"test-uri": test, "num-server-rounds": ROUNDS, "strategy": name, "batch-size": 32, **knobs})  # fmt: skip
    with open(os.path.join(run_dir, "history.json")) as handle:
        history = json.load(handle)
    return history["rounds"][-1]["test-mse"], history, grids[0]


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    mse, history, grid = run(data, tmp_path_factory.mktemp("clean"), "fedavg")
    assert len(history["rounds"]) == ROUNDS + 1
    norms = [
        np.linalg.norm(flat(reply.content["arrays"]).astype(np.float64) - flat(msg.content["arrays"]))
        for msg, reply in zip(grid.sent, grid.received, strict=True)
        if msg.metadata.message_type == "train"
    ]
    return mse, max(norms)


@pytest.mark.parametrize("scale", [100.0, -10.0])
def test_fedavg_is_ruined_by_one_attacker(scale, data, clean, tmp_path):
    mse, _, _ = run(data, tmp_path, "fedavg", scale)
    assert not mse < 2 * clean[0], (mse, clean[0])  # NaN or inf count as ruined too


@pytest.mark.parametrize("scale", [100.0, -10.0])
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_rules_shrug_off_one_attacker(name, scale, data, clean, tmp_path):
    mse, history, _ = run(data, tmp_path, name, scale, **ROBUST[name])
    assert len(history["rounds"]) == ROUNDS + 1 and "stopped" not in history
    assert mse <= 1.10 * clean[0], (name, scale, mse, clean[0])


def test_max_update_norm_alone_stops_an_attacker_it_always_catches(data, clean, tmp_path):
    """A bound just above the largest honest update (round 1's) rejects the attacker in every round
    as long as its update stays above it: here x1000 (x100 slips under it later, see below)."""
    clean_mse, honest_max = clean
    bound = 1.3 * honest_max
    mse, history, _ = run(data, tmp_path, "fedavg", 1000.0, **{"max-update-norm": bound})
    assert mse <= 1.10 * clean_mse, (mse, clean_mse)
    for row in history["rounds"][1:]:  # every round: the attacker, and only the attacker, rejected
        assert [f["node-id"] for f in row["failures"]] == [ATTACKER] and row["clients-ok"] == 9, row
    reason = history["rounds"][1]["failures"][0]["reason"]
    assert f"node {ATTACKER} sent an update of norm" in reason and "'max-update-norm'" in reason


def test_max_update_norm_bounds_the_x100_attacker_but_a_fixed_bound_cannot_stop_it(data, clean, tmp_path):
    """Honest updates shrink ~100x from round 1 to the noise floor, so a x100 update falls under any
    bound that lets round 1's honest updates through: the run no longer diverges (plain FedAvg does),
    but the attacker's passes still cost accuracy. Use a robust rule against it (tests above)."""
    clean_mse, honest_max = clean
    mse, history, _ = run(data, tmp_path, "fedavg", 100.0, **{"max-update-norm": 1.3 * honest_max})
    assert "stopped" not in history and np.isfinite(mse) and mse < 20 * clean_mse, mse
    rejected = [row["round"] for row in history["rounds"][1:] if row["failures"]]
    assert rejected[:3] == [1, 2, 3]  # caught while its update is large
    assert len(rejected) < ROUNDS  # and let through later: the limitation docs/how-to/strategies.md states


def test_max_update_norm_factor_stops_the_x100_attacker_in_every_round(data, clean, tmp_path):
    """The bound follows the honest updates down (3 x the round's median norm; honest ones measured
    within 1.94x of it over 20 clean rounds): FedAvg with it ends as the run without the attacker,
    where FedAvg alone is ruined (test_fedavg_is_ruined_by_one_attacker)."""
    mse, history, _ = run(data, tmp_path, "fedavg", 100.0, **{"max-update-norm-factor": 3.0})
    assert mse <= 1.10 * clean[0], (mse, clean[0])
    for row in history["rounds"][1:]:  # every round: the attacker, and only the attacker, rejected
        assert [f["node-id"] for f in row["failures"]] == [ATTACKER] and row["clients-ok"] == 9, row
    reason = history["rounds"][-1]["failures"][0]["reason"]
    assert f"node {ATTACKER} sent an update of norm" in reason and f"in round {ROUNDS}" in reason
    assert "'max-update-norm-factor' 3 x the round's median update norm" in reason


def test_max_update_norm_factor_works_under_a_robust_rule_and_with_the_fixed_bound(data, clean, tmp_path):
    """Replies are checked before any strategy sees them: the same rejections under Krum, and the
    fixed bound (which catches x100 only early, see above) takes its rounds first."""
    _, honest_max = clean
    knobs = {"num-malicious-nodes": 1, "max-update-norm-factor": 3.0, "max-update-norm": 1.3 * honest_max}
    mse, history, _ = run(data, tmp_path, "krum", 100.0, **knobs)
    assert mse <= 1.10 * clean[0], (mse, clean[0])
    reasons = [row["failures"][0]["reason"] for row in history["rounds"][1:]]
    for row in history["rounds"][1:]:
        assert [f["node-id"] for f in row["failures"]] == [ATTACKER], row
    assert "'max-update-norm' =" in reasons[0] and "'max-update-norm-factor'" in reasons[-1], reasons


if __name__ == "__main__":  # the table in docs/how-to/strategies.md: python -m tests.integration.test_robust
    import pathlib
    import tempfile

    root = pathlib.Path(tempfile.mkdtemp())
    figures = write_synthetic_shards(root / "data", 10, 200, 5, 42, 1000)
    base, _, grid = run(figures, root, "fedavg")
    honest = max(
        np.linalg.norm(flat(r.content["arrays"]).astype(np.float64) - flat(m.content["arrays"]))
        for m, r in zip(grid.sent, grid.received, strict=True) if m.metadata.message_type == "train"
    )  # fmt: skip
    print(f"clean FedAvg: final test MSE {base:.5g}; largest honest update norm {honest:.4g}")
    rows = [("fedavg", {})] + sorted(ROBUST.items()) + [("fedavg", {"max-update-norm": round(float(1.3 * honest), 3)}),
                                                         ("fedavg", {"max-update-norm-factor": 3.0})]
    for name, knobs in rows:
        cells = [f"{run(figures, root, name, scale, **knobs)[0] / base:.4g}" for scale in (100.0, -10.0, 1000.0)]
        print(f"| {name} {knobs or ''} | " + " | ".join(cells) + " |", flush=True)
    # max-update-norm-factor over 20 rounds: the honest spread it must let through, and what it does not stop
    long, _, grid = run(figures, root, "fedavg", **{"num-server-rounds": 20})
    rounds: dict = {}
    for m, r in zip(grid.sent, grid.received, strict=True):
        if m.metadata.message_type == "train":
            norm = np.linalg.norm(flat(r.content["arrays"]).astype(np.float64) - flat(m.content["arrays"]))
            rounds.setdefault(m.content["config"]["server-round"], []).append(norm)
    spread = max(max(norms) / np.median(norms) for norms in rounds.values())
    print(f"20 clean rounds: largest honest update norm / its round's median {spread:.3g}")
    for scale, knobs in ((100.0, {"max-update-norm-factor": 3.0}), (-2.5, {}), (-2.5, {"max-update-norm-factor": 3.0})):
        mse, history, _ = run(figures, root, "fedavg", scale, **{"num-server-rounds": 20, **knobs})
        rejected = sum(1 for row in history["rounds"] for f in row.get("failures", []) if f["node-id"] == ATTACKER)
        print(f"20 rounds, s = {scale:g}, fedavg {knobs or ''}: {mse / long:.4g} x the clean 20-round run; "
              f"the attacker rejected in {rejected} rounds", flush=True)  # fmt: skip
