"""One SAE's main parts: the warning box when its checks failed, its summary table (L0 and explained variance at
P, losses, loss recovered vs zero and vs mean ablation, with CIs; a sentence where a value surprises; the SAE's
training quality over tokens), the top features by loss increase when ablated with the SAE error kept (the
reference notebook's single-feature ablation table) as a table and a chart, the exact effect of every active
feature, the multi-feature ablation (original - ablated) and how its set was chosen, and the top activating
examples per feature (the notebook's token colours, see ``tokens_html.py``).

Template: ``sae.html.j2`` (which includes ``evidence.html.j2`` and ``study.html.j2`` for the other parts).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from markupsafe import Markup
from plotly.subplots import make_subplots

from saecircuits.report.schema import ci_bounds
from saecircuits.report.sections.common import (
    STATIC_FEATURES,
    TOP_ROWS,
    Figures,
    error_bars,
    finite,
    given,
    nulls,
    num,
    otherwise,
    plotly_text,
    pm,
    ratio,
    seq_ratio,
    sorted_features,
    table,
)
from saecircuits.report.summary import surprises
from saecircuits.report.tokens_html import tokens_to_html
from saecircuits.results import Check, Results, SaeEntry


def sae_title(i: int, sae: SaeEntry) -> str:
    return f"SAE {i}: {sae.hook_point} (d_sae = {sae.d_sae})"


def failed_checks(r: Results, sae: SaeEntry) -> list[Check]:
    """The checks that concern this SAE: its own and the task's."""
    return [c for c in r.checks or [] if c.scope in ("task", sae.hook_point)]


