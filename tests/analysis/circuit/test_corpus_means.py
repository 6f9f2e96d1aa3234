"""The circuit's corpus means from the corpus statistics pass's sums (no encode of their own) against
:func:`corpus_node_means` over the same rows (its own forward and encode; itself checked against per-document bridge
averages in test_circuit.py), for every kind of node group: embeddings, heads, a whole MLP, an SAE on an MLP, an SAE
on an attention ``hook_z``, a transcoder (input and output hooks differ), and an SAE whose decoder bias depends on
its input (computed the old way, over the rows)."""

from __future__ import annotations

import pytest
import torch
from helpers import STORIES, quote_task, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.circuit import (
    circuit_nodes,
    corpus_mean_hooks,
    corpus_node_means,
    corpus_stats_node_means,
    find_circuit,
)
from saecircuits.analysis.corpus.statistics import corpus_feature_stats
from saecircuits.models.tokens import encode_documents
from saecircuits.saes.base import SAEConfig
from saecircuits.saes.registry import build_sae


def _saes(model, which: str):
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    n_z = int(model.cfg.n_heads) * int(model.cfg.d_head)
    if which == "z_and_transcoder":  # groups: embed, pos_embed, SAE on z0, MLP0, heads 1, transcoder 1
        z = build_sae(SAEConfig("standard", d_in=n_z, d_sae=40, hook_point="blocks.0.attn.hook_z",
                                extra={"reshape_activations": "hook_z"}), seed=1)
        tc = build_sae(SAEConfig("topk", d_in=d_model, d_sae=48, hook_point="blocks.1.ln2.hook_normalized",
                                 hook_point_out="blocks.1.hook_mlp_out", d_out=d_model, apply_b_dec_to_input=False,
                                 extra={"k": 6}), seed=2)
        saes = [z, tc]
    else:  # groups: embed, pos_embed, heads 0, SAE on MLP0, SAE on z1 with an input-dependent bias, MLP1
        mlp = build_sae(SAEConfig("standard", d_in=d_mlp, d_sae=96, hook_point="blocks.0.mlp.hook_post"), seed=3)
        ln = build_sae(SAEConfig("topk", d_in=n_z, d_sae=40, hook_point="blocks.1.attn.hook_z",
                                 extra={"k": 5, "reshape_activations": "hook_z", "skip_connection": True,
                                        "input_normalization": "layer_norm"}), seed=4)
        saes = [mlp, ln]
    for s in saes:  # non-zero decoder biases: the error means depend on them
        with torch.no_grad():
            s.b_dec.copy_(0.1 * torch.randn(s.b_dec.shape, generator=torch.Generator().manual_seed(7)))
    return saes


def _rows(model):
    rows = encode_documents(model.tokenizer, STORIES[:6], max_len=int(model.cfg.n_ctx))
    rows[2] = rows[2][:4] + [model.tokenizer.eos_token_id] + rows[2][4:]  # an inline special id: not counted
    return rows


@pytest.mark.parametrize("which", ["z_and_transcoder", "mlp_and_layer_norm"])
def test_means_from_the_corpus_pass_equal_corpus_node_means(which, monkeypatch):
    import saecircuits.analysis.circuit.faithfulness as faith

    model, task = tiny_neo(), quote_task()
    saes = _saes(model, which)
    _, groups = circuit_nodes(model, saes, [feature_activations(model, s, task) for s in saes])
    rows = _rows(model)
    kinds = {(g.kind, g.sae is not None and g.sae.is_transcoder) for g in groups}
    assert {("whole", False), ("sae", False)} <= kinds
    assert (("sae", True) in kinds) == (which == "z_and_transcoder")
    assert (("heads", False) in kinds)
    want = corpus_node_means(model, rows, groups, max_batch=2)  # independent: its own forward and encode

    hooks = corpus_mean_hooks(model, saes)
    stats = corpus_feature_stats(model, saes, rows, k=2, max_batch=3, mean_hooks=hooks)
    assert set(stats.hook_sums) == set(hooks)
    old_way = []  # the groups computed from the rows again
    real = faith.corpus_node_means
    monkeypatch.setattr(faith, "corpus_node_means", lambda m, r, gs, **kw: old_way.extend(gs) or real(m, r, gs, **kw))
    got = corpus_stats_node_means(model, stats, saes, groups, rows)
    assert [g.hook for g in old_way] == (["blocks.1.attn.hook_z"] if which == "mlp_and_layer_norm" else [])
    assert list(got) == [g.hook for g in groups]
    for g in groups:
        w, v = want[g.hook], got[g.hook]
        for k in (("f", "e") if g.kind == "sae" else (None,)):
            a, b = (v[k], w[k]) if k else (v, w)
            assert a.dtype == torch.float32 and a.shape == b.shape, (g.hook, k)
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=f"{g.hook} {k}")

    # a pass run without the sums: every group the old way (a checkpoint written before they were kept)
    plain = corpus_feature_stats(model, saes, rows, k=2)
    old_way.clear()
    again = corpus_stats_node_means(model, plain, saes, groups, rows)
    sae_sums = [g.hook for g in groups if g.kind == "sae" and not g.sae.is_transcoder and not g.sae.decode_needs_input]
    assert sorted(g.hook for g in old_way) == sorted(set(want) - set(sae_sums))
    for g in groups:
        for k in (("f", "e") if g.kind == "sae" else (None,)):
            a, b = (again[g.hook][k], want[g.hook][k]) if k else (again[g.hook], want[g.hook])
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="token_rows"):
        corpus_stats_node_means(model, plain, saes, groups)
    with pytest.raises(ValueError, match="cover"):
        corpus_stats_node_means(model, stats, saes, groups, rows[:-1])
    with pytest.raises(ValueError, match="not of these SAEs"):
        corpus_stats_node_means(model, stats, saes[::-1], groups, rows)


def test_find_circuit_with_the_corpus_pass_equals_find_circuit_with_the_rows(monkeypatch):
    """The whole circuit with the pass's means == with corpus_rows' own pass (same documents), and no corpus
    document batched (so none read or encoded) when the pass gives every group's means."""
    import saecircuits.models.hooks as hooks

    model, task = tiny_neo(), quote_task()
    saes = _saes(model, "z_and_transcoder")
    rows = _rows(model)
    stats = corpus_feature_stats(model, saes, rows, k=2, mean_hooks=corpus_mean_hooks(model, saes))
    want = find_circuit(model, saes, task, ig_steps=0, sizes=[1, 5], corpus_rows=rows, progress=False)
    batched = []
    real = hooks.row_batches
    monkeypatch.setattr(hooks, "row_batches", lambda r, *a, **kw: batched.append(r is rows) or real(r, *a, **kw))
    got = find_circuit(model, saes, task, ig_steps=0, sizes=[1, 5], corpus_rows=rows, corpus_stats=stats,
                       progress=False)
    assert batched and not any(batched)  # the prompts are batched, no corpus document is
    find_circuit(model, saes, task, ig_steps=0, sizes=[1], corpus_rows=rows, progress=False)
    assert any(batched)  # the spy sees the old way's pass
    assert got.selection["mean_ablation"] == want.selection["mean_ablation"]
    torch.testing.assert_close(got.exact.node_effect, want.exact.node_effect, atol=1e-5, rtol=1e-4)
    for col in ("m_empty", "m_circuit", "m_complement_ablated"):
        assert got.curve[col].tolist() == pytest.approx(want.curve[col].tolist(), abs=1e-5, rel=1e-4)
