"""Where an SAE reads and writes, as TransformerLens hook names, from the names other families use.

Public SAEs name their site in three ways: TransformerLens hook names (SAELens, Llama Scope), Hugging Face module
paths (EleutherAI sparsify: ``layers.3``, ``layers.3.mlp``; Gemma Scope 2: ``model.layers.17.output``,
``model.layers.17.post_feedforward_layernorm.output``), or a family's own words (Gemma Scope 1's ``res``/``mlp``/
``att``/``transcoders`` in the repository name, OpenAI's ``mlp_post_act``/``resid_delta_attn``/...). This module maps
each to the hook whose activations are the SAE's input (and, for transcoders, its output).

The map follows what each module computes (Hugging Face ``modeling_*.py``) and where TransformerLens fires each hook:

============================================  =====================================================
Hugging Face module path (block N)            TransformerLens hook
============================================  =====================================================
``layers.N`` / ``model.layers.N`` / ``h.N``   ``blocks.N.hook_resid_post`` (a decoder layer's output)
 / ``transformer.h.N`` / ``gpt_neox.layers.N``
``layers.N.input``                            ``blocks.N.hook_resid_pre`` (a decoder layer's input)
``….mlp`` (output)                            ``blocks.N.hook_mlp_out`` (Gemma 2/3: after the post-MLP norm,
                                              so ``post_feedforward_layernorm.output`` maps there too)
``….self_attn`` / ``….attn`` / ``….attention``  ``blocks.N.hook_attn_out`` (Gemma 2/3: ``post_attention_layernorm``)
``….self_attn.o_proj.input`` / ``….attn.c_proj.input`` / ``….attention.dense.input``
                                              ``blocks.N.attn.hook_z`` (heads flattened: ``d_in = n_heads * d_head``)
``….mlp.input`` / ``pre_feedforward_layernorm.output`` (Gemma) / ``post_attention_layernorm.output`` (Llama-style)
                                              ``blocks.N.ln2.hook_normalized`` (the MLP's input; see the basis note)
``embed_tokens`` / ``wte`` / ``embed_in``      ``hook_embed``
============================================  =====================================================

Basis note: TransformerLens' ``ln2.hook_normalized`` is the norm's output *before* its learned weight (the weight
is folded into the MLP's input weights, or multiplied after the hook). A family that reads the MLP's input with the
weight applied (sparsify's and Gemma Scope's transcoders) records ``basis.norm_weight_applied = True``; the run
folds that weight into ``W_enc`` or refuses (:func:`saecircuits.saes.processing.adapt_to_model`).
"""

from __future__ import annotations

import re

from saecircuits.saes.base import SAEError

__all__ = ["hook_from_module_path", "is_gemma_like", "OPENAI_LOCATIONS", "layer_of_hook", "raw_model_processing"]

#: OpenAI sparse_autoencoder locations (``sparse_autoencoder/paths.py``) -> TransformerLens hook of block L.
OPENAI_LOCATIONS = {
    "mlp_post_act": "blocks.{layer}.mlp.hook_post",
    "resid_delta_attn": "blocks.{layer}.hook_attn_out",
    "resid_delta_mlp": "blocks.{layer}.hook_mlp_out",
    "resid_post_attn": "blocks.{layer}.hook_resid_mid",
    "resid_post_mlp": "blocks.{layer}.hook_resid_post",
}

_LAYER = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.|language_model\.model\.|model\.language_model\.)?"
                    r"(?:layers|h)\.(\d+)(?:\.(.*))?$")
_EMBED = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.|model\.language_model\.)?(embed_tokens|wte|embed_in)"
                    r"(?:\.output)?$")
_ATTN = ("self_attn", "attn", "attention")
_Z_INPUTS = ("self_attn.o_proj.input", "attn.c_proj.input", "attention.dense.input", "attn.out_proj.input")


def is_gemma_like(model_name: str | None) -> bool:
    """Gemma 2/3 name their norms differently (``post_attention_layernorm`` is after attention, not before the MLP)."""
    return bool(model_name) and "gemma" in str(model_name).lower()


