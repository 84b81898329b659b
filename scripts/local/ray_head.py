"""A private Ray head for a local simulation, started by the launcher alongside the SuperLink.

Left to itself, Flower's simulation engine starts Ray inside ``flwr-simulation``: ``ray.init()`` runs
only once the SuperLink is up, ``flwr run`` has submitted the run, SuperExec has spawned
``flwr-simulation`` and that has imported Flower and the ServerApp, so Ray's own start-up (its GCS,
raylet and agents: a few seconds of CPU) adds to the run's time in series with all of them. It also
starts Ray's autoscaler monitor (``monitor.py``, ~80 MB), which a one-machine Ray without an
autoscaler config never uses.

For fedlinear's own app (not for ``--app``, so Flower's no-op floor keeps Flower's own start-up) the
launcher runs ``ray start --head --block`` itself, first thing, with the same resources
``ray.init()`` would have been given (``--num-cpus``), the dashboard off as Flower has it, no
autoscaler monitor, no usage stats, its session files in the run's private directory, bound to
127.0.0.1, and it waits for that head while the SuperLink starts. ``flwr-simulation`` then joins it
through ``RAY_ADDRESS`` exactly as it joins a cluster named by ``--ray-address`` (Flower's own
``ray.init(address=...)`` path, which tests/e2e/test_ray_cluster.py exercises), so everything Flower
does on Ray (its actors, ``runtime_env``, ``log_to_driver``, its ``ray.shutdown()``) is unchanged. The
head is a child of the launcher's :class:`~fedlinear.scripts.local.processes.ProcessGroup`, so it
and every process Ray starts are stopped with the run.

It relies on ``ray start`` options (:data:`RAY_START_OPTIONS`); tests/unit/test_ray_head.py fails if a
Ray upgrade drops one of them, and a missing one also makes ``ray start`` fail at once, with its log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local.flower import free_port, tail

READY_LINE = "Ray runtime started."
# the ``ray start`` click options used below, by their parameter names
RAY_START_OPTIONS = (
    "head", "block", "port", "node_ip_address", "num_cpus", "include_dashboard", "no_monitor",
    "disable_usage_stats", "temp_dir",
)  # fmt: skip


def ray_executable() -> str:
    """This venv's ``ray`` (next to the running interpreter), else whatever ``ray`` is on PATH."""
    candidate = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "ray")
    return candidate if os.path.exists(candidate) else "ray"


def head_argv(port: int, num_cpus: int, temp_dir: str) -> list[str]:
    """``ray start`` for a private one-machine head (see the module docstring)."""
    return [
        ray_executable(), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(int(num_cpus)),
        "--include-dashboard", "false", "--no-monitor", "--disable-usage-stats",
        "--temp-dir", temp_dir,
    ]  # fmt: skip


def head_env(env: dict[str, str]) -> dict[str, str]:
    """The head's environment: the run's, without an address to join (it is the cluster)."""
    out = dict(env)
    out.pop("RAY_ADDRESS", None)
    out["RAY_USAGE_STATS_ENABLED"] = "0"
    return out


def start_head(group, env: dict[str, str], num_cpus: int, temp_dir: str, log_path: str) -> tuple[subprocess.Popen, str]:
    """Start the head in ``group``; return the process and the address ``RAY_ADDRESS`` joins.

    It does not wait: :func:`wait_ready` does, so the SuperLink starts meanwhile."""
    port = free_port()
    proc = group.start("ray-head", head_argv(port, num_cpus, temp_dir), head_env(env), log_path)
    return proc, f"127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, log_path: str, timeout: float) -> None:
    """Wait (bounded) until ``ray start`` says the head is up; fail with its log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(log_path, encoding="utf-8", errors="replace") as handle:
                if READY_LINE in handle.read():
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise FedLinearError(f"ray start exited with code {proc.returncode} during start-up; log {log_path}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise FedLinearError(f"the local Ray head did not start within {timeout:g} s; log {log_path}:\n{tail(log_path)}")
        time.sleep(0.1)
