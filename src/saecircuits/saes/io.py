"""SAEs on disk: the SAELens 6.x folder layout (both ways), and the reference notebook's checkpoint format.

SAELens layout (``save_sae`` / ``load_sae``)::

    folder/cfg.json                   SAELens 6.x keys + ours under "saecircuits" (the full SAEConfig)
    folder/sae_weights.safetensors    W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
                                      (+ threshold [d_sae] for jumprelu / batchtopk)

What SAELens 6.x does with such a folder (``SAE.load_from_disk``; ``sae_lens/saes/sae.py`` and
``sae_lens/loading/pretrained_sae_loaders.py``), and so what :func:`save_sae` writes:

* ``metadata.sae_lens_version`` (or a top-level ``sae_lens_version``) of 6.0 or later marks the current layout;
  without it SAELens converts the file as a pre-6 layout and rebuilds ``metadata`` from top-level keys, losing the
  model name. We write ``"6.0.0"``, the layout version we follow, plus ``metadata.model_name``,
  ``metadata.hook_name`` and ``metadata.hook_head_index = null``.
* ``architecture`` picks the inference class: ``standard``, ``topk`` (``k``, ``rescale_acts_by_decoder_norm``),
  ``jumprelu`` (tensor ``threshold``). SAELens has no inference class for ``batchtopk``: it writes its own BatchTopK
  SAEs for inference as ``jumprelu`` with the per-feature threshold, and so do we (our block keeps it BatchTopK).
* ``dtype`` (``"float32"``; SAELens 6.18 wrote ``"torch.float32"`` after a ``.to()``, both are read) is the
  dtype every tensor is cast to; ``apply_b_dec_to_input`` subtracts ``b_dec`` before encoding;
  ``normalize_activations`` ``"none"`` (others need scaling at run time); ``reshape_activations`` ``"none"``.
  Other keys are dropped by SAELens (its config dataclasses filter them), so our ``"saecircuits"`` block is
  invisible to it, and a file SAELens re-saves no longer has it.

What :func:`load_sae` accepts from a plain SAELens folder (every version), and how it reads it, is in
:mod:`saecircuits.saes.saelens_config`.

Tensors a fold rewrites are folded in float64; the SAE is built in the dtype its weights are stored in (float32 at
least when a fold was applied), so loading never rounds stored weights. The weights file is memory-mapped and the
SAE's matrices are allocated unwritten (:func:`build_empty_sae`), so a bfloat16 SAE is copied once, into its own
bfloat16 parameters: no float32 or float64 copy of its tensors is made unless a fold needs it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from saecircuits.atomic import atomic_write
from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name, torch_dtype
from saecircuits.saes.registry import build_sae
from saecircuits.saes.saelens_config import (  # noqa: F401  (SPARSITY_FILE, read_log_feature_density: public here too)
    _ARCH_KEYS,
    _CORE,
    _EXTRA_KEYS,
    SPARSITY_FILE,
    _apply_plan,
    _check_keys,
    _fail,
    _Plan,
    _saelens_config,
    read_log_feature_density,
)

logger = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: version of our "saecircuits" block: 1 = first layout (batchtopk written as "batchtopk"); 2 = SAELens 6.x metadata,
#: batchtopk written as "jumprelu", every architecture setting recorded.
FORMAT_VERSION = 2
#: the SAELens on-disk layout version our files follow (written as metadata.sae_lens_version).
SAELENS_LAYOUT_VERSION = "6.0.0"


_atomic_write = atomic_write


# --------------------------------------------------------------------------------------------------- writing
def _core_dtype(sae: SAE) -> str:
    dtypes = {name: getattr(sae, name).dtype for name in _CORE}
    if len(set(dtypes.values())) != 1:
        raise SAEError(
            f"SAE parameters have different dtypes {({k: str(v) for k, v in dtypes.items()})}; move the whole "
            "SAE with sae.to(dtype) instead of assigning .data, then save it"
        )
    return dtype_name(dtypes["W_enc"])


def sae_cfg_json(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` dict of ``sae``: SAELens 6.x keys (see the module docstring) + ``"saecircuits"``.

    ``dtype`` is read from the parameters themselves, so it is right whatever happened to the SAE.

    Raises:
        SAEError: ``W_enc, W_dec, b_enc, b_dec`` do not share one supported dtype.
    """
    cfg = sae.cfg
    dtype = _core_dtype(sae)
    ours = cfg.to_dict()
    ours["dtype"] = dtype
    arch = cfg.architecture
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "sae_lens_training_version": None,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_point,
        "hook_head_index": None,
        "training_architecture": arch,
    }
    if arch == "batchtopk":
        metadata["training_architecture_details"] = {
            "k": cfg.extra.get("k"),
            "topk_threshold_lr": cfg.extra.get("threshold_lr"),
        }
    elif arch == "jumprelu":
        metadata["training_architecture_details"] = {
            "jumprelu_bandwidth": cfg.extra.get("bandwidth"),
            "jumprelu_init_threshold": cfg.extra.get("threshold_init"),
        }
    # SAELens writes its BatchTopK SAEs for inference as JumpReLU with the per-feature threshold
    saelens_arch = "jumprelu" if arch == "batchtopk" else arch
    if sae.is_transcoder or sae.skip_connection:
        saelens_arch = _saelens_transcoder_architecture(sae)
        metadata["hook_name_out"] = sae.hook_point_out
        metadata["hook_head_index_out"] = None
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",  # where the tensors in the file live; SAELens replaces it by its device argument
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        # SAELens' "layer_norm" is OpenAI's per-token normalisation (centre, divide by the unbiased std + 1e-5)
        "normalize_activations": "layer_norm" if sae.input_normalization == "layer_norm" else "none",
        "reshape_activations": sae.reshape_activations,
        "metadata": metadata,
        "architecture": saelens_arch,
    }
    if sae.d_out != sae.d_in or sae.is_transcoder:
        out["d_out"] = sae.d_out
    if arch == "topk":
        if not sae.topk_relu:
            raise SAEError("a TopK SAE that keeps negative top-k values (topk_relu=False, circuit-tracer's TopK) has "
                           "no SAELens 6 equivalent (its TopK applies ReLU), so it is not written in that layout")
        out["k"] = cfg.extra["k"]
        out["rescale_acts_by_decoder_norm"] = False
    out["saecircuits"] = {"format_version": FORMAT_VERSION, "config": ours}
    return out


