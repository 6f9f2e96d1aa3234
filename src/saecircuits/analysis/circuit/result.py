"""The whole circuit at P (:func:`find_circuit`): nodes, exact effects and edges, estimates, the chosen circuit and
its faithfulness, and the reference follow-up's virtual weights; :class:`CircuitResult` for notebooks and
circuit.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from saecircuits.analysis.ablations.activations_at_p import feature_activations_of
from saecircuits.analysis.ablations.feature_effects import FeatureActs, activations_or_compute
from saecircuits.analysis.circuit.estimates import Estimates, _atp_steps, _ig_steps, agreement
from saecircuits.analysis.circuit.exact import ExactEffects, _exact_steps
from saecircuits.analysis.circuit.faithfulness import (
    _ci95,
    _faithfulness_steps,
    corpus_node_means,
    corpus_stats_node_means,
    faithfulness_curve,
    node_means,
)
from saecircuits.analysis.circuit.nodes import Node, _stage_key, circuit_nodes, drain, lockstep
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS
from saecircuits.models.interventions import interventions_for
from saecircuits.models.norms import mlp_input_norm, norm_params
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task


def virtual_weights(model, sae_up: SAE, sae_down: SAE, up: Sequence[int], down: Sequence[int]) -> dict[str, np.ndarray]:
    """The reference follow-up's weight-based edges between MLP-output SAE features of two layers.

    ``raw = write @ read`` with ``write = C (W_dec^(a)[up] W_out^(a))`` (rows) and
    ``read = C diag(w) W_in^(b) W_enc^(b)[:, down]`` (columns): block b's ln2 as a linear map at unit scale, its
    centring ``C`` (LayerNorm only: subtract the mean over d_model; ``C`` is a projection, so it goes on both
    sides) and its weight ``w`` applied explicitly (:func:`saecircuits.models.norms.norm_params`). That is exactly
    what ``fold_ln`` and ``center_writing_weights`` do to the weights, so raw and cosine are the same under every
    weight-processing switch, and on a processed load they are the notebook's ``W_dec W_out W_in W_enc``. Biases,
    the norm's scale and the MLP non-linearity are ignored. ``cosine`` = the same with the rows of ``write`` and
    the columns of ``read`` normalised to unit length (the notebook's C matrix, restricted to ``up x down``); NaN
    where either vector is zero (:func:`saecircuits.analysis.corpus.geometry.cosines`).

    Returns:
        ``{"raw": [len(up), len(down)], "cosine": [...]}`` (float32).

    Raises:
        ValueError: the SAEs are not on ``blocks.L.mlp.hook_post`` of increasing layers, or the MLP is gated.
    """
    from saecircuits.analysis.corpus.geometry import cosines
    from saecircuits.analysis.readouts.error_dla import mlp_post_layer

    la, lb = mlp_post_layer(sae_up.hook_point), mlp_post_layer(sae_down.hook_point)
    if la >= lb:
        raise ValueError(f"virtual weights go from a lower layer to a higher one, got {la} -> {lb}")
    if getattr(model.cfg, "gated_mlp", False):
        raise ValueError("virtual weights through W_in need a plain MLP; this model's MLP is gated")
    ln2 = norm_params(model, mlp_input_norm(model, lb))  # blocks.L.ln2 (GPT-J: ln1)
    with torch.no_grad():
        up_t, down_t = torch.as_tensor(list(up)), torch.as_tensor(list(down))
        write = sae_up.W_dec[up_t].float() @ model.W_out[la].detach().float()  # [u, d_model]
        w_in = model.W_in[lb].detach().float() * ln2.weight.float().to(model.W_in.device)[:, None]
        read = (w_in @ sae_down.W_enc[:, down_t].float().to(w_in.device)).to(write.device)  # [d_model, d]
        if ln2.centre:
            write, read = write - write.mean(-1, keepdim=True), read - read.mean(0, keepdim=True)
        raw = write @ read
        cos = cosines(write, read.T)
    return {"raw": raw.cpu().numpy(), "cosine": cos.float().cpu().numpy()}


@dataclass
class CircuitResult(NotebookDisplay):
    """Nodes, exact and estimated effects and edges, agreement, the chosen circuit and its faithfulness curve.

    Attributes:
        nodes: every node (see :func:`circuit_nodes`); ids index the tensors below.
        exact, atp, ig: :class:`ExactEffects`, :class:`Estimates` (``ig`` None when ``ig_steps == 0``).
        agreement: ``{"nodes": {"atp": ..., "ig": ...}, "edges": {"atp": ..., "ig": ...}}`` from :func:`agreement`.
        curve: :func:`faithfulness_curve` over circuit sizes (nodes by decreasing ``|exact effect|``).
        circuit: node ids of the chosen circuit; circuit_edges: ``(u, d)`` pairs kept among them.
        selection: how the circuit was chosen (threshold, size, faithfulness reached).
        virtual: weight-based edges of the top feature pairs between consecutive MLP SAEs, with the exact edge.
        top_tokens: per feature node id, the tokens its decoder direction promotes most (through W_out and the
            final norm's weight, as the weight-based logit boosts).
    """

    nodes: list[Node]
    exact: ExactEffects
    atp: Estimates
    ig: Estimates | None
    agreement: dict
    curve: pd.DataFrame
    circuit: list[int]
    circuit_edges: list[tuple[int, int]]
    selection: dict
    virtual: list[dict]
    top_tokens: dict[int, list[str]]
    n_prompts: int

    def to_json(self, *, max_nodes: int = 400, max_edges: int = 3000) -> dict:
        """``circuit.json``: nodes (labels, effects exact and estimated, top tokens, in-circuit flag), edges (exact and
        estimated weights), agreement, faithfulness curve, the selection rule. Plain JSON types, NaN as None."""
        eff = self.exact.node_effect
        ci = _ci95(self.exact.node_effect, self.exact.node_effect_sq, self.n_prompts)
        order = torch.argsort(eff.abs(), descending=True).tolist()
        keep = list(dict.fromkeys(self.circuit + order[:max_nodes]))
        in_c = set(self.circuit)
        nodes = []
        for i in keep:
            nd = self.nodes[i]
            nodes.append({
                "id": i, "label": nd.label, "kind": nd.kind, "layer": nd.layer, "index": nd.index, "sae": nd.sae,
                "hook": nd.hook, "effect": _f(eff[i]), "effect_ci95": _f(ci[i]),
                "n_active_prompts": int(self.exact.node_active[i]), "atp": _f(self.atp.node_effect[i]),
                "ig": None if self.ig is None else _f(self.ig.node_effect[i]), "in_circuit": i in in_c,
                "top_tokens": self.top_tokens.get(i, []),
            })
        kept = set(keep)
        ranked = sorted(self.exact.edges.items(), key=lambda kv: -abs(kv[1][0]))
        chosen = [k for k, _ in ranked[:max_edges] if k[0] in kept and k[1] in kept]
        chosen = list(dict.fromkeys(list(self.circuit_edges) + chosen))
        ce = set(self.circuit_edges)
        edges = [{
            "source": u, "target": d, "exact": _f(self.exact.edges[(u, d)][0]),
            "n_prompts": int(self.exact.edges[(u, d)][1]), "atp": _f(self.atp.edges.get((u, d), 0.0)),
            "ig": None if self.ig is None or (u, d) not in self.ig.edges else _f(self.ig.edges[(u, d)]),
            "in_circuit": (u, d) in ce,
        } for u, d in chosen]
        return {
            "metric": "answer log-prob at P (nats); node effect = clean - ablated; edge = f_d(clean) - f_d(u ablated)",
            "n_prompts": self.n_prompts,
            "n_nodes_total": len(self.nodes),
            "n_edges_total": len(self.exact.edges),
            "nodes": nodes,
            "edges": edges,
            "agreement": _clean_json(self.agreement),
            "faithfulness": _clean_json(self.curve.to_dict(orient="records")),
            "selection": _clean_json(self.selection),
            "circuit": self.circuit,
            "virtual_weights": _clean_json(self.virtual),
            "ig_steps": None if self.ig is None else self.ig.steps,
        }

    def display_title(self) -> str:
        return (f"Feature circuit over {self.n_prompts} prompts: {len(self.nodes)} nodes, {len(self.circuit)} in the "
                "circuit")

    def to_pandas(self):
        """One row per node: its label, kind, exact effect (nats) and the AtP / IG estimates, whether in the circuit."""
        import pandas as pd

        d = self.to_json(max_nodes=len(self.nodes), max_edges=0)
        return pd.DataFrame([{k: n.get(k) for k in ("label", "kind", "layer", "effect", "effect_ci95", "atp", "ig",
                                                    "n_active_prompts")} | {"in_circuit": n["id"] in set(self.circuit)}
                             for n in d["nodes"]])

    def figure(self):
        """Exact node effects against the attribution-patching estimate."""
        from saecircuits.display import scatter_figure

        df = self.to_pandas()
        return scatter_figure(df["effect"], df["atp"], text=df["label"], title="Node effects: AtP vs exact",
                              xaxis="exact effect (nats)", yaxis="AtP estimate (nats)", color="#ff7f0e")


def _f(x) -> float | None:
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def _clean_json(obj):
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _f(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _top_tokens(model, saes: Sequence[SAE], nodes: list[Node], k: int = 5) -> dict[int, list[str]]:
    """Per feature node id, the ``k`` tokens its decoder direction promotes most (see :class:`CircuitResult`)."""
    import dataclasses

    from saecircuits.analysis.ablations.feature_effects import _feature_write
    from saecircuits.models.norms import readout_of
    from saecircuits.models.tokens import token_string

    readout = readout_of(model)
    # W_U in float32 once (vocab_logits multiplies in float32: a bf16 model's W_U was converted for every chunk)
    readout = dataclasses.replace(readout, W_U=readout.W_U.float())
    shown: dict[int, str] = {}  # each token's string once (nodes share their top tokens)
    out: dict[int, list[str]] = {}
    for si, sae in enumerate(saes):
        ids = [i for i, nd in enumerate(nodes) if nd.kind == "feature" and nd.sae == si]
        if not ids:
            continue
        feats = torch.tensor([nodes[i].index for i in ids])
        try:  # the node features' rows only (not all d_sae)
            with torch.no_grad():
                write = _feature_write(model, sae, feats)
        except ValueError:
            continue
        for j0 in range(0, len(ids), 256):
            with torch.no_grad():
                logits = readout.vocab_logits(write[j0 : j0 + 256])
            top = torch.topk(logits, k, dim=-1).indices
            for i, row in zip(ids[j0 : j0 + 256], top.tolist(), strict=True):
                out[i] = [shown[t] if t in shown else shown.setdefault(t, token_string(model.tokenizer, t)) for t in row]
    return out


def find_circuit(
    model,
    saes: Sequence[SAE],
    task: Task,
    *,
    acts: Sequence[FeatureActs] | None = None,
    ig_steps: int = 10,
    ig_edge_targets: int = 10,
    target_faithfulness: float = 0.8,
    node_threshold: float | None = None,
    edge_fraction: float = 0.1,
    sizes: Sequence[int] | None = None,
    corpus_rows: Sequence[Sequence[int]] | None = None,
    corpus_stats=None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> CircuitResult:
    """The feature circuit behind the answer at P across every SAE of the run (see the module docstring).

    Args:
        model, saes, task: the model, its SAEs (one per hook), the behaviour.
        acts: per SAE, :func:`~saecircuits.analysis.ablations.feature_effects.feature_activations` (what the
            pipeline passes: the per-SAE analyses computed them); those missing (None, or None entries) are
            computed, from one clean pass per batch for all of them
            (:func:`~saecircuits.analysis.ablations.activations_at_p.feature_activations_of`).
        ig_steps: integrated-gradients steps (0 skips IG).
        ig_edge_targets: IG edge estimates into this many downstream feature nodes (largest exact effect).
        target_faithfulness: without ``node_threshold``, the circuit is the smallest swept size whose faithfulness
            reaches this (else the most faithful size).
        node_threshold: keep the nodes with ``|exact effect| >= node_threshold`` (nats) instead.
        edge_fraction: circuit edges are those among circuit nodes with ``|exact| >= edge_fraction x`` the largest.
        sizes: circuit sizes swept for the faithfulness/completeness curves (default 1, 2, 5, 10, 20, 50, ...).
        corpus_rows: corpus documents (token lists); mean ablation then uses each node's mean over their tokens
            (:func:`corpus_node_means`, what the pipeline passes). None: the mean at P over the task's prompts
            (:func:`node_means`, as Sparse Feature Circuits on a task whose prompts have different answers). The
            same means are what the token and position embedding nodes are ablated to in their exact effects, edges
            and estimates (:data:`~saecircuits.analysis.circuit.nodes.MEAN_ABLATED_HOOKS`).
        corpus_stats: a :class:`~saecircuits.analysis.corpus.statistics.CorpusStats` of ``saes`` over
            ``corpus_rows`` run with ``mean_hooks=``:func:`~saecircuits.analysis.circuit.corpus_mean_hooks`
            (what the pipeline passes): the same corpus means, from that pass's sums instead of a pass of their
            own (:func:`~saecircuits.analysis.circuit.corpus_stats_node_means`; ``corpus_rows`` is then read only
            for an SAE whose decoder bias depends on its input).
        progress: progress bars.

    Returns:
        :class:`CircuitResult`.

    Raises:
        ValueError: no SAE, two SAEs on one hook, ``acts`` not one per SAE, or ``corpus_stats`` not of ``saes``
            over ``corpus_rows``.
    """
    if not saes:
        raise ValueError("find_circuit needs at least one SAE")
    given = list(acts) if acts is not None else [None] * len(saes)
    if len(given) != len(saes):
        raise ValueError(f"got {len(given)} FeatureActs for {len(saes)} SAEs: pass one per SAE (or None)")
    missing = [i for i, a in enumerate(given) if a is None]
    computed = dict(zip(missing, feature_activations_of(model, [saes[i] for i in missing], task, max_tokens=max_tokens,
                                                        max_batch=max_batch) if missing else [], strict=True))
    acts = [computed[i] if i in computed else activations_or_compute(model, s, task, given[i]) for i, s in
            enumerate(saes)]
    nodes, groups = circuit_nodes(model, saes, acts)
    kw = dict(max_tokens=max_tokens, max_batch=max_batch)
    # one set of means for everything mean-ablated: the embedding nodes' single ablations (exact, AtP, IG) and
    # faithfulness / completeness
    if corpus_stats is not None:
        means = corpus_stats_node_means(model, corpus_stats, saes, groups, corpus_rows, progress=progress, **kw)
        mean_rule = f"each node's mean over the tokens of {corpus_stats.n_docs} corpus documents"
    elif corpus_rows is not None:
        means = corpus_node_means(model, corpus_rows, groups, progress=progress, **kw)
        mean_rule = f"each node's mean over the tokens of {len(corpus_rows)} corpus documents"
    else:
        means = node_means(model, task, groups, **kw)
        mean_rule = f"each node's mean at P over the task's {task.n_prompts} prompts"
    # the analyses that need the same inputs walk the prompt batches together, one clean pass per batch for all
    # (each alone would run it again where the interventions' cache budget is full: most of 1,000 prompts)
    iv = interventions_for(model)
    exact, atp = lockstep(iv, _exact_steps(model, saes, task, nodes, groups, means=means, progress=progress, **kw),
                          _atp_steps(model, task, nodes, groups, means=means, progress=progress, **kw))
    order = torch.argsort(exact.node_effect.abs(), descending=True).tolist()
    N = len(nodes)
    if sizes is None:
        sizes = [s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if s < N] + [N]
    curve_steps = _faithfulness_steps(model, task, nodes, groups, order, sizes, means=means, **kw)
    ig = None
    if ig_steps > 0:
        targets = [i for i in order if nodes[i].kind == "feature" and nodes[i].sae > 0
                   or (nodes[i].kind == "feature" and _stage_key(nodes[i].hook, int(model.cfg.n_layers)) > 0)]
        ig, curve = lockstep(iv, _ig_steps(model, task, nodes, groups, steps=ig_steps, means=means,
                                           edge_targets=targets[:ig_edge_targets], progress=progress, **kw),
                             curve_steps)
    else:
        curve = drain(curve_steps)
    agree = {"nodes": {"atp": agreement(atp.node_effect.numpy(), exact.node_effect.numpy())}, "edges": {}}
    keys = list(exact.edges)
    ex_e = np.array([exact.edges[k][0] for k in keys])
    agree["edges"]["atp"] = agreement(np.array([atp.edges.get(k, 0.0) for k in keys]), ex_e)
    if ig is not None:
        agree["nodes"]["ig"] = agreement(ig.node_effect.numpy(), exact.node_effect.numpy())
        ig_targets = {d for _, d in ig.edges}  # built once: a million exact edges x thousands of IG edges otherwise
        ig_keys = [k for k in keys if k[1] in ig_targets]
        if ig_keys:
            agree["edges"]["ig"] = agreement(np.array([ig.edges.get(k, 0.0) for k in ig_keys]),
                                             np.array([exact.edges[k][0] for k in ig_keys]))
    if node_threshold is not None:
        circuit = [i for i in order if abs(float(exact.node_effect[i])) >= node_threshold]
        selection = {"rule": f"|exact effect| >= {node_threshold} nats", "n_nodes": len(circuit)}
    else:
        reach = curve[curve["faithfulness"] >= target_faithfulness]
        if len(reach) and reach.index[0] > 0:  # refine between the last size below the target and the first above
            lo, hi = int(curve["n_nodes"].iloc[reach.index[0] - 1]), int(reach["n_nodes"].iloc[0])
            finer = sorted(set(np.linspace(lo + 1, hi - 1, num=min(32, max(0, hi - lo - 1))).round().astype(int)))
            if finer:
                extra = faithfulness_curve(model, task, nodes, groups, order, finer, means=means, **kw)
                curve = pd.concat([curve, extra]).sort_values("n_nodes").drop_duplicates("n_nodes")
                curve = curve.reset_index(drop=True)
                reach = curve[curve["faithfulness"] >= target_faithfulness]
        if len(reach):
            size = int(reach["n_nodes"].iloc[0])
            rule = f"smallest size with faithfulness >= {target_faithfulness}"
        elif curve["faithfulness"].notna().any():
            size = int(curve["n_nodes"].iloc[curve["faithfulness"].idxmax()])
            rule = f"no swept size reaches faithfulness {target_faithfulness}: the most faithful one"
        else:  # faithfulness is undefined: nothing to explain, so no size can be chosen by it
            size = int(curve["n_nodes"].iloc[-1])
            rule = f"faithfulness undefined ({curve['undefined_reason'].iloc[0]}): every node kept"
        circuit = order[:size]
        selection = {"rule": rule, "n_nodes": size}
    selection["mean_ablation"] = mean_rule
    if len(circuit) not in set(curve["n_nodes"].tolist()):
        extra = faithfulness_curve(model, task, nodes, groups, order, [len(circuit)], means=means, **kw)
        curve = pd.concat([curve, extra]).sort_values("n_nodes").reset_index(drop=True)
    row = curve[curve["n_nodes"] == len(circuit)]
    if len(row):
        selection["faithfulness"] = float(row["faithfulness"].iloc[0])
        selection["completeness"] = float(row["completeness"].iloc[0])
        # the size is chosen on the point estimate: the intervals say how firmly it reaches the target
        for key in ("faithfulness_ci95", "completeness_ci95"):
            ci = row[key].iloc[0] if key in row else None
            if ci is not None and len(ci) == 2 and all(math.isfinite(float(x)) for x in ci):
                selection[key] = [float(ci[0]), float(ci[1])]
        if row["undefined_reason"].iloc[0] is not None:
            selection["undefined_reason"] = str(row["undefined_reason"].iloc[0])
    in_c = set(circuit)
    inner = {k: v for k, v in exact.edges.items() if k[0] in in_c and k[1] in in_c}
    cut = edge_fraction * max((abs(v[0]) for v in inner.values()), default=0.0)
    circuit_edges = [k for k, v in inner.items() if abs(v[0]) >= cut and cut > 0]
    selection["edge_rule"] = f"|exact edge| >= {edge_fraction} x the largest among circuit nodes ({cut:.3g})"
    virtual = _virtual_table(model, saes, nodes, exact)
    return CircuitResult(nodes, exact, atp, ig, agree, curve, circuit, circuit_edges, selection, virtual,
                         _top_tokens(model, saes, nodes), task.n_prompts)


def _virtual_table(model, saes: Sequence[SAE], nodes: list[Node], exact: ExactEffects, top: int = 20) -> list[dict]:
    """Top feature pairs (by |exact edge|) between MLP-output SAEs of two layers, with their virtual weights."""
    pairs = [(k, v) for k, v in exact.edges.items()
             if nodes[k[0]].kind == "feature" and nodes[k[1]].kind == "feature"]
    pairs.sort(key=lambda kv: -abs(kv[1][0]))
    pairs = pairs[:top]
    # one virtual_weights call per pair of SAEs, over all their features in the table: each entry is its own row
    # times its own column, so the same values as one call per pair (the model's stacked weights are read once)
    tables: dict[tuple[int, int], tuple[dict, dict, dict] | None] = {}
    for (su, sd) in dict.fromkeys((nodes[u].sae, nodes[d].sae) for (u, d), _ in pairs):
        up = list(dict.fromkeys(nodes[u].index for (u, d), _ in pairs if (nodes[u].sae, nodes[d].sae) == (su, sd)))
        down = list(dict.fromkeys(nodes[d].index for (u, d), _ in pairs if (nodes[u].sae, nodes[d].sae) == (su, sd)))
        try:
            vw = virtual_weights(model, saes[su], saes[sd], up, down)
        except ValueError:
            tables[(su, sd)] = None
            continue
        tables[(su, sd)] = (vw, {k: i for i, k in enumerate(up)}, {k: j for j, k in enumerate(down)})
    rows = []
    for (u, d), (val, n) in pairs:
        nu, nd = nodes[u], nodes[d]
        table = tables[(nu.sae, nd.sae)]
        if table is None:
            continue
        vw, row_of, col_of = table
        i, j = row_of[nu.index], col_of[nd.index]
        rows.append({"source": nu.label, "target": nd.label, "exact": val, "n_prompts": n,
                     "virtual_raw": float(vw["raw"][i, j]), "virtual_cosine": float(vw["cosine"][i, j])})
    return rows
