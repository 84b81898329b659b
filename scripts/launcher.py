"""Launch a whole local federation with Flower's own runtime, and take it down again.

``processes`` mode starts one ``flower-superlink`` and N ``flower-supernode`` processes on loopback
(free ports), each SuperNode given its own shard with ``--node-config``; ``simulation`` mode starts a
``flower-superlink --simulation`` whose ``flwr-simulation`` runs N virtual nodes on Ray. Either way
the run is submitted with stock ``flwr run APP CONNECTION --stream``, against a private
``FLWR_HOME`` (a user's ``~/.flwr`` is never touched), with runtime dependency installation off.

Every wait is bounded, and every process this module started is stopped (the whole process tree,
by PID) on success, failure and Ctrl-C, and within seconds when the launcher itself is killed, by
SIGKILL too (the parent-death signal on its children, and a :class:`Watchdog` for the rest, Ray
included). Nothing here binds to anything but 127.0.0.1.

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
import secrets
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import psutil

from fedlinear.common.errors import FedLinearError, one_line

PROGRESS_MARK = "[fedlinear] "


class RunInterrupted(FedLinearError):
    """The launcher stopped the run before the ServerApp finished (a process it needs died, the time
    bound passed): the run directory keeps its checkpoints, and the same command resumes."""


INTERRUPTED_MARK = "interrupted: "  # how the launcher in a private namespace tells the outer one it was a RunInterrupted


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
    launch's :data:`TREE_ENV` token, when given)."""
    env = dict(os.environ)
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


# Every process one launch starts carries this variable (a fresh token per launch) in its environment,
# and every descendant inherits it: even one reparented to init or in a session of its own (Ray's
# workers, a `flwr-serverapp` whose SuperLink died) is found by it, and nothing else is.
TREE_ENV = "FEDLINEAR_TREE"


def tree_token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(8)}"


