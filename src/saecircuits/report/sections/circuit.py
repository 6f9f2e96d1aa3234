"""The feature circuit across layers: nodes and edges at P across the SAEs, exact vs estimated (AtP, IG), the
chosen circuit's faithfulness and completeness, and the drawing of the circuit.

Template: ``circuit.html.j2`` (its block ``circuit_drawing`` is where the drawing goes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
from markupsafe import Markup

from saecircuits.display import percent
from saecircuits.report.circuit_graph import circuit_graph_html
from saecircuits.report.sections.common import (
    Figures,
    finite,
    given,
    nulls,
    num,
    otherwise,
    plotly_text,
    table,
)
from saecircuits.report.tokens_html import visible_token
from saecircuits.results import Circuit, Results
from saecircuits.results.positions import EstimateAgreement


def stand_in(a: EstimateAgreement | Mapping | None) -> str:
    """A verdict on an estimate from its agreement with the exact values (a dict is validated first)."""
    if isinstance(a, Mapping):
        a = EstimateAgreement.model_validate(a)
    if a is None or not finite(a.spearman):
        return "undefined (too few values)"
    ok = a.spearman >= 0.9 and (a.top_overlap or 0) >= 0.8 and (a.sign_agreement or 0) >= 0.9
    top_sign = a.top_sign_agreement
    if top_sign is not None:  # results written before this key existed are judged on the other three
        ok = ok and top_sign >= 0.9
    return "yes" if ok else "no"


def feature_link(sae: int, feature: int) -> str:
    """The page's anchor of a feature's card (the feature browser opens it)."""
    return f"#card-sae-{sae}-f{feature}"


def at_p_graph(c: Circuit) -> dict[str, Any] | None:
    """The circuit at P (its ``in_circuit`` nodes and the exact edges between them) as one-position graph in the
    "positions" format :func:`~saecircuits.report.circuit_graph.circuit_graph_html` draws, the node effects as
    exact edges into the target (nats); None when no node is in the circuit."""
    circ = [n for n in c.nodes if n.in_circuit]
    if not circ:
        return None
    n_layers = max([otherwise(n.layer, -1) for n in circ] + [0]) + 1
    target = f"target:{n_layers}:0@0"
    nodes: list[dict[str, Any]] = [{"id": target, "kind": "target", "layer": n_layers, "pos": 0,
                                    "label": "answer", "in_graph": True}]
    ids: dict[int, str] = {}
    for n in circ:
        kind = n.kind or "feature"
        sae = n.sae if n.sae is not None and n.sae >= 0 else None
        index = n.index if n.index is not None and n.index >= 0 else None  # absent in results before it was written
        feature = index if kind == "feature" else None
        head = index if kind == "head" else None
        ids[n.id] = f"{kind}:{otherwise(n.layer, -1)}:{n.id}@0"
        nodes.append({"id": ids[n.id], "kind": kind, "layer": otherwise(n.layer, -1), "pos": 0, "label": n.label,
                      "sae": sae, "feature": feature, "head": head, "exact": n.effect, "atp": n.atp, "ig": n.ig,
                      "in_graph": True})
    edges = [{"src": ids[e.source], "dst": ids[e.target], "exact": e.exact, "atp": e.atp, "in_graph": True}
             for e in c.edges if e.source in ids and e.target in ids and finite(e.exact) and e.exact != 0]
    edges += [{"src": ids[n.id], "dst": target, "exact": n.effect, "atp": n.atp, "in_graph": True}
              for n in circ if finite(n.effect)]
    return {"tokens": ["P"], "P": 0, "anchors": {}, "nodes": nodes, "edges": edges}


def _graph_html(graph: Mapping[str, Any] | None, kind: str) -> Markup | None:
    # circuit_graph_html escapes every string it puts in the fragment (its module docstring), so it is trusted
    return None if graph is None else Markup(circuit_graph_html(graph, kind=kind, feature_link=feature_link))


def _dump(model) -> dict[str, Any] | None:
    return None if model is None else model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def positions(c: Circuit, n_examples: int = 3) -> dict[str, Any] | None:
    """The circuit across positions (issue 16): the summary sentence, the aggregated graph (anchors as columns),
    a few per-prompt graphs, faithfulness/completeness and the estimates' agreement by distance from P; None when
    the results have no "positions" block."""
    p = getattr(c, "positions", None)
    if p is None:
        return None
    out: dict[str, Any] = {
        "summary": p.summary, "target": p.target, "share": p.share, "n_prompts": p.n_prompts,
        "n_exact": p.n_exact_interventions,
        "faithfulness": _mean_interval(p.faithfulness), "completeness": _mean_interval(p.completeness),
        "aggregated": _graph_html(_dump(p.aggregated), "aggregated") if given(p.aggregated) else None,
        "examples": [], "n_examples_all": len(p.examples or []), "by_distance": None,
        "exact_note": getattr(p, "values", None), "example_nodes": getattr(p, "example_nodes", None),
        "views": getattr(p, "views", None),
        "agg_faithfulness": None, "agg_completeness": None,
    }
    agg = p.aggregated if given(p.aggregated) else None
    if agg is not None and getattr(agg, "faithfulness", None) is not None:
        out["agg_faithfulness"] = _mean_interval(agg.faithfulness)
        out["agg_completeness"] = _mean_interval(agg.completeness) if agg.completeness is not None else None
    for ex in (p.examples or [])[:n_examples]:
        d = _dump(ex)
        pr = ex.pruning
        out["examples"].append({
            "prompt_index": ex.prompt_index,
            "prompt": "".join(visible_token(t) for t in (ex.tokens or [])[: (ex.P or 0) + 1]),
            "kept": (f"{pr.n_nodes_kept} of {pr.n_nodes} nodes, {pr.n_edges_kept} of {pr.n_edges} edges"
                     + (f" ({cap.n_left_out} weaker edges between nodes left out before pruning by the cap of "
                        f"{cap.max_edges})" if (cap := getattr(ex, "edge_cap", None)) is not None
                        and cap.n_left_out else "")
                     if pr is not None and pr.n_nodes is not None else None),
            "non_sae": percent(pr.non_sae_share) if pr is not None and finite(pr.non_sae_share) else None,
            "html": _graph_html(d, "example"),
        })
    ag = p.agreement
    if ag is not None and ag.by_distance:
        out["by_distance"] = table(["distance from P (tokens) or anchor", "n", "Spearman", "sign agreement",
                                    "top-k overlap"],
                                   [(b.distance, b.n, num(b.spearman, ".3f"), num(b.sign, ".3f"), num(b.top_k, ".2f"))
                                    for b in ag.by_distance], left_cols=(0,))
    return out


def _non_sae_share(circ) -> str | None:
    """The share of the circuit's |exact effect| held by nodes that are not SAE features (heads, MLPs without an SAE,
    embeddings, SAE errors), as a percentage, when it is the majority; None otherwise or when undefined."""
    total = sum(abs(n.effect) for n in circ if finite(n.effect))
    if total <= 1e-9:
        return None
    other = sum(abs(n.effect) for n in circ if finite(n.effect) and (n.kind or "feature") != "feature")
    return percent(other / total) if other / total > 0.5 else None


def _mean_interval(m) -> str | None:
    if m is None or not finite(m.mean):
        return None
    return _with_interval(m.mean, m.ci95)


def _with_interval(value, ci) -> str:
    """``0.802 [0.763, 0.838]``; the value alone without a finite interval (results.json files from before it)."""
    text = num(value, ".3f")
    if ci is not None and len(ci) == 2 and all(finite(x) for x in ci) and finite(value):
        text += f" [{num(ci[0], '.3f')}, {num(ci[1], '.3f')}]"
    return text


def circuit(r: Results, fig: Figures) -> dict[str, Any]:
    """Nodes and edges at P across the SAEs, exact vs estimated, and the chosen circuit's faithfulness."""
    c = r.circuit
    sel = c.selection
    circ = [n for n in c.nodes if n.in_circuit]
    out: dict[str, Any] = {
        "n_nodes": otherwise(c.n_nodes_total, len({n.id for n in c.nodes})),
        "n_edges": otherwise(c.n_edges_total, "?"),
        "file": otherwise(c.file, "circuit.json"),
        "selection": {
            "n_nodes": otherwise(sel.n_nodes, len(circ)), "rule": otherwise(sel.rule, ""),
            "faithfulness": _with_interval(sel.faithfulness, getattr(sel, "faithfulness_ci95", None)),
            "completeness": _with_interval(sel.completeness, getattr(sel, "completeness_ci95", None)),
            "edge_rule": otherwise(sel.edge_rule, ""), "mean_ablation": sel.mean_ablation,
            "undefined_reason": sel.undefined_reason,
        } if given(sel) else None,
        "drawing": _graph_html(at_p_graph(c), "example"),
        "positions": positions(c),
        "non_sae": _non_sae_share(circ),
        "nodes": table(["node", "effect (nats)", "±95%", "AtP", "IG", "in circuit", "promotes"],
                       [(n.label, num(n.effect), num(n.effect_ci95), num(n.atp), num(n.ig),
                         "yes" if n.in_circuit else "", ", ".join(visible_token(t) for t in n.top_tokens or []))
                        for n in c.nodes[:25]], left_cols=(0, 6)),
        "agreement": None, "scatter": None, "curve": None, "virtual_weights": None,
    }
    ag = c.agreement
    arows = []
    for what in ("nodes", "edges"):
        for method in ("atp", "ig"):
            by = getattr(ag, what) if ag is not None else None
            a = getattr(by, method) if by is not None else None
            if given(a):
                arows.append((what, method.upper(), a.n, num(a.spearman, ".3f"),
                              num(a.sign_agreement, ".3f"), num(a.top_overlap, ".2f"),
                              num(a.top_sign_agreement, ".2f"), stand_in(a)))
    if arows:
        out["agreement"] = table(["", "estimate", "n", "Spearman", "sign agreement", "top-20 overlap",
                                  "top-20 sign agreement", "can stand in"], arows, left_cols=(0, 1, 7))
    pts = [n for n in c.nodes if finite(n.effect)]
    if pts:
        f = go.Figure()
        for method, colour in (("atp", "#ff7f0e"), ("ig", "#9467bd")):
            xs = [n.effect for n in pts if finite(getattr(n, method))]
            ys = [getattr(n, method) for n in pts if finite(getattr(n, method))]
            if xs:
                f.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=method.upper(), marker={"color": colour},
                                       text=[plotly_text(n.label) for n in pts if finite(getattr(n, method))]))
        lim = max(abs(n.effect) for n in pts) or 1.0
        f.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="estimate = exact",
                               line={"dash": "dash", "color": "#888"}))
        f.update_layout(title="Node effects: gradient estimates vs exact ablation", xaxis_title="exact (nats)",
                        yaxis_title="estimate (nats)")
        out["scatter"] = fig(f, height=420)
    curve = c.faithfulness or []
    if curve:
        f = go.Figure()
        for key, name in (("faithfulness", "faithfulness (circuit alone)"),
                          ("completeness", "completeness (circuit ablated)")):
            f.add_trace(go.Scatter(x=[p.n_nodes for p in curve], y=nulls([getattr(p, key) for p in curve]),
                                   mode="lines+markers", name=name))
        f.update_layout(title="Faithfulness and completeness vs circuit size (nodes by |exact effect|)",
                        xaxis_title="nodes in the circuit", xaxis_type="log", yaxis_title="fraction of the effect")
        out["curve"] = fig(f, height=380)
    vw = c.virtual_weights or []
    if vw:
        out["virtual_weights"] = table(
            ["source", "target", "exact edge", "prompts", "virtual (raw)", "virtual (cosine)"],
            [(v.source, v.target, num(v.exact), v.n_prompts, num(v.virtual_raw),
              num(v.virtual_cosine, ".3f")) for v in vw[:15]], left_cols=(0, 1))
    return out
