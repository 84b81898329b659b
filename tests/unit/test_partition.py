"""Heterogeneous parties (common/synth.py, common/partition.py, `fedlinear data synth|split` options, the manifest summary).

Statistical checks use tolerances derived from the sample sizes: an estimate must be within 5
standard errors of what was asked (a false failure is then a ~1e-6 event per check).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fedlinear.common.csvio import load_csv, to_csv_bytes
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError
from fedlinear.common.partition import dirichlet_sizes, split_by_column, split_iid, split_quantity, stream
from fedlinear.common import shards as layout
from fedlinear.common.runstore import RunStore
from fedlinear.common.synth import Heterogeneity, make_synthetic
from fedlinear.scripts import cli
from fedlinear.scripts.cli import run as run_command

from tests import bounded
from tests.conftest import REPO as ROOT  # noqa: E402


def het(**options) -> Heterogeneity:
    return Heterogeneity.parse(**options)


def digest(directory) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def pooled(shards):
    return np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards])


# --------------------------------------------------------------------------------------------
# IID stays byte-for-byte what it was (hashes taken before common/partition.py existed)
# --------------------------------------------------------------------------------------------

PINNED_SMALL = {  # fedlinear data synth --clients 3 --samples-per-client 50 --features 4 --seed 7 --test-samples 20
    "client-0.csv": "6725c0d5a91353d347235201882ebe4c620a28f86b90b21630fc63e732d0231a",
    "client-1.csv": "dd33e35043d2d20259f5dba49d35ed370dc9b18fae5c478b7d186175a2441772",
    "client-2.csv": "a7dd385c717bc19d80e8dab0ad11f96c1d33f53bf941530d6fa1503bc58520ed",
    "test.csv": "bc545db2bae36be45227eec44b7b6ba5a44a1c3792c60829b9bf6fbdda3449fd",
    "truth.json": "770e809f17ef291c389cc5e823fe33767e9d2d94f7d928465a3d29bbac906920",
}
PINNED_DEFAULT = {  # fedlinear data synth --seed 42 (10 x 1000, d = 10: what `fedlinear run` synthesises)
    "client-0.csv": "b5e8754daa15d72bbc6071dee8411ea6e12b054ec7c8338b9164fbf05f678ed9",
    "client-9.csv": "b55770c4b105148b200d6e48a6cac49f3ca8abbd599338ce2bdefafdea803aa3",
    "test.csv": "50c6f1c6bbc88481d73115c0e3429a14193a4405d6429d04e837fa4ba9bf820b",
    "truth.json": "d5644c3c7025d2fca0382d44b4dc73305764b85559e973c27c1cfffbe32ebf27",
}
PINNED_SPLIT = {  # fedlinear data split TABLE --clients 4 --seed 3 (TABLE: table() below)
    "client-0.csv": "f500f634294da103db4de45d3912d5e91c0b47d25f968a5126b6d95c928a543f",
    "client-1.csv": "dc5da7a6f5b753ee879e24230bb63f49cb91cf443c55ad56df09ddab91f233c2",
    "client-2.csv": "b21ac43265f387a5a3fb4e41da132af3aed582104409dd266dd13b33bef65559",
    "client-3.csv": "cbed94bb257b1c1911e49c4508052dc5434bee2c2e65b94220e24d6aa6e0a628",
    "test.csv": "415cbadc6796d1b4979e9d801658c7ddf7e220126bba27d06a63ac01a3747288",
}
NEUTRAL = ["--concept-spread", "0", "--covariate-shift", "0", "--noise-skew", "0", "--concept-seed", "9"]


def table(path) -> str:
    """103 rows: 3 normal features, an integer column 0..3, a normal target (the pinned split's input)."""
    rng = np.random.default_rng(0)
    m = np.column_stack([rng.normal(size=(103, 3)), rng.integers(0, 4, 103), rng.normal(size=103)])
    np.savetxt(path, m, delimiter=",", fmt="%.17g")
    return str(path)


@pytest.mark.parametrize("extra", [[], NEUTRAL], ids=["no-options", "neutral-values"])
def test_iid_synth_bytes_are_pinned(tmp_path, extra):
    small, default = tmp_path / "small", tmp_path / "default"
    argv = ["data", "synth", "--clients", "3", "--samples-per-client", "50", "--features", "4", "--seed", "7",
            "--test-samples", "20"]  # fmt: skip
    assert cli.main([*argv, "--out", str(small), *extra]) == 0
    assert digest(small) == PINNED_SMALL  # also: no extra file
    assert cli.main(["data", "synth", "--out", str(default), "--seed", "42", *extra]) == 0
    got = digest(default)
    assert {name: got[name] for name in PINNED_DEFAULT} == PINNED_DEFAULT and len(got) == 12


def test_iid_split_bytes_are_pinned(tmp_path):
    out = tmp_path / "split"
    assert cli.main(["data", "split", table(tmp_path / "t.csv"), "--clients", "4", "--out", str(out), "--seed", "3"]) == 0
    assert digest(out) == PINNED_SPLIT  # no split.json for the IID split


# --------------------------------------------------------------------------------------------
# Quantity skew
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "alpha"), [(5, 0.5), (10, 2.0), (3, 0.1)])
def test_dirichlet_sizes_have_dirichlet_mean_and_variance(k, alpha):
    total, minimum, draws = 1_000_000, 10, 4000
    free = total - k * minimum
    p = np.array([(dirichlet_sizes(total, k, alpha, minimum, stream(s, "quantity")) - minimum) / free
                  for s in range(draws)])  # fmt: skip
    # Symmetric Dirichlet: E p_i = 1/K, Var p_i = (K - 1) / (K^2 (K alpha + 1)).
    mean_se = p.std(axis=0, ddof=1) / math.sqrt(draws)
    assert np.all(np.abs(p.mean(axis=0) - 1 / k) < 5 * mean_se)
    want = (k - 1) / (k**2 * (k * alpha + 1))
    sq = (p - 1 / k) ** 2  # mean of these estimates the variance; its SE from their spread
    assert np.all(np.abs(sq.mean(axis=0) - want) < 5 * sq.std(axis=0, ddof=1) / math.sqrt(draws))
    # and the rounding is exact: the share of stream s is the first draw of that stream
    for s in range(20):
        sizes = dirichlet_sizes(total, k, alpha, minimum, stream(s, "quantity"))
        share = stream(s, "quantity").dirichlet(np.full(k, alpha)) * free
        assert sizes.sum() == total and sizes.min() >= minimum
        assert np.all(np.abs(sizes - minimum - share) < 1)


