"""The run directory: history, metrics, checkpoints, manifest and status, local or on S3.

Layout under ``run-dir``::

    status.json              {"status": "running" | "completed" | "failed", "message": ...}
    history.json             per-round records, the reference, failures
    metrics.csv              the same rounds as a flat table
    checkpoints/round-NNNN.npz   global weights after round N (atomic writes)
    checkpoints/latest.json  {"round": N, "file": "round-NNNN.npz"}
    model/                   the SavedModel (serving_default: x float32 [None, d] -> y [None, 1])
    manifest.json            resolved config, seed, versions, data fingerprints, final metrics

Every write goes through :mod:`common.storage`, so each file appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.common.model import BIAS, KERNEL, LinearWeights
from fedlinear.common.tboard import ScalarLog

# What manifest.json's ``wall-time-s`` measures; the summary of ``fedlinear run`` and ``fedlinear report``
# print that one figure with these words (a resumed run: its last session).
WALL_TIME_MEANING = "the ServerApp's, from its start to the exported model; manifest.json wall-time-s"


def wall_time_text(seconds: float) -> str:
    """``26.4 s (the ServerApp's, ...)``: the run's wall time, worded and rounded the same everywhere."""
    return f"{seconds:.1f} s ({WALL_TIME_MEANING})"


def trained_rounds(rows: list[dict[str, Any]]) -> int:
    """How many rounds of training ``history.json``'s rows record: round 0 (the initial model) is not one."""
    return len({row["round"] for row in rows if isinstance(row.get("round"), int) and row["round"] >= 1})


# Room held on the run directory's filesystem for the final status.json (RunStore.hold_reserve).
RESERVE_FILE = ".reserve"
RESERVE_BYTES = 256 * 1024

METRIC_COLUMNS = (
    "round",
    "elapsed-s",
    "clients-ok",
    "clients-failed",
    "train-loss",
    "test-mse",
    "reference-test-mse",
    "test-mse-ratio",
    "excess-test-mse",
    "train-mse",
    "excess-train-mse",
    "weight-distance",
    "eval-mse",
    "epsilon",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), indent=2, sort_keys=False) + "\n"


