"""Reference format (``import_reference_checkpoint``; the reference notebook's ``load_encoder``): ``{name}.pt`` = torch
state dict with ``W_enc, W_dec, b_enc, b_dec`` (float32) and ``{name}.json`` = the training config (``layer``,
``act``, ``expansion_factor``, ``l1_coeff``, ``reg``, optionally ``d_in``, ``model_name``, ...). Loaded with
``torch.load(weights_only=True, map_location="cpu")``: no arbitrary unpickling, no device assumptions (the notebook's
``torch.load`` had no ``map_location``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError
from saecircuits.saes.io import check_weights
from saecircuits.saes.registry import build_sae

__all__ = ["import_reference_checkpoint"]


def import_reference_checkpoint(
    pt_path: str | os.PathLike, json_path: str | os.PathLike, *, model_name: str | None = None
) -> SAE:
    """Import a reference-notebook SAE (``{name}.pt`` state dict + ``{name}.json`` config).

    The result is a ``"standard"`` (ReLU) SAE with ``apply_b_dec_to_input=True`` on the CPU, hook point
    ``blocks.{layer}.{act}``; ``d_in`` comes from the JSON when present (checked against ``W_enc``), else from
    ``W_enc``; ``d_sae`` must equal ``d_in * expansion_factor``. The JSON's training settings (``reg``,
    ``l1_coeff``, ``save_name``, ...) are kept in ``cfg.extra["reference_config"]``.

    Raises:
        SAEError: missing/corrupt files, missing JSON keys, or tensors whose names/shapes do not fit.
    """
    pt_path, json_path = Path(pt_path), Path(json_path)
    for p in (pt_path, json_path):
        if not p.is_file():
            raise SAEError(
                f"{p} is missing; pass the {{name}}.pt and {{name}}.json pair of one reference SAE"
            )
    try:
        ref = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEError(f"{json_path} is not valid JSON ({e}); pass the reference SAE's config file") from e
    missing = [k for k in ("layer", "act", "expansion_factor") if k not in ref]
    if missing:
        raise SAEError(
            f"{json_path} lacks keys {missing}; a reference config has layer, act, expansion_factor"
        )
    try:
        state = torch.load(pt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / non-weights-only files
        raise SAEError(
            f"{pt_path} cannot be loaded as a weights-only torch state dict ({type(e).__name__}: {e}); "
            "pass the reference notebook's saved state_dict"
        ) from e
    if not isinstance(state, dict) or "W_enc" not in state or not hasattr(state["W_enc"], "shape"):
        raise SAEError(f"{pt_path} is not a state dict with W_enc, W_dec, b_enc, b_dec")
    d_in = int(ref.get("d_in") or state["W_enc"].shape[0])
    expansion = ref["expansion_factor"]
    d_sae = d_in * expansion
    if not float(d_sae).is_integer() or not math.isfinite(d_sae):
        raise SAEError(f"{json_path}: d_in * expansion_factor = {d_sae} is not a whole number of features")
    reference_config = {
        k: v for k, v in ref.items() if isinstance(v, (str, int, float, bool, list, type(None)))
    }
    cfg = SAEConfig(
        architecture="standard",
        d_in=d_in,
        d_sae=int(d_sae),
        hook_point=f"blocks.{int(ref['layer'])}.{ref['act']}",
        model_name=model_name or str(ref.get("model_name", "")),
        dtype="float32",
        apply_b_dec_to_input=True,
        extra={"reference_config": reference_config},
    )
    sae = build_sae(cfg, initialize=False)
    weights = {k: v for k, v in state.items()}
    check_weights(sae, weights, pt_path, f"it does not match {json_path.name} (layer/act/expansion_factor)")
    sae.import_weights_({k: v.float() for k, v in weights.items()})
    return sae.eval()
