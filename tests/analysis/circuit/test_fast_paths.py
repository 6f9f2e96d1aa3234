"""The circuit's fast paths against full-prompt bridge computations with dense SAEs, per model architecture and per
SAE activation: the gradient estimates (sparse codes decoded from their active rows of W_dec, edge targets encoded
from their own encoder columns) against autograd; the exact effects and edges (only the rows of variants that
ablate a node of a group encoded at its edit, only the rows upstream of an SAE encoded for its edges) against
interventions; the node means, top tokens and virtual weights against their per-row / per-feature computations. Per
SAE activation (ReLU: one column per feature; TopK: selected over every feature; with a skip
connection and per-token input normalisation, whose reconstruction bias depends on the input)."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import ablate_node_by_hand, analyses_on_backend, quote_task, tiny_model

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.circuit import (
    attribution_estimates,
    circuit_nodes,
    exact_effects,
    integrated_gradient_estimates,
    node_means,
)
from saecircuits.saes.base import SAEConfig
from saecircuits.saes.registry import build_sae

HOOKS = ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post")


@functools.cache
def _setup(arch: str, sae_arch: str):
    model, task = tiny_model(arch), quote_task()
    d_in = int(model.cfg.d_mlp)
    saes = []
    for seed, hook in enumerate(HOOKS):
        extra = {"k": 6} if sae_arch.startswith("topk") else {}
        if sae_arch == "topk_skip_ln":  # a reconstruction bias that depends on the input
            extra |= {"skip_connection": True, "input_normalization": "layer_norm"}
        sae = build_sae(SAEConfig(sae_arch.split("_")[0], d_in=d_in, d_sae=96, hook_point=hook, extra=extra), seed=seed + 1)
        if sae_arch == "standard":  # a negative encoder bias: each feature fires on some prompts only
            with torch.no_grad():
                sae.b_enc.copy_(-0.3 * torch.rand(96, generator=torch.Generator().manual_seed(seed)))
        saes.append(sae)
    acts = [feature_activations(model, s, task) for s in saes]
    nodes, groups = circuit_nodes(model, saes, acts)
    return model, task, saes, nodes, groups, acts


def _bridge_grads(model, task, saes, i, scale: float = 1.0):
    """Prompt ``i`` through the bridge with SAE 0 at P rebuilt densely as ``decode(s f) + s e`` from two leaves
    (``s = scale``: IG's path point) and SAE 1's code at P encoded with its graph: ``(f, e, f1, metric)``."""
    sae0, sae1 = saes
    p = task.prediction_pos[i]
    got = {}

    def rebuild(v, hook=None):
        x = v[0, p].detach()
        f = sae0.encode(x).detach()
        e = (x - sae0.decode(f, x)).detach()
        got["f"], got["e"] = f, e
        got["sf"], got["se"] = (scale * f).requires_grad_(True), (scale * e).requires_grad_(True)
        v = v.clone()
        v[0, p] = sae0.decode(got["sf"], x) + got["se"]
        return v

    def read(v, hook=None):
        got["f1"] = sae1.encode(v[0, p])

    with torch.enable_grad():
        logits = model.run_with_hooks(torch.tensor([task.token_ids[i]]),
                                      fwd_hooks=[(HOOKS[0], rebuild), (HOOKS[1], read)])
        got["m"] = logits[0, p].float().log_softmax(-1)[task.answer_ids[i]]
    return got


def _contrib(got, target, nodes, sae_index: int = 0):
    """``grad(target) . activation`` of SAE 0's feature and error nodes: ``{node id: value}``."""
    gf, ge = torch.autograd.grad(target, [got["sf"], got["se"]], retain_graph=True)
    out = {}
    for j, nd in enumerate(nodes):
        if nd.sae == sae_index and nd.kind == "feature":
            out[j] = gf[nd.index] * got["f"][nd.index]
        elif nd.sae == sae_index and nd.kind == "error":
            out[j] = (ge * got["e"]).sum()
    return out


@pytest.mark.parametrize("sae_arch", ["standard", "topk", "topk_skip_ln"])
@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2", "llama"])
def test_attribution_nodes_and_edges_equal_dense_autograd_through_the_bridge(arch, sae_arch):
    """AtP node effects of SAE 0's nodes and the AtP edges from them into every active feature of SAE 1, against
    the gradient of the answer log-prob and of each downstream code through full bridge forwards (dense decode,
    full encode)."""
    model, task, saes, nodes, groups, _ = _setup(arch, sae_arch)
    atp = attribution_estimates(model, task, nodes, groups, max_batch=3)
    n = task.n_prompts
    want_nodes: dict[int, float] = {}
    want_edges: dict[tuple[int, int], float] = {}
    node_of1 = {nd.index: j for j, nd in enumerate(nodes) if nd.sae == 1 and nd.kind == "feature"}
    for i in range(n):
        got = _bridge_grads(model, task, saes, i)
        for j, v in _contrib(got, got["m"], nodes).items():
            want_nodes[j] = want_nodes.get(j, 0.0) + float(v) / n
        for k in torch.nonzero(got["f1"].detach()).flatten().tolist():
            for u, v in _contrib(got, got["f1"][k], nodes).items():
                if float(v) != 0:
                    want_edges[(u, node_of1[k])] = want_edges.get((u, node_of1[k]), 0.0) + float(v) / n
    assert want_edges, "no edge to compare: the setup has no active downstream feature"
    for j, v in want_nodes.items():
        assert float(atp.node_effect[j]) == pytest.approx(v, abs=1e-5, rel=1e-4), nodes[j].label
    for (u, d), v in want_edges.items():
        assert atp.edges.get((u, d), 0.0) == pytest.approx(v, abs=1e-5, rel=1e-4), (nodes[u].label, nodes[d].label)
    sae0_ids = {j for j, nd in enumerate(nodes) if nd.sae == 0}
    extra = [k for k, v in atp.edges.items() if k[0] in sae0_ids and nodes[k[1]].sae == 1 and k not in want_edges
             and abs(v) > 1e-7]
    assert not extra, extra[:5]


@pytest.mark.parametrize("sae_arch", ["standard", "topk", "topk_skip_ln"])
@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2", "llama"])
def test_integrated_gradients_of_an_sae_equal_dense_autograd_through_the_bridge(arch, sae_arch):
    """IG of SAE 0's nodes (scaled from clean to 0 together) and its IG edges into SAE 1 features, against the mean
    over the path points of the dense gradients through full bridge forwards, times the clean activation."""
    model, task, saes, nodes, groups, acts = _setup(arch, sae_arch)
    count = acts[1].count()  # the SAE 1 features active on the most prompts: edges into them are non-zero
    targets = sorted((j for j, nd in enumerate(nodes) if nd.sae == 1 and nd.kind == "feature"),
                     key=lambda j: -int(count[nodes[j].index]))[:4]
    steps = 3
    ig = integrated_gradient_estimates(model, task, nodes, groups, steps=steps, edge_targets=targets, max_batch=3)
    n = task.n_prompts
    want_nodes: dict[int, float] = {}
    want_edges: dict[tuple[int, int], float] = {}
    for i in range(n):
        for s in range(steps):
            got = _bridge_grads(model, task, saes, i, scale=1 - (s + 0.5) / steps)
            for j, v in _contrib(got, got["m"], nodes).items():
                want_nodes[j] = want_nodes.get(j, 0.0) + float(v) / n / steps
            for t in targets:
                for u, v in _contrib(got, got["f1"][nodes[t].index], nodes).items():
                    want_edges[(u, t)] = want_edges.get((u, t), 0.0) + float(v) / n / steps
    for j, v in want_nodes.items():
        assert float(ig.node_effect[j]) == pytest.approx(v, abs=1e-5, rel=1e-4), nodes[j].label
    assert any(abs(v) > 1e-4 for v in want_edges.values()), "no edge to compare"
    for (u, d), v in want_edges.items():
        assert ig.edges.get((u, d), 0.0) == pytest.approx(v, abs=1e-5, rel=1e-4), (nodes[u].label, nodes[d].label)


@pytest.mark.parametrize("extra", [{}, {"skip_connection": True, "input_normalization": "layer_norm"}])
def test_sae_sums_equal_the_sums_of_per_row_errors(extra):
    """The node means' SAE sums (errors summed through one decode of the summed codes) against each row's error
    ``x - decode(encode(x), x)`` summed, for a plain SAE and one whose reconstruction bias depends on its input."""
    from saecircuits.analysis.circuit.faithfulness import _sae_sums

    sae = build_sae(SAEConfig("topk", d_in=16, d_sae=40, hook_point=HOOKS[0], extra={"k": 5} | extra), seed=3)
    gen = torch.Generator().manual_seed(0)
    x_in, x = torch.randn(50, 16, generator=gen), torch.randn(50, 16, generator=gen)
    got = _sae_sums(sae, x_in, x)
    with torch.no_grad():
        f = sae.encode(x_in)
        want = {"f": f.sum(0), "e": (x - sae.decode(f, x_in)).sum(0)}
    for k in ("f", "e"):
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-5)


