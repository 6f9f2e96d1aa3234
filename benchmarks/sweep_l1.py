"""Sweep the L1 coefficient of the pipeline's reference recipe (``--sae-recipe reference``, activation normalisation
on) across model classes; print SAE quality at P.

For each model class and layer, activations of ``blocks.{L}.mlp.hook_post`` are collected once (the pipeline's
packing and BOS policy), then one SAE per coefficient is trained with the pipeline's own training settings
(:func:`saecircuits.pipeline.sae_train_config`, only the token budget changed) and evaluated at the prediction
position of the closing-quote task (:func:`saecircuits.analysis.quality.reconstruction.reconstruction_at_prediction`):
L0 at P, explained variance at P, the four losses, loss recovered vs zero and mean ablation (or why it is
undefined). Every figure is printed; nothing is cached.

Model classes (``--models``, comma-separated):
  default     the embedded default (GPT-Neo 2L d_model 128, d_mlp 512); SAEs trained on generated stories (seed 7,
              as the demo), prompts from its held-out stories;
  stories260k Karpathy's stories260K (Llama 5L d_model 64, d_mlp 172); trained on the TinyStories 10k-line file,
              prompts from the TinyStories validation file (the README's example);
  gpt2bpe     a random GPT-Neo 2L (d_model 128, d_mlp 512) with the GPT-2 BPE tokenizer, same files as stories260k.

Example (about 25 minutes on one core):
    python benchmarks/sweep_l1.py --threads 1 --tokens 200000 --coefs 0.5,1,2,4,8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from saecircuits.cli import threading_defaults  # noqa: E402

threading_defaults()  # as the CLI: OpenMP threads sleep while they wait (set before torch loads)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VAL = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"
TRAIN10K = SHARED / "tinystories-v2-train-head10k-lines" / "tinystories_10k.txt"


def load_case(name: str, workspace: Path):
    """(model, training documents, prompt documents, layers)."""
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model

    if name == "default":
        from saecircuits.data.storygen import generate_stories
        from saecircuits.models.default import DEFAULT_CONFIG, ensure_default_model

        model = load_model(ensure_default_model(workspace, progress=False))
        train = generate_stories(4000, seed=7)
        prompts = generate_stories(DEFAULT_CONFIG.n_heldout_stories, seed=DEFAULT_CONFIG.heldout_seed)
        return model, train, prompts, [0, 1]
    train, prompts = read_documents(TRAIN10K), read_documents(VAL)
    if name == "stories260k":
        model = load_model(SHARED / "stories260K" / "stories260K.bin", cache_dir=workspace / "models")
        return model, train, prompts, [1, 3]
    if name == "gpt2bpe":
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        from saecircuits.models.load import gpt2_bpe_tokenizer, load_hf_model

        cfg = GPTNeoConfig(
            vocab_size=50257, max_position_embeddings=2048, hidden_size=128, num_layers=2, num_heads=4,
            intermediate_size=512, attention_types=[[["global", "local"], 1]], window_size=256, embed_dropout=0.0,
            attention_dropout=0.0, resid_dropout=0.0, bos_token_id=50256, eos_token_id=50256,
        )
        torch.manual_seed(0)
        model = load_hf_model(GPTNeoForCausalLM(cfg), gpt2_bpe_tokenizer(SHARED / "gpt2-bpe-tokenizer"),
                              model_name="random-neo-gpt2bpe")
        return model, train, prompts, [0, 1]
    raise SystemExit(f"unknown model class {name!r}")


def collect(model, docs, hooks, n_tokens, seq_len, seed):
    """``{hook: [n_tokens, d_in]}`` float32 from the pipeline's packed rows, BOS positions excluded."""
    from saecircuits.data.activations import model_activation_batches, pack_token_rows
    from saecircuits.models.tokens import encode_documents

    tok = model.tokenizer
    rows = pack_token_rows(encode_documents(tok, docs, prepend_bos=False), min(seq_len, int(model.cfg.n_ctx)),
                           int(tok.bos_token_id), shuffle_seed=seed)
    batches = model_activation_batches(model, rows, hooks, 4096, bos_id=int(tok.bos_token_id),
                                       bos_policy="exclude", seed=seed, epochs=None)
    got = {h: [] for h in hooks}
    n = 0
    while n < n_tokens:
        b = next(batches)
        for h in hooks:
            got[h].append(b[h].float())
        n += next(iter(b.values())).shape[0]
    return {h: torch.cat(v)[:n_tokens] for h, v in got.items()}


