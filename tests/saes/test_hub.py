"""hf:// and SAELens release names, read through a hand-built Hugging Face cache folder (no network: offline, or a
Hub endpoint on localhost that refuses connections)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_sae

from saecircuits.saes import hub
from saecircuits.saes.base import SAEError
from saecircuits.saes.formats import load_sae
from saecircuits.saes.io import save_sae

REV = "0123456789abcdef0123456789abcdef01234567"
REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
SAE_ID = "blocks.6.hook_resid_pre"


def _cached_repo(cache, repo: str, rev: str = REV):
    """The cache layout huggingface_hub writes: models--owner--repo/{refs/main, snapshots/<rev>/...}."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(rev)
    snap = storage / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    return snap


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@pytest.fixture()
def cached_sae(cache):
    sae = random_sae(hook_point=SAE_ID)
    snap = _cached_repo(cache, REPO)
    save_sae(sae, snap / SAE_ID)
    return sae, snap / SAE_ID


def test_hf_and_release_names_resolve_to_the_cached_folder(cached_sae):
    sae, folder = cached_sae
    assert hub.resolve(f"hf://{REPO}/{SAE_ID}") == folder
    assert hub.resolve(f"gpt2-small-res-jb/{SAE_ID}") == folder
    assert hub.resolve(f"hf://{REPO}@{REV}/{SAE_ID}") == folder  # a pinned revision
    for name in (f"hf://{REPO}/{SAE_ID}", f"gpt2-small-res-jb/{SAE_ID}"):
        loaded = load_sae(name)
        assert loaded.cfg.extra["source"]["path"] == str(folder)
        for k, v in sae.export_weights().items():
            assert torch.equal(loaded.export_weights()[k], v), k


def test_a_single_file_resolves_through_the_cache(cache):
    snap = _cached_repo(cache, "Goodfire/Some-SAE")
    (snap / "sae.pth").write_bytes(b"weights")
    assert hub.resolve("hf://Goodfire/Some-SAE/sae.pth") == snap / "sae.pth"


def test_offline_and_not_cached_is_one_line_naming_the_repo_and_the_fix(cached_sae):
    for name, repo in ((f"hf://{REPO}/blocks.7.hook_resid_pre", REPO), ("hf://someone/other-saes/layer_3", None),
                       ("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71", "google/gemma-scope-2b-pt-res")):
        with pytest.raises(SAEError) as err:
            hub.resolve(name)
        text = str(err.value)
        assert "\n" not in text and "HF_HUB_OFFLINE" in text and "hf download" in text
        assert (repo or "someone/other-saes") in text


def test_unreachable_hub_falls_back_to_the_cache(cached_sae, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    _, folder = cached_sae
    assert hub.resolve(f"hf://{REPO}/{SAE_ID}") == folder
    with pytest.raises(SAEError, match="could not be reached.*hf download someone/x"):
        hub.resolve("hf://someone/x/layer_1")


def test_names_are_checked():
    for bad, why in (("hf://owner", "names no repository"), ("hf://o/r/../x", r"'\.\.'"),
                     ("hf://o/r@/x", "empty revision"), ("gpt2-small-res-jb/blocks.6", "not an SAE id"),
                     ("gpt2-small-res-jb", "no SAE in it"), ("no-such-release/x", "neither an hf:// name")):
        with pytest.raises(SAEError, match=why):
            hub.resolve(bad)
    with pytest.raises(SAEError, match="no SAE in it"):
        hub.release_name("gpt2-small-res-jb/")
    assert not hub.is_release_name("gpt2-small-res-jb") and not hub.is_release_name("no-such-release/x")
    assert hub.parse_hf_name("hf://a/b/c/d.npz") == hub.HubName("a/b", None, "c/d.npz")
    assert hub.parse_hf_name("hf://a/b/c/d.npz").is_file and not hub.parse_hf_name("hf://a/b/c").is_file
    # release rules: the folder is the sae_id, for each kind of release in the table
    assert hub.release_name("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71") == hub.HubName(
        "google/gemma-scope-2b-pt-res", None, "layer_20/width_16k/average_l0_71")
    assert hub.release_name("sae-pythia-70m-32k/layers.3.mlp") == hub.HubName(
        "EleutherAI/sae-pythia-70m-32k", None, "layers.3.mlp")
    assert hub.release_name("not-a-release/x") is None


def test_a_local_path_that_looks_like_a_release_stays_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"gpt2-small-res-jb/{SAE_ID}"
    assert hub.is_release_name(name) and hub.is_hub_name(name)
    save_sae(random_sae(hook_point=SAE_ID), tmp_path / name)
    assert not hub.is_hub_name(name)
    assert load_sae(name).cfg.extra["source"]["path"] == name


def test_a_cache_whose_snapshot_links_to_blobs_loads(cache):
    """huggingface_hub's real layout: snapshot files are symbolic links to content-addressed blobs."""
    sae = random_sae(hook_point=SAE_ID)
    plain = save_sae(sae, cache.parent / "plain")
    snap = _cached_repo(cache, REPO)
    blobs = snap.parent.parent / "blobs"
    blobs.mkdir()
    (snap / SAE_ID).mkdir()
    for f in plain.iterdir():
        blob = blobs / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / SAE_ID / f.name).symlink_to(blob)
    loaded = load_sae(f"gpt2-small-res-jb/{SAE_ID}")
    assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.b_enc, sae.b_enc)


def test_file_digest_follows_links_and_ignores_bookkeeping(tmp_path):
    """The run's digest of a folder (pipeline._file_digest) is that of its weights: a snapshot of links to blobs
    and a plain copy agree, hidden download bookkeeping does not count, and a file's place in the folder does."""
    from saecircuits.pipeline import _file_digest

    plain = save_sae(random_sae(), tmp_path / "plain")
    linked = tmp_path / "linked"
    (linked / ".cache" / "huggingface").mkdir(parents=True)
    (linked / ".cache" / "huggingface" / "x.metadata").write_text("downloaded at 12:00")
    for f in plain.iterdir():
        (tmp_path / f"blob-{f.name}").write_bytes(f.read_bytes())
        (linked / f.name).symlink_to(tmp_path / f"blob-{f.name}")
    assert _file_digest(linked) == _file_digest(plain)
    moved = tmp_path / "moved"
    (moved / "sub").mkdir(parents=True)
    for f in plain.iterdir():
        (moved / ("sub" if f.suffix == ".json" else ".") / f.name).write_bytes(f.read_bytes())
    assert _file_digest(moved) != _file_digest(plain)
    assert _file_digest(plain / "cfg.json") != _file_digest(plain / "sae_weights.safetensors")
