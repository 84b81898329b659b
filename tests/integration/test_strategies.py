"""Strategies by config (server/strategy.py): Flower 1.42's classes, checked against closed forms.

* each strategy's aggregate on small hand-computed cases and, in a whole in-process run, for one
  round against an independent NumPy computation from the replies that crossed the wire;
* FedAdam and FedYogi with our defaults reach 1.01 x the least-squares test MSE within 20 rounds
  on the data ``fedlinear run`` makes by default;
* a run that crashes and resumes ends bit-identical to an uninterrupted one for the stateful
  server optimizers (momentum, m_t / v_t are in the checkpoint);
* what Flower gets wrong and we work around: Krum's float32 distance cancellation, Bulyan's
  one-pass selection, FedMedian emptying the replies it reads.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Krum
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.server import strategy as st
from tests.inprocess import Crash, crash_after, run_in_process, write_synthetic_shards

# ---------------------------------------------------------------------------------------------
# independent reference implementations (float64, straight from the papers)
# ---------------------------------------------------------------------------------------------


def krum_scores(points: np.ndarray, f: int) -> np.ndarray:
    """Blanchard et al. 2017: sum of squared distances to the n - f - 2 nearest other points."""
    n = len(points)
    d2 = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    k = max(1, n - f - 2)  # as Flower does where the paper's n - f - 2 is < 1
    return np.array([np.sort(np.delete(d2[i], i))[:k].sum() for i in range(n)])


def ref_krum(points, f):
    return points[int(np.argmin(krum_scores(points, f)))]


def ref_multikrum(points, f, m):
    return points[np.argsort(krum_scores(points, f), kind="stable")[:m]].mean(axis=0)


def ref_bulyan(points, f) -> list[np.ndarray]:
    """El Mhamdi et al. 2018: θ = n - 2f chosen by recursive Krum, then per coordinate the mean of
    the β = θ - 2f values closest to the median. The last Krum steps score on one neighbour, so
    two mutual nearest neighbours tie (the paper leaves the choice open): every tie-break's result."""
    results = []

    def recurse(remaining, chosen):
        if len(chosen) == len(points) - 2 * f:
            chosen = np.array(chosen)
            beta = len(chosen) - 2 * f
            med = np.median(chosen, axis=0)
            idx = np.argsort(np.abs(chosen - med), axis=0, kind="stable")[:beta]
            results.append(np.take_along_axis(chosen, idx, axis=0).mean(axis=0))
            return
        scores = krum_scores(np.array(remaining), f)
        for i in np.flatnonzero(scores <= scores.min() * (1 + 1e-9) + 1e-12):
            recurse(remaining[:i] + remaining[i + 1 :], [*chosen, remaining[i]])

    recurse(list(points), [])
    return results


def assert_any_close(got, expected, tol=1e-6):
    """``got`` equals ``expected`` (or one of a list of equally valid results) to float32 rounding."""
    options = expected if isinstance(expected, list) else [expected]
    assert any(np.allclose(got, np.float32(e), rtol=tol, atol=tol) for e in options), (got, options)


def ref_trimmed(points, beta):
    k = int(beta * len(points))
    s = np.sort(points, axis=0)
    return s[k : len(points) - k].mean(axis=0)


# ---------------------------------------------------------------------------------------------
# hand-built replies
# ---------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("flower_task")  # building Messages needs a task identity


def reply(vector: np.ndarray, num_examples: int = 10, node: int = 0) -> Message:
    vector = np.asarray(vector, dtype=np.float32)
    content = RecordDict({
        "arrays": ArrayRecord({"kernel": Array(vector[:-1].reshape(-1, 1).copy()), "bias": Array(vector[-1:].copy())}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "client-key": node, "unit-weight": 1}),
    })  # fmt: skip
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def global_record(vector) -> ArrayRecord:
    vector = np.asarray(vector, dtype=np.float32)
    return ArrayRecord({"kernel": Array(vector[:-1].reshape(-1, 1).copy()), "bias": Array(vector[-1:].copy())})


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([arrays["kernel"].numpy().ravel(), arrays["bias"].numpy().ravel()]).astype(np.float64)


