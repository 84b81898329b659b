"""``fedlinear serve``: exported models over TensorFlow Serving's REST API and KServe V2 (docs/how-to/serve.md)."""

from __future__ import annotations

import argparse

from fedlinear.scripts.serve import DEFAULT_MAX_BODY


def cmd_serve(args: argparse.Namespace) -> int:
    from fedlinear.scripts.serve.server import ServeOptions, serve

    return serve(
        ServeOptions(
            models=args.model, host=args.host, port=args.port, version_policy=args.version_policy,
            labels=args.label or [], poll_seconds=args.poll_seconds, max_body_bytes=args.max_body_bytes,
            tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure_http,
            workers_limit=args.limit_concurrency,
        )
    )  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedlinear serve``."""
    serve = sub.add_parser("serve", help="serve exported models (TF Serving REST API, KServe V2)")
    serve.add_argument("model", nargs="+", metavar="[NAME=]MODEL",
                       help="a run directory, a model directory or a versioned base path (BASE/1, BASE/2 ...), "
                       "local or s3://; NAME=MODEL names it (default: the folder's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need TLS)")
    serve.add_argument("--port", type=int, default=8501, help="port (default 8501, TF Serving's REST port)")
    serve.add_argument("--version-policy", default="latest", metavar="POLICY",
                       help="latest (default: the newest version that loads), all, or specific:N[,M...]")
    serve.add_argument("--label", action="append", metavar="[MODEL:]LABEL=N",
                       help="a version label, e.g. stable=1 canary=2 (repeatable): /v1/models/NAME/labels/LABEL")
    serve.add_argument("--poll-seconds", type=float, default=1.0,
                       help="how often base paths are checked for new versions (default 1, as TF Serving's "
                       "--file_system_poll_wait_seconds; 0: never)")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                       help=f"largest request body accepted (default {DEFAULT_MAX_BODY}); larger ones get 413")
    serve.add_argument("--limit-concurrency", type=int, default=None,
                       help="at most this many connections/requests at once (uvicorn's limit; beyond: 503)")
    serve.add_argument("--tls-cert", help="PEM certificate (with --tls-key): serve HTTPS")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--insecure-http", action="store_true",
                       help="allow plain HTTP on a non-loopback --host (anyone who reaches it can read and query)")
    serve.set_defaults(func=cmd_serve)
