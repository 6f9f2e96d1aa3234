"""The SAE interface every analysis uses, whatever the architecture.

Parameters follow SAELens / the reference notebook (analysis-spec.md section 4.1):
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``.
Architectures subclass :class:`SAE` and override :meth:`encode` (and, if needed, :meth:`decode`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


class SAEError(ValueError):
    """An SAE does not fit its use (wrong width for the hook, unknown architecture, corrupt file)."""


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE; written to ``cfg.json``.

    Attributes:
        architecture: registry name (``"standard"`` = ReLU, as SAELens spells it).
        d_in: input width (e.g. d_mlp for ``blocks.L.mlp.hook_post``).
        d_sae: number of features.
        hook_point: TransformerLens hook name the SAE reads and writes, e.g. ``blocks.1.mlp.hook_post``.
        model_name: the model the SAE was trained on (provenance only).
        dtype: parameter dtype name.
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (the reference notebook does).
        extra: architecture-specific settings (``k`` for TopK, training metadata, ...).
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_point: str
    model_name: str = ""
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAE(nn.Module):
    """Base SAE: linear encoder, architecture-specific activation, linear decoder.

    Shapes: ``x [..., d_in]`` -> ``encode`` -> ``f [..., d_sae]`` -> ``decode`` -> ``x_hat [..., d_in]``.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def hook_point(self) -> str:
        return self.cfg.hook_point

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activation ``(x - b_dec) @ W_enc + b_enc``: ``[..., d_in] -> [..., d_sae]``."""
        if x.shape[-1] != self.d_in:
            raise SAEError(
                f"SAE on {self.hook_point} expects inputs of width d_in={self.d_in}, got {x.shape[-1]}; "
                "use an SAE trained on this hook point of this model"
            )
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return x_in @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``f [..., d_sae]`` (ReLU by default)."""
        return torch.relu(self.hidden_pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``f @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat [..., d_in]`` of ``x [..., d_in]``."""
        return self.decode(self.encode(x))
