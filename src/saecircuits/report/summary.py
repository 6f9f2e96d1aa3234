"""The report's words: the plain-words headline, a one-line reading of a feature, and a sentence wherever a value
surprises. Pure functions of the typed results (:class:`saecircuits.results.Results` and its parts; a plain dict
is validated into them first, which checks it: pass the typed objects where speed matters); no torch.

Every function returns plain text (not HTML): the caller escapes it. Numbers are only quoted as results when they
are finite; an interval that includes 0 is said to, and a feature whose 95% interval excludes 0 is "supported".

Thresholds used in the words (and stated where they are used):

- the model *performs* the behaviour when its top-1 accuracy (from the checks block, when results.json has one) is at
  least 50%, else when the geometric-mean probability of the answer, ``exp(-mean loss)``, is at least 0.5;
- an SAE's effect is *spread thin* when its top features ablated together raise the answer loss by less than a
  quarter of what zero-ablating the whole layer does (:data:`SPREAD_THIN`), or when no feature's effect is
  supported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from saecircuits.analysis.quality.thresholds import MIN_ABLATION_EFFECT
from saecircuits.display import percent
from saecircuits.report.schema import ci_bounds
from saecircuits.report.tokens_html import visible_token
from saecircuits.results import LayerComparison, Results, SaeEntry
from saecircuits.results.corpus import CorpusStats
from saecircuits.results.evidence import FeatureDetail
from saecircuits.results.sae import TopFeature

__all__ = [
    "SPREAD_THIN",
    "GLOSSARY",
    "headline",
    "feature_reading",
    "layer_comparison_reading",
    "quoted_token",
    "surprises",
    "supported",
    "ratio_problem",
    "model_name",
    "layer_effect_share",
]

SPREAD_THIN = 0.25
"""The top features together explain less than this share of the layer's zero-ablation loss increase: spread thin."""

