"""Unit-norm decoder rows and parallel-gradient removal (the reference notebook's training step)."""

import torch

from saecircuits.saes.base import SAEConfig
from saecircuits.saes.constraints import normalize_decoder_rows_, remove_parallel_grad_component_
from saecircuits.saes.losses import LossConfig, sae_training_loss
from saecircuits.saes.registry import build_sae


def test_parallel_component_removed_hand_worked():
    sae = build_sae(SAEConfig("standard", 2, 2, "blocks.0.mlp.hook_post"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.6, 0.8]]))  # row 0 not unit: direction (1, 0)
    sae.W_dec.grad = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    remove_parallel_grad_component_(sae)
    # row 0: (3,4) - 3*(1,0) = (0,4); row 1: (1,0) - 0.6*(0.6,0.8) = (0.64, -0.48)
    torch.testing.assert_close(sae.W_dec.grad, torch.tensor([[0.0, 4.0], [0.64, -0.48]]))
    normalize_decoder_rows_(sae)
    torch.testing.assert_close(sae.W_dec.detach(), torch.tensor([[1.0, 0.0], [0.6, 0.8]]))


def test_norms_stay_one_after_every_adam_step_and_grad_is_orthogonal():
    sae = build_sae(SAEConfig("standard", 8, 32, "blocks.0.mlp.hook_post"), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 8, generator=gen)
        out = sae_training_loss(sae, x, LossConfig("l1", (1e-2,)))
        opt.zero_grad()
        out.total.backward()
        assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() > 1e-4  # there was a parallel part
        remove_parallel_grad_component_(sae)
        torch.testing.assert_close(
            (sae.W_dec.grad * sae.W_dec).sum(dim=1), torch.zeros(32), atol=1e-6, rtol=0
        )
        opt.step()
        normalize_decoder_rows_(sae)
        torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(32))
    remove_parallel_grad_component_(build_sae(SAEConfig("standard", 2, 2, "x")))  # no grad: no-op
