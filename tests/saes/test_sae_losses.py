"""Training loss: every regularizer against hand-worked values, batch reductions, AuxK, JumpReLU L0."""

import math

import pytest
import torch

from saecircuits.saes.base import SAEConfig, SAEError
from saecircuits.saes.losses import LossConfig, sae_training_loss
from saecircuits.saes.registry import build_sae

HOOK = "blocks.1.mlp.hook_post"
# Identity SAE (d_in = d_sae = 3): f = ReLU(x), x_hat = f, so the loss inputs are set by hand.
X = torch.tensor([[0.0, 0.25, 4.0], [1.0, -2.0, 0.09]])
# f = [[0, 0.25, 4], [1, 0, 0.09]]; MSE: row 0 -> 0, row 1 -> (-2)^2 = 4; mean 2.
MSE = 2.0
# Per-token penalties (by hand):
L1 = [4.25, 1.09]
SQRT = [0.5 + 4.0, 1.0 + 0.3]  # sqrt below 1, identity from 1 on (g(1) = 1, g(4) = 4)
PURE_SQRT = [0.5 + 2.0, 1.0 + 0.3]
HOYER = [4.25**2 / (0.25**2 + 16.0), 1.09**2 / (1.0 + 0.09**2)]


def _identity_sae(arch="standard", **extra):
    sae = build_sae(SAEConfig(arch, 3, 3, HOOK, extra=extra))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.W_dec.copy_(torch.eye(3))
    return sae


def _mean(v):
    return sum(v) / len(v)


@pytest.mark.parametrize(
    ("reg", "coeffs", "expected"),
    [
        ("l1", (0.1,), {"l1": 0.1 * _mean(L1)}),
        ("sqrt", (0.1,), {"sqrt": 0.1 * _mean(SQRT)}),
        ("pure_sqrt", (0.1,), {"pure_sqrt": 0.1 * _mean(PURE_SQRT)}),
        ("hoyer_square", (0.2,), {"hoyer_square": 0.2 * _mean(HOYER)}),
        ("combined_hoyer_l1", (0.1, 0.2), {"l1": 0.1 * _mean(L1), "hoyer_square": 0.2 * _mean(HOYER)}),
        ("combined_hoyer_sqrt", (0.1, 0.2), {"sqrt": 0.1 * _mean(SQRT), "hoyer_square": 0.2 * _mean(HOYER)}),
        ("none", (), {}),
    ],
)
def test_every_regularizer_hand_worked(reg, coeffs, expected):
    out = sae_training_loss(_identity_sae(), X, LossConfig(reg, coeffs))
    assert out.terms["mse"] == pytest.approx(MSE)
    for name, value in expected.items():
        assert out.terms[name] == pytest.approx(value, rel=1e-6)
    assert set(out.terms) == {"mse", "total", *expected}
    total = MSE + sum(expected.values())
    assert out.terms["total"] == pytest.approx(total, rel=1e-6)
    assert float(out.total.detach()) == pytest.approx(total, rel=1e-6)
    torch.testing.assert_close(out.f, torch.relu(X))
    torch.testing.assert_close(out.x_hat, torch.relu(X))


def test_sum_reduction_reproduces_batch_summed_penalty_and_sparsity_scale():
    sae = _identity_sae()
    out = sae_training_loss(sae, X, LossConfig("combined_hoyer_sqrt", (1e-4, 1.5e-4), batch_reduction="sum"))
    assert out.terms["sqrt"] == pytest.approx(1e-4 * sum(SQRT), rel=1e-6)
    assert out.terms["hoyer_square"] == pytest.approx(1.5e-4 * sum(HOYER), rel=1e-6)
    assert out.terms["mse"] == pytest.approx(MSE)  # MSE stays a batch mean
    warm = sae_training_loss(sae, X, LossConfig("l1", (0.1,)), sparsity_scale=0.25)
    assert warm.terms["l1"] == pytest.approx(0.1 * _mean(L1))  # logged before the warm-up scale
    assert float(warm.total.detach()) == pytest.approx(MSE + 0.25 * 0.1 * _mean(L1), rel=1e-6)


def test_decoder_norm_weighted_l1():
    sae = _identity_sae()
    with torch.no_grad():
        sae.W_dec.copy_(torch.diag(torch.tensor([2.0, 1.0, 0.5])))
    out = sae_training_loss(sae, X, LossConfig("l1", (1.0,), decoder_norm_weighted=True))
    # |f| * ||W_dec[k]||: row 0 = 0*2 + 0.25*1 + 4*0.5 = 2.25; row 1 = 1*2 + 0 + 0.09*0.5 = 2.045
    assert out.terms["l1"] == pytest.approx((2.25 + 2.045) / 2, rel=1e-6)


