"""STAND-INS, to be deleted at merge: minimal local versions of helper 16b's ``prune_graph``, ``aggregate_graphs`` and
``positions_summary`` (analysis/circuit/prune.py and aggregate.py, issue 16's contract), used by
:mod:`saecircuits.analysis.circuit.position_circuit` only while those modules are absent from this branch."""

from __future__ import annotations

import math

import numpy as np


def _influence(x: dict, a: str = "exact", b: str = "atp") -> float:
    v = x.get(a)
    v = x.get(b) if v is None else v
    return abs(float(v)) if v is not None and math.isfinite(float(v)) else 0.0


def _keep(items: list[tuple[str, float]], share: float) -> tuple[set, float | None]:
    total = sum(s for _, s in items)
    if total <= 1e-12:
        return set(), None
    kept, acc = set(), 0.0
    for key, s in sorted(items, key=lambda kv: -kv[1]):
        if acc >= share * total:
            break
        kept.add(key)
        acc += s
    return kept, acc / total


def prune_graph(graph: dict, share: float = 0.8) -> dict:  # stand-in (see the module docstring)
    nodes = [dict(n) for n in graph["nodes"]]
    scored = [(n["id"], _influence(n)) for n in nodes if n["kind"] != "target"]
    kept, node_share = _keep(scored, share)
    kept |= {n["id"] for n in nodes if n["kind"] == "target"}
    for n in nodes:
        n["in_graph"] = n["id"] in kept
    edges = [dict(e) for e in graph["edges"]]
    inner = [(i, _influence(e)) for i, e in enumerate(edges) if e["src"] in kept and e["dst"] in kept]
    kept_e, edge_share = _keep(inner, share)
    for i, e in enumerate(edges):
        e["in_graph"] = i in kept_e
    total = sum(s for _, s in scored if _ in kept) or 0.0
    non_sae = sum(_influence(n) for n in nodes if n["in_graph"] and n["kind"] not in ("feature", "target"))
    pruning = {"share": share, "node_share_kept": node_share, "edge_share_kept": edge_share,
               "n_nodes": len(nodes), "n_edges": len(edges), "n_nodes_kept": len(kept), "n_edges_kept": len(kept_e),
               "non_sae_share": non_sae / total if total > 1e-12 else None}
    return {**graph, "nodes": nodes, "edges": edges, "pruning": pruning}


def aggregate_graphs(graphs: list[dict], *, min_prompts: int = 1, share: float | None = None) -> dict:  # stand-in
    n = len(graphs)
    nodes: dict[str, dict] = {}
    edges: dict[tuple[str, str], dict] = {}
    for gi, g in enumerate(graphs):
        local = {}
        for nd in g["nodes"]:
            d = g["P"] - nd["pos"]
            col = "P" if d == 0 else f"P-{d}"
            key = f"{nd['id'].rpartition('@')[0]}@{col}"
            local[nd["id"]] = key
            slot = nodes.setdefault(key, {"meta": nd, "column": col, "d": d, "exact": [0.0] * n, "atp": [0.0] * n,
                                          "count": 0})
            slot["exact"][gi] = nd.get("exact") or 0.0
            slot["atp"][gi] = nd.get("atp") or 0.0
            slot["count"] += 1
        for e in g["edges"]:
            slot = edges.setdefault((local[e["src"]], local[e["dst"]]), {"exact": [0.0] * n, "atp": [0.0] * n})
            slot["exact"][gi] = e.get("exact") or 0.0
            slot["atp"][gi] = e.get("atp") or 0.0
    out_nodes = [{"id": k, "kind": s["meta"]["kind"], "layer": s["meta"]["layer"], "column": s["column"],
                  "label": s["meta"]["label"], "sae": s["meta"]["sae"], "feature": s["meta"]["feature"],
                  "head": s["meta"]["head"], "mean_exact": float(np.mean(s["exact"])), "ci95": None,
                  "mean_atp": float(np.mean(s["atp"])), "n_prompts": s["count"], "in_graph": True}
                 for k, s in nodes.items() if s["count"] >= min_prompts]
    columns = sorted({s["column"] for s in nodes.values()}, key=lambda c: -int(c[2:] or 0) if c != "P" else 0)
    out_edges = [{"src": a, "dst": b, "mean_exact": float(np.mean(s["exact"])), "mean_atp": float(np.mean(s["atp"])),
                  "heads": None, "in_graph": True} for (a, b), s in edges.items()]
    return {"columns": columns, "nodes": out_nodes, "edges": out_edges, "n_prompts": n}


def positions_summary(aggregated: dict, *, top: int = 3) -> str:  # stand-in
    return "summary pending (16b's positions_summary)"
