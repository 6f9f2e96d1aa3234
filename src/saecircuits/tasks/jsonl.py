"""A task from a JSON-lines file of ``{"prompt": ..., "answer": ...}`` records.

A record may name positions of its prompt, ``"anchors": {"name": char_offset}`` (0-based character offsets into
``prompt``), to align positions across prompts of different lengths in the circuit across positions; each is mapped
to the token that contains that character (``Task.anchors``; P, the last token, is always an anchor).

The answer must be exactly one token *in context*: the tokens of ``prompt + answer`` must start with the tokens of
``prompt`` and have exactly one more token, which becomes the answer id. This is stricter than tokenizing the
answer alone (BPE merges across the boundary would otherwise go unnoticed). Prompt and answer are encoded as plain
characters (``models.tokens.encode_texts``): ``<s>`` or ``<|endoftext|>`` inside a prompt is text, as llama2.c's
encoder treats it, and an answer that is a special-token string is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from saecircuits.models.tokens import bos_prefix, encode_texts, special_token_ids, token_string
from saecircuits.tasks.base import Task, TaskError, char_to_token, check_anchor_name, log_dropped

__all__ = ["jsonl_task", "read_records"]

_EXAMPLE_ANCHORS = '"anchors": {"subject": 4}'


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read and check what can be checked of a task file without a tokenizer: the file is readable UTF-8, each
    non-blank line is a JSON object with non-empty string ``prompt`` and ``answer``, its ``"anchors"`` (if any) an
    object of valid names -> integer character offsets inside the prompt, and at least one record. ``saecircuits
    run`` calls it (``RunConfig.check_inputs``) before the model and corpus load, so a bad file fails in a second;
    :func:`jsonl_task` calls it first too.

    Returns:
        ``(0-based line number, record)`` of each record, in file order.

    Raises:
        TaskError: the first problem, naming ``file:line`` and the fix.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TaskError(f"task file {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 "
                        'JSON lines, one {"prompt": ..., "answer": ...} per line') from err
    except OSError as err:
        raise TaskError(f"cannot read task file {path}: {err}") from err
    out = []
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
        for field, fix in (("prompt", "the text the model reads before it predicts the answer"),
                           ("answer", "the one token the model should predict after the prompt")):
            if not record[field]:  # else the tokenizer's check blames tokenisation ("not a prefix", "0 extra tokens")
                raise TaskError(f'{where}: "{field}" is empty; give {fix}')
        _check_anchors(record["prompt"], record.get("anchors"), where)
        out.append((line_no, record))
    if not out:
        raise TaskError(f"task file {path} holds no prompts; give one {{\"prompt\": ..., \"answer\": ...}} per line")
    return out


def _check_anchors(prompt: str, anchors: object, where: str) -> None:
    """A record's ``"anchors"`` without the tokenizer: an object of valid names -> integer character offsets inside
    ``prompt``. Raises :class:`TaskError` naming ``where`` (file:line), the anchor and the fix."""
    if anchors is None:
        return
    if not isinstance(anchors, dict):
        raise TaskError(f"{where}: \"anchors\" must be an object of name -> character offset, e.g. {_EXAMPLE_ANCHORS}")
    for name, offset in anchors.items():
        try:
            check_anchor_name(name)
        except TaskError as err:
            raise TaskError(f"{where}: {err}") from err
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TaskError(
                f"{where}: anchor {name!r} must be an integer character offset into the prompt, got {offset!r}; "
                f"e.g. {_EXAMPLE_ANCHORS}"
            )
        if not 0 <= offset < len(prompt):
            raise TaskError(
                f"{where}: anchor {name!r} at character {offset} is outside the prompt ({len(prompt)} characters, "
                f"offsets 0-{len(prompt) - 1}); give the 0-based offset of a character of the prompt"
            )


def jsonl_task(
    path: str | Path,
    tokenizer,
    *,
    prepend_bos: bool | None = None,
    max_tokens: int | None = None,
    name: str | None = None,
) -> Task:
    """Read a task from ``path`` (one JSON object per line; blank lines are skipped).

    Args:
        path: the ``.jsonl`` file.
        tokenizer: a Hugging Face tokenizer (the model's).
        prepend_bos: True: the tokenizer's BOS id first; False: none; None (default): BOS when the tokenizer has
            one (never a stand-in token).
        max_tokens: drop records whose prompt + answer (BOS included) has more tokens than this, counted in
            ``Task.n_dropped_too_long`` (give the model's context, as ``saecircuits run`` does).
        name: task name (default: the file's stem).

    Returns:
        A :class:`Task` with ``source_index`` = 0-based line number of each record and ``anchor_positions`` the
        records' anchors as token positions (``{}`` for a record without ``"anchors"``).

    Raises:
        TaskError: unreadable file, a line that is not a JSON object with string ``prompt`` and ``answer``, an
            empty prompt or answer, an answer that is a special-token string (e.g. the BOS string), an answer that
            is not exactly one token after its prompt (the message names the line and the tokens it became),
            ``prepend_bos=True`` without a BOS id, bad ``"anchors"`` (not an object of name -> integer character offset, an offset outside the
            prompt, a reserved name ``P``/``P-d``, two names in one token, a name on P's token), or no prompt left.
    """
    path = Path(path)
    records = read_records(path)
    try:
        bos = bos_prefix(tokenizer, prepend_bos)
    except ValueError as err:
        raise TaskError(str(err)) from err
    special = special_token_ids(tokenizer)
    special_strings = {str(t) for t in tokenizer.convert_ids_to_tokens(sorted(special))} if special else set()
    too_long = 0

    prompts: list[str] = []
    token_ids: list[list[int]] = []
    answer_ids: list[int] = []
    source_index: list[int] = []
    anchor_positions: list[dict[str, int]] = []
    for line_no, record in records:  # checked without the tokenizer (read_records); here what needs it
        where = f"{path}:{line_no + 1}"
        prompt, answer = record["prompt"], record["answer"]
        if answer.strip() in special_strings:
            raise TaskError(
                f"{where}: answer {answer!r} is the tokenizer's special token {answer.strip()!r} (BOS/EOS/PAD), "
                "not text; give an answer the model predicts as text, e.g. ' the'"
            )
        try:
            p_ids, full = encode_texts(tokenizer, [prompt, prompt + answer])
        except ValueError as err:
            raise TaskError(f"{where}: {err}") from err
        if not p_ids or full[: len(p_ids)] != p_ids or len(full) != len(p_ids) + 1:
            tail = [
                token_string(tokenizer, t) for t in (full[len(p_ids) :] if full[: len(p_ids)] == p_ids else full)
            ]
            raise TaskError(
                f"{where}: answer {answer!r} is not exactly one token after prompt {prompt[-40:]!r}: "
                + (
                    f"prompt+answer ends with {len(full) - len(p_ids)} extra token(s) {tail}"
                    if full[: len(p_ids)] == p_ids and p_ids
                    else f"the prompt's tokens are not a prefix of prompt+answer's tokens {tail}"
                )
                + "; choose an answer that is a single token in context (mind the leading space)"
            )
        if max_tokens is not None and len(bos) + len(full) > max_tokens:
            too_long += 1
            continue
        anchors = _anchor_tokens(tokenizer, bos + p_ids, prompt, record.get("anchors"), where)
        prompts.append(prompt)
        token_ids.append(bos + p_ids)
        answer_ids.append(full[-1])
        source_index.append(line_no)
        anchor_positions.append(anchors)
    if not token_ids:
        raise TaskError(
            f"task file {path} holds no prompts"
            + (f" of at most max_tokens={max_tokens} tokens ({too_long} longer ones dropped)" if too_long else "")
        )
    log_dropped(name or path.stem, too_long, max_tokens)
    return Task(
        name=name or path.stem,
        prompts=prompts,
        token_ids=token_ids,
        answer_ids=answer_ids,
        source_index=source_index,
        n_dropped_too_long=too_long,
        anchor_positions=anchor_positions,
    )


def _anchor_tokens(tokenizer, ids: list[int], prompt: str, anchors: object, where: str) -> dict[str, int]:
    """A record's ``"anchors"`` (``{name: char_offset}``, already checked by :func:`_check_anchors`) as token
    positions in ``ids`` (BOS included).

    Raises:
        TaskError: naming ``where`` (file:line), the anchor and the fix (two names in one token, a name on P).
    """
    if anchors is None:
        return {}
    owner: list[int] | None = None
    out: dict[str, int] = {}
    p = len(ids) - 1
    for name, offset in anchors.items():
        if owner is None:
            try:
                owner = char_to_token(tokenizer, ids, prompt)
            except ValueError as err:
                raise TaskError(f"{where}: {err}; remove this record's \"anchors\"") from err
        pos = owner[offset]
        piece = repr(prompt[offset])
        if pos == p:
            raise TaskError(
                f"{where}: anchor {name!r} (character {offset}, {piece}) falls in the prompt's last token, which is "
                "the prediction position P and always an anchor; point it at an earlier character"
            )
        same = [other for other, q in out.items() if q == pos]
        if same:
            raise TaskError(
                f"{where}: anchors {same[0]!r} and {name!r} fall in the same token (position {pos}); give each "
                "token at most one name"
            )
        out[name] = pos
    return out
