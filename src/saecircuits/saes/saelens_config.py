"""Reading a plain SAELens ``cfg.json`` (v1 to v6, transcoders included) into our SAEConfig, and the exact folds
that turn its stored tensors into our SAE's (:func:`saecircuits.saes.io.load_sae` calls :func:`_saelens_config`
and :func:`_apply_plan`).

What :func:`load_sae` accepts from a plain SAELens folder (no ``"saecircuits"`` block), with the same maths as
SAELens 6.x (``standard``: ``ReLU``; ``topk``: top-k of the pre-activations, ReLU'd; ``jumprelu``: ``ReLU(h) *
(h > max(threshold, 0))``):

* every key is either understood or known not to affect encoding/decoding (training coefficients, provenance);
  any other key is refused, naming it, because it could change the maths;
* ``rescale_acts_by_decoder_norm: true`` (the default of SAELens TopK/BatchTopK training, whose checkpoints keep
  unit-norm-free decoders) is folded into the weights: ``W_enc[:, i] *= ||W_dec[i]||``, ``b_enc[i] *= ||W_dec[i]||``,
  ``W_dec[i] /= ||W_dec[i]||``, which gives exactly the same features and reconstruction (SAELens
  ``TopKSAE.fold_W_dec_norm``);
* ``normalize_activations: "expected_average_only_in"`` (a training checkpoint taken before the end of training) is
  folded from the ``activation_scaler.json`` SAELens saves beside it (``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``,
  after the decoder-norm fold), so the SAE takes raw activations; without that file it is refused;
  ``"constant_norm_rescale"``/``"layer_norm"`` (per-token normalisation at run time) are refused;
* a ``batchtopk`` training checkpoint's scalar ``topk_threshold`` becomes the per-feature inference threshold;
* a ``scaling_factor`` tensor of ones is dropped (SAELens does the same); any other is refused;
* ``normalize_activations: "layer_norm"`` (centre each token, divide by its unbiased std + 1e-5, de-normalise the
  output) is ``cfg.extra["input_normalization"] = "layer_norm"``; ``reshape_activations: "hook_z"`` flattens the
  heads (``cfg.extra["reshape_activations"]``);
* SAELens 6 transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``:
  ``d_out``, ``metadata.hook_name_out``, ``W_skip [d_out, d_in]`` applied as ``x @ W_skip.T``, no ``b_dec``
  subtraction) load as transcoders (``cfg.hook_point_out``, ``cfg.extra["skip_connection"]``);
* files before SAELens 6 are put in the 6.x shape as SAELens' converter does (``handle_pre_6_0_config``:
  ``hook_point``/``hook_point_head_index``/``activation_fn_str`` renamed, ``activation_fn_kwargs.k`` makes a TopK
  SAE, a boolean ``normalize_activations`` means ``"expected_average_only_in"``/``"none"``, a ``hook_z`` hook name
  turns reshaping on); their training, data and logging keys (:data:`_PRE6_TRAINING_KEYS`, every field SAELens
  v0.1 to v5.11 wrote, and gpt2-small-res-jb's v1/v2 keys) are kept in ``cfg.extra["saelens"]["training"]``;
* ``model_from_pretrained_kwargs`` gives the TransformerLens weight processing the activations were taken under
  (``cfg.extra["model_processing"]``, see :func:`_saelens_model_processing`);
* a ``sparsity.safetensors`` beside the weights (log10 feature densities) is checked and noted in
  ``cfg.extra["saelens"]["feature_density_file"]``; read it with
  :func:`saecircuits.saes.formats.saelens.feature_density`;
* ``hook_head_index`` other than null, ``constant_norm_rescale``, a pre-6 ``activation_fn`` other than
  ``relu``/``topk``, a transcoder that normalises or reshapes its input, and other architectures are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saecircuits.saes.base import MATHS_KEYS, SAEConfig, SAEError, dtype_name

logger = logging.getLogger(__name__)

#: SAELens' file of the activation-normalisation factor, beside its training checkpoints.
SCALER_FILE = "activation_scaler.json"

_CORE = ("W_enc", "W_dec", "b_enc", "b_dec")

_ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk", "gated")

# ---- SAELens 6.x cfg.json keys, by what they do (sae_lens/saes/*.py config dataclasses) ----
#: SAEConfig fields every architecture has.
_BASE_KEYS = frozenset(
    {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
     "reshape_activations", "metadata"}
)

#: fields that change an architecture's inference maths (TopKSAEConfig; BatchTopKTrainingSAEConfig).
_ARCH_KEYS = {
    "standard": frozenset(),
    "topk": frozenset({"k", "rescale_acts_by_decoder_norm"}),
    "jumprelu": frozenset(),
    "batchtopk": frozenset({"k", "rescale_acts_by_decoder_norm"}),
    "gated": frozenset(),
}

#: keys of ``cfg.extra`` in our own block: every architecture's, then each architecture's own. Anything else (a
#: misplaced ``k`` on a standard SAE, a setting a newer saecircuits added) is refused rather than ignored.
_COMMON_EXTRA = frozenset({"seed", "folded_activation_scale", "training", "saelens", "reference_config",
                           "model_processing", "source", "basis"}) | frozenset(MATHS_KEYS) - {"topk_relu"}

_EXTRA_KEYS = {
    "standard": _COMMON_EXTRA,
    "topk": _COMMON_EXTRA | {"k", "topk_relu"},
    "jumprelu": _COMMON_EXTRA | {"bandwidth", "threshold_init"},
    "batchtopk": _COMMON_EXTRA | {"k", "threshold_lr"},
    "gated": _COMMON_EXTRA,
}

#: training-config fields that do not change encode/decode (coefficients, initialisation, sparse kernels).
_TRAINING_ONLY_KEYS = frozenset(
    {"decoder_init_norm", "l1_coefficient", "lp_norm", "l1_warm_up_steps", "use_sparse_activations",
     "aux_loss_coefficient", "topk_threshold_lr", "jumprelu_init_threshold", "jumprelu_bandwidth",
     "jumprelu_sparsity_loss_mode", "l0_coefficient", "l0_warm_up_steps", "pre_act_loss_coefficient",
     "jumprelu_tanh_scale"}
)

#: provenance keys (SAELens' LLM_METADATA_KEYS): in ``metadata`` in 6.x, top-level in older files.
_METADATA_KEYS = frozenset(
    {"model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
     "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
     "sae_lens_version", "sae_lens_training_version", "hook_name_out", "hook_head_index_out"}
)

#: pre-6 names SAELens' converter renames (handle_pre_6_0_config), and its data-loading flag.
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                 "activation_fn_str": "activation_fn"}

_PRE6_EXTRA_KEYS = frozenset({"activation_fn", "activation_fn_kwargs", "finetuning_scaling_factor",
                              "dataset_trust_remote_code"})

#: every other key SAELens before 6 wrote into ``cfg.json``: the fields of its runner, SAE and training-SAE config
#: dataclasses at every release tag v0.1 to v5.11 (``sae_lens/config.py``, ``sae_lens/sae.py``,
#: ``sae_lens/training/training_sae.py``) and the v1/v2 keys of gpt2-small-res-jb. Data, optimiser, logging,
#: initialisation and loss settings, and the layer number (derived from the hook name, as SAELens 6 does): none
#: changes how the saved SAE encodes or decodes. They are kept in ``cfg.extra["saelens"]["training"]``.
_PRE6_TRAINING_KEYS = frozenset({
    "hook_layer", "hook_point_layer", "expansion_factor", "dataset_name",
    "is_dataset_tokenized", "streaming", "use_cached_activations", "cached_activations_path",
    "new_cached_activations_path", "n_batches_in_buffer", "total_training_tokens", "training_tokens",
    "finetuning_tokens", "finetuning_method", "store_batch_size", "store_batch_size_prompts", "train_batch_size",
    "train_batch_size_tokens", "seed", "b_dec_init_method", "l1_coefficient", "lp_norm", "lr", "lr_end",
    "lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps", "n_restart_cycles", "adam_beta1", "adam_beta2",
    "l1_warm_up_steps", "use_ghost_grads", "feature_sampling_window", "feature_sampling_method", "resample_batches",
    "feature_reinit_scale", "dead_feature_window", "dead_feature_estimation_method", "dead_feature_threshold",
    "log_to_wandb", "log_optimizer_state_to_wandb", "log_activations_store_to_wandb", "wandb_project",
    "wandb_entity", "wandb_id", "wandb_log_frequency", "eval_every_n_wandb_logs", "n_checkpoints",
    "checkpoint_path", "tokens_per_buffer", "run_name", "from_pretrained_path", "resume", "verbose",
    "model_kwargs", "autocast", "autocast_lm", "compile_llm", "compile_sae", "llm_compilation_mode",
    "sae_compilation_mode", "act_store_device", "n_eval_batches", "eval_batch_size_prompts", "n_eval_seqs",
    "hf_repo_id", "hf_num_shards", "hf_revision", "hf_is_private_repo", "shuffle", "shuffle_every_n_buffers",
    "n_shuffles_with_last_section", "n_shuffles_in_entire_dir", "n_shuffles_final", "tokenizer_name", "split",
    "sequence_separator_token", "begin_sequence_token", "begin_batch_token", "column_name", "data_dir",
    "data_files", "num_proc", "pretokenize_batch_size", "save_path", "model_batch_size", "buffer_size_gb",
    "use_error_term", "mse_loss_normalization", "decoder_orthogonal_init", "normalize_sae_decoder", "noise_scale",
    "scale_sparsity_penalty_by_decoder_norm", "init_encoder_as_decoder_transpose", "decoder_heuristic_init",
    "decoder_heuristic_init_norm", "jumprelu_init_threshold", "jumprelu_bandwidth",
})

#: SAELens 6 transcoder classes -> (activation, skip connection) (``sae_lens/saes/transcoder.py``).
_TRANSCODERS = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
                "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}

#: tensors SAELens 6.x loads for each architecture (strict load_state_dict).
_SAELENS_TENSORS = {
    "standard": frozenset(_CORE),
    "topk": frozenset(_CORE),
    "jumprelu": frozenset(_CORE) | {"threshold"},
    "batchtopk": frozenset(_CORE) | {"topk_threshold"},
    "gated": frozenset({"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}),
}

for _name, (_act, _skip) in _TRANSCODERS.items():
    _SAELENS_TENSORS[_name] = _SAELENS_TENSORS[_act] | ({"W_skip"} if _skip else set())
    _ARCH_KEYS[_name] = frozenset({"d_out"})

#: SAELens' optional file of feature densities beside the weights: one tensor ``sparsity [d_sae]``, the log10 of
#: each feature's firing frequency over its training data.
SPARSITY_FILE = "sparsity.safetensors"

#: TransformerLens' ``HookedTransformer.from_pretrained`` defaults of the switches that change activations.
_TL_PROCESSING_DEFAULTS = {"fold_ln": True, "center_writing_weights": True, "fold_value_biases": True}

# --------------------------------------------------------------------------------------------------- reading
@dataclass
class _Plan:
    """What turns the stored tensors into our SAE's (all exact rewrites of the same maths)."""

    fold_decoder_norms: bool = False
    activation_scale: float | None = None
    topk_threshold: bool = False  # BatchTopK training checkpoint: scalar topk_threshold -> threshold [d_sae]
    clamp_threshold: bool = False  # SAELens gates with max(threshold, 0)
    saelens_tensors: frozenset[str] | None = None  # names expected in a plain SAELens file

    @property
    def folds(self) -> bool:
        return self.fold_decoder_norms or self.activation_scale is not None

