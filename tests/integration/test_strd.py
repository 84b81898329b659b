"""Acceptance on NIST's StRD linear least-squares suite (tests/data/strd/, certified values from NIST).

Every set split over 2-4 parties, run in process (tests/inprocess.py) by the real ServerApp and
ClientApp: ``strategy = fedols`` (qr) must give the certified coefficients to at least 6 significant
digits (log relative error, the StRD measure), and the run's reported optimum (the yardstick,
``reference.train-mse``) and its own train MSE must be within 1e-6 relative of the certified residual
sum of squares / n. Where NIST certifies an exact fit (Wampler1, Wampler2: RSS = 0) the bound is
absolute: at most 1e-24 of the total sum of squares (R² = 1 to 24 digits). Default FedAvg must come
within 1.01 x the certified fit's train MSE on Longley, Norris and NoInt1.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests import strd
from tests.inprocess import run_in_process

RELATIVE = 1e-6  # the run's optimum and train MSE vs certified RSS / n
EXACT_FIT = 1e-24  # certified RSS = 0: RSS at most this fraction of the total sum of squares
DIGITS = 6.0


def parties_for(name: str) -> int:
    return 2 + strd.NAMES.index(name) % 3  # 2, 3 or 4 parties


def write_shards(data: strd.StrdSet, root, parties: int) -> list[str]:
    """Contiguous row blocks as CSV shards (float64 round-trips through repr)."""
    os.makedirs(str(root), exist_ok=True)
    x, y = data.x, data.y
    uris = []
    for i, rows in enumerate(np.array_split(np.arange(data.n), parties)):
        uri = os.path.join(str(root), f"client-{i}.csv")
        with open(uri, "w") as handle:
            handle.write(",".join([*(f"x{j + 1}" for j in range(x.shape[1])), "y"]) + "\n")
            for r in rows:
                handle.write(",".join(repr(float(v)) for v in [*x[r], y[r]]) + "\n")
        uris.append(uri)
    return uris


def lre(estimate: np.ndarray, certified: np.ndarray) -> float:
    """StRD's log relative error: significant digits of the worst coefficient."""
    rel = np.abs(np.asarray(estimate) - certified) / np.abs(certified)
    return float(-np.log10(max(rel.max(), 1e-17)))


def close_to_certified(value: float, data: strd.StrdSet) -> bool:
    target = data.certified_rss / data.n
    if data.certified_rss > 0:
        return abs(value - target) <= RELATIVE * target
    total = float(np.sum((data.y - data.y.mean()) ** 2))
    return 0.0 <= value <= EXACT_FIT * total / data.n


def history_of(run_dir) -> dict:
    with open(os.path.join(str(run_dir), "history.json")) as handle:
        return json.load(handle)


def intercept_settings(data: strd.StrdSet) -> dict:
    return {} if data.intercept else {"fit-intercept": False}


@pytest.mark.parametrize("name", strd.NAMES)
def test_transcribed_data_reproduce_every_certified_value(name):
    """The data files are checked in exact rational arithmetic: no floating point between the text and NIST."""
    data = strd.load(name)
    theta, rss = strd.exact_fit(data)
    np.testing.assert_allclose([float(t) for t in theta], data.certified, rtol=5e-15, atol=0)
    assert float(rss) == pytest.approx(data.certified_rss, rel=5e-15, abs=0)


