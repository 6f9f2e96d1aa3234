"""The three ablation modes (residual, reconstruction, clean effect) in every feature ablation, against exact
full-prompt interventions through the bridge; off-range activations counted against a hand count."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, quote_task, random_sae, tiny_llama, tiny_neo

from saecircuits.analysis.ablations.feature_effects import (
    feature_activations,
    feature_effects,
    single_feature_ablation_losses,
)
from saecircuits.analysis.ablations.loss_vs_activation import loss_increase_vs_activation
from saecircuits.analysis.ablations.modes import ABLATION_MODES, activation_floor, check_mode
from saecircuits.analysis.ablations.multi_feature import ablate_features
from saecircuits.analysis.readouts.boosts import prompt_logprob_boosts


def _encode(sae, h):
    return torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)


def _edited(sae, h, feats, mode):
    """The ablated activation by hand; None = clean, "splice" = the SAE reconstruction."""
    f = _encode(sae, h)
    if feats == "splice":
        return f @ sae.W_dec + sae.b_dec
    base = h if mode == "residual" else f @ sae.W_dec + sae.b_dec
    return base - f[feats] @ sae.W_dec[feats]


def _metrics(model, sae, tokens, pos, answer, feats=None, mode="residual"):
    def hook(act, hook=None):
        act = act.clone()
        act[0, pos] = _edited(sae, act[0, pos].clone(), feats, mode)
        return act

    with torch.no_grad():
        z = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=[(HOOK, hook)] if feats is not None else [])
    lp = torch.log_softmax(z[0, pos].float(), -1)
    return float(-lp[answer]), lp


def _baseline(model, sae, t, p, a, mode):
    return _metrics(model, sae, t, p, a, "splice" if mode == "clean_effect" else None)[0]


@pytest.mark.parametrize("mode", ABLATION_MODES)
def test_single_feature_effects_in_every_mode(mode):
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    eff = feature_effects(model, sae, task, mode=mode, max_tokens=100, max_batch=3)
    assert eff.mode == mode and eff.prompt.numel() > 20
    for j in range(0, eff.prompt.numel(), 7):
        i, k = int(eff.prompt[j]), int(eff.feature[j])
        t, p, a = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]
        base = _baseline(model, sae, t, p, a, mode)
        abl = _metrics(model, sae, t, p, a, [k], mode)[0]
        assert float(eff.loss_increase[j]) == pytest.approx(abl - base, abs=1e-5)
        assert float(eff.baseline_loss[i]) == pytest.approx(base, abs=1e-5)
        assert float(eff.clean_loss[i]) == pytest.approx(_metrics(model, sae, t, p, a)[0], abs=1e-5)
    pairs = [(int(eff.prompt[j]), int(eff.feature[j])) for j in range(5)]
    losses = single_feature_ablation_losses(model, sae, task, pairs, mode=mode)
    for (i, k), got in zip(pairs, losses.tolist(), strict=True):
        t, p, a = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]
        assert got == pytest.approx(_metrics(model, sae, t, p, a, [k], mode)[0], abs=1e-5)


def test_modes_differ_and_reconstruction_equals_residual_plus_error_effect():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    res = {m: feature_effects(model, sae, task, mode=m, features=[3, 8, 20]) for m in ABLATION_MODES}
    assert not torch.allclose(res["residual"].loss_increase, res["reconstruction"].loss_increase)
    # reconstruction and clean_effect edit the same way; only the baseline differs (clean vs spliced)
    shift = (res["clean_effect"].baseline_loss - res["clean_effect"].clean_loss)[res["clean_effect"].prompt]
    torch.testing.assert_close(res["reconstruction"].loss_increase, res["clean_effect"].loss_increase + shift,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ABLATION_MODES)
def test_multi_ablation_and_boosts_in_every_mode(mode):
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    feats = [3, 8, 20]
    abl = ablate_features(model, sae, task, feats, mode=mode)
    assert abl.mode == mode
    for i in range(task.n_prompts):
        t, p, a = task.token_ids[i], task.prediction_pos[i], task.answer_ids[i]
        want = _metrics(model, sae, t, p, a, feats, mode)[0] - _baseline(model, sae, t, p, a, mode)
        assert abl.per_prompt["loss_increase"][i] == pytest.approx(want, abs=1e-5)
    acts = feature_activations(model, sae, task)
    k = int(torch.argmax(acts.count()))
    pb = prompt_logprob_boosts(model, sae, task, k, mode=mode, min_logprob=-1e9, acts=acts)
    base = [-_baseline(model, sae, task.token_ids[i], task.prediction_pos[i], task.answer_ids[i], mode)
            for i in pb.prompt_indices]
    assert pb.answer_logprob_clean == pytest.approx(sum(base) / len(base), abs=1e-5)
    lva = loss_increase_vs_activation(model, sae, task, k, mode=mode, acts=acts)
    eff = feature_effects(model, sae, task, features=[k], mode=mode)
    assert lva.table["loss_increase"].tolist() == pytest.approx(eff.of(k)["loss_increase"].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="computed with mode"):
        loss_increase_vs_activation(model, sae, task, k, mode="residual" if mode != "residual" else "reconstruction",
                                    effects=eff)


def test_off_range_activations_are_counted_by_hand():
    model, task = tiny_neo(), quote_task()
    sae = random_sae()
    with torch.no_grad():
        sae.W_dec.mul_(6.0)  # big decoder vectors: subtracting one drives post-GELU entries below GELU's minimum
    floor = activation_floor(model, HOOK)
    assert floor == pytest.approx(-0.17004, abs=1e-4)  # gelu_new (tanh) minimum
    eff = feature_effects(model, sae, task)
    n_any = n_entries = 0
    depth = 0.0
    with torch.no_grad():
        hs = [model.run_with_cache(torch.tensor([task.token_ids[i]]), names_filter=[HOOK])[1][HOOK][
            0, task.prediction_pos[i]] for i in range(task.n_prompts)]
    for j in range(eff.prompt.numel()):
        i, k = int(eff.prompt[j]), int(eff.feature[j])
        with torch.no_grad():
            e = _edited(sae, hs[i], [k], "residual")
        below = e < floor - 1e-6
        n_any += int(below.any())
        n_entries += int(below.sum())
        depth += float((floor - e[below]).sum())
    off = eff.off_range
    assert off.n_ablations == eff.prompt.numel()
    assert off.n_with_off_range == n_any > 0 and off.n_off_range_entries == n_entries
    assert off.min_value < floor and 0 < off.fraction_with_off_range <= 1
    assert off.mean_depth == pytest.approx(depth / n_entries, rel=1e-4)
    multi = ablate_features(model, sae, task, [3, 8]).off_range
    assert multi.n_ablations == task.n_prompts and multi.n_with_off_range is not None


def test_gated_mlp_has_no_floor_and_counts_are_undefined():
    model = tiny_llama()
    assert activation_floor(model, "blocks.0.mlp.hook_post") is None
    assert activation_floor(tiny_neo(), "blocks.0.hook_resid_pre") is None
    task = quote_task()
    sae = random_sae(d_in=int(model.cfg.d_mlp), hook_point="blocks.1.mlp.hook_post")
    off = ablate_features(model, sae, task, [1, 2]).off_range
    assert off.n_ablations == task.n_prompts and off.n_with_off_range is None and off.fraction_with_off_range is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="residual, reconstruction, clean_effect"):
        check_mode("zero")
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    for fn in (lambda: feature_effects(model, sae, task, mode="zero"),
               lambda: ablate_features(model, sae, task, [1], mode="zero")):
        with pytest.raises(ValueError, match="ablation mode"):
            fn()
