"""Stage ``circuit``: the feature circuit across all SAEs at P (:func:`saecircuits.analysis.circuit.find_circuit`) and
across positions (:func:`saecircuits.analysis.circuit.position_graph.position_circuit`, with the engine), and its
``results.json`` summary (the whole graph goes to ``circuit.json``)."""

from __future__ import annotations

from saecircuits.pipeline.stages import RunContext, Stage

POSITION_KW = dict(n_examples=20, top_exact=200, edge_targets=20, head_targets=5, screen_distance=2, max_candidates=100)
"""The circuit across positions as the pipeline runs it, on every prompt of the task: AtP at every position of each;
exact effects of the top 200 nodes by |AtP| and of every node within 2 positions of P on the 20 example prompts,
with AtP edges into their 20 features of largest exact effect and head loadings into 5; exact effects of the
aggregated graph's nodes on every prompt (its inputs and its 100 most influential internal nodes). The stage's time
against the circuit at P is measured on the demo with benchmarks/bench_position_circuit.py."""

def _circuit_summary(cj: dict, n_nodes: int = 400) -> dict:
    """The circuit's results.json entry: what the report draws (the whole graph is in circuit.json)."""
    in_c = set(cj["circuit"])
    edges = [e for e in cj["edges"] if e["in_circuit"]]
    return {
        "file": "circuit.json",
        "metric": cj["metric"],
        "n_nodes_total": cj["n_nodes_total"],
        "n_edges_total": cj["n_edges_total"],
        "ig_steps": cj["ig_steps"],
        "selection": cj["selection"],
        "agreement": cj["agreement"],
        "faithfulness": cj["faithfulness"],
        "virtual_weights": cj["virtual_weights"],
        "nodes": [{k: n[k] for k in ("id", "label", "kind", "layer", "index", "sae", "effect", "effect_ci95", "atp", "ig",
                                     "n_active_prompts", "top_tokens")} | {"in_circuit": n["id"] in in_c}
                  for n in cj["nodes"][:n_nodes]],
        "edges": [{k: e[k] for k in ("source", "target", "exact", "atp", "ig", "n_prompts")} for e in edges],
    }


def _circuit(ctx: RunContext, *, model, saes: list, task, stat_docs: list[list[int]], corpus_stats,
             prompt_acts: list) -> dict:
    """``circuit_json`` (circuit.json), ``circuit_entry`` (its results.json summary) and ``circuit_note`` (when
    computed from full forwards); all None with ``--no-circuit`` or no SAE. ``prompt_acts``: each SAE's feature
    activations at P from the analyse stage (the circuit's nodes), not computed again. The mean-ablation values are
    each node's mean over every token the corpus statistics count (all of ``stat_docs``), from the sums that pass
    kept (``corpus_stats``), not from an encode of their own."""
    cfg = ctx.cfg
    if not (cfg.circuit and saes):
        return {"circuit_json": None, "circuit_entry": None, "circuit_note": None}
    from saecircuits.analysis.circuit import find_circuit
    from saecircuits.models.interventions import interventions_for

    iv, note = interventions_for(model), None
    if iv.engine is None:  # the same numbers from full forwards (gradients at P too), slower
        note = (f"The circuit was computed with full model forwards: the prefix-cached engine cannot "
                f"compute this model ({iv.reason}).")
    ctx.say(f"feature circuit across {len(saes)} SAE(s): exact node effects and edges, gradient estimates")
    circ = find_circuit(model, saes, task, acts=prompt_acts, ig_steps=cfg.circuit_ig_steps, progress=ctx.bars,
                        corpus_rows=stat_docs, corpus_stats=corpus_stats)
    circuit_json = circ.to_json()
    entry = _circuit_summary(circuit_json)
    if not cfg.position_circuit:  # --no-position-circuit: the circuit at P alone (circuit.json says why)
        why = ("The circuit across positions was not built (--no-position-circuit): only the circuit at the answer "
               "position P is reported.")
        circuit_json["positions_left_out"] = why
        note = (note + " " if note else "") + why
    elif iv.engine is not None:  # across positions (issue 16): positions t..P recomputed by the engine
        from saecircuits.analysis.circuit.position_graph import position_circuit, reduced_positions

        ctx.say("circuit across positions: nodes at every position, exact effects, edges, head loadings")
        circuit_json["positions"] = position_circuit(model, saes, task, progress=ctx.bars, **POSITION_KW)
        entry["positions"] = reduced_positions(circuit_json["positions"])
    else:
        note = (note + " " if note else "") + ("The circuit across positions needs the prefix-cached engine; it "
                                               "was left out.")
    return {"circuit_json": circuit_json, "circuit_entry": entry, "circuit_note": note}


CIRCUIT = Stage("circuit", _circuit, reads=("model", "saes", "task", "stat_docs", "corpus_stats", "prompt_acts"),
                writes=("circuit_json", "circuit_entry", "circuit_note"))
