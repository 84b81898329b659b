"""The exporter process, for real: its SavedModel is the in-process export's (loaded with plain TensorFlow in a
fresh process), it dies with its parent, a shared one serves many runs, and a sweep imports TensorFlow once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from fedlinear.common import exporter
from tests import bounded
from tests.conftest import REPO, run_cli, write_federation

WRITE = r"""
import json, sys
import numpy as np
from fedlinear.common import exporter
from fedlinear.common.model import LinearWeights
how = []
with exporter.for_run(print):
    for path, kernel, bias in json.loads(sys.argv[1]):
        w = LinearWeights(np.array(kernel, np.float32).reshape(-1, 1), None if bias is None else np.array(bias, np.float32))
        how.append(exporter.export_model(w, path, print))
print(json.dumps({"how": how, "tensorflow": "tensorflow" in sys.modules}))
"""

# plain TensorFlow, no fedlinear: what a model's user sees
LOAD = r"""
import json, sys
import numpy as np
import tensorflow as tf
x = np.array(json.loads(sys.argv[1]), np.float32)
out = []
for path in sys.argv[2:]:
    m = tf.saved_model.load(path)
    sig = m.signatures["serving_default"]
    out.append({
        "signatures": sorted(m.signatures.keys()),
        "inputs": {k: [v.shape.as_list(), v.dtype.name] for k, v in sig.structured_input_signature[1].items()},
        "outputs": {k: [v.shape.as_list(), v.dtype.name] for k, v in sig.structured_outputs.items()},
        "variables": sorted((n, getattr(m, n).numpy().tolist()) for n in ("kernel", "bias") if hasattr(m, n)),
        "y": sig(x=tf.constant(x))["y"].numpy().tolist(),
    })
print(json.dumps(out))
"""


def python(script: str, *args: str, env: dict | None = None) -> str:
    done = bounded.run([sys.executable, "-c", script, *args], 900, cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_exporters_savedmodel_is_the_in_process_one(tmp_path):
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=5).astype(np.float32).tolist()
    cases = {"bias": [0.625], "no-bias": None}  # fit-intercept = true / false
    jobs = {mode: [[str(tmp_path / mode / case), kernel, bias] for case, bias in cases.items()]
            for mode in ("exporter", "in-process")}  # fmt: skip
    cache = "FEDLINEAR_SAVEDMODEL_CACHE"  # the exporter makes this run's templates; in-process: TensorFlow's export
    by_exporter = json.loads(python(WRITE, json.dumps(jobs["exporter"]), env={cache: str(tmp_path / "cache")}))
    today = json.loads(python(WRITE, json.dumps(jobs["in-process"]), env={exporter.ENV: exporter.OFF, cache: "off"}))
    assert [(h["by"], h["writer"]) for h in by_exporter["how"]] == [("exporter process", "template")] * 2
    assert not by_exporter["tensorflow"]  # the ServerApp's process never imported it
    assert [(h["by"], h["writer"]) for h in today["how"]] == [("in-process", "tensorflow")] * 2 and today["tensorflow"]
    x = rng.normal(size=(6, 5))
    loaded = json.loads(python(LOAD, json.dumps(x.tolist()), *[job[0] for m in jobs.values() for job in m]))
    ours, theirs = loaded[:2], loaded[2:]
    assert ours == theirs  # same signatures, inputs, outputs, variables and predictions, bit for bit
    with_bias, without = ours
    assert with_bias["signatures"] == ["serving_default"] and with_bias["inputs"] == {"x": [[None, 5], "float32"]}
    assert [name for name, _ in with_bias["variables"]] == ["bias", "kernel"]
    assert [name for name, _ in without["variables"]] == ["kernel"]
    w = np.array(kernel, np.float32).reshape(-1, 1)
    np.testing.assert_allclose(with_bias["y"], x.astype(np.float32) @ w + np.float32(0.625), atol=1e-5)
    np.testing.assert_allclose(without["y"], x.astype(np.float32) @ w, atol=1e-5)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


PARENT = r"""
import time
from fedlinear.common import exporter
handle = exporter.start(print)
print(handle.pid, flush=True)
time.sleep(600)
"""


def test_the_exporter_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)  # a crashed ServerApp: nothing of its own clean-up runs
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), f"exporter {child} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_shared_exporter_serves_every_run_and_names_a_bad_destination(tmp_path, monkeypatch):
    monkeypatch.delenv(exporter.ENV, raising=False)
    log = tmp_path / "exporter.log"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    jobs = json.dumps([[str(tmp_path / f"m{i}"), [1.0, float(i)], [0.5]] for i in range(2)])
    with exporter.shared(str(log)) as path:
        assert path and os.environ[exporter.ENV] == path
        first, second = (json.loads(python(WRITE, jobs))["how"] for _ in range(2))  # two "runs"
        bad = bounded.run([sys.executable, "-c", WRITE, json.dumps([[str(blocker / "sub" / "m"), [1.0], None]])], 300,
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert exporter.ENV not in os.environ and not os.path.exists(path)
    pids = {h["pid"] for h in first + second}
    assert {h["by"] for h in first + second} == {"shared exporter"} and len(pids) == 1
    assert log.read_text().count(exporter.STARTED) == 1
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].endswith(
        f"FedLinearError: {blocker}/sub/m: cannot write the SavedModel (Not a directory)"
    ), bad.stderr
    assert all((tmp_path / f"m{i}" / "saved_model.pb").exists() for i in range(2))
    assert _gone(pids.pop())


def test_a_sweep_imports_tensorflow_once(tmp_path):
    data, out = tmp_path / "data", tmp_path / "sweep"
    write_federation(str(data), clients=2, samples=120, features=3)
    done = run_cli("sweep", "--mode", "inline", "--data", data, "--noise", "0,1", "--seeds", "1", "--rounds", "2",
                   "--out", out, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    exports = [json.loads((out / "runs" / run / "manifest.json").read_text())["export"] for run in ("z0-s1", "z1-s1")]
    assert [e["by"] for e in exports] == ["shared exporter"] * 2 and exports[0]["pid"] == exports[1]["pid"]
    assert (out / "logs" / "exporter.log").read_text().count(exporter.STARTED) == 1
    assert _gone(exports[0]["pid"])  # stopped with the sweep
