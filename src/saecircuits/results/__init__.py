"""results.json as typed pydantic models: what the pipeline saves and the report reads (schema version 2).

The reference of every key, with units and shapes, is ``docs/results.md``; the JSON Schema is the package file
``saecircuits/assets/results.schema.json``. Both are generated from these models' field descriptions::

    python -m saecircuits.results --write-schema   # regenerate both (--check: fail when either is stale)

Typed access (no torch imported)::

    from saecircuits.results import Results

    r = Results.load("runs/demo/results.json")          # validated; a version-1 file is upgraded
    r.saes[0].feature_effects[0].mean_loss_increase     # nats
    r.saes[0].loss_recovered                            # None when undefined (then r.saes[0].loss_recovered_undefined_reason)
    r.to_json_dict()                                    # exactly the dict read
    render_report(r, "report.html")                     # saecircuits.report.render reads the typed results
    r.save("copy/results.json")                         # atomic write, NaN -> null

One module per section: :mod:`~saecircuits.results.run` (model, task, BOS, behaviour, checks),
:mod:`~saecircuits.results.dla`, :mod:`~saecircuits.results.sae` (one SAE's entry) with
:mod:`~saecircuits.results.evidence`, :mod:`~saecircuits.results.corpus` and :mod:`~saecircuits.results.study`,
:mod:`~saecircuits.results.layer_comparison`, :mod:`~saecircuits.results.circuit` and
:mod:`~saecircuits.results.positions` (issue 16). Validation errors are :class:`ResultsSchemaError` naming the key
by its full path.
"""

from saecircuits.results._base import TOKEN_KINDS, MeanCI, OffRange, ResultsModel
from saecircuits.results.circuit import Circuit
from saecircuits.results.dla import DLA
from saecircuits.results.errors import (
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    ResultsSchemaError,
    rename_training_metrics,
    upgrade_results,
)
from saecircuits.results.layer_comparison import LayerComparison
from saecircuits.results.positions import Positions
from saecircuits.results.run import Behaviour, BosPolicy, Check, ModelInfo, Task
from saecircuits.results.sae import SaeEntry
from saecircuits.results.top import Results

__all__ = [
    "Results",
    "ResultsModel",
    "ResultsSchemaError",
    "SCHEMA_VERSION",
    "READABLE_VERSIONS",
    "TOKEN_KINDS",
    "upgrade_results",
    "rename_training_metrics",
    "ModelInfo",
    "Task",
    "BosPolicy",
    "Behaviour",
    "Check",
    "DLA",
    "SaeEntry",
    "LayerComparison",
    "Circuit",
    "Positions",
    "MeanCI",
    "OffRange",
]