def test_sqrt_gradients_are_finite_at_zero_and_hand_worked():
    sae = _identity_sae()
    x = X.clone().requires_grad_(True)
    out = sae_training_loss(sae, x, LossConfig("pure_sqrt", (1.0,), batch_reduction="sum"))
    out.total.backward()
    assert torch.isfinite(x.grad).all()
    # penalty sum sqrt(relu(x)): 1/(2 sqrt(a)) for a > 0, 0 at a = 0 and below. MSE (x_hat = relu(x)): only the
    # negative entry -2 has an error, (x_hat - x)^2 = (0 - x)^2 -> d/dx = 2x = -4, halved by the batch mean -> -2.
    expected = torch.tensor([[0.0, 1 / (2 * 0.5), 1 / (2 * 2.0)], [0.5, -2.0, 1 / (2 * 0.3)]])
    torch.testing.assert_close(x.grad, expected)


def test_auxk_hand_worked():
    # d_in 2, d_sae 3; pre = [1, 2, -1] for x = [1, 2]; f = [1, 2, 0].
    sae = build_sae(SAEConfig("topk", 2, 3, HOOK, extra={"k": 2}))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0]])
    dead = torch.tensor([False, True, True])
    # x_hat = 1*[1,0] + 2*[.5,.5] = [2, 1]; residual e = [-1, 1]. aux_k=1: top dead latent = 1 (pre 2) ->
    # e_hat = 2*[.5,.5] = [1, 1]; squared error = 4; scale = min(2/1, 1) = 1.
    out = sae_training_loss(sae, x, LossConfig("none", (), aux_k=1, aux_coefficient=0.5), dead_mask=dead)
    assert out.terms["auxk"] == pytest.approx(4.0)
    assert out.terms["mse"] == pytest.approx(1.0 + 1.0)
    assert float(out.total.detach()) == pytest.approx(2.0 + 0.5 * 4.0)
    # aux_k=3 > n_dead=2: both dead latents (latent 2 is ReLU'd to 0), scale = 2/3
    out3 = sae_training_loss(sae, x, LossConfig("none", (), aux_k=3), dead_mask=dead)
    assert out3.terms["auxk"] == pytest.approx(4.0 * 2 / 3)
    # the residual is detached: AuxK alone sends no gradient to the alive latent's decoder row
    sae.zero_grad()
    from saecircuits.saes.losses import auxk_loss

    f, pre = sae.encode_with_hidden_pre(x)
    auxk_loss(sae, x, sae.decode(f), pre, dead, 1).backward()
    assert torch.all(sae.W_dec.grad[0] == 0) and torch.any(sae.W_dec.grad[1] != 0)
    no_dead = sae_training_loss(
        sae, x, LossConfig("none", (), aux_k=1), dead_mask=torch.zeros(3, dtype=torch.bool)
    )
    assert no_dead.terms["auxk"] == 0.0
    with pytest.raises(SAEError, match="dead_mask must be a bool tensor of shape"):
        sae_training_loss(sae, x, LossConfig("none", (), aux_k=1), dead_mask=torch.zeros(4, dtype=torch.bool))


def test_topk_ignores_the_penalty():
    sae = build_sae(SAEConfig("topk", 3, 3, HOOK, extra={"k": 1}))
    out = sae_training_loss(sae, X, LossConfig("l1", (10.0,)))
    assert set(out.terms) == {"mse", "total"} and out.terms["total"] == pytest.approx(out.terms["mse"])


def test_jumprelu_l0_penalty_and_threshold_gradient():
    sae = _identity_sae("jumprelu", bandwidth=0.25, threshold_init=0.5)
    x = torch.tensor([[0.2, 0.6, 1.0], [0.7, 0.4, 0.55]])
    out = sae_training_loss(sae, x, LossConfig("l0", (0.1,)))
    assert out.terms["l0"] == pytest.approx(0.1 * 2.0)  # two features above 0.5 in each row
    sae.zero_grad()
    # gradient of the L0 term alone: -(c/eps) * window counts / batch
    (out.total - ((out.x_hat - x) ** 2).sum(-1).mean()).backward()
    torch.testing.assert_close(sae.threshold.grad, 0.1 / 2 * torch.tensor([0.0, -8.0, -4.0]))
    with pytest.raises(SAEError, match="needs a JumpReLU SAE"):
        sae_training_loss(_identity_sae(), x, LossConfig("l0", (0.1,)))


def test_loss_config_validation():
    with pytest.raises(SAEError, match="takes 2 coefficient"):
        LossConfig("combined_hoyer_sqrt", (1e-4,))
    with pytest.raises(SAEError, match="unknown regularizer 'l2'"):
        LossConfig("l2")
    with pytest.raises(SAEError, match="batch_reduction"):
        LossConfig(batch_reduction="max")
    with pytest.raises(SAEError, match="finite and >= 0"):
        LossConfig("l1", (math.nan,))
    assert LossConfig("l1", [3e-4]).coefficients == (3e-4,)
    with pytest.raises(SAEError, match=r"\[batch, d_in\]"):
        sae_training_loss(_identity_sae(), X[None], LossConfig())
