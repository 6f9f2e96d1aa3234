"""SAELens 6.x files both ways, without SAELens (issue 7 item 11).

* Reading: hand-written cfg.json fixtures in the form SAELens 6.x writes them (tests/saes/data/saelens6, see its
  SOURCE.md) with random weights under SAELens' tensor names; ``load_sae`` must encode and decode exactly as
  SAELens' maths, computed here independently in float64 from the file contents (``saelens_encode`` /
  ``saelens_decode``: standard ReLU, TopK with ``rescale_acts_by_decoder_norm``, JumpReLU ``ReLU(h) * (h >
  max(threshold, 0))``, BatchTopK's inference threshold, ``expected_average_only_in`` with the scaler file).
* Writing: ``saelens_read`` applies SAELens 6.x's reading rules to our folders (version marker, inference
  architecture registry without ``batchtopk``, config fields filtered per class, every tensor cast to ``dtype``,
  strict tensor names), and ``saelens_save`` writes what SAELens' ``save_model`` writes back; every architecture
  goes ours -> SAELens -> ours with the same encode/decode.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saecircuits.saes.base import SAEConfig, SAEError
from saecircuits.saes.io import load_sae, save_sae
from saecircuits.saes.registry import build_sae

DATA = Path(__file__).parent / "data"
FIXTURES = DATA / "saelens6"
HOOK = "blocks.0.mlp.hook_post"
D_IN, D_SAE = 6, 16

# --------------------------------------------------------------------------- SAELens 6.x maths and reading rules
# (from sae_lens/saes/{sae,standard_sae,topk_sae,jumprelu_sae,batchtopk_sae}.py and loading/pretrained_sae_loaders.py)
SAELENS_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "torch.float32": torch.float32, "torch.float64": torch.float64, "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
}
SAELENS_FIELDS = {  # inference config dataclass fields (SAELens drops every other key)
    "standard": {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                 "reshape_activations", "metadata"},
}
SAELENS_FIELDS["jumprelu"] = SAELENS_FIELDS["standard"]
SAELENS_FIELDS["topk"] = SAELENS_FIELDS["standard"] | {"k", "rescale_acts_by_decoder_norm"}
SAELENS_TENSORS = {
    "standard": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    "batchtopk": {"W_enc", "W_dec", "b_enc", "b_dec", "topk_threshold"},
}


def _compute_dtype(cfg: dict) -> torch.dtype:
    # float64 for a float32 file (then compared with a tolerance); SAELens computes a 16-bit SAE in its own dtype
    # (process_sae_in casts the input, the loader casts every tensor), so that case is computed in it too
    dtype = SAELENS_DTYPES[cfg["dtype"]]
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float64


def saelens_encode(cfg: dict, w: dict, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """SAELens' feature activations for raw activations ``x`` (a scaled checkpoint is fed ``x * scale``)."""
    dtype = _compute_dtype(cfg)
    w = {k: v.to(dtype) for k, v in w.items()}
    arch = cfg["architecture"]
    sae_in = x.double().mul(scale).to(dtype)
    if cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - w["b_dec"]
    h = sae_in @ w["W_enc"] + w["b_enc"]
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", arch == "batchtopk"):
        h = h * w["W_dec"].norm(dim=-1)
    if arch == "standard":
        return torch.relu(h)
    if arch == "topk":
        vals, idx = torch.topk(h, int(cfg["k"]), dim=-1)
        return torch.zeros_like(h).scatter(-1, idx, vals.relu())
    threshold = w["threshold"] if arch == "jumprelu" else w["topk_threshold"]
    return torch.relu(h) * (h > threshold.relu())


