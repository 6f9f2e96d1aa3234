"""Which TransformerLens weight-processing switches an SAE's hook depends on, recorded with the SAE and checked
against the model it is used on.

``fold_ln`` and ``center_writing_weights`` change the weights, and with them the values some hooks see:
``center_writing_weights`` removes the mean over d_model from everything written to the residual stream, so
``hook_resid_*``, ``hook_mlp_out``, ``hook_attn_out`` and the embeddings change; ``fold_ln`` changes what the norms
output. The MLP's hidden activations (``mlp.hook_pre``, ``mlp.hook_post``) do not change with any switch (the norm
before them centres and scales its input whatever was folded). An SAE trained on a processing-dependent hook under
one setting reads different activations under another, with no error: its features silently mean something else.

So the SAE records, in ``cfg.extra["model_processing"]``, the model's switches when it was trained on such a hook
(:func:`record_model_processing`), and :func:`check_model_processing` refuses it on a model whose relevant switches
differ. An SAE without the record (a SAELens file, or one saved before saecircuits recorded it) cannot be checked:
a warning says so, rather than refusing every such file.
"""

from __future__ import annotations

import logging
from typing import Any

from saecircuits.saes.base import SAE, SAEError

__all__ = ["processing_switches", "model_processing_of", "record_model_processing", "check_model_processing"]

logger = logging.getLogger(__name__)

_FREE = ("mlp.hook_pre", "mlp.hook_post")
_RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "hook_embed",
             "hook_pos_embed")
_ALL = ("fold_ln", "center_writing_weights", "fold_value_biases")
_FLAGS = {"fold_ln": "--no-fold-ln", "center_writing_weights": "--no-center-writing-weights",
          "fold_value_biases": "fold_value_biases"}


def processing_switches(hook_point: str) -> tuple[str, ...]:
    """The weight-processing switches whose value changes the activations at ``hook_point``.

    ``()`` for the MLP's hidden activations; ``("center_writing_weights",)`` for residual-stream values and writes
    (``hook_resid_*``, ``hook_mlp_out``, ``hook_attn_out``, embeddings); every switch but ``center_unembed`` (which
    changes only the logits) for any other hook, to be safe.
    """
    if hook_point.endswith(_FREE):
        return ()
    if hook_point.endswith(_RESIDUAL):
        return ("center_writing_weights",)
    return _ALL


def model_processing_of(model) -> dict[str, bool] | None:
    """The switches in effect on ``model`` (``models.load`` provenance), or None when they were not recorded.

    TransformerLens centres writing weights only on LayerNorm models (on RMSNorm models it skips the step), so
    ``center_writing_weights`` is reported False there whatever was asked: the activations are the same either way,
    and an SAE trained on the raw model must not be refused for it.
    """
    from saecircuits.models.load import ModelLoadError, model_provenance

    try:
        processing = model_provenance(model).processing
    except ModelLoadError:
        return None
    if not processing:
        return None
    processing = dict(processing)
    norm = str(getattr(getattr(model, "cfg", None), "normalization_type", "LN") or "")
    if norm not in ("LN", "LNPre"):
        processing["center_writing_weights"] = False
    return processing


def record_model_processing(sae: SAE, model) -> None:
    """Write ``model``'s switches into ``sae.cfg.extra["model_processing"]`` when the SAE's hook depends on them
    (nothing for ``mlp.hook_post``, or when the model's processing is not recorded)."""
    processing = model_processing_of(model)
    if processing is not None and processing_switches(sae.hook_point):
        sae.cfg.extra["model_processing"] = {k: bool(v) for k, v in processing.items()}


def check_model_processing(sae: SAE, model, *, where: Any = None) -> None:
    """Refuse an SAE trained on a processing-dependent hook under other switches than ``model`` was loaded with.

    Args:
        sae: the SAE (``cfg.extra["model_processing"]`` as written by :func:`record_model_processing`).
        model: the model it is about to read activations from.
        where: the SAE's folder, named in the message.

    Raises:
        SAEError: a relevant switch differs, naming both settings and the fix (load the model with the SAE's
            settings, or train an SAE under the model's).
    """
    switches = processing_switches(sae.hook_point)
    if not switches:
        return
    name = f"the SAE in {where}" if where is not None else "the SAE"
    recorded = sae.cfg.extra.get("model_processing")
    current = model_processing_of(model)
    if not isinstance(recorded, dict) or current is None:
        logger.warning(
            "%s reads %s, whose activations depend on the model's weight processing (%s), but %s; make sure the "
            "model is loaded with the processing the SAE was trained under", name, sae.hook_point, ", ".join(switches),
            "the SAE does not record it" if current is not None else "the model's processing is not recorded")
        return
    diff = [s for s in switches if s in recorded and s in current and bool(recorded[s]) != bool(current[s])]
    if diff:
        theirs = ", ".join(f"{s}={bool(recorded[s])}" for s in diff)
        mine = ", ".join(f"{s}={bool(current[s])}" for s in diff)
        flags = " ".join(_FLAGS[s] for s in diff)
        raise SAEError(
            f"{name} was trained on {sae.hook_point} of a model loaded with {theirs}, but this model has {mine}; "
            f"the activations there differ, so its features would not mean what they meant. Load the model with the "
            f"SAE's settings (toggle {flags}), or train an SAE under this model's processing"
        )


