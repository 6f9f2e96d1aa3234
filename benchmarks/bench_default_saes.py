"""Do the pipeline's DEFAULT SAEs pass every SAE check on models they were not tuned on? Prints the figures.

For each model class, ``run_pipeline`` runs with the default SAE settings (``--sae-recipe topk``, ``--sae-k 32``,
400,000 training activations per SAE unless ``--sae-tokens`` says otherwise; nothing tuned per model) and the
closing-quote task; the circuit, the per-feature evidence and the geometry are switched off (they do not feed any
SAE check) and the corpus statistics use ``--n-docs`` documents. Per SAE it prints the L0 at P and over the corpus,
the dead features, explained variance and loss recovered at P, the corpus density of the five top-ranked features,
and every check the run raised about that SAE (``sae_worse_than_mean_ablation``, ``negative_explained_variance``,
``low_explained_variance``, ``low_sequence_loss_recovered``, ``low_loss_recovered``, ``loss_recovered_undefined_*``,
``sae_model_mismatch``, ``dense_top_features``). ``--recipe reference`` runs the
reference notebook's ReLU + L1 recipe with run's default coefficient instead, for comparison.

Model classes (``--models``, comma-separated):
  default     the embedded default (GPT-Neo 2L d_model 128, d_mlp 512), as ``saecircuits demo`` runs it: SAEs trained
              on generated stories (seed 7, 4,000), prompts from its held-out stories; both layers;
  stories260k Karpathy's stories260K (Llama 5L d_model 64, d_mlp 172): the README's command (TinyStories 10k-line
              file for the SAEs, validation stories for the prompts, ``--layers auto``);
  gpt2bpe     a GPT-Neo 2L (d_model 128, d_mlp 512, global + local attention) with the GPT-2 BPE tokenizer
              (50,257 tokens), random weights (seed 0, as benchmarks/bench_analyses.py), the same files as
              stories260k, both layers.

Example (one core; about 10 minutes per model class with 2,048-feature SAEs):
    python benchmarks/bench_default_saes.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VAL = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"
TRAIN10K = SHARED / "tinystories-v2-train-head10k-lines" / "tinystories_10k.txt"


def gpt2bpe_neo():
    """The GPT-2-tokenizer GPT-Neo: 2 layers, d_model 128, 4 heads, d_mlp 512, layer 1 local (window 256)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from saecircuits.models.load import gpt2_bpe_tokenizer, load_hf_model

    cfg = GPTNeoConfig(
        vocab_size=50257, max_position_embeddings=2048, hidden_size=128, num_layers=2, num_heads=4,
        intermediate_size=512, attention_types=[[["global", "local"], 1]], window_size=256, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=50256, eos_token_id=50256,
    )
    torch.manual_seed(0)
    return load_hf_model(GPTNeoForCausalLM(cfg), gpt2_bpe_tokenizer(SHARED / "gpt2-bpe-tokenizer"),
                         model_name="random-neo-gpt2bpe")


def case(name: str, workspace: Path) -> tuple[dict, object]:
    """(RunConfig fields, preloaded model or None) of one model class."""
    if name == "default":
        from saecircuits.data.storygen import write_corpus
        from saecircuits.models.default import DEFAULT_CONFIG, ensure_default_model

        data = workspace / "data"
        heldout = write_corpus(data / "heldout.txt", DEFAULT_CONFIG.n_heldout_stories, seed=DEFAULT_CONFIG.heldout_seed)
        train = write_corpus(data / "sae-train.txt", 4000, seed=7)
        return dict(model=str(ensure_default_model(workspace, progress=False)), data=heldout, train_data=train), None
    if not (VAL.is_file() and TRAIN10K.is_file()):
        raise SystemExit(f"{name} needs {VAL} and {TRAIN10K} (../shared/data)")
    if name == "stories260k":
        return dict(model=str(SHARED / "stories260K" / "stories260K.bin"), data=VAL, train_data=TRAIN10K,
                    layers="auto"), None
    if name == "gpt2bpe":
        return dict(model="random-neo-gpt2bpe", data=VAL, train_data=TRAIN10K), gpt2bpe_neo()
    raise SystemExit(f"unknown model class {name!r}")


def _f(x, spec: str = ".3f") -> str:
    return "undefined" if x is None or x != x else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,stories260k,gpt2bpe")
    ap.add_argument("--recipe", default="topk", help="topk (the default) or reference")
    ap.add_argument("--sae-tokens", type=int, default=None, help="training activations per SAE (default: run's)")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--n-docs", type=int, default=500, help="corpus documents for the statistics and densities")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workspace", type=Path, default=None, help="default: a fresh temporary folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from saecircuits.pipeline import RunConfig, run_pipeline

    root = args.workspace or Path(tempfile.mkdtemp(prefix="saecircuits-default-saes-"))
    failed_total = 0
    for name in args.models.split(","):
        t0 = time.perf_counter()
        fields, model = case(name, root / name)
        extra = {} if args.sae_tokens is None else {"sae_tokens": args.sae_tokens}
        cfg = RunConfig(out=root / name / "out", workspace=root / name, sae_recipe=args.recipe,
                        max_prompts=args.prompts, n_stat_docs=args.n_docs, circuit=False, n_evidence_features=0,
                        n_geometry_features=0, n_example_features=5, **fields, **extra)
        res = run_pipeline(cfg, model=model, progress=False)
        b = res.get("behaviour") or {}
        print(f"== {name}: {res['model']} | recipe {args.recipe} (k {cfg.sae_k}), {cfg.sae_tokens} activations per SAE"
              f" | {res['task']['n_prompts']} prompts, clean top-1 {_f(b.get('top1_accuracy'), '.1%')} | "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for note in res.get("notes", []):
            if note.startswith("--layers auto"):
                print(f"   {note}")
        for s in res["saes"]:
            hook = s["hook_point"]
            cs = s.get("corpus_stats") or {}
            dens = {f["feature"]: f.get("density") for f in cs.get("features", [])}
            top = [t["feature"] for t in s.get("top_features", [])[:5]]
            top_d = ", ".join(f"{k} {_f(dens.get(k), '.1%')}" for k in top)
            failed = [c["id"] for c in res.get("checks", []) if c["scope"] == hook]  # every check of this SAE
            failed_total += len(failed)
            print(f"   {hook}: d_sae {s['d_sae']} | L0 at P {s['l0']:.1f}, over {cs.get('n_docs')} docs "
                  f"{_f(cs.get('l0'), '.1f')}, dead {cs.get('n_dead')} | explained variance at P "
                  f"{_f(s.get('explained_variance_at_p'))}, over whole prompts "
                  f"{_f((s.get('whole_sequence') or {}).get('explained_variance'))} | loss recovered vs zero "
                  f"{_f(s.get('loss_recovered'))}, vs mean "
                  f"{_f(s.get('loss_recovered_mean_ablation'))} | answer loss at P clean {s['clean_loss']:.4f} SAE "
                  f"{s['sae_loss']:.4f} zero {s['zero_ablation_loss']:.4f} mean {_f(s.get('mean_ablation_loss'), '.4f')}")
            print(f"      top-5 features' corpus density: {top_d}")
            print(f"      failed SAE checks: {', '.join(failed) if failed else 'none'}", flush=True)
    print(f"failed SAE checks in all: {failed_total}")


if __name__ == "__main__":
    main()
