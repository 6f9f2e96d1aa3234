"""Stage ``saes``: the SAEs the run analyses (given with ``--sae``, or trained, or reused from the workspace cache),
each checked to fit the model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import saecircuits
from saecircuits.atomic import remove_dead_temps
from saecircuits.pipeline.config import HOOK_TEMPLATE, PipelineError, RunConfig, source_digest
from saecircuits.pipeline.stages import RunContext, Stage

if TYPE_CHECKING:
    from saecircuits.saes.trainer import TrainConfig

logger = logging.getLogger(__name__)


def _check_sae_fits(sae, model):
    """The SAE's hook point must exist in this model, its d_in must equal that hook's width, and, on a hook that
    weight processing changes, the model must be loaded with the switches the SAE was trained under
    (:func:`saecircuits.saes.processing.check_model_processing`). Returns the SAE in the model's basis
    (:func:`saecircuits.saes.processing.adapt_to_model`: a transcoder trained on the weighted MLP input gets the
    norm's weight folded in).

    Raises:
        PipelineError: unknown hook point or a width mismatch, naming both and the fix.
        SAEError: the SAE was trained under other weight-processing switches, naming both and the fix.
    """
    from saecircuits.models.hooks import unknown_hook_message, unknown_hooks
    from saecircuits.saes.processing import adapt_to_model, check_model_processing

    probe = torch.tensor([[int(model.tokenizer.bos_token_id or 0)]])
    hooks = [sae.hook_point] + ([sae.hook_point_out] if sae.is_transcoder else [])
    if unknown_hooks(model, hooks):  # a new user's report: name the hook, a few valid ones and the option
        raise PipelineError(
            f"the SAE {'reads and writes' if sae.is_transcoder else 'reads'} {', '.join(hooks)}: "
            + unknown_hook_message(model, unknown_hooks(model, hooks),
                                   "where the SAE's files do not name its hook, set it with --hook HOOK (one per "
                                   "--sae; hook= in Python); where they do, the SAE was trained on another model: "
                                   "use one trained on this model")
        )
    try:
        _, cache = model.run_with_cache(probe, names_filter=hooks)
        acts = {h: cache[h] for h in hooks}
    except Exception as err:  # noqa: BLE001 - TransformerLens raises several types for unknown names
        raise PipelineError(
            f"the SAE reads {sae.hook_point!r}" + (f" and writes {sae.hook_point_out!r}" if sae.is_transcoder else "")
            + f", which this model does not have ({err}); give an SAE trained on this model, with the hook name as "
            "TransformerLens spells it (e.g. blocks.0.mlp.hook_post)"
        ) from err
    for hook, want, what in ((sae.hook_point, sae.d_in, "d_in"), (sae.hook_point_out, sae.d_out, "d_out")):
        act = acts.get(hook, acts[sae.hook_point])
        # an attention hook_z SAE reads the heads flattened: n_heads * d_head
        width = int(act.shape[-1] * act.shape[-2]) if sae.reshape_activations == "hook_z" else int(act.shape[-1])
        if width != want:
            raise PipelineError(
                f"SAE on {hook} has {what}={want} but this model's {hook} has width {width}"
                + (" (n_heads * d_head)" if sae.reshape_activations == "hook_z" else "")
                + "; use an SAE trained on this model and hook point"
            )
    check_model_processing(sae, model)
    return adapt_to_model(sae, model)


def sae_train_config(cfg: RunConfig) -> TrainConfig:
    """The :class:`~saecircuits.saes.trainer.TrainConfig` of the pipeline's new SAEs: the recipe ``cfg.sae_recipe``
    (:func:`saecircuits.saes.presets.pipeline_recipe`) over ``cfg.sae_tokens // cfg.sae_batch_size`` steps, with
    activation normalisation when ``cfg.normalize_activations`` (inputs scaled to mean L2 norm sqrt(d_in), folded
    into the saved weights)."""
    return _recipe(cfg)[2]


def sae_architecture(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """``(architecture, cfg.extra settings)`` of the pipeline's new SAEs (``("topk", {"k": cfg.sae_k})`` by default;
    ``("standard", {})`` for the reference recipe)."""
    arch, extra, _ = _recipe(cfg)
    return arch, extra


def _recipe(cfg: RunConfig) -> tuple[str, dict[str, Any], TrainConfig]:
    from saecircuits.saes.presets import pipeline_recipe

    return pipeline_recipe(
        cfg.sae_recipe, total_steps=max(1, cfg.sae_tokens // cfg.sae_batch_size), batch_size=cfg.sae_batch_size,
        k=cfg.sae_k, l1_coefficient=cfg.l1_coefficient, lr=cfg.sae_lr,
        normalize_activations=cfg.normalize_activations, seed=cfg.seed,
    )


TRAINING_SOURCES = ("saes/*.py", "data/activations.py")
"""The package's source files (globs under ``src/saecircuits``) that decide what a trained SAE is: the SAE classes,
losses, trainer and saving, and the activations it reads. Their digest is part of the SAE cache key."""


def training_code_digest(root: Path | None = None) -> str:
    """:func:`~saecircuits.pipeline.config.source_digest` of :data:`TRAINING_SOURCES` (``root``: default this
    package). Part of the SAE cache key: the package version alone did not change when the training code did, so a
    workspace reused SAEs trained by older code while a fresh one trained different ones (same key, W_enc differing
    by up to 1.1 on the demo)."""
    return source_digest(TRAINING_SOURCES, root)


def _train_or_reuse_saes(cfg: RunConfig, model, model_key: str, train_docs: list[str], progress: bool) -> tuple[list, dict]:
    """Train one SAE per layer (the recipe ``cfg.sae_recipe``) from one pass of the model, cached in the workspace.

    In a sharded run (torchrun) rank 0 decides whether the cache is reused; training is data-parallel over the
    ranks (as ``saecircuits train-sae``: each rank reads its own rows, so the SAEs are not bit-equal to one
    process's), rank 0 writes the cache and every rank keeps the trained SAEs (equal on every rank)."""
    from saecircuits import distributed
    from saecircuits.data.activations import pack_token_rows
    from saecircuits.models.load import model_dtype
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.saes.io import load_sae
    from saecircuits.saes.presets import pipeline_d_sae
    from saecircuits.saes.trainer import train_saes_on_model

    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
    hook_points = [HOOK_TEMPLATE.format(layer=layer) for layer in layers]
    architecture, sae_extra, train_cfg = _recipe(cfg)
    d_sae = pipeline_d_sae(int(model.cfg.d_mlp), cfg.expansion_factor)
    if "k" in sae_extra and sae_extra["k"] > d_sae:
        how = ("the default max(4 x d_mlp, 2048)" if cfg.expansion_factor is None
               else f"--expansion-factor {cfg.expansion_factor} x d_mlp {int(model.cfg.d_mlp)}")
        raise PipelineError(f"--sae-k {sae_extra['k']} is more than the {d_sae} features of each SAE ({how}); give a "
                            "smaller --sae-k or a larger --expansion-factor")
    steps = train_cfg.total_steps
    dtype = model_dtype(model)
    key_blob = json.dumps(
        {
            "model": model_key,
            "train_data": hashlib.sha256("\x00".join(train_docs).encode()).hexdigest(),
            "hooks": hook_points,
            "train": train_cfg.to_dict(),
            "architecture": architecture,
            "sae_extra": sae_extra,
            "d_sae": d_sae,
            "exclude_bos": cfg.exclude_bos,
            # special-token strings in the text are encoded as characters; "exclude" drops every special id
            "text_encoding": "plain-characters",
            "seq_len": cfg.seq_len,
            "version": saecircuits.__version__,
            "training_code": training_code_digest(),
            # a 16-bit model's activations are another training set (float32 keys are as before it was keyed)
            **({"model_dtype": dtype} if dtype != "float32" else {}),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_blob.encode()).hexdigest()[:16]
    cache_dir = Path(cfg.workspace) / "saes" / key
    folders = {hp: cache_dir / hp / "sae" for hp in hook_points}
    info = {"tokens": steps * cfg.sae_batch_size, "steps": steps, "cache": str(cache_dir), "reused": False,
            "recipe": cfg.sae_recipe, "architecture": architecture, "sae_extra": sae_extra,
            "train_config": train_cfg.to_dict()}
    writer = distributed.is_writer()
    if distributed.broadcast_json(all((f / "cfg.json").is_file() for f in folders.values()), "the SAE cache check"):
        logger.info("reusing SAEs from %s", cache_dir)
        info["reused"] = True
        info["final_metrics"] = distributed.broadcast_json(_final_metrics(cache_dir, hook_points) if writer else None,
                                                           "the SAEs' training metrics")
        return [load_sae(folders[hp], device=cfg.device) for hp in hook_points], info

    tok = model.tokenizer
    n_ctx = int(model.cfg.n_ctx)
    docs = encode_documents(tok, train_docs, prepend_bos=False)
    # documents are separated by BOS (none when the tokenizer has no BOS: no stand-in token)
    rows = pack_token_rows(docs, min(cfg.seq_len, n_ctx), tok.bos_token_id, shuffle_seed=cfg.seed)
    needed_rows = -(-steps * cfg.sae_batch_size // rows.shape[1])
    if rows.shape[0] < needed_rows:
        logger.info("SAE training data has %d rows; they are reused for the %d rows needed", rows.shape[0], needed_rows)
    tmp = cache_dir.parent / f".{key}.tmp-{os.getpid()}"
    if writer:
        remove_dead_temps(cache_dir.parent)  # what killed runs left (a SIGTERM skips the cleanup below)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        trained = train_saes_on_model(
            model,
            rows,
            hook_points,
            train_cfg,
            d_sae=d_sae,
            architecture=architecture,
            sae_extra=sae_extra,
            bos_id=special_token_ids(tok),  # "exclude" leaves out BOS/EOS/PAD wherever they sit in a row
            bos_policy="exclude" if cfg.exclude_bos else "include",
            output_dir=tmp,
            progress=progress,
            model_name=model_key,
        )
        if writer:  # (the other ranks of a sharded run write nothing)
            if cache_dir.exists():
                shutil.rmtree(cache_dir)
            os.replace(tmp, cache_dir)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["final_metrics"] = distributed.broadcast_json(_final_metrics(cache_dir, hook_points) if writer else None,
                                                       "the SAEs' training metrics")
    return [trained[hp] for hp in hook_points], info


def _final_metrics(cache_dir: Path, hook_points: list[str]) -> dict:
    """The last line of each SAE's training ``metrics.jsonl`` (L0, explained variance over the batch's tokens,
    shrinkage, dead/dense fractions over the last training batch), also when the SAEs are reused from the cache."""
    from saecircuits.report.schema import rename_training_metrics

    metrics = {}
    for hp in hook_points:
        log = cache_dir / hp / "metrics.jsonl"
        if log.is_file():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if lines:
                metrics[hp] = rename_training_metrics(lines[-1])  # a cached SAE may have the old name
    return metrics


def _saes(ctx: RunContext, *, model, model_key: str, train_docs: list[str], given_saes: list | None,
          layers: list[int] | None) -> dict:
    """``saes``: the given SAEs, or one new SAE per layer of ``layers`` (None: every layer), each in the model's
    basis (:func:`_check_sae_fits`); ``training``: how they were made (results.json's ``training`` of each SAE)."""
    cfg, say = ctx.cfg, ctx.say
    if given_saes is not None:
        saes = given_saes
        training = {"reused": True, "paths": [str(p) for p in cfg.sae_paths],
                    "sources": [dict(s.cfg.extra.get("source") or {}) for s in saes]}
    else:
        if layers != cfg.layers:  # the --layers auto choice
            cfg = dataclasses.replace(cfg, layers=layers)
        say("SAEs on " + ", ".join(HOOK_TEMPLATE.format(layer=layer) for layer in
                                   (cfg.layers if cfg.layers is not None else range(model.cfg.n_layers))))
        saes, training = _train_or_reuse_saes(cfg, model, model_key, train_docs, ctx.bars)
        say(f"reused cached SAEs from {training['cache']}" if training["reused"] else
            f"trained on {training['tokens']} activations each; cached in {training['cache']}")
    return {"saes": [_check_sae_fits(sae, model) for sae in saes], "training": training}


SAES = Stage("saes", _saes, reads=("model", "model_key", "train_docs", "given_saes", "layers"),
             writes=("saes", "training"), codecs={"saes": "saes"})
