"""Batching token lists with right padding, and the per-row prediction index.

Right padding never changes a result for a causal model with absolute or rotary positions: position p of row b
attends only to positions <= p of the same row, so everything at or before the row's last real token is identical
to the unpadded forward pass. Analyses therefore read each row at its own prediction index (a gather), never at -1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def pad_right(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length token lists into one right-padded batch.

    Args:
        token_ids: ``n`` lists of token ids (each non-empty).
        pad_id: id written into the padding (its value never matters for the real positions).

    Returns:
        tokens: int64 ``[n, max_len]``.
        lengths: int64 ``[n]``, the number of real tokens per row.
    """
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    tokens = torch.full((len(token_ids), int(lengths.max())), pad_id, dtype=torch.long)
    for i, t in enumerate(token_ids):
        tokens[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    return tokens, lengths


def batches_by_length(
    token_ids: Sequence[Sequence[int]], max_tokens: int = 16384, max_batch: int = 64
) -> Iterator[list[int]]:
    """Yield lists of row indices whose padded batch holds at most ``max_tokens`` tokens.

    Rows are grouped by length (longest first) so padding waste stays small; each index appears exactly once.
    Callers scatter results back with the yielded indices, so the output order is the input order.
    """
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    batch: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, len(token_ids[i]))
        if batch and (new_width * (len(batch) + 1) > max_tokens or len(batch) >= max_batch):
            yield batch
            batch, new_width = [], len(token_ids[i])
        batch.append(i)
        width = new_width
    if batch:
        yield batch


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick one position per row: ``x[b, positions[b]]``.

    Args:
        x: ``[batch, pos, ...]``.
        positions: int64 ``[batch]``, absolute indices.

    Returns:
        ``[batch, ...]``.
    """
    return x[torch.arange(x.shape[0], device=x.device), positions.to(x.device)]


def encode_documents(
    tokenizer, documents: Sequence[str], *, max_len: int | None = None, prepend_bos: bool = True
) -> list[list[int]]:
    """Tokenize documents as the model sees them: BOS (if ``prepend_bos``) + tokens, cut to ``max_len`` tokens.

    Uses ``tokenizer(texts, add_special_tokens=False)`` in one batched call, which matches ``bridge.to_tokens``
    (see tasks/closing_quote.py). Empty documents are kept as ``[BOS]`` so indices stay aligned.

    Raises:
        ValueError: ``prepend_bos`` but the tokenizer has no BOS id.
    """
    bos: list[int] = []
    if prepend_bos:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id")
        bos = [int(tokenizer.bos_token_id)]
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"] if documents else []
    out = [bos + list(ids) for ids in encoded]
    if max_len is not None:
        out = [ids[:max_len] for ids in out]
    return out
