"""Sharded runs on ``torch.distributed``: ``torchrun --nproc_per_node N saecircuits run ...``.

Every rank runs the whole pipeline on the same settings; the heavy per-prompt analyses split the task's prompt
batches over the ranks (:func:`my_batches`: batch ``b`` of the single-process batching goes to rank
``b % world_size``, so every prompt is computed in exactly the batch one process puts it in) and gather the
per-prompt values back (:func:`gather_rows`, :func:`sum_disjoint`), after which every rank holds what one process
computes and aggregates it identically (means, intervals, bootstraps with the same seeds). Only rank 0 writes
(:func:`is_writer`).

Collectives move tensors only (``all_reduce`` / ``all_gather`` of padded tensors; JSON bytes for
:func:`broadcast_json`): nothing is pickled. NCCL process groups communicate through the rank's CUDA device, gloo
through the CPU. A collective that fails because another rank died or timed out raises :class:`ShardError` (the
group's timeout: :data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT_S` seconds).

Every function is the identity (or a no-op) in one process, so callers use them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")

TIMEOUT_ENV = "SAECIRCUITS_DIST_TIMEOUT"
"""Environment variable: seconds a collective waits for the other ranks before the run fails."""

DEFAULT_TIMEOUT_S = 1800
"""Default collective timeout (seconds): longer than the most uneven stage of a sharded run should take."""


class ShardError(RuntimeError):
    """A collective of a sharded run failed: another rank died, was stopped or timed out. Nothing was written."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group; ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(shard: bool | None = None) -> bool:
    """Whether to split work over the ranks: ``shard`` when given (and more than one rank), else whenever a
    process group with more than one rank is initialised."""
    return world()[1] > 1 and (shard is None or bool(shard))


def is_writer() -> bool:
    """True on the rank that writes outputs (rank 0; the only rank in one process)."""
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    """``WORLD_SIZE`` > 1 in the environment (torchrun and ``torch.distributed.launch`` set it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's ``RANK`` as torchrun set it (0 without torchrun); read also after the group is gone."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(device: str) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) when there is more than one rank and no group yet.

    The backend is NCCL when ``device`` is CUDA (each rank then uses GPU ``LOCAL_RANK``: it becomes the current
    device, so ``"cuda"`` means the rank's own GPU) and gloo otherwise. Collectives time out after
    :data:`TIMEOUT_ENV` seconds (default :data:`DEFAULT_TIMEOUT_S`).

    Returns:
        True when this call initialised the group (the caller destroys it with :func:`shutdown`).

    Raises:
        ShardError: ``--device cuda`` with fewer GPUs than ``LOCAL_RANK + 1``, or a bad timeout value.
    """
    dist = torch.distributed
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ShardError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ShardError(f"rank with LOCAL_RANK {local} needs GPU {local}, but {torch.cuda.device_count()} "
                             "GPU(s) are visible: give --nproc_per_node at most the GPU count")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return True


def shutdown() -> None:
    """Destroy the default process group (nothing without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn the failure of a collective inside into :class:`ShardError` naming ``what`` was being gathered."""
    try:
        yield
    except ShardError:
        raise
    except RuntimeError as err:  # gloo: "Connection closed by peer"; NCCL/gloo timeouts (DistBackendError)
        rank, size = world()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ShardError(f"sharded run: rank {rank} of {size} lost the other ranks while gathering {what} "
                         f"({first}); another rank died, was stopped or timed out (see its own error). No results "
                         "were written.") from err


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside, in a sharded run, SIGTERM raises :class:`ShardError` instead of ending the process at once, so the
    run unwinds as on any error (temp files removed, the lock released). torchrun stops every rank with SIGTERM
    when one fails. Nothing changes in one process or outside the main thread."""
    import signal
    import threading

    if world()[1] <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        rank, size = world()
        raise ShardError(f"sharded run: rank {rank} of {size} was stopped (SIGTERM: torchrun stops every rank when "
                         "one fails; see the failed rank's error). No results were written.")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _device() -> torch.device:
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def my_batches(batches: Iterable[T], shard: bool | None = None) -> Iterator[T]:
    """This rank's share of ``batches``: batch ``b`` (counted from 0 in the order given) when ``b % world_size
    == rank``; every batch in one process or with ``shard=False``. Each rank builds the same batches as one
    process, so a prompt's values come from the same batch shape (float32 results can move ~1e-7 with it)."""
    rank, size = world()
    if not is_sharded(shard):
        yield from batches
        return
    for b, batch in enumerate(batches):
        if b % size == rank:
            yield batch


