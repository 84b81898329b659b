"""A local simulation of fedlinear's own app on the private Ray head the launcher starts
(scripts/local/ray_head.py), without network isolation: the run is correct, ``flwr-simulation``
joined that head (one Ray, no autoscaler monitor), Ray's processes stayed in
the launcher's process tree, and nothing of the run outlives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

from fedlinear.scripts.local.ray_head import READY_LINE
from tests import bounded
from tests.conftest import REPO, write_federation


def run_processes(flwr_home: str) -> list[psutil.Process]:
    """Live processes whose environment carries this run's private FLWR_HOME."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == flwr_home:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def label(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return ""


def test_simulation_runs_on_the_launchers_ray_head_and_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    write_federation(str(data), clients=3, seed=3)
    out = tmp_path / "run"
    flwr_home = str(out / "logs" / "flwr-home")
    argv = [sys.executable, "-m", "fedlinear.scripts.cli", "run", "--data", str(data), "--rounds", "2", "--out", str(out),
            "--mode", "simulation", "--isolation", "none"]  # fmt: skip
    with open(tmp_path / "cli.out", "w") as stdout:
        cli = subprocess.Popen(argv, cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    gcs, monitors, client_servers, outside = set(), set(), set(), set()
    budget = bounded.Budget(1200)
    try:
        while cli.poll() is None:  # watch the run's processes while it lasts
            assert not budget.spent(), "the run did not finish"
            launcher_tree = {p.pid for p in psutil.Process(cli.pid).children(recursive=True)} if cli.poll() is None else set()
            for proc in run_processes(flwr_home):
                text = label(proc)
                if "gcs_server" in text:
                    gcs.add(proc.pid)
                    if launcher_tree and proc.pid not in launcher_tree and cli.poll() is None:
                        outside.add(proc.pid)
                monitors |= {proc.pid} if "autoscaler/_private/monitor.py" in text else set()
                client_servers |= {proc.pid} if "ray.util.client.server" in text else set()
            time.sleep(0.5)
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait()
    output = (tmp_path / "cli.out").read_text()
    assert cli.returncode == 0, output
    assert READY_LINE in (out / "logs" / "ray-head.log").read_text()
    assert len(gcs) == 1, f"{len(gcs)} Ray instances (flwr-simulation should join the launcher's head)"
    assert not monitors
    assert len(client_servers) <= 1
    assert not outside, "Ray's GCS left the launcher's process tree"
    history = json.loads((out / "history.json").read_text())
    assert [row["clients-ok"] for row in history["rounds"][1:]] == [3, 3]
    assert [label(p) for p in run_processes(flwr_home)] == []
