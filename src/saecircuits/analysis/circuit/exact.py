"""Exact node effects and edges at P: every node ablated alone, batched as variants of position P by the prefix-
cached interventions (Sparse Feature Circuits' quantities, measured instead of estimated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from saecircuits.analysis.circuit.nodes import (
    Node,
    _answer_logprob,
    _final_read,
    _Group,
    _node_index,
    _paired_answer_logprob,
    _single_edit,
    _stage_key,
    ablation_values,
    drain,
)
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches, with_progress
from saecircuits.models.interventions import interventions_for
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

MAX_FLOATS = 1 << 24
"""Budget per chunk of variants: ``B x V x (d_model + sum of the SAEs' d_in + the largest d_sae)`` floats (the
final residual stream, the SAE inputs read, the codes of the edge rows; with ``d_vocab`` for the logits in place of
``d_model`` on the bridge backend, whose runs return them)."""

COLUMN_SHARE = 0.5
"""The edges into an SAE's features are encoded from its node features' encoder columns alone when they are at most
this share of ``d_sae`` (and its activation is per feature): a gathered ``[d_in, n]`` block of ``W_enc`` costs more
than it saves when ``n`` is near ``d_sae``."""


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

    def gathered(self, what: str = "edge contributions") -> _Edges:
        """Every rank's contributions of a sharded run, in rank order (``self`` in one process)."""
        from saecircuits.distributed import gather_rows, world

        if world()[1] <= 1:
            return self
        empty = {"up": torch.long, "down": torch.long, "value": torch.float64}
        return _Edges(*([gather_rows(torch.cat(getattr(self, name)) if getattr(self, name)
                                     else torch.zeros(0, dtype=dtype), what)] for name, dtype in empty.items()))

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


def _node_columns(g: _Group) -> torch.Tensor | None:
    """int64 ``[n]``: the feature columns of SAE group ``g`` that are nodes (ascending), when encoding those alone
    is exact and cheaper (:data:`COLUMN_SHARE`); None: encode every feature (a TopK SAE compares them all)."""
    cols = torch.nonzero(g.node_of[: g.sae.d_sae] >= 0).flatten()
    if not g.sae.per_feature_activation or len(cols) > COLUMN_SHARE * g.sae.d_sae:
        return None
    return cols


