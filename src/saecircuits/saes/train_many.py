"""Training several SAEs from ONE stream of activations: :func:`train_saes` (lock-step trainers on multi-hook
batches, e.g. a sweep) and :func:`train_saes_on_model` (one pass of the language model feeds one SAE per hook point).

Split from :mod:`saecircuits.saes.trainer`, which re-exports both.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError
from saecircuits.saes.train_config import TrainConfig
from saecircuits.saes.train_ddp import dist_info

logger = logging.getLogger("saecircuits.saes.trainer")  # the trainer's log lines, as before the split


def _key_view(shared: Iterator[dict[str, torch.Tensor]], key: str) -> Iterator[torch.Tensor]:
    for batch in shared:
        yield batch[key]


class _MultiSource:
    """Tee one iterator of ``{hook: batch}`` into one iterator per (trainer, hook)."""

    def __init__(self, shared: Iterator[dict[str, torch.Tensor]], keys: Sequence[str]) -> None:
        tees = itertools.tee(shared, len(keys))
        self.views = [_key_view(t, k) for t, k in zip(tees, keys, strict=True)]


def train_saes(
    batches: Iterable[dict[str, torch.Tensor]],
    saes: dict[str, SAE] | Sequence[tuple[str, SAE]],
    train_cfg: TrainConfig,
    *,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    wandb_run: Any = None,
    data_settings: dict[str, Any] | None = None,
) -> dict[str, SAE]:
    """Train several SAEs in lock-step from ONE stream of multi-hook batches ``{hook_point: [batch, d_in]}``.

    Each entry of ``saes`` is ``(name, sae)``; the SAE reads ``batch[sae.hook_point]``, so several SAEs may share a
    hook point (a hyper-parameter sweep). Every SAE gets its own :class:`SAETrainer` with checkpoints and metrics in
    ``output_dir/<name>/`` and, at the end, the SAELens folder ``output_dir/<name>/sae/`` (rank 0).
    ``data_settings`` (JSON-serialisable: how the batches were made, e.g. the BOS policy) is recorded in every
    SAE's ``cfg.extra["training"]["data"]`` beside the train config, so ``cfg.json`` says how it was trained.

    Returns:
        ``{name: trained SAE}`` (normalisation folded, on the CPU).
    """
    from saecircuits.saes.io import save_sae
    from saecircuits.saes.trainer import (  # trainer.py re-exports this module's functions
        SAETrainer,
        _progress,
    )

    items = list(saes.items()) if isinstance(saes, dict) else list(saes)
    if not items:
        raise SAEError("give at least one SAE to train")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise SAEError(f"SAE names must be unique, got {names}")
    source = _MultiSource(iter(batches), [s.hook_point for _, s in items])
    out_root = Path(output_dir) if output_dir is not None else None
    trainers = [
        SAETrainer(
            sae,
            view,
            train_cfg,
            checkpoint_dir=(out_root / _safe(name)) if out_root is not None else None,
            resume=resume,
            progress=False,
            wandb_run=wandb_run,
            name=name,
        )
        for (name, sae), view in zip(items, source.views, strict=True)
    ]
    rank, _ = dist_info()
    start = min(t.step for t in trainers)
    bar = _progress(train_cfg.total_steps, start, "train SAEs", progress and rank == 0)
    try:
        for _ in range(start, train_cfg.total_steps):
            post = {}
            for t in trainers:
                if t.step < train_cfg.total_steps:
                    t.train_step()
                if t.last_metrics:
                    short = t.name.replace("blocks.", "b").replace(".mlp.hook_post", "")
                    post[short] = f"L0 {t.last_metrics['l0']:.1f} MSE {t.last_metrics['mse']:.3g}"
            bar.update(1)
            if post:
                bar.set_postfix(post, refresh=False)
    finally:
        bar.close()
        for t in trainers:
            t.sae.eval()
    result = {}
    for t in trainers:
        sae = t.finished_sae()
        if data_settings:
            sae.cfg.extra["training"]["data"] = dict(data_settings)
        result[t.name] = sae
        if out_root is not None and rank == 0:
            folder = out_root / _safe(t.name) / "sae"
            save_sae(sae, folder)
            logger.info("%s: SAE written to %s", t.name, folder)
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def train_saes_on_model(
    model: Any,
    token_rows: torch.Tensor,
    hook_points: Sequence[str],
    train_cfg: TrainConfig,
    sae_cfgs: SAEConfig | Sequence[SAEConfig] | None = None,
    *,
    expansion_factor: int = 4,
    d_sae: int | None = None,
    architecture: str = "standard",
    sae_extra: dict[str, Any] | None = None,
    bos_id: int | Collection[int] | None = None,
    bos_policy: str = "include",
    model_batch_rows: int = 32,
    buffer_size: int | None = None,
    activation_dtype: torch.dtype = torch.float32,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    shard: bool = True,
    model_name: str = "",
    wandb_run: Any = None,
) -> dict[str, SAE]:
    """Train one SAE per hook point from ONE pass of the model over packed token rows (the end-to-end entry point).

    Defaults give the reference notebook's SAE: ReLU (``"standard"``), expansion 4,
    seed-47 init, L1 penalty, unit-norm decoder rows with the parallel gradient removed, Adam lr 1e-4 betas
    (0.9, 0.99) -- set ``train_cfg.loss`` for the penalty.

    Args:
        model: TransformerLens ``TransformerBridge`` (or anything with ``run_with_cache``), ``d_in`` is read from
            the first batch.
        token_rows: int64 ``[n_rows, seq]`` (:func:`saecircuits.data.activations.pack_token_rows`); rows repeat
            (reshuffled, seeded) until ``total_steps`` is reached. Under torchrun each rank takes its own shard.
        hook_points: e.g. ``[f"blocks.{L}.mlp.hook_post" for L in range(n_layers)]``.
        train_cfg: :class:`TrainConfig` (``batch_size`` = tokens per step over all ranks).
        sae_cfgs: one :class:`SAEConfig` per hook point (same order), or ``None`` to build ``architecture`` with
            ``d_sae`` features (None: ``expansion_factor * d_in``) and ``cfg.extra = sae_extra`` (e.g.
            ``{"k": 32}`` for TopK).
        bos_id, bos_policy: the BOS switch (``"include"``/``"exclude"``), see
            :func:`saecircuits.data.activations.bos_keep_mask`.
        model_batch_rows: rows per model forward; buffer_size: rows in the shuffling buffer (default
            ``max(16 * local batch, 2 * local batch)``).
        activation_dtype: storage dtype of activations (fp32 default; bf16 documented option).
        output_dir: checkpoints, metrics and ``<hook>/sae/`` SAELens folders; resume: continue from its checkpoints.

    Returns:
        ``{hook_point: SAE}`` on the CPU, working on raw activations.

    Raises:
        SAEError: hook points and configs disagree; ActivationDataError: bad rows or unknown hook point.
    """
    from saecircuits.data.activations import model_activation_batches, shard_rows
    from saecircuits.saes.processing import record_model_processing
    from saecircuits.saes.registry import build_sae

    hook_points = list(hook_points)
    if len(set(hook_points)) != len(hook_points):
        raise SAEError(f"hook points must be unique, got {hook_points} (use train_saes for sweeps)")
    rank, world = dist_info()
    rows = shard_rows(token_rows, rank, world) if (shard and world > 1) else token_rows
    local_batch = train_cfg.batch_size // world
    batches = model_activation_batches(
        model,
        rows,
        hook_points,
        local_batch,
        model_batch_rows=model_batch_rows,
        buffer_size=buffer_size or max(16 * local_batch, 2 * local_batch),
        bos_id=bos_id,
        bos_policy=bos_policy,  # type: ignore[arg-type]
        dtype=activation_dtype,
        seed=train_cfg.seed,
        epochs=None,
    )
    if sae_cfgs is None:
        first = next(batches)
        batches = itertools.chain([first], batches)
        cfgs = [
            SAEConfig(
                architecture=architecture,
                d_in=int(first[hp].shape[-1]),
                d_sae=int(d_sae) if d_sae is not None else expansion_factor * int(first[hp].shape[-1]),
                hook_point=hp,
                model_name=model_name,
                extra=dict(sae_extra or {}),
            )
            for hp in hook_points
        ]
    else:
        cfgs = [sae_cfgs] if isinstance(sae_cfgs, SAEConfig) else list(sae_cfgs)
        if [c.hook_point for c in cfgs] != hook_points:
            raise SAEError(
                f"sae_cfgs hook points {[c.hook_point for c in cfgs]} must equal hook_points {hook_points} (same order)"
            )
    saes = [(c.hook_point, build_sae(c)) for c in cfgs]
    for _, sae in saes:  # an SAE on a hook that weight processing changes records the model's switches
        record_model_processing(sae, model)
    data_settings = {
        "seq_len": int(token_rows.shape[1]),
        "n_rows": int(token_rows.shape[0]),
        # one id, or the set of special ids (BOS/EOS/PAD) the "exclude" policy leaves out wherever they sit
        "bos_id": None if bos_id is None else (sorted(int(i) for i in bos_id) if isinstance(bos_id, (set, frozenset))
                                               else int(bos_id)),
        "bos_policy": bos_policy,
        "model_batch_rows": int(model_batch_rows),
        "buffer_size": int(buffer_size or max(16 * local_batch, 2 * local_batch)),
        "activation_dtype": str(activation_dtype).removeprefix("torch."),
        "world_size": int(world),
    }
    return train_saes(
        batches, saes, train_cfg, output_dir=output_dir, resume=resume, progress=progress, wandb_run=wandb_run,
        data_settings=data_settings,
    )