GLOSSARY: tuple[tuple[str, str], ...] = (
    ("P", "the prediction position: the last prompt token, where the model predicts the answer. Most numbers in "
          "this report are measured there, one value per prompt."),
    ("DLA", "direct logit attribution: how much one component (an attention head, an MLP, the embeddings) adds to "
            "the answer's logit directly, through the residual stream and the unembedding, at P. Units: logits."),
    ("DFA", "direct feature attribution: the same split for an SAE feature's encoder pre-activation instead of the "
            "answer logit: which upstream components make the feature fire."),
    ("loss", "the answer's cross-entropy at P (minus its log-probability), in nats; lower is better."),
    ("loss increase", "answer loss with a feature ablated minus the clean answer loss, on the prompts where the "
                      "feature is active at P (nats). Positive: the feature helps the model give the answer."),
    ("loss recovered", "(ablated - SAE) / (ablated - clean) of the answer loss: 1 when splicing the SAE in for the "
                       "layer costs nothing, 0 when it is as bad as ablating the layer (zero or mean ablation)."),
    ("zero / mean ablation", "replacing the layer's activation at P by zeros, or by its mean over the corpus tokens."),
    ("L0", "the number of SAE features active (> 0) on one token: at P across prompts, or over all corpus tokens, "
           "as each table says."),
    ("explained variance", "1 - |x - x_hat|^2 / |x - mean x|^2 of the SAE's reconstruction x_hat of the layer "
                           "activation x; at P across prompts, or over the SAE's training tokens."),
    ("density", "the fraction of corpus tokens on which a feature fires; dead features never fire, dense ones fire "
                "on more than a tenth of the tokens."),
    ("95% CI", "the 95% confidence interval over prompts (t or bootstrap); 'supported' means it excludes 0."),
    ("faithfulness", "of a circuit C: (m(C) - m(none)) / (m(all) - m(none)), m the answer's log-prob at P with every "
                     "node outside C mean-ablated (m(all): the clean model, m(none): every node mean-ablated). 1: the "
                     "circuit alone does the whole job; 0: no better than everything mean-ablated. A position on "
                     "that scale, not a share of the log-prob."),
    ("completeness", "the same scale with the circuit's own nodes mean-ablated and the rest kept: near 0 when the "
                     "circuit holds all that matters, near 1 when the rest can do the job without it."),
    ("AtP", "attribution patching: a node's effect estimated from one forward and one backward pass as gradient "
            "times the change of the node's value (first order in the ablation); fast, but misses non-linear "
            "effects, so the report compares it with the exact effects."),
    ("IG", "integrated gradients: the same estimate with the gradient averaged along the path from clean to "
           "ablated. Here, as in Sparse Feature Circuits, all nodes of one submodule (one SAE's features, or one "
           "layer's heads) move together, so a node's IG shares out the effect of ablating its whole submodule, "
           "including the other nodes' interactions with it; it need not equal the exact effect of ablating that "
           "node alone, which the report lists beside it."),
)
"""Terms the report uses, in the order the glossary lists them."""


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _f(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if _finite(v) else "n/a"


def _results(results: Results | Mapping) -> Results:
    """``results`` typed: a dict is validated (and upgraded from version 1); raises ResultsSchemaError."""
    return results if isinstance(results, Results) else Results.from_dict(results)


def _sae(sae: SaeEntry | Mapping) -> SaeEntry:
    """One SAE entry typed: a dict is validated (raises pydantic's ValidationError when it is not an entry)."""
    return sae if isinstance(sae, SaeEntry) else SaeEntry.model_validate(sae)


def model_name(results: Results | Mapping) -> str:
    """The model's name for titles: the hub name, or the last part of a local path (never a cache folder path)."""
    name = str(results.model if isinstance(results, Results) else results.get("model", ""))
    if "/" in name or "\\" in name:
        parts = [p for p in name.replace("\\", "/").split("/") if p]
        looks_like_hub = len(parts) == 2 and not name.startswith((".", "/", "~")) and "." not in parts[0]
        if not looks_like_hub and parts:
            last = parts[-1]
            return last[: -len(".bin")] if last.endswith(".bin") else last
    return name


def supported(mean: Any, ci: Any) -> bool:
    """True when the 95% interval ``ci`` (half-width or ``[lo, hi]``) around ``mean`` lies above 0."""
    lo, _ = ci_bounds(mean, ci)
    return _finite(lo) and lo > 0


def _interval(mean: Any, ci: Any, unit: str = "nats") -> str:
    lo, hi = ci_bounds(mean, ci)
    if not _finite(mean):
        return "undefined"
    if _finite(lo) and _finite(hi):
        return f"{mean:.3f} {unit} (95% CI {lo:.3f} to {hi:.3f})"
    return f"{mean:.3f} {unit} (no interval: too few prompts)"


def quoted_token(token: str) -> str:
    """A token in running text: its visible form (:func:`~saecircuits.report.tokens_html.visible_token`) between
    typographic quotes, never Python's ``repr`` (which escapes quotes: the token ``.'"`` would read ``'.\\'"'``)."""
    return f"\u201c{visible_token(token)}\u201d"


def layer_comparison_reading(lc: LayerComparison | Mapping) -> str:
    """One sentence on how the layers' top-feature sets combine (``layer_comparison`` of results.json): the loss
    increase of all sets ablated together against the sum of each alone, from the per-prompt ``interaction``
    (together - sum, nats, 95% CI). Empty when it is not recorded."""
    if not isinstance(lc, LayerComparison):
        lc = LayerComparison.model_validate(lc)
    runs, it = lc.runs, lc.interaction
    if len(runs) < 3 or it is None or not _finite(it.mean):
        return ""
    together = runs[-1].loss_increase.mean
    alone = [r.loss_increase.mean for r in runs[:-1]]
    if not _finite(together) or not all(_finite(a) for a in alone):
        return ""
    lo, hi = ci_bounds(it.mean, it.ci95)
    said = (f"Ablated together, the layers' top features raise the answer loss by {together:.3f} nats, against "
            f"{sum(alone):.3f} for the sum of each set alone: a difference of {it.mean:+.3f} nats")
    said += f" (95% CI {lo:+.3f} to {hi:+.3f})" if _finite(lo) and _finite(hi) else " (no interval)"
    if _finite(lo) and lo > 0:
        return said + (". Super-additive: each set does more when the other is also gone, so the sets partly stand "
                       "in for each other (redundant paths), and ablating one set alone understates what it does.")
    if _finite(hi) and hi < 0:
        return said + (". Sub-additive: the separate effects overlap; the later features partly depend on the "
                       "earlier ones (or carry the same signal), so their effects are not independent.")
    return said + ". Within the interval they add up: the sets act about independently."


def _answers(task) -> str:
    toks = task.answer_tokens
    if toks:
        shown = [quoted_token(t) for t in toks[:4]]
        return " or ".join(shown) + (f" (and {len(toks) - 4} more)" if len(toks) > 4 else "")
    return f"token id(s) {', '.join(str(i) for i in task.answer_token_ids[:4])}"


def _clean_loss(results: Results) -> float | None:
    for sae in results.saes:
        if _finite(sae.clean_loss):
            return float(sae.clean_loss)
    return None


def _performs(results: Results) -> str:
    """One sentence on whether the model performs the behaviour."""
    b = results.behaviour
    if b is not None:
        acc = b.top1_accuracy
        n = b.n_prompts
        hits = round(acc * n) if _finite(acc) and isinstance(n, int) else None
        # counts, not a rounded percentage: 299 of 300 must not read as 100%
        acc_s = ("" if not _finite(acc) else f"its top-1 prediction is the answer on {hits} of the {n} prompts "
                 f"({percent(acc, 1)})" if hits is not None else f"its top-1 prediction is the answer on {percent(acc, 1)} of the "
                 "prompts")
        verdict = "The model performs the behaviour" if b.performs else "The model does NOT perform the behaviour"
        return f"{verdict}{': ' + acc_s if acc_s else ''}."
    loss = _clean_loss(results)
    if loss is None:
        return "Whether the model performs the behaviour is not recorded in these results."
    p = math.exp(-loss)
    verdict = "so it performs the behaviour" if p >= 0.5 else "so it does not reliably perform the behaviour"
    return (f"The model's mean answer loss at P is {loss:.3f} nats: it puts probability {p:.2f} on the answer "
            f"(geometric mean over prompts), {verdict}.")


def _components(results: Results, n: int = 3) -> str:
    labels, means = results.dla.labels, results.dla.mean
    order = sorted((i for i in range(len(labels)) if _finite(means[i])), key=lambda i: -abs(means[i]))[:n]
    if not order:
        return ""
    def listed(idx: list[int]) -> str:
        parts = [f"{labels[i]} ({means[i]:+.2f} logits)" for i in idx]
        return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]

    # the largest |DLA|: the ones that raise the answer's logit are its sources, the others push it down
    up, down = [i for i in order if means[i] > 0], [i for i in order if means[i] < 0]
    said = []
    if up:
        said.append("Directly, the answer's logit comes mostly from " + listed(up))
    if down:
        said.append(("while " if up else "Directly, no large component raises the answer's logit; ") + listed(down)
                    + (" push it down" if len(down) > 1 else " pushes it down"))
    if not said:
        return ""
    return ", ".join(said) + " (direct logit attribution, mean over prompts)."


