"""Token heat-maps as HTML: one coloured span per token, as the reference notebook's renderer draws them.

Source: analysis-spec.md F14, ``clean_print_strings_as_html`` in the reference's ``utils/haystack_utils.py``:
a positive value v gets the background rgb(255, g, g) with g = clamp(255 * (1 - v / max)); a negative value gets
rgb(r, r, 255) with r = clamp(255 * (1 + v / |max|)); the text is black if the background's luminance
(0.299 R + 0.587 G + 0.114 B) / 255 > 0.5, else white; the tooltip shows the value with 4 decimals.
Differences from the reference, on purpose: a newline is shown as the pilcrow sign and every other whitespace run
as one middle dot (the reference used "_" for both); every token string is HTML-escaped (the reference was not);
``max_value`` <= 0 or missing falls back to max |v| and an all-zero row is drawn white instead of dividing by 0.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence

__all__ = ["token_color", "visible_token", "tokens_to_html"]

PILCROW = "\u00b6"
MIDDLE_DOT = "\u00b7"
_WS_RUN = re.compile(r"[^\S\n]+")


def _clamp255(x: float) -> int:
    return int(max(0.0, min(255.0, x)))


def token_color(value: float | None, max_value: float) -> tuple[tuple[int, int, int], str]:
    """Background ``(R, G, B)`` and text colour (``"black"``/``"white"``) for one token (analysis-spec F14).

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


def visible_token(token: str) -> str:
    """The token as displayed (not yet escaped): newline -> pilcrow, any other whitespace run -> one middle dot."""
    return _WS_RUN.sub(MIDDLE_DOT, token).replace("\n", PILCROW)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"


def tokens_to_html(
    tokens: Sequence[str],
    values: Sequence[float | None],
    *,
    max_value: float | None = None,
    value_name: str = "Activation",
    extra_measures: Mapping[str, Sequence[float | None]] | None = None,
) -> str:
    """Render tokens as a ``<div class="tokens">`` of coloured spans (joined by ``<wbr>``), a tooltip per token.

    Args:
        tokens: ``[pos]`` token strings (BOS included if you want it shown). Escaped here.
        values: ``[pos]`` value per token (e.g. feature activation in SAE units); colours come from these.
        max_value: normalisation (e.g. the example's max activation); None or <= 0 -> max |values| (white if 0).
        value_name: label of the value in the tooltip (the reference used "Difference").
        extra_measures: more ``name -> [pos]`` values shown in the tooltip only.

    Raises:
        ValueError: ``values`` or an extra measure is not aligned with ``tokens``.
    """
    if len(values) != len(tokens):
        raise ValueError(
            f"tokens_to_html: {len(tokens)} tokens but {len(values)} values; they must be aligned."
        )
    extra = dict(extra_measures or {})
    for name, vs in extra.items():
        if len(vs) != len(tokens):
            raise ValueError(
                f"tokens_to_html: extra measure {name!r} has {len(vs)} values for {len(tokens)} tokens."
            )
    if max_value is None or not math.isfinite(max_value) or max_value <= 0:
        finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
        max_value = max(finite, default=0.0)
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, values, strict=True)):
        (r, g, b), text_color = token_color(v, max_value)
        title = f"{value_name}: {_fmt(v)}" + "".join(f", {name}: {_fmt(vs[i])}" for name, vs in extra.items())
        spans.append(
            f'<span class="tok" style="background-color: rgb({r}, {g}, {b}); color: {text_color}" '
            f'title="{html.escape(title, quote=True)}">{html.escape(visible_token(tok), quote=True)}</span>'
        )
    # <wbr> between spans: the tokens carry no real whitespace any more, so give the browser line-break points.
    return '<div class="tokens">' + "<wbr>".join(spans) + "</div>"
