"""Activation-scaled DLA against the explicit product and against the error DLA's reconstruction row."""

import torch
from helpers import quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.readouts.error_dla import sae_error_dla
from saecircuits.analysis.readouts.scaled_dla import activation_scaled_dla


def test_single_answer_product():
    model, sae = tiny_neo(), random_sae()
    task = quote_task()
    answer = max(set(task.answer_ids), key=task.answer_ids.count)
    sub = task.subset([i for i, a in enumerate(task.answer_ids) if a == answer])
    res = activation_scaled_dla(model, sae, sub)
    g = (sae.W_dec @ model.W_out[1] @ model.W_U[:, answer]).detach()
    a = feature_activations(model, sae, sub).dense().mean(0)
    torch.testing.assert_close(res.dla_per_unit, g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.mean_activation, a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res.scaled, a * g, atol=1e-6, rtol=1e-5)
    assert res.top(3) == torch.argsort(a * g, descending=True)[:3].tolist()


def test_ln_scaled_sums_to_reconstruction_dla_minus_b_dec():
    model, sae = tiny_neo(), random_sae()
    task = quote_task()  # several different answers
    res = activation_scaled_dla(model, sae, task)
    rec = sae_error_dla(model, sae, task).per_prompt[:, 1]
    b_dec_terms = []
    for toks, ans in zip(task.token_ids, task.answer_ids, strict=True):
        _, cache = model.run_with_cache(torch.tensor([toks]))
        v = sae.b_dec @ model.W_out[1]
        v = v - v.mean()
        b_dec_terms.append(float((v / cache["ln_final.hook_scale"][0, -1, 0] @ model.W_U[:, ans]).detach()))
    expected = float(rec.mean()) - sum(b_dec_terms) / len(b_dec_terms)
    assert abs(float(res.scaled_ln.double().sum()) - expected) < 1e-4
    # without the norm: per-prompt answers, mean_i f_ik G[k, a_i]
    f = feature_activations(model, sae, task).dense()
    G = (sae.W_dec @ model.W_out[1] @ model.W_U[:, task.answer_ids]).detach()  # [d_sae, n]
    torch.testing.assert_close(res.scaled, (f.T * G).mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.dla_per_unit, G.mean(1), atol=1e-6, rtol=1e-5)
