"""The pipeline as declared stages, and the one runner that walks them.

Each :class:`Stage` names what it reads and what it writes: values of one shared run state, by name. The runner
(:func:`run_stages`) is the one place that times the stages, writes the log line of each, passes the progress
setting, and checkpoints what each stage wrote (:class:`~saecircuits.pipeline.checkpoint.Checkpoint`), so that a
run that failed in a late stage can be resumed without redoing the finished ones (``saecircuits run --resume``).

A stage's function is called as ``run(ctx, **reads)`` and returns ``{write: value}`` with exactly its declared
writes. A stage with ``each`` runs once per item of that read (``run(ctx, i, item, **reads)``), is timed and
checkpointed per item, and each of its writes is the list of the items' values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saecircuits.pipeline.checkpoint import Checkpoint
    from saecircuits.pipeline.config import RunConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: the stage's name (its key in ``results.json["timings"]`` and in the checkpoint).
        run: ``run(ctx, **reads) -> {write: value}`` (with ``each``: ``run(ctx, i, item, **reads)`` for item ``i``).
        reads: run-state values the stage needs (each written by an earlier stage).
        writes: run-state values the stage produces (each written by no other stage).
        codecs: how a write is checkpointed (:data:`saecircuits.pipeline.checkpoint.CODECS`; default ``"json"``);
            ``"memory"`` is never written, so a stage with such a write runs again on resume (the loaded model).
        each: a read holding a list: the stage runs once per item (timed, logged and checkpointed per item).
        label: the timing label of one item (with ``each``; default: its index).
        check: writes that must equal the checkpoint's when the stage runs again on resume (the model's digest),
            else the resume is refused.
    """

    name: str
    run: Callable[..., dict[str, Any]]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    codecs: dict[str, str] = field(default_factory=dict)
    each: str | None = None
    label: Callable[[Any], str] | None = None
    check: tuple[str, ...] = ()

    def codec(self, name: str) -> str:
        return self.codecs.get(name, "json")

    @property
    def in_memory(self) -> bool:
        """Some write is never checkpointed: the stage runs again on every resume."""
        return any(self.codec(w) == "memory" for w in self.writes)


@dataclass
class RunContext:
    """What every stage may use besides the run state: the settings, the status-line callback, progress bars, and
    an already-loaded model (the demo and tests)."""

    cfg: RunConfig
    say: Callable[[str], None]
    bars: bool = False
    model: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of each stage (or item) finished so far, this run's and the resumed run's (set by the runner)."""
    started: float = field(default_factory=time.perf_counter)
    resumed_s: float = 0.0
    """Seconds the finished stages of the resumed run took."""

    def elapsed(self) -> float:
        """Seconds of the whole run so far (a resumed run's finished stages included)."""
        return time.perf_counter() - self.started + self.resumed_s


def check_declarations(stages: Sequence[Stage]) -> None:
    """Every read is written by an earlier stage, no value is written twice, and ``each`` names a read.

    Raises:
        ValueError: the first inconsistency, naming the stage and the value.
    """
    written: set[str] = set()
    for stage in stages:
        for name in stage.reads:
            if name not in written:
                raise ValueError(f"stage {stage.name!r} reads {name!r}, which no earlier stage writes")
        if stage.each is not None and stage.each not in stage.reads:
            raise ValueError(f"stage {stage.name!r} runs for each item of {stage.each!r}, which it does not read")
        for name in stage.writes:
            if name in written:
                raise ValueError(f"stage {stage.name!r} writes {name!r}, which an earlier stage already wrote")
            written.add(name)
        unknown = set(stage.codecs) - set(stage.writes)
        if unknown:
            raise ValueError(f"stage {stage.name!r} gives codecs of values it does not write: {sorted(unknown)}")


class _State:
    """The run state: values by name, read from the checkpoint only when a stage that runs needs them."""

    def __init__(self, checkpoint: Checkpoint | None, ctx: RunContext) -> None:
        self.values: dict[str, Any] = {}
        self.checkpoint, self.ctx = checkpoint, ctx

    def get(self, name: str) -> Any:
        if name not in self.values:
            if self.checkpoint is None:
                raise KeyError(f"run state has no value {name!r}")
            self.values[name] = self.checkpoint.load_value(name, self.ctx)
        return self.values[name]


def _timed(timings: dict[str, float], label: str, t0: float) -> None:
    seconds = time.perf_counter() - t0
    timings[label] = round(seconds, 3)
    logger.info("%s: %.1f s", label, seconds)


def run_stages(stages: Sequence[Stage], ctx: RunContext, checkpoint: Checkpoint | None = None,
               ) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``stages`` in order; returns ``(run state values, timings in seconds by stage or item label)``.

    With a ``checkpoint``, each stage's writes (each item's, for ``each`` stages) are saved as it finishes, and a
    stage the checkpoint holds as finished is skipped (its timings are the checkpoint's, its values are read
    when a later stage needs them), unless it writes a value kept only in memory.

    Raises:
        PipelineError: a stage that runs again on resume produced a ``check`` value other than the checkpoint's.
        RuntimeError: a stage returned other values than it declares (a programming error).
        whatever a stage raises.
    """
    check_declarations(stages)
    state = _State(checkpoint, ctx)
    timings = ctx.timings
    for stage in stages:
        done = checkpoint.finished(stage.name) if checkpoint is not None else None
        if done is not None and not stage.in_memory:
            timings.update(done)
            ctx.resumed_s += sum(done.values())
            logger.info("%s: finished in the resumed run", stage.name)
            continue
        if stage.each is None:
            t0 = time.perf_counter()
            out = _call(stage, ctx, state, ())
            if checkpoint is not None:
                for name in stage.check:
                    checkpoint.check_value(stage.name, name, out[name])
                checkpoint.save_stage(stage, out, ctx)
            state.values.update(out)
            _timed(timings, stage.name, t0)
            if checkpoint is not None:
                checkpoint.finish(stage, {stage.name: timings[stage.name]})
            continue
        items = state.get(stage.each)
        collected: dict[str, list] = {name: [] for name in stage.writes}
        stage_timings: dict[str, float] = {}
        for i, item in enumerate(items):
            label = f"{stage.name} {stage.label(item) if stage.label else i}"
            saved = checkpoint.item_done(stage.name, i) if checkpoint is not None else None
            if saved is not None:
                for name in stage.writes:
                    collected[name].append(checkpoint.load_value(f"{name}.{i}", ctx))
                stage_timings[label] = saved
                ctx.resumed_s += saved
                continue
            t0 = time.perf_counter()
            out = _call(stage, ctx, state, (i, item))
            for name in stage.writes:
                collected[name].append(out[name])
            _timed(stage_timings, label, t0)
            if checkpoint is not None:
                checkpoint.save_item(stage, i, out, stage_timings[label], ctx)
        state.values.update(collected)
        timings.update(stage_timings)
        if checkpoint is not None:
            checkpoint.finish(stage, stage_timings, len(items))
    return state.values, timings


def _call(stage: Stage, ctx: RunContext, state: _State, args: tuple) -> dict[str, Any]:
    out = stage.run(ctx, *args, **{name: state.get(name) for name in stage.reads})
    if set(out) != set(stage.writes):
        raise RuntimeError(f"stage {stage.name!r} returned {sorted(out)} but declares writes {sorted(stage.writes)}")
    return out
