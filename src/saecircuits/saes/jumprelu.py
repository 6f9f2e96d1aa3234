"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders"; SAELens ``"jumprelu"``).

``f = hidden_pre * H(hidden_pre - threshold)`` with a learned per-feature ``threshold`` [d_sae] (initialised to
``cfg.extra["threshold_init"]``, default 0.01). ``H`` has zero derivative almost everywhere, so the
threshold is trained with straight-through estimators (paper section 4 / appendix J) using a rectangle kernel
``K(u) = 1[-1/2 < u < 1/2]`` of bandwidth ``eps = cfg.extra["bandwidth"]`` (default 0.05, SAELens 6's; on the
paper's 1e-3 see :data:`DEFAULT_BANDWIDTH`):

* JumpReLU: ``d f / d hidden_pre = H(hidden_pre - threshold)``; ``d f / d threshold = -(threshold / eps) K((hidden_pre
  - threshold) / eps)``.
* Step (for the L0 penalty, regularizer ``"l0"``): ``d H / d hidden_pre = 0``; ``d H / d threshold = -(1 / eps)
  K((hidden_pre - threshold) / eps)``.

The threshold itself is the trained parameter (``threshold`` on disk, in SAELens layout, and in ``state_dict``), as
SAELens does since its PR 718 (after its issues 382, 494 and 719) and ``dictionary_learning`` did before it. The paper
(appendix J) trains ``log(threshold)`` instead; Adam then moves the log by about ``lr`` per step, i.e. the threshold by
about ``threshold * lr``: from the default 1e-3 at lr 1e-4, reaching 0.1 takes over 46,000 steps, so in a run of a
few thousand steps the threshold, and with it L0, never responds to the L0 coefficient. Trained directly it moves
by about ``lr`` per step. It is kept ``>= 0`` by :meth:`JumpReLUSAE.after_optimizer_step_` (a negative threshold
would let negative pre-activations through as negative features), which the trainer calls after every step.

The threshold is kept in float32 even in a bfloat16/float16 SAE: Adam moves it by about ``lr`` per step, far below
bfloat16's resolution (2**-7 relative), so a bfloat16 threshold would never move. ``bandwidth`` and
``threshold_init`` are written into ``cfg.extra`` (defaults included) and so into ``cfg.json``. A ``state_dict``
from before the change (``log_threshold``) still loads: its ``exp`` becomes the threshold.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saecircuits.saes.base import SAE, SAEConfig, SAEError, full_precision_dtype

#: defaults of ``cfg.extra["bandwidth"]`` and ``cfg.extra["threshold_init"]`` (pre-activation units): SAELens 6's
#: training defaults. The paper's 1e-3 bandwidth gives the threshold a gradient only from pre-activations within
#: 5e-4 of it, so rarely that in a CPU-sized run (1,000 steps) L0 hardly responds to the L0 coefficient (SAELens
#: issue 494); on the test model a 1,000-fold larger coefficient lowered L0 by 9% with it, by 31% with 0.05.
DEFAULT_BANDWIDTH = 0.05
DEFAULT_THRESHOLD_INIT = 0.01
#: the defaults files of our format 1 (which recorded only the settings the user gave) were written with.
FORMAT_1_DEFAULTS = {"bandwidth": 1e-3, "threshold_init": 1e-3}


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
    full_precision_tensors = ("threshold",)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.bandwidth = _positive_setting(cfg, "bandwidth", DEFAULT_BANDWIDTH)
        self.threshold_init = _positive_setting(cfg, "threshold_init", DEFAULT_THRESHOLD_INIT)
        # recorded, so cfg.json holds the values used (defaults included)
        self.cfg.extra["bandwidth"] = self.bandwidth
        self.cfg.extra["threshold_init"] = self.threshold_init
        #: per-feature threshold [d_sae] in pre-activation units (trained directly; see the module docstring)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=full_precision_dtype(self.W_enc.dtype)))

    def _initialize_extra_(self) -> None:
        self.threshold.fill_(self.threshold_init)

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        """Clamp the thresholds to ``>= 0`` (an optimiser step may take one below 0)."""
        self.threshold.clamp_(min=0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # state_dicts (checkpoints) from before the threshold was trained directly hold log_threshold
        old = state_dict.pop(prefix + "log_threshold", None)
        if old is not None and prefix + "threshold" not in state_dict:
            state_dict[prefix + "threshold"] = old.exp()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        """SAELens-named tensors; ``threshold [d_sae]`` in its own (at least float32) dtype."""
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
        self.threshold.copy_(threshold)  # exact: the file's values are the parameter's
        return self
