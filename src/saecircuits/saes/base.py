"""The SAE interface every analysis uses, whatever the architecture.

Parameters follow SAELens / the reference notebook's ``AutoEncoder`` (``sparse_coding/autoencoder.py``):
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``.

Architectures (one file each: ``relu.py``, ``topk.py``, ``batchtopk.py``, ``jumprelu.py``) subclass :class:`SAE`
and override :meth:`SAE.encode_with_hidden_pre` (the training path, which may use batch-level information and
straight-through estimators) and, where inference differs, :meth:`SAE.encode`. ``encode``/``decode``/``forward``
are the inference path every analysis uses. Build SAEs by name with :func:`saecircuits.saes.registry.build_sae`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

#: seed of the reference notebook's ``AutoEncoder``; used when none is given.
DEFAULT_SEED = 47


class SAEError(ValueError):
    """An SAE does not fit its use (wrong width for the hook, unknown architecture, corrupt file)."""


#: parameter dtypes an SAE may have, by canonical name (the names SAELens writes in ``cfg.json``).
SAE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: dtypes too coarse for optimiser updates and running averages (8 and 11 significant bits).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical name (``"float32"``, ``"bfloat16"``, ...) of an SAE dtype.

    Accepts a :class:`torch.dtype` or a string with or without the ``"torch."`` prefix (SAELens 6.x before its
    ``dtype_to_str`` helper wrote ``str(torch.float32) == "torch.float32"`` into ``cfg.json``).

    Raises:
        SAEError: not one of float32, float64, float16, bfloat16.
    """
    if isinstance(dtype, torch.dtype):
        for name, d in SAE_DTYPES.items():
            if d == dtype:
                return name
    elif isinstance(dtype, str):
        name = dtype.strip().removeprefix("torch.")
        if name in SAE_DTYPES:
            return name
    raise SAEError(
        f"SAE dtype {dtype!r} is not a supported torch floating-point dtype; "
        f"use one of {sorted(SAE_DTYPES)} (with or without the 'torch.' prefix)"
    )


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The :class:`torch.dtype` named by ``dtype`` (see :func:`dtype_name`). Raises :class:`SAEError`."""
    return SAE_DTYPES[dtype_name(dtype)]


def full_precision_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, raised to float32 when it is float16/bfloat16: the dtype of an SAE's precision-kept tensors."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


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
        dtype: dtype of ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``: ``"float32"``, ``"float64"``, ``"float16"`` or
            ``"bfloat16"`` (a ``"torch."`` prefix or a :class:`torch.dtype` is accepted and normalised). An SAE
            keeps it equal to its parameters' dtype through every move (``.to``, ``.half()``, ``.bfloat16()``,
            ...). Thresholds are kept in at least float32 whatever this says (:attr:`SAE.full_precision_tensors`).
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (the reference notebook does).
        d_out: output width when it differs from ``d_in`` (transcoders: ``W_dec [d_sae, d_out]``, ``b_dec
            [d_out]``); ``None`` means ``d_in``.
        hook_point_out: TransformerLens hook the SAE writes when it is not ``hook_point`` (a transcoder reads the
            MLP's input and writes ``blocks.L.hook_mlp_out``); ``None`` means ``hook_point``.
        extra: architecture-specific settings (``k`` for TopK/BatchTopK, ``threshold_lr`` for BatchTopK,
            ``bandwidth`` and ``threshold_init`` for JumpReLU, ``seed``, training metadata, ...), and the maths
            of foreign SAE families (:data:`MATHS_KEYS`). Building an SAE
            writes the value it used for every setting, defaults included, into its own copy of the config, so
            ``cfg.json`` records them all. Must be JSON-serialisable.

    Raises:
        SAEError: an unsupported ``dtype``.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_point: str
    model_name: str = ""
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    d_out: int | None = None
    hook_point_out: str | None = None

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)
        if self.d_out == self.d_in:
            self.d_out = None
        if self.hook_point_out == self.hook_point:
            self.hook_point_out = None

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


#: ``cfg.extra`` keys that change an SAE's maths (every architecture honours them; see :class:`SAE`):
#: ``skip_connection`` (bool: ``W_skip [d_out, d_in]``, reconstruction ``+ x @ W_skip.T``), ``input_normalization``
#: (``"none"`` or ``"layer_norm"``: each token is centred and divided by its unbiased std + ``input_normalization_eps``
#: inside the SAE, OpenAI's TopK SAEs), ``reshape_activations`` (``"none"`` or ``"hook_z"``: ``[..., n_heads,
#: d_head]`` inputs are flattened to ``d_in = n_heads * d_head``), ``topk_relu`` (bool, TopK only: ``False`` keeps
#: negative top-k values, as circuit-tracer's TopK transcoders do).
MATHS_KEYS = ("skip_connection", "input_normalization", "input_normalization_eps", "reshape_activations",
              "topk_relu")
INPUT_NORMALIZATIONS = ("none", "layer_norm")


class SAE(nn.Module):
    """Base SAE: linear encoder, architecture-specific activation, linear decoder (ReLU by default).

    Shapes: ``x [..., d_in]`` -> ``encode`` -> ``f [..., d_sae]`` -> ``decode`` -> ``x_hat [..., d_out]`` (``d_out =
    d_in`` except for transcoders, which read ``hook_point`` and write ``hook_point_out``).

    Reconstruction: ``decode(f, x) = f @ W_dec + bias(x)`` with ``bias(x) = b_dec`` for most SAEs. Two families
    make the bias depend on the input, so :meth:`decode` then needs ``x`` (it raises without it):

    * skip connections (sparsify, Gemma Scope 2 and circuit-tracer transcoders): ``bias(x) = b_dec + x @ W_skip.T``;
    * per-token input normalisation (``input_normalization="layer_norm"``, OpenAI's TopK SAEs, whose
      ``recons = (latents @ W_dec + pre_bias) * std(x) + mean(x)``): features are reported in activation units,
      ``f = latents * std(x)`` (a positive per-token factor: the same features fire, ranked the same), so
      ``f @ W_dec`` is each feature's exact share of the reconstruction and ``bias(x) = b_dec * std(x) + mean(x)``.

    Either way ``x_hat = sum_k f_k W_dec[k] + bias(x)`` exactly, so removing feature ``k``'s decoded part is
    ``- f_k W_dec[k]`` for every SAE.
    A freshly constructed SAE has all-zero parameters; call :meth:`initialize_` (``build_sae`` does). The SAE
    works on its own deep copy of ``cfg`` (moving or folding one SAE never changes another built from the same
    config).

    Precision: ``W_enc, W_dec, b_enc, b_dec`` have ``cfg.dtype``; inputs are cast to it. The tensors named in
    :attr:`full_precision_tensors` (thresholds) stay in at least float32 through every move, because Adam steps
    of about ``lr`` and running-average updates fall below the resolution of bfloat16/float16 (a bfloat16
    threshold of 1.1 has steps of 2**-7 ~ 0.008) and would be lost. After any ``.to()``/``.half()``/...,
    ``cfg.dtype`` is the new dtype of the parameters, so saving and reloading never rounds them.
    """

    #: architecture name in the registry and in ``cfg.json``; set by each subclass.
    architecture: str = "standard"
    #: whether the training loss adds a sparsity penalty (TopK/BatchTopK get sparsity from k instead).
    uses_sparsity_penalty: bool = True
    #: extra tensors (besides W_enc, W_dec, b_enc, b_dec) in the SAELens ``sae_weights.safetensors``.
    extra_weight_names: tuple[str, ...] = ()
    #: parameters/buffers kept in at least float32 when the rest of the SAE is float16/bfloat16.
    full_precision_tensors: tuple[str, ...] = ()
    #: whether :mod:`saecircuits.saes.trainer` can train this architecture (inference-only ones: gated).
    trainable: bool = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        d_out = cfg.d_out or cfg.d_in
        if cfg.d_in <= 0 or cfg.d_sae <= 0 or d_out <= 0:
            raise SAEError(f"d_in, d_out and d_sae must be positive, got d_in={cfg.d_in}, d_out={d_out}, "
                           f"d_sae={cfg.d_sae}")
        if d_out != cfg.d_in and cfg.apply_b_dec_to_input:
            raise SAEError(f"apply_b_dec_to_input needs d_out == d_in (b_dec is subtracted from the input), got "
                           f"d_in={cfg.d_in}, d_out={d_out}; transcoders set apply_b_dec_to_input=False")
        self.cfg = copy.deepcopy(cfg)
        extra = self.cfg.extra
        self.skip_connection = bool(extra.get("skip_connection", False))
        self.input_normalization = extra.get("input_normalization", "none")
        if self.input_normalization not in INPUT_NORMALIZATIONS:
            raise SAEError(f"cfg.extra['input_normalization'] must be one of {INPUT_NORMALIZATIONS}, got "
                           f"{self.input_normalization!r}")
        self.input_normalization_eps = float(extra.get("input_normalization_eps", 1e-5))
        self.reshape_activations = extra.get("reshape_activations", "none")
        if self.reshape_activations not in ("none", "hook_z"):
            raise SAEError(f"cfg.extra['reshape_activations'] must be 'none' or 'hook_z', got "
                           f"{self.reshape_activations!r}")
        dtype = torch_dtype(cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, d_out, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if self.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, cfg.d_in, dtype=dtype))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Output width (``d_in`` except for transcoders)."""
        return self.cfg.d_out or self.cfg.d_in

    @property
    def hook_point(self) -> str:
        """The hook the SAE reads (and, unless it is a transcoder, writes)."""
        return self.cfg.hook_point

    @property
    def hook_point_out(self) -> str:
        """The hook the SAE's reconstruction stands for (``hook_point`` except for transcoders)."""
        return self.cfg.hook_point_out or self.cfg.hook_point

    @property
    def is_transcoder(self) -> bool:
        """Reads one hook and writes another (``hook_point`` -> ``hook_point_out``)."""
        return self.hook_point_out != self.hook_point

    @property
    def decode_needs_input(self) -> bool:
        """The reconstruction's bias depends on the input (skip connection, per-token normalisation)."""
        return self.skip_connection or self.input_normalization != "none"

    @property
    def dtype(self) -> torch.dtype:
        """dtype of ``W_enc, W_dec, b_enc, b_dec`` (what ``cfg.dtype`` names)."""
        return self.W_enc.dtype

    # ------------------------------------------------------------------ moves keep config and precision right
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SAE:
        """Every ``.to()``, ``.half()``, ``.bfloat16()``, ``.float()``, ``.cuda()`` ... goes through here.

        Tensors in :attr:`full_precision_tensors` follow the device of a move but are converted from their
        current values (not through the low-precision result) to float32 when the move would make them
        float16/bfloat16. Afterwards ``cfg.dtype`` names the parameters' new dtype.

        Raises:
            SAEError: the move gave the parameters a dtype an SAE does not support (e.g. float8).
        """
        kept = set()
        for name in self.full_precision_tensors:
            t = getattr(self, name)
            kept.add(id(t))
            if t.grad is not None:
                kept.add(id(t.grad))

        def keep_precision(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in kept and out.dtype in LOW_PRECISION_DTYPES:
                return t.to(device=out.device, dtype=full_precision_dtype(out.dtype))
            return out

        super()._apply(keep_precision, recurse)
        self.cfg.dtype = dtype_name(self.W_enc.dtype)
        return self

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize_(self, seed: int | None = None) -> SAE:
        """Reference-notebook initialisation, seeded without global RNG side effects.

        ``W_enc`` then ``W_dec`` are drawn with PyTorch's ``kaiming_uniform_`` defaults (``a=0``, fan-in = size of
        dim 1, i.e. d_sae for ``W_enc`` and d_in for ``W_dec``) from one local CPU ``torch.Generator`` seeded with
        ``seed`` (default ``cfg.extra["seed"]`` or 47), so with seed 47 the values equal the notebook's
        ``torch.manual_seed(47)`` construction; biases are zero and every ``W_dec`` row is then scaled to unit L2
        norm. Unlike the notebook (which called ``torch.manual_seed``) the process-wide RNG is untouched. The seed
        used is recorded in ``cfg.extra["seed"]``. Returns ``self``.
        """
        if seed is None:
            seed = int(self.cfg.extra.get("seed", DEFAULT_SEED))
        self.cfg.extra["seed"] = int(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w_enc = torch.empty(self.d_in, self.d_sae, dtype=torch.float32)
        w_dec = torch.empty(self.d_sae, self.d_out, dtype=torch.float32)
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

    def after_optimizer_step_(self) -> None:
        """Hook the trainer calls after every optimiser step (JumpReLU keeps its thresholds ``>= 0``)."""

    # ------------------------------------------------------------------ forward paths
    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[..., d_in]``: an attention ``hook_z`` activation ``[..., n_heads, d_head]`` is flattened
        (``reshape_activations="hook_z"``, SAELens' ``reshape_activations``); other inputs are returned as they are.

        Raises:
            SAEError: the last dimension (or, for ``hook_z``, the last two) do not make ``d_in``.
        """
        if (self.reshape_activations == "hook_z" and x.dim() >= 2 and x.shape[-1] != self.d_in
                and x.shape[-2] * x.shape[-1] == self.d_in):
            x = x.flatten(-2)
        if x.shape[-1] != self.d_in:
            raise SAEError(
                f"SAE on {self.hook_point} expects inputs of width d_in={self.d_in}, got {x.shape[-1]}; "
                "use an SAE trained on this hook point of this model"
            )
        return x

    def _encoder_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x_in, scale)``: what the encoder multiplies (``b_dec`` already subtracted when the SAE does), in the
        SAE's dtype, and the per-token std ``[..., 1]`` of a normalising SAE (else None)."""
        x = self.flatten_input(x).to(self.W_enc.dtype)  # as SAELens' process_sae_in: inputs take the SAE's dtype
        scale = None
        if self.input_normalization == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            scale = centred.std(dim=-1, keepdim=True)  # unbiased, as OpenAI's LN
            x = centred / (scale + self.input_normalization_eps)
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return x_in, scale

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activation ``(x - b_dec) @ W_enc + b_enc``: ``[..., d_in] -> [..., d_sae]`` (``x``
        normalised first by a normalising SAE; ``b_dec`` subtracted only with ``apply_b_dec_to_input``).

        When ``b_dec`` needs a gradient and ``x`` does not (training), ``b_dec``'s gradient through the encoder is
        taken as ``-W_enc @ sum_b grad_pre[b]`` instead of autograd's ``grad_pre @ W_enc^T`` summed over the batch
        (a ``[batch, d_sae] x [d_sae, d_in]`` matmul, a sixth of a ReLU SAE's training step): the values are the same
        floats either way.

        Raises:
            SAEError: the last dimension of ``x`` is not ``d_in``.
        """
        x_in, _ = self._encoder_input(x)
        if (self.cfg.apply_b_dec_to_input and self.input_normalization == "none" and torch.is_grad_enabled()
                and self.b_dec.requires_grad and not x.requires_grad):
            # x_in detached, plus a bias term that is exactly 0 in value ((b - b) @ W_enc) and carries b_dec's
            # gradient -W_enc @ grad.sum(0): a matrix-vector product where autograd would multiply matrices
            zero = (self.b_dec.detach() - self.b_dec).to(self.W_enc.dtype) @ self.W_enc
            return x_in.detach() @ self.W_enc + (self.b_enc + zero)
        return x_in @ self.W_enc + self.b_enc

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: ``(f [..., d_sae], hidden_pre [..., d_sae])`` for ``x [..., d_in]``.

        Differentiable (straight-through estimators where the activation is discontinuous). For BatchTopK it
        selects over the whole batch; every other architecture gives the same ``f`` as :meth:`encode` (before the
        per-token scale of a normalising SAE).
        """
        hidden_pre = self.hidden_pre(x)
        return torch.relu(hidden_pre), hidden_pre

    def _inference_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token activations of the (normalised) input; architectures whose inference differs override it."""
        return self.encode_with_hidden_pre(x)[0]

    def _output_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token factor ``[..., 1]`` that puts a normalising SAE's latents in activation units (else None)."""
        if self.input_normalization == "none":
            return None
        return self._encoder_input(x)[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference path: feature activations ``f [..., d_sae]`` of ``x [..., d_in]`` (per token)."""
        f = self._inference_activations(x)
        scale = self._output_scale(x)
        return f if scale is None else f * scale

    def active_entries(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The positive entries of :meth:`encode` as ``torch.nonzero(f > 0, as_tuple=True) + (values,)``.

        Args:
            x: ``[*lead, d_in]``; mask: bool ``[*lead]`` (False rows count as all-zero codes), or None.

        Returns:
            one int64 index tensor ``[n]`` per dimension of ``f = encode(x)`` (the ``lead`` ones, then the feature),
            in ``torch.nonzero``'s row-major order, and the float32 values ``f[...]`` there ``[n]``; exactly what the
            dense code gives (an architecture whose codes are sparse by construction overrides this to skip the
            dense ``[*lead, d_sae]`` code).
        """
        f = self.encode(x).float()
        if mask is not None:
            f.masked_fill_(~mask[..., None], 0.0)
        idx = torch.nonzero(f > 0, as_tuple=True)
        return (*idx, f[idx])

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Activations of some features only: ``encode(x)[..., features]`` as ``[..., n]`` for ``x [..., d_in]``.

        Architectures whose activation is per feature (ReLU, JumpReLU) compute only those encoder columns (a
        corpus pass over a few features then costs ``n`` columns, not ``d_sae``); the others (TopK, BatchTopK,
        which compare features) encode everything and select.
        """
        if not self.per_feature_activation:
            return self.encode(x)[..., features.to(self.W_enc.device)]
        idx = features.to(self.W_enc.device)
        x_in, scale = self._encoder_input(x)
        pre = x_in @ self.W_enc[:, idx] + self.b_enc[idx]
        f = self._activate_columns(pre, idx)
        return f if scale is None else f * scale

    per_feature_activation = True
    """Each feature's activation depends on its own pre-activation only (False for TopK/BatchTopK)."""

    def _activate_columns(self, pre: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The activation applied to pre-activations of ``features`` (ReLU here)."""
        return torch.relu(pre)

    def decoder_bias(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """``bias(x)`` of the reconstruction (see the class docstring): ``b_dec [d_out]``, or ``[..., d_out]`` for an
        SAE whose bias depends on its input ``x [..., d_in]``.

        Raises:
            SAEError: the SAE needs ``x`` (skip connection, per-token normalisation) and none was given.
        """
        if not self.decode_needs_input:
            return self.b_dec
        if x is None:
            why = "a skip connection" if self.skip_connection else "per-token input normalisation"
            raise SAEError(f"the SAE on {self.hook_point} has {why}: its reconstruction depends on its input; "
                           "call decode(f, x) with the activations f was encoded from")
        x = self.flatten_input(x).to(self.W_dec.dtype)
        bias = self.b_dec
        if self.input_normalization == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            bias = self.b_dec * (x - mean).std(dim=-1, keepdim=True) + mean
        if self.skip_connection:
            bias = bias + x @ self.W_skip.T
        return bias

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``f @ W_dec + bias(x)``: ``[..., d_sae] -> [..., d_out]`` (in the SAE's dtype).

        ``x [..., d_in]`` (what ``f`` was encoded from) is needed only when :attr:`decode_needs_input`.

        Raises:
            SAEError: ``x`` is needed and missing.
        """
        return f.to(self.W_dec.dtype) @ self.W_dec + self.decoder_bias(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat [..., d_out]`` of ``x [..., d_in]`` (inference path)."""
        return self.decode(self.encode(x), x)

    # ------------------------------------------------------------------ weights on disk (SAELens names)
    def export_weights(self) -> dict[str, torch.Tensor]:
        """The tensors of ``sae_weights.safetensors`` in SAELens names (detached, contiguous)."""
        names = ("W_enc", "W_dec", "b_enc", "b_dec") + (("W_skip",) if self.skip_connection else ())
        return {name: getattr(self, name).detach().contiguous() for name in names}

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor :meth:`export_weights` writes and :meth:`import_weights_` needs."""
        shapes = {
            "W_enc": (self.d_in, self.d_sae),
            "W_dec": (self.d_sae, self.d_out),
            "b_enc": (self.d_sae,),
            "b_dec": (self.d_out,),
        }
        if self.skip_connection:
            shapes["W_skip"] = (self.d_out, self.d_in)
        return shapes

    @torch.no_grad()
    def import_weights_(self, weights: dict[str, torch.Tensor]) -> SAE:
        """Copy SAELens-named tensors into the parameters (shapes already validated by the caller)."""
        for name in ("W_enc", "W_dec", "b_enc", "b_dec") + (("W_skip",) if self.skip_connection else ()):
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
