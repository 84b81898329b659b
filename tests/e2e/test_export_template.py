"""The SavedModel template for real: a template made in a fresh process writes, for new weights, byte for byte the
directory TensorFlow writes for them in a fresh process (all but fingerprint.pb's random uuid), plain TensorFlow
loads it and predicts as from TensorFlow's; the exporter makes a missing template once, while a run's rounds would
run, and never imports TensorFlow itself; S3 destinations work."""

from __future__ import annotations

import json
import os
import sys

import boto3
import numpy as np

from fedlinear.common import export, export_template
from fedlinear.common.export_template import FILES
from fedlinear.common.model import LinearWeights
from tests import bounded
from tests.conftest import REPO
from tests.s3fixtures import bucket, moto_s3, s3env  # noqa: F401 - fixtures

# TensorFlow's export in a fresh process (today's path), without any template
REFERENCE = r"""
import json, sys
import numpy as np
from fedlinear.common.export import export_savedmodel
from fedlinear.common.model import LinearWeights
kernel, bias = json.loads(sys.argv[2])
export_savedmodel(LinearWeights(np.array(kernel, np.float32).reshape(-1, 1),
                                None if bias is None else np.array(bias, np.float32)), sys.argv[1])
"""

LOAD = r"""
import json, sys
import numpy as np
import tensorflow as tf
x = np.array(json.loads(sys.argv[1]), np.float32)
out = []
for path in sys.argv[2:]:
    m = tf.saved_model.load(path)
    sig = m.signatures["serving_default"]
    out.append({"variables": sorted((n, getattr(m, n).numpy().tolist()) for n in ("kernel", "bias") if hasattr(m, n)),
                "y": sig(x=tf.constant(x))["y"].numpy().tolist()})
print(json.dumps(out))
"""

RUN = r"""
import json, sys
import numpy as np
from fedlinear.common import exporter
from fedlinear.common.model import LinearWeights
kernel, bias, uri = json.loads(sys.argv[1])
w = LinearWeights(np.array(kernel, np.float32).reshape(-1, 1), None if bias is None else np.array(bias, np.float32))
with exporter.for_run(print):
    exporter.prepare(len(kernel), bias is not None)  # what the ServerApp does once it knows the shape
    reply = exporter._current.export(w, uri, 600)
print(json.dumps({"reply": reply, "tensorflow": "tensorflow" in sys.modules}))
"""


