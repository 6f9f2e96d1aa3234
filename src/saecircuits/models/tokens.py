"""Tokens: encoding text as the model sees it, batching with right padding, special tokens, and token display.

Right padding never changes a result for a causal model with absolute or rotary positions: position p of row b
attends only to positions <= p of the same row, so everything at or before the row's last real token is identical
to the unpadded forward pass. Analyses therefore read each row at its own prediction index (a gather), never at -1.

One place for each token rule, used by every stage:

- :func:`encode_texts` / :func:`encode_documents`: text is encoded as plain characters (``<|endoftext|>`` or ``<s>``
  inside a story never becomes a special id), with the BOS policy of :func:`bos_prefix`.
- :func:`special_token_ids` / :func:`special_token_mask`: BOS/EOS/PAD positions, anywhere in a row, are masked out
  of every statistic over corpus tokens (top examples, mean activations, token counts, DFA means, SAE training
  activations when BOS is excluded).
- :func:`check_context`: rows longer than the model's context raise :class:`ContextLengthError` naming the limit.
- :func:`token_pieces` / :func:`token_string`: the strings shown to people (report, results.json, console).
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch


def pad_right(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length token lists into one right-padded batch.

    Args:
        token_ids: ``n`` lists of token ids (each non-empty).
        pad_id: id written into the padding (its value never matters for the real positions).

    Returns:
        tokens: int64 ``[n, max_len]``.
        lengths: int64 ``[n]``, the number of real tokens per row.
    """
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    tokens = torch.full((len(token_ids), int(lengths.max())), pad_id, dtype=torch.long)
    for i, t in enumerate(token_ids):
        tokens[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    return tokens, lengths


def batches_by_length(
    token_ids: Sequence[Sequence[int]], max_tokens: int = 16384, max_batch: int = 64
) -> Iterator[list[int]]:
    """Yield lists of row indices whose padded batch holds at most ``max_tokens`` tokens.

    Rows are grouped by length (longest first) so padding waste stays small; each index appears exactly once.
    Callers scatter results back with the yielded indices, so the output order is the input order.
    """
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    batch: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, len(token_ids[i]))
        if batch and (new_width * (len(batch) + 1) > max_tokens or len(batch) >= max_batch):
            yield batch
            batch, new_width = [], len(token_ids[i])
        batch.append(i)
        width = new_width
    if batch:
        yield batch


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick one position per row: ``x[b, positions[b]]``.

    Args:
        x: ``[batch, pos, ...]``.
        positions: int64 ``[batch]``, absolute indices.

    Returns:
        ``[batch, ...]``.
    """
    return x[torch.arange(x.shape[0], device=x.device), positions.to(x.device)]


def encode_documents(
    tokenizer, documents: Sequence[str], *, max_len: int | None = None, prepend_bos: bool | None = None
) -> list[list[int]]:
    """Tokenize documents as the model sees them: the BOS prefix (:func:`bos_prefix`) + the text's tokens, cut to
    ``max_len`` tokens.

    The text is encoded as plain characters in one batched call (:func:`encode_texts`), which matches
    ``bridge.to_tokens`` on text without special-token strings (see tasks/closing_quote.py). Empty documents are
    kept (as the bare prefix) so indices stay aligned.

    Args:
        tokenizer: a Hugging Face tokenizer.
        documents: ``n`` texts.
        max_len: cut each row to this many tokens (e.g. the model's ``n_ctx``); None keeps everything.
        prepend_bos: True / False / None (BOS when the tokenizer has one); see :func:`bos_prefix`.

    Returns:
        ``n`` token id lists.

    Raises:
        ValueError: ``prepend_bos=True`` but the tokenizer has no BOS id; see also :func:`encode_texts`.
    """
    bos = bos_prefix(tokenizer, prepend_bos)
    out = [bos + ids for ids in encode_texts(tokenizer, documents)]
    if max_len is not None:
        out = [ids[:max_len] for ids in out]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Special tokens, plain-text encoding and the context limit


class ContextLengthError(ValueError):
    """Token rows are longer than the model's context (``n_ctx``); the message names the limit and the fix."""


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids that are never text: BOS, EOS, PAD and every other token the tokenizer registers as special.

    The unknown token counts only when it shares its id with BOS, EOS or PAD (as in GPT-2 BPE, where all four are
    ``<|endoftext|>``, or llama2.c, where PAD = UNK = 0): a tokenizer without byte fallback produces UNK for real
    characters, which are data. (A model loaded from a tokenizer without PAD gets TransformerLens' stand-in PAD,
    which is the UNK id when the vocabulary lacks ``<|endoftext|>``; its UNK positions then count as special.)

    Args:
        tokenizer: a Hugging Face tokenizer, or None (no special ids).

    Returns:
        frozenset of int ids (empty for None).
    """
    if tokenizer is None:
        return frozenset()
    core = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    core = {int(i) for i in core if i is not None}
    ids = set(core)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    ids |= {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and int(unk) not in core:
        ids.discard(int(unk))
    return frozenset(ids)


def special_token_mask(tokens: torch.Tensor, special_ids: Collection[int] | int | None) -> torch.Tensor:
    """Where ``tokens`` hold a special id (BOS/EOS/PAD/...), anywhere in the row, not only at index 0.

    Args:
        tokens: int ``[...]`` token ids.
        special_ids: from :func:`special_token_ids` (or one id, or None for none).

    Returns:
        bool tensor shaped like ``tokens``; True at special positions.
    """
    if special_ids is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    ids = [int(special_ids)] if isinstance(special_ids, int) else sorted(int(i) for i in special_ids)
    if not ids:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))


def bos_prefix(tokenizer, prepend_bos: bool | None = None) -> list[int]:
    """The BOS policy as a prefix: ``[bos_id]`` or ``[]``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prepend_bos: True: the tokenizer's BOS must exist; False: none; None: BOS when the tokenizer has one (a
            tokenizer without BOS gets nothing, never a stand-in such as the unknown token).

    Raises:
        ValueError: ``prepend_bos=True`` and the tokenizer has no BOS id.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is False or (prepend_bos is None and bos is None):
        return []
    if bos is None:
        raise ValueError(
            "prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=None (BOS when the tokenizer "
            "has one) or prepend_bos=False"
        )
    return [int(bos)]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as plain characters: no BOS/EOS added, and special-token strings in the text
    (``<|endoftext|>``, ``<s>``) encoded as the characters they are, never as special ids.

    This is what llama2.c's ``run.c`` ``encode`` does (it looks every character up in the vocabulary, so ``<s>``
    inside a story is ``<``, ``s``, ``>``); Hugging Face tokenizers match added special tokens inside text unless
    called with ``split_special_tokens=True``, which is used here.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: ``n`` strings.

    Returns:
        ``n`` lists of token ids.

    Raises:
        ValueError: the tokenizer still produced a special id (a tokenizer that ignores ``split_special_tokens``);
            remove the special-token strings from the text.
    """
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special = special_token_ids(tokenizer)
    for text, ids in zip(texts, encoded, strict=True):
        hit = special.intersection(ids)
        if hit:
            raise ValueError(
                f"the tokenizer turned text into special token id(s) {sorted(hit)} "
                f"({tokenizer.convert_ids_to_tokens(sorted(hit))}) in {text[:60]!r}; this tokenizer does not "
                "support split_special_tokens, so remove special-token strings from the text"
            )
    return [list(ids) for ids in encoded]


def check_context(token_rows: Sequence[Sequence[int]], n_ctx: int | None, what: str = "token row") -> None:
    """Raise a clear error when a row is longer than the model's context (positions beyond ``n_ctx`` do not exist).

    Args:
        token_rows: ``n`` token lists.
        n_ctx: the model's context length (None: no check).
        what: ``"task prompt"`` (the fix named is the task's ``max_tokens``) or anything else (corpus rows: the fix
            named is ``encode_documents(max_len=...)``).

    Raises:
        ContextLengthError: naming how many rows are too long, the longest, the limit and the fix.
    """
    if n_ctx is None:
        return
    too_long = [i for i, row in enumerate(token_rows) if len(row) > n_ctx]
    if not too_long:
        return
    longest = max(len(token_rows[i]) for i in too_long)
    if what == "task prompt":
        fix = (
            f"build the task with max_tokens={n_ctx} or call task.drop_too_long({n_ctx}): over-long prompts are "
            "then dropped and counted (task.n_dropped_too_long), as `saecircuits run` does"
        )
    else:
        fix = f"cut the rows to the context, e.g. encode_documents(..., max_len={n_ctx}), as `saecircuits run` does"
    raise ContextLengthError(
        f"{len(too_long)} of {len(token_rows)} {what}s are longer than the model's context of {n_ctx} tokens "
        f"(first: index {too_long[0]}, longest: {longest} tokens); {fix}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Token strings shown to people


TOKEN_KINDS: tuple[str, ...] = ("text", "continuation", "special")
"""``"text"``: the piece shows the characters this token starts. ``"continuation"``: the token only holds the
remaining bytes of a character shown on an earlier piece (its text is ``""``). ``"special"``: BOS/EOS/PAD or another
special token, shown by its name (e.g. ``<|endoftext|>``); never text, never data."""

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_KNOWN_DECODERS = {"ByteLevel", "ByteFallback", "Fuse", "Strip", "Replace", "Metaspace"}


@dataclass(frozen=True)
class TokenPiece:
    """How one token is shown: ``text`` (not escaped; whitespace as is) and its ``kind`` (:data:`TOKEN_KINDS`)."""

    text: str
    kind: str = "text"


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in character of each byte -> the byte.

    Source: ``bytes_to_unicode`` of OpenAI's GPT-2 ``encoder.py`` (the same table as ``tokenizers``'
    ``ByteLevel.alphabet()``): printable Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100...
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_steps(tokenizer) -> list[dict] | None:
    """The fast tokenizer's decoder as a list of steps (``{"type": ...}``), or None when it is not one we can read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return None
    try:
        state = json.loads(decoder.__getstate__())
    except (TypeError, ValueError, AttributeError):
        return None
    steps = state.get("decoders", []) if state.get("type") == "Sequence" else [state]
    if any(s.get("type") not in _KNOWN_DECODERS for s in steps):
        return None
    if any(s.get("type") == "Replace" and "String" not in (s.get("pattern") or {}) for s in steps):
        return None
    return steps


def _token_bytes(tokenizer, ids: Sequence[int], special: frozenset[int]) -> list[bytes | None]:
    """The bytes each token contributes to the text (None for a special token), read from the vocabulary.

    Byte-level BPE (GPT-2): the piece's characters mapped back through :func:`_byte_level_chars`. SentencePiece-style
    (Llama, llama2.c): ``<0xXX>`` byte-fallback pieces are that byte; ``Replace``/``Metaspace`` decoders turn ``▁``
    into a space. Added non-special tokens are their own text. A decoder of another kind falls back to decoding the
    token alone (lossy for partial characters).
    """
    steps = _decoder_steps(tokenizer)
    types = {s.get("type") for s in steps or []}
    added = {
        int(i): tok.content
        for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        if not getattr(tok, "special", False)
    }
    strings = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    table = _byte_level_chars()
    out: list[bytes | None] = []
    for i, s in zip(ids, strings, strict=True):
        i = int(i)
        if i in special:
            out.append(None)
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif steps is None or s is None:
            out.append(tokenizer.decode([i], clean_up_tokenization_spaces=False).encode("utf-8"))
        elif "ByteFallback" in types and (m := _BYTE_PIECE.fullmatch(s)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            for step in steps:
                if step["type"] == "Replace":
                    s = s.replace(step["pattern"]["String"], step["content"])
                elif step["type"] == "Metaspace":
                    s = s.replace(step.get("replacement", "\u2581"), " ")
            if "ByteLevel" in types:
                out.append(b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in s))
            else:
                out.append(s.encode("utf-8"))
    return out


