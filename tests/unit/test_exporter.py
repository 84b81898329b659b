"""The exporter's side of the ServerApp without TensorFlow: request validation, the fallback to an in-process
export when the exporter process is missing, dead or talking nonsense (the in-process export is recorded, not run),
and ``FEDLINEAR_EXPORTER=in-process``. The exporter process itself: tests/e2e/test_exporter.py."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fedlinear.common import export, exporter
from fedlinear.common.errors import FedLinearError
from fedlinear.common.model import LinearWeights

WEIGHTS = LinearWeights(kernel=np.array([[0.1], [-3.0e-7]], np.float32), bias=np.array([2.5], np.float32))


def test_a_request_carries_float32_weights_exactly():
    weights, uri = exporter.parse_request(exporter.request_line(WEIGHTS, "s3://b/run/model"))
    assert uri == "s3://b/run/model"
    assert weights.kernel.dtype == np.float32 and weights.kernel.shape == (2, 1)
    np.testing.assert_array_equal(weights.kernel, WEIGHTS.kernel)
    np.testing.assert_array_equal(weights.bias, WEIGHTS.bias)
    no_bias, _ = exporter.parse_request(exporter.request_line(LinearWeights(WEIGHTS.kernel, None), "m"))
    assert no_bias.bias is None


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"kernel": [1.0], "bias": null}', "uri"),
        (b'{"kernel": [], "bias": null, "uri": "m"}', "kernel"),
        (b'{"kernel": [1.0, NaN], "bias": null, "uri": "m"}', "kernel"),
        (b'{"kernel": [true], "bias": null, "uri": "m"}', "kernel"),
        (b'{"kernel": [1.0], "bias": [1.0, 2.0], "uri": "m"}', "bias"),
        (b'{"kernel": [1.0], "bias": ["x"], "uri": "m"}', "bias"),
    ],
)
def test_a_bad_request_is_refused_naming_what(line, reason):
    with pytest.raises(ValueError, match=reason):
        exporter.parse_request(line)


@pytest.fixture
def in_process(monkeypatch):
    """The in-process export, recorded instead of run (no TensorFlow in this process)."""
    calls = []
    monkeypatch.setattr(export, "export", lambda weights, uri: calls.append(uri) or "tensorflow")
    return calls


def fake_child(monkeypatch, script: str):
    monkeypatch.setattr(exporter, "_argv", lambda extra: [sys.executable, "-c", script])


@pytest.mark.parametrize(
    "script, said",
    [
        ("import sys; sys.stdin.readline(); print('no json', flush=True)", "not JSON"),
        ("import sys; sys.exit(0)", "ended"),
        ("import sys, json; sys.stdin.readline(); print(json.dumps({'error': 'boom', 'kind': 'internal'}))", "boom"),
    ],
)
def test_an_exporter_that_fails_leaves_the_export_to_this_process(monkeypatch, in_process, script, said):
    fake_child(monkeypatch, script)
    lines = []
    with exporter.for_run(lines.append):
        how = exporter.export_model(WEIGHTS, "run/model", lines.append)
    assert how["by"] == "in-process" and in_process == ["run/model"]
    [line] = lines
    assert line.startswith("export: ") and said in line and line.endswith("exporting in this process"), line


def test_an_exporter_that_does_not_answer_is_waited_for_a_bounded_time(monkeypatch, in_process):
    fake_child(monkeypatch, "import time; time.sleep(600)")
    lines = []
    with exporter.for_run(lines.append):
        handle = exporter._current
        how = exporter.export_model(WEIGHTS, "run/model", lines.append, timeout=0.5)
    assert how["by"] == "in-process" and "did not answer within" in lines[0]
    assert handle.proc.returncode is not None  # stopped with the run, not left behind


def test_a_destination_error_from_the_exporter_is_the_users_one_line_error(monkeypatch, in_process):
    reply = {"error": "run/model: cannot write the SavedModel (No space left on device)", "kind": "user"}
    fake_child(monkeypatch, f"import sys; sys.stdin.readline(); print({json.dumps(json.dumps(reply))}, flush=True)")
    with exporter.for_run(print), pytest.raises(FedLinearError, match=r"^run/model: cannot write the SavedModel \(No"):
        exporter.export_model(WEIGHTS, "run/model", print)
    assert in_process == []  # not tried again here: the destination is the problem


def test_in_process_means_no_exporter(monkeypatch, in_process):
    monkeypatch.setenv(exporter.ENV, exporter.OFF)
    with exporter.for_run(print):
        assert exporter._current is None
        assert exporter.export_model(WEIGHTS, "run/model", print)["by"] == "in-process"
    assert in_process == ["run/model"]


def test_an_in_process_export_that_cannot_write_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(exporter.ENV, exporter.OFF)

    def full(weights, uri):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "export", full)
    with pytest.raises(FedLinearError, match=r"^m: cannot write the SavedModel \(No space left on device\)$"):
        exporter.export_model(WEIGHTS, "m", print)


def test_a_shared_address_that_does_not_answer_starts_the_runs_own(monkeypatch, tmp_path):
    fake_child(monkeypatch, "import sys; sys.stdin.read()")
    monkeypatch.setenv(exporter.ENV, str(tmp_path / "no-socket"))
    lines = []
    handle = exporter.start(lines.append)
    try:
        assert isinstance(handle, exporter.ChildExporter)
        assert "does not answer" in lines[0] and lines[0].endswith("starting one")
    finally:
        handle.close()
