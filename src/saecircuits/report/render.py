"""One self-contained HTML page from the typed results (:class:`saecircuits.results.Results`; a results dict,
results.json schema version 2 or 1, is validated into it once).

The page reads saved evidence only (no torch, no model), so ``saecircuits report results.json`` re-renders it.
plotly.js is inlined once in ``<head>`` (the smallest bundle that draws every figure, :func:`plotly_bundle`); every
figure is an empty ``<div class="plot">`` whose JSON sits, with the others, in one embedded data element, and the
page's own script (``assets/report/page.js``) draws it when it scrolls into view. The feature browser's data
(:mod:`saecircuits.report.browser`) is embedded once too, compressed when large, and its cards are built in the
page.

The page is Jinja2 templates (``assets/report/templates``: ``base.html.j2`` the layout, ``report.html.j2`` the
report, one template per section) with autoescaping on, so every string from the data is HTML-escaped by default;
only fragments built by trusted code are marked safe (the inlined scripts, the embedded JSON with every ``<``
written ``\\u003c``, the token heat-maps of :mod:`saecircuits.report.tokens_html`, which escape every token). The
section modules (:mod:`saecircuits.report.sections`) compute what each part shows: formatted numbers, table rows,
figure specs (whose labels are HTML-escaped for plotly, which renders HTML in them); they read the typed models'
attributes, never dict keys.

Layout (:func:`build_report`): title; summary (headline in plain words, checks, loss recovered per SAE, top features
with a reading, circuit; :mod:`saecircuits.report.summary`); glossary; feature browser; the run (model, task,
answer tokens, the BOS policy, example prompts each with its own answer highlighted); then collapsible sections:
the checks (whether the model performs the behaviour, every failed check with what to try; an SAE that fails one
also carries a warning box over its summary and its feature ranking);
direct logit attribution (Elhage et al. 2021) with CIs and the completeness error; per SAE: summary table (L0 and
explained variance at P, losses, loss recovered vs zero and vs mean ablation, with CIs; a sentence where a value
surprises; the SAE's training quality over tokens), the top features by loss increase when ablated with the SAE
error kept (the reference notebook's single-feature ablation table) as a table and a chart, the exact effect of every
active feature, the multi-feature ablation (original - ablated) and how its set was chosen, the top activating
examples per feature (the notebook's token colours, see ``tokens_html.py``); when present, the SAE-error DLA,
per-feature details (prompt-based log-prob and weight-based logit boosts, activation vs loss increase, direct
feature attribution), the upstream ablation and the activation-scaled DLA; the rest
of the reference study when present (corpus statistics, the five-way loss comparison, the three ablation modes,
ablation on max-activating stories, co-occurrence and decoder geometry, the span ablation); the layer comparison;
the circuit; appendix (training, timings, config, notes). Static sections draw the first :data:`STATIC_FEATURES`
features; the browser has every one.
"""

from __future__ import annotations

import functools
import html
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from saecircuits.report.browser import browser_payload, embed_json
from saecircuits.report.schema import write_text_atomic
from saecircuits.report.sections import circuit as circuit_section
from saecircuits.report.sections import dla as dla_section
from saecircuits.report.sections import evidence, overview, study
from saecircuits.report.sections import sae as sae_section
from saecircuits.report.sections.circuit import stand_in as _stand_in  # noqa: F401  (tests import it from here)
from saecircuits.report.sections.common import (
    STATIC_FEATURES,
    TABLES,
    TOP_ROWS,  # noqa: F401  (part of this module's interface)
    Figures,
    TableSink,
    num,
    set_where,
    sorted_features,
    table,
    typed_results,
)
from saecircuits.report.summary import GLOSSARY, model_name
from saecircuits.report.tokens_html import TOKENS_CSS
from saecircuits.results import Results, SaeEntry

__all__ = ["render_report", "build_report_html", "build_report", "build_card_page", "Report", "plotly_bundle",
           "STATIC_FEATURES"]


def _escape(value: Any) -> Markup:
    """Every value a template shows, escaped as ``html.escape(quote=True)`` spells it (``&quot;``, ``&#x27;``; the
    page has always been written so, and markupsafe would write ``&#34;``, ``&#39;``). Markup (trusted fragments,
    macro output) passes unchanged, as under autoescaping."""
    if hasattr(value, "__html__"):
        return Markup(value.__html__())
    return Markup(html.escape(str(value), quote=True))


