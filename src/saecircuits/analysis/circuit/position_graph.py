"""The circuit across positions as per-prompt graphs, their aggregate, agreement of the estimates with the exact
values by distance from P, and the faithfulness / completeness of the pruned circuit at every position: the
``"positions"`` entry of ``circuit.json`` (issue 16's contract). The computations are in
:mod:`saecircuits.analysis.circuit.positions` (see its docstring for definitions, units and sources).

Four passes over the task (prompts batched by length, so little padding is computed):

A. every prompt: one clean pass, one tracked pass and ONE backward give the AtP value of every node at every
   position ``t <= P`` (features where active); the head loadings of the top nodes' edges into the target; a graph
   of the ``top_exact`` nodes by ``|AtP|`` (estimates only), pruned on them;
B. the ``n_examples`` example prompts (the task's first): the ``top_exact`` nodes by ``|AtP|`` plus every node within
   ``screen_distance`` of P, each with its exact effect (a prefix-cached intervention at its position), exact edges
   among them, AtP edges into the ``edge_targets`` features of largest ``|exact|``, head loadings into the target
   and the ``head_targets`` features of largest ``|exact|``; pruned on the exact values. These graphs replace pass
   A's for those prompts, and are the ``"examples"``;
C. the pruned graphs of all prompts are aggregated (``aggregate_graphs``: positions aligned by the task's anchors,
   a node outside a prompt's pruned graph counts 0 there); the nodes the aggregate keeps (the candidates) are then
   measured exactly on EVERY prompt where they exist (their column's position; a feature where active), with the
   exact edges among them: the aggregated graph's ``mean_exact`` (mean over all prompts, 0 where absent, t-based
   95% interval) and ``mean_atp`` (the same mean of AtP); it is pruned again on those exact means. Nodes the
   aggregate did not keep stay as estimates (``values = "estimated"``, no exact mean);
D. faithfulness and completeness on every prompt (below), of its own pruned graph and of the aggregated one.

Per-prompt graph: the nodes, the target ``log p(answer)`` at P, and the edges: ``u -> d`` for a feature ``d`` at
``p_d >= pos(u)`` of a later stage (exact; AtP into the ``edge_targets`` features), ``u -> target`` (the node's
effect, exact where measured, and AtP; one per node, always in the graph). Edges between nodes of both zero exact
value and zero AtP are dropped, and at most ``max_edges`` of them (largest ``max(|exact|, |atp|)``) are kept per
prompt; the graph's ``edge_cap`` says the cap and how many were left out. Head loadings sum to the edge's AtP value.
Pruning: circuit-tracer's rule (``prune_graph``), the embeddings pruned apart as the graph's inputs (see
:mod:`saecircuits.analysis.circuit.prune`).

Faithfulness and completeness (Sparse Feature Circuits' definitions, over all positions): the answer's log-prob when
every node outside a circuit (each prompt's pruned graph; the aggregated graph's kept nodes mapped into each prompt)
is mean-ablated at every position ``<= P`` (faithfulness) or the
circuit's nodes are (completeness), relative to the clean model and to every node mean-ablated; "every node" is every
SAE feature and error, head, MLP and embedding at every position (so "everything ablated" is every group's
activation at its mean). Means: per node, over the task's prompts and every position ``<= P`` of each (one mean per
node, not per position). Intervals: the paired bootstrap of
:func:`saecircuits.analysis.quality.reconstruction.loss_recovered`, undefined (None) as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from saecircuits.analysis.circuit import _answer_logprob, agreement
from saecircuits.analysis.circuit.aggregate import aggregate_graphs, positions_summary
from saecircuits.analysis.circuit.faithfulness import _sae_error
from saecircuits.analysis.circuit.positions import (
    PositionGroups,
    PromptNodes,
    ablation_baselines,
    attribution_edges,
    clean_cache,
    engine_of,
    exact_node_effects,
    head_labels,
    head_loadings,
    node_attribution_entries,
    node_attributions,
    position_groups,
)
from saecircuits.analysis.circuit.prune import inputs_phrase, prune_graph
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


def _fs(xs: Sequence[float]) -> list[float | None]:
    """:func:`_f` of every float of ``xs`` (one string format for the list: a graph has thousands of values)."""
    text = "%.6g " * len(xs) % tuple(xs)
    out = list(map(float, text.split()))
    # inf and NaN -> None (only they print with an "n": "inf", "nan")
    return [x if x - x == 0.0 else None for x in out] if "n" in text else out


def _batch_candidates(pg: PositionGroups, tr, contrib, positions) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt of a batch (``positions``: each row's P), every node at positions ``<= P`` (features only where
    active; errors, heads, MLPs and embeddings everywhere): keys int64 ``[n, 3]`` = (group, in-group index,
    position) ranked by ``|AtP|`` (largest first, ties in key order), and their AtP values float64 ``[n]`` (signed,
    nats), from the dense contributions ``contrib`` (:func:`node_attributions`); :func:`_ranked_entries` of the
    same entries :meth:`~.positions.Tracked.node_contributions` gives."""
    P = torch.as_tensor(positions, dtype=torch.long).cpu()
    entries = []
    for gi, c in enumerate(contrib):
        T = c.shape[1]
        keep = (torch.arange(T)[None, :] <= P[:, None])[..., None].expand(c.shape)
        if pg.groups[gi].kind == "sae":
            f = tr.leaves[gi][0][:, 0].detach().cpu()
            keep = keep & torch.cat([f != 0, torch.ones(*f.shape[:-1], 1, dtype=torch.bool)], dim=-1)
        b, t, k = torch.nonzero(keep, as_tuple=True)
        entries.append((b, t, k, c[b, t, k]))
    return _ranked_entries(entries, len(P))


