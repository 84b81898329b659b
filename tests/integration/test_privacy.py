"""Differential privacy: clipping, noise, ε against an independent accountant, the budget, resume,
local DP, and that no statistic leaves a node in the clear when privacy is on.

Runs use the real ServerApp and ClientApp code in one process (tests/inprocess.py; the client
handlers are dispatched through the ClientApp, so their mods run as under Flower).
"""

from __future__ import annotations

import json
import math
import os

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp.strategy import fedavg as flower_fedavg

from fedlinear.common import privacy as private_noise
from fedlinear.common.config import RunConfig
from fedlinear.server.strategy import build_strategy
from tests.inprocess import Crash, crash_after, run_in_process, write_synthetic_shards

DELTA = 1e-5


def independent_epsilon(z: float, rounds: int, delta: float = DELTA) -> float:
    """Google's dp-accounting, used directly: RDP of a Gaussian mechanism composed ``rounds`` times."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("dp-data"), 4, 300, 5, 42, 500)


def history(run_dir):
    with open(os.path.join(run_dir, "history.json")) as handle:
        return json.load(handle)


def test_orientation_figures_from_the_issue():
    assert independent_epsilon(1.0, 1) == pytest.approx(4.73, abs=0.01)
    assert independent_epsilon(1.0, 5) == pytest.approx(12.3, abs=0.1)


@pytest.fixture
def aggregated(monkeypatch):
    """Every reply that reaches FedAvg's aggregation, as (kernel, bias) arrays (after any clipping)."""
    seen = []
    original = flower_fedavg.FedAvg.aggregate_train

    def recording(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                arrays = msg.content["arrays"]
                seen.append((server_round, arrays["kernel"].numpy().copy(), arrays["bias"].numpy().copy()))
        return original(self, server_round, replies)

    # patch FedAvg itself: Flower's accounted wrapper checks aggregate_train is FedAvg's
    monkeypatch.setattr(flower_fedavg.FedAvg, "aggregate_train", recording)
    return seen


@pytest.mark.parametrize("mode", ["central-server-clip", "central-client-clip"])
def test_central_dp_clips_every_aggregated_update_and_accounts_each_round(mode, shards, tmp_path, aggregated):
    uris, test = shards
    clip = 0.05
    globals_by_round = {}

    def zero_update_from_node_0(node_id, msg):
        if msg.metadata.message_type == "train":
            arrays = msg.content["arrays"]
            globals_by_round[int(msg.content["config"]["server-round"])] = (
                arrays["kernel"].numpy().copy(), arrays["bias"].numpy().copy()
            )
            if node_id == 1000:  # a client whose update is exactly zero
                reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(
                    {"num-examples": 300, "train-loss": 0.0, "client-key": 0, "unit-weight": 1})})  # fmt: skip
                return Message(reply, reply_to=msg)
        return None

    rounds = 4
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), sabotage=zero_update_from_node_0,
        **{"num-server-rounds": rounds, "test-uri": test, "dp": mode, "dp-clipping-norm": clip,
           "dp-noise-multiplier": 1.0},
    )  # fmt: skip
    assert status["status"] == "completed", status
    assert len(aggregated) == rounds * len(uris)
    for server_round, kernel, bias in aggregated:
        g_kernel, g_bias = globals_by_round[server_round]
        norm = math.sqrt(float(np.sum((kernel - g_kernel) ** 2) + np.sum((bias - g_bias) ** 2)))
        assert norm <= clip * (1 + 1e-5)
    unclipped = [r for r in aggregated if r[0] == 1]
    assert max(np.abs(k - globals_by_round[1][0]).max() for _, k, _ in unclipped) > 0  # not all zero
    # ε after every round: Flower's accountant == dp-accounting used directly, rising
    eps = [row["epsilon"] for row in history(tmp_path / "run")["rounds"][1:]]
    for r, value in enumerate(eps, start=1):
        assert value == pytest.approx(independent_epsilon(1.0, r), rel=1e-6)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    privacy = manifest["privacy"]
    assert privacy["mechanism"] == mode and privacy["epsilon"] == pytest.approx(eps[-1], rel=1e-12)
    assert privacy["delta"] == DELTA and privacy["releases"] == rounds
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert "epsilon" in handle.readline()


