"""Gradient estimates of the node effects and edges (attribution patching, Nanda 2023 / Syed et al. 2023; integrated
gradients per submodule, Sundararajan et al. 2017 as Sparse Feature Circuits) and their agreement with the exact
values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from saecircuits.analysis.ablations.modes import edit_dtype, sae_edit
from saecircuits.analysis.circuit.exact import _Edges, _embedding_values
from saecircuits.analysis.circuit.nodes import Node, _answer_logprob, _Group, _node_index, _stage_key, drain
from saecircuits.distributed import is_sharded, is_writer, my_batches, sum_disjoint
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches, with_progress
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.saes.sparse_codes import nonzero_codes, sparse_decode
from saecircuits.tasks.base import Task

SIGN_TOLERANCE = 1e-6
"""An exact effect counts as non-zero in :func:`agreement`'s sign agreement above this share of the largest one."""


def _track(t: torch.Tensor) -> torch.Tensor:
    """Make ``t`` keep its gradient: a leaf that requires grad, or a retained non-leaf."""
    if t.requires_grad:
        t.retain_grad()
        return t
    return t.detach().requires_grad_(True)


def _narrow_topk(sae) -> bool:
    """Whether :func:`attached_features` may carry a TopK SAE's gradient through the selected columns alone: the
    plain TopK activation (ReLU of the selected pre-activations, no input normalisation), whose derivative with
    respect to the input is ``W_enc[:, k]`` where feature ``k`` is non-zero and 0 elsewhere."""
    from saecircuits.saes.base import SAE
    from saecircuits.saes.topk import TopKSAE

    cls = type(sae)
    return (isinstance(sae, TopKSAE) and sae.topk_relu and sae.input_normalization == "none"
            and cls.encode is SAE.encode and cls._inference_activations is SAE._inference_activations
            and cls.encode_with_hidden_pre is TopKSAE.encode_with_hidden_pre and cls._activate is TopKSAE._activate)


