"""Attributions mean the same under every weight-processing switch (fold_ln, center_writing_weights, center_unembed).

The model is loaded from the same Hugging Face weights with each combination of switches. Right values, computed
independently of the analyses: the model's own logits (components + readout constant = answer logit, within 1e-4),
and the processed-load numbers themselves (a logit difference's per-component DLA, weight-based boosts up to a
per-feature constant, DFA completeness, the SAE-error identity) which must not move with the switches.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import HF_BUILDERS, quote_task, random_sae, tiny_tokenizer

from saecircuits.analysis.readouts.boosts import weight_logit_boosts
from saecircuits.analysis.readouts.dfa import direct_feature_attribution
from saecircuits.analysis.readouts.dla import direct_logit_attribution
from saecircuits.analysis.readouts.error_dla import sae_error_dla
from saecircuits.analysis.readouts.scaled_dla import activation_scaled_dla
from saecircuits.models.load import load_hf_model
from saecircuits.tasks.base import Task

COMBOS = list(itertools.product([True, False], repeat=3))


def _load(arch: str, combo) -> object:
    fold_ln, cww, cu = combo
    return load_hf_model(HF_BUILDERS[arch](seed=4), tiny_tokenizer(), fold_ln=fold_ln,
                         center_writing_weights=cww, center_unembed=cu)


def _foil_task(task: Task, foil: int) -> Task:
    return Task(task.name, task.prompts, task.token_ids, [foil] * task.n_prompts, task.source_index)


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_dla_is_complete_and_logit_difference_dla_is_the_same_under_every_switch(arch):
    task = quote_task()
    foil = _foil_task(task, 5)
    ref_diff = None
    for combo in COMBOS:
        model = _load(arch, combo)
        dla = direct_logit_attribution(model, task)
        dla_foil = direct_logit_attribution(model, foil)
        # completeness against the model's own answer logit; the constant (b_U and the final norm's bias read out
        # through W_U) is computed here from the weights
        assert dla.max_abs_error < 1e-4, (combo, dla.max_abs_error)
        W_U, b_U = model.W_U.detach(), model.b_U.detach()
        comp = model.ln_final.original_component
        bias = getattr(comp, "bias", None) if not model.ln_final.uses_rms_norm else None
        with torch.no_grad():
            for i in range(task.n_prompts):
                logits = model(torch.tensor([task.token_ids[i]]))[0, -1]
                a = task.answer_ids[i]
                const = float(b_U[a]) + (float(bias.detach() @ W_U[:, a]) if bias is not None else 0.0)
                assert float(dla.per_prompt[i].sum()) + const == pytest.approx(float(logits[a]), abs=1e-4)
        per_component = dla.per_prompt - dla_foil.per_prompt  # [n, components], logits
        if ref_diff is None:
            ref_diff = per_component
        else:
            torch.testing.assert_close(per_component, ref_diff, atol=1e-4, rtol=0, msg=str(combo))


def test_weight_boosts_rank_the_same_under_every_switch():
    hook = "blocks.1.mlp.hook_post"
    sae = random_sae(hook_point=hook)
    ref = None
    for combo in COMBOS:
        model = _load("gpt_neo", combo)
        b = weight_logit_boosts(model, sae, 7).boosts
        b = b - b.mean()  # center_unembed shifts every token's value by one constant per feature
        if ref is None:
            ref = b
        else:
            torch.testing.assert_close(b, ref, atol=1e-4, rtol=0, msg=str(combo))
            assert torch.equal(torch.argsort(b, descending=True)[:10], torch.argsort(ref, descending=True)[:10])


def test_error_dla_scaled_dla_and_dfa_do_not_move_with_the_switches():
    task = quote_task()
    hook = "blocks.1.mlp.hook_post"
    sae = random_sae(hook_point=hook)
    foil = _foil_task(task, 5)
    refs = None
    for combo in COMBOS:
        model = _load("gpt_neo", combo)
        err = sae_error_dla(model, sae, task).per_prompt - sae_error_dla(model, sae, foil).per_prompt
        sc = activation_scaled_dla(model, sae, task).scaled_ln - activation_scaled_dla(model, sae, foil).scaled_ln
        dfa = direct_feature_attribution(model, sae, task, 3)
        assert dfa.max_completeness_error < 1e-4, combo
        values = (err, sc, dfa.per_prompt)
        if refs is None:
            refs = values
        else:
            for got, want in zip(values, refs, strict=True):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=str(combo))


def test_virtual_weights_do_not_move_with_the_switches():
    """Virtual weights apply block b's ln2 explicitly; on the processed load they are the notebook's hand formula
    ``W_dec W_out W_in W_enc`` (ln2's weight folded into W_in, W_out centred), under every other switch the same."""
    from saecircuits.analysis.circuit import virtual_weights

    up, down = random_sae(hook_point="blocks.0.mlp.hook_post", seed=1), random_sae(hook_point="blocks.1.mlp.hook_post",
                                                                                  seed=2)
    ups, downs = [3, 7, 11, 20], [5, 9, 40]
    ref = None
    for combo in COMBOS:
        model = _load("gpt_neo", combo)
        vw = virtual_weights(model, up, down, ups, downs)
        got = torch.tensor(vw["raw"]).double(), torch.tensor(vw["cosine"]).double()
        if combo == (True, True, True):  # the processed load: the hand formula, computed here
            write = up.W_dec[ups].double() @ model.W_out[0].detach().double()
            read = model.W_in[1].detach().double() @ down.W_enc[:, downs].double()
            cos = (write / write.norm(dim=1, keepdim=True)) @ (read / read.norm(dim=0, keepdim=True))
            torch.testing.assert_close(got[0], write @ read, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(got[1], cos, atol=1e-5, rtol=0)
            ref = got
    for combo in COMBOS:
        model = _load("gpt_neo", combo)
        vw = virtual_weights(model, up, down, ups, downs)
        torch.testing.assert_close(torch.tensor(vw["raw"]).double(), ref[0], atol=1e-4, rtol=1e-5, msg=str(combo))
        torch.testing.assert_close(torch.tensor(vw["cosine"]).double(), ref[1], atol=1e-5, rtol=0, msg=str(combo))


def test_feature_selection_and_circuit_top_tokens_do_not_move_with_the_switches():
    """``--feature-selection N`` ranks by |activation x DLA| through the final norm: the same features under
    fold_ln and center_writing_weights (center_unembed moves one answer logit's DLA by a per-feature constant, so
    it is compared within each center_unembed setting); a feature node's promoted tokens are the same under all."""
    from saecircuits.analysis.ablations.feature_effects import feature_effects
    from saecircuits.analysis.circuit import Node, _top_tokens

    task = quote_task()
    hook = "blocks.1.mlp.hook_post"
    sae = random_sae(hook_point=hook)
    nodes = [Node("feature", 1, k, 0, hook) for k in range(0, 96, 7)]
    refs: dict[bool, tuple] = {}
    ref_tokens = None
    for combo in COMBOS:
        model = _load("gpt_neo", combo)
        eff = feature_effects(model, sae, task, features=3)
        pairs = sorted(zip(eff.prompt.tolist(), eff.feature.tolist(), strict=True))
        assert len(pairs) == 3 * task.n_prompts
        if combo[2] not in refs:
            refs[combo[2]] = pairs
        else:
            assert pairs == refs[combo[2]], combo
        tokens = _top_tokens(model, [sae], nodes)
        if ref_tokens is None:
            ref_tokens = tokens
        else:
            assert tokens == ref_tokens, combo
