"""The report's circuit section: the circuit at P and the circuit across positions drawn by circuit_graph_html."""

from __future__ import annotations

import copy

from test_results_models import CIRCUIT, POSITIONS

from saecircuits.report.render import build_report_html
from saecircuits.report.sections.circuit import at_p_graph, feature_link
from saecircuits.results import Results


def _circuit(results: dict, circuit: dict) -> dict:
    r = copy.deepcopy(results)
    r["circuit"] = copy.deepcopy(circuit)
    return r


AT_P = {**CIRCUIT,
        "nodes": [{"id": 0, "label": "embed", "kind": "embed", "layer": -1, "sae": -1, "effect": 1.5,
                   "in_circuit": True},
                  {"id": 1, "label": "L0H3", "kind": "head", "layer": 0, "index": 3, "sae": -1, "effect": 0.75, "in_circuit": True},
                  {"id": 2, "label": "S0:f576", "kind": "feature", "layer": 0, "index": 576, "sae": 0, "effect": -0.25,
                   "in_circuit": True},
                  {"id": 3, "label": "S0:err", "kind": "error", "layer": 0, "sae": 0, "effect": 0.01,
                   "in_circuit": False}],
        "edges": [{"source": 0, "target": 1, "exact": 2.0}, {"source": 1, "target": 2, "exact": -0.5},
                  {"source": 0, "target": 3, "exact": 1.0}, {"source": 0, "target": 2, "exact": 0.0}]}


def test_at_p_graph_holds_the_circuit_nodes_their_effects_and_exact_edges(results):
    """Hand-counted: 3 nodes in the circuit + the target; edges: the two nonzero exact edges between circuit nodes
    (the edge into the node outside it and the zero edge left out) and one effect edge per node into the target."""
    c = Results.model_validate(_circuit(results, AT_P)).circuit
    g = at_p_graph(c)
    kinds = sorted(n["kind"] for n in g["nodes"])
    assert kinds == ["embed", "feature", "head", "target"]
    feat = next(n for n in g["nodes"] if n["kind"] == "feature")
    assert (feat["sae"], feat["feature"]) == (0, 576) and feature_link(0, 576) == "#card-sae-0-f576"
    head = next(n for n in g["nodes"] if n["kind"] == "head")
    assert head["head"] == 3
    target = next(n["id"] for n in g["nodes"] if n["kind"] == "target")
    into_target = sorted(e["exact"] for e in g["edges"] if e["dst"] == target)
    assert into_target == [-0.25, 0.75, 1.5]
    assert sorted(e["exact"] for e in g["edges"] if e["dst"] != target) == [-0.5, 2.0]


def test_the_page_draws_the_circuit_at_p_and_across_positions(results):
    r = _circuit(results, {**AT_P, "positions": copy.deepcopy(POSITIONS)})
    page = build_report_html(r)
    assert "The circuit at P" in page
    assert page.count("solid: exact value") == 3  # legends: the circuit at P, the aggregated graph, the example
    assert "Where the evidence comes from" in page
    assert POSITIONS["summary"] in page
    assert 'href="#card-sae-0-f576"' in page and 'href="#card-sae-0-f7"' in page
    assert "Prompt 0" in page
    assert "What is exact" not in page  # written before the "values" key: no such note


def test_the_page_says_which_position_values_are_exact(results):
    pos = copy.deepcopy(POSITIONS)
    pos["values"] = "Exact: the example prompts' nodes <and> the aggregated nodes marked exact."
    pos["example_nodes"] = "the top 200 nodes by |AtP|, each measured exactly"
    page = build_report_html(_circuit(results, {**AT_P, "positions": pos}))
    import html

    assert "nodes &lt;and&gt; the aggregated" in page  # escaped
    assert ("What is exact: Exact: the example prompts' nodes <and> the aggregated nodes marked exact. The "
            "example prompts' graphs hold the top 200 nodes by |AtP|, each measured exactly.") in html.unescape(page)
    assert "object at 0x" not in page  # a dict key named like a dict method renders the method, not the value


def test_no_positions_block_no_positions_section(results):
    page = build_report_html(_circuit(results, AT_P))
    assert "The circuit at P" in page and "Where the evidence comes from" not in page