def attached_features(sae, x_in: torch.Tensor, cols: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
    """``encode(x_in)[..., cols]`` ``[..., n]`` with its graph to ``x_in``: the targets of the edge gradients.

    :meth:`~saecircuits.saes.base.SAE.encode_features` for every SAE but the plain TopK one, which encodes every
    feature with its graph (its top-k compares them): each edge's backward pass then crossed a dense ``[d_sae] x
    [d_sae, d_in]`` product. Here the value is the code computed without a graph (``f``, the caller's
    ``encode(x_in)`` when it has it) plus ``z - z.detach()`` (exactly 0) with ``z = (x_in - b_dec) @ W_enc[:, cols]``
    gated by ``f != 0``: the same derivative (``W_enc[:, k]`` where the feature is selected and positive, else 0,
    as autograd's scatter / ReLU backward gives), through ``n`` columns. The same floats as the dense path for a
    target that is one column per row (every caller here): its gradient row has one non-zero entry either way.
    """
    cols = cols.to(sae.W_enc.device)
    if not _narrow_topk(sae):
        return sae.encode_features(x_in, cols)
    if f is None:
        with torch.no_grad():
            f = sae.encode(x_in)
    vals = f.detach()[..., cols]  # encode_features' value (encode(x_in)[..., cols] for a TopK SAE)
    if not (torch.is_grad_enabled() and x_in.requires_grad):
        return vals
    x_enc, _ = sae._encoder_input(x_in)
    z = (x_enc @ sae.W_enc.detach()[:, cols]) * (vals != 0).to(x_enc.dtype)
    return vals + (z - z.detach()).to(vals.dtype)


def _tracking_edits(groups: list[_Group], store: dict, scale: dict | None = None, baselines: dict | None = None,
                    attach: dict | None = None, tracked: set[str] | None = None) -> list[Edit]:
    """Edits that expose every node's activation to autograd, unchanged in value.

    At an SAE hook the output is rebuilt as ``decode(f) + e`` from two leaves, the codes ``f = encode(x)`` and
    ``e = x - decode(f)`` (SFC's decomposition: the gradient of a feature goes through its decoder row only, the
    error's is the output's), plus a straight-through ``x - x.detach()`` so that everything upstream still gets
    its total derivative. The codes are tracked sparsely: ``store[hook] = (values, e)`` with ``values [B, F, m]``
    the non-zero codes at ``store[hook + "#idx"]`` (:func:`~saecircuits.saes.sparse_codes.nonzero_codes`), decoded from those rows of ``W_dec``
    alone, so that a gradient costs ``m`` dot products instead of a dense ``[d_out] x [d_out, d_sae]`` product; a
    feature that is 0 contributes ``grad x 0 = 0`` either way. ``store[hook + "#f"]`` is the dense code (detached).
    ``store[hook + "#attached"] = (cols, a)`` keeps ``a = encode(x)[..., cols]`` with its graph to upstream nodes
    (the targets of edge gradients), for the feature columns ``attach[hook]`` (default: the group's node features
    active on some row), computed as those encoder columns alone where the SAE's activation is per feature
    (:meth:`~saecircuits.saes.base.SAE.encode_features`): an edge's backward then goes through one column, not a
    ``[d_sae] x [d_sae, d_in]`` product. Heads' z, MLP outputs and embeddings are tracked as they are. With
    ``scale`` (IG), the group named in ``scale`` has its activations replaced by ``(1 - alpha_v) a`` for each
    variant ``v``, or ``mu + (1 - alpha_v) (a - mu)`` for a mean-ablated group (``baselines[hook] = mu``,
    :func:`~.nodes.ablation_values`): the straight path from clean to ablated. With ``tracked`` (hooks), an SAE group
    not in it is left as it is (its value ``x`` and its graph, what ``decode(f) + e + x - x.detach()`` equals up to
    float rounding), keeping only its ``#attached`` columns: IG needs no code of a group it does not scale.
    """
    edits = []
    for g in groups:
        interp = None if scale is None else scale.get(g.hook)
        if g.kind == "sae":
            sae = g.sae
            cols_given = None if attach is None else attach.get(g.hook)

            def fn(x_in: torch.Tensor, x: torch.Tensor, g=g, sae=sae, interp=interp, cols=cols_given) -> torch.Tensor:
                if tracked is not None and g.hook not in tracked:
                    if cols is not None and len(cols):
                        store[g.hook + "#attached"] = (cols, attached_features(sae, x_in, cols))
                    return x
                x = x.to(edit_dtype(sae, x))  # the error in x's dtype: decode(f) + e is x, unrounded
                with torch.no_grad():
                    f = sae.encode(x_in)
                store[g.hook + "#f"] = f
                if cols is None:  # the node features active on some row
                    on = (f != 0).reshape(-1, f.shape[-1]).any(0) & (g.node_of[: sae.d_sae] >= 0).to(f.device)
                    cols = torch.nonzero(on).flatten()
                if len(cols):
                    store[g.hook + "#attached"] = (cols, attached_features(sae, x_in, cols, f))
                x_in = x_in.detach()  # the bias of a skip / normalising SAE is a constant of the decomposition
                vals, idx = nonzero_codes(f)
                bias = sae.decoder_bias(x_in if sae.decode_needs_input else None)

                def decode(v: torch.Tensor) -> torch.Tensor:  # sum_j v_j W_dec[idx_j] + bias, rows [B, F, m]
                    rows = sparse_decode(v.reshape(-1, v.shape[-1]), idx.expand_as(v).reshape(-1, v.shape[-1]),
                                         sae.W_dec)
                    return rows.reshape(*v.shape[:-1], -1) + bias

                e = x.detach() - decode(vals).to(x.dtype)
                store[g.hook + "#idx"] = idx
                store[g.hook + "#clean"] = (vals, e)
                if interp is not None:
                    vals, e = interp[None, :, None] * vals, interp[None, :, None] * e
                vals, e = vals.requires_grad_(True), e.requires_grad_(True)
                store[g.hook] = (vals, e)
                through = x - x.detach() if x.requires_grad else 0.0
                return decode(vals).to(e.dtype) + e + through

            edits.append(sae_edit(sae, fn))
            continue

        mu = None if baselines is None else baselines.get(g.hook)

        def fn(a: torch.Tensor, g=g, interp=interp, mu=mu) -> torch.Tensor:
            store[g.hook + "#clean"] = (a.detach(),)
            if interp is not None:
                shape = (1, -1) + (1,) * (a.dim() - 2)
                base = 0.0 if mu is None else mu.to(a)
                a = (base + interp.reshape(shape).to(a) * (a.detach() - base)).requires_grad_(True)
            else:
                a = _track(a)
            store[g.hook] = (a,)
            return a

        edits.append(Edit(g.hook, fn))
    return edits


def _contributions(g: _Group, tensors: tuple, grads: tuple, baseline: torch.Tensor | None = None,
                   idx: torch.Tensor | None = None) -> torch.Tensor:
    """``grad . activation`` per in-group index: ``[B, F, n_group]`` (float64; products taken in float64 too, so a
    bf16 model's activations and gradients are never multiplied in bf16); ``grad . (activation - baseline)`` for a
    mean-ablated group (``baseline`` its mean, :func:`~.nodes.ablation_values`): the first-order change when the
    node is set to ``baseline``. ``idx``: an SAE group's codes are sparse, ``[B, F, m]`` at these feature indices
    (:func:`_tracking_edits`); the features elsewhere contribute 0."""
    with torch.no_grad():
        if g.kind == "sae":
            (f, e), (gf, ge) = tensors, grads
            feat = gf.double() * f.double()
            if idx is not None:  # padded entries have f = 0, so they add 0
                dense = torch.zeros(*feat.shape[:-1], g.sae.d_sae, dtype=feat.dtype, device=feat.device)
                feat = dense.scatter_add_(-1, idx.to(feat.device).expand_as(feat), feat)
            err = (ge.double() * e.double()).sum(-1, keepdim=True)
            return torch.cat([feat, err], dim=-1)
        (a,), (ga,) = tensors, grads
        if baseline is not None:  # subtracted in float64 too
            a = a.double() - baseline.double()
        if g.kind == "heads":
            return (ga.double() * a.double()).sum(-1)
        return (ga.double() * a.double()).sum(-1, keepdim=True)


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
    means: dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
) -> Estimates:
    """Attribution patching at P: node effects from one backward pass per batch, edges from one backward pass per
    downstream feature slot (each prompt's ``j``-th active feature of each SAE).

    Args:
        edge_downstream: estimate edges into at most this many active features per prompt and SAE (largest
            activation first); None = all.
        means: as :func:`~saecircuits.analysis.circuit.exact_effects`'s (the embeddings' ablation values).
        shard: split the prompt batches over the ranks of a sharded run, as
            :func:`~saecircuits.analysis.circuit.exact.exact_effects` (default: when a process group with more than
            one rank is initialised); every rank returns one process's estimates (float64 sums in another order).

    Returns:
        :class:`Estimates` (method ``"atp"``).
    """
    return drain(_atp_steps(model, task, nodes, groups, edge_downstream=edge_downstream, means=means,
                            max_tokens=max_tokens, max_batch=max_batch, progress=progress, shard=shard))


