"""The runner's checkpoint: what each finished stage wrote, in the ``--out`` folder's work area, so that
``saecircuits run --resume`` goes on from the first unfinished stage.

Safe formats only (nothing is ever unpickled): JSON; SAEs as their config (JSON) and weights (safetensors);
corpus statistics and feature activations at P as ``torch.save`` of tensors and numbers, read back with
``weights_only=True``. Every file is
written atomically, and the manifest (``manifest.json``: settings, finished stages, saved values) after the
values it names, so a run killed mid-write leaves a checkpoint that names only complete files.

The checkpoint is keyed by the run's settings (:func:`config_key`: every :class:`RunConfig` field that can change
a result, and digests of the input files); a resume under other settings is refused, naming them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import saecircuits
from saecircuits.atomic import atomic_write, atomic_write_text
from saecircuits.pipeline.config import PipelineError, RunConfig, source_digest

if TYPE_CHECKING:
    from saecircuits.pipeline.stages import RunContext, Stage

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = ".saecircuits-checkpoint"
"""The work area in ``--out`` where the runner keeps its checkpoint (removed when the run completes)."""

CHECKPOINT_VERSION = 1

NOT_KEYED = ("out", "workspace")
"""Settings that do not change any result: a resume may change them (the checkpoint lives in ``out``)."""

FLAGS = {"exclude_bos": "--include-bos", "closings": "--all-closings", "sae_paths": "--sae", "sae_hooks": "--hook",
         "model": "--model", "data": "--data", "train_data": "--train-data", "task": "--task",
         "saecircuits_code": "the saecircuits code (a digest of its source)"}
"""The CLI flag of a setting whose flag is not its field name with dashes."""


def config_key(cfg: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint is valid for: ``cfg`` (less :data:`NOT_KEYED`), the package version and a digest
    of its source (values written by other code are not mixed with this code's), and the sha256 of the corpora and
    the task file (a changed input file is a different run)."""
    from saecircuits.pipeline.load import _file_digest

    key = {k: v for k, v in cfg.to_dict().items() if k not in NOT_KEYED}
    key = json.loads(json.dumps(key))  # tuples as lists, as read back from the manifest
    key["saecircuits_version"] = saecircuits.__version__
    key["saecircuits_code"] = source_digest(("**/*.py",))
    for name, path in (("data", cfg.data), ("train_data", cfg.train_data),
                       ("task", cfg.task if cfg.task != "closing-quote" else None)):
        if path is not None and Path(path).expanduser().exists():
            key[f"{name} (file contents)"] = _file_digest(Path(path).expanduser())
    return key


def _flag(name: str) -> str:
    base = name.split(" ")[0]
    return FLAGS.get(base, "--" + base.replace("_", "-")) + (" " + name.split(" ", 1)[1] if " " in name else "")


