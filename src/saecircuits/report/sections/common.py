"""What every section uses: number formatting, tables (collected for the CSV export), figures (collected for the
page's embedded data and the PNG export), and the name of the page part being drawn.

A section module computes what to show (formatted numbers, table rows, figure specs) and its template
(``assets/report/templates``) shows it; the templates escape every string, so nothing here builds HTML. Sections
read the typed results (:class:`saecircuits.results.Results` and its parts): an optional key absent from the file is
``None``; :func:`given` and :func:`has` tell apart what a plain dict did (an empty block, a key present as null).
"""

from __future__ import annotations

import contextvars
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from saecircuits.display import percent
from saecircuits.report.schema import ci_bounds
from saecircuits.results import MeanCI, OffRange, ResultsModel, SaeEntry
from saecircuits.results.top import Results

STATIC_FEATURES = 10
"""Features whose examples, details and band examples the static sections draw; the feature browser has them all."""

TOP_ROWS = 30
"""Rows of the ranked feature table and bars of its chart (every feature's effect is in the effects chart)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading the typed results
# ---------------------------------------------------------------------------------------------------------------


def typed_results(results: Results | Any) -> Results:
    """``results`` as a :class:`~saecircuits.results.Results`: a Results as it is, a dict validated once (a
    version-1 dict upgraded first).

    Raises:
        ResultsSchemaError: the dict does not match results.json schema version 2 (or 1); the message names the key.
    """
    return results if isinstance(results, Results) else Results.from_dict(results)


def given(block: ResultsModel | None) -> bool:
    """True when an optional block is in the file and not empty (``{}`` in the file shows nothing, as it did when
    the page read dicts: a model is always truthy)."""
    return block is not None and bool(block.model_fields_set)


def otherwise(value: Any, default: Any) -> Any:
    """``value``, or ``default`` when the file does not give it (for an optional key that cannot be null, as
    ``dict.get(key, default)`` read it)."""
    return default if value is None else value


def has(block: ResultsModel, key: str) -> bool:
    """True when the file gives ``key`` in ``block``, even as null (an absent optional key reads as None too)."""
    return key in block.model_fields_set


# ---------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def num(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if finite(v) else "n/a"


def pm(mean: Any, ci: Any, fmt: str = ".4f") -> str:
    """'mean ± half' for a half-width CI, 'mean [lo, hi]' for a pair, 'mean' without a CI."""
    if ci is None or not finite(mean):
        return num(mean, fmt)
    if isinstance(ci, (list, tuple)):
        return f"{num(mean, fmt)} [{num(ci[0], fmt)}, {num(ci[1], fmt)}]"
    return f"{num(mean, fmt)} \u00b1 {num(ci, fmt)}"


def mci(d: MeanCI | None, fmt: str = ".4f") -> str:
    """'mean ± half (n=..)' of a mean with its CI (``MEANCI``)."""
    if d is None:
        return "n/a"
    return pm(d.mean, d.ci95, fmt) + (f" (n={d.n})" if d.n is not None else "")


def ratio(block: ResultsModel, key: str) -> str:
    """A loss recovered (``key`` of an SAE entry or its whole_sequence) with its interval, or 'undefined: reason'
    (never an interval for an undefined value)."""
    value = getattr(block, key)
    if not finite(value):
        reason = getattr(block, f"{key}_undefined_reason")
        return f"undefined: {reason}" if reason else "n/a"
    return pm(value, getattr(block, f"{key}_ci95"), ".3f")


def seq_ratio(sae: SaeEntry) -> str:
    """The whole-sequence loss recovered with its interval, 'undefined: reason', or 'n/a' (not computed)."""
    return ratio(sae.whole_sequence, "loss_recovered") if sae.whole_sequence is not None else "n/a"


def sorted_features(sae: SaeEntry) -> list:
    """The SAE's top features (``TopFeature``), largest loss increase first (undefined ones last)."""
    return sorted(sae.top_features, key=lambda t: -t.loss_increase if finite(t.loss_increase) else math.inf)


OFF_RANGE_UNDEFINED = (
    "Off-range counts: undefined for this hook (it has no bounded range, e.g. a gated MLP, so an edited "
    "activation cannot leave it)."
)
"""Said once per SAE (report/sections/study.py ``study_parts``): the floor is a property of the hook, so every
off-range count of the SAE is undefined together."""


def off_range_undefined(off: OffRange | None) -> bool:
    """Whether ``off`` was recorded but has no counts (its hook has no bounded range)."""
    return off is not None and off.n_with_off_range is None