def hook_from_module_path(path: str, *, model_name: str | None = None) -> str:
    """The TransformerLens hook for a Hugging Face module path (see the module docstring's table).

    Args:
        path: e.g. ``layers.3``, ``model.layers.17.output``, ``layers.0.mlp``, ``h.5.attn``,
            ``model.layers.4.self_attn.o_proj.input``, ``embed_tokens``. A trailing ``.output`` means the module's
            output (the default); ``.input`` its input.
        model_name: the model the SAE was trained on; decides what ``post_attention_layernorm`` is (Gemma: the
            norm after attention; Llama, Qwen, Mistral, OLMo: the norm before the MLP).

    Returns:
        e.g. ``blocks.3.hook_resid_post``.

    Raises:
        SAEError: a path this map does not know, naming it and the known forms.
    """
    p = path.strip()
    if _EMBED.match(p):
        return "hook_embed"
    m = _LAYER.match(p)
    if m:
        layer, rest = int(m.group(1)), (m.group(2) or "")
        rest = rest.removesuffix(".output") if rest != "output" else ""
        gemma = is_gemma_like(model_name)
        if rest == "":
            return f"blocks.{layer}.hook_resid_post"
        if rest == "input":  # a decoder layer's input: the residual stream before the block
            return f"blocks.{layer}.hook_resid_pre"
        if rest in ("mlp", "post_feedforward_layernorm") or (rest == "mlp.down_proj" and not gemma):
            return f"blocks.{layer}.hook_mlp_out"
        if rest in _ATTN or rest in ("self_attn.o_proj", "attn.c_proj", "attention.dense") or (
                gemma and rest == "post_attention_layernorm"):
            return f"blocks.{layer}.hook_attn_out"
        if rest in _Z_INPUTS:
            return f"blocks.{layer}.attn.hook_z"
        if rest in ("mlp.input", "pre_feedforward_layernorm", "ln_2", "post_attention_layernorm") and (
                rest != "post_attention_layernorm" or not gemma):
            return f"blocks.{layer}.ln2.hook_normalized"
        if rest in ("mlp.act", "mlp.act_fn", "mlp.down_proj.input", "mlp.c_proj.input", "mlp.dense_4h_to_h.input"):
            return f"blocks.{layer}.mlp.hook_post"
    raise SAEError(
        f"the module path {path!r} does not map to a TransformerLens hook saecircuits knows (a decoder layer "
        "'layers.N', its 'mlp', its attention, the attention output projection's input, the MLP's input, or the "
        "token embedding); pass hook= (--hook) with the TransformerLens hook name the SAE reads"
    )


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def layer_of_hook(hook: str) -> int | None:
    """The block index of a TransformerLens hook name (``blocks.12.hook_resid_post`` -> 12), or None."""
    m = _BLOCK_HOOK.match(hook)
    return int(m.group(1)) if m else None


_RESIDUAL_VALUES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out",
                    "hook_embed")


def raw_model_processing(hook_point: str, hook_point_out: str | None = None, *, value_biases: bool = True,
                         norm_weight_applied: bool = False) -> dict[str, bool]:
    """The TransformerLens weight-processing switches an SAE trained on an unprocessed model (a Hugging Face model,
    or TransformerLens with every switch off) depends on, at their value there (all ``False``); for
    ``cfg.extra["model_processing"]`` (checked by :mod:`saecircuits.saes.processing`).

    Only switches that change the values at the SAE's hooks are recorded, so a model loaded with an irrelevant
    switch on is not refused:

    * residual-stream values and writes (``hook_resid_*``, ``hook_mlp_out``, ``hook_attn_out``, ``hook_embed``):
      ``center_writing_weights`` (it removes their mean over d_model on LayerNorm models);
    * ``attn.hook_z``: ``fold_value_biases`` (it moves ``b_V`` out of ``z``), only when the model has value biases
      (``value_biases=False`` for Gemma, whose attention has none);
    * ``ln2.hook_normalized`` read with the norm's weight applied (``norm_weight_applied=True``): ``fold_ln``, since
      only an unfolded model keeps that weight apart from the MLP's input weights. TransformerLens' hook itself is
      the norm's output before the weight under either setting, so without the weight nothing is recorded for it;
    * the MLP's hidden activations (``mlp.hook_pre``/``mlp.hook_post``): nothing.

    Args:
        hook_point: the hook the SAE reads.
        hook_point_out: the hook a transcoder writes (None for an SAE).
        value_biases: whether the model's attention has value biases.
        norm_weight_applied: whether the SAE reads ``ln2.hook_normalized`` times the norm's weight.
    """
    out: dict[str, bool] = {}
    for hook in (hook_point, hook_point_out):
        if not hook:
            continue
        if hook.endswith(_RESIDUAL_VALUES):
            out["center_writing_weights"] = False
        elif hook.endswith("attn.hook_z") and value_biases:
            out["fold_value_biases"] = False
        elif hook.endswith("ln2.hook_normalized") and norm_weight_applied:
            out["fold_ln"] = False
    return out
