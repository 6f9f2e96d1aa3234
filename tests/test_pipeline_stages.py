"""The pipeline as declared stages (issue 19 item 3): the stage list is consistent, and ``saecircuits run --resume``
goes on from the checkpoint of a run that failed late, without running its finished stages again, to the same
results.json as an uninterrupted run; a resume under other settings is refused, naming them."""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections import Counter

import pytest
from helpers import STORIES, tiny_neo_hf, tiny_tokenizer
from typer.testing import CliRunner

import saecircuits.pipeline.run as pipeline_run
from saecircuits.cli import _register, app, expand_multi_value_options
from saecircuits.pipeline import STAGES
from saecircuits.pipeline.checkpoint import CHECKPOINT_DIR
from saecircuits.pipeline.stages import Stage, check_declarations


def test_every_read_is_written_by_an_earlier_stage_and_matches_the_stage_function():
    check_declarations(STAGES)  # raises on the first inconsistency
    written: set[str] = set()
    for stage in STAGES:
        assert set(stage.reads) <= written, (stage.name, set(stage.reads) - written)
        assert not set(stage.writes) & written, (stage.name, set(stage.writes) & written)
        written |= set(stage.writes)
        # the function takes exactly the declared reads, by name (so a read it uses but does not declare fails)
        params = inspect.signature(stage.run).parameters.values()
        assert {p.name for p in params if p.kind is p.KEYWORD_ONLY} == set(stage.reads), stage.name
    assert "results" in written
    assert [s.name for s in STAGES].count("circuit") == 1


def test_the_declaration_check_fails_on_an_undeclared_or_late_read():
    def f(ctx, *, x):
        return {"y": x}

    with pytest.raises(ValueError, match="reads 'x', which no earlier stage writes"):
        check_declarations([Stage("a", f, reads=("x",), writes=("y",)), Stage("b", f, writes=("x",))])
    with pytest.raises(ValueError, match="writes 'x', which an earlier stage already wrote"):
        check_declarations([Stage("a", f, writes=("x",)), Stage("b", f, writes=("x",))])


@pytest.fixture()
def inputs(tmp_path):
    model_dir = tmp_path / "model"
    tiny_neo_hf().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    return model_dir, corpus


def _run(model_dir, corpus, out, ws, *extra: str):
    _register()
    circuit = [] if "--no-circuit" in extra else ["--circuit-ig-steps", "2"]  # refused as unused with --no-circuit
    args = ["run", "--model", str(model_dir), "--data", str(corpus), "--out", str(out), "--workspace", str(ws),
            "--all-closings", "--sae-tokens", "2048", "--expansion-factor", "4", *circuit, "--threads", "1", *extra]
    return CliRunner().invoke(app, expand_multi_value_options(args))


def _counting(monkeypatch, fail: str | None = None, on_call: int = 1) -> Counter:
    """Replace the pipeline's stages with ones that count their calls; stage ``fail`` raises on call ``on_call``."""
    calls: Counter = Counter()

    def wrap(stage: Stage) -> Stage:
        def run(*args, **kwargs):
            calls[stage.name] += 1
            if stage.name == fail and calls[stage.name] == on_call:
                raise RuntimeError(f"{fail} stage failed (test)")
            return stage.run(*args, **kwargs)

        run.__signature__ = inspect.signature(stage.run)  # type: ignore[attr-defined]
        return dataclasses.replace(stage, run=run)

    monkeypatch.setattr(pipeline_run, "STAGES", tuple(wrap(s) for s in STAGES))
    return calls


def _without_timings(out, ws) -> dict:
    """results.json without its timings and the run's own output and workspace folders."""
    results = json.loads((out / "results.json").read_text().replace(str(ws), "WORKSPACE"))
    results.pop("timings")
    results["config"].pop("out")
    return results


def test_a_run_that_failed_in_the_circuit_stage_resumes_without_rerunning_the_finished_stages(
        tmp_path, inputs, monkeypatch):
    model_dir, corpus = inputs
    # each run trains its SAEs (the same seed: the same SAEs) in its own workspace
    whole = _run(model_dir, corpus, tmp_path / "whole", tmp_path / "ws-whole")
    assert whole.exit_code == 0, whole.output
    assert not (tmp_path / "whole" / CHECKPOINT_DIR).exists()  # removed when the run completes

    out, ws = tmp_path / "out", tmp_path / "ws"
    calls = _counting(monkeypatch, fail="circuit")
    failed = _run(model_dir, corpus, out, ws)
    assert failed.exit_code != 0 and "circuit stage failed" in str(failed.exception)
    assert not (out / "results.json").exists() and (out / CHECKPOINT_DIR / "manifest.json").is_file()
    assert calls["circuit"] == 1 and calls["analyse"] == 2  # one call per SAE

    calls = _counting(monkeypatch)
    resumed = _run(model_dir, corpus, out, ws, "--resume")
    assert resumed.exit_code == 0, resumed.output
    # only the model and the corpora are loaded again (they live in memory only); every other finished stage is
    # read back from the checkpoint
    assert dict(calls) == {"load_model": 1, "corpus": 1, "circuit": 1, "report": 1}
    assert _without_timings(out, ws) == _without_timings(tmp_path / "whole", tmp_path / "ws-whole")
    assert json.loads((out / "circuit.json").read_text()) == json.loads(
        (tmp_path / "whole" / "circuit.json").read_text())
    timings = json.loads((out / "results.json").read_text())["timings"]
    assert {"corpus_stats", "analyse blocks.0.mlp.hook_post", "circuit"} <= set(timings)
    assert not (out / CHECKPOINT_DIR).exists()


