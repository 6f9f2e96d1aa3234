"""Pruning a circuit graph to a readable one: keep the nodes and edges that carry a chosen share of the influence.

Source: circuit-tracer's pruning by influence (Ameisen et al. 2025, "Circuit Tracing: Revealing Computational Graphs
in Language Models", transformer-circuits.pub; the ``prune_graph`` of the circuit-tracer library): nodes are ranked
by their influence on the target and the smallest set carrying a threshold share (0.8 there) is kept; then edges
are scored by their normalized weight times the influence of the node they feed, and the smallest set carrying the
same share is kept.

Departures (on purpose): circuit-tracer's influence is the total (direct + indirect) effect read off the normalized
adjacency matrix ``(I - A)^-1``; here each node's influence is its measured effect on the target, ``|exact|`` (the
effect of ablating the node, an exact intervention) or ``|atp|`` where no exact value was computed, which already
counts every path. Edges into features are in activation units and edges into the target in nats, so their raw
weights are not comparable: as circuit-tracer, an edge's score is ``|w| / sum of |w| into its destination`` times
the destination's influence (nats), and edges are kept by that score.

Embedding nodes are the graph's inputs and are pruned apart (a decision, issue 16): circuit-tracer keeps its token
nodes out of the pruning altogether and prunes features and errors by influence. Here the token and position
embeddings (mean-ablated, so their effects are on-distribution) can carry more influence than every feature
together (on the demo, the token embedding at P carries about 2.7 nats, the features at most 0.05 each); ranked
with the rest they would fill the kept graph with one embedding node per position. So the share is applied twice
with the same rule: to the internal nodes (features, errors, heads, MLPs), and separately to the embedding nodes
(the inputs that carry ``share`` of the embeddings' influence: which tokens and positions the answer reads). The
pruning record says both shares, and ``non_sae_share`` (over every kept node, embeddings included) still says when
non-SAE nodes dominate the kept graph.

Paths to the target (issue 16): the two thresholds alone leave kept nodes without any kept edge (on the demo's
aggregated graph 20 of 30 kept nodes: their edges into the target are small next to the embeddings' and fall under
the edge threshold), and a reader expects every kept node to reach the target. circuit-tracer (``prune_graph``)
drops edges touching dropped nodes and then feature and error nodes left without a kept outgoing edge (and features
without a kept incoming one), to a fixed point, its token nodes always kept: here that would drop the nodes the
node threshold just kept for their influence (every SAE feature of the demo's graph), and the kept share shown would
no longer be the one the threshold chose. (Its incoming-edge rule is not applied: edges into features are measured
only into some features, so a feature's lack of a kept incoming edge says little.) So a kept node without a kept path to the target first gets its strongest
outgoing edge (largest score) to a kept node that has one (:func:`_connect`; every node has an edge into the target,
its node effect, so in these graphs every kept node with a nonzero effect is connected); only a node that still has
no path (no edge of positive score to a connected node) is dropped, circuit-tracer's fixed point, with the edges
touching it. The shares are computed on the final kept sets; ``n_edges_for_paths`` and ``n_nodes_without_path``
say what this step added and dropped.

Everything here is a pure function on the graph dicts of the "positions" contract (analysis/circuit/positions.py):
no torch, no model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["prune_graph", "kept_by_pruning", "node_influence", "edge_weight", "edge_scores", "keep_by_share",
           "NON_SAE_KINDS", "INPUT_KINDS", "MIN_INFLUENCE"]

NON_SAE_KINDS = frozenset({"error", "head", "mlp", "embed", "pos_embed"})
"""Node kinds that are not SAE features: SAE error nodes, attention heads, MLPs without an SAE, embeddings."""

INPUT_KINDS = frozenset({"embed", "pos_embed"})
"""The graph's input nodes, pruned apart from the internal ones (see the module docstring)."""


def inputs_phrase(kinds) -> str:
    """The input nodes of a graph whose node kinds are ``kinds``, in words: "token and position embeddings", or
    "token embeddings" for a model without a learned position embedding (rotary ones: Llama, Gemma, Qwen)."""
    return "token and position embeddings" if "pos_embed" in set(kinds) else "token embeddings"

MIN_INFLUENCE = 1e-6
"""Total influence (nats) at or below which a share of it is undefined: the denominator is ~0 and a ratio of
rounding noise would be printed as a result."""


