"""Faithfulness and completeness of circuits of growing size, by mean ablation (Sparse Feature Circuits, Marks et
al. 2024), and the node means they ablate to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from saecircuits.analysis.circuit.nodes import (
    Node,
    _final_read,
    _Group,
    _group_reads,
    _group_specs,
    _mask_edit,
    _paired_answer_logprob,
    _sae_io,
    drain,
)
from saecircuits.analysis.quality.reconstruction import loss_recovered
from saecircuits.distributed import (
    gather_rows,
    is_sharded,
    is_writer,
    my_batches,
    reduce,
    sum_disjoint,
    world,
)
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches, with_progress
from saecircuits.models.interventions import interventions_for
from saecircuits.tasks.base import Task


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
                    part = _sae_sums(g.sae, *_sae_io(g, {h: v.float() for h, v in reads.items()}))
                    sums[g.hook] = part if g.hook not in sums else {k: sums[g.hook][k] + part[k] for k in part}
                else:
                    sums[g.hook] = x.sum(0) + (sums[g.hook] if g.hook in sums else 0)
    return _means_of(sums, task.n_prompts)


def _means_of(sums: dict[str, Any], count: int) -> dict:
    """``{hook: tensor or {"f", "e"}}`` sums over ``count`` rows -> the means, in the one format of every pass."""
    return {h: ({k: v / count for k, v in s.items()} if isinstance(s, dict) else s / count) for h, s in sums.items()}


def _sae_error(sae, f: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x - f @ W_dec - bias`` in ``f``'s dtype (float32, or float64 for the circuit across positions' means): the
    SAE error of one row, or of sums or means of rows (the decode ``f @ W_dec + bias(x_in)`` is affine in ``f``, so
    the error of a sum is the sum of the errors, up to rounding). The one formula of the error node's mean,
    whichever pass gives the sums."""
    return x - f @ sae.W_dec.detach().to(f.dtype) - bias


def _sae_sums(sae, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"f": sum of encode(x_in), "e": sum of the errors x - decode(f, x_in)}`` over the rows of ``x_in [n, d_in]``,
    ``x [n, d_out]`` (float32).

    The decode is affine in ``f`` (``f @ W_dec + bias(x_in)``), so the errors' sum is ``sum x - (sum f) @ W_dec -
    sum bias``: one vector-matrix product instead of decoding every row (a dense ``[n, d_sae] x [d_sae, d_out]``
    matmul, as costly as the encode). Equal to summing the per-row errors up to float rounding.
    """
    x_in = x_in.to(sae.W_dec.dtype)
    f_sum = sae.encode(x_in).float().sum(0)
    bias = sae.decoder_bias(x_in if sae.decode_needs_input else None).float()
    bias_sum = bias.sum(0) if bias.dim() > 1 else bias * x.shape[0]
    return {"f": f_sum, "e": _sae_error(sae, f_sum, x.sum(0), bias_sum)}


def corpus_node_means(model, token_rows: Sequence[Sequence[int]], groups: list[_Group], *,
                      max_tokens=DEFAULT_MAX_TOKENS, max_batch=DEFAULT_MAX_BATCH, progress: bool | None = None,
                      shard: bool | None = None) -> dict:
    """Mean activation of every group over every real token of ``token_rows`` (special tokens and padding skipped),
    in :func:`node_means`'s format: the mean-ablation baseline of faithfulness and completeness.

    Why not the task's prompts at P: when every prompt has the same answer (``."`` closing a quote), their mean at P
    is itself an "average prompt" that predicts the answer, so mean-ablating every node does not remove the
    behaviour and faithfulness is undefined. Corpus tokens are the mean the pipeline's mean ablation uses.

    Args:
        token_rows: token lists (corpus documents, BOS first), each at most the model's context long.
        shard: split the document batches over the ranks of a sharded run (default: when a process group with
            more than one rank is initialised); each batch's sums are gathered and added up in one process's
            batch order, so the means are one process's, bit for bit.

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
    batches = list(row_batches(token_rows, pad_id_of(model), max_tokens=max_tokens, max_batch=max_batch,
                               device=_device_of(model), n_ctx=n_ctx_of(model)))
    # every rank needs a batch (its sums then hold every group, the same tensors on every rank)
    sharded = is_sharded(shard) and len(batches) >= world()[1]
    numbered = list(my_batches(enumerate(batches), sharded))  # (index in one process's order, batch)
    parts: list[dict[str, Any]] = []  # sharded: each batch's sums, added up below in one process's order
    mine = [batch for _, batch in numbered]
    for batch in with_progress(iter(mine), sum(len(b.indices) for b in mine),
                               "circuit: mean of every node over the corpus (documents)",
                               progress if is_writer() else False):
        mask = counted_token_mask(batch.tokens, batch.positions + 1, special)  # the positions statistics count
        reads = iv.read_all(batch.tokens, hooks)
        part: dict[str, Any] = {}
        with torch.no_grad():
            for g in groups:
                x = reads[g.hook][mask.to(reads[g.hook].device)].float()  # [n_tokens, *shape]
                if g.kind == "sae":
                    at = {h: reads[h][mask.to(reads[h].device)].float() for h in {g.hook, g.hook_in}}
                    part[g.hook] = _sae_sums(g.sae, *_sae_io(g, at))
                else:
                    part[g.hook] = x.sum(0)
        if sharded:
            parts.append(part)
        else:
            sums = _add_sums(sums, part)
        count += int(mask.sum())
    if sharded:  # every rank's batch sums, added in one process's batch order: the same float32 sums
        order = torch.argsort(gather_rows(torch.tensor([b for b, _ in numbered]), "corpus batch numbers"))
        flat = {(h, k): gather_rows(torch.stack([(p[h] if k is None else p[h][k]) for p in parts]),
                                    "corpus node sums")[order]
                for h, v in parts[0].items() for k in (v if isinstance(v, dict) else [None])}
        for j in range(len(order)):
            part = {}
            for (h, k), t in flat.items():
                part.setdefault(h, {})
                if k is None:
                    part[h] = t[j]
                else:
                    part[h][k] = t[j]
            sums = _add_sums(sums, part)
        count = int(reduce(torch.tensor([count]), what="corpus token count"))
    if count == 0:
        raise ValueError("corpus_node_means got no token positions (empty rows, or only special tokens)")
    return _means_of(sums, count)