def test_a_resume_under_other_settings_is_refused_naming_them(tmp_path, inputs, monkeypatch):
    model_dir, corpus = inputs
    out, ws = tmp_path / "out", tmp_path / "ws"
    calls = _counting(monkeypatch, fail="dla")
    assert _run(model_dir, corpus, out, ws).exit_code != 0
    assert calls["task"] == 1

    refused = _run(model_dir, corpus, out, ws, "--resume", "--circuit-ig-steps", "3", "--sae-k", "16")
    assert refused.exit_code == 2, refused.output
    line = refused.output.strip().splitlines()[-1]
    assert line.startswith("error: --resume:") and "--circuit-ig-steps: 2 in the checkpoint, 3 now" in line
    assert "--sae-k: 32 in the checkpoint, 16 now" in line and "--data" not in line

    tiny_neo_hf(seed=1).save_pretrained(model_dir)  # the same --model folder, other weights
    refused = _run(model_dir, corpus, out, ws, "--resume")
    assert refused.exit_code == 2 and "gives another model_key" in refused.output.strip().splitlines()[-1]
    assert calls["load_model"] == 2 and calls["dla"] == 1
    tiny_neo_hf().save_pretrained(model_dir)

    corpus.write_text(corpus.read_text() + "One more story.\n", encoding="utf-8")  # same path, other contents
    refused = _run(model_dir, corpus, out, ws, "--resume")
    assert refused.exit_code == 2 and "--data (file contents)" in refused.output.strip().splitlines()[-1]
    assert calls["dla"] == 1 and calls["load_model"] == 2  # refused before any stage ran again
    corpus.write_text(corpus.read_text().removesuffix("One more story.\n"), encoding="utf-8")

    # other saecircuits code under the same version: its stage values are not mixed with this code's
    monkeypatch.setattr("saecircuits.pipeline.checkpoint.source_digest", lambda patterns: "0123456789abcdef")
    refused = _run(model_dir, corpus, out, ws, "--resume")
    line = refused.output.strip().splitlines()[-1]
    assert refused.exit_code == 2 and "the saecircuits code (a digest of its source)" in line, refused.output
    assert "'0123456789abcdef' now" in line and calls["dla"] == 1