def built(strategy: str, n: int = 7, **knobs):
    cfg = RunConfig.from_run_config({"strategy": strategy, **knobs})
    return st.build_strategy(cfg, {1000 + i: i for i in range(n)}).base


def aggregate(base, start, points, sizes=None):
    base._remember_global(global_record(start))  # what configure_train does each round
    msgs = [reply(p, (sizes or [10] * len(points))[i], i) for i, p in enumerate(points)]
    arrays, _ = base.aggregate_train(1, msgs)
    return flat(arrays), msgs


def test_hand_cases_of_the_robust_rules():
    # 1-D points (bias only) one can check on paper
    pts = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    start = np.zeros(1)
    assert aggregate(built("fedmedian", 5), start, pts)[0] == pytest.approx([2.0])
    # trimmed mean, beta 0.2 of 5: one cut at each end -> mean(1, 2, 3)
    assert aggregate(built("fedtrimmedavg", 5, **{"trimmed-beta": 0.2}), start, pts)[0] == pytest.approx([2.0])
    # Krum, f = 1: n - f - 2 = 2 nearest; scores 0:1+4=5, 1:1+1=2, 2:1+1=2, 3:1+4=5 ... 1 and 2 tie; 100 is far
    got = aggregate(built("krum", 5, **{"num-malicious-nodes": 1}), start, pts)[0]
    assert got[0] in (1.0, 2.0)
    # MultiKrum, m = n - f = 4 lowest scores: everything but 100 -> 1.5, equal weights despite sizes
    got = aggregate(built("multikrum", 5, **{"num-malicious-nodes": 1}), start, pts, sizes=[1, 1, 1, 1, 10**6])[0]
    assert got == pytest.approx([1.5])


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_rules_equal_the_papers_on_random_replies(name):
    rng = np.random.default_rng(3)
    n, f = 11, 2
    start = rng.normal(size=4)
    pts = start + rng.normal(scale=0.1, size=(n, 4))
    pts[0] += 5.0  # an attacker
    pts[1] -= 3.0  # another one
    pts = pts.astype(np.float32).astype(np.float64)
    knobs = {"num-malicious-nodes": f, "trimmed-beta": 0.2}
    expected = {
        "fedmedian": lambda: np.median(pts, axis=0),
        "fedtrimmedavg": lambda: ref_trimmed(pts, 0.2),
        "krum": lambda: ref_krum(pts, f),
        "multikrum": lambda: ref_multikrum(pts, f, n - f),
        "bulyan": lambda: ref_bulyan(pts, f),
    }[name]()
    got, _ = aggregate(built(name, n, **knobs), start, pts)
    assert_any_close(got, expected)


def test_bulyan_selects_by_recursive_krum_not_one_pass():
    """Flower's default Bulyan selection takes the θ best scores of one Krum pass; the paper re-runs
    Krum on what is left. A case where they differ (found by search, kept fixed here)."""
    rng = np.random.default_rng(0)
    for trial in range(500):
        pts = rng.normal(size=(7, 2)).astype(np.float32)
        contents = [reply(p).content for p in pts]
        one_pass = {id(c) for c in select_multikrum(contents, num_malicious_nodes=1, num_nodes_to_select=5)}
        recursive = {id(c) for c in st.recursive_krum(contents, 1, 5)}
        if one_pass != recursive:
            break
    else:
        pytest.fail("no case found where one-pass and recursive Krum differ")
    got, _ = aggregate(built("bulyan", 7, **{"num-malicious-nodes": 1}), np.zeros(2), pts.astype(np.float64))
    assert_any_close(got, ref_bulyan(pts.astype(np.float64), 1))


