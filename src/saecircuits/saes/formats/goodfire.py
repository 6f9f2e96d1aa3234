"""Goodfire's SAEs (``Goodfire/Llama-3.1-8B-Instruct-SAE-l19``, ``Goodfire/Llama-3.3-70B-Instruct-SAE-l50``).

Files
    One ``torch.save`` state dict, ``{Model}-SAE-l{layer}.pth`` (or ``.pt``, as the 70B one), no config. Read with
    ``torch.load(weights_only=True)`` (tensors only). The path may be the file or a folder holding exactly one such
    file (a downloaded repository).

State dict (nn.Linear orientation)
    ``encoder_linear.weight [F, d]``, ``encoder_linear.bias [F]``, ``decoder_linear.weight [d, F]``,
    ``decoder_linear.bias [d]``.

Maths (Goodfire's ``SparseAutoEncoder``; SAELens' ``goodfire`` converter: ``apply_b_dec_to_input: false``)
    ``f = relu(x @ encoder_linear.weight.T + encoder_linear.bias)`` (**no b_dec subtraction**),
    ``recon = f @ decoder_linear.weight.T + decoder_linear.bias``.

Site
    The file name's ``-l{L}`` is the layer whose output (the residual stream after block L,
    ``blocks.L.hook_resid_post``)
    the SAE reads; the model is named by the file name's prefix (``Llama-3.1-8B-Instruct`` ->
    ``meta-llama/Llama-3.1-8B-Instruct``). Without ``-l{L}`` in the name, ``hook=`` must say.

Basis recorded
    Trained on the unprocessed Hugging Face model: ``model_processing = {"center_writing_weights": False}`` (a
    residual value does not depend on ``fold_ln``; Llama's RMSNorm makes TransformerLens skip centring anyway);
    ``basis = {"input": "resid_post of the unprocessed model", "norm_weight_applied": False}``.

Refused: other entries, transposed or square matrices, files a weights-only load refuses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook
from saecircuits.saes.formats.common import build_from_tensors, one_dtype, read_torch
from saecircuits.saes.formats.gemma_scope import oriented, refuse_square_encoder
from saecircuits.saes.sites import raw_model_processing

_NAME = re.compile(r"^(?P<model>.+?)-SAE-l(?P<layer>\d+)\.pth?$")
_TENSORS = ("encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias")


def _is_goodfire_file(p: Path) -> bool:
    return p.is_file() and (p.suffix == ".pth" or (p.suffix == ".pt" and bool(_NAME.match(p.name))))


def _file(path: Path) -> Path | None:
    if _is_goodfire_file(path):
        return path
    if path.is_dir():
        found = [p for p in path.iterdir() if _is_goodfire_file(p)]
        if len(found) == 1:
            return found[0]
    return None


def _detect(path: Path) -> bool:
    return _file(path) is not None


def _load(path: Path, options: LoadOptions) -> SAE:
    file = _file(path)
    if file is None:
        raise SAEError(f"{path}: no Goodfire SAE file (…-SAE-l{{layer}}.pth) found")
    sd = read_torch(file)
    if (not isinstance(sd, dict) or set(sd) != set(_TENSORS)
            or not all(isinstance(v, torch.Tensor) for v in sd.values())):
        keys = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        raise SAEError(f"{file}: holds {keys}, not a Goodfire SAE state dict ({list(_TENSORS)}); saecircuits does "
                       "not know its maths")
    enc_b, dec_b = sd["encoder_linear.bias"], sd["decoder_linear.bias"]
    if enc_b.dim() != 1 or dec_b.dim() != 1:
        raise SAEError(f"{file}: encoder_linear.bias and decoder_linear.bias must be vectors")
    f, d = enc_b.shape[0], dec_b.shape[0]
    refuse_square_encoder(d, f, file)
    enc = oriented(sd["encoder_linear.weight"], (f, d), "encoder_linear.weight", file, "[d_sae, d] (nn.Linear)")
    dec = oriented(sd["decoder_linear.weight"], (d, f), "decoder_linear.weight", file, "[d, d_sae] (nn.Linear)")
    dtype = one_dtype(sd, file)
    m = _NAME.match(file.name)
    found = f"blocks.{int(m.group('layer'))}.hook_resid_post" if m else None
    hook = resolve_hook(found, options.hook, file, what="the file name (-l{layer})")
    model_name = options.model_name or (f"meta-llama/{m.group('model')}" if m else "")
    extra = {"model_processing": raw_model_processing(hook),
             "basis": {"input": f"{hook.rsplit('.', 1)[-1]} of the unprocessed model", "norm_weight_applied": False},
             "source": {"family": "goodfire", "path": str(file), "site": "resid_post" if m else None,
                        "layer": int(m.group("layer")) if m else None}}
    cfg = SAEConfig(architecture="standard", d_in=d, d_sae=f, hook_point=hook, model_name=model_name,
                    dtype=dtype_name(dtype), apply_b_dec_to_input=False, extra=extra)
    return build_from_tensors(cfg, {"W_enc": enc.T, "W_dec": dec.T, "b_enc": enc_b, "b_dec": dec_b}, file,
                              options.device)


register_family(Family("goodfire", "Goodfire", _detect, _load, "{Model}-SAE-l{layer}.pth (a torch state dict)"))
