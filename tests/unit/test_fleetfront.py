"""The Fleet front under abuse, on loopback: malformed requests, slow clients, connection caps, body
limits (refused before the SuperLink sees a byte), rate-limited logs, node keys from new addresses.

The "SuperLink" here is a counting TLS server: it records every connection and byte it receives, so
"nothing reached the SuperLink" is checked where it matters.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import os
import socket
import ssl
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from fedlinear.scripts.deploy import pki
from fedlinear.scripts.deploy.fleetfront import (
    FLEET_PATHS,
    FleetFront,
    FrontLimits,
    RateLimitedLog,
    default_body_limits,
    key_names,
)
from fedlinear.scripts.local.flower import free_port


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("creds"))
    pki.make_credentials(out, ["10.9.0.1"], ["alice", "bob"])
    return out


class _Counting(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections = 0
    requests: list[tuple[str, int, str]] = []  # path, body length, sha256
    folded: list[str] = []

    def setup(self):
        type(self).connections += 1
        super().setup()

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("x-folded") is not None:
            type(self).folded.append(self.headers.get("x-folded"))
        type(self).requests.append((self.path, len(body), hashlib.sha256(body).hexdigest()))
        reply = hashlib.sha256(body).hexdigest().encode()
        status = 200
        if self.path == "/v1/fleet/activate-node":
            from flwr.proto.fleet_pb2 import ActivateNodeResponse

            reply = ActivateNodeResponse(node_id=4242).SerializeToString()
            if self.headers.get("x-test-online"):  # what Flower answers when the node is online already
                status, reply = 412, b'{"code": 2004, "message": "Failed to activate SuperNode."}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture(scope="module")
def backend(creds):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    server.handle_error = lambda request, address: None  # a request the front gave up on half-way is not news
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(creds, "server.crt"), os.path.join(creds, "server.key"))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def make_front(creds, backend, records=None, **limits):
    logs: list[str] = []
    front = FleetFront(
        ("127.0.0.1", free_port()), ("127.0.0.1", backend.server_address[1]),
        os.path.join(creds, "server.crt"), os.path.join(creds, "server.key"), os.path.join(creds, "ca.crt"),
        logs.append, limits=FrontLimits(**limits), key_names=key_names(creds), records=records,
    )  # fmt: skip
    front.start()
    return front, logs


@pytest.fixture
def front(creds, backend):
    server, logs = make_front(creds, backend, log_burst=1000)
    _Counting.connections = 0
    _Counting.requests.clear()
    yield server, logs
    server.stop()


def tls_socket(creds, port, source="127.0.0.1"):
    ctx = ssl.create_default_context(cafile=os.path.join(creds, "ca.crt"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def exchange(creds, port, raw: bytes) -> bytes:
    with tls_socket(creds, port) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := _recv(sock):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if sep and length and len(body) >= int(length[0]):
                break  # a whole answer on a connection kept alive
        return data


def _recv(sock) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionError, ssl.SSLError, TimeoutError):
        return b""


def refused_at_once(port, source="127.0.0.1") -> bool:
    """The front closes (resets) the connection without waiting for anything from us."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0)) as sock:
            return sock.recv(65536) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


TRICKS = [
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\nx",  # '²': isdigit() but not int()
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n\r\n",  # no length at all
    b"POST /v1/fleet/get-run HTTP/1.1\r\nContent-Length: 0\r\n\r\n",  # no Host
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nNoColon\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\nContent-Length: 0\r\n\r\n",  # 431
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/2.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/9.9\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run\r\n\r\n",  # HTTP/0.9
    b"POST  /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1 extra\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"P\x00ST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"post /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT 127.0.0.1:9093 HTTP/1.1\r\nHost: 127.0.0.1:9093\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST https://127.0.0.1:9093/v1/control/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST https://x/v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST //v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run;x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run%00 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/%67et-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/./get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/..%2fcontrol/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run\xc3\xa9 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n\r\n",  # 50 MiB: 413
    b"\x00\x01\x02\x03 garbage\r\n\r\n",
]


