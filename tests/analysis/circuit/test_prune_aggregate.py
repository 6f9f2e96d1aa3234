"""Pruning by influence, aggregation across prompts aligned by anchors, and the positions summary (issue 16).

Every kept set, share and mean below is worked out by hand in the comments from the hand-built graphs.
"""

from __future__ import annotations

import copy
import math

import pytest

from saecircuits.analysis.circuit.aggregate import (
    aggregate_graphs,
    column_of,
    column_phrase,
    positions_summary,
)
from saecircuits.analysis.circuit.prune import prune_graph


def _node(kind, layer, index, pos, *, exact=None, atp=None, label=None):
    return {
        "id": f"{kind}:{layer}:{index}@{pos}", "kind": kind, "layer": layer, "pos": pos,
        "label": label or f"{kind}{layer}.{index}", "sae": 0 if kind in ("feature", "error") else None,
        "feature": index if kind == "feature" else None, "head": index if kind == "head" else None,
        "activation": None, "exact": exact, "atp": atp, "ig": None, "in_graph": False,
    }


def _edge(src, dst, *, exact=None, atp=None, heads=None):
    return {"src": src["id"], "dst": dst["id"], "exact": exact, "atp": atp, "heads": heads, "in_graph": False}


def _one_prompt():
    """P = 3; influences |exact| else |atp|: feature 3, head 1 (exact -1 wins over atp 0.5), embed 0.5 (atp only),
    mlp 0.3, error 0.2; total 5."""
    t = _node("target", 2, 0, 3)
    f = _node("feature", 0, 5, 1, exact=3.0, atp=2.0)
    h = _node("head", 1, 0, 3, exact=-1.0, atp=0.5)
    e = _node("embed", -1, 0, 0, atp=0.5)
    m = _node("mlp", 0, 0, 3, exact=0.3)
    r = _node("error", 0, 0, 2, exact=0.2)
    edges = [
        _edge(f, h, exact=2.0),  # into h: 2 + 2 = 4, score 2/4 * infl(h)=1 -> 0.5
        _edge(e, h, atp=2.0),  # score 0.5 (embed not kept)
        _edge(h, t, exact=-1.0),  # into target: 1 + 2.5 + 0.5 = 4, target influence 5: score 1/4*5 = 1.25
        _edge(f, t, exact=2.5),  # 2.5/4*5 = 3.125
        _edge(m, t, exact=0.5),  # 0.625 (mlp not kept)
        _edge(f, m, exact=1.0),  # into m: 1, score 1 * 0.3 = 0.3 (mlp not kept)
    ]
    return {"prompt_index": 0, "tokens": ["<bos>", "a", "b", "c"], "P": 3, "anchors": {"P": 3},
            "nodes": [t, f, h, e, m, r], "edges": edges}


def test_prune_keeps_the_smallest_set_carrying_the_share():
    graph = _one_prompt()
    before = copy.deepcopy(graph)
    out = prune_graph(graph, 0.8)
    assert graph == before  # the input is not modified
    kept = {n["id"] for n in out["nodes"] if n["in_graph"]}
    # internal nodes 3 + 1 + 0.3 + 0.2 = 4.5, 0.8 * 4.5 = 3.6: feature (3) then head (1) reach it; the embedding
    # is pruned apart, as an input (0.5 of 0.5 inputs: kept); the target is always kept
    assert kept == {"target:2:0@3", "feature:0:5@1", "head:1:0@3", "embed:-1:0@0"}
    kept_edges = {(e["src"], e["dst"]) for e in out["edges"] if e["in_graph"]}
    # among edges between kept nodes: f->t 3.125, h->t 1.25, f->h 0.5, e->h 0.5 (total 5.375, 80% = 4.3): the
    # first two; the embedding is then left without a path to the target, so it gets its only edge e->h
    assert kept_edges == {("feature:0:5@1", "target:2:0@3"), ("head:1:0@3", "target:2:0@3"),
                          ("embed:-1:0@0", "head:1:0@3")}
    p = out["pruning"]
    assert p["node_share_kept"] == pytest.approx(4 / 4.5)
    assert p["input_share_kept"] == 1.0 and p["n_inputs_kept"] == 1
    assert p["edge_share_kept"] == pytest.approx(4.875 / 6.3)  # all edges' scores: 0.5+0.5+1.25+3.125+0.625+0.3
    assert (p["n_nodes"], p["n_edges"], p["n_nodes_kept"], p["n_edges_kept"]) == (6, 6, 4, 3)
    assert (p["n_edges_for_paths"], p["n_nodes_without_path"]) == (1, 0)
    assert p["non_sae_share"] == pytest.approx(1.5 / 4.5)  # the head's 1 and the embedding's 0.5 of the kept 4.5
    assert p["share"] == 0.8