class Tree:
    """The processes of one launch, found however they got away from the process tree.

    A process belongs to the launch if its environment carries the launch's ``token``, if it is a
    descendant of a member (or of ``root``), or if it is in a process group or session a member was
    seen in. Each ``scan()`` learns the groups and sessions of what it finds: Ray's agents and
    workers rewrite their command line and environment (setproctitle), and when their parent dies
    they are reparented to init; only the session they were started in still ties them to the run.
    The caller's own group and session (a shell's, a terminal's) are never learnt.
    """

    def __init__(
        self, token: str | None, root: int | None = None, exclude: Iterable[int] = (), learn: bool = True
    ) -> None:
        self.token = token
        self.root = root
        self.learn = learn  # False: only the groups and sessions given (a tree this launch did not start)
        # never this process nor its ancestors (inside a private namespace the launcher's parent, the
        # namespace's first process, carries the token too)
        self.exclude = {os.getpid(), *exclude}
        with contextlib.suppress(psutil.Error):
            self.exclude |= {parent.pid for parent in psutil.Process().parents()}
        self.groups: set[int] = set()
        self.sessions: set[int] = set()
        self._token_cache: dict[tuple[int, float], bool] = {}
        self.forbidden = {0, 1, os.getpgrp(), os.getsid(0)}
        if root is not None:
            with contextlib.suppress(OSError):
                self.forbidden |= {os.getpgid(root), os.getsid(root)}

    def add_group(self, pgid: int) -> None:
        if pgid not in self.forbidden:
            self.groups.add(pgid)

    def add_session(self, sid: int) -> None:
        if sid not in self.forbidden:
            self.sessions.add(sid)

    def _carries_token(self, proc: psutil.Process, created: float) -> bool:
        key = (proc.pid, created)
        if key not in self._token_cache:
            try:
                self._token_cache[key] = self.token is not None and proc.environ().get(TREE_ENV) == self.token
            except (psutil.Error, OSError):
                return False  # not cached: it may be readable next time
        return self._token_cache[key]

    def scan(self) -> list[psutil.Process]:
        """Every live (non-zombie) process of the launch now (one pass over the process table)."""
        table: dict[int, tuple[psutil.Process, int, int, int]] = {}
        kids: dict[int, list[int]] = {}
        tokened: set[int] = set()
        for proc in psutil.process_iter(["ppid", "status", "create_time"]):
            info = proc.info
            if proc.pid in self.exclude or info["status"] == psutil.STATUS_ZOMBIE or info["ppid"] is None:
                continue
            try:
                table[proc.pid] = (proc, info["ppid"], os.getpgid(proc.pid), os.getsid(proc.pid))
            except OSError:
                continue
            kids.setdefault(info["ppid"], []).append(proc.pid)
            if self._carries_token(proc, info["create_time"] or 0.0):
                tokened.add(proc.pid)
        self._token_cache = {k: v for k, v in self._token_cache.items() if k[0] in table}
        found: set[int] = set()
        while True:  # members -> their descendants, groups and sessions -> more members, to a fixed point
            seeds = {pid for pid, (_, _, pgid, sid) in table.items() if pgid in self.groups or sid in self.sessions}
            seeds |= tokened
            if self.root is not None:
                seeds |= set(kids.get(self.root, []))
            stack = list(seeds - found)
            grown = set(found)
            while stack:
                pid = stack.pop()
                if pid in grown or pid not in table:
                    continue
                grown.add(pid)
                stack.extend(kids.get(pid, []))
            for pid in grown - found:
                self._learn(table[pid])
            if grown == found:
                break
            found = grown
        return [table[pid][0] for pid in found]

    def _learn(self, entry: tuple[psutil.Process, int, int, int]) -> None:
        _, _, pgid, sid = entry
        if not self.learn:
            return
        if pgid not in self.forbidden:
            self.groups.add(pgid)
        if sid not in self.forbidden:
            self.sessions.add(sid)

    def kill_until_gone(self, timeout: float = 60.0) -> list[int]:
        """SIGKILL every process of the launch, again and again (a dying parent may still spawn),
        until none is left or ``timeout`` passes; the pids still alive then (normally none)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.scan()
            if not alive or time.monotonic() > deadline:
                return [p.pid for p in alive]
            for victim in alive:
                with contextlib.suppress(psutil.Error):
                    victim.kill()
            psutil.wait_procs(alive, timeout=2.0)


class ProcessGroup:
    """Processes this launcher started; ``stop()`` ends each one and all of its descendants.

    With ``die_with_parent`` each child gets the parent-death signal (SIGKILL when this process dies,
    however: it must start them from the thread that lives as long as they should). With ``token``
    (see :data:`TREE_ENV`) ``stop()`` also finds descendants that left the process tree and groups.
    ``on_start(pid)`` is told each new child's pid (its process group: each starts a session).
    """

    def __init__(
        self, die_with_parent: bool = False, token: str | None = None, on_start: Callable[[int], None] | None = None
    ) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list[IO] = []
        self.die_with_parent = die_with_parent
        self.tree = Tree(token)
        self.on_start = on_start

    def start(self, name: str, argv: list[str], env: dict[str, str], log_path: str | None, **kw) -> subprocess.Popen:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        if log_path:
            self._logs.append(out)
        if self.die_with_parent and "preexec_fn" not in kw:
            kw["preexec_fn"] = _die_with_parent()
        try:
            proc = subprocess.Popen(
                argv, env=env, stdout=kw.pop("stdout", out), stderr=subprocess.STDOUT, start_new_session=True, **kw
            )
        except FileNotFoundError:
            raise FedLinearError(f"cannot start {argv[0]}: not found on PATH (is the venv's bin/ on PATH?)") from None
        self.procs.append((name, proc))
        self.tree.add_group(proc.pid)  # each child starts a session: its pid is its group's and session's id
        self.tree.add_session(proc.pid)
        if self.on_start is not None:
            self.on_start(proc.pid)
        return proc

    def _members(self) -> list[psutil.Process]:
        """Every live process started here, its descendants, and anything left in their process
        groups and sessions (each was started in a session of its own: a child reparented to init
        when its parent died, or spawned while we were stopping, is still in it) or carrying the
        token (see :class:`Tree`)."""
        return self.tree.scan()

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


# How long the watchdog keeps killing a launch's processes before it gives up and names the survivors.
WATCHDOG_TIMEOUT = 60.0


class Watchdog:
    """A small process (``python -m fedlinear.scripts.launcher --watchdog TOKEN``) that outlives the launcher.

    It reads a pipe whose only writer is the launcher, and looks at the launch every few seconds
    meanwhile: at EOF (the launcher closed it after its own orderly stop, or died, by SIGKILL too) it
    SIGKILLs every process of the launch (see :class:`Tree`: the token, descendants, the sessions and
    groups seen), again and again until none is left, and exits. The
    launcher waits for that exit, so ``fedlinear run`` returns only when its whole tree is gone.
    ``keep_open`` file descriptors (the run directory's lock) are inherited and held by it until then,
    so a rerun cannot start while the remains of a killed run are still being stopped.
    """

    def __init__(self, token: str, keep_open: Iterable[int] = ()) -> None:
        self.token = token
        self.tree = Tree(token)  # the launcher's view, for finish()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedlinear.scripts.launcher", "--watchdog", token, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, pass_fds=tuple(keep_open),
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )  # fmt: skip

    def watch_group(self, pgid: int) -> None:
        """Tell the watchdog about a process group to sweep as well."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"group {pgid}\n".encode())
            self.proc.stdin.flush()

    def finish(self, timeout: float = WATCHDOG_TIMEOUT + 30) -> list[int]:
        """Close the pipe and wait (bounded) until the watchdog has swept; the pids it could not kill."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = 1
        return [] if code == 0 else [p.pid for p in self.tree.scan()] or [-1]


# How often the watchdog looks at the launch while the launcher lives (to learn its groups and sessions).
WATCHDOG_SCAN_INTERVAL = 2.0


def _watchdog(token: str, launcher_pid: int) -> int:
    """The watchdog's body (see :class:`Watchdog`): 0 when nothing of the launch is left.

    While the launcher lives it looks at the launch every few seconds (so it knows the process
    groups and sessions of processes that later lose their parent); at EOF it kills it all.
    """
    import select

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # Ctrl-C or a closed terminal must not stop the clean-up
    tree = Tree(token, root=launcher_pid, exclude=(launcher_pid,))
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], WATCHDOG_SCAN_INTERVAL)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:  # EOF: the launcher closed the pipe or died
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                parts = line.split()
                if len(parts) == 2 and parts[0] == b"group" and parts[1].isdigit():
                    tree.add_group(int(parts[1]))
                    tree.add_session(int(parts[1]))
        tree.scan()
    tree.root = None  # the launcher is gone (or going): its other children are not the run's
    left = tree.kill_until_gone(WATCHDOG_TIMEOUT)
    if left:
        with contextlib.suppress(OSError):
            print(f"fedlinear: warning: processes of the run survive SIGKILL: {left}", file=sys.stderr, flush=True)
    return 1 if left else 0


def listener(port: int, host: str = "127.0.0.1") -> psutil.Process | None:
    """The process listening on ``host:port`` (TCP), if any this user may see."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.laddr.ip in (host, "0.0.0.0", "::"):
            if conn.pid is not None:
                with contextlib.suppress(psutil.Error):
                    return psutil.Process(conn.pid)
    return None


def stop_superlink(port: int, grace: float = 10.0) -> str:
    """Stop the ``flower-superlink`` listening on 127.0.0.1:``port`` and every process it spawned
    (SuperExec, ServerApp/simulation, Ray), by PID; the one-line report. Refuses anything that is
    not a flower-superlink or not this user's."""
    proc = listener(port)
    if proc is None:
        return f"no process listens on 127.0.0.1:{port}: nothing to stop"
    try:
        cmdline = proc.cmdline()
        owner = proc.uids().real
    except psutil.Error as exc:
        raise FedLinearError(
            f"127.0.0.1:{port} is served by pid {proc.pid}, which cannot be inspected: {exc}"
        ) from None
    if not any(os.path.basename(part) == "flower-superlink" for part in cmdline[:3]):
        raise FedLinearError(
            f"127.0.0.1:{port} is served by pid {proc.pid} ({' '.join(cmdline)[:80]}), "
            "not a flower-superlink: not stopping it"
        )
    if owner != os.getuid() and os.getuid() != 0:
        raise FedLinearError(
            f"the flower-superlink on 127.0.0.1:{port} (pid {proc.pid}) belongs to uid {owner}, not you"
        )
    tree = Tree(None, root=proc.pid, learn=False)  # its descendants, and its session if it leads one
    with contextlib.suppress(OSError):  # Flower starts its managed SuperLink in a session of its own
        if os.getsid(proc.pid) == proc.pid:
            tree.add_session(proc.pid)
        if os.getpgid(proc.pid) == proc.pid:
            tree.add_group(proc.pid)
    victims = [proc, *(p for p in tree.scan() if p.pid != proc.pid)]
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.send_signal(signal.SIGTERM)
    psutil.wait_procs(victims, timeout=grace)
    tree.root = None
    tree.kill_until_gone(timeout=grace)  # what is left in its session (and anything spawned meanwhile)
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    psutil.wait_procs(victims, timeout=grace)
    left = [p.pid for p in victims if _running(p)]
    if left:
        raise FedLinearError(f"processes of the flower-superlink on 127.0.0.1:{port} survive SIGKILL: {left}")
    return (
        f"stopped the flower-superlink on 127.0.0.1:{port} (pid {proc.pid}) "
        f"and the {len(victims) - 1} processes it had started"
    )


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


def app_files(app_dir: str) -> dict[str, bytes | Path]:
    """The app's source files as ``{path in the repository's layout: file on disk, or its bytes}``.

    ``app_dir`` is a checkout (or any app laid out like one) or, for fedlinear installed from the
    wheel, the package folder: there the package's ``__init__.py`` stands for the repository's
    ``fedlinear/__init__.py`` and each room gets the redirect the repository has in
    ``fedlinear/<room>/__init__.py``. Virtualenvs, hidden directories and caches are pruned.
    """
    import fedlinear

    installed = os.path.isfile(os.path.join(app_dir, "__init__.py"))
    found: dict[str, bytes | Path] = {}
    for root, dirs, files in os.walk(app_dir):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and d != "__pycache__" and not os.path.exists(os.path.join(root, d, "pyvenv.cfg"))
        ]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), app_dir).replace(os.sep, "/")
            found["fedlinear/__init__.py" if installed and rel == "__init__.py" else rel] = Path(root, name)
    if installed:
        for room in fedlinear.ROOMS:
            found[f"fedlinear/{room}/__init__.py"] = fedlinear.ROOM_REDIRECT.encode()
    return found


