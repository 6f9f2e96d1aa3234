"""Token heat-maps as HTML: one coloured span per token, as the reference notebook's renderer draws them.

Source: ``clean_print_strings_as_html`` in ``utils/haystack_utils.py`` of the reference notebook's repository:
a positive value v gets the background rgb(255, g, g) with g = clamp(255 * (1 - v / max)); a negative value gets
rgb(r, r, 255) with r = clamp(255 * (1 + v / |max|)); the text is black if the background's luminance
(0.299 R + 0.587 G + 0.114 B) / 255 > 0.5, else white; the tooltip shows the value with 4 decimals.

The token strings are ``saecircuits.models.tokens.token_pieces`` (leading spaces kept; a character split over byte
tokens shown once, its other pieces ``"continuation"``). Differences from the reference, on purpose:

- whitespace is visible character by character (the reference turned each whitespace run into one ``_``): a space
  is a middle dot, a tab a right arrow, a newline the pilcrow sign, other whitespace a middle dot, and invisible
  control/format characters (zero-width joiner, bidi overrides) are written ``<U+XXXX>``;
- every token string is HTML-escaped (the reference was not);
- a special token (BOS/EOS/PAD) is drawn as a grey dashed box, never coloured by a value; a continuation piece is a
  narrow box coloured by its value;
- a blank token (whitespace only, or a text token that shows no text at all, such as SentencePiece's lone space
  token at the start of a text, whose dummy-prefix space is not part of the text) is drawn as a marked box at least
  one character wide (class ``ws``: a grey inset outline) with a tooltip saying what it is; an empty one shows
  :data:`EMPTY_MARK`. Without this, stories260K's lone space token (id 410, 46 of the first 1,000 validation
  stories start with it) was an empty span 2 px wide whose colour and tooltip could not be seen;
- each token is its own bidi island (``unicode-bidi: isolate`` in a left-to-right row), so right-to-left text cannot
  reorder the row, and a very long token wraps inside the row instead of widening the page (the CSS is
  :data:`TOKENS_CSS`);
- ``max_value`` <= 0 or missing falls back to max |v| and an all-zero row is drawn white instead of dividing by 0.
"""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Mapping, Sequence

__all__ = ["TOKENS_CSS", "EMPTY_MARK", "blank_token_note", "token_color", "visible_token", "visible_text",
           "token_html", "tokens_to_html"]

PILCROW = "\u00b6"
MIDDLE_DOT = "\u00b7"
TAB_ARROW = "\u2192"
#: what a text token that shows no text at all is drawn as (the empty set sign)
EMPTY_MARK = "\u2205"

TOKENS_CSS = """
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.9;
          border: 1px solid #e3e3e3; padding: 6px; margin: 4px 0 12px; overflow-wrap: anywhere; }
.tokens span.tok, .tokstr { padding: 2px 1px; unicode-bidi: isolate; overflow-wrap: anywhere; }
.tokens span.tok.special { color: #777; background: #f4f4f4; border: 1px dashed #999; font-size: 11px; }
.tokens span.tok.cont::after { content: "\\00a0"; }
.tokens span.tok.ws, .tokstr.ws { display: inline-block; min-width: 1ch; text-align: center; padding: 0 2px;
          box-shadow: inset 0 0 0 1px #8a8a8a; border-radius: 2px; }
"""
"""CSS for :func:`tokens_to_html` and :func:`token_html` (the report puts it in its ``<style>``)."""


def _clamp255(x: float) -> int:
    return int(max(0.0, min(255.0, x)))


def token_color(value: float | None, max_value: float) -> tuple[tuple[int, int, int], str]:
    """Background ``(R, G, B)`` and text colour (``"black"``/``"white"``) for one token, as the reference notebook's renderer.

    Args:
        value: the token's value (e.g. a feature activation); None/NaN is drawn white.
        max_value: normalisation, > 0; positive and negative values are both divided by it.
    """
    if value is None or not math.isfinite(value) or max_value <= 0:
        r = g = b = 255
    elif value < 0:
        r = g = _clamp255(255 * (1 + value / abs(max_value)))
        b = 255
    else:
        r = 255
        g = b = _clamp255(255 * (1 - value / max_value))
    luminance = (0.299 * r + 0.587 * g + 0.114 * b) / 255
    return (r, g, b), ("black" if luminance > 0.5 else "white")


def _visible_char(c: str) -> str:
    if c == "\n":
        return PILCROW
    if c == "\t":
        return TAB_ARROW
    if c.isspace():
        return MIDDLE_DOT
    if unicodedata.category(c) in ("Cc", "Cf"):
        return f"<U+{ord(c):04X}>"
    return c


def visible_token(token: str) -> str:
    """The token as displayed (not yet escaped): each whitespace character visible (space and other whitespace ->
    middle dot, tab -> right arrow, newline -> pilcrow) and invisible control/format characters as ``<U+XXXX>``."""
    return "".join(_visible_char(c) for c in token)


