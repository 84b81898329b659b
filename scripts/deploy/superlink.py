"""``fedlinear superlink``'s body: the SuperLink for remote parties, on loopback, behind the Fleet front.

Stock ``flower-superlink`` with TLS and node authentication listens on 127.0.0.1 only (Control,
Runtime and Fleet APIs: this host's ``flwr run`` and ``flwr supernode register/list``); the
:class:`~fedlinear.scripts.deploy.fleetfront.FleetFront` on the network address forwards the Fleet
API's calls and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.deploy import pki, preflight
from fedlinear.scripts.local.flower import tail

DEFAULT_FLEET_PORT = 9092
DEFAULT_CONTROL_PORT = 9093


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


class _Stop(Exception):
    pass


def check_superlink(
    ca: str, cert: str, key: str, host: str, port: int, control_port: int, addresses: list[str] | None
) -> list[str]:
    """What would stop the SuperLink: the CA, the certificate for every address (127.0.0.1 included),
    the key, and the two ports (``--port`` on ``host``, ``--control-port`` on loopback)."""
    bind_ip = pki.as_ip(host)
    hosts = ["127.0.0.1"] + [pki.split_host(a) for a in addresses or []]
    if bind_ip is not None and not bind_ip.is_unspecified and host not in hosts:
        hosts.append(host)
    problems = preflight.check_ca(ca)
    problems += preflight.check_certificate(cert, ca, hosts, what="server certificate")
    problems += preflight.check_server_key(cert, key)
    if port == control_port:
        problems.append(f"--port and --control-port are both {port}; the Fleet front needs a port of its own")
    if not port_free(host, port):
        problems.append(f"{host}:{port} is in use (--port)")
    if not port_free("127.0.0.1", control_port):
        problems.append(f"127.0.0.1:{control_port} is in use (--control-port)")
    return problems


def serve_superlink(
    ca: str, cert: str, key: str, host: str, port: int, control_port: int, workdir: str, database: str | None,
    startup_timeout: float, limits=None, key_dir: str | None = None,
) -> int:
    """Run the SuperLink and its Fleet front until the SuperLink exits (an error) or SIGTERM / SIGHUP
    (0); ``workdir`` holds the log, the private FLWR_HOME and ``node-addresses.jsonl`` (where each node
    key was accepted from; ``key_dir``'s ``NAME.pub`` files name them). ``limits``: a
    :class:`~fedlinear.scripts.deploy.fleetfront.FrontLimits`."""
    from fedlinear.scripts.deploy.fleetfront import FleetFront, key_names
    from fedlinear.scripts.local.flower import flower_env
    from fedlinear.scripts.local.processes import ProcessGroup

    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "superlink.log")
    env = flower_env(os.path.join(workdir, "flwr-home"))
    argv = [
        "flower-superlink", "--host", "127.0.0.1", "--port", str(control_port),
        "--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key,
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if database:
        argv += ["--database", database]
    group = ProcessGroup()
    front: FleetFront | None = None

    def on_signal(signum, _frame):
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        superlink = group.start("superlink", argv, env, log_path)
        wait_healthy_tls(control_port, ca, superlink, startup_timeout, log_path)
        records = os.path.join(workdir, "node-addresses.jsonl")
        front = FleetFront((host, port), ("127.0.0.1", control_port), cert, key, ca, limits=limits,
                           key_names=key_names(key_dir), records=records)  # fmt: skip
        front.start()
        dns, ips = pki.cert_sans(pki.load_cert(cert))
        print(f"fedlinear superlink: Fleet API (SuperNodes only) on https://{host}:{port}, "
              f"certificate SANs: {', '.join(dns + ips)}", flush=True)  # fmt: skip
        lim = front.limits
        print(f"fedlinear superlink: front limits: {lim.max_connections} connections, {lim.max_per_peer} per address, "
              f"headers within {lim.header_timeout:g} s, push-object bodies up to "
              f"{lim.body_limit('/v1/fleet/push-object')} bytes; node keys' addresses in {records}", flush=True)  # fmt: skip
        print(f"fedlinear superlink: Control and Runtime APIs on 127.0.0.1:{control_port} only "
              f"(this host: flwr run, flwr supernode register/list); log {log_path}", flush=True)  # fmt: skip
        print("fedlinear superlink: connection for $FLWR_HOME/config.toml on this host:", flush=True)
        print(connection_toml("fedlinear", control_port, ca), flush=True)
        print("fedlinear superlink: ready", flush=True)
        while superlink.poll() is None:
            time.sleep(0.2)
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
