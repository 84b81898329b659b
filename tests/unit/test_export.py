"""The exported SavedModel: loaded with plain TensorFlow in a fresh process, it predicts X @ w + b."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from fedlinear.common import model as lm
from fedlinear.common.export import export_savedmodel
from tests.conftest import run_cli

LOADER = r"""
import json, sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
sig = m.signatures["serving_default"]
spec = sig.structured_input_signature[1]["x"]
x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
y = sig(x=tf.constant(x))["y"].numpy()
print(json.dumps({"y": y.tolist(), "shape": list(y.shape), "in_shape": spec.shape.as_list(), "in_dtype": spec.dtype.name,
                  "outputs": list(sig.structured_outputs)}))
"""


def test_savedmodel_reloads_in_fresh_process_and_predicts_xw_plus_b(tmp_path):
    rng = np.random.default_rng(0)
    weights = lm.LinearWeights(
        kernel=rng.normal(size=(4, 1)).astype(np.float32), bias=np.array([0.75], dtype=np.float32)
    )
    target = str(tmp_path / "run" / "model")
    export_savedmodel(weights, target)
    export_savedmodel(weights, target)  # re-export over an existing model replaces it whole
    x = rng.normal(size=(7, 4))
    out = subprocess.run(
        [sys.executable, "-c", LOADER, target, json.dumps(x.tolist())], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["in_shape"] == [None, 4] and result["in_dtype"] == "float32"
    assert result["outputs"] == ["y"] and result["shape"] == [7, 1]
    expected = x.astype(np.float32) @ weights.kernel + weights.bias
    np.testing.assert_allclose(np.array(result["y"]), expected, atol=1e-5)

    # the same model through `fedlinear predict`, from a CSV of features (+ an ignored target column)
    csv = tmp_path / "in.csv"
    np.savetxt(csv, np.column_stack([x, np.zeros(len(x))]), delimiter=",", fmt="%.17g")
    done = run_cli("predict", "--model", target, "--input", csv, "--output", tmp_path / "pred.txt")
    assert done.returncode == 0, done.stderr
    predicted = np.loadtxt(tmp_path / "pred.txt")
    np.testing.assert_allclose(predicted, expected.ravel(), atol=1e-5)
    assert "MSE against the last column" in done.stderr

    wrong = tmp_path / "wrong.csv"
    np.savetxt(wrong, x[:, :2], delimiter=",")
    done = run_cli("predict", "--model", target, "--input", wrong)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"fedlinear: error: {wrong}: has 2 columns; the model takes 4 features "
        "(give 4 feature columns, optionally followed by the target)"
    ]


def test_a_model_without_an_intercept_exports_the_kernel_alone(tmp_path):
    """``fit-intercept = false``: no bias variable, ``serving_default`` still takes x and gives x @ w."""
    rng = np.random.default_rng(3)
    weights = lm.LinearWeights(kernel=rng.normal(size=(3, 1)).astype(np.float32), bias=None)
    target = str(tmp_path / "model")
    export_savedmodel(weights, target)
    x = rng.normal(size=(5, 3))
    probe = LOADER + "print(json.dumps([hasattr(m, 'kernel'), hasattr(m, 'bias')]))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe, target, json.dumps(x.tolist())], capture_output=True, text=True, check=True
    )
    *_, served, variables = out.stdout.strip().splitlines()
    result = json.loads(served)
    assert result["in_shape"] == [None, 3] and result["outputs"] == ["y"] and result["shape"] == [5, 1]
    np.testing.assert_allclose(np.array(result["y"]), x.astype(np.float32) @ weights.kernel, atol=1e-5)
    assert json.loads(variables) == [True, False]


def test_read_linear_reads_a_model_without_an_intercept_as_bias_zero(tmp_path):
    """``init-from`` reads an export's variables: a ``fit-intercept = false`` one has no bias variable."""
    from fedlinear.common.export import read_linear
    from fedlinear.server.continuation import _recorded

    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(3, 1)).astype(np.float32)
    export_savedmodel(lm.LinearWeights(kernel=kernel, bias=None), str(tmp_path / "plain"))
    export_savedmodel(lm.LinearWeights(kernel=kernel, bias=np.array([0.75], np.float32)), str(tmp_path / "biased"))
    plain = read_linear(str(tmp_path / "plain"))
    np.testing.assert_array_equal(plain.kernel, kernel.ravel().astype(np.float64))
    assert (plain.bias, plain.num_features, plain.intercept) == (0.0, 3, False)
    biased = read_linear(str(tmp_path / "biased"))
    assert (biased.bias, biased.num_features, biased.intercept) == (0.75, 3, True)
    recorded = _recorded({"weights": {"kernel": [1.0, 2.0], "bias": None}})  # a manifest without an intercept
    assert recorded is not None and recorded[1] == 0.0