def saelens_decode(cfg: dict, w: dict, f: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """SAELens' reconstruction from features ``f``, in raw-activation units."""
    dtype = _compute_dtype(cfg)
    w = {k: v.to(dtype) for k, v in w.items()}
    f = f.to(dtype)
    arch = cfg["architecture"]
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", arch == "batchtopk"):
        f = f / w["W_dec"].norm(dim=-1)
    return (f @ w["W_dec"] + w["b_dec"]) / scale


def saelens_read(folder: Path) -> tuple[dict, dict]:
    """What SAELens 6.x ``SAE.load_from_disk`` builds from ``folder``: (config fields, tensors)."""
    d = json.loads((folder / "cfg.json").read_text())
    version = d.get("sae_lens_version") or d.get("metadata", {}).get("sae_lens_version")
    # without a 6.x marker SAELens converts the file as the pre-6 layout and rebuilds metadata from top-level keys
    assert version and int(re.match(r"\d+", version).group()) >= 6, "SAELens would read this as a pre-6 file"
    arch = d["architecture"]
    assert arch in SAELENS_FIELDS, f"SAELens has no inference class for {arch!r} (KeyError)"
    cfg = {"apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           **({"k": 100, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {})}
    cfg.update({k: v for k, v in d.items() if k in SAELENS_FIELDS[arch]})
    cfg["architecture"] = arch
    dtype = SAELENS_DTYPES[cfg["dtype"]]
    tensors = {k: v.to(dtype) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    assert set(tensors) == SAELENS_TENSORS[arch], "strict load_state_dict would fail"
    assert tensors["W_enc"].shape == (cfg["d_in"], cfg["d_sae"])
    return cfg, tensors


def saelens_save(cfg: dict, tensors: dict, folder: Path) -> Path:
    """What SAELens' ``save_model`` writes for an SAE read by :func:`saelens_read` (our block is gone)."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


# --------------------------------------------------------------------------- helpers
def _random_weights(names, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        # decoder rows of very different norms, as in a checkpoint trained with rescale_acts_by_decoder_norm
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * torch.rand(D_SAE, 1, generator=g).mul(4).add(0.1),
        "b_enc": 0.3 * torch.randn(D_SAE, generator=g),
        "b_dec": 0.3 * torch.randn(D_IN, generator=g),
        "threshold": torch.rand(D_SAE, generator=g) * 1.5,
        "topk_threshold": torch.tensor(0.7, dtype=torch.float64),
    }
    return {k: (v if k == "topk_threshold" else v.to(dtype)) for k, v in w.items() if k in names}


def _fixture_folder(tmp_path: Path, name: str, weights: dict | None = None) -> tuple[Path, dict, dict]:
    cfg = json.loads((FIXTURES / f"{name}.json").read_text())
    folder = tmp_path / name
    folder.mkdir()
    (folder / "cfg.json").write_text((FIXTURES / f"{name}.json").read_text())
    scaler = FIXTURES / f"{name}.activation_scaler.json"
    if scaler.is_file():
        (folder / "activation_scaler.json").write_text(scaler.read_text())
    dtype = SAELENS_DTYPES[cfg["dtype"]]
    w = weights or _random_weights(SAELENS_TENSORS[cfg["architecture"]], dtype)
    save_file(w, str(folder / "sae_weights.safetensors"))
    return folder, cfg, w


def _x(n=512, seed=1):
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


FIXTURE_ARCH = {
    "standard_inference": "standard",
    "standard_training": "standard",
    "standard_bf16_after_to": "standard",
    "topk_training_checkpoint": "topk",
    "topk_inference": "topk",
    "jumprelu_training_checkpoint": "jumprelu",
    "jumprelu_from_batchtopk": "jumprelu",
    "batchtopk_training_checkpoint": "batchtopk",
}


# --------------------------------------------------------------------------- reading SAELens files
@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_saelens_fixture_loads_with_saelens_maths(tmp_path, name):
    folder, cfg, w = _fixture_folder(tmp_path, name)
    scale = 1.0
    if (folder / "activation_scaler.json").is_file():
        scale = json.loads((folder / "activation_scaler.json").read_text())["scaling_factor"]
    sae = load_sae(folder)
    assert sae.architecture == FIXTURE_ARCH[name]
    assert sae.hook_point == HOOK and sae.cfg.model_name == "tiny-stories-1L-21M"
    assert sae.cfg.apply_b_dec_to_input == cfg["apply_b_dec_to_input"]
    x = _x()
    f_ref = saelens_encode(cfg, w, x, scale)
    f = sae.encode(x)
    assert torch.equal(f > 0, f_ref > 0)  # every on/off decision
    tol = dict(rtol=0, atol=0) if f_ref.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.to(f_ref.dtype), f_ref, **tol)
    torch.testing.assert_close(sae(x).to(f_ref.dtype), saelens_decode(cfg, w, f_ref, scale), **tol)
    torch.testing.assert_close(sae.decode(f_ref).to(f_ref.dtype), saelens_decode(cfg, w, f_ref, scale), **tol)
    assert not sae.training


def test_topk_rescale_by_decoder_norm_is_folded_not_ignored(tmp_path):
    # the input: a TopK training checkpoint with rescale_acts_by_decoder_norm: true
    folder, cfg, w = _fixture_folder(tmp_path, "topk_training_checkpoint")
    (folder / "activation_scaler.json").unlink()
    d = json.loads((folder / "cfg.json").read_text())
    d["normalize_activations"] = "none"
    (folder / "cfg.json").write_text(json.dumps(d))
    sae = load_sae(folder)
    x = _x(1024)
    f_ref = saelens_encode(d, w, x)
    # reading the weights without the rescale (the old behaviour) changes many on/off decisions
    naive = saelens_encode({**d, "rescale_acts_by_decoder_norm": False}, w, x)
    assert int(((naive > 0) != (f_ref > 0)).sum()) > 50
    f = sae.encode(x)
    assert torch.equal(f > 0, f_ref > 0)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), saelens_decode(d, w, f_ref), rtol=1e-5, atol=1e-5)
    # folded: unit decoder rows, and the encoder scaled by the old norms
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, w["W_enc"] * w["W_dec"].norm(dim=1))
    assert sae.cfg.extra["saelens"]["folded_decoder_norms"] is True


def test_expected_average_only_in_needs_the_scaler_file(tmp_path):
    folder, _, _ = _fixture_folder(tmp_path, "topk_training_checkpoint")
    (folder / "activation_scaler.json").write_text('{"scaling_factor": null}')
    load_sae(folder)  # not estimated yet: nothing to fold (SAELens scales nothing either)
    (folder / "activation_scaler.json").unlink()
    with pytest.raises(SAEError, match=r"expected_average_only_in.*activation_scaler\.json"):
        load_sae(folder)


def test_negative_jumprelu_thresholds_gate_like_zero(tmp_path):
    # SAELens 6.49 trains the threshold directly and gates with threshold.relu(); 6.18 gates ReLU(h) with it
    w = _random_weights(SAELENS_TENSORS["jumprelu"])
    w["threshold"][:5] = -torch.rand(5)
    folder, cfg, w = _fixture_folder(tmp_path, "jumprelu_training_checkpoint", w)
    sae = load_sae(folder)
    x = _x()
    torch.testing.assert_close(sae.encode(x).double(), saelens_encode(cfg, w, x), rtol=1e-5, atol=1e-5)
    assert sae.cfg.extra["bandwidth"] == 0.05 and sae.cfg.extra["threshold_init"] == 0.01


def test_batchtopk_checkpoint_becomes_our_batchtopk(tmp_path):
    folder, _, _ = _fixture_folder(tmp_path, "batchtopk_training_checkpoint")
    sae = load_sae(folder)
    assert sae.cfg.extra["k"] == 3 and isinstance(sae.cfg.extra["k"], int)
    assert sae.cfg.extra["threshold_lr"] == 0.01
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.7))
    assert sae.cfg.extra["saelens"]["training"]["decoder_init_norm"] == 0.1


def test_bf16_saelens_file_keeps_its_dtype(tmp_path):
    folder, _, w = _fixture_folder(tmp_path, "standard_bf16_after_to")
    sae = load_sae(folder)
    assert sae.cfg.dtype == "bfloat16" and sae.W_enc.dtype == torch.bfloat16
    assert torch.equal(sae.W_enc, w["W_enc"])


@pytest.mark.parametrize(
    "change,match",
    [
        # gated, layer_norm and hook_z files load now (tests/saes/formats/test_saelens.py checks their maths)
        ({"architecture": "abstopk"}, r"architecture 'abstopk' is not supported"),
        ({"architecture": "gated"}, r"tensors do not match the cfg.json architecture \(missing \['b_gate'"),
        ({"normalize_activations": "constant_norm_rescale"}, r"normalize_activations='constant_norm_rescale'"),
        ({"reshape_activations": "hook_q"}, r"reshape_activations='hook_q'"),
        ({"metadata": {"sae_lens_version": "6.18.0", "hook_name": HOOK, "hook_head_index": 3}}, "hook_head_index=3"),
        ({"use_new_gating": True}, r"keys \['use_new_gating'\] are not understood"),
        ({"rescale_acts_by_decoder_norm": True}, r"keys \['rescale_acts_by_decoder_norm'\] are not understood"),
        ({"dtype": "int8"}, "not a supported torch floating-point dtype"),
        ({"metadata": {"sae_lens_version": "6.18.0"}}, r"lacks the hook name"),
    ],
)
def test_saelens_keys_that_change_the_maths_are_refused(tmp_path, change, match):
    folder, cfg, _ = _fixture_folder(tmp_path, "standard_inference")
    (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(SAEError, match=match) as info:
        load_sae(folder)
    assert "cfg.json" in str(info.value)


def test_pre6_files(tmp_path):
    folder, cfg, w = _fixture_folder(tmp_path, "standard_inference")
    md = cfg.pop("metadata")
    old = {**cfg, "hook_point": md["hook_name"], "model_name": md["model_name"], "activation_fn_str": "relu",
           "finetuning_scaling_factor": False, "normalize_activations": False}
    (folder / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(folder)  # SAELens' own pre-6 conversion, with the model name kept
    assert sae.hook_point == HOOK and sae.cfg.model_name == "tiny-stories-1L-21M"
    torch.testing.assert_close(sae.encode(_x()).double(), saelens_encode(cfg, w, _x()), rtol=1e-5, atol=1e-5)
    # training keys of SAELens < 6 are known and harmless: loaded, kept as provenance (they used to be refused)
    (folder / "cfg.json").write_text(json.dumps({**old, "lr": 3e-4, "hook_point_layer": 0}))
    sae = load_sae(folder)
    assert sae.cfg.extra["saelens"]["training"] == {"lr": 3e-4, "hook_point_layer": 0}
    torch.testing.assert_close(sae.encode(_x()).double(), saelens_encode(cfg, w, _x()), rtol=1e-5, atol=1e-5)
    for bad, match in [
        ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu' is not supported"),
        ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor"),
        ({"use_new_gating": True}, r"keys \['use_new_gating'\] are not understood"),
    ]:
        (folder / "cfg.json").write_text(json.dumps({**old, **bad}))
        with pytest.raises(SAEError, match=match):
            load_sae(folder)


def test_scaling_factor_tensor(tmp_path):
    w = {**_random_weights(SAELENS_TENSORS["standard"]), "scaling_factor": torch.ones(D_SAE)}
    folder, _, _ = _fixture_folder(tmp_path, "standard_inference", w)
    load_sae(folder)  # all ones: dropped, as SAELens does
    w["scaling_factor"] = torch.full((D_SAE,), 2.0)
    save_file(w, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEError, match="scaling_factor"):
        load_sae(folder)


def test_saelens_tensor_names_are_checked(tmp_path):
    w = _random_weights(SAELENS_TENSORS["standard"])
    folder, _, _ = _fixture_folder(tmp_path, "jumprelu_from_batchtopk", w)  # no threshold
    with pytest.raises(SAEError, match=r"missing \['threshold'\]"):
        load_sae(folder)


# --------------------------------------------------------------------------- writing for SAELens, and back
def _our_sae(arch: str, dtype: str = "float32"):
    # thresholds representable in bfloat16, so SAELens' cast of every tensor to the file dtype keeps them
    extra = {"standard": {}, "topk": {"k": 3}, "batchtopk": {"k": 3}, "jumprelu": {"threshold_init": 0.375}}[arch]
    cfg = SAEConfig(arch, D_IN, D_SAE, HOOK, model_name="tiny-stories-1L-21M", dtype=dtype, extra=extra)
    sae = build_sae(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.b_enc.add_(0.3 * torch.randn(D_SAE, generator=g).to(sae.dtype))
        sae.b_dec.add_(0.3 * torch.randn(D_IN, generator=g).to(sae.dtype))
        if arch == "batchtopk":
            sae.threshold.fill_(0.375)
    return sae.eval()


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_architecture_round_trips_through_saelens(tmp_path, arch, dtype):
    sae = _our_sae(arch, dtype)
    folder = save_sae(sae, tmp_path / "ours")
    cfg, tensors = saelens_read(folder)
    # SAELens reads back the hook name, model name and dtype
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny-stories-1L-21M"
    assert SAELENS_DTYPES[cfg["dtype"]] == getattr(torch, dtype)
    assert cfg["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)  # SAELens' own BatchTopK form
    x = _x()
    f_saelens = saelens_encode(cfg, tensors, x)
    assert torch.equal(sae.encode(x) > 0, f_saelens > 0)
    tol = dict(rtol=0, atol=0) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x).to(f_saelens.dtype), f_saelens, **tol)
    torch.testing.assert_close(sae(x).to(f_saelens.dtype), saelens_decode(cfg, tensors, f_saelens), **tol)
    # SAELens saves it again (our block is dropped); we read that back to the same SAE
    back = load_sae(saelens_save({**cfg, "device": "cpu"}, tensors, tmp_path / "saelens"))
    assert back.architecture == ("jumprelu" if arch == "batchtopk" else arch)
    assert back.hook_point == HOOK and back.cfg.model_name == "tiny-stories-1L-21M"
    assert back.cfg.dtype == dtype
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    # and our own reading of our folder gives back the very same SAE, config included
    again = load_sae(folder)
    assert type(again) is type(sae) and again.cfg == sae.cfg
    assert torch.equal(again.encode(x), sae.encode(x)) and torch.equal(again(x), sae(x))


def test_written_cfg_json_is_saelens_6_shaped(tmp_path):
    folder = save_sae(_our_sae("topk"), tmp_path / "s")
    d = json.loads((folder / "cfg.json").read_text())
    assert d["metadata"]["sae_lens_version"].startswith("6.")
    assert d["metadata"]["hook_head_index"] is None
    assert {k for k in d if k != "saecircuits"} == SAELENS_FIELDS["topk"] | {"architecture"}
    assert d["k"] == 3 and d["rescale_acts_by_decoder_norm"] is False
    assert d["normalize_activations"] == "none" and d["reshape_activations"] == "none"
    assert d["saecircuits"]["format_version"] == 2
