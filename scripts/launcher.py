"""Launch a whole local federation with Flower's own runtime, and take it down again.

``processes`` mode starts one ``flower-superlink`` and N ``flower-supernode`` processes on loopback
(free ports), each SuperNode given its own shard with ``--node-config``; ``simulation`` mode starts a
``flower-superlink --simulation`` whose ``flwr-simulation`` runs N virtual nodes on Ray. Either way
the run is submitted with stock ``flwr run APP CONNECTION --stream``, against a private
``FLWR_HOME`` (a user's ``~/.flwr`` is never touched), with runtime dependency installation off.

Every wait is bounded, and every process this module started is stopped (the whole process tree,
by PID) on success, failure and Ctrl-C. Nothing here binds to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

import psutil

from common.errors import FedLinearError

PROGRESS_MARK = "[fedlinear] "


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


def flower_env(flwr_home: str) -> dict[str, str]:
    """Environment for Flower's processes: this venv's bin first, private FLWR_HOME, offline."""
    env = dict(os.environ)
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = flwr_home
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("RAY_DEDUP_LOGS", "1")
    return env


@dataclasses.dataclass
class LaunchSpec:
    """What to launch."""

    app_dir: str
    mode: str  # "processes" | "simulation"
    num_nodes: int
    run_config: dict[str, Any]
    workdir: str  # logs, FLWR_HOME
    node_configs: list[dict[str, Any]] | None = None  # processes mode: one per node
    startup_timeout: float = 60.0
    run_timeout: float = 3600.0
    client_cpus: int = 1  # simulation: CPUs reserved per virtual client (sets Ray parallelism)
    ray_cpus: int | None = None  # simulation, local Ray: CPUs Ray hands out (default: auto_ray_cpus())
    superlink_port: int | None = None
    ray_address: str | None = None  # simulation: join this Ray cluster instead of starting a local one


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


class ProcessGroup:
    """Processes this launcher started; ``stop()`` ends each one and all of its descendants."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list[IO] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log_path: str | None, **kw) -> subprocess.Popen:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        if log_path:
            self._logs.append(out)
        try:
            proc = subprocess.Popen(
                argv, env=env, stdout=kw.pop("stdout", out), stderr=subprocess.STDOUT, start_new_session=True, **kw
            )
        except FileNotFoundError:
            raise FedLinearError(f"cannot start {argv[0]}: not found on PATH (is the venv's bin/ on PATH?)") from None
        self.procs.append((name, proc))
        return proc

    def stop(self, grace: float = 5.0) -> None:
        victims: list[psutil.Process] = []
        for _, proc in reversed(self.procs):
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                victims.extend(parent.children(recursive=True))
                victims.append(parent)
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for victim in alive:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        psutil.wait_procs(alive, timeout=grace)
        for _, proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def dead(self, prefix: str) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs if n.startswith(prefix) and p.poll() is not None]


