"""The stall detector: a run whose Flower runtime lost its task token ends in bounded time.

Under heavy load (or when a process is suspended) the ServerApp's process (``flwr-simulation`` or
``flwr-serverapp``) misses its heartbeats to the SuperLink; after ``HEARTBEAT_PATIENCE x
HEARTBEAT_DEFAULT_INTERVAL`` (2 x 30 s in Flower 1.42, ``flwr/common/constant.py``) the SuperLink
expires the task's token (``flwr/supercore/corestate/in_memory_corestate.py``), answers the process
with 401 "Runtime task-token authentication failed" and SuperExec starts another one, which may fail
the same way. ``flwr run --stream`` then waits for a run that makes no progress, until ``--timeout``.

Those constants are imported by value into Flower's modules; Flower 1.42 reads no environment
variable or flag for them, so they cannot be configured without patching Flower, and fedlinear does
not patch it. Instead :class:`StallDetector` watches two things and calls the run stalled when both
hold: no progress (no ``flwr run`` output line, no change to the run directory's ``history.json`` or
``checkpoints/latest.json``) for :data:`STALL_SECONDS` (``FEDLINEAR_STALL_SECONDS`` overrides it),
and, since the last progress, the runtime's authentication failures (the 401 answers to
``/v1/runtime/...`` calls) in the SuperLink's log. The launcher then
stops the run with one line naming the cause; the checkpoints stay, so the same command resumes.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import time


def flower_constants(*names: str, module: str = "flwr.common.constant") -> tuple:
    """The values of ``names`` in Flower's ``module``, read from its installed source without importing
    it (``import flwr.common.constant`` imports all of ``flwr``: numpy, grpc, protobuf, ~0.45 s and
    ~50 MiB in each launcher process, which needs two numbers). A name that is not a plain literal
    assignment there (a Flower upgrade changed it) is taken from the imported module instead."""
    values: dict[str, object] = {}
    spec = importlib.util.find_spec("flwr")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], *module.split(".")[1:]) + ".py"
        try:
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read(), path)
        except (OSError, SyntaxError, ValueError):
            tree = None
        for node in tree.body if tree is not None else ():
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
            if isinstance(target, ast.Name) and target.id in names and getattr(node, "value", None) is not None:
                try:
                    values[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    if any(name not in values for name in names):
        imported = importlib.import_module(module)
        values.update({name: getattr(imported, name) for name in names if name not in values})
    return tuple(values[name] for name in names)


HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE = flower_constants("HEARTBEAT_DEFAULT_INTERVAL", "HEARTBEAT_PATIENCE")

# The task token lives HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL without a heartbeat; a run with
# no progress for twice that, after the token was refused, is not coming back.
STALL_SECONDS = 2.0 * HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
AUTH_FAILURE = "Runtime task-token authentication failed"
# For tests (and the impatient): how long without progress counts as stalled, instead of STALL_SECONDS.
STALL_ENV = "FEDLINEAR_STALL_SECONDS"
PROGRESS_FILES = ("history.json", os.path.join("checkpoints", "latest.json"))


class StallDetector:
    """``check()`` returns the one-line cause once the run is stalled (None until then).

    ``superlink_log``: the SuperLink's log file; ``run_dir``: the run directory (its progress files are
    watched when it is local; an ``s3://`` run dir relies on the output lines); ``stall_seconds``: how
    long without progress, after an authentication failure, counts as stalled.
    """

    def __init__(self, superlink_log: str, run_dir: str = "", stall_seconds: float | None = None,
                 clock=time.monotonic) -> None:  # fmt: skip
        if stall_seconds is None:
            stall_seconds = float(os.environ.get(STALL_ENV, "") or STALL_SECONDS)
        self.superlink_log = superlink_log
        self.run_dir = run_dir if run_dir and not run_dir.startswith("s3://") else ""
        self.stall_seconds = float(stall_seconds)
        self.clock = clock
        self.last_progress = clock()
        self.offset = 0
        self.failures = 0  # authentication failures since the last progress
        self.stamps = self._stamps()

    def progress(self) -> None:
        """The run moved (a line of ``flwr run`` output): the clock starts again."""
        self.last_progress = self.clock()
        self.failures = 0

    def _stamps(self) -> tuple:
        out = []
        for name in PROGRESS_FILES:
            try:
                st = os.stat(os.path.join(self.run_dir, name)) if self.run_dir else None
                out.append(None if st is None else (st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def _read_log(self) -> None:
        try:
            with open(self.superlink_log, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            if AUTH_FAILURE in line:  # one ERROR line per refused call (uvicorn's access line beside it says 401)
                self.failures += 1

    def check(self) -> str | None:
        stamps = self._stamps()
        if stamps != self.stamps:
            self.stamps = stamps
            self.progress()
        self._read_log()
        if self.failures == 0:
            return None
        idle = self.clock() - self.last_progress
        if idle < self.stall_seconds:
            return None
        return (
            f"the run stalled: no progress for {idle:.0f} s while the SuperLink refused the ServerApp process's "
            f"task token {self.failures} time(s) (\"{AUTH_FAILURE}\": it missed Flower's runtime heartbeat, "
            f"{HEARTBEAT_PATIENCE} x {HEARTBEAT_DEFAULT_INTERVAL} s, usually a heavily loaded machine); every process "
            "of the run was stopped; run the same command again to resume from the last checkpoint"
        )
