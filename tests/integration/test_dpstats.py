"""Standardization statistics released under central DP (common/dpstats.py, server/dpstats.py): the
encoding's sensitivity on adversarial shards, ε of release + rounds against dp-accounting used
directly, determinism, a hostile reply, and a real table at defaults in both clipping modes."""

from __future__ import annotations

import math
import os

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedlinear.common import dpstats, protocol
from fedlinear.common.config import RunConfig
from fedlinear.server import privacy
from tests.inprocess import run_in_process, write_synthetic_shards

DELTA = 1e-5


def direct_epsilon(z: float, rounds: int, z_stats: float | None, delta: float = DELTA) -> float:
    """dp-accounting used directly: ``rounds`` Gaussian events at z and one at z_stats, composed."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    if z_stats is not None:
        accountant.compose(dp_accounting.GaussianDpEvent(z_stats))
    return accountant.get_epsilon(delta)


finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 4)), elements=finite),
       st.floats(1.5, 1e12))  # fmt: skip
def test_every_encoding_has_norm_at_most_one(block, max_scale):
    vector = dpstats.encode(block[:, :-1], block[:, -1], max_scale)
    assert np.isfinite(vector).all()
    assert float(np.linalg.norm(vector)) <= 1.0 + 1e-12
    assert dpstats.check_reply(vector, block.shape[1]) is None  # an honest reply always passes


def test_sensitivity_is_attained_and_never_exceeded_on_adversarial_shards():
    rng = np.random.default_rng(0)
    shards = [np.zeros((3, 3)), np.full((5, 3), 1e300), np.full((5, 3), -1e-300), rng.standard_cauchy((50, 3)) * 1e9,
              np.array([[1e7, -1e-7, 3.0]]), rng.normal(size=(20, 3))]  # fmt: skip
    for shard in shards:
        v = dpstats.encode(shard[:, :-1], shard[:, -1], 1e6)
        assert float(np.linalg.norm(v)) <= 1.0 + 1e-12
    # the bound is tight: every column at the range's top and at its mean (|a| = |b| = 1)
    assert float(np.linalg.norm(dpstats.encode(np.full((4, 2), 1e7), np.full(4, 1e7), 1e6))) == pytest.approx(1.0)
    # brute force: the largest change of the sum by adding any one of these parties
    others = [dpstats.encode(s[:, :-1], s[:, -1], 1e6) for s in shards]
    base = np.sum(others[:3], axis=0)
    assert max(float(np.linalg.norm(base + v - base)) for v in others) <= dpstats.sensitivity()


def test_decoding_is_finite_and_positive_for_any_noise():
    for draw in (np.full(8, 1e9), np.full(8, -1e9), np.zeros(8), np.random.default_rng(1).normal(0, 1e3, 8)):
        stats = dpstats.decode(draw, 4, 100, 1e6)
        assert np.isfinite(stats.mean).all() and (stats.variances() > 0).all() and np.isfinite(stats.variances()).all()


def test_decoding_without_noise_recovers_equal_parties_scales():
    rng = np.random.default_rng(2)
    x = rng.normal([5.0, -300.0], [2.0, 40.0], size=(4000, 2))
    y = rng.normal(1000.0, 10.0, size=4000)
    vectors = [dpstats.encode(x[i::4], y[i::4], 1e6) for i in range(4)]
    stats = dpstats.decode(np.sum(vectors, axis=0), 4, 4000, 1e6)
    assert stats.mean == pytest.approx([5.0, -300.0, 1000.0], rel=0.02)
    assert np.sqrt(stats.variances()[:2]) == pytest.approx([2.0, 40.0], rel=0.1)


def test_reply_validation_refuses_what_an_encoding_cannot_be():
    k = 3
    assert dpstats.check_reply(None, k) is not None
    assert dpstats.check_reply(np.zeros(5), k) is not None
    w = dpstats.weights(k)
    assert float(np.sum(w * w)) == pytest.approx(1.0)
    assert dpstats.check_reply(w * 1.01, k) is not None  # one weight too far: the norm bound would break
    assert dpstats.check_reply(-w, k) is None
    assert dpstats.check_reply(np.full(6, 0.5), k) is not None


@pytest.mark.parametrize("rounds,z,share", [(40, 1.0, 0.1), (5, 0.7, 0.5), (1, 3.0, 0.01)])
def test_combined_epsilon_equals_dp_accounting_used_directly(rounds, z, share):
    cfg = RunConfig(dp="central-server-clip", num_server_rounds=rounds, dp_noise_multiplier=z, dp_statistics_share=share)
    z_stats = privacy.statistics_noise(cfg)
    assert 1 / z_stats**2 == pytest.approx(share * (rounds / z**2 + 1 / z_stats**2))  # the documented split
    assert privacy.epsilon_of(cfg, z, rounds, True) == pytest.approx(direct_epsilon(z, rounds, z_stats), rel=1e-9)
    for mode, nodes in (("release", 4), ("auto", 4), ("auto", 400)):
        target = RunConfig(dp="central-server-clip", num_server_rounds=rounds, dp_target_epsilon=4.0,
                           dp_statistics_share=share, dp_statistics=mode, min_available_nodes=nodes)  # fmt: skip
        resolved = privacy.resolve_noise(target)
        released = privacy.releases_statistics(resolved)
        assert released == (mode == "release" or nodes == 400)
        assert resolved.dp_statistics == ("release" if released else "none")  # the decision is pinned
        spent = direct_epsilon(resolved.dp_noise_multiplier, rounds, privacy.statistics_noise(resolved) if released else None)
        assert spent == pytest.approx(4.0, rel=1e-6) and spent <= 4.0 + 1e-9


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """statsmodels' macrodata (mixed scales: years, GDP in thousands, rates), split into 4 parties."""
    sm = pytest.importorskip("statsmodels.api")
    from fedlinear.scripts.cli import main as cli

    root = tmp_path_factory.mktemp("macrodata")
    frame = sm.datasets.macrodata.load_pandas().data
    frame.drop(columns=["realgdp"]).join(frame["realgdp"]).to_csv(root / "t.csv", index=False)
    assert cli(["data", "split", str(root / "t.csv"), "--clients", "4", "--out", str(root / "data")]) == 0
    return [str(root / "data" / f"client-{i}.csv") for i in range(4)], str(root / "data" / "test.csv")


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_a_real_table_completes_at_defaults_with_epsilon_exact(table, tmp_path, clipping):
    shards, test = table
    config = {"dp": "central-server-clip", "dp-clipping": clipping, "num-server-rounds": 40, "test-uri": test}
    status, manifest = run_in_process(shards, str(tmp_path / "run"), **config)
    assert status["status"] == "completed", status  # at defaults: dp-statistics = none trains on raw variables
    info = manifest["privacy"]
    assert info["statistics"]["source"] == "none" and "dp-statistics = none" in info["statistics"]["description"]
    assert info["epsilon"] == pytest.approx(direct_epsilon(info["noise-multiplier"], 40, None), rel=1e-9)
    # the release forced: completes too, and ε covers it
    status, manifest = run_in_process(shards, str(tmp_path / "released"), **config, **{"dp-statistics": "release"})
    assert status["status"] == "completed", status
    info = manifest["privacy"]
    assert info["statistics"]["source"] == "released"
    z_stats = info["statistics"]["noise-multiplier"]
    assert info["epsilon"] == pytest.approx(direct_epsilon(info["noise-multiplier"], 40, z_stats), rel=1e-9)
    assert info["releases"] == 41  # 40 rounds and the statistics
    assert np.isfinite(manifest["weights"]["kernel"]).all()