def stage_app(app_dir: str, dest: str) -> str:
    """Copy the Flower app's source files to ``dest`` and return it.

    ``flwr run`` walks (and resolves) every file under the app directory before it filters, which
    with a virtualenv inside the project took 10-30 s per run here. The copy keeps only the files
    Flower itself would put in the FAB (its own filter, ``flwr.cli.build.get_filtered_fab_paths``:
    the app's ``fab-include`` / ``fab-exclude`` and Flower's built-in rules), so ``flwr run`` builds
    the same FAB from a small tree; from an installed fedlinear it also restores the repository's layout.
    """
    from flwr.cli.build import get_filtered_fab_paths

    pyproject = os.path.join(app_dir, "pyproject.toml")
    if not os.path.exists(pyproject):
        raise FedLinearError(f"{app_dir}: not a Flower app (no pyproject.toml)")
    with open(pyproject, "rb") as handle:
        config = tomllib.load(handle)
    files = app_files(app_dir)
    try:
        wanted = get_filtered_fab_paths(files, config)
    except ValueError as err:
        raise FedLinearError(f"{pyproject}: {one_line(str(err))}") from None
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    shutil.copy2(pyproject, os.path.join(dest, "pyproject.toml"))
    for rel in wanted:
        target, source = os.path.join(dest, rel), files[rel]
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if isinstance(source, bytes):
            with open(target, "wb") as handle:
                handle.write(source)
        else:
            shutil.copy2(source, target)
    return dest


