"""Direct logit attribution to the answer (analysis/readouts/dla.py): one value per model component."""

from __future__ import annotations

from pydantic import model_validator

from saecircuits.results._base import Float, LabelledValues, Str, opt, req


class DLA(LabelledValues):
    """Direct logit attribution of the answer logit at P: one entry per component (``labels`` [C], ``mean`` [C],
    ``ci95`` [C], in logits), summing to the answer logit up to ``completeness_max_abs_error``."""

    answer_logit_mean: Float = opt("mean answer logit over prompts, what the components sum to (logits)")
    completeness_max_abs_error: Float = req("max over prompts of |sum of components - answer logit| (logits)")
    logit_soft_cap: Float = opt("set for soft-capped logits (Gemma 2): the DLA is of the pre-cap logit")
    of: Str = opt("what is attributed, when not the answer logit, e.g. 'pre-cap answer logit'")

    @model_validator(mode="after")
    def _aligned(self) -> DLA:
        self.check_aligned()
        return self