def _saelens_transcoder_architecture(sae: SAE) -> str:
    """SAELens 6's name of a transcoder's inference class (``transcoder``, ``skip_transcoder``,
    ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``).

    Raises:
        SAEError: an activation SAELens has no transcoder class for (TopK, gated).
    """
    arch = "jumprelu" if sae.architecture == "batchtopk" else sae.architecture
    if arch not in ("standard", "jumprelu"):
        raise SAEError(f"SAELens 6 has no {arch!r} transcoder class, so this transcoder cannot be written in its "
                       "layout; keep the source files")
    return ("jumprelu_" if arch == "jumprelu" else "") + ("skip_transcoder" if sae.skip_connection else "transcoder")


def save_sae(sae: SAE, folder: str | os.PathLike) -> Path:
    """Write ``sae`` in the SAELens 6.x layout to ``folder`` (created if needed); returns the folder.

    SAELens 6.x loads the folder with ``SAE.load_from_disk`` (a BatchTopK SAE as the JumpReLU SAE it is at
    inference), and reads back the hook name, model name and dtype. Tensors are written in their own dtypes
    (thresholds at least float32), so :func:`load_sae` gives back exactly the same SAE. Each file is written
    atomically (temp file, then ``os.replace``); the weights are written before ``cfg.json``, so a folder with a
    ``cfg.json`` always has the weights it describes.

    Raises:
        SAEError: ``cfg.extra`` is not JSON-serialisable, or the parameters do not share one dtype.
    """
    folder = Path(folder)
    cfg_dict = sae_cfg_json(sae)
    try:
        cfg_text = json.dumps(cfg_dict, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SAEError(
            f"SAE config of {folder} is not JSON-serialisable ({e}); keep cfg.extra to plain values"
        ) from e
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.cpu() for k, v in sae.export_weights().items()}
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CFG_FILE, lambda tmp: Path(tmp).write_text(cfg_text + "\n"))
    return folder


