"""The run's context in results.json: the model, the task, the BOS policy, the behaviour, the failed checks."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from saecircuits.results._base import (
    Bool,
    Float,
    Int,
    IntOrNull,
    Pair,
    ResultsModel,
    Str,
    StrOrNull,
    fail,
    opt,
    req,
    same_length,
)


class ModelInfo(ResultsModel):
    """The transformer's dimensions (from its TransformerLens config)."""

    n_layers: Int = opt("number of transformer blocks")
    d_model: Int = opt("residual stream width")
    d_mlp: Int = opt("MLP hidden width")
    d_vocab: Int = opt("vocabulary size")
    n_heads: Int = opt("attention heads per layer")
    architecture: Str = opt("Hugging Face architecture name, e.g. 'GPTNeoForCausalLM' ('' when unknown)")
    dtype: Str = opt("dtype of the model's weights and activations ('float32', 'bfloat16', 'float16'); every "
                     "reported number is reduced in float32 or float64 from them")
    device: Str = opt("where the model computed, e.g. 'cpu' or 'cuda:0'")


class Task(ResultsModel):
    """The behaviour's prompts: each prompt ends at the prediction position P, where the answer token is predicted.
    Token strings are ``saecircuits.models.tokens.token_string`` (leading spaces kept)."""

    name: Str = req("task name, e.g. 'closing_quote'")
    n_prompts: Int = req("number of prompts analysed (>= 0)")
    n_dropped_too_long: Int = opt("prompts left out: longer than the model's context")
    answer_token_ids: list[Int] = req("the task's answer token ids, shape [A], A >= 1")
    answer_tokens: list[Str] = opt("the answer tokens as strings, shape [A] (aligned with answer_token_ids)")
    example_prompts: list[Str] = opt("a few prompts, shape [E]")
    example_answer_ids: list[Int] = opt("each example prompt's answer token id, shape [E]")
    example_answers: list[Str] = opt("each example prompt's OWN answer token, shape [E]")

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        if len(self.answer_token_ids) == 0:
            fail("{p0} is empty; it needs at least one token id.", ("answer_token_ids",))
        same_length(self, "answer_token_ids", "answer_tokens")
        same_length(self, "example_prompts", "example_answers")
        same_length(self, "example_prompts", "example_answer_ids")
        if self.n_prompts < 0:
            fail(f"{{p0}} must be >= 0, got {self.n_prompts}.", ("n_prompts",))
        return self


class BosPolicy(ResultsModel):
    """Whether a BOS token starts every prompt and document, and whether special positions (BOS) count in SAE
    training and mean activations."""

    prepended: Bool = req("BOS prepended to prompts and documents (false: no BOS token)")
    token_id: IntOrNull = req("the BOS token id; null exactly when prepended is false")
    token: StrOrNull = opt("the BOS token as a string")
    special_token_ids: list[Int] = opt("the tokenizer's special token ids")
    special_positions: Literal["excluded", "included"] = req(
        "special positions in SAE training and mean activations: 'excluded' or 'included'")
    statement: Str = opt("the same in one sentence, for people")

    @model_validator(mode="after")
    def _consistent(self) -> BosPolicy:
        if self.prepended != (self.token_id is not None):
            fail(f"{{p0}}: 'prepended' must be true exactly when 'token_id' is set (got prepended={self.prepended}, "
                 f"token_id={self.token_id}).", ())
        return self


class Behaviour(ResultsModel):
    """The clean model on the task at P (analysis/quality/behaviour.py): does it perform the behaviour at all?"""

    n_prompts: Int = req("number of prompts")
    top1_accuracy: Float = req("fraction of prompts whose top-1 prediction at P is the answer, in [0, 1]")
    top1_accuracy_ci95: Pair = opt("Wilson 95% interval [lo, hi] of top1_accuracy")
    mean_p_answer: Float = req("mean probability of the answer at P, in [0, 1]")
    mean_p_answer_ci95: Float = opt("95% CI half-width of mean_p_answer")
    mean_loss: Float = req("mean next-token cross-entropy of the answer at P (nats)")
    mean_loss_ci95: Float = opt("95% CI half-width of mean_loss (nats)")
    uniform_loss: Float = opt("the loss of a uniform guess: log d_vocab (nats)")
    performs: Bool = req("true when the model performs the behaviour (by `rule`)")
    rule: Str = opt("the rule `performs` applies, in words")


class Check(ResultsModel):
    """One failed check (analysis/quality/checks.py): a number that cannot support a conclusion, and the fix."""

    id: Str = req("check id, e.g. 'negative_explained_variance'")
    scope: Str = req("'task', or the hook point of the SAE it concerns")
    message: Str = req("what is wrong, in one sentence")
    what_to_try: Str = req("what to change")
    severity: Str = opt("e.g. 'warning'")


class Interventions(ResultsModel):
    """How ablations were computed (saecircuits.models.interventions)."""

    backend: StrOrNull = opt("'engine' (prefix-cached: position P recomputed alone) or 'bridge' (full forwards)")
    note: StrOrNull = opt("why this backend, in words")
