"""`--help` of every command at 80 columns (a common terminal, and any pipe): every option name, choice and default
is there whole, flags take no value, and the defaults shown are the library's defaults (issue 7, item 9)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
from typer.testing import CliRunner

from saecircuits.cli import _register, app

WIDTH = 80


def _commands() -> dict:
    _register()
    return typer.main.get_command(app).commands


def _help(name: str, width: int = WIDTH) -> str:
    res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": str(width)}, terminal_width=width)
    assert res.exit_code == 0, res.output
    return res.output


def _whole(word: str, text: str) -> bool:
    """``word`` appears in ``text`` not glued to other word characters or hyphens (so not cut, not part of another)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _option_blocks(text: str) -> dict[str, tuple[str, str]]:
    """Each option's help entry as (its first column: names and value placeholder, the whole entry with its lines
    joined by single spaces), keyed by every option name it lists."""
    entries: list[list[str]] = []
    current: list[str] | None = None
    for line in text.split("\nOptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    blocks: dict[str, tuple[str, str]] = {}
    for entry in entries:
        first_col = entry[0].strip().split("  ")[0]
        joined = " ".join(" ".join(entry).split())
        for name in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", first_col):
            blocks.setdefault(name, (first_col, joined))
    return blocks


def _default_shown(block: str) -> str:
    m = re.search(r"\[default: (.*?)(?:; x[<>]=?[\d.]+)?\]", block)
    assert m, f"no default shown in: {block}"
    return m.group(1)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_at_80_columns_shows_every_option_whole_with_its_default(name):
    cmd = _commands()[name]
    text = _help(name)
    assert "…" not in text and "\r" not in text
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
    # flags take no value: no <bool>/BOOLEAN metavar anywhere
    assert not re.search(r"<bool>|BOOLEAN", text), text
    blocks = _option_blocks(text)
    for param in cmd.params:
        if param.param_type_name == "argument":
            assert _whole(param.metavar or param.name.upper(), text), param.name
            continue
        for opt in [*param.opts, *param.secondary_opts]:
            assert _whole(opt, text), f"{name}: {opt} is not shown whole at {WIDTH} columns"
        if param.name == "help":
            continue
        first_col, block = blocks[param.opts[0]]
        if not param.required:
            _default_shown(block)  # every optional option shows its default
        if getattr(param, "is_flag", False):
            # a flag lists only its names, no value placeholder: "-v, --verbose", "--fold-ln / --no-fold-ln"
            assert all(tok.startswith("-") for tok in re.split(r", | / ", first_col)), first_col


def test_root_help_lists_every_command_with_an_uncut_summary():
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH)
    assert res.exit_code == 0
    commands = res.output.split("\nCommands:\n", 1)[1]
    assert "..." not in commands and "…" not in res.output
    assert max(len(line) for line in res.output.splitlines()) <= WIDTH
    for name in _commands():
        assert _whole(name, commands), name


def test_help_keeps_hyphenated_words_whole_even_when_narrow():
    # At 60 columns the help column is 26 wide; hyphenated names and defaults still never split at a hyphen.
    text = _help("run", width=60)
    for word in ("--center-writing-weights", "--no-center-writing-weights", "center-writing-weights",
                 "closing-quote", "--expansion-factor", "blank-line"):
        assert _whole(word, text), word


def test_train_sae_help_lists_every_choice_whole():
    from saecircuits.saes.losses import REGULARIZERS
    from saecircuits.saes.presets import PRESETS
    from saecircuits.saes.registry import trainable_architectures

    text = _help("train-sae")
    choices = [*trainable_architectures(), *REGULARIZERS, *PRESETS, "include", "exclude", "exclude_first", "mean", "sum",
               "bfloat16", "float32"]
    missing = [c for c in choices if not _whole(c, text)]
    assert not missing, missing


def test_shown_defaults_are_the_library_defaults():
    from saecircuits.models.train_lm import LMConfig
    from saecircuits.pipeline import RunConfig
    from saecircuits.saes.losses import LossConfig
    from saecircuits.saes.presets import TrainSAEJob
    from saecircuits.saes.trainer import TrainConfig

    lm = LMConfig()
    blocks = _option_blocks(_help("train-lm"))
    for field in ("steps", "seed", "batch_size", "lr", "d_model", "n_heads", "d_mlp", "n_ctx", "vocab_size",
                  "n_train_stories", "n_heldout_stories", "n_tokenizer_stories", "window_size"):
        flag = "--" + field.replace("_", "-")
        assert _default_shown(blocks[flag][1]) == str(getattr(lm, field)), flag

    job, tr, loss = TrainSAEJob(), TrainConfig(), LossConfig()
    expected = {
        "--hook-point": job.hook_points[0], "--architecture": job.architecture,
        "--expansion-factor": job.expansion_factor, "--regularizer": tr.loss["regularizer"],
        "--coefficient": tr.loss["coefficients"][0], "--batch-reduction": loss.batch_reduction,
        "--steps": tr.total_steps, "--batch-size": tr.batch_size, "--lr": tr.lr, "--seed": tr.seed,
        "--seq-len": job.seq_len, "--bos-policy": job.bos_policy, "--log-every": tr.log_every,
        "--checkpoint-every": tr.checkpoint_every, "--activation-dtype": job.activation_dtype,
        "--device": job.device,
        "--normalize": "normalize" if tr.normalize_activations else "no-normalize",
    }
    blocks = _option_blocks(_help("train-sae"))
    for flag, value in expected.items():
        assert _default_shown(blocks[flag][1]).split(":")[0] == str(value), flag
    assert tr.autocast_dtype is None and "none" in _default_shown(blocks["--autocast"][1])
    from saecircuits.saes.presets import TOPK_LR

    assert f"{TOPK_LR} for topk and batchtopk" in _default_shown(blocks["--lr"][1])

    run_defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    blocks = _option_blocks(_help("run"))
    for field in ("task", "sae_tokens", "sae_recipe", "sae_k", "l1_coefficient", "max_prompts",
                  "device", "seed"):
        flag = "--" + field.replace("_", "-")
        assert _default_shown(blocks[flag][1]) == str(run_defaults[field]), flag
    from saecircuits.saes.presets import DEFAULT_EXPANSION_FACTOR, MIN_D_SAE

    assert run_defaults["expansion_factor"] is None  # the rule of pipeline_d_sae, shown as such
    assert _default_shown(blocks["--expansion-factor"][1]).startswith(
        f"max({DEFAULT_EXPANSION_FACTOR} x d_in, {MIN_D_SAE})")
    for switch in ("fold_ln", "center_writing_weights", "center_unembed"):
        flag = "--" + switch.replace("_", "-")
        assert _default_shown(blocks[flag][1]) == (flag[2:] if run_defaults[switch] else "no-" + flag[2:])
    assert run_defaults["exclude_bos"] is True and _default_shown(blocks["--include-bos"][1]) == "off"


def test_task_help_shows_the_jsonl_line_with_anchors_and_position_circuit_is_documented():
    blocks = _option_blocks(_help("run"))
    task = blocks["--task"][1]
    for text in ('{"prompt": ..., "answer": ...}', '"anchors": {"name": char_offset}', "distance from P"):
        assert text in task, (text, task)
    for name in ("run", "demo"):
        entry = _option_blocks(_help(name))["--no-position-circuit"][1]
        assert "circuit.json" in entry and "answer position" in entry, entry