def test_circuit_top_tokens_and_virtual_table_equal_their_one_feature_computations():
    """The circuit's top tokens (the node features' writes only) against the top-k of every feature's write
    through the readout, and the virtual-weight table (one call per pair of SAEs) against one call per edge."""
    from saecircuits.analysis.ablations.feature_effects import _feature_write
    from saecircuits.analysis.circuit import exact_effects, virtual_weights
    from saecircuits.analysis.circuit.result import _top_tokens, _virtual_table
    from saecircuits.models.norms import readout_of
    from saecircuits.models.tokens import token_string

    model, task, saes, nodes, groups, _ = _setup("gpt2", "standard")
    tokens = _top_tokens(model, saes, nodes)
    readout = readout_of(model)
    with torch.no_grad():
        for i, nd in enumerate(nodes):
            if nd.kind != "feature":
                continue
            top = torch.topk(readout.vocab_logits(_feature_write(model, saes[nd.sae])[nd.index][None]), 5).indices
            assert tokens[i] == [token_string(model.tokenizer, t) for t in top[0].tolist()], nd.label
    exact = exact_effects(model, saes, task, nodes, groups)
    table = _virtual_table(model, saes, nodes, exact)
    assert len(table) == 20
    by_label = {nd.label: nd for nd in nodes}
    for row in table:
        u, d = by_label[row["source"]], by_label[row["target"]]
        vw = virtual_weights(model, saes[u.sae], saes[d.sae], [u.index], [d.index])
        assert row["virtual_raw"] == pytest.approx(float(vw["raw"][0, 0]), rel=1e-5, abs=1e-6)
        assert row["virtual_cosine"] == pytest.approx(float(vw["cosine"][0, 0]), rel=1e-5, abs=1e-6)


