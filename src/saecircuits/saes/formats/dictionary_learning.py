"""saprmarks/dictionary_learning dictionaries (``dictionary_learning/dictionary.py``, ``trainers/*.py``,
``training.py``, ``utils.load_dictionary``).

* **Files.** ``save_dir/trainer_i/ae.pt`` + ``config.json``; intermediate ``checkpoints/ae_{step}.pt`` (same state
  dict). Pass the ``trainer_i`` folder or the ``.pt`` file. ``ae.pt`` is read with ``torch.load(weights_only=True)``.
  While training, ``ae.pt`` is a resume dict ``{step, ae, optimizer, config, norm_factor}``: its ``ae`` is loaded,
  with ``scale_biases(norm_factor)`` applied as the end of training would (every bias and threshold times
  ``norm_factor``), so the SAE takes raw activations like a final one; recorded in ``cfg.extra["source"]``.
* **config.json.** ``{"trainer": {trainer_class, dict_class, activation_dim, dict_size, k, layer, lm_name,
  submodule_name, ...}, "buffer": {d_submodule, io, ...}}``. The class comes from ``dict_class`` (else
  ``trainer_class``), checked against the tensor names; without a config it comes from the tensor names, except
  where two classes share them (AutoEncoderTopK / BatchTopKSAE), which is refused.
* **Classes, tensors and maths** (nn.Linear orientation ``encoder.weight [F, d]``, ``decoder.weight [d, F]``;
  ``W_enc [d, F]``, ``W_dec [F, d]`` as named):

  ========================  ===================================================  =================================
  class                     tensors                                              encode (inference)
  ========================  ===================================================  =================================
  AutoEncoder               ``bias, encoder.weight/.bias, decoder.weight``        ``relu(enc(x - bias))``
  AutoEncoderNew            ``encoder.weight/.bias, decoder.weight/.bias``        ``relu(enc(x))`` (no subtraction)
  AutoEncoderTopK           ``encoder.*, decoder.weight, b_dec, k, threshold``    top k of ``relu(enc(x - b_dec))``
  BatchTopKSAE              as TopK (``threshold`` a scalar)                      ``r * (r > threshold)``,
                                                                                  ``r = relu(enc(x - b_dec))``
  MatryoshkaBatchTopKSAE    ``W_enc, b_enc, W_dec, b_dec, k, threshold,           as BatchTopK
                            group_sizes``
  JumpReluAutoEncoder       ``W_enc, b_enc, W_dec, b_dec, threshold [F]``         ``relu(pre * (pre > threshold))``,
                                                                                  no ``b_dec`` subtraction
  GatedAutoEncoder          ``decoder_bias, encoder.weight, r_mag, gate_bias,     gated (SAELens names)
                            mag_bias, decoder.weight``
  ========================  ===================================================  =================================

  Decoding is ``f @ W_dec + b_dec`` for all. BatchTopK at inference is a per-token JumpReLU with one scalar
  threshold (our ``batchtopk`` SAE with the threshold broadcast to ``[F]``); a threshold of -1 (never estimated:
  their ``encode`` would then keep every positive latent, not the trained BatchTopK) is refused, as is any
  negative one. A JumpReLU threshold below 0 acts as 0 (``relu(pre * [pre > t]) == pre * [pre > max(t, 0)]``).
* **Decoder normalisation.** ``AutoEncoder.from_pretrained`` (what ``load_dictionary`` calls) normalises the decoder
  by default: ``decoder.weight[:, i] /= n_i``, ``encoder.weight[i] *= n_i``, ``encoder.bias[i] *= n_i`` with
  ``n_i = ||decoder.weight[:, i]||``. We do the same for AutoEncoder (in float64), so features equal what
  dictionary_learning's loader gives: each is the raw file's feature times a positive ``n_i``, and the
  reconstruction is unchanged. Recorded as ``cfg.extra["source"]["normalized_decoder"]``. The other classes'
  loaders do not rescale and neither do we.
* **Site.** ``submodule_name`` (``resid_post_layer_3``, ``mlp_out_layer3``, ``attn_out_layer3``, ``embed``, or a
  Hugging Face module path such as ``model.layers.3`` / ``gpt_neox.layers.3.mlp``) with ``buffer.io`` ("out": the
  module's output; "in": its input); without ``submodule_name``, a folder above ``ae.pt`` named like the first
  four (saprmarks' released ``dictionaries/pythia-70m-deduped/resid_out_layer3/10_32768/ae.pt``); else ``hook=``.
  ``io: "in_and_out"`` (crosscoders, transcoders) is refused.
* **Basis.** Trained through nnsight on raw Hugging Face models: ``cfg.extra["model_processing"] =
  {"center_writing_weights": False}`` (the residual stream was not centred; the only switch a residual-stream
  value depends on); ``cfg.extra["basis"]["norm_weight_applied"]`` is True only for a dictionary on an MLP's input
  (``io: "in"`` of ``….mlp``: the pre-MLP norm's output with its weight applied), else False.
* **Refused.** A class the files do not determine, tensors that do not fit the class or the config's sizes, ``d ==
  F`` without a config (a transposed matrix would fit), a negative BatchTopK threshold, ``io: "in_and_out"``,
  anything ``torch.load(weights_only=True)`` refuses (pickled code).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook
from saecircuits.saes.formats.common import build_from_tensors, check_floating, read_json, read_torch
from saecircuits.saes.formats.gemma_scope import oriented
from saecircuits.saes.sites import hook_from_module_path

__all__ = ["CLASSES", "site_hook"]

#: dictionary_learning class -> (its tensors, optional ones).
CLASSES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "AutoEncoder": (frozenset({"bias", "encoder.weight", "encoder.bias", "decoder.weight"}), frozenset()),
    "AutoEncoderNew": (frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}), frozenset()),
    "AutoEncoderTopK": (frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "b_dec"}),
                        frozenset({"k", "threshold"})),
    "BatchTopKSAE": (frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "threshold"}),
                     frozenset({"k"})),
    "MatryoshkaBatchTopKSAE": (frozenset({"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "group_sizes"}),
                               frozenset({"k"})),
    "JumpReluAutoEncoder": (frozenset({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}), frozenset()),
    "GatedAutoEncoder": (frozenset({"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias",
                                    "decoder.weight"}), frozenset()),
}
_TRAINERS = {"StandardTrainer": "AutoEncoder", "StandardTrainerAprilUpdate": "AutoEncoder",
             "PAnnealTrainer": "AutoEncoder", "TopKTrainer": "AutoEncoderTopK", "BatchTopKTrainer": "BatchTopKSAE",
             "MatryoshkaBatchTopKTrainer": "MatryoshkaBatchTopKSAE", "JumpReluTrainer": "JumpReluAutoEncoder",
             "GatedSAETrainer": "GatedAutoEncoder", "GatedAnnealTrainer": "GatedAutoEncoder"}
_RESUME_KEYS = frozenset({"step", "ae", "optimizer", "config", "norm_factor"})
_NAMED_SITES = (
    (re.compile(r"^(?:resid_post|resid_out|resid)_layer_?(\d+)$"), "blocks.{}.hook_resid_post"),
    (re.compile(r"^resid_pre_layer_?(\d+)$"), "blocks.{}.hook_resid_pre"),
    (re.compile(r"^(?:mlp_out|mlp)_layer_?(\d+)$"), "blocks.{}.hook_mlp_out"),
    (re.compile(r"^(?:attn_out|attn)_layer_?(\d+)$"), "blocks.{}.hook_attn_out"),
)
_CHECKPOINT = re.compile(r"^ae(_\d+)?\.pt$")


def _config_path(pt: Path) -> Path | None:
    """The ``config.json`` of a trainer folder: beside ``ae.pt``, or above ``checkpoints/ae_{step}.pt``."""
    for folder in (pt.parent, pt.parent.parent):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    return None


def _weights_file(path: Path) -> Path | None:
    if path.is_dir():
        return path / "ae.pt" if (path / "ae.pt").is_file() else None
    if path.is_file() and path.suffix == ".pt":
        if _CHECKPOINT.match(path.name):
            return path
        cfg = _config_path(path)
        try:
            return path if cfg is not None and "trainer" in read_json(cfg) else None
        except SAEError:
            return None
    return None


def _detect(path: Path) -> bool:
    return _weights_file(path) is not None


def site_hook(submodule: str, io: str | None, model_name: str | None, where: Path) -> str:
    """The TransformerLens hook of a dictionary trained on ``submodule``'s ``io`` ("out" or "in").

    Raises:
        SAEError: ``io`` is ``in_and_out`` or unknown, or the submodule name maps to no hook.
    """
    io = io or "out"
    if io not in ("in", "out"):
        raise SAEError(f"{where}: buffer io={io!r} (a crosscoder or transcoder reading one module's input and "
                       "output) is not supported; saecircuits loads dictionaries on one module's input or output")
    for pattern, hook in _NAMED_SITES:
        m = pattern.match(submodule)
        if m:
            if io != "out":
                raise SAEError(f"{where}: submodule {submodule!r} with io='in' is ambiguous; pass hook=")
            return hook.format(int(m.group(1)))
    if submodule in ("embed", "embed_in", "embed_tokens"):
        return "hook_embed"
    return hook_from_module_path(submodule + (".input" if io == "in" else ""), model_name=model_name)


def _int_value(v: Any) -> int | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v.item())
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return None


def _state(obj: Any, pt: Path) -> tuple[dict[str, Any], float | None, bool]:
    """``(state dict, norm_factor to apply, is_resume_dict)`` of what ``ae.pt`` holds."""
    if not isinstance(obj, dict):
        raise SAEError(f"{pt} holds a {type(obj).__name__}, not a dictionary_learning state dict")
    if "ae" in obj and set(obj) <= _RESUME_KEYS:
        state = obj["ae"]
        if not isinstance(state, dict):
            raise SAEError(f"{pt}: the resume checkpoint's 'ae' entry is not a state dict")
        factor = obj.get("norm_factor")
        if factor is not None:
            if isinstance(factor, torch.Tensor) and factor.numel() == 1:
                factor = float(factor.item())
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise SAEError(f"{pt}: the resume checkpoint's norm_factor {factor!r} is not a positive number")
            factor = float(factor)
        return state, factor, True
    return obj, None, False


def _class_of(names: set[str], config_class: str | None, pt: Path) -> str:
    def fits(cls: str) -> bool:
        need, optional = CLASSES[cls]
        return need <= names <= need | optional

    if config_class is not None:
        if config_class not in CLASSES:
            raise SAEError(f"{pt}: dictionary class {config_class!r} is not supported; saecircuits reads "
                           f"{sorted(CLASSES)}")
        if not fits(config_class):
            need, optional = CLASSES[config_class]
            raise SAEError(f"{pt}: tensors {sorted(names)} are not a {config_class}'s (it has {sorted(need)}, "
                           f"optionally {sorted(optional)}); the weights do not belong to config.json")
        return config_class
    matches = [cls for cls in CLASSES if fits(cls)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SAEError(f"{pt}: tensors {sorted(names)} match no dictionary_learning class ({sorted(CLASSES)})")
    raise SAEError(f"{pt}: tensors fit {matches}, which encode differently; put the trainer's config.json (with "
                   "dict_class) beside ae.pt")


def _load(path: Path, options: LoadOptions) -> SAE:
    pt = _weights_file(path)
    assert pt is not None
    cfg_file = _config_path(pt)
    config = read_json(cfg_file) if cfg_file is not None else {}
    trainer = config.get("trainer") or config.get("dictionary") or {}
    buffer = config.get("buffer") or {}
    if not isinstance(trainer, dict) or not isinstance(buffer, dict):
        raise SAEError(f"{cfg_file}: 'trainer' and 'buffer' must be objects")
    state, factor, resume = _state(read_torch(pt), pt)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if set(tensors) != set(state):
        raise SAEError(f"{pt}: entries {sorted(set(state) - set(tensors))} of the state dict are not tensors")
    config_class = trainer.get("dict_class") or _TRAINERS.get(trainer.get("trainer_class") or "")
    if trainer.get("trainer_class") not in (None, *_TRAINERS) and not trainer.get("dict_class"):
        raise SAEError(f"{cfg_file}: trainer_class {trainer['trainer_class']!r} is not one saecircuits knows "
                       f"({sorted(_TRAINERS)}); add dict_class")
    cls = _class_of(set(tensors), config_class, pt)

    # sizes: from the config where it says, checked against the tensors (a square matrix cannot show its orientation)
    if cls in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        d_in, d_sae = tensors["W_enc"].shape
    else:
        d_sae, d_in = tensors["encoder.weight"].shape
    want = (trainer.get("activation_dim"), trainer.get("dict_size"))
    if want != (None, None) and (want[0] != d_in or want[1] != d_sae):
        raise SAEError(f"{pt}: the encoder says d={d_in}, F={d_sae} but config.json says activation_dim={want[0]}, "
                       f"dict_size={want[1]}; the weights do not belong to this config (or a matrix is transposed)")
    if want == (None, None) and d_in == d_sae:
        raise SAEError(f"{pt}: d == F = {d_in} and no config.json says which is which, so a transposed matrix "
                       "could not be told apart; put the trainer's config.json beside ae.pt")

    def t(name: str) -> torch.Tensor:
        return tensors[name]

    extra: dict[str, Any] = {}
    apply_b_dec = True
    check_floating({k: v for k, v in tensors.items() if k not in ("k", "group_sizes")}, pt)  # integer buffers
    if cls in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder"):
        # the decoder is checked here, before the folds below use it (the encoder gave d and F)
        oriented(t("decoder.weight"), (d_in, d_sae), "decoder.weight", pt, "[activation_dim, dict_size] (nn.Linear)")
        w = {"W_enc": t("encoder.weight").T, "W_dec": t("decoder.weight").T}
    else:
        oriented(t("W_dec"), (d_sae, d_in), "W_dec", pt, "[dict_size, activation_dim]")
        w = {"W_enc": t("W_enc"), "W_dec": t("W_dec")}
    if cls == "AutoEncoder":
        arch, w["b_enc"], w["b_dec"] = "standard", t("encoder.bias"), t("bias")
    elif cls == "AutoEncoderNew":
        arch, w["b_enc"], w["b_dec"], apply_b_dec = "standard", t("encoder.bias"), t("decoder.bias"), False
    elif cls == "GatedAutoEncoder":
        arch = "gated"
        w.update(b_gate=t("gate_bias"), b_mag=t("mag_bias"), r_mag=t("r_mag"), b_dec=t("decoder_bias"))
    elif cls == "JumpReluAutoEncoder":
        arch, apply_b_dec = "jumprelu", bool(trainer.get("apply_b_dec_to_input", False))
        w.update(b_enc=t("b_enc"), b_dec=t("b_dec"), threshold=t("threshold").clamp_min(0))
    else:  # TopK, BatchTopK, Matryoshka
        w.update(b_enc=t("b_enc") if "b_enc" in tensors else t("encoder.bias"), b_dec=t("b_dec"))
        k_state, k_config = _int_value(tensors.get("k")), _int_value(trainer.get("k"))
        if k_state is not None and k_config is not None and k_state != k_config:
            raise SAEError(f"{pt}: k={k_state} in the state dict but k={k_config} in config.json")
        k = k_state if k_state is not None else k_config
        if k is None:
            raise SAEError(f"{pt}: a {cls} needs k (the state dict's 'k' buffer or config.json's trainer.k)")
        extra["k"] = k
        arch = "topk" if cls == "AutoEncoderTopK" else "batchtopk"
        if cls == "MatryoshkaBatchTopKSAE" and int(t("group_sizes").sum()) != d_sae:
            raise SAEError(f"{pt}: group_sizes sum to {int(t('group_sizes').sum())}, not dict_size={d_sae}")
        if arch == "batchtopk":
            threshold = t("threshold")
            if threshold.numel() != 1:
                raise SAEError(f"{pt}: threshold has shape {tuple(threshold.shape)}, expected one number")
            value = float(threshold.reshape(()))
            if value < 0:
                raise SAEError(
                    f"{pt}: the {cls}'s inference threshold is {value:g} "
                    f"({'-1: never estimated' if value == -1 else 'negative'}); "
                    "with it dictionary_learning's encode keeps every positive latent instead of the ~k its "
                    "BatchTopK selects (only a batch-level top-k would, which depends on the other tokens), so "
                    "the dictionary is not loaded: use a checkpoint saved after threshold_start_step")
            w["threshold"] = threshold.reshape(()).expand(d_sae).clone()

    source: dict[str, Any] = {"family": "dictionary_learning", "path": str(path), "class": cls,
                              "config": config}
    if resume:
        source["resume_checkpoint"] = True
    w = {k: v.detach() for k, v in w.items()}
    dtype = w["W_enc"].dtype
    folds = factor is not None or cls == "AutoEncoder"
    if folds:
        w = {k: v.double() for k, v in w.items()}
    if factor is not None and factor != 1.0:  # scale_biases(norm_factor), as the end of training does
        for name in ("b_enc", "b_dec", "b_gate", "b_mag", "threshold"):
            if name in w:
                w[name] = w[name] * factor
        source["applied_norm_factor"] = factor
    if cls == "AutoEncoder":
        norms = w["W_dec"].norm(dim=1)
        if not bool(torch.all(norms > 0)):
            raise SAEError(f"{pt}: some decoder columns are zero; dictionary_learning's normalize_decoder would "
                           "divide by zero")
        if not torch.allclose(norms, torch.ones_like(norms)):  # from_pretrained returns early when already unit
            w["W_dec"] = w["W_dec"] / norms[:, None]
            w["W_enc"] = w["W_enc"] * norms[None, :]
            w["b_enc"] = w["b_enc"] * norms
            source["normalized_decoder"] = True
    if folds:
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        w = {k: v.to(dtype) for k, v in w.items()}

    model_name = options.model_name or trainer.get("lm_name") or ""
    submodule = trainer.get("submodule_name")
    found = None
    if isinstance(submodule, str) and submodule:
        try:
            found = site_hook(submodule, buffer.get("io"), model_name, pt)
        except SAEError:
            if not options.hook:
                raise
        source["site"] = f"{submodule} ({buffer.get('io') or 'out'})"
    elif not options.hook:
        # saprmarks' released dictionaries (feature-circuits) name the site in a folder above ae.pt:
        # dictionaries/pythia-70m-deduped/resid_out_layer3/10_32768/ae.pt
        for folder in (pt.parent, pt.parent.parent, pt.parent.parent.parent):
            if folder.name in ("embed", "embed_in", "embed_tokens") or any(
                    pattern.match(folder.name) for pattern, _ in _NAMED_SITES):
                found = site_hook(folder.name, "out", model_name, pt)
                source["site"] = f"{folder.name} (folder name)"
                break
    hook = resolve_hook(found, options.hook, path, what="config.json's submodule_name (or the folder names)")
    extra["model_processing"] = {"center_writing_weights": False}
    # an MLP's input in a Hugging Face model is the pre-MLP norm's output with its weight applied
    extra["basis"] = {"input": f"the raw Hugging Face model's {buffer.get('io') or 'out'}put of "
                               f"{submodule or hook}", "norm_weight_applied": hook.endswith("ln2.hook_normalized")}
    extra["source"] = source
    cfg = SAEConfig(architecture=arch, d_in=int(d_in), d_sae=int(d_sae), hook_point=hook,
                    model_name=str(model_name), dtype=dtype_name(dtype), apply_b_dec_to_input=apply_b_dec,
                    extra=extra)
    return build_from_tensors(cfg, {k: v.contiguous() for k, v in w.items()}, pt, options.device)


register_family(Family("dictionary_learning", "saprmarks dictionary_learning", _detect, _load,
                       "a trainer folder with ae.pt (+ config.json), or an ae.pt / checkpoints/ae_N.pt file",
                       pairs=(("config.json", "ae.pt"),)))
