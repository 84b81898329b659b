"""The benchmark's smoke mode runs end to end (simulation only) and writes its table, CSV and JSON.

No timing assertions: only that every expected row is there, with its ratios, and the files exist.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests import bounded
from tests.conftest import REPO  # noqa: E402


def test_quick_bench_simulation(tmp_path):
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "fedlinear.scripts.cli", "bench", "--quick", "--only", "sim", "--engines", "numpy",
            "--skip-quickstart", "--out", str(out), "--timeout", "7200"]  # fmt: skip  (the bound is the wait below)
    # 122 s alone here; a fixed 240 s failed at load ~12, so the bound scales with the load (tests/bounded.py)
    proc = bounded.run(argv, 240, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ("bench.json", "bench.csv", "table.txt"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "bench.json").read_text())
    rows = {(c["mode"], c["system"]): c for c in payload["cases"]}
    assert set(rows) == {("simulation", "fedlinear-numpy"), ("simulation", "floor")}
    fed, floor = rows[("simulation", "fedlinear-numpy")], rows[("simulation", "floor")]
    assert fed["ok"] and floor["ok"]
    assert fed["clients"] == 2 and fed["rounds"] == 2
    assert fed["x-floor"] == pytest.approx(fed["wall-s"] / floor["wall-s"])
    assert fed["peak-rss"] > 0 and floor["peak-rss"] > 0
    assert fed["test-mse"] > 0 and fed["ls-test-mse"] > 0
    assert len(fed["raw"][0]["round-times-s"]) == 2

    with open(out / "bench.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert {r["system"] for r in csv_rows} == {"fedlinear-numpy", "floor"}
    table = (out / "table.txt").read_text()
    assert "fedlinear (numpy)" in table and "floor (no-op app)" in table and "x floor" in table
    targets = {t["target"]: t for t in payload["targets"]}
    assert targets["simulation numpy wall <= 1.25 x floor"]["status"] in ("met", "MISSED")
    assert targets["simulation keras >= 3 x faster than quickstart"]["status"] == "not run"
