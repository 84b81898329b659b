"""`fedlinear serve` as a real process, called over HTTP on loopback; `run --publish`; `init-from`.

Every prediction is compared with the SavedModel loaded by plain TensorFlow in a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from fedlinear.common import model as lm
from fedlinear.common import modelrepo
from fedlinear.common.csvio import load_csv
from fedlinear.common.export import export_savedmodel
from tests import bounded
from tests.conftest import REPO, run_cli, write_federation
from tests.s3fixtures import bucket, free_port, moto_s3, s3env  # noqa: F401 - fixtures

STARTUP_S = 240.0  # TF's import on a loaded 2-core machine; a bound, not an expectation

TF_REFERENCE = r"""
import json, sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
sig = m.signatures["serving_default"]
x = np.array(json.load(open(sys.argv[2])), dtype=np.float32)
print(json.dumps(sig(x=tf.constant(x))["y"].numpy().astype(float).tolist()))
"""


def tf_predict(model_dir: str, x: np.ndarray, tmp_path) -> np.ndarray:
    """Predictions of the SavedModel loaded with plain TensorFlow in a fresh process."""
    path = tmp_path / f"x-{os.getpid()}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(x.tolist()))
    out = subprocess.run([sys.executable, "-c", TF_REFERENCE, model_dir, str(path)], capture_output=True, text=True,
                         check=True, timeout=600)  # fmt: skip
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


class Server:
    """A `fedlinear serve` process on a free loopback port."""

    def __init__(self, args: list[str], log_path, verify: str | None = None) -> None:
        self.port = free_port()
        self.url = f"{'https' if verify else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedlinear.scripts.cli", "serve", *args, "--port", str(self.port)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        extra = {"verify": ssl.create_default_context(cafile=verify)} if verify else {}
        self.client = httpx.Client(base_url=self.url, timeout=60, **extra)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fedlinear serve exited {self.proc.returncode}: {self.log()}")
            try:
                if self.client.get("/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"fedlinear serve not ready within {STARTUP_S} s: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        return open(self.log_path).read()

    def alive(self) -> bool:
        return self.proc.poll() is None and self.client.get("/v2/health/live").json() == {"live": True}

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def wait_until(predicate, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real `fedlinear run` (2 clients x 2 rounds, d = 3), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("served")
    data = root / "data"
    write_federation(str(data), clients=2, samples=200, features=3, seed=11)
    out = root / "run"
    done = run_cli("run", "--data", data, "--rounds", "2", "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return str(out)


def probe_inputs(d: int, n: int = 25) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.concatenate([rng.normal(size=(n, d)), np.zeros((1, d))])


def float32_bound(x: np.ndarray, model_dir: str) -> np.ndarray:
    """How far TensorFlow's float32 answer may be from the exact one: a few ulps of |x| @ |w| + |b|."""
    manifest = json.load(open(os.path.join(os.path.dirname(model_dir), "manifest.json")))
    w, b = np.abs(manifest["exported-weights"]["kernel"]), abs(manifest["exported-weights"]["bias"])
    return (8 * (x.shape[1] + 2) * np.finfo(np.float32).eps * (np.abs(x) @ w + b)).reshape(-1, 1)


