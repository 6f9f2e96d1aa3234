"""The circuit across positions as per-prompt graphs, their aggregate, agreement of the estimates with the exact
values by distance from P, and the faithfulness / completeness of the pruned circuit at every position: the
``"positions"`` entry of ``circuit.json`` (issue 16's contract). The computations are in
:mod:`saecircuits.analysis.circuit.positions` (see its docstring for definitions, units and sources).

Per prompt, the graph holds the ``top_exact`` nodes with the largest ``|AtP|`` over every position ``t <= P`` (every
one with its exact effect), the target ``log p(answer)`` at P, and the edges among them: ``u -> d`` for a feature
``d`` at ``p_d >= pos(u)`` of a later stage (exact; AtP into the ``edge_targets`` features of largest ``|exact|``),
``u -> target`` (the node's exact effect and AtP).
Edges of both zero exact value and zero AtP are dropped, and at most ``max_edges`` (largest ``max(|exact|, |atp|)``)
are kept per prompt. Edges between positions into the target and into the ``head_targets`` features of largest
``|exact|`` carry head loadings that sum to their AtP value. The graph is then pruned (circuit-tracer's rule,
``prune_graph``) and the pruned graphs (their ``in_graph`` nodes and edges) are aggregated over all prompts
(``aggregate_graphs``: a node outside a prompt's pruned graph counts 0 for that prompt).

Faithfulness and completeness (Sparse Feature Circuits' definitions, over all positions): the answer's log-prob when
every node outside each prompt's pruned circuit is mean-ablated at every position ``<= P`` (faithfulness) or the
circuit's nodes are (completeness), relative to the clean model and to every node mean-ablated; "every node" is every
SAE feature and error, head, MLP and embedding at every position (so "everything ablated" is every group's
activation at its mean). Means: per node, over the task's prompts and every position ``<= P`` of each (one mean per
node, not per position). Intervals: the paired bootstrap of
:func:`saecircuits.analysis.quality.reconstruction.loss_recovered`, undefined (None) as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from saecircuits.analysis.circuit import _answer_logprob, agreement
from saecircuits.analysis.circuit.aggregate import aggregate_graphs, positions_summary
from saecircuits.analysis.circuit.positions import (
    PositionGroups,
    PromptNodes,
    attribution_edges,
    clean_cache,
    engine_of,
    exact_node_effects,
    head_labels,
    head_loadings,
    node_attributions,
    position_groups,
)
from saecircuits.analysis.circuit.prune import prune_graph
from saecircuits.analysis.quality.reconstruction import loss_recovered
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches, with_progress
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["position_circuit", "reduced_positions", "position_means"]

TARGET = "log p(answer) at P (nats)"
DISTANCE_BUCKETS = 16
"""Agreement by distance: one entry per distance ``0..15`` from P, then one for every larger distance ("16+")."""


def _anchors(task: Task, i: int, P: int) -> dict[str, int]:
    fn = getattr(task, "anchors", None)
    got = dict(fn(i)) if callable(fn) else {}
    got["P"] = P
    return got


def _node_ids(pg: PositionGroups, saes: Sequence[SAE]):
    """Per group: ``(kind, label, index string, sae, feature, head)`` of in-group index ``k``."""
    per_layer: dict[int, int] = {}
    for gi, name in enumerate(pg.names):
        if name == "sae":
            per_layer[pg.layer[gi]] = per_layer.get(pg.layer[gi], 0) + 1

    def describe(gi: int, k: int):
        name, layer, si = pg.names[gi], pg.layer[gi], pg.sae_index[gi]
        if name == "sae":
            d_sae = pg.groups[gi].sae.d_sae
            tag = "" if per_layer[layer] == 1 else f"s{si}."  # two SAEs in one layer: ids say which
            if k == d_sae:
                return "error", f"S{si}:err", f"{tag}0", si, None, None
            return "feature", f"S{si}:f{k}", f"{tag}{k}", si, k, None
        if name == "head":
            return "head", f"L{layer}H{k}", str(k), None, None, k
        return name, (f"MLP{layer}" if name == "mlp" else name), "0", None, None, None

    return describe


def _f(x) -> float | None:
    """A JSON float: 6 significant digits (circuit.json stays small), None when not finite."""
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _choose(pg: PositionGroups, tr, contrib, b: int, P: int, top: int) -> tuple[PromptNodes, torch.Tensor]:
    """The ``top`` nodes of prompt ``b`` by ``|AtP|`` over positions ``<= P`` (features only where active)."""
    scores, keys = [], []
    for gi, c in enumerate(contrib):
        s = c[b, : P + 1].abs().clone()  # [P+1, n_local]
        if pg.groups[gi].kind == "sae":
            f = tr.leaves[gi][0][b, 0, : P + 1].detach().cpu()
            inactive = torch.cat([f == 0, torch.zeros(P + 1, 1, dtype=torch.bool)], dim=-1)
            s[inactive] = -1.0
        t, k = torch.nonzero(s >= 0, as_tuple=True)
        scores.append(s[t, k])
        keys.append(torch.stack([torch.full_like(t, gi), k, t], dim=1))
    scores, keys = torch.cat(scores), torch.cat(keys)
    order = torch.argsort(scores, descending=True, stable=True)[:top]
    k = keys[order]
    atp = torch.stack([contrib[int(g)][b, int(t), int(i)] for g, i, t in k.tolist()]) if len(k) else torch.zeros(0)
    return PromptNodes(k[:, 0], k[:, 1], k[:, 2]), atp.double()


def position_circuit(
    model,
    saes: Sequence[SAE],
    task: Task,
    *,
    acts=None,
    n_examples: int = 20,
    top_exact: int = 200,
    share: float = 0.8,
    ig_steps: int = 0,
    means: dict | None = None,
    edge_targets: int = 50,
    head_targets: int = 10,
    max_edges: int = 500,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool | None = None,
) -> dict:
    """The circuit across positions (see the module docstring): issue 16's ``"positions"`` dict.

    Args:
        model, saes, task: the model (the prefix-cached engine must compute it), its SAEs, the behaviour.
        acts: accepted for the contract's signature; unused (each position's features are encoded here).
        n_examples: per-prompt graphs kept in ``"examples"`` (the first prompts); all prompts are aggregated.
        top_exact: nodes per prompt (largest ``|AtP|``) that get exact effects and make the graph.
        share: pruning share (``prune_graph``).
        ig_steps: integrated gradients across positions are not computed (agreement ``"ig"`` is None).
        means: per group index, the mean-ablation values (:func:`position_means`; computed when None).
        edge_targets: features per prompt (largest ``|exact|``) whose incoming edges get AtP estimates (one
            backward pass each; exact edges go into every feature of the graph).
        head_targets: features per prompt (largest ``|exact|``) whose incoming edges get head loadings (and the
            target always).
        max_edges: edges kept per prompt before pruning.

    Returns:
        ``{"target", "share", "n_prompts", "n_exact_interventions", "summary", "agreement", "faithfulness",
        "completeness", "aggregated", "examples", "head_loading": str}`` (plain JSON types, non-finite -> None).

    Raises:
        EngineError: a model the prefix-cached engine cannot compute. ValueError: no SAE, two SAEs on one hook.
    """
    if not saes:
        raise ValueError("position_circuit needs at least one SAE")
    eng = engine_of(model)
    pg = position_groups(model, saes)
    describe = _node_ids(pg, saes)
    heads = head_labels(eng)
    n_layers = int(model.cfg.n_layers)
    from saecircuits.models.tokens import token_string

    kw = dict(max_tokens=max_tokens, max_batch=max_batch)
    if means is None:
        means = position_means(model, pg, task, **kw)
    graphs: list[dict | None] = [None] * task.n_prompts
    pairs = {"nodes": ([], [], []), "edges": ([], [], [])}  # (atp, exact, distance) pooled over prompts
    n_runs = 0
    faith_rows = []
    batches = _bounded(task_batches(model, task, **kw), _floats_per_token(eng, pg))
    for batch in with_progress(batches, task.n_prompts, "circuit across positions (prompts)", progress):
        clean = clean_cache(eng, batch)
        tr, contrib = node_attributions(eng, pg, batch)
        B = len(batch.indices)
        chosen, atps = zip(*[_choose(pg, tr, contrib, b, int(batch.positions[b]), top_exact) for b in range(B)],
                           strict=True)
        is_feat = [torch.tensor([pg.groups[int(g)].kind == "sae" and int(k) < pg.groups[int(g)].sae.d_sae
                                 for g, k in zip(c.gi, c.local, strict=True)], dtype=torch.bool) for c in chosen]
        feat_idx = [torch.nonzero(m).flatten() for m in is_feat]
        down = [PromptNodes(c.gi[i], c.local[i], c.pos[i]) for c, i in zip(chosen, feat_idx, strict=True)]
        effects, ex_edges, runs = exact_node_effects(eng, pg, clean, list(chosen), down)
        n_runs += runs
        # AtP edges into the edge_targets features of largest |exact| (one backward pass each), head loadings into
        # the first head_targets of them and into the target
        ranked = [torch.argsort(effects[b][feat_idx[b]].abs().nan_to_num(0.0), descending=True, stable=True)
                  for b in range(B)]
        sel = [r[:edge_targets] for r in ranked]
        at_sel = attribution_edges(pg, tr, list(chosen), [PromptNodes(d.gi[s], d.local[s], d.pos[s])
                                                          for d, s in zip(down, sel, strict=True)])
        at_edges = [{(a, int(s[j])): v for (a, j), v in e.items()} for e, s in zip(at_sel, sel, strict=True)]
        targets = [[-1] + r[:head_targets].tolist() for r in ranked]
        loads = head_loadings(eng, pg, clean, tr, list(chosen), down, targets)
        keys: list[dict] = []
        for b, i in enumerate(batch.indices):
            P = int(batch.positions[b])
            c = chosen[b]
            g = _graph(pg, describe, heads, c, atps[b], effects[b], ex_edges[b], at_edges[b], loads[b], feat_idx[b],
                       tr, b, P, n_layers, max_edges, pairs)
            # keys in the order results.json's PromptGraph declares them (the file round-trips exactly)
            g = {"prompt_index": int(i),
                 "tokens": [token_string(model.tokenizer, int(t)) for t in task.token_ids[i][: P + 1]],
                 "P": P, "anchors": _anchors(task, int(i), P), **g}
            graphs[i] = prune_graph(g, share)
            keys.append({nd["id"]: (int(gi), int(k), int(t)) for nd, gi, k, t in
                         zip(g["nodes"], c.gi, c.local, c.pos, strict=False)})
        faith_rows.append(_faithfulness_batch(eng, pg, batch, [graphs[i] for i in batch.indices], keys, means))
        del tr, contrib
    return _assemble(task, graphs, pairs, faith_rows, share, n_runs, n_examples)


GRAPH_FLOATS = 1 << 26
"""Budget (floats) of one tracked forward's autograd graph: the rows of a batch are split so that ``rows x T x``
:func:`_floats_per_token` stays under it (a 500-token prompt with two 16k-feature SAEs: a few rows at a time)."""


def _floats_per_token(engine, pg: PositionGroups) -> int:
    """Floats the tracked forward keeps per position: SAE codes (encoded, leaf, gradient), errors, heads, MLPs."""
    sae = sum(3 * g.sae.d_sae + 2 * g.sae.d_out for g in pg.groups if g.kind == "sae")
    return sae + engine.n_layers * (24 * engine.d_model + 4 * engine.layers[0].W_in.shape[-1])


def _bounded(batches, per_token: int):
    """Split each task batch into row chunks whose tracked forward fits :data:`GRAPH_FLOATS`."""
    from saecircuits.models.hooks import TaskBatch

    for batch in batches:
        B, T = batch.tokens.shape
        step = max(1, GRAPH_FLOATS // max(1, T * per_token))
        for r0 in range(0, B, step):
            sl = slice(r0, r0 + step)
            yield TaskBatch(batch.indices[sl], batch.tokens[sl], batch.positions[sl], batch.answer_ids[sl])


def _graph(pg, describe, heads, c: PromptNodes, atp, exact, ex_edges, at_edges, loads, feat_idx, tr, b, P, n_layers,
           max_edges, pairs) -> dict:
    ids = []
    nodes = []
    for a in range(len(c.gi)):
        gi, k, t = int(c.gi[a]), int(c.local[a]), int(c.pos[a])
        kind, label, index, si, feat, head = describe(gi, k)
        nid = f"{kind}:{pg.layer[gi]}:{index}@{t}"
        ids.append(nid)
        act = _f(tr.leaves[gi][0][b, 0, t, k].detach()) if kind == "feature" else None
        nodes.append({"id": nid, "kind": kind, "layer": pg.layer[gi], "pos": t, "label": label, "sae": si,
                      "feature": feat, "head": head, "activation": act, "exact": _f(exact[a]), "atp": _f(atp[a]),
                      "ig": None, "in_graph": False})
        pairs["nodes"][0].append(float(atp[a]))
        pairs["nodes"][1].append(float(exact[a]))
        pairs["nodes"][2].append(P - t)
    target = f"target:{n_layers}:0@{P}"
    nodes.append({"id": target, "kind": "target", "layer": n_layers, "pos": P, "label": "log p(answer)", "sae": None,
                  "feature": None, "head": None, "activation": None, "exact": None, "atp": None, "ig": None,
                  "in_graph": True})

    def head_list(key):
        parts = loads.get(key)
        if parts is None:
            return None
        return [{"head": h, "value": _f(v)} for h, v in zip(heads, parts, strict=True) if v != 0.0]

    edges = []
    for (a, j), v in at_edges.items():  # every valid pair into an estimated feature (0 allowed); exact 0 unrecorded
        pairs["edges"][0].append(v)
        pairs["edges"][1].append(ex_edges.get((a, j), 0.0))
        pairs["edges"][2].append(P - int(c.pos[int(feat_idx[j])]))
    for a, j in sorted(set(at_edges) | set(ex_edges)):
        v, e = at_edges.get((a, j)), ex_edges.get((a, j), 0.0)
        if not v and e == 0.0:
            continue
        edges.append({"src": ids[a], "dst": ids[int(feat_idx[j])], "exact": _f(e), "atp": None if v is None else _f(v),
                      "heads": head_list((a, j)), "in_graph": False})
    for a in range(len(c.gi)):
        edges.append({"src": ids[a], "dst": target, "exact": _f(exact[a]), "atp": _f(atp[a]),
                      "heads": head_list((a, -1)), "in_graph": False})
    edges.sort(key=lambda e: -max(abs(e["exact"] or 0.0), abs(e["atp"] or 0.0)))
    return {"nodes": nodes, "edges": edges[:max_edges]}


def _agreement_json(a: dict) -> dict:
    return {k: (_f(v) if isinstance(v, float) else v) for k, v in a.items()}


def _by_distance(atp: list, exact: list, dist: list) -> list[dict]:
    atp, exact, dist = np.asarray(atp, float), np.asarray(exact, float), np.asarray(dist)
    out = []
    buckets = [(d, dist == d) for d in range(DISTANCE_BUCKETS)] + [(f"{DISTANCE_BUCKETS}+", dist >= DISTANCE_BUCKETS)]
    for d, m in buckets:
        if not m.any():
            continue
        a = agreement(atp[m], exact[m])
        out.append({"distance": d, "n": int(m.sum()), "spearman": _f(a["spearman"]), "sign": _f(a["sign_agreement"]),
                    "top_k": _f(a["top_overlap"])})
    return out


def _assemble(task, graphs, pairs, faith_rows, share, n_runs, n_examples) -> dict:
    na, ne, nd = pairs["nodes"]
    ea, ee, ed = pairs["edges"]
    agree = {"nodes": {"atp": _agreement_json(agreement(np.array(na), np.array(ne))), "ig": None},
             "edges": {"atp": _agreement_json(agreement(np.array(ea), np.array(ee)))},
             "by_distance": _by_distance(na, ne, nd), "edges_by_distance": _by_distance(ea, ee, ed)}
    m = torch.cat([r for r in faith_rows]) if faith_rows else torch.zeros(0, 4)
    stats = {}
    for name, col in (("faithfulness", 2), ("completeness", 3)):
        lr = loss_recovered(-m[:, 0], -m[:, col], -m[:, 1], ablation="mean-ablating every node at every position")
        ok = lr.reason is None and math.isfinite(lr.value)
        stats[name] = {"mean": _f(lr.value) if ok else None,
                       "ci95": [_f(lr.low), _f(lr.high)] if ok and math.isfinite(lr.low) else None,
                       "undefined_reason": lr.reason}
    # the pruned circuits are averaged (a node or edge outside a prompt's pruned graph counts 0 there): the
    # aggregate says which nodes the prompts' circuits share, and stays small
    aggregated = aggregate_graphs([_in_graph(g) for g in graphs], share=share)
    return {
        "target": TARGET, "share": share, "n_prompts": task.n_prompts, "n_exact_interventions": int(n_runs),
        "summary": positions_summary(aggregated), "agreement": agree,
        "faithfulness": stats["faithfulness"], "completeness": stats["completeness"],
        "means": "per node over the task's prompts and every position <= P of each",
        "head_loading": "per (layer, key/value head): first-order parts of the AtP edge through the keys/values of "
                        "earlier positions; they sum to the edge's AtP value (circuit-tracer's attention attribution)",
        "aggregated": aggregated, "examples": graphs[:n_examples],
    }


def _in_graph(g: dict) -> dict:
    return {**g, "nodes": [n for n in g["nodes"] if n.get("in_graph")],
            "edges": [e for e in g["edges"] if e.get("in_graph")]}


def reduced_positions(positions: dict) -> dict:
    """results.json's copy: everything but the examples' nodes and edges outside their pruned graph."""
    out = {k: v for k, v in positions.items() if k != "examples"}
    out["examples"] = [_in_graph(g) for g in positions.get("examples", [])]
    return out


# ----------------------------------------------------------------------------------------------------------------
# mean ablation at every position


def _valid_positions(batch) -> torch.Tensor:
    T = batch.tokens.shape[1]
    return torch.arange(T, device=batch.tokens.device)[None] <= batch.positions.to(batch.tokens.device)[:, None]


def position_means(model, pg: PositionGroups, task: Task, *, max_tokens=DEFAULT_MAX_TOKENS,
                   max_batch=DEFAULT_MAX_BATCH) -> dict:
    """Per group index, the mean activation over the task's prompts and every position ``<= P``: ``{gi: {"f":
    [d_sae], "e": [d_out]}}`` for SAE groups (codes and error), ``{gi: tensor}`` (a head group's ``[n_heads,
    d_head]``, else the activation's shape) for the rest."""
    from saecircuits.analysis.circuit.positions import _add_sae_hook

    engine = engine_of(model)
    sums: dict = {}
    count = 0
    with torch.no_grad():
        for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
            mask = _valid_positions(batch)
            hooks: dict = {}
            for gi, g in enumerate(pg.groups):
                if g.kind == "sae":
                    def fn(x_in, x, gi=gi, sae=g.sae, mask=mask):
                        f = sae.encode(x_in)
                        e = x[:, 0][mask].float() - sae.decode(f, x_in)[:, 0][mask].float()
                        part = {"f": f[:, 0][mask].float().sum(0), "e": e.sum(0)}
                        sums[gi] = part if gi not in sums else {k: sums[gi][k] + part[k] for k in part}
                        return x

                    _add_sae_hook(hooks, g, fn)
                else:
                    def fn(a, gi=gi, mask=mask):
                        sums[gi] = a[:, 0][mask].float().sum(0) + (sums[gi] if gi in sums else 0)

                    hooks.setdefault(g.hook, []).append(fn)
            engine.forward_tokens(batch.tokens, hooks)
            count += int(mask.sum())
    return {gi: ({k: v / count for k, v in s.items()} if isinstance(s, dict) else s / count) for gi, s in sums.items()}


