"""The ``--out`` folder (writable, locked by one run, no stale outputs of an earlier run) and stage ``report``:
``results.json``, ``circuit.json`` and ``report.html``, each written atomically."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import saecircuits
from saecircuits.pipeline.config import PipelineError
from saecircuits.pipeline.stages import RunContext, Stage


def why_not_writable(folder: Path, err: OSError) -> str:
    """Why no file or folder can be made in the existing folder ``folder``, from the ``OSError`` that said so.

    A virtual file system such as /proc or /sys answers "No such file or directory" (ENOENT) to creating an entry
    in a folder that does exist; that is reported as what it is, not as a missing folder.
    """
    if err.errno == errno.ENOENT and folder.is_dir():
        return f"{folder} does not accept new files or folders (a virtual file system such as /proc or /sys)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"you have no permission to create files in {folder}"
    if err.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if err.errno == errno.ENOSPC:
        return f"the disk holding {folder} is full"
    return f"{folder}: {err.strerror or err}"


def make_out_folder(out: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder ``out`` (and its parents) if missing and return it.

    Raises:
        PipelineError: it cannot be created, in one line naming the folder and the reason (see
            :func:`why_not_writable`).
    """
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        probe = out
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise PipelineError(f"{option} {out}: {probe} is a file, so the folder cannot be created there; give "
                                f"another {option}") from None
        raise PipelineError(f"{option} {out}: the folder cannot be created: {why_not_writable(probe, err)}; give "
                            "a folder you can write to") from None
    return out


def check_out_writable(out: str | os.PathLike) -> None:
    """Fail at once, in one line, when ``--out`` cannot be written (before the model loads, not after the analysis).

    The folder is not created here (a run that fails leaves no empty folder): a temporary file is written and
    removed in ``out``, or in its nearest existing parent when ``out`` does not exist yet.

    Raises:
        PipelineError: a parent of ``out`` is a file, or the folder is not writable (read-only file system,
            permissions), naming the folder and the reason.
    """
    import tempfile

    out = Path(out).expanduser()
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise PipelineError(f"--out {out}: {probe} is a file, so the output folder cannot be made there; "
                            "give another --out")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".saecircuits-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        what = "cannot write in the folder" if probe == out else "the folder cannot be created"
        raise PipelineError(f"--out {out}: {what}: {why_not_writable(probe, err)}; give a folder you can write "
                            "to") from None


class OutLock:
    """Exclusive use of an output folder by one run: a lock file ``.<out name>.saecircuits-lock`` beside the folder
    holding the run's pid, created with ``O_EXCL``. Another run into the same folder is refused while that pid
    lives; a lock whose process died (SIGKILL, a crash) is taken over. Used as a context manager.

    Raises (on enter):
        PipelineError: another live run holds the folder, naming its pid and the lock file.
    """

    def __init__(self, out: str | os.PathLike):
        out = Path(out).expanduser()
        self.out = out
        self.path = out.parent / f".{out.name}.saecircuits-lock"

    def _holder(self, path: Path) -> int | None:
        try:
            text = path.read_text().split()
            return int(text[0]) if text else None
        except (OSError, ValueError):
            return None

    def __enter__(self) -> OutLock:
        from saecircuits.atomic import pid_alive

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self._holder(self.path)
                if pid is None:  # just created by another run, its pid not written yet: look again
                    time.sleep(0.05)
                    pid = self._holder(self.path)
                if pid is not None and pid_alive(pid):
                    raise PipelineError(
                        f"--out {self.out} is being written by another saecircuits run (pid {pid}; lock file "
                        f"{self.path}); wait for it to finish, or give another --out") from None
                # a dead run's lock: move it aside (one rename wins), then check it really was the dead one's
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                moved = self._holder(aside)
                if moved is None or (moved != pid and pid_alive(moved)):  # a live run's fresh lock: put it back
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            return self
        raise PipelineError(f"--out {self.out}: could not take the lock {self.path}; remove it if no run is writing")

    def __exit__(self, *exc: object) -> None:
        if self._holder(self.path) == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


STALE_OUTPUTS = {"circuit.json": None, "figures": ".png", "tables": ".csv"}
"""Outputs an earlier run may have left in ``--out`` that this run may not write (``--no-circuit``, no
``--export``): a file, or a folder of files with this suffix. Removed when this run does not write them."""


