"""``strategy = fedols``: exact federated least squares (and ridge) in one round, both methods.

Checked against closed forms: numpy ``lstsq`` on the pooled data, the ridge solution of the
augmented system, and NIST StRD's certified values for Longley (and Wampler 1/2, whose data are
defined by NIST's generating polynomials, so they are exact offline). In process
(tests/inprocess.py) and over Flower's real runtime in both run modes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedlinear.common import fedols, scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.csvio import load_csv
from fedlinear.common.errors import FedLinearError
from tests.conftest import REPO, run_cli
from tests.inprocess import run_in_process, write_synthetic_shards

LONGLEY_CERTIFIED = np.array(  # NIST StRD: b1..b6, then the intercept b0
    [15.0618722713733, -0.358191792925910e-1, -2.02022980381683, -1.03322686717359, -0.511041056535807e-1,
     1829.15146461355, -3482258.63459582]
)  # fmt: skip


def pooled(uris):
    shards = [load_csv(uri) for uri in uris]
    return np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards])


def theta(manifest, key="weights"):
    return np.array(manifest[key]["kernel"] + [manifest[key]["bias"]])


def lstsq(x, y, l2=0.0):
    """``[w, b]`` minimising ||y − Xw − b||² + l2||w||² (the augmented system, SVD)."""
    d = x.shape[1]
    design = np.column_stack([x, np.ones(len(x))])
    target = np.asarray(y, np.float64)
    if l2 > 0:
        design = np.vstack([design, np.column_stack([np.sqrt(l2) * np.eye(d), np.zeros(d)])])
        target = np.concatenate([target, np.zeros(d)])
    return np.linalg.lstsq(design, target, rcond=None)[0]


def digits(estimate, certified):
    """Significant digits of agreement: the worst coefficient's -log10 relative error."""
    rel = np.abs(np.asarray(estimate) - certified) / np.abs(certified)
    return float(-np.log10(max(rel.max(), 1e-17)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 unequal shards, d = 5, features with offsets (well conditioned)."""
    root = tmp_path_factory.mktemp("fedols")
    return write_synthetic_shards(root, 4, 150, 5, 21, 300, sizes=[150, 40, 97, 9])


# --------------------------------------------------------------------------------------------------
# the math (common/fedols.py)
# --------------------------------------------------------------------------------------------------


def test_stacked_r_factors_solve_pooled_least_squares():
    rng = np.random.default_rng(2)
    x = 1e3 + rng.normal(size=(120, 4)) * [1.0, 10.0, 0.1, 5.0]
    y = x @ [1.0, -0.5, 3.0, 0.2] + 7e4 + rng.normal(size=120)
    stats = scaling.PooledStats.of(x, y)
    parts = np.split(np.arange(120), [50, 53, 100])  # one party with 3 rows < d + 2: a padded R
    rs = [fedols.local_r(x[i], y[i], stats.mean) for i in parts]
    assert all(r.shape == (6, 6) and np.array_equal(r, np.triu(r)) and (np.diagonal(r) >= 0).all() for r in rs)
    assert all(fedols.check_r(r, 4, len(i)) is None for r, i in zip(rs, parts, strict=True))
    expected = lstsq(x, y)
    for solution in (fedols.solve_qr(rs, stats.mean, 0.0, stats.constant_features()), fedols.solve_normal(stats, 0.0)):
        np.testing.assert_allclose(np.r_[solution.kernel, solution.bias], expected, rtol=1e-10)
    # a party left out after the pooled mean was computed: exact for the others (the intercept column)
    rest = np.concatenate([parts[0], parts[2], parts[3]])
    solution = fedols.solve_qr([rs[0], rs[2], rs[3]], stats.mean, 0.0, stats.constant_features())
    np.testing.assert_allclose(np.r_[solution.kernel, solution.bias], lstsq(x[rest], y[rest]), rtol=1e-10)


def test_check_r_names_what_is_wrong():
    r = fedols.local_r(np.arange(12.0).reshape(6, 2) ** 1.5, np.arange(6.0), np.zeros(3))
    assert fedols.check_r(r, 2, 6) is None
    assert "shape" in fedols.check_r(r[:3], 2, 6)
    bad = r.copy()
    bad[1, 1] = np.nan
    assert fedols.check_r(bad, 2, 6) == "R factor has non-finite values"
    bad = r.copy()
    bad[3, 0] = 1e-3
    assert "not upper triangular" in fedols.check_r(bad, 2, 6)
    assert "says 24 rows, the shard query said 6" in fedols.check_r(2 * r, 2, 6)


def test_constant_and_collinear_columns_get_the_minimum_norm_fit():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(80, 2))
    x = np.column_stack([x, np.full(80, 3.25), x[:, 0] * 2.0])
    y = x[:, :2] @ [1.0, -1.0] + 0.5 + 0.01 * rng.normal(size=80)
    stats = scaling.PooledStats.of(x, y)
    rs = [fedols.local_r(x[i], y[i], stats.mean) for i in np.array_split(np.arange(80), 3)]
    solution = fedols.solve_qr(rs, stats.mean, 0.0, stats.constant_features())
    assert solution.kernel[2] == 0.0 and any("constant" in n for n in solution.notes)
    assert "minimum-norm" in solution.solver
    fitted = x @ solution.kernel + solution.bias
    np.testing.assert_allclose(fitted, np.column_stack([x, np.ones(80)]) @ lstsq(x, y), atol=1e-9)


# --------------------------------------------------------------------------------------------------
# the real ServerApp and ClientApp, in process
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["qr", "normal"])
def test_one_round_gives_pooled_least_squares(shards, tmp_path, method):
    uris, test = shards
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), **{"strategy": "fedols", "fedols-method": method, "test-uri": test}
    )
    assert status["status"] == "completed", status
    x, y = pooled(uris)
    np.testing.assert_allclose(theta(manifest), lstsq(x, y), rtol=1e-9)
    # the export is the float64 solution rounded to float32, in raw units
    np.testing.assert_array_equal(theta(manifest, "exported-weights"), theta(manifest).astype(np.float32))
    assert manifest["standardization"]["kind"] == "none"
    block = manifest["fedols"]
    assert block["method"] == method and block["l2"] == 0.0 and block["parties"] == 4
    assert 1 <= block["condition-number"] < 100
    with open(tmp_path / "run" / "history.json") as handle:
        history = json.load(handle)
    [row] = history["rounds"]
    assert row["round"] == 1 and row["clients-ok"] == 4 and row["clients-failed"] == 0
    assert row["test-mse-ratio"] == pytest.approx(1.0, abs=1e-9)
    assert row["weight-distance"] < 1e-9 and history["fedols"] == block
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest.json")


@pytest.mark.parametrize("method", ["qr", "normal"])
def test_ridge_matches_the_closed_form(shards, tmp_path, method):
    uris, _ = shards
    l2 = 250.0
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), **{"strategy": "fedols", "fedols-method": method, "fedols-l2": l2}
    )
    assert status["status"] == "completed", status
    x, y = pooled(uris)
    expected = lstsq(x, y, l2)
    np.testing.assert_allclose(theta(manifest), expected, rtol=1e-9)
    # the penalty is real: the ridge solution is not least squares, and only the kernel shrinks
    assert np.linalg.norm(expected[:-1]) < 0.99 * np.linalg.norm(lstsq(x, y)[:-1])
    xc = x - x.mean(axis=0)
    closed = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ (y - y.mean()))
    np.testing.assert_allclose(theta(manifest)[:-1], closed, rtol=1e-9)
    assert manifest["fedols"]["l2"] == l2


def longley_shards(tmp_path, clients=4):
    """All 16 rows of Longley (no test rows held out: the certified values are for all of them)."""
    from tests.integration.test_real_data import longley

    frame = longley()
    uris = []
    for i, rows in enumerate(np.array_split(np.arange(len(frame)), clients)):
        uris.append(str(tmp_path / f"client-{i}.csv"))
        frame.iloc[rows].to_csv(uris[-1], index=False)
    return uris


@pytest.mark.parametrize("method,at_least", [("qr", 11), ("normal", 10)])
def test_longley_matches_nists_certified_values(tmp_path, method, at_least):
    """Split over 4 parties; measured here: qr 13.3 digits, normal 12.0 (see docs/how-to/fedols.md)."""
    uris = longley_shards(tmp_path)
    status, manifest = run_in_process(uris, str(tmp_path / "run"), **{"strategy": "fedols", "fedols-method": method})
    assert status["status"] == "completed", status
    got = digits(theta(manifest), LONGLEY_CERTIFIED)
    print(f"longley {method}: {got:.1f} significant digits")
    assert got >= at_least
    # both methods report the same estimate: the centred design with unit-norm columns
    assert manifest["fedols"]["condition-number"] == pytest.approx(110.544, rel=1e-4)


def wampler(number):
    """NIST StRD Wampler1 / Wampler2: y = Σ c^k x^k, x = 0..20, k = 0..5; certified coefficients c^k."""
    coef = np.ones(6) if number == 1 else 10.0 ** -np.arange(6)
    t = np.arange(21.0)
    x = np.column_stack([t**k for k in range(1, 6)])
    return x, x @ coef[1:] + coef[0], np.r_[coef[1:], coef[0]]


@pytest.mark.parametrize("number,qr_at_least", [(1, 9), (2, 12)])
def test_wampler_qr_keeps_more_digits_than_the_normal_equations(number, qr_at_least):
    """Measured: Wampler1 qr 9.6 / normal 6.7 digits; Wampler2 qr 13.1 / normal 9.2 (3 parties)."""
    x, y, certified = wampler(number)
    stats = scaling.PooledStats.of(x, y)
    rs = [fedols.local_r(x[i], y[i], stats.mean) for i in np.array_split(np.arange(21), 3)]
    qr = fedols.solve_qr(rs, stats.mean, 0.0, stats.constant_features())
    normal = fedols.solve_normal(stats, 0.0)
    qr_digits = digits(np.r_[qr.kernel, qr.bias], certified)
    normal_digits = digits(np.r_[normal.kernel, normal.bias], certified)
    print(f"wampler{number}: qr {qr_digits:.1f}, normal {normal_digits:.1f} digits")
    assert qr_digits >= qr_at_least and qr_digits > normal_digits + 2


def asks_r(msg) -> bool:
    """Whether a message asks for an R factor: stage ``fedols-r``, or ``scatter`` with ``with-r`` (the R in the same reply)."""
    if msg.metadata.message_type != "query":
        return False
    config = msg.content["config"]
    return config.get("stage") == "fedols-r" or (config.get("stage") == "scatter" and bool(config.get("with-r", False)))


def with_r(msg, honest, r) -> Message:
    """The honest reply with its R factor replaced by ``r`` (the rest of a scatter reply kept)."""
    content = RecordDict({name: record for name, record in honest.content.items() if name != "r"})
    content["r"] = ArrayRecord({"r": Array(r)})
    return Message(content, reply_to=msg)


def sabotage_r(bad: dict[int, str]):
    """Nodes answering the R-factor query (or the scatter query's R part) with a NaN, a non-triangular or an inflated R."""

    def sabotage(node_id, msg):
        if not asks_r(msg) or node_id not in bad:
            return None
        from fedlinear.clients import client_app as ca

        honest = ca.app(msg, _context(node_id, msg))
        r = honest.content["r"]["r"].numpy().copy()
        if bad[node_id] == "nan":
            r[0, 0] = np.nan
        elif bad[node_id] == "lower":
            r[2, 1] = 0.5
        else:  # claims 4x its rows: every row of its data counted four times
            r = 2.0 * r
        return with_r(msg, honest, r)

    return sabotage


_GRID = []


def _context(node_id, msg):
    from flwr.app import Context

    grid = _GRID[-1]
    return Context(run_id=1, node_id=node_id, node_config=dict(grid.nodes[node_id]), state=RecordDict(),
                   run_config=grid.run_config)  # fmt: skip


def test_bad_r_factors_are_left_out_and_reported(shards, tmp_path):
    uris, test = shards
    bad = {1001: "nan", 1002: "lower", 1003: "inflated"}
    _GRID.clear()
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), sabotage=sabotage_r(bad), grids=_GRID, **{"strategy": "fedols", "test-uri": test}
    )
    assert status["status"] == "completed", status
    x0, y0 = pooled(uris[:1])
    np.testing.assert_allclose(theta(manifest), lstsq(x0, y0), rtol=1e-9)  # party 0 alone
    [row] = json.loads((tmp_path / "run" / "history.json").read_text())["rounds"]
    assert row["clients-ok"] == 1 and row["clients-failed"] == 3
    reasons = {f["node-id"]: f["reason"] for f in row["failures"]}
    assert reasons[1001] == "R-factor reply rejected: R factor has non-finite values"
    assert "not upper triangular" in reasons[1002]
    assert "intercept column says 36 rows, the shard query said 9" in reasons[1003]
    assert manifest["fedols"]["parties"] == 1


def test_every_party_failing_is_one_line(shards, tmp_path):
    uris, _ = shards
    _GRID.clear()
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), grids=_GRID, sabotage=sabotage_r({1000 + i: "nan" for i in range(4)}),
        **{"strategy": "fedols"},
    )  # fmt: skip
    assert status["status"] == "failed" and manifest is None
    assert status["message"].startswith("no party sent a usable R factor: node 1000: R-factor reply rejected")


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"dp": "local"}, "'strategy' = fedols works with 'dp' = central-client-clip .*not 'dp' = local"),
        ({"secure-aggregation": True}, "cannot work with 'secure-aggregation' = true"),
        ({"reference": "none"}, "'strategy' = fedols needs the parties' cross-products"),
        ({"fedols-method": "svd"}, "'fedols-method' must be one of qr, normal, got 'svd'"),
        ({"fedols-l2": -1.0}, "'fedols-l2' must be a finite number >= 0, got -1.0"),
    ],
)
def test_config_refuses_what_fedols_cannot_do(settings, message):
    with pytest.raises(FedLinearError, match=message) as caught:
        RunConfig.from_run_config({"strategy": "fedols", **settings})
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Flower's real runtime: SuperLink + SuperNode processes, and the simulation engine
# --------------------------------------------------------------------------------------------------

