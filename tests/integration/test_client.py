"""The ClientApp's handlers called in-process: what a node computes, and how it fails."""

import tomllib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlinear.clients import client_app as ca
from fedlinear.common import config as run_configs
from fedlinear.common import model as lm
from fedlinear.common.csvio import load_csv, to_csv_bytes
from fedlinear.common.synth import make_synthetic
from tests.conftest import REPO, task_identity


@pytest.fixture(autouse=True)
def client_task():
    """A node's task identity (Messages are stamped with it) and empty per-process caches."""
    ca._SHARDS.clear(), run_configs._PARSED.clear()
    with task_identity(7, 1, 1):
        yield


@pytest.fixture
def shards(tmp_path):
    parts, _, _ = make_synthetic(
        num_clients=2, samples_per_client=101, num_features=4, noise=0.1, seed=3, test_samples=10
    )
    paths = []
    for i, shard in enumerate(parts):
        path = tmp_path / f"client-{i}.csv"
        path.write_bytes(to_csv_bytes(shard.x, shard.y))
        paths.append(str(path))
    return paths


def run_config(**overrides):
    with open(f"{REPO}/pyproject.toml", "rb") as handle:
        config = dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    config.update(overrides)
    return config


def context(partition_id, config):
    return Context(
        run_id=7,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(),
        run_config=config,
    )


def train_message(weights, server_round, learning_rate=None, batch_size=32):
    """A train task as the server sends it (the server resolves learning-rate and batch-size = auto and sends them)."""
    arrays = ArrayRecord({name: Array(a) for name, a in weights.as_dict().items()})
    config = {"server-round": server_round}
    if batch_size is not None:
        config["batch-size"] = batch_size
    if learning_rate is not None:
        config["learning-rate"] = learning_rate
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content, dst_node_id=100, message_type="train")


def test_train_reply_is_local_sgd_on_the_nodes_own_shard(shards, tmp_path):
    config = run_config(**{"data-uri": str(tmp_path / "client-{partition-id}.csv"), "local-epochs": 2})
    w0 = lm.initial_weights(4, seed=1)
    for partition_id in (0, 1):
        for server_round in (1, 2):  # second call: shard, float32 copies and parsed config from the caches
            reply = ca.train(train_message(w0, server_round, 0.05), context(partition_id, dict(config)))
            assert not reply.has_error(), reply.error
            data = load_csv(shards[partition_id])
            orders = [lm.batch_order(data.num_examples, 42, server_round, partition_id, e) for e in range(2)]
            expected, loss = lm.train_numpy(
                w0, data.x, data.y, epochs=2, batch_size=32, learning_rate=0.05, orders=orders
            )
            got = {name: reply.content["arrays"][name].numpy() for name in lm.WEIGHT_NAMES}
            np.testing.assert_array_equal(got["kernel"], expected.kernel)
            np.testing.assert_array_equal(got["bias"], expected.bias)
            metrics = reply.content["metrics"]
            assert metrics["num-examples"] == data.num_examples
            assert metrics["client-key"] == partition_id
            assert metrics["train-loss"] == pytest.approx(loss, rel=1e-6)
    assert len(run_configs._PARSED) == 1  # one run config, parsed once


def test_a_changed_run_config_is_parsed_again(shards, tmp_path):
    uri = str(tmp_path / "client-{partition-id}.csv")
    w0 = lm.initial_weights(4, seed=1)
    short = ca.train(train_message(w0, 1, 0.001), context(0, run_config(**{"data-uri": uri, "local-epochs": 1})))
    long = ca.train(train_message(w0, 1, 0.001), context(0, run_config(**{"data-uri": uri, "local-epochs": 20})))
    step = [np.abs(r.content["arrays"]["kernel"].numpy() - w0.kernel).max() for r in (short, long)]
    assert step[1] > 10 * step[0]


def test_the_learning_rate_comes_only_from_the_task(shards, tmp_path):
    """The server resolves the step size and sends it in the round's config; the run config's own
    ``learning-rate`` is never a fallback (it may be ``auto``, or differ from what the server resolved)."""
    uri = str(tmp_path / "client-{partition-id}.csv")
    w0 = lm.initial_weights(4, seed=1)
    for value in (None, 0.0, "0.1", True, 12.0):
        task = train_message(w0, 1, value) if value is not None else train_message(w0, 1)
        reply = ca.train(task, context(0, run_config(**{"data-uri": uri, "learning-rate": 0.1})))
        assert reply.has_error() and reply.error.code == ca.ERROR_CODE_USER
        assert "no usable learning rate in the task" in reply.error.reason
    sent = ca.train(train_message(w0, 1, 0.1), context(0, run_config(**{"data-uri": uri, "learning-rate": 0.001})))
    same = ca.train(train_message(w0, 1, 0.1), context(0, run_config(**{"data-uri": uri, "learning-rate": 0.1})))
    np.testing.assert_array_equal(sent.content["arrays"]["kernel"].numpy(), same.content["arrays"]["kernel"].numpy())


