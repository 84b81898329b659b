"""The processes of one launch, and stopping every one of them.

Every process a launch starts is stopped (the whole process tree, by PID) on success, failure and
Ctrl-C, and within seconds when the launcher itself is killed, by SIGKILL too: its children get the
parent-death signal (:class:`ProcessGroup` with ``die_with_parent``), and a :class:`Watchdog`
(``python -m fedlinear.scripts.local.processes --watchdog TOKEN PID``) sweeps the rest, Ray included,
finding them however they left the process tree (:class:`Tree`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO

import psutil

import fedlinear
from fedlinear.common.errors import FedLinearError


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# Every process one launch starts carries this variable (a fresh token per launch) in its environment,
# and every descendant inherits it: even one reparented to init or in a session of its own (Ray's
# workers, a `flwr-serverapp` whose SuperLink died) is found by it, and nothing else is.
TREE_ENV = "FEDLINEAR_TREE"


def stop_all(procs: Iterable[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM each process, then SIGKILL those still alive after ``grace`` seconds (and wait for them)."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


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
            alive = [p for p in self._members() if running(p)]
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


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL if the launcher dies, even by SIGKILL (unshare's
    --kill-child then kills the namespace's init, and the kernel everything else in the namespace)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: nothing imported after it

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


# A parent that stops its `fedlinear` child with SIGINT (the sweep's subprocess runner, the bench) sets this
# in the child's environment. A process started with SIGINT ignored (what a non-interactive shell gives its
# background jobs: `fedlinear sweep ... &` in a script, `(cmd &)`) passes that on to its children, and the
# SIGINT meant to stop a run would be lost: the run went on until it was killed a minute later, its
# processes with no chance to stop cleanly. The child then restores Python's handler; a SIGINT ignored
# for anyone else stays ignored.
SIGINT_STOPS_ENV = "FEDLINEAR_SIGINT_STOPS"


def restore_sigint_if_asked() -> None:
    """In a ``fedlinear`` command's main thread: honour :data:`SIGINT_STOPS_ENV` (and drop it, so the
    processes the command starts do not inherit it)."""
    if os.environ.pop(SIGINT_STOPS_ENV, "") == "1" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def die_with(parent: int, code: int = 1) -> None:
    """In a process forked (not exec'd) from ``parent``: be killed when it dies (``PR_SET_PDEATHSIG`` on
    Linux; elsewhere the caller's own pipe closing must end it), and exit with ``code`` at once if it
    died before that was set (common/exporter.py has its own: ``common`` imports nothing of ``scripts``)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(code)


# How long the watchdog keeps killing a launch's processes before it gives up and names the survivors.
WATCHDOG_TIMEOUT = 60.0


class Watchdog:
    """A small process (``python -m fedlinear.scripts.local.processes --watchdog TOKEN``) that outlives the launcher.

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
            [sys.executable, "-m", "fedlinear.scripts.local.processes", "--watchdog", token, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, pass_fds=tuple(keep_open),
            cwd=fedlinear.app_dir(),
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
    left = [p.pid for p in victims if running(p)]
    if left:
        raise FedLinearError(f"processes of the flower-superlink on 127.0.0.1:{port} survive SIGKILL: {left}")
    return (
        f"stopped the flower-superlink on 127.0.0.1:{port} (pid {proc.pid}) "
        f"and the {len(victims) - 1} processes it had started"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--watchdog"] and len(sys.argv) == 4:
        sys.exit(_watchdog(sys.argv[2], int(sys.argv[3])))
    sys.exit("usage: python -m fedlinear.scripts.local.processes --watchdog TOKEN PID")