def test_prune_share_one_keeps_every_node_with_influence_and_zero_graph_is_undefined():
    out = prune_graph(_one_prompt(), 1.0)
    # every node but the error, which has no edge at all (no path to the target: dropped, its 0.2 of 4.5 out)
    assert [n["id"] for n in out["nodes"] if not n["in_graph"]] == ["error:0:0@2"]
    assert out["pruning"]["node_share_kept"] == pytest.approx(4.3 / 4.5)
    zero = _one_prompt()
    for n in zero["nodes"]:
        n["exact"], n["atp"] = (0.0 if n["exact"] is not None else None), 0.0
    out = prune_graph(zero)
    assert [n["id"] for n in out["nodes"] if n["in_graph"]] == ["target:2:0@3"]
    assert out["pruning"]["node_share_kept"] is None and out["pruning"]["non_sae_share"] is None


def _paths(graph):
    """Kept nodes without a kept path to the target, by walking kept edges backwards from it."""
    kept = {n["id"] for n in graph["nodes"] if n["in_graph"]}
    edges = [(e["src"], e["dst"]) for e in graph["edges"] if e["in_graph"]]
    assert all(s in kept and d in kept for s, d in edges)  # no kept edge touches a dropped node
    seen = {n["id"] for n in graph["nodes"] if n["kind"] == "target"}
    while True:
        more = {s for s, d in edges if d in seen} - seen
        if not more:
            return kept - seen
        seen |= more


def _chain():
    """P = 2, by hand: embedding e (pos 0) -> feature a (pos 1) -> head h (P) -> target, every node with its edge
    into the target (its effect). Influences: h 4, a 1, e 2 (the only input); internal total 5, 80% = 4 -> h only?
    No: keep_by_share stops once 4 >= 4, so h alone; with share 0.9 (4.5) a is kept too."""
    t = _node("target", 2, 0, 2)
    e = _node("embed", -1, 0, 0, exact=2.0)
    a = _node("feature", 0, 1, 1, exact=1.0)
    h = _node("head", 1, 0, 2, exact=4.0)
    edges = [
        _edge(e, t, exact=2.0),  # into target: 2 + 1 + 4 = 7, target influence 7: score 2
        _edge(a, t, exact=1.0),  # score 1
        _edge(h, t, exact=4.0),  # score 4
        _edge(e, a, exact=0.5),  # into a: 0.5, score 0.5/0.5 * 1 = 1
        _edge(a, h, exact=3.0),  # into h: 3 + 1 = 4, score 3/4 * 4 = 3
        _edge(e, h, exact=1.0),  # score 1/4 * 4 = 1
    ]
    return {"P": 2, "anchors": {"P": 2}, "nodes": [t, e, a, h], "edges": edges}


def test_prune_gives_every_kept_node_its_strongest_edge_toward_the_target():
    out = prune_graph(_chain(), 0.9)
    kept = {n["id"] for n in out["nodes"] if n["in_graph"]}
    assert kept == {"target:2:0@2", "embed:-1:0@0", "feature:0:1@1", "head:1:0@2"}
    # edge scores 4 (h->t), 3 (a->h), 2 (e->t), 1, 1, 1 (total 12, 90% = 10.8): h->t, a->h, e->t reach 9, then the
    # ties by order: a->t (10), e->a (11) -> five edges kept, every node already connected; nothing added
    kept_edges = {(e["src"], e["dst"]) for e in out["edges"] if e["in_graph"]}
    assert ("embed:-1:0@0", "head:1:0@2") not in kept_edges and len(kept_edges) == 5
    assert out["pruning"]["n_edges_for_paths"] == 0 and not _paths(out)
    out = prune_graph(_chain(), 0.5)
    # internal 5, 50% = 2.5: h (4); input e (2); edges between kept nodes: h->t 4, e->t 2, e->h 1 (total 12, 50% =
    # 6): h->t and e->t -> e connected through its own edge to the target
    assert {n["id"] for n in out["nodes"] if n["in_graph"]} == {"target:2:0@2", "embed:-1:0@0", "head:1:0@2"}
    assert {(e["src"], e["dst"]) for e in out["edges"] if e["in_graph"]} == {
        ("head:1:0@2", "target:2:0@2"), ("embed:-1:0@0", "target:2:0@2")}
    assert not _paths(out)


