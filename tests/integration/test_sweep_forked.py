"""``fedlinear sweep --start fork`` (scripts/experiments/sweep/forked.py) against a stand-in for ``fedlinear run``.

The stand-in is run exactly as the real command is (``runpy`` of ``--runner MODULE`` in a child forked from a
warm worker): it reports the state it found (cwd, an environment variable, a preloaded module's cache, a
signal handler, the flwr logger's handlers, NumPy's global random draw) and then dirties all of it, so the
next run in the same worker shows whether anything leaked. Seeds 2-4 fail, hang and crash; seed 7 kills its
worker. The real runs (same weights and table as one subprocess per run) are in tests/e2e/test_sweep_forked.py.
"""

from __future__ import annotations

import csv
import json
import threading
import time

import pytest

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.cli import build_parser, main
from fedlinear.scripts.cli import sweep as sweep_command
from fedlinear.scripts.experiments.sweep import forked
from fedlinear.scripts.experiments.sweep import outputs as sweep_outputs
from fedlinear.scripts.experiments.sweep import settings as sweep_settings

STAND_IN = '''
import json, logging, os, signal, sys, time
import numpy as np
from fedlinear.common import npy
argv = sys.argv[1:]
out = argv[argv.index("--out") + 1]
sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
seed = int(sets["seed"])
found = {"cwd": os.getcwd(), "env": os.environ.get("SWEEP_LEAK"), "npy-cache": sorted(map(str, npy._HEADERS)),
         "sigterm-default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
         "flwr-handlers": len(logging.getLogger("flwr").handlers), "draw": float(np.random.random()),
         "pid": os.getpid(), "ppid": os.getppid(), "exporter": os.environ.get("FEDLINEAR_EXPORTER"), "argv0": sys.argv[0]}
os.chdir("/")
os.environ["SWEEP_LEAK"] = f"from seed {seed}"
npy._HEADERS[("leak", (seed,))] = b"x"
signal.signal(signal.SIGTERM, signal.SIG_IGN)
logging.getLogger("flwr").addHandler(logging.NullHandler())
print(f"stand-in seed {seed} in pid {os.getpid()}")
if seed == 2:
    print("fedlinear: error: the shard is broken", file=sys.stderr)
    sys.exit(1)
if seed == 3:
    time.sleep(60)
if seed == 4:
    os.kill(os.getpid(), signal.SIGKILL)
if seed == 7:
    os.kill(os.getppid(), signal.SIGKILL)  # the worker itself
    time.sleep(60)
os.makedirs(out, exist_ok=True)
json.dump({"status": "completed", "message": ""}, open(os.path.join(out, "status.json"), "w"))
json.dump({"rounds": [{"round": 1, "test-mse": 0.02, "test-mse-ratio": 2.0, "epsilon": None}]},
          open(os.path.join(out, "history.json"), "w"))
json.dump({"final": {"test-mse": 0.02, "test-mse-ratio": 2.0, "reference-test-mse": 0.01},
           "privacy": {"epsilon": None, "delta": None}, "found": found},
          open(os.path.join(out, "manifest.json"), "w"))
'''