def python(script: str, *args: str, cache: str) -> str:
    env = {**os.environ, export_template.CACHE_ENV: cache}
    done = bounded.run([sys.executable, "-c", script, *args], 900, cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def read(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in FILES}


def without_uuid(fingerprint: bytes) -> tuple[bytes, bytes]:
    fields = export_template._fields(fingerprint)
    [uuid] = [fingerprint[v:e] for n, _, _, v, e in fields if n == 7]
    return b"".join(fingerprint[s:e] for n, _, s, _, e in fields if n != 7), uuid


def test_a_template_writes_tensorflows_directory_byte_for_byte(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv(export_template.CACHE_ENV, cache)
    tiny, huge = float(np.finfo(np.float32).smallest_subnormal), float(np.finfo(np.float32).max)
    cases = {"bias": ([-0.0, tiny, -huge, 1e-38, 3.25], [huge]),
             "no-bias": ((np.random.default_rng(5).normal(size=64) * 1e6).astype(np.float32).tolist(), None)}
    for name, (kernel, bias) in cases.items():
        assert not export.template_available(len(kernel), bias is not None)
        made = python("from fedlinear.common.export import main; main()", "template", str(len(kernel)),
                      *([] if bias is not None else ["--no-bias"]), cache=cache)  # fmt: skip
        assert made == export_template.template_dir(len(kernel), bias is not None, export.definition())
        python(REFERENCE, str(tmp_path / "tf" / name), json.dumps([kernel, bias]), cache=str(tmp_path / "unused"))
        weights = LinearWeights(np.array(kernel, np.float32).reshape(-1, 1),
                                None if bias is None else np.array(bias, np.float32))  # fmt: skip
        assert export.export(weights, str(tmp_path / "template" / name)) == "template"
        ours, theirs = read(tmp_path / "template" / name), read(tmp_path / "tf" / name)
        for file in FILES:
            if file != "fingerprint.pb":
                assert ours[file] == theirs[file], f"{name}: {file}"
        (rest, uuid), (their_rest, their_uuid) = without_uuid(ours["fingerprint.pb"]), without_uuid(theirs["fingerprint.pb"])
        assert rest == their_rest and uuid != their_uuid and uuid.isdigit() and int(uuid) < 2**128
        assert sorted(os.listdir(tmp_path / "template" / name)) == sorted(os.listdir(tmp_path / "tf" / name))
    assert not os.path.exists(tmp_path / "unused")  # the reference exports left no template of their own
    x = np.random.default_rng(6).normal(size=(4, 5))
    loaded = json.loads(python(LOAD, json.dumps(x.tolist()), str(tmp_path / "template" / "bias"),
                               str(tmp_path / "tf" / "bias"), cache=cache))  # fmt: skip
    assert loaded[0] == loaded[1]  # the same variables and predictions, bit for bit
    assert loaded[0]["variables"][1][1] == [[v] for v in np.array(cases["bias"][0], np.float32).tolist()]


def test_the_exporter_makes_a_missing_template_once_and_never_imports_tensorflow(tmp_path):
    cache = str(tmp_path / "cache")
    kernel = [0.5, -2.0, 1e-3]
    first = json.loads(python(RUN, json.dumps([kernel, [0.25], str(tmp_path / "m1")]), cache=cache))
    assert first["reply"]["writer"] == "template" and not first["reply"]["tensorflow"] and not first["tensorflow"]
    [made] = os.listdir(cache)
    stamp = os.stat(os.path.join(cache, made)).st_mtime_ns
    second = json.loads(python(RUN, json.dumps([kernel, [0.25], str(tmp_path / "m2")]), cache=cache))
    assert second["reply"]["writer"] == "template" and not second["reply"]["tensorflow"]
    assert os.listdir(cache) == [made] and os.stat(os.path.join(cache, made)).st_mtime_ns == stamp  # not made again
    one, two = read(tmp_path / "m1"), read(tmp_path / "m2")
    assert all(one[f] == two[f] for f in FILES if f != "fingerprint.pb")
    off = json.loads(python(RUN, json.dumps([kernel, [0.25], str(tmp_path / "m3")]), cache="off"))
    assert off["reply"]["writer"] == "tensorflow" and off["reply"]["tensorflow"]  # no cache: today's export
    assert export.read_linear(str(tmp_path / "m3")).kernel.tolist() == export.read_linear(str(tmp_path / "m1")).kernel.tolist()


def test_a_template_export_to_s3(tmp_path, monkeypatch, s3env, bucket):  # noqa: F811 - fixtures
    cache = str(tmp_path / "cache")
    monkeypatch.setenv(export_template.CACHE_ENV, cache)
    python("from fedlinear.common.export import main; main()", "template", "2", cache=cache)
    weights = LinearWeights(np.array([[1.5], [-0.5]], np.float32), np.array([2.0], np.float32))
    assert export.export(weights, f"s3://{bucket}/run/model") == "template"
    s3 = boto3.client("s3")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted(f"run/model/{f}" for f in FILES)
    data = s3.get_object(Bucket=bucket, Key=f"run/model/{export_template.DATA}")["Body"].read()
    assert np.frombuffer(data[:12], "<f4").tolist() == [1.5, -0.5, 2.0]
    local = tmp_path / "local"
    export_template.write_local(weights, str(local), export.definition())
    assert read(local)[export_template.INDEX] == s3.get_object(Bucket=bucket, Key=f"run/model/{export_template.INDEX}")["Body"].read()
