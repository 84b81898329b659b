"""The pre-round stages: the yardstick's R factor comes in the scatter reply (``with-r``), one ClientApp
start per node less in the deployment runtime, with the same checks and the same numbers as stage
``fedols-r`` of its own.

Every test drives the real ServerApp and ClientApp handlers in this process (tests/inprocess.py); an
"old-style" client is one that answers the scatter query without the R factor (it ignores ``with-r``):
the server then asks it in stage ``fedols-r``, as before, so both paths must give the same bits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedlinear.clients import client_app as ca
from fedlinear.common import fedols
from tests.inprocess import run_in_process, write_synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("stages"), 4, 60, 5, 11, 80, sizes=[60, 45, 30, 60])


def stage_of(msg) -> tuple[str, str | None]:
    kind = msg.metadata.message_type
    return kind, (str(msg.content["config"].get("stage", "describe")) if kind == "query" else None)


def honest(node_id, msg, grid):
    from flwr.app import Context

    context = Context(run_id=1, node_id=node_id, node_config=dict(grid.nodes[node_id]), state=RecordDict(),
                      run_config=grid.run_config)  # fmt: skip
    return ca.app(msg, context)


def scatter_reply_sabotage(grids, change):
    """A sabotage calling ``change(node_id, honest_reply) -> content`` on every scatter reply that carries an R."""

    def sabotage(node_id, msg):
        if stage_of(msg) != ("query", "scatter") or not msg.content["config"].get("with-r", False):
            return None
        reply = honest(node_id, msg, grids[-1])
        content = change(node_id, reply)
        return None if content is None else Message(content, reply_to=msg)

    return sabotage


def without(reply, *names) -> RecordDict:
    return RecordDict({name: record for name, record in reply.content.items() if name not in names})


def run(shards, tmp_path, name, sabotage_of=None, **config):
    uris, test = shards
    grids: list = []
    sabotage = sabotage_of(grids) if sabotage_of else None
    status, manifest = run_in_process(
        uris, str(tmp_path / name), sabotage=sabotage, grids=grids, **{"num-server-rounds": 3, "test-uri": test, **config}
    )
    assert status["status"] == "completed", status
    history = json.loads((tmp_path / name / "history.json").read_text())
    return grids[0], manifest, history


def numbers(manifest, history):
    """What the run computed (weights, every round's metrics, the yardstick), without times."""
    rounds = [{k: v for k, v in row.items() if "time" not in k and not k.endswith("-s")} for row in history["rounds"]]
    return json.dumps([manifest["weights"], rounds, history["reference"]], sort_keys=True)


def old_style(grids):
    return scatter_reply_sabotage(grids, lambda nid, reply: without(reply, "r"))


@pytest.mark.parametrize(
    "config",
    [{}, {"fit-intercept": False}, {"strategy": "fedols"}, {"strategy": "fedols", "fit-intercept": False}],
    ids=["defaults", "no-intercept", "fedols", "fedols-no-intercept"],
)
def test_the_r_factor_comes_with_the_scatter_and_gives_the_same_bits_as_its_own_stage(shards, tmp_path, config):
    grid, manifest, history = run(shards, tmp_path, "new", **config)
    stages = [stage_of(m) for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(set(stages)) == [("query", "describe"), ("query", "scatter")]  # no fedols-r stage
    assert all("r" in reply.content for sent, reply in zip(grid.sent, grid.received, strict=True)
               if stage_of(sent) == ("query", "scatter"))  # fmt: skip
    if "strategy" not in config:
        assert history["reference"]["method"] == "tsqr"  # the yardstick from the R factors that came with the scatter
    old_grid, old_manifest, old_history = run(shards, tmp_path, "old", sabotage_of=old_style, **config)
    old_stages = {stage_of(m) for m in old_grid.sent if m.metadata.message_type == "query"}
    assert ("query", "fedols-r") in old_stages  # an old-style client is asked in a stage of its own
    assert numbers(manifest, history) == numbers(old_manifest, old_history)


def test_a_mixed_federation_asks_only_the_parties_that_sent_no_r(shards, tmp_path):
    def sabotage_of(grids):
        return scatter_reply_sabotage(grids, lambda nid, reply: without(reply, "r") if nid == 1001 else None)

    grid, manifest, history = run(shards, tmp_path, "mixed", sabotage_of=sabotage_of)
    asked = [m.metadata.dst_node_id for m in grid.sent if stage_of(m) == ("query", "fedols-r")]
    assert asked == [1001]
    _, reference_manifest, reference_history = run(shards, tmp_path, "plain")
    assert numbers(manifest, history) == numbers(reference_manifest, reference_history)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("nan", "R-factor reply rejected: R factor has non-finite values"),
        ("lower", "not upper triangular"),
        ("other-data", "R factor disagrees with the moments and scatter"),
        ("extra-record", "malformed R-factor reply: expected one array 'r'"),
        ("extra-array", "malformed R-factor reply: expected one array 'r'"),
        ("float32", "malformed R-factor reply: float32 array"),
    ],
)
def test_a_hostile_r_in_the_scatter_reply_is_rejected_with_the_reason(shards, tmp_path, bad, reason):
    """strategy = fedols (method qr) leaves such a party out of the solve, naming why; the others solve."""

    def change(nid, reply):
        if nid != 1002:
            return None
        r = reply.content["r"]["r"].numpy().copy()
        content = without(reply, "r")
        arrays = {"r": Array(r)}
        if bad == "nan":
            arrays["r"] = Array(np.where(np.eye(len(r), dtype=bool), np.nan, r))
        elif bad == "lower":
            r[2, 1] = 0.5
            arrays["r"] = Array(r)
        elif bad == "other-data":
            r[:, -1] *= 2.0  # the R of [x − μx, 1, 2(y − μy)]: triangular, the right row count
            assert fedols.check_r(r, 5, 30) is None
            arrays["r"] = Array(r)
        elif bad == "extra-record":
            content["junk"] = ArrayRecord({"junk": Array(np.zeros(3))})
        elif bad == "extra-array":
            arrays["junk"] = Array(np.zeros(3))
        else:
            arrays["r"] = Array(r.astype(np.float32))
        content["r"] = ArrayRecord(arrays)
        return content

    grid, manifest, history = run(
        shards, tmp_path, bad, sabotage_of=lambda grids: scatter_reply_sabotage(grids, change), strategy="fedols"
    )
    [row] = history["rounds"]
    assert row["clients-failed"] == 1
    [failure] = row["failures"]
    assert failure["node-id"] == 1002 and reason in failure["reason"], failure
    assert not any(stage_of(m) == ("query", "fedols-r") for m in grid.sent)  # a bad R is not asked for again
    assert manifest["fedols"]["parties"] == 3


