"""The reference study's optional keys of one SAE (pipeline.study_sae): the five-way loss comparison, ablation
modes, ablation on the top corpus stories, feature geometry, span ablation. Losses in nats. (The run-level
``layer_comparison`` is in :mod:`saecircuits.results.layer_comparison`.)"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field, model_validator

from saecircuits.results._base import (
    Float,
    Int,
    MeanCI,
    OffRange,
    ResultsModel,
    Str,
    TokenKind,
    fail,
    opt,
    req,
    same_length,
)


class LossComparison(ResultsModel):
    """The answer loss at P under five runs on the same prompts (analysis/ablations/loss_comparison.py): clean, the
    hook mean-ablated, zero-ablated, the chosen features ablated together, the SAE spliced in; aligned with
    ``labels`` [C]."""

    conditions: list[Str] = opt("machine names, shape [C]: 'clean', 'mean_ablation', 'zero_ablation', "
                                "'features_ablated', 'sae_spliced'")
    labels: list[Str] = req("condition labels, shape [C]")
    features: list[Int] = opt("the features ablated in 'features_ablated' (the multi-ablation set)")
    mode: Str = opt("the ablation mode")
    n_prompts: Int = opt("prompts averaged")
    mean: list[Float] = req("mean answer loss per condition, shape [C] (nats)")
    ci95: list[Float] = opt("95% CI half-widths, shape [C] (nats)")
    diff_vs_clean: list[Float] = opt("mean loss - clean loss, paired per prompt, shape [C] (nats)")
    diff_vs_clean_ci95: list[Float] = opt("95% CI half-widths of diff_vs_clean, shape [C] (nats)")
    features_minus_sae: MeanCI = opt("features_ablated - sae_spliced loss per prompt (nats): the features' effect "
                                     "inside the SAE's reconstruction when the mode drops the error")
    off_range: OffRange | None = opt("the features run's edited activations below the hook's minimum; null: no "
                                     "features chosen")
    sae_off_range: OffRange | None = opt("the same for the SAE-spliced run")

    @model_validator(mode="after")
    def _aligned(self) -> LossComparison:
        for key in ("mean", "ci95", "diff_vs_clean", "diff_vs_clean_ci95", "conditions"):
            same_length(self, "labels", key)
        return self


class ModeRow(ResultsModel):
    """One feature's ablation effect (answer loss increase at P, nats; mean null and n 0 where the feature is never
    active) under each mode."""

    feature: Int = req("feature index")
    residual: MeanCI = opt("residual-preserving: x - f_k W_dec[k] at P (SAE error kept), vs the clean run (nats)")
    reconstruction: MeanCI = opt("decode(f with the feature zeroed) at P (SAE error dropped), vs the clean run "
                                 "(nats)")
    clean_effect: MeanCI = opt("decode(f with the feature zeroed) vs decode(f) (the SAE spliced in) at P (nats)")


class ModeMulti(MeanCI):
    """The chosen features ablated together under one mode (nats)."""

    off_range: OffRange | None = opt("ablated activations below the hook's minimum; null: no bounded range")


class AblationModes(ResultsModel):
    """The top features' effects under each ablation mode: 'residual', 'reconstruction', 'clean_effect' (nats)."""

    features: list[Int] = req("features compared")
    multi_features: list[Int] = opt("the features ablated together")
    rows: list[ModeRow] = req("one row per feature")
    multi: dict[str, ModeMulti] = opt("mode -> their joint effect (nats)")
    off_range: dict[str, OffRange | None] = opt("mode -> off-range counts (null: no bounded range)")
    descriptions: dict[str, Str] = opt("mode -> what it does, in words")


class StoryLoss(ResultsModel):
    """A corpus story's mean next-token loss over its counted positions, clean and with the feature ablated at all
    of them."""

    doc_index: Int = req("document index")
    clean_loss: Float = req("mean next-token loss, clean (nats)")
    ablated_loss: Float = req("mean next-token loss, feature ablated (nats)")
    loss_increase: Float = req("ablated - clean (nats)")


class PerTokenLoss(ResultsModel):
    """The per-token loss change of one story when the feature is ablated."""

    doc_index: Int = opt("document index")
    tokens: list[Str] = req("tokens as strings, shape [T]")
    token_kinds: list[TokenKind] = opt("'text' | 'continuation' | 'special' per token, shape [T]")
    loss_change: list[Float] = req("ablated - clean next-token loss per token, shape [T] (nats)")
    activation: list[Float] = opt("the feature's activation per token, shape [T]")

    @model_validator(mode="after")
    def _aligned(self) -> PerTokenLoss:
        same_length(self, "tokens", "loss_change")
        same_length(self, "tokens", "token_kinds")
        same_length(self, "tokens", "activation")
        return self


