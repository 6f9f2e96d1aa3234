"""The SAE-error DLA against exact identities and an unbatched recomputation from hook_mlp_out."""

import pytest
import torch
from helpers import HOOK, exact_sae, quote_task, random_sae, tiny_llama, tiny_neo, zero_sae

from saecircuits.analysis.readouts.error_dla import mlp_post_layer, sae_error_dla


def _manual_mlp_dla(model, task):
    """DLA of hook_mlp_out - b_out at P, one prompt per forward (independent of the batched W_out path)."""
    out = []
    try:
        b_out = model.b_out[1]
    except AttributeError:
        b_out = torch.zeros(model.cfg.d_model)
    for toks, ans in zip(task.token_ids, task.answer_ids, strict=True):
        _, cache = model.run_with_cache(torch.tensor([toks]))
        v = cache["blocks.1.hook_mlp_out"][0, -1] - b_out
        if str(model.cfg.normalization_type).startswith("LN"):
            v = v - v.mean()
        out.append(float((v / cache["ln_final.hook_scale"][0, -1, 0] @ model.W_U[:, ans]).detach()))
    return torch.tensor(out)


@pytest.mark.parametrize("make", [tiny_neo, tiny_llama])
def test_identity_and_mlp_row(make):
    model = make()
    task = quote_task(model)
    d_mlp = model.cfg.d_mlp
    res = sae_error_dla(model, random_sae(d_in=d_mlp), task)
    assert res.labels == ["MLP", "reconstruction", "error"]
    assert res.per_prompt.shape == (task.n_prompts, 3)
    assert res.max_identity_error < 1e-5
    torch.testing.assert_close(res.per_prompt[:, 0], _manual_mlp_dla(model, task), atol=1e-5, rtol=1e-5)
    assert res.per_prompt[:, 2].abs().max() > 1e-3  # a random SAE leaves a visible error


def test_exact_and_zero_saes():
    model = tiny_neo()
    task = quote_task(model)
    exact = sae_error_dla(model, exact_sae(), task)
    assert exact.per_prompt[:, 2].abs().max() < 1e-5
    torch.testing.assert_close(exact.per_prompt[:, 1], exact.per_prompt[:, 0], atol=1e-5, rtol=0)
    zero = sae_error_dla(model, zero_sae(), task)
    assert zero.per_prompt[:, 1].abs().max() == 0
    torch.testing.assert_close(zero.per_prompt[:, 2], zero.per_prompt[:, 0], atol=1e-6, rtol=0)


def test_batched_equals_per_prompt():
    model = tiny_neo()
    task = quote_task(model)
    sae = random_sae()
    full = sae_error_dla(model, sae, task)
    single = torch.cat(
        [sae_error_dla(model, sae, task.subset([i])).per_prompt for i in range(task.n_prompts)]
    )
    torch.testing.assert_close(full.per_prompt, single, atol=1e-5, rtol=1e-5)


def test_bad_hook_point():
    assert mlp_post_layer(HOOK) == 1
    with pytest.raises(ValueError, match="blocks.L.mlp.hook_post"):
        sae_error_dla(tiny_neo(), random_sae(d_in=32, hook_point="blocks.1.hook_resid_post"), quote_task())
