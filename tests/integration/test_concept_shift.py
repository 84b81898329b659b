"""FedProx against FedAvg under concept shift, and ``fedlinear compare`` showing it.

Data: ``fedlinear data synth --clients 10 --samples-per-client 200 --concept-spread 1 --seed 42``
(d = 10, noise 0.1; party k's true weights w_k = w + N(0, I)). Runs: 20 rounds, every party every
round, ``local-epochs`` 5, ``batch-size`` 50 (4 steps an epoch, so the batch order matters),
``learning-rate`` auto, the real ServerApp and ClientApp handlers in this process.

What is compared is the distance to the pooled least-squares optimum, the answer FedAvg's global
objective has: the final ``excess-train-mse`` (pooled training MSE over the optimum's; >= 0, exact)
and ``weight-distance`` |w - w*|. Why FedAvg misses it: with E local steps each party moves towards
its own w_k; were every party's Hessian XᵀX/n the same, the average of the local updates would
still have w* as its fixed point, but 200 rows of d = 10 give Hessians ~30-35 % (spectral norm) off
the pooled one, and with the concept spread (|w_k - w| ≈ 3) that makes the fixed point drift
(client drift). FedProx's μ/2 ||θ − θ_g||² holds each local run near θ_g and shrinks that drift;
too large a μ also slows the progress a round makes, so 20 rounds no longer suffice (μ = 10 in the
grid of docs/how-to/heterogeneous-parties.md). The μ grid, measured once (there, "FedProx under concept shift"): μ = 3 is the
best of {0.01, 0.1, 0.3, 1, 3, 10}.

"Differ measurably": the relative gap between the two runs is more than 10 x the largest gap
between FedAvg runs that differ only in ``seed`` (with every party sampled every round and the
initial model fixed, the seed changes only the clients' batch order). Measured: that floor is
~1 % (5 seeds), the FedProx gap ~69 % on the excess train MSE and ~44 % on the weight distance.

On the test MSE both are *below* the least-squares test MSE (ratios ~0.989 and ~0.993): the
pooled training optimum is itself ~1 % off on held-out data (2000 rows, residual variance ~10), so
being closer to it need not lower the test MSE, and here FedAvg's test MSE is the lower by 0.4 %.
We assert no direction for the test MSE, only that the two stay within 1 % of each other.

Mutation check: the same FedProx run with ``proximal-mu`` 0 is FedAvg (bit for bit), and the
"differ measurably" predicate is false for it.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import json
import os
import re

import pytest

from tests.conftest import run_cli
from tests.inprocess import run_in_process

CLIENTS = 10
DATA = ["--clients", str(CLIENTS), "--samples-per-client", "200", "--concept-spread", "1", "--seed", "42"]
RUN = {"num-server-rounds": 20, "local-epochs": 5, "batch-size": 50, "learning-rate": "auto"}
TUNED_MU = 3.0
NOISE_SEEDS = (1, 2, 3)  # seed 1 is the seed of the compared runs
MARGIN = 10.0  # "measurably": more than MARGIN x the seed-only noise floor
METRICS = ("excess-train-mse", "weight-distance")


def rel_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def noise_floor(finals: list[dict]) -> dict[str, float]:
    """Per metric, the largest relative gap between runs that differ only in the seed."""
    return {m: max(rel_gap(a[m], b[m]) for a, b in itertools.combinations(finals, 2)) for m in METRICS}


def differ_measurably(a: dict, b: dict, floor: dict[str, float]) -> bool:
    """Some metric's relative gap is more than MARGIN x its noise floor (and more than 0.1 %)."""
    return any(rel_gap(a[m], b[m]) > MARGIN * max(floor[m], 1e-3) for m in METRICS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fedlinear.scripts import cli

    root = tmp_path_factory.mktemp("concept-shift")
    data = str(root / "data")
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        assert cli.main(["data", "synth", "--out", data, *DATA]) == 0  # the code path of `fedlinear data synth`
    shards = [os.path.join(data, f"client-{i}.csv") for i in range(CLIENTS)]
    test_uri = os.path.join(data, "test.csv")

    def run(name: str, **config) -> dict:
        run_dir = str(root / name)
        status, manifest = run_in_process(shards, run_dir, **{**RUN, "test-uri": test_uri, **config})
        assert status["status"] == "completed", status
        return {"dir": run_dir, "final": manifest["final"], "manifest": manifest}

    out = {"root": str(root), "truth": json.load(open(os.path.join(data, "truth.json")))}
    out["fedavg"] = [run(f"fedavg-seed{s}", strategy="fedavg", seed=s) for s in NOISE_SEEDS]
    out["fedprox"] = run("fedprox", strategy="fedprox", seed=NOISE_SEEDS[0], **{"proximal-mu": TUNED_MU})
    out["fedprox-mu0"] = run("fedprox-mu0", strategy="fedprox", seed=NOISE_SEEDS[0], **{"proximal-mu": 0.0})
    return out


def test_the_data_has_concept_shift(runs):
    concept = runs["truth"]["heterogeneity"]["concept"]
    assert concept["spread"] == 1.0 and 0.8 < concept["realised_spread"] < 1.2


def test_fedprox_with_tuned_mu_differs_measurably_and_drifts_less(runs):
    fedavg = [r["final"] for r in runs["fedavg"]]
    prox = runs["fedprox"]["final"]
    floor = noise_floor(fedavg)
    gaps = {m: rel_gap(fedavg[0][m], prox[m]) for m in METRICS}
    print(f"\nnoise floor (seeds {NOISE_SEEDS}): {floor}\nFedAvg vs FedProx mu={TUNED_MU}: {gaps}")
    print({m: (fedavg[0][m], prox[m]) for m in (*METRICS, "test-mse-ratio")})
    # the batch order does change FedAvg (batch-size 50 of 200 rows), so the floor is a real one
    assert all(floor[m] > 0 for m in METRICS), floor
    assert differ_measurably(fedavg[0], prox, floor), (gaps, floor)
    # and both metrics separately, in FedProx's favour: less client drift, closer to the pooled optimum
    for m in METRICS:
        assert gaps[m] > MARGIN * floor[m], (m, gaps[m], floor[m])
        assert prox[m] < min(f[m] for f in fedavg), (m, prox[m], [f[m] for f in fedavg])
    # neither reaches the pooled optimum with 5 local epochs under concept shift
    assert prox["weight-distance"] > 0.05 and fedavg[0]["weight-distance"] > 0.05
    # on held-out data the two are within 1 % of each other (no direction claimed, see the docstring)
    assert rel_gap(prox["test-mse-ratio"], fedavg[0]["test-mse-ratio"]) < 0.01


def test_mutation_mu_zero_does_not_differ(runs):
    """proximal-mu 0: FedProx is FedAvg, and the predicate the test above relies on says so."""
    fedavg = [r["final"] for r in runs["fedavg"]]
    mu0 = runs["fedprox-mu0"]["final"]
    assert not differ_measurably(fedavg[0], mu0, noise_floor(fedavg))
    assert all(mu0[m] == fedavg[0][m] for m in METRICS)  # same seed, same data: bit for bit


def final_table_rows(page: str) -> list[list[str]]:
    """The cells (unescaped text) of the rows of the "Final figures" table."""
    section = page.split("<h2>Final figures</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section, flags=re.S)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r, flags=re.S)]
            for r in rows]  # fmt: skip


def test_compare_report_shows_both_runs(runs):
    fedavg, prox = runs["fedavg"][0], runs["fedprox"]
    out = os.path.join(runs["root"], "compare.html")
    proc = run_cli("compare", fedavg["dir"], prox["dir"], "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = open(out, encoding="utf-8").read()
    rows = final_table_rows(page)
    header, body = rows[0], rows[1:]
    assert len(body) == 2, rows
    ratio_col = header.index("MSE / LS")
    for run, name in ((fedavg, "fedavg"), (prox, "fedprox")):
        history = json.load(open(os.path.join(run["dir"], "history.json")))
        last = history["rounds"][-1]
        assert last["round"] == RUN["num-server-rounds"]
        assert last["test-mse-ratio"] == pytest.approx(run["final"]["test-mse-ratio"], rel=1e-12)
        (row,) = [r for r in body if f"strategy={name}" in r[0]]
        assert float(row[ratio_col]) == pytest.approx(last["test-mse-ratio"], rel=1e-5)  # shown as %.6g
        assert row[ratio_col] == f"{last['test-mse-ratio']:.6g}"
    # legend labels (also the plots' legends) name both strategies, and the tuned mu
    labels = [r[0] for r in body]
    assert any("strategy=fedavg" in label for label in labels), labels
    assert any("strategy=fedprox" in label and "proximal-mu=3" in label for label in labels), labels
    assert "Settings that differ" in page and "fedprox" in page and "fedavg" in page
    pngs = os.path.join(runs["root"], "compare")
    assert os.path.isfile(os.path.join(pngs, "ratio.png")) and os.path.isfile(os.path.join(pngs, "excess.png"))
