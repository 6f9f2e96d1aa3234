"""results.json, version 2: what the pipeline saves and the report reads (and nothing else).

The report re-renders from this file alone, so everything it shows must be in here. This module imports neither
torch nor the model. Keys marked ``*`` are required; unknown extra keys are allowed everywhere (forward
compatible) and ignored by the renderer. "float" values may be ``null``: :func:`write_json_atomic` writes NaN and
+-inf as ``null`` (JSON has no NaN), e.g. a CI half-width computed from a single prompt.

Units: losses are next-token cross-entropy in nats at the task's prediction position; logit differences in logits;
rank differences in ranks; DLA in logits; activations in SAE feature units; timings in seconds. CI half-widths
are 95% (t or bootstrap, as computed by the analysis); ``[lo, hi]`` pairs are 95% interval bounds.

::

    {
      *"schema_version": 2,                          # 1 is read too (:func:`upgrade_results`)
      "saecircuits_version": str,
      *"model": str,                                # model name, e.g. "roneneldan/TinyStories-1Layer-21M"
      "model_info": {"n_layers": int, "d_model": int, "d_mlp": int, "d_vocab": int, "n_heads": int,
                     "architecture": str},
      *"task": {*"name": str, *"n_prompts": int, *"answer_token_ids": [int, ...(>=1)],
                "answer_tokens": [str] (same length as answer_token_ids), "example_prompts": [str],
                "example_answers": [str], "example_answer_ids": [int],   # each example prompt's OWN answer
                "n_dropped_too_long": int},                # prompts left out: longer than the model's context
      "bos_policy": {*"prepended": bool,            # BOS prepended to prompts and documents (False: no BOS token)
                     *"token_id": int | null, "token": str | null, "special_token_ids": [int],
                     *"special_positions": "excluded" | "included",   # in SAE training and mean activations
                     "statement": str},             # the same in one sentence, for people
      "behaviour": {                               # the clean model on the task at P (analysis/behaviour.py)
          *"n_prompts": int, *"top1_accuracy": float, "top1_accuracy_ci95": [lo, hi] (Wilson),
          *"mean_p_answer": float, "mean_p_answer_ci95": float, *"mean_loss": float (nats),
          "mean_loss_ci95": float, "uniform_loss": float (nats, log d_vocab), *"performs": bool, "rule": str},
      "checks": [{*"id": str, *"scope": "task" | hook point, *"message": str, *"what_to_try": str,
                  "severity": str}],               # failed checks (analysis/checks.py); [] when all pass
      *"dla": {                                     # direct logit attribution to the answer
          *"labels": [str],                         # one per component, e.g. "embed", "L0H3", "MLP1", "bias"
          *"mean": [float] (same length),           # mean over prompts, logits
          "ci95": [float] (same length),            # half-widths
          "answer_logit_mean": float,               # mean answer logit (what the components sum to)
          *"completeness_max_abs_error": float},    # max |sum of components - answer logit| over prompts
      *"saes": [{                                   # one entry per SAE
          *"hook_point": str, *"d_in": int, *"d_sae": int, "architecture": str,
          *"l0": float,
          "explained_variance_at_p": float,         # of the SAE's reconstruction at P, across the task prompts
          "relative_error": float,                  # sum |x - x_hat|^2 / sum |x|^2 at P
          *"clean_loss": float, *"sae_loss": float, *"zero_ablation_loss": float, *"mean_ablation_loss": float,
          "loss_ci95": {"clean"|"sae"|"zero"|"mean": float half-width},
          *"loss_recovered": float,                 # (zero - sae) / (zero - clean); null when undefined
          "loss_recovered_ci95": [lo, hi],          # only when defined
          "loss_recovered_undefined_reason": str,   # only when undefined (analysis.reconstruction.loss_recovered)
          *"loss_recovered_mean_ablation": float,   # (mean - sae) / (mean - clean); null when undefined
          "loss_recovered_mean_ablation_ci95": [lo, hi],
          "loss_recovered_mean_ablation_undefined_reason": str,
          "whole_sequence": {                       # the SAE spliced in at EVERY position of the prompts (answer
                                                    # included); tells good SAEs from bad where the figures at P cannot
              *"loss_recovered": float,             # next-token loss recovered vs zero ablation; null when undefined
              "loss_recovered_ci95": [lo, hi], "loss_recovered_undefined_reason": str,   # (reason when undefined)
              *"explained_variance": float,         # over those positions (tokens), pooled; null when undefined
              "ce_clean": float, "ce_sae": float, "ce_zero": float (nats per token), "n_tokens": int,
              "n_prompts": int},
          "failed_checks": [str],                   # ids of this SAE's entries in results["checks"]
          "n_active_features": int,
          *"top_features": [{                       # ranked by loss increase when ablated
              *"feature": int (0 <= feature < d_sae), *"loss_increase": float (nats, ablated - clean),
              "loss_increase_ci95": CI, *"mean_activation": float, *"fraction_active": float in [0, 1],
              "n_prompts": int}],
          "feature_effects": [{                     # exact single-feature ablation at P, every active feature
              *"feature": int, *"n_active_prompts": int, *"mean_loss_increase": float (nats), "ci95": float,
              "fraction_active": float, "mean_activation": float, "logprob_diff": float, "logit_diff": float,
              "rank_diff": float}],
          "feature_effects_info": {"selection": str, "n_pairs": int, "ablation": str},
          "multi_ablation": {                       # all `features` ablated together
              "features": [int], "n_prompts": int,
              "logprob_diff": {"mean": float, "ci95": CI},   # original - ablated, answer log-prob (nats)
              "logit_diff":   {"mean": float, "ci95": CI},   # original - ablated, answer logit
              "rank_diff":    {"mean": float, "ci95": CI}},  # original - ablated, answer rank
          "multi_ablation_selection": {"rule": str, "n_supported": int, "n_ranked": int},  # how the set was chosen
          "task_activations": [{"feature": int, "values": [float]}],   # activation at P on the prompts where active
          "examples": [{"feature": int, "examples": [{
              "doc_index": int, "tokens": [str], "activations": [float] (same length as tokens; null at a
              special token), "token_kinds": ["text"|"continuation"|"special"] (same length as tokens),
              "max_activation": float}]}],          # top activating examples
          "training": {...free-form...; "final_metrics": the last line of its metrics.jsonl, whose
                       "explained_variance_tokens" is over the tokens of the last training batch},
          # optional per-feature / attribution evidence (analysis/evidence.py; validated when present)
          "error_dla": {*"labels": [str], *"mean": [float], "ci95": [float]},   # logits (MLP, recon, error)
          "feature_details": [{*"feature": int,
              "n_active_prompts": int, "max_prompts": int,   # the views below use the first max_prompts active
              "prompt_boosts": {*"boosted": [[str, float]], *"deboosted": [[str, float]], "n_prompts": int,
                                "answer_logprob_clean": float, "answer_logprob_ablated": float},  # nats
              "weight_boosts": {*"top": [[str, float]], *"bottom": [[str, float]]},   # logits per unit act.
              "loss_vs_activation": {*"activation": [float], *"loss_increase": [float] (same length),
                                     *"pearson_r": float},
              "dfa": {*"labels": [str], *"mean": [float], "ci95": [float], "variant": str, "n_prompts": int,
                      "completeness_max_abs_error": float, "tangent_error_mean": float}}],
          "upstream_ablation": {*"hook": str, *"features": [int], *"clean_mean": [float],
                                *"ablated_mean": [float], "mode": str, "diff_ci95": [float],
                                "clean_mean_active": [float], "ablated_mean_active": [float],
                                "fraction_active_clean": [float], "fraction_active_ablated": [float]},
          "activation_scaled_dla": [{*"feature": int, *"mean_activation": float, *"dla_per_unit": float,
                                     *"scaled": float, "scaled_ln": float}],       # logits
          # optional keys of the rest of the reference study (pipeline.study_sae; validated when present)
          "corpus_stats": {*"n_docs": int, *"n_tokens": int, *"l0": float,   # one streaming corpus pass
              "l0_counts": [int], "n_dead": int, "density_log10_edges": [float], "density_log10_counts": [int],
              "activation_log10_edges": [float], "token_fraction": float, "bands": {name: fraction},
              *"features": [{*"feature": int, *"density": float in [0, 1], *"max_activation": float,
                  "fire_count": int, "mean_when_active": float, "above_count": int,
                  *"top_tokens": [[str, count]], "top_token_share": float, "activation_log10_counts": [int],
                  "top_stories": [{*"doc_index": int, *"position": int, *"activation": float}],
                  "band_examples": {band: [example as in "examples"]},   # the top-ranked features only
                  "top_examples": [example as in "examples"]}]},   # every listed feature (any recorded effect)
          "loss_comparison": {*"labels": [str], *"mean": [float] (nats), "ci95": [float], "diff_vs_clean": [float],
              "diff_vs_clean_ci95": [float], "conditions": [str], "features": [int], "mode": str,
              "n_prompts": int, "features_minus_sae": MEANCI, "off_range": OFFRANGE|null,
              "sae_off_range": OFFRANGE|null},
          "ablation_modes": {*"features": [int], *"rows": [{*"feature": int, "residual"|"reconstruction"|
              "clean_effect": MEANCI}], "multi_features": [int], "multi": {mode: MEANCI + "off_range"},
              "off_range": {mode: OFFRANGE|null}, "descriptions": {mode: str}},           # nats
          "max_activating_ablation": [{*"feature": int, *"global": MEANCI, *"per_position": MEANCI, "mode": str,
              "threshold": float, "n_stories": int, "stories": [{*"doc_index": int, *"clean_loss": float,
              *"ablated_loss": float, *"loss_increase": float}], "position_loss_increase": [float],
              "position_activation": [float] (same length), "per_token": [{"doc_index": int, *"tokens": [str],
              "token_kinds": [str], *"loss_change": [float] (same length), "activation": [float] (same length)}],
              "off_range": OFFRANGE|null}],                                                 # nats
          "feature_geometry": {*"features": [int] (S), "cooccurrence": {*"counts": SxS int, *"by_min": SxS,
              *"by_max": SxS, "threshold": float, "n_prompts": int}, "decoder_cosine": SxS, "encoder_cosine": SxS,
              "token_kurtosis": [float] (S), "token_kurtosis_all": {*"edges": [float], *"counts": [int],
              "median": float, "n_features": int}},
          "span_ablation": {*"features": [int], *"variants": [str], *"mean": [float] (nats), "ci95": [float],
              "diff_vs_clean": [float], "diff_vs_clean_ci95": [float], "rank": int, "fraction_kept": float}}],
      "layer_comparison": {*"runs": [{*"label": str, *"loss_increase": MEANCI, "hooks": [str],
          "features": [[int]], "values": [float]}], "mode": str, "n_prompts": int,
          "paired": [{*"a": int, *"b": int, *"mean": float, "ci95": CI, "n": int}],
          "interaction": MEANCI},   # together - sum of alone, per prompt (nats): > 0 super-, < 0 sub-additive
      "corpus": {...free-form...},
      "circuit": {"selection": {...}, "agreement": {"nodes"|"edges": {"atp"|"ig": {...}}},
                  "faithfulness": [{"n_nodes", "faithfulness", "completeness", ...}],
                  *"nodes": [{*"id": int, *"label": str, *"effect": float, "atp": float, "ig": float,
                              "in_circuit": bool, "top_tokens": [str], ...}],
                  *"edges": [{*"source": int, *"target": int, *"exact": float, "atp": float, "ig": float}]},
      "timings": {stage: seconds},
      "config": {...free-form...},
      "notes": [str]
    }

``CI`` means either a float half-width (preferred) or a ``[lo, hi]`` pair; :func:`ci_bounds` turns either into
bounds. ``MEANCI`` is ``{*"mean": float, "ci95": CI, "n": int}``. ``OFFRANGE`` counts the ablated activations below
the hook's minimum: ``{"floor": float, *"n_ablations": int, "n_with_off_range": int|null, "n_off_range_entries":
int|null, "fraction_with_off_range": float, "mean_depth": float, "min_value": float}`` (null counts: the hook has
no bounded range; ``mean_depth``: mean distance below the minimum of the entries below it).
Token strings are ``saecircuits.models.tokens.token_pieces`` / ``token_string`` (leading spaces kept; a character
split over byte tokens shown once, on its first piece, the others ``"continuation"`` with text ``""``).

Versions: 2 named the two explained variances by what they are (version 1 called both ``explained_variance``): the
SAE entry's ``explained_variance_at_p`` (at P, across prompts) and the training metrics'
``explained_variance_tokens`` (over the last training batch's tokens). :func:`load_results` and the renderer read a
version-1 file by renaming them (:func:`upgrade_results`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saecircuits.atomic import atomic_write_text

__all__ = [
    "SCHEMA_VERSION",
    "READABLE_VERSIONS",
    "ResultsSchemaError",
    "upgrade_results",
    "rename_training_metrics",
    "validate_results",
    "load_results",
    "write_json_atomic",
    "write_text_atomic",
    "to_jsonable",
    "ci_bounds",
]

SCHEMA_VERSION = 2
#: versions :func:`upgrade_results` brings to :data:`SCHEMA_VERSION`
READABLE_VERSIONS = (1, 2)
TOKEN_KINDS = ("text", "continuation", "special")  # = saecircuits.models.tokens.TOKEN_KINDS (no torch import here)


class ResultsSchemaError(ValueError):
    """results.json (or the dict the pipeline built) does not match the schema (version 2, or 1 upgraded)."""


def rename_training_metrics(metrics: Mapping) -> dict:
    """One training metrics line with version 1's ``explained_variance`` (over the batch's tokens) renamed
    ``explained_variance_tokens``; a current line is returned as a copy."""
    out = dict(metrics)
    if "explained_variance" in out and "explained_variance_tokens" not in out:
        out["explained_variance_tokens"] = out.pop("explained_variance")
    return out


def upgrade_results(d: Any) -> Any:
    """A version-1 results dict as version 2 (a new dict; ``d`` is not changed); any other input as it is.

    Version 1 called two things ``explained_variance``: ``saes[i]["explained_variance"]`` (at P, across prompts)
    becomes ``explained_variance_at_p``, ``saes[i]["training"]["final_metrics"]["explained_variance"]`` (over a
    training batch's tokens) becomes ``explained_variance_tokens``.
    """
    if not isinstance(d, Mapping) or d.get("schema_version") != 1:
        return d
    out = dict(d)
    out["schema_version"] = SCHEMA_VERSION
    saes = []
    for sae in d.get("saes") or []:
        if not isinstance(sae, Mapping):
            saes.append(sae)
            continue
        sae = dict(sae)
        if "explained_variance" in sae and "explained_variance_at_p" not in sae:
            sae["explained_variance_at_p"] = sae.pop("explained_variance")
        training = sae.get("training")
        if isinstance(training, Mapping) and isinstance(training.get("final_metrics"), Mapping):
            sae["training"] = {**training, "final_metrics": rename_training_metrics(training["final_metrics"])}
        saes.append(sae)
    if "saes" in d:
        out["saes"] = saes
    return out


# ---------------------------------------------------------------------------------------------------------------
# The schema as data. Kinds: "int", "float" (int accepted, null accepted), "str", "dict" (free-form), "ci"
# (float half-width or [lo, hi]), ("list", kind, length or None), ("map", kind) (str keys), Obj(fields).
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _F:
    kind: Any
    required: bool = False


@dataclasses.dataclass(frozen=True)
class _Obj:
    fields: dict[str, _F]


def _req(kind: Any) -> _F:
    return _F(kind, True)


def _opt(kind: Any) -> _F:
    return _F(kind, False)


_PAIR = ("list", "float", 2)
_STAT = _Obj({"mean": _req("float"), "ci95": _opt("ci")})

_EXAMPLE = _Obj(
    {
        "doc_index": _opt("int"),
        "tokens": _req(("list", "str", None)),
        "activations": _req(("list", "float", None)),
        "token_kinds": _opt(("list", "str", None)),
        "max_activation": _opt("float"),
    }
)

_TOKEN_VALUES = ("list", ("tokval",), None)  # [[token str, value float], ...]
_FEATURE_DETAIL = _Obj(
    {
        "feature": _req("int"),
        "n_active_prompts": _opt("int"),
        "max_prompts": _opt("int"),
        "prompt_boosts": _opt(
            _Obj(
                {
                    "boosted": _req(_TOKEN_VALUES),
                    "deboosted": _req(_TOKEN_VALUES),
                    "n_prompts": _opt("int"),
                    "answer_logprob_clean": _opt("float"),
                    "answer_logprob_ablated": _opt("float"),
                }
            )
        ),
        "weight_boosts": _opt(_Obj({"top": _req(_TOKEN_VALUES), "bottom": _req(_TOKEN_VALUES)})),
        "loss_vs_activation": _opt(
            _Obj(
                {
                    "activation": _req(("list", "float", None)),
                    "loss_increase": _req(("list", "float", None)),
                    "pearson_r": _req("float"),
                }
            )
        ),
        "dfa": _opt(
            _Obj(
                {
                    "labels": _req(("list", "str", None)),
                    "mean": _req(("list", "float", None)),
                    "ci95": _opt(("list", "float", None)),
                    "variant": _opt("str"),
                    "n_prompts": _opt("int"),
                    "completeness_max_abs_error": _opt("float"),
                    "tangent_error_mean": _opt("float"),
                }
            )
        ),
    }
)

_CHECK = _Obj(
    {
        "id": _req("str"),
        "scope": _req("str"),
        "message": _req("str"),
        "what_to_try": _req("str"),
        "severity": _opt("str"),
    }
)

_MEANCI = _Obj({"mean": _req("float"), "ci95": _opt("ci"), "n": _opt("int")})
_OFF_RANGE = (
    "nullable",
    _Obj(
        {
            "floor": _opt("float"),
            "n_ablations": _req("int"),
            "n_with_off_range": _opt("int_or_null"),
            "n_off_range_entries": _opt("int_or_null"),
            "fraction_with_off_range": _opt("float"),
            "mean_depth": _opt("float"),
            "min_value": _opt("float"),
        }
    ),
)
_FLOATS = ("list", "float", None)
_INTS = ("list", "int", None)
_MATRIX = ("list", _FLOATS, None)

_CORPUS_STATS = _Obj(
    {
        "n_docs": _req("int"),
        "n_tokens": _req("int"),
        "l0": _req("float"),
        "l0_counts": _opt(_INTS),
        "n_dead": _opt("int"),
        "density_log10_edges": _opt(_FLOATS),
        "density_log10_counts": _opt(_INTS),
        "activation_log10_edges": _opt(_FLOATS),
        "token_fraction": _opt("float"),
        "bands": _opt(("map", "float")),
        "features": _req(
            (
                "list",
                _Obj(
                    {
                        "feature": _req("int"),
                        "density": _req("float"),
                        "max_activation": _req("float"),
                        "fire_count": _opt("int"),
                        "mean_when_active": _opt("float"),
                        "above_count": _opt("int"),
                        "top_tokens": _req(_TOKEN_VALUES),
                        "top_token_share": _opt("float"),
                        "activation_log10_counts": _opt(_INTS),
                        "top_stories": _opt(
                            (
                                "list",
                                _Obj({"doc_index": _req("int"), "position": _req("int"), "activation": _req("float")}),
                                None,
                            )
                        ),
                        "band_examples": _opt(("map", ("list", _EXAMPLE, None))),
                        "top_examples": _opt(("list", _EXAMPLE, None)),
                    }
                ),
                None,
            )
        ),
    }
)

_LOSS_COMPARISON = _Obj(
    {
        "labels": _req(("list", "str", None)),
        "mean": _req(_FLOATS),
        "ci95": _opt(_FLOATS),
        "diff_vs_clean": _opt(_FLOATS),
        "diff_vs_clean_ci95": _opt(_FLOATS),
        "conditions": _opt(("list", "str", None)),
        "features": _opt(_INTS),
        "mode": _opt("str"),
        "n_prompts": _opt("int"),
        "features_minus_sae": _opt(_MEANCI),
        "off_range": _opt(_OFF_RANGE),
        "sae_off_range": _opt(_OFF_RANGE),
    }
)

_ABLATION_MODES = _Obj(
    {
        "features": _req(_INTS),
        "rows": _req(
            (
                "list",
                _Obj(
                    {
                        "feature": _req("int"),
                        "residual": _opt(_MEANCI),
                        "reconstruction": _opt(_MEANCI),
                        "clean_effect": _opt(_MEANCI),
                    }
                ),
                None,
            )
        ),
        "multi_features": _opt(_INTS),
        "multi": _opt(
            (
                "map",
                _Obj({"mean": _req("float"), "ci95": _opt("ci"), "n": _opt("int"), "off_range": _opt(_OFF_RANGE)}),
            )
        ),
        "off_range": _opt(("map", _OFF_RANGE)),
        "descriptions": _opt(("map", "str")),
    }
)

_STORY_ABLATION = _Obj(
    {
        "feature": _req("int"),
        "global": _req(_MEANCI),
        "per_position": _req(_MEANCI),
        "mode": _opt("str"),
        "threshold": _opt("float"),
        "n_stories": _opt("int"),
        "stories": _opt(
            (
                "list",
                _Obj(
                    {
                        "doc_index": _req("int"),
                        "clean_loss": _req("float"),
                        "ablated_loss": _req("float"),
                        "loss_increase": _req("float"),
                    }
                ),
                None,
            )
        ),
        "position_loss_increase": _opt(_FLOATS),
        "position_activation": _opt(_FLOATS),
        "per_token": _opt(
            (
                "list",
                _Obj(
                    {
                        "doc_index": _opt("int"),
                        "tokens": _req(("list", "str", None)),
                        "token_kinds": _opt(("list", "str", None)),
                        "loss_change": _req(_FLOATS),
                        "activation": _opt(_FLOATS),
                    }
                ),
                None,
            )
        ),
        "off_range": _opt(_OFF_RANGE),
    }
)

_GEOMETRY = _Obj(
    {
        "features": _req(_INTS),
        "cooccurrence": _opt(
            _Obj(
                {
                    "counts": _req(("list", _INTS, None)),
                    "by_min": _req(_MATRIX),
                    "by_max": _req(_MATRIX),
                    "threshold": _opt("float"),
                    "n_prompts": _opt("int"),
                }
            )
        ),
        "decoder_cosine": _opt(_MATRIX),
        "encoder_cosine": _opt(_MATRIX),
        "token_kurtosis": _opt(_FLOATS),
        "token_kurtosis_all": _opt(
            _Obj({"edges": _req(_FLOATS), "counts": _req(_INTS), "median": _opt("float"), "n_features": _opt("int")})
        ),
    }
)

_SPAN_ABLATION = _Obj(
    {
        "features": _req(_INTS),
        "variants": _req(("list", "str", None)),
        "mean": _req(_FLOATS),
        "ci95": _opt(_FLOATS),
        "diff_vs_clean": _opt(_FLOATS),
        "diff_vs_clean_ci95": _opt(_FLOATS),
        "rank": _opt("int"),
        "fraction_kept": _opt("float"),
    }
)

_LAYER_COMPARISON = _Obj(
    {
        "runs": _req(
            (
                "list",
                _Obj(
                    {
                        "label": _req("str"),
                        "loss_increase": _req(_MEANCI),
                        "hooks": _opt(("list", "str", None)),
                        "features": _opt(("list", _INTS, None)),
                        "values": _opt(_FLOATS),
                    }
                ),
                None,
            )
        ),
        "mode": _opt("str"),
        "n_prompts": _opt("int"),
        "interaction": _opt(_MEANCI),
        "paired": _opt(
            (
                "list",
                _Obj({"a": _req("int"), "b": _req("int"), "mean": _req("float"), "ci95": _opt("ci"),
                      "n": _opt("int")}),
                None,
            )
        ),
    }
)

_SAE = _Obj(
    {
        "hook_point": _req("str"),
        "d_in": _req("int"),
        "d_sae": _req("int"),
        "architecture": _opt("str"),
        "l0": _req("float"),
        "explained_variance_at_p": _opt("float"),
        "relative_error": _opt("float"),
        "clean_loss": _req("float"),
        "sae_loss": _req("float"),
        "zero_ablation_loss": _req("float"),
        "mean_ablation_loss": _req("float"),
        "loss_ci95": _opt(_Obj({k: _opt("float") for k in ("clean", "sae", "zero", "mean")})),
        "loss_recovered": _req("float"),
        "loss_recovered_ci95": _opt(_PAIR),
        "loss_recovered_undefined_reason": _opt("str"),
        "loss_recovered_mean_ablation": _req("float"),
        "loss_recovered_mean_ablation_ci95": _opt(_PAIR),
        "loss_recovered_mean_ablation_undefined_reason": _opt("str"),
        "whole_sequence": _opt(
            _Obj(
                {
                    "loss_recovered": _req("float"),
                    "loss_recovered_ci95": _opt(_PAIR),
                    "loss_recovered_undefined_reason": _opt("str"),
                    "explained_variance": _req("float"),
                    **{k: _opt("float") for k in ("ce_clean", "ce_sae", "ce_zero")},
                    "n_tokens": _opt("int"),
                    "n_prompts": _opt("int"),
                }
            )
        ),
        "failed_checks": _opt(("list", "str", None)),
        "n_active_features": _opt("int"),
        "top_features": _req(
            (
                "list",
                _Obj(
                    {
                        "feature": _req("int"),
                        "loss_increase": _req("float"),
                        "loss_increase_ci95": _opt("ci"),
                        "mean_activation": _req("float"),
                        "fraction_active": _req("float"),
                        "n_prompts": _opt("int"),
                    }
                ),
                None,
            )
        ),
        "feature_effects": _opt(
            (
                "list",
                _Obj(
                    {
                        "feature": _req("int"),
                        "n_active_prompts": _req("int"),
                        "mean_loss_increase": _req("float"),
                        "ci95": _opt("float"),
                        **{k: _opt("float") for k in ("fraction_active", "mean_activation", "logprob_diff",
                                                      "logit_diff", "rank_diff")},
                    }
                ),
                None,
            )
        ),
        "feature_effects_info": _opt("dict"),
        "multi_ablation": _opt(
            _Obj(
                {
                    "features": _opt(("list", "int", None)),
                    "n_prompts": _opt("int"),
                    "logprob_diff": _opt(_STAT),
                    "logit_diff": _opt(_STAT),
                    "rank_diff": _opt(_STAT),
                    "mode": _opt("str"),
                    "off_range": _opt(_OFF_RANGE),
                }
            )
        ),
        "multi_ablation_selection": _opt(
            _Obj({"rule": _opt("str"), "n_supported": _opt("int"), "n_ranked": _opt("int")})
        ),
        "task_activations": _opt(
            ("list", _Obj({"feature": _req("int"), "values": _req(("list", "float", None))}), None)
        ),
        "examples": _opt(
            ("list", _Obj({"feature": _req("int"), "examples": _req(("list", _EXAMPLE, None))}), None)
        ),
        "training": _opt("dict"),
        "error_dla": _opt(
            _Obj(
                {
                    "labels": _req(("list", "str", None)),
                    "mean": _req(("list", "float", None)),
                    "ci95": _opt(("list", "float", None)),
                }
            )
        ),
        "feature_details": _opt(("list", _FEATURE_DETAIL, None)),
        "upstream_ablation": _opt(
            _Obj(
                {
                    "hook": _req("str"),
                    "mode": _opt("str"),
                    "features": _req(("list", "int", None)),
                    "clean_mean": _req(("list", "float", None)),
                    "ablated_mean": _req(("list", "float", None)),
                    **{
                        k: _opt(("list", "float", None))
                        for k in (
                            "diff_ci95",
                            "clean_mean_active",
                            "ablated_mean_active",
                            "fraction_active_clean",
                            "fraction_active_ablated",
                        )
                    },
                }
            )
        ),
        "activation_scaled_dla": _opt(
            (
                "list",
                _Obj(
                    {
                        "feature": _req("int"),
                        "mean_activation": _req("float"),
                        "dla_per_unit": _req("float"),
                        "scaled": _req("float"),
                        "scaled_ln": _opt("float"),
                    }
                ),
                None,
            )
        ),
        "corpus_stats": _opt(_CORPUS_STATS),
        "loss_comparison": _opt(_LOSS_COMPARISON),
        "ablation_modes": _opt(_ABLATION_MODES),
        "max_activating_ablation": _opt(("list", _STORY_ABLATION, None)),
        "feature_geometry": _opt(_GEOMETRY),
        "span_ablation": _opt(_SPAN_ABLATION),
    }
)

RESULTS_SCHEMA = _Obj(
    {
        "schema_version": _req("int"),
        "saecircuits_version": _opt("str"),
        "model": _req("str"),
        "model_info": _opt(
            _Obj(
                {
                    "n_layers": _opt("int"),
                    "d_model": _opt("int"),
                    "d_mlp": _opt("int"),
                    "d_vocab": _opt("int"),
                    "n_heads": _opt("int"),
                    "architecture": _opt("str"),
                }
            )
        ),
        "task": _req(
            _Obj(
                {
                    "name": _req("str"),
                    "n_prompts": _req("int"),
                    "answer_token_ids": _req(("list", "int", None)),
                    "answer_tokens": _opt(("list", "str", None)),
                    "example_prompts": _opt(("list", "str", None)),
                    "example_answers": _opt(("list", "str", None)),
                    "example_answer_ids": _opt(("list", "int", None)),
                    "n_dropped_too_long": _opt("int"),
                }
            )
        ),
        "bos_policy": _opt(
            _Obj(
                {
                    "prepended": _req("bool"),
                    "token_id": _req("int?"),
                    "token": _opt("str?"),
                    "special_token_ids": _opt(("list", "int", None)),
                    "special_positions": _req("str"),
                    "statement": _opt("str"),
                }
            )
        ),
        "dla": _req(
            _Obj(
                {
                    "labels": _req(("list", "str", None)),
                    "mean": _req(("list", "float", None)),
                    "ci95": _opt(("list", "float", None)),
                    "answer_logit_mean": _opt("float"),
                    "completeness_max_abs_error": _req("float"),
                    "logit_soft_cap": _opt("float"),  # set: DLA of the pre-cap logit (Gemma 2)
                    "of": _opt("str"),
                }
            )
        ),
        "behaviour": _opt(
            _Obj(
                {
                    "n_prompts": _req("int"),
                    "top1_accuracy": _req("float"),
                    "top1_accuracy_ci95": _opt(_PAIR),
                    "mean_p_answer": _req("float"),
                    "mean_p_answer_ci95": _opt("float"),
                    "mean_loss": _req("float"),
                    "mean_loss_ci95": _opt("float"),
                    "uniform_loss": _opt("float"),
                    "performs": _req("bool"),
                    "rule": _opt("str"),
                }
            )
        ),
        "checks": _opt(("list", _CHECK, None)),
        "saes": _req(("list", _SAE, None)),
        "layer_comparison": _opt(_LAYER_COMPARISON),
        "corpus": _opt("dict"),
        "circuit": _opt(
            _Obj(
                {
                    "selection": _opt("dict"),
                    "agreement": _opt("dict"),
                    "faithfulness": _opt(("list", "dict", None)),
                    "positions": _opt("dict"),  # the circuit across positions (issue 16; its keys: circuit.json)
                    "nodes": _req(
                        (
                            "list",
                            _Obj(
                                {
                                    "id": _req("int"),
                                    "label": _req("str"),
                                    "effect": _req("float"),
                                    "atp": _opt("float"),
                                    "ig": _opt("float"),
                                    "in_circuit": _opt("bool"),
                                    "top_tokens": _opt(("list", "str", None)),
                                }
                            ),
                            None,
                        )
                    ),
                    "edges": _req(
                        (
                            "list",
                            _Obj(
                                {
                                    "source": _req("int"),
                                    "target": _req("int"),
                                    "exact": _req("float"),
                                    "atp": _opt("float"),
                                    "ig": _opt("float"),
                                }
                            ),
                            None,
                        )
                    ),
                }
            )
        ),
        "timings": _opt(("map", "float")),
        "config": _opt("dict"),
        "notes": _opt(("list", "str", None)),
    }
)


def _path_str(path: tuple[str | int, ...]) -> str:
    out = "results"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f"[{p!r}]"
    return out


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check(v: Any, kind: Any, path: tuple[str | int, ...]) -> None:
    where = _path_str(path)
    if isinstance(kind, tuple) and kind[0] == "nullable":
        if v is not None:
            _check(v, kind[1], path)
        return
    if kind == "int_or_null":
        if v is not None and not _is_int(v):
            raise ResultsSchemaError(f"{where} must be an int or null, got {_type_name(v)} ({v!r:.60}).")
        return
    if kind == "int":
        if not _is_int(v):
            raise ResultsSchemaError(f"{where} must be an int, got {_type_name(v)} ({v!r:.60}).")
    elif kind == "float":
        if not _is_float(v):
            raise ResultsSchemaError(f"{where} must be a number (or null), got {_type_name(v)} ({v!r:.60}).")
    elif kind == "str":
        if not isinstance(v, str):
            raise ResultsSchemaError(f"{where} must be a string, got {_type_name(v)} ({v!r:.60}).")
    elif kind in ("int?", "str?"):  # nullable
        if v is not None:
            _check(v, kind[:-1], path)
    elif kind == "bool":
        if not isinstance(v, bool):
            raise ResultsSchemaError(f"{where} must be true or false, got {_type_name(v)} ({v!r:.60}).")
    elif kind == "dict":
        if not isinstance(v, Mapping):
            raise ResultsSchemaError(f"{where} must be an object (dict), got {_type_name(v)}.")
    elif kind == "ci":
        if _is_float(v):
            return
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_float(x) for x in v):
            return
        raise ResultsSchemaError(
            f"{where} must be a CI: a number (half-width) or a [lo, hi] pair, got {_type_name(v)} ({v!r:.60})."
        )
    elif kind == ("tokval",):
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str) and _is_float(v[1])):
            raise ResultsSchemaError(f"{where} must be a [token string, number] pair, got {v!r:.60}.")
    elif isinstance(kind, tuple) and kind[0] == "list":
        _, item_kind, length = kind
        if not isinstance(v, (list, tuple)):
            raise ResultsSchemaError(f"{where} must be a list, got {_type_name(v)}.")
        if length is not None and len(v) != length:
            raise ResultsSchemaError(f"{where} must have exactly {length} items, got {len(v)}.")
        for i, item in enumerate(v):
            _check(item, item_kind, (*path, i))
    elif isinstance(kind, tuple) and kind[0] == "map":
        if not isinstance(v, Mapping):
            raise ResultsSchemaError(f"{where} must be an object (dict), got {_type_name(v)}.")
        for k, item in v.items():
            if not isinstance(k, str):
                raise ResultsSchemaError(f"{where} keys must be strings, got {k!r}.")
            _check(item, kind[1], (*path, k))
    elif isinstance(kind, _Obj):
        if not isinstance(v, Mapping):
            raise ResultsSchemaError(f"{where} must be an object (dict), got {_type_name(v)}.")
        for name, field in kind.fields.items():
            if name not in v:
                if field.required:
                    raise ResultsSchemaError(
                        f"{where} is missing the required key {name!r} (results.json schema version "
                        f"{SCHEMA_VERSION}; see saecircuits.report.schema)."
                    )
                continue
            _check(v[name], field.kind, (*path, name))
    else:  # pragma: no cover - a bug in the schema table itself
        raise AssertionError(f"unknown schema kind {kind!r}")


def _same_length(d: Mapping, a: str, b: str, path: tuple[str | int, ...]) -> None:
    if a in d and b in d and len(d[a]) != len(d[b]):
        raise ResultsSchemaError(
            f"{_path_str((*path, b))} has {len(d[b])} items but {_path_str((*path, a))} has {len(d[a])}; "
            "they must be aligned one-to-one."
        )


def _validate_evidence(sae: Mapping, i: int, feature_ok) -> None:
    """Cross-field checks of the optional evidence keys of ``results['saes'][i]`` (aligned lengths, feature range)."""
    base: tuple[str | int, ...] = ("saes", i)
    if "error_dla" in sae:
        _same_length(sae["error_dla"], "labels", "mean", (*base, "error_dla"))
        _same_length(sae["error_dla"], "labels", "ci95", (*base, "error_dla"))
    for j, fd in enumerate(sae.get("feature_details", [])):
        where = (*base, "feature_details", j)
        feature_ok(fd["feature"], (*where, "feature"))
        if "loss_vs_activation" in fd:
            _same_length(
                fd["loss_vs_activation"], "activation", "loss_increase", (*where, "loss_vs_activation")
            )
        if "dfa" in fd:
            _same_length(fd["dfa"], "labels", "mean", (*where, "dfa"))
            _same_length(fd["dfa"], "labels", "ci95", (*where, "dfa"))
    if "upstream_ablation" in sae:
        up = sae["upstream_ablation"]
        where = (*base, "upstream_ablation")
        for j, f in enumerate(up["features"]):
            feature_ok(f, (*where, "features", j))
        for key in (
            "clean_mean",
            "ablated_mean",
            "diff_ci95",
            "clean_mean_active",
            "ablated_mean_active",
            "fraction_active_clean",
            "fraction_active_ablated",
        ):
            _same_length(up, "features", key, where)
    for j, e in enumerate(sae.get("activation_scaled_dla", [])):
        feature_ok(e["feature"], (*base, "activation_scaled_dla", j, "feature"))


def _validate_loss_recovered(sae: Mapping, i: int) -> None:
    """An undefined loss recovered (null) has a reason and no interval; a defined one has no reason."""
    for key in ("loss_recovered", "loss_recovered_mean_ablation"):
        value, ci, reason = sae.get(key), sae.get(f"{key}_ci95"), sae.get(f"{key}_undefined_reason")
        undefined = value is None or (isinstance(value, float) and math.isnan(value))
        where = f"results['saes'][{i}]"
        if undefined and ci is not None and any(_is_float(b) and b is not None and math.isfinite(b) for b in ci):
            raise ResultsSchemaError(
                f"{where}['{key}'] is undefined (null) but {key}_ci95 = {ci}; an undefined ratio has no interval."
            )
        if not undefined and reason is not None:
            raise ResultsSchemaError(
                f"{where}['{key}'] = {value} but {key}_undefined_reason is set; give one or the other."
            )


def _square(m: Any, n: int, where: tuple[str | int, ...]) -> None:
    if len(m) != n or any(len(row) != n for row in m):
        raise ResultsSchemaError(f"{_path_str(where)} must be a {n} x {n} matrix (one row and column per feature).")


def _token_row_ok(d: Mapping, where: tuple[str | int, ...], values: str) -> None:
    """``tokens`` aligned with ``values`` and ``token_kinds`` (when present), each kind a known one."""
    _same_length(d, "tokens", values, where)
    _same_length(d, "tokens", "token_kinds", where)
    bad = [k for k in d.get("token_kinds", []) if k not in TOKEN_KINDS]
    if bad:
        raise ResultsSchemaError(
            f"{_path_str((*where, 'token_kinds'))} holds {bad[0]!r}; each kind must be one of {TOKEN_KINDS}."
        )


def _validate_study(sae: Mapping, i: int, feature_ok) -> None:
    """Cross-field checks of the optional study keys of ``results['saes'][i]``."""
    base: tuple[str | int, ...] = ("saes", i)
    cs = sae.get("corpus_stats")
    if cs is not None:
        where = (*base, "corpus_stats")
        for a, b in (("density_log10_edges", "density_log10_counts"),):
            if a in cs and b in cs and len(cs[b]) != len(cs[a]) - 1:
                raise ResultsSchemaError(f"{_path_str((*where, b))} needs one count per bin (len({a}) - 1).")
        n_bins = len(cs["activation_log10_edges"]) - 1 if "activation_log10_edges" in cs else None
        for j, fe in enumerate(cs["features"]):
            fw = (*where, "features", j)
            feature_ok(fe["feature"], (*fw, "feature"))
            dens = fe["density"]
            if dens is not None and not -1e-9 <= dens <= 1 + 1e-9:
                raise ResultsSchemaError(f"{_path_str((*fw, 'density'))} = {dens} is not in [0, 1].")
            if n_bins is not None and "activation_log10_counts" in fe and len(fe["activation_log10_counts"]) != n_bins:
                raise ResultsSchemaError(f"{_path_str((*fw, 'activation_log10_counts'))} needs {n_bins} counts.")
            for band, exs in (fe.get("band_examples") or {}).items():
                for m, ex in enumerate(exs):
                    _token_row_ok(ex, (*fw, "band_examples", band, m), "activations")
            for m, ex in enumerate(fe.get("top_examples") or []):
                _token_row_ok(ex, (*fw, "top_examples", m), "activations")
    lc = sae.get("loss_comparison")
    if lc is not None:
        for key in ("mean", "ci95", "diff_vs_clean", "diff_vs_clean_ci95", "conditions"):
            _same_length(lc, "labels", key, (*base, "loss_comparison"))
        for j, f in enumerate(lc.get("features", [])):
            feature_ok(f, (*base, "loss_comparison", "features", j))
    am = sae.get("ablation_modes")
    if am is not None:
        for j, f in enumerate(am["features"]):
            feature_ok(f, (*base, "ablation_modes", "features", j))
        for j, row in enumerate(am["rows"]):
            feature_ok(row["feature"], (*base, "ablation_modes", "rows", j, "feature"))
    for j, st in enumerate(sae.get("max_activating_ablation", [])):
        where = (*base, "max_activating_ablation", j)
        feature_ok(st["feature"], (*where, "feature"))
        _same_length(st, "position_loss_increase", "position_activation", where)
        for m, pt in enumerate(st.get("per_token", [])):
            _token_row_ok(pt, (*where, "per_token", m), "loss_change")
            _same_length(pt, "tokens", "activation", (*where, "per_token", m))
    geo = sae.get("feature_geometry")
    if geo is not None:
        where = (*base, "feature_geometry")
        n = len(geo["features"])
        for j, f in enumerate(geo["features"]):
            feature_ok(f, (*where, "features", j))
        for key in ("decoder_cosine", "encoder_cosine"):
            if key in geo:
                _square(geo[key], n, (*where, key))
        if "cooccurrence" in geo:
            for key in ("counts", "by_min", "by_max"):
                _square(geo["cooccurrence"][key], n, (*where, "cooccurrence", key))
        _same_length(geo, "features", "token_kurtosis", where)
        ka = geo.get("token_kurtosis_all")
        if ka is not None and len(ka["counts"]) != len(ka["edges"]) - 1:
            raise ResultsSchemaError(f"{_path_str((*where, 'token_kurtosis_all', 'counts'))} needs one count per bin.")
    sp = sae.get("span_ablation")
    if sp is not None:
        for key in ("mean", "ci95", "diff_vs_clean", "diff_vs_clean_ci95"):
            _same_length(sp, "variants", key, (*base, "span_ablation"))
        for j, f in enumerate(sp["features"]):
            feature_ok(f, (*base, "span_ablation", "features", j))


def _validate_layer_comparison(lc: Mapping) -> None:
    n = len(lc["runs"])
    for j, p in enumerate(lc.get("paired", [])):
        if not (0 <= p["a"] < n and 0 <= p["b"] < n):
            raise ResultsSchemaError(
                f"results['layer_comparison']['paired'][{j}] names run {p['a']} or {p['b']}; there are {n} runs."
            )


def validate_results(d: Any) -> None:
    """Check that ``d`` is a valid results dict (schema version 2, see the module docstring; a version-1 dict must
    go through :func:`upgrade_results` first).

    Checks required keys, types (bool is not a number; int is accepted where a float is expected; null is
    accepted for floats), and cross-field consistency: aligned list lengths (DLA labels/mean/ci95, answer tokens,
    example tokens/activations) and feature indices within ``[0, d_sae)``. Unknown extra keys are allowed.

    Raises:
        ResultsSchemaError: naming the first offending key by its full path, e.g.
            ``results['saes'][0]['top_features'][2] is missing the required key 'loss_increase'``.
    """
    if not isinstance(d, Mapping):
        raise ResultsSchemaError(f"results must be a dict (the parsed results.json), got {_type_name(d)}.")
    if "schema_version" in d and d["schema_version"] != SCHEMA_VERSION:
        hint = ("upgrade it with saecircuits.report.schema.upgrade_results (load_results does)"
                if d["schema_version"] in READABLE_VERSIONS else
                "re-run the pipeline with this saecircuits version to regenerate results.json")
        raise ResultsSchemaError(
            f"results['schema_version'] is {d['schema_version']!r}; this saecircuits reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: {hint}."
        )
    _check(d, RESULTS_SCHEMA, ())

    task = d["task"]
    if len(task["answer_token_ids"]) == 0:
        raise ResultsSchemaError(
            "results['task']['answer_token_ids'] is empty; it needs at least one token id."
        )
    _same_length(task, "answer_token_ids", "answer_tokens", ("task",))
    _same_length(task, "example_prompts", "example_answers", ("task",))
    _same_length(task, "example_prompts", "example_answer_ids", ("task",))
    bos = d.get("bos_policy")
    if bos is not None:
        if bos["special_positions"] not in ("excluded", "included"):
            raise ResultsSchemaError(
                f"results['bos_policy']['special_positions'] is {bos['special_positions']!r}; "
                "it must be 'excluded' or 'included'."
            )
        if bos["prepended"] != (bos["token_id"] is not None):
            raise ResultsSchemaError(
                "results['bos_policy']: 'prepended' must be true exactly when 'token_id' is set "
                f"(got prepended={bos['prepended']}, token_id={bos['token_id']})."
            )
    if task["n_prompts"] < 0:
        raise ResultsSchemaError(f"results['task']['n_prompts'] must be >= 0, got {task['n_prompts']}.")

    if "layer_comparison" in d:
        _validate_layer_comparison(d["layer_comparison"])

    dla = d["dla"]
    _same_length(dla, "labels", "mean", ("dla",))
    _same_length(dla, "labels", "ci95", ("dla",))

    scoped = {(c["scope"], c["id"]) for c in d.get("checks", [])}
    for i, sae in enumerate(d["saes"]):
        _validate_loss_recovered(sae, i)
        for j, cid in enumerate(sae.get("failed_checks", [])):
            if "checks" in d and (sae["hook_point"], cid) not in scoped:
                raise ResultsSchemaError(
                    f"results['saes'][{i}]['failed_checks'][{j}] = {cid!r} has no entry in results['checks'] "
                    f"with scope {sae['hook_point']!r}."
                )
        d_sae = sae["d_sae"]
        if d_sae <= 0 or sae["d_in"] <= 0:
            raise ResultsSchemaError(f"results['saes'][{i}]: d_in and d_sae must be positive.")

        def _feature_ok(f: int, where: tuple[str | int, ...], d_sae: int = d_sae) -> None:
            if not 0 <= f < d_sae:
                raise ResultsSchemaError(f"{_path_str(where)} = {f} is out of range for d_sae = {d_sae}.")

        for j, tf in enumerate(sae["top_features"]):
            _feature_ok(tf["feature"], ("saes", i, "top_features", j, "feature"))
            fa = tf["fraction_active"]
            if fa is not None and not -1e-9 <= fa <= 1 + 1e-9:
                raise ResultsSchemaError(
                    f"results['saes'][{i}]['top_features'][{j}]['fraction_active'] = {fa} is not in [0, 1]."
                )
        for j, f in enumerate(sae.get("multi_ablation", {}).get("features", [])):
            _feature_ok(f, ("saes", i, "multi_ablation", "features", j))
        for j, ta in enumerate(sae.get("task_activations") or []):
            _feature_ok(ta["feature"], ("saes", i, "task_activations", j, "feature"))
        _validate_evidence(sae, i, _feature_ok)
        _validate_study(sae, i, _feature_ok)
        for j, fe in enumerate(sae.get("examples", [])):
            _feature_ok(fe["feature"], ("saes", i, "examples", j, "feature"))
            for m, ex in enumerate(fe["examples"]):
                where = ("saes", i, "examples", j, "examples", m)
                _same_length(ex, "tokens", "activations", where)
                _same_length(ex, "tokens", "token_kinds", where)
                bad = [k for k in ex.get("token_kinds", []) if k not in TOKEN_KINDS]
                if bad:
                    raise ResultsSchemaError(
                        f"{_path_str((*where, 'token_kinds'))} holds {bad[0]!r}; each kind must be one of {TOKEN_KINDS}."
                    )


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results.json file (a version-1 file is upgraded: :func:`upgrade_results`).

    Raises:
        FileNotFoundError: the file does not exist.
        ResultsSchemaError: the file is not valid JSON or does not match the schema (message names the key).
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsSchemaError(f"{p} is not valid JSON: {e}") from e
    d = upgrade_results(d)
    validate_results(d)
    return d


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types: NaN/+-inf -> None, tuples -> lists, Paths -> str, dataclasses -> dicts,
    and anything with ``.tolist()`` (numpy arrays and scalars, torch tensors; duck-typed, nothing imported) -> lists
    or Python scalars.

    Raises:
        TypeError: an object that cannot be represented in JSON, or a dict key that is not a str/int.
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"JSON object keys must be str (or int), got {type(k).__name__} key {k!r}.")
            out[str(k)] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())
    raise TypeError(f"Cannot write an object of type {type(obj).__name__} to JSON ({obj!r:.80}).")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temp file in the same folder, fsync, then ``os.replace``.

    On any failure the temp file is removed and an existing file at ``path`` is left untouched.
    Creates the parent folder if needed. Returns the path.
    """
    return atomic_write_text(path, text)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temp file + ``os.replace``); NaN and +-inf are written as null.

    The object is fully serialised before any file is touched (see :func:`to_jsonable` for the conversions).

    Raises:
        TypeError: ``obj`` holds something JSON cannot represent; no file is written or changed.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def ci_bounds(mean: float | None, ci: Any) -> tuple[float | None, float | None]:
    """Lower and upper 95% bounds from a CI given as a half-width (``mean -+ ci``) or a ``[lo, hi]`` pair.

    Returns ``(None, None)`` when the mean or the CI is missing/null.
    """
    if ci is None or mean is None:
        return None, None
    if isinstance(ci, (list, tuple)):
        lo, hi = ci
        return lo, hi
    return mean - ci, mean + ci
