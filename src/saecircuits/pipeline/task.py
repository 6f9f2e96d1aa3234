"""Stage ``task``: the behaviour's prompts, whether the model performs it, the BOS policy, and the corpus documents
the statistics are computed over."""

from __future__ import annotations

from pathlib import Path

import torch

from saecircuits.pipeline.config import PipelineError, RunConfig
from saecircuits.pipeline.stages import RunContext, Stage


def _build_task(cfg: RunConfig, model, docs: list[str]):
    from saecircuits.tasks.base import TaskError
    from saecircuits.tasks.closing_quote import closing_quote_task
    from saecircuits.tasks.jsonl import jsonl_task

    # prompts longer than the context (prompt + answer) are dropped and counted, for every kind of task
    max_tokens = min(cfg.max_prompt_tokens or int(model.cfg.n_ctx), int(model.cfg.n_ctx))
    if cfg.task == "closing-quote":
        task = closing_quote_task(docs, model.tokenizer, closings=cfg.closings, max_prompts=cfg.max_prompts,
                                  max_tokens=max_tokens)
    elif cfg.task.endswith(".jsonl") or Path(cfg.task).is_file():
        task = jsonl_task(cfg.task, model.tokenizer, max_tokens=max_tokens)
        if cfg.max_prompts is not None and task.n_prompts > cfg.max_prompts:
            task = task.subset(range(cfg.max_prompts))
    else:
        raise TaskError(f"unknown task {cfg.task!r}: use 'closing-quote' or the path of a .jsonl task file")
    return task


def _anchors_note(task) -> str | None:
    """The note for a task file where some prompts name anchors and others do not (accepted: a prompt without
    anchors is aligned by distance from P alone), or None when every prompt or none names anchors."""
    named = [bool(a) for a in task.anchor_positions] if task.anchor_positions else []
    n_without = named.count(False)
    if not any(named) or not n_without:
        return None
    return (f"{n_without} of {task.n_prompts} prompts of the task file name no \"anchors\": in the circuit across "
            "positions their positions count only by distance from P (P-1, P-2, ...), while the others' named "
            "positions get their own columns; give every line \"anchors\" to align them all.")


def _bos_policy(tokenizer, exclude_special: bool) -> dict:
    """The ``bos_policy`` entry of results.json: whether a BOS was prepended, which, and where special tokens count."""
    from saecircuits.models.tokens import bos_prefix, special_token_ids, token_string

    prefix = bos_prefix(tokenizer)  # the pipeline's policy: BOS when the tokenizer has one, never a stand-in
    special = sorted(special_token_ids(tokenizer))
    token = token_string(tokenizer, prefix[0]) if prefix else None
    if prefix:
        said = f"Every prompt and corpus document starts with the tokenizer's BOS token {token!r} (id {prefix[0]})."
    else:
        said = "The tokenizer has no BOS token, so nothing is prepended to prompts or documents (no stand-in token)."
    where = (
        "left out of SAE training activations, the mean activation used for mean ablation, top examples, token counts "
        "and DFA means" if exclude_special else
        "kept in SAE training activations and the mean activation (--include-bos), left out of top examples, token "
        "counts and DFA means"
    )
    return {
        "prepended": bool(prefix),
        "token_id": prefix[0] if prefix else None,
        "token": token,
        "special_token_ids": special,
        "special_positions": "excluded" if exclude_special else "included",
        "statement": f"{said} Special-token positions (ids {special}) are {where}.",
    }


def _task_entry(task, tokenizer, n_show: int = 5) -> dict:
    """The ``task`` entry of results.json: answers shown with ``models.tokens.token_string``, and the first example
    prompts each with its OWN answer, as the text that follows the prompt (``token_pieces`` in context)."""
    from saecircuits.models.tokens import token_pieces, token_string

    answers = sorted(set(task.answer_ids))
    shown = range(min(n_show, task.n_prompts))
    return {
        "name": task.name,
        "n_prompts": task.n_prompts,
        "n_dropped_too_long": int(task.n_dropped_too_long),
        "answer_token_ids": answers,
        "answer_tokens": [token_string(tokenizer, a) for a in answers],
        "example_prompts": [task.prompts[i] for i in shown],
        "example_answer_ids": [int(task.answer_ids[i]) for i in shown],
        "example_answers": [
            token_pieces(tokenizer, [*task.token_ids[i], task.answer_ids[i]])[-1].text for i in shown
        ],
    }


def _task(ctx: RunContext, *, model, docs: list[str]) -> dict:
    """The task and its ``results.json`` entry; first: does the model perform the behaviour at all? Everything
    after it explains the answer's loss. ``stat_docs``: the first ``n_stat_docs`` documents as token rows (those
    with at least one text token)."""
    from saecircuits.analysis.quality.behaviour import behaviour_summary
    from saecircuits.analysis.quality.checks import behaviour_checks
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.report.summary import quoted_token

    cfg, say = ctx.cfg, ctx.say
    task = _build_task(cfg, model, docs)
    task_entry = _task_entry(task, model.tokenizer)
    dropped = f" ({task.n_dropped_too_long} over-long prompts dropped)" if task.n_dropped_too_long else ""
    say(f"task {task.name}: {task.n_prompts} prompts{dropped}, answer tokens "
        + ", ".join(quoted_token(t) for t in task_entry["answer_tokens"]))
    if _anchors_note(task):
        say(f"note: {_anchors_note(task)}")
    behaviour = behaviour_summary(model, task)
    bad = int((~torch.isfinite(behaviour.loss)).sum())
    if bad:  # every number after this one would be NaN: stop with the likely cause
        from saecircuits.models.load import model_dtype

        dtype = model_dtype(model)
        why = (f"its activations overflow {dtype} (largest value {torch.finfo(getattr(torch, dtype)).max:.0f}); "
               "use --dtype bfloat16 or float32" if dtype == "float16" else "check the model's weights")
        raise PipelineError(f"the model's answer loss at P is not finite on {bad} of {task.n_prompts} prompts in "
                            f"{dtype}: {why}")
    checks = [c.to_dict() for c in behaviour_checks(behaviour)]
    say(("the model performs the behaviour: " if behaviour.performs else
         "WARNING: the model does NOT perform the behaviour: ") + behaviour.describe())
    bos_policy = _bos_policy(model.tokenizer, cfg.exclude_bos)
    n_ctx = int(model.cfg.n_ctx)
    special = special_token_ids(model.tokenizer)
    stat_docs = encode_documents(model.tokenizer, docs[: cfg.n_stat_docs], max_len=n_ctx)
    stat_docs = [d for d in stat_docs if any(t not in special for t in d)]  # at least one text token
    return {"task": task, "task_entry": task_entry, "behaviour": behaviour.to_dict(), "behaviour_checks": checks,
            "bos_policy": bos_policy, "stat_docs": stat_docs}


TASK = Stage("task", _task, reads=("model", "docs"),
             writes=("task", "task_entry", "behaviour", "behaviour_checks", "bos_policy", "stat_docs"),
             codecs={"task": "task"})
