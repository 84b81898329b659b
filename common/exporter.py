"""The SavedModel export off the critical path: a separate process imports TensorFlow while the rounds run.

``import tensorflow`` costs ~6 s of CPU and ~0.5 GB per process; the export itself takes well under a
second, and most exports need no TensorFlow at all: the first export of a shape (d, bias) on a machine
leaves a template in the cache, and later ones write the weights into a copy of it
(:mod:`common.export_template`). So the ServerApp starts an *exporter* when a run begins (:func:`for_run`):
a fresh interpreter (``python -m fedlinear.common.exporter``, spawned with ``subprocess``, never forked)
that does not import TensorFlow. Once the ServerApp knows the model's shape it tells the exporter
(:func:`prepare`); if that shape has no template yet, the exporter makes one in a fresh niced interpreter
(TensorFlow's import, once per shape and machine) while the rounds run. At the end of the run
:func:`export_model` hands it the float32 weights and the destination as one JSON line (float32 values
survive JSON exactly); the exporter validates them, writes the SavedModel from the template (or, if no
template can be had, with :func:`common.export.export_savedmodel` in its own process: the same model)
and answers one JSON line saying which wrote it.

One exporter can serve many runs: ``fedlinear sweep`` (and the Python API's ``sweep``) start one
(:func:`shared`) listening on a Unix socket and pass its path to every run in the environment variable
:data:`ENV`; a ServerApp that finds it there uses it instead of starting its own, so a sweep imports
TensorFlow once. ``FEDLINEAR_EXPORTER=in-process`` turns the exporter off (the export then runs in the
ServerApp's process, as it always did before).

Nothing is lost when the exporter cannot help: if it cannot start, dies, answers nonsense or does not
answer within :data:`EXPORT_TIMEOUT_S`, the ServerApp says so in one progress line and exports in its
own process. An error the user can fix (the destination cannot be written: a full disk, S3 refusing) is
reported as the same one-line :class:`FedLinearError` either way.

The exporter never outlives what it serves: a per-run exporter reads its requests from a pipe and exits
when the pipe closes, it asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG`` on
Linux), and it also exits if it sees its parent change (a watchdog thread); every wait on it is bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.common.model import LinearWeights

ENV = "FEDLINEAR_EXPORTER"  # a shared exporter's socket path, or "in-process" (no exporter)
OFF = "in-process"
EXPORT_TIMEOUT_S = 600.0  # TensorFlow's import plus one export, on a very busy machine
CONNECT_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0  # a shared exporter's socket is listening (Python start-up, before TensorFlow)
MAX_LINE = 64 << 20  # a request or reply longer than this is refused
WRITERS = ("template", "tensorflow")  # what wrote a model (the manifest's export.writer)
STARTED = "fedlinear exporter: started"  # the line an exporter writes to stderr once, when it starts


# ----------------------------------------------------------------------------------------------------
# The exporter process
# ----------------------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Be killed when ``parent`` dies: PR_SET_PDEATHSIG where the kernel has it, and a watchdog thread."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def parse_request(line: bytes) -> tuple[LinearWeights, str]:
    """A request (one JSON line: ``kernel`` list of d finite floats, ``bias`` [b] or null, ``uri``), validated."""
    try:
        request = json.loads(line)
    except ValueError:
        raise ValueError("the request is not JSON") from None
    if not isinstance(request, dict):
        raise ValueError("the request is not a JSON object")
    kernel, bias, uri = request.get("kernel"), request.get("bias"), request.get("uri")
    if not isinstance(uri, str) or not uri:
        raise ValueError("uri must be a non-empty string")

    def floats(value: Any, what: str) -> np.ndarray:
        ok = isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       and math.isfinite(v) for v in value)  # fmt: skip
        if not ok:
            raise ValueError(f"{what} must be a non-empty list of finite numbers")
        return np.asarray(value, dtype=np.float64).astype(np.float32)

    k = floats(kernel, "kernel").reshape(-1, 1)
    b = None if bias is None else floats(bias, "bias")
    if b is not None and b.shape != (1,):
        raise ValueError("bias must hold one number")
    return LinearWeights(kernel=k, bias=b), uri


def parse_prepare(line: bytes) -> tuple[int, bool] | None:
    """The shape a ``{"prepare": {"num-features": d, "bias": bool}}`` line announces; None if it is not one."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    shape = message.get("prepare") if isinstance(message, dict) else None
    if not isinstance(shape, dict):
        return None
    d, bias = shape.get("num-features"), shape.get("bias")
    ok = isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 24 and isinstance(bias, bool)
    return (d, bias) if ok else None