def visible_text(text: str) -> str:
    """Running text as displayed (not yet escaped): whitespace kept as is, but invisible control/format characters
    (bidi overrides, zero-width joiners, ...) written ``<U+XXXX>``, so a right-to-left override inside a prompt
    cannot reverse the rest of the line."""
    return "".join(c if c in "\n\t" or c.isspace() else _visible_char(c) for c in text)


def blank_token_note(token: str) -> str | None:
    """Why a text token needs a marked box: a note for its tooltip when it is whitespace only or empty, else None.

    (A continuation piece is also ``""``; it is not a text token and has its own box.)"""
    if token == "":
        return "shows no text here (e.g. the lone space token at the start of a text, whose space is not part of it)"
    if token.isspace():
        return "whitespace only"
    return None


def _shown(token: str) -> str:
    """The token as drawn in a box: visible whitespace, :data:`EMPTY_MARK` when it shows no text (not escaped)."""
    return visible_token(token) or EMPTY_MARK


def token_html(token: str) -> str:
    """One token string for running HTML (answer tokens, tables): visible whitespace, escaped, its own bidi island;
    a blank token (:func:`blank_token_note`) in a marked box with the note as its tooltip."""
    note = blank_token_note(token)
    if note is None:
        return f'<bdi class="tokstr">{html.escape(visible_token(token), quote=True)}</bdi>'
    return (f'<bdi class="tokstr ws" title="{html.escape(note, quote=True)}">'
            f"{html.escape(_shown(token), quote=True)}</bdi>")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"


def tokens_to_html(
    tokens: Sequence[str],
    values: Sequence[float | None],
    *,
    max_value: float | None = None,
    value_name: str = "Activation",
    extra_measures: Mapping[str, Sequence[float | None]] | None = None,
    kinds: Sequence[str] | None = None,
) -> str:
    """Render tokens as a ``<div class="tokens">`` of coloured spans (joined by ``<wbr>``), a tooltip per token.

    Args:
        tokens: ``[pos]`` token strings (``models.tokens.token_pieces``; BOS included if you want it shown). Escaped
            here.
        values: ``[pos]`` value per token (e.g. feature activation in SAE units); colours come from these.
        max_value: normalisation (e.g. the example's max activation); None or <= 0 -> max |values| of the non-special
            tokens (white if 0).
        value_name: label of the value in the tooltip (the reference used "Difference").
        extra_measures: more ``name -> [pos]`` values shown in the tooltip only.
        kinds: ``[pos]`` ``"text"``/``"continuation"``/``"special"`` (``models.tokens.TOKEN_KINDS``); None: all text.
            A special token is drawn marked and uncoloured whatever its value.

    Raises:
        ValueError: ``values``, ``kinds`` or an extra measure is not aligned with ``tokens``.
    """
    if len(values) != len(tokens):
        raise ValueError(
            f"tokens_to_html: {len(tokens)} tokens but {len(values)} values; they must be aligned."
        )
    kinds = list(kinds) if kinds is not None else ["text"] * len(tokens)
    if len(kinds) != len(tokens):
        raise ValueError(f"tokens_to_html: {len(tokens)} tokens but {len(kinds)} token kinds; they must be aligned.")
    extra = dict(extra_measures or {})
    for name, vs in extra.items():
        if len(vs) != len(tokens):
            raise ValueError(
                f"tokens_to_html: extra measure {name!r} has {len(vs)} values for {len(tokens)} tokens."
            )
    if max_value is None or not math.isfinite(max_value) or max_value <= 0:
        finite = [
            abs(v) for v, k in zip(values, kinds, strict=True) if k != "special" and v is not None and math.isfinite(v)
        ]
        max_value = max(finite, default=0.0)
    spans = []
    for i, (tok, v, kind) in enumerate(zip(tokens, values, kinds, strict=True)):
        if kind == "special":
            title = "special token (BOS/EOS/PAD): not text, left out of the statistics"
            spans.append(
                f'<span class="tok special" title="{html.escape(title, quote=True)}">'
                f"{html.escape(visible_token(tok), quote=True)}</span>"
            )
            continue
        (r, g, b), text_color = token_color(v, max_value)
        title = f"{value_name}: {_fmt(v)}" + "".join(f", {name}: {_fmt(vs[i])}" for name, vs in extra.items())
        cls, shown = "tok", visible_token(tok)
        note = blank_token_note(tok) if kind != "continuation" else None
        if kind == "continuation":
            title += " (more bytes of the character on the previous token)"
            cls = "tok cont"
        elif note is not None:
            title += f" ({note})"
            cls, shown = "tok ws", _shown(tok)
        spans.append(
            f'<span class="{cls}" style="background-color: rgb({r}, {g}, {b}); color: {text_color}" '
            f'title="{html.escape(title, quote=True)}">{html.escape(shown, quote=True)}</span>'
        )
    # <wbr> between spans: the tokens carry no real whitespace any more, so give the browser line-break points.
    return '<div class="tokens" dir="ltr">' + "<wbr>".join(spans) + "</div>"
