"""Hostile or broken parties: every reply is validated before it reaches the aggregate.

One party of four misbehaves in a whole in-process run (the real ServerApp and ClientApp code); the
run must complete, record the rejection with the node, round and reason, and end with exactly the
model of a run in which that party simply failed every round.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlinear.clients import client_app as ca
from fedlinear.server import replies
from tests.inprocess import run_in_process, write_synthetic_shards

BAD_NODE = 1002  # partition 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("hostile"), 4, 200, 3, 42, 300)


SETTINGS = {"num-server-rounds": 3, "max-failed-rounds": 3}


def make_bad(kind, honest: Message) -> Message:
    arrays = honest.content["arrays"]
    metrics = dict(honest.content["metrics"])
    kernel, bias = arrays["kernel"].numpy(), arrays["bias"].numpy()
    if kind == "nan":
        kernel = kernel.copy()
        kernel[0, 0] = np.nan
    elif kind == "shape":
        kernel = np.zeros((kernel.shape[0] + 1, 1), np.float32)
    elif kind == "dtype":
        kernel = kernel.astype(np.float64)
    elif kind == "huge":
        kernel = np.full_like(kernel, 1e30)
    elif kind == "extra-metric":
        metrics["sneaky"] = 1.0
    elif kind == "claims-1e12":
        metrics["num-examples"] = 10**12
    elif kind == "claims-negative":
        metrics["num-examples"] = -1
    elif kind == "extra-array":
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                              "more": ArrayRecord({"x": Array(np.zeros(3))})})  # fmt: skip
        return Message(content, reply_to=honest_request[0])
    content = RecordDict(
        {"arrays": ArrayRecord({"kernel": Array(kernel), "bias": Array(bias)}), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=honest_request[0])


honest_request: list[Message] = []


def run(uris, test, run_dir, kind=None):
    from flwr.app import Context

    def sabotage(node_id, msg):
        if node_id != BAD_NODE or msg.metadata.message_type != "train":
            return None
        if kind == "fails":
            from flwr.app import Error

            return Message(Error(code=4001, reason="down"), reply_to=msg)
        honest_request[:] = [msg]
        context = Context(run_id=1, node_id=node_id, node_config={"partition-id": 2, "num-partitions": 4,
                          "data-uri": uris[2]}, state=RecordDict(), run_config=run_config)  # fmt: skip
        return make_bad(kind, ca.app(msg, context))

    run_config = {"run-dir": run_dir, "min-available-nodes": 4, "test-uri": test, **SETTINGS}
    return run_in_process(uris, run_dir, sabotage=sabotage if kind else None, **{"test-uri": test, **SETTINGS})


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    uris, test = data
    status, manifest = run(uris, test, str(tmp_path_factory.mktemp("base") / "run"), kind="fails")
    assert status["status"] == "completed"
    return manifest


@pytest.mark.parametrize(
    "kind", ["nan", "shape", "dtype", "huge", "extra-metric", "claims-1e12", "claims-negative", "extra-array"]
)
def test_a_bad_train_reply_is_rejected_recorded_and_harmless(kind, data, baseline, tmp_path):
    uris, test = data
    status, manifest = run(uris, test, str(tmp_path / "run"), kind=kind)
    assert status["status"] == "completed", status
    # the model is exactly that of a run where the bad party failed every round
    assert manifest["standardized-weights"] == baseline["standardized-weights"]
    with open(tmp_path / "run" / "history.json") as handle:
        rounds = json.load(handle)["rounds"][1:]
    for row in rounds:
        assert row["clients-ok"] == 3 and row["clients-failed"] == 1
        [failure] = row["failures"]
        assert failure["node-id"] == BAD_NODE and "\n" not in failure["reason"]
        assert "reply" in failure["reason"]


def test_malformed_shard_descriptions_leave_the_node_out(data, tmp_path):
    uris, test = data

    def bad_query(node_id, msg):
        if node_id == BAD_NODE and msg.metadata.message_type == "query":
            shard = {"num-features": 3, "num-examples": 200, "client-key": 2, "fingerprints": ["{not json"]}
            return Message(RecordDict({"shard": ConfigRecord(shard)}), reply_to=msg)
        return None

    status, manifest = run_in_process(uris, str(tmp_path / "run"), sabotage=bad_query, **{"test-uri": test, **SETTINGS})
    assert status["status"] == "completed", status
    [failure] = manifest["query-failures"]
    assert failure["node-id"] == BAD_NODE and "fingerprints are not JSON" in failure["reason"]
    assert len(manifest["shards"]) == 3


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        ({"num-features": 3, "num-examples": 5}, "missing client-key"),
        ({"num-features": 3, "num-examples": 0, "client-key": 1}, "num-examples 0"),
        ({"num-features": "3", "num-examples": 5, "client-key": 1}, "num-features is not an integer"),
        ({"num-features": 3, "num-examples": 5, "client-key": 1, "evil": 1}, "unexpected evil"),
        ({"num-features": 3, "num-examples": 5, "client-key": 1, "fingerprints": ["[1]"]}, "not JSON objects"),
    ],
)
def test_shard_description_checks(info, reason):
    assert reason in replies.check_shard(dict(info))


@pytest.mark.parametrize("kind", ["asymmetric", "indefinite"])
def test_a_scatter_that_no_data_can_produce_leaves_the_node_out(kind, data, tmp_path):
    """A party's scatter Σ(z − μ)(z − μ)ᵀ must be symmetric positive semidefinite, or it bends the yardstick."""
    uris, test = data

    def bad_scatter(node_id, msg):
        if node_id != BAD_NODE or msg.metadata.message_type != "query":
            return None
        if msg.content.config_records["config"].get("stage") != "scatter":
            return None
        context = Context(run_id=1, node_id=node_id, node_config={"partition-id": 2, "num-partitions": 4,
                          "data-uri": uris[2]}, state=RecordDict(), run_config={})  # fmt: skip
        honest = ca.app(msg, context)
        matrix = honest.content["scatter"]["scatter"].numpy().copy()
        if kind == "asymmetric":
            matrix[0, 1] += 0.5 * abs(matrix[0, 0])
        else:
            matrix -= 1.01 * np.linalg.eigvalsh(matrix).max() * np.eye(len(matrix))
        return Message(RecordDict({"scatter": ArrayRecord({"scatter": Array(matrix)})}), reply_to=msg)

    status, manifest = run_in_process(uris, str(tmp_path / "run"), sabotage=bad_scatter, **{"test-uri": test, **SETTINGS})
    assert status["status"] == "completed", status
    [failure] = manifest["query-failures"]
    expected = "asymmetric" if kind == "asymmetric" else "not positive semidefinite"
    assert failure["node-id"] == BAD_NODE and expected in failure["reason"]
    # the yardstick is the pooled least squares of the three honest shards
    from fedlinear.common.csvio import load_csv

    honest = [load_csv(u, -1, "auto") for i, u in enumerate(uris) if i != 2]
    x = np.vstack([d.x for d in honest])
    y = np.concatenate([d.y for d in honest])
    solution = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    np.testing.assert_allclose(manifest["reference"]["weights"], solution, rtol=1e-8, atol=1e-10)
