"""The model's norms as linear maps at a cached scale, and the unembedding read-out built on the final one.

Attribution methods (DLA, SAE-error DLA, activation-scaled DLA, weight-based logit boosts, DFA) treat a LayerNorm or
RMSNorm as linear by freezing its scale at the value the clean run computed (TransformerLens's ``hook_scale``):
``norm(x) = centre(x) / scale * w + b`` with ``centre`` removing the mean over ``d_model`` for LayerNorm only. The
weight ``w`` and bias ``b`` are whatever the bridge left in the norm: ones and zeros after ``fold_ln`` (folded into
the next weights), the trained values without it. A Gemma norm multiplies by ``1 + w`` (its stored ``w`` is an
offset from 1): :class:`NormParams` holds that effective weight ``1 + w`` (float32, as Hugging Face computes it), so
every formula below is the same for Gemma. Applying them here, explicitly, makes every attribution mean the
same under every weight-processing switch (``fold_ln``, ``center_writing_weights``, ``center_unembed``): the
components of the answer logit sum to it, and logit-difference attributions do not move (tested in
tests/analysis/test_processing_invariance.py). This is the one place that formula lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saecircuits.models.errors import ModelLoadError

__all__ = ["NormParams", "module_norm_params", "norm_params", "optional_norm_params", "mlp_input_norm", "site_post_norm",
           "Readout", "readout_of"]


@dataclass(frozen=True)
class NormParams:
    """One norm as a linear map at a frozen scale.

    Attributes:
        centre: True for LayerNorm (subtract the mean over d_model), False for RMSNorm.
        weight: ``[d_model]`` applied after dividing by the scale.
        bias: ``[d_model]`` added last, or None (RMSNorm, bias-free LayerNorm).
    """

    centre: bool
    weight: torch.Tensor
    bias: torch.Tensor | None

    def linear(self, vectors: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The linear part ``centre(v) / scale * w`` of the norm on ``vectors [b, ..., d_model]``.

        Args:
            vectors: residual-stream components (sum of them = the norm's input).
            scale: ``[b]`` or ``[b, 1]``: the scale of each row's actual input (``hook_scale``).

        Returns:
            ``[b, ..., d_model]`` float32; summed over components it equals ``norm(x) - bias`` of their sum.
        """
        v = vectors.float()
        if self.centre:
            v = v - v.mean(-1, keepdim=True)
        v = v / scale.float().reshape(-1, *([1] * (v.dim() - 1)))
        return v * self.weight.float().to(v.device)


def module_norm_params(module) -> NormParams:
    """The :class:`NormParams` of one bridge norm module (``NormalizationBridge`` / ``RMSNormalizationBridge``).

    A norm with a ``(1 + weight)`` offset (Gemma: the bridge's ``uses_weight_offset``) gets the effective weight
    ``1 + weight`` in float32 (Hugging Face's ``Gemma2RMSNorm``: ``norm(x.float()) * (1.0 + weight.float())``).
    """
    rms = bool(getattr(module, "uses_rms_norm", False))
    weight = module.weight.detach()
    if getattr(module, "uses_weight_offset", False):
        weight = 1.0 + weight.float()
    comp = getattr(module, "original_component", None)
    bias = None if rms or comp is None or getattr(comp, "bias", None) is None else comp.bias.detach()
    return NormParams(centre=not rms, weight=weight, bias=bias)


def norm_params(model, name: str) -> NormParams:
    """The :class:`NormParams` of the bridge's norm module at ``name`` (``ln_final``, ``blocks.1.ln2``, ...).

    Raises:
        ModelLoadError: a norm other than LayerNorm/RMSNorm.
    """
    kind = str(getattr(model.cfg, "normalization_type", "LN"))
    if not (kind.startswith("LN") or kind.startswith("RMS")):
        raise ModelLoadError(f"normalization_type {kind!r} is not supported (LayerNorm or RMSNorm only); use a model "
                             "with LayerNorm or RMSNorm")
    return module_norm_params(model.get_submodule(name))


def optional_norm_params(model, name: str) -> NormParams | None:
    """:func:`norm_params` of the norm at ``name``, or None when the model has no such module: OLMo 2's blocks have
    ``ln1_post``/``ln2_post`` (norms on the attention and MLP outputs) and no ``ln1``/``ln2``; most models the
    reverse; GPT-J's parallel block has ``ln1`` alone."""
    try:
        model.get_submodule(name)
    except AttributeError:
        return None
    return norm_params(model, name)


def mlp_input_norm(model, layer: int) -> str:
    """The name of the norm block ``layer`` applies to its MLP's input: ``blocks.L.ln2``, or ``blocks.L.ln1`` in
    GPT-J's parallel block, where one norm feeds attention and the MLP."""
    name = f"blocks.{layer}.ln2"
    return name if optional_norm_params(model, name) is not None else f"blocks.{layer}.ln1"


