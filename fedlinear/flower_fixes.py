"""Work-arounds for defects found in Flower 1.42, applied by both apps (ServerApp and ClientApp).

It sits at the package root, beside the rooms, because the server and the clients both need it and
neither may import the other, while ``common`` stays free of Flower.

* ``flwr.supercore.differential_privacy.clip_inputs_inplace`` computes
  ``min(1, clipping_norm / input_norm)`` and raises ``ZeroDivisionError`` for an update whose norm is
  exactly 0 (a client whose weights did not move: an empty learning step, a sabotaged or lazy
  party). Server-side clipping then takes the whole run down, client-side clipping fails that client.
  The replacement scales by 1 when the norm is 0 and is otherwise the same FlatClip. Both
  ``compute_clip_model_update`` (server wrapper and ``fixedclipping_mod``) look the function up in
  that module's globals, so replacing it there fixes every caller. Tested in tests/integration/test_privacy.py
  (a zero-update client under both clipping modes).
"""

from __future__ import annotations

import numpy as np
from flwr.supercore import differential_privacy as _dp


def _clip_inputs_inplace(input_arrays, clipping_norm: float) -> None:
    input_norm = _dp.get_norm(input_arrays)
    scaling_factor = min(1.0, clipping_norm / input_norm) if input_norm > 0 else 1.0
    for array in input_arrays:
        array *= np.asarray(scaling_factor, dtype=np.asarray(array).dtype)


def record(content, name: str, kind: type):
    """``content``'s record ``name`` when it is a ``kind`` (ArrayRecord, ConfigRecord, MetricRecord),
    else None: what ``content.array_records.get(name)`` (and the other two views) return, without
    building the view."""
    value = content.get(name)
    return value if isinstance(value, kind) else None


def record_names(content, kind: type) -> set[str]:
    """The names of ``content``'s records of type ``kind``: ``set(content.array_records)`` (and the
    other two views), without building the view."""
    return {name for name, value in content.items() if isinstance(value, kind)}


def apply() -> None:
    """Install the fixes (idempotent)."""
    if _dp.clip_inputs_inplace is not _clip_inputs_inplace:
        _dp.clip_inputs_inplace = _clip_inputs_inplace
