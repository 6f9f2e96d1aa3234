"""A realistic hand-built circuit graph for the drawing's tests and for people to look at (test-only helper).

``python tests/report/circuit_graph_demo.py [out.html]`` writes a page with the example graph and an aggregated
graph built from it (default /tmp/i16_graph_demo.html); open it in a browser, or screenshot it with
``chromium --headless --screenshot=/tmp/g.png --window-size=1400,900 file:///tmp/i16_graph_demo.html``.
"""

from __future__ import annotations

import html
import random
import sys
from pathlib import Path

TOKENS = ["<|endoftext|>", "Tom", " said", ",", ' "', "I", " want", " to", " go", " to", " the", " park"]
P = 11
ANCHORS = {"P": 11, "said": 2, "open_quote": 4, "last_word": 10}
N_LAYERS = 4

# (kind, layer, index, pos, label)
_NODES = [
    ("embed", -1, 0, 2, "emb"), ("embed", -1, 0, 4, "emb"), ("embed", -1, 0, 10, "emb"), ("embed", -1, 0, 11, "emb"),
    ("head", 0, 1, 11, "L0H1"), ("head", 0, 3, 4, "L0H3"), ("feature", 0, 12, 4, "F12"), ("feature", 0, 88, 2, "F88"),
    ("feature", 0, 301, 11, "F301"), ("error", 0, 0, 11, "err0"),
    ("head", 1, 3, 11, "L1H3"), ("head", 1, 0, 11, "L1H0"), ("head", 1, 2, 10, "L1H2"), ("feature", 1, 1554, 11, "F1554"),
    ("feature", 1, 77, 4, "F77"), ("feature", 1, 5, 10, "F5"), ("error", 1, 0, 11, "err1"),
    ("head", 2, 1, 11, "L2H1"), ("head", 2, 2, 11, "L2H2"), ("feature", 2, 900, 11, "F900"), ("feature", 2, 45, 11, "F45"),
    ("feature", 2, 46, 11, "F46"), ("feature", 2, 47, 11, "F47"), ("feature", 2, 2, 4, "F2"),
    ("head", 3, 0, 11, "L3H0"), ("mlp", 3, 0, 11, "mlp3"), ("feature", 3, 10, 11, "F10"), ("feature", 3, 11, 11, "F11"),
    ("feature", 3, 12, 11, "F12"), ("feature", 3, 13, 11, "F13"), ("feature", 3, 14, 11, "F14"),
    ("target", N_LAYERS, 0, 11, "log p(.\")"),
]


def _band(kind: str, layer: int) -> int:
    if kind == "target":
        return 2 * N_LAYERS + 1
    if layer < 0:
        return 0
    return 1 + 2 * layer + (0 if kind == "head" else 1)


