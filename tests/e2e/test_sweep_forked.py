"""``fedlinear sweep --start fork`` for real: the same per-run weights, histories and sweep.csv as one
``python -m fedlinear run`` subprocess per run (``--start process``), through the command line and the
Python API (``fedlinear.sweep``), with one TensorFlow import (the shared exporter) for the whole sweep."""

from __future__ import annotations

import csv
import json

import numpy as np

import fedlinear
from tests.conftest import run_cli, write_federation

RUNS = ("z0-s1", "z0-s2", "z1-s1", "z1-s2")
TIMED = ("elapsed-s", "wall-time-s", "wall-s")


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _table(out):
    with open(out / "sweep.csv", newline="") as handle:
        return [{k: v for k, v in r.items() if k not in ("wall-s", "run-dir")} for r in csv.DictReader(handle)]


def _run(out, name):
    manifest = json.loads((out / "runs" / name / "manifest.json").read_text())
    history = json.loads((out / "runs" / name / "history.json").read_text())
    return manifest, _untimed(history["rounds"])


def test_forked_sweep_gives_the_subprocess_sweeps_weights_and_table(tmp_path):
    data = tmp_path / "data"
    write_federation(str(data), clients=3, samples=200, features=4)
    common = ("--mode", "inline", "--data", data, "--noise", "0,1", "--seeds", "2", "--rounds", "3", "--parallel", "2")
    by_process = tmp_path / "process"
    done = run_cli("sweep", *common, "--start", "process", "--out", by_process, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    by_fork = tmp_path / "fork"
    done = run_cli("sweep", *common, "--out", by_fork, timeout=900)  # --start auto: fork for inline runs
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (by_fork / "logs").glob("worker-*.log")) == ["worker-1.log", "worker-2.log"]
    assert not list((by_process / "logs").glob("worker-*.log"))
    api = tmp_path / "api"
    rows = fedlinear.sweep(api, data=data, noise="0,1", seeds=2, rounds=3, parallel=2, start="fork", progress=False)
    assert len(rows) == 4
    assert _table(by_fork) == _table(by_process) == _table(api)
    pids = set()
    for name in RUNS:
        want, want_rounds = _run(by_process, name)
        for out in (by_fork, api):
            got, got_rounds = _run(out, name)
            assert got["weights"] == want["weights"], name  # bit for bit (JSON floats are exact)
            assert got_rounds == want_rounds, name
            assert got["export"]["by"] == "shared exporter"
            assert (out / "runs" / name / "model" / "saved_model.pb").exists()
            assert (out / "logs" / f"{name}.log").read_text().count("model exported to") == 1
        pids.add(json.loads((by_fork / "runs" / name / "manifest.json").read_text())["export"]["pid"])
        assert np.isfinite(np.asarray(want["weights"]["kernel"], dtype=float)).all()
    assert len(pids) == 1  # one exporter, one TensorFlow import, for the forked sweep's four runs
