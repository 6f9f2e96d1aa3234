"""DFA by hand on a tiny input, completeness of the linearised variant, sums against the cached ln2 output."""

import pytest
import torch
from helpers import quote_task, random_sae, tiny_llama, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.readouts.dfa import (
    _ACTS,
    LINEAR_EXTRA_LABELS,
    activation_derivative,
    dfa_component_labels,
    dfa_from_components,
    direct_feature_attribution,
    mean_mlp_in_contributions,
)


def _active_features(model, sae, task, n=3):
    acts = feature_activations(model, sae, task).dense()
    return acts, [int(k) for k in torch.argsort((acts > 0).sum(0), descending=True)[:n]]


def test_hand_worked_identity_gelu():
    normed = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # b=1, C=2, d_model=2
    W_in = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])  # M_0 = [1, 2, 0], M_1 = [0, 2, 2]
    post = torch.tensor([[0.5, -0.1, 0.3]])  # neuron 1 inactive
    w = torch.tensor([1.0, 10.0, 100.0])
    zero = dfa_from_components(normed, W_in, post, w, inactive="zero")
    assert zero.tolist() == [[1.0, 200.0]]
    mean = dfa_from_components(
        normed, W_in, post, w, inactive="mean", mean_contrib=torch.tensor([[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]])
    )
    assert mean.tolist() == [[61.0, 290.0]]
    with pytest.raises(ValueError, match="mean_contrib"):
        dfa_from_components(normed, W_in, post, w, inactive="mean")


def test_activation_derivative_matches_finite_difference():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    eps = 1e-6
    for name in ("gelu_new", "gelu", "silu"):
        fd = (_ACTS[name](x + eps) - _ACTS[name](x - eps)) / (2 * eps)
        torch.testing.assert_close(activation_derivative(name, x), fd, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="unsupported"):
        activation_derivative("swish42", x)


def test_completeness_and_sum_against_cache():
    model = tiny_neo()
    task = quote_task(model)
    sae = random_sae()
    acts, feats = _active_features(model, sae, task)
    W_in, b_in = model.W_in[1], model.b_in[1]
    for k in feats:
        res = direct_feature_attribution(model, sae, task, k, acts=acts)
        assert res.labels == dfa_component_labels(model, 1)
        assert res.linear_labels[-4:] == LINEAR_EXTRA_LABELS
        assert len(res.prompt_indices) == int((acts[:, k] > 0).sum()) > 0
        assert res.max_completeness_error < 1e-4
        torch.testing.assert_close(
            res.hidden_pre, acts[res.prompt_indices, k], atol=1e-5, rtol=0
        )  # ReLU SAE, active
        assert res.tangent_error.max() > 1e-3  # the curvature row is needed (GELU is not linear)
        # independent: the components sum to ln2's normalised output at P (fold_ln), so the zero-variant DFA sums
        # to ((ln2_out @ W_in) * active) @ W_enc[:, k], read unbatched from the cache
        for row, i in enumerate(res.prompt_indices):
            _, cache = model.run_with_cache(torch.tensor([task.token_ids[i]]))
            normed = cache["blocks.1.ln2.hook_normalized"][0, -1]
            post = cache["blocks.1.mlp.hook_post"][0, -1]
            torch.testing.assert_close(
                normed @ W_in + b_in, cache["blocks.1.mlp.hook_pre"][0, -1], atol=1e-4, rtol=0
            )
            expected = (((normed @ W_in) * (post > 0)) @ sae.W_enc[:, k]).detach()
            assert abs(float(res.per_prompt[row].sum()) - float(expected)) < 1e-4


def test_batched_equals_per_prompt_and_mean_variant():
    model = tiny_neo()
    task = quote_task(model)
    sae = random_sae()
    acts, feats = _active_features(model, sae, task, n=1)
    k = feats[0]
    mc = mean_mlp_in_contributions(model, 1, task.token_ids)
    full = direct_feature_attribution(model, sae, task, k, inactive="mean", mean_contrib=mc, acts=acts)
    for row, i in enumerate(full.prompt_indices):
        single = direct_feature_attribution(model, sae, task.subset([i]), k, inactive="mean", mean_contrib=mc)
        torch.testing.assert_close(single.per_prompt[0], full.per_prompt[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            single.linear_per_prompt[0], full.linear_per_prompt[row], atol=1e-5, rtol=1e-5
        )
    capped = direct_feature_attribution(model, sae, task, k, max_prompts=2, acts=acts)
    assert capped.prompt_indices == full.prompt_indices[:2]


def test_mean_contributions_sum_to_mean_pre_activation():
    model = tiny_neo()
    rows = quote_task(model).token_ids
    mc = mean_mlp_in_contributions(model, 1, rows)
    pres = []
    for toks in rows:
        _, cache = model.run_with_cache(torch.tensor([toks]))
        pres.append(cache["blocks.1.mlp.hook_pre"][0, 1:] - model.b_in[1])  # BOS excluded
    torch.testing.assert_close(mc.sum(0), torch.cat(pres).mean(0), atol=1e-4, rtol=1e-4)


def test_refusals():
    llama = tiny_llama()
    with pytest.raises(ValueError, match="gated"):
        direct_feature_attribution(llama, random_sae(d_in=48), quote_task(), 0)
    model = tiny_neo()
    with pytest.raises(IndexError):
        direct_feature_attribution(model, random_sae(), quote_task(), 10_000)
    with pytest.raises(ValueError, match="inactive"):
        direct_feature_attribution(model, random_sae(), quote_task(), 0, inactive="median")
