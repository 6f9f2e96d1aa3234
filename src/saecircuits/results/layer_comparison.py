"""The run-level layer comparison (``results["layer_comparison"]``, pipeline.study_run): the chosen features of
each SAE ablated alone and together, and whether the layers' effects add up. Losses in nats."""

from __future__ import annotations

from pydantic import model_validator

from saecircuits.results._base import CI, Float, Int, MeanCI, ResultsModel, Str, fail, opt, req


class LayerRun(ResultsModel):
    """One set of features (possibly over several hooks) ablated together."""

    label: Str = req("run label")
    hooks: list[Str] = opt("the hooks ablated")
    features: list[list[Int]] = opt("per hook, the features ablated")
    loss_increase: MeanCI = req("answer loss increase (nats)")
    values: list[Float] = opt("per prompt loss increase (nats)")


class PairedDifference(ResultsModel):
    """Run a - run b, paired per prompt (nats)."""

    a: Int = req("index into runs")
    b: Int = req("index into runs")
    mean: Float = req("mean difference (nats)")
    ci95: CI = opt("95% CI")
    n: Int = opt("prompts")


class LayerComparison(ResultsModel):
    """The chosen features of each SAE ablated alone and together (nats): do layers add up?"""

    mode: Str = opt("the ablation mode")
    n_prompts: Int = opt("prompts")
    runs: list[LayerRun] = req("the runs")
    paired: list[PairedDifference] = opt("paired differences between runs")
    interaction: MeanCI = opt("together - sum of alone, per prompt (nats): > 0 super-, < 0 sub-additive")

    @model_validator(mode="after")
    def _pairs(self) -> LayerComparison:
        n = len(self.runs)
        for j, p in enumerate(self.paired or []):
            if not (0 <= p.a < n and 0 <= p.b < n):
                fail(f"{{p0}} names run {p.a} or {p.b}; there are {n} runs.", ("paired", j))
        return self
