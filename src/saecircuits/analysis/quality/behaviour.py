"""Does the model perform the behaviour at all? Clean top-1 accuracy, mean p(answer) and mean loss at P.

Everything else in a run explains the loss of the task's answer at the prediction position P. When the model
does not predict that answer (a JSONL task with the wrong leading space, a model that never learned the pattern,
prompts unlike its training data), the features that move the answer's loss explain a behaviour the model does not
have. This module measures the clean model on the task first, so the run can say so before anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from saecircuits.analysis.statistics import mean_ci95
from saecircuits.display import percent
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, answer_metrics, task_batches
from saecircuits.models.interventions import interventions_for
from saecircuits.tasks.base import Task

__all__ = ["MIN_TOP1_ACCURACY", "BehaviourSummary", "behaviour_summary", "wilson_ci95"]

MIN_TOP1_ACCURACY = 0.5
"""The model "performs the behaviour" when the answer is its most likely next token on at least this fraction of
the prompts (the clean top-1 accuracy). Below one half the model mostly predicts something else at P."""


def wilson_ci95(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion ``k / n`` (Wilson 1927, JASA 22:209-212); NaNs when ``n == 0``.

    Unlike ``p +- 1.96 sqrt(p (1 - p) / n)`` it stays inside [0, 1] and is not empty at ``p`` = 0 or 1.
    """
    if n == 0:
        return float("nan"), float("nan")
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class BehaviourSummary:
    """The clean model on the task, at each prompt's P.

    Attributes:
        loss: ``[n_prompts]`` float32, ``-log p(answer)`` in nats.
        p_answer: ``[n_prompts]`` float32, ``p(answer)``.
        top1: ``[n_prompts]`` bool, the answer has the highest logit (rank 0; ties count as top).
        d_vocab: vocabulary size (``log(d_vocab)`` nats is the loss of a uniform guess).
    """

    loss: torch.Tensor
    p_answer: torch.Tensor
    top1: torch.Tensor
    d_vocab: int

    @property
    def n_prompts(self) -> int:
        return int(self.loss.numel())

    @property
    def top1_accuracy(self) -> float:
        """Fraction of prompts where the answer is the top-1 prediction (NaN without prompts)."""
        return int(self.top1.sum()) / self.n_prompts if self.n_prompts else float("nan")

    @property
    def performs(self) -> bool:
        """``top1_accuracy >= MIN_TOP1_ACCURACY``."""
        return self.n_prompts > 0 and self.top1_accuracy >= MIN_TOP1_ACCURACY

    def describe(self) -> str:
        """One line: accuracy, mean p(answer), mean loss and the uniform-guess loss."""
        return (
            f"clean top-1 accuracy {percent(self.top1_accuracy, 1)} ({int(self.top1.sum())} of {self.n_prompts} prompts), "
            f"mean p(answer) {float(self.p_answer.mean()):.3f}, mean loss at P {float(self.loss.mean()):.3f} nats "
            f"(a uniform guess: {math.log(self.d_vocab):.2f})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` ``behaviour`` block (see :mod:`saecircuits.report.schema`)."""
        loss, p = mean_ci95(self.loss), mean_ci95(self.p_answer)
        return {
            "n_prompts": self.n_prompts,
            "top1_accuracy": self.top1_accuracy,
            "top1_accuracy_ci95": list(wilson_ci95(int(self.top1.sum()), self.n_prompts)),
            "mean_p_answer": p.mean,
            "mean_p_answer_ci95": p.half_width,
            "mean_loss": loss.mean,
            "mean_loss_ci95": loss.half_width,
            "uniform_loss": math.log(self.d_vocab),
            "performs": self.performs,
            "rule": f"performs the behaviour when clean top-1 accuracy >= {MIN_TOP1_ACCURACY:g}",
        }


def behaviour_summary(
    model, task: Task, *, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = DEFAULT_MAX_BATCH
) -> BehaviourSummary:
    """The clean model's answer loss, probability and top-1 hit at each prompt's P (one batched clean pass).

    Args:
        model: a TransformerBridge.
        task: prompts and answers.
        max_tokens, max_batch: batch budget (padding never changes a result).

    Returns:
        :class:`BehaviourSummary` (per prompt, in task order).
    """
    n = task.n_prompts
    loss, rank = torch.zeros(n), torch.zeros(n)
    iv = interventions_for(model)
    with torch.no_grad():
        for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
            idx = torch.tensor(batch.indices)
            m = answer_metrics(iv.clean(batch).logits, batch.answer_ids)
            loss[idx], rank[idx] = m["loss"].cpu(), m["rank"].cpu()
    return BehaviourSummary(loss=loss, p_answer=torch.exp(-loss), top1=rank == 0, d_vocab=int(model.cfg.d_vocab))