def test_epsilon_falls_as_the_noise_multiplier_grows(shards, tmp_path):
    uris, test = shards
    finals = []
    for z in (0.7, 1.5, 4.0):
        status, manifest = run_in_process(
            uris, str(tmp_path / f"z{z}"), **{"num-server-rounds": 3, "test-uri": test, "dp": "central-server-clip",
                                              "dp-noise-multiplier": z})  # fmt: skip
        assert status["status"] == "completed"
        finals.append(manifest["privacy"]["epsilon"])
        assert finals[-1] == pytest.approx(independent_epsilon(z, 3), rel=1e-6)
    assert finals[0] > finals[1] > finals[2]


def fake_reply(node_id, kernel, bias):
    metadata = Metadata(
        run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=1, reply_to_message_id="q",
        group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord({"kernel": Array(kernel), "bias": Array(bias)}),
            "metrics": MetricRecord({"num-examples": 5, "train-loss": 0.0, "unit-weight": 1}),
        }
    )
    return make_message(metadata, content=content)


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_central_noise_has_the_stated_standard_deviation_and_follows_the_seed():
    """Noise std z C / m over 20000 coordinates (relative standard error of a std estimate from n
    normal draws is 1 / sqrt(2n) = 0.5 %; the tolerance is 3 %, six standard errors)."""
    d, m, z, clip = 20000, 4, 1.3, 0.8
    cfg = RunConfig(dp="central-server-clip", dp_noise_multiplier=z, dp_clipping_norm=clip, seed=7)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    results = []
    for _ in range(2):
        built = build_strategy(cfg, {1 + k: k for k in range(m)})
        base = np.zeros((d, 1), np.float32), np.zeros(1, np.float32)
        arrays = ArrayRecord({"kernel": Array(base[0]), "bias": Array(base[1])})
        messages = list(built.strategy.configure_train(1, arrays, ConfigRecord(), Grid(range(1, m + 1))))
        assert len(messages) == m
        private_noise.seed_global_numpy("seed", 7, 1, private_noise.CENTRAL_DP_STREAM)
        replies = [fake_reply(1 + k, base[0].copy(), base[1].copy()) for k in range(m)]  # zero updates
        new, _ = built.strategy.aggregate_train(1, replies)
        noise = new["kernel"].numpy().ravel().astype(np.float64)
        assert np.std(noise) == pytest.approx(z * clip / m, rel=0.03)
        assert abs(np.mean(noise)) < 4 * z * clip / m / math.sqrt(d)
        results.append(noise)
    np.testing.assert_array_equal(results[0], results[1])  # one seed fixes the DP noise


def test_local_dp_noise_and_clipping_on_the_client():
    rng = private_noise.noise_rng("seed", 1, 2, 3)
    old = [np.zeros((5000, 1), np.float32), np.zeros(1, np.float32)]
    new = [np.full((5000, 1), 10.0, np.float32), np.ones(1, np.float32)]
    out, norm = private_noise.local_dp_release(new, old, clipping_norm=2.0, noise_multiplier=0.5, rng=rng)
    assert norm == pytest.approx(math.sqrt(5000 * 100 + 1))
    noise = out[0].ravel() - 10.0 * 2.0 / norm  # the clipped update's coordinate, then the noise
    assert np.std(noise) == pytest.approx(0.5 * 2 * 2.0, rel=0.05)  # z x sensitivity 2C
    clipped, _ = private_noise.clip_update(new, old, 2.0)
    assert math.sqrt(sum(float(np.sum(c**2)) for c in clipped)) == pytest.approx(2.0)
    small = [np.full((3, 1), 0.1, np.float32), np.zeros(1, np.float32)]
    same, _ = private_noise.clip_update(small, [np.zeros((3, 1)), np.zeros(1)], 2.0)
    np.testing.assert_allclose(same[0], small[0])  # within the bound: unchanged


def test_local_dp_run_accounts_per_round(shards, tmp_path):
    uris, test = shards
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), **{"num-server-rounds": 3, "test-uri": test, "dp": "local",
                                        "dp-noise-multiplier": 2.0, "dp-clipping-norm": 0.1})  # fmt: skip
    assert status["status"] == "completed", status
    eps = [row["epsilon"] for row in history(tmp_path / "run")["rounds"][1:]]
    assert eps == pytest.approx([independent_epsilon(2.0, r) for r in (1, 2, 3)], rel=1e-6)
    assert manifest["privacy"]["mechanism"] == "local"


