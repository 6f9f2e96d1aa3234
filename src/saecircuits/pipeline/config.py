"""The settings of one run (:class:`RunConfig`), checked before any work, and the pipeline's one error type."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saecircuits.analysis.corpus.examples import DEFAULT_N_EXAMPLES
from saecircuits.tasks.closing_quote import DEFAULT_MAX_PROMPTS

HOOK_TEMPLATE = "blocks.{layer}.mlp.hook_post"


class PipelineError(ValueError):
    """The run cannot start: bad input files, an SAE that does not fit the model, an unknown task."""



def source_digest(patterns: Sequence[str], root: Path | None = None) -> str:
    """SHA-256 (16 hex digits) of this package's source files matching ``patterns`` (globs under ``root``, default
    the installed ``saecircuits`` folder), each as its relative path and bytes, in path order: a key part for what
    the package's code makes (the SAE cache, a run's checkpoint), which its version alone does not capture while the
    code changes under one version."""
    import saecircuits

    root = Path(saecircuits.__file__).parent if root is None else Path(root)
    h = hashlib.sha256()
    for path in sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()}):
        h.update(path.relative_to(root).as_posix().encode() + b"\x00")
        h.update(path.read_bytes() + b"\x00")
    return h.hexdigest()[:16]

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
        expansion_factor: ``d_sae = expansion_factor * d_in`` for new SAEs; None (default):
            ``max(4 * d_in, 2048)`` (:func:`saecircuits.saes.presets.pipeline_d_sae`: a small model's SAEs get
            2,048 features rather than 4 per dimension).
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
            full forwards (slower, same numbers).
        position_circuit: with ``circuit``, also build the circuit across positions
            (:func:`saecircuits.analysis.circuit.position_graph.position_circuit`, most of the circuit stage's time);
            False: circuit.json has no ``"positions"`` and its ``"positions_left_out"`` says why.
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
        dtype: the model's dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``, for a model the run loads (None:
            float32); a model handed to :func:`run_pipeline` keeps its own (naming another here is refused). The
            activations come out in it; SAEs keep their own dtype (new SAEs are trained and kept in float32), and
            every reported number (log-probs, losses, effects, DLA sums, bootstraps) is reduced in float32 or
            float64 from them. ``results.json`` records it under ``model_info.dtype``.
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
    expansion_factor: int | None = None
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
    position_circuit: bool = True
    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    exclude_bos: bool = True
    device: str = "cpu"
    dtype: str | None = None
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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low \
                    or not math.isfinite(value):
                problems.append(f"{flag} must be a finite number >= {low} (got {value!r})")

        at_least("--max-prompts", self.max_prompts, 1, allow_none=True)
        at_least("--sae-tokens", self.sae_tokens, 1)
        at_least("--expansion-factor", self.expansion_factor, 1, allow_none=True)
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
        if self.sae_lr is not None and not (isinstance(self.sae_lr, (int, float)) and math.isfinite(self.sae_lr)
                                            and self.sae_lr > 0):
            problems.append(f"sae_lr must be a positive finite number (got {self.sae_lr!r})")
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
            check_dtype(self.dtype, self.device)
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
            elif path is not None and Path(path).expanduser().is_file() and Path(path).expanduser().stat().st_size == 0:
                # found only after the model loaded otherwise ("contains no non-empty documents")
                problems.append(f"{flag} {path}: the file is empty; give a corpus of stories")
        if self.task != "closing-quote" and not Path(self.task).is_file():
            problems.append(f"--task {self.task}: no such task file")
        elif self.task != "closing-quote":  # what needs no tokenizer, before the model and corpus load
            from saecircuits.tasks.base import TaskError
            from saecircuits.tasks.jsonl import read_records

            try:
                read_records(self.task)
            except TaskError as err:
                problems.append(f"--task {err}")
        from saecircuits.saes.base import SAEError
        from saecircuits.saes.formats import detect_family, missing_weights
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
                if missing_weights(Path(path)):  # a config without its weights: name the missing file
                    problems.append(f"--sae {missing_weights(Path(path))}")
                    continue
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


MODEL_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes ``--dtype`` loads a model in."""


def check_dtype(dtype: str | None, device: str = "cpu") -> None:
    """Fail early, with the fix, when ``--dtype`` is not one of :data:`MODEL_DTYPES` or cannot compute on ``device``
    (float16 on a CPU whose torch build has no float16 matmul, softmax or layer norm: probed here, in microseconds).

    Raises:
        PipelineError: an unknown dtype, or float16 that does not work on this CPU build.
    """
    if dtype is None:
        return
    if dtype not in MODEL_DTYPES:
        raise PipelineError(f"--dtype {dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    if dtype == "float16" and torch.device(device).type == "cpu":
        x = torch.ones(2, 4, dtype=torch.float16)
        try:
            torch.nn.functional.layer_norm(x @ x.T, (2,)).log_softmax(-1)
        except RuntimeError as err:
            raise PipelineError(
                f"--dtype float16 does not compute on the CPU with torch {torch.__version__} ({err}); "
                "use --dtype bfloat16 or float32 on the CPU, or float16 on a GPU") from err
