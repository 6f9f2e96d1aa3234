"""Decoder/encoder cosines and token kurtosis: hand-worked values, the notebook's formula on processed weights, and
the same number under every weight-processing switch."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import HF_BUILDERS, random_sae, tiny_tokenizer

from saecircuits.analysis.corpus.geometry import (
    cosine_matrix,
    decoder_cosines,
    encoder_cosines,
    excess_kurtosis,
    token_kurtosis,
)
from saecircuits.models.load import load_hf_model
from saecircuits.saes.base import SAE, SAEConfig


def test_excess_kurtosis_hand_worked():
    # 1..5: deviations -2..2, m2 = 10/5 = 2, m4 = 34/5 = 6.8, kurtosis = 6.8 / 4 - 3 = -1.3
    assert excess_kurtosis(torch.tensor([1.0, 2, 3, 4, 5])).item() == pytest.approx(-1.3)
    # [0, 0, 0, 0, 5]: mean 1, deviations -1 x4 and 4: m2 = 20/5 = 4, m4 = (4 + 256)/5 = 52, 52/16 - 3 = 0.25
    assert excess_kurtosis(torch.tensor([0.0, 0, 0, 0, 5])).item() == pytest.approx(0.25)
    # two-point symmetric distribution: kurtosis 1, excess -2
    assert excess_kurtosis(torch.tensor([[-1.0, 1, -1, 1]])).tolist() == pytest.approx([-2.0])
    assert math.isnan(excess_kurtosis(torch.ones(4)).item())


def test_cosines_hand_worked():
    sae = SAE(SAEConfig("standard", d_in=2, d_sae=3, hook_point="blocks.0.mlp.hook_post"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]))
        sae.W_enc.copy_(torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    dec = decoder_cosines(sae, [0, 1, 2])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(dec.numpy(), [[1, r, 0], [r, 1, -r], [0, -r, 1]], atol=1e-7)
    enc = encoder_cosines(sae, [0, 2, 1])
    assert enc[0, 1].item() == pytest.approx(r) and math.isnan(enc[0, 2].item()) and math.isnan(enc[2, 2].item())
    assert cosine_matrix(torch.tensor([[2.0, 0.0], [0.0, 5.0]])).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_token_kurtosis_is_the_notebooks_number_under_every_switch():
    sae = random_sae(d_in=64, d_sae=24, hook_point="blocks.1.mlp.hook_post", seed=2)
    ref = None
    for fold_ln, cww, cu in itertools.product([True, False], repeat=3):
        model = load_hf_model(HF_BUILDERS["gpt_neo"](seed=4), tiny_tokenizer(), fold_ln=fold_ln,
                              center_writing_weights=cww, center_unembed=cu)
        got = token_kurtosis(model, sae)
        if ref is None:  # fully processed: the notebook's formula on the processed weights, by numpy
            d = (sae.W_dec.detach() @ model.W_out[1].detach()).double().numpy()
            u = model.W_U.detach().double().numpy()
            cos = (d / np.linalg.norm(d, axis=1, keepdims=True)) @ (u / np.linalg.norm(u, axis=0, keepdims=True))
            c = cos - cos.mean(1, keepdims=True)
            ref = (c**4).mean(1) / (c**2).mean(1) ** 2 - 3
            assert np.abs(ref).max() > 0.05
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-4, rtol=1e-4)
    sub = token_kurtosis(model, sae, [3, 0])
    np.testing.assert_allclose(sub.numpy(), ref[[3, 0]], atol=1e-4, rtol=1e-4)


def test_excess_kurtosis_matches_numpy_moments_and_leaves_its_input_alone():
    """The in-place squaring (c^2, then c^4) against numpy's moments of a heavy-tailed float64 sample, which must
    come back unchanged."""
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    before = x.clone()
    got = excess_kurtosis(x)
    a = x.numpy()
    c = a - a.mean(-1, keepdims=True)
    want = (c**4).mean(-1) / (c**2).mean(-1) ** 2 - 3.0
    assert got.numpy() == pytest.approx(want, rel=1e-12)
    assert torch.equal(x, before)
