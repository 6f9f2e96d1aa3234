"""One self-contained HTML page from a results dict (results.json, schema version 2; see ``report/schema.py``).

The page reads saved evidence only (no torch, no model), so ``saecircuits report results.json`` re-renders it.
plotly.js is inlined once in ``<head>`` (the smallest bundle that draws every figure, :func:`plotly_bundle`); every
figure is an empty ``<div class="plot">`` whose JSON sits, with the others, in one embedded data element, and the
page's own script (``assets/report/page.js``) draws it when it scrolls into view. The feature browser's data
(:mod:`saecircuits.report.browser`) is embedded once too, compressed when large, and its cards are built in the
page. Every string that comes from the data is HTML-escaped (``html.escape``) or put into the page as text
(``textContent``), including tick labels handed to plotly; embedded JSON has every ``<`` written ``\\u003c``.

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

import contextvars
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs, get_plotlyjs_version
from plotly.subplots import make_subplots

from saecircuits.report.browser import browser_payload, embed_json
from saecircuits.report.schema import (
    ci_bounds,
    to_jsonable,
    upgrade_results,
    validate_results,
    write_text_atomic,
)
from saecircuits.report.summary import (
    GLOSSARY,
    feature_reading,
    headline,
    layer_comparison_reading,
    model_name,
    ratio_problem,
    supported,
    surprises,
)
from saecircuits.report.tokens_html import TOKENS_CSS, token_html, tokens_to_html, visible_text, visible_token

__all__ = ["render_report", "build_report_html", "build_report", "build_card_page", "Report", "plotly_bundle"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 24px 48px; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: 6px; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: 4px; margin-top: 40px; }
h3 { margin-top: 28px; }
table.data { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.data th { background: #f0f0f0; }
table.data td.l, table.data th.l { text-align: left; }
table.data td { overflow-wrap: anywhere; max-width: 40em; }
table.data tr.sig td { background: #fff4e5; font-weight: 600; }
nav.toc { background: #f7f7f7; border: 1px solid #ddd; padding: 8px 16px; margin: 16px 0; }
nav.toc ul { margin: 4px 0; padding-left: 20px; }
.prompt { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px;
          background: #fafafa; border-left: 3px solid #ccc; padding: 4px 8px; margin: 6px 0;
          overflow-wrap: anywhere; unicode-bidi: plaintext; }
mark.answer { background: #ffd54f; font-weight: 700; unicode-bidi: isolate; }
""" + TOKENS_CSS + """
.note { color: #555; font-size: 14px; }
.muted { color: #888; }
code { background: #f2f2f2; padding: 0 3px; }
.warn { background: #fff3f0; border: 1px solid #e0a090; border-left: 5px solid #c0392b; padding: 6px 12px;
        margin: 10px 0; }
.ok { background: #f0f8f0; border: 1px solid #9c9; border-left: 5px solid #2ca02c; padding: 6px 12px; margin: 10px 0; }
pre.json { background: #fafafa; border: 1px solid #e3e3e3; padding: 8px; font-size: 12px; overflow-x: auto; }
details.section { margin-top: 28px; border-top: 1px solid #bbb; }
details.section > summary { cursor: pointer; list-style: none; }
details.section > summary::-webkit-details-marker { display: none; }
details.section > summary > h2 { display: inline-block; border: none; margin: 12px 0 4px; }
details.section > summary::before { content: "\\25B8"; color: #666; margin-right: 8px; font-size: 20px; }
details.section[open] > summary::before { content: "\\25BE"; }
section.summary { background: #f7f9fc; border: 1px solid #d5deea; padding: 4px 18px 10px; margin: 12px 0; }
section.summary p.headline { font-size: 16px; margin: 8px 0; }
section.summary > h2 { margin-top: 12px; }
dl.glossary dt { font-weight: 700; margin-top: 6px; }
dl.glossary dd { margin-left: 18px; }
.warn { background: #fff3f0; border: 1px solid #e0a090; border-left: 5px solid #c0392b; padding: 6px 12px;
        margin: 10px 0; }
.surprise { background: #fffbea; border-left: 4px solid #e0b000; padding: 4px 10px; margin: 8px 0; font-size: 14px; }
div.plot { width: 100%; }
.fb-bar { display: flex; gap: 12px; align-items: center; margin: 8px 0; flex-wrap: wrap; }
.fb-bar input { font-size: 15px; padding: 4px 8px; min-width: 22em; }
.fb-wrap { display: grid; grid-template-columns: minmax(280px, 34%) minmax(0, 1fr); gap: 16px; align-items: start; }
.fb-list { max-height: 80vh; overflow-y: auto; border: 1px solid #ddd; }
.fb-list table.data { margin: 0; width: 100%; }
.fb-list tr[data-f] { cursor: pointer; }
.fb-list tr[data-f]:hover td, .fb-list tr.current td { background: #e8f0fe; }
.fb-card { min-width: 0; }
.fb-card .card-plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 8px; }
.fb-card .card-plots > div { min-width: 0; overflow: hidden; }
.fb-card p.reading { font-size: 15px; background: #f7f9fc; padding: 4px 8px; }
.toklist { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; overflow-wrap: anywhere; }
"""


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if _finite(v) else "n/a"


def _pm(mean: Any, ci: Any, fmt: str = ".4f") -> str:
    """'mean ± half' for a half-width CI, 'mean [lo, hi]' for a pair, 'mean' without a CI."""
    if ci is None or not _finite(mean):
        return _num(mean, fmt)
    if isinstance(ci, (list, tuple)):
        return f"{_num(mean, fmt)} [{_num(ci[0], fmt)}, {_num(ci[1], fmt)}]"
    return f"{_num(mean, fmt)} \u00b1 {_num(ci, fmt)}"


def _table(
    headers: Sequence[str] | None,
    rows: Sequence[Sequence[Any]],
    *,
    left_cols: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
) -> str:
    """An escaped HTML table (no header row if ``headers`` is None); every header and cell is escaped here."""
    lc = set(left_cols)
    sink = _TABLES.get()
    if sink is not None:
        sink.append(headers, rows)

    def cls(j: int) -> str:
        return ' class="l"' if j in lc else ""

    out = ['<table class="data">']
    if headers is not None:
        out.append("<thead><tr>")
        out += [f"<th{cls(j)}>{_esc(h)}</th>" for j, h in enumerate(headers)]
        out.append("</tr></thead>")
    out.append("<tbody>")
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes else ""
        out.append(f'<tr class="{_esc(rc)}">' if rc else "<tr>")
        out += [f"<td{cls(j)}>{_esc(c)}</td>" for j, c in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _TableSink:
    """Every table of a page as ``(name, headers, rows)``, for the CSV export; ``where`` names the current section."""

    def __init__(self) -> None:
        self.where = "header"
        self.tables: list[tuple[str, list[str] | None, list[list[Any]]]] = []

    def append(self, headers: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> None:
        n = sum(1 for name, _, _ in self.tables if name.startswith(self.where + "-")) + 1
        self.tables.append((f"{self.where}-{n}", list(headers) if headers is not None else None,
                            [list(r) for r in rows]))


_TABLES: contextvars.ContextVar[_TableSink | None] = contextvars.ContextVar("saecircuits_report_tables", default=None)


def _set_where(fig: _Figures, where: str) -> str:
    """Name the page part being drawn (e.g. ``sae-0-blocks-0-mlp-hook_post-f12``) for the exported figures and
    tables, so a PNG or CSV says which SAE and feature it shows; returns the previous name (to restore)."""
    before = fig.where
    fig.where = where
    sink = _TABLES.get()
    if sink is not None:
        sink.where = where
    return before


def _error_bars(means: Sequence[Any], cis: Sequence[Any] | None) -> dict | None:
    """plotly ``error_y`` for CIs given per bar as half-widths or [lo, hi] pairs (None where missing)."""
    if cis is None or all(c is None for c in cis):
        return None
    if not any(isinstance(c, (list, tuple)) for c in cis):  # all half-widths: symmetric bars
        return dict(type="data", array=_nulls(cis), visible=True)
    plus, minus = [], []
    for m, c in zip(means, cis, strict=True):
        lo, hi = ci_bounds(m, c)
        plus.append(hi - m if _finite(hi) and _finite(m) else None)
        minus.append(m - lo if _finite(lo) and _finite(m) else None)
    return dict(type="data", symmetric=False, array=plus, arrayminus=minus, visible=True)


def _nulls(vs: Sequence[Any]) -> list:
    return [v if _finite(v) else None for v in vs]


class _Figures:
    """Collects plotly figures; each becomes an empty ``<div class="plot">`` that the page draws when it scrolls into
    view (``assets/report/page.js``). The figures' JSON is embedded once (:meth:`payload`), their shared template
    once, and plotly.js once in the page head."""

    def __init__(self) -> None:
        self.n = 0
        self.where = "header"  # the page part being drawn (SAE and hook, feature): part of the exported file name
        self.specs: dict[str, dict] = {}
        self.figures: list[tuple[str, go.Figure]] = []  # (where, figure) for the PNG export
        self.trace_types: set[str] = set()

    def __call__(self, fig: go.Figure, *, height: int = 380) -> str:
        self.n += 1
        div_id = f"fig{self.n}"
        fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=50, b=60))
        spec = json.loads(pio.to_json(fig, validate=False))
        spec["layout"].pop("template", None)  # the page sets the one shared template
        self.specs[div_id] = {"data": spec.get("data", []), "layout": spec["layout"]}
        self.figures.append((self.where, fig))
        self.trace_types.update(str(t.get("type", "scatter")) for t in spec.get("data", []))
        return f'<div class="plot" data-lazy="1" id="{div_id}" style="height: {int(height)}px"></div>'

    def payload(self) -> dict:
        template = json.loads(pio.to_json(go.Figure(layout={"template": "plotly_white"}), validate=False))["layout"][
            "template"]
        return {"template": template, "figs": self.specs}


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def _header(r: Mapping) -> str:
    task = r["task"]
    ids = task["answer_token_ids"]
    toks = task.get("answer_tokens")
    answers = (
        [f"{visible_token(t)} (id {i})" for t, i in zip(toks, ids, strict=True)]
        if toks
        else [f"id {i}" for i in ids]
    )
    n_prompts = f"{task['n_prompts']}"
    if task.get("n_dropped_too_long"):
        n_prompts += f" ({task['n_dropped_too_long']} longer than the model's context left out)"
    rows = [
        ("Model", r["model"]),
        *([("Model source", (r.get("provenance") or {}).get("source"))]
          if (r.get("provenance") or {}).get("source") not in (None, r["model"]) else []),
        ("Task", task["name"]),
        ("Prompts", n_prompts),
        ("Answer token(s)", ", ".join(answers)),
    ]
    bos = r.get("bos_policy")
    if bos:
        rows.append(("BOS", bos.get("statement") or ("prepended" if bos["prepended"] else "none")))
    mi = r.get("model_info") or {}
    if mi:
        rows.append(("Model shape", ", ".join(f"{k}={v}" for k, v in mi.items())))
    out = [_table(None, rows, left_cols=(0, 1))]
    examples = task.get("example_prompts") or []
    if examples:
        # each prompt's own answer; results.json files from before example_answers only know it when the task
        # has a single answer token
        own = task.get("example_answers")
        if own is None and toks and len(toks) == 1:
            own = [toks[0]] * len(examples)
        n_all = task.get("n_prompts", len(examples))  # results.json keeps a few examples of all the prompts
        out.append(
            f'<p class="note">Example prompts ({min(len(examples), 5)} of {n_all} shown); the '
            "highlighted text is the answer the model should predict next (whitespace shown as \u00b7).</p>"
            if own is not None else
            f'<p class="note">Example prompts ({min(len(examples), 5)} of {n_all} shown); this '
            "results.json does not record which answer belongs to which prompt.</p>"
        )
        for j, p in enumerate(examples[:5]):
            mark = f'<mark class="answer">{token_html(own[j])}</mark>' if own is not None else ""
            out.append(f'<div class="prompt">{_esc(visible_text(p))}{mark}</div>')
    return "\n".join(out)


