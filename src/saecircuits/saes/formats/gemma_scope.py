"""Gemma Scope 1 and 2 (Google DeepMind's JumpReLU SAEs and transcoders for Gemma 2 and Gemma 3).

Gemma Scope 1 (``google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att,transcoders}``)
    Files: ``layer_{L}/width_{W}/average_l0_{N}/params.npz`` (compressed or not; read with ``np.load(allow_pickle=
    False)``), no config: the layer, width and site come from the path (the repository name says the site; the
    Hugging Face cache keeps it as ``models--google--gemma-scope-2b-pt-res``), or from ``hook=`` when the path does
    not say (a folder holding ``params.npz`` or the file itself; both must agree when both say). The token-embedding
    SAEs live in ``embedding/width_{W}/...`` (of a ``-res`` or ``-embeddings`` repository).
    Tensors (float32): ``W_enc [d, F]``, ``W_dec [F, d]``, ``b_enc [F]``, ``b_dec [d]``, ``threshold [F]`` (some
    copies spell them ``w_enc``/``w_dec``; both are read).

Gemma Scope 2 (``google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}``)
    Files: ``{resid_post,mlp_out,attn_out,transcoder}/layer_{L}_width_{W}_l0_{size}/`` with ``config.json`` and
    ``params.safetensors``. config keys: ``width``, ``model_name``, ``architecture`` ("jump_relu"), ``l0``,
    ``affine_connection`` (bool), ``hf_hook_point_in``, ``hf_hook_point_out`` (Hugging Face module paths, mapped with
    :func:`saecircuits.saes.sites.hook_from_module_path`), ``type`` ("sae" | "transcoder"; "clt" and "crosscoder" are
    refused: one SAE cannot stand for a decoder that writes to several layers). Any other key is refused, since its
    meaning (and whether it changes the maths) is unknown.
    Tensors: ``w_enc [d, F]``, ``w_dec [F, d_out]``, ``b_enc [F]``, ``b_dec [d_out]``, ``threshold [F]`` and, with
    ``affine_connection``, ``affine_skip_connection [d, d_out]``.

Maths (both; the Gemma Scope tutorial's ``JumpReLUSAE``)
    ``pre = x @ W_enc + b_enc`` (**no b_dec subtraction**), ``f = relu(pre) * [pre > threshold]``,
    ``recon = f @ W_dec + b_dec (+ x @ affine_skip_connection)``. The skip matrix is applied **untransposed**
    (``x @ A``, the official tutorial); it is stored here as ``W_skip = A.T [d_out, d]`` (our ``x @ W_skip.T``). For
    ``threshold >= 0``, ``relu(pre) * [pre > threshold] == pre * [pre > threshold]`` (our JumpReLU); a negative
    threshold gates nothing that ReLU does not already zero, so it is loaded as 0 (exact; counted in
    ``source["thresholds_clamped"]``).

Sites
    Gemma Scope 1 ``res`` -> ``blocks.L.hook_resid_post``; ``mlp`` -> ``blocks.L.hook_mlp_out`` (the MLP output after
    Gemma 2's post-MLP norm, what is added to the residual); ``att`` -> ``blocks.L.attn.hook_z`` with heads flattened
    (``reshape_activations="hook_z"``, ``d = n_heads * d_head``); ``transcoders`` -> reads
    ``blocks.L.ln2.hook_normalized`` **with the norm's weight applied** (the pre-MLP RMSNorm's output, which is the
    MLP's input) and writes ``blocks.L.hook_mlp_out``; ``embedding`` -> ``hook_embed``. Gemma Scope 2: the module
    paths' map (``model.layers.L.output`` -> resid_post, ``….post_feedforward_layernorm.output`` -> mlp_out,
    ``….self_attn.o_proj.input`` -> hook_z, ``….pre_feedforward_layernorm.output`` -> ``ln2.hook_normalized`` with
    the weight applied).

Embedding SAEs
    TransformerLens' Gemma ``hook_embed`` holds the embedding already multiplied by ``sqrt(d_model)``; Gemma Scope's
    embedding SAEs read the unscaled embedding (SAELens' loader rescales them the same way). So ``W_enc`` is divided
    by ``sqrt(d)`` and ``W_dec``, ``b_dec`` multiplied by it: features are unchanged and the reconstruction is in
    ``hook_embed``'s units (``source["embedding_rescale"]`` records the factor).

Basis recorded
    Trained on unprocessed Hugging Face models: ``model_processing`` from
    :func:`saecircuits.saes.sites.raw_model_processing` (``center_writing_weights=False`` for residual values and
    writes, ``fold_ln=False`` for transcoders, whose input carries the norm's weight; nothing for ``hook_z``, since
    Gemma's attention has no value biases). ``basis = {"input": ..., "norm_weight_applied": bool}``.

Refused: unknown tensors or config keys, CLT/crosscoder files, an ``affine_connection`` that disagrees with the
tensors, matrices stored transposed, and square encoders (``d == F``), whose orientation cannot be checked.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook
from saecircuits.saes.formats.common import (
    build_from_tensors,
    check_floating,
    one_dtype,
    read_json,
    read_npz,
    read_safetensors,
)
from saecircuits.saes.sites import hook_from_module_path, layer_of_hook, raw_model_processing

__all__ = ["oriented", "refuse_square_encoder", "NPZ_FILE", "GS2_CONFIG", "GS2_WEIGHTS"]

NPZ_FILE = "params.npz"
GS2_CONFIG = "config.json"
GS2_WEIGHTS = "params.safetensors"

_REPO = re.compile(r"gemma-scope-(?P<size>\d+b)-(?P<variant>pt|it)-(?P<site>res|mlp|att|transcoders|embeddings?)"
                   r"(?:$|[-/])")
_SAE_DIR = re.compile(r"(?:^|/)(?:layer_(?P<layer>\d+)|(?P<embedding>embedding))/width_(?P<width>[0-9a-z]+)/"
                      r"(?P<l0>[^/]+)$")
_V1_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_GS2_KEYS = {"width", "model_name", "architecture", "l0", "affine_connection", "hf_hook_point_in",
             "hf_hook_point_out", "type"}


# ----------------------------------------------------------------------------------------- shared with families-b
def oriented(t: torch.Tensor, shape: tuple[int, ...], name: str, path: Path, layout: str) -> torch.Tensor:
    """``t`` when it has ``shape``; otherwise a clear error (saying so when it is stored transposed).

    Args:
        t: a tensor read from the file.
        shape: the shape this family writes it in.
        name: its name in the file.
        path: the file (named in errors).
        layout: how the family lays it out, e.g. ``"[d_in, d_sae]"``.

    Raises:
        SAEError: another shape (the message says when it is the transpose).
    """
    if tuple(t.shape) == tuple(shape):
        return t
    if t.dim() == 2 and tuple(t.shape) == tuple(shape)[::-1]:
        raise SAEError(f"{path}: {name} has shape {tuple(t.shape)}, the transpose of the {layout} = {tuple(shape)} "
                       "this family writes; the file was written in another orientation (converted by another tool?), "
                       "so it is not loaded: use the family's original file")
    raise SAEError(f"{path}: {name} has shape {tuple(t.shape)}, expected {layout} = {tuple(shape)}; the file is not "
                   "a consistent SAE of this family")


def refuse_square_encoder(d_in: int, d_sae: int, path: Path) -> None:
    """Refuse an encoder with ``d_in == d_sae``: both orientations fit its shape, so a transposed file would load
    silently wrong (no public SAE of these families is square).

    Raises:
        SAEError: ``d_in == d_sae``.
    """
    if d_in == d_sae:
        raise SAEError(f"{path}: the encoder is square (d_in == d_sae == {d_in}), so whether it is stored transposed "
                       "cannot be checked from its shape; saecircuits does not load it rather than risk a transposed "
                       "encoder (re-save it with save_sae from the family's own code, or use a non-square SAE)")


# ----------------------------------------------------------------------------------------- Gemma Scope 1
def _v1_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".npz":
        # params.npz, or a renamed file whose arrays are Gemma Scope's (another family may use .npz too)
        return path if path.name == NPZ_FILE or _has_gemma_scope_arrays(path) else None
    if path.is_dir() and (path / NPZ_FILE).is_file():
        return path / NPZ_FILE
    return None


def _has_gemma_scope_arrays(path: Path) -> bool:
    """Whether an ``.npz`` holds W_enc, W_dec, b_enc, b_dec and threshold (any case); reads only its index."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            names = {n.lower() for n in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return False
    return {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} <= names


