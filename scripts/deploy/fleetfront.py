"""The Fleet front: the only part of a deployed SuperLink that the network can reach.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register/list``) and the Runtime API (SuperExec, ServerApp) as protobuf-over-HTTP(S) on **one** port,
and the open-source Control API authenticates no caller: whoever reaches it can register a key and
submit code that every SuperNode executes. ``fedlinear superlink`` therefore binds the SuperLink to
127.0.0.1 and puts this front on the network address. SuperNodes in 1.42 talk HTTP/1.1 to it
(``flwr/supernode/fleet_http_client.py``, httpx; no gRPC, no HTTP/2), so the front speaks HTTP/1.1.

The front

* terminates TLS with the SuperLink's certificate (a plaintext client gets one clear ``400`` and the
  connection is closed; a client that rejects the certificate is logged);
* forwards exactly the twelve ``POST /v1/fleet/...`` calls a SuperNode makes (``FLEET_PATHS``, the
  routes of ``flwr/superlink/routers/fleet/router.py``), by exact match, with no query string, to the
  SuperLink over TLS on loopback (verified against the CA); the signed node-authentication headers pass
  through untouched, so the SuperLink still checks every node's key;
* answers everything else (``/v1/control/...``, ``/v1/runtime/...``, ``/health``, other methods,
  path tricks like ``/v1/fleet/../control/...``) with ``404`` and one log line, without contacting the
  SuperLink; every malformed request gets a ``4xx`` (``h11`` parses; its refusals carry the status);
* holds under abuse (:class:`FrontLimits`): one *total* deadline for the TLS handshake and the request
  headers (a client trickling a header line every 50 s is cut off after ``header_timeout``, not per
  read), a cap on connections in all and per peer address (derived from the open-file limit so the
  front never runs out of descriptors), a body limit per path sized to Fleet messages and checked on
  ``Content-Length`` *before* anything is sent to the SuperLink, bodies streamed in 64 KiB pieces with
  back-pressure (never held whole), a minimum body rate, and rate-limited log lines (a token bucket per
  kind of line, with a "suppressed N similar lines" summary);
* logs each node key (its OpenSSH ``SHA256:`` fingerprint, the one ``ssh-keygen -lf NAME.pub`` shows)
  the first time the SuperLink accepts a request signed with it, and again whenever it comes back
  from another address: the trace a stolen key leaves (``records`` keeps these lines as JSON).

Why ``h11`` on ``asyncio`` rather than an ASGI server: the front needs the first byte of a connection
before TLS (the plaintext answer), one deadline spanning the TLS handshake *and* the headers, and a cap
per peer address; uvicorn 0.49 has none of the three (its timeouts are per keep-alive idle period, its
``limit_concurrency`` counts requests, not peers). ``h11`` (the HTTP/1.1 parser uvicorn and httpx use)
does the parsing and framing, where request smuggling lives; the rest is a few asyncio tasks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import http
import json
import os
import resource
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable

import h11

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
     "transfer-encoding", "upgrade", "host", "content-length", "expect", "proxy-connection"}
)  # fmt: skip
PUBLIC_KEY_HEADER = b"flwr-public-key"  # flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER
ACTIVATE = "/v1/fleet/activate-node"
KIB, MIB = 1024, 1024 * 1024
CHUNK = 64 * KIB
PLAINTEXT_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
PLAINTEXT_TEXT = (
    b"fedlinear Fleet API: TLS only. Connect with TLS: flower-supernode --root-certificates CA.crt "
    b"(not --insecure), or 'fedlinear node'.\n"
)
NOT_EXPOSED = "only the Fleet API (POST /v1/fleet/...) is served on this address"


def flower_chunk_size() -> int:
    """The largest array chunk Flower puts in one object (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB)."""
    try:
        from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

        return int(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
    except (ImportError, ValueError):  # pragma: no cover - flwr is a dependency
        return 5 * MIB


def default_body_limits(max_object: int | None = None) -> dict[str, int]:
    """Per-path request body limits. Flower splits every array into objects of at most 5 MiB
    (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), whatever the model's size, so ``push-object`` carries at
    most 5 MiB + ~120 bytes (measured: ``python -m benchmarks.fleet_message_sizes``); 8 MiB by default.
    ``push-messages`` carries a message's metadata and object tree (about 70 bytes per object): 1 MiB.
    The rest carry ids and a public key: 64 KiB."""
    limits = {path: 64 * KIB for path in FLEET_PATHS}
    limits["/v1/fleet/push-messages"] = 1 * MIB
    limits["/v1/fleet/push-object"] = max_object or max(8 * MIB, flower_chunk_size() + 1 * MIB)
    return limits


def default_max_connections() -> int:
    """Half the descriptors left under the soft open-file limit (each forwarded request holds two),
    at most 4096: 448 at the usual 1024."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, min(4096, (soft - 128) // 2))


