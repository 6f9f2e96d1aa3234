"""The circuit across positions: nodes at every position ``t <= P``, their effects on the answer at P, edges between
positions, and the attention heads an edge between positions runs through.

Method sources:
- Sparse Feature Circuits (Marks et al. 2024): SAE features and one error node per SAE as nodes at every position of
  the prompt, node and edge effects by attribution patching (AtP: Nanda 2023; Kramar et al. 2024, "AtP*"), checked
  here against exact ablations;
- circuit-tracer attribution graphs (Ameisen et al. 2025, "Circuit Tracing"): nodes at every position, edges into
  a later position through attention, pruning by influence on the target, per-head attention attributions ("head
  loadings") of an edge between positions.

Conventions (per prompt; P its prediction position; ``m`` = log p(answer) at P, nats):
- node ``(group, index, t)``: a feature of an SAE at position ``t`` (active there: ``f != 0``), an SAE's error node,
  a head's ``hook_z`` slice, an MLP without an SAE (``mlp.hook_post``), the token and position embeddings, each at
  every position ``t <= P``; ablating it (exact effects) is as in :mod:`saecircuits.analysis.circuit` (feature
  ``x - f_k W_dec[k]``, error ``x -> x_hat``, head / MLP -> 0, token / position embedding -> its mean over the
  task's prompts and positions, :func:`ablation_baselines`), at position ``t`` alone;
- node effect ``m(clean) - m(node ablated)`` (nats, positive: supports the answer);
- edge ``u -> d`` (``u`` at ``s``, ``d`` a feature of a later stage at ``p_d >= s``): ``f_d(clean) - f_d(u
  ablated)`` (activation units); ``u -> target``: ``u``'s node effect (nats);
- AtP: ``effect(u) ~ grad_u m . a_u``, ``edge(u, d) ~ grad_u f_d . a_u`` (``a_u - mean`` for the embeddings; the
  gradient with respect to every
  position's activations at once: one backward pass per prompt batch for the node effects, one per downstream
  slot for the edges);
- exact effects by a prefix-cached intervention at position ``t``: the clean pass keeps every position's keys /
  values and residual stream; an ablation at ``t`` recomputes positions ``t..P`` only, from the edited hook's
  half-block on, attending to the cached keys/values of positions ``< t`` (local layers keep their window; rotary
  queries get their own positions). Every prompt of a batch ablates its own nodes at distance ``d = P - t`` as
  variants of one run, variant 0 being the clean recomputation (so an ablation that changes nothing is exactly 0).

Head loadings (:func:`head_loadings`): position ``p_d`` sees the earlier positions only through the keys and values
of each layer's attention, so ``f_d`` at ``p_d`` is a function ``G(x_{p_d}, {k_{t,L,j}, v_{t,L,j}: t < p_d})`` of
its own embedding and the earlier positions' keys/values (``j`` a key/value head). By the chain rule, for ``u`` at
``s < p_d``, ``grad_u f_d . a_u = sum_{L, j} sum_{t < p_d} (dG/dk_{t,L,j} . dk_{t,L,j}/du + dG/dv . dv/du) . a_u``:
the AtP edge splits into one part per (layer, key/value head), and the parts sum to it exactly (an identity, tested).
This is circuit-tracer's attention attribution (edges between positions split by the head whose QK/OV they pass,
with the attention patterns frozen at first order). With grouped-query attention a key/value head serves several
query heads and the loading is per key/value head (``L1KV0``); otherwise per head (``L1H3``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from saecircuits.analysis.ablations.modes import edit_dtype
from saecircuits.analysis.circuit import (
    MAX_FLOATS,
    _answer_logprob,
    _contributions,
    _Group,
    _group_specs,
    _single_edit,
    _stage_key,
    _track,
    ablation_values,
)
from saecircuits.analysis.circuit.estimates import attached_features
from saecircuits.models.engine import EngineError, KVPrefix, stage_of_hook
from saecircuits.models.hooks import TaskBatch
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.saes.base import SAE

__all__ = ["PositionGroups", "position_groups", "CleanCache", "clean_cache", "node_attributions",
           "node_attribution_entries", "exact_node_effects", "attribution_edges", "head_loadings", "engine_of",
           "ablation_baselines"]


@dataclass
class PositionGroups:
    """Every node group of the model and SAEs (one per hook), in execution order.

    Attributes:
        groups: :class:`saecircuits.analysis.circuit._Group` per hook; ``node_of = arange(n_local)`` (every in-group
            index is a node at every position: SAE features ``0..d_sae-1`` and the error ``d_sae``, heads, or 0).
        names: per group, the node kind of its in-group indices (``"sae"``, ``"head"``, ``"embed"``, ``"pos_embed"``,
            ``"mlp"``).
        layer: per group, the block of its hook (-1 for the embeddings).
        stage: per group, the execution-order key of the hook it writes; stage_in: of the hook it is read from.
        sae_index: per group, the index of its SAE in the run (-1 otherwise).
    """

    groups: list[_Group]
    names: list[str]
    layer: list[int]
    stage: list[int]
    stage_in: list[int]
    sae_index: list[int]

    def n_local(self, gi: int) -> int:
        return len(self.groups[gi].node_of)


def position_groups(model, saes: Sequence[SAE]) -> PositionGroups:
    """The node groups (see :class:`PositionGroups`). Raises ValueError: two SAEs on one hook."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    groups, names, layer, stage, stage_in, sae_index = [], [], [], [], [], []
    for hook, kind, si in _group_specs(model, saes):
        sae = saes[si] if si is not None else None
        n = sae.d_sae + 1 if sae is not None else n_heads if kind == "heads" else 1
        g = _Group(hook, kind, sae, torch.arange(n))
        groups.append(g)
        names.append("sae" if sae is not None else "head" if kind == "heads" else
                     {"hook_embed": "embed", "hook_pos_embed": "pos_embed"}.get(hook, "mlp"))
        layer.append(stage_of_hook(hook, n_layers)[0])
        stage.append(_stage_key(hook, n_layers))
        stage_in.append(_stage_key(g.hook_in, n_layers))
        sae_index.append(-1 if si is None else si)
    return PositionGroups(groups, names, layer, stage, stage_in, sae_index)