def _bridge_ablated(model, task, i, hook, fn, read):
    """Prompt ``i`` through the bridge with ``fn`` applied at ``hook`` at P: (answer log-prob, ``read`` at P)."""
    p = task.prediction_pos[i]
    got = {}

    def edit(v, hook=None):
        v = v.clone()
        v[0, p] = fn(v[0, p])
        return v

    def grab(v, hook=None):
        got["x"] = v[0, p].detach().clone()

    hooks = [(read, grab)] + ([(hook, edit)] if hook else [])
    with torch.no_grad():
        lg = model.run_with_hooks(torch.tensor([task.token_ids[i]]), fwd_hooks=hooks)
    return float(lg[0, p].float().log_softmax(-1)[task.answer_ids[i]]), got["x"]


@pytest.mark.parametrize("sae_arch", ["standard", "topk_skip_ln"])
@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2", "llama"])
def test_exact_node_effects_and_edges_equal_full_prompt_interventions(arch, sae_arch):
    """Exact effects of embeddings, heads, both SAEs' features and errors, and their edges into SAE 1's features,
    against each node ablated alone in a full bridge forward (the downstream codes encoded from the bridge's
    activation)."""
    model, task, saes, nodes, groups, _ = _setup(arch, sae_arch)
    means = node_means(model, task, groups)
    ex = exact_effects(model, saes, task, nodes, groups, means=means, max_batch=3)
    n, down = task.n_prompts, saes[1]
    node_of1 = {nd.index: j for j, nd in enumerate(nodes) if nd.sae == 1 and nd.kind == "feature"}
    picked = [j for j, nd in enumerate(nodes) if nd.kind in ("embed", "pos_embed", "error")]
    picked += [j for j, nd in enumerate(nodes) if nd.kind == "head"][::3]
    picked += [j for j, nd in enumerate(nodes) if nd.kind == "feature"][::3]
    checked = 0
    for j in picked:
        nd = nodes[j]
        effect, edge = 0.0, {}
        for i in range(n):
            m0, x0 = _bridge_ablated(model, task, i, None, None, down.hook_point)
            m1, x1 = _bridge_ablated(model, task, i, nd.hook, ablate_node_by_hand(nd, saes, means), down.hook_point)
            effect += (m0 - m1) / n
            if nd.sae != 1:  # upstream of SAE 1: its edges into SAE 1's features
                with torch.no_grad():
                    delta = down.encode(x0) - down.encode(x1)
                for k in torch.nonzero(delta).flatten().tolist():
                    edge[k] = edge.get(k, 0.0) + float(delta[k]) / n
        assert float(ex.node_effect[j]) == pytest.approx(effect, abs=1e-5, rel=1e-4), nd.label
        for k, v in edge.items():
            if k in node_of1 and abs(v) > 1e-6:
                assert ex.edges[(j, node_of1[k])][0] == pytest.approx(v, abs=1e-5, rel=1e-4), (nd.label, k)
                checked += 1
    assert checked >= 5