def test_budget_stops_before_the_round_that_would_exceed_it_and_exports(shards, tmp_path):
    uris, test = shards
    budget = 10.0
    last_ok = max(r for r in range(1, 20) if independent_epsilon(1.0, r) <= budget)
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), **{"num-server-rounds": 10, "test-uri": test, "dp": "central-server-clip",
                                        "dp-max-epsilon": budget})  # fmt: skip
    assert status["status"] == "completed"
    assert f"before round {last_ok + 1}" in status["message"] and "dp-max-epsilon" in status["message"]
    assert manifest["final"]["round"] == last_ok
    assert manifest["privacy"]["epsilon"] <= budget
    assert manifest["privacy"]["stopped"] == status["message"]
    assert os.path.exists(tmp_path / "run" / "model" / "saved_model.pb")


def test_a_resumed_run_reports_the_same_epsilon(shards, tmp_path):
    uris, test = shards
    settings = {"num-server-rounds": 5, "test-uri": test, "dp": "central-server-clip"}
    _, whole = run_in_process(uris, str(tmp_path / "whole"), **settings)

    with pytest.raises(Crash):  # the server dies as round 3's tasks go out
        run_in_process(uris, str(tmp_path / "resumed"), sabotage=crash_after(2 * len(uris)), **settings)
    status, resumed = run_in_process(uris, str(tmp_path / "resumed"), **settings)
    assert status["status"] == "completed"
    assert [r["epsilon"] for r in history(tmp_path / "resumed")["rounds"]] == [
        r["epsilon"] for r in history(tmp_path / "whole")["rounds"]
    ]
    assert resumed["privacy"]["epsilon"] == whole["privacy"]["epsilon"]
    assert resumed["standardized-weights"] == whole["standardized-weights"]  # seeded noise: bit-identical


def test_no_statistics_leave_a_node_when_privacy_is_on(shards, tmp_path):
    uris, test = shards
    grids = []
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), grids=grids, **{"num-server-rounds": 2, "test-uri": test, "dp": "central-server-clip"}
    )
    replies = grids[0].received
    assert status["status"] == "completed"
    queries = [r for r in replies if r.metadata.message_type == "query"]
    assert len(queries) == len(uris)  # one describe stage, no statistics stage
    for reply in queries:
        assert set(reply.content.array_records) == set()
        assert set(reply.content["shard"]) == {"num-features", "num-examples", "client-key", "partition-id"}
    assert "reference" in manifest and manifest["reference"] == {}
    assert manifest["standardization"]["kind"] == "none"


