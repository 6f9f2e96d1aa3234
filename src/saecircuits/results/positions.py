"""The circuit across positions (issue 16; ``results["circuit"]["positions"]``, the reduced copy of circuit.json's
``positions``: the aggregated graph, the summary, the agreement, and the per-prompt graphs pruned to their
``in_graph`` items). The format is the issue-16 contract (analysis/circuit/positions.py writes it).

Units: node values are nats of log p(answer) at P (positive = supports the answer); an edge u -> d with d a feature
is the change of f_d (activation units) when u is ablated; an edge u -> target is in nats. Every float is finite or
null. Node ids are ``f"{kind}:{layer}:{index}@{pos}"`` (index = feature id / head / 0) in a prompt's graph; the
target node is ``f"target:{n_layers}:0@{P}"``.
"""

from __future__ import annotations

from typing import Literal

from saecircuits.results._base import (
    Bool,
    Float,
    Int,
    IntOrNull,
    IntOrStr,
    Pair,
    ResultsModel,
    Str,
    StrOrNull,
    opt,
    req,
)

NodeKind = Literal["feature", "error", "head", "mlp", "embed", "pos_embed", "target"]


class EstimateAgreement(ResultsModel):
    """How well a gradient estimate (AtP or IG) agrees with the exact effects (analysis.circuit.agreement)."""

    n: IntOrNull = opt("values compared")
    top: IntOrNull = opt("k of the top-k comparisons")
    spearman: Float = opt("Spearman rank correlation; null when undefined")
    sign_agreement: Float = opt("fraction of nonzero exact values whose sign the estimate gets")
    top_overlap: Float = opt("overlap of the top-k by |exact| and by |estimate|, in [0, 1]")
    top_sign_agreement: Float = opt("sign agreement on the top-k by |exact|")


class EstimatesAgreement(ResultsModel):
    """Agreement of each estimate with the exact values."""

    atp: EstimateAgreement | None = opt("attribution patching (one gradient); null: not computed")
    ig: EstimateAgreement | None = opt("integrated gradients; null: not computed (the circuit across positions has no IG)")


class DistanceAgreement(ResultsModel):
    """Agreement of the AtP estimate with the exact values at one distance from P (or one named anchor)."""

    distance: IntOrStr = opt("tokens before P (an int), or an anchor name")
    n: Int = opt("values compared")
    spearman: Float = opt("Spearman rank correlation; null when undefined")
    sign: Float = opt("sign agreement, in [0, 1]; null when undefined")
    top_k: Float = opt("top-k overlap, in [0, 1]; null when undefined")


class PositionsAgreement(ResultsModel):
    """Agreement of the gradient estimates with the exact values, over all positions and by distance from P."""

    nodes: EstimatesAgreement = opt("node effects: 'atp', 'ig'")
    edges: EstimatesAgreement = opt("edges: 'atp'")
    by_distance: list[DistanceAgreement] = opt("node effects, per distance from P (0..15, then '16+')")
    edges_by_distance: list[DistanceAgreement] = opt("edges, per distance of the source from P")
    aggregated_nodes: EstimateAgreement | None = opt(
        "AtP against exact for the aggregated graph's measured nodes, on every prompt holding them")
    pairs: Str = opt("which values the agreements compare, in words")


class MeanInterval(ResultsModel):
    """A mean over prompts with its 95% interval."""

    mean: Float = opt("mean over prompts; null when undefined")
    ci95: Pair | None = opt("95% interval [lo, hi]; null when undefined")
    undefined_reason: StrOrNull = opt("why the value is undefined (null when defined)")


class HeadMean(ResultsModel):
    """One attention head's mean share of an aggregated edge."""

    head: Str = req("the head, e.g. 'L1H3'")
    mean: Float = opt("its mean loading (units of the edge)")


class HeadValue(ResultsModel):
    """One attention head's loading of an edge of one prompt; the loadings sum to the edge (exact, or AtP)."""

    head: Str = req("the head, e.g. 'L1H3'")
    value: Float = opt("its loading (units of the edge)")