def test_synth_quantity_skew_sizes_summary_and_minimum(tmp_path):
    out = tmp_path / "q"
    assert cli.main(["data", "synth", "--out", str(out), "--clients", "20", "--samples-per-client", "100",
                     "--features", "3", "--quantity-alpha", "0.3", "--min-samples", "25"]) == 0  # fmt: skip
    truth = json.loads((out / "truth.json").read_text())
    h = truth["heterogeneity"]
    sizes = [load_csv(str(out / f"client-{i}.csv")).num_examples for i in range(20)]
    assert sizes == h["sizes"] and sum(sizes) == 2000 and min(sizes) >= 25
    assert h["sizes_cv"] == pytest.approx(np.std(sizes) / np.mean(sizes), rel=1e-12) and h["sizes_cv"] > 0.3
    assert h["quantity"] == {"alpha": 0.3, "min_samples": 25, "seed": 42}
    # the summary's digests are the files' bytes (what the manifest check compares)
    assert [e["sha256"] for e in h["shards"]] == [digest(out)[f"client-{i}.csv"] for i in range(20)]


def test_split_quantity_partitions_the_rows(tmp_path):
    rng = np.random.default_rng(1)
    x = np.column_stack([np.arange(500.0), rng.normal(size=500)])  # column 0: the row id
    data = Dataset(x=x, y=rng.normal(size=500))
    shards, test, summary = split_quantity(data, 6, seed=4, test_fraction=0.2, alpha=0.5, min_samples=12)
    _, iid_test = split_iid(data, 6, 4, 0.2)
    np.testing.assert_array_equal(test.x, iid_test.x)  # the same hold-out as the IID split
    ids = np.concatenate([s.x[:, 0] for s in shards] + [test.x[:, 0]])
    assert sorted(ids) == list(range(500))  # nothing lost, nothing twice
    assert [s.num_examples for s in shards] == summary["sizes"] and min(summary["sizes"]) >= 12
    assert sum(summary["sizes"]) == 400


