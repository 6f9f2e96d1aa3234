"""The closing-quote task: predict the token that closes ``said, "...`` (analysis-spec.md E1).

For each document: find the first ``said, "``; from the opening quote on, find the first closing string (``."`` by
default; optionally also ``!"`` and ``?"``); the prompt is the document prefix up to and including that closing.
The prompt is tokenized (BOS first), and the answer is its LAST token, which must close the quote under this
tokenizer. In GPT-2 BPE ``."`` is one token (id 526); in stories260K's tok512 the closing ``"`` is its own token after
``.``, so we accept a last token whose decoded text ends with the quote character and is a suffix of the closing
string. Prompts whose tokenization does not end that way are dropped. ``Task.token_ids`` holds every token but the
last (the position contract of tasks/base.py).

Departures from the reference notebook (on purpose):
- the notebook tokenizes one string at a time with ``model.to_tokens``; we tokenize in batches with the HF tokenizer
  (``add_special_tokens=False``, BOS prepended by us), which gives the same ids as ``bridge.to_tokens`` (tested);
- ``closings`` can include ``!"`` and ``?"`` (the notebook only uses ``."``);
- ``max_tokens`` drops over-long prompts by token count (the later notebook version capped characters at 1600).
As in the notebook, the closing found is the first one after the opening quote, which sometimes closes a later
quotation (pitfall 22); ``source_index`` keeps the document index for provenance.
"""

from __future__ import annotations

from collections.abc import Sequence

from saecircuits.tasks.base import Task, TaskError

__all__ = ["closing_quote_task", "OPENING", "QUOTE"]

OPENING = 'said, "'
QUOTE = '"'
_CHUNK = 256


def _bos_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise TaskError(
            "prepend_bos=True but the tokenizer has no bos_token_id; pass prepend_bos=False or set a BOS token"
        )
    return int(bos)


def _candidate(document: str, closings: Sequence[str]) -> str | None:
    """The prefix of ``document`` up to and including the first closing after the first ``said, "`` (or None)."""
    start = document.find(OPENING)
    if start < 0:
        return None
    start += len(OPENING)
    ends = [(i, c) for c in closings if (i := document.find(c, start)) >= 0]
    if not ends:
        return None
    end, closing = min(ends, key=lambda e: (e[0], -len(e[1])))
    return document[: end + len(closing)]


def closing_quote_task(
    documents: Sequence[str],
    tokenizer,
    *,
    closings: Sequence[str] = ('."',),
    max_prompts: int | None = None,
    max_tokens: int | None = None,
    prepend_bos: bool = True,
    name: str = "closing-quote",
) -> Task:
    """Build the closing-quote task from a corpus (analysis-spec.md E1).

    Args:
        documents: corpus texts (e.g. TinyStories validation stories), in order.
        tokenizer: a Hugging Face tokenizer (the model's); called as ``tokenizer(texts, add_special_tokens=False)``.
        closings: closing strings, each ending with ``"``; the earliest one at or after the opening quote wins.
        max_prompts: keep at most this many prompts (the first ones in corpus order).
        max_tokens: drop prompts whose tokenization (BOS and answer included) is longer than this.
        prepend_bos: put the tokenizer's BOS first (as ``model.to_tokens`` does by default).
        name: task name.

    Returns:
        A :class:`Task`: ``prompts`` are the prefixes without the answer's text, ``token_ids`` the BOS-prefixed
        tokens without the answer, ``answer_ids`` the closing token, ``source_index`` the document index.

    Raises:
        TaskError: no closing string given, a closing string that does not end with ``"``, no BOS id with
            ``prepend_bos``, or no document yields a prompt.
    """
    if not closings or any(not c.endswith(QUOTE) for c in closings):
        raise TaskError(f"closings must be non-empty strings ending with {QUOTE!r}, got {tuple(closings)!r}")
    bos = [_bos_id(tokenizer)] if prepend_bos else []
    candidates = [
        (i, text) for i, doc in enumerate(documents) if (text := _candidate(doc, closings)) is not None
    ]

    prompts: list[str] = []
    token_ids: list[list[int]] = []
    answer_ids: list[int] = []
    source_index: list[int] = []
    for chunk_start in range(0, len(candidates), _CHUNK):
        chunk = candidates[chunk_start : chunk_start + _CHUNK]
        encoded = tokenizer([text for _, text in chunk], add_special_tokens=False)["input_ids"]
        for (doc_index, text), ids in zip(chunk, encoded, strict=True):
            if not ids:
                continue
            ids = bos + list(ids)
            if max_tokens is not None and len(ids) > max_tokens:
                continue
            answer_text = tokenizer.decode([ids[-1]])
            closing = next(c for c in closings if text.endswith(c))
            if not answer_text.endswith(QUOTE) or not closing.endswith(answer_text):
                continue
            prompts.append(text[: len(text) - len(answer_text)])
            token_ids.append(ids[:-1])
            answer_ids.append(ids[-1])
            source_index.append(doc_index)
            if max_prompts is not None and len(token_ids) >= max_prompts:
                break
        if max_prompts is not None and len(token_ids) >= max_prompts:
            break

    if not token_ids:
        raise TaskError(
            f"no closing-quote prompts in {len(documents)} documents ({len(candidates)} contain {OPENING!r} followed "
            f"by one of {tuple(closings)!r}, none of which tokenizes to end with a closing-quote token"
            + (f" within max_tokens={max_tokens}" if max_tokens is not None else "")
            + "); check the corpus and the tokenizer"
        )
    return Task(
        name=name, prompts=prompts, token_ids=token_ids, answer_ids=answer_ids, source_index=source_index
    )
