"""SAE feature activations at each prompt's prediction position P, kept sparse (:class:`FeatureActs`: only the
non-zero entries), so a 16,384-feature SAE over thousands of prompts never holds a dense ``[n_prompts, d_sae]`` array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches
from saecircuits.models.interventions import interventions_for
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["FeatureActs", "feature_activations", "feature_activations_of", "activations_or_compute"]


@dataclass
class FeatureActs:
    """SAE feature activations at each prompt's P, sparse: the ``f > 0`` entries only, ordered by prompt then feature.

    Attributes:
        n_prompts, d_sae: the dense shape ``[n_prompts, d_sae]``.
        prompt, feature: int64 ``[nnz]`` coordinates; value: float32 ``[nnz]`` activations (SAE feature units).
    """

    n_prompts: int
    d_sae: int
    prompt: torch.Tensor
    feature: torch.Tensor
    value: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_prompts, self.d_sae)

    @classmethod
    def from_dense(cls, acts: torch.Tensor) -> FeatureActs:
        """From a dense ``[n_prompts, d_sae]`` tensor (entries ``<= 0`` dropped)."""
        acts = acts.detach().float().cpu()
        p, k = torch.nonzero(acts > 0, as_tuple=True)
        return cls(acts.shape[0], acts.shape[1], p, k, acts[p, k])

    def dense(self) -> torch.Tensor:
        """float32 ``[n_prompts, d_sae]`` (for small tasks and tests)."""
        out = torch.zeros(self.n_prompts, self.d_sae)
        out[self.prompt, self.feature] = self.value
        return out

    def columns(self, features: Sequence[int]) -> torch.Tensor:
        """float32 ``[n_prompts, len(features)]``: the activations of ``features`` on every prompt (0 = inactive)."""
        feats = torch.as_tensor(list(features), dtype=torch.long)
        out = torch.zeros(self.n_prompts, len(feats))
        for j, k in enumerate(feats.tolist()):
            sel = self.feature == k
            out[self.prompt[sel], j] = self.value[sel]
        return out

    def column(self, feature: int) -> torch.Tensor:
        """float32 ``[n_prompts]``: feature ``feature`` on every prompt."""
        return self.columns([feature])[:, 0]

    def count(self, threshold: float = 0.0) -> torch.Tensor:
        """int64 ``[d_sae]``: prompts with ``f > threshold`` per feature."""
        return torch.bincount(self.feature[self.value > threshold], minlength=self.d_sae)

    def sum(self, threshold: float = 0.0) -> torch.Tensor:
        """float32 ``[d_sae]``: sum over prompts of the activations above ``threshold``."""
        keep = self.value > threshold
        return torch.zeros(self.d_sae).index_add_(0, self.feature[keep], self.value[keep])

    def l0(self) -> torch.Tensor:
        """float32 ``[n_prompts]``: active features per prompt."""
        return torch.bincount(self.prompt, minlength=self.n_prompts).float()

    def active_prompts(self, feature: int, threshold: float = 0.0) -> list[int]:
        """Prompt indices (ascending) where ``f_feature > threshold``."""
        sel = (self.feature == feature) & (self.value > threshold)
        return sorted(self.prompt[sel].tolist())


def feature_activations(
    model, sae: SAE, task: Task, *, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = DEFAULT_MAX_BATCH
) -> FeatureActs:
    """SAE feature activations at each prompt's prediction position (the notebook's feature-activation table).

    One clean pass per batch that stops after the SAE's layer (no unembedding).

    Returns:
        :class:`FeatureActs` (sparse; ``.dense()`` gives ``[n_prompts, d_sae]``), prompts in task order.
    """
    return feature_activations_of(model, [sae], task, max_tokens=max_tokens, max_batch=max_batch)[0]


def feature_activations_of(
    model, saes: Sequence[SAE], task: Task, *, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = DEFAULT_MAX_BATCH
) -> list[FeatureActs]:
    """:func:`feature_activations` of several SAEs from one clean pass per batch (it stops after the last SAE's
    layer): each SAE's activations are those of its own call, bit for bit (a layer's activations are computed the
    same whether or not later layers run).

    Returns:
        one :class:`FeatureActs` per SAE.
    """
    iv = interventions_for(model)
    hooks = list(dict.fromkeys(s.hook_point for s in saes))
    coords: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in saes]
    for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
        clean = iv.clean(batch, read=hooks, logits=False, cache=False)
        for i, sae in enumerate(saes):
            with torch.no_grad():
                f = sae.encode(clean.reads[sae.hook_point].to(sae.W_dec.dtype)).float().cpu()
            r, k = torch.nonzero(f != 0, as_tuple=True)  # != 0: some families' features can be negative
            coords[i].append((torch.tensor(batch.indices)[r], k, f[r, k]))
    out = []
    for sae, parts in zip(saes, coords, strict=True):
        p = torch.cat([c[0] for c in parts])
        k = torch.cat([c[1] for c in parts])
        v = torch.cat([c[2] for c in parts])
        order = torch.argsort(p * sae.d_sae + k)
        out.append(FeatureActs(task.n_prompts, sae.d_sae, p[order], k[order], v[order]))
    return out


def activations_or_compute(
    model,
    sae: SAE,
    task: Task,
    acts: FeatureActs | torch.Tensor | None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> FeatureActs:
    """``acts`` (precomputed :func:`feature_activations`, or a dense tensor) checked against the task and SAE, or
    computed when None.

    Raises:
        ValueError: ``acts`` of the wrong shape.
    """
    if acts is None:
        return feature_activations(model, sae, task, max_tokens=max_tokens, max_batch=max_batch)
    if tuple(acts.shape) != (task.n_prompts, sae.d_sae):
        raise ValueError(
            f"acts must be [n_prompts, d_sae] = [{task.n_prompts}, {sae.d_sae}], got {list(acts.shape)}"
        )
    return acts if isinstance(acts, FeatureActs) else FeatureActs.from_dense(acts)