# --------------------------------------------------------------------------------------------
# Concept shift, covariate shift, label-noise skew
# --------------------------------------------------------------------------------------------


def test_concept_spread_gives_each_party_its_own_true_weights():
    k, d, spread = 400, 10, 0.5  # 5 SE = 5.6 % of the spread: a 10 % error is caught
    shards, test, truth = make_synthetic(k, 30, d, 0.0, 3, 50, heterogeneity=het(concept_spread=spread))
    w, pw, pb = np.array(truth.weights), np.array(truth.party_weights), np.array(truth.party_biases)
    for i, s in enumerate(shards):  # noiseless: least squares on party i's shard is exactly its weights
        theta, *_ = np.linalg.lstsq(np.column_stack([s.x, np.ones(len(s.y))]), s.y, rcond=None)
        np.testing.assert_allclose(theta[:-1], pw[i], atol=1e-9)
        assert theta[-1] == pytest.approx(pb[i], abs=1e-9) and pb[i] == truth.bias  # the bias stays global
    realised = float(np.sqrt(np.mean((pw - w) ** 2)))
    assert truth.heterogeneity["concept"]["realised_spread"] == pytest.approx(realised, rel=1e-12)
    # k*d values of N(0, s^2): sqrt(mean of squares) has SE s / sqrt(2 k d)
    assert abs(realised - spread) < 5 * spread / math.sqrt(2 * k * d)
    # features are exactly the IID data's: only the targets moved
    iid, _, iid_truth = make_synthetic(k, 30, d, 0.0, 3, 50)
    assert all(np.array_equal(a.x, b.x) for a, b in zip(shards, iid, strict=True))
    assert iid_truth.weights == truth.weights and not np.allclose(shards[0].y, iid[0].y)


def test_concept_spread_with_hard_data_is_in_raw_space():
    spread = 0.3
    shards, _, truth = make_synthetic(60, 50, 4, 0.0, 5, 20, feature_scales="0.1:10", feature_offsets="0:50",
                                      heterogeneity=het(concept_spread=spread))  # fmt: skip
    w, pw = np.array(truth.weights), np.array(truth.party_weights)
    for i, s in enumerate(shards):
        np.testing.assert_allclose(s.x @ pw[i] + truth.party_biases[i], s.y, atol=1e-8 * (1 + np.abs(s.y).max()))
    assert abs(np.sqrt(np.mean((pw - w) ** 2)) - spread) < 5 * spread / math.sqrt(2 * 60 * 4)


def test_covariate_shift_moves_each_party_by_about_s():
    k, d, n, s_shift = 150, 3, 400, 2.0
    shards, _, truth = make_synthetic(k, n, d, 0.0, 8, 100, heterogeneity=het(covariate_shift=s_shift))
    c = truth.heterogeneity["covariate"]
    mu, sigma = np.array(c["party_shift"]), np.array(c["party_scale"])
    means = np.array([s.x.mean(axis=0) for s in shards])
    stds = np.array([s.x.std(axis=0) for s in shards])
    np.testing.assert_array_equal(means, c["feature_means"])
    assert np.all(np.abs(means - mu) < 5 * sigma / math.sqrt(n))  # each party is where it was put
    assert np.all(np.abs(stds / sigma - 1) < 5 / math.sqrt(2 * n))
    # the party means are N(0, S^2): sqrt(mean of squares) within 5 SE of S, and log-scales N(0, (S/2)^2)
    assert abs(np.sqrt(np.mean(mu**2)) - s_shift) < 5 * s_shift / math.sqrt(2 * k * d)
    t = s_shift / 2
    assert abs(np.sqrt(np.mean(np.log(sigma) ** 2)) - t) < 5 * t / math.sqrt(2 * k * d)
    # pairwise: two parties' means differ by about S * sqrt(2) per feature
    diffs = (means[:, None, :] - means[None, :, :])[np.triu_indices(k, 1)]
    assert np.sqrt(np.mean(diffs**2)) == pytest.approx(s_shift * math.sqrt(2), rel=0.15)
    # P(y | x) is unchanged: noiseless pooled least squares is the global model
    x, y = pooled(shards)
    theta, *_ = np.linalg.lstsq(np.column_stack([x, np.ones(len(y))]), y, rcond=None)
    np.testing.assert_allclose(theta, [*truth.weights, truth.bias], atol=1e-9)