def _dla_section(r: Mapping, fig: _Figures) -> str:
    dla = r["dla"]
    labels, means, cis = dla["labels"], dla["mean"], dla.get("ci95")
    out = ['<h2 id="dla">Direct logit attribution</h2>']
    err = dla["completeness_max_abs_error"]
    alm = dla.get("answer_logit_mean")
    out.append(
        '<p class="note">Mean direct contribution of each component to the answer logit (logits), with 95% CI '
        f"over prompts. Completeness check: max |sum of components - answer logit| = {_esc(_num(err, '.2e'))}"
        " logits" + (f"; mean answer logit = {_esc(_num(alm))}." if alm is not None else ".") + "</p>"
    )
    cap = dla.get("logit_soft_cap")
    if cap is not None:
        out.append(
            f'<p class="note">This model soft-caps its logits (logit = {_esc(_num(cap))} &middot; tanh(pre-cap logit / '
            f"{_esc(_num(cap))})), which is not linear in the residual stream: every DLA here, the answer logit and "
            "the completeness check are of the <b>pre-cap</b> answer logit.</p>"
        )
    if labels:
        f = go.Figure(
            go.Bar(
                x=[_esc(s) for s in labels],
                y=_nulls(means),
                error_y=_error_bars(means, cis),
                marker_color=["#d62728" if _finite(m) and m >= 0 else "#1f77b4" for m in means],
            )
        )
        f.update_layout(
            title="Direct logit attribution to the answer",
            xaxis_title="component",
            yaxis_title="mean DLA (logits)",
            xaxis_type="category",
        )
        out.append(fig(f, height=420))
        order = sorted(range(len(labels)), key=lambda i: -abs(means[i]) if _finite(means[i]) else 0.0)[:8]
        out.append('<p class="note">Largest components by |mean|:</p>')
        out.append(
            _table(
                ["component", "mean DLA (logits)", "95% CI half-width"],
                [(labels[i], _num(means[i]), _num(cis[i]) if cis else "n/a") for i in order],
                left_cols=(0,),
            )
        )
    else:
        out.append('<p class="muted">No components recorded.</p>')
    return "\n".join(out)


def _sae_title(i: int, sae: Mapping) -> str:
    return f"SAE {i}: {sae['hook_point']} (d_sae = {sae['d_sae']})"


def _ratio(sae: Mapping, key: str) -> str:
    """A loss recovered with its interval, or 'undefined: reason' (never an interval for an undefined value)."""
    value = sae.get(key)
    if not _finite(value):
        reason = sae.get(f"{key}_undefined_reason")
        return f"undefined: {reason}" if reason else "n/a"
    return _pm(value, sae.get(f"{key}_ci95"), ".3f")


def _seq_ratio(sae: Mapping) -> str:
    """The whole-sequence loss recovered with its interval, 'undefined: reason', or 'n/a' (not computed)."""
    return _ratio(sae.get("whole_sequence") or {}, "loss_recovered")


def _behaviour_html(r: Mapping) -> str:
    b = r.get("behaviour")
    if not b:
        return ""
    text = (
        f"clean top-1 accuracy {_num(b['top1_accuracy'], '.1%')} of {_esc(b['n_prompts'])} prompts"
        + (f" (95% CI {_num(b['top1_accuracy_ci95'][0], '.1%')} to {_num(b['top1_accuracy_ci95'][1], '.1%')})"
           if b.get("top1_accuracy_ci95") else "")
        + f", mean p(answer) {_esc(_pm(b['mean_p_answer'], b.get('mean_p_answer_ci95'), '.3f'))}, mean answer loss "
        f"at P {_esc(_pm(b['mean_loss'], b.get('mean_loss_ci95'), '.3f'))} nats"
        + (f" (a uniform guess: {_num(b['uniform_loss'], '.2f')})" if b.get("uniform_loss") is not None else "")
    )
    if b["performs"]:
        return f'<div class="ok"><b>The model performs the behaviour:</b> {text}.</div>'
    return f'<div class="warn"><b>The model does not perform the behaviour:</b> {text}.</div>'


def _checks_section(r: Mapping) -> str:
    """Whether the model performs the behaviour, then every failed check with what to try."""
    if "behaviour" not in r and "checks" not in r:
        return ""
    out = ['<h2 id="checks">Checks</h2>', _behaviour_html(r)]
    checks = r.get("checks")
    if checks is None:
        return "\n".join(out)
    if not checks:
        out.append('<div class="ok">All checks passed: every SAE reconstructs its hook at the prediction '
                   "position better than mean ablation does, with a non-negative explained variance, a defined "
                   "loss recovered not clearly below 0.5, an explained variance at P and a loss recovered over every "
                   "position that are not low, top features that are not mostly dense, and no SAE recording "
                   "another model.</div>")
        return "\n".join(out)
    out.append(f'<p class="note">{len(checks)} warning(s). Numbers they concern cannot support a conclusion as '
               "they stand.</p>")
    rows = [(c["scope"], c["message"], c["what_to_try"]) for c in checks]
    out.append(_table(["scope", "warning", "what to try"], rows, left_cols=(0, 1, 2)))
    return "\n".join(out)


def _sae_warning_again(r: Mapping, sae: Mapping) -> str:
    """One line over the SAE's ranking pointing back to its warning box (one box per SAE, not two alike)."""
    n = sum(1 for c in r.get("checks") or [] if c["scope"] in ("task", sae["hook_point"]))
    if not n:
        return ""
    return (f'<p class="note"><b style="color:#c0392b">Warning:</b> {n} check(s) failed (listed at the top of this '
            "SAE's section); the feature ranking of this SAE cannot support a conclusion as it stands.</p>")


def _sae_warning(r: Mapping, sae: Mapping) -> str:
    """A visible box over an SAE whose checks failed (or whose task the model does not perform)."""
    failed = [c for c in r.get("checks") or [] if c["scope"] in ("task", sae["hook_point"])]
    if not failed:
        return ""
    items = "".join(f"<li>{_esc(c['message'])}. <i>Try:</i> {_esc(c['what_to_try'])}.</li>" for c in failed)
    return (f'<div class="warn"><b>Warning: {len(failed)} check(s) failed; the feature ranking of this SAE cannot '
            f"support a conclusion as it stands.</b><ul>{items}</ul></div>")


def _sae_summary(sae: Mapping, fig: _Figures) -> str:
    lc = sae.get("loss_ci95") or {}
    rows = [
        ("hook point", sae["hook_point"]),
        ("architecture", sae.get("architecture", "n/a")),
        ("d_in / d_sae", f"{sae['d_in']} / {sae['d_sae']}"),
        ("L0 at P (mean active features at the prediction position, across prompts)", _num(sae["l0"], ".2f")),
        ("explained variance at P (across prompts)", _num(sae.get("explained_variance_at_p"), ".4f")),
        ("relative squared error at P |x - x_hat|^2 / |x|^2", _num(sae.get("relative_error"), ".4f")),
        ("features active on the task", sae.get("n_active_features", "n/a")),
        ("clean loss (nats)", _pm(sae["clean_loss"], lc.get("clean"))),
        ("loss with SAE spliced in (nats)", _pm(sae["sae_loss"], lc.get("sae"))),
        ("loss with zero ablation (nats)", _pm(sae["zero_ablation_loss"], lc.get("zero"))),
        ("loss with mean ablation (nats)", _pm(sae["mean_ablation_loss"], lc.get("mean"))),
        ("loss recovered vs zero ablation", _ratio(sae, "loss_recovered")),
        ("loss recovered vs mean ablation", _ratio(sae, "loss_recovered_mean_ablation")),
    ]
    q = sae.get("whole_sequence")
    if q:
        rows += [
            (f"explained variance over every position of the prompts ({q.get('n_tokens', '?')} tokens)",
             _num(q.get("explained_variance"), ".4f")),
            (f"loss recovered over every position of the prompts (next-token loss clean {_num(q.get('ce_clean'), '.4f')},"
             f" SAE {_num(q.get('ce_sae'), '.4f')}, zero ablation {_num(q.get('ce_zero'), '.4f')} nats)",
             _seq_ratio(sae))]
    out = [_table(["quantity", "value (95% CI)"], rows, left_cols=(0, 1))]
    out.append(
        '<p class="note">Loss recovered = (ablated - SAE) / (ablated - clean): 1 means splicing the SAE in '
        "costs nothing, 0 means it is as bad as ablating the layer. It is undefined when the ablation does not "
        "clearly raise the loss (a mean increase under 0.01 nats, or a 95% interval that includes 0); read the "
        "losses above instead. At P it sits near 1 even for a poor SAE (one position of one layer rarely "
        "decides the answer); the explained variance at P and the loss recovered over every position are the "
        "figures that tell a good SAE from a bad one.</p>"
    )
    names = ["clean", "SAE", "zero ablation", "mean ablation"]
    means = [sae["clean_loss"], sae["sae_loss"], sae["zero_ablation_loss"], sae["mean_ablation_loss"]]
    cis = [lc.get("clean"), lc.get("sae"), lc.get("zero"), lc.get("mean")]
    f = go.Figure(
        go.Bar(
            x=names,
            y=_nulls(means),
            error_y=_error_bars(means, cis),
            marker_color=["#2ca02c", "#1f77b4", "#7f7f7f", "#bcbd22"],
        )
    )
    f.update_layout(
        title=f"Task loss at the prediction position: {_esc(sae['hook_point'])}",
        yaxis_title="cross-entropy (nats)",
        xaxis_type="category",
    )
    out.append(fig(f, height=360))
    return "\n".join(out)


def _sorted_features(sae: Mapping) -> list[Mapping]:
    return sorted(
        sae["top_features"], key=lambda t: -t["loss_increase"] if _finite(t["loss_increase"]) else math.inf
    )


STATIC_FEATURES = 10
"""Features whose examples, details and band examples the static sections draw; the feature browser has them all."""

TOP_ROWS = 30
"""Rows of the ranked feature table and bars of its chart (every feature's effect is in the effects chart)."""


