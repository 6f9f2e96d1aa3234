"""The whole results.json (schema version 2) as one typed model, :class:`Results`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, WithJsonSchema, model_validator

from saecircuits.results._base import Float, Int, Json, ResultsModel, Str, fail, opt, req
from saecircuits.results.circuit import Circuit
from saecircuits.results.dla import DLA
from saecircuits.results.errors import (
    SCHEMA_VERSION,
    ResultsSchemaError,
    schema_error,
    schema_messages,
    upgrade_results,
    version_message,
)
from saecircuits.results.layer_comparison import LayerComparison
from saecircuits.results.run import Behaviour, BosPolicy, Check, Interventions, ModelInfo, Task
from saecircuits.results.sae import SaeEntry


class Results(ResultsModel):
    """results.json: everything the pipeline saves and the report reads (the report re-renders from it alone).

    Units: losses are next-token cross-entropy in nats at the task's prediction position P; logit differences in
    logits; rank differences in ranks; DLA in logits; activations in SAE feature units; timings in seconds. CI
    half-widths are 95% (t or bootstrap, as computed by the analysis); ``[lo, hi]`` pairs are 95% interval bounds.
    Numbers may be null where undefined (NaN and +-inf are written as null). Unknown extra keys are allowed
    everywhere (forward compatible) and kept.

    Read one with :meth:`load` (a version-1 file is upgraded), check a dict with ``Results.model_validate(d)``,
    write one with :meth:`save`; :meth:`to_json_dict` gives back exactly the dict it was read from::

        r = Results.load("runs/demo/results.json")
        r.saes[0].feature_effects[0].mean_loss_increase   # nats
    """

    schema_version: Annotated[Int, WithJsonSchema({"const": SCHEMA_VERSION, "type": "integer"})] = req(
        f"the schema version, {SCHEMA_VERSION} (a version-1 file is upgraded by Results.load)")
    saecircuits_version: Str = opt("the saecircuits version that wrote the file")
    model: Str = req("model name, e.g. 'roneneldan/TinyStories-1Layer-21M'")
    model_info: ModelInfo = opt("the model's dimensions")
    provenance: Json = opt("free-form: where the model's weights came from (source, hashes, folders)")
    task: Task = req("the behaviour's prompts and answer tokens")
    behaviour: Behaviour = opt("does the clean model perform the behaviour at P")
    checks: list[Check] = opt("failed checks; [] when all pass")
    bos_policy: BosPolicy = opt("BOS token policy")
    dla: DLA = req("direct logit attribution to the answer (logits)")
    saes: list[SaeEntry] = req("one entry per SAE")
    layer_comparison: LayerComparison = opt("features of the SAEs ablated alone and together (nats)")
    corpus: Json = opt("free-form: the corpus pass (n_docs, n_tokens, ...)")
    circuit: Circuit = opt("the feature circuit (summary; the whole graph is in circuit.json)")
    interventions: Interventions = opt("how ablations were computed")
    timings: dict[str, Float] = opt("stage -> seconds")
    config: Json = Field(None, description="free-form: the run's settings (RunConfig.to_dict())")
    notes: list[Str] = opt("notes for people, e.g. dropped prompts")

    @model_validator(mode="before")
    @classmethod
    def _dict_of_this_version(cls, d: Any) -> Any:
        if isinstance(d, Mapping) and "schema_version" in d and (
                d["schema_version"] != SCHEMA_VERSION or isinstance(d["schema_version"], bool)):
            fail(version_message(d["schema_version"]), ("schema_version",))
        return d

    @model_validator(mode="after")
    def _failed_checks_have_entries(self) -> Results:
        if self.checks is None:
            return self
        scoped = {(c.scope, c.id) for c in self.checks}
        for i, sae in enumerate(self.saes):
            for j, cid in enumerate(sae.failed_checks or []):
                if (sae.hook_point, cid) not in scoped:
                    fail(f"{{p0}} = {cid!r} has no entry in results['checks'] with scope {sae.hook_point!r}.",
                         ("saes", i, "failed_checks", j))
        return self

    # -- reading and writing ------------------------------------------------------------------------------------

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Results:
        """Validate a results dict of version 2 (pydantic's ``model_validate``; ``obj`` is not changed).

        Raises:
            ResultsSchemaError: naming the first offending key by its full path, e.g.
                ``results['saes'][0]['top_features'][2] is missing the required key 'loss_increase'``; a
                ``schema_version`` other than 2 is refused, naming it (:meth:`from_dict` upgrades version 1).
        """
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise schema_error(e) from None

    @classmethod
    def from_dict(cls, d: Any) -> Results:
        """Validate a parsed results dict of version 2, or 1 (upgraded first: :func:`upgrade_results`; ``d`` is
        not changed).

        Raises:
            ResultsSchemaError: as :meth:`model_validate`.
        """
        return cls.model_validate(upgrade_results(d))

    @classmethod
    def problems(cls, d: Any) -> list[str]:
        """Every way the parsed results dict ``d`` (version 2, or 1 upgraded) fails the schema, one sentence each
        naming its key (the messages of :meth:`model_validate`, all of them rather than the first); [] when valid."""
        try:
            super().model_validate(upgrade_results(d))
        except ValidationError as e:
            return schema_messages(e)
        return []

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        """Read and validate a results.json file (a version-1 file is upgraded).

        Raises:
            FileNotFoundError: the file does not exist.
            ResultsSchemaError: the file is not valid JSON or does not match the schema (the message names the key).
        """
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ResultsSchemaError(f"{p} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the results as JSON to ``path`` atomically (temp file + rename; NaN and +-inf as null)."""
        from saecircuits.report.schema import write_json_atomic  # the one JSON writer (imports this package)

        return write_json_atomic(path, self.to_json_dict())
