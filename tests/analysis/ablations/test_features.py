"""Feature activations at P and the single-feature ablation table: manual interventions, batching, exactness."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.feature_effects import (
    TABLE_COLUMNS,
    answer_losses,
    feature_ablation_table,
    feature_activations,
    feature_effects,
    single_feature_ablation_losses,
)
from saecircuits.models.hooks import edit_at_positions, run_at_positions, task_batches


def _manual_ablated_loss(model, sae, tokens, pos, answer, k):
    """Independent residual-preserving ablation on one prompt:
    h[0, pos] -= ReLU((h - b_dec) @ W_enc[:, k] + b_enc[k]) * W_dec[k]."""

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
    acts = feature_activations(model, sae, task).dense()
    assert acts.shape == (task.n_prompts, sae.d_sae)
    assert 0.05 < (acts > 0).float().mean() < 0.95
    for i in range(task.n_prompts):
        with torch.no_grad():
            h = model.run_with_cache(torch.tensor([task.token_ids[i]]))[1][HOOK][0, task.prediction_pos[i]]
        manual = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)
        torch.testing.assert_close(acts[i], manual, atol=1e-5, rtol=0)


def test_pair_losses_match_manual_ablation_and_are_batch_invariant():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task).dense()
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
    acts = feature_activations(model, sae, task).dense()
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
    acts = feature_activations(model, sae, task).dense()
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
    assert feature_ablation_table(model, sae, task, min_fraction_active=1.01).empty
    everything = feature_ablation_table(model, sae, task, min_fraction_active=0.0)
    assert set(everything["feature"]) == set(torch.nonzero(active.any(0)).flatten().tolist())


@pytest.mark.parametrize("layer", [0, 1])
def test_feature_effects_cover_every_active_pair_and_equal_manual_ablations(layer):
    """All (prompt, active feature) pairs, exact: loss, logprob, logit and rank changes vs a manual hook per pair."""
    from helpers import D_MLP

    hook = f"blocks.{layer}.mlp.hook_post"
    model, task = tiny_neo(), quote_task()
    sae = random_sae(D_MLP, 96, hook_point=hook, seed=layer)
    dense = feature_activations(model, sae, task).dense()
    eff = feature_effects(model, sae, task, max_batch=3)
    pairs = torch.nonzero(dense > 0).tolist()
    assert sorted(zip(eff.prompt.tolist(), eff.feature.tolist(), strict=True)) == sorted(map(tuple, pairs))
    clean = answer_losses(model, task)
    torch.testing.assert_close(eff.clean_loss, clean, atol=1e-5, rtol=0)
    for j in range(0, len(pairs), 7):  # a spread of pairs, each against an independent full-prompt ablation
        i, k = int(eff.prompt[j]), int(eff.feature[j])
        assert float(eff.activation[j]) == pytest.approx(float(dense[i, k]), abs=1e-5)
        toks, pos, ans = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]

        def hook_fn(act, hook=None, k=k, pos=pos):
            act = act.clone()
            h = act[0, pos]
            act[0, pos] = h - torch.relu((h - sae.b_dec) @ sae.W_enc[:, k] + sae.b_enc[k]) * sae.W_dec[k]
            return act

        with torch.no_grad():
            base = model(torch.tensor([toks]))[0, pos].float()
            abl = model.run_with_hooks(torch.tensor([toks]), fwd_hooks=[(hook, hook_fn)])[0, pos].float()
        lp_b, lp_a = base.log_softmax(-1)[ans], abl.log_softmax(-1)[ans]
        assert float(eff.loss_increase[j]) == pytest.approx(float(lp_b - lp_a), abs=1e-5)
        assert float(eff.logprob_diff[j]) == pytest.approx(float(lp_b - lp_a), abs=1e-5)
        assert float(eff.logit_diff[j]) == pytest.approx(float(base[ans] - abl[ans]), abs=1e-5)
        rank = lambda lg, ans=ans: float((lg > lg[ans]).sum())  # noqa: E731
        assert float(eff.rank_diff[j]) == rank(base) - rank(abl)


def test_feature_effects_selection_options():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    everything = feature_effects(model, sae, task)
    top2 = feature_effects(model, sae, task, features=2)
    assert top2.selection == "top_2_dla"
    assert (torch.bincount(top2.prompt, minlength=task.n_prompts) <= 2).all()
    # the chosen pairs are a subset of all pairs, with identical numbers
    key = lambda e: {(int(p), int(k)): float(v) for p, k, v in zip(e.prompt, e.feature, e.loss_increase, strict=True)}  # noqa: E731
    all_pairs, chosen = key(everything), key(top2)
    assert chosen and all(abs(all_pairs[pk] - v) < 1e-6 for pk, v in chosen.items())
    given = feature_effects(model, sae, task, features=[3, 5])
    assert set(given.feature.tolist()) <= {3, 5}
    with pytest.raises(ValueError, match="features"):
        feature_effects(model, sae, task, features="some")


def test_feature_effects_bridge_backend_agrees():
    from saecircuits.models.interventions import interventions_for

    model, task, sae = tiny_neo(), quote_task(), random_sae()
    fast = feature_effects(model, sae, task)
    interventions_for(model)  # the engine is cached; force the bridge path through a fresh attribute
    cache = model.__dict__.pop("_saecircuits_interventions")
    model.__dict__["_saecircuits_interventions"] = {"auto": interventions_for(model, backend="bridge")}
    try:
        slow = feature_effects(model, sae, task)
    finally:
        model.__dict__["_saecircuits_interventions"] = cache
    assert torch.equal(fast.feature, slow.feature) and torch.equal(fast.prompt, slow.prompt)
    torch.testing.assert_close(fast.loss_increase, slow.loss_increase, atol=1e-5, rtol=0)
    assert torch.equal(fast.rank_diff, slow.rank_diff)


def test_effects_summary_equals_per_feature_statistics():
    from saecircuits.analysis.statistics import mean_ci95

    model, task, sae = tiny_neo(), quote_task(), random_sae()
    eff = feature_effects(model, sae, task)
    summary = eff.summary()
    assert len(summary) == len(torch.unique(eff.feature))
    for row in summary.itertuples():
        sel = eff.feature == row.feature
        ci = mean_ci95(eff.loss_increase[sel])
        assert row.n_active_prompts == ci.n == int(sel.sum())
        assert row.loss_increase == pytest.approx(ci.mean, abs=1e-6)
        if ci.n >= 2:
            assert row.loss_increase_ci95 == pytest.approx(ci.half_width, rel=1e-6)
        else:
            assert row.loss_increase_ci95 != row.loss_increase_ci95  # NaN
        assert row.mean_activation == pytest.approx(float(eff.activation[sel].mean()), abs=1e-6)


@pytest.mark.parametrize("hook", ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"])
def test_feature_effects_in_small_runs_and_logit_chunks_equal_full_prompt_ablations(monkeypatch, hook):
    """Runs of a few variant rows whose logits are reduced 5 rows at a time (the engine path that reads the final
    residual and unembeds in chunks; an SAE on the last ``hook_resid_post`` takes the logits from the run) equal a
    full-prompt bridge forward with the feature ablated at P, and the default budgets bit for bit."""
    import saecircuits.analysis.ablations.single_feature as sf

    model, task = tiny_neo(), quote_task()
    d_in = int(model.cfg.d_model) if "resid" in hook else int(model.cfg.d_mlp)
    sae = random_sae(d_in, 48, hook_point=hook, seed=4)
    default = feature_effects(model, sae, task, max_batch=4)
    width = max(int(model.cfg.d_mlp), int(model.cfg.n_heads) * max(len(t) for t in task.token_ids))
    monkeypatch.setattr(sf, "MAX_RUN_FLOATS", 7 * width)  # 7 rows per run: 1 variant per prompt at 4 prompts
    monkeypatch.setattr(sf, "MAX_LOGIT_FLOATS", 5 * int(model.cfg.d_vocab))
    small = feature_effects(model, sae, task, max_batch=4)
    assert torch.equal(small.prompt, default.prompt) and torch.equal(small.feature, default.feature)
    for name in ("loss_increase", "logit_diff", "rank_diff"):
        torch.testing.assert_close(getattr(small, name), getattr(default, name), atol=1e-5, rtol=0)
    for j in range(0, len(small.prompt), 5):
        i, k = int(small.prompt[j]), int(small.feature[j])
        toks, pos, ans = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]

        def hook_fn(act, hook=None, k=k, pos=pos):
            act = act.clone()
            h = act[0, pos]
            act[0, pos] = h - torch.relu((h - sae.b_dec) @ sae.W_enc[:, k] + sae.b_enc[k]) * sae.W_dec[k]
            return act

        with torch.no_grad():
            base = model(torch.tensor([toks]))[0, pos].float()
            abl = model.run_with_hooks(torch.tensor([toks]), fwd_hooks=[(hook, hook_fn)])[0, pos].float()
        lp_b, lp_a = base.log_softmax(-1)[ans], abl.log_softmax(-1)[ans]
        assert float(small.loss_increase[j]) == pytest.approx(float(lp_b - lp_a), abs=1e-5)
        assert float(small.logit_diff[j]) == pytest.approx(float(base[ans] - abl[ans]), abs=1e-5)