@pytest.fixture
def standin(tmp_path, monkeypatch):
    (tmp_path / "standin.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # as the subprocess runner's tests: the runs find it there
    monkeypatch.setenv("FEDLINEAR_EXPORTER", "in-process")  # no shared exporter (no TensorFlow) for a stand-in
    monkeypatch.setenv("SWEEP_PROBE", "from the sweep")
    monkeypatch.setattr(sweep_outputs, "plot", lambda path, levels, title="": True)
    return tmp_path


def parse(*argv):
    return build_parser().parse_args(["sweep", *map(str, argv)])


def found(out, seed) -> dict:
    return json.loads((out / "runs" / f"z0-s{seed}" / "manifest.json").read_text())["found"]


def test_forked_runs_fail_hang_crash_and_lose_their_worker_alone_and_leak_nothing(standin, monkeypatch):
    monkeypatch.setattr(forked, "TIMEOUT_GRACE", 0.0)
    monkeypatch.setattr(forked, "STOP_GRACE", 0.5)
    out = standin / "s"
    args = parse("--noise", "0", "--seeds", "8", "--clients", "2", "--rounds", "1", "--mode", "inline", "--out", out,
                 "--parallel", "1", "--timeout", "3", "--runner", "standin")  # fmt: skip
    assert sweep_settings.validate(args).start == "fork"  # the default for inline runs
    started = time.monotonic()
    with pytest.raises(FedLinearError, match="4 of 8 runs did not complete"):
        sweep_command.cmd_sweep(args)
    assert time.monotonic() - started < 90  # bounded: the hung run (seed 3) and the orphan (seed 7) are stopped
    with open(out / "sweep.csv", newline="") as handle:
        rows = {int(r["seed"]): r for r in csv.DictReader(handle)}
    assert {s: rows[s]["status"] for s in rows} == {1: "completed", 2: "failed", 3: "timeout", 4: "failed",
                                                    5: "completed", 6: "completed", 7: "failed", 8: "completed"}  # fmt: skip
    assert rows[2]["error"].startswith("the shard is broken (exit 1")
    assert "timed out after 3 s" in rows[3]["error"]
    assert "(exit -9" in rows[4]["error"]  # SIGKILLed: only that run failed, the worker served the next
    assert "worker process ended" in rows[7]["error"]
    # one worker served seeds 1-7 (the hang and the crash did not cost it); seed 7 killed it; seed 8 had a new one
    first = {found(out, s)["ppid"] for s in (1, 5, 6)}
    assert len(first) == 1 and found(out, 8)["ppid"] not in first
    assert sorted(p.name for p in (out / "logs").glob("worker-*.log")) == ["worker-1.log", "worker-2.log"]
    assert "threads after the imports" not in (out / "logs" / "worker-1.log").read_text()  # it forks single-threaded
    clean = found(out, 1)
    assert clean["env"] is None and clean["cwd"] == forked.REPO and clean["sigterm-default"]
    assert clean["exporter"] == "in-process" and clean["argv0"].endswith("standin.py")  # as python -m sets it
    draws = set()
    for seed in (1, 5, 6, 8):  # each run starts from the worker's state, whatever the run before it did
        state = found(out, seed)
        assert {k: state[k] for k in ("cwd", "env", "npy-cache", "sigterm-default", "flwr-handlers")} == {
            k: clean[k] for k in ("cwd", "env", "npy-cache", "sigterm-default", "flwr-handlers")}
        assert state["pid"] != clean["pid"] or seed == 1  # a process of its own
        draws.add(state["draw"])
    assert len(draws) == 4  # NumPy's global random state reseeded per run, as in a fresh process
    log = (out / "logs" / "z0-s5.log").read_text()
    assert log.startswith("$ ") and "stand-in seed 5 in pid" in log  # the run's output in its own log
    # resume: the completed runs are kept, the rest rerun (and fail again the same way)
    with pytest.raises(FedLinearError, match="4 of 8 runs did not complete"):
        sweep_command.cmd_sweep(args)
    assert found(out, 1) == clean


def test_a_forked_run_is_stopped_when_the_sweep_is_interrupted(standin, monkeypatch):
    monkeypatch.setattr(forked, "STOP_GRACE", 0.5)
    settings = sweep_settings.validate(parse("--noise", "0", "--seeds", "1", "--first-seed", "3", "--clients", "2",
                                             "--mode", "inline", "--out", standin / "s", "--runner", "standin"))  # fmt: skip
    sweep_settings.prepare_out(settings)
    (job,) = settings.jobs()  # seed 3: the stand-in sleeps for a minute
    stop = threading.Event()
    with forked.ForkRunner(settings, 1) as runner:
        threading.Timer(2.0, stop.set).start()
        started = time.monotonic()
        outcome = runner(settings, job, "/data", stop)
        assert time.monotonic() - started < 30
        assert outcome.error == "interrupted" and outcome.returncode == 130 and not outcome.timed_out
        # the worker is still usable
        settings2 = sweep_settings.validate(parse("--noise", "0", "--seeds", "1", "--clients", "2", "--mode", "inline",
                                                  "--out", standin / "s", "--runner", "standin"))  # fmt: skip
        (job2,) = settings2.jobs()
        assert runner(settings2, job2, "/data", threading.Event()).returncode == 0
    workers = runner._all
    assert all(w.proc.poll() is not None for w in workers)  # closed with the runner


def test_start_is_checked_in_one_line(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path / "s"), "--mode", "simulation", "--start", "fork"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlinear: error: --start fork") and "--start process" in err and "\n" not in err
    for mode, want in (("inline", "fork"), ("simulation", "process"), ("processes", "process")):
        assert sweep_settings.resolve_start("auto", mode) == want
    assert sweep_settings.resolve_start("process", "inline") == "process"
