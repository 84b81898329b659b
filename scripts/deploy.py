"""Multi-machine federations: ``fedlinear certs``, ``preflight``, ``superlink`` and ``node`` (see docs/deploy.md).

    fedlinear certs     --out DIR [--address HOST_OR_IP ...] [--party NAME ...] [--days N]
    fedlinear preflight [--ca CA.crt] [--cert SERVER.crt [--server-key KEY]] [--address HOST ...]
                        [--node-key NAME.key ...] [--public-key NAME.pub ...] [--flwr-config FILE]
                        [--superlink HOST:PORT] [--probe]
    fedlinear superlink --certs DIR [--host 0.0.0.0] [--port 9092] [--control-port 9093] [--address ...]
    fedlinear node      --superlink HOST:PORT --ca ca.crt --key NAME.key --data-uri URI [--max-retries N]

These wrap stock Flower 1.42 (``flower-superlink``, ``flower-supernode``); ``flwr run`` and
``flwr supernode register/list`` are used as they are, against the SuperLink's loopback address.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts import pki, preflight

DEFAULT_FLEET_PORT = 9092
DEFAULT_CONTROL_PORT = 9093


def fail(problems: list[str]) -> None:
    """Print every problem but the last as an error line, raise the last (the CLI prints it)."""
    if not problems:
        return
    for line in problems[:-1]:
        print(f"fedlinear: error: {line}", file=sys.stderr)
    raise FedLinearError(problems[-1])


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# ----------------------------------------------------------------------------------------------
# certs, preflight
# ----------------------------------------------------------------------------------------------


def cmd_certs(args: argparse.Namespace) -> int:
    if not args.address and not args.party and os.path.exists(os.path.join(_abs(args.out), pki.CA_CERT)):
        raise FedLinearError(
            f"{os.path.join(_abs(args.out), pki.CA_CERT)} already exists; refusing to overwrite it "
            "(give --address or --party to add to this CA)"
        )
    for line in pki.make_credentials(_abs(args.out), args.address or [], args.party or [], days=args.days):
        print(line)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    problems: list[str] = []
    checked: list[str] = []
    ca = _abs(args.ca) if args.ca else None
    if ca:
        problems += preflight.check_ca(ca)
        checked.append(f"CA {ca}")
    if args.cert:
        cert = _abs(args.cert)
        hosts = [pki.split_host(a) for a in (args.address or [])]
        problems += preflight.check_certificate(cert, ca, hosts, what="server certificate")
        if args.server_key:
            problems += preflight.check_server_key(cert, _abs(args.server_key))
        checked.append(f"server certificate {cert}" + (f" for {', '.join(hosts)}" if hosts else ""))
    for key in args.node_key or []:
        problems += preflight.check_node_key(_abs(key))
        checked.append(f"SuperNode key {_abs(key)}")
    for pub in args.public_key or []:
        problems += preflight.check_public_key(_abs(pub))
        checked.append(f"public key {_abs(pub)}")
    if args.flwr_config:
        problems += preflight.check_flwr_config(_abs(args.flwr_config), probe=args.probe)
        checked.append(f"Flower connections in {_abs(args.flwr_config)}")
    if args.superlink:
        try:
            preflight.probe_tls(args.superlink, ca, timeout=args.timeout)
        except FedLinearError as exc:
            problems.append(str(exc))
        checked.append(f"TLS handshake with {args.superlink}")
    if not checked:
        raise FedLinearError("nothing to check: give --ca, --cert, --node-key, --public-key, --flwr-config or --superlink")
    fail(problems)
    for line in checked:
        print(f"ok: {line}")
    return 0


# ----------------------------------------------------------------------------------------------
# superlink
# ----------------------------------------------------------------------------------------------


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_healthy_tls(port: int, cafile: str, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    """Poll the SuperLink's /health over TLS on loopback (bounded); fail fast if it exits."""
    from fedlinear.scripts.local.flower import tail

    ctx = ssl.create_default_context(cafile=cafile)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedLinearError(
                f"flower-superlink exited with code {proc.returncode} during start-up; log {log_path}:\n{tail(log_path)}"
            )
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=ctx) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise FedLinearError(f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:g} s; log {log_path}")