def _ranked_entries(entries, B: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt ``b < B``, its nodes ranked by ``|AtP|`` (largest first; ties in the order of group, then
    position and in-group index), from per-group entries ``(b, t, k, value)`` in ``(b, t, k)`` order
    (:meth:`~.positions.Tracked.node_contributions`): keys int64 ``[n, 3]`` = (group, in-group index, position)
    and the AtP values float64 ``[n]``. A NaN value is never a node. The whole batch in two stable sorts (by
    ``|AtP|``, then by prompt: each prompt's entries keep the first sort's order), not one per prompt."""
    gis = torch.cat([torch.full_like(b, gi) for gi, (b, _, _, _) in enumerate(entries)])
    bs, ts, ks, vs = (torch.cat([e[j] for e in entries]) for j in range(4))
    ok = vs.abs() >= 0  # not NaN
    if not bool(ok.all()):
        gis, bs, ts, ks, vs = gis[ok], bs[ok], ts[ok], ks[ok], vs[ok]
    order = torch.argsort(vs.abs(), descending=True, stable=True)
    order = order[torch.argsort(bs[order], stable=True)]
    counts = torch.bincount(bs, minlength=B).tolist()
    keys = torch.stack([gis, ks, ts], dim=1)[order]
    return list(zip(keys.split(counts), vs[order].split(counts), strict=True))


def _code(keys: torch.Tensor) -> torch.Tensor:
    """One int64 per (group, in-group index, position) key ``[n, 3]`` (a lookup key; indices < 2^20 positions and
    2^22 in-group indices)."""
    return (keys[:, 0] << 42) | (keys[:, 1] << 20) | keys[:, 2]


@dataclass
class _Candidates:
    """One prompt's every node and its AtP value, kept (sorted by code) for the aggregated graph's verification."""

    codes: torch.Tensor  # int64 [n], sorted
    atp: torch.Tensor  # float64 [n]

    @classmethod
    def of(cls, keys: torch.Tensor, atp: torch.Tensor) -> _Candidates:
        codes = _code(keys)
        order = torch.argsort(codes)
        return cls(codes[order], atp[order].float())

    @classmethod
    def many(cls, ranked: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[_Candidates]:
        """:meth:`of` of every prompt's ``(keys, atp)`` of a batch in two sorts for the batch (by code, then by
        prompt, stable: codes are distinct within a prompt, so each prompt's order is its own sort's)."""
        counts = [len(k) for k, _ in ranked]
        if not ranked:
            return []
        codes = _code(torch.cat([k for k, _ in ranked]))
        atp = torch.cat([v for _, v in ranked])
        prompt = torch.repeat_interleave(torch.arange(len(ranked)), torch.tensor(counts, dtype=torch.long))
        order = torch.argsort(codes, stable=True)
        order = order[torch.argsort(prompt[order], stable=True)]
        return [cls(c, v) for c, v in zip(codes[order].split(counts), atp[order].float().split(counts), strict=True)]

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Index of each key ``[n, 3]`` in the candidates, -1 where absent (an inactive feature)."""
        c = _code(keys)
        if not len(self.codes):
            return torch.full_like(c, -1)
        i = torch.searchsorted(self.codes, c).clamp(max=len(self.codes) - 1)
        return torch.where(self.codes[i] == c, i, -1)


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
    screen_distance: int = 2,
    max_candidates: int | None = 100,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool | None = None,
    timings: dict | None = None,
) -> dict:
    """The circuit across positions (see the module docstring): issue 16's ``"positions"`` dict.

    Args:
        model, saes, task: the model (the prefix-cached engine must compute it), its SAEs, the behaviour.
        acts: accepted for the contract's signature; unused (each position's features are encoded here).
        n_examples: the example prompts (the task's first): exact node effects, edges and head loadings, per-prompt
            graphs in ``"examples"``. Every prompt is aggregated.
        top_exact: nodes per prompt (largest ``|AtP|``) in its graph (exact effects on the example prompts).
        share: pruning share (``prune_graph``).
        ig_steps: integrated gradients across positions are not computed (agreement ``"ig"`` is None).
        means: per group index, the mean-ablation values (:func:`position_means`; computed when None).
        edge_targets: features per example prompt (largest ``|exact|``) whose incoming edges get AtP estimates (one
            backward pass each; exact edges go into every feature of the graph).
        head_targets: features per example prompt (largest ``|exact|``) whose incoming edges get head loadings (the
            target always, on every prompt).
        max_edges: edges between nodes kept per prompt before pruning (every node's edge into the target is kept
            besides; each graph's ``edge_cap`` records the cap and how many were left out).
        screen_distance: on the example prompts, every node at most this many positions before P is measured
            exactly too (besides the top_exact by ``|AtP|``): AtP misses large exact effects there, and an
            intervention that recomputes a few positions is cheap. -1: the top_exact alone.
        max_candidates: at most this many internal nodes (features, errors, heads, MLPs) of the aggregate's pruned
            graph are measured exactly on every prompt, those of largest aggregated influence
            (:func:`~saecircuits.analysis.circuit.prune.node_influence`); every input node it kept is. None: all.
            The exact pass over every prompt costs in proportion to them (most of the stage's time on the demo).
        timings: filled with the seconds of each pass when given.

    Sharded (a torch.distributed process group, :mod:`saecircuits.distributed`): the means and passes A, C and D
    take this rank's batches of the one-process batching (A, C and D the same ones, so a prompt's candidates and
    graph stay on its rank), pass B its batches of the example prompts; the graphs, exact values and faithfulness
    rows are gathered, and every rank returns one process's dict (the same batches: the same floats).

    Returns:
        ``{"target", "share", "n_prompts", "n_exact_interventions", "summary", "agreement", "faithfulness",
        "completeness", "aggregated", "examples", "means", "head_loading", "values"}`` (plain JSON types, non-finite
        -> None).

    Raises:
        EngineError: a model the prefix-cached engine cannot compute. ValueError: no SAE, two SAEs on one hook.
    """
    import time

    if not saes:
        raise ValueError("position_circuit needs at least one SAE")
    eng = engine_of(model)
    pg = position_groups(model, saes)
    describe = _node_ids(pg, saes)
    heads = head_labels(eng)
    n_layers = int(model.cfg.n_layers)
    timings = {} if timings is None else timings
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    from saecircuits.distributed import is_writer, my_batches, reduce, sum_disjoint

    kw = dict(max_tokens=max_tokens, max_batch=max_batch)
    shown = progress if is_writer() else False
    if means is None:
        means = position_means(model, pg, task, **kw)
    base = ablation_baselines(pg, means)
    lap("means")
    n = task.n_prompts
    n_ex = min(n_examples, n)
    graphs: list[dict | None] = [None] * n
    cands: list[_Candidates | None] = [None] * n
    ident: dict[str, tuple[int, int]] = {}  # node identity "kind:layer:index" -> (group, in-group index)
    per_token = _floats_per_token(eng, pg)
    ctx = _Ctx(model, task, pg, describe, heads, n_layers, max_edges, {}, ident, share)
    # sharded (torchrun): passes A, C and D take this rank's batches of the one-process batching (the same prompts
    # in each pass: C reads A's candidates, D the prompt's own graph), pass B its batches of the example prompts
    mine = list(my_batches(_by_length(model, task, **kw)))
    n_mine = sum(len(b.indices) for b in mine)

    # pass A, every prompt: AtP of every node at every position (one backward per batch) and the head loadings of
    # the top nodes' edges into the target; a graph of the top_exact nodes by |AtP| for every non-example prompt
    for batch in with_progress(_bounded(iter(mine), per_token), n_mine,
                               "circuit across positions: AtP at every position (prompts)", shown):
        clean = clean_cache(eng, batch)
        tr, entries = node_attribution_entries(eng, pg, batch, base)
        B = len(batch.indices)
        ranked = _ranked_entries(entries, B)
        for i, cand in zip(batch.indices, _Candidates.many(ranked), strict=True):
            cands[i] = cand
        top = [PromptNodes(k[:top_exact, 0], k[:top_exact, 1], k[:top_exact, 2]) for k, _ in ranked]
        rest = [b for b, i in enumerate(batch.indices) if i >= n_ex]
        loads = head_loadings(eng, pg, clean, tr, top, top, [[-1] if b in set(rest) else [] for b in range(B)])
        acts = _batch_activations(pg, tr, rest, [top[b] for b in rest])
        for b, act in zip(rest, acts, strict=True):
            i = int(batch.indices[b])
            P = int(batch.positions[b])
            atp = ranked[b][1][:top_exact]
            # its pruned part alone: nothing else of a non-example prompt's graph is read
            graphs[i] = ctx.graph(i, P, top[b], atp, torch.full_like(atp, float("nan")), {}, {}, loads[b],
                                  torch.zeros(0, dtype=torch.long), tr, b, acts=act, share=share)
        del tr, entries, clean
    lap("A: AtP, every prompt")

    # pass B, the example prompts: exact effects of their top_exact nodes, exact and AtP edges, head loadings
    n_runs = 0
    if n_ex:
        ex_task = task.subset(range(n_ex))
        ex_all = list(_bounded(_by_length(model, ex_task, **kw), per_token))
        ex_batches = list(my_batches(iter(ex_all)))
        for batch in with_progress(iter(ex_batches), sum(len(b.indices) for b in ex_batches),
                                   "circuit across positions: exact effects, example prompts", shown):
            n_runs += _example_batch(eng, ctx, batch, base, top_exact, screen_distance, edge_targets, head_targets,
                                     graphs)
    _share_graphs(graphs, ident, ctx.prompt_pairs, n_ex)
    # the agreement pairs in one process's order (pass B's batches in turn)
    pairs = {"nodes": ([], [], []), "edges": ([], [], [])}  # (atp, exact, distance) over the example prompts
    for i in [int(i) for b in (ex_all if n_ex else []) for i in b.indices]:
        for what, cols in ctx.prompt_pairs.get(i, {}).items():
            for col, vals in zip(pairs[what], cols, strict=True):
                col.extend(vals)
    lap("B: examples, exact")

    # the aggregate of the pruned graphs chooses the candidates; each is then measured exactly on every prompt
    aggregated = aggregate_graphs([_in_graph(g) for g in graphs], share=share)
    cand_nodes = _choose_candidates(aggregated, max_candidates)
    cand_nodes += _anchor_inputs(aggregated, cand_nodes, pg, task, ident)
    where = [(ident[nd["id"].rpartition("@")[0]], nd["column"]) for nd in cand_nodes]
    ver = _Verification(len(cand_nodes), n)
    for batch in with_progress(iter(mine), n_mine, "circuit across positions: exact, every prompt", shown):
        n_runs += ver.run(eng, pg, batch, [_anchors(task, int(i), int(batch.positions[b]))
                                           for b, i in enumerate(batch.indices)], where, cands, base)
    ver.gather()
    n_runs = int(reduce(torch.tensor([n_runs], dtype=torch.long), what="exact intervention counts"))
    lap("C: aggregated graph, exact on every prompt")
    aggregated = _verified_graph(aggregated, cand_nodes, ver, share, n, max_candidates)

    # faithfulness and completeness on every prompt: of its own pruned graph (exact values on the example prompts,
    # AtP on the others), and of the aggregated graph's kept nodes where the prompt holds them
    kept = [j for j, nd in enumerate(cand_nodes) if _kept(aggregated, nd["id"])]
    faith = torch.zeros(n, 6, dtype=torch.float64)  # per prompt (each on the rank that computed it; 0 elsewhere)
    for batch in mine:
        own = [graphs[int(i)] for i in batch.indices]
        keys = [{nd["id"]: (*ident[nd["id"].rpartition("@")[0]], int(nd["pos"])) for nd in g["nodes"]
                 if nd["kind"] != "target"} for g in own]
        agg_keys = [{str(j): ver.present[int(i)][j] for j in kept if j in ver.present[int(i)]} for i in batch.indices]
        pseudo = [{"nodes": [{"id": k, "kind": "x", "in_graph": True} for k in kk]} for kk in agg_keys]
        idx = torch.as_tensor(batch.indices, dtype=torch.long)
        # the clean column: pass C's clean pass of this very batch (its rows' answer log-probs), not a forward more
        faith[idx] = _faithfulness_batch(eng, pg, batch, own, keys, means, more=[(pseudo, agg_keys)],
                                         clean_m=ver.clean_m[idx])  # [B, 6]
    # the rows in one process's order (the prompts by length): the bootstrap resamples them with fixed seeds
    faith = sum_disjoint(faith, "faithfulness rows")[[i for b in _by_length(model, task, **kw) for i in b.indices]]
    faith_rows, agg_rows = [faith[:, :4]], [faith[:, [0, 1, 4, 5]]]
    lap("D: faithfulness")
    rule = f"the top {top_exact} nodes by |AtP|" + (
        f" and every node at most {screen_distance} positions before P" if screen_distance >= 0 else "")
    return _assemble(task, graphs, pairs, faith_rows, agg_rows, share, n_runs, n_ex, aggregated, ver,
                     f"{rule}, each measured exactly")