class Templates:
    """The templates this exporter makes (each in a fresh interpreter, at most once per shape)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: dict[tuple[int, bool], threading.Event] = {}

    def prepare(self, shape: tuple[int, bool], nice: bool = True) -> threading.Event:
        """Start making ``shape``'s template in the background unless it exists or is being made (niced
        while the rounds run; not when an export waits for it)."""
        from fedlinear.common import export, export_template

        with self.lock:
            done = self.made.get(shape)
            if done is not None:
                return done
            done = self.made[shape] = threading.Event()
        if export.template_available(*shape) or not export_template.enabled():
            done.set()
            return done

        def make() -> None:
            try:
                export_template.create_in_subprocess(*shape, nice=nice)
            except export_template.Unusable as exc:  # the export then runs with TensorFlow, here
                sys.stderr.write(f"fedlinear exporter: no template for {shape}: {exc}\n")
            finally:
                done.set()

        threading.Thread(target=make, name="template", daemon=True).start()
        return done


_templates = Templates()


def _write(weights: LinearWeights, uri: str) -> str:
    """Write the SavedModel; which wrote it (``"template"`` or ``"tensorflow"``)."""
    from fedlinear.common import export, export_template

    shape = (weights.num_features, weights.bias is not None)
    _templates.prepare(shape, nice=False).wait(export_template.CREATE_TIMEOUT_S)  # made now if nobody announced the shape
    return export.export(weights, uri)  # the template; TensorFlow in this process if there is none


def _reply_for(line: bytes) -> dict[str, Any]:
    """Export what ``line`` asks for; the reply says how it went."""
    try:
        weights, uri = parse_request(line)
    except ValueError as exc:
        return {"error": f"bad request: {exc}", "kind": "internal"}
    try:
        writer = _write(weights, uri)
    except FedLinearError as exc:
        return {"error": one_line(exc), "kind": "user"}
    except OSError as exc:  # the destination cannot be written (a full disk, permissions)
        reason = exc.strerror or type(exc).__name__
        return {"error": f"{uri}: cannot write the SavedModel ({reason})", "kind": "user"}
    except Exception as exc:  # noqa: BLE001 - anything else: the ServerApp exports in its own process
        return {"error": one_line(exc), "kind": "internal"}
    return {"ok": True, "pid": os.getpid(), "writer": writer, "tensorflow": "tensorflow" in sys.modules}


def _serve_pipe() -> None:
    """Requests on stdin, replies on stdout, until stdin closes (the ServerApp is done or gone).

    A ``prepare`` line gets no reply (the ServerApp does not wait for it)."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print (TensorFlow's) cannot corrupt the replies
    for line in sys.stdin.buffer:
        shape = parse_prepare(line)
        if shape is not None:
            _templates.prepare(shape)
            continue
        out.write(json.dumps(_reply_for(line)).encode() + b"\n")


def _serve_socket(path: str) -> None:
    """Requests over a Unix socket at ``path`` (one per connection), until the parent dies or SIGTERM."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("listening", flush=True)  # the parent waits for this line before it hands out the path
    os.dup2(2, 1)
    lock = threading.Lock()  # one export at a time (TensorFlow's saving is not meant to run concurrently)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            line = reader.readline(MAX_LINE)
            if line.strip() == b'"ping"':
                conn.sendall(json.dumps({"pong": os.getpid()}).encode() + b"\n")
                return
            shape = parse_prepare(line)
            if shape is not None:
                _templates.prepare(shape)
                conn.sendall(b'{"ok": true}\n')
                return
            with lock:
                reply = _reply_for(line)
            conn.sendall(json.dumps(reply).encode() + b"\n")

    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """``python -m fedlinear.common.exporter --parent PID [--socket PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedlinear.common.exporter")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--socket", default=None)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.write(f"{STARTED} (pid {os.getpid()}, {'shared at ' + args.socket if args.socket else 'one run'})\n")
    sys.stderr.flush()
    if args.socket:
        _serve_socket(args.socket)
    else:
        _serve_pipe()


