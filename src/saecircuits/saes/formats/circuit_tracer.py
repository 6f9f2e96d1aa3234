"""circuit-tracer per-layer transcoders (``safety-research/circuit-tracer``, ``circuit_tracer/transcoder/
single_layer_transcoder.py`` and ``utils/hf_utils.py``): one layer file, or one layer of a transcoder set.

Files
    A layer file ``layer_{L}.safetensors`` (``SingleLayerTranscoder.to_safetensors``), alone or in a set folder with
    ``config.yaml`` (read with ``yaml.safe_load``): ``model_kind`` ("transcoder_set"; "cross_layer_transcoder" is
    refused: its decoders write to every later layer, which one transcoder on one hook cannot stand for),
    ``model_name``, ``feature_input_hook``, ``feature_output_hook``, ``transcoders`` (one path per layer, in layer
    order: ``hf://owner/repo/path`` or a local path; older sets list ``{id, layer, filepath}``; without the list the
    layers are ``layer_{L}.safetensors``), ``activation`` ("relu" | "topk" | "jumprelu"), ``k``, ``special_load_fn``
    ("gemma-scope" | "gemma-scope-2"). Provenance keys (``scan``, ``repo_id``, ``revision``, ``subfolder``, ...) are
    ignored; any other key is refused.
    Which layer: the path of a layer file, or a set folder with ``hook=`` naming that layer's input or output hook
    (``load_sae(folder, hook="blocks.3.hook_mlp_out")``). A listed ``hf://owner/repo/path`` is looked for in the set
    folder (as ``path`` or its file name), then through :mod:`saecircuits.saes.hub` when that module is present.

Tensors (a native layer file)
    ``W_enc [F, d]`` (**nn.Linear orientation**, the opposite of SAELens'), ``W_dec [F, d_out]``, ``b_enc [F]``,
    ``b_dec [d_out]``, optional ``W_skip [d_out, d]`` (applied as ``x @ W_skip.T``), optional
    ``activation_function.threshold [F]`` (JumpReLU), optional ``k`` (a scalar: TopK). A layer file that is a Gemma
    Scope file (``.npz``; ``params.safetensors`` beside a ``config.json``; or ``special_load_fn: gemma-scope-2``) is
    read by :mod:`.gemma_scope` (circuit-tracer computes the same maths on it: ``x * [x > t]`` equals Gemma Scope's
    ``relu(x) * [x > t]`` for ``t >= 0``).

Maths (``SingleLayerTranscoder``)
    ``pre = x @ W_enc.T + b_enc`` (no b_dec subtraction); activation: JumpReLU ``pre * [pre > threshold]`` **with no
    ReLU** (our JumpReLU for ``threshold >= 0``; a negative threshold would pass negative values, so such a file is
    refused), TopK ``pre * gate`` **with no ReLU** (``topk_relu=False``), else ReLU;
    ``recon = f @ W_dec + b_dec (+ x @ W_skip.T)``.

Sites
    ``feature_input_hook``/``feature_output_hook`` are TransformerLens names relative to the block (with or without
    ``blocks.{layer}.``), or Hugging Face module paths with ``{layer}`` (mapped with
    :func:`~saecircuits.saes.sites.hook_from_module_path`). circuit-tracer's ``mlp.hook_in`` (the MLP's input: ln2's
    output with its weight, and a LayerNorm's bias, applied) -> ``blocks.L.ln2.hook_normalized`` with
    ``basis.norm_weight_applied = True``; ``mlp.hook_out`` -> ``blocks.L.hook_mlp_out``; ``ln2.hook_normalized``,
    ``hook_resid_mid``, ... -> ``blocks.L.<name>`` as they are. Without a config (a bare layer file) ``hook=`` names
    the input and the output is ``blocks.L.hook_mlp_out`` (circuit-tracer's transcoders replace MLPs).

Basis recorded
    circuit-tracer runs TransformerLens with ``fold_ln=False, center_writing_weights=False, center_unembed=False``:
    ``model_processing`` from :func:`~saecircuits.saes.sites.raw_model_processing` (``center_writing_weights=False``
    for residual values and writes; ``fold_ln=False`` when the input carries the norm's weight).

Refused: cross-layer transcoders, unknown config keys or tensors, an activation the file cannot have (``jumprelu``
without a threshold, a threshold with ``relu``/``topk``), disagreeing ``k``, transposed or square encoders, negative
thresholds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name
from saecircuits.saes.formats import Family, LoadOptions, register_family
from saecircuits.saes.formats.common import build_from_tensors, one_dtype, read_safetensors
from saecircuits.saes.formats.gemma_scope import oriented, refuse_square_encoder
from saecircuits.saes.sites import hook_from_module_path, layer_of_hook, raw_model_processing

SET_CONFIG = "config.yaml"
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_SET_KEYS = {"model_kind", "model_name", "feature_input_hook", "feature_output_hook", "transcoders", "activation",
             "k", "special_load_fn"}
_PROVENANCE_KEYS = {"scan", "scan_name", "repo_id", "revision", "subfolder", "description", "name"}
_TENSORS = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold", "k"}


# ----------------------------------------------------------------------------------------- config
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        d = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SAEError(f"{path} is not valid YAML ({e}); the file is corrupt") from None
    if not isinstance(d, dict):
        raise SAEError(f"{path} must hold a YAML mapping (circuit-tracer's transcoder-set config)")
    return d


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    kind = cfg.get("model_kind", "transcoder_set")
    if kind == "cross_layer_transcoder":
        raise SAEError(f"{path}: model_kind 'cross_layer_transcoder': a CLT's features write to every later layer, "
                       "which one transcoder on one hook cannot stand for; saecircuits loads per-layer transcoder "
                       "sets only")
    if kind != "transcoder_set":
        raise SAEError(f"{path}: model_kind {kind!r} is not one saecircuits knows ('transcoder_set')")
    unknown = sorted(set(cfg) - _SET_KEYS - _PROVENANCE_KEYS)
    if unknown:
        raise SAEError(f"{path}: keys {unknown} are not circuit-tracer config keys saecircuits knows; they may change "
                       "the maths, so the transcoder is not loaded")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(cfg.get(key), str):
            raise SAEError(f"{path}: {key} is missing (it says where the transcoders read and write)")


def _map_hook(name: str, layer: int, model_name: str | None, path: Path) -> tuple[str, bool]:
    """(TransformerLens hook, norm weight applied) for a circuit-tracer hook name at ``layer``.

    Raises:
        SAEError: a Hugging Face module path the site map does not know.
    """
    n = name.replace("{{layer}}", str(layer)).replace("{layer}", str(layer)).strip()
    if n.startswith("blocks."):
        rel = n.split(".", 2)[2] if n.count(".") >= 2 else n
        hook = n
    elif n.startswith(("layers.", "model.", "transformer.", "gpt_neox.", "h.")):
        try:
            hook = hook_from_module_path(n, model_name=model_name)
        except SAEError as e:
            raise SAEError(f"{path}: {e}") from None
        return hook, hook.endswith("ln2.hook_normalized")  # a norm module's output has its weight applied
    else:
        rel, hook = n, f"blocks.{layer}.{n}"
    if rel == "mlp.hook_in":  # ReplacementMLP's input: ln2's output after its weight
        return f"blocks.{layer}.ln2.hook_normalized", True
    if rel == "mlp.hook_out":
        return f"blocks.{layer}.hook_mlp_out", False
    return hook, False


def _layer_entries(cfg: dict[str, Any]) -> dict[int, str] | None:
    items = cfg.get("transcoders")
    if items is None:
        return None
    out: dict[int, str] = {}
    for i, item in enumerate(items):
        if isinstance(item, dict):
            out[int(item["layer"])] = str(item["filepath"])
        else:
            out[i] = str(item)
    return out


def _locate(entry: str, folder: Path, *, use_hub: bool = True) -> Path | None:
    """A listed transcoder path as a local file (see the module docstring), or None. ``use_hub=False`` looks in the
    set folder only (never the network)."""
    if entry.startswith("hf://"):
        rest = entry[len("hf://"):].split("?", 1)[0]
        parts = rest.split("/", 2)
        inner = parts[2] if len(parts) == 3 else ""
        for cand in (folder / inner, folder / Path(inner).name):
            if inner and cand.is_file():
                return cand
        if not use_hub:
            return None
        try:
            from saecircuits.saes import hub  # the hub module (hf:// names), where this checkout has it
        except ImportError:
            return None
        try:
            p = Path(hub.resolve(entry))
        except Exception:  # noqa: BLE001 - offline / not cached: reported by the caller
            return None
        return p if p.exists() else None
    p = Path(entry)
    p = p if p.is_absolute() else folder / p
    return p if p.exists() else None


# ----------------------------------------------------------------------------------------- detect / load
def _set_folder(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    return folder if (folder / SET_CONFIG).is_file() else None


def _detect(path: Path) -> bool:
    if path.is_dir():
        return (path / SET_CONFIG).is_file()
    return path.is_file() and path.suffix == ".safetensors" and (
        bool(_LAYER_FILE.match(path.name)) or (path.parent / SET_CONFIG).is_file())


def _load(path: Path, options: LoadOptions) -> SAE:
    folder = _set_folder(path)
    cfg: dict[str, Any] = {}
    if folder is not None:
        cfg = _read_yaml(folder / SET_CONFIG)
        _check_config(cfg, folder / SET_CONFIG)
    model_name = options.model_name or cfg.get("model_name") or ""
    entries = _layer_entries(cfg) if cfg else None
    if path.is_file():
        file = path
        m = _LAYER_FILE.match(path.name)
        layer = int(m.group(1)) if m else None
        if entries:
            listed = [i for i, e in entries.items()
                      if (_locate(e, folder, use_hub=False) or Path("/nonexistent")).resolve() == path.resolve()]
            layer = listed[0] if listed else layer
    else:
        layer = layer_of_hook(options.hook) if options.hook else None
        if layer is None:
            raise SAEError(f"{path}: a transcoder set holds one transcoder per layer; pass hook= (e.g. "
                           "hook='blocks.3.hook_mlp_out') to pick a layer, or the layer's file")
        if entries is not None:
            if layer not in entries:
                raise SAEError(f"{path}: {SET_CONFIG} lists no transcoder for layer {layer} (it has layers "
                               f"{sorted(entries)})")
            file = _locate(entries[layer], folder)
            if file is None:
                raise SAEError(f"{path}: the layer-{layer} transcoder {entries[layer]!r} is not in the folder (nor in "
                               "the Hugging Face cache); download it next to config.yaml")
        else:
            file = folder / f"layer_{layer}.safetensors"
            if not file.is_file():
                raise SAEError(f"{path}: {file.name} (the layer-{layer} transcoder) is missing")
    if layer is None:
        layer = layer_of_hook(options.hook) if options.hook else None
    if layer is None:
        raise SAEError(f"{path}: the layer is unknown (the file is not named layer_L.safetensors and no config lists "
                       "it); pass hook= with the TransformerLens hook the transcoder reads")
    if cfg:
        hook_in, weighted = _map_hook(cfg["feature_input_hook"], layer, model_name, folder / SET_CONFIG)
        hook_out, _ = _map_hook(cfg["feature_output_hook"], layer, model_name, folder / SET_CONFIG)
        if options.hook and options.hook not in (hook_in, hook_out):
            raise SAEError(f"{path}: {SET_CONFIG} says the layer-{layer} transcoder reads {hook_in} and writes "
                           f"{hook_out}, but hook={options.hook!r} was given")
    else:
        if not options.hook:
            raise SAEError(f"{path}: a circuit-tracer layer file without {SET_CONFIG} does not say which hook it "
                           "reads; pass hook= (e.g. blocks.3.hook_resid_mid or blocks.3.ln2.hook_normalized)")
        hook_in, weighted = options.hook, False
        hook_out = f"blocks.{layer}.hook_mlp_out"
    special = cfg.get("special_load_fn")
    if special not in (None, "gemma-scope", "gemma-scope-2"):
        raise SAEError(f"{folder / SET_CONFIG}: special_load_fn {special!r} is not one saecircuits knows")
    gemma_scope_2 = file.name == "params.safetensors" and (file.parent / "config.json").is_file()
    if file.suffix == ".npz" or special == "gemma-scope-2" or gemma_scope_2:
        return _gemma_scope_layer(file, options, hook_in, layer, cfg)
    return _native(file, options, cfg, layer=layer, hook_in=hook_in, hook_out=hook_out, weighted=weighted,
                   model_name=model_name)


def _gemma_scope_layer(file: Path, options: LoadOptions, hook_in: str, layer: int, cfg: dict[str, Any]) -> SAE:
    """A Gemma Scope file listed in a set: Gemma Scope's own loader (its hooks and basis are the truth for its
    weights; a config naming ``ln2.hook_normalized`` reads TransformerLens' pre-weight value, which these
    transcoders were not trained on)."""
    from saecircuits.saes.formats import gemma_scope

    target = file.parent if file.name == gemma_scope.GS2_WEIGHTS else file
    try:
        sae = gemma_scope._load(target, LoadOptions(hook=None, device=options.device, model_name=options.model_name))
    except SAEError:
        sae = gemma_scope._load(target, LoadOptions(hook=hook_in, device=options.device,
                                                    model_name=options.model_name))
    if layer_of_hook(sae.hook_point) != layer:
        raise SAEError(f"{file}: the Gemma Scope file is for {sae.hook_point}, but the set lists it for layer {layer}")
    sae.cfg.extra["source"] = {**sae.cfg.extra["source"], "circuit_tracer_set": True,
                               "feature_input_hook": cfg.get("feature_input_hook")}
    return sae


def _native(file: Path, options: LoadOptions, cfg: dict[str, Any], *, layer: int, hook_in: str, hook_out: str,
            weighted: bool, model_name: str) -> SAE:
    """A native ``SingleLayerTranscoder`` file (see the module docstring).

    Raises:
        SAEError: unknown tensors, inconsistent activation settings, transposed or square encoders.
    """
    if file.suffix != ".safetensors":
        raise SAEError(f"{file}: a circuit-tracer layer file is .safetensors")
    raw = read_safetensors(file)
    if "threshold" in raw and "activation_function.threshold" not in raw:
        raw["activation_function.threshold"] = raw.pop("threshold")
    unknown = sorted(set(raw) - _TENSORS)
    missing = sorted({"W_enc", "W_dec", "b_enc", "b_dec"} - set(raw))
    if unknown or missing:
        raise SAEError(f"{file}: tensors do not match a circuit-tracer transcoder (missing {missing}, unexpected "
                       f"{unknown})")
    b_enc, b_dec, w_enc = raw["b_enc"], raw["b_dec"], raw["W_enc"]
    if b_enc.dim() != 1 or b_dec.dim() != 1 or w_enc.dim() != 2:
        raise SAEError(f"{file}: b_enc and b_dec must be vectors and W_enc a matrix")
    f, d_out = b_enc.shape[0], b_dec.shape[0]
    if w_enc.shape[0] != f and w_enc.shape[1] == f:
        oriented(w_enc, (f, w_enc.shape[0]), "W_enc", file, "[d_transcoder, d_model] (nn.Linear)")
    d = w_enc.shape[1]
    refuse_square_encoder(d, f, file)
    oriented(w_enc, (f, d), "W_enc", file, "[d_transcoder, d_model] (nn.Linear)")
    oriented(raw["W_dec"], (f, d_out), "W_dec", file, "[d_transcoder, d_out]")
    threshold = raw.get("activation_function.threshold")
    k_file = raw.get("k")
    activation = cfg.get("activation")
    k_cfg = cfg.get("k")
    extra: dict[str, Any] = {}
    if k_file is not None:
        if k_file.numel() != 1 or k_file.is_floating_point():
            raise SAEError(f"{file}: k must be one integer")
        k_file = int(k_file.item())
    if activation == "topk" or (activation is None and k_file is not None):
        if threshold is not None:
            raise SAEError(f"{file}: the file has a JumpReLU threshold but the activation is TopK; which one "
                           "circuit-tracer applies depends on how it is called, so saecircuits does not guess")
        k = k_cfg if k_cfg is not None else k_file
        if k_file is not None and k_cfg is not None and int(k_cfg) != k_file:
            raise SAEError(f"{file}: k is {k_file} in the file but {k_cfg} in {SET_CONFIG}")
        if not isinstance(k, int) or isinstance(k, bool):
            raise SAEError(f"{file}: a TopK transcoder needs an integer k (config.yaml 'k' or the file's 'k'), got "
                           f"{k!r}")
        architecture = "topk"
        extra.update(k=k, topk_relu=False)
    elif activation in (None, "jumprelu") and threshold is not None:
        oriented(threshold, (f,), "activation_function.threshold", file, "[d_transcoder]")
        if bool((threshold < 0).any()):
            raise SAEError(f"{file}: a negative JumpReLU threshold: circuit-tracer's JumpReLU has no ReLU "
                           "(x * [x > t]), so it would pass negative pre-activations, which saecircuits' JumpReLU "
                           "does not reproduce")
        architecture = "jumprelu"
    elif activation in (None, "relu") and threshold is None and k_file is None:
        architecture = "standard"
    else:
        has_t, has_k = threshold is not None, k_file is not None
        raise SAEError(f"{file}: activation {activation!r} does not fit the file (threshold "
                       f"{'present' if has_t else 'absent'}, k {'present' if has_k else 'absent'})")
    dtype = one_dtype({n: raw[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip") if n in raw}, file)
    tensors = {"W_enc": w_enc.T, "W_dec": raw["W_dec"], "b_enc": b_enc, "b_dec": b_dec}
    if threshold is not None and architecture == "jumprelu":
        tensors["threshold"] = threshold.float()
    if "W_skip" in raw:
        tensors["W_skip"] = oriented(raw["W_skip"], (d_out, d), "W_skip", file, "[d_out, d_model]")
        extra["skip_connection"] = True
    if hook_in.endswith("attn.hook_z"):
        extra["reshape_activations"] = "hook_z"
    extra["model_processing"] = raw_model_processing(hook_in, hook_out if hook_out != hook_in else None,
                                                     norm_weight_applied=weighted)
    extra["basis"] = {"input": ("the MLP's input (ln2's output with its weight applied, and a LayerNorm's bias)"
                                if weighted else f"{hook_in.rsplit('.', 1)[-1]} of TransformerLens without fold_ln "
                                "or centring"), "norm_weight_applied": weighted}
    extra["source"] = {"family": "circuit_tracer", "path": str(file), "site": cfg.get("feature_input_hook") or hook_in,
                       "site_out": cfg.get("feature_output_hook") or hook_out, "layer": layer}
    sae_cfg = SAEConfig(architecture=architecture, d_in=d, d_sae=f, hook_point=hook_in, model_name=model_name,
                        dtype=dtype_name(dtype), apply_b_dec_to_input=False, extra=extra, d_out=d_out,
                        hook_point_out=hook_out if hook_out != hook_in else None)
    return build_from_tensors(sae_cfg, tensors, file, options.device)


register_family(Family("circuit_tracer", "circuit-tracer transcoders", _detect, _load,
                       "layer_{L}.safetensors, or a transcoder-set folder with config.yaml (pick the layer with "
                       "hook=)"))