def _gather_json(obj, what: str) -> list:
    """Every rank's JSON-serialisable ``obj`` in rank order (``[obj]`` in one process), sent as UTF-8 JSON bytes
    through :func:`~saecircuits.distributed.gather_parts` (tensors only, nothing pickled; floats round-trip
    exactly)."""
    import json

    from saecircuits.distributed import gather_parts, world

    if world()[1] <= 1:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    return [json.loads(p.numpy().tobytes().decode()) for p in gather_parts(data, what)]


def _share_graphs(graphs: list, ident: dict, prompt_pairs: dict, n_ex: int) -> None:
    """Sharded: every rank's per-prompt graphs onto every rank, in place (the example prompts' whole, the others'
    pruned graphs, all the aggregate and the faithfulness of other ranks' prompts read), with the node identities
    and the agreement pairs. Nothing in one process."""
    from saecircuits.distributed import world

    if world()[1] <= 1:
        return
    mine = {"graphs": [[i, g if i < n_ex else _in_graph(g)] for i, g in enumerate(graphs) if g is not None],
            "ident": [[k, *v] for k, v in ident.items()], "pairs": [[i, p] for i, p in prompt_pairs.items()]}
    for part in _gather_json(mine, "the circuit across positions' per-prompt graphs"):
        for i, g in part["graphs"]:
            if graphs[i] is None:
                graphs[i] = g
        for k, gi, local in part["ident"]:
            ident[k] = (gi, local)
        for i, p in part["pairs"]:
            prompt_pairs.setdefault(int(i), p)


def _choose_candidates(aggregated: dict, max_candidates: int | None) -> list[dict]:
    """The aggregate's kept nodes to measure exactly on every prompt: every input (embedding) node, and the
    ``max_candidates`` internal ones of largest influence (ties by id), in the aggregate's order."""
    from saecircuits.analysis.circuit.prune import INPUT_KINDS, node_influence

    kept = [nd for nd in aggregated["nodes"] if nd.get("in_graph") and nd["kind"] != "target"]
    internal = [nd for nd in kept if nd["kind"] not in INPUT_KINDS]
    if max_candidates is not None and len(internal) > max_candidates:
        chosen = {nd["id"] for nd in sorted(internal, key=lambda nd: (-node_influence(nd), nd["id"]))[:max_candidates]}
        kept = [nd for nd in kept if nd["kind"] in INPUT_KINDS or nd["id"] in chosen]
    return kept


def _anchor_inputs(aggregated: dict, chosen: list[dict], pg: PositionGroups, task: Task, ident: dict) -> list[dict]:
    """The token and position embeddings at every named column (the task's anchors and P) that the candidates lack:
    measured exactly on every prompt too. AtP misses them badly (the demo's embedding at P: exact 2.45 nats, AtP
    0.078; at a prompt's ``said``: 2.416 against -0.005), so the AtP-pruned graphs that choose the candidates drop
    them, and the aggregated graph could not say how much the anchor tokens themselves carry. A few nodes per prompt,
    each one intervention. Their entries in ``aggregated`` when it has them, else new ones (``ident`` gains them)."""
    have = {nd["id"] for nd in chosen}
    by_id = {nd["id"]: nd for nd in aggregated["nodes"]}
    names = {name for i in range(task.n_prompts) for name in task.anchors(i)} | {"P"}
    out = []
    for column in aggregated["columns"]:
        if column not in names:
            continue
        for gi, kind in enumerate(pg.names):
            if kind not in ("embed", "pos_embed"):
                continue
            key = f"{kind}:{pg.layer[gi]}:0"
            nid = f"{key}@{column}"
            if nid in have:
                continue
            ident.setdefault(key, (gi, 0))
            out.append(by_id.get(nid) or {
                "id": nid, "kind": kind, "layer": pg.layer[gi], "column": column, "label": kind, "sae": None,
                "feature": None, "head": None, "mean_exact": None, "ci95": None, "mean_atp": 0.0, "n_prompts": 0,
                "in_graph": False})
    return out


def _kept(aggregated: dict, node_id: str) -> bool:
    return any(nd["id"] == node_id and nd.get("in_graph") for nd in aggregated["nodes"])


@dataclass
class _Ctx:
    """What building a per-prompt graph needs (see :meth:`graph`)."""

    model: object
    task: Task
    pg: PositionGroups
    describe: object
    heads: list[str]
    n_layers: int
    max_edges: int
    prompt_pairs: dict  # prompt index -> its agreement pairs (_graph's ``pairs``), where it has any
    ident: dict
    share: float
    strings: dict = field(default_factory=dict)  # token id -> token_string (the same tokens recur in every prompt)

    def token(self, t: int) -> str:
        from saecircuits.models.tokens import token_string

        if t not in self.strings:
            self.strings[t] = token_string(self.model.tokenizer, t)
        return self.strings[t]

    def graph(self, i, P, c, atp, exact, ex_edges, at_edges, loads, feat_idx, tr, b, acts=None, share=None) -> dict:
        """The prompt's graph (:func:`_graph`; with ``share``, its pruned part alone)."""
        pairs = {"nodes": ([], [], []), "edges": ([], [], [])}
        g = _graph(self.pg, self.describe, self.heads, c, atp, exact, ex_edges, at_edges, loads, feat_idx, tr, b, P,
                   self.n_layers, self.max_edges, pairs, self.ident, acts, share)
        if pairs["nodes"][0] or pairs["edges"][0]:
            self.prompt_pairs[int(i)] = pairs
        # keys in the order results.json's PromptGraph declares them (the file round-trips exactly)
        return {"prompt_index": int(i),
                "tokens": [self.token(int(t)) for t in self.task.token_ids[i][: P + 1]],
                "P": P, "anchors": _anchors(self.task, int(i), P), **g}


