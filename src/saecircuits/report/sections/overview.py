"""The top of the page: the summary (headline in plain words, checks, loss recovered per SAE, top features with a
reading, circuit; :mod:`saecircuits.report.summary`), the run (model, task, answer tokens, the BOS policy, example
prompts each with its own answer highlighted), the checks section, and the feature browser's count.

Templates: ``summary.html.j2``, ``run.html.j2``, ``checks.html.j2``, ``browser.html.j2``.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from saecircuits.display import percent
from saecircuits.report.sections.common import (
    Link,
    given,
    num,
    otherwise,
    pm,
    seq_ratio,
    sorted_features,
    table,
)
from saecircuits.report.summary import (
    feature_reading,
    headline,
    model_name,
    ratio_problem,
    supported,
    surprises,
)
from saecircuits.report.tokens_html import token_html, visible_text, visible_token
from saecircuits.results import Results, SaeEntry


def lr_cell(sae: SaeEntry, key: str) -> str:
    """A loss recovered with its CI, flagged when it cannot be read as a result (:func:`summary.ratio_problem`)."""
    text = pm(getattr(sae, key), getattr(sae, f"{key}_ci95"), ".3f")
    return text + (" (cannot be read: see below)" if ratio_problem(sae, key) is not None else "")


def _checks_list(r: Results) -> list[dict] | None:
    """The checks of results.json for the summary (None when it has none)."""
    if r.checks is None:
        return None
    return [{"scope": c.scope, "message": c.message, "what_to_try": c.what_to_try} for c in r.checks]


def summary(r: Results) -> dict[str, Any]:
    """Summary first: the headline in plain words, the checks, loss recovered per SAE, the top features each with
    a one-line reading, and the circuit."""
    task = r.task
    answers = ", ".join(visible_token(t) for t in task.answer_tokens or []) or ", ".join(
        f"id {i}" for i in task.answer_token_ids)
    out: dict[str, Any] = {
        "headline": headline(r),
        "checks": _checks_list(r),
        "n_checks": len(r.checks) if r.checks else 0,
        "run": table(None, [("Model", model_name(r)), ("Task", task.name), ("Prompts", task.n_prompts),
                            ("Answer token(s)", answers)], left_cols=(0, 1)),
        "saes": None,
        "per_sae": [],
        "circuit": None,
    }
    if r.saes:
        rows = []
        for i, sae in enumerate(r.saes):
            sup = sum(1 for t in sae.top_features if supported(t.loss_increase, t.loss_increase_ci95))
            ws = sae.whole_sequence
            rows.append((f"SAE {i}: {sae.hook_point}", lr_cell(sae, "loss_recovered"),
                         lr_cell(sae, "loss_recovered_mean_ablation"), seq_ratio(sae),
                         num(ws.explained_variance if ws is not None else None, ".3f"),
                         num(sae.explained_variance_at_p, ".3f"), num(sae.l0, ".1f"), sup))
        out["saes"] = table(["SAE", "loss recovered at P vs zero ablation (95% CI)", "vs mean ablation (95% CI)",
                             "loss recovered over every position (95% CI)", "explained variance over every position",
                             "explained variance at P", "L0 at P", "features with a supported effect"], rows,
                            left_cols=(0,))
        for i, sae in enumerate(r.saes):
            ranked = sorted_features(sae)[:5]
            top = None
            if ranked:
                cells = [(int(t.feature), pm(t.loss_increase, t.loss_increase_ci95),
                          feature_reading(sae, int(t.feature))) for t in ranked]
                top = table(["feature", "loss increase (nats, 95% CI)", "reading"],
                            [(Link(f"#card-sae-{i}-f{k}", f"f{k}"), ci, reading or "n/a") for k, ci, reading in cells],
                            left_cols=(0, 1, 2), plain=[[t.feature, ci, reading]
                                                        for t, (_, ci, reading) in zip(ranked, cells, strict=True)])
            out["per_sae"].append({"i": i, "hook_point": sae.hook_point, "surprises": surprises(sae, r), "top": top})
    c = r.circuit
    if c is not None and given(c.selection):
        sel = c.selection
        out["circuit"] = {"n_nodes": otherwise(sel.n_nodes, "?"),
                          "faithfulness": num(sel.faithfulness, ".3f"), "completeness": num(sel.completeness, ".3f")}
    return out


def run(r: Results) -> dict[str, Any]:
    """The run: model, task, prompts, answer tokens, BOS policy, model shape; up to five example prompts, each with
    its own answer highlighted when results.json records it."""
    task = r.task
    ids = task.answer_token_ids
    toks = task.answer_tokens
    answers = (
        [f"{visible_token(t)} (id {i})" for t, i in zip(toks, ids, strict=True)]
        if toks
        else [f"id {i}" for i in ids]
    )
    n_prompts = f"{task.n_prompts}"
    if task.n_dropped_too_long:
        n_prompts += f" ({task.n_dropped_too_long} longer than the model's context left out)"
    source = (r.provenance or {}).get("source")
    rows = [
        ("Model", r.model),
        *([("Model source", source)] if source not in (None, r.model) else []),
        ("Task", task.name),
        ("Prompts", n_prompts),
        ("Answer token(s)", ", ".join(answers)),
    ]
    bos = r.bos_policy
    if bos is not None:
        rows.append(("BOS", bos.statement or ("prepended" if bos.prepended else "none")))
    mi = r.model_info.to_json_dict() if r.model_info is not None else {}
    if mi:
        rows.append(("Model shape", ", ".join(f"{k}={v}" for k, v in mi.items())))
    examples = task.example_prompts or []
    # each prompt's own answer; results.json files from before example_answers only know it when the task
    # has a single answer token
    own = task.example_answers
    if own is None and toks and len(toks) == 1:
        own = [toks[0]] * len(examples)
    prompts = [
        # token_html escapes the token itself (report/tokens_html.py): trusted HTML, shown as is by the template
        {"text": visible_text(p), "answer": Markup(token_html(own[j])) if own is not None else None}
        for j, p in enumerate(examples[:5])
    ]
    return {"table": table(None, rows, left_cols=(0, 1)), "prompts": prompts, "n_shown": min(len(examples), 5),
            "n_all": task.n_prompts,  # results.json keeps a few examples of all the prompts
            "answers_known": own is not None}


def behaviour_text(r: Results) -> dict[str, Any] | None:
    """Whether the model performs the behaviour, and the numbers that say so (None when not recorded)."""
    b = r.behaviour
    if b is None:
        return None
    ci = b.top1_accuracy_ci95
    text = (
        f"clean top-1 accuracy {percent(b.top1_accuracy, 1)} of {b.n_prompts} prompts"
        + (f" (95% CI {percent(ci[0], 1)} to {percent(ci[1], 1)})" if ci else "")
        + f", mean p(answer) {pm(b.mean_p_answer, b.mean_p_answer_ci95, '.3f')}, mean answer loss "
        f"at P {pm(b.mean_loss, b.mean_loss_ci95, '.3f')} nats"
        + (f" (a uniform guess: {num(b.uniform_loss, '.2f')})" if b.uniform_loss is not None else "")
    )
    return {"performs": bool(b.performs), "text": text}


def checks(r: Results) -> dict[str, Any] | None:
    """Whether the model performs the behaviour, then every failed check with what to try (None: neither is in
    results.json, and the page has no checks section)."""
    if r.behaviour is None and r.checks is None:
        return None
    cs = r.checks
    return {
        "behaviour": behaviour_text(r),
        "checks": cs,
        "table": table(["scope", "warning", "what to try"], [(c.scope, c.message, c.what_to_try) for c in cs],
                       left_cols=(0, 1, 2)) if cs else None,
    }


def n_browser_features(r: Results) -> int:
    """Features with any evidence (an exact effect or a ranking), summed over the SAEs: the browser's count."""
    return sum(len({e.feature for e in sae.feature_effects or []} | {t.feature for t in sae.top_features})
               for sae in r.saes)
