"""Real data at defaults: public tables nobody here wrote, and synthetic data made hard on purpose.

Each table is written as a CSV with its header, split IID into 4 clients with ``fedlinear data
split``, and trained for 40 rounds with every setting at its default, by the real ServerApp and
ClientApp code in one process (tests/inprocess.py). The bar: final test MSE <= 1.05 x the pooled
least-squares optimum's. The same app over Flower's runtime is covered in test_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedlinear.common import model as lm
from fedlinear.scripts.cli import main as cli
from tests.conftest import REPO
from tests.inprocess import Crash, crash_after, run_in_process, write_synthetic_shards

BAR = 1.05


def _statsmodels(name: str):
    datasets = pytest.importorskip("statsmodels.api").datasets
    frame = getattr(datasets, name).load_pandas().data
    return frame


def longley():  # 16 x 6, famously ill-conditioned (NIST StRD)
    frame = _statsmodels("longley")
    return frame.drop(columns=["TOTEMP"]).join(frame["TOTEMP"])


def macrodata():  # 203 x 13, US macro series: year, levels in the thousands beside rates
    frame = _statsmodels("macrodata")
    return frame.drop(columns=["realgdp"]).join(frame["realgdp"])


def fair():  # 6366 x 8, survey data
    frame = _statsmodels("fair")
    return frame.drop(columns=["affairs"]).join(frame["affairs"])


def diabetes():  # 442 x 10, scikit-learn's bundled copy of Efron et al.'s table
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame
    return frame


def hard_synthetic():
    """Scales 1e-3..1e4, offsets up to 1e3, target offset 1e5, correlation condition number 1e4."""
    rng = np.random.default_rng(11)
    d, n = 8, 3000
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    corr = q @ np.diag(np.geomspace(1.0, 2e-5, d)) @ q.T
    corr /= np.sqrt(np.outer(np.diag(corr), np.diag(corr)))
    z = rng.multivariate_normal(np.zeros(d), corr, size=n)
    x = rng.uniform(0, 1e3, d) + np.geomspace(1e-3, 1e4, d) * z
    y = 1e5 + z @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
    import pandas as pd

    return pd.DataFrame(np.column_stack([x, y]), columns=[f"x{j}" for j in range(d)] + ["y"]), corr


TABLES = {"longley": longley, "macrodata": macrodata, "fair": fair, "diabetes": diabetes}


def split_table(frame, tmp_path, clients=4):
    source = tmp_path / "table.csv"
    frame.to_csv(source, index=False)
    out = tmp_path / "data"
    assert cli(["data", "split", str(source), "--clients", str(clients), "--out", str(out)]) == 0
    return [str(out / f"client-{i}.csv") for i in range(clients)], str(out / "test.csv")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_real_tables_reach_the_optimum_at_defaults(name, tmp_path):
    shards, test = split_table(TABLES[name](), tmp_path)
    status, manifest = run_in_process(shards, str(tmp_path / "run"), **{"num-server-rounds": 40, "test-uri": test})
    assert status["status"] == "completed", status
    ratio = manifest["final"]["test-mse-ratio"]
    print(f"{name}: final test MSE {ratio:.5f} x least squares; {manifest['learning-rate']['how']}")
    assert ratio <= BAR
    assert manifest["standardization"]["kind"] == "whiten"


def test_hard_synthetic_data_reaches_the_optimum_at_defaults_and_failed_before(tmp_path):
    frame, corr = hard_synthetic()
    assert np.linalg.cond(corr) >= 1e4
    shards, test = split_table(frame, tmp_path)
    status, manifest = run_in_process(shards, str(tmp_path / "run"), **{"num-server-rounds": 40, "test-uri": test})
    assert status["status"] == "completed", status
    assert manifest["final"]["test-mse-ratio"] <= BAR
    # the defaults before standardization (raw data, learning rate 0.05) blow up, and say so
    status, manifest = run_in_process(
        shards, str(tmp_path / "before"),
        **{"num-server-rounds": 40, "test-uri": test, "standardize": "none", "learning-rate": 0.05},
    )  # fmt: skip
    assert status["status"] == "failed" and manifest is None
    assert "diverged" in status["message"] and "'learning-rate'" in status["message"]
    assert "'standardize'" in status["message"] and "\n" not in status["message"]
    assert not os.path.exists(tmp_path / "before" / "model")
    # per-feature scaling alone crawls on a condition number of 1e4 (why auto whitens)
    status, manifest = run_in_process(
        shards, str(tmp_path / "scaled"), **{"num-server-rounds": 40, "test-uri": test, "standardize": "scale"}
    )
    assert status["status"] == "completed" and manifest["final"]["test-mse-ratio"] > BAR


def test_exported_model_takes_raw_x_and_gives_raw_y(tmp_path):
    """Loaded with plain TensorFlow in a fresh process: the folded transform, 1e-5 of the manifest's weights."""
    frame, _ = hard_synthetic()
    shards, test = split_table(frame.iloc[:600], tmp_path)
    status, manifest = run_in_process(shards, str(tmp_path / "run"), **{"num-server-rounds": 5, "test-uri": test})
    assert status["status"] == "completed", status
    x = frame.iloc[:600, :-1].to_numpy()
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "x = np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], m.signatures['serving_default'](x=tf.constant(x))['y'].numpy())\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run" / "model"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True, cwd=str(tmp_path), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True,
    )  # fmt: skip
    served = np.load(tmp_path / "y.npy").ravel()
    weights = manifest["weights"]
    expected = x.astype(np.float32).astype(np.float64) @ np.array(weights["kernel"]) + weights["bias"]
    np.testing.assert_allclose(served, expected, rtol=1e-5)
    assert abs(np.mean(expected) - 1e5) < 1e3  # raw units: the target's offset is in the model


