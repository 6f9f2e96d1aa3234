"""The feature circuit's summary in results.json (``results["circuit"]``; pipeline._circuit_summary of circuit.json,
analysis/circuit). Node effects are in nats of the answer's log-prob at P (clean - ablated); an edge u -> d is the
change of feature d's activation when u is ablated (activation units).

Every key but ``nodes`` and ``edges`` is optional, and every number may be null (undefined). The summary across
positions (issue 16) goes under ``positions`` (:mod:`saecircuits.results.positions`); files written before it have
no such key.
"""

from __future__ import annotations

from saecircuits.results._base import (
    Bool,
    Float,
    Int,
    IntOrNull,
    Pair,
    ResultsModel,
    Str,
    StrOrNull,
    opt,
    req,
)
from saecircuits.results.positions import EstimatesAgreement, Positions


class CircuitSelection(ResultsModel):
    """How the circuit's nodes and edges were chosen."""

    rule: Str = opt("the node rule, e.g. 'smallest size with faithfulness >= 0.8'")
    n_nodes: Int = opt("nodes in the circuit")
    mean_ablation: Str = opt("what a node is mean-ablated to, in words")
    faithfulness: Float = opt("faithfulness of the chosen circuit")
    faithfulness_ci95: Pair | None = opt("its paired-bootstrap 95% interval [lo, hi]; null when undefined")
    completeness: Float = opt("completeness of the chosen circuit")
    completeness_ci95: Pair | None = opt("its paired-bootstrap 95% interval [lo, hi]; null when undefined")
    undefined_reason: Str = opt("why faithfulness is undefined, when it is")
    edge_rule: Str = opt("the edge rule, in words")


class CircuitAgreement(ResultsModel):
    """Agreement of the estimates with the exact node effects and edges."""

    nodes: EstimatesAgreement = opt("node effects")
    edges: EstimatesAgreement = opt("edges")


class FaithfulnessPoint(ResultsModel):
    """One circuit size on the faithfulness curve (answer log-prob at P, nats)."""

    n_nodes: Int = opt("circuit size (the top nodes by |exact effect|)")
    m_circuit: Float = opt("mean answer log-prob with everything outside the circuit mean-ablated (nats)")
    m_complement_ablated: Float = opt("mean answer log-prob with the circuit mean-ablated (nats)")
    faithfulness: Float = opt("(m_circuit - m_empty) / (m_clean - m_empty); null when undefined")
    faithfulness_ci95: Pair | None = opt("95% interval [lo, hi]")
    completeness: Float = opt("the same for the complement; null when undefined")
    completeness_ci95: Pair | None = opt("95% interval [lo, hi]")
    undefined_reason: StrOrNull = opt("why the ratios are undefined (null when defined)")
    m_clean: Float = opt("mean answer log-prob, clean (nats)")
    m_empty: Float = opt("mean answer log-prob with every node mean-ablated (nats)")


class VirtualWeight(ResultsModel):
    """A feature pair between two SAEs: the exact edge and the weight-based (virtual) one."""

    source: Str = opt("upstream feature label, e.g. 'S0:f576'")
    target: Str = opt("downstream feature label")
    exact: Float = opt("exact edge (activation units)")
    n_prompts: Int = opt("prompts where the edge was measured")
    virtual_raw: Float = opt("decoder(up) . encoder(down), through the residual")
    virtual_cosine: Float = opt("the same as a cosine")


class CircuitNode(ResultsModel):
    """A node of the feature graph (an SAE feature, an SAE error, an attention head, an MLP, the embeddings)."""

    id: Int = req("node id (edges refer to it)")
    label: Str = req("label, e.g. 'S0:f576', 'L0H3', 'embed'")
    kind: Str = opt("'feature', 'error', 'head', 'mlp', 'embed', ...")
    layer: Int = opt("layer (-1 for the embeddings)")
    index: Int = opt("feature index (feature nodes) or head index (head nodes); -1 otherwise")
    sae: Int = opt("index into results['saes'] (-1: not an SAE node)")
    effect: Float = req("exact effect: clean - ablated answer log-prob at P (nats)")
    effect_ci95: Float = opt("95% CI half-width of effect (nats)")
    atp: Float = opt("attribution-patching estimate of effect (nats)")
    ig: Float = opt("integrated-gradients estimate of effect (nats); null when not computed")
    n_active_prompts: Int = opt("prompts where the node is active")
    top_tokens: list[Str] = opt("tokens the feature fires on most")
    in_circuit: Bool = opt("whether the node is in the circuit")


class CircuitEdge(ResultsModel):
    """An edge between two nodes: the change of the target's activation when the source is ablated."""

    source: Int = req("source node id")
    target: Int = req("target node id")
    exact: Float = req("exact edge (activation units of the target)")
    atp: Float = opt("attribution-patching estimate")
    ig: Float = opt("integrated-gradients estimate; null when not computed")
    n_prompts: Int = opt("prompts where the edge was measured")


class Circuit(ResultsModel):
    """The feature circuit across the SAEs at P (the whole graph is in ``file``, circuit.json)."""

    file: Str = opt("the file with the whole graph, 'circuit.json'")
    metric: Str = opt("what node effects and edges measure, in words")
    n_nodes_total: Int = opt("nodes in the whole graph")
    n_edges_total: Int = opt("edges measured")
    ig_steps: IntOrNull = opt("integrated-gradient steps (null: IG not computed)")
    selection: CircuitSelection = opt("how the circuit was chosen")
    agreement: CircuitAgreement = opt("agreement of the gradient estimates with the exact values")
    faithfulness: list[FaithfulnessPoint] = opt("the faithfulness curve over circuit sizes")
    virtual_weights: list[VirtualWeight] = opt("top feature pairs with their virtual weights")
    nodes: list[CircuitNode] = req("the top nodes by |effect| (the circuit's first)")
    edges: list[CircuitEdge] = req("the circuit's edges")
    positions: Positions = opt("the circuit across positions (issue 16); absent in files written before it")