@functools.cache
def templates() -> jinja2.Environment:
    """The report's templates (``assets/report/templates``), autoescaping every value (:func:`_escape`); an
    undefined name is an error, not an empty string."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("saecircuits", "assets/report/templates"),
        autoescape=True,
        finalize=_escape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


CARTESIAN_BUNDLE_VERSION = "4.1.1"
"""plotly.js version of the vendored cartesian bundle (``assets/report/plotly-cartesian.min.js``)."""
CARTESIAN_TRACES = frozenset({"bar", "box", "contour", "heatmap", "histogram", "histogram2d", "histogram2dcontour",
                              "image", "pie", "scatter", "scatterternary", "violin"})
"""Trace types the cartesian bundle draws."""
BROWSER_TRACES = frozenset({"bar", "histogram", "scatter"})
"""Trace types the feature browser's cards draw (``page.js``)."""


def plotly_bundle(trace_types: set[str] | frozenset[str]) -> tuple[str, str]:
    """``(javascript, name)`` of the smallest plotly.js bundle that draws ``trace_types`` (plus the browser's).

    The vendored cartesian bundle (1.5 MB, see ``assets/report/SOURCE.md``) when it has the same plotly.js version
    as the installed plotly package and draws every trace type; otherwise the full bundle the plotly package ships
    (about 4.8 MB)."""
    needed = set(trace_types) | BROWSER_TRACES
    if needed <= CARTESIAN_TRACES and get_plotlyjs_version() == CARTESIAN_BUNDLE_VERSION:
        path = resources.files("saecircuits") / "assets" / "report" / "plotly-cartesian.min.js"
        return path.read_text(encoding="utf-8"), f"cartesian {CARTESIAN_BUNDLE_VERSION}"
    return get_plotlyjs(), f"full {get_plotlyjs_version()}"


def _page_js() -> str:
    return (resources.files("saecircuits") / "assets" / "report" / "page.js").read_text(encoding="utf-8")


def _scripts(js: str) -> dict[str, Any]:
    """What ``base.html.j2`` inlines besides the section data. Trusted code, marked safe: plotly.js and page.js are
    the package's own files, and TOKENS_CSS a constant."""
    return {"plotly_js": Markup(js), "page_js": Markup(_page_js()), "tokens_css": Markup(TOKENS_CSS)}


def _embedded(element_id: str, obj: Any) -> Markup:
    """``obj`` as a ``<script type="application/json">`` element: safe to inline because :func:`browser.embed_json`
    writes every ``<`` as ``\\u003c`` (or gzip-base64), so the data cannot end the element."""
    return Markup(embed_json(element_id, obj))


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """A built report: the page, and its figures and tables (for :mod:`saecircuits.report.export`).

    Attributes:
        html: the whole self-contained page.
        figures: ``(name, plotly Figure)`` for every figure of the page, in page order.
        tables: ``(name, headers or None, rows)`` for every table of the page, in page order (cells as shown).
        bundle: which plotly.js bundle the page inlines (``"cartesian 4.1.1"`` or ``"full X"``).
    """

    html: str
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)
    tables: list[tuple[str, list[str] | None, list[list[Any]]]] = field(default_factory=list)
    bundle: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:60] or "figure"


