"""The rest of the reference study (optional keys; pipeline.study_sae / study_run): corpus statistics, the
five-way loss comparison, the three ablation modes, ablation on max-activating stories, co-occurrence and decoder
geometry, the span ablation (per SAE); and the layer comparison (top-level).

Templates: ``study.html.j2``, ``layers.html.j2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from markupsafe import Markup

from saecircuits.display import percent
from saecircuits.report.sections.common import (
    OFF_RANGE_UNDEFINED,
    STATIC_FEATURES,
    Figures,
    Plot,
    error_bars,
    finite,
    mci,
    nulls,
    num,
    off_range_text,
    off_range_undefined,
    otherwise,
    plotly_text,
    pm,
    table,
)
from saecircuits.report.summary import layer_comparison_reading
from saecircuits.report.tokens_html import tokens_to_html, visible_token
from saecircuits.results import Results, SaeEntry

STUDY = (
    ("corpus_stats", "corpus", "Corpus statistics"),
    ("loss_comparison", "fiveway", "Five-way loss comparison"),
    ("ablation_modes", "modes", "Ablation modes"),
    ("max_activating_ablation", "stories", "Ablation on max-activating stories"),
    ("feature_geometry", "geometry", "Co-occurrence and geometry"),
    ("span_ablation", "span", "Span of the top decoder vectors"),
)
"""(key of the SAE entry, anchor slug, heading) of each part, in page order."""

ABLATION_MODES = ("residual", "reconstruction", "clean_effect")


def _token_pairs(pairs: Sequence) -> str:
    return ", ".join(f"{visible_token(t)} ({c})" for t, c in pairs) or "none"


def corpus(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """Density and activation histograms, per-feature statistics and examples in bands of the corpus maximum."""
    cs = sae.corpus_stats
    out: dict[str, Any] = {
        "n_docs": cs.n_docs, "n_tokens": cs.n_tokens, "token_fraction": num(cs.token_fraction, ".2f"),
        "table": table(
            ["quantity", "value"],
            [
                ("documents / counted tokens", f"{cs.n_docs} / {cs.n_tokens}"),
                ("L0 (mean active features per counted token)", num(cs.l0, ".2f")),
                ("dead features (never fire)", otherwise(cs.n_dead, "n/a")),
            ],
            left_cols=(0,),
        ),
        "density_plot": None, "n_features": len(cs.features), "static": STATIC_FEATURES, "features": None,
    }
    edges, counts = cs.density_log10_edges, cs.density_log10_counts
    if edges and counts:
        f = go.Figure(
            go.Bar(x=[(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)], y=counts,
                   width=[b - a for a, b in zip(edges[:-1], edges[1:], strict=True)], marker_color="#1f77b4")
        )
        f.update_layout(title="Feature density over the corpus (features that fire at least once)",
                        xaxis_title="log10 density (fraction of tokens with f > 0)", yaxis_title="features")
        out["density_plot"] = fig(f, height=320)
    feats = cs.features[:STATIC_FEATURES]
    if not feats:
        return out
    rows = [
        (fe.feature, num(fe.density, ".2e"), num(fe.max_activation, ".3f"),
         num(fe.mean_when_active, ".3f"), _token_pairs(fe.top_tokens[:6]), num(fe.top_token_share, ".2f"))
        for fe in feats
    ]
    part: dict[str, Any] = {
        "table": table(["feature", "density", "corpus max", "mean when active", "top tokens (count)",
                        "top-token share"], rows, left_cols=(4,)),
        "activation_plot": None,
        "bands": [],
    }
    a_edges = cs.activation_log10_edges
    if a_edges:
        centres = [(a + b) / 2 for a, b in zip(a_edges[:-1], a_edges[1:], strict=True)]
        f = go.Figure(
            [go.Scatter(x=centres, y=fe.activation_log10_counts, mode="lines", name=f"f{fe.feature}")
             for fe in feats if fe.activation_log10_counts]
        )
        f.update_layout(title="Activation histogram of the top features (tokens where each fires)",
                        xaxis_title="log10 activation", yaxis_title="tokens")
        part["activation_plot"] = fig(f, height=320)
    for fe in feats:
        bands = fe.band_examples or {}
        if not any(bands.values()):
            continue
        mx = fe.max_activation if finite(fe.max_activation) else None
        part["bands"].append({"feature": fe.feature, "slug": int(fe.feature), "examples": [
            {"band": band, "doc": otherwise(ex.doc_index, "n/a"), "max": num(ex.max_activation),
             # tokens_to_html escapes every token itself (report/tokens_html.py): trusted HTML, shown as is
             "tokens": Markup(tokens_to_html(ex.tokens, ex.activations, max_value=mx, kinds=ex.token_kinds))}
            for band, exs in bands.items() for ex in exs]})
    out["features"] = part
    return out


def five_way(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """The answer loss under clean, mean- and zero-ablated, top features ablated, and SAE spliced runs."""
    lc = sae.loss_comparison
    labels, means, cis = lc.labels, lc.mean, lc.ci95
    diffs, dcis = lc.diff_vs_clean, lc.diff_vs_clean_ci95
    rows = [(lab, pm(means[j], cis[j] if cis else None), pm(diffs[j], dcis[j] if dcis else None) if diffs else "n/a")
            for j, lab in enumerate(labels)]
    tab = table(["run", "loss (nats, 95% CI)", "run - clean (nats, paired 95% CI)"], rows, left_cols=(0,))
    extra = []
    if lc.features_minus_sae is not None:
        extra.append(f"Top features ablated - SAE spliced: {mci(lc.features_minus_sae)} nats.")
    for off, what in ((lc.off_range, "Top-features run"), (lc.sae_off_range, "SAE run")):
        if text := off_range_text(off):
            extra.append(f"{what}: {text}")
    f = go.Figure(go.Bar(x=[plotly_text(x) for x in labels], y=nulls(means), error_y=error_bars(means, cis),
                         marker_color=["#2ca02c", "#bcbd22", "#7f7f7f", "#d62728", "#1f77b4"][: len(labels)]))
    f.update_layout(title="Ablation loss comparison at the prediction position", yaxis_title="loss (nats)",
                    xaxis_type="category")
    return {"n_prompts": otherwise(lc.n_prompts, "n/a"), "hook_point": sae.hook_point,
            "features": ", ".join(str(x) for x in lc.features or []) or "(none)",
            "mode": otherwise(lc.mode, "residual"), "table": tab, "extra": " ".join(extra), "plot": fig(f, height=380)}


def modes(sae: SaeEntry) -> dict[str, Any]:
    """The top features ablated alone in the three ablation modes (and together), with off-range notes."""
    am = sae.ablation_modes
    desc = am.descriptions or {}
    rows = [(r.feature, *[mci(getattr(r, m)) for m in ABLATION_MODES]) for r in am.rows]
    multi = am.multi or {}
    if multi:
        rows.append(("together: " + ", ".join(str(x) for x in am.multi_features or []),
                     *[mci(multi.get(m)) for m in ABLATION_MODES]))
    offs = am.off_range or {}
    return {
        "descriptions": [(m, desc[m]) for m in ABLATION_MODES if m in desc] if desc else None,
        "table": table(["feature", *ABLATION_MODES], rows, left_cols=(0,)),
        "off_range": " ".join(f"{m}: {off_range_text(offs[m])}" for m in ABLATION_MODES if off_range_text(offs.get(m))),
    }


def stories(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """Each feature ablated on the corpus stories where it fires most: global and per-position effects, the
    per-position histogram and the loss change per token."""
    entries = sae.max_activating_ablation
    tab = table(["feature", "stories", "threshold", "global: loss increase (nats)",
                 "per position: loss increase (nats)", "mode"],
                [(st.feature, otherwise(st.n_stories, "n/a"), num(st.threshold, ".3f"), mci(st.global_),
                  mci(st.per_position), otherwise(st.mode, "residual")) for st in entries])
    shown = []
    for st in entries[:STATIC_FEATURES]:
        k = int(st.feature)
        vals = st.position_loss_increase or []
        plot: Plot | None = None
        if vals:
            f = go.Figure(go.Histogram(x=nulls(vals), nbinsx=40, marker_color="#d62728"))
            f.update_layout(title=f"Feature {k}: loss increase when ablated at one active position",
                            xaxis_title="loss increase (nats)", yaxis_title="(story, position) pairs")
            plot = fig(f, height=300)
        tokens = []
        for pt in st.per_token or []:
            extra = {"activation": pt.activation} if pt.activation is not None else None
            tokens.append({"anchor": otherwise(pt.doc_index, ""), "doc": otherwise(pt.doc_index, "n/a"),
                           # tokens_to_html escapes every token itself (report/tokens_html.py): trusted HTML
                           "tokens": Markup(tokens_to_html(pt.tokens, pt.loss_change, value_name="Loss change",
                                                           extra_measures=extra, kinds=pt.token_kinds))})
        shown.append({"feature": k, "plot": plot, "off_range": off_range_text(st.off_range) or None,
                      "per_token": tokens})
    return {"table": tab, "features": shown}


def _heatmap(fig: Figures, m: Sequence, labels: Sequence[str], title: str, zmin: float, zmax: float) -> Plot:
    f = go.Figure(go.Heatmap(z=[nulls(r) for r in m], x=list(labels), y=list(labels), zmin=zmin, zmax=zmax,
                             colorscale="RdBu", reversescale=True, texttemplate="%{z:.2f}"))
    f.update_layout(title=title, xaxis_type="category", yaxis_type="category", yaxis_autorange="reversed")
    return fig(f, height=360)


def geometry(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """Co-occurrence at P and decoder/encoder cosines of the top features (heat-maps), token kurtosis."""
    g = sae.feature_geometry
    labels = [f"f{k}" for k in g.features]
    plots = []
    co = g.cooccurrence
    if co is not None:
        plots.append(_heatmap(fig, co.by_min, labels, "Co-occurrence at P / min count", 0, 1))
        plots.append(_heatmap(fig, co.by_max, labels, "Co-occurrence at P / max count", 0, 1))
    for key, title in (("decoder_cosine", "Decoder cosine similarity"), ("encoder_cosine", "Encoder cosine similarity")):
        if getattr(g, key) is not None:
            plots.append(_heatmap(fig, getattr(g, key), labels, title, -1, 1))
    out: dict[str, Any] = {"plots": plots, "kurtosis": None, "kurtosis_plot": None}
    if g.token_kurtosis is not None:
        ka = g.token_kurtosis_all
        out["kurtosis"] = table(["feature", "token kurtosis"],
                                [(k, num(v, ".2f")) for k, v in zip(g.features, g.token_kurtosis, strict=True)])
        if ka is not None and ka.counts:
            e = ka.edges
            f = go.Figure(go.Bar(x=[(a + b) / 2 for a, b in zip(e[:-1], e[1:], strict=True)], y=ka.counts,
                                 marker_color="#8c564b"))
            f.update_layout(title=f"Token kurtosis of all {otherwise(ka.n_features, '')} features (median "
                                  f"{num(ka.median, '.2f')})", xaxis_title="excess kurtosis",
                            yaxis_title="features")
            out["kurtosis_plot"] = fig(f, height=300)
    return out


def span(sae: SaeEntry) -> dict[str, Any]:
    """The activation at P projected onto the span of the top features' decoder vectors, the rest zeroed or mean."""
    sp = sae.span_ablation
    names = {"clean": "clean", "span_zero": "only the span kept (rest zeroed)",
             "span_mean": "only the span kept (rest mean)"}
    rows = []
    ci, dci = sp.ci95, sp.diff_vs_clean_ci95
    for j, v in enumerate(sp.variants):
        rows.append((names.get(v, v), pm(sp.mean[j], ci[j] if ci else None),
                     pm(sp.diff_vs_clean[j], dci[j] if dci else None) if sp.diff_vs_clean else "n/a"))
    return {
        "features": ", ".join(str(x) for x in sp.features), "rank": otherwise(sp.rank, "n/a"),
        "fraction_kept": percent(sp.fraction_kept, 1),
        "table": table(["run", "loss (nats, 95% CI)", "run - clean (nats, paired)"], rows, left_cols=(0,)),
    }