def corpus_mean_hooks(model, saes: Sequence) -> list[str]:
    """The hooks whose sums a corpus statistics pass must keep (``mean_hooks`` of
    :func:`~saecircuits.analysis.corpus.statistics.corpus_feature_stats`) for :func:`corpus_stats_node_means` to
    give the circuit's corpus means without a pass of its own: the embeddings', heads' and MLPs' hooks (the node
    groups without an SAE) and each transcoder's output hook (an SAE's input hook is summed by the pass anyway).

    A function of the model and the SAEs only: the circuit's groups are, whichever features become nodes
    (:func:`~saecircuits.analysis.circuit.nodes.circuit_nodes`), so a pipeline knows them before the corpus pass.
    An SAE whose decoder bias depends on its input needs none (its means are computed the old way).

    Raises:
        ValueError: two SAEs on one hook.
    """
    hooks = {h for h, kind, _ in _group_specs(model, saes) if kind != "sae"}
    hooks |= {s.hook_point_out for s in saes if s.is_transcoder and not s.decode_needs_input}
    return sorted(hooks)


def corpus_stats_node_means(model, stats, saes: Sequence, groups: list[_Group],
                            token_rows: Sequence[Sequence[int]] | None = None, *, max_tokens=DEFAULT_MAX_TOKENS,
                            max_batch=DEFAULT_MAX_BATCH, progress: bool | None = None,
                            shard: bool | None = None) -> dict:
    """:func:`corpus_node_means` of ``groups`` (same format, float32, on the model's / SAE's device) from a corpus
    statistics pass over the same documents (:class:`~saecircuits.analysis.corpus.statistics.CorpusStats`, run
    over ``saes`` in this order with ``mean_hooks=corpus_mean_hooks(model, saes)``), without encoding a token again.

    Over the pass's ``n`` counted tokens (the positions :func:`corpus_node_means` averages): an SAE group's mean
    ``f`` is ``activation_sum / n``; its mean error is ``mean x - (mean f) @ W_dec - b_dec`` (:func:`_sae_error`:
    the decode is affine in ``f`` with a constant bias), with ``x`` the SAE's input (``input_sum``) or, for a
    transcoder, its output hook (``hook_sums``); every other group's mean is its hook's mean (``hook_sums``).

    Computed the old way instead, by :func:`corpus_node_means` over ``token_rows`` (a forward and an encode of
    those groups): an SAE whose decoder bias depends on its input (``decode_needs_input``: under per-token
    normalisation the mean of ``bias(x)`` is not ``bias(mean x)``, and the sums do not give it), and a group whose
    hook the pass did not keep (a pass run without ``mean_hooks``, e.g. one checkpointed before it kept them).

    Raises:
        ValueError: ``stats`` not of these SAEs or not over ``token_rows``, a group needing the old way without
            ``token_rows``, or no counted token.
    """
    feats = stats.features
    if len(feats) != len(saes) or any((fs.hook_point, fs.d_sae) != (s.hook_point, s.d_sae)
                                      for fs, s in zip(feats, saes, strict=False)):
        raise ValueError("the corpus statistics are not of these SAEs: run the pass over the circuit's SAEs, in the "
                         "same order")
    if token_rows is not None and stats.n_docs != len(token_rows):
        raise ValueError(f"the corpus statistics cover {stats.n_docs} documents but {len(token_rows)} rows were "
                         f"given: pass the rows of that pass")
    if not stats.n_tokens:
        raise ValueError("corpus_stats_node_means got no token positions (empty rows, or only special tokens)")
    from saecircuits.models.hooks import _device_of

    device = _device_of(model)
    means: dict[str, Any] = {}
    old: list[_Group] = []  # groups the sums cannot give exactly
    for g in groups:
        if g.kind != "sae":
            if g.hook not in stats.hook_sums:
                old.append(g)
                continue
            means[g.hook] = stats.hook_mean(g.hook).to(device)
            continue
        sae = g.sae
        if sae.decode_needs_input or (g.hook != g.hook_in and g.hook not in stats.hook_sums):
            old.append(g)
            continue
        fs = feats[next(i for i, s in enumerate(saes) if s is sae)]
        dev = sae.W_dec.device
        f = (fs.activation_sum / stats.n_tokens).float().to(dev)
        out = fs.mean_input if g.hook == g.hook_in else stats.hook_mean(g.hook)
        _, x = _sae_io(g, {g.hook_in: fs.mean_input[None], g.hook: out[None]})  # [1, d_out], as corpus_node_means
        means[g.hook] = {"f": f, "e": _sae_error(sae, f, x[0].to(dev), sae.decoder_bias().detach().float())}
    if old:
        if token_rows is None:
            raise ValueError(f"the means of {[g.hook for g in old]} need a pass over the corpus rows (an SAE whose "
                             f"decoder bias depends on its input, or a hook the corpus pass did not keep): pass "
                             f"token_rows")
        means |= corpus_node_means(model, token_rows, old, max_tokens=max_tokens, max_batch=max_batch,
                                   progress=progress, shard=shard)
    return {g.hook: means[g.hook] for g in groups}


