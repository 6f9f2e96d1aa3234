"""The five-way loss comparison at P == exact full-prompt interventions through the bridge, one prompt at a time."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.ablations.loss_comparison import CONDITIONS, loss_comparison
from saecircuits.analysis.ablations.multi_feature import ablate_features
from saecircuits.analysis.quality.reconstruction import mean_activation, reconstruction_at_prediction
from saecircuits.analysis.statistics import mean_ci95


def _loss_with(model, tokens, pos, answer, fn=None):
    """-log p(answer) at pos from one unpadded bridge forward, HOOK[0, pos] replaced by fn(clean value)."""

    def hook(act, hook=None):
        act = act.clone()
        act[0, pos] = fn(act[0, pos].clone())
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=[(HOOK, hook)] if fn else [])
    return float(-torch.log_softmax(logits[0, pos].float(), -1)[answer])


def _encode(sae, h):
    return torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)


@pytest.mark.parametrize("mode", ["residual", "reconstruction"])
def test_five_losses_equal_full_prompt_interventions(mode):
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task).dense()
    feats = torch.argsort((acts > 0).sum(0), descending=True)[:3].tolist()
    mu = mean_activation(model, task.token_ids, HOOK)
    lc = loss_comparison(model, sae, task, feats, mu, mode=mode, max_tokens=100, max_batch=3)
    assert lc.losses.shape == (task.n_prompts, 5)
    for i in range(task.n_prompts):
        t, p, a = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]

        def ablated(h):
            f = _encode(sae, h)
            base = h if mode == "residual" else f @ sae.W_dec + sae.b_dec
            return base - f[feats] @ sae.W_dec[feats]

        want = [
            _loss_with(model, t, p, a),
            _loss_with(model, t, p, a, lambda h: mu),
            _loss_with(model, t, p, a, lambda h: torch.zeros_like(h)),
            _loss_with(model, t, p, a, ablated),
            _loss_with(model, t, p, a, lambda h: _encode(sae, h) @ sae.W_dec + sae.b_dec),
        ]
        assert lc.losses[i].tolist() == pytest.approx(want, abs=1e-5)
    # paired differences and means from the per-prompt losses; every ablation changes something
    for j, c in enumerate(CONDITIONS):
        assert lc.means[c].mean == pytest.approx(float(lc.losses[:, j].mean()), abs=1e-6)
        ref = mean_ci95(lc.losses[:, j] - lc.losses[:, 0])
        assert lc.diffs[c].mean == pytest.approx(ref.mean) and lc.diffs[c].high == pytest.approx(ref.high)
    assert (lc.losses[:, 1:] - lc.losses[:, :1]).abs().amax(0).min() > 1e-3
    assert lc.off_range.n_ablations == task.n_prompts and lc.sae_off_range.n_ablations == task.n_prompts


def test_agrees_with_reconstruction_and_multi_ablation():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    mu = mean_activation(model, task.token_ids, HOOK)
    feats = [3, 7]
    lc = loss_comparison(model, sae, task, feats, mu)
    rec = reconstruction_at_prediction(model, sae, task, mean_act=mu)
    abl = ablate_features(model, sae, task, feats)
    torch.testing.assert_close(lc.losses[:, 0], rec.clean_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(lc.losses[:, 1], rec.mean_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(lc.losses[:, 2], rec.zero_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(lc.losses[:, 4], rec.sae_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(lc.losses[:, 3], torch.tensor(abl.per_prompt["ablated_loss"].to_numpy()),
                               atol=1e-5, rtol=0)


def test_no_features_gives_an_undefined_row_and_bad_input_is_refused():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    mu = torch.zeros(sae.d_in)
    lc = loss_comparison(model, sae, task, [], mu)
    assert torch.isnan(lc.losses[:, 3]).all() and lc.means["features_ablated"].n == 0
    assert lc.off_range.n_ablations == 0
    with pytest.raises(ValueError, match="mean_act"):
        loss_comparison(model, sae, task, [1], torch.zeros(3))
    with pytest.raises(ValueError, match="ablation mode"):
        loss_comparison(model, sae, task, [1], mu, mode="bogus")
    with pytest.raises(ValueError, match="feature indices"):
        loss_comparison(model, sae, task, [sae.d_sae], mu)
