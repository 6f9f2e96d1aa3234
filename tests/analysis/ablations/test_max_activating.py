"""Ablation on max-activating stories == single-story bridge forwards with the feature ablated by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import random_sae, tiny_neo, token_rows

from saecircuits.analysis.ablations import max_activating
from saecircuits.analysis.ablations.max_activating import max_activating_ablation
from saecircuits.analysis.corpus.statistics import corpus_feature_stats
from saecircuits.models.interventions import interventions_for

HOOK = "blocks.0.mlp.hook_post"  # an edit at layer 0 still has a whole layer after it


def _setup():
    model = tiny_neo()
    sae = random_sae(hook_point=HOOK, seed=4)
    rows = token_rows([30, 12, 25, 40, 9, 18], seed=11, vocab=40)
    rows[3][5] = 0  # a special token inside a story: never ablated, never picked
    return model, sae, rows


def _encode(sae, h):
    return torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)


def _story_losses(model, sae, row, k, positions, mode):
    """Per-token next-token losses of one unpadded story with k ablated (by hand) at ``positions``."""

    def hook(act, hook=None):
        act = act.clone()
        for p in positions:
            h = act[0, p].clone()
            f = _encode(sae, h)
            base = h if mode == "residual" else f @ sae.W_dec + sae.b_dec
            act[0, p] = base - f[k] * sae.W_dec[k]
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([row]), fwd_hooks=[(HOOK, hook)] if positions else [])[0]
    lp = torch.log_softmax(logits[:-1].float(), -1)
    return -lp.gather(1, torch.tensor(row[1:])[:, None])[:, 0]


def _acts(model, sae, row, k):
    with torch.no_grad():
        h = model.run_with_cache(torch.tensor([row]), names_filter=[HOOK])[1][HOOK][0]
        return _encode(sae, h)[:, k] * torch.tensor([t != 0 for t in row])


@pytest.mark.parametrize("mode", ["residual", "reconstruction"])
def test_global_and_per_position_equal_single_story_interventions(mode):
    model, sae, rows = _setup()
    stats = corpus_feature_stats(model, [sae], rows, k=4)[0]
    k = int(torch.argmax((stats.fire_count > 0) * stats.top_value[:, 3]))  # fires in at least 4 stories
    docs = [d for d, _, _ in stats.top_examples(k)]
    assert len(docs) == 4
    res = max_activating_ablation(model, sae, k, rows, docs, corpus_max=float(stats.max_activation[k]), mode=mode,
                                  max_tokens=60, max_batch=2)
    assert res.threshold == pytest.approx(0.1 * float(stats.max_activation[k]))
    assert list(res.stories["doc"]) == docs
    n_pairs = 0
    for j, d in enumerate(docs):
        row = rows[d]
        counted = [p for p in range(len(row)) if row[p] != 0]
        clean = _story_losses(model, sae, row, k, [], mode)
        glob = _story_losses(model, sae, row, k, counted, mode)
        srow = res.stories.iloc[j]
        assert srow["clean_loss"] == pytest.approx(float(clean.mean()), abs=1e-5)
        assert srow["ablated_loss"] == pytest.approx(float(glob.mean()), abs=1e-5)
        pt = res.per_token[j]
        assert pt["doc"] == d and pt["tokens"] == row
        assert pt["loss_change"][1:] == pytest.approx((glob - clean).tolist(), abs=1e-5)
        acts = _acts(model, sae, row, k)
        assert pt["activation"] == pytest.approx(acts.tolist(), abs=1e-5)
        picked = [p for p in range(len(row) - 1) if acts[p] > res.threshold]
        got = res.positions[res.positions["doc"] == d]
        assert list(got["position"]) == picked
        for p, r in zip(picked, got.itertuples(), strict=True):
            one = _story_losses(model, sae, row, k, [p], mode)
            assert r.clean_loss == pytest.approx(float(clean[p]), abs=1e-5)
            assert r.ablated_loss == pytest.approx(float(one[p]), abs=1e-5)
            assert r.activation == pytest.approx(float(acts[p]), abs=1e-5)
        n_pairs += len(picked)
    assert n_pairs == len(res.positions) > 3
    assert res.position_increase.n == n_pairs and res.global_increase.n == len(docs)
    assert res.positions["loss_increase"].abs().max() > 1e-4
    assert res.off_range.n_ablations > n_pairs


def test_story_activations_read_in_the_global_pass_equal_a_pass_of_their_own():
    """Without a threshold or corpus maximum the stories' activations get a pass of their own (the threshold is 0.1
    of their maximum); with the same maximum given they are read in the global ablation pass: both equal the
    activations encoded by hand, so the threshold, the per-token activations and the picked positions agree."""
    model, sae, rows = _setup()
    k, docs = 5, [3, 0, 2]
    own = max_activating_ablation(model, sae, k, rows, docs, max_tokens=60, max_batch=2)
    acts = [_acts(model, sae, rows[d], k) for d in docs]
    top = max(float(a.max()) for a in acts)
    assert top > 0 and own.threshold == pytest.approx(0.1 * top, rel=1e-5)
    read = max_activating_ablation(model, sae, k, rows, docs, corpus_max=top, max_tokens=60, max_batch=2)
    for res in (own, read):
        for j, a in enumerate(acts):
            assert res.per_token[j]["activation"] == pytest.approx(a.tolist(), abs=1e-5)
    assert list(read.positions["position"]) == list(own.positions["position"]) and len(own.positions) > 0
    assert read.positions["ablated_loss"].tolist() == pytest.approx(own.positions["ablated_loss"].tolist(), abs=1e-6)


def test_clean_effect_compares_with_the_spliced_story():
    model, sae, rows = _setup()
    k, docs = 5, [0, 3]
    ce = max_activating_ablation(model, sae, k, rows, docs, threshold=0.0, mode="clean_effect")
    rec = max_activating_ablation(model, sae, k, rows, docs, threshold=0.0, mode="reconstruction")
    # same ablated runs; the baseline is the reconstruction, not the clean story
    assert ce.stories["ablated_loss"].tolist() == pytest.approx(rec.stories["ablated_loss"].tolist(), abs=1e-5)
    assert ce.positions["ablated_loss"].tolist() == pytest.approx(rec.positions["ablated_loss"].tolist(), abs=1e-5)
    row = rows[3]
    counted = [p for p in range(len(row)) if row[p] != 0]

    def spliced(act, hook=None):
        act = act.clone()
        for p in counted:
            act[0, p] = _encode(sae, act[0, p].clone()) @ sae.W_dec + sae.b_dec
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([row]), fwd_hooks=[(HOOK, spliced)])[0]
    lp = torch.log_softmax(logits[:-1].float(), -1)
    want = float(-lp.gather(1, torch.tensor(row[1:])[:, None]).mean())
    assert ce.stories.iloc[1]["clean_loss"] == pytest.approx(want, abs=1e-5)


def test_bridge_fallback_equals_engine_path():
    model, sae, rows = _setup()
    tokens = torch.tensor([rows[0][:12], rows[1][:12]])
    where = torch.zeros(2, 3, 12, dtype=torch.bool)
    where[0, 1, 4] = where[1, 2, 7] = where[0, 0, 2] = True

    def fn(x):
        x = x.expand(-1, 3, -1, -1)
        return torch.where(where[..., None], x * 0.3, x)

    query = torch.randint(0, 11, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    eng = max_activating._losses_at(interventions_for(model), tokens, HOOK, fn, 3, query)
    brg = max_activating._losses_at(interventions_for(model, backend="bridge"), tokens, HOOK, fn, 3, query)
    torch.testing.assert_close(eng, brg, atol=1e-5, rtol=0)


def test_bad_input_is_refused():
    model, sae, rows = _setup()
    with pytest.raises(IndexError):
        max_activating_ablation(model, sae, sae.d_sae, rows, [0])
    with pytest.raises(IndexError):
        max_activating_ablation(model, sae, 1, rows, [len(rows)])
    with pytest.raises(ValueError, match="two tokens"):
        max_activating_ablation(model, sae, 1, [[0]], [0])
    empty = max_activating_ablation(model, sae, 1, rows, [])
    assert empty.stories.empty and empty.global_increase.n == 0


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_prefix_cached_positions_equal_bridge_forwards(arch, monkeypatch):
    """The engine path (one clean pass per story, position p alone from the hook on; rotary queries for Llama)
    equals the bridge path (full forwards with the positions as variants)."""
    from helpers import ARCHITECTURES

    model = ARCHITECTURES[arch]()
    sae = random_sae(d_in=int(model.cfg.d_mlp), hook_point=HOOK, seed=4)
    rows = token_rows([30, 12, 25, 40], seed=11, vocab=40)
    k = int(torch.argmax(corpus_feature_stats(model, [sae], rows)[0].fire_count))  # the feature firing most often
    for mode in ("residual", "clean_effect"):
        eng = max_activating_ablation(model, sae, k, rows, [0, 1, 3], threshold=0.0, mode=mode, max_batch=2)
        assert interventions_for(model).backend == "engine"
        with monkeypatch.context() as m:
            m.setattr(max_activating, "interventions_for", lambda mdl: interventions_for(mdl, backend="bridge"))
            brg = max_activating_ablation(model, sae, k, rows, [0, 1, 3], threshold=0.0, mode=mode, max_batch=2)
        assert len(eng.positions) == len(brg.positions) > 10
        for col in ("clean_loss", "ablated_loss"):
            assert eng.positions[col].tolist() == pytest.approx(brg.positions[col].tolist(), abs=1e-5)
            assert eng.stories[col].tolist() == pytest.approx(brg.stories[col].tolist(), abs=1e-5)
