"""The Starlette application: TF Serving's REST API, KServe V2 (Open Inference Protocol), metrics.

TF Serving (``tensorflow_serving/g3doc/api_rest.md``)::

    GET  /v1/models/NAME[/versions/N|/labels/L]            status (GetModelStatusResponse JSON)
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   the SignatureDefMap
    POST /v1/models/NAME[/versions/N|/labels/L]:predict    {"instances": ...} | {"inputs": ...}
    POST /v1/models/NAME[/versions/N|/labels/L]:regress    {"examples": [...], "context": {...}}

KServe V2::

    GET  /v2/health/live, /v2/health/ready, /v2
    GET  /v2/models/NAME[/versions/N], .../ready
    POST /v2/models/NAME[/versions/N]/infer

plus ``GET /metrics`` (Prometheus) and ``GET /healthz``. Every error is ``{"error": "..."}`` with TF
Serving's status codes: 400 invalid argument, 404 not found, 405 wrong method, 413 body over the
limit, 500 for anything unexpected (logged; the server goes on).
"""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fedlinear.scripts.serve import protocol
from fedlinear.scripts.serve.metrics import Metrics
from fedlinear.scripts.serve.repository import NotFound, Repository, Snapshot

from fedlinear.scripts.serve import DEFAULT_MAX_BODY
_V1 = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<meta>/metadata)?(?::(?P<verb>[A-Za-z]+))?$"
)


class TooLarge(Exception):
    pass


class FastJSON(JSONResponse):
    """A JSONResponse written by orjson (when installed): prediction bodies are mostly numbers."""

    def render(self, content) -> bytes:
        if protocol.orjson is None:
            return super().render(content)
        return protocol.orjson.dumps(content)


async def compute(sig, x):
    """The signature's predictions for ``x``; NumPy inline, TensorFlow in a worker thread."""
    y = sig.predict(x) if sig.engine == "numpy" else await run_in_threadpool(sig.predict, x)
    if not np.isfinite(y).all():  # finite inputs and weights give finite outputs: this is a fault, not input
        raise ValueError("the model produced a non-finite prediction")
    return y


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18:
        raise NotFound(f"Servable not found: version '{text[:40]}' is not a version number")
    return int(text)


