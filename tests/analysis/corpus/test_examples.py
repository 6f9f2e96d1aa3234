"""Streaming top-k activating examples: brute-force agreement, BOS/padding excluded, batch invariance."""

from __future__ import annotations

import torch
from helpers import HOOK, SENTENCES, STORIES, random_sae, tiny_neo

from saecircuits.analysis.corpus.examples import top_activating_examples


def _rows(model):
    return [model.to_tokens(s)[0].tolist() for s in STORIES + SENTENCES]


def test_matches_brute_force_and_excludes_bos():
    model, sae = tiny_neo(), random_sae()
    rows = _rows(model)
    features = list(range(0, sae.d_sae, 7))
    k = 3
    result = top_activating_examples(model, sae, rows, features, k=k, window_before=4, window_after=2)
    dense = []
    with torch.no_grad():
        for r in rows:
            x = model.run_with_cache(torch.tensor([r]))[1][HOOK][0]
            dense.append(torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc))  # [pos, d_sae]
    for f in features:
        doc_max = [(float(d[1:, f].max()), i, int(d[1:, f].argmax()) + 1) for i, d in enumerate(dense)]
        expected = sorted([m for m in doc_max if m[0] > 0], key=lambda m: (-m[0], m[1]))[:k]
        got = result[f]
        assert [e.doc_index for e in got] == [m[1] for m in expected]
        for e, (value, doc, pos) in zip(got, expected, strict=True):
            assert e.max_position == pos and e.max_position > 0  # never the BOS position
            assert abs(e.max_activation - value) < 1e-5
            assert e.window_start == max(0, pos - 4)
            # ASCII stories: every piece is the token decoded alone
            assert e.tokens == [model.tokenizer.decode([t]) for t in rows[doc][e.window_start : pos + 3]]
            ref = dense[doc][e.window_start : pos + 3, f].clone()
            kinds = ["text"] * len(ref)
            if e.window_start == 0:
                ref[0] = float("nan")  # BOS is not data
                kinds[0] = "special"
            assert e.token_kinds == kinds
            torch.testing.assert_close(torch.tensor(e.activations), ref, atol=1e-5, rtol=0, equal_nan=True)


def test_batching_does_not_change_examples():
    model, sae = tiny_neo(), random_sae()
    rows = _rows(model)
    a = top_activating_examples(model, sae, rows, k=4, max_tokens=10_000, max_batch=64)
    b = top_activating_examples(model, sae, rows, k=4, max_tokens=40, max_batch=2)
    assert set(a) == set(range(sae.d_sae))
    assert any(a[f] for f in a)
    for f in a:
        assert [(e.doc_index, e.max_position, e.tokens) for e in a[f]] == [
            (e.doc_index, e.max_position, e.tokens) for e in b[f]
        ]
        for ea, eb in zip(a[f], b[f], strict=True):
            assert abs(ea.max_activation - eb.max_activation) < 1e-5