def _effects_section(sae: Mapping, fig: _Figures) -> str:
    """Exact single-feature ablation effect of every active feature: mean loss increase vs fraction of prompts."""
    eff = sae.get("feature_effects")
    if not eff:
        return ""
    info = sae.get("feature_effects_info") or {}
    n_pairs = info.get("n_pairs", sum(e["n_active_prompts"] for e in eff))
    sel = info.get("selection", "all_active")
    which = "every feature active at P on each prompt" if sel == "all_active" else f"features chosen as {sel}"
    out = [
        f'<p class="note">Exact effect of ablating each feature alone at the prediction position, for {_esc(which)}: '
        f"{len(eff)} features over {n_pairs} (prompt, feature) pairs, each an intervention on the model "
        "(x &minus; f<sub>k</sub> W<sub>dec</sub>[k], the SAE error kept), computed from the cached prefix. "
        "Each point is one feature: mean loss increase over the prompts where it is active (nats, 95% CI) "
        "against the fraction of prompts where it is active. Points far above 0 on the right carry the behaviour "
        "broadly; high points on the left matter only on a few prompts.</p>"
    ]
    means = [e["mean_loss_increase"] for e in eff]
    f = go.Figure(
        go.Scatter(
            x=[e.get("fraction_active") for e in eff],
            y=_nulls(means),
            error_y=_error_bars(means, [e.get("ci95") for e in eff]),
            mode="markers",
            marker={"size": 6, "color": "#1f77b4", "opacity": 0.7},
            text=[f"f{e['feature']} (n={e['n_active_prompts']})" for e in eff],
            hovertemplate="%{text}<br>loss increase %{y:.4f} nats<br>fraction active %{x:.3f}<extra></extra>",
        )
    )
    f.update_layout(
        title="Every active feature: loss increase when ablated alone vs how often it is active",
        xaxis_title="fraction of prompts where the feature is active at P",
        yaxis_title="mean loss increase (nats)",
    )
    out.append(fig(f, height=420))
    return "\n".join(out)


def _features_section(sae: Mapping, fig: _Figures) -> str:
    tfs = _sorted_features(sae)[:TOP_ROWS]
    if not tfs:
        return '<p class="muted">No top features recorded.</p>'
    rows, classes = [], []
    for rank, t in enumerate(tfs, 1):
        lo, _ = ci_bounds(t["loss_increase"], t.get("loss_increase_ci95"))
        sig = _finite(lo) and lo > 0
        classes.append("sig" if sig else "")
        rows.append(
            (
                rank,
                t["feature"],
                _pm(t["loss_increase"], t.get("loss_increase_ci95")),
                "yes" if sig else "no",
                _num(t["mean_activation"]),
                _num(t["fraction_active"], ".3f"),
                t.get("n_prompts", "n/a"),
            )
        )
    out = [
        '<p class="note">Features active on at least 5% of the prompts, ranked by the mean increase of the task loss '
        "(nats) when the feature alone is ablated at the prediction position (ablated - clean, on every prompt where "
        f"it is active; the top {TOP_ROWS} are shown). Highlighted rows: the 95% CI excludes 0.</p>"
    ]
    out.append(
        _table(
            [
                "rank",
                "feature",
                "loss increase (nats, 95% CI)",
                "CI > 0",
                "mean activation",
                "fraction active",
                "n prompts",
            ],
            rows,
            row_classes=classes,
        )
    )
    means = [t["loss_increase"] for t in tfs]
    f = go.Figure(
        go.Bar(
            x=[f"f{t['feature']}" for t in tfs],
            y=_nulls(means),
            error_y=_error_bars(means, [t.get("loss_increase_ci95") for t in tfs]),
            marker_color="#d62728",
        )
    )
    f.update_layout(
        title="Loss increase when each feature is ablated",
        xaxis_title="feature",
        yaxis_title="loss increase (nats)",
        xaxis_type="category",
    )
    out.append(fig(f, height=380))
    return "\n".join(out)


_MULTI = (
    ("logprob_diff", "answer log-prob (nats)"),
    ("logit_diff", "answer logit"),
    ("rank_diff", "answer rank"),
)


def _multi_section(sae: Mapping, fig: _Figures) -> str:
    ma = sae.get("multi_ablation")
    sel = sae.get("multi_ablation_selection") or {}
    if not ma:
        if sel and not sel.get("n_supported"):
            return ('<p class="note">No multi-feature ablation: no ranked feature has a supported effect (every 95% '
                    f"CI of the {_esc(sel.get('n_ranked', 0))} ranked features includes 0), so no set was chosen.</p>")
        return '<p class="muted">No multi-feature ablation recorded.</p>'
    feats = ma.get("features", [])
    present = [(k, label) for k, label in _MULTI if k in ma]
    chosen_by = (f" Chosen as {_esc(sel['rule'])} ({_esc(sel.get('n_supported', '?'))} of "
                 f"{_esc(sel.get('n_ranked', '?'))} ranked features are supported)." if sel.get("rule") else
                 " This results.json does not say whether the set was chosen among supported features.")
    out = [
        f'<p class="note">All of the features {_esc(", ".join(str(x) for x in feats)) or "(not recorded)"} '
        f"ablated together on {_esc(ma.get('n_prompts', 'n/a'))} prompts. Sign convention: "
        "<b>original - ablated</b>. A positive log-prob or logit difference means the ablation lowered the "
        "answer; a negative rank difference means the answer's rank got worse (a larger rank number) after "
        "the ablation. Error bars: 95% CI." + chosen_by + "</p>"
    ]
    rows = [(label, _pm(ma[k]["mean"], ma[k].get("ci95"))) for k, label in present]
    out.append(_table(["original - ablated", "mean (95% CI)"], rows, left_cols=(0,)))
    if present:
        f = make_subplots(rows=1, cols=len(present), subplot_titles=[label for _, label in present])
        for j, (k, label) in enumerate(present, 1):
            m = ma[k]["mean"]
            f.add_trace(
                go.Bar(
                    x=[label],
                    y=_nulls([m]),
                    error_y=_error_bars([m], [ma[k].get("ci95")]),
                    marker_color="#9467bd",
                    showlegend=False,
                ),
                row=1,
                col=j,
            )
        f.update_layout(title="Multi-feature ablation: original - ablated")
        out.append(fig(f, height=340))
    return "\n".join(out)


def _examples_section(sae: Mapping, sid: str) -> str:
    by_feature: dict[int, list[Mapping]] = {}
    for fe in sae.get("examples", []):
        by_feature.setdefault(fe["feature"], []).extend(fe["examples"])
    if not by_feature:
        return '<p class="muted">No activating examples recorded.</p>'
    order = [t["feature"] for t in _sorted_features(sae) if t["feature"] in by_feature]
    order += [k for k in by_feature if k not in order]
    out = [
        '<p class="note">Top activating examples per feature. Token background: red for positive activation '
        "(normalised by the example's max), blue for negative; hover a token for its value. A newline is shown "
        "as \u00b6, a tab as \u2192 and a space as \u00b7 (the reference notebook's colours). Special tokens "
        "(BOS/EOS/PAD) are "
        "grey dashed boxes, never coloured; a character split over several byte tokens is shown on its first "
        "token, and the narrow boxes after it hold its other bytes.</p>"
    ]
    if len(order) > STATIC_FEATURES:
        out.append(f'<p class="note">The first {STATIC_FEATURES} of {len(order)} features are shown here; the feature '
                   "browser has the examples of every one.</p>")
    for k in order[:STATIC_FEATURES]:
        out.append(f'<h4 id="{sid}-f{k}">Feature {k}</h4>')
        seen = set()
        for ex in by_feature[k]:
            key = (tuple(ex["tokens"]), tuple(ex["activations"]))
            if key in seen:  # the same window twice (e.g. two top positions close together): shown once
                continue
            seen.add(key)
            acts = ex["activations"]
            mx = ex.get("max_activation")
            if not _finite(mx):
                mx = max((a for a in acts if _finite(a)), default=None)
            doc = ex.get("doc_index", "n/a")
            out.append(f'<div class="note">doc {_esc(doc)}, max activation {_esc(_num(mx))}</div>')
            out.append(
                tokens_to_html(
                    ex["tokens"], acts, max_value=mx if _finite(mx) else None, kinds=ex.get("token_kinds")
                )
            )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Per-feature and attribution evidence (optional keys; analysis/evidence.py)
# ---------------------------------------------------------------------------------------------------------------


def _error_dla_section(sae: Mapping, fig: _Figures) -> str:
    e = sae["error_dla"]
    labels, means, cis = e["labels"], e["mean"], e.get("ci95")
    out = [
        '<p class="note">Direct logit attribution (logits) of this SAE layer\'s MLP output to the answer, split into '
        "the SAE reconstruction's and the SAE error's shares (reconstruction + error = MLP; b_out excluded; final "
        "norm applied with each prompt's cached scale; the reference notebook's remainder DLA). Error bars: 95% CI "
        "over prompts.</p>"
    ]
    out.append(
        _table(
            ["part", "mean DLA (logits, 95% CI)"],
            [
                (lab, _pm(m, cis[j] if cis else None))
                for j, (lab, m) in enumerate(zip(labels, means, strict=True))
            ],
            left_cols=(0,),
        )
    )
    f = go.Figure(
        go.Bar(
            x=[_esc(s) for s in labels],
            y=_nulls(means),
            error_y=_error_bars(means, cis),
            marker_color="#2ca02c",
        )
    )
    f.update_layout(
        title="MLP DLA: reconstruction vs SAE error",
        xaxis_title="part",
        yaxis_title="mean DLA (logits)",
        xaxis_type="category",
    )
    out.append(fig(f, height=320))
    return "\n".join(out)


def _token_value_table(title_a: str, a: Sequence, title_b: str, b: Sequence, unit: str) -> str:
    n = max(len(a), len(b))
    rows = []
    for j in range(n):
        left = a[j] if j < len(a) else None
        right = b[j] if j < len(b) else None
        rows.append(
            (
                visible_token(left[0]) if left else "",
                _num(left[1]) if left else "",
                visible_token(right[0]) if right else "",
                _num(right[1]) if right else "",
            )
        )
    if not rows:
        return '<p class="muted">No tokens passed the masks.</p>'
    return _table([title_a, unit, title_b, unit], rows, left_cols=(0, 2))


def _feature_detail(fd: Mapping, fig: _Figures, sid: str) -> str:
    k = fd["feature"]
    before = _set_where(fig, f"{fig.where}-f{int(k)}")
    try:
        return _feature_detail_html(fd, fig, sid)
    finally:
        _set_where(fig, before)


