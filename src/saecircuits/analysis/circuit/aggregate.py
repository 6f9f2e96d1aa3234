"""The circuit across prompts: per-prompt position graphs aligned by the task's anchors and averaged, and the
sentence that says which positions carry the evidence.

Prompts differ in length, so a node is identified across prompts by what it is (``kind:layer:index``) and by its
column: the name of the task anchor at its position (``Task.anchors``: e.g. ``open_quote``, ``said``,
``last_word``, ``P``), or else its distance from the prediction position P (``"P-3"``). Values are means over ALL
prompts, a node or edge absent from a prompt counting 0 there (the prompt's graph holds no effect for it), with a
t-based 95% interval (:func:`saecircuits.analysis.statistics.mean_ci95`). The aggregated graph is then pruned by
the same rule as each prompt's (:mod:`.prune`, circuit-tracer's pruning by influence, Ameisen et al. 2025), on the
mean values.

Pure functions on the dicts of the "positions" contract (analysis/circuit/positions.py): no torch, no model.
"""

from __future__ import annotations

import math
import re

import numpy as np

from saecircuits.analysis.circuit.prune import (
    INPUT_KINDS,
    MIN_INFLUENCE,
    NON_SAE_KINDS,
    edge_weight,
    inputs_phrase,
    node_influence,
    prune,
)
from saecircuits.analysis.statistics import mean_ci95
from saecircuits.display import percent as _pct

__all__ = ["aggregate_graphs", "positions_summary", "column_of", "column_phrase"]

_OFFSET = re.compile(r"P-(\d+)")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def column_of(pos: int, p: int, anchors: dict[str, int]) -> str:
    """The aggregated graph's column of token position ``pos`` in a prompt whose prediction position is ``p``.

    Returns:
        the anchor's name when ``pos`` is a named anchor of this prompt (the first name given, ``"P"`` at P),
        else ``"P-d"`` with ``d = p - pos`` (``"P"`` for ``d = 0``).

    Raises:
        ValueError: ``pos`` after P (the circuit reads nothing after the prediction position).
    """
    if pos > p:
        raise ValueError(f"position {pos} is after the prediction position P = {p}; graphs end at P")
    if pos == p:
        return "P"
    for name, q in anchors.items():
        if q == pos:
            return name
    return f"P-{p - pos}"


def _typical_distance(column: str, anchor_distances: dict[str, list[int]]) -> float:
    """A column's typical distance from P (tokens): ``d`` for ``"P-d"``, 0 for ``"P"``, and for an anchor its median
    distance over EVERY prompt that names it (taken from the prompts' ``anchors``, not from the prompts holding a
    node there: which prompts hold nodes differs by column, and a mean over different prompts put the opening quote
    before `said` on stories260K although `said` is 2 tokens earlier in every prompt; issue 16)."""
    if column == "P":
        return 0.0
    m = _OFFSET.fullmatch(column)
    if m:
        return float(m.group(1))
    return float(np.median(anchor_distances[column])) if column in anchor_distances else 0.0


def _identity(node_id: str) -> str:
    """``kind:layer:index`` of a per-prompt node id ``kind:layer:index@pos``."""
    head, sep, _ = node_id.rpartition("@")
    if not sep:
        raise ValueError(f"node id {node_id!r} has no '@position'; ids are 'kind:layer:index@pos'")
    return head


def _mean_or_none(values: dict[int, float | None], n: int) -> tuple[float | None, np.ndarray | None]:
    """Mean over all ``n`` prompts (absent = 0) and the per-prompt vector, from ``{prompt: value}`` of the prompts
    holding the item; None when a present value is missing or a value is not finite."""
    if any(v is None for v in values.values()):
        return None, None
    vec = np.zeros(n)
    if values:
        vec[list(values)] = [float(v) for v in values.values()]
    if not np.isfinite(vec).all():
        return None, None
    return float(np.mean(vec)), vec