def test_problems_become_one_line_error_replies(shards, tmp_path):
    uri = str(tmp_path / "client-{partition-id}.csv")
    w_wrong = lm.initial_weights(5, seed=1)
    reply = ca.train(train_message(w_wrong, 1), context(0, run_config(**{"data-uri": uri})))
    assert reply.has_error() and reply.error.code == ca.ERROR_CODE_USER
    assert "shard has 4 features but the global model has 5" in reply.error.reason

    reply = ca.train(train_message(lm.initial_weights(4, 1), 1, 0.05), context(0, run_config(**{"data-uri": uri, "bogus": 1})))
    assert reply.has_error() and "unknown config key 'bogus'" in reply.error.reason

    missing = str(tmp_path / "nowhere-{partition-id}.csv")
    reply = ca.train(train_message(lm.initial_weights(4, 1), 1, 0.05), context(0, run_config(**{"data-uri": missing})))
    assert reply.has_error() and "nowhere-0.csv" in reply.error.reason and "\n" not in reply.error.reason


def test_train_uses_the_batch_size_the_task_carries_and_refuses_none(shards, tmp_path):
    """batch-size = auto is resolved by the server: the client trains with the task's, and refuses a task
    without one (it cannot guess what the server chose)."""
    config = run_config(**{"data-uri": str(tmp_path / "client-{partition-id}.csv")})
    w0 = lm.initial_weights(4, seed=1)
    data = load_csv(str(tmp_path / "client-0.csv"))
    reply = ca.train(train_message(w0, 1, 0.05, batch_size=data.num_examples), context(0, dict(config)))
    assert not reply.has_error(), reply.error
    orders = [lm.batch_order(data.num_examples, 42, 1, 0, 0)]
    expected, _ = lm.train_numpy(w0, data.x, data.y, epochs=1, batch_size=data.num_examples, learning_rate=0.05,
                                 orders=orders)  # fmt: skip
    got = lm.LinearWeights.from_dict({k: reply.content["arrays"][k].numpy() for k in ("kernel", "bias")})
    np.testing.assert_array_equal(got.kernel, expected.kernel)
    refused = ca.train(train_message(w0, 1, 0.05, batch_size=None), context(0, dict(config)))
    assert refused.has_error() and "batch size" in refused.error.reason
    for bad in (0, True, "32"):
        assert ca.train(train_message(w0, 1, 0.05, batch_size=bad), context(0, dict(config))).has_error()


def query_message(stage, centre=None, **config):
    """A query as the server sends it (server/nodes.py, server/fedols.py)."""
    content = RecordDict({"config": ConfigRecord({"stage": stage, **config})})
    if centre is not None:
        content["centre"] = ArrayRecord({"centre": Array(np.asarray(centre, np.float64))})
    return Message(content, dst_node_id=100, message_type="query")


@pytest.mark.parametrize(
    "private", [{"secure-aggregation": True}, {"dp": "central-client-clip"}, {"dp": "local"}]
)
def test_a_node_whose_own_config_is_private_sends_no_statistics_in_the_clear(shards, tmp_path, private):
    """The server is not trusted under privacy: whatever the query says, this node's own run config decides."""
    uri = str(tmp_path / "client-{partition-id}.csv")
    centre = np.zeros(5)
    public = context(0, run_config(**{"data-uri": uri}))
    for message in (query_message("fedols-r", centre), query_message("scatter", centre, full=True)):
        assert not ca.query(message, public).has_error()  # the same queries are answered without privacy
    assert "moments" in ca.query(query_message("describe", **{"want-moments": True}), public).content
    node = context(0, run_config(**{"data-uri": uri, **private}))
    for stage, what in (("fedols-r", "R factor"), ("scatter", "scatter")):
        reply = ca.query(query_message(stage, centre, full=True), node)
        assert reply.has_error() and reply.error.code == ca.ERROR_CODE_USER
        assert f"{stage} query refused" in reply.error.reason and what in reply.error.reason
        assert "private" in reply.error.reason and next(iter(private)) in reply.error.reason
        assert not reply.has_content()
    reply = ca.query(query_message("describe", **{"want-moments": True, "private": False}), node)
    assert reply.has_error() and "moments refused" in reply.error.reason
    reply = ca.query(query_message("describe", **{"want-moments": False, "private": False}), node)
    assert not reply.has_error()  # the description a private run needs, without path and hash
    shard = reply.content["shard"]
    assert shard["num-examples"] == 101 and "data-uri" not in shard and "fingerprints" not in shard


