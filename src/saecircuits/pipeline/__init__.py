"""The end-to-end job: model + corpus + behaviour -> SAEs -> features -> causal tests -> results.json + report.html.

This package only wires the stages together (models -> data -> saes -> tasks -> analysis -> report); every number is
computed by the stage modules, which document their methods. ``saecircuits run`` and ``saecircuits demo`` call
:func:`run_pipeline`, which walks :data:`~saecircuits.pipeline.run.STAGES` (each stage declares what it reads and
writes; :mod:`saecircuits.pipeline.stages` runs, times and checkpoints them).

Modules: :mod:`.config` (RunConfig), :mod:`.stages` (the Stage declaration and the runner), :mod:`.checkpoint`
(``--resume``), one module per stage or group of stages (:mod:`.load`, :mod:`.task`, :mod:`.dla`, :mod:`.saes`,
:mod:`.corpus`, :mod:`.per_sae`, :mod:`.layer_comparison`, :mod:`.circuit`, :mod:`.outputs`), :mod:`.values`
(numbers as results.json writes them) and :mod:`.run` (the stage list).
"""

from saecircuits.pipeline.circuit import _circuit_summary
from saecircuits.pipeline.config import HOOK_TEMPLATE, PipelineError, RunConfig, check_device, sae_path
from saecircuits.pipeline.corpus import N_CARD_EXAMPLES, _corpus_stats_json
from saecircuits.pipeline.dla import auto_layers, mlp_ablation_effects
from saecircuits.pipeline.layer_comparison import study_run
from saecircuits.pipeline.load import _file_digest, _load_saes, load_sae_arg
from saecircuits.pipeline.outputs import STALE_OUTPUTS, OutLock, _remove_stale_outputs, check_out_writable
from saecircuits.pipeline.per_sae import analyse_sae, study_sae
from saecircuits.pipeline.run import STAGES, run_pipeline
from saecircuits.pipeline.saes import (
    _check_sae_fits,
    _final_metrics,
    _train_or_reuse_saes,
    sae_architecture,
    sae_train_config,
)
from saecircuits.pipeline.task import _bos_policy, _build_task, _task_entry
from saecircuits.pipeline.values import _round

__all__ = [
    "HOOK_TEMPLATE", "N_CARD_EXAMPLES", "STAGES", "STALE_OUTPUTS", "OutLock", "PipelineError",
    "RunConfig", "_bos_policy", "_build_task", "_check_sae_fits", "_circuit_summary", "_corpus_stats_json",
    "_file_digest", "_final_metrics", "_load_saes", "_remove_stale_outputs", "_round", "_task_entry",
    "_train_or_reuse_saes", "analyse_sae", "auto_layers", "check_device", "check_out_writable", "load_sae_arg",
    "mlp_ablation_effects", "run_pipeline", "sae_architecture", "sae_path", "sae_train_config", "study_run",
    "study_sae",
]