@torch.enable_grad()  # gradients even when the caller runs under torch.no_grad()
def _atp_steps(
    model,
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    *,
    edge_downstream: int | None = None,
    means: dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
):
    """:func:`attribution_estimates` one prompt batch per step: a generator whose return value is the result (for
    :func:`~saecircuits.analysis.circuit.nodes.lockstep`)."""
    iv = interventions_for(model)
    n_layers = int(model.cfg.n_layers)
    N = len(nodes)
    base = _embedding_values(model, task, groups, means, max_tokens=max_tokens, max_batch=max_batch)
    node_effect = torch.zeros(N, dtype=torch.float64)
    edges = _Edges()
    sharded = is_sharded(shard)
    batches = list(my_batches(task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch), sharded))
    for batch in with_progress(iter(batches), sum(len(b.indices) for b in batches),
                               "circuit: attribution patching (prompts)", progress if is_writer() else False):
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
            _scatter_nodes(node_effect, g, _contributions(g, ts, gs, base.get(g.hook), store.get(g.hook + "#idx"))[:, 0])
        # edges: d_f(downstream)/d(upstream) . upstream, one backward per downstream slot
        for gd_i, (gd, _) in enumerate(tracked):
            if gd.kind != "sae":
                continue
            ups = [(g, ts) for g, ts in tracked[:gd_i] if _stage_key(g.hook, n_layers) < _stage_key(gd.hook_in, n_layers)]
            if not ups or gd.hook + "#attached" not in store:
                continue
            cols, attached = store[gd.hook + "#attached"]  # the active node features' codes, with their graph
            col_of = torch.zeros(gd.sae.d_sae, dtype=torch.long, device=cols.device)
            col_of[cols] = torch.arange(len(cols), device=cols.device)
            fd = store[gd.hook + "#f"][:, 0]  # [B, d_sae] (detached)
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
                target = (attached[:, 0].gather(1, col_of[k][:, None].to(attached.device))[:, 0] * valid).sum()
                gr = torch.autograd.grad(target, up_flat, retain_graph=True, allow_unused=True)
                i = 0
                d_ids = gd.node_of[k.cpu()]
                for g, ts in ups:
                    gs = tuple(torch.zeros_like(t) if x is None else x for t, x in zip(ts, gr[i : i + len(ts)], strict=True))
                    i += len(ts)
                    c = _contributions(g, ts, gs, base.get(g.hook), store.get(g.hook + "#idx"))[:, 0].cpu()  # [B, n]
                    where = torch.nonzero(g.node_of >= 0).flatten()
                    vals = c[:, where]
                    b_idx, w_idx = torch.nonzero((vals != 0) & valid.cpu()[:, None], as_tuple=True)
                    edges.add(g.node_of[where[w_idx]], d_ids[b_idx], vals[b_idx, w_idx])
        del store, logits
        yield
    if sharded:  # every rank's sums and edge contributions
        node_effect, edges = sum_disjoint(node_effect, "AtP node estimates"), edges.gathered("AtP edge estimates")
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
    means: dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
) -> Estimates:
    """Integrated gradients at P, one submodule (hook group) at a time, as Sparse Feature Circuits.

    For each group its nodes go from clean (alpha 0) to ablated (alpha 1) together as ``(1 - alpha) a`` at the
    midpoints ``alpha = (i + 0.5) / steps`` (one run with ``steps`` variants), every later node recomputed; the mean
    gradient times the clean activation estimates each node's effect. Edge estimates into the feature nodes
    ``edge_targets`` use the same runs with the downstream activation as the metric.

    Args:
        steps: interpolation points (more = closer to the path integral).
        edge_targets: feature node ids whose incoming edges are estimated (each costs one backward per group).
        means: as :func:`~saecircuits.analysis.circuit.exact_effects`'s (the embeddings go to their mean).
        shard: split the prompt batches over the ranks of a sharded run, as :func:`attribution_estimates`.

    Returns:
        :class:`Estimates` (method ``"ig"``).

    Raises:
        ValueError: ``steps < 1``.
    """
    return drain(_ig_steps(model, task, nodes, groups, steps=steps, edge_targets=edge_targets, means=means,
                           max_tokens=max_tokens, max_batch=max_batch, progress=progress, shard=shard))


