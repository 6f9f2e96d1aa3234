"""SAELens layout round trips, clear errors for bad files, reference-checkpoint import."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saecircuits.saes.base import SAEConfig, SAEError
from saecircuits.saes.io import load_sae, save_sae
from saecircuits.saes.reference_checkpoint import import_reference_checkpoint
from saecircuits.saes.registry import build_sae

HOOK = "blocks.1.mlp.hook_post"
DATA = Path(__file__).parent / "data"
EXTRA = {"standard": {}, "topk": {"k": 3}, "batchtopk": {"k": 3}, "jumprelu": {"threshold_init": 0.05}}


def _sae(arch="standard", dtype="float32"):
    sae = build_sae(SAEConfig(arch, 6, 16, HOOK, model_name="tiny", dtype=dtype, extra=EXTRA[arch]), seed=5)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
        if arch == "jumprelu":  # thresholds are >= 0
            sae.threshold.abs_()
    return sae.eval()


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_round_trip_every_architecture(tmp_path, arch, dtype):
    sae = _sae(arch, dtype)
    folder = save_sae(sae, tmp_path / arch)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input"):
        assert key in cfg
    assert cfg["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)  # as SAELens writes BatchTopK
    assert cfg["dtype"] == dtype and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["model_name"] == "tiny" and cfg["metadata"]["hook_name"] == HOOK
    names = set(load_file(str(folder / "sae_weights.safetensors")))
    assert names == {"W_enc", "W_dec", "b_enc", "b_dec"} | (
        {"threshold"} if arch in ("batchtopk", "jumprelu") else set()
    )
    loaded = load_sae(folder, device="cpu")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and not loaded.training
    # nothing is rounded: every tensor, and so every feature and reconstruction, comes back bit for bit
    for name, t in sae.export_weights().items():
        assert loaded.export_weights()[name].dtype == t.dtype and torch.equal(loaded.export_weights()[name], t)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))  # atomic writes leave no temp files


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SAEError, match="does not exist"):
        load_sae(tmp_path / "nope")
    folder = save_sae(_sae(), tmp_path / "s")
    w = folder / "sae_weights.safetensors"
    good = w.read_bytes()
    w.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SAEError, match=r"sae_weights\.safetensors cannot be read.*corrupt"):
        load_sae(folder)
    w.write_bytes(good)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match=r"cfg\.json is not valid JSON"):
        load_sae(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(SAEError, match=r"cfg\.json is missing"):
        load_sae(folder)


@pytest.mark.parametrize("plain_saelens", [False, True])
@pytest.mark.parametrize(("name", "bad"), [("W_dec", float("nan")), ("W_enc", float("inf")),
                                           ("b_enc", float("-inf")), ("threshold", float("nan"))])
def test_nan_or_infinite_weights_are_refused(tmp_path, plain_saelens, name, bad):
    # A NaN weight made the run write null losses with "checks: all passed"; every other family was refused already
    # (formats.common.check_shapes), and the SAELens / saecircuits folder must be too, through both loaders.
    from saecircuits.saes.formats import load_sae as load_any

    folder = save_sae(_sae("jumprelu"), tmp_path / "s")
    if plain_saelens:
        cfg = json.loads((folder / "cfg.json").read_text())
        del cfg["saecircuits"]
        (folder / "cfg.json").write_text(json.dumps(cfg))
    assert torch.isfinite(load_sae(folder).W_dec).all()  # the file as saved loads
    w = load_file(str(folder / "sae_weights.safetensors"))
    w[name].view(-1)[3] = bad
    save_file(w, str(folder / "sae_weights.safetensors"))
    for load in (load_sae, load_any):
        with pytest.raises(SAEError, match=rf"sae_weights\.safetensors: {name} holds NaN or infinite values"):
            load(folder)


@pytest.mark.parametrize("k", [0, 17])
def test_a_topk_k_outside_1_to_d_sae_names_the_file(tmp_path, k):
    # the error named cfg.extra['k'] and SAEConfig but not the cfg.json the bad k came from
    folder = save_sae(_sae("topk"), tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["saecircuits"]
    cfg["k"] = k
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match=rf"^{re.escape(str(folder / 'cfg.json'))}: topk SAE needs an integer .* in "
                                       rf"1\.\.d_sae=16, got {k}"):
        load_sae(folder)


def test_wrong_shapes_and_missing_tensor(tmp_path):
    folder = save_sae(_sae(), tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["saecircuits"]["config"]["d_sae"] = cfg["d_sae"] = 32
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match=r"W_enc has shape \(6, 16\), expected \(6, 32\)"):
        load_sae(folder)
    folder = save_sae(_sae(), tmp_path / "t")
    w = load_file(str(folder / "sae_weights.safetensors"))
    del w["b_dec"]
    save_file(w, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEError, match=r"missing \['b_dec'\]"):
        load_sae(folder)


def test_plain_saelens_cfg_is_read(tmp_path):
    # our file with the "saecircuits" block removed is a plain SAELens 6.x file
    folder = save_sae(_sae("topk"), tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["saecircuits"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(folder)
    assert loaded.cfg.architecture == "topk" and loaded.cfg.extra["k"] == 3 and loaded.hook_point == HOOK
    assert loaded.cfg.model_name == "tiny"
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(x), _sae("topk").encode(x))


def test_saelens_keys_must_agree_with_our_block(tmp_path):
    folder = save_sae(_sae("standard"), tmp_path / "s")
    good = json.loads((folder / "cfg.json").read_text())
    for key, value in [("apply_b_dec_to_input", False), ("normalize_activations", "layer_norm"),
                       ("architecture", "topk"), ("d_sae", 32), ("dtype", "bfloat16")]:
        (folder / "cfg.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(SAEError, match=f"'{key}' is .* in the SAELens keys but .* in the 'saecircuits' block"):
            load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**good, "new_switch": 1}))
    with pytest.raises(SAEError, match=r"keys \['new_switch'\] are not understood"):
        load_sae(folder)


@pytest.mark.parametrize(("arch", "bad"), [("standard", "k"), ("topk", "threshold_init"), ("jumprelu", "k"),
                                         ("batchtopk", "some_future_switch")])
def test_unknown_or_misplaced_extra_keys_in_our_block_are_refused(tmp_path, arch, bad):
    """A key our block's cfg.extra does not use for this architecture (a 'k' on a standard SAE is silently
    ignored otherwise) is refused with the key, the architecture and the keys it does use."""
    folder = save_sae(_sae(arch), tmp_path / arch)
    good = json.loads((folder / "cfg.json").read_text())
    load_sae(folder)  # what save_sae writes loads
    changed = json.loads(json.dumps(good))
    changed["saecircuits"]["config"]["extra"][bad] = 7
    (folder / "cfg.json").write_text(json.dumps(changed))
    with pytest.raises(SAEError, match=rf"extra' has keys \['{bad}'\] that a '{arch}' SAE does not use"):
        load_sae(folder)


def _write_v1(tmp_path, name, weights):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "cfg.json").write_text((DATA / "saecircuits_v1" / f"{name}.json").read_text())
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def _core(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(6, 16, generator=g), "W_dec": torch.randn(16, 6, generator=g),
            "b_enc": torch.randn(16, generator=g), "b_dec": torch.randn(6, generator=g)}


def test_our_format_1_files_still_load(tmp_path):
    # hand-written in the form the first save_sae wrote (tests/saes/data/saecircuits_v1/SOURCE.md)
    core = _core()
    g = torch.Generator().manual_seed(1)
    x, threshold = torch.randn(9, 6, generator=g), torch.rand(16, generator=g) + 0.1
    h = (x - core["b_dec"]) @ core["W_enc"] + core["b_enc"]
    sae = load_sae(_write_v1(tmp_path, "batchtopk", {**core, "threshold": torch.full((16,), 0.5)}))
    assert sae.architecture == "batchtopk" and sae.cfg.extra["k"] == 3 and sae.cfg.extra["threshold_lr"] == 0.01
    torch.testing.assert_close(sae.encode(x), torch.where(h > 0.5, h, torch.zeros_like(h)))
    sae = load_sae(_write_v1(tmp_path, "jumprelu", {**core, "threshold": threshold}))
    assert sae.cfg.extra["threshold_init"] == 0.05 and sae.cfg.extra["bandwidth"] == 1e-3  # the old default
    torch.testing.assert_close(sae.encode(x), torch.where(h > threshold, h, torch.zeros_like(h)))
    assert torch.equal(sae.threshold.detach(), threshold)  # exactly the file's values


def test_old_file_with_a_stale_dtype_is_not_rounded(tmp_path, caplog):
    # issue 7: config bfloat16, weights float32 (moved with .to(torch.float32) before the fix)
    core = _core()
    sae = load_sae(_write_v1(tmp_path, "standard_bf16_config_fp32_weights", core))
    assert sae.cfg.dtype == "float32" and torch.equal(sae.W_enc, core["W_enc"])
    assert "stored as float32" in caplog.text


def _write_reference(tmp_path, d_in=8, expansion=4, **overrides):
    gen = torch.Generator().manual_seed(0)
    state = {
        "W_enc": torch.randn(d_in, d_in * expansion, generator=gen),
        "W_dec": torch.randn(d_in * expansion, d_in, generator=gen),
        "b_enc": torch.randn(d_in * expansion, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen),
    }
    cfg = {
        "layer": 1,
        "act": "mlp.hook_post",
        "expansion_factor": expansion,
        "l1_coeff": [0.0001, 0.00015],
        "reg": "combined_hoyer_sqrt",
        "d_in": d_in,
        "model_name": "tiny-stories-2L-33M",
        "save_name": "189_giddy_water",
        "batch_size": 5080,
        **overrides,
    }
    torch.save(state, tmp_path / "189_giddy_water.pt")
    (tmp_path / "189_giddy_water.json").write_text(json.dumps(cfg))
    return state, tmp_path / "189_giddy_water.pt", tmp_path / "189_giddy_water.json"


def test_import_reference_checkpoint(tmp_path):
    state, pt, js = _write_reference(tmp_path)
    sae = import_reference_checkpoint(pt, js)
    assert sae.cfg.architecture == "standard" and sae.hook_point == "blocks.1.mlp.hook_post"
    assert sae.d_in == 8 and sae.d_sae == 32 and sae.cfg.model_name == "tiny-stories-2L-33M"
    assert sae.cfg.extra["reference_config"]["reg"] == "combined_hoyer_sqrt"
    # the reference notebook's forward, written out independently
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    f = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ state["W_dec"] + state["b_dec"])
    # and it saves/loads in the SAELens layout
    torch.testing.assert_close(load_sae(save_sae(sae, tmp_path / "converted"))(x), sae(x))


def test_import_reference_errors(tmp_path):
    _, pt, js = _write_reference(tmp_path, expansion_factor=2)  # JSON says 2, tensors are x4
    with pytest.raises(SAEError, match=r"189_giddy_water\.pt: W_enc has shape \(8, 32\), expected \(8, 16\)"):
        import_reference_checkpoint(pt, js)
    js.write_text(json.dumps({"layer": 0, "act": "mlp.hook_post"}))
    with pytest.raises(SAEError, match=r"lacks keys \['expansion_factor'\]"):
        import_reference_checkpoint(pt, js)
    with pytest.raises(SAEError, match="is missing"):
        import_reference_checkpoint(tmp_path / "x.pt", js)
    # a pickle that is not plain weights is refused (weights_only=True), with the file named
    _, pt, js = _write_reference(tmp_path)
    torch.save({"W_enc": torch.zeros(1), "evil": _Unpicklable()}, pt)
    with pytest.raises(SAEError, match=r"189_giddy_water\.pt cannot be loaded as a weights-only"):
        import_reference_checkpoint(pt, js)


class _Unpicklable:
    """A custom class: torch.load(weights_only=True) refuses to rebuild it."""
