"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"; SAELens
``"gated"``, dictionary_learning ``GatedAutoEncoder``). Inference only: saecircuits loads gated SAEs, it does not
train them.

With ``x_in = x - b_dec`` (when ``apply_b_dec_to_input``)::

    pi_gate = x_in @ W_enc + b_gate                       # which features fire   (b_gate is stored as b_enc)
    pi_mag  = x_in @ (W_enc * exp(r_mag)) + b_mag         # how strongly
    f       = 1[pi_gate > 0] * ReLU(pi_mag)

(SAELens ``GatedSAE.encode``; dictionary_learning's ``gate_bias``/``mag_bias``/``r_mag`` are the same tensors).
:meth:`GatedSAE.hidden_pre` is the gate's pre-activation; the magnitude path is :meth:`GatedSAE.magnitude_pre`.
On disk (SAELens layout): ``W_enc, b_gate, b_mag, r_mag, W_dec, b_dec``.
"""

from __future__ import annotations

import torch
from torch import nn

from saecircuits.saes.base import SAE, SAEConfig


class GatedSAE(SAE):
    """Gated SAE (see the module docstring); ``b_enc`` holds ``b_gate``."""

    architecture = "gated"
    trainable = False
    extra_weight_names = ("b_mag", "r_mag")

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        dtype = self.W_enc.dtype
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    def magnitude_pre(self, x: torch.Tensor) -> torch.Tensor:
        """``x_in @ (W_enc * exp(r_mag)) + b_mag``: ``[..., d_in] -> [..., d_sae]``."""
        x_in, _ = self._encoder_input(x)
        return (x_in @ self.W_enc) * self.r_mag.exp() + self.b_mag

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, pi_gate)``, both ``[..., d_sae]`` (no training path: the gate's step has no gradient)."""
        x_in, _ = self._encoder_input(x)
        enc = x_in @ self.W_enc
        gate = enc + self.b_enc
        mag = enc * self.r_mag.exp() + self.b_mag
        return (gate > 0).to(mag.dtype) * torch.relu(mag), gate

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        idx = features.to(self.W_enc.device)
        x_in, scale = self._encoder_input(x)
        enc = x_in @ self.W_enc[:, idx]
        f = (enc + self.b_enc[idx] > 0).to(enc.dtype) * torch.relu(enc * self.r_mag[idx].exp() + self.b_mag[idx])
        return f if scale is None else f * scale

    def _initialize_extra_(self) -> None:
        self.b_mag.zero_()
        self.r_mag.zero_()

    def export_weights(self) -> dict[str, torch.Tensor]:
        """SAELens names: ``b_enc`` is written as ``b_gate``."""
        w = super().export_weights()
        w["b_gate"] = w.pop("b_enc")
        return {**w, "b_mag": self.b_mag.detach().contiguous(), "r_mag": self.r_mag.detach().contiguous()}

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_weight_shapes()
        shapes["b_gate"] = shapes.pop("b_enc")
        return {**shapes, "b_mag": (self.d_sae,), "r_mag": (self.d_sae,)}

    @torch.no_grad()
    def import_weights_(self, weights: dict[str, torch.Tensor]) -> SAE:
        super().import_weights_({**weights, "b_enc": weights["b_gate"]})
        self.b_mag.copy_(weights["b_mag"])
        self.r_mag.copy_(weights["r_mag"])
        return self
