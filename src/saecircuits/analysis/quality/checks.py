"""Checks that say when a run's numbers cannot support a conclusion, each with what to try.

A run ranks an SAE's features by how much the answer's loss rises when each is ablated. That ranking means
something only when (1) the model performs the behaviour (:mod:`saecircuits.analysis.quality.behaviour`), and (2) the SAE
reconstructs the hook point at P well enough that its features stand for what the layer does there. The checks:

``behaviour_not_performed`` (scope ``"task"``)
    clean top-1 accuracy below :data:`~saecircuits.analysis.quality.behaviour.MIN_TOP1_ACCURACY`.
``sae_worse_than_mean_ablation``
    splicing the SAE in at P changes the answer loss more than mean-ablating the whole hook at P does, measured
    per prompt (mean over prompts of ``|spliced - clean|`` above the mean of ``|mean-ablated - clean|``): the SAE
    perturbs what the layer does at P more than a constant vector does. Absolute changes, so a layer whose
    ablation lowers the loss is judged the same way (with a clear loss increase from mean ablation and the same
    sign on every prompt this is loss recovered vs mean ablation below 0).
``negative_explained_variance``
    explained variance at P below 0: the reconstruction is further from the activations than their mean is.
``loss_recovered_undefined_zero`` / ``loss_recovered_undefined_mean``
    loss recovered against zero / mean ablation is ill-posed
    (:func:`saecircuits.analysis.quality.reconstruction.loss_recovered` gives the reason).
``low_loss_recovered``
    loss recovered vs zero ablation is defined and its whole 95% interval lies below :data:`MIN_LOSS_RECOVERED`:
    splicing the SAE in loses more than half of what the layer does for the answer, so its features leave out
    most of the mechanism.
``low_explained_variance``
    explained variance over every position of the prompts (the SAE spliced in at all of them,
    :func:`saecircuits.analysis.quality.reconstruction.sequence_loss_recovered`) below :data:`MIN_EXPLAINED_VARIANCE`.
    Loss recovered at P sits near 1 even for a poor SAE (one position of one layer rarely decides the answer), and
    explained variance at P is noisy (the spread across prompts at one position is small); over every position it
    tells them apart: on the embedded default model, the pipeline's SAEs explain 0.73 and 0.78 of the variance of
    the two MLP layers, and 0.36 and 0.35 on a copy whose MLP weights carry Gaussian noise of their own std.
``low_sequence_loss_recovered``
    loss recovered over every position of the prompts is defined and its whole 95% interval lies below
    :data:`MIN_SEQUENCE_LOSS_RECOVERED`: splicing the SAE in everywhere loses much of what the layer does.
``sae_model_mismatch``
    the SAE records the model it was trained on (``model_name`` in its cfg.json, a weights digest for the
    pipeline's own SAEs) and it is none of the names of the loaded model.
``dense_top_features``
    most of the top-ranked features are dense: each fires on more than :data:`DENSE_DENSITY` of the corpus tokens.
    A feature that fires on a tenth of all text does not stand for one concept, so the ranking names directions,
    not readable features (the usual sign of a sparsity penalty too weak for this model).

Every check is a warning: the run still reports everything, and the report and console show the warnings beside
the numbers they concern (an SAE that fails a check has its feature ranking flagged).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

from saecircuits.analysis.quality.behaviour import MIN_TOP1_ACCURACY, BehaviourSummary
from saecircuits.analysis.quality.reconstruction import ReconstructionResult
from saecircuits.display import percent

__all__ = ["Check", "behaviour_checks", "sae_checks", "density_checks", "model_mismatch_check", "DENSE_DENSITY",
           "MIN_LOSS_RECOVERED", "MIN_EXPLAINED_VARIANCE", "MIN_SEQUENCE_LOSS_RECOVERED"]

MIN_LOSS_RECOVERED = 0.5
"""Below this loss recovered (the whole interval) the SAE is too weak for its ranking to support a conclusion."""

MIN_EXPLAINED_VARIANCE = 0.5
"""Below this explained variance over every position of the prompts the SAE misses half of what the hook carries."""

MIN_SEQUENCE_LOSS_RECOVERED = 0.7
"""Below this whole-sequence loss recovered (the whole interval) the SAE loses much of what the layer does for the
next token; an SAE trained on the model and hook it is used on stays well above it."""

DENSE_DENSITY = 0.1
"""A feature firing on more than this fraction of corpus tokens is dense (the report's glossary uses the same)."""

_BETTER_SAE = (
    "train it on more activations (--sae-tokens), with a larger --sae-k (--sae-recipe reference: a lower "
    "--l1-coefficient) or a larger --expansion-factor; "
    "for --sae, check that it was trained on this model and hook point, on text like the prompts"
)


@dataclass(frozen=True)
class Check:
    """One failed check.

    Attributes:
        id: stable identifier (see the module docstring).
        scope: ``"task"`` or the SAE's hook point.
        message: what is wrong, with the numbers.
        what_to_try: how to get numbers that can support a conclusion.
        severity: ``"warning"``.
    """

    id: str
    scope: str
    message: str
    what_to_try: str
    severity: str = "warning"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def behaviour_checks(b: BehaviourSummary) -> list[Check]:
    """``[behaviour_not_performed]`` when the clean model mostly does not predict the answer, else ``[]``."""
    if b.performs:
        return []
    return [Check(
        id="behaviour_not_performed",
        scope="task",
        message=(
            f"the model does not perform the behaviour: {b.describe()}; the rule is top-1 accuracy >= "
            f"{MIN_TOP1_ACCURACY:.0%}. Features ranked below explain the loss of an answer the model does not give"
        ),
        what_to_try=(
            "check the task: the answer token (a leading space, e.g. ' the' vs 'the'), the prompt format, and that "
            "the prompts look like the model's training text; or use a model that performs the behaviour"
        ),
    )]


def sae_checks(hook_point: str, rec: ReconstructionResult, sequence: dict | None = None) -> list[Check]:
    """The SAE checks of one SAE from its reconstruction at P and, when given, its whole-sequence loss recovered
    (one entry of :func:`saecircuits.analysis.quality.reconstruction.sequence_loss_recovered`), in a fixed order
    (see the module docstring)."""
    out = []
    clean, sae = float(rec.clean_loss.mean()), float(rec.sae_loss.mean())
    if rec.mean_loss is not None:
        mean = float(rec.mean_loss.mean())
        moved_sae = float((rec.sae_loss.double() - rec.clean_loss.double()).abs().mean())
        moved_mean = float((rec.mean_loss.double() - rec.clean_loss.double()).abs().mean())
        if moved_sae > moved_mean:
            out.append(Check(
                id="sae_worse_than_mean_ablation",
                scope=hook_point,
                message=(
                    f"splicing this SAE in at P changes the answer loss by {moved_sae:.4f} nats per prompt on average "
                    f"(mean {clean:.4f} -> {sae:.4f}), more than mean-ablating the whole hook does ({moved_mean:.4f}; "
                    f"mean {clean:.4f} -> {mean:.4f}): its features do not stand for what the layer does at P"
                ),
                what_to_try="use a better SAE: " + _BETTER_SAE,
            ))
    ev = rec.explained_variance
    if math.isfinite(ev) and ev < 0:
        # EV = 1 - SSE / V and relative_error = SSE / N (N: the activations' squared norm summed over the prompts),
        # so V / N = relative_error / (1 - EV): how much the prompts differ at P, on the scale of the error
        spread = rec.relative_error / (1 - ev)
        spread_text = "" if not math.isfinite(spread) else (
            f"; the prompts' activations differ from their mean at P by {percent(spread, 1)} of it, so an SAE has to "
            "reconstruct P more finely than that (a P that is the same token in every prompt varies little)")
        out.append(Check(
            id="negative_explained_variance",
            scope=hook_point,
            message=(
                f"explained variance at P is {ev:.3f} (< 0): the reconstruction is further from the activations "
                "than their mean over the prompts is, so the SAE does not resolve how the prompts differ at P "
                f"(its squared error is {percent(rec.relative_error, 1)} of the activations' squared norm there{spread_text})"
            ),
            what_to_try="use a better SAE: " + _BETTER_SAE,
        ))
    seq_ev = float("nan") if sequence is None else float(sequence.get("explained_variance", float("nan")))
    if math.isfinite(seq_ev) and seq_ev < MIN_EXPLAINED_VARIANCE:
        out.append(Check(
            id="low_explained_variance",
            scope=hook_point,
            message=(
                f"explained variance over every position of the prompts is {seq_ev:.3f} ({sequence['n_tokens']} "
                f"tokens), below {MIN_EXPLAINED_VARIANCE}: the reconstruction misses much of what the hook carries, "
                "as an SAE trained on another model or hook does, so its features do not stand for what this layer "
                "computes (loss recovered at P can still be near 1: one position rarely decides the answer)"
            ),
            what_to_try="use a better SAE: " + _BETTER_SAE,
        ))
    if sequence is not None and sequence.get("loss_recovered_undefined_reason") is None:
        value, high = float(sequence["loss_recovered"]), float(sequence["loss_recovered_ci95"][1])
        if math.isfinite(value) and (high if math.isfinite(high) else value) < MIN_SEQUENCE_LOSS_RECOVERED:
            out.append(Check(
                id="low_sequence_loss_recovered",
                scope=hook_point,
                message=(
                    f"loss recovered over every position of the prompts is {value:.3f} (95% CI up to {high:.3f}), "
                    f"below {MIN_SEQUENCE_LOSS_RECOVERED}: with the SAE spliced in at every position the mean "
                    f"next-token loss is {sequence['ce_spliced']:.4f} nats, against {sequence['ce_clean']:.4f} clean "
                    f"and {sequence['ce_zero']:.4f} with the layer zero-ablated, over {sequence['n_tokens']} tokens: "
                    "the SAE does not reproduce what this layer does for the model"
                ),
                what_to_try="use a better SAE: " + _BETTER_SAE,
            ))
    lz = rec.loss_recovered_zero
    if lz.defined and math.isfinite(lz.value) and (lz.high if math.isfinite(lz.high) else lz.value) < MIN_LOSS_RECOVERED:
        out.append(Check(
            id="low_loss_recovered",
            scope=hook_point,
            message=(
                f"loss recovered vs zero ablation is {lz.value:.3f} (95% CI up to {lz.high:.3f}), below "
                f"{MIN_LOSS_RECOVERED}: with the SAE spliced in at P the answer loss is {lz.spliced:.4f} nats, "
                f"against {lz.clean:.4f} clean and {lz.ablated:.4f} with the layer zero-ablated, so the SAE's "
                "features leave out most of what the layer does for the answer"
            ),
            what_to_try="use a better SAE: " + _BETTER_SAE,
        ))
    for key, lr in (("zero", rec.loss_recovered_zero), ("mean", rec.loss_recovered_mean)):
        if lr is not None and not lr.defined:
            out.append(Check(
                id=f"loss_recovered_undefined_{key}",
                scope=hook_point,
                message=(
                    f"loss recovered vs {key} ablation is undefined: {lr.reason}. Raw losses: clean {lr.clean:.4f}, "
                    f"SAE {lr.spliced:.4f}, {key} ablation {lr.ablated:.4f} nats"
                ),
                what_to_try=(
                    "read the raw losses instead; if the ablation barely changes the loss, this layer hardly "
                    "affects the answer at P (pick layers whose ablation hurts); if its interval is wide, use more "
                    "prompts (--max-prompts, a larger corpus)"
                ),
            ))
    return out


def _same_model(a: str, b: str) -> bool:
    """Two names of a model agree: equal, or equal last path parts (``org/name`` vs ``name``, a folder vs its name)."""
    a, b = (x.strip().replace("\\", "/").rstrip("/").lower() for x in (a, b))
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def model_mismatch_check(hook_point: str, sae_model: str, model_names: Collection[str]) -> Check | None:
    """``sae_model_mismatch``: the SAE records a model (``sae_model``, its cfg's ``model_name``) that is none of
    ``model_names`` (every name the loaded model goes by: its weights digest, the source given, its short name).

    Returns None when they agree, and when the SAE records no model or the loaded model has no name (nothing to
    compare).
    """
    names = [str(n) for n in model_names if n]
    if not sae_model or not sae_model.strip() or not names:
        return None
    if any(_same_model(sae_model, n) for n in names):
        return None
    return Check(
        id="sae_model_mismatch",
        scope=hook_point,
        message=(
            f"the SAE records that it was trained on model {sae_model!r}, and the loaded model is "
            f"{' / '.join(repr(n) for n in sorted(names))}: an SAE from another model (or other weights) can look "
            "fine at P while its features mean nothing here; read the explained variance and the loss recovered "
            "over every position before its features"
        ),
        what_to_try=("use an SAE trained on this model (saecircuits run trains them), or, when this is the same "
                     "model under another name, ignore this warning"),
    )


def density_checks(hook_point: str, top_features: list[int], density, l0: float, d_sae: int,
                   n_top: int = 5) -> list[Check]:
    """``dense_top_features``: more than half of the ``n_top`` top-ranked features are dense.

    Args:
        top_features: feature indices in ranking order (largest effect first).
        density: ``[d_sae]`` fraction of corpus tokens on which each feature fires (corpus statistics).
        l0: mean active features per corpus token (quoted in the message).
    """
    top = [int(k) for k in top_features[:n_top]]
    dense = [k for k in top if float(density[k]) > DENSE_DENSITY]
    if not top or len(dense) * 2 <= len(top):
        return []
    shown = ", ".join(f"{k} ({float(density[k]):.0%})" for k in dense)
    return [Check(
        id="dense_top_features",
        scope=hook_point,
        message=(
            f"{len(dense)} of the top {len(top)} features are dense, firing on more than {DENSE_DENSITY:.0%} of the "
            f"corpus tokens: {shown}; the SAE's L0 is {l0:.1f} of {d_sae} features per token. Dense features "
            "do not stand for one concept each, so the ranking names directions rather than readable features"
        ),
        what_to_try=("train a sparser SAE: a smaller --sae-k (--sae-recipe reference: a larger --l1-coefficient), "
                     "on more activations (--sae-tokens); keep the other checks passing"),
    )]
