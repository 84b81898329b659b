"""What crosses the wire: every reply the ServerApp receives in a whole run, checked key by key.

The real ServerApp drives the real ClientApp through tests/inprocess.py's grid, which records each reply.
A node sends the server model arrays (``kernel``, ``bias``), metrics, a description of its shard (size,
feature count, fingerprint, its URI) and, by configuration, the pooled-statistics sums (``n`` and the
column sums ``Σ[x y]``; the centred scatter ``Σ(z−μ)(z−μ)ᵀ``, or only its diagonal): never a data row. The
check is literal (no received array holds a shard row, ``x`` or ``[x, y]``, as a run of consecutive values,
a row or a column) and structural (the record names, keys, shapes and dtypes are exactly these).

What it does not claim: that the replies reveal nothing about the rows. An update computed from one row
gives that row back exactly (``x = Δkernel / Δbias`` after one SGD step): the one-row case below shows it,
and docs/explanation/wire.md says so. Only differential privacy (``dp``) or secure aggregation bound that.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedlinear.common.csvio import load_csv, to_csv_bytes
from tests.conftest import write_federation
from tests.inprocess import run_in_process

D = 4
SHARD_KEYS = {"data-uri", "num-features", "num-examples", "client-key", "fingerprints", "partition-id"}


def layout(reply) -> dict:
    """{record name: (kind, {key: shape/dtype or type})} of one reply."""
    out = {}
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            out[name] = ("arrays", {k: (tuple(a.shape), str(a.dtype)) for k, a in record.items()})
        elif isinstance(record, MetricRecord):
            # a metric may be a list of numbers in Flower: here each one is a single number
            assert all(isinstance(v, int | float) for v in record.values()), dict(record)
            out[name] = ("metrics", set(record.keys()))
        elif isinstance(record, ConfigRecord):
            assert all(isinstance(v, str | int | float | bool) or all(isinstance(e, str) for e in v)
                       for v in record.values()), dict(record)  # fmt: skip
            out[name] = ("config", set(record.keys()))
        else:  # pragma: no cover - a new record type would be a new kind of traffic
            out[name] = (type(record).__name__, None)
    return out


def expected(kind: str, stage: str | None, *, moments: bool, full: bool) -> dict:
    if kind == "query" and stage == "describe":
        out = {"shard": ("config", SHARD_KEYS)}
        if moments:
            out["moments"] = ("arrays", {"total": ((D + 1,), "float64")})
        return out
    if kind == "query" and stage == "fedols-r":  # the yardstick's R factor: its RᵀR is the Gram of [x − μ, 1, y − μ]
        return {"r": ("arrays", {"r": ((D + 2, D + 2), "float64")})}
    if kind == "query":
        shape = (D + 1, D + 1) if full else (D + 1,)
        out = {"scatter": ("arrays", {"scatter": (shape, "float64")})}
        if full:  # the yardstick's R factor comes in the same reply (with-r)
            out["r"] = ("arrays", {"r": ((D + 2, D + 2), "float64")})
        return out
    if kind == "train":
        return {
            "arrays": ("arrays", {"kernel": ((D, 1), "float32"), "bias": ((1,), "float32")}),
            # unit-weight: 1, the aggregation weight under differential privacy (server/strategy.py)
            "metrics": ("metrics", {"num-examples", "train-loss", "client-key", "unit-weight"}),
        }
    assert kind == "evaluate"
    return {"metrics": ("metrics", {"num-examples", "eval-mse"})}


def holds_a_row(values: np.ndarray, rows: np.ndarray) -> bool:
    """Whether any row of ``rows`` appears in ``values``: as consecutive values of it flattened (row-major or
    column-major: rows and columns of a matrix), to float32 precision."""
    width = rows.shape[1]
    for flat in {values.ravel(order="C").tobytes(): values.ravel(order="C"),
                 values.ravel(order="F").tobytes(): values.ravel(order="F")}.values():  # fmt: skip
        if flat.size < width:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(flat, width)
        close = np.isclose(windows[:, None, :], rows[None, :, :], rtol=1e-6, atol=1e-7).all(axis=2)
        if close.any():
            return True
    return False


def shard_rows(uri: str) -> tuple[np.ndarray, np.ndarray]:
    data = load_csv(uri)
    return data.x, np.column_stack([data.x, data.y])


def exchanges(shards, run_dir, **config):
    grids: list = []
    status, _ = run_in_process(shards, run_dir, grids=grids, **config)
    assert status["status"] == "completed", status
    [grid] = grids
    assert len(grid.sent) == len(grid.received)
    return list(zip(grid.sent, grid.received, strict=True))


@pytest.mark.parametrize(
    ("settings", "moments", "full"),
    [
        ({}, True, True),  # defaults: the least-squares yardstick and whitening need the full scatter
        ({"reference": "none"}, True, False),  # standardize auto -> scale: the diagonal only
        ({"reference": "none", "standardize": "none", "learning-rate": 0.05}, False, False),  # no statistics
    ],
    ids=["defaults", "reference-none", "no-statistics"],
)
def test_the_server_receives_only_arrays_metrics_and_sums(tmp_path, settings, moments, full):
    write_federation(str(tmp_path / "data"), clients=3, samples=40, features=D)
    shards = [str(tmp_path / "data" / f"client-{i}.csv") for i in range(3)]
    rows = [shard_rows(uri) for uri in shards]
    seen = set()
    for sent, reply in exchanges(shards, str(tmp_path / "run"), **settings, **{"num-server-rounds": 2,
                                                                              "fraction-evaluate": 1.0}):  # fmt: skip
        assert not reply.has_error(), reply.error
        kind = sent.metadata.message_type
        stage = str(sent.content["config"].get("stage", "describe")) if kind == "query" else None
        seen.add((kind, stage))
        assert layout(reply) == expected(kind, stage, moments=moments, full=full), (kind, stage)
        for record in reply.content.array_records.values():
            for name, array in record.items():
                values = np.asarray(array.numpy(), np.float64)
                for x_rows, xy_rows in rows:
                    assert not holds_a_row(values, x_rows), f"{kind} reply's {name} holds an x row of a shard"
                    assert not holds_a_row(values, xy_rows), f"{kind} reply's {name} holds an [x, y] row"
        if kind == "query" and stage == "describe":
            shard = reply.content["shard"]
            assert shard["num-examples"] == 40 and shard["num-features"] == D
    stages = {("query", "describe"), ("train", None), ("evaluate", None)}
    assert seen == stages | ({("query", "scatter")} if moments else set())  # no stage fedols-r: R came with the scatter


def test_the_check_would_see_a_row(tmp_path):
    """The detector itself: a row, a column or a transposed block is found; sums and a model are not."""
    write_federation(str(tmp_path / "data"), clients=1, samples=10, features=D)
    x_rows, xy_rows = shard_rows(str(tmp_path / "data" / "client-0.csv"))
    assert holds_a_row(xy_rows[3].astype(np.float32), xy_rows)
    assert holds_a_row(np.vstack([np.zeros(D + 1), xy_rows[7]]).T.copy(), xy_rows)  # as a column
    assert holds_a_row(x_rows[:5].T.copy(), x_rows)
    assert not holds_a_row(xy_rows.sum(axis=0), xy_rows)
    assert not holds_a_row((xy_rows.T @ xy_rows).astype(np.float64), x_rows)


def test_a_one_row_shard_sends_no_statistics_but_its_update_gives_the_row_away(tmp_path):
    """With reference = none and standardize = none a one-row shard's node sends its shard description,
    its weights and its metrics only: no array other than kernel and bias, no sums. Yet one SGD step on
    one row moves the weights along that row: x = Δkernel / Δbias, recovered here from what the server
    received. That is what docs/explanation/wire.md warns about."""
    data = tmp_path / "data"
    write_federation(str(data), clients=2, samples=30, features=D)
    rng = np.random.default_rng(3)
    row_x, row_y = rng.normal(size=(1, D)), np.array([0.7])
    (data / "client-2.csv").write_bytes(to_csv_bytes(row_x, row_y))
    shards = [str(data / f"client-{i}.csv") for i in range(3)]
    settings = {"reference": "none", "standardize": "none", "learning-rate": 0.05, "num-server-rounds": 1}
    lonely = None
    for sent, reply in exchanges(shards, str(tmp_path / "run"), **settings):
        assert not reply.has_error(), reply.error
        kind = sent.metadata.message_type
        if kind == "query":
            assert layout(reply) == {"shard": ("config", SHARD_KEYS)}
            if reply.content["shard"]["num-examples"] == 1:
                lonely = reply.metadata.src_node_id
        elif reply.metadata.src_node_id == lonely:
            assert layout(reply) == expected("train", None, moments=False, full=False)
            sent_k, sent_b = sent.content["arrays"]["kernel"].numpy(), sent.content["arrays"]["bias"].numpy()
            got_k, got_b = reply.content["arrays"]["kernel"].numpy(), reply.content["arrays"]["bias"].numpy()
            for values in (got_k, got_b):
                assert not holds_a_row(np.asarray(values, np.float64), row_x)
                assert not holds_a_row(np.asarray(values, np.float64), np.column_stack([row_x, row_y]))
            recovered = (got_k.astype(np.float64) - sent_k).ravel() / float(got_b[0] - sent_b[0])
            np.testing.assert_allclose(recovered, row_x.ravel(), rtol=1e-3, atol=1e-4)
    assert lonely is not None


def test_the_protocol_names_keep_their_wire_values():
    """common/protocol.py names the wire once; the values themselves are what older servers, clients and
    run directories speak, so a rename there must not change them."""
    from flwr.app import MessageType

    from fedlinear.common import protocol, scaling

    assert protocol.SECAGG_MESSAGE_TYPE == f"{MessageType.TRAIN}.{protocol.SECAGG_ACTION}" == "train.secagg"
    assert protocol.TRANSFORM_ARRAYS == tuple(scaling.Transform.identity(2).arrays())
    assert (protocol.RECORD_CONFIG, protocol.RECORD_ARRAYS, protocol.RECORD_METRICS) == ("config", "arrays", "metrics")
    assert (protocol.STAGE_DESCRIBE, protocol.STAGE_SCATTER, protocol.STAGE_FEDOLS_R) == ("describe", "scatter", "fedols-r")
    assert set(protocol.SHARD_KEYS | protocol.OPTIONAL_SHARD_KEYS) == SHARD_KEYS
    assert protocol.TRAIN_METRICS == {"num-examples", "train-loss", "client-key", "unit-weight"}
    assert (protocol.KEY_SERVER_ROUND, protocol.KEY_LEARNING_RATE, protocol.KEY_PROXIMAL_MU) == (
        "server-round", "learning-rate", "proximal-mu")  # fmt: skip
    assert (protocol.ERROR_CODE_USER, protocol.ERROR_CODE_INTERNAL) == (4001, 4002)