def ablation_baselines(pg: PositionGroups, means: dict) -> dict[int, torch.Tensor]:
    """Per group index, the value a single-node ablation writes where it is not 0 / an SAE edit: the token and
    position embeddings' means (:func:`saecircuits.analysis.circuit.nodes.ablation_values`, the rule the circuit at
    P uses too), from ``means`` (:func:`~saecircuits.analysis.circuit.position_graph.position_means`, per group
    index). Raises ValueError: a mean missing."""
    by_hook = ablation_values(pg.groups, {g.hook: means[gi] for gi, g in enumerate(pg.groups) if gi in means})
    return {gi: by_hook[g.hook] for gi, g in enumerate(pg.groups) if g.hook in by_hook}


def engine_of(model):
    """The prefix-cached engine of ``model``. Raises EngineError: a model the engine cannot compute (the circuit
    across positions recomputes positions ``t..P`` with it; the bridge has no such path)."""
    iv = interventions_for(model)
    if iv.engine is None:
        raise EngineError(f"the circuit across positions needs the prefix-cached engine, unavailable here ({iv.reason})")
    return iv.engine


# ----------------------------------------------------------------------------------------------------------------
# hooks on whole sequences ([B, F, S, *shape])


def _box(store: dict, key):
    def fn(x: torch.Tensor) -> None:
        store[key] = x

    return fn


def _add_sae_hook(hooks: dict, g: _Group, fn) -> None:
    """At ``g.hook``: ``x -> fn(x_in, x)`` with ``x_in [B, F, S, d_in]`` read at ``g.hook_in`` in the same pass and
    ``x [B, F, S, d_out]`` (``hook_z`` flattened and restored)."""
    sae = g.sae
    box: dict = {}
    if g.hook_in != g.hook:
        hooks.setdefault(g.hook_in, []).append(_box(box, "x"))

    def at(x: torch.Tensor) -> torch.Tensor:
        x_in = sae.flatten_input(box["x"] if g.hook_in != g.hook else x)
        flat = x.flatten(-2) if x.shape[-1] != sae.d_out else x
        F = max(x_in.shape[1], flat.shape[1])
        x_in, flat = (t.expand(t.shape[0], F, *t.shape[2:]) for t in (x_in, flat))
        out = fn(x_in, flat)
        return out.unflatten(-1, x.shape[-2:]) if flat.dim() != x.dim() else out

    hooks.setdefault(g.hook, []).append(at)


def _first_position(e: Edit, hooks: dict) -> None:
    """Apply an at-P :class:`Edit` (``[B, F, *shape] -> [B, V, *shape]``) to the first computed position of a
    ``[B, F, S, *shape]`` recomputation, leaving the later positions to the model."""
    box: dict = {}
    for r in e.reads:
        hooks.setdefault(r, []).append(_box(box, r))

    def fn(x: torch.Tensor) -> torch.Tensor:
        first = e.fn(x[:, :, 0].clone(), *[box[r][:, :, 0] for r in e.reads]).to(x.dtype)
        V = max(first.shape[1], x.shape[1])
        first = first.expand(x.shape[0], V, *first.shape[2:])
        rest = x[:, :, 1:]
        rest = rest.expand(x.shape[0], V, *rest.shape[2:])
        return torch.cat([first[:, :, None], rest], dim=2)

    hooks.setdefault(e.hook, []).append(fn)