def _feature_detail_html(fd: Mapping, fig: _Figures, sid: str) -> str:
    k = fd["feature"]
    out = [f'<h4 id="{sid}-detail-f{k}">Feature {_esc(k)}</h4>']
    n_act, cap = fd.get("n_active_prompts"), fd.get("max_prompts")
    if isinstance(n_act, int) and isinstance(cap, int) and n_act > cap:
        out.append(f'<p class="note">The views below use the first {cap} of the {n_act} prompts where feature '
                   f"{_esc(k)} is active (task order).</p>")
    pb = fd.get("prompt_boosts")
    if pb:
        extra = ""
        if "answer_logprob_clean" in pb:
            extra = (
                f" Mean answer log-prob: clean {_esc(_num(pb.get('answer_logprob_clean')))}, ablated "
                f"{_esc(_num(pb.get('answer_logprob_ablated')))} nats."
            )
        out.append(
            '<p class="note"><b>Prompt-based log-prob boosts</b> (as in the reference notebook): mean log-prob at '
            "the prediction "
            "position, clean - with the feature ablated, over "
            f"{_esc(pb.get('n_prompts', 'n/a'))} prompts where it is active; rare tokens and tokens with mean clean "
            f"log-prob below the cutoff are masked.{extra}</p>"
        )
        out.append(_token_value_table("boosted", pb["boosted"], "deboosted", pb["deboosted"], "nats"))
    wb = fd.get("weight_boosts")
    if wb:
        out.append(
            '<p class="note"><b>Weight-based logit boosts</b> (the decoder direction read through the unembedding, '
            "as in the reference notebook): W_dec[k] @ W_out @ W_U with the final norm's centring and weight applied, "
            "logits per unit activation, common tokens only, without the per-prompt norm scale.</p>"
        )
        out.append(_token_value_table("top", wb["top"], "bottom", wb["bottom"], "logits"))
    lva = fd.get("loss_vs_activation")
    if lva:
        out.append(
            '<p class="note"><b>Activation vs loss increase when ablated</b>, one point per active '
            f"prompt; Pearson r = {_esc(_num(lva.get('pearson_r'), '.3f'))} (n = {len(lva['activation'])}).</p>"
        )
        if lva["activation"]:
            f = go.Figure(
                go.Scatter(
                    x=_nulls(lva["activation"]),
                    y=_nulls(lva["loss_increase"]),
                    mode="markers",
                    marker=dict(color="#d62728", size=6, opacity=0.7),
                )
            )
            f.update_layout(
                title=f"Feature {int(k)}: activation vs loss increase",
                xaxis_title="activation at the prediction position",
                yaxis_title="loss increase when ablated (nats)",
            )
            out.append(fig(f, height=320))
    dfa = fd.get("dfa")
    if dfa:
        comp = dfa.get("completeness_max_abs_error")
        tang = dfa.get("tangent_error_mean")
        out.append(
            '<p class="note"><b>Direct feature attribution</b> (the reference notebook\'s DFA): each upstream '
            "component's "
            "contribution to the feature's encoder pre-activation through ln2 and W_in, inactive MLP neurons "
            f"treated as {_esc(dfa.get('variant', 'zero'))}, active ones as if GELU were the identity; "
            f"{_esc(dfa.get('n_prompts', 'n/a'))} prompts. Completeness of the linearised variant: max |sum - "
            f"actual pre-activation| = {_esc(_num(comp, '.2e'))}; a pure tangent (no curvature term) misses "
            f"{_esc(_num(tang, '.3f'))} on average.</p>"
        )
        if dfa["labels"]:
            means, cis = dfa["mean"], dfa.get("ci95")
            f = go.Figure(
                go.Bar(
                    x=[_esc(s) for s in dfa["labels"]],
                    y=_nulls(means),
                    error_y=_error_bars(means, cis),
                    marker_color="#8c564b",
                )
            )
            f.update_layout(
                title=f"Feature {int(k)}: DFA",
                xaxis_title="component",
                yaxis_title="contribution to pre-activation",
                xaxis_type="category",
            )
            out.append(fig(f, height=340))
    return "\n".join(out)


def _upstream_section(sae: Mapping, fig: _Figures) -> str:
    up = sae["upstream_ablation"]
    feats = up["features"]

    def col(key: str) -> list:
        v = up.get(key)
        return v if v is not None and len(v) == len(feats) else [None] * len(feats)

    out = [
        f'<p class="note">Feature activations at the prediction position, clean vs with <code>{_esc(up["hook"])}'
        f"</code> {_esc(up.get('mode', 'zero'))}-ablated at that position only, on the same prompts "
        "(as in the reference notebook). Unconditional means over all prompts, and conditional means over the prompts "
        "where the "
        "feature is active in the clean run (both columns over the same prompts).</p>"
    ]
    rows = [
        (f, _num(c), _num(a), _num(d), _num(ca), _num(aa), _num(fc, ".3f"), _num(fa, ".3f"))
        for f, c, a, d, ca, aa, fc, fa in zip(
            feats,
            col("clean_mean"),
            col("ablated_mean"),
            col("diff_ci95"),
            col("clean_mean_active"),
            col("ablated_mean_active"),
            col("fraction_active_clean"),
            col("fraction_active_ablated"),
            strict=True,
        )
    ]
    out.append(
        _table(
            [
                "feature",
                "clean mean",
                "ablated mean",
                "diff 95% CI half-width",
                "clean mean (active)",
                "ablated mean (same prompts)",
                "fraction active clean",
                "fraction active ablated",
            ],
            rows,
        )
    )
    f = go.Figure(
        [
            go.Bar(
                name="clean", x=[f"f{x}" for x in feats], y=_nulls(col("clean_mean")), marker_color="#1f77b4"
            ),
            go.Bar(
                name="ablated",
                x=[f"f{x}" for x in feats],
                y=_nulls(col("ablated_mean")),
                marker_color="#ff7f0e",
            ),
        ]
    )
    f.update_layout(
        barmode="group",
        title="Mean feature activation: clean vs upstream ablated",
        xaxis_title="feature",
        yaxis_title="mean activation",
        xaxis_type="category",
    )
    out.append(fig(f, height=320))
    return "\n".join(out)


def _scaled_dla_section(sae: Mapping) -> str:
    entries = sae["activation_scaled_dla"]
    has_ln = any("scaled_ln" in e for e in entries)
    out = [
        '<p class="note">Activation-scaled DLA (as in the reference notebook): mean activation at the prediction '
        "position over "
        "all prompts, the feature's direct logit effect on the answer per unit activation (W_dec[k] @ W_out @ "
        "W_U[:, answer] with the final norm's centring and weight, without the per-prompt norm scale), their product"
        + (", and the product through the final norm with each prompt's cached scale" if has_ln else "")
        + " (logits).</p>"
    ]
    headers = ["feature", "mean activation", "DLA per unit", "scaled"] + (["scaled (norm)"] if has_ln else [])
    rows = [
        (e["feature"], _num(e["mean_activation"]), _num(e["dla_per_unit"]), _num(e["scaled"]))
        + ((_num(e.get("scaled_ln")),) if has_ln else ())
        for e in entries
    ]
    out.append(_table(headers, rows))
    return "\n".join(out)


_EVIDENCE = (
    ("error_dla", "errdla", "SAE error DLA"),
    ("feature_details", "details", "Feature details"),
    ("upstream_ablation", "upstream", "Upstream ablation"),
    ("activation_scaled_dla", "scaled", "Activation-scaled DLA"),
)


def _evidence_sections(sae: Mapping, fig: _Figures, sid: str) -> list[str]:
    out = []
    for key, slug, title in _EVIDENCE:
        if not sae.get(key):
            continue
        out.append(f'<h3 id="{sid}-{slug}">{_esc(title)}</h3>')
        if key == "error_dla":
            out.append(_error_dla_section(sae, fig))
        elif key == "feature_details":
            details = sae["feature_details"]
            if len(details) > STATIC_FEATURES:
                out.append(f'<p class="note">The first {STATIC_FEATURES} of {len(details)} features are shown here; '
                           "the feature browser has the details of every one.</p>")
            out += [_feature_detail(fd, fig, sid) for fd in details[:STATIC_FEATURES]]
        elif key == "upstream_ablation":
            out.append(_upstream_section(sae, fig))
        else:
            out.append(_scaled_dla_section(sae))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The rest of the reference study (optional keys; pipeline.study_sae / study_run)
# ---------------------------------------------------------------------------------------------------------------


def _mci(d: Mapping | None, fmt: str = ".4f") -> str:
    """'mean ± half (n=..)' of a MEANCI dict."""
    if not d:
        return "n/a"
    n = d.get("n")
    return _pm(d.get("mean"), d.get("ci95"), fmt) + (f" (n={n})" if n is not None else "")


def _off_range_text(off: Mapping | None) -> str:
    """One sentence on ablated activations below the hook's range (or why it is undefined)."""
    if not off:
        return ""
    if off.get("n_with_off_range") is None:
        return "Off-range count: undefined (this hook has no bounded range, e.g. a gated MLP)."
    n, k = off.get("n_ablations", 0), off["n_with_off_range"]
    frac = off.get("fraction_with_off_range")
    depth = off.get("mean_depth")
    return (
        f"{k} of {n} edited activation vectors ({_num(frac, '.1%') if _finite(frac) else 'n/a'}) have entries below "
        f"the activation function's minimum {_num(off.get('floor'), '.4f')} ({off.get('n_off_range_entries', 0)} "
        f"entries, on average {_num(depth, '.3f')} below it; lowest value {_num(off.get('min_value'), '.3f')}): "
        "states the model never produces."
    )


def _token_pairs(pairs: Sequence) -> str:
    return ", ".join(f"{visible_token(t)} ({c})" for t, c in pairs) or "none"


