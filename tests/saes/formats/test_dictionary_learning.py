"""saprmarks/dictionary_learning dictionaries, written as its ``training.py`` writes them (``trainer_i/ae.pt`` =
``torch.save(state_dict)`` in each class's names + ``config.json`` ``{"trainer": ..., "buffer": ...}``; the resume
dict while training), checked against a numpy forward of each class's ``encode``/``decode``
(``dictionary_learning/dictionary.py``, ``trainers/*.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import detect_family, load_sae
from saecircuits.saes.io import load_sae as load_saved
from saecircuits.saes.io import save_sae

D, F, K = 12, 40, 4
rng = np.random.default_rng(0)


def _r(*shape, scale=1.0):
    return rng.normal(size=shape) * scale


def _state(cls: str) -> dict[str, np.ndarray]:
    enc, dec = _r(F, D, scale=0.4), _r(D, F) * rng.uniform(0.3, 2.0, size=F)  # decoder columns of unequal norms
    if cls == "AutoEncoder":
        return {"bias": _r(D, scale=0.5), "encoder.weight": enc, "encoder.bias": _r(F, scale=0.3), "decoder.weight": dec}
    if cls == "AutoEncoderNew":
        return {"encoder.weight": enc, "encoder.bias": _r(F, scale=0.3), "decoder.weight": dec,
                "decoder.bias": _r(D, scale=0.5)}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"encoder.weight": enc, "encoder.bias": _r(F, scale=0.3), "decoder.weight": dec, "b_dec": _r(D, scale=0.5),
                "k": np.array(K, dtype=np.int32), "threshold": np.array(0.45, dtype=np.float32)}
    if cls == "MatryoshkaBatchTopKSAE":
        return {"W_enc": enc.T.copy(), "b_enc": _r(F, scale=0.3), "W_dec": dec.T.copy(), "b_dec": _r(D, scale=0.5),
                "k": np.array(K, dtype=np.int32), "threshold": np.array(0.45, dtype=np.float32),
                "group_sizes": np.array([8, 12, 20])}
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": enc.T.copy(), "b_enc": _r(F, scale=0.3), "W_dec": dec.T.copy(), "b_dec": _r(D, scale=0.5),
                "threshold": rng.uniform(0.05, 0.65, size=F)}
    assert cls == "GatedAutoEncoder"
    return {"decoder_bias": _r(D, scale=0.5), "encoder.weight": enc, "r_mag": _r(F, scale=0.3),
            "gate_bias": _r(F, scale=0.3), "mag_bias": _r(F, scale=0.3), "decoder.weight": dec}


TRAINER = {"AutoEncoder": "StandardTrainer", "AutoEncoderNew": None, "AutoEncoderTopK": "TopKTrainer",
           "BatchTopKSAE": "BatchTopKTrainer", "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer",
           "JumpReluAutoEncoder": "JumpReluTrainer", "GatedAutoEncoder": "GatedSAETrainer"}


def _config(cls: str, submodule="resid_post_layer_3", io="out", **extra) -> dict:
    trainer = {"trainer_class": TRAINER[cls], "dict_class": cls, "activation_dim": D, "dict_size": F, "lr": 1e-4,
               "steps": 100, "seed": 0, "device": "cuda:0", "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped",
               "wandb_name": "x", "submodule_name": submodule, **extra}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        trainer["k"] = K
    return {"trainer": trainer, "buffer": {"d_submodule": D, "io": io, "n_ctxs": 3000, "ctx_len": 128,
                                           "refresh_batch_size": 32, "out_batch_size": 4096, "device": "cuda:0"}}


def _save(folder: Path, state: dict, config: dict | None, dtype=torch.float32, name="ae.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (torch.tensor(v) if v.dtype.kind in "iu" or k == "threshold" and v.ndim == 0
                   else torch.tensor(v).to(dtype)) for k, v in state.items()}
    torch.save(tensors, folder / name)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


def _forward(cls: str, s: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each class's own encode and decode, in numpy."""
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    if cls == "AutoEncoder":
        f = relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["bias"]
    if cls == "AutoEncoderNew":
        f = relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["decoder.bias"]
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        r = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        if cls == "AutoEncoderTopK":  # use_threshold=False: per-token top k
            f = np.zeros_like(r)
            for i, row in enumerate(r):
                top = np.argsort(-row, kind="stable")[:K]
                f[i, top] = row[top]
        else:  # use_threshold=True at inference
            f = r * (r > float(s["threshold"]))
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        r = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = r * (r > float(s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]  # apply_b_dec_to_input = False
        f = relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    xe = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    f = ((xe + s["gate_bias"]) > 0) * relu(np.exp(s["r_mag"]) * xe + s["mag_bias"])
    return f, f @ s["decoder.weight"].T + s["decoder_bias"]


def _np(t):
    return t.detach().double().numpy()


def _x(n=50, seed=3):
    return np.random.default_rng(seed).normal(size=(n, D)) * 1.5


@pytest.mark.parametrize("cls", sorted(TRAINER))
def test_every_class_matches_its_own_forward(tmp_path, cls):
    s = _state(cls)
    x = _x()
    if cls == "JumpReluAutoEncoder":  # one threshold exactly on a positive pre-activation: strict '>' keeps it off
        pre = x @ s["W_enc"] + s["b_enc"]
        j = int(np.argmax(pre[0]))
        s["threshold"][j] = pre[0, j]
    folder = _save(tmp_path / "trainer_0", s, _config(cls) if TRAINER[cls] else None)
    assert detect_family(folder).name == "dictionary_learning"
    sae = load_sae(folder, hook=None if TRAINER[cls] else "blocks.3.hook_resid_post")
    assert sae.hook_point == "blocks.3.hook_resid_post" and sae.d_in == D and sae.d_sae == F
    assert sae.cfg.extra["model_processing"] == {"center_writing_weights": False}
    assert sae.cfg.extra["source"]["class"] == cls and sae.cfg.extra["source"]["family"] == "dictionary_learning"
    f_ref, recon_ref = _forward(cls, s, x)
    xt = torch.tensor(x, dtype=torch.float32)
    f = _np(sae.encode(xt))
    if cls == "AutoEncoder":  # from_pretrained's normalize_decoder: feature i times ||decoder[:, i]||
        norms = np.linalg.norm(s["decoder.weight"], axis=0)
        f_ref = f_ref * norms
        assert sae.cfg.extra["source"]["normalized_decoder"] is True
        np.testing.assert_allclose(_np(sae.W_dec.norm(dim=1)), np.ones(F), rtol=1e-6)
    np.testing.assert_array_equal(f > 0, f_ref > 0)
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(sae.decode(sae.encode(xt))), recon_ref, rtol=1e-4, atol=1e-4)
    if cls == "JumpReluAutoEncoder":
        assert f[0, j] == 0 and not sae.cfg.apply_b_dec_to_input
    if cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        assert sae.architecture == "batchtopk" and sae.cfg.extra["k"] == K
    back = load_saved(save_sae(sae, tmp_path / "saved"))  # the SAELens 6 layout holds every class
    assert torch.equal(back.encode(xt), sae.encode(xt)) and torch.equal(back(xt), sae(xt))