def _count(n: int, noun: str) -> str:
    """``"1 prompt"``, ``"3 prompts"``: a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def earlier_run_in(out: Path) -> bool:
    """Whether ``out`` holds the ``results.json`` of an earlier saecircuits run (call before this run writes its own).

    Only then are the :data:`STALE_OUTPUTS` there an earlier run's: a folder of the user's own ``figures/``,
    ``tables/`` or ``circuit.json`` given as ``--out`` was emptied of them."""
    # its head only (a results.json can be hundreds of MB): the pipeline writes "saecircuits_version" second
    try:
        with open(out / "results.json", "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and b'"saecircuits_version"' in head


def _remove_stale_outputs(out: Path, written: set[str], *, earlier_run: bool = True) -> list[str]:
    """Remove the :data:`STALE_OUTPUTS` this run did not write (a folder only when it holds nothing else), so
    ``--out`` never mixes this run's results with an earlier run's circuit, figures or tables. Nothing is removed
    unless ``earlier_run`` (:func:`earlier_run_in`, asked before this run wrote ``results.json``)."""
    if not earlier_run:
        return []
    from saecircuits.report.export import foreign_files

    removed = []
    for name, suffix in STALE_OUTPUTS.items():
        p = out / name
        if name in written or not p.exists():
            continue
        if suffix is None and p.is_file():
            p.unlink()
        elif suffix is not None and p.is_dir() and not foreign_files(p):  # an export's names only, no file of yours
            shutil.rmtree(p)
        else:
            continue
        removed.append(name)
    return removed


def _report(ctx: RunContext, *, model, provenance: dict, task, task_entry: dict, behaviour: dict,
            behaviour_checks: list, bos_policy: dict, dla: dict, layers, layer_note: str | None, entries: list,
            sae_checks: list, layer_comparison: dict | None, corpus_stats, circuit_entry: dict | None,
            circuit_json: dict | None, circuit_note: str | None) -> dict:
    """``results``: the results dict, validated and written to ``results.json`` (with ``circuit.json`` and
    ``report.html``); outputs of an earlier run that this one did not write are removed.

    In a sharded run every rank first waits for the others (a rank that died fails the run here with
    :class:`~saecircuits.distributed.ShardError`, before anything is written); then rank 0 alone writes."""
    import dataclasses

    from saecircuits import distributed
    from saecircuits.models.interventions import interventions_for
    from saecircuits.models.load import model_dtype
    from saecircuits.report.render import render_report
    from saecircuits.report.schema import SCHEMA_VERSION, write_json_atomic
    from saecircuits.results import Results

    cfg, say = ctx.cfg, ctx.say
    if layers != cfg.layers:  # the --layers auto choice is the run's setting
        cfg = dataclasses.replace(cfg, layers=layers)
    out = Path(cfg.out)  # created only when the results are written, so a failed run leaves no empty folder
    iv = interventions_for(model)
    n_ctx = int(model.cfg.n_ctx)
    notes = [n for n in (layer_note, circuit_note) if n]
    if task.n_dropped_too_long:
        notes.append(
            f"{_count(task.n_dropped_too_long, 'prompt')} {'was' if task.n_dropped_too_long == 1 else 'were'} longer "
            f"than {min(cfg.max_prompt_tokens or n_ctx, n_ctx)} tokens "
            f"(prompt + answer; the model's context is {n_ctx}) and were left out; the results use the other "
            f"{task.n_prompts}."
        )
    from saecircuits.pipeline.task import _anchors_note

    if _anchors_note(task):
        notes.append(_anchors_note(task))
    if task.n_prompts < 20:
        notes.append(
            f"Only {_count(task.n_prompts, 'prompt')}: means are noisy and 95% intervals are wide or undefined (n < 2). "
            "Use a larger corpus or task file."
        )
    stats = corpus_stats
    results = {
        "schema_version": SCHEMA_VERSION,
        "saecircuits_version": saecircuits.__version__,
        "model": cfg.model_label or cfg.model,
        "model_info": {
            "n_layers": int(model.cfg.n_layers),
            "d_model": int(model.cfg.d_model),
            "d_mlp": int(model.cfg.d_mlp),
            "d_vocab": int(model.cfg.d_vocab),
            "n_heads": int(model.cfg.n_heads),
            "architecture": str(provenance.get("architecture", "")),
            "dtype": model_dtype(model),
            "device": str(model.W_E.device),
        },
        "provenance": provenance,
        "task": task_entry,
        "behaviour": behaviour,
        "checks": [*behaviour_checks, *(c for checks in sae_checks for c in checks)],
        "bos_policy": bos_policy,
        "dla": dla,
        "saes": entries,
        **({"layer_comparison": layer_comparison} if layer_comparison else {}),
        "corpus": {"n_docs": stats.n_docs, "n_tokens": stats.n_tokens, "n_special_ids": len(stats.special_ids),
                   "ablation_mode": cfg.ablation_mode},
        **({"circuit": circuit_entry} if circuit_entry is not None else {}),
        "interventions": {"backend": iv.backend, "note": iv.reason or "prefix-cached: position P recomputed alone"},
        "timings": ctx.timings | {"total": round(ctx.elapsed(), 3)},
        "config": cfg.to_dict(),
        "notes": notes,
    }
    iv.clear_cache()
    distributed.barrier("the end of every rank's stages")
    if not distributed.is_writer():
        return {"results": results}
    typed = Results.model_validate(results)  # validated once, before anything is written; the report reads it
    earlier = earlier_run_in(out)
    write_json_atomic(out / "results.json", results)
    if circuit_json is not None:
        # compact: a graph of megabytes that is read by programs (indented, it was 45% larger and 5x slower to write)
        write_json_atomic(out / "circuit.json", circuit_json, indent=None)
    render_report(typed, out / "report.html")
    removed = _remove_stale_outputs(out, {"circuit.json"} if circuit_json is not None else set(),
                                    earlier_run=earlier)
    if removed:
        say(f"removed {', '.join(removed)} of an earlier run in {out} (this run did not write them)")
    return {"results": results}


REPORT = Stage("report", _report, reads=(
    "model", "provenance", "task", "task_entry", "behaviour", "behaviour_checks", "bos_policy", "dla", "layers",
    "layer_note", "entries", "sae_checks", "layer_comparison", "corpus_stats", "circuit_entry", "circuit_json",
    "circuit_note"), writes=("results",), codecs={"results": "memory"})
