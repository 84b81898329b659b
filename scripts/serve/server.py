"""Run the server: load every model (first poll, before the port opens), poll, serve with uvicorn."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.serve import DEFAULT_MAX_BODY
from fedlinear.scripts.serve.app import build_app
from fedlinear.scripts.serve.repository import Policy, Repository, parse_models


@dataclasses.dataclass
class ServeOptions:
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 8501  # TF Serving's REST port
    version_policy: str = "latest"
    labels: list[str] = dataclasses.field(default_factory=list)
    poll_seconds: float = 1.0
    max_body_bytes: int = DEFAULT_MAX_BODY
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False
    workers_limit: int | None = None


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(opts: ServeOptions) -> None:
    if not opts.models:
        raise FedLinearError("fedlinear serve: give at least one MODEL (run dir, model dir or base path)")
    if not 0 <= opts.port <= 65535:
        raise FedLinearError(f"--port must be 0..65535, got {opts.port}")
    if opts.poll_seconds < 0:
        raise FedLinearError(f"--poll-seconds must be >= 0 (0: no polling), got {opts.poll_seconds:g}")
    if opts.max_body_bytes < 1024:
        raise FedLinearError(f"--max-body-bytes must be >= 1024, got {opts.max_body_bytes}")
    if bool(opts.tls_cert) != bool(opts.tls_key):
        raise FedLinearError("TLS needs both --tls-cert and --tls-key")
    for path in (opts.tls_cert, opts.tls_key):
        if path and not os.path.isfile(path):
            raise FedLinearError(f"{path}: no such file (--tls-cert / --tls-key)")
    if not loopback(opts.host) and not opts.tls_cert and not opts.insecure:
        raise FedLinearError(
            f"--host {opts.host} exposes the server beyond this machine: give --tls-cert and --tls-key "
            "(e.g. from `fedlinear deploy pki`), or --insecure-http to serve plain HTTP there knowingly"
        )


def serve(opts: ServeOptions) -> int:
    import uvicorn

    check(opts)
    repository = Repository(parse_models(opts.models, Policy.parse(opts.version_policy), opts.labels), say=say)
    repository.poll()  # every model loaded (or its failure reported) before the port opens
    for name in repository.names():
        snap = repository.snapshot(name)
        if not snap.versions and repository.sources[name].located.kind != "base":
            failure = next(iter(snap.failures.values()), None)
            raise FedLinearError(f"model {name}: {failure.message if failure else 'nothing to load'}")
        if not snap.versions:
            problems = "; ".join(f"version {f.version}: {f.message}" for f in snap.failures.values()) or "no version found yet"
            say(f"fedlinear serve: {name}: nothing to serve yet ({problems}); polling every {opts.poll_seconds:g} s")
    repository.start(opts.poll_seconds)
    app = build_app(repository, max_body=opts.max_body_bytes, say=say)
    config = uvicorn.Config(
        app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
        ssl_certfile=opts.tls_cert, ssl_keyfile=opts.tls_key, limit_concurrency=opts.workers_limit,
        timeout_keep_alive=30, lifespan="off",
    )  # fmt: skip
    server = uvicorn.Server(config)
    scheme = "https" if opts.tls_cert else "http"
    names = ", ".join(repository.names())
    say(f"fedlinear serve: serving {names} on {scheme}://{opts.host}:{opts.port} (TF Serving REST /v1, KServe V2 /v2, /metrics)")
    try:
        server.run()
    finally:
        repository.stop()
    return 0
