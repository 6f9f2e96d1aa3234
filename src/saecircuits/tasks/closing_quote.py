"""The closing-quote task: predict the token that closes ``said, "...`` (the reference notebook's test prompts).

For each document: find the first ``said, "``; from the opening quote on, find the first closing string (``."`` by
default; optionally also ``!"`` and ``?"``); the prompt is the document prefix up to and including that closing.
The prompt is tokenized (BOS first), and the answer is its LAST token, which must close the quote under this
tokenizer. In GPT-2 BPE ``."`` is one token (id 526); in stories260K's tok512 the closing ``"`` is its own token after
``.``, so we accept a last token whose decoded text ends with the quote character and is a suffix of the closing
string. Prompts whose tokenization does not end that way are dropped. ``Task.token_ids`` holds every token but the
last (the position contract of tasks/base.py).

Departures from the reference notebook (on purpose):
- the notebook tokenizes one string at a time with ``model.to_tokens``; we tokenize in batches with the HF tokenizer
  (plain characters, ``models.tokens.encode_texts``; BOS prepended by us), which gives the same ids as
  ``bridge.to_tokens`` on text without special-token strings (tested); ``<|endoftext|>`` or ``<s>`` inside a story
  stays text, as llama2.c's encoder treats it;
- ``closings`` can include ``!"`` and ``?"`` (the notebook only uses ``."``);
- ``max_tokens`` drops over-long prompts by token count (the later notebook version capped characters at 1600), and
  the task records how many (``Task.n_dropped_too_long``).
As in the notebook, the closing found is the first one after the opening quote, which sometimes closes a later
quotation (about 30% of the notebook's prompts); ``source_index`` keeps the document index for provenance. The
anchors (:func:`closing_quote_anchors`) mark the quotation the answer closes, not the one the prompt was cut at.
"""

from __future__ import annotations

from collections.abc import Sequence

from saecircuits.models.tokens import bos_prefix, encode_texts, token_pieces
from saecircuits.tasks.base import Task, TaskError, char_to_token, log_dropped

__all__ = ["closing_quote_task", "closing_quote_anchors", "OPENING", "QUOTE"]

OPENING = 'said, "'
QUOTE = '"'
_CHUNK = 256


DEFAULT_MAX_PROMPTS = 1000
"""Prompts a task keeps by default (the first ones in corpus order), in the library and in ``saecircuits run``."""


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


def closing_quote_anchors(tokenizer, token_ids: list[int], prompt: str) -> dict[str, int]:
    """The named positions of one closing-quote prompt (0-based in ``token_ids``, BOS included), P left out. They
    mark the quotation the answer closes, which is not always the one the task was cut at: the first closing after
    the first ``said, "`` often closes a later quotation (``He said, "Is it yours?" ... said Jack, "I like the``).

    - ``"open_quote"``: the token holding that quotation's opening ``"`` (the last ``"`` of the prompt: quotes
      alternate, and the answer closes the one still open);
    - ``"said"``: the token holding the ``s`` of the last word ``said`` between the quotation before it (or the
      prompt's start) and that opening quote (``said, "``, ``said Jack, "``); absent when that quotation is not
      introduced by ``said`` (``asked``, ``replied``);
    - ``"last_word"``: the last token before P whose text has a letter or digit (P itself is usually the quotation's
      last word, e.g. `` play`` before ``."`` in GPT-2 BPE; in llama2.c's tok512 P is the ``.`` before ``"``).

    Returns:
        the anchors found; ``{}`` when the prompt has no ``said, "`` or its tokens do not spell it back (a
        normalizing tokenizer; the task then aligns positions by their distance from P only).
    """
    import re

    if prompt.find(OPENING) < 0:
        return {}
    pieces = token_pieces(tokenizer, token_ids)
    try:
        owner = char_to_token(tokenizer, token_ids, prompt, pieces=pieces)
    except ValueError:
        return {}
    quote = prompt.rfind(QUOTE)
    if quote < 0 or quote >= len(owner):
        return {}
    anchors = {"open_quote": owner[quote]}
    before = prompt.rfind(QUOTE, 0, quote) + 1  # after the previous quotation's closing quote (or 0)
    said = [m.start() for m in re.finditer(r"\bsaid\b", prompt[before:quote])]
    if said:
        anchors["said"] = owner[before + said[-1]]
    p = len(token_ids) - 1
    words = [k for k in range(p) if pieces[k].kind == "text" and any(ch.isalnum() for ch in pieces[k].text)]
    if words:
        anchors["last_word"] = words[-1]
    return anchors


