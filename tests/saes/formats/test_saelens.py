"""SAELens v1 to v6 files (transcoders included), read by the family loader: hand-written cfg.json files in each
version's shape, random weights with non-zero biases, and a plain numpy forward of SAELens' own maths
(``sae_lens/saes/*.py``, v5 ``sae_lens/sae.py``) written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import detect_family
from saecircuits.saes.formats import load_sae as load_any
from saecircuits.saes.formats.saelens import feature_density, log_feature_density
from saecircuits.saes.io import load_sae, save_sae

D, F, D_OUT = 8, 16, 12

# gpt2-small-res-jb's cfg.json keys (v1/v2 era), values in that file's style
RES_JB = {
    "model_name": "gpt2-small", "hook_point": "blocks.6.hook_resid_pre", "hook_point_layer": 6,
    "hook_point_head_index": None, "d_in": D, "d_sae": F, "expansion_factor": 2, "context_size": 128,
    "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False, "use_cached_activations": False,
    "cached_activations_path": "activations/Skylion007_openwebtext/gpt2-small/blocks.6.hook_resid_pre",
    "n_batches_in_buffer": 128, "total_training_tokens": 300000000, "store_batch_size": 32,
    "train_batch_size": 4096, "device": "mps", "seed": 42, "dtype": "torch.float32",
    "b_dec_init_method": "geometric_median", "l1_coefficient": 8e-5, "lr": 4e-4, "lr_scheduler_name": None,
    "lr_warm_up_steps": 5000, "use_ghost_grads": False, "feature_sampling_window": 1000,
    "feature_sampling_method": None, "resample_batches": 1028, "feature_reinit_scale": 0.2,
    "dead_feature_window": 5000, "dead_feature_estimation_method": "no_fire", "dead_feature_threshold": 1e-8,
    "log_to_wandb": True, "wandb_project": "mats_sae_training_gpt2_small", "wandb_entity": None,
    "wandb_log_frequency": 100, "n_checkpoints": 10, "checkpoint_path": "checkpoints/x", "tokens_per_buffer": 67108864,
    "run_name": "24576-L1-8e-05-LR-0.0004-Tokens-3.000e+08", "from_pretrained_path": None,
    "model_from_pretrained_kwargs": {"center_writing_weights": True},
}

# a SAELens 5.x TopK file (hook_name / hook_layer / activation_fn_str + kwargs / boolean normalize_activations)
V5_TOPK = {
    "architecture": "standard", "d_in": D, "d_sae": F, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
    "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "context_size": 1024,
    "model_name": "tiny-stories-1L-21M", "hook_name": "blocks.0.hook_resid_post", "hook_layer": 0,
    "hook_head_index": None, "prepend_bos": True, "dataset_path": "roneneldan/TinyStories",
    "dataset_trust_remote_code": True, "normalize_activations": False, "dtype": "torch.float32", "device": "cuda",
    "sae_lens_training_version": "5.5.0", "neuronpedia_id": None,
    "model_from_pretrained_kwargs": {"center_writing_weights": False}, "seqpos_slice": [None],
    "l1_coefficient": 5.0, "lp_norm": 1.0, "use_ghost_grads": False, "normalize_sae_decoder": False,
    "noise_scale": 0.0, "decoder_orthogonal_init": False, "mse_loss_normalization": None,
    "decoder_heuristic_init": True, "init_encoder_as_decoder_transpose": True,
    "scale_sparsity_penalty_by_decoder_norm": True,
}


def _v6(arch: str, hook: str = "blocks.0.hook_resid_post", **top) -> dict:
    md = {"sae_lens_version": "6.12.0", "sae_lens_training_version": "6.12.0", "model_name": "gpt2",
          "hook_name": hook, "hook_head_index": None, "model_from_pretrained_kwargs": {"center_writing_weights": False}}
    md.update(top.pop("metadata", {}))
    return {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": md, **top}


def _weights(names, d_out=D, dtype=torch.float32, seed=0):
    g = np.random.default_rng(seed)
    w = {"W_enc": g.normal(size=(D, F)), "b_enc": 0.4 * g.normal(size=F), "W_dec": g.normal(size=(F, d_out)),
         "b_dec": 0.5 * g.normal(size=d_out), "threshold": g.uniform(0.05, 0.65, size=F),
         "b_gate": 0.4 * g.normal(size=F), "b_mag": 0.4 * g.normal(size=F), "r_mag": 0.3 * g.normal(size=F),
         "W_skip": g.normal(size=(d_out, D))}
    return {k: torch.tensor(v).to(dtype) for k, v in w.items() if k in names}


def _write(tmp_path: Path, cfg: dict, w: dict, name="sae") -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _x(n=64, d=D, seed=1):
    return np.random.default_rng(seed).normal(size=(n, d)) * 1.5


def _np(t):
    return t.detach().double().numpy()


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(_np(a) if isinstance(a, torch.Tensor) else a, b, rtol=tol, atol=tol)


def _topk(pre, k):
    out = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row, kind="stable")[:k]
        out[i, top] = np.maximum(row[top], 0)
    return out


# ----------------------------------------------------------------------------------------------- pre-6 files
def test_gpt2_small_res_jb_v1_file_loads_with_its_basis(tmp_path):
    w = {k: v.float() for k, v in _weights({"W_enc", "b_enc", "W_dec", "b_dec"}).items()}
    folder = _write(tmp_path, RES_JB, w)
    assert detect_family(folder).name == "saelens"
    sae = load_any(folder)
    assert sae.architecture == "standard" and sae.hook_point == "blocks.6.hook_resid_pre"
    assert sae.cfg.model_name == "gpt2-small" and sae.cfg.dtype == "float32" and sae.cfg.apply_b_dec_to_input
    # HookedTransformer.from_pretrained defaults, with the file's center_writing_weights
    assert sae.cfg.extra["model_processing"] == {"fold_ln": True, "center_writing_weights": True,
                                                 "fold_value_biases": True}
    assert sae.cfg.extra["source"]["family"] == "saelens"
    assert sae.cfg.extra["source"]["site"] == "blocks.6.hook_resid_pre"
    assert sae.cfg.extra["saelens"]["training"]["l1_coefficient"] == 8e-5
    assert sae.cfg.extra["saelens"]["metadata"]["dataset_path"] == "Skylion007/openwebtext"
    x = _x()
    W = {k: _np(v) for k, v in w.items()}
    acts = np.maximum((x - W["b_dec"]) @ W["W_enc"] + W["b_enc"], 0)
    f = sae.encode(torch.tensor(x))
    _close(f, acts)
    _close(sae.decode(f), acts @ W["W_dec"] + W["b_dec"])
    # a pre-6 file without the kwargs was trained under the defaults
    folder2 = _write(tmp_path, {k: v for k, v in RES_JB.items() if k != "model_from_pretrained_kwargs"}, w, "b")
    assert load_sae(folder2).cfg.extra["model_processing"]["center_writing_weights"] is True


def test_saelens5_topk_file(tmp_path):
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec"})
    sae = load_any(_write(tmp_path, V5_TOPK, w), hook="blocks.0.hook_resid_post")
    assert sae.architecture == "topk" and sae.cfg.extra["k"] == 4
    assert sae.cfg.extra["model_processing"]["center_writing_weights"] is False
    x = _x()
    W = {k: _np(v) for k, v in w.items()}
    acts = _topk((x - W["b_dec"]) @ W["W_enc"] + W["b_enc"], 4)
    _close(sae.encode(torch.tensor(x)), acts)
    _close(sae(torch.tensor(x)), acts @ W["W_dec"] + W["b_dec"])
    with pytest.raises(SAEError, match="hook"):
        load_any(tmp_path / "sae", hook="blocks.1.hook_resid_post")  # the file says another hook


def test_saelens5_gated_and_jumprelu(tmp_path):
    x = _x()
    base = {**V5_TOPK, "activation_fn_str": "relu", "activation_fn_kwargs": {}}
    w = _weights({"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"})
    sae = load_sae(_write(tmp_path, {**base, "architecture": "gated"}, w, "gated"))
    W = {k: _np(v) for k, v in w.items()}
    xi = x - W["b_dec"]
    acts = ((xi @ W["W_enc"] + W["b_gate"]) > 0) * np.maximum(xi @ (W["W_enc"] * np.exp(W["r_mag"])) + W["b_mag"], 0)
    _close(sae.encode(torch.tensor(x)), acts)
    _close(sae(torch.tensor(x)), acts @ W["W_dec"] + W["b_dec"])

    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, dtype=torch.float64)
    W = {k: _np(v) for k, v in w.items()}
    pre = (x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]
    j = int(np.argmax(pre[0]))  # a positive pre-activation
    w["threshold"][j] = float(pre[0, j])  # exactly on it: SAELens' strict '>' keeps the feature off
    W["threshold"][j] = pre[0, j]
    cfg = {**base, "architecture": "jumprelu", "dtype": "torch.float64"}
    sae = load_sae(_write(tmp_path, cfg, w, "jumprelu"))
    acts = np.maximum(pre, 0) * (pre > W["threshold"])
    f = sae.encode(torch.tensor(x))
    assert float(f[0, j].detach()) == 0.0 and pre[0, j] > 0
    np.testing.assert_array_equal(_np(f) > 0, acts > 0)
    _close(f, acts, 1e-12)


def test_pre6_hook_z_file_flattens_heads(tmp_path):
    # SAELens' converter turns reshape_activations on for hook_z names (connor/rob attention SAEs, ctigges pythia)
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec"})
    cfg = {**V5_TOPK, "activation_fn_str": "relu", "activation_fn_kwargs": {}, "hook_name": "blocks.2.attn.hook_z",
           "hook_layer": 2}
    sae = load_sae(_write(tmp_path, cfg, w))
    assert sae.cfg.extra["reshape_activations"] == "hook_z"
    # hook_z depends on every switch; the file's kwargs override the defaults
    assert sae.cfg.extra["model_processing"] == {"fold_ln": True, "center_writing_weights": False,
                                                 "fold_value_biases": True}
    z = _x().reshape(64, 2, 4)  # [tokens, n_heads, d_head]
    W = {k: _np(v) for k, v in w.items()}
    acts = np.maximum((z.reshape(64, 8) - W["b_dec"]) @ W["W_enc"] + W["b_enc"], 0)
    _close(sae.encode(torch.tensor(z)), acts)
    back = load_sae(save_sae(sae, tmp_path / "again"))
    assert torch.equal(back.encode(torch.tensor(z)), sae.encode(torch.tensor(z)))


def test_layer_norm_normalisation_matches_saelens(tmp_path):
    # SAELens run_time_activation_ln_in/out: centre, divide by the unbiased std + 1e-5; de-normalise the output
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec"})
    sae = load_sae(_write(tmp_path, _v6("topk", k=4, normalize_activations="layer_norm"), w))
    assert sae.cfg.extra["input_normalization"] == "layer_norm"
    x = _x() * 3 + 0.7
    W = {k: _np(v) for k, v in w.items()}
    mu = x.mean(-1, keepdims=True)
    std = (x - mu).std(-1, ddof=1, keepdims=True)
    latents = _topk(((x - mu) / (std + 1e-5) - W["b_dec"]) @ W["W_enc"] + W["b_enc"], 4)
    xt = torch.tensor(x)
    f = sae.encode(xt)
    _close(f, latents * std)  # features in activation units: a positive per-token factor
    _close(sae.decode(f, xt), (latents @ W["W_dec"] + W["b_dec"]) * std + mu)
    back = load_sae(save_sae(sae, tmp_path / "again"))
    assert torch.equal(back(xt), sae(xt))


# ----------------------------------------------------------------------------------------------- 6.x transcoders
@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saelens6_transcoders(tmp_path, arch, dtype):
    jump, skip = arch.startswith("jumprelu"), "skip" in arch
    names = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if jump else set()) | ({"W_skip"} if skip else set())
    w = _weights(names, d_out=D_OUT, dtype=dtype)
    cfg = _v6(arch, "blocks.3.ln2.hook_normalized", d_out=D_OUT, apply_b_dec_to_input=False,
              dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
              metadata={"hook_name_out": "blocks.3.hook_mlp_out", "hook_head_index_out": None})
    sae = load_any(_write(tmp_path, cfg, w))
    assert sae.is_transcoder and sae.hook_point == "blocks.3.ln2.hook_normalized"
    assert sae.hook_point_out == "blocks.3.hook_mlp_out" and sae.d_out == D_OUT and sae.dtype == dtype
    assert sae.skip_connection == skip and sae.architecture == ("jumprelu" if jump else "standard")
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is False
    x = torch.tensor(_x()).to(dtype)
    W = {k: _np(v) for k, v in w.items()}
    xd = _np(x)
    pre = xd @ W["W_enc"] + W["b_enc"]  # no b_dec subtraction
    acts = np.maximum(pre, 0) * ((pre > W["threshold"]) if jump else 1)
    recon = acts @ W["W_dec"] + W["b_dec"] + (xd @ W["W_skip"].T if skip else 0)
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: SAELens computes in bf16 too
    f = sae.encode(x)
    _close(f, acts, tol)
    _close(sae.decode(f, x) if skip else sae.decode(f), recon, tol if dtype == torch.float32 else 0.5)
    if dtype == torch.float32:
        back = load_sae(save_sae(sae, tmp_path / "again"))  # the SAELens 6 layout expresses every transcoder
        assert torch.equal(back.decode(back.encode(x), x), sae.decode(sae.encode(x), x))
        assert back.hook_point_out == "blocks.3.hook_mlp_out"


def test_skip_matrix_orientation_is_checked_by_the_numbers(tmp_path):
    # W_skip is [d_out, d_in] applied as x @ W_skip.T; with d_out == d_in a transposed reading fits the shapes, so
    # the test uses a non-symmetric matrix and the formula decides
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}, d_out=D, dtype=torch.float64)
    assert not torch.allclose(w["W_skip"], w["W_skip"].T)
    cfg = _v6("skip_transcoder", "blocks.0.ln2.hook_normalized", d_out=D, apply_b_dec_to_input=False,
              dtype="float64", metadata={"hook_name_out": "blocks.0.hook_mlp_out"})
    sae = load_sae(_write(tmp_path, cfg, w))
    x = torch.tensor(_x())
    W = {k: _np(v) for k, v in w.items()}
    right = np.maximum(_np(x) @ W["W_enc"] + W["b_enc"], 0) @ W["W_dec"] + W["b_dec"] + _np(x) @ W["W_skip"].T
    _close(sae(x), right, 1e-10)
    assert not np.allclose(_np(sae(x)), right - _np(x) @ W["W_skip"].T + _np(x) @ W["W_skip"])


@pytest.mark.parametrize("change,match", [
    ({"metadata": {"hook_name_out": None}}, "lacks metadata.hook_name_out"),
    ({"apply_b_dec_to_input": True}, "apply_b_dec_to_input is true on a transcoder"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' on a transcoder"),
    ({"metadata": {"hook_name_out": "blocks.0.hook_mlp_out", "hook_head_index_out": 1}}, "hook_head_index_out=1"),
    ({"use_new_gating": True}, r"keys \['use_new_gating'\] are not understood"),
])
def test_transcoder_refusals(tmp_path, change, match):
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec"}, d_out=D_OUT)
    md = change.pop("metadata", {"hook_name_out": "blocks.0.hook_mlp_out"})
    cfg = _v6("transcoder", "blocks.0.ln2.hook_normalized", **{"d_out": D_OUT, "apply_b_dec_to_input": False,
                                                               "metadata": md, **change})
    with pytest.raises(SAEError, match=match):
        load_sae(_write(tmp_path, cfg, w))


# ----------------------------------------------------------------------------------------------- densities, bad files
def test_sparsity_file_gives_feature_densities(tmp_path):
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec"})
    folder = _write(tmp_path, RES_JB, w)
    assert feature_density(folder) is None and "feature_density_file" not in load_sae(folder).cfg.extra["saelens"]
    log10 = torch.linspace(-6, -0.5, F)
    save_file({"sparsity": log10}, str(folder / "sparsity.safetensors"))
    sae = load_sae(folder)
    assert sae.cfg.extra["saelens"]["feature_density_file"] == "sparsity.safetensors"
    _close(feature_density(folder, sae.d_sae), 10 ** log10.double().numpy(), 1e-12)
    _close(log_feature_density(folder), log10.double().numpy(), 0)
    save_file({"sparsity": torch.zeros(F + 1) - 2}, str(folder / "sparsity.safetensors"))
    with pytest.raises(SAEError, match="17 entries but the SAE has d_sae=16"):
        load_sae(folder)


def test_bad_files(tmp_path):
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec"})
    folder = _write(tmp_path, RES_JB, w)
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="truncated|corrupt"):
        load_any(folder)
    folder = _write(tmp_path, {**RES_JB, "d_in": 12}, w, "wide")
    with pytest.raises(SAEError, match=r"W_enc has shape \(8, 16\), expected \(12, 16\)"):
        load_any(folder)
    folder = _write(tmp_path, {**RES_JB, "hook_point_head_index": 2}, w, "head")
    with pytest.raises(SAEError, match="hook_head_index=2"):
        load_any(folder)
    folder = _write(tmp_path, {**RES_JB, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3, "x": 1}}, w,
                    "kw")
    with pytest.raises(SAEError, match="activation_fn 'topk' needs"):
        load_any(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head", "kw", "sae", "wide"]  # nothing written


def test_a_metadata_that_is_not_an_object_is_refused(tmp_path):
    """cfg.json's "metadata" as a list raised AttributeError from a .get() (found by trying it)."""
    from helpers import random_sae

    folder = save_sae(random_sae(), tmp_path / "sae")
    d = json.loads((folder / "cfg.json").read_text())
    d.pop("saecircuits")  # a plain SAELens folder
    d["metadata"] = ["blocks.1.mlp.hook_post"]
    (folder / "cfg.json").write_text(json.dumps(d))
    with pytest.raises(SAEError, match="'metadata' must be a JSON object, got list"):
        load_sae(folder)


def test_boolean_normalize_activations(tmp_path):
    # SAELens < 6 wrote a bool: true means expected_average_only_in, whose factor lives in activation_scaler.json
    w = _weights({"W_enc", "b_enc", "W_dec", "b_dec"}, dtype=torch.float64)
    cfg = {**V5_TOPK, "activation_fn_str": "relu", "activation_fn_kwargs": {}, "normalize_activations": True,
           "dtype": "torch.float64"}
    folder = _write(tmp_path, cfg, w)
    with pytest.raises(SAEError, match=r"expected_average_only_in.*activation_scaler\.json"):
        load_sae(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.5}))
    sae = load_sae(folder)
    x = _x()
    W = {k: _np(v) for k, v in w.items()}
    acts = np.maximum((0.5 * x - W["b_dec"]) @ W["W_enc"] + W["b_enc"], 0)  # SAELens feeds x * factor
    _close(sae.encode(torch.tensor(x)), acts, 1e-10)
    _close(sae(torch.tensor(x)), (acts @ W["W_dec"] + W["b_dec"]) / 0.5, 1e-10)