def _example_batch(eng, ctx: _Ctx, batch, base, top_exact, screen_distance, edge_targets, head_targets, graphs
                   ) -> int:
    """Pass B on one batch of example prompts: their graphs (exact node effects, edges, head loadings) into
    ``graphs``; the nodes are the top_exact by ``|AtP|`` and every node within ``screen_distance`` of P (in rank
    order); returns the number of exact interventions."""
    pg = ctx.pg
    clean = clean_cache(eng, batch)
    tr, contrib = node_attributions(eng, pg, batch, base)
    B = len(batch.indices)
    chosen, atps = [], []
    for b, (keys, atp) in enumerate(_batch_candidates(pg, tr, contrib, batch.positions)):
        P = int(batch.positions[b])
        pick = (torch.arange(len(keys)) < top_exact) | (keys[:, 2] >= P - screen_distance)
        chosen.append(PromptNodes(keys[pick, 0], keys[pick, 1], keys[pick, 2]))
        atps.append(atp[pick])
    is_feat = [torch.tensor([pg.groups[int(g)].kind == "sae" and int(k) < pg.groups[int(g)].sae.d_sae
                             for g, k in zip(c.gi, c.local, strict=True)], dtype=torch.bool) for c in chosen]
    feat_idx = [torch.nonzero(m).flatten() for m in is_feat]
    down = [PromptNodes(c.gi[i], c.local[i], c.pos[i]) for c, i in zip(chosen, feat_idx, strict=True)]
    effects, ex_edges, runs = exact_node_effects(eng, pg, clean, chosen, down, baselines=base)
    # AtP edges into the edge_targets features of largest |exact| (one backward pass each), head loadings into the
    # first head_targets of them and into the target
    ranked = [torch.argsort(effects[b][feat_idx[b]].abs().nan_to_num(0.0), descending=True, stable=True)
              for b in range(B)]
    sel = [r[:edge_targets] for r in ranked]
    at_sel = attribution_edges(pg, tr, chosen, [PromptNodes(d.gi[s], d.local[s], d.pos[s])
                                                for d, s in zip(down, sel, strict=True)])
    at_edges = [{(a, int(s[j])): v for (a, j), v in e.items()} for e, s in zip(at_sel, sel, strict=True)]
    targets = [[-1] + r[:head_targets].tolist() for r in ranked]
    loads = head_loadings(eng, pg, clean, tr, chosen, down, targets)
    for b, i in enumerate(batch.indices):
        P = int(batch.positions[b])
        g = ctx.graph(int(i), P, chosen[b], atps[b], effects[b], ex_edges[b], at_edges[b], loads[b], feat_idx[b], tr,
                      b)
        graphs[int(i)] = prune_graph(g, ctx.share)
    return runs


def _column_position(column: str, P: int, anchors: dict[str, int]) -> int | None:
    """The position of an aggregated column in one prompt (:func:`~.aggregate.column_of`'s inverse), None when the
    prompt has no such position (an anchor it lacks, an offset before its first token or on one of its anchors)."""
    from saecircuits.analysis.circuit.aggregate import column_of

    if column == "P":
        return P
    if column in anchors:
        pos = int(anchors[column])
    elif column.startswith("P-") and column[2:].isdigit():
        pos = P - int(column[2:])
    else:
        return None
    if pos < 0 or pos > P or column_of(pos, P, anchors) != column:
        return None
    return pos


