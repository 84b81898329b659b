"""Isolation: the whole federation in a private network (and PID) namespace.

Isolation (``LaunchSpec.isolation``): Flower 1.42's Control API has no caller authentication, so on a
shared machine any local user or program that reaches the SuperLink's loopback port could submit a
run (code that every SuperNode executes) or join as a SuperNode. With ``netns`` (``auto`` where the
platform allows it) the whole federation runs in a private network namespace whose only interface
is its own loopback, plus a private PID namespace, made by ``unshare`` (as root ``unshare --net``,
otherwise an unprivileged user namespace ``unshare --user --map-root-user --net``): no process
outside can reach its ports, and when the namespace's first process ends the kernel ends every
other one in it and the network namespace goes with them. Runs that need the network outside
(data on ``s3://``, ``--ray-address``) are not isolated (``auto`` says so in a one-line warning).

This module decides (:func:`resolve_isolation`) and sets the namespace up: ``unshare``'s argv, the
probe (``python -m fedlinear.scripts.local.isolation --probe``), and the namespace's first process
(:func:`namespace_init`), which runs the federation it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local.spec import INTERRUPTED_MARK, PROGRESS_MARK, LaunchSpec, RunInterrupted
from fedlinear.scripts.local.spec import warn as warn_line


# The inner launcher's note of a process it started, its pid inside the private PID namespace; the outer
# launcher turns it into the host pid (:class:`HostPids`), so an error names a pid the user can act on.
PID_NOTE = "pid in namespace: "
_inside_namespace = False  # set in the namespace's launcher (namespace_init's child)


def note_pid(on_progress: Callable[[str], None], name: str, pid: int) -> None:
    """Inside the private PID namespace: tell the outer launcher ``name``'s pid here (no-op outside)."""
    if _inside_namespace:
        on_progress(f"{PID_NOTE}{name} {pid}")


class HostPids:
    """The outer launcher's map from pids inside the private PID namespace to host pids, made while the
    processes live (``/proc/<pid>/status`` ``NSpid`` of the namespace's processes): an error from inside
    names ``flower-superlink (pid 3)``, which is no pid anyone outside can ``kill`` or ``ps``."""

    def __init__(self) -> None:
        self.root: int | None = None  # the `unshare` process (host pid)
        self.init: int | None = None  # the namespace's first process (host pid)
        self.found: dict[int, int] = {}

    def note(self, line: str) -> bool:
        """Take a :data:`PID_NOTE` line (True), or leave any other line alone (False)."""
        if not line.startswith(PID_NOTE):
            return False
        import psutil

        with contextlib.suppress(psutil.Error, TypeError, IndexError):
            self.init = psutil.Process(self.root).children()[0].pid
        with contextlib.suppress(ValueError):
            inner = int(line.rsplit(" ", 1)[1])
            host = self._host_pid(inner)
            if host is not None:
                self.found[inner] = host
        return True

    def _namespace_processes(self) -> list[int]:
        import psutil

        with contextlib.suppress(psutil.Error, TypeError):
            return [p.pid for p in psutil.Process(self.root).children(recursive=True)]
        return []

    def _host_pid(self, inner: int) -> int | None:
        for pid in self._namespace_processes():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/status", encoding="ascii") as handle:
                nspid = next(line for line in handle if line.startswith("NSpid:")).split()[1:]
                if len(nspid) > 1 and int(nspid[-1]) == inner:
                    return pid
        return None

    def translate(self, text: str) -> str:
        """``(pid 3)`` -> ``(pid 48213 on this host; pid 3 in the run's private PID namespace)``."""
        init = self.init or self.root

        def host(match: re.Match) -> str:
            inner = int(match.group(1))
            if inner in self.found:
                return f"(pid {self.found[inner]} on this host; pid {inner} in the run's private PID namespace)"
            return f"(pid {inner} in the run's private PID namespace, whose first process is pid {init} on this host)"

        return re.sub(r"\(pid (\d+)\)", host, text)


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
    argv = [*unshare_argv(), sys.executable, "-m", "fedlinear.scripts.local.isolation", "--probe"]
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
    (warn or warn_line)(
        f"federation not isolated: {why[0]}; other users and programs on this machine can reach its "
        "SuperLink on 127.0.0.1 while it runs (docs/how-to/shared-machines.md)"
    )
    return "none"


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


def namespace_init(
    spec_path: str, error_path: str, run: Callable[[LaunchSpec, Callable[[str], None]], None]
) -> int:
    """PID 1 of the namespaces: bring lo up, ``run`` the federation in a child, reap every orphan,
    forward signals; when this returns, the kernel ends whatever is still running in the namespace."""
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
            global _inside_namespace
            _inside_namespace = True
            run(spec, lambda line: print(PROGRESS_MARK + line, flush=True))
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
    sys.exit("usage: python -m fedlinear.scripts.local.isolation --probe")
