"""Ablating everything but the span of the top features' decoder vectors at P (a later version of the
reference notebook): is the layer's contribution to the answer carried by the subspace those features write?

With ``A = W_dec[S]^T`` (``[d_in, |S|]``) and ``Q`` an orthonormal basis of its column space (``P = Q Q^T``, the
orthogonal projector; rank-deficient sets use the numerical rank), at each prompt's P the hook's activation ``h``
becomes

- ``"zero"``: ``P h`` (the complement of the span zeroed);
- ``"mean"``: ``P h + (I - P) mu`` (the complement replaced by its corpus mean, ``mu`` the hook's mean activation,
  since the mean of ``(I - P) h`` over tokens is ``(I - P) mu``).

The answer loss under each is compared with the clean loss (paired, Student-t 95% intervals). If the span of a few
features carries the behaviour, keeping only it loses little; compare with zero- or mean-ablating the whole hook
(:mod:`saecircuits.analysis.ablations.loss_comparison`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.ablations.feature_effects import variant_losses
from saecircuits.analysis.ablations.modes import sae_edit
from saecircuits.analysis.statistics import MeanCI, mean_ci95
from saecircuits.display import NotebookDisplay, percent
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["SpanAblation", "span_basis", "span_ablation", "SPAN_VARIANTS"]

SPAN_VARIANTS = ("clean", "span_zero", "span_mean")


def span_basis(sae: SAE, features: Sequence[int], rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis ``Q [d_in, r]`` of the span of ``W_dec[features]`` (``r`` = numerical rank; SVD with
    singular values above ``rtol x`` the largest).

    Raises:
        ValueError: no features or an index out of range.
    """
    feats = [int(k) for k in features]
    if not feats or min(feats) < 0 or max(feats) >= sae.d_sae:
        raise ValueError(f"features must be a non-empty list of indices in 0..{sae.d_sae - 1}, got {feats}")
    a = sae.W_dec[feats].detach().double().T  # [d_in, |S|]
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    r = int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    return u[:, :r]


@dataclass
class SpanAblation(NotebookDisplay):
    """Answer losses at P keeping only the span of the features' decoder vectors.

    Attributes:
        features: the features whose decoder vectors span the kept subspace; rank: its dimension.
        losses: float32 ``[n_prompts, 3]`` answer loss (nats), columns :data:`SPAN_VARIANTS`.
        means: per column, :class:`MeanCI` (nats); diffs: per column, paired ``column - clean``.
        fraction_kept: mean over prompts of ``|P h|^2 / |h|^2`` (share of the activation's squared norm in the span).
    """

    features: list[int]
    rank: int
    losses: torch.Tensor
    means: dict[str, MeanCI]
    diffs: dict[str, MeanCI]
    fraction_kept: float

    def display_title(self) -> str:
        return (f"Only the span of the decoder vectors of {self.features} kept at P (rank {self.rank}, "
                f"{percent(self.fraction_kept, 1)} of the squared norm)")

    def to_pandas(self):
        """One row per variant: mean answer loss (nats) with its 95% interval."""
        import pandas as pd

        from saecircuits.display import meanci_rows

        return pd.DataFrame(meanci_rows(self.means)).rename(columns={"run": "variant"})

    def figure(self):
        """Bars of the mean loss per variant."""
        from saecircuits.display import bar_figure

        df = self.to_pandas()
        return bar_figure(df["variant"], df["mean"].tolist(), low=df["ci95_low"].tolist(),
                          high=df["ci95_high"].tolist(), title=self.display_title(), yaxis="loss (nats)")


def span_ablation(
    model,
    sae: SAE,
    task: Task,
    features: Sequence[int],
    mean_act: torch.Tensor,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> SpanAblation:
    """Answer loss at P with the hook's activation projected onto the span of the features' decoder vectors, the
    complement zeroed or mean-replaced (two variants of one prefix-cached intervention per batch).

    Args:
        model, sae, task: the model, the SAE (its hook is edited at P), the behaviour.
        features: the top features (e.g. the top 5 of the ablation table).
        mean_act: ``[d_out]`` mean activation of the hook the SAE writes (mean variant).
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`SpanAblation`.

    Raises:
        ValueError: no features, an index out of range, or ``mean_act`` of the wrong width.
    """
    q = span_basis(sae, features)
    mean_act = torch.as_tensor(mean_act)
    if tuple(mean_act.shape) != (sae.d_out,):
        raise ValueError(f"mean_act must be [d_out] = [{sae.d_out}] for {sae.hook_point_out}, got "
                         f"{list(mean_act.shape)}")
    dev = sae.W_dec.device
    proj = (q @ q.T).to(dev)  # float64 [d_in, d_in]
    mu_out = (mean_act.double().to(dev) - proj @ mean_act.double().to(dev))  # (I - P) mu
    kept: list[torch.Tensor] = []

    def variants(_x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # [B, 1, d_out] -> [B, 2, d_out]
        h = x.double()
        ph = h @ proj  # P is symmetric
        kept.append(((ph**2).sum(-1) / (h**2).sum(-1).clamp(min=1e-30)).reshape(-1).cpu())
        return torch.cat([ph, ph + mu_out], dim=1).to(x.dtype)

    losses = variant_losses(model, task, sae_edit(sae, variants), 2, max_tokens=max_tokens,
                            max_batch=max_batch)
    return SpanAblation(
        features=[int(k) for k in features],
        rank=int(q.shape[1]),
        losses=losses,
        means={c: mean_ci95(losses[:, j]) for j, c in enumerate(SPAN_VARIANTS)},
        diffs={c: mean_ci95(losses[:, j] - losses[:, 0]) for j, c in enumerate(SPAN_VARIANTS)},
        fraction_kept=float(torch.cat(kept).mean()) if kept else float("nan"),
    )
