"""The circuit graph drawing (issue 16 item 6): escaped, one element per drawn node and edge, no two nodes on one
point, a legend that explains colours and dashes, feature links, and (where Chromium is installed) no JS errors."""

from __future__ import annotations

import html
import itertools
import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from circuit_graph_demo import demo_aggregated, demo_graph, write_demo  # noqa: E402

from saecircuits.report.circuit_graph import NEGATIVE, POSITIVE, circuit_graph_html  # noqa: E402

HOSTILE = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'


def _centres(fragment: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r'class="cg-node[^"]*"[^>]*data-x="([-\d.]+)" data-y="([-\d.]+)"',
                                                        fragment)]


def test_hostile_strings_are_escaped():
    graph = demo_graph(hostile=HOSTILE)
    frag = circuit_graph_html(graph, kind="example", feature_link=lambda sae, f: f"#card{IMG}")
    assert HOSTILE not in frag and "<img" not in frag
    assert frag.count("<script>") == 1  # the fragment's own script only
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in frag  # the token and the label, as text
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in frag


def test_one_element_per_kept_node_and_edge():
    graph = demo_graph()
    dropped_node = next(n for n in graph["nodes"] if n["kind"] == "feature")
    dropped_node["in_graph"] = False
    graph["edges"][0]["in_graph"] = False
    kept_nodes = {n["id"] for n in graph["nodes"] if n["in_graph"]}
    kept_edges = [e for e in graph["edges"] if e["in_graph"] and e["src"] in kept_nodes and e["dst"] in kept_nodes]
    frag = circuit_graph_html(graph, kind="example")
    assert len(re.findall(r'<g class="cg-node', frag)) == len(kept_nodes)
    assert len(re.findall(r'<path class="cg-edge"', frag)) == len(kept_edges) > 40
    ids = set(re.findall(r'<g class="cg-node[^"]*" data-id="([^"]+)"', frag))
    assert ids == kept_nodes
    # estimate-only edges dashed, exact ones solid
    n_dashed = len(re.findall(r'<path class="cg-edge"[^>]*stroke-dasharray', frag))
    assert n_dashed == sum(1 for e in kept_edges if e["exact"] is None) > 0
    # colour by sign of the exact value (else the estimate)
    n_red = len(re.findall(rf'<path class="cg-edge"[^>]*stroke="{NEGATIVE}"', frag))
    assert n_red == sum(1 for e in kept_edges if (e["exact"] if e["exact"] is not None else e["atp"]) < 0) > 0
    assert f'stroke="{POSITIVE}"' in frag


def test_crowded_graph_has_no_two_nodes_on_one_point():
    nodes = [{"id": "target:2:0@3", "kind": "target", "layer": 2, "pos": 3, "label": "t", "exact": None, "atp": None}]
    for pos in (1, 3):
        for f in range(23):  # 23 features in one (layer, position) cell: wraps onto several rows
            nodes.append({"id": f"feature:1:{f}@{pos}", "kind": "feature", "layer": 1, "pos": pos, "label": f"F{f}",
                          "sae": 1, "feature": f, "exact": 0.1 * (f + 1), "atp": 0.1})
        for h in range(6):
            nodes.append({"id": f"head:1:{h}@{pos}", "kind": "head", "layer": 1, "pos": pos, "label": f"L1H{h}",
                          "exact": 0.2, "atp": 0.2})
    nodes.append({"id": "embed:-1:0@3", "kind": "embed", "layer": -1, "pos": 3, "label": "emb", "exact": 1.0,
                  "atp": 1.0})
    graph = {"tokens": ["<bos>", "a", "b", "c"], "P": 3, "anchors": {"P": 3}, "nodes": nodes, "edges": []}
    centres = _centres(circuit_graph_html(graph, kind="example"))
    assert len(centres) == len(nodes)
    closest = min(math.dist(a, b) for a, b in itertools.combinations(centres, 2))
    assert closest >= 30  # nodes have radius 9: none overlaps another


def test_legend_explains_colours_dashes_and_widths():
    frag = circuit_graph_html(demo_graph(), kind="example")
    for text in ("positive: the source raises its destination", "negative: the source lowers it",
                 "solid: exact value", "dashed: estimate only (AtP", "width &#8733; |value|", "SAE error",
                 "attention head", "embeddings at the bottom, the target at the top"):
        assert text in frag, text
    exact_only = demo_graph()
    for e in exact_only["edges"]:
        e["exact"] = e["atp"]
    assert "this graph has none" in circuit_graph_html(exact_only, kind="example")


def test_legend_names_a_position_embedding_only_where_the_graph_has_one():
    # a rotary model (Llama, Gemma, Qwen) has token embedding nodes only
    graph = demo_graph()
    rotary = {**graph, "nodes": [n for n in graph["nodes"] if n["kind"] != "pos_embed"]}
    rotary["edges"] = [e for e in graph["edges"] if {e["src"], e["dst"]} <= {n["id"] for n in rotary["nodes"]}]
    assert any(n["kind"] == "embed" for n in rotary["nodes"])
    frag = circuit_graph_html(rotary, kind="example")
    assert "token embedding</span>" in frag and "position embedding" not in frag
    learned = {**graph, "nodes": graph["nodes"] + [{**next(n for n in graph["nodes"] if n["kind"] == "embed"),
                                                    "id": "pos_embed:-1:0@0", "kind": "pos_embed"}]}
    assert "token / position embedding</span>" in circuit_graph_html(learned, kind="example")