def _value(exact: float | None, estimate: float | None) -> float:
    """The value a node or edge is ranked by: ``exact`` where measured, else the estimate, else 0 (finite only)."""
    v = exact if exact is not None else estimate
    if v is None or not math.isfinite(v):
        return 0.0
    return float(v)


def node_influence(node: dict) -> float:
    """A node's influence on the target (nats): ``|exact|`` where available, else ``|atp|``, else 0.

    Works on per-prompt nodes (``exact``/``atp``) and aggregated ones (``mean_exact``/``mean_atp``).
    """
    if "mean_exact" in node or "mean_atp" in node:
        return abs(_value(node.get("mean_exact"), node.get("mean_atp")))
    return abs(_value(node.get("exact"), node.get("atp")))


def edge_weight(edge: dict) -> float:
    """An edge's absolute weight: ``|exact|`` where available, else ``|atp|`` (per-prompt or aggregated ``mean_*``).
    Units are the destination's (activation units into a feature, nats into the target)."""
    if "mean_exact" in edge or "mean_atp" in edge:
        return abs(_value(edge.get("mean_exact"), edge.get("mean_atp")))
    return abs(_value(edge.get("exact"), edge.get("atp")))


def keep_by_share(scores: Iterable[tuple[str | int, float]], share: float) -> tuple[set, float, float]:
    """The smallest set of items whose scores sum to at least ``share`` of the total (largest scores first).

    Args:
        scores: ``(key, score >= 0)`` pairs (keys of one comparable type: node ids, edge indices); ties are broken
            by key so the result does not depend on input order.
        share: in ``(0, 1]``.

    Returns:
        ``(kept keys, kept score, total score)``; nothing is kept when the total is 0 (no item carries any).
    """
    ranked = sorted(((k, s) for k, s in scores if s > 0), key=lambda ks: (-ks[1], ks[0]))
    total = math.fsum(s for _, s in ranked)
    kept: set = set()
    acc = 0.0
    for key, score in ranked:
        if acc >= share * total:
            break
        kept.add(key)
        acc += score
    return kept, acc, total


def _check_share(share: float) -> None:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"share must be a number in (0, 1] (e.g. 0.8 keeps 80% of the influence), got {share!r}")


def _ratio(part: float, total: float) -> float | None:
    """``part / total``, or None (undefined) when the total is ~0 (:data:`MIN_INFLUENCE`)."""
    return part / total if total > MIN_INFLUENCE else None


def edge_scores(nodes: list[dict], edges: list[dict]) -> list[float]:
    """Each edge's score (nats), as circuit-tracer scores edges: ``|w| / (sum of |w| over the edges into its
    destination) * influence(destination)``, the target's influence being the total influence of all non-target
    nodes. Unlike raw weights (activation units into a feature, nats into the target) the scores are comparable.

    Args:
        nodes: node dicts (``id``, ``kind``, values); edges: edge dicts (``src``, ``dst``, values).

    Returns:
        one score >= 0 per edge, in order.
    """
    influence = {n["id"]: node_influence(n) for n in nodes if n["kind"] != "target"}
    targets = [n["id"] for n in nodes if n["kind"] == "target"]
    return _edge_scores(influence, targets, edges, [edge_weight(e) for e in edges])


def _edge_scores(influence: dict[str, float], targets: Iterable[str], edges: list[dict], weights: list[float]
                 ) -> list[float]:
    """:func:`edge_scores` from the non-target nodes' influences, the target ids and the edges' weights
    (:func:`edge_weight`), each computed once by the caller."""
    total = math.fsum(influence.values())
    influence = {**influence, **{t: total for t in targets}}
    into: dict[str, float] = {}
    for e, w in zip(edges, weights, strict=True):
        into[e["dst"]] = into.get(e["dst"], 0.0) + w
    return [w / into[e["dst"]] * influence.get(e["dst"], 0.0) if w > 0 else 0.0
            for e, w in zip(edges, weights, strict=True)]