def ratio_problem(sae: SaeEntry | Mapping, key: str = "loss_recovered") -> str | None:
    """Why the loss-recovered ratio ``key`` of an SAE entry cannot be read as a result, or None when it can.

    One rule, the one :func:`saecircuits.analysis.quality.reconstruction.loss_recovered` applies when it computes the ratio:
    it cannot be read when results.json gives a ``{key}_undefined_reason`` or no finite value. For files that predate
    that field, the same threshold is applied here: ablating the layer raises the answer loss by less than
    :data:`~saecircuits.analysis.quality.thresholds.MIN_ABLATION_EFFECT` nats (the ratio divides by almost nothing)."""
    sae = _sae(sae)
    v = getattr(sae, key)
    reason = getattr(sae, f"{key}_undefined_reason")
    if reason or not _finite(v):
        return reason or "not recorded"
    ablated = sae.zero_ablation_loss if key == "loss_recovered" else sae.mean_ablation_loss
    clean = sae.clean_loss
    if _finite(ablated) and _finite(clean) and ablated - clean < MIN_ABLATION_EFFECT:
        d = ablated - clean
        change = (f"ablating the layer lowers the answer loss (by {-d:.3f} nats)" if d < 0 else
                  f"ablating the layer raises the answer loss by only {d:.3f} nats")
        return f"{change}, so the ratio divides by almost nothing"
    return None