def _parse_v1_path(folder: Path) -> dict[str, Any]:
    """What the path says: ``site`` (res/mlp/att/transcoders/embedding), ``layer``, ``width``, ``l0``, ``release``,
    ``model_name`` (each None where the path does not say)."""
    text = folder.absolute().as_posix()  # not resolve(): the HF cache links files into blobs/
    text = text.replace("models--google--", "google/")
    out: dict[str, Any] = {"site": None, "layer": None, "width": None, "l0": None, "release": None,
                           "model_name": None}
    repo = None
    for m in _REPO.finditer(text):
        repo = m
    if repo is not None:
        out["site"] = "embedding" if repo.group("site").startswith("embedding") else repo.group("site")
        out["release"] = repo.group(0).rstrip("-/")
        size, variant = repo.group("size"), repo.group("variant")
        out["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    d = _SAE_DIR.search(text)
    if d is not None:
        out["width"], out["l0"] = d.group("width"), d.group("l0")
        if d.group("embedding"):
            out["site"] = "embedding"
        else:
            out["layer"] = int(d.group("layer"))
    return out


def _v1_hooks(site: str | None, layer: int | None) -> tuple[str | None, str | None]:
    """(hook_point, hook_point_out) for a Gemma Scope 1 site (None when the path does not say enough)."""
    if site == "embedding":
        return "hook_embed", None
    if site is None or layer is None:
        return None, None
    return {
        "res": (f"blocks.{layer}.hook_resid_post", None),
        "mlp": (f"blocks.{layer}.hook_mlp_out", None),
        "att": (f"blocks.{layer}.attn.hook_z", None),
        "transcoders": (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"),
    }[site]


def _site_of_hook(hook: str) -> str:
    if hook == "hook_embed":
        return "embedding"
    if hook.endswith("ln2.hook_normalized"):
        return "transcoders"
    if hook.endswith("attn.hook_z"):
        return "att"
    if hook.endswith("hook_mlp_out"):
        return "mlp"
    return "res"


def _load_v1(path: Path, options: LoadOptions) -> SAE:
    file = _v1_file(path)
    if file is None:
        raise SAEError(f"{path}: no {NPZ_FILE} (Gemma Scope 1 SAEs are a params.npz file)")
    info = _parse_v1_path(file.parent)
    found_in, _ = _v1_hooks(info["site"], info["layer"])
    what = "its path (a gemma-scope-*-{res,mlp,att,transcoders} repository with layer_L/... folders)"
    hook = resolve_hook(found_in, options.hook, file, what=what)
    site = info["site"] if found_in else _site_of_hook(hook)
    layer = info["layer"] if found_in else layer_of_hook(hook)
    if info["layer"] is not None and layer != info["layer"]:
        raise SAEError(f"{file}: the path says layer {info['layer']} (layer_{info['layer']}/) but hook={hook!r} is "
                       "another layer's; pass the hook of that layer")
    _, hook_out = _v1_hooks(site, layer)
    try:
        raw = read_npz(file)
    except zipfile.BadZipFile as e:  # read_npz does not catch it: a truncated .npz is a broken zip
        raise SAEError(f"{file} cannot be read as an .npz of arrays ({e}); the file is truncated or corrupt") from None
    weights: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        name = "W" + k[1:] if k in ("w_enc", "w_dec") else k
        if name not in _V1_TENSORS:
            raise SAEError(f"{file}: array {k!r} is not one Gemma Scope writes ({list(_V1_TENSORS)}); this is not a "
                           "Gemma Scope 1 params.npz, or a variant whose maths saecircuits does not know")
        weights[name] = v
    missing = sorted(set(_V1_TENSORS) - set(weights))
    if missing:
        raise SAEError(f"{file}: arrays {missing} are missing (a Gemma Scope 1 params.npz has {list(_V1_TENSORS)})")
    source = {"family": "gemma_scope", "version": 1, "site": site, "release": info["release"],
              "layer": layer, "width": info["width"], "l0": info["l0"]}
    model_name = options.model_name or info["model_name"] or ""
    scale = None
    if site == "embedding":
        scale = math.sqrt(weights["W_enc"].shape[0])
        source["embedding_rescale"] = scale
    return _build(weights, file, options, hook=hook, hook_out=hook_out, model_name=model_name, source=source,
                  skip=None, embedding_scale=scale)


# ----------------------------------------------------------------------------------------- Gemma Scope 2
def _v2_folder(path: Path) -> Path | None:
    folder = path.parent if path.is_file() and path.name == GS2_WEIGHTS else path
    if folder.is_dir() and (folder / GS2_CONFIG).is_file() and (folder / GS2_WEIGHTS).is_file():
        return folder
    return None


def _load_v2(path: Path, options: LoadOptions) -> SAE:
    folder = _v2_folder(path)
    if folder is None:
        raise SAEError(f"{path}: a Gemma Scope 2 SAE is a folder with {GS2_CONFIG} + {GS2_WEIGHTS}")
    cfg_path = folder / GS2_CONFIG
    d = read_json(cfg_path)
    kind = d.get("type", "sae")
    if kind in ("clt", "crosscoder"):
        raise SAEError(f"{cfg_path}: type {kind!r}: a {kind} reads or writes several layers at once, which one SAE on "
                       "one hook cannot stand for; load a Gemma Scope 2 'sae' or 'transcoder' folder instead")
    if kind not in ("sae", "transcoder"):
        raise SAEError(f"{cfg_path}: type {kind!r} is not a Gemma Scope 2 type saecircuits knows ('sae', "
                       "'transcoder'; 'clt' and 'crosscoder' are refused)")
    unknown = sorted(set(d) - _GS2_KEYS)
    if unknown:
        raise SAEError(f"{cfg_path}: keys {unknown} are not Gemma Scope 2 config keys saecircuits knows "
                       f"({sorted(_GS2_KEYS)}); they may change the maths, so the SAE is not loaded")
    if d.get("architecture", "jump_relu") != "jump_relu":
        raise SAEError(f"{cfg_path}: architecture {d.get('architecture')!r}: Gemma Scope 2 SAEs are 'jump_relu'; "
                       "saecircuits does not know the maths of another")
    model_name = options.model_name or d.get("model_name") or ""
    try:
        hook_in = hook_from_module_path(str(d["hf_hook_point_in"]), model_name=model_name)
        hook_out = hook_from_module_path(str(d.get("hf_hook_point_out") or d["hf_hook_point_in"]),
                                         model_name=model_name)
    except KeyError:
        raise SAEError(f"{cfg_path}: 'hf_hook_point_in' is missing; it says where the SAE reads") from None
    except SAEError as e:
        raise SAEError(f"{cfg_path}: {e}") from None
    if kind == "sae" and hook_out != hook_in:
        raise SAEError(f"{cfg_path}: type 'sae' but it reads {d['hf_hook_point_in']!r} ({hook_in}) and writes "
                       f"{d.get('hf_hook_point_out')!r} ({hook_out}); an SAE reads and writes one site")
    if kind == "transcoder" and hook_out == hook_in:
        raise SAEError(f"{cfg_path}: type 'transcoder' but its input and output hooks are both {hook_in}")
    hook = resolve_hook(hook_in, options.hook, cfg_path, what="config.json's hf_hook_point_in")
    raw = read_safetensors(folder / GS2_WEIGHTS)
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "W_enc": "W_enc", "W_dec": "W_dec", "b_enc": "b_enc",
             "b_dec": "b_dec", "threshold": "threshold", "affine_skip_connection": "affine_skip_connection"}
    weights: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k not in names:
            raise SAEError(f"{folder / GS2_WEIGHTS}: tensor {k!r} is not one Gemma Scope 2 writes "
                           f"({sorted(set(names))}); saecircuits does not know its maths")
        weights[names[k]] = v
    missing = sorted(set(_V1_TENSORS) - set(weights))
    if missing:
        raise SAEError(f"{folder / GS2_WEIGHTS}: tensors {missing} are missing")
    width = d.get("width")  # the number of features (an integer; anything else is left unchecked, as it was):
    # a config of another width than the weights' was loaded silently
    if isinstance(width, int) and not isinstance(width, bool) and "b_enc" in weights \
            and weights["b_enc"].dim() == 1 and width != weights["b_enc"].shape[0]:
        raise SAEError(f"{cfg_path}: width is {width} but {GS2_WEIGHTS} holds {weights['b_enc'].shape[0]} features "
                       "(b_enc); the config and the weights belong to different SAEs")
    affine = d.get("affine_connection", False)
    if not isinstance(affine, bool):
        raise SAEError(f"{cfg_path}: affine_connection must be true or false, got {affine!r}")
    skip = weights.pop("affine_skip_connection", None)
    if affine != (skip is not None):
        raise SAEError(f"{cfg_path}: affine_connection is {affine} but {GS2_WEIGHTS} "
                       f"{'has no' if affine else 'has an'} affine_skip_connection tensor; the files disagree")
    layer = layer_of_hook(hook)
    site = {"sae": Path(str(d.get("hf_hook_point_in"))).name, "transcoder": "transcoder"}[kind]
    source = {"family": "gemma_scope", "version": 2, "site": site, "type": kind,
              "hf_hook_point_in": d.get("hf_hook_point_in"), "hf_hook_point_out": d.get("hf_hook_point_out"),
              "layer": layer, "width": d.get("width"), "l0": d.get("l0"), "affine_connection": affine}
    return _build(weights, folder / GS2_WEIGHTS, options, hook=hook,
                  hook_out=hook_out if hook_out != hook else None, model_name=model_name, source=source, skip=skip,
                  embedding_scale=None)


# ----------------------------------------------------------------------------------------- both
def _build(weights: dict[str, torch.Tensor], file: Path, options: LoadOptions, *, hook: str, hook_out: str | None,
           model_name: str, source: dict[str, Any], skip: torch.Tensor | None,
           embedding_scale: float | None) -> SAE:
    """A JumpReLU SAE from Gemma Scope tensors (``W_enc [d, F]``, ``W_dec [F, d_out]``, ``skip = A [d, d_out]``).

    Raises:
        SAEError: inconsistent or transposed shapes, a square encoder, mixed dtypes.
    """
    b_enc, b_dec = weights["b_enc"], weights["b_dec"]
    if b_enc.dim() != 1 or b_dec.dim() != 1 or weights["W_enc"].dim() != 2:
        raise SAEError(f"{file}: b_enc and b_dec must be vectors and W_enc a matrix")
    d_sae, d_out = b_enc.shape[0], b_dec.shape[0]
    w_enc = weights["W_enc"]
    if w_enc.shape[1] != d_sae and w_enc.shape[0] == d_sae:
        oriented(w_enc, (w_enc.shape[1], d_sae), "W_enc", file, "[d_in, d_sae]")
    d_in = w_enc.shape[0]
    refuse_square_encoder(d_in, d_sae, file)
    if hook_out is None and d_out != d_in:
        raise SAEError(f"{file}: b_dec has {d_out} entries but the SAE reads {d_in}-wide {hook}; an SAE (not a "
                       "transcoder) writes what it reads")
    oriented(w_enc, (d_in, d_sae), "W_enc", file, "[d_in, d_sae]")
    oriented(weights["W_dec"], (d_sae, d_out), "W_dec", file, "[d_sae, d_out]")
    oriented(weights["threshold"], (d_sae,), "threshold", file, "[d_sae]")
    check_floating({"threshold": weights["threshold"]}, file)
    dtype = one_dtype({k: t for k, t in weights.items() if k != "threshold"}, file)
    threshold = weights["threshold"].float()
    n_negative = int((threshold < 0).sum())
    if n_negative:  # relu(pre) * [pre > t] == relu(pre) == pre * [pre > 0] for t < 0: exact
        source["thresholds_clamped"] = n_negative
    tensors = {"W_enc": w_enc, "W_dec": weights["W_dec"], "b_enc": b_enc, "b_dec": b_dec,
               "threshold": threshold.clamp(min=0)}
    if embedding_scale is not None:
        s = float(embedding_scale)
        tensors["W_enc"] = (w_enc.double() / s).to(dtype)
        tensors["W_dec"] = (weights["W_dec"].double() * s).to(dtype)
        tensors["b_dec"] = (b_dec.double() * s).to(dtype)
    extra: dict[str, Any] = {}
    if skip is not None:
        tensors["W_skip"] = oriented(skip, (d_in, d_out), "affine_skip_connection", file, "[d_in, d_out]").T
        extra["skip_connection"] = True
    if hook.endswith("attn.hook_z"):
        extra["reshape_activations"] = "hook_z"
    norm_weight = hook.endswith("ln2.hook_normalized")
    extra["model_processing"] = raw_model_processing(hook, hook_out, value_biases=False,
                                                     norm_weight_applied=norm_weight)
    extra["basis"] = {"input": _basis_text(hook), "norm_weight_applied": norm_weight}
    extra["source"] = {**source, "path": str(file)}
    cfg = SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_point=hook, model_name=model_name,
                    dtype=dtype_name(dtype), apply_b_dec_to_input=False, extra=extra, d_out=d_out,
                    hook_point_out=hook_out)
    return build_from_tensors(cfg, tensors, file, options.device)


def _basis_text(hook: str) -> str:
    if hook.endswith("ln2.hook_normalized"):
        return "the pre-MLP RMSNorm's output with its weight applied (the MLP's input) of the unprocessed model"
    if hook == "hook_embed":
        return "the token embedding before Gemma's sqrt(d_model) scaling (rescaled here to TransformerLens' hook_embed)"
    if hook.endswith("attn.hook_z"):
        return "the attention heads' outputs z before W_O, heads flattened"
    return f"{hook.rsplit('.', 1)[-1]} of the unprocessed model"


# ----------------------------------------------------------------------------------------- registration
def _detect(path: Path) -> bool:
    return _v1_file(path) is not None or _v2_folder(path) is not None


def _load(path: Path, options: LoadOptions) -> SAE:
    if _v2_folder(path) is not None:
        return _load_v2(path, options)
    return _load_v1(path, options)


register_family(Family("gemma_scope", "Gemma Scope 1 and 2", _detect, _load,
                       "params.npz (Gemma Scope 1; a folder or the file), or a folder with config.json + "
                       "params.safetensors (Gemma Scope 2)", pairs=((GS2_CONFIG, GS2_WEIGHTS),)))
