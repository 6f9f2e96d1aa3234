"""OpenAI sparse_autoencoder ``.pt`` files against a numpy forward of ``sparse_autoencoder/model.py``:
``latents = act((LN(x) - pre_bias) @ enc.T + latent_bias)``, ``recons = (latents @ dec.T + pre_bias) * std + mean``
(TopK files normalise each token; ReLU files do not)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from saecircuits.saes import io
from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import load_sae

D, F, K = 8, 16, 4


def _oai_forward(x, sd):
    """OpenAI's Autoencoder forward in float64 numpy; returns (latents, recons)."""
    x = np.asarray(x, dtype=np.float64)
    enc = sd["encoder.weight"].double().numpy()
    dec = (sd["decoder.weight"] if "decoder.weight" in sd else sd["encoder.weight"].T).double().numpy()
    pre_bias, latent_bias = sd["pre_bias"].double().numpy(), sd["latent_bias"].double().numpy()
    topk = sd.get("activation") == "TopK"
    if topk:  # LN(x): centred, divided by the unbiased std + 1e-5
        mu = x.mean(-1, keepdims=True)
        std = (x - mu).std(-1, ddof=1, keepdims=True)
        xn = (x - mu) / (std + 1e-5)
    else:
        xn = x
    pre = (xn - pre_bias) @ enc.T + latent_bias
    if topk:
        k, post = sd["activation_state_dict"]["k"], sd["activation_state_dict"]["postact_fn"]
        idx = np.argsort(-pre, axis=-1)[:, :k]
        lat = np.zeros_like(pre)
        vals = np.take_along_axis(pre, idx, -1)
        np.put_along_axis(lat, idx, np.maximum(vals, 0) if post == "ReLU" else vals, -1)
    else:
        lat = np.maximum(pre, 0)
    rec = lat @ dec.T + pre_bias
    if topk:
        rec = rec * std + mu
        return lat, rec, std
    return lat, rec, None


def _state_dict(activation="TopK", postact="ReLU", d=D, f=F, seed=0, tied=False):
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    sd["pre_bias"] = torch.randn(d, generator=g) * 0.3
    sd["latent_bias"] = torch.randn(f, generator=g) * 0.3
    sd["encoder.weight"] = torch.randn(f, d, generator=g)
    if not tied:
        sd["decoder.weight"] = torch.randn(d, f, generator=g)
    sd["stats_last_nonzero"] = torch.zeros(f, dtype=torch.int64)
    sd["latents_activation_frequency"] = torch.rand(f, generator=g)
    sd["latents_mean_square"] = torch.rand(f, generator=g)
    sd["activation"] = activation
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": K, "postact_fn": postact}
    else:
        sd["activation_state_dict"] = OrderedDict()
    return sd


def _write(root, sd, location="resid_post_mlp_v5_32k", layer=6):
    path = root / location / "autoencoders" / f"{layer}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def _x(seed=1, n=6, d=D):
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.7).numpy()


@pytest.mark.parametrize("postact", ["ReLU", "Identity"])
def test_topk_file_normalises_each_token(tmp_path, postact):
    sd = _state_dict(postact=postact)
    if postact == "Identity":
        sd["latent_bias"] -= 4.0  # some top-k pre-activations negative: Identity keeps them
    sae = load_sae(_write(tmp_path, sd))
    assert sae.cfg.extra["source"]["family"] == "openai"
    assert sae.architecture == "topk" and sae.cfg.extra["input_normalization"] == "layer_norm"
    assert sae.cfg.extra["topk_relu"] is (postact == "ReLU")
    assert sae.hook_point == "blocks.6.hook_resid_post"
    assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
    assert sae.cfg.extra["basis"]["per_token_layer_norm"] is True
    assert sae.cfg.extra["source"]["version"] == "v5_32k"
    x = _x()
    lat, rec, std = _oai_forward(x, sd)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        f = sae.encode(xt)
        np.testing.assert_allclose(f.double().numpy(), lat * std, rtol=1e-5, atol=1e-5)  # activation units
        np.testing.assert_allclose(sae.decode(f, xt).double().numpy(), rec, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(sae(xt).double().numpy(), rec, rtol=1e-5, atol=1e-4)
        with pytest.raises(SAEError, match="normalisation"):
            sae.decode(f)
    if postact == "Identity":
        assert (f < 0).any()  # negative top-k values kept


def test_relu_file_mlp_post_act(tmp_path):
    sd = _state_dict(activation="ReLU")
    sae = load_sae(_write(tmp_path, sd, location="mlp_post_act", layer=2))
    assert sae.architecture == "standard" and sae.cfg.apply_b_dec_to_input
    assert sae.hook_point == "blocks.2.mlp.hook_post" and sae.cfg.extra["model_processing"] == {}
    assert sae.cfg.extra.get("input_normalization", "none") == "none"
    x = _x()
    lat, rec, _ = _oai_forward(x, sd)
    with torch.no_grad():
        np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).double().numpy(), lat, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sae(torch.from_numpy(x)).double().numpy(), rec, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("location,hook", [("resid_delta_attn_v4", "blocks.3.hook_attn_out"),
                                           ("resid_delta_mlp", "blocks.3.hook_mlp_out"),
                                           ("resid_post_attn_v5_128k", "blocks.3.hook_resid_mid")])