def test_flower_krum_distances_cancel_in_float32_ours_do_not():
    """Flower computes |a - b|² as |a|² + |b|² - 2 a·b in the replies' float32: with weights far
    from 0 next to their spread the distances are noise and Krum picks the attacker. We hand it the
    updates (reply - global) in float64."""
    rng = np.random.default_rng(0)
    centre = np.full(10, 1e5)
    honest = centre + rng.normal(scale=0.01, size=(6, 10))
    attacker = centre + 0.3
    pts = np.vstack([attacker, honest]).astype(np.float32)
    flower = Krum(num_malicious_nodes=1, weighted_by_key="unit-weight")
    arrays, _ = flower.aggregate_train(1, [reply(p, node=i) for i, p in enumerate(pts)])
    paper = ref_krum(pts.astype(np.float64), 1)
    assert np.array_equal(flat(arrays), pts[0]), "Flower's Krum no longer picks the attacker: re-check the workaround"
    ours, _ = aggregate(built("krum", 7), centre, pts.astype(np.float64))
    np.testing.assert_array_equal(ours, paper.astype(np.float32))


def test_robust_rules_leave_the_replies_intact():
    """Flower's FedMedian / FedTrimmedAvg / Bulyan pop the arrays out of the replies they read."""
    pts = np.arange(21, dtype=np.float64).reshape(7, 3)
    for name in ("fedmedian", "fedtrimmedavg", "bulyan"):
        _, msgs = aggregate(built(name, 7), np.zeros(3), pts)
        assert all(set(m.content["arrays"].keys()) == {"kernel", "bias"} for m in msgs), name


def test_server_optimizers_on_one_round_by_hand():
    start = np.array([0.5, -1.0, 0.25])
    pts = np.array([[1.0, 0.0, 0.0], [2.0, -2.0, 1.0]])
    sizes = [1, 3]
    avg = (pts * np.array(sizes)[:, None]).sum(0) / 4
    delta = avg - start
    # FedAvgM (PyTorch convention, first round momentum = pseudo-gradient)
    got, _ = aggregate(built("fedavgm", 2, **{"server-learning-rate": 0.7}), start, pts, sizes)
    np.testing.assert_allclose(got, start + 0.7 * delta, rtol=1e-6)
    # FedAdam: Flower's bias correction uses t = server_round + 1 (round 1 counts as Adam step 2)
    b1, b2, eta, tau = 0.3, 0.8, 0.2, 0.05
    knobs = {"beta-1": b1, "beta-2": b2, "eta": eta, "tau": tau}
    m, v = (1 - b1) * delta, (1 - b2) * delta**2
    eta_norm = eta * np.sqrt(1 - b2**2) / (1 - b1**2)
    got, _ = aggregate(built("fedadam", 2, **knobs), start, pts, sizes)
    np.testing.assert_allclose(got, start + eta_norm * m / (np.sqrt(v) + tau), rtol=1e-5)
    # FedYogi: v_1 = v_0 - (1 - b2) Δ² sign(v_0 - Δ²) with v_0 = 0, no bias correction
    got, _ = aggregate(built("fedyogi", 2, **knobs), start, pts, sizes)
    np.testing.assert_allclose(got, start + eta * m / (np.sqrt((1 - b2) * delta**2) + tau), rtol=1e-5)
    # FedAdagrad: m = Δ, v = Δ²
    got, _ = aggregate(built("fedadagrad", 2, eta=eta, tau=tau), start, pts, sizes)
    np.testing.assert_allclose(got, start + eta * delta / (np.abs(delta) + tau), rtol=1e-5)