def _fail(path: Path, what: str) -> SAEError:
    return SAEError(f"{path}: {what}")

def _int(d: dict[str, Any], key: str, path: Path) -> int:
    v = d.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise _fail(path, f"'{key}' must be a positive integer, got {v!r}; the file is not an SAE config")
    return v

def _bool(d: dict[str, Any], key: str, default: bool, path: Path) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise _fail(path, f"'{key}' must be true or false, got {v!r}")
    return v

def _major_version(version: Any) -> int | None:
    m = re.match(r"\s*v?(\d+)", str(version)) if version else None
    return int(m.group(1)) if m else None

def _check_keys(d: dict[str, Any], arch: str, path: Path, allowed_extra: frozenset[str] = frozenset()) -> None:
    """Refuse every key that is neither understood nor known to leave encode/decode unchanged."""
    allowed = _BASE_KEYS | _ARCH_KEYS[arch] | _TRAINING_ONLY_KEYS | _METADATA_KEYS | allowed_extra
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise _fail(
            path,
            f"keys {unknown} are not understood by saecircuits for a {arch!r} SAE; they may change how the SAE "
            "encodes or decodes, so it is not loaded (if you know a key is only a training or provenance setting, "
            "remove it from cfg.json)",
        )

def _layer_of(hook: Any) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook) if isinstance(hook, str) else None
    return int(m.group(1)) if m else None

