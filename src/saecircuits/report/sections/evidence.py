"""Per-feature and attribution evidence of one SAE (optional keys; analysis/evidence.py): the SAE-error DLA,
per-feature details (prompt-based log-prob and weight-based logit boosts, activation vs loss increase, direct
feature attribution), the upstream ablation and the activation-scaled DLA.

Template: ``evidence.html.j2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from saecircuits.report.sections.common import (
    STATIC_FEATURES,
    Figures,
    error_bars,
    has,
    nulls,
    num,
    otherwise,
    plotly_text,
    pm,
    set_where,
    table,
)
from saecircuits.report.tokens_html import visible_token
from saecircuits.results import SaeEntry
from saecircuits.results.evidence import FeatureDetail

EVIDENCE = (
    ("error_dla", "errdla", "SAE error DLA"),
    ("feature_details", "details", "Feature details"),
    ("upstream_ablation", "upstream", "Upstream ablation"),
    ("activation_scaled_dla", "scaled", "Activation-scaled DLA"),
)
"""(key of the SAE entry, anchor slug, heading) of each part, in page order."""


def error_dla(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """The MLP's DLA split into the SAE reconstruction's and the SAE error's shares (table and chart)."""
    e = sae.error_dla
    labels, means, cis = e.labels, e.mean, e.ci95
    tab = table(
        ["part", "mean DLA (logits, 95% CI)"],
        [(lab, pm(m, cis[j] if cis else None)) for j, (lab, m) in enumerate(zip(labels, means, strict=True))],
        left_cols=(0,),
    )
    f = go.Figure(
        go.Bar(
            x=[plotly_text(s) for s in labels],
            y=nulls(means),
            error_y=error_bars(means, cis),
            marker_color="#2ca02c",
        )
    )
    f.update_layout(
        title="MLP DLA: reconstruction vs SAE error",
        xaxis_title="part",
        yaxis_title="mean DLA (logits)",
        xaxis_type="category",
    )
    return {"table": tab, "plot": fig(f, height=320)}


def _token_value_table(title_a: str, a: Sequence, title_b: str, b: Sequence, unit: str) -> Any:
    """Two (token, value) lists side by side; None when both are empty."""
    rows = []
    for j in range(max(len(a), len(b))):
        left = a[j] if j < len(a) else None
        right = b[j] if j < len(b) else None
        rows.append(
            (
                visible_token(left[0]) if left else "",
                num(left[1]) if left else "",
                visible_token(right[0]) if right else "",
                num(right[1]) if right else "",
            )
        )
    return table([title_a, unit, title_b, unit], rows, left_cols=(0, 2)) if rows else None


def feature_detail(fd: FeatureDetail, fig: Figures) -> dict[str, Any]:
    """One feature's details; its figures and tables are named after the feature for the export."""
    k = fd.feature
    before = set_where(fig, f"{fig.where}-f{int(k)}")
    try:
        return _feature_detail(fd, fig)
    finally:
        set_where(fig, before)


def _feature_detail(fd: FeatureDetail, fig: Figures) -> dict[str, Any]:
    k = fd.feature
    n_act, cap = fd.n_active_prompts, fd.max_prompts
    out: dict[str, Any] = {
        "feature": k,
        "capped": {"n": cap, "of": n_act} if isinstance(n_act, int) and isinstance(cap, int) and n_act > cap else None,
        "prompt_boosts": None, "weight_boosts": None, "loss_vs_activation": None, "dfa": None,
    }
    pb = fd.prompt_boosts
    if pb is not None:
        out["prompt_boosts"] = {
            "n_prompts": otherwise(pb.n_prompts, "n/a"),
            "logprob": {"clean": num(pb.answer_logprob_clean), "ablated": num(pb.answer_logprob_ablated)}
            if has(pb, "answer_logprob_clean") else None,
            "table": _token_value_table("boosted", pb.boosted, "deboosted", pb.deboosted, "nats"),
        }
    wb = fd.weight_boosts
    if wb is not None:
        out["weight_boosts"] = {"table": _token_value_table("top", wb.top, "bottom", wb.bottom, "logits")}
    lva = fd.loss_vs_activation
    if lva is not None:
        plot = None
        if lva.activation:
            f = go.Figure(
                go.Scatter(
                    x=nulls(lva.activation),
                    y=nulls(lva.loss_increase),
                    mode="markers",
                    marker=dict(color="#d62728", size=6, opacity=0.7),
                )
            )
            f.update_layout(
                title=f"Feature {int(k)}: activation vs loss increase",
                xaxis_title="activation at the prediction position",
                yaxis_title="loss increase when ablated (nats)",
            )
            plot = fig(f, height=320)
        out["loss_vs_activation"] = {"r": num(lva.pearson_r, ".3f"), "n": len(lva.activation), "plot": plot}
    dfa = fd.dfa
    if dfa is not None:
        plot = None
        if dfa.labels:
            means, cis = dfa.mean, dfa.ci95
            f = go.Figure(
                go.Bar(
                    x=[plotly_text(s) for s in dfa.labels],
                    y=nulls(means),
                    error_y=error_bars(means, cis),
                    marker_color="#8c564b",
                )
            )
            f.update_layout(
                title=f"Feature {int(k)}: DFA",
                xaxis_title="component",
                yaxis_title="contribution to pre-activation",
                xaxis_type="category",
            )
            plot = fig(f, height=340)
        out["dfa"] = {"variant": otherwise(dfa.variant, "zero"), "n_prompts": otherwise(dfa.n_prompts, "n/a"),
                      "completeness": num(dfa.completeness_max_abs_error, ".2e"),
                      "tangent": num(dfa.tangent_error_mean, ".3f"), "plot": plot}
    return out