class _Verification:
    """Exact effects (nats), AtP values and exact edges of the aggregated graph's candidate nodes on every prompt
    where each exists (at its column's position; a feature only where active)."""

    def __init__(self, n_nodes: int, n_prompts: int):
        self.exact = torch.zeros(n_prompts, n_nodes, dtype=torch.float64)  # absent: 0
        self.atp = torch.zeros(n_prompts, n_nodes, dtype=torch.float64)
        self.here = torch.zeros(n_prompts, n_nodes, dtype=torch.bool)
        self.edges: dict[tuple[int, int], torch.Tensor] = {}  # (j_u, j_d) -> [n_prompts]
        self.present: list[dict[int, tuple[int, int, int]]] = [{} for _ in range(n_prompts)]
        self.n_prompts = n_prompts
        # each prompt's clean answer log-prob (nats) from its batch's clean pass, on the rank that ran it (NaN
        # elsewhere): the faithfulness pass's clean column, over the same batches
        self.clean_m = torch.full((n_prompts,), float("nan"), dtype=torch.float64)

    def run(self, eng, pg, batch, anchors, where, cands, base) -> int:
        clean = clean_cache(eng, batch)
        self.clean_m[torch.as_tensor(batch.indices, dtype=torch.long)] = clean.m.double().cpu()
        nodes, down, js, js_down = [], [], [], []
        for b, i in enumerate(batch.indices):
            i, P = int(i), int(batch.positions[b])
            rows = []
            for j, ((gi, k), column) in enumerate(where):
                pos = _column_position(column, P, anchors[b])
                if pos is not None:
                    rows.append((j, gi, k, pos))
            keys = torch.tensor([[gi, k, t] for _, gi, k, t in rows], dtype=torch.long).reshape(-1, 3)
            at = cands[i].find(keys)
            rows = [r for r, a in zip(rows, at.tolist(), strict=True) if a >= 0]
            if rows:
                j_here = [r[0] for r in rows]
                self.here[i, j_here] = True
                self.atp[i, j_here] = cands[i].atp[at[at >= 0]].double()
                self.present[i].update((j, (gi, k, t)) for j, gi, k, t in rows)
            t_ = torch.tensor([r[1:] for r in rows], dtype=torch.long).reshape(-1, 3)
            nodes.append(PromptNodes(t_[:, 0], t_[:, 1], t_[:, 2]))
            js.append([r[0] for r in rows])
            feat = [a for a, r in enumerate(rows) if pg.groups[r[1]].kind == "sae" and r[2] < pg.groups[r[1]].sae.d_sae]
            down.append(PromptNodes(t_[feat, 0], t_[feat, 1], t_[feat, 2]))
            js_down.append([rows[a][0] for a in feat])
        effects, edges, runs = exact_node_effects(eng, pg, clean, nodes, down, baselines=base)
        # every prompt's edges as arrays (candidate up, candidate down, prompt, value), then one row per edge: a
        # prompt holds thousands of edges, and each is one (prompt, edge) entry, set once
        ups, dns, prompts, vals = [], [], [], []
        for b, i in enumerate(batch.indices):
            i = int(i)
            if js[b]:
                self.exact[i, js[b]] = effects[b].to(self.exact.dtype)
            if edges[b]:
                ac = np.array(list(edges[b]), dtype=np.int64).reshape(-1, 2)
                ups.append(np.asarray(js[b], dtype=np.int64)[ac[:, 0]])
                dns.append(np.asarray(js_down[b], dtype=np.int64)[ac[:, 1]])
                prompts.append(np.full(len(ac), i, dtype=np.int64))
                vals.append(np.fromiter(edges[b].values(), np.float64, len(ac)))
        if ups:
            K = len(where)
            keys, inv = np.unique(np.concatenate(ups) * K + np.concatenate(dns), return_inverse=True)
            table = torch.zeros(len(keys), self.n_prompts, dtype=torch.float64)
            table[torch.from_numpy(inv.reshape(-1)), torch.from_numpy(np.concatenate(prompts))] = torch.from_numpy(
                np.concatenate(vals))
            mine = torch.as_tensor([int(i) for i in batch.indices], dtype=torch.long)
            for r, code in enumerate(keys.tolist()):
                key = (code // K, code % K)
                if key not in self.edges:
                    self.edges[key] = torch.zeros(self.n_prompts, dtype=torch.float64)
                self.edges[key][mine] = table[r, mine]
        return runs

    def gather(self) -> None:
        """Sharded: every rank's prompts' values onto every rank (each prompt was measured on one rank, 0
        elsewhere: disjoint sums, exact). Nothing in one process."""
        from saecircuits.distributed import gather_rows, sum_disjoint, world

        if world()[1] <= 1:
            return
        what = "the aggregated graph's exact values"
        self.exact, self.atp = sum_disjoint(self.exact, what), sum_disjoint(self.atp, what)
        self.here = sum_disjoint(self.here.long(), what) > 0
        keys = torch.tensor(sorted(self.edges), dtype=torch.long).reshape(-1, 2)
        union = torch.unique(gather_rows(keys, what), dim=0)
        vals = torch.zeros(len(union), self.n_prompts, dtype=torch.float64)
        for r, (ju, jd) in enumerate(union.tolist()):
            if (ju, jd) in self.edges:
                vals[r] = self.edges[(ju, jd)]
        vals = sum_disjoint(vals, what)
        self.edges = {(ju, jd): vals[r] for r, (ju, jd) in enumerate(union.tolist())}


def _verified_graph(aggregated: dict, cand: list[dict], ver: _Verification, share: float, n: int,
                    max_candidates: int | None = None) -> dict:
    """The aggregated graph with the candidates' exact means over every prompt, pruned again on them: candidates
    (the nodes the aggregate of the pruned per-prompt graphs kept) carry ``mean_exact`` with its 95% interval and
    the AtP mean beside it, ``values = "exact"``; other nodes are out of the graph with ``values = "estimated"``
    (no exact mean). Edges: among candidates, into the target (the exact node effect) and into features (exact,
    means over every prompt, 0 where either end is absent)."""
    from saecircuits.analysis.circuit.prune import prune
    from saecircuits.analysis.statistics import mean_ci95

    ids = [nd["id"] for nd in cand]
    old_edges = {(e["src"], e["dst"]): e for e in aggregated["edges"]}
    target = next((nd for nd in aggregated["nodes"] if nd["kind"] == "target"), None)
    nodes = []
    for j, nd in enumerate(cand):
        vec = ver.exact[:, j].numpy()
        m = mean_ci95(vec)
        ci = [_f(m.low), _f(m.high)] if math.isfinite(m.low) and math.isfinite(m.high) else None
        nodes.append({**nd, "mean_exact": _f(m.mean), "ci95": ci, "mean_atp": _f(float(ver.atp[:, j].mean())),
                      "n_prompts": int(ver.here[:, j].sum()), "values": "exact"})
    edges = []
    if target is not None:
        for j, nd in enumerate(nodes):
            old = old_edges.get((ids[j], target["id"]))
            edges.append({"src": ids[j], "dst": target["id"], "mean_exact": nd["mean_exact"], "mean_atp": nd["mean_atp"],
                          "heads": old.get("heads") if old else None})
    for (ju, jd), vec in sorted(ver.edges.items()):
        edges.append({"src": ids[ju], "dst": ids[jd], "mean_exact": _f(float(vec.mean())), "mean_atp": None,
                      "heads": None})
    if target is not None:  # no value of its own: the answer's log-prob that every other value is measured on
        target = {**target, "values": "target"}
    nodes, edges, pruning = prune(nodes + ([target] if target is not None else []), edges, share)
    rest = [{**nd, "mean_exact": None, "ci95": None, "values": "estimated", "in_graph": False}
            for nd in aggregated["nodes"] if nd["id"] not in set(ids) and nd["kind"] != "target"]
    order = {c: k for k, c in enumerate(aggregated["columns"])}
    nodes = sorted(nodes + rest, key=lambda nd: (order.get(nd["column"], 0), nd["layer"], nd["id"]))
    return {**aggregated, "nodes": nodes, "edges": edges, "pruning": pruning,
            "candidates": {"n": len(cand), "rule": "the nodes the aggregate of the prompts' pruned graphs kept "
                                                   "(exact values on the example prompts, AtP on the others)" + (
                "" if max_candidates is None else f": every input node and the {max_candidates} internal nodes of "
                                                  "largest aggregated influence") + (
                f"; and the {inputs_phrase(nd['kind'] for nd in nodes)} at every anchor column and P (AtP "
                "underestimates them)")}}


GRAPH_FLOATS = 1 << 26
"""Budget (floats) of one tracked forward's autograd graph: the rows of a batch are split so that ``rows x T x``
:func:`_floats_per_token` stays under it (a 500-token prompt with two 16k-feature SAEs: a few rows at a time)."""


def _floats_per_token(engine, pg: PositionGroups) -> int:
    """Floats the tracked forward keeps per position: SAE codes (encoded, leaf, gradient), errors, heads, MLPs."""
    sae = sum(3 * g.sae.d_sae + 2 * g.sae.d_out for g in pg.groups if g.kind == "sae")
    return sae + engine.n_layers * (24 * engine.d_model + 4 * engine.layers[0].W_in.shape[-1])


def _by_length(model, task: Task, **kw):
    """:func:`task_batches` over the prompts sorted by length, each batch's ``indices`` those of ``task``: every
    pass here computes every position, so batching prompts of similar length saves the padding's work."""
    from saecircuits.models.hooks import TaskBatch

    order = sorted(range(task.n_prompts), key=lambda i: (len(task.token_ids[i]), i))
    for batch in task_batches(model, task.subset(order), **kw):
        yield TaskBatch([order[int(i)] for i in batch.indices], batch.tokens, batch.positions, batch.answer_ids)


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
           max_edges, pairs, ident, acts=None, share: float | None = None) -> dict:
    """One prompt's graph dict (nodes ``c`` with their AtP and exact values, NaN exact = not measured; edges into
    the target and between nodes); agreement pairs of the measured nodes and edges are added to ``pairs``.
    ``acts``: the nodes' :func:`_activations` when the caller read them for its whole batch. ``share``: return
    the pruned graph's kept part alone (``_in_graph(prune_graph(graph, share))``, the same dicts): pruning reads
    ids, kinds and values only, so it runs on those, and only the kept nodes and edges are built in full (pass A's
    graphs, of which nothing else is read)."""
    ids = []
    rows = []  # per node: its dict's fields but exact / atp
    gis, ks, ts = c.gi.tolist(), c.local.tolist(), c.pos.tolist()  # python values in bulk (per-element reads are slow)
    exact_l, atp_l = exact.tolist(), atp.tolist()
    exact_f, atp_f = _fs(exact_l), _fs(atp_l)
    acts_f = _fs(_activations(pg, tr, b, c) if acts is None else acts)
    fidx = feat_idx.tolist()
    for a, (gi, k, t) in enumerate(zip(gis, ks, ts, strict=True)):
        kind, label, index, si, feat, head = describe(gi, k)
        ident[f"{kind}:{pg.layer[gi]}:{index}"] = (gi, k)
        nid = f"{kind}:{pg.layer[gi]}:{index}@{t}"
        ids.append(nid)
        rows.append((kind, pg.layer[gi], t, label, si, feat, head, acts_f[a] if kind == "feature" else None))
        if math.isfinite(exact_l[a]):
            pairs["nodes"][0].append(atp_l[a])
            pairs["nodes"][1].append(exact_l[a])
            pairs["nodes"][2].append(P - t)
    target = f"target:{n_layers}:0@{P}"

    def node(a: int, in_graph: bool) -> dict:
        kind, layer, t, label, si, feat, head, act = rows[a]
        return {"id": ids[a], "kind": kind, "layer": layer, "pos": t, "label": label, "sae": si, "feature": feat,
                "head": head, "activation": act, "exact": exact_f[a], "atp": atp_f[a], "ig": None,
                "in_graph": in_graph}

    target_node = {"id": target, "kind": "target", "layer": n_layers, "pos": P, "label": "log p(answer)", "sae": None,
                   "feature": None, "head": None, "activation": None, "exact": None, "atp": None, "ig": None,
                   "in_graph": True}

    # every loading's JSON floats in one string format (an example prompt has tens of thousands of loadings)
    load_fs = _fs([v for parts in loads.values() for v in parts])
    at = {key: j * len(heads) for j, key in enumerate(loads)}

    def head_list(key):
        j = at.get(key)
        if j is None:
            return None
        return [{"head": h, "value": f} for h, v, f in zip(heads, loads[key], load_fs[j : j + len(heads)], strict=True)
                if v != 0.0]

    for (a, j), v in at_edges.items():  # every valid pair into an estimated feature (0 allowed); exact 0 unrecorded
        pairs["edges"][0].append(v)
        pairs["edges"][1].append(ex_edges.get((a, j), 0.0))
        pairs["edges"][2].append(P - ts[a])  # by the source's distance from P (how far the evidence travels)
    # every node's edge into the target (its effect: one per node, never capped), then the max_edges largest other
    # edges by max(|exact|, |atp|) (ties in order of (source, destination)); dicts only for those (an early node's
    # exact edges reach nearly every later feature)
    top, n_left_out = _largest_edges(at_edges, ex_edges, max_edges)
    cand = [(a, j) for _, a, j in top] + [(a, -1) for a in range(len(c.gi))]
    ends, values = [], []  # per edge: (src, dst), (exact, atp)
    for a, j in cand:
        if j < 0:
            ends.append((ids[a], target))
            values.append((exact_f[a], atp_f[a]))
        else:
            v = at_edges.get((a, j))
            ends.append((ids[a], ids[fidx[j]]))
            values.append((_f(ex_edges.get((a, j), 0.0)), None if v is None else _f(v)))

    def edge(i: int, in_graph: bool) -> dict:
        (src, dst), (ex, atp_v) = ends[i], values[i]
        return {"src": src, "dst": dst, "exact": ex, "atp": atp_v, "heads": head_list(cand[i]), "in_graph": in_graph}

    edge_cap = {"max_edges": int(max_edges), "n_left_out": n_left_out,
                "rule": "every node's edge into the target (its effect) is kept; of the other edges, the max_edges "
                        "largest by max(|exact|, |atp|)"}
    if share is None:
        return {"nodes": [node(a, False) for a in range(len(ids))] + [target_node],
                "edges": [edge(i, False) for i in range(len(cand))], "edge_cap": edge_cap}
    from saecircuits.analysis.circuit.prune import kept_by_pruning

    kept_nodes, kept_edges, pruning = kept_by_pruning(
        [{"id": ids[a], "kind": rows[a][0], "exact": exact_f[a], "atp": atp_f[a]} for a in range(len(ids))]
        + [{"id": target, "kind": "target", "exact": None, "atp": None}],
        [{"src": src, "dst": dst, "exact": ex, "atp": atp_v} for (src, dst), (ex, atp_v) in zip(ends, values,
                                                                                              strict=True)], share)
    return {"nodes": [node(a, True) for a in range(len(ids)) if ids[a] in kept_nodes] + [target_node],
            "edges": [edge(i, True) for i in range(len(cand)) if i in kept_edges], "edge_cap": edge_cap,
            "pruning": pruning}