LOADER = r"""
import json, sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
print(json.dumps(m.signatures["serving_default"](x=tf.constant(x))["y"].numpy().ravel().tolist()))
"""


@pytest.mark.e2e  # a real federation (Flower's runtime, real processes)
@pytest.mark.parametrize("mode", ["processes", "simulation"])
def test_real_runtime_solves_in_one_round(federation_dir, tmp_path, mode):
    out = tmp_path / "run"
    done = run_cli(
        "run", "--data", federation_dir, "--clients", 3, "--out", out, "--mode", mode, "--set", "strategy=fedols",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fedols (qr, l2 = 0): exact solution from 3 parties, 900 samples" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    x, y = pooled([os.path.join(federation_dir, f"client-{i}.csv") for i in range(3)])
    np.testing.assert_allclose(theta(manifest), lstsq(x, y), rtol=1e-9)
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history["rounds"]] == [1]
    assert history["rounds"][0]["test-mse-ratio"] == pytest.approx(1.0, abs=1e-9)
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    # plain TensorFlow in a fresh process serves the float32 weights
    probe = np.random.default_rng(1).normal(size=(5, x.shape[1]))
    served = subprocess.run(
        [sys.executable, "-c", LOADER, str(out / "model"), json.dumps(probe.tolist())],
        capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    exported = theta(manifest, "exported-weights")
    np.testing.assert_array_equal(exported, theta(manifest).astype(np.float32))
    predicted = np.array(json.loads(served.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(predicted, probe.astype(np.float32) @ exported[:-1] + exported[-1], rtol=1e-5, atol=1e-5)


def test_an_r_factor_must_be_the_one_of_the_statistics_the_party_sent(shards, tmp_path):
    """A party whose R factor is of other data than its moments and scatter (here its target's deviations
    doubled: still upper triangular, the intercept column still says its rows) is a failed party with the
    reason; the honest ones agree to rounding, and the solve is that of the others."""
    uris, test = shards

    def sabotage(node_id, msg):
        if node_id != 1002 or not asks_r(msg):
            return None
        from fedlinear.clients import client_app as ca

        honest = ca.app(msg, _context(node_id, msg))
        r = honest.content["r"]["r"].numpy().copy()
        r[:, -1] *= 2.0  # the R of [x − μx, 1, 2(y − μy)]
        assert fedols.check_r(r, 5, 97) is None  # the checks before this one cannot see it
        return with_r(msg, honest, r)

    _GRID.clear()
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), sabotage=sabotage, grids=_GRID, **{"strategy": "fedols", "test-uri": test}
    )
    assert status["status"] == "completed", status
    [row] = json.loads((tmp_path / "run" / "history.json").read_text())["rounds"]
    assert row["clients-ok"] == 3 and row["clients-failed"] == 1
    [failure] = row["failures"]
    assert failure["node-id"] == 1002
    assert failure["reason"].startswith("R-factor reply rejected: R factor disagrees with the moments and scatter")
    x, y = pooled([uris[0], uris[1], uris[3]])
    np.testing.assert_allclose(theta(manifest), lstsq(x, y), rtol=1e-9)


@pytest.mark.parametrize("shift", [0.0, 1.0, 1e3])
def test_honest_r_factors_match_their_statistics_about_any_centres(shift):
    """RᵀR of [x − c, 1, y − c_y] against n, Σz and the scatter about another centre m (the server's):
    honest data agrees whatever c and m (a far m cancels digits, inside the tolerance); other data does not."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(500, 3)) * [1.0, 1e3, 1e-3] + [5.0, -100.0, 1e3]
    y = x @ [1.0, 2e-3, 3.0] + 7.0 + rng.normal(size=500)
    moments = scaling.Moments.of(x, y)
    m = moments.mean + shift * rng.normal(size=4) * [1.0, 1e3, 1e-3, 1.0]
    scatter = scaling.Scatter.of(x, y, m, full=True).matrix
    for c in (m, moments.mean, np.zeros(4)):
        assert fedols.r_matches_statistics(fedols.local_r(x, y, c), 500, moments.total, scatter, m, c) is None
        other = fedols.local_r(x, y + 0.01 * x[:, 0], c)
        assert "disagrees" in fedols.r_matches_statistics(other, 500, moments.total, scatter, m, c)
