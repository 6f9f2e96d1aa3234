"""SAEs on disk: the SAELens folder layout, and the reference notebook's checkpoint format.

SAELens layout (``save_sae`` / ``load_sae``)::

    folder/cfg.json                   SAELens keys (architecture, d_in, d_sae, dtype, device,
                                      apply_b_dec_to_input, normalize_activations, hook_name, metadata{...})
                                      plus ours under "saecircuits" (the full :class:`SAEConfig`)
    folder/sae_weights.safetensors    W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
                                      (+ threshold [d_sae] for jumprelu / batchtopk)

Saved SAEs take RAW activations (``normalize_activations = "none"``): the trainer folds its scale into the
weights first (:meth:`saecircuits.saes.base.SAE.fold_activation_scale_`).

Reference format (``import_reference_checkpoint``, analysis-spec.md 4.11): ``{name}.pt`` = torch state dict with
``W_enc, W_dec, b_enc, b_dec`` (float32) and ``{name}.json`` = the training config (``layer``, ``act``,
``expansion_factor``, ``l1_coeff``, ``reg``, optionally ``d_in``, ``model_name``, ...). Loaded with
``torch.load(weights_only=True, map_location="cpu")``: no arbitrary unpickling, no device assumptions (pitfall 40).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saecircuits.atomic import atomic_write
from saecircuits.saes.base import SAE, SAEConfig, SAEError
from saecircuits.saes.registry import build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1


_atomic_write = atomic_write


def sae_cfg_json(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` dict of ``sae`` (SAELens keys + ``"saecircuits"`` with our full config)."""
    cfg = sae.cfg
    device = str(sae.W_enc.device)
    out: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "hook_name": cfg.hook_point,
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_point,
            "hook_head_index": None,
            "sae_lens_training_version": None,
        },
        "saecircuits": {"format_version": FORMAT_VERSION, "config": cfg.to_dict()},
    }
    if "k" in cfg.extra:
        out["k"] = cfg.extra["k"]
    return out


def save_sae(sae: SAE, folder: str | os.PathLike) -> Path:
    """Write ``sae`` in the SAELens layout to ``folder`` (created if needed); returns the folder.

    Each file is written atomically (temp file, then ``os.replace``); the weights are written before
    ``cfg.json``, so a folder with a ``cfg.json`` always has the weights it describes.

    Raises:
        SAEError: ``cfg.extra`` is not JSON-serialisable.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cfg_text = json.dumps(sae_cfg_json(sae), indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SAEError(
            f"SAE config of {folder} is not JSON-serialisable ({e}); keep cfg.extra to plain values"
        ) from e
    weights = {k: v.cpu() for k, v in sae.export_weights().items()}
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CFG_FILE, lambda tmp: Path(tmp).write_text(cfg_text + "\n"))
    return folder


def _config_from_json(d: dict[str, Any], path: Path) -> SAEConfig:
    ours = d.get("saecircuits")
    if isinstance(ours, dict) and "config" in ours:
        try:
            return SAEConfig.from_dict(dict(ours["config"]))
        except (TypeError, SAEError) as e:
            raise SAEError(f"{path}: the 'saecircuits.config' entry is invalid ({e}); re-save the SAE") from e
    # A plain SAELens cfg.json (saved by SAELens itself).
    missing = [k for k in ("architecture", "d_in", "d_sae") if k not in d]
    hook = d.get("hook_name") or (d.get("metadata") or {}).get("hook_name")
    if missing or not hook:
        raise SAEError(
            f"{path} lacks required keys {missing + ([] if hook else ['hook_name'])}; "
            "it is not an SAELens/saecircuits cfg.json: re-save the SAE with save_sae"
        )
    if d.get("normalize_activations", "none") not in ("none", None):
        raise SAEError(
            f"{path}: normalize_activations={d['normalize_activations']!r} is not supported; "
            "fold the scaling into the weights before saving"
        )
    extra = {"k": d["k"]} if "k" in d else {}
    return SAEConfig(
        architecture=d["architecture"],
        d_in=int(d["d_in"]),
        d_sae=int(d["d_sae"]),
        hook_point=hook,
        model_name=(d.get("metadata") or {}).get("model_name", d.get("model_name", "")) or "",
        dtype=d.get("dtype", "float32"),
        apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
        extra=extra,
    )


def _check_weights(sae: SAE, weights: dict[str, torch.Tensor], path: Path, fix: str) -> None:
    expected = sae.expected_weight_shapes()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise SAEError(
            f"{path}: tensors do not match a {sae.architecture!r} SAE (missing {missing}, unexpected "
            f"{unexpected}); {fix}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise SAEError(
                f"{path}: {name} has shape {tuple(weights[name].shape)}, expected {shape} for d_in={sae.d_in}, "
                f"d_sae={sae.d_sae}; {fix}"
            )
        if not weights[name].is_floating_point():
            raise SAEError(f"{path}: {name} has dtype {weights[name].dtype}, expected floating point; {fix}")


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae` (or by SAELens in its ``"standard"``/``"topk"``/``"jumprelu"``
    layout) onto ``device``, whatever device it was saved from. The SAE is returned in eval mode.

    Raises:
        SAEError: the folder or a file is missing, ``cfg.json`` is not valid JSON or lacks keys, the weights
            file is corrupt, or tensor names/shapes do not match the config; the message names the file.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise SAEError(f"SAE folder {folder} does not exist; pass the folder that save_sae wrote")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SAEError(
                f"{p} is missing; an SAE folder needs {CFG_FILE} and {WEIGHTS_FILE} (re-save it with save_sae)"
            )
    try:
        d = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt: re-save the SAE") from e
    if not isinstance(d, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object; re-save the SAE")
    cfg = _config_from_json(d, cfg_path)
    sae = build_sae(cfg, initialize=False)
    try:
        weights = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEError(
            f"{w_path} cannot be read as safetensors ({e}); the file is corrupt: re-save the SAE"
        ) from e
    _check_weights(sae, weights, w_path, "the weights do not belong to this cfg.json: re-save the SAE")
    sae.import_weights_(weights)
    return sae.to(device).eval()


def import_reference_checkpoint(
    pt_path: str | os.PathLike, json_path: str | os.PathLike, *, model_name: str | None = None
) -> SAE:
    """Import a reference-notebook SAE (``{name}.pt`` state dict + ``{name}.json`` config; analysis-spec.md 4.11).

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
    _check_weights(sae, weights, pt_path, f"it does not match {json_path.name} (layer/act/expansion_factor)")
    sae.import_weights_({k: v.float() for k, v in weights.items()})
    return sae.eval()