def test_a_training_run_keeps_a_party_whose_r_is_hostile_and_falls_back_to_the_scatter(shards, tmp_path):
    def change(nid, reply):
        if nid != 1000:
            return None
        content = without(reply, "r")
        content["r"] = ArrayRecord({"r": Array(np.full((7, 7), np.nan))})
        return content

    _, manifest, history = run(shards, tmp_path, "hostile", sabotage_of=lambda g: scatter_reply_sabotage(g, change))
    assert history["reference"]["method"] != "tsqr"  # the scatter route, said in the notes
    assert history["query-failures"] == []  # the party is kept: it still trains
    _, plain_manifest, _ = run(shards, tmp_path, "plain")
    assert manifest["weights"] == plain_manifest["weights"]  # the yardstick does not touch training


def test_a_party_left_out_of_the_scatter_moves_the_centre_and_the_others_are_asked_again(shards, tmp_path):
    """Their R factors were about the mean of all parties; the solve needs the survivors' mean: stage
    fedols-r asks the survivors again, and the solve is least squares on their data alone."""

    def change(nid, reply):
        if nid != 1003:
            return None
        content = without(reply, "scatter")
        content["scatter"] = ArrayRecord({"scatter": Array(np.full((6, 6), np.nan))})
        return content

    grid, manifest, history = run(
        shards, tmp_path, "moved", sabotage_of=lambda g: scatter_reply_sabotage(g, change), strategy="fedols"
    )
    asked = sorted(m.metadata.dst_node_id for m in grid.sent if stage_of(m) == ("query", "fedols-r"))
    assert asked == [1000, 1001, 1002]
    uris, _ = shards
    from fedlinear.common.csvio import load_csv

    parts = [load_csv(u) for u in uris[:3]]
    x = np.vstack([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    expected, *_ = np.linalg.lstsq(np.column_stack([x, np.ones(len(x))]), y, rcond=None)
    got = np.array(manifest["weights"]["kernel"] + [manifest["weights"]["bias"]])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert history["query-failures"][0]["node-id"] == 1003


@pytest.mark.parametrize("config", [{"reference": "none"}, {"dp": "central-client-clip"}, {"dp": "local"}])
def test_no_r_is_asked_where_the_yardstick_takes_none(shards, tmp_path, config):
    uris, test = shards
    grids: list = []
    status, _ = run_in_process(uris, str(tmp_path / "r"), grids=grids, **{"num-server-rounds": 1, **config})
    assert status["status"] == "completed", status
    for sent in grids[0].sent:
        if sent.metadata.message_type == "query":
            assert not sent.content["config"].get("with-r", False)
            assert "r-centre" not in sent.content.array_records.get("centre", {})


def test_the_client_sends_the_r_only_when_asked_and_the_scatter_even_when_the_r_centre_is_bad(shards):
    """``with-r`` adds the R factor of ``r-centre`` (fedols.local_r's bits); a bad ``r-centre`` costs only the R
    (the server then asks stage fedols-r, which names the problem); under the node's own privacy it is refused."""
    from flwr.app import ConfigRecord, Context

    from fedlinear.common.csvio import load_csv
    from tests.conftest import task_identity

    uris, _ = shards
    data = load_csv(uris[0])
    centre = np.r_[data.x.mean(axis=0), data.y.mean()]

    def ask(r_centre=None, with_r=True, **config):
        arrays = {"centre": Array(centre)}
        if r_centre is not None:
            arrays["r-centre"] = Array(np.asarray(r_centre, np.float64))
        msg = Message(RecordDict({"config": ConfigRecord({"stage": "scatter", "full": True, "with-r": with_r}),
                                  "centre": ArrayRecord(arrays)}), dst_node_id=5, message_type="query")  # fmt: skip
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
                          run_config={"data-uri": uris[0], **config})  # fmt: skip
        return ca.query(msg, context)

    with task_identity(1, 5, 1):
        ca._SHARDS.clear()
        reply = ask(np.zeros(6))
        assert set(reply.content.array_records) == {"scatter", "r"}
        np.testing.assert_array_equal(reply.content["r"]["r"].numpy(), fedols.local_r(data.x, data.y, np.zeros(6)))
        assert set(ask(np.zeros(6), with_r=False).content.array_records) == {"scatter"}
        for bad in (None, np.zeros(3), np.full(6, np.nan)):
            reply = ask(bad)
            assert not reply.has_error() and set(reply.content.array_records) == {"scatter"}
        refused = ask(np.zeros(6), dp="local")
        assert refused.has_error() and "scatter query refused" in refused.error.reason and not refused.has_content()