def test_feature_nodes_link_to_their_cards_and_others_do_not():
    graph = demo_graph()
    frag = circuit_graph_html(graph, kind="example", feature_link=lambda sae, f: f"#feature-{sae}-{f}")
    n_features = sum(1 for n in graph["nodes"] if n["kind"] == "feature")
    assert len(re.findall(r'<a href="#feature-\d+-\d+">', frag)) == n_features
    assert '<a href="#feature-1-1554">' in frag
    assert "<a href" not in circuit_graph_html(graph, kind="example")


def test_hover_titles_carry_values_and_head_loadings():
    graph = demo_graph()
    frag = circuit_graph_html(graph, kind="example")
    edge = next(e for e in graph["edges"] if e["heads"] and e["exact"] is not None)
    assert f"exact: {edge['exact']:+.4g} (activation)" in frag or f"exact: {edge['exact']:+.4g} nats" in frag
    assert f"{edge['heads'][0]['head']} {edge['heads'][0]['value']:+.4g}" in frag
    node = next(n for n in graph["nodes"] if n["kind"] == "feature" and n["exact"] is not None)
    assert f"exact effect: {node['exact']:+.4g} nats" in frag
    # loadings are parts of the AtP value: when its sign disagrees with the exact edge the routing is not known
    assert "head loadings (parts of the AtP estimate): " in frag
    assert "the routing is not determined" not in frag or any(
        e["heads"] and e["exact"] and e["atp"] and (e["exact"] > 0) != (e["atp"] > 0) for e in graph["edges"])
    edge["atp"] = -edge["exact"]
    assert "the routing is not determined" in circuit_graph_html(graph, kind="example")


def test_aggregated_graph_uses_its_columns_in_order():
    agg = demo_aggregated()
    frag = circuit_graph_html(agg, kind="aggregated")
    labels = re.findall(r'<text class="cg-tok"[^>]*>([^<]+)<title>', frag)
    assert labels == ["said", "open_quote", "last_word", "P"]
    assert len(re.findall(r'<g class="cg-node', frag)) == len(agg["nodes"])
    assert "mean exact effect" in frag
    with pytest.raises(ValueError, match="kind must be 'example' or 'aggregated'"):
        circuit_graph_html(agg, kind="both")


def test_example_axis_shows_tokens_and_skipped_gaps():
    frag = circuit_graph_html(demo_graph(), kind="example")
    labels = [html.unescape(t) for t in re.findall(r'<text class="cg-tok"[^>]*>([^<]+)<title>', frag)]
    # positions 2, 4, 10, 11 hold kept nodes; 3 and 5-9 are skipped
    assert labels == ["·said", "…", '·"', "…", "·the", "·park"]
    assert ">4 open_quote<" in frag and ">+5<" in frag


def test_demo_page_in_headless_chromium(tmp_path):
    from report_chromium import start_chromium

    page = write_demo(tmp_path / "demo.html")
    driver = start_chromium(tmp_path)
    try:
        driver.get(page.as_uri())
        assert driver.execute_script("return document.querySelectorAll('.cg-wrap > svg').length") == 2
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # hovering a node lights its edges and dims the rest
        lit = driver.execute_script(
            "var n = document.querySelector('.cg-node[data-kind=\"target\"]');"
            "n.dispatchEvent(new MouseEvent('mouseenter'));"
            "return [n.closest('svg').classList.contains('cg-dim'), document.querySelectorAll('.cg-edge.cg-lit').length];"
        )
        assert lit[0] and lit[1] > 0
        driver.save_screenshot(str(tmp_path / "graph.png"))
    finally:
        driver.quit()


def test_drawing_does_not_import_torch():
    import subprocess

    code = ("import sys; import saecircuits.report.circuit_graph; "
            "bad = [m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_edge_that_does_not_go_up_the_layers_is_left_out():
    """A malformed edge (a node into itself, or into a lower layer) is not drawn and does not break the drawing."""
    g = {"tokens": ["a", "b"], "P": 1, "anchors": {}, "nodes": [
        {"id": "embed:-1:0@0", "kind": "embed", "layer": -1, "pos": 0, "label": "emb", "exact": 1.0, "in_graph": True},
        {"id": "feature:0:7@1", "kind": "feature", "layer": 0, "pos": 1, "label": "S0:f7", "sae": 0, "feature": 7,
         "exact": 0.5, "in_graph": True},
        {"id": "target:1:0@1", "kind": "target", "layer": 1, "pos": 1, "label": "t", "in_graph": True}],
        "edges": [{"src": "embed:-1:0@0", "dst": "embed:-1:0@0", "exact": 2.0, "in_graph": True},
                  {"src": "feature:0:7@1", "dst": "embed:-1:0@0", "exact": 1.0, "in_graph": True},
                  {"src": "feature:0:7@1", "dst": "target:1:0@1", "exact": 0.5, "in_graph": True}]}
    frag = circuit_graph_html(g)
    assert frag.count('class="cg-edge"') == 1
