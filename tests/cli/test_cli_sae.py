"""``saecircuits sae inspect`` / ``sae convert``, and ``--sae``/``--hook`` of ``run`` and ``feature`` on SAEs of any
family: a small fake family registered here (files that do not say their hook, maths without b_dec subtraction,
like Gemma Scope 1), SAELens folders, and hf:// names read from a hand-built Hugging Face cache (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import STORIES, random_sae, tiny_neo_hf, tiny_tokenizer

from saecircuits.saes.base import SAEConfig
from saecircuits.saes.formats import Family, LoadOptions, families, register_family, resolve_hook
from saecircuits.saes.formats.common import build_from_tensors, read_npz
from saecircuits.saes.io import load_sae as load_saelens
from saecircuits.saes.io import save_sae

FAKE_SUFFIX = ".i14fake.npz"
RESID = "blocks.0.hook_resid_post"
D, F = 32, 48  # tiny GPT-Neo's d_model; features


def _load_fake(path: Path, options: LoadOptions):
    """The fake family: ``W_enc [d, F]``, ``W_dec [F, d]``, ``b_enc``, ``b_dec`` in an .npz, no config; maths
    ``relu(x @ W_enc + b_enc) @ W_dec + b_dec`` (no b_dec subtraction); activations of a raw HF model."""
    w = read_npz(path)
    d, f = w["W_enc"].shape
    cfg = SAEConfig("standard", d, f, resolve_hook(None, options.hook, path), dtype="float32",
                    apply_b_dec_to_input=False,
                    extra={"source": {"site": "fake-resid"},
                           "model_processing": {"fold_ln": True, "center_writing_weights": False,
                                                "fold_value_biases": True},
                           "basis": {"input": "raw residual stream"}})
    return build_from_tensors(cfg, w, path, options.device)


if not any(f.name == "i14fake" for f in families()):
    register_family(Family("i14fake", "fake test family", lambda p: p.name.endswith(FAKE_SUFFIX), _load_fake,
                           "an .i14fake.npz file"))


def _fake_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(0, 0.5, (D, F)).astype(np.float32),
            "W_dec": rng.normal(0, 0.3, (F, D)).astype(np.float32),
            "b_enc": rng.normal(0, 0.2, F).astype(np.float32), "b_dec": rng.normal(0, 0.4, D).astype(np.float32)}


def _write_fake(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **_fake_arrays(seed))
    return path


def _fake_forward(a: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fake family's own formula in plain numpy (float64): features and reconstruction."""
    f = np.maximum(x @ a["W_enc"].astype(np.float64) + a["b_enc"], 0)
    return f, f @ a["W_dec"].astype(np.float64) + a["b_dec"]


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from saecircuits.cli import _register, app, expand_multi_value_options

    _register()
    return CliRunner().invoke(app, expand_multi_value_options(args))


