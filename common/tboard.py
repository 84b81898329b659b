"""TensorBoard scalars for a run: ``RUN_DIR/tensorboard/events.out.tfevents.fedlinear``.

Every round's metrics go in as scalars named exactly as the ``metrics.csv`` columns (the round is the
step), so ``tensorboard --logdir runs/`` shows a sweep side by side. Written with TensorBoard's own
record framing and protos (``tensorboard.compat.proto``, pure Python: TensorFlow is not imported).

The history is the truth. The first write of a process writes the whole file afresh from the
history it is given (so a resumed run, whose history was cut back to its checkpoint, never shows a
round twice), then each later write only adds the rounds not yet written: appended to the local file
(a running ``tensorboard`` follows it live), or, on S3 where objects cannot be appended to, the whole
object rewritten (a few hundred bytes a round) through the run store's ordered writer.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError

DIR = "tensorboard"
FILE = "events.out.tfevents.fedlinear"  # one file per run: TensorBoard reads any name holding "tfevents"
SKIP = ("round",)  # the step, not a scalar


def _record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def header_event(wall_time: float) -> bytes:
    from tensorboard.compat.proto import event_pb2

    return _record(event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2").SerializeToString())


def round_event(row: dict[str, Any], columns: tuple[str, ...], wall_time: float) -> bytes:
    """One event at step = round holding every finite numeric column of ``row`` as a scalar."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = []
    for name in columns:
        value = row.get(name)
        if name in SKIP or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            values.append(summary_pb2.Summary.Value(tag=name, simple_value=float(value)))
    event = event_pb2.Event(wall_time=wall_time, step=int(row["round"]), summary=summary_pb2.Summary(value=values))
    return _record(event.SerializeToString())


class ScalarLog:
    """The run's TensorBoard event file, kept in step with the history (one instance per writer process)."""

    def __init__(self, run_dir: str, columns: tuple[str, ...]) -> None:
        self.uri = storage.join(run_dir, DIR, FILE)
        self.columns = columns
        self._written: int | None = None  # the last round in the file; None until this process wrote it
        self._content = b""  # S3 only: the whole object, rewritten each time

    def update(self, history: dict[str, Any]) -> list[tuple[str, bytes]]:
        """Bring the file up to ``history``. Local files are written here (small, no fsync: the file is
        rebuilt from the history by the next process anyway); for S3 the object to write is returned."""
        rows = [r for r in history.get("rounds", []) if isinstance(r.get("round"), int)]
        now = time.time()
        if self._written is None:
            data = header_event(now) + b"".join(round_event(r, self.columns, now) for r in rows)
            self._written = max((r["round"] for r in rows), default=-1)
            if storage.is_s3(self.uri):
                self._content = data
                return [(self.uri, data)]
            storage.write_bytes(self.uri, data)
            return []
        new = [r for r in rows if r["round"] > self._written]
        if not new:
            return []
        data = b"".join(round_event(r, self.columns, now) for r in new)
        self._written = new[-1]["round"]
        if storage.is_s3(self.uri):
            self._content += data
            return [(self.uri, self._content)]
        path = self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri
        try:
            with open(path, "ab") as handle:
                handle.write(data)
        except OSError as exc:
            raise FedLinearError(f"{self.uri}: cannot write ({exc.strerror or exc})") from None
        return []


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``RUN_DIR/tensorboard`` as TensorBoard's EventAccumulator reads it (local runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