def test_transformed_shards_are_kept_up_to_a_byte_budget(monkeypatch):
    """Many small shards (inline mode's 1000 clients in one process) all stay cached across rounds;
    past the budget the cache starts over, and what it gives is always the transform of the shard."""
    from fedlinear.common import scaling
    from fedlinear.common.dataset import Dataset

    rng = np.random.default_rng(3)
    cfg = run_configs.RunConfig()
    transform = scaling.Transform("received", rng.normal(size=3), np.eye(3) * 2.0, 0.5, 2.0)
    shards = {f"mem://{i}": Dataset(rng.normal(size=(20, 3)), rng.normal(size=20)) for i in range(200)}
    monkeypatch.setattr(ca, "_TRANSFORMED", {})
    first = {uri: ca.training_data(uri, cfg, data, transform) for uri, data in shards.items()}
    assert len(ca._TRANSFORMED) == 200  # more than the 64 entries of the old cap
    for uri, data in shards.items():
        assert ca.training_data(uri, cfg, data, transform) is first[uri]  # a hit: the same arrays
        z, t = transform.apply(data.x, data.y)
        np.testing.assert_array_equal(first[uri][0], z.astype(np.float32))
        np.testing.assert_array_equal(first[uri][1], t.astype(np.float32))
    entry = sum(a.nbytes for a in first["mem://0"])
    monkeypatch.setattr(ca, "_MAX_TRANSFORMED_BYTES", 10 * entry)
    monkeypatch.setattr(ca, "_TRANSFORMED", {})
    for uri, data in shards.items():
        ca.training_data(uri, cfg, data, transform)
        assert 1 <= len(ca._TRANSFORMED) <= 10


def test_a_tasks_transform_is_parsed_once_and_never_served_for_another(monkeypatch):
    """Train tasks carry the same standardization every round: the client parses it once per distinct
    value (clients/client_app.py, task_transform). Another transform, even one that differs only in
    the sign of a zero, or another feature count, is parsed afresh; the cached arrays are read-only."""
    from fedlinear.common import protocol, scaling

    monkeypatch.setattr(ca, "_TASK_TRANSFORMS", {})
    rng = np.random.default_rng(5)
    base = scaling.Transform("whiten", rng.normal(size=3), rng.normal(size=(3, 3)), 0.25, 2.0)
    config = ConfigRecord(protocol.train_config(0.1, base, 8))
    first, digest = ca.task_transform(config, 3)
    again, _ = ca.task_transform(ConfigRecord(protocol.train_config(0.1, base, 8)), 3)
    assert again is first and digest == protocol.transform(config, 3).digest()
    np.testing.assert_array_equal(first.matrix, base.matrix)
    with pytest.raises(ValueError):
        first.shift[0] = 1.0  # a shared object: nothing may change it in place
    shift = base.shift.copy()
    shift[0] = 0.0
    zero = ca.task_transform(ConfigRecord(protocol.train_config(0.1, dataclasses_replace(base, shift=shift), 8)), 3)[0]
    shift[0] = -0.0
    negative = ca.task_transform(ConfigRecord(protocol.train_config(0.1, dataclasses_replace(base, shift=shift), 8)), 3)[0]
    assert zero is not negative and np.signbit(negative.shift[0]) and not np.signbit(zero.shift[0])
    scaled = dataclasses_replace(base, y_scale=3.0)
    other, other_digest = ca.task_transform(ConfigRecord(protocol.train_config(0.1, scaled, 8)), 3)
    assert other is not first and other.y_scale == 3.0 and other_digest != digest
    with pytest.raises(ca.FedLinearError):  # the same values read as another shape: parsed, and refused
        ca.task_transform(config, 2)
    assert ca.task_transform(ConfigRecord({"learning-rate": 0.1}), 3) == (None, "")
    bad = ConfigRecord({**protocol.train_config(0.1, base, 8), "transform-x-shift": "nope"})
    with pytest.raises(ca.FedLinearError, match="malformed standardization transform"):
        ca.task_transform(bad, 3)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_record_helpers_answer_as_flowers_record_views():
    """fedlinear.flower_fixes.record / record_names read a RecordDict as its array_records /
    config_records / metric_records views do, without building them."""
    from flwr.app import MetricRecord

    from fedlinear import flower_fixes

    content = RecordDict({
        "arrays": ArrayRecord({"kernel": Array(np.zeros((2, 1), np.float32))}),
        "config": ConfigRecord({"server-round": 1}),
        "metrics": MetricRecord({"num-examples": 3}),
        "more": MetricRecord({"x": 1.0}),
    })  # fmt: skip
    views = {ArrayRecord: content.array_records, ConfigRecord: content.config_records, MetricRecord: content.metric_records}
    for kind, view in views.items():
        assert flower_fixes.record_names(content, kind) == set(view)
        for name in ("arrays", "config", "metrics", "more", "absent"):
            assert flower_fixes.record(content, name, kind) is view.get(name)
