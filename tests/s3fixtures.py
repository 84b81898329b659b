"""Fixtures for tests against a real S3-compatible server: ``moto_server`` over HTTP on loopback.

Import them explicitly in a test module (``from tests.s3fixtures import moto_s3, s3env, bucket``).

* ``moto_s3`` (session): starts the venv's ``moto_server`` on a free 127.0.0.1 port, waits (bounded)
  until it answers HTTP, yields a :class:`MotoServer`, terminates it at the end.
* ``s3env`` (function): points boto3 at it the standard way (``AWS_ENDPOINT_URL_S3``, dummy
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION=us-east-1``), hides the user's own
  AWS configuration, and resets the cached client in :mod:`common.s3` before and after the test.
* ``bucket`` (function): a fresh, empty bucket.
* :meth:`MotoServer.iam_auth`: moto enforces IAM authentication (signature and policy checks) while
  the context is open, through moto's ``/moto-api/reset-auth`` (the runtime form of
  ``INITIAL_NO_AUTH_ACTION_COUNT``); yields credentials of a user allowed only ``s3:GetObject`` on
  given resources.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

STARTUP_TIMEOUT_S = 30.0
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"
_counter = itertools.count()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (nothing listens on it afterwards)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A running ``moto_server`` process."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: str) -> None:
        self.proc = proc
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._admins: dict[str, object] = {}

    def admin(self, service: str = "s3"):
        """A plain boto3 client for test setup (independent of common.s3 and of the environment)."""
        if service not in self._admins:
            import boto3

            self._admins[service] = boto3.session.Session().client(
                service,
                endpoint_url=self.endpoint,
                region_name=REGION,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
            )
        return self._admins[service]

    def _post(self, path: str, body: bytes) -> bytes:
        request = urllib.request.Request(
            self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    @contextlib.contextmanager
    def iam_auth(self, allow_get: list[str]) -> Iterator[dict[str, str]]:
        """Enforce IAM auth; yield ``{"key", "secret"}`` of a user allowed ``s3:GetObject`` on ``allow_get``."""
        iam = self.admin("iam")
        user = f"reader-{os.getpid()}-{next(_counter)}"
        iam.create_user(UserName=user)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": allow_get}],
        }
        iam.put_user_policy(UserName=user, PolicyName="read-some", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._post("/moto-api/reset-auth", b"0")  # authenticate every request from now on
        try:
            yield {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        finally:
            self._post("/moto-api/reset-auth", b"inf")  # back to moto's default: no auth

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_moto_server(log_dir: str, attempts: int = 3) -> MotoServer:
    """Start ``moto_server`` on a free loopback port and wait until it answers (bounded)."""
    executable = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(executable):
        pytest.fail(f"moto_server not found next to {sys.executable}: pip install 'moto[server]'", pytrace=False)
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    last_log = ""
    for _attempt in range(attempts):  # the free port can be taken between probing and binding
        port = free_port()
        log_path = os.path.join(log_dir, f"moto_server-{port}.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [executable, "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        server = MotoServer(proc, port, log_path)
        from tests.bounded import Budget

        budget = Budget(STARTUP_TIMEOUT_S)  # 30 s of a quiet machine's time, more on a busy one
        while not budget.spent() and proc.poll() is None:
            if _answers(f"{server.endpoint}/moto-api/"):
                return server
            time.sleep(0.05)  # polling interval while the port is not yet answering
        died = proc.poll() is not None  # e.g. the port was taken meanwhile: try another one
        server.stop()
        with open(log_path, errors="replace") as handle:
            last_log = handle.read()[-2000:]
        if not died:
            break
    raise RuntimeError(f"moto_server did not answer within {STARTUP_TIMEOUT_S:.0f} s; log:\n{last_log}")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[MotoServer]:
    server = start_moto_server(str(tmp_path_factory.mktemp("moto")))
    try:
        yield server
    finally:
        server.stop()


def _reset_client() -> None:
    from fedlinear.common import s3

    s3.configure(None)


@pytest.fixture
def s3env(moto_s3, monkeypatch, tmp_path) -> Iterator[MotoServer]:
    """Environment pointing boto3 at moto (standard AWS variables only); the S3 client reset around the test."""
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE" or name.startswith("FEDLINEAR_S3_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # Keep the user's ~/.aws and the instance metadata service out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    _reset_client()
    try:
        yield moto_s3
    finally:
        _reset_client()


@pytest.fixture
def bucket(moto_s3) -> str:
    """A new empty bucket."""
    name = f"fedlinear-test-{os.getpid()}-{next(_counter)}"
    moto_s3.admin().create_bucket(Bucket=name)
    return name
