"""The circuit across positions drawn as an attribution graph: tokens (or aligned columns) along x, layers up y.

Modelled on circuit-tracer's attribution-graph frontend (Ameisen et al. 2025, "Circuit Tracing: Revealing
Computational Graphs in Language Models", transformer-circuits.pub; the graph view of the circuit-tracer library):
one column per token position, embeddings at the bottom, the target (log p(answer) at P) at the top, nodes of one
layer and position spread side by side, edges as curves whose width follows |value| and colour its sign; hovering a
node shows its values and lights its edges, clicking a feature opens its card.

Reads the graph dicts of the "positions" contract (analysis/circuit/positions.py) only: no torch, no model. Draws
the kept part (``in_graph``) of the graph: the nodes with ``in_graph`` (or all when the graph has no pruning flags)
and the ``in_graph`` edges between drawn nodes. The fragment is self-contained and offline: inline SVG, a scoped
style sheet and a few lines of script, no external file; every string from the data is escaped.

Layout (so that every edge can be followed): a column per drawn position (example graphs: the prompt's positions
holding a kept node, in order, with a ``...`` gap where positions are skipped; aggregated graphs: the graph's
``columns``); per layer two bands (attention heads below, MLPs / SAE features / SAE errors above), embeddings below
layer 0 and the target above the last layer; in a (band, column) cell the nodes sit on a grid of slots, so no two
nodes share a point. Edges leave the top of their source and enter the bottom of their destination with vertical
tangents: an edge to the next band is one Bézier curve turning in the gap between the bands; a longer one curves into
a gutter between columns (left of its destination's column, or right of its own column when it stays in it), climbs
it on its own lane and curves out in the gap below its destination, so no edge runs through a node. Edges into the
target are in nats, edges into other nodes in activation units: their widths are scaled separately (the legend says
so).
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Literal

from saecircuits.report.tokens_html import visible_token

__all__ = ["circuit_graph_html", "POSITIVE", "NEGATIVE"]

POSITIVE = "#2166ac"
"""Edge colour of a positive value (blue): the source raises the destination (supports the answer at the target)."""
NEGATIVE = "#b2182b"
"""Edge colour of a negative value (red)."""

_KIND_FILL = {
    "feature": "#f4a261", "error": "#bdbdbd", "head": "#8ecae6", "mlp": "#b5e48c",
    "embed": "#e0e0e0", "pos_embed": "#e0e0e0", "target": "#333333",
}
_KIND_NAME = {
    "feature": "SAE feature (click: its card)", "error": "SAE error", "head": "attention head", "mlp": "MLP",
    "embed": "token embedding", "pos_embed": "token / position embedding", "target": "target: log p(answer) at P",
}
"""Legend names; one entry for both embeddings (one shape), named "pos_embed" where the graph has a position
embedding node ("embed" alone on a rotary model: Llama, Gemma, Qwen)."""
_SLOT_W = 62  # px between node centres in a cell
_SLOT_H = 36
_LANE = 3.0  # px between parallel edge lanes in a gutter
_GAP_LANE = 1.5  # px between the turning heights of edges in one gap between bands
_MAX_LANES = 16
_PER_ROW = 4  # slots per row in a cell before wrapping
_GAP_W = 30  # the "..." column between non-adjacent positions
_LEFT = 96  # room for the band labels
_TOP = 20
_BOTTOM = 44  # room for the token labels
_R = 9  # node radius
_MAX_W = 5.0  # widest edge, px
_MIN_W = 0.8


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v: Any, unit: str = "") -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return f"{v:+.4g}{unit}"


def _value(item: Mapping, aggregated: bool) -> tuple[float, bool]:
    """(value, exact?) of a node or edge: the exact value where measured, else the AtP estimate, else 0."""
    exact, est = (item.get("mean_exact"), item.get("mean_atp")) if aggregated else (item.get("exact"), item.get("atp"))
    if isinstance(exact, (int, float)) and math.isfinite(exact):
        return float(exact), True
    if isinstance(est, (int, float)) and math.isfinite(est):
        return float(est), False
    return 0.0, False


def _band(node: Mapping, n_layers: int) -> int:
    """Vertical band of a node, 0 at the bottom: embeddings 0, layer l attention 1 + 2l, layer l MLP/SAE 2 + 2l,
    target 2 n_layers + 1."""
    kind, layer = node["kind"], int(node["layer"])
    if kind == "target":
        return 2 * n_layers + 1
    if kind in ("embed", "pos_embed") or layer < 0:
        return 0
    return 1 + 2 * layer + (0 if kind == "head" else 1)


def _band_label(band: int, n_layers: int) -> str:
    if band == 0:
        return "embeddings"
    if band == 2 * n_layers + 1:
        return "target"
    layer, sub = divmod(band - 1, 2)
    return f"L{layer} {'attention' if sub == 0 else 'MLP / SAE'}"


def _columns(graph: Mapping, nodes: list[Mapping], aggregated: bool) -> tuple[list[dict], dict[Any, int]]:
    """The drawn columns ``[{"key", "label", "sub", "gap"}]`` and the index of each node column key."""
    cols: list[dict] = []
    if aggregated:
        present = {n["column"] for n in nodes}
        order = [c for c in graph.get("columns") or [] if c in present]
        for c in order + sorted(present - set(order)):
            cols.append({"key": c, "label": str(c), "sub": "", "gap": False})
    else:
        tokens = list(graph.get("tokens") or [])
        anchors = {int(v): k for k, v in (graph.get("anchors") or {}).items()}
        positions = sorted({int(n["pos"]) for n in nodes})
        prev = None
        for pos in positions:
            if prev is not None and pos > prev + 1:
                skipped = pos - prev - 1
                cols.append({"key": None, "label": "…", "sub": f"+{skipped}", "gap": True})
            tok = visible_token(tokens[pos]) if 0 <= pos < len(tokens) else "?"
            sub = f"{pos}" + (f" {anchors[pos]}" if pos in anchors else "")
            cols.append({"key": pos, "label": tok, "sub": sub, "gap": False})
            prev = pos
    index = {c["key"]: i for i, c in enumerate(cols) if not c["gap"]}
    return cols, index


def _node_title(n: Mapping, aggregated: bool, where: str) -> str:
    lines = [f"{n.get('label') or n['id']} ({n['kind']}, layer {n['layer']}) at {where}"]
    if aggregated:
        ci = n.get("ci95")
        ci_text = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
        lines.append(f"mean exact effect: {_fmt(n.get('mean_exact'), ' nats')}{ci_text}")
        lines.append(f"mean AtP estimate: {_fmt(n.get('mean_atp'), ' nats')}")
        lines.append(f"present in {n.get('n_prompts', '?')} prompt(s)")
    else:
        lines.append(f"exact effect: {_fmt(n.get('exact'), ' nats')}")
        lines.append(f"AtP estimate: {_fmt(n.get('atp'), ' nats')}; IG estimate: {_fmt(n.get('ig'), ' nats')}")
        if n.get("activation") is not None:
            lines.append(f"activation: {_fmt(n.get('activation'))}")
    return "\n".join(lines)


def _edge_title(e: Mapping, nodes: Mapping[str, Mapping], aggregated: bool) -> str:
    src, dst = nodes[e["src"]], nodes[e["dst"]]
    unit = " nats" if dst["kind"] == "target" else " (activation)"
    pre = "mean " if aggregated else ""
    exact, atp = (e.get("mean_exact"), e.get("mean_atp")) if aggregated else (e.get("exact"), e.get("atp"))
    lines = [
        f"{src.get('label') or src['id']} -> {dst.get('label') or dst['id']}",
        f"{pre}exact: {_fmt(exact, unit)}" + ("" if exact is not None else " (not measured: estimate only)"),
        f"{pre}AtP estimate: {_fmt(atp, unit)}",
    ]
    heads = e.get("heads") or []
    if heads:
        key = "mean" if aggregated else "value"
        lines.append("head loadings (parts of the AtP estimate): "
                     + ", ".join(f"{h['head']} {_fmt(h.get(key))}" for h in heads[:8])
                     + (f", ... ({len(heads)} heads)" if len(heads) > 8 else ""))
        if exact and atp and (exact > 0) != (atp > 0):  # issue 16: the loadings then say nothing of the routing
            lines.append("the AtP estimate has the opposite sign to the exact value: the routing is not determined")
    return "\n".join(lines)


def _shape(kind: str, x: float, y: float, fill: str, stroke: str) -> str:
    """The node's SVG shape centred at (x, y): circle (feature), square (MLP), triangle (head), diamond (error),
    rounded box (embedding), wide box (target)."""
    r = _R
    common = f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"'
    if kind == "head":
        pts = f"{x:.1f},{y - r:.1f} {x + r:.1f},{y + r * 0.8:.1f} {x - r:.1f},{y + r * 0.8:.1f}"
        return f'<polygon points="{pts}" {common}/>'
    if kind == "mlp":
        return f'<rect x="{x - r * 0.85:.1f}" y="{y - r * 0.85:.1f}" width="{r * 1.7:.1f}" height="{r * 1.7:.1f}" {common}/>'
    if kind == "error":
        pts = f"{x:.1f},{y - r:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r:.1f} {x - r:.1f},{y:.1f}"
        return f'<polygon points="{pts}" {common}/>'
    if kind in ("embed", "pos_embed"):
        return f'<rect x="{x - r * 1.2:.1f}" y="{y - r * 0.7:.1f}" width="{r * 2.4:.1f}" height="{r * 1.4:.1f}" rx="4" {common}/>'
    if kind == "target":
        return f'<rect x="{x - r * 2:.1f}" y="{y - r:.1f}" width="{r * 4:.1f}" height="{r * 2:.1f}" rx="3" {common}/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" {common}/>'


_CSS = """
.cg-wrap{overflow-x:auto;max-width:100%;border:1px solid #ddd;background:#fff}
.cg-wrap svg{display:block;font-family:system-ui,sans-serif}
.cg-edge{fill:none;stroke-opacity:.55;transition:stroke-opacity .1s}
.cg-edge:hover{stroke-opacity:1}
.cg-dim .cg-edge{stroke-opacity:.07}
.cg-dim .cg-edge.cg-lit{stroke-opacity:.95}
.cg-dim .cg-node{opacity:.35}
.cg-dim .cg-node.cg-lit{opacity:1}
.cg-node text{font-size:10px;fill:#222;pointer-events:none}
.cg-node{cursor:default}
.cg-node a,.cg-node.cg-link{cursor:pointer}
.cg-axis{font-size:10px;fill:#555}
.cg-tok{font-size:12px;fill:#111;font-family:ui-monospace,monospace}
.cg-band{fill:#f4f4f4}
.cg-band-alt{fill:#fafafa}
.cg-legend{display:flex;flex-wrap:wrap;gap:4px 18px;font-size:12px;margin:6px 0 12px;align-items:center}
.cg-legend span{display:inline-flex;align-items:center;gap:5px}
"""

_SCRIPT = """
(function(){
  var figs = document.querySelectorAll('.cg-wrap[data-cg]:not([data-cg-ready])');
  figs.forEach(function(fig){
    fig.setAttribute('data-cg-ready', '1');
    var svg = fig.querySelector(':scope > svg');
    fig.querySelectorAll('.cg-node').forEach(function(node){
      var id = node.getAttribute('data-id');
      node.addEventListener('mouseenter', function(){
        svg.classList.add('cg-dim'); node.classList.add('cg-lit');
        fig.querySelectorAll('.cg-edge').forEach(function(e){
          if (e.getAttribute('data-src') === id || e.getAttribute('data-dst') === id) {
            e.classList.add('cg-lit');
            var other = e.getAttribute('data-src') === id ? e.getAttribute('data-dst') : e.getAttribute('data-src');
            fig.querySelectorAll('.cg-node').forEach(function(m){
              if (m.getAttribute('data-id') === other) m.classList.add('cg-lit');
            });
          }
        });
      });
      node.addEventListener('mouseleave', function(){
        svg.classList.remove('cg-dim');
        fig.querySelectorAll('.cg-lit').forEach(function(e){ e.classList.remove('cg-lit'); });
      });
    });
  });
})();
"""


def _legend(has_dashed: bool, kinds: list[str], aggregated: bool) -> str:
    line = '<svg width="34" height="10"><line x1="1" y1="5" x2="33" y2="5" stroke="{c}" stroke-width="{w}"{d}/></svg>'
    dash = ' stroke-dasharray="5 3"'
    items = [
        f"<span>{line.format(c=POSITIVE, w=3, d='')} positive: the source raises its destination (at the target: "
        "supports the answer)</span>",
        f"<span>{line.format(c=NEGATIVE, w=3, d='')} negative: the source lowers it</span>",
        f"<span>{line.format(c='#555', w=2, d='')} solid: exact value (ablating the source, measured)</span>",
        f"<span>{line.format(c='#555', w=2, d=dash)} dashed: estimate only (AtP; no exact ablation was run for "
        "this edge)</span>" if has_dashed else
        "<span>dashed lines would mark estimate-only edges (AtP, not measured); this graph has none</span>",
        "<span>width &#8733; |value|, scaled separately for edges into the target (nats of log p(answer)) and into "
        "other nodes (change of their activation)</span>",
    ]
    for k in kinds:
        svg = f'<svg width="34" height="22">{_shape(k, 17, 11, _KIND_FILL.get(k, "#ccc"), "#444")}</svg>'
        items.append(f"<span>{svg} {_esc(_KIND_NAME.get(k, k))}</span>")
    what = ("columns: positions aligned across prompts by the task's anchors, others by their distance from P; "
            "values are means over all prompts" if aggregated else
            "x: the prompt's tokens (position · anchor), '...' where positions without a kept node are skipped")
    items.append(f"<span>{_esc(what)}; y: layers, embeddings at the bottom, the target at the top; hover a node or "
                 "edge for its values (a node lights its edges)</span>")
    return '<div class="cg-legend">' + "".join(items) + "</div>"


def circuit_graph_html(
    graph: Mapping,
    *,
    kind: Literal["example", "aggregated"] = "example",
    feature_link: Callable[[int, int], str] | None = None,
) -> str:
    """The kept circuit graph as a self-contained HTML fragment (inline SVG + legend; offline, escaped).

    Args:
        graph: ``kind="example"``: one per-prompt graph of the "positions" contract (``tokens``, ``P``, ``anchors``,
            ``nodes`` with ``pos``, ``edges``); ``kind="aggregated"``: the aggregated graph (``columns``, ``nodes``
            with ``column``, ``edges`` with ``mean_*`` values).
        kind: ``"example"`` or ``"aggregated"``.
        feature_link: ``feature_link(sae, feature) -> href`` of a feature's card; feature nodes become links (other
            nodes never are). None: no links.

    Returns:
        HTML: a ``<div class="cg-wrap">`` holding the ``<svg>`` (one ``<g class="cg-node">`` per drawn node, one
        ``<path class="cg-edge">`` per drawn edge, solid for exact values and dashed for estimate-only ones,
        ``<title>`` hover texts in nats / activation units), its legend, style and script. Node values are in nats
        of log p(answer) at P; an edge into a feature is the change of that feature's activation, into the target in
        nats.

    Raises:
        ValueError: ``kind`` is neither ``"example"`` nor ``"aggregated"``.
    """
    if kind not in ("example", "aggregated"):
        raise ValueError(f"kind must be 'example' or 'aggregated', got {kind!r}")
    aggregated = kind == "aggregated"
    all_nodes = list(graph.get("nodes") or [])
    flagged = any("in_graph" in n for n in all_nodes)
    nodes = [n for n in all_nodes if n.get("in_graph", True) or n["kind"] == "target" or not flagged]
    if not nodes:
        return '<p class="cg-empty">The circuit graph has no kept nodes to draw.</p>'
    by_id = {n["id"]: n for n in nodes}
    edges = [e for e in graph.get("edges") or []
             if e.get("in_graph", not flagged) and e["src"] in by_id and e["dst"] in by_id]
    n_layers = max([int(n["layer"]) for n in nodes if n["kind"] == "target"]
                   + [int(n["layer"]) + 1 for n in nodes if n["kind"] != "target"] + [1])
    col_key = (lambda n: n["column"]) if aggregated else (lambda n: int(n["pos"]))
    cols, col_index = _columns(graph, nodes, aggregated)

    # cells: (band, column) -> nodes, ordered by |value| (largest first) then id
    cells: dict[tuple[int, int], list[Mapping]] = {}
    for n in sorted(nodes, key=lambda n: (-abs(_value(n, aggregated)[0]), n["id"])):
        cells.setdefault((_band(n, n_layers), col_index[col_key(n)]), []).append(n)
    cell_of = {n["id"]: bc for bc, members in cells.items() for n in members}
    # information flows up the layers: an edge that does not end in a higher band (a malformed graph, e.g. a node
    # into itself) cannot be drawn as such and is left out rather than drawn misleadingly
    edges = [e for e in edges if cell_of[e["dst"]][0] > cell_of[e["src"]][0]]
    n_bands = 2 * n_layers + 2
    n_cols = len(cols)
    per_row = {c: 1 for c in range(n_cols)}
    rows = {b: 1 for b in range(n_bands)}
    for (b, c), members in cells.items():
        per_row[c] = max(per_row[c], min(len(members), _PER_ROW))
        rows[b] = max(rows[b], math.ceil(len(members) / _PER_ROW))

    # routing (so no edge runs through a node): an edge to the next band is one S-curve whose turn lies in the gap
    # between the two bands. A longer edge curves into a gutter (the one left of the destination's column, or right
    # of its own column for an edge that stays in its column), climbs it, and curves out into its destination from
    # the gap below the destination's band. Gutters have a lane per edge (up to _MAX_LANES, then lanes repeat).
    routes = []
    gap_lanes: dict[int, int] = {}
    gutter_lanes: dict[tuple[int, str], int] = {}
    for e in sorted(edges, key=lambda e: (cell_of[e["dst"]][1], -cell_of[e["dst"]][0], cell_of[e["src"]][1],
                                          -cell_of[e["src"]][0], e["src"], e["dst"])):
        (bs, cs), (bd, cd) = cell_of[e["src"]], cell_of[e["dst"]]
        lane_a = gap_lanes.get(bs, 0)
        gap_lanes[bs] = lane_a + 1
        if bd == bs + 1:
            routes.append((e, lane_a, None, None))
            continue
        side = (cd, "right" if cs == cd else "left")
        lane_g = gutter_lanes.get(side, 0)
        gutter_lanes[side] = lane_g + 1
        lane_b = gap_lanes.get(bd - 1, 0)
        gap_lanes[bd - 1] = lane_b + 1
        routes.append((e, lane_a, (side, lane_g), lane_b))

    def room(n_lanes: int) -> float:
        return _LANE * min(n_lanes, _MAX_LANES) + 8

    left_g = [room(gutter_lanes.get((c, "left"), 0)) for c in range(n_cols)]
    right_g = [room(gutter_lanes.get((c, "right"), 0)) for c in range(n_cols)]
    gaps = [max(22.0, _GAP_LANE * min(gap_lanes.get(b, 0), _MAX_LANES) + 10) for b in range(n_bands)]
    widths = [_GAP_W if col["gap"] else max(per_row[i] * _SLOT_W + 12, min(160.0, 7.5 * len(col["label"]) + 10))
              for i, col in enumerate(cols)]
    xs, x = [], float(_LEFT)
    for i in range(n_cols):  # xs[i]: left edge of column i's node area, between its two gutters
        x += left_g[i]
        xs.append(x)
        x += widths[i] + right_g[i]
    width = x + 20
    heights = [rows[b] * _SLOT_H + 8 for b in range(n_bands)]
    band_y0: dict[int, float] = {}  # top edge of each band (band 0 at the bottom)
    y = float(_TOP)
    for b in reversed(range(n_bands)):
        band_y0[b] = y
        y += heights[b] + (gaps[b - 1] if b > 0 else 0)
    total_h = y
    height = total_h + _BOTTOM

    pos_of: dict[str, tuple[float, float]] = {}
    for (b, c), members in cells.items():
        k = per_row[c]
        for j, n in enumerate(members):
            row, slot = divmod(j, k)
            n_in_row = min(k, len(members) - row * k)
            x = xs[c] + (widths[c] - k * _SLOT_W) / 2 + (k - n_in_row) * _SLOT_W / 2 + (slot + 0.5) * _SLOT_W
            pos_of[n["id"]] = (x, band_y0[b] + heights[b] - 4 - _SLOT_H / 2 - row * _SLOT_H + 4)

    out = [f'<div class="cg-wrap" data-cg="{_esc(kind)}"><svg xmlns="http://www.w3.org/2000/svg" '
           f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
           f'aria-label="circuit graph">']
    for b in range(n_bands):  # band shading and the band labels on the left
        out.append(f'<rect class="cg-band{" cg-band-alt" if b % 2 else ""}" x="{_LEFT}" y="{band_y0[b]:.1f}" '
                   f'width="{width - _LEFT - 20:.0f}" height="{heights[b]:.1f}"/>')
        out.append(f'<text class="cg-axis" x="{_LEFT - 6}" y="{band_y0[b] + heights[b] / 2 + 4:.1f}" '
                   f'text-anchor="end">{_esc(_band_label(b, n_layers))}</text>')
    for i, col in enumerate(cols):  # x axis: tokens / columns, two lines, cut to the column's width
        cx = xs[i] + widths[i] / 2
        room = max(2, int(widths[i] / 7.5))
        label = col["label"] if len(col["label"]) <= room else col["label"][: room - 1] + "…"
        out.append(f'<text class="cg-tok" x="{cx:.1f}" y="{total_h + 16:.1f}" text-anchor="middle">{_esc(label)}'
                   f'<title>{_esc(col["label"])} {_esc(col["sub"])}</title></text>')
        if col["sub"]:
            room = max(2, int(widths[i] / 6))
            sub = col["sub"] if len(col["sub"]) <= room else col["sub"][: room - 1] + "…"
            out.append(f'<text class="cg-axis" x="{cx:.1f}" y="{total_h + 30:.1f}" text-anchor="middle">'
                       f'{_esc(sub)}</text>')

    # edges: width per destination unit (target: nats; others: activation change), thick ones drawn first
    top: dict[bool, float] = {}
    for e in edges:
        into_target = by_id[e["dst"]]["kind"] == "target"
        top[into_target] = max(top.get(into_target, 0.0), abs(_value(e, aggregated)[0]))
    out_port: dict[str, int] = {}
    in_port: dict[str, int] = {}
    n_out = Counter(e["src"] for e in edges)
    n_in = Counter(e["dst"] for e in edges)
    has_dashed = False
    paths = []
    for e, lane_a, gutter, lane_b in routes:
        v, exact = _value(e, aggregated)
        scale = top[by_id[e["dst"]]["kind"] == "target"]
        w = _MIN_W + (_MAX_W - _MIN_W) * (abs(v) / scale if scale > 0 else 0.0)
        bs, bd = cell_of[e["src"]][0], cell_of[e["dst"]][0]
        (x1, y1), (x2, y2) = pos_of[e["src"]], pos_of[e["dst"]]
        k = out_port[e["src"]] = out_port.get(e["src"], -1) + 1  # spread the ports along the node's top/bottom
        x1 += (k - (n_out[e["src"]] - 1) / 2) * min(2.5, 2 * _R / max(n_out[e["src"]], 1))
        k = in_port[e["dst"]] = in_port.get(e["dst"], -1) + 1
        x2 += (k - (n_in[e["dst"]] - 1) / 2) * min(2.5, 2 * _R / max(n_in[e["dst"]], 1))
        y1 -= _R if by_id[e["src"]]["kind"] != "embed" else _R * 0.7
        y2 += _R
        ya = band_y0[bs] - 5 - (lane_a % _MAX_LANES) * _GAP_LANE  # where the curve turns, in the gap above the source
        if gutter is None:
            d = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{ya:.1f} {x2:.1f},{ya:.1f} {x2:.1f},{y2:.1f}"
        else:
            (c, side), lane_g = gutter
            offset = 4 + (lane_g % _MAX_LANES) * _LANE
            xg = xs[c] - offset if side == "left" else xs[c] + widths[c] + offset
            yb = band_y0[bd - 1] - 5 - (lane_b % _MAX_LANES) * _GAP_LANE  # in the gap below the destination's band
            rise = min(14.0, (ya - yb) / 3)
            d = (f"M{x1:.1f},{y1:.1f} C{x1:.1f},{ya:.1f} {xg:.1f},{ya:.1f} {xg:.1f},{ya - rise:.1f} "
                 f"L{xg:.1f},{yb + rise:.1f} C{xg:.1f},{yb:.1f} {x2:.1f},{yb:.1f} {x2:.1f},{y2:.1f}")
        has_dashed |= not exact
        dash = ' stroke-dasharray="6 4"' if not exact else ""
        colour = POSITIVE if v >= 0 else NEGATIVE
        paths.append((w, (
            f'<path class="cg-edge" data-src="{_esc(e["src"])}" data-dst="{_esc(e["dst"])}" d="{d}" '
            f'stroke="{colour}" stroke-width="{w:.2f}"{dash}><title>{_esc(_edge_title(e, by_id, aggregated))}'
            "</title></path>"
        )))
    out.extend(p for _, p in sorted(paths, key=lambda t: -t[0]))
    for n in nodes:
        x, yy = pos_of[n["id"]]
        v, exact = _value(n, aggregated)
        stroke = "#444" if n["kind"] == "target" else (POSITIVE if v >= 0 else NEGATIVE)
        if aggregated:
            where = f"column {n['column']}"
        else:
            tokens = graph.get("tokens") or []
            where = f"position {n['pos']}" + (f" ({visible_token(tokens[n['pos']])})" if n["pos"] < len(tokens) else "")
        label = str(n.get("label") or n["id"])
        label = label if len(label) <= 10 else label[:9] + "…"
        body = (f'<title>{_esc(_node_title(n, aggregated, where))}</title>'
                + _shape(n["kind"], x, yy, _KIND_FILL.get(n["kind"], "#ccc"), stroke)
                + (f'<text x="{x + 2.2 * _R:.1f}" y="{yy + 4:.1f}">{_esc(label)}</text>' if n["kind"] == "target"
                   else f'<text x="{x:.1f}" y="{yy + _R + 10:.1f}" text-anchor="middle">{_esc(label)}</text>'))
        link = None
        if feature_link is not None and n["kind"] == "feature" and n.get("sae") is not None and n.get("feature") is not None:
            link = feature_link(int(n["sae"]), int(n["feature"]))
        if link:
            body = f'<a href="{_esc(link)}">{body}</a>'
        cls = "cg-node cg-link" if link else "cg-node"
        out.append(f'<g class="{cls}" data-id="{_esc(n["id"])}" data-kind="{_esc(n["kind"])}" data-x="{x:.1f}" '
                   f'data-y="{yy:.1f}">{body}</g>')
    out.append("</svg>")
    present = {n["kind"] for n in nodes}
    kinds = [k for k in ("feature", "error", "head", "mlp", "embed", "target") if k in present
             or (k == "embed" and "pos_embed" in present)]
    kinds = ["pos_embed" if k == "embed" and "pos_embed" in present else k for k in kinds]
    out.append(_legend(has_dashed, kinds, aggregated))
    out.append("</div>")
    return f"<style>{_CSS}</style>" + "".join(out) + f"<script>{_SCRIPT}</script>"
