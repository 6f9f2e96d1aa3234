"""Benchmark (not a test): SAE training throughput, the fraction of this machine's fp32 matmul rate it reaches, and
the quality of what was trained (explained variance, L0, dead features).

Usage::

    python benchmarks/bench_sae_training.py --threads 2                 # CPU, d_in 512, d_sae 4096 and 16384 (L1)
    python benchmarks/bench_sae_training.py --recipe topk --d-sae 2048 --batch-size 2048 --steps 195 --threads 2 \\
        --baseline HEAD~3                                                # the pipeline's default run, before/after
    python benchmarks/bench_sae_training.py --device cuda --batch-size 4096 --steps 50
    python benchmarks/bench_sae_training.py --device cuda --autocast bfloat16   # rate vs the fp32 matmul rate

What is measured: :class:`saecircuits.saes.trainer.SAETrainer` steps on synthetic activations already on the device,
so the language model and data path are excluded. ``--recipe``:

- ``l1`` (default): ReLU SAE, L1, unit-norm decoder with the gradient projection, Adam, lr 1e-4;
- ``topk``: the pipeline's default recipe (:func:`saecircuits.saes.presets.pipeline_recipe`: TopK k=32, AuxK,
  b_dec at the mean, W_enc = W_dec^T, learning-rate warm-up and decay, inputs normalised), over ``warmup + steps``
  steps;
- ``reference``: the pipeline's ReLU + L1 recipe, likewise.

The activations are a sparse dictionary code (each token the sum of about 16 of 8,192 random unit directions with
exponential magnitudes, Zipf-distributed frequencies, plus noise), so what is trained has a meaningful explained
variance: after the timed steps the SAE's explained variance and L0 on 8,192 held-out activations and the training
log's dead fraction are printed. Matmul work per dense step is ``12 * batch * d_in * d_sae`` FLOPs (forward: encoder +
decoder, 2 each; backward: W_enc grad 2, W_dec grad 2, f grad 2, encoder-input grad 2 for b_dec); for ``topk`` the
column says what the dense computation would have done, which training from sparse codes does not (so it can
exceed 100%). The fp32 rate is that of a large square matmul on the same device with the same thread count.

``--baseline REV`` also runs the same benchmark with the source tree of git revision REV (a temporary worktree), in
a fresh process per tree, baseline first, alternating ``--reps`` times; each line carries the load average.
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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, n: int, repeats: int) -> float:
    """Measured fp32 FLOP/s of an ``n x n @ n x n`` matmul (best of ``repeats``)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def synthetic_activations(n: int, d_in: int, seed: int):
    """``[n, d_in]`` sparse-code activations: per token ~16 of 8,192 unit directions (Zipf frequencies, exponential
    magnitudes) summed, plus Gaussian noise of 5% of the typical norm."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    n_dict, active = 8192, 16
    dictionary = torch.nn.functional.normalize(torch.randn(n_dict, d_in, generator=torch.Generator().manual_seed(1)),
                                               dim=-1)
    freq = 1.0 / torch.arange(1, n_dict + 1, dtype=torch.float64) ** 0.8
    idx = torch.multinomial(freq.expand(n, n_dict), active, replacement=False, generator=gen)
    mags = torch.empty(n, active).exponential_(1.0, generator=gen)
    x = F.embedding_bag(idx, dictionary, per_sample_weights=mags, mode="sum")
    return x + 0.05 * x.norm(dim=-1).mean() / d_in**0.5 * torch.randn(n, d_in, generator=gen)


def sae_run(device, d_in: int, d_sae: int, batch: int, steps: int, warmup: int, autocast: str | None,
            recipe: str) -> dict:
    """Train ``warmup + steps`` steps (the last ``steps`` timed) on synthetic activations resident on ``device``;
    returns tokens/s, dense-equivalent matmul FLOP/s and the trained SAE's quality."""
    import torch

    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.metrics import explained_variance
    from saecircuits.saes.registry import build_sae
    from saecircuits.saes.trainer import SAETrainer, TrainConfig

    n_pool = 32
    pool = synthetic_activations(n_pool * batch, d_in, seed=0).to(device)
    held_out = synthetic_activations(8192, d_in, seed=2).to(device)

    def batches():
        i = 0
        while True:
            yield pool[(i % n_pool) * batch : (i % n_pool + 1) * batch]
            i += 1

    total = warmup + steps
    if recipe == "l1":
        arch, extra = "standard", {}
        cfg = TrainConfig(batch_size=batch, total_steps=total, lr=1e-4,
                          loss={"regularizer": "l1", "coefficients": [1e-3]})
    else:
        from saecircuits.saes.presets import pipeline_recipe

        arch, extra, cfg = pipeline_recipe(recipe, total_steps=total, batch_size=batch)
    cfg.log_every = total
    cfg.device = str(device)
    cfg.autocast_dtype = autocast
    sae = build_sae(SAEConfig(arch, d_in, d_sae, "blocks.0.mlp.hook_post", extra=extra))
    trainer = SAETrainer(sae, batches(), cfg, progress=False)
    for _ in range(warmup):
        trainer.train_step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(device)
    dt = time.perf_counter() - t
    tokens = steps * batch
    trained = trainer.finished_sae().to(device)
    with torch.no_grad():
        ev = explained_variance(held_out, trained(held_out))
        l0 = float((trained.encode(held_out) > 0).sum(-1).float().mean())
    return {"tokens_s": tokens / dt, "s_per_step": dt / steps, "flops": 12.0 * tokens * d_in * d_sae / dt,
            "ev": ev, "l0": l0, "dead": trainer.last_metrics["dead_fraction"]}