@pytest.mark.parametrize("sae_arch", ["standard", "topk_skip_ln"])
def test_mask_edit_equals_the_dense_mean_ablation(sae_arch):
    """Faithfulness's mask edit (codes decoded from their active rows) against ``x - ((f - mu_f) * mask) @ W_dec -
    mask_err * (x - decode(f, x) - mu_e)`` computed densely, for variants that ablate nothing, some nodes, all."""
    from saecircuits.analysis.circuit.nodes import _mask_edit

    _, _, saes, _, groups, _ = _setup("gpt2", sae_arch)
    g = next(g for g in groups if g.kind == "sae")
    sae = g.sae
    gen = torch.Generator().manual_seed(1)
    mu = {"f": torch.rand(sae.d_sae, generator=gen), "e": torch.randn(sae.d_in, generator=gen)}
    mask = torch.rand(5, sae.d_sae + 1, generator=gen) < 0.5
    mask[0], mask[1] = False, True
    x = torch.randn(3, 1, sae.d_in, generator=gen)
    with torch.no_grad():
        got = _mask_edit(g, mask, {g.hook: mu}).fn(x)
        f = sae.encode(x)
        delta = ((f - mu["f"]) * mask[None, :, :-1]) @ sae.W_dec
        want = x - delta - mask[None, :, -1:] * (x - sae.decode(f, x) - mu["e"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, 0], x[:, 0])  # nothing ablated: x itself, bit for bit


@pytest.mark.parametrize("sae_arch", ["standard", "topk_skip_ln"])
def test_single_edit_on_differing_rows_equals_each_row_ablated_alone(sae_arch):
    """The single-node SAE edit on variants whose activations differ (some rows equal, some not; features, the
    error and nothing ablated), against each row's ablation written out: ``x - f_k W_dec[k]``, ``decode(f, x)``,
    ``x``."""
    from saecircuits.analysis.circuit.nodes import _single_edit

    _, _, saes, _, groups, _ = _setup("llama", sae_arch)
    g = next(g for g in groups if g.kind == "sae")
    sae, d_sae = g.sae, g.sae.d_sae
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, sae.d_in, generator=gen)
    x[0, 2] = x[0, 1]  # two variants of prompt 0 see one activation, the others their own
    with torch.no_grad():
        f = sae.encode(x)
    k0, k1 = int(torch.nonzero(f[0, 1])[0]), int(torch.nonzero(f[1, 3])[-1])
    table = torch.tensor([[-1, k0, d_sae, k0, -1], [d_sae, -1, -1, k1, 5]])
    with torch.no_grad():
        got = _single_edit(g, table, None).fn(x)
    for b in range(2):
        for v in range(5):
            t, xr = int(table[b, v]), x[b, v]
            if t < 0:
                want = xr
            elif t == d_sae:
                want = sae.decode(f[b, v], xr)
            else:
                want = xr - f[b, v, t] * sae.W_dec[t]
            torch.testing.assert_close(got[b, v], want, atol=1e-5, rtol=1e-5, msg=f"prompt {b} variant {v}")


