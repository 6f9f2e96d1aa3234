"""The five-way loss comparison at the prediction position (the reference notebook's ablation loss
comparison): how much of the layer's job the top features and the SAE carry.

Per prompt, the answer loss (nats) at P under five runs, all on the same prompts:

1. clean;
2. the hook mean-ablated at P (``x_P <- mean activation``, e.g. from the corpus statistics pass);
3. the hook zero-ablated at P (for ``mlp.hook_post`` the MLP still adds ``b_out``, as in the notebook);
4. the top features ablated together at P, in the chosen ablation mode (:mod:`saecircuits.analysis.ablations.modes`);
5. the SAE spliced in at P (``x_P <- decode(encode(x_P))``).

Runs 2-5 are four variants of one prefix-cached intervention per batch (:mod:`saecircuits.models.interventions`).
Each mean comes with a Student-t 95% interval from the actual n, and each ablation with the paired difference to
the clean run (the per-prompt differences' mean and interval); the notebook gave ``1.96 * np.std / sqrt(n)`` bars on
the unpaired means and a mean vector from 20 stories with BOS. Loss recovered is left to
:mod:`saecircuits.analysis.quality.reconstruction` (same runs, one formula).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.ablations.feature_effects import variant_losses
from saecircuits.analysis.ablations.modes import (
    OffRange,
    OffRangeCounter,
    ablation_base,
    activation_floor,
    check_mode,
    edit_dtype,
    sae_edit,
)
from saecircuits.analysis.statistics import MeanCI, mean_ci95
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["CONDITIONS", "LossComparison", "loss_comparison"]

CONDITIONS = ("clean", "mean_ablation", "zero_ablation", "features_ablated", "sae_spliced")
"""Keys of the five runs, in table order."""


@dataclass
class LossComparison(NotebookDisplay):
    """The five answer losses at P per prompt, and their summaries.

    Attributes:
        hook_point, features, mode: what was ablated and how (``features`` may be empty: that run is then NaN).
        losses: float32 ``[n_prompts, 5]`` answer loss (nats) per prompt, columns in :data:`CONDITIONS` order.
        means: per condition, :class:`MeanCI` of the loss (nats).
        diffs: per condition, :class:`MeanCI` of the paired difference ``condition - clean`` (nats; clean: 0).
        features_minus_sae: :class:`MeanCI` of ``features_ablated - sae_spliced`` per prompt (the features' effect
            inside the SAE's reconstruction when ``mode`` drops the error).
        off_range: edited activations of the features run that left the hook's range.
        sae_off_range: reconstructions (run 5) that left the hook's range.
    """

    hook_point: str
    features: list[int]
    mode: str
    losses: torch.Tensor
    means: dict[str, MeanCI]
    diffs: dict[str, MeanCI]
    features_minus_sae: MeanCI
    off_range: OffRange
    sae_off_range: OffRange

    def labels(self) -> list[str]:
        """Readable names of the five runs."""
        n = len(self.features)
        return ["clean", "mean ablation", "zero ablation", f"top {n} features ablated ({self.mode})", "SAE spliced"]

    def display_title(self) -> str:
        return f"Five-way answer loss comparison at P for {self.hook_point} ({self.mode} mode)"

    def to_pandas(self):
        """One row per run: mean answer loss and the paired difference run - clean (nats), each with its 95% interval."""
        import pandas as pd

        return pd.DataFrame([{"run": lab, "loss": self.means[c].mean, "ci95_low": self.means[c].low,
                              "ci95_high": self.means[c].high, "minus_clean": self.diffs[c].mean,
                              "minus_clean_ci95_low": self.diffs[c].low, "minus_clean_ci95_high": self.diffs[c].high}
                             for c, lab in zip(CONDITIONS, self.labels(), strict=True)])

    def figure(self):
        """Bars of the five mean losses with 95% intervals."""
        from saecircuits.display import bar_figure

        df = self.to_pandas()
        return bar_figure(df["run"], df["loss"].tolist(), low=df["ci95_low"].tolist(), high=df["ci95_high"].tolist(),
                          title=f"Answer loss at P: {self.hook_point}", yaxis="loss (nats)")


def loss_comparison(
    model,
    sae: SAE,
    task: Task,
    features: Sequence[int],
    mean_act: torch.Tensor,
    *,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> LossComparison:
    """Answer loss at P: clean, mean-ablated, zero-ablated, top features ablated, SAE spliced.

    Args:
        model: a TransformerBridge.
        sae: the SAE; its ``hook_point`` is the layer ablated in runs 2-5 (at P only, every batch row).
        task: prompts and answers.
        features: the features ablated together in run 4 (e.g. the top of the ablation table); may be empty.
        mean_act: ``[d_out]`` mean activation of the hook the SAE writes (``hook_point_out``: the MLP's output for a
            transcoder, else ``hook_point``; :func:`saecircuits.analysis.quality.reconstruction.mean_activation` or
            :attr:`saecircuits.analysis.corpus.statistics.FeatureStats.mean_input`).
        mode: ablation mode of run 4 (``"residual"``, ``"reconstruction"`` or ``"clean_effect"``; the last two
            edit the activation the same way).
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`LossComparison`.

    Raises:
        ValueError: ``mean_act`` of the wrong width, a feature index out of range, an unknown ``mode``.
    """
    check_mode(mode)
    feats = [int(k) for k in features]
    if feats and (min(feats) < 0 or max(feats) >= sae.d_sae):
        raise ValueError(f"feature indices must lie in 0..{sae.d_sae - 1}, got {feats}")
    mean_act = torch.as_tensor(mean_act)
    if tuple(mean_act.shape) != (sae.d_out,):
        raise ValueError(f"mean_act must be [d_out] = [{sae.d_out}] for {sae.hook_point_out}, got "
                         f"{list(mean_act.shape)}")
    floor = activation_floor(model, sae.hook_point_out)
    counter, sae_counter = OffRangeCounter(floor), OffRangeCounter(floor)
    idx = torch.tensor(feats, dtype=torch.long, device=sae.W_dec.device)
    mean_row = mean_act.detach().to(sae.W_dec.device)

    def variants(x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # [B, 1, d] -> [B, 4, d_out]
        # mean, zero, features, SAE. The SAE encodes in its dtype; the mean/zero variants and the subtraction stay in
        # x's dtype (or wider), so a bf16 SAE rounds neither x nor the mean
        dt = edit_dtype(sae, x)
        f = sae.encode(x_in)
        x = x.to(dt)
        x_hat = sae.decode(f, x_in).to(dt)
        ablated = ablation_base(sae, x, f, mode, x_in) - f[..., idx].to(dt) @ sae.W_dec[idx].to(dt)
        if feats:
            counter.observe(ablated)
        sae_counter.observe(x_hat)
        return torch.cat([mean_row.to(x).expand_as(x), torch.zeros_like(x), ablated, x_hat], dim=1)

    losses = variant_losses(model, task, sae_edit(sae, variants), 4, max_tokens=max_tokens,
                            max_batch=max_batch)
    if not feats:
        losses[:, 3] = float("nan")
    means = {c: mean_ci95(losses[:, j]) for j, c in enumerate(CONDITIONS)}
    diffs = {c: mean_ci95(losses[:, j] - losses[:, 0]) for j, c in enumerate(CONDITIONS)}
    return LossComparison(
        hook_point=sae.hook_point,
        features=feats,
        mode=mode,
        losses=losses,
        means=means,
        diffs=diffs,
        features_minus_sae=mean_ci95(losses[:, 3] - losses[:, 4]),
        off_range=counter.result(),
        sae_off_range=sae_counter.result(),
    )
