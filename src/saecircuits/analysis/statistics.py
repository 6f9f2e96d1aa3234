"""Small statistics helpers: t-based confidence intervals and a paired bootstrap for ratios of means.

The reference notebook reports means with ``1.96 * std / sqrt(n)`` error bars, sometimes with the wrong ``n`` and a
mix of ``ddof=0``/``ddof=1``, and loss recovered without any interval. Here every interval is computed from the actual
sample size: a Student-t interval with ``ddof=1`` for means, a seeded paired bootstrap (percentile interval) for ratios
of means such as loss recovered. No scipy dependency: the t quantile is computed by bisection on a numerically
integrated t CDF (accurate to about 1e-9).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["MeanCI", "mean_ci95", "t_quantile", "bootstrap_ratio_ci", "paired_bootstrap_means", "RatioCI"]


class MeanCI(NamedTuple):
    """A mean with its 95% confidence interval.

    Attributes:
        mean: sample mean (NaN for an empty sample).
        low, high: interval bounds (NaN when ``n < 2``).
        n: number of finite observations used.
    """

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """``(high - low) / 2`` (NaN when undefined)."""
        return (self.high - self.low) / 2


class RatioCI(NamedTuple):
    """A ratio of means with a bootstrap 95% interval (``low``/``high`` NaN when undefined)."""

    value: float
    low: float
    high: float
    n: int


def _t_cdf(x: float, df: float, n_steps: int = 4000) -> float:
    """Student-t CDF for ``x >= 0`` by composite Simpson integration of the density on ``[0, x]``."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    grid = np.linspace(0.0, x, n_steps + 1)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(grid**2 / df))
    h = x / n_steps
    integral = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return 0.5 + float(integral)


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution for ``0.5 <= p < 1`` (e.g. 0.975 for a two-sided 95% interval).

    Raises:
        ValueError: if ``p`` is outside ``[0.5, 1)`` or ``df <= 0``.
    """
    if not 0.5 <= p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _as_numpy(x: torch.Tensor | np.ndarray | list[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def mean_ci95(x: torch.Tensor | np.ndarray | list[float]) -> MeanCI:
    """Mean and two-sided 95% Student-t interval ``mean +- t_{0.975, n-1} * std(ddof=1) / sqrt(n)``.

    NaNs are dropped first; ``n`` is the number of remaining values. With ``n == 0`` everything is NaN, with
    ``n == 1`` the bounds are NaN. Departs on purpose from the notebook's ``1.96 * std / sqrt(200)`` (200 even for 100 prompts).
    """
    v = _as_numpy(x)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return MeanCI(float("nan"), float("nan"), float("nan"), 0)
    m = float(v.mean())
    if n == 1:
        return MeanCI(m, float("nan"), float("nan"), 1)
    half = t_quantile(0.975, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return MeanCI(m, m - half, m + half, n)


def paired_bootstrap_means(
    *arrays: torch.Tensor | np.ndarray, n_bootstrap: int = 2000, seed: int = 0
) -> np.ndarray:
    """Means of several per-prompt arrays over the SAME bootstrap resamples of prompt indices.

    Args:
        arrays: ``k`` arrays of one value per unit (``[n]`` each, e.g. per-prompt losses).
        n_bootstrap: resamples drawn (each draws ``n`` indices with replacement, shared by all arrays).
        seed: seed of a private generator; the global RNG is untouched.

    Returns:
        float64 ``[k, n_bootstrap]``: row ``j`` holds the resampled means of ``arrays[j]``.

    Raises:
        ValueError: no arrays, arrays of different lengths, or empty arrays.
    """
    vs = [_as_numpy(a) for a in arrays]
    if not vs or vs[0].size == 0 or any(v.shape != vs[0].shape for v in vs):
        raise ValueError(
            f"paired_bootstrap_means needs non-empty arrays of equal length, got lengths {[v.size for v in vs]}"
        )
    n = int(vs[0].size)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    return np.stack([v[idx].mean(1) for v in vs])


def bootstrap_ratio_ci(
    numerator: torch.Tensor | np.ndarray,
    denominator: torch.Tensor | np.ndarray,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> RatioCI:
    """Ratio of means ``mean(numerator) / mean(denominator)`` with a paired percentile-bootstrap 95% interval.

    Both arrays hold one value per prompt (``[n]``); each bootstrap sample resamples prompt indices once and uses them
    for both, so the pairing is kept (:func:`paired_bootstrap_means`). The reference notebook reports its ratios
    without an interval. This is the bare ratio: loss recovered goes through
    :func:`saecircuits.analysis.quality.reconstruction.loss_recovered`, which first decides whether the ratio means anything.

    A ratio's confidence set is a bounded interval only when the denominator is clearly non-zero (Fieller 1954,
    "Some problems in interval estimation", JRSS B 16:175-185); so ``low``/``high`` are NaN when the 2.5-97.5%
    percentile range of the resampled denominators includes 0, and ``value`` is NaN when ``mean(denominator)`` is 0.

    Raises:
        ValueError: if the arrays differ in length or are empty.
    """
    a, b = _as_numpy(numerator), _as_numpy(denominator)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"bootstrap_ratio_ci needs two non-empty arrays of equal length, got {a.size} and {b.size}"
        )
    n = int(a.size)
    value = float(a.mean() / b.mean()) if b.mean() != 0 else float("nan")
    if n < 2:
        return RatioCI(value, float("nan"), float("nan"), n)
    num_b, den_b = paired_bootstrap_means(a, b, n_bootstrap=n_bootstrap, seed=seed)
    den_low, den_high = np.quantile(den_b, [0.025, 0.975])
    if den_low <= 0 <= den_high:
        return RatioCI(value, float("nan"), float("nan"), n)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num_b / den_b
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return RatioCI(value, float("nan"), float("nan"), n)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return RatioCI(value, float(low), float(high), n)