def _at_positions(x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [B, F, T, *shape]`` -> ``[len(rows), F, *shape]`` at ``(rows[i], pos[i])``."""
    return x[rows, :, pos]


# ----------------------------------------------------------------------------------------------------------------
# the clean pass and attribution patching


@dataclass
class CleanCache:
    """One clean full forward of a batch (no gradient): keys/values ``[B, 1, T, n_kv, d_head]`` per layer and the
    residual stream ``{(layer, sub): [B, 1, T, d_model]}`` at every position, and the answer log-prob ``m [B]``."""

    batch: TaskBatch
    kv: list
    resid: dict
    m: torch.Tensor


def clean_cache(engine, batch: TaskBatch) -> CleanCache:
    with torch.no_grad():
        kv: list = []
        resid: dict = {}
        x = engine.forward_tokens(batch.tokens, keep_kv=kv, keep_resid=resid)
        rows = torch.arange(x.shape[0], device=x.device)
        lg = engine.logits(x[rows, :, batch.positions.to(x.device)])  # [B, 1, d_vocab]
        m = _answer_logprob(lg, batch.answer_ids)[:, 0]
    return CleanCache(batch, kv, resid, m)


@dataclass
class Tracked:
    """The autograd graph of one tracked forward of a batch (:func:`node_attributions`).

    Attributes:
        leaves: per group, the tensors whose gradients give contributions (``(f, e)`` for an SAE, ``(a,)`` else),
            ``[B, 1, T, ...]``. An SAE's ``f`` is not an autograd leaf: the output is ``decode(f) + e``, linear in
            ``f``, so ``grad_f = grad_e @ W_dec^T`` (:meth:`feature_grad`), formed only where it is read (a backward
            pass through every ``[d_out] -> [d_sae]`` decoder transpose cost most of the head loadings' and edges'
            backward passes).
        inputs: per SAE group, its input ``x_in`` with its graph to upstream leaves ``[B, 1, T, d_in]``: a
            feature's value with that graph is :meth:`feature` (encoding one position, not every position with a
            graph: the edges' backward passes then cross the encoder at one position each).
        kv: per layer ``(k, v)`` ``[B, 1, T, n_kv, d_head]`` with their graph (for head loadings).
        m: ``[B]`` the answer log-prob at P.
        baselines: :func:`ablation_baselines` (``grad . (a - mean)`` for those groups).
    """

    leaves: list[tuple]
    inputs: dict[int, torch.Tensor]
    kv: list
    m: torch.Tensor
    baselines: dict

    def feature(self, pg: PositionGroups, gi: int, b: int, t: int, k: int) -> torch.Tensor:
        """``f_k`` of SAE group ``gi`` at prompt ``b``, position ``t`` (a scalar with its graph to the leaves)."""
        sae = pg.groups[gi].sae
        return attached_features(sae, self.inputs[gi][b, 0, t][None], torch.tensor([k]))[0, 0]

    def flat(self) -> list[torch.Tensor]:
        """The autograd leaves, one per group: an SAE's error ``e``, else the activation ``a``; ``grads`` below
        are ``torch.autograd.grad(..., flat())``."""
        return [ts[-1] for ts in self.leaves]

    @staticmethod
    def feature_grad(g, ge: torch.Tensor) -> torch.Tensor:
        """``grad_f = grad_e @ W_dec^T`` ``[..., d_sae]`` of an SAE group (``decode`` is ``f @ W_dec + bias``; in
        the SAE's dtype, as autograd through ``decode`` forms it)."""
        W = g.sae.W_dec
        return (ge.to(W.dtype) @ W.T).to(ge.dtype)

    def gather_plan(self, pg: PositionGroups, rows: Sequence[int], nodes: Sequence[PromptNodes]) -> list:
        """What :meth:`gathered` reads besides the gradients, for the nodes ``nodes[i]`` of prompts ``rows[i]``:
        their indices per group, and the activations (float64) and decoder rows they multiply. The same for every
        gradient of one slot (a head loading takes one per layer and key/value head), so built once per slot."""
        sizes = [len(n.gi) for n in nodes]
        gis = torch.cat([n.gi for n in nodes]) if nodes else torch.zeros(0, dtype=torch.long)
        ks = torch.cat([n.local for n in nodes]) if nodes else gis
        ts_ = torch.cat([n.pos for n in nodes]) if nodes else gis
        bs = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), torch.tensor(sizes, dtype=torch.long))
        parts = []
        for gi in torch.unique(gis).tolist():
            m = gis == gi
            b, t, k = bs[m], ts_[m], ks[m]
            ts = self.leaves[gi]
            g = pg.groups[gi]
            with torch.no_grad():
                if g.kind == "sae":
                    f, e = ts
                    is_f = k < g.sae.d_sae
                    # the features' and the errors' entries apart: a feature reads its decoder row and code, an
                    # error its error vector (not every node both)
                    fi, ei = torch.nonzero(is_f).flatten(), torch.nonzero(~is_f).flatten()
                    W = g.sae.W_dec
                    acts = (fi, ei, W[k[fi].to(W.device)], f[b[fi], 0, t[fi], k[fi]].double(),
                            e[b[ei], 0, t[ei]].double())
                else:
                    (a,) = ts
                    is_f = None
                    a_t = a[b, 0, t].double()  # products in float64: never a bf16 product
                    if gi in self.baselines:
                        a_t = a_t - self.baselines[gi].double()
                    acts = (a_t,)
            parts.append((gi, m, b, t, k, is_f, acts))
        return [sizes, len(gis), parts]

    def gathered(self, pg: PositionGroups, grads: Sequence[torch.Tensor | None], rows: Sequence[int],
                 nodes: Sequence[PromptNodes], plan: list | None = None) -> list[torch.Tensor]:
        """``grad . activation`` of the given nodes of prompts ``rows`` (``nodes[i]`` of prompt ``rows[i]``): per
        prompt float64 ``[n_i]`` (what :meth:`contributions` holds at those entries, without forming the whole
        ``[B, T, n_local]`` tensors; every prompt's nodes in one indexing per group). ``plan``: their
        :meth:`gather_plan` when the caller reuses it over several gradients (built here otherwise)."""
        sizes, n, parts = self.gather_plan(pg, rows, nodes) if plan is None else plan
        out = torch.zeros(n, dtype=torch.float64)
        for gi, m, b, t, k, _, acts in parts:
            gs = grads[gi]
            g = pg.groups[gi]
            with torch.no_grad():
                if g.kind == "sae":
                    ge = gs
                    fi, ei, W_k, f_k, e_t = acts
                    vals = torch.zeros(len(t), dtype=torch.float64)
                    if ge is not None:
                        # grad_f at these (t, k) alone: grad_e[t] . W_dec[k] (:meth:`feature_grad`); "+ 0.0" as
                        # the sum into zeros this replaces (-0.0 -> 0.0)
                        g_f = ge[b[fi], 0, t[fi]]
                        gf = (g_f.to(W_k.dtype) * W_k).sum(-1)
                        vals[fi] = (gf.to(ge.dtype).double() * f_k).cpu() + 0.0
                        vals[ei] = (ge[b[ei], 0, t[ei]].double() * e_t).sum(-1).cpu() + 0.0
                else:
                    ga = gs
                    if ga is None:
                        continue
                    (a_t,) = acts
                    prod = ga[b, 0, t].double() * a_t
                    if g.kind == "heads":
                        vals = prod[torch.arange(len(t)), k].sum(-1).cpu()
                    else:
                        vals = prod.reshape(len(t), -1).sum(-1).cpu()
            out[m] = vals
        return list(out.split(sizes))

    def contributions(self, pg: PositionGroups, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """``grad . activation`` per group ``[B, T, n_local]`` (float64, on the CPU) from grads of :meth:`flat`; an
        SAE feature's entry only where it is active (0 elsewhere, :meth:`_sae_contributions`)."""
        out = []
        for gi, (g, ts, x) in enumerate(zip(pg.groups, self.leaves, grads, strict=True)):
            x = torch.zeros_like(ts[-1]) if x is None else x
            if g.kind == "sae":  # the features' products where they are active only (the rest are read as absent)
                out.append(self._sae_contributions(g, ts, x))
                continue
            out.append(_contributions(g, (ts[0],), (x,), self.baselines.get(gi))[:, 0].cpu())
        return out

    def node_contributions(self, pg: PositionGroups, grads: Sequence[torch.Tensor | None], positions
                           ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The entries of :meth:`contributions` that are nodes, at positions ``t <= P`` (``positions``: each row's
        P): per group ``(b, t, k, value)`` (int64, int64, int64, float64 ``[n]``, on the CPU) in ``(b, t, k)``
        order, an SAE's active features (``f != 0``) and its error (``k = d_sae``, after the position's features),
        every index of the other groups. The same floats at the same entries as :meth:`contributions` (the same
        float64 products, NaN included), without its dense ``[B, T, d_sae + 1]`` float64 tensor per SAE (a TopK
        SAE's codes are ``k / d_sae`` non-zero: the zeros, their absolute values and the search for the active
        ones over them were most of pass A's time after the forward and backward passes)."""
        P = torch.as_tensor(positions, dtype=torch.long).cpu()
        out = []
        for gi, (g, ts, x) in enumerate(zip(pg.groups, self.leaves, grads, strict=True)):
            x = torch.zeros_like(ts[-1]) if x is None else x
            if g.kind != "sae":
                c = _contributions(g, (ts[0],), (x,), self.baselines.get(gi))[:, 0].cpu()
                valid = torch.arange(c.shape[1])[None, :, None] <= P[:, None, None]
                b, t, k = torch.nonzero(valid.expand(c.shape), as_tuple=True)
                out.append((b, t, k, c[b, t, k]))
                continue
            f, e = ts
            with torch.no_grad():
                gf = self.feature_grad(g, x)[:, 0]  # [B, T, d_sae], as :meth:`_sae_contributions`
                f0 = f[:, 0]
                Pd = P.to(f0.device)
                b, t, k = torch.nonzero(f0, as_tuple=True)
                ok = t <= Pd[b]
                b, t, k = b[ok], t[ok], k[ok]
                v_f = (gf[b, t, k].double() * f0[b, t, k].double()).cpu()
                err = (x[:, 0].double() * e[:, 0].double()).sum(-1)  # [B, T]
                eb, et = torch.nonzero(torch.arange(f0.shape[1], device=f0.device)[None] <= Pd[:, None],
                                       as_tuple=True)
                v_e = err[eb, et].cpu()
            b, t, k, eb, et = b.cpu(), t.cpu(), k.cpu(), eb.cpu(), et.cpu()
            # interleave: the valid positions in (b, t) order (row b's are t = 0..P_b), each position's features
            # then its error; the error at position p lands after every feature at positions <= p and p errors
            n_pos = len(eb)
            at = torch.cumsum(P + 1, 0) - (P + 1)  # each row's first valid position's index
            p_f = at[b] + t
            i_f = torch.arange(len(b)) + p_f
            i_e = torch.cumsum(torch.bincount(p_f, minlength=n_pos), 0) + torch.arange(n_pos)
            n = len(b) + n_pos
            bb, tt, kk = (torch.empty(n, dtype=torch.long) for _ in range(3))
            vv = torch.empty(n, dtype=torch.float64)
            bb[i_f], tt[i_f], kk[i_f], vv[i_f] = b, t, k, v_f
            bb[i_e], tt[i_e], vv[i_e] = eb, et, v_e
            kk[i_e] = g.sae.d_sae
            out.append((bb, tt, kk, vv))
        return out

    def _sae_contributions(self, g, ts: tuple, ge: torch.Tensor) -> torch.Tensor:
        """An SAE group's ``[B, T, d_sae + 1]`` of :meth:`contributions`: ``grad_f . f`` (float64 products) at the
        active features, 0 at the inactive ones (a TopK SAE's ``d_sae - k`` zeros per position: no float64 copy of
        the dense codes and gradients), the error's ``grad_e . e`` last. The active entries and the error are
        :func:`~saecircuits.analysis.circuit.estimates._contributions`' floats; the inactive ones are never read
        (a feature is a node where it is active, :func:`~.position_graph._candidates`)."""
        f, e = ts
        with torch.no_grad():
            gf = self.feature_grad(g, ge)[:, 0]  # [B, T, d_sae]
            f0 = f[:, 0]
            b, t, k = torch.nonzero(f0, as_tuple=True)
            out = torch.zeros(*f0.shape[:-1], f0.shape[-1] + 1, dtype=torch.float64, device=f0.device)
            out[b, t, k] = gf[b, t, k].double() * f0[b, t, k].double()
            out[..., -1] = (ge[:, 0].double() * e[:, 0].double()).sum(-1)
        return out.cpu()


@torch.enable_grad()
def tracked_forward(engine, pg: PositionGroups, batch: TaskBatch, baselines: dict) -> Tracked:
    """A forward of every position exposing each group's activation to autograd, unchanged in value up to float
    rounding: SAE outputs rebuilt as ``decode(f) + e`` from ``f`` and the leaf ``e`` plus a straight-through
    ``x - x.detach()`` (Sparse Feature Circuits' decomposition, as :func:`..._tracking_edits` at P)."""
    leaves: list = [None] * len(pg.groups)
    inputs: dict = {}
    hooks: dict = {}
    for gi, g in enumerate(pg.groups):
        if g.kind == "sae":
            sae = g.sae

            def fn(x_in, x, gi=gi, sae=sae):
                x = x.to(edit_dtype(sae, x))
                inputs[gi] = x_in
                with torch.no_grad():
                    f = sae.encode(x_in)
                    rec = sae.decode(f, x_in).to(x.dtype)
                e = (x.detach() - rec).requires_grad_(True)
                leaves[gi] = (f, e)
                through = x - x.detach() if x.requires_grad else 0.0
                return rec + e + through

            _add_sae_hook(hooks, g, fn)
        else:
            def fn(a, gi=gi):
                a = _track(a)
                leaves[gi] = (a,)
                return a

            hooks.setdefault(g.hook, []).append(fn)
    kv: list = []
    x = engine.forward_tokens(batch.tokens, hooks, keep_kv=kv)
    rows = torch.arange(x.shape[0], device=x.device)
    lg = engine.logits(x[rows, :, batch.positions.to(x.device)])
    m = _answer_logprob(lg, batch.answer_ids)[:, 0]
    return Tracked(leaves, inputs, kv, m, baselines)


@torch.enable_grad()
def node_attributions(engine, pg: PositionGroups, batch: TaskBatch, baselines: dict
                      ) -> tuple[Tracked, list[torch.Tensor]]:
    """AtP node effects at every position with one backward pass: ``grad_a m . a`` per group ``[B, T, n_local]``
    (``grad_a m . (a - mean)`` for the groups of ``baselines``, :func:`ablation_baselines`; nats; 0 at padding
    positions after each row's P, where the gradient is 0). Returns the tracked forward too."""
    tr = tracked_forward(engine, pg, batch, baselines)
    flat = tr.flat()
    grads = torch.autograd.grad(tr.m.sum(), flat, retain_graph=True, allow_unused=True)
    return tr, tr.contributions(pg, grads)


@torch.enable_grad()
def node_attribution_entries(engine, pg: PositionGroups, batch: TaskBatch, baselines: dict
                             ) -> tuple[Tracked, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """:func:`node_attributions` at the nodes alone (:meth:`Tracked.node_contributions`: per group ``(b, t, k,
    value)`` at positions ``<= P``, features where active): the same floats, no dense tensors."""
    tr = tracked_forward(engine, pg, batch, baselines)
    grads = torch.autograd.grad(tr.m.sum(), tr.flat(), retain_graph=True, allow_unused=True)
    return tr, tr.node_contributions(pg, grads, batch.positions)


# ----------------------------------------------------------------------------------------------------------------
# exact node effects and edges by intervention at position t


@dataclass
class PromptNodes:
    """One prompt's chosen nodes (int64 ``[n]`` each): group, in-group index, position."""

    gi: torch.Tensor
    local: torch.Tensor
    pos: torch.Tensor


def _per_position_floats(engine, T: int, pg: PositionGroups) -> int:
    """Floats per recomputed position and variant (activations, scores over T keys, SAE codes): the chunk budget."""
    sae = sum(g.sae.d_sae for g in pg.groups if g.kind == "sae")
    return 8 * engine.d_model + engine.n_heads * T + sae + 64


def exact_node_effects(
    engine, pg: PositionGroups, clean: CleanCache, nodes: list[PromptNodes], down: list[PromptNodes] | None = None,
    *, baselines: dict,
) -> tuple[list[torch.Tensor], list[dict[tuple[int, int], float]], int]:
    """Exact effect of ablating each chosen node alone at its position, and its exact edges into ``down`` nodes.

    Per distance ``d`` from P, the rows with nodes at ``t = P - d`` recompute positions ``t..P`` (``d + 1``
    positions) from the earliest edited half-block on, one variant per node plus the clean variant 0; a row is a
    piece of one prompt's nodes at ``d`` (:func:`_piece_width`: prompts with few nodes there do not pad to the
    prompt with most).

    Args:
        nodes: per prompt of the batch (batch order), the nodes to ablate.
        down: per prompt, the feature nodes whose change is read (edges ``u -> d`` for ``d`` at ``p_d >= t`` of a
            later stage); None = no edges.
        baselines: :func:`ablation_baselines` (the embeddings are set to their mean).

    Returns:
        ``(effects, edges, n_interventions)``: per prompt float64 ``[n]`` (nats); per prompt ``{(i_u, i_d):
        f_d(clean) - f_d(u ablated)}`` (indices into ``nodes[b]`` and ``down[b]``, non-zero values only); the
        number of ablations run.
    """
    batch = clean.batch
    B, T = batch.tokens.shape
    P = batch.positions.cpu()
    effects = [torch.full((len(n.gi),), float("nan"), dtype=torch.float64) for n in nodes]
    edges: list[dict] = [{} for _ in nodes]
    dist = [P[b] - n.pos for b, n in enumerate(nodes)]
    all_d = sorted({int(x) for dd in dist for x in dd.tolist()})
    per_pos = _per_position_floats(engine, T, pg)
    values = {pg.groups[gi].hook: v for gi, v in baselines.items()}  # _single_edit's {hook: value}
    n_runs = 0
    # per prompt, its nodes' indices by distance (increasing indices at each distance), in one sort per prompt
    by_d: list[dict[int, torch.Tensor]] = []
    for dd in dist:
        order = torch.argsort(dd, stable=True)
        keys, counts = torch.unique_consecutive(dd[order], return_counts=True)
        by_d.append(dict(zip(keys.tolist(), order.split(counts.tolist()), strict=True)))
    with torch.no_grad():
        for d in all_d:
            which = [(b, by_d[b][d]) for b in range(B) if d in by_d[b]]
            per_variant = (d + 1) * per_pos
            width = _piece_width([len(w) for _, w in which], max(1, MAX_FLOATS // per_variant - 1))
            # rows of the recomputation: pieces of at most `width` nodes of one prompt (a prompt may fill several)
            pieces = [(b, w[j : j + width]) for b, w in which for j in range(0, len(w), width)]
            step = max(1, MAX_FLOATS // ((width + 1) * per_variant))
            for r0 in range(0, len(pieces), step):
                part = pieces[r0 : r0 + step]
                n_runs += sum(len(s) for _, s in part)
                _exact_chunk(engine, pg, clean, [b for b, _ in part], [s for _, s in part], d, nodes, down, effects,
                             edges, values)
    return effects, edges, n_runs


def _piece_width(counts: list[int], cap: int) -> int:
    """Variants per row (besides the clean one) for prompts with ``counts`` nodes at one distance: every row
    computes ``1 + width`` variants, so one prompt with many nodes beside many with a few would make the few pad
    to the many; a prompt's nodes are split into pieces of ``width`` instead, ``width`` (at most ``cap``)
    minimising the variants computed, ``sum(ceil(c / width) * (1 + width))`` (ties: the wider, fewer rows)."""
    best, best_cost = 1, None
    for w in range(1, min(max(counts), cap) + 1):
        cost = sum(-(-c // w) * (1 + w) for c in counts)
        if best_cost is None or cost <= best_cost:
            best, best_cost = w, cost
    return best


def _exact_chunk(engine, pg, clean, rows, sel, d, nodes, down, effects, edges, values) -> None:
    batch = clean.batch
    dev = batch.tokens.device
    T = batch.tokens.shape[1]
    n, V = len(rows), 1 + max(len(s) for s in sel)  # variant 0: clean
    r = torch.tensor(rows, device=dev)
    P = batch.positions.to(dev)[r]
    t0 = P - d
    S = d + 1
    qpos = t0[:, None] + torch.arange(S, device=dev)[None]
    # per group, int64 [n, V]: row i's j-th node (its in-group index) at variant 1 + j where it is of that group
    tab = torch.full((len(pg.groups), n, V), -1, dtype=torch.long)
    lens = torch.tensor([len(s) for s in sel], dtype=torch.long)
    tab[torch.cat([nodes[b].gi[s] for b, s in zip(rows, sel, strict=True)]),
        _repeat(torch.arange(n), lens),
        1 + _ragged_arange(lens)] = torch.cat(
        [nodes[b].local[s] for b, s in zip(rows, sel, strict=True)])
    tables = dict(enumerate(tab))
    hooks: dict = {}
    stages, edited = [], []
    for gi, tab in tables.items():
        if bool((tab >= 0).any()):
            g = pg.groups[gi]
            edited.append(gi)
            _first_position(_single_edit(g, tab, values), hooks)
            # from the earlier of the hook edited and the one it reads (a transcoder's input)
            stages.append(min(stage_of_hook(h, engine.n_layers) for h in (g.hook, g.hook_in)))
    start = engine.restart_stage(min(stages))
    cols = _last_block_positions(engine, pg, rows, edited, d, down, t0.cpu(), start)
    reads: dict = {}
    if down is not None:
        for gi, g in enumerate(pg.groups):
            if g.kind == "sae":
                hooks.setdefault(g.hook_in, []).append(_box(reads, gi) if cols is None else _box_at(reads, gi, cols, S))
    # the cached keys/values the rows' queries may see: positions < each row's t (none of the others is read)
    Tp = _prefix_length(t0, T)
    valid = torch.arange(Tp, device=dev)[None] < t0[:, None]
    prefixes = [KVPrefix(k[r, 0, :Tp].transpose(1, 2), v[r, 0, :Tp].transpose(1, 2), valid) for k, v in clean.kv]
    if start[0] < 0:
        x0 = engine.embed(batch.tokens[r[:, None], qpos], qpos, hooks)
        start = (0, 0)
    else:
        x0 = clean.resid[start][r[:, None], 0, qpos][:, None]  # [n, 1, S, d_model]
    x = engine.forward_resid(x0, qpos, prefixes, hooks, start=start, last_positions=cols)
    lg = engine.logits(x[:, :, -1])  # [n, F, d_vocab] (P: the last position kept)
    m = _answer_logprob(lg.expand(n, V, lg.shape[-1]), batch.answer_ids.to(dev)[r]).double().cpu()
    for i, (b, s) in enumerate(zip(rows, sel, strict=True)):
        effects[b][s] = m[i, 0] - m[i, 1 : 1 + len(s)]
    if down is None:
        return
    _chunk_edges(pg, rows, sel, d, P.cpu(), nodes, down, reads, edges, dev)


def _prefix_length(t0: torch.Tensor, T: int) -> int:
    """Cached positions a recomputation's prefix holds: up to the latest first recomputed position ``t0`` of its
    rows (later ones are masked for every row; at least one, an empty softmax part has no maximum)."""
    return max(1, min(T, int(t0.max())))


def _last_block_positions(engine, pg, rows, edited, d, down, t0, start) -> torch.Tensor | None:
    """The recomputed positions (relative to each row's first, ``0..d``) where the last block must compute its
    queries, attention output and MLP half (``forward_resid``'s ``last_positions``): the answer's position P
    (``d``), the edited one (0) when a group of the last block is edited (``edited``: the groups with nodes
    ablated), and the downstream features' positions of SAEs read in the last block (``t0``: each row's first
    position, CPU); None when that is every position (or the block is parallel, or the recomputation starts after
    it).

    Nothing after the last block's attention mixes positions, so at any other position its output feeds nothing
    that is read (the answer at P, the edges' SAE codes): each kept position gets what the recomputation of every
    position gives it (the same per-position operations on the same inputs, up to float32 rounding of another
    matmul shape), and the last block's work is that of the kept positions (its keys and values aside)."""
    last = (engine.n_layers - 1, 0)
    if engine.shape.parallel or engine.n_layers < 1 or start > (engine.n_layers - 1, 1) or d == 0:
        return None
    need = torch.zeros(d + 1, dtype=torch.bool)
    need[d] = True
    need[0] = any(max(stage_of_hook(h, engine.n_layers) for h in (pg.groups[gi].hook, pg.groups[gi].hook_in)) >= last
                  for gi in edited)
    late = [gi for gi, g in enumerate(pg.groups) if g.kind == "sae" and stage_of_hook(g.hook_in, engine.n_layers) >= last]
    if down is not None and late:
        sizes = torch.tensor([len(down[b].gi) for b in rows], dtype=torch.long)
        rel = torch.cat([down[b].pos for b in rows]) - _repeat(t0, sizes)
        ok = torch.isin(torch.cat([down[b].gi for b in rows]), torch.tensor(late)) & (rel >= 0) & (rel <= d)
        need[rel[ok]] = True
    return None if bool(need.all()) else torch.nonzero(need).flatten()


def _box_at(store: dict, key, cols: torch.Tensor, S: int):
    """:func:`_box` of an activation of a recomputation whose last block keeps the positions ``cols`` of ``S``: as
    it is where it has every position, else stored at those positions (the others zero, never read)."""
    def fn(x: torch.Tensor) -> None:
        if x.shape[2] == S:
            store[key] = x
            return
        full = x.new_zeros(*x.shape[:2], S, *x.shape[3:])
        full[:, :, cols.to(x.device)] = x
        store[key] = full

    return fn


def _ragged_arange(lengths: torch.Tensor) -> torch.Tensor:
    """``cat([arange(n) for n in lengths])`` in array operations (int64 ``[sum(lengths)]``)."""
    total = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total) - _repeat(starts, lengths)


def _repeat(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``torch.repeat_interleave(values, counts)`` of CPU int64 tensors through numpy: the same integers, without
    torch's per-call cost (a tenth of a millisecond and more; the exact interventions' index arithmetic makes
    thousands of these calls)."""
    return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))


def _chunk_edges(pg, rows, sel, d, P, nodes, down, reads, edges, dev) -> None:
    """The exact edges of one :func:`_exact_chunk`: ``f_d(clean) - f_d(u ablated)`` for every row's ablated node
    ``u`` and its prompt's downstream features ``d`` at positions ``>= t`` of SAE groups whose input ``u`` precedes,
    non-zero ones into ``edges[b]``. Per SAE group read, the positions holding downstream nodes of the clean variant
    and of the variants ablating an upstream node are encoded in one call (the encoder is most of the cost), every
    row's entries built and read in array operations (``P``: the rows' prediction positions, CPU).

    Row ``i``'s encoded block is variant-major (its clean variant 0, then each upstream variant in node order) over
    its distinct downstream positions in increasing order, the blocks in row order: the rows the per-row loop this
    replaces encoded, in its order."""
    n = len(rows)
    t0 = P - d  # [n] the first recomputed position of each row
    stage_of = torch.tensor(pg.stage, dtype=torch.long)
    # every row's ablated nodes (row order, then the row's order = its variants 1, 2, ...)
    n_up = torch.tensor([len(s) for s in sel], dtype=torch.long)
    u_row = _repeat(torch.arange(n), n_up)
    u_var = 1 + _ragged_arange(n_up)  # the variant ablating it
    u_node = torch.cat(list(sel))  # index into nodes[b]
    u_stage = torch.cat([stage_of[nodes[b].gi[s]] for b, s in zip(rows, sel, strict=True)])
    # every row's prompt's downstream features at positions >= the row's t
    n_dn = torch.tensor([len(down[b].gi) for b in rows], dtype=torch.long)
    d_row = _repeat(torch.arange(n), n_dn)
    d_node = _ragged_arange(n_dn)  # index into down[b]
    d_gi = torch.cat([down[b].gi for b in rows])
    d_rel = torch.cat([down[b].pos for b in rows]) - t0[d_row]
    d_local = torch.cat([down[b].local for b in rows])
    b_of_row = torch.tensor(rows, dtype=torch.long)
    for gi in list(reads):
        x_in = reads[gi]  # [n, F, S, d_in]; F = 1 when no variant differs before this hook (then no edge)
        if x_in.shape[1] == 1:
            continue
        S = x_in.shape[2]
        # per row, only the clean variant and those ablating a node upstream of this SAE's input are encoded (the
        # others cannot move its codes; rows padded to V variants are not encoded either)
        ok = u_stage < pg.stage_in[gi]
        want = (d_gi == gi) & (d_rel >= 0)
        has_up = torch.bincount(u_row[ok], minlength=n) > 0
        has_dn = torch.bincount(d_row[want], minlength=n) > 0
        item = has_up & has_dn  # rows with entries in this group
        if not bool(item.any()):
            continue
        ok &= item[u_row]
        want &= item[d_row]
        up_row, up_var, up_node = u_row[ok], u_var[ok], u_node[ok]
        w_row, w_rel, w_node, w_local = d_row[want], d_rel[want], d_node[want], d_local[want]
        # each row's distinct downstream positions, increasing, and each wanted node's column among them
        where, col = torch.unique(w_row * S + w_rel, return_inverse=True)
        where_row = where // S
        nu = torch.bincount(up_row, minlength=n)  # upstream variants per row
        nw = torch.bincount(where_row, minlength=n)  # distinct positions per row
        nd = torch.bincount(w_row, minlength=n)  # wanted downstream nodes per row
        col = col - (torch.cumsum(nw, 0) - nw)[w_row]
        size = (1 + nu) * nw  # encoded rows per row (0 where not an item)
        o = torch.cumsum(size, 0) - size  # each row's offset into the encoded rows
        # the encoded rows: per row, variant slot v (0 = clean, k = its k-th upstream variant), position column c
        e_row = _repeat(torch.arange(n), size)
        r = _ragged_arange(size)
        v, c = r // nw[e_row], r % nw[e_row]
        up_start = torch.cumsum(nu, 0) - nu
        vrow = torch.where(v > 0, up_var[(up_start[e_row] + v - 1).clamp(min=0, max=max(len(up_var) - 1, 0))], 0)
        pos = where[(torch.cumsum(nw, 0) - nw)[e_row] + c] % S
        xs = pg.groups[gi].sae.flatten_input(x_in[e_row.to(dev), vrow.to(dev), pos.to(dev)])
        f_all = pg.groups[gi].sae.encode(xs).float()  # [sum size, d_sae]
        # entries: per row, each upstream variant (slot 1..) x each wanted downstream node (node order)
        cnt = nu * nd
        q = _repeat(torch.arange(n), cnt)
        r = _ragged_arange(cnt)
        vi, di = r // nd[q], r % nd[q]
        dn_at = (torch.cumsum(nd, 0) - nd)[q] + di
        clean_at = o[q] + col[dn_at]
        var_at = clean_at + nw[q] * (1 + vi)
        feat = w_local[dn_at].to(dev)
        # f_d(clean) - f_d(u ablated) per entry: the elementwise float32 difference, then float64
        delta = (f_all[clean_at.to(dev), feat] - f_all[var_at.to(dev), feat]).double().cpu()
        nz = torch.nonzero(delta != 0).flatten()  # (python floats in bulk: one tensor index per edge is slow)
        b_nz = b_of_row[q[nz]].tolist()
        u_nz = up_node[up_start[q[nz]] + vi[nz]].tolist()
        d_nz = w_node[dn_at[nz]].tolist()
        v_nz = delta[nz].tolist()
        a = 0
        for z in range(1, len(b_nz) + 1):  # each prompt's entries are contiguous (its rows are), in entry order
            if z == len(b_nz) or b_nz[z] != b_nz[a]:
                edges[b_nz[a]].update(zip(zip(u_nz[a:z], d_nz[a:z], strict=True), v_nz[a:z], strict=True))
                a = z


# ----------------------------------------------------------------------------------------------------------------
# AtP edges and head loadings


@torch.enable_grad()
def attribution_edges(pg: PositionGroups, tr: Tracked, up: list[PromptNodes], down: list[PromptNodes]
                      ) -> list[dict[tuple[int, int], float]]:
    """AtP edges ``grad_u f_d . a_u`` from every ``up`` node into every ``down`` feature of each prompt (``u`` at an
    earlier stage, ``pos(u) <= pos(d)``). Slot ``j`` is each prompt's ``j``-th downstream feature: one backward pass
    per slot for the whole batch. (A batched backward over slots, ``is_grads_batched=True``, was 8x slower on CPU
    for the demo model, so the passes run one after another on the retained graph.)

    Returns:
        per prompt ``{(i_u, i_d): estimate}`` (activation units; every valid pair, 0 included).
    """
    out: list[dict] = [{} for _ in up]
    flat = tr.flat()
    n_slots = max((len(dn.gi) for dn in down), default=0)
    stage_of = torch.tensor(pg.stage, dtype=torch.long)
    up_stage = [stage_of[u.gi] for u in up]
    plan = None
    for j in range(n_slots):
        have = [b for b, dn in enumerate(down) if j < len(dn.gi)]
        target = torch.stack([tr.feature(pg, int(down[b].gi[j]), b, int(down[b].pos[j]), int(down[b].local[j]))
                              for b in have]).sum()
        grads = torch.autograd.grad(target, flat, retain_graph=True, allow_unused=True)
        if plan is None or plan[0] != have:  # the prompts with a j-th slot: the same ones over most slots
            plan = (have, tr.gather_plan(pg, have, [up[b] for b in have]))
        for b, vals in zip(have, tr.gathered(pg, grads, have, [up[b] for b in have], plan[1]), strict=True):
            u, dn = up[b], down[b]
            ok = (up_stage[b] < pg.stage_in[int(dn.gi[j])]) & (u.pos <= int(dn.pos[j]))
            a = torch.nonzero(ok).flatten()
            out[b].update(zip([(x, j) for x in a.tolist()], vals[a].tolist(), strict=True))
    return out


def head_labels(engine) -> list[str]:
    """Labels of the (layer, key/value head) parts of a head loading: ``L1H3``, or ``L1KV0`` under grouped-query
    attention."""
    K = engine.n_kv_heads
    tag = "H" if K == engine.n_heads else "KV"
    return [f"L{layer}{tag}{j}" for layer in range(engine.n_layers) for j in range(K)]


@torch.enable_grad()
def head_loadings(engine, pg: PositionGroups, clean: CleanCache, tr: Tracked, up: list[PromptNodes],
                  down: list[PromptNodes], targets: list[list[int]]) -> list[dict[tuple[int, int], list[float]]]:
    """Per-(layer, key/value head) parts of the AtP edges ``u -> d`` between positions (``pos(u) < pos(d)``), for
    the downstream nodes ``targets[b]`` (indices into ``down[b]``; -1 = the target m at P). See the module
    docstring: the parts sum to the AtP edge exactly.

    Per slot: position ``p_d`` is recomputed from leaves holding the clean keys/values of positions ``< p_d``; one
    backward gives ``dG/dk``, ``dG/dv``; then one backward per (layer, key/value head) from
    ``sum_t dG/dk_t . k_t + dG/dv_t . v_t`` through the tracked forward gives each upstream node's part.

    Returns:
        per prompt ``{(i_u, i_d): [part per head_labels(engine) entry]}`` (``i_d = -1`` for the target).
    """
    batch = clean.batch
    dev = batch.tokens.device
    T = batch.tokens.shape[1]
    out: list[dict] = [{} for _ in up]
    flat = tr.flat()
    K = engine.n_kv_heads
    n_slots = max((len(t) for t in targets), default=0)
    for j in range(n_slots):
        have = [b for b in range(len(up)) if j < len(targets[b])]
        r = torch.tensor(have, device=dev)
        which = [targets[b][j] for b in have]
        pd = torch.tensor([int(batch.positions[b]) if w < 0 else int(down[b].pos[w]) for b, w in zip(have, which,
                                                                                                         strict=True)],
                          device=dev)
        leaves = [(k[r, 0].transpose(1, 2).detach().requires_grad_(True),
                   v[r, 0].transpose(1, 2).detach().requires_grad_(True)) for k, v in clean.kv]
        valid = torch.arange(T, device=dev)[None] < pd[:, None]
        prefixes = [KVPrefix(k, v, valid) for k, v in leaves]
        reads: dict = {}
        hooks: dict = {}
        for gi, g in enumerate(pg.groups):
            if g.kind == "sae":
                hooks.setdefault(g.hook_in, []).append(_box(reads, gi))
        x0 = engine.embed(batch.tokens[r, pd][:, None], pd[:, None], hooks)
        x = engine.forward_resid(x0, pd[:, None], prefixes, hooks, start=(0, 0))
        parts = []
        for i, (b, w) in enumerate(zip(have, which, strict=True)):
            if w < 0:
                lg = engine.logits(x[i : i + 1, :, -1])
                parts.append(_answer_logprob(lg, batch.answer_ids[b : b + 1].to(dev))[0, 0])
            else:
                g = pg.groups[int(down[b].gi[w])]
                x_in = g.sae.flatten_input(reads[int(down[b].gi[w])][i, 0, 0])
                parts.append(attached_features(g.sae, x_in[None], torch.tensor([int(down[b].local[w])]))[0, 0])
        gkv = torch.autograd.grad(torch.stack(parts).sum(), [t for kv in leaves for t in kv], allow_unused=True)
        # per prompt: its upstream nodes before p_d and their parts, one column per (layer, key/value head)
        before = [torch.nonzero(up[b].pos < int(pd[i])).flatten() for i, b in enumerate(have)]
        plan = tr.gather_plan(pg, have, [up[b] for b in have])  # one per slot: every head's gradient reads it
        table = [torch.zeros(len(a), engine.n_layers * K, dtype=torch.float64) for a in before]
        filled = False
        for layer, (k, v) in enumerate(tr.kv):
            gk = gkv[2 * layer]
            gv = gkv[2 * layer + 1]
            for kh in range(K):
                s = 0.0
                if gk is not None:
                    s = s + (k[r, 0, :, kh].float() * gk[:, kh].float()).sum()
                if gv is not None:
                    s = s + (v[r, 0, :, kh].float() * gv[:, kh].float()).sum()
                if not torch.is_tensor(s) or not s.requires_grad:
                    continue
                grads = torch.autograd.grad(s, flat, retain_graph=True, allow_unused=True)
                col = layer * K + kh
                every = tr.gathered(pg, grads, have, [up[b] for b in have], plan)
                for i, vals in enumerate(every):
                    table[i][:, col] = vals[before[i]]
                filled = True
        if filled:
            for b, w, a, tab in zip(have, which, before, table, strict=True):
                out[b].update(zip(((x, w) for x in a.tolist()), tab.tolist(), strict=True))
    return out
