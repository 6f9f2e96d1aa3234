"""The building blocks of the results models: the base class, the JSON scalar types, shared small models.

Scalars are validated as the hand-written validator of schema version 2 did, so a results dict round-trips
exactly (``model_validate`` then :meth:`ResultsModel.to_json_dict` gives the same dict, ints kept as ints):

- ``Int``: an int, not a bool (``True`` is not a count); ``IntOrNull`` also null.
- ``Float``: an int or a float, or null (NaN and +-inf are written as null, :func:`saecircuits.report.schema.
  write_json_atomic`); a bool is refused. Ints stay ints (no ``3`` -> ``3.0``).
- ``Str``, ``Bool``: exactly a str / a bool (no coercion).
- ``CI``: a 95% interval as a half-width (a Float) or a ``[lo, hi]`` pair.
- ``TokenValue``: a ``[token string, number]`` pair.

Each error is a :class:`pydantic_core.PydanticCustomError` of type ``"results_type"`` whose message completes
"<path> ..."; :mod:`saecircuits.results.errors` turns a ``ValidationError`` into one ``ResultsSchemaError`` line.
A cross-field check fails with :func:`fail`, naming the offending keys relative to the model that checks them.
"""

from __future__ import annotations

from typing import Annotated, Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

#: the kinds of a token in a displayed row (= saecircuits.models.tokens.TOKEN_KINDS; no torch import here)
TOKEN_KINDS = ("text", "continuation", "special")

#: a path relative to the model running a check: keys (str) and list indices (int)
RelPath = tuple[str | int, ...]


def fail(text: str, *paths: RelPath) -> NoReturn:
    """Fail a cross-field check. ``text`` names the keys as ``{p0}``, ``{p1}``, ... for ``paths`` (relative to the
    checking model); the error names them from the top of the results (``results['saes'][0]['dla']``)."""
    raise PydanticCustomError("results_schema", "{text}", {"text": text, "paths": paths})


def _type_error(what: str) -> NoReturn:
    raise PydanticCustomError("results_type", what)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _int(v: Any) -> int:
    return v if _is_int(v) else _type_error("must be an int")


def _int_or_null(v: Any) -> int | None:
    return v if v is None or _is_int(v) else _type_error("must be an int or null")


def _number(v: Any) -> float | None:
    return v if _is_number(v) else _type_error("must be a number (or null)")


def _str(v: Any) -> str:
    return v if isinstance(v, str) else _type_error("must be a string")


def _str_or_null(v: Any) -> str | None:
    return v if v is None or isinstance(v, str) else _type_error("must be a string or null")


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else _type_error("must be true or false")


def _ci(v: Any) -> Any:
    if _is_number(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)):
        return v
    _type_error("must be a CI: a number (half-width) or a [lo, hi] pair")


def _token_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str) and _is_number(v[1]):
        return v
    raise PydanticCustomError("results_token_value", "must be a [token string, number] pair")


def _token_kind(v: Any) -> str:
    if isinstance(v, str) and v in TOKEN_KINDS:
        return v
    raise PydanticCustomError("results_token_kind", "each kind must be one of {kinds}", {"kinds": TOKEN_KINDS})


def _int_or_str(v: Any) -> int | str:
    return v if _is_int(v) or isinstance(v, str) else _type_error("must be an int or a string")


_NUMBER_SCHEMA = {"anyOf": [{"type": "number"}, {"type": "null"}]}

Int = Annotated[int, PlainValidator(_int), WithJsonSchema({"type": "integer"})]
IntOrNull = Annotated[int | None, PlainValidator(_int_or_null),
                      WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "null"}]})]
# int | float: the union's serializer writes an int as an int, so the round trip keeps 3 as 3 (not 3.0)
Float = Annotated[int | float | None, PlainValidator(_number), WithJsonSchema(_NUMBER_SCHEMA)]
Str = Annotated[str, PlainValidator(_str), WithJsonSchema({"type": "string"})]
StrOrNull = Annotated[str | None, PlainValidator(_str_or_null),
                      WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "null"}]})]