def upstream(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """Feature activations at P, clean vs with an upstream hook ablated (table and chart)."""
    up = sae.upstream_ablation
    feats = up.features

    def col(key: str) -> list:
        v = getattr(up, key)
        return v if v is not None and len(v) == len(feats) else [None] * len(feats)

    rows = [
        (f, num(c), num(a), num(d), num(ca), num(aa), num(fc, ".3f"), num(fa, ".3f"))
        for f, c, a, d, ca, aa, fc, fa in zip(
            feats, col("clean_mean"), col("ablated_mean"), col("diff_ci95"), col("clean_mean_active"),
            col("ablated_mean_active"), col("fraction_active_clean"), col("fraction_active_ablated"), strict=True,
        )
    ]
    tab = table(
        ["feature", "clean mean", "ablated mean", "diff 95% CI half-width", "clean mean (active)",
         "ablated mean (same prompts)", "fraction active clean", "fraction active ablated"],
        rows,
    )
    f = go.Figure(
        [
            go.Bar(name="clean", x=[f"f{x}" for x in feats], y=nulls(col("clean_mean")), marker_color="#1f77b4"),
            go.Bar(name="ablated", x=[f"f{x}" for x in feats], y=nulls(col("ablated_mean")), marker_color="#ff7f0e"),
        ]
    )
    f.update_layout(
        barmode="group",
        title="Mean feature activation: clean vs upstream ablated",
        xaxis_title="feature",
        yaxis_title="mean activation",
        xaxis_type="category",
    )
    return {"hook": up.hook, "mode": otherwise(up.mode, "zero"), "table": tab, "plot": fig(f, height=320)}


def scaled_dla(sae: SaeEntry) -> dict[str, Any]:
    """Mean activation times DLA per unit activation, per feature (and through the final norm when recorded)."""
    entries = sae.activation_scaled_dla
    has_ln = any(has(e, "scaled_ln") for e in entries)
    headers = ["feature", "mean activation", "DLA per unit", "scaled"] + (["scaled (norm)"] if has_ln else [])
    rows = [
        (e.feature, num(e.mean_activation), num(e.dla_per_unit), num(e.scaled))
        + ((num(e.scaled_ln),) if has_ln else ())
        for e in entries
    ]
    return {"has_ln": has_ln, "table": table(headers, rows)}


def evidence_parts(sae: SaeEntry, fig: Figures) -> list[dict[str, Any]]:
    """The SAE's evidence parts that results.json has, in page order, each ``{key, slug, title, ...}``."""
    out = []
    for key, slug, title in EVIDENCE:
        if not getattr(sae, key):  # absent, or an empty list
            continue
        part: dict[str, Any] = {"key": key, "slug": slug, "title": title}
        if key == "error_dla":
            part.update(error_dla(sae, fig))
        elif key == "feature_details":
            details = sae.feature_details
            part.update(n_features=len(details), static=STATIC_FEATURES,
                        details=[feature_detail(fd, fig) for fd in details[:STATIC_FEATURES]])
        elif key == "upstream_ablation":
            part.update(upstream(sae, fig))
        else:
            part.update(scaled_dla(sae))
        out.append(part)
    return out
