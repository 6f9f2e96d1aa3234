"""``saecircuits train-sae``: train SAEs on a model's activations (one pass for all hook points), resumable, DDP-ready.

Configuration: a preset (``--preset 54_serene_plasma``), a JSON file (``--config job.json``, keys of
:class:`saecircuits.saes.presets.TrainSAEJob`, ``train`` = :class:`saecircuits.saes.trainer.TrainConfig`), or flags;
flags override the file/preset. The resolved job is written to ``<out>/train_sae_job.json``.

Outputs under ``--out``: ``<hook_point>/sae/`` (SAELens layout: ``cfg.json`` + ``sae_weights.safetensors``, works on
raw activations), ``<hook_point>/metrics.jsonl``, ``<hook_point>/checkpoint.pt`` (with ``--checkpoint-every``).
``--resume`` continues a killed run from its checkpoints and ends with the same weights as an uninterrupted run.

Precision: fp32 by default; ``--autocast bfloat16`` runs the SAE forward/loss under bf16 autocast (GPU tensor
cores), ``--activation-dtype bfloat16`` stores activations in bf16 as the reference notebook did.

Several GPUs / machines (PyTorch DDP; every rank reads its own shard of token rows, rank 0 writes)::

    torchrun --nproc_per_node=8 --no-python saecircuits train-sae --config job.json --out runs/x
    # two machines, 8 GPUs each (run on both, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST0 --master_port=29500 --nproc_per_node=8 \\
        --no-python saecircuits train-sae --config job.json --out /shared/runs/x

``--batch-size`` is the GLOBAL batch (tokens per step over all ranks). NCCL is used on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from saecircuits.cli import InputError, SaeCommand, app, check_threads, num, user_errors
from saecircuits.display import percent

logger = logging.getLogger(__name__)

JOB_FILE = "train_sae_job.json"


def _setup_distributed(device: str) -> tuple[int, int, str]:
    """Initialise torch.distributed under torchrun; returns (rank, world_size, device of this rank)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    return rank, world, device


