"""What the circuit's corpus means cost at the reference shape (issue 17): the corpus statistics pass alone, the same
pass also summing the circuit's hooks (``mean_hooks``, what the pipeline now runs), and the circuit's former pass
of its own over the same documents (``corpus_node_means``: a forward and an SAE encode of every counted token),
alternated in one process, with the load average beside every figure; and the largest difference between the
means the two ways give.

The reference shape: a random GPT-Neo (d_model 1024, d_mlp 4096, 16 heads, 2 layers, GPT-2's 50,257 tokens) and
two calibrated 16,384-feature ReLU SAEs on ``blocks.{0,1}.mlp.hook_post`` (``bench_analyses.py --reference``).

Example:
    python benchmarks/bench_corpus_means.py --docs 20 --threads 2 --reps 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20, help="corpus documents (stories, each up to the context)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    from saecircuits.cli import threading_defaults

    threading_defaults()
    import torch

    torch.set_num_threads(args.threads)
    import bench_analyses as B

    from saecircuits.analysis.ablations.feature_effects import feature_activations
    from saecircuits.analysis.circuit import (
        circuit_nodes,
        corpus_mean_hooks,
        corpus_node_means,
        corpus_stats_node_means,
    )
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats
    from saecircuits.models.interventions import interventions_for

    model, task, rows = B._reference_setup(types.SimpleNamespace(device="cpu", dtype=args.dtype), 16, args.docs)
    saes = [B.calibrated_sae(model, task, f"blocks.{layer}.mlp.hook_post", 16384, 40, seed=layer, dtype=args.dtype)
            for layer in (0, 1)]
    _, groups = circuit_nodes(model, saes, [feature_activations(model, s, task) for s in saes])
    hooks = corpus_mean_hooks(model, saes)
    n_tok = sum(len(r) for r in rows)
    print(f"reference shape, {args.dtype}, {len(rows)} documents ({n_tok} tokens), 2 SAEs x 16,384, {args.threads} "
          f"threads; mean hooks {hooks}", flush=True)

    def timed(label, fn):
        interventions_for(model).clear_cache()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        out = fn()
        t = time.perf_counter() - t0
        print(f"   {label:58s} {t:7.1f} s   (load {load:.2f} -> {os.getloadavg()[0]:.2f})", flush=True)
        return out, t

    times: dict[str, list[float]] = {}
    for rep in range(args.reps):
        print(f"rep {rep + 1}", flush=True)
        for which in ("alone", "with sums")[:: 1 if rep % 2 == 0 else -1]:  # alternating which runs first
            if which == "alone":
                _, t = timed("corpus statistics pass alone",
                             lambda: corpus_feature_stats(model, saes, rows, progress=False))
            else:
                stats, t = timed("corpus statistics pass + the circuit's hook sums (now)",
                                 lambda: corpus_feature_stats(model, saes, rows, progress=False, mean_hooks=hooks))
            times.setdefault(which, []).append(t)
        new, t = timed("circuit means from the pass's sums (now)",
                       lambda stats=stats: corpus_stats_node_means(model, stats, saes, groups, rows))
        times.setdefault("from sums", []).append(t)
        old, t = timed("circuit means by a pass of their own (before)",
                       lambda: corpus_node_means(model, rows, groups, progress=False))
        times.setdefault("own pass", []).append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"medians: pass alone {med['alone']:.1f} s, with the sums {med['with sums']:.1f} s "
          f"(+{med['with sums'] - med['alone']:.1f} s, x{med['with sums'] / med['alone']:.3f}), means from the sums "
          f"{med['from sums']:.2f} s; the former own pass {med['own pass']:.1f} s "
          f"(x{med['own pass'] / max(med['with sums'] - med['alone'] + med['from sums'], 1e-9):.0f} what the sums "
          f"add)")
    worst = 0.0
    for g in groups:
        for k in ("f", "e") if g.kind == "sae" else (None,):
            a, b = (new[g.hook][k], old[g.hook][k]) if k else (new[g.hook], old[g.hook])
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    print(f"largest difference of a group's means, relative to its largest |mean|: {worst:.2g}")


if __name__ == "__main__":
    main()
