"""Activation vs loss: per-prompt loss increases equal features.py's single ablations; correlation against numpy."""

import numpy as np
import torch
from helpers import quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.feature_effects import (
    answer_losses,
    feature_ablation_table,
    feature_activations,
    single_feature_ablation_losses,
)
from saecircuits.analysis.ablations.loss_vs_activation import loss_increase_vs_activation, pearson_r


def test_matches_single_ablation_and_table():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task).dense()
    clean = answer_losses(model, task)
    table = feature_ablation_table(model, sae, task, acts=acts, max_candidates=3)
    for k in table["feature"]:
        res = loss_increase_vs_activation(model, sae, task, int(k))
        prompts = torch.nonzero(acts[:, k] > 0).flatten().tolist()
        assert res.table["prompt_index"].tolist() == prompts
        single = (
            single_feature_ablation_losses(model, sae, task, [(i, int(k)) for i in prompts]) - clean[prompts]
        )
        np.testing.assert_allclose(res.table["loss_increase"], single.numpy(), atol=1e-6)
        # recomputed after answer_losses kept the batch's clean pass: read at P from its key/value cache, not by the
        # full forward that gave ``acts``, so equal up to float rounding (it failed at atol=0 from an empty cache)
        np.testing.assert_allclose(res.table["activation"], acts[prompts, k].numpy(), rtol=1e-6, atol=1e-6)
        row = table[table["feature"] == k].iloc[0]
        assert abs(res.loss_increase.mean - row["loss_increase"]) < 1e-6
        if len(prompts) > 2:
            assert (
                abs(res.pearson_r - np.corrcoef(res.table["activation"], res.table["loss_increase"])[0, 1])
                < 1e-9
            )


def test_one_prompt_against_manual_ablation_and_cap():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task).dense()
    k = int(torch.argmax((acts > 0).sum(0)))
    res = loss_increase_vs_activation(model, sae, task, k, max_prompts=2, acts=acts)
    assert len(res.table) == 2
    i = int(res.table["prompt_index"][0])
    toks, ans = torch.tensor([task.token_ids[i]]), task.answer_ids[i]

    def ablate(v, hook=None):
        v = v.clone()
        v[0, -1] = v[0, -1] - sae.encode(v[0, -1])[k] * sae.W_dec[k]
        return v

    with torch.no_grad():
        lc = -model(toks)[0, -1].log_softmax(-1)[ans]
        la = -model.run_with_hooks(toks, fwd_hooks=[(sae.hook_point, ablate)])[0, -1].log_softmax(-1)[ans]
    assert abs(float(la - lc) - float(res.table["loss_increase"][0])) < 1e-5


def test_inactive_feature_gives_empty_table():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = torch.zeros(task.n_prompts, sae.d_sae)
    res = loss_increase_vs_activation(model, sae, task, 3, acts=acts)
    assert len(res.table) == 0 and np.isnan(res.pearson_r) and res.loss_increase.n == 0


def test_pearson_r_needs_three_points():
    """Two points always lie on a line (r = +-1 whatever they are): undefined, not a perfect correlation."""
    assert np.isnan(pearson_r([1.0, 2.0], [5.0, -3.0]))
    assert np.isnan(pearson_r([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))  # zero variance
    # three points, by hand: x = (0, 1, 2), y = (0, 1, 5): cov = 5/3... r = sum(dx dy) / sqrt(sum dx^2 sum dy^2)
    # dx = (-1, 0, 1), dy = (-2, -1, 3): sum dx dy = 5, sum dx^2 = 2, sum dy^2 = 14
    assert abs(pearson_r([0.0, 1.0, 2.0], [0.0, 1.0, 5.0]) - 5 / np.sqrt(2 * 14)) < 1e-12


def test_two_prompts_give_an_undefined_r_shown_with_n():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task).dense()
    k = int(torch.argmax((acts > 0).sum(0)))
    res = loss_increase_vs_activation(model, sae, task, k, max_prompts=2, acts=acts)
    assert len(res.table) == 2 and np.isnan(res.pearson_r)
    assert "Pearson r = undefined, n = 2 prompts" in res.display_title()
