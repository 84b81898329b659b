"""strategy = scaffold against a NumPy reference of Karimireddy et al. 2020, Algorithm 1 (option II),
through the real ServerApp and ClientApp code in one process (tests/inprocess.py): weights after k
rounds, resume bit-identical, tampered control deltas refused, combinations refused."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from flwr.app import Array, Context, RecordDict

from fedlinear.clients import client_app as ca
from fedlinear.common import model as lm
from fedlinear.common import protocol
from fedlinear.common.config import RunConfig
from fedlinear.common.csvio import load_csv, to_csv_bytes
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from tests.inprocess import Crash, crash_after, run_in_process

PARTIES, ROWS, D = 3, 24, 2
SETTINGS = {"standardize": "none", "learning-rate": 0.05, "batch-size": 8, "local-epochs": 2,
            "server-learning-rate": 0.7, "strategy": "scaffold", "seed": 7}  # fmt: skip


def shards(root) -> list[str]:
    """Equal shards (the paper's equal weights and ours coincide), each with its own optimum: drift."""
    rng = np.random.default_rng(0)
    uris = []
    for i in range(PARTIES):
        x = rng.normal(size=(ROWS, D)) + 0.7 * i
        y = x @ np.array([1.0 - i, 0.5 + i]) + 3.0 * i + 0.1 * rng.normal(size=ROWS)
        uri = os.path.join(str(root), f"client-{i}.csv")
        with open(uri, "wb") as handle:
            handle.write(to_csv_bytes(x, y))
        uris.append(uri)
    return uris


def reference(uris, rounds: int, sampled: list[list[int]] | None = None) -> np.ndarray:
    """Algorithm 1 of the paper in float64: local steps y <- y - η (g_i(y) - c_i + c) over the same
    mini-batches, option II c_i+ = c_i - c + (x - y_i) / (K η), x <- x + η_g mean Δy, c <- c + |S|/N mean Δc."""
    eta, eta_g, batch, epochs, seed = 0.05, 0.7, 8, 2, 7
    data = [load_csv(u) for u in uris]
    init = lm.initial_weights(D, seed)
    x = init.vector()
    c = np.zeros(D + 1)
    ci = [np.zeros(D + 1) for _ in data]
    for r in range(1, rounds + 1):
        chosen = sampled[r - 1] if sampled else list(range(len(data)))
        dy, dc = [], []
        for i in chosen:
            xs, ys = data[i].x, data[i].y
            y = x.copy()
            steps = 0
            for e in range(epochs):
                order = lm.batch_order(len(ys), seed, r, i, e)
                for start in range(0, len(order), batch):
                    idx = order[start : start + batch]
                    design = np.column_stack([xs[idx], np.ones(len(idx))])
                    grad = 2.0 * design.T @ (design @ y - ys[idx]) / len(idx)
                    y = y - eta * (grad - ci[i] + c)
                    steps += 1
            assert steps == epochs * math.ceil(len(ys) / batch)
            new_ci = ci[i] - c + (x - y) / (steps * eta)
            dy.append(y - x)
            dc.append(new_ci - ci[i])
            ci[i] = new_ci
        x = x + eta_g * np.mean(dy, axis=0)
        c = c + len(chosen) / len(data) * np.mean(dc, axis=0)
    return x


def final_weights(run_dir) -> np.ndarray:
    _, weights = RunStore(str(run_dir)).read_latest_checkpoint()
    return weights.vector()


@pytest.mark.parametrize("rounds", [1, 4])
def test_scaffold_follows_the_papers_algorithm_1(tmp_path, rounds):
    uris = shards(tmp_path)
    status, _ = run_in_process(uris, str(tmp_path / "run"), **SETTINGS, **{"num-server-rounds": rounds})
    assert status["status"] == "completed", status
    got, want = final_weights(tmp_path / "run"), reference(uris, rounds)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # and it is not FedAvg: the same settings without control variates end elsewhere
    fedavg_dir = tmp_path / "fedavg"
    run_in_process(uris, str(fedavg_dir), **{**SETTINGS, "strategy": "fedavg", "num-server-rounds": rounds,
                                              "server-learning-rate": 1.0})  # fmt: skip
    if rounds > 1:
        assert np.linalg.norm(final_weights(fedavg_dir) - want) > 100 * np.linalg.norm(got - want)


def test_scaffold_with_client_sampling_follows_the_paper(tmp_path):
    uris = shards(tmp_path)
    grids: list = []
    status, _ = run_in_process(uris, str(tmp_path / "run"), grids=grids,
                               **SETTINGS, **{"num-server-rounds": 3, "fraction-train": 0.67})  # fmt: skip
    assert status["status"] == "completed", status
    by_round: dict[int, list[int]] = {}
    for msg in grids[0].sent:
        if msg.metadata.message_type == "train":
            by_round.setdefault(int(msg.content["config"]["server-round"]), []).append(msg.metadata.dst_node_id - 1000)
    sampled = [sorted(by_round[r]) for r in (1, 2, 3)]
    assert all(len(s) == 2 for s in sampled)
    np.testing.assert_allclose(final_weights(tmp_path / "run"), reference(uris, 3, sampled), rtol=2e-4, atol=2e-5)


def test_scaffold_resumes_bit_identically(tmp_path):
    uris = shards(tmp_path)
    config = {**SETTINGS, "num-server-rounds": 4}
    run_in_process(uris, str(tmp_path / "whole"), **config)
    with pytest.raises(Crash):
        run_in_process(uris, str(tmp_path / "resumed"), sabotage=crash_after(2 * PARTIES + 1), **config)
    status, _ = run_in_process(uris, str(tmp_path / "resumed"), **config)
    assert status["status"] == "completed", status
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert a.tobytes() == b.tobytes()
    history = RunStore(str(tmp_path / "resumed")).read_history()
    assert history["resumed-at"] == [2]


def test_a_tampered_control_delta_is_refused_before_aggregation(tmp_path):
    uris = shards(tmp_path)
    config = {**SETTINGS, "num-server-rounds": 2}
    run_config = {"run-dir": str(tmp_path / "run"), "min-available-nodes": PARTIES, **config}

    def sabotage(nid, msg):
        if msg.metadata.message_type != "train" or nid != 1001:
            return None
        node = {"partition-id": 1, "num-partitions": PARTIES, "data-uri": uris[1]}
        reply = ca.app(msg, Context(run_id=1, node_id=nid, node_config=node, state=RecordDict(), run_config=run_config))
        delta = reply.content[protocol.RECORD_CONTROL][protocol.ARRAY_DELTA].numpy()
        reply.content[protocol.RECORD_CONTROL][protocol.ARRAY_DELTA] = Array(delta * 10.0)  # lies about its gradient
        return reply

    status, _ = run_in_process(uris, str(tmp_path / "run"), sabotage=sabotage, **config)
    assert status["status"] == "completed", status
    rounds = RunStore(str(tmp_path / "run")).read_history()["rounds"]
    for row in rounds[1:]:
        assert row["clients-ok"] == PARTIES - 1
        assert any("control delta disagrees" in f["reason"] for f in row["failures"])


def test_scaffold_refuses_what_it_cannot_do():
    for extra, words in (({"dp": "central-fixed"}, "dp"), ({"secure-aggregation": True}, "secure"),
                         ({"engine": "keras"}, "engine")):  # fmt: skip
        with pytest.raises(FedLinearError, match=words):
            RunConfig.from_run_config({"strategy": "scaffold", **extra})
