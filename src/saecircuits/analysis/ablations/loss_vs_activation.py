"""Per-prompt activation of a feature vs the loss increase when it is ablated (the reference notebook's scatter).

For every prompt where feature k is active at P (``f_k > threshold``; optionally the first ``max_prompts``), the
activation ``f_k`` at P and the answer-loss increase (nats, ablated - clean) under the residual-preserving ablation
of k at P (``features.single_feature_ablation_losses``), with their Pearson correlation. The notebook only plotted the
scatter; the correlation and the t interval of the mean increase are additions. Batched (the notebook ran one
prompt per forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from saecircuits.analysis.ablations.feature_effects import (
    activations_or_compute,
    single_feature_ablation_losses,
)
from saecircuits.analysis.ablations.modes import check_mode
from saecircuits.analysis.statistics import MeanCI, mean_ci95
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["LossVsActivation", "loss_increase_vs_activation", "pearson_r"]


def pearson_r(x, y) -> float:
    """Pearson correlation of two equal-length samples.

    NaN (undefined) for fewer than 3 values, since a line through 2 points always gives r = +-1, or when either
    sample has zero variance."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class LossVsActivation(NotebookDisplay):
    """Activation vs loss increase for one feature.

    Attributes:
        feature: k.
        table: DataFrame with columns ``prompt_index`` (task index), ``activation`` (``f_k`` at P), ``loss_increase``
            (nats, ablated - clean), one row per active prompt in task order.
        pearson_r: correlation of the two columns (NaN when undefined: fewer than 3 prompts or no variance).
        loss_increase: :class:`MeanCI` of the loss increase.
    """

    feature: int
    table: pd.DataFrame
    pearson_r: float
    loss_increase: MeanCI

    def display_title(self) -> str:
        r = "undefined" if self.pearson_r != self.pearson_r else f"{self.pearson_r:.3f}"
        return (f"Feature {self.feature}: activation vs loss increase when ablated (Pearson r = {r}, "
                f"n = {len(self.table)} prompts)")

    def to_pandas(self):
        """One row per active prompt (``table``)."""
        return self.table

    def figure(self):
        """Activation at P against the loss increase when ablated, one point per prompt."""
        from saecircuits.display import scatter_figure

        cols = list(self.table.columns)
        x = "activation" if "activation" in cols else cols[0]
        y = "loss_increase" if "loss_increase" in cols else cols[-1]
        return scatter_figure(self.table[x], self.table[y], title=self.display_title(), xaxis=x, yaxis=f"{y} (nats)")


def loss_increase_vs_activation(
    model,
    sae: SAE,
    task: Task,
    feature: int,
    *,
    threshold: float = 0.0,
    max_prompts: int | None = None,
    acts: torch.Tensor | None = None,
    clean_loss: torch.Tensor | None = None,
    effects=None,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> LossVsActivation:
    """Per active prompt: ``f_k`` at P and the loss increase when k is ablated at P.

    Args:
        model, sae, task: the model, the SAE, the behaviour.
        feature: k.
        threshold: activity threshold (strict).
        max_prompts: at most this many active prompts (first in task order); ``None`` = all (the notebook).
        acts: precomputed ``feature_activations`` ``[n_prompts, d_sae]``.
        clean_loss: precomputed ``answer_losses`` ``[n_prompts]`` (checked; kept for compatibility: the increase is
            measured against the baseline computed in the same run as each ablation).
        effects: precomputed :class:`~saecircuits.analysis.ablations.feature_effects.FeatureEffects` holding this feature (with the
            same ``threshold`` and ``mode``); its exact per-prompt effects are used instead of new ablations.
        mode: ablation mode (:mod:`saecircuits.analysis.ablations.modes`); the increase is ablated - baseline.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`LossVsActivation` (empty table and NaNs when no prompt is active).

    Raises:
        IndexError: ``feature`` out of range. ValueError: ``acts`` / ``clean_loss`` of the wrong shape, an unknown
            ``mode``, or ``effects`` computed in another mode.
    """
    check_mode(mode)
    k = int(feature)
    if not 0 <= k < sae.d_sae:
        raise IndexError(f"feature {k} out of range 0..{sae.d_sae - 1}")
    if effects is not None and effects.mode != mode:
        raise ValueError(f"effects were computed with mode={effects.mode!r}, not {mode!r}; pass matching effects")
    if effects is not None:
        rows = effects.of(k).head(max_prompts) if max_prompts is not None else effects.of(k)
        table = rows[["prompt_index", "activation", "loss_increase"]].reset_index(drop=True)
        return LossVsActivation(
            feature=k,
            table=table,
            pearson_r=pearson_r(table["activation"], table["loss_increase"]),
            loss_increase=mean_ci95(table["loss_increase"].to_numpy()),
        )
    acts = activations_or_compute(model, sae, task, acts, max_tokens=max_tokens, max_batch=max_batch)
    prompts = acts.active_prompts(k, threshold)[:max_prompts]
    if clean_loss is not None and tuple(clean_loss.shape) != (task.n_prompts,):
        raise ValueError(f"clean_loss must be [n_prompts] = [{task.n_prompts}], got {list(clean_loss.shape)}")
    # each ablation minus its baseline (clean, or the SAE spliced in for "clean_effect") from the same run, so an
    # ablation that changes nothing gives exactly 0 (a precomputed clean_loss comes from the full clean pass)
    ablated, baseline = single_feature_ablation_losses(
        model, sae, task, [(i, k) for i in prompts], mode=mode, max_tokens=max_tokens, max_batch=max_batch,
        with_baseline=True,
    )
    idx = torch.tensor(prompts, dtype=torch.long)
    increase = (ablated - baseline) if prompts else torch.zeros(0)
    activation = acts.column(k)[idx] if prompts else torch.zeros(0)
    table = pd.DataFrame(
        {
            "prompt_index": np.asarray(prompts, dtype=np.int64),
            "activation": activation.numpy(),
            "loss_increase": increase.numpy(),
        }
    )
    return LossVsActivation(
        feature=k,
        table=table,
        pearson_r=pearson_r(table["activation"], table["loss_increase"]),
        loss_increase=mean_ci95(increase),
    )