def test_prune_connects_nodes_whose_target_edge_falls_under_the_edge_threshold():
    # the demo's failure: a large embedding effect takes the edge share, the features' edges into the target fall
    # under it. e: 20 (input), features f1 (pos 1) 1.0 and f2 (pos 2) 0.9, head h (P) 0.1
    t = _node("target", 2, 0, 3)
    e = _node("embed", -1, 0, 3, exact=20.0)
    f1 = _node("feature", 0, 1, 1, exact=1.0)
    f2 = _node("feature", 0, 2, 2, exact=0.9)
    h = _node("head", 1, 0, 3, exact=0.1)
    edges = [_edge(e, t, exact=20.0), _edge(f1, t, exact=1.0), _edge(f2, t, exact=0.9), _edge(h, t, exact=0.1),
             _edge(f1, f2, exact=2.0),  # into f2: 2 + 1 = 3, score 2/3 * 0.9 = 0.6
             _edge(h, f2, exact=1.0)]  # score 1/3 * 0.9 = 0.3 (h is not kept)
    graph = {"P": 3, "anchors": {"P": 3}, "nodes": [t, e, f1, f2, h], "edges": edges}
    out = prune_graph(graph, 0.8)
    # internal 2.0, 80% = 1.6: f1 then f2 (1.9); e the input. Scores into the target (total 22 in, influence 22):
    # e 20, f1 1, f2 0.9, h 0.1; edges between kept nodes: e->t 20, f1->t 1, f2->t 0.9, f1->f2 0.6 (22.5, 80% = 18):
    # e->t alone. f1's strongest edge is f1->t (1 > 0.6), f2's is f2->t: both added
    kept_edges = {(x["src"], x["dst"]) for x in out["edges"] if x["in_graph"]}
    assert kept_edges == {("embed:-1:0@3", "target:2:0@3"), ("feature:0:1@1", "target:2:0@3"),
                          ("feature:0:2@2", "target:2:0@3")}
    p = out["pruning"]
    assert (p["n_nodes_kept"], p["n_edges_kept"], p["n_edges_for_paths"], p["n_nodes_without_path"]) == (4, 3, 2, 0)
    assert p["node_share_kept"] == pytest.approx(1.9 / 2.0)
    assert p["edge_share_kept"] == pytest.approx(21.9 / 22.9)  # all scores: 20 + 1 + 0.9 + 0.1 + 0.6 + 0.3
    assert not _paths(out)


def test_prune_waits_for_the_strongest_edge_and_drops_nodes_without_any_path():
    # a's strongest edge goes to b (score 3), b's only edge goes to the target: a gets a->b, not its weaker a->t.
    # c has influence but no edge at all (its effect edge was not recorded): dropped, as circuit-tracer drops a node
    # without an outgoing edge, with its share counted out
    t = _node("target", 2, 0, 2)
    a = _node("feature", 0, 1, 0, exact=1.0)
    b = _node("feature", 1, 2, 1, exact=1.0)
    c = _node("feature", 1, 3, 1, exact=1.0)
    edges = [_edge(a, t, exact=0.1), _edge(b, t, exact=1.0),  # into target 1.1, influence 3: 0.27, 2.73
             _edge(a, b, exact=5.0)]  # into b: 5, score 1 * 1 = 1
    graph = {"P": 2, "anchors": {"P": 2}, "nodes": [t, a, b, c], "edges": edges}
    out = prune_graph(graph, 0.5)
    # internal 3, 50% = 1.5: a and b (ties by id); edges: b->t 2.73 of 4 total (>= 2): b->t only; a waits for b
    kept_edges = {(x["src"], x["dst"]) for x in out["edges"] if x["in_graph"]}
    assert kept_edges == {("feature:1:2@1", "target:2:0@2"), ("feature:0:1@0", "feature:1:2@1")}
    out = prune_graph(graph, 1.0)
    kept = {n["id"] for n in out["nodes"] if n["in_graph"]}
    assert "feature:1:3@1" not in kept and out["pruning"]["n_nodes_without_path"] == 1
    assert out["pruning"]["node_share_kept"] == pytest.approx(2 / 3)
    assert not _paths(out)


@pytest.mark.parametrize("share", [0, 1.5, -0.1, True])
def test_prune_refuses_bad_share(share):
    with pytest.raises(ValueError, match=r"share must be a number in \(0, 1\]"):
        prune_graph(_one_prompt(), share)


def test_prune_refuses_edges_to_unknown_nodes():
    graph = _one_prompt()
    graph["edges"].append({"src": "head:9:9@1", "dst": "target:2:0@3", "exact": 1.0, "atp": None, "heads": None})
    with pytest.raises(ValueError, match=r"'head:9:9@1' -> 'target:2:0@3': src is not a node of the graph"):
        prune_graph(graph)


def _two_prompts():
    """Two prompts of different lengths; the opening quote is at 2 (P = 5) and at 3 (P = 8)."""
    ta, fa, ha = _node("target", 2, 0, 5), _node("feature", 0, 7, 2, exact=2.0, atp=1.0), _node("head", 1, 3, 5, exact=1.0, atp=0.8, label="L1H3")
    ea = _node("embed", -1, 0, 4, atp=0.4)
    a = {"P": 5, "anchors": {"P": 5, "open_quote": 2}, "nodes": [ta, fa, ha, ea], "edges": [
        _edge(fa, ha, exact=0.5, heads=[{"head": "L1H3", "value": 0.5}]), _edge(ha, ta, exact=1.0),
        _edge(ea, ta, atp=0.4)]}
    tb, fb, hb = _node("target", 2, 0, 8), _node("feature", 0, 7, 3, exact=4.0, atp=3.0), _node("head", 1, 3, 8, exact=3.0, atp=2.0, label="L1H3")
    gb = _node("feature", 0, 9, 6, exact=-1.0, atp=-1.0)
    b = {"P": 8, "anchors": {"P": 8, "open_quote": 3}, "nodes": [tb, fb, hb, gb], "edges": [
        _edge(fb, hb, exact=1.5, heads=[{"head": "L1H3", "value": 1.0}, {"head": "L1H2", "value": 0.5}]),
        _edge(hb, tb, exact=3.0), _edge(gb, tb, exact=-1.0)]}
    return [a, b]