def batches_from(acts: torch.Tensor, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=gen)
        for i in range(0, acts.shape[0] - batch + 1, batch):
            yield acts[perm[i : i + batch]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,stories260k,gpt2bpe")
    ap.add_argument("--coefs", default="0.5,1,2,4,8")
    ap.add_argument("--tokens", type=int, default=200_000, help="training activations per SAE")
    ap.add_argument("--layers", default=None, help="override the layers, e.g. 1")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--no-normalize", action="store_true", help="train without activation normalisation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "saecircuits-sweep")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per SAE here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from saecircuits.analysis.quality.reconstruction import mean_activation, reconstruction_at_prediction
    from saecircuits.models.tokens import encode_documents
    from saecircuits.pipeline import RunConfig, sae_train_config
    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.presets import pipeline_d_sae
    from saecircuits.saes.registry import build_sae
    from saecircuits.saes.trainer import SAETrainer
    from saecircuits.tasks.closing_quote import closing_quote_task

    coefs = [float(c) for c in args.coefs.split(",")]
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model, train_docs, prompt_docs, layers = load_case(name, args.workspace)
        if args.layers:
            layers = [int(x) for x in args.layers.split(",")]
        n_ctx = int(model.cfg.n_ctx)
        task = closing_quote_task(prompt_docs, model.tokenizer, max_prompts=args.prompts, max_tokens=n_ctx)
        stat = [d for d in encode_documents(model.tokenizer, prompt_docs[:1000], max_len=n_ctx) if len(d) > 1]
        hooks = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
        acts = collect(model, train_docs, hooks, args.tokens, 128, seed=0)
        print(f"== {name}: {task.n_prompts} prompts, {args.tokens} activations per hook "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for hook in hooks:
            mu = mean_activation(model, stat, hook)
            d_in = int(acts[hook].shape[1])
            for coef in coefs:
                t1 = time.perf_counter()
                cfg = RunConfig(model=name, data=VAL, out=args.workspace / "unused", workspace=args.workspace,
                                sae_tokens=args.tokens, sae_recipe="reference", l1_coefficient=coef,
                                normalize_activations=not args.no_normalize)
                tcfg = sae_train_config(cfg)
                sae = build_sae(SAEConfig("standard", d_in, pipeline_d_sae(d_in, cfg.expansion_factor), hook))
                trainer = SAETrainer(sae, batches_from(acts[hook], tcfg.batch_size, 0), tcfg, progress=False)
                sae = trainer.fit()
                m = trainer.last_metrics or {}
                r = reconstruction_at_prediction(model, sae, task, mean_act=mu)
                lz, lm = r.loss_recovered_zero, r.loss_recovered_mean

                def show(lr):
                    return f"{lr.value:6.3f}" if lr.defined else "  undef"

                row = {
                    "model": name, "hook": hook, "coef": coef, "normalize": not args.no_normalize,
                    "tokens": args.tokens, "scale": trainer.scale,
                    "train_l0": m.get("l0"), "train_ev": m.get("explained_variance"),
                    "l0_p": float(r.l0.mean()), "ev_p": r.explained_variance,
                    "clean": float(r.clean_loss.mean()), "sae": float(r.sae_loss.mean()),
                    "zero": float(r.zero_loss.mean()), "mean": float(r.mean_loss.mean()),
                    "lr_zero": lz.value, "lr_zero_reason": lz.reason, "lr_mean": lm.value, "lr_mean_reason": lm.reason,
                    "seconds": round(time.perf_counter() - t1, 1),
                }
                print(f"{name:11s} {hook[:8]} c={coef:<5g} L0(train) {row['train_l0']:6.1f} EV(train) "
                      f"{row['train_ev']:6.3f} | at P: L0 {row['l0_p']:6.1f} EV {row['ev_p']:6.3f} "
                      f"loss clean {row['clean']:.3f} sae {row['sae']:.3f} zero {row['zero']:.3f} "
                      f"mean {row['mean']:.3f} LR zero {show(lz)} mean {show(lm)} ({row['seconds']:.0f} s)",
                      flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps(dataclasses.asdict(cfg) | row, default=str) + "\n")


if __name__ == "__main__":
    main()