def tail(path: str, lines: int = 15) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        return b"".join(handle.readlines()[-lines:]).decode("utf-8", "replace")
    return ""


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    """Poll the SuperLink's /health until it answers (bounded); fail fast if it exits."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedLinearError(
                f"flower-superlink exited with code {proc.returncode} during start-up; log {log_path}:\n{tail(log_path)}"
            )
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback only
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise FedLinearError(f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:g} s; log {log_path}")


# What a FAB can contain (Flower's own include patterns); everything else is left behind.
FAB_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")


def stage_app(app_dir: str, dest: str) -> str:
    """Copy the Flower app's source files to ``dest`` and return it.

    ``flwr run`` walks (and resolves) every file under the app directory before it filters, which
    with a virtualenv inside the project took 10-30 s per run here. The copy prunes virtualenvs,
    hidden directories and caches and keeps only what the app's ``fab-include`` patterns (or, without
    them, Flower's file types) select, so ``flwr run`` builds the same FAB from a small tree.
    """
    import pathspec

    pyproject = os.path.join(app_dir, "pyproject.toml")
    if not os.path.exists(pyproject):
        raise FedLinearError(f"{app_dir}: not a Flower app (no pyproject.toml)")
    with open(pyproject, "rb") as handle:
        app_conf = tomllib.load(handle).get("tool", {}).get("flwr", {}).get("app", {})
    include = app_conf.get("fab-include")
    spec = pathspec.GitIgnoreSpec.from_lines(include) if include else None
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    shutil.copy2(pyproject, os.path.join(dest, "pyproject.toml"))
    for root, dirs, files in os.walk(app_dir):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and d != "__pycache__" and not os.path.exists(os.path.join(root, d, "pyvenv.cfg"))
        ]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), app_dir)
            wanted = spec.match_file(rel) if spec else (name.endswith(FAB_SUFFIXES) or name == "LICENSE")
            if wanted and rel != "pyproject.toml":
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                shutil.copy2(os.path.join(root, name), os.path.join(dest, rel))
    return dest


def write_connection(flwr_home: str, spec: LaunchSpec, port: int) -> str:
    """The private Flower config with one SuperLink connection; returns the connection name."""
    os.makedirs(flwr_home, exist_ok=True)
    lines = ["[superlink]", 'default = "fedlinear"', "", "[superlink.fedlinear]", f'address = "127.0.0.1:{port}"', "insecure = true"]
    with open(os.path.join(flwr_home, "config.toml"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return "fedlinear"


def launch(spec: LaunchSpec, on_progress: Callable[[str], None] = print) -> None:
    """Run one federation to completion; raise FedLinearError (one line + log paths) if it fails.

    ``on_progress`` receives the ServerApp's ``[fedlinear]`` lines as they arrive.
    """
    if spec.mode not in ("processes", "simulation"):
        raise FedLinearError(f"--mode must be 'processes' or 'simulation', got '{spec.mode}'")
    if spec.num_nodes < 1:
        raise FedLinearError("--clients must be >= 1")
    if spec.mode == "processes" and (spec.node_configs is None or len(spec.node_configs) != spec.num_nodes):
        raise FedLinearError("processes mode needs one node config per client")
    os.makedirs(spec.workdir, exist_ok=True)
    flwr_home = os.path.join(spec.workdir, "flwr-home")
    env = flower_env(flwr_home)
    if spec.ray_address and spec.mode != "simulation":
        raise FedLinearError("--ray-address applies to --mode simulation only")
    if spec.mode == "simulation":
        # ray.init() inside flwr-simulation joins the cluster named here. Without --ray-address it is
        # "local": a fresh private Ray, never whatever cluster `ray start` last left behind in
        # /tmp/ray (a stale address there made ray.init() wait forever).
        env["RAY_ADDRESS"] = spec.ray_address or "local"
    group = ProcessGroup()
    port = spec.superlink_port or free_port()
    connection = write_connection(flwr_home, spec, port)
    superlink_log = os.path.join(spec.workdir, "superlink.log")
    run_log = os.path.join(spec.workdir, "flwr-run.log")
    try:
        argv = [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if spec.mode == "simulation":
            argv.append("--simulation")
        superlink = group.start("superlink", argv, env, superlink_log)
        wait_healthy(port, superlink, spec.startup_timeout, superlink_log)
        if spec.mode == "processes":
            for i, node_config in enumerate(spec.node_configs or []):
                group.start(
                    f"supernode-{i}",
                    [
                        "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(free_port()),
                        "--node-config", config_string(node_config),
                    ],  # fmt: skip
                    env,
                    os.path.join(spec.workdir, f"supernode-{i}.log"),
                )
        overrides = ["--run-config", config_string(spec.run_config)] if spec.run_config else []
        if spec.mode == "simulation":
            federation = {"num-supernodes": spec.num_nodes, "client-resources-num-cpus": int(spec.client_cpus)}
            if not spec.ray_address:
                federation["init-args-num-cpus"] = int(spec.ray_cpus or auto_ray_cpus(spec.num_nodes))
            overrides += ["--federation-config", config_string(federation)]
        runner = group.start(
            "flwr-run",
            ["flwr", "run", stage_app(spec.app_dir, os.path.join(spec.workdir, "app")), connection, "--stream", *overrides],
            env,
            None,
            stdout=subprocess.PIPE,
        )
        _follow(runner, run_log, on_progress, spec.run_timeout)
        if runner.returncode != 0:
            raise FedLinearError(f"flwr run exited with code {runner.returncode}; log {run_log}:\n{tail(run_log)}")
    finally:
        group.stop()


def _follow(
    runner: subprocess.Popen, log_path: str, on_progress: Callable[[str], None], timeout: float
) -> None:
    """Copy ``flwr run --stream`` output to the log, pass progress lines on, bound the run's time."""
    timed_out = threading.Event()

    def watchdog() -> None:
        try:
            runner.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGTERM)

    threading.Thread(target=watchdog, daemon=True).start()
    assert runner.stdout is not None
    with open(log_path, "ab") as log:
        for raw in runner.stdout:
            log.write(raw)
            log.flush()
            line = raw.decode("utf-8", "replace").rstrip()
            idx = line.find(PROGRESS_MARK)
            if idx >= 0:
                on_progress(line[idx + len(PROGRESS_MARK) :])
    runner.wait()
    if timed_out.is_set():
        raise FedLinearError(f"the run did not finish within {timeout:g} s (--timeout); log {log_path}")
