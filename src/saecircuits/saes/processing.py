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
    """The switches ``model`` was loaded with (``models.load`` provenance), or None when it was not recorded."""
    from saecircuits.models.load import ModelLoadError, model_provenance

    try:
        processing = model_provenance(model).processing
    except ModelLoadError:
        return None
    return dict(processing) if processing else None


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
