"""The circuit's nodes at P: which features, errors, heads, MLPs and embeddings are nodes, how each is grouped by
hook, and the edits that ablate one node or a mask of nodes (the conventions are in the package docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.ablations.feature_effects import FeatureActs
from saecircuits.analysis.ablations.modes import edit_dtype, sae_edit
from saecircuits.models.engine import stage_of_hook
from saecircuits.models.interventions import Edit
from saecircuits.saes.base import SAE
from saecircuits.saes.sparse_codes import nonzero_codes, sparse_decode


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


MEAN_ABLATED_HOOKS = ("hook_embed", "hook_pos_embed")
"""Hooks whose nodes every single-node ablation (exact effects, edges, AtP, IG) sets to their mean, not to 0: the
token and position embeddings. Zero is far off their distribution: the residual stream at a position is then the
first block's output alone, and on the demo model zero-ablating one earlier position's position embedding moved
log p(answer) by 5 to 8.6 nats; and since every read of the embeddings goes through a LayerNorm, which is scale
invariant, ``grad . (embed + pos_embed) ~ 0``, so the AtP of a zero ablation of ``embed`` is about minus that of
``pos_embed`` and means nothing. A mean-ablated node's AtP is ``grad . (a - mean)`` (:func:`ablation_values`)."""


def ablation_values(groups: Sequence[_Group], means: dict) -> dict:
    """The values single-node ablations write for the mean-ablated groups (:data:`MEAN_ABLATED_HOOKS`): ``{hook:
    mean}`` taken from ``means`` (``{hook: value}``, :func:`~saecircuits.analysis.circuit.node_means` or
    :func:`~saecircuits.analysis.circuit.corpus_node_means`'s format). Every other node keeps its ablation (feature
    -> subtracted, error -> removed, head / MLP -> 0). The one place that says which nodes are mean-ablated; pass
    the result as ``means`` of :func:`_single_edit` and as ``baselines`` of the estimates.

    Raises:
        ValueError: ``means`` lacks the mean of an embedding group of ``groups``.
    """
    out = {}
    for g in groups:
        if g.hook in MEAN_ABLATED_HOOKS:
            if g.hook not in means:
                raise ValueError(f"no mean for {g.hook}: embedding nodes are mean-ablated, pass means of every group")
            out[g.hook] = means[g.hook]
    return out


def _single_edit(group: _Group, table: torch.Tensor, means: dict | None, memo: dict | None = None) -> Edit:
    """Variant ``v`` of prompt ``b`` ablates in-group index ``table[b, v]`` (-1: nothing) of ``group``.

    Zero ablation when ``means`` is None or holds no value for ``group.hook``, else mean ablation
    (``means[group.hook]``); the circuit passes :func:`ablation_values` (embeddings to their mean, the rest as the
    package docstring says).

    ``memo``: a dict kept across the runs of one batch (the chunks of its variants). An SAE group whose variants
    share their input there (nothing upstream ablated) encodes it once: a later run whose input equals the kept one
    bit for bit reuses its codes and reconstruction (the same values the encode would give), so each chunk does not
    pay a dense ``[B, d_in] x [d_in, d_sae]`` encode again.
    """
    V = table.shape[1]
    mu = None if means is None else means.get(group.hook)
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
            x = x.to(dt)
            if x.shape[1] == 1 and x_in.shape[1] == 1:  # the variants share x: one code per prompt
                kept = None if memo is None else memo.get("x_in")
                if kept is not None and kept.shape == x_in.shape and torch.equal(kept, x_in):
                    f = memo["f"]
                else:
                    f = sae.encode(x_in)  # [B, 1, d_sae]
                    if memo is not None:
                        memo.clear()
                        memo.update(x_in=x_in.detach().clone(), f=f)
                fk = f.expand(-1, V, -1).gather(-1, k[..., None])[..., 0].to(dt)
                if mu is not None:
                    fk = fk - mu["f"].to(fk)[k]
                out = x - (fk * is_feat)[..., None] * W_dec[k].to(dt)
                if not bool(is_err.any()):
                    return out
                if memo is None:
                    recon = sae.decode(f, x_in)
                elif "recon" in memo:
                    recon = memo["recon"]
                else:
                    recon = memo["recon"] = sae.decode(f, x_in)
                e = x - recon.to(dt)
                if mu is not None:
                    e = e - mu["e"].to(e)
                return out - is_err[..., None] * e
            # the variants differ (an earlier node ablated): only the rows whose variant ablates a node of this group
            # need a code (a feature's value, the error's decode); every other row is x as it is. Those rows mostly
            # hold one value per prompt (nothing upstream of the group ablated in them), so each distinct input row
            # is encoded once
            out = x.expand(x.shape[0], V, *x.shape[2:]).clone()
            b, v = torch.nonzero(is_feat | is_err, as_tuple=True)
            if not len(b):
                return out
            xi = x_in[b, v if x_in.shape[1] > 1 else torch.zeros_like(v)]
            first = torch.searchsorted(b, b)  # b is sorted: the first row of each prompt
            src = torch.where((xi == xi[first]).flatten(1).all(-1), first, torch.arange(len(b), device=b.device))
            uniq, inv = torch.unique(src, return_inverse=True)
            f = sae.encode(xi[uniq])[inv]  # [n, d_sae]
            kk = k[b, v]
            fk = f.gather(-1, kk[:, None])[:, 0].to(dt)
            if mu is not None:
                fk = fk - mu["f"].to(fk)[kk]
            rows = out[b, v] - (fk * is_feat[b, v])[:, None] * W_dec[kk].to(dt)
            err = is_err[b, v]
            if bool(err.any()):
                e = rows[err] - sae.decode(f[err], xi[err]).to(dt)
                if mu is not None:
                    e = e - mu["e"].to(e)
                rows[err] = rows[err] - e
            out[b, v] = rows
            return out

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
            W = W_dec.to(dt)
            # ((f - mu_f) * mask) @ W_dec as (f * mask) @ W_dec, decoded from each row's active codes only, minus
            # (mu_f * mask) @ W_dec, one row per variant: no dense [rows, d_sae] x [d_sae, d_out] product
            vals, idx = nonzero_codes(f)  # [B, F, m]
            B, V = f.shape[0], mf.shape[1]
            idx_v = idx.expand(B, V, idx.shape[-1])
            on = mf.expand(B, V, mf.shape[-1]).gather(-1, idx_v)
            kept = sparse_decode((vals.to(dt) * on).flatten(0, 1), idx_v.flatten(0, 1), W).unflatten(0, (B, V))
            delta = kept - (mu["f"].to(dt) * mf[0]) @ W
            if W_dec.dtype in (torch.float32, torch.float64):
                recon = sparse_decode(vals.flatten(0, 1), idx.flatten(0, 1), W).unflatten(0, idx.shape[:2])
                recon = recon + sae.decoder_bias(x_in if sae.decode_needs_input else None).to(dt)
            else:  # a bf16 SAE's reconstruction is its own decode, rounded once, as the dense matmul rounds it
                recon = sae.decode(f, x_in).to(dt)
            e = x - recon - mu["e"].to(x)
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