@dataclasses.dataclass
class FrontLimits:
    """What one peer, and all peers together, can make the front hold."""

    header_timeout: float = 10.0  # TLS handshake + request line + headers, in total, per request
    idle_timeout: float = 60.0  # a kept-alive connection may wait this long for its next request
    max_connections: int = dataclasses.field(default_factory=default_max_connections)
    max_per_peer: int = 32  # connections from one IP address (a SuperNode uses one or two)
    max_header_bytes: int = 16 * KIB  # request line + headers (h11 answers 431 above it)
    body_limits: dict[str, int] = dataclasses.field(default_factory=default_body_limits)
    body_timeout: float = 30.0  # a body must arrive within this + its length at min_body_rate
    min_body_rate: float = 256 * KIB  # bytes/s
    backend_timeout: float = 300.0  # the SuperLink's answer, in total
    max_backend: int = 64  # requests forwarded to the SuperLink at once
    backlog: int = 1024  # listen backlog (the kernel caps it at net.core.somaxconn)
    log_burst: int = 20  # log lines of one kind before rate limiting
    log_rate: float = 1.0  # lines/s of one kind after the burst

    def body_limit(self, path: str) -> int:
        return self.body_limits.get(path, 64 * KIB)


def stderr_log(line: str) -> None:
    print(f"[fleet-front] {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class RateLimitedLog:
    """One token bucket per kind of line; what a bucket suppresses is summed up in one line, written
    with the next line of that kind that gets through (or by :meth:`flush`)."""

    def __init__(self, sink: Callable[[str], None], burst: int, rate: float) -> None:
        self.sink, self.burst, self.rate = sink, burst, rate
        self.buckets: dict[str, list[float]] = {}  # kind -> [tokens, last refill, suppressed]
        self.lock = threading.Lock()

    def __call__(self, kind: str, line: str) -> None:
        now = time.monotonic()
        with self.lock:
            bucket = self.buckets.setdefault(kind, [float(self.burst), now, 0])
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
            if bucket[0] < 1.0:
                bucket[2] += 1
                return
            bucket[0] -= 1.0
            suppressed, bucket[2] = int(bucket[2]), 0
        if suppressed:
            self.sink(f"(suppressed {suppressed} similar lines: {kind})")
        self.sink(line)

    def flush(self) -> None:
        with self.lock:
            pending = [(kind, int(b[2])) for kind, b in self.buckets.items() if b[2]]
            for kind, _ in pending:
                self.buckets[kind][2] = 0
        for kind, count in pending:
            self.sink(f"(suppressed {count} similar lines: {kind})")


def key_fingerprint(header_value: bytes) -> str | None:
    """OpenSSH ``SHA256:`` fingerprint of the key in a ``flwr-public-key`` header (base64 of a PEM
    SubjectPublicKeyInfo), the one ``ssh-keygen -lf NAME.pub`` prints; None if it is no EC key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(base64.b64decode(header_value, validate=True))
    except (ValueError, TypeError, UnicodeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return openssh_fingerprint(key)


def openssh_fingerprint(key) -> str:
    from cryptography.hazmat.primitives import serialization

    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def activated_node_id(answer: bytes) -> int | None:
    """The node id in the SuperLink's answer to activate-node (an ``ActivateNodeResponse``), if any."""
    try:
        from flwr.proto.fleet_pb2 import ActivateNodeResponse

        return ActivateNodeResponse.FromString(answer).node_id or None
    except Exception:  # noqa: BLE001 - not protobuf, or another Flower: the id is a nicety
        return None


class NodeAddresses:
    """Which address each node key was last accepted from. A key seen from a new address is logged
    (and appended to ``records`` as one JSON line): a party that moved, or someone else with its key."""

    MAX_KEYS = 4096

    def __init__(self, log: Callable[[str], None], names: dict[str, str] | None, records: str | None) -> None:
        self.log, self.names, self.records = log, dict(names or {}), records
        self.fingerprints: dict[bytes, str | None] = {}
        self.last: dict[str, tuple[str, float]] = {}  # fingerprint -> (address, time)
        self.node_ids: dict[str, int] = {}  # fingerprint -> the SuperLink's node id (from activate-node)

    def accepted(self, header_value: bytes, address: str, path: str, node_id: int | None = None) -> None:
        if header_value not in self.fingerprints:
            if len(self.fingerprints) >= self.MAX_KEYS:
                self.fingerprints.clear()
            self.fingerprints[header_value] = key_fingerprint(header_value)
        fingerprint = self.fingerprints[header_value]
        if fingerprint is None:
            return
        previous = self.last.get(fingerprint)
        now = time.time()
        self.last[fingerprint] = (address, now)
        new_id = node_id is not None and self.node_ids.get(fingerprint) != node_id
        if node_id is not None:
            if len(self.node_ids) >= self.MAX_KEYS:
                self.node_ids.clear()
            self.node_ids[fingerprint] = node_id
        if previous is not None and previous[0] == address:
            if new_id:
                name = self.names.get(fingerprint)
                self.log(f"node key {fingerprint}" + (f" ({name})" if name else "")
                         + f" is node {node_id}, activated from {address}")  # fmt: skip
            return
        name = self.names.get(fingerprint)
        label = f"node key {fingerprint}" + self._name(fingerprint)
        if previous is None:
            event = "first-seen"
            self.log(f"{label} accepted from {address} ({path})")
        else:
            event = "new-address"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(previous[1]))
            self.log(
                f"{label} came back from a new address {address} (last accepted from {previous[0]} at {when} UTC): "
                "if that party did not move, another machine holds its key; see docs/deploy.md, 'A stolen party key'"
            )
        if self.records:
            entry = {"time": round(now, 3), "event": event, "key": fingerprint, "name": name,
                     "node-id": self.node_ids.get(fingerprint), "address": address,
                     "previous": previous[0] if previous else None, "path": path}  # fmt: skip
            with contextlib.suppress(OSError), open(self.records, "a") as handle:
                handle.write(json.dumps(entry) + "\n")

    def refused_activation(self, header_value: bytes, address: str) -> None:
        fingerprint = self.fingerprints.get(header_value) or key_fingerprint(header_value)
        if fingerprint is None:
            return
        last = self.last.get(fingerprint)
        where = f"last accepted from {last[0]}" if last else "never accepted since the front started"
        self.log(
            f"node key {fingerprint}{self._name(fingerprint)} was refused activation from {address} ({where}): "
            "the SuperLink has this node online already, or the key is no longer registered. If the node is "
            "online from another address, two machines hold this key; see docs/deploy.md, 'A stolen party key'"
        )
        if self.records:
            entry = {"time": round(time.time(), 3), "event": "refused-activation", "key": fingerprint,
                     "name": self.names.get(fingerprint), "node-id": self.node_ids.get(fingerprint),
                     "address": address, "previous": last[0] if last else None, "path": ACTIVATE}  # fmt: skip
            with contextlib.suppress(OSError), open(self.records, "a") as handle:
                handle.write(json.dumps(entry) + "\n")

    def _name(self, fingerprint: str) -> str:
        parts = [self.names[fingerprint]] if fingerprint in self.names else []
        if fingerprint in self.node_ids:
            parts.append(f"node {self.node_ids[fingerprint]}")
        return f" ({', '.join(parts)})" if parts else ""