def _corpus_section(sae: Mapping, fig: _Figures, sid: str) -> str:
    cs = sae["corpus_stats"]
    out = [
        f'<p class="note">Statistics of every feature over {_esc(cs["n_docs"])} corpus documents '
        f"({_esc(cs['n_tokens'])} counted tokens: padding and special tokens such as BOS left out), from one streaming "
        "pass shared by every SAE of the run. <b>Density</b> is the fraction of counted tokens where a feature "
        "fires (f &gt; 0); a healthy SAE has most features between 1e-4 and 1e-1, a spike near 1 means dense "
        "features, and dead features never fire. <b>Top tokens</b> are the input tokens a feature fires on above "
        f"{_esc(_num(cs.get('token_fraction'), '.2f'))} of its corpus maximum, with counts; a high top-token share "
        "means a token detector, a low one a context feature.</p>"
    ]
    out.append(
        _table(
            ["quantity", "value"],
            [
                ("documents / counted tokens", f"{cs['n_docs']} / {cs['n_tokens']}"),
                ("L0 (mean active features per counted token)", _num(cs["l0"], ".2f")),
                ("dead features (never fire)", cs.get("n_dead", "n/a")),
            ],
            left_cols=(0,),
        )
    )
    edges, counts = cs.get("density_log10_edges"), cs.get("density_log10_counts")
    if edges and counts:
        f = go.Figure(
            go.Bar(x=[(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)], y=counts,
                   width=[b - a for a, b in zip(edges[:-1], edges[1:], strict=True)], marker_color="#1f77b4")
        )
        f.update_layout(title="Feature density over the corpus (features that fire at least once)",
                        xaxis_title="log10 density (fraction of tokens with f > 0)", yaxis_title="features")
        out.append(fig(f, height=320))
    feats = cs["features"][:STATIC_FEATURES]
    if len(cs["features"]) > STATIC_FEATURES:
        out.append(f'<p class="note">The first {STATIC_FEATURES} of {len(cs["features"])} listed features are shown '
                   "here; the feature browser has the statistics and top examples of every one.</p>")
    if feats:
        rows = [
            (
                fe["feature"],
                _num(fe["density"], ".2e"),
                _num(fe["max_activation"], ".3f"),
                _num(fe.get("mean_when_active"), ".3f"),
                _token_pairs(fe["top_tokens"][:6]),
                _num(fe.get("top_token_share"), ".2f"),
            )
            for fe in feats
        ]
        out.append(
            _table(["feature", "density", "corpus max", "mean when active", "top tokens (count)", "top-token share"],
                   rows, left_cols=(4,))
        )
        a_edges = cs.get("activation_log10_edges")
        if a_edges:
            centres = [(a + b) / 2 for a, b in zip(a_edges[:-1], a_edges[1:], strict=True)]
            f = go.Figure(
                [go.Scatter(x=centres, y=fe.get("activation_log10_counts", []), mode="lines", name=f"f{fe['feature']}")
                 for fe in feats[:STATIC_FEATURES] if fe.get("activation_log10_counts")]
            )
            f.update_layout(title="Activation histogram of the top features (tokens where each fires)",
                            xaxis_title="log10 activation", yaxis_title="tokens")
            out.append(fig(f, height=320))
        out.append(
            '<p class="note">Examples in bands of the corpus maximum (the reference study\'s upper / middle / lower '
            "modes): documents whose maximum lies just above 2/3, 1/3 and 1/10 of the feature's maximum. What a "
            "feature does at lower activations is often broader than its top examples suggest.</p>"
        )
        for fe in feats[:STATIC_FEATURES]:
            bands = fe.get("band_examples") or {}
            if not any(bands.values()):
                continue
            out.append(f'<h4 id="{sid}-bands-f{int(fe["feature"])}">Feature {_esc(fe["feature"])}</h4>')
            for band, exs in bands.items():
                for ex in exs:
                    mx = ex.get("max_activation")
                    out.append(f'<div class="note">{_esc(band)} band, doc {_esc(ex.get("doc_index", "n/a"))}, '
                               f"activation {_esc(_num(mx))}</div>")
                    out.append(tokens_to_html(ex["tokens"], ex["activations"],
                                              max_value=fe["max_activation"] if _finite(fe["max_activation"]) else None,
                                              kinds=ex.get("token_kinds")))
    return "\n".join(out)


def _five_way_section(sae: Mapping, fig: _Figures) -> str:
    lc = sae["loss_comparison"]
    labels, means, cis = lc["labels"], lc["mean"], lc.get("ci95")
    diffs, dcis = lc.get("diff_vs_clean"), lc.get("diff_vs_clean_ci95")
    out = [
        f'<p class="note">Answer loss at the prediction position on the same {_esc(lc.get("n_prompts", "n/a"))} '
        f"prompts under five runs of <code>{_esc(sae['hook_point'])}</code>: clean, mean- and zero-ablated at P, "
        f"the top features {_esc(', '.join(str(x) for x in lc.get('features', [])) or '(none)')} ablated together "
        f"({_esc(lc.get('mode', 'residual'))} mode), and the SAE spliced in. How to read it: if ablating a few features "
        "costs about as much as ablating the whole layer, those features carry the layer's contribution to the "
        "answer; the SAE row should sit near the clean row. Paired differences (run - clean) have tighter "
        "intervals than the means because each prompt is compared with itself.</p>"
    ]
    rows = []
    for j, lab in enumerate(labels):
        rows.append((lab, _pm(means[j], cis[j] if cis else None),
                     _pm(diffs[j], dcis[j] if dcis else None) if diffs else "n/a"))
    out.append(_table(["run", "loss (nats, 95% CI)", "run - clean (nats, paired 95% CI)"], rows, left_cols=(0,)))
    extra = []
    if lc.get("features_minus_sae"):
        extra.append(f"Top features ablated - SAE spliced: {_mci(lc['features_minus_sae'])} nats.")
    for key, what in (("off_range", "Top-features run"), ("sae_off_range", "SAE run")):
        if lc.get(key):
            extra.append(f"{what}: {_off_range_text(lc[key])}")
    if extra:
        out.append('<p class="note">' + " ".join(_esc(e) for e in extra) + "</p>")
    f = go.Figure(go.Bar(x=[_esc(x) for x in labels], y=_nulls(means), error_y=_error_bars(means, cis),
                         marker_color=["#2ca02c", "#bcbd22", "#7f7f7f", "#d62728", "#1f77b4"][: len(labels)]))
    f.update_layout(title="Ablation loss comparison at the prediction position", yaxis_title="loss (nats)",
                    xaxis_type="category")
    out.append(fig(f, height=380))
    return "\n".join(out)


def _modes_section(sae: Mapping) -> str:
    am = sae["ablation_modes"]
    modes = ("residual", "reconstruction", "clean_effect")
    desc = am.get("descriptions") or {}
    out = [
        '<p class="note">The same top features ablated alone in the three ablation modes (mean loss increase over the '
        "prompts where each is active, nats, 95% CI). <b>residual</b>: the feature's decoded contribution removed, "
        "the SAE error kept (the reference study's main ablation). <b>reconstruction</b>: the activation replaced by "
        "the SAE reconstruction with the feature zeroed, compared with the clean run, so the SAE error's own effect "
        "is mixed in. <b>clean_effect</b>: that same edit compared with the SAE spliced in, i.e. the feature's effect "
        "inside the SAE's model of the layer. Large gaps between the modes mean the SAE error matters for this "
        "behaviour.</p>"
    ]
    if desc:
        out.append("<ul class=\"note\">" + "".join(f"<li><b>{_esc(m)}</b>: {_esc(desc[m])}</li>"
                                                    for m in modes if m in desc) + "</ul>")
    rows = [(r["feature"], *[_mci(r.get(m)) for m in modes]) for r in am["rows"]]
    multi = am.get("multi") or {}
    if multi:
        rows.append(("together: " + ", ".join(str(x) for x in am.get("multi_features", [])),
                     *[_mci(multi.get(m)) for m in modes]))
    out.append(_table(["feature", *modes], rows, left_cols=(0,)))
    offs = am.get("off_range") or {}
    notes = [f"{m}: {_off_range_text(offs[m])}" for m in modes if offs.get(m)]
    if notes:
        out.append('<p class="note">Single-feature ablations of these features, by mode. '
                   + " ".join(_esc(n) for n in notes) + "</p>")
    return "\n".join(out)


def _stories_section(sae: Mapping, fig: _Figures, sid: str) -> str:
    out = [
        '<p class="note">Each feature ablated on the corpus stories where it fires most. <b>Global</b>: ablated at '
        "every position of the story, mean next-token loss over the story (ablated - clean, mean over stories). "
        "<b>Per position</b>: ablated at one position where it is active (above the threshold, a tenth of its corpus "
        "maximum) and the loss of predicting the next token there, mean over (story, position) pairs. A feature that "
        "matters where it fires has a clearly positive per-position effect; the per-token view shows where in a story "
        "the loss moves (red: the loss rose when the feature was ablated everywhere, blue: it fell).</p>"
    ]
    rows = [
        (st["feature"], st.get("n_stories", "n/a"), _num(st.get("threshold"), ".3f"), _mci(st["global"]),
         _mci(st["per_position"]), st.get("mode", "residual"))
        for st in sae["max_activating_ablation"]
    ]
    out.append(_table(["feature", "stories", "threshold", "global: loss increase (nats)",
                       "per position: loss increase (nats)", "mode"], rows))
    for st in sae["max_activating_ablation"][:STATIC_FEATURES]:
        k = int(st["feature"])
        vals = st.get("position_loss_increase") or []
        if vals:
            f = go.Figure(go.Histogram(x=_nulls(vals), nbinsx=40, marker_color="#d62728"))
            f.update_layout(title=f"Feature {k}: loss increase when ablated at one active position",
                            xaxis_title="loss increase (nats)", yaxis_title="(story, position) pairs")
            out.append(fig(f, height=300))
        if st.get("off_range"):
            out.append(f'<p class="note">{_esc(_off_range_text(st["off_range"]))}</p>')
        for pt in st.get("per_token", []):
            out.append(f'<div class="note" id="{sid}-story-f{k}-d{_esc(pt.get("doc_index", ""))}">feature {k}, '
                       f"doc {_esc(pt.get('doc_index', 'n/a'))}: loss change per predicted token (hover: activation "
                       "of the feature at the token)</div>")
            extra = {"activation": pt["activation"]} if pt.get("activation") is not None else None
            out.append(tokens_to_html(pt["tokens"], pt["loss_change"], value_name="Loss change",
                                      extra_measures=extra, kinds=pt.get("token_kinds")))
    return "\n".join(out)


def _heatmap(fig: _Figures, m: Sequence, labels: Sequence[str], title: str, zmin: float, zmax: float) -> str:
    f = go.Figure(go.Heatmap(z=[_nulls(r) for r in m], x=list(labels), y=list(labels), zmin=zmin, zmax=zmax,
                             colorscale="RdBu", reversescale=True, texttemplate="%{z:.2f}"))
    f.update_layout(title=title, xaxis_type="category", yaxis_type="category", yaxis_autorange="reversed")
    return fig(f, height=360)


def _geometry_section(sae: Mapping, fig: _Figures) -> str:
    g = sae["feature_geometry"]
    labels = [f"f{k}" for k in g["features"]]
    out = [
        '<p class="note">How the top features relate. <b>Co-occurrence at P</b>: prompts where both are active, '
        "divided by the smaller count (1 = the rarer feature only fires together with the other) or by the larger "
        "(1 = they fire on exactly the same prompts). <b>Decoder cosine</b> near 1: two features write the same "
        "direction; <b>encoder cosine</b> near 1: they read the same direction. <b>Token kurtosis</b>: how "
        "heavy-tailed the cosine of a feature's output direction with every token's unembedding is (high: it "
        "writes towards a few tokens; near 0: no token stands out).</p>"
    ]
    co = g.get("cooccurrence")
    if co:
        out.append(_heatmap(fig, co["by_min"], labels, "Co-occurrence at P / min count", 0, 1))
        out.append(_heatmap(fig, co["by_max"], labels, "Co-occurrence at P / max count", 0, 1))
    for key, title in (("decoder_cosine", "Decoder cosine similarity"), ("encoder_cosine", "Encoder cosine similarity")):
        if key in g:
            out.append(_heatmap(fig, g[key], labels, title, -1, 1))
    if "token_kurtosis" in g:
        ka = g.get("token_kurtosis_all") or {}
        out.append(_table(["feature", "token kurtosis"], [(k, _num(v, ".2f")) for k, v in
                                                           zip(g["features"], g["token_kurtosis"], strict=True)]))
        if ka.get("counts"):
            e = ka["edges"]
            f = go.Figure(go.Bar(x=[(a + b) / 2 for a, b in zip(e[:-1], e[1:], strict=True)], y=ka["counts"],
                                 marker_color="#8c564b"))
            f.update_layout(title=f"Token kurtosis of all {ka.get('n_features', '')} features (median "
                                  f"{_num(ka.get('median'), '.2f')})", xaxis_title="excess kurtosis",
                            yaxis_title="features")
            out.append(fig(f, height=300))
    return "\n".join(out)


