"""The task contract: prompts, the absolute prediction position, and the answer token.

Every analysis reads a :class:`Task`. One position contract holds everywhere:
``token_ids[i]`` is the BOS-prefixed prompt *without* the answer token, ``prediction_pos[i] ==
len(token_ids[i]) - 1`` is the absolute index whose residual stream / MLP activation predicts the answer, and
``answer_ids[i]`` is the answer token. In the reference notebook's terms, P = L-2 of the prompt that still ends
with the answer, which is the last index of ``token_ids[i]`` here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


class TaskError(ValueError):
    """A task cannot be built (no matching prompts, an answer that is not one token, ...)."""


@dataclass(frozen=True)
class Task:
    """A behaviour as data.

    Attributes:
        name: short identifier, e.g. ``"closing-quote"``.
        prompts: the prompt texts, answer excluded; ``len == n_prompts``.
        token_ids: per prompt, the token ids the model sees (BOS first when the model uses one), answer excluded.
        answer_ids: per prompt, the id of the answer token that should follow ``token_ids[i]``.
        source_index: per prompt, the index of the corpus document it came from (for provenance).
        n_dropped_too_long: prompts left out because prompt + answer had more tokens than the builder's
            ``max_tokens`` (the model's context in ``saecircuits run``).
        anchor_positions: per prompt, named token positions (0-based in ``token_ids[i]``, BOS included) other than
            P, e.g. ``{"open_quote": 5, "said": 3, "last_word": 9}``; empty (the default) when the task has none.
            Read them through :meth:`anchors`, which adds ``"P"``.
    """

    name: str
    prompts: list[str]
    token_ids: list[list[int]]
    answer_ids: list[int]
    source_index: list[int] = field(default_factory=list)
    n_dropped_too_long: int = 0
    anchor_positions: list[dict[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if n == 0:
            raise TaskError(f"task {self.name!r} has no prompts; check the corpus and the task's filter")
        if len(self.prompts) != n or len(self.answer_ids) != n:
            raise TaskError(
                f"task {self.name!r}: {len(self.prompts)} prompts, {n} token lists and "
                f"{len(self.answer_ids)} answers must have the same length"
            )
        if any(len(t) == 0 for t in self.token_ids):
            raise TaskError(f"task {self.name!r} has an empty prompt")
        if self.anchor_positions and len(self.anchor_positions) != n:
            raise TaskError(
                f"task {self.name!r}: {len(self.anchor_positions)} anchor dicts for {n} prompts; give one per prompt "
                "(or none)"
            )
        for i, named in enumerate(self.anchor_positions):
            for anchor, pos in named.items():
                check_anchor_name(anchor)
                if not 0 <= pos < len(self.token_ids[i]):
                    raise TaskError(
                        f"task {self.name!r}, prompt {i}: anchor {anchor!r} at token {pos} is outside the prompt's "
                        f"{len(self.token_ids[i])} tokens"
                    )

    @property
    def n_prompts(self) -> int:
        return len(self.token_ids)

    @property
    def prediction_pos(self) -> list[int]:
        """Absolute index of the prediction position P of each prompt (= its last token)."""
        return [len(t) - 1 for t in self.token_ids]

    def anchors(self, i: int) -> dict[str, int]:
        """Named token positions of prompt ``i``, used to align positions across prompts of different lengths.

        Returns:
            ``{name: position}``, positions 0-based in ``token_ids[i]`` (BOS included); ``"P"`` (the prediction
            position, :attr:`prediction_pos`) is always present and comes first. Each position has at most one
            name: a task anchor that falls on P, or on a position an earlier anchor already names, is left out
            (e.g. the closing-quote task's ``open_quote`` when the quotation is empty and P is the quote itself).
            The circuit across positions names each node's column by these names, other positions by their
            distance from P (``"P-3"``).
        """
        out = {"P": self.prediction_pos[i]}
        taken = {out["P"]}
        for anchor, pos in (self.anchor_positions[i] if self.anchor_positions else {}).items():
            if pos not in taken:
                out[anchor] = int(pos)
                taken.add(pos)
        return out

    def __repr__(self) -> str:
        """A short summary (name, prompt count, answers, prompt lengths, the first prompt's end), not every prompt."""
        n = self.n_prompts
        answers = sorted(set(self.answer_ids))
        shown = ", ".join(str(a) for a in answers[:5]) + (f", ... ({len(answers)} ids)" if len(answers) > 5 else "")
        lengths = [len(t) for t in self.token_ids]
        span = f", {min(lengths)}-{max(lengths)} tokens" if lengths else ""
        tail = ""
        if self.prompts:
            end = self.prompts[0][-40:]
            tail = f", first prompt ends {('...' if len(self.prompts[0]) > 40 else '') + end!r}"
        dropped = f", {self.n_dropped_too_long} dropped as too long" if self.n_dropped_too_long else ""
        return f"Task({self.name!r}: {n} prompts{span}, answer ids [{shown}]{dropped}{tail})"

    __str__ = __repr__

    def subset(self, indices: list[int] | range) -> Task:
        """A task holding only the prompts at ``indices`` (in that order)."""
        idx = list(indices)
        return Task(
            name=self.name,
            prompts=[self.prompts[i] for i in idx],
            token_ids=[self.token_ids[i] for i in idx],
            answer_ids=[self.answer_ids[i] for i in idx],
            source_index=[self.source_index[i] for i in idx] if self.source_index else [],
            n_dropped_too_long=self.n_dropped_too_long,
            anchor_positions=[dict(self.anchor_positions[i]) for i in idx] if self.anchor_positions else [],
        )

    def drop_too_long(self, max_tokens: int) -> Task:
        """This task without the prompts whose tokens plus the answer exceed ``max_tokens`` (e.g. the model's
        ``n_ctx``), as ``saecircuits run`` builds it; the count is added to ``n_dropped_too_long``.

        Raises:
            TaskError: every prompt is too long.
        """
        keep = [i for i, t in enumerate(self.token_ids) if len(t) + 1 <= max_tokens]
        dropped = self.n_prompts - len(keep)
        if not keep:
            raise TaskError(
                f"task {self.name!r}: all {self.n_prompts} prompts are longer than max_tokens={max_tokens} "
                "(prompt + answer); use shorter prompts or a model with a longer context"
            )
        log_dropped(self.name, dropped, max_tokens)
        sub = self.subset(keep)
        object.__setattr__(sub, "n_dropped_too_long", self.n_dropped_too_long + dropped)
        return sub


def log_dropped(name: str, n_dropped: int, max_tokens: int | None) -> None:
    """Say (log at WARNING) how many prompts a task left out for being longer than ``max_tokens``."""
    if n_dropped:
        logger.warning(
            "task %r: %d prompt(s) longer than %s tokens (prompt + answer) were dropped", name, n_dropped, max_tokens
        )


_RESERVED_ANCHOR = re.compile(r"P(-\d+)?")


def check_anchor_name(name: object) -> None:
    """Refuse anchor names that cannot name a column of the aggregated circuit.

    Raises:
        TaskError: ``name`` is not a non-empty string, or is ``"P"`` / ``"P-<d>"`` (the names of the prediction
            position and of positions counted by their distance from P).
    """
    if not isinstance(name, str) or not name.strip():
        raise TaskError(f"anchor names must be non-empty strings, got {name!r}")
    if _RESERVED_ANCHOR.fullmatch(name):
        raise TaskError(
            f"anchor name {name!r} is reserved ('P' is the prediction position, 'P-d' the position d tokens before "
            "it); choose another name, e.g. 'subject'"
        )


def char_to_token(tokenizer, token_ids: list[int], text: str, *, pieces: list | None = None) -> list[int]:
    """For each character of ``text``, the index in ``token_ids`` of the token that contains it.

    ``token_ids`` are the prompt's tokens as the model sees them (BOS, if any, first) and ``text`` the prompt they
    encode. Each token's characters come from :func:`saecircuits.models.tokens.token_pieces` (the package's one
    token-display rule): a character split over several byte tokens belongs to the token where it starts, special
    tokens (BOS) hold no characters.

    Returns:
        ``len(text)`` token indices (non-decreasing).

    Raises:
        ValueError: the tokens do not spell ``text`` back (a tokenizer that normalizes text); the message names both.
    """
    from saecircuits.models.tokens import token_pieces

    if pieces is None:
        pieces = token_pieces(tokenizer, token_ids)
    owner: list[int] = []
    for k, piece in enumerate(pieces):
        if piece.kind != "special":
            owner.extend([k] * len(piece.text))
    spelled = "".join(p.text for p in pieces if p.kind != "special")
    if spelled != text:
        raise ValueError(
            f"the prompt's tokens spell {spelled[-60:]!r}, not the prompt {text[-60:]!r} (the tokenizer normalizes "
            "text), so character offsets cannot be mapped to tokens"
        )
    return owner
