"""The SAE trainer's settings: :class:`TrainConfig` (optimiser, schedules, loss, normalisation, initialisation,
resampling, dead-latent window, logging, precision, device) and :func:`dead_window_for`.

Split from :mod:`saecircuits.saes.trainer`, which re-exports both (``from saecircuits.saes.trainer import
TrainConfig`` keeps working).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from saecircuits.saes.base import SAEError


@dataclass
class TrainConfig:
    """Everything the trainer needs besides the SAE and the data (typed; JSON round-trip with ``to_dict``/``from_dict``).

    Attributes:
        batch_size: activations (tokens) per optimiser step, GLOBAL over all data-parallel ranks.
        total_steps: optimiser steps.
        lr: peak learning rate of AdamW (weight decay 0, as the notebook).
        betas: AdamW betas ((0.9, 0.99) in the notebook).
        lr_warmup_steps: linear warm-up from ``lr / lr_warmup_steps`` to ``lr`` (0 = none).
        lr_decay_steps: linear decay to ``lr * lr_end_factor`` over the last ``lr_decay_steps`` steps (0 = none).
        lr_end_factor: final learning rate as a fraction of ``lr``.
        sparsity_warmup_steps: the penalty coefficients ramp linearly from 0 to their value (0 = none).
        loss: ``saecircuits.saes.losses.LossConfig`` fields as a dict (regularizer, coefficients, batch_reduction,
            decoder_norm_weighted, aux_k, aux_coefficient).
        unit_norm_decoder: renormalise W_dec rows after every step and remove the parallel gradient component.
        normalize_activations: scale inputs so their mean L2 norm is sqrt(d_in); folded into the weights at the end.
        n_norm_batches: batches used to estimate that scale (and the mean for ``b_dec_init="mean"``).
        b_dec_init: ``"zeros"`` (the reference notebook) or ``"mean"``: before the first step ``b_dec`` is set to the
            mean of the (scaled) inputs of the first ``n_norm_batches`` batches (SAELens ``b_dec_init_method="mean"``),
            so the features need not spend a short run learning the activations' offset.
        w_enc_init: ``"kaiming"`` (the reference notebook's, from ``SAE.initialize_``) or ``"decoder_transpose"``:
            before the first step ``W_enc`` is set to ``W_dec.T`` (Gao et al. 2024, "Scaling and evaluating sparse
            autoencoders", section 2.4: fewer dead latents), once, so a resumed run is unchanged.
        resample_steps: steps (1-based, after the update) at which dead features are resampled.
        resample_window: steps of firing counts before each resample step.
        dead_frequency: a feature is dead if it fired in at most ``dead_frequency`` of the window's tokens.
        resample_pool_batches: batches drawn from the data (and used for nothing else) as the resampling pool.
        resample_error_power: sampling weight ``||x - x_hat||^power``; 4 = the notebook's rule.
        resample_encoder_scale: new encoder columns get this times the mean norm of the alive columns (0.2).
        dead_window_steps: steps without firing after which a feature counts as dead for AuxK and the logged
            dead fraction; ``None`` (default): :func:`dead_window_for` the run (a tenth of it, at most 1000). Until
            the run has that many steps, the logged dead fraction counts the features that have not fired since
            the start (metrics ``dead_window_steps`` says which window a line used).
        dense_frequency: features firing on more than this fraction of the log window's tokens count as dense.
        seed: seed of the trainer's own generator (resampling); the global RNG is never touched.
        log_every: steps between metrics lines (JSONL and progress bar).
        checkpoint_every: steps between checkpoints (0 = only when a checkpoint_dir is given, at the end).
        autocast_dtype: ``None`` (fp32) or ``"bfloat16"`` autocast for forward and loss (a ``"torch."`` prefix
            is accepted); ``"float16"`` is refused (its gradients underflow without a gradient scaler).
        device: where the SAE trains (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    """

    batch_size: int = 4096
    total_steps: int = 1000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0
    lr_end_factor: float = 0.0
    sparsity_warmup_steps: int = 0
    loss: dict[str, Any] = field(default_factory=lambda: {"regularizer": "l1", "coefficients": [1e-3]})
    unit_norm_decoder: bool = True
    normalize_activations: bool = False
    n_norm_batches: int = 10
    b_dec_init: str = "zeros"
    w_enc_init: str = "kaiming"
    resample_steps: tuple[int, ...] = ()
    resample_window: int = 10000
    dead_frequency: float = 1e-5
    resample_pool_batches: int = 10
    resample_error_power: float = 4.0
    resample_encoder_scale: float = 0.2
    dead_window_steps: int | None = None
    dense_frequency: float = 0.1
    seed: int = 47
    log_every: int = 10
    checkpoint_every: int = 0
    autocast_dtype: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.resample_steps = tuple(int(s) for s in self.resample_steps)
        self.loss = dict(self.loss)
        if isinstance(self.autocast_dtype, str):  # "torch.bfloat16" names the same dtype
            self.autocast_dtype = self.autocast_dtype.strip().removeprefix("torch.")
        problems = []
        if self.batch_size <= 0:
            problems.append(f"batch_size must be positive (got {self.batch_size})")
        if self.total_steps <= 0:
            problems.append(f"total_steps must be positive (got {self.total_steps})")
        if not (math.isfinite(self.lr) and self.lr > 0):  # `lr <= 0` let NaN through to torch's bare ValueError
            problems.append(f"lr must be a positive finite number (got {self.lr})")
        if self.autocast_dtype == "float16":
            # fp16's range (min normal 6e-5) makes small gradients underflow to 0 unless a gradient scaler rescales
            # the loss; bf16 has fp32's range, so it needs none
            problems.append("autocast_dtype 'float16' is refused: float16 gradients underflow silently without a "
                            "gradient scaler; use 'bfloat16' (the same speed-up, with float32's range)")
        elif self.autocast_dtype not in (None, "bfloat16"):
            problems.append(f"autocast_dtype must be None or 'bfloat16' (got {self.autocast_dtype!r})")
        if self.dead_window_steps is not None and not (
                isinstance(self.dead_window_steps, int) and self.dead_window_steps >= 1):
            problems.append(f"dead_window_steps must be a positive number of steps or None (got "
                            f"{self.dead_window_steps!r})")
        if self.b_dec_init not in ("zeros", "mean"):
            problems.append(f"b_dec_init must be 'zeros' or 'mean' (got {self.b_dec_init!r})")
        if self.w_enc_init not in ("kaiming", "decoder_transpose"):
            problems.append(f"w_enc_init must be 'kaiming' or 'decoder_transpose' (got {self.w_enc_init!r})")
        if any(s <= 0 for s in self.resample_steps):
            problems.append(f"resample_steps must be positive step numbers (got {self.resample_steps})")
        if problems:
            raise SAEError("bad TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["resample_steps"] = list(self.resample_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a JSON file); unknown keys raise :class:`SAEError` listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SAEError(f"unknown TrainConfig keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)

    @property
    def dead_window(self) -> int:
        """The dead-latent window in steps: ``dead_window_steps``, or :func:`dead_window_for` the run."""
        return self.dead_window_steps if self.dead_window_steps is not None else dead_window_for(self.total_steps)

    def loss_config(self) -> Any:
        """The :class:`saecircuits.saes.losses.LossConfig` built from :attr:`loss`."""
        from saecircuits.saes.losses import LossConfig

        d = dict(self.loss)
        if "coefficients" in d:
            d["coefficients"] = tuple(float(c) for c in d["coefficients"])
        return LossConfig(**d)


def dead_window_for(total_steps: int) -> int:
    """Steps without firing after which a latent counts as dead (for AuxK and the logged dead fraction) in a run of
    ``total_steps``: a tenth of the run, at most 1000 (SAELens' default window) and at least 1, so a short run can
    see its dead latents (a window longer than the run never finds one)."""
    return max(1, min(1000, int(total_steps) // 10))
