"""saecircuits.distributed and the analyses it shards: two gloo ranks (CPU) split the single-process batches of the
task's prompts between them, disjointly and without gaps, and gather exactly what one process computes."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import STORIES, random_sae, tiny_neo, tiny_tokenizer

HOOKS = ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post")
MAX_BATCH = 2
"""Prompts per batch: the 8+ prompts make several batches, so both ranks get some."""


def _task():
    from saecircuits.tasks.closing_quote import closing_quote_task

    return closing_quote_task(STORIES * 2, tiny_tokenizer(), closings=('."', '!"', '?"'))


def _analyses() -> dict[str, torch.Tensor]:
    """Every sharded analysis on the tiny model, flattened to named tensors."""
    from saecircuits.analysis.ablations.feature_effects import feature_effects
    from saecircuits.analysis.circuit import find_circuit

    model, task = tiny_neo(), _task()
    saes = [random_sae(hook_point=h, seed=i + 1) for i, h in enumerate(HOOKS)]
    fe = feature_effects(model, saes[1], task, max_batch=MAX_BATCH, mode="reconstruction")
    out = {f"fe.{k}": getattr(fe, k) for k in ("prompt", "feature", "activation", "loss_increase", "logprob_diff",
                                                "logit_diff", "rank_diff", "clean_loss", "baseline_loss")}
    off = fe.off_range
    out["fe.off_range"] = torch.tensor([off.n_ablations, off.n_with_off_range, off.n_off_range_entries],
                                       dtype=torch.float64)
    out["fe.off_min"] = torch.tensor([off.min_value], dtype=torch.float64)
    res = find_circuit(model, saes, task, ig_steps=2, max_batch=MAX_BATCH, sizes=[1, 3, 10], progress=False)
    keys = sorted(res.exact.edges)
    out["exact.node_effect"], out["exact.node_active"] = res.exact.node_effect, res.exact.node_active
    out["exact.clean_metric"] = res.exact.clean_metric
    out["exact.edge_keys"] = torch.tensor(keys, dtype=torch.long)
    out["exact.edges"] = torch.tensor([res.exact.edges[k] for k in keys], dtype=torch.float64)
    for name, est in (("atp", res.atp), ("ig", res.ig)):
        ekeys = sorted(est.edges)
        out[f"{name}.node_effect"] = est.node_effect
        out[f"{name}.edge_keys"] = torch.tensor(ekeys, dtype=torch.long)
        out[f"{name}.edges"] = torch.tensor([est.edges[k] for k in ekeys], dtype=torch.float64)
    curve = res.curve
    out["curve"] = torch.tensor(curve[["n_nodes", "m_circuit", "m_complement_ablated", "faithfulness",
                                       "completeness", "m_clean", "m_empty"]].to_numpy(dtype="float64"))
    out["curve_ci"] = torch.tensor([[*f, *c] for f, c in zip(curve["faithfulness_ci95"], curve["completeness_ci95"],
                                                               strict=True)], dtype=torch.float64)
    out["circuit"] = torch.tensor(res.circuit, dtype=torch.long)
    return out


def _corpus_means() -> dict[str, torch.Tensor]:
    """The circuit's mean-ablation values and the top activating examples over corpus rows (the task's prompts as
    documents, 2 per batch)."""
    from saecircuits.analysis.ablations.feature_effects import feature_activations
    from saecircuits.analysis.circuit import circuit_nodes, corpus_node_means

    model, task = tiny_neo(), _task()
    saes = [random_sae(hook_point=h, seed=i + 1) for i, h in enumerate(HOOKS)]
    _, groups = circuit_nodes(model, saes, [feature_activations(model, s, task) for s in saes])
    means = corpus_node_means(model, task.token_ids, groups, max_batch=MAX_BATCH)
    out = {f"cm.{h}.{k}": t for h, m in means.items() for k, t in (m.items() if isinstance(m, dict) else [("", m)])}
    # the same means from the corpus statistics pass's sums (the pipeline's way): its float64 hook sums all-reduced
    from saecircuits.analysis.circuit import corpus_mean_hooks, corpus_stats_node_means
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats

    stats = corpus_feature_stats(model, saes, task.token_ids, k=2, max_batch=MAX_BATCH,
                                 mean_hooks=corpus_mean_hooks(model, saes))
    out |= {f"hs.{h}": t for h, t in stats.hook_sums.items()}
    means = corpus_stats_node_means(model, stats, saes, groups, task.token_ids)
    out |= {f"sm.{h}.{k}": t for h, m in means.items() for k, t in (m.items() if isinstance(m, dict) else [("", m)])}
    from saecircuits.analysis.corpus.examples import top_activating_examples

    examples = top_activating_examples(model, saes[1], task.token_ids, range(40), k=3, max_batch=MAX_BATCH)
    out["ex.top"] = torch.tensor([[e.doc_index, e.max_position, e.max_activation, torch.tensor(e.activations).nansum()]
                                  for f in range(40) for e in examples[f]], dtype=torch.float64)
    out["ex.n"] = torch.tensor([len(examples[f]) for f in range(40)])
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    try:
        from saecircuits import distributed

        seen: list[int] = []  # the prompts this rank computed, in every sharded analysis
        real = distributed.my_batches

        def recording(batches, shard=None):  # (modules that import it while patched keep it: pass tuples on)
            for b in real(batches, shard):
                seen.extend(() if isinstance(b, tuple) else b.indices)
                yield b

        distributed.my_batches = recording
        out = _analyses()
        distributed.my_batches = real
        out["seen"] = torch.tensor(seen, dtype=torch.long)
        out.update(_corpus_means())
        # the helpers: uneven row counts (rank 1 has none), bool rows, disjoint sums, minima, JSON from rank 0
        rows = torch.arange(6.0).reshape(3, 2) + 10 * rank if rank == 0 else torch.zeros(0, 2)
        out["gathered"] = distributed.gather_rows(rows)
        out["gathered_bool"] = distributed.gather_rows(torch.tensor([rank == 1, True, False][: 3 - rank]))
        slots = torch.zeros(4, dtype=torch.float64)
        slots[rank::2] = torch.tensor([1.5, -2.25], dtype=torch.float64) * (rank + 1)
        out["summed"] = distributed.sum_disjoint(slots)
        out["min"] = distributed.reduce(torch.tensor([3.0 - rank]), "min")
        msg = distributed.broadcast_json({"rank": rank, "text": "é ü"} if rank == 0 else None)
        out["json"] = torch.tensor([msg["rank"], len(msg["text"])])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_split_the_prompts_and_gather_one_process_values(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: then a prompt's floats depend only on its batch, the same batches
    try:
        want = _analyses() | _corpus_means()
    finally:
        torch.set_num_threads(threads)
    got = [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    n = _task().n_prompts
    # each analysis split the prompts: every prompt on exactly one rank, both ranks busy
    seen = [set(g["seen"].tolist()) for g in got]
    assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))
    assert len(got[0]["seen"]) + len(got[1]["seen"]) == 5 * n  # feature effects, exact, AtP, IG, faithfulness
    for g in got:
        for name, w in want.items():
            if name.startswith(("fe.", "circuit", "exact.node_active", "exact.edge_keys", "atp.edge_keys",
                                "ig.edge_keys", "cm.", "ex.")):
                # same batches: bit-equal values, equal counts and keys; the corpus means' float32 batch sums
                # are added in one process's order
                assert torch.equal(g[name], w), name
            elif name.startswith("sm."):  # float32 means of float64 sums added in another order: to rounding
                torch.testing.assert_close(g[name], w, rtol=1e-6, atol=1e-7, msg=name)
            else:  # float64 sums over the prompts in another order
                assert torch.allclose(g[name], w, rtol=1e-12, atol=1e-15, equal_nan=True), name
        assert g["gathered"].tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
        assert g["gathered_bool"].tolist() == [False, True, False, True, True]
        assert g["summed"].tolist() == [1.5, 3.0, -2.25, -4.5]
        assert g["min"].tolist() == [2.0] and g["json"].tolist() == [0, 3]


def test_one_process_helpers_are_the_identity():
    from saecircuits import distributed

    x = torch.arange(4)
    assert distributed.world() == (0, 1) and distributed.is_writer() and not distributed.is_sharded()
    assert distributed.gather_rows(x) is x and distributed.sum_disjoint(x) is x and distributed.reduce(x) is x
    assert list(distributed.my_batches(iter("abc"))) == ["a", "b", "c"]
    assert distributed.broadcast_json({"a": 1}) == {"a": 1}
    distributed.barrier("nothing")
    assert distributed.init_from_env("cpu") is False  # no torchrun environment: no group


def test_a_failed_collective_is_a_shard_error_naming_what_was_gathered():
    from saecircuits.distributed import ShardError, collective

    with pytest.raises(ShardError, match="while gathering feature effects .*Connection closed by peer.*No results"):
        with collective("feature effects"):
            raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore")