def test_every_malformed_request_gets_a_4xx_and_one_log_line(front, creds, capfd):
    server, logs = front
    port = server.server_address[1]
    for raw in TRICKS:
        before, started = len(logs), time.monotonic()
        reply = exchange(creds, port, raw)
        print(f"{time.monotonic() - started:.2f}s {raw[:60]!r} -> {reply[:40]!r}")
        status = reply.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 4"), (raw[:80], reply[:200])
        assert len(logs) - before == 1, (raw[:80], logs[before:])
    assert _Counting.connections == 0 and _Counting.requests == []  # none reached the SuperLink
    assert "Traceback" not in "".join(capfd.readouterr())
    # the '²' case is named for what it is
    assert any("malformed request" in line and "Content-Length" in line.replace("content-length", "Content-Length")
               for line in logs[:1])  # fmt: skip
    assert any("above the" in line and "/v1/fleet/push-object" in line for line in logs)


def test_an_obs_folded_header_reaches_the_superlink_on_one_line(front, creds):
    server, _ = front
    _Counting.folded.clear()
    reply = exchange(creds, server.server_address[1], b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n"
                     b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n")  # fmt: skip
    assert reply.startswith(b"HTTP/1.1 200")
    assert _Counting.folded == ["a b"]  # joined by h11, re-serialised on one line: nothing to read differently


def test_a_large_body_is_refused_before_the_superlink_sees_a_byte(front, creds):
    server, logs = front
    port = server.server_address[1]
    with tls_socket(creds, port) as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (50 * 1024 * 1024))
        sent = 0
        try:  # a client that keeps sending after the refusal only fills its own buffers
            while sent < 50 * 1024 * 1024:
                sock.sendall(b"\0" * 65536)
                sent += 65536
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        reply = _recv(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert _Counting.connections == 0 and _Counting.requests == []
    assert server.stats["too-large"] == 1


def test_bodies_under_the_limit_are_streamed_through_intact(front, creds):
    server, _ = front
    conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], timeout=60,
                                       context=ssl.create_default_context(cafile=os.path.join(creds, "ca.crt")))  # fmt: skip
    body = os.urandom(default_body_limits()["/v1/fleet/push-object"] - 4096)  # a full Flower chunk and more
    conn.request("POST", "/v1/fleet/push-object", body=body)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read().decode() == hashlib.sha256(body).hexdigest()
    for path in sorted(FLEET_PATHS):  # and the same kept-alive connection carries on
        conn.request("POST", path, body=b"small")
        answer = conn.getresponse().read()
        assert path.endswith("activate-node") or answer.decode() == hashlib.sha256(b"small").hexdigest()
    conn.close()
    assert _Counting.requests[0][:2] == ("/v1/fleet/push-object", len(body))


