"""Launch a whole local federation with Flower's own runtime, and take it down again.

``processes`` mode starts one ``flower-superlink`` and N ``flower-supernode`` processes on loopback
(free ports), each SuperNode given its own shard with ``--node-config``; ``simulation`` mode starts a
``flower-superlink --simulation`` whose ``flwr-simulation`` runs N virtual nodes on Ray. Either way
the run is submitted with stock ``flwr run APP CONNECTION --stream``, against a private
``FLWR_HOME`` (a user's ``~/.flwr`` is never touched), with runtime dependency installation off.

Every wait is bounded, and every process this module started is stopped (the whole process tree,
by PID) on success, failure and Ctrl-C. Nothing here binds to anything but 127.0.0.1.

Isolation (``LaunchSpec.isolation``): Flower 1.42's Control API has no caller authentication, so on a
shared machine any local user or program that reaches the SuperLink's loopback port could submit a
run (code that every SuperNode executes) or join as a SuperNode. With ``netns`` (``auto`` where the
platform allows it) the whole federation runs in a private network namespace whose only interface
is its own loopback, plus a private PID namespace, made by ``unshare`` (as root ``unshare --net``,
otherwise an unprivileged user namespace ``unshare --user --map-root-user --net``): no process
outside can reach its ports, and when the namespace's first process ends the kernel ends every
other one in it and the network namespace goes with them. Runs that need the network outside
(data on ``s3://``, ``--ray-address``) are not isolated (``auto`` says so in a one-line warning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    isolation: str = "auto"  # "auto" | "netns" | "none" (see the module docstring)


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


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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

    def _members(self) -> list[psutil.Process]:
        """Every live process started here, its descendants, and anything left in their process
        groups (each was started in its own session: a child reparented to init when its parent
        died, or spawned while we were stopping, is still in the group)."""
        found: dict[int, psutil.Process] = {}
        groups = set()
        for _, proc in reversed(self.procs):
            groups.add(proc.pid)
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                for child in parent.children(recursive=True):
                    found[child.pid] = child
                found[parent.pid] = parent
        for candidate in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if candidate.pid != os.getpid() and os.getpgid(candidate.pid) in groups:
                    found.setdefault(candidate.pid, candidate)
        return list(found.values())

    def stop(self, grace: float = 5.0) -> None:
        victims = self._members()
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=grace)
        # then SIGKILL whatever is left, again and again until nothing of ours runs (bounded): a
        # SuperNode can spawn a flwr-clientapp between one sweep and the next
        deadline = time.monotonic() + 6 * grace
        while time.monotonic() < deadline:
            alive = [p for p in self._members() if _running(p)]
            if not alive:
                break
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
    _check(spec)
    if resolve_isolation(spec) == "netns":
        _launch_isolated(spec, on_progress)
    else:
        _launch(spec, on_progress)


def _check(spec: LaunchSpec) -> None:
    if spec.mode not in ("processes", "simulation"):
        raise FedLinearError(f"--mode must be 'processes' or 'simulation', got '{spec.mode}'")
    if spec.num_nodes < 1:
        raise FedLinearError("--clients must be >= 1")
    if spec.mode == "processes" and (spec.node_configs is None or len(spec.node_configs) != spec.num_nodes):
        raise FedLinearError("processes mode needs one node config per client")
    if spec.ray_address and spec.mode != "simulation":
        raise FedLinearError("--ray-address applies to --mode simulation only")
    if spec.isolation not in ISOLATION_MODES:
        raise FedLinearError(f"--isolation must be one of {', '.join(ISOLATION_MODES)}, got '{spec.isolation}'")


def _launch(spec: LaunchSpec, on_progress: Callable[[str], None]) -> None:
    """The federation itself, in whatever network namespace this process is in."""
    os.makedirs(spec.workdir, exist_ok=True)
    flwr_home = os.path.join(spec.workdir, "flwr-home")
    env = flower_env(flwr_home)
    if spec.mode == "simulation":
        # ray.init() inside flwr-simulation joins the cluster named here. Without --ray-address it is
        # "local": a fresh private Ray, never whatever cluster `ray start` last left behind in
        # /tmp/ray (a stale address there made ray.init() wait forever).
        env["RAY_ADDRESS"] = spec.ray_address or "local"
    ray_tmp = None
    if spec.mode == "simulation" and not spec.ray_address:
        # The local Ray's session files (its unix sockets among them: those are not confined by a network
        # namespace) go to a directory only this user can enter, not the world-writable /tmp/ray where
        # another user could swap a socket. Short: unix socket paths must fit in 107 bytes.
        ray_tmp = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        env["RAY_TMPDIR"] = ray_tmp
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
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


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


# ----------------------------------------------------------------------------------------------
# isolation: the whole federation in a private network (and PID) namespace
# ----------------------------------------------------------------------------------------------

ISOLATION_MODES = ("auto", "netns", "none")
WARNING_PREFIX = "fedlinear: warning: "
# How long the namespace's processes get to stop on their own before everything in it is killed.
ISOLATED_STOP_GRACE = 15.0


def isolation_blockers(spec: LaunchSpec) -> list[str]:
    """Why this run needs the network outside a private namespace (empty: it does not)."""
    reasons = []
    if spec.ray_address:
        reasons.append(f"--ray-address {spec.ray_address}: that Ray cluster is outside any private namespace")
    values = [*spec.run_config.values(), *(v for node in spec.node_configs or [] for v in node.values())]
    s3 = sorted({v for v in values if isinstance(v, str) and v.startswith("s3://")})
    if s3:
        reasons.append(f"{s3[0]} is on S3, which a namespace with nothing but a loopback interface cannot reach")
    return reasons


def unshare_argv(euid: int | None = None) -> list[str]:
    """``unshare`` for a new network + PID namespace; unprivileged callers get a user namespace too."""
    argv = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if (os.geteuid() if euid is None else euid) != 0:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv


def namespace_unavailable() -> str | None:
    """Why a private network namespace cannot be made here (None: it can; tried, bounded)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux-only (this is {sys.platform})"
    if shutil.which("unshare") is None:
        return "util-linux 'unshare' is not installed"
    argv = [*unshare_argv(), sys.executable, "-m", "scripts.launcher", "--probe"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'{' '.join(argv[:-4])}' failed: {exc}"
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        how = "as root" if os.geteuid() == 0 else "unprivileged (user namespaces)"
        return f"cannot create a network namespace {how}: {detail}"
    return None


def resolve_isolation(spec: LaunchSpec, warn: Callable[[str], None] | None = None) -> str:
    """``netns`` or ``none`` for this run; ``auto`` falls back to ``none`` with a one-line warning."""
    if spec.isolation == "none":
        return "none"
    why = isolation_blockers(spec) or [namespace_unavailable()]
    why = [w for w in why if w]
    if not why:
        return "netns"
    if spec.isolation == "netns":
        raise FedLinearError(f"--isolation netns: {why[0]}")
    (warn or _warn)(
        f"federation not isolated: {why[0]}; other users and programs on this machine can reach its "
        "SuperLink on 127.0.0.1 while it runs (README: Local federations on shared machines)"
    )
    return "none"


def _warn(text: str) -> None:
    print(WARNING_PREFIX + text, file=sys.stderr, flush=True)


def bring_loopback_up() -> None:
    """``ip link set lo up`` by ioctl (a fresh network namespace starts with lo down); refuse any other
    interface, so what runs here really can reach nothing but itself."""
    import fcntl
    import struct

    others = [name for _, name in socket.if_nameindex() if name != "lo"]
    if others:
        raise FedLinearError(f"the private network namespace has interfaces besides lo: {', '.join(others)}")
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, ifreq))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL if the launcher dies, even by SIGKILL (unshare's
    --kill-child then kills the namespace's init, and the kernel everything else in the namespace)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: nothing imported after it

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


def _launch_isolated(spec: LaunchSpec, on_progress: Callable[[str], None]) -> None:
    """Run ``_launch`` in a private network + PID namespace (``python -m scripts.launcher --inner``)."""
    os.makedirs(spec.workdir, exist_ok=True)
    spec_path = os.path.join(spec.workdir, "isolated-spec.json")
    error_path = os.path.join(spec.workdir, "isolated-error.txt")
    log_path = os.path.join(spec.workdir, "isolated.log")
    with contextlib.suppress(FileNotFoundError):
        os.remove(error_path)
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(dataclasses.replace(spec, isolation="none")), handle)
    on_progress("isolation: the federation runs in a private network namespace (loopback only)")
    group = ProcessGroup()
    proc = None
    try:
        proc = group.start(
            "isolated",
            [*unshare_argv(), sys.executable, "-m", "scripts.launcher", "--inner", spec_path, error_path],
            dict(os.environ), None, stdout=subprocess.PIPE, preexec_fn=_die_with_parent(),
        )  # fmt: skip
        # the inner launcher bounds start-up and the run itself; this bound is the backstop
        _follow(proc, log_path, on_progress, spec.run_timeout + 3 * spec.startup_timeout + 60)
        if proc.returncode == 0:
            return
        with contextlib.suppress(OSError), open(error_path, encoding="utf-8") as handle:
            raise FedLinearError(handle.read().rstrip())
        if proc.returncode == 130:
            raise KeyboardInterrupt
        raise FedLinearError(
            f"the isolated federation exited with code {proc.returncode}; log {log_path}:\n{tail(log_path)}"
        )
    finally:
        if proc is not None and proc.poll() is None:
            # SIGTERM to the namespace's init, which hands it to the inner launcher: it stops its
            # processes as it would outside (bounded); whatever is left is then killed
            with contextlib.suppress(psutil.Error):
                for init in psutil.Process(proc.pid).children():
                    init.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=ISOLATED_STOP_GRACE)
        group.stop()


