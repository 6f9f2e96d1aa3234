"""Goodfire ``.pth`` SAEs against a numpy forward of Goodfire's SparseAutoEncoder:
``f = relu(x @ enc.T + enc_b)`` (no b_dec subtraction), ``recon = f @ dec.T + dec_b``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saecircuits.saes import io
from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import load_sae

D, F = 8, 16


def _sd(d=D, f=F, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_linear.weight": torch.randn(f, d, generator=g).to(dtype),
            "encoder_linear.bias": (torch.randn(f, generator=g) * 0.5).to(dtype),
            "decoder_linear.weight": torch.randn(d, f, generator=g).to(dtype),
            "decoder_linear.bias": (torch.randn(d, generator=g) * 0.5).to(dtype)}


def _forward(x, sd):
    w = {k: v.double().numpy() for k, v in sd.items()}
    f = np.maximum(np.asarray(x, np.float64) @ w["encoder_linear.weight"].T + w["encoder_linear.bias"], 0)
    return f, f @ w["decoder_linear.weight"].T + w["decoder_linear.bias"]


def _write(folder, sd, name="Llama-3.1-8B-Instruct-SAE-l19.pth"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / name)
    return folder / name


def test_loads_layer_from_name_with_goodfire_maths(tmp_path):
    sd = _sd()
    path = _write(tmp_path / "Llama-3.1-8B-Instruct-SAE-l19", sd)
    for p in (path, path.parent):  # the file, or the downloaded repository folder
        sae = load_sae(p)
        assert sae.cfg.extra["source"]["family"] == "goodfire"
        assert sae.hook_point == "blocks.19.hook_resid_post"
        assert sae.cfg.model_name == "meta-llama/Llama-3.1-8B-Instruct"
        assert sae.cfg.apply_b_dec_to_input is False
        assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
        x = torch.randn(5, D, generator=torch.Generator().manual_seed(1)).numpy()
        f_ref, rec_ref = _forward(x, sd)
        with torch.no_grad():
            f = sae.encode(torch.from_numpy(x))
            np.testing.assert_allclose(f.double().numpy(), f_ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(sae.decode(f).double().numpy(), rec_ref, rtol=1e-5, atol=1e-4)


def test_70b_pt_name_and_bf16(tmp_path):
    sd = _sd(dtype=torch.bfloat16)
    sae = load_sae(_write(tmp_path, sd, name="Llama-3.3-70B-Instruct-SAE-l50.pt"))
    assert sae.hook_point == "blocks.50.hook_resid_post" and sae.dtype == torch.bfloat16
    assert sae.cfg.model_name == "meta-llama/Llama-3.3-70B-Instruct"


def test_hook_needed_without_layer_in_name(tmp_path):
    path = _write(tmp_path, _sd(), name="my_sae.pth")
    with pytest.raises(SAEError, match="hook"):
        load_sae(path)
    assert load_sae(path, hook="blocks.3.hook_resid_post").hook_point == "blocks.3.hook_resid_post"
    with pytest.raises(SAEError, match="blocks.19"):
        load_sae(_write(tmp_path / "b", _sd()), hook="blocks.3.hook_resid_post")


def test_refusals(tmp_path):
    sd = _sd()
    sd["encoder_linear.weight"] = sd["encoder_linear.weight"].T.contiguous()
    with pytest.raises(SAEError, match="transpose"):
        load_sae(_write(tmp_path / "a", sd))
    with pytest.raises(SAEError, match="square"):
        load_sae(_write(tmp_path / "b", _sd(f=D)))
    with pytest.raises(SAEError, match="not a Goodfire SAE"):
        load_sae(_write(tmp_path / "c", {**_sd(), "threshold": torch.ones(F)}))
    with pytest.raises(SAEError, match="not a Goodfire SAE"):
        load_sae(_write(tmp_path / "e", {**_sd(), "encoder_linear.bias": [0.0] * F}))
    # integer weights throughout: not "mixed dtypes" (there are none) but the integer tensor, named
    with pytest.raises(SAEError, match="encoder_linear.weight has dtype torch.int8, expected floating point"):
        load_sae(_write(tmp_path / "i", {k: v.to(torch.int8) for k, v in _sd().items()}))
    path = _write(tmp_path / "d", _sd())
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(SAEError, match="weights only"):
        load_sae(path)


def test_save_and_reload_round_trips(tmp_path):
    sae = load_sae(_write(tmp_path, _sd()))
    io.save_sae(sae, tmp_path / "saved")
    back = io.load_sae(tmp_path / "saved")
    x = torch.randn(4, D)
    with torch.no_grad():
        assert torch.equal(back(x), sae(x))
    assert back.hook_point == sae.hook_point and back.cfg.apply_b_dec_to_input is False