def _connect(edges: list[dict], scores: list[float], kept_nodes: set[str], kept_edges: set[int],
             targets: set[str]) -> tuple[set[str], set[int], int]:
    """Give every kept node a kept path to the target, else drop it (the module docstring's "Paths to the target").

    Repeats until nothing changes: the nodes with a kept path to a target (``connected``) are found backwards from
    the targets; each other kept node whose strongest outgoing edge to a kept node (largest score, ties by edge
    order) ends at a connected node gets that edge; when no node can, the one node with the strongest edge into
    the connected set gets it (so a node waits while its strongest edge's end may still be connected). Then the
    nodes still without a path are dropped with every edge touching them (circuit-tracer's fixed point: a node
    without a kept outgoing edge is dropped, and so on).

    Args:
        edges: the graph's edges (``src``, ``dst``); scores: their scores (:func:`edge_scores`), in order.
        kept_nodes, kept_edges: ids and edge indices kept by the thresholds; targets: the target ids (kept).

    Returns:
        ``(kept node ids, kept edge indices, number of edges added)``.
    """
    kept_edges = {i for i in kept_edges if edges[i]["src"] in kept_nodes and edges[i]["dst"] in kept_nodes}
    out_edges: dict[str, list[int]] = {}
    for i, e in enumerate(edges):
        if e["src"] in kept_nodes and e["dst"] in kept_nodes and e["src"] != e["dst"] and scores[i] > 0:
            out_edges.setdefault(e["src"], []).append(i)
    best = {k: min(v, key=lambda i: (-scores[i], i)) for k, v in out_edges.items()}

    def reach() -> set[str]:
        into: dict[str, list[str]] = {}
        for i in kept_edges:
            into.setdefault(edges[i]["dst"], []).append(edges[i]["src"])
        seen, stack = set(targets), list(targets)
        while stack:
            for src in into.get(stack.pop(), []):
                if src not in seen:
                    seen.add(src)
                    stack.append(src)
        return seen

    n_added = 0
    while True:
        connected = reach()
        pending = sorted(kept_nodes - connected)
        add = [best[k] for k in pending if k in best and edges[best[k]]["dst"] in connected]
        if not add:
            to_connected = [
                (-scores[i], i) for k in pending for i in out_edges.get(k, []) if edges[i]["dst"] in connected
            ]
            if not to_connected:
                break
            add = [min(to_connected)[1]]
        kept_edges.update(add)
        n_added += len(add)
    kept_nodes = kept_nodes & connected
    kept_edges = {i for i in kept_edges if edges[i]["src"] in kept_nodes and edges[i]["dst"] in kept_nodes}
    return kept_nodes, kept_edges, n_added


def prune(nodes: list[dict], edges: list[dict], share: float) -> tuple[list[dict], list[dict], dict]:
    """The pruning rule on node and edge lists (per-prompt or aggregated); copies with ``in_graph`` set.

    Args:
        nodes: node dicts with ``id``, ``kind`` and values (``exact``/``atp`` or ``mean_exact``/``mean_atp``);
            the ``kind == "target"`` node is always kept and carries no influence of its own.
        edges: edge dicts with ``src``, ``dst`` (node ids) and values.
        share: share of influence to keep, in ``(0, 1]``.

    Returns:
        ``(nodes, edges, pruning)``; ``pruning`` holds ``share``, ``node_share_kept`` (kept / total influence of
        the internal nodes), ``input_share_kept`` and ``n_inputs_kept`` (the same for the embedding nodes, pruned
        apart: :data:`INPUT_KINDS`), ``edge_share_kept`` (kept / total edge score over all edges), the counts,
        ``n_edges_for_paths`` / ``n_nodes_without_path`` (what :func:`_connect` added and dropped) and
        ``non_sae_share`` (share of the kept influence, embeddings included, held by :data:`NON_SAE_KINDS` nodes);
        a share whose total is ~0 is None (undefined).

    Raises:
        ValueError: ``share`` outside ``(0, 1]``, duplicate node ids, or an edge naming an unknown node.
    """
    kept_nodes, kept_edges, pruning = kept_by_pruning(nodes, edges, share)
    out_nodes = [{**n, "in_graph": n["id"] in kept_nodes} for n in nodes]
    out_edges = [{**e, "in_graph": i in kept_edges} for i, e in enumerate(edges)]
    return out_nodes, out_edges, pruning