class MaxActivatingAblation(ResultsModel):
    """A feature ablated on the corpus stories where it fires most (analysis/ablations/max_activating.py; nats):
    globally (at every counted position of a story at once) and per position (at one position p where it is above
    ``threshold``, the loss of predicting the token after p)."""

    feature: Int = req("feature index")
    mode: Str = opt("the ablation mode")
    threshold: Float = opt("absolute per-position threshold, 0.1 x the corpus maximum (SAE feature units)")
    n_stories: Int = opt("stories used")
    global_: MeanCI = Field(..., alias="global", description=(
        "next-token loss increase with the feature ablated at every counted position, mean over stories (nats)"))
    per_position: MeanCI = req("loss increase of the token after p with the feature ablated at p alone, mean over "
                               "(story, position) pairs above threshold (nats)")
    stories: list[StoryLoss] = opt("per story, the global ablation")
    position_loss_increase: list[Float] = opt("per (story, position) pair above threshold: the loss increase, "
                                              "shape [Q] (nats)")
    position_activation: list[Float] = opt("the feature's activation at those pairs, shape [Q] (SAE feature units)")
    per_token: list[PerTokenLoss] = opt("per-token loss changes of the global ablation, first stories")
    off_range: OffRange | None = opt("ablated activations below the hook's minimum; null: no bounded range")

    @model_validator(mode="after")
    def _aligned(self) -> MaxActivatingAblation:
        same_length(self, "position_loss_increase", "position_activation")
        return self


class Cooccurrence(ResultsModel):
    """How often the S features are active together at P (S x S matrices)."""

    threshold: Float = opt("activation threshold for 'active'")
    n_prompts: Int = opt("prompts counted")
    counts: list[list[Int]] = req("prompts where both are active at P, S x S")
    by_min: list[list[Float]] = req("counts / min(count_i, count_j), S x S")
    by_max: list[list[Float]] = req("counts / max(count_i, count_j), S x S")


class KurtosisHistogram(ResultsModel):
    """Histogram of every feature's token kurtosis."""

    edges: list[Float] = req("bin edges, shape [B + 1]")
    counts: list[Int] = req("features per bin, shape [B]")
    median: Float = opt("median kurtosis")
    n_features: Int = opt("features counted")


class FeatureGeometry(ResultsModel):
    """Geometry of the S top features."""

    features: list[Int] = req("the S features")
    cooccurrence: Cooccurrence = opt("co-activation at P")
    decoder_cosine: list[list[Float]] = opt("cosine of decoder directions, S x S")
    encoder_cosine: list[list[Float]] = opt("cosine of encoder directions, S x S")
    token_kurtosis: list[Float] = opt("kurtosis of each feature's activation over tokens, shape [S]")
    token_kurtosis_all: KurtosisHistogram = opt("histogram over every feature")

    @model_validator(mode="after")
    def _square(self) -> FeatureGeometry:
        n = len(self.features)
        mats = [((key,), getattr(self, key)) for key in ("decoder_cosine", "encoder_cosine")]
        if self.cooccurrence is not None:
            mats += [(("cooccurrence", key), getattr(self.cooccurrence, key)) for key in ("counts", "by_min", "by_max")]
        for where, m in mats:
            if m is not None and (len(m) != n or any(len(row) != n for row in m)):
                fail(f"{{p0}} must be a {n} x {n} matrix (one row and column per feature).", where)
        same_length(self, "features", "token_kurtosis")
        ka = self.token_kurtosis_all
        if ka is not None and len(ka.counts) != len(ka.edges) - 1:
            fail("{p0} needs one count per bin.", ("token_kurtosis_all", "counts"))
        return self


class SpanAblation(ResultsModel):
    """Only the span of the features' decoder vectors kept at P (analysis/ablations/span.py): the answer loss per
    variant, aligned with ``variants`` [V] (nats)."""

    features: list[Int] = req("the ablated features")
    rank: Int = opt("dimension of the span of the features' decoder vectors")
    variants: list[Str] = req("'clean', 'span_zero', 'span_mean', shape [V]")
    mean: list[Float] = req("mean answer loss per variant, shape [V] (nats)")
    ci95: list[Float] = opt("95% CI half-widths, shape [V] (nats)")
    diff_vs_clean: list[Float] = opt("loss - clean loss, paired, shape [V] (nats)")
    diff_vs_clean_ci95: list[Float] = opt("95% CI half-widths of diff_vs_clean, shape [V] (nats)")
    fraction_kept: Float = opt("mean over prompts of |P h|^2 / |h|^2: the share of the activation's squared norm in "
                               "the span, in [0, 1]")

    @model_validator(mode="after")
    def _aligned(self) -> SpanAblation:
        for key in ("mean", "ci95", "diff_vs_clean", "diff_vs_clean_ci95"):
            same_length(self, "variants", key)
        return self


def check_study_features(sae, ok: Callable) -> None:
    """Every feature index of the study keys of ``sae`` (a SaeEntry) is in range (``ok`` fails otherwise)."""
    if sae.corpus_stats is not None:
        for j, fe in enumerate(sae.corpus_stats.features):
            ok(fe.feature, ("corpus_stats", "features", j, "feature"))
    for j, f in enumerate((sae.loss_comparison and sae.loss_comparison.features) or []):
        ok(f, ("loss_comparison", "features", j))
    if sae.ablation_modes is not None:
        for j, f in enumerate(sae.ablation_modes.features):
            ok(f, ("ablation_modes", "features", j))
        for j, row in enumerate(sae.ablation_modes.rows):
            ok(row.feature, ("ablation_modes", "rows", j, "feature"))
    for j, st in enumerate(sae.max_activating_ablation or []):
        ok(st.feature, ("max_activating_ablation", j, "feature"))
    for key in ("feature_geometry", "span_ablation"):
        block = getattr(sae, key)
        for j, f in enumerate(block.features if block is not None else []):
            ok(f, (key, "features", j))
