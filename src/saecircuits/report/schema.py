"""results.json, version 2: the contract is the typed models in :mod:`saecircuits.results` (reference:
``docs/results.md``, JSON Schema: ``saecircuits/assets/results.schema.json``, both generated from the models by
``python -m saecircuits.results --write-schema``).

This module keeps the dict-level API the pipeline, the renderer and other code use: :func:`validate_results`,
:func:`load_results` and :func:`upgrade_results` (thin wrappers over the models), and the JSON writers
(:func:`write_json_atomic`: NaN and +-inf as null). It imports neither torch nor the model.

``CI`` values (a float half-width or a ``[lo, hi]`` pair) become bounds with :func:`ci_bounds`.
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
from saecircuits.results import Results
from saecircuits.results._base import TOKEN_KINDS
from saecircuits.results.errors import (
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    ResultsSchemaError,
    rename_training_metrics,
    upgrade_results,
)

__all__ = [
    "SCHEMA_VERSION",
    "READABLE_VERSIONS",
    "TOKEN_KINDS",
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


def validate_results(d: Any) -> None:
    """Check that ``d`` is a valid results dict (schema version 2: ``saecircuits.results.Results``; a version-1
    dict must go through :func:`upgrade_results` first). ``d`` is not changed.

    Checks required keys, types (bool is not a number; int is accepted where a float is expected; null is
    accepted for floats), and cross-field consistency: aligned list lengths (DLA labels/mean/ci95, answer tokens,
    example tokens/activations) and feature indices within ``[0, d_sae)``. Unknown extra keys are allowed.

    Raises:
        ResultsSchemaError: naming the first offending key by its full path, e.g.
            ``results['saes'][0]['top_features'][2] is missing the required key 'loss_increase'``.
    """
    Results.model_validate(d)


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results.json file (a version-1 file is upgraded: :func:`upgrade_results`); returns the
    dict (``Results.load(path).to_json_dict()``: exactly the file's content, upgraded).

    Raises:
        FileNotFoundError: the file does not exist.
        ResultsSchemaError: the file is not valid JSON or does not match the schema (message names the key).
    """
    return Results.load(path).to_json_dict()


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
