"""Gemma Scope 1 (params.npz) and 2 (config.json + params.safetensors) against a numpy forward of the tutorial's
JumpReLU SAE: ``pre = x @ W_enc + b_enc``, ``f = relu(pre) * (pre > threshold)``, ``recon = f @ W_dec + b_dec
(+ x @ A)``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saecircuits.saes import io
from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import load_sae

D, F, D_OUT = 8, 16, 12


def _gs_forward(x, w_enc, w_dec, b_enc, b_dec, th, a=None):
    """The Gemma Scope tutorial's forward in float64 numpy."""
    x, w_enc, w_dec, b_enc, b_dec, th = (np.asarray(t, dtype=np.float64) for t in (x, w_enc, w_dec, b_enc, b_dec, th))
    pre = x @ w_enc + b_enc
    f = np.maximum(pre, 0) * (pre > th)
    rec = f @ w_dec + b_dec
    if a is not None:
        rec = rec + x @ np.asarray(a, dtype=np.float64)
    return f, rec


def _params(d=D, f=F, d_out=None, seed=0):
    """Non-zero biases; inputs and encoder column 0 on a 1/8 grid so pre[0, 0] is exact and equals threshold[0]."""
    d_out = d_out or d
    g = np.random.default_rng(seed)
    w_enc = g.normal(size=(d, f)).astype(np.float32)
    w_enc[:, 0] = np.round(w_enc[:, 0] * 8) / 8
    x = (np.round(g.normal(size=(5, d)) * 8) / 8).astype(np.float32)
    b_enc = g.normal(scale=0.3, size=f).astype(np.float32)
    b_enc[0] = 0.25
    pre = x.astype(np.float64) @ w_enc + b_enc
    th = g.uniform(0.05, 0.65, size=f).astype(np.float32)
    th[0] = np.float32(pre[0, 0])  # exactly equal: must not fire (strict >)
    th[1] = np.float32(abs(pre[1, 1]) + 1e-3)  # just above
    th[2] = -0.3  # negative: relu(pre) * [pre > t] is plain ReLU
    p = {"W_enc": w_enc, "W_dec": g.normal(size=(f, d_out)).astype(np.float32),
         "b_enc": b_enc, "b_dec": g.normal(scale=0.5, size=d_out).astype(np.float32), "threshold": th}
    return p, x


def _write_npz(folder, params, lower=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {("w" + k[1:] if lower and k.startswith("W_") else k): v for k, v in params.items()}
    np.savez(folder / "params.npz", **arrays)
    return folder


def _check(sae, params, x, a=None, x_in=None):
    f_ref, rec_ref = _gs_forward(x, params["W_enc"], params["W_dec"], params["b_enc"], params["b_dec"],
                                 params["threshold"], a)
    xt = torch.from_numpy(x if x_in is None else x_in)
    f = sae.encode(xt)
    np.testing.assert_allclose(f.detach().double().numpy(), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.decode(f, xt).detach().double().numpy(), rec_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sae(xt).detach().double().numpy(), rec_ref, rtol=1e-5, atol=1e-4)
    return f_ref


def test_v1_res_site_hook_basis_and_maths(tmp_path):
    params, x = _params()
    folder = _write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_82", params)
    sae = load_sae(folder)
    assert sae.hook_point == "blocks.3.hook_resid_post" and not sae.is_transcoder
    assert sae.cfg.model_name == "google/gemma-2-2b"
    assert sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is False
    src = sae.cfg.extra["source"]
    assert (src["family"], src["site"], src["layer"], src["width"], src["l0"]) == (
        "gemma_scope", "res", 3, "16k", "average_l0_82")
    assert src["thresholds_clamped"] == 1
    f_ref = _check(sae, params, x)
    assert f_ref[0, 0] == 0 and sae.encode(torch.from_numpy(x))[0, 0] == 0  # pre == threshold does not fire
    # the file itself, and lower-case w_ names, load the same
    sae2 = load_sae(_write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "b", params,
                               lower=True) / "params.npz")
    _check(sae2, params, x)


