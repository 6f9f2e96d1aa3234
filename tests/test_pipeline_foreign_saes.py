"""A whole run on SAEs of other families and sites: an EleutherAI sparsify SAE on the residual stream (its own file
layout and maths), a SAELens 6 skip transcoder replacing an MLP, and an attention hook_z SAE, with the circuit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import STORIES, tiny_neo_hf, tiny_tokenizer
from safetensors.torch import save_file

from saecircuits.models.load import load_model
from saecircuits.pipeline import RunConfig, run_pipeline
from saecircuits.report.schema import validate_results
from saecircuits.saes.base import SAE, SAEConfig
from saecircuits.saes.io import save_sae

K, F, D = 8, 64, 32


def _sparsify_folder(root, seed=0):
    """A sparsify hookpoint folder as sparsify's save_to_disk writes it (nn.Linear encoder, W_dec [F, d])."""
    g = torch.Generator().manual_seed(seed)
    folder = root / "h.1"
    folder.mkdir(parents=True)
    w = {"encoder.weight": torch.randn(F, D, generator=g) / D**0.5, "encoder.bias": 0.1 * torch.randn(F, generator=g),
         "W_dec": torch.randn(F, D, generator=g) / D**0.5, "b_dec": 0.1 * torch.randn(D, generator=g)}
    save_file(w, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": F, "k": K,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}))
    return folder, {k: v.double().numpy() for k, v in w.items()}


def _sparsify_recon(w, x):
    """sparsify's forward written out: ReLU, then the top k; x_hat = acts @ W_dec + b_dec."""
    pre = np.maximum((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    acts = np.zeros_like(pre)
    top = np.argsort(-pre, axis=-1)[..., :K]
    np.put_along_axis(acts, top, np.take_along_axis(pre, top, -1), -1)
    return acts @ w["W_dec"] + w["b_dec"]


def _random(sae: SAE, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        sae.b_enc.copy_(-0.2 * torch.rand(sae.d_sae, generator=g))
    return sae


@pytest.mark.slow
def test_whole_run_with_a_sparsify_sae_a_transcoder_and_a_z_sae(tmp_path):
    model_dir = tmp_path / "model"
    tiny_neo_hf().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    sparsify, w = _sparsify_folder(tmp_path / "sparsify")
    tc = _random(SAE(SAEConfig("standard", d_in=D, d_sae=48, hook_point="blocks.0.ln2.hook_normalized",
                               hook_point_out="blocks.0.hook_mlp_out", d_out=D, apply_b_dec_to_input=False,
                               extra={"skip_connection": True})), 1)
    z = _random(SAE(SAEConfig("standard", d_in=D, d_sae=40, hook_point="blocks.1.attn.hook_z",
                              extra={"reshape_activations": "hook_z"})), 2)
    paths = [save_sae(z, tmp_path / "z"), save_sae(tc, tmp_path / "tc"), sparsify]
    # sparsify SAEs read the raw model's residual stream: the model is loaded without centring
    model = load_model(str(model_dir), center_writing_weights=False)
    cfg = RunConfig(model=str(model_dir), data=corpus, out=tmp_path / "out", workspace=tmp_path / "ws",
                    closings=('."', '!"', '?"'), sae_paths=paths, center_writing_weights=False,
                    max_candidates=5, n_example_features=2, n_examples=2, seed=0, circuit_ig_steps=2)
    run_pipeline(cfg, model=model, progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    validate_results(results)
    hooks = [s["hook_point"] for s in results["saes"]]
    assert hooks == ["blocks.1.attn.hook_z", "blocks.0.ln2.hook_normalized", "blocks.1.hook_resid_post"]
    circuit = json.loads((tmp_path / "out" / "circuit.json").read_text())
    labels = {n["label"] for n in circuit["nodes"]}
    assert "MLP0" not in labels and "MLP1" in labels  # the transcoder stands for MLP 0
    assert not any(label.startswith("L1H") for label in labels)  # the z SAE stands for layer 1's heads
    assert {f"S{i}:err" for i in range(3)} <= labels

    # the sparsify SAE spliced in at P: the mean answer loss equals sparsify's own maths applied by hand
    from saecircuits.tasks.closing_quote import closing_quote_task

    task = closing_quote_task(STORIES * 3, model.tokenizer, closings=('."', '!"', '?"'))
    losses = []
    for ids, pos, ans in zip(task.token_ids, task.prediction_pos, task.answer_ids, strict=True):
        def splice(act, hook=None, pos=pos):
            act = act.clone()
            act[0, pos] = torch.tensor(_sparsify_recon(w, act[0, pos].double().numpy()), dtype=act.dtype)
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(torch.tensor([ids]), fwd_hooks=[("blocks.1.hook_resid_post", splice)])
        losses.append(float(-torch.log_softmax(logits[0, pos].double(), -1)[ans]))
    assert results["saes"][2]["sae_loss"] == pytest.approx(float(np.mean(losses)), abs=1e-4)
