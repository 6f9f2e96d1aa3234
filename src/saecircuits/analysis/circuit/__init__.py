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

Conventions (all at each prompt's own P, means over the task's prompts):
- nodes: ``embed`` (``hook_embed``), ``pos_embed`` (learned positions), each attention head (``attn.hook_z``, head
  slice), each MLP without an SAE (``mlp.hook_post``), and per SAE every feature active at P on at least one prompt
  and its error node;
- ablating a node (exact effects): a feature ``k`` becomes ``x - f_k(x) W_dec[k]`` (the SAE error kept, as the
  ablation table), the error node ``x -> x_hat(x)``, a head's z slice, an MLP's ``hook_post`` or an embedding -> 0;
- metric m: the answer's log-prob at P (nats); a node's effect is ``m(clean) - m(node ablated)`` (positive: the node
  supports the answer);
- edge ``u -> d`` (d a feature of a later SAE): ``f_d(clean) - f_d(u ablated)`` (positive: u excites d), mean over
  all prompts (0 where u is inactive);
- AtP: ``effect(u) ~ grad_u m . a_u`` and ``edge(u, d) ~ grad_u f_d . a_u`` (first order in the ablation ``a_u -> 0``);
- IG (per submodule, as SFC): the submodule's nodes go from clean to ablated together, ``a(alpha) = (1 - alpha) a``,
  gradients averaged over ``steps`` midpoints; ``effect(u) ~ mean_alpha grad_u m(alpha) . a_u``. Summed over a
  submodule this converges to the exact effect of ablating the whole submodule (completeness), not to the sum of
  single-node effects;
- faithfulness/completeness use mean ablation (node -> its mean at P over the task's prompts), as SFC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from saecircuits.analysis.ablations.feature_effects import FeatureActs, activations_or_compute
from saecircuits.analysis.ablations.modes import edit_dtype, sae_edit
from saecircuits.analysis.quality.reconstruction import loss_recovered
from saecircuits.display import NotebookDisplay
from saecircuits.models.engine import stage_of_hook
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches, with_progress
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.models.norms import mlp_input_norm, norm_params
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

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
    "ExactEffects",
    "Estimates",
]

SIGN_TOLERANCE = 1e-6
"""An exact effect counts as non-zero in :func:`agreement`'s sign agreement above this share of the largest one."""

MAX_FLOATS = 1 << 24
"""Budget per chunk of variants (``B x V x (d_vocab + sum d_sae)`` floats)."""


@dataclass(frozen=True)
class Node:
    """One node of the circuit graph at P.

    Attributes:
        kind: ``"embed"``, ``"pos_embed"``, ``"head"``, ``"mlp"``, ``"feature"`` or ``"error"``.
        layer: block of the node's hook (-1 for embeddings).
        index: head or feature index (-1 otherwise).
        sae: index of the node's SAE in the run (-1 for nodes without one).
        hook: TransformerLens hook name the node lives at.
    """

    kind: str
    layer: int
    index: int
    sae: int
    hook: str

    @property
    def label(self) -> str:
        if self.kind == "feature":
            return f"S{self.sae}:f{self.index}"
        if self.kind == "error":
            return f"S{self.sae}:err"
        if self.kind == "head":
            return f"L{self.layer}H{self.index}"
        if self.kind == "mlp":
            return f"MLP{self.layer}"
        return self.kind


@dataclass
class _Group:
    """Nodes that live at one hook (ablated by one edit)."""

    hook: str  # where the group's edit writes (a transcoder: the MLP's output)
    kind: str  # "sae", "heads", "whole"
    sae: SAE | None
    node_of: torch.Tensor  # int64 [n_group]: node id of each in-group index (-1: not a node)

    @property
    def hook_in(self) -> str:
        """Where the group's activations are read from (an SAE's input hook; ``hook`` otherwise)."""
        return self.sae.hook_point if self.sae is not None else self.hook


def _sae_io(g: _Group, reads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_in [..., d_in], x [..., d_out])`` of an SAE group from activations read at its hooks (``hook_z`` heads
    flattened; one tensor twice for an SAE that reads and writes one hook)."""
    x_in = g.sae.flatten_input(reads[g.hook_in])
    if g.hook_in == g.hook:
        return x_in, x_in
    x = reads[g.hook]
    return x_in, (x.flatten(-2) if x.shape[-1] != g.sae.d_out else x)


def _group_reads(groups: Sequence[_Group]) -> list[str]:
    """Every hook the groups' activations are read from (SAE inputs and outputs), in a stable order."""
    return sorted({h for g in groups for h in (g.hook, g.hook_in)})


def _stage(hook: str, n_layers: int) -> tuple[int, int]:
    return stage_of_hook(hook, n_layers)


def _group_specs(model, saes: Sequence[SAE]) -> list[tuple[str, str, int | None]]:
    """``(hook, kind, sae index)`` of every node group in execution order: embeddings, heads (``"heads"``) and
    MLPs without an SAE (``"whole"``), each SAE (``"sae"``). Shared by :func:`circuit_nodes` and the circuit across
    positions (:mod:`saecircuits.analysis.circuit.positions`).

    Raises:
        ValueError: two SAEs on one hook.
    """
    n_layers = int(model.cfg.n_layers)
    if len({s.hook_point_out for s in saes}) != len(saes):
        raise ValueError("the circuit needs at most one SAE per hook point (the hook each SAE writes)")
    by_hook = {s.hook_point_out: i for i, s in enumerate(saes)}
    # an SAE on a layer's MLP activations or a transcoder replacing its MLP stands for that MLP node, and one on its
    # attention z for its head nodes (their features and error node cover what they write)
    replaced_mlp = {int(s.hook_point_out.split(".")[1]) for s in saes
                    if s.hook_point_out.endswith("mlp.hook_post") or (s.is_transcoder and s.hook_point_out.endswith(
                        "hook_mlp_out"))}
    specs: list[tuple[str, str, int | None]] = [("hook_embed", "whole", None)]
    if getattr(model.cfg, "positional_embedding_type", "standard") == "standard":
        specs.append(("hook_pos_embed", "whole", None))
    for layer in range(n_layers):
        if f"blocks.{layer}.attn.hook_z" not in by_hook:
            specs.append((f"blocks.{layer}.attn.hook_z", "heads", None))
        if layer not in replaced_mlp:
            specs.append((f"blocks.{layer}.mlp.hook_post", "whole", None))
    specs += [(s.hook_point_out, "sae", i) for i, s in enumerate(saes)]
    specs.sort(key=lambda t: _stage(t[0], n_layers))
    return specs