# Shown defaults are TrainSAEJob's and TrainConfig's (saes/presets.py, saes/trainer.py); importing them here would
# load torch for every --help. tests/cli/test_cli_help.py checks that they agree.
@app.command("train-sae", cls=SaeCommand, short_help="Train SAEs on a model's activations (resumable, DDP).")
def train_sae_command(
    out: Annotated[Path, typer.Option(
        "--out", metavar="DIR", help="Output folder (SAEs, metrics, checkpoints).")],
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE", show_default="none", help="JSON job file (TrainSAEJob keys).")] = None,
    preset_name: Annotated[str | None, typer.Option(
        "--preset", metavar="NAME", show_default="none",
        help="54_serene_plasma or 189_giddy_water: the reference notebook's two SAEs.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", metavar="NAME|DIR|FILE", show_default="none",
        help="Hub name, Hugging Face folder, llama2.c .bin, or 'default' (the embedded model).")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", metavar="FILE", show_default="none",
        help="Corpus: text (<|endoftext|> or blank-line separated), JSONL with 'text', or Parquet.")] = None,
    activation_cache: Annotated[Path | None, typer.Option(
        "--activation-cache", metavar="DIR", show_default="none",
        help="Train from a saved activation cache instead of running the model.")] = None,
    hook_point: Annotated[list[str] | None, typer.Option(
        "--hook-point", metavar="NAME", show_default="blocks.0.mlp.hook_post",
        help="TransformerLens hook name (repeatable).")] = None,
    layer: Annotated[list[int] | None, typer.Option(
        "--layer", metavar="L", show_default="none", help="Shorthand for --hook-point blocks.L.mlp.hook_post.")] = None,
    architecture: Annotated[str | None, typer.Option(
        "--architecture", metavar="NAME", show_default="standard",
        help="SAE architecture: standard, topk, batchtopk or jumprelu.")] = None,
    expansion_factor: Annotated[int | None, typer.Option(
        "--expansion-factor", metavar="N", min=1, show_default="4", help="d_sae = expansion_factor * d_in.")] = None,
    d_sae: Annotated[int | None, typer.Option(
        "--d-sae", metavar="N", min=1, show_default="from --expansion-factor",
        help="Number of features (overrides --expansion-factor).")] = None,
    k: Annotated[int | None, typer.Option(
        "--k", metavar="N", min=1, show_default="none",
        help="Active features per token; needed by topk and batchtopk.")] = None,
    regularizer: Annotated[str | None, typer.Option(
        "--regularizer", metavar="NAME", show_default="l1: none + AuxK for topk and batchtopk",
        help="Sparsity penalty: none, l1, sqrt, pure_sqrt, hoyer_square, combined_hoyer_l1, "
             "combined_hoyer_sqrt or l0 (topk and batchtopk take none: k sets their sparsity).")] = None,
    coefficient: Annotated[list[float] | None, typer.Option(
        "--coefficient", metavar="X", show_default="0.001",
        help="Penalty coefficient (repeat for the two of a combined_* regularizer).")] = None,
    batch_reduction: Annotated[str | None, typer.Option(
        "--batch-reduction", metavar="mean|sum", show_default="mean",
        help="Penalty mean (per token) or sum over the batch.")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", metavar="N", min=1, show_default="1000", help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", metavar="N", min=1, show_default="4096", help="Tokens per step (global).")] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", metavar="X", show_default="0.0001: 0.01 for topk and batchtopk, as run's SAEs",
        help="Peak learning rate (AdamW).")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", metavar="N", min=0, show_default="47", help="Seed of initialisation and resampling.")] = None,
    seq_len: Annotated[int | None, typer.Option(
        "--seq-len", metavar="N", min=2, show_default="128", help="Tokens per packed row, BOS included.")] = None,
    bos_policy: Annotated[str | None, typer.Option(
        "--bos-policy", metavar="include|exclude|exclude_first", show_default="exclude",
        help="Which BOS positions train the SAE (exclude_first: only the row's leading one is dropped).")] = None,
    max_documents: Annotated[int | None, typer.Option(
        "--max-documents", metavar="N", min=1, show_default="all", help="Use only the first N documents.")] = None,
    normalize: Annotated[bool | None, typer.Option(
        "--normalize/--no-normalize", show_default="no-normalize: normalize for topk and batchtopk, as run's SAEs",
        help="Scale activations to mean norm sqrt(d_in) while training (folded into the saved SAE).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        "--checkpoint-every", metavar="N", min=0, show_default="0: only at the end",
        help="Steps between checkpoints.")] = None,
    log_every: Annotated[int | None, typer.Option(
        "--log-every", metavar="N", min=1, show_default="10", help="Steps between metrics lines.")] = None,
    autocast: Annotated[str | None, typer.Option(
        "--autocast", metavar="bfloat16", show_default="none: fp32",
        help="Autocast dtype of the SAE forward and loss.")] = None,
    activation_dtype: Annotated[str | None, typer.Option(
        "--activation-dtype", metavar="float32|bfloat16", show_default="float32",
        help="Storage dtype of the activations.")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", metavar="DEVICE", show_default="cpu", help="cpu, cuda, cuda:1, ...")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", show_default="off", help="Continue a killed run from <out>'s checkpoints.")] = False,
    wandb: Annotated[bool, typer.Option(
        "--wandb", show_default="off", help="Also log to Weights & Biases (pip extra 'wandb').")] = False,
    wandb_project: Annotated[str, typer.Option(
        "--wandb-project", metavar="NAME", help="Weights & Biases project.")] = "saecircuits-sae",
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N", min=1, show_default="torch's default",
        help="torch.set_num_threads for this run.")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Show training progress (plain lines when not on a terminal).")] = True,
) -> None:
    """Train SAEs on a model's activations and print where each SAE was written.

    A setting not given on the command line comes from --config, --preset or (with --resume) the saved job, else
    from the default shown.
    """
    import dataclasses

    import torch

    from saecircuits.saes.base import SAEError
    from saecircuits.saes.presets import TrainSAEJob, preset

    with user_errors():
        try:
            if config is not None and preset_name is not None:
                raise SAEError("give --config or --preset, not both")
            saved_job = out / JOB_FILE
            # train settings the user chose (file or flags); the others may take the architecture's defaults
            chosen: set[str] = set()
            if config is not None:
                job = TrainSAEJob.from_json(config)
                chosen |= set(json.loads(Path(config).read_text()).get("train") or {})
            elif resume and saved_job.is_file():
                # `--out DIR --resume` alone continues the saved job; flags given with it must still match it.
                job = TrainSAEJob.from_json(saved_job)
                chosen |= set(job.train.to_dict())
            elif preset_name is not None:
                job = preset(preset_name)
                chosen |= set(job.train.to_dict())
            else:
                job = TrainSAEJob()
            chosen |= {key for key, val in (("lr", lr), ("normalize_activations", normalize)) if val is not None}
            if regularizer is not None or coefficient or batch_reduction is not None:
                chosen.add("loss")
            top = {
                "model": model,
                "data": str(data) if data is not None else None,
                "activation_cache": str(activation_cache) if activation_cache is not None else None,
                "architecture": architecture,
                "expansion_factor": expansion_factor,
                "d_sae": d_sae,
                "seq_len": seq_len,
                "bos_policy": bos_policy,
                "max_documents": max_documents,
                "activation_dtype": activation_dtype,
                "device": device,
            }
            hooks = list(hook_point or []) + [f"blocks.{L}.mlp.hook_post" for L in (layer or [])]
            if hooks:
                top["hook_points"] = hooks
            job_d = job.to_dict()
            job_d.update({kk: v for kk, v in top.items() if v is not None})
            if k is not None:
                job_d["sae_extra"] = {**job_d["sae_extra"], "k": k}
            tr = job_d["train"]
            loss = dict(tr["loss"])
            if regularizer is not None:
                loss["regularizer"] = regularizer
            if coefficient:
                loss["coefficients"] = list(coefficient)
            if batch_reduction is not None:
                loss["batch_reduction"] = batch_reduction
            tr["loss"] = loss
            for key, val in {
                "total_steps": steps,
                "batch_size": batch_size,
                "lr": lr,
                "seed": seed,
                "normalize_activations": normalize,
                "checkpoint_every": checkpoint_every,
                "log_every": log_every,
                "autocast_dtype": autocast,
                "device": job_d["device"],
            }.items():
                if val is not None:
                    tr[key] = val
            _architecture_defaults(job_d, chosen)
            job = TrainSAEJob.from_dict(job_d)
            job.train.loss_config()  # validate the loss now, not after loading the model
            _check_job_inputs(job)
        except TypeError as err:  # a JSON value of the wrong type (e.g. "steps": "ten")
            raise SAEError(f"a train-sae setting has the wrong type ({err}); check the --config file") from err

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
    rank, world, dev = _setup_distributed(job.device)
    if dev != job.device:
        job.train = dataclasses.replace(job.train, device=dev)

    created_out = not out.exists()
    with user_errors():
        from saecircuits.pipeline.outputs import make_out_folder

        make_out_folder(out)
    job_path = out / JOB_FILE
    fresh = not job_path.exists()
    if not fresh:
        saved = json.loads(job_path.read_text())
        mine = json.loads(json.dumps(job.to_dict()))
        if not resume:
            raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        saved["train"].pop("device", None), mine["train"].pop("device", None)
        saved.pop("device", None), mine.pop("device", None)
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise InputError(f"--resume with a different config than the saved run ({', '.join(diff)} differ)")
    elif rank == 0:
        from saecircuits.atomic import atomic_write_text

        atomic_write_text(job_path, json.dumps(job.to_dict(), indent=1))

    wandb_run = None
    if wandb and rank == 0:
        try:
            import wandb as wandb_lib
        except ImportError as err:
            raise InputError("--wandb needs the optional extra: pip install 'saecircuits[wandb]'") from err
        wandb_run = wandb_lib.init(project=wandb_project, config=job.to_dict(), resume="allow")

    try:
        with user_errors():
            saes = _run(job, out, resume=resume, progress=progress, rank=rank, world=world, wandb_run=wandb_run)
    except InputError:
        if fresh and rank == 0:  # refused before training (e.g. an unknown hook point): leave no half-made run
            _remove_unstarted_run(out, created_out)
        raise
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if rank == 0:
        evals = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
        for name, sae in saes.items():
            typer.echo(
                f"SAE for {name} (d_in {sae.d_in}, d_sae {sae.d_sae}) written to {out / _folder(name) / 'sae'}"
            )
            if name in evals:
                e = evals[name]
                typer.echo(f"  held-out: {_eval_line(e)}")
    if world > 1:
        torch.distributed.barrier()


