"""Stage ``analyse``, once per SAE: every analysis of one SAE (:func:`analyse_sae`, then the rest of the reference
study, :func:`study_sae`), its training record and its checks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import torch

from saecircuits.pipeline.config import RunConfig
from saecircuits.pipeline.corpus import _corpus_stats_json
from saecircuits.pipeline.stages import RunContext, Stage
from saecircuits.pipeline.values import (
    _loss_recovered_keys,
    _mean_ci,
    _off_range_json,
    _round,
    _whole_sequence_json,
)

logger = logging.getLogger(__name__)


def analyse_sae(
    model, sae, task, stat_docs: list[list[int]], cfg: RunConfig, progress: Callable[[str], None],
    bars: bool = False, *, mean_act: torch.Tensor | None = None, token_counts: torch.Tensor | None = None,
    model_names: Collection[str] = (), fs=None, acts=None,
) -> dict:
    """All first-slice analyses of one SAE; returns its ``results.json`` entry (schema: saecircuits.results, docs/results.md).

    ``mean_act`` (the hook's mean activation) and ``token_counts`` (corpus token counts for the common-token mask)
    come from the corpus statistics pass when given; otherwise they are computed here. ``fs``: the SAE's
    :class:`~saecircuits.analysis.corpus.statistics.FeatureStats` over ``stat_docs``; when given (and it kept
    ``cfg.n_examples`` documents per feature) the top activating examples are read from it, not from another pass
    over the corpus. ``model_names``: the names the loaded model goes by (weights digest, source, name), compared
    with the model the SAE records. ``acts``: the SAE's
    :func:`~saecircuits.analysis.ablations.feature_effects.feature_activations` on ``task`` (computed when None)."""
    from saecircuits.analysis.ablations.feature_effects import (
        feature_ablation_table,
        feature_activations,
        feature_effects,
    )
    from saecircuits.analysis.ablations.modes import MODE_DESCRIPTIONS
    from saecircuits.analysis.ablations.multi_feature import ablate_features
    from saecircuits.analysis.corpus.examples import top_activating_examples
    from saecircuits.analysis.quality.checks import model_mismatch_check, sae_checks
    from saecircuits.analysis.quality.reconstruction import mean_activation, reconstruction_at_prediction

    if mean_act is None:
        progress(f"{sae.hook_point}: mean activation over {len(stat_docs)} documents")
        mean_act = mean_activation(model, stat_docs, sae.hook_point_out, exclude_bos=cfg.exclude_bos,
                                   progress=bars).reshape(-1)
    progress(f"{sae.hook_point}: loss at the answer position (clean / SAE / zero / mean ablation)")
    rec = reconstruction_at_prediction(model, sae, task, mean_act=mean_act, seed=cfg.seed)
    acts = feature_activations(model, sae, task) if acts is None else acts
    progress(f"{sae.hook_point}: exact effect of ablating each of {int(acts.value.numel())} active "
             f"(prompt, feature) pairs at P")
    effects = feature_effects(model, sae, task, features=cfg.feature_selection, acts=acts, progress=bars,
                              mode=cfg.ablation_mode)
    clean = effects.clean_loss
    table = feature_ablation_table(
        model, sae, task, min_fraction_active=cfg.min_fraction_active, max_candidates=cfg.max_candidates,
        effects=effects,
    )
    top_features = [
        {
            "feature": int(r.feature),
            "loss_increase": _round(r.loss_increase),
            "loss_increase_ci95": _round(r.loss_increase_ci95),
            "mean_activation": _round(r.mean_activation),
            "fraction_active": _round(r.fraction_active),
            "n_prompts": int(r.n_prompts),
        }
        for r in table.itertuples()
    ]
    entry: dict[str, Any] = {
        "hook_point": sae.hook_point,
        "d_in": int(sae.d_in),
        "d_sae": int(sae.d_sae),
        "architecture": sae.cfg.architecture,
        "l0": _round(rec.l0.float().mean()),
        "explained_variance_at_p": _round(rec.explained_variance),
        "relative_error": _round(rec.relative_error),
        "clean_loss": _round(rec.clean_loss.mean()),
        "sae_loss": _round(rec.sae_loss.mean()),
        "zero_ablation_loss": _round(rec.zero_loss.mean()),
        "mean_ablation_loss": _round(rec.mean_loss.mean()) if rec.mean_loss is not None else None,
        **_loss_recovered_keys("loss_recovered", rec.loss_recovered_zero),
        "n_active_features": int((acts.count() > 0).sum()),
        "top_features": top_features,
        "feature_effects": [
            {
                "feature": int(r.feature),
                "n_active_prompts": int(r.n_active_prompts),
                "fraction_active": _round(r.fraction_active),
                "mean_activation": _round(r.mean_activation),
                "mean_loss_increase": _round(r.loss_increase),
                "ci95": _round(r.loss_increase_ci95),
                "logprob_diff": _round(r.logprob_diff),
                "logit_diff": _round(r.logit_diff),
                "rank_diff": _round(r.rank_diff),
            }
            for r in effects.summary().itertuples()
        ],
        "feature_effects_info": {"selection": effects.selection, "n_pairs": int(effects.prompt.numel()),
                                 "ablation": MODE_DESCRIPTIONS[effects.mode], "ablation_mode": effects.mode,
                                 "off_range": _off_range_json(effects.off_range)},
    }
    from saecircuits.analysis.statistics import mean_ci95

    entry["loss_ci95"] = {
        name: _round(mean_ci95(v).half_width)
        for name, v in (("clean", rec.clean_loss), ("sae", rec.sae_loss), ("zero", rec.zero_loss),
                        ("mean", rec.mean_loss))
        if v is not None
    }
    if rec.loss_recovered_mean is not None:
        entry.update(_loss_recovered_keys("loss_recovered_mean_ablation", rec.loss_recovered_mean))
    else:
        entry["loss_recovered_mean_ablation"] = None
    # Whole-sequence loss recovered over every position of the prompts (answer included): unlike the answer loss at
    # P, which sits near 1 even for an SAE from another model, it falls when the SAE does not fit the model.
    progress(f"{sae.hook_point}: loss recovered over every position of the prompts")
    from saecircuits.analysis.quality.reconstruction import sequence_loss_recovered
    from saecircuits.models.tokens import special_token_ids

    seq = sequence_loss_recovered(
        model, [sae], [[*t, a] for t, a in zip(task.token_ids, task.answer_ids, strict=True)],
        bos_id=special_token_ids(model.tokenizer), bos_policy="exclude" if cfg.exclude_bos else "include",
        seed=cfg.seed)[sae.hook_point]
    entry["whole_sequence"] = _whole_sequence_json(seq)
    checks = sae_checks(sae.hook_point, rec, sequence=seq)
    mismatch = model_mismatch_check(sae.hook_point, sae.cfg.model_name, model_names)
    if mismatch is not None:
        checks.insert(0, mismatch)
    entry["failed_checks"] = [c.id for c in checks]
    entry["checks"] = [c.to_dict() for c in checks]  # moved to results["checks"] by run_pipeline

    # the set ablated together: the largest effects among features whose effect is supported (95% CI above 0)
    supported = [f["feature"] for f in top_features
                 if f["loss_increase"] is not None and f["loss_increase_ci95"] is not None
                 and f["loss_increase"] - f["loss_increase_ci95"] > 0]
    chosen = supported[: cfg.n_ablate]
    entry["multi_ablation_selection"] = {
        "rule": f"the {cfg.n_ablate} largest loss increases among features whose 95% CI excludes 0",
        "n_supported": len(supported), "n_ranked": len(top_features)}
    if chosen:
        progress(f"{sae.hook_point}: ablating features {chosen} together")
        abl = ablate_features(model, sae, task, chosen, mode=cfg.ablation_mode)
        entry["multi_ablation"] = {
            "features": chosen,
            "n_prompts": int(task.n_prompts),
            "mode": abl.mode,
            "off_range": _off_range_json(abl.off_range),
            **{
                name: {"mean": _round(abl.summary[name].mean), "ci95": _round(abl.summary[name].half_width)}
                for name in ("logprob_diff", "logit_diff", "rank_diff", "loss_increase")
            },
        }
    if cfg.n_evidence_features > 0 and top_features:
        from saecircuits.analysis.evidence import feature_evidence

        evidence_features = [f["feature"] for f in top_features[: cfg.n_evidence_features]]
        progress(f"{sae.hook_point}: per-feature evidence for {evidence_features}")
        entry.update(feature_evidence(model, sae, task, evidence_features, stat_docs, acts=acts, clean_loss=clean,
                                      effects=effects, mode=cfg.ablation_mode, token_counts=token_counts))
    shown = [f["feature"] for f in top_features[: cfg.n_example_features]]
    if shown:
        # each shown feature's activation at P on the prompts where it is active (the feature card's histogram)
        entry["task_activations"] = [
            {"feature": int(k), "values": [_round(v, 4) for v in acts.value[acts.feature == k].tolist()]}
            for k in shown]
        progress(f"{sae.hook_point}: top activating examples of {len(shown)} features")
        if fs is not None and fs.top_doc.shape[1] >= cfg.n_examples:  # the corpus pass's top-k: no second pass
            from saecircuits.analysis.corpus.statistics import top_examples_from_stats

            examples = top_examples_from_stats(model, sae, stat_docs, fs, shown, k=cfg.n_examples)
        else:
            examples = top_activating_examples(model, sae, stat_docs, shown, k=cfg.n_examples, progress=bars)
        entry["examples"] = [
            {
                "feature": int(k),
                "examples": [
                    {
                        "doc_index": int(e.doc_index),
                        "tokens": list(e.tokens),
                        "token_kinds": list(e.token_kinds),
                        "activations": [_round(a, 4) for a in e.activations],
                        "max_activation": _round(e.max_activation, 4),
                    }
                    for e in examples.get(k, [])
                ],
            }
            for k in shown
        ]
    return entry


def _per_token_json(model, pt: dict) -> dict:
    """One story of the max-activating ablation's per-token view, tokens shown as everywhere (``token_pieces``)."""
    from saecircuits.models.tokens import token_pieces

    pieces = token_pieces(model.tokenizer, pt["tokens"])
    return {"doc_index": int(pt["doc"]), "tokens": [q.text for q in pieces], "token_kinds": [q.kind for q in pieces],
            "loss_change": [_round(v, 4) for v in pt["loss_change"]],
            "activation": [_round(v, 4) for v in pt["activation"]]}


def study_sae(
    model, sae, task, stat_docs: list[list[int]], entry: dict, fs, mean_act: torch.Tensor, cfg: RunConfig,
    progress: Callable[[str], None], *, acts=None,
) -> dict:
    """The reference study's remaining analyses of one SAE: new keys of its ``results.json`` entry.

    Keys (schema: saecircuits.results, docs/results.md): ``corpus_stats``, ``loss_comparison`` (the five-way loss comparison),
    ``ablation_modes`` (residual-preserving vs reconstruction ablation and the clean effect, with off-range counts),
    ``max_activating_ablation``, ``feature_geometry`` (co-occurrence at P, decoder/encoder cosines, token kurtosis)
    and ``span_ablation``.

    Args:
        entry: the SAE's entry from :func:`analyse_sae` (its ranked features and multi-ablation set are used).
        fs: the SAE's :class:`~saecircuits.analysis.corpus.statistics.FeatureStats` from the run's corpus pass.
        mean_act: the hook's mean activation (the one the mean-ablation loss used).
        acts: the SAE's :func:`~saecircuits.analysis.ablations.feature_effects.feature_activations` on ``task``
            (computed when None).
    """
    from saecircuits.analysis.ablations.feature_effects import feature_activations, feature_effects
    from saecircuits.analysis.ablations.loss_comparison import CONDITIONS, loss_comparison
    from saecircuits.analysis.ablations.max_activating import max_activating_ablation
    from saecircuits.analysis.ablations.modes import ABLATION_MODES
    from saecircuits.analysis.ablations.multi_feature import ablate_features
    from saecircuits.analysis.ablations.span import SPAN_VARIANTS, span_ablation
    from saecircuits.analysis.corpus.cooccurrence import feature_cooccurrence
    from saecircuits.analysis.corpus.geometry import decoder_cosines, encoder_cosines, token_kurtosis

    out: dict[str, Any] = {}
    hp = sae.hook_point
    acts = feature_activations(model, sae, task) if acts is None else acts
    ranked = [f["feature"] for f in entry.get("top_features", [])]
    chosen = entry.get("multi_ablation", {}).get("features", [])
    shown = ranked[: cfg.n_example_features]
    # every feature the browser lists (any recorded effect) gets its card's corpus statistics and top examples
    listed = list(dict.fromkeys([*ranked, *(int(e["feature"]) for e in entry.get("feature_effects") or [])]))
    progress(f"{hp}: corpus statistics and top examples of {len(listed)} listed features")
    out["corpus_stats"] = _corpus_stats_json(model, sae, fs, stat_docs, listed, cfg, detailed=shown)

    progress(f"{hp}: five-way loss comparison at P")
    lc = loss_comparison(model, sae, task, chosen, mean_act, mode=cfg.ablation_mode)
    out["loss_comparison"] = {
        "conditions": list(CONDITIONS),
        "labels": lc.labels(),
        "features": chosen,
        "mode": lc.mode,
        "n_prompts": int(task.n_prompts),
        "mean": [_round(lc.means[c].mean) for c in CONDITIONS],
        "ci95": [_round(lc.means[c].half_width) for c in CONDITIONS],
        "diff_vs_clean": [_round(lc.diffs[c].mean) for c in CONDITIONS],
        "diff_vs_clean_ci95": [_round(lc.diffs[c].half_width) for c in CONDITIONS],
        "features_minus_sae": _mean_ci(lc.features_minus_sae),
        "off_range": _off_range_json(lc.off_range) if chosen else None,
        "sae_off_range": _off_range_json(lc.sae_off_range),
    }

    compared = ranked[:10]
    if compared:
        progress(f"{hp}: top features under the three ablation modes")
        modes: dict[str, Any] = {"features": compared, "multi_features": chosen, "rows": [], "multi": {},
                                 "off_range": {}, "descriptions": {}}
        from saecircuits.analysis.ablations.modes import MODE_DESCRIPTIONS

        per_mode = {m: feature_effects(model, sae, task, features=compared, acts=acts, mode=m)
                    for m in ABLATION_MODES}
        summaries = {m: e.summary().set_index("feature") for m, e in per_mode.items()}
        for k in compared:
            row: dict[str, Any] = {"feature": int(k)}
            for m in ABLATION_MODES:
                sm = summaries[m]
                if k in sm.index:
                    row[m] = {"mean": _round(sm.loc[k, "loss_increase"]),
                              "ci95": _round(sm.loc[k, "loss_increase_ci95"]),
                              "n": int(sm.loc[k, "n_active_prompts"])}
                else:
                    row[m] = {"mean": None, "ci95": None, "n": 0}
            modes["rows"].append(row)
        for m in ABLATION_MODES:
            modes["descriptions"][m] = MODE_DESCRIPTIONS[m]
            modes["off_range"][m] = _off_range_json(per_mode[m].off_range)
            if chosen:
                abl = ablate_features(model, sae, task, chosen, mode=m)
                modes["multi"][m] = _mean_ci(abl.summary["loss_increase"]) | {
                    "off_range": _off_range_json(abl.off_range)}
        out["ablation_modes"] = modes

    story_feats = ranked[: cfg.n_evidence_features]
    if story_feats:
        progress(f"{hp}: ablation of {story_feats} on their max-activating corpus stories")
        stories = []
        for k in story_feats:
            docs = [d for d, _, _ in fs.top_examples(k, cfg.n_max_act_stories)]
            res = max_activating_ablation(model, sae, k, stat_docs, docs, corpus_max=float(fs.max_activation[k]),
                                          mode=cfg.ablation_mode)
            stories.append({
                "feature": int(k),
                "mode": res.mode,
                "threshold": _round(res.threshold),
                "n_stories": len(docs),
                "global": _mean_ci(res.global_increase),
                "per_position": _mean_ci(res.position_increase),
                "stories": [{"doc_index": int(r.doc), "clean_loss": _round(r.clean_loss),
                             "ablated_loss": _round(r.ablated_loss), "loss_increase": _round(r.loss_increase)}
                            for r in res.stories.itertuples()],
                "position_loss_increase": [_round(v, 4) for v in res.positions["loss_increase"]],
                "position_activation": [_round(v, 4) for v in res.positions["activation"]],
                "per_token": [_per_token_json(model, pt) for pt in res.per_token[:2]],
                "off_range": _off_range_json(res.off_range),
            })
        out["max_activating_ablation"] = stories

    geo = ranked[: cfg.n_geometry_features]
    if len(geo) >= 1:
        progress(f"{hp}: co-occurrence, cosines and token kurtosis of {geo}")
        co = feature_cooccurrence(acts, geo)

        def mat(t) -> list[list[float | None]]:
            return [[_round(v) for v in row] for row in t.tolist()]

        g: dict[str, Any] = {
            "features": geo,
            "cooccurrence": {"threshold": 0.0, "n_prompts": co.n_prompts, "counts": co.counts.tolist(),
                             "by_min": mat(co.by_min), "by_max": mat(co.by_max)},
            "decoder_cosine": mat(decoder_cosines(sae, geo)),
            "encoder_cosine": mat(encoder_cosines(sae, geo)),
        }
        try:
            kurt = token_kurtosis(model, sae)
        except ValueError as err:  # an SAE whose features do not write to the residual stream
            logger.info("token kurtosis skipped for %s: %s", hp, err)
        else:
            import numpy as np

            finite = kurt[torch.isfinite(kurt)].numpy()
            edges = np.linspace(float(finite.min()), float(finite.max()) + 1e-9, 31) if finite.size else np.zeros(2)
            g["token_kurtosis"] = [_round(float(kurt[k])) for k in geo]
            g["token_kurtosis_all"] = {
                "edges": [_round(e) for e in edges.tolist()],
                "counts": np.histogram(finite, bins=edges)[0].astype(int).tolist() if finite.size else [0],
                "median": _round(float(np.median(finite))) if finite.size else None,
                "n_features": int(kurt.numel()),
            }
        out["feature_geometry"] = g
        progress(f"{hp}: keeping only the span of the decoder vectors of {geo} at P")
        sp = span_ablation(model, sae, task, geo, mean_act)
        out["span_ablation"] = {
            "features": geo,
            "rank": sp.rank,
            "variants": list(SPAN_VARIANTS),
            "mean": [_round(sp.means[c].mean) for c in SPAN_VARIANTS],
            "ci95": [_round(sp.means[c].half_width) for c in SPAN_VARIANTS],
            "diff_vs_clean": [_round(sp.diffs[c].mean) for c in SPAN_VARIANTS],
            "diff_vs_clean_ci95": [_round(sp.diffs[c].half_width) for c in SPAN_VARIANTS],
            "fraction_kept": _round(sp.fraction_kept),
        }
    return out


def _analyse(ctx: RunContext, i: int, sae, *, model, saes: list, task, stat_docs: list[list[int]], corpus_stats,
             training: dict, model_names: list[str]) -> dict:
    """SAE ``i``'s ``results.json`` entry (``entry``), its checks (``checks``, which results.json keeps in one
    block: the entry keeps their ids under ``failed_checks``) and its feature activations at P (``prompt_acts``,
    computed once for its analyses and the circuit stage)."""
    from saecircuits.analysis.ablations.feature_effects import feature_activations
    from saecircuits.analysis.quality.checks import density_checks
    from saecircuits.analysis.quality.reconstruction import mean_activation

    cfg, stats = ctx.cfg, corpus_stats
    # the corpus pass leaves out every special position; with --include-bos the mean keeps BOS
    # (a transcoder's mean ablation replaces the MLP's output, so its mean is of the hook it writes)
    mean_act = stats[i].mean_input if cfg.exclude_bos and not sae.is_transcoder else mean_activation(
        model, stat_docs, sae.hook_point_out, exclude_bos=cfg.exclude_bos, progress=ctx.bars).reshape(-1)
    acts = feature_activations(model, sae, task)
    entry = analyse_sae(model, sae, task, stat_docs, cfg, ctx.say, bars=ctx.bars, mean_act=mean_act,
                        token_counts=stats.token_counts, model_names=model_names, fs=stats[i], acts=acts)
    entry.update(study_sae(model, sae, task, stat_docs, entry, stats[i], mean_act, cfg, ctx.say, acts=acts))
    fm = training.get("final_metrics", {}).get(sae.hook_point)
    entry["training"] = {k: v for k, v in training.items() if k != "final_metrics"} | (
        {"final_metrics": fm} if fm else {})
    ranked = [t["feature"] for t in entry.get("top_features") or []]
    for c in density_checks(sae.hook_point, ranked, stats[i].density, stats[i].l0, sae.cfg.d_sae):
        entry["checks"].append(c.to_dict())
        entry.setdefault("failed_checks", []).append(c.id)
    checks = entry.pop("checks")  # all checks go to one block; the entry keeps their ids (failed_checks)
    for c in checks:
        ctx.say(f"WARNING ({sae.hook_point}): {c['message']}")
    return {"entries": entry, "sae_checks": checks, "prompt_acts": acts}


ANALYSE = Stage("analyse", _analyse, reads=("saes", "model", "task", "stat_docs", "corpus_stats", "training",
                                            "model_names"),
                writes=("entries", "sae_checks", "prompt_acts"), codecs={"prompt_acts": "feature_acts"}, each="saes",
                label=lambda sae: sae.hook_point)