def _mean_estimate(values: dict[int, float | None], n: int) -> float:
    """Mean of an estimate over all ``n`` prompts from ``{prompt: value}``; absent (or not estimated, or
    non-finite) counts 0."""
    vec = np.zeros(n)
    if values:
        vec[list(values)] = [float(v) if v is not None and math.isfinite(v) else 0.0 for v in values.values()]
    return float(np.mean(vec))


def _spread(values: dict[int, float], n: int) -> np.ndarray:
    """``{prompt: value}`` as float64 ``[n]``, 0 elsewhere."""
    vec = np.zeros(n)
    vec[list(values)] = list(values.values())
    return vec


def aggregate_graphs(graphs: list[dict], *, min_prompts: int = 1, share: float | None = None) -> dict:
    """Average per-prompt position graphs into the aggregated graph, positions aligned by anchors.

    Args:
        graphs: per-prompt graphs of the "positions" contract (``P``, ``anchors``, ``nodes`` with ``id``
            ``kind:layer:index@pos``, ``pos``, ``exact``/``atp``; ``edges`` with ``exact``/``atp``/``heads``),
            usually after :func:`~saecircuits.analysis.circuit.prune.prune_graph`.
        min_prompts: leave out nodes present in fewer prompts than this (and their edges).
        share: the pruning share for the aggregated graph's ``in_graph``; default the first graph's
            ``pruning["share"]``, else 0.8.

    Returns:
        ``{"columns": [...], "nodes": [...], "edges": [...], "pruning": {...}, "n_prompts": int}``:

        - ``columns``: left to right by typical distance from P (:func:`_typical_distance`: an anchor's median
          distance over every prompt naming it, ``d`` for ``"P-d"``; a tie puts the anchor first), ``"P"`` last;
        - nodes ``{"id": "kind:layer:index@column", "kind", "layer", "column", "label", "sae", "feature", "head",
          "mean_exact", "ci95", "mean_atp", "n_prompts", "in_graph"}``: means in nats over ALL prompts (absent = 0);
          ``mean_exact`` (and its ``ci95``, t-based) is None when a prompt holding the node has no exact value for
          it, ``ci95`` also with one prompt; ``mean_atp`` counts a missing estimate 0; ``n_prompts`` counts the
          prompts holding the node;
        - edges ``{"src", "dst", "mean_exact", "mean_atp", "heads": [{"head", "mean"}] | None, "in_graph"}``
          (means over all prompts, absent = 0; head loadings likewise, largest first);
        - ``pruning``: as :func:`~saecircuits.analysis.circuit.prune.prune_graph`'s, on the mean values.

    Raises:
        ValueError: no graphs, ``min_prompts < 1``, a node after its prompt's P, or an edge naming a node that the
            prompt's graph does not hold.
    """
    if not graphs:
        raise ValueError("aggregate_graphs needs at least one per-prompt graph")
    if min_prompts < 1:
        raise ValueError(f"min_prompts must be >= 1, got {min_prompts}")
    n = len(graphs)
    if share is None:
        share = float((graphs[0].get("pruning") or {}).get("share", 0.8))

    # aggregated id -> {"meta": node, "column", "exact": {prompt: value}, "atp": {prompt: value}} (the prompts
    # holding it: a node is in a few of the prompts, so no per-prompt lists)
    node_vals: dict[str, dict] = {}
    edge_vals: dict[tuple[str, str], dict] = {}
    anchor_distances: dict[str, list[int]] = {}  # anchor -> its distance from P in every prompt that names it
    for g_index, graph in enumerate(graphs):
        p = int(graph["P"])
        anchors = {k: int(v) for k, v in (graph.get("anchors") or {}).items()}
        for name, q in anchors.items():
            if q <= p:
                anchor_distances.setdefault(name, []).append(p - q)
        local: dict[str, str] = {}
        keys: set[str] = set()  # local's values (a set: a membership test per node)
        for node in graph["nodes"]:
            column = column_of(int(node["pos"]), p, anchors)
            key = f"{_identity(node['id'])}@{column}"
            if key in keys:
                raise ValueError(f"prompt {g_index}: two nodes map to {key!r}; node ids must be unique per position")
            local[node["id"]] = key
            keys.add(key)
            slot = node_vals.get(key)
            if slot is None:
                slot = node_vals[key] = {"meta": node, "column": column, "exact": {}, "atp": {}}
            slot["exact"][g_index] = node.get("exact")
            slot["atp"][g_index] = node.get("atp")
        for edge in graph.get("edges", []):
            try:
                key = (local[edge["src"]], local[edge["dst"]])
            except KeyError as err:
                raise ValueError(f"prompt {g_index}: edge names node {err.args[0]!r}, which the graph does not hold") from None
            slot = edge_vals.get(key)
            if slot is None:
                slot = edge_vals[key] = {"exact": {}, "atp": {}, "heads": {}}
            slot["exact"][g_index] = edge.get("exact")
            slot["atp"][g_index] = edge.get("atp")
            for h in edge.get("heads") or []:
                hv = slot["heads"].get(h["head"])
                if hv is None:
                    hv = slot["heads"][h["head"]] = {}
                hv[g_index] = float(h["value"])

    nodes = []
    for key, slot in node_vals.items():
        count = len(slot["exact"])
        if count < min_prompts:
            continue
        meta = slot["meta"]
        mean_exact, vec = _mean_or_none(slot["exact"], n)
        ci = None
        if vec is not None:
            m = mean_ci95(vec)
            ci = [m.low, m.high] if math.isfinite(m.low) and math.isfinite(m.high) else None
        nodes.append({
            "id": key, "kind": meta["kind"], "layer": int(meta["layer"]), "column": slot["column"],
            "label": meta.get("label", key), "sae": meta.get("sae"), "feature": meta.get("feature"),
            "head": meta.get("head"), "mean_exact": mean_exact, "ci95": ci,
            # the target has no value of its own (every other value is measured on it): no AtP mean either
            "mean_atp": None if meta["kind"] == "target" else _mean_estimate(slot["atp"], n), "n_prompts": count,
        })
    kept_ids = {nd["id"] for nd in nodes}
    edges = []
    for (src, dst), slot in edge_vals.items():
        if src not in kept_ids or dst not in kept_ids:
            continue
        mean_exact, _ = _mean_or_none(slot["exact"], n)
        mean_atp = _mean_estimate(slot["atp"], n) if any(v is not None for v in slot["atp"].values()) else None
        heads = sorted(
            ({"head": h, "mean": float(np.mean(_spread(v, n)))} for h, v in slot["heads"].items()),
            key=lambda h: -abs(h["mean"])
        ) or None
        edges.append({"src": src, "dst": dst, "mean_exact": mean_exact, "mean_atp": mean_atp, "heads": heads})

    used = {nd["column"] for nd in nodes}
    columns = sorted(used, key=lambda c: (c == "P", -_typical_distance(c, anchor_distances),
                                          bool(_OFFSET.fullmatch(c)), c))
    nodes.sort(key=lambda nd: (columns.index(nd["column"]), nd["layer"], nd["id"]))
    nodes, edges, pruning = prune(nodes, edges, share)
    return {"columns": columns, "nodes": nodes, "edges": edges, "pruning": pruning, "n_prompts": n}


