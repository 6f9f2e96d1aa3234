"""Progress in a log file is whole lines, about ten per run, never a line of carriage returns (issue 7, item 9)."""

from __future__ import annotations

import io

import torch

from saecircuits.progress import LogProgress, progress_bar


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_one_line_per_tenth_and_a_final_one():
    out, clock = io.StringIO(), _Clock()
    bar = LogProgress(total=95, desc="train SAEs", file=out, clock=clock)
    for _ in range(95):
        clock.t += 0.5
        bar.update(1)
        bar.set_postfix({"b0": "L0 3.0 MSE 0.1"})
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and out.getvalue().endswith("\n")
    # ceil(95 / 10) = 10 units per line: at 10, 20, ..., 90, then the final 95.
    assert [line.split(":")[1].split()[0] for line in lines] == [f"{n}/95" for n in (*range(10, 100, 10), 95)]
    assert lines[0] == "train SAEs: 10/95 (11%), 5 s, 2.0/s, b0: L0 3.0 MSE 0.1"
    assert lines[-1].startswith("train SAEs: 95/95 (100%), 48 s, 2.0/s")


def test_a_slow_run_still_writes_a_line_every_interval():
    out, clock = io.StringIO(), _Clock()
    bar = LogProgress(total=1000, desc="x", file=out, every_s=60, clock=clock)
    for _ in range(5):
        clock.t += 61  # far fewer than a tenth of the steps, but a minute each
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 5


def test_resumed_run_counts_from_its_start_and_iterates():
    out = io.StringIO()
    bar = LogProgress(range(3), total=10, initial=7, desc="r", file=out)
    assert list(bar) == [0, 1, 2]
    assert out.getvalue().splitlines()[-1].startswith("r: 10/10 (100%)")
    silent = io.StringIO()
    LogProgress(total=5, file=silent, disable=True).update(5)
    assert silent.getvalue() == ""


def test_progress_bar_is_tqdm_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(total=3, file=io.StringIO()), LogProgress)
    from tqdm import tqdm

    bar = progress_bar(total=3, file=Tty())
    assert isinstance(bar, tqdm)
    bar.close()


def test_sae_training_log_is_whole_lines(capsys):
    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.registry import build_sae
    from saecircuits.saes.trainer import TrainConfig, train_saes

    gen = torch.Generator().manual_seed(0)
    batches = [{"h": torch.randn(16, 8, generator=gen).relu()} for _ in range(60)]
    sae = build_sae(SAEConfig("standard", 8, 16, "h"), seed=1)
    train_saes(batches, [("h", sae)], TrainConfig(batch_size=16, total_steps=50, log_every=5), progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal, as a log file is not
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train SAEs:")]
    assert len(lines) == 10 and lines[-1].startswith("train SAEs: 50/50 (100%)")
    assert "h: L0 " in lines[-1]


def test_lm_training_log_is_whole_lines(capsys):
    from saecircuits.models.train_lm import LMConfig, build_model, train_model

    cfg = LMConfig(d_model=16, n_heads=2, d_mlp=32, n_ctx=16, window_size=8, steps=20, batch_size=2,
                   n_train_stories=10, n_tokenizer_stories=10, n_heldout_stories=2, vocab_size=300)
    model = build_model(cfg, vocab_size=300)
    rows = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    losses = train_model(model, rows, cfg, progress=True)
    err = capsys.readouterr().err
    assert len(losses) == 20 and "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train-lm:")]
    assert len(lines) == 10 and lines[-1].startswith("train-lm: 20/20 (100%)") and "loss=" in lines[-1]
