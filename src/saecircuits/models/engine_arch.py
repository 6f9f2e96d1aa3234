"""What the engine (:mod:`saecircuits.models.engine`) reads from a TransformerBridge and its Hugging Face model, and
the small tensor helpers of its maths.

The engine's forward is one idea and lives in ``engine.py``; this module holds the architecture-specific reading it
needs (the block shape: parallel or sequential, partial or pair-wise rotary; optional norms and query/key norms;
sliding windows; the rotary function with its per-layer-type base; Gemma's embedding scale and attention parts) and
the helpers the forward applies (head split, rotary application, soft caps), so each architecture's quirks are
found in one place. Sources as the engine's module docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saecircuits.models.norms import module_norm_params


class EngineError(ValueError):
    """The model's blocks are not of a shape this engine computes, or a hook name it does not fire."""


@dataclass(frozen=True)
class BlockShape:
    """How a block wires its sub-layers, read from the Hugging Face config and modules (:func:`_block_shape`).

    Attributes:
        parallel: attention and MLP both read ``resid_pre`` and add to it (GPT-NeoX / Pythia, GPT-J):
            ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))``; the block has no
            ``hook_resid_mid`` and an edit anywhere in it recomputes the whole block at P.
        qk_norm: RMSNorm on queries and keys before the rotation: ``"head"`` over each head's ``d_head`` (Qwen 3,
            Gemma 3), ``"proj"`` over the whole projection ``n_heads * d_head`` (OLMo 2), None without.
        qk_eps: that norm's epsilon.
        rotary_interleaved: rotary embeddings rotate adjacent pairs of dims (GPT-J), not the two halves.
    """

    parallel: bool = False
    qk_norm: str | None = None
    qk_eps: float = 1e-6
    rotary_interleaved: bool = False


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _hf_last_logits(hf_model, tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """The Hugging Face forward's logits (soft-capped where the model caps them) at the last ``keep`` positions of
    ``tokens [B, S]``: float32 ``[B, keep, d_vocab]``, unembedding only those where the forward takes
    ``logits_to_keep`` (every ``*ForCausalLM`` of transformers 5)."""
    import inspect

    if "logits_to_keep" in inspect.signature(hf_model.forward).parameters:
        logits = hf_model(tokens, logits_to_keep=keep).logits
    else:
        logits = hf_model(tokens).logits
    return logits[:, -keep:].float()


def _optional_norm(block, name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`_norm_params` of ``block.<name>``, or None when the block has no such norm (OLMo 2 has no ln1/ln2,
    only ln1_post/ln2_post; GPT-J's parallel block has ln1 alone)."""
    if name not in dict(block.named_children()):
        return None
    return _norm_params(getattr(block, name))


def _qk_norm_weight(block, hf_attn, name: str) -> torch.Tensor | None:
    """The effective weight of the attention's ``q_norm``/``k_norm`` RMSNorm (Qwen 3, OLMo 2, Gemma 3), or None:
    the bridge's module where it wraps one (Gemma 3's ``(1 + weight)`` offset read by
    :func:`saecircuits.models.norms.module_norm_params`), else the Hugging Face module's weight.

    Raises:
        EngineError: a q/k norm with a bias (not an RMSNorm), or a Gemma-style one the bridge does not wrap.
    """
    mod = getattr(hf_attn, name, None)
    if mod is None:
        return None
    if getattr(mod, "bias", None) is not None:
        raise EngineError(f"{type(mod).__name__} as {name} is not a plain RMSNorm; not supported by the engine")
    wrapped = getattr(block.attn, name, None)
    if wrapped is not None and hasattr(wrapped, "uses_rms_norm"):
        return _norm_params(wrapped)[0]
    if "gemma" in type(mod).__name__.lower():
        raise EngineError(f"{type(mod).__name__} as {name} (a (1 + weight) norm the bridge does not wrap) is not "
                          "supported by the engine")
    return mod.weight.detach()


def _block_shape(model, hf_model) -> BlockShape:
    """The :class:`BlockShape` of a bridge's blocks, from its config and the Hugging Face attention modules.

    Raises:
        EngineError: q and k norms of different kinds, or layers that differ in shape.
    """
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    interleaved = getattr(hf_model.config, "model_type", "") == "gptj"
    hf_attn = getattr(model.blocks[0].attn, "original_component", None)
    q_norm = getattr(hf_attn, "q_norm", None)
    if q_norm is None:
        return BlockShape(parallel=parallel, rotary_interleaved=interleaved)
    eps = getattr(q_norm, "variance_epsilon", getattr(q_norm, "eps", None))
    if eps is None:
        raise EngineError(f"{type(q_norm).__name__} has no epsilon the engine can read")
    d_head = int(model.cfg.d_head)
    kind = "head" if q_norm.weight.shape[-1] == d_head else "proj"
    return BlockShape(parallel=parallel, qk_norm=kind, qk_eps=float(eps), rotary_interleaved=interleaved)


def _heads(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` back in ``like``'s ``[..., heads, d_head]`` layout (a whole-projection q/k norm fires it flattened)."""
    return x if x.dim() == like.dim() else x.unflatten(-1, like.shape[-2:])


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotation of adjacent pairs ``(x0, x1) -> (-x1, x0)``."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of the first ``cos.shape[-1]`` dims of each head (all of them unless partial rotary,
    GPT-NeoX's ``rotary_pct``, GPT-J's ``rotary_dim``); the rest pass through. Rotate-half (Llama, GPT-NeoX), or
    adjacent pairs with ``interleaved`` (GPT-J)."""
    rotate = _rotate_every_two if interleaved else _rotate_half
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate(rot) * sin, rest], dim=-1)


def _norm_params(bridge_norm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a bridge norm applies after normalising (:func:`saecircuits.models.norms.module_norm_params`)."""
    try:
        params = module_norm_params(bridge_norm)
    except ValueError as err:
        raise EngineError(str(err)) from err
    return params.weight, params.bias


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's soft cap ``cap * tanh(x / cap)`` (attention scores, Gemma 2; final logits), or ``x`` when None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _gemma_layer_parts(hf_attn, hf_model, d_head: int) -> dict:
    """A block's Gemma-only :class:`_Layer` fields (nothing for other models): the attention soft cap (Gemma 2) and
    the layer's own rotary (Gemma 3's sliding layers use ``rope_local_base_freq``), each read from the model's own
    modules and config. (Its post-attention/post-MLP norms and q/k norms are read as OLMo 2's and Qwen 3's are.)"""
    parts: dict = {}
    if hf_attn is not None and getattr(hf_attn, "attn_logit_softcapping", None) is not None:
        parts["softcap"] = float(hf_attn.attn_logit_softcapping)
    layer_type = getattr(hf_attn, "layer_type", None)
    if layer_type is not None and _rotary_takes_layer_type(hf_model):
        parts["rotary"] = _rotary_fn(hf_model, d_head, layer_type=layer_type)
    return parts


def _embed_scale(hf_model) -> float | None:
    """The factor Gemma multiplies token embeddings by (``embed_tokens.embed_scale``, sqrt(d_model)); None elsewhere."""
    emb = getattr(getattr(hf_model, "model", hf_model), "embed_tokens", None)
    emb = getattr(emb, "original_component", emb)
    scale = getattr(emb, "embed_scale", None)
    return None if scale is None else float(scale)


def _rotary_takes_layer_type(hf_model) -> bool:
    import inspect

    rotary = getattr(getattr(hf_model, "model", hf_model), "rotary_emb", None)
    rotary = getattr(rotary, "original_component", rotary)
    return rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters


def _model_windows(model) -> list[int]:
    """Every window size the Hugging Face config names (``sliding_window`` unless ``use_sliding_window`` is False,
    ``window_size``), whatever the engine made of them, so the load check crosses them all."""
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    names = ("window_size",) if getattr(cfg, "use_sliding_window", True) is False else ("sliding_window", "window_size")
    values = [getattr(cfg, name, None) for name in names]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]


def _is_gpt_neo(hf_model) -> bool:
    return getattr(hf_model.config, "model_type", "") == "gpt_neo"


def _layer_windows(hf_model, n_layers: int) -> list[int | None]:
    """Sliding-window size per layer (None = global): GPT-Neo's ``attention_layers``, else ``layer_types``."""
    cfg = hf_model.config
    if _is_gpt_neo(hf_model):
        kinds = list(cfg.attention_layers)
        return [int(cfg.window_size) if kinds[i] == "local" else None for i in range(n_layers)]
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return [None] * n_layers
    if types is None:
        return [int(window)] * n_layers
    return [int(window) if types[i] == "sliding_attention" else None for i in range(n_layers)]


def _rotary_fn(hf_model, d_head: int, layer_type: str | None = None):
    """cos/sin ``[B, S, rotary_dim]`` at absolute positions ``[B, S]`` from the Hugging Face model's own rotary module
    (for ``layer_type``'s base where the module keeps one per layer type: Gemma 3)."""
    base = getattr(hf_model, "model", None) or getattr(hf_model, "base_model", hf_model)  # GPT-NeoX: gpt_neox
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise EngineError("rotary model without a model-level rotary_emb module; not supported by the engine")
    probe = next(hf_model.parameters())

    gptj = getattr(hf_model.config, "model_type", "") == "gptj"

    def fn(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = torch.zeros(1, dtype=probe.dtype, device=pos.device)
        cos, sin = rotary(dummy, pos) if layer_type is None else rotary(dummy, pos, layer_type)
        if gptj:  # GPT-J's module returns (sin, cos), one value per pair: repeat each for the pair's two dims
            cos, sin = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
        if cos.shape[-1] > d_head or cos.shape[-1] % 2:
            raise EngineError(f"rotary embeddings of width {cos.shape[-1]} for heads of {d_head} are not supported")
        return cos, sin

    return fn
