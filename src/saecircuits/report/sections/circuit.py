"""The feature circuit across layers: nodes and edges at P across the SAEs, exact vs estimated (AtP, IG), the
chosen circuit's faithfulness and completeness, and the drawing of the circuit.

Template: ``circuit.html.j2`` (its block ``circuit_drawing`` is where the drawing goes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

from saecircuits.report.sections.common import (
    Figures,
    Plot,
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


def drawing(c: Circuit, fig: Figures) -> Plot | None:
    """The circuit's nodes as a plotly graph: columns by layer/stage, node size by |effect|, edge width by |exact|,
    colour by sign; None when no node is in the circuit."""
    circ = [n for n in c.nodes if n.in_circuit]
    if not circ:
        return None
    stage_of = {}
    for n in circ:
        stage_of[n.id] = (otherwise(n.layer, -1), 0 if n.kind in ("head", "embed", "pos_embed") else 1)
    cols = sorted(set(stage_of.values()))
    pos = {}
    for ci, st in enumerate(cols):
        members = sorted([n for n in circ if stage_of[n.id] == st], key=lambda n: -abs(n.effect or 0))
        for k, n in enumerate(members):
            pos[n.id] = (ci, -k)
    target_x = len(cols)
    f = go.Figure()
    biggest = max((abs(e.exact or 0) for e in c.edges), default=0) or 1.0
    for e in c.edges:
        if e.source not in pos or e.target not in pos:
            continue
        (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
        v = e.exact or 0
        f.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                               line={"width": 1 + 7 * abs(v) / biggest,
                                     "color": "rgba(214,39,40,0.55)" if v > 0 else "rgba(31,119,180,0.55)"}))
    top_eff = max((abs(n.effect or 0) for n in circ), default=0) or 1.0
    for n in circ:  # edges into the answer: the node effects
        x0, y0 = pos[n.id]
        v = n.effect or 0
        f.add_trace(go.Scatter(x=[x0, target_x], y=[y0, 0], mode="lines", hoverinfo="skip", showlegend=False,
                               line={"width": 1 + 5 * abs(v) / top_eff, "dash": "dot",
                                     "color": "rgba(214,39,40,0.35)" if v > 0 else "rgba(31,119,180,0.35)"}))
    f.add_trace(go.Scatter(
        x=[pos[n.id][0] for n in circ] + [target_x], y=[pos[n.id][1] for n in circ] + [0],
        mode="markers+text", text=[plotly_text(n.label) for n in circ] + ["answer"], textposition="top center",
        marker={"size": [10 + 20 * abs(n.effect or 0) / top_eff for n in circ] + [24],
                "color": ["#d62728" if (n.effect or 0) > 0 else "#1f77b4" for n in circ] + ["#2ca02c"]},
        hovertext=[plotly_text(f"{n.label}: effect {num(n.effect)} nats; AtP {num(n.atp)}; "
                               f"IG {num(n.ig)}; active on {otherwise(n.n_active_prompts, '?')} prompts; "
                               f"promotes {', '.join(visible_token(t) for t in n.top_tokens or []) or 'n/a'}")
                   for n in circ] + ["answer log-prob"],
        hoverinfo="text", showlegend=False))
    f.update_layout(title="Circuit at P (red: supports the answer / excites; blue: opposes / inhibits)",
                    xaxis={"tickvals": list(range(len(cols))) + [target_x],
                           "ticktext": [("embed" if lay < 0 else f"L{lay} {'attn' if s == 0 else 'MLP'}")
                                        for lay, s in cols] + ["answer"]},
                    yaxis={"visible": False})
    return fig(f, height=max(380, 60 * max(len([1 for n in circ if stage_of[n.id] == st]) for st in cols)))


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
            "faithfulness": num(sel.faithfulness, ".3f"), "completeness": num(sel.completeness, ".3f"),
            "edge_rule": otherwise(sel.edge_rule, ""), "mean_ablation": sel.mean_ablation,
            "undefined_reason": sel.undefined_reason,
        } if given(sel) else None,
        "drawing": drawing(c, fig),
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
