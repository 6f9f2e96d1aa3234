"""The feature circuit: exact node effects and edges against full-prompt bridge interventions, gradient estimates
against autograd through the bridge, integrated gradients' completeness, faithfulness identities, and a hand-wired
toy whose circuit is known by construction."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import ablate_node_by_hand, quote_task, random_sae, tiny_neo, tiny_tokenizer

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.circuit import (
    agreement,
    attribution_estimates,
    circuit_nodes,
    corpus_node_means,
    exact_effects,
    faithfulness_curve,
    find_circuit,
    integrated_gradient_estimates,
    node_means,
    virtual_weights,
)
from saecircuits.saes.base import SAE, SAEConfig
from saecircuits.tasks.base import Task


@functools.cache
def _setup():
    model, task = tiny_neo(), quote_task()
    saes = [random_sae(hook_point="blocks.0.mlp.hook_post", seed=1),
            random_sae(hook_point="blocks.1.mlp.hook_post", seed=2)]
    acts = [feature_activations(model, s, task) for s in saes]
    nodes, groups = circuit_nodes(model, saes, acts)
    return model, task, saes, nodes, groups


def _bridge(model, task, i, edits, read=()):
    """One prompt, unpadded, through the bridge, edits at its last position: (answer log-prob, reads at P)."""
    p = task.prediction_pos[i]
    store = {}

    def at_p(fn):
        def hook(v, hook=None):
            v = v.clone()
            v[0, p] = fn(v[0, p])
            return v
        return hook

    def grab(name):
        def hook(v, hook=None):
            store[name] = v[0, p].detach().clone()
        return hook

    with torch.no_grad():
        lg = model.run_with_hooks(torch.tensor([task.token_ids[i]]),
                                  fwd_hooks=[(n, grab(n)) for n in read] + [(h, at_p(f)) for h, f in edits])
    return float(lg[0, p].float().log_softmax(-1)[task.answer_ids[i]]), store


def test_exact_node_effects_and_edges_equal_full_prompt_interventions():
    model, task, saes, nodes, groups = _setup()
    # the embeddings are ablated to a mean (here over a few corpus rows, as the pipeline's corpus means)
    means = corpus_node_means(model, task.token_ids[:4], groups)
    ex = exact_effects(model, saes, task, nodes, groups, means=means, max_batch=3)
    n = task.n_prompts
    down = saes[1]
    checked_edges = 0
    assert [nodes[i].kind for i in (0, 1)] == ["embed", "pos_embed"]
    for nid in [0, 1, 2, 5, 10] + [i for i, nd in enumerate(nodes) if nd.kind in ("feature", "error")][::15]:
        nd = nodes[nid]
        effect, edge = 0.0, {}
        for i in range(n):
            m0, s0 = _bridge(model, task, i, [], read=[down.hook_point])
            m1, s1 = _bridge(model, task, i, [(nd.hook, ablate_node_by_hand(nd, saes, means))], read=[down.hook_point])
            effect += (m0 - m1) / n
            if nd.layer < 1 or (nd.layer == 1 and nd.kind == "head"):
                with torch.no_grad():
                    delta = down.encode(s0[down.hook_point]) - down.encode(s1[down.hook_point])
                for k in torch.nonzero(delta).flatten().tolist():
                    edge[k] = edge.get(k, 0.0) + float(delta[k]) / n
        assert float(ex.node_effect[nid]) == pytest.approx(effect, abs=1e-5), nd.label
        g = next(g for g in groups if g.hook == down.hook_point)
        for k, v in edge.items():
            d = int(g.node_of[k])
            if d >= 0:
                assert ex.edges[(nid, d)][0] == pytest.approx(v, abs=1e-5), (nd.label, k)
                checked_edges += 1
    assert checked_edges > 20


def test_gradient_estimates_work_when_the_caller_disables_gradients():
    """A notebook often runs analyses under torch.no_grad(): the estimates take their own gradients anyway."""
    model, task, saes, nodes, groups = _setup()
    want_atp = attribution_estimates(model, task, nodes, groups, max_batch=3)
    want_ig = integrated_gradient_estimates(model, task, nodes, groups, steps=2, max_batch=3)
    with torch.no_grad():
        atp = attribution_estimates(model, task, nodes, groups, max_batch=3)
        ig = integrated_gradient_estimates(model, task, nodes, groups, steps=2, max_batch=3)
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    torch.testing.assert_close(atp.node_effect, want_atp.node_effect)
    torch.testing.assert_close(ig.node_effect, want_ig.node_effect)


def test_attribution_patching_equals_autograd_through_the_bridge():
    """AtP node effects = grad . activation with the gradient taken through the full-prompt bridge forward."""
    model, task, saes, nodes, groups = _setup()
    atp = attribution_estimates(model, task, nodes, groups, max_batch=3)
    sae0 = saes[0]
    feats = [i for i, nd in enumerate(nodes) if nd.kind == "feature" and nd.sae == 0][:6]
    err0 = next(i for i, nd in enumerate(nodes) if nd.kind == "error" and nd.sae == 0)
    want = {i: 0.0 for i in feats + [err0]}
    for i in range(task.n_prompts):
        p = task.prediction_pos[i]
        leaves = {}

        def hook(v, hook=None, p=p, leaves=leaves):
            x = v[0, p].detach()
            f = sae0.encode(x).detach().requires_grad_(True)
            e = (x - sae0.decode(f)).detach().requires_grad_(True)
            leaves["f"], leaves["e"] = f, e
            v = v.clone()
            v[0, p] = sae0.decode(f) + e
            return v

        logits = model.run_with_hooks(torch.tensor([task.token_ids[i]]), fwd_hooks=[(sae0.hook_point, hook)])
        m = logits[0, p].float().log_softmax(-1)[task.answer_ids[i]]
        gf, ge = torch.autograd.grad(m, [leaves["f"], leaves["e"]])
        for j in feats:
            want[j] += float(gf[nodes[j].index] * leaves["f"][nodes[j].index].detach()) / task.n_prompts
        want[err0] += float((ge * leaves["e"]).sum().detach()) / task.n_prompts
    for j, v in want.items():
        assert float(atp.node_effect[j]) == pytest.approx(v, abs=1e-5), nodes[j].label


def test_integrated_gradients_converge_to_the_exact_submodule_ablation():
    """Summed over one submodule, IG is a path integral from clean to ablated: it tends to the exact effect of
    ablating the whole submodule (all features and the error of SAE 1, i.e. its hook output -> b_dec)."""
    model, task, saes, nodes, groups = _setup()
    sae1 = saes[1]
    ids = [i for i, nd in enumerate(nodes) if nd.sae == 1]
    exact = 0.0
    for i in range(task.n_prompts):
        m0, _ = _bridge(model, task, i, [])
        m1, _ = _bridge(model, task, i, [(sae1.hook_point, lambda x: sae1.b_dec.detach().expand_as(x))])
        exact += (m0 - m1) / task.n_prompts
    errors = []
    for steps in (2, 32):
        ig = integrated_gradient_estimates(model, task, nodes, groups, steps=steps)
        errors.append(abs(float(ig.node_effect[ids].sum()) - exact))
    assert errors[1] < 2e-3 * max(1.0, abs(exact))
    assert errors[1] < errors[0]


def test_embeddings_are_mean_ablated_in_atp_and_ig():
    """The embedding nodes' estimates are of their mean ablation: AtP = grad . (a - mean) with the gradient taken
    through the bridge, and IG of the token embedding (one node: its submodule) tends to the exact effect of setting
    it to its mean at P (the straight path from a to the mean)."""
    model, task, saes, nodes, groups = _setup()
    means = corpus_node_means(model, task.token_ids[:4], groups)
    atp = attribution_estimates(model, task, nodes, groups, means=means, max_batch=3)
    ig = integrated_gradient_estimates(model, task, nodes, groups, steps=32, means=means, max_batch=3)
    embed = next(i for i, nd in enumerate(nodes) if nd.kind == "embed")
    mu = means["hook_embed"]
    want_atp, exact = 0.0, 0.0
    for i in range(task.n_prompts):
        p = task.prediction_pos[i]
        box = {}

        def hook(v, hook=None, p=p, box=box):
            leaf = v[0, p].detach().clone().requires_grad_(True)
            box["a"] = leaf
            v = v.clone()
            v[0, p] = leaf
            return v

        lg = model.run_with_hooks(torch.tensor([task.token_ids[i]]), fwd_hooks=[("hook_embed", hook)])
        m = lg[0, p].float().log_softmax(-1)[task.answer_ids[i]]
        (g,) = torch.autograd.grad(m, [box["a"]])
        want_atp += float((g * (box["a"] - mu)).sum().detach()) / task.n_prompts
        m0, _ = _bridge(model, task, i, [])
        m1, _ = _bridge(model, task, i, [("hook_embed", lambda x: mu.to(x).expand_as(x).clone())])
        exact += (m0 - m1) / task.n_prompts
    assert abs(exact) > 1e-3
    assert float(atp.node_effect[embed]) == pytest.approx(want_atp, abs=1e-5)
    assert float(ig.node_effect[embed]) == pytest.approx(exact, abs=2e-3 * max(1.0, abs(exact)))


def test_faithfulness_identities_and_agreement_statistics():
    model, saes, task = _wired_toy()  # mean-ablating every node clearly lowers the answer: faithfulness defined
    nodes, groups = circuit_nodes(model, saes, [feature_activations(model, s, task) for s in saes])
    means = node_means(model, task, groups)
    order = list(range(len(nodes)))
    curve = faithfulness_curve(model, task, nodes, groups, order, [0, len(nodes)], means=means)
    # the empty circuit is everything ablated, the full circuit is the clean model
    assert curve["m_clean"].iloc[0] - curve["m_empty"].iloc[0] > 0.1
    assert curve["undefined_reason"].isna().all()
    # exactly: m(M) comes from the same run as the ablations (issue 18), so nothing ablated is m(M) bit for bit
    assert curve["faithfulness"].iloc[0] == 0.0
    assert curve["faithfulness"].iloc[1] == 1.0
    assert curve["completeness"].iloc[0] == 1.0
    assert curve["completeness"].iloc[1] == 0.0
    assert list(curve["faithfulness_ci95"].iloc[1]) == [1.0, 1.0]
    a = agreement(np.array([3.0, -2.0, 1.0, 0.5]), np.array([30.0, -20.0, 10.0, -5.0]), top=2)
    assert a["spearman"] == pytest.approx(1.0) and a["sign_agreement"] == pytest.approx(0.75)
    assert a["top_overlap"] == 1.0
    b = agreement(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0]), top=1)
    assert b["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # rank differences 0, 1, 1, 0
    assert b["top_overlap"] == 1.0 and b["sign_agreement"] == 1.0
    # many small entries agree, the two largest have the wrong sign: high Spearman, low top sign agreement
    exact = np.concatenate([[10.0, -8.0], np.linspace(0.01, 0.5, 40)])
    est = np.concatenate([[-0.1, 0.1], np.linspace(0.01, 0.5, 40)])
    c = agreement(est, exact, top=4)
    assert c["spearman"] > 0.8 and c["sign_agreement"] == pytest.approx(40 / 42)
    assert c["top_sign_agreement"] == pytest.approx(0.5)  # of the exact top 4: 10, -8 wrong; 0.5, 0.4875 right


def test_faithfulness_undefined_when_ablating_everything_does_not_clearly_hurt():
    """The random tiny model: mean-ablating every node at P does not clearly lower the answer's log-prob, so
    faithfulness and completeness are NaN with the reason: the one loss-recovered rule, not a 1e-3 guard of its
    own (the rule itself is tested on hand-built arrays in test_reconstruction.py)."""
    model, task, saes, nodes, groups = _setup()
    means = node_means(model, task, groups)
    curve = faithfulness_curve(model, task, nodes, groups, list(range(len(nodes))), [1, len(nodes)], means=means)
    assert curve["faithfulness"].isna().all() and curve["completeness"].isna().all()
    reason = curve["undefined_reason"].iloc[0]
    assert "mean-ablating every node" in reason
    drop = curve["m_clean"].iloc[0] - curve["m_empty"].iloc[0]
    assert drop < 0.01 or "includes 0" in reason


def test_corpus_node_means_equal_a_per_document_bridge_average():
    """Every node's mean over the real tokens of corpus documents (a special id inside one is skipped), against
    run_with_cache on each document alone."""
    from helpers import STORIES

    from saecircuits.models.tokens import encode_documents

    model, task, saes, nodes, groups = _setup()
    rows = encode_documents(model.tokenizer, STORIES[:5], max_len=int(model.cfg.n_ctx))
    eos = model.tokenizer.eos_token_id
    rows[2] = rows[2][:4] + [eos] + rows[2][4:]  # an inline special id: not a token of the text
    means = corpus_node_means(model, rows, groups, max_batch=2)
    special = {model.tokenizer.bos_token_id, eos, model.tokenizer.pad_token_id}
    sums, n = {}, 0
    for row in rows:
        _, cache = model.run_with_cache(torch.tensor([row]))
        keep = torch.tensor([t not in special for t in row])
        n += int(keep.sum())
        for g in groups:
            x = cache[g.hook][0][keep].float()
            if g.kind == "sae":
                f = g.sae.encode(x)
                vals = {"f": f.sum(0), "e": (x - g.sae.decode(f)).sum(0)}
            else:
                vals = {"x": x.sum(0)}
            for k, v in vals.items():
                sums[(g.hook, k)] = sums.get((g.hook, k), 0) + v
    for (hook, k), v in sums.items():
        got = means[hook][k] if k != "x" else means[hook]
        torch.testing.assert_close(got, v / n, atol=1e-5, rtol=1e-4)


def test_find_circuit_with_corpus_means_says_which_mean_it_used():
    from helpers import STORIES

    from saecircuits.models.tokens import encode_documents

    model, task, saes, _, _ = _setup()
    rows = encode_documents(model.tokenizer, STORIES, max_len=int(model.cfg.n_ctx))
    res = find_circuit(model, saes, task, ig_steps=0, sizes=[1, 5], corpus_rows=rows, progress=False)
    assert res.selection["mean_ablation"] == f"each node's mean over the tokens of {len(rows)} corpus documents"
    res2 = find_circuit(model, saes, task, ig_steps=0, sizes=[1, 5], progress=False)
    assert "at P over the task's" in res2.selection["mean_ablation"]
    # the exact node effects do not depend on the means but for the embeddings' (mean-ablated with the same means
    # as faithfulness); the faithfulness curve does
    emb = torch.tensor([nd.kind in ("embed", "pos_embed") for nd in res.nodes])
    torch.testing.assert_close(res.exact.node_effect[~emb], res2.exact.node_effect[~emb])
    assert not torch.allclose(res.exact.node_effect[emb], res2.exact.node_effect[emb])
    assert not np.allclose(res.curve["m_empty"], res2.curve["m_empty"])


def test_virtual_weights_hand_computed():
    model, _, saes, _, _ = _setup()
    vw = virtual_weights(model, saes[0], saes[1], [3, 7], [5])
    write = saes[0].W_dec[[3, 7]] @ model.W_out[0]
    read = model.W_in[1] @ saes[1].W_enc[:, [5]]
    torch.testing.assert_close(torch.tensor(vw["raw"]), (write @ read).detach(), atol=1e-5, rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(write, read.T, dim=1)
    torch.testing.assert_close(torch.tensor(vw["cosine"][:, 0]), cos.detach(), atol=1e-5, rtol=1e-5)


def _wired_toy():
    """A 2-layer GPT-2 (ReLU MLPs, attention switched off) wired by hand: token t in 1..4 fires MLP0 neuron t-1,
    which writes residual dim 8+t-1, which fires MLP1 neuron t-1, which writes dim 12+t-1, which the unembedding
    reads as answer token 4+t. Identity SAEs on both MLPs make the circuit: embed -> S0:f(t-1) -> S1:f(t-1)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saecircuits.models.load import load_hf_model

    tok = tiny_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2, n_head=1, n_inner=8,
                     activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for blk in hf.transformer.h:
            blk.ln_1.weight.fill_(1.0)
            blk.ln_2.weight.fill_(1.0)
        hf.transformer.ln_f.weight.fill_(1.0)
        E = hf.transformer.wte.weight
        E[:, 7] = 1.0  # a filler direction in every token keeps the LayerNorm scale steady
        mlp0, mlp1 = hf.transformer.h[0].mlp, hf.transformer.h[1].mlp
        for i in range(4):
            E[1 + i, i] = 4.0
            mlp0.c_fc.weight[i, i], mlp0.c_fc.bias[i] = 1.0, -0.5
            mlp0.c_proj.weight[i, 8 + i] = 4.0
            mlp1.c_fc.weight[8 + i, i], mlp1.c_fc.bias[i] = 1.0, -0.5
            mlp1.c_proj.weight[i, 12 + i] = 4.0
            hf.lm_head.weight[5 + i, 12 + i] = 4.0
        mlp0.c_fc.bias[4:] = -5.0
        mlp1.c_fc.bias[4:] = -5.0
    model = load_hf_model(hf, tok)
    saes = []
    for layer in (0, 1):
        sae = SAE(SAEConfig("standard", d_in=8, d_sae=8, hook_point=f"blocks.{layer}.mlp.hook_post"))
        with torch.no_grad():
            sae.W_enc.copy_(torch.eye(8))
            sae.W_dec.copy_(torch.eye(8))
        saes.append(sae)
    rows = [[0, 20 + j, 30 + j, t] for j in range(3) for t in (1, 2, 3)]
    task = Task("wired", [""] * len(rows), rows, [r[-1] + 4 for r in rows])
    return model, saes, task