def test_bf16_topk_keeps_its_dtype(tmp_path):
    s = _state("AutoEncoderTopK")
    sae = load_sae(_save(tmp_path / "t", s, _config("AutoEncoderTopK"), dtype=torch.bfloat16))
    assert sae.dtype == torch.bfloat16 and sae.cfg.dtype == "bfloat16"
    w = torch.load(tmp_path / "t" / "ae.pt", weights_only=True)
    assert torch.equal(sae.W_enc, w["encoder.weight"].T)


def test_batchtopk_unset_threshold_is_refused(tmp_path):
    s = _state("BatchTopKSAE")
    s["threshold"] = np.array(-1.0, dtype=np.float32)
    with pytest.raises(SAEError, match=r"inference threshold is -1 \(-1: never estimated\).*threshold_start_step"):
        load_sae(_save(tmp_path / "t", s, _config("BatchTopKSAE")))


def test_resume_checkpoint_loads_with_its_norm_factor(tmp_path):
    s = _state("BatchTopKSAE")
    tensors = {k: torch.tensor(v) if k in ("k", "threshold") else torch.tensor(v).float() for k, v in s.items()}
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_config("BatchTopKSAE")))
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    norm_factor = 2.5
    torch.save({"step": 500, "ae": tensors, "optimizer": opt.state_dict(), "config": _config("BatchTopKSAE")["trainer"],
                "norm_factor": norm_factor}, folder / "ae.pt")
    sae = load_sae(folder)
    assert sae.cfg.extra["source"]["resume_checkpoint"] is True
    assert sae.cfg.extra["source"]["applied_norm_factor"] == norm_factor
    # training fed x / norm_factor; the final save scales the biases and threshold by it: the same as here
    x = _x()
    f_norm, recon_norm = _forward("BatchTopKSAE", s, x / norm_factor)
    xt = torch.tensor(x, dtype=torch.float32)
    np.testing.assert_allclose(_np(sae.encode(xt)), f_norm * norm_factor, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(sae(xt)), recon_norm * norm_factor, rtol=1e-4, atol=1e-4)


