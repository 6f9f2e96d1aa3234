"""The embedded default: cache keying, reuse without retraining, the shipped checkpoint."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from saecircuits.data.storygen import generate_stories
from saecircuits.models import default as dm
from saecircuits.models.default import (
    DEFAULT_CONFIG,
    default_model_dir,
    ensure_default_model,
    shipped_model_dir,
)
from saecircuits.models.train_lm import (
    LMConfig,
    TrainLMError,
    closing_quote_metrics,
    closing_quote_prompts,
    load_lm,
    read_train_info,
)

TINY = LMConfig(
    n_train_stories=300, n_heldout_stories=40, n_tokenizer_stories=300, vocab_size=600, d_model=16, n_heads=2,
    d_mlp=32, n_ctx=64, window_size=32, steps=3, batch_size=4,
)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value > 0 else 2  # keeps d_model divisible by n_heads and the seeds distinct
    if isinstance(value, float):
        return value / 2 + 0.01
    raise AssertionError(type(value))


def test_every_config_field_changes_the_key(tmp_path):
    base = default_model_dir(tmp_path, TINY)
    assert base == tmp_path / "models" / f"default-{TINY.config_hash()}"
    assert default_model_dir(tmp_path, dataclasses.replace(TINY)) == base  # equal configs, equal key
    seen = {base}
    for f in dataclasses.fields(LMConfig):
        if f.name == "generator_version":
            continue  # only the current version is constructible; its value is part of the hashed dict
        if f.name == "n_tokenizer_stories":
            cfg = dataclasses.replace(TINY, n_tokenizer_stories=TINY.n_tokenizer_stories - 1)
        else:
            cfg = dataclasses.replace(TINY, **{f.name: _changed(getattr(TINY, f.name))})
        key = default_model_dir(tmp_path, cfg)
        assert key not in seen, f.name
        seen.add(key)
    assert "generator_version" in TINY.to_dict()


@pytest.fixture()
def no_shipped(monkeypatch):
    monkeypatch.setattr(dm, "shipped_model_dir", lambda: None)


def test_trains_once_then_reuses(tmp_path, monkeypatch, no_shipped):
    calls = []
    real = dm.train_lm_to_folder

    def counting(out, cfg, progress=True, overwrite=False):
        calls.append(cfg)
        return real(out, cfg, progress=False, overwrite=overwrite)

    monkeypatch.setattr(dm, "train_lm_to_folder", counting)
    first = ensure_default_model(tmp_path, TINY, progress=False)
    assert first == default_model_dir(tmp_path, TINY) and len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp folder left behind
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_default_model(tmp_path, TINY, progress=False)
    assert again == first and len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # another recipe gets its own folder
    other = ensure_default_model(tmp_path, dataclasses.replace(TINY, seed=7), progress=False)
    assert other != first and len(calls) == 2


def test_tampered_cache_folder_is_an_error(tmp_path, no_shipped, monkeypatch):
    folder = default_model_dir(tmp_path, TINY)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(dm, "train_lm_to_folder", lambda *a, **k: pytest.fail("must not train"))
    with pytest.raises(TrainLMError, match="delete it"):
        ensure_default_model(tmp_path, TINY, progress=False)


def test_shipped_checkpoint_is_copied_when_its_hash_matches(tmp_path, monkeypatch):
    src = tmp_path / "src_ws"
    monkeypatch.setattr(dm, "shipped_model_dir", lambda: None)
    trained = ensure_default_model(src, TINY, progress=False)
    monkeypatch.setattr(dm, "shipped_model_dir", lambda: trained)
    monkeypatch.setattr(dm, "train_lm_to_folder", lambda *a, **k: pytest.fail("must copy, not train"))
    copied = ensure_default_model(tmp_path / "ws", TINY, progress=False)
    assert (copied / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    # a different recipe does not take the shipped checkpoint
    trained_for = []
    monkeypatch.setattr(dm, "train_lm_to_folder", lambda out, cfg, **k: trained_for.append(cfg) or
                        shutil.copytree(trained, out))
    ensure_default_model(tmp_path / "ws", dataclasses.replace(TINY, seed=9), progress=False)
    assert trained_for == [dataclasses.replace(TINY, seed=9)]


@pytest.mark.skipif(shipped_model_dir() is None, reason="no checkpoint shipped under saecircuits/assets/default")
def test_shipped_checkpoint_matches_default_config_and_closes_quotes():
    folder = shipped_model_dir()
    info = read_train_info(folder)
    assert info["config_hash"] == DEFAULT_CONFIG.config_hash(), "re-ship: saecircuits train-lm --workspace ..."
    assert sum(p.stat().st_size for p in folder.iterdir()) < 8e6
    model, tok = load_lm(folder)
    # recompute the closing-quote loss on held-out stories (not the recorded number)
    heldout = generate_stories(150, DEFAULT_CONFIG.heldout_seed)
    prompts, answer_id, _ = closing_quote_prompts(heldout, tok, max_tokens=DEFAULT_CONFIG.n_ctx)
    m = closing_quote_metrics(model, prompts, answer_id, pad_id=tok.pad_token_id)
    assert m["n"] > 100
    assert m["loss"] < 0.5 and m["accuracy"] > 0.8, m
    # and on a `said, "` sentence it prefers `."` only once the sentence is complete
    ids = tok('Tom said, "I like the red ball', add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tok.bos_token_id] + ids])).logits[0, -1]
    assert int(logits.argmax()) == answer_id or logits.log_softmax(-1)[answer_id] > -1.0
    ids = tok('Tom said, "I like the', add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tok.bos_token_id] + ids])).logits[0, -1]
    assert logits.log_softmax(-1)[answer_id] < -5.0


def test_model_default_names_the_embedded_model(tmp_path):
    """Issue 18 kind 10: `--model default` failed (the embedded model had no name)."""
    from saecircuits.models.load import load_model, model_provenance

    by_name = load_model("default")
    by_folder = load_model(shipped_model_dir())
    prov = model_provenance(by_name)
    assert prov.source == "default" and prov.model_name == "saecircuits-default"
    tokens = torch.tensor([[0, 5, 17, 42, 7]])
    with torch.no_grad():
        assert torch.equal(by_name(tokens), by_folder(tokens))
    # with a workspace: the demo's copy in WORKSPACE/models, made on first use
    in_ws = load_model("saecircuits-default", cache_dir=tmp_path / "models")
    assert model_provenance(in_ws).hf_folder == str(default_model_dir(tmp_path).resolve())
    with torch.no_grad():
        assert torch.equal(in_ws(tokens), by_folder(tokens))
