"""EleutherAI sparsify SAEs and transcoders (``sparsify/sparse_coder.py``; its predecessor, the ``sae`` package).

* **Files.** One folder per hookpoint, named by the Hugging Face module path the coder was trained on (``layers.3``,
  ``layers.3.mlp``, ``h.5``, ``embed_tokens``, ...), holding ``cfg.json`` and ``sae.safetensors`` (``save_to_disk``).
  A hub repository or a training run folder holds several; pointing at the parent is refused with the list of
  hookpoints (pass one). A run folder's ``config.json`` (its ``model``) beside them is read for the model name.
* **cfg.json.** ``activation`` ("topk"; "groupmax" refused), ``expansion_factor``, ``normalize_decoder`` and
  ``multi_topk`` (training only), ``num_latents`` (0 or missing: ``d_in * expansion_factor``), ``k``,
  ``skip_connection``, ``transcode``, ``d_in``; the ``sae`` package's ``signed`` (false only). Missing keys take
  sparsify's defaults (``SparseCoderConfig``); any other key is refused.
* **Tensors** (nn.Linear orientation; usually bfloat16, kept): ``encoder.weight [F, d]``, ``encoder.bias [F]``,
  ``W_dec [F, d]``, ``b_dec [d]``, ``W_skip [d, d]`` with ``skip_connection``. Loaded as ``W_enc =
  encoder.weight.T``.
* **Maths** (``SparseCoder.encode``/``decode``/``forward``, ``fused_encoder``)::

      pre  = ReLU((x - b_dec) @ encoder.weight.T + encoder.bias)     # no b_dec subtraction when transcode
      acts = the k largest of pre per token (others 0)
      out  = acts @ W_dec + b_dec (+ x @ W_skip.T)

  ReLU before the top-k equals our TopK's top-k then ReLU (the same k values are kept or are zero either way).
  No input normalisation (by design, sparsify#34).
* **Site.** An SAE on ``H`` reads and writes ``H``'s output (:func:`saecircuits.saes.sites.hook_from_module_path`:
  ``layers.N`` -> ``blocks.N.hook_resid_post``, ``layers.N.mlp`` -> ``blocks.N.hook_mlp_out``, ...). A transcoder
  (``transcode: true``) reads ``H``'s input and predicts its output: ``layers.N.mlp`` reads the MLP's input
  (``blocks.N.ln2.hook_normalized``, with the norm's weight applied, as the Hugging Face MLP receives it) and
  writes ``blocks.N.hook_mlp_out``; ``layers.N`` reads ``blocks.N.hook_resid_pre``.
* **Basis.** Trained on raw Hugging Face models: ``cfg.extra["model_processing"]`` records
  ``center_writing_weights=False`` (the residual stream was not centred). For residual-stream sites that is the only
  switch that changes the values. ``fold_ln`` is not recorded: a residual value does not depend on it, and for the
  MLP-input transcoders the norm's weight is what matters, which ``cfg.extra["basis"]["norm_weight_applied"] =
  True`` says (the run folds or applies it; for LayerNorm models such as GPT-2 and Pythia the norm's bias is
  applied too, as the Hugging Face MLP receives it). ``fold_value_biases`` changes no site sparsify reads.
* **Refused.** ``activation: "groupmax"`` (max within each of k groups: another architecture), ``signed: true``
  (top-k by absolute value, keeping the sign), an encoder-only file (no ``W_dec``), unknown keys, tensors whose
  shapes do not fit ``d_in``/``num_latents``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook
from saecircuits.saes.formats.common import build_from_tensors, check_floating, read_json, read_safetensors
from saecircuits.saes.sites import hook_from_module_path

__all__ = ["CFG_FILE", "WEIGHTS_FILE", "hookpoint_folders"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
#: sparsify's SparseCoderConfig defaults (a key missing from an older cfg.json takes them, as from_dict does).
_DEFAULTS = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": 0, "k": 32,
             "multi_topk": False, "skip_connection": False, "transcode": False}
_KNOWN = frozenset(_DEFAULTS) | {"d_in", "signed"}


def _is_coder(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def hookpoint_folders(path: Path) -> list[Path]:
    """The sparsify hookpoint folders directly inside ``path`` (a hub repository or a training run), sorted."""
    if not path.is_dir():
        return []
    return sorted((p for p in path.iterdir() if _is_coder(p)), key=lambda p: p.name)


def _detect(path: Path) -> bool:
    return _is_coder(path) or (path.is_dir() and not (path / CFG_FILE).exists() and bool(hookpoint_folders(path)))


def _flag(d: dict[str, Any], key: str, path: Path) -> bool:
    v = d.get(key, _DEFAULTS.get(key, False))
    if not isinstance(v, bool):
        raise SAEError(f"{path}: '{key}' must be true or false, got {v!r}")
    return v


def _positive_int(v: Any, key: str, path: Path, *, zero_ok: bool = False) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not zero_ok):
        raise SAEError(f"{path}: '{key}' must be a positive integer, got {v!r}")
    return v


def _model_name(path: Path, given: str | None) -> str | None:
    """The model of a training run (``config.json``'s ``model`` beside the hookpoint folders), else ``given``."""
    if given:
        return given
    run = path.parent / "config.json"
    if run.is_file():
        try:
            model = read_json(run).get("model")
        except SAEError:
            return None
        return model if isinstance(model, str) else None
    return None


def _sites(hookpoint: str, transcode: bool, model_name: str | None, path: Path) -> tuple[str, str | None, bool]:
    """``(hook_in, hook_out or None, norm_weight_applied)`` of a coder trained on ``hookpoint``."""
    out = hook_from_module_path(hookpoint, model_name=model_name)
    if not transcode:
        return out, None, False
    if out.endswith(".hook_mlp_out"):
        return hook_from_module_path(f"{hookpoint}.input", model_name=model_name), out, True
    if out.endswith(".hook_resid_post"):
        return hook_from_module_path(f"{hookpoint}.input", model_name=model_name), out, False
    raise SAEError(f"{path}: a transcoder on {hookpoint!r} ({out}) is not supported: saecircuits maps transcoders "
                   "on a decoder layer or its MLP ('layers.N', 'layers.N.mlp')")


def _load(path: Path, options: LoadOptions) -> SAE:
    if not _is_coder(path):
        names = [p.name for p in hookpoint_folders(path)]
        shown = ", ".join(names[:12]) + (f" (and {len(names) - 12} more)" if len(names) > 12 else "")
        raise SAEError(f"{path} holds {len(names)} sparsify coders, one per hookpoint: {shown}; pass one of them "
                       f"(e.g. {path / names[0]})")
    cfg_path = path / CFG_FILE
    d = read_json(cfg_path)
    unknown = sorted(set(d) - _KNOWN)
    if unknown:
        raise SAEError(f"{cfg_path}: keys {unknown} are not sparsify SparseCoderConfig keys saecircuits knows; they "
                       "may change the maths, so the coder is not loaded")
    activation = d.get("activation", "topk")
    if activation != "topk":
        raise SAEError(f"{cfg_path}: activation={activation!r} is not supported (only 'topk': sparsify's groupmax "
                       "takes the max of each of k groups of latents, another architecture); not loaded")
    if _flag(d, "signed", cfg_path):
        raise SAEError(f"{cfg_path}: signed=true (top k by absolute value, negative activations kept) is not "
                       "supported; not loaded")
    transcode, skip = _flag(d, "transcode", cfg_path), _flag(d, "skip_connection", cfg_path)
    for key in ("normalize_decoder", "multi_topk"):
        _flag(d, key, cfg_path)  # training settings, checked for type only
    if "d_in" not in d:
        raise SAEError(f"{cfg_path} lacks 'd_in'; it is not a sparsify cfg.json")
    d_in = _positive_int(d["d_in"], "d_in", cfg_path)
    num_latents = _positive_int(d.get("num_latents") or 0, "num_latents", cfg_path, zero_ok=True)
    if num_latents == 0:
        num_latents = d_in * _positive_int(d.get("expansion_factor", 32), "expansion_factor", cfg_path)
    k = _positive_int(d.get("k", 32), "k", cfg_path)
    if k > num_latents:
        raise SAEError(f"{cfg_path}: k={k} exceeds the {num_latents} latents")

    hookpoint = path.name
    model_name = _model_name(path, options.model_name)
    try:
        hook_in, hook_out, weighted = _sites(hookpoint, transcode, model_name, path)
    except SAEError as e:
        if transcode or not options.hook:
            raise SAEError(f"{path}: the folder name {hookpoint!r} is the hookpoint sparsify trained on, but "
                           f"{e}") from None
        hook_in, hook_out, weighted = options.hook, None, False  # a renamed SAE folder: the caller says the hook
    hook_in = resolve_hook(hook_in, options.hook, path, what="the folder name (the sparsify hookpoint)")

    w_path = path / WEIGHTS_FILE
    raw = read_safetensors(w_path)
    expected = {"encoder.weight": (num_latents, d_in), "encoder.bias": (num_latents,), "W_dec": (num_latents, d_in),
                "b_dec": (d_in,)}
    if skip:
        expected["W_skip"] = (d_in, d_in)
    missing, extra_names = sorted(set(expected) - set(raw)), sorted(set(raw) - set(expected))
    if missing or extra_names:
        hint = " (an encoder-only file cannot reconstruct)" if "W_dec" in missing else ""
        raise SAEError(f"{w_path}: tensors do not match the cfg.json (missing {missing}, unexpected {extra_names})"
                       f"{hint}; the weights do not belong to this cfg.json")
    for name, shape in expected.items():
        if tuple(raw[name].shape) != shape:
            raise SAEError(f"{w_path}: {name} has shape {tuple(raw[name].shape)}, expected {shape} (d_in={d_in}, "
                           f"num_latents={num_latents}; sparsify stores encoder.weight as [num_latents, d_in])")
    check_floating(raw, w_path)  # before the cast below, which would make an integer tensor weights
    dtype = raw[sorted(raw)[0]].dtype  # sparsify builds the coder in the dtype of the file's first tensor
    weights = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"],
               "b_dec": raw["b_dec"]}
    if skip:
        weights["W_skip"] = raw["W_skip"]
    weights = {name: t.to(dtype) for name, t in weights.items()}

    extra: dict[str, Any] = {"k": k, "model_processing": {"center_writing_weights": False}}
    if skip:
        extra["skip_connection"] = True
    extra["basis"] = {"input": ("the MLP's input (the pre-MLP norm's output, its weight applied)" if weighted else
                                f"the raw Hugging Face model's output of {hookpoint}" if not transcode else
                                f"the raw Hugging Face model's input of {hookpoint}"),
                      "norm_weight_applied": weighted}
    extra["source"] = {"family": "sparsify", "path": str(path), "site": hookpoint,
                       "config": {k_: v for k_, v in d.items()}}
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=num_latents, hook_point=hook_in,
                    model_name=model_name or "", dtype=dtype_name(dtype), apply_b_dec_to_input=not transcode,
                    extra=extra, hook_point_out=hook_out)
    return build_from_tensors(cfg, weights, w_path, options.device)


register_family(Family("sparsify", "EleutherAI sparsify", _detect, _load,
                       "a hookpoint folder (e.g. layers.3) with cfg.json + sae.safetensors",
                       pairs=((CFG_FILE, WEIGHTS_FILE),)))