def test_aggregate_aligns_by_anchor_and_averages_over_all_prompts():
    agg = aggregate_graphs(_two_prompts())
    # mean distance from P: open_quote (3 + 5) / 2 = 4, P-2: 2, P-1: 1, then P
    assert agg["columns"] == ["open_quote", "P-2", "P-1", "P"]
    nodes = {n["id"]: n for n in agg["nodes"]}
    assert set(nodes) == {"target:2:0@P", "feature:0:7@open_quote", "head:1:3@P", "embed:-1:0@P-1", "feature:0:9@P-2"}
    f = nodes["feature:0:7@open_quote"]
    assert (f["mean_exact"], f["mean_atp"], f["n_prompts"], f["column"]) == (3.0, 2.0, 2, "open_quote")
    # t interval with 2 values: 3 +- t_{0.975,1} * std(ddof=1) / sqrt(2) = 3 +- tan(0.475 pi) * sqrt(2) / sqrt(2)
    half = math.tan(0.475 * math.pi)
    assert f["ci95"] == pytest.approx([3 - half, 3 + half], rel=1e-6)
    # absent counts 0: the embedding is only in prompt A (atp 0.4, no exact value there: mean_exact undefined)
    e = nodes["embed:-1:0@P-1"]
    assert (e["mean_exact"], e["ci95"], e["mean_atp"], e["n_prompts"]) == (None, None, pytest.approx(0.2), 1)
    assert nodes["feature:0:9@P-2"]["mean_exact"] == -0.5 and nodes["feature:0:9@P-2"]["ci95"] is not None
    edges = {(x["src"], x["dst"]): x for x in agg["edges"]}
    fh = edges[("feature:0:7@open_quote", "head:1:3@P")]
    assert fh["mean_exact"] == 1.0 and fh["mean_atp"] is None
    assert fh["heads"] == [{"head": "L1H3", "mean": 0.75}, {"head": "L1H2", "mean": 0.25}]
    assert edges[("head:1:3@P", "target:2:0@P")]["mean_exact"] == 2.0
    assert edges[("feature:0:9@P-2", "target:2:0@P")]["mean_exact"] == -0.5
    # pruning on the means: internal influences 3, 2, 0.5 (total 5.5, 80% = 4.4): the feature and the head; the
    # embedding (0.2) apart, as the only input
    assert {n["id"] for n in agg["nodes"] if n["in_graph"]} == {"target:2:0@P", "feature:0:7@open_quote", "head:1:3@P",
                                                                 "embed:-1:0@P-1"}
    assert agg["pruning"]["node_share_kept"] == pytest.approx(5 / 5.5)
    assert agg["n_prompts"] == 2


def test_aggregate_orders_anchor_columns_by_their_distance_in_every_prompt():
    # stories260K's failure: `said` is 2 tokens before the opening quote in every prompt, but the prompt holding a
    # node at the quote is long (quote at P-38) and the one holding a node at `said` short (`said` at P-5): a mean
    # over the prompts holding nodes put the quote (38) before `said` (5). Over every prompt naming them: `said`
    # (40 + 5) / 2 = 22.5, the quote (38 + 3) / 2 = 20.5
    ta, fa = _node("target", 2, 0, 50), _node("feature", 0, 1, 12, exact=1.0)
    tb, fb = _node("target", 2, 0, 10), _node("feature", 0, 2, 5, exact=1.0)
    graphs = [{"P": 50, "anchors": {"P": 50, "said": 10, "open_quote": 12}, "nodes": [ta, fa],
               "edges": [_edge(fa, ta, exact=1.0)]},
              {"P": 10, "anchors": {"P": 10, "said": 5, "open_quote": 7}, "nodes": [tb, fb],
               "edges": [_edge(fb, tb, exact=1.0)]}]
    assert aggregate_graphs(graphs)["columns"] == ["said", "open_quote", "P"]
    # offsets sit by their distance among the anchors: P-21 between `said` (22.5) and the quote (20.5)
    graphs[0]["nodes"].append(_node("feature", 0, 3, 29, exact=0.5))  # pos 29 of the long prompt: P-21
    assert aggregate_graphs(graphs)["columns"] == ["said", "P-21", "open_quote", "P"]


def test_aggregate_min_prompts_drops_rare_nodes_and_their_edges():
    agg = aggregate_graphs(_two_prompts(), min_prompts=2)
    assert agg["columns"] == ["open_quote", "P"]
    assert {n["id"] for n in agg["nodes"]} == {"target:2:0@P", "feature:0:7@open_quote", "head:1:3@P"}
    assert len(agg["edges"]) == 2


