"""The end-to-end job as a list of declared stages: model + corpus + behaviour -> SAEs -> features -> causal tests
-> results.json + report.html.

:data:`STAGES` is the pipeline; :func:`run_pipeline` checks the settings and the output folder, takes its lock and
walks the list with the one runner (:func:`saecircuits.pipeline.stages.run_stages`), which times, logs and
checkpoints every stage. Every number is computed by the analysis modules, which document their methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from saecircuits.pipeline.checkpoint import Checkpoint
from saecircuits.pipeline.circuit import CIRCUIT
from saecircuits.pipeline.config import PipelineError, RunConfig, check_device
from saecircuits.pipeline.corpus import CORPUS_STATS
from saecircuits.pipeline.dla import DLA, LAYERS
from saecircuits.pipeline.layer_comparison import LAYER_COMPARISON
from saecircuits.pipeline.load import CORPUS, MODEL, SAE_FILES
from saecircuits.pipeline.outputs import REPORT, OutLock, check_out_writable
from saecircuits.pipeline.per_sae import ANALYSE
from saecircuits.pipeline.saes import SAES
from saecircuits.pipeline.stages import RunContext, run_stages
from saecircuits.pipeline.task import TASK

logger = logging.getLogger(__name__)

STAGES = (SAE_FILES, MODEL, CORPUS, TASK, DLA, LAYERS, SAES, CORPUS_STATS, ANALYSE, LAYER_COMPARISON, CIRCUIT,
          REPORT)
"""The pipeline, in order. The SAE files are read first: a broken one fails in a second, not after the model
loads."""


def _bad_input(err: BaseException) -> bool:
    """What ``saecircuits run`` reports as a bad setting or input file (the project's own ``ValueError``s, an input
    file that is missing, unreadable or not JSON), after which a checkpoint is of no use."""
    import json

    if isinstance(err, ValueError) and type(err).__module__.startswith("saecircuits."):
        return True
    return isinstance(err, (json.JSONDecodeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                            PermissionError))


def run_pipeline(
    cfg: RunConfig,
    *,
    model=None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
) -> dict:
    """Run every stage and write ``cfg.out/results.json`` and ``cfg.out/report.html``.

    Before any work: the settings and input files are checked, ``--out`` must be writable, and the run takes the
    folder's lock (:class:`OutLock`: a second run into the same folder is refused). Outputs of an earlier run that
    this one does not write (``circuit.json``, ``figures/``, ``tables/``) are removed when the results are written.

    After each stage the runner checkpoints what it wrote in ``cfg.out``'s work area
    (:class:`~saecircuits.pipeline.checkpoint.Checkpoint`); the work area is removed when the run completes, and
    when a fresh run fails on a bad setting or input file (then a run that made ``cfg.out`` leaves no folder
    behind); a resumed run keeps it.

    Under torchrun (``WORLD_SIZE`` > 1; or with a process group the caller initialised) the run is sharded
    (:mod:`saecircuits.distributed`): every rank runs every stage on the same settings, the corpus pass and the
    exact effects, gradient estimates and faithfulness curve split the task's prompt batches over the ranks and
    gather them, so every rank holds one process's values; rank 0 alone takes the lock, checkpoints and writes.
    The other ranks return the same results dict and write nothing.

    Args:
        cfg: the run settings.
        model: an already-loaded TransformerBridge (skips loading ``cfg.model``; used by the demo and tests).
        progress: show progress bars.
        log: called with one line per stage (the CLI prints them).
        resume: go on from the checkpoint a failed run with the same settings left in ``cfg.out``: its finished
            stages are not run again (the model and the corpora are loaded again). Without a checkpoint the run starts from the
            first stage.

    Returns:
        The results dict written to ``results.json`` (schema: saecircuits.report.schema).

    Raises:
        PipelineError, TaskError, ModelLoadError, SAEError: bad input, with the fix in the message; ``resume`` with
            a checkpoint written under other settings (naming them); ``resume`` in a sharded run.
        ShardError: another rank of a sharded run died, stopped or timed out (nothing was written).
    """
    from saecircuits import distributed

    check_device(cfg.device)
    cfg.check_inputs()
    owns_group = distributed.init_from_env(cfg.device)
    try:
        return _run(cfg, model=model, progress=progress, log=log, resume=resume)
    finally:
        if owns_group:
            distributed.shutdown()


def _run(cfg: RunConfig, *, model, progress: bool, log: Callable[[str], None] | None, resume: bool) -> dict:
    """:func:`run_pipeline` after the settings are checked and the process group (if any) is up."""
    import contextlib

    from saecircuits import distributed

    rank, size = distributed.world()
    writer = rank == 0
    if size > 1 and resume:
        raise PipelineError("--resume is not supported in a sharded run (torchrun): resume the failed run in one "
                            "process (saecircuits run --resume ... without torchrun), or run again without --resume")
    with contextlib.ExitStack() as stack:
        stack.enter_context(distributed.sigterm_raises())
        problem = None
        if writer:  # rank 0 alone writes --out (and takes its lock); the others learn whether it can
            try:
                check_out_writable(cfg.out)
                stack.enter_context(OutLock(cfg.out))
            except PipelineError as err:
                if size == 1:
                    raise
                problem = str(err)
        problem = distributed.broadcast_json(problem, "the output folder check")
        if problem is not None:
            raise PipelineError(problem)
        say = log or (lambda s: logger.info(s))
        if not writer:  # one status line per stage, from rank 0
            say = lambda s: logger.debug("rank %d: %s", rank, s)  # noqa: E731
        out = Path(cfg.out).expanduser()
        existed = out.exists()
        ctx = RunContext(cfg=cfg, say=say, bars=progress and writer, model=model)
        # rank 0 checkpoints (a failed sharded run can be resumed in one process); the others keep none
        checkpoint = Checkpoint(cfg.out, cfg, resume=resume) if writer else None
        if size > 1:
            say(f"sharded run: {size} ranks ({_backend()}); the task's prompts of the exact effects and the "
                "corpus documents are split over them, rank 0 writes")
        if resume and checkpoint is not None:
            done = checkpoint.finished_stages
            say(f"resuming: stages {', '.join(done)} finished in {Path(cfg.out)}" if done else
                f"--resume: no checkpoint in {Path(cfg.out)}; starting from the first stage")
        try:
            values, _ = run_stages(STAGES, ctx, checkpoint)
        except BaseException as err:
            if checkpoint is None:
                raise
            if _bad_input(err) and not checkpoint.resumed:  # would fail again: keep nothing (no folder it made)
                checkpoint.remove()
                if not existed and out.is_dir() and not any(out.iterdir()):
                    out.rmdir()
            elif checkpoint.dir.is_dir():
                how = "--resume" if size == 1 else "--resume in one process (without torchrun)"
                say(f"the finished stages are kept in {checkpoint.dir}; once the cause is fixed, run again with "
                    f"{how} to go on from there")
            raise
        if checkpoint is not None:
            checkpoint.remove()
            say(f"wrote {Path(cfg.out) / 'results.json'} and {Path(cfg.out) / 'report.html'}")
        return values["results"]


def _backend() -> str:
    """The process group's backend (``gloo``, ``nccl``)."""
    import torch

    return str(torch.distributed.get_backend())
