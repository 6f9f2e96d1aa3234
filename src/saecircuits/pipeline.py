"""The end-to-end job: model + corpus + behaviour -> SAEs -> features -> causal tests -> results.json + report.html.

This module only wires the stages together (models -> data -> saes -> tasks -> analysis -> report); every number is
computed by the stage modules, which document their methods. ``saecircuits run`` and ``saecircuits demo`` call
:func:`run_pipeline`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import saecircuits
from saecircuits.analysis.corpus.examples import DEFAULT_N_EXAMPLES
from saecircuits.atomic import remove_dead_temps
from saecircuits.tasks.closing_quote import DEFAULT_MAX_PROMPTS

if TYPE_CHECKING:
    from saecircuits.saes.trainer import TrainConfig

logger = logging.getLogger(__name__)

HOOK_TEMPLATE = "blocks.{layer}.mlp.hook_post"


class PipelineError(ValueError):
    """The run cannot start: bad input files, an SAE that does not fit the model, an unknown task."""


@dataclass
class RunConfig:
    """Settings of one end-to-end run (every CLI flag of ``saecircuits run`` maps to one field).

    Attributes:
        model: a hub name, a local Hugging Face folder, or a llama2.c ``.bin``.
        data: corpus the task prompts, mean activations and top examples come from.
        out: output folder (``results.json``, ``report.html``, ``saes/``).
        train_data: corpus the SAEs are trained on (default: ``data``).
        tokenizer: tokenizer for the model (a llama2.c ``tok*.bin`` or an HF tokenizer folder); default: the model's.
        task: ``"closing-quote"`` or the path of a JSONL task file (``{"prompt": ..., "answer": ...}`` per line).
        closings: closing strings the closing-quote task accepts (``'."'``; add ``'!"'``, ``'?"'`` to widen it).
        layers: layers whose ``blocks.{L}.mlp.hook_post`` get an SAE (default: all), or ``"auto"``: the
            ``auto_layers`` MLP layers whose mean ablation at P raises the answer's loss the most (computed first,
            on the task prompts; :func:`auto_layers`).
        auto_layers: how many layers ``layers="auto"`` picks.
        sae_paths: existing SAEs to analyse instead of training new ones: folders or files of any family
            :func:`saecircuits.saes.formats.load_sae` reads, ``hf://owner/repo/path`` or SAELens ``release/sae_id``.
        sae_hooks: the TransformerLens hook of each of ``sae_paths`` (one per SAE; ``"auto"`` or None = what its
            files say), for families whose files do not say it (Gemma Scope 1, Goodfire); None = all from the files.
        sae_tokens: activations (tokens) each SAE is trained on.
        expansion_factor: ``d_sae = expansion_factor * d_in`` for new SAEs.
        sae_recipe: how new SAEs are trained (:func:`saecircuits.saes.presets.pipeline_recipe`): ``"topk"``
            (default: a TopK SAE with ``sae_k`` active features per token and AuxK against dead latents, the same
            sparsity on every model without tuning) or ``"reference"`` (the reference notebook's ReLU SAE with an L1
            penalty ``l1_coefficient``, whose sparsity depends on the model).
        sae_k: active features per token of the ``"topk"`` recipe.
        l1_coefficient: per-token L1 coefficient of the ``"reference"`` recipe, on normalised activations
            (see ``normalize_activations``).
        normalize_activations: train on activations scaled so their mean L2 norm is sqrt(d_in) (the scale is
            folded into the saved weights, so the SAE reads raw activations). On by default: with it one
            learning rate (and one ``l1_coefficient``) suits models whose activations differ in scale.
        sae_lr, sae_batch_size, seq_len: SAE training learning rate (None: the recipe's), tokens per step, packed
            row length.
        max_prompts: use at most this many task prompts (the first ones in corpus order).
        max_prompt_tokens: drop prompts (BOS and answer included) longer than this many tokens, counted in
            ``results.json`` (default and upper bound: the model's context).
        n_stat_docs: corpus documents used for the mean activation and top examples.
        feature_selection: which active features get their exact single-feature ablation effect at P on each
            prompt: ``"all"`` (default) or an int N (per prompt, the N with the largest |activation x DLA|).
        max_candidates, min_fraction_active: rows of the ranked feature table (analysis.features): features active
            on at least ``min_fraction_active`` of the prompts, optionally only the ``max_candidates`` with the
            largest mean activation (the reference notebook's 100 candidates; None = all).
        n_ablate: size of the top-feature set ablated together (largest loss increases).
        n_example_features, n_examples: features shown with top activating examples, and examples per feature.
        circuit, circuit_ig_steps: build the feature circuit across all SAEs (analysis.circuit: exact node effects
            and edges, attribution patching and integrated gradients with this many steps, faithfulness and
            completeness), written to ``circuit.json``; on a model the prefix-cached engine cannot compute, from
            full forwards (slower, same numbers). With the engine, also the circuit across positions
            (analysis.circuit.position_graph) under circuit.json's ``"positions"``.
        n_evidence_features: top features that get the per-feature evidence (prompt and weight logit boosts,
            loss increase vs activation, DFA; analysis.evidence), plus the SAE-error DLA, upstream ablation and
            activation-scaled DLA of the SAE; the same features get the ablation on their max-activating corpus
            stories (analysis.max_activating). 0 skips all of it.
        ablation_mode: how features are ablated in every ablation of the run (``"residual"``, ``"reconstruction"``
            or ``"clean_effect"``; analysis.ablation_modes). The top features are also compared under all three.
        n_max_act_stories: corpus stories per feature kept by the corpus statistics pass and used for the ablation on
            max-activating stories.
        token_fraction: token-wise counts count a feature's tokens above this fraction of its corpus maximum.
        n_geometry_features: top features whose co-occurrence, decoder/encoder cosines and token kurtosis are
            reported, and whose decoder span is kept in the complement-of-span ablation.
        fold_ln, center_writing_weights, center_unembed: TransformerLens weight processing (all on by default;
            log-probs are unchanged, DLA components are expressed in the processed basis).
        exclude_bos: the one BOS switch: special-token positions (BOS/EOS/PAD, wherever they sit in a row) are left
            out of SAE training activations and of the mean activation used for mean ablation (top examples, token
            counts and DFA means always skip them). The reference notebook trained 54_serene_plasma with BOS
            positions and 189_giddy_water without. BOS itself is prepended when the tokenizer has one,
            never a stand-in; ``results.json`` states the policy under ``bos_policy``.
        device, seed: where to compute; seed of SAE training and bootstraps.
        workspace: cache folder for converted models and trained SAEs.
        model_label: name written into results.json (default: ``model``).
    """

    model: str
    data: Path
    out: Path
    train_data: Path | None = None
    tokenizer: str | None = None
    task: str = "closing-quote"
    closings: tuple[str, ...] = ('."',)
    layers: list[int] | str | None = None
    auto_layers: int = 2
    sae_paths: list[Path] = field(default_factory=list)
    sae_hooks: list[str | None] | None = None
    sae_tokens: int = 400_000
    expansion_factor: int = 4
    sae_recipe: str = "topk"
    sae_k: int = 32
    l1_coefficient: float = 0.3
    normalize_activations: bool = True
    sae_lr: float | None = None
    sae_batch_size: int = 2048
    seq_len: int = 128
    max_prompts: int | None = DEFAULT_MAX_PROMPTS
    max_prompt_tokens: int | None = None
    n_stat_docs: int = 1000
    feature_selection: str | int = "all"
    max_candidates: int | None = None
    min_fraction_active: float = 0.05
    n_ablate: int = 3
    n_example_features: int = 6
    n_examples: int = DEFAULT_N_EXAMPLES
    n_evidence_features: int = 3
    ablation_mode: str = "residual"
    n_max_act_stories: int = 20
    token_fraction: float = 0.25
    n_geometry_features: int = 5
    circuit: bool = True
    circuit_ig_steps: int = 10
    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    exclude_bos: bool = True
    device: str = "cpu"
    seed: int = 0
    workspace: Path = Path(".saecircuits")
    model_label: str | None = None

    def __post_init__(self) -> None:
        """Check every setting that can be checked without reading files or loading the model.

        Raises:
            PipelineError: all the problems found, in one line, each naming the CLI flag and the fix.
        """
        problems = []

        def at_least(flag: str, value: Any, low: int | float, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                problems.append(f"{flag} must be a number >= {low} (got {value!r})")

        at_least("--max-prompts", self.max_prompts, 1, allow_none=True)
        at_least("--sae-tokens", self.sae_tokens, 1)
        at_least("--expansion-factor", self.expansion_factor, 1)
        at_least("--l1-coefficient", self.l1_coefficient, 0)
        at_least("--sae-k", self.sae_k, 1)
        from saecircuits.saes.presets import SAE_RECIPES

        if self.sae_recipe not in SAE_RECIPES:
            problems.append(f"--sae-recipe must be one of {', '.join(SAE_RECIPES)} (got {self.sae_recipe!r})")
        at_least("--seed", self.seed, 0)
        for name, low in (("sae_batch_size", 1), ("seq_len", 2), ("n_stat_docs", 1),
                          ("n_ablate", 0), ("n_example_features", 0), ("n_examples", 1),
                          ("n_evidence_features", 0), ("n_max_act_stories", 1), ("n_geometry_features", 0)):
            at_least(name, getattr(self, name), low)
        from saecircuits.analysis.ablations.modes import ABLATION_MODES

        if self.ablation_mode not in ABLATION_MODES:
            problems.append(f"--ablation-mode must be one of {', '.join(ABLATION_MODES)} (got {self.ablation_mode!r})")
        if not (isinstance(self.token_fraction, (int, float)) and 0 <= self.token_fraction < 1):
            problems.append(f"token_fraction must be in [0, 1) (got {self.token_fraction!r})")
        at_least("max_prompt_tokens", self.max_prompt_tokens, 2, allow_none=True)
        at_least("max_candidates", self.max_candidates, 1, allow_none=True)
        if self.feature_selection != "all":
            at_least("--feature-selection", self.feature_selection, 1)
        if self.sae_lr is not None and not (isinstance(self.sae_lr, (int, float)) and self.sae_lr > 0):
            problems.append(f"sae_lr must be positive (got {self.sae_lr!r})")
        if not (isinstance(self.min_fraction_active, (int, float)) and 0 <= self.min_fraction_active <= 1):
            problems.append(f"min_fraction_active must be in [0, 1] (got {self.min_fraction_active!r})")
        if not self.closings:
            problems.append("give at least one closing string (e.g. '.\"')")
        if self.layers == "auto":
            at_least("auto_layers", self.auto_layers, 1)
        elif self.layers is not None:
            negative = [layer for layer in self.layers if layer < 0]
            if negative:
                problems.append(f"--layers {negative}: layers are numbered from 0")
            if len(set(self.layers)) != len(self.layers):
                problems.append(f"--layers {list(self.layers)} names a layer twice; give each layer once")
        if self.sae_hooks and len(self.sae_hooks) != len(self.sae_paths):
            problems.append(f"give one --hook per --sae (got {len(self.sae_paths)} --sae and {len(self.sae_hooks)} "
                            "--hook; 'auto' takes the hook from that SAE's files)")
        if self.sae_paths and self.layers is not None:
            problems.append(
                "--layers chooses where NEW SAEs are trained; with --sae the SAEs' own hook points are used. "
                "Drop --layers, or drop --sae to train SAEs on those layers"
            )
        if self.task != "closing-quote" and not str(self.task).endswith(".jsonl") and not Path(self.task).is_file():
            problems.append(f"unknown task {self.task!r}: use 'closing-quote' or the path of a .jsonl task file")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            problems.append(f"--out {self.out} is a file; give a folder (it is created if missing)")
        if Path(self.workspace).exists() and not Path(self.workspace).is_dir():
            problems.append(f"--workspace {self.workspace} is a file; give a folder (it is created if missing)")
        try:
            check_device(self.device)
        except PipelineError as err:
            problems.append(str(err))
        if problems:
            raise PipelineError("; ".join(problems))

    def check_inputs(self) -> None:
        """Check that the input files exist (corpora, task file, SAE folders, a tokenizer path), before any work.

        Raises:
            PipelineError: every missing input, in one line, naming its flag.
        """
        problems = []
        for flag, path in (("--data", self.data), ("--train-data", self.train_data)):
            if path is not None and not Path(path).expanduser().exists():
                problems.append(f"{flag} {path}: no such file or folder")
        if self.task != "closing-quote" and not Path(self.task).is_file():
            problems.append(f"--task {self.task}: no such task file")
        from saecircuits.saes.base import SAEError
        from saecircuits.saes.formats import detect_family
        from saecircuits.saes.hub import is_hub_name
        from saecircuits.saes.io import find_sae_folders

        for path in self.sae_paths:
            if is_hub_name(path):
                continue  # resolved (and its files checked) by _load_saes, before the model loads
            if not Path(path).exists():
                problems.append(f"--sae {path}: no such file or folder")
                continue
            try:
                detect_family(Path(path))
            except SAEError:
                below = find_sae_folders(path) if Path(path).is_dir() else []
                problems.append(f"--sae {path}: not an SAE folder (no cfg.json) nor the files of another SAE family "
                                "saecircuits reads (see 'saecircuits sae inspect')" + (
                    f"; the SAE folders below it are {' '.join(str(p) for p in below[:8])}" if below else ""))
        from saecircuits.models.load import looks_like_path

        if self.tokenizer is not None and looks_like_path(str(self.tokenizer)) \
                and not Path(self.tokenizer).expanduser().exists():
            problems.append(f"--tokenizer {self.tokenizer}: no such file or folder")
        if problems:
            raise PipelineError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()} | {
            "sae_paths": [str(p) for p in self.sae_paths]
        }


def sae_path(path: str | os.PathLike) -> str | Path:
    """An ``--sae`` value as given: hub names (``hf://...``, ``release/sae_id``) stay text (a Path would fold the
    ``//``), local paths become :class:`Path`."""
    from saecircuits.saes.hub import is_hub_name

    return str(path) if is_hub_name(path) else Path(path)


def _file_digest(path: Path) -> str:
    """sha256 of a file, or of the sorted files of a folder (their paths relative to it, and contents).

    Symbolic links are followed (a Hugging Face cache snapshot links its files to blobs); hidden files and folders
    (``.cache/`` of ``huggingface-cli download --local-dir``, ``.git``) are left out, so bookkeeping does not
    change the digest of the same weights."""
    h = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*")
                        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
    else:
        files = [path]
    for p in files:
        h.update((p.relative_to(path).as_posix() if path.is_dir() else p.name).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _stage(timings: dict[str, float], name: str, t0: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - t0, 3)
    logger.info("%s: %.1f s", name, now - t0)
    return now


def check_device(device: str) -> None:
    """Fail early, with the fix, when the requested device does not exist in this torch build."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise PipelineError(f"--device {device!r} is not a torch device (use cpu, cuda, cuda:1, mps)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            f"--device {device}: this torch build has no CUDA (torch {torch.__version__}); "
            "use --device cpu, or install a CUDA build of torch"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"--device {device}: MPS is not available here; use --device cpu")


def _load_saes(paths: list[Path], device: str, hooks: list[str | None] | None = None,
               model_name: str | None = None) -> list:
    """The SAEs of ``--sae`` (any family, hub names included; :func:`saecircuits.saes.formats.load_sae`), with
    ``hooks[i]`` the hook of ``paths[i]`` where its files do not say it (``None``/``"auto"``: from the files).

    Raises:
        SAEError: unrecognised or broken files, or an SAE whose hook is unknown (the message names the fix).
    """
    hooks = list(hooks) if hooks else [None] * len(paths)
    return [load_sae_arg(p, None if h in (None, "auto") else h, device, model_name=model_name)
            for p, h in zip(paths, hooks, strict=True)]


def load_sae_arg(path: str | Path, hook: str | None, device: str, *, model_name: str | None = None):
    """One ``--sae`` value loaded by :func:`saecircuits.saes.formats.load_sae` (any family, hub names included).

    Raises:
        SAEError: as ``load_sae``; for a folder that holds SAE folders below it rather than one SAE, the message
            lists them (:func:`saecircuits.saes.io.load_sae` says so).
    """
    from saecircuits.saes.base import SAEError
    from saecircuits.saes.formats import detect_family, load_sae
    from saecircuits.saes.hub import is_hub_name
    from saecircuits.saes.io import find_sae_folders
    from saecircuits.saes.io import load_sae as load_saelens_folder

    if not is_hub_name(path) and Path(path).is_dir():
        try:
            detect_family(Path(path))
        except SAEError:
            if find_sae_folders(path):
                load_saelens_folder(path)  # raises, listing the SAE folders below it
            raise
    return load_sae(path, hook=hook, device=device, model_name=model_name)


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
    from saecircuits.saes.processing import adapt_to_model, check_model_processing

    probe = torch.tensor([[int(model.tokenizer.bos_token_id or 0)]])
    hooks = [sae.hook_point] + ([sae.hook_point_out] if sae.is_transcoder else [])
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


def _train_or_reuse_saes(cfg: RunConfig, model, model_key: str, train_docs: list[str], progress: bool) -> tuple[list, dict]:
    """Train one SAE per layer (the recipe ``cfg.sae_recipe``) from one pass of the model, cached in the workspace."""
    from saecircuits.data.activations import pack_token_rows
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.saes.io import load_sae
    from saecircuits.saes.trainer import train_saes_on_model

    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
    hook_points = [HOOK_TEMPLATE.format(layer=layer) for layer in layers]
    architecture, sae_extra, train_cfg = _recipe(cfg)
    d_sae = cfg.expansion_factor * int(model.cfg.d_mlp)
    if "k" in sae_extra and sae_extra["k"] > d_sae:
        raise PipelineError(f"--sae-k {sae_extra['k']} is more than the {d_sae} features of each SAE "
                            f"(--expansion-factor {cfg.expansion_factor} x d_mlp {int(model.cfg.d_mlp)}); give a "
                            "smaller --sae-k or a larger --expansion-factor")
    steps = train_cfg.total_steps
    key_blob = json.dumps(
        {
            "model": model_key,
            "train_data": hashlib.sha256("\x00".join(train_docs).encode()).hexdigest(),
            "hooks": hook_points,
            "train": train_cfg.to_dict(),
            "architecture": architecture,
            "sae_extra": sae_extra,
            "expansion": cfg.expansion_factor,
            "exclude_bos": cfg.exclude_bos,
            # special-token strings in the text are encoded as characters; "exclude" drops every special id
            "text_encoding": "plain-characters",
            "seq_len": cfg.seq_len,
            "version": saecircuits.__version__,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_blob.encode()).hexdigest()[:16]
    cache_dir = Path(cfg.workspace) / "saes" / key
    folders = {hp: cache_dir / hp / "sae" for hp in hook_points}
    info = {"tokens": steps * cfg.sae_batch_size, "steps": steps, "cache": str(cache_dir), "reused": False,
            "recipe": cfg.sae_recipe, "architecture": architecture, "sae_extra": sae_extra,
            "train_config": train_cfg.to_dict()}
    if all((f / "cfg.json").is_file() for f in folders.values()):
        logger.info("reusing SAEs from %s", cache_dir)
        info["reused"] = True
        info["final_metrics"] = _final_metrics(cache_dir, hook_points)
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
    remove_dead_temps(cache_dir.parent)  # what killed runs left (a SIGTERM skips the cleanup below)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        trained = train_saes_on_model(
            model,
            rows,
            hook_points,
            train_cfg,
            expansion_factor=cfg.expansion_factor,
            architecture=architecture,
            sae_extra=sae_extra,
            bos_id=special_token_ids(tok),  # "exclude" leaves out BOS/EOS/PAD wherever they sit in a row
            bos_policy="exclude" if cfg.exclude_bos else "include",
            output_dir=tmp,
            progress=progress,
            model_name=model_key,
        )
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["final_metrics"] = _final_metrics(cache_dir, hook_points)
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


def mlp_ablation_effects(model, task, stat_docs: list[list[int]], *, exclude_bos: bool = True,
                         progress: bool = False) -> list:
    """Per MLP layer ``L``: the increase in the answer's loss at P (nats) when ``blocks.L.mlp.hook_post`` is replaced,
    at P only, by its mean activation over ``stat_docs`` (every real, non-special token; the pipeline's mean
    ablation), as a mean over prompts with a Student-t 95% interval.

    Args:
        model: a TransformerBridge; task: prompts and answers; stat_docs: token rows for the mean activation.
        exclude_bos: leave special-token positions out of the mean (the pipeline's BOS switch).

    Returns:
        ``[n_layers]`` :class:`~saecircuits.analysis.statistics.MeanCI` of (mean-ablated - clean) answer loss.
    """
    from saecircuits.analysis.ablations.feature_effects import variant_losses
    from saecircuits.analysis.quality.reconstruction import mean_activation
    from saecircuits.analysis.statistics import mean_ci95
    from saecircuits.models.interventions import Edit

    effects = []
    for layer in range(int(model.cfg.n_layers)):
        hook = HOOK_TEMPLATE.format(layer=layer)
        mean = mean_activation(model, stat_docs, hook, exclude_bos=exclude_bos, progress=progress)

        def to_mean(x: torch.Tensor, mean: torch.Tensor = mean) -> torch.Tensor:  # [B, F, d] -> [B, 1, d]
            return mean.to(x).reshape(1, 1, -1).expand(x.shape[0], 1, -1)

        losses = variant_losses(model, task, Edit(hook, to_mean), 1)
        effects.append(mean_ci95(losses[:, 1].double() - losses[:, 0].double()))
    return effects


def auto_layers(increase: list[float], n: int) -> tuple[list[int], str]:
    """``--layers auto``: the ``n`` MLP layers whose mean ablation at P raises the answer's loss the most.

    The choice rests on a causal effect (:func:`mlp_ablation_effects`), not on direct logit attribution: a layer can
    write a large logit directly while later layers undo it, and a layer whose ablation LOWERS the answer's loss
    works against the answer, so its SAE would not explain how the model gives it.

    Args:
        increase: ``[n_layers]`` mean increase of the answer loss at P (nats) under each layer's mean ablation.
        n: how many layers to pick (fewer if the model has fewer layers).

    Returns:
        ``(layers ascending, one sentence saying which were chosen and why)``; the sentence says so when a chosen
        layer's ablation does not raise the loss (every layer's does not, or fewer than ``n`` do).

    Raises:
        PipelineError: no layer (or only undefined effects).
    """
    effects = [(layer, float(v)) for layer, v in enumerate(increase) if math.isfinite(float(v))]
    if not effects:
        raise PipelineError("--layers auto needs each MLP layer's ablation effect on the answer, and none could be "
                            "computed; give the layers (e.g. --layers 0 1)")
    ranked = sorted(effects, key=lambda lv: -lv[1])
    layers = sorted(layer for layer, _ in ranked[:n])
    said = ", ".join(f"MLP{layer} {v:+.4f}" for layer, v in ranked)
    note = (f"--layers auto chose layer(s) {', '.join(map(str, layers))}: the {len(layers)} MLP layer(s) whose mean "
            f"ablation at P raises the answer's loss the most (mean increase over the prompts, nats: {said}).")
    harmless = [layer for layer, v in ranked[:n] if not v > 0]
    if harmless:
        note += (f" Mean-ablating layer(s) {', '.join(map(str, sorted(harmless)))} does not raise the loss: their "
                 "features are unlikely to explain the answer; consider fewer layers or other ones.")
    return layers, note


def _build_task(cfg: RunConfig, model, docs: list[str]):
    from saecircuits.tasks.base import TaskError
    from saecircuits.tasks.closing_quote import closing_quote_task
    from saecircuits.tasks.jsonl import jsonl_task

    # prompts longer than the context (prompt + answer) are dropped and counted, for every kind of task
    max_tokens = min(cfg.max_prompt_tokens or int(model.cfg.n_ctx), int(model.cfg.n_ctx))
    if cfg.task == "closing-quote":
        task = closing_quote_task(docs, model.tokenizer, closings=cfg.closings, max_prompts=cfg.max_prompts,
                                  max_tokens=max_tokens)
    elif cfg.task.endswith(".jsonl") or Path(cfg.task).is_file():
        task = jsonl_task(cfg.task, model.tokenizer, max_tokens=max_tokens)
        if cfg.max_prompts is not None and task.n_prompts > cfg.max_prompts:
            task = task.subset(range(cfg.max_prompts))
    else:
        raise TaskError(f"unknown task {cfg.task!r}: use 'closing-quote' or the path of a .jsonl task file")
    return task


def _bos_policy(tokenizer, exclude_special: bool) -> dict:
    """The ``bos_policy`` entry of results.json: whether a BOS was prepended, which, and where special tokens count."""
    from saecircuits.models.tokens import bos_prefix, special_token_ids, token_string

    prefix = bos_prefix(tokenizer)  # the pipeline's policy: BOS when the tokenizer has one, never a stand-in
    special = sorted(special_token_ids(tokenizer))
    token = token_string(tokenizer, prefix[0]) if prefix else None
    if prefix:
        said = f"Every prompt and corpus document starts with the tokenizer's BOS token {token!r} (id {prefix[0]})."
    else:
        said = "The tokenizer has no BOS token, so nothing is prepended to prompts or documents (no stand-in token)."
    where = (
        "left out of SAE training activations, the mean activation used for mean ablation, top examples, token counts "
        "and DFA means" if exclude_special else
        "kept in SAE training activations and the mean activation (--include-bos), left out of top examples, token "
        "counts and DFA means"
    )
    return {
        "prepended": bool(prefix),
        "token_id": prefix[0] if prefix else None,
        "token": token,
        "special_token_ids": special,
        "special_positions": "excluded" if exclude_special else "included",
        "statement": f"{said} Special-token positions (ids {special}) are {where}.",
    }


def _task_entry(task, tokenizer, n_show: int = 5) -> dict:
    """The ``task`` entry of results.json: answers shown with ``models.tokens.token_string``, and the first example
    prompts each with its OWN answer, as the text that follows the prompt (``token_pieces`` in context)."""
    from saecircuits.models.tokens import token_pieces, token_string

    answers = sorted(set(task.answer_ids))
    shown = range(min(n_show, task.n_prompts))
    return {
        "name": task.name,
        "n_prompts": task.n_prompts,
        "n_dropped_too_long": int(task.n_dropped_too_long),
        "answer_token_ids": answers,
        "answer_tokens": [token_string(tokenizer, a) for a in answers],
        "example_prompts": [task.prompts[i] for i in shown],
        "example_answer_ids": [int(task.answer_ids[i]) for i in shown],
        "example_answers": [
            token_pieces(tokenizer, [*task.token_ids[i], task.answer_ids[i]])[-1].text for i in shown
        ],
    }


def _round(x: float, nd: int = 6) -> float:
    return float(round(float(x), nd))


def _loss_recovered_keys(key: str, lr) -> dict[str, Any]:
    """results.json keys of one loss recovered: the value (null when undefined), its interval only when defined,
    and the reason when undefined (the raw losses are always in the entry)."""
    if not lr.defined:
        return {key: None, f"{key}_undefined_reason": lr.reason}
    return {key: _round(lr.value), f"{key}_ci95": [_round(lr.low), _round(lr.high)]}


def analyse_sae(
    model, sae, task, stat_docs: list[list[int]], cfg: RunConfig, progress: Callable[[str], None],
    bars: bool = False, *, mean_act: torch.Tensor | None = None, token_counts: torch.Tensor | None = None,
    model_names: Collection[str] = (),
) -> dict:
    """All first-slice analyses of one SAE; returns its ``results.json`` entry (schema in report/schema.py).

    ``mean_act`` (the hook's mean activation) and ``token_counts`` (corpus token counts for the common-token mask)
    come from the corpus statistics pass when given; otherwise they are computed here. ``model_names``: the names the
    loaded model goes by (weights digest, source, name), compared with the model the SAE records."""
    from saecircuits.analysis.ablations.feature_effects import (
        feature_ablation_table,
        feature_activations,
        feature_effects,
    )
    from saecircuits.analysis.ablations.modes import MODE_DESCRIPTIONS
    from saecircuits.analysis.ablations.multi_feature import ablate_features
    from saecircuits.analysis.corpus.examples import top_activating_examples
    from saecircuits.analysis.quality.checks import model_mismatch_check, sae_checks
    from saecircuits.analysis.quality.reconstruction import mean_activation, reconstruction_at_prediction

    if mean_act is None:
        progress(f"{sae.hook_point}: mean activation over {len(stat_docs)} documents")
        mean_act = mean_activation(model, stat_docs, sae.hook_point_out, exclude_bos=cfg.exclude_bos,
                                   progress=bars).reshape(-1)
    progress(f"{sae.hook_point}: loss at the answer position (clean / SAE / zero / mean ablation)")
    rec = reconstruction_at_prediction(model, sae, task, mean_act=mean_act, seed=cfg.seed)
    acts = feature_activations(model, sae, task)
    progress(f"{sae.hook_point}: exact effect of ablating each of {int(acts.value.numel())} active "
             f"(prompt, feature) pairs at P")
    effects = feature_effects(model, sae, task, features=cfg.feature_selection, acts=acts, progress=bars,
                              mode=cfg.ablation_mode)
    clean = effects.clean_loss
    table = feature_ablation_table(
        model, sae, task, min_fraction_active=cfg.min_fraction_active, max_candidates=cfg.max_candidates,
        effects=effects,
    )
    top_features = [
        {
            "feature": int(r.feature),
            "loss_increase": _round(r.loss_increase),
            "loss_increase_ci95": _round(r.loss_increase_ci95),
            "mean_activation": _round(r.mean_activation),
            "fraction_active": _round(r.fraction_active),
            "n_prompts": int(r.n_prompts),
        }
        for r in table.itertuples()
    ]
    entry: dict[str, Any] = {
        "hook_point": sae.hook_point,
        "d_in": int(sae.d_in),
        "d_sae": int(sae.d_sae),
        "architecture": sae.cfg.architecture,
        "l0": _round(rec.l0.float().mean()),
        "explained_variance_at_p": _round(rec.explained_variance),
        "relative_error": _round(rec.relative_error),
        "clean_loss": _round(rec.clean_loss.mean()),
        "sae_loss": _round(rec.sae_loss.mean()),
        "zero_ablation_loss": _round(rec.zero_loss.mean()),
        "mean_ablation_loss": _round(rec.mean_loss.mean()) if rec.mean_loss is not None else None,
        **_loss_recovered_keys("loss_recovered", rec.loss_recovered_zero),
        "n_active_features": int((acts.count() > 0).sum()),
        "top_features": top_features,
        "feature_effects": [
            {
                "feature": int(r.feature),
                "n_active_prompts": int(r.n_active_prompts),
                "fraction_active": _round(r.fraction_active),
                "mean_activation": _round(r.mean_activation),
                "mean_loss_increase": _round(r.loss_increase),
                "ci95": _round(r.loss_increase_ci95),
                "logprob_diff": _round(r.logprob_diff),
                "logit_diff": _round(r.logit_diff),
                "rank_diff": _round(r.rank_diff),
            }
            for r in effects.summary().itertuples()
        ],
        "feature_effects_info": {"selection": effects.selection, "n_pairs": int(effects.prompt.numel()),
                                 "ablation": MODE_DESCRIPTIONS[effects.mode], "ablation_mode": effects.mode,
                                 "off_range": _off_range_json(effects.off_range)},
    }
    from saecircuits.analysis.statistics import mean_ci95

    entry["loss_ci95"] = {
        name: _round(mean_ci95(v).half_width)
        for name, v in (("clean", rec.clean_loss), ("sae", rec.sae_loss), ("zero", rec.zero_loss),
                        ("mean", rec.mean_loss))
        if v is not None
    }
    if rec.loss_recovered_mean is not None:
        entry.update(_loss_recovered_keys("loss_recovered_mean_ablation", rec.loss_recovered_mean))
    else:
        entry["loss_recovered_mean_ablation"] = None
    # Whole-sequence loss recovered over every position of the prompts (answer included): unlike the answer loss at
    # P, which sits near 1 even for an SAE from another model, it falls when the SAE does not fit the model.
    progress(f"{sae.hook_point}: loss recovered over every position of the prompts")
    from saecircuits.analysis.quality.reconstruction import sequence_loss_recovered
    from saecircuits.models.tokens import special_token_ids

    seq = sequence_loss_recovered(
        model, [sae], [[*t, a] for t, a in zip(task.token_ids, task.answer_ids, strict=True)],
        bos_id=special_token_ids(model.tokenizer), bos_policy="exclude" if cfg.exclude_bos else "include",
        seed=cfg.seed)[sae.hook_point]
    entry["whole_sequence"] = _whole_sequence_json(seq)
    checks = sae_checks(sae.hook_point, rec, sequence=seq)
    mismatch = model_mismatch_check(sae.hook_point, sae.cfg.model_name, model_names)
    if mismatch is not None:
        checks.insert(0, mismatch)
    entry["failed_checks"] = [c.id for c in checks]
    entry["checks"] = [c.to_dict() for c in checks]  # moved to results["checks"] by run_pipeline

    # the set ablated together: the largest effects among features whose effect is supported (95% CI above 0)
    supported = [f["feature"] for f in top_features
                 if f["loss_increase"] is not None and f["loss_increase_ci95"] is not None
                 and f["loss_increase"] - f["loss_increase_ci95"] > 0]
    chosen = supported[: cfg.n_ablate]
    entry["multi_ablation_selection"] = {
        "rule": f"the {cfg.n_ablate} largest loss increases among features whose 95% CI excludes 0",
        "n_supported": len(supported), "n_ranked": len(top_features)}
    if chosen:
        progress(f"{sae.hook_point}: ablating features {chosen} together")
        abl = ablate_features(model, sae, task, chosen, mode=cfg.ablation_mode)
        entry["multi_ablation"] = {
            "features": chosen,
            "n_prompts": int(task.n_prompts),
            "mode": abl.mode,
            "off_range": _off_range_json(abl.off_range),
            **{
                name: {"mean": _round(abl.summary[name].mean), "ci95": _round(abl.summary[name].half_width)}
                for name in ("logprob_diff", "logit_diff", "rank_diff", "loss_increase")
            },
        }
    if cfg.n_evidence_features > 0 and top_features:
        from saecircuits.analysis.evidence import feature_evidence

        evidence_features = [f["feature"] for f in top_features[: cfg.n_evidence_features]]
        progress(f"{sae.hook_point}: per-feature evidence for {evidence_features}")
        entry.update(feature_evidence(model, sae, task, evidence_features, stat_docs, acts=acts, clean_loss=clean,
                                      effects=effects, mode=cfg.ablation_mode, token_counts=token_counts))
    shown = [f["feature"] for f in top_features[: cfg.n_example_features]]
    if shown:
        # each shown feature's activation at P on the prompts where it is active (the feature card's histogram)
        entry["task_activations"] = [
            {"feature": int(k), "values": [_round(v, 4) for v in acts.value[acts.feature == k].tolist()]}
            for k in shown]
        progress(f"{sae.hook_point}: top activating examples of {len(shown)} features")
        examples = top_activating_examples(model, sae, stat_docs, shown, k=cfg.n_examples, progress=bars)
        entry["examples"] = [
            {
                "feature": int(k),
                "examples": [
                    {
                        "doc_index": int(e.doc_index),
                        "tokens": list(e.tokens),
                        "token_kinds": list(e.token_kinds),
                        "activations": [_round(a, 4) for a in e.activations],
                        "max_activation": _round(e.max_activation, 4),
                    }
                    for e in examples.get(k, [])
                ],
            }
            for k in shown
        ]
    return entry


def _whole_sequence_json(seq: dict) -> dict:
    """The ``whole_sequence`` entry of an SAE from one result of :func:`~saecircuits.analysis.quality.reconstruction.
    sequence_loss_recovered` on the prompts (loss recovered null with its reason when undefined)."""
    defined = seq["loss_recovered_undefined_reason"] is None
    ev = seq["explained_variance"]
    out = {"loss_recovered": _round(seq["loss_recovered"]) if defined else None,
           "explained_variance": _round(ev) if math.isfinite(ev) else None,
           "ce_clean": _round(seq["ce_clean"]), "ce_sae": _round(seq["ce_spliced"]), "ce_zero": _round(seq["ce_zero"]),
           "n_tokens": int(seq["n_tokens"]), "n_prompts": int(seq["n_rows"])}
    if defined:
        out["loss_recovered_ci95"] = [_round(v) for v in seq["loss_recovered_ci95"]]
    else:
        out["loss_recovered_undefined_reason"] = seq["loss_recovered_undefined_reason"]
    return out


def _off_range_json(off) -> dict | None:
    """An :class:`~saecircuits.analysis.ablations.modes.OffRange` as results.json values (None: not counted)."""
    if off is None:
        return None
    d = off.to_dict()
    return {k: (_round(v) if isinstance(v, float) else v) for k, v in d.items()}


def _mean_ci(m) -> dict:
    """A :class:`~saecircuits.analysis.statistics.MeanCI` as ``{"mean", "ci95" (half-width), "n"}``."""
    return {"mean": _round(m.mean), "ci95": _round(m.half_width), "n": int(m.n)}


def _token_str(model, token_id: int) -> str:
    from saecircuits.models.tokens import token_string

    return token_string(model.tokenizer, token_id)


N_CARD_EXAMPLES = 3
"""Top corpus examples kept for every listed feature (its card in the feature browser)."""


def _corpus_stats_json(model, sae, fs, stat_docs, features: list[int], cfg: RunConfig,
                       detailed: Collection[int] = ()) -> dict:
    """The ``corpus_stats`` key of an SAE entry: corpus-wide summaries and, for every one of ``features``, its
    density, top tokens, activation histogram and top :data:`N_CARD_EXAMPLES` corpus examples (windows), all from
    the one corpus pass; the ``detailed`` ones also get their max-activating stories and lower-band examples."""
    import numpy as np

    from saecircuits.analysis.corpus.statistics import BANDS, example_windows

    density_edges = [float(x) for x in np.linspace(-7.0, 0.0, 29)]
    counts, n_dead = fs.density_histogram(density_edges)
    l0_counts = fs.l0_counts.tolist()
    out: dict[str, Any] = {
        "n_docs": int(fs.n_docs),
        "n_tokens": int(fs.n_tokens),
        "l0": _round(fs.l0),
        "l0_counts": [int(c) for c in l0_counts],
        "n_dead": n_dead,
        "density_log10_edges": [_round(e) for e in density_edges],
        "density_log10_counts": counts,
        "activation_log10_edges": [_round(e) for e in fs.hist_edges.tolist()],
        "token_fraction": float(fs.token_fraction),
        "bands": {k: _round(v) for k, v in BANDS.items()},
        "features": [],
    }
    picks, where = [], []
    n_band = min(2, cfg.n_examples)
    detailed = set(detailed)
    for k in features:
        for d, p, _ in fs.top_examples(k, N_CARD_EXAMPLES):
            picks.append((k, d, p))
            where.append((k, "top"))
        for band in BANDS if k in detailed else ():
            for d, p, _ in fs.band_examples(k, band, n_band):
                picks.append((k, d, p))
                where.append((k, band))
    # one forward pass over the distinct documents of every pick (at most the corpus statistics documents)
    windows = example_windows(model, sae, stat_docs, picks) if picks else []
    by_band: dict[tuple[int, str], list] = {}
    for (k, band), ex in zip(where, windows, strict=True):
        by_band.setdefault((k, band), []).append({
            "doc_index": int(ex.doc_index),
            "tokens": list(ex.tokens),
            "token_kinds": list(ex.token_kinds),
            "activations": [_round(a, 4) for a in ex.activations],
            "max_activation": _round(ex.max_activation, 4),
        })
    for k in features:
        top_tokens = fs.top_token_list(k)
        above = int(fs.above_count[k])
        feature = {
            "feature": int(k),
            "density": _round(float(fs.density[k])),
            "fire_count": int(fs.fire_count[k]),
            "max_activation": _round(float(fs.max_activation[k])),
            "mean_when_active": _round(float(fs.mean_when_active[k])),
            "above_count": above,
            "top_tokens": [[_token_str(model, t), int(c)] for t, c in top_tokens],
            "top_token_share": _round(top_tokens[0][1] / above) if top_tokens and above else None,
            "activation_log10_counts": [int(c) for c in fs.hist[k].tolist()],
            "top_examples": by_band.get((k, "top"), []),
        }
        if k in detailed:
            feature["top_stories"] = [{"doc_index": d, "position": p, "activation": _round(v, 4)}
                                      for d, p, v in fs.top_examples(k, cfg.n_max_act_stories)]
            feature["band_examples"] = {band: by_band.get((k, band), []) for band in BANDS}
        out["features"].append(feature)
    return out


def _per_token_json(model, pt: dict) -> dict:
    """One story of the max-activating ablation's per-token view, tokens shown as everywhere (``token_pieces``)."""
    from saecircuits.models.tokens import token_pieces

    pieces = token_pieces(model.tokenizer, pt["tokens"])
    return {"doc_index": int(pt["doc"]), "tokens": [q.text for q in pieces], "token_kinds": [q.kind for q in pieces],
            "loss_change": [_round(v, 4) for v in pt["loss_change"]],
            "activation": [_round(v, 4) for v in pt["activation"]]}


def study_sae(
    model, sae, task, stat_docs: list[list[int]], entry: dict, fs, mean_act: torch.Tensor, cfg: RunConfig,
    progress: Callable[[str], None],
) -> dict:
    """The reference study's remaining analyses of one SAE: new keys of its ``results.json`` entry.

    Keys (schema in report/schema.py): ``corpus_stats``, ``loss_comparison`` (the five-way loss comparison),
    ``ablation_modes`` (residual-preserving vs reconstruction ablation and the clean effect, with off-range counts),
    ``max_activating_ablation``, ``feature_geometry`` (co-occurrence at P, decoder/encoder cosines, token kurtosis)
    and ``span_ablation``.

    Args:
        entry: the SAE's entry from :func:`analyse_sae` (its ranked features and multi-ablation set are used).
        fs: the SAE's :class:`~saecircuits.analysis.corpus.statistics.FeatureStats` from the run's corpus pass.
        mean_act: the hook's mean activation (the one the mean-ablation loss used).
    """
    from saecircuits.analysis.ablations.feature_effects import feature_activations, feature_effects
    from saecircuits.analysis.ablations.loss_comparison import CONDITIONS, loss_comparison
    from saecircuits.analysis.ablations.max_activating import max_activating_ablation
    from saecircuits.analysis.ablations.modes import ABLATION_MODES
    from saecircuits.analysis.ablations.multi_feature import ablate_features
    from saecircuits.analysis.ablations.span import SPAN_VARIANTS, span_ablation
    from saecircuits.analysis.corpus.cooccurrence import feature_cooccurrence
    from saecircuits.analysis.corpus.geometry import decoder_cosines, encoder_cosines, token_kurtosis

    out: dict[str, Any] = {}
    hp = sae.hook_point
    acts = feature_activations(model, sae, task)
    ranked = [f["feature"] for f in entry.get("top_features", [])]
    chosen = entry.get("multi_ablation", {}).get("features", [])
    shown = ranked[: cfg.n_example_features]
    # every feature the browser lists (any recorded effect) gets its card's corpus statistics and top examples
    listed = list(dict.fromkeys([*ranked, *(int(e["feature"]) for e in entry.get("feature_effects") or [])]))
    progress(f"{hp}: corpus statistics and top examples of {len(listed)} listed features")
    out["corpus_stats"] = _corpus_stats_json(model, sae, fs, stat_docs, listed, cfg, detailed=shown)

    progress(f"{hp}: five-way loss comparison at P")
    lc = loss_comparison(model, sae, task, chosen, mean_act, mode=cfg.ablation_mode)
    out["loss_comparison"] = {
        "conditions": list(CONDITIONS),
        "labels": lc.labels(),
        "features": chosen,
        "mode": lc.mode,
        "n_prompts": int(task.n_prompts),
        "mean": [_round(lc.means[c].mean) for c in CONDITIONS],
        "ci95": [_round(lc.means[c].half_width) for c in CONDITIONS],
        "diff_vs_clean": [_round(lc.diffs[c].mean) for c in CONDITIONS],
        "diff_vs_clean_ci95": [_round(lc.diffs[c].half_width) for c in CONDITIONS],
        "features_minus_sae": _mean_ci(lc.features_minus_sae),
        "off_range": _off_range_json(lc.off_range) if chosen else None,
        "sae_off_range": _off_range_json(lc.sae_off_range),
    }

    compared = ranked[:10]
    if compared:
        progress(f"{hp}: top features under the three ablation modes")
        modes: dict[str, Any] = {"features": compared, "multi_features": chosen, "rows": [], "multi": {},
                                 "off_range": {}, "descriptions": {}}
        from saecircuits.analysis.ablations.modes import MODE_DESCRIPTIONS

        per_mode = {m: feature_effects(model, sae, task, features=compared, acts=acts, mode=m)
                    for m in ABLATION_MODES}
        summaries = {m: e.summary().set_index("feature") for m, e in per_mode.items()}
        for k in compared:
            row: dict[str, Any] = {"feature": int(k)}
            for m in ABLATION_MODES:
                sm = summaries[m]
                if k in sm.index:
                    row[m] = {"mean": _round(sm.loc[k, "loss_increase"]),
                              "ci95": _round(sm.loc[k, "loss_increase_ci95"]),
                              "n": int(sm.loc[k, "n_active_prompts"])}
                else:
                    row[m] = {"mean": None, "ci95": None, "n": 0}
            modes["rows"].append(row)
        for m in ABLATION_MODES:
            modes["descriptions"][m] = MODE_DESCRIPTIONS[m]
            modes["off_range"][m] = _off_range_json(per_mode[m].off_range)
            if chosen:
                abl = ablate_features(model, sae, task, chosen, mode=m)
                modes["multi"][m] = _mean_ci(abl.summary["loss_increase"]) | {
                    "off_range": _off_range_json(abl.off_range)}
        out["ablation_modes"] = modes

    story_feats = ranked[: cfg.n_evidence_features]
    if story_feats:
        progress(f"{hp}: ablation of {story_feats} on their max-activating corpus stories")
        stories = []
        for k in story_feats:
            docs = [d for d, _, _ in fs.top_examples(k, cfg.n_max_act_stories)]
            res = max_activating_ablation(model, sae, k, stat_docs, docs, corpus_max=float(fs.max_activation[k]),
                                          mode=cfg.ablation_mode)
            stories.append({
                "feature": int(k),
                "mode": res.mode,
                "threshold": _round(res.threshold),
                "n_stories": len(docs),
                "global": _mean_ci(res.global_increase),
                "per_position": _mean_ci(res.position_increase),
                "stories": [{"doc_index": int(r.doc), "clean_loss": _round(r.clean_loss),
                             "ablated_loss": _round(r.ablated_loss), "loss_increase": _round(r.loss_increase)}
                            for r in res.stories.itertuples()],
                "position_loss_increase": [_round(v, 4) for v in res.positions["loss_increase"]],
                "position_activation": [_round(v, 4) for v in res.positions["activation"]],
                "per_token": [_per_token_json(model, pt) for pt in res.per_token[:2]],
                "off_range": _off_range_json(res.off_range),
            })
        out["max_activating_ablation"] = stories

    geo = ranked[: cfg.n_geometry_features]
    if len(geo) >= 1:
        progress(f"{hp}: co-occurrence, cosines and token kurtosis of {geo}")
        co = feature_cooccurrence(acts, geo)

        def mat(t) -> list[list[float | None]]:
            return [[_round(v) for v in row] for row in t.tolist()]

        g: dict[str, Any] = {
            "features": geo,
            "cooccurrence": {"threshold": 0.0, "n_prompts": co.n_prompts, "counts": co.counts.tolist(),
                             "by_min": mat(co.by_min), "by_max": mat(co.by_max)},
            "decoder_cosine": mat(decoder_cosines(sae, geo)),
            "encoder_cosine": mat(encoder_cosines(sae, geo)),
        }
        try:
            kurt = token_kurtosis(model, sae)
        except ValueError as err:  # an SAE whose features do not write to the residual stream
            logger.info("token kurtosis skipped for %s: %s", hp, err)
        else:
            import numpy as np

            finite = kurt[torch.isfinite(kurt)].numpy()
            edges = np.linspace(float(finite.min()), float(finite.max()) + 1e-9, 31) if finite.size else np.zeros(2)
            g["token_kurtosis"] = [_round(float(kurt[k])) for k in geo]
            g["token_kurtosis_all"] = {
                "edges": [_round(e) for e in edges.tolist()],
                "counts": np.histogram(finite, bins=edges)[0].astype(int).tolist() if finite.size else [0],
                "median": _round(float(np.median(finite))) if finite.size else None,
                "n_features": int(kurt.numel()),
            }
        out["feature_geometry"] = g
        progress(f"{hp}: keeping only the span of the decoder vectors of {geo} at P")
        sp = span_ablation(model, sae, task, geo, mean_act)
        out["span_ablation"] = {
            "features": geo,
            "rank": sp.rank,
            "variants": list(SPAN_VARIANTS),
            "mean": [_round(sp.means[c].mean) for c in SPAN_VARIANTS],
            "ci95": [_round(sp.means[c].half_width) for c in SPAN_VARIANTS],
            "diff_vs_clean": [_round(sp.diffs[c].mean) for c in SPAN_VARIANTS],
            "diff_vs_clean_ci95": [_round(sp.diffs[c].half_width) for c in SPAN_VARIANTS],
            "fraction_kept": _round(sp.fraction_kept),
        }
    return out


def study_run(model, saes: list, entries: list[dict], task, cfg: RunConfig, progress: Callable[[str], None]) -> dict:
    """Run-level keys of the reference study: ``layer_comparison``, when two or more SAEs on
    different hooks have a multi-ablation set: each SAE's set ablated alone at P and all together."""
    from saecircuits.analysis.ablations.layer_comparison import compare_layer_ablations

    pairs = [(s, e["multi_ablation"]["features"]) for s, e in zip(saes, entries, strict=True)
             if e.get("multi_ablation", {}).get("features")]
    hooks = [s.hook_point for s, _ in pairs]
    if len(pairs) < 2 or len(set(hooks)) != len(hooks):
        return {}
    progress("comparing the top features of " + ", ".join(hooks) + " ablated alone and together")
    lc = compare_layer_ablations(model, [s for s, _ in pairs], [f for _, f in pairs], task, mode=cfg.ablation_mode)
    runs = []
    for r, label in enumerate(lc.labels):
        runs.append({
            "label": label,
            "hooks": lc.hooks if r == len(lc.hooks) else [lc.hooks[r]],
            "features": lc.features if r == len(lc.hooks) else [lc.features[r]],
            "loss_increase": _mean_ci(lc.summary[label]),
            "values": [_round(v, 4) for v in lc.loss_increase[:, r].tolist()],
        })
    return {"layer_comparison": {
        "mode": lc.mode,
        "n_prompts": int(task.n_prompts),
        "runs": runs,
        "paired": [{"a": a, "b": b} | _mean_ci(m) for (a, b), m in lc.paired.items()],
        "interaction": _mean_ci(lc.interaction),
    }}

CIRCUIT_MEAN_DOCS = 300
"""Corpus documents whose tokens give the circuit's mean-ablation values (enough for stable means, and cheap)."""


def _circuit_summary(cj: dict, n_nodes: int = 400) -> dict:
    """The circuit's results.json entry: what the report draws (the whole graph is in circuit.json)."""
    in_c = set(cj["circuit"])
    edges = [e for e in cj["edges"] if e["in_circuit"]]
    return {
        "file": "circuit.json",
        "metric": cj["metric"],
        "n_nodes_total": cj["n_nodes_total"],
        "n_edges_total": cj["n_edges_total"],
        "ig_steps": cj["ig_steps"],
        "selection": cj["selection"],
        "agreement": cj["agreement"],
        "faithfulness": cj["faithfulness"],
        "virtual_weights": cj["virtual_weights"],
        "nodes": [{k: n[k] for k in ("id", "label", "kind", "layer", "sae", "effect", "effect_ci95", "atp", "ig",
                                     "n_active_prompts", "top_tokens")} | {"in_circuit": n["id"] in in_c}
                  for n in cj["nodes"][:n_nodes]],
        "edges": [{k: e[k] for k in ("source", "target", "exact", "atp", "ig", "n_prompts")} for e in edges],
    }


def check_out_writable(out: str | os.PathLike) -> None:
    """Fail at once, in one line, when ``--out`` cannot be written (before the model loads, not after the analysis).

    The folder is not created here (a run that fails leaves no empty folder): a temporary file is written and
    removed in ``out``, or in its nearest existing parent when ``out`` does not exist yet.

    Raises:
        PipelineError: a parent of ``out`` is a file, or the folder is not writable (read-only file system,
            permissions), naming the folder and the reason.
    """
    import tempfile

    out = Path(out).expanduser()
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise PipelineError(f"--out {out}: {probe} is a file, so the output folder cannot be made there; "
                            "give another --out")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".saecircuits-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise PipelineError(f"--out {out}: cannot write in {probe} ({err.strerror or err}); "
                            "give a folder you can write to") from None


class OutLock:
    """Exclusive use of an output folder by one run: a lock file ``.<out name>.saecircuits-lock`` beside the folder
    holding the run's pid, created with ``O_EXCL``. Another run into the same folder is refused while that pid
    lives; a lock whose process died (SIGKILL, a crash) is taken over. Used as a context manager.

    Raises (on enter):
        PipelineError: another live run holds the folder, naming its pid and the lock file.
    """

    def __init__(self, out: str | os.PathLike):
        out = Path(out).expanduser()
        self.out = out
        self.path = out.parent / f".{out.name}.saecircuits-lock"

    def _holder(self, path: Path) -> int | None:
        try:
            text = path.read_text().split()
            return int(text[0]) if text else None
        except (OSError, ValueError):
            return None

    def __enter__(self) -> OutLock:
        from saecircuits.atomic import pid_alive

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self._holder(self.path)
                if pid is None:  # just created by another run, its pid not written yet: look again
                    time.sleep(0.05)
                    pid = self._holder(self.path)
                if pid is not None and pid_alive(pid):
                    raise PipelineError(
                        f"--out {self.out} is being written by another saecircuits run (pid {pid}; lock file "
                        f"{self.path}); wait for it to finish, or give another --out") from None
                # a dead run's lock: move it aside (one rename wins), then check it really was the dead one's
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                moved = self._holder(aside)
                if moved is None or (moved != pid and pid_alive(moved)):  # a live run's fresh lock: put it back
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            return self
        raise PipelineError(f"--out {self.out}: could not take the lock {self.path}; remove it if no run is writing")

    def __exit__(self, *exc: object) -> None:
        if self._holder(self.path) == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


STALE_OUTPUTS = {"circuit.json": None, "figures": ".png", "tables": ".csv"}
"""Outputs an earlier run may have left in ``--out`` that this run may not write (``--no-circuit``, no
``--export``): a file, or a folder of files with this suffix. Removed when this run does not write them."""


def _remove_stale_outputs(out: Path, written: set[str]) -> list[str]:
    """Remove the :data:`STALE_OUTPUTS` this run did not write (a folder only when it holds nothing else), so
    ``--out`` never mixes this run's results with an earlier run's circuit, figures or tables."""
    removed = []
    for name, suffix in STALE_OUTPUTS.items():
        p = out / name
        if name in written or not p.exists():
            continue
        if suffix is None and p.is_file():
            p.unlink()
        elif suffix is not None and p.is_dir() and all(q.is_file() and q.suffix == suffix for q in p.iterdir()):
            shutil.rmtree(p)
        else:
            continue
        removed.append(name)
    return removed


def run_pipeline(
    cfg: RunConfig,
    *,
    model=None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run every stage and write ``cfg.out/results.json`` and ``cfg.out/report.html``.

    Before any work: the settings and input files are checked, ``--out`` must be writable, and the run takes the
    folder's lock (:class:`OutLock`: a second run into the same folder is refused). Outputs of an earlier run that
    this one does not write (``circuit.json``, ``figures/``, ``tables/``) are removed when the results are written.

    Args:
        cfg: the run settings.
        model: an already-loaded TransformerBridge (skips loading ``cfg.model``; used by the demo and tests).
        progress: show progress bars.
        log: called with one line per stage (the CLI prints them).

    Returns:
        The results dict written to ``results.json`` (schema: saecircuits.report.schema).

    Raises:
        PipelineError, TaskError, ModelLoadError, SAEError: bad input, with the fix in the message.
    """
    check_device(cfg.device)
    cfg.check_inputs()
    check_out_writable(cfg.out)
    with OutLock(cfg.out):
        return _run_pipeline(cfg, model=model, progress=progress, log=log)


def _run_pipeline(cfg: RunConfig, *, model, progress: bool, log: Callable[[str], None] | None) -> dict:
    """:func:`run_pipeline` once the output folder is checked and locked."""
    from saecircuits.analysis.quality.behaviour import behaviour_summary
    from saecircuits.analysis.quality.checks import behaviour_checks, density_checks
    from saecircuits.analysis.readouts.dla import direct_logit_attribution
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model, model_provenance
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.report.render import render_report
    from saecircuits.report.schema import SCHEMA_VERSION, validate_results, write_json_atomic
    from saecircuits.report.summary import quoted_token

    say = log or (lambda s: logger.info(s))
    timings: dict[str, float] = {}
    t = t_start = time.perf_counter()
    out = Path(cfg.out)  # created only when the results are written, so a failed run leaves no empty folder
    check_device(cfg.device)
    cfg.check_inputs()
    preloaded = None
    if cfg.sae_paths:  # read the SAE files first: a broken one fails in a second, not after the model loads
        say(f"loading {len(cfg.sae_paths)} SAE(s)")
        preloaded = _load_saes(list(cfg.sae_paths), cfg.device, cfg.sae_hooks)

    if model is None:
        say(f"loading model {cfg.model}")
        model = load_model(cfg.model, tokenizer=cfg.tokenizer, device=cfg.device,
                           cache_dir=Path(cfg.workspace) / "models", fold_ln=cfg.fold_ln,
                           center_writing_weights=cfg.center_writing_weights, center_unembed=cfg.center_unembed)
    try:
        prov = model_provenance(model).to_dict()
    except Exception:  # noqa: BLE001 - injected bridges carry no provenance
        prov = {"source": cfg.model}
    # The SAE cache key: the weights themselves (not the path), so retraining a model in place is noticed.
    model_key = prov.get("weights_sha256") or cfg.model
    if prov.get("hf_folder") and Path(prov["hf_folder"]).is_dir():
        model_key = _file_digest(Path(prov["hf_folder"]))
    # every name the loaded model goes by: the model an SAE records is compared with these
    model_names = {str(n) for n in (model_key, prov.get("model_name"), prov.get("source"), cfg.model, cfg.model_label,
                                    getattr(model.cfg, "model_name", None)) if n}
    if cfg.layers is not None and cfg.layers != "auto":
        n_layers = int(model.cfg.n_layers)
        bad = [layer for layer in cfg.layers if not 0 <= layer < n_layers]
        if bad:
            raise PipelineError(f"--layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    t = _stage(timings, "load_model", t)

    say(f"reading corpus {cfg.data}")
    docs = read_documents(cfg.data)
    train_docs = read_documents(cfg.train_data) if cfg.train_data is not None else docs
    task = _build_task(cfg, model, docs)
    task_entry = _task_entry(task, model.tokenizer)
    dropped = f" ({task.n_dropped_too_long} over-long prompts dropped)" if task.n_dropped_too_long else ""
    say(f"task {task.name}: {task.n_prompts} prompts{dropped}, answer tokens "
        + ", ".join(quoted_token(t) for t in task_entry["answer_tokens"]))
    # First: does the model perform the behaviour at all? Everything below explains the answer's loss.
    behaviour = behaviour_summary(model, task)
    checks = [c.to_dict() for c in behaviour_checks(behaviour)]
    say(("the model performs the behaviour: " if behaviour.performs else
         "WARNING: the model does NOT perform the behaviour: ") + behaviour.describe())
    bos_policy = _bos_policy(model.tokenizer, cfg.exclude_bos)
    n_ctx = int(model.cfg.n_ctx)
    special = special_token_ids(model.tokenizer)
    stat_docs = encode_documents(model.tokenizer, docs[: cfg.n_stat_docs], max_len=n_ctx)
    stat_docs = [d for d in stat_docs if any(t not in special for t in d)]  # at least one text token
    t = _stage(timings, "data_and_task", t)

    from saecircuits.models.interventions import interventions_for

    iv = interventions_for(model)
    say("direct logit attribution")
    dla = direct_logit_attribution(model, task, progress=progress)
    t = _stage(timings, "dla", t)
    layer_note = None
    if cfg.layers == "auto":
        say("mean ablation of every MLP layer at P (--layers auto)")
        effects = mlp_ablation_effects(model, task, stat_docs, exclude_bos=cfg.exclude_bos, progress=progress)
        chosen_layers, layer_note = auto_layers([e.mean for e in effects], cfg.auto_layers)
        say(layer_note)
        cfg = dataclasses.replace(cfg, layers=chosen_layers)

    if preloaded is not None:
        saes = preloaded
        training = {"reused": True, "paths": [str(p) for p in cfg.sae_paths],
                    "sources": [dict(s.cfg.extra.get("source") or {}) for s in saes]}
    else:
        say("SAEs on " + ", ".join(HOOK_TEMPLATE.format(layer=layer) for layer in
                                   (cfg.layers if cfg.layers is not None else range(model.cfg.n_layers))))
        saes, training = _train_or_reuse_saes(cfg, model, str(model_key), train_docs, progress)
        say(f"reused cached SAEs from {training['cache']}" if training["reused"] else
            f"trained on {training['tokens']} activations each; cached in {training['cache']}")
    saes = [_check_sae_fits(sae, model) for sae in saes]
    t = _stage(timings, "saes", t)


    from saecircuits.analysis.corpus.statistics import corpus_feature_stats
    from saecircuits.analysis.quality.reconstruction import mean_activation

    say(f"corpus statistics of every SAE over {len(stat_docs)} documents (one pass)")
    stats = corpus_feature_stats(model, saes, stat_docs, k=max(cfg.n_max_act_stories, cfg.n_examples),
                                 token_fraction=cfg.token_fraction, progress=progress)
    t = _stage(timings, "corpus_stats", t)

    entries = []
    for i, sae in enumerate(saes):
        # the corpus pass leaves out every special position; with --include-bos the mean keeps BOS
        # (a transcoder's mean ablation replaces the MLP's output, so its mean is of the hook it writes)
        mean_act = stats[i].mean_input if cfg.exclude_bos and not sae.is_transcoder else mean_activation(
            model, stat_docs, sae.hook_point_out, exclude_bos=cfg.exclude_bos, progress=progress).reshape(-1)
        entry = analyse_sae(model, sae, task, stat_docs, cfg, say, bars=progress, mean_act=mean_act,
                            token_counts=stats.token_counts, model_names=model_names)
        entry.update(study_sae(model, sae, task, stat_docs, entry, stats[i], mean_act, cfg, say))
        fm = training.get("final_metrics", {}).get(sae.hook_point)
        entry["training"] = {k: v for k, v in training.items() if k != "final_metrics"} | (
            {"final_metrics": fm} if fm else {})
        entries.append(entry)
        ranked = [t["feature"] for t in entry.get("top_features") or []]
        for c in density_checks(sae.hook_point, ranked, stats[i].density, stats[i].l0, sae.cfg.d_sae):
            entry["checks"].append(c.to_dict())
            entry.setdefault("failed_checks", []).append(c.id)
        for c in entry.pop("checks"):  # all checks go to one block; the entry keeps their ids (failed_checks)
            checks.append(c)
            say(f"WARNING ({sae.hook_point}): {c['message']}")
        t = _stage(timings, f"analyse {sae.hook_point}", t)

    study = study_run(model, saes, entries, task, cfg, say)
    t = _stage(timings, "layer comparison", t)

    notes = [layer_note] if layer_note else []
    circuit_entry, circuit_json = None, None
    if cfg.circuit and saes:
        from saecircuits.analysis.circuit import find_circuit

        if iv.engine is None:  # the same numbers from full forwards (gradients at P too), slower
            notes.append(f"The circuit was computed with full model forwards: the prefix-cached engine cannot "
                         f"compute this model ({iv.reason}).")
        say(f"feature circuit across {len(saes)} SAE(s): exact node effects and edges, gradient estimates")
        circ = find_circuit(model, saes, task, ig_steps=cfg.circuit_ig_steps, progress=progress,
                            corpus_rows=stat_docs[:CIRCUIT_MEAN_DOCS])
        circuit_json = circ.to_json()
        circuit_entry = _circuit_summary(circuit_json)
        if iv.engine is not None:  # across positions (issue 16): positions t..P recomputed by the engine
            from saecircuits.analysis.circuit.position_graph import position_circuit, reduced_positions

            say("circuit across positions: nodes at every position, exact effects, edges, head loadings")
            # 100 exact nodes per prompt, head loadings into 5 features + the target: on the demo ~2x find_circuit's
            # CPU time (200 / 10: ~4x)
            circuit_json["positions"] = position_circuit(model, saes, task, top_exact=100, head_targets=5,
                                                         progress=progress)
            circuit_entry["positions"] = reduced_positions(circuit_json["positions"])
        else:
            notes.append("The circuit across positions needs the prefix-cached engine; it was left out.")
        t = _stage(timings, "circuit", t)
    if task.n_dropped_too_long:
        notes.append(
            f"{task.n_dropped_too_long} prompts were longer than {min(cfg.max_prompt_tokens or n_ctx, n_ctx)} tokens "
            f"(prompt + answer; the model's context is {n_ctx}) and were left out; the results use the other "
            f"{task.n_prompts}."
        )
    if task.n_prompts < 20:
        notes.append(
            f"Only {task.n_prompts} prompts: means are noisy and 95% intervals are wide or undefined (n < 2). "
            "Use a larger corpus or task file."
        )
    results = {
        "schema_version": SCHEMA_VERSION,
        "saecircuits_version": saecircuits.__version__,
        "model": cfg.model_label or cfg.model,
        "model_info": {
            "n_layers": int(model.cfg.n_layers),
            "d_model": int(model.cfg.d_model),
            "d_mlp": int(model.cfg.d_mlp),
            "d_vocab": int(model.cfg.d_vocab),
            "n_heads": int(model.cfg.n_heads),
            "architecture": str(prov.get("architecture", "")),
        },
        "provenance": prov,
        "task": task_entry,
        "behaviour": behaviour.to_dict(),
        "checks": checks,
        "bos_policy": bos_policy,
        "dla": {
            "labels": list(dla.labels),
            "mean": [_round(v) for v in dla.mean.tolist()],
            "ci95": [_round(h - m) for h, m in zip(dla.ci95_high.tolist(), dla.mean.tolist(), strict=True)],
            "answer_logit_mean": _round(dla.target_logit.mean()),
            "completeness_max_abs_error": float(dla.max_abs_error),
            **({"logit_soft_cap": dla.logit_soft_cap, "of": "pre-cap answer logit"}
               if dla.logit_soft_cap is not None else {}),
        },
        "saes": entries,
        **study,
        "corpus": {"n_docs": stats.n_docs, "n_tokens": stats.n_tokens, "n_special_ids": len(stats.special_ids),
                   "ablation_mode": cfg.ablation_mode},
        **({"circuit": circuit_entry} if circuit_entry is not None else {}),
        "interventions": {"backend": iv.backend, "note": iv.reason or "prefix-cached: position P recomputed alone"},
        "timings": timings | {"total": round(time.perf_counter() - t_start, 3)},
        "config": cfg.to_dict(),
        "notes": notes,
    }
    iv.clear_cache()
    validate_results(results)
    write_json_atomic(out / "results.json", results)
    if circuit_json is not None:
        write_json_atomic(out / "circuit.json", circuit_json)
    render_report(results, out / "report.html")
    removed = _remove_stale_outputs(out, {"circuit.json"} if circuit_json is not None else set())
    if removed:
        say(f"removed {', '.join(removed)} of an earlier run in {out} (this run did not write them)")
    _stage(timings, "report", t)
    say(f"wrote {out / 'results.json'} and {out / 'report.html'}")
    return results