def test_column_of_and_phrases():
    anchors = {"P": 9, "open_quote": 3, "said": 1}
    assert [column_of(p, 9, anchors) for p in (1, 3, 5, 8, 9)] == ["said", "open_quote", "P-4", "P-1", "P"]
    with pytest.raises(ValueError, match="after the prediction position"):
        column_of(10, 9, anchors)
    assert column_phrase("P-1") == "1 token before P" and column_phrase("P-4") == "4 tokens before P"
    assert column_phrase("open_quote") == "the opening quote" and column_phrase("subj") == "the anchor 'subj'"


def test_positions_summary_names_columns_heads_and_shares():
    text = positions_summary(aggregate_graphs(_two_prompts()))
    # kept influence: open_quote 3, P 2, the embedding at P-1 0.2 (total 5.2); the kept edge open_quote -> P loads
    # L1H3 0.75, L1H2 0.25
    assert text.startswith("Most of the evidence (58%) comes from the opening quote, through L1H3 (the routing is an AtP "
                           "estimate); 38% from P itself; 4% from 1 token before P.")
    assert "SAE features hold 58% of the kept circuit's influence." in text
    assert "The kept graph holds 3 of 4 nodes, carrying 91% of the influence (pruned at 80%)." in text  # no target
    # after the exact pass the share is of the measured candidates' exact influence, and it says so
    text = positions_summary({**aggregate_graphs(_two_prompts()), "candidates": {"n": 3, "rule": "r"}})
    assert ("The kept graph holds 3 of the 3 nodes measured exactly on every prompt (4 nodes in all), carrying 91% of "
            "their exact influence (pruned at 80%).") in text


def test_positions_summary_names_no_position_whose_share_rounds_to_zero():
    # a new user's summary said "0% from 10 tokens before P". Kept influences (nats, by hand): a feature at P 10, one
    # at P-3 2, the token embedding at P-10 0.02; total 12.02, so P 83.2%, P-3 16.6%, P-10 0.17% (rounds to 0%)
    def node(kind, column, exact):
        return {"id": f"{kind}@{column}", "kind": kind, "column": column, "in_graph": True, "mean_exact": exact,
                "label": kind}

    agg = {"columns": ["P-10", "P-3", "P"], "nodes": [node("feature", "P", 10.0), node("feature", "P-3", 2.0),
                                                       node("embed", "P-10", 0.02)], "edges": []}
    text = positions_summary(agg)
    assert text.startswith("Most of the evidence (83%) comes from P itself; 17% from 3 tokens before P; the rest from "
                           "1 other position.")
    assert "0%" not in text and "10 tokens before P" not in text
    # the SAE features' share 12 / 12.02 = 99.8% is not rounded up to the whole
    assert "SAE features hold >99% of the kept circuit's influence." in text


def test_percent_never_rounds_a_share_to_a_claim():
    from saecircuits.display import percent

    # the rounding boundaries by hand: 0.4% and 0.5% round to 0 (half to even), 0.6% to 1; 99.5% rounds to 100
    assert [percent(x) for x in (0.0, 0.004, 0.005, 0.006, 0.5, 0.994, 0.995, 1.0)] == [
        "0%", "<1%", "<1%", "1%", "50%", "99%", ">99%", "100%"]
    assert percent(-0.001) == ">-1%" and percent(0.0004, 1) == "<0.1%" and percent(0.0006, 1) == "0.1%"
    assert percent(0.9996, 1) == ">99.9%" and percent(float("nan")) == "n/a" and percent(None) == "n/a"


def test_positions_summary_says_when_non_sae_nodes_dominate_and_when_undefined():
    graphs = _two_prompts()
    for g in graphs:  # make the head carry most: |head| 3 and 9 -> mean 6 vs the feature's 3
        for n in g["nodes"]:
            if n["kind"] == "head":
                n["exact"] *= 3
    # internal influences 6, 3, 0.5 (total 9.5, 80% = 7.6): head and feature kept, and the embedding (0.2) as the
    # only input; head 6 and embedding 0.2 of the kept 9.2
    text = positions_summary(aggregate_graphs(graphs))
    assert text.startswith("Most of the evidence (65%) comes from P itself; 33% from the opening quote, through L1H3 (the "
                           "routing is an AtP estimate); 2% from 1 token before P.")
    assert ("Most of the kept circuit's influence (67%) sits in non-SAE nodes (token embeddings 2%; "
            "attention heads, MLPs and SAE errors 65%)") in text
    zero = _two_prompts()
    for g in zero:
        for n in g["nodes"]:
            n["exact"] = 0.0 if n["exact"] is not None else None
            n["atp"] = 0.0
    text = positions_summary(aggregate_graphs(zero))
    assert "undefined" in text and "%" not in text


def test_the_summary_names_position_embeddings_only_where_the_model_has_them():
    # a rotary model (Llama, Gemma, Qwen) has no position-embedding node: its graph's inputs are token embeddings
    graphs = _two_prompts()
    for g in graphs:  # the head carries most, as above, so the summary breaks the non-SAE share down
        for n in g["nodes"]:
            if n["kind"] == "head":
                n["exact"] *= 3
    assert "non-SAE nodes (token embeddings 2%;" in positions_summary(aggregate_graphs(graphs))
    for g in graphs:  # a learned position embedding (GPT-2, GPT-Neo), carrying nothing here
        g["nodes"].append(_node("pos_embed", -1, 0, 4, exact=0.0, atp=0.0))
    assert "non-SAE nodes (token and position embeddings 2%;" in positions_summary(aggregate_graphs(graphs))