def _off_ranges(sae: SaeEntry, key: str) -> list:
    """The off-range records (``OffRange`` or None) of one study part of the SAE."""
    if key == "loss_comparison":
        return [sae.loss_comparison.off_range, sae.loss_comparison.sae_off_range]
    if key == "ablation_modes":
        return list((sae.ablation_modes.off_range or {}).values())
    if key == "max_activating_ablation":
        return [st.off_range for st in sae.max_activating_ablation]
    return []


def study_parts(sae: SaeEntry, fig: Figures) -> list[dict[str, Any]]:
    """The SAE's study parts that results.json has, in page order, each ``{key, slug, title, ...}``. An undefined
    off-range count (a hook without a bounded range) is said once, in the first part that has one
    (``range_note``), not after every ablation."""
    out = []
    said_undefined = False
    for key, slug, title in STUDY:
        if not getattr(sae, key):  # absent, or an empty list
            continue
        part: dict[str, Any] = {"key": key, "slug": slug, "title": title, "range_note": None}
        if key == "corpus_stats":
            part.update(corpus(sae, fig))
        elif key == "loss_comparison":
            part.update(five_way(sae, fig))
        elif key == "ablation_modes":
            part.update(modes(sae))
        elif key == "max_activating_ablation":
            part.update(stories(sae, fig))
        elif key == "feature_geometry":
            part.update(geometry(sae, fig))
        else:
            part.update(span(sae))
        if not said_undefined and any(off_range_undefined(o) for o in _off_ranges(sae, key)):
            part["range_note"] = OFF_RANGE_UNDEFINED
            said_undefined = True
        out.append(part)
    return out


