"""``fedlinear soak``: a short processes-mode run prints the RSS table of the long-lived processes."""

from __future__ import annotations

import re

from fedlinear.scripts.experiments import soak
from tests.conftest import run_cli


def test_summary_compares_first_and_last_rounds():
    samples = [(r, "superlink", 100 * 2**20 if r <= 3 else 150 * 2**20) for r in range(1, 7)]
    samples += [(r, "supernode-0", 80 * 2**20) for r in range(1, 7)]
    rows, grown = soak.summarize(samples, rounds=6, window=50, threshold=1.2)
    assert rows == [("superlink", 100.0, 150.0, 1.5), ("supernode-0", 80.0, 80.0, 1.0)]
    assert grown == ["superlink"]
    assert soak.windows(300, 50) == (range(1, 51), range(251, 301))
    assert soak.label_of(7, "python flower-supernode --node-config partition-id=2 data-uri=\"x\"") == "supernode-2"
    assert soak.label_of(8, "python flower-superexec --parent-pid 7", "python flower-supernode partition-id=2") == (
        "superexec of supernode-2"
    )
    assert soak.label_of(9, "python flwr-clientapp --token x") is None
    executor = "python -m fedlinear.scripts.local.warm_clientapp --socket /tmp/fl-warm-x/s"
    assert soak.label_of(10, executor, "python -m fedlinear.scripts.cli run") == "warm-clientapp executor"
    assert soak.label_of(11, executor, executor) is None  # a forked ClientApp: one per task, not followed


def test_soak_runs_and_prints_the_table(tmp_path):
    done = run_cli("soak", "--nodes", 2, "--rounds", 6, "--out", tmp_path, "--interval", 0.5, "--threshold", 100,
                   timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("process"))
    assert "rounds 1-3 MiB" in lines[header] and "rounds 4-6 MiB" in lines[header]
    labels = {line.split()[0] for line in lines[header + 2 :] if line.strip() and not line.startswith(("soak", " "))}
    assert {"superlink", "serverapp", "supernode-0", "supernode-1"} <= {lab for lab in labels if lab}
    for line in lines[header + 2 :]:
        if line.startswith(("superlink", "serverapp", "supernode-")):
            assert re.search(r"\s\d+\.\d\s+\d+\.\d\s+\d+\.\d{3}$", line), line
    assert "soak: no process grew past the threshold" in done.stdout
