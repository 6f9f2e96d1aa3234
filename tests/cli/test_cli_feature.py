"""``saecircuits feature`` and ``--layers auto`` from the command line."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import HOOK, STORIES, random_sae, tiny_neo, tiny_neo_hf, tiny_tokenizer

from saecircuits.saes.io import save_sae


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from saecircuits.cli import _register, app, expand_multi_value_options

    _register()
    return CliRunner().invoke(app, expand_multi_value_options(args))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-neo")
    tiny_neo_hf().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def sae_dir(tmp_path):
    return save_sae(random_sae(), tmp_path / "cache" / HOOK / "sae")


def test_feature_with_the_sae_alone_prints_its_card(sae_dir):
    res = _cli(["feature", "--sae", str(sae_dir), "7"])
    assert res.exit_code == 0, res.output
    sae = random_sae()
    assert f"Feature 7 of {HOOK} (d_sae 96;" in res.output
    assert f"encoder bias {round(float(sae.b_enc[7].detach()), 6)}" in res.output  # the SAE's own value
    assert "add --model" in res.output


def test_feature_bad_input_is_one_line_and_status_2(sae_dir, tmp_path):
    res = _cli(["feature", "--sae", str(sae_dir), "96"])
    assert res.exit_code == 2 and "feature 96 is out of range: this SAE has features 0..95" in res.output
    res = _cli(["feature", "--sae", str(sae_dir.parent.parent), "3"])  # the run's cache folder
    assert res.exit_code == 2
    assert f"is not an SAE folder but holds 1 below it: {sae_dir}; pass one of them" in res.output
    res = _cli(["feature", "--sae", str(sae_dir), "3", "--data", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and "--data needs --model" in res.output
    res = _cli(["feature", "--sae", str(sae_dir), "3", "--out", str(tmp_path / "card.txt")])
    assert res.exit_code == 2 and "ending in .html" in res.output
    # a folder named *.html, or a file where a folder is needed: one line before any work (they were bare
    # OSErrors naming a temporary file, found by trying them)
    (tmp_path / "d.html").mkdir()
    res = _cli(["feature", "--sae", str(sae_dir), "3", "--out", str(tmp_path / "d.html")])
    assert res.exit_code == 2 and f"--out {tmp_path / 'd.html'} is a folder" in res.output
    (tmp_path / "f.txt").write_text("x")
    res = _cli(["feature", "--sae", str(sae_dir), "3", "--out", str(tmp_path / "f.txt" / "sub" / "card.html")])
    assert res.exit_code == 2 and f"{tmp_path / 'f.txt'} is a file, so the page cannot be written" in res.output
    # options that were silently ignored (the card printed without them): refused, naming what they need
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "Tom said, \\"Hi", "answer": "."}\n', encoding="utf-8")
    res = _cli(["feature", "--sae", str(sae_dir), "3", "--task", str(task)])
    assert res.exit_code == 2 and f"--task {task} needs --data" in res.output
    res = _cli(["feature", "--sae", str(sae_dir), "3", "--tokenizer", str(tmp_path / "tok.bin")])
    assert res.exit_code == 2 and "--tokenizer needs --model" in res.output


@pytest.mark.slow
def test_feature_with_model_and_data_matches_the_library(sae_dir, model_dir, tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    # a feature that is active at P on some prompts
    from saecircuits.analysis.ablations.feature_effects import feature_activations, feature_effects
    from saecircuits.tasks.closing_quote import closing_quote_task

    model, sae = tiny_neo(), random_sae()
    task = closing_quote_task(STORIES * 3, model.tokenizer, max_tokens=int(model.cfg.n_ctx))
    acts = feature_activations(model, sae, task)
    k = int(torch.bincount(acts.feature, minlength=sae.d_sae).argmax())
    expect = feature_effects(model, sae, task, features=[k]).summary().iloc[0]
    out = tmp_path / "card.html"
    res = _cli(["feature", "--sae", str(sae_dir), str(k), "--model", str(model_dir), "--data", str(corpus),
                "--workspace", str(tmp_path / "ws"), "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    assert f'data-open="card-sae-0-f{k}"' in page and page.count("<script") == 3
    res = _cli(["feature", "--sae", str(sae_dir), str(k), "--model", str(model_dir), "--data", str(corpus),
                "--workspace", str(tmp_path / "ws"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    # the effect printed is the library's exact single-feature ablation (note: tiny_neo has the same weights)
    m = re.search(r"raises the answer loss by (-?\d+\.\d{4}) nats", res.output)
    assert m and float(m.group(1)) == pytest.approx(float(expect.loss_increase), abs=6e-5)
    assert "corpus density" in res.output and "logit boosts (logits)" in res.output


def test_layers_option_takes_numbers_or_auto():
    from saecircuits.cli.run import _layers

    assert _layers(["0", "1"]) == [0, 1] and _layers(["auto"]) == "auto" and _layers(None) is None
    res = _cli(["run", "--model", "m", "--data", "d", "--out", "o", "--layers", "x"])
    assert res.exit_code == 2 and "--layers takes layer numbers (e.g. --layers 0 1) or the word auto" in res.output


def test_auto_layers_picks_the_largest_ablation_effect_not_the_largest_dla():
    """A layer with a large |DLA| whose ablation lowers the loss (layer 3 here) is not picked: the choice is the
    largest increase of the answer's loss, sign included."""
    from saecircuits.pipeline import PipelineError, auto_layers

    increase = [0.02, 0.41, 0.20, -0.35, float("nan")]  # layer 4 undefined: left out
    layers, said = auto_layers(increase, 2)
    assert layers == [1, 2]
    assert said == ("--layers auto chose layer(s) 1, 2: the 2 MLP layer(s) whose mean ablation at P raises the "
                    "answer's loss the most (mean increase over the prompts, nats: MLP1 +0.4100, MLP2 +0.2000, "
                    "MLP0 +0.0200, MLP3 -0.3500).")
    layers, said = auto_layers([-0.1, -0.3], 1)  # no layer helps the answer: said, not hidden
    assert layers == [0] and "Mean-ablating layer(s) 0 does not raise the loss" in said
    with pytest.raises(PipelineError, match="needs each MLP layer's ablation effect"):
        auto_layers([float("nan")], 2)