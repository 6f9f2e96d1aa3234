"""Complement-of-span ablation at P == exact full-prompt interventions with an independently built projector."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.span import span_ablation, span_basis
from saecircuits.analysis.quality.reconstruction import mean_activation


def _loss_with(model, tokens, pos, answer, fn):
    def hook(act, hook=None):
        act = act.clone()
        act[0, pos] = fn(act[0, pos].clone())
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=[(HOOK, hook)])
    return float(-torch.log_softmax(logits[0, pos].float(), -1)[answer])


def test_span_ablation_equals_projection_by_normal_equations():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    feats = [2, 9, 17, 40, 41]
    mu = mean_activation(model, task.token_ids, HOOK)
    res = span_ablation(model, sae, task, feats, mu, max_tokens=100, max_batch=3)
    a = sae.W_dec[feats].detach().double().T  # [d_in, 5]
    proj = a @ torch.linalg.inv(a.T @ a) @ a.T  # P = A (A^T A)^-1 A^T
    assert res.rank == 5
    kept = []
    for i in range(task.n_prompts):
        t, p, ans = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]
        zero = _loss_with(model, t, p, ans, lambda h: (proj @ h.double()).float())
        mean = _loss_with(model, t, p, ans, lambda h: (proj @ h.double() + mu.double() - proj @ mu.double()).float())
        assert res.losses[i, 1].item() == pytest.approx(zero, abs=1e-5)
        assert res.losses[i, 2].item() == pytest.approx(mean, abs=1e-5)
        with torch.no_grad():
            h = model.run_with_cache(torch.tensor([t]), names_filter=[HOOK])[1][HOOK][0, p].double()
        kept.append(float((proj @ h).norm() ** 2 / h.norm() ** 2))
    assert res.fraction_kept == pytest.approx(sum(kept) / len(kept), abs=1e-5)
    assert (res.losses[:, 1] - res.losses[:, 0]).abs().max() > 1e-3
    assert res.diffs["span_zero"].mean == pytest.approx(float((res.losses[:, 1] - res.losses[:, 0]).mean()), abs=1e-6)


def test_span_basis_uses_the_numerical_rank():
    sae = random_sae()
    with torch.no_grad():
        sae.W_dec[5] = 2 * sae.W_dec[3] - sae.W_dec[1]  # a dependent decoder vector
    q = span_basis(sae, [1, 3, 5])
    assert q.shape == (sae.d_in, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=q.dtype), atol=1e-10, rtol=0)
    with pytest.raises(ValueError):
        span_basis(sae, [])
