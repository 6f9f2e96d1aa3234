"""The one error of the results models, its one-line messages, and the schema versions (with the upgrade of 1).

A pydantic ``ValidationError`` becomes a :class:`ResultsSchemaError` naming the first offending key by its full path,
e.g. ``results['saes'][0]['top_features'][2] is missing the required key 'loss_increase'`` (the messages of the
hand-written validator this replaces, which the CLI and the tests rely on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

SCHEMA_VERSION = 2
#: versions :func:`upgrade_results` brings to :data:`SCHEMA_VERSION`
READABLE_VERSIONS = (1, 2)


class ResultsSchemaError(ValueError):
    """results.json (or the dict the pipeline built) does not match the schema (version 2, or 1 upgraded)."""


def path_str(path: tuple[str | int, ...]) -> str:
    """``("saes", 0, "l0")`` -> ``results['saes'][0]['l0']``."""
    out = "results"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f"[{p!r}]"
    return out


def type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def version_message(version: Any, where: str = "{p0}") -> str:
    """The error for a ``schema_version`` other than :data:`SCHEMA_VERSION`, naming it and what to do (``where``
    names the key: ``{p0}`` is filled in by :func:`schema_error`)."""
    hint = ("upgrade it with saecircuits.report.schema.upgrade_results (load_results and Results.load do)"
            if version in READABLE_VERSIONS else
            "re-run the pipeline with this saecircuits version to regenerate results.json")
    return (f"{where} is {version!r}; this saecircuits reads versions {', '.join(map(str, READABLE_VERSIONS))}: "
            f"{hint}.")


def _message(err: Mapping[str, Any]) -> str:
    """One pydantic error (``ValidationError.errors()`` item) as a sentence naming its key."""
    loc = tuple(err["loc"])
    kind, inp = err["type"], err.get("input")
    if kind == "results_schema":  # a cross-field check: its text names the keys relative to the model
        text = err["ctx"]["text"]
        for i, rel in enumerate(err["ctx"]["paths"]):
            text = text.replace(f"{{p{i}}}", path_str(loc + tuple(rel)))
        return text
    if loc and loc[-1] == "[key]":
        return f"{path_str(loc[:-2])} keys must be strings, got {loc[-2]!r}."
    where = path_str(loc)
    if kind == "missing":
        return (f"{path_str(loc[:-1])} is missing the required key {loc[-1]!r} (results.json schema version "
                f"{SCHEMA_VERSION}; see docs/results.md or saecircuits.results).")
    if kind == "results_type":
        return f"{where} {err['msg']}, got {type_name(inp)} ({inp!r:.60})."
    if kind == "results_token_value":
        return f"{where} {err['msg']}, got {inp!r:.60}."
    if kind == "results_token_kind":
        return f"{path_str(loc[:-1])} holds {inp!r}; {err['msg']}."
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        if not loc:
            return f"results must be a dict (the parsed results.json), got {type_name(inp)}."
        return f"{where} must be an object (dict), got {type_name(inp)}."
    if kind in ("list_type", "iterable_type"):
        return f"{where} must be a list, got {type_name(inp)}."
    if kind in ("too_short", "too_long"):
        ctx = err.get("ctx") or {}
        n = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"{where} must have exactly {n} items, got {ctx.get('actual_length', len(inp))}."
    if kind == "literal_error":
        return f"{where} is {inp!r}; it must be {err['ctx']['expected']}."
    return f"{where}: {err['msg']} (got {inp!r:.60})."


def schema_messages(exc: ValidationError) -> list[str]:
    """Every error of ``exc`` as its one-line sentence (``python -m saecircuits.results --check FILE``)."""
    return [_message(err) for err in exc.errors()]


def schema_error(exc: ValidationError) -> ResultsSchemaError:
    """``exc`` as one :class:`ResultsSchemaError`: its first error, and how many more there are."""
    errors = exc.errors()
    msg = _message(errors[0])
    if len(errors) > 1:
        msg += f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} after this one.)"
    return ResultsSchemaError(msg)


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