def _file(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` added (not replacing: an item's value is named ``entries.0``)."""
    return path.with_name(path.name + suffix)


def _to_json(value: Any) -> str:
    """``value`` as JSON, NaN and infinities kept (results.json turns them into null when it is written)."""
    import os

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
            return o.tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        raise TypeError(f"cannot checkpoint a {type(o).__name__} as JSON")

    return json.dumps(value, default=default, allow_nan=True)


def _save_json(path: Path, value: Any, ctx: RunContext) -> None:
    atomic_write_text(_file(path, ".json"), _to_json(value))


def _load_json(path: Path, ctx: RunContext) -> Any:
    return json.loads(_file(path, ".json").read_text(encoding="utf-8"))


def _save_task(path: Path, task, ctx: RunContext) -> None:
    _save_json(path, dataclasses.asdict(task), ctx)


def _load_task(path: Path, ctx: RunContext):
    from saecircuits.tasks.base import Task

    return Task(**_load_json(path, ctx))


def _save_saes(path: Path, saes: list | None, ctx: RunContext) -> None:
    """Each SAE as its :class:`~saecircuits.saes.base.SAEConfig` (JSON) and state dict (safetensors)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    for i, sae in enumerate(saes or []):
        state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
        atomic_write(path / f"{i}.safetensors", lambda tmp, state=state: save_file(state, tmp))
        atomic_write_text(path / f"{i}.json", _to_json(sae.cfg.to_dict()))
    atomic_write_text(path / "saes.json", _to_json(None if saes is None else len(saes)))


def _load_saes(path: Path, ctx: RunContext) -> list | None:
    from safetensors.torch import load_file

    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.registry import build_sae

    n = json.loads((path / "saes.json").read_text())
    if n is None:
        return None
    saes = []
    for i in range(n):
        sae = build_sae(SAEConfig.from_dict(json.loads((path / f"{i}.json").read_text())), initialize=False)
        sae.load_state_dict(load_file(path / f"{i}.safetensors"))
        saes.append(sae.to(ctx.cfg.device))
    return saes


def _save_corpus_stats(path: Path, stats, ctx: RunContext) -> None:
    """A :class:`~saecircuits.analysis.corpus.statistics.CorpusStats` as tensors, numbers and strings only."""
    import torch

    blob = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats) if f.name != "features"}
    blob["features"] = [{f.name: getattr(fs, f.name) for f in dataclasses.fields(fs)} for fs in stats.features]
    atomic_write(_file(path, ".pt"), lambda tmp: torch.save(blob, tmp))


def _load_corpus_stats(path: Path, ctx: RunContext):
    import torch

    from saecircuits.analysis.corpus.statistics import CorpusStats, FeatureStats

    blob = torch.load(_file(path, ".pt"), weights_only=True)
    blob["features"] = [FeatureStats(**fs) for fs in blob["features"]]
    return CorpusStats(**blob)


def _save_feature_acts(path: Path, acts, ctx: RunContext) -> None:
    """A :class:`~saecircuits.analysis.ablations.activations_at_p.FeatureActs` as its tensors and shape."""
    import torch

    blob = {f.name: getattr(acts, f.name) for f in dataclasses.fields(acts)}
    atomic_write(_file(path, ".pt"), lambda tmp: torch.save(blob, tmp))


def _load_feature_acts(path: Path, ctx: RunContext):
    import torch

    from saecircuits.analysis.ablations.activations_at_p import FeatureActs

    return FeatureActs(**torch.load(_file(path, ".pt"), weights_only=True))


CODECS = {"json": (_save_json, _load_json), "task": (_save_task, _load_task), "saes": (_save_saes, _load_saes),
          "corpus_stats": (_save_corpus_stats, _load_corpus_stats),
          "feature_acts": (_save_feature_acts, _load_feature_acts)}
"""How a run-state value is written to and read from the checkpoint (``"memory"``: never written)."""


class Checkpoint:
    """The checkpoint of one run in ``out/``:data:`CHECKPOINT_DIR`.

    Args:
        out: the run's ``--out`` folder.
        cfg: the run's settings.
        resume: go on from an existing checkpoint (refused when its settings differ); otherwise an existing one is
            removed and the run starts over.

    Raises:
        PipelineError: ``resume`` and the checkpoint was written under other settings (naming each of them), or its
            manifest is damaged (:meth:`damaged`).
    """

    def __init__(self, out: str | Path, cfg: RunConfig, *, resume: bool) -> None:
        self.dir = Path(out).expanduser() / CHECKPOINT_DIR
        self.key = config_key(cfg)
        manifest = self.dir / "manifest.json"
        self.manifest: dict[str, Any] = {"version": CHECKPOINT_VERSION, "config": self.key, "stages": {},
                                         "values": {}}
        self.resumed = False
        if resume and manifest.is_file():
            try:
                saved = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
                raise self.damaged("manifest.json", err) from None
            if not isinstance(saved, dict) or not isinstance(saved.get("stages"), dict) \
                    or not isinstance(saved.get("values"), dict):
                raise self.damaged("manifest.json", "not a checkpoint manifest")
            if saved.get("version") != CHECKPOINT_VERSION:
                raise PipelineError(f"--resume: the checkpoint in {self.dir} was written by another saecircuits "
                                    "version; run again without --resume")
            self._refuse_other_settings(saved.get("config") or {})
            self.manifest, self.resumed = saved, True
        elif self.dir.exists():
            shutil.rmtree(self.dir)

    def damaged(self, what: str, err: BaseException | str) -> PipelineError:
        """The one-line error for a checkpoint file that cannot be read back (a run killed by the OS mid-write, a
        disk that filled up, a file edited or removed by hand): names the file and the fix."""
        reason = err if isinstance(err, str) else f"{type(err).__name__}: {str(err).split('. ')[0].strip()}"
        return PipelineError(f"--resume: the checkpoint in {self.dir} is damaged ({what}: {reason}); run again "
                             "without --resume to start over")

    def _refuse_other_settings(self, saved: dict[str, Any]) -> None:
        differ = [k for k in sorted(set(saved) | set(self.key)) if saved.get(k) != self.key.get(k)]
        if differ:
            said = "; ".join(f"{_flag(k)}: {saved.get(k)!r} in the checkpoint, {self.key.get(k)!r} now"
                             for k in differ)
            raise PipelineError(f"--resume: the checkpoint in {self.dir} was written under other settings ({said}); "
                                "resume with the same settings, or run again without --resume to start over")

    @property
    def finished_stages(self) -> list[str]:
        return [name for name, s in self.manifest["stages"].items() if s.get("finished")]

    def finished(self, stage: str) -> dict[str, float] | None:
        """The timings of ``stage`` when the checkpoint holds it as finished, else None."""
        s = self.manifest["stages"].get(stage)
        return dict(s["timings"]) if s and s.get("finished") else None

    def item_done(self, stage: str, i: int) -> float | None:
        """The seconds item ``i`` of an ``each`` stage took when the checkpoint holds it, else None."""
        items = (self.manifest["stages"].get(stage) or {}).get("items") or {}
        return items.get(str(i))

    def _save(self, name: str, codec: str, value: Any, ctx: RunContext) -> None:
        if codec == "memory":
            return
        CODECS[codec][0](self.dir / name, value, ctx)
        self.manifest["values"][name] = codec

    def save_stage(self, stage: Stage, out: dict[str, Any], ctx: RunContext) -> None:
        for name in stage.writes:
            self._save(name, stage.codec(name), out[name], ctx)

    def save_item(self, stage: Stage, i: int, out: dict[str, Any], seconds: float, ctx: RunContext) -> None:
        for name in stage.writes:
            self._save(f"{name}.{i}", stage.codec(name), out[name], ctx)
        self.manifest["stages"].setdefault(stage.name, {"finished": False}).setdefault("items", {})[str(i)] = seconds
        self._write_manifest()

    def finish(self, stage: Stage, timings: dict[str, float], n_items: int | None = None) -> None:
        """Mark ``stage`` finished (an ``each`` stage after its ``n_items`` items: its writes become lists)."""
        s = self.manifest["stages"].setdefault(stage.name, {})
        s.update(finished=True, timings=timings)
        if n_items is not None:
            for name in stage.writes:
                self.manifest["values"][name] = {"items": n_items, "codec": stage.codec(name)}
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(self.dir / "manifest.json", json.dumps(self.manifest, indent=1))

    def load_value(self, name: str, ctx: RunContext) -> Any:
        """A value a finished stage wrote (an ``each`` stage's: the list of its items' values).

        Raises:
            KeyError: the checkpoint holds no such value.
            PipelineError: its file is missing or cannot be read back (:meth:`damaged`).
        """
        codec = self.manifest["values"].get(name)
        if codec is None:
            raise KeyError(f"the checkpoint in {self.dir} holds no value {name!r}")
        if isinstance(codec, dict):
            return [self.load_value(f"{name}.{i}", ctx) for i in range(codec["items"])]
        if codec not in CODECS:
            raise self.damaged("manifest.json", f"unknown codec {codec!r} for {name!r}")
        try:
            return CODECS[codec][1](self.dir / name, ctx)
        except PipelineError:
            raise
        except Exception as err:  # noqa: BLE001 - json, torch, safetensors and the dataclasses raise several types
            raise self.damaged(name, err) from None

    def check_value(self, stage: str, name: str, value: Any) -> None:
        """Refuse the resume when a stage that ran again produced another ``name`` than the checkpoint holds."""
        if not self.resumed or name not in self.manifest["values"]:
            return
        saved = self.load_value(name, None)  # type: ignore[arg-type]  # JSON values need no context
        if json.loads(_to_json(value)) != saved:
            raise PipelineError(f"--resume: the {stage} stage gives another {name} ({value!r}) than the run that "
                                f"wrote the checkpoint in {self.dir} ({saved!r}); run again without --resume")

    def remove(self) -> None:
        """Remove the work area (the run completed)."""
        shutil.rmtree(self.dir, ignore_errors=True)
