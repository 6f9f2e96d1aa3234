"""Tokenizer, packing, schedule, closing-quote evaluation and a tiny end-to-end `train-lm` run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from saecircuits.data.storygen import EOT, generate_stories
from saecircuits.models import train_lm as tl
from saecircuits.models.train_lm import (
    LMConfig,
    TrainLMError,
    check_closing_tokens,
    closing_quote_metrics,
    closing_quote_prompts,
    encode_stories,
    load_lm,
    lr_at,
    pack_rows,
    read_train_info,
    train_bpe_tokenizer,
    train_lm_to_folder,
)

TINY = LMConfig(
    n_train_stories=400, n_heldout_stories=60, n_tokenizer_stories=400, vocab_size=700, d_model=32, n_heads=2,
    d_mlp=64, n_ctx=64, window_size=32, steps=40, batch_size=8, lr=1e-2, warmup_steps=5,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(generate_stories(500, seed=0), 1024, save_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return train_lm_to_folder(tmp_path_factory.mktemp("lm") / "tiny", TINY, progress=False)


def test_tokenizer_specials_and_single_token_closings(tokenizer, tmp_path):
    assert tokenizer.convert_tokens_to_ids(EOT) == 0
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    ids = check_closing_tokens(tokenizer)
    assert len(set(ids.values())) == 3
    text = 'Tom said, "I like the red ball." Mia asked, "Why?" "Look!" Tom said.'
    enc = tokenizer(text, add_special_tokens=False)["input_ids"]
    toks = tokenizer.convert_ids_to_tokens(enc)
    assert toks.count('."') == 1 and toks.count('?"') == 1 and toks.count('!"') == 1
    assert 0 not in enc  # nothing added automatically
    assert tokenizer.decode(enc) == text
    # the saved folder reloads to the same tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == enc


def test_typed_endoftext_in_a_story_is_text_not_the_separator(tokenizer):
    # issue 18 kind 8: encode_stories called the raw tokenizer, so "<|endoftext|>" typed in a story became the EOS id
    # that pack_rows puts between stories; the project's rule (models.tokens.encode_texts) keeps it text
    from saecircuits.models.tokens import encode_texts

    story = "Tom wrote <|endoftext|> on the wall."
    (ids,) = encode_stories(tokenizer, [story])
    assert 0 not in ids  # EOS (= <|endoftext|>, id 0) appears only where pack_rows puts it
    assert tokenizer.decode(ids) == story  # the characters are all there, as text
    assert ids == encode_texts(tokenizer, [story])[0]
    assert 0 in tokenizer(story, add_special_tokens=False)["input_ids"]  # what the raw call did
    rows = pack_rows([ids], len(ids) + 2, 0)
    assert rows[0].tolist() == [0, *ids, 0]  # one story between two separators, not two


def test_tokenizer_without_dialogue_fails_the_closing_check():
    with pytest.raises(TrainLMError, match="one token"):
        train_bpe_tokenizer(["The cat sat. The dog ran. It was fun."] * 50, 400)


def test_pack_rows_hand_worked():
    rows = pack_rows([[5, 6, 7], [8], [9, 10]], n_ctx=4, eos_id=0)
    # stream: 0 5 6 7 0 8 0 9 10 0 -> two full rows, tail "10 0" dropped
    assert rows.tolist() == [[0, 5, 6, 7], [0, 8, 0, 9]]
    with pytest.raises(TrainLMError, match="fewer than one row"):
        pack_rows([[1]], n_ctx=8, eos_id=0)


def test_lr_schedule():
    cfg = dataclasses.replace(TINY, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_config_validation_names_the_problem():
    with pytest.raises(TrainLMError, match="divisible"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(TrainLMError, match="heldout_seed"):
        LMConfig(heldout_seed=0)
    with pytest.raises(TrainLMError, match="generator_version"):
        LMConfig(generator_version=0)


def test_closing_quote_prompts_hand_worked(tokenizer):
    stories = [
        'Once upon a time. Tom said, "Hi! I like the ball." Then they ran. Mia said, "Yes."',
        "No dialogue here. They played.",
        'Tom said, "Where is it?" She ran away.',  # no `."` after `said, "`
        'Mia asked, "Why?" Tom said, "Go!" "We can play," said Mia, "the ball is red." The end.',
    ]
    token_ids, answer_id, source = closing_quote_prompts(stories, tokenizer)
    assert source == [0, 3]
    assert answer_id == tokenizer.convert_tokens_to_ids('."')
    assert all(t[0] == tokenizer.bos_token_id for t in token_ids)
    assert tokenizer.decode(token_ids[0][1:]) + '."' == 'Once upon a time. Tom said, "Hi! I like the ball."'
    # the first `."` after the first `said, "` may close a later quote (as in the notebook)
    assert tokenizer.decode(token_ids[1][1:]).endswith("the ball is red")


def test_tiny_run_lowers_loss_and_writes_an_atomic_reloadable_folder(tiny_folder):
    info = read_train_info(tiny_folder)
    losses = info["losses"]
    assert len(losses) == TINY.steps == info["steps"]
    assert info["config_hash"] == TINY.config_hash()
    assert info["tokens_seen"] == TINY.steps * TINY.batch_size * TINY.n_ctx
    vocab = json.loads((tiny_folder / "config.json").read_text())["vocab_size"]
    assert losses[0] == pytest.approx(math.log(vocab), abs=0.3)  # uniform-ish at initialisation
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert info["heldout_loss"] < losses[0] - 1.0
    # nothing left next to the folder but the folder itself
    assert [p.name for p in tiny_folder.parent.iterdir()] == ["tiny"]
    assert (tiny_folder / "model.safetensors").is_file()
    model, tok = load_lm(tiny_folder)
    assert type(model).__name__ == "GPTNeoForCausalLM" and not model.training
    hf = model.config
    assert hf.attention_layers == ["global", "local"] and hf.activation_function == "gelu_new"
    assert hf.window_size == TINY.window_size and hf.hidden_size == TINY.d_model
    # the recorded closing-quote metrics are reproduced one prompt at a time, without padding or batching
    heldout = generate_stories(TINY.n_heldout_stories, TINY.heldout_seed)
    prompts, answer_id, _ = closing_quote_prompts(heldout, tok, max_tokens=TINY.n_ctx)
    nll, top = [], []
    with torch.no_grad():
        for p in prompts:
            logits = model(input_ids=torch.tensor([p])).logits[0, -1]
            nll.append(-logits.log_softmax(-1)[answer_id].item())
            top.append(int(logits.argmax()) == answer_id)
    cq = info["closing_quote"]
    assert cq["n"] == len(prompts) > 10
    assert cq["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-4, abs=1e-5)
    assert cq["accuracy"] == pytest.approx(sum(top) / len(top))


def test_batched_metrics_ignore_padding(tiny_folder):
    model, tok = load_lm(tiny_folder)
    prompts = [[0, 5, 6, 7, 8, 9], [0, 11], [0, 12, 13]]
    a = closing_quote_metrics(model, prompts, answer_id=3, pad_id=0, max_tokens=1)  # one row per batch
    b = closing_quote_metrics(model, prompts, answer_id=3, pad_id=0, max_tokens=10_000)  # one padded batch
    for k in ("loss", "accuracy", "mean_rank", "mean_prob"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_existing_out_is_refused_and_failed_runs_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        train_lm_to_folder(out, TINY, progress=False)

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tl, "train_model", boom)
    with pytest.raises(RuntimeError):
        train_lm_to_folder(tmp_path / "n", dataclasses.replace(TINY, n_train_stories=400), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_too_few_heldout_stories_are_refused_before_training(tmp_path, monkeypatch):
    """With too few held-out stories there is no closing-quote prompt to evaluate on: said naming the option, before
    the training it would waste (it was found only after training; found by trying --n-heldout-stories 5)."""
    trained = []
    monkeypatch.setattr(tl, "train_model", lambda *a, **k: trained.append(1) or [0.0])
    # n_ctx 2 holds no prompt with its answer whatever the stories: 'said, "' alone is more than 2 tokens
    with pytest.raises(TrainLMError, match=r"hold no closing-quote prompt .* give more --n-heldout-stories"):
        train_lm_to_folder(tmp_path / "m", dataclasses.replace(TINY, n_ctx=2), progress=False)
    assert trained == [] and not (tmp_path / "m").exists()


def test_cli_train_lm(tmp_path):
    from typer.testing import CliRunner

    from saecircuits.cli import _register, app

    _register()
    runner = CliRunner()
    args = ["train-lm", "--steps", "3", "--n-train-stories", "200", "--n-tokenizer-stories", "200",
            "--n-heldout-stories", "30", "--vocab-size", "600", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32",
            "--n-ctx", "64", "--window-size", "32", "--batch-size", "4", "--no-progress"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    info = read_train_info(tmp_path / "m")
    assert info["steps"] == 3 and info["config"]["d_model"] == 16 and info["config"]["window_size"] == 32
    assert '"heldout_loss"' in res.output
    # a second run into the same folder is refused with a message naming the fix
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, [*args, "--d-model", "15"] + ["--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "divisible" in res.output