def summary(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """The summary table (losses with CIs, loss recovered, L0 and explained variance at P and over every position)
    and the losses as a chart."""
    lc = sae.loss_ci95
    cis = [lc.clean, lc.sae, lc.zero, lc.mean] if lc is not None else [None] * 4
    rows = [
        ("hook point", sae.hook_point),
        ("architecture", otherwise(sae.architecture, "n/a")),
        ("d_in / d_sae", f"{sae.d_in} / {sae.d_sae}"),
        ("L0 at P (mean active features at the prediction position, across prompts)", num(sae.l0, ".2f")),
        ("explained variance at P (across prompts)", num(sae.explained_variance_at_p, ".4f")),
        ("relative squared error at P |x - x_hat|^2 / |x|^2", num(sae.relative_error, ".4f")),
        ("features active on the task", otherwise(sae.n_active_features, "n/a")),
        ("clean loss (nats)", pm(sae.clean_loss, cis[0])),
        ("loss with SAE spliced in (nats)", pm(sae.sae_loss, cis[1])),
        ("loss with zero ablation (nats)", pm(sae.zero_ablation_loss, cis[2])),
        ("loss with mean ablation (nats)", pm(sae.mean_ablation_loss, cis[3])),
        ("loss recovered vs zero ablation", ratio(sae, "loss_recovered")),
        ("loss recovered vs mean ablation", ratio(sae, "loss_recovered_mean_ablation")),
    ]
    q = sae.whole_sequence
    if q is not None:
        rows += [
            (f"explained variance over every position of the prompts ({otherwise(q.n_tokens, '?')} tokens)",
             num(q.explained_variance, ".4f")),
            (f"loss recovered over every position of the prompts (next-token loss clean {num(q.ce_clean, '.4f')},"
             f" SAE {num(q.ce_sae, '.4f')}, zero ablation {num(q.ce_zero, '.4f')} nats)",
             seq_ratio(sae))]
    tab = table(["quantity", "value (95% CI)"], rows, left_cols=(0, 1))
    names = ["clean", "SAE", "zero ablation", "mean ablation"]
    means = [sae.clean_loss, sae.sae_loss, sae.zero_ablation_loss, sae.mean_ablation_loss]
    f = go.Figure(
        go.Bar(
            x=names,
            y=nulls(means),
            error_y=error_bars(means, cis),
            marker_color=["#2ca02c", "#1f77b4", "#7f7f7f", "#bcbd22"],
        )
    )
    f.update_layout(
        title=f"Task loss at the prediction position: {plotly_text(sae.hook_point)}",
        yaxis_title="cross-entropy (nats)",
        xaxis_type="category",
    )
    return {"table": tab, "plot": fig(f, height=360)}


def quality(sae: SaeEntry) -> Any:
    """The SAE's training quality, each labelled with where it is measured (training tokens or the corpus); None
    when there is none (an SAE given with --sae)."""
    training = sae.training or {}  # free-form: the training record as saved
    fm = training.get("final_metrics") or {}
    cs = sae.corpus_stats
    rows = []
    if fm:
        n_tok = training.get("tokens")
        where = f"over its last training batch ({n_tok} training tokens in all)" if n_tok else "over its last training batch"
        rows += [
            (f"L0 {where}", num(fm.get("l0"), ".2f")),
            (f"explained variance across tokens, {where}", num(fm.get("explained_variance_tokens"), ".4f")),
            (f"shrinkage |x_hat| / |x| {where} (1 = none)", num(fm.get("shrinkage"), ".3f")),
            (f"dead fraction (no firing in the training window) {where}", num(fm.get("dead_fraction"), ".3f")),
            (f"dense fraction (firing on > 10% of tokens) {where}", num(fm.get("dense_fraction"), ".3f")),
        ]
    if cs is not None:
        d_sae = sae.d_sae
        dense = None
        edges, counts = cs.density_log10_edges, cs.density_log10_counts
        if edges and counts and d_sae:
            dense = sum(c for lo, c in zip(edges[:-1], counts, strict=True) if lo >= -1.0) / d_sae
        rows += [
            (f"L0 over all {cs.n_tokens} counted corpus tokens", num(cs.l0, ".2f")),
            ("dead fraction over the corpus (never fires)",
             num(cs.n_dead / d_sae, ".3f") if cs.n_dead is not None and d_sae else "n/a"),
            ("dense fraction over the corpus (density >= 0.1)", num(dense, ".3f")),
        ]
    return table(["quantity", "value"], rows, left_cols=(0,)) if rows else None


def features(sae: SaeEntry, fig: Figures) -> dict[str, Any] | None:
    """The top :data:`TOP_ROWS` features by loss increase when ablated alone (table and chart); None if none."""
    tfs = sorted_features(sae)[:TOP_ROWS]
    if not tfs:
        return None
    rows, classes = [], []
    for rank, t in enumerate(tfs, 1):
        lo, _ = ci_bounds(t.loss_increase, t.loss_increase_ci95)
        sig = finite(lo) and lo > 0
        classes.append("sig" if sig else "")
        rows.append(
            (
                rank,
                t.feature,
                pm(t.loss_increase, t.loss_increase_ci95),
                "yes" if sig else "no",
                num(t.mean_activation),
                num(t.fraction_active, ".3f"),
                otherwise(t.n_prompts, "n/a"),
            )
        )
    tab = table(
        ["rank", "feature", "loss increase (nats, 95% CI)", "CI > 0", "mean activation", "fraction active",
         "n prompts"],
        rows,
        row_classes=classes,
    )
    means = [t.loss_increase for t in tfs]
    f = go.Figure(
        go.Bar(
            x=[f"f{t.feature}" for t in tfs],
            y=nulls(means),
            error_y=error_bars(means, [t.loss_increase_ci95 for t in tfs]),
            marker_color="#d62728",
        )
    )
    f.update_layout(
        title="Loss increase when each feature is ablated",
        xaxis_title="feature",
        yaxis_title="loss increase (nats)",
        xaxis_type="category",
    )
    return {"top_rows": TOP_ROWS, "table": tab, "plot": fig(f, height=380)}


def effects(sae: SaeEntry, fig: Figures) -> dict[str, Any] | None:
    """Exact single-feature ablation effect of every active feature: mean loss increase vs fraction of prompts."""
    eff = sae.feature_effects
    if not eff:
        return None
    info = sae.feature_effects_info or {}  # free-form: how the effects were computed
    sel = info.get("selection", "all_active")
    means = [e.mean_loss_increase for e in eff]
    f = go.Figure(
        go.Scatter(
            x=[e.fraction_active for e in eff],
            y=nulls(means),
            error_y=error_bars(means, [e.ci95 for e in eff]),
            mode="markers",
            marker={"size": 6, "color": "#1f77b4", "opacity": 0.7},
            text=[f"f{e.feature} (n={e.n_active_prompts})" for e in eff],
            hovertemplate="%{text}<br>loss increase %{y:.4f} nats<br>fraction active %{x:.3f}<extra></extra>",
        )
    )
    f.update_layout(
        title="Every active feature: loss increase when ablated alone vs how often it is active",
        xaxis_title="fraction of prompts where the feature is active at P",
        yaxis_title="mean loss increase (nats)",
    )
    return {
        "which": "every feature active at P on each prompt" if sel == "all_active" else f"features chosen as {sel}",
        "n_features": len(eff),
        "n_pairs": info.get("n_pairs", sum(e.n_active_prompts for e in eff)),
        "plot": fig(f, height=420),
    }


_MULTI = (
    ("logprob_diff", "answer log-prob (nats)"),
    ("logit_diff", "answer logit"),
    ("rank_diff", "answer rank"),
)


def multi(sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """The multi-feature ablation (original - ablated) and how its set was chosen; ``recorded`` False when there
    is none (``no_supported``: because no ranked feature had a supported effect)."""
    ma = sae.multi_ablation
    sel = sae.multi_ablation_selection if given(sae.multi_ablation_selection) else None
    if not given(ma):
        return {"recorded": False, "no_supported": bool(sel and not sel.n_supported),
                "n_ranked": otherwise(sel.n_ranked, 0) if sel else 0}
    stats = [(getattr(ma, k), label) for k, label in _MULTI if getattr(ma, k) is not None]
    out: dict[str, Any] = {
        "recorded": True,
        "features": ", ".join(str(x) for x in ma.features or []) or "(not recorded)",
        "n_prompts": otherwise(ma.n_prompts, "n/a"),
        "rule": sel.rule if sel else None,
        "n_supported": otherwise(sel.n_supported, "?") if sel else "?",
        "n_ranked": otherwise(sel.n_ranked, "?") if sel else "?",
        "table": table(["original - ablated", "mean (95% CI)"],
                       [(label, pm(st.mean, st.ci95)) for st, label in stats], left_cols=(0,)),
        "plot": None,
    }
    if stats:
        f = make_subplots(rows=1, cols=len(stats), subplot_titles=[label for _, label in stats])
        for j, (st, label) in enumerate(stats, 1):
            m = st.mean
            f.add_trace(
                go.Bar(
                    x=[label],
                    y=nulls([m]),
                    error_y=error_bars([m], [st.ci95]),
                    marker_color="#9467bd",
                    showlegend=False,
                ),
                row=1,
                col=j,
            )
        f.update_layout(title="Multi-feature ablation: original - ablated")
        out["plot"] = fig(f, height=340)
    return out


def examples(sae: SaeEntry) -> dict[str, Any] | None:
    """The top activating examples of the first :data:`STATIC_FEATURES` features (ranked ones first), each window
    once, as token heat-maps; None when none are recorded."""
    by_feature: dict[int, list] = {}
    for fe in sae.examples or []:
        by_feature.setdefault(fe.feature, []).extend(fe.examples)
    if not by_feature:
        return None
    order = [t.feature for t in sorted_features(sae) if t.feature in by_feature]
    order += [k for k in by_feature if k not in order]
    shown = []
    for k in order[:STATIC_FEATURES]:
        seen, exs = set(), []
        for ex in by_feature[k]:
            key = (tuple(ex.tokens), tuple(ex.activations))
            if key in seen:  # the same window twice (e.g. two top positions close together): shown once
                continue
            seen.add(key)
            acts = ex.activations
            mx = ex.max_activation
            if not finite(mx):
                mx = max((a for a in acts if finite(a)), default=None)
            exs.append({
                "doc": otherwise(ex.doc_index, "n/a"), "max": num(mx),
                # tokens_to_html escapes every token itself (report/tokens_html.py): trusted HTML, shown as is
                "tokens": Markup(tokens_to_html(ex.tokens, acts, max_value=mx if finite(mx) else None,
                                                kinds=ex.token_kinds)),
            })
        shown.append({"feature": k, "examples": exs})
    return {"n_features": len(order), "static": STATIC_FEATURES, "features": shown}


def sae_part(r: Results, sae: SaeEntry, fig: Figures) -> dict[str, Any]:
    """The main parts of one SAE's section, in page order (the figures and tables are numbered in this order)."""
    flagged = failed_checks(r, sae)
    return {
        "failed": [{"message": c.message, "what_to_try": c.what_to_try} for c in flagged],
        "summary": summary(sae, fig),
        "surprises": surprises(sae, r),
        "quality": quality(sae),
        "features": features(sae, fig),
        "effects": effects(sae, fig),
        "multi": multi(sae, fig),
        "examples": examples(sae),
    }
