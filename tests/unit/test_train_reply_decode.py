"""The server decodes a train reply's weights with ``common/npy.loads`` (its header parsed once per
shape): a reply is accepted or refused exactly as with Flower's ``Array.numpy()`` (``np.load``), and the
values it checks are the same."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.task_identity import TaskIdentity

from fedlinear.common import model as lm
from fedlinear.common import protocol
from fedlinear.server import replies

D = 4
DECLARED = {protocol.SHARD_NUM_EXAMPLES: 100, protocol.SHARD_CLIENT_KEY: 3}
METRICS = {protocol.METRIC_NUM_EXAMPLES: 100, protocol.METRIC_TRAIN_LOSS: 0.5,
           protocol.METRIC_CLIENT_KEY: 3, protocol.METRIC_UNIT_WEIGHT: 1}  # fmt: skip


@pytest.fixture(autouse=True)
def _identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _npy(a: np.ndarray, **kw) -> bytes:
    out = io.BytesIO()
    np.save(out, a, allow_pickle=False, **kw)
    return out.getvalue()


def _reply(kernel_data: bytes, norm: float = 1e12) -> str | None:
    kernel = Array(dtype="float32", shape=(D, 1), stype=SType.NUMPY, data=kernel_data)
    bias = Array(np.zeros(1, np.float32))
    content = RecordDict({protocol.RECORD_ARRAYS: ArrayRecord({lm.KERNEL: kernel, lm.BIAS: bias}),
                          protocol.RECORD_METRICS: MetricRecord(METRICS)})  # fmt: skip
    msg = Message(content, dst_node_id=1, message_type="train")
    return replies.check_train_reply(msg, D, DECLARED, norm)


GOOD = np.arange(D, dtype=np.float32).reshape(D, 1) - 1.5
HEADER = _npy(GOOD)[: -GOOD.nbytes]
CASES = {
    "good": _npy(GOOD),
    "fortran order": _npy(np.asfortranarray(GOOD)),
    "bad magic": b"\x93NUMPX" + _npy(GOOD)[6:],
    "garbage": b"\x93NUMPY garbage",
    "truncated": _npy(GOOD)[:-1],
    "header only": HEADER,
    "float64 inside": _npy(GOOD.astype(np.float64)),
    "other shape inside": _npy(GOOD.reshape(1, D)),
    "version 9": HEADER[:6] + b"\x09\x00" + _npy(GOOD)[8:],
    "object dtype": HEADER.replace(b"'<f4'", b"'|O' "),
    "nan": _npy(np.full((D, 1), np.nan, np.float32)),
}


def _numpy_verdict(data: bytes) -> str:
    """What Flower's Array.numpy() makes of the bytes, as the checks around the decode word it."""
    try:
        value = Array(dtype="float32", shape=(D, 1), stype=SType.NUMPY, data=data).numpy()
    except Exception:  # noqa: BLE001
        return "cannot be decoded"
    if value.dtype != np.float32 or value.shape != (D, 1):
        return "decodes to"
    if not np.isfinite(value).all():
        return "non-finite"
    return "ok"


@pytest.mark.parametrize("case", list(CASES))
def test_a_train_reply_is_decoded_as_array_numpy_decodes_it(case: str) -> None:
    problem = _reply(CASES[case])
    verdict = _numpy_verdict(CASES[case])
    if verdict == "ok":
        assert problem is None, problem
    else:
        assert problem is not None and verdict in problem and "kernel" in problem, (problem, verdict)


def test_the_norm_bound_sees_the_decoded_values() -> None:
    norm = float(np.sqrt(np.sum(GOOD.astype(np.float64) ** 2)))
    assert _reply(CASES["good"], norm=norm * 1.000001) is None
    assert "norm" in (_reply(CASES["good"], norm=norm * 0.999999) or "")
    assert "norm" in (_reply(CASES["fortran order"], norm=norm * 0.999999) or "")
