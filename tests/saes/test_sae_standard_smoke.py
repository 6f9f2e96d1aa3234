"""Smoke tests of the ReLU ("standard") path: build, loss, save/load (full suites in the other test_sae_* files)."""

import torch

from saecircuits.saes.base import SAEConfig
from saecircuits.saes.io import load_sae, save_sae
from saecircuits.saes.losses import LossConfig, sae_training_loss
from saecircuits.saes.registry import build_sae


def test_standard_build_loss_and_roundtrip(tmp_path):
    sae = build_sae(SAEConfig("standard", 8, 32, "blocks.0.mlp.hook_post"), seed=1)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    out = sae_training_loss(sae, x, LossConfig("l1", (0.5,)))
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    expected = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean() + 0.5 * f.sum(-1).mean()
    torch.testing.assert_close(out.total, expected)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert torch.equal(loaded(x), sae(x))
