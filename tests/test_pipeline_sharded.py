"""Sharded runs (issue 17): two gloo ranks on CPU give one process's results.json and circuit.json, and a rank that
dies ends the run with a clear error and no results."""

from __future__ import annotations

import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import STORIES, json_differences, tiny_neo

from saecircuits.pipeline import RunConfig, run_pipeline

SKIP_KEYS = {"timings", "reused"}
"""Keys that may differ: seconds, and whether the SAEs came from the cache (the sharded run reuses the ones the
single-process run trained)."""


def _cfg_kw(tmp_path: Path, out: str) -> dict:
    corpus = tmp_path / "stories.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    return dict(model="tiny-neo", data=corpus, out=tmp_path / out, workspace=tmp_path / "ws",
                closings=('."', '!"', '?"'), sae_tokens=2048, sae_batch_size=256, seq_len=32, max_candidates=5,
                n_example_features=2, n_examples=2, seed=0)


def _worker(rank: int, init_file: str, cfg_kw: dict, die_in: str | None) -> None:
    """One rank: the pipeline on the tiny model at one thread; ``die_in``: this rank kills itself (SIGKILL) when it
    reaches that analysis. A :class:`ShardError` is written to ``rank<r>.err`` beside the run's folder."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    if die_in is not None:
        import saecircuits.analysis.ablations.feature_effects as fe

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(fe, die_in, die)
    from saecircuits.distributed import ShardError

    try:
        run_pipeline(RunConfig(**cfg_kw), model=tiny_neo(), progress=False)
    except ShardError as err:
        (Path(cfg_kw["out"]).parent / f"rank{rank}.err").write_text(str(err))
    finally:
        torch.distributed.destroy_process_group()


def _spawn(tmp_path: Path, cfg_kw: dict, die: dict[int, str]) -> list[int | None]:
    """Run the two ranks as separate processes; returns their exit codes (each waited for, never killed)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "rdzv"), cfg_kw, die.get(r))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    return [p.exitcode for p in procs]


def _differences(a, b) -> list[str]:
    """Where two results.json values differ (:func:`helpers.json_differences`); :data:`SKIP_KEYS` and the output
    folder are left out."""
    return json_differences(a, b, skip=lambda path, k: k in SKIP_KEYS or (path == "/config" and k == "out"))


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_results(tmp_path):
    """The reference is one process at one thread (as the ranks), run first: it trains the SAEs the sharded run
    then reuses from the workspace, so both analyse the same SAEs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = run_pipeline(RunConfig(**_cfg_kw(tmp_path, "one")), model=tiny_neo(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert want["saes"][0]["feature_effects_info"]["n_pairs"] > 20  # enough pairs that both ranks compute some
    assert _spawn(tmp_path, _cfg_kw(tmp_path, "two"), {}) == [0, 0]
    one, two = tmp_path / "one", tmp_path / "two"
    got = json.loads((two / "results.json").read_text())
    assert got["saes"][0]["training"]["reused"] is True
    assert _differences(got, json.loads((one / "results.json").read_text())) == []
    assert _differences(json.loads((two / "circuit.json").read_text()),
                        json.loads((one / "circuit.json").read_text())) == []
    assert (two / "report.html").stat().st_size > 100_000
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # rank 1 wrote nothing
    assert not list(tmp_path.glob("rank*.err"))


@pytest.mark.slow
def test_a_rank_killed_mid_run_leaves_no_results(tmp_path):
    """Rank 1 dies (SIGKILL) when it reaches the per-SAE exact effects; rank 0 fails at its next collective with
    a clear error and writes neither results.json nor the report."""
    codes = _spawn(tmp_path, _cfg_kw(tmp_path, "run"), {1: "feature_effects"})
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == 0  # the worker caught the ShardError (below)
    err = (tmp_path / "rank0.err").read_text()
    assert "lost the other ranks" in err and "No results were written" in err
    out = tmp_path / "run"
    assert not (out / "results.json").exists() and not (out / "report.html").exists()
    assert not (out / "circuit.json").exists()
    assert not list(out.rglob("*.tmp")) if out.exists() else True
    # before that, the SAEs were trained data-parallel and cached by rank 0 alone: one cache folder, no temp folder
    cached = list((tmp_path / "ws" / "saes").iterdir())
    assert [p.name.startswith(".") for p in cached] == [False]
    assert sorted(p.parent.parent.name for p in cached[0].glob("*/sae/cfg.json")) == ["blocks.0.mlp.hook_post",
                                                                             "blocks.1.mlp.hook_post"]


@pytest.mark.slow
def test_torchrun_saecircuits_run_writes_one_process_results_from_rank_0(tmp_path):
    """The real command, ``torchrun --nproc_per_node 2 ... saecircuits run``: the process group comes from
    torchrun's environment (gloo), rank 0 alone prints and writes, and results.json equals a one-process run's
    (the same CLI in this process at one thread, which trained the SAEs the sharded run reuses)."""
    import subprocess
    import sys

    from helpers import tiny_neo_hf, tiny_tokenizer
    from typer.testing import CliRunner

    from saecircuits.cli import _register, app, expand_multi_value_options

    model_dir = tmp_path / "model"
    tiny_neo_hf().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    kw = _cfg_kw(tmp_path, "x")
    args = ["run", "--model", str(model_dir), "--data", str(kw["data"]), "--workspace", str(tmp_path / "ws"),
            "--all-closings", "--sae-tokens", "2048", "--no-circuit"]
    _register()
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, expand_multi_value_options([*args, "--out", str(tmp_path / "one"),
                                                                  "--threads", "1"]))
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    script = tmp_path / "entry.py"
    script.write_text("import sys\nfrom saecircuits.cli import main\nsys.argv[0] = 'saecircuits'\nmain()\n")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args,
         "--out", str(tmp_path / "two"), "--threads", "1"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1  # rank 0's summary only
    assert "sharded run: 2 ranks (gloo)" in proc.stdout + proc.stderr
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["saes"][0]["training"]["reused"] is True
    assert _differences(two, one) == []
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["report.html", "results.json"]