def layers(r: Results, fig: Figures) -> dict[str, Any]:
    """Each SAE's top features ablated together, then all at once: loss increases, paired differences, a reading."""
    lc = r.layer_comparison
    runs = lc.runs
    out: dict[str, Any] = {
        "n_prompts": otherwise(lc.n_prompts, "n/a"), "mode": otherwise(lc.mode, "residual"),
        "table": table(["run", "features", "loss increase (nats, 95% CI)"],
                       [(run.label, "; ".join(", ".join(str(x) for x in fs) for fs in run.features or []),
                         mci(run.loss_increase)) for run in runs], left_cols=(0, 1)),
        "reading": layer_comparison_reading(lc),
        "paired": None, "plot": None,
    }
    if lc.paired:
        out["paired"] = table(["a - b", "loss increase difference (nats, paired 95% CI)"],
                              [(f"{runs[p.a].label} - {runs[p.b].label}", pm(p.mean, p.ci95))
                               for p in lc.paired], left_cols=(0,))
    if any(run.values for run in runs):
        f = go.Figure([go.Histogram(x=nulls(run.values or []), name=plotly_text(run.label), opacity=0.6,
                                    nbinsx=40) for run in runs])
        f.update_layout(barmode="overlay", title="Loss increase per prompt", xaxis_title="loss increase (nats)",
                        yaxis_title="prompts")
        out["plot"] = fig(f, height=340)
    return out
