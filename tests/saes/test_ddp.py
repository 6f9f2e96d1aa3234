"""Data-parallel training (torch.distributed, gloo, 2 CPU processes) equals one process on the same global batches."""

from __future__ import annotations

import os

import pytest
import torch

from saecircuits.saes.base import SAEConfig
from saecircuits.saes.registry import build_sae
from saecircuits.saes.trainer import CHECKPOINT_NAME, SAETrainer, TrainConfig

D_IN, D_SAE, GLOBAL_BATCH, STEPS, WORLD = 8, 32, 32, 16, 2


def _global_batches(n=STEPS + 10):
    gen = torch.Generator().manual_seed(0)
    return [2.0 * torch.randn(GLOBAL_BATCH, D_IN, generator=gen).relu() for _ in range(n)]


def _cfg(reduction: str) -> TrainConfig:
    return TrainConfig(
        batch_size=GLOBAL_BATCH,
        total_steps=STEPS,
        lr=2e-2,
        lr_warmup_steps=3,
        sparsity_warmup_steps=4,
        normalize_activations=True,
        n_norm_batches=2,
        resample_steps=(8,),
        resample_window=4,
        dead_frequency=0.05,
        resample_pool_batches=2,
        checkpoint_every=8,
        log_every=4,
        loss={
            "regularizer": "l1",
            "coefficients": [2e-2 if reduction == "mean" else 1e-3],
            "batch_reduction": reduction,
        },
    )


def _sae():
    sae = build_sae(SAEConfig("standard", D_IN, D_SAE, "blocks.0.mlp.hook_post"), seed=3)
    with torch.no_grad():
        sae.b_enc[:6] = -100.0  # six dead features, so the run resamples (pool gathered over ranks)
    return sae


def _worker(rank: int, init_file: str, out_dir: str, reduction: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    try:
        half = GLOBAL_BATCH // WORLD
        mine = [
            b[rank * half : (rank + 1) * half] for b in _global_batches()
        ]  # this rank's shard of every batch
        trainer = SAETrainer(_sae(), iter(mine), _cfg(reduction), checkpoint_dir=out_dir, progress=False)
        sae = trainer.fit()
        state = {k: v.clone() for k, v in sae.state_dict().items()}
        state["n_resampled"] = torch.tensor(trainer.n_resampled_total)
        torch.save(state, os.path.join(out_dir, f"final_rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_process_gloo_equals_single_process(tmp_path, reduction):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(str(tmp_path / "rdzv"), str(out), reduction), nprocs=WORLD, join=True)

    single = SAETrainer(_sae(), iter(_global_batches()), _cfg(reduction), progress=False)
    ref = single.fit()
    assert single.n_resampled_total > 0
    r0 = torch.load(out / "final_rank0.pt", weights_only=True)
    r1 = torch.load(out / "final_rank1.pt", weights_only=True)
    assert int(r0["n_resampled"]) == single.n_resampled_total
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0)  # ranks stay identical
        torch.testing.assert_close(r0[name], getattr(ref, name), rtol=1e-4, atol=1e-5)
    assert (out / CHECKPOINT_NAME).exists()  # one writer (rank 0) for checkpoints
