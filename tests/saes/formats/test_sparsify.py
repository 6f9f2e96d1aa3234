"""EleutherAI sparsify coders, written the way ``SparseCoder.save_to_disk`` writes them (``save_model`` of the module:
``encoder.weight [F, d]``, ``encoder.bias``, ``W_dec [F, d]``, ``b_dec``, ``W_skip``; ``cfg.json`` = the config +
``d_in``), checked against a numpy forward of sparsify's own maths (``sparse_coder.py``, ``fused_encoder.py``):
ReLU, then the top k; ``b_dec`` subtracted unless ``transcode``; ``+ x @ W_skip.T``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import detect_family, load_sae
from saecircuits.saes.io import load_sae as load_saved
from saecircuits.saes.io import save_sae

D, F, K = 16, 48, 5
CFG = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": 0, "k": K,
       "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}


def _write(root: Path, hookpoint: str, cfg: dict, dtype=torch.bfloat16, seed=0, skip=None, transpose=False) -> Path:
    g = np.random.default_rng(seed)
    n = cfg.get("num_latents") or D * cfg.get("expansion_factor", 32)
    w = {"encoder.weight": g.normal(size=(n, D)) / 3, "encoder.bias": 0.3 * g.normal(size=n),
         "W_dec": g.normal(size=(n, D)), "b_dec": 0.5 * g.normal(size=D)}
    if skip if skip is not None else cfg.get("skip_connection"):
        w["W_skip"] = g.normal(size=(D, D)) / 4
    if transpose:
        w["encoder.weight"] = w["encoder.weight"].T
    folder = root / hookpoint
    folder.mkdir(parents=True)
    save_file({k: torch.tensor(v).to(dtype).contiguous() for k, v in w.items()}, str(folder / "sae.safetensors"),
              metadata={"format": "pt"})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.double().numpy() for k, v in load_file(str(folder / "sae.safetensors")).items()}


def _sparsify_forward(w, x, k, transcode):
    """sparsify: pre = relu(F.linear(x - b_dec, W, b)); top-k of pre; out = acts @ W_dec + b_dec (+ x @ W_skip.T)."""
    sae_in = x if transcode else x - w["b_dec"]
    pre = np.maximum(sae_in @ w["encoder.weight"].T + w["encoder.bias"], 0)
    acts = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row, kind="stable")[:k]
        acts[i, top] = row[top]
    out = acts @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return acts, out


def _x(n=40, seed=1, dtype=torch.bfloat16):
    x = torch.tensor(np.random.default_rng(seed).normal(size=(n, D)) * 1.3).to(dtype)
    return x, x.double().numpy()


def _np(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_residual_sae_matches_sparsify(tmp_path, dtype):
    folder = _write(tmp_path / "EleutherAI-sae-pythia-70m-32k", "layers.3", CFG, dtype)
    assert detect_family(folder).name == "sparsify"
    sae = load_sae(folder)
    assert sae.architecture == "topk" and sae.d_sae == D * 3 and sae.cfg.extra["k"] == K and sae.dtype == dtype
    assert sae.hook_point == "blocks.3.hook_resid_post" and not sae.is_transcoder and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is False
    assert sae.cfg.extra["source"]["family"] == "sparsify" and sae.cfg.extra["source"]["site"] == "layers.3"
    x, xd = _x(dtype=dtype)
    w = _weights(folder)
    acts, out = _sparsify_forward(w, xd, K, transcode=False)
    f = sae.encode(x)
    if dtype == torch.float32:
        np.testing.assert_array_equal(_np(f) > 0, acts > 0)
        np.testing.assert_allclose(_np(f), acts, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_np(sae(x)), out, rtol=1e-5, atol=1e-5)
    else:  # computed in bfloat16 as sparsify does: decisions near the k-th value may differ from float64
        both = (_np(f) > 0) & (acts > 0)
        assert both.sum() >= 0.95 * (acts > 0).sum()
        np.testing.assert_allclose(_np(f)[both], acts[both], rtol=0.02, atol=0.05)
        np.testing.assert_allclose(_np(sae.decode(torch.tensor(acts).to(dtype))), acts @ w["W_dec"] + w["b_dec"],
                                   rtol=0.02, atol=0.3)
    # our SAELens-6 layout holds it exactly (a TopK SAE)
    back = load_saved(save_sae(sae, tmp_path / "saved"))
    assert torch.equal(back.encode(x), sae.encode(x)) and back.dtype == dtype


def test_skip_transcoder_on_the_mlp(tmp_path):
    cfg = {**CFG, "transcode": True, "skip_connection": True, "num_latents": 32, "k": 4}
    folder = _write(tmp_path, "layers.2.mlp", cfg, torch.float32)
    sae = load_sae(folder)
    assert sae.is_transcoder and sae.skip_connection and not sae.cfg.apply_b_dec_to_input
    assert sae.hook_point == "blocks.2.ln2.hook_normalized" and sae.hook_point_out == "blocks.2.hook_mlp_out"
    assert sae.cfg.extra["basis"]["norm_weight_applied"] is True
    w = _weights(folder)
    assert not np.allclose(w["W_skip"], w["W_skip"].T)  # a transposed skip would change the result
    x, xd = _x(dtype=torch.float32)
    acts, out = _sparsify_forward(w, xd, 4, transcode=True)
    f = sae.encode(x)
    np.testing.assert_allclose(_np(f), acts, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(sae.decode(f, x)), out, rtol=1e-5, atol=1e-5)
    wrong = acts @ w["W_dec"] + w["b_dec"] + xd @ w["W_skip"]
    assert not np.allclose(_np(sae.decode(f, x)), wrong, atol=1e-3)
    with pytest.raises(SAEError, match="no 'topk' transcoder class"):
        save_sae(sae, tmp_path / "saved")  # SAELens 6 cannot express it: refused, nothing written
    assert not (tmp_path / "saved").exists()


def test_skip_connection_autoencoder_subtracts_b_dec_only_for_the_encoder(tmp_path):
    folder = _write(tmp_path, "layers.1", {**CFG, "skip_connection": True}, torch.float32)
    sae = load_sae(folder)
    x, xd = _x(dtype=torch.float32)
    acts, out = _sparsify_forward(_weights(folder), xd, K, transcode=False)
    np.testing.assert_allclose(_np(sae(x)), out, rtol=1e-5, atol=1e-5)


def test_older_files_and_num_latents(tmp_path):
    # the sae package's files: no num_latents/transcode/skip_connection/activation, 'signed': false
    old = {"expansion_factor": 2, "normalize_decoder": True, "k": 3, "signed": False, "d_in": D}
    sae = load_sae(_write(tmp_path, "embed_tokens", old, torch.float32))
    assert sae.d_sae == 2 * D and sae.hook_point == "hook_embed" and sae.cfg.extra["k"] == 3
    sae = load_sae(_write(tmp_path, "h.4", {**CFG, "num_latents": 40}, torch.float32))
    assert sae.d_sae == 40 and sae.hook_point == "blocks.4.hook_resid_post"


@pytest.mark.parametrize("change,match", [
    ({"activation": "groupmax"}, "activation='groupmax' is not supported"),
    ({"signed": True}, "signed=true"),
    ({"new_thing": 1}, r"keys \['new_thing'\]"),
    ({"k": 100}, "k=100 exceeds the 48 latents"),
    ({"transcode": "yes"}, "'transcode' must be true or false"),
])
def test_maths_changing_keys_are_refused(tmp_path, change, match):
    with pytest.raises(SAEError, match=match):
        load_sae(_write(tmp_path, "layers.0", {**CFG, **change}, torch.float32))


def test_parent_folder_lists_its_hookpoints(tmp_path):
    repo = tmp_path / "sae-llama"
    for hp in ("layers.0", "layers.1.mlp", "layers.10"):
        _write(repo, hp, CFG)
    assert detect_family(repo).name == "sparsify"
    with pytest.raises(SAEError, match=r"holds 3 sparsify coders.*layers\.0, layers\.1\.mlp, layers\.10; pass one"):
        load_sae(repo)


def test_sites_hook_option_and_model_name(tmp_path):
    run = tmp_path / "run"
    folder = _write(run, "layers.5.mlp", CFG, torch.float32)
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "batch_size": 8}))
    sae = load_sae(folder)
    assert sae.hook_point == "blocks.5.hook_mlp_out" and sae.cfg.model_name == "EleutherAI/pythia-70m"
    assert load_sae(folder, hook="blocks.5.hook_mlp_out").hook_point == "blocks.5.hook_mlp_out"
    with pytest.raises(SAEError, match="reads 'blocks.5.hook_mlp_out' according to .* but hook='blocks.5.hook_resid_post'"):
        load_sae(folder, hook="blocks.5.hook_resid_post")
    renamed = _write(tmp_path, "my_sae", CFG, torch.float32)
    with pytest.raises(SAEError, match="folder name 'my_sae'.*hook="):
        load_sae(renamed)
    assert load_sae(renamed, hook="blocks.1.hook_resid_post").hook_point == "blocks.1.hook_resid_post"


def test_does_not_collide_with_saelens(tmp_path):
    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.registry import build_sae

    saelens = save_sae(build_sae(SAEConfig("standard", D, F, "blocks.0.hook_resid_post")), tmp_path / "layers.0")
    assert detect_family(saelens).name == "saelens"
    assert detect_family(_write(tmp_path / "x", "layers.0", CFG)).name == "sparsify"


def test_bad_files(tmp_path):
    folder = _write(tmp_path, "layers.0", CFG, torch.float32, transpose=True)  # encoder.weight as [d, F]
    with pytest.raises(SAEError, match=r"encoder.weight has shape \(16, 48\), expected \(48, 16\)"):
        load_sae(folder)
    folder = _write(tmp_path, "layers.1", {**CFG, "d_in": 20}, torch.float32)
    with pytest.raises(SAEError, match=r"has shape .* expected"):
        load_sae(folder)
    folder = _write(tmp_path, "layers.2", CFG, torch.float32)
    data = (folder / "sae.safetensors").read_bytes()
    (folder / "sae.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(SAEError, match="truncated or corrupt"):
        load_sae(folder)
    folder = _write(tmp_path, "layers.3", CFG, torch.float32)
    from safetensors.torch import load_file

    w = load_file(str(folder / "sae.safetensors"))
    del w["W_dec"]
    save_file(w, str(folder / "sae.safetensors"))
    with pytest.raises(SAEError, match=r"missing \['W_dec'\].*encoder-only"):
        load_sae(folder)
    folder = _write(tmp_path, "layers.4", {k: v for k, v in CFG.items() if k != "d_in"}, torch.float32)
    with pytest.raises(SAEError, match="lacks 'd_in'"):
        load_sae(folder)
    # an integer tensor was cast into float weights and loaded (found by trying it): refused, naming it
    folder = _write(tmp_path, "layers.5", CFG, torch.float32)
    w = load_file(str(folder / "sae.safetensors"))
    w["encoder.weight"] = torch.ones_like(w["encoder.weight"], dtype=torch.int32)
    save_file(w, str(folder / "sae.safetensors"))
    with pytest.raises(SAEError, match="encoder.weight has dtype torch.int32, expected floating point"):
        load_sae(folder)


def test_a_hook_that_is_not_a_transformerlens_name_is_refused(tmp_path):
    from saecircuits.saes.formats import resolve_hook

    for bad in ("blocks.0.bogus", "layers.3", "blocks.x.hook_resid_post", ""):
        with pytest.raises(SAEError, match="is not a TransformerLens hook name"):
            resolve_hook(None, bad, tmp_path)
    for good in ("blocks.12.hook_resid_post", "blocks.3.mlp.hook_post", "blocks.5.attn.hook_z", "hook_embed",
                 "blocks.0.ln2.hook_normalized"):
        assert resolve_hook(None, good, tmp_path) == good
