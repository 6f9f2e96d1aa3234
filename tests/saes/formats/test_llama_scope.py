"""Llama Scope (hyperparams.json + checkpoints/final.safetensors) and Llama Scope R1 (config.json +
sae_weights.safetensors) against a numpy forward of their maths (SAELens' llama_scope reading):
``pre = (s_in x) @ enc.T + enc_b``, ``f = pre * (pre > theta * s_in)``, ``recon = (f @ dec.T + dec_b) / s_out`` with
``s = sqrt(d_model) / dataset_average_activation_norm``."""

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

D, F, D_OUT = 8, 32, 12
THETA = 0.4


def _weights(d=D, f=F, d_out=D, seed=0, unit_decoder=True):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d_out, f, generator=g)
    if unit_decoder:
        dec = dec / dec.norm(dim=0, keepdim=True)
    return {"encoder.weight": torch.randn(f, d, generator=g) * 0.3, "encoder.bias": torch.randn(f, generator=g) * 0.2,
            "decoder.weight": dec, "decoder.bias": torch.randn(d_out, generator=g) * 0.3}


def _hp(**kw):
    hp = {"device": "cuda", "seed": 42, "bias_init_method": "all_zero", "init_decoder_norm": 0.5, "lp": 1,
          "decoder_exactly_fixed_norm": False, "init_encoder_norm": None, "init_encoder_with_decoder_transpose": True,
          "l1_coefficient": 8e-05, "l1_coefficient_warmup_steps": 78125, "k_warmup_steps": 78125,
          "use_batch_norm_mse": True, "use_ghost_grads": False, "tp_size": 1, "ddp_size": 1,
          "dtype": "torch.bfloat16", "hook_point_in": "blocks.15.hook_resid_post",
          "hook_point_out": "blocks.15.hook_resid_post", "d_model": D, "expansion_factor": F // D,
          "use_decoder_bias": True, "use_glu_encoder": False, "act_fn": "jumprelu", "jump_relu_threshold": THETA,
          "apply_decoder_bias_to_pre_encoder": False, "norm_activation": "dataset-wise",
          "sparsity_include_decoder_norm": True, "top_k": 50, "d_sae": F,
          "dataset_average_activation_norm": {"in": 5.5, "out": 5.5}}
    hp.update(kw)
    return hp


def _write(folder, w, hp, dtype=torch.bfloat16):
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in w.items()}, folder / "checkpoints" / "final.safetensors")
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return folder


def _forward(x, w, theta, s_in, s_out, dtype=torch.bfloat16):
    """Llama Scope's forward in float64 on the stored (rounded) weights."""
    n = {k: v.to(dtype).double().numpy() for k, v in w.items()}
    pre = (s_in * np.asarray(x, np.float64)) @ n["encoder.weight"].T + n["encoder.bias"]
    f = pre * (pre > theta * s_in)
    return f, (f @ n["decoder.weight"].T + n["decoder.bias"]) / s_out


def _x(n=40, d=D):
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(7)) * 5.5 / math.sqrt(D)).numpy()


def _compare(sae, x, f_ref, rec_ref):
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x)).double().numpy()
        rec = sae(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rec, rec_ref, rtol=1e-5, atol=1e-5)
    assert 0 < (f_ref != 0).mean() < 1  # the threshold gates something and lets something through


def test_residual_sae_folds_the_dataset_norm_exactly(tmp_path):
    w = _weights(unit_decoder=False)  # released decoders are not unit-norm; jumprelu's gate ignores them
    sae = load_sae(_write(tmp_path / "Llama3_1-8B-Base-L15R-8x", w, _hp()))
    s = math.sqrt(D) / 5.5
    assert sae.hook_point == "blocks.15.hook_resid_post" and not sae.is_transcoder
    assert sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
    assert sae.cfg.extra["source"]["input_scale"] == pytest.approx(s)
    assert sae.cfg.extra["source"]["upcast_from"] == "bfloat16" and sae.dtype == torch.float32
    torch.testing.assert_close(sae.threshold, torch.full((F,), THETA * s))
    x = _x()
    _compare(sae, x, *_forward(x, w, THETA, s, s))


