"""`saecircuits train-sae` on a real (shipped) model ends with a held-out evaluation that agrees with the model."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from saecircuits.cli import _register, app
from saecircuits.data.activations import pack_token_rows
from saecircuits.data.corpus import read_documents
from saecircuits.data.storygen import write_corpus
from saecircuits.models.default import shipped_model_dir
from saecircuits.models.load import load_model
from saecircuits.models.tokens import encode_documents


def test_train_sae_writes_held_out_eval_matching_the_clean_model(tmp_path):
    model_dir = shipped_model_dir()
    assert model_dir is not None, "the package ships the default model"
    corpus = write_corpus(tmp_path / "stories.txt", 120, seed=5)
    _register()
    res = CliRunner().invoke(app, [
        "train-sae", "--out", str(tmp_path / "run"), "--model", str(model_dir), "--data", str(corpus),
        "--layer", "1", "--steps", "4", "--batch-size", "256", "--seq-len", "64", "--seed", "3",
        "--bos-policy", "exclude", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "loss recovered over whole sequences" in res.output
    (ev,) = json.loads((tmp_path / "run" / "eval.json").read_text()).values()

    # Independent: the clean CE over the same held-out rows, from the HF model's own logits (BOS targets skipped).
    bridge = load_model(model_dir)
    tok = bridge.tokenizer
    docs = encode_documents(tok, read_documents(corpus), prepend_bos=False)
    rows = pack_token_rows(docs, 64, tok.bos_token_id, shuffle_seed=3)
    eval_rows = rows[: min(32, rows.shape[0] // 10)]
    with torch.no_grad():
        logits = bridge.original_model(eval_rows).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, eval_rows[:, 1:, None])[..., 0]
    scored = eval_rows[:, 1:] != tok.bos_token_id
    assert abs(float(-logp[scored].mean()) - ev["ce_clean"]) < 1e-3
    assert 0 < ev["l0"] and ev["n_eval_tokens"] > 0


def test_eval_line_says_undefined_and_shows_no_interval():
    from saecircuits.cli.train_sae import _eval_line

    base = {"l0": 12.0, "explained_variance": 0.81, "ce_clean": 2.0, "ce_spliced": 2.3, "ce_zero": 2.0001}
    undefined = _eval_line(base | {"loss_recovered": None, "loss_recovered_ci95": [None, None],
                                   "loss_recovered_undefined_reason": "zero ablation barely raises the loss"})
    assert "undefined: zero ablation barely raises the loss" in undefined and "[" not in undefined
    assert "CE clean 2.000 / SAE 2.300 / zero 2.000 nats" in undefined
    defined = _eval_line(base | {"loss_recovered": 0.9, "loss_recovered_ci95": [0.85, 0.93],
                                 "loss_recovered_undefined_reason": None})
    assert "loss recovered over whole sequences 0.900 [0.850, 0.930]" in defined
