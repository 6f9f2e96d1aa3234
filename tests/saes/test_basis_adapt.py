"""Transcoders trained on the MLP's weighted input (sparsify, Gemma Scope, circuit-tracer) read TransformerLens'
``ln2.hook_normalized``, which carries no norm weight: the run folds the weight in, exactly, or refuses."""

from __future__ import annotations

import pytest
import torch

from saecircuits.models.default import shipped_model_dir
from saecircuits.models.load import load_model
from saecircuits.saes.base import SAE, SAEConfig, SAEError
from saecircuits.saes.processing import adapt_to_model

IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def _transcoder(dtype="float32") -> SAE:
    cfg = SAEConfig("standard", d_in=128, d_sae=64, hook_point=IN, hook_point_out=OUT, d_out=128, dtype=dtype,
                    apply_b_dec_to_input=False,
                    extra={"skip_connection": True, "basis": {"norm_weight_applied": True},
                           "model_processing": {"fold_ln": False}})
    sae = SAE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 8)
    return sae.eval()


@pytest.fixture(scope="module")
def unfolded():
    return load_model(shipped_model_dir(), fold_ln=False)


def test_the_norm_weight_is_folded_exactly(unfolded):
    sae = _transcoder()
    adapted = adapt_to_model(sae, unfolded)
    assert adapted is not sae and adapted.cfg.extra["basis"]["norm_weight_folded"]
    tokens = torch.tensor([[0, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        _, cache = unfolded.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_mid", IN])
        weighted = unfolded.blocks[1].ln2(cache["blocks.1.hook_resid_mid"])  # what the MLP reads
        n = cache[IN]
        assert (weighted - n).abs().max() > 1e-2  # the weight matters on this model
        torch.testing.assert_close(adapted.encode(n), sae.encode(weighted), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapted(n), sae(weighted), atol=1e-5, rtol=1e-5)
    assert adapt_to_model(adapted, unfolded) is adapted  # folded once


def test_a_bf16_transcoder_is_folded_in_float32(unfolded):
    adapted = adapt_to_model(_transcoder("bfloat16"), unfolded)
    assert adapted.W_enc.dtype == torch.float32


def test_a_folded_model_is_refused_with_the_fix():
    folded = load_model(shipped_model_dir())
    with pytest.raises(SAEError, match="--no-fold-ln"):
        adapt_to_model(_transcoder(), folded)


def test_other_saes_are_untouched(unfolded):
    sae = SAE(SAEConfig("standard", d_in=128, d_sae=8, hook_point="blocks.1.hook_resid_post"))
    assert adapt_to_model(sae, unfolded) is sae
