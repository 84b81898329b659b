"""Secure aggregation (``secure-aggregation = true``): Flower's SecAgg+ behind server/secure.py and
clients/secure.py.

In-process tests drive the real ServerApp ``run`` against the real ClientApp object (its registered
handlers and mods, SecAgg+ included) through :class:`SecureGrid`; they check the quantization bound
every round, dropouts, and what the server receives. The federation tests run ``fedlinear run`` in
both modes (Flower's simulation engine, real SuperLink + SuperNode processes) and compare the secure
run with the clear run of the same seed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from fedlinear.clients import client_app as ca
from fedlinear.common import scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.server import rounds, secure
from tests import bounded
from tests.conftest import REPO, run_cli, write_federation
from tests.inprocess import drive, write_synthetic_shards

SIZES = (200, 300, 400, 500)  # unequal shards: shard-size weighting matters
# The clear and the secure run must train in the same variables: under any privacy mechanism the
# server gets no statistics, so both train on the raw (unit-scale) data with a fixed step.
SAME_TRAINING = {"standardize": "none", "learning-rate": 0.05, "seed": 5}
STAGE_KEY = "secaggplus_configs"


def stage_of(msg: Message) -> str | None:
    record = msg.content.config_records.get(STAGE_KEY)
    return None if record is None else str(record.get("stage"))


class SecureGrid:
    """The ServerApp's grid, delivering each message to the real ClientApp (``client_app.app``).

    Like Flower's runtimes it hands every node its own copy of a message and keeps one Context per
    node across messages (SecAgg+ keeps its keys there). ``silent[node] = stage`` makes the node
    stop answering from that SecAgg+ stage on, in round ``silent_round`` and after, as a dead process
    would. ``received`` is every reply the server-side code got back: the only channel it has.
    """

    def __init__(self, uris: list[str], run_config: dict, silent: dict[int, str] | None = None, silent_round: int = 1):
        self.nodes = {1000 + i: {"partition-id": i, "num-partitions": len(uris), "data-uri": uri} for i, uri in enumerate(uris)}
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config=dict(conf), state=RecordDict(), run_config=run_config)
            for nid, conf in self.nodes.items()
        }
        self.silent = dict(silent or {})
        self.silent_round = silent_round
        self.dead: set[int] = set()
        self.received: list[Message] = []
        self.tasks = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            stage = stage_of(msg)
            if stage is not None and self.silent.get(nid) == stage and int(msg.metadata.group_id) >= self.silent_round:
                self.dead.add(nid)
            if nid in self.dead:
                continue  # a dead node never answers; the server's wait ends at its timeout
            self.tasks += 1
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, nid, self.tasks
            replies.append(ca.app(copy.deepcopy(msg), self.contexts[nid]))
        self.received.extend(replies)
        return replies


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    uris, _ = write_synthetic_shards(tmp_path_factory.mktemp("secure-data"), len(SIZES), max(SIZES), 5, 11, 300, SIZES)
    return uris


class Spy:
    """Ground truth from the clients' side: every local training result (``client_app.fit``), and
    every SecureRound the server computed (``server.secure.train_round``)."""

    def __init__(self, monkeypatch):
        self.updates: dict[tuple[int, int], tuple[np.ndarray, int]] = {}  # (round, node) -> (update, n)
        self.trained: dict[tuple[int, int], np.ndarray] = {}  # (round, node) -> new weights
        self.rounds: dict[int, tuple[secure.SecureRound, RunConfig]] = {}
        real_fit, real_round = ca.fit, secure.train_round

        def fit(msg, context):
            new_weights, metrics = real_fit(msg, context)
            arrays = msg.content["arrays"]
            received = np.concatenate([arrays[name].numpy().astype(np.float64).ravel() for name in arrays])
            trained = np.concatenate([new_weights.as_dict()[name].astype(np.float64).ravel() for name in arrays])
            key = (int(msg.content["config"]["server-round"]), msg.metadata.dst_node_id)
            self.updates[key] = (trained - received, int(metrics["num-examples"]))
            self.trained[key] = trained
            return new_weights, metrics

        def train_round(grid, cfg, server_round, messages, num_examples=None):  # noqa: PLR0913
            result = real_round(grid, cfg, server_round, messages, num_examples)
            self.rounds[server_round] = (result, cfg)
            return result

        monkeypatch.setattr(ca, "fit", fit)
        monkeypatch.setattr(secure, "train_round", train_round)


def run_in_process(uris, run_dir, grid_options=None, **config):
    run_config = {"run-dir": run_dir, "min-available-nodes": len(uris), "num-server-rounds": 3, **SAME_TRAINING, **config}
    grid = SecureGrid(uris, run_config, **(grid_options or {}))
    return grid, drive(grid, run_config).read_history()


def exact_mean(spy: Spy, server_round: int, nodes, equal: bool = False) -> tuple[np.ndarray, list[int]]:
    updates = [spy.updates[(server_round, nid)] for nid in nodes]
    weights = [1 if equal else n for _, n in updates]
    mean = sum(w * u for (u, _), w in zip(updates, weights, strict=True)) / sum(weights)
    return mean, weights


def flat(record) -> np.ndarray:
    return np.concatenate([record[name].numpy().astype(np.float64).ravel() for name in record])


# ---------------------------------------------------------------------------------------------
# in-process: the bound every round, dropouts, what the server receives
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_in_process(shards, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    spy = Spy(monkeypatch)
    try:
        grid, history = run_in_process(shards, str(tmp_path_factory.mktemp("sec") / "run"), **{"secure-aggregation": True})
    finally:
        monkeypatch.undo()
    return spy, grid, history


def test_secure_aggregate_equals_fedavg_within_the_stated_bound_every_round(secure_in_process):
    spy, _, history = secure_in_process
    assert [row["clients-ok"] for row in history["rounds"][1:]] == [len(SIZES)] * 3
    assert sorted(spy.rounds) == [1, 2, 3]
    for server_round, (result, cfg) in spy.rounds.items():
        assert result.weighting == "num-examples" and result.failures == []
        exact, weights = exact_mean(spy, server_round, result.aggregated)
        bound = secure.quantization_bound(cfg, weights)
        # the range follows the training variables (server/secure.py training_clipping_range): raw data
        # here, with an optimum of coordinates up to ~1.4, so 8 x that
        assert cfg.secagg_clipping_range >= 8.0
        assert bound == pytest.approx(1.5 * (2 * cfg.secagg_clipping_range / 2**22) * max(SIZES) / np.mean(SIZES))
        error = np.abs(flat(result.update) - exact).max()
        assert error < bound, (server_round, error, bound)
        assert error > 0  # it is quantized: an exact match would mean the test compares the wrong things
        # relative to the weight vector, far inside the 1e-4 asked for
        assert np.linalg.norm(flat(result.update) - exact) / np.linalg.norm(flat(result.arrays)) < 1e-4


def test_equal_weights_and_client_clipping_under_dp(shards, tmp_path, monkeypatch):
    """Under DP every party weighs 1 and each clips its update to the task's clipping norm before
    masking (the server cannot clip what it cannot see); the bound is then 2c/Q."""
    spy = Spy(monkeypatch)
    run_config = {"run-dir": str(tmp_path / "run"), **SAME_TRAINING, "secure-aggregation": True, "dp": "central-client-clip"}
    cfg = RunConfig.from_run_config(run_config)
    grid = SecureGrid(shards, run_config)
    weights = ca.to_record(rounds.initial_weights(5, 5, scaling.Transform.identity(5)))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    messages = [
        Message(
            RecordDict({"arrays": weights, "config": ConfigRecord({"server-round": 1, "learning-rate": 0.05, "batch-size": 32, KEY_CLIPPING_NORM: 0.3})}),
            dst_node_id=nid,
            message_type="train",
        )
        for nid in grid.get_node_ids()
    ]
    result = secure.train_round(grid, cfg, 1, messages, {nid: n for nid, n in zip(grid.nodes, SIZES, strict=True)})
    assert result.weighting == "equal" and len(result.aggregated) == len(SIZES)
    clipped = []
    for nid in result.aggregated:
        update, _ = spy.updates[(1, nid)]
        norm = np.linalg.norm(update)
        assert norm > 0.3  # the test's clipping norm binds
        clipped.append(update * (0.3 / norm))
    exact = np.mean(clipped, axis=0)
    error = np.abs(flat(result.update) - exact).max()
    assert error < secure.quantization_bound(cfg) == 2 * 8.0 / 2**22


@pytest.mark.parametrize(
    ("stage", "in_aggregate"),
    [("collect_masked_vectors", False), ("unmask", True), ("share_keys", False), ("setup", False)],
)
def test_a_party_that_dies_mid_protocol_does_not_stop_the_round(shards, tmp_path, monkeypatch, stage, in_aggregate):
    """Node 1001 stops answering at ``stage`` of round 2 and stays dead. SecAgg+ recovers a party
    that dies after sharing its keys (collect masked vectors: its masks are removed with the key
    shares it gave; unmask: its update is already in the sum). A party that dies earlier halts the
    round in Flower 1.42; server/secure.py drops it from the protocol instead."""
    spy = Spy(monkeypatch)
    grid, history = run_in_process(
        shards, str(tmp_path / "run"), {"silent": {1001: stage}, "silent_round": 2}, **{"secure-aggregation": True}
    )
    rows = history["rounds"][1:]
    assert [row["round"] for row in rows] == [1, 2, 3]  # the run went on to the end
    assert rows[0]["clients-ok"] == 4
    result, cfg = spy.rounds[2]
    assert result.arrays is not None, "the round must produce an aggregate"
    survivors = [1000, 1001, 1002, 1003] if in_aggregate else [1000, 1002, 1003]
    assert result.aggregated == survivors and rows[1]["clients-ok"] == len(survivors)
    if not in_aggregate:
        [failure] = result.failures
        assert failure["node-id"] == 1001 and "no reply within 120 s (config key 'secagg-timeout')" in failure["reason"]
        assert f"stage '{stage.replace('_', ' ')}'" in failure["reason"]
    exact, weights = exact_mean(spy, 2, survivors)
    assert np.abs(flat(result.update) - exact).max() < secure.quantization_bound(cfg, weights, max(SIZES))
    # round 3 samples the dead node again (it is still listed) and goes on without it
    result3, _ = spy.rounds[3]
    assert result3.aggregated == [1000, 1002, 1003] and rows[2]["clients-ok"] == 3


def test_the_server_never_receives_an_individual_update_in_the_clear(secure_in_process, shards, tmp_path, monkeypatch):
    """How the test knows: the grid is the only way anything from a client reaches the ServerApp's
    code, and :class:`SecureGrid` keeps every reply it hands back. Each client's true update (and
    its new weights) is recorded on the client side as it leaves local training (:class:`Spy`).
    Every number the server received — every array in every ArrayRecord, every ``bytes`` value in
    a ConfigRecord read as a NumPy array (how SecAgg+ ships masked vectors), every numeric list and
    scalar — is compared with each of those vectors and with its quantized form. A masked vector is
    additionally uniform over [0, 2**32): a vector whose entries all fall in the quantizer's
    [0, Q] would be an unmasked one. As a control, the same detector finds every update in the
    clear run."""
    spy, grid, _ = secure_in_process
    assert spy.updates and grid.received
    found = leaked(grid.received, spy)
    assert found == [], found
    masked = [vector for vector in numbers(grid.received) if vector.dtype.kind in "iu" and vector.size == 5]
    assert len(masked) == 3 * len(SIZES), "one masked kernel per party and round"
    assert all((vector > 2**22).any() for vector in masked)

    control = Spy(monkeypatch)
    clear_grid, _ = run_in_process(shards, str(tmp_path / "clear"))
    assert len(leaked(clear_grid.received, control)) >= 3 * len(SIZES)


def numbers(replies: list[Message]) -> list[np.ndarray]:
    """Every numeric payload of the replies, as flat arrays."""
    out = []
    for msg in replies:
        if not msg.has_content():
            continue
        for record in msg.content.array_records.values():
            out += [np.asarray(record[name].numpy()).ravel() for name in record]
        for record in [*msg.content.config_records.values(), *msg.content.metric_records.values()]:
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                for item in items:
                    if isinstance(item, bytes):
                        with contextlib.suppress(Exception):
                            out.append(np.asarray(bytes_to_ndarray(item)).ravel())
                if items and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                    out.append(np.asarray(items, dtype=np.float64))
    return out


def leaked(replies: list[Message], spy: Spy) -> list[str]:
    """Which client updates, new weights or quantized updates (whole, or the kernel alone) appear
    among the replies. Single numbers are not compared: they match by chance."""
    received = [vector.astype(np.float64) for vector in numbers(replies) if vector.size >= 2]
    found = []
    for (server_round, nid), (update, n) in spy.updates.items():
        trained = spy.trained[(server_round, nid)]
        ratio = round(n / max(SIZES) * 2**22) / 2**22
        targets = {
            "update": update,
            "kernel update": update[:-1],
            "new weights": trained,
            "new kernel": trained[:-1],
        }
        for name, target in targets.items():
            c = spy.rounds[server_round][1].secagg_clipping_range if server_round in spy.rounds else 8.0
            quantized = (np.clip(ratio * target, -c, c) + c) * 2**22 / (2 * c)
            for vector in received:
                if vector.size == target.size and (
                    np.allclose(vector, target, rtol=1e-4, atol=1e-6) or np.all(np.abs(vector - quantized) <= 1.0)
                ):
                    found.append(f"round {server_round} node {nid}: {name}")
    return found


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("secagg-num-shares", 2, "'secagg-num-shares' must be a fraction in (0, 1] or an integer >= 3"),
        ("secagg-num-shares", 3.5, "'secagg-num-shares' must be a fraction"),
        ("secagg-reconstruction-threshold", 0, "'secagg-reconstruction-threshold' must be a fraction"),
        ("secagg-clipping-range", 0, "'secagg-clipping-range' must be > 0"),
        ("secagg-quantization-range", 2**31, "'secagg-quantization-range' must be in [2, 2**31)"),
        ("secagg-timeout", 0, "'secagg-timeout' must be a finite number of seconds > 0"),
        ("secure-aggregation", "maybe", "'secure-aggregation' must be a bool"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused_naming_the_key(key, value, message):
    with pytest.raises(FedLinearError, match=re.escape(message)):
        RunConfig.from_run_config({key: value})


def test_federated_evaluation_is_refused_under_secure_aggregation():
    with pytest.raises(FedLinearError, match="'fraction-evaluate' must be 0 with 'secure-aggregation' = true"):
        RunConfig.from_run_config({"secure-aggregation": True, "fraction-evaluate": 0.5})


def test_threshold_must_be_below_the_number_of_shares():
    with pytest.raises(FedLinearError, match="must be below 'secagg-num-shares'"):
        RunConfig.from_run_config({"secagg-num-shares": 5, "secagg-reconstruction-threshold": 5})


def test_too_many_parties_for_the_modulus_is_an_error_naming_the_key(shards, tmp_path):
    cfg = RunConfig.from_run_config({"secure-aggregation": True, "secagg-quantization-range": 2**30})
    grid = SecureGrid(shards, {})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    messages = [Message(RecordDict(), dst_node_id=nid, message_type="train") for nid in grid.get_node_ids()]
    with pytest.raises(FedLinearError, match="'secagg-quantization-range' = 1073741824: it must be below 1073741824"):
        secure.train_round(grid, cfg, 1, messages)


# ---------------------------------------------------------------------------------------------
# the federations: fedlinear run, both modes, secure against clear with the same seed
# ---------------------------------------------------------------------------------------------

FED_CLIENTS = 4
# Each stage of a live node takes a few seconds in processes mode (a fresh flwr-clientapp, 3 s polls),
# ~20 s on a loaded 2-core machine; a node that has not answered in 60 s is taken as dead.
FED_TIMEOUT = 60


@pytest.fixture(scope="module")
def fed_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("secure-fed")
    write_federation(str(path), clients=FED_CLIENTS, samples=300, features=5)
    return str(path)


def fedlinear_args(data, out, mode, rounds, secure_on, **extra):
    args = ["run", "--data", data, "--rounds", rounds, "--out", out, "--mode", mode]
    settings = {**SAME_TRAINING, "secure-aggregation": str(secure_on).lower(), "secagg-timeout": FED_TIMEOUT, **extra}
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return [str(a) for a in args]


def outcome(out):
    with open(os.path.join(out, "history.json")) as handle:
        history = json.load(handle)
    with open(os.path.join(out, "status.json")) as handle:
        status = json.load(handle)
    return history, status


def checkpoint(out, server_round):
    with np.load(os.path.join(out, "checkpoints", f"round-{server_round:04d}.npz")) as arrays:
        return np.append(arrays["kernel"].ravel(), arrays["bias"]).astype(np.float64)


def fedlinear(data, out, mode, rounds, secure_on):
    done = run_cli(*fedlinear_args(data, out, mode, rounds, secure_on), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def assert_within_bound(secured, clear, rounds):
    """Each round's quantization error passes through the next round's local training, which for a
    stable step does not amplify it: after ``rounds`` rounds the weights differ by at most ``rounds``
    times the per-round bound, plus float32 storage of the weights each round."""
    bound = secure.quantization_bound(RunConfig(), [300] * FED_CLIENTS)
    tolerance = rounds * (bound + 2 * np.finfo(np.float32).eps * np.abs(clear).max())
    difference = np.abs(secured - clear).max()
    assert difference < tolerance, (difference, tolerance)
    assert np.linalg.norm(secured - clear) / np.linalg.norm(clear) < 1e-4


@pytest.fixture(scope="module")
def simulation_runs(fed_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("secure-sim")
    fedlinear(fed_data, str(base / "clear"), "simulation", 2, False)
    done = fedlinear(fed_data, str(base / "secure"), "simulation", 2, True)
    return str(base / "clear"), str(base / "secure"), done


@pytest.mark.e2e  # a real federation (Flower's runtime, real processes)
def test_simulation_mode_secure_run_matches_the_clear_run(simulation_runs):
    clear, secured, done = simulation_runs
    assert "secure aggregation (SecAgg+)" in done.stdout
    history, _ = outcome(secured)
    assert [row["clients-ok"] for row in history["rounds"][1:]] == [FED_CLIENTS] * 2
    for server_round in (1, 2):
        assert_within_bound(checkpoint(secured, server_round), checkpoint(clear, server_round), server_round)


@pytest.fixture(scope="module")
def processes_runs(fed_data, tmp_path_factory):
    """A clear run of one round, and a secure run of two rounds in which SuperNode 3 is killed in
    round 2 right after it received the "collect masked vectors" task, i.e. after it shared its keys
    (its log shows each task it receives: setup, share keys, collect masked vectors, unmask)."""
    base = tmp_path_factory.mktemp("secure-proc")
    fedlinear(fed_data, str(base / "clear"), "processes", 1, False)
    out = str(base / "secure")
    args = fedlinear_args(fed_data, out, "processes", 2, True, **{"secagg-reconstruction-threshold": 0.5})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlinear.scripts.cli", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        killed = kill_supernode_on_task(proc, out, partition=3, task=7, within=600)
        stdout, stderr = bounded.communicate(proc, 900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    return str(base / "clear"), out, killed, stdout


def kill_supernode_on_task(proc, out, partition, task, within):
    """SIGKILL SuperNode ``partition`` (and its children) once its log shows it received its
    ``task``-th SecAgg+ message; polls the log every 50 ms, for at most ``within`` seconds."""
    log = os.path.join(out, "logs", f"supernode-{partition}.log")
    home = os.path.join(out, "logs", "flwr-home")
    budget = bounded.Budget(within)
    while True:
        assert proc.poll() is None, "the run ended before the node got its task"
        assert not budget.spent(), f"SuperNode {partition} never received SecAgg+ task {task}"
        with contextlib.suppress(OSError), open(log, encoding="utf-8", errors="replace") as handle:
            if handle.read().count("Receiving: train.secagg message") >= task:
                break
        time.sleep(0.05)
    victims = []
    for candidate in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            cmdline = " ".join(candidate.info["cmdline"] or [])
            if "flower-supernode" in cmdline and f"partition-id={partition} " in cmdline and candidate.environ().get("FLWR_HOME") == home:
                victims += [*candidate.children(recursive=True), candidate]
    assert victims, f"SuperNode {partition} not found"
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    return len(victims)


@pytest.mark.e2e  # a real federation (Flower's runtime, real processes)
def test_processes_mode_secure_round_matches_the_clear_round(processes_runs):
    clear, secured, _, stdout = processes_runs
    assert "secure aggregation (SecAgg+)" in stdout
    history, _ = outcome(secured)
    assert history["rounds"][1]["clients-ok"] == FED_CLIENTS
    assert_within_bound(checkpoint(secured, 1), checkpoint(clear, 1), 1)


@pytest.mark.e2e  # a real federation (Flower's runtime, real processes)
def test_processes_mode_a_supernode_killed_after_sharing_keys_does_not_stop_the_round(processes_runs):
    _, secured, killed, stdout = processes_runs
    assert killed >= 1
    history, status = outcome(secured)
    assert status["status"] == "completed"
    round2 = history["rounds"][2]
    assert round2["round"] == 2 and 2 <= round2["clients-ok"] <= FED_CLIENTS - 1, round2
    reasons = [failure["reason"] for failure in round2["failures"]]
    # the killed node is recovered from: its masks are removed with the key shares it gave
    assert any("stage 'collect masked vectors'" in reason or "stage 'unmask'" in reason for reason in reasons), reasons
    assert "no client update" not in stdout


def test_masks_carry_the_whole_seed_not_32_bits():
    """Flower 1.42's mask generator keeps 32 bits of a 256-bit seed: two seeds with the same XOR
    fold give the same mask. Ours (installed in Flower's workflow and mod) does not."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation import secaggplus_utils
    from flwr.server.workflow import SecAggPlusWorkflow

    from fedlinear.common import secagg_prg

    # what the mod and the workflow call (their modules' globals)
    assert secaggplus_mod.__globals__["pseudo_rand_gen"] is secagg_prg.pseudo_rand_gen
    assert SecAggPlusWorkflow.unmask_stage.__globals__["pseudo_rand_gen"] is secagg_prg.pseudo_rand_gen
    seed = bytes(range(32))
    twin = bytearray(seed)
    twin[0] ^= 0xFF
    twin[4] ^= 0xFF  # the same 32-bit XOR fold
    shapes = [(), (5, 1), (1,)]
    flower_masks = secaggplus_utils.pseudo_rand_gen(seed, 2**32, shapes)
    assert all(np.array_equal(a, b) for a, b in zip(flower_masks, secaggplus_utils.pseudo_rand_gen(bytes(twin), 2**32, shapes)))
    ours, ours_twin = secagg_prg.pseudo_rand_gen(seed, 2**32, shapes), secagg_prg.pseudo_rand_gen(bytes(twin), 2**32, shapes)
    assert [a.shape for a in ours] == [(), (5, 1), (1,)] and all(a.dtype == np.int64 for a in ours)
    assert not np.array_equal(ours[1], ours_twin[1])
    assert all(np.array_equal(a, b) for a, b in zip(ours, secagg_prg.pseudo_rand_gen(seed, 2**32, shapes)))
    big = secagg_prg.pseudo_rand_gen(seed, 2**32, [(100_000,)])[0]
    assert 0 <= big.min() and big.max() < 2**32 and abs(big.mean() / 2**32 - 0.5) < 0.01


def test_masks_that_do_not_cancel_fail_the_round_instead_of_corrupting_the_model(shards, tmp_path, monkeypatch):
    """Parties whose mask generators differ (here: the clients fall back to Flower's own) unmask to
    noise; the server refuses an aggregate outside ±clipping range rather than apply it."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation import secaggplus_utils

    monkeypatch.setitem(secaggplus_mod.__globals__, "pseudo_rand_gen", secaggplus_utils.pseudo_rand_gen)
    spy = Spy(monkeypatch)
    settings = {"secure-aggregation": True, "num-server-rounds": 1, "reference": "none"}  # no statistics: round 1 itself
    _, history = run_in_process(shards, str(tmp_path / "run"), **settings)
    result, _ = spy.rounds[1]
    assert result.arrays is None and history["rounds"][1]["clients-ok"] == 0
    assert all("the masks did not cancel" in failure["reason"] for failure in result.failures)
    assert len(result.failures) == len(SIZES)
    # the secure sums of the statistics refuse such a sum too, and the run stops before round 1
    with pytest.raises(FedLinearError, match="secure statistics \\(moments\\) failed: .*the masks did not cancel"):
        run_in_process(shards, str(tmp_path / "stats"), **{"secure-aggregation": True, "num-server-rounds": 1})


@pytest.mark.parametrize("mode", ["central-client-clip", "local"])
def test_secure_aggregation_with_dp_adds_noise_and_accounts_every_round(shards, tmp_path, mode):
    """Central DP under secure aggregation: clients clip before masking, the server adds N(0, (zC/m)²)
    to the securely aggregated mean and accounts a release; local DP: clients noise before masking.
    Either way ε after each round equals dp-accounting's own figure, and the model differs from the
    noiseless secure run."""
    import dp_accounting

    settings = {"secure-aggregation": True, "dp": mode, "dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.3}
    _, noisy = run_in_process(shards, str(tmp_path / "dp"), **settings)
    eps = [row["epsilon"] for row in noisy["rounds"][1:]]
    for r, value in enumerate(eps, start=1):
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(1.0), r)
        assert value == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert all(row["clients-ok"] == len(SIZES) for row in noisy["rounds"][1:])
    run_in_process(shards, str(tmp_path / "plain"), **{"secure-aggregation": True})
    weights = []
    for name in ("dp", "plain"):
        with open(tmp_path / name / "manifest.json") as handle:
            weights.append(json.load(handle)["weights"]["kernel"])
    assert weights[0] != weights[1]


def test_server_side_clipping_is_refused_under_secure_aggregation():
    with pytest.raises(FedLinearError, match="central-client-clip"):
        RunConfig.from_run_config({"secure-aggregation": True, "dp": "central-server-clip"})