def test_noise_skew_sets_each_partys_residual_variance():
    k, n, noise, skew = 40, 3000, 1.0, 0.7
    shards, _, truth = make_synthetic(k, n, 3, noise, 6, 10, heterogeneity=het(noise_skew=skew))
    levels = np.array(truth.party_noise)
    for i, s in enumerate(shards):
        residual = s.y - s.x @ np.array(truth.party_weights[i]) - truth.party_biases[i]
        # residual variance of n draws of N(0, noise_k^2): SE noise_k^2 sqrt(2 / n)
        assert abs(np.mean(residual**2) - levels[i] ** 2) < 5 * levels[i] ** 2 * math.sqrt(2 / n)
    assert truth.heterogeneity["noise"]["realised"] == pytest.approx(
        [np.std(s.y - s.x @ np.array(truth.weights) - truth.bias) for s in shards], rel=1e-12
    )
    logs = np.log(levels / noise)
    assert abs(np.sqrt(np.mean(logs**2)) - skew) < 5 * skew / math.sqrt(2 * k)
    assert levels.max() / levels.min() > 2


def test_test_set_is_drawn_from_the_mixture_of_parties():
    shards, test, truth = make_synthetic(4, 3000, 2, 0.0, 2, 4000,
                                         heterogeneity=het(covariate_shift="3:0", quantity_alpha=1))  # fmt: skip
    sizes = np.array(truth.heterogeneity["sizes"])
    mixture_mean = (np.array(truth.heterogeneity["covariate"]["party_shift"]) * sizes[:, None]).sum(0) / sizes.sum()
    np.testing.assert_allclose(test.x.mean(axis=0), mixture_mean, atol=5 * 3 / math.sqrt(4000) + 0.1)
    assert truth.heterogeneity["covariate"]["log_scale"] == 0.0


# --------------------------------------------------------------------------------------------
# Split by a column
# --------------------------------------------------------------------------------------------


def by_column_table(path, n=400):
    """Columns: row id, a value in {-1, 0, 2.5, 7} with unequal frequencies, a feature, the target."""
    rng = np.random.default_rng(11)
    group = rng.choice([-1.0, 0.0, 2.5, 7.0], size=n, p=[0.1, 0.2, 0.3, 0.4])
    m = np.column_stack([np.arange(n, dtype=float), group, rng.normal(size=n), rng.normal(size=n)])
    np.savetxt(path, m, delimiter=",", fmt="%.17g", header="id,group,f,target", comments="")
    return str(path), m


@pytest.mark.parametrize("drop", [False, True])
def test_split_by_column_partitions_the_rows_exactly(tmp_path, drop):
    src, m = by_column_table(tmp_path / "t.csv")
    out = tmp_path / "out"
    assert cli.main(["data", "split", src, "--by-column", "1", "--out", str(out), "--seed", "5",
                     *(["--drop-by-column"] if drop else [])]) == 0  # fmt: skip
    summary = json.loads((out / "split.json").read_text())
    assert summary["values"] == ["-1", "0", "2.5", "7"] and summary["column_name"] == "group"
    rows = []
    for i, value in enumerate([-1.0, 0.0, 2.5, 7.0]):
        shard = load_csv(str(out / f"client-{i}.csv"))
        ids = shard.x[:, 0].astype(int)
        assert list(ids) == sorted(ids)  # file order kept
        np.testing.assert_array_equal(m[ids, 3], shard.y)
        if drop:
            assert shard.num_features == 2
            np.testing.assert_array_equal(m[ids, 2], shard.x[:, 1])
        else:
            assert np.all(shard.x[:, 1] == value)
        assert summary["value_sizes"][summary["values"][i]] == len(ids) == summary["sizes"][i]
        # each value gives the test set round(n_v * 0.2) of its rows
        n_v = int(np.sum(m[:, 1] == value))
        assert len(ids) == n_v - round(n_v * 0.2)
        rows.extend(ids)
    test = load_csv(str(out / "test.csv"))
    test_ids = list(test.x[:, 0].astype(int))
    assert test_ids == sorted(test_ids) and test.num_features == (2 if drop else 3)
    assert sorted(rows + test_ids) == list(range(len(m)))  # nothing lost or duplicated
    # same seed: same bytes; another seed: another hold-out
    again = tmp_path / "again"
    cli.main(["data", "split", src, "--by-column", "1", "--out", str(again), "--seed", "5",
              *(["--drop-by-column"] if drop else [])])  # fmt: skip
    assert digest(again) == digest(out)
    other = tmp_path / "other"
    cli.main(["data", "split", src, "--by-column", "1", "--out", str(other), "--seed", "6"])
    assert digest(other)["test.csv"] != digest(out)["test.csv"]