_ANCHOR_PHRASES = {
    "open_quote": "the opening quote",
    "said": "`said`",
    "last_word": "the last word before P",
    "P": "P itself",
}


def column_phrase(column: str) -> str:
    """A column's name in words: ``"open_quote"`` -> ``"the opening quote"``, ``"P-3"`` -> ``"3 tokens before P"``,
    other anchors as ``"the anchor 'subject'"``."""
    if column in _ANCHOR_PHRASES:
        return _ANCHOR_PHRASES[column]
    m = _OFFSET.fullmatch(column)
    if m:
        d = int(m.group(1))
        return f"{d} token{'s' if d != 1 else ''} before P"
    return f"the anchor {column!r}"


def positions_summary(aggregated: dict, *, top: int = 3) -> str:
    """Say in words which positions carry the evidence in the aggregated graph.

    E.g. "Most of the evidence (62%) comes from the opening quote, through L1H3; 25% from P itself; 8% from the last
    word before P. The kept graph holds 14 of 230 nodes, carrying 81% of the influence (pruned at 80%)." After the
    exact verification (``aggregated["candidates"]``) the count and share are of the nodes measured exactly.

    A column's share is the summed influence (``|mean_exact|``, else ``|mean_atp|``, nats of log p(answer) at P) of
    its kept (``in_graph``) nodes over that of all kept nodes. "through X" names the attention head with the largest
    summed loading, signed toward each edge's effect (the exact value's sign, else the AtP's), on the kept edges
    leaving that column for a later one (the head that moves the evidence to P), and says that this routing is an
    estimate (head loadings split the AtP value of an edge, not the exact one); only edges whose AtP value has the
    exact value's sign count, and when edges of the opposite sign carry at least as much of the column's loaded edge
    weight (``|exact|``) the routing is said to be not determined, with no head named (issue 16: the demo's "through
    L1H3" came from such an edge, and a new user's from a small agreeing edge beside a large opposite one). Without
    head loadings, the head node receiving the largest summed kept edge weight from the column is named. When
    non-SAE nodes (heads, MLPs, embeddings, SAE errors) hold most of the kept influence, the summary says so, with
    the embeddings' part (they are pruned apart from the other nodes, as the graph's inputs: :mod:`.prune`). The
    aggregated graph's faithfulness follows when ``aggregated`` has it (with a clause when it is below 0.5: shares
    of influence rank positions, they do not say the kept graph reproduces the behaviour). A share whose denominator
    is ~0 (:data:`~saecircuits.analysis.circuit.prune.MIN_INFLUENCE`) is said to be undefined, never printed.

    Args:
        aggregated: the output of :func:`aggregate_graphs`.
        top: at most this many columns are named.

    Returns:
        one or a few sentences, plain text.
    """
    kept = [nd for nd in aggregated.get("nodes", []) if nd.get("in_graph") and nd["kind"] != "target"]
    influence = {nd["id"]: node_influence(nd) for nd in kept}
    total = math.fsum(influence.values())
    if not kept or total <= MIN_INFLUENCE:
        return (
            "The kept circuit carries no measurable influence on the answer (total about 0 nats), so the share of "
            "each position is undefined."
        )
    per_column: dict[str, float] = {}
    for nd in kept:
        per_column[nd["column"]] = per_column.get(nd["column"], 0.0) + influence[nd["id"]]
    order = list(aggregated.get("columns", []))
    ranked = sorted(per_column.items(), key=lambda cv: (-cv[1], order.index(cv[0]) if cv[0] in order else 0))

    by_id = {nd["id"]: nd for nd in aggregated.get("nodes", [])}

    def through(column: str) -> str:
        # the head loadings split an edge's AtP value: they say which head carries an edge only where its AtP value
        # has the exact value's sign; a head is named when such edges carry more of the column's loaded edges'
        # weight (|exact|) than edges of the opposite sign, from those edges' loadings alone
        loads: dict[str, float] = {}  # head loadings of the agreeing edges leaving the column, toward each edge's sign
        into_heads: dict[str, float] = {}  # else: kept edges from the column into a head node elsewhere
        agree = opposite = 0.0  # weight of the loaded edges whose AtP sign agrees with / opposes the exact value
        for e in aggregated.get("edges", []):
            src, dst = by_id.get(e["src"]), by_id.get(e["dst"])
            if not e.get("in_graph") or src is None or dst is None or src["column"] != column:
                continue
            if dst["column"] == column:
                continue
            exact, atp = e.get("mean_exact"), e.get("mean_atp")
            if e.get("heads") and exact and atp and (exact > 0) != (atp > 0):
                opposite += edge_weight(e)
            elif e.get("heads"):
                agree += edge_weight(e)
                sign = 1.0 if (exact if exact is not None else atp or 0.0) >= 0 else -1.0
                for h in e["heads"]:
                    loads[h["head"]] = loads.get(h["head"], 0.0) + sign * h["mean"]
            if dst["kind"] == "head":
                label = str(dst.get("label") or dst["id"])
                into_heads[label] = into_heads.get(label, 0.0) + edge_weight(e)
        loads = {h: v for h, v in loads.items() if v > 0}
        if opposite and opposite >= agree:
            return (f" (the head routing is not determined: the AtP estimates of {_pct(opposite / (opposite + agree))}"
                    " of its edges' exact weight have the opposite sign to the exact values)")
        if loads:
            return f", through {max(sorted(loads), key=lambda h: loads[h])} (the routing is an AtP estimate)"
        if into_heads:
            return f", through {max(sorted(into_heads), key=lambda h: into_heads[h])}"
        return ""

    # a position whose share rounds to 0% is not named as a contribution ("0% from 10 tokens before P", a new
    # user's report): it joins "the rest"; the first is never left out (its share is at least 1 / columns)
    named = [cv for i, cv in enumerate(ranked[:top]) if i == 0 or not _pct(cv[1] / total).startswith("<")]
    parts = []
    for i, (column, value) in enumerate(named):
        share = value / total
        where = column_phrase(column)
        if i == 0:
            lead = "Most of the evidence" if share > 0.5 else "The largest share of the evidence"
            parts.append(f"{lead} ({_pct(share)}) comes from {where}{'' if column == 'P' else through(column)}")
        else:
            parts.append(f"{_pct(share)} from {where}{'' if column == 'P' else through(column)}")
    text = "; ".join(parts) + "."
    rest = len(ranked) - len(named)
    if rest:
        text = text[:-1] + f"; the rest from {rest} other position{'s' if rest != 1 else ''}."

    non_sae = math.fsum(influence[nd["id"]] for nd in kept if nd["kind"] in NON_SAE_KINDS) / total
    inputs = math.fsum(influence[nd["id"]] for nd in kept if nd["kind"] in INPUT_KINDS) / total
    if non_sae > 0.5:
        text += (
            f" Most of the kept circuit's influence ({_pct(non_sae)}) sits in non-SAE nodes "
            f"({inputs_phrase(nd['kind'] for nd in aggregated.get('nodes', []))} {_pct(inputs)}; attention heads, "
            f"MLPs and SAE errors {_pct(non_sae - inputs)}), so the SAE "
            "features explain less than half of it."
        )
    else:
        text += f" SAE features hold {_pct(1 - non_sae)} of the kept circuit's influence."

    pruning = aggregated.get("pruning") or {}
    nodes = [nd for nd in aggregated.get("nodes", []) if nd["kind"] != "target"]
    n_kept = sum(1 for nd in nodes if nd.get("in_graph"))
    kept_share = pruning.get("node_share_kept")
    pruned_at = f" (pruned at {_pct(pruning['share'])})" if pruning.get("share") is not None else ""
    measured = (aggregated.get("candidates") or {}).get("n")
    if measured is not None:  # pruned on the exact means of the measured nodes: the share is of theirs alone
        carried = f", carrying {_pct(kept_share)} of their exact influence" if kept_share is not None else ""
        text += (f" The kept graph holds {n_kept} of the {measured} nodes measured exactly on every prompt "
                 f"({len(nodes)} nodes in all){carried}{pruned_at}.")
    else:
        carried = f", carrying {_pct(kept_share)} of the influence" if kept_share is not None else ""
        text += f" The kept graph holds {n_kept} of {len(nodes)} nodes{carried}{pruned_at}."
    # the influence shares rank positions; whether the kept graph reproduces the behaviour is its faithfulness
    faith = aggregated.get("faithfulness") or {}
    if faith.get("mean") is not None:
        ci = faith.get("ci95")
        interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else ""
        text += (f" Its faithfulness (every other node mean-ablated at every position of every prompt) is "
                 f"{faith['mean']:.2f}{interval}")
        text += ": the kept graph alone does not reproduce the behaviour." if faith["mean"] < 0.5 else "."
    elif faith.get("undefined_reason"):
        text += f" Its faithfulness is undefined: {faith['undefined_reason']}."
    return text