def _span_section(sae: Mapping, fig: _Figures) -> str:
    sp = sae["span_ablation"]
    names = {"clean": "clean", "span_zero": "only the span kept (rest zeroed)",
             "span_mean": "only the span kept (rest mean)"}
    out = [
        f'<p class="note">The activation at P projected onto the span of the decoder vectors of features '
        f"{_esc(', '.join(str(x) for x in sp['features']))} (rank {_esc(sp.get('rank', 'n/a'))}; on average "
        f"{_esc(_num(sp.get('fraction_kept'), '.1%') if _finite(sp.get('fraction_kept')) else 'n/a')} of the "
        "activation's squared norm lies in it), the rest zeroed or replaced by its corpus mean. If the loss stays "
        "near clean, the behaviour runs through these few directions; compare with the zero and mean ablation of "
        "the whole layer above.</p>"
    ]
    rows = []
    for j, v in enumerate(sp["variants"]):
        ci = sp.get("ci95")
        dci = sp.get("diff_vs_clean_ci95")
        rows.append((names.get(v, v), _pm(sp["mean"][j], ci[j] if ci else None),
                     _pm(sp["diff_vs_clean"][j], dci[j] if dci else None) if sp.get("diff_vs_clean") else "n/a"))
    out.append(_table(["run", "loss (nats, 95% CI)", "run - clean (nats, paired)"], rows, left_cols=(0,)))
    return "\n".join(out)


def _layer_comparison_section(r: Mapping, fig: _Figures) -> str:
    lc = r["layer_comparison"]
    out = [
        '<h2 id="layers">Top features of each layer ablated, alone and together</h2>',
        f'<p class="note">On the same {_esc(lc.get("n_prompts", "n/a"))} prompts, each SAE\'s top features ablated '
        f"together at the prediction position ({_esc(lc.get('mode', 'residual'))} mode), then all of them at once "
        "(the reference study compared its top layer-0 and layer-1 features this way): the answer's loss increase "
        "(nats, 95% CI; the same as its log-prob drop). The paired differences say which layer's features matter more for the "
        "answer on the same prompts; if ablating all together costs about the sum, the layers act independently, "
        "if about the larger one, the later features depend on the earlier ones.</p>",
    ]
    runs = lc["runs"]
    rows = [(run["label"], "; ".join(", ".join(str(x) for x in fs) for fs in run.get("features", [])),
             _mci(run["loss_increase"])) for run in runs]
    out.append(_table(["run", "features", "loss increase (nats, 95% CI)"], rows, left_cols=(0, 1)))
    reading = layer_comparison_reading(lc)
    if reading:
        out.append(f'<p class="note"><b>Reading:</b> {_esc(reading)}</p>')
    if lc.get("paired"):
        out.append(_table(["a - b", "loss increase difference (nats, paired 95% CI)"],
                          [(f"{runs[p['a']]['label']} - {runs[p['b']]['label']}", _pm(p["mean"], p.get("ci95")))
                           for p in lc["paired"]], left_cols=(0,)))
    if any(run.get("values") for run in runs):
        f = go.Figure([go.Histogram(x=_nulls(run.get("values", [])), name=_esc(run["label"]), opacity=0.6,
                                    nbinsx=40) for run in runs])
        f.update_layout(barmode="overlay", title="Loss increase per prompt", xaxis_title="loss increase (nats)",
                        yaxis_title="prompts")
        out.append(fig(f, height=340))
    return "\n".join(out)


_STUDY = (
    ("corpus_stats", "corpus", "Corpus statistics"),
    ("loss_comparison", "fiveway", "Five-way loss comparison"),
    ("ablation_modes", "modes", "Ablation modes"),
    ("max_activating_ablation", "stories", "Ablation on max-activating stories"),
    ("feature_geometry", "geometry", "Co-occurrence and geometry"),
    ("span_ablation", "span", "Span of the top decoder vectors"),
)


def _study_sections(sae: Mapping, fig: _Figures, sid: str) -> list[str]:
    out = []
    for key, slug, title in _STUDY:
        if not sae.get(key):
            continue
        out.append(f'<h3 id="{sid}-{slug}">{_esc(title)}</h3>')
        if key == "corpus_stats":
            out.append(_corpus_section(sae, fig, sid))
        elif key == "loss_comparison":
            out.append(_five_way_section(sae, fig))
        elif key == "ablation_modes":
            out.append(_modes_section(sae))
        elif key == "max_activating_ablation":
            out.append(_stories_section(sae, fig, sid))
        elif key == "feature_geometry":
            out.append(_geometry_section(sae, fig))
        else:
            out.append(_span_section(sae, fig))
    return out


def _stand_in(a: Mapping | None) -> str:
    """A verdict on an estimate from its agreement with the exact values."""
    if not a or not _finite(a.get("spearman")):
        return "undefined (too few values)"
    ok = a["spearman"] >= 0.9 and (a.get("top_overlap") or 0) >= 0.8 and (a.get("sign_agreement") or 0) >= 0.9
    top_sign = a.get("top_sign_agreement")
    if top_sign is not None:  # results written before this key existed are judged on the other three
        ok = ok and top_sign >= 0.9
    return "yes" if ok else "no"


def _circuit_section(r: Mapping, fig: _Figures) -> str:
    """Nodes and edges at P across the SAEs, exact vs estimated, and the chosen circuit's faithfulness."""
    c = r.get("circuit")
    if not c:
        return ""
    nodes = {n["id"]: n for n in c["nodes"]}
    sel = c.get("selection") or {}
    out = ['<h2 id="circuit">Feature circuit across layers</h2>']
    out.append(
        '<p class="note">Every feature active at the prediction position P in any SAE, one error node per SAE, '
        "every attention head, MLPs without an SAE and the embeddings are nodes. A node's <b>effect</b> is the "
        "exact drop of the answer's log-prob (nats) when it alone is ablated at P (features: their decoded "
        "contribution removed, the SAE error kept), averaged over prompts; an <b>edge</b> u&rarr;d is the exact "
        "drop of feature d's activation when u alone is ablated. Attribution patching (AtP) and integrated "
        "gradients (IG, per submodule as in Sparse Feature Circuits) estimate the same numbers from gradients. "
        "IG moves every node of a submodule from clean to ablated together, so a node's IG is its share of the "
        "submodule's joint ablation (with the other nodes' interactions in it) and can differ from its single-node "
        "ablation whenever the nodes interact; "
        f"the tables below say how well they agree with the exact values. {c.get('n_nodes_total', len(nodes))} "
        f"nodes, {c.get('n_edges_total', '?')} non-zero edges; the full graph is in "
        f"<code>{_esc(c.get('file', 'circuit.json'))}</code>.</p>"
    )
    circ = [n for n in c["nodes"] if n.get("in_circuit")]
    if sel:
        out.append(
            f'<p class="note">Circuit: {_esc(sel.get("n_nodes", len(circ)))} nodes ({_esc(sel.get("rule", ""))}); '
            f"faithfulness {_esc(_num(sel.get('faithfulness'), '.3f'))} (the answer's log-prob with every other node "
            "mean-ablated, on the scale clean = 1, everything mean-ablated = 0), completeness "
            f"{_esc(_num(sel.get('completeness'), '.3f'))} (what is left when the circuit itself is mean-ablated; "
            f"0 = nothing). Edges: {_esc(sel.get('edge_rule', ''))}."
            + (f" Mean ablation replaces a node by {_esc(sel['mean_ablation'])}." if sel.get("mean_ablation") else "")
            + "</p>"
        )
        if sel.get("undefined_reason"):
            out.append(f'<div class="warn"><b>Faithfulness and completeness are undefined:</b> '
                       f"{_esc(sel['undefined_reason'])}; there is no effect for a circuit to explain.</div>")
    # the graph: columns by layer/stage, node size by |effect|, edge width by |exact|, colour by sign
    stage_of = {}
    for n in circ:
        st = (n.get("layer", -1), 0 if n.get("kind") in ("head", "embed", "pos_embed") else 1)
        stage_of[n["id"]] = st
    if circ:
        cols = sorted(set(stage_of.values()))
        pos = {}
        for ci, st in enumerate(cols):
            members = sorted([n for n in circ if stage_of[n["id"]] == st], key=lambda n: -abs(n["effect"] or 0))
            for k, n in enumerate(members):
                pos[n["id"]] = (ci, -k)
        target_x = len(cols)
        f = go.Figure()
        biggest = max((abs(e["exact"] or 0) for e in c["edges"]), default=0) or 1.0
        for e in c["edges"]:
            if e["source"] not in pos or e["target"] not in pos:
                continue
            (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
            v = e["exact"] or 0
            f.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                   line={"width": 1 + 7 * abs(v) / biggest,
                                         "color": "rgba(214,39,40,0.55)" if v > 0 else "rgba(31,119,180,0.55)"}))
        top_eff = max((abs(n["effect"] or 0) for n in circ), default=0) or 1.0
        for n in circ:  # edges into the answer: the node effects
            x0, y0 = pos[n["id"]]
            v = n["effect"] or 0
            f.add_trace(go.Scatter(x=[x0, target_x], y=[y0, 0], mode="lines", hoverinfo="skip", showlegend=False,
                                   line={"width": 1 + 5 * abs(v) / top_eff, "dash": "dot",
                                         "color": "rgba(214,39,40,0.35)" if v > 0 else "rgba(31,119,180,0.35)"}))
        f.add_trace(go.Scatter(
            x=[pos[n["id"]][0] for n in circ] + [target_x], y=[pos[n["id"]][1] for n in circ] + [0],
            mode="markers+text", text=[_esc(n["label"]) for n in circ] + ["answer"], textposition="top center",
            marker={"size": [10 + 20 * abs(n["effect"] or 0) / top_eff for n in circ] + [24],
                    "color": ["#d62728" if (n["effect"] or 0) > 0 else "#1f77b4" for n in circ] + ["#2ca02c"]},
            hovertext=[_esc(f"{n['label']}: effect {_num(n['effect'])} nats; AtP {_num(n.get('atp'))}; "
                            f"IG {_num(n.get('ig'))}; active on {n.get('n_active_prompts', '?')} prompts; "
                            f"promotes {', '.join(visible_token(t) for t in n.get('top_tokens') or []) or 'n/a'}")
                       for n in circ] + ["answer log-prob"],
            hoverinfo="text", showlegend=False))
        f.update_layout(title="Circuit at P (red: supports the answer / excites; blue: opposes / inhibits)",
                        xaxis={"tickvals": list(range(len(cols))) + [target_x],
                               "ticktext": [("embed" if lay < 0 else f"L{lay} {'attn' if s == 0 else 'MLP'}")
                                            for lay, s in cols] + ["answer"]},
                        yaxis={"visible": False})
        out.append(fig(f, height=max(380, 60 * max(len([1 for n in circ if stage_of[n['id']] == st])
                                                     for st in cols))))
    rows = [(n["label"], _num(n["effect"]), _num(n.get("effect_ci95")), _num(n.get("atp")), _num(n.get("ig")),
             "yes" if n.get("in_circuit") else "", ", ".join(visible_token(t) for t in n.get("top_tokens") or []))
            for n in c["nodes"][:25]]
    out.append(_table(["node", "effect (nats)", "±95%", "AtP", "IG", "in circuit", "promotes"], rows,
                      left_cols=(0, 6)))
    ag = c.get("agreement") or {}
    arows = []
    for what in ("nodes", "edges"):
        for method in ("atp", "ig"):
            a = (ag.get(what) or {}).get(method)
            if a:
                arows.append((what, method.upper(), a.get("n"), _num(a.get("spearman"), ".3f"),
                              _num(a.get("sign_agreement"), ".3f"), _num(a.get("top_overlap"), ".2f"),
                              _num(a.get("top_sign_agreement"), ".2f"), _stand_in(a)))
    if arows:
        out.append('<p class="note">Agreement of each estimate with the exact values: Spearman rank correlation, '
                   "share of matching signs, the share of the exact top-20 (by magnitude) found in the "
                   "estimate's top-20, and the share of the exact top-20 whose estimate has the right sign. An "
                   "estimate can stand in for exact ablation here when all four are high (&ge; 0.9, 0.9, 0.8, "
                   "0.9): thousands of tiny effects can give a high rank correlation while the largest ones, "
                   "which the circuit is read from, are wrong.</p>")
        out.append(_table(["", "estimate", "n", "Spearman", "sign agreement", "top-20 overlap",
                           "top-20 sign agreement", "can stand in"], arows, left_cols=(0, 1, 7)))
    pts = [n for n in c["nodes"] if _finite(n.get("effect"))]
    if pts:
        f = go.Figure()
        for method, colour in (("atp", "#ff7f0e"), ("ig", "#9467bd")):
            xs = [n["effect"] for n in pts if _finite(n.get(method))]
            ys = [n[method] for n in pts if _finite(n.get(method))]
            if xs:
                f.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=method.upper(), marker={"color": colour},
                                       text=[_esc(n["label"]) for n in pts if _finite(n.get(method))]))
        lim = max(abs(n["effect"]) for n in pts) or 1.0
        f.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="estimate = exact",
                               line={"dash": "dash", "color": "#888"}))
        f.update_layout(title="Node effects: gradient estimates vs exact ablation", xaxis_title="exact (nats)",
                        yaxis_title="estimate (nats)")
        out.append(fig(f, height=420))
    curve = c.get("faithfulness") or []
    if curve:
        f = go.Figure()
        for key, name in (("faithfulness", "faithfulness (circuit alone)"),
                          ("completeness", "completeness (circuit ablated)")):
            f.add_trace(go.Scatter(x=[p["n_nodes"] for p in curve], y=_nulls([p.get(key) for p in curve]),
                                   mode="lines+markers", name=name))
        f.update_layout(title="Faithfulness and completeness vs circuit size (nodes by |exact effect|)",
                        xaxis_title="nodes in the circuit", xaxis_type="log", yaxis_title="fraction of the effect")
        out.append(fig(f, height=380))
    vw = c.get("virtual_weights") or []
    if vw:
        out.append('<p class="note">The reference follow-up\'s weight-based edges for the strongest exact '
                   "feature-to-feature edges: W<sub>dec</sub>W<sub>out</sub>W<sub>in</sub>W<sub>enc</sub> "
                   "(raw, and as a cosine), with the second block's norm centring and weight applied, ignoring its "
                   "per-prompt scale and the MLP non-linearity.</p>")
        out.append(_table(["source", "target", "exact edge", "prompts", "virtual (raw)", "virtual (cosine)"],
                          [(v["source"], v["target"], _num(v["exact"]), v["n_prompts"], _num(v["virtual_raw"]),
                            _num(v["virtual_cosine"], ".3f")) for v in vw[:15]], left_cols=(0, 1)))
    return "\n".join(out)


