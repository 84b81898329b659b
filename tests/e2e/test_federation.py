"""End to end: real Flower SuperLink + SuperNode processes on loopback, and Flower's simulation engine."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests import bounded
from tests.conftest import REPO, run_cli, write_federation

ROUNDS = 3


def final_weights(run_dir):
    with open(os.path.join(run_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    return np.array(manifest["weights"]["kernel"] + [manifest["weights"]["bias"]]), manifest


def leftover_processes(workdir):
    """Processes still running with this run's private FLWR_HOME."""
    home = os.path.join(workdir, "flwr-home")
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("FLWR_HOME") == home:
                found.append(proc.info)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="module")
def seed5_runs(federation_dir, tmp_path_factory):
    """The four seed-5 runs the tests below compare (processes mode, processes mode with Flower's own cold
    ClientApps, simulation mode, and simulation mode again), started side by side: they are independent
    processes, so they overlap their start-up and export instead of queueing for it. Each is bounded by
    its own wait (run_cli)."""
    base = tmp_path_factory.mktemp("seed5")
    common = ["--data", federation_dir, "--clients", 3, "--rounds", ROUNDS, "--set", "seed=5"]
    argvs = {"proc": [], "cold": [], "sim": ["--mode", "simulation"], "again": ["--mode", "simulation"]}
    envs = {"cold": {"FEDLINEAR_WARM_CLIENTAPPS": "0"}}
    outs = {name: str(base / name / "run") for name in argvs}
    calls = {name: (lambda name=name: run_cli("run", *common, "--out", outs[name], *argvs[name], env=envs.get(name)))
             for name in argvs}  # fmt: skip
    done = bounded.concurrently(calls)
    return {name: (outs[name], done[name]) for name in argvs}


@pytest.fixture(scope="module")
def processes_run(seed5_runs):
    return seed5_runs["proc"]


@pytest.fixture(scope="module")
def simulation_run(seed5_runs):
    return seed5_runs["sim"]


def test_processes_mode_with_three_supernodes(processes_run, federation_dir):
    out, done = processes_run
    assert done.returncode == 0, done.stdout + done.stderr
    # progress per round, a summary table and the least-squares comparison
    for r in range(1, ROUNDS + 1):
        assert f"round {r:>3} | train loss" in done.stdout
    assert "x the pooled least-squares optimum" in done.stdout
    with open(os.path.join(out, "status.json")) as handle:
        assert json.load(handle)["status"] == "completed"
    with open(os.path.join(out, "history.json")) as handle:
        history = json.load(handle)
    assert [row["round"] for row in history["rounds"]] == list(range(ROUNDS + 1))
    assert all(row["clients-ok"] == 3 and row["clients-failed"] == 0 for row in history["rounds"][1:])
    losses = [row["test-mse"] for row in history["rounds"]]
    assert losses[-1] < losses[0] / 10
    with open(os.path.join(out, "metrics.csv")) as handle:
        assert len(handle.read().strip().splitlines()) == ROUNDS + 2
    checkpoints = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "checkpoints", "*")))
    assert checkpoints == ["latest.json"] + [f"round-{r:04d}.npz" for r in range(1, ROUNDS + 1)]
    weights, manifest = final_weights(out)
    with np.load(os.path.join(out, "checkpoints", f"round-{ROUNDS:04d}.npz")) as ckpt:
        # checkpoints hold the weights in the standardized variables the clients train in
        standardized = manifest["standardized-weights"]
        np.testing.assert_array_equal(
            np.append(ckpt["kernel"].ravel(), ckpt["bias"]),
            np.array(standardized["kernel"] + [standardized["bias"]], np.float32),
        )
    assert manifest["standardization"]["kind"] == "whiten"
    # the manifest: config, seed, versions, a SHA-256 per shard
    assert manifest["seed"] == 5 and manifest["config"]["num-server-rounds"] == ROUNDS
    assert manifest["versions"]["flwr"] == "1.42.0"
    for i, shard in enumerate(manifest["shards"]):
        path = os.path.join(federation_dir, f"client-{i}.csv")
        with open(path, "rb") as handle:
            assert shard["fingerprints"][0]["sha256"] == hashlib.sha256(handle.read()).hexdigest()
        assert shard["partition-id"] == i and shard["num-examples"] == 300
    assert os.path.exists(os.path.join(out, "model", "saved_model.pb"))
    assert leftover_processes(os.path.join(out, "logs")) == []


def test_processes_mode_forks_every_clientapp_warm_with_the_same_weights_as_cold(processes_run, seed5_runs):
    """Every ClientApp of a processes run is forked by the warm executor (scripts/local/warm_clientapp.py):
    one per node and stage (describe, scatter, one per round), none started cold; and the weights are the
    bytes of the same run with Flower's own cold ``flwr-clientapp`` processes. If a Flower upgrade stops
    starting ``flwr-clientapp`` by name from PATH, the count is 0 and this fails."""
    out, done = processes_run
    assert done.returncode == 0, done.stdout + done.stderr
    logs = os.path.join(out, "logs")
    with open(os.path.join(logs, "warm-clientapp.log")) as handle:
        forked = [line for line in handle if line.startswith("forked ")]
    assert len(forked) == 3 * (ROUNDS + 2), f"{len(forked)} ClientApps forked warm"
    for path in glob.glob(os.path.join(logs, "supernode-*.log")):
        with open(path, errors="replace") as handle:
            text = handle.read()
        assert "warm ClientApp executor not used" not in text, path
        assert "Traceback" not in text, path
    assert "warm ClientApp executor" not in done.stderr
    cold, cold_done = seed5_runs["cold"]
    assert cold_done.returncode == 0, cold_done.stdout + cold_done.stderr
    assert not os.path.exists(os.path.join(cold, "logs", "warm-clientapp.log"))
    names = [f"checkpoints/round-{r:04d}.npz" for r in range(1, ROUNDS + 1)]
    names.append("model/variables/variables.data-00000-of-00001")
    for name in names:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(cold, name), "rb") as b:
            assert a.read() == b.read(), name
    assert final_weights(out)[1]["weights"] == final_weights(cold)[1]["weights"]
    assert leftover_processes(logs) == [] and leftover_processes(os.path.join(cold, "logs")) == []


def test_simulation_mode_agrees_with_processes_mode(processes_run, simulation_run):
    (proc_out, _), (sim_out, sim_done) = processes_run, simulation_run
    assert sim_done.returncode == 0, sim_done.stdout + sim_done.stderr
    proc_w, _ = final_weights(proc_out)
    sim_w, _ = final_weights(sim_out)
    np.testing.assert_allclose(sim_w, proc_w, atol=1e-5, rtol=0)
    assert leftover_processes(os.path.join(sim_out, "logs")) == []


