"""``saecircuits train-lm``: train the small GPT-Neo on generated dialogue stories (the embedded default)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from saecircuits.cli import InputError, SaeCommand, app, check_threads, user_errors


# Shown defaults are LMConfig's (models/train_lm.py); importing it here would load torch for every --help.
# tests/cli/test_cli_help.py checks that they agree.
@app.command("train-lm", cls=SaeCommand, short_help="Train the small default GPT-Neo on generated stories.")
def train_lm_command(
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="DIR", show_default="none",
        help="Folder to write the model to (must not exist unless --overwrite).")] = None,
    workspace: Annotated[Path | None, typer.Option(
        "--workspace", metavar="DIR", show_default="none",
        help="Instead of --out: use/fill the cache folder <workspace>/models/default-<hash>.")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", metavar="N", min=1, show_default="500", help="Optimiser steps.")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", metavar="N", min=0, show_default="0", help="Seed of initialisation and batch order.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", metavar="N", min=1, show_default="32", help="Rows of n_ctx tokens per step.")] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", metavar="X", show_default="0.003", help="Peak learning rate.")] = None,
    d_model: Annotated[int | None, typer.Option(
        "--d-model", metavar="N", min=1, show_default="128", help="Residual stream width.")] = None,
    n_heads: Annotated[int | None, typer.Option(
        "--n-heads", metavar="N", min=1, show_default="4", help="Attention heads (must divide --d-model).")] = None,
    d_mlp: Annotated[int | None, typer.Option(
        "--d-mlp", metavar="N", min=1, show_default="512", help="MLP hidden width.")] = None,
    n_ctx: Annotated[int | None, typer.Option(
        "--n-ctx", metavar="N", min=2, show_default="256", help="Learned positions = training row length.")] = None,
    vocab_size: Annotated[int | None, typer.Option(
        "--vocab-size", metavar="N", min=300, show_default="2048",
        help="BPE vocabulary size (upper bound).")] = None,
    n_train_stories: Annotated[int | None, typer.Option(
        "--n-train-stories", metavar="N", min=1, show_default="20000", help="Generated training stories.")] = None,
    n_heldout_stories: Annotated[int | None, typer.Option(
        "--n-heldout-stories", metavar="N", min=1, show_default="600",
        help="Generated held-out stories (another seed).")] = None,
    n_tokenizer_stories: Annotated[int | None, typer.Option(
        "--n-tokenizer-stories", metavar="N", min=1, show_default="4000",
        help="Training stories the BPE tokenizer is trained on.")] = None,
    window_size: Annotated[int | None, typer.Option(
        "--window-size", metavar="N", min=1, show_default="128",
        help="Local attention window of layer 1.")] = None,
    threads: Annotated[int, typer.Option(
        "--threads", metavar="N", min=1, help="torch.set_num_threads for this run.")] = 1,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", show_default="off", help="Replace an existing --out folder.")] = False,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Show training progress (plain lines when not on a terminal).")] = True,
) -> None:
    """Train the 2-layer GPT-Neo of the default recipe (with any field overridden) and report its losses."""
    import torch

    from saecircuits.models.default import DEFAULT_CONFIG, ensure_default_model
    from saecircuits.models.train_lm import read_train_info, train_lm_to_folder

    if (out is None) == (workspace is None):
        raise InputError("give exactly one of --out DIR or --workspace DIR")
    overrides = {k: v for k, v in dict(
        steps=steps, seed=seed, batch_size=batch_size, lr=lr, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp,
        n_ctx=n_ctx, vocab_size=vocab_size, n_train_stories=n_train_stories, n_heldout_stories=n_heldout_stories,
        n_tokenizer_stories=n_tokenizer_stories, window_size=window_size,
    ).items() if v is not None}
    with user_errors():
        cfg = dataclasses.replace(DEFAULT_CONFIG, **overrides)
        if out is not None and out.exists() and not out.is_dir():  # --overwrite would not replace a file either
            raise FileExistsError(f"--out {out} is a file; give a folder name for the model")
        if out is not None and out.exists() and not overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
        if out is not None:
            from saecircuits.pipeline.outputs import check_out_writable

            check_out_writable(out)  # before the training, not after it
        if workspace is not None and workspace.exists() and not workspace.is_dir():
            raise NotADirectoryError(f"--workspace {workspace} is a file; give a folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_threads(threads)
    torch.set_num_threads(threads)
    with user_errors():
        if out is not None:
            folder = train_lm_to_folder(out, cfg, progress=progress, overwrite=overwrite)
        else:
            folder = ensure_default_model(workspace, cfg, progress=progress)
    info = read_train_info(folder)
    summary = {k: info[k] for k in ("config_hash", "steps", "tokens_seen", "train_wall_s", "total_wall_s",
                                    "final_train_loss", "heldout_loss", "closing_quote")}
    typer.echo(f"model folder: {folder}")
    typer.echo(json.dumps(summary, indent=1))
