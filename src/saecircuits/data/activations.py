"""Activations for SAE training: packed token rows, one LM pass for many hook points, a shuffling buffer, a disk cache.

The pipeline (the reference notebook's training rows and activation buffer; SAELens ``ActivationsStore`` /
``mixing_buffer``):

1. :func:`pack_token_rows` concatenates BOS-prefixed documents into one stream and cuts it into rows of ``seq_len``
   tokens, each starting with BOS (the reference notebook's training rows; story-boundary BOS tokens stay inside rows).
2. :func:`model_activation_chunks` runs the language model ONCE per chunk of rows and returns the activations of
   every requested hook point (``run_with_hooks`` reading exactly those hooks, ending the forward after the last of
   them), flattened
   over (row, position). The BOS policy (:data:`BOS_POLICIES`) is the single switch deciding whether BOS positions
   are part of the data; :func:`bos_keep_mask` applies the same switch anywhere else (statistics, analysis).
3. :func:`shuffled_batches` mixes the chunks in a seeded buffer (refill half, shuffle, emit half) and yields
   training batches ``{hook_point: [batch_size, d_in]}``.
4. :func:`write_activation_cache` / :func:`iter_activation_cache` store chunks as safetensors shards, so several
   SAEs or sweeps can be trained without re-running the model.

Everything is deterministic for a given seed: no global RNG is touched.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from saecircuits.atomic import atomic_write, atomic_write_text
from saecircuits.models.hooks import n_ctx_of, stop_layer_for, unknown_hook_message, unknown_hooks
from saecircuits.models.tokens import special_token_mask

logger = logging.getLogger(__name__)

BOSPolicy = Literal["include", "exclude", "exclude_first"]
BOS_POLICIES: tuple[str, ...] = ("include", "exclude", "exclude_first")
"""``"include"``: every position is data (54_serene_plasma's training). ``"exclude"``: every position holding the BOS
token (the leading column and story-boundary BOS inside rows) is dropped (modern default: the analyses never read
BOS positions); given the tokenizer's whole special-token set (``models.tokens.special_token_ids``), every
BOS/EOS/PAD position is dropped.
``"exclude_first"``: only position 0 of each row is dropped, story-boundary BOS inside rows stay (189_giddy_water's
rows of 127)."""



class ActivationDataError(ValueError):
    """Token rows, hook points or an activation cache do not fit the request."""


# --------------------------------------------------------------------------------------------------- token rows
def pack_token_rows(
    documents: Iterable[Sequence[int]],
    seq_len: int,
    bos_id: int | None,
    *,
    leading_bos: bool = True,
    shuffle_seed: int | None = None,
) -> torch.Tensor:
    """Pack tokenised documents into rows of ``seq_len`` tokens, as the reference notebook's training data.

    Every document is prefixed with ``bos_id`` and all are concatenated into one stream; the stream is cut into
    pieces of ``seq_len - 1`` tokens (``seq_len`` when ``leading_bos=False``) and, with ``leading_bos``, a BOS
    column is prepended, so each row starts with BOS as in the reference notebook. The incomplete tail is dropped.
    A tokenizer without BOS (``bos_id=None``) gets no separator and no BOS column (no stand-in token is invented).

    Args:
        documents: token id lists WITHOUT BOS (one per document).
        seq_len: tokens per row (128 in the reference notebook).
        bos_id: the BOS token id (50256 for GPT-2 BPE), or None when the tokenizer has none.
        leading_bos: put BOS at column 0 of every row (ignored without a BOS).
        shuffle_seed: if given, rows are permuted with a seeded generator (the notebook's permutation was unseeded).

    Returns:
        int64 ``[n_rows, seq_len]``.

    Raises:
        ActivationDataError: ``seq_len < 2`` or fewer tokens than one row.
    """
    if seq_len < 2:
        raise ActivationDataError(f"seq_len must be >= 2, got {seq_len}")
    if bos_id is None:
        leading_bos = False
    stream: list[int] = []
    for doc in documents:
        if bos_id is not None:
            stream.append(int(bos_id))
        stream.extend(int(t) for t in doc)
    body = seq_len - 1 if leading_bos else seq_len
    n_rows = len(stream) // body
    if n_rows == 0:
        raise ActivationDataError(
            f"{len(stream)} tokens (with BOS) are fewer than one row of {seq_len}; give more documents or a smaller seq_len"
        )
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    if leading_bos:
        rows = torch.cat([torch.full((n_rows, 1), int(bos_id), dtype=torch.long), rows], dim=1)
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(int(shuffle_seed))
        rows = rows[torch.randperm(n_rows, generator=gen)]
    return rows


def bos_keep_mask(
    tokens: torch.Tensor, bos_id: int | Collection[int] | None, policy: BOSPolicy
) -> torch.Tensor:
    """Which positions are data under the BOS policy.

    Args:
        tokens: int ``[..., pos]``.
        bos_id: BOS token id, or the set of special ids to exclude (``models.tokens.special_token_ids``: BOS, EOS,
            PAD), required when ``policy == "exclude"``.
        policy: one of :data:`BOS_POLICIES`.

    Returns:
        bool, same shape as ``tokens``; ``False`` where the position holds an excluded id, anywhere in the row (for
        ``"exclude_first"``: position 0 of every row).

    Raises:
        ActivationDataError: unknown policy, or ``"exclude"`` without ``bos_id``.
    """
    if policy not in BOS_POLICIES:
        raise ActivationDataError(f"unknown BOS policy {policy!r}; use one of {BOS_POLICIES}")
    if policy == "include":
        return torch.ones_like(tokens, dtype=torch.bool)
    if policy == "exclude_first":
        keep = torch.ones_like(tokens, dtype=torch.bool)
        keep[..., 0] = False
        return keep
    if bos_id is None:
        raise ActivationDataError("BOS policy 'exclude' needs bos_id (the tokenizer's BOS token id)")
    return ~special_token_mask(tokens, bos_id)


def shard_rows(token_rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows for data-parallel training: rows ``rank, rank + world_size, ...`` (``[n // world, seq]``).

    Rows are dealt round-robin and truncated to a multiple of ``world_size`` so every rank has the same count.
    """
    if not 0 <= rank < world_size:
        raise ActivationDataError(f"rank {rank} outside world of size {world_size}")
    n = (token_rows.shape[0] // world_size) * world_size
    return token_rows[rank:n:world_size]


# --------------------------------------------------------------------------------------------------- one LM pass
def _stop_layer(hook_points: Sequence[str], n_layers: int | None) -> int | None:
    return stop_layer_for(hook_points, n_layers)


def model_activation_chunks(
    model: Any,
    token_rows: torch.Tensor,
    hook_points: Sequence[str],
    *,
    model_batch_rows: int = 32,
    bos_id: int | Collection[int] | None = None,
    bos_policy: BOSPolicy = "include",
    dtype: torch.dtype = torch.float32,
    storage_device: torch.device | str = "cpu",
    epochs: int | None = 1,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Run the model once per chunk of rows and yield the activations of all ``hook_points`` from that ONE pass.

    Uses ``model.run_with_hooks(tokens, fwd_hooks=<a reader per hook point>, stop_at_layer=<last needed block + 1>)``
    (a TransformerLens ``TransformerBridge`` or ``HookedTransformer``) under ``torch.no_grad``, ended as soon as every
    hook point has been read (:func:`_read_hooks`: the final norm and the unembedding never run).

    Args:
        model: TransformerLens model; must accept ``run_with_hooks`` and have a ``hook_dict``.
        token_rows: int64 ``[n_rows, seq]`` (see :func:`pack_token_rows`).
        hook_points: hook names as TL spells them, e.g. ``["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]``.
        model_batch_rows: rows per forward pass.
        bos_id, bos_policy: which positions count as data (:func:`bos_keep_mask`; ``bos_id`` may be the set of
            special ids).
        dtype: storage dtype of the yielded activations (float32 default; bfloat16 halves memory, as the notebook).
        storage_device: where the yielded activations live.
        epochs: passes over the rows (``None`` = forever; each epoch reshuffles rows when ``shuffle_seed`` is set).
        shuffle_seed: seed of the per-epoch row order (``None`` keeps the given order).

    Yields:
        ``{hook_point: [n_kept_positions, d_in]}`` for each chunk, positions flattened row-major.

    Raises:
        ActivationDataError: empty ``hook_points``, non-2-D rows, rows longer than the model's context, or a hook
            point the model does not produce.
    """
    if not hook_points:
        raise ActivationDataError("give at least one hook point, e.g. 'blocks.0.mlp.hook_post'")
    if token_rows.ndim != 2 or token_rows.shape[0] == 0:
        raise ActivationDataError(
            f"token_rows must be a non-empty int tensor [n_rows, seq], got {tuple(token_rows.shape)}"
        )
    n_ctx = n_ctx_of(model)
    if n_ctx is not None and token_rows.shape[1] > n_ctx:
        raise ActivationDataError(
            f"token rows of {token_rows.shape[1]} tokens are longer than the model's context of {n_ctx} tokens; "
            f"pack them with seq_len <= {n_ctx}"
        )
    wanted = list(dict.fromkeys(hook_points))
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    stop = _stop_layer(wanted, n_layers)
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(int(shuffle_seed)) if shuffle_seed is not None else None
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(token_rows.shape[0], generator=gen) if gen is not None else None
        for start in range(0, token_rows.shape[0], model_batch_rows):
            idx = slice(start, start + model_batch_rows)
            rows = token_rows[order[idx]] if order is not None else token_rows[idx]
            # the kept positions as indices: index_select copies rows, much faster than a boolean-mask index
            keep = bos_keep_mask(rows, bos_id, bos_policy).reshape(-1).nonzero().flatten()
            cache = _read_hooks(model, rows.to(device), wanted, stop)
            out: dict[str, torch.Tensor] = {}
            for hp in wanted:
                try:
                    act = cache[hp]
                except KeyError as err:
                    if unknown_hooks(model, [hp]):  # name it with a few valid hooks (models.hooks, one message)
                        raise ActivationDataError(unknown_hook_message(
                            model, [hp], "give a hook it has (hook_points=, --hook-point in train-sae)")) from err
                    raise ActivationDataError(
                        f"the model produced no activation for hook point {hp!r}; check the name "
                        f"(e.g. 'blocks.0.mlp.hook_post') and the layer count"
                    ) from err
                act = act.reshape(-1, act.shape[-1]).index_select(0, keep.to(act.device))
                out[hp] = act.to(device=storage_device, dtype=dtype)
            yield out
        epoch += 1


class _AllRead(Exception):
    """Raised by the hook that captured the last activation a forward needs, to skip the rest of the model."""


def _read_hooks(model: Any, tokens: torch.Tensor, wanted: Sequence[str], stop: int | None) -> dict[str, torch.Tensor]:
    """``{hook: activation}`` of one no-grad forward that ends once every hook in ``wanted`` has fired.

    ``stop_at_layer`` skips the blocks after the last one read, but not the final norm and the unembedding when the
    last block is read (TransformerLens stops only at a block's start): with GPT-2's 50,257-token vocabulary the
    unembedding was nine tenths of the forward of a 2-layer d_model 128 model reading both MLPs. The forward is
    therefore ended by an exception from the hook that captures the last wanted activation (each hook's first
    firing is kept). A hook name the model lacks leaves that hook out of the result.
    """
    store: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def hook(value: torch.Tensor, hook: Any = None) -> None:
            store.setdefault(name, value.detach())
            if len(store) == len(wanted):
                raise _AllRead

        return hook

    known = getattr(model, "hook_dict", None)
    names = [n for n in wanted if known is None or n in known]
    kwargs: dict[str, Any] = {"return_type": None}
    if stop is not None:
        kwargs["stop_at_layer"] = stop
    with torch.no_grad():
        try:
            model.run_with_hooks(tokens, fwd_hooks=[(n, grab(n)) for n in names], **kwargs)
        except _AllRead:
            pass
    return store


# --------------------------------------------------------------------------------------------------- shuffling buffer
def shuffled_batches(
    chunks: Iterable[dict[str, torch.Tensor]],
    batch_size: int,
    *,
    buffer_size: int = 65536,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Mix activation chunks in a shuffling buffer and yield batches of ``batch_size`` rows per hook point.

    The reference notebook's buffer (SAELens ``mixing_buffer``): fill to ``buffer_size`` rows,
    shuffle (seeded), emit the first half as batches, keep the second half, refill. The same permutation is used for
    every hook point, so row ``i`` of every tensor in a batch comes from the same token. When the source ends the
    remaining rows are shuffled and emitted; a last partial batch is dropped.

    Args:
        chunks: iterator of ``{hook_point: [n, d_in]}`` (all hook points with the same ``n``).
        batch_size: rows per yielded batch (tokens per optimiser step on this rank).
        buffer_size: rows held for mixing (>= 2 * batch_size).
        seed: seed of the buffer's own generator.

    Yields:
        ``{hook_point: [batch_size, d_in]}``.
    """
    if buffer_size < 2 * batch_size:
        raise ActivationDataError(
            f"buffer_size ({buffer_size}) must be at least 2 * batch_size ({2 * batch_size})"
        )
    gen = torch.Generator().manual_seed(int(seed))
    source = iter(chunks)
    exhausted = False
    # The buffer's rows are rows [0, have) of `store`; `spare` (the same capacity) receives the kept half after each
    # emission, then the two swap. Reusing them instead of concatenating and permuting into new tensors every round
    # copies each row once in and once out and avoids allocating (and page-faulting in) fresh buffer-sized tensors,
    # which cost more than the copies on a CPU. The values are those of ``cat(pieces)[perm]`` split into batches.
    store: dict[str, torch.Tensor] = {}
    spare: dict[str, torch.Tensor] = {}
    have = 0
    while True:
        while have < buffer_size and not exhausted:
            try:
                chunk = next(source)
            except StopIteration:
                exhausted = True
                break
            n = next(iter(chunk.values())).shape[0]
            if not store:
                store = {k: v.new_empty((buffer_size + 2 * n, *v.shape[1:])) for k, v in chunk.items()}
                spare = {k: torch.empty_like(v) for k, v in store.items()}
            if have + n > next(iter(store.values())).shape[0]:  # a chunk longer than the first: grow both
                cap = max(have + n, 3 * next(iter(store.values())).shape[0] // 2)
                store = {k: torch.cat([v[:have], v.new_empty((cap - have, *v.shape[1:]))]) for k, v in store.items()}
                spare = {k: torch.empty_like(v) for k, v in store.items()}
            for k, v in store.items():
                v[have : have + n].copy_(chunk[k])
            have += n
        if have < batch_size or not store:
            return
        perm = torch.randperm(have, generator=gen)
        perms = {k: perm.to(v.device) for k, v in store.items()}
        n_emit = have if exhausted else max(batch_size, (have // 2) // batch_size * batch_size)
        n_emit = n_emit // batch_size * batch_size
        for s in range(0, n_emit, batch_size):
            # a new tensor per batch (never a view of the reused buffer, which a consumer may hold on to)
            yield {k: v.index_select(0, perms[k][s : s + batch_size]) for k, v in store.items()}
        if exhausted:
            return
        for k, v in store.items():
            torch.index_select(v, 0, perms[k][n_emit:], out=spare[k][: have - n_emit])
        store, spare = spare, store
        have -= n_emit


def model_activation_batches(
    model: Any,
    token_rows: torch.Tensor,
    hook_points: Sequence[str],
    batch_size: int,
    *,
    model_batch_rows: int = 32,
    buffer_size: int = 65536,
    bos_id: int | Collection[int] | None = None,
    bos_policy: BOSPolicy = "include",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches ``{hook_point: [batch_size, d_in]}`` straight from the model (one pass for all hook points).

    :func:`model_activation_chunks` (rows reshuffled each epoch with ``seed``) through :func:`shuffled_batches`.
    With ``epochs=None`` the rows repeat forever (the trainer decides when to stop).
    """
    chunks = model_activation_chunks(
        model,
        token_rows,
        hook_points,
        model_batch_rows=model_batch_rows,
        bos_id=bos_id,
        bos_policy=bos_policy,
        dtype=dtype,
        epochs=epochs,
        shuffle_seed=seed,
    )
    return shuffled_batches(chunks, batch_size, buffer_size=buffer_size, seed=seed + 1)


# --------------------------------------------------------------------------------------------------- disk cache
_MANIFEST = "manifest.json"


def write_activation_cache(
    chunks: Iterable[dict[str, torch.Tensor]], folder: str | os.PathLike, *, shard_rows: int = 65536
) -> Path:
    """Write activation chunks to ``folder`` as safetensors shards plus ``manifest.json``.

    Each shard ``shard_{i:05d}.safetensors`` holds one tensor per hook point (same row count). Shards are written
    atomically (temp file, then ``os.replace``) and the manifest last, so a half-written cache is never read.

    Returns:
        the folder path.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pending: list[dict[str, torch.Tensor]] = []
    n_pending = 0
    shards: list[dict[str, Any]] = []
    hooks: dict[str, dict[str, Any]] | None = None

    def flush() -> None:
        nonlocal pending, n_pending
        if not pending:
            return
        merged = {k: torch.cat([p[k] for p in pending]).contiguous() for k in pending[0]}
        name = f"shard_{len(shards):05d}.safetensors"
        atomic_write(folder / name, lambda tmp: save_file(merged, tmp))
        shards.append({"file": name, "rows": int(next(iter(merged.values())).shape[0])})
        pending, n_pending = [], 0

    for chunk in chunks:
        if hooks is None:
            hooks = {
                k: {"d_in": int(v.shape[-1]), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in chunk.items()
            }
        elif set(chunk) != set(hooks):
            raise ActivationDataError(
                f"chunk hook points {sorted(chunk)} differ from the first chunk's {sorted(hooks)}"
            )
        pending.append({k: v.detach().cpu() for k, v in chunk.items()})
        n_pending += next(iter(chunk.values())).shape[0]
        if n_pending >= shard_rows:
            flush()
    flush()
    if hooks is None:
        raise ActivationDataError("no activations to cache (the chunk iterator was empty)")
    manifest = {"format": "saecircuits-activation-cache-v1", "hook_points": hooks, "shards": shards}
    atomic_write_text(folder / _MANIFEST, json.dumps(manifest, indent=1))
    return folder


def iter_activation_cache(
    folder: str | os.PathLike,
    hook_points: Sequence[str] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    epochs: int | None = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Read an activation cache written by :func:`write_activation_cache`, shard by shard.

    Args:
        folder: the cache folder.
        hook_points: subset to read (default all).
        rank, world_size: data-parallel training reads shards ``rank, rank + world_size, ...``.
        epochs: passes over the shards (``None`` = forever).

    Yields:
        ``{hook_point: [rows, d_in]}`` per shard.

    Raises:
        ActivationDataError: missing/corrupt manifest, unknown hook point, or fewer shards than ranks.
    """
    from safetensors import safe_open

    folder = Path(folder)
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except FileNotFoundError as err:
        raise ActivationDataError(
            f"{folder} is not an activation cache (no {_MANIFEST}); write one first"
        ) from err
    except json.JSONDecodeError as err:
        raise ActivationDataError(
            f"{folder / _MANIFEST} is corrupt: {err}; delete the cache and rebuild it"
        ) from err
    available = manifest["hook_points"]
    keys = list(hook_points) if hook_points is not None else list(available)
    missing = [k for k in keys if k not in available]
    if missing:
        raise ActivationDataError(f"hook points {missing} are not in the cache (it has {sorted(available)})")
    shards = manifest["shards"][rank::world_size]
    if not shards:
        raise ActivationDataError(
            f"cache has {len(manifest['shards'])} shards, fewer than world_size={world_size}"
        )
    epoch = 0
    while epochs is None or epoch < epochs:
        for shard in shards:
            with safe_open(str(folder / shard["file"]), framework="pt") as fh:
                yield {k: fh.get_tensor(k) for k in keys}
        epoch += 1
