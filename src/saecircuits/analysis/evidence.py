"""All per-feature and attribution evidence of one SAE as JSON-ready keys of its results.json entry.

:func:`feature_evidence` runs, for an SAE and a few of its top features, the reference notebook's per-feature
analyses: the SAE-error DLA, per feature the prompt-based log-prob boosts, the weight-based logit boosts, activation
vs loss increase and the DFA (zero variant, with the completeness check of the linearised variant), the
upstream-ablation effect on the features and the activation-scaled DLA. Keys that need an MLP post-activation SAE
(error DLA, DFA, upstream ablation, weight boosts, scaled DLA) or a plain MLP (DFA) are left out when they do not
apply. The schema of each key is in :mod:`saecircuits.results` (docs/results.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from saecircuits.analysis.ablations.feature_effects import answer_losses, feature_activations
from saecircuits.analysis.ablations.loss_vs_activation import loss_increase_vs_activation
from saecircuits.analysis.ablations.upstream import upstream_ablation_effect
from saecircuits.analysis.readouts.boosts import (
    common_from_counts,
    common_tokens,
    prompt_logprob_boosts,
    weight_logit_boosts,
)
from saecircuits.analysis.readouts.dfa import direct_feature_attribution
from saecircuits.analysis.readouts.error_dla import mlp_post_layer, sae_error_dla
from saecircuits.analysis.readouts.scaled_dla import activation_scaled_dla
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["feature_evidence"]

log = logging.getLogger(__name__)


def _f(x: Any, nd: int = 6) -> float | None:
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def _pairs(items) -> list[list]:
    return [[t.token, _f(t.value)] for t in items]


def feature_evidence(
    model,
    sae: SAE,
    task: Task,
    features: Sequence[int],
    stat_rows: Sequence[Sequence[int]],
    *,
    max_prompts_per_feature: int = 100,
    min_token_count: int = 5,
    n_scaled: int = 10,
    acts=None,
    clean_loss: torch.Tensor | None = None,
    effects=None,
    mode: str = "residual",
    token_counts: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The keys ``error_dla``, ``feature_details``, ``upstream_ablation`` and ``activation_scaled_dla`` of an SAE entry.

    Args:
        model: a TransformerBridge with processed weights.
        sae: the SAE.
        task: the behaviour.
        features: the features to detail (a few top features; each costs about four passes over at most
            ``max_prompts_per_feature`` prompts).
        stat_rows: corpus token rows (BOS-prefixed) for the common-token mask of the boosts.
        max_prompts_per_feature: cap on active prompts per feature for the DFA, the prompt boosts and
            activation vs loss (the notebook used 100 for the prompt boosts).
        min_token_count: a token is common when it occurs more than this many times in ``stat_rows`` (the notebook
            used 100 on a far larger corpus).
        n_scaled: number of features listed in ``activation_scaled_dla`` (largest ``scaled`` first, then any of
            ``features`` not among them).
        acts, clean_loss: precomputed ``feature_activations`` / ``answer_losses`` of the task.
        effects: precomputed ``feature_effects`` holding ``features`` (their exact per-prompt ablation effects are
            reused for the loss-vs-activation view instead of new ablations, when computed in ``mode``).
        mode: ablation mode of the prompt boosts and the loss-vs-activation view
            (:mod:`saecircuits.analysis.ablations.modes`).
        token_counts: int ``[d_vocab]`` corpus token counts (from the corpus statistics pass,
            ``analysis.corpus_stats``); the common-token mask is then ``count > min_token_count`` without another
            pass over ``stat_rows``.

    Returns:
        dict with (when applicable) ``error_dla``, ``feature_details``, ``upstream_ablation``,
        ``activation_scaled_dla``; plain JSON types, NaN as None.
    """
    feats = [int(k) for k in features]
    out: dict[str, Any] = {}
    try:
        layer: int | None = mlp_post_layer(sae.hook_point)
    except ValueError:
        layer = None
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    if acts is None:
        acts = feature_activations(model, sae, task)
    if clean_loss is None:
        clean_loss = answer_losses(model, task)
    if token_counts is not None:
        common = common_from_counts(token_counts.cpu(), min_token_count)
    else:
        common = common_tokens(model, stat_rows, min_token_count) if stat_rows else None

    if layer is not None:
        err = sae_error_dla(model, sae, task)
        out["error_dla"] = {
            "labels": err.labels,
            "mean": [_f(v) for v in err.mean],
            "ci95": [_f(v) for v in err.ci95],
        }
    details = []
    for k in feats:
        # the boosts, activation vs loss and DFA use the first max_prompts_per_feature active prompts (task order)
        d: dict[str, Any] = {"feature": k, "n_active_prompts": int((acts.feature == k).sum()),
                             "max_prompts": int(max_prompts_per_feature)}
        pb = prompt_logprob_boosts(
            model, sae, task, k, common_tokens=common, max_prompts=max_prompts_per_feature, acts=acts, mode=mode
        )
        d["prompt_boosts"] = {
            "boosted": _pairs(pb.boosted),
            "deboosted": _pairs(pb.deboosted),
            "n_prompts": len(pb.prompt_indices),
            "answer_logprob_clean": _f(pb.answer_logprob_clean),
            "answer_logprob_ablated": _f(pb.answer_logprob_ablated),
        }
        if layer is not None:
            wb = weight_logit_boosts(model, sae, k, common_tokens=common)
            d["weight_boosts"] = {"top": _pairs(wb.top), "bottom": _pairs(wb.bottom)}
        lva = loss_increase_vs_activation(
            model, sae, task, k, max_prompts=max_prompts_per_feature, acts=acts, clean_loss=clean_loss,
            effects=effects if effects is None or effects.mode == mode else None, mode=mode,
        )
        d["loss_vs_activation"] = {
            "activation": [_f(v, 4) for v in lva.table["activation"]],
            "loss_increase": [_f(v, 4) for v in lva.table["loss_increase"]],
            "pearson_r": _f(lva.pearson_r),
        }
        if layer is not None and not gated:
            try:
                dfa = direct_feature_attribution(
                    model, sae, task, k, max_prompts=max_prompts_per_feature, acts=acts
                )
            except ValueError as e:  # e.g. an activation function DFA does not know
                log.warning("DFA skipped for feature %d: %s", k, e)
            else:
                d["dfa"] = {
                    "labels": dfa.labels,
                    "mean": [_f(v) for v in dfa.mean],
                    "ci95": [_f(v) for v in dfa.ci95],
                    "variant": dfa.inactive,
                    "n_prompts": len(dfa.prompt_indices),
                    "completeness_max_abs_error": _f(dfa.max_completeness_error),
                    "tangent_error_mean": _f(dfa.tangent_error.mean()) if dfa.prompt_indices else None,
                }
        details.append(d)
    if details:
        out["feature_details"] = details
    if layer is not None and layer > 0 and feats:
        hook = f"blocks.{layer - 1}.mlp.hook_post"
        up = upstream_ablation_effect(model, sae, task, feats, ablate_hook=hook, mode="zero")
        out["upstream_ablation"] = {
            "hook": hook,
            "mode": up.mode,
            "features": feats,
            "clean_mean": [_f(m.mean) for m in up.clean_mean],
            "ablated_mean": [_f(m.mean) for m in up.ablated_mean],
            "diff_ci95": [_f(m.half_width) for m in up.diff_mean],
            "clean_mean_active": [_f(m.mean) for m in up.clean_mean_active],
            "ablated_mean_active": [_f(m.mean) for m in up.ablated_mean_active],
            "fraction_active_clean": [_f(v) for v in up.fraction_active_clean],
            "fraction_active_ablated": [_f(v) for v in up.fraction_active_ablated],
        }
    if layer is not None:
        sd = activation_scaled_dla(model, sae, task)
        shown = sd.top(n_scaled)
        shown += [k for k in feats if k not in shown]
        out["activation_scaled_dla"] = [
            {
                "feature": k,
                "mean_activation": _f(sd.mean_activation[k]),
                "dla_per_unit": _f(sd.dla_per_unit[k]),
                "scaled": _f(sd.scaled[k]),
                "scaled_ln": _f(sd.scaled_ln[k]),
            }
            for k in shown
        ]
    return out
