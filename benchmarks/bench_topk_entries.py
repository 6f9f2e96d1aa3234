"""The corpus statistics pass with a TopK SAE's active entries taken from its top-k selection
(``TopKSAE.active_entries``) against the dense code's ``nonzero`` (``SAE.active_entries``), alternating in one process.

The demo's cached workspace (``saecircuits demo`` run once): its model, its two TopK SAEs and its first
``--docs`` held-out stories, as the pipeline's corpus pass reads them (with the circuit's hook sums). Prints each
pass's seconds with the load average, the medians and their ratio, and checks that every field of every
SAE's statistics is equal (``torch.equal``) between the two ways.

Example:
    python benchmarks/bench_topk_entries.py --threads 2 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--docs", type=int, default=600, help="corpus documents (the demo's corpus pass reads 600)")
    ap.add_argument("--workspace", default=str(Path.home() / ".cache" / "saecircuits"))
    args = ap.parse_args()
    import bench_position_circuit as BP  # sets the CLI's thread policy before torch loads
    import torch

    from saecircuits.analysis.circuit import corpus_mean_hooks
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats
    from saecircuits.saes.base import SAE
    from saecircuits.saes.topk import TopKSAE

    torch.set_num_threads(args.threads)
    model, saes, _, rows = BP.demo_case(Path(args.workspace), 10)
    rows = rows[: args.docs]
    hooks = corpus_mean_hooks(model, saes)
    print(f"demo model, SAEs {[type(s).__name__ for s in saes]}, {len(rows)} documents "
          f"({sum(len(r) for r in rows):,} tokens), {torch.get_num_threads()} threads", flush=True)
    sparse = TopKSAE.active_entries
    times: dict[str, list[float]] = {"dense nonzero": [], "top-k entries": []}
    try:
        for _ in range(args.reps):
            got = {}
            for name, fn in (("dense nonzero", SAE.active_entries), ("top-k entries", sparse)):
                TopKSAE.active_entries = fn
                load = open("/proc/loadavg").read().split()[0]
                start = time.perf_counter()
                got[name] = corpus_feature_stats(model, saes, rows, mean_hooks=hooks, progress=False)
                times[name].append(time.perf_counter() - start)
                print(f"   {name:14s} {times[name][-1]:6.2f} s  (load {load})", flush=True)
            n = 0
            for a, b in zip(got["dense nonzero"].features, got["top-k entries"].features, strict=True):
                for f in dataclasses.fields(a):
                    x, y = getattr(a, f.name), getattr(b, f.name)
                    if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
                        raise SystemExit(f"error: {a.hook_point} {f.name} differs between the two ways")
                    n += 1
            print(f"   every field equal ({n} fields)", flush=True)
    finally:
        TopKSAE.active_entries = sparse
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"medians: dense nonzero {med['dense nonzero']:.2f} s, top-k entries {med['top-k entries']:.2f} s "
          f"({med['dense nonzero'] / med['top-k entries']:.2f}x)")


if __name__ == "__main__":
    main()