def test_positions_summary_names_no_head_when_the_estimate_has_the_wrong_sign():
    # the demo's "10% from `said`, through L1H3": exact edge +0.315, its AtP -0.117, L1H3's loading -0.052. The
    # loadings split the AtP value, so they say nothing of the exact edge's routing: no head is named
    graphs = _two_prompts()
    for g in graphs:
        for e in g["edges"]:
            if e["heads"]:
                e["atp"] = -0.1
                e["heads"] = [{"head": "L1H3", "value": -0.1}]
    text = positions_summary(aggregate_graphs(graphs))
    assert text.startswith("Most of the evidence (58%) comes from the opening quote (the head routing is not "
                           "determined: the AtP estimates of 100% of its edges' exact weight have the opposite sign "
                           "to the exact values); ")
    assert "L1H3" not in text
    # signs agree but the head loads against the edge (AtP +0.3 = L1H3 -0.1 + L1H2 +0.4): L1H2 carries it
    for g in graphs:
        for e in g["edges"]:
            if e["heads"]:
                e["atp"] = 0.3
                e["heads"] = [{"head": "L1H3", "value": -0.1}, {"head": "L1H2", "value": 0.4}]
    text = positions_summary(aggregate_graphs(graphs))
    assert text.startswith("Most of the evidence (58%) comes from the opening quote, through L1H2 (the routing is an "
                           "AtP estimate); ")


def test_positions_summary_names_no_head_when_the_heavier_edges_have_the_wrong_sign():
    # a new user's run: "22% from `said`, through L1H3", where embed@said's edge into the target (exact +0.731, AtP
    # -0.102) carried the column and the head came from a small edge whose signs agreed (exact -0.0094)
    def with_embedding(embed_exact):
        graphs = _two_prompts()
        for g in graphs:
            t = next(n for n in g["nodes"] if n["kind"] == "target")
            q = g["anchors"]["open_quote"]
            emb = _node("embed", -1, 0, q, exact=embed_exact, atp=-0.2)
            g["nodes"].append(emb)
            g["edges"].append(_edge(emb, t, exact=embed_exact, atp=-0.2, heads=[{"head": "L1H0", "value": -0.2}]))
            for e in g["edges"]:  # the feature's edge: signs agree, L1H3 carries it
                if e["src"].startswith("feature:0:7"):
                    e["atp"] = 0.3
                    e["heads"] = [{"head": "L1H3", "value": 0.3}]
        return positions_summary(aggregate_graphs(graphs))

    # the embedding's edge (exact 5, AtP -0.2) outweighs the feature's (mean exact 1): nothing is named
    text = with_embedding(5.0)
    assert "(the head routing is not determined: the AtP estimates of 83% of its edges' exact weight have the " \
           "opposite sign to the exact values)" in text
    assert "L1H3" not in text and "L1H0" not in text
    # a small opposite edge (exact 0.1) beside the agreeing one: the agreeing edge's head is named
    text = with_embedding(0.1)
    assert "through L1H3 (the routing is an AtP estimate)" in text


def test_positions_summary_without_head_loadings_names_the_receiving_head():
    graphs = _two_prompts()
    for g in graphs:
        for e in g["edges"]:
            e["heads"] = None
    # the kept edge open_quote -> head:1:3@P (label L1H3) is the only one leaving the opening quote
    text = positions_summary(aggregate_graphs(graphs))
    assert text.startswith("Most of the evidence (58%) comes from the opening quote, through L1H3; 38% from P itself;")
    for g in graphs:  # no edge from the opening quote but the feature's own edge into the target: nothing to name
        f, t = (next(n for n in g["nodes"] if n["kind"] == k) for k in ("feature", "target"))
        g["edges"] = [e for e in g["edges"] if not e["src"].startswith("feature:0:7")] + [
            _edge(f, t, exact=f["exact"])]
    text = positions_summary(aggregate_graphs(graphs))
    assert text.startswith("Most of the evidence (58%) comes from the opening quote; 38% from P itself;")