def test_serve_matches_the_savedmodel_in_both_formats_and_refuses_bad_requests(finished_run, tmp_path):
    server = Server([f"lin={finished_run}", "--max-body-bytes", "1000000"], tmp_path / "serve.log")
    try:
        c = server.client
        test = load_csv(os.path.join(os.path.dirname(finished_run), "data", "test.csv"), -1, "auto")
        x = np.concatenate([test.x[:100], probe_inputs(3)])  # rows like the data the model was trained for
        want = tf_predict(os.path.join(finished_run, "model"), x, tmp_path)

        status = c.get("/v1/models/lin")
        assert status.status_code == 200
        assert status.json() == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}  # fmt: skip
        assert c.get("/v1/models/lin/versions/1").json() == status.json()

        meta = c.get("/v1/models/lin/metadata").json()
        assert meta["model_spec"] == {"name": "lin", "signature_name": "", "version": "1"}
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert sig["method_name"] == "tensorflow/serving/predict"
        assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
        assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "3"]
        assert [d["size"] for d in sig["outputs"]["y"]["tensor_shape"]["dim"]] == ["-1", "1"]

        rows = c.post("/v1/models/lin:predict", json={"instances": x.tolist()})
        assert rows.status_code == 200, rows.text
        np.testing.assert_allclose(np.array(rows.json()["predictions"]), want, rtol=1e-6, atol=1e-6)
        # far from the origin, predictions cancel large terms: TF's float32 sum is itself only good to
        # float32 rounding of the terms; the server's (exact on the float32 inputs) is within that of it
        big = np.random.default_rng(4).normal(size=(20, 3)) * np.array([[10.0], [1e3]]).repeat(10, 0)
        got = np.array(c.post("/v1/models/lin:predict", json={"instances": big.tolist()}).json()["predictions"])
        model_dir = os.path.join(finished_run, "model")
        assert np.all(np.abs(got - tf_predict(model_dir, big, tmp_path)) <= float32_bound(big, model_dir))
        named = c.post("/v1/models/lin/versions/1:predict", json={"instances": [{"x": r} for r in x.tolist()]})
        np.testing.assert_allclose(np.array(named.json()["predictions"]), want, rtol=1e-6, atol=1e-6)
        cols = c.post("/v1/models/lin:predict", json={"signature_name": "serving_default", "inputs": {"x": x.tolist()}})
        assert cols.status_code == 200, cols.text
        np.testing.assert_allclose(np.array(cols.json()["outputs"]), want, rtol=1e-6, atol=1e-6)
        cols2 = c.post("/v1/models/lin:predict", json={"inputs": x.tolist()})
        np.testing.assert_allclose(np.array(cols2.json()["outputs"]), want, rtol=1e-6, atol=1e-6)
        reg = c.post("/v1/models/lin:regress", json={"examples": [{"x": r} for r in x.tolist()]})
        assert reg.status_code == 200, reg.text
        np.testing.assert_allclose(np.array(reg.json()["result"]), want.ravel(), rtol=1e-6, atol=1e-6)

        # KServe V2 / Open Inference Protocol
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        v2meta = c.get("/v2/models/lin").json()
        assert v2meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert c.get("/v2/models/lin/versions/1/ready").json() == {"name": "lin", "ready": True}
        body = {"id": "r1", "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        inf = c.post("/v2/models/lin/infer", json=body)
        assert inf.status_code == 200, inf.text
        out = inf.json()
        assert (out["model_name"], out["model_version"], out["id"]) == ("lin", "1", "r1")
        assert out["outputs"][0]["shape"] == [len(x), 1]
        np.testing.assert_allclose(np.array(out["outputs"][0]["data"]), want.ravel(), rtol=1e-6, atol=1e-6)

        bad = [
            ("/v1/models/lin:predict", b'{"instances": [[1, 2]]}', 400, "expected 3 features"),
            ("/v1/models/lin:predict", b'{"instances": [[1, "2", 3]]}', 400, "expected a number"),
            ("/v1/models/lin:predict", b'{"instances": [[1, true, 3]]}', 400, "expected a number"),
            ("/v1/models/lin:predict", b'{"instances": [[NaN, 2, 3]]}', 400, "NaN"),
            ("/v1/models/lin:predict", b'{"instances": [[Infinity, 2, 3]]}', 400, "Infinity"),
            ("/v1/models/lin:predict", b'{"instances": [[1e39, 2, 3]]}', 400, "float32 range"),
            ("/v1/models/lin:predict", b'{"instances": [[1, 2, 3]', 400, "JSON Parse error"),
            ("/v1/models/lin:predict", b"[" * 100000, 400, "JSON Parse error"),
            ("/v1/models/lin:predict", b'{"instances": [[1,2,3]], "inputs": [[1,2,3]]}', 400, "Not both"),
            ("/v1/models/lin:predict", b'{"foo": 1}', 400, "Missing 'inputs' or 'instances'"),
            ("/v1/models/lin:predict", b'{"signature_name": "nope", "instances": [[1,2,3]]}', 400, "nope"),
            ("/v1/models/nope:predict", b'{"instances": [[1,2,3]]}', 404, "nope"),
            ("/v1/models/lin/versions/9:predict", b'{"instances": [[1,2,3]]}', 404, "Specific(lin, 9)"),
            ("/v1/models/lin/labels/canary:predict", b'{"instances": [[1,2,3]]}', 404, "canary"),
            ("/v2/models/lin/infer", b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}',
             400, "holds 3 values"),
            ("/v2/models/lin/infer", b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BYTES", "data": ["a"]}]}',
             400, "not numeric"),
            ("/v2/models/nope/infer", b'{"inputs": []}', 404, "nope"),
            ("/v1/models/lin:predict", b'{"instances": [' + b"[1,2,3]," * 200000 + b"[1,2,3]]}", 413, "limit"),
        ]  # fmt: skip
        for path, payload, code, text in bad:
            got = c.post(path, content=payload, headers={"content-type": "application/json"})
            assert got.status_code == code, (path, payload[:60], got.text)
            assert text in got.json()["error"], (path, got.json())
        assert c.get("/v1/models/nope").status_code == 404
        assert c.get("/no/such/path").json()["error"]
        assert server.alive()
        again = c.post("/v1/models/lin:predict", json={"instances": x.tolist()})
        np.testing.assert_allclose(np.array(again.json()["predictions"]), want, rtol=1e-6, atol=1e-6)
        metrics = c.get("/metrics").text
        assert 'fedlinear_serve_requests_total{model="lin",endpoint="v1-predict",code="400"}' in metrics
        assert 'fedlinear_serve_request_duration_seconds_count{model="lin",endpoint="v1-predict"}' in metrics
        assert 'fedlinear_serve_model_version{model="lin"} 1' in metrics
    finally:
        server.stop()


