"""The output folder (issue 18, kind 10): an unwritable --out fails before the model loads, one run at a time
writes a folder, outputs an earlier run left are removed, and killed runs' temporary folders are cleaned."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from helpers import STORIES, exact_sae, tiny_neo

from saecircuits.atomic import pid_alive, remove_dead_temps
from saecircuits.pipeline import OutLock, PipelineError, RunConfig, check_out_writable, run_pipeline
from saecircuits.pipeline.outputs import make_out_folder, why_not_writable
from saecircuits.saes.io import save_sae


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    return path


def _cfg(tmp_path, corpus, **kw) -> RunConfig:
    base = dict(model="tiny-neo", data=corpus, out=tmp_path / "out", workspace=tmp_path / "ws",
                closings=('."', '!"', '?"'), sae_paths=[save_sae(exact_sae(), tmp_path / "exact")],
                max_candidates=5, n_example_features=1, n_examples=2, n_evidence_features=0, circuit=False)
    base.update(kw)
    return RunConfig(**base)


def test_an_unwritable_out_fails_before_the_model_loads(tmp_path, corpus, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PipelineError, match="is a file"):
        check_out_writable(tmp_path / "a-file" / "out")
    # a read-only file system (as root, permission bits do not stop writes): /proc cannot be written
    # /proc answers ENOENT to a new entry: said as the folder not being creatable there, not as "No such file"
    with pytest.raises(PipelineError, match=r"--out /proc/saecircuits-out: the folder cannot be created: /proc does "
                                            r"not accept new files or folders \(a virtual file system"):
        check_out_writable("/proc/saecircuits-out")
    with pytest.raises(PipelineError, match="--out /proc/a/b: the folder cannot be created: /proc does not accept"):
        make_out_folder("/proc/a/b")
    with pytest.raises(PipelineError, match="--out /proc: cannot write in the folder: /proc does not accept"):
        check_out_writable("/proc")
    # the other reasons, from the errno the file system gives (as root, permission bits cannot be tested for real)
    for code, reason in ((errno.EACCES, "you have no permission to create files in"),
                         (errno.EROFS, "is on a read-only file system"), (errno.ENOSPC, "the disk holding")):
        assert reason in why_not_writable(tmp_path, OSError(code, os.strerror(code)))
    assert make_out_folder(tmp_path / "made" / "here").is_dir()
    check_out_writable(tmp_path / "new" / "deeper")  # does not exist yet: its parent is checked, nothing created
    assert not (tmp_path / "new").exists()

    import saecircuits.models.load as load

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(load, "load_model", never)
    cfg = _cfg(tmp_path, corpus, out=tmp_path / "a-file" / "out", sae_paths=[])
    with pytest.raises(PipelineError, match="is a file"):
        run_pipeline(cfg, progress=False)


def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    with OutLock(out) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())
        # another live process holds it: a child that sleeps
        pass
    assert not lock.path.exists()  # released
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.path.write_text(f"{child.pid}\n")
        with pytest.raises(PipelineError, match=rf"being written by another saecircuits run \(pid {child.pid}"):
            with OutLock(out):
                pass
    finally:
        child.kill()
        child.wait()
    lock.path.write_text(f"{_dead_pid()}\n")  # its run died: taken over
    with OutLock(out):
        assert lock.path.read_text().strip() == str(os.getpid())
    assert not lock.path.exists() and not list(tmp_path.glob("*.stale-*"))


def test_a_rerun_without_the_circuit_removes_the_old_circuit_figures_and_tables(tmp_path, corpus):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "001-loss.png").write_bytes(b"\x89PNG")  # an export's names
    (out / "tables").mkdir()
    (out / "tables" / "summary-1.csv").write_text("a,b\n")
    (out / "circuit.json").write_text(json.dumps({"old": True}))
    (out / "results.json").write_text(json.dumps({"schema_version": 2, "saecircuits_version": "0.1.0"}))
    (out / "notes.txt").write_text("mine")  # not ours: kept
    run_pipeline(_cfg(tmp_path, corpus), model=tiny_neo(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.html", "results.json"]
    assert not list(tmp_path.glob(".out.saecircuits-lock"))


def test_a_users_own_figures_tables_and_circuit_json_are_kept_where_no_run_was(tmp_path, corpus):
    # `run --out` into a folder of the user's own (no earlier run's results.json) deleted figures/*.png,
    # tables/*.csv and circuit.json that saecircuits never wrote
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "my_plot.png").write_bytes(b"\x89PNG mine")
    (out / "tables").mkdir()
    (out / "tables" / "my_data.csv").write_text("a,b\n")
    (out / "circuit.json").write_text(json.dumps({"mine": True}))
    (out / "results.json").write_text(json.dumps({"my": "own results"}))  # not a saecircuits results.json
    run_pipeline(_cfg(tmp_path, corpus), model=tiny_neo(), progress=False)
    assert (out / "figures" / "my_plot.png").read_bytes() == b"\x89PNG mine"
    assert (out / "tables" / "my_data.csv").read_text() == "a,b\n"
    assert json.loads((out / "circuit.json").read_text()) == {"mine": True}
    # a second run finds the first one's results.json: a figures/ or tables/ with a file of the user's is still kept
    run_pipeline(_cfg(tmp_path, corpus), model=tiny_neo(), progress=False)
    assert (out / "figures" / "my_plot.png").is_file() and (out / "tables" / "my_data.csv").is_file()


def test_a_folder_with_other_files_is_not_removed(tmp_path, corpus):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "my-drawing.svg").write_text("<svg/>")
    run_pipeline(_cfg(tmp_path, corpus), model=tiny_neo(), progress=False)
    assert (out / "figures" / "my-drawing.svg").is_file()


def test_temporary_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    for name in (f".abc.tmp-{dead}", f".figures.tmp-{dead}", f".default-x.tmp-{dead}-k2j3", f".tables.old-{dead}",
                 f".default-x.copy-{dead}-a1b2", f".default-x.train-{dead}-00ff",
                 f".abc.tmp-{os.getpid()}", "abc", ".abc.tmp-notapid"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(b"0")
    removed = remove_dead_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".abc.tmp-{dead}", f".figures.tmp-{dead}", f".default-x.tmp-{dead}-k2j3", f".tables.old-{dead}",
         f".default-x.copy-{dead}-a1b2", f".default-x.train-{dead}-00ff"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".abc.tmp-{os.getpid()}", "abc", ".abc.tmp-notapid"])


def test_a_run_cleans_the_sae_cache_of_a_killed_run(tmp_path, corpus):
    dead = _dead_pid()
    stale = tmp_path / "ws" / "saes" / f".0123456789abcdef.tmp-{dead}"
    stale.mkdir(parents=True)
    cfg = _cfg(tmp_path, corpus, sae_paths=[], sae_tokens=512, sae_batch_size=256, seq_len=32, layers=[1])
    run_pipeline(cfg, model=tiny_neo(), progress=False)
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "ws" / "saes").iterdir() if ".tmp-" in p.name] == []


def test_the_sae_cache_is_keyed_by_the_training_code(tmp_path, corpus, monkeypatch):
    """SAEs trained by other training code are not reused (the package version alone stayed the same while the
    training code changed, and a workspace kept SAEs that a fresh one would not train)."""
    import shutil

    import saecircuits.pipeline.saes as pipeline_saes

    src = pipeline_saes.Path(pipeline_saes.saecircuits.__file__).parent
    copy = tmp_path / "pkg"
    for pattern in pipeline_saes.TRAINING_SOURCES:
        for path in src.glob(pattern):
            (copy / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, copy / path.relative_to(src))
    (copy / "report").mkdir()
    (copy / "report" / "x.py").write_text("# not training code\n")
    assert pipeline_saes.training_code_digest(copy) == pipeline_saes.training_code_digest()
    (copy / "saes" / "trainer.py").write_text((copy / "saes" / "trainer.py").read_text() + "\n# changed\n")
    assert pipeline_saes.training_code_digest(copy) != pipeline_saes.training_code_digest()

    def run(code: str) -> dict:
        monkeypatch.setattr(pipeline_saes, "training_code_digest", lambda: code)
        cfg = _cfg(tmp_path, corpus, sae_paths=[], sae_tokens=512, sae_batch_size=256, seq_len=32, layers=[1],
                   circuit=False, out=tmp_path / f"out-{code}")
        return run_pipeline(cfg, model=tiny_neo(), progress=False)["saes"][0]["training"]

    first, other, again = run("a"), run("b"), run("b")
    assert not first["reused"] and not other["reused"] and again["reused"]
    assert first["cache"] != other["cache"] == again["cache"]