@pytest.mark.parametrize("extra", [{}, {"topk_relu": False}, {"skip_connection": True, "input_normalization": "layer_norm"}])
def test_attached_features_equal_the_dense_encode_in_value_and_gradient(extra):
    """The edge targets' codes (:func:`~saecircuits.analysis.circuit.estimates.attached_features`: a plain TopK
    SAE's gradient through the selected columns alone) against ``encode_features`` (the dense encode with its
    graph): the same values, and for a target of one column per row (as every caller's) the same gradient, bit for
    bit, on rows where the column is selected and where it is not."""
    from saecircuits.analysis.circuit.estimates import attached_features

    sae = build_sae(SAEConfig("topk", d_in=16, d_sae=40, hook_point=HOOKS[0], extra={"k": 5} | extra), seed=3)
    x = torch.randn(6, 3, 16, generator=torch.Generator().manual_seed(0))
    f = sae.encode(x)
    cols = torch.tensor([int(torch.argmax((f != 0).sum((0, 1)).float())), 7, 21])
    for j in range(len(cols)):
        with torch.enable_grad():
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            got, want = attached_features(sae, xa, cols), sae.encode_features(xb, cols)
            assert torch.equal(got, want)
            ga, = torch.autograd.grad(got[..., j].sum(), xa)
            gb, = torch.autograd.grad(want[..., j].sum(), xb)
        assert torch.equal(ga, gb), j
    assert bool((f[..., cols[0]] != 0).any()) and bool((f[..., cols[0]] == 0).any())  # both kinds of rows
    assert torch.equal(attached_features(sae, x, cols, f), sae.encode_features(x, cols))  # no graph: the value


@pytest.mark.parametrize("sae_arch", ["standard", "topk_skip_ln"])
@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_exact_effects_in_one_variant_chunks_from_node_columns_equal_the_bridge_backend(arch, sae_arch, monkeypatch):
    """Exact effects and edges computed one variant per run, the metric unembedded from the last residual stream a
    few rows at a time and the edges of a per-feature SAE encoded from its node features' columns alone (the
    engine), against the bridge backend's (full forwards, the log-softmax of the logits, every feature encoded,
    many variants per run)."""
    from saecircuits.analysis.circuit import exact as exact_module

    model, task, saes, nodes, groups, _ = _setup(arch, sae_arch)
    means = node_means(model, task, groups)
    with analyses_on_backend(model, "bridge"):
        want = exact_effects(model, saes, task, nodes, groups, means=means, max_batch=3)
    monkeypatch.setattr(exact_module, "MAX_FLOATS", 1)
    monkeypatch.setattr(exact_module, "COLUMN_SHARE", 1.0)
    sae_groups = [g for g in groups if g.kind == "sae"]
    assert all((exact_module._node_columns(g) is not None) == (sae_arch == "standard") for g in sae_groups)
    got = exact_effects(model, saes, task, nodes, groups, means=means, max_batch=3)
    torch.testing.assert_close(got.clean_metric, want.clean_metric, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got.node_effect, want.node_effect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.node_effect_sq, want.node_effect_sq, atol=1e-5, rtol=1e-4)
    assert torch.equal(got.node_active, want.node_active)
    assert len(want.edges) > 20
    for key in set(got.edges) | set(want.edges):
        g_v, g_n = got.edges.get(key, (0.0, 0))
        w_v, w_n = want.edges.get(key, (0.0, 0))
        assert g_v == pytest.approx(w_v, abs=1e-6, rel=1e-4), key
        if abs(w_v) > 1e-4:
            assert g_n == w_n, key


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_feature_activations_of_several_saes_equal_each_ones_own_pass(arch):
    """One clean pass for both SAEs (it runs past SAE 0's layer) against each SAE's own
    :func:`feature_activations` (a pass that stops after its layer): the same activations, bit for bit; and
    find_circuit's nodes from them equal the nodes from the per-SAE activations."""
    from saecircuits.analysis.ablations.activations_at_p import feature_activations_of

    model, task, saes, nodes, _, acts = _setup(arch, "standard")
    both = feature_activations_of(model, saes, task)
    for a, b in zip(acts, both, strict=True):
        assert (a.n_prompts, a.d_sae) == (b.n_prompts, b.d_sae)
        assert torch.equal(a.prompt, b.prompt) and torch.equal(a.feature, b.feature) and torch.equal(a.value, b.value)
    assert circuit_nodes(model, saes, both)[0] == nodes