def _weights(seed: int, d: int = 4) -> lm.LinearWeights:
    rng = np.random.default_rng(seed)
    return lm.LinearWeights(kernel=rng.normal(size=(d, 1)).astype(np.float32), bias=np.array([seed], np.float32))


def _exact(x, version: int) -> float:
    """The prediction of _weights(version) for one row, in float64."""
    return (np.asarray(x, np.float64) @ _weights(version).kernel.astype(np.float64)).item() + version


def test_a_new_version_is_swapped_in_without_a_failed_request_and_a_broken_one_is_not_served(tmp_path):
    base, staging = str(tmp_path / "base"), str(tmp_path / "staging")
    for v in (1, 2):
        export_savedmodel(_weights(v), os.path.join(staging, str(v)))
    assert modelrepo.publish(os.path.join(staging, "1"), base, {})[0] == 1
    x = probe_inputs(4, n=50)
    answers = {v: tf_predict(os.path.join(staging, str(v)), x, tmp_path) for v in (1, 2)}
    server = Server([f"m={base}", "--poll-seconds", "0.2"], tmp_path / "serve.log")
    seen, failures, stop = [], [], threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/models/m:predict", json={"instances": x.tolist()})
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                    continue
                got = np.array(r.json()["predictions"])
                which = [v for v, want in answers.items() if np.allclose(got, want, rtol=1e-6, atol=1e-6)]
                seen.append(which[0] if len(which) == 1 else ("mixed", got))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(seen) >= 5, "answers from version 1")
        v2, _ = modelrepo.publish(os.path.join(staging, "2"), base, {"note": "v2"})
        assert v2 == 2
        wait_until(lambda: seen and seen[-1] == 2, "answers from version 2")
        count = len(seen)
        wait_until(lambda: len(seen) >= count + 5, "more answers after the swap")
        # a broken version 3: a SavedModel whose saved_model.pb is garbage
        broken = tmp_path / "broken"
        shutil.copytree(os.path.join(staging, "2"), broken)
        (broken / "saved_model.pb").write_bytes(b"not a protobuf")
        os.rename(broken, os.path.join(base, "3"))

        def reported():
            status = server.client.get("/v1/models/m").json()["model_version_status"]
            return [s for s in status if s["version"] == "3" and s["state"] == "END"] and status

        status = wait_until(reported, "version 3 reported as failed")
        assert status[0]["status"]["error_code"] != "OK" and status[0]["status"]["error_message"]
        assert {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} in status
        count = len(seen)
        wait_until(lambda: len(seen) >= count + 5, "answers after version 3 appeared")
    finally:
        stop.set()
        thread.join(timeout=120)
    try:
        assert not failures, failures[:3]
        assert all(s in (1, 2) for s in seen), [s for s in seen if s not in (1, 2)][:2]
        first2 = seen.index(2)
        assert set(seen[:first2]) == {1} and set(seen[first2:]) == {2}, "answers went back to version 1"
        assert server.client.get("/v1/models/m/versions/3").json()["model_version_status"][0]["state"] == "END"
        assert server.client.post("/v1/models/m/versions/3:predict", json={"instances": x.tolist()}).status_code == 404
        assert "m version 3 failed to load" in server.log()
        assert server.alive()
    finally:
        server.stop()