def connection_toml(name: str, port: int, ca: str) -> str:
    return f'[superlink.{name}]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'


def _cert_files(args: argparse.Namespace) -> tuple[str, str, str]:
    certs = _abs(args.certs) if args.certs else None
    ca = _abs(args.ca) if args.ca else (os.path.join(certs, pki.CA_CERT) if certs else None)
    cert = _abs(args.cert) if args.cert else (os.path.join(certs, pki.SERVER_CERT) if certs else None)
    key = _abs(args.key) if args.key else (os.path.join(certs, pki.SERVER_KEY) if certs else None)
    if not (ca and cert and key):
        raise FedLinearError("give --certs DIR (ca.crt, server.crt, server.key) or all of --ca, --cert, --key")
    return ca, cert, key


class _Stop(Exception):
    pass


def cmd_superlink(args: argparse.Namespace) -> int:
    from fedlinear.scripts.fleetfront import FleetFront
    from fedlinear.scripts.local.flower import flower_env
    from fedlinear.scripts.local.processes import ProcessGroup

    ca, cert, key = _cert_files(args)
    host = args.host
    bind_ip = pki.as_ip(host)
    hosts = ["127.0.0.1"] + [pki.split_host(a) for a in args.address or []]
    if bind_ip is not None and not bind_ip.is_unspecified and host not in hosts:
        hosts.append(host)
    problems = preflight.check_ca(ca)
    problems += preflight.check_certificate(cert, ca, hosts, what="server certificate")
    problems += preflight.check_server_key(cert, key)
    if args.port == args.control_port:
        problems.append(f"--port and --control-port are both {args.port}; the Fleet front needs a port of its own")
    if not port_free(host, args.port):
        problems.append(f"{host}:{args.port} is in use (--port)")
    if not port_free("127.0.0.1", args.control_port):
        problems.append(f"127.0.0.1:{args.control_port} is in use (--control-port)")
    fail(problems)

    workdir = _abs(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "superlink.log")
    env = flower_env(os.path.join(workdir, "flwr-home"))
    argv = [
        "flower-superlink", "--host", "127.0.0.1", "--port", str(args.control_port),
        "--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key,
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if args.database:
        argv += ["--database", _abs(args.database)]
    group = ProcessGroup()
    front: FleetFront | None = None

    def on_signal(signum, _frame):
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        superlink = group.start("superlink", argv, env, log_path)
        wait_healthy_tls(args.control_port, ca, superlink, args.startup_timeout, log_path)
        front = FleetFront((host, args.port), ("127.0.0.1", args.control_port), cert, key, ca)
        front.start()
        dns, ips = pki.cert_sans(pki.load_cert(cert))
        print(f"fedlinear superlink: Fleet API (SuperNodes only) on https://{host}:{args.port}, "
              f"certificate SANs: {', '.join(dns + ips)}", flush=True)  # fmt: skip
        print(f"fedlinear superlink: Control and Runtime APIs on 127.0.0.1:{args.control_port} only "
              f"(this host: flwr run, flwr supernode register/list); log {log_path}", flush=True)  # fmt: skip
        print("fedlinear superlink: connection for $FLWR_HOME/config.toml on this host:", flush=True)
        print(connection_toml("fedlinear", args.control_port, ca), flush=True)
        print("fedlinear superlink: ready", flush=True)
        while superlink.poll() is None:
            time.sleep(0.2)
        from fedlinear.scripts.local.flower import tail

        raise FedLinearError(f"flower-superlink exited with code {superlink.returncode}; log {log_path}:\n{tail(log_path)}")
    except _Stop:
        print("fedlinear superlink: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if front is not None:
            front.stop()
        group.stop()


# ----------------------------------------------------------------------------------------------
# node
# ----------------------------------------------------------------------------------------------

# What flower-supernode prints for each way it can be refused -> what to tell the party.
REFUSALS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"\[code: 2004\]|Failed to activate SuperNode|No SuperNode found", re.I),
        "the SuperLink at {superlink} refused this node's key {key}: it is not registered there "
        "(on the server: flwr supernode register {pub})",
    ),
    (
        re.compile(r"\[code: 2001\]|must be registered via the CLI", re.I),
        "the SuperLink at {superlink} requires a registered key; this node presented none",
    ),
    (
        re.compile(r"401 Unauthorized|Invalid SuperNode authentication", re.I),
        "the SuperLink at {superlink} rejected this node's signature for {key} (unregistered meanwhile, "
        "or this machine's clock is off)",
    ),
    (
        re.compile(r"Hostname mismatch|IP address mismatch", re.I),
        "TLS with {superlink}: its certificate does not cover the address dialled",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error", re.I),
        "TLS with {superlink} failed: its certificate is not signed by {ca}",
    ),
    (
        re.compile(r"400 Bad Request", re.I),
        "{superlink} refused the request as malformed (a plaintext connection to a TLS-only Fleet API?)",
    ),
    (
        re.compile(r"Unable to parse the private key", re.I),
        "flower-supernode could not read {key}: " + preflight.KEY_HINT,
    ),
    (
        re.compile(r"Giving up reconnection", re.I),
        "gave up connecting to {superlink} after --max-retries {retries} (is the SuperLink up and reachable?)",
    ),
]


