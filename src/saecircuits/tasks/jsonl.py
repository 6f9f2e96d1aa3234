"""A task from a JSON-lines file of ``{"prompt": ..., "answer": ...}`` records.

The answer must be exactly one token *in context*: the tokens of ``prompt + answer`` must start with the tokens of
``prompt`` and have exactly one more token, which becomes the answer id. This is stricter than tokenizing the
answer alone (BPE merges across the boundary would otherwise go unnoticed).
"""

from __future__ import annotations

import json
from pathlib import Path

from saecircuits.tasks.base import Task, TaskError

__all__ = ["jsonl_task"]


def jsonl_task(path: str | Path, tokenizer, *, prepend_bos: bool = True, name: str | None = None) -> Task:
    """Read a task from ``path`` (one JSON object per line; blank lines are skipped).

    Args:
        path: the ``.jsonl`` file.
        tokenizer: a Hugging Face tokenizer (the model's).
        prepend_bos: put the tokenizer's BOS id first.
        name: task name (default: the file's stem).

    Returns:
        A :class:`Task` with ``source_index`` = 0-based line number of each record.

    Raises:
        TaskError: unreadable file, a line that is not a JSON object with string ``prompt`` and ``answer``, an
            answer that is not exactly one token after its prompt (the message names the line and the tokens it
            became), or an empty file.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise TaskError(f"cannot read task file {path}: {err}") from err
    bos: list[int] = []
    if prepend_bos:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise TaskError("prepend_bos=True but the tokenizer has no bos_token_id; pass prepend_bos=False")
        bos = [int(tokenizer.bos_token_id)]

    prompts: list[str] = []
    token_ids: list[list[int]] = []
    answer_ids: list[int] = []
    source_index: list[int] = []
    for line_no, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{line_no + 1}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(
                f'{where}: not valid JSON ({err.msg}); each line must be {{"prompt": ..., "answer": ...}}'
            ) from err
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("prompt"), str)
            or not isinstance(record.get("answer"), str)
        ):
            raise TaskError(f'{where}: each line must be an object with string fields "prompt" and "answer"')
        prompt, answer = record["prompt"], record["answer"]
        p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
        if not p_ids or full[: len(p_ids)] != p_ids or len(full) != len(p_ids) + 1:
            tail = tokenizer.convert_ids_to_tokens(
                full[len(p_ids) :] if full[: len(p_ids)] == p_ids else full
            )
            raise TaskError(
                f"{where}: answer {answer!r} is not exactly one token after prompt {prompt[-40:]!r}: "
                + (
                    f"prompt+answer ends with {len(full) - len(p_ids)} extra token(s) {tail}"
                    if full[: len(p_ids)] == p_ids and p_ids
                    else f"the prompt's tokens are not a prefix of prompt+answer's tokens {tail}"
                )
                + "; choose an answer that is a single token in context (mind the leading space)"
            )
        prompts.append(prompt)
        token_ids.append(bos + p_ids)
        answer_ids.append(full[-1])
        source_index.append(line_no)
    if not token_ids:
        raise TaskError(f"task file {path} holds no prompts")
    return Task(
        name=name or path.stem,
        prompts=prompts,
        token_ids=token_ids,
        answer_ids=answer_ids,
        source_index=source_index,
    )