@pytest.mark.parametrize("name", strd.NAMES)
def test_fedols_qr_and_the_yardstick_match_nist(name, tmp_path):
    data = strd.load(name)
    uris = write_shards(data, tmp_path / "data", parties_for(name))
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), **{"strategy": "fedols", "fedols-method": "qr"}, **intercept_settings(data)
    )
    assert status["status"] == "completed", status
    weights = manifest["weights"]
    estimate = np.array(([weights["bias"]] if data.intercept else []) + weights["kernel"])
    digits = lre(estimate, data.certified)
    history = history_of(tmp_path / "run")
    reference, [row] = history["reference"], history["rounds"]
    print(f"{name}: {digits:.1f} digits, condition {reference['condition-number']:.3g}, optimum RSS "
          f"{reference['train-mse'] * data.n:.12g} (certified {data.certified_rss:.12g})")  # fmt: skip
    assert digits >= DIGITS
    assert close_to_certified(reference["train-mse"], data), (reference["train-mse"], data.certified_rss / data.n)
    assert close_to_certified(row["train-mse"], data), (row["train-mse"], data.certified_rss / data.n)
    assert reference["method"] == "tsqr" and reference["rank"] == reference["columns"]
    assert not any("collinear" in note for note in reference["notes"])  # ill-conditioned is not collinear


@pytest.mark.parametrize("name", ["Longley", "Norris", "NoInt1"])
def test_default_fedavg_comes_within_one_percent_of_the_certified_fit(name, tmp_path):
    data = strd.load(name)
    uris = write_shards(data, tmp_path / "data", parties_for(name))
    status, _ = run_in_process(uris, str(tmp_path / "run"), **intercept_settings(data))
    assert status["status"] == "completed", status
    final = history_of(tmp_path / "run")["rounds"][-1]
    ratio = final["train-mse"] / (data.certified_rss / data.n)
    print(f"{name}: default FedAvg train MSE {ratio:.5f} x the certified fit's after round {final['round']}")
    assert ratio <= 1.01


@pytest.mark.parametrize("name", ["NoInt1", "NoInt2", "Norris", "Longley"])
def test_fedols_normal_matches_nist_on_the_well_conditioned_sets(name, tmp_path):
    """The additive normal equations (centred, or about the origin without an intercept) on the sets
    whose condition number they can afford; the yardstick of the run is still the R factors'."""
    data = strd.load(name)
    uris = write_shards(data, tmp_path / "data", parties_for(name))
    status, manifest = run_in_process(
        uris, str(tmp_path / "run"), **{"strategy": "fedols", "fedols-method": "normal"}, **intercept_settings(data)
    )
    assert status["status"] == "completed", status
    weights = manifest["weights"]
    estimate = np.array(([weights["bias"]] if data.intercept else []) + weights["kernel"])
    assert lre(estimate, data.certified) >= 9
    history = history_of(tmp_path / "run")
    assert history["reference"]["method"] == "tsqr"
    assert close_to_certified(history["rounds"][0]["train-mse"], data)


def test_under_privacy_the_statistics_file_gives_the_stable_yardstick_and_the_scatter_says_its_limits(tmp_path):
    """``fedlinear run`` under privacy writes the statistics file from the shards on its machine, with the R
    factors: the yardstick is as exact as without privacy. A file of sums alone gives the scatter route,
    which on Filip cannot be right and says so."""
    from fedlinear.common.config import RunConfig
    from fedlinear.common.scaling import PooledStats
    from fedlinear.scripts.cli.run import write_local_statistics

    data = strd.load("Filip")
    uris = write_shards(data, tmp_path / "data", 3)
    settings = {"dp": "central-server-clip", "dp-public-statistics": True, "num-server-rounds": 1}
    with_r = write_local_statistics(uris, str(tmp_path / "statistics.npz"), RunConfig())
    status, _ = run_in_process(uris, str(tmp_path / "run"), **settings, **{"statistics-uri": with_r})
    assert status["status"] == "completed", status
    reference = history_of(tmp_path / "run")["reference"]
    assert reference["method"] == "tsqr" and close_to_certified(reference["train-mse"], data)
    assert "no node sent statistics" in reference["source"]

    sums_only = str(tmp_path / "sums.npz")
    PooledStats.of(data.x, data.y).save(sums_only)
    status, _ = run_in_process(uris, str(tmp_path / "scatter"), **settings, **{"statistics-uri": sums_only})
    assert status["status"] == "completed", status
    reference = history_of(tmp_path / "scatter")["reference"]
    assert reference["method"] == "scatter"
    assert any("significant digits of the optimum remain" in note for note in reference["notes"])