def _own_config(d: dict[str, Any], path: Path) -> SAEConfig:
    """Our config from the ``"saecircuits"`` block, checked against the SAELens keys beside it."""
    ours = d["saecircuits"]
    if not isinstance(ours, dict) or "config" not in ours:
        raise _fail(path, "the 'saecircuits' entry is invalid; re-save the SAE")
    version = ours.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _fail(path, f"format_version {version!r} is newer than this saecircuits reads ({FORMAT_VERSION}); "
                          "update saecircuits")
    try:
        cfg = SAEConfig.from_dict(dict(ours["config"]))
    except (TypeError, SAEError) as e:
        raise _fail(path, f"the 'saecircuits.config' entry is invalid ({e}); re-save the SAE") from e
    arch = cfg.architecture
    if arch == "jumprelu" and version == 1:
        # format 1 recorded only what the user gave: the training settings left out were that version's defaults
        from saecircuits.saes.jumprelu import FORMAT_1_DEFAULTS

        cfg.extra = {**FORMAT_1_DEFAULTS, **cfg.extra}
    if arch not in _ARCH_KEYS:
        return cfg  # an architecture registered by the user: build_sae says whether it exists
    unknown = sorted(set(cfg.extra) - _EXTRA_KEYS[arch])
    if unknown:
        raise _fail(path, f"'saecircuits.config.extra' has keys {unknown} that a {arch!r} SAE does not use (it uses "
                          f"{sorted(_EXTRA_KEYS[arch])}); they may be settings of a newer saecircuits or of another "
                          "architecture, so the SAE is not loaded: remove them or update saecircuits")
    saelens_arch = d.get("architecture")
    expected = {arch, "jumprelu"} if arch == "batchtopk" else {arch}
    transcoder = cfg.hook_point_out is not None or bool(cfg.extra.get("skip_connection"))
    if transcoder:
        base = "jumprelu" if arch in ("jumprelu", "batchtopk") else arch
        expected = {("jumprelu_" if base == "jumprelu" else "")
                    + ("skip_transcoder" if cfg.extra.get("skip_connection") else "transcoder")}
    metadata = d.get("metadata") or {}
    # the SAELens keys are what other tools read: they must say the same as our block
    checks: list[tuple[str, Any, Any]] = [
        ("architecture", saelens_arch, saelens_arch if saelens_arch in expected else sorted(expected)),
        ("d_in", d.get("d_in"), cfg.d_in),
        ("d_sae", d.get("d_sae"), cfg.d_sae),
        ("d_out", d.get("d_out", cfg.d_in), cfg.d_out or cfg.d_in),
        ("apply_b_dec_to_input", d.get("apply_b_dec_to_input", True), cfg.apply_b_dec_to_input),
        ("normalize_activations", d.get("normalize_activations") or "none",
         cfg.extra.get("input_normalization", "none")),
        ("reshape_activations", d.get("reshape_activations") or "none", cfg.extra.get("reshape_activations", "none")),
        ("rescale_acts_by_decoder_norm", bool(d.get("rescale_acts_by_decoder_norm", False)), False),
        ("hook_name", metadata.get("hook_name", d.get("hook_name")), cfg.hook_point),
        ("hook_name_out", metadata.get("hook_name_out") or cfg.hook_point, cfg.hook_point_out or cfg.hook_point),
    ]
    if "k" in d:
        checks.append(("k", d["k"], cfg.extra.get("k")))
    try:
        checks.append(("dtype", dtype_name(d.get("dtype", cfg.dtype)), cfg.dtype))
    except SAEError:
        checks.append(("dtype", d.get("dtype"), cfg.dtype))
    for key, theirs, mine in checks:
        if theirs != mine:
            raise _fail(
                path,
                f"'{key}' is {theirs!r} in the SAELens keys but {mine!r} in the 'saecircuits' block: the file "
                "was changed by another tool; re-save it with save_sae, or delete the 'saecircuits' block to "
                "read it as a plain SAELens file",
            )
    _check_keys(d, arch if transcoder else saelens_arch, path,
                allowed_extra=frozenset({"saecircuits", "hook_name"} | ({"d_out"} if transcoder else set())))
    return cfg


def _stored_dtype(weights: dict[str, torch.Tensor]) -> torch.dtype | None:
    """dtype the core tensors are stored in (the most precise one if they differ); None if any is missing."""
    if not all(k in weights and weights[k].is_floating_point() for k in _CORE):
        return None
    dtypes = {weights[k].dtype for k in _CORE}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_weights(sae: SAE, weights: dict[str, torch.Tensor], path: Path, fix: str | None = None) -> None:
    """Every tensor ``sae`` needs is in ``weights``, with its shape, a floating dtype and finite values; nothing else
    is. One check for every family (:func:`saecircuits.saes.formats.common.check_shapes` is this one): a NaN or inf
    weight gives NaN losses that the report would show as undefined with every check passed.

    Raises:
        SAEError: naming the file, the tensor, its shape and the expected one (and ``fix``, what to do).
    """
    then = f"; {fix}" if fix else ""
    expected = sae.expected_weight_shapes()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise SAEError(
            f"{path}: tensors do not match a {sae.architecture!r} SAE with d_in={sae.d_in}, d_sae={sae.d_sae} "
            f"(missing {missing}, unexpected {unexpected}){then}"
        )
    for name, shape in expected.items():
        t = weights[name]
        if tuple(t.shape) != shape:
            raise SAEError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape} (d_in={sae.d_in}, "
                           f"d_sae={sae.d_sae}, d_out={sae.d_out}){then}")
        if not t.is_floating_point():
            raise SAEError(f"{path}: {name} has dtype {t.dtype}, expected floating point{then}")
        if not bool(torch.isfinite(t).all()):
            raise SAEError(f"{path}: {name} holds NaN or infinite values; the file is corrupt{then}")


