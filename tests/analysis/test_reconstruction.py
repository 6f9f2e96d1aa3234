"""Loss at P under SAE splicing and zero / mean ablation: identities, manual interventions, batched == per prompt."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, exact_sae, quote_task, random_sae, tiny_neo, zero_sae

from saecircuits.analysis.reconstruction import mean_activation, reconstruction_at_prediction


def _manual_loss(model, tokens, pos, answer, value=None):
    """Independent single-prompt run: optionally set HOOK[0, pos] := value, return -log p(answer) at pos."""
    hooks = []
    if value is not None:

        def set_value(act, hook=None):
            act = act.clone()
            act[0, pos] = value
            return act

        hooks = [(HOOK, set_value)]
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=hooks)
    return float(-torch.log_softmax(logits[0, pos].float(), -1)[answer])


def test_exact_sae_recovers_everything():
    model, task = tiny_neo(), quote_task()
    r = reconstruction_at_prediction(model, exact_sae(), task)
    assert torch.equal(r.sae_loss, r.clean_loss)
    assert r.loss_recovered_zero.value == pytest.approx(1.0, abs=1e-6)
    assert r.loss_recovered_zero.low == pytest.approx(1.0, abs=1e-6)
    assert r.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert (r.zero_loss - r.clean_loss).abs().max() > 0.05  # zero ablation does something


def test_zero_sae_equals_zero_ablation_and_manual_interventions():
    model, task = tiny_neo(), quote_task()
    mu = mean_activation(model, task.token_ids, HOOK)
    r = reconstruction_at_prediction(model, zero_sae(), task, mean_act=mu)
    assert torch.equal(r.sae_loss, r.zero_loss)
    assert r.loss_recovered_zero.value == pytest.approx(0.0, abs=1e-6)
    assert r.l0.sum() == 0
    for i in range(task.n_prompts):
        t, p, a = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]
        assert r.clean_loss[i].item() == pytest.approx(_manual_loss(model, t, p, a), abs=1e-5)
        assert r.zero_loss[i].item() == pytest.approx(_manual_loss(model, t, p, a, 0.0), abs=1e-5)
        assert r.mean_loss[i].item() == pytest.approx(_manual_loss(model, t, p, a, mu), abs=1e-5)


def test_mean_activation_excludes_bos_and_padding():
    model, task = tiny_neo(), quote_task()
    rows = task.token_ids[:3]
    mu = mean_activation(model, rows, HOOK, max_tokens=40, max_batch=2)
    with torch.no_grad():
        acts = [model.run_with_cache(torch.tensor([t]))[1][HOOK][0, 1:] for t in rows]
    torch.testing.assert_close(mu, torch.cat(acts).mean(0), atol=1e-5, rtol=0)
    with_bos = mean_activation(model, rows, HOOK, exclude_bos=False)
    assert not torch.allclose(mu, with_bos)


def test_random_sae_batched_equals_per_prompt():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    mu = mean_activation(model, task.token_ids, HOOK)
    r = reconstruction_at_prediction(model, sae, task, mean_act=mu, max_tokens=200, max_batch=5)
    assert 0 < r.l0.mean() < sae.d_sae
    for i in range(task.n_prompts):
        s = reconstruction_at_prediction(model, sae, task.subset([i]), mean_act=mu)
        for name in ("clean_loss", "sae_loss", "zero_loss", "mean_loss", "l0"):
            assert getattr(r, name)[i].item() == pytest.approx(getattr(s, name)[0].item(), abs=1e-5), name
        # independent splice: x_hat computed by hand at P of a single-prompt run
        t, p, a = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]
        with torch.no_grad():
            x = model.run_with_cache(torch.tensor([t]))[1][HOOK][0, p]
            x_hat = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec
        assert r.sae_loss[i].item() == pytest.approx(_manual_loss(model, t, p, a, x_hat), abs=1e-5)
    clean, sae_l, zero = r.clean_loss, r.sae_loss, r.zero_loss
    assert r.loss_recovered_zero.value == pytest.approx(
        float((zero - sae_l).mean() / (zero - clean).mean()), rel=1e-5
    )