@torch.enable_grad()  # gradients even when the caller runs under torch.no_grad()
def _ig_steps(
    model,
    task: Task,
    nodes: list[Node],
    groups: list[_Group],
    *,
    steps: int = 10,
    edge_targets: Sequence[int] = (),
    means: dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
):
    """:func:`integrated_gradient_estimates` one prompt batch per step: a generator whose return value is the result
    (for :func:`~saecircuits.analysis.circuit.nodes.lockstep`)."""
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
    # the encoder columns whose graph the edge targets need, per SAE hook (an empty set where none)
    attach = {g.hook: torch.tensor(sorted({int(local[t]) for t in targets if int(gid[t]) == gi}), dtype=torch.long)
              for gi, g in enumerate(groups) if g.kind == "sae"}
    base = _embedding_values(model, task, groups, means, max_tokens=max_tokens, max_batch=max_batch)
    sharded = is_sharded(shard)
    batches = list(my_batches(task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch), sharded))
    for batch in with_progress(iter(batches), sum(len(b.indices) for b in batches),
                               "circuit: integrated gradients (prompts)", progress if is_writer() else False):
        clean = iv.clean(batch)
        for g in groups:
            store: dict = {}
            scale = {g.hook: 1 - alphas}
            edits = _tracking_edits(groups, store, scale=scale, baselines=base, attach=attach, tracked={g.hook})
            logits, _ = iv.run(clean, edits, n_variants=steps, grad=True)
            m = _answer_logprob(logits, batch.answer_ids)  # [B, steps]
            ts = store[g.hook]
            grads = torch.autograd.grad(m.sum(), ts, retain_graph=bool(targets), allow_unused=True)
            gs = tuple(torch.zeros_like(t) if x is None else x for t, x in zip(ts, grads, strict=True))
            clean_ts = store[g.hook + "#clean"]  # the clean activation a, [B, 1, ...]
            mean_gs = tuple(x.float().mean(1, keepdim=True) for x in gs)  # over the steps, in float32 (bf16 models)
            idx = store.get(g.hook + "#idx")
            _scatter_nodes(node_effect, g, _contributions(g, clean_ts, mean_gs, base.get(g.hook), idx)[:, 0])
            for t_id in targets:
                gt = groups[int(gid[t_id])]
                if _stage_key(gt.hook_in, n_layers) <= _stage_key(g.hook, n_layers):
                    continue
                cols, attached = store[gt.hook + "#attached"]
                f_d = attached[..., int(torch.nonzero(cols == int(local[t_id]))[0, 0])]  # [B, steps]
                grads = torch.autograd.grad(f_d.sum(), ts, retain_graph=True, allow_unused=True)
                gs = tuple(torch.zeros_like(t) if x is None else x for t, x in zip(ts, grads, strict=True))
                c = _contributions(g, clean_ts, tuple(x.float().mean(1, keepdim=True) for x in gs),
                                   base.get(g.hook), idx)[:, 0].cpu()
                where = torch.nonzero(g.node_of >= 0).flatten()
                vals = c[:, where]
                b_idx, w_idx = torch.nonzero(vals != 0, as_tuple=True)
                edges.add(g.node_of[where[w_idx]], torch.full_like(b_idx, t_id), vals[b_idx, w_idx])
            del store, logits
        yield
    if sharded:  # every rank's sums and edge contributions
        node_effect, edges = sum_disjoint(node_effect, "IG node estimates"), edges.gathered("IG edge estimates")
    n = task.n_prompts
    summed = edges.summed(N)
    return Estimates(node_effect / n, {k: v / n for k, (v, _) in summed.items()}, "ig", steps)


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