# ----------------------------------------------------------------------------------------------------
# The ServerApp's side
# ----------------------------------------------------------------------------------------------------


def _argv(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedlinear.common.exporter", "--parent", str(os.getpid()), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ENV, None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # the exporter imports fedlinear as this process does (an editable install, or a checkout on sys.path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    return env


def request_line(weights: LinearWeights, uri: str) -> bytes:
    """The request for ``weights`` (float32 values; JSON keeps them exactly) written to ``uri``."""
    bias = None if weights.bias is None else [float(v) for v in np.asarray(weights.bias, np.float32).ravel()]
    kernel = [float(v) for v in np.asarray(weights.kernel, np.float32).ravel()]
    return json.dumps({"kernel": kernel, "bias": bias, "uri": uri}).encode() + b"\n"


def prepare_line(num_features: int, bias: bool) -> bytes:
    return json.dumps({"prepare": {"num-features": int(num_features), "bias": bool(bias)}}).encode() + b"\n"


class Unavailable(Exception):
    """The exporter cannot do this export (the ServerApp then exports in its own process)."""


def _check_reply(line: bytes) -> dict[str, Any]:
    if not line:
        raise Unavailable("the exporter process ended without answering")
    try:
        reply = json.loads(line)
    except ValueError:
        raise Unavailable("the exporter answered something that is not JSON") from None
    if not isinstance(reply, dict):
        raise Unavailable("the exporter answered something that is not a JSON object")
    if reply.get("ok") is True:
        return reply
    if reply.get("kind") == "user" and isinstance(reply.get("error"), str):
        raise FedLinearError(" ".join(reply["error"].split())[:2000])
    raise Unavailable(f"the exporter failed: {str(reply.get('error'))[:300]}")


class ChildExporter:
    """A per-run exporter: a child process of the ServerApp, talking over its stdin/stdout."""

    how = "exporter process"

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            _argv([]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(),
            close_fds=True,
        )  # fmt: skip
        self.pid = self.proc.pid

    def prepare(self, num_features: int, bias: bool) -> None:
        """Tell the exporter the model's shape (no answer is waited for)."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(prepare_line(num_features, bias))
            self.proc.stdin.flush()

    def export(self, weights: LinearWeights, uri: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(request_line(weights, uri))
            self.proc.stdin.flush()
        except OSError:
            raise Unavailable(f"the exporter process ended (exit code {self.proc.poll()})") from None
        deadline = time.monotonic() + timeout
        fd, buf = self.proc.stdout.fileno(), b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"the exporter process did not answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise Unavailable("the exporter's answer is too long")
        return _check_reply(buf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        if self.proc.poll() is None:  # nothing is left for it to do (it answered, or the run ended without a model)
            self.proc.kill()
        self.proc.wait(timeout=30)
        with contextlib.suppress(OSError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def _ask(path: str, line: bytes, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(CONNECT_TIMEOUT_S)
        conn.connect(path)
        conn.settimeout(timeout)
        conn.sendall(line)
        with conn.makefile("rb") as reader:
            return reader.readline(MAX_LINE)


class SharedExporter:
    """A long-lived exporter serving many runs (``fedlinear sweep``), at a Unix socket path."""

    how = "shared exporter"

    def __init__(self, path: str) -> None:
        self.path = path
        reply = json.loads(_ask(path, b'"ping"\n', CONNECT_TIMEOUT_S) or b"null")
        if not isinstance(reply, dict) or not isinstance(reply.get("pong"), int):
            raise OSError(f"{path}: not a fedlinear exporter")
        self.pid = reply["pong"]

    def prepare(self, num_features: int, bias: bool) -> None:
        """Tell the exporter the model's shape (its answer only says it heard)."""
        with contextlib.suppress(OSError):
            _ask(self.path, prepare_line(num_features, bias), CONNECT_TIMEOUT_S)

    def export(self, weights: LinearWeights, uri: str, timeout: float) -> dict[str, Any]:
        try:
            line = _ask(self.path, request_line(weights, uri), timeout)
        except OSError as exc:  # includes socket.timeout
            raise Unavailable(f"the shared exporter at {self.path}: {one_line(exc)}") from None
        return _check_reply(line)

    def close(self) -> None:
        pass


_current: ChildExporter | SharedExporter | None = None
_lock = threading.Lock()


def start(say: Callable[[str], None] | None = None) -> ChildExporter | SharedExporter | None:
    """The exporter this run's export will use: the shared one named by :data:`ENV`, else a new child."""
    address = os.environ.get(ENV, "")
    if address == OFF:
        return None
    if address:
        try:
            return SharedExporter(address)
        except (OSError, ValueError) as exc:
            if say is not None:
                say(f"export: the shared exporter at {address} does not answer ({one_line(exc)}); starting one")
    try:
        return ChildExporter()
    except OSError as exc:
        if say is not None:
            say(f"export: cannot start an exporter process ({one_line(exc)}); the export will run in this process")
        return None


@contextlib.contextmanager
def for_run(say: Callable[[str], None]) -> Iterator[None]:
    """Start the run's exporter now (TensorFlow imports while the rounds run); stop it when the run ends."""
    global _current
    handle = start(say)
    with _lock:
        previous, _current = _current, handle
    try:
        yield
    finally:
        with _lock:
            _current = previous
        if handle is not None:
            handle.close()


def prepare(num_features: int, bias: bool) -> None:
    """The run's model will have this shape: its exporter makes the shape's template now if there is none
    (TensorFlow's import then overlaps the rounds); nothing happens without an exporter."""
    with _lock:
        handle = _current
    if handle is not None:
        handle.prepare(num_features, bias)


def export_model(weights: LinearWeights, uri: str, say: Callable[[str], None],
                 timeout: float = EXPORT_TIMEOUT_S) -> dict[str, Any]:  # fmt: skip
    """Write the SavedModel of ``weights`` to ``uri`` through the run's exporter, or in this process if there
    is none or it fails; returns how (the manifest's ``export``). FedLinearError if the destination refuses."""
    with _lock:
        handle = _current
    if handle is not None:
        try:
            reply = handle.export(weights, uri, timeout)
            writer = reply.get("writer")
            return {"by": handle.how, "pid": handle.pid} | ({"writer": writer} if writer in WRITERS else {})
        except Unavailable as exc:
            say(f"export: {exc}; exporting in this process")
    from fedlinear.common.export import export

    try:
        writer = export(weights, uri)
    except OSError as exc:
        raise FedLinearError(f"{uri}: cannot write the SavedModel ({exc.strerror or type(exc).__name__})") from None
    return {"by": "in-process", "pid": os.getpid(), "writer": writer}


@contextlib.contextmanager
def shared(log_path: str | None = None) -> Iterator[str | None]:
    """One exporter for every run started inside the block (their environment names it: :data:`ENV`).

    Yields its socket path, or None (each run then starts its own) if it cannot start or :data:`ENV` is
    already set (an outer sweep's exporter, or ``in-process``). Its stderr (one :data:`STARTED` line) goes to
    ``log_path`` when given."""
    if os.environ.get(ENV):
        yield None
        return
    directory = tempfile.mkdtemp(prefix="fedlinear-exporter-")
    path = os.path.join(directory, "socket")
    proc = None
    try:
        try:
            with open(log_path or os.devnull, "ab") as log:
                proc = subprocess.Popen(_argv(["--socket", path]), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=log, env=_env(), close_fds=True)  # fmt: skip
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
            if not ready or proc.stdout.readline() != b"listening\n":
                raise OSError("the exporter did not start listening")
        except OSError:
            yield None
            return
        os.environ[ENV] = path
        try:
            yield path
        finally:
            os.environ.pop(ENV, None)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(directory)


if __name__ == "__main__":
    main()