Bool = Annotated[bool, PlainValidator(_bool), WithJsonSchema({"type": "boolean"})]
CI = Annotated[Any, PlainValidator(_ci), WithJsonSchema({
    "anyOf": [{"type": "number"}, {"type": "null"},
              {"type": "array", "items": _NUMBER_SCHEMA, "minItems": 2, "maxItems": 2}],
    "description": "95% interval: a half-width (mean -+ ci95) or a [lo, hi] pair; null when undefined",
})]
TokenValue = Annotated[Any, PlainValidator(_token_value), WithJsonSchema({
    "type": "array", "prefixItems": [{"type": "string"}, _NUMBER_SCHEMA], "minItems": 2, "maxItems": 2,
    "description": "[token string, value]",
})]
TokenKind = Annotated[str, PlainValidator(_token_kind), WithJsonSchema({"enum": list(TOKEN_KINDS)})]
IntOrStr = Annotated[int | str, PlainValidator(_int_or_str),
                     WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]})]
#: a [lo, hi] pair of 95% interval bounds (each null when undefined)
Pair = Annotated[list[Float], Field(min_length=2, max_length=2)]
#: a free-form JSON object (kept as it is)
Json = dict[str, Any]


def req(description: str, **kw: Any) -> Any:
    """A required key."""
    return Field(..., description=description, **kw)


def opt(description: str, **kw: Any) -> Any:
    """An optional key: absent in the file -> ``None`` here, and absent again when dumped."""
    return Field(None, description=description, **kw)


class ResultsModel(BaseModel):
    """Base of every results model: unknown extra keys are kept (forward compatible, as schema version 2 allowed
    them everywhere) and written back; keys absent in the input stay absent in :meth:`to_json_dict`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    def to_json_dict(self) -> dict[str, Any]:
        """The plain JSON dict this model was read from (exactly: absent keys stay absent, ints stay ints, extra
        keys kept; NaN stays NaN, written as null by ``write_json_atomic``)."""
        return self.model_dump(mode="python", exclude_unset=True, by_alias=True)


def same_length(model: BaseModel, a: str, b: str) -> None:
    """Fail unless the lists ``a`` and ``b`` of ``model`` (when both present) have the same length."""
    va, vb = getattr(model, a), getattr(model, b)
    if va is not None and vb is not None and len(va) != len(vb):
        fail(f"{{p0}} has {len(vb)} items but {{p1}} has {len(va)}; they must be aligned one-to-one.", (b,), (a,))


class MeanCI(ResultsModel):
    """A mean with its 95% interval (``MEANCI``)."""

    mean: Float = req("the mean (units of the quantity: nats for losses)")
    ci95: CI = opt("95% interval: half-width or [lo, hi]")
    n: Int = opt("number of values averaged (prompts or stories)")


class OffRange(ResultsModel):
    """How many ablated activations fell below the hook's minimum (``OFFRANGE``): an ablation that pushes an
    activation where the model never puts it. Null counts: the hook has no bounded range."""

    floor: Float = opt("the hook's minimum activation (e.g. GELU's -0.17)")
    n_ablations: Int = req("number of ablations counted")
    n_with_off_range: IntOrNull = opt("ablations with at least one entry below the floor; null: no bounded range")
    n_off_range_entries: IntOrNull = opt("entries below the floor over all ablations; null: no bounded range")
    fraction_with_off_range: Float = opt("n_with_off_range / n_ablations, in [0, 1]")
    mean_depth: Float = opt("mean distance below the floor of the entries below it (activation units)")
    min_value: Float = opt("the lowest ablated activation (activation units)")


class LabelledValues(ResultsModel):
    """Values per labelled component (``labels``, ``mean``, ``ci95`` aligned one-to-one)."""

    labels: list[Str] = req("component labels, shape [C]")
    mean: list[Float] = req("mean over prompts per component, shape [C] (logits)")
    ci95: list[Float] = opt("95% CI half-widths, shape [C]")

    def check_aligned(self) -> None:
        same_length(self, "labels", "mean")
        same_length(self, "labels", "ci95")


def feature_checker(d_sae: int, base: RelPath = ()):
    """A function ``ok(f, where)`` failing when feature index ``f`` is not in ``[0, d_sae)``."""

    def ok(f: int | None, where: RelPath) -> None:
        if f is not None and not 0 <= f < d_sae:
            fail(f"{{p0}} = {f} is out of range for d_sae = {d_sae}.", (*base, *where))

    return ok
