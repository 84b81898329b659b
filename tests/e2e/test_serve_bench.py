"""`python -m benchmarks.serving` end to end, briefly: both servers agree with the SavedModel (it checks
before any load), locust drives both, no request fails, the table and the JSON are written.

The smoke run is bounded by work (``--requests``: exactly so many requests per case and server), not by
the clock: a time-bounded slice on a loaded machine could end before one request was answered."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import bounded
from tests.conftest import REPO

REQUESTS = 40


def test_the_serving_benchmark_runs_and_no_request_fails(tmp_path):
    done = bounded.run(
        [sys.executable, "-m", "benchmarks.serving", "--requests", str(REQUESTS), "--seconds", "600", "--slices", "1",
         "--warmup", "0", "--users", "2", "--features", "3", "--out", str(tmp_path)],
        60, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip  # quiet: ~25 s (two TF servers up, four locust runs of 40 requests)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ratio (fedlinear/naive)" in done.stdout
    assert f"{REQUESTS} requests per slice" in done.stdout
    results = json.load(open(tmp_path / "serving.json"))["results"]
    assert set(results) == {"fedlinear serve", "naive TF per request"}
    for by_rows in results.values():
        assert set(by_rows) == {"1", "100"}
        for case in by_rows.values():
            assert case["failures"] == 0 and case["requests"] == REQUESTS