def _from_pre6(d: dict[str, Any], path: Path) -> dict[str, Any]:
    """A cfg.json without a 6.x version marker, put in the 6.x shape as SAELens' converter does
    (``handle_pre_6_0_config``): ``hook_point`` -> ``hook_name``, ``activation_fn_str`` + ``activation_fn_kwargs``
    -> ``architecture`` (+ ``k``), boolean ``normalize_activations`` -> ``"expected_average_only_in"``/``"none"``,
    ``reshape_activations = "hook_z"`` when the hook name has ``hook_z``, provenance keys into ``metadata``. The
    training keys (:data:`_PRE6_TRAINING_KEYS`) go under ``"_pre6_training"``; the layer keys are dropped (a layer
    that disagrees with the hook name is logged: SAELens 6 drops them too).

    Raises:
        SAEError: an activation function, its arguments or a fine-tuning scale that saecircuits cannot reproduce.
    """
    new = {_PRE6_RENAMES.get(k, k): v for k, v in d.items()}
    training = {k: new.pop(k) for k in sorted(_PRE6_TRAINING_KEYS & set(new))}
    act = new.pop("activation_fn", None) or "relu"
    kwargs = new.pop("activation_fn_kwargs", None) or {}
    new.pop("dataset_trust_remote_code", None)
    arch = new.get("architecture", "standard")
    if act == "topk":
        if arch not in ("standard", "topk") or not isinstance(kwargs, dict) or set(kwargs) != {"k"}:
            raise _fail(path, f"activation_fn 'topk' needs activation_fn_kwargs {{'k': ...}} and a standard or topk "
                              f"architecture (got architecture {arch!r}, kwargs {kwargs!r}); the SAE is not loaded")
        new["architecture"], new["k"] = "topk", kwargs["k"]
    elif act != "relu":
        raise _fail(path, f"activation_fn {act!r} is not supported (only relu and topk); the SAE is not loaded")
    elif kwargs:
        raise _fail(path, f"activation_fn_kwargs {kwargs!r} are not understood for a relu SAE; not loaded")
    if new.pop("finetuning_scaling_factor", False):
        raise _fail(path, "finetuning_scaling_factor is true: a per-feature output scale is not supported "
                          "(SAELens 6 cannot load it either); not loaded")
    norm = new.get("normalize_activations")
    if isinstance(norm, bool):
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    metadata = dict(new.pop("metadata", None) or {})
    for key in _METADATA_KEYS & set(new):
        value = new.pop(key)
        if key in metadata and metadata[key] != value:
            raise _fail(path, f"'{key}' is {value!r} at the top level but {metadata[key]!r} in metadata; "
                              "fix the file so they agree")
        metadata[key] = value
    new["metadata"] = metadata
    hook = metadata.get("hook_name")
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in str(hook or "") else "none")
    for key in ("hook_layer", "hook_point_layer"):
        if key in training and _layer_of(hook) not in (None, training[key]):
            logger.warning("%s: %s=%r disagrees with the hook name %r; the hook name decides (as in SAELens 6)",
                           path, key, training[key], hook)
    new["_pre6_training"] = training
    return new

