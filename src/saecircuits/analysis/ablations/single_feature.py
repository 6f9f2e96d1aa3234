"""Answer losses at P under single-feature (and set) ablations at P: the edits, the paired runs that measure them
against a baseline from the same run, and the clean / SAE-spliced losses they are compared with.

The ablation ``x_P - f_k(x_P) W_dec[k]`` (``mode="residual"``, the reference notebook's) and the other modes are in
:mod:`saecircuits.analysis.ablations.modes`; :mod:`saecircuits.analysis.ablations.feature_effects` runs them for
every active feature of every prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saecircuits.analysis.ablations.modes import (
    OffRangeCounter,
    ablation_base,
    baseline_edits,
    baseline_logits,
    check_mode,
    edit_dtype,
    sae_edit,
)
from saecircuits.models.engine import UNEMBED_CHUNK_FLOATS
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, answer_metrics, task_batches
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = [
    "answer_losses",
    "variant_losses",
    "spliced_losses",
    "features_ablation_edit",
    "one_feature_each_edit",
    "single_feature_ablation_losses",
    "MAX_LOGIT_FLOATS",
    "MAX_RUN_FLOATS",
]

MAX_LOGIT_FLOATS = 1 << 24
"""Budget for one chunk of edited logits (``B x V x d_vocab`` floats, 64 MB): the feature chunk size follows."""


def answer_losses(
    model, task: Task, *, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = DEFAULT_MAX_BATCH
) -> torch.Tensor:
    """Clean loss (nats) of the answer at P per prompt: float32 ``[n_prompts]`` in task order (logits at P only)."""
    iv = interventions_for(model)
    out = torch.zeros(task.n_prompts)
    for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
        clean = iv.clean(batch)
        out[torch.tensor(batch.indices)] = answer_metrics(clean.logits, batch.answer_ids)["loss"].cpu()
    return out


def variant_losses(
    model, task: Task, edit: Edit, n_variants: int, *, max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> torch.Tensor:
    """Answer loss (nats) at P per prompt, clean and under each of ``n_variants`` variants of one edit at P.

    Args:
        edit: :class:`~saecircuits.models.interventions.Edit` whose ``fn`` maps ``[B, F, *act]`` to
            ``[B, n_variants, *act]``.

    Returns:
        float32 ``[n_prompts, 1 + n_variants]`` in task order; column 0 is the clean loss, computed in the same run
        as the variants (:meth:`~saecircuits.models.interventions.Interventions.run_paired`), so a variant that
        leaves the activation unchanged has exactly the clean loss.
    """
    iv = interventions_for(model)
    out = torch.zeros(task.n_prompts, 1 + n_variants)
    for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
        rows = torch.tensor(batch.indices)
        run = iv.run_paired(iv.clean(batch), [edit], n_variants=n_variants)
        out[rows, 0] = answer_metrics(run.base_logits, batch.answer_ids)["loss"].cpu()
        out[rows, 1:] = answer_metrics(run.logits, batch.answer_ids)["loss"].cpu()
    return out


def spliced_losses(
    model, sae: SAE, task: Task, *, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = DEFAULT_MAX_BATCH
) -> torch.Tensor:
    """Answer loss (nats) at P with the SAE spliced in at P (``x_P <- decode(encode(x_P))``): float32 ``[n_prompts]``,
    task order (the baseline of the ``"clean_effect"`` ablation mode)."""
    iv = interventions_for(model)
    out = torch.zeros(task.n_prompts)
    for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
        clean = iv.clean(batch)
        logits = baseline_logits(iv, clean, sae, "clean_effect")
        out[torch.tensor(batch.indices)] = answer_metrics(logits, batch.answer_ids)["loss"].cpu()
    return out


def features_ablation_edit(
    sae: SAE, features: Sequence[int], mode: str = "residual", counter: OffRangeCounter | None = None
) -> Edit:
    """Edit at ``sae.hook_point`` ablating the set ``S`` together (one variant): ``base - encode(x)[S] @ W_dec[S]``
    with ``base = x`` (``mode="residual"``) or ``decode(encode(x))`` (``"reconstruction"``, ``"clean_effect"``; see
    :mod:`saecircuits.analysis.ablations.modes`).

    Args:
        counter: counts the edited activations that leave the hook's range (optional).
    """
    check_mode(mode)
    idx = torch.as_tensor(list(features), dtype=torch.long, device=sae.W_dec.device)

    def fn(x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = edit_dtype(sae, x)  # encode in the SAE's dtype, subtract in x's: a bf16 SAE never rounds x itself
        f = sae.encode(x_in)
        out = ablation_base(sae, x, f, mode, x_in) - f[..., idx].to(dt) @ sae.W_dec[idx].to(dt)
        if counter is not None:
            counter.observe(out)
        return out

    return sae_edit(sae, fn)


def one_feature_each_edit(
    sae: SAE, table: torch.Tensor, mode: str = "residual", counter: OffRangeCounter | None = None
) -> Edit:
    """Edit at ``sae.hook_point`` with ``V`` variants per prompt: variant ``v`` of prompt ``b`` ablates feature
    ``table[b, v]`` alone (``base - f_k(x) W_dec[k]``, ``base`` as in :func:`features_ablation_edit`); ``-1`` gives
    the unablated ``base`` (``x`` itself in the residual mode; padding variants nobody reads).

    Args:
        table: int64 ``[B, V]`` feature indices (or -1).
        mode: one of :data:`~saecircuits.analysis.ablations.modes.ABLATION_MODES`.
        counter: counts the edited activations (valid variants only) that leave the hook's range.
    """
    check_mode(mode)
    W_dec = sae.W_dec
    table = table.to(W_dec.device)
    valid = table >= 0
    k = table.clamp(min=0)

    def fn(x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = edit_dtype(sae, x)  # encode in the SAE's dtype, subtract in x's: a bf16 SAE never rounds x itself
        f = sae.encode(x_in)  # [B, F, d_sae], F = 1 (clean value shared by every variant) or V
        f_k = f.expand(-1, table.shape[1], -1).gather(-1, k[..., None])[..., 0].to(dt) * valid  # [B, V]
        out = ablation_base(sae, x, f, mode, x_in) - f_k[..., None] * W_dec[k].to(dt)
        if counter is not None:
            counter.observe(out.expand(-1, table.shape[1], -1), table >= 0)
        return out

    return sae_edit(sae, fn)


MAX_RUN_FLOATS = 1 << 24
"""Budget for the widest activation of one run of edited variants at P (``rows x max(d_mlp, d_model, heads x
prompt length)`` floats, 64 MB) when the logits are reduced in chunks (:func:`_paired_answer_metrics`)."""


def _final_resid_hook(iv, sae: SAE) -> str | None:
    """The residual stream after the last block (what the final norm and the unembedding read), where the paired
    runs of ``sae``'s ablations may stop and unembed in chunks: None without the engine, or when the SAE reads or
    writes at that hook or past it (a read at a hook runs before the edits there, so it would miss them)."""
    if iv.engine is None:
        return None
    from saecircuits.models.engine import stage_of_hook

    n = int(iv.n_layers)
    final = f"blocks.{n - 1}.hook_resid_post"
    hooks = {sae.hook_point, sae.hook_point_out}
    try:
        past = any(stage_of_hook(h, n)[0] >= n for h in hooks)
    except Exception:  # a hook the engine does not fire: the run itself names it
        return None
    return None if final in hooks or past else final


def _rows_per_run(model, task: Task, d_vocab: int, final: str | None) -> int:
    """Variant rows (prompts x variants, baseline included) of one paired run: bounded by the logits
    (:data:`MAX_LOGIT_FLOATS`) when the run returns them, else by its widest activation (:data:`MAX_RUN_FLOATS`)."""
    if final is None:
        return max(1, MAX_LOGIT_FLOATS // max(1, d_vocab))
    cfg = model.cfg
    longest = max((len(t) for t in task.token_ids), default=1)
    width = max(int(getattr(cfg, "d_mlp", 0) or 0), int(cfg.d_model), int(cfg.n_heads) * longest)
    return max(1, MAX_RUN_FLOATS // width)


def _paired_answer_metrics(iv, clean, edits: list[Edit], n_variants: int, base: list[Edit], final: str | None):
    """Answer metrics (``models.hooks.answer_metrics``) of the baseline row ``[B]`` and of ``n_variants`` edited
    variants ``[B, V]`` from one :meth:`~saecircuits.models.interventions.Interventions.run_paired`.

    With the engine (``final`` from :func:`_final_resid_hook`, the last residual hook) the run stops at the final
    residual stream and the logits are made and reduced in chunks of
    :data:`~saecircuits.models.engine.UNEMBED_CHUNK_FLOATS`, so ``B x V x d_vocab``
    logits never exist at once and one run can hold every variant of a batch (fewer runs: the shared part of each
    run, its baseline row and the SAE encoding at P, is computed once per batch, not once per logit-sized chunk);
    the logits are the engine's own (``Engine.logits``: final norm, unembedding, soft cap). A variant the run marks as the baseline
    (``Paired.same``) gets the baseline's metrics, so its effect is exactly 0.
    """
    B = clean.batch.tokens.shape[0]
    if final is None:
        run = iv.run_paired(clean, edits, n_variants=n_variants, base=base)
        return answer_metrics(run.base_logits, clean.batch.answer_ids), answer_metrics(run.logits,
                                                                                      clean.batch.answer_ids)
    run = iv.run_paired(clean, edits, n_variants=n_variants, base=base, read=[final], logits=False)
    resid = torch.cat([run.base_reads[final][:, None], run.reads[final]], dim=1)  # [B, 1 + V, d_model]
    flat = resid.reshape(B * (1 + n_variants), -1)
    ans = clean.batch.answer_ids.to(flat.device).repeat_interleave(1 + n_variants)
    step = max(1, UNEMBED_CHUNK_FLOATS // int(iv.engine.W_U.shape[-1]))  # reduced in heap-sized chunks
    parts = []
    with torch.no_grad():
        for s in range(0, flat.shape[0], step):
            parts.append(answer_metrics(iv.engine.logits(flat[s : s + step]), ans[s : s + step]))
    m = {key: torch.cat([p[key] for p in parts]).reshape(B, 1 + n_variants) for key in parts[0]}
    base_m = {key: v[:, 0] for key, v in m.items()}
    var_m = {key: v[:, 1:].clone() for key, v in m.items()}
    if run.same is not None:
        for key, v in var_m.items():
            v[run.same] = base_m[key][:, None].expand_as(v)[run.same]
    return base_m, var_m


def single_feature_ablation_losses(
    model,
    sae: SAE,
    task: Task,
    pairs: Sequence[tuple[int, int]],
    *,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    with_baseline: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Answer loss (nats) at P with one feature ablated at P, for each (prompt, feature) pair.

    The pairs of one prompt are variants of one prefix-cached pass. ``mode`` as in :func:`feature_effects`. With
    ``mode="residual"`` a feature inactive at P (``f_k = 0``) leaves the activation exactly unchanged.

    Args:
        with_baseline: also return each pair's baseline loss (clean, or SAE-spliced in ``"clean_effect"``) from the
            same run as its ablation, the one to subtract: an ablation that changes nothing then differs by exactly
            0 (the full clean pass differs from the recomputation at P by float rounding).

    Returns:
        float32 ``[n_pairs]`` in pair order (and the baselines ``[n_pairs]`` with ``with_baseline``).

    Raises:
        IndexError: a prompt or feature index out of range. ValueError: an unknown ``mode``.
    """
    check_mode(mode)
    if not pairs:
        return (torch.zeros(0), torch.zeros(0)) if with_baseline else torch.zeros(0)
    prompt_idx = [int(i) for i, _ in pairs]
    feats = [int(k) for _, k in pairs]
    if min(prompt_idx) < 0 or max(prompt_idx) >= task.n_prompts:
        raise IndexError(f"prompt index out of range 0..{task.n_prompts - 1}")
    if min(feats) < 0 or max(feats) >= sae.d_sae:
        raise IndexError(f"feature index out of range 0..{sae.d_sae - 1}")
    per_prompt: dict[int, list[int]] = {}
    for j, i in enumerate(prompt_idx):
        per_prompt.setdefault(i, []).append(j)
    prompts = sorted(per_prompt)
    sub = task.subset(prompts)
    iv = interventions_for(model)
    out = torch.zeros(len(pairs))
    base_out = torch.zeros(len(pairs))
    d_vocab = int(model.cfg.d_vocab)
    final = _final_resid_hook(iv, sae)
    rows_per_run = _rows_per_run(model, sub, d_vocab, final)
    for batch in task_batches(model, sub, max_tokens=max_tokens, max_batch=max_batch):
        clean = iv.clean(batch)
        rows = [per_prompt[prompts[i]] for i in batch.indices]
        V = max(len(r) for r in rows)
        table = torch.full((len(rows), V), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            table[b, : len(r)] = torch.tensor([feats[j] for j in r])
        chunk = max(1, rows_per_run // max(1, len(rows)) - 1)  # + the baseline variant
        for v0 in range(0, V, chunk):
            t = table[:, v0 : v0 + chunk]
            base_m, m = _paired_answer_metrics(iv, clean, [one_feature_each_edit(sae, t, mode)], t.shape[1],
                                               baseline_edits(sae, mode), final)
            loss, base = m["loss"].cpu(), base_m["loss"].cpu()
            for b, r in enumerate(rows):
                for v, j in enumerate(r[v0 : v0 + chunk]):
                    out[j] = loss[b, v]
                    base_out[j] = base[b]
    return (out, base_out) if with_baseline else out