def _ranked(sae: SaeEntry) -> list:
    return sorted(sae.top_features, key=lambda t: -t.loss_increase if _finite(t.loss_increase) else math.inf)


def _joint(sae: SaeEntry):
    """The top features' joint effect (a ``Stat``: the loss increase, else the log-prob difference), or None."""
    ma = sae.multi_ablation
    return None if ma is None else ma.loss_increase or ma.logprob_diff


def layer_effect_share(sae: SaeEntry | Mapping) -> float | None:
    """The top features' joint loss increase (``multi_ablation``) as a share of the layer's zero-ablation loss
    increase (``zero_ablation_loss - clean_loss``).

    None when either is missing, or when the layer's effect is too small to divide by: below
    :data:`~saecircuits.analysis.quality.thresholds.MIN_ABLATION_EFFECT` nats, or loss recovered vs zero ablation undefined
    (the same rule as :func:`ratio_problem`; a 1e-4-nat layer effect must not become "300000% of the layer")."""
    sae = _sae(sae)
    st = _joint(sae)
    joint = st.mean if st is not None else None
    layer = (sae.zero_ablation_loss or math.nan) - (sae.clean_loss or math.nan)
    if not (_finite(joint) and _finite(layer)) or layer < MIN_ABLATION_EFFECT:
        return None
    if ratio_problem(sae, "loss_recovered") is not None:
        return None
    return joint / layer


def _sae_sentence(sae: SaeEntry) -> list[str]:
    hp = sae.hook_point
    out = []
    ranked = _ranked(sae)
    lr = sae.loss_recovered
    lr_ci = sae.loss_recovered_ci95
    lr_s = ""
    problem = ratio_problem(sae)
    if problem is not None:
        lr_s = f" (its loss recovered cannot be read: {problem})"
    elif _finite(lr):
        lo, hi = ci_bounds(lr, lr_ci)
        lr_s = f" (its SAE recovers {lr:.3f} of the loss vs zero ablation" + (
            f", 95% CI {lo:.3f} to {hi:.3f}" if _finite(lo) and _finite(hi) else "") + ")"
    sup = [t for t in ranked if supported(t.loss_increase, t.loss_increase_ci95)]
    if not ranked:
        return [f"{hp}: no feature was active on enough prompts to rank{lr_s}."]
    top = sup[0] if sup else ranked[0]
    frac = top.fraction_active
    frac_s = f" on the {percent(frac)} of prompts where it is active" if _finite(frac) else ""
    lead = (f"In {hp}{lr_s}, feature {top.feature} matters most: ablating it alone raises the answer loss by "
            f"{_interval(top.loss_increase, top.loss_increase_ci95)}{frac_s}")
    rest = [t for t in sup if t is not top][:2]
    if rest:
        lead += "; next come " + " and ".join(
            f"feature {t.feature} ({_f(t.loss_increase)} nats)" for t in rest)
    out.append(lead + ".")
    if not sup:
        if not any(_finite(ci_bounds(t.loss_increase, t.loss_increase_ci95)[0]) for t in ranked):  # n < 2 each
            out.append(f"In {hp} no feature's effect has a 95% interval: each is measured on fewer than 2 prompts; "
                       "use more prompts (--max-prompts, a larger corpus) to tell which are supported.")
        else:
            out.append(f"In {hp} no feature's effect is supported (every 95% CI includes 0): the effect is spread "
                       "thin or too small to measure on these prompts.")
        return out
    share = layer_effect_share(sae)
    joint = _joint(sae)
    if sae.multi_ablation is not None and sae.multi_ablation.features and joint is not None and _finite(joint.mean):
        sentence = (f"Ablating features {', '.join(str(x) for x in sae.multi_ablation.features)} together raises it "
                    f"by {_interval(joint.mean, joint.ci95)}")
        if share is not None:
            layer = sae.zero_ablation_loss - sae.clean_loss
            sentence += f", {percent(share)} of what zero-ablating the whole layer costs ({layer:.3f} nats)"
        out.append(sentence + ".")
        if share is not None and share < SPREAD_THIN:
            out.append(f"The effect in {hp} is spread thin: the top features together carry under "
                       f"{SPREAD_THIN:.0%} of the layer's effect, so many features each contribute a little.")
    return out