def _activation_scale(d: dict[str, Any], folder: Path, path: Path) -> float | None:
    norm = d.get("normalize_activations", "none")
    if norm in ("none", None, "layer_norm"):  # layer_norm is per token, inside the SAE (input_normalization)
        return None
    if norm != "expected_average_only_in":
        raise _fail(path, f"normalize_activations={norm!r} rescales every input at run time in a way saecircuits "
                          "does not reproduce; the SAE is not loaded")
    scaler = folder / SCALER_FILE
    if not scaler.is_file():
        raise _fail(path, f"normalize_activations='expected_average_only_in' but {SCALER_FILE} with the "
                          "scaling factor is not beside it; copy it from the SAELens checkpoint folder, or "
                          "use the final SAE of the run (its factor is folded in)")
    try:
        factor = json.loads(scaler.read_text()).get("scaling_factor")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise SAEError(f"{scaler} is not a SAELens activation scaler file ({e})") from e
    if factor is None:  # the factor was not estimated yet: SAELens scales nothing either
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
        math.isfinite(factor) and factor > 0
    ):
        raise SAEError(f"{scaler}: scaling_factor must be a positive number, got {factor!r}")
    return float(factor)

def _saelens_model_processing(metadata: dict[str, Any], pre6: bool, hook: str, path: Path) -> dict[str, bool] | None:
    """The TransformerLens weight-processing switches a SAELens SAE's activations were taken under.

    SAELens loads its model with ``HookedTransformer.from_pretrained(model_name, **model_from_pretrained_kwargs)``,
    so the switches are TransformerLens' defaults (fold_ln, center_writing_weights, fold_value_biases all true)
    overridden by that dict. A pre-6 file without the key was trained with the defaults (early SAELens passed no
    kwargs; v3 to v5 always wrote the key); a 6.x file without it, or an SAE on another model class, is not
    recorded (the run warns that it cannot check). Nothing is recorded for hooks no switch changes
    (``mlp.hook_post``).

    Raises:
        SAEError: ``model_from_pretrained_kwargs`` is not an object, or a switch in it is not a boolean.
    """
    from saecircuits.saes.processing import processing_switches

    if not processing_switches(hook):
        return None
    if metadata.get("model_class_name") not in (None, "HookedTransformer"):
        return None
    kwargs = metadata.get("model_from_pretrained_kwargs")
    if kwargs is None and not pre6:
        return None
    if not isinstance(kwargs or {}, dict):
        raise _fail(path, f"model_from_pretrained_kwargs must be an object, got {kwargs!r}")
    switches = dict(_TL_PROCESSING_DEFAULTS)
    for key in switches:
        if key in (kwargs or {}):
            if not isinstance(kwargs[key], bool):
                raise _fail(path, f"model_from_pretrained_kwargs.{key} must be true or false, got {kwargs[key]!r}")
            switches[key] = kwargs[key]
    return switches

