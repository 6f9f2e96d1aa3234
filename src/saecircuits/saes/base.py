"""The SAE interface every analysis uses, whatever the architecture.

Parameters follow SAELens / the reference notebook (analysis-spec.md section 4.1):
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``.

Architectures (one file each: ``relu.py``, ``topk.py``, ``batchtopk.py``, ``jumprelu.py``) subclass :class:`SAE`
and override :meth:`SAE.encode_with_hidden_pre` (the training path, which may use batch-level information and
straight-through estimators) and, where inference differs, :meth:`SAE.encode`. ``encode``/``decode``/``forward``
are the inference path every analysis uses. Build SAEs by name with :func:`saecircuits.saes.registry.build_sae`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

#: seed of the reference notebook's ``AutoEncoder`` (analysis-spec.md 4.1); used when none is given.
DEFAULT_SEED = 47


class SAEError(ValueError):
    """An SAE does not fit its use (wrong width for the hook, unknown architecture, corrupt file)."""


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE; written to ``cfg.json``.

    Attributes:
        architecture: registry name (``"standard"`` = ReLU, as SAELens spells it; ``"topk"``, ``"batchtopk"``,
            ``"jumprelu"``).
        d_in: input width (e.g. d_mlp for ``blocks.L.mlp.hook_post``).
        d_sae: number of features.
        hook_point: TransformerLens hook name the SAE reads and writes, e.g. ``blocks.1.mlp.hook_post``.
        model_name: the model the SAE was trained on (provenance only).
        dtype: parameter dtype name.
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (the reference notebook does).
        extra: architecture-specific settings (``k`` for TopK/BatchTopK, ``bandwidth`` and
            ``threshold_init`` for JumpReLU, ``seed``, training metadata, ...). Must be JSON-serialisable.
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`SAEError`."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise SAEError(f"unknown SAEConfig keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SAEError(
            f"dtype {name!r} is not a torch floating-point dtype; use e.g. 'float32' or 'bfloat16'"
        )
    return dtype


class SAE(nn.Module):
    """Base SAE: linear encoder, architecture-specific activation, linear decoder (ReLU by default).

    Shapes: ``x [..., d_in]`` -> ``encode`` -> ``f [..., d_sae]`` -> ``decode`` -> ``x_hat [..., d_in]``.
    A freshly constructed SAE has all-zero parameters; call :meth:`initialize_` (``build_sae`` does).
    """

    #: architecture name in the registry and in ``cfg.json``; set by each subclass.
    architecture: str = "standard"
    #: whether the training loss adds a sparsity penalty (TopK/BatchTopK get sparsity from k instead).
    uses_sparsity_penalty: bool = True
    #: extra tensors (besides W_enc, W_dec, b_enc, b_dec) in the SAELens ``sae_weights.safetensors``.
    extra_weight_names: tuple[str, ...] = ()

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.d_in <= 0 or cfg.d_sae <= 0:
            raise SAEError(f"d_in and d_sae must be positive, got d_in={cfg.d_in}, d_sae={cfg.d_sae}")
        self.cfg = cfg
        dtype = _torch_dtype(cfg.dtype)
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

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize_(self, seed: int | None = None) -> SAE:
        """Reference-notebook initialisation (analysis-spec.md 4.1), seeded without global RNG side effects.

        ``W_enc`` then ``W_dec`` are drawn with PyTorch's ``kaiming_uniform_`` defaults (``a=0``, fan-in = size of
        dim 1, i.e. d_sae for ``W_enc`` and d_in for ``W_dec``) from one local CPU ``torch.Generator`` seeded with
        ``seed`` (default ``cfg.extra["seed"]`` or 47), so with seed 47 the values equal the notebook's
        ``torch.manual_seed(47)`` construction; biases are zero and every ``W_dec`` row is then scaled to unit L2
        norm. Unlike the notebook (pitfall 40) the process-wide RNG is untouched. Returns ``self``.
        """
        if seed is None:
            seed = int(self.cfg.extra.get("seed", DEFAULT_SEED))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w_enc = torch.empty(self.d_in, self.d_sae, dtype=torch.float32)
        w_dec = torch.empty(self.d_sae, self.d_in, dtype=torch.float32)
        nn.init.kaiming_uniform_(w_enc, generator=gen)
        nn.init.kaiming_uniform_(w_dec, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_enc.copy_(w_enc)
        self.W_dec.copy_(w_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self._initialize_extra_()
        return self

    def _initialize_extra_(self) -> None:
        """Hook for architecture-specific parameters (thresholds); called at the end of :meth:`initialize_`."""

    # ------------------------------------------------------------------ forward paths
    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activation ``(x - b_dec) @ W_enc + b_enc``: ``[..., d_in] -> [..., d_sae]``.

        Raises:
            SAEError: the last dimension of ``x`` is not ``d_in``.
        """
        if x.shape[-1] != self.d_in:
            raise SAEError(
                f"SAE on {self.hook_point} expects inputs of width d_in={self.d_in}, got {x.shape[-1]}; "
                "use an SAE trained on this hook point of this model"
            )
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return x_in @ self.W_enc + self.b_enc

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: ``(f [..., d_sae], hidden_pre [..., d_sae])`` for ``x [..., d_in]``.

        Differentiable (straight-through estimators where the activation is discontinuous). For BatchTopK it
        selects over the whole batch; every other architecture gives the same ``f`` as :meth:`encode`.
        """
        hidden_pre = self.hidden_pre(x)
        return torch.relu(hidden_pre), hidden_pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference path: feature activations ``f [..., d_sae]`` of ``x [..., d_in]`` (per token)."""
        return self.encode_with_hidden_pre(x)[0]

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``f @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat [..., d_in]`` of ``x [..., d_in]`` (inference path)."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ weights on disk (SAELens names)
    def export_weights(self) -> dict[str, torch.Tensor]:
        """The tensors of ``sae_weights.safetensors`` in SAELens names (detached, contiguous)."""
        return {
            "W_enc": self.W_enc.detach().contiguous(),
            "W_dec": self.W_dec.detach().contiguous(),
            "b_enc": self.b_enc.detach().contiguous(),
            "b_dec": self.b_dec.detach().contiguous(),
        }

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor :meth:`export_weights` writes and :meth:`import_weights_` needs."""
        return {
            "W_enc": (self.d_in, self.d_sae),
            "W_dec": (self.d_sae, self.d_in),
            "b_enc": (self.d_sae,),
            "b_dec": (self.d_in,),
        }

    @torch.no_grad()
    def import_weights_(self, weights: dict[str, torch.Tensor]) -> SAE:
        """Copy SAELens-named tensors into the parameters (shapes already validated by the caller)."""
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(self, name).copy_(weights[name])
        return self

    # ------------------------------------------------------------------ activation normalisation
    @torch.no_grad()
    def fold_activation_scale_(self, scale: float) -> SAE:
        """Fold an input scaling factor into the weights so the SAE works on raw activations.

        The trainer feeds ``x * scale`` (scale chosen so the mean L2 norm of inputs is sqrt(d_in), SAELens'
        ``normalize_activations="expected_average_only_in"``). Afterwards ``sae(x) == sae_before(x * scale) /
        scale`` and ``encode(x) == encode_before(x * scale)`` (features keep their trained values):
        ``W_enc *= scale``, ``W_dec /= scale``, ``b_dec /= scale``; ``b_enc`` and thresholds compare against
        the unchanged pre-activation and stay as they are. ``W_dec`` rows then have norm ``1/scale``. The scale
        is recorded in ``cfg.extra["folded_activation_scale"]`` (multiplied into any earlier fold).
        (SAELens ``SAE.fold_activation_norm_scaling_factor``.)

        Raises:
            SAEError: ``scale`` is not a positive finite number.
        """
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise SAEError(f"activation scale must be a positive finite number, got {scale}")
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        previous = float(self.cfg.extra.get("folded_activation_scale", 1.0))
        self.cfg.extra["folded_activation_scale"] = previous * scale
        return self


def fold_activation_scale(sae: SAE, scale: float) -> SAE:
    """Functional form of :meth:`SAE.fold_activation_scale_` (modifies ``sae`` in place and returns it)."""
    return sae.fold_activation_scale_(scale)
