"""Metrics against hand-computed fixtures."""

import math

import pytest
import torch

from saecircuits.saes.base import SAEError
from saecircuits.saes.metrics import (
    FiringCounter,
    dead_fraction,
    dead_mask,
    dense_fraction,
    explained_variance,
    feature_density_histogram,
    firing_counts,
    l0,
    log10_feature_density,
    mse,
    shrinkage,
)

X = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])


def test_explained_variance_fixture():
    assert explained_variance(X, X) == pytest.approx(1.0)
    assert explained_variance(X, X.mean(0, keepdim=True).expand_as(X)) == pytest.approx(0.0, abs=1e-12)
    # column means (3, 3); total sum of squares = (4+0+4) + (1+9+4) = 22; one error of 1 -> 1 - 1/22
    x_hat = X.clone()
    x_hat[0, 0] += 1.0
    assert explained_variance(X, x_hat) == pytest.approx(1 - 1 / 22)
    # a mask drops the last token: means (2, 4); SST = 2 + 8 = 10; same error -> 1 - 1/10
    mask = torch.tensor([True, True, False])
    assert explained_variance(X, x_hat, mask) == pytest.approx(0.9)
    with pytest.raises(SAEError, match="zero variance"):
        explained_variance(X[:1], X[:1])


def test_l0_mse_with_mask_and_leading_dims():
    f = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]], [[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    assert l0(f) == pytest.approx((2 + 0 + 1 + 3) / 4)
    assert l0(f, torch.tensor([[True, False], [True, False]])) == pytest.approx(1.5)
    assert mse(X, X + torch.tensor([1.0, 2.0])) == pytest.approx(5.0)  # 1 + 4 per token
    with pytest.raises(SAEError, match="no tokens"):
        l0(f, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(SAEError, match="mask shape"):
        l0(f, torch.ones(4, dtype=torch.bool))


def test_shrinkage_modes():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert shrinkage(x, 0.5 * x) == pytest.approx(0.5)
    assert shrinkage(x, 0.5 * x, mode="projection") == pytest.approx(0.5)
    x_hat = torch.tensor([[0.0, 5.0], [1.0, 1.0]])
    assert shrinkage(x, x_hat) == pytest.approx((5 + 2**0.5) / 5)  # (|(0,5)| + |(1,1)|) / (|(3,4)| + 0)
    assert shrinkage(x, x_hat, mode="projection") == pytest.approx(20 / 25)
    with pytest.raises(SAEError, match="no token with a non-zero input norm"):
        shrinkage(torch.zeros(2, 2), x_hat)


def test_shrinkage_is_a_ratio_of_sums_so_tiny_tokens_do_not_dominate():
    x = torch.tensor([[1e-6, 0.0], [10.0, 0.0]], dtype=torch.float64)
    x_hat = torch.tensor([[1e-3, 0.0], [5.0, 0.0]], dtype=torch.float64)
    # the old mean of per-token ratios: (1000 + 0.5) / 2 = 500.25; the ratio of sums, by hand:
    assert shrinkage(x, x_hat) == pytest.approx((1e-3 + 5.0) / (1e-6 + 10.0), rel=1e-12)
    assert shrinkage(x, x_hat, mode="projection") == pytest.approx((1e-9 + 50.0) / (1e-12 + 100.0), rel=1e-12)


def test_trainer_logs_the_same_shrinkage():
    from saecircuits.saes.trainer import _shrinkage

    x = torch.tensor([[1e-6, 0.0], [10.0, 0.0]])
    x_hat = torch.tensor([[1e-3, 0.0], [5.0, 0.0]])
    assert _shrinkage(x, x_hat) == pytest.approx((1e-3 + 5.0) / (1e-6 + 10.0), rel=1e-6)
    assert _shrinkage(torch.zeros(2, 2), x_hat) != _shrinkage(torch.zeros(2, 2), x_hat)  # NaN
    with pytest.raises(SAEError, match="unknown shrinkage mode"):
        shrinkage(x, x, mode="cos")


def test_dead_dense_and_density_histogram():
    counts = torch.tensor([0, 1, 5, 10])
    assert dead_mask(counts, 10).tolist() == [True, False, False, False]
    assert dead_mask(counts, 10, max_frequency=0.1).tolist() == [True, True, False, False]  # `<=`, as the notebook
    assert dead_fraction(counts, 10, 0.1) == 0.5
    assert dense_fraction(counts, 10, min_frequency=0.4) == 0.5
    assert dense_fraction(counts, 10) == 0.5  # > 10%: counts 5 and 10
    counts = torch.tensor([0, 2, 5, 100])
    torch.testing.assert_close(
        log10_feature_density(counts, 100),
        torch.tensor([-10.0, math.log10(0.02), math.log10(0.05), 0.0]).double(),
    )
    edges, hist = feature_density_histogram(counts, 100, bins=10, low=-10.0, high=0.0)
    assert edges.tolist() == [float(v) for v in range(-10, 1)]
    assert hist.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 2, 1]
    with pytest.raises(SAEError, match="n_tokens must be positive"):
        dead_mask(counts, 0)


def test_firing_counter_window():
    c = FiringCounter(3)
    f1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.5]])
    c.update(f1)
    c.update(torch.tensor([[[0.0, 0.0, 1.0], [9.0, 9.0, 9.0]]]), mask=torch.tensor([[True, False]]))
    assert c.counts.tolist() == [0, 2, 2] and c.n_tokens == 3 and c.n_steps == 2
    assert torch.equal(c.counts, firing_counts(f1) + torch.tensor([0, 0, 1]))
    assert c.dead_mask().tolist() == [True, False, False]
    assert c.dead_fraction() == pytest.approx(1 / 3)
    assert c.dense_fraction(0.5) == pytest.approx(2 / 3)
    state = c.state_dict()
    c.reset()
    assert c.counts.tolist() == [0, 0, 0] and c.n_tokens == 0
    c.load_state_dict(state)
    assert c.counts.tolist() == [0, 2, 2] and c.n_tokens == 3
