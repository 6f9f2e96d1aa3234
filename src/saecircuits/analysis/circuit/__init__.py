"""The feature circuit behind the answer at the prediction position P: nodes, exact effects and edges, gradient
estimates checked against them, and the circuit's faithfulness and completeness.

Method sources:
- Sparse Feature Circuits (Marks et al. 2024): nodes are SAE features plus one SAE-error node per SAE (the error
  ``e = x - x_hat`` carries what the SAE misses), node and edge effects estimated by attribution patching (AtP; Nanda
  2023, Syed et al. 2023) and by integrated gradients (IG; Sundararajan et al. 2017) over one submodule at a time; a
  circuit's faithfulness is the metric when every node outside it is mean-ablated, and its completeness the metric
  when the circuit itself is mean-ablated, both relative to the clean model and to everything mean-ablated.
- The reference notebook's follow-up: virtual weights ``W_dec^(0) W_out^(0) W_in^(1) W_enc^(1)`` (raw and cosine)
  between layer-0 and layer-1 features, and the pair-ablation / "AND" analyses on single positions.

What this module adds: exact effects. Every intervention here is at P, so the prefix-cached intervention layer
(:mod:`saecircuits.models.interventions`) computes, per prompt, the exact change of the metric (node effects) and of
every downstream feature's activation (edges) when one node is ablated alone, batched as variants of position P. The
estimates are then compared with those exact values (rank correlation, sign agreement, top-20 overlap), so a report
can say which estimate can stand in for exact ablation on this model and task.

Conventions (all at each prompt's own P):
- nodes: ``embed`` (``hook_embed``), ``pos_embed`` (learned positions), each attention head (``attn.hook_z``, head
  slice), each MLP without an SAE (``mlp.hook_post``), and per SAE every feature active at P on at least one prompt
  and its error node;
- ablating a node (exact effects): a feature ``k`` becomes ``x - f_k(x) W_dec[k]`` (the SAE error kept, as the
  ablation table), the error node ``x -> x_hat(x)``, a head's z slice or an MLP's ``hook_post`` -> 0, and the token
  or position embedding -> its mean (the means faithfulness uses; zero is off-distribution for an embedding:
  :data:`~saecircuits.analysis.circuit.nodes.MEAN_ABLATED_HOOKS`);
- metric m: the answer's log-prob at P (nats); a node's effect is ``m(clean) - m(node ablated)`` (positive: the node
  supports the answer);
- edge ``u -> d`` (d a feature of a later SAE): ``f_d(clean) - f_d(u ablated)`` (positive: u excites d), mean over
  all prompts (0 where u is inactive);
- AtP: ``effect(u) ~ grad_u m . a_u`` and ``edge(u, d) ~ grad_u f_d . a_u`` (first order in the ablation ``a_u -> 0``;
  ``a_u - mean`` in place of ``a_u`` for the embeddings);
- IG (per submodule, as SFC): the submodule's nodes go from clean to ablated together, ``a(alpha) = (1 - alpha) a``
  (embeddings: ``mean + (1 - alpha) (a - mean)``),
  gradients averaged over ``steps`` midpoints; ``effect(u) ~ mean_alpha grad_u m(alpha) . a_u``. Summed over a
  submodule this converges to the exact effect of ablating the whole submodule (completeness), not to the sum of
  single-node effects;
- faithfulness/completeness use mean ablation, as SFC: a node -> its mean over the tokens of corpus documents
  (what the pipeline uses, from its corpus statistics pass: :func:`corpus_stats_node_means`), or, without a
  corpus, its mean at P over the task's prompts (:func:`node_means`; when every prompt has the same answer that
  mean itself predicts it, so faithfulness can be undefined).
"""

from __future__ import annotations

from saecircuits.analysis.circuit.estimates import (  # noqa: F401
    SIGN_TOLERANCE,
    Estimates,
    _contributions,
    _track,
    agreement,
    attribution_estimates,
    integrated_gradient_estimates,
)
from saecircuits.analysis.circuit.exact import (  # noqa: F401
    MAX_FLOATS,
    ExactEffects,
    exact_effects,
)
from saecircuits.analysis.circuit.faithfulness import (  # noqa: F401
    corpus_mean_hooks,
    corpus_node_means,
    corpus_stats_node_means,
    faithfulness_curve,
    node_means,
)
from saecircuits.analysis.circuit.nodes import (  # noqa: F401
    MEAN_ABLATED_HOOKS,
    Node,
    _answer_logprob,
    _Group,
    _group_specs,
    _mask_edit,
    _single_edit,
    _stage_key,
    ablation_values,
    circuit_nodes,
)
from saecircuits.analysis.circuit.result import (  # noqa: F401
    CircuitResult,
    _top_tokens,
    find_circuit,
    virtual_weights,
)

__all__ = [
    "Node",
    "CircuitResult",
    "circuit_nodes",
    "exact_effects",
    "attribution_estimates",
    "integrated_gradient_estimates",
    "faithfulness_curve",
    "agreement",
    "virtual_weights",
    "find_circuit",
    "node_means",
    "corpus_node_means",
    "corpus_mean_hooks",
    "corpus_stats_node_means",
    "ExactEffects",
    "Estimates",
]