def sum_disjoint(t: torch.Tensor, what: str = "per-prompt values") -> torch.Tensor:
    """The sum of ``t`` over the ranks (a new CPU tensor; ``t`` itself in one process). Exact for per-prompt
    values that each rank writes into its own prompts' slots and leaves 0 elsewhere (``x + 0 == x``)."""
    if world()[1] <= 1:
        return t
    with collective(what):
        x = t.detach().to(_device()).clone()
        torch.distributed.all_reduce(x)
    return x.to(t.device)


def reduce(t: torch.Tensor, op: str = "sum", what: str = "totals") -> torch.Tensor:
    """``t`` reduced over the ranks (``op``: ``"sum"``, ``"min"`` or ``"max"``); ``t`` itself in one process."""
    if world()[1] <= 1:
        return t
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
           "max": torch.distributed.ReduceOp.MAX}
    with collective(what):
        x = t.detach().to(_device()).clone()
        torch.distributed.all_reduce(x, op=ops[op])
    return x.to(t.device)


def gather_parts(t: torch.Tensor, what: str = "per-prompt values") -> list[torch.Tensor]:
    """``[n_r, ...]`` on rank ``r`` -> every rank's tensor, in rank order (``[t]`` in one process).

    The ranks may hold different numbers of rows (same trailing shape and dtype): the counts are gathered first,
    then one ``all_gather`` of tensors padded to the largest count. Bool tensors travel as uint8."""
    if world()[1] <= 1:
        return [t]
    size = world()[1]
    dev = _device()
    as_bool = t.dtype == torch.bool
    x = (t.to(torch.uint8) if as_bool else t).detach().to(dev)
    with collective(what):
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=dev)
        ns = [torch.zeros_like(n) for _ in range(size)]
        torch.distributed.all_gather(ns, n)
        m = max(int(c) for c in ns)
        buf = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=dev)
        buf[: x.shape[0]] = x
        parts = [torch.empty_like(buf) for _ in range(size)]
        torch.distributed.all_gather(parts, buf)
    out = [p[: int(c)].to(t.device) for p, c in zip(parts, ns, strict=True)]
    return [o.bool() for o in out] if as_bool else out


def gather_rows(t: torch.Tensor, what: str = "per-prompt values") -> torch.Tensor:
    """``[n_r, ...]`` on rank ``r`` -> the rows of every rank concatenated in rank order (``t`` in one process);
    see :func:`gather_parts`."""
    if world()[1] <= 1:
        return t
    return torch.cat(gather_parts(t, what))


def barrier(what: str) -> None:
    """Wait until every rank is here (nothing in one process); :class:`ShardError` when a rank is gone."""
    if world()[1] <= 1:
        return
    with collective(what):
        if torch.distributed.get_backend() == "nccl":  # a barrier NCCL cannot time out on: an all_reduce
            torch.distributed.all_reduce(torch.zeros(1, device=_device()))
        else:
            torch.distributed.barrier()


def broadcast_json(obj: Any, what: str = "a decision of rank 0") -> Any:
    """Rank 0's ``obj`` (JSON-serialisable) on every rank, sent as UTF-8 JSON bytes (not pickled)."""
    if world()[1] <= 1:
        return obj
    rank = world()[0]
    dev = _device()
    data = json.dumps(obj).encode() if rank == 0 else b""
    with collective(what):
        n = torch.tensor([len(data)], dtype=torch.long, device=dev)
        torch.distributed.broadcast(n, 0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if rank == 0
               else torch.empty(int(n), dtype=torch.uint8, device=dev))
        torch.distributed.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().tolist()).decode()) if rank != 0 else obj