def test_server_optimizer_state_round_trips_through_json():
    base = built("fedadam", 2)
    aggregate(base, np.zeros(3), np.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]]))
    state = json.loads(json.dumps(base.state_dict()))
    other = built("fedadam", 2)
    other.load_state_dict(state)
    for name in ("m_t", "v_t"):
        for key in base.m_t:
            np.testing.assert_array_equal(getattr(other, name)[key], getattr(base, name)[key])
            assert getattr(other, name)[key].dtype == getattr(base, name)[key].dtype


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"strategy": "fedsgd"}, "'strategy' must be one of fedavg"),
        ({"strategy": "fedadam", "dp": "local"}, "'strategy' = fedadam cannot work with 'dp' = local"),
        ({"strategy": "krum", "secure-aggregation": True}, "cannot work with 'secure-aggregation'"),
        ({"max-update-norm": 1.0, "secure-aggregation": True}, "'max-update-norm' must be 0"),
        ({"server-momentum": 1.0}, "'server-momentum' must be in [0, 1)"),
        ({"trimmed-beta": 0.5}, "'trimmed-beta' must be in [0, 0.5)"),
        ({"tau": 0.0}, "'tau' must be in (0, inf)"),
        ({"num-malicious-nodes": -1}, "'num-malicious-nodes' must be >= 0"),
    ],
)
def test_bad_strategy_config_is_one_line(knobs, message):
    with pytest.raises(FedLinearError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RunConfig.from_run_config(knobs)


def test_too_few_clients_for_the_robust_rule_is_named():
    with pytest.raises(FedLinearError, match=r"bulyan with 'num-malicious-nodes' = 1 needs at least 7 clients"):
        built("bulyan", 6)
    with pytest.raises(FedLinearError, match=r"krum with 'num-malicious-nodes' = 2 needs at least 7"):
        built("krum", 6, **{"num-malicious-nodes": 2})


# ---------------------------------------------------------------------------------------------
# whole runs, in-process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("strategies"), 7, 120, 3, 5, 300)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """What ``fedlinear run`` writes when given no data: 10 clients x 1000 rows, d = 10, noise 0.1."""
    return write_synthetic_shards(tmp_path_factory.mktemp("default"), 10, 1000, 10, 42, 2000)


def one_round(uris, run_dir, **knobs):
    grids = []
    status, manifest = run_in_process(uris, run_dir, grids=grids, **{"num-server-rounds": 1, **knobs})
    assert status["status"] == "completed", status
    grid = grids[0]
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    start = flat(trains[0].content["arrays"])
    replies = sorted(
        (r for s, r in zip(grid.sent, grid.received, strict=True) if s.metadata.message_type == "train"),
        key=lambda r: r.content["metrics"]["client-key"],
    )
    pts = np.array([flat(r.content["arrays"]) for r in replies])
    sizes = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    got = np.r_[manifest["standardized-weights"]["kernel"], manifest["standardized-weights"]["bias"]]
    return trains, start, pts, sizes, got


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
             "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"],
)  # fmt: skip
def test_each_strategy_runs_and_its_first_round_is_the_closed_form(name, small, tmp_path):
    uris, test = small
    trains, start, pts, sizes, got = one_round(uris, str(tmp_path / "run"), strategy=name, **{"test-uri": test})
    mean = (pts * sizes[:, None]).sum(0) / sizes.sum()
    delta = mean - start
    cfg = RunConfig()
    eta = st.DEFAULT_ETA.get(name)
    expected = {
        "fedavg": lambda: mean,
        "fedprox": lambda: mean,
        # server-learning-rate 1, first round: momentum = pseudo-gradient -> the mean
        "fedavgm": lambda: start - cfg.server_learning_rate * (start - mean),
        "fedadam": lambda: start + eta * np.sqrt(1 - cfg.beta_2**2) / (1 - cfg.beta_1**2)
        * (1 - cfg.beta_1) * delta / (np.sqrt((1 - cfg.beta_2) * delta**2) + cfg.tau),
        "fedyogi": lambda: start + eta * (1 - cfg.beta_1) * delta / (np.sqrt((1 - cfg.beta_2) * delta**2) + cfg.tau),
        "fedadagrad": lambda: start + eta * delta / (np.abs(delta) + cfg.tau),
        "fedmedian": lambda: np.median(pts, axis=0),
        "fedtrimmedavg": lambda: ref_trimmed(pts, cfg.trimmed_beta),
        "krum": lambda: ref_krum(pts, cfg.num_malicious_nodes),
        "multikrum": lambda: ref_multikrum(pts, cfg.num_malicious_nodes, len(pts) - cfg.num_malicious_nodes),
        "bulyan": lambda: ref_bulyan(pts, cfg.num_malicious_nodes),
    }[name]()
    assert_any_close(got, expected, tol=2e-6)
    if name == "fedprox":  # the mixin bypasses FedProx.configure_train: proximal-mu must still go out
        assert all(m.content["config"]["proximal-mu"] == cfg.proximal_mu for m in trains)
    else:
        assert all("proximal-mu" not in m.content["config"] for m in trains)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_reach_least_squares_with_defaults(name, default_data, tmp_path):
    uris, test = default_data
    status, manifest = run_in_process(uris, str(tmp_path / "run"), strategy=name, **{"test-uri": test})
    assert status["status"] == "completed", status
    assert manifest["final"]["test-mse-ratio"] <= 1.01, manifest["final"]


