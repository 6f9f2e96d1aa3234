"""Stage ``layer_comparison``: the SAEs' top-feature sets ablated alone and together."""

from __future__ import annotations

from collections.abc import Callable

from saecircuits.pipeline.config import RunConfig
from saecircuits.pipeline.stages import RunContext, Stage
from saecircuits.pipeline.values import _mean_ci, _round


def study_run(model, saes: list, entries: list[dict], task, cfg: RunConfig, progress: Callable[[str], None]) -> dict:
    """Run-level keys of the reference study: ``layer_comparison``, when two or more SAEs on
    different hooks have a multi-ablation set: each SAE's set ablated alone at P and all together."""
    from saecircuits.analysis.ablations.layer_comparison import compare_layer_ablations

    pairs = [(s, e["multi_ablation"]["features"]) for s, e in zip(saes, entries, strict=True)
             if e.get("multi_ablation", {}).get("features")]
    hooks = [s.hook_point for s, _ in pairs]
    if len(pairs) < 2 or len(set(hooks)) != len(hooks):
        return {}
    progress("comparing the top features of " + ", ".join(hooks) + " ablated alone and together")
    lc = compare_layer_ablations(model, [s for s, _ in pairs], [f for _, f in pairs], task, mode=cfg.ablation_mode)
    runs = []
    for r, label in enumerate(lc.labels):
        runs.append({
            "label": label,
            "hooks": lc.hooks if r == len(lc.hooks) else [lc.hooks[r]],
            "features": lc.features if r == len(lc.hooks) else [lc.features[r]],
            "loss_increase": _mean_ci(lc.summary[label]),
            "values": [_round(v, 4) for v in lc.loss_increase[:, r].tolist()],
        })
    return {"layer_comparison": {
        "mode": lc.mode,
        "n_prompts": int(task.n_prompts),
        "runs": runs,
        "paired": [{"a": a, "b": b} | _mean_ci(m) for (a, b), m in lc.paired.items()],
        "interaction": _mean_ci(lc.interaction),
    }}


def _layer_comparison(ctx: RunContext, *, model, saes: list, entries: list[dict], task) -> dict:
    return {"layer_comparison": study_run(model, saes, entries, task, ctx.cfg, ctx.say).get("layer_comparison")}


LAYER_COMPARISON = Stage("layer comparison", _layer_comparison, reads=("model", "saes", "entries", "task"),
                         writes=("layer_comparison",))