def test_split_by_column_bins():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.uniform(0, 1, 300), rng.uniform(9, 10, 100)])  # bins 2..8 of 10 stay empty
    data = Dataset(x=np.column_stack([v, np.arange(400.0)]), y=rng.normal(size=400))
    shards, test, summary = split_by_column(data, 0, 3, 2, seed=1, test_fraction=0.25, bins=10)
    assert summary["values"][0].startswith("[0") and summary["values"][-1].endswith("]") and len(shards) == 2
    width = (v.max() - v.min()) / 10
    assert np.all(shards[0].x[:, 0] < v.min() + width) and np.all(shards[1].x[:, 0] >= v.min() + 9 * width)
    ids = np.concatenate([s.x[:, 1] for s in shards] + [test.x[:, 1]])
    assert sorted(ids) == list(range(400))
    assert summary["sizes"] == [225, 75]


def test_split_by_the_target_column_and_its_errors():
    data = Dataset(x=np.arange(12.0).reshape(6, 2), y=np.array([0.0, 1, 0, 1, 0, 1]))
    shards, _, summary = split_by_column(data, -1, 3, 2, seed=1, test_fraction=0.3)
    assert summary["values"] == ["0", "1"] and all(np.unique(s.y).size == 1 for s in shards)
    with pytest.raises(FedLinearError, match="is the target; it cannot be dropped"):
        split_by_column(data, 2, 3, 2, seed=1, test_fraction=0.3, drop=True)
    with pytest.raises(FedLinearError, match="fewer than --min-samples 5"):
        split_by_column(data, 2, 3, 2, seed=1, test_fraction=0.3, min_samples=5)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------

ALL = ["--quantity-alpha", "0.5", "--covariate-shift", "1", "--concept-spread", "0.4", "--noise-skew", "0.5"]


def synth(out, *extra) -> dict[str, str]:
    assert cli.main(["data", "synth", "--out", str(out), "--clients", "6", "--samples-per-client", "80",
                     "--features", "3", "--test-samples", "30", *extra]) == 0  # fmt: skip
    return digest(out)


def test_same_seed_same_bytes_other_seeds_differ(tmp_path):
    a = synth(tmp_path / "a", *ALL, "--seed", "3")
    assert synth(tmp_path / "b", *ALL, "--seed", "3") == a
    b = synth(tmp_path / "c", *ALL, "--seed", "4")
    assert all(a[name] != b[name] for name in a)
    # each option's own seed moves only what it draws: another concept seed keeps every x
    c_dir = tmp_path / "d"
    synth(c_dir, *ALL, "--seed", "3", "--concept-seed", "99")
    for i in range(6):
        x_a = load_csv(str(tmp_path / "a" / f"client-{i}.csv"))
        x_c = load_csv(str(c_dir / f"client-{i}.csv"))
        np.testing.assert_array_equal(x_a.x, x_c.x)
        assert not np.array_equal(x_a.y, x_c.y)
    ta, tc = (json.loads((d / "truth.json").read_text()) for d in (tmp_path / "a", c_dir))
    assert ta["heterogeneity"]["sizes"] == tc["heterogeneity"]["sizes"] and ta["party_noise"] == tc["party_noise"]
    assert tc["heterogeneity"]["concept"]["seed"] == 99 and ta["heterogeneity"]["concept"]["seed"] == 3
    # another quantity seed: other sizes
    q = tmp_path / "e"
    synth(q, *ALL, "--seed", "3", "--quantity-seed", "5")
    assert json.loads((q / "truth.json").read_text())["heterogeneity"]["sizes"] != ta["heterogeneity"]["sizes"]