def read_log_feature_density(folder: str | os.PathLike, d_sae: int | None = None) -> torch.Tensor | None:
    """SAELens' ``sparsity.safetensors`` beside an SAE: the log10 firing frequency of each feature, ``[d_sae]``
    (float64), or None when the folder has no such file.

    Raises:
        SAEError: the file is corrupt, holds no single ``sparsity`` vector, or its length is not ``d_sae``.
    """
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEError(f"{path} cannot be read as safetensors ({e}); the file is corrupt") from e
    t = tensors.get("sparsity")
    if t is None or len(tensors) != 1 or t.dim() != 1 or not t.is_floating_point():
        raise SAEError(f"{path} must hold one float vector named 'sparsity' (log10 feature densities), got "
                       f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    if d_sae is not None and t.numel() != d_sae:
        raise SAEError(f"{path}: 'sparsity' has {t.numel()} entries but the SAE has d_sae={d_sae} features; the "
                       "file belongs to another SAE")
    if bool(torch.isnan(t).any()) or bool((t > 0).any()):
        raise SAEError(f"{path}: 'sparsity' must hold log10 frequencies (<= 0, not NaN); the file is corrupt")
    return t.double()

def _saelens_config(d: dict[str, Any], folder: Path, path: Path) -> tuple[SAEConfig, _Plan]:
    """Our config and load plan for a cfg.json written by SAELens (see the module docstring)."""
    version = d.get("sae_lens_version") or (d.get("metadata") or {}).get("sae_lens_version")
    major = _major_version(version)
    pre6 = major is None or major < 6
    pre6_training: dict[str, Any] = {}
    if pre6:
        d = _from_pre6(d, path)
        pre6_training = d.pop("_pre6_training")
    saelens_arch = d.get("architecture", "standard")
    if saelens_arch not in _ARCHITECTURES and saelens_arch not in _TRANSCODERS:
        raise _fail(path, f"SAELens architecture {saelens_arch!r} is not supported; saecircuits reads "
                          f"{list(_ARCHITECTURES) + list(_TRANSCODERS)}")
    transcoder = saelens_arch in _TRANSCODERS
    arch, skip = _TRANSCODERS.get(saelens_arch, (saelens_arch, False))
    _check_keys(d, saelens_arch, path)
    metadata = d.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "'metadata' must be a JSON object")
    hook = metadata.get("hook_name")
    if not hook or not isinstance(hook, str):
        raise _fail(path, "lacks the hook name (metadata.hook_name, or hook_name / hook_point before SAELens 6); "
                          "it is not an SAELens cfg.json")
    if d.get("hook_name") not in (None, hook):
        raise _fail(path, f"'hook_name' is {d['hook_name']!r} at the top level but {hook!r} in metadata")
    for key in ("hook_head_index", "hook_head_index_out"):
        if metadata.get(key) is not None or d.get(key) is not None:
            raise _fail(path, f"{key}={metadata.get(key, d.get(key))!r}: SAEs on one attention head are not "
                              "supported; the SAE is not loaded")
    hook_out = metadata.get("hook_name_out")
    if transcoder and (not hook_out or not isinstance(hook_out, str)):
        raise _fail(path, f"a {saelens_arch!r} lacks metadata.hook_name_out (the hook it writes, e.g. "
                          "blocks.L.hook_mlp_out); add it to cfg.json")
    if not transcoder and hook_out not in (None, hook):
        raise _fail(path, f"hook_name_out={hook_out!r} on a {saelens_arch!r} SAE (not a transcoder class); the file "
                          "is inconsistent, so the SAE is not loaded")
    reshape = d.get("reshape_activations") or "none"
    norm = d.get("normalize_activations") or "none"
    if reshape not in ("none", "hook_z"):
        raise _fail(path, f"reshape_activations={reshape!r} is not supported (none, hook_z); the SAE is not loaded")
    if transcoder and (reshape != "none" or norm != "none"):
        key, value = ("reshape_activations", reshape) if reshape != "none" else ("normalize_activations", norm)
        raise _fail(path, f"{key}={value!r} on a transcoder: SAELens' transcoders do not reshape or normalise their "
                          "input consistently with their output, so saecircuits does not load it")
    d_in, d_sae = _int(d, "d_in", path), _int(d, "d_sae", path)
    d_out = _int(d, "d_out", path) if transcoder else None
    try:
        dtype = dtype_name(d.get("dtype", "float32"))
    except SAEError as e:
        raise _fail(path, str(e)) from None
    plan = _Plan(activation_scale=_activation_scale(d, folder, path), saelens_tensors=_SAELENS_TENSORS[saelens_arch])
    extra: dict[str, Any] = {}
    if skip:
        extra["skip_connection"] = True
    if norm == "layer_norm":
        extra["input_normalization"] = "layer_norm"  # SAELens' run_time_activation_ln_in: eps 1e-5, unbiased std
    if reshape == "hook_z":
        extra["reshape_activations"] = "hook_z"
    if arch in ("topk", "batchtopk"):
        k = d.get("k", 100)  # SAELens' default
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool):
            raise _fail(path, f"k={k!r} is not a whole number of features, which saecircuits' {arch} SAE "
                              "needs; the SAE is not loaded")
        extra["k"] = k
        # SAELens' defaults: False for the TopK inference config, True for the (training-only) BatchTopK one
        plan.fold_decoder_norms = _bool(d, "rescale_acts_by_decoder_norm", arch == "batchtopk", path)
    if arch == "batchtopk":
        extra["threshold_lr"] = d.get("topk_threshold_lr", 0.01)
        plan.topk_threshold = True
    if arch == "jumprelu":
        plan.clamp_threshold = True  # ReLU(h) * (h > threshold) == h * (h > max(threshold, 0))
        for ours, theirs in (("bandwidth", "jumprelu_bandwidth"), ("threshold_init", "jumprelu_init_threshold")):
            if theirs in d:
                extra[ours] = d[theirs]
            elif theirs in pre6_training:
                extra[ours] = pre6_training[theirs]
    training = {**pre6_training, **{k: d[k] for k in sorted(_TRAINING_ONLY_KEYS & set(d))}}
    extra["saelens"] = {"metadata": metadata, "architecture": saelens_arch,
                        **({"training": training} if training else {})}
    if plan.fold_decoder_norms:
        extra["saelens"]["folded_decoder_norms"] = True
    if plan.activation_scale is not None:
        extra["folded_activation_scale"] = plan.activation_scale
    if read_log_feature_density(folder, d_sae) is not None:
        extra["saelens"]["feature_density_file"] = SPARSITY_FILE
    processing = _saelens_model_processing(metadata, pre6, hook, path)
    if processing is not None:
        extra["model_processing"] = processing
    extra["basis"] = {"input": f"TransformerLens activations at {hook}"
                      + (" (heads flattened)" if reshape == "hook_z" else "")
                      + (", normalised per token inside the SAE" if norm == "layer_norm" else ""),
                      "norm_weight_applied": False}
    apply_b_dec = _bool(d, "apply_b_dec_to_input", not transcoder, path)
    if transcoder and apply_b_dec:
        raise _fail(path, "apply_b_dec_to_input is true on a transcoder, which SAELens refuses (b_dec is in the "
                          "output's space); the file is inconsistent")
    cfg = SAEConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        hook_point=hook,
        model_name=str(metadata.get("model_name") or ""),
        dtype=dtype,
        apply_b_dec_to_input=apply_b_dec,
        extra=extra,
        d_out=d_out,
        hook_point_out=hook_out if transcoder else None,
    )
    return cfg, plan