def _add_sums(sums: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``sums`` plus one batch's ``part`` (``{hook: tensor or {"f", "e"}}``), in the one order of every pass."""
    out = dict(sums)
    for h, v in part.items():
        if isinstance(v, dict):
            out[h] = v if h not in sums else {k: sums[h][k] + v[k] for k in v}
        else:
            out[h] = v + (sums[h] if h in sums else 0)
    return out


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
    shard: bool | None = None,
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

    ``shard``: split the prompt batches over the ranks of a sharded run (:mod:`saecircuits.distributed`; default:
    when a process group with more than one rank is initialised); the per-prompt log-probs are gathered, so every
    rank returns one process's curve (its bootstrap intervals from the same values and seed).

    Returns:
        DataFrame with columns ``n_nodes``, ``m_circuit``, ``m_complement_ablated``, ``faithfulness``,
        ``completeness`` (with ``faithfulness_ci95`` and ``completeness_ci95``, paired-bootstrap ``[lo, hi]``),
        ``undefined_reason`` (None when defined), plus ``m_clean`` and ``m_empty`` (nats).
    """
    return drain(_faithfulness_steps(model, task, nodes, groups, order, sizes, means=means, max_tokens=max_tokens,
                                     max_batch=max_batch, shard=shard))


def _faithfulness_steps(
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
    shard: bool | None = None,
):
    """:func:`faithfulness_curve` one prompt batch per step: a generator whose return value is the result (for
    :func:`~saecircuits.analysis.circuit.nodes.lockstep`)."""
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
    sharded = is_sharded(shard)
    final = _final_read(iv)  # the metric unembedded a few rows at a time: no [B, V, d_vocab] logits
    for batch in my_batches(task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch), sharded):
        clean = iv.clean(batch)
        edits = []
        for g in groups:
            gm = torch.zeros(V, len(g.node_of), dtype=torch.bool)
            where = torch.nonzero(g.node_of >= 0).flatten()
            gm[:, where] = masks[:, g.node_of[where]]
            edits.append(_mask_edit(g, gm, means))
        # m(M) in the same run as the ablations: the full circuit (nothing ablated) has faithfulness exactly 1
        run = iv.run_paired(clean, edits, n_variants=V, read=[final] if final else [], logits=final is None)
        idx = torch.as_tensor(batch.indices)
        m_clean, m = _paired_answer_logprob(iv, run, final, batch.answer_ids)
        per_prompt[idx] = m.double().cpu()
        clean_lp[idx] = m_clean.double().cpu()
        yield
    if sharded:  # every rank's prompts (each rank's rows are 0 at the others' prompts)
        per_prompt = sum_disjoint(per_prompt, "faithfulness log-probs")
        clean_lp = sum_disjoint(clean_lp, "faithfulness clean log-probs")
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


def _ci95(mean: torch.Tensor, mean_sq: torch.Tensor, n: int) -> torch.Tensor:
    """Half-width of a normal-approximation 95% interval of a mean over ``n`` prompts from its first two moments."""
    if n < 2:
        return torch.full_like(mean, float("nan"))
    var = (mean_sq - mean**2).clamp_min(0) * n / (n - 1)
    return 1.96 * (var / n).sqrt()
