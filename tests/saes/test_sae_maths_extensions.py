"""The maths foreign SAE families need (skip connections, transcoders, per-token input normalisation, hook_z
reshaping, gated, TopK without ReLU), each against a plain numpy forward of the family's formula, and their save/load
round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saecircuits.saes.base import SAEConfig, SAEError
from saecircuits.saes.io import load_sae, save_sae
from saecircuits.saes.registry import build_sae

rng = np.random.default_rng(0)


def _fill(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                continue
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    return sae


def _x(n, d, seed=1):
    return np.random.default_rng(seed).normal(size=(n, d))


def _np(t):
    return t.detach().double().numpy()


def test_skip_transcoder_matches_numpy():
    cfg = SAEConfig("standard", d_in=8, d_sae=16, hook_point="blocks.0.ln2.hook_normalized", d_out=12,
                    hook_point_out="blocks.0.hook_mlp_out", apply_b_dec_to_input=False,
                    dtype="float64", extra={"skip_connection": True})
    sae = _fill(build_sae(cfg, initialize=False))
    x = _x(5, 8)
    W_enc, b_enc, W_dec, b_dec, W_skip = (_np(getattr(sae, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"))
    acts = np.maximum(x @ W_enc + b_enc, 0)
    recon = acts @ W_dec + b_dec + x @ W_skip.T
    xt = torch.tensor(x)
    f = sae.encode(xt)
    np.testing.assert_allclose(_np(f), acts, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(sae.decode(f, xt)), recon, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(sae(xt)), recon, rtol=1e-12, atol=1e-12)
    assert sae.is_transcoder and sae.decode_needs_input and sae.d_out == 12
    with pytest.raises(SAEError, match="decode\\(f, x\\)"):
        sae.decode(f)


def test_layer_norm_input_matches_openai_formula():
    # OpenAI sparse_autoencoder: x_n = (x - mu) / (std + eps) (unbiased std); latents = topk(enc(x_n - pre_bias) +
    # latent_bias) ReLU'd; recons = (dec(latents) + pre_bias) * std + mu
    cfg = SAEConfig("topk", d_in=8, d_sae=16, hook_point="blocks.0.hook_resid_post", dtype="float64",
                    extra={"k": 4, "input_normalization": "layer_norm"})
    sae = _fill(build_sae(cfg, initialize=False))
    x = _x(6, 8) * 3 + 1
    W_enc, b_enc, W_dec, pre_bias = (_np(getattr(sae, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    mu = x.mean(-1, keepdims=True)
    std = (x - mu).std(-1, ddof=1, keepdims=True)
    xn = (x - mu) / (std + 1e-5)
    pre = (xn - pre_bias) @ W_enc + b_enc
    latents = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row)[:4]
        latents[i, top] = np.maximum(row[top], 0)
    recon = (latents @ W_dec + pre_bias) * std + mu
    xt = torch.tensor(x)
    f = sae.encode(xt)
    np.testing.assert_allclose(_np(f), latents * std, rtol=1e-10, atol=1e-12)  # activation units
    np.testing.assert_allclose(_np(sae(xt)), recon, rtol=1e-10, atol=1e-10)
    # each feature's share of the reconstruction is f_k W_dec[k], exactly
    k = int(np.argmax(latents[0]))
    without = f.clone()
    without[0, k] = 0
    np.testing.assert_allclose(_np(sae.decode(f, xt) - sae.decode(without, xt))[0], _np(f[0, k] * sae.W_dec[k]),
                               rtol=1e-10, atol=1e-12)


def test_hook_z_inputs_are_flattened():
    cfg = SAEConfig("standard", d_in=8, d_sae=16, hook_point="blocks.0.attn.hook_z", dtype="float64",
                    extra={"reshape_activations": "hook_z"})
    sae = _fill(build_sae(cfg, initialize=False))
    z = torch.randn(3, 2, 4, dtype=torch.float64)  # [batch, n_heads, d_head]
    torch.testing.assert_close(sae.encode(z), sae.encode(z.flatten(-2)))
    assert sae(z).shape == (3, 8)


def test_gated_matches_saelens_formula():
    cfg = SAEConfig("gated", d_in=8, d_sae=16, hook_point="blocks.0.hook_resid_post", dtype="float64")
    sae = _fill(build_sae(cfg, initialize=False))
    x = _x(5, 8)
    W_enc, b_gate, b_mag, r_mag, W_dec, b_dec = (_np(getattr(sae, n)) for n in
                                                  ("W_enc", "b_enc", "b_mag", "r_mag", "W_dec", "b_dec"))
    x_in = x - b_dec
    acts = ((x_in @ W_enc + b_gate) > 0) * np.maximum(x_in @ (W_enc * np.exp(r_mag)) + b_mag, 0)
    xt = torch.tensor(x)
    np.testing.assert_allclose(_np(sae.encode(xt)), acts, rtol=1e-12, atol=1e-12)
    idx = torch.tensor([1, 5, 7])
    np.testing.assert_allclose(_np(sae.encode_features(xt, idx)), acts[:, [1, 5, 7]], rtol=1e-12, atol=1e-12)


def test_topk_without_relu_keeps_negative_values():
    cfg = SAEConfig("topk", d_in=8, d_sae=16, hook_point="blocks.0.hook_resid_post", dtype="float64",
                    extra={"k": 3, "topk_relu": False})
    sae = build_sae(cfg, initialize=False)
    with torch.no_grad():
        sae.b_enc.fill_(-5.0)  # every pre-activation negative
    f = sae.encode(torch.zeros(2, 8, dtype=torch.float64))
    assert int((f != 0).sum()) == 6 and bool((f[f != 0] == -5.0).all())


@pytest.mark.parametrize("extra, arch, kw", [
    ({"skip_connection": True}, "standard", {"d_out": 12, "hook_point_out": "blocks.0.hook_mlp_out",
                                             "apply_b_dec_to_input": False}),
    ({}, "jumprelu", {"d_out": 12, "hook_point_out": "blocks.0.hook_mlp_out", "apply_b_dec_to_input": False}),
    ({"k": 4, "input_normalization": "layer_norm"}, "topk", {}),
    ({"reshape_activations": "hook_z"}, "standard", {}),
    ({}, "gated", {}),
])
def test_round_trip(tmp_path, extra, arch, kw):
    cfg = SAEConfig(arch, d_in=8, d_sae=16, hook_point="blocks.0.ln2.hook_normalized", dtype="float32",
                    extra=dict(extra), **kw)
    sae = _fill(build_sae(cfg, initialize=False))
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(0.135)
    back = load_sae(save_sae(sae, tmp_path / "sae"))
    x = torch.randn(4, 8)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(back.decode(back.encode(x), x), sae.decode(sae.encode(x), x), rtol=0, atol=0)
    assert back.hook_point_out == sae.hook_point_out and back.d_out == sae.d_out


def test_b_dec_subtraction_needs_matching_widths():
    with pytest.raises(SAEError, match="d_out == d_in"):
        build_sae(SAEConfig("standard", d_in=8, d_sae=16, hook_point="h", d_out=12))
