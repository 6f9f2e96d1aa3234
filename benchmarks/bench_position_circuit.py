"""The circuit across positions (issue 16) on the demo: its time next to the circuit at P, and its peak memory on
long prompts.

Modes:
  --time    (default) the demo's model and its cached SAEs (two 2,048-feature TopK SAEs on the MLPs of layers 0
            and 1, from ``saecircuits demo``'s workspace), the closing-quote task's first 300 prompts of the demo's
            held-out stories, at ``--threads`` threads (2 by default): ``find_circuit`` (as the pipeline calls it,
            IG 10 steps, corpus means) then ``position_circuit`` (as the pipeline calls it); prints both times, the
            ratio, the number of exact interventions, and the estimates' agreement with the exact values.
  --memory  ``position_circuit`` on ``--long-prompts`` prompts of about ``--long-tokens`` tokens (TinyStories text
            from ../shared/data, stories joined until long enough, a closing quote at the end) with the demo
            model when its context allows, else a random GPT-Neo of the same shape with a long context; prints the
            peak resident memory (``resource.getrusage``) before and after (a fresh process is best: run this mode
            alone).

The demo's workspace: ``--workspace`` (default ``~/.cache/saecircuits``, what ``saecircuits demo`` uses): the model
under ``models/default-*``, the SAEs under ``saes/*/blocks.{0,1}.mlp.hook_post/sae``, the held-out stories under
``data/default-heldout-*.txt``. Nothing is written there.

Examples:
    python benchmarks/bench_position_circuit.py --threads 2
    python benchmarks/bench_position_circuit.py --memory --long-tokens 500
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from saecircuits.cli import threading_defaults  # noqa: E402

threading_defaults()  # as the CLI: OpenMP threads sleep while they wait (set before torch loads)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def demo_case(workspace: Path, n_prompts: int = 300, sae_root: Path | None = None):
    """(model, saes, task, corpus rows) of the demo's cached workspace (``sae_root``: its ``saes/<key>`` directory
    to use; default the first by name)."""
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.saes.io import load_sae
    from saecircuits.tasks.closing_quote import closing_quote_task

    models = sorted((workspace / "models").glob("default-*"))
    sae_dirs = sorted((workspace / "saes").glob("*/blocks.0.mlp.hook_post/sae"))
    data = sorted((workspace / "data").glob("default-heldout-*.txt"))
    if not (models and sae_dirs and data):
        raise SystemExit(f"no cached demo workspace under {workspace}: run `saecircuits demo` first")
    model = load_model(models[0])
    root = Path(sae_root) if sae_root is not None else sae_dirs[0].parents[1]
    saes = [load_sae(root / f"blocks.{layer}.mlp.hook_post" / "sae") for layer in (0, 1)]
    docs = read_documents(data[0])
    n_ctx = int(model.cfg.n_ctx)
    task = closing_quote_task(docs, model.tokenizer, closings=['."'], max_prompts=n_prompts, max_tokens=n_ctx)
    special = special_token_ids(model.tokenizer)
    rows = [d for d in encode_documents(model.tokenizer, docs[:1000], max_len=n_ctx) if any(t not in special for t in d)]
    return model, saes, task, rows


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_time(args) -> None:
    from saecircuits.analysis.circuit import corpus_mean_hooks, find_circuit
    from saecircuits.analysis.circuit.position_graph import position_circuit
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats
    from saecircuits.models.interventions import interventions_for
    from saecircuits.pipeline.circuit import POSITION_KW

    model, saes, task, rows = demo_case(Path(args.workspace), args.n_prompts)
    lengths = [p + 1 for p in task.prediction_pos]
    print(f"== demo model ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}), SAEs "
          f"{', '.join(f'{s.hook_point} ({s.d_sae})' for s in saes)}; {task.n_prompts} prompts (P+1 = "
          f"{min(lengths)}..{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.0f}); "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    # as the pipeline: the corpus means come from the corpus statistics pass (not timed here: the corpus stage's)
    stats = corpus_feature_stats(model, saes, rows, mean_hooks=corpus_mean_hooks(model, saes), progress=False)
    interventions_for(model).clear_cache()
    circ, t_p = timed(lambda: find_circuit(model, saes, task, ig_steps=10, corpus_rows=rows, corpus_stats=stats,
                                           progress=False))
    print(f"   find_circuit (the circuit at P, as the pipeline): {t_p:.1f} s", flush=True)
    timings: dict = {}
    pos, t = timed(lambda: position_circuit(model, saes, task, progress=False, timings=timings, **POSITION_KW))
    print(f"   position_circuit ({POSITION_KW}): {t:.1f} s = {t / t_p:.2f}x find_circuit; "
          f"{pos['n_exact_interventions']} exact interventions", flush=True)
    for k, v in timings.items():
        print(f"      {k:40s} {v:8.1f} s")
    ag = pos["agreement"]
    for what in ("nodes", "edges"):
        a = ag[what]["atp"]
        print(f"   {what:5s} AtP vs exact: Spearman {a['spearman']}, sign {a['sign_agreement']}, "
              f"top-20 overlap {a['top_overlap']}, top-20 sign {a['top_sign_agreement']} (n={a['n']})")
    print("   nodes by distance from P: " + "; ".join(
        f"{r['distance']}: rho {r['spearman']}, top-k {r['top_k']} (n={r['n']})" for r in ag["by_distance"]))
    at_p = circ.agreement["nodes"]["atp"]
    print(f"   at P (find_circuit) nodes AtP vs exact: Spearman {at_p['spearman']:.3f}, top-20 overlap "
          f"{at_p['top_overlap']:.2f}")
    print(f"   faithfulness {pos['faithfulness']}, completeness {pos['completeness']}")
    print(f"   summary: {pos['summary']}")
    if args.save:
        import json

        Path(args.save).write_text(json.dumps(pos))


def long_task(model, n_prompts: int, n_tokens: int):
    """``n_prompts`` prompts of about ``n_tokens`` tokens: TinyStories stories joined until long enough, ending in a
    quotation whose closing ``."`` is the answer (the closing-quote task on the joined text)."""
    from saecircuits.data.corpus import read_documents
    from saecircuits.tasks.closing_quote import closing_quote_task

    docs = read_documents(SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt")
    joined, cur = [], ""
    for d in docs:
        cur = f"{cur} {d}".strip()
        if len(model.tokenizer.encode(cur)) >= n_tokens:
            joined.append(cur)
            cur = ""
    task = closing_quote_task(joined, model.tokenizer, closings=['."'], max_tokens=int(model.cfg.n_ctx))
    # the shortest prompts of at least n_tokens tokens (else the longest)
    long = sorted((i for i in range(task.n_prompts) if len(task.token_ids[i]) >= n_tokens),
                  key=lambda i: len(task.token_ids[i]))
    order = (long or sorted(range(task.n_prompts), key=lambda i: -len(task.token_ids[i])))[:n_prompts]
    return task.subset(order)


def bench_memory(args) -> None:
    from saecircuits.analysis.circuit.position_graph import position_circuit
    from saecircuits.pipeline.circuit import POSITION_KW

    start_peak = peak_mib()
    model, saes, _, _ = demo_case(Path(args.workspace), 10)
    label = "the demo model"
    demo_ctx = int(model.cfg.n_ctx)
    if demo_ctx < args.long_tokens + 2:  # a GPT-Neo of the demo's shape with a longer context
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        from saecircuits.models.load import load_hf_model

        cfg = GPTNeoConfig(vocab_size=model.cfg.d_vocab, max_position_embeddings=1024, hidden_size=128, num_layers=2,
                           num_heads=4, attention_types=[[["global", "local"], 1]], window_size=128,
                           intermediate_size=512, bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        model = load_hf_model(GPTNeoForCausalLM(cfg).eval(), model.tokenizer, model_name="random-neo-demo-shape-1024")
        label = f"a random GPT-Neo of the demo's shape with n_ctx 1024 (the demo's is {demo_ctx}), the demo's SAEs"
    task = long_task(model, args.long_prompts, args.long_tokens)
    lengths = [p + 1 for p in task.prediction_pos]
    loaded = peak_mib()
    print(f"== memory: {label}; {task.n_prompts} prompts of {min(lengths)}..{max(lengths)} tokens; "
          f"{torch.get_num_threads()} thread(s); peak RSS after loading {loaded:.0f} MiB (at start {start_peak:.0f})",
          flush=True)
    timings: dict = {}
    pos, t = timed(lambda: position_circuit(model, saes, task, progress=False, timings=timings, **POSITION_KW))
    print(f"   position_circuit {POSITION_KW}: {t:.1f} s, {pos['n_exact_interventions']} exact interventions; "
          f"peak RSS {peak_mib():.0f} MiB ({peak_mib() - loaded:+.0f} MiB over the loaded state)")
    for k, v in timings.items():
        print(f"      {k:40s} {v:8.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workspace", default=str(Path.home() / ".cache" / "saecircuits"))
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--long-prompts", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=500)
    ap.add_argument("--save", default=None, help="write the positions dict of --time here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        bench_memory(args)
    else:
        bench_time(args)


if __name__ == "__main__":
    main()