def headline(results: Results | Mapping) -> list[str]:
    """The report's headline, in plain words: the behaviour, whether the model performs it, which components carry
    it (DLA), which features matter most and by how much (nats, 95% CI), where the effect is spread thin, and the
    circuit when there is one. Returns plain-text sentences."""
    results = _results(results)
    task = results.task
    out = [f"Behaviour: {task.name}, on {task.n_prompts} prompts; the model should predict {_answers(task)} "
           "next.", _performs(results)]
    comp = _components(results)
    if comp:
        out.append(comp)
    for sae in results.saes:
        out += _sae_sentence(sae)
    sel = results.circuit.selection if results.circuit is not None else None
    if sel is not None and _finite(sel.faithfulness):
        f = sel.faithfulness
        n_nodes = sel.n_nodes if sel.n_nodes is not None else "?"
        out.append(f"A circuit of {n_nodes} nodes across the SAEs has faithfulness {f:.3f}: with "
                   "everything else mean-ablated, the answer's log-prob lies "
                   f"{percent(f)} of the way from its value with every node mean-ablated (0) to the clean model's (1) "
                   f"({sel.rule or ''}).")
    return out


def feature_reading(sae: SaeEntry | Mapping, k: int) -> str:
    """One line on feature ``k`` of one SAE entry: the tokens it fires on (corpus), what it boosts (prompt-based or
    weight-based logit boosts) and its effect when ablated at P. Empty string when nothing is recorded.

    ``sae`` may be a dict holding only some keys (a feature card's entry, :mod:`saecircuits.feature_card`): the
    three it reads are validated alone then."""
    if isinstance(sae, SaeEntry):
        return _reading(sae.corpus_stats, sae.feature_details, sae.top_features, k)
    cs, fds, tops = sae.get("corpus_stats"), sae.get("feature_details"), sae.get("top_features")
    return _reading(CorpusStats.model_validate(cs) if cs is not None else None,
                    [FeatureDetail.model_validate(d) for d in fds] if fds is not None else None,
                    [TopFeature.model_validate(t) for t in tops] if tops is not None else None, k)