def _inner(spec_path: str, error_path: str) -> int:
    """PID 1 of the namespaces: bring lo up, run the launcher in a child, reap every orphan, forward
    signals; when this returns, the kernel ends whatever is still running in the namespace."""
    try:
        bring_loopback_up()
    except (OSError, FedLinearError) as exc:
        with open(error_path, "w", encoding="utf-8") as handle:
            handle.write(f"cannot set up the private network namespace: {exc}\n")
        return 1
    with open(spec_path, encoding="utf-8") as handle:
        spec = LaunchSpec(**json.load(handle))
    child = os.fork()
    if child == 0:
        code = 1
        try:

            def stop(signum, _frame):
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGHUP, stop)
            _launch(spec, lambda line: print(PROGRESS_MARK + line, flush=True))
            code = 0
        except FedLinearError as exc:
            with open(error_path, "w", encoding="utf-8") as handle:
                handle.write(str(exc) + "\n")
        except KeyboardInterrupt:
            code = 130
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        if pid == child:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        try:
            bring_loopback_up()
        except (OSError, FedLinearError) as exc:
            sys.exit(f"cannot set up the private network namespace: {exc}")
        sys.exit(0)
    if sys.argv[1:2] == ["--inner"] and len(sys.argv) == 4:
        sys.exit(_inner(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m scripts.launcher --probe | --inner SPEC.json ERROR.txt")