def test_a_circuit_held_mostly_by_non_sae_nodes_says_so(results):
    """AT_P's circuit: |1.5| (embed) + |0.75| (head) of 2.5 in total are non-SAE nodes: 90%, said; a circuit whose
    feature holds most of the effect gets no such note."""
    page = build_report_html(_circuit(results, AT_P))
    assert "Mostly not SAE features:</b> 90%" in page
    mostly_features = copy.deepcopy(AT_P)
    mostly_features["nodes"][2]["effect"] = -5.0
    assert "Mostly not SAE features" not in build_report_html(_circuit(results, mostly_features))


def test_the_page_says_the_views_and_the_edges_the_cap_left_out(results):
    """Issue 16: the note on what each faithfulness view measures is shown (escaped), and an example whose edge list
    hit the cap says how many edges it left out; one that did not says nothing of it."""
    import html

    pos = copy.deepcopy(POSITIONS)
    pos["views"] = "The three faithfulness figures measure different circuits: <P>, each prompt, aggregated."
    pos["examples"][0]["edge_cap"] = {"max_edges": 500, "n_left_out": 37, "rule": "every target edge kept"}
    page = build_report_html(_circuit(results, {**AT_P, "positions": pos}))
    assert "circuits: &lt;P&gt;, each" in page
    assert "(37 weaker edges between nodes left out before pruning by the cap of 500)" in html.unescape(page)
    pos["examples"][0]["edge_cap"]["n_left_out"] = 0
    page = build_report_html(_circuit(results, {**AT_P, "positions": pos}))
    assert "left out before pruning by the cap" not in page


def test_the_page_says_how_many_example_graphs_it_draws(results):
    """The page draws the first 3 example graphs and says so when circuit.json holds more (a new user counted 3
    drawn of 20 without a word); with 3 or fewer it names them all."""
    import html

    pos = copy.deepcopy(POSITIONS)
    n = len(pos["examples"])
    assert n <= 3
    page = html.unescape(build_report_html(_circuit(results, {**AT_P, "positions": pos})))
    assert f"Per-prompt graphs: the {n} example prompts." in page
    pos["examples"] = [copy.deepcopy(pos["examples"][0]) for _ in range(5)]
    for i, ex in enumerate(pos["examples"]):
        ex["prompt_index"] = i
    page = html.unescape(build_report_html(_circuit(results, {**AT_P, "positions": pos})))
    assert ("Per-prompt graphs: the first 3 of the 5 example prompts are drawn here; circuit.json has every one under "
            "positions.examples.") in page
    assert page.count("<h4>Prompt ") == 3


def test_the_chosen_circuit_shows_its_faithfulness_interval(results):
    """The size is chosen on the point estimate, so the page gives the interval beside it (a new user found 0.802
    shown alone while its interval [0.763, 0.838] reaches below the 0.8 target); without one, the value alone."""
    import html

    at_p = copy.deepcopy(AT_P)
    at_p["selection"] = {**at_p["selection"], "faithfulness": 0.802253, "faithfulness_ci95": [0.76338, 0.83848],
                         "completeness": -0.009681, "completeness_ci95": [-0.037732, 0.015651]}
    page = html.unescape(build_report_html(_circuit(results, at_p)))
    assert "faithfulness 0.802 [0.763, 0.838] (the answer's log-prob" in page
    assert "completeness -0.010 [-0.038, 0.016] (what is left" in page
    at_p["selection"].pop("faithfulness_ci95")
    page = html.unescape(build_report_html(_circuit(results, at_p)))
    assert "faithfulness 0.802 (the answer's log-prob" in page


def test_the_positions_faithfulness_says_which_graph_it_is_of(results):
    """The top-level positions faithfulness is the mean over prompts of each prompt's own pruned graph, not the
    aggregated graph's (a reviewer read the two side by side as one circuit's): the label says so."""
    import html

    pos = copy.deepcopy(POSITIONS)
    pos["faithfulness"] = {"mean": 0.62, "ci95": [0.574, 0.666], "undefined_reason": None}
    page = html.unescape(build_report_html(_circuit(results, {**AT_P, "positions": pos})))
    assert ("Faithfulness of each prompt's own pruned graph (mean over the prompts; every other node mean-ablated at "
            "every position): 0.620") in page
