"""A warm ClientApp executor for ``processes`` mode: Flower's own ``flwr-clientapp``, forked ready-imported.

In Flower 1.42's deployment runtime every message a node handles is a fresh ``flwr-clientapp`` process
(docs/explanation/processes-mode.md), and ~1.5 of its ~1.9 CPU-seconds are Flower's imports
(``sqlalchemy``, ``fastapi``, ``pydantic``, ``cryptography``, ... which ``flwr-clientapp`` loads whatever
the app). On a 2-core machine those imports are most of a run: 10 clients x 7 stages is 70 processes.

This module is one process per run, started by the launcher (:class:`WarmClientApps`), that imports
what ``flwr-clientapp`` imports (``flwr.supernode.cli``, NumPy) **and nothing of the
app**, then listens on a unix socket. The ``flwr-clientapp`` that Flower's SuperExec starts is the
stand-in of scripts/local/clientapp_shim.py (first on the SuperNodes' ``PATH``): it sends its command
line, environment, working directory and standard streams here, and this process forks a child that
takes them on and runs Flower's ``flwr_clientapp()``, the function Flower's own ``flwr-clientapp``
console script runs: the same token, the same SuperNode API, the same FAB installed and the app
imported from it, the same message handled. What the child does not redo is Python's start and
Flower's imports.

What differs from a cold ``flwr-clientapp``, and why it does not matter here:

* the child is a fork: its interpreter was started with the launcher's environment, then takes on the
  one its SuperExec gave (``os.environ``); the SuperNodes are started with that same environment, so
  only what the SuperExec adds differs, and that is in ``os.environ`` before the app is imported;
* the app's modules are not inherited: the executor never imports them, and the child drops every
  ``fedlinear`` module (this one's package) before Flower loads the app from its FAB;
* NumPy's global random state would be the parent's in every child: it is reseeded from the OS in each
  (fedlinear draws from seeded generators; an app that uses the global state gets what a fresh process
  gets); Python's ``random`` reseeds itself on fork, OpenSSL (``cryptography``) detects the fork;
* a child's parent is the executor, not the SuperExec (whose child is the stand-in): the child's
  environment names its stand-in (``FEDLINEAR_WARM_STAND_IN``), where a cold ClientApp's chain of
  parents would start (the test hook that kills a task's SuperNode, clients/faults.py, follows it);
* the children write the bytecode of the modules they compile (the app's, from the FAB installed fresh
  for the run) to the executor's private directory (``sys.pycache_prefix``), removed at the end of the
  run, even where ``PYTHONDONTWRITEBYTECODE`` is set: so the app is compiled once per run, not in every
  ClientApp (with that variable set, importing fedlinear's ClientApp costs ~60 ms of CPU, ~15 ms from bytecode);
* every child has the executor's string-hash seed (``PYTHONHASHSEED``), where fresh processes would each
  draw their own: nothing of a run depends on it (a seed's weights are the same bytes either way,
  tests/e2e/test_federation.py);
* the child is named ``flwr-clientapp`` (its ``comm``, what ``ps -o comm`` and psutil's ``name()`` show);
  its command line stays this module's.

The executor forks only while it is single-threaded (it checks before each fork), accepts only
connections from its own user (``SO_PEERCRED``) on a socket in a directory only that user can enter,
and runs nothing but ``flwr_clientapp()``. When anything about it fails, the stand-in starts the real
``flwr-clientapp`` instead, after a line on stderr. If a Flower upgrade stops starting ``flwr-clientapp``
by name from ``PATH``, the launcher says so at the end of the run (no ClientApp was forked) and
tests/e2e/test_federation.py fails; if the console script no longer runs ``flwr.supernode.cli:flwr_clientapp``,
the executor does not start and the launcher says so at the start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clientapp_shim.py")
WARM_ENV = "FEDLINEAR_WARM_CLIENTAPPS"  # 0 or 1: overrides LaunchSpec.warm_clientapps (scripts/local/launch.py)
SOCKET_ENV = "FEDLINEAR_WARM_CLIENTAPP"  # as in clientapp_shim.py
REAL_ENV = "FEDLINEAR_REAL_CLIENTAPP"
STAND_IN_ENV = "FEDLINEAR_WARM_STAND_IN"  # in a child's environment: its stand-in's pid (child of the SuperExec)
FORKED = "forked"  # the executor's log line per ClientApp it started (counted by WarmClientApps.served)
ENDED = "ended"  # ... and per ClientApp it reaped: how it ended, its CPU-seconds
READ_TIMEOUT = 10.0  # seconds a stand-in has to send its request
MAX_REQUEST = 1 << 20
ENTRY = "flwr.supernode.cli:flwr_clientapp"  # what Flower 1.42's flwr-clientapp console script runs (checked)


class Executor:
    """The executor's loop: accept a stand-in's request, fork its ClientApp, tell it the child's pid and,
    when the child is reaped, how it ended."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.owner = os.getpid()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(64)
        self.children: dict[int, socket.socket] = {}  # pid -> its stand-in's connection
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.stopping = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._stop)

    def _stop(self, *_args) -> None:
        self.stopping = True

    def serve(self) -> dict | None:
        """Serve until stopped (then None); in a forked child, return its request."""
        try:
            while not self.stopping:
                readable, _, _ = select.select([self.listener, self.wake_r], [], [], 1.0)
                if self.wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                self._reap()
                if self.listener in readable:
                    request = self._accept()
                    if request is not None:
                        return request  # in the child
        finally:
            if os.getpid() == self.owner:
                self.listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        return None

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            line = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
            print(f"{ENDED} {pid} {line.replace(' ', '=')} cpu={usage.ru_utime + usage.ru_stime:.3f}", flush=True)
            with contextlib.suppress(OSError):
                conn.sendall(line.encode() + b"\n")
            conn.close()

    def _accept(self) -> dict | None:
        conn, _ = self.listener.accept()
        try:
            request, fds = self._read(conn)
        except (OSError, ValueError) as err:
            with contextlib.suppress(OSError):
                conn.sendall(f"refused {err}\n".encode())
            conn.close()
            return None
        if threading.active_count() != 1:
            self._refuse(conn, fds, f"the executor has {threading.active_count()} threads: forking is unsafe")
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_child(fds)
            request["conn"] = conn
            return request
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        conn.sendall(f"pid {pid}\n".encode())
        print(f"{FORKED} {pid}", flush=True)
        return None

    def _read(self, conn: socket.socket) -> tuple[dict, list[int]]:
        peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid, uid, _gid = struct.unpack("3i", peer)
        if uid != os.getuid():
            raise ValueError(f"connection from uid {uid}, not this executor's user")
        conn.settimeout(READ_TIMEOUT)
        data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
        try:
            if len(fds) != 3 or len(data) < 4:
                raise ValueError("a request carries its length and three file descriptors")
            (size,) = struct.unpack("!I", data[:4])
            if size > MAX_REQUEST:
                raise ValueError(f"a request of {size} bytes")
            body = data[4:]
            while len(body) < size:
                chunk = conn.recv(size - len(body))
                if not chunk:
                    raise ValueError("the request ended early")
                body += chunk
            request = json.loads(body)
            if not (isinstance(request, dict) and isinstance(request.get("argv"), list)
                    and isinstance(request.get("env"), dict) and isinstance(request.get("cwd"), str)):  # fmt: skip
                raise ValueError("a request is {argv, env, cwd}")
            request["stand-in"] = peer_pid
        except Exception:
            for fd in fds:
                os.close(fd)
            raise
        conn.settimeout(None)
        return request, fds

    def _refuse(self, conn: socket.socket, fds: list[int], reason: str) -> None:
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(f"refused {reason}\n".encode())
        conn.close()

    def _become_child(self, fds: list[int]) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.listener.close()
        for other in self.children.values():
            other.close()
        self.children.clear()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)


