"""What a local federation is given (:class:`LaunchSpec`), and what the launcher reports back.

``fedlinear run`` builds a :class:`LaunchSpec`; :func:`fedlinear.scripts.local.launch.launch` runs it.
The ServerApp's progress lines reach the launcher marked with :data:`PROGRESS_MARK`; a run the
launcher had to stop ends in :class:`RunInterrupted` (the run directory keeps its checkpoints).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from fedlinear.common.errors import FedLinearError

ISOLATION_MODES = ("auto", "netns", "none")
MODES = ("processes", "simulation", "inline")
WARNING_PREFIX = "fedlinear: warning: "


PROGRESS_MARK = "[fedlinear] "


class RunInterrupted(FedLinearError):
    """The launcher stopped the run before the ServerApp finished (a process it needs died, the time
    bound passed): the run directory keeps its checkpoints, and the same command resumes."""


INTERRUPTED_MARK = "interrupted: "  # how the launcher in a private namespace tells the outer one it was a RunInterrupted


@dataclasses.dataclass
class LaunchSpec:
    """What to launch."""

    app_dir: str
    mode: str  # "processes" | "simulation" | "inline"
    num_nodes: int
    run_config: dict[str, Any]
    workdir: str  # logs, FLWR_HOME
    node_configs: list[dict[str, Any]] | None = None  # processes and inline mode: one per node
    startup_timeout: float = 60.0
    run_timeout: float = 3600.0
    client_cpus: int = 1  # simulation: CPUs reserved per virtual client (sets Ray parallelism)
    ray_cpus: int | None = None  # simulation, local Ray: CPUs Ray hands out (default: auto_ray_cpus())
    superlink_port: int | None = None
    ray_address: str | None = None  # simulation: join this Ray cluster instead of starting a local one
    isolation: str = "auto"  # "auto" | "netns" | "none" (see the module docstring)
    pool: str = "auto"  # inline: how clients run ("auto" | "serial" | "threads" | "processes"; scripts/local/inline.py)
    workers: int | None = None  # inline: pool size (default: the cores this process may use, at most one per client)
    flower_without_tf: bool = False  # simulation: keep TensorFlow out of Flower's engine (scripts/local/flower_tf.py)
    ray_tuning: bool = True  # simulation: the launcher's Ray settings (scripts/local/ray_env.py); False: Ray's defaults
    warm_clientapps: bool = True  # processes: ClientApps forked ready-imported (scripts/local/warm_clientapp.py); False: Flower's


# From this many virtual clients on, a local simulation runs two clients per core (see auto_ray_cpus).
MANY_CLIENTS = 1000


def auto_ray_cpus(num_clients: int) -> int:
    """CPUs a local Ray instance hands out: the machine's, doubled for large federations.

    In Flower's simulation engine one process (``flwr-simulation``) holds the ServerApp, the message
    store and one dispatch thread per actor, and it is the bottleneck: with many small clients an
    actor spends most of its time waiting for that process, not computing. Twice as many actors
    as cores keeps two requests in flight per core: with 1000 clients x 100 samples on 2 cores,
    9.0 -> 6.9 s a round for the no-op app, 11-12.6 -> 7.3-8.9 s for fedlinear. Each extra actor
    costs start-up (it imports TensorFlow, as Flower's simulation does) and ~0.7 GB: at 100 clients
    that outweighed the gain (0.67 -> 0.62 s a round, +15 s start-up), so smaller runs keep one
    actor per core.
    """
    cores = os.cpu_count() or 1
    return 2 * cores if num_clients >= MANY_CLIENTS else cores


def check_spec(spec: LaunchSpec) -> None:
    if spec.mode not in MODES:
        raise FedLinearError(f"--mode must be one of {', '.join(MODES)}, got '{spec.mode}'")
    if spec.num_nodes < 1:
        raise FedLinearError("--clients must be >= 1")
    if spec.mode in ("processes", "inline") and (spec.node_configs is None or len(spec.node_configs) != spec.num_nodes):
        raise FedLinearError(f"{spec.mode} mode needs one node config per client")
    if spec.ray_address and spec.mode != "simulation":
        raise FedLinearError("--ray-address applies to --mode simulation only")
    if spec.isolation not in ISOLATION_MODES:
        raise FedLinearError(f"--isolation must be one of {', '.join(ISOLATION_MODES)}, got '{spec.isolation}'")


def warn(text: str) -> None:
    print(WARNING_PREFIX + text, file=sys.stderr, flush=True)