@torch.no_grad()
def _apply_plan(weights: dict[str, torch.Tensor], plan: _Plan, d_sae: int, path: Path) -> dict[str, torch.Tensor]:
    """Turn SAELens tensors into ours; checks the names SAELens 6.x itself would load.

    Only the tensors a fold rewrites are taken to float64 (and folded there); every other tensor is passed on as
    it was read (memory-mapped, in its stored dtype), so a 16-bit SAE is never copied to float64 or float32 whole.
    The threshold rewrites (broadcast, clamp at 0) are exact in any dtype.
    """
    weights = dict(weights)
    if "scaling_factor" in weights:  # SAELens drops an all-ones one and cannot load any other
        sf = weights.pop("scaling_factor")
        if not torch.all(sf == 1):
            raise _fail(path, "has a 'scaling_factor' tensor that is not all ones (a fine-tuning output scale), "
                              "which is not supported; the SAE is not loaded")
    if plan.saelens_tensors is not None:
        missing = sorted(plan.saelens_tensors - set(weights))
        unexpected = sorted(set(weights) - plan.saelens_tensors)
        if missing or unexpected:
            raise _fail(path, f"tensors do not match the cfg.json architecture (missing {missing}, unexpected "
                              f"{unexpected}); the weights do not belong to this cfg.json")
    folded = set()
    if plan.fold_decoder_norms:
        folded |= {"W_enc", "b_enc", "W_dec"}
    if plan.activation_scale is not None:
        folded |= {"W_enc", "W_dec", "b_dec"}
    w = {k: (v.double() if k in folded and v.is_floating_point() else v) for k, v in weights.items()}
    if plan.topk_threshold:
        t = w.pop("topk_threshold")
        if t.numel() != 1:
            raise _fail(path, f"topk_threshold has shape {tuple(t.shape)}, expected a single number")
        w["threshold"] = t.reshape(()).expand(d_sae).clone()
    if plan.clamp_threshold and "threshold" in w:
        w["threshold"] = w["threshold"].clamp_min(0.0)
    if plan.fold_decoder_norms:
        norms = w["W_dec"].norm(dim=1)
        if not bool(torch.all(norms > 0)):
            raise _fail(path, "rescale_acts_by_decoder_norm is true but some W_dec rows are zero; the decoder "
                              "norms cannot be folded")
        w["W_enc"] = w["W_enc"] * norms[None, :]
        w["b_enc"] = w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / norms[:, None]
    if plan.activation_scale is not None:
        s = plan.activation_scale
        w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"] * s, w["W_dec"] / s, w["b_dec"] / s
    return w