def _faithfulness_batch(engine, pg: PositionGroups, batch, graphs: list[dict], keys: list[dict], means: dict
                        ) -> torch.Tensor:
    """Answer log-prob ``[B, 4]``: clean, every node mean-ablated, every node outside the pruned circuit mean-ablated,
    the circuit's nodes mean-ablated (all at every position ``<= P``), as variants of one full forward per chunk of
    prompts (``keys[b]``: node id -> ``(group, in-group index, position)``)."""
    from saecircuits.analysis.circuit import MAX_FLOATS
    from saecircuits.models.hooks import TaskBatch

    B, T = batch.tokens.shape
    per_row = 4 * T * (sum(pg.n_local(gi) for gi in range(len(pg.groups))) + engine.d_model * 8)
    step = max(1, MAX_FLOATS // per_row)
    out = []
    for r0 in range(0, B, step):
        sl = slice(r0, r0 + step)
        sub = TaskBatch(batch.indices[sl], batch.tokens[sl], batch.positions[sl], batch.answer_ids[sl])
        out.append(_faithfulness_rows(engine, pg, sub, graphs[sl], keys[sl], means))
    return torch.cat(out)


def _faithfulness_rows(engine, pg, batch, graphs, keys, means) -> torch.Tensor:
    from saecircuits.analysis.circuit.positions import _add_sae_hook

    B, T = batch.tokens.shape
    dev = batch.tokens.device
    inside = {gi: torch.zeros(B, T, pg.n_local(gi), dtype=torch.bool) for gi in range(len(pg.groups))}
    for b, g in enumerate(graphs):
        for n in g["nodes"]:
            if n["in_graph"] and n["kind"] != "target":
                gi, k, t = keys[b][n["id"]]
                inside[gi][b, t, k] = True
    hooks: dict = {}
    for gi, grp in enumerate(pg.groups):
        c = inside[gi].to(dev)
        m = torch.stack([torch.zeros_like(c), torch.ones_like(c), ~c, c], dim=1).float()  # [B, 4, T, n]
        mu = means[gi]
        if grp.kind == "sae":
            sae = grp.sae

            def fn(x_in, x, sae=sae, m=m, mu=mu):
                f = sae.encode(x_in)
                e = x.float() - sae.decode(f, x_in).float() - mu["e"].float()
                delta = ((f.float() - mu["f"].float()) * m[..., :-1]) @ sae.W_dec.float()
                return (x.float() - delta - m[..., -1:] * e).to(x.dtype)

            _add_sae_hook(hooks, grp, fn)
        elif grp.kind == "heads":
            def fn(z, m=m, mu=mu):
                mm = m[..., None].to(z)
                return z * (1 - mm) + mm * mu.to(z)

            hooks.setdefault(grp.hook, []).append(fn)
        else:
            def fn(x, m=m, mu=mu):
                mm = m[..., :1].to(x)
                return x * (1 - mm) + mm * mu.to(x)

            hooks.setdefault(grp.hook, []).append(fn)
    with torch.no_grad():
        x = engine.forward_tokens(batch.tokens, hooks)
        rows = torch.arange(B, device=dev)
        lg = engine.logits(x[rows, :, batch.positions.to(dev)])  # [B, 4, d_vocab]
        return _answer_logprob(lg, batch.answer_ids).double().cpu()
