"""The circuit across positions: exact effects at positions before P against full-prompt bridge interventions (GPT-Neo
with a local layer on prompts longer than its window, GPT-2, Llama with rotary), padding-free batching, AtP against
autograd through the bridge, and the head-loading identity (the parts sum to the AtP edge)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import ARCHITECTURES, quote_task, random_sae

import saecircuits.analysis.circuit.positions as positions
from saecircuits.analysis.circuit.position_graph import position_means
from saecircuits.analysis.circuit.positions import (
    PromptNodes,
    ablation_baselines,
    attribution_edges,
    clean_cache,
    engine_of,
    exact_node_effects,
    head_loadings,
    node_attributions,
    position_groups,
)
from saecircuits.models.hooks import task_batches


@functools.cache
def _setup(arch: str):
    model = ARCHITECTURES[arch]()
    d_mlp = int(model.cfg.d_mlp)
    saes = [random_sae(d_in=d_mlp, hook_point="blocks.0.mlp.hook_post", seed=1),
            random_sae(d_in=d_mlp, hook_point="blocks.1.mlp.hook_post", seed=2)]
    return model, quote_task(), saes, position_groups(model, saes)


@functools.cache
def _baselines(arch: str):
    """The embeddings' mean-ablation values (:func:`ablation_baselines` of the task's position means)."""
    model, task, _, pg = _setup(arch)
    return ablation_baselines(pg, position_means(model, pg, task, max_batch=3))


def _first_batch(arch: str):
    """What most tests start from: ``_setup(arch)``, the engine, the embeddings' baselines, the task's first batch
    of 3 prompts, its clean cache and its tracked AtP pass: ``(model, task, saes, pg, eng, base, batch, clean, tr,
    contrib)``."""
    model, task, saes, pg = _setup(arch)
    eng = engine_of(model)
    base = _baselines(arch)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    clean = clean_cache(eng, batch)
    tr, contrib = node_attributions(eng, pg, batch, base)
    return model, task, saes, pg, eng, base, batch, clean, tr, contrib


def _bridge_ablate(model, pg, task, i, gi, local, t, read=None, base=None):
    """Prompt i alone, unpadded, through the bridge with node (gi, local) ablated at position t: (answer log-prob,
    SAE codes of group ``read`` at every position). An embedding (``base[gi]``) is set to its mean, written out here
    by hand; other non-SAE nodes to 0."""
    g = pg.groups[gi]
    base = base or {}
    store = {}

    def edit(v, hook=None):
        v = v.clone()
        x = v[0, t]
        if g.kind == "sae":
            sae = g.sae
            if local < sae.d_sae:
                v[0, t] = x - sae.encode(x)[local] * sae.W_dec[local]
            else:
                v[0, t] = sae.decode(sae.encode(x))
        elif g.kind == "heads":
            v[0, t, local] = 0
        elif gi in base:
            v[0, t] = base[gi]
        else:
            v[0, t] = 0
        return v

    def grab(v, hook=None):
        store["x"] = v[0].detach().clone()

    hooks = [(g.hook, edit)] + ([(pg.groups[read].hook_in, grab)] if read is not None else [])
    with torch.no_grad():
        lg = model.run_with_hooks(torch.tensor([task.token_ids[i]]), fwd_hooks=hooks)
    p = task.prediction_pos[i]
    codes = pg.groups[read].sae.encode(store["x"]) if read is not None else None
    return float(lg[0, p].float().log_softmax(-1)[task.answer_ids[i]]), codes


def _spy_on_exact_chunks(monkeypatch) -> list[list[int]]:
    """The prompt rows of every recomputation ``positions._exact_chunk`` runs from now on (appended as they run)."""
    rows_seen: list[list[int]] = []
    real = positions._exact_chunk

    def spy(engine, pg_, clean_, rows, *args):
        rows_seen.append(list(rows))
        return real(engine, pg_, clean_, rows, *args)

    monkeypatch.setattr(positions, "_exact_chunk", spy)
    return rows_seen


def _pick_nodes(pg, clean, contrib, b, n=6):
    """A spread of nodes of prompt b: every group at positions P, P-1, P-5, P-12, 0 (features: the most active)."""
    P = int(clean.batch.positions[b])
    gi, loc, pos = [], [], []
    for t in sorted({P, max(0, P - 1), max(0, P - 5), max(0, P - 12), 0}):
        for g_i, c in enumerate(contrib):
            row = c[b, t]
            if pg.groups[g_i].kind == "sae":
                active = torch.nonzero(row[:-1] != 0).flatten()
                picks = active[:2].tolist() + [len(row) - 1]
            else:
                picks = [len(row) - 1]
            for k in picks:
                gi.append(g_i)
                loc.append(k)
                pos.append(t)
    return PromptNodes(torch.tensor(gi), torch.tensor(loc), torch.tensor(pos))


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2", "llama"])
def test_exact_effects_at_earlier_positions_equal_full_prompt_interventions(arch):
    model, task, saes, pg = _setup(arch)
    eng = engine_of(model)
    assert max(task.prediction_pos) > 16  # longer than tiny_neo's local window
    batch = next(iter(task_batches(model, task, max_batch=3)))
    assert len(set(batch.positions.tolist())) > 1  # right padding
    clean = clean_cache(eng, batch)
    _, contrib = node_attributions(eng, pg, batch, _baselines(arch))
    nodes = [_pick_nodes(pg, clean, contrib, b) for b in range(len(batch.indices))]
    down_gi = next(i for i, g in enumerate(pg.groups) if g.sae is saes[1])
    down = []
    for b in range(len(batch.indices)):
        P = int(batch.positions[b])
        feats = torch.nonzero(contrib[down_gi][b, :, :-1] != 0)  # (t, k) of every feature with a gradient
        feats = feats[feats[:, 0] <= P][:40]
        down.append(PromptNodes(torch.full((len(feats),), down_gi), feats[:, 1], feats[:, 0]))
    base = _baselines(arch)
    assert {pg.groups[gi].hook for gi in base} >= {"hook_embed"}  # the embeddings are mean-ablated
    effects, edges, n_runs = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
    assert n_runs == sum(len(n.gi) for n in nodes)
    checked, embeds = 0, 0
    for b, i in enumerate(batch.indices):
        with torch.no_grad():
            lg, cache = model.run_with_cache(torch.tensor([task.token_ids[i]]))
        m_clean = float(lg[0, task.prediction_pos[i]].float().log_softmax(-1)[task.answer_ids[i]])
        cb = saes[1].encode(cache[pg.groups[down_gi].hook_in][0])
        for a in range(len(nodes[b].gi)):
            gi, loc, t = (int(nodes[b].gi[a]), int(nodes[b].local[a]), int(nodes[b].pos[a]))
            m1, c1 = _bridge_ablate(model, pg, task, i, gi, loc, t, read=down_gi, base=base)
            assert float(effects[b][a]) == pytest.approx(m_clean - m1, abs=2e-5), (arch, gi, loc, t)
            embeds += gi in base and t < task.prediction_pos[i] and abs(m_clean - m1) > 1e-4
            for c in range(len(down[b].gi)):
                td, kd = int(down[b].pos[c]), int(down[b].local[c])
                if td < t or pg.stage[gi] >= pg.stage_in[down_gi]:
                    continue
                want = float((cb[td, kd] - c1[td, kd]).detach())
                got = edges[b].get((a, c), 0.0)
                assert got == pytest.approx(want, abs=2e-5), (arch, gi, loc, t, td, kd)
                checked += abs(want) > 1e-4
    assert embeds >= 4  # mean-ablated embeddings before P, with a visible effect, were compared
    assert checked > 10


def test_right_padding_never_changes_a_number(monkeypatch):
    """Batched (right-padded, max_batch=4, variants split into chunks of one) and one prompt at a time give the same
    AtP and exact effects."""
    arch = "gpt_neo"
    model, task, saes, pg = _setup(arch)
    eng = engine_of(model)

    def run(max_batch):
        out = {}
        for batch in task_batches(model, task, max_batch=max_batch):
            clean = clean_cache(eng, batch)
            _, contrib = node_attributions(eng, pg, batch, _baselines(arch))
            nodes = [_pick_nodes(pg, clean, contrib, b) for b in range(len(batch.indices))]
            feats = [(n.local < torch.tensor([pg.n_local(int(g)) - 1 if pg.groups[int(g)].kind == "sae" else 0
                                              for g in n.gi])) for n in nodes]
            down = [PromptNodes(n.gi[f], n.local[f], n.pos[f]) for n, f in zip(nodes, feats, strict=True)]
            effects, edges, _ = exact_node_effects(eng, pg, clean, nodes, down, baselines=_baselines("gpt_neo"))
            for b, i in enumerate(batch.indices):
                atp = torch.stack([contrib[int(g)][b, int(t), int(k)] for g, k, t in
                                   zip(nodes[b].gi, nodes[b].local, nodes[b].pos, strict=True)])
                keys = sorted(edges[b])
                out[i] = (effects[b], atp, keys, torch.tensor([edges[b][k] for k in keys]))
        return out

    # one thread: the nodes are picked from the AtP values (active features, a TopK boundary), and a multi-threaded
    # float32 matmul rounds a row differently with its batch's shape (~1e-7), which can flip such a pick; the values
    # themselves are compared with tolerances below
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(1)
        monkeypatch.setattr(positions, "MAX_FLOATS", 1)  # one variant per chunk: rows run out of variants early
        many = run(4)
    finally:
        torch.set_num_threads(n_threads)
    for i in one:
        torch.testing.assert_close(many[i][0], one[i][0], atol=1e-5, rtol=1e-5)  # float32 rounding of another batch shape
        torch.testing.assert_close(many[i][1], one[i][1], atol=1e-5, rtol=1e-5)
        assert many[i][2] == one[i][2] and len(one[i][2]) > 0
        torch.testing.assert_close(many[i][3], one[i][3], atol=1e-5, rtol=1e-5)


def test_atp_at_earlier_positions_equals_autograd_through_the_bridge():
    arch = "gpt2"
    model, task, saes, pg = _setup(arch)
    eng = engine_of(model)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    _, contrib = node_attributions(eng, pg, batch, _baselines(arch))
    gi = next(i for i, g in enumerate(pg.groups) if g.hook == "blocks.0.attn.hook_z")
    for b, i in enumerate(batch.indices):
        p = task.prediction_pos[i]
        box = {}

        def hook(v, hook=None, box=box):
            leaf = v.detach().clone().requires_grad_(True)
            box["z"] = leaf
            return leaf

        lg = model.run_with_hooks(torch.tensor([task.token_ids[i]]), fwd_hooks=[(pg.groups[gi].hook, hook)])
        m = lg[0, p].float().log_softmax(-1)[task.answer_ids[i]]
        (gz,) = torch.autograd.grad(m, [box["z"]])
        want = (gz * box["z"]).sum(-1)[0].detach().double()  # [T, H]
        torch.testing.assert_close(contrib[gi][b, : p + 1], want[: p + 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_head_loadings_sum_to_the_atp_edge(arch):
    model, task, saes, pg = _setup(arch)
    eng = engine_of(model)
    batch = next(iter(task_batches(model, task, max_batch=2)))
    clean = clean_cache(eng, batch)
    tr, contrib = node_attributions(eng, pg, batch, _baselines(arch))
    down_gi = next(i for i, g in enumerate(pg.groups) if g.sae is saes[1])
    up, down, targets = [], [], []
    for b in range(len(batch.indices)):
        P = int(batch.positions[b])
        nd = _pick_nodes(pg, clean, contrib, b)
        early = nd.pos < P
        up.append(PromptNodes(nd.gi[early], nd.local[early], nd.pos[early]))
        k = int(torch.nonzero(contrib[down_gi][b, P, :-1] != 0).flatten()[0])
        down.append(PromptNodes(torch.tensor([down_gi]), torch.tensor([k]), torch.tensor([P])))
        targets.append([0, -1])
    atp = attribution_edges(pg, tr, up, down)
    loads = head_loadings(eng, pg, clean, tr, up, down, targets)
    n = 0
    for b in range(len(up)):
        for a in range(len(up[b].gi)):
            parts = loads[b].get((a, 0))
            want = atp[b].get((a, 0))
            if want is None:
                continue
            assert parts is not None
            assert sum(parts) == pytest.approx(want, abs=1e-5, rel=1e-4)
            # into the target: the parts sum to the node's AtP effect (grad of m . a)
            u = up[b]
            node_atp = float(contrib[int(u.gi[a])][b, int(u.pos[a]), int(u.local[a])])
            assert sum(loads[b][(a, -1)]) == pytest.approx(node_atp, abs=1e-5, rel=1e-4)
            n += (abs(want) > 1e-4) + (abs(node_atp) > 1e-4)
    assert n > 3


def test_position_means_equal_a_run_with_cache_average():
    """Each group's mean over the task's prompts and every position <= P, against run_with_cache per prompt."""
    from saecircuits.analysis.circuit.position_graph import position_means

    model, task, saes, pg = _setup("gpt_neo")
    means = position_means(model, pg, task, max_batch=3)
    sums, n = {}, 0
    for i, row in enumerate(task.token_ids):
        P = task.prediction_pos[i]
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([row]))
        n += P + 1
        for gi, g in enumerate(pg.groups):
            x = cache[g.hook][0, : P + 1].float()
            if g.kind == "sae":
                f = g.sae.encode(x)
                vals = {"f": f.sum(0), "e": (x - g.sae.decode(f)).sum(0)}
            else:
                vals = {"x": x.sum(0)}
            for k, v in vals.items():
                sums[(gi, k)] = sums.get((gi, k), 0) + v
    for (gi, k), v in sums.items():
        got = means[gi][k] if k != "x" else means[gi]
        torch.testing.assert_close(got, (v / n).detach(), atol=1e-5, rtol=1e-4)


def test_mean_ablation_at_every_position_equals_bridge_hooks():
    """The faithfulness run's variants against full-prompt bridge runs: 'everything mean-ablated' sets each group's
    activation at every position <= P to its mean (an SAE's output to decode(mean f) + mean error), and 'circuit
    ablated' mean-ablates only the circuit's nodes (a head at one position, a feature at another), 'outside ablated'
    every node but them."""
    from saecircuits.analysis.circuit.position_graph import _faithfulness_batch, position_means

    model, task, saes, pg = _setup("gpt_neo")
    eng = engine_of(model)
    means = position_means(model, pg, task, max_batch=3)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    head_gi = next(i for i, g in enumerate(pg.groups) if g.kind == "heads")
    sae_gi = next(i for i, g in enumerate(pg.groups) if g.sae is saes[1])
    graphs, keys, circuits = [], [], []
    for i in batch.indices:
        P = task.prediction_pos[i]
        f = saes[1].encode(model.run_with_cache(torch.tensor([task.token_ids[i]]))[1][saes[1].hook_point][0, P - 2])
        k = int(torch.argmax(f))
        circ = [(head_gi, 2, P - 3), (sae_gi, k, P - 2)]
        circuits.append(circ)
        nodes = [{"id": f"n{j}", "kind": "x", "pos": t, "in_graph": True} for j, (_, _, t) in enumerate(circ)]
        graphs.append({"nodes": nodes})
        keys.append({f"n{j}": c for j, c in enumerate(circ)})
    got = _faithfulness_batch(eng, pg, batch, graphs, keys, means)
    # a second circuit in the same forward (columns 4, 5): here the first one again, so the same numbers
    again = _faithfulness_batch(eng, pg, batch, graphs, keys, means, more=[(graphs, keys)])
    torch.testing.assert_close(again[:, 4:], got[:, 2:], atol=1e-5, rtol=1e-5)
    for b, i in enumerate(batch.indices):
        P = task.prediction_pos[i]

        def everything(g, gi, P=P):
            mu = means[gi]

            def hook(v, hook=None):
                v = v.clone()
                if g.kind == "sae":
                    v[0, : P + 1] = (g.sae.decode(mu["f"]) + mu["e"]).to(v)
                else:
                    v[0, : P + 1] = mu.to(v)
                return v
            return hook

        def circuit(g, gi, circ=circuits[b]):
            mu = means[gi]

            def hook(v, hook=None):
                v = v.clone()
                for cg, k, t in circ:
                    if cg != gi:
                        continue
                    if g.kind == "sae":
                        f = g.sae.encode(v[0, t])
                        v[0, t] = v[0, t] - (f[k] - mu["f"][k]) * g.sae.W_dec[k]
                    else:
                        v[0, t, k] = mu[k]
                return v
            return hook

        def outside(g, gi, P=P, circ=circuits[b]):  # every node but the circuit's at its mean
            mu = means[gi]

            def hook(v, hook=None):
                clean = v.clone()
                v = everything(g, gi)(v)
                for cg, k, t in circ:
                    if cg != gi:
                        continue
                    if g.kind == "sae":
                        f = g.sae.encode(clean[0, t])
                        v[0, t] = v[0, t] + (f[k] - mu["f"][k]) * g.sae.W_dec[k]
                    else:
                        v[0, t, k] = clean[0, t, k]
                return v
            return hook

        for col, make in ((1, everything), (2, outside), (3, circuit)):
            with torch.no_grad():
                lg = model.run_with_hooks(torch.tensor([task.token_ids[i]]),
                                          fwd_hooks=[(g.hook, make(g, gi)) for gi, g in enumerate(pg.groups)])
            want = float(lg[0, P].float().log_softmax(-1)[task.answer_ids[i]])
            assert float(got[b, col]) == pytest.approx(want, abs=2e-5), (b, col)
        with torch.no_grad():
            lg = model(torch.tensor([task.token_ids[i]]))
        assert float(got[b, 0]) == pytest.approx(float(lg[0, P].float().log_softmax(-1)[task.answer_ids[i]]),
                                                  abs=2e-5)


@functools.cache
def _positions_out():
    from saecircuits.analysis.circuit.position_graph import position_circuit

    model, task, saes, _ = _setup("gpt_neo")
    return position_circuit(model, saes, task, top_exact=30, n_examples=3, max_batch=3, progress=False)


def test_aggregated_nodes_carry_exact_means_over_every_prompt():
    """Each aggregated node marked exact: its mean over ALL prompts of a full-prompt bridge ablation at its column's
    position in each prompt (0 where the prompt lacks the position, or the feature is inactive there), the mean
    ablation of an embedding written out by hand; the AtP mean beside it; and its edge into the target."""
    from saecircuits.analysis.circuit.aggregate import column_of

    model, task, saes, pg = _setup("gpt_neo")
    out = _positions_out()
    base = _baselines("gpt_neo")
    verified = [n for n in out["aggregated"]["nodes"] if n.get("values") == "exact"]
    kinds = {n["kind"] for n in verified}
    assert len(verified) >= 3
    checked = 0
    for nd in sorted(verified, key=lambda n: -abs(n["mean_exact"]))[:4] + [n for n in verified
                                                                          if n["kind"] in ("embed", "pos_embed")][:2]:
        kind, layer, index = nd["id"].rpartition("@")[0].split(":")
        gi = next(g for g in range(len(pg.groups)) if pg.layer[g] == int(layer) and (
            pg.names[g] == kind or (pg.names[g] == "sae" and kind in ("feature", "error"))))
        local = pg.groups[gi].sae.d_sae if kind == "error" else int(index)
        vals, present = [], 0
        for i in range(task.n_prompts):
            P = task.prediction_pos[i]
            anchors = {**task.anchors(i), "P": P}
            pos = [t for t in range(P + 1) if column_of(t, P, anchors) == nd["column"]]
            if not pos:
                vals.append(0.0)
                continue
            t = pos[0]
            if kind == "feature":
                with torch.no_grad():
                    _, cache = model.run_with_cache(torch.tensor([task.token_ids[i]]))
                if float(pg.groups[gi].sae.encode(cache[pg.groups[gi].hook_in][0, t])[local]) == 0:
                    vals.append(0.0)
                    continue
            with torch.no_grad():
                lg = model(torch.tensor([task.token_ids[i]]))
            m0 = float(lg[0, P].float().log_softmax(-1)[task.answer_ids[i]])
            m1, _ = _bridge_ablate(model, pg, task, i, gi, local, t, base=base)
            vals.append(m0 - m1)
            present += 1
        assert nd["n_prompts"] == present, nd["id"]
        assert nd["mean_exact"] == pytest.approx(sum(vals) / len(vals), abs=2e-5, rel=1e-4), nd["id"]
        into = [e for e in out["aggregated"]["edges"] if e["src"] == nd["id"] and e["dst"].startswith("target:")]
        assert len(into) == 1 and into[0]["mean_exact"] == nd["mean_exact"]
        checked += 1
    assert checked >= 3 and kinds


def test_the_embeddings_at_every_anchor_column_are_measured_exactly():
    """AtP underestimates the embeddings (the demo's at P: exact 2.45 nats, AtP 0.078), so the AtP-pruned graphs
    that choose the aggregated graph's candidates can drop them: the token and position embeddings at every anchor
    column and P are measured on every prompt anyway, each against the bridge in the test above when among its
    picks; here, that every one is there, exact, on every prompt holding its column."""
    model, task, saes, pg = _setup("gpt_neo")
    out = _positions_out()
    nodes = {n["id"]: n for n in out["aggregated"]["nodes"]}
    named = [c for c in out["aggregated"]["columns"] if not c.startswith("P-")]
    assert "P" in named and len(named) >= 3
    kinds = [k for k in ("embed", "pos_embed") if k in pg.names]
    for column in named:
        n_here = sum(1 for i in range(task.n_prompts) if column == "P" or column in task.anchors(i))
        for kind in kinds:
            nd = nodes[f"{kind}:-1:0@{column}"]
            assert nd["values"] == "exact" and nd["mean_exact"] is not None, nd["id"]
            assert nd["n_prompts"] == n_here, nd["id"]
    assert "the token and position embeddings at every anchor column" in out["aggregated"]["candidates"]["rule"]


def test_position_circuit_follows_the_contract():
    """Keys, units and identities of the "positions" dict: every node of an example has an exact effect, the
    target edges carry the node effects, head loadings sum to the AtP edge, the reduced copy keeps in_graph items."""
    import json

    from saecircuits.analysis.circuit.position_graph import reduced_positions

    model, task, saes, pg = _setup("gpt_neo")
    out = _positions_out()
    json.dumps(out, allow_nan=False)
    assert out["n_prompts"] == task.n_prompts and len(out["examples"]) == 3
    agg = out["aggregated"]
    verified = [n for n in agg["nodes"] if n.get("values") == "exact"]
    assert verified and all(n["values"] == "estimated" and n["mean_exact"] is None and not n["in_graph"]
                            for n in agg["nodes"] if n["kind"] != "target" and n not in verified)
    assert all(n["mean_exact"] is not None and n["ci95"] is not None for n in verified)
    # the example prompts' nodes (the top 30 by |AtP| and every node within 2 of P), then every candidate on every
    # prompt holding it
    n_ex = [len(g["nodes"]) - 1 for g in out["examples"]]
    assert min(n_ex) > 30 and "top 30 nodes by |AtP| and every node at most 2 positions" in out["example_nodes"]
    assert out["n_exact_interventions"] == sum(n_ex) + sum(n["n_prompts"] for n in verified)
    assert {"nodes", "edges", "by_distance"} <= set(out["agreement"])
    for g in out["examples"]:
        nodes = {n["id"]: n for n in g["nodes"]}
        assert sum(n["kind"] == "target" for n in nodes.values()) == 1
        assert all(n["exact"] is not None for n in nodes.values() if n["kind"] != "target")
        assert all(n["pos"] <= g["P"] for n in nodes.values())
        assert len(g["tokens"]) == g["P"] + 1 and g["anchors"]["P"] == g["P"]
        for e in g["edges"]:
            if e["dst"].startswith("target:"):
                assert e["exact"] == nodes[e["src"]]["exact"] and e["atp"] == nodes[e["src"]]["atp"]
            if e["heads"]:
                assert nodes[e["src"]]["pos"] < nodes[e["dst"]]["pos"]
                assert sum(h["value"] for h in e["heads"]) == pytest.approx(e["atp"], abs=1e-4, rel=1e-3)
    # every node's edge into the target is in the file (one per node, never capped), the cap says what it left out
    for g in out["examples"] + [out["aggregated"]]:
        target = next(n["id"] for n in g["nodes"] if n["kind"] == "target")
        into = [e["src"] for e in g["edges"] if e["dst"] == target]
        assert sorted(into) == sorted(n["id"] for n in g["nodes"] if n["kind"] != "target"
                                      and n.get("values") != "estimated")
        # every kept node has a kept path to the target (issue 16: most kept nodes had no kept edge)
        kept = {n["id"] for n in g["nodes"] if n["in_graph"]}
        kept_edges = [(e["src"], e["dst"]) for e in g["edges"] if e["in_graph"]]
        assert all(s in kept and d in kept for s, d in kept_edges)
        seen = {target}
        while more := {s for s, d in kept_edges if d in seen} - seen:
            seen |= more
        assert seen == kept, kept - seen
    for g in out["examples"]:
        cap = g["edge_cap"]
        others = sum(1 for e in g["edges"] if not e["dst"].startswith("target:"))
        assert cap["max_edges"] == 500 and others <= 500 and (cap["n_left_out"] == 0 or others == 500)
    assert next(n for n in agg["nodes"] if n["kind"] == "target")["values"] == "target"
    assert "selection.faithfulness" in out["views"] and "aggregated.faithfulness" in out["views"]
    red = reduced_positions(out)
    assert all(n["in_graph"] for g in red["examples"] for n in g["nodes"])
    assert all(e["in_graph"] for g in red["examples"] for e in g["edges"])
    # results.json's typed model declares every key (no extras) and round-trips the reduced copy exactly
    from saecircuits.results.positions import Positions

    red = json.loads(json.dumps(red))
    typed = Positions.model_validate(red)
    assert typed.to_json_dict() == red

    def no_extras(m):
        assert not (m.__pydantic_extra__ or {}), (type(m).__name__, list(m.__pydantic_extra__))
        for name in type(m).model_fields:
            for v in (lambda x: x if isinstance(x, list) else [x])(getattr(m, name)):
                if hasattr(type(v), "model_fields"):
                    no_extras(v)

    no_extras(typed)


def _copying_toy():
    """A 2-layer GPT-2 wired by hand whose circuit is known: token A (id 1 + c, c in {0, 1}) fires MLP0 neuron c,
    which writes residual dim 8 + c at A's position; head L1H0's query reads the filler dim 7 (every token) and its
    key dims 8-9, so at P it attends to A's position, copies dim 8 + c (value) into dim 12 + c (output), and the
    unembedding reads dim 12 + c as the answer token 9 + c. Every other weight is 0 (L1H1 attends uniformly and
    writes nothing); an identity SAE on MLP0. Half the prompts hold each A, so mean ablation removes the answer."""
    from helpers import tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from saecircuits.models.load import load_hf_model
    from saecircuits.saes.base import SAE, SAEConfig
    from saecircuits.tasks.base import Task

    tok = tiny_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=8,
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
        E[:, 7] = 1.0
        mlp0 = hf.transformer.h[0].mlp
        mlp0.c_fc.bias[2:] = -5.0
        hf.transformer.h[1].mlp.c_fc.bias[:] = -5.0
        attn = hf.transformer.h[1].attn
        attn.c_attn.weight[7, 0] = 3.0  # Q, head 0
        for c in (0, 1):
            E[1 + c, c] = 4.0
            mlp0.c_fc.weight[c, c], mlp0.c_fc.bias[c] = 1.0, -0.5
            mlp0.c_proj.weight[c, 8 + c] = 4.0
            attn.c_attn.weight[8 + c, 16] = 3.0  # K, head 0
            attn.c_attn.weight[8 + c, 32 + 1 + c] = 1.0  # V, head 0
            attn.c_proj.weight[1 + c, 12 + c] = 4.0  # O, head 0
            hf.lm_head.weight[9 + c, 12 + c] = 4.0
    model = load_hf_model(hf, tok)
    sae = SAE(SAEConfig("standard", d_in=8, d_sae=8, hook_point="blocks.0.mlp.hook_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
    rows = [[0] + [20 + j] * a + [1 + c] + [21 + j] * (4 - a) + [23] for c in range(2) for j in range(2)
            for a in range(4)]
    return model, [sae], Task("copy", [""] * len(rows), rows, [9 + r[a + 1] - 1 for r in rows
                                                              for a in [next(i for i, t in enumerate(r[1:]) if t < 3)]])


def test_a_hand_wired_copying_circuit_is_recovered_exactly():
    from saecircuits.analysis.circuit.position_graph import position_circuit

    model, saes, task = _copying_toy()
    out = position_circuit(model, saes, task, top_exact=40, n_examples=task.n_prompts, progress=False)
    for g, row in zip(out["examples"], task.token_ids, strict=True):
        a_pos = next(i for i, t in enumerate(row) if t in (1, 2))
        nodes = {n["id"]: n for n in g["nodes"]}
        feat = f"feature:0:{row[a_pos] - 1}@{a_pos}"
        assert feat in nodes
        # the largest feature node is the one written at A's position, and it clearly supports the answer
        feats = [n for n in nodes.values() if n["kind"] == "feature"]
        assert max(feats, key=lambda n: abs(n["exact"]))["id"] == feat and nodes[feat]["exact"] > 0.5
        # its edge into the target is the largest from any earlier position but the token embedding that fires it
        into = sorted((e for e in g["edges"] if e["dst"].startswith("target:")
                       and nodes[e["src"]]["pos"] < g["P"]), key=lambda e: -abs(e["exact"]))
        assert {e["src"] for e in into[:2]} == {feat, f"embed:-1:0@{a_pos}"}
        # the head loading of that edge is on L1H0, and the loadings sum to the AtP edge
        edge = next(e for e in into if e["src"] == feat)
        loads = {h["head"]: h["value"] for h in edge["heads"]}
        assert max(loads, key=lambda h: abs(loads[h])) == "L1H0"
        assert abs(loads["L1H0"]) > 0.95 * sum(abs(v) for v in loads.values())
        assert sum(loads.values()) == pytest.approx(edge["atp"], rel=1e-3, abs=1e-5)
        assert nodes[feat]["in_graph"] and edge["in_graph"]
    # without the pruned circuits the answer is gone (mean ablation at every position); with them alone it is
    # partly kept: mean-ablating the features at the other positions writes their mean (half A, half B) into the
    # keys and values L1H0 reads, which dilutes the copy, and so does mean-ablating the filler tokens' embeddings
    # (their mean holds some of A's dimensions, which after the norm fires MLP0's neurons there)
    assert out["completeness"]["mean"] < 0.05
    assert 0.1 < out["faithfulness"]["mean"] <= 1.0
    assert out["aggregated"]["faithfulness"]["mean"] is not None  # the aggregated circuit on every prompt


def test_column_position_inverts_column_of():
    """The aggregated graph's columns map back to one position per prompt (what the exact verification ablates):
    the inverse of column_of, None where a prompt has no such position."""
    from saecircuits.analysis.circuit.aggregate import column_of
    from saecircuits.analysis.circuit.position_graph import _column_position

    P, anchors = 9, {"P": 9, "open_quote": 3, "said": 1}
    for pos in range(P + 1):
        assert _column_position(column_of(pos, P, anchors), P, anchors) == pos
    assert _column_position("P-6", P, anchors) is None  # position 3 is the opening quote's column here
    assert _column_position("P-12", P, anchors) is None and _column_position("last_word", P, anchors) is None


def test_piece_width_minimises_the_variants_computed():
    """Hand-worked: prompts with 1, 1, 1 and 30 nodes at one distance. Width w costs sum(ceil(c / w) * (1 + w))
    variants (each row adds its clean variant): w = 30 (one row per prompt, padded to the largest) 124, w = 1 66,
    w = 2 54, w = 3 52, w = 4 55, w = 5 54; the cap bounds it."""
    from saecircuits.analysis.circuit.positions import _piece_width

    assert _piece_width([1, 1, 1, 30], cap=100) == 3
    assert _piece_width([1, 1, 1, 30], cap=2) == 2
    assert _piece_width([4, 4], cap=100) == 4  # even counts: one row per prompt


def test_a_prompt_with_many_nodes_at_one_distance_fills_several_rows(monkeypatch):
    """One prompt with a dozen active features at P - 3, the others with one per SAE there: the many are
    split into rows of their own (the same prompt in several rows of one recomputation), and every effect still
    equals the full-prompt bridge intervention."""
    arch = "gpt_neo"
    model, task, saes, pg, eng, base, batch, clean, tr, contrib = _first_batch(arch)
    nodes = []
    for b in range(len(batch.indices)):
        t = int(batch.positions[b]) - 3
        gi, loc = [], []
        for g_i, c in enumerate(contrib):
            if pg.groups[g_i].kind == "sae":
                active = torch.nonzero(c[b, t, :-1] != 0).flatten().tolist()
                picks = active[:12] if b == 0 else active[:1]
                gi += [g_i] * len(picks)
                loc += picks
        nodes.append(PromptNodes(torch.tensor(gi), torch.tensor(loc), torch.full((len(gi),), t)))
    assert len(nodes[0].gi) >= 8 and all(1 <= len(n.gi) <= 2 for n in nodes[1:])
    rows_seen = _spy_on_exact_chunks(monkeypatch)
    effects, _, n_runs = exact_node_effects(eng, pg, clean, nodes, None, baselines=base)
    assert n_runs == sum(len(n.gi) for n in nodes)
    assert any(r.count(0) > 1 for r in rows_seen)  # prompt 0 filled several rows
    for b, i in enumerate(batch.indices):
        with torch.no_grad():
            lg = model(torch.tensor([task.token_ids[i]]))
        m_clean = float(lg[0, task.prediction_pos[i]].float().log_softmax(-1)[task.answer_ids[i]])
        for a in range(len(nodes[b].gi)):
            m1, _ = _bridge_ablate(model, pg, task, i, int(nodes[b].gi[a]), int(nodes[b].local[a]),
                                   int(nodes[b].pos[a]), base=base)
            assert float(effects[b][a]) == pytest.approx(m_clean - m1, abs=2e-5)



def test_edge_agreement_pairs_carry_the_source_distance_from_p():
    """The agreement pairs of an example prompt's edges are binned (``agreement.edges_by_distance``) by the SOURCE's
    distance from P (how far the evidence travels; binned by the destination, nearly every edge sat at distance 0):
    three hand-placed nodes, two AtP edges into the feature at P."""
    from types import SimpleNamespace

    from saecircuits.analysis.circuit.position_graph import _graph, _node_ids

    model, task, saes, pg = _setup("gpt_neo")
    gi = next(i for i, g in enumerate(pg.groups) if g.sae is saes[1])
    heads = next(i for i, g in enumerate(pg.groups) if g.kind == "heads")
    P = 9
    # nodes: a head at P-7, a feature at P-2, a feature at P (the destination)
    c = PromptNodes(torch.tensor([heads, gi, gi]), torch.tensor([1, 5, 6]), torch.tensor([P - 7, P - 2, P]))
    f = torch.zeros(1, 1, P + 1, saes[1].d_sae)
    tr = SimpleNamespace(leaves=[(f, None) if g.kind == "sae" else (None,) for g in pg.groups])
    pairs = {"nodes": ([], [], []), "edges": ([], [], [])}
    _graph(pg, _node_ids(pg, saes), [], c, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
           torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64), {(0, 0): 0.25, (1, 0): -0.5},
           {(0, 0): 0.2, (1, 0): -0.4}, {}, torch.tensor([2]), tr, 0, P, 2, 500, pairs, {})
    assert pairs["edges"] == ([0.2, -0.4], [0.25, -0.5], [7, 2])
    assert pairs["nodes"][2] == [7, 2, 0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sae_contributions_at_every_position_equal_the_dense_products(arch):
    """Pass A's SAE contributions (float64 products at the active features only) against the dense products of
    every feature's gradient and code (the circuit at P's ``_contributions``): the same floats where a feature is
    active and for the error; the inactive features, never nodes, hold 0."""
    from saecircuits.analysis.circuit import _contributions

    model, task, saes, pg = _setup(arch)
    eng = engine_of(model)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    tr, contrib = node_attributions(eng, pg, batch, _baselines(arch))
    with torch.enable_grad():
        grads = torch.autograd.grad(tr.m.sum(), tr.flat(), retain_graph=True, allow_unused=True)
    n_sae = 0
    for gi, g in enumerate(pg.groups):
        if g.kind != "sae":
            continue
        n_sae += 1
        f, e = tr.leaves[gi]
        dense = _contributions(g, (f, e), (tr.feature_grad(g, grads[gi]), grads[gi]))[:, 0]  # [B, T, d_sae + 1]
        active = torch.cat([f[:, 0] != 0, torch.ones_like(f[:, 0, :, :1], dtype=torch.bool)], dim=-1)
        assert bool(active[..., :-1].any()) and not bool(active[..., :-1].all())
        assert torch.equal(contrib[gi][active], dense[active])
        assert bool((contrib[gi][~active] == 0).all())
    assert n_sae == len(saes)


def test_faithfulness_clean_column_from_the_clean_pass_equals_its_own_forward():
    """Pass D's clean column taken from pass C's clean pass of the batch (``clean_m``) against the forward it
    replaces: the same numbers in every column."""
    from saecircuits.analysis.circuit.position_graph import _faithfulness_batch

    model, task, saes, pg = _setup("gpt_neo")
    eng = engine_of(model)
    means = position_means(model, pg, task, max_batch=3)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    sae_gi = next(i for i, g in enumerate(pg.groups) if g.kind == "sae")
    graphs = [{"nodes": [{"id": "n0", "kind": "x", "pos": 1, "in_graph": True}]} for _ in batch.indices]
    keys = [{"n0": (sae_gi, saes[0].d_sae, 1)} for _ in batch.indices]  # the error node at position 1
    want = _faithfulness_batch(eng, pg, batch, graphs, keys, means)
    got = _faithfulness_batch(eng, pg, batch, graphs, keys, means, clean_m=clean_cache(eng, batch).m)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert bool((want[:, 0] != want[:, 1]).all())  # the clean column is not the everything-ablated one


def test_largest_edges_equal_the_heap_over_every_edge():
    """A prompt's capped edges (arrays, ``_largest_edges``) against ``heapq.nsmallest`` over ``(-max(|atp|,
    |exact|), source, destination)`` of every edge with a non-zero value: the same edges in the same order, ties
    included, and the same count left out."""
    import heapq
    import random

    from saecircuits.analysis.circuit.position_graph import _largest_edges

    rng = random.Random(0)
    levels = [0.0, 0.5, -0.5, 0.25, 1e-3, -2.0]  # few values: many ties
    for trial in range(20):
        ex = {(rng.randrange(30), rng.randrange(12)): rng.choice(levels) for _ in range(rng.randrange(0, 200))}
        at = {(rng.randrange(30), rng.randrange(12)): rng.choice(levels) for _ in range(rng.randrange(0, 60))}
        cand = []
        for a, j in set(at) | set(ex):
            v, e = at.get((a, j)), ex.get((a, j), 0.0)
            if v or e != 0.0:
                cand.append((-max(abs(v or 0.0), abs(e)), a, j))
        cap = rng.choice([0, 5, 40, 1000])
        got, left = _largest_edges(at, ex, cap)
        assert got == heapq.nsmallest(cap, cand), trial
        assert left == max(0, len(cand) - cap)


def test_json_floats_of_a_list_equal_each_float_rounded_alone():
    """The graph's floats formatted a list at a time (``_fs``) against one at a time (``_f``): the same 6
    significant digits, signed zeros, and None for inf and NaN."""
    import math
    import random

    from saecircuits.analysis.circuit.position_graph import _f, _fs

    rng = random.Random(1)
    xs = [rng.gauss(0, 10 ** rng.randint(-12, 12)) for _ in range(5000)]
    xs += [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308, 123456.5, 0.1]
    got, want = _fs(xs), [_f(x) for x in xs]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None and w is None) or (g == w and math.copysign(1, g) == math.copysign(1, w)), (g, w)
    assert _fs([]) == []


def test_aggregated_edges_carry_exact_means_over_every_prompt():
    """The aggregated graph's edges between candidates (pass C's exact edges, stored per batch from arrays): each
    edge's mean over ALL prompts of ``f_d(clean) - f_d(u ablated)`` through full-prompt bridge runs, the source
    ablated at its column's position and the downstream code read at its own, 0 where a prompt lacks either node
    (no such position, or a feature inactive there)."""
    from saecircuits.analysis.circuit.aggregate import column_of

    model, task, saes, pg = _setup("gpt_neo")
    out = _positions_out()
    base = _baselines("gpt_neo")

    def node(nid):
        ident, _, column = nid.partition("@")
        kind, layer, index = ident.split(":")
        gi = next(g for g in range(len(pg.groups)) if pg.layer[g] == int(layer) and (
            pg.names[g] == kind or (pg.names[g] == "sae" and kind in ("feature", "error"))))
        return kind, gi, (pg.groups[gi].sae.d_sae if kind == "error" else int(index)), column

    edges = [e for e in out["aggregated"]["edges"] if not e["dst"].startswith("target:") and e["mean_exact"]]
    assert edges, "no exact edge between candidates"
    for e in sorted(edges, key=lambda e: -abs(e["mean_exact"]))[:2]:
        (ku, gu, lu, cu), (_, gd, ld, cd) = node(e["src"]), node(e["dst"])
        vals = []
        for i in range(task.n_prompts):
            P = task.prediction_pos[i]
            anchors = {**task.anchors(i), "P": P}
            tu = [t for t in range(P + 1) if column_of(t, P, anchors) == cu]
            td = [t for t in range(P + 1) if column_of(t, P, anchors) == cd]
            with torch.no_grad():
                _, cache = model.run_with_cache(torch.tensor([task.token_ids[i]]))
                f_clean = pg.groups[gd].sae.encode(cache[pg.groups[gd].hook_in][0])  # [T, d_sae]
                f_up = pg.groups[gu].sae.encode(cache[pg.groups[gu].hook_in][0]) if ku == "feature" else None
            if not tu or not td or float(f_clean[td[0], ld]) == 0 or (f_up is not None and float(f_up[tu[0], lu]) == 0):
                vals.append(0.0)
                continue
            _, codes = _bridge_ablate(model, pg, task, i, gu, lu, tu[0], read=gd, base=base)
            vals.append(float((f_clean[td[0], ld] - codes[td[0], ld]).detach()))
        assert e["mean_exact"] == pytest.approx(sum(vals) / len(vals), abs=2e-5, rel=1e-4), (e["src"], e["dst"])


def test_atp_edges_over_several_slots_equal_the_dense_contributions():
    """AtP edges into several downstream features per prompt (the gather plan built once and reused over the slots;
    one prompt with fewer slots than the other) against the dense contributions of each target's own backward
    pass (every node's ``grad . activation`` at every position, :meth:`Tracked.contributions`)."""
    from saecircuits.analysis.circuit.positions import PromptNodes

    arch = "gpt2"
    model, task, saes, pg, eng, base, batch, clean, tr, contrib = _first_batch(arch)
    down_gi = next(i for i, g in enumerate(pg.groups) if g.sae is saes[1])
    up, down = [], []
    for b in range(len(batch.indices)):
        P = int(batch.positions[b])
        up.append(_pick_nodes(pg, clean, contrib, b))
        ks = torch.nonzero(contrib[down_gi][b, P, :-1] != 0).flatten()[: 3 if b == 0 else 2]
        down.append(PromptNodes(torch.full_like(ks, down_gi), ks, torch.full_like(ks, P)))
    atp = attribution_edges(pg, tr, up, down)
    n = 0
    for b in range(len(up)):
        for j in range(len(down[b].gi)):
            with torch.enable_grad():
                target = tr.feature(pg, down_gi, b, int(down[b].pos[j]), int(down[b].local[j]))
                grads = torch.autograd.grad(target, tr.flat(), retain_graph=True, allow_unused=True)
            dense = tr.contributions(pg, grads)
            for a in range(len(up[b].gi)):
                gi, k, t = int(up[b].gi[a]), int(up[b].local[a]), int(up[b].pos[a])
                if (a, j) not in atp[b]:
                    assert pg.stage[gi] >= pg.stage_in[down_gi]  # only pairs that cannot be edges are left out
                    continue
                assert atp[b][(a, j)] == pytest.approx(float(dense[gi][b, t, k]), abs=1e-6, rel=1e-5), (b, a, j)
                n += abs(float(dense[gi][b, t, k])) > 1e-6
    assert n > 10 and len(down[0].gi) > len(down[1].gi)


def _per_row_chunk_edges(pg, rows, sel, d, P, nodes, down, reads, edges, dev):
    """The per-row loop :func:`~saecircuits.analysis.circuit.positions._chunk_edges` replaced (the old path, kept
    here as its reference): per SAE group read and row, that row's clean and upstream variants at its downstream
    positions encoded, then each (variant, downstream node) entry read."""
    jobs: dict[int, list] = {gi: [] for gi in reads}
    stage_of = torch.tensor(pg.stage, dtype=torch.long)
    for i, (b, s) in enumerate(zip(rows, sel, strict=True)):
        if not len(s):
            continue
        dn = down[b]
        t_b = int(P[i]) - d
        up_stage = stage_of[nodes[b].gi[s]]
        for gi in reads:
            want = torch.nonzero((dn.gi == gi) & (dn.pos >= t_b)).flatten()
            if not len(want) or pg.stage_in[gi] <= int(up_stage.min()):
                continue
            where, col = torch.unique(dn.pos[want] - t_b, return_inverse=True)
            jobs[gi].append((i, b, s, up_stage, want, where, col))
    for gi, items in jobs.items():
        x_in = reads[gi]
        if not items or x_in.shape[1] == 1:
            continue
        g = pg.groups[gi]
        parts, blocks = [], []
        for i, _, _, up_stage, _, where, _ in items:
            up = torch.nonzero(up_stage < pg.stage_in[gi]).flatten()
            vrows = torch.cat([torch.zeros(1, dtype=torch.long), 1 + up]).to(dev)
            xs = g.sae.flatten_input(x_in[i, vrows][:, where.to(dev)])
            parts.append(xs.reshape(-1, xs.shape[-1]))
            blocks.append((up, len(vrows), len(where)))
        f_all = g.sae.encode(torch.cat(parts)).float()
        o = 0
        clean_at, var_at, feat, b_of, u_of, d_of = [], [], [], [], [], []
        for (_, b, s, _, want, _, col), (up, nv, nw) in zip(items, blocks, strict=True):
            w = len(want)
            var_at.append((o + nw * (1 + torch.arange(nv - 1))[:, None] + col[None]).flatten())
            clean_at.append((o + col).repeat(nv - 1))
            feat.append(down[b].local[want].repeat(nv - 1))
            b_of.append(torch.full(((nv - 1) * w,), b, dtype=torch.long))
            u_of.append(s[up].repeat_interleave(w))
            d_of.append(want.repeat(nv - 1))
            o += nv * nw
        feat_t = torch.cat(feat).to(dev)
        delta = (f_all[torch.cat(clean_at).to(dev), feat_t] - f_all[torch.cat(var_at).to(dev), feat_t]).double().cpu()
        nz = torch.nonzero(delta != 0).flatten()
        b_nz, u_nz, d_nz, v_nz = torch.cat(b_of)[nz], torch.cat(u_of)[nz], torch.cat(d_of)[nz], delta[nz]
        for b in dict.fromkeys(b_nz.tolist()):
            m = b_nz == b
            edges[b].update(zip(zip(u_nz[m].tolist(), d_nz[m].tolist(), strict=True), v_nz[m].tolist(), strict=True))


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_chunk_edges_in_arrays_equal_the_per_row_loop(arch, monkeypatch):
    """The exact edges read in array operations (``_chunk_edges``) against the per-row loop they replace: the same
    edges, values bit for bit, in the same order, with downstream features of both SAEs, nodes at several distances
    and one prompt whose many nodes at one distance fill several rows (pieces) of one recomputation."""
    model, task, saes, pg, eng, base, batch, clean, tr, contrib = _first_batch(arch)
    nodes, down = [], []
    for b in range(len(batch.indices)):
        P = int(batch.positions[b])
        n = _pick_nodes(pg, clean, contrib, b)
        gi, loc, pos = n.gi.tolist(), n.local.tolist(), n.pos.tolist()
        # a dozen features of each SAE at P - 3 besides on prompt 0, one on the others: several pieces there
        for g_i, c in enumerate(contrib):
            if pg.groups[g_i].kind == "sae":
                active = torch.nonzero(c[b, P - 3, :-1] != 0).flatten().tolist()[: 12 if b == 0 else 1]
                gi, loc, pos = gi + [g_i] * len(active), loc + active, pos + [P - 3] * len(active)
        nodes.append(PromptNodes(torch.tensor(gi), torch.tensor(loc), torch.tensor(pos)))
        dg, dl, dp = [], [], []
        for g_i, c in enumerate(contrib):
            if pg.groups[g_i].kind == "sae":
                tk = torch.nonzero(c[b, : P + 1, :-1] != 0)[::7]  # every 7th active (position, feature)
                dg, dl, dp = dg + [g_i] * len(tk), dl + tk[:, 1].tolist(), dp + tk[:, 0].tolist()
        down.append(PromptNodes(torch.tensor(dg), torch.tensor(dl), torch.tensor(dp)))
    rows_seen = _spy_on_exact_chunks(monkeypatch)
    eff_new, edges_new, _ = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
    monkeypatch.setattr(positions, "_chunk_edges", _per_row_chunk_edges)
    eff_old, edges_old, _ = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
    assert any(r.count(0) > 1 for r in rows_seen)  # prompt 0 filled several rows of one recomputation
    for b in range(len(nodes)):
        assert torch.equal(eff_new[b], eff_old[b])
        assert list(edges_new[b].items()) == list(edges_old[b].items())  # keys, values and order
    into = {int(down[b].gi[j]) for b in range(len(down)) for (_, j) in edges_new[b]}
    assert len(into) == 2 and sum(len(e) for e in edges_new) > 50  # edges into both SAEs' features


def test_gathered_products_equal_the_dense_contributions():
    """``Tracked.gathered`` (features and errors apart: a feature's ``grad_e . W_dec[k]`` times its code, an error's
    ``grad_e . e``) against the dense contributions of the same gradient (:meth:`Tracked.contributions`, the feature
    gradient by the decoder's matmul): the errors and the other groups bit for bit, the features to float32
    rounding; no negative zero (the sum into zeros it replaced gave +0.0)."""
    arch = "gpt2"
    model, task, saes, pg, eng, base, batch, clean, tr, contrib = _first_batch(arch)
    rows = list(range(len(batch.indices)))
    nodes = [_pick_nodes(pg, clean, contrib, b) for b in rows]
    with torch.enable_grad():
        grads = torch.autograd.grad(tr.m.sum(), tr.flat(), retain_graph=True, allow_unused=True)
    got = tr.gathered(pg, grads, rows, nodes)
    n_f = n_e = 0
    for b in rows:
        for a in range(len(nodes[b].gi)):
            gi, k, t = int(nodes[b].gi[a]), int(nodes[b].local[a]), int(nodes[b].pos[a])
            want = float(contrib[gi][b, t, k])
            g = pg.groups[gi]
            if g.kind == "sae" and k < g.sae.d_sae:
                assert float(got[b][a]) == pytest.approx(want, rel=1e-5, abs=1e-9)
                n_f += 1
            else:
                assert float(got[b][a]) == want
                n_e += g.kind == "sae"
            assert math.copysign(1.0, float(got[b][a])) > 0 or float(got[b][a]) != 0.0
    assert n_f > 5 and n_e > 5


def _per_prompt_candidates(pg, tr, contrib, b, P):
    """The per-prompt, per-group candidates that ``_batch_candidates`` replaced (the old path, its reference)."""
    scores, keys, vals = [], [], []
    for gi, c in enumerate(contrib):
        v = c[b, : P + 1]
        s = v.abs().clone()
        if pg.groups[gi].kind == "sae":
            f = tr.leaves[gi][0][b, 0, : P + 1].detach().cpu()
            s[torch.cat([f == 0, torch.zeros(P + 1, 1, dtype=torch.bool)], dim=-1)] = -1.0
        t, k = torch.nonzero(s >= 0, as_tuple=True)
        scores.append(s[t, k])
        vals.append(v[t, k])
        keys.append(torch.stack([torch.full_like(t, gi), k, t], dim=1))
    order = torch.argsort(torch.cat(scores), descending=True, stable=True)
    return torch.cat(keys)[order], torch.cat(vals)[order].double()


def test_batch_candidates_equal_the_per_prompt_ranking():
    """Every prompt's candidate nodes found in one pass over the batch (``_batch_candidates``) against the
    per-prompt ranking it replaced: the same keys in the same order (ties included: a zero-gradient error ties at
    0) and the same AtP values; features only where active, nothing after a padded row's P, a NaN never a node."""
    from saecircuits.analysis.circuit.position_graph import _batch_candidates

    model, task, saes, pg = _setup("gpt_neo")
    eng = engine_of(model)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    assert len(set(batch.positions.tolist())) > 1  # right padding
    tr, contrib = node_attributions(eng, pg, batch, _baselines("gpt_neo"))
    contrib = [c.clone() for c in contrib]
    contrib[0][0, 1, 0] = float("nan")  # a NaN contribution is dropped by both
    got = _batch_candidates(pg, tr, contrib, batch.positions)
    for b in range(len(batch.indices)):
        P = int(batch.positions[b])
        keys, vals = _per_prompt_candidates(pg, tr, contrib, b, P)
        assert torch.equal(got[b][0], keys) and torch.equal(got[b][1], vals)
        assert int(keys[:, 2].max()) == P and len(keys) < sum(c.shape[-1] for c in contrib) * (P + 1)
        for gi, g in enumerate(pg.groups):
            if g.kind == "sae":
                m = (keys[:, 0] == gi) & (keys[:, 1] < g.sae.d_sae)
                f = tr.leaves[gi][0][b, 0]
                assert bool((f[keys[m, 2], keys[m, 1]] != 0).all())


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_node_contributions_equal_the_dense_contributions_at_the_nodes(arch):
    """Pass A's node entries (``Tracked.node_contributions``: active features and errors of each SAE, every index of
    the other groups, at positions <= P; no dense tensor) against the dense contributions of
    ``node_attributions``: exactly the entries of the nodes (features where active, nothing after a padded row's
    P) in (prompt, position, index) order, holding the same floats; and ranked, the same candidates as
    ``_batch_candidates`` of the dense tensors (keys, order with ties, values: bit for bit)."""
    from saecircuits.analysis.circuit.position_graph import _batch_candidates, _ranked_entries
    from saecircuits.analysis.circuit.positions import node_attribution_entries

    model, task, saes, pg = _setup(arch)
    eng = engine_of(model)
    for batch in task_batches(model, task, max_batch=3):
        P = batch.positions
        tr, contrib = node_attributions(eng, pg, batch, _baselines(arch))
        tr2, entries = node_attribution_entries(eng, pg, batch, _baselines(arch))
        assert len(entries) == len(contrib)
        for gi, (c, (b, t, k, v)) in enumerate(zip(contrib, entries, strict=True)):
            want = torch.arange(c.shape[1])[None, :, None] <= P[:, None, None]
            want = want.expand(c.shape).clone()
            if pg.groups[gi].kind == "sae":
                f = tr.leaves[gi][0][:, 0]
                want[..., :-1] &= f != 0
            wb, wt, wk = torch.nonzero(want, as_tuple=True)  # (b, t, k) order
            assert torch.equal(b, wb) and torch.equal(t, wt) and torch.equal(k, wk)
            assert torch.equal(v, c[wb, wt, wk])
        got = _ranked_entries(entries, len(P))
        ref = _batch_candidates(pg, tr, contrib, P)
        for (k1, v1), (k2, v2) in zip(got, ref, strict=True):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert any(len(set(b.positions.tolist())) > 1 for b in task_batches(model, task, max_batch=3))  # padding


def test_ranked_entries_drop_nan_and_break_ties_by_group_then_position():
    """The ranking of a hand-made batch: |AtP| largest first per prompt, equal |AtP| in (group, position, index)
    order (the order of the per-prompt concatenation it replaced), a NaN never a node, a prompt without entries
    empty."""
    from saecircuits.analysis.circuit.position_graph import _ranked_entries

    L = torch.tensor
    entries = [  # group 0: prompt 0 at (t, k) = (0, 0), (1, 0); prompt 2 at (0, 0)
        (L([0, 0, 2]), L([0, 1, 0]), L([0, 0, 0]), L([0.5, -2.0, float("nan")], dtype=torch.float64)),
        # group 1: prompt 0 at (0, 1), (0, 3); prompt 2 at (1, 2)
        (L([0, 0, 2]), L([0, 0, 1]), L([1, 3, 2]), L([-0.5, 2.0, 1.0], dtype=torch.float64)),
    ]
    got = _ranked_entries(entries, 3)
    assert got[0][0].tolist() == [[0, 0, 1], [1, 3, 0], [0, 0, 0], [1, 1, 0]]  # |2| ties: group 0 first; |0.5| too
    assert got[0][1].tolist() == [-2.0, 2.0, 0.5, -0.5]
    assert got[1][0].shape == (0, 3) and got[1][1].shape == (0,)
    assert got[2][0].tolist() == [[1, 2, 1]] and got[2][1].tolist() == [1.0]


def test_faithfulness_rows_with_sparse_sae_masks_equal_the_dense_masks():
    """Pass D's forward with each SAE's mask held as its circuit nodes (``_SaeMask``: the ablated count per row,
    dense rows only where a position is mixed) against the dense ``[B, V, T, d_sae + 1]`` float masks it replaced
    (built here as before, through the same hooks and through the hooks as they were, ``_old_mask_hooks``): the
    same answer log-probs, bit for bit; two circuits, features
    and errors, several nodes at one position, a node listed twice, nodes out of the graph ignored."""
    import random

    from saecircuits.analysis.circuit.nodes import _answer_logprob
    from saecircuits.analysis.circuit.position_graph import _faithfulness_rows, _mask_hooks

    model, task, saes, pg = _setup("gpt_neo")
    eng = engine_of(model)
    means = position_means(model, pg, task, max_batch=3)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    B, T = batch.tokens.shape
    rng = random.Random(0)
    circuits = []
    for _ in range(2):
        graphs, keys = [], []
        for b in range(B):
            P = int(batch.positions[b])
            nodes, kk = [], {}
            for j in range(12):
                gi = rng.randrange(len(pg.groups))
                k = rng.randrange(pg.n_local(gi)) if j % 3 else pg.n_local(gi) - 1  # SAE errors too
                t = rng.choice([P, P - 1, rng.randrange(P + 1)])
                nodes.append({"id": f"n{j}", "kind": "x", "in_graph": j != 5})
                kk[f"n{j}"] = (gi, k, t)
            nodes.append({"id": "n12", "kind": "x", "in_graph": True})  # n3 again: one node listed twice
            kk["n12"] = kk["n3"]
            graphs.append({"nodes": nodes})
            keys.append(kk)
        circuits.append((graphs, keys))
    got = _faithfulness_rows(eng, pg, batch, circuits, means)
    # the dense masks as before
    masks = {}
    for gi in range(len(pg.groups)):
        cs = []
        for graphs, keys in circuits:
            inside = torch.zeros(B, T, pg.n_local(gi), dtype=torch.bool)
            for b, g in enumerate(graphs):
                for n in g["nodes"]:
                    g_i, k, t = keys[b][n["id"]]
                    if n["in_graph"] and g_i == gi:
                        inside[b, t, k] = True
            cs.append(inside)
        masks[gi] = torch.stack([x for c in cs for x in (~c, c)], dim=1).float()
    sae_mixed = 0
    for gi, g in enumerate(pg.groups):
        if g.kind == "sae":
            on = masks[gi].sum(-1)
            sae_mixed += int(((on > 0) & (on < pg.n_local(gi))).sum())
    assert sae_mixed > 4 and any(bool((masks[gi].sum(-1) == pg.n_local(gi)).any()) for gi, g in
                                 enumerate(pg.groups) if g.kind == "sae")  # fully ablated rows too
    with torch.no_grad():
        x = eng.forward_tokens(batch.tokens, _mask_hooks(pg, masks, means))
        lg = eng.logits(x[torch.arange(B), :, batch.positions])
        want = _answer_logprob(lg, batch.answer_ids).double()
        x = eng.forward_tokens(batch.tokens, _old_mask_hooks(pg, masks, means))
        lg = eng.logits(x[torch.arange(B), :, batch.positions])
        old = _answer_logprob(lg, batch.answer_ids).double()
    assert torch.equal(got, want) and torch.equal(got, old)


def _old_mask_hooks(pg, masks, means):
    """The faithfulness hooks as they were (an SAE's output copied, then the fully ablated rows written): the
    reference of the sparse masks and of writing the constant rows in the copying pass."""
    hooks: dict = {}
    for gi, grp in enumerate(pg.groups):
        m, mu = masks[gi], means[gi]
        if grp.kind == "sae":
            def fn(x_in, x, sae=grp.sae, m=m, mu=mu):
                xf = x.float()
                on = m.sum(-1)
                full, mixed = on == m.shape[-1], (on > 0) & (on < m.shape[-1])
                out = xf.clone()
                if bool(full.any()):
                    const = mu["f"].float() @ sae.W_dec.float() + mu["e"].float()
                    out[full] = sae.decoder_bias(x_in[full] if sae.decode_needs_input else None).float() + const
                if bool(mixed.any()):
                    xi, xm, mm = x_in[mixed], xf[mixed], m[mixed]
                    f = sae.encode(xi).float()
                    me = mm[..., -1:]
                    coef = (f - mu["f"].float()) * mm[..., :-1] - me * f
                    e0 = xm - sae.decoder_bias(xi).float() - mu["e"].float()
                    out[mixed] = xm - me * e0 - coef @ sae.W_dec.float()
                return out.to(x.dtype)

            positions._add_sae_hook(hooks, grp, fn)
        elif grp.kind == "heads":
            hooks.setdefault(grp.hook, []).append(
                lambda z, m=m, mu=mu: z * (1 - m[..., None].to(z)) + m[..., None].to(z) * mu.to(z))
        else:
            hooks.setdefault(grp.hook, []).append(
                lambda x, m=m, mu=mu: x * (1 - m[..., :1].to(x)) + m[..., :1].to(x) * mu.to(x))
    return hooks


def test_batch_activations_equal_the_per_prompt_reads():
    """Pass A's node activations read for the whole batch at once (``_batch_activations``) against the per-prompt
    read (``_activations``): the same floats (NaN for nodes that are not features), prompts of different lengths."""
    from saecircuits.analysis.circuit.position_graph import _activations, _batch_activations, _ranked_entries
    from saecircuits.analysis.circuit.positions import node_attribution_entries

    model, task, saes, pg = _setup("gpt_neo")
    eng = engine_of(model)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    tr, entries = node_attribution_entries(eng, pg, batch, _baselines("gpt_neo"))
    ranked = _ranked_entries(entries, len(batch.indices))
    rows = [2, 0]
    cs = [PromptNodes(ranked[b][0][:40, 0], ranked[b][0][:40, 1], ranked[b][0][:40, 2]) for b in rows]
    got = _batch_activations(pg, tr, rows, cs)
    for b, c, g in zip(rows, cs, got, strict=True):
        want = _activations(pg, tr, b, c)
        assert len(g) == len(want) == 40
        assert all((x == y) or (math.isnan(x) and math.isnan(y)) for x, y in zip(g, want, strict=True))
        assert any(math.isnan(x) for x in g) and any(not math.isnan(x) for x in g)


@pytest.mark.parametrize("with_edges", [False, True])
def test_graph_pruned_part_alone_equals_the_pruned_whole_graph(with_edges):
    """A graph built with ``share`` (pass A: its pruned part alone, pruning run on the ids and values, only the kept
    nodes and edges built) against the whole graph pruned by ``prune_graph`` and cut to its kept part
    (``_in_graph``): the same dicts, key order included, and the same node identities and agreement pairs; pass A's
    star graph (estimates, head loadings into the target) and a graph with exact values and edges between nodes."""
    import json

    from saecircuits.analysis.circuit.position_graph import (
        _batch_activations,
        _Ctx,
        _in_graph,
        _node_ids,
        _ranked_entries,
    )
    from saecircuits.analysis.circuit.positions import head_labels, node_attribution_entries
    from saecircuits.analysis.circuit.prune import prune_graph

    model, task, saes, pg = _setup("gpt_neo")
    eng = engine_of(model)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    B = len(batch.indices)
    clean = clean_cache(eng, batch)
    tr, entries = node_attribution_entries(eng, pg, batch, _baselines("gpt_neo"))
    ranked = _ranked_entries(entries, B)
    top = [PromptNodes(k[:30, 0], k[:30, 1], k[:30, 2]) for k, _ in ranked]
    loads = head_loadings(eng, pg, clean, tr, top, top, [[-1]] * B)
    acts = _batch_activations(pg, tr, range(B), top)
    ctxs = [_Ctx(model, task, pg, _node_ids(pg, saes), head_labels(eng), 2, 7, {}, {}, 0.8) for _ in range(2)]
    n_kept = n_all = 0
    for b in range(B):
        i, P = int(batch.indices[b]), int(batch.positions[b])
        atp = ranked[b][1][:30]
        exact, ex_edges, at_edges, fidx = torch.full_like(atp, float("nan")), {}, {}, torch.zeros(0, dtype=torch.long)
        if with_edges:  # exact values on some nodes, edges into the features among them (capped at 7)
            exact = torch.where(torch.arange(30) % 3 == 0, atp * 1.5, exact)
            fidx = torch.tensor([a for a in range(30) if pg.groups[int(top[b].gi[a])].kind == "sae"][:4])
            ex_edges = {(a, j): 0.1 * (a - j) for a in range(10) for j in range(len(fidx)) if a != j}
            at_edges = {(a, j): 0.05 * (a + j) for a in range(12) for j in range(len(fidx))}
        args = (i, P, top[b], atp, exact, ex_edges, at_edges, loads[b], fidx, tr, b)
        whole = prune_graph(ctxs[0].graph(*args), 0.8)
        part = ctxs[1].graph(*args, acts=acts[b], share=0.8)
        assert json.dumps(part) == json.dumps(_in_graph(whole))
        n_kept += len(part["nodes"])
        n_all += len(whole["nodes"])
    assert 0 < n_kept < n_all
    assert ctxs[0].ident == ctxs[1].ident and ctxs[0].prompt_pairs == ctxs[1].prompt_pairs
    assert bool(ctxs[0].prompt_pairs) == with_edges


def test_candidates_of_a_batch_equal_each_prompts_own():
    """Pass A's candidates sorted by code for the whole batch (``_Candidates.many``) against each prompt's own sort
    (``_Candidates.of``): the same codes and AtP values in the same order, an empty prompt included."""
    from saecircuits.analysis.circuit.position_graph import _Candidates, _ranked_entries
    from saecircuits.analysis.circuit.positions import node_attribution_entries

    model, task, saes, pg = _setup("gpt_neo")
    eng = engine_of(model)
    batch = next(iter(task_batches(model, task, max_batch=3)))
    _, entries = node_attribution_entries(eng, pg, batch, _baselines("gpt_neo"))
    ranked = _ranked_entries(entries, len(batch.indices))
    ranked.append((torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.float64)))
    got = _Candidates.many(ranked)
    assert len(got) == len(ranked)
    for (k, v), c in zip(ranked, got, strict=True):
        want = _Candidates.of(k, v)
        assert torch.equal(c.codes, want.codes) and torch.equal(c.atp, want.atp)
        assert bool((c.codes[1:] > c.codes[:-1]).all())


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_last_block_at_the_positions_read_equals_every_position(arch, monkeypatch):
    """The recomputations run the last block (queries, attention output, MLP half) only at the positions read (P,
    the edited one, the downstream features' of SAEs read there): the same exact effects and edges as the
    recomputation of every position (float32 rounding of another matmul shape), the same edge keys; and the
    restriction did apply."""
    model, task, saes, pg, eng, base, batch, clean, tr, contrib = _first_batch(arch)
    nodes = [_pick_nodes(pg, clean, contrib, b) for b in range(len(batch.indices))]  # every group, 5 distances
    down = []
    for b in range(len(batch.indices)):
        P = int(batch.positions[b])
        dg, dl, dp = [], [], []
        for g_i in range(len(pg.groups)):
            if pg.groups[g_i].kind == "sae":  # a few active features at P, P - 2, P - 7 (the last SAE's too)
                f = tr.leaves[g_i][0][b, 0].detach()
                for t in (P - 7, P - 2, P):
                    ks = torch.nonzero(f[t] != 0).flatten()[:4].tolist()
                    dg, dl, dp = dg + [g_i] * len(ks), dl + ks, dp + [t] * len(ks)
        down.append(PromptNodes(torch.tensor(dg), torch.tensor(dl), torch.tensor(dp)))
    kept = []
    real = positions._last_block_positions

    def spy(*args):
        cols = real(*args)
        kept.append(None if cols is None else (len(cols), args[4] + 1))  # (kept, every position)
        return cols

    monkeypatch.setattr(positions, "_last_block_positions", spy)
    eff_new, edges_new, _ = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
    assert any(k is not None and k[0] < k[1] for k in kept)  # some recomputation kept fewer positions
    monkeypatch.setattr(positions, "_last_block_positions", lambda *args: None)
    eff_old, edges_old, _ = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
    for b in range(len(nodes)):
        torch.testing.assert_close(eff_new[b], eff_old[b], atol=1e-5, rtol=1e-5)
        assert list(edges_new[b]) == list(edges_old[b])
        torch.testing.assert_close(torch.tensor(list(edges_new[b].values())),
                                   torch.tensor(list(edges_old[b].values())), atol=1e-5, rtol=1e-5)
    last_sae = next(i for i, g in enumerate(pg.groups) if g.sae is saes[1])
    into = [(b, j) for b in range(len(down)) for (_, j) in edges_new[b] if int(down[b].gi[j]) == last_sae]
    assert any(int(down[b].pos[j]) < int(batch.positions[b]) for b, j in into)  # the last SAE read before P