def explain_supernode_failure(output: str, **fmt: Any) -> str | None:
    for pattern, message in REFUSALS:
        if pattern.search(output):
            return message.format(**fmt)
    return None


def node_config(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.data_uri:
        values["data-uri"] = args.data_uri
    if args.partition_id is not None:
        values["partition-id"] = args.partition_id
    if args.num_partitions is not None:
        values["num-partitions"] = args.num_partitions
    for item in args.set or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise FedLinearError(f"--set expects key=value, got '{item}'")
        values[name.strip()] = _typed(text.strip())
    return values


def _typed(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def cmd_node(args: argparse.Namespace) -> int:
    from fedlinear.scripts.local.flower import config_string, flower_env, free_port
    from fedlinear.scripts.local.processes import ProcessGroup

    ca, key = _abs(args.ca), _abs(args.key)
    problems = preflight.check_ca(ca) + preflight.check_node_key(key)
    fail(problems)
    preflight.probe_tls(args.superlink, ca, timeout=args.connect_timeout)
    values = node_config(args)
    if "data-uri" not in values:
        raise FedLinearError("--data-uri is required: this party's shard (a local path or s3:// URI)")
    if "://" not in values["data-uri"]:
        values["data-uri"] = _abs(values["data-uri"])
        if not os.path.exists(values["data-uri"]):
            raise FedLinearError(f"--data-uri {values['data-uri']}: no such file")

    workdir = _abs(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "supernode.log")
    env = flower_env(os.path.join(workdir, "flwr-home"))
    argv = [
        "flower-supernode", "--superlink", args.superlink,
        "--root-certificates", ca, "--auth-supernode-private-key", key,
        "--max-retries", str(args.max_retries), "--max-wait-time", str(args.max_wait_time),
        "--host", "127.0.0.1", "--port", str(args.clientappio_port or free_port()),
        "--node-config", config_string(values),
    ]  # fmt: skip
    group = ProcessGroup()
    lines: list[str] = []

    def on_signal(signum, _frame):
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        proc = group.start("supernode", argv, env, None, stdout=subprocess.PIPE)
        print(f"fedlinear node: SuperNode for {values['data-uri']} connecting to {args.superlink}; log {log_path}", flush=True)

        def pump() -> None:
            assert proc.stdout is not None
            with open(log_path, "ab") as log:
                for raw in proc.stdout:
                    log.write(raw)
                    log.flush()
                    text = raw.decode("utf-8", "replace").rstrip()
                    lines.append(text)
                    del lines[:-200]
                    if args.verbose:
                        print(text, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code = proc.wait()
        reader.join(timeout=5)
        if code == 0:
            return 0
        pub = key[:-4] + ".pub" if key.endswith(".key") else key + ".pub"
        reason = explain_supernode_failure(
            "\n".join(lines), superlink=args.superlink, key=key, pub=pub, ca=ca, retries=args.max_retries
        )
        raise FedLinearError(
            (reason or f"flower-supernode exited with code {code}") + f"; log {log_path}"
        )
    except _Stop:
        print("fedlinear node: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        group.stop()


# ----------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="CA, SuperLink TLS certificate and SuperNode keys (see docs/deploy.md)")
    certs.add_argument("--out", required=True, help="directory for the files (created; existing files are never overwritten)")
    certs.add_argument("--address", action="append", metavar="HOST_OR_IP",
                       help="an address or name the SuperLink is dialled on (repeatable; 127.0.0.1 is always added)")  # fmt: skip
    certs.add_argument("--party", action="append", metavar="NAME", help="make NAME.key/NAME.pub for a party (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity of the CA and the server certificate")
    certs.set_defaults(func=cmd_certs)

    pre = sub.add_parser("preflight", help="check certificates, keys and Flower connections before Flower does")
    pre.add_argument("--ca", help="the CA certificate that parties trust")
    pre.add_argument("--cert", help="the SuperLink's certificate (checked against --ca and --address)")
    pre.add_argument("--server-key", help="the SuperLink's private key (must match --cert)")
    pre.add_argument("--address", action="append", metavar="HOST", help="an address the SuperLink is dialled on")
    pre.add_argument("--node-key", action="append", metavar="FILE", help="a SuperNode private key")
    pre.add_argument("--public-key", action="append", metavar="FILE", help="a SuperNode public key (for register)")
    pre.add_argument("--flwr-config", metavar="FILE", help="a Flower config.toml ($FLWR_HOME/config.toml)")
    pre.add_argument("--probe", action="store_true", help="with --flwr-config: TLS handshake with each connection")
    pre.add_argument("--superlink", metavar="HOST:PORT", help="TLS handshake with this address, trusting --ca")
    pre.add_argument("--timeout", type=float, default=5.0)
    pre.set_defaults(func=cmd_preflight)

    link = sub.add_parser("superlink", help="a SuperLink for remote parties: TLS, node auth, only the Fleet API exposed")
    link.add_argument("--certs", help="directory with ca.crt, server.crt, server.key (from 'fedlinear certs')")
    link.add_argument("--ca")
    link.add_argument("--cert")
    link.add_argument("--key")
    link.add_argument("--host", default="0.0.0.0", help="address the Fleet front listens on (default 0.0.0.0)")
    link.add_argument("--port", type=int, default=DEFAULT_FLEET_PORT, help="Fleet front port (parties dial it)")
    link.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                      help="the SuperLink's own port on 127.0.0.1 (Control + Runtime + Fleet; this host only)")  # fmt: skip
    link.add_argument("--address", action="append", metavar="HOST", help="an address parties dial (SAN check)")
    link.add_argument("--database", help="SuperLink state file (default: in memory)")
    link.add_argument("--workdir", default="fedlinear-superlink", help="logs and the private FLWR_HOME")
    link.add_argument("--startup-timeout", type=float, default=60.0)
    link.set_defaults(func=cmd_superlink)

    node = sub.add_parser("node", help="a party's SuperNode: TLS, its own key and shard, bounded retries")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the Fleet front's address")
    node.add_argument("--ca", required=True, help="the federation's CA certificate")
    node.add_argument("--key", required=True, help="this party's private key (NAME.key from 'fedlinear certs')")
    node.add_argument("--data-uri", help="this party's shard (local path or s3:// URI)")
    node.add_argument("--partition-id", type=int)
    node.add_argument("--num-partitions", type=int)
    node.add_argument("--set", action="append", metavar="KEY=VALUE", help="another node config entry (repeatable)")
    node.add_argument("--max-retries", type=int, default=5, help="reconnection attempts before giving up")
    node.add_argument("--max-wait-time", type=float, default=120.0, help="seconds of reconnecting before giving up")
    node.add_argument("--connect-timeout", type=float, default=10.0, help="the preflight TLS handshake's bound")
    node.add_argument("--clientappio-port", type=int, help="SuperNode's local ClientAppIo port (default: a free one)")
    node.add_argument("--workdir", default="fedlinear-node", help="log and the private FLWR_HOME")
    node.add_argument("--verbose", action="store_true", help="print flower-supernode's output as well as logging it")
    node.set_defaults(func=cmd_node)
