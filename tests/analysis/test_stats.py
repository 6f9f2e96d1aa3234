"""t quantiles, t intervals from the actual n (ddof=1), paired bootstrap of a ratio of means."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saecircuits.analysis.statistics import bootstrap_ratio_ci, mean_ci95, paired_bootstrap_means, t_quantile


@pytest.mark.parametrize(
    "df,expected",
    [(1, 12.706204736), (2, 4.302652730), (5, 2.570581836), (10, 2.228138852), (30, 2.042272456)],
)
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_mean_ci95_hand_worked():
    ci = mean_ci95([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sd(ddof=1) = sqrt(5/3), n = 4, t(0.975, 3) = 3.182446305
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert ci.n == 4 and ci.mean == pytest.approx(2.5)
    assert ci.low == pytest.approx(2.5 - half, abs=1e-6) and ci.high == pytest.approx(2.5 + half, abs=1e-6)
    assert ci.half_width == pytest.approx(half, abs=1e-6)


def test_mean_ci95_small_and_nan():
    assert math.isnan(mean_ci95([]).mean) and mean_ci95([]).n == 0
    one = mean_ci95([3.0])
    assert one.mean == 3.0 and math.isnan(one.low) and one.n == 1
    assert mean_ci95([1.0, float("nan"), 3.0]).n == 2


def test_bootstrap_ratio_is_seeded_paired_and_brackets_value():
    rng = np.random.default_rng(1)
    den = rng.uniform(1, 2, size=50)
    num = 0.8 * den + rng.normal(0, 0.05, size=50)
    a = bootstrap_ratio_ci(num, den, seed=3)
    assert a == bootstrap_ratio_ci(num, den, seed=3)
    assert a.value == pytest.approx(num.mean() / den.mean())
    assert a.low < a.value < a.high and a.high - a.low < 0.1 and a.n == 50
    exact = bootstrap_ratio_ci(den, den)  # paired: every resample gives exactly 1
    assert exact.low == exact.high == 1.0
    with pytest.raises(ValueError):
        bootstrap_ratio_ci(num, den[:3])


def test_paired_bootstrap_means_share_resamples():
    a = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    m = paired_bootstrap_means(a, 2 * a + 1, n_bootstrap=50, seed=7)
    assert m.shape == (2, 50)
    np.testing.assert_allclose(m[1], 2 * m[0] + 1)  # same indices for both arrays
    idx = np.random.default_rng(7).integers(0, 5, size=(50, 5))  # independent: the documented resampling
    np.testing.assert_allclose(m[0], a[idx].mean(1))
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap_means(a, a[:2])


def test_bootstrap_ratio_has_no_interval_when_the_denominator_may_be_zero():
    """Fieller: a ratio's interval is bounded only if the denominator is clearly non-zero."""
    den = np.array([1.1, -0.9, 1.1, -0.9, 0.6, -0.4])  # mean 0.1; resampled means straddle 0
    r = bootstrap_ratio_ci(np.ones(6), den)
    assert r.value == pytest.approx(10.0)
    assert math.isnan(r.low) and math.isnan(r.high)