def _sae_context(results: Results, i: int, sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """One SAE's section and its line in the contents."""
    sid = f"sae-{i}"
    set_where(fig, f"{sid}-{_slug(sae.hook_point)}")
    part = sae_section.sae_part(results, sae, fig)
    part["evidence"] = evidence.evidence_parts(sae, fig)
    part["study"] = study.study_parts(sae, fig)
    part.update(
        sid=sid,
        title=sae_section.sae_title(i, sae),
        flagged=bool(part["failed"]),
        top=", ".join(f"f{t.feature}" for t in sorted_features(sae)[:5]),
        parts=part["evidence"] + part["study"],  # the contents' links, in page order
    )
    return part


def build_report(results: Results | Mapping) -> Report:
    """Build the report page and collect its figures and tables.

    Layout: title; summary first (headline in plain words, checks when results.json has them, loss recovered per
    SAE with CIs, the top features each with a one-line reading, the circuit); the glossary; the feature browser
    (every feature with any evidence, cards built lazily in the page from JSON embedded once); then the detailed
    sections, each collapsible: direct logit attribution, one section per SAE, the layer comparison, the circuit,
    the appendix. plotly.js is inlined once (:func:`plotly_bundle`); every figure is drawn when it scrolls into view.

    Args:
        results: the typed results (read as they are), or a results dict (validated once, version 1 upgraded).
    Raises:
        ResultsSchemaError: a dict ``results`` does not match results.json schema version 2 (or 1, upgraded).
    """
    results = typed_results(results)
    sink = TableSink()
    token = TABLES.set(sink)
    try:
        # in page order, which numbers the figures and names the exported tables
        fig = Figures()
        set_where(fig, "summary")
        ctx: dict[str, Any] = {"summary": overview.summary(results)}
        set_where(fig, "header")
        ctx["run"] = overview.run(results)
        set_where(fig, "checks")
        ctx["checks"] = overview.checks(results)
        set_where(fig, "dla")
        ctx["dla"] = dla_section.dla(results, fig)
        ctx["saes"] = [_sae_context(results, i, sae, fig) for i, sae in enumerate(results.saes)]
        ctx["layers"] = None
        if results.layer_comparison is not None:
            set_where(fig, "layers")
            ctx["layers"] = study.layers(results, fig)
        ctx["circuit"] = None
        if results.circuit is not None:
            set_where(fig, "circuit")
            ctx["circuit"] = circuit_section.circuit(results, fig)
        set_where(fig, "appendix")
        ctx["appendix"] = dla_section.appendix(results)
        browser = browser_payload(results)
        js, bundle = plotly_bundle(fig.trace_types)
    finally:
        TABLES.reset(token)
    name = model_name(results)
    page = templates().get_template("report.html.j2").render(
        **ctx,
        **_scripts(js),
        title=f"saecircuits report: {results.task.name} on {name}",
        task_name=results.task.name,
        model=name,
        glossary=GLOSSARY,
        n_browser=overview.n_browser_features(results),
        figures_json=_embedded("sc-figs", fig.payload()),
        browser_json=_embedded("sc-browser", browser),
    )
    named = [(f"{j:03d}-{where}-{_slug(_fig_title(f))}", f) for j, (where, f) in enumerate(fig.figures, 1)]
    return Report(html=page, figures=named, tables=sink.tables, bundle=bundle)


def _fig_title(f: go.Figure) -> str:
    t = f.layout.title
    return (t.text if t is not None and t.text else "") or "figure"


def build_card_page(card: Mapping) -> str:
    """A self-contained page with one feature's card (``saecircuits feature --out``), drawn by the same code as the
    report's feature browser.

    Args:
        card: ``{"saes": [an SAE entry of results.json holding only that feature's evidence], "feature": k, ...}``
            (:func:`saecircuits.feature_card.feature_card`).
    """
    sae = card["saes"][0]
    k = int(card["feature"])
    so = sae.get("sae_only") or {}
    rows = [("SAE", card.get("sae_dir", "")), ("hook point", sae["hook_point"]), ("d_in / d_sae",
                                                                                f"{sae['d_in']} / {sae['d_sae']}"),
            ("encoder bias b_enc[k]", num(so.get("b_enc"))), ("decoder norm |W_dec[k]|", num(so.get("decoder_norm")))]
    if card.get("model"):
        rows.append(("model", card["model"]))
    if card.get("task"):
        rows.append(("task", f"{card['task']['name']}, {card['task']['n_prompts']} prompts"))
    js, _ = plotly_bundle(set())
    return templates().get_template("card.html.j2").render(
        **_scripts(js),
        title=f"Feature {k} of {sae['hook_point']}",
        table=table(None, rows, left_cols=(0, 1)),
        notes=card.get("notes") or [],
        has_model=bool(card.get("model")),
        feature=k,
        browser_json=_embedded("sc-browser", browser_payload(card)),
    )


def build_report_html(results: Results | Mapping) -> str:
    """The report page as a string (see :func:`build_report` for its layout).

    Raises:
        ResultsSchemaError: a dict ``results`` does not match results.json schema version 2 (or 1, upgraded).
    """
    return build_report(results).html


def render_report(results: Results | Mapping, out_path: str | os.PathLike) -> Path:
    """Write the self-contained HTML report of ``results`` (typed, or a dict validated once) to ``out_path``
    atomically.

    The page inlines plotly.js once (the 1.5 MB cartesian bundle; see :func:`plotly_bundle`) and needs no network
    to view. Reads nothing but ``results``.

    Raises:
        ResultsSchemaError: a dict ``results`` does not match results.json schema version 2 or 1 (message names the
            key); nothing is written then.
    Returns:
        The path written.
    """
    text = build_report_html(results)
    return write_text_atomic(out_path, text)
