"""Kill-and-resume ends with the same weights as an uninterrupted run (API and ``train-sae --resume``)."""

from __future__ import annotations

import json

import pytest
import torch

from saecircuits.saes.base import SAEConfig, SAEError
from saecircuits.saes.registry import build_sae
from saecircuits.saes.trainer import CHECKPOINT_NAME, METRICS_NAME, SAETrainer, TrainConfig

D_IN, D_SAE, BATCH, STEPS = 8, 32, 16, 24


def _data(n=STEPS + 10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [3.0 * torch.randn(BATCH, D_IN, generator=gen).relu() for _ in range(n)]


class Killed(RuntimeError):
    pass


def _killing(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise Killed("simulated crash")
        yield b


def _cfg():
    # every trick that carries state across steps: lr warm-up/decay, sparsity warm-up, normalisation, resampling
    return TrainConfig(
        batch_size=BATCH,
        total_steps=STEPS,
        lr=3e-2,
        lr_warmup_steps=4,
        lr_decay_steps=8,
        sparsity_warmup_steps=6,
        normalize_activations=True,
        n_norm_batches=3,
        resample_steps=(9, 18),
        resample_window=5,
        dead_frequency=0.05,
        resample_pool_batches=2,
        log_every=3,
        checkpoint_every=5,
        loss={"regularizer": "combined_hoyer_sqrt", "coefficients": [3e-2, 2e-2]},
    )


def _sae():
    return build_sae(SAEConfig("standard", D_IN, D_SAE, "blocks.0.mlp.hook_post"), seed=5)


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    data = _data()
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = SAETrainer(_sae(), iter(data), _cfg(), checkpoint_dir=full_dir, progress=False)
    full_sae = full.fit()
    assert (
        full.n_resampled_total > 0
    )  # resampling really happened (and its pool draws are replayed on resume)

    first = SAETrainer(_sae(), _killing(data, after=16), _cfg(), checkpoint_dir=cut_dir, progress=False)
    with pytest.raises(Killed):
        first.fit()
    assert first.step < STEPS
    ckpt = torch.load(cut_dir / CHECKPOINT_NAME, weights_only=True)  # no pickle needed to read it
    assert ckpt["step"] == 10

    other_init = build_sae(SAEConfig("standard", D_IN, D_SAE, "blocks.0.mlp.hook_post"), seed=99)
    resumed = SAETrainer(other_init, iter(data), _cfg(), checkpoint_dir=cut_dir, resume=True, progress=False)
    assert resumed.step == 10
    assert resumed.sae.cfg.extra["seed"] == 5  # the checkpoint's weights come from seed 5, not 99
    resumed_sae = resumed.fit()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(resumed_sae, name), getattr(full_sae, name), rtol=1e-6, atol=1e-7)
    full_log = [json.loads(s) for s in (full_dir / METRICS_NAME).read_text().splitlines()]
    cut_log = [json.loads(s) for s in (cut_dir / METRICS_NAME).read_text().splitlines()]
    assert [m["step"] for m in cut_log] == [m["step"] for m in full_log]  # killed part's lines dropped
    assert cut_log[-1]["loss"] == pytest.approx(full_log[-1]["loss"], rel=1e-5)


def test_a_run_killed_before_its_first_checkpoint_resumes_with_one_metrics_line_per_step(tmp_path):
    """Killed after metrics lines but before any checkpoint (or with the checkpoint deleted, as the corrupt-file
    error says to), a resumed run starts at step 0: its log repeated the killed run's steps (found by trying it).
    The resumed log must equal an uninterrupted run's, step for step."""
    data = _data()
    full = tmp_path / "full"
    SAETrainer(_sae(), iter(data), _cfg(), checkpoint_dir=full, progress=False).fit()
    cut = tmp_path / "cut"
    with pytest.raises(Killed):  # log_every 3, checkpoint_every 5: killed at batch 4, after the step-3 line
        SAETrainer(_sae(), _killing(data, after=4), _cfg(), checkpoint_dir=cut, progress=False).fit()
    assert not (cut / CHECKPOINT_NAME).exists() and (cut / METRICS_NAME).read_text().strip()
    SAETrainer(_sae(), iter(data), _cfg(), checkpoint_dir=cut, resume=True, progress=False).fit()
    full_log = [json.loads(s)["step"] for s in (full / METRICS_NAME).read_text().splitlines()]
    cut_log = [json.loads(s)["step"] for s in (cut / METRICS_NAME).read_text().splitlines()]
    assert cut_log == full_log and len(set(cut_log)) == len(cut_log)


def test_resume_refuses_a_checkpoint_of_another_sae(tmp_path):
    SAETrainer(_sae(), iter(_data()), _cfg(), checkpoint_dir=tmp_path, progress=False).fit()
    wider = build_sae(SAEConfig("standard", D_IN, 2 * D_SAE, "blocks.0.mlp.hook_post"))
    with pytest.raises(SAEError, match="d_sae"):
        SAETrainer(wider, iter(_data()), _cfg(), checkpoint_dir=tmp_path, resume=True, progress=False)
    # settings that steer training must match too
    jump = build_sae(SAEConfig("jumprelu", D_IN, D_SAE, "blocks.0.mlp.hook_post", extra={"bandwidth": 0.1}))
    cfg = TrainConfig(batch_size=BATCH, total_steps=2, checkpoint_every=1,
                      loss={"regularizer": "l0", "coefficients": [1e-3]})
    SAETrainer(jump, iter(_data()), cfg, checkpoint_dir=tmp_path / "j", progress=False).fit()
    other = build_sae(SAEConfig("jumprelu", D_IN, D_SAE, "blocks.0.mlp.hook_post", extra={"bandwidth": 0.2}))
    with pytest.raises(SAEError, match=r"extra\['bandwidth'\]=0.1, this run has 0.2"):
        SAETrainer(other, iter(_data()), cfg, checkpoint_dir=tmp_path / "j", resume=True, progress=False)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(SAEError, match="cannot read checkpoint"):
        SAETrainer(_sae(), iter(_data()), _cfg(), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_cli_train_sae_resume_matches_uninterrupted(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from saecircuits.cli import _register, app
    from saecircuits.data.activations import write_activation_cache
    from saecircuits.saes import trainer as trainer_mod
    from saecircuits.saes.io import load_sae

    _register()
    gen = torch.Generator().manual_seed(1)
    chunks = [{"blocks.0.mlp.hook_post": torch.randn(40, D_IN, generator=gen).relu()} for _ in range(6)]
    write_activation_cache(iter(chunks), tmp_path / "cache", shard_rows=80)
    args = [
        "train-sae", "--activation-cache", str(tmp_path / "cache"), "--layer", "0", "--d-sae", str(D_SAE),
        "--steps", "20", "--batch-size", "16", "--lr", "0.01", "--coefficient", "0.01", "--checkpoint-every", "4",
        "--normalize", "--no-progress",
    ]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "full")])
    assert res.exit_code == 0, res.output
    assert "written to" in res.output and str(tmp_path / "full") in res.output

    calls = {"n": 0}
    original = trainer_mod.SAETrainer.train_step

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 11:
            raise Killed("simulated crash")
        return original(self)

    monkeypatch.setattr(trainer_mod.SAETrainer, "train_step", dying)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "cut")])
    assert isinstance(res.exception, Killed)
    monkeypatch.setattr(trainer_mod.SAETrainer, "train_step", original)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "cut")])
    assert res.exit_code != 0 and "--resume" in res.output  # refuses to overwrite a run silently
    # `--out DIR --resume` alone continues the saved job.
    res = runner.invoke(app, ["train-sae", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    a = load_sae(tmp_path / "full" / "blocks.0.mlp.hook_post" / "sae")
    b = load_sae(tmp_path / "cut" / "blocks.0.mlp.hook_post" / "sae")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-7)
    res = runner.invoke(
        app, [*args[:-2], "--lr", "0.5", "--no-progress", "--out", str(tmp_path / "cut"), "--resume"]
    )
    assert res.exit_code != 0 and "different config" in res.output