def _one_error_line(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """A hand-built Hugging Face cache (models--owner--repo/snapshots/<rev>/... + refs/main), offline."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cached_repo(cache: Path, repo: str, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    storage = cache / ("models--" + repo.replace("/", "--"))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(rev)
    snap = storage / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    return snap


# ------------------------------------------------------------------------------------------------- inspect
def test_inspect_prints_what_the_sae_is(tmp_path):
    sae = random_sae()
    folder = save_sae(sae, tmp_path / "sae")
    res = _cli(["sae", "inspect", str(folder)])
    assert res.exit_code == 0, res.output
    for text in ("saelens", sae.hook_point, f"{sae.d_in} / {sae.d_out} / {sae.d_sae}", "standard", "float32",
                 "apply_b_dec_to_input=True"):
        assert text in res.output, text
    info = json.loads(_cli(["sae", "inspect", str(folder), "--json"]).output)
    assert (info["family"], info["site"]["hook_point"], info["d_in"], info["d_out"], info["d_sae"], info["dtype"]) == (
        "saelens", sae.hook_point, sae.d_in, sae.d_in, sae.d_sae, "float32")
    assert info["source"]["path"] == str(folder)


def test_a_folder_with_config_but_no_weights_names_the_missing_file(tmp_path):
    """cfg.json without its weights (a copy that stopped half-way) is told the weights file it lacks, not the list
    of every family; the same holds for the model's run (--sae) and for a Gemma Scope 2 / Llama Scope R1 config."""
    folder = save_sae(random_sae(), tmp_path / "sae")
    (folder / "sae_weights.safetensors").unlink()
    corpus = tmp_path / "c.txt"
    corpus.write_text('Tom said, "Hi."\n')
    run = ["run", "--model", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "o"), "--sae", str(folder)]
    for args in (["sae", "inspect", str(folder)], ["feature", "0", "--sae", str(folder)], run):
        line = _one_error_line(_cli(args), "sae_weights.safetensors")
        assert "cfg.json" in line and "sae.safetensors (EleutherAI sparsify)" in line
        assert "not an SAE saecircuits recognises" not in line
    other = tmp_path / "gs2"
    other.mkdir()
    (other / "config.json").write_text("{}")
    line = _one_error_line(_cli(["sae", "inspect", str(other)]), "params.safetensors")
    assert "config.json" in line and "sae_weights.safetensors (Llama Scope" in line and "ae.pt" in line


def test_inspect_a_family_without_hook_needs_hook(tmp_path):
    path = _write_fake(tmp_path / f"sae{FAKE_SUFFIX}")
    _one_error_line(_cli(["sae", "inspect", str(path)]), "--hook")
    info = json.loads(_cli(["sae", "inspect", str(path), "--hook", RESID, "--json"]).output)
    assert info["family"] == "i14fake" and info["site"] == {"family_site": "fake-resid", "hook_point": RESID,
                                                           "hook_point_out": None}
    assert info["basis"]["model_processing"]["center_writing_weights"] is False
    assert info["maths"]["apply_b_dec_to_input"] is False and (info["d_in"], info["d_sae"]) == (D, F)