def test_same_seed_same_weights_and_public_statistics_still_free(tmp_path):
    shards, test = write_synthetic_shards(tmp_path / "data", 4, 200, 4, 7, 200)
    config = {"dp": "central-server-clip", "num-server-rounds": 4, "test-uri": test, "dp-statistics": "release"}
    runs = [run_in_process(shards, str(tmp_path / f"run-{i}"), **config)[1] for i in range(2)]
    assert runs[0]["weights"] == runs[1]["weights"]
    assert runs[0]["privacy"]["statistics"]["source"] == "released"
    none = run_in_process(shards, str(tmp_path / "raw"), **{**config, "dp-statistics": "none"})[1]
    assert none["privacy"]["statistics"]["source"] == "none"
    assert none["privacy"]["epsilon"] == pytest.approx(direct_epsilon(1.0, 4, None), rel=1e-9)
    from fedlinear.common import scaling
    from fedlinear.common.csvio import load_csv

    parts = [load_csv(uri) for uri in shards]
    uri = str(tmp_path / "public.npz")
    scaling.PooledStats.of(np.vstack([p.x for p in parts]), np.concatenate([p.y for p in parts])).save(uri)
    public = run_in_process(shards, str(tmp_path / "public"), **config, **{"dp-public-statistics": True, "statistics-uri": uri})[1]
    assert public["privacy"]["statistics"]["source"] == "public"
    assert public["privacy"]["epsilon"] == pytest.approx(direct_epsilon(1.0, 4, None), rel=1e-9)


def test_auto_releases_only_when_the_target_scale_is_predicted_within_a_bit():
    def decide(**keys):
        return privacy.releases_statistics(RunConfig(**{"dp": "central-server-clip", **keys}))

    assert not decide(min_available_nodes=40)  # the default, none: measured worse than raw at 4-40 parties
    assert not decide(min_available_nodes=4, dp_statistics="auto")  # 4 parties: the target scale would be off by ~3 bits
    assert decide(min_available_nodes=40, dp_statistics="auto")
    assert decide(min_available_nodes=4, dp_statistics="release")
    assert not decide(min_available_nodes=40, dp_statistics="none")
    assert not decide(min_available_nodes=40, secure_aggregation=True, dp="central-client-clip")
    assert not privacy.releases_statistics(RunConfig(dp="local", min_available_nodes=40))


def test_a_hostile_statistics_reply_is_rejected_and_the_run_goes_on(tmp_path):
    shards, test = write_synthetic_shards(tmp_path / "data", 4, 200, 4, 8, 200)
    hostile = {1000: np.full(10, 10.0), 1001: np.array([np.nan] * 10), 1002: np.zeros(3)}

    def sabotage(node_id, msg):
        config = msg.content.config_records.get(protocol.RECORD_CONFIG, {})
        if msg.metadata.message_type == "query" and config.get(protocol.KEY_STAGE) == protocol.STAGE_DP_STATISTICS:
            if node_id in hostile:
                record = ArrayRecord({protocol.ARRAY_DP_STATISTICS: Array(hostile[node_id])})
                return Message(RecordDict({protocol.RECORD_DP_STATISTICS: record}), reply_to=msg)
        return None

    run_dir = str(tmp_path / "run")
    status, manifest = run_in_process(shards, run_dir, sabotage=sabotage, dp="central-server-clip",
                                      **{"num-server-rounds": 3, "test-uri": test, "dp-statistics": "release"})  # fmt: skip
    assert status["status"] == "completed", status
    import json

    history = json.load(open(os.path.join(run_dir, "history.json")))
    left = {f["node-id"] for f in history["query-failures"]}
    assert left == set(hostile)
    assert manifest["privacy"]["statistics"]["source"] == "released"