def off_range_text(off: OffRange | None) -> str:
    """One sentence on ablated activations below the hook's range; "" when not recorded or undefined (the
    undefined case is :data:`OFF_RANGE_UNDEFINED`, said once per SAE)."""
    if off is None or off_range_undefined(off):
        return ""
    frac = off.fraction_with_off_range
    entries = off.n_off_range_entries if has(off, "n_off_range_entries") else 0
    return (
        f"{off.n_with_off_range} of {off.n_ablations} edited activation vectors "
        f"({percent(frac, 1)}) have entries below "
        f"the activation function's minimum {num(off.floor, '.4f')} ({entries} "
        f"entries, on average {num(off.mean_depth, '.3f')} below it; lowest value {num(off.min_value, '.3f')}): "
        "states the model never produces."
    )


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A table cell that is a link within the page (the template writes ``<a href>``, escaped)."""

    href: str
    text: str


@dataclass
class Table:
    """A table as the template ``macros.html.j2`` draws it: ``headers`` None means no header row; ``left`` the
    left-aligned columns; ``row_classes`` a CSS class per row ("" for none). Cells are shown as text (escaped)."""

    headers: list[Any] | None
    rows: list[list[Any]]
    left: frozenset[int]
    row_classes: list[str] | None = None


class TableSink:
    """Every table of a page as ``(name, headers, rows)``, for the CSV export; ``where`` names the current section."""

    def __init__(self) -> None:
        self.where = "header"
        self.tables: list[tuple[str, list[str] | None, list[list[Any]]]] = []

    def append(self, headers: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> None:
        n = sum(1 for name, _, _ in self.tables if name.startswith(self.where + "-")) + 1
        self.tables.append((f"{self.where}-{n}", list(headers) if headers is not None else None,
                            [list(r) for r in rows]))


TABLES: contextvars.ContextVar[TableSink | None] = contextvars.ContextVar("saecircuits_report_tables", default=None)


def table(
    headers: Sequence[Any] | None,
    rows: Sequence[Sequence[Any]],
    *,
    left_cols: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
    plain: Sequence[Sequence[Any]] | None = None,
) -> Table:
    """A table for a template, recorded (in page order) for the CSV export; ``plain`` is the table as text when
    some cells are not (:class:`Link`)."""
    sink = TABLES.get()
    if sink is not None:
        sink.append(headers, plain if plain is not None else rows)
    return Table(list(headers) if headers is not None else None, [list(r) for r in rows], frozenset(left_cols),
                 list(row_classes) if row_classes else None)


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def plotly_text(s: Any) -> str:
    """A string for a plotly label, title or hover text: HTML-escaped, because plotly.js renders a subset of HTML
    in them (the page's templates escape what they show themselves; this is for the figures' JSON only)."""
    return html.escape(str(s), quote=True)


def nulls(vs: Sequence[Any]) -> list:
    return [v if finite(v) else None for v in vs]


def error_bars(means: Sequence[Any], cis: Sequence[Any] | None) -> dict | None:
    """plotly ``error_y`` for CIs given per bar as half-widths or [lo, hi] pairs (None where missing)."""
    if cis is None or all(c is None for c in cis):
        return None
    if not any(isinstance(c, (list, tuple)) for c in cis):  # all half-widths: symmetric bars
        return dict(type="data", array=nulls(cis), visible=True)
    plus, minus = [], []
    for m, c in zip(means, cis, strict=True):
        lo, hi = ci_bounds(m, c)
        plus.append(hi - m if finite(hi) and finite(m) else None)
        minus.append(m - lo if finite(lo) and finite(m) else None)
    return dict(type="data", symmetric=False, array=plus, arrayminus=minus, visible=True)


@dataclass(frozen=True)
class Plot:
    """Where a figure goes on the page: an empty ``<div class="plot">`` (``macros.html.j2``) that the page's script
    (``assets/report/page.js``) draws from the embedded figure ``id`` when it scrolls into view."""

    id: str
    height: int


PAGE_TEMPLATE = "plotly_white"
"""The plotly template of every figure: embedded once in the page (:meth:`Figures.payload`), put into each figure
only when it is drawn to a PNG (:func:`with_page_template`; setting it on every figure cost a validation of the
whole template per figure, about a third of building the page)."""


def page_template() -> dict:
    """:data:`PAGE_TEMPLATE` as plotly JSON (the ``layout.template`` value)."""
    return json.loads(pio.to_json(go.Figure(layout={"template": PAGE_TEMPLATE}), validate=False))["layout"][
        "template"]


def with_page_template(fig: go.Figure, template: dict | None = None) -> str:
    """``fig.to_json()`` with the page's template (``template``: :func:`page_template`, computed when None) in its
    layout: the figure as the page draws it, for the PNG export."""
    spec = json.loads(fig.to_json())
    spec.setdefault("layout", {})["template"] = page_template() if template is None else template
    return json.dumps(spec)


class Figures:
    """Collects plotly figures; each becomes a :class:`Plot` on the page. The figures' JSON is embedded once
    (:meth:`payload`), their shared template once, and plotly.js once in the page head."""

    def __init__(self) -> None:
        self.n = 0
        self.where = "header"  # the page part being drawn (SAE and hook, feature): part of the exported file name
        self.specs: dict[str, dict] = {}
        self.figures: list[tuple[str, go.Figure]] = []  # (where, figure) for the PNG export
        self.trace_types: set[str] = set()

    def __call__(self, fig: go.Figure, *, height: int = 380) -> Plot:
        self.n += 1
        div_id = f"fig{self.n}"
        fig.update_layout(height=height, margin=dict(l=60, r=20, t=50, b=60))  # the template: see PAGE_TEMPLATE
        spec = json.loads(pio.to_json(fig, validate=False))
        spec["layout"].pop("template", None)  # the page sets the one shared template
        self.specs[div_id] = {"data": spec.get("data", []), "layout": spec["layout"]}
        self.figures.append((self.where, fig))
        self.trace_types.update(str(t.get("type", "scatter")) for t in spec.get("data", []))
        return Plot(div_id, int(height))

    def payload(self) -> dict:
        return {"template": page_template(), "figs": self.specs}


def set_where(fig: Figures, where: str) -> str:
    """Name the page part being drawn (e.g. ``sae-0-blocks-0-mlp-hook_post-f12``) for the exported figures and
    tables, so a PNG or CSV says which SAE and feature it shows; returns the previous name (to restore)."""
    before = fig.where
    fig.where = where
    sink = TABLES.get()
    if sink is not None:
        sink.where = where
    return before
