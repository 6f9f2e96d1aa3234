"""Direct logit attribution (Elhage et al. 2021) of every component to the answer logit, with CIs and the
completeness error; and the appendix (timings, training, config, notes).

Templates: ``dla.html.j2``, ``appendix.html.j2``.
"""

from __future__ import annotations

import json
from typing import Any

import plotly.graph_objects as go

from saecircuits.report.schema import to_jsonable
from saecircuits.report.sections.common import Figures, error_bars, finite, nulls, num, plotly_text, table
from saecircuits.results import Results


def dla(r: Results, fig: Figures) -> dict[str, Any]:
    """Mean DLA per component with 95% CIs (a bar chart and the eight largest by |mean|)."""
    d = r.dla
    labels, means, cis = d.labels, d.mean, d.ci95
    alm, cap = d.answer_logit_mean, d.logit_soft_cap
    out: dict[str, Any] = {
        "error": num(d.completeness_max_abs_error, ".2e"),
        "answer_logit": num(alm) if alm is not None else None,
        "soft_cap": num(cap) if cap is not None else None,
        "plot": None,
        "table": None,
    }
    if labels:
        f = go.Figure(
            go.Bar(
                x=[plotly_text(s) for s in labels],
                y=nulls(means),
                error_y=error_bars(means, cis),
                marker_color=["#d62728" if finite(m) and m >= 0 else "#1f77b4" for m in means],
            )
        )
        f.update_layout(
            title="Direct logit attribution to the answer",
            xaxis_title="component",
            yaxis_title="mean DLA (logits)",
            xaxis_type="category",
        )
        out["plot"] = fig(f, height=420)
        order = sorted(range(len(labels)), key=lambda i: -abs(means[i]) if finite(means[i]) else 0.0)[:8]
        out["table"] = table(
            ["component", "mean DLA (logits)", "95% CI half-width"],
            [(labels[i], num(means[i]), num(cis[i]) if cis else "n/a") for i in order],
            left_cols=(0,),
        )
    return out


def appendix(r: Results) -> dict[str, Any]:
    """Timings, each SAE's training record and the config (as indented JSON), notes, the schema version."""
    timings = r.timings or {}
    return {
        "timings": table(["stage", "seconds"], [(k, num(v, ".1f")) for k, v in timings.items()], left_cols=(0,))
        if timings else None,
        # training and config are free-form records, shown as saved
        "training": [{"i": i, "hook_point": sae.hook_point, "json": json.dumps(to_jsonable(sae.training), indent=1)}
                     for i, sae in enumerate(r.saes) if sae.training],
        "config": json.dumps(to_jsonable(r.config), indent=1) if r.config else None,
        "notes": r.notes or [],
        "schema_version": r.schema_version,
        "version": r.saecircuits_version,
    }