def test_body_limits_are_per_path_and_configurable(creds, backend):
    limits = default_body_limits(max_object=1000)
    server, logs = make_front(creds, backend, body_limits=limits)
    try:
        port = server.server_address[1]
        reply = exchange(creds, port, b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 413")
        reply = exchange(creds, port, b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 413")  # 64 KiB for the calls that carry only ids
        reply = exchange(creds, port, b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                         + b"a" * 1000)  # fmt: skip
        assert reply.startswith(b"HTTP/1.1 200")
    finally:
        server.stop()


def test_a_slow_header_trickle_is_cut_off_after_a_total_deadline(creds, backend):
    # 5 s: room for the TLS handshake on a loaded machine, and far below the 30 s this test waits
    server, logs = make_front(creds, backend, header_timeout=5.0)
    try:
        with tls_socket(creds, server.server_address[1]) as sock:
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\n")
            sock.settimeout(0.2)
            # one header line every 0.2 s: a per-read timeout would never fire; the total deadline does
            closed, deadline = False, time.monotonic() + 30
            while not closed and time.monotonic() < deadline:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except (ConnectionError, ssl.SSLError):
                    closed = True
                    break
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except (ConnectionError, ssl.SSLError):
                    closed = True
                    break
                if data.startswith(b"HTTP/1.1 408") or data == b"":
                    closed = True
            assert closed, "the front kept a trickling connection open for 30 s"
        assert server.stats["header-timeouts"] == 1
        assert any("no complete request headers within 5 s" in line for line in logs)
    finally:
        server.stop()


def test_a_silent_connection_is_cut_off_before_the_tls_handshake(creds, backend):
    server, logs = make_front(creds, backend, header_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
            assert sock.recv(10) == b""  # closed by the front, not by our 30 s timeout
        assert any("no TLS handshake within 1 s" in line for line in logs)
    finally:
        server.stop()


def test_connections_are_capped_per_peer_and_in_all(creds, backend):
    server, logs = make_front(creds, backend, max_per_peer=3, max_connections=5, header_timeout=60.0)
    port = server.server_address[1]
    held = []
    try:
        held = [tls_socket(creds, port) for _ in range(3)]
        assert refused_at_once(port)  # the 4th from 127.0.0.1: reset at once
        assert server.stats["over-peer-cap"] == 1
        # another address is still served, up to the global cap
        held += [tls_socket(creds, port, source="127.0.0.2") for _ in range(2)]
        assert refused_at_once(port, source="127.0.0.3")
        assert server.stats["over-global-cap"] == 1
        for sock in held:
            sock.close()
        held = []
        deadline = time.monotonic() + 30
        while server.open and time.monotonic() < deadline:
            time.sleep(0.05)
        reply = exchange(creds, port, b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")  # slots are given back
        assert any("the cap per address" in line for line in logs)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_clients_that_hang_up_leave_no_traceback(front, creds, capfd):
    server, logs = front
    port = server.server_address[1]
    with tls_socket(creds, port) as sock:
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n")  # half the headers
    with tls_socket(creds, port) as sock:
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")  # half a body
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05")  # half a TLS hello
    with socket.create_connection(("127.0.0.1", port), timeout=20):
        pass  # nothing at all
    deadline = time.monotonic() + 30
    while server.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open == 0
    reply = exchange(creds, port, b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert "Traceback" not in "".join(capfd.readouterr())
    assert not any("Traceback" in line for line in logs)


def test_log_lines_are_rate_limited_with_a_summary():
    lines: list[str] = []
    log = RateLimitedLog(lines.append, burst=5, rate=0.0)
    for i in range(100):
        log("malformed", f"refused a malformed request {i}")
    log("tls", "another kind is counted apart")
    assert len(lines) == 6
    log.flush()
    assert lines[-1] == "(suppressed 95 similar lines: malformed)"


def test_a_flood_of_malformed_requests_logs_a_bounded_number_of_lines(creds, backend):
    server, logs = make_front(creds, backend, log_burst=5, log_rate=0.0001)
    try:
        for _ in range(40):
            exchange(creds, server.server_address[1], b"POST /v1/control/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    finally:
        server.stop()  # flushes the summary
    assert len(logs) == 6 and logs[-1] == "(suppressed 35 similar lines: refused)"


def _signed_post(creds, port, name, source, path="/v1/fleet/send-node-heartbeat", extra=b""):
    with open(os.path.join(creds, f"{name}.pub"), "rb") as handle:
        key = serialization.load_ssh_public_key(handle.read())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with tls_socket(creds, port, source=source) as sock:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nflwr-public-key: "
                     + base64.b64encode(pem) + b"\r\n" + extra + b"Content-Length: 0\r\n\r\n")  # fmt: skip
        return _recv(sock)


def test_a_node_key_from_a_new_address_is_logged_and_recorded(creds, backend, tmp_path):
    import json
    import subprocess

    records = str(tmp_path / "node-addresses.jsonl")
    server, logs = make_front(creds, backend, records=records)
    try:
        port = server.server_address[1]
        assert _signed_post(creds, port, "alice", "127.0.0.1").startswith(b"HTTP/1.1 200")
        assert _signed_post(creds, port, "alice", "127.0.0.1").startswith(b"HTTP/1.1 200")
        assert _signed_post(creds, port, "bob", "127.0.0.1").startswith(b"HTTP/1.1 200")
        assert _signed_post(creds, port, "alice", "127.0.0.1", "/v1/fleet/activate-node").startswith(b"HTTP/1.1 200")
        assert _signed_post(creds, port, "alice", "127.0.0.9", "/v1/fleet/activate-node").startswith(b"HTTP/1.1 200")
        # the real alice comes back while the copy holds the node online
        reply = _signed_post(creds, port, "alice", "127.0.0.1", "/v1/fleet/activate-node", b"x-test-online: 1\r\n")
        assert reply.startswith(b"HTTP/1.1 412")
    finally:
        server.stop()
    fingerprint = next(line.split()[2] for line in logs if "(alice) accepted from 127.0.0.1" in line)
    assert any(line.endswith("(alice) is node 4242, activated from 127.0.0.1") for line in logs)  # its node id, once known
    moved = [line for line in logs if "came back from a new address" in line]
    assert len(moved) == 1 and "(alice, node 4242)" in moved[0] and "127.0.0.9" in moved[0] and "127.0.0.1" in moved[0]
    entries = [json.loads(line) for line in open(records)]
    assert [(e["event"], e["name"], e["address"]) for e in entries] == [
        ("first-seen", "alice", "127.0.0.1"), ("first-seen", "bob", "127.0.0.1"), ("new-address", "alice", "127.0.0.9"),
        ("refused-activation", "alice", "127.0.0.1"),
    ]  # fmt: skip
    refused = [line for line in logs if "was refused activation from 127.0.0.1" in line]
    assert len(refused) == 1 and "(alice, node 4242)" in refused[0] and "last accepted from 127.0.0.9" in refused[0]
    # the fingerprint is the one ssh-keygen prints for alice.pub, so an operator can match it by hand
    keygen = subprocess.run(["ssh-keygen", "-lf", os.path.join(creds, "alice.pub")], capture_output=True, text=True)
    if keygen.returncode == 0:
        assert keygen.stdout.split()[1] == fingerprint


def test_certs_rotate_replaces_a_party_key_and_keeps_the_old_one(tmp_path, capsys):
    from fedlinear.scripts import cli

    out = tmp_path / "c"
    pki.make_credentials(str(out), [], ["alice", "bob"])
    old_pub = (out / "alice.pub").read_bytes()
    old_fp = pki.public_key_fingerprint(str(out / "alice.pub"))
    assert cli.main(["certs", "--out", str(out), "--rotate", "alice"]) == 0
    printed = capsys.readouterr().out
    revoked = sorted(p.name for p in out.glob("alice.revoked-*"))
    assert len(revoked) == 2 and (out / revoked[1]).read_bytes() == old_pub
    new_fp = pki.public_key_fingerprint(str(out / "alice.pub"))
    assert new_fp != old_fp and old_fp in printed and new_fp in printed
    assert "flwr supernode unregister" in printed and f"flwr supernode register {out}/alice.pub" in printed
    assert oct((out / "alice.key").stat().st_mode & 0o777) == "0o600"
    # the new key is one Flower accepts, and the front names both (the old one as revoked)
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    load_ssh_private_key((out / "alice.key").read_bytes(), None)
    names = key_names(str(out))
    assert names[new_fp] == "alice" and names[old_fp].startswith("alice.revoked-")
    assert cli.main(["certs", "--out", str(out), "--rotate", "carol"]) != 0
    assert "no such file" in capsys.readouterr().err


def test_body_limits_fit_real_fleet_messages_of_any_model_size():
    from fedlinear.scripts.deploy.fleetsizes import request_sizes

    limits = default_body_limits()
    for features in (10, 2_000_000):  # one array chunk, and a 16 MB kernel split into four
        sizes = request_sizes(features)
        assert sizes["largest-push-object"] <= limits["/v1/fleet/push-object"]
        assert sizes["object-tree"] * 100 < limits["/v1/fleet/push-messages"]
    assert sizes["objects"] > 4 and sizes["all-push-objects"] > limits["/v1/fleet/push-object"]  # chunked, not one body
    assert 50 * 1024 * 1024 > limits["/v1/fleet/push-object"]


def test_superlink_refuses_a_bad_front_limit_before_starting_anything(creds, capsys, tmp_path):
    from fedlinear.scripts import cli

    code = cli.main(["superlink", "--certs", creds, "--host", "127.0.0.1", "--port", str(free_port()),
                     "--control-port", str(free_port()), "--max-per-peer", "0", "--workdir", str(tmp_path / "w")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "--max-per-peer must be positive, got 0" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()