def _reading(corpus_stats: CorpusStats | None, feature_details: list[FeatureDetail] | None,
             top_features: list[TopFeature] | None, k: int) -> str:
    parts = []
    listed = corpus_stats.features if corpus_stats is not None else []
    cs = next((fe for fe in listed if fe.feature == k), None)
    if cs is not None and cs.top_tokens:
        parts.append("fires on " + ", ".join(quoted_token(t) for t, _ in cs.top_tokens[:3]))
    fd = next((d for d in feature_details or [] if d.feature == k), None)
    if fd is not None:
        pb, wb = fd.prompt_boosts, fd.weight_boosts
        if pb is not None and pb.boosted:
            parts.append("boosts " + ", ".join(quoted_token(t) for t, _ in pb.boosted[:3]))
        elif wb is not None and wb.top:
            parts.append("writes towards " + ", ".join(quoted_token(t) for t, _ in wb.top[:3]))
    t = next((t for t in top_features or [] if t.feature == k), None)
    if t is not None and _finite(t.loss_increase):
        lo, hi = ci_bounds(t.loss_increase, t.loss_increase_ci95)
        ci = f" [{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else ""
        parts.append(f"ablating it: {t.loss_increase:+.3f} nats{ci}")
    return "; ".join(parts)


def _interval_above_one(value: float, ci) -> bool:
    """True when a ratio's 95% interval lies above 1 (or there is none): 1.004 [0.995, 1.012] is just 1."""
    lo, _ = ci_bounds(value, ci)
    return not _finite(lo) or lo > 1


def surprises(sae: SaeEntry | Mapping, results: Results | Mapping | None = None) -> list[str]:
    """A sentence for each value of one SAE entry that would surprise a reader: loss recovered above 1, mean ablation
    hurting more than zero ablation (with which mean is used)."""
    sae = _sae(sae)
    results = _results(results) if results is not None else None
    hp = sae.hook_point
    out = []
    for key, vs in (("loss_recovered", "zero"), ("loss_recovered_mean_ablation", "mean")):
        v = getattr(sae, key)
        problem = ratio_problem(sae, key)
        if _finite(v) and problem is not None:
            out.append(f"Loss recovered vs {vs} ablation at {hp} ({v:.3f}) cannot "
                       f"be read as a result: {problem}. Compare "
                       "the losses themselves (clean, SAE spliced in, ablated) instead.")
        elif _finite(v) and v > 1 and _interval_above_one(v, getattr(sae, f"{key}_ci95")):
            out.append(
                f"Loss recovered vs {vs} ablation at {hp} is above 1 ({v:.3f}): "
                "with the SAE spliced in, the answer loss "
                f"({_f(sae.sae_loss)} nats) is lower than the clean model's ({_f(sae.clean_loss)}). "
                "The SAE's reconstruction error happens to help this answer; read it as fully recovered, not as "
                "better than the model.")
    zero, mean = sae.zero_ablation_loss, sae.mean_ablation_loss
    if _finite(zero) and _finite(mean) and mean > zero:
        corpus = (results.corpus if results is not None else None) or {}
        bos = results.bos_policy if results is not None else None
        special = bos.special_positions if bos is not None else None
        n_tok = corpus.get("n_tokens")
        which = (f"its mean over {n_tok} corpus tokens" if n_tok else "its mean over the corpus tokens") + (
            ", special-token positions left out" if special == "excluded" else
            ", special-token positions included" if special == "included" else "")
        out.append(
            f"Mean ablation hurts more than zero ablation at {hp} ({mean:.3f} vs "
            f"{zero:.3f} nats). Mean ablation "
            f"replaces the activation at P by {which}: an average over every position of every story, which at the "
            "prediction position can lie further from the clean activation than zero does. Loss recovered is "
            "then easier to reach against mean ablation.")
    return out


def reading_rows(sae: SaeEntry | Mapping, features: Sequence[int]) -> list[tuple[int, str]]:
    """``(feature, one-line reading)`` for each of ``features`` (see :func:`feature_reading`)."""
    if isinstance(sae, Mapping) and "top_features" in sae:
        sae = SaeEntry.model_validate(sae)  # a whole entry, typed once; a card's partial entry is read per feature
    return [(k, feature_reading(sae, k)) for k in features]