def _largest_edges(at_edges: dict, ex_edges: dict, max_edges: int) -> tuple[list[tuple[float, int, int]], int]:
    """The ``max_edges`` largest edges ``(a, j)`` of one prompt by ``max(|atp|, |exact|)`` among those with a
    non-zero AtP or exact value, as ``(-size, a, j)`` in increasing order (ties in (source, destination) order),
    and how many were left out. In arrays: an example prompt has tens of thousands of exact edges (what a Python
    loop and ``heapq.nsmallest`` over ``(-size, a, j)`` tuples gave, the same selection and order)."""
    only_at = [k for k in at_edges if k not in ex_edges]
    keys = list(ex_edges) + only_at
    if not keys:
        return [], 0
    aj = np.array(keys, dtype=np.int64).reshape(-1, 2)
    e = np.concatenate([np.fromiter(ex_edges.values(), np.float64, len(ex_edges)), np.zeros(len(only_at))])
    v = np.array([at_edges.get(k, 0.0) for k in keys], dtype=np.float64)
    keep = (v != 0) | (e != 0)
    av, ae = np.abs(v[keep]), np.abs(e[keep])
    size = -np.where(ae > av, ae, av)  # Python's max(|v|, |e|): the first unless the second is larger
    a, j = aj[keep, 0], aj[keep, 1]
    order = np.lexsort((j, a, size))[:max_edges]
    top = list(zip(size[order].tolist(), a[order].tolist(), j[order].tolist(), strict=True))
    return top, max(0, int(keep.sum()) - max_edges)


def _activations(pg: PositionGroups, tr, b: int, c: PromptNodes) -> list[float]:
    """Prompt ``b``'s SAE code ``f`` at each node of ``c`` (a feature's activation; NaN for other nodes), read per
    group in one indexing."""
    out = torch.full((len(c.gi),), float("nan"), dtype=torch.float64)
    for gi, g in enumerate(pg.groups):
        if g.kind != "sae":
            continue
        m = (c.gi == gi) & (c.local < g.sae.d_sae)
        if bool(m.any()):
            f = tr.leaves[gi][0]
            with torch.no_grad():
                out[m] = f[b, 0, c.pos[m].to(f.device), c.local[m].to(f.device)].double().cpu()
    return out.tolist()


def _batch_activations(pg: PositionGroups, tr, rows: Sequence[int], cs: Sequence[PromptNodes]) -> list[list[float]]:
    """:func:`_activations` of the nodes ``cs[i]`` of prompts ``rows[i]``, every prompt's read per group in one
    indexing (the same floats)."""
    sizes = [len(c.gi) for c in cs]
    if not cs:
        return []
    gis, ks, ts = (torch.cat([getattr(c, a) for c in cs]) for a in ("gi", "local", "pos"))
    bs = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), torch.tensor(sizes, dtype=torch.long))
    out = torch.full((len(gis),), float("nan"), dtype=torch.float64)
    for gi, g in enumerate(pg.groups):
        if g.kind != "sae":
            continue
        m = (gis == gi) & (ks < g.sae.d_sae)
        if bool(m.any()):
            f = tr.leaves[gi][0]
            with torch.no_grad():
                out[m] = f[bs[m].to(f.device), 0, ts[m].to(f.device), ks[m].to(f.device)].double().cpu()
    return [x.tolist() for x in out.split(sizes)]


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


def _faith_stats(rows: list[torch.Tensor]) -> dict:
    """Faithfulness and completeness (loss recovered, paired-bootstrap intervals) from :func:`_faithfulness_batch`
    rows."""
    m = torch.cat(rows) if rows else torch.zeros(0, 4)
    stats = {}
    for name, col in (("faithfulness", 2), ("completeness", 3)):
        lr = loss_recovered(-m[:, 0], -m[:, col], -m[:, 1], ablation="mean-ablating every node at every position")
        ok = lr.reason is None and math.isfinite(lr.value)
        stats[name] = {"mean": _f(lr.value) if ok else None,
                       "ci95": [_f(lr.low), _f(lr.high)] if ok and math.isfinite(lr.low) else None,
                       "undefined_reason": lr.reason}
    return stats


