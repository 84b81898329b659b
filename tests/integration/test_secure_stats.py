"""Standardization and the yardstick under secure aggregation: the pooled sums go through SecAgg+
(server/securestats.py, server/secure.py ``secure_sum``, clients/secure.py ``masked_statistics``).

In-process tests drive the real ServerApp against the real ClientApp handlers and mods through
tests/integration/test_secure.py's :class:`SecureGrid` (one Context per node, as Flower's runtimes
keep). They check that the secure sums are the exact pooled sums, that a real table with mixed
scales reaches the pooled least-squares optimum at defaults, that no reply the server received holds
a party's own statistic (or its unmasked limbs), that a dropout between the sums stops the run
instead of revealing a party by difference, and that the training clipping range follows the
training variables. The e2e test runs ``fedlinear run`` in Flower's simulation runtime.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedlinear.common import fixedpoint, scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.csvio import load_csv
from fedlinear.common.errors import FedLinearError
from fedlinear.server import nodes, rounds, secure
from fedlinear.scripts.cli import main as cli
from tests.conftest import run_cli
from tests.inprocess import drive
from tests.integration.test_secure import SecureGrid, leaked, numbers
from tests.integration.test_secure import Spy as UpdateSpy

BAR = 1.05
CLIENTS = 4


def statsmodels_table(name: str, target: str):
    frame = getattr(pytest.importorskip("statsmodels.api").datasets, name).load_pandas().data
    return frame.drop(columns=[target]).join(frame[target])


def split(frame, root) -> tuple[list[str], str]:
    source = root / "table.csv"
    frame.to_csv(source, index=False)
    out = root / "data"
    assert cli(["data", "split", str(source), "--clients", str(CLIENTS), "--out", str(out)]) == 0
    return [str(out / f"client-{i}.csv") for i in range(CLIENTS)], str(out / "test.csv")


def mixed_scales(root, seed=3, rows=(150, 200, 250, 300)):
    """Columns from 1e-6 to 1e6 with offsets, target offset 1e5, unequal shards."""
    rng = np.random.default_rng(seed)
    d = 5
    scales = np.geomspace(1e-6, 1e6, d)
    uris = []
    for i, n in enumerate(rows):
        z = rng.normal(size=(n, d)) + 0.3 * i  # a little covariate shift between parties
        x = 1e3 * rng.uniform(size=d) + scales * z
        y = 1e5 + z @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
        uri = root / f"client-{i}.csv"
        np.savetxt(uri, np.column_stack([x, y]), delimiter=",", fmt="%.17g")
        uris.append(str(uri))
    return uris


def optimum_ratio(manifest: dict, shards: list[str], test: str) -> tuple[float, float]:
    """(test MSE of the exported raw-space model / test MSE of numpy lstsq on the pooled shards, the latter)."""
    parts = [load_csv(uri) for uri in shards]
    x = np.vstack([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    theta = np.linalg.lstsq(np.column_stack([x, np.ones(len(x))]), y, rcond=None)[0]
    held = load_csv(test)
    best = float(np.mean((held.x @ theta[:-1] + theta[-1] - held.y) ** 2))
    kernel, bias = np.array(manifest["weights"]["kernel"]), float(manifest["weights"]["bias"])
    return float(np.mean((held.x @ kernel + bias - held.y) ** 2)) / best, best


def masked_replies(replies):
    """The secure sums' replies that carry masked vectors (SecAgg+'s stage 3)."""
    return [
        msg for msg in replies
        if msg.metadata.message_type == "train.secsum" and msg.has_content()
        and "masked_params" in msg.content.config_records.get("secaggplus_configs", {})
    ]  # fmt: skip


def run_secure(shards, run_dir, grid_class=SecureGrid, **config):
    run_config = {"run-dir": str(run_dir), "min-available-nodes": len(shards), "secure-aggregation": True, **config}
    grid = grid_class(shards, run_config)
    store = drive(grid, run_config)
    return grid, store


# ---------------------------------------------------------------------------------------------
# the sums themselves
# ---------------------------------------------------------------------------------------------


def test_secure_statistics_are_the_exact_pooled_sums(tmp_path):
    """Columns from 1e-6 to 1e6 with offsets: the pooled Σz is the correctly rounded exact sum of the
    parties' own float64 sums (not merely close), the diagonal likewise, and the whole PooledStats
    matches the clear computation on the pooled rows to float64 rounding."""
    shards = mixed_scales(tmp_path)
    cfg = RunConfig.from_run_config({"secure-aggregation": True, "min-available-nodes": CLIENTS})
    grid = SecureGrid(shards, {"secure-aggregation": True})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    parties = nodes.query_nodes(grid, cfg, grid.get_node_ids())
    pooled = parties.pooled
    data = [load_csv(uri) for uri in shards]
    totals = [scaling.Moments.of(p.x, p.y).total for p in data]
    exact_total = np.array([float(sum(Fraction(t[j]) for t in totals)) for j in range(len(totals[0]))])
    assert pooled.count == sum(p.num_examples for p in data)
    np.testing.assert_array_equal(pooled.mean, exact_total / pooled.count)
    diagonals = [scaling.Scatter.of(p.x, p.y, pooled.mean, full=False).matrix for p in data]
    exact_diagonal = np.array([float(sum(Fraction(s[j]) for s in diagonals)) for j in range(len(diagonals[0]))])
    np.testing.assert_array_equal(np.diagonal(pooled.scatter), exact_diagonal)
    clear = scaling.PooledStats.of(np.vstack([p.x for p in data]), np.concatenate([p.y for p in data]))
    np.testing.assert_allclose(pooled.mean, clear.mean, rtol=1e-14)
    scale = np.sqrt(np.outer(np.diagonal(clear.scatter), np.diagonal(clear.scatter)))
    assert np.abs(pooled.scatter - clear.scatter).max() / 1.0 <= 1e-12 * scale.max()
    np.testing.assert_allclose(pooled.scatter / scale, clear.scatter / scale, atol=1e-12)
    kernel, bias = pooled.solve()
    ref_kernel, ref_bias = clear.solve()
    np.testing.assert_allclose(kernel, ref_kernel, rtol=1e-8)
    assert bias == pytest.approx(ref_bias, rel=1e-9)
    # what the secure sums went through: three SecAgg+ runs of four stages to every node, nothing in the clear
    assert len(masked_replies(grid.received)) == 3 * CLIENTS


def test_fixed_point_limbs_round_trip_any_float64_exactly():
    rng = np.random.default_rng(0)
    values = [rng.normal(size=8) * 10.0 ** rng.integers(-300, 300, 8) for _ in range(5)]
    values[0][:3] = [5e-324, -1.7e308, 0.0]
    values[1][:3] = [-5e-324, 1.7e308, -0.0]
    enc = fixedpoint.full(8, 5)
    digits = [fixedpoint.encode(v, enc, "v") for v in values]
    assert all(((d + enc.half_range) >= 0).all() and ((d + enc.half_range) < 2**enc.bits).all() for d in digits)
    mean = np.sum(digits, axis=0) / 5  # what SecAgg+ returns with weight 1 each
    got = fixedpoint.decode(fixedpoint.limb_sums_from_mean(mean, enc, 5), enc, 5, "v")
    exact = [float(sum(Fraction(v[j]) for v in values)) for j in range(8)]
    assert got.tolist() == exact
    window = fixedpoint.window(np.array([3, 3]), 2)
    with pytest.raises(FedLinearError, match="outside the window"):
        fixedpoint.encode(np.array([1.0, 2.0**40]), window, "w")


def test_secure_sum_sums_any_registered_statistic_and_refuses_values_outside_their_window(tmp_path, monkeypatch):
    """The interface other code reuses (DP-FedOLS): register what a node computes, ask for the named
    arrays, get the pooled arrays. A party whose value breaks the announced window drops out with the
    reason; the others' sum comes back."""
    from fedlinear.clients import secure as client_secure

    shards = mixed_scales(tmp_path)
    monkeypatch.setitem(
        client_secure.STATISTICS, "gram", lambda x, y, args: {"xtx": (x * args["scale"]).T @ x, "xty": x.T @ y}
    )
    grid = SecureGrid(shards, {"secure-aggregation": True})
    cfg = RunConfig.from_run_config({"secure-aggregation": True})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    d = 5
    result = secure.secure_sum(grid, cfg, grid.get_node_ids(), "gram", {"xtx": (d, d), "xty": (d,)}, arguments={"scale": np.ones(d)})
    data = [load_csv(uri) for uri in shards]
    assert result.aggregated == sorted(grid.nodes) and result.failures == []
    exact = [[float(sum(Fraction(float((p.x.T @ p.x)[i, j])) for p in data)) for j in range(d)] for i in range(d)]
    np.testing.assert_array_equal(result.sums["xtx"], np.array(exact))
    np.testing.assert_allclose(result.sums["xty"], sum(p.x.T @ p.y for p in data), rtol=1e-12)
    # a window of 2**48 on every entry: the two largest shards exceed it and drop out (a threshold of
    # half the shares lets the protocol recover two dropouts of four)
    cfg = RunConfig.from_run_config({"secure-aggregation": True, "secagg-reconstruction-threshold": 0.5})
    windows = {"xtx": np.full((d, d), 48), "xty": np.full(d, 48)}
    small = [np.abs(p.x.T @ p.x).max() < 2.0**48 and np.abs(p.x.T @ p.y).max() < 2.0**48 for p in data]
    assert not all(small) and sum(small) >= 2, small
    result = secure.secure_sum(grid, cfg, grid.get_node_ids(), "gram", {"xtx": (d, d), "xty": (d,)}, windows, {"scale": np.ones(d)})
    kept = [nid for nid, ok in zip(sorted(grid.nodes), small, strict=True) if ok]
    assert result.aggregated == kept
    assert all("outside the window" in f["reason"] for f in result.failures)
    np.testing.assert_allclose(result.sums["xty"], sum(p.x.T @ p.y for p, ok in zip(data, small, strict=True) if ok), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# acceptance: a real table at defaults
# ---------------------------------------------------------------------------------------------


def test_a_real_table_with_mixed_scales_reaches_the_optimum_under_secure_aggregation(tmp_path):
    """statsmodels' macrodata (203 x 13: the year, levels in the thousands beside rates), 4 parties,
    40 rounds at defaults with only secure-aggregation = true: the exported raw-space model's test
    MSE is within 5 % of numpy's pooled least squares (before, every round failed: raw updates
    outside SecAgg+'s range)."""
    shards, test = split(statsmodels_table("macrodata", "realgdp"), tmp_path)
    _, store = run_secure(shards, tmp_path / "run", **{"num-server-rounds": 40, "test-uri": test})
    manifest = store.read_manifest()
    assert store.read_status()["status"] == "completed"
    assert manifest["standardization"]["kind"] == "whiten"
    assert any("SecAgg+" in note for note in manifest["standardization"]["notes"])
    ratio, best = optimum_ratio(manifest, shards, test)
    print(f"macrodata under secure aggregation: exported model test MSE {ratio:.4f} x numpy least squares")
    assert ratio <= BAR
    # the yardstick the run reported is the same optimum
    assert manifest["reference"]["test-mse"] == pytest.approx(best, rel=1e-6)
    assert "SecAgg+" in manifest["reference"]["source"]


# ---------------------------------------------------------------------------------------------
# what the server holds
# ---------------------------------------------------------------------------------------------


class StatSpy:
    """Every statistic a node computed for a secure sum, and the digits it handed SecAgg+ (before
    masking), recorded on the client side."""

    def __init__(self, monkeypatch):
        self.values: list[tuple[str, np.ndarray]] = []
        self.digits: list[tuple[str, np.ndarray]] = []
        real_encode = fixedpoint.encode

        def encode(values, enc, what):
            out = real_encode(values, enc, what)
            self.values.append((what, np.asarray(values, np.float64).ravel()))
            self.digits.append((what, (out + enc.half_range).astype(np.int64)))
            return out

        monkeypatch.setattr(fixedpoint, "encode", encode)


def found_in(received: list[np.ndarray], target: np.ndarray) -> bool:
    """Whether ``target`` (or any run of it as long as a received vector, for long targets) appears."""
    for vector in received:
        if vector.size == target.size and np.allclose(vector, target, rtol=1e-6, atol=0):
            return True
        if 4 <= vector.size < target.size:
            windows = np.lib.stride_tricks.sliding_window_view(target, vector.size)
            if np.isclose(windows, vector[None, :], rtol=1e-9, atol=0).all(axis=1).any():
                return True
    return False


def test_the_server_never_holds_an_unmasked_party_statistic(tmp_path, monkeypatch):
    """The grid is the only way anything from a client reaches the ServerApp's code, and
    :class:`SecureGrid` keeps every reply it handed back. Each party's own statistics (Σ[x y], the
    diagonal and off-diagonal scatter about the pooled mean) and the exact limbs it gave SecAgg+ are
    recorded on the client side (:class:`StatSpy`); no received number vector holds any of them,
    whole, flattened by limb, or as a run of consecutive values, nor a party's training update
    (test_secure.py's detector). The masked limbs the server got are uniform over [0, 2**32) (an
    unmasked digit vector lies below 2**28). As a control the same detector finds every party's
    Σ[x y] among the replies of the clear run."""
    shards = mixed_scales(tmp_path)
    spy = StatSpy(monkeypatch)
    updates = UpdateSpy(monkeypatch)
    grid, store = run_secure(shards, tmp_path / "run", **{"num-server-rounds": 2})
    assert store.read_status()["status"] == "completed"
    assert {what for what, _ in spy.values} == {"count", "total", "diagonal", "upper"}
    received = [v.astype(np.float64) for v in numbers(grid.received) if v.size >= 2]
    for what, value in spy.values:
        if what == "count":
            continue  # a single number (the shard size, which every party describes in the clear anyway)
        assert not found_in(received, value), f"a party's own '{what}' reached the server"
    for what, digits in spy.digits:
        for flat in (digits.ravel(order="C"), digits.ravel(order="F")):
            assert not found_in(received, flat.astype(np.float64)), f"a party's unmasked '{what}' limbs reached the server"
    assert leaked(grid.received, updates) == []
    masked = [v for msg in masked_replies(grid.received) for v in numbers([msg]) if v.dtype.kind in "iu" and v.size >= 16]
    assert len(masked) >= 3 * CLIENTS and all(v.max() > 2**30 for v in masked)
    # no ArrayRecord and no float in the secure sums' replies: only SecAgg+'s keys, shares and masked bytes
    for msg in grid.received:
        if msg.metadata.message_type == "train.secsum" and msg.has_content():
            assert all(len(record) == 0 for record in msg.content.array_records.values())

    control = StatSpy(monkeypatch)  # the clear run: each party's Σ[x y] is in its describe reply
    clear = SecureGrid(shards, {})
    clear_config = {"run-dir": str(tmp_path / "clear"), "min-available-nodes": CLIENTS, "num-server-rounds": 1}
    drive(clear, clear_config)
    clear_received = [v.astype(np.float64) for v in numbers(clear.received) if v.size >= 2]
    for uri in shards:
        part = load_csv(uri)
        assert found_in(clear_received, scaling.Moments.of(part.x, part.y).total)
    assert control.values == []


# ---------------------------------------------------------------------------------------------
# dropouts
# ---------------------------------------------------------------------------------------------


class DiesAtStatistic(SecureGrid):
    """Node ``victim`` stops answering once it is asked for ``statistic`` (its setup stage)."""

    victim, statistic = 1002, "scatter-diagonal"

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            config = msg.content.config_records.get("config")
            if msg.metadata.dst_node_id == self.victim and config is not None and config.get("statistic") == self.statistic:
                self.dead.add(self.victim)
        return super().send_and_receive(messages, timeout=timeout)


def test_a_party_lost_after_the_first_sum_stops_the_run_rather_than_be_revealed(tmp_path):
    """Node 1002 answers the first sum (n, Σ[x y]) and dies in the second: summing Σz again without it
    would give the server its Σz by difference, so the run stops, saying why."""
    shards = mixed_scales(tmp_path)
    with pytest.raises(FedLinearError, match=r"node\(s\) \[1002\] dropped out of the scatter diagonal sum.*reveal"):
        run_secure(shards, tmp_path / "run", grid_class=DiesAtStatistic, **{"num-server-rounds": 1, "secagg-timeout": 5})


def test_a_party_lost_in_the_first_sum_is_left_out_and_the_rest_go_on(tmp_path):
    """A node that dies before sharing its keys in the first sum is left out of everything; the
    statistics and the rounds are those of the other three."""
    shards = mixed_scales(tmp_path)
    grid_options = {"silent": {1003: "setup"}, "silent_round": 0}

    class Grid(SecureGrid):
        def __init__(self, uris, run_config):
            super().__init__(uris, run_config, **grid_options)

    _, store = run_secure(shards, tmp_path / "run", grid_class=Grid, **{"num-server-rounds": 2, "secagg-timeout": 5})
    history = store.read_history()
    assert [f["node-id"] for f in history["query-failures"]] == [1003]
    assert [row["clients-ok"] for row in history["rounds"][1:]] == [3, 3]
    assert history["reference"]["num-examples"] == 150 + 200 + 250


# ---------------------------------------------------------------------------------------------
# the training clipping range
# ---------------------------------------------------------------------------------------------


def test_the_training_clipping_range_follows_the_training_variables(tmp_path, monkeypatch):
    """Raw variables (``standardize = none``) with a target offset of 50: the optimum's bias is 50, the
    first rounds' updates move the bias by tens, far outside the configured ±8 that a fixed range
    would refuse. The range follows the training variables (8 x the optimum's largest coordinate):
    every party's update is aggregated in every round. Whitened (the default) the optimum is O(1)
    and the configured 8 stands."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1200, 3))
    y = 50.0 + x @ [1.0, -0.5, 0.25] + 0.1 * rng.normal(size=1200)
    shards = []
    for i in range(CLIENTS):
        uri = tmp_path / f"client-{i}.csv"
        np.savetxt(uri, np.column_stack([x[i::CLIENTS], y[i::CLIENTS]]), delimiter=",", fmt="%.17g")
        shards.append(str(uri))
    spy = UpdateSpy(monkeypatch)
    settings = {"num-server-rounds": 3, "standardize": "none", "learning-rate": 0.05}
    _, store = run_secure(shards, tmp_path / "raw", **settings)
    [chosen] = {cfg.secagg_clipping_range for _, cfg in spy.rounds.values()}
    assert chosen == pytest.approx(8 * 50.0, rel=0.01)
    largest = max(float(np.abs(update).max()) for update, _ in spy.updates.values())
    assert 8.0 < largest <= chosen  # a fixed ±8 would have refused these honest updates
    assert all(len(result.aggregated) == CLIENTS for result, _ in spy.rounds.values())
    assert all(row["clients-ok"] == CLIENTS for row in store.read_history()["rounds"][1:])

    cfg = RunConfig.from_run_config({"secure-aggregation": True})
    pooled = scaling.PooledStats.of(x, y)
    whiten = scaling.build_transform("auto", pooled, 3)
    assert secure.training_clipping_range(cfg, pooled, whiten, rounds.initial_weights(3, cfg.seed, whiten))[0] == 8.0


# ---------------------------------------------------------------------------------------------
# the real runtime
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e  # Flower's simulation runtime, fedlinear run
def test_simulation_runtime_secure_run_on_a_real_table_reaches_the_optimum(tmp_path):
    shards, test = split(statsmodels_table("star98", "NABOVE"), tmp_path)
    out = tmp_path / "run"
    done = run_cli("run", "--data", str(tmp_path / "data"), "--rounds", "40", "--out", str(out), "--mode", "simulation",
                   "--set", "secure-aggregation=true", timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pooled statistics of 4 parties through SecAgg+" in done.stdout
    assert "computed here from the shards" not in done.stdout  # the launcher did not compute them for the server
    with open(os.path.join(out, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["standardization"]["kind"] == "whiten"
    ratio, _ = optimum_ratio(manifest, shards, test)
    assert ratio <= BAR, ratio
    assert manifest["final"]["test-mse-ratio"] <= BAR


def test_the_training_clipping_range_is_sized_from_the_optimum_fit_intercept_trains_toward(tmp_path):
    """``fit-intercept = false``: the model trains toward the least squares through the origin, which
    has no bias coordinate; the with-intercept optimum (here a bias of 100) is not what the updates move
    toward and must not size the range. Checked against numpy's closed-form least squares."""
    rng = np.random.default_rng(4)
    x = np.column_stack([20.0 + rng.normal(size=800), rng.normal(size=800)])
    y = 100.0 + x[:, 1] + 0.1 * rng.normal(size=800)
    pooled = scaling.PooledStats.of(x, y)
    raw = scaling.Transform.identity(2)
    start = rounds.initial_weights(2, 0, raw, fit_intercept=False)
    for fit_intercept in (True, False):
        cfg = RunConfig.from_run_config(
            {"secure-aggregation": True, "standardize": "none", "fit-intercept": fit_intercept}
        )
        design = np.column_stack([x, np.ones(len(y))]) if fit_intercept else x
        optimum = np.linalg.lstsq(design, y, rcond=None)[0]
        chosen, how = secure.training_clipping_range(cfg, pooled, raw, start)
        assert chosen == pytest.approx(8 * np.abs(optimum).max(), rel=1e-6), how
    assert chosen < 8 * 50  # through the origin the kernel is about 100 / 20, not the bias of 100


def test_the_training_clipping_range_follows_the_continued_start_weights(tmp_path, monkeypatch):
    """``init-from``: round 1 starts from the earlier model, whose coordinate of 60 is far from both
    Glorot's start and this data's optimum (O(1)); its first updates are of that order, so the range
    is sized from the continued weights (8 x 60), not from the fresh start the run does not use."""
    from fedlinear.common import model as lm
    from fedlinear.common.export import export_savedmodel

    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 3))
    y = x @ [1.0, -0.5, 0.25] + 0.1 * rng.normal(size=400)
    shards = []
    for i in range(CLIENTS):
        uri = tmp_path / f"client-{i}.csv"
        np.savetxt(uri, np.column_stack([x[i::CLIENTS], y[i::CLIENTS]]), delimiter=",", fmt="%.17g")
        shards.append(str(uri))
    parent = str(tmp_path / "parent")
    export_savedmodel(lm.LinearWeights(np.array([[60.0], [0.0], [0.0]], np.float32), np.zeros(1, np.float32)), parent)
    spy = UpdateSpy(monkeypatch)
    settings = {"num-server-rounds": 1, "standardize": "none", "init-from": parent, "learning-rate": 0.05}
    _, store = run_secure(shards, tmp_path / "run", **settings)
    history = store.read_history()
    assert history["initial-weights"]["kernel"][0] == pytest.approx(60.0)
    [chosen] = {cfg.secagg_clipping_range for _, cfg in spy.rounds.values()}
    assert chosen == pytest.approx(8 * 60.0, rel=1e-6)
    largest = max(float(np.abs(update).max()) for update, _ in spy.updates.values())
    assert 8.0 < largest <= chosen  # the continued model's first updates, which a range from Glorot's start refuses
    assert all(row["clients-ok"] == CLIENTS for row in history["rounds"][1:])
