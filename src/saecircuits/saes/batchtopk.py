"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders"; SAELens ``"batchtopk"``).

Training (:meth:`BatchTopKSAE.encode_with_hidden_pre`): of the ReLU'd pre-activations of the whole batch
``[n_tokens, d_sae]``, the ``k * n_tokens`` largest are kept (so L0 is ``k`` on average, varying per token).
Inference (:meth:`BatchTopKSAE.encode`, through ``_inference_activations``): a per-token JumpReLU with the stored ``threshold`` [d_sae] (one global
value broadcast over features), ``f = hidden_pre * (hidden_pre > threshold)``, so features do not depend on the
other tokens of a batch. The threshold is estimated during training, in train mode only, as an exponential moving
average (rate ``cfg.extra["threshold_lr"]``, default 0.01, as SAELens) of the smallest kept positive activation of
each batch; the first update sets it directly. It lives in buffers (``threshold``, ``threshold_updates``), so it is
in ``state_dict`` checkpoints and in ``sae_weights.safetensors`` (``threshold``). The threshold is kept in float32
even in a bfloat16/float16 SAE: a 1% moving-average step is below bfloat16's resolution (SAELens keeps its
``topk_threshold`` in float64 for the same reason).

On disk it is written as SAELens writes its own BatchTopK SAEs for inference: architecture ``"jumprelu"`` with the
threshold per feature (:func:`saecircuits.saes.io.save_sae`); our own config block keeps it a BatchTopK SAE.
"""

from __future__ import annotations

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError, full_precision_dtype
from saecircuits.saes.topk import _k_from_cfg


class BatchTopKSAE(SAE):
    """BatchTopK SAE; ``k = cfg.extra["k"]`` (mean active features per token)."""

    architecture = "batchtopk"
    per_feature_activation = False
    uses_sparsity_penalty = False
    extra_weight_names = ("threshold",)
    full_precision_tensors = ("threshold",)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.k = _k_from_cfg(cfg)
        try:
            self.threshold_lr = float(cfg.extra.get("threshold_lr", 0.01))
        except (TypeError, ValueError):
            raise SAEError(f"cfg.extra['threshold_lr'] must be a number, got {cfg.extra['threshold_lr']!r}") from None
        if not 0 < self.threshold_lr <= 1:
            raise SAEError(f"cfg.extra['threshold_lr'] must be in (0, 1], got {self.threshold_lr}")
        self.cfg.extra["threshold_lr"] = self.threshold_lr  # recorded, so cfg.json holds the value used
        dtype = full_precision_dtype(self.W_enc.dtype)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=dtype))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def _initialize_extra_(self) -> None:
        self.threshold.zero_()
        self.threshold_updates.zero_()

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-level top ``k * n_tokens`` of ``ReLU(hidden_pre)`` over all tokens of ``x [..., d_in]``.

        In train mode also updates the inference threshold (see the module docstring).
        """
        hidden_pre = self.hidden_pre(x)
        acts = torch.relu(hidden_pre)
        flat = acts.reshape(-1)
        n_tokens = flat.numel() // self.d_sae
        vals, idx = flat.topk(min(self.k * n_tokens, flat.numel()))
        f = torch.zeros_like(flat).scatter(0, idx, vals).reshape(acts.shape)
        if self.training:
            self._update_threshold_(vals.detach())
        return f, hidden_pre

    @torch.no_grad()
    def _update_threshold_(self, kept: torch.Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        if int(self.threshold_updates) == 0:
            self.threshold.fill_(smallest)
        else:
            self.threshold.mul_(1 - self.threshold_lr).add_(self.threshold_lr * smallest)
        self.threshold_updates += 1

    def _inference_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: ``hidden_pre * (hidden_pre > threshold)`` per token, ``[..., d_in] -> [..., d_sae]``."""
        hidden_pre = self.hidden_pre(x)
        return torch.where(hidden_pre > self.threshold, torch.relu(hidden_pre), torch.zeros_like(hidden_pre))

    def export_weights(self) -> dict[str, torch.Tensor]:
        """SAELens-named tensors; ``threshold [d_sae]`` in its own (at least float32) dtype."""
        return {**super().export_weights(), "threshold": self.threshold.detach().clone()}

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().expected_weight_shapes(), "threshold": (self.d_sae,)}

    @torch.no_grad()
    def import_weights_(self, weights: dict[str, torch.Tensor]) -> SAE:
        super().import_weights_(weights)
        self.threshold.copy_(weights["threshold"])
        # a threshold never estimated (all zero) is set directly by the first training update, as before saving
        self.threshold_updates.fill_(int(bool((self.threshold != 0).any())))
        return self
