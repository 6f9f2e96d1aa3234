"""One feature's card without a full run: ``saecircuits feature --sae DIR K [--model ... --data ...]``.

This module only wires the stages together, as :mod:`saecircuits.pipeline` does, and with the pipeline's own
functions and settings, so a feature's card matches the one in a run's report:

- the SAE alone: its hook point, encoder bias and decoder norm of feature K;
- with ``--model``: the weight-based logit boosts (analysis.boosts);
- with ``--model`` and ``--data``: the corpus statistics of K (density, activation histogram, tokens it fires on,
  examples from lower bands), its top activating examples, and on the task built from the corpus (the closing-quote
  task, or ``--task FILE.jsonl``): its activation at P on each prompt, its exact ablation effect, the prompt-based
  log-prob boosts, loss increase vs activation and DFA (analysis.evidence).

The card is an SAE entry of results.json restricted to feature K (``{"saes": [entry]}``), rendered by
:func:`saecircuits.report.render.build_card_page` or printed by the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["feature_card"]


def feature_card(
    sae_dir: str | Path,
    feature: int,
    *,
    hook: str | None = None,
    model: str | None = None,
    data: str | Path | None = None,
    task: str = "closing-quote",
    tokenizer: str | None = None,
    workspace: str | Path = ".saecircuits",
    device: str = "cpu",
    dtype: str = "float32",
    n_docs: int = 1000,
    max_prompts: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Compute feature ``feature``'s card (see the module docstring); returns ``{"saes": [entry], ...}``.

    Raises:
        PipelineError: ``feature`` is out of range, ``--data`` is given without ``--model``, or a bad input.
        SAEError: ``sae_dir`` is not an SAE of a family saecircuits reads (for a folder of SAE folders the message
            lists them), or its hook is unknown (give ``hook``).
    """
    import torch

    from saecircuits.pipeline import PipelineError, RunConfig, _corpus_stats_json, _round, load_sae_arg
    from saecircuits.pipeline.config import check_device, check_dtype

    say = log or (lambda s: None)
    check_device(device)
    check_dtype(dtype, device)
    sae = load_sae_arg(sae_dir, hook, device)
    k = int(feature)
    if not 0 <= k < sae.d_sae:
        raise PipelineError(f"feature {k} is out of range: this SAE has features 0..{sae.d_sae - 1}")
    if data is not None and model is None:
        raise PipelineError("--data needs --model: the corpus statistics run the model; add --model NAME|DIR|FILE")
    with torch.no_grad():
        entry: dict[str, Any] = {
            "hook_point": sae.hook_point, "d_in": int(sae.d_in), "d_sae": int(sae.d_sae),
            "architecture": sae.cfg.architecture,
            "sae_only": {"b_enc": _round(float(sae.b_enc[k])), "decoder_norm": _round(float(sae.W_dec[k].norm()))},
        }
    out: dict[str, Any] = {"saes": [entry], "feature": k, "sae_dir": str(sae_dir)}
    if model is None:
        return out

    from saecircuits.models.load import load_model

    say(f"loading model {model}")
    m = load_model(model, tokenizer=tokenizer, device=device, dtype=getattr(torch, dtype),
                   cache_dir=Path(workspace) / "models")
    from saecircuits.pipeline import _check_sae_fits

    sae = _check_sae_fits(sae, m)
    out["model"] = model
    try:
        from saecircuits.analysis.readouts.boosts import weight_logit_boosts

        wb = weight_logit_boosts(m, sae, k, top=15)
        entry["feature_details"] = [{"feature": k, "weight_boosts": {
            "top": [[t.token, _round(t.value)] for t in wb.top],
            "bottom": [[t.token, _round(t.value)] for t in wb.bottom]}}]
    except ValueError as err:  # an SAE not on mlp.hook_post
        out["notes"] = [f"no weight-based boosts: {err}"]
    if data is None:
        return out

    from saecircuits.analysis.corpus.examples import top_activating_examples
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.pipeline import _build_task

    cfg = RunConfig(model=model, data=Path(data), out=Path(workspace) / "feature-card", task=task,
                    workspace=Path(workspace), device=device, dtype=dtype,
                    **({"max_prompts": max_prompts} if max_prompts is not None else {}))
    cfg.check_inputs()
    docs = read_documents(data)
    special = special_token_ids(m.tokenizer)
    stat_docs = [d for d in encode_documents(m.tokenizer, docs[:n_docs], max_len=int(m.cfg.n_ctx))
                 if any(t not in special for t in d)]
    say(f"corpus statistics over {len(stat_docs)} documents")
    stats = corpus_feature_stats(m, [sae], stat_docs, k=max(cfg.n_max_act_stories, cfg.n_examples),
                                 token_fraction=cfg.token_fraction)
    entry["corpus_stats"] = _corpus_stats_json(m, sae, stats[0], stat_docs, [k], cfg, detailed=[k])
    examples = top_activating_examples(m, sae, stat_docs, [k], k=cfg.n_examples)
    entry["examples"] = [{"feature": k, "examples": [
        {"doc_index": int(e.doc_index), "tokens": list(e.tokens), "token_kinds": list(e.token_kinds),
         "activations": [_round(a, 4) for a in e.activations], "max_activation": _round(e.max_activation, 4)}
        for e in examples.get(k, [])]}]
    try:
        tsk = _build_task(cfg, m, docs)
    except ValueError as err:
        out["notes"] = [*out.get("notes", []), f"no task prompts: {err}"]
        return out
    if tsk.n_prompts == 0:
        return out
    from saecircuits.analysis.ablations.feature_effects import feature_activations, feature_effects
    from saecircuits.analysis.evidence import feature_evidence

    say(f"task {tsk.name}: {tsk.n_prompts} prompts")
    acts = feature_activations(m, sae, tsk)
    entry["task_activations"] = [{"feature": k, "values": [_round(v, 4) for v in acts.value[acts.feature == k].tolist()]}]
    out["task"] = {"name": tsk.name, "n_prompts": tsk.n_prompts}
    if not (acts.feature == k).any():
        out["notes"] = [*out.get("notes", []), f"feature {k} is not active at P on any of the {tsk.n_prompts} prompts"]
        return out
    effects = feature_effects(m, sae, tsk, features=[k], acts=acts)
    s = effects.summary()
    if len(s):
        r = s.iloc[0]
        entry["feature_effects"] = [{
            "feature": k, "n_active_prompts": int(r.n_active_prompts), "fraction_active": _round(r.fraction_active),
            "mean_activation": _round(r.mean_activation), "mean_loss_increase": _round(r.loss_increase),
            "ci95": _round(r.loss_increase_ci95), "logprob_diff": _round(r.logprob_diff),
            "logit_diff": _round(r.logit_diff), "rank_diff": _round(r.rank_diff)}]
    ev = feature_evidence(m, sae, tsk, [k], stat_docs, acts=acts, effects=effects, token_counts=stats.token_counts)
    details = {d["feature"]: d for d in ev.get("feature_details", [])}
    if k in details:
        merged = entry.get("feature_details", [{"feature": k}])[0] | details[k]
        entry["feature_details"] = [merged]
    return out