class Opaque:
    """A custom class: torch.load(weights_only=True) refuses to rebuild it."""


def test_pickled_code_is_refused(tmp_path):
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_config("AutoEncoder")))
    torch.save({"step": 1, "ae": {}, "config": Opaque()}, folder / "ae.pt")
    with pytest.raises(SAEError, match="cannot be loaded as weights only") as err:
        load_sae(folder)
    # torch's own advice to retry with weights_only=False (unsafe, and never done here) is not passed on
    assert "weights_only" not in str(err.value) and "likely succeed" not in str(err.value)
    assert str(err.value).endswith("saecircuits never unpickles code from SAE files")
    (folder / "ae.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(SAEError, match=r"ae\.pt cannot be loaded as weights only \(.*\): it is not a torch weights "
                                       r"file, it is truncated, or it holds pickled objects") as err:
        load_sae(folder)
    assert "weights_only" not in str(err.value)


def test_checkpoint_file_and_sites(tmp_path):
    s = _state("GatedAutoEncoder")
    folder = _save(tmp_path / "trainer_1", s, _config("GatedAutoEncoder", submodule="model.layers.2.mlp"))
    _save(folder / "checkpoints", s, None, name="ae_200.pt")
    sae = load_sae(folder / "checkpoints" / "ae_200.pt")  # config.json one folder up
    assert sae.hook_point == "blocks.2.hook_mlp_out" and sae.architecture == "gated"
    cfg = _config("GatedAutoEncoder", submodule="model.layers.2.mlp", io="in")
    (folder / "config.json").write_text(json.dumps(cfg))
    sae = load_sae(folder)
    assert sae.hook_point == "blocks.2.ln2.hook_normalized" and sae.cfg.extra["basis"]["norm_weight_applied"]
    (folder / "config.json").write_text(json.dumps(_config("GatedAutoEncoder", submodule="embed")))
    assert load_sae(folder).hook_point == "hook_embed"
    (folder / "config.json").write_text(json.dumps(_config("GatedAutoEncoder", io="in_and_out")))
    with pytest.raises(SAEError, match="io='in_and_out'"):
        load_sae(folder)
    (folder / "config.json").write_text(json.dumps(_config("GatedAutoEncoder")))
    with pytest.raises(SAEError, match="blocks.3.hook_resid_post' according to .* but hook='blocks.4.hook_resid_post'"):
        load_sae(folder, hook="blocks.4.hook_resid_post")


