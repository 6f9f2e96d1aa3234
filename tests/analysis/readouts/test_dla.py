"""DLA: completeness, agreement with TransformerLens's own decomposition, batched == per prompt, GPT-Neo and Llama."""

from __future__ import annotations

import pytest
import torch
from helpers import quote_task, tiny_llama, tiny_neo

from saecircuits.analysis.readouts.dla import direct_logit_attribution

MODELS = {"neo": tiny_neo, "llama": tiny_llama}


@pytest.mark.parametrize("name", MODELS)
def test_dla_complete_and_batched_equals_per_prompt(name):
    model, task = MODELS[name](), quote_task()
    result = direct_logit_attribution(model, task, max_tokens=200, max_batch=5)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    expected = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)] + [
        "MLP0",
        "MLP1",
        "embed",
    ]
    expected += ["pos_embed", "bias"] if name == "neo" else ["bias"]
    assert result.labels == expected
    assert result.per_prompt.shape == (task.n_prompts, len(expected))
    assert result.max_abs_error < 1e-4
    for i in range(task.n_prompts):
        single = direct_logit_attribution(model, task.subset([i]))
        torch.testing.assert_close(result.per_prompt[i], single.per_prompt[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(result.mean, result.per_prompt.mean(0), atol=1e-6, rtol=0)
    assert bool((result.ci95_low <= result.mean).all() and (result.mean <= result.ci95_high).all())
    if name == "llama":  # bias-free model: the bias component is exactly zero
        assert result.per_prompt[:, -1].abs().max() == 0


@pytest.mark.parametrize("name", MODELS)
def test_dla_matches_transformerlens_decomposition(name):
    """Independent reference: TL's cache.get_full_resid_decomposition(apply_ln=True) at P, dotted with W_U[:, answer]."""
    model, task = MODELS[name](), quote_task()
    result = direct_logit_attribution(model, task)
    for i in (0, 4):
        tokens = torch.tensor([task.token_ids[i]])
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
            stack = cache.get_full_resid_decomposition(
                layer=-1, expand_neurons=False, apply_ln=True, pos_slice=task.prediction_pos[i]
            )
        ref = stack[:, 0] @ model.W_U[:, task.answer_ids[i]]
        torch.testing.assert_close(result.per_prompt[i], ref.float(), atol=1e-5, rtol=1e-5)
        target = logits[0, task.prediction_pos[i], task.answer_ids[i]] - model.b_U[task.answer_ids[i]]
        assert float(result.per_prompt[i].sum()) == pytest.approx(float(target), abs=1e-4)
        assert result.per_prompt[i].abs().max() > 1e-3  # not trivially zero
