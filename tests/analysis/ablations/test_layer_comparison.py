"""Layer-0 vs layer-1 feature ablation at P == exact full-prompt interventions, alone and together."""

from __future__ import annotations

import pytest
import torch
from helpers import quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.layer_comparison import compare_layer_ablations
from saecircuits.analysis.ablations.multi_feature import ablate_features

H0, H1 = "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"


def _manual(model, tokens, pos, answer, edits):
    """-log p(answer): for each (hook, sae, features) ablate residual-preservingly at pos from the incoming value."""

    def make(sae, feats):
        def hook(act, hook=None):
            act = act.clone()
            h = act[0, pos].clone()
            f = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)
            act[0, pos] = h - f[feats] @ sae.W_dec[feats]
            return act

        return hook

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=[(h, make(s, f)) for h, s, f in edits])
    return float(-torch.log_softmax(logits[0, pos].float(), -1)[answer])


def test_alone_and_together_equal_manual_interventions():
    model, task = tiny_neo(), quote_task()
    s0, s1 = random_sae(hook_point=H0, seed=1), random_sae(hook_point=H1, seed=2)
    f0, f1 = [1, 4, 9, 30, 31, 50], [2, 5, 7]
    lc = compare_layer_ablations(model, [s0, s1], [f0, f1], task, max_tokens=100, max_batch=3)
    assert lc.labels == [H0, H1, "all together"]
    for i in range(task.n_prompts):
        t, p, a = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]
        clean = _manual(model, t, p, a, [])
        want = [_manual(model, t, p, a, e) - clean
                for e in ([(H0, s0, f0)], [(H1, s1, f1)], [(H0, s0, f0), (H1, s1, f1)])]
        assert lc.loss_increase[i].tolist() == pytest.approx(want, abs=1e-5)
    alone = ablate_features(model, s1, task, f1).per_prompt["loss_increase"].to_numpy()
    assert lc.loss_increase[:, 1].tolist() == pytest.approx(alone.tolist(), abs=1e-5)
    d = lc.paired[(0, 1)]
    assert d.mean == pytest.approx(float((lc.loss_increase[:, 0] - lc.loss_increase[:, 1]).mean()), abs=1e-6)
    assert lc.loss_increase.abs().max() > 1e-3
    # together - (alone 0 + alone 1), per prompt, from the manual interventions' columns
    inter = [row[2] - row[0] - row[1] for row in lc.loss_increase.double().tolist()]
    assert lc.interaction.mean == pytest.approx(sum(inter) / len(inter), abs=1e-9)
    assert lc.interaction.n == task.n_prompts


def test_bad_input_is_refused():
    model, task = tiny_neo(), quote_task()
    s0 = random_sae(hook_point=H0)
    with pytest.raises(ValueError, match="one non-empty feature set"):
        compare_layer_ablations(model, [s0], [], task)
    with pytest.raises(ValueError, match="non-empty list"):
        compare_layer_ablations(model, [s0], [[]], task)
    with pytest.raises(ValueError, match="two SAEs on one hook"):
        compare_layer_ablations(model, [s0, s0], [[1], [2]], task)