def test_constant_and_duplicate_columns_are_reported_not_divided_by_zero(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 3))
    x = np.column_stack([x, np.full(400, 7.5), x[:, 0] * 2.0])  # a constant column, a collinear one
    y = x[:, :3] @ [1.0, -2.0, 0.5] + 3.0 + 0.1 * rng.normal(size=400)
    import pandas as pd

    shards, test = split_table(pd.DataFrame(np.column_stack([x, y])), tmp_path)
    status, manifest = run_in_process(shards, str(tmp_path / "run"), **{"num-server-rounds": 20, "test-uri": test})
    assert status["status"] == "completed", status
    notes = " ".join(manifest["standardization"]["notes"])
    assert "feature column 4 is constant (7.5)" in notes and "collinear" in notes
    assert manifest["weights"]["kernel"][3] == 0.0
    assert manifest["final"]["test-mse-ratio"] <= 1.01


def test_resume_reuses_the_recorded_transform_bit_identically(tmp_path):
    frame, _ = hard_synthetic()
    shards, test = split_table(frame.iloc[:800], tmp_path)
    settings = {"num-server-rounds": 6, "test-uri": test}
    _, whole = run_in_process(shards, str(tmp_path / "whole"), **settings)

    with pytest.raises(Crash):  # the server dies as round 4's tasks go out
        run_in_process(shards, str(tmp_path / "resumed"), sabotage=crash_after(3 * len(shards)), **settings)
    with open(tmp_path / "resumed" / "checkpoints" / "latest.json") as handle:
        pointer = json.load(handle)
    assert pointer["round"] == 3 and pointer["transform"]["kind"] == "whiten"
    status, resumed = run_in_process(shards, str(tmp_path / "resumed"), **settings)
    assert status["status"] == "completed"
    assert resumed["standardized-weights"] == whole["standardized-weights"]
    assert resumed["weights"] == whole["weights"]
    assert resumed["standardization"] == whole["standardization"]


