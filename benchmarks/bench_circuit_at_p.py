"""The circuit at P (``find_circuit``) at the reference shape, this checkout against an earlier revision (issue 17).

The reference shape: a random GPT-Neo (d_model 1024, d_mlp 4096, 16 heads, 2 layers, GPT-2's 50,257 tokens) and
two calibrated 16,384-feature ReLU SAEs on ``blocks.{0,1}.mlp.hook_post`` (L0 at P ~40), as
``bench_analyses.py --reference`` builds them. Each run is a fresh process per source tree (with ``--baseline REV``
that revision first, checked out in a temporary worktree), alternating ``--reps`` times, each timing
``find_circuit`` alone (model and SAEs built first, acts computed by find_circuit, ``ig_steps=10``) and printing
seconds per prompt with the load average before and after. The two trees' results are then compared: the same
nodes, and the largest difference of the exact node effects, AtP and IG node estimates and the exact / AtP / IG
edges, relative to the largest value of each.

Examples:
    python benchmarks/bench_circuit_at_p.py --baseline 6f6c1c5 --prompts 16 --dtype float32 --threads 2
    python benchmarks/bench_circuit_at_p.py --baseline 6f6c1c5 --prompts 16 --dtype bfloat16 --corpus-rows 100
    python benchmarks/bench_circuit_at_p.py --baseline 6f6c1c5 --prompts 64 --cache-mib 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, types
tree, dtype, n, rows_n, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
cache_mib = int(sys.argv[7])
sys.path.insert(0, tree + "/benchmarks")
from saecircuits.cli import threading_defaults
threading_defaults()
import torch
torch.set_num_threads(threads)
import bench_analyses as B
from saecircuits.analysis.circuit import find_circuit
args = types.SimpleNamespace(device="cpu", dtype=dtype)
model, task, rows = B._reference_setup(args, n, max(rows_n, 1))
saes = [B.calibrated_sae(model, task, f"blocks.{l}.mlp.hook_post", 16384, 40, seed=l, dtype=dtype) for l in (0, 1)]
sub = task.subset(range(min(n, task.n_prompts)))
if cache_mib >= 0:  # the interventions' clean-pass cache budget (1,000 prompts overflow the default 512 MiB)
    from saecircuits.models.interventions import interventions_for
    interventions_for(model).clear_cache()
    interventions_for(model).cache_bytes = cache_mib << 20
load = open("/proc/loadavg").read().split()[0]
t0 = time.perf_counter()
res = find_circuit(model, saes, sub, ig_steps=10, corpus_rows=rows[:rows_n] if rows_n else None)
t = time.perf_counter() - t0
torch.save({"nodes": [(nd.kind, nd.layer, nd.index, nd.sae) for nd in res.nodes], "effect": res.exact.node_effect,
            "atp": res.atp.node_effect, "ig": res.ig.node_effect, "edges": {k: v[0] for k, v in res.exact.edges.items()},
            "counts": {k: v[1] for k, v in res.exact.edges.items()}, "atp_edges": res.atp.edges,
            "ig_edges": res.ig.edges, "seconds": t, "n": sub.n_prompts, "load": (load, open("/proc/loadavg").read().split()[0])}, out)
"""


def _run(src: Path, out: Path, args: argparse.Namespace) -> dict:
    import torch

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(src / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-c", CHILD, str(src), args.dtype, str(args.prompts), str(args.corpus_rows),
           str(args.threads), str(out), str(args.cache_mib)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: the run from {src} failed:\n{proc.stderr[-3000:]}")
    return torch.load(out, weights_only=False)


def _largest_difference(a: dict, b: dict) -> str:
    """``max |a - b| / max |a|`` over the keys of ``a`` (a missing key counts as 0)."""
    keys = set(a) | set(b)
    scale = max((abs(v) for v in a.values()), default=0.0)
    diff = max((abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys), default=0.0)
    return f"{diff:.3g} ({diff / scale:.2g} of the largest, {len(a)} vs {len(b)} entries)" if scale else "all 0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV", help="also run this git revision (first), for before/after")
    ap.add_argument("--reps", type=int, default=1, help="runs of each source tree (medians printed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--corpus-rows", type=int, default=0, help="corpus rows for the means (0: the task's means at P)")
    ap.add_argument("--cache-mib", type=int, default=-1,
                    help="the interventions' clean-pass cache budget in MiB for find_circuit (default: the library's, "
                         "512; 0 emulates 1,000 prompts, whose clean passes mostly overflow it)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-circuit-"))
    trees = {"this checkout": ROOT}
    if args.baseline:
        # beside this checkout: the baseline's benchmarks read ../shared/data (the GPT-2 tokenizer, the stories)
        base = Path(tempfile.mkdtemp(prefix=".bench-baseline-", dir=ROOT.parent))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                       capture_output=True)
        trees = {f"baseline {args.baseline}": base, **trees}
    print(f"find_circuit at the reference shape, {args.dtype}, {args.prompts} prompts, {args.corpus_rows} corpus rows,"
          f" clean-pass cache {'default' if args.cache_mib < 0 else f'{args.cache_mib} MiB'}, {args.threads} threads,"
          f" {args.reps} run(s) each; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for rep in range(args.reps):
            for name, src in trees.items():
                t0 = time.perf_counter()
                r = _run(src, tmp / f"{name.split()[0]}-{rep}.pt", args)
                runs[name].append(r)
                print(f"  {name} run {rep + 1}: find_circuit {r['seconds']:.1f} s = {r['seconds'] / r['n']:.3f} "
                      f"s/prompt (load average {r['load'][0]} -> {r['load'][1]}; whole process "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    for what, pick in (("median", statistics.median), ("least (the least disturbed run)", min)):
        got = {name: pick(r["seconds"] / r["n"] for r in rs) for name, rs in runs.items()}
        print(f"  {what} s/prompt: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items())
              + (f"; ratio {got[list(trees)[0]] / got['this checkout']:.2f}x" if args.baseline else ""))
    if args.baseline:
        a, b = runs[list(trees)[0]][0], runs["this checkout"][0]
        print(f"  nodes equal: {a['nodes'] == b['nodes']} ({len(a['nodes'])}); exact edge prompt counts differing: "
              f"{sum(a['counts'].get(k) != v for k, v in b['counts'].items())}")
        for key in ("effect", "atp", "ig"):
            va, vb = a[key].double(), b[key].double()
            d = float((va - vb).abs().max())
            print(f"  {key:9s} max |diff| {d:.3g} ({d / float(va.abs().max()):.2g} of the largest)")
        for key in ("edges", "atp_edges", "ig_edges"):
            print(f"  {key:9s} max |diff| {_largest_difference(a[key], b[key])}")


if __name__ == "__main__":
    main()
