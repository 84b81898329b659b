"""``fit-intercept = false``: a model through the origin across training, every strategy, FedOLS,
standardization, DP, checkpoints and the export (in process, tests/inprocess.py; the SavedModel is
loaded by plain TensorFlow in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedlinear.common.config import STRATEGIES
from tests.conftest import REPO
from tests.inprocess import Crash, crash_after, run_in_process

TRUE_KERNEL = np.array([1.5, -2.0, 0.5])


@pytest.fixture(scope="module")
def origin_shards(tmp_path_factory):
    """3 parties of data with a model through the origin; features far from 0 (centring would matter)."""
    root = tmp_path_factory.mktemp("origin")
    rng = np.random.default_rng(19)
    uris, parts = [], []
    for i, n in enumerate([120, 80, 100]):
        x = 4.0 + rng.normal(size=(n, 3)) * [1.0, 0.5, 2.0] + i  # a covariate shift between parties
        y = x @ TRUE_KERNEL + 0.3 * rng.normal(size=n)
        uri = str(root / f"client-{i}.csv")
        np.savetxt(uri, np.column_stack([x, y]), delimiter=",", fmt="%.17g", header="a,b,c,y", comments="")
        uris.append(uri)
        parts.append((x, y))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    test = str(root / "test.csv")
    xt = 4.0 + rng.normal(size=(200, 3))
    np.savetxt(test, np.column_stack([xt, xt @ TRUE_KERNEL + 0.3 * rng.normal(size=200)]), delimiter=",",
               fmt="%.17g", header="a,b,c,y", comments="")  # fmt: skip
    return uris, test, x, y


def origin_lstsq(x, y):
    return np.linalg.lstsq(x, y, rcond=None)[0]


def history(run_dir):
    with open(os.path.join(str(run_dir), "history.json")) as handle:
        return json.load(handle)


def weight_arrays(grid):
    """The array names of every train task and train reply."""
    names = set()
    for sent, reply in zip(grid.sent, grid.received, strict=True):
        if sent.metadata.message_type == "train":
            names.add(tuple(sorted(sent.content["arrays"].keys())))
            if not reply.has_error():
                names.add(tuple(sorted(reply.content["arrays"].keys())))
    return names


def test_fedavg_through_the_origin_reaches_the_origin_optimum_and_exports_no_bias(origin_shards, tmp_path):
    uris, test, x, y = origin_shards
    grids = []
    status, manifest = run_in_process(uris, str(tmp_path / "run"), grids=grids,
                                      **{"fit-intercept": False, "test-uri": test})  # fmt: skip
    assert status["status"] == "completed", status
    assert weight_arrays(grids[0]) == {("kernel",)}  # no bias crosses the wire, either way
    best = origin_lstsq(x, y)
    run = history(tmp_path / "run")
    np.testing.assert_allclose(run["reference"]["weights"], [*best, 0.0], rtol=1e-9)
    assert run["reference"]["fit-intercept"] is False
    final = run["rounds"][-1]
    print(f"test MSE ratio {final['test-mse-ratio']:.5f}, train {final['train-mse'] / run['reference']['train-mse']:.5f}")
    assert final["test-mse-ratio"] <= 1.05 and final["train-mse"] <= 1.05 * run["reference"]["train-mse"]
    # standardization scales without centring
    assert run["standardization"]["x-shift"] == [0.0, 0.0, 0.0] and run["standardization"]["y-shift"] == 0.0
    assert manifest["fit-intercept"] is False and manifest["weights"]["bias"] == 0.0
    # checkpoints hold the kernel alone
    with np.load(tmp_path / "run" / "checkpoints" / f"round-{final['round']:04d}.npz") as saved:
        assert saved.files == ["kernel"]
    # plain TensorFlow in a fresh process: serving_default gives x @ kernel
    probe = np.random.default_rng(2).normal(size=(4, 3))
    loader = (
        "import json, sys; import numpy as np; import tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "y = m.signatures['serving_default'](x=tf.constant(np.array(json.loads(sys.argv[2]), np.float32)))['y']\n"
        "print(json.dumps([y.numpy().ravel().tolist(), hasattr(m, 'bias')]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", loader, str(tmp_path / "run" / "model"), json.dumps(probe.tolist())],
        capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    served, has_bias = json.loads(out.stdout.strip().splitlines()[-1])
    kernel = np.array(manifest["exported-weights"]["kernel"], np.float32)
    np.testing.assert_allclose(served, probe.astype(np.float32) @ kernel, rtol=1e-5, atol=1e-5)
    assert has_bias is False


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in ("fedols", "scaffold")])
def test_every_strategy_trains_a_model_without_a_bias(origin_shards, tmp_path, strategy):
    uris, test, x, y = origin_shards
    grids = []
    settings = {"fit-intercept": False, "test-uri": test, "num-server-rounds": 3, "strategy": strategy}
    if strategy in ("krum", "multikrum", "bulyan", "fedtrimmedavg"):
        settings["num-malicious-nodes"] = 0
    status, manifest = run_in_process(uris, str(tmp_path / "run"), grids=grids, **settings)
    assert status["status"] == "completed", status
    assert weight_arrays(grids[0]) == {("kernel",)}
    assert manifest["weights"]["bias"] == 0.0 and manifest["fit-intercept"] is False
    assert np.isfinite(history(tmp_path / "run")["rounds"][-1]["test-mse-ratio"])


def test_scaffold_without_an_intercept_is_refused_in_one_line():
    from fedlinear.common.config import RunConfig
    from fedlinear.common.errors import FedLinearError

    with pytest.raises(FedLinearError, match="scaffold needs 'fit-intercept' = true"):
        RunConfig.from_run_config({"strategy": "scaffold", "fit-intercept": False})


@pytest.mark.parametrize("dp", ["local", "central-server-clip", "central-client-clip"])
def test_dp_clips_and_noises_the_kernel_alone(origin_shards, tmp_path, dp):
    uris, test, _, _ = origin_shards
    grids = []
    status, manifest = run_in_process(uris, str(tmp_path / "run"), grids=grids,
                                      **{"fit-intercept": False, "test-uri": test, "num-server-rounds": 2, "dp": dp})  # fmt: skip
    assert status["status"] == "completed", status
    assert weight_arrays(grids[0]) == {("kernel",)}
    assert manifest["privacy"]["epsilon"] > 0 and manifest["weights"]["bias"] == 0.0


@pytest.mark.parametrize("method", ["qr", "normal"])
def test_fedols_through_the_origin(origin_shards, tmp_path, method):
    uris, _, x, y = origin_shards
    status, manifest = run_in_process(uris, str(tmp_path / "run"),
                                      **{"fit-intercept": False, "strategy": "fedols", "fedols-method": method})  # fmt: skip
    assert status["status"] == "completed", status
    np.testing.assert_allclose(manifest["weights"]["kernel"], origin_lstsq(x, y), rtol=1e-9)
    assert manifest["weights"]["bias"] == 0.0
    [row] = history(tmp_path / "run")["rounds"]
    residual = y - x @ origin_lstsq(x, y)
    assert row["train-mse"] == pytest.approx(residual @ residual / len(y), rel=1e-9)


def test_a_resume_with_another_fit_intercept_is_refused_and_the_same_resumes(origin_shards, tmp_path):
    uris, test, _, _ = origin_shards
    settings = {"fit-intercept": False, "test-uri": test, "num-server-rounds": 4}
    _, whole = run_in_process(uris, str(tmp_path / "whole"), **settings)
    with pytest.raises(Crash):  # the server dies as round 3's tasks go out
        run_in_process(uris, str(tmp_path / "resumed"), sabotage=crash_after(2 * len(uris)), **settings)
    status, _ = run_in_process(uris, str(tmp_path / "resumed"), **{**settings, "fit-intercept": True})
    assert status["status"] == "failed"
    assert "fit-intercept False -> True" in status["message"] and "\n" not in status["message"]
    status, resumed = run_in_process(uris, str(tmp_path / "resumed"), **settings)
    assert status["status"] == "completed", status
    assert resumed["exported-weights"] == whole["exported-weights"]  # bit-identical to the uninterrupted run
