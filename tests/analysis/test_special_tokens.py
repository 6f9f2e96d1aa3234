"""Special tokens in corpus rows (issue 7 item 3): every BOS/EOS/PAD position is left out of every statistic over
corpus tokens, wherever it sits in a row, and rows longer than the context are refused (item 6).

The rows here hold BOS in the middle, as the issue's corpus gave before the fix (``Tom ran. <|endoftext|> Sue sat.``
encoded with special tokens matched) and as packed SAE-training rows hold story-boundary BOS. Expected values are
computed here from one unbatched forward pass per row with the special positions dropped by hand.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, tiny_neo, tiny_tokenizer

from saecircuits.analysis.corpus.examples import top_activating_examples
from saecircuits.analysis.quality.reconstruction import mean_activation
from saecircuits.analysis.readouts.boosts import common_tokens
from saecircuits.analysis.readouts.dfa import mean_mlp_in_contributions
from saecircuits.data.activations import ActivationDataError, model_activation_chunks
from saecircuits.data.corpus import read_documents
from saecircuits.models.tokens import ContextLengthError, encode_documents
from saecircuits.saes.base import SAE, SAEConfig

CORPUS = "Spot ran home.\n<|endoftext|>\nTom ran. <|endoftext|> Sue sat. <|endoftext|> The end.\n"


def _rows_with_inline_bos():
    """The issue's second story as it was encoded before the fix: BOS at 0 and at both inline separators."""
    tok = tiny_tokenizer()
    bos = tok.bos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [
        [bos, *enc("Spot ran home.")],
        [bos, *enc("Tom ran. "), bos, *enc(" Sue sat. "), bos, *enc(" The end.")],
        [bos, *enc('Mom said, "Go to bed." '), bos, *enc("He went to bed.")],
    ]
    return rows, bos


def _acts(model, row):
    with torch.no_grad():
        return model.run_with_cache(torch.tensor([row]))[1][HOOK][0]  # [pos, d_mlp]


def test_corpus_separator_lines_split_and_inline_separators_stay_text(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS, encoding="utf-8")
    docs = read_documents(path)
    assert docs == ["Spot ran home.", "Tom ran. <|endoftext|> Sue sat. <|endoftext|> The end."]
    tok = tiny_tokenizer()
    for row in encode_documents(tok, docs):
        assert row[0] == tok.bos_token_id and tok.bos_token_id not in row[1:]