def run_child(request: dict, entry) -> None:
    """In the forked child: take on the stand-in's command line, environment and directory, and run
    ``entry`` (Flower's ``flwr_clientapp()``, which ends the process with its exit code)."""
    request["conn"].close()  # the executor tells the stand-in how this process ended
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    os.environ[STAND_IN_ENV] = str(request["stand-in"])  # where a cold one's parent chain would start
    os.chdir(request["cwd"])
    sys.argv = [str(a) for a in request["argv"]]
    real = os.environ.get(REAL_ENV)
    if real and sys.path:
        sys.path[0] = os.path.dirname(real)  # as the console script's own directory
    with contextlib.suppress(OSError):
        with open("/proc/self/comm", "w") as comm:
            comm.write("flwr-clientapp")
    for name in [n for n in sys.modules if n == "fedlinear" or n.startswith("fedlinear.")]:
        del sys.modules[name]  # the app (and this package) come from the FAB, as in a fresh process
    if request.get("pycache"):
        # the FAB's modules, installed fresh for the run, compiled once per run rather than in every
        # ClientApp (~45 ms of CPU for fedlinear's app where PYTHONDONTWRITEBYTECODE is set): into the
        # executor's private directory, removed with it, never beside the sources
        sys.pycache_prefix = request["pycache"]
        sys.dont_write_bytecode = False
    import numpy

    numpy.random.seed()
    sys.exit(entry())  # as the console script does


