"""Stages ``dla`` (direct logit attribution of the answer) and ``layers`` (the layers that get new SAEs; with
``--layers auto``, chosen by each MLP layer's mean-ablation effect on the answer)."""

from __future__ import annotations

import math

import torch

from saecircuits.pipeline.config import HOOK_TEMPLATE, PipelineError
from saecircuits.pipeline.stages import RunContext, Stage
from saecircuits.pipeline.values import _round


def _dla(ctx: RunContext, *, model, task) -> dict:
    """The ``dla`` entry of results.json (:func:`~saecircuits.analysis.readouts.dla.direct_logit_attribution`)."""
    from saecircuits.analysis.readouts.dla import direct_logit_attribution
    from saecircuits.models.interventions import interventions_for

    interventions_for(model)  # built once, kept on the model: the engine or the reason it cannot serve the model
    ctx.say("direct logit attribution")
    dla = direct_logit_attribution(model, task, progress=ctx.bars)
    return {"dla": {
        "labels": list(dla.labels),
        "mean": [_round(v) for v in dla.mean.tolist()],
        "ci95": [_round(h - m) for h, m in zip(dla.ci95_high.tolist(), dla.mean.tolist(), strict=True)],
        "answer_logit_mean": _round(dla.target_logit.mean()),
        "completeness_max_abs_error": float(dla.max_abs_error),
        **({"logit_soft_cap": dla.logit_soft_cap, "of": "pre-cap answer logit"}
           if dla.logit_soft_cap is not None else {}),
    }}


def mlp_ablation_effects(model, task, stat_docs: list[list[int]], *, exclude_bos: bool = True,
                         progress: bool = False) -> list:
    """Per MLP layer ``L``: the increase in the answer's loss at P (nats) when ``blocks.L.mlp.hook_post`` is replaced,
    at P only, by its mean activation over ``stat_docs`` (every real, non-special token; the pipeline's mean
    ablation), as a mean over prompts with a Student-t 95% interval.

    Args:
        model: a TransformerBridge; task: prompts and answers; stat_docs: token rows for the mean activation.
        exclude_bos: leave special-token positions out of the mean (the pipeline's BOS switch).

    Returns:
        ``[n_layers]`` :class:`~saecircuits.analysis.statistics.MeanCI` of (mean-ablated - clean) answer loss.
    """
    from saecircuits.analysis.ablations.feature_effects import variant_losses
    from saecircuits.analysis.quality.reconstruction import mean_activations
    from saecircuits.analysis.statistics import mean_ci95
    from saecircuits.models.interventions import Edit

    hooks = [HOOK_TEMPLATE.format(layer=layer) for layer in range(int(model.cfg.n_layers))]
    means = mean_activations(model, stat_docs, hooks, exclude_bos=exclude_bos, progress=progress)  # one pass
    effects = []
    for hook in hooks:
        mean = means[hook]

        def to_mean(x: torch.Tensor, mean: torch.Tensor = mean) -> torch.Tensor:  # [B, F, d] -> [B, 1, d]
            return mean.to(x).reshape(1, 1, -1).expand(x.shape[0], 1, -1)

        losses = variant_losses(model, task, Edit(hook, to_mean), 1)
        effects.append(mean_ci95(losses[:, 1].double() - losses[:, 0].double()))
    return effects


def auto_layers(increase: list[float], n: int) -> tuple[list[int], str]:
    """``--layers auto``: the ``n`` MLP layers whose mean ablation at P raises the answer's loss the most.

    The choice rests on a causal effect (:func:`mlp_ablation_effects`), not on direct logit attribution: a layer can
    write a large logit directly while later layers undo it, and a layer whose ablation LOWERS the answer's loss
    works against the answer, so its SAE would not explain how the model gives it.

    Args:
        increase: ``[n_layers]`` mean increase of the answer loss at P (nats) under each layer's mean ablation.
        n: how many layers to pick (fewer if the model has fewer layers).

    Returns:
        ``(layers ascending, one sentence saying which were chosen and why)``; the sentence says so when a chosen
        layer's ablation does not raise the loss (every layer's does not, or fewer than ``n`` do).

    Raises:
        PipelineError: no layer (or only undefined effects).
    """
    effects = [(layer, float(v)) for layer, v in enumerate(increase) if math.isfinite(float(v))]
    if not effects:
        raise PipelineError("--layers auto needs each MLP layer's ablation effect on the answer, and none could be "
                            "computed; give the layers (e.g. --layers 0 1)")
    ranked = sorted(effects, key=lambda lv: -lv[1])
    layers = sorted(layer for layer, _ in ranked[:n])
    said = ", ".join(f"MLP{layer} {v:+.4f}" for layer, v in ranked)
    note = (f"--layers auto chose layer(s) {', '.join(map(str, layers))}: the {len(layers)} MLP layer(s) whose mean "
            f"ablation at P raises the answer's loss the most (mean increase over the prompts, nats: {said}).")
    harmless = [layer for layer, v in ranked[:n] if not v > 0]
    if harmless:
        note += (f" Mean-ablating layer(s) {', '.join(map(str, sorted(harmless)))} does not raise the loss: their "
                 "features are unlikely to explain the answer; consider fewer layers or other ones.")
    return layers, note


def _layers(ctx: RunContext, *, model, task, stat_docs: list[list[int]]) -> dict:
    """``layers``: the layers that get new SAEs (``--layers``, or the :func:`auto_layers` choice, with the sentence
    saying why in ``layer_note``)."""
    cfg = ctx.cfg
    if cfg.layers != "auto":
        return {"layers": cfg.layers, "layer_note": None}
    ctx.say("mean ablation of every MLP layer at P (--layers auto)")
    effects = mlp_ablation_effects(model, task, stat_docs, exclude_bos=cfg.exclude_bos, progress=ctx.bars)
    chosen_layers, layer_note = auto_layers([e.mean for e in effects], cfg.auto_layers)
    ctx.say(layer_note)
    return {"layers": chosen_layers, "layer_note": layer_note}


DLA = Stage("dla", _dla, reads=("model", "task"), writes=("dla",))
LAYERS = Stage("layers", _layers, reads=("model", "task", "stat_docs"), writes=("layers", "layer_note"))