def write_connection(flwr_home: str, spec: LaunchSpec, port: int) -> str:
    """The private Flower config with one SuperLink connection; returns the connection name."""
    os.makedirs(flwr_home, exist_ok=True)
    lines = ["[superlink]", 'default = "fedlinear"', "", "[superlink.fedlinear]", f'address = "127.0.0.1:{port}"', "insecure = true"]
    with open(os.path.join(flwr_home, "config.toml"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return "fedlinear"


def launch(spec: LaunchSpec, on_progress: Callable[[str], None] = print, keep_open: Iterable[int] = ()) -> None:
    """Run one federation to completion; raise FedLinearError (one line + log paths) if it fails.

    ``on_progress`` receives the ServerApp's ``[fedlinear]`` lines as they arrive.

    Whatever ends it (success, an error, Ctrl-C, or this process being killed, SIGKILL included), no
    process it started outlives it by more than a few seconds, Ray's included: its children get the
    parent-death signal and a :class:`Watchdog` sweeps the rest; on return every one of them is gone.
    ``keep_open``: file descriptors (the run directory's lock) held until the last one is gone.
    """
    _check(spec)
    isolated = resolve_isolation(spec) == "netns"
    watchdog = Watchdog(tree_token(), keep_open)
    try:
        if isolated:
            _launch_isolated(spec, on_progress, watchdog)
        else:
            _launch(spec, on_progress, watchdog)
    finally:
        left = watchdog.finish()
        if left:
            _warn(f"processes of this run could not be stopped (pids {left}); they survived SIGKILL for {WATCHDOG_TIMEOUT:g} s")


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


def _launch(spec: LaunchSpec, on_progress: Callable[[str], None], watchdog: Watchdog | None = None) -> None:
    """The federation itself, in whatever network namespace this process is in (inside a private
    one there is no watchdog here: the token came with the environment, and the namespace ends with
    its first process)."""
    os.makedirs(spec.workdir, exist_ok=True)
    flwr_home = os.path.join(spec.workdir, "flwr-home")
    token = watchdog.token if watchdog is not None else os.environ.get(TREE_ENV)
    env = flower_env(flwr_home, token)
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
    group = ProcessGroup(die_with_parent=True, token=token, on_start=watchdog.watch_group if watchdog else None)
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
        _follow(runner, run_log, on_progress, spec.run_timeout, essential=[("flower-superlink", superlink)])
        if runner.returncode != 0:
            raise FedLinearError(f"flwr run exited with code {runner.returncode}; log {run_log}:\n{tail(run_log)}")
    finally:
        group.stop()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


# How long a failed `flwr run` waits to learn whether the SuperLink died under it.
ESSENTIAL_DEATH_GRACE = 3.0


def _follow(
    runner: subprocess.Popen,
    log_path: str,
    on_progress: Callable[[str], None],
    timeout: float,
    essential: Iterable[tuple[str, subprocess.Popen]] = (),
) -> None:
    """Copy ``flwr run --stream`` output to the log, pass progress lines on, bound the run's time.

    If one of the ``essential`` processes (the SuperLink) dies first, ``flwr run`` is stopped rather
    than left to wait for a server that is gone, and the error says the run can be resumed.
    """
    timed_out = threading.Event()
    died: list[tuple[str, subprocess.Popen]] = []
    essential = list(essential)

    def end_runner() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGTERM)
        try:
            runner.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGKILL)

    def watchdog() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                runner.wait(timeout=0.5)
                return
            except subprocess.TimeoutExpired:
                pass
            gone = [(name, proc) for name, proc in essential if proc.poll() is not None]
            if gone:
                died.extend(gone)
                end_runner()
                return
            if time.monotonic() > deadline:
                timed_out.set()
                end_runner()
                return

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
    if not died and runner.returncode != 0 and essential:
        # `flwr run` may see the SuperLink's connection drop and exit before the watchdog thread's
        # next look: a failed runner is first put down to a dead essential process, if one died
        # (bounded wait: the kernel reaps a SIGKILLed process at once, a loaded machine reports late).
        grace = time.monotonic() + ESSENTIAL_DEATH_GRACE
        while not died and time.monotonic() < grace:
            died.extend((name, proc) for name, proc in essential if proc.poll() is not None)
            if not died:
                time.sleep(0.1)
    if died:
        name, proc = died[0]
        code = proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise RunInterrupted(
            f"{name} (pid {proc.pid}) died during the run ({how}); every process of the run was stopped. "
            "The run directory keeps its checkpoints: run the same command again to resume from the last one"
        )
    if timed_out.is_set():
        raise RunInterrupted(f"the run did not finish within {timeout:g} s (--timeout); log {log_path}")


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
    argv = [*unshare_argv(), sys.executable, "-m", "fedlinear.scripts.launcher", "--probe"]
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
        "SuperLink on 127.0.0.1 while it runs (docs/how-to/shared-machines.md)"
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


