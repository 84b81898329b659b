"""``fedlinear bench --quick``: one shared invocation (simulation, inline and the inline sweep, 2 clients x 2
rounds), then correctness assertions on its outputs: every table and file is there, each ratio is computed
against the floor of the same invocation, inline's weights are simulation's bit for bit and reach least
squares, the sweep made its table. No timing assertions; the sizes that judge issue 21's targets run only
via the benchmark itself (docs/benchmarks.md gives the commands).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from tests import bounded
from tests.conftest import REPO  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    argv = [sys.executable, "-m", "fedlinear.scripts.cli", "bench", "--quick", "--only", "sim,inline,sweep",
            "--engines", "numpy", "--skip-quickstart", "--inline-scaling-clients", "", "--out", str(out),
            "--timeout", "7200"]  # fmt: skip  (the bound is the wait below)
    # ~85 s here with another core busy (two Ray runs, an inline run, a 2-run inline sweep)
    proc = bounded.run(argv, 240, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "bench.json").read_text())
    rows = {(c["mode"], c["system"]): c for c in payload["cases"]}
    return out, payload, rows, proc.stdout


def test_every_output_and_row_is_there(bench):
    out, payload, rows, stdout = bench
    for name in ("bench.json", "bench.csv", "table.txt"):
        assert (out / name).is_file(), name
    assert (out / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(rows) == {("simulation", "fedlinear-numpy"), ("simulation", "floor"), ("inline", "fedlinear-numpy"),
                         ("inline", "sweep")}  # fmt: skip
    assert all(r["ok"] for r in rows.values()), [r["errors"] for r in rows.values()]
    with open(out / "bench.csv", newline="") as handle:
        assert {r["system"] for r in csv.DictReader(handle)} == {"fedlinear-numpy", "floor", "sweep"}
    table = (out / "table.txt").read_text()
    for needle in ("fedlinear (numpy)", "floor (no-op app)", "fedlinear (inline)", "privacy/utility sweep", "x floor",
                   "targets (issue 21", "inline 10x20 wall <= 0.3 x the floor"):  # fmt: skip
        assert needle in table, needle
    assert table.strip() in stdout


def test_ratios_are_to_the_floor_of_the_same_invocation(bench):
    _, _, rows, _ = bench
    floor = rows[("simulation", "floor")]
    for key in (("simulation", "fedlinear-numpy"), ("inline", "fedlinear-numpy")):
        r = rows[key]
        assert (r["clients"], r["rounds"]) == (2, 2)
        assert r["x-floor"] == pytest.approx(r["wall-s"] / floor["wall-s"]), key  # inline: the simulation floor
        assert r["peak-rss"] > 0 and len(r["raw"][0]["round-times-s"]) == 2


def test_inline_weights_are_simulations_and_reach_least_squares(bench):
    _, payload, rows, _ = bench
    sim, inline = rows[("simulation", "fedlinear-numpy")], rows[("inline", "fedlinear-numpy")]
    manifests = [json.loads(open(f"{r['raw'][0]['run-dir']}/manifest.json").read())["weights"] for r in (sim, inline)]
    assert manifests[0] == manifests[1]  # bit-identical (floats round-trip through JSON exactly)
    assert inline["weights-digest"] == sim["weights-digest"] and inline["same-weights-as-sim"] is True
    weights = {t["target"]: t for t in payload["targets"]}
    assert weights["inline weights bit-identical to simulation (same seed, same data)"]["status"] == "met"
    # the federated model against the closed-form pooled least squares on the same shards
    assert inline["test-mse"] == pytest.approx(inline["ls-test-mse"], rel=0.01)
    kernel = np.asarray(manifests[1]["kernel"], dtype=float).ravel()
    assert kernel.shape == (10,) and np.all(np.isfinite(kernel))


def test_the_sweep_made_its_table_and_targets_at_other_sizes_are_not_judged(bench):
    _, payload, rows, _ = bench
    sweep = rows[("inline", "sweep")]
    assert sweep["sweep-runs"] == 2  # --quick: noise 0,1 x 1 seed, every run completed
    run_dir = sweep["raw"][0]["run-dir"]
    assert "noise" in open(f"{run_dir}/sweep.md").read()
    targets = {t["target"]: t for t in payload["targets"]}
    # --quick runs 2 x 2, not the sizes: nothing is passed or missed on the wrong run
    assert targets["inline 10x20 wall <= 0.3 x the floor"]["status"] == "not run"
    assert targets["sweep 5 points x 3 seeds wall <= 0.1 x 336 s"]["status"] == "not run"
