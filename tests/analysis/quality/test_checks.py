"""The checks that flag numbers which cannot support a conclusion, on hand-built inputs; the behaviour summary."""

from __future__ import annotations

import math

import pytest
import torch

from saecircuits.analysis.quality.behaviour import BehaviourSummary, wilson_ci95
from saecircuits.analysis.quality.checks import behaviour_checks, sae_checks
from saecircuits.analysis.quality.reconstruction import ReconstructionResult, loss_recovered

HOOK = "blocks.1.mlp.hook_post"
T = torch.float64


def _rec(clean, sae, zero, mean, ev, rel=0.1) -> ReconstructionResult:
    clean, sae, zero, mean = (torch.tensor(v, dtype=T) for v in (clean, sae, zero, mean))
    return ReconstructionResult(
        clean_loss=clean, sae_loss=sae, zero_loss=zero, mean_loss=mean, l0=torch.ones_like(clean),
        explained_variance=ev, loss_recovered_zero=loss_recovered(clean, sae, zero, ablation="zero ablation"),
        loss_recovered_mean=loss_recovered(clean, sae, mean, ablation="mean ablation"), relative_error=rel,
    )


def test_a_good_sae_passes():
    r = _rec([0.5, 0.4, 0.6, 0.5], [0.52, 0.41, 0.63, 0.5], [3.0, 2.5, 3.1, 2.8], [2.0, 1.9, 2.2, 2.1], 0.7)
    assert sae_checks(HOOK, r) == []


def test_issue_stories260k_numbers_sae_worse_than_mean_ablation_and_negative_ev():
    """Issue 7 item 8a: splice raises 0.48 -> 0.78 nats, mean ablation 0.73, EV at P -2.9."""
    clean = [0.40, 0.56, 0.45, 0.51]  # mean 0.48
    sae = [0.70, 0.86, 0.75, 0.81]  # mean 0.78
    zero = [0.80, 0.82, 0.86, 0.84]  # mean 0.83
    mean = [0.70, 0.76, 0.71, 0.75]  # mean 0.73
    r = _rec(clean, sae, zero, mean, -2.9, rel=0.13)
    # independently: loss recovered vs mean ablation is (0.73 - 0.78) / (0.73 - 0.48) = -0.2
    assert r.loss_recovered_mean.value == pytest.approx((0.73 - 0.78) / (0.73 - 0.48), abs=1e-9)
    checks = sae_checks(HOOK, r)
    ids = [c.id for c in checks]
    # loss recovered vs zero ablation: (0.83 - 0.78) / (0.83 - 0.48) = 0.14, also too weak
    assert ids == ["sae_worse_than_mean_ablation", "negative_explained_variance", "low_loss_recovered"]
    worse = checks[0]
    # per prompt |sae - clean| = 0.3 each; |mean - clean| = 0.30, 0.20, 0.26, 0.24 -> 0.25 on average
    assert worse.scope == HOOK and "by 0.3000 nats" in worse.message and "(0.2500;" in worse.message
    assert "0.4800 -> 0.7800" in worse.message and "0.4800 -> 0.7300" in worse.message
    assert "--sae-k" in worse.what_to_try and "--l1-coefficient" in worse.what_to_try
    assert "--sae-tokens" in worse.what_to_try
    assert "-2.900" in checks[1].message and "13.0% of the activations' squared norm" in checks[1].message


def test_negative_ev_says_how_little_the_prompts_differ_at_p():
    """stories260K layer 1 (issue 18): P is '.' in every prompt, so the activations at P differ from their mean by
    only ~9% of their squared norm, and an SAE whose squared error is ~9% of it everywhere has EV at P near 0. The
    message's spread must equal sum |x - mean|^2 / sum |x|^2 computed directly from the activations."""
    from saecircuits.saes.metrics import explained_variance

    gen = torch.Generator().manual_seed(0)
    common = torch.randn(16, dtype=T, generator=gen) * 3
    xs = common + 0.3 * torch.randn(40, 16, dtype=T, generator=gen)  # one direction shared by every prompt
    xhats = xs + 0.35 * torch.randn(40, 16, dtype=T, generator=gen)
    ev = explained_variance(xs, xhats)
    rel = float(((xs - xhats) ** 2).sum() / (xs ** 2).sum())
    spread = float(((xs - xs.mean(0)) ** 2).sum() / (xs ** 2).sum())  # directly, not from ev and rel
    assert ev < 0
    r = _rec([0.5, 0.4, 0.6, 0.5], [0.52, 0.41, 0.63, 0.5], [3.0, 2.5, 3.1, 2.8], [2.0, 1.9, 2.2, 2.1], ev, rel=rel)
    (check,) = sae_checks(HOOK, r)
    assert check.id == "negative_explained_variance"
    assert f"differ from their mean at P by {spread:.1%} of it" in check.message
    assert f"{rel:.1%} of the activations' squared norm" in check.message