def run_adaptive(norms, clip, rounds, target=0.5, stddev=0.0):
    """Drive our adaptive clipping over fake rounds whose update norms are ``norms`` (one per client)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    m = len(norms)
    cfg = RunConfig(dp="central-server-clip", dp_clipping="adaptive", dp_clipping_norm=clip,
                    dp_noise_multiplier=0.5, dp_target_quantile=target, dp_clipped_count_stddev=stddev or m / 20)  # fmt: skip
    built = build_strategy(cfg, {1 + k: k for k in range(m)})
    zero = np.zeros((3, 1), np.float32), np.zeros(1, np.float32)
    trajectory = [built.strategy.clipping_norm]
    np.random.seed(0)
    for r in range(1, rounds + 1):
        arrays = ArrayRecord({"kernel": Array(zero[0]), "bias": Array(zero[1])})
        list(built.strategy.configure_train(r, arrays, ConfigRecord(), Grid(range(1, m + 1))))
        replies = [fake_reply(1 + k, np.full((3, 1), n / math.sqrt(3), np.float32), np.zeros(1, np.float32))
                   for k, n in enumerate(norms)]  # fmt: skip
        built.strategy.aggregate_train(r, replies)
        trajectory.append(built.strategy.clipping_norm)
    return trajectory, built


def test_adaptive_clipping_moves_the_norm_toward_the_target_quantile():
    norms = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0] * 4  # 40 clients
    # eta 0.2: the norm moves by up to exp(0.2 x 0.5) = 1.105 a round
    up, _ = run_adaptive(norms, clip=0.5, rounds=80)  # everything clipped: the norm must grow
    assert up[1] > up[0] and up[10] > 2 * up[0]
    down, _ = run_adaptive(norms, clip=60.0, rounds=80)  # nothing clipped: the norm must shrink
    assert down[1] < down[0] and down[10] < down[0] / 2
    for trajectory in (up, down):  # both settle around the median norm (5..6 for target 0.5)
        assert 3.5 < np.median(trajectory[-20:]) < 8.0


def test_adaptive_clipping_accounts_the_count_noise_share():
    from fedlinear.server.privacy import adaptive_noise_split

    z, sigma_b = 0.5, 2.0
    z_delta = adaptive_noise_split(z, sigma_b)
    assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    _, built = run_adaptive([1.0] * 40, clip=1.0, rounds=3)
    assert built.accountant.get_epsilon(DELTA) == pytest.approx(independent_epsilon(0.5, 3), rel=1e-6)
    with pytest.raises(Exception, match="dp-clipped-count-stddev"):
        run_adaptive([1.0] * 4, clip=1.0, rounds=1, stddev=0.1)  # 0.5 >= 2 x 0.1: cannot split


def test_flowers_adaptive_clipping_moves_the_norm_the_wrong_way():
    """What we found in Flower 1.42 (docs/how-to/privacy.md): with every update clipped, its server-side
    adaptive wrapper *shrinks* the clipping norm (it feeds the clipped fraction into Andrew et al.'s
    rule, which expects the unclipped one). If this test fails, Flower fixed it: re-check that page."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    m = 10
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(weighted_by_key="unit-weight"), noise_multiplier=0.0, num_sampled_clients=m, initial_clipping_norm=0.1
    )
    zero = np.zeros((3, 1), np.float32), np.zeros(1, np.float32)
    arrays = ArrayRecord({"kernel": Array(zero[0]), "bias": Array(zero[1])})
    wrapper.configure_train(1, arrays, ConfigRecord(), Grid(range(1, m + 1)))
    replies = [fake_reply(1 + k, np.full((3, 1), 5.0, np.float32), np.zeros(1, np.float32)) for k in range(m)]
    before = wrapper.clipping_norm
    wrapper.aggregate_train(1, list(replies))
    assert wrapper.clipping_norm < before  # wrong direction: all clipped, yet the norm shrank


def test_the_yardstick_under_privacy_comes_from_local_statistics_never_from_the_nodes(shards, tmp_path):
    """What `fedlinear run` does under privacy: it computes the pooled statistics from the shards it holds
    and passes them as statistics-uri; the gap to the optimum is reported again, the nodes still send
    nothing, and training uses the statistics only when they are declared public."""
    from fedlinear.common.config import RunConfig as Config
    from fedlinear.common.csvio import load_csv
    from fedlinear.common.scaling import PooledStats
    from fedlinear.scripts.cli.run import write_local_statistics

    uris, test = shards
    stats_uri = write_local_statistics(uris, str(tmp_path / "statistics.npz"), Config())
    parts = [load_csv(u) for u in uris]
    x, y = np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
    loaded = PooledStats.load(stats_uri, 5)
    assert loaded.count == len(x) and np.allclose(loaded.mean, np.r_[x.mean(0), y.mean()], rtol=1e-12)
    settings = {"num-server-rounds": 2, "test-uri": test, "dp": "central-server-clip", "statistics-uri": stats_uri}
    grids = []
    status, manifest = run_in_process(uris, str(tmp_path / "run"), grids=grids, **settings)
    assert status["status"] == "completed", status
    assert "no node sent statistics" in manifest["reference"]["source"]
    assert manifest["final"]["test-mse-ratio"] > 0 and manifest["standardization"]["kind"] == "none"
    assert all(not r.content.array_records for r in grids[0].received if r.metadata.message_type == "query")
    status, public = run_in_process(uris, str(tmp_path / "public"), **settings, **{"dp-public-statistics": True})
    assert public["standardization"]["kind"] == "whiten"
    assert any("declared public" in note for note in public["standardization"]["notes"])
    with pytest.raises(Exception, match="statistics-uri"):
        PooledStats.load(stats_uri, 7)


def test_dp_weighs_every_client_equally_whatever_its_shard_size(tmp_path):
    """Flower's accounted wrappers require equal client weights: unequal shards must still work."""
    uris, test = write_synthetic_shards(tmp_path / "data", 3, 300, 4, 7, 200, sizes=[50, 120, 300])
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), **{"num-server-rounds": 2, "test-uri": test, "dp": "central-server-clip"}
    )
    assert status["status"] == "completed", status
    assert manifest["privacy"]["releases"] == 2
