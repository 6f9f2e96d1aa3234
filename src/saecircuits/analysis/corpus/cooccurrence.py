"""Co-occurrence of SAE features at the prediction position (step 6 of ``circuit_discovery_V2.ipynb``
beside the reference notebook).

Binarise the activations of a set of features at P over the task prompts, ``B[i, j] = f_{k_j}(x_{P_i}) > tau_j``,
count the prompts where both of two features are active, ``C = B^T B`` (the diagonal holds each feature's own
count), and normalise each pair by the smaller or the larger of the two counts:

- ``C_ij / min(c_i, c_j)``: 1 when the rarer feature is only ever active together with the other (nested);
- ``C_ij / max(c_i, c_j)``: 1 only when the two are active on exactly the same prompts.

A pair whose normaliser is 0 (a feature never active) is undefined (NaN), not 0. The notebook binarised with
``tau_k = 0.17 x`` the feature's validation maximum; here the threshold is one number or one per feature
(default ``f > 0``, the activity definition of the ablation table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.ablations.feature_effects import FeatureActs

__all__ = ["Cooccurrence", "feature_cooccurrence"]


@dataclass
class Cooccurrence:
    """Co-occurrence of ``features`` at P.

    Attributes:
        features: the feature indices ``[S]``.
        threshold: float32 ``[S]`` the activity threshold of each (strict ``>``).
        n_prompts: prompts counted.
        counts: int64 ``[S, S]`` prompts where both are active (diagonal: each feature's count).
        by_min: float64 ``[S, S]`` ``counts / min(c_i, c_j)`` (NaN where that is 0).
        by_max: float64 ``[S, S]`` ``counts / max(c_i, c_j)`` (NaN where that is 0).
    """

    features: list[int]
    threshold: torch.Tensor
    n_prompts: int
    counts: torch.Tensor
    by_min: torch.Tensor
    by_max: torch.Tensor


def feature_cooccurrence(
    acts: FeatureActs | torch.Tensor, features: Sequence[int], threshold: float | Sequence[float] = 0.0
) -> Cooccurrence:
    """Pairwise co-occurrence of ``features`` over prompts, raw and normalised by the min and max count.

    Args:
        acts: activations at P, :class:`FeatureActs` or dense ``[n_prompts, d_sae]``.
        features: feature indices ``[S]``.
        threshold: one activity threshold, or one per feature (strict ``>``).

    Returns:
        :class:`Cooccurrence`.

    Raises:
        ValueError: no features, an index out of range, or a threshold list of the wrong length.
    """
    feats = [int(k) for k in features]
    d_sae = acts.d_sae if isinstance(acts, FeatureActs) else int(acts.shape[1])
    if not feats or min(feats) < 0 or max(feats) >= d_sae:
        raise ValueError(f"features must be a non-empty list of indices in 0..{d_sae - 1}, got {feats}")
    tau = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1)
    if tau.numel() == 1:
        tau = tau.expand(len(feats)).clone()
    if tau.numel() != len(feats):
        raise ValueError(f"threshold must be one number or one per feature ({len(feats)}), got {tau.numel()}")
    cols = acts.columns(feats) if isinstance(acts, FeatureActs) else acts[:, feats].float().cpu()
    b = (cols > tau[None]).long()  # [n, S]
    counts = b.T @ b
    c = counts.diagonal().double()
    lo = torch.minimum(c[:, None], c[None, :])
    hi = torch.maximum(c[:, None], c[None, :])
    cd = counts.double()
    by_min = torch.where(lo > 0, cd / lo.clamp(min=1), torch.full_like(cd, float("nan")))
    by_max = torch.where(hi > 0, cd / hi.clamp(min=1), torch.full_like(cd, float("nan")))
    return Cooccurrence(feats, tau, int(cols.shape[0]), counts, by_min, by_max)
