"""Benchmark (not a test): the demo's SAE training stage on the demo's own model and data (issue 17, item 4).

Trains the two SAEs ``saecircuits demo`` trains (the pipeline's ``topk`` recipe, d_sae 2048, k 32, AuxK, batch 2048,
195 steps = 399,360 activations each) on ``blocks.{0,1}.mlp.hook_post`` of the embedded 2-layer GPT-Neo, from one
model pass (:func:`saecircuits.saes.trainer.train_saes_on_model`, as ``pipeline.saes._train_or_reuse_saes``), so the
model forward, the shuffling buffer, both trainers and their metrics are all timed. Needs the demo's workspace (run
``saecircuits demo`` once; only the model and the SAE training corpus are read, no SAE cache is written).

``--baseline REV`` also runs git revision REV's source tree (a temporary worktree), baseline first, alternating
``--reps`` times, each run a fresh process; every line carries the process's CPU seconds per step (user + system,
both threads: less sensitive than the wall clock to other processes on a shared machine), the load average, and
each SAE's last logged
explained variance, L0 and dead fraction (identical figures mean the same training; see ``--steps`` for a short
check).

Usage::

    python benchmarks/bench_demo_sae_training.py --threads 2
    python benchmarks/bench_demo_sae_training.py --threads 2 --baseline main --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]


def _measure(args) -> dict:
    """One training run in this process: seconds, s/step, load average and the final metrics of each SAE."""
    from saecircuits.cli import threading_defaults

    threading_defaults()  # before torch loads OpenMP, as under the CLI
    import torch

    torch.set_num_threads(args.threads)
    from saecircuits.data.activations import pack_token_rows
    from saecircuits.models.default import ensure_default_model
    from saecircuits.models.load import load_model
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.saes.presets import pipeline_recipe
    from saecircuits.saes.trainer import train_saes_on_model

    ws = Path(args.workspace).expanduser()
    model = load_model(str(ensure_default_model(ws, progress=False)))
    tok = model.tokenizer
    text = (ws / "data" / "default-sae-train-seed7-n4000.txt").read_text()
    docs = encode_documents(tok, text.split("\n\n"), prepend_bos=False)
    rows = pack_token_rows(docs, min(128, int(model.cfg.n_ctx)), tok.bos_token_id, shuffle_seed=args.seed)
    arch, extra, train_cfg = pipeline_recipe("topk", total_steps=args.steps, batch_size=2048, k=32, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        t, cpu = time.perf_counter(), time.process_time()
        train_saes_on_model(model, rows, HOOKS, train_cfg, d_sae=2048, architecture=arch, sae_extra=extra,
                            bos_id=special_token_ids(tok), bos_policy="exclude", output_dir=out, progress=False,
                            model_name="saecircuits-default")
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        last = {hp: json.loads((Path(out) / hp / "metrics.jsonl").read_text().splitlines()[-1]) for hp in HOOKS}
    return {"seconds": seconds, "s_per_step": seconds / args.steps, "cpu_s_per_step": cpu / args.steps,
            "load": os.getloadavg()[0],
            "final": {hp: {k: m[k] for k in ("explained_variance_tokens", "l0", "dead_fraction")}
                      for hp, m in last.items()}}


def _row(name: str, r: dict) -> str:
    q = "  ".join(f"L{hp.split('.')[1]} EV {m['explained_variance_tokens']:.4f} L0 {m['l0']:.1f} "
                  f"dead {m['dead_fraction']:.4f}" for hp, m in r["final"].items())
    return (f"{name:>18s} {r['seconds']:7.1f} s {r['s_per_step']:6.3f} s/step {r['cpu_s_per_step']:6.3f} CPU s/step  "
            f"load {r['load']:5.2f}  {q}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--steps", type=int, default=195, help="training steps (the demo: 195)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workspace", default=os.environ.get("SAECIRCUITS_WORKSPACE", "~/.cache/saecircuits"))
    p.add_argument("--baseline", metavar="REV", help="also run git revision REV's source tree (first), for before/after")
    p.add_argument("--reps", type=int, default=1, help="runs of each source tree with --baseline")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one run's figures, for --baseline
    args = p.parse_args()
    if args.json:
        print(json.dumps(_measure(args)))
        return
    if not args.baseline:
        print(_row("this checkout", _measure(args)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-demo-sae-training-"))
    base = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                   capture_output=True)
    trees = {f"base {args.baseline}"[:18]: base, "this checkout": ROOT}
    argv = list(sys.argv[1:])
    i = argv.index("--baseline")
    del argv[i:i + 2]
    results: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for _ in range(args.reps):
            for name, src in trees.items():
                env = {**os.environ, "PYTHONPATH": str(src / "src"), "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1"}
                proc = subprocess.run([sys.executable, __file__, *argv, "--json"], env=env, capture_output=True,
                                      text=True)
                if proc.returncode:
                    sys.exit(f"error: the benchmark with {src} failed:\n{proc.stderr[-3000:]}")
                results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(_row(name, results[name][-1]), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    base_name = list(trees)[0]
    ratios = [results[base_name][r]["s_per_step"] / results["this checkout"][r]["s_per_step"]
              for r in range(args.reps)]
    cpu = [results[base_name][r]["cpu_s_per_step"] / results["this checkout"][r]["cpu_s_per_step"]
           for r in range(args.reps)]
    print(f"this checkout is {', '.join(f'{x:.2f}x' for x in ratios)} the baseline's training speed "
          f"(baseline s/step / this s/step, per rep); in CPU time {', '.join(f'{x:.2f}x' for x in cpu)}")


if __name__ == "__main__":
    main()
