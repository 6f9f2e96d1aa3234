"""Scoped hook helpers: per-row reads and edits at each row's own position, padding invariance."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, quote_task, tiny_neo

from saecircuits.models.hooks import (
    answer_metrics,
    edit_at_positions,
    run_at_positions,
    task_batches,
    unknown_hook_message,
)


def test_batches_cover_every_prompt_once_with_own_positions():
    model, task = tiny_neo(), quote_task()
    seen = []
    for batch in task_batches(model, task, max_tokens=80, max_batch=3):
        assert batch.tokens.shape[0] == len(batch.indices) <= 3
        for r, i in enumerate(batch.indices):
            assert int(batch.positions[r]) == task.prediction_pos[i]
            assert batch.tokens[r, : len(task.token_ids[i])].tolist() == task.token_ids[i]
            assert int(batch.answer_ids[r]) == task.answer_ids[i]
        seen += batch.indices
    assert sorted(seen) == list(range(task.n_prompts))


def test_reads_at_positions_equal_single_prompt_cache():
    model, task = tiny_neo(), quote_task()
    batch = next(task_batches(model, task))
    assert len(set(batch.positions.tolist())) > 1  # different lengths, right-padded
    logits, acts = run_at_positions(model, batch.tokens, batch.positions, read=[HOOK, "blocks.0.attn.hook_z"])
    for r, i in enumerate(batch.indices):
        single_logits, cache = model.run_with_cache(torch.tensor([task.token_ids[i]]))
        p = task.prediction_pos[i]
        torch.testing.assert_close(acts[HOOK][r], cache[HOOK][0, p], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            acts["blocks.0.attn.hook_z"][r], cache["blocks.0.attn.hook_z"][0, p], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(logits[r], single_logits[0, p], atol=1e-5, rtol=0)


def test_edit_touches_only_each_rows_position():
    model, task = tiny_neo(), quote_task()
    batch = next(task_batches(model, task))
    seen = {}

    def spy(value, hook=None):
        seen["after"] = value.detach().clone()

    def before(value, hook=None):
        seen["before"] = value.detach().clone()

    edit = edit_at_positions(batch.positions, lambda x, rows: x + 1.0 + rows[:, None].float())
    with torch.no_grad():
        model.run_with_hooks(batch.tokens, fwd_hooks=[(HOOK, before), (HOOK, edit), (HOOK, spy)])
    diff = seen["after"] - seen["before"]
    expected = torch.zeros_like(diff)
    for r, p in enumerate(batch.positions.tolist()):
        expected[r, p] = 1.0 + r
    torch.testing.assert_close(diff, expected, atol=1e-6, rtol=0)


def test_answer_metrics_hand_worked():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    m = answer_metrics(logits, torch.tensor([1, 0]))
    assert m["rank"].tolist() == [0.0, 0.0]  # tie with token 2 is favourable
    m2 = answer_metrics(logits, torch.tensor([0, 3]))
    assert m2["rank"].tolist() == [2.0, 1.0]
    lse = torch.logsumexp(logits[0], 0)
    torch.testing.assert_close(m["logprob"][0], 3.0 - lse)
    torch.testing.assert_close(m["loss"], -m["logprob"])
    assert m2["logit"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("threads", [1, 3])
def test_answer_metrics_in_row_chunks_equal_the_whole_tensor_formulas(threads):
    """[b, V, vocab] over several row chunks, with ties, top answers and answers far behind, against log_softmax and a
    plain count; with several threads (each reducing its own span of rows) and in inference mode too."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_answer_metrics()
        with torch.inference_mode():
            _check_answer_metrics()
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before


def _check_answer_metrics():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 3001, generator=gen).round(decimals=1)  # rounding makes ties
    answer = torch.tensor([0, 5, 17, 3000, 42])
    logits[1, :3, 5] = logits[1, :3].amax(-1)  # the answer tied for the top on some variants
    m = answer_metrics(logits, answer)
    want_lp = torch.log_softmax(logits, -1).gather(-1, answer[:, None, None].expand(5, 7, 1))[..., 0]
    torch.testing.assert_close(m["logprob"], want_lp, atol=1e-5, rtol=0)
    a = logits.gather(-1, answer[:, None, None].expand(5, 7, 1))
    want_rank = (logits > a).sum(-1).float()
    assert torch.equal(m["rank"], want_rank) and (want_rank[1, :3] == 0).all() and (want_rank > 0).any()
    assert m["rank"].shape == m["loss"].shape == (5, 7)


def test_stop_layer_for():
    from saecircuits.models.hooks import stop_layer_for

    assert stop_layer_for(["blocks.0.mlp.hook_post"], 2) == 1
    assert stop_layer_for(["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"], 2) is None  # last block: no saving
    assert stop_layer_for(["blocks.1.mlp.hook_post"], 4) == 2
    assert stop_layer_for(["hook_embed"], 2) is None


def test_pattern_edits_at_positions_edit_query_row_p_of_every_head():
    """edit_at_positions / run_at_positions on hook_pattern ``[b, head, query, key]``: zeroing head 1's row at P
    zeroes its z at P exactly (z = pattern row @ v) and nothing else; reads give ``[b, head, key]``."""
    from helpers import tiny_gpt2

    model, task = tiny_gpt2(), quote_task()
    batch = next(task_batches(model, task))
    hook, z = "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"

    def kill_head_1(rows, idx):
        rows = rows.clone()
        rows[:, 1] = 0.0
        return rows

    _, clean = run_at_positions(model, batch.tokens, batch.positions, read=[hook, z])
    edit = edit_at_positions(batch.positions, kill_head_1, hook_name=hook)
    _, got = run_at_positions(model, batch.tokens, batch.positions, read=[z], edits=[(hook, edit)])
    n_heads, T = int(model.cfg.n_heads), batch.tokens.shape[1]
    assert clean[hook].shape == (len(batch.indices), n_heads, T)
    assert bool((got[z][:, 1] == 0).all())
    torch.testing.assert_close(got[z][:, [0, 2, 3]], clean[z][:, [0, 2, 3]], atol=1e-6, rtol=0)


def test_a_hook_the_model_lacks_is_named_with_valid_ones_and_the_fix():
    """A new user's report: the error for a missing hook named neither valid hooks nor the option that sets it."""
    model, task = tiny_neo(), quote_task()
    batch = next(task_batches(model, task))
    # a misspelt site: the nearest names by spelling are the real site in block 1, then block 0 (one edit more)
    with pytest.raises(KeyError) as err:
        run_at_positions(model, batch.tokens, batch.positions, read=["blocks.1.mlp.hook_psot"])
    text = str(err.value)
    assert "no hook 'blocks.1.mlp.hook_psot' (its blocks are 0..1)" in text
    assert "valid hooks include blocks.1.mlp.hook_post" in text
    # every suggestion is a hook of the model, and the fix is said
    said = unknown_hook_message(model, ["blocks.9.nothing"], "set it with --hook HOOK")
    suggested = said.split("valid hooks include ")[1].split(" (all:")[0].split(", ")
    assert suggested and all(h in model.hook_dict for h in suggested)
    assert said.endswith("; set it with --hook HOOK")