def test_the_circuit_of_a_hand_wired_toy_is_found_exactly():
    model, saes, task = _wired_toy()
    res = find_circuit(model, saes, task, ig_steps=4, node_threshold=1e-6)
    labels = {i: nd.label for i, nd in enumerate(res.nodes)}
    effective = {labels[i] for i in range(len(res.nodes)) if abs(float(res.exact.node_effect[i])) > 1e-6}
    assert effective == {"embed", "S0:f0", "S0:f1", "S0:f2", "S1:f0", "S1:f1", "S1:f2"}
    feature_edges = {(labels[u], labels[d]) for (u, d), (v, _) in res.exact.edges.items()
                     if abs(v) > 1e-6 and res.nodes[u].kind == "feature"}
    assert feature_edges == {("S0:f0", "S1:f0"), ("S0:f1", "S1:f1"), ("S0:f2", "S1:f2")}
    assert {labels[i] for i in res.circuit} == effective
    assert res.selection["faithfulness"] == pytest.approx(1.0, abs=1e-6)  # the circuit alone does everything
    assert res.selection["completeness"] == pytest.approx(0.0, abs=1e-6)  # and nothing is left without it
    # the chosen size's intervals are the curve's at that size (here every prompt gives 1 and 0: zero-width)
    row = res.curve[res.curve["n_nodes"] == len(res.circuit)].iloc[0]
    assert res.selection["faithfulness_ci95"] == [float(x) for x in row["faithfulness_ci95"]]
    assert res.selection["faithfulness_ci95"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert res.selection["completeness_ci95"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert {(labels[u], labels[d]) for u, d in res.circuit_edges} >= feature_edges
    assert res.to_json()["circuit"] == res.circuit


def test_virtual_weight_cosine_of_a_zero_vector_is_undefined():
    """A zero decoder row (or encoder column) has no direction: cosine NaN, raw 0; the other entries stay finite."""
    model, _, saes, _, _ = _setup()
    up = SAE(saes[0].cfg)
    down = SAE(saes[1].cfg)
    with torch.no_grad():
        up.load_state_dict(saes[0].state_dict())
        down.load_state_dict(saes[1].state_dict())
        up.W_dec[3] = 0.0
        down.W_enc[:, 5] = 0.0
    vw = virtual_weights(model, up, down, [3, 7], [5, 6])
    assert np.isnan(vw["cosine"][0]).all() and np.isnan(vw["cosine"][:, 0]).all()
    assert np.isfinite(vw["cosine"][1, 1])
    assert vw["raw"][0, 1] == 0.0 and vw["raw"][1, 0] == 0.0


def test_sign_agreement_ignores_rounding_noise_relative_to_the_largest_effect():
    """Rounding noise far below the largest exact effect is not a sign to agree with, and the rule does not depend
    on the effects' scale (an absolute 1e-9 threshold dropped every effect once they were all below 1e-9)."""
    est = np.array([1.0, -1.0, 0.5, 1.0, -1.0])
    exact = np.array([1e-4, -2e-4, 5e-5, -3e-11, 2e-11])  # last two: rounding noise, signs opposite to est
    # by hand: only the first three count, all three agree
    assert agreement(est, exact)["sign_agreement"] == 1.0
    assert agreement(est, exact * 1e-6)["sign_agreement"] == 1.0
    assert agreement(est, np.array([1e-4, -2e-4, 5e-5, -1e-8, 2e-8]))["sign_agreement"] == 0.6  # 1e-8 > 1e-6 * 2e-4
    assert np.isnan(agreement(est, np.zeros(5))["sign_agreement"])
