"""Flower's processes as the launcher (and ``fedlinear superlink`` / ``node``) start them: a free
loopback port, config values as ``flwr run`` parses them, the environment (this venv's ``bin/`` first,
a private ``FLWR_HOME``, offline), the private connection file, and a SuperLink's health.

A port from :func:`free_port` is free when it is picked, not when the server binds it: another process
on the machine (another run's launcher picking at the same moment, anything else) can take it in
between. Flower's servers then exit (uvicorn's ``address already in use``), or, worse, a ``/health``
on that port is answered by someone else's SuperLink. So a start is checked: the listener must be the
process that was started (:func:`listens`), and a server that lost its port says so
(:class:`PortTaken`), for the launcher to start it again on another one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import psutil

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local.processes import TREE_ENV
from fedlinear.scripts.local.spec import LaunchSpec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """Render a config value the way ``flwr run --run-config`` / ``--node-config`` parse it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"
    raise FedLinearError(f"config value {text!r} contains both quote characters; Flower cannot parse it")


def config_string(values: dict[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def flower_env(flwr_home: str, token: str | None = None) -> dict[str, str]:
    """Environment for Flower's processes: this venv's bin first, private FLWR_HOME, offline (and the
    launch's :data:`TREE_ENV` token, when given).

    Offline includes Flower's telemetry, unless the user's environment sets ``FLWR_TELEMETRY_ENABLED``
    itself: Flower 1.42 posts a usage event to telemetry.flower.ai from each of its processes
    (``flwr.supercore.telemetry``), a ClientApp at every message, and each process waits up to 4 s for
    that post when it exits (``flwr_exit``, ``TELEMETRY_TIMEOUT_SECONDS``), which on a network that
    drops the connection keeps every ClientApp alive 4 s after its reply. A party's host then makes no
    connection but the federation's.
    """
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if token is not None:
        env[TREE_ENV] = token
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = flwr_home
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("RAY_DEDUP_LOGS", "1")
    return env


def tail(path: str, lines: int = 15) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        return b"".join(handle.readlines()[-lines:]).decode("utf-8", "replace")
    return ""


class PortTaken(FedLinearError):
    """A Flower server exited at start-up because another process had taken its port."""


def lost_port(log_path: str, port: int) -> bool:
    """Whether the server logging to ``log_path`` failed to bind ``port`` (uvicorn: ``[Errno 98] error
    while attempting to bind on address ('127.0.0.1', PORT): address already in use``)."""
    return any("address already in use" in line and f", {port})" in line for line in tail(log_path, 80).splitlines())


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds the listening TCP socket on ``port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    """Poll the SuperLink's /health until it answers, from ``proc`` itself (bounded); fail fast if it
    exits (:class:`PortTaken` when it lost its port)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if lost_port(log_path, port):
                raise PortTaken(f"flower-superlink could not bind 127.0.0.1:{port}: another process took it; log {log_path}")
            raise FedLinearError(
                f"flower-superlink exited with code {proc.returncode} during start-up; log {log_path}:\n{tail(log_path)}"
            )
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback only
                # another process's SuperLink can answer on a port ours has not bound (yet): not ours
                if resp.status == 200 and listens(proc.pid, port):
                    return
        time.sleep(0.1)
    raise FedLinearError(f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:g} s; log {log_path}")


def write_connection(flwr_home: str, spec: LaunchSpec, port: int) -> str:
    """The private Flower config with one SuperLink connection; returns the connection name."""
    os.makedirs(flwr_home, exist_ok=True)
    lines = ["[superlink]", 'default = "fedlinear"', "", "[superlink.fedlinear]", f'address = "127.0.0.1:{port}"', "insecure = true"]
    with open(os.path.join(flwr_home, "config.toml"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return "fedlinear"
