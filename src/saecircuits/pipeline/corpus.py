"""Stage ``corpus_stats``: one pass over the corpus documents for every SAE (densities, top examples, token counts,
the hook's mean activation, and the sums the circuit's mean ablation needs), and the ``corpus_stats`` entry of an
SAE built from it."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from saecircuits.pipeline.config import RunConfig
from saecircuits.pipeline.stages import RunContext, Stage
from saecircuits.pipeline.values import _round, _token_str

N_CARD_EXAMPLES = 3
"""Top corpus examples kept for every listed feature (its card in the feature browser)."""


def _corpus_stats_json(model, sae, fs, stat_docs, features: list[int], cfg: RunConfig,
                       detailed: Collection[int] = ()) -> dict:
    """The ``corpus_stats`` key of an SAE entry: corpus-wide summaries and, for every one of ``features``, its
    density, top tokens, activation histogram and top :data:`N_CARD_EXAMPLES` corpus examples (windows), all from
    the one corpus pass; the ``detailed`` ones also get their max-activating stories and lower-band examples."""
    import numpy as np

    from saecircuits.analysis.corpus.statistics import BANDS, example_windows

    density_edges = [float(x) for x in np.linspace(-7.0, 0.0, 29)]
    counts, n_dead = fs.density_histogram(density_edges)
    l0_counts = fs.l0_counts.tolist()
    out: dict[str, Any] = {
        "n_docs": int(fs.n_docs),
        "n_tokens": int(fs.n_tokens),
        "l0": _round(fs.l0),
        "l0_counts": [int(c) for c in l0_counts],
        "n_dead": n_dead,
        "density_log10_edges": [_round(e) for e in density_edges],
        "density_log10_counts": counts,
        "activation_log10_edges": [_round(e) for e in fs.hist_edges.tolist()],
        "token_fraction": float(fs.token_fraction),
        "bands": {k: _round(v) for k, v in BANDS.items()},
        "features": [],
    }
    picks, where = [], []
    n_band = min(2, cfg.n_examples)
    detailed = set(detailed)
    for k in features:
        for d, p, _ in fs.top_examples(k, N_CARD_EXAMPLES):
            picks.append((k, d, p))
            where.append((k, "top"))
        for band in BANDS if k in detailed else ():
            for d, p, _ in fs.band_examples(k, band, n_band):
                picks.append((k, d, p))
                where.append((k, band))
    # one forward pass over the distinct documents of every pick (at most the corpus statistics documents)
    windows = example_windows(model, sae, stat_docs, picks) if picks else []
    by_band: dict[tuple[int, str], list] = {}
    for (k, band), ex in zip(where, windows, strict=True):
        by_band.setdefault((k, band), []).append({
            "doc_index": int(ex.doc_index),
            "tokens": list(ex.tokens),
            "token_kinds": list(ex.token_kinds),
            "activations": [_round(a, 4) for a in ex.activations],
            "max_activation": _round(ex.max_activation, 4),
        })
    for k in features:
        top_tokens = fs.top_token_list(k)
        above = int(fs.above_count[k])
        feature = {
            "feature": int(k),
            "density": _round(float(fs.density[k])),
            "fire_count": int(fs.fire_count[k]),
            "max_activation": _round(float(fs.max_activation[k])),
            "mean_when_active": _round(float(fs.mean_when_active[k])),
            "above_count": above,
            "top_tokens": [[_token_str(model, t), int(c)] for t, c in top_tokens],
            "top_token_share": _round(top_tokens[0][1] / above) if top_tokens and above else None,
            "activation_log10_counts": [int(c) for c in fs.hist[k].tolist()],
            "top_examples": by_band.get((k, "top"), []),
        }
        if k in detailed:
            feature["top_stories"] = [{"doc_index": d, "position": p, "activation": _round(v, 4)}
                                      for d, p, v in fs.top_examples(k, cfg.n_max_act_stories)]
            feature["band_examples"] = {band: by_band.get((k, band), []) for band in BANDS}
        out["features"].append(feature)
    return out


def _corpus_stats(ctx: RunContext, *, model, saes: list, stat_docs: list[list[int]]) -> dict:
    """:func:`~saecircuits.analysis.corpus.statistics.corpus_feature_stats` of every SAE over ``stat_docs``; with
    the circuit on, the same forward also sums the hooks of the circuit's node groups
    (:func:`~saecircuits.analysis.circuit.corpus_mean_hooks`: its mean-ablation values over these documents, so the
    circuit stage encodes no corpus document)."""
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats

    cfg = ctx.cfg
    mean_hooks: list[str] = []
    if cfg.circuit and saes:
        from saecircuits.analysis.circuit import corpus_mean_hooks

        mean_hooks = corpus_mean_hooks(model, saes)
    ctx.say(f"corpus statistics of every SAE over {len(stat_docs)} documents (one pass)")
    stats = corpus_feature_stats(model, saes, stat_docs, k=max(cfg.n_max_act_stories, cfg.n_examples),
                                 token_fraction=cfg.token_fraction, progress=ctx.bars, mean_hooks=mean_hooks)
    return {"corpus_stats": stats}


CORPUS_STATS = Stage("corpus_stats", _corpus_stats, reads=("model", "saes", "stat_docs"), writes=("corpus_stats",),
                     codecs={"corpus_stats": "corpus_stats"})