class AggregatedNode(ResultsModel):
    """A node aggregated over prompts: keyed by its identity without position and its column."""

    id: Str = req("node id in the aggregated graph")
    kind: Str = opt("'feature' | 'error' | 'head' | 'mlp' | 'embed' | 'pos_embed' | 'target'")
    layer: Int = opt("layer (-1 for embed/pos_embed, n_layers for target)")
    column: Str = opt("an anchor name, or 'P-d' (d tokens before P; 'P' for d = 0)")
    label: Str = opt("label for people")
    sae: IntOrNull = opt("index into results['saes']; null: not an SAE node")
    feature: IntOrNull = opt("feature index; null: not a feature")
    head: IntOrNull = opt("head index; null: not a head")
    mean_exact: Float = opt("mean exact effect over ALL prompts (absent counts 0; nats); null: not computed")
    ci95: Pair | None = opt("95% interval [lo, hi] of mean_exact (t-based); null when undefined")
    mean_atp: Float = opt("mean AtP estimate over all prompts (nats); null for the target")
    n_prompts: Int = opt("prompts where the node appears (measured nodes: where it exists, a feature where active)")
    in_graph: Bool = opt("kept by pruning")
    values: Str = opt("'exact': mean_exact is the mean exact effect over every prompt (0 where the node does not "
                      "exist), ci95 its interval; 'estimated': no exact mean, mean_atp only; 'target': the target "
                      "node, log p(answer) at P, with no value of its own (its incoming edges are the node effects)")


class AggregatedEdge(ResultsModel):
    """An edge aggregated over prompts."""

    src: Str = req("source node id")
    dst: Str = req("target node id")
    mean_exact: Float = opt("mean exact edge over all prompts; null: not computed")
    mean_atp: Float = opt("mean AtP estimate; null: not computed")
    heads: list[HeadMean] | None = opt("mean head loadings; null: not a head-mediated edge")
    in_graph: Bool = opt("kept by pruning")


class PromptNode(ResultsModel):
    """A node of one prompt's graph, at one position."""

    id: Str = req("f'{kind}:{layer}:{index}@{pos}'")
    kind: NodeKind = opt("'feature' | 'error' | 'head' | 'mlp' | 'embed' | 'pos_embed' | 'target'")
    layer: Int = opt("layer (-1 for embed/pos_embed, n_layers for target)")
    pos: Int = opt("token position in the prompt (0-based)")
    label: Str = opt("label for people")
    sae: IntOrNull = opt("index into results['saes']; null: not an SAE node")
    feature: IntOrNull = opt("feature index; null: not a feature")
    head: IntOrNull = opt("head index; null: not a head")
    activation: Float = opt("the node's activation (SAE feature units for features); null: none")
    exact: Float = opt("exact effect on log p(answer) at P (nats); null: not computed")
    atp: Float = opt("AtP estimate (nats)")
    ig: Float = opt("integrated-gradients estimate (nats); null: not computed")
    in_graph: Bool = opt("kept by pruning")


class PromptEdge(ResultsModel):
    """An edge of one prompt's graph."""

    src: Str = req("source node id")
    dst: Str = req("target node id (may be the target node)")
    exact: Float = opt("exact edge; null: not computed (activation units, or nats into the target)")
    atp: Float = opt("AtP estimate; null: not computed")
    heads: list[HeadValue] | None = opt("head loadings summing to the edge; null: none")
    in_graph: Bool = opt("kept by pruning")