def test_split_quantity_is_seeded(tmp_path):
    src = table(tmp_path / "t.csv")
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        cli.main(["data", "split", src, "--clients", "3", "--out", str(tmp_path / name), "--quantity-alpha", "0.5",
                  "--min-samples", "5", "--quantity-seed", seed])  # fmt: skip
        runs[name] = digest(tmp_path / name)
    assert runs["a"] == runs["b"] and runs["a"]["client-0.csv"] != runs["c"]["client-0.csv"]
    assert runs["a"]["test.csv"] == runs["c"]["test.csv"]  # the hold-out follows --seed, not --quantity-seed


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1, nothing written (through the real command line)
# --------------------------------------------------------------------------------------------


def fedlinear(*argv: str) -> subprocess.CompletedProcess:
    return bounded.run([sys.executable, "-m", "fedlinear.scripts.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "synth", "--quantity-alpha", "0"], "--quantity-alpha must be a finite number > 0, got 0"),
        (["data", "synth", "--quantity-alpha", "-1"], "--quantity-alpha must be a finite number > 0, got -1"),
        (["data", "synth", "--quantity-alpha", "nan"], "--quantity-alpha must be a finite number > 0, got nan"),
        (["data", "synth", "--concept-spread", "x"], "--concept-spread: 'x' is not a number"),
        (["data", "synth", "--covariate-shift", "1:2:3"], "--covariate-shift: '1:2:3' is not S or S:T"),
        (["data", "synth", "--noise-skew", "1", "--noise", "0"], "--noise-skew scales the label noise: it needs --noise > 0"),
        (["data", "synth", "--clients", "10", "--samples-per-client", "5", "--quantity-alpha", "1"],
         "10 shards x --min-samples 10 = 100 samples, but there are only 50: use fewer clients, a smaller "
         "--min-samples or more data"),
        (["run", "--clients", "20", "--quantity-alpha", "1", "--min-samples", "1001"],
         "20 shards x --min-samples 1001 = 20020 samples, but there are only 20000: use fewer clients, "
         "a smaller --min-samples or more data"),
        (["run", "--concept-spread", "-0.5"], "--concept-spread must be a finite number >= 0, got -0.5"),
        (["data", "synth", "--min-samples", "5"], "--min-samples goes with --quantity-alpha"),
        (["data", "synth", "--quantity-alpha", "1", "--min-samples", "0"], "--min-samples must be >= 1, got 0"),
        (["run", "--data", "/nonexistent", "--concept-spread", "0.5"],
         "--concept-spread shapes the synthesised data: it cannot be used with --data, --shard or data-uri"),
    ],
)
def test_bad_synth_options_are_one_line(tmp_path, argv, message):
    out = tmp_path / "out"
    done = fedlinear(*argv, "--out", str(out))
    assert done.returncode == 1
    assert done.stderr == f"fedlinear: error: {message}\n"
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--clients", "3", "--quantity-alpha", "0"], "--quantity-alpha must be a finite number > 0, got 0"),
        (["--by-column", "5"], "--by-column 5 is out of range: the table has 5 columns (0..4)"),
        (["--by-column", "-6"], "--by-column -6 is out of range: the table has 5 columns (0..4)"),
        (["--clients", "9", "--quantity-alpha", "1"],
         "9 shards x --min-samples 10 = 90 training rows, but there are only 82: use fewer clients, a smaller "
         "--min-samples or more data"),
        (["--by-column", "0"], "--by-column 0: every value has a single row, so no row is left for the test set: "
                               "group values with --bins B"),
        (["--by-column", "3", "--clients", "5"], "--by-column 3 gives 4 shards (one per value), but --clients is 5"),
        (["--by-column", "3", "--quantity-alpha", "1"], "--quantity-alpha and --by-column are two different splits: give one"),
        (["--bins", "3", "--clients", "2"], "--bins and --drop-by-column go with --by-column K"),
        (["--by-column", "3", "--bins", "0"], "--bins must be >= 1, got 0"),
        ([], "data split needs --clients N (or --by-column K: one shard per value)"),
        (["--clients", "2", "--min-samples", "3"], "--min-samples goes with --quantity-alpha or --by-column"),
    ],
)
def test_bad_split_options_are_one_line(tmp_path, extra, message):
    out = tmp_path / "out"
    done = fedlinear("data", "split", table(tmp_path / "t.csv"), "--out", str(out), *extra)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("fedlinear: error: ")
    assert message in done.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The run's manifest carries the summary