def test_class_from_tensor_names_and_conflicts(tmp_path):
    # without config.json: JumpReLU is told by its tensors, the hook must be given
    sae = load_sae(_save(tmp_path / "a", _state("JumpReluAutoEncoder"), None), hook="blocks.0.hook_resid_post")
    assert sae.architecture == "jumprelu"
    with pytest.raises(SAEError, match="which hook the SAE reads is not recorded"):
        load_sae(tmp_path / "a")
    # TopK and BatchTopK share tensor names and encode differently: the config must decide
    with pytest.raises(SAEError, match=r"fit \['AutoEncoderTopK', 'BatchTopKSAE'\]"):
        load_sae(_save(tmp_path / "b", _state("AutoEncoderTopK"), None), hook="blocks.0.hook_resid_post")
    # the config's class must fit the tensors
    with pytest.raises(SAEError, match="are not a JumpReluAutoEncoder's"):
        load_sae(_save(tmp_path / "c", _state("AutoEncoder"), _config("JumpReluAutoEncoder")))
    with pytest.raises(SAEError, match="k=4 in the state dict but k=7"):
        cfg = _config("AutoEncoderTopK")
        cfg["trainer"]["k"] = 7
        load_sae(_save(tmp_path / "d", _state("AutoEncoderTopK"), cfg))


def test_bad_files(tmp_path):
    # a transposed encoder whose shape differs from the config's
    s = _state("AutoEncoder")
    s["encoder.weight"] = s["encoder.weight"].T.copy()
    with pytest.raises(SAEError, match="encoder says d=40, F=12 but config.json says activation_dim=12"):
        load_sae(_save(tmp_path / "a", s, _config("AutoEncoder")))
    # d == F without a config: a transposed matrix could not be told apart
    sq = {"W_enc": _r(D, D), "b_enc": _r(D), "W_dec": _r(D, D), "b_dec": _r(D), "threshold": rng.uniform(0, 1, D)}
    with pytest.raises(SAEError, match="d == F = 12 and no config.json"):
        load_sae(_save(tmp_path / "b", sq, None), hook="blocks.0.hook_resid_post")
    # truncated file
    folder = _save(tmp_path / "c", _state("AutoEncoder"), _config("AutoEncoder"))
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="cannot be loaded as weights only"):
        load_sae(folder)
    # a transposed decoder ([F, d] where nn.Linear stores [d, F]): refused by name, not a broadcasting error from
    # the decoder-norm fold of the AutoEncoder (found by trying it)
    s = _state("AutoEncoder")
    s["decoder.weight"] = s["decoder.weight"].T.copy()
    with pytest.raises(SAEError, match=r"decoder.weight has shape \(40, 12\), the transpose of"):
        load_sae(_save(tmp_path / "t", s, _config("AutoEncoder")))
    # an integer weight is refused, not cast into weights (the k buffer of a TopK is an integer and stays allowed)
    s = _state("AutoEncoder")
    s["encoder.bias"] = np.arange(F, dtype=np.int64)
    with pytest.raises(SAEError, match="encoder.bias has dtype torch.int64, expected floating point"):
        load_sae(_save(tmp_path / "i", s, _config("AutoEncoder")))
    # unknown class
    with pytest.raises(SAEError, match="dictionary class 'CrossCoder' is not supported"):
        load_sae(_save(tmp_path / "d", _state("AutoEncoder"), {"trainer": {"dict_class": "CrossCoder"}}))


def test_released_pythia_dictionaries_take_the_site_from_their_folders(tmp_path):
    # saprmarks' feature-circuits dictionaries: dictionaries/pythia-70m-deduped/<site>/10_32768/ae.pt, older config
    cfg = {"dictionary": {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F},
           "buffer": {"d_submodule": D, "io": "out"}}
    for site, hook in (("resid_out_layer3", "blocks.3.hook_resid_post"), ("mlp_out_layer0", "blocks.0.hook_mlp_out"),
                       ("attn_out_layer5", "blocks.5.hook_attn_out"), ("embed", "hook_embed")):
        folder = _save(tmp_path / "pythia-70m-deduped" / site / "10_32768", _state("AutoEncoder"), cfg)
        sae = load_sae(folder)
        assert sae.hook_point == hook and sae.cfg.extra["source"]["site"] == f"{site} (folder name)"
    with pytest.raises(SAEError, match="which hook the SAE reads is not recorded"):
        load_sae(_save(tmp_path / "elsewhere" / "x", _state("AutoEncoder"), cfg))