@pytest.mark.parametrize("sae_arch", ["standard", "topk_skip_ln"])
def test_single_edit_reuses_its_kept_codes_only_for_the_same_input(sae_arch, monkeypatch):
    """An SAE edit whose variants share their input, given a ``memo`` kept across runs: the second run on the same
    input encodes nothing, a run on another input encodes it; every output equals each row's ablation written out
    (``x - f_k W_dec[k]``, ``decode(f, x)``, ``x``)."""
    from saecircuits.analysis.circuit.nodes import _single_edit

    _, _, saes, _, groups, _ = _setup("llama", sae_arch)
    g = next(g for g in groups if g.kind == "sae")
    sae, d_sae = g.sae, g.sae.d_sae
    gen = torch.Generator().manual_seed(3)
    xa, xb = torch.randn(2, 1, sae.d_in, generator=gen), torch.randn(2, 1, sae.d_in, generator=gen)
    with torch.no_grad():
        fa, fb = sae.encode(xa), sae.encode(xb)
    ka, kb = int(torch.nonzero(fa[0, 0])[0]), int(torch.nonzero(fa[1, 0])[-1])
    table = torch.tensor([[ka, d_sae, -1], [d_sae, kb, -1]])
    calls = []
    encode = type(sae).encode
    monkeypatch.setattr(type(sae), "encode", lambda self, x: calls.append(1) or encode(self, x))
    memo: dict = {}
    edit = _single_edit(g, table, None, memo)
    for x, f, n_calls in ((xa, fa, 1), (xa.clone(), fa, 1), (xb, fb, 2), (xa, fa, 3)):
        with torch.no_grad():
            got = edit.fn(x)
        assert len(calls) == n_calls
        for b in range(2):
            for v in range(3):
                t, xr = int(table[b, v]), x[b, 0]
                want = xr if t < 0 else sae.decode(f[b, 0], xr) if t == d_sae else xr - f[b, 0, t] * sae.W_dec[t]
                torch.testing.assert_close(got[b, v], want, atol=1e-5, rtol=1e-5, msg=f"prompt {b} variant {v}")


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_paired_answer_logprob_unembeds_only_the_variants_that_differ(arch, monkeypatch):
    """The metric of a paired run with no-op variants (padding slots: ``table`` -1) from the last residual stream,
    unembedding only the baseline and the variants that differ from it, against the log-softmax of the same run's
    full logits; with a ``memo``, the baseline is unembedded again only when its residual stream changed."""
    from saecircuits.analysis.circuit.nodes import (
        _answer_logprob,
        _final_read,
        _paired_answer_logprob,
        _single_edit,
    )
    from saecircuits.models.hooks import task_batches
    from saecircuits.models.interventions import interventions_for

    model, task, saes, _, groups, _ = _setup(arch, "standard")
    iv = interventions_for(model)
    final = _final_read(iv)
    assert final is not None
    batch = next(iter(task_batches(model, task, max_batch=3)))
    clean = iv.clean(batch)
    g = next(g for g in groups if g.kind == "sae")
    B = len(batch.indices)
    table = torch.full((B, 4), -1, dtype=torch.long)
    table[:, 0] = g.sae.d_sae  # the error node
    table[0, 2] = 0
    edits = [_single_edit(g, table, None)]
    want = iv.run_paired(clean, edits, n_variants=4, read=[final], logits=True)
    m_base = _answer_logprob(want.base_logits[:, None], batch.answer_ids)[:, 0]
    m_var = _answer_logprob(want.logits, batch.answer_ids)
    assert want.same is not None and int(want.same.sum()) >= 2 * B - 1  # variants 1 and 3 (and 2 but for prompt 0)
    rows = []
    losses = type(iv.engine).losses
    monkeypatch.setattr(type(iv.engine), "losses", lambda self, r, *a, **k: rows.append(len(r)) or losses(self, r, *a, **k))
    run = iv.run_paired(clean, edits, n_variants=4, read=[final], logits=False)
    base, var = _paired_answer_logprob(iv, run, final, batch.answer_ids)
    assert sum(rows) == B + int((~run.same).sum())
    torch.testing.assert_close(base, m_base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, m_var, atol=1e-5, rtol=1e-5)
    assert torch.equal(var[run.same], base[:, None].expand_as(var)[run.same])  # no-ops: exactly the baseline
    memo: dict = {}
    n_differ = int((~run.same).sum())
    for r, n_rows in ((run, B + n_differ), (run, n_differ), (run._replace(base_reads={
            final: run.base_reads[final].flip(-1)}), B + n_differ)):
        rows.clear()
        b, v = _paired_answer_logprob(iv, r, final, batch.answer_ids, memo)
        assert sum(rows) == n_rows
        torch.testing.assert_close(v[~r.same], m_var[~r.same], atol=1e-5, rtol=1e-5)
        if r is run:
            assert torch.equal(b, base) and torch.equal(v, var)
        else:  # a baseline that changed is unembedded: its own value, not the kept one
            assert not torch.allclose(b, base)
            assert torch.equal(v[r.same], b[:, None].expand_as(v)[r.same])


