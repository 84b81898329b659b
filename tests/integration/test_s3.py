"""The S3 backend against a real S3-compatible server (moto_server over HTTP on 127.0.0.1).

No in-process mocking: boto3 talks HTTP to a ``moto_server`` process started by the fixtures in
:mod:`tests.s3fixtures`, found through the standard ``AWS_ENDPOINT_URL_S3`` variable.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from fedlinear.common import csvio, s3, storage
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.common.model import LinearWeights
from tests import bounded
from tests.s3fixtures import bucket, free_port, moto_s3, s3env  # noqa: F401 - pytest fixtures

from tests.conftest import REPO  # noqa: E402


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def put(server, bucket_name: str, key: str, body: bytes) -> str:
    server.admin().put_object(Bucket=bucket_name, Key=key, Body=body)
    return f"s3://{bucket_name}/{key}"


def keys_under(server, bucket_name: str, prefix: str) -> list[str]:
    response = server.admin().list_objects_v2(Bucket=bucket_name, Prefix=prefix)
    return sorted(obj["Key"] for obj in response.get("Contents", []))


def check_user_error(excinfo, *fragments: str) -> str:
    """A FedLinearError on one line, containing every fragment, with no boto/botocore exception behind it."""
    exc = excinfo.value
    message = str(exc)
    assert isinstance(exc, FedLinearError)
    assert "\n" not in message and one_line(exc) == message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    seen = exc
    while seen is not None:  # the chain Python would print
        assert not type(seen).__module__.startswith(("botocore", "boto3", "urllib3")), repr(seen)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return message


# --------------------------------------------------------------------------------------------
# object operations
# --------------------------------------------------------------------------------------------


def test_boto3_is_not_imported_by_storage_or_data():
    code = "import sys, fedlinear.common.storage, fedlinear.common.csvio, fedlinear.common.synth, fedlinear.common.partition; sys.exit('boto3' in sys.modules)"
    assert bounded.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_write_read_exists_fingerprint(s3env, bucket):
    uri = storage.join(f"s3://{bucket}/", "run", "history.json")
    assert uri == f"s3://{bucket}/run/history.json"
    assert not storage.exists(uri)
    payload = b'{"rounds": []}\n' * 1000
    storage.write_bytes(uri, payload)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == payload
    storage.write_text(uri, "héllo\n")  # overwrite
    assert storage.read_text(uri) == "héllo\n"
    fp = storage.fingerprint(uri)
    assert fp == {"uri": uri, "etag": hashlib.md5("héllo\n".encode()).hexdigest(), "size": 7}
    with storage.open_binary(uri) as stream:
        assert stream.readline() == "héllo\n".encode()
        assert stream.read() == b""
    assert not storage.exists(f"s3://{bucket}/run/nothing")
    assert not storage.exists(f"s3://no-such-bucket-{bucket}/x")


def test_list_uris_direct_children_paginated(s3env, bucket, monkeypatch):
    for key in ["data/b.txt", "data/a.txt", "data/c.txt", "data/", "data/sub/d.txt", "data/.hidden",
                "data-other.txt", "other/x.txt"]:
        put(s3env, bucket, key, b"1,2\n")
    monkeypatch.setattr(s3, "_PAGE_SIZE", 2)  # force several list_objects_v2 pages
    expected = [f"s3://{bucket}/data/{n}" for n in ("a.txt", "b.txt", "c.txt")]
    assert storage.list_uris(f"s3://{bucket}/data/") == expected
    assert storage.expand(f"s3://{bucket}/data/") == expected
    assert storage.expand(f"s3://{bucket}/data/a.txt") == [f"s3://{bucket}/data/a.txt"]
    with pytest.raises(FedLinearError) as excinfo:
        storage.expand(f"s3://{bucket}/empty/")
    check_user_error(excinfo, f"s3://{bucket}/empty/", "no files under this prefix")


# --------------------------------------------------------------------------------------------
# CSV shards: same arrays and same messages as the local loader
# --------------------------------------------------------------------------------------------

SEED_ROWS = [(0.5, 1.7), (-1.25, -0.3), (3.0, 7.125), (1e-3, 2.0)]
SEED_LF = "".join(f"{x},{y}\n" for x, y in SEED_ROWS).encode()
BIG = "".join(f"{i * 0.001},{i * 0.002 + 1}\r\n" for i in range(30000)).encode()  # > read buffer


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(SEED_LF, id="seed-lf"),
        pytest.param(SEED_LF.rstrip(b"\n"), id="seed-no-trailing-newline"),
        pytest.param(SEED_LF.replace(b"\n", b"\r\n"), id="seed-crlf"),
        pytest.param(SEED_LF.replace(b"\n", b"\r\n").rstrip(b"\r\n"), id="seed-crlf-no-trailing-newline"),
        pytest.param(b"x,y\n" + SEED_LF + b"\n\n", id="header-and-blank-lines"),
        pytest.param(BIG, id="large-crlf"),
    ],
)
def test_load_csv_matches_local(s3env, bucket, tmp_path, content):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    local = csvio.load_csv(str(path))
    uri = put(s3env, bucket, "client-0/data.txt", content)
    remote = csvio.load_csv(uri)
    np.testing.assert_array_equal(remote.x, local.x)
    np.testing.assert_array_equal(remote.y, local.y)
    assert remote.sources == (uri,)
    assert remote.columns == local.columns
    if content.startswith(b"0.5"):
        np.testing.assert_array_equal(remote.x.ravel(), [x for x, _ in SEED_ROWS])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(b"1,2\r\n3,4\r\n5,x\r\n", "line 3: column 2: 'x' is not a number", id="crlf-bad-number"),
        pytest.param(b"1,2\n3,4\n5", "line 3: expected 2 comma-separated columns, found 1", id="last-line-no-newline"),
        pytest.param(b"1,2\n\n\n3,4,5\n", "line 4: expected 2", id="blank-lines-counted"),
        pytest.param(b"x,y\r\n1,2\r\n3,inf\r\n", "line 3: column 2: value 'inf' is not finite", id="header-crlf"),
        pytest.param(BIG + b"1,2,3\r\n", "line 30001: expected 2", id="large-crlf-error-at-end"),
        pytest.param(b"x,y\n", "no data rows", id="header-only"),
        pytest.param(b"", "empty file", id="empty-object"),
        pytest.param(b"\n\r\n  \n", "empty file", id="blank-object"),
    ],
)
def test_malformed_and_empty_objects_match_local(s3env, bucket, tmp_path, content, fragment):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(FedLinearError) as local:
        csvio.load_csv(str(path))
    uri = put(s3env, bucket, "client-1/data.txt", content)
    with pytest.raises(FedLinearError) as remote:
        csvio.load_csv(uri)
    message = check_user_error(remote, uri, fragment)
    assert message == str(local.value).replace(str(path), uri)


def test_load_csv_from_prefix_matches_local_directory(s3env, bucket, tmp_path):
    parts = {"part-0.txt": SEED_LF, "part-1.txt": b"9,8\r\n7,6", "part-2.txt": b"x,y\n5,4\n"}
    for name, body in parts.items():
        (tmp_path / name).write_bytes(body)
        put(s3env, bucket, f"client-2/{name}", body)
    put(s3env, bucket, "client-2/", b"")  # a "directory marker" as consoles create
    local = csvio.load_csv(str(tmp_path) + "/")
    remote = csvio.load_csv(f"s3://{bucket}/client-2/")
    np.testing.assert_array_equal(remote.x, local.x)
    np.testing.assert_array_equal(remote.y, local.y)
    assert remote.sources == tuple(f"s3://{bucket}/client-2/{n}" for n in sorted(parts))


# --------------------------------------------------------------------------------------------
# errors a user meets: one line naming bucket and key
# --------------------------------------------------------------------------------------------


def test_no_such_bucket(s3env, bucket):
    missing = f"no-such-{bucket}"
    for call in (
        lambda: csvio.load_csv(f"s3://{missing}/shards/data.txt"),
        lambda: storage.fingerprint(f"s3://{missing}/shards/data.txt"),
        lambda: storage.write_text(f"s3://{missing}/shards/data.txt", "1,2\n"),
    ):
        with pytest.raises(FedLinearError) as excinfo:
            call()
        check_user_error(excinfo, f"s3://{missing}/shards/data.txt", f"no such bucket '{missing}'", "shards/data.txt")
    with pytest.raises(FedLinearError) as excinfo:
        storage.list_uris(f"s3://{missing}/shards/")
    check_user_error(excinfo, f"no such bucket '{missing}'", "shards/")


def test_no_such_key(s3env, bucket):
    uri = f"s3://{bucket}/shards/missing.txt"
    for call in (lambda: csvio.load_csv(uri), lambda: storage.fingerprint(uri), lambda: storage.read_bytes(uri)):
        with pytest.raises(FedLinearError) as excinfo:
            call()
        check_user_error(excinfo, uri, "no such key 'shards/missing.txt'", f"bucket '{bucket}'")
    with pytest.raises(FedLinearError) as excinfo:
        s3.download_dir(f"s3://{bucket}/run/model", "/nonexistent-dir")
    check_user_error(excinfo, f"s3://{bucket}/run/model", "no objects")


def test_access_denied_and_bad_credentials(s3env, bucket, monkeypatch):
    allowed = put(s3env, bucket, "open/data.txt", SEED_LF)
    secret = put(s3env, bucket, "secret/data.txt", SEED_LF)
    with s3env.iam_auth(allow_get=[f"arn:aws:s3:::{bucket}/open/*"]) as creds:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["secret"])
        s3.reset_client()
        assert csvio.load_csv(allowed).num_examples == len(SEED_ROWS)  # auth on, good credentials work
        with pytest.raises(FedLinearError) as excinfo:
            csvio.load_csv(secret)
        check_user_error(excinfo, secret, "access denied", f"bucket '{bucket}', key 'secret/data.txt'",
                         creds["key"][:4], "from env")
        with pytest.raises(FedLinearError) as excinfo:
            storage.fingerprint(secret)  # HEAD: a bare 403
        check_user_error(excinfo, secret, "access denied", "or the credentials are invalid")
        with pytest.raises(FedLinearError) as excinfo:
            storage.write_text(f"s3://{bucket}/open/new.txt", "1,2\n")
        check_user_error(excinfo, "access denied to write", "open/new.txt")

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        s3.reset_client()
        with pytest.raises(FedLinearError) as excinfo:
            csvio.load_csv(allowed)
        check_user_error(excinfo, allowed, "bad credentials", "secret key does not match", "AWS_SECRET_ACCESS_KEY")

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        s3.reset_client()
        with pytest.raises(FedLinearError) as excinfo:
            csvio.load_csv(allowed)
        check_user_error(excinfo, allowed, "bad credentials", "AKIA...0000", "is not known to", "AWS_ACCESS_KEY_ID")


def test_no_credentials(s3env, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3.reset_client()
    uri = f"s3://{bucket}/shards/data.txt"
    with pytest.raises(FedLinearError) as excinfo:
        csvio.load_csv(uri)
    check_user_error(excinfo, uri, "no AWS credentials found", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "~/.aws/credentials")


def test_unknown_profile(s3env, bucket, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    s3.reset_client()
    with pytest.raises(FedLinearError) as excinfo:
        storage.exists(f"s3://{bucket}/x")
    check_user_error(excinfo, "AWS profile 'no-such-profile'", "AWS_PROFILE")


def test_unreachable_endpoint_fails_fast_after_bounded_retries(s3env, bucket, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3.reset_client()
    assert s3._client().meta.config.retries == {"total_max_attempts": 2, "mode": "standard"}
    uri = f"s3://{bucket}/shards/data.txt"
    for call in (lambda: csvio.load_csv(uri), lambda: storage.exists(uri), lambda: storage.write_text(uri, "")):
        start = time.monotonic()
        with pytest.raises(FedLinearError) as excinfo:
            call()
        assert time.monotonic() - start < 10
        check_user_error(excinfo, uri, f"cannot reach the S3 endpoint {closed}", "after 2 attempts",
                         "AWS_ENDPOINT_URL_S3", f"bucket '{bucket}'")


def test_endpoint_region_and_retry_configuration(s3env, bucket, monkeypatch):
    uri = put(s3env, bucket, "a.txt", b"1,2\n")
    closed = f"http://127.0.0.1:{free_port()}"
    # FEDLINEAR_S3_ENDPOINT_URL wins over AWS_ENDPOINT_URL_S3
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    monkeypatch.setenv("FEDLINEAR_S3_ENDPOINT_URL", s3env.endpoint)
    s3.reset_client()
    assert storage.exists(uri)
    # configure() wins over both
    monkeypatch.setenv("FEDLINEAR_S3_ENDPOINT_URL", closed)
    s3.configure(s3env.endpoint)
    assert storage.exists(uri)
    assert s3.endpoint_url() == s3env.endpoint
    # botocore's generic AWS_ENDPOINT_URL alone works too; no region anywhere -> us-east-1
    s3.configure(None)
    for name in ("AWS_ENDPOINT_URL_S3", "FEDLINEAR_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3env.endpoint)
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    s3.reset_client()
    assert storage.read_bytes(uri) == b"1,2\n"
    client = s3._client()
    assert client.meta.region_name == "us-east-1"
    assert client.meta.config.retries == {"mode": "adaptive"}  # botocore's own: 3 attempts
    assert s3._max_attempts() == 3
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s3.reset_client()
    assert s3._client().meta.region_name == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")  # boto3 ignores it; we honour it like the AWS CLI
    s3.reset_client()
    assert s3._client().meta.region_name == "eu-central-1"
    assert storage.read_bytes(uri) == b"1,2\n"
    monkeypatch.setenv("FEDLINEAR_S3_CONNECT_TIMEOUT", "soon")
    s3.reset_client()
    with pytest.raises(FedLinearError) as excinfo:
        storage.exists(uri)
    check_user_error(excinfo, "FEDLINEAR_S3_CONNECT_TIMEOUT", "'soon'")


def test_bad_uris(s3env):
    for uri, fragment in [("s3:///key", "no bucket name"), ("s3://bucket", "expected an object")]:
        with pytest.raises(FedLinearError) as excinfo:
            storage.read_bytes(uri)
        check_user_error(excinfo, uri, fragment)


# --------------------------------------------------------------------------------------------
# directories: publish (completion marker last, stale objects removed) and download
# --------------------------------------------------------------------------------------------


def make_dir(root, files: dict[str, bytes]) -> str:
    for rel, body in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(body)
    return str(root)


def test_publish_dir_order_stale_objects_and_download(s3env, bucket, tmp_path):
    uri = f"s3://{bucket}/run/model"
    old = make_dir(tmp_path / "old", {"saved_model.pb": b"old-pb", "variables/variables.index": b"old",
                                      "variables/variables.data-00000-of-00002": b"old", "assets/vocab": b"old"})
    new = make_dir(tmp_path / "new", {"saved_model.pb": b"new-pb", "fingerprint.pb": b"fp",
                                      "variables/variables.index": b"new",
                                      "variables/variables.data-00000-of-00001": b"new"})
    storage.publish_dir(old, uri)
    put(s3env, bucket, "run/model-sibling/keep", b"not part of the model")

    calls = []

    def record(params, model, **_):
        keys = [o["Key"] for o in params.get("Delete", {}).get("Objects", [])] or [params.get("Key")]
        calls.append((model.name, keys))

    s3._client().meta.events.register("provide-client-params.s3.*", record)
    storage.publish_dir(new, uri)
    writes = [(op, keys) for op, keys in calls if op in ("PutObject", "DeleteObjects")]
    assert writes[0] == ("DeleteObjects", ["run/model/saved_model.pb"])  # old model retired first
    assert writes[-1] == ("PutObject", ["run/model/saved_model.pb"])  # new model complete last
    assert ("DeleteObjects", ["run/model/assets/vocab", "run/model/variables/variables.data-00000-of-00002"]) in writes
    assert keys_under(s3env, bucket, "run/model") == [
        "run/model-sibling/keep", "run/model/fingerprint.pb", "run/model/saved_model.pb",
        "run/model/variables/variables.data-00000-of-00001", "run/model/variables/variables.index"]

    with storage.local_copy_of_dir(uri) as local:
        got = {os.path.relpath(os.path.join(r, n), local).replace(os.sep, "/")
               for r, _, names in os.walk(local) for n in names}
        assert got == {"saved_model.pb", "fingerprint.pb", "variables/variables.index",
                       "variables/variables.data-00000-of-00001"}
        with open(os.path.join(local, "saved_model.pb"), "rb") as handle:
            assert handle.read() == b"new-pb"


def test_download_dir_detects_a_concurrent_publish(s3env, bucket, tmp_path):
    uri = f"s3://{bucket}/run/model"
    put(s3env, bucket, "run/model/a", b"old-a")
    put(s3env, bucket, "run/model/saved_model.pb", b"old-pb")
    admin = s3env.admin()

    def publish_meanwhile(**_):
        admin.put_object(Bucket=bucket, Key="run/model/saved_model.pb", Body=b"new-pb")

    s3._client().meta.events.register_first("after-call.s3.GetObject", publish_meanwhile)
    with pytest.raises(FedLinearError) as excinfo:
        s3.download_dir(uri, str(tmp_path / "dl"))
    check_user_error(excinfo, f"s3://{bucket}/run/model/saved_model.pb", "changed while", "try again")


# --------------------------------------------------------------------------------------------
# the exported SavedModel on S3 (one test: TensorFlow costs ~6 s to import)
# --------------------------------------------------------------------------------------------

PLAIN_TF_LOAD = """
import json, sys
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
x = np.asarray(json.load(sys.stdin), dtype=np.float32)
y = model.signatures["serving_default"](x=tf.constant(x))["y"].numpy()
print(json.dumps(y.ravel().tolist()))
"""


def test_savedmodel_export_and_load_back_from_s3(s3env, bucket, tmp_path):
    from fedlinear.common.export import export_savedmodel, load_savedmodel

    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    weights = LinearWeights(kernel=rng.normal(size=(3, 1)).astype(np.float32), bias=np.array([0.75], np.float32))
    expected = x.astype(np.float64) @ weights.kernel.astype(np.float64).ravel() + 0.75
    uri = f"s3://{bucket}/run/model"
    put(s3env, bucket, "run/model/stale-from-older-model.bin", b"stale")

    export_savedmodel(weights, uri)
    keys = keys_under(s3env, bucket, "run/model/")
    assert "run/model/saved_model.pb" in keys and "run/model/variables/variables.index" in keys
    assert "run/model/stale-from-older-model.bin" not in keys

    # A fresh process with plain TensorFlow (no fedlinear) loads the downloaded model, meanwhile this
    # process loads it through fedlinear.
    local = str(tmp_path / "downloaded")
    s3.download_dir(uri, local)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    fresh = subprocess.Popen([sys.executable, "-c", PLAIN_TF_LOAD, local], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        predict, num_features = load_savedmodel(uri)
        assert num_features == 3
        np.testing.assert_allclose(predict(x).ravel(), expected, atol=1e-5)

        # Re-export a model of another shape over the same prefix: the new one replaces the old one whole.
        weights2 = LinearWeights(kernel=np.array([[2.0], [-1.0]], np.float32), bias=np.array([0.5], np.float32))
        export_savedmodel(weights2, uri)
        predict2, num_features2 = load_savedmodel(uri)
        assert num_features2 == 2
        np.testing.assert_allclose(predict2(x[:, :2]).ravel(), 2 * x[:, 0] - x[:, 1] + 0.5, atol=1e-5)

        out, err = fresh.communicate(json.dumps(x.tolist()), timeout=120)
    finally:
        if fresh.poll() is None:
            fresh.kill()
            fresh.wait()
    assert fresh.returncode == 0, err[-2000:]
    np.testing.assert_allclose(np.array(json.loads(out)), expected, atol=1e-5)
