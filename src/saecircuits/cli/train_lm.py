"""``saecircuits train-lm``: train the small GPT-Neo on generated dialogue stories (the embedded default)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from saecircuits.cli import app


@app.command("train-lm")
def train_lm_command(
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder to write the model to (must not exist unless --overwrite).")] = None,
    workspace: Annotated[Path | None, typer.Option(
        "--workspace", help="Instead of --out: use/fill the cache folder <workspace>/models/default-<hash>.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimiser steps.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of initialisation and batch order.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Rows of n_ctx tokens per step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    d_model: Annotated[int | None, typer.Option("--d-model")] = None,
    n_heads: Annotated[int | None, typer.Option("--n-heads")] = None,
    d_mlp: Annotated[int | None, typer.Option("--d-mlp")] = None,
    n_ctx: Annotated[int | None, typer.Option("--n-ctx", help="Learned positions = training row length.")] = None,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", help="BPE vocabulary size (upper bound).")] = None,
    n_train_stories: Annotated[int | None, typer.Option("--n-train-stories")] = None,
    n_heldout_stories: Annotated[int | None, typer.Option("--n-heldout-stories")] = None,
    n_tokenizer_stories: Annotated[int | None, typer.Option("--n-tokenizer-stories")] = None,
    window_size: Annotated[int | None, typer.Option("--window-size", help="Local attention window of layer 1.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="torch.set_num_threads for this run.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train the 2-layer GPT-Neo of the default recipe (with any field overridden) and report its losses."""
    import torch

    from saecircuits.models.default import DEFAULT_CONFIG, ensure_default_model
    from saecircuits.models.train_lm import TrainLMError, read_train_info, train_lm_to_folder

    if (out is None) == (workspace is None):
        raise typer.BadParameter("give exactly one of --out DIR or --workspace DIR")
    overrides = {k: v for k, v in dict(
        steps=steps, seed=seed, batch_size=batch_size, lr=lr, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp,
        n_ctx=n_ctx, vocab_size=vocab_size, n_train_stories=n_train_stories, n_heldout_stories=n_heldout_stories,
        n_tokenizer_stories=n_tokenizer_stories, window_size=window_size,
    ).items() if v is not None}
    try:
        cfg = dataclasses.replace(DEFAULT_CONFIG, **overrides)
    except TrainLMError as e:
        raise typer.BadParameter(str(e)) from e
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(threads)
    try:
        if out is not None:
            folder = train_lm_to_folder(out, cfg, progress=progress, overwrite=overwrite)
        else:
            folder = ensure_default_model(workspace, cfg, progress=progress)
    except (FileExistsError, TrainLMError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    info = read_train_info(folder)
    summary = {k: info[k] for k in ("config_hash", "steps", "tokens_seen", "train_wall_s", "total_wall_s",
                                    "final_train_loss", "heldout_loss", "closing_quote")}
    typer.echo(f"model folder: {folder}")
    typer.echo(json.dumps(summary, indent=1))