def adapt_to_model(sae: SAE, model, *, where: Any = None) -> SAE:
    """``sae`` in the basis of ``model``'s hooks: the norm weight a family read with folded into the encoder.

    TransformerLens' ``ln2.hook_normalized`` is the norm's output before its learned weight (and bias). Transcoders
    of sparsify, Gemma Scope and circuit-tracer read the MLP's actual input, the norm's output with the weight
    applied (``cfg.extra["basis"]["norm_weight_applied"]``). On a model loaded without ``fold_ln`` (which
    :func:`check_model_processing` requires for them) the weight ``w`` and bias ``b`` are the bridge's ``ln2``
    parameters, and ``(n * w + b) @ W_enc + b_enc = n @ (w[:, None] * W_enc) + (b @ W_enc + b_enc)`` (a skip matrix
    likewise: ``W_skip * w`` and ``b_dec + W_skip @ b``) gives the same features and reconstruction from ``n``, the
    hook's value. The identity ``ln2(x) == n * w + b`` is checked on a probe first, so a norm of another form
    (Gemma's ``1 + w``) is refused rather than folded wrongly. Other SAEs are returned unchanged.

    Returns:
        a new SAE (the input is not modified) or ``sae`` itself.

    Raises:
        SAEError: the model was loaded with ``fold_ln`` (the weight is then inside the MLP's input weights and
            cannot be taken back out), the hook is not ``blocks.L.ln2.hook_normalized``, or the norm is not of the
            form ``n * w + b``.
    """
    import copy

    import torch

    basis = sae.cfg.extra.get("basis") or {}
    if not basis.get("norm_weight_applied") or basis.get("norm_weight_folded"):
        return sae
    name = f"the SAE in {where}" if where is not None else "the SAE"
    parts = sae.hook_point.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or parts[2:] != ["ln2", "hook_normalized"]:
        raise SAEError(f"{name} reads the MLP's input with the norm's weight applied, but its hook {sae.hook_point!r} "
                       "is not blocks.L.ln2.hook_normalized; saecircuits cannot put it in this model's basis")
    layer = int(parts[1])
    if not sae.is_transcoder or sae.cfg.apply_b_dec_to_input:
        raise SAEError(f"{name} reconstructs the weighted MLP input it reads, which no TransformerLens hook carries; "
                       "saecircuits folds the norm's weight only into transcoders (that write the MLP's output)")
    processing = model_processing_of(model) or {}
    if processing.get("fold_ln", True):
        raise SAEError(f"{name} reads the MLP's input with ln2's weight applied; with fold_ln that weight is folded "
                       "into the MLP's input weights and TransformerLens' ln2.hook_normalized no longer carries it. "
                       "Load the model with --no-fold-ln")
    ln2 = model.blocks[layer].ln2
    w = getattr(ln2, "w", None)
    b = getattr(ln2, "b", None)
    if w is None:
        raise SAEError(f"{name}: the model's blocks.{layer}.ln2 has no weight to fold; it cannot read the weighted "
                       "MLP input")
    probe = torch.arange(1, 9, device=w.device)[None] % int(model.cfg.d_vocab)
    with torch.no_grad():
        _, cache = model.run_with_cache(probe, names_filter=[f"blocks.{layer}.hook_resid_mid", sae.hook_point])
        n = cache[sae.hook_point].double()
        weighted = n * w.double() + (0.0 if b is None else b.double())
        actual = ln2(cache[f"blocks.{layer}.hook_resid_mid"]).double()
    if not torch.allclose(actual, weighted, rtol=1e-4, atol=1e-5):
        raise SAEError(f"{name}: blocks.{layer}.ln2 of this model is not of the form normalized * weight + bias "
                       f"(largest difference {float((actual - weighted).abs().max()):.3g}), so the weight the SAE "
                       "expects cannot be folded into it exactly")
    out = copy.deepcopy(sae)
    if out.W_enc.dtype in (torch.float16, torch.bfloat16):
        out = out.float()  # the folded weights are not representable in 16 bits
    dt = out.W_enc.dtype
    wd = w.detach().double().to(out.W_enc.device)
    bd = None if b is None else b.detach().double().to(out.W_enc.device)
    with torch.no_grad():
        W_enc = out.W_enc.double()
        if bd is not None:
            out.b_enc.copy_((out.b_enc.double() + bd @ W_enc).to(dt))
        out.W_enc.copy_((wd[:, None] * W_enc).to(dt))
        if out.skip_connection:
            W_skip = out.W_skip.double()
            if bd is not None:
                out.b_dec.copy_((out.b_dec.double() + W_skip @ bd).to(dt))
            out.W_skip.copy_((W_skip * wd[None, :]).to(dt))
    out.cfg.extra["basis"] = {**basis, "norm_weight_folded": True}
    return out