class Pruning(ResultsModel):
    """What pruning kept of one prompt's graph (circuit-tracer style: nodes carrying >= share of the influence)."""

    share: Float = opt("the influence share kept, e.g. 0.8")
    node_share_kept: Float = opt("share of the internal nodes' influence kept (features, errors, heads, MLPs)")
    input_share_kept: Float = opt("share of the embedding nodes' influence kept (pruned apart, as the inputs)")
    n_inputs_kept: IntOrNull = opt("embedding nodes kept")
    edge_share_kept: Float = opt("share of edge weight kept")
    n_nodes: Int = opt("nodes before pruning")
    n_edges: Int = opt("edges before pruning")
    n_nodes_kept: Int = opt("nodes kept")
    n_edges_kept: Int = opt("edges kept")
    n_edges_for_paths: IntOrNull = opt("edges added so that every kept node has a kept path to the target (its "
                                       "strongest outgoing edge toward it)")
    n_nodes_without_path: IntOrNull = opt("nodes the thresholds kept but dropped for having no path to the target")
    non_sae_share: Float = opt("share of kept influence held by non-SAE nodes (heads, MLPs, embeds, errors)")


class Candidates(ResultsModel):
    """The aggregated graph's nodes measured exactly on every prompt."""

    n: Int = opt("how many")
    rule: Str = opt("how they were chosen, in words")


class AggregatedGraph(ResultsModel):
    """The graph aggregated over prompts, nodes in columns (positions relative to P, or named anchors)."""

    columns: list[Str] = opt("left to right by typical distance from P (an anchor's median distance over every prompt "
                               "naming it, d for 'P-d'; a tie puts the anchor first), 'P' last")
    nodes: list[AggregatedNode] = opt("aggregated nodes")
    edges: list[AggregatedEdge] = opt("aggregated edges")
    pruning: Pruning | None = opt("what pruning kept, on the mean values")
    n_prompts: Int = opt("prompts aggregated")
    candidates: Candidates | None = opt("the nodes measured exactly on every prompt")
    faithfulness: MeanInterval | None = opt("faithfulness of the kept nodes, mapped to every prompt")
    completeness: MeanInterval | None = opt("completeness of the kept nodes, mapped to every prompt")


class EdgeCap(ResultsModel):
    """How one prompt's edge list was capped before pruning."""

    max_edges: Int = opt("edges between nodes kept at most (every node's edge into the target is kept besides)")
    n_left_out: Int = opt("edges between nodes left out by the cap")
    rule: Str = opt("the cap's rule, in words")


class PromptGraph(ResultsModel):
    """One prompt's graph (in results.json: pruned to its in_graph items)."""

    prompt_index: Int = req("index of the prompt in the task")
    tokens: list[Str] = opt("the prompt's tokens as strings, shape [T]")
    P: Int = opt("the prediction position (0-based)")
    anchors: dict[str, Int] = opt("anchor name -> token position; 'P' always present")
    nodes: list[PromptNode] = opt("nodes")
    edges: list[PromptEdge] = opt("edges")
    edge_cap: EdgeCap | None = opt("the cap on the edges between nodes and how many it left out")
    pruning: Pruning = opt("what pruning kept")


class Positions(ResultsModel):
    """The circuit across all positions of the prompts, not only P (issue 16)."""

    target: Str = opt("what node values measure, e.g. 'log p(answer) at P (nats)'")
    share: Float = opt("pruning's influence share, e.g. 0.8")
    n_prompts: Int = opt("prompts analysed")
    n_exact_interventions: Int = opt("exact interventions run")
    summary: Str = opt("where most of the evidence comes from, in one sentence")
    agreement: PositionsAgreement = opt("agreement of the gradient estimates with the exact values")
    faithfulness: MeanInterval = opt("faithfulness of the pruned graphs, mean over prompts")
    completeness: MeanInterval = opt("completeness of the pruned graphs, mean over prompts")
    means: Str = opt("what a node is mean-ablated to, in words")
    head_loading: Str = opt("how head loadings are defined, in words")
    values: Str = opt("which values are exact and which estimated, in words")
    example_nodes: Str = opt("which nodes the example prompts' graphs hold (all measured exactly), in words")
    views: Str = opt("what the faithfulness of the circuit at P, of each prompt's graph and of the aggregated graph "
                     "each measure, in words")
    aggregated: AggregatedGraph = opt("the graph aggregated over prompts")
    examples: list[PromptGraph] = opt("per-prompt graphs")