def test_v1_hf_cache_layout_and_mlp_site(tmp_path):
    params, x = _params()
    repo = tmp_path / "models--google--gemma-scope-9b-it-mlp"
    folder = repo / "snapshots" / "abc123" / "layer_20" / "width_131k" / "average_l0_9"
    blob = _write_npz(repo / "blobs" / "tmp", params) / "params.npz"
    folder.mkdir(parents=True)
    (folder / "params.npz").symlink_to(blob)  # the cache links each file into blobs/
    sae = load_sae(folder / "params.npz")
    assert sae.hook_point == "blocks.20.hook_mlp_out"
    assert sae.cfg.model_name == "google/gemma-2-9b-it"
    _check(sae, params, x)


def test_v1_transcoder_reads_weighted_norm_output_writes_mlp_out(tmp_path):
    params, x = _params()
    sae = load_sae(_write_npz(tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_7" / "width_16k" / "average_l0_5",
                              params))
    assert sae.is_transcoder
    assert (sae.hook_point, sae.hook_point_out) == ("blocks.7.ln2.hook_normalized", "blocks.7.hook_mlp_out")
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is True
    assert sae.cfg.extra["model_processing"] == {"fold_ln": False, "center_writing_weights": False}
    _check(sae, params, x)


def test_v1_attention_site_flattens_heads(tmp_path):
    params, x = _params()
    sae = load_sae(_write_npz(tmp_path / "gemma-scope-2b-pt-att" / "layer_1" / "width_16k" / "average_l0_30",
                              params))
    assert sae.hook_point == "blocks.1.attn.hook_z" and sae.cfg.extra["reshape_activations"] == "hook_z"
    assert sae.cfg.extra["model_processing"] == {}  # Gemma's attention has no value biases
    _check(sae, params, x, x_in=x.reshape(5, 2, 4))  # [pos, n_heads, d_head] flattened to d = 8


def test_v1_hook_from_user_when_path_is_silent(tmp_path):
    params, x = _params()
    folder = _write_npz(tmp_path / "my_sae", params)
    with pytest.raises(SAEError, match="hook"):
        load_sae(folder)
    sae = load_sae(folder, hook="blocks.2.hook_resid_post")
    assert sae.hook_point == "blocks.2.hook_resid_post"
    _check(sae, params, x)
    tc = load_sae(folder, hook="blocks.2.ln2.hook_normalized")
    layered = _write_npz(tmp_path / "layer_12" / "width_16k" / "average_l0_82", params)  # no repository name
    assert load_sae(layered, hook="blocks.12.hook_mlp_out").hook_point == "blocks.12.hook_mlp_out"
    with pytest.raises(SAEError, match="layer 12"):
        load_sae(layered, hook="blocks.5.hook_mlp_out")
    assert tc.hook_point_out == "blocks.2.hook_mlp_out"
    named = _write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_82", params)
    with pytest.raises(SAEError, match="blocks.3.hook_resid_post"):
        load_sae(named, hook="blocks.4.hook_resid_post")


