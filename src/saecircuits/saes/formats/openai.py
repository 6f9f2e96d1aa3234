"""OpenAI ``sparse_autoencoder`` (Gao et al. 2024; the GPT-2 small SAEs of ``openai/sparse_autoencoder``).

Files
    ``{location}{,_v4,_v5_32k,_v5_128k}/autoencoders/{layer}.pt`` (``sparse_autoencoder/paths.py``), one
    ``torch.save(Autoencoder.state_dict())`` per layer. Read with ``torch.load(weights_only=True)``: the two
    non-tensor entries are a string and a dict of an int and a string, which PyTorch's weights-only unpickler
    accepts (it allows tensors, dicts, lists, strings and numbers, and refuses every other global), so no code in the
    file is ever run and no extra globals are allowed.

State dict (``sparse_autoencoder/model.py``)
    ``pre_bias [d]``, ``encoder.weight [F, d]`` (nn.Linear, no bias), ``latent_bias [F]``, ``decoder.weight [d, F]``
    (nn.Linear; absent when the decoder is tied, ``TiedTranspose``: then it is ``encoder.weight`` transposed), the
    statistics buffers ``stats_last_nonzero``, ``latents_activation_frequency``, ``latents_mean_square`` (ignored),
    ``activation`` (``"ReLU"`` | ``"TopK"``; missing means ReLU, as ``Autoencoder.from_state_dict``) and
    ``activation_state_dict`` (TopK: ``{"k": int, "postact_fn": "ReLU" | "Identity"}``).

Maths
    ``latents = act((x_n - pre_bias) @ encoder.weight.T + latent_bias)``; ``recons = latents @ decoder.weight.T +
    pre_bias``, de-normalised. TopK keeps the ``k`` largest pre-activations, then applies ``postact_fn`` (ReLU, or
    nothing: ``topk_relu=False``). ``from_state_dict`` normalises inputs exactly when the activation is TopK:
    ``x_n = (x - mean) / (std + 1e-5)`` per token (``std`` unbiased), ``recons = recons_n * std + mean``. That cannot be
    folded into weights, so such SAEs get ``input_normalization="layer_norm"``: our features are in activation units,
    ``f = latents * std`` (a positive per-token factor; the same features fire, ranked the same), and ``decode(f, x)``
    is exactly OpenAI's ``recons`` (see :class:`saecircuits.saes.base.SAE`). ReLU files are a standard SAE with
    ``b_dec = pre_bias`` subtracted before encoding.

Sites (:data:`saecircuits.saes.sites.OPENAI_LOCATIONS`)
    ``mlp_post_act`` -> ``blocks.L.mlp.hook_post``, ``resid_delta_attn`` -> ``blocks.L.hook_attn_out``,
    ``resid_delta_mlp`` -> ``blocks.L.hook_mlp_out``, ``resid_post_attn`` -> ``blocks.L.hook_resid_mid``,
    ``resid_post_mlp`` -> ``blocks.L.hook_resid_post``; from the path, or ``hook=`` when the path does not say.

Basis recorded
    The repository's README says to use TransformerLens with ``center_writing_weights=False``: residual-stream sites
    record ``{"center_writing_weights": False}`` (``mlp.hook_post`` depends on no switch, so nothing);
    ``basis = {"input": ..., "norm_weight_applied": False, "per_token_layer_norm": bool}``.

Refused: other activations or post-activations, unknown state-dict entries, transposed or square matrices, files a
weights-only load refuses (pickled code).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError, dtype_name
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook
from saecircuits.saes.formats.common import build_from_tensors, one_dtype, read_torch
from saecircuits.saes.formats.gemma_scope import oriented, refuse_square_encoder
from saecircuits.saes.sites import OPENAI_LOCATIONS, raw_model_processing

_PATH = re.compile(r"(?:^|/)(?P<location>" + "|".join(OPENAI_LOCATIONS) + r")(?P<version>_v4|_v5_32k|_v5_128k)?"
                   r"/autoencoders/(?P<layer>\d+)\.pt$")
_TENSORS = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"}
_STATS = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}
_OTHER = {"activation", "activation_state_dict"}
#: the input normalisation's epsilon in ``sparse_autoencoder.model.LN``.
LN_EPS = 1e-5


def _detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt" and (
        bool(re.fullmatch(r"\d+\.pt", path.name)) or path.parent.name == "autoencoders")


def _load(path: Path, options: LoadOptions) -> SAE:
    sd = read_torch(path)
    if not isinstance(sd, dict):
        raise SAEError(f"{path}: holds a {type(sd).__name__}, not the state dict an OpenAI sparse_autoencoder file "
                       "holds")
    unknown = sorted(set(sd) - _TENSORS - _STATS - _OTHER)
    if unknown:
        raise SAEError(f"{path}: entries {unknown} are not in an OpenAI sparse_autoencoder state dict "
                       f"({sorted(_TENSORS | _STATS | _OTHER)}); saecircuits does not know their maths")
    not_tensors = sorted(k for k in _TENSORS & set(sd) if not isinstance(sd[k], torch.Tensor))
    if not_tensors:
        raise SAEError(f"{path}: entries {not_tensors} are not tensors; the file is not an OpenAI SAE state dict")
    missing = sorted({"pre_bias", "encoder.weight", "latent_bias"} - set(sd))
    if missing:
        raise SAEError(f"{path}: entries {missing} are missing from the OpenAI sparse_autoencoder state dict")
    activation = sd.get("activation", "ReLU")
    act_sd = sd.get("activation_state_dict") or {}
    extra: dict[str, Any] = {}
    if activation == "ReLU":
        architecture, normalize = "standard", False
    elif activation == "TopK":
        architecture, normalize = "topk", True
        k, post = act_sd.get("k"), act_sd.get("postact_fn", "ReLU")
        if not isinstance(k, int) or isinstance(k, bool):
            raise SAEError(f"{path}: activation_state_dict['k'] must be an integer, got {k!r}")
        if post not in ("ReLU", "Identity"):
            raise SAEError(f"{path}: activation_state_dict['postact_fn'] is {post!r}; saecircuits reproduces TopK "
                           "with 'ReLU' or 'Identity' only")
        extra.update(k=k, topk_relu=post == "ReLU", input_normalization="layer_norm", input_normalization_eps=LN_EPS)
    else:
        raise SAEError(f"{path}: activation {activation!r}: saecircuits reproduces OpenAI SAEs with 'ReLU' or 'TopK' "
                       "only")
    pre_bias, latent_bias, enc = sd["pre_bias"], sd["latent_bias"], sd["encoder.weight"]
    for name in ("pre_bias", "latent_bias"):
        if not isinstance(sd[name], torch.Tensor) or sd[name].dim() != 1:
            raise SAEError(f"{path}: {name} must be a vector")
    d, f = pre_bias.shape[0], latent_bias.shape[0]
    refuse_square_encoder(d, f, path)
    oriented(enc, (f, d), "encoder.weight", path, "[n_latents, d] (nn.Linear)")
    tied = "decoder.weight" not in sd
    dec = enc.T if tied else oriented(sd["decoder.weight"], (d, f), "decoder.weight", path,
                                      "[d, n_latents] (nn.Linear)")
    dtype = one_dtype({"pre_bias": pre_bias, "latent_bias": latent_bias, "encoder.weight": enc, "decoder.weight": dec}, path)
    match = _PATH.search(path.absolute().as_posix())  # not resolve(): HF cache files link to blobs/
    found = OPENAI_LOCATIONS[match.group("location")].format(layer=int(match.group("layer"))) if match else None
    hook = resolve_hook(found, options.hook, path, what="the path (location/autoencoders/layer.pt)")
    location = match.group("location") if match else None
    extra["model_processing"] = raw_model_processing(hook)
    extra["basis"] = {"input": f"{hook.rsplit('.', 1)[-1]} of GPT-2 loaded without center_writing_weights"
                      + (", each token normalised inside the SAE" if normalize else ""),
                      "norm_weight_applied": False, "per_token_layer_norm": normalize}
    extra["source"] = {"family": "openai", "path": str(path), "site": location,
                       "version": (match.group("version") or "")[1:] or "v1" if match else None,
                       "layer": int(match.group("layer")) if match else None, "activation": activation,
                       "tied_decoder": tied}
    cfg = SAEConfig(architecture=architecture, d_in=d, d_sae=f, hook_point=hook,
                    model_name=options.model_name or "gpt2", dtype=dtype_name(dtype),
                    apply_b_dec_to_input=True, extra=extra)
    tensors = {"W_enc": enc.T, "W_dec": dec.T, "b_enc": latent_bias, "b_dec": pre_bias}
    return build_from_tensors(cfg, tensors, path, options.device)


register_family(Family("openai", "OpenAI sparse_autoencoder", _detect, _load,
                       "{location}/autoencoders/{layer}.pt (a torch state dict)"))