def test_rounds_without_any_update_stop_the_run_loudly(tmp_path):
    frame, _ = hard_synthetic()
    shards, test = split_table(frame.iloc[:400], tmp_path)
    from flwr.app import Error, Message

    def every_train_fails(node_id, msg):
        if msg.metadata.message_type == "train":
            return Message(Error(code=4001, reason="disk on fire"), reply_to=msg)

    status, manifest = run_in_process(
        shards, str(tmp_path / "run"), sabotage=every_train_fails, **{"num-server-rounds": 10, "max-failed-rounds": 2}
    )
    assert status["status"] == "failed" and manifest is None
    assert "2 consecutive rounds" in status["message"] and "'max-failed-rounds'" in status["message"]
    assert "disk on fire" in status["message"]
    assert not os.path.exists(tmp_path / "run" / "model")


def test_reference_matches_certified_longley_values():
    """NIST StRD's certified coefficients for Longley, from the centred, scaled normal equations."""
    from fedlinear.common.scaling import PooledStats

    frame = longley()
    x, y = frame.iloc[:, :-1].to_numpy(float), frame.iloc[:, -1].to_numpy(float)
    kernel, bias = PooledStats.of(x, y).solve()
    certified = [15.0618722713733, -0.358191792925910e-1, -2.02022980381683, -1.03322686717359,
                 -0.511041056535807e-1, 1829.15146461355]  # fmt: skip
    np.testing.assert_allclose(kernel, certified, rtol=1e-9)
    assert bias == pytest.approx(-3482258.63459582, rel=1e-9)
    assert lm.lstsq_theta(x, y)[:-1] == pytest.approx(certified, rel=1e-9)  # SVD on the data agrees


def test_the_ten_client_synthetic_bar_still_holds(tmp_path):
    """The foundation's bar: 10 clients x 1000 unit-scale samples, 20 rounds, defaults: <= 1.01 x LS."""
    uris, test = write_synthetic_shards(tmp_path, 10, 1000, 10, 42, 2000)
    status, manifest = run_in_process(uris, str(tmp_path / "run"), **{"test-uri": test})
    assert status["status"] == "completed", status
    assert manifest["final"]["round"] == 20 and manifest["final"]["test-mse-ratio"] <= 1.01


def test_a_global_model_that_explodes_stops_the_run_in_that_round(tmp_path):
    """Longley on raw data with the old step size: round 1's global model is finite but enormous."""
    shards, test = split_table(longley(), tmp_path)
    status, manifest = run_in_process(
        shards, str(tmp_path / "run"),
        **{"num-server-rounds": 10, "test-uri": test, "standardize": "none", "learning-rate": 0.05},
    )  # fmt: skip
    assert status["status"] == "failed" and manifest is None
    assert status["message"].startswith("training diverged in round 1: the global model has a test MSE of ")
    assert "no model was exported" in status["message"] and "'learning-rate'" in status["message"]
    assert not os.path.exists(tmp_path / "run" / "model")


def test_auto_learning_rate_follows_its_three_bounds():
    from fedlinear.common.scaling import auto_learning_rate

    # many rows per shard: the mini-batch noise bound, 0.02 B / tr G
    lr, how = auto_learning_rate((1.0, 11.0), [1000] * 4, 32, 1, 40)
    assert lr == pytest.approx(0.02 * 32 / 11) and "noise" in how
    # every shard fits in one batch: no mini-batch noise, the stability bound 0.25 / λmax
    lr, how = auto_learning_rate((2.0, 7.0), [4] * 4, 32, 1, 40)
    assert lr == pytest.approx(0.125) and "stability" in how
    # few local steps over the run: enough to converge, 2.5 / steps
    lr, how = auto_learning_rate((0.5, 101.0), [40] * 4, 32, 1, 5)
    assert lr == pytest.approx(2.5 / 10) and "convergence" in how
    # nothing known: the fallback, said so
    lr, how = auto_learning_rate(None, [10], 32, 1, 5)
    assert lr == 0.05 and "no pooled statistics" in how