class RunStore:
    """Reads and writes one run directory (absolute local path or ``s3://`` URI).

    With ``background=True`` the per-round files (history, metrics, checkpoints) are serialised on
    the caller's thread and written, in order, by one writer thread, so a round does not wait for
    fsync or an S3 upload. :meth:`flush` waits for every pending write and re-raises the first error.
    """

    def __init__(self, run_dir: str, background: bool = False) -> None:
        self.run_dir = run_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runstore") if background else None
        self._pending: list[Future] = []
        self._scalars = ScalarLog(run_dir, METRIC_COLUMNS)  # RUN_DIR/tensorboard, kept in step with the history
        self._error: BaseException | None = None  # the first failed background write; later ones are skipped

    def uri(self, *parts: str) -> str:
        return storage.join(self.run_dir, *parts)

    def _write(self, blobs: list[tuple[str, bytes]]) -> None:
        """Write ``blobs`` in order (each atomically); in the background, after every earlier write.

        Once a background write has failed, nothing queued behind it is written (a checkpoint queued
        after a failed history write would be a round the history lacks), and every later call
        raises that first error.
        """
        if self._executor is None:
            for uri, data in blobs:
                storage.write_bytes(uri, data)
            return
        self._pending = [f for f in self._pending if not f.done()]
        if self._error is not None:
            raise self._error  # surface a failed write now, not at the end

        def job() -> None:
            if self._error is not None:
                return  # an earlier write failed: write nothing after it
            try:
                for uri, data in blobs:
                    storage.write_bytes(uri, data)
            except BaseException as exc:
                self._error = exc
                raise

        self._pending.append(self._executor.submit(job))

    def flush(self) -> None:
        """Wait for every pending background write, then re-raise the first failure (if any)."""
        self._wait()
        if self._error is not None:
            raise self._error

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            wait(pending)

    # status -----------------------------------------------------------------------------
    def hold_reserve(self) -> None:
        """Hold :data:`RESERVE_BYTES` of the run directory's filesystem (``RUN_DIR/.reserve``) for the last
        ``status.json``: a run that fills its disk still says ``failed``, and why, where every later write
        fails. Locally only (S3 does not fill). :meth:`write_status` gives it up to write a final status that
        finds no room, and at ``completed``; a failed run keeps it for its resume."""
        if storage.is_s3(self.run_dir) or os.path.exists(self._reserve_path()):
            return
        try:
            storage.write_bytes(self.uri(RESERVE_FILE), b"\0" * RESERVE_BYTES)
        except FedLinearError:
            pass  # no room even for this: the run fails on its first write, as it would without a reserve

    def _reserve_path(self) -> str:
        return os.path.join(self.run_dir, RESERVE_FILE)

    def release_reserve(self) -> None:
        if not storage.is_s3(self.run_dir):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._reserve_path())

    def write_status(self, status: str, message: str = "", **extra: Any) -> None:
        if status == "failed":
            self._wait()  # a run that failed says so even when the failure was a write in the background
        else:
            self.flush()  # a status never overtakes the files it speaks for
        text = dumps({"status": status, "message": message, **extra})
        try:
            storage.write_text(self.uri("status.json"), text)
        except FedLinearError:
            if status == "running" or not os.path.exists(self._reserve_path()):
                raise
            self.release_reserve()  # the room held for this write (a full disk); a resumed run holds it again
            storage.write_text(self.uri("status.json"), text)
        if status == "completed":
            self.release_reserve()

    def read_status(self) -> dict[str, Any] | None:
        uri = self.uri("status.json")
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else None

    # history ----------------------------------------------------------------------------
    def write_history(self, history: dict[str, Any]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(METRIC_COLUMNS)
        for row in history.get("rounds", []):
            writer.writerow(["" if row.get(col) is None else row.get(col) for col in METRIC_COLUMNS])
        self._write(
            [
                (self.uri("history.json"), dumps(history).encode()),
                (self.uri("metrics.csv"), buf.getvalue().encode()),
            ]
            + self._scalars.update(history)  # TensorBoard scalars, same names as metrics.csv
        )

    def read_history(self) -> dict[str, Any]:
        uri = self.uri("history.json")
        if not storage.exists(uri):
            raise FedLinearError(f"{uri}: no history (has the run started?)")
        return json.loads(storage.read_text(uri))

    # checkpoints ------------------------------------------------------------------------
    def write_checkpoint(self, server_round: int, weights: LinearWeights, state: dict[str, Any]) -> None:
        name = f"round-{server_round:04d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **weights.as_dict())  # no bias array for a model without an intercept
        pointer = {"round": server_round, "file": name, **state}
        self._write(
            [
                (self.uri("checkpoints", name), buf.getvalue()),
                (self.uri("checkpoints", "latest.json"), dumps(pointer).encode()),
            ]
        )

    def read_latest_checkpoint(self) -> tuple[dict[str, Any], LinearWeights] | None:
        pointer_uri = self.uri("checkpoints", "latest.json")
        if not storage.exists(pointer_uri):
            return None
        try:  # written atomically, so damage means someone else's hand: say which file, no traceback
            pointer = json.loads(storage.read_text(pointer_uri))
            checkpoint_uri = self.uri("checkpoints", os.path.basename(str(pointer["file"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise FedLinearError(f"{pointer_uri}: not a checkpoint pointer ({one_line(exc)})") from None
        try:
            with np.load(io.BytesIO(storage.read_bytes(checkpoint_uri)), allow_pickle=False) as arrays:
                weights = LinearWeights.from_dict({name: arrays[name] for name in (KERNEL, BIAS) if name in arrays.files})
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise FedLinearError(f"{checkpoint_uri}: not a readable checkpoint ({one_line(exc)})") from None
        return pointer, weights

    # manifest ---------------------------------------------------------------------------
    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.flush()
        storage.write_text(self.uri("manifest.json"), dumps(manifest))

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(storage.read_text(self.uri("manifest.json")))