def _appendix(r: Mapping) -> str:
    out = ['<h2 id="appendix">Appendix</h2>']
    timings = r.get("timings") or {}
    if timings:
        out.append("<h3>Timings</h3>")
        out.append(
            _table(["stage", "seconds"], [(k, _num(v, ".1f")) for k, v in timings.items()], left_cols=(0,))
        )
    for i, sae in enumerate(r["saes"]):
        if sae.get("training"):
            out.append(f"<h3>Training: SAE {i} ({_esc(sae['hook_point'])})</h3>")
            out.append(f'<pre class="json">{_esc(json.dumps(to_jsonable(sae["training"]), indent=1))}</pre>')
    if r.get("config"):
        out.append("<h3>Config</h3>")
        out.append(f'<pre class="json">{_esc(json.dumps(to_jsonable(r["config"]), indent=1))}</pre>')
    if r.get("notes"):
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in r["notes"]) + "</ul>")
    ver = r.get("saecircuits_version")
    out.append(
        f'<p class="muted">results.json schema version {_esc(r["schema_version"])}'
        + (f", saecircuits {_esc(ver)}" if ver else "")
        + ".</p>"
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Summary first: headline, checks, loss recovered, top features with a reading, circuit; glossary; browser
# ---------------------------------------------------------------------------------------------------------------


def _quality_rows(sae: Mapping) -> list[tuple[str, str]]:
    """The SAE's training quality, each labelled with where it is measured (training tokens or the corpus)."""
    fm = (sae.get("training") or {}).get("final_metrics") or {}
    cs = sae.get("corpus_stats") or {}
    rows = []
    if fm:
        n_tok = (sae.get("training") or {}).get("tokens")
        where = f"over its last training batch ({n_tok} training tokens in all)" if n_tok else "over its last training batch"
        rows += [
            (f"L0 {where}", _num(fm.get("l0"), ".2f")),
            (f"explained variance across tokens, {where}", _num(fm.get("explained_variance_tokens"), ".4f")),
            (f"shrinkage |x_hat| / |x| {where} (1 = none)", _num(fm.get("shrinkage"), ".3f")),
            (f"dead fraction (no firing in the training window) {where}", _num(fm.get("dead_fraction"), ".3f")),
            (f"dense fraction (firing on > 10% of tokens) {where}", _num(fm.get("dense_fraction"), ".3f")),
        ]
    if cs:
        d_sae = sae.get("d_sae") or 0
        dense = None
        edges, counts = cs.get("density_log10_edges"), cs.get("density_log10_counts")
        if edges and counts and d_sae:
            dense = sum(c for lo, c in zip(edges[:-1], counts, strict=True) if lo >= -1.0) / d_sae
        rows += [
            (f"L0 over all {cs['n_tokens']} counted corpus tokens", _num(cs.get("l0"), ".2f")),
            ("dead fraction over the corpus (never fires)",
             _num(cs["n_dead"] / d_sae, ".3f") if cs.get("n_dead") is not None and d_sae else "n/a"),
            ("dense fraction over the corpus (density >= 0.1)", _num(dense, ".3f")),
        ]
    return rows


def _sae_quality(sae: Mapping) -> str:
    rows = _quality_rows(sae)
    if not rows:
        return ('<p class="note">No training metrics recorded for this SAE (an SAE given with --sae); L0 and '
                "explained variance above are at P only.</p>")
    return ('<p class="note">The SAE\'s quality where it was trained and over the corpus (the rows above are at P, '
            "the position this report studies):</p>" + _table(["quantity", "value"], rows, left_cols=(0,)))


def _surprise_notes(sae: Mapping, r: Mapping) -> str:
    return "".join(f'<p class="surprise">{_esc(t)}</p>' for t in surprises(sae, r))


def _checks_block(r: Mapping) -> str:
    """The checks of results.json (whether the model performs the behaviour, warnings), when it has them."""
    checks = r.get("checks")
    if checks is None:
        return ""
    if not checks:
        return '<p class="note"><b>Checks:</b> all passed.</p>'
    items = "".join(
        f"<li>{_esc(c.get('scope', ''))}: {_esc(c.get('message', ''))}"
        + (f" <i>Try:</i> {_esc(c['what_to_try'])}" if c.get("what_to_try") else "") + "</li>"
        for c in checks if isinstance(c, Mapping))
    return f'<div class="warn"><b>{len(checks)} check(s) failed.</b><ul>{items}</ul></div>'


def _summary_section(r: Mapping) -> str:
    """Summary first: the headline in plain words, the checks, loss recovered per SAE, the top features each with
    a one-line reading, and the circuit."""
    out = ['<section class="summary" id="summary"><h2>Summary</h2>']
    out += [f'<p class="headline">{_esc(t)}</p>' for t in headline(r)]
    out.append(_checks_block(r))
    task = r["task"]
    answers = ", ".join(visible_token(t) for t in task.get("answer_tokens") or []) or ", ".join(
        f"id {i}" for i in task["answer_token_ids"])
    out.append(_table(None, [("Model", model_name(r)), ("Task", task["name"]), ("Prompts", task["n_prompts"]),
                             ("Answer token(s)", answers)], left_cols=(0, 1)))
    if r["saes"]:
        rows = []
        for i, sae in enumerate(r["saes"]):
            sup = sum(1 for t in sae.get("top_features") or []
                      if supported(t["loss_increase"], t.get("loss_increase_ci95")))
            rows.append((f"SAE {i}: {sae['hook_point']}", _lr_cell(sae, "loss_recovered"),
                         _lr_cell(sae, "loss_recovered_mean_ablation"), _seq_ratio(sae),
                         _num((sae.get("whole_sequence") or {}).get("explained_variance"), ".3f"),
                         _num(sae.get("explained_variance"), ".3f"), _num(sae["l0"], ".1f"), sup))
        out.append(_table(["SAE", "loss recovered at P vs zero ablation (95% CI)", "vs mean ablation (95% CI)",
                           "loss recovered over every position (95% CI)", "explained variance over every position",
                           "explained variance at P", "L0 at P", "features with a supported effect"], rows,
                          left_cols=(0,)))
        for i, sae in enumerate(r["saes"]):
            out.append(_surprise_notes(sae, r))
            ranked = _sorted_features(sae)[:5]
            if ranked:
                out.append(f'<p class="note"><b>Top features of SAE {i} ({_esc(sae["hook_point"])})</b>, by loss '
                           "increase when ablated alone at P (open any in the feature browser below):</p>")
                rows = []
                for t in ranked:
                    k = int(t["feature"])
                    rows.append((f'<a href="#card-sae-{i}-f{k}">f{k}</a>',
                                 _esc(_pm(t["loss_increase"], t.get("loss_increase_ci95"))),
                                 _esc(feature_reading(sae, k) or "n/a")))
                out.append(_html_table(["feature", "loss increase (nats, 95% CI)", "reading"], rows,
                                       [[t["feature"], _pm(t["loss_increase"], t.get("loss_increase_ci95")),
                                         feature_reading(sae, int(t["feature"]))] for t in ranked]))
    c = r.get("circuit")
    if c and c.get("selection"):
        sel = c["selection"]
        out.append(f'<p class="note"><b>Circuit:</b> {_esc(sel.get("n_nodes", "?"))} nodes, faithfulness '
                   f"{_esc(_num(sel.get('faithfulness'), '.3f'))}, completeness "
                   f"{_esc(_num(sel.get('completeness'), '.3f'))} (<a href=\"#circuit\">details</a>).</p>")
    out.append("</section>")
    return "\n".join(x for x in out if x)


def _lr_cell(sae: Mapping, key: str) -> str:
    """A loss recovered with its CI, flagged when it cannot be read as a result (:func:`summary.ratio_problem`)."""
    text = _pm(sae.get(key), sae.get(f"{key}_ci95"), ".3f")
    return text + (" (cannot be read: see below)" if ratio_problem(sae, key) is not None else "")


def _html_table(headers: Sequence[str], cells_html: Sequence[Sequence[str]], plain: Sequence[Sequence[Any]]) -> str:
    """A table whose cells are ALREADY-ESCAPED HTML (links); ``plain`` is the same table as text for the export."""
    sink = _TABLES.get()
    if sink is not None:
        sink.append(headers, plain)
    out = ['<table class="data"><thead><tr>' + "".join(f'<th class="l">{_esc(h)}</th>' for h in headers)
           + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f'<td class="l">{c}</td>' for c in row) + "</tr>" for row in cells_html]
    out.append("</tbody></table>")
    return "".join(out)


