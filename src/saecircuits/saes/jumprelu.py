"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders"; SAELens ``"jumprelu"``).

``f = hidden_pre * H(hidden_pre - threshold)`` with a learned per-feature ``threshold = exp(log_threshold)`` [d_sae]
(initialised to ``cfg.extra["threshold_init"]``, default 1e-3). ``H`` has zero derivative almost everywhere, so the
threshold is trained with straight-through estimators (paper section 4 / appendix J) using a rectangle kernel
``K(u) = 1[-1/2 < u < 1/2]`` of bandwidth ``eps = cfg.extra["bandwidth"]`` (default 1e-3):

* JumpReLU: ``d f / d hidden_pre = H(hidden_pre - threshold)``; ``d f / d threshold = -(threshold / eps) K((hidden_pre
  - threshold) / eps)``.
* Step (for the L0 penalty, regularizer ``"l0"``): ``d H / d hidden_pre = 0``; ``d H / d threshold = -(1 / eps)
  K((hidden_pre - threshold) / eps)``.

On disk (SAELens layout) the tensor is ``threshold``; in ``state_dict`` it is the parameter ``log_threshold``, kept
in float32 even in a bfloat16/float16 SAE: Adam moves it by about ``lr`` per step, far below bfloat16's resolution
(2**-7 relative), so a bfloat16 threshold would never move. ``bandwidth`` and ``threshold_init`` are written into
``cfg.extra`` (defaults included) and so into ``cfg.json``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saecircuits.saes.base import SAE, SAEConfig, SAEError, full_precision_dtype

#: defaults of ``cfg.extra["bandwidth"]`` and ``cfg.extra["threshold_init"]`` (pre-activation units).
DEFAULT_BANDWIDTH = 1e-3
DEFAULT_THRESHOLD_INIT = 1e-3


def _positive_setting(cfg: SAEConfig, key: str, default: float) -> float:
    value = cfg.extra.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise SAEError(f"cfg.extra[{key!r}] must be a positive number, got {cfg.extra.get(key)!r}")
    return value


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_features(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1, g.shape[-1]).sum(dim=0)


class _JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        x_grad = (x > threshold).to(x.dtype) * grad
        t_grad = -(threshold / eps) * _rectangle((x - threshold) / eps) * grad
        return x_grad, _sum_to_features(t_grad), None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        t_grad = -(1.0 / eps) * _rectangle((x - threshold) / eps) * grad
        return torch.zeros_like(x), _sum_to_features(t_grad), None


class JumpReLUSAE(SAE):
    """JumpReLU SAE with a learned per-feature threshold (see the module docstring)."""

    architecture = "jumprelu"
    extra_weight_names = ("threshold",)
    full_precision_tensors = ("log_threshold",)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.bandwidth = _positive_setting(cfg, "bandwidth", DEFAULT_BANDWIDTH)
        self.threshold_init = _positive_setting(cfg, "threshold_init", DEFAULT_THRESHOLD_INIT)
        # recorded, so cfg.json holds the values used (defaults included)
        self.cfg.extra["bandwidth"] = self.bandwidth
        self.cfg.extra["threshold_init"] = self.threshold_init
        self.log_threshold = nn.Parameter(
            torch.zeros(cfg.d_sae, dtype=full_precision_dtype(self.W_enc.dtype))
        )

    def _initialize_extra_(self) -> None:
        self.log_threshold.fill_(math.log(self.threshold_init))

    @property
    def threshold(self) -> torch.Tensor:
        """Per-feature threshold ``exp(log_threshold)`` [d_sae] (in pre-activation units)."""
        return self.log_threshold.exp()

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, hidden_pre)`` with ``f = hidden_pre * H(hidden_pre - threshold)`` (STE gradients)."""
        hidden_pre = self.hidden_pre(x)
        return _JumpReLUFn.apply(hidden_pre, self.threshold, self.bandwidth), hidden_pre

    def _activate_columns(self, pre: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold[features].to(pre.dtype))

    def heaviside_ste(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """``H(hidden_pre - threshold)`` [..., d_sae] with the step STE (gradient to the threshold only)."""
        return _StepFn.apply(hidden_pre, self.threshold, self.bandwidth)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """SAELens-named tensors; ``threshold = exp(log_threshold) [d_sae]`` in its own (at least float32) dtype."""
        return {**super().export_weights(), "threshold": self.threshold.detach().contiguous()}

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().expected_weight_shapes(), "threshold": (self.d_sae,)}

    @torch.no_grad()
    def import_weights_(self, weights: dict[str, torch.Tensor]) -> SAE:
        threshold = weights["threshold"]
        if bool((threshold < 0).any()) or not bool(torch.isfinite(threshold).all()):
            raise SAEError(
                "JumpReLU threshold must be finite and >= 0; the weights file is not a JumpReLU SAE's"
            )
        super().import_weights_(weights)
        self.log_threshold.copy_(_exact_log(threshold.to(self.log_threshold.dtype)))
        return self


def _exact_log(threshold: torch.Tensor, max_steps: int = 4) -> torch.Tensor:
    """``log(threshold)`` nudged by a few ulps so that ``exp`` of it gives back ``threshold`` exactly where it can.

    A threshold written as ``exp(log_threshold)`` then read back with a plain ``log`` can come back one ulp off,
    which would move an on/off decision for a pre-activation sitting exactly on it; saving and reloading must
    not change the SAE. Zero thresholds give ``-inf`` (exp gives 0 back).
    """
    log_t = threshold.double().log().to(threshold.dtype)
    for _ in range(max_steps):
        back = log_t.exp()
        low, high = back < threshold, back > threshold
        if not bool((low | high).any()):
            break
        up = torch.nextafter(log_t, torch.full_like(log_t, math.inf))
        down = torch.nextafter(log_t, torch.full_like(log_t, -math.inf))
        log_t = torch.where(low, up, torch.where(high, down, log_t))
    return log_t
