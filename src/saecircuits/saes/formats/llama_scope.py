"""Llama Scope (OpenMOSS ``fnlp/Llama3_1-8B-Base-LX{R,A,M,TC}-{8,32}x``) and Llama Scope R1
(``fnlp/Llama-Scope-R1-Distill``), trained with OpenMOSS' ``lm_saes`` on TransformerLens hooks.

Llama Scope
    Files: a folder with ``hyperparams.json`` and ``checkpoints/final.safetensors``.
    Tensors (nn.Linear orientation, usually bfloat16): ``encoder.weight [F, d]``, ``encoder.bias [F]``,
    ``decoder.weight [d_out, F]``, ``decoder.bias [d_out]``.
    hyperparams keys read for the maths: ``d_model``, ``d_sae``, ``hook_point_in``, ``hook_point_out``, ``act_fn``
    ("jumprelu"), ``jump_relu_threshold`` (one scalar for every feature), ``norm_activation`` ("dataset-wise"),
    ``dataset_average_activation_norm {in, out}``, ``apply_decoder_bias_to_pre_encoder`` (must be false),
    ``use_decoder_bias``, ``use_glu_encoder`` (must be false), ``sparsity_include_decoder_norm`` (see below). The
    training and provenance keys in :data:`_HARMLESS_KEYS` are ignored; any other key is refused (its effect on the
    maths is unknown).
    Maths (as SAELens' ``llama_scope`` loader reproduces it, which is what Neuronpedia's dashboards use): with
    ``s_in = sqrt(d_model) / norm_in`` and ``s_out = sqrt(d_model) / norm_out``, ``pre = (s_in x) @ encoder.weight.T +
    encoder.bias`` (no b_dec subtraction), ``f = pre * [pre > jump_relu_threshold * s_in]`` (the released threshold is
    in the units of the raw input's pre-activation ``pre / s_in``), ``recon = (f @ decoder.weight.T + decoder.bias) /
    s_out``. Folded exactly into ``W_enc = s_in * encoder.weight.T``, ``threshold = s_in * jump_relu_threshold``,
    ``W_dec = decoder.weight.T / s_out``, ``b_dec = decoder.bias / s_out``, so the SAE reads raw activations and its
    features are the trained SAE's. The fold is computed in float64 and stored in float32 (a bfloat16 file is
    upcast: rounding the folded weights back to bfloat16 would change the SAE; ``source["upcast_from"]`` says so).
    This is lm_saes' own inference path (``standardize_parameters_of_dataset_norm``: ``encoder.bias /= s_in``,
    ``decoder.weight *= s_in / s_out``, ``decoder.bias /= s_out``, the threshold left as it is, so it gates
    ``pre / s_in``), up to the per-SAE factor ``s_in`` on the features. In the release-era ``lm_saes`` the decoder
    norm enters only TopK's selection (``sparsity_include_decoder_norm``); its ``jumprelu`` gates the pre-activation
    alone, so that key does not change these SAEs (recorded in ``source``).

Llama Scope R1
    Files: a folder with ``config.json`` and ``sae_weights.safetensors`` (no ``cfg.json``: that pair is SAELens').
    Tensors as above plus ``log_jumprelu_threshold [F]`` (``threshold = exp(log_jumprelu_threshold)``, in the units of
    the stored weights' pre-activation). config keys: ``d_model``, ``expansion_factor`` (or ``d_sae``),
    ``hook_point_in`` (and ``hook_point_out``), optionally ``act_fn``, ``norm_activation``,
    ``dataset_average_activation_norm``. With ``dataset_average_activation_norm`` the input scale ``s_in`` is folded
    as above (``W_enc *= s_in``; the threshold is the trained one, so it is not scaled); ``norm_activation:
    "dataset-wise"`` without the norms is refused (the scale is not in the files); ``"token-wise"`` is refused.

Sites
    ``hook_point_in``/``hook_point_out`` are TransformerLens names: ``blocks.L.hook_resid_post`` (LXR),
    ``blocks.L.hook_attn_out`` (LXA), ``blocks.L.hook_mlp_out`` (LXM); a transcoder (LXTC, ``in != out``) reads
    ``blocks.L.ln2.hook_normalized`` (TransformerLens' norm output, before the norm's weight) and writes
    ``blocks.L.hook_mlp_out``.

Basis recorded
    lm_saes reads TransformerLens hooks of Llama (RMSNorm: TransformerLens does not centre writing weights; the hooks
    used do not depend on ``fold_ln``): ``model_processing`` from :func:`~saecircuits.saes.sites.raw_model_processing`
    (``center_writing_weights=False`` for residual values and writes); ``basis = {"input": ...,
    "norm_weight_applied": False}``.

Refused: other activations, GLU encoders, b_dec subtraction, per-token normalisation, unknown keys or tensors,
transposed or square matrices, negative thresholds (``pre * [pre > t]`` with ``t < 0`` passes negative values).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name, full_precision_dtype
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook
from saecircuits.saes.formats.common import build_from_tensors, read_json, read_safetensors
from saecircuits.saes.formats.gemma_scope import oriented, refuse_square_encoder
from saecircuits.saes.sites import layer_of_hook, raw_model_processing

HYPERPARAMS = "hyperparams.json"
CHECKPOINT = Path("checkpoints") / "final.safetensors"
R1_CONFIG = "config.json"
R1_WEIGHTS = "sae_weights.safetensors"

_MATHS_KEYS = {"d_model", "d_sae", "expansion_factor", "hook_point_in", "hook_point_out", "act_fn",
               "jump_relu_threshold", "norm_activation", "dataset_average_activation_norm",
               "apply_decoder_bias_to_pre_encoder", "use_decoder_bias", "use_glu_encoder",
               "sparsity_include_decoder_norm", "dtype"}
#: lm_saes training and provenance keys: they do not change encode/decode of the saved weights.
_HARMLESS_KEYS = frozenset({
    "device", "seed", "bias_init_method", "use_ddp", "tp_size", "ddp_size", "sae_pretrained_name_or_path",
    "strict_loading", "top_k",
    "k_warmup_steps", "l1_coefficient", "l1_coefficient_warmup_steps", "lp", "lr", "use_ghost_grads",
    "init_decoder_norm", "init_encoder_norm", "init_encoder_with_decoder_transpose", "decoder_exactly_fixed_norm",
    "use_batch_norm_mse", "sae_type", "model_name", "model_from_pretrained_path", "dataset_path", "context_size",
    "mse_loss_normalization", "jumprelu_bandwidth", "initial_jumprelu_threshold", "jumprelu_threshold_window",
    "total_training_tokens", "train_batch_size", "name",
})


# ----------------------------------------------------------------------------------------- files
def _v1_folder(path: Path) -> Path | None:
    folder = path.parent.parent if path.is_file() and path.name == CHECKPOINT.name else path
    if folder.is_dir() and (folder / HYPERPARAMS).is_file() and (folder / CHECKPOINT).is_file():
        return folder
    return None


def _r1_folder(path: Path) -> Path | None:
    folder = path.parent if path.is_file() and path.name == R1_WEIGHTS else path
    if (folder.is_dir() and (folder / R1_CONFIG).is_file() and (folder / R1_WEIGHTS).is_file()
            and not (folder / "cfg.json").exists()):
        return folder
    return None


def _detect(path: Path) -> bool:
    return _v1_folder(path) is not None or _r1_folder(path) is not None


# ----------------------------------------------------------------------------------------- loading
def _load(path: Path, options: LoadOptions) -> SAE:
    folder = _v1_folder(path)
    if folder is not None:
        return _load_files(folder / HYPERPARAMS, folder / CHECKPOINT, options, r1=False)
    folder = _r1_folder(path)
    if folder is None:
        raise SAEError(f"{path}: a Llama Scope SAE is a folder with {HYPERPARAMS} + {CHECKPOINT.as_posix()} (or, R1, "
                       f"{R1_CONFIG} + {R1_WEIGHTS})")
    return _load_files(folder / R1_CONFIG, folder / R1_WEIGHTS, options, r1=True)


def _positive(value: Any, what: str, cfg_path: Path) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise SAEError(f"{cfg_path}: {what} must be a positive number, got {value!r}")
    return v


def _load_files(cfg_path: Path, weights_path: Path, options: LoadOptions, *, r1: bool) -> SAE:
    hp = read_json(cfg_path)
    unknown = sorted(set(hp) - _MATHS_KEYS - _HARMLESS_KEYS)
    if unknown:
        raise SAEError(f"{cfg_path}: keys {unknown} are not Llama Scope keys saecircuits knows; they may change the "
                       "maths, so the SAE is not loaded")
    act = hp.get("act_fn", "jumprelu")
    if act != "jumprelu":
        raise SAEError(f"{cfg_path}: act_fn {act!r}: saecircuits reproduces Llama Scope's 'jumprelu' only")
    for key, bad in (("use_glu_encoder", True), ("apply_decoder_bias_to_pre_encoder", True)):
        if hp.get(key, False) is bad:
            raise SAEError(f"{cfg_path}: {key} is true; released Llama Scope SAEs have it false and saecircuits does "
                           "not reproduce that variant")
    if "hook_point_in" not in hp or "d_model" not in hp:
        raise SAEError(f"{cfg_path}: 'hook_point_in' and 'd_model' are needed")
    hook_in, hook_out = str(hp["hook_point_in"]), str(hp.get("hook_point_out") or hp["hook_point_in"])
    hook = resolve_hook(hook_in, options.hook, cfg_path, what=f"{cfg_path.name}'s hook_point_in")
    raw = read_safetensors(weights_path)
    names = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"} | (
        {"log_jumprelu_threshold"} if r1 else set())
    extra_t = sorted(set(raw) - names)
    missing = sorted(names - set(raw) - ({"decoder.bias"} if hp.get("use_decoder_bias") is False else set()))
    if extra_t or missing:
        raise SAEError(f"{weights_path}: tensors do not match a Llama Scope SAE (missing {missing}, unexpected "
                       f"{extra_t})")
    enc_b = raw["encoder.bias"]
    d, f = int(hp["d_model"]), enc_b.shape[0]
    d_sae_cfg = hp.get("d_sae") or (d * hp["expansion_factor"] if "expansion_factor" in hp else f)
    if d_sae_cfg != f:
        raise SAEError(f"{weights_path}: encoder.bias has {f} features but {cfg_path.name} says d_sae={d_sae_cfg}")
    refuse_square_encoder(d, f, weights_path)
    enc = oriented(raw["encoder.weight"], (f, d), "encoder.weight", weights_path, "[d_sae, d_model] (nn.Linear)")
    dec_w = raw["decoder.weight"]
    d_out = dec_w.shape[0]
    dec = oriented(dec_w, (d_out, f), "decoder.weight", weights_path, "[d_out, d_sae] (nn.Linear)")
    if hook_out == hook_in and d_out != d:
        raise SAEError(f"{weights_path}: decoder.weight writes {d_out} dimensions but the SAE reads and writes "
                       f"{hook_in} ({d}-wide)")
    dec_b = raw.get("decoder.bias", torch.zeros(d_out, dtype=dec.dtype))
    oriented(dec_b, (d_out,), "decoder.bias", weights_path, "[d_out]")
    stored = dec.dtype
    # the input/output scales of norm_activation "dataset-wise"
    norm = hp.get("norm_activation", "dataset-wise" if not r1 else "inference")
    norms = hp.get("dataset_average_activation_norm")
    if norm == "token-wise":
        raise SAEError(f"{cfg_path}: norm_activation 'token-wise' normalises each token by its own norm, which "
                       "saecircuits does not reproduce for Llama Scope")
    if norm not in ("dataset-wise", "inference", "none"):
        raise SAEError(f"{cfg_path}: norm_activation {norm!r} is not one saecircuits knows ('dataset-wise', "
                       "'inference', 'none')")
    s_in = s_out = 1.0
    if norm == "dataset-wise" or norms is not None:
        if not isinstance(norms, dict):
            raise SAEError(f"{cfg_path}: norm_activation is 'dataset-wise' but dataset_average_activation_norm "
                           "{in, out} is missing, so the input scale the SAE was trained with is unknown")
        n_in = norms.get("in", norms.get(hook_in))
        n_out = norms.get("out", norms.get(hook_out, n_in))
        s_in = math.sqrt(d) / _positive(n_in, "dataset_average_activation_norm.in", cfg_path)
        s_out = math.sqrt(d) / _positive(n_out, "dataset_average_activation_norm.out", cfg_path)
    if r1:
        threshold = raw["log_jumprelu_threshold"].double().exp()
        oriented(threshold, (f,), "log_jumprelu_threshold", weights_path, "[d_sae]")
    else:
        if "jump_relu_threshold" not in hp:
            raise SAEError(f"{cfg_path}: jump_relu_threshold is missing")
        theta = hp["jump_relu_threshold"]
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta):
            raise SAEError(f"{cfg_path}: jump_relu_threshold must be one number, got {theta!r}")
        threshold = torch.full((f,), float(theta), dtype=torch.float64) * s_in
    if bool((threshold < 0).any()):
        raise SAEError(f"{cfg_path}: a negative JumpReLU threshold lets negative pre-activations through "
                       "(pre * [pre > t]), which saecircuits' JumpReLU does not reproduce")
    folded = s_in != 1.0 or s_out != 1.0
    dtype = full_precision_dtype(stored) if folded else stored
    # float32 arithmetic on the exactly upcast weights (a float64 copy of a 131k-feature encoder would take 4 GB)
    tensors = {"W_enc": enc.T.to(dtype) * s_in if s_in != 1.0 else enc.T, "b_enc": enc_b.to(dtype),
               "W_dec": dec.T.to(dtype) / s_out if s_out != 1.0 else dec.T,
               "b_dec": (dec_b.double() / s_out).to(dtype), "threshold": threshold.float()}
    transcoder = hook_out != hook_in
    norm_weight = False  # TransformerLens' ln2.hook_normalized is before the norm's weight
    extra: dict[str, Any] = {
        "model_processing": raw_model_processing(hook, hook_out if transcoder else None),
        "basis": {"input": f"{hook.rsplit('.', 1)[-1]} of TransformerLens' Llama (before the norm's weight)"
                  if hook.endswith("ln2.hook_normalized") else f"{hook.rsplit('.', 1)[-1]} of the unprocessed model",
                  "norm_weight_applied": norm_weight},
        "source": {"family": "llama_scope", "version": "R1" if r1 else 1, "path": str(weights_path),
                   "site": hook.rsplit(".", 1)[-1] if not transcoder else "transcoder", "layer": layer_of_hook(hook),
                   "input_scale": s_in, "output_scale": s_out,
                   "sparsity_include_decoder_norm": bool(hp.get("sparsity_include_decoder_norm", False)),
                   **({"upcast_from": dtype_name(stored)} if dtype != stored else {})},
    }
    cfg = SAEConfig(architecture="jumprelu", d_in=d, d_sae=f, hook_point=hook,
                    model_name=options.model_name or str(hp.get("model_name") or "meta-llama/Llama-3.1-8B"),
                    dtype=dtype_name(dtype), apply_b_dec_to_input=False, extra=extra, d_out=d_out,
                    hook_point_out=hook_out if transcoder else None)
    return build_from_tensors(cfg, tensors, weights_path, options.device)


register_family(Family("llama_scope", "Llama Scope (and R1)", _detect, _load,
                       f"a folder with {HYPERPARAMS} + {CHECKPOINT.as_posix()} (Llama Scope R1: {R1_CONFIG} + "
                       f"{R1_WEIGHTS})",
                       pairs=((HYPERPARAMS, CHECKPOINT.as_posix()), (R1_CONFIG, R1_WEIGHTS))))