def test_v1_embedding_sae_is_rescaled_to_hook_embed(tmp_path):
    params, x = _params()
    sae = load_sae(_write_npz(tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6",
                              params))
    assert sae.hook_point == "hook_embed"
    s = math.sqrt(D)
    hook_embed = x * np.float32(s)  # TransformerLens' Gemma embedding is scaled by sqrt(d_model)
    f_ref, rec_ref = _gs_forward(x, *(params[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")))
    f = sae.encode(torch.from_numpy(hook_embed))
    np.testing.assert_allclose(f.detach().double().numpy(), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.decode(f).detach().double().numpy(), rec_ref * s, rtol=1e-5, atol=1e-4)


def test_v1_bad_files_are_refused(tmp_path):
    params, _ = _params()
    base = tmp_path / "gemma-scope-2b-pt-res" / "layer_0" / "width_16k"
    with pytest.raises(SAEError, match="not one Gemma Scope writes"):
        load_sae(_write_npz(base / "a", {**params, "scaling_factor": np.ones(F, np.float32)}))
    with pytest.raises(SAEError, match="transpose"):
        load_sae(_write_npz(base / "b", {**params, "W_enc": params["W_enc"].T.copy()}))
    sq, _ = _params(d=F)
    with pytest.raises(SAEError, match="square"):
        load_sae(_write_npz(base / "c", sq))
    with pytest.raises(SAEError, match="missing"):
        load_sae(_write_npz(base / "d", {k: v for k, v in params.items() if k != "threshold"}))
    wide, _ = _params(d_out=D_OUT)
    with pytest.raises(SAEError, match="writes what it reads"):
        load_sae(_write_npz(base / "w", wide))
    # an array of strings raised torch's TypeError (found by trying it): refused naming the array
    with pytest.raises(SAEError, match="array 'b_enc' holds <U1 values, not numbers"):
        load_sae(_write_npz(base / "s", {**params, "b_enc": np.array(["a"] * F)}))
    with pytest.raises(SAEError, match="W_enc has dtype torch.int32, expected floating point"):
        load_sae(_write_npz(base / "i", {**params, "W_enc": params["W_enc"].astype(np.int32)}))
    folder = _write_npz(base / "e", params)
    data = (folder / "params.npz").read_bytes()
    (folder / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="truncated or corrupt"):
        load_sae(folder)


# ------------------------------------------------------------------------------------------ Gemma Scope 2
def _write_gs2(folder, params, cfg, skip=None, dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    t = {"w_enc": params["W_enc"], "w_dec": params["W_dec"], "b_enc": params["b_enc"], "b_dec": params["b_dec"],
         "threshold": params["threshold"]}
    if skip is not None:
        t["affine_skip_connection"] = skip
    save_file({k: torch.from_numpy(v).to(dtype) for k, v in t.items()}, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _gs2_cfg(**kw):
    cfg = {"width": F, "model_name": "google/gemma-3-1b-pt", "architecture": "jump_relu", "l0": "small",
           "affine_connection": False, "hf_hook_point_in": "model.layers.5.output",
           "hf_hook_point_out": "model.layers.5.output", "type": "sae"}
    cfg.update(kw)
    return cfg


def test_v2_resid_sae(tmp_path):
    params, x = _params()
    sae = load_sae(_write_gs2(tmp_path / "resid_post" / "layer_5_width_16k_l0_small", params, _gs2_cfg()))
    assert sae.hook_point == "blocks.5.hook_resid_post"
    assert sae.cfg.extra["source"]["version"] == 2
    assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
    _check(sae, params, x)


def test_v2_affine_transcoder_applies_x_at_a_untransposed(tmp_path):
    params, x = _params(d_out=D_OUT)
    a = np.random.default_rng(3).normal(size=(D, D_OUT)).astype(np.float32)
    cfg = _gs2_cfg(type="transcoder", affine_connection=True,
                   hf_hook_point_in="model.layers.4.pre_feedforward_layernorm.output",
                   hf_hook_point_out="model.layers.4.post_feedforward_layernorm.output")
    sae = load_sae(_write_gs2(tmp_path / "transcoder" / "layer_4_width_16k_l0_small_affine", params, cfg, skip=a))
    assert (sae.hook_point, sae.hook_point_out) == ("blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out")
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is True and sae.d_out == D_OUT
    _check(sae, params, x, a=a)
    # a square, non-symmetric A: x @ A and x @ A.T differ, and only x @ A is right
    p2, x2 = _params(seed=5)
    a2 = np.random.default_rng(4).normal(size=(D, D)).astype(np.float32)
    assert not np.allclose(a2, a2.T)
    sae2 = load_sae(_write_gs2(tmp_path / "t2", p2, cfg, skip=a2))
    _, rec_right = _gs_forward(x2, *(p2[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")), a2)
    _, rec_wrong = _gs_forward(x2, *(p2[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")), a2.T)
    got = sae2(torch.from_numpy(x2)).detach().double().numpy()
    np.testing.assert_allclose(got, rec_right, rtol=1e-5, atol=1e-4)
    assert not np.allclose(got, rec_wrong, atol=1e-2)


def test_v2_bfloat16_keeps_dtype(tmp_path):
    params, x = _params()
    sae = load_sae(_write_gs2(tmp_path / "bf", params, _gs2_cfg(), dtype=torch.bfloat16))
    assert sae.dtype == torch.bfloat16
    rounded = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in params.items()}
    xb = torch.from_numpy(x).bfloat16().float().numpy()
    f_ref, rec_ref = _gs_forward(xb, *(rounded[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")))
    f = sae.encode(torch.from_numpy(x))
    on = (f_ref != 0) == (f.detach().float().numpy() != 0)
    assert on.mean() > 0.95  # bf16 matmul rounding may flip a pre-activation sitting on its threshold
    np.testing.assert_allclose(f.detach().float().numpy()[on], f_ref[on], rtol=2e-2, atol=5e-2)


def test_v2_attn_out_sae_reads_hook_z(tmp_path):
    params, x = _params()
    cfg = _gs2_cfg(hf_hook_point_in="model.layers.2.self_attn.o_proj.input",
                   hf_hook_point_out="model.layers.2.self_attn.o_proj.input")
    sae = load_sae(_write_gs2(tmp_path / "attn_out" / "layer_2_width_16k_l0_small", params, cfg))
    assert sae.hook_point == "blocks.2.attn.hook_z" and sae.cfg.extra["reshape_activations"] == "hook_z"
    _check(sae, params, x)


def test_v2_refusals(tmp_path):
    params, _ = _params()
    with pytest.raises(SAEError, match="clt"):
        load_sae(_write_gs2(tmp_path / "a", params, _gs2_cfg(type="clt")))
    with pytest.raises(SAEError, match="crosscoder"):
        load_sae(_write_gs2(tmp_path / "b", params, _gs2_cfg(type="crosscoder")))
    with pytest.raises(SAEError, match="rescale"):
        load_sae(_write_gs2(tmp_path / "c", params, _gs2_cfg(rescale=True)))
    with pytest.raises(SAEError, match="affine_connection"):
        load_sae(_write_gs2(tmp_path / "d", params, _gs2_cfg(affine_connection=True)))
    with pytest.raises(SAEError, match="architecture"):
        load_sae(_write_gs2(tmp_path / "e", params, _gs2_cfg(architecture="topk")))
    # a config.json of another width than the weights (found by trying it: loaded without a word)
    with pytest.raises(SAEError, match=f"width is {F + 1} but params.safetensors holds {F} features"):
        load_sae(_write_gs2(tmp_path / "w", params, _gs2_cfg(width=F + 1)))
    folder = _write_gs2(tmp_path / "f", params, _gs2_cfg())
    data = (folder / "params.safetensors").read_bytes()
    (folder / "params.safetensors").write_bytes(data[:-40])
    with pytest.raises(SAEError, match="truncated or corrupt"):
        load_sae(folder)


def test_save_and_reload_round_trips(tmp_path):
    params, x = _params(d_out=D_OUT)
    a = np.random.default_rng(3).normal(size=(D, D_OUT)).astype(np.float32)
    cfg = _gs2_cfg(type="transcoder", affine_connection=True,
                   hf_hook_point_in="model.layers.4.pre_feedforward_layernorm.output",
                   hf_hook_point_out="model.layers.4.post_feedforward_layernorm.output")
    sae = load_sae(_write_gs2(tmp_path / "tc", params, cfg, skip=a))
    io.save_sae(sae, tmp_path / "saved")
    back = io.load_sae(tmp_path / "saved")
    xt = torch.from_numpy(x)
    assert torch.equal(back.encode(xt), sae.encode(xt)) and torch.equal(back(xt), sae(xt))
    assert back.cfg.extra["basis"] == sae.cfg.extra["basis"]
    assert back.cfg.extra["model_processing"] == sae.cfg.extra["model_processing"]
    assert (back.hook_point, back.hook_point_out) == (sae.hook_point, sae.hook_point_out)