def test_top_examples_never_at_a_special_position():
    model = tiny_neo()
    rows, bos = _rows_with_inline_bos()
    mid_bos = next(p for p in range(1, len(rows[1])) if rows[1][p] == bos)
    x_bos = _acts(model, rows[1])[mid_bos]
    # feature 0 reads the activation of the inline BOS, feature 1 its negative: feature 0 is largest at BOS
    sae = SAE(SAEConfig("standard", d_in=x_bos.numel(), d_sae=2, hook_point=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.stack([x_bos, -x_bos], 1) / x_bos.norm())
        sae.W_dec.copy_(torch.stack([x_bos, -x_bos], 0) / x_bos.norm())
    with torch.no_grad():
        dense = [torch.relu(_acts(model, r) @ sae.W_enc) for r in rows]
    special = [torch.tensor(r) == bos for r in rows]
    unmasked = max(((float(d[p, 0]), i, p) for i, d in enumerate(dense) for p in range(len(d))))
    # without the mask the top example would be an inline BOS (not index 0, which was always skipped)
    assert rows[unmasked[1]][unmasked[2]] == bos and unmasked[2] > 0
    expected = sorted(
        ((float(d[:, 0].masked_fill(s, -1e9).max()), i, int(d[:, 0].masked_fill(s, -1e9).argmax()))
         for i, (d, s) in enumerate(zip(dense, special, strict=True))),
        key=lambda m: (-m[0], m[1]),
    )
    (got,) = [top_activating_examples(model, sae, rows, [0], k=3, window_before=30, window_after=30)[0]]
    assert [(e.doc_index, e.max_position) for e in got] == [(i, p) for v, i, p in expected if v > 0]
    for e in got:
        row = rows[e.doc_index]
        assert row[e.max_position] != bos
        assert abs(e.max_activation - float(dense[e.doc_index][e.max_position, 0])) < 1e-5
        kinds = ["special" if t == bos else "text" for t in row[e.window_start : e.window_start + len(e.tokens)]]
        assert e.token_kinds == kinds
        is_special = torch.tensor([k == "special" for k in kinds])
        assert is_special.any() and torch.tensor(e.activations)[is_special].isnan().all()  # not data: NaN


def test_mean_activation_leaves_out_every_special_position():
    model = tiny_neo()
    rows, bos = _rows_with_inline_bos()
    kept = torch.cat([_acts(model, r)[torch.tensor(r) != bos] for r in rows])
    everything = torch.cat([_acts(model, r) for r in rows])
    got = mean_activation(model, rows, HOOK, max_tokens=40, max_batch=2)
    torch.testing.assert_close(got, kept.mean(0), atol=1e-5, rtol=1e-5)
    assert (kept.mean(0) - everything.mean(0)).abs().max() > 1e-3  # the inline BOS would have moved the mean
    torch.testing.assert_close(mean_activation(model, rows, HOOK, exclude_bos=False), everything.mean(0),
                               atol=1e-5, rtol=1e-5)


def test_common_tokens_do_not_count_special_tokens():
    model = tiny_neo()
    rows = [[0, 5, 0, 6, 0], [0, 5, 7]]  # 0 = <|endoftext|> (BOS = EOS = PAD) five times, 5 twice, 6 and 7 once
    common = common_tokens(model, rows, min_count=1)
    assert torch.nonzero(common).flatten().tolist() == [5]
    assert torch.nonzero(common_tokens(model, rows, min_count=1, exclude_bos=False)).flatten().tolist() == [0, 5]


def test_dfa_mean_contributions_leave_out_every_special_position():
    model = tiny_neo()
    rows, bos = _rows_with_inline_bos()
    mc = mean_mlp_in_contributions(model, 1, rows)
    pres = []
    for r in rows:
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([r]))
        pres.append((cache["blocks.1.mlp.hook_pre"][0] - model.b_in[1])[torch.tensor(r) != bos])
    torch.testing.assert_close(mc.sum(0), torch.cat(pres).mean(0), atol=1e-4, rtol=1e-4)


def test_sae_training_activations_drop_every_special_position():
    model = tiny_neo()
    rows, bos = _rows_with_inline_bos()
    width = min(len(r) for r in rows)
    tokens = torch.tensor([r[:width] for r in rows])
    tokens[0, 3] = bos  # a story-boundary BOS inside a packed row
    (chunk,) = list(model_activation_chunks(model, tokens, [HOOK], bos_id={bos}, bos_policy="exclude"))
    keep = tokens != bos
    with torch.no_grad():
        expected = model.run_with_cache(tokens)[1][HOOK][keep]
    assert chunk[HOOK].shape[0] == int(keep.sum()) < tokens.numel()
    torch.testing.assert_close(chunk[HOOK], expected, atol=1e-5, rtol=1e-5)


def test_rows_longer_than_the_context_are_refused():
    model = tiny_neo()
    n_ctx = model.cfg.n_ctx
    long_row = [0] + [5] * n_ctx
    with pytest.raises(ContextLengthError, match=f"longer than the model's context of {n_ctx} tokens"):
        mean_activation(model, [[0, 5], long_row], HOOK)
    with pytest.raises(ContextLengthError, match=f"max_len={n_ctx}"):
        top_activating_examples(model, SAE(SAEConfig("standard", d_in=64, d_sae=4, hook_point=HOOK)), [long_row])
    with pytest.raises(ContextLengthError):
        mean_mlp_in_contributions(model, 1, [long_row])
    with pytest.raises(ActivationDataError, match=f"pack them with seq_len <= {n_ctx}"):
        next(model_activation_chunks(model, torch.tensor([long_row]), [HOOK]))