def _glossary() -> str:
    items = "".join(f"<dt>{_esc(term)}</dt><dd>{_esc(text)}</dd>" for term, text in GLOSSARY)
    return f'<dl class="glossary">{items}</dl>'


def _browser_section(r: Mapping) -> str:
    n = sum(len({e["feature"] for e in sae.get("feature_effects") or []} |
                {t["feature"] for t in sae.get("top_features") or []}) for sae in r["saes"])
    return (
        '<p class="note">Every feature with any evidence in this run (' + _esc(n) + " or more), sorted by its effect: "
        "the exact loss increase when it alone is ablated at P (nats, 95% CI; highlighted rows: the interval "
        "excludes 0). Search by feature number or by a token it fires on; a card shows what is known of the "
        "feature: its activation histogram and density, top activating examples with tokens coloured by activation "
        "(hover a token for its value and position), examples from lower bands, its activation on the task "
        "prompts, log-prob and logit boosts, loss increase per prompt, and DFA.</p>"
        '<div id="feature-browser"><noscript>The feature browser needs JavaScript.</noscript></div>'
    )


def _section(sid: str, title: str, body: Sequence[str] | str, *, open_: bool = False) -> str:
    """A collapsible top-level section: ``<details>`` whose summary is the ``<h2 id=sid>`` heading."""
    inner = body if isinstance(body, str) else "\n".join(b for b in body if b)
    return (f'<details class="section"{" open" if open_ else ""}><summary><h2 id="{_esc(sid)}">{_esc(title)}</h2>'
            f"</summary>\n{inner}\n</details>")


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


def build_report(results: Mapping) -> Report:
    """Build the report page and collect its figures and tables.

    Layout: title; summary first (headline in plain words, checks when results.json has them, loss recovered per
    SAE with CIs, the top features each with a one-line reading, the circuit); the glossary; the feature browser
    (every feature with any evidence, cards built lazily in the page from JSON embedded once); then the detailed
    sections, each collapsible: direct logit attribution, one section per SAE, the layer comparison, the circuit,
    the appendix. plotly.js is inlined once (:func:`plotly_bundle`); every figure is drawn when it scrolls into view.

    Raises:
        ResultsSchemaError: ``results`` does not match results.json schema version 2 (or 1, upgraded).
    """
    results = upgrade_results(results)
    validate_results(results)
    sink = _TableSink()
    token = _TABLES.set(sink)
    try:
        fig = _Figures()
        _set_where(fig, "summary")
        summary = _summary_section(results)
        _set_where(fig, "header")
        header = _header(results)
        toc = ['<li><a href="#summary">Summary</a></li>', '<li><a href="#glossary">Glossary</a></li>',
               '<li><a href="#browser">Feature browser</a></li>',
               '<li><a href="#dla">Direct logit attribution</a></li>']
        _set_where(fig, "checks")
        checks_html = _checks_section(results)
        body = []
        if checks_html:
            n = len(results.get("checks") or [])
            toc.insert(3, '<li><a href="#checks">Checks</a>' + (f' <span class="muted">({n} warning(s))</span>' if n
                                                                 else "") + "</li>")
            body.append(_section("checks", "Checks", checks_html.replace('<h2 id="checks">Checks</h2>', "", 1),
                                 open_=True))
        _set_where(fig, "dla")
        body += [_section("dla", "Direct logit attribution", _dla_section(results, fig).replace(
            '<h2 id="dla">Direct logit attribution</h2>', "", 1))]
        for i, sae in enumerate(results["saes"]):
            sid = f"sae-{i}"
            _set_where(fig, f"{sid}-{_slug(sae['hook_point'])}")
            title = _sae_title(i, sae)
            top = ", ".join(f"f{t['feature']}" for t in _sorted_features(sae)[:5])
            flagged = any(c["scope"] in ("task", sae["hook_point"]) for c in results.get("checks") or [])
            toc.append(
                f'<li><a href="#{sid}">{_esc(title)}</a>'
                + (' <b style="color:#c0392b">checks failed</b>' if flagged else "")
                + (f' <span class="muted">top features: {_esc(top)}</span>' if top else "")
                + f'<ul><li><a href="#{sid}-summary">summary</a></li>'
                f'<li><a href="#{sid}-features">top features</a></li>'
                + (
                    f'<li><a href="#{sid}-effects">every active feature</a></li>'
                    if sae.get("feature_effects")
                    else ""
                )
                + f'<li><a href="#{sid}-multi">multi-feature ablation</a></li>'
                f'<li><a href="#{sid}-examples">activating examples</a></li>'
                + "".join(
                    f'<li><a href="#{sid}-{slug}">{_esc(title.lower())}</a></li>'
                    for key, slug, title in _EVIDENCE + _STUDY
                    if sae.get(key)
                )
                + "</ul></li>"
            )
            warning = _sae_warning(results, sae)
            part = [warning, f'<h3 id="{sid}-summary">Summary</h3>', _sae_summary(sae, fig),
                    _surprise_notes(sae, results), _sae_quality(sae), f'<h3 id="{sid}-features">Top features</h3>',
                    _sae_warning_again(results, sae), _features_section(sae, fig)]
            if sae.get("feature_effects"):
                part += [f'<h3 id="{sid}-effects">Exact effects of every active feature</h3>',
                         _effects_section(sae, fig)]
            part += [f'<h3 id="{sid}-multi">Multi-feature ablation</h3>', _multi_section(sae, fig),
                     f'<h3 id="{sid}-examples">Activating examples</h3>', _examples_section(sae, sid)]
            part += _evidence_sections(sae, fig, sid)
            part += _study_sections(sae, fig, sid)
            body.append(_section(sid, title, part))
        if results.get("layer_comparison"):
            _set_where(fig, "layers")
            toc.append('<li><a href="#layers">Top features of each layer, alone and together</a></li>')
            lc_html = _layer_comparison_section(results, fig)
            lc_title = "Top features of each layer ablated, alone and together"
            body.append(_section("layers", lc_title, lc_html.replace(f'<h2 id="layers">{lc_title}</h2>', "", 1)))
        if not results["saes"]:
            body.append('<p class="muted">No SAEs in these results.</p>')
        if results.get("circuit"):
            _set_where(fig, "circuit")
            toc.append('<li><a href="#circuit">Feature circuit across layers</a></li>')
            c_html = _circuit_section(results, fig).replace('<h2 id="circuit">Feature circuit across layers</h2>', "", 1)
            body.append(_section("circuit", "Feature circuit across layers", c_html))
        toc.append('<li><a href="#appendix">Appendix</a></li>')
        _set_where(fig, "appendix")
        body.append(_section("appendix", "Appendix", _appendix(results).replace('<h2 id="appendix">Appendix</h2>', "", 1)))
        browser = browser_payload(results)
        js, bundle = plotly_bundle(fig.trace_types)
    finally:
        _TABLES.reset(token)
    task = results["task"]
    name = model_name(results)
    title = f"saecircuits report: {task['name']} on {name}"
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            f'<script type="text/javascript">{js}</script>',
            "</head><body>",
            f"<h1>SAE circuit report: {_esc(task['name'])} on {_esc(name)}</h1>",
            summary,
            _section("glossary", "Glossary", _glossary()),
            _section("browser", "Feature browser", _browser_section(results), open_=True).replace(
                '<details class="section" open>', '<details class="section" open id="browser-section">', 1),
            _section("run", "The run: model, task, prompts", header, open_=True),
            '<nav class="toc"><b>Contents</b><ul>' + "".join(toc) + "</ul></nav>",
            *body,
            embed_json("sc-figs", fig.payload()),
            embed_json("sc-browser", browser),
            f"<script>{_page_js()}</script>",
            "</body></html>",
        ]
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
            ("encoder bias b_enc[k]", _num(so.get("b_enc"))), ("decoder norm |W_dec[k]|", _num(so.get("decoder_norm")))]
    if card.get("model"):
        rows.append(("model", card["model"]))
    if card.get("task"):
        rows.append(("task", f"{card['task']['name']}, {card['task']['n_prompts']} prompts"))
    notes = "".join(f'<p class="note">{_esc(n)}</p>' for n in card.get("notes") or [])
    if not card.get("model"):
        notes += ('<p class="note">Only the SAE was given: add --model (weight-based logit boosts) and --data (corpus '
                  "statistics, examples, and the feature's effect on the task prompts).</p>")
    browser = browser_payload(card)
    js, _ = plotly_bundle(set())
    title = f"Feature {k} of {sae['hook_point']}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>", f'<script type="text/javascript">{js}</script>', "</head><body>",
        f"<h1>{_esc(title)}</h1>", _table(None, rows, left_cols=(0, 1)), notes,
        f'<div id="feature-browser" data-open="card-sae-0-f{k}"></div>',
        embed_json("sc-browser", browser), f"<script>{_page_js()}</script>", "</body></html>"])


def build_report_html(results: Mapping) -> str:
    """The report page as a string (see :func:`build_report` for its layout).

    Raises:
        ResultsSchemaError: ``results`` does not match results.json schema version 2 (or 1, upgraded).
    """
    return build_report(results).html


def render_report(results: Mapping, out_path: str | os.PathLike) -> Path:
    """Validate ``results`` and write the self-contained HTML report to ``out_path`` atomically.

    The page inlines plotly.js once (the 1.5 MB cartesian bundle; see :func:`plotly_bundle`) and needs no network
    to view. Reads nothing but ``results``.

    Raises:
        ResultsSchemaError: ``results`` does not match results.json schema version 2 or 1 (message names the key);
            nothing is written then.
    Returns:
        The path written.
    """
    text = build_report_html(results)
    return write_text_atomic(out_path, text)