def test_same_seed_twice_gives_the_same_weights(simulation_run, seed5_runs):
    """docs/explanation/determinism.md promises bit-identical weights: compare bytes (every checkpoint, the exported
    variables) and exact values, not values to a tolerance. (The second run ran alongside the first.)"""
    first, first_manifest = final_weights(simulation_run[0])
    again, done = seed5_runs["again"]
    assert done.returncode == 0, done.stdout + done.stderr
    second, second_manifest = final_weights(again)
    assert np.array_equal(second, first)
    for key in ("weights", "exported-weights", "standardized-weights", "standardization"):
        assert second_manifest[key] == first_manifest[key], key
    names = [f"checkpoints/round-{r:04d}.npz" for r in range(1, ROUNDS + 1)]
    names.append("model/variables/variables.data-00000-of-00001")
    for name in names:
        with open(os.path.join(simulation_run[0], name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


LOADER = r"""
import json, sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
print(json.dumps(m.signatures["serving_default"](x=tf.constant(x))["y"].numpy().ravel().tolist()))
"""


def test_exported_model_predicts_with_the_final_weights(processes_run):
    out, _ = processes_run
    weights, _ = final_weights(out)
    x = np.random.default_rng(1).normal(size=(5, len(weights) - 1))
    done = subprocess.run(
        [sys.executable, "-c", LOADER, os.path.join(out, "model"), json.dumps(x.tolist())],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    predicted = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(predicted, x @ weights[:-1] + weights[-1], atol=1e-5)


@pytest.fixture(scope="module")
def refused_runs(federation_dir, tmp_path_factory):
    """Three independent runs the next three tests check, started side by side (each bounded by its own
    wait, run_cli): a shard with a malformed line (the node is left out), shards that disagree on the
    number of features (refused), and a federation waiting for a node that never connects (an error)."""
    base = tmp_path_factory.mktemp("refused")
    bad = base / "bad-line"
    shutil.copytree(federation_dir, bad)
    lines = (bad / "client-1.csv").read_text().splitlines()
    lines[4] = lines[4].replace(",", ",oops,", 1)
    (bad / "client-1.csv").write_text("\n".join(lines) + "\n")
    wide = base / "wide-shard"
    shutil.copytree(federation_dir, wide)
    write_federation(str(base / "wide"), clients=1, features=7)
    shutil.copy(base / "wide" / "client-0.csv", wide / "client-2.csv")
    argvs = {
        "failing": ["run", "--data", bad, "--rounds", 2, "--out", base / "failing-run", "--mode", "simulation",
                    "--set", "engine=keras", "--set", "fraction-evaluate=1.0", "--allow-missing-parties"],
        "disagree": ["run", "--data", wide, "--rounds", 2, "--out", base / "disagree-run", "--mode", "simulation"],
        "never": ["run", "--data", federation_dir, "--clients", 2, "--rounds", 1, "--out", base / "never-run",
                  "--set", "min-available-nodes=3", "--set", "node-wait-timeout=15"],
    }  # fmt: skip
    done = bounded.concurrently({name: (lambda argv=argv: run_cli(*argv)) for name, argv in argvs.items()})
    return {"base": base, "bad": bad, "wide": wide, **done}


def test_a_failing_client_does_not_take_the_run_down(refused_runs):
    data, out, done = refused_runs["bad"], refused_runs["base"] / "failing-run", refused_runs["failing"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "left out" in done.stdout and "client-1.csv: line 5" in done.stdout
    assert "parties: 2 of 3 took part; node " in done.stdout  # the summary says who was left out
    history = json.loads((out / "history.json").read_text())
    [failure] = history["query-failures"]
    assert f"{data}/client-1.csv: line 5: expected 6 comma-separated columns, found 7" in failure["reason"]
    assert [row["clients-ok"] for row in history["rounds"][1:]] == [2, 2]
    assert all(row["eval-mse"] > 0 for row in history["rounds"][1:])  # federated evaluation on the healthy nodes


def test_shards_that_disagree_on_features_are_refused_naming_the_nodes(refused_runs):
    data, done = refused_runs["wide"], refused_runs["disagree"]
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("fedlinear: error: shards disagree on the number of features: node ")
    assert f"({data}/client-2.csv): 7" in line and f"({data}/client-0.csv): 5" in line
    status = json.loads((refused_runs["base"] / "disagree-run" / "status.json").read_text())
    assert status["status"] == "failed"


def test_a_node_that_never_connects_is_an_error_not_a_hang(refused_runs):
    done = refused_runs["never"]
    assert done.returncode == 1
    # 2 of 3 on a quiet machine; on a loaded one (two xdist workers, two sibling runs) the two real nodes
    # may not all have registered within the wait either: the count is what connected, never 3
    [line] = done.stderr.strip().splitlines()
    assert re.fullmatch(r"fedlinear: error: only [012] of 3 nodes \(config key 'min-available-nodes'\) connected "
                        r"within 15 s \(config key 'node-wait-timeout'\)", line), line
    assert leftover_processes(str(refused_runs["base"] / "never-run" / "logs")) == []


def test_a_crashed_server_resumes_from_its_last_checkpoint(processes_run, federation_dir, tmp_path):
    """Kill the ServerApp process after round 2; the same command again finishes the run, and the
    result is bit-identical to the uninterrupted run (sampling and batch order are stateless)."""
    out = tmp_path / "run"
    args = ["run", "--data", federation_dir, "--clients", 3, "--rounds", ROUNDS, "--out", out, "--set", "seed=5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlinear.scripts.cli", *map(str, args)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pointer = out / "checkpoints" / "latest.json"
    budget = bounded.Budget(300)
    while not (pointer.exists() and json.loads(pointer.read_text())["round"] >= 2):
        assert proc.poll() is None and not budget.spent(), "run ended before round 2"
        time.sleep(0.05)
    home = str(out / "logs" / "flwr-home")
    servers = []
    for candidate in psutil.process_iter(["cmdline"]):
        try:
            if "flwr-serverapp" in " ".join(candidate.info["cmdline"] or []) and candidate.environ().get("FLWR_HOME") == home:
                servers.append(candidate)
        except (psutil.Error, OSError):
            continue
    assert servers, "no flwr-serverapp process found"
    for server in servers:
        server.kill()
    bounded.communicate(proc, 300)
    assert proc.returncode == 1
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "run the same command again to resume" in status["message"]
    assert leftover_processes(str(out / "logs")) == []

    done = run_cli(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming after round 2" in done.stdout
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history["rounds"]] == list(range(ROUNDS + 1))
    assert history["resumed-at"] == [2]
    resumed, _ = final_weights(str(out))
    uninterrupted, _ = final_weights(processes_run[0])
    np.testing.assert_array_equal(resumed, uninterrupted)

    done = run_cli(*args)  # a completed run is never overwritten
    assert done.returncode == 1
    assert "already holds a completed run" in done.stderr


def test_ctrl_c_stops_every_process(federation_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlinear.scripts.cli", "run", "--data", federation_dir, "--rounds", "50", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell running the suite in the background (`cmd &`) starts it with SIGINT ignored, which
        # children inherit and Python then honours (no KeyboardInterrupt): give the CLI the default,
        # as an interactive terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the federation is really running
        if line.startswith("round   1 |"):
            break
    else:
        pytest.fail("no round completed: " + proc.stderr.read())
    proc.send_signal(signal.SIGINT)
    _, err = bounded.communicate(proc, 120)
    assert proc.returncode == 130
    assert "interrupted; every process it started has been stopped" in err
    assert leftover_processes(str(out / "logs")) == []
