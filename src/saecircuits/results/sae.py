"""One SAE's entry in results.json (``results["saes"][i]``): reconstruction quality, the features ranked by their
effect on the answer's loss, exact ablations, examples; the evidence and study keys live in their own modules.

Losses are next-token cross-entropy of the answer at the prediction position P, in nats; activations are in SAE
feature units; a feature is an index in ``[0, d_sae)``.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from saecircuits.results._base import (
    CI,
    Float,
    Int,
    Json,
    OffRange,
    Pair,
    ResultsModel,
    Str,
    fail,
    feature_checker,
    opt,
    req,
)
from saecircuits.results.corpus import CorpusStats
from saecircuits.results.evidence import (
    ActivationScaledDLA,
    ErrorDLA,
    FeatureDetail,
    UpstreamAblation,
    check_evidence_features,
)
from saecircuits.results.study import (
    AblationModes,
    FeatureGeometry,
    LossComparison,
    MaxActivatingAblation,
    SpanAblation,
    check_study_features,
)
from saecircuits.results.tokens import Example


class LossCI(ResultsModel):
    """95% CI half-widths of the four mean losses (nats)."""

    clean: Float = opt("of clean_loss (nats)")
    sae: Float = opt("of sae_loss (nats)")
    zero: Float = opt("of zero_ablation_loss (nats)")
    mean: Float = opt("of mean_ablation_loss (nats)")


class WholeSequence(ResultsModel):
    """The SAE spliced in at EVERY position of the prompts (answer included): tells good SAEs from bad where the
    figures at P cannot."""

    loss_recovered: Float = req("next-token loss recovered vs zero ablation; null when undefined")
    explained_variance: Float = req("explained variance over those positions (tokens), pooled; null when undefined")
    ce_clean: Float = opt("mean next-token loss, clean model (nats per token)")
    ce_sae: Float = opt("mean next-token loss with the SAE spliced in (nats per token)")
    ce_zero: Float = opt("mean next-token loss with the hook zero-ablated (nats per token)")
    n_tokens: Int = opt("number of positions (tokens)")
    n_prompts: Int = opt("number of prompts")
    loss_recovered_ci95: Pair = opt("95% interval [lo, hi] of loss_recovered")
    loss_recovered_undefined_reason: Str = opt("why loss_recovered is undefined")


class TopFeature(ResultsModel):
    """A feature ranked by the loss increase when it alone is ablated at P."""

    feature: Int = req("feature index, 0 <= feature < d_sae")
    loss_increase: Float = req("ablated - clean answer loss at P (nats)")
    loss_increase_ci95: CI = opt("95% CI of loss_increase (nats)")
    mean_activation: Float = req("mean activation at P over the prompts (SAE feature units)")
    fraction_active: Float = req("fraction of prompts where the feature is active at P, in [0, 1]")
    n_prompts: Int = opt("number of prompts averaged")


class FeatureEffect(ResultsModel):
    """Exact single-feature ablation at P, over the prompts where the feature is active (every active feature)."""

    feature: Int = req("feature index")
    n_active_prompts: Int = req("prompts where the feature is active at P")
    fraction_active: Float = opt("n_active_prompts / n_prompts, in [0, 1]")
    mean_activation: Float = opt("mean activation where active (SAE feature units)")
    mean_loss_increase: Float = req("mean ablated - clean answer loss (nats)")
    ci95: Float = opt("95% CI half-width of mean_loss_increase (nats)")
    logprob_diff: Float = opt("original - ablated answer log-prob (nats)")
    logit_diff: Float = opt("original - ablated answer logit (logits)")
    rank_diff: Float = opt("original - ablated answer rank (ranks)")


class Stat(ResultsModel):
    """A mean difference with its 95% CI."""

    mean: Float = req("mean over prompts")
    ci95: CI = opt("95% CI: half-width or [lo, hi]")


class MultiAblation(ResultsModel):
    """All ``features`` ablated together at P."""

    features: list[Int] = opt("the ablated features, shape [K]")
    n_prompts: Int = opt("number of prompts")
    mode: Str = opt("the ablation: 'zero', 'mean', ...")
    off_range: OffRange | None = opt("ablated activations below the hook's minimum; null: no bounded range")
    logprob_diff: Stat = opt("original - ablated answer log-prob (nats)")
    logit_diff: Stat = opt("original - ablated answer logit (logits)")
    rank_diff: Stat = opt("original - ablated answer rank (ranks)")
    loss_increase: Stat = opt("ablated - original answer loss (nats)")


class MultiAblationSelection(ResultsModel):
    """How the jointly ablated set was chosen."""

    rule: Str = opt("the rule, in words, e.g. the largest loss increases among features whose 95% CI excludes 0")
    n_supported: Int = opt("features whose loss increase's 95% CI is above 0")
    n_ranked: Int = opt("features in top_features")


class TaskActivations(ResultsModel):
    """A feature's activation at P on the prompts where it is active."""

    feature: Int = req("feature index")
    values: list[Float] = req("activations at P, shape [n active prompts] (SAE feature units)")


class FeatureExamples(ResultsModel):
    """A feature's top activating examples."""

    feature: Int = req("feature index")
    examples: list[Example] = req("examples, highest activation first")