def site_post_norm(model, hook_point: str) -> tuple[NormParams, str] | None:
    """The norm that what an SAE site writes passes before it joins the residual stream, with the name of that
    norm's ``hook_scale``: ``blocks.L.ln2_post`` for ``blocks.L.mlp.hook_post`` (through ``W_out``),
    ``blocks.L.ln1_post`` for ``blocks.L.attn.hook_z`` (through ``W_O``); None for other sites and for models
    without such a norm. Gemma 2/3 have them after a pre-norm (``ln1``/``ln2``), OLMo 2 in place of one; either
    way the site's ``hook_mlp_out``/``hook_attn_out`` is the normed output.

    This is the one post-norm readout: at the frozen scale ``s`` of a prompt, a write ``v`` reaches the residual
    stream as ``norm.linear(v, s)`` (plus the norm's bias, if any, which no feature owns). Weight-based readouts (per
    unit of activation, no prompt) use ``norm.linear(v, 1)``: the scale is one positive number per position, so it
    rescales a position's features alike and never reorders them, as for the final norm.
    """
    parts = hook_point.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    name = {"mlp.hook_post": "ln2_post", "attn.hook_z": "ln1_post"}.get(".".join(parts[2:]))
    if name is None:
        return None
    params = optional_norm_params(model, f"blocks.{parts[1]}.{name}")
    return None if params is None else (params, f"blocks.{parts[1]}.{name}.hook_scale")


@dataclass(frozen=True)
class Readout:
    """How a residual-stream vector at P becomes an answer logit: ``logit_a = ln_final(x) @ W_U[:, a] + b_U[a]``.

    With the final norm's scale frozen at the clean run's, each residual component ``c`` contributes
    ``centre(c) / scale * w . W_U[:, a]`` (its DLA), and ``b . W_U[:, a] + b_U[a]`` is the constant rest.

    A model with soft-capped logits (Gemma 2: ``logit = cap * tanh(pre / cap)``) is not linear in the residual
    stream even at a frozen scale; there every DLA is of the **pre-cap** logit ``pre``, which the components sum to
    exactly (:meth:`pre_cap_logit`).

    Attributes:
        norm: the final norm (:class:`NormParams`).
        W_U: ``[d_model, d_vocab]``; b_U: ``[d_vocab]`` (zeros when the model has none).
        softcap: the final-logit soft cap (logits), or None.
    """

    norm: NormParams
    W_U: torch.Tensor
    b_U: torch.Tensor
    softcap: float | None = None

    def pre_cap_logit(self, normalized: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """The answer logit before any soft cap, from ``ln_final.hook_normalized`` ``[b, d_model]`` at P:
        ``(normalized * w + b) . W_U[:, a] + b_U[a]``, float32 ``[b]`` (logits)."""
        v = normalized.float().to(self.W_U.device) * self.norm.weight.float().to(self.W_U.device)
        cols = self.answer_columns(answer_ids)
        return (v * cols).sum(-1) + self.constant(answer_ids)

    def answer_columns(self, answer_ids: torch.Tensor) -> torch.Tensor:
        """``W_U[:, a]`` per answer: float32 ``[b, d_model]`` (to dot with :meth:`NormParams.linear` outputs)."""
        return self.W_U.float()[:, answer_ids.to(self.W_U.device)].T

    def constant(self, answer_ids: torch.Tensor) -> torch.Tensor:
        """``b . W_U[:, a] + b_U[a]`` per answer: float32 ``[b]`` (logits no residual component accounts for)."""
        a = answer_ids.to(self.W_U.device)
        out = self.b_U.float()[a]
        if self.norm.bias is not None:
            out = out + self.norm.bias.float().to(self.W_U.device) @ self.W_U.float()[:, a]
        return out

    def dla(self, components: torch.Tensor, scale: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """Direct logit attribution of ``components [b, C, d_model]`` to each row's answer: ``[b, C]`` (logits).

        Args:
            components: residual-stream writes at P whose sum is the final norm's input.
            scale: ``[b]`` the final norm's scale at P (``ln_final.hook_scale``).
            answer_ids: ``[b]``.
        """
        normed = self.norm.linear(components, scale)
        return torch.einsum("bcm,bm->bc", normed, self.answer_columns(answer_ids).to(normed.device))

    def vocab_logits(self, vectors: torch.Tensor) -> torch.Tensor:
        """Logits per unit of ``vectors [..., d_model]`` over the whole vocabulary, centred and weighted by the final
        norm but not divided by any scale: ``[..., d_vocab]`` (weight-based logit boosts)."""
        v = vectors.float()
        if self.norm.centre:
            v = v - v.mean(-1, keepdim=True)
        v = v * self.norm.weight.float().to(v.device)
        return v @ self.W_U.float().to(v.device)


def readout_of(model) -> Readout:
    """The model's :class:`Readout` (final norm + unembedding), whatever weight processing it was loaded with.

    Raises:
        ModelLoadError: the final norm is not supported (see :func:`norm_params`).
    """
    W_U = model.W_U.detach()
    try:
        b_U = model.b_U
    except AttributeError:
        b_U = None
    b_U = torch.zeros(W_U.shape[1], dtype=W_U.dtype, device=W_U.device) if b_U is None else b_U.detach()
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    return Readout(norm=norm_params(model, "ln_final"), W_U=W_U, b_U=b_U, softcap=cap if cap > 0 else None)
