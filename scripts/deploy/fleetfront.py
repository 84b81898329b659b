"""The Fleet front: the only part of a deployed SuperLink that the network can reach.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register/list``) and the Runtime API (SuperExec, ServerApp) as protobuf-over-HTTP(S) on **one** port,
and the open-source Control API authenticates no caller: whoever reaches it can register a key and
submit code that every SuperNode executes. ``fedlinear superlink`` therefore binds the SuperLink to
127.0.0.1 and puts this front on the network address. The front

* terminates TLS with the SuperLink's certificate (a plaintext client gets one clear ``400`` and the
  connection is closed; a client that rejects the certificate is logged);
* forwards exactly the twelve ``POST /v1/fleet/...`` calls a SuperNode makes (``FLEET_PATHS``, the
  routes of ``flwr/superlink/routers/fleet/router.py``, which ``flwr/supernode/fleet_http_client.py``
  calls), by exact match, with no query string, to the SuperLink over TLS on loopback (verified against
  the CA); the signed node-authentication headers pass through untouched, so the SuperLink still checks
  every node's key;
* answers everything else (``/v1/control/...``, ``/v1/runtime/...``, ``/health``, other methods,
  path tricks like ``/v1/fleet/../control/...``) with ``404`` and one log line, without contacting the
  SuperLink.

Plain stdlib (``ssl``, ``socketserver``, ``http.server``, ``http.client``); one thread per connection.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable

FLEET_PATHS = frozenset(
    "/v1/fleet/" + name
    for name in (
        "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
        "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
        "confirm-message-received",
    )
)  # fmt: skip
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
MAX_BODY = 1 << 30  # 1 GiB: far above any linear model's message, bounded all the same
IDLE_TIMEOUT = 120.0  # a SuperNode polls every few seconds; an idle connection is closed after this
BACKEND_TIMEOUT = 300.0
PLAINTEXT_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
PLAINTEXT_TEXT = (
    b"fedlinear Fleet API: TLS only. Connect with TLS: flower-supernode --root-certificates CA.crt "
    b"(not --insecure), or 'fedlinear node'.\n"
)


def stderr_log(line: str) -> None:
    print(f"[fleet-front] {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class FleetHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FleetFront

    def setup(self) -> None:
        super().setup()
        self._backend: http.client.HTTPSConnection | None = None

    def finish(self) -> None:
        with contextlib.suppress(Exception):
            super().finish()
        if self._backend is not None:
            self._backend.close()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        pass  # no access log; refusals are logged by _refuse

    def _refuse(self, code: int, why: str) -> None:
        self.server.log(f"refused {self.command} {self.path[:200]} from {self.client_address[0]}: {why}")
        body = f"fedlinear Fleet front: {why}\n".encode()
        # drain a small body so the connection stays usable; otherwise close it
        length = self.headers.get("Content-Length")
        keep = length is not None and length.isdigit() and int(length) <= 1 << 20
        if keep:
            self.rfile.read(int(length or 0))
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if not keep:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _not_exposed(self) -> None:
        self._refuse(404, "only the Fleet API (POST /v1/fleet/...) is served on this address")

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_exposed  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
        if self.path not in FLEET_PATHS:
            self._not_exposed()
            return
        if self.headers.get("Transfer-Encoding"):
            self._refuse(411, "chunked request bodies are not accepted; send Content-Length")
            return
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY:
            self._refuse(413, f"request body length {length_text[:20]!r} is invalid or above {MAX_BODY} bytes")
            return
        body = self.rfile.read(int(length_text))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        try:
            status, reason, out_headers, payload = self._forward(self.path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self.server.log(f"SuperLink unreachable for {self.path} from {self.client_address[0]}: {exc}")
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(status, reason)
        for key, value in out_headers:
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _forward(self, path: str, body: bytes, headers: dict[str, str]):
        for attempt in (0, 1):  # a kept-alive backend connection may have been closed meanwhile
            if self._backend is None:
                host, port = self.server.backend
                self._backend = http.client.HTTPSConnection(
                    host, port, context=self.server.backend_context, timeout=BACKEND_TIMEOUT
                )
            try:
                self._backend.request("POST", path, body=body, headers=headers)
                resp = self._backend.getresponse()
                payload = resp.read()
                return resp.status, resp.reason, resp.getheaders(), payload
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._backend.close()
                self._backend = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class FleetFront(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """TLS front on ``listen`` forwarding only the Fleet API to the SuperLink at ``backend`` (loopback)."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(
        self,
        listen: tuple[str, int],
        backend: tuple[str, int],
        certfile: str,
        keyfile: str,
        cafile: str,
        log: Callable[[str], None] = stderr_log,
    ) -> None:
        self.backend = backend
        self.log = log
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.load_cert_chain(certfile, keyfile)
        self.backend_context = ssl.create_default_context(cafile=cafile)
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.address_family = family
        super().__init__(listen, FleetHandler)

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        request.settimeout(IDLE_TIMEOUT)
        try:
            first = request.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if not first:
            return
        if first[0] != 0x16:  # not a TLS handshake record: a plaintext client
            self.log(f"refused a plaintext connection from {client_address[0]}: the Fleet API here is TLS-only")
            with contextlib.suppress(OSError):
                request.sendall(PLAINTEXT_REPLY % (len(PLAINTEXT_TEXT), PLAINTEXT_TEXT))
            return
        try:
            tls = self.server_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self.log(f"TLS handshake with {client_address[0]} failed: {reason} (does it trust this federation's CA?)")
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