def test_policies_and_labels(tmp_path):
    base, staging = str(tmp_path / "base"), str(tmp_path / "staging")
    for v in (1, 2, 3):
        export_savedmodel(_weights(v), os.path.join(staging, str(v)))
        modelrepo.publish(os.path.join(staging, str(v)), base, {})
    x = [[1.0, 2.0, 3.0, 4.0]]
    server = Server([f"m={base}", "--version-policy", "specific:1,2", "--label", "stable=1", "--label", "canary=2"],
                    tmp_path / "serve.log")  # fmt: skip
    try:
        c = server.client
        assert [s["version"] for s in c.get("/v1/models/m").json()["model_version_status"]] == ["2", "1"]
        want = {v: _exact(x, v) for v in (1, 2)}
        for path, v in (("/v1/models/m", 2), ("/v1/models/m/labels/stable", 1), ("/v1/models/m/labels/canary", 2),
                        ("/v1/models/m/versions/1", 1)):  # fmt: skip
            got = c.post(path + ":predict", json={"instances": x}).json()["predictions"][0][0]
            assert got == pytest.approx(want[v], rel=1e-6), path
        assert c.post("/v1/models/m/versions/3:predict", json={"instances": x}).status_code == 404
        assert c.get("/v2/models/m").json()["versions"] == ["1", "2"]
    finally:
        server.stop()


def test_refuses_a_public_address_without_tls(finished_run):
    done = run_cli("serve", finished_run, "--host", "0.0.0.0", "--port", str(free_port()), timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "fedlinear: error: --host 0.0.0.0 exposes the server beyond this machine: give --tls-cert and --tls-key "
        "(e.g. from `fedlinear deploy pki`), or --insecure-http to serve plain HTTP there knowingly"
    ]


def test_tls(tmp_path):
    from fedlinear.scripts.deploy import pki

    pki.make_credentials(str(tmp_path / "pki"), ["127.0.0.1"], [])
    model = str(tmp_path / "model")
    export_savedmodel(_weights(1), model)
    cert, key = (str(tmp_path / "pki" / name) for name in (pki.SERVER_CERT, pki.SERVER_KEY))
    server = Server([f"m={model}", "--tls-cert", cert, "--tls-key", key], tmp_path / "serve.log",
                    verify=str(tmp_path / "pki" / pki.CA_CERT))  # fmt: skip
    try:
        x = [[1.0, 2.0, 3.0, 4.0]]
        got = server.client.post("/v1/models/m:predict", json={"instances": x}).json()["predictions"][0][0]
        assert got == pytest.approx(_exact(x, 1), rel=1e-6)
        with pytest.raises(httpx.TransportError):  # plain HTTP is not spoken there
            httpx.get(f"http://127.0.0.1:{server.port}/v2/health/live", timeout=10)
    finally:
        server.stop()


