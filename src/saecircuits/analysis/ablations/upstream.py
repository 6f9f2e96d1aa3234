"""Effect of ablating an upstream activation at P on SAE feature activations at P (the reference notebook's
MLP0 ablation check).

For each prompt, the activation at ``ablate_hook`` is replaced at that prompt's own prediction position P (zero, or
a mean vector), every other position untouched; the SAE's features are read at P with and without the ablation on
the same prompts. Only P is ablated: earlier positions still feed attention (as in the notebook).

Departures from the notebook: the notebook compared an unconditional mean over 100 ablated prompts with
the conditional "mean activation over above-threshold prompts" from the feature table. Here both sides are computed
on the same prompts, both unconditionally (all prompts) and conditionally (prompts where the feature is active in
the clean run, both clean and ablated values over those same prompts), with t intervals and the paired difference.
Every batch row is ablated at its own P (the notebook ablated batch row 0 at index -2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.statistics import MeanCI, mean_ci95
from saecircuits.models.hooks import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TOKENS,
    task_batches,
    unknown_hook_message,
    unknown_hooks,
)
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["UpstreamAblationResult", "upstream_ablation_effect"]


@dataclass
class UpstreamAblationResult:
    """Feature activations at P, clean vs with ``hook`` ablated at P, on the same prompts.

    Attributes:
        hook, mode: the ablated hook and ``"zero"`` / ``"mean"``.
        features: the feature indices ``[S]``.
        clean, ablated: float32 ``[n_prompts, S]`` activations (SAE feature units), task order.
        clean_mean, ablated_mean, diff_mean: per feature, :class:`MeanCI` over all prompts (unconditional;
            ``diff = ablated - clean``, paired).
        clean_mean_active, ablated_mean_active: per feature, :class:`MeanCI` over the prompts where the feature is
            active (``> threshold``) in the clean run (same prompts on both sides).
        fraction_active_clean, fraction_active_ablated: per feature, fraction of prompts with ``f > threshold``.
    """

    hook: str
    mode: str
    features: list[int]
    clean: torch.Tensor
    ablated: torch.Tensor
    clean_mean: list[MeanCI]
    ablated_mean: list[MeanCI]
    diff_mean: list[MeanCI]
    clean_mean_active: list[MeanCI]
    ablated_mean_active: list[MeanCI]
    fraction_active_clean: list[float]
    fraction_active_ablated: list[float]


def upstream_ablation_effect(
    model,
    sae: SAE,
    task: Task,
    features: Sequence[int],
    ablate_hook: str = "blocks.0.mlp.hook_post",
    mode: str = "zero",
    *,
    mean_value: torch.Tensor | None = None,
    threshold: float = 0.0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> UpstreamAblationResult:
    """Activation of ``features`` at P clean vs with ``ablate_hook`` ablated at P.

    Args:
        model: a TransformerBridge.
        sae: the SAE whose features are read (at ``sae.hook_point``).
        task: prompts and prediction positions.
        features: feature indices.
        ablate_hook: the hook ablated at P (TL name, e.g. ``blocks.0.mlp.hook_post``); must differ from the SAE's.
        mode: ``"zero"`` (set to 0) or ``"mean"`` (set to ``mean_value``; by default the mean of ``ablate_hook`` at P
            over the task's prompts).
        mean_value: the replacement for ``"mean"``, shaped like one position of ``ablate_hook`` (e.g. ``[d_mlp]``).
        threshold: activity threshold for the conditional means (strict).
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`UpstreamAblationResult`.

    Raises:
        ValueError: bad ``mode``, empty or out-of-range ``features``, ``ablate_hook`` equal to the SAE's hook point
            or not a hook of the model, or a wrongly shaped ``mean_value``.
    """
    feats = [int(k) for k in features]
    if not feats or min(feats) < 0 or max(feats) >= sae.d_sae:
        raise ValueError(f"features must be a non-empty list of indices in 0..{sae.d_sae - 1}, got {feats}")
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if ablate_hook == sae.hook_point:
        raise ValueError(
            f"ablate_hook {ablate_hook!r} is the SAE's own hook point; ablate an upstream hook "
            "(e.g. blocks.0.mlp.hook_post for an SAE on layer 1)"
        )
    if unknown_hooks(model, [ablate_hook]):
        raise ValueError(unknown_hook_message(model, [ablate_hook], "pass one of its hooks as ablate_hook="))
    idx = torch.tensor(feats)
    n = task.n_prompts
    clean = torch.zeros(n, len(feats))
    ablated = torch.zeros(n, len(feats))
    batches = list(task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch))
    iv = interventions_for(model)
    with torch.no_grad():
        upstream_sum: torch.Tensor | None = None
        for batch in batches:
            read = iv.clean(batch, read=[sae.hook_point, ablate_hook], logits=False).reads
            x = read[sae.hook_point].to(sae.W_dec.dtype)
            clean[torch.tensor(batch.indices)] = sae.encode(x)[:, idx.to(x.device)].float().cpu()
            part = read[ablate_hook].float().sum(0)
            upstream_sum = part if upstream_sum is None else upstream_sum + part
        if mode == "mean":
            if mean_value is None:
                mean_value = upstream_sum / n
            elif upstream_sum is not None and tuple(mean_value.shape) != tuple(upstream_sum.shape):
                raise ValueError(
                    f"mean_value must have the shape of one position of {ablate_hook} "
                    f"{list(upstream_sum.shape)}, got {list(mean_value.shape)}"
                )
        if mode == "zero":
            edit = Edit(ablate_hook, torch.zeros_like)
        else:
            edit = Edit(ablate_hook, lambda v: mean_value.to(v).expand_as(v))
        for batch in batches:
            cached = iv.clean(batch, logits=False)
            # the clean features in the same run as the ablated ones: an ablation that changes nothing differs by 0
            run = iv.run_paired(cached, [edit], read=[sae.hook_point], logits=False)
            for out, x in ((clean, run.base_reads[sae.hook_point]), (ablated, run.reads[sae.hook_point][:, 0])):
                x = x.to(sae.W_dec.dtype)
                out[torch.tensor(batch.indices)] = sae.encode(x)[:, idx.to(x.device)].float().cpu()
    active = clean > threshold
    return UpstreamAblationResult(
        hook=ablate_hook,
        mode=mode,
        features=feats,
        clean=clean,
        ablated=ablated,
        clean_mean=[mean_ci95(clean[:, j]) for j in range(len(feats))],
        ablated_mean=[mean_ci95(ablated[:, j]) for j in range(len(feats))],
        diff_mean=[mean_ci95(ablated[:, j] - clean[:, j]) for j in range(len(feats))],
        clean_mean_active=[mean_ci95(clean[active[:, j], j]) for j in range(len(feats))],
        ablated_mean_active=[mean_ci95(ablated[active[:, j], j]) for j in range(len(feats))],
        fraction_active_clean=[float(active[:, j].float().mean()) for j in range(len(feats))],
        fraction_active_ablated=[
            float((ablated[:, j] > threshold).float().mean()) for j in range(len(feats))
        ],
    )