class SaeEntry(ResultsModel):
    """One SAE: where it reads, how well it reconstructs at P, and its features' causal effects on the answer.

    ``loss_recovered = (zero - sae) / (zero - clean)`` and ``loss_recovered_mean_ablation = (mean - sae) / (mean -
    clean)`` are null when undefined (the ablation does not clearly raise the loss), with a reason and no interval.
    """

    hook_point: Str = req("the TransformerLens hook the SAE reads, e.g. 'blocks.0.mlp.hook_post'")
    d_in: Int = req("input width (> 0)")
    d_sae: Int = req("number of features (> 0)")
    architecture: Str = opt("'relu', 'topk', 'batchtopk', 'jumprelu', 'gated', ...")
    l0: Float = req("mean number of active features per token at P")
    explained_variance_at_p: Float = opt("explained variance of the SAE's reconstruction at P, across the prompts")
    relative_error: Float = opt("sum |x - x_hat|^2 / sum |x|^2 at P")
    clean_loss: Float = req("mean answer loss at P, clean model (nats)")
    sae_loss: Float = req("mean answer loss at P with the SAE spliced in (nats)")
    zero_ablation_loss: Float = req("mean answer loss at P with the hook zero-ablated (nats)")
    mean_ablation_loss: Float = req("mean answer loss at P with the hook mean-ablated (nats)")
    loss_recovered: Float = req("(zero - sae) / (zero - clean); null when undefined")
    loss_recovered_ci95: Pair = opt("95% interval [lo, hi] of loss_recovered; only when defined")
    loss_recovered_undefined_reason: Str = opt("why loss_recovered is undefined; only when undefined")
    n_active_features: Int = opt("features active at P on at least one prompt")
    top_features: list[TopFeature] = req("features ranked by loss increase when ablated")
    feature_effects: list[FeatureEffect] = opt("exact single-feature ablation at P, every active feature")
    feature_effects_info: Json = opt("how feature_effects was computed: 'selection', 'n_pairs', 'ablation'")
    loss_ci95: LossCI = opt("95% CI half-widths of the four losses (nats)")
    loss_recovered_mean_ablation: Float = req("(mean - sae) / (mean - clean); null when undefined")
    loss_recovered_mean_ablation_ci95: Pair = opt("95% interval [lo, hi]; only when defined")
    loss_recovered_mean_ablation_undefined_reason: Str = opt("why it is undefined; only when undefined")
    whole_sequence: WholeSequence = opt("the SAE spliced in at every position")
    failed_checks: list[Str] = opt("ids of this SAE's entries in results['checks'] (scope = hook_point)")
    multi_ablation_selection: MultiAblationSelection = opt("how multi_ablation's features were chosen")
    multi_ablation: MultiAblation = opt("all chosen features ablated together")
    error_dla: ErrorDLA = opt("DLA of the MLP, its SAE reconstruction and the SAE error (logits)")
    feature_details: list[FeatureDetail] = opt("per-feature evidence of the top features")
    upstream_ablation: UpstreamAblation = opt("this SAE's features when an upstream hook is ablated")
    activation_scaled_dla: list[ActivationScaledDLA] = opt("each feature's DLA per unit times its mean activation")
    task_activations: list[TaskActivations] = opt("activations at P where active, per feature")
    examples: list[FeatureExamples] = opt("top activating corpus examples, per feature")
    corpus_stats: CorpusStats = opt("one streaming pass over the corpus: densities, histograms, top tokens")
    loss_comparison: LossComparison = opt("the five-way loss comparison (nats)")
    ablation_modes: AblationModes = opt("feature effects under each ablation mode (nats)")
    max_activating_ablation: list[MaxActivatingAblation] = opt("ablation on the feature's top corpus stories")
    feature_geometry: FeatureGeometry = opt("co-occurrence and decoder/encoder cosines of the top features")
    span_ablation: SpanAblation = opt("the features ablated over spans of positions (nats)")
    training: Json = Field(None, description="free-form: how the SAE was trained or where it was loaded from; "
                           "'final_metrics' is the last line of its metrics.jsonl, whose 'explained_variance_tokens' "
                           "is over the tokens of the last training batch")

    @model_validator(mode="after")
    def _consistent(self) -> SaeEntry:
        self._check_loss_recovered()
        if self.d_sae <= 0 or self.d_in <= 0:
            fail("{p0}: d_in and d_sae must be positive.", ())
        ok = feature_checker(self.d_sae)
        for j, tf in enumerate(self.top_features):
            ok(tf.feature, ("top_features", j, "feature"))
            fa = tf.fraction_active
            if fa is not None and not -1e-9 <= fa <= 1 + 1e-9:
                fail(f"{{p0}} = {fa} is not in [0, 1].", ("top_features", j, "fraction_active"))
        for j, f in enumerate((self.multi_ablation and self.multi_ablation.features) or []):
            ok(f, ("multi_ablation", "features", j))
        for j, ta in enumerate(self.task_activations or []):
            ok(ta.feature, ("task_activations", j, "feature"))
        check_evidence_features(self, ok)
        check_study_features(self, ok)
        for j, fe in enumerate(self.examples or []):
            ok(fe.feature, ("examples", j, "feature"))
        return self

    def _check_loss_recovered(self) -> None:
        """An undefined loss recovered (null) has a reason and no interval; a defined one has no reason."""
        for key in ("loss_recovered", "loss_recovered_mean_ablation"):
            value, ci, reason = getattr(self, key), getattr(self, f"{key}_ci95"), getattr(self, f"{key}_undefined_reason")
            undefined = value is None or (isinstance(value, float) and math.isnan(value))
            if undefined and ci is not None and any(b is not None and math.isfinite(b) for b in ci):
                fail(f"{{p0}} is undefined (null) but {key}_ci95 = {ci}; an undefined ratio has no interval.", (key,))
            if not undefined and reason is not None:
                fail(f"{{p0}} = {value} but {key}_undefined_reason is set; give one or the other.", (key,))