def _adds_dummy_prefix(tokenizer, special: frozenset[int]) -> bool:
    """True when the tokenizer puts a space before the text (SentencePiece's dummy prefix; llama2.c, Llama)."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    raw = _token_bytes(tokenizer, ids[:1], special) if ids else []
    return bool(raw and raw[0] is not None and raw[0].startswith(b" "))


def _show_bytes(raw: bytes) -> str:
    """``raw`` as text; bytes that are not part of a complete UTF-8 character are written ``<0xXX>``."""
    out = []
    while raw:
        try:
            out.append(raw.decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            out.append(raw[: err.start].decode("utf-8"))
            out.append("".join(f"<0x{b:02X}>" for b in raw[err.start : err.end]))
            raw = raw[err.end :]
    return "".join(out)


def token_pieces(tokenizer, ids: Sequence[int], *, text_start: bool = True) -> list[TokenPiece]:
    """How each token of a token sequence is shown to people: the one token-display function of the package.

    The pieces of a text concatenate back to its decoded text: ``"".join(p.text for p in pieces if p.kind !=
    "special") == tokenizer.decode(ids, skip_special_tokens=True)`` for ids that start a text (for byte-level BPE
    and SentencePiece-style tokenizers; one with another decoder, e.g. word-level without a decoder, falls back to
    decoding each token alone). Each token's bytes
    are read from the vocabulary (not by decoding it alone, which turns half a character into U+FFFD and drops a
    SentencePiece token's leading space), then grouped into UTF-8 characters: a character split over several byte
    tokens is shown once, on the piece where it starts, and a token left with no character of its own is a
    ``"continuation"`` piece (text ``""``). Bytes that never complete a character become U+FFFD, as in ``decode``.
    Special tokens (BOS/EOS/PAD) are ``"special"`` pieces named by their token string.

    A tokenizer that adds a dummy-prefix space (SentencePiece, llama2.c) loses that one space on the first token of
    the text and on the token after each BOS, as llama2.c's ``run.c`` ``decode`` does; every other token keeps its
    leading space (``Spot saw`` is ``Spot``, `` saw``, not ``Spotsaw``).

    Args:
        tokenizer: a Hugging Face tokenizer.
        ids: ``[n]`` token ids (BOS included if present).
        text_start: ``ids[0]`` starts the text (False for a window cut from the middle of a document).

    Returns:
        ``n`` :class:`TokenPiece`, aligned with ``ids``.
    """
    ids = [int(i) for i in ids]
    special = special_token_ids(tokenizer)
    raw = _token_bytes(tokenizer, ids, special)
    texts = [""] * len(ids)
    fed_earlier = [False] * len(ids)  # the token completed (part of) a character that started on an earlier token
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    owner = -1  # while bytes are pending: the token on which their character started

    def pending() -> bool:
        return bool(decoder.getstate()[0])

    for i, b in enumerate(raw):
        if b is None:  # a special token ends any unfinished character (shown as U+FFFD, as decode does)
            if pending():
                texts[owner] += decoder.decode(b"", final=True)
            decoder.reset()
            texts[i] = str(tokenizer.convert_ids_to_tokens(ids[i]))
            continue
        if b.isascii() and not pending():  # each byte is a whole character: nothing pends, no owner changes
            texts[i] += b.decode("ascii")
            continue
        for byte in b:
            was_pending = pending()
            text = decoder.decode(bytes([byte]))
            if was_pending:
                fed_earlier[i] |= owner != i
                if text:  # the first character out is the pending one (complete, or U+FFFD if cut short)
                    texts[owner] += text[0]
                    text = text[1:]
            texts[i] += text
            if decoder.getstate()[0] == bytes([byte]):  # a new character starts at this byte
                owner = i
    if pending():
        texts[owner] += decoder.decode(b"", final=True)
    kinds = [
        "special" if b is None else "continuation" if (fed_earlier[i] and not texts[i]) else "text"
        for i, b in enumerate(raw)
    ]
    if _adds_dummy_prefix(tokenizer, special):
        bos = getattr(tokenizer, "bos_token_id", None)
        for i in range(len(ids)):
            starts = (i == 0 and text_start) or (i > 0 and bos is not None and ids[i - 1] == int(bos))
            if starts and kinds[i] == "text" and texts[i].startswith(" "):
                texts[i] = texts[i][1:]
    return [TokenPiece(t, k) for t, k in zip(texts, kinds, strict=True)]


def token_string(tokenizer, token_id: int) -> str:
    """One token shown on its own (answer tokens, logit boosts, console lines), leading space kept.

    The token's own bytes (see :func:`token_pieces`); bytes that are only part of a character are written ``<0xXX>``
    (e.g. the last byte of an emoji); a special token is its name. So `` "`` (llama2.c id 313) and ``"`` (436) stay
    different, and ``str(token_id)`` is returned when there is no tokenizer.
    """
    if tokenizer is None:
        return str(int(token_id))
    special = special_token_ids(tokenizer)
    (raw,) = _token_bytes(tokenizer, [int(token_id)], special)
    if raw is None:
        return str(tokenizer.convert_ids_to_tokens(int(token_id)))
    return _show_bytes(raw)