def _assemble(task, graphs, pairs, faith_rows, agg_rows, share, n_runs, n_examples, aggregated, ver, example_rule
              ) -> dict:
    na, ne, nd = pairs["nodes"]
    ea, ee, ed = pairs["edges"]
    here = ver.here
    agree = {"nodes": {"atp": _agreement_json(agreement(np.array(na), np.array(ne))), "ig": None},
             "edges": {"atp": _agreement_json(agreement(np.array(ea), np.array(ee)))},
             "by_distance": _by_distance(na, ne, nd), "edges_by_distance": _by_distance(ea, ee, ed),
             "aggregated_nodes": _agreement_json(agreement(ver.atp[here].numpy(), ver.exact[here].numpy())),
             "pairs": f"nodes and edges: the {n_examples} example prompts' graphs (their top nodes by |AtP|, every one "
                      "measured); aggregated_nodes: the aggregated graph's candidates on every prompt holding them"}
    stats = _faith_stats(faith_rows)
    aggregated = {**aggregated, **{f"{k}": v for k, v in _faith_stats(agg_rows).items()}}
    return {
        "target": TARGET, "share": share, "n_prompts": task.n_prompts, "n_exact_interventions": int(n_runs),
        "summary": positions_summary(aggregated), "agreement": agree,
        "faithfulness": stats["faithfulness"], "completeness": stats["completeness"],
        "means": "per node over the task's prompts and every position <= P of each; the token and position "
                 "embeddings' single ablations (exact effects, edges, AtP) set them to these means too",
        "head_loading": "per (layer, key/value head): first-order parts of the AtP edge through the keys/values of "
                        "earlier positions; they sum to the edge's AtP value (circuit-tracer's attention attribution)",
        "values": VALUES_NOTE.format(n_examples=n_examples, n_prompts=task.n_prompts),
        "example_nodes": example_rule, "views": VIEWS_NOTE,
        "aggregated": aggregated, "examples": graphs[:n_examples],
    }


VALUES_NOTE = (
    "Exact: every node of the {n_examples} example prompts' graphs (node effects, edges into features; edges into "
    "the target are the node effects), and the aggregated graph's nodes marked values='exact' (mean over all "
    "{n_prompts} prompts of the exact effect where the node exists, 0 elsewhere, with a t-based 95% interval) with "
    "their edges' mean_exact. Estimated: every atp / mean_atp value, head loadings, and the aggregated nodes marked "
    "values='estimated' (no exact mean). Faithfulness / completeness (exact mean ablation at every position, every "
    "prompt): of each prompt's own pruned graph (top level), and of the aggregated graph's kept nodes where each "
    "prompt holds them (aggregated.faithfulness / aggregated.completeness)."
)

VIEWS_NOTE = (
    "The three faithfulness figures measure different circuits: the circuit at P (circuit.json's "
    "selection.faithfulness) mean-ablates nodes at P only (to their means over corpus tokens), every earlier "
    "position left clean, so whatever earlier tokens carry is kept for free; each prompt's own pruned graph (this "
    "entry's faithfulness; pruned on exact values for the example prompts, on AtP for the others) keeps its nodes at "
    "their positions and mean-ablates every other node at every position; the aggregated graph (aggregated.faithfulness) keeps one set "
    "of nodes for all prompts, placed at their column's position where a prompt holds them, so what is particular "
    "to a prompt is ablated: it is the strictest of the three, and the one that says how general the circuit is."
)


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
    from saecircuits.distributed import my_batches

    engine = engine_of(model)
    parts: list[dict] = []  # per batch (this rank's, sharded), per group: its sums over the batch's positions
    counts: list[int] = []
    with torch.no_grad():
        for batch in my_batches(task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch)):
            mask = _valid_positions(batch)
            part: dict = {}
            hooks: dict = {}
            for gi, g in enumerate(pg.groups):
                if g.kind == "sae":
                    def fn(x_in, x, gi=gi, sae=g.sae, mask=mask, part=part):
                        xi = x_in[:, 0][mask]
                        f = sae.encode(xi).double().sum(0)
                        # the error's sum by linearity, sum(x) - sum(f) @ W_dec - sum(bias), in float64: one
                        # product per batch, not a decoder product per position
                        bias = sae.decoder_bias(xi).double().sum(0) if sae.decode_needs_input else \
                            sae.b_dec.double() * len(xi)
                        e = _sae_error(sae, f, x[:, 0][mask].double().sum(0), bias)
                        part[gi] = {"f": f.float(), "e": e.float()}
                        return x

                    _add_sae_hook(hooks, g, fn)
                else:
                    def fn(a, gi=gi, mask=mask, part=part):
                        part[gi] = a[:, 0][mask].float().sum(0)

                    hooks.setdefault(g.hook, []).append(fn)
            engine.forward_tokens(batch.tokens, hooks)
            parts.append(part)
            counts.append(int(mask.sum()))
    parts, counts = _parts_in_batch_order(parts, counts)
    sums: dict = {}
    for part in parts:  # added batch by batch, in one process's order (float32 sums: the order is the rounding)
        for gi, v in part.items():
            if isinstance(v, dict):
                sums[gi] = v if gi not in sums else {k: sums[gi][k] + v[k] for k in v}
            else:
                sums[gi] = v + (sums[gi] if gi in sums else 0)
    count = sum(counts)
    return {gi: ({k: v / count for k, v in s.items()} if isinstance(s, dict) else s / count) for gi, s in sums.items()}


