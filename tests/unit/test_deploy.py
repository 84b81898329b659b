"""Credentials, preflight checks and the Fleet front (no network namespaces needed; loopback only)."""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import socket
import ssl
import stat
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fedlinear.scripts import cli
from fedlinear.scripts.deploy import pki, preflight
from fedlinear.scripts.deploy.fleetfront import FLEET_PATHS, FleetFront
from fedlinear.scripts.deploy.node import explain_supernode_failure
from fedlinear.scripts.local.flower import free_port


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("creds"))
    pki.make_credentials(out, ["10.9.0.1", "superlink.example.test"], ["alice", "bob"])
    return out


# ----------------------------------------------------------------------------------------------
# fedlinear certs
# ----------------------------------------------------------------------------------------------


def test_certs_writes_ca_server_cert_and_party_keys(tmp_path, capsys):
    out = tmp_path / "c"
    code, stdout, _ = run(capsys, "certs", "--out", out, "--address", "0.0.0.0:9092".replace("0.0.0.0", "192.0.2.7"),
                          "--address", "link.example.test", "--party", "p0", "--party", "p1")  # fmt: skip
    assert code == 0, stdout
    names = sorted(os.listdir(out))
    assert names == ["ca.crt", "ca.key", "p0.key", "p0.pub", "p1.key", "p1.pub", "server.crt", "server.key"]
    for name in names:
        mode = stat.S_IMODE(os.stat(out / name).st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    dns, ips = pki.cert_sans(cert)
    assert dns == ["link.example.test"] and ips == ["192.0.2.7", "127.0.0.1"]  # IP SANs for IPs, loopback always
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert preflight.check_certificate(str(out / "server.crt"), str(out / "ca.crt"), ["192.0.2.7", "127.0.0.1"]) == []


def test_party_keys_are_what_flower_itself_accepts(creds):
    """Flower 1.42's own loaders: flower-supernode's private key check and `flwr supernode register`'s."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    with open(os.path.join(creds, "alice.key"), "rb") as handle:
        private = serialization.load_ssh_private_key(handle.read(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(private.public_key())
    registered = try_load_public_key(__import__("pathlib").Path(creds, "alice.pub"))
    assert registered == public_key_to_bytes(private.public_key())
    assert preflight.check_node_key(os.path.join(creds, "alice.key")) == []
    assert preflight.check_public_key(os.path.join(creds, "alice.pub")) == []


def test_certs_never_overwrite(creds, capsys):
    before = open(os.path.join(creds, "alice.key"), "rb").read()
    code, _, err = run(capsys, "certs", "--out", creds, "--party", "alice")
    assert code == 1
    assert err.strip().splitlines() == [
        f"fedlinear: error: {creds}/alice.key already exists; refusing to overwrite it (move it away or use another --out)"
    ]
    assert open(os.path.join(creds, "alice.key"), "rb").read() == before
    code, _, err = run(capsys, "certs", "--out", creds, "--address", "10.9.0.1")  # server.crt exists
    assert code == 1 and "server.crt already exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "certs", "--out", creds)
    assert code == 1 and "ca.crt already exists" in err


def test_certs_add_a_party_to_an_existing_ca(creds, capsys):
    code, out, _ = run(capsys, "certs", "--out", creds, "--party", "carol")
    assert code == 0 and f"using the existing CA {creds}/ca.crt" in out
    assert preflight.check_node_key(os.path.join(creds, "carol.key")) == []


def test_certs_refuse_the_wildcard_address_and_bad_names(tmp_path, capsys):
    code, _, err = run(capsys, "certs", "--out", tmp_path / "x", "--address", "0.0.0.0")
    assert code == 1 and "wildcard bind address" in err
    code, _, err = run(capsys, "certs", "--out", tmp_path / "y", "--party", "../evil")
    assert code == 1 and "--party '../evil'" in err
    assert not os.path.exists(tmp_path / "y" / "ca.crt")  # nothing written when an argument is bad


# ----------------------------------------------------------------------------------------------
# preflight, one line per problem, naming the file
# ----------------------------------------------------------------------------------------------


def test_preflight_san_not_covering_the_dial_address(creds):
    crt, ca = os.path.join(creds, "server.crt"), os.path.join(creds, "ca.crt")
    assert preflight.check_certificate(crt, ca, ["10.9.0.1", "superlink.example.test", "127.0.0.1"]) == []
    [problem] = preflight.check_certificate(crt, ca, ["10.9.0.2"])
    assert problem.startswith(f"{crt}: certificate does not cover '10.9.0.2' (needs an IP SAN;")
    [problem] = preflight.check_certificate(crt, ca, ["other.example.test"])
    assert "does not cover 'other.example.test' (needs a DNS SAN" in problem


def test_preflight_san_via_the_cli(creds, capsys):
    code, _, err = run(capsys, "preflight", "--ca", f"{creds}/ca.crt", "--cert", f"{creds}/server.crt",
                       "--address", "10.9.0.3:9092", "--address", "nope.example.test")  # fmt: skip
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"fedlinear: error: {creds}/server.crt: ") for line in lines)
    code, out, _ = run(capsys, "preflight", "--ca", f"{creds}/ca.crt", "--cert", f"{creds}/server.crt",
                       "--server-key", f"{creds}/server.key", "--address", "10.9.0.1:9092")  # fmt: skip
    assert code == 0 and "ok: server certificate" in out


def _other_ca_cert(tmp_path, **kw):
    ca_key, ca_cert = pki.make_ca("another CA")
    key, cert = pki.make_server_cert(ca_key, ca_cert, ["127.0.0.1"], **kw)
    path = tmp_path / "other.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path), ca_key, ca_cert


def test_preflight_certificate_from_another_ca(creds, tmp_path):
    other, _, _ = _other_ca_cert(tmp_path)
    [problem] = preflight.check_certificate(other, os.path.join(creds, "ca.crt"))
    assert problem.startswith(f"{other}: certificate is not signed by the CA in {creds}/ca.crt")


def test_preflight_expired_and_not_yet_valid(creds, tmp_path):
    ca_key = pki.load_private_key_pem(os.path.join(creds, "ca.key"))
    ca_cert = pki.load_cert(os.path.join(creds, "ca.crt"))
    old = pki.utcnow() - datetime.timedelta(days=30)
    _, cert = pki.make_server_cert(ca_key, ca_cert, ["127.0.0.1"], days=1, not_before=old)
    path = tmp_path / "expired.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    [problem] = preflight.check_certificate(str(path), os.path.join(creds, "ca.crt"), ["127.0.0.1"])
    assert problem.startswith(f"{path}: certificate expired on ")
    future = pki.utcnow() + datetime.timedelta(days=3)
    _, cert = pki.make_server_cert(ca_key, ca_cert, ["127.0.0.1"], not_before=future)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    [problem] = preflight.check_certificate(str(path), os.path.join(creds, "ca.crt"))
    assert problem.startswith(f"{path}: certificate is not valid before ") and "clock" in problem


def test_preflight_ca_that_is_not_a_ca_and_key_that_does_not_match(creds):
    [problem] = preflight.check_ca(os.path.join(creds, "server.crt"))
    assert problem.startswith(f"{creds}/server.crt: not a CA certificate")
    [problem] = preflight.check_server_key(os.path.join(creds, "server.crt"), os.path.join(creds, "ca.key"))
    assert problem == f"{creds}/ca.key: does not belong to the certificate {creds}/server.crt"


def _write(path, data, mode=0o600):
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_preflight_key_formats(tmp_path, creds):
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_path = _write(tmp_path / "ed.key", ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))  # fmt: skip
    [problem] = preflight.check_node_key(ed_path)
    assert problem.startswith(f"{ed_path}: is an Ed25519 key; Flower refuses it")
    ec_key = ec.generate_private_key(ec.SECP384R1())
    pem_path = _write(tmp_path / "pem.key", ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    [problem] = preflight.check_node_key(pem_path)
    assert problem.startswith(f"{pem_path}: is a PEM EC (secp384r1) key, not OpenSSH format; Flower refuses it")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_path = _write(tmp_path / "rsa.key", rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))  # fmt: skip
    [problem] = preflight.check_node_key(rsa_path)
    assert problem.startswith(f"{rsa_path}: is a RSA key;") or problem.startswith(f"{rsa_path}: is a ")
    [problem] = preflight.check_node_key(os.path.join(creds, "alice.pub"))
    assert "is a public key; give the private key" in problem
    ed_pub = _write(tmp_path / "ed.pub", ed.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH), 0o644)  # fmt: skip
    [problem] = preflight.check_public_key(ed_pub)
    assert problem.startswith(f"{ed_pub}: is a Ed25519 key;")
    loose = _write(tmp_path / "loose.key", open(os.path.join(creds, "alice.key"), "rb").read(), 0o644)
    [problem] = preflight.check_node_key(loose)
    assert problem == f"{loose}: private key is accessible to other users (mode 0644); run 'chmod 600 {loose}'"


def test_preflight_key_format_via_the_cli(tmp_path, capsys):
    ed = ed25519.Ed25519PrivateKey.generate()
    path = _write(tmp_path / "ed.key", ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))  # fmt: skip
    code, _, err = run(capsys, "preflight", "--node-key", path)
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith(f"fedlinear: error: {path}: is an Ed25519 key")


def test_preflight_flower_connection_file(tmp_path, creds):
    conf = tmp_path / "config.toml"
    conf.write_text(
        '[superlink]\ndefault = "remote"\n\n[superlink.remote]\naddress = "10.9.0.1:9093"\nroot-certificates = "ca.crt"\n\n'
        f'[superlink.good]\naddress = "127.0.0.1:9093"\nroot-certificates = "{creds}/ca.crt"\n\n'
        f'[superlink.gone]\naddress = "127.0.0.1:9093"\nroot-certificates = "{tmp_path}/missing.crt"\n'
    )
    problems = preflight.check_flwr_config(str(conf))
    assert len(problems) == 2
    assert problems[0].startswith(f"{conf}: [superlink.remote] root-certificates = 'ca.crt' is a relative path;")
    assert problems[1] == f"{conf}: [superlink.gone]: {tmp_path}/missing.crt: no such file"
    conf.write_text("[superlink\n")
    [problem] = preflight.check_flwr_config(str(conf))
    assert problem.startswith(f"{conf}: not valid TOML")


# ----------------------------------------------------------------------------------------------
# the Fleet front, on loopback, in front of a stand-in SuperLink
# ----------------------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def log_message(self, *args):
        pass

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append(self.path)
        reply = json.dumps({"path": self.path, "body": body.decode(), "sig": self.headers.get("x-test-sig")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_POST = do_GET = _answer


@pytest.fixture(scope="module")
def front(creds):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(creds, "server.crt"), os.path.join(creds, "server.key"))
    backend.socket = ctx.wrap_socket(backend.socket, server_side=True)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    logs: list[str] = []
    server = FleetFront(
        ("127.0.0.1", free_port()), ("127.0.0.1", backend.server_address[1]),
        os.path.join(creds, "server.crt"), os.path.join(creds, "server.key"), os.path.join(creds, "ca.crt"), logs.append,
    )  # fmt: skip
    server.start()
    yield server, logs
    server.stop()
    backend.shutdown()
    backend.server_close()


def _client(creds, port):
    ctx = ssl.create_default_context(cafile=os.path.join(creds, "ca.crt"))
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)


def test_front_forwards_exactly_the_fleet_api(front, creds):
    server, logs = front
    port = server.server_address[1]
    _Recorder.seen.clear()
    conn = _client(creds, port)
    for path in sorted(FLEET_PATHS):  # one kept-alive connection for all of them
        conn.request("POST", path, body=b"payload", headers={"x-test-sig": "signed"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read()) == {"path": path, "body": "payload", "sig": "signed"}
    refused = [
        ("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/pull-messages"), ("GET", "/health"), ("GET", "/v1/fleet/get-run"),
        ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet/get-run?x=1"), ("POST", "/V1/FLEET/GET-RUN"),
    ]  # fmt: skip
    for method, path in refused:
        conn = _client(creds, port)
        conn.request(method, path, body=b"x" if method == "POST" else None)
        resp = conn.getresponse()
        assert resp.status == 404, (method, path)
        assert b"only the Fleet API" in resp.read()
        conn.close()
    assert _Recorder.seen == sorted(FLEET_PATHS)  # nothing refused ever reached the SuperLink
    assert any("refused POST /v1/control/start-run from 127.0.0.1" in line for line in logs)


def test_front_paths_are_flowers_fleet_routes():
    from flwr.superlink.routers.fleet.router import router

    assert {route.path for route in router.routes} == set(FLEET_PATHS)
    assert all(route.methods == {"POST"} for route in router.routes)


def test_front_answers_plaintext_with_one_clear_400(front):
    server, logs = front
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
        sock.sendall(b"POST /v1/fleet/register-node HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request") and b"TLS only" in reply
    assert any("refused a plaintext connection from 127.0.0.1" in line for line in logs)


def test_probe_tls_names_each_refusal(front, creds, tmp_path):
    server, logs = front
    port = server.server_address[1]
    preflight.probe_tls(f"127.0.0.1:{port}", os.path.join(creds, "ca.crt"))  # the happy path
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(pki.make_ca("someone else")[1].public_bytes(serialization.Encoding.PEM))
    with pytest.raises(pki.FedLinearError, match=r"is not signed by the CA in .*other-ca.crt"):
        preflight.probe_tls(f"127.0.0.1:{port}", str(other_ca))
    deadline = time.monotonic() + 10  # the front logs from its own thread
    while not any("TLS handshake with 127.0.0.1 failed" in line for line in logs) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any("TLS handshake with 127.0.0.1 failed" in line for line in logs)
    with pytest.raises(pki.FedLinearError, match=r"does not cover 'localhost'"):
        preflight.probe_tls(f"localhost:{port}", os.path.join(creds, "ca.crt"))
    with pytest.raises(pki.FedLinearError, match=r"connection refused"):
        preflight.probe_tls(f"127.0.0.1:{free_port()}", os.path.join(creds, "ca.crt"))
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        with pytest.raises(pki.FedLinearError, match=r"does not speak TLS"):
            preflight.probe_tls(f"127.0.0.1:{plain.server_address[1]}", os.path.join(creds, "ca.crt"))
    finally:
        plain.shutdown()
        plain.server_close()


# ----------------------------------------------------------------------------------------------
# fedlinear superlink / node: what they refuse before starting anything
# ----------------------------------------------------------------------------------------------


def test_superlink_refuses_a_certificate_without_loopback(tmp_path, creds, capsys):
    ca_key = pki.load_private_key_pem(os.path.join(creds, "ca.key"))
    ca_cert = pki.load_cert(os.path.join(creds, "ca.crt"))
    key = ec.generate_private_key(ec.SECP256R1())
    now = pki.utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no loopback")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("only.example.test")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write(tmp_path / "server.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    (tmp_path / "ca.crt").write_bytes(open(os.path.join(creds, "ca.crt"), "rb").read())
    code, _, err = run(capsys, "superlink", "--certs", tmp_path, "--port", free_port(), "--control-port", free_port(),
                       "--workdir", tmp_path / "w")  # fmt: skip
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith(f"fedlinear: error: {tmp_path}/server.crt: server certificate does not cover '127.0.0.1'")
    assert not os.path.exists(tmp_path / "w")  # nothing started


def test_node_refuses_a_wrong_key_before_starting_flower(tmp_path, creds, capsys):
    ed = ed25519.Ed25519PrivateKey.generate()
    path = _write(tmp_path / "ed.key", ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))  # fmt: skip
    code, _, err = run(capsys, "node", "--superlink", f"127.0.0.1:{free_port()}", "--ca", f"{creds}/ca.crt",
                       "--key", path, "--data-uri", tmp_path, "--workdir", tmp_path / "w")  # fmt: skip
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith(f"fedlinear: error: {path}: is an Ed25519 key; Flower refuses it")


# What flower-supernode 1.42 printed in each refusal (taken from real runs), and what `fedlinear node` says.
SUPERNODE_OUTPUTS = {
    "unregistered": "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
    "[code: 2004] Failed to activate SuperNode.\nThe SuperNode could not establish a connection to the SuperLink.\n"
    "WARNING :   Connection attempt failed, retrying in 0.59 seconds",
    "no key": "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI.",
    "other CA": "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate",
    "plaintext": "Client error '400 Bad Request' for url 'http://10.0.0.1:9092/v1/fleet/register-node'",
    "gave up": "WARNING :   Giving up reconnection after 12.00 seconds and 3 tries.",
}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unregistered", "refused this node's key /k/p.key: it is not registered there (on the server: flwr supernode register /k/p.pub)"),
        ("no key", "requires a registered key"),
        ("other CA", "its certificate is not signed by /k/ca.crt"),
        ("plaintext", "a plaintext connection to a TLS-only Fleet API"),
        ("gave up", "gave up connecting to h:1 after --max-retries 2"),
    ],
)  # fmt: skip
def test_supernode_refusals_are_explained(case, expected):
    message = explain_supernode_failure(
        SUPERNODE_OUTPUTS[case], superlink="h:1", key="/k/p.key", pub="/k/p.pub", ca="/k/ca.crt", retries=2
    )
    assert message is not None and expected in message