def closing_quote_task(
    documents: Sequence[str],
    tokenizer,
    *,
    closings: Sequence[str] = ('."',),
    max_prompts: int | None = DEFAULT_MAX_PROMPTS,
    max_tokens: int | None = None,
    prepend_bos: bool | None = None,
    name: str = "closing-quote",
) -> Task:
    """Build the closing-quote task from a corpus, as the reference notebook built its test prompts.

    Args:
        documents: corpus texts (e.g. TinyStories validation stories), in order.
        tokenizer: a Hugging Face tokenizer (the model's); texts are encoded as plain characters
            (``models.tokens.encode_texts``).
        closings: closing strings, each ending with ``"``; the earliest one at or after the opening quote wins.
        max_prompts: keep at most this many prompts (the first ones in corpus order).
        max_tokens: drop prompts whose tokenization (BOS and answer included) is longer than this, counted in
            ``Task.n_dropped_too_long`` (give the model's context, ``model.cfg.n_ctx``, as ``saecircuits run``
            does; the analyses refuse prompts longer than the context).
        prepend_bos: True: the tokenizer's BOS first (as ``model.to_tokens``); False: none; None (default): BOS
            when the tokenizer has one (never a stand-in token).
        name: task name.

    Returns:
        A :class:`Task`: ``prompts`` are the prefixes without the answer's text, ``token_ids`` the BOS-prefixed
        tokens without the answer, ``answer_ids`` the closing token, ``source_index`` the document index,
        ``anchor_positions`` the ``said`` / ``open_quote`` / ``last_word`` tokens (:func:`closing_quote_anchors`;
        ``task.anchors(i)`` adds P).

    Raises:
        TaskError: no closing string given, a closing string that does not end with ``"``, ``prepend_bos=True``
            without a BOS id, or no document yields a prompt.
    """
    if not closings or any(not c.endswith(QUOTE) for c in closings):
        raise TaskError(f"closings must be non-empty strings ending with {QUOTE!r}, got {tuple(closings)!r}")
    try:
        bos = bos_prefix(tokenizer, prepend_bos)
    except ValueError as err:
        raise TaskError(str(err)) from err
    candidates = [
        (i, text) for i, doc in enumerate(documents) if (text := _candidate(doc, closings)) is not None
    ]

    prompts: list[str] = []
    token_ids: list[list[int]] = []
    answer_ids: list[int] = []
    source_index: list[int] = []
    anchor_positions: list[dict[str, int]] = []
    too_long = 0
    for chunk_start in range(0, len(candidates), _CHUNK):
        chunk = candidates[chunk_start : chunk_start + _CHUNK]
        try:
            encoded = encode_texts(tokenizer, [text for _, text in chunk])
        except ValueError as err:
            raise TaskError(str(err)) from err
        for (doc_index, text), ids in zip(chunk, encoded, strict=True):
            if not ids:
                continue
            ids = bos + ids
            if max_tokens is not None and len(ids) > max_tokens:
                too_long += 1
                continue
            # the answer's text as it stands in this text (a SentencePiece token keeps its leading space); the last
            # 8 tokens hold every byte of the last character (at most 4), so the tail gives the same last piece
            tail = ids[-8:]
            last = token_pieces(tokenizer, tail, text_start=len(tail) == len(ids))[-1]
            answer_text = last.text if last.kind == "text" else ""
            closing = next(c for c in closings if text.endswith(c))
            if not answer_text.endswith(QUOTE) or not closing.endswith(answer_text):
                continue
            prompts.append(text[: len(text) - len(answer_text)])
            token_ids.append(ids[:-1])
            answer_ids.append(ids[-1])
            source_index.append(doc_index)
            anchor_positions.append(closing_quote_anchors(tokenizer, token_ids[-1], prompts[-1]))
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
    log_dropped(name, too_long, max_tokens)
    return Task(
        name=name,
        prompts=prompts,
        token_ids=token_ids,
        answer_ids=answer_ids,
        source_index=source_index,
        n_dropped_too_long=too_long,
        anchor_positions=anchor_positions,
    )
