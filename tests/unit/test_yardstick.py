"""common/yardstick.py: the stable optimum, its residual sum of squares and the train SSE of any weights."""

from __future__ import annotations

import numpy as np
import pytest

from fedlinear.common import fedols, scaling, yardstick
from tests import strd


def factors(x, y, parts, fit_intercept=True):
    stats = scaling.PooledStats.of(x, y)
    centre = stats.mean if fit_intercept else np.zeros(x.shape[1] + 1)
    rs = [fedols.local_r(x[i], y[i], centre) for i in parts]
    return yardstick.from_factors(rs, centre, yardstick.unused_features(stats, fit_intercept), fit_intercept, len(y)), stats


def sse(x, y, kernel, bias):
    residual = y - x @ kernel - bias
    return float(residual @ residual)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_rss_and_excess_are_the_direct_sums(fit_intercept):
    rng = np.random.default_rng(3)
    x = 1e3 + rng.normal(size=(90, 4)) * [1.0, 1e-2, 30.0, 4.0]
    y = x @ [1.0, -20.0, 0.3, 2.0] + (5e3 if fit_intercept else 0.0) + rng.normal(size=90)
    parts = np.split(np.arange(90), [30, 33, 70])
    tsqr, stats = factors(x, y, parts, fit_intercept)
    scatter = yardstick.from_scatter(stats, fit_intercept)
    design = np.column_stack([x, np.ones(90)]) if fit_intercept else x
    theta = np.linalg.lstsq(design, y, rcond=None)[0]
    best = (theta[:-1], theta[-1]) if fit_intercept else (theta, 0.0)
    for optimum, rss_tolerance in ((tsqr, 1e-11), (scatter, 1e-6)):  # the scatter's RSS is Syy − kᵀSxy: it cancels
        np.testing.assert_allclose(optimum.kernel, best[0], rtol=1e-8)
        assert optimum.bias == pytest.approx(best[1], rel=1e-8, abs=1e-12)
        assert optimum.rss == pytest.approx(sse(x, y, *best), rel=rss_tolerance), optimum.method
        for k in range(3):  # weights near and far from the optimum, with a bias even when the optimum has none
            kernel = best[0] * (1 + 0.01 * rng.normal(size=4)) + 0.001 * k
            bias = best[1] + 3.0 * k
            expected = sse(x, y, kernel, bias) - sse(x, y, *best)
            assert optimum.excess_sse(kernel, bias) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_a_party_dropping_out_after_the_mean_keeps_the_solve_exact():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 3)) + 50.0
    y = x @ [1.0, 2.0, 3.0] + rng.normal(size=60)
    stats = scaling.PooledStats.of(x, y)
    parts = np.array_split(np.arange(60), 3)
    rs = [fedols.local_r(x[i], y[i], stats.mean) for i in parts]
    kept = np.concatenate([parts[0], parts[2]])
    optimum = yardstick.from_factors([rs[0], rs[2]], stats.mean, stats.constant_features(), True, kept.size)
    theta = np.linalg.lstsq(np.column_stack([x[kept], np.ones(kept.size)]), y[kept], rcond=None)[0]
    np.testing.assert_allclose(np.r_[optimum.kernel, optimum.bias], theta, rtol=1e-10)
    assert optimum.rss == pytest.approx(sse(x[kept], y[kept], theta[:-1], theta[-1]), rel=1e-10)


def test_collinear_is_said_only_of_collinear_columns_with_the_tolerance():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 2))
    x = np.column_stack([x, 3.0 * x[:, 0] - x[:, 1], rng.normal(size=50)])  # column 3 = 3 c1 - c2
    y = x[:, [0, 1, 3]] @ [1.0, 2.0, -1.0] + 0.1 * rng.normal(size=50)
    optimum, _ = factors(x, y, np.array_split(np.arange(50), 2))
    [note] = [n for n in optimum.notes if "collinear" in n]
    assert "feature column 1, feature column 2, feature column 3" in note and "feature column 4" not in note
    assert "1e-13" in note and optimum.rank == optimum.columns - 1 == 4
    fitted = x @ optimum.kernel + optimum.bias
    best = np.linalg.lstsq(np.column_stack([x, np.ones(50)]), y, rcond=None)[0]
    np.testing.assert_allclose(fitted, np.column_stack([x, np.ones(50)]) @ best, atol=1e-9)
    assert optimum.rss == pytest.approx(sse(x, y, best[:-1], best[-1]), rel=1e-9)


def test_filip_is_ill_conditioned_not_collinear_and_the_scatter_says_its_limits():
    data = strd.load("Filip")
    x, y = data.x, data.y
    optimum, stats = factors(x, y, np.array_split(np.arange(data.n), 3))
    assert optimum.rank == optimum.columns == 11 and not optimum.notes
    assert 1e9 < optimum.condition_number < 1e10
    assert optimum.rss == pytest.approx(data.certified_rss, rel=1e-7)
    scatter = yardstick.from_scatter(stats)  # the privacy route: the scatter has squared the condition number
    assert any("significant digits of the optimum remain" in note for note in scatter.notes)
    assert any("may be collinear or only ill-conditioned" in note for note in scatter.notes)


def test_the_scatter_route_is_exact_where_it_can_be():
    data = strd.load("Longley")
    scatter = yardstick.from_scatter(scaling.PooledStats.of(data.x, data.y))
    np.testing.assert_allclose(np.r_[scatter.bias, scatter.kernel], data.certified, rtol=1e-10)
    assert scatter.rss == pytest.approx(data.certified_rss, rel=1e-10) and not scatter.notes