def final_weights(manifest) -> np.ndarray:
    return np.r_[manifest["standardized-weights"]["kernel"], manifest["standardized-weights"]["bias"]]


@pytest.mark.parametrize(
    "name,extra",
    [("fedadam", {}), ("fedavgm", {}),
     ("fedavg", {"dp": "central-server-clip", "dp-clipping": "adaptive", "dp-clipped-count-stddev": 1.0})],
)
def test_resumed_stateful_run_is_bit_identical(name, extra, small, tmp_path):
    """Server optimizer state (and the adaptive clipping norm, in the same checkpoint entry) restored."""
    uris, test = small
    knobs = {"strategy": name, "test-uri": test, "num-server-rounds": 6, **extra}
    status, whole = run_in_process(uris, str(tmp_path / "whole"), **knobs)
    assert status["status"] == "completed", status
    run_dir = str(tmp_path / "resumed")
    with pytest.raises(Crash):  # the server dies as round 4's tasks go out
        run_in_process(uris, run_dir, sabotage=crash_after(3 * len(uris)), **knobs)
    with open(os.path.join(run_dir, "checkpoints", "latest.json")) as handle:
        pointer = json.load(handle)
    assert pointer["round"] == 3 and pointer["strategy-state"]["clipping" if extra else "optimizer"]
    status, resumed = run_in_process(uris, run_dir, **knobs)
    assert status["status"] == "completed", status
    assert np.array_equal(final_weights(resumed), final_weights(whole))


def test_resume_with_another_strategy_is_refused(small, tmp_path):
    uris, test = small
    run_dir = str(tmp_path / "run")
    knobs = {"strategy": "fedadam", "test-uri": test, "num-server-rounds": 4}
    with pytest.raises(Crash):
        run_in_process(uris, run_dir, sabotage=crash_after(2 * len(uris)), **knobs)
    status, _ = run_in_process(uris, run_dir, **{**knobs, "strategy": "fedyogi"})
    assert status["status"] == "failed" and "strategy 'fedadam' -> 'fedyogi'" in status["message"], status


@pytest.mark.parametrize("name,extra", [("fedmedian", {}), ("fedadam", {}), ("fedavg", {"dp": "central-server-clip"})])
def test_federated_evaluation_works_with_every_weighting(name, extra, small, tmp_path):
    """Evaluate replies carry no unit-weight: the equal weighting of the robust rules and of DP must
    not make Flower refuse them (before, a DP run with fraction-evaluate > 0 failed on it)."""
    uris, test = small
    status, manifest = run_in_process(uris, str(tmp_path / "run"), strategy=name,
                                      **{"test-uri": test, "num-server-rounds": 1, "fraction-evaluate": 1.0, **extra})  # fmt: skip
    assert status["status"] == "completed", status
    with open(os.path.join(str(tmp_path / "run"), "history.json")) as handle:
        assert np.isfinite(json.load(handle)["rounds"][-1]["eval-mse"])
