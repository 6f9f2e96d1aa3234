"""Data path: packed rows (hand example), BOS switch, one-pass multi-hook collection, shuffling buffer, disk cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from saecircuits.data.activations import (
    ActivationDataError,
    bos_keep_mask,
    iter_activation_cache,
    model_activation_chunks,
    pack_token_rows,
    shard_rows,
    shuffled_batches,
    write_activation_cache,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

BOS = 9


def test_pack_token_rows_hand_example():
    # stream: 9 1 2 3 9 4 5 9 6 7 8 -> pieces of 3 (seq_len 4 minus the BOS column): [9 1 2] [3 9 4] [5 9 6]; tail "7 8" dropped
    rows = pack_token_rows([[1, 2, 3], [4, 5], [6, 7, 8]], seq_len=4, bos_id=BOS)
    assert rows.tolist() == [[9, 9, 1, 2], [9, 3, 9, 4], [9, 5, 9, 6]]
    no_lead = pack_token_rows([[1, 2, 3], [4, 5], [6, 7, 8]], seq_len=4, bos_id=BOS, leading_bos=False)
    assert no_lead.tolist() == [[9, 1, 2, 3], [9, 4, 5, 9]]  # 11 tokens -> 2 rows of 4
    shuffled = pack_token_rows([[1, 2, 3], [4, 5], [6, 7, 8]], seq_len=4, bos_id=BOS, shuffle_seed=0)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, rows.tolist()))
    with pytest.raises(ActivationDataError, match="fewer than one row"):
        pack_token_rows([[1]], seq_len=8, bos_id=BOS)


def test_bos_mask_and_shards():
    t = torch.tensor([[9, 1, 9, 2], [9, 3, 4, 5]])
    assert bos_keep_mask(t, 9, "include").all()
    assert bos_keep_mask(t, 9, "exclude").tolist() == [[False, True, False, True], [False, True, True, True]]
    assert bos_keep_mask(t, None, "exclude_first").tolist() == [
        [False, True, True, True],
        [False, True, True, True],
    ]
    with pytest.raises(ActivationDataError, match="needs bos_id"):
        bos_keep_mask(t, None, "exclude")
    with pytest.raises(ActivationDataError, match="unknown BOS policy"):
        bos_keep_mask(t, 9, "drop")  # type: ignore[arg-type]
    rows = torch.arange(7).unsqueeze(1)
    assert shard_rows(rows, 0, 2).flatten().tolist() == [0, 2, 4]
    assert shard_rows(rows, 1, 2).flatten().tolist() == [1, 3, 5]


def test_one_pass_equals_separate_full_forwards():
    """Both hook points from one (stop_at_layer) pass == a full forward cached per hook; BOS positions dropped; the
    pass reading the last block ends there (no final norm, no unembedding)."""
    from helpers import tiny_neo

    bridge = tiny_neo()
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 50, (5, 7), generator=gen)
    rows[:, 0] = 0
    rows[2, 4] = 0  # a story boundary inside a row
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    calls = []
    original = bridge.run_with_cache
    original_hooks = bridge.run_with_hooks
    unembedded = []
    bridge.unembed.register_forward_hook(lambda *a: unembedded.append(1))

    def counting(*a, **k):
        calls.append(k.get("stop_at_layer"))
        return original_hooks(*a, **k)

    bridge.run_with_hooks = counting
    chunks = list(
        model_activation_chunks(bridge, rows, hooks, model_batch_rows=3, bos_id=0, bos_policy="exclude")
    )
    assert len(calls) == 2  # ceil(5 / 3) forwards serve both hook points
    assert not unembedded  # each ended after block 1's MLP
    keep = (rows != 0).reshape(-1)
    for hp in hooks:
        _, cache = original(rows)
        expected = cache[hp].reshape(-1, cache[hp].shape[-1])[keep]
        got = torch.cat([c[hp] for c in chunks])
        assert got.shape[0] == 5 * 7 - 6
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # only layer 0 needed -> the model stops after block 0
    list(model_activation_chunks(bridge, rows, hooks[:1], model_batch_rows=5))
    assert calls[-1] == 1
    # a hook the model lacks: named, with valid ones (the same site's name by spelling first) and the option
    with pytest.raises(ActivationDataError, match=r"no hook 'blocks.0.mlp.hook_typo' .*valid hooks include "
                                                  r"blocks.0.mlp.hook_.*--hook-point"):
        list(model_activation_chunks(bridge, rows, ["blocks.0.mlp.hook_typo"]))


def _chunks(n_chunks=5, rows=30):
    """Chunk i holds token ids i*rows .. (i+1)*rows - 1: hook "a" = id (3 columns), hook "b" = -id (2 columns)."""
    out = []
    for i in range(n_chunks):
        ids = torch.arange(i * rows, (i + 1) * rows, dtype=torch.float32).unsqueeze(1)
        out.append({"a": ids.repeat(1, 3), "b": -ids.repeat(1, 2)})
    return out


def test_shuffled_batches_permute_and_keep_hooks_aligned():
    chunks = _chunks()
    batches = list(shuffled_batches(iter(chunks), batch_size=10, buffer_size=40, seed=3))
    assert all(b["a"].shape == (10, 3) and b["b"].shape == (10, 2) for b in batches)
    ids = torch.cat([b["a"][:, 0] for b in batches])
    assert sorted(ids.tolist()) == list(range(150))  # every row exactly once (150 rows = 15 batches)
    for b in batches:  # row i of both hook points comes from the same token
        torch.testing.assert_close(b["b"][:, 0], -b["a"][:, 0])
    assert ids[:10].tolist() != list(range(10))  # actually shuffled
    again = torch.cat([b["a"][:, 0] for b in shuffled_batches(iter(chunks), 10, buffer_size=40, seed=3)])
    assert torch.equal(ids, again)  # seeded
    with pytest.raises(ActivationDataError, match="at least 2"):
        next(shuffled_batches(iter(chunks), 10, buffer_size=15))


def _plain_shuffled_batches(chunks, batch_size, buffer_size, seed):
    """The mixing buffer as its docstring says it: concatenate to >= buffer_size rows, permute (the seeded
    generator), emit the first half (all when the source ended) as batches, keep the rest."""
    gen = torch.Generator().manual_seed(seed)
    source, buf, exhausted = iter(chunks), None, False
    while True:
        pieces = [buf] if buf is not None else []
        have = 0 if buf is None else buf["a"].shape[0]
        while have < buffer_size and not exhausted:
            try:
                chunk = next(source)
            except StopIteration:
                exhausted = True
                break
            pieces.append(chunk)
            have += chunk["a"].shape[0]
        if not pieces or have < batch_size:
            return
        perm = torch.randperm(have, generator=gen)
        merged = {k: torch.cat([p[k] for p in pieces])[perm] for k in pieces[0]}
        n_emit = have if exhausted else max(batch_size, (have // 2) // batch_size * batch_size)
        n_emit = n_emit // batch_size * batch_size
        for s in range(0, n_emit, batch_size):
            yield {k: v[s : s + batch_size] for k, v in merged.items()}
        if exhausted:
            return
        buf = {k: v[n_emit:] for k, v in merged.items()}


@pytest.mark.parametrize("sizes", [[25] * 6, [7, 0, 31, 90, 3, 12, 40, 5], [120, 1, 1, 200]])
def test_shuffled_batches_reused_buffer_equals_concatenate_and_permute(sizes):
    # the buffer reuses two tensors (rows copied in, kept half permuted into the other) instead of concatenating and
    # permuting into new ones: the batches must be exactly those of the plain computation, chunk sizes that vary
    # (an empty chunk, chunks longer than the first, which grow the buffer) included
    g = torch.Generator().manual_seed(0)
    chunks = []
    for n in sizes:
        ids = torch.randn(n, 3, generator=g)
        chunks.append({"a": ids, "b": torch.randn(n, 2, generator=g).double()})
    got = list(shuffled_batches(iter(chunks), 10, buffer_size=40, seed=5))
    want = list(_plain_shuffled_batches(chunks, 10, 40, 5))
    assert len(got) == len(want) == sum(sizes) // 10 and len(got) > 0
    for a, b in zip(got, want, strict=True):
        assert list(a) == ["a", "b"] and a["b"].dtype == torch.float64
        assert torch.equal(a["a"], b["a"]) and torch.equal(a["b"], b["b"])
    held = got[0]["a"].clone()  # a batch a consumer keeps is its own tensor, not a view of the reused buffer
    assert torch.equal(got[0]["a"], held) and got[0]["a"].data_ptr() != got[-1]["a"].data_ptr()


def test_activation_cache_roundtrip_and_rank_shards(tmp_path):
    chunks = _chunks(n_chunks=4, rows=25)
    write_activation_cache(iter(chunks), tmp_path / "cache", shard_rows=50)
    back = list(iter_activation_cache(tmp_path / "cache"))
    assert len(back) == 2
    torch.testing.assert_close(torch.cat([c["a"] for c in back]), torch.cat([c["a"] for c in chunks]))
    r1 = list(iter_activation_cache(tmp_path / "cache", ["b"], rank=1, world_size=2))
    assert len(r1) == 1 and set(r1[0]) == {"b"}
    torch.testing.assert_close(r1[0]["b"], torch.cat([c["b"] for c in chunks[2:]]))
    with pytest.raises(ActivationDataError, match="not in the cache"):
        next(iter_activation_cache(tmp_path / "cache", ["c"]))
    with pytest.raises(ActivationDataError, match="not an activation cache"):
        next(iter_activation_cache(tmp_path / "nothing"))
    (tmp_path / "cache" / "manifest.json").write_text("{broken")
    with pytest.raises(ActivationDataError, match="corrupt"):
        next(iter_activation_cache(tmp_path / "cache"))