def test_s3_base_path_only_serves_versions_with_the_marker(s3env, bucket, tmp_path):  # noqa: F811
    base = f"s3://{bucket}/models/lin"
    staging = str(tmp_path / "staging")
    for v in (1, 2):
        export_savedmodel(_weights(v), os.path.join(staging, str(v)))
    assert modelrepo.publish(os.path.join(staging, "1"), base, {}) == (1, f"{base}/1")
    # version 2 half uploaded: every file, but not the marker written last
    admin = s3env.admin()
    for root, _dirs, names in os.walk(os.path.join(staging, "2")):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), os.path.join(staging, "2"))
            admin.upload_file(os.path.join(root, name), bucket, f"models/lin/2/{rel}")
    assert modelrepo.list_versions(base) == [1]
    x = [[1.0, -1.0, 0.5, 2.0]]
    server = Server([f"lin={base}", "--poll-seconds", "0.2"], tmp_path / "serve.log")
    try:
        c = server.client
        assert [s["version"] for s in c.get("/v1/models/lin").json()["model_version_status"]] == ["1"]
        got = c.post("/v1/models/lin:predict", json={"instances": x}).json()["predictions"][0][0]
        assert got == pytest.approx(_exact(x, 1), rel=1e-6)
        assert modelrepo.publish(os.path.join(staging, "2"), base, {})[0] == 3  # never reuses the half-written 2
        wait_until(lambda: c.get("/v1/models/lin").json()["model_version_status"][0]["version"] == "3", "version 3")
        got = c.post("/v1/models/lin:predict", json={"instances": x}).json()["predictions"][0][0]
        assert got == pytest.approx(_exact(x, 2), rel=1e-6)
    finally:
        server.stop()


def test_continuation_starts_from_the_parent_and_converges_on_new_data(finished_run, tmp_path):
    base = str(tmp_path / "published")
    parent_manifest = json.load(open(os.path.join(finished_run, "manifest.json")))
    version, _ = modelrepo.publish_run(finished_run, base)
    assert version == 1
    data = tmp_path / "new-data"
    write_federation(str(data), clients=2, samples=300, features=3, seed=23)  # other true weights
    out = tmp_path / "continued"
    wide = tmp_path / "wide"
    write_federation(str(wide), clients=2, samples=50, features=4, seed=5)
    # the continuation and a run whose shards do not fit the parent are independent processes: side by
    # side (whichever version of `base` the refused run reads, 1 or the continuation's 2, has 3 features)
    runs = bounded.concurrently({
        "continued": lambda: run_cli("run", "--data", data, "--rounds", "6", "--out", out, "--set", f"init-from={base}",
                                     "--publish", base),
        "wide": lambda: run_cli("run", "--data", wide, "--rounds", "1", "--out", tmp_path / "wide-run",
                                "--set", f"init-from={base}"),
    })  # fmt: skip
    done = runs["continued"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"published: {base}/2 (version 2" in done.stdout
    history = json.load(open(out / "history.json"))
    manifest = json.load(open(out / "manifest.json"))
    parent = manifest["lineage"]["parent"]
    assert parent["version"] == 1 and parent["run-dir"] == finished_run and parent["run-id"] == parent_manifest["run-id"]
    assert parent["model-sha256"] == modelrepo.tree_hash(modelrepo.model_digest(os.path.join(base, "1")))
    # round 0 is the parent's model: its weights, and its test MSE on the new test set
    np.testing.assert_allclose(history["initial-weights"]["kernel"], parent_manifest["weights"]["kernel"], rtol=1e-12)
    test = load_csv(str(data / "test.csv"), -1, "auto")
    old = np.asarray(parent_manifest["weights"]["kernel"]) @ test.x.T + parent_manifest["weights"]["bias"]
    assert history["rounds"][0]["test-mse"] == pytest.approx(float(np.mean((old - test.y) ** 2)), rel=1e-4)
    # and the run converges to the new pooled optimum
    assert history["rounds"][-1]["test-mse-ratio"] < 1.05
    assert history["rounds"][0]["test-mse-ratio"] > 2  # the parent was fit to other weights
    info = json.load(open(os.path.join(base, "2", modelrepo.VERSION_INFO)))
    assert info["lineage"]["parent"]["version"] == 1
    # a feature-count mismatch is one line
    done = runs["wide"]
    assert done.returncode == 1
    assert "config key 'init-from'" in done.stderr and "a model of 3 features, but this run's shards have 4" in done.stderr