def _architecture_defaults(job_d: dict, chosen: set[str]) -> None:
    """A TopK or BatchTopK job (``job_d``, :meth:`TrainSAEJob.to_dict`) gets the pipeline's TopK settings for what the
    user did not choose (``chosen``: train keys from the file or flags): no penalty plus AuxK, the recipe's learning
    rate and activation normalisation (:func:`saecircuits.saes.presets.pipeline_recipe`), so the job records only
    what is applied. A sparsity penalty chosen for them is refused: it would not be applied.

    Raises:
        SAEError: a TopK/BatchTopK job with a penalty regularizer, naming the fix.
    """
    from saecircuits.saes.base import SAEError
    from saecircuits.saes.presets import TOPK_LR, topk_loss
    from saecircuits.saes.registry import get_architecture

    try:
        cls = get_architecture(job_d["architecture"])
    except SAEError:
        return  # reported by the dry build in _check_job_inputs
    if cls.uses_sparsity_penalty:
        return
    tr = job_d["train"]
    if "loss" not in chosen:
        tr["loss"] = topk_loss()
    elif tr["loss"].get("regularizer", "l1") != "none":
        raise SAEError(
            f"a {job_d['architecture']} SAE gets its sparsity from --k, so the {tr['loss'].get('regularizer', 'l1')} "
            "penalty would not be applied; drop --regularizer/--coefficient (or set the regularizer to none)"
        )
    if "lr" not in chosen:
        tr["lr"] = TOPK_LR
    if "normalize_activations" not in chosen:
        tr["normalize_activations"] = True