def _launch_isolated(spec: LaunchSpec, on_progress: Callable[[str], None], watchdog: Watchdog) -> None:
    """Run ``_launch`` in a private network + PID namespace (``python -m fedlinear.scripts.launcher --inner``)."""
    os.makedirs(spec.workdir, exist_ok=True)
    spec_path = os.path.join(spec.workdir, "isolated-spec.json")
    error_path = os.path.join(spec.workdir, "isolated-error.txt")
    log_path = os.path.join(spec.workdir, "isolated.log")
    with contextlib.suppress(FileNotFoundError):
        os.remove(error_path)
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(dataclasses.replace(spec, isolation="none")), handle)
    on_progress("isolation: the federation runs in a private network namespace (loopback only)")
    group = ProcessGroup(die_with_parent=True, token=watchdog.token, on_start=watchdog.watch_group)
    proc = None
    try:
        proc = group.start(
            "isolated",
            [*unshare_argv(), sys.executable, "-m", "fedlinear.scripts.launcher", "--inner", spec_path, error_path],
            {**os.environ, TREE_ENV: watchdog.token}, None, stdout=subprocess.PIPE,
        )  # fmt: skip
        # the inner launcher bounds start-up and the run itself; this bound is the backstop
        _follow(proc, log_path, on_progress, spec.run_timeout + 3 * spec.startup_timeout + 60)
        if proc.returncode == 0:
            return
        with contextlib.suppress(OSError), open(error_path, encoding="utf-8") as handle:
            text = handle.read().rstrip()
            if text.startswith(INTERRUPTED_MARK):
                raise RunInterrupted(text[len(INTERRUPTED_MARK) :])
            raise FedLinearError(text)
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
                handle.write((INTERRUPTED_MARK if isinstance(exc, RunInterrupted) else "") + str(exc) + "\n")
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
    if sys.argv[1:2] == ["--watchdog"] and len(sys.argv) == 4:
        sys.exit(_watchdog(sys.argv[2], int(sys.argv[3])))
    sys.exit("usage: python -m fedlinear.scripts.launcher --probe | --inner SPEC.json ERROR.txt | --watchdog TOKEN PID")
