"""circuit-tracer transcoders (layer files and config.yaml sets) against a numpy forward of SingleLayerTranscoder:
``pre = x @ W_enc.T + b_enc``; JumpReLU ``pre * (pre > t)`` or TopK ``pre * gate`` (no ReLU) or ReLU;
``recon = f @ W_dec + b_dec + x @ W_skip.T``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from saecircuits.saes import io
from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import detect_family, load_sae

D, F = 8, 16


def _layer(kind="jumprelu", d=D, f=F, seed=0, skip=True, k=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(6, d, generator=g) * 8) / 8
    w = {"W_enc": torch.randn(f, d, generator=g), "W_dec": torch.randn(f, d, generator=g),
         "b_enc": torch.randn(f, generator=g) * 0.3, "b_dec": torch.randn(d, generator=g) * 0.3}
    w["W_enc"][0] = torch.round(w["W_enc"][0] * 8) / 8
    # x and W_enc[0] on a 1/8 grid: pre[0, 0] = 0.375 exactly (a threshold below e, which the log-parameterised
    # threshold holds exactly)
    w["b_enc"][0] = 0.375 - float(x[0].double() @ w["W_enc"][0].double())
    if skip:
        w["W_skip"] = torch.randn(d, d, generator=g)
    if kind == "jumprelu":
        t = torch.rand(f, generator=g) * 0.6 + 0.05
        t[0] = 0.375  # exactly equal to pre[0, 0]: must not fire
        w["activation_function.threshold"] = t
    if k is not None:
        w["k"] = torch.tensor(k)
    return w, x.numpy()


def _forward(x, w, kind, k=None):
    n = {key: v.double().numpy() for key, v in w.items() if v.is_floating_point()}
    pre = np.asarray(x, np.float64) @ n["W_enc"].T + n["b_enc"]
    if kind == "jumprelu":
        f = pre * (pre > n["activation_function.threshold"])
    elif kind == "topk":
        f = np.zeros_like(pre)
        idx = np.argsort(-pre, -1)[:, :k]
        np.put_along_axis(f, idx, np.take_along_axis(pre, idx, -1), -1)
    else:
        f = np.maximum(pre, 0)
    rec = f @ n["W_dec"] + n["b_dec"]
    if "W_skip" in n:
        rec = rec + np.asarray(x, np.float64) @ n["W_skip"].T
    return f, rec


def _set(folder, layers, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(layers):
        save_file({k: v.contiguous() for k, v in w.items()}, folder / f"layer_{i}.safetensors")
    c = {"model_kind": "transcoder_set", "model_name": "meta-llama/Llama-3.2-1B", "feature_input_hook": "mlp.hook_in",
         "feature_output_hook": "mlp.hook_out", "scan": "x/y",
         "transcoders": [f"hf://someone/transcoders/layer_{i}.safetensors" for i in range(len(layers))]}
    c.update(cfg)
    (folder / "config.yaml").write_text(yaml.safe_dump(c))
    return folder


def _check(sae, x, w, kind, k=None):
    f_ref, rec_ref = _forward(x, w, kind, k)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        f = sae.encode(xt)
        np.testing.assert_allclose(f.double().numpy(), f_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sae.decode(f, xt).double().numpy(), rec_ref, rtol=1e-5, atol=1e-4)
    return f_ref


def test_set_layer_by_hook_jumprelu_with_skip(tmp_path):
    layers = [_layer(seed=s)[0] for s in range(3)]
    folder = _set(tmp_path / "tc", layers)
    assert detect_family(folder).name == "circuit_tracer"
    with pytest.raises(SAEError, match="hook="):
        load_sae(folder)
    for target in (folder, folder / "layer_1.safetensors"):
        sae = load_sae(target, hook="blocks.1.hook_mlp_out") if target == folder else load_sae(target)
        assert (sae.hook_point, sae.hook_point_out) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
        assert sae.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input is False
        assert sae.cfg.extra["basis"]["norm_weight_applied"] is True
        assert sae.cfg.extra["model_processing"] == {"fold_ln": False, "center_writing_weights": False}
        assert sae.cfg.extra["source"]["layer"] == 1
    w, x = _layer(seed=1)
    f_ref = _check(sae, x, w, "jumprelu")
    assert f_ref[0, 0] == 0 and float(w["activation_function.threshold"][0]) == 0.375
    # W_skip is applied as x @ W_skip.T: the transpose (non-symmetric) would give another reconstruction
    assert not torch.allclose(w["W_skip"], w["W_skip"].T)
    with torch.no_grad():
        wrong = _forward(x, {**w, "W_skip": w["W_skip"].T}, "jumprelu")[1]
        assert not np.allclose(sae(torch.from_numpy(x)).double().numpy(), wrong, atol=1e-2)
    with pytest.raises(SAEError, match="blocks.1.hook_resid_post"):
        load_sae(folder, hook="blocks.1.hook_resid_post")
    with pytest.raises(SAEError, match="layer 7"):
        load_sae(folder, hook="blocks.7.hook_mlp_out")


def test_topk_without_relu_and_relu_resid_mid(tmp_path):
    w, x = _layer(kind="topk", skip=False)
    w["b_enc"] -= 3.0  # some of the top k are negative: circuit-tracer keeps them
    folder = _set(tmp_path / "topk", [w], activation="topk", k=3)
    sae = load_sae(folder, hook="blocks.0.ln2.hook_normalized")
    assert sae.architecture == "topk" and sae.cfg.extra["topk_relu"] is False
    f_ref = _check(sae, x, w, "topk", k=3)
    assert (f_ref < 0).any()
    # k stored in the file, no activation in the config
    w2, x2 = _layer(kind="topk", skip=False, k=2, seed=4)
    sae2 = load_sae(_set(tmp_path / "topk2", [w2]) / "layer_0.safetensors")
    _check(sae2, x2, w2, "topk", k=2)
    # Llama ReLU skip transcoders read hook_resid_mid
    w3, x3 = _layer(kind="relu", seed=5)
    sae3 = load_sae(_set(tmp_path / "relu", [w3], feature_input_hook="hook_resid_mid",
                         feature_output_hook="mlp.hook_out"), hook="blocks.0.hook_resid_mid")
    assert sae3.architecture == "standard" and sae3.hook_point == "blocks.0.hook_resid_mid"
    assert sae3.cfg.extra["basis"]["norm_weight_applied"] is False
    assert sae3.cfg.extra["model_processing"] == {"center_writing_weights": False}
    _check(sae3, x3, w3, "relu")


def test_old_style_list_bare_file_and_templated_hooks(tmp_path):
    w, x = _layer(seed=2)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(w, folder / "tc_l2.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "google/gemma-2-2b", "feature_input_hook": "blocks.{layer}.ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [{"id": "a", "layer": 2, "filepath": "tc_l2.safetensors"}]}))
    sae = load_sae(folder, hook="blocks.2.ln2.hook_normalized")
    assert (sae.hook_point, sae.hook_point_out) == ("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is False  # TransformerLens' hook: before the weight
    _check(sae, x, w, "jumprelu")
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(w, bare / "layer_4.safetensors")
    with pytest.raises(SAEError, match="hook="):
        load_sae(bare / "layer_4.safetensors")
    sae = load_sae(bare / "layer_4.safetensors", hook="blocks.4.hook_resid_mid")
    assert sae.hook_point_out == "blocks.4.hook_mlp_out"


def test_gemma_scope_npz_listed_in_a_set(tmp_path):
    g = np.random.default_rng(0)
    params = {"W_enc": g.normal(size=(D, F)).astype(np.float32), "W_dec": g.normal(size=(F, D)).astype(np.float32),
              "b_enc": g.normal(size=F).astype(np.float32), "b_dec": g.normal(size=D).astype(np.float32),
              "threshold": g.uniform(0.05, 0.6, size=F).astype(np.float32)}
    folder = tmp_path / "gemma-set"
    inner = folder / "layer_0" / "width_16k" / "average_l0_76"
    inner.mkdir(parents=True)
    np.savez(inner / "params.npz", **params)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "model_name": "google/gemma-2-2b", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": ["hf://google/gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76/params.npz"]}))
    sae = load_sae(folder, hook="blocks.0.hook_mlp_out")
    assert sae.cfg.extra["source"]["family"] == "gemma_scope" and sae.cfg.extra["source"]["circuit_tracer_set"]
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is True  # Gemma Scope's truth for these weights
    x = g.normal(size=(4, D)).astype(np.float32)
    pre = x.astype(np.float64) @ params["W_enc"] + params["b_enc"]
    f = np.maximum(pre, 0) * (pre > params["threshold"])
    with torch.no_grad():
        np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).double().numpy(), f, rtol=1e-5, atol=1e-5)


def test_bfloat16_layer_keeps_its_dtype(tmp_path):
    w, x = _layer(seed=3)
    wb = {k: v.bfloat16() for k, v in w.items()}
    sae = load_sae(_set(tmp_path / "bf", [wb]) / "layer_0.safetensors")
    assert sae.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    torch.testing.assert_close(sae.threshold, wb["activation_function.threshold"].float())
    f_ref, _ = _forward(torch.from_numpy(x).bfloat16().float().numpy(), {k: v.float() for k, v in wb.items()},
                        "jumprelu")
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x)).float().numpy()
    same = (f != 0) == (f_ref != 0)
    assert same.mean() > 0.95  # bf16 matmul rounding may flip a value on its threshold
    np.testing.assert_allclose(f[same], f_ref[same], rtol=2e-2, atol=5e-2)


def test_gemma_scope_2_folder_listed_in_a_set(tmp_path):
    import json

    g = np.random.default_rng(1)
    w = {"w_enc": g.normal(size=(D, F)), "w_dec": g.normal(size=(F, D)), "b_enc": g.normal(size=F),
         "b_dec": g.normal(size=D), "threshold": g.uniform(0.05, 0.6, size=F),
         "affine_skip_connection": g.normal(size=(D, D))}
    folder = tmp_path / "set"
    inner = folder / "transcoder_all" / "layer_0_width_16k_l0_small_affine"
    inner.mkdir(parents=True)
    save_file({k: torch.from_numpy(v).float() for k, v in w.items()}, inner / "params.safetensors")
    (inner / "config.json").write_text(json.dumps({
        "width": F, "model_name": "google/gemma-3-1b-pt", "architecture": "jump_relu", "l0": "small",
        "affine_connection": True, "type": "transcoder",
        "hf_hook_point_in": "model.layers.0.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.0.post_feedforward_layernorm.output"}))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
        "transcoders": ["hf://google/gemma-scope-2-1b-pt/transcoder_all/layer_0_width_16k_l0_small_affine/"
                        "params.safetensors"]}))
    sae = load_sae(folder, hook="blocks.0.hook_mlp_out")
    assert sae.cfg.extra["source"]["version"] == 2 and sae.hook_point == "blocks.0.ln2.hook_normalized"
    x = g.normal(size=(4, D)).astype(np.float32)
    n = {k: torch.from_numpy(v).float().double().numpy() for k, v in w.items()}
    pre = x.astype(np.float64) @ n["w_enc"] + n["b_enc"]
    rec = (np.maximum(pre, 0) * (pre > n["threshold"])) @ n["w_dec"] + n["b_dec"] + x @ n["affine_skip_connection"]
    with torch.no_grad():
        np.testing.assert_allclose(sae(torch.from_numpy(x)).double().numpy(), rec, rtol=1e-5, atol=1e-4)


def test_refusals(tmp_path):
    w, _ = _layer()
    with pytest.raises(SAEError, match="cross_layer_transcoder"):
        load_sae(_set(tmp_path / "a", [w], model_kind="cross_layer_transcoder"), hook="blocks.0.hook_mlp_out")
    with pytest.raises(SAEError, match="normalise_input"):
        load_sae(_set(tmp_path / "b", [w], normalise_input=True), hook="blocks.0.hook_mlp_out")
    neg = dict(w)
    neg["activation_function.threshold"] = w["activation_function.threshold"] - 1.0
    with pytest.raises(SAEError, match="negative"):
        load_sae(_set(tmp_path / "c", [neg]) / "layer_0.safetensors")
    tr = dict(w)
    tr["W_enc"] = w["W_enc"].T.contiguous()
    with pytest.raises(SAEError, match="transpose"):
        load_sae(_set(tmp_path / "d", [tr]) / "layer_0.safetensors")
    with pytest.raises(SAEError, match="square"):
        load_sae(_set(tmp_path / "e", [_layer(f=D)[0]]) / "layer_0.safetensors")
    with pytest.raises(SAEError, match="TopK"):
        load_sae(_set(tmp_path / "f", [w], activation="topk", k=2) / "layer_0.safetensors")
    w2, _ = _layer(kind="topk", k=2)
    with pytest.raises(SAEError, match="k is 2"):
        load_sae(_set(tmp_path / "g", [w2], activation="topk", k=3) / "layer_0.safetensors")
    with pytest.raises(SAEError, match="unexpected"):
        load_sae(_set(tmp_path / "h", [{**w, "scale": torch.ones(F)}]) / "layer_0.safetensors")
    p = _set(tmp_path / "i", [w]) / "layer_0.safetensors"
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(SAEError, match="truncated or corrupt"):
        load_sae(p)


def test_save_and_reload_round_trips(tmp_path):
    w, x = _layer()
    sae = load_sae(_set(tmp_path / "a", [w]) / "layer_0.safetensors")
    io.save_sae(sae, tmp_path / "saved")
    back = io.load_sae(tmp_path / "saved")
    xt = torch.from_numpy(x)
    with torch.no_grad():
        assert torch.equal(back.encode(xt), sae.encode(xt)) and torch.equal(back(xt), sae(xt))
    assert (back.hook_point, back.hook_point_out) == (sae.hook_point, sae.hook_point_out)