def _encode_columns(sae: SAE, x: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """``encode(x)`` ``[..., d_sae]``, or its columns ``cols`` ``[..., n]`` (:meth:`~SAE.encode_features`)."""
    return sae.encode(x) if cols is None else sae.encode_features(x, cols)


def _variant_table(groups: list[_Group], f_clean: dict, structural: list[int], cols: dict | None = None
                   ) -> torch.Tensor:
    """int64 ``[B, V]``: per prompt, the nodes ablated one per variant (structural nodes, then its active features;
    -1 pads). ``f_clean[hook]`` holds the codes of the columns ``cols[hook]`` (None or absent: every feature)."""
    B = next(iter(f_clean.values())).shape[0] if f_clean else 1
    rows: list[list[int]] = [list(structural) for _ in range(B)]
    for g in groups:
        if g.kind != "sae":
            continue
        f = f_clean[g.hook].cpu()
        c = None if cols is None else cols.get(g.hook)
        for b in range(B):
            k = torch.nonzero(f[b] != 0).flatten()
            ids = g.node_of[k if c is None else c[k]]
            rows[b] += ids[ids >= 0].tolist()
    V = max(len(r) for r in rows)
    table = torch.full((B, V), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        table[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return table


def _embedding_values(model, task: Task, groups: list[_Group], means: dict | None, **kw) -> dict:
    """:func:`~.nodes.ablation_values` of ``means``, or of the embeddings' means at P over the task's prompts."""
    if means is None:
        from saecircuits.analysis.circuit.faithfulness import node_means
        from saecircuits.analysis.circuit.nodes import MEAN_ABLATED_HOOKS

        means = node_means(model, task, [g for g in groups if g.hook in MEAN_ABLATED_HOOKS], **kw)
    return ablation_values(groups, means)


def exact_effects(
    model,
    saes: Sequence[SAE],
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    *,
    means: dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
) -> ExactEffects:
    """Exact effect of ablating each node alone at P on the metric and on every later SAE's features.

    One prefix-cached run per chunk of variants: variant v of prompt b ablates one node (each prompt's own active
    features plus every structural node), reading the metric and every SAE hook at P. The metric is unembedded a
    few rows at a time (:func:`~.nodes._paired_answer_logprob`: the baseline and only the variants that differ from
    it), so a chunk holds as many variants as its activations allow (:data:`MAX_FLOATS`; each chunk re-runs the
    baseline and re-encodes its rows for the edges; the codes of an SAE's shared input are kept across chunks), and
    the edges into an SAE whose activation is per feature are encoded from its node features' columns alone
    (:data:`COLUMN_SHARE`).

    Args:
        means: ``{hook: mean}`` of the groups (:func:`~saecircuits.analysis.circuit.node_means`'s format): the token
            and position embeddings are ablated to their mean (:func:`~.nodes.ablation_values`); None: their mean at
            P over the task's prompts.
        shard: split the prompt batches over the ranks of a sharded run (:mod:`saecircuits.distributed`; default:
            when a process group with more than one rank is initialised, every rank calling with the same
            arguments). Each rank computes the batches ``b % world_size == rank`` of the single-process batching;
            the float64 sums and counts are reduced and the per-edge contributions gathered, so every rank returns
            one process's result (sums in another order: float64 rounding, ~1e-16 relative).

    Returns:
        :class:`ExactEffects`.
    """
    return drain(_exact_steps(model, saes, task, nodes, groups, means=means, max_tokens=max_tokens,
                              max_batch=max_batch, progress=progress, shard=shard))


def _exact_steps(
    model,
    saes: Sequence[SAE],
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    *,
    means: dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
):
    """:func:`exact_effects` one prompt batch per step: a generator whose return value is the result (for
    :func:`~saecircuits.analysis.circuit.nodes.lockstep`)."""
    from saecircuits.distributed import is_sharded, is_writer, my_batches, sum_disjoint

    iv = interventions_for(model)
    n_layers = int(model.cfg.n_layers)
    N = len(nodes)
    values = _embedding_values(model, task, groups, means, max_tokens=max_tokens, max_batch=max_batch)
    node_gid, node_local, node_stage = _node_index(nodes, groups, n_layers)
    structural = [i for i, nd in enumerate(nodes) if nd.kind != "feature"]
    sae_groups = [g for g in groups if g.kind == "sae"]
    sae_hooks = sorted({g.hook_in for g in sae_groups})  # where each SAE's features are encoded from
    final = _final_read(iv)  # the metric from the last residual stream, unembedded in row chunks (engine)
    reads = sae_hooks + ([final] if final is not None else [])
    cols = {g.hook: _node_columns(g) for g in sae_groups}
    feature_budget = ((int(model.cfg.d_vocab) if final is None else int(model.cfg.d_model))
                      + sum(g.sae.d_in for g in sae_groups) + max((g.sae.d_sae for g in sae_groups), default=0))
    effect_sum = torch.zeros(N, dtype=torch.float64)
    effect_sq = torch.zeros(N, dtype=torch.float64)
    present = torch.zeros(N, dtype=torch.long)
    clean_metric = torch.zeros(task.n_prompts, dtype=torch.float64)
    edges = _Edges()
    sharded = is_sharded(shard)
    batches = list(my_batches(task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch), sharded))
    n_mine = sum(len(b.indices) for b in batches)
    for batch in with_progress(iter(batches), n_mine, "circuit: exact node ablations (prompts)",
                               progress if is_writer() else False):
        clean = iv.clean(batch, read=sae_hooks)
        with torch.no_grad():
            f_clean = {g.hook: _encode_columns(g.sae, clean.reads[g.hook_in], cols[g.hook]).float()
                       for g in sae_groups}
        table = _variant_table(groups, f_clean, structural, cols)
        B, V = table.shape
        chunk = max(1, MAX_FLOATS // max(1, B * feature_budget) - 1)  # + the baseline variant
        memos: dict[int, dict] = {gi: {} for gi in range(len(groups))}  # per group, its codes kept across chunks
        base_memo: dict = {}  # the baseline's metric, kept across chunks
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
                    edits.append(_single_edit(g, local, values, memos[gi]))
            # the clean metric and reads in the same run as the ablations (variant 0), so that an ablation that
            # changes nothing has an effect of exactly 0 and no edge
            run = iv.run_paired(clean, edits, n_variants=sub.shape[1], read=reads, logits=final is None)
            # each chunk's own baseline: a chunk restarts at its earliest edited hook, and the baseline recomputed
            # from another restart point differs by the rounding of the path (bf16: ~5e-4 nats); its unembedding
            # is reused only where its residual stream is the same bit for bit
            m_clean, m = _paired_answer_logprob(iv, run, final, batch.answer_ids, base_memo)  # [B], [B, Vc]
            if v0 == 0:
                clean_metric[torch.tensor(batch.indices)] = m_clean.double().cpu()
            ok = sub >= 0
            eff = (m_clean[:, None] - m).double().cpu()
            ids = sub[ok]
            effect_sum.index_add_(0, ids, eff[ok])
            effect_sq.index_add_(0, ids, eff[ok] ** 2)
            present.index_add_(0, ids, torch.ones_like(ids))
            up_stage = node_stage[safe]
            for g in sae_groups:
                # edges into g come from the variants whose node is upstream of it: only their rows are encoded
                upstream = ok & (up_stage < _stage_key(g.hook_in, n_layers))
                if run.same is not None:  # a variant that is the baseline run changes no feature (encoding its
                    # rows in another batch shape could round differently)
                    upstream = upstream & ~run.same.cpu()
                b_up, v_up = torch.nonzero(upstream, as_tuple=True)
                if not len(b_up):
                    continue
                x_up = run.reads[g.hook_in]
                x_up = x_up[b_up.to(x_up.device), v_up.to(x_up.device)]
                c = cols[g.hook]
                with torch.no_grad():  # the baseline's rows and the upstream variants' in one encode (one pass
                    # over W_enc: a few rows cost about as much as a hundred)
                    f_both = _encode_columns(g.sae, torch.cat([run.base_reads[g.hook_in].to(x_up), x_up]), c).float()
                f_base, f_abl = f_both[:B], f_both[B:]  # [B, d_sae or n], [n_up, d_sae or n]
                delta = (f_base[b_up.to(f_abl.device)] - f_abl).cpu()  # contribution of the variant's node
                r_idx, k_idx = torch.nonzero(delta != 0, as_tuple=True)
                d_ids = g.node_of[k_idx if c is None else c[k_idx]]
                keep = d_ids >= 0
                edges.add(sub[b_up[r_idx], v_up[r_idx]][keep], d_ids[keep], delta[r_idx, k_idx][keep])
        yield
    if sharded:  # every rank's sums, counts and edge contributions (its prompts' clean metric, 0 elsewhere)
        effect_sum, effect_sq = sum_disjoint(effect_sum, "node effects"), sum_disjoint(effect_sq, "node effects")
        present = sum_disjoint(present, "node counts")
        clean_metric = sum_disjoint(clean_metric, "clean metrics")
        edges = edges.gathered("exact edges")
    n = task.n_prompts
    summed = edges.summed(N)
    return ExactEffects(
        node_effect=effect_sum / n,
        node_effect_sq=effect_sq / n,
        node_active=present,
        edges={k: (v / n, c) for k, (v, c) in summed.items()},
        clean_metric=clean_metric,
    )
