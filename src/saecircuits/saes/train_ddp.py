"""Data-parallel plumbing of the SAE trainer (``torch.distributed`` under torchrun: NCCL on GPUs, gloo on CPU).

Every function is a no-op (or the identity) in a single process, so the trainer calls them unconditionally. Split
from :mod:`saecircuits.saes.trainer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_(t: torch.Tensor, world_size: int, op: Any = None) -> torch.Tensor:
    """Reduce ``t`` in place over the ranks (sum unless ``op`` says otherwise) and return it."""
    if world_size > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def average_gradients_(params: Sequence[torch.Tensor], world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one flat all-reduce; parameters without a
    gradient are skipped)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat, world_size)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """``[rows, ...]`` of this rank -> the rows of every rank concatenated in rank order (``x`` itself in one
    process)."""
    if world_size <= 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts)


def barrier(world_size: int) -> None:
    """Wait for every rank (nothing in one process)."""
    if world_size > 1:
        torch.distributed.barrier()