def test_real_task_anchors_align_prompts_of_different_lengths_end_to_end():
    from helpers import STORIES, tiny_tokenizer

    from saecircuits.report.circuit_graph import circuit_graph_html
    from saecircuits.tasks.closing_quote import closing_quote_task

    task = closing_quote_task(STORIES, tiny_tokenizer())
    graphs = []
    for i, value in ((0, 1.0), (1, 3.0)):  # opening quote at 20 (P = 26) and at 26 (P = 33)
        a = task.anchors(i)
        p, q = a["P"], a["open_quote"]
        t, f, h = _node("target", 2, 0, p), _node("feature", 0, 4, q, exact=value), _node("head", 1, 2, p, exact=0.5)
        g = {"P": p, "anchors": a, "tokens": [str(x) for x in task.token_ids[i]], "nodes": [t, f, h],
             "edges": [_edge(f, h, exact=value, heads=[{"head": "L1H2", "value": value}]), _edge(h, t, exact=0.5)]}
        graphs.append(prune_graph(g, 0.9))
    assert [(a["open_quote"], a["P"]) for a in (task.anchors(0), task.anchors(1))] == [(20, 26), (26, 33)]
    agg = aggregate_graphs(graphs)
    assert agg["columns"] == ["open_quote", "P"]
    f = next(n for n in agg["nodes"] if n["kind"] == "feature")
    assert (f["id"], f["mean_exact"], f["n_prompts"]) == ("feature:0:4@open_quote", 2.0, 2)
    text = positions_summary(agg)
    # at 90% of 2.5 (2.25) the feature (2) and the head (0.5) are kept; edge scores: h->t 2.5, f->h 1 * 0.5
    assert text.startswith("Most of the evidence (80%) comes from the opening quote, through L1H2 (the routing is an AtP "
                           "estimate); 20% from P itself.")
    frag = circuit_graph_html(agg, kind="aggregated")
    assert frag.count('<g class="cg-node') == 3 and frag.count('<path class="cg-edge"') == 2
    assert "(pruned at 90%)" in text


def test_the_exact_pass_over_every_prompt_takes_every_input_and_the_most_influential_internal_nodes():
    """``max_candidates`` bounds the internal nodes measured exactly on every prompt (largest |mean_exact| else
    |mean_atp|, ties by id); every kept input node is measured; nodes outside the aggregate's graph never are."""
    from saecircuits.analysis.circuit.position_graph import _choose_candidates

    def node(nid, kind, atp, in_graph=True, exact=None):
        return {"id": nid, "kind": kind, "mean_atp": atp, "mean_exact": exact, "in_graph": in_graph}

    agg = {"nodes": [node("embed:-1:0@P", "embed", 0.001), node("pos_embed:-1:0@said", "pos_embed", 0.0),
                     node("feature:0:1@P", "feature", 0.5), node("feature:0:2@P", "feature", -0.9),
                     node("head:1:3@said", "head", 0.2, exact=-0.7), node("feature:1:4@P", "feature", 0.4),
                     node("feature:1:5@P", "feature", 5.0, in_graph=False),
                     node("target:2:0@P", "target", None)]}
    got = [nd["id"] for nd in _choose_candidates(agg, 2)]
    assert got == ["embed:-1:0@P", "pos_embed:-1:0@said", "feature:0:2@P", "head:1:3@said"]
    assert [nd["id"] for nd in _choose_candidates(agg, None)] == [
        "embed:-1:0@P", "pos_embed:-1:0@said", "feature:0:1@P", "feature:0:2@P", "head:1:3@said", "feature:1:4@P"]


def test_positions_summary_ends_with_the_aggregated_faithfulness():
    """The influence shares rank positions; the sentence ends with the kept graph's faithfulness (interval to 2
    decimals), a clause when it is below 0.5, the reason when undefined, and nothing when it was not computed."""
    agg = aggregate_graphs(_two_prompts())
    base = positions_summary(agg)
    assert "faithfulness" not in base
    low = positions_summary({**agg, "faithfulness": {"mean": 0.296, "ci95": [0.248, 0.341], "undefined_reason": None}})
    assert low == base + (" Its faithfulness (every other node mean-ablated at every position of every prompt) is 0.30 "
                          "[0.25, 0.34]: the kept graph alone does not reproduce the behaviour.")
    high = positions_summary({**agg, "faithfulness": {"mean": 0.83, "ci95": None, "undefined_reason": None}})
    assert high.endswith(" is 0.83.")
    undefined = positions_summary({**agg, "faithfulness": {"mean": None, "ci95": None,
                                                           "undefined_reason": "mean ablation does not hurt"}})
    assert undefined.endswith(" Its faithfulness is undefined: mean ablation does not hurt.")


def test_aggregate_refuses_two_nodes_of_one_prompt_at_one_column():
    """A prompt whose graph names one node twice at a position (or two ids mapping to one aggregated column id) is
    refused, whichever of its nodes comes first."""
    graphs = _two_prompts()
    dup = dict(graphs[1]["nodes"][1])
    graphs[1] = {**graphs[1], "nodes": graphs[1]["nodes"] + [dup]}
    with pytest.raises(ValueError, match="two nodes map to 'feature:0:7@open_quote'"):
        aggregate_graphs(graphs)
    assert aggregate_graphs(_two_prompts())["n_prompts"] == 2  # each node once: accepted