class _Refuse(Exception):
    def __init__(self, status: int, why: str, kind: str = "refused") -> None:
        super().__init__(why)
        self.status, self.why, self.kind = status, why, kind


class _Gone(Exception):
    """The connection is over (client hung up, timed out, or must close); nothing more to say."""


class FleetFront:
    """TLS front on ``listen`` forwarding only the Fleet API to the SuperLink at ``backend`` (loopback)."""

    def __init__(
        self,
        listen: tuple[str, int],
        backend: tuple[str, int],
        certfile: str,
        keyfile: str,
        cafile: str,
        log: Callable[[str], None] = stderr_log,
        limits: FrontLimits | None = None,
        key_names: dict[str, str] | None = None,
        records: str | None = None,
    ) -> None:
        self.backend = backend
        self.limits = limits or FrontLimits()
        self.log = log
        self.rlog = RateLimitedLog(log, self.limits.log_burst, self.limits.log_rate)
        self.nodes = NodeAddresses(log, key_names, records)
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.load_cert_chain(certfile, keyfile)
        self.backend_context = ssl.create_default_context(cafile=cafile)
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(listen)
        self.socket.listen(self.limits.backlog)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        self.per_peer: dict[str, int] = {}
        self.open = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ("accepted", "over-global-cap", "over-peer-cap", "header-timeouts", "malformed", "refused", "too-large",
             "forwarded", "backend-errors", "hangups"), 0)  # fmt: skip
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self._run, name="fleet-front", daemon=True)
        self.thread.start()
        self._ready.wait(30)
        return self.thread

    def stop(self) -> None:
        if self.loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stopping.set)
        if self.thread is not None:
            self.thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self.socket.close()
        self.rlog.flush()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        loop.set_exception_handler(self._loop_exception)
        try:
            loop.run_until_complete(self._main())
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _loop_exception(self, loop, context) -> None:
        # asyncio's own reports (an SSL transport's error, a dropped socket): one line, no traceback
        exc = context.get("exception")
        what = f"{type(exc).__name__}: {exc}" if exc is not None else context.get("message", "?")
        self.rlog("internal", f"connection error: {what}"[:300])

    async def _main(self) -> None:
        assert self.loop is not None
        self._stopping = asyncio.Event()
        self.backend_slots = asyncio.Semaphore(self.limits.max_backend)
        tasks: set[asyncio.Task] = set()
        accept = asyncio.ensure_future(self._accept_loop(tasks))
        flusher = asyncio.ensure_future(self._flush_logs())
        self._ready.set()
        await self._stopping.wait()
        accept.cancel()
        flusher.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(accept, flusher, *tasks, return_exceptions=True)

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(10)
            self.rlog.flush()

    async def _accept_loop(self, tasks: set[asyncio.Task]) -> None:
        assert self.loop is not None
        while True:
            try:
                sock, address = await self.loop.sock_accept(self.socket)
            except OSError as exc:  # EMFILE and friends: say so, back off, keep serving
                self.rlog("accept", f"accept failed: {exc}")
                await asyncio.sleep(0.1)
                continue
            peer = address[0]
            if self.open >= self.limits.max_connections:
                self.stats["over-global-cap"] += 1
                self.rlog("cap", f"refused a connection from {peer}: {self.open} open, the cap (--max-connections)")
                _abort(sock)
                continue
            if self.per_peer.get(peer, 0) >= self.limits.max_per_peer:
                self.stats["over-peer-cap"] += 1
                self.rlog("peer-cap", f"refused a connection from {peer}: it holds {self.limits.max_per_peer}, the "
                                      "cap per address (--max-per-peer)")  # fmt: skip
                _abort(sock)
                continue
            self.stats["accepted"] += 1
            self.open += 1
            self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
            task = asyncio.ensure_future(self._connection(sock, peer))
            tasks.add(task)
            task.add_done_callback(lambda t, p=peer: self._closed(tasks, t, p))

    def _closed(self, tasks: set[asyncio.Task], task: asyncio.Task, peer: str) -> None:
        tasks.discard(task)
        self.open -= 1
        left = self.per_peer.get(peer, 1) - 1
        if left:
            self.per_peer[peer] = left
        else:
            self.per_peer.pop(peer, None)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.rlog("internal", f"connection from {peer} ended on {type(exc).__name__}: {exc}"[:300])

    # -- one connection ----------------------------------------------------------------------------
    async def _connection(self, sock: socket.socket, peer: str) -> None:
        assert self.loop is not None
        writer: asyncio.StreamWriter | None = None
        # one deadline from accept to the end of the first request's headers, TLS handshake included
        deadline = self.loop.time() + self.limits.header_timeout
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    if not await self._is_tls(sock, peer):
                        return
                    reader, writer = await self._start_tls(sock)
            except TimeoutError:
                self.stats["header-timeouts"] += 1
                self.rlog("timeout", f"closed a connection from {peer}: no TLS handshake within "
                                     f"{self.limits.header_timeout:g} s")  # fmt: skip
                return
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                self.rlog("tls", f"TLS handshake with {peer} failed: {reason} (does it trust this federation's CA?)")
                return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
            first = True
            while True:
                try:
                    await self._one_request(conn, reader, writer, peer, first, deadline)
                except _Gone:
                    return
                first = False
                # the next request on this connection: idle_timeout to start, header_timeout more to finish
                deadline = self.loop.time() + self.limits.idle_timeout + self.limits.header_timeout
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError):
            self.stats["hangups"] += 1  # the client hung up: nothing to log
        finally:
            if writer is not None:
                writer.transport.abort() if writer.transport.is_closing() else writer.close()
            else:
                with contextlib.suppress(OSError):
                    sock.close()

    async def _is_tls(self, sock: socket.socket, peer: str) -> bool:
        """Peek at the first byte: a TLS handshake record, or a plaintext client (one 400, closed)."""
        assert self.loop is not None
        readable = self.loop.create_future()
        self.loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            self.loop.remove_reader(sock.fileno())
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            first = b"\x16"  # spurious wake-up: let the TLS handshake read it
        if not first:
            return False
        if first[0] != 0x16:
            self.rlog("plaintext", f"refused a plaintext connection from {peer}: the Fleet API here is TLS-only")
            with contextlib.suppress(OSError):
                sock.send(PLAINTEXT_REPLY % (len(PLAINTEXT_TEXT), PLAINTEXT_TEXT))
            return False
        return True

    async def _start_tls(self, sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.loop is not None
        reader = asyncio.StreamReader(limit=CHUNK, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        transport, _ = await self.loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=self.server_context, ssl_handshake_timeout=self.limits.header_timeout
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, self.loop)

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(CHUNK)
            conn.receive_data(data)  # b"" means EOF: h11 then reports ConnectionClosed or raises

    async def _one_request(self, conn, reader, writer, peer: str, first: bool, deadline: float) -> None:
        limits = self.limits
        budget = limits.header_timeout + (0.0 if first else limits.idle_timeout)
        try:
            async with asyncio.timeout_at(deadline):
                event = await self._next_event(conn, reader)
        except TimeoutError:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0] and not first:
                raise _Gone from None  # an idle keep-alive connection, closed quietly
            self.stats["header-timeouts"] += 1
            self.rlog("timeout", f"closed a connection from {peer}: no complete request headers within {budget:g} s")
            await self._answer(conn, writer, 408, "request headers took too long", close=True)
            raise _Gone from None
        except h11.RemoteProtocolError as exc:
            if reader.at_eof():  # hung up half-way through the headers
                self.stats["hangups"] += 1
                raise _Gone from None
            self.stats["malformed"] += 1
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            self.rlog("malformed", f"refused a malformed request from {peer}: {status} {exc}"[:300])
            await self._answer(conn, writer, status, f"malformed request: {exc}", close=True)
            raise _Gone from None
        if isinstance(event, h11.ConnectionClosed):
            raise _Gone
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 yields a Request first
            raise _Gone
        target = event.target.decode("ascii", "replace")
        method = event.method.decode("ascii", "replace")
        try:
            length = self._check(event, target, method)
        except _Refuse as refusal:
            self.stats["too-large" if refusal.status == 413 else "refused"] += 1
            self.rlog(refusal.kind, f"refused {method[:20]} {target[:200]} from {peer}: {refusal.why}")
            await self._answer(conn, writer, refusal.status, refusal.why, close=True)
            raise _Gone from None
        await self._forward(conn, reader, writer, event, target, length, peer)

    def _check(self, request: h11.Request, target: str, method: str) -> int:
        """The request's body length, or the refusal (nothing has been read of the body yet)."""
        if request.http_version not in (b"1.1", b"1.0"):
            raise _Refuse(400, f"HTTP/{request.http_version.decode('ascii', 'replace')[:10]} is not served; the Fleet "
                               "API here is HTTP/1.1")  # fmt: skip
        head = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if head > self.limits.max_header_bytes:  # h11 checks this only for a head that arrives in pieces
            raise _Refuse(431, f"request line and headers of {head} bytes are above {self.limits.max_header_bytes}")
        if method != "POST" or target not in FLEET_PATHS:
            raise _Refuse(404, NOT_EXPOSED)
        if any(k == b"upgrade" for k, _ in request.headers):
            raise _Refuse(400, "protocol upgrades (h2c, websocket) are not served; the Fleet API is HTTP/1.1")
        lengths = [v for k, v in request.headers if k == b"content-length"]
        if any(k == b"transfer-encoding" for k, _ in request.headers) or not lengths:
            raise _Refuse(411, "send the body with Content-Length (chunked request bodies are not accepted)")
        length = int(lengths[0])  # h11 has checked it is digits, and that repeated values agree
        limit = self.limits.body_limit(target)
        if length > limit:
            raise _Refuse(413, f"request body of {length} bytes is above the {limit} bytes accepted for {target}",
                          kind="too-large")  # fmt: skip
        return length

    async def _answer(self, conn: h11.Connection, writer, status: int, why: str, close: bool) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"fedlinear Fleet front: {why}\n".encode()
        headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError, OSError):
            reason = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else ""
            writer.write(conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(5):
                await writer.drain()

    async def _forward(self, conn, reader, writer, request: h11.Request, target: str, length: int, peer: str) -> None:
        limits = self.limits
        headers = [(k, v) for k, v in request.headers if k.decode() not in HOP_BY_HOP]
        headers += [(b"host", b"%s:%d" % (self.backend[0].encode(), self.backend[1])),
                    (b"content-length", str(length).encode()), (b"connection", b"close")]  # fmt: skip
        public_key = next((v for k, v in headers if k == PUBLIC_KEY_HEADER), None)
        try:
            async with asyncio.timeout(limits.backend_timeout):
                await self.backend_slots.acquire()
        except TimeoutError:
            await self._answer(conn, writer, 503, "the SuperLink is busy", close=True)
            raise _Gone from None
        up_writer = None
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.backend, ssl=self.backend_context, limit=CHUNK), 30
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self.stats["backend-errors"] += 1
                self.rlog("backend", f"SuperLink unreachable for {target} from {peer}: {exc}")
                await self._answer(conn, writer, 503, "the SuperLink is unreachable", close=True)
                raise _Gone from None
            upstream = h11.Connection(h11.CLIENT)
            up_writer.write(upstream.send(h11.Request(method=b"POST", target=target, headers=headers)))
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            # the body, piece by piece, with back-pressure both ways, under one deadline
            try:
                async with asyncio.timeout(limits.body_timeout + length / limits.min_body_rate):
                    while True:
                        event = await self._next_event(conn, reader)
                        if isinstance(event, h11.Data):
                            up_writer.write(upstream.send(event))
                            await up_writer.drain()
                        elif isinstance(event, h11.EndOfMessage):
                            up_writer.write(upstream.send(h11.EndOfMessage()))
                            await up_writer.drain()
                            break
                        else:
                            raise _Gone
            except TimeoutError:
                self.stats["header-timeouts"] += 1
                self.rlog("timeout", f"closed a connection from {peer}: the {length}-byte body of {target} "
                                     "arrived too slowly")  # fmt: skip
                await self._answer(conn, writer, 408, "request body took too long", close=True)
                raise _Gone from None
            except h11.RemoteProtocolError as exc:
                if reader.at_eof():  # hung up half-way through the body
                    self.stats["hangups"] += 1
                    raise _Gone from None
                self.stats["malformed"] += 1
                self.rlog("malformed", f"refused a malformed request from {peer}: 400 {exc}"[:300])
                await self._answer(conn, writer, 400, f"malformed request: {exc}", close=True)
                raise _Gone from None
            # the answer, streamed back
            try:
                async with asyncio.timeout(limits.backend_timeout):
                    response = await self._next_event(upstream, up_reader)
                    if not isinstance(response, h11.Response):
                        raise h11.RemoteProtocolError("no response")
                    accepted = public_key is not None and 200 <= response.status_code < 300
                    if public_key is not None and target == ACTIVATE and response.status_code == 412:
                        # a valid signature (the SuperLink checks it first: 401 otherwise), refused
                        # activation: the node is online already, or its key was unregistered
                        self.nodes.refused_activation(public_key, peer)
                    answer = b""  # activate-node's answer names the node id (a few bytes of protobuf)
                    out = [(k, v) for k, v in response.headers if k.decode() not in HOP_BY_HOP or k == b"content-length"]
                    writer.write(conn.send(h11.Response(status_code=response.status_code, headers=out,
                                                        reason=response.reason)))  # fmt: skip
                    while True:
                        event = await self._next_event(upstream, up_reader)
                        if isinstance(event, h11.Data):
                            if accepted and target == ACTIVATE and len(answer) < 4 * KIB:
                                answer += bytes(event.data[: 4 * KIB])
                            writer.write(conn.send(event))
                            await writer.drain()
                        elif isinstance(event, h11.EndOfMessage):
                            writer.write(conn.send(h11.EndOfMessage()))
                            await writer.drain()
                            break
                        else:
                            raise h11.RemoteProtocolError("the SuperLink closed mid-answer")
                    if accepted:
                        self.nodes.accepted(public_key, peer, target, activated_node_id(answer) if answer else None)
            except (TimeoutError, h11.ProtocolError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
                if isinstance(exc, h11.LocalProtocolError):
                    raise _Gone from None
                self.stats["backend-errors"] += 1
                self.rlog("backend", f"SuperLink failed to answer {target} for {peer}: {type(exc).__name__} {exc}")
                await self._answer(conn, writer, 502, "the SuperLink did not answer", close=True)
                raise _Gone from None
            self.stats["forwarded"] += 1
        finally:
            self.backend_slots.release()
            if up_writer is not None:
                up_writer.transport.abort()


def _abort(sock: socket.socket) -> None:
    """Close at once with a reset, so the refused peer's slot costs nothing (no TIME_WAIT, no FIN wait)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


def key_names(directory: str | None) -> dict[str, str]:
    """Fingerprint -> party name for the ``NAME.pub`` files in a ``fedlinear certs`` directory."""
    from cryptography.hazmat.primitives import serialization

    names: dict[str, str] = {}
    if not directory or not os.path.isdir(directory):
        return names
    for entry in sorted(os.listdir(directory)):
        if entry.endswith(".pub"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                with open(os.path.join(directory, entry), "rb") as handle:
                    key = serialization.load_ssh_public_key(handle.read())
                names[openssh_fingerprint(key)] = entry[:-4]
    return names