def _eval_line(e: dict) -> str:
    """The held-out evaluation in one line; an undefined loss recovered is said so, with its reason."""
    lr, ci = e.get("loss_recovered"), e.get("loss_recovered_ci95") or [None, None]
    if lr is None:
        recovered = f"loss recovered over whole sequences undefined: {e.get('loss_recovered_undefined_reason')}"
    else:
        bounds = f" [{num(ci[0], '.3f')}, {num(ci[1], '.3f')}]" if None not in ci else ""
        recovered = f"loss recovered over whole sequences {num(lr, '.3f')}{bounds}"
    ev = e.get("explained_variance")
    dead = (f", dead features {e['n_dead_on_eval']} of {e['d_sae']} ({percent(e['dead_fraction_on_eval'], 1)} "
            "fired on none "
            f"of {e['n_eval_tokens']} tokens)" if "n_dead_on_eval" in e else "")
    return (f"L0 {num(e['l0'], '.1f')}, explained variance {'undefined' if ev is None else num(ev, '.3f')}{dead}, "
            f"{recovered} (CE clean {num(e['ce_clean'], '.3f')} / SAE {num(e['ce_spliced'], '.3f')} / zero "
            f"{num(e['ce_zero'], '.3f')} nats)")


def _check_job_inputs(job) -> None:
    """What can be checked before the model is loaded or ``--out`` is created: the device, the input files and the
    SAE settings (a dry build of each SAE with d_in=1 catches an unknown architecture or a missing ``--k``).

    Raises:
        SAEError, PipelineError: naming the setting and the fix.
    """
    from saecircuits.models.load import looks_like_path
    from saecircuits.pipeline import check_device
    from saecircuits.saes.base import SAEConfig, SAEError
    from saecircuits.saes.registry import build_sae

    check_device(job.device)
    if job.activation_cache:
        manifest = Path(job.activation_cache) / "manifest.json"
        if not manifest.is_file():
            raise SAEError(f"--activation-cache {job.activation_cache}: no manifest.json; give a folder written "
                           "by saecircuits.data.activations.write_activation_cache")
        cached = json.loads(manifest.read_text()).get("hook_points", {})
        missing = [hp for hp in job.hook_points if hp not in cached]
        if missing:
            raise SAEError(f"the activation cache has no {missing}; it holds {sorted(cached)}")
    else:
        if not job.model or not job.data:
            raise SAEError("give --model and --data (or --activation-cache, or a --config/--preset that sets them)")
        if looks_like_path(job.model) and not Path(job.model).expanduser().exists():
            raise SAEError(f"--model {job.model}: no such file or folder")
        if not Path(job.data).expanduser().exists():
            raise SAEError(f"--data {job.data}: no such file or folder")
    k = job.sae_extra.get("k")
    d_sae = job.d_sae or max(job.expansion_factor, k if isinstance(k, int) and k > 0 else 1)
    sae = build_sae(SAEConfig(job.architecture, 1, d_sae, job.hook_points[0], extra=dict(job.sae_extra)),
                    initialize=False)
    if k is not None and not hasattr(sae, "k"):  # it was recorded in cfg.json and silently not applied
        raise SAEError(f"k={k} does nothing for a {job.architecture} SAE (topk and batchtopk take k): drop --k "
                       "(or 'k' from the config's sae_extra), or choose --architecture topk")