def demo_graph(*, hostile: str | None = None) -> dict:
    """A per-prompt graph of the "positions" contract: 12 tokens, 32 nodes, about 60 edges, all ``in_graph``.

    Edges as in a real graph: direct effects of the nodes at P on the target, within-position edges to later
    layers, and edges from earlier tokens into heads and features at P and at the last word.

    ``hostile`` replaces token 5 and one feature's label (escaping tests)."""
    rng = random.Random(0)
    tokens = list(TOKENS)
    if hostile is not None:
        tokens[5] = hostile
    nodes = []
    for kind, layer, index, pos, label in _NODES:
        v = rng.choice([-1, 1, 1, 1]) * rng.uniform(0.05, 1.5)
        measured = rng.random() < 0.8
        nodes.append({
            "id": f"{kind}:{layer}:{index}@{pos}", "kind": kind, "layer": layer, "pos": pos,
            "label": hostile if (hostile is not None and index == 1554) else label,
            "sae": layer if kind in ("feature", "error") else None, "feature": index if kind == "feature" else None,
            "head": index if kind == "head" else None, "activation": rng.uniform(0, 5) if kind == "feature" else None,
            "exact": (v if measured else None) if kind != "target" else None, "atp": v * rng.uniform(0.7, 1.2)
            if kind != "target" else None, "ig": None, "in_graph": True,
        })
    by_pos: dict[int, list[dict]] = {}
    for n in nodes:
        by_pos.setdefault(n["pos"], []).append(n)
    pairs = []
    # direct effects: nodes at P -> the target
    target = nodes[-1]
    pairs += [(n, target) for n in by_pos[P] if n is not target and rng.random() < 0.75]
    # within a position: a node -> a feature (or head) one or two bands up
    for members in by_pos.values():
        for a in members:
            ups = [b for b in members if b is not target and 0 < _band(b["kind"], b["layer"]) - _band(a["kind"], a["layer"]) <= 3]
            pairs += [(a, b) for b in rng.sample(ups, min(len(ups), 2))]
    # across positions: earlier tokens -> heads and features at P and at the last word (moved by attention)
    early = [n for n in nodes if n["pos"] < P]
    for b in [n for n in by_pos[P] + by_pos[10] if n["kind"] in ("head", "feature") and n["layer"] <= 2]:
        srcs = [a for a in early if a["pos"] < b["pos"] and _band(a["kind"], a["layer"]) < _band(b["kind"], b["layer"])]
        pairs += [(a, b) for a in rng.sample(srcs, min(len(srcs), 2))]
    n_direct = sum(1 for _, b in pairs if b is target)
    rest = pairs[n_direct:]
    pairs = pairs[:n_direct] + rng.sample(rest, min(len(rest), 60 - n_direct))
    edges = []
    for a, b in pairs:
        v = rng.choice([-1, 1, 1]) * rng.uniform(0.1, 1.0) ** 2
        exact = v if rng.random() < 0.75 else None
        heads = None
        if a["pos"] < b["pos"]:
            split = rng.uniform(0.5, 0.9)
            layer = b["layer"] if b["kind"] == "head" else max(b["layer"] - 1, 0)
            heads = [{"head": f"L{layer}H3", "value": v * split}, {"head": f"L{layer}H1", "value": v * (1 - split)}]
        edges.append({"src": a["id"], "dst": b["id"], "exact": exact, "atp": v * rng.uniform(0.6, 1.3),
                      "heads": heads, "in_graph": True})
    return {"prompt_index": 0, "tokens": tokens, "P": P, "anchors": dict(ANCHORS), "nodes": nodes, "edges": edges}


def demo_aggregated() -> dict:
    """An aggregated graph in the contract's format, from the demo graph (columns: anchors, then offsets, then P)."""
    g = demo_graph()
    inv = {v: k for k, v in ANCHORS.items()}

    def col(pos: int) -> str:
        return inv.get(pos, f"P-{P - pos}")

    nodes = [{
        "id": n["id"].rpartition("@")[0] + "@" + col(n["pos"]), "kind": n["kind"], "layer": n["layer"],
        "column": col(n["pos"]), "label": n["label"], "sae": n["sae"], "feature": n["feature"], "head": n["head"],
        "mean_exact": n["exact"], "ci95": [n["exact"] - 0.1, n["exact"] + 0.1] if n["exact"] is not None else None,
        "mean_atp": n["atp"] or 0.0, "n_prompts": 7, "in_graph": True} for n in g["nodes"]]
    rename = {n["id"]: m["id"] for n, m in zip(g["nodes"], nodes, strict=True)}
    edges = [{"src": rename[e["src"]], "dst": rename[e["dst"]], "mean_exact": e["exact"], "mean_atp": e["atp"],
              "heads": [{"head": h["head"], "mean": h["value"]} for h in e["heads"]] if e["heads"] else None,
              "in_graph": True} for e in g["edges"]]
    return {"columns": ["said", "open_quote", "last_word", "P"], "nodes": nodes, "edges": edges}


def write_demo(path: str | Path = "/tmp/i16_graph_demo.html") -> Path:
    """A page with the example graph and the aggregated graph (feature links to ``#feature-<sae>-<f>``)."""
    from saecircuits.report.circuit_graph import circuit_graph_html

    def link(sae: int, feature: int) -> str:
        return f"#feature-{sae}-{feature}"

    body = (
        "<h2>Example prompt</h2>" + circuit_graph_html(demo_graph(), kind="example", feature_link=link)
        + "<h2>Aggregated over prompts</h2>" + circuit_graph_html(demo_aggregated(), kind="aggregated",
                                                                  feature_link=link)
    )
    path = Path(path)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape('circuit graph demo')}"
                    f"</title></head><body style='font-family:sans-serif'>{body}</body></html>", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_demo(*sys.argv[1:2]))
