"""``--layers auto`` picks by the exact effect of mean-ablating each MLP layer at P, checked against per-prompt full
forwards with a TransformerLens hook (the notebook's way), not against the engine it runs on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py

from helpers import SENTENCES, quote_task, tiny_llama, tiny_neo  # noqa: E402


@pytest.mark.parametrize("build", [tiny_neo, tiny_llama])
@torch.no_grad()
def test_auto_layer_pick_is_the_argmax_of_the_exact_mean_ablation_effect(build):
    from saecircuits.models.tokens import encode_documents
    from saecircuits.pipeline import auto_layers, mlp_ablation_effects

    model = build()
    task = quote_task(model)
    stat_docs = encode_documents(model.tokenizer, SENTENCES)
    effects = mlp_ablation_effects(model, task, stat_docs)

    bos = model.tokenizer.bos_token_id
    expected = []
    for layer in range(model.cfg.n_layers):
        hook = f"blocks.{layer}.mlp.hook_post"
        # independent mean: one document at a time, every non-BOS position
        acts = []
        for doc in stat_docs:
            _, cache = model.run_with_cache(torch.tensor([doc]), names_filter=[hook])
            keep = torch.tensor([t != bos for t in doc])
            acts.append(cache[hook][0][keep])
        mean = torch.cat(acts).double().mean(0)
        diffs = []
        for ids, answer in zip(task.token_ids, task.answer_ids, strict=True):
            tokens = torch.tensor([ids])
            p = len(ids) - 1

            def at_p(value, hook=None, p=p, mean=mean):
                value = value.clone()
                value[0, p] = mean.to(value.dtype)
                return value

            clean = torch.log_softmax(model(tokens)[0, p].double(), -1)[answer]
            ablated = torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[(hook, at_p)])[0, p].double(), -1)
            diffs.append(float(clean - ablated[answer]))  # loss increase = logprob drop
        expected.append(sum(diffs) / len(diffs))

    got = [e.mean for e in effects]
    assert got == pytest.approx(expected, abs=2e-4)
    best = max(range(len(expected)), key=lambda i: expected[i])
    assert auto_layers(got, 1)[0] == [best]
    assert auto_layers(got, 2)[0] == sorted(sorted(range(len(expected)), key=lambda i: -expected[i])[:2])