def _final_read(iv) -> str | None:
    """The hook whose value at P :func:`_paired_answer_logprob` unembeds (the engine's last residual stream, which
    its logits are computed from), or None on the bridge backend (the run's logits are used)."""
    return None if iv.engine is None else f"blocks.{iv.n_layers - 1}.hook_resid_post"


UNEMBED_ROWS_FLOATS = 1 << 23
"""Logits made at once by :func:`_paired_answer_logprob` (32 MB of float32: 166 rows of GPT-2's vocabulary)."""


def _paired_answer_logprob(iv, run, final: str | None, answer_ids: torch.Tensor, memo: dict | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer log-probs (nats) of a :meth:`~saecircuits.models.interventions.Interventions.run_paired` run: ``(base
    [B], variants [B, V])``.

    With ``final`` (:func:`_final_read`; the run read it with ``logits=False``) the rows' residual streams go through
    :meth:`~saecircuits.models.engine.Engine.losses` (the final norm and unembedding of the engine's own logits, and
    the log-softmax :func:`_answer_logprob` takes) :data:`UNEMBED_ROWS_FLOATS` logits at a time: no ``[B, V,
    d_vocab]`` tensor is built, so a chunk of variants is bounded by its activations, not its logits. Else the run's
    logits (:func:`_answer_logprob`). A variant that is the baseline run (``run.same``) gets the baseline's value,
    so an ablation that changes nothing has an effect of exactly 0 whichever rows its unembedding was chunked with;
    on the engine such a variant (a padding slot of a variant table, say) is not unembedded at all: a row's
    log-softmax over the vocabulary is most of what a variant costs at GPT-2's vocabulary.

    ``memo``: a dict kept across the runs of one batch (the chunks of its variants): a run whose baseline residual
    stream equals the kept one bit for bit reuses its log-probs (the same input, so the same values) instead of
    unembedding the baseline again; one restarted from another hook is unembedded, so effects stay paired with
    their own run's baseline.
    """
    if final is None:
        base = _answer_logprob(run.base_logits[:, None], answer_ids)[:, 0]
        var = _answer_logprob(run.logits, answer_ids)
    else:
        rows = run.reads[final]  # [B, V, d_model]
        B, V = rows.shape[:2]
        dev = rows.device
        # only the variants that differ from the baseline run are unembedded (the others get its value below)
        need = torch.ones(B, V, dtype=torch.bool) if run.same is None else ~run.same.cpu()
        b_idx, v_idx = torch.nonzero(need, as_tuple=True)
        ans = answer_ids.to(dev)
        base_resid = run.base_reads[final]
        kept = None if memo is None else memo.get("resid")
        reuse = kept is not None and kept.shape == base_resid.shape and torch.equal(kept, base_resid)
        resid, answers = rows[b_idx.to(dev), v_idx.to(dev)], ans[b_idx.to(dev)]
        if not reuse:
            resid, answers = torch.cat([base_resid, resid]), torch.cat([ans, answers])
        lp = -iv.engine.losses(resid, answers, max_floats=UNEMBED_ROWS_FLOATS)
        if reuse:
            base = memo["lp"]
        else:
            base, lp = lp[:B], lp[B:]
            if memo is not None:
                memo.update(resid=base_resid.detach().clone(), lp=base)
        var = base[:, None].expand(B, V).clone()
        var[need.to(dev)] = lp
        return base, var
    if run.same is not None:
        var = torch.where(run.same.to(var.device), base[:, None], var)
    return base, var


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


def drain(steps):
    """Run a step generator (``_exact_steps``, ...) to its end: its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def lockstep(iv, *steps) -> list:
    """Run step generators that walk the same prompt batches in the same order one batch each in turn, inside
    :meth:`~saecircuits.models.interventions.Interventions.keeping_last_pass`: a batch's clean pass is made once
    for all of them, where each analysis alone would make it again once the cache budget is full (a thousand
    prompts at the reference shape). Each result is the one its generator gives alone (the same batches, the same
    clean passes). Returns the results in order."""
    out: list = [None] * len(steps)
    live = dict(enumerate(steps))
    with iv.keeping_last_pass():
        while live:
            for i, gen in list(live.items()):
                try:
                    next(gen)
                except StopIteration as stop:
                    out[i] = stop.value
                    del live[i]
    return out