def test_lockstep_runs_each_batch_clean_pass_once_and_gives_each_analysis_its_own_result(monkeypatch):
    """Exact effects and AtP walked together (:func:`find_circuit`'s lockstep) with no cache budget: one clean pass
    per batch for both, where each alone makes its own, and the same results as each computed alone."""
    from saecircuits.analysis.circuit.estimates import _atp_steps
    from saecircuits.analysis.circuit.exact import _exact_steps
    from saecircuits.analysis.circuit.nodes import lockstep
    from saecircuits.models.hooks import task_batches
    from saecircuits.models.interventions import interventions_for

    model, task, saes, nodes, groups, _ = _setup("gpt_neo", "standard")
    means = node_means(model, task, groups)
    iv = interventions_for(model)
    iv.clear_cache()
    monkeypatch.setattr(iv, "cache_bytes", 0)
    passes = []
    make = iv._engine_clean
    monkeypatch.setattr(iv, "_engine_clean", lambda *a, **k: passes.append(1) or make(*a, **k))
    n_batches = len(list(task_batches(model, task, max_batch=3)))
    assert n_batches > 1
    want_ex = exact_effects(model, saes, task, nodes, groups, means=means, max_batch=3)
    want_atp = attribution_estimates(model, task, nodes, groups, means=means, max_batch=3)
    assert len(passes) == 2 * n_batches
    passes.clear()
    got_ex, got_atp = lockstep(iv, _exact_steps(model, saes, task, nodes, groups, means=means, max_batch=3),
                               _atp_steps(model, task, nodes, groups, means=means, max_batch=3))
    assert len(passes) == n_batches
    assert iv._last is None  # nothing kept after the block
    assert torch.equal(got_ex.node_effect, want_ex.node_effect) and got_ex.edges == want_ex.edges
    assert torch.equal(got_atp.node_effect, want_atp.node_effect) and got_atp.edges == want_atp.edges
