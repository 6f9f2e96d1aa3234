"""Typed SAE training jobs (JSON file or flags) and presets reproducing the reference notebook's two SAEs.

A :class:`TrainSAEJob` is everything ``saecircuits train-sae`` needs: which model and data, which hook points, the
SAE shape and the :class:`~saecircuits.saes.trainer.TrainConfig`. ``PRESETS`` holds the settings of
``54_serene_plasma`` and ``189_giddy_water`` from their saved configs (printed in later versions of the reference
notebook) and ``sparse_coding/train_autoencoder.py`` at the commits that trained them, in the ORIGINAL batch-summed
penalty convention (``batch_reduction="sum"``), with the notebook's optimiser, batch, step count, resampling
schedule, dead threshold and p ~ err^4 resampling rule. What cannot be reproduced: the private, unseeded-shuffled
token dataset and the bf16 activation buffer (use ``activation_dtype="bfloat16"`` to mimic it).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from saecircuits.saes.base import SAEError
from saecircuits.saes.trainer import TrainConfig, dead_window_for


@dataclass
class TrainSAEJob:
    """One ``train-sae`` run.

    Attributes:
        model: model source for :func:`saecircuits.models.load.load_model` (hub name, HF folder, llama2.c ``.bin``);
            ignored when ``activation_cache`` is given.
        hook_points: TL hook names; one SAE each, all from one pass of the model.
        architecture: ``"standard"`` (ReLU), ``"topk"``, ``"batchtopk"``, ``"jumprelu"``.
        expansion_factor: d_sae = expansion_factor * d_in (unless ``d_sae`` is set).
        d_sae: explicit number of features.
        sae_extra: architecture settings written to ``cfg.extra`` (``k`` for TopK/BatchTopK, ``seed``).
        data: text file of documents separated by ``<|endoftext|>`` (or blank lines if it has none).
        max_documents: use only the first documents of ``data``.
        seq_len: tokens per packed row (incl. the leading BOS).
        bos_policy: ``"include"``, ``"exclude"`` (all BOS positions) or ``"exclude_first"`` (the leading column
            only: 189_giddy_water's rows of 127).
        model_batch_rows: rows per model forward.
        buffer_size: activations in the shuffling buffer (default 16 batches).
        activation_dtype: ``"float32"`` (default) or ``"bfloat16"`` storage of activations (a ``"torch."`` prefix
            is accepted).
        activation_cache: a folder written by :func:`saecircuits.data.activations.write_activation_cache`, used
            instead of running the model.
        device: device of the model and the SAEs.
        train: the :class:`TrainConfig` fields.
    """

    model: str = ""
    hook_points: list[str] = field(default_factory=lambda: ["blocks.0.mlp.hook_post"])
    architecture: str = "standard"
    expansion_factor: int = 4
    d_sae: int | None = None
    sae_extra: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    max_documents: int | None = None
    seq_len: int = 128
    bos_policy: str = "exclude"
    model_batch_rows: int = 32
    buffer_size: int | None = None
    activation_dtype: str = "float32"
    activation_cache: str | None = None
    device: str = "cpu"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        self.hook_points = list(self.hook_points)
        if not self.hook_points:
            raise SAEError("give at least one hook point, e.g. blocks.0.mlp.hook_post")
        if self.bos_policy not in ("include", "exclude", "exclude_first"):
            raise SAEError(f"bos_policy must be include, exclude or exclude_first (got {self.bos_policy!r})")
        if isinstance(self.activation_dtype, str):  # "torch.bfloat16" names the same dtype
            self.activation_dtype = self.activation_dtype.strip().removeprefix("torch.")
        if self.activation_dtype not in ("float32", "bfloat16"):
            raise SAEError(f"activation_dtype must be float32 or bfloat16 (got {self.activation_dtype!r})")
        for name, low, optional in (("expansion_factor", 1, False), ("d_sae", 1, True), ("seq_len", 2, False),
                                    ("max_documents", 1, True), ("model_batch_rows", 1, False),
                                    ("buffer_size", 1, True)):
            value = getattr(self, name)
            if (value is None and not optional) or (value is not None and not value >= low):
                raise SAEError(f"{name} must be an integer >= {low} (got {value!r})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSAEJob:
        """Build from a dict; unknown keys raise :class:`SAEError` naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SAEError(f"unknown train-sae config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainSAEJob:
        """Read a JSON config file (same keys as :meth:`to_dict`; ``train`` may be partial)."""
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SAEError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise SAEError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(d, dict):
            raise SAEError(f"config file {path} must hold one JSON object of TrainSAEJob keys, not a {type(d).__name__}")
        return cls.from_dict(d)


def _reference_train(**overrides: Any) -> dict[str, Any]:
    base = dict(
        lr=1e-4,
        betas=(0.9, 0.99),
        unit_norm_decoder=True,
        normalize_activations=False,
        resample_error_power=4.0,
        resample_encoder_scale=0.2,
        seed=47,
        checkpoint_every=10000,
        log_every=500,
    )
    base.update(overrides)
    return base


PRESETS: dict[str, dict[str, Any]] = {
    # wandb run serene-plasma-54; train_autoencoder.py at commit 6a1ac15 (2023-12-04)
    "54_serene_plasma": dict(
        hook_points=["blocks.0.mlp.hook_post"],
        architecture="standard",
        expansion_factor=4,
        seq_len=128,
        bos_policy="include",  # rows of 128 with the leading BOS, all positions trained on
        model_batch_rows=32,
        buffer_size=4096 * 128,
        train=_reference_train(
            batch_size=4096,
            total_steps=122_070,  # 5e8 tokens
            loss={"regularizer": "l1", "coefficients": [3e-4], "batch_reduction": "sum"},
            resample_steps=(25_000, 50_000, 75_000, 100_000),
            resample_window=12_500,
            dead_frequency=5e-4,
            resample_pool_batches=195,  # 8e5 eval tokens
        ),
    ),
    # wandb run giddy-water-189; train_autoencoder.py between commits a0ebe6f and 7de2d22 (2023-12-05/06)
    "189_giddy_water": dict(
        hook_points=["blocks.1.mlp.hook_post"],
        architecture="standard",
        expansion_factor=4,
        seq_len=128,
        bos_policy="exclude_first",  # leading BOS dropped (rows of 127), story-boundary BOS kept
        model_batch_rows=40,
        buffer_size=5080 * 128,
        train=_reference_train(
            batch_size=5080,
            total_steps=98_425,  # 5e8 tokens
            loss={
                "regularizer": "combined_hoyer_sqrt",
                "coefficients": [1e-4, 1.5e-4],
                "batch_reduction": "sum",
            },
            resample_steps=(15_000, 25_000, 50_000, 75_000),
            resample_window=10_000,
            dead_frequency=1e-5,
            resample_pool_batches=157,
            log_every=1000,
        ),
    ),
}


def preset(name: str, **overrides: Any) -> TrainSAEJob:
    """The :class:`TrainSAEJob` of a preset, with top-level fields (and ``train`` entries) overridden.

    Raises:
        SAEError: unknown preset name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise SAEError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    d = copy.deepcopy(PRESETS[name])
    train_over = overrides.pop("train", {}) or {}
    d.update(overrides)
    d["train"] = {**d["train"], **train_over}
    return TrainSAEJob.from_dict(d)


# ------------------------------------------------------------------------------------ the pipeline's SAE recipes
SAE_RECIPES = ("topk", "reference")
"""The SAE recipes of ``saecircuits run --sae-recipe`` (:func:`pipeline_recipe`)."""
DEFAULT_SAE_RECIPE = "topk"
DEFAULT_TOPK_K = 32
"""Active features per token of the default recipe (Gao et al. 2024 train GPT-2 small's SAEs with k = 32)."""
TOPK_LR = 1e-2
"""Peak learning rate of the TopK recipe, on inputs normalised to mean norm sqrt(d_in). High because the pipeline's
runs are short (400,000 activations = 195 steps): at 1e-3, 3e-3 and 5e-3 stories260K's layer-1 SAE still had a
negative explained variance at P (-0.89, -0.39, -0.13; 0.02 at 1e-2), and the embedded default's layer 0 had 0.74
at 1e-3 and 0.87 at 1e-2 (the recipe trained on 400,000 activations as in benchmarks/sweep_l1.py, evaluated at P
on 300 prompts; benchmarks/bench_default_saes.py runs the whole pipeline with it)."""
REFERENCE_LR = 2e-3
"""Peak learning rate of the reference recipe (ReLU + L1), on inputs normalised to mean norm sqrt(d_in)."""
DEFAULT_EXPANSION_FACTOR = 4
"""Features per input dimension of the pipeline's new SAEs, unless that gives fewer than :data:`MIN_D_SAE`."""
MIN_D_SAE = 2048
"""The fewest features a pipeline SAE gets by default (:func:`pipeline_d_sae`). With 4 x d_in alone a model with a
small d_mlp gets a small dictionary: stories260K (d_mlp 172) got 688 features, whose TopK SAE (k 32, 400,000
activations) on layer 1 reconstructed the answer position worse than the prompts' mean activation (explained
variance at P -0.048, 215 validation prompts; 0.044 with 4x the steps, 0.163 with 4x the activations, 0.116 with k
64), while 2,064 features with the same budget gave 0.383 (measured 7 December with the pipeline's recipe). A
floor in features rather than in the ratio keeps the cost per activation (d_in x d_sae) at most that of a
d_in = 512 model's 2,048 features, so no model's SAEs cost more per token than the embedded default's."""
AUX_K = 256
"""Dead latents the AuxK loss uses per token (SAELens takes d_in / 2: 256 at d_mlp 512; capped at the number of
dead latents, and scaled by ``min(n_dead / aux_k, 1)``)."""
AUX_COEFFICIENT = 1 / 32
"""Weight of the AuxK loss (Gao et al. 2024)."""


def pipeline_d_sae(d_in: int, expansion_factor: int | None = None) -> int:
    """Features of a new pipeline SAE on ``d_in``-wide activations: ``expansion_factor * d_in`` when an expansion
    factor is given, else ``max(DEFAULT_EXPANSION_FACTOR * d_in, MIN_D_SAE)`` (see :data:`MIN_D_SAE`).

    Raises:
        SAEError: ``d_in`` or ``expansion_factor`` below 1.
    """
    if int(d_in) < 1 or (expansion_factor is not None and int(expansion_factor) < 1):
        raise SAEError(f"d_in and expansion_factor must be >= 1 (got {d_in}, {expansion_factor})")
    if expansion_factor is not None:
        return int(expansion_factor) * int(d_in)
    return max(DEFAULT_EXPANSION_FACTOR * int(d_in), MIN_D_SAE)


def topk_loss() -> dict[str, Any]:
    """The loss of a TopK/BatchTopK SAE: no sparsity penalty (``k`` sets the sparsity) plus AuxK against dead
    latents (:data:`AUX_K`, :data:`AUX_COEFFICIENT`)."""
    return {"regularizer": "none", "coefficients": [], "aux_k": AUX_K, "aux_coefficient": AUX_COEFFICIENT}


def pipeline_recipe(
    recipe: str,
    *,
    total_steps: int,
    batch_size: int,
    k: int = DEFAULT_TOPK_K,
    l1_coefficient: float = 0.3,
    lr: float | None = None,
    normalize_activations: bool = True,
    seed: int = 0,
) -> tuple[str, dict[str, Any], TrainConfig]:
    """``(architecture, sae_extra, TrainConfig)`` of one of the pipeline's SAE recipes.

    - ``"topk"`` (the default): a TopK SAE with ``k`` active features per token (Gao et al. 2024, "Scaling and
      evaluating sparse autoencoders"), no sparsity penalty, AuxK against dead latents with a dead-latent window
      of a tenth of the run (:func:`dead_window_for`), ``b_dec`` started at the inputs' mean, learning rate
      :data:`TOPK_LR`. Its L0 is ``k`` on every model
      whatever the scale or spread of its activations, so it needs no tuning per model.
    - ``"reference"``: the reference notebook's SAE, ReLU with a per-token L1 penalty ``l1_coefficient`` (ramped in
      over the first tenth of the run), learning rate :data:`REFERENCE_LR`. The L1 coefficient that gives a readable
      L0 differs from model to model.

    Both: unit-norm decoder rows with the parallel gradient component removed, Adam (0.9, 0.99), linear learning-rate
    warm-up over ``min(50, steps / 10)`` steps and linear decay to 0 over the last fifth, and inputs scaled to mean
    norm sqrt(d_in) when ``normalize_activations`` (folded into the saved weights).

    Raises:
        SAEError: an unknown recipe.
    """
    if recipe not in SAE_RECIPES:
        raise SAEError(f"unknown SAE recipe {recipe!r}; choose one of {', '.join(SAE_RECIPES)}")
    steps = max(1, int(total_steps))
    common = dict(
        batch_size=batch_size,
        total_steps=steps,
        lr_warmup_steps=min(50, steps // 10),
        lr_decay_steps=steps // 5,
        unit_norm_decoder=True,
        normalize_activations=normalize_activations,
        dead_window_steps=dead_window_for(steps),
        seed=seed,
        log_every=max(1, steps // 50),
    )
    if recipe == "topk":
        train = TrainConfig(lr=TOPK_LR if lr is None else lr, loss=topk_loss(), b_dec_init="mean",
                            w_enc_init="decoder_transpose", **common)
        return "topk", {"k": int(k)}, train
    train = TrainConfig(
        lr=REFERENCE_LR if lr is None else lr,
        sparsity_warmup_steps=steps // 10,
        loss={"regularizer": "l1", "coefficients": [l1_coefficient]},
        **common,
    )
    return "standard", {}, train
