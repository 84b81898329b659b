"""``flwr-clientapp`` as the warm ClientApp executor's stand-in (scripts/local/warm_clientapp.py).

The launcher copies this file, behind a ``#!<python> -IS`` line, to ``<warm dir>/bin/flwr-clientapp``
and puts that directory first on the SuperNodes' ``PATH``: Flower 1.42's SuperExec starts the
``flwr-clientapp`` it finds there (``SubprocessExecutor.launch``, by name). It imports nothing but the
standard library (``-S``: not even site-packages), so it starts in ~10 ms, and asks the warm executor,
over its unix socket, to fork a process that runs Flower's own ``flwr-clientapp`` with this command
line, environment, working directory and standard streams. It then stands for that process: it
exits with its exit code (or dies of its signal), and passes on SIGTERM, SIGINT and SIGHUP to it.

When the executor cannot be reached or refuses, it runs the real ``flwr-clientapp`` in its place
(``exec``), after one line on stderr: the run is the same, only slower.
"""

import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "FEDLINEAR_WARM_CLIENTAPP"  # the executor's unix socket
REAL_ENV = "FEDLINEAR_REAL_CLIENTAPP"  # Flower's own flwr-clientapp, for the cold start
CONNECT_TIMEOUT = 10.0


def cold(reason: str) -> None:
    real = os.environ.get(REAL_ENV, "")
    print(f"[fedlinear] warm ClientApp executor not used ({reason}): starting {real or 'flwr-clientapp'} cold",
          file=sys.stderr, flush=True)  # fmt: skip
    if not real:
        sys.exit(f"[fedlinear] {REAL_ENV} is not set: no flwr-clientapp to start")
    os.execv(real, [real, *sys.argv[1:]])


def lines(sock: socket.socket):
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode("ascii", "replace")


def main() -> None:
    path = os.environ.get(SOCKET_ENV, "")
    if not path:
        cold(f"{SOCKET_ENV} is not set")
    request = json.dumps({"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(path)
        payload = struct.pack("!I", len(request)) + request
        sent = socket.send_fds(sock, [payload], [0, 1, 2])
        if sent < len(payload):
            sock.sendall(payload[sent:])
        sock.settimeout(None)
        replies = lines(sock)
        first = next(replies, "")
    except OSError as err:
        cold(f"{path}: {err}")
    if not first.startswith("pid "):
        cold(first or "the executor closed the connection")
    pid = int(first.split()[1])

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for line in replies:
        kind, _, value = line.partition(" ")
        if kind == "exit":
            sys.exit(int(value))
        if kind == "signal":
            signum = int(value)
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):  # SIGKILL, SIGSTOP: no handler to reset
                pass
            os.kill(os.getpid(), signum)
            sys.exit(128 + signum)
    sys.exit("[fedlinear] the warm ClientApp executor went away before its ClientApp ended")


if __name__ == "__main__":
    main()