def status_json(snap: Snapshot, version: int | None, label: str | None) -> dict:
    """GetModelStatusResponse: served versions AVAILABLE, failed ones END with their error."""
    entries = []
    if label is not None or version is not None:
        if version is not None and version in snap.failures and version not in snap.versions:
            f = snap.failures[version]
            return {"model_version_status": [_failed(f)]}
        served = snap.resolve(version, label)
        chosen = [served.version]
    else:
        chosen = sorted(set(snap.versions) | set(snap.failures), reverse=True)
        if not chosen:
            raise NotFound(f"Could not find any versions of model {snap.name}")
    for v in chosen:
        if v in snap.versions:
            entries.append({"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}})
        else:
            entries.append(_failed(snap.failures[v]))
    return {"model_version_status": entries}


def _failed(failure) -> dict:
    return {"version": str(failure.version), "state": "END", "status": {"error_code": "UNKNOWN", "error_message": failure.message}}


def build_app(repository: Repository, max_body: int = DEFAULT_MAX_BODY, say: Callable[[str], None] = print) -> Starlette:
    metrics = Metrics()

    async def read_json(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise TooLarge()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise TooLarge()
            chunks.append(chunk)
        return protocol.parse_json(b"".join(chunks))

    def handler(endpoint: str, fn):
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            model, endpoint_name = "_unknown", endpoint
            try:
                name = request.path_params.get("name")
                if name is None and "rest" in request.path_params:
                    match = _V1.match(request.path_params["rest"])
                    name = match.group("name") if match else None
                    if match is not None:
                        label = "metadata" if match.group("meta") else (match.group("verb") or "status")
                        endpoint_name = f"v1-{label}"
                if name in repository.names():
                    model = name
                response = await fn(request)
            except protocol.BadRequest as exc:
                response = error(400, str(exc))
            except NotFound as exc:
                response = error(404, str(exc))
            except TooLarge:
                response = error(413, f"request body over the limit of {max_body} bytes (--max-body-bytes)")
            except Exception as exc:  # noqa: BLE001 - never die on a request
                say(f"fedlinear serve: internal error on {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                response = error(500, f"internal error: {type(exc).__name__}")
            if endpoint_name not in ("v1-status", "v1-metadata", "v1-predict", "v1-regress", "v1-classify", endpoint):
                endpoint_name = endpoint  # a verb nobody defined: no label of its own
            metrics.observe(model, endpoint_name, response.status_code, time.perf_counter() - started)
            return response

        return wrapped

    # TF Serving ------------------------------------------------------------------------------
    def v1_target(request: Request):
        match = _V1.match(request.path_params["rest"])
        if match is None:
            raise NotFound(f"Malformed request: {request.method} {request.url.path}")
        return match, repository.snapshot(match.group("name"))

    async def v1_get(request: Request) -> Response:
        match, snap = v1_target(request)
        if match.group("verb"):
            return error(405, f"{match.group('verb')} needs POST")
        version, label = _version(match.group("version")), match.group("label")
        if match.group("meta"):
            served = snap.resolve(version, label)
            return JSONResponse({
                "model_spec": {"name": snap.name, "signature_name": "", "version": str(served.version)},
                "metadata": {"signature_def": {"signature_def": served.signature_defs}},
            })  # fmt: skip
        return JSONResponse(status_json(snap, version, label))

    async def v1_post(request: Request) -> Response:
        match, snap = v1_target(request)
        verb = match.group("verb")
        if match.group("meta") or verb is None:
            return error(405, "POST needs :predict, :regress or :classify")
        served = snap.resolve(_version(match.group("version")), match.group("label"))
        body = await read_json(request)
        if verb == "predict":
            sig, x, rows = protocol.predict_input(served, body)
            return FastJSON(protocol.predict_output(sig, await compute(sig, x), rows))
        if verb == "regress":
            sig, x = protocol.regress_input(served, body)
            return FastJSON({"result": (await compute(sig, x)).reshape(-1).tolist()})
        if verb == "classify":
            raise protocol.BadRequest("classify: a linear regression model has no classes (use :predict or :regress)")
        raise NotFound(f"Malformed request: unknown verb ':{verb[:20]}'")

    # KServe V2 -------------------------------------------------------------------------------
    def v2_servable(request: Request):
        snap = repository.snapshot(request.path_params["name"])
        return snap, snap.resolve(_version(request.path_params.get("version")), None)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        ok = repository.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_meta(request: Request) -> Response:
        from importlib import metadata

        return JSONResponse({"name": "fedlinear", "version": metadata.version("fedlinear"), "extensions": []})

    async def model_meta(request: Request) -> Response:
        snap, served = v2_servable(request)
        sig = served.default
        versions = [str(v) for v in sorted(snap.versions)] if "version" not in request.path_params else [str(served.version)]
        out_shape = [-1, 1] if sig.output_rank == 2 else [-1]
        return JSONResponse({
            "name": snap.name, "versions": versions, "platform": "tensorflow_savedmodel",
            "inputs": [{"name": sig.input_name, "datatype": "FP32", "shape": [-1, sig.num_features]}],
            "outputs": [{"name": sig.output_name, "datatype": "FP32", "shape": out_shape}],
        })  # fmt: skip

    async def model_ready(request: Request) -> Response:
        try:
            snap, served = v2_servable(request)
        except NotFound:
            if request.path_params["name"] not in repository.names():
                raise
            return JSONResponse({"name": request.path_params["name"], "ready": False}, status_code=503)
        return JSONResponse({"name": snap.name, "ready": True})

    async def infer(request: Request) -> Response:
        _snap, served = v2_servable(request)
        body = await read_json(request)
        sig, x, extra = protocol.infer_input(served, body)
        return FastJSON(protocol.infer_output(served, sig, await compute(sig, x), extra))

    # Operations ------------------------------------------------------------------------------
    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(repository), media_type="text/plain; version=0.0.4")

    async def healthz(request: Request) -> Response:
        return await ready(request)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"Not found: {request.method} {request.url.path}", 405: f"Method {request.method} not allowed here"}
        return error(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    routes = [
        Route("/v1/models/{rest:path}", handler("v1", v1_get), methods=["GET"]),
        Route("/v1/models/{rest:path}", handler("v1", v1_post), methods=["POST"]),
        Route("/v2/health/live", handler("live", live), methods=["GET"]),
        Route("/v2/health/ready", handler("ready", ready), methods=["GET"]),
        Route("/v2", handler("server", server_meta), methods=["GET"]),
        Route("/v2/models/{name}", handler("metadata", model_meta), methods=["GET"]),
        Route("/v2/models/{name}/ready", handler("ready", model_ready), methods=["GET"]),
        Route("/v2/models/{name}/infer", handler("infer", infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}", handler("metadata", model_meta), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", handler("ready", model_ready), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/infer", handler("infer", infer), methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.metrics = metrics
    return app