def _list_means(graphs):
    """The aggregate's per-node and per-edge means computed as before its per-prompt dicts: every value in a list of
    one entry per prompt (None / 0 where absent), ``np.mean`` and ``mean_ci95`` over those lists."""
    import numpy as np

    from saecircuits.analysis.statistics import mean_ci95

    n = len(graphs)
    nodes, edges = {}, {}
    for g_index, g in enumerate(graphs):
        local = {}
        for nd in g["nodes"]:
            key = f"{nd['id'].rpartition('@')[0]}@{column_of(nd['pos'], g['P'], g['anchors'])}"
            local[nd["id"]] = key
            slot = nodes.setdefault(key, {"exact": [None] * n, "atp": [None] * n, "present": [False] * n})
            slot["present"][g_index], slot["exact"][g_index], slot["atp"][g_index] = True, nd["exact"], nd["atp"]
        for e in g["edges"]:
            slot = edges.setdefault((local[e["src"]], local[e["dst"]]),
                                    {"exact": [None] * n, "atp": [None] * n, "present": [False] * n, "heads": {}})
            slot["present"][g_index], slot["exact"][g_index], slot["atp"][g_index] = True, e["exact"], e["atp"]
            for h in e["heads"] or []:
                slot["heads"].setdefault(h["head"], [0.0] * n)[g_index] = float(h["value"])

    def mean_or_none(vals, present):
        if any(p and v is None for v, p in zip(vals, present, strict=True)):
            return None, None
        vec = [float(v) if p else 0.0 for v, p in zip(vals, present, strict=True)]
        return (None, None) if not all(math.isfinite(v) for v in vec) else (float(np.mean(vec)), vec)

    def estimate(vals):
        return float(np.mean([float(v) if v is not None and math.isfinite(v) else 0.0 for v in vals]))

    out_nodes = {}
    for key, s in nodes.items():
        m, vec = mean_or_none(s["exact"], s["present"])
        ci = None
        if vec is not None:
            c = mean_ci95(vec)
            ci = [c.low, c.high] if math.isfinite(c.low) and math.isfinite(c.high) else None
        out_nodes[key] = (m, ci, estimate(s["atp"]), sum(s["present"]))
    out_edges = {key: (mean_or_none(s["exact"], s["present"])[0],
                       estimate(s["atp"]) if any(v is not None for v in s["atp"]) else None,
                       {h: float(np.mean(v)) for h, v in s["heads"].items()}) for key, s in edges.items()}
    return out_nodes, out_edges


def test_aggregate_means_equal_the_means_over_per_prompt_lists():
    """The aggregate's values, kept per node as ``{prompt: value}`` of the prompts holding it, against the means over
    one list entry per prompt (0 where absent) it replaced: the same floats (mean, interval, AtP mean, head means),
    on random graphs where nodes are in some prompts only, some exact values are missing or not finite."""
    import random

    rng = random.Random(3)
    graphs = []
    for i in range(7):
        P = 6 + i % 3
        t = _node("target", 2, 0, P)
        nodes = [t]
        for j in range(6):
            if rng.random() < 0.4:
                continue
            ex = rng.choice([None, rng.gauss(0, 1), rng.gauss(0, 1), float("nan") if j == 5 else 0.5])
            nodes.append(_node("feature", 0, j, P - j % 4, exact=ex, atp=rng.choice([None, rng.gauss(0, 1)])))
        edges = [_edge(nd, t, exact=nd["exact"], atp=nd["atp"],
                       heads=[{"head": f"L0H{h}", "value": rng.gauss(0, 1)} for h in range(rng.randrange(3))] or None)
                 for nd in nodes[1:]]
        graphs.append({"P": P, "anchors": {"P": P}, "nodes": nodes, "edges": edges})
    agg = aggregate_graphs(graphs, share=0.8)
    want_nodes, want_edges = _list_means(graphs)
    assert len(agg["nodes"]) == len(want_nodes) and len(agg["edges"]) == len(want_edges)
    n_exact = 0
    for nd in agg["nodes"]:
        m, ci, atp, count = want_nodes[nd["id"]]
        assert nd["mean_exact"] == m and nd["ci95"] == ci and nd["n_prompts"] == count
        assert nd["mean_atp"] == (None if nd["kind"] == "target" else atp)
        n_exact += m is not None and nd["kind"] != "target"
    assert n_exact >= 2 and any(nd["mean_exact"] is None and nd["kind"] != "target" for nd in agg["nodes"])
    for e in agg["edges"]:
        m, atp, heads = want_edges[(e["src"], e["dst"])]
        assert e["mean_exact"] == m and e["mean_atp"] == atp
        assert {h["head"]: h["mean"] for h in e["heads"] or []} == heads


def test_keep_by_share_with_edge_indices_keeps_what_the_padded_string_keys_kept():
    """Pruning ranks edges by score with ties broken by edge index (int keys); the zero-padded strings it keyed them
    by before sort the same way: the same kept edges and sums on random scores with many ties."""
    import random

    from saecircuits.analysis.circuit.prune import keep_by_share

    rng = random.Random(5)
    for _ in range(50):
        scores = [rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]) for _ in range(rng.randrange(1, 40))]
        share = rng.choice([0.3, 0.5, 0.8, 1.0])
        got = keep_by_share(list(enumerate(scores)), share)
        want = keep_by_share([(f"{i:09d}", s) for i, s in enumerate(scores)], share)
        assert got[0] == {int(k) for k in want[0]} and got[1:] == want[1:]