def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_file(tmp_path, inputs, monkeypatch):
    """A checkpoint file cut short or removed (a run killed by the OS, a full disk, a hand edit) gave a JSON error
    without context, or torch's traceback (found by trying it): one line naming the file and the fix."""
    model_dir, corpus = inputs
    out, ws = tmp_path / "out", tmp_path / "ws"
    _counting(monkeypatch, fail="dla")
    assert _run(model_dir, corpus, out, ws).exit_code != 0
    ckpt = out / CHECKPOINT_DIR
    manifest, task = (ckpt / "manifest.json").read_text(), (ckpt / "task.json").read_text()
    for damage, named in [(lambda: (ckpt / "task.json").write_text(task[: len(task) // 2]), "(task: JSONDecodeError"),
                          (lambda: (ckpt / "task.json").unlink(), "(task: FileNotFoundError"),
                          (lambda: (ckpt / "manifest.json").write_text(manifest[:100]), "(manifest.json: "),
                          (lambda: (ckpt / "manifest.json").write_text("[]"), "(manifest.json: not a checkpoint")]:
        damage()
        refused = _run(model_dir, corpus, out, ws, "--resume")
        line = refused.output.strip().splitlines()[-1]
        assert refused.exit_code == 2 and isinstance(refused.exception, SystemExit), refused.output
        assert line.startswith(f"error: --resume: the checkpoint in {ckpt} is damaged {named}"), refused.output
        assert line.endswith("run again without --resume to start over")
        (ckpt / "manifest.json").write_text(manifest)
        (ckpt / "task.json").write_text(task)
    _counting(monkeypatch)
    assert _run(model_dir, corpus, out, ws, "--resume").exit_code == 0  # the repaired checkpoint resumes


def test_a_run_that_failed_on_its_second_sae_resumes_from_that_sae(tmp_path, inputs, monkeypatch):
    model_dir, corpus = inputs
    out, ws = tmp_path / "out", tmp_path / "ws"
    calls = _counting(monkeypatch, fail="analyse", on_call=2)
    assert _run(model_dir, corpus, out, ws, "--no-circuit").exit_code != 0
    assert calls["analyse"] == 2
    calls = _counting(monkeypatch)
    resumed = _run(model_dir, corpus, out, ws, "--no-circuit", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert calls["analyse"] == 1 and calls["saes"] == calls["corpus_stats"] == 0  # the first SAE's entry is read back
    results = json.loads((out / "results.json").read_text())
    assert [s["hook_point"] for s in results["saes"]] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert {"analyse blocks.0.mlp.hook_post", "analyse blocks.1.mlp.hook_post"} <= set(results["timings"])


def test_the_checkpoint_gives_back_saes_of_every_kind_and_the_corpus_statistics_exactly(tmp_path):
    """SAEs (JumpReLU with its threshold, a skip transcoder, a hook_z SAE in bfloat16) and corpus statistics go
    through the checkpoint's safe formats and come back equal: the same tensors, configs and outputs."""
    import torch
    from helpers import random_sae, tiny_neo

    from saecircuits.analysis.corpus.statistics import corpus_feature_stats
    from saecircuits.pipeline import RunConfig
    from saecircuits.pipeline.checkpoint import CODECS
    from saecircuits.pipeline.stages import RunContext
    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.registry import build_sae

    ctx = RunContext(cfg=RunConfig(model="m", data=tmp_path, out=tmp_path / "out"), say=print)
    jump = build_sae(SAEConfig("jumprelu", d_in=8, d_sae=16, hook_point="blocks.0.mlp.hook_post"), seed=1)
    with torch.no_grad():
        jump.threshold.uniform_(0.0, 0.5)
    skip = build_sae(SAEConfig("topk", d_in=8, d_sae=12, hook_point="blocks.0.ln2.hook_normalized", d_out=6,
                               hook_point_out="blocks.0.hook_mlp_out", apply_b_dec_to_input=False,
                               extra={"k": 3, "skip_connection": True}), seed=2)
    z = build_sae(SAEConfig("standard", d_in=8, d_sae=10, hook_point="blocks.1.attn.hook_z", dtype="bfloat16",
                            extra={"reshape_activations": "hook_z"}), seed=3)
    save, load = CODECS["saes"]
    save(tmp_path / "saes", [jump, skip, z], ctx)
    back = load(tmp_path / "saes", ctx)
    x = torch.randn(5, 8)
    for a, b in zip([jump, skip, z], back, strict=True):
        assert type(a) is type(b) and a.cfg == b.cfg
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
        assert torch.equal(a.encode(x), b.encode(x))
    save(tmp_path / "none", None, ctx)
    assert load(tmp_path / "none", ctx) is None

    model = tiny_neo()
    rows = [[1, 5, 9, 13, 2], [1, 7, 7, 30, 41, 8], [1, 3]]
    # with the sums of other hooks (the circuit's corpus means): carried too, so a resumed circuit encodes nothing
    stats = corpus_feature_stats(model, [random_sae()], rows, k=2, mean_hooks=["hook_embed", "blocks.1.attn.hook_z"])
    CODECS["corpus_stats"][0](tmp_path / "stats", stats, ctx)
    again = CODECS["corpus_stats"][1](tmp_path / "stats", ctx)
    assert (again.n_docs, again.n_tokens, again.special_ids) == (stats.n_docs, stats.n_tokens, stats.special_ids)
    assert torch.equal(again.token_counts, stats.token_counts)
    assert sorted(again.hook_sums) == ["blocks.1.attn.hook_z", "hook_embed"]
    assert all(torch.equal(again.hook_sums[h], t) for h, t in stats.hook_sums.items())
    for a, b in zip(stats.features, again.features, strict=True):
        for name, value in vars(a).items():
            other = getattr(b, name)
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


def test_the_checkpoint_gives_back_feature_activations_exactly(tmp_path):
    """The analyse stage's feature activations at P (what the circuit stage reads) through the checkpoint's safe
    format: the same shape and tensors."""
    import torch

    from saecircuits.analysis.ablations.activations_at_p import FeatureActs
    from saecircuits.pipeline import RunConfig
    from saecircuits.pipeline.checkpoint import CODECS
    from saecircuits.pipeline.stages import RunContext

    ctx = RunContext(cfg=RunConfig(model="m", data=tmp_path, out=tmp_path / "out"), say=print)
    acts = FeatureActs.from_dense(torch.relu(torch.randn(5, 12, generator=torch.Generator().manual_seed(0))))
    CODECS["feature_acts"][0](tmp_path / "acts", acts, ctx)
    back = CODECS["feature_acts"][1](tmp_path / "acts", ctx)
    assert (back.n_prompts, back.d_sae) == (5, 12)
    assert all(torch.equal(getattr(back, k), getattr(acts, k)) for k in ("prompt", "feature", "value"))
