"""A bfloat16 SAE on a float32 model: the SAE encodes in bf16, but every edit subtracts (and forms the SAE error, and
the zero/mean variants) in the activation's float32, so the activation itself is never rounded to bf16.

Right values are computed by hand in float32 from the bf16 feature activations and decoder rows."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import HOOK, quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.feature_effects import (
    feature_activations,
    feature_effects,
    features_ablation_edit,
    one_feature_each_edit,
)
from saecircuits.analysis.ablations.loss_comparison import loss_comparison
from saecircuits.analysis.circuit import _mask_edit, _single_edit, circuit_nodes
from saecircuits.analysis.quality.reconstruction import mean_activation, reconstruction_at_prediction


@functools.cache
def _setup():
    model, task = tiny_neo(), quote_task()
    sae32 = random_sae()
    sae16 = random_sae().to(torch.bfloat16)
    assert sae16.W_dec.dtype == torch.bfloat16
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([task.token_ids[0]]))
    x = cache[HOOK][0, task.prediction_pos[0]].float()  # [d_in] float32
    # the bug this file guards against: rounding x to bf16 changes it
    assert not torch.equal(x.bfloat16().float(), x)
    return model, task, sae32, sae16, x


def _active_inactive(sae, x):
    f = sae.encode(x)
    return int(torch.nonzero(f > 0).flatten()[0]), int(torch.nonzero(f == 0).flatten()[0]), f


def test_feature_edits_keep_x_exactly_and_subtract_in_float32():
    _, _, _, sae, x = _setup()
    on, off, f = _active_inactive(sae, x)
    xb = x[None, None]  # [B=1, F=1, d_in]
    # ablating an inactive feature changes nothing, bit for bit
    assert torch.equal(features_ablation_edit(sae, [off]).fn(xb)[0, 0].float(), x)
    # ablating an active one is x - f_k W_dec[k] in float32
    want = x - f[on].float() * sae.W_dec[on].float()
    assert torch.equal(features_ablation_edit(sae, [on]).fn(xb)[0, 0].float(), want)
    out = one_feature_each_edit(sae, torch.tensor([[off, on, -1]])).fn(xb)  # [1, 3, d_in]
    assert torch.equal(out[0, 0].float(), x)
    assert torch.equal(out[0, 1].float(), want)
    assert torch.equal(out[0, 2].float(), x)


def test_circuit_edits_keep_x_exactly_and_form_the_error_in_float32():
    model, task, _, sae, x = _setup()
    saes = [sae]
    _, groups = circuit_nodes(model, saes, [feature_activations(model, sae, task)])
    g = next(g for g in groups if g.kind == "sae")
    assert g.hook == HOOK
    on, off, f = _active_inactive(sae, x)
    d_sae = sae.d_sae
    xb = x[None, None]
    out = _single_edit(g, torch.tensor([[off, on, d_sae, -1]]), None).fn(xb)[0].float()
    assert torch.equal(out[0], x)
    assert torch.equal(out[1], x - f[on].float() * sae.W_dec[on].float())
    x_hat = sae.decode(f).float()
    torch.testing.assert_close(out[2], x - (x - x_hat), atol=0, rtol=0)  # error ablated: x - e, e = x - x_hat
    assert torch.equal(out[3], x)
    # mean ablation with a float32 mean: nothing ablated keeps x; the error ablated gives x_hat + mean error
    means = {g.hook: {"f": torch.zeros(d_sae), "e": 0.01 * torch.arange(sae.d_in, dtype=torch.float32)}}
    mask = torch.zeros(2, d_sae + 1, dtype=torch.bool)
    mask[1, -1] = True
    out = _mask_edit(g, mask, means).fn(xb)[0].float()
    assert torch.equal(out[0], x)
    torch.testing.assert_close(out[1], x_hat + means[g.hook]["e"], atol=1e-6, rtol=0)


def test_zero_and_mean_ablation_do_not_depend_on_the_sae_dtype():
    """The zero and mean variants never touch the SAE, so a bf16 copy must give bit-identical losses."""
    model, task, sae32, sae16, _ = _setup()
    mean = mean_activation(model, [task.token_ids[i] for i in range(task.n_prompts)], HOOK)
    # a mean with more precision than bf16 keeps, so rounding it would show
    assert not torch.equal(mean.bfloat16().float(), mean.float())
    r32 = reconstruction_at_prediction(model, sae32, task, mean_act=mean, n_bootstrap=10)
    r16 = reconstruction_at_prediction(model, sae16, task, mean_act=mean, n_bootstrap=10)
    assert torch.equal(r32.zero_loss, r16.zero_loss)
    assert torch.equal(r32.mean_loss, r16.mean_loss)
    c32 = loss_comparison(model, sae32, task, [], mean)
    c16 = loss_comparison(model, sae16, task, [], mean)
    assert torch.equal(c32.losses[:, :3], c16.losses[:, :3])  # clean, mean, zero


def test_feature_effects_of_a_bf16_sae_match_a_float32_hand_ablation():
    model, task, _, sae, _ = _setup()
    eff = feature_effects(model, sae, task, max_batch=4)
    assert len(eff.prompt) > 10
    for j in range(0, len(eff.prompt), max(1, len(eff.prompt) // 12)):
        i, k = int(eff.prompt[j]), int(eff.feature[j])
        p = task.prediction_pos[i]

        def hook(act, hook=None, p=p, k=k):
            act = act.clone()
            h = act[0, p]
            act[0, p] = h - sae.encode(h)[k].float() * sae.W_dec[k].float()
            return act

        with torch.no_grad():
            clean = model(torch.tensor([task.token_ids[i]]))
            ablated = model.run_with_hooks(torch.tensor([task.token_ids[i]]), fwd_hooks=[(HOOK, hook)])
        ans = task.answer_ids[i]
        want = float(-ablated[0, p].float().log_softmax(-1)[ans] + clean[0, p].float().log_softmax(-1)[ans])
        assert float(eff.loss_increase[j]) == pytest.approx(want, abs=1e-5)