def circuit_nodes(model, saes: Sequence[SAE], acts: Sequence[FeatureActs]) -> tuple[list[Node], list[_Group]]:
    """The circuit's nodes (see the module docstring) and the hook groups they live in, in execution order.

    Args:
        model: a TransformerBridge.
        saes: the run's SAEs (at most one per hook).
        acts: per SAE, its :class:`FeatureActs` at P on the task (features active on a prompt become nodes).

    Raises:
        ValueError: two SAEs on one hook, or ``acts`` not matching ``saes``.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if len(acts) != len(saes):
        raise ValueError(f"got {len(acts)} FeatureActs for {len(saes)} SAEs")
    specs = _group_specs(model, saes)
    nodes: list[Node] = []
    groups: list[_Group] = []
    for hook, kind, si in specs:
        stage_layer = _stage(hook, n_layers)[0]
        if kind == "whole":
            name = "embed" if hook == "hook_embed" else "pos_embed" if hook == "hook_pos_embed" else "mlp"
            ids = [len(nodes)]
            nodes.append(Node(name, stage_layer, -1, -1, hook))
        elif kind == "heads":
            ids = list(range(len(nodes), len(nodes) + n_heads))
            nodes += [Node("head", stage_layer, h, -1, hook) for h in range(n_heads)]
        else:
            sae = saes[si]
            active = torch.nonzero(acts[si].count() > 0).flatten().tolist()
            node_of = torch.full((sae.d_sae + 1,), -1, dtype=torch.long)
            for k in active:
                node_of[k] = len(nodes)
                nodes.append(Node("feature", stage_layer, int(k), si, hook))
            node_of[sae.d_sae] = len(nodes)
            nodes.append(Node("error", stage_layer, -1, si, hook))
            groups.append(_Group(hook, "sae", sae, node_of))
            continue
        groups.append(_Group(hook, kind, None, torch.tensor(ids, dtype=torch.long)))
    return nodes, groups


# ----------------------------------------------------------------------------------------------------------------
# edits


def _single_edit(group: _Group, table: torch.Tensor, means: dict | None) -> Edit:
    """Variant ``v`` of prompt ``b`` ablates in-group index ``table[b, v]`` (-1: nothing) of ``group``.

    Zero ablation when ``means`` is None, else mean ablation (``means[group.hook]``).
    """
    V = table.shape[1]
    mu = None if means is None else means[group.hook]
    if group.kind == "sae":
        sae = group.sae
        d_sae = sae.d_sae
        W_dec = sae.W_dec
        t = table.to(W_dec.device)
        is_feat = (t >= 0) & (t < d_sae)
        is_err = t == d_sae
        k = t.clamp(0, d_sae - 1)

        def fn(x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            # encode in the SAE's dtype; subtract (and form the error) in x's, so a bf16 SAE never rounds x itself
            dt = edit_dtype(sae, x)
            f = sae.encode(x_in)  # [B, F, d_sae]
            x = x.to(dt)
            fk = f.expand(-1, V, -1).gather(-1, k[..., None])[..., 0].to(dt)
            if mu is not None:
                fk = fk - mu["f"].to(fk)[k]
            out = x - (fk * is_feat)[..., None] * W_dec[k].to(dt)
            e = x - sae.decode(f, x_in).to(dt)
            if mu is not None:
                e = e - mu["e"].to(e)
            return out - is_err[..., None] * e

        return sae_edit(sae, fn)
    n = len(group.node_of)
    onehot = torch.zeros(*table.shape, n)
    valid = table >= 0
    onehot[valid] = torch.nn.functional.one_hot(table[valid], n).float()

    if group.kind == "heads":

        def fn(z: torch.Tensor) -> torch.Tensor:  # [B, F, H, E]
            m = onehot.to(z)[..., None]
            target = 0.0 if mu is None else mu.to(z)[None, None]
            return z * (1 - m) + m * target

        return Edit(group.hook, fn)

    def fn(x: torch.Tensor) -> torch.Tensor:  # whole activation
        m = onehot[..., 0].to(x)[..., None]
        target = 0.0 if mu is None else mu.to(x)[None, None]
        return x * (1 - m) + m * target

    return Edit(group.hook, fn)


def _mask_edit(group: _Group, mask: torch.Tensor, means: dict) -> Edit:
    """Variant ``v`` mean-ablates every in-group index where ``mask[v]`` is True (``mask [V, n_group]``)."""
    mu = means[group.hook]
    if group.kind == "sae":
        sae = group.sae
        W_dec = sae.W_dec
        mf = mask[:, :-1].to(W_dec.device)[None]  # [1, V, d_sae]
        me = mask[:, -1:].to(W_dec.device)[None]  # [1, V, 1]

        def fn(x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            dt = edit_dtype(sae, x)  # as in _single_edit: x is never rounded to the SAE's dtype
            f = sae.encode(x_in)
            x = x.to(dt)
            delta = ((f.to(dt) - mu["f"].to(dt)) * mf) @ W_dec.to(dt)
            e = x - sae.decode(f, x_in).to(dt) - mu["e"].to(x)
            return x - delta - me * e

        return sae_edit(sae, fn)
    m = mask.float()[None]  # [1, V, n]

    if group.kind == "heads":

        def fn(z: torch.Tensor) -> torch.Tensor:
            mm = m.to(z)[..., None]
            return z * (1 - mm) + mm * mu.to(z)[None, None]

        return Edit(group.hook, fn)

    def fn(x: torch.Tensor) -> torch.Tensor:
        mm = m[..., :1].to(x)
        return x * (1 - mm) + mm * mu.to(x)[None, None]

    return Edit(group.hook, fn)


def _answer_logprob(logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``[B, V, d_vocab]`` -> answer log-prob ``[B, V]`` (nats)."""
    ans = answer_ids.to(logits.device)[:, None, None].expand(*logits.shape[:2], 1)
    return logits.float().log_softmax(-1).gather(-1, ans)[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# exact effects


@dataclass
class _Edges:
    """Edges accumulated as flat arrays: upstream node, downstream node, summed contribution, prompts seen."""

    up: list[torch.Tensor] = field(default_factory=list)
    down: list[torch.Tensor] = field(default_factory=list)
    value: list[torch.Tensor] = field(default_factory=list)

    def add(self, up: torch.Tensor, down: torch.Tensor, value: torch.Tensor) -> None:
        self.up.append(up.long().cpu())
        self.down.append(down.long().cpu())
        self.value.append(value.double().cpu())

    def summed(self, n_nodes: int) -> dict[tuple[int, int], tuple[float, int]]:
        """``{(u, d): (sum over prompts, number of prompts with a non-zero value)}``."""
        if not self.up:
            return {}
        u, d, v = torch.cat(self.up), torch.cat(self.down), torch.cat(self.value)
        key = u * n_nodes + d
        uniq, inv = torch.unique(key, return_inverse=True)
        total = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, v)
        count = torch.zeros(len(uniq), dtype=torch.long).index_add_(0, inv, (v != 0).long())
        return {
            (int(k // n_nodes), int(k % n_nodes)): (float(t), int(c))
            for k, t, c in zip(uniq.tolist(), total.tolist(), count.tolist(), strict=True)
        }


@dataclass
class ExactEffects:
    """Exact node effects and edges (means over all prompts; see the module docstring for signs and units).

    Attributes:
        node_effect: float64 ``[N]`` mean of ``m(clean) - m(node ablated)`` (nats).
        node_effect_sq: ``[N]`` mean of its square (for intervals).
        node_active: int64 ``[N]`` prompts where the node was present (active features; every prompt otherwise).
        edges: ``{(u, d): (mean contribution of u to f_d, prompts with a non-zero change)}``.
        clean_metric: float64 ``[n_prompts]`` clean answer log-prob.
    """

    node_effect: torch.Tensor
    node_effect_sq: torch.Tensor
    node_active: torch.Tensor
    edges: dict[tuple[int, int], tuple[float, int]]
    clean_metric: torch.Tensor


def _stage_key(hook: str, n_layers: int) -> int:
    layer, sub = _stage(hook, n_layers)
    return 2 * layer + sub


def _node_index(nodes: list[Node], groups: list[_Group], n_layers: int):
    """Per node: its group index, its index inside the group, and its execution-order key (int64 ``[N]`` each)."""
    gid = torch.full((len(nodes),), -1, dtype=torch.long)
    local = torch.full((len(nodes),), -1, dtype=torch.long)
    for gi, g in enumerate(groups):
        where = torch.nonzero(g.node_of >= 0).flatten()
        gid[g.node_of[where]] = gi
        local[g.node_of[where]] = where
    stage = torch.tensor([_stage_key(nd.hook, n_layers) for nd in nodes], dtype=torch.long)
    return gid, local, stage


def _variant_table(groups: list[_Group], f_clean: dict, structural: list[int]) -> torch.Tensor:
    """int64 ``[B, V]``: per prompt, the nodes ablated one per variant (structural nodes, then its active features;
    -1 pads)."""
    B = next(iter(f_clean.values())).shape[0] if f_clean else 1
    rows: list[list[int]] = [list(structural) for _ in range(B)]
    for g in groups:
        if g.kind != "sae":
            continue
        f = f_clean[g.hook].cpu()
        for b in range(B):
            ids = g.node_of[torch.nonzero(f[b] != 0).flatten()]
            rows[b] += ids[ids >= 0].tolist()
    V = max(len(r) for r in rows)
    table = torch.full((B, V), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        table[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return table


def exact_effects(
    model,
    saes: Sequence[SAE],
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> ExactEffects:
    """Exact effect of ablating each node alone at P on the metric and on every later SAE's features.

    One prefix-cached run per chunk of variants: variant v of prompt b ablates one node (each prompt's own active
    features plus every structural node), reading the metric and every SAE hook at P.

    Returns:
        :class:`ExactEffects`.
    """
    iv = interventions_for(model)
    n_layers = int(model.cfg.n_layers)
    N = len(nodes)
    node_gid, node_local, node_stage = _node_index(nodes, groups, n_layers)
    structural = [i for i, nd in enumerate(nodes) if nd.kind != "feature"]
    sae_groups = [g for g in groups if g.kind == "sae"]
    sae_hooks = sorted({g.hook_in for g in sae_groups})  # where each SAE's features are encoded from
    feature_budget = int(model.cfg.d_vocab) + sum(g.sae.d_sae for g in sae_groups)
    effect_sum = torch.zeros(N, dtype=torch.float64)
    effect_sq = torch.zeros(N, dtype=torch.float64)
    present = torch.zeros(N, dtype=torch.long)
    clean_metric = torch.zeros(task.n_prompts, dtype=torch.float64)
    edges = _Edges()
    batches = task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch)
    for batch in with_progress(batches, task.n_prompts, "circuit: exact node ablations (prompts)", progress):
        clean = iv.clean(batch, read=sae_hooks)
        with torch.no_grad():
            f_clean = {g.hook: g.sae.encode(clean.reads[g.hook_in]).float() for g in sae_groups}
        table = _variant_table(groups, f_clean, structural)
        B, V = table.shape
        chunk = max(1, MAX_FLOATS // max(1, B * feature_budget) - 1)  # + the baseline variant
        if V == 0:  # nothing to ablate: the clean metric alone
            m0 = _answer_logprob(clean.logits[:, None], batch.answer_ids)[:, 0]
            clean_metric[torch.tensor(batch.indices)] = m0.double().cpu()
        for v0 in range(0, V, chunk):
            sub = table[:, v0 : v0 + chunk]
            safe = sub.clamp(min=0)
            edits = []
            for gi, g in enumerate(groups):
                local = torch.where((sub >= 0) & (node_gid[safe] == gi), node_local[safe], -1)
                if bool((local >= 0).any()):
                    edits.append(_single_edit(g, local, None))
            # the clean metric and reads in the same run as the ablations (variant 0), so that an ablation that
            # changes nothing has an effect of exactly 0 and no edge
            run = iv.run_paired(clean, edits, n_variants=sub.shape[1], read=sae_hooks)
            reads = run.reads
            m_clean = _answer_logprob(run.base_logits[:, None], batch.answer_ids)[:, 0]
            if v0 == 0:
                clean_metric[torch.tensor(batch.indices)] = m_clean.double().cpu()
            with torch.no_grad():
                f_base = {g.hook: g.sae.encode(run.base_reads[g.hook_in]).float() for g in sae_groups}
            m = _answer_logprob(run.logits, batch.answer_ids)  # [B, Vc]
            ok = sub >= 0
            eff = (m_clean[:, None] - m).double().cpu()
            ids = sub[ok]
            effect_sum.index_add_(0, ids, eff[ok])
            effect_sq.index_add_(0, ids, eff[ok] ** 2)
            present.index_add_(0, ids, torch.ones_like(ids))
            up_stage = node_stage[safe]
            for g in sae_groups:
                with torch.no_grad():
                    f_abl = g.sae.encode(reads[g.hook_in]).float()  # [B, Vc, d_sae]
                delta = f_base[g.hook][:, None] - f_abl  # contribution of the variant's node
                if run.same is not None:  # a variant that is the baseline run changes no feature (encoding its
                    # rows in another batch shape could round differently)
                    delta = torch.where(run.same.to(delta.device)[..., None], 0.0, delta)
                delta = delta.cpu()
                upstream = ok & (up_stage < _stage_key(g.hook_in, n_layers))
                b_idx, v_idx, k_idx = torch.nonzero(upstream[..., None] & (delta != 0), as_tuple=True)
                d_ids = g.node_of[k_idx]
                keep = d_ids >= 0
                edges.add(sub[b_idx, v_idx][keep], d_ids[keep], delta[b_idx, v_idx, k_idx][keep])
    n = task.n_prompts
    summed = edges.summed(N)
    return ExactEffects(
        node_effect=effect_sum / n,
        node_effect_sq=effect_sq / n,
        node_active=present,
        edges={k: (v / n, c) for k, (v, c) in summed.items()},
        clean_metric=clean_metric,
    )


# ----------------------------------------------------------------------------------------------------------------
# gradient estimates


def _track(t: torch.Tensor) -> torch.Tensor:
    """Make ``t`` keep its gradient: a leaf that requires grad, or a retained non-leaf."""
    if t.requires_grad:
        t.retain_grad()
        return t
    return t.detach().requires_grad_(True)


def _tracking_edits(groups: list[_Group], store: dict, scale: dict | None = None) -> list[Edit]:
    """Edits that expose every node's activation to autograd, unchanged in value.

    At an SAE hook the output is rebuilt as ``decode(f) + e`` from two leaves, ``f = encode(x)`` and
    ``e = x - decode(f)`` (SFC's decomposition: the gradient of a feature goes through its decoder row only, the
    error's is the output's), plus a straight-through ``x - x.detach()`` so that everything upstream still gets
    its total derivative; ``store[hook + "#attached"]`` keeps ``encode(x)`` with its graph to upstream nodes (the
    targets of edge gradients). Heads' z, MLP outputs and embeddings are tracked as they are. With ``scale`` (IG),
    the group named in ``scale`` has its activations replaced by ``(1 - alpha_v) a`` for each variant ``v``.
    """
    edits = []
    for g in groups:
        interp = None if scale is None else scale.get(g.hook)
        if g.kind == "sae":
            sae = g.sae

            def fn(x_in: torch.Tensor, x: torch.Tensor, g=g, sae=sae, interp=interp) -> torch.Tensor:
                x = x.to(edit_dtype(sae, x))  # the error in x's dtype: decode(f) + e is x, unrounded
                f_attached = sae.encode(x_in)
                store[g.hook + "#attached"] = f_attached
                f = f_attached.detach()
                x_in = x_in.detach()  # the bias of a skip / normalising SAE is a constant of the decomposition
                e = x.detach() - sae.decode(f, x_in).to(x.dtype)
                store[g.hook + "#clean"] = (f, e)
                if interp is not None:
                    f, e = interp[None, :, None] * f, interp[None, :, None] * e
                f, e = f.requires_grad_(True), e.requires_grad_(True)
                store[g.hook] = (f, e)
                through = x - x.detach() if x.requires_grad else 0.0
                return sae.decode(f, x_in).to(e.dtype) + e + through

            edits.append(sae_edit(sae, fn))
            continue

        def fn(a: torch.Tensor, g=g, interp=interp) -> torch.Tensor:
            store[g.hook + "#clean"] = (a.detach(),)
            if interp is not None:
                shape = (1, -1) + (1,) * (a.dim() - 2)
                a = (interp.reshape(shape).to(a) * a.detach()).requires_grad_(True)
            else:
                a = _track(a)
            store[g.hook] = (a,)
            return a

        edits.append(Edit(g.hook, fn))
    return edits


def _contributions(g: _Group, tensors: tuple, grads: tuple) -> torch.Tensor:
    """``grad . activation`` per in-group index: ``[B, F, n_group]`` (float64)."""
    with torch.no_grad():
        if g.kind == "sae":
            (f, e), (gf, ge) = tensors, grads
            feat = (gf * f).double()
            err = (ge * e).double().sum(-1, keepdim=True)
            return torch.cat([feat, err], dim=-1)
        (a,), (ga,) = tensors, grads
        if g.kind == "heads":
            return (ga * a).double().sum(-1)
        return (ga * a).double().sum(-1, keepdim=True)


@dataclass
class Estimates:
    """Gradient estimates in the same units and signs as :class:`ExactEffects` (means over all prompts).

    Attributes:
        node_effect: float64 ``[N]``.
        edges: ``{(u, d): mean estimated contribution of u to f_d}``.
        method: ``"atp"`` or ``"ig"`` (with ``steps``).
    """

    node_effect: torch.Tensor
    edges: dict[tuple[int, int], float]
    method: str
    steps: int = 1


def _scatter_nodes(out: torch.Tensor, g: _Group, contrib: torch.Tensor) -> None:
    """Add per-prompt contributions ``[B, n_group]`` of group ``g`` into node totals ``out [N]``."""
    where = torch.nonzero(g.node_of >= 0).flatten()
    out.index_add_(0, g.node_of[where], contrib[:, where.to(contrib.device)].sum(0).cpu())


@torch.enable_grad()  # gradients even when the caller runs under torch.no_grad()
def attribution_estimates(
    model,
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    *,
    edge_downstream: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> Estimates:
    """Attribution patching at P: node effects from one backward pass per batch, edges from one backward pass per
    downstream feature slot (each prompt's ``j``-th active feature of each SAE).

    Args:
        edge_downstream: estimate edges into at most this many active features per prompt and SAE (largest
            activation first); None = all.

    Returns:
        :class:`Estimates` (method ``"atp"``).
    """
    iv = interventions_for(model)
    n_layers = int(model.cfg.n_layers)
    N = len(nodes)
    node_effect = torch.zeros(N, dtype=torch.float64)
    edges = _Edges()
    batches = task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch)
    for batch in with_progress(batches, task.n_prompts, "circuit: attribution patching (prompts)", progress):
        clean = iv.clean(batch)
        store: dict = {}
        logits, _ = iv.run(clean, _tracking_edits(groups, store), grad=True)
        m = _answer_logprob(logits, batch.answer_ids)  # [B, 1]
        tracked = [(g, store[g.hook]) for g in groups]
        flat = [t for _, ts in tracked for t in ts]
        grads = torch.autograd.grad(m.sum(), flat, retain_graph=True, allow_unused=True)
        i = 0
        for g, ts in tracked:
            gs = tuple(torch.zeros_like(t) if gr is None else gr for t, gr in zip(ts, grads[i : i + len(ts)], strict=True))
            i += len(ts)
            _scatter_nodes(node_effect, g, _contributions(g, ts, gs)[:, 0])
        # edges: d_f(downstream)/d(upstream) . upstream, one backward per downstream slot
        for gd_i, (gd, _) in enumerate(tracked):
            if gd.kind != "sae":
                continue
            f_d = store[gd.hook + "#attached"]
            ups = [(g, ts) for g, ts in tracked[:gd_i] if _stage_key(g.hook, n_layers) < _stage_key(gd.hook_in, n_layers)]
            if not ups:
                continue
            fd = f_d[:, 0]  # [B, d_sae]
            active = (fd.detach() != 0) & (gd.node_of[: gd.sae.d_sae] >= 0).to(fd.device)[None]
            size = fd.detach().abs()
            order = torch.argsort(torch.where(active, size, torch.full_like(size, -1.0)), dim=1, descending=True)
            n_slots = int(active.sum(1).max()) if active.any() else 0
            if edge_downstream is not None:
                n_slots = min(n_slots, edge_downstream)
            up_flat = [t for _, ts in ups for t in ts]
            for j in range(n_slots):
                k = order[:, j]
                valid = active.gather(1, k[:, None])[:, 0]
                if not bool(valid.any()):
                    continue
                target = (fd.gather(1, k[:, None])[:, 0] * valid).sum()
                gr = torch.autograd.grad(target, up_flat, retain_graph=True, allow_unused=True)
                i = 0
                d_ids = gd.node_of[k.cpu()]
                for g, ts in ups:
                    gs = tuple(torch.zeros_like(t) if x is None else x for t, x in zip(ts, gr[i : i + len(ts)], strict=True))
                    i += len(ts)
                    c = _contributions(g, ts, gs)[:, 0].cpu()  # [B, n_group]
                    where = torch.nonzero(g.node_of >= 0).flatten()
                    vals = c[:, where]
                    b_idx, w_idx = torch.nonzero((vals != 0) & valid.cpu()[:, None], as_tuple=True)
                    edges.add(g.node_of[where[w_idx]], d_ids[b_idx], vals[b_idx, w_idx])
        del store, logits
    n = task.n_prompts
    summed = edges.summed(N)
    return Estimates(node_effect / n, {k: v / n for k, (v, _) in summed.items()}, "atp")


@torch.enable_grad()  # gradients even when the caller runs under torch.no_grad()
def integrated_gradient_estimates(
    model,
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    *,
    steps: int = 10,
    edge_targets: Sequence[int] = (),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> Estimates:
    """Integrated gradients at P, one submodule (hook group) at a time, as Sparse Feature Circuits.

    For each group its nodes go from clean (alpha 0) to ablated (alpha 1) together as ``(1 - alpha) a`` at the
    midpoints ``alpha = (i + 0.5) / steps`` (one run with ``steps`` variants), every later node recomputed; the mean
    gradient times the clean activation estimates each node's effect. Edge estimates into the feature nodes
    ``edge_targets`` use the same runs with the downstream activation as the metric.

    Args:
        steps: interpolation points (more = closer to the path integral).
        edge_targets: feature node ids whose incoming edges are estimated (each costs one backward per group).

    Returns:
        :class:`Estimates` (method ``"ig"``).

    Raises:
        ValueError: ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    iv = interventions_for(model)
    n_layers = int(model.cfg.n_layers)
    N = len(nodes)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    node_effect = torch.zeros(N, dtype=torch.float64)
    edges = _Edges()
    targets = [int(t) for t in edge_targets]
    gid, local, _ = _node_index(nodes, groups, n_layers)
    batches = task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch)
    for batch in with_progress(batches, task.n_prompts, "circuit: integrated gradients (prompts)", progress):
        clean = iv.clean(batch)
        for g in groups:
            store: dict = {}
            scale = {g.hook: 1 - alphas}
            logits, _ = iv.run(clean, _tracking_edits(groups, store, scale=scale), n_variants=steps, grad=True)
            m = _answer_logprob(logits, batch.answer_ids)  # [B, steps]
            ts = store[g.hook]
            grads = torch.autograd.grad(m.sum(), ts, retain_graph=bool(targets), allow_unused=True)
            gs = tuple(torch.zeros_like(t) if x is None else x for t, x in zip(ts, grads, strict=True))
            clean_ts = store[g.hook + "#clean"]  # the clean activation a, [B, 1, ...]
            mean_gs = tuple(x.mean(1, keepdim=True) for x in gs)
            _scatter_nodes(node_effect, g, _contributions(g, clean_ts, mean_gs)[:, 0])
            for t_id in targets:
                gt = groups[int(gid[t_id])]
                if _stage_key(gt.hook_in, n_layers) <= _stage_key(g.hook, n_layers):
                    continue
                f_d = store[gt.hook + "#attached"][..., int(local[t_id])]  # [B, steps]
                grads = torch.autograd.grad(f_d.sum(), ts, retain_graph=True, allow_unused=True)
                gs = tuple(torch.zeros_like(t) if x is None else x for t, x in zip(ts, grads, strict=True))
                c = _contributions(g, clean_ts, tuple(x.mean(1, keepdim=True) for x in gs))[:, 0].cpu()
                where = torch.nonzero(g.node_of >= 0).flatten()
                vals = c[:, where]
                b_idx, w_idx = torch.nonzero(vals != 0, as_tuple=True)
                edges.add(g.node_of[where[w_idx]], torch.full_like(b_idx, t_id), vals[b_idx, w_idx])
            del store, logits
    n = task.n_prompts
    summed = edges.summed(N)
    return Estimates(node_effect / n, {k: v / n for k, (v, _) in summed.items()}, "ig", steps)


# ----------------------------------------------------------------------------------------------------------------
# agreement, faithfulness, virtual weights


def _ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank(method="average").to_numpy()


def agreement(estimate: np.ndarray, exact: np.ndarray, *, top: int = 20) -> dict[str, float]:
    """How well an estimate stands in for the exact values (same entries, same order).

    Returns:
        ``{"n", "spearman", "sign_agreement", "top_overlap", "top_sign_agreement", "top"}``: Spearman rank
        correlation; the fraction of entries with ``|exact| > 1e-6 * max|exact|`` whose signs agree (relative, so
        float rounding noise around 0 never counts, whatever the scale of the effects); the share of the exact
        top-``top`` by magnitude found in the estimate's top-``top``; the fraction of the exact top-``top`` whose
        estimate has the right sign (the largest effects are what a circuit is read from, and thousands of tiny
        entries can hide that an estimate gets them wrong). NaN where undefined, e.g. fewer than 3 entries or a
        constant vector.
    """
    est, ex = np.asarray(estimate, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    n = int(ex.size)
    out = {"n": n, "top": int(min(top, n))}
    if n < 3 or np.std(est) == 0 or np.std(ex) == 0:
        out["spearman"] = float("nan")
    else:
        out["spearman"] = float(np.corrcoef(_ranks(est), _ranks(ex))[0, 1])
    scale = float(np.max(np.abs(ex))) if n else 0.0
    nz = np.abs(ex) > SIGN_TOLERANCE * scale
    out["sign_agreement"] = float(np.mean(np.sign(est[nz]) == np.sign(ex[nz]))) if nz.any() else float("nan")
    k = out["top"]
    if k == 0:
        out["top_overlap"] = out["top_sign_agreement"] = float("nan")
    else:
        top_exact = np.argsort(-np.abs(ex), kind="stable")[:k]
        a = set(top_exact.tolist())
        b = set(np.argsort(-np.abs(est), kind="stable")[:k].tolist())
        out["top_overlap"] = len(a & b) / k
        out["top_sign_agreement"] = float(np.mean(np.sign(est[top_exact]) == np.sign(ex[top_exact])))
    return out


def node_means(model, task: Task, groups: list[_Group], *, max_tokens=DEFAULT_MAX_TOKENS,
               max_batch=DEFAULT_MAX_BATCH) -> dict:
    """Mean activation at P over the task's prompts of every group (for mean ablation).

    Returns:
        ``{hook: {"f": [d_sae], "e": [d_out]}}`` for SAE groups, ``{hook: tensor}`` (``[n_heads, d_head]`` for heads,
        the activation's shape otherwise) for the rest.
    """
    iv = interventions_for(model)
    hooks = _group_reads(groups)
    sums: dict[str, Any] = {}
    for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
        reads = iv.clean(batch, read=hooks).reads
        with torch.no_grad():
            for g in groups:
                x = reads[g.hook].float()
                if g.kind == "sae":
                    x_in, x = _sae_io(g, {h: v.float() for h, v in reads.items()})
                    f = g.sae.encode(x_in.to(g.sae.W_dec.dtype)).float()
                    e = x - g.sae.decode(f, x_in.to(g.sae.W_dec.dtype)).float()
                    part = {"f": f.sum(0), "e": e.sum(0)}
                    sums[g.hook] = part if g.hook not in sums else {k: sums[g.hook][k] + part[k] for k in part}
                else:
                    sums[g.hook] = x.sum(0) + (sums[g.hook] if g.hook in sums else 0)
    n = task.n_prompts
    return {h: ({k: v / n for k, v in s.items()} if isinstance(s, dict) else s / n) for h, s in sums.items()}


def corpus_node_means(model, token_rows: Sequence[Sequence[int]], groups: list[_Group], *,
                      max_tokens=DEFAULT_MAX_TOKENS, max_batch=DEFAULT_MAX_BATCH, progress: bool | None = None) -> dict:
    """Mean activation of every group over every real token of ``token_rows`` (special tokens and padding skipped),
    in :func:`node_means`'s format: the mean-ablation baseline of faithfulness and completeness.

    Why not the task's prompts at P: when every prompt has the same answer (``."`` closing a quote), their mean at P
    is itself an "average prompt" that predicts the answer, so mean-ablating every node does not remove the
    behaviour and faithfulness is undefined. Corpus tokens are the mean the pipeline's mean ablation uses.

    Args:
        token_rows: token lists (corpus documents, BOS first), each at most the model's context long.

    Raises:
        ValueError: no token position to average.
    """
    from saecircuits.analysis.corpus.statistics import counted_token_mask, special_ids_of
    from saecircuits.models.hooks import _device_of, n_ctx_of, pad_id_of, row_batches

    iv = interventions_for(model)
    hooks = _group_reads(groups)
    special = special_ids_of(model)
    sums: dict[str, Any] = {}
    count = 0
    batches = row_batches(token_rows, pad_id_of(model), max_tokens=max_tokens, max_batch=max_batch,
                          device=_device_of(model), n_ctx=n_ctx_of(model))
    for batch in with_progress(batches, len(token_rows), "circuit: mean of every node over the corpus (documents)",
                               progress):
        mask = counted_token_mask(batch.tokens, batch.positions + 1, special)  # the positions statistics count
        reads = iv.read_all(batch.tokens, hooks)
        with torch.no_grad():
            for g in groups:
                x = reads[g.hook][mask.to(reads[g.hook].device)].float()  # [n_tokens, *shape]
                if g.kind == "sae":
                    at = {h: reads[h][mask.to(reads[h].device)].float() for h in {g.hook, g.hook_in}}
                    x_in, x = _sae_io(g, at)
                    f = g.sae.encode(x_in.to(g.sae.W_dec.dtype)).float()
                    part = {"f": f.sum(0), "e": (x - g.sae.decode(f, x_in.to(g.sae.W_dec.dtype)).float()).sum(0)}
                    sums[g.hook] = part if g.hook not in sums else {k: sums[g.hook][k] + part[k] for k in part}
                else:
                    sums[g.hook] = x.sum(0) + (sums[g.hook] if g.hook in sums else 0)
        count += int(mask.sum())
    if count == 0:
        raise ValueError("corpus_node_means got no token positions (empty rows, or only special tokens)")
    return {h: ({k: v / count for k, v in s.items()} if isinstance(s, dict) else s / count) for h, s in sums.items()}


def faithfulness_curve(
    model,
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    order: Sequence[int],
    sizes: Sequence[int],
    *,
    means: dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> pd.DataFrame:
    """Faithfulness and completeness of the circuits made of the first ``n`` nodes of ``order`` for each ``n``.

    With m the mean answer log-prob at P: ``m(M)`` clean, ``m(empty)`` every node mean-ablated, ``m(C)`` every
    node outside C mean-ablated, ``m(M \\ C)`` the nodes of C mean-ablated. faithfulness = (m(C) - m(empty)) /
    (m(M) - m(empty)) (1 = the circuit alone does the whole job); completeness = (m(M \\ C) - m(empty)) /
    (m(M) - m(empty)) (what is left without the circuit; 0 = nothing, so the circuit is complete). Sparse Feature
    Circuits, section 3. In losses (``-m``) both are loss recovered, with "everything mean-ablated" as the
    ablation, so they come from the one formula, :func:`saecircuits.analysis.quality.reconstruction.loss_recovered`: NaN,
    with ``undefined_reason`` set, when mean-ablating every node does not clearly lower the answer's log-prob
    (a mean drop under 0.01 nats, or a 95% interval that includes 0), since there is then nothing to explain.

    Returns:
        DataFrame with columns ``n_nodes``, ``m_circuit``, ``m_complement_ablated``, ``faithfulness``,
        ``completeness`` (with ``faithfulness_ci95`` and ``completeness_ci95``, paired-bootstrap ``[lo, hi]``),
        ``undefined_reason`` (None when defined), plus ``m_clean`` and ``m_empty`` (nats).
    """
    iv = interventions_for(model)
    means = means if means is not None else node_means(model, task, groups, max_tokens=max_tokens,
                                                       max_batch=max_batch)
    N = len(nodes)
    sizes = [int(s) for s in sizes]
    # variant 0: everything ablated; then per size: outside C ablated, C ablated
    masks = torch.zeros(1 + 2 * len(sizes), N, dtype=torch.bool)
    masks[0] = True
    order_t = torch.as_tensor(list(order), dtype=torch.long)
    for j, s in enumerate(sizes):
        inside = torch.zeros(N, dtype=torch.bool)
        inside[order_t[:s]] = True
        masks[1 + 2 * j] = ~inside
        masks[2 + 2 * j] = inside
    V = masks.shape[0]
    n = task.n_prompts
    per_prompt = torch.zeros(n, V, dtype=torch.float64)  # answer log-prob under each variant
    clean_lp = torch.zeros(n, dtype=torch.float64)
    for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
        clean = iv.clean(batch)
        edits = []
        for g in groups:
            gm = torch.zeros(V, len(g.node_of), dtype=torch.bool)
            where = torch.nonzero(g.node_of >= 0).flatten()
            gm[:, where] = masks[:, g.node_of[where]]
            edits.append(_mask_edit(g, gm, means))
        # m(M) in the same run as the ablations: the full circuit (nothing ablated) has faithfulness exactly 1
        run = iv.run_paired(clean, edits, n_variants=V)
        idx = torch.as_tensor(batch.indices)
        per_prompt[idx] = _answer_logprob(run.logits, batch.answer_ids).double().cpu()
        clean_lp[idx] = _answer_logprob(run.base_logits[:, None], batch.answer_ids).double().cpu()[:, 0]
    m = per_prompt.mean(0)
    m_clean, m_empty = float(clean_lp.mean()), float(m[0])
    rows = []
    for j, s in enumerate(sizes):
        # losses are -log-probs: faithfulness = (L_empty - L_C) / (L_empty - L_clean), loss recovered by C alone
        faith = loss_recovered(-clean_lp, -per_prompt[:, 1 + 2 * j], -per_prompt[:, 0],
                               ablation="mean-ablating every node")
        comp = loss_recovered(-clean_lp, -per_prompt[:, 2 + 2 * j], -per_prompt[:, 0],
                              ablation="mean-ablating every node")
        rows.append({
            "n_nodes": s, "m_circuit": float(m[1 + 2 * j]), "m_complement_ablated": float(m[2 + 2 * j]),
            "faithfulness": faith.value, "faithfulness_ci95": [faith.low, faith.high],
            "completeness": comp.value, "completeness_ci95": [comp.low, comp.high],
            "undefined_reason": faith.reason,
            "m_clean": m_clean, "m_empty": m_empty,
        })
    return pd.DataFrame(rows)


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


# ----------------------------------------------------------------------------------------------------------------
# the whole circuit


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


def _ci95(mean: torch.Tensor, mean_sq: torch.Tensor, n: int) -> torch.Tensor:
    """Half-width of a normal-approximation 95% interval of a mean over ``n`` prompts from its first two moments."""
    if n < 2:
        return torch.full_like(mean, float("nan"))
    var = (mean_sq - mean**2).clamp_min(0) * n / (n - 1)
    return 1.96 * (var / n).sqrt()


def _top_tokens(model, saes: Sequence[SAE], nodes: list[Node], k: int = 5) -> dict[int, list[str]]:
    from saecircuits.analysis.ablations.feature_effects import _feature_write
    from saecircuits.models.norms import readout_of
    from saecircuits.models.tokens import token_string

    readout = readout_of(model)
    out: dict[int, list[str]] = {}
    for si, sae in enumerate(saes):
        ids = [i for i, nd in enumerate(nodes) if nd.kind == "feature" and nd.sae == si]
        if not ids:
            continue
        try:
            write = _feature_write(model, sae)
        except ValueError:
            continue
        feats = torch.tensor([nodes[i].index for i in ids])
        for j0 in range(0, len(ids), 256):
            with torch.no_grad():
                logits = readout.vocab_logits(write[feats[j0 : j0 + 256]])
            top = torch.topk(logits, k, dim=-1).indices
            for i, row in zip(ids[j0 : j0 + 256], top.tolist(), strict=True):
                out[i] = [token_string(model.tokenizer, t) for t in row]
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
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> CircuitResult:
    """The feature circuit behind the answer at P across every SAE of the run (see the module docstring).

    Args:
        model, saes, task: the model, its SAEs (one per hook), the behaviour.
        acts: per SAE, :func:`~saecircuits.analysis.ablations.feature_effects.feature_activations` (computed when None).
        ig_steps: integrated-gradients steps (0 skips IG).
        ig_edge_targets: IG edge estimates into this many downstream feature nodes (largest exact effect).
        target_faithfulness: without ``node_threshold``, the circuit is the smallest swept size whose faithfulness
            reaches this (else the most faithful size).
        node_threshold: keep the nodes with ``|exact effect| >= node_threshold`` (nats) instead.
        edge_fraction: circuit edges are those among circuit nodes with ``|exact| >= edge_fraction x`` the largest.
        sizes: circuit sizes swept for the faithfulness/completeness curves (default 1, 2, 5, 10, 20, 50, ...).
        corpus_rows: corpus documents (token lists); mean ablation then uses each node's mean over their tokens
            (:func:`corpus_node_means`, what the pipeline passes). None: the mean at P over the task's prompts
            (:func:`node_means`, as Sparse Feature Circuits on a task whose prompts have different answers).
        progress: progress bars.

    Returns:
        :class:`CircuitResult`.

    Raises:
        ValueError: no SAE, or two SAEs on one hook.
    """
    if not saes:
        raise ValueError("find_circuit needs at least one SAE")
    acts = [activations_or_compute(model, s, task, None if acts is None else acts[i], max_tokens=max_tokens,
                                   max_batch=max_batch) for i, s in enumerate(saes)]
    nodes, groups = circuit_nodes(model, saes, acts)
    kw = dict(max_tokens=max_tokens, max_batch=max_batch)
    exact = exact_effects(model, saes, task, nodes, groups, progress=progress, **kw)
    atp = attribution_estimates(model, task, nodes, groups, progress=progress, **kw)
    order = torch.argsort(exact.node_effect.abs(), descending=True).tolist()
    ig = None
    if ig_steps > 0:
        targets = [i for i in order if nodes[i].kind == "feature" and nodes[i].sae > 0
                   or (nodes[i].kind == "feature" and _stage_key(nodes[i].hook, int(model.cfg.n_layers)) > 0)]
        ig = integrated_gradient_estimates(model, task, nodes, groups, steps=ig_steps,
                                           edge_targets=targets[:ig_edge_targets], progress=progress, **kw)
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
    N = len(nodes)
    if sizes is None:
        sizes = [s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if s < N] + [N]
    if corpus_rows is not None:
        means = corpus_node_means(model, corpus_rows, groups, progress=progress, **kw)
        mean_rule = f"each node's mean over the tokens of {len(corpus_rows)} corpus documents"
    else:
        means = node_means(model, task, groups, **kw)
        mean_rule = f"each node's mean at P over the task's {task.n_prompts} prompts"
    curve = faithfulness_curve(model, task, nodes, groups, order, sizes, means=means, **kw)
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
    rows = []
    for (u, d), (val, n) in pairs[:top]:
        nu, nd = nodes[u], nodes[d]
        try:
            vw = virtual_weights(model, saes[nu.sae], saes[nd.sae], [nu.index], [nd.index])
        except ValueError:
            continue
        rows.append({"source": nu.label, "target": nd.label, "exact": val, "n_prompts": n,
                     "virtual_raw": float(vw["raw"][0, 0]), "virtual_cosine": float(vw["cosine"][0, 0])})
    return rows