def test_sites_from_path(tmp_path, location, hook):
    assert load_sae(_write(tmp_path, _state_dict(), location=location, layer=3)).hook_point == hook


def test_tied_decoder(tmp_path):
    sd = _state_dict(activation="ReLU", tied=True)
    sae = load_sae(_write(tmp_path, sd))
    x = _x()
    _, rec, _ = _oai_forward(x, sd)
    with torch.no_grad():
        np.testing.assert_allclose(sae(torch.from_numpy(x)).double().numpy(), rec, rtol=1e-5, atol=1e-4)
    assert sae.cfg.extra["source"]["tied_decoder"] is True


def test_hook_needed_when_path_is_silent(tmp_path):
    path = tmp_path / "autoencoders" / "0.pt"
    path.parent.mkdir()
    torch.save(_state_dict(), path)
    with pytest.raises(SAEError, match="hook"):
        load_sae(path)
    assert load_sae(path, hook="blocks.0.hook_resid_post").hook_point == "blocks.0.hook_resid_post"
    with pytest.raises(SAEError, match="blocks.6.hook_resid_post"):
        load_sae(_write(tmp_path, _state_dict()), hook="blocks.5.hook_resid_post")


class _Payload:  # a pickled object: a weights-only load must refuse it, never run its code
    def __reduce__(self):
        return (print, ("code ran",))


def test_refusals(tmp_path):
    with pytest.raises(SAEError, match="activation"):
        load_sae(_write(tmp_path / "a", _state_dict(activation="GELU")))
    with pytest.raises(SAEError, match="postact_fn"):
        load_sae(_write(tmp_path / "b", _state_dict(postact="Tanh")))
    sd = _state_dict()
    sd["encoder.bias"] = torch.zeros(F)
    with pytest.raises(SAEError, match="encoder.bias"):
        load_sae(_write(tmp_path / "c", sd))
    sd = _state_dict()
    sd["encoder.weight"] = sd["encoder.weight"].T.contiguous()
    with pytest.raises(SAEError, match="transpose"):
        load_sae(_write(tmp_path / "d", sd))
    with pytest.raises(SAEError, match="square"):
        load_sae(_write(tmp_path / "e", _state_dict(f=D)))
    sd = _state_dict()
    sd["pre_bias"] = torch.zeros(D + 1)
    with pytest.raises(SAEError, match="encoder.weight"):
        load_sae(_write(tmp_path / "f", sd))
    path = _write(tmp_path / "g", _state_dict())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SAEError, match="weights only"):
        load_sae(path)
    sd = _state_dict()
    sd["activation_state_dict"] = {"k": K, "postact_fn": "ReLU", "x": _Payload()}
    with pytest.raises(SAEError, match="weights only"):
        load_sae(_write(tmp_path / "h", sd))


def test_save_and_reload_round_trips(tmp_path):
    sae = load_sae(_write(tmp_path, _state_dict()))
    io.save_sae(sae, tmp_path / "saved")
    back = io.load_sae(tmp_path / "saved")
    xt = torch.from_numpy(_x())
    with torch.no_grad():
        assert torch.equal(back.encode(xt), sae.encode(xt)) and torch.equal(back(xt), sae(xt))
    assert back.cfg.extra["model_processing"] == sae.cfg.extra["model_processing"]


def test_symlinked_file_keeps_its_site(tmp_path):
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    torch.save(_state_dict(), blob)
    link = tmp_path / "resid_delta_mlp_v5_32k" / "autoencoders" / "4.pt"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert load_sae(link).hook_point == "blocks.4.hook_mlp_out"
