"""Feature activations at P and the single-feature (F3) ablation table: manual interventions, batching, exactness."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, quote_task, random_sae, tiny_neo

from saecircuits.analysis.features import (
    TABLE_COLUMNS,
    answer_losses,
    feature_ablation_table,
    feature_activations,
    single_feature_ablation_losses,
)
from saecircuits.models.hooks import edit_at_positions, run_at_positions, task_batches


def _manual_ablated_loss(model, sae, tokens, pos, answer, k):
    """Independent F3 on one prompt: h[0, pos] -= ReLU((h - b_dec) @ W_enc[:, k] + b_enc[k]) * W_dec[k]."""

    def hook(act, hook=None):
        act = act.clone()
        h = act[0, pos]
        f_k = torch.relu((h - sae.b_dec) @ sae.W_enc[:, k] + sae.b_enc[k])
        act[0, pos] = h - f_k * sae.W_dec[k]
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=[(HOOK, hook)])
    return float(-torch.log_softmax(logits[0, pos].float(), -1)[answer])


def test_activations_batched_equal_single_prompt_encoding():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task)
    assert acts.shape == (task.n_prompts, sae.d_sae)
    assert 0.05 < (acts > 0).float().mean() < 0.95
    for i in range(task.n_prompts):
        with torch.no_grad():
            h = model.run_with_cache(torch.tensor([task.token_ids[i]]))[1][HOOK][0, task.prediction_pos[i]]
        manual = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)
        torch.testing.assert_close(acts[i], manual, atol=1e-5, rtol=0)


def test_pair_losses_match_manual_ablation_and_are_batch_invariant():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task)
    pairs = [(i, k) for i in range(task.n_prompts) for k in torch.nonzero(acts[i] > 0).flatten()[:3].tolist()]
    batched = single_feature_ablation_losses(model, sae, task, pairs, max_tokens=10_000, max_batch=64)
    small = single_feature_ablation_losses(model, sae, task, pairs, max_tokens=50, max_batch=2)
    torch.testing.assert_close(batched, small, atol=1e-5, rtol=0)
    for j, (i, k) in enumerate(pairs):
        manual = _manual_ablated_loss(
            model, sae, task.token_ids[i], task.prediction_pos[i], task.answer_ids[i], k
        )
        assert batched[j].item() == pytest.approx(manual, abs=1e-5)
    clean = answer_losses(model, task)
    assert (batched - clean[[i for i, _ in pairs]]).abs().max() > 1e-3  # ablation does something


def test_ablating_an_inactive_feature_changes_nothing_exactly():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task)
    batch = next(task_batches(model, task))
    rows = torch.tensor(batch.indices)
    # per row, a feature inactive at that row's P
    k = torch.tensor([int(torch.nonzero(acts[i] == 0).flatten()[0]) for i in batch.indices])
    assert bool((acts[rows, k] == 0).all())

    def ablate(x, row):
        return x - sae.encode(x)[row, k][:, None] * sae.W_dec[k]

    clean, read_clean = run_at_positions(
        model, batch.tokens, batch.positions, read=["blocks.1.hook_resid_post"]
    )
    edited, read_edit = run_at_positions(
        model,
        batch.tokens,
        batch.positions,
        read=["blocks.1.hook_resid_post"],
        edits=[(HOOK, edit_at_positions(batch.positions, ablate))],
    )
    assert torch.equal(clean, edited)
    assert torch.equal(read_clean["blocks.1.hook_resid_post"], read_edit["blocks.1.hook_resid_post"])


def test_table_columns_selection_and_values():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task)
    table = feature_ablation_table(model, sae, task, min_fraction_active=0.3, max_candidates=5)
    assert list(table.columns) == TABLE_COLUMNS and len(table) == 5
    assert list(table["loss_increase"]) == sorted(table["loss_increase"], reverse=True)
    active = acts > 0
    frac = active.float().mean(0)
    mean_act = (acts * active).sum(0) / active.sum(0).clamp(min=1)
    eligible = torch.nonzero(frac >= 0.3).flatten()
    top5 = eligible[torch.argsort(mean_act[eligible], descending=True)[:5]].tolist()
    assert sorted(table["feature"]) == sorted(top5)
    clean = answer_losses(model, task)
    for row in table.itertuples():
        prompts = torch.nonzero(active[:, row.feature]).flatten().tolist()
        assert row.n_prompts == len(prompts)
        assert row.fraction_active == pytest.approx(len(prompts) / task.n_prompts)
        assert row.mean_activation == pytest.approx(float(acts[prompts, row.feature].mean()), abs=1e-6)
        manual = [
            _manual_ablated_loss(
                model, sae, task.token_ids[i], task.prediction_pos[i], task.answer_ids[i], row.feature
            )
            - float(clean[i])
            for i in prompts
        ]
        assert row.loss_increase == pytest.approx(sum(manual) / len(manual), abs=1e-5)
    capped = feature_ablation_table(
        model, sae, task, min_fraction_active=0.3, max_candidates=5, max_prompts_per_feature=1
    )
    assert set(capped["n_prompts"]) == {1}
    assert feature_ablation_table(model, sae, task, min_fraction_active=1.01).empty