def test_transcoder_uses_in_and_out_norms(tmp_path):
    w = _weights(d_out=D_OUT, unit_decoder=False)
    hp = _hp(hook_point_in="blocks.3.ln2.hook_normalized", hook_point_out="blocks.3.hook_mlp_out",
             dataset_average_activation_norm={"in": 2.5, "out": 7.0}, sparsity_include_decoder_norm=False)
    sae = load_sae(_write(tmp_path / "Llama3_1-8B-Base-L3TC-8x", w, hp))
    assert (sae.hook_point, sae.hook_point_out) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert sae.d_out == D_OUT and sae.cfg.extra["basis"]["norm_weight_applied"] is False
    assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
    x = _x()
    _compare(sae, x, *_forward(x, w, THETA, math.sqrt(D) / 2.5, math.sqrt(D) / 7.0))


def test_r1_config_json_with_log_threshold(tmp_path):
    w = _weights()
    log_t = torch.log(torch.rand(F, generator=torch.Generator().manual_seed(2)) * 0.6 + 0.05)
    folder = tmp_path / "L5R"
    folder.mkdir()
    save_file({**{k: v.contiguous() for k, v in w.items()}, "log_jumprelu_threshold": log_t},
              folder / "sae_weights.safetensors")
    (folder / "config.json").write_text(json.dumps({"expansion_factor": F // D, "d_model": D,
                                                    "hook_point_in": "blocks.5.hook_resid_post",
                                                    "hook_point_out": "blocks.5.hook_resid_post"}))
    sae = load_sae(folder)
    assert sae.cfg.extra["source"]["family"] == "llama_scope" and sae.cfg.extra["source"]["version"] == "R1"
    assert sae.dtype == torch.float32 and sae.hook_point == "blocks.5.hook_resid_post"
    x = _x()
    n = {k: v.double().numpy() for k, v in w.items()}
    pre = x.astype(np.float64) @ n["encoder.weight"].T + n["encoder.bias"]
    f_ref = pre * (pre > np.exp(log_t.double().numpy()))
    _compare(sae, x, f_ref, f_ref @ n["decoder.weight"].T + n["decoder.bias"])
    # the SAELens pair (cfg.json + sae_weights.safetensors) is not taken for R1
    (folder / "cfg.json").write_text("{}")
    from saecircuits.saes.formats import detect_family
    assert detect_family(folder).name != "llama_scope"


def test_refusals(tmp_path):
    w = _weights()
    cases = [
        ({"act_fn": "topk"}, "act_fn"),
        ({"use_glu_encoder": True}, "use_glu_encoder"),
        ({"apply_decoder_bias_to_pre_encoder": True}, "apply_decoder_bias_to_pre_encoder"),
        ({"norm_activation": "token-wise"}, "token-wise"),
        ({"dataset_average_activation_norm": None}, "dataset_average_activation_norm"),
        ({"mystery_scale": 2.0}, "mystery_scale"),
        ({"jump_relu_threshold": -0.1}, "negative"),
        ({"d_sae": 2 * F}, "d_sae"),
    ]
    for i, (kw, match) in enumerate(cases):
        with pytest.raises(SAEError, match=match):
            load_sae(_write(tmp_path / str(i), w, _hp(**kw)))
    bad = dict(w)
    bad["encoder.weight"] = bad["encoder.weight"].T
    with pytest.raises(SAEError, match="transpose"):
        load_sae(_write(tmp_path / "t", bad, _hp()))
    with pytest.raises(SAEError, match="square"):
        load_sae(_write(tmp_path / "s", _weights(f=D), _hp(d_sae=D, expansion_factor=1)))
    folder = _write(tmp_path / "c", w, _hp())
    p = folder / "checkpoints" / "final.safetensors"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(SAEError, match="truncated or corrupt"):
        load_sae(folder)
    with pytest.raises(SAEError, match="blocks.15.hook_resid_post"):
        load_sae(_write(tmp_path / "h", w, _hp()), hook="blocks.14.hook_resid_post")


def test_save_and_reload_round_trips(tmp_path):
    sae = load_sae(_write(tmp_path / "a", _weights(), _hp()))
    io.save_sae(sae, tmp_path / "saved")
    back = io.load_sae(tmp_path / "saved")
    x = torch.from_numpy(_x())
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    assert back.cfg.extra["source"]["input_scale"] == sae.cfg.extra["source"]["input_scale"]