def test_splice_that_lowers_the_loss_less_than_mean_ablation_is_not_worse():
    """stories260K layer 0: mean ablation LOWERS the loss (0.478 -> 0.400) and the splice a little (-> 0.458); the
    splice moves each prompt less than mean ablation does, so it is not flagged as worse (loss recovered is
    undefined instead)."""
    clean = [0.45, 0.50, 0.48, 0.482]
    sae = [0.43, 0.48, 0.46, 0.462]
    mean = [0.37, 0.42, 0.40, 0.412]
    ids = [c.id for c in sae_checks(HOOK, _rec(clean, sae, [0.5, 0.6, 0.55, 0.56], mean, 0.3))]
    assert "sae_worse_than_mean_ablation" not in ids and "loss_recovered_undefined_mean" in ids


def test_splice_that_moves_the_loss_either_way_more_than_mean_ablation_is_worse():
    """Per prompt the splice moves the loss by 0.2 (up or down, mean change 0), mean ablation by 0.1: flagged."""
    clean = [1.0, 1.0, 1.0, 1.0]
    sae = [1.2, 0.8, 1.2, 0.8]
    mean = [1.1, 1.1, 1.1, 1.1]
    ids = [c.id for c in sae_checks(HOOK, _rec(clean, sae, [3.0, 3.1, 3.2, 3.0], mean, 0.3))]
    assert "sae_worse_than_mean_ablation" in ids


def test_ill_posed_loss_recovered_is_a_check_with_the_raw_losses():
    clean = [1.0, 2.0, 3.0]
    r = _rec(clean, [1.3, 2.3, 3.3], [1.0001, 2.0001, 3.0001], [3.0, 4.1, 5.0], 0.2)
    (check,) = sae_checks(HOOK, r)
    assert check.id == "loss_recovered_undefined_zero"
    assert "floor" in check.message and "clean 2.0000, SAE 2.3000, zero ablation 2.0001" in check.message
    assert "raw losses" in check.what_to_try


def test_nan_explained_variance_is_not_called_negative():
    r = _rec([0.5, 0.4], [0.5, 0.4], [3.0, 2.9], [2.0, 2.1], float("nan"))
    assert "negative_explained_variance" not in [c.id for c in sae_checks(HOOK, r)]


def test_behaviour_check_and_rule():
    loss = torch.tensor([8.5, 8.4, 8.6, 0.1])
    b = BehaviourSummary(loss=loss, p_answer=torch.exp(-loss), top1=torch.tensor([False, False, False, True]),
                         d_vocab=1000)
    assert b.top1_accuracy == 0.25 and not b.performs
    (check,) = behaviour_checks(b)
    assert check.scope == "task" and "25.0%" in check.message and "6.91" in check.message  # log(1000)
    d = b.to_dict()
    assert d["mean_loss"] == pytest.approx(float(loss.mean())) and d["performs"] is False
    assert d["top1_accuracy_ci95"] == pytest.approx(list(wilson_ci95(1, 4)))
    good = BehaviourSummary(loss=loss, p_answer=torch.exp(-loss), top1=torch.tensor([True, True, False, False]),
                            d_vocab=1000)
    assert good.performs and behaviour_checks(good) == []


def test_wilson_interval_hand_values():
    # k = 8, n = 10: the textbook Wilson 95% interval is [0.4902, 0.9433]
    lo, hi = wilson_ci95(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_ci95(0, 5)[0] == 0.0 and wilson_ci95(5, 5)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_ci95(0, 0))


def test_dense_top_features_flagged_when_most_of_the_top_five_are_dense():
    from saecircuits.analysis.quality.checks import density_checks

    density = torch.full((10,), 0.01, dtype=torch.float64)  # as FeatureStats.density
    density[[2, 5, 7]] = torch.tensor([0.5, 0.2, 0.101], dtype=torch.float64)
    (c,) = density_checks("blocks.0.mlp.hook_post", [2, 5, 7, 1, 0, 9], density, l0=42.0, d_sae=10)
    assert c.id == "dense_top_features" and c.scope == "blocks.0.mlp.hook_post"
    assert "3 of the top 5 features are dense" in c.message and "2 (50%), 5 (20%), 7 (10%)" in c.message
    assert "a smaller --sae-k" in c.what_to_try and "a larger --l1-coefficient" in c.what_to_try
    # two of five dense, or only a dense feature outside the top five: no warning
    assert density_checks("h", [2, 5, 1, 0, 9, 7], density, l0=1.0, d_sae=10) == []
    assert density_checks("h", [], density, l0=1.0, d_sae=10) == []
    density[7] = 0.1  # exactly a tenth is not dense
    assert density_checks("h", [2, 5, 7, 1, 0], density, l0=1.0, d_sae=10) == []


def test_low_loss_recovered_only_when_the_whole_interval_is_below_one_half():
    clean = [0.40, 0.50, 0.45, 0.55, 0.48, 0.52]
    zero = [c + 1.0 for c in clean]
    weak = _rec(clean, [c + 0.8 for c in clean], zero, [c + 0.9 for c in clean], 0.5)
    (c,) = [c for c in sae_checks(HOOK, weak) if c.id == "low_loss_recovered"]
    assert weak.loss_recovered_zero.value == pytest.approx((1.0 - 0.8) / 1.0)  # by hand: 0.2 on every prompt
    assert "is 0.200" in c.message and "--sae-tokens" in c.what_to_try
    fine = _rec(clean, [c + 0.4 for c in clean], zero, [c + 0.9 for c in clean], 0.5)  # 0.6
    assert "low_loss_recovered" not in [c.id for c in sae_checks(HOOK, fine)]
