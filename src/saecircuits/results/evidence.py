"""Per-feature and attribution evidence of one SAE (analysis/evidence.py; optional keys of ``results["saes"][i]``)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import model_validator

from saecircuits.results._base import (
    Float,
    Int,
    LabelledValues,
    ResultsModel,
    Str,
    TokenValue,
    opt,
    req,
    same_length,
)


class ErrorDLA(LabelledValues):
    """DLA of the MLP's output, of the SAE's reconstruction and of the SAE error (reconstruction + error = MLP);
    ``labels`` [3], ``mean`` [3], ``ci95`` [3], in logits."""

    @model_validator(mode="after")
    def _aligned(self) -> ErrorDLA:
        self.check_aligned()
        return self


class PromptBoosts(ResultsModel):
    """Prompt-based log-prob boosts: per token, mean log-prob at P clean - feature ablated (nats), over the first
    ``n_prompts`` prompts where the feature is active (rare tokens masked)."""

    boosted: list[TokenValue] = req("[token, boost (nats)] pairs with a positive boost, largest first")
    deboosted: list[TokenValue] = req("[token, boost (nats)] pairs with a negative boost, largest magnitude first")
    n_prompts: Int = opt("prompts averaged")
    answer_logprob_clean: Float = opt("mean answer log-prob, clean (nats)")
    answer_logprob_ablated: Float = opt("mean answer log-prob, feature ablated (nats)")


class WeightBoosts(ResultsModel):
    """The tokens the feature's decoder direction pushes up / down through the unembedding (logits per unit
    activation)."""

    top: list[TokenValue] = req("[token, logit per unit activation] pairs, largest first")
    bottom: list[TokenValue] = req("[token, logit per unit activation] pairs, smallest first")


class LossVsActivation(ResultsModel):
    """Per prompt: the feature's activation at P against the loss increase when it is ablated."""

    activation: list[Float] = req("activation per prompt, shape [N] (SAE feature units)")
    loss_increase: list[Float] = req("ablated - clean answer loss per prompt, shape [N] (nats)")
    pearson_r: Float = req("Pearson correlation of the two; null when undefined")

    @model_validator(mode="after")
    def _aligned(self) -> LossVsActivation:
        same_length(self, "activation", "loss_increase")
        return self


class DFA(LabelledValues):
    """Direct feature attribution: which components write the feature's pre-activation at P (``labels`` [C],
    ``mean`` [C], ``ci95`` [C], in pre-activation units)."""

    variant: Str = opt("inactive neurons' columns: 'zero' or 'mean' (the identity-GELU variant)")
    n_prompts: Int = opt("prompts averaged")
    completeness_max_abs_error: Float = opt("max over prompts of |sum of the linearised variant's rows - the SAE's "
                                            "pre-activation| (float rounding when the decomposition is right)")
    tangent_error_mean: Float = opt("mean of the same without the activation-curvature row: what a first-order "
                                    "attribution leaves unexplained")

    @model_validator(mode="after")
    def _aligned(self) -> DFA:
        self.check_aligned()
        return self


class FeatureDetail(ResultsModel):
    """The evidence views of one top feature (each over the first ``max_prompts`` active prompts)."""

    feature: Int = req("feature index, 0 <= feature < d_sae")
    n_active_prompts: Int = opt("prompts where the feature is active at P")
    max_prompts: Int = opt("the views use the first max_prompts active prompts")
    prompt_boosts: PromptBoosts = opt("token log-prob changes when the feature is ablated (nats)")
    weight_boosts: WeightBoosts = opt("tokens the decoder direction pushes (logits per unit activation)")
    loss_vs_activation: LossVsActivation = opt("activation vs loss increase, per prompt")
    dfa: DFA = opt("direct feature attribution")


class UpstreamAblation(ResultsModel):
    """The effect on this SAE's features of ablating an upstream hook (lists aligned with ``features``, [K])."""

    hook: Str = req("the ablated upstream hook")
    mode: Str = opt("the upstream ablation: 'zero' or 'mean'")
    features: list[Int] = req("this SAE's features, shape [K]")
    clean_mean: list[Float] = req("mean activation at P, clean, shape [K] (SAE feature units)")
    ablated_mean: list[Float] = req("mean activation at P, upstream ablated, shape [K]")
    diff_ci95: list[Float] = opt("95% CI half-width of ablated - clean (paired, all prompts), shape [K]")
    clean_mean_active: list[Float] = opt("mean over the prompts where active in the clean run, clean, shape [K]")
    ablated_mean_active: list[Float] = opt("mean over the same prompts, upstream ablated, shape [K]")
    fraction_active_clean: list[Float] = opt("fraction of prompts active, clean, shape [K]")
    fraction_active_ablated: list[Float] = opt("fraction of prompts active, ablated, shape [K]")

    @model_validator(mode="after")
    def _aligned(self) -> UpstreamAblation:
        for key in ("clean_mean", "ablated_mean", "diff_ci95", "clean_mean_active", "ablated_mean_active",
                    "fraction_active_clean", "fraction_active_ablated"):
            same_length(self, "features", key)
        return self


class ActivationScaledDLA(ResultsModel):
    """A feature's direct logit attribution to the answer: per unit activation, and scaled by its mean activation
    (logits)."""

    feature: Int = req("feature index")
    mean_activation: Float = req("mean activation at P (SAE feature units)")
    dla_per_unit: Float = req("answer logit per unit activation (logits)")
    scaled: Float = req("mean_activation x dla_per_unit (logits)")
    scaled_ln: Float = opt("the same through the final LayerNorm's scale at P (logits)")


def check_evidence_features(sae, ok: Callable) -> None:
    """Every feature index of the evidence keys of ``sae`` (a SaeEntry) is in range (``ok`` fails otherwise)."""
    for j, fd in enumerate(sae.feature_details or []):
        ok(fd.feature, ("feature_details", j, "feature"))
    if sae.upstream_ablation is not None:
        for j, f in enumerate(sae.upstream_ablation.features):
            ok(f, ("upstream_ablation", "features", j))
    for j, e in enumerate(sae.activation_scaled_dla or []):
        ok(e.feature, ("activation_scaled_dla", j, "feature"))