def find_sae_folders(root: str | os.PathLike, max_depth: int = 4) -> list[Path]:
    """SAE folders (holding ``cfg.json`` and the weights) at most ``max_depth`` levels below ``root``, sorted.

    A run's cache folder (``WORKSPACE/saes/<key>``) holds one per hook point: ``<hook>/sae``."""
    root = Path(root)
    found = []
    for cfg in sorted(root.glob("/".join(["**"]) + f"/{CFG_FILE}")):
        rel = cfg.parent.relative_to(root)
        if rel.parts and len(rel.parts) <= max_depth and (cfg.parent / WEIGHTS_FILE).is_file():
            found.append(cfg.parent)
    return found


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by :func:`save_sae` (any format version) or by SAELens 6.x onto ``device``.

    A folder with our ``"saecircuits"`` block is rebuilt from it (its SAELens keys must agree with it); a plain
    SAELens folder is read as the module docstring describes, with exactly SAELens' maths, or refused. The SAE
    is built in the dtype its weights are stored in (so nothing is rounded; ``cfg.dtype`` says which), and
    returned in eval mode.

    Raises:
        SAEError: the folder or a file is missing, ``cfg.json`` is not valid JSON, lacks keys, has a key that
            changes the maths in a way saecircuits does not reproduce (named in the message), the weights file is
            corrupt, or tensor names/shapes do not match the config; the message names the file.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise SAEError(f"SAE folder {folder} does not exist; pass the folder that save_sae wrote")
    if not cfg_path.is_file():
        below = find_sae_folders(folder)
        if below:
            shown = ", ".join(str(p) for p in below[:8]) + (f" (and {len(below) - 8} more)" if len(below) > 8 else "")
            raise SAEError(f"{folder} is not an SAE folder but holds {len(below)} below it: {shown}; pass one of them")
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
    for key in ("metadata", "saecircuits"):  # read with .get() below: a list there raised AttributeError
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise SAEError(f"{cfg_path}: '{key}' must be a JSON object, got {type(d[key]).__name__}; the file is not "
                           "an SAE config: re-save the SAE")
    if "saecircuits" in d:
        cfg, plan = _own_config(d, cfg_path), _Plan()
    else:
        cfg, plan = _saelens_config(d, folder, cfg_path)
    try:
        weights = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEError(
            f"{w_path} cannot be read as safetensors ({e}); the file is corrupt: re-save the SAE"
        ) from e
    stored = _stored_dtype(weights)
    if stored is not None:
        if plan.folds and stored in (torch.float16, torch.bfloat16):
            stored = torch.float32  # folded values are not representable in 16 bits: keep them exact
        if stored != torch_dtype(cfg.dtype):
            logger.warning(
                "%s says dtype %s but its weights are stored as %s; building the SAE in %s so nothing is rounded",
                cfg_path, cfg.dtype, dtype_name(stored), dtype_name(stored),
            )
            cfg.dtype = dtype_name(stored)
    weights = _apply_plan(weights, plan, cfg.d_sae, w_path)
    try:
        sae = build_empty_sae(cfg)
    except SAEError as e:  # e.g. a topk k outside 1..d_sae: say which file holds it
        raise SAEError(f"{cfg_path}: {e}") from None
    check_weights(sae, weights, w_path, "the weights do not belong to this cfg.json: re-save the SAE")
    sae.import_weights_(weights)
    return sae.to(device).eval()


#: the weight matrices every architecture's ``import_weights_`` writes whole (``SAE.import_weights_``); they are
#: left unwritten by :func:`build_empty_sae`, every other parameter and buffer is zeroed.
_WRITTEN_BY_IMPORT = frozenset({"W_enc", "W_dec", "W_skip"})


def build_empty_sae(cfg: SAEConfig) -> SAE:
    """An SAE of ``cfg`` on the CPU, ready for ``import_weights_`` right after, without writing its big matrices.

    ``build_sae(cfg, initialize=False)`` fills every parameter with zeros, which makes the whole ``[d_in, d_sae]``
    and ``[d_sae, d_out]`` matrices resident before the weights are copied in; here the SAE is built on the meta
    device and each tensor is then given uninitialised storage (``torch.empty``), so each matrix's memory is first
    touched when its weights are copied into it. Vectors and buffers (biases, thresholds, counters: ``[d_sae]`` at most) are zeroed, so
    nothing an architecture's import does not write holds garbage; ``W_enc``/``W_dec``/``W_skip`` are always written.

    Raises:
        SAEError: as :func:`~saecircuits.saes.registry.build_sae` (unknown architecture, bad sizes).
    """
    with torch.device("meta"):
        sae = build_sae(cfg, initialize=False)
    # Module.to_empty would do the same, but its first torch.empty_like of a meta tensor costs ~0.8 s (it loads
    # torch's meta-tensor machinery); torch.empty of the same shape and dtype costs nothing.
    for module in sae.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                new = torch.empty(t.shape, dtype=t.dtype)
                if name not in _WRITTEN_BY_IMPORT or module is not sae:
                    new.zero_()
                table[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return sae