def _measure(args) -> dict:
    """Every ``--d-sae`` in this process: the matmul rate and one :func:`sae_run` each."""
    from saecircuits.cli import threading_defaults

    threading_defaults()  # before torch loads OpenMP: waiting threads sleep, as under the CLI
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    runs = {d_sae: sae_run(device, args.d_in, d_sae, args.batch_size, args.steps, args.warmup, args.autocast,
                           args.recipe) for d_sae in args.d_sae}
    return {"device": f"{name}; torch {torch.__version__}", "peak": matmul_rate(device, args.matmul_n, repeats=5),
            "runs": runs, "load": os.getloadavg()[0]}


def _row(label: str, d_sae: int, r: dict, args, peak: float, load: float) -> str:
    return (f"{label:>18s} {args.d_in:>5} {d_sae:>6} {args.batch_size:>6} {r['s_per_step']:>8.3f} "
            f"{r['tokens_s']:>10,.0f} {r['flops'] / 1e9:>8.1f} {r['flops'] / peak:>8.1%} {r['ev']:>7.4f} "
            f"{r['l0']:>7.2f} {r['dead']:>6.3f} {load:>6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipe", default="l1", choices=["l1", "topk", "reference"])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--autocast", default=None, choices=[None, "bfloat16"])
    p.add_argument("--baseline", metavar="REV", help="also run git revision REV's source tree (first), for before/after")
    p.add_argument("--reps", type=int, default=1, help="runs of each source tree with --baseline")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one tree's figures, for --baseline
    args = p.parse_args()
    if args.json:
        print(json.dumps(_measure(args)))
        return
    header = (f"{'source':>18s} {'d_in':>5} {'d_sae':>6} {'batch':>6} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>8} "
              f"{'of mm':>8} {'EV':>7} {'L0':>7} {'dead':>6} {'load':>6}")
    print(f"recipe {args.recipe}; {args.warmup} + {args.steps} timed steps; EV and L0 on 8,192 held-out activations; "
          f"GFLOP/s = dense-equivalent 12*batch*d_in*d_sae per step")
    if not args.baseline:
        res = _measure(args)
        print(f"device: {res['device']}; fp32 matmul rate ({args.matmul_n}^3): {res['peak'] / 1e9:.1f} GFLOP/s")
        print(header)
        for d_sae, r in res["runs"].items():
            print(_row("this checkout", d_sae, r, args, res["peak"], res["load"]))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-sae-training-"))
    base = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                   capture_output=True)
    trees = {f"base {args.baseline}"[:18]: base, "this checkout": ROOT}
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--baseline")
    del argv[i:i + 2]
    results: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for _ in range(args.reps):
            for name, src in trees.items():
                env = {**os.environ, "PYTHONPATH": str(src / "src")}
                # this file's harness, the tree's saecircuits
                proc = subprocess.run([sys.executable, __file__, *argv, "--json"], env=env, capture_output=True,
                                      text=True)
                if proc.returncode:
                    sys.exit(f"error: the benchmark with {src} failed:\n{proc.stderr[-3000:]}")
                results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    first = results["this checkout"][0]
    print(f"device: {first['device']}; fp32 matmul rate ({args.matmul_n}^3): {first['peak'] / 1e9:.1f} GFLOP/s")
    print(header)
    for rep in range(args.reps):
        for name in trees:
            res = results[name][rep]
            for d_sae, r in res["runs"].items():
                print(_row(name, int(d_sae), r, args, res["peak"], res["load"]))
    for d_sae in args.d_sae:
        ratios = [results[list(trees)[0]][rep]["runs"][str(d_sae)]["s_per_step"]
                  / results["this checkout"][rep]["runs"][str(d_sae)]["s_per_step"] for rep in range(args.reps)]
        print(f"d_sae {d_sae}: this checkout is {', '.join(f'{r:.2f}x' for r in ratios)} the baseline's speed "
              f"(baseline s/step / this s/step, per rep)")


if __name__ == "__main__":
    main()