def _parts_in_batch_order(parts: list[dict], counts: list[int]) -> tuple[list[dict], list[int]]:
    """Sharded: every rank's per-batch sums (rank ``r`` holds batches ``b % world_size == r``,
    :func:`~saecircuits.distributed.my_batches`) as one process's list of batches; as given in one process."""
    from saecircuits.distributed import broadcast_json, gather_parts, world

    rank, size = world()
    if size <= 1:
        return parts, counts
    what = "the circuit across positions' mean activations"
    # one float32 row per batch: every group's sums flattened in group order (the shapes are the same on every rank)
    layout = [(gi, k, v.shape) for gi, x in sorted(parts[0].items()) for k, v in
              (sorted(x.items()) if isinstance(x, dict) else [(None, x)])] if parts else []
    shapes = broadcast_json([[gi, k, list(sh)] for gi, k, sh in layout] if rank == 0 else None, what)
    width = sum(math.prod(sh) for _, _, sh in shapes)
    dev = next((v if torch.is_tensor(v) else v["f"]).device for v in parts[0].values()) if parts and parts[0] \
        else torch.device("cpu")
    rows = torch.zeros(len(parts), width, dtype=torch.float32, device=dev)
    for r, part in enumerate(parts):
        if shapes:
            rows[r] = torch.cat([(part[gi][k] if k is not None else part[gi]).flatten().float()
                                 for gi, k, _ in shapes])
    got = gather_parts(rows, what)
    got_counts = gather_parts(torch.tensor(counts, dtype=torch.long), what)
    n_batches = sum(len(g) for g in got)
    out_parts, out_counts = [], []
    for b in range(n_batches):
        row, o, part = got[b % size][b // size], 0, {}
        for gi, k, sh in shapes:
            v = row[o : o + math.prod(sh)].reshape(sh)
            o += math.prod(sh)
            if k is None:
                part[gi] = v
            else:
                part.setdefault(gi, {})[k] = v
        out_parts.append(part)
        out_counts.append(int(got_counts[b % size][b // size]))
    return out_parts, out_counts


def _faithfulness_batch(engine, pg: PositionGroups, batch, graphs: list[dict], keys: list[dict], means: dict,
                        more: Sequence[tuple[list[dict], list[dict]]] = (), clean_m: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Answer log-prob ``[B, 4]``: clean, every node mean-ablated, every node outside the pruned circuit mean-ablated,
    the circuit's nodes mean-ablated (all at every position ``<= P``), the last two as variants of one full forward
    per chunk of prompts (``keys[b]``: node id -> ``(group, in-group index, position)``). ``more``: further
    ``(graphs, keys)`` circuits, two more columns each (outside ablated, circuit ablated) from the same forward.

    The clean column is a forward without hooks (the variant with nothing ablated is the clean model). With every
    node mean-ablated, every group's activation at every position ``<= P`` is its mean: the residual stream at P is a
    sum of constants, the same in every prompt (attention outputs are ablated, so neither the other positions nor
    the attention pattern reach P); that column is one forward of one position, read at each prompt's answer.
    ``clean_m``: the rows' clean answer log-probs ``[B]`` when the caller has them (:func:`clean_cache`'s ``m`` of
    this batch: the same forward), else computed here."""
    from saecircuits.analysis.circuit import MAX_FLOATS
    from saecircuits.models.hooks import TaskBatch

    B, T = batch.tokens.shape
    V = 2 + 2 * len(more)
    per_row = V * T * (sum(pg.n_local(gi) for gi in range(len(pg.groups))) + engine.d_model * 8)
    step = max(1, MAX_FLOATS // per_row)
    dev = batch.tokens.device
    with torch.no_grad():  # every node ablated: one position, every group at its mean
        ones = {gi: torch.ones(1, 1, 1, pg.n_local(gi), device=dev) for gi in range(len(pg.groups))}
        x = engine.forward_tokens(batch.tokens[:1, :1], _mask_hooks(pg, ones, means))
        everything = engine.logits(x[:, :, 0])  # [1, 1, d_vocab]
    out = []
    for r0 in range(0, B, step):
        sl = slice(r0, r0 + step)
        sub = TaskBatch(batch.indices[sl], batch.tokens[sl], batch.positions[sl], batch.answer_ids[sl])
        rows = _faithfulness_rows(engine, pg, sub, [(graphs[sl], keys[sl])] + [(g[sl], k[sl]) for g, k in more],
                                  means)
        n = len(sub.indices)
        with torch.no_grad():
            if clean_m is not None:
                clean = clean_m[sl].double().cpu()[:, None]
            else:
                x = engine.forward_tokens(sub.tokens)
                lg = engine.logits(x[torch.arange(n, device=dev), :, sub.positions.to(dev)])  # [n, 1, d_vocab]
                clean = _answer_logprob(lg, sub.answer_ids).double().cpu()
            empty = _answer_logprob(everything.expand(n, 1, everything.shape[-1]), sub.answer_ids).double().cpu()
        out.append(torch.cat([clean, empty, rows], dim=1))
    return torch.cat(out)


def _faithfulness_rows(engine, pg, batch, circuits, means) -> torch.Tensor:
    """Answer log-prob ``[B, 2 * len(circuits)]``: per circuit, every node outside it mean-ablated, then its nodes
    mean-ablated, at every position ``<= P`` (variants of one forward)."""
    B, T = batch.tokens.shape
    dev = batch.tokens.device
    # per group, every circuit's nodes (b, t, k) in one list: the masks are built from them in array operations
    at: list[list[list[tuple[int, int, int]]]] = [[[] for _ in pg.groups] for _ in circuits]
    for j, (graphs, keys) in enumerate(circuits):
        for b, g in enumerate(graphs):
            kb = keys[b]
            for n in g["nodes"]:
                if n["in_graph"] and n["kind"] != "target":
                    gi, k, t = kb[n["id"]]
                    at[j][gi].append((b, t, k))
    masks = {}
    for gi in range(len(pg.groups)):
        n = pg.n_local(gi)
        nodes = [torch.tensor(c[gi], dtype=torch.long).reshape(-1, 3) for c in at]
        if pg.groups[gi].kind == "sae":
            masks[gi] = _SaeMask(nodes, B, T, n, dev)
            continue
        cs = []
        for x in nodes:
            inside = torch.zeros(B, T, n, dtype=torch.bool)
            inside[x[:, 0], x[:, 1], x[:, 2]] = True
            cs.append(inside.to(dev))
        masks[gi] = torch.stack([x for c in cs for x in (~c, c)], dim=1).float()  # [B, V, T, n]
    with torch.no_grad():
        x = engine.forward_tokens(batch.tokens, _mask_hooks(pg, masks, means))
        rows = torch.arange(B, device=dev)
        lg = engine.logits(x[rows, :, batch.positions.to(dev)])  # [B, V, d_vocab]
        return _answer_logprob(lg, batch.answer_ids).double().cpu()


class _SaeMask:
    """An SAE group's mask of :func:`_faithfulness_rows` without its dense ``[B, V, T, d_sae + 1]`` floats (a
    circuit holds a few of an SAE's indices per position): variant ``2j`` ablates every index outside circuit ``j``,
    variant ``2j + 1`` its indices. ``on`` ``[B, V, T]``: the indices ablated per row (what the dense mask's sum
    was, exact small integers); :meth:`rows`: the dense mask's rows where asked (0. / 1., the same floats)."""

    def __init__(self, nodes: list[torch.Tensor], B: int, T: int, n: int, dev):
        self.n, self.B, self.T = n, B, T
        self.nodes = []  # per circuit, its distinct (b, t, k) as int64 [m, 3]
        on = torch.zeros(B, 2 * len(nodes), T)
        for j, x in enumerate(nodes):
            code = torch.unique((x[:, 0] * T + x[:, 1]) * n + x[:, 2])  # a node listed twice is one index
            x = torch.stack([code // (T * n), code // n % T, code % n], dim=1)
            self.nodes.append(x)
            cnt = torch.bincount(x[:, 0] * T + x[:, 1], minlength=B * T).reshape(B, T).float()
            on[:, 2 * j] = n - cnt
            on[:, 2 * j + 1] = cnt
        self.on = on.to(dev)
        self.shape = (B, 2 * len(nodes), T, n)

    def rows(self, mixed: torch.Tensor) -> torch.Tensor:
        """The dense mask at the rows ``mixed`` ``[B, V, T]`` (bool) selects, in that indexing's order: float
        ``[n_rows, n]``."""
        dev = mixed.device
        row = torch.full(mixed.shape, -1, dtype=torch.long, device=dev)
        n_rows = int(mixed.sum())
        row[mixed] = torch.arange(n_rows, device=dev)
        out = torch.zeros(n_rows, self.n, device=dev)
        for j, x in enumerate(self.nodes):
            x = x.to(dev)
            for v in (2 * j, 2 * j + 1):
                r = row[x[:, 0], v, x[:, 1]]
                ok = r >= 0
                out[r[ok], x[ok, 2]] = 1.0
        complement = torch.nonzero(mixed, as_tuple=True)[1] % 2 == 0  # variant 2j: outside circuit j ablated
        out[complement] = 1.0 - out[complement]
        return out


def _mask_hooks(pg, masks: dict, means: dict) -> dict:
    """Hooks that mean-ablate, per group ``gi``, the in-group indices where ``masks[gi]`` ``[B, V, T, n]`` is 1 (an
    SAE's last index: its error)."""
    from saecircuits.analysis.circuit.positions import _add_sae_hook

    hooks: dict = {}
    for gi, grp in enumerate(pg.groups):
        m = masks[gi]
        mu = means[gi]
        if grp.kind == "sae":
            sae = grp.sae

            def fn(x_in, x, sae=sae, m=m, mu=mu):
                # x - ((f - mu_f) * m_f) @ W_dec - m_e * (e - mu_e), with the error e = x - f @ W_dec - bias. A row
                # (prompt, variant, position) with nothing ablated is x; with everything ablated it is the constant
                # bias + mu_f @ W_dec + mu_e: neither needs the code f, so only rows with some nodes ablated and
                # some not (the positions holding a circuit's nodes) are encoded
                xf = x.float()
                on = m.on if isinstance(m, _SaeMask) else m.sum(-1)  # [B, V, T]
                full, mixed = on == m.shape[-1], (on > 0) & (on < m.shape[-1])
                if not bool(full.any()):
                    out = xf.clone()
                elif sae.decode_needs_input:
                    const = mu["f"].float() @ sae.W_dec.float() + mu["e"].float()
                    out = xf.clone()
                    out[full] = sae.decoder_bias(x_in[full]).float() + const
                else:  # one [d_out] constant: written in the pass that copies x (not a copy, then a masked write)
                    const = mu["f"].float() @ sae.W_dec.float() + mu["e"].float()
                    out = torch.where(full[..., None], sae.decoder_bias(None).float() + const, xf)
                if bool(mixed.any()):
                    xi, xm, mm = x_in[mixed], xf[mixed], m.rows(mixed) if isinstance(m, _SaeMask) else m[mixed]
                    f = sae.encode(xi).float()
                    me = mm[..., -1:]
                    # both products with W_dec in one, ((f - mu_f) * m_f - m_e * f) @ W_dec (the decoder's cost)
                    coef = (f - mu["f"].float()) * mm[..., :-1] - me * f
                    e0 = xm - sae.decoder_bias(xi).float() - mu["e"].float()  # e - mu_e + f @ W_dec
                    out[mixed] = xm - me * e0 - coef @ sae.W_dec.float()
                return out.to(x.dtype)

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
    return hooks