def kept_by_pruning(nodes: list[dict], edges: list[dict], share: float) -> tuple[set[str], set[int], dict]:
    """:func:`prune`'s decision without its copies: ``(kept node ids, kept edge indices, pruning)``, for a caller
    that builds only the kept nodes and edges. Raises as :func:`prune`."""
    _check_share(share)
    by_id: dict[str, dict] = {}
    for n in nodes:
        if n["id"] in by_id:
            raise ValueError(f"duplicate node id {n['id']!r} in the graph; node ids must be unique")
        by_id[n["id"]] = n
    for e in edges:
        for end in ("src", "dst"):
            if e[end] not in by_id:
                raise ValueError(f"edge {e['src']!r} -> {e['dst']!r}: {end} is not a node of the graph")
    targets = {k for k, n in by_id.items() if n["kind"] == "target"}
    influence = {k: node_influence(n) for k, n in by_id.items() if k not in targets}
    # internal nodes and inputs (embeddings) are each kept by the same rule, apart (module docstring)
    kept_nodes, kept_influence, total_influence = keep_by_share(
        ((k, v) for k, v in influence.items() if by_id[k]["kind"] not in INPUT_KINDS), share)
    kept_inputs, kept_input_influence, total_input = keep_by_share(
        ((k, v) for k, v in influence.items() if by_id[k]["kind"] in INPUT_KINDS), share)
    kept_nodes |= kept_inputs | targets

    all_scores = _edge_scores(influence, targets, edges, [edge_weight(e) for e in edges])
    total_edge = math.fsum(all_scores)
    scores = [  # keyed by edge index (ties in edge order)
        (i, score)
        for i, (e, score) in enumerate(zip(edges, all_scores, strict=True))
        if e["src"] in kept_nodes and e["dst"] in kept_nodes
    ]
    kept_edges, _, _ = keep_by_share(scores, share)
    n_before = len(kept_nodes)
    kept_nodes, kept_edges, n_added = _connect(edges, all_scores, kept_nodes, kept_edges, targets)
    n_without_path = n_before - len(kept_nodes)
    kept_influence = math.fsum(v for k, v in influence.items() if k in kept_nodes and k not in kept_inputs)
    kept_inputs &= kept_nodes
    kept_input_influence = math.fsum(influence[k] for k in kept_inputs)
    kept_edge_score = math.fsum(all_scores[i] for i in kept_edges)

    non_sae = math.fsum(influence[k] for k in kept_nodes - targets if by_id[k]["kind"] in NON_SAE_KINDS)
    pruning = {
        "share": float(share),
        "node_share_kept": _ratio(kept_influence, total_influence),
        "input_share_kept": _ratio(kept_input_influence, total_input),
        "n_inputs_kept": len(kept_inputs),
        "edge_share_kept": _ratio(kept_edge_score, total_edge),
        "n_nodes": len(nodes),
        "n_edges": len(edges),
        "n_nodes_kept": len(kept_nodes),
        "n_edges_kept": len(kept_edges),
        "n_edges_for_paths": n_added,
        "n_nodes_without_path": n_without_path,
        "non_sae_share": _ratio(non_sae, kept_influence + kept_input_influence),
    }
    return kept_nodes, kept_edges, pruning


def prune_graph(graph: dict, share: float = 0.8) -> dict:
    """Mark the readable part of one per-prompt circuit graph: ``in_graph`` on nodes and edges, and ``pruning``.

    The rule (circuit-tracer's pruning by influence, Ameisen et al. 2025; see the module docstring): rank the nodes
    by influence on the target (``|exact|`` in nats of log p(answer) at P where measured, else ``|atp|``), keep the
    smallest set carrying at least ``share`` of the total (the embedding nodes apart from the others, by the same
    rule); then among the edges between kept nodes (the target
    counts as kept), keep the smallest set carrying at least ``share`` of their score, where an edge's score is its
    share of the absolute weight flowing into its destination times the destination's influence (nats); finally
    a kept node without a kept path to the target gets its strongest outgoing edge toward it, and a node that has
    none is dropped (module docstring, "Paths to the target").

    Args:
        graph: a per-prompt graph of the "positions" contract: ``nodes`` (``id``, ``kind``, ``exact``, ``atp``,
            ...), ``edges`` (``src``, ``dst``, ``exact``, ``atp``, ...), other keys kept as they are.
        share: the share of influence to keep, in ``(0, 1]`` (default 0.8, as circuit-tracer's node threshold).

    Returns:
        A new dict (the input is not modified): the graph with ``in_graph`` set on every node and edge and
        ``pruning`` (:func:`prune`'s record); shares are None (undefined) when their total is ~0.

    Raises:
        ValueError: ``share`` outside ``(0, 1]``, duplicate node ids, or an edge naming an unknown node.
    """
    nodes, edges, pruning = prune(list(graph.get("nodes", [])), list(graph.get("edges", [])), share)
    return {**graph, "nodes": nodes, "edges": edges, "pruning": pruning}
