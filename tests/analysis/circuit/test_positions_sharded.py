"""The circuit across positions sharded over two gloo ranks (CPU): passes A, C and D split the prompt batches, pass
B the example prompts' batches, and every rank ends with one process's ``"positions"`` dict."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import STORIES, json_differences, random_sae, tiny_neo, tiny_tokenizer

HOOKS = ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post")
KW = dict(n_examples=3, top_exact=40, edge_targets=3, head_targets=2, max_candidates=12, max_batch=2)
"""Two prompts per batch: both ranks get several batches of every pass, and the 3 example prompts make 2 batches."""


def _positions() -> dict:
    from saecircuits.analysis.circuit.position_graph import position_circuit
    from saecircuits.tasks.closing_quote import closing_quote_task

    task = closing_quote_task(STORIES * 2, tiny_tokenizer(), closings=('."', '!"', '?"'))
    saes = [random_sae(hook_point=h, seed=i + 1) for i, h in enumerate(HOOKS)]
    return position_circuit(tiny_neo(), saes, task, progress=False, **KW)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=120))
    try:
        from saecircuits import distributed

        seen: list[int] = []  # the prompts of the batches this rank computed (every pass)
        real = distributed.my_batches

        def recording(batches, shard=None):
            for b in real(batches, shard):
                seen.extend(int(i) for i in b.indices)
                yield b

        distributed.my_batches = recording
        got = _positions()
        distributed.my_batches = real
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"positions": got, "seen": seen}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_give_one_process_position_circuit(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a prompt's floats then depend only on its batch, the same batches
    try:
        want = json.loads(json.dumps(_positions()))  # JSON types, as the ranks wrote them
    finally:
        torch.set_num_threads(threads)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n = want["n_prompts"]
    seen = [g["seen"] for g in got]
    # the means' batches and A's (which C and D take again) over every prompt, B's over the 3 examples: each
    # prompt on exactly one rank in each
    assert sorted(seen[0] + seen[1]) == sorted(list(range(n)) * 2 + list(range(KW["n_examples"])))
    assert set(seen[0]) and set(seen[1]) and set(seen[1]) & set(range(KW["n_examples"]))  # rank 1 has examples
    assert want["n_exact_interventions"] > 0 and len(want["examples"]) == KW["n_examples"]
    assert any(nd.get("values") == "exact" for nd in want["aggregated"]["nodes"])
    for g in got:
        assert json_differences(g["positions"], want) == []