def test_inspect_reads_hf_names_from_the_cache_offline(tmp_path, hf_cache):
    sae = random_sae(hook_point="blocks.6.hook_resid_pre")
    snap = _cached_repo(hf_cache, "jbloom/GPT2-Small-SAEs-Reformatted")
    save_sae(sae, snap / "blocks.6.hook_resid_pre")
    for name in ("hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.6.hook_resid_pre",
                 "gpt2-small-res-jb/blocks.6.hook_resid_pre"):
        res = _cli(["sae", "inspect", name, "--json"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.output)
        assert info["given"] == name and info["source"]["path"] == str(snap / "blocks.6.hook_resid_pre")
    _one_error_line(_cli(["sae", "inspect", "hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.7.hook_resid_pre"]),
                    "not in the Hugging Face cache", "HF_HUB_OFFLINE", "hf download")


# ------------------------------------------------------------------------------------------------- convert
def test_convert_writes_the_saelens_6_layout_with_the_same_maths(tmp_path):
    path = _write_fake(tmp_path / f"sae{FAKE_SUFFIX}", seed=3)
    out = tmp_path / "converted"
    res = _cli(["sae", "convert", str(path), str(out), "--hook", RESID])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", path.name]  # no temporary folder left
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"].startswith("6") and cfg["metadata"]["hook_name"] == RESID
    assert cfg["apply_b_dec_to_input"] is False and cfg["architecture"] == "standard"
    # the basis the SAE expects, where SAELens users read it
    assert cfg["metadata"]["model_from_pretrained_kwargs"]["center_writing_weights"] is False
    back = load_saelens(out)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    f_ref, recon_ref = _fake_forward(_fake_arrays(3), x.double().numpy())
    with torch.no_grad():
        f = back.encode(x)
        recon = back.decode(f)
    np.testing.assert_allclose(f.double().numpy(), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(recon.double().numpy(), recon_ref, rtol=1e-5, atol=1e-5)
    assert (f > 0).any() and (f == 0).any()  # the ReLU decided something


def test_convert_refuses_what_saelens_6_cannot_express_and_leaves_nothing(tmp_path, monkeypatch):
    from saecircuits.saes.registry import build_sae

    topk = build_sae(SAEConfig("topk", D, F, RESID, extra={"k": 4, "topk_relu": False}))
    folder = tmp_path / "src"
    monkeypatch.setattr("saecircuits.cli.sae._load", lambda path, hook: topk)
    _one_error_line(_cli(["sae", "convert", str(folder), str(tmp_path / "o")]), "SAELens 6", "negative")
    transcoder = build_sae(SAEConfig("standard", D, F, "blocks.0.ln2.hook_normalized", apply_b_dec_to_input=False,
                                     hook_point_out="blocks.0.hook_mlp_out",
                                     extra={"basis": {"norm_weight_applied": True}}))
    monkeypatch.setattr("saecircuits.cli.sae._load", lambda path, hook: transcoder)
    _one_error_line(_cli(["sae", "convert", str(folder), str(tmp_path / "o")]), "norm's learned weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_convert_error_midway_leaves_no_partial_folder(tmp_path, monkeypatch):
    path = _write_fake(tmp_path / f"sae{FAKE_SUFFIX}")

    def broken_save(sae, folder):
        (Path(folder) / "sae_weights.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("saecircuits.saes.io.save_sae", broken_save)
    _one_error_line(_cli(["sae", "convert", str(path), str(tmp_path / "o"), "--hook", RESID]), "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_convert_never_overwrites(tmp_path):
    folder = save_sae(random_sae(), tmp_path / "sae")
    (tmp_path / "o").mkdir()
    _one_error_line(_cli(["sae", "convert", str(folder), str(tmp_path / "o")]), "already exists")


# ------------------------------------------------------------------------------------------------- --sae / --hook
def test_feature_takes_any_family_with_hook(tmp_path):
    path = _write_fake(tmp_path / f"sae{FAKE_SUFFIX}", seed=5)
    res = _cli(["feature", "--sae", str(path), "--hook", RESID, "4"])
    assert res.exit_code == 0, res.output
    assert f"Feature 4 of {RESID} (d_sae {F};" in res.output
    assert f"encoder bias {round(float(_fake_arrays(5)['b_enc'][4]), 6)}" in res.output
    _one_error_line(_cli(["feature", "--sae", str(path), "4"]), "--hook")


def test_run_checks_one_hook_per_sae(tmp_path):
    path = _write_fake(tmp_path / f"sae{FAKE_SUFFIX}")
    corpus = tmp_path / "c.txt"
    corpus.write_text('Tom said, "Hi."\n')
    base = ["run", "--model", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "o")]
    _one_error_line(_cli([*base, "--sae", str(path), "--hook", RESID, "blocks.1.hook_resid_post"]),
                    "one --hook per --sae")
    _one_error_line(_cli([*base, "--sae", str(tmp_path / "missing.npz")]), "no such file or folder")
    assert not (tmp_path / "o").exists()


def _model_and_corpus(tmp_path):
    """A saved tiny GPT-Neo folder (model + tokenizer) and a corpus file of the test stories."""
    model_dir = tmp_path / "model"
    tiny_neo_hf().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    return model_dir, corpus


def test_whole_run_with_a_foreign_format_residual_sae(tmp_path):
    """`saecircuits run` end to end on a tiny GPT-Neo with an SAE of another family on the residual stream."""
    model_dir, corpus = _model_and_corpus(tmp_path)
    path = _write_fake(tmp_path / f"sae{FAKE_SUFFIX}", seed=2)
    out = tmp_path / "out"
    res = _cli(["run", "--model", str(model_dir), "--data", str(corpus), "--out", str(out),
                "--workspace", str(tmp_path / "ws"), "--sae", str(path), "--hook", RESID,
                "--no-center-writing-weights", "--no-circuit", "--max-prompts", "20", "--feature-selection", "3"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    (entry,) = results["saes"]
    assert entry["hook_point"] == RESID and entry["d_sae"] == F
    assert entry["training"]["sources"][0]["family"] == "i14fake"
    # the SAE's own basis is checked against the model: the default (centred) model is refused, naming the fix
    res = _cli(["run", "--model", str(model_dir), "--data", str(corpus), "--out", str(tmp_path / "o2"),
                "--workspace", str(tmp_path / "ws"), "--sae", str(path), "--hook", RESID, "--no-circuit",
                "--max-prompts", "20"])
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: ") and "--no-center-writing-weights" in last, res.output
    assert not (tmp_path / "o2").exists()


def test_run_refuses_an_sae_of_a_missing_hook_before_any_analysis(tmp_path):
    """An SAE of blocks.7 on a 2-layer model is refused right after the model loads: no task, no DLA, no output."""
    model_dir, corpus = _model_and_corpus(tmp_path)
    folder = save_sae(random_sae(hook_point="blocks.7.mlp.hook_post"), tmp_path / "sae")
    res = _cli(["run", "--model", str(model_dir), "--data", str(corpus), "--out", str(tmp_path / "o"),
                "--workspace", str(tmp_path / "ws"), "--sae", str(folder), "--max-prompts", "20"])
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: ") and "blocks.7.mlp.hook_post" in last, res.output
    # a new user's report: name the hook, a few valid ones (the nearest spelling first: the same site one block
    # down, blocks.1, then block 0) and the option that sets it
    assert "this model has no hook 'blocks.7.mlp.hook_post' (its blocks are 0..1)" in last
    assert "valid hooks include blocks.1.mlp.hook_post, blocks.0.mlp.hook_post" in last and "--hook HOOK" in last
    for later in ("saecircuits task", "direct logit attribution", "corpus statistics"):
        assert later not in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_feature_and_run_take_hub_names(tmp_path, hf_cache, monkeypatch):
    sae = random_sae(hook_point="blocks.6.hook_resid_pre")
    save_sae(sae, _cached_repo(hf_cache, "jbloom/GPT2-Small-SAEs-Reformatted") / "blocks.6.hook_resid_pre")
    name = "hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.6.hook_resid_pre"
    res = _cli(["feature", "--sae", name, "5"])
    assert res.exit_code == 0, res.output
    assert f"encoder bias {round(float(sae.b_enc[5].detach()), 6)}" in res.output
    # run keeps the name whole (a Path would fold hf:// to hf:/) and hands it to the loader
    import saecircuits.cli.run as cli_run

    seen = []
    monkeypatch.setattr(cli_run, "_execute", lambda cfg, export, resume=False: seen.append(cfg))
    corpus = tmp_path / "c.txt"
    corpus.write_text('Tom said, "Hi."\n')
    res = _cli(["run", "--model", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "o"),
                "--sae", name, "gpt2-small-res-jb/blocks.6.hook_resid_pre",
                "--hook", "auto", "blocks.6.hook_resid_pre"])
    assert res.exit_code == 0, res.output
    assert seen[-1].sae_paths == [name, "gpt2-small-res-jb/blocks.6.hook_resid_pre"]
    assert seen[-1].sae_hooks == ["auto", "blocks.6.hook_resid_pre"]
    from saecircuits.pipeline import _load_saes

    loaded = _load_saes(seen[-1].sae_paths, "cpu", seen[-1].sae_hooks)
    assert all(torch.equal(s.W_enc, sae.W_enc) for s in loaded)


def test_families_lists_every_registered_family():
    from saecircuits.saes.formats import families

    res = _cli(["sae", "families"])
    assert res.exit_code == 0, res.output
    names = [f.name for f in families()]
    assert {"saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai", "goodfire", "llama_scope",
            "circuit_tracer"} <= set(names)
    for name in names:
        assert name in res.output