# --------------------------------------------------------------------------------------------


def test_a_run_on_heterogeneous_data_records_the_summary_in_its_manifest(tmp_path):
    from tests.inprocess import run_in_process

    data = tmp_path / "data"
    assert cli.main(["data", "synth", "--out", str(data), "--clients", "4", "--samples-per-client", "200",
                     "--features", "3", "--test-samples", "100", "--concept-spread", "0.5",
                     "--quantity-alpha", "1"]) == 0  # fmt: skip
    shards = [str(data / f"client-{i}.csv") for i in range(4)]
    status, manifest = run_in_process(shards, str(tmp_path / "run"), **{"num-server-rounds": 2, "test-uri": str(data / "test.csv")})
    assert status["status"] == "completed" and "data-heterogeneity" not in manifest
    store = RunStore(str(tmp_path / "run"))
    layout.attach_heterogeneity(store, str(data))
    recorded = store.read_manifest()["data-heterogeneity"]
    truth = json.loads((data / "truth.json").read_text())
    assert recorded == {"source": str(data / "truth.json"), **truth["heterogeneity"], "shards_match": True}
    assert recorded["concept"]["spread"] == 0.5 and sum(recorded["sizes"]) == 800
    # a summary that does not describe the shards trained on is flagged, not trusted
    (data / "client-0.csv").write_bytes(to_csv_bytes(np.zeros((3, 3)), np.zeros(3)))
    status2, _ = run_in_process(shards, str(tmp_path / "run2"), **{"num-server-rounds": 1})
    layout.attach_heterogeneity(RunStore(str(tmp_path / "run2")), str(data))
    assert RunStore(str(tmp_path / "run2")).read_manifest()["data-heterogeneity"]["shards_match"] is False
    # IID data: nothing added
    iid = tmp_path / "iid"
    cli.main(["data", "synth", "--out", str(iid), "--clients", "2", "--samples-per-client", "50", "--features", "3"])
    assert layout.data_heterogeneity(str(iid)) is None


def test_fedlinear_run_synthesises_heterogeneous_default_data(tmp_path):
    """`fedlinear run --concept-spread ...` passes the options (and the run's seed) to the synthesiser."""
    args = cli.build_parser().parse_args(["run", "--out", str(tmp_path / "run"), "--clients", "3",
                                          "--concept-spread", "0.5", "--noise-skew", "0.3", "--noise-skew-seed", "8"])  # fmt: skip
    shards, template, test_uri, synth = run_command.resolve_data(args, str(tmp_path / "run"), {"seed": "5"})
    data = tmp_path / "run" / "data"
    synth.stage()
    assert not (tmp_path / "run").exists()  # nothing is written before every check has passed
    synth.publish()
    assert template == str(data / "client-{partition-id}.csv") and test_uri == str(data / "test.csv")
    assert len(shards) == 3
    truth = json.loads((data / "truth.json").read_text())
    assert truth["seed"] == 5 and truth["heterogeneity"]["concept"] == {
        "spread": 0.5, "seed": 5, "realised_spread": truth["heterogeneity"]["concept"]["realised_spread"]}
    assert truth["heterogeneity"]["noise"]["seed"] == 8
    _, _, same = make_synthetic(3, 1000, 10, 0.1, 5, 2000, heterogeneity=het(concept_spread=0.5, noise_skew=0.3,
                                                                              noise_seed=8))  # fmt: skip
    assert truth["party_weights"] == same.party_weights