def load_entry(ref: str):
    """``module:function``, imported (the executor imports it before it listens)."""
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


def executor_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--entry", default=ENTRY, help=f"what a child runs (default {ENTRY}: Flower's flwr-clientapp)")
    parser.add_argument("--pycache", help="the children's bytecode cache (sys.pycache_prefix; default: Python's own)")
    args = parser.parse_args(argv)
    # what a cold flwr-clientapp imports before it reaches the app (and NumPy, which every app uses)
    import numpy  # noqa: F401

    if args.entry == ENTRY:
        from importlib.metadata import entry_points

        found = [e.value for e in entry_points(group="console_scripts", name="flwr-clientapp")]
        if found != [ENTRY]:  # a Flower upgrade moved it: start nothing, the stand-ins start Flower's own
            sys.exit(f"flwr-clientapp runs {found or 'nothing known'}, not {ENTRY}: the warm executor does not start")
    entry = load_entry(args.entry)
    executor = Executor(args.socket)  # listening means ready
    print(f"ready {args.socket}", flush=True)
    request = executor.serve()
    if request is None:
        return
    request["pycache"] = args.pycache
    run_child(request, entry)


def install_shim(bindir: str) -> str:
    """``bindir/flwr-clientapp``: the stand-in (scripts/local/clientapp_shim.py) run by this Python with
    ``-IS`` (no site-packages, no PYTHON* variables: a ~10 ms start); its path."""
    os.makedirs(bindir, 0o700, exist_ok=True)
    shim = os.path.join(bindir, "flwr-clientapp")
    with open(SHIM, encoding="utf-8") as src, open(shim, "w", encoding="utf-8") as dst:
        dst.write(f"#!{sys.executable} -IS\n" + src.read())
    os.chmod(shim, 0o700)
    return shim


class WarmClientApps:
    """The launcher's side: the executor process, the stand-in on the SuperNodes' PATH, the count of
    ClientApps it started.

    ``env`` is the environment the SuperNodes get: the stand-in's directory first on ``PATH``, the
    socket and Flower's own ``flwr-clientapp`` named. ``start`` returns before the executor is ready
    (its imports take ~1.5 s, while the SuperLink starts); :meth:`wait_ready` waits for it.
    """

    def __init__(self, group, env: dict[str, str], log_path: str) -> None:
        bindir = os.path.dirname(os.path.abspath(sys.executable))
        self.real = os.path.join(bindir, "flwr-clientapp")
        if not os.access(self.real, os.X_OK):
            self.real = shutil.which("flwr-clientapp", path=env.get("PATH")) or ""
        self.dir = tempfile.mkdtemp(prefix="fl-warm-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.socket = os.path.join(self.dir, "s")  # short: a unix socket's path fits in 107 bytes
        shim_dir = os.path.dirname(install_shim(os.path.join(self.dir, "bin")))
        self.log_path = log_path
        self.env = {**env, "PATH": shim_dir + os.pathsep + env.get("PATH", ""), SOCKET_ENV: self.socket,
                    REAL_ENV: self.real}  # fmt: skip
        self.proc = group.start("warm-clientapp", [sys.executable, "-m", "fedlinear.scripts.local.warm_clientapp",
                                                   "--socket", self.socket, "--pycache", os.path.join(self.dir, "pycache")],
                                     env, log_path)  # fmt: skip

    def wait_ready(self, timeout: float) -> bool:
        """True once the executor listens; False (the stand-ins start ClientApps cold) if it died or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.socket):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def served(self) -> int:
        """How many ClientApps the executor forked so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return sum(1 for line in log if line.startswith(FORKED + " "))
        except OSError:
            return 0

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    executor_main()
