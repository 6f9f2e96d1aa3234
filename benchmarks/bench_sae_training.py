"""Benchmark (not a test): SAE training throughput and the fraction of this machine's fp32 matmul rate it reaches.

Usage::

    python benchmarks/bench_sae_training.py                      # CPU, d_in 512, d_sae 4096 and 16384
    python benchmarks/bench_sae_training.py --device cuda --batch-size 4096 --steps 50
    python benchmarks/bench_sae_training.py --device cuda --autocast bfloat16   # rate vs the fp32 matmul rate

What is measured: :class:`saecircuits.saes.trainer.SAETrainer` steps (ReLU SAE, L1, unit-norm decoder with the
gradient projection, Adam) on synthetic activations already on the device, so the language model and data path
are excluded. Matmul work per step is ``10 * batch * d_in * d_sae`` FLOPs (forward: encoder + decoder, 2 each;
backward: W_enc grad 2, W_dec grad 2, f grad 2; x needs no grad), compared with the rate of a large square fp32
matmul measured on the same device with the same thread count.
"""

from __future__ import annotations

import argparse
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int, repeats: int) -> float:
    """Measured fp32 FLOP/s of an ``n x n @ n x n`` matmul (best of ``repeats``)."""
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


def sae_throughput(
    device: torch.device, d_in: int, d_sae: int, batch: int, steps: int, warmup: int, autocast: str | None
) -> tuple[float, float]:
    """(tokens/s, matmul FLOP/s) of SAETrainer steps on synthetic activations resident on ``device``."""
    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.registry import build_sae
    from saecircuits.saes.trainer import SAETrainer, TrainConfig

    gen = torch.Generator(device="cpu").manual_seed(0)
    pool = torch.randn(8 * batch, d_in, generator=gen).relu().to(device)

    def batches():
        i = 0
        while True:
            yield pool[(i % 8) * batch : (i % 8 + 1) * batch]
            i += 1

    cfg = TrainConfig(
        batch_size=batch,
        total_steps=warmup + steps,
        lr=1e-4,
        loss={"regularizer": "l1", "coefficients": [1e-3]},
        log_every=10**9,
        device=str(device),
        autocast_dtype=autocast,
    )
    sae = build_sae(SAEConfig("standard", d_in, d_sae, "blocks.0.mlp.hook_post"))
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
    return tokens / dt, 10.0 * tokens * d_in * d_sae / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--autocast", default=None, choices=[None, "bfloat16", "float16"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    peak = matmul_rate(device, args.matmul_n, repeats=5)
    print(f"device: {name}; torch {torch.__version__}")
    print(f"measured fp32 matmul rate ({args.matmul_n}^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'d_in':>6} {'d_sae':>7} {'batch':>6} {'tokens/s':>12} {'GFLOP/s':>9} {'of fp32 matmul':>15}")
    for d_sae in args.d_sae:
        tok_s, flops = sae_throughput(
            device, args.d_in, d_sae, args.batch_size, args.steps, args.warmup, args.autocast
        )
        print(
            f"{args.d_in:>6} {d_sae:>7} {args.batch_size:>6} {tok_s:>12,.0f} {flops / 1e9:>9.1f} {flops / peak:>14.1%}"
        )


if __name__ == "__main__":
    main()