def _check_hook_points(bridge, hook_points: list[str]) -> None:
    from saecircuits.models.hooks import unknown_hook_message, unknown_hooks
    from saecircuits.saes.base import SAEError

    unknown = unknown_hooks(bridge, hook_points)
    if unknown:
        raise SAEError(unknown_hook_message(bridge, unknown, "set it with --hook-point NAME (or --layer L for "
                                                            "blocks.L.mlp.hook_post)"))


def _remove_unstarted_run(out: Path, created_out: bool) -> None:
    """Delete the job file of a run that never trained (and ``out`` itself if this command created it and it is now
    empty), so that the corrected command is not refused with "already holds a run"."""
    if any(p.name != JOB_FILE for p in out.iterdir()):
        return
    (out / JOB_FILE).unlink(missing_ok=True)
    if created_out:
        out.rmdir()


def _folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _run(job, out: Path, *, resume: bool, progress: bool, rank: int, world: int, wandb_run) -> dict:
    import torch

    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.registry import build_sae
    from saecircuits.saes.trainer import train_saes, train_saes_on_model

    act_dtype = getattr(torch, job.activation_dtype)
    local_batch = job.train.batch_size // world
    buffer = job.buffer_size or 16 * local_batch
    if job.activation_cache:
        from saecircuits.data.activations import iter_activation_cache, shuffled_batches

        manifest = json.loads((Path(job.activation_cache) / "manifest.json").read_text())
        chunks = iter_activation_cache(
            job.activation_cache, job.hook_points, rank=rank, world_size=world, epochs=None
        )
        batches = shuffled_batches(
            chunks, local_batch, buffer_size=max(buffer, 2 * local_batch), seed=job.train.seed
        )
        saes = []
        for hp in job.hook_points:
            d_in = int(manifest["hook_points"][hp]["d_in"])
            cfg = SAEConfig(
                job.architecture,
                d_in,
                job.d_sae or job.expansion_factor * d_in,
                hp,
                model_name=job.model,
                extra=dict(job.sae_extra),
            )
            saes.append((hp, build_sae(cfg)))
        return train_saes(
            batches, saes, job.train, output_dir=out, resume=resume, progress=progress, wandb_run=wandb_run
        )

    from saecircuits.data.activations import pack_token_rows
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model
    from saecircuits.models.tokens import encode_documents, special_token_ids

    bridge = load_model(job.model, device=job.train.device)
    _check_hook_points(bridge, job.hook_points)
    tok = bridge.tokenizer
    bos_id = tok.bos_token_id  # None for a tokenizer without BOS: rows then get no separator
    special = special_token_ids(tok)  # what bos_policy "exclude" leaves out: BOS/EOS/PAD anywhere in a row
    docs = encode_documents(tok, read_documents(job.data)[: job.max_documents], prepend_bos=False)
    seq_len = min(job.seq_len, int(bridge.cfg.n_ctx))
    rows = pack_token_rows(docs, seq_len, bos_id, shuffle_seed=job.train.seed)
    # Hold out a few rows for the after-training evaluation (sequence-level loss recovered).
    n_eval = min(32, rows.shape[0] // 10)
    eval_rows, rows = rows[:n_eval], rows[n_eval:]
    d_in_probe = None
    sae_cfgs = None
    if job.d_sae is not None or job.sae_extra or job.architecture != "standard":
        _, cache = bridge.run_with_cache(
            rows[:1].to(job.train.device), names_filter=lambda n: n in job.hook_points
        )
        d_in_probe = {hp: int(cache[hp].shape[-1]) for hp in job.hook_points}
        sae_cfgs = [
            SAEConfig(
                job.architecture,
                d_in_probe[hp],
                job.d_sae or job.expansion_factor * d_in_probe[hp],
                hp,
                model_name=job.model,
                extra=dict(job.sae_extra),
            )
            for hp in job.hook_points
        ]
    saes = train_saes_on_model(
        bridge,
        rows,
        job.hook_points,
        job.train,
        sae_cfgs,
        expansion_factor=job.expansion_factor,
        architecture=job.architecture,
        bos_id=special,
        bos_policy=job.bos_policy,
        model_batch_rows=job.model_batch_rows,
        buffer_size=buffer,
        activation_dtype=act_dtype,
        output_dir=out,
        resume=resume,
        progress=progress,
        model_name=job.model,
        wandb_run=wandb_run,
    )
    if rank == 0 and n_eval > 0:
        _evaluate(bridge, saes, eval_rows, special, job.bos_policy, out)
    return saes


def _evaluate(bridge, saes: dict, eval_rows, bos_id, bos_policy: str, out: Path) -> None:
    """After training, on held-out ``eval_rows [n, seq]``: loss recovered over whole sequences, L0, explained variance and shrinkage on their
    activations; written to ``out/eval.json`` (issue: metrics after training)."""
    import torch

    from saecircuits.analysis.quality.reconstruction import sequence_loss_recovered
    from saecircuits.atomic import atomic_write_text
    from saecircuits.data.activations import bos_keep_mask
    from saecircuits.report.schema import to_jsonable
    from saecircuits.saes.metrics import dead_fraction, explained_variance, l0, shrinkage

    tokens = eval_rows.to(next(iter(saes.values())).W_dec.device)
    seq = sequence_loss_recovered(bridge, saes, tokens, bos_id=bos_id, bos_policy=bos_policy)
    keep = bos_keep_mask(eval_rows, bos_id, bos_policy).reshape(-1)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in {s.hook_point for s in saes.values()})
    report = {}
    for name, sae in saes.items():
        x = cache[sae.hook_point].reshape(-1, sae.d_in)[keep.to(tokens.device)].float()
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f)
        counts = (f > 0).sum(0)
        report[name] = {
            **seq[name],
            "l0": float(l0(f)),
            "explained_variance": float(explained_variance(x, x_hat)),
            "shrinkage": float(shrinkage(x, x_hat)),
            "dead_fraction_on_eval": float(dead_fraction(counts, x.shape[0])),
            "n_dead_on_eval": int((counts == 0).sum()),
            "d_sae": int(sae.d_sae),
            "n_eval_tokens": int(x.shape[0]),
        }
        logger.debug("%s: %s", name, report[name])  # the console says it in words; eval.json has it all
    # NaN (an undefined loss recovered) is written as null: JSON has no NaN
    atomic_write_text(out / "eval.json", json.dumps(to_jsonable(report), indent=1, allow_nan=False))
