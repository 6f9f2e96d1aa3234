"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``), every version (v1 to v6, transcoders included), and
saecircuits' own SAEs (the same layout with a ``"saecircuits"`` block).

Reading is :func:`saecircuits.saes.io.load_sae`; its module docstring has the keys, tensors and maths of each
version. In short:

* **Files.** ``cfg.json``, ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``,
  ``b_dec``; ``threshold`` for JumpReLU; ``b_gate``, ``b_mag``, ``r_mag`` for gated; ``W_skip [d_out, d_in]`` for
  skip transcoders), optional ``sparsity.safetensors`` (log10 feature densities, :func:`feature_density`).
* **Versions.** No ``sae_lens_version`` (or one below 6) is read as SAELens' own converter reads it (``hook_point``,
  ``hook_point_layer``, ``hook_layer``, ``hook_point_head_index``, ``activation_fn_str`` + ``activation_fn_kwargs``,
  boolean ``normalize_activations``, ``dtype: "torch.float32"``); the training keys of every release are known and
  kept as provenance; an unknown key is refused, naming it.
* **Maths.** ``pre = (norm(x) - b_dec*[apply_b_dec_to_input]) @ W_enc + b_enc``; standard ReLU, TopK (top k then
  ReLU), JumpReLU ``ReLU(pre)*[pre > threshold]``, gated; ``normalize_activations="layer_norm"`` is the per-token
  normalisation inside the SAE (``input_normalization``); ``reshape_activations="hook_z"`` flattens heads.
  Transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``): no
  ``b_dec`` subtraction, output ``f @ W_dec + b_dec (+ x @ W_skip.T)`` on ``metadata.hook_name_out``.
* **Site.** The hook name is a TransformerLens hook already; it is recorded in ``cfg.extra["source"]["site"]``.
* **Basis.** ``cfg.extra["model_processing"]``: TransformerLens' ``from_pretrained`` defaults (fold_ln,
  center_writing_weights, fold_value_biases true) overridden by ``model_from_pretrained_kwargs`` (pre-6 files
  without the key: the defaults; 6.x files without it: not recorded). gpt2-small-res-jb thus expects
  ``center_writing_weights=True``; SAELens 3+ runs wrote ``{"center_writing_weights": false}``.
* **Refused.** ``constant_norm_rescale``, a non-null head index, a ``finetuning_scaling_factor``, activation
  functions other than relu/topk, architectures other than those above, a transcoder that normalises or reshapes
  its input, a ``scaling_factor`` tensor that is not all ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from saecircuits.saes import io
from saecircuits.saes.base import SAE
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook

__all__ = ["feature_density", "log_feature_density"]


def log_feature_density(path: str | os.PathLike, d_sae: int | None = None) -> torch.Tensor | None:
    """The log10 firing frequency of each feature, ``[d_sae]`` float64, from the ``sparsity.safetensors`` SAELens
    saves beside an SAE (``path`` = the SAE folder), or None when the folder has none.

    Raises:
        SAEError: the file is corrupt, holds anything but one ``sparsity`` vector, or has not ``d_sae`` entries.
    """
    return io.read_log_feature_density(path, d_sae)


def feature_density(path: str | os.PathLike, d_sae: int | None = None) -> torch.Tensor | None:
    """The firing frequency of each feature (fraction of training tokens, ``10 ** sparsity``), ``[d_sae]`` float64,
    or None when the SAE folder ``path`` has no ``sparsity.safetensors``. A loaded SAE whose folder has the file
    says so in ``cfg.extra["saelens"]["feature_density_file"]``.

    Raises:
        SAEError: as :func:`log_feature_density`.
    """
    log10 = log_feature_density(path, d_sae)
    return None if log10 is None else torch.pow(10.0, log10)


def _detect(path: Path) -> bool:
    return path.is_dir() and (path / io.CFG_FILE).is_file() and (path / io.WEIGHTS_FILE).is_file()


def _load(path: Path, options: LoadOptions) -> SAE:
    sae = io.load_sae(path, device=options.device)
    resolve_hook(sae.hook_point, options.hook, path, what="cfg.json's hook name")
    source = dict(sae.cfg.extra.get("source") or {})
    source.setdefault("site", sae.hook_point if not sae.is_transcoder else f"{sae.hook_point} -> {sae.hook_point_out}")
    sae.cfg.extra["source"] = source
    return sae


register_family(Family("saelens", "SAELens (v1 to v6) and saecircuits", _detect, _load,
                       "a folder with cfg.json + sae_weights.safetensors",
                       pairs=((io.CFG_FILE, io.WEIGHTS_FILE),)))