def test_index_helpers_equal_torch_repeat_interleave():
    """``_repeat`` (numpy) and ``_ragged_arange`` against torch's ``repeat_interleave`` and a loop: the same int64
    values, zero counts and empty inputs included."""
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 50):
        counts = torch.randint(0, 5, (n,), generator=gen)
        values = torch.randint(-100, 100, (n,), generator=gen)
        got = positions._repeat(values, counts)
        assert got.dtype == torch.long and torch.equal(got, torch.repeat_interleave(values, counts))
        ragged = positions._ragged_arange(counts)
        want = torch.cat([torch.arange(int(c)) for c in counts]) if n else torch.zeros(0, dtype=torch.long)
        assert torch.equal(ragged, want)


def test_prefix_up_to_the_latest_first_position_equals_the_whole_cache(monkeypatch):
    """The recomputations' cached prefix cut after the rows' latest first recomputed position (the later cached
    positions are masked for every row) gives the exact effects and edges of the whole cache (float32 rounding of
    another reduction length), the same edge keys; and the cut did shorten some prefix."""
    arch = "llama"
    model, task, saes, pg, eng, base, batch, clean, tr, contrib = _first_batch(arch)
    nodes = [_pick_nodes(pg, clean, contrib, b) for b in range(len(batch.indices))]
    feats = [torch.tensor([pg.groups[int(g)].kind == "sae" and int(k) < pg.groups[int(g)].sae.d_sae
                           for g, k in zip(n.gi, n.local, strict=True)]) for n in nodes]
    down = [PromptNodes(n.gi[f], n.local[f], n.pos[f]) for n, f in zip(nodes, feats, strict=True)]
    T = batch.tokens.shape[1]
    lengths = []
    real = positions._prefix_length

    def spy(t0, T_):
        lengths.append(real(t0, T_))
        return lengths[-1]

    monkeypatch.setattr(positions, "_prefix_length", spy)
    eff_new, edges_new, _ = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
    assert min(lengths) < T
    monkeypatch.setattr(positions, "_prefix_length", lambda t0, T_: T_)
    eff_old, edges_old, _ = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
    for b in range(len(nodes)):
        torch.testing.assert_close(eff_new[b], eff_old[b], atol=1e-5, rtol=1e-5)
        assert list(edges_new[b]) == list(edges_old[b]) and len(edges_new[b]) > 0
        torch.testing.assert_close(torch.tensor(list(edges_new[b].values())),
                                   torch.tensor(list(edges_old[b].values())), atol=1e-5, rtol=1e-5)
