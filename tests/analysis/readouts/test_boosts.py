"""Prompt boosts against unbatched manual ablations, weight boosts against the explicit product, common tokens."""

import pytest
import torch
from helpers import quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.readouts.boosts import common_tokens, prompt_logprob_boosts, weight_logit_boosts


def test_common_tokens_counts_without_leading_bos():
    model = tiny_neo()
    rows = [[0, 5, 5, 7], [0, 5, 7, 0], [5, 9]]  # BOS id 0 leads two rows; a later 0 counts
    mask = common_tokens(model, rows, min_count=1)
    assert mask.dtype == torch.bool and mask.shape == (model.cfg.d_vocab,)
    assert set(torch.nonzero(mask).flatten().tolist()) == {5, 7}  # 5: 4x, 7: 2x, 0: 1x (not > 1), 9: 1x
    with_bos = common_tokens(model, rows, 1, exclude_bos=False)
    assert set(torch.nonzero(with_bos).flatten().tolist()) == {0, 5, 7}
    with pytest.raises(ValueError, match="tokenizer"):
        common_tokens(model, [[0, 10**6]])


def _feature(model, sae, task):
    acts = feature_activations(model, sae, task).dense()
    return acts, int(torch.argmax((acts > 0).sum(0)))


def test_prompt_boosts_equal_manual_unbatched():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts, k = _feature(model, sae, task)
    common = torch.ones(model.cfg.d_vocab, dtype=torch.bool)
    common[:40] = False
    res = prompt_logprob_boosts(model, sae, task, k, common_tokens=common, min_logprob=-7.0, top=5)
    prompts = torch.nonzero(acts[:, k] > 0).flatten().tolist()
    assert res.prompt_indices == prompts and prompts
    clean, abl, ans_c, ans_a = [], [], [], []
    for i in prompts:
        toks = torch.tensor([task.token_ids[i]])

        def ablate(v, hook=None):
            v = v.clone()
            x = v[0, -1]
            v[0, -1] = x - sae.encode(x)[k] * sae.W_dec[k]
            return v

        with torch.no_grad():
            lc = model(toks)[0, -1].log_softmax(-1)
            la = model.run_with_hooks(toks, fwd_hooks=[(sae.hook_point, ablate)])[0, -1].log_softmax(-1)
        clean.append(lc)
        abl.append(la)
        ans_c.append(float(lc[task.answer_ids[i]]))
        ans_a.append(float(la[task.answer_ids[i]]))
    clean, abl = torch.stack(clean).mean(0), torch.stack(abl).mean(0)
    torch.testing.assert_close(res.clean_logprob, clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.ablated_logprob, abl, atol=1e-5, rtol=1e-5)
    expected = torch.where((clean < -7.0) | ~common, torch.zeros(()), clean - abl)
    torch.testing.assert_close(res.boosts, expected, atol=1e-5, rtol=0)
    assert res.answer_logprob_clean == pytest.approx(sum(ans_c) / len(ans_c), abs=1e-5)
    assert res.answer_logprob_ablated == pytest.approx(sum(ans_a) / len(ans_a), abs=1e-5)
    assert 0 < len(res.boosted) <= 5 and all(t.value > 0 for t in res.boosted)
    assert all(t.value < 0 for t in res.deboosted)
    assert [t.value for t in res.boosted] == sorted((t.value for t in res.boosted), reverse=True)
    assert res.boosted[0].token_id == int(torch.argmax(expected))
    assert all(common[t.token_id] for t in res.boosted + res.deboosted)
    capped = prompt_logprob_boosts(model, sae, task, k, max_prompts=2, acts=acts)
    assert capped.prompt_indices == prompts[:2]


def test_weight_boosts_equal_explicit_product():
    model, sae = tiny_neo(), random_sae()
    common = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    common[::3] = True
    res = weight_logit_boosts(model, sae, 7, common_tokens=common, top=4)
    explicit = (sae.W_dec[7] @ model.W_out[1] @ model.W_U).detach() * common
    torch.testing.assert_close(res.boosts, explicit, atol=1e-5, rtol=1e-5)
    top_ids = torch.topk(explicit.masked_fill(~common, -1e9), 4).indices.tolist()
    assert [t.token_id for t in res.top] == top_ids
    bottom_ids = torch.topk(explicit.masked_fill(~common, 1e9), 4, largest=False).indices.tolist()
    assert [t.token_id for t in res.bottom] == bottom_ids
    assert res.top[0].token == model.tokenizer.decode([top_ids[0]])
    with pytest.raises(ValueError, match="bool mask"):
        weight_logit_boosts(model, sae, 7, common_tokens=torch.ones(3, dtype=torch.bool))
