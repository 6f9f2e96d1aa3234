"""SAE training: a pure trainer that never sees the language model, and a one-pass helper for many hook points.

:class:`SAETrainer` (SAELens style) consumes an iterator of activation batches ``[batch, d_in]`` and applies the
reference notebook's recipe (``sparse_coding/train_autoencoder.py``) plus modern tricks:

- loss from :func:`saecircuits.saes.losses.sae_training_loss` (MSE summed over d_in, mean over batch; penalties per
  token, or batch-summed to reproduce the original convention);
- unit-norm decoder rows with the parallel gradient component removed (a switch);
- AdamW with weight decay 0, optional linear learning-rate warm-up and linear decay, sparsity-coefficient
  warm-up;
- activation normalisation: a scale estimated from the first batches so the mean L2 norm of inputs is sqrt(d_in)
  (SAELens ``expected_average_only_in``), folded into the weights at the end so the saved SAE works on RAW
  activations (:meth:`SAE.fold_activation_scale_`);
- dead-feature resampling in the notebook's style: firing counts over a window before each resample step,
  dead = count <= frequency * window * batch, inputs drawn from a pool with probability proportional to
  ``||x - x_hat||^power`` (``power=4`` is the original rule; ``2`` is Anthropic's), seeded; Adam moments
  of the resampled rows/columns reset;
- metrics log (JSONL), progress bar with live L0/MSE (plain lines in a log file), periodic atomic checkpoints with optimiser, scheduler and RNG
  state; ``resume=True`` continues from the last checkpoint and ends with the same weights as an uninterrupted run;
- data parallel training with ``torch.distributed`` (torchrun; NCCL on GPUs, gloo on CPU): every rank trains on its
  own batches, gradients are averaged with ``all_reduce``, rank 0 writes checkpoints, logs and the final SAE.

:func:`train_saes_on_model` feeds several trainers from ONE pass of the model over packed token rows.

Precision: parameters, optimiser and inputs are fp32 (or fp64); :class:`SAETrainer` refuses an SAE with float16 or
bfloat16 parameters, whose Adam steps of about ``lr`` would be rounded away (8 significant bits). For speed,
``TrainConfig.autocast_dtype="bfloat16"`` runs the SAE forward and loss under ``torch.autocast`` (faster on GPUs with
bf16 tensor cores, ~3 significant digits in the matmuls) while the parameters stay fp32; convert the trained SAE with
``.to(torch.bfloat16)`` afterwards if wanted (thresholds stay fp32). Activations may also be stored in bf16 by the
data path (``dtype=torch.bfloat16``), as the notebook did.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saecircuits.atomic import atomic_write, atomic_write_text
from saecircuits.saes.base import SAE, SAEConfig, SAEError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
#: cfg.extra settings that steer training steps: a resumed run must have the same.
_RESUME_SETTINGS = ("k", "bandwidth", "threshold_lr")
#: cfg.extra settings of the initialisation only: a resumed run takes the checkpoint's (its weights come from them).
_INIT_SETTINGS = ("seed", "threshold_init")
METRICS_NAME = "metrics.jsonl"


# --------------------------------------------------------------------------------------------------- config
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
        if self.lr <= 0:
            problems.append(f"lr must be positive (got {self.lr})")
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


# --------------------------------------------------------------------------------------------------- helpers
def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _decoder_constraints() -> tuple[Callable[[SAE], Any], Callable[[SAE], Any]]:
    """(normalize_decoder_rows_, remove_parallel_grad_component_) from ``saes.constraints``."""
    from saecircuits.saes import constraints

    return constraints.normalize_decoder_rows_, constraints.remove_parallel_grad_component_


def _check_trainable_precision(sae: SAE) -> None:
    """Refuse float16/bfloat16 trainable parameters: Adam's per-step change (about ``lr``) is below their resolution.

    Raises:
        SAEError: naming the parameter, its dtype and the fix.
    """
    from saecircuits.saes.base import LOW_PRECISION_DTYPES

    for name, p in sae.named_parameters():
        if p.requires_grad and p.dtype in LOW_PRECISION_DTYPES:
            raise SAEError(
                f"SAE parameter {name} is {str(p.dtype).removeprefix('torch.')}: Adam steps of about lr would be "
                "rounded away at that precision, so the SAE is not trained; build it in float32 "
                "(SAEConfig(dtype='float32') or sae.float()), use TrainConfig(autocast_dtype='bfloat16') for "
                "bf16 speed, and convert the trained SAE with .to(torch.bfloat16) afterwards"
            )


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over a batch ``[batch, d_in]`` (1 = perfect, 0 = the mean).

    :func:`saecircuits.saes.metrics.explained_variance` (the one formula), except that a batch whose activations
    do not vary gives NaN (undefined, logged as such) instead of stopping the training run.
    """
    from saecircuits.saes.metrics import explained_variance as ev

    try:
        return ev(x.detach(), x_hat.detach())
    except SAEError:
        return float("nan")


def _shrinkage(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """:func:`saecircuits.saes.metrics.shrinkage` of a batch (the one formula); NaN for an all-zero batch."""
    from saecircuits.saes.metrics import shrinkage

    try:
        return shrinkage(x.detach(), x_hat.detach())
    except SAEError:
        return float("nan")


# --------------------------------------------------------------------------------------------------- trainer
class SAETrainer:
    """Train one SAE on an iterator of activation batches (never sees the language model).

    Args:
        sae: an initialised SAE (e.g. ``build_sae(cfg)``); trained in place on ``cfg.device``.
        batches: iterator of ``[local_batch, d_in]`` tensors, where ``local_batch = cfg.batch_size // world_size``.
            Under data parallelism each rank passes its own shard. For ``resume`` it must yield the same sequence as
            in the interrupted run (same seed); already-consumed batches are skipped (``batches.skip(n)`` is used if
            the object has it, else ``n`` batches are drawn and discarded).
        cfg: the :class:`TrainConfig`.
        checkpoint_dir: folder for ``checkpoint.pt`` and ``metrics.jsonl`` (rank 0 writes); ``None`` = neither.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists.
        progress: show progress (rank 0 only; a tqdm bar on a terminal, plain lines in a log).
        wandb_run: an optional ``wandb`` run object; metrics lines are also sent to it (rank 0).

    Raises:
        SAEError: batches of the wrong width, a batch size not divisible by the world size, a checkpoint that does
            not match this SAE, an SAE with float16/bfloat16 parameters.
    """

    def __init__(
        self,
        sae: SAE,
        batches: Iterable[torch.Tensor],
        cfg: TrainConfig,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
        wandb_run: Any = None,
        name: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size = _dist_info()
        if cfg.batch_size % self.world_size:
            raise SAEError(
                f"batch_size {cfg.batch_size} is not divisible by the world size {self.world_size}; "
                "choose a global batch that splits evenly over the ranks"
            )
        self.local_batch = cfg.batch_size // self.world_size
        if not sae.trainable or sae.decode_needs_input or sae.is_transcoder:
            raise SAEError(
                f"the {sae.architecture!r} SAE on {sae.hook_point} cannot be trained here (saecircuits trains "
                "standard, topk, batchtopk and jumprelu SAEs that reconstruct their own input); analyse it instead"
            )
        _check_trainable_precision(sae)
        self.device = torch.device(cfg.device)
        # train mode: a loaded SAE comes in eval mode, where BatchTopK would not update its threshold
        self.sae = sae.to(self.device).train()
        self.name = name or sae.hook_point
        self._source = iter(batches)
        self._skip_target = batches
        self._pending: deque[torch.Tensor] = deque()
        self.loss_cfg = cfg.loss_config()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress and self.rank == 0
        self.wandb_run = wandb_run

        self.optimizer = torch.optim.Adam(
            [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec] + self._extra_params(), lr=cfg.lr, betas=cfg.betas
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        self.step = 0  # optimiser steps done
        self.batches_consumed = 0  # batches drawn from the source (training + resampling pools)
        self.scale = 1.0
        self.scale_estimated = False
        d_sae = sae.d_sae
        self.window_counts = torch.zeros(d_sae, dtype=torch.float64, device=self.device)
        self.log_counts = torch.zeros(d_sae, dtype=torch.float64, device=self.device)
        self.log_tokens = 0
        self.steps_since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.last_metrics: dict[str, float] = {}
        self.n_resampled_total = 0
        if cfg.unit_norm_decoder:
            self._normalize, self._project = _decoder_constraints()
        if resume and self.checkpoint_dir is not None and (self.checkpoint_dir / CHECKPOINT_NAME).exists():
            self.load_checkpoint(self.checkpoint_dir / CHECKPOINT_NAME)

    # ------------------------------------------------------------------ schedules
    def _extra_params(self) -> list[nn.Parameter]:
        core = {id(p) for p in (self.sae.W_enc, self.sae.W_dec, self.sae.b_enc, self.sae.b_dec)}
        return [p for p in self.sae.parameters() if id(p) not in core and p.requires_grad]

    def _lr_factor(self, step: int) -> float:
        """LambdaLR factor for 0-based ``step``: linear warm-up, constant, linear decay."""
        cfg = self.cfg
        f = 1.0
        if cfg.lr_warmup_steps > 0:
            f = min(f, (step + 1) / cfg.lr_warmup_steps)
        if cfg.lr_decay_steps > 0:
            start = cfg.total_steps - cfg.lr_decay_steps
            if step >= start:
                frac = (cfg.total_steps - step) / cfg.lr_decay_steps
                f = min(f, cfg.lr_end_factor + (1.0 - cfg.lr_end_factor) * frac)
        return f

    def sparsity_scale(self, step: int | None = None) -> float:
        """Penalty multiplier at 0-based ``step`` (linear warm-up from 1/warmup to 1)."""
        step = self.step if step is None else step
        if self.cfg.sparsity_warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.cfg.sparsity_warmup_steps)

    # ------------------------------------------------------------------ data
    def _draw(self) -> torch.Tensor:
        if self._pending:
            x = self._pending.popleft()
        else:
            try:
                x = next(self._source)
            except StopIteration:
                raise SAEError(
                    f"the activation batches ran out after {self.batches_consumed} batches, before step "
                    f"{self.cfg.total_steps}; give more data (more token rows or epochs) or fewer total_steps"
                ) from None
        self.batches_consumed += 1
        if x.ndim != 2 or x.shape[1] != self.sae.d_in or x.shape[0] != self.local_batch:
            raise SAEError(
                f"{self.name}: expected activation batches [{self.local_batch}, {self.sae.d_in}] "
                f"(batch_size / world_size, d_in), got {tuple(x.shape)}"
            )
        return x.to(self.device, torch.float32) * self.scale

    def _all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
        return t

    @torch.no_grad()
    def estimate_scale(self) -> float:
        """Scale so that the mean L2 norm of (scaled) inputs is sqrt(d_in), from ``n_norm_batches`` batches.

        The batches are put back and still used for training (SAELens ``expected_average_only_in``). Under data
        parallelism the mean norm is averaged over ranks so every rank uses the same scale.
        """
        norms = []
        for _ in range(max(1, self.cfg.n_norm_batches)):
            try:
                x = next(self._source)
            except StopIteration:
                break
            self._pending.append(x)
            norms.append(x.to(self.device, torch.float32).norm(dim=-1).mean())
        if not norms:
            raise SAEError("no activation batches to estimate the normalisation scale from")
        mean_norm = self._all_reduce(torch.stack(norms).mean().double()) / self.world_size
        if not float(mean_norm) > 0:
            raise SAEError(
                f"{self.name}: the activations have mean norm {float(mean_norm):.3g}, so they cannot be normalised; "
                "check the hook point (does it carry a signal?) or train with normalize_activations=False"
            )
        self.scale = float(math.sqrt(self.sae.d_in) / float(mean_norm))
        self.scale_estimated = True
        return self.scale

    @torch.no_grad()
    def init_b_dec_(self) -> torch.Tensor:
        """Set ``b_dec`` to the mean of the scaled inputs of the first ``n_norm_batches`` batches (put back and still
        used for training; averaged over ranks under data parallelism). Returns the new ``b_dec [d_in]``."""
        while len(self._pending) < max(1, self.cfg.n_norm_batches):
            try:
                self._pending.append(next(self._source))
            except StopIteration:
                break
        if not self._pending:
            raise SAEError("no activation batches to initialise b_dec from")
        xs = [x.to(self.device, torch.float32) * self.scale for x in list(self._pending)[: max(1, self.cfg.n_norm_batches)]]
        mean = self._all_reduce(torch.cat(xs).double().mean(0)) / self.world_size
        self.sae.b_dec.copy_(mean.to(self.sae.b_dec.dtype))
        return self.sae.b_dec.detach()

    # ------------------------------------------------------------------ one step
    @torch.enable_grad()  # trains even when the caller runs under torch.no_grad()
    def train_step(self) -> dict[str, float] | None:
        """One optimiser step (plus resampling / checkpoint / logging when due). Returns the metrics when logged."""
        from saecircuits.saes.losses import sae_training_loss

        cfg = self.cfg
        if cfg.normalize_activations and not self.scale_estimated:
            self.estimate_scale()
        if cfg.b_dec_init == "mean" and self.step == 0:
            self.init_b_dec_()
        if cfg.w_enc_init == "decoder_transpose" and self.step == 0:
            with torch.no_grad():
                self.sae.W_enc.copy_(self.sae.W_dec.T)
        x = self._draw()
        sae = self.sae
        sae.train()  # even if the caller put it in eval mode between steps
        dead_mask = self.steps_since_fired >= cfg.dead_window if self.loss_cfg.aux_k else None
        sparsity = self.sparsity_scale()
        if self.world_size > 1 and getattr(self.loss_cfg, "batch_reduction", "mean") == "sum":
            # batch-summed penalties: averaging gradients over ranks would divide them by world_size
            sparsity *= self.world_size
        autocast = (
            torch.autocast(self.device.type, dtype=getattr(torch, cfg.autocast_dtype))
            if cfg.autocast_dtype
            else torch.autocast(self.device.type, enabled=False)
        )
        with autocast:
            out = sae_training_loss(sae, x, self.loss_cfg, sparsity_scale=sparsity, dead_mask=dead_mask)
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.world_size > 1:
            grads = [p.grad for p in self.optimizer.param_groups[0]["params"] if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        if cfg.unit_norm_decoder:
            self._project(sae)
        self._lr_used = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        sae.after_optimizer_step_()
        self.scheduler.step()
        if cfg.unit_norm_decoder:
            self._normalize(sae)
        self.step += 1

        with torch.no_grad():
            fired = (out.f.detach() > 0).to(torch.float64).sum(0)
            self._all_reduce(fired)
            self.window_counts += fired
            self.log_counts += fired
            self.log_tokens += cfg.batch_size
            self.steps_since_fired = torch.where(fired > 0, 0, self.steps_since_fired + 1)

        for s in cfg.resample_steps:
            if self.step == s - cfg.resample_window:
                self.window_counts.zero_()
        if self.step in cfg.resample_steps:
            self.resample_dead()
            self.window_counts.zero_()

        metrics = None
        if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
            metrics = self._metrics(x, out)
            self._log(metrics)
        if (
            self.checkpoint_dir is not None
            and cfg.checkpoint_every > 0
            and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps)
        ):
            self.save_checkpoint()
        return metrics

    @torch.no_grad()
    def _metrics(self, x: torch.Tensor, out: Any) -> dict[str, float]:
        f, x_hat = out.f.detach().float(), out.x_hat.detach().float()
        freq = self.log_counts / max(self.log_tokens, 1)
        window = min(self.cfg.dead_window, self.step)
        m = {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "lr": self._lr_used,  # the rate of this step's update
            "sparsity_scale": self.sparsity_scale(self.step - 1),
            "loss": float(out.total.detach()),
            "l0": float((f > 0).float().sum(-1).mean()),
            # per token, summed over d_in, in the units the SAE sees (scaled when normalize_activations)
            "mse": float((x_hat - x).pow(2).sum(-1).mean()),
            # over this batch's tokens (not results.json's explained_variance_at_p, across prompts at P)
            "explained_variance_tokens": explained_variance(x, x_hat),
            # sum ||x_hat|| / sum ||x||: below 1 when the sparsity penalty shrinks reconstructions
            "shrinkage": _shrinkage(x, x_hat),
            # dead: no firing in the last `window` steps; before the run has the full window, none since the start
            # (with the full window a short run would always log 0.0)
            "dead_fraction": float((self.steps_since_fired >= window).float().mean()),
            "dead_window_steps": window,
            "dense_fraction": float((freq > self.cfg.dense_frequency).float().mean()),
            "resampled_total": self.n_resampled_total,
        }
        # log10 feature density over this log window: 20 bins on [-8, 0]; dead features land in the first bin.
        from saecircuits.saes.metrics import feature_density_histogram

        edges, hist = feature_density_histogram(self.log_counts.cpu(), max(self.log_tokens, 1), bins=20, low=-8.0)
        m["log10_density_hist"] = {"low": -8.0, "high": 0.0, "counts": hist.tolist()}
        for k, v in out.terms.items():
            m[f"loss/{k}"] = float(v)
        self.log_counts.zero_()
        self.log_tokens = 0
        self.last_metrics = m
        return m

    def _log(self, m: dict[str, float]) -> None:
        if self.rank != 0:
            return
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            with open(self.checkpoint_dir / METRICS_NAME, "a") as fh:
                fh.write(json.dumps(m) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{self.name}/{k}": v for k, v in m.items()}, step=int(m["step"]))

    # ------------------------------------------------------------------ resampling
    @torch.no_grad()
    def resample_dead(self) -> int:
        """Resample dead features in the notebook's style. Returns how many were resampled.

        Dead: window firing count ``<= dead_frequency * resample_window * batch_size``. A pool of
        ``resample_pool_batches`` fresh batches is drawn (gathered over ranks, so all ranks agree); rows are drawn
        without replacement with probability ``||x - x_hat||^resample_error_power`` from the trainer's seeded
        generator; ``W_dec[D] = x / ||x||``, ``W_enc[:, D] = W_dec[D].T * resample_encoder_scale * mean alive encoder
        column norm``, ``b_enc[D] = 0``; Adam moments of those entries are zeroed (``b_dec`` untouched). If there
        are more dead features than pool rows with non-zero error, only that many (the first dead ones) are resampled.
        """
        cfg, sae = self.cfg, self.sae
        window = min(cfg.resample_window, self.step)
        threshold = cfg.dead_frequency * window * cfg.batch_size
        dead = torch.nonzero(self.window_counts <= threshold).flatten()
        pool = []
        for _ in range(max(1, cfg.resample_pool_batches)):
            x = self._draw()
            if self.world_size > 1:
                parts = [torch.empty_like(x) for _ in range(self.world_size)]
                torch.distributed.all_gather(parts, x)
                x = torch.cat(parts)
            pool.append(x)
        if dead.numel() == 0:
            return 0
        x = torch.cat(pool)
        x_hat = sae(x)
        err = (x_hat - x).pow(2).sum(-1).sqrt().double()
        weights = err.pow(cfg.resample_error_power)
        if not torch.isfinite(weights).all() or float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        # without replacement: at most as many draws as rows with positive weight (the notebook would crash)
        n = min(dead.numel(), int((weights > 0).sum()))
        dead = dead[:n]
        idx = torch.multinomial(weights.cpu(), n, replacement=False, generator=self.generator).to(x.device)
        v = x[idx]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = torch.ones(sae.d_sae, dtype=torch.bool, device=x.device)
        alive[dead] = False
        enc_norm = (
            sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0, device=x.device)
        )
        sae.W_dec.data[dead] = v.to(sae.W_dec.dtype)
        sae.W_enc.data[:, dead] = (v.T * cfg.resample_encoder_scale * enc_norm).to(sae.W_enc.dtype)
        sae.b_enc.data[dead] = 0.0
        for p, sel in ((sae.W_enc, (slice(None), dead)), (sae.W_dec, (dead,)), (sae.b_enc, (dead,))):
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][sel] = 0.0
        self.steps_since_fired[dead] = 0
        self.n_resampled_total += n
        logger.info("%s: resampled %d dead features at step %d", self.name, n, self.step)
        return n

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain values only: loads with ``weights_only=True``)."""
        return {
            "format": "saecircuits-sae-train-checkpoint-v1",
            "sae_cfg": json.dumps(self.sae.cfg.to_dict()),
            "train_cfg": json.dumps(self.cfg.to_dict()),
            "sae": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "scale": self.scale,
            "scale_estimated": self.scale_estimated,
            "window_counts": self.window_counts.cpu(),
            "log_counts": self.log_counts.cpu(),
            "log_tokens": self.log_tokens,
            "steps_since_fired": self.steps_since_fired.cpu(),
            "n_resampled_total": self.n_resampled_total,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint_dir/checkpoint.pt`` atomically (rank 0; other ranks wait at a barrier)."""
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / CHECKPOINT_NAME
        if self.rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(self.state_dict(), path)
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` and skip the batches the run had consumed.

        The SAE's initialisation settings (``seed``, ``threshold_init``) become the checkpoint's, since its
        weights come from them.

        Raises:
            SAEError: unreadable file, or a checkpoint for a different SAE (architecture, sizes, hook point,
                ``apply_b_dec_to_input``, dtype, ``k``, ``bandwidth``, ``threshold_lr``).
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise SAEError(f"cannot read checkpoint {path}: {err}; delete it to start over") from err
        saved_cfg = json.loads(state["sae_cfg"])
        mine = self.sae.cfg.to_dict()
        pairs = [(key, saved_cfg.get(key), mine.get(key)) for key in
                 ("architecture", "d_in", "d_sae", "hook_point", "apply_b_dec_to_input", "dtype")]
        # architecture settings: a resumed run must keep them (checkpoints from before they were all recorded
        # may lack some; those are not compared)
        saved_extra, my_extra = saved_cfg.get("extra", {}), mine["extra"]
        pairs += [(f"extra[{key!r}]", saved_extra[key], my_extra.get(key)) for key in _RESUME_SETTINGS
                  if key in saved_extra]
        for key, theirs, ours in pairs:
            if theirs != ours:
                raise SAEError(
                    f"checkpoint {path} is for {key}={theirs!r}, this run has {ours!r}; "
                    "use another checkpoint folder or the same SAE config"
                )
        if "log_threshold" in state["sae"]:
            # its Adam moments are in log units: continuing would take wrong steps on the (now direct) threshold
            raise SAEError(
                f"checkpoint {path} trained the JumpReLU threshold as exp(log_threshold), as versions before the "
                "threshold was trained directly did; it cannot be resumed: delete it to start over"
            )
        self.sae.load_state_dict({k: v.to(self.device) for k, v in state["sae"].items()})
        for key in _INIT_SETTINGS:
            if key in saved_extra:
                self.sae.cfg.extra[key] = saved_extra[key]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.scale = float(state["scale"])
        self.scale_estimated = bool(state["scale_estimated"])
        self.window_counts = state["window_counts"].to(self.device)
        self.log_counts = state["log_counts"].to(self.device)
        self.log_tokens = int(state["log_tokens"])
        self.steps_since_fired = state["steps_since_fired"].to(self.device)
        self.n_resampled_total = int(state["n_resampled_total"])
        n_skip = int(state["batches_consumed"])
        skip = getattr(self._skip_target, "skip", None)
        if callable(skip):
            skip(n_skip)
        else:
            for _ in range(n_skip):
                next(self._source)
        self.batches_consumed = n_skip
        if self.rank == 0 and self.checkpoint_dir is not None:
            _truncate_metrics(self.checkpoint_dir / METRICS_NAME, self.step)
        logger.info("%s: resumed from %s at step %d", self.name, path, self.step)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> SAE:
        """Train to ``total_steps`` and return a COPY of the SAE with the activation scale folded in.

        The returned SAE works on raw activations; its ``cfg.extra["training"]`` records the train config, and
        ``cfg.extra["folded_activation_scale"]`` the scale (if any).
        """
        bar = _progress(self.cfg.total_steps, self.step, self.name, self.progress)
        try:
            while self.step < self.cfg.total_steps:
                m = self.train_step()
                bar.update(1)
                if m is not None:
                    bar.set_postfix(
                        L0=f"{m['l0']:.1f}", MSE=f"{m['mse']:.4g}", EV=f"{m['explained_variance_tokens']:.3f}"
                    )
        finally:
            bar.close()
            self.sae.eval()  # trained: inference mode, as a loaded SAE
        return self.finished_sae()

    def finished_sae(self) -> SAE:
        """A copy of the trained SAE on the CPU, in eval mode, with the normalisation folded in (works on raw
        activations)."""
        sae = copy.deepcopy(self.sae).cpu().eval()
        if self.scale != 1.0:
            sae.fold_activation_scale_(self.scale)
        sae.cfg.extra["training"] = {
            "steps": self.step,
            "tokens": self.step * self.cfg.batch_size,
            **self.cfg.to_dict(),
        }
        return sae


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after ``step`` (they belong to the killed part of the run)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    # A tqdm bar on a terminal; whole lines (about ten per run) in a log file.
    from saecircuits.progress import progress_bar

    return progress_bar(total=total, initial=initial, desc=desc, enabled=enabled)


# --------------------------------------------------------------------------------------------------- one LM pass
def _key_view(shared: Iterator[dict[str, torch.Tensor]], key: str) -> Iterator[torch.Tensor]:
    for batch in shared:
        yield batch[key]


class _MultiSource:
    """Tee one iterator of ``{hook: batch}`` into one iterator per (trainer, hook)."""

    def __init__(self, shared: Iterator[dict[str, torch.Tensor]], keys: Sequence[str]) -> None:
        tees = itertools.tee(shared, len(keys))
        self.views = [_key_view(t, k) for t, k in zip(tees, keys, strict=True)]


def train_saes(
    batches: Iterable[dict[str, torch.Tensor]],
    saes: dict[str, SAE] | Sequence[tuple[str, SAE]],
    train_cfg: TrainConfig,
    *,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    wandb_run: Any = None,
    data_settings: dict[str, Any] | None = None,
) -> dict[str, SAE]:
    """Train several SAEs in lock-step from ONE stream of multi-hook batches ``{hook_point: [batch, d_in]}``.

    Each entry of ``saes`` is ``(name, sae)``; the SAE reads ``batch[sae.hook_point]``, so several SAEs may share a
    hook point (a hyper-parameter sweep). Every SAE gets its own :class:`SAETrainer` with checkpoints and metrics in
    ``output_dir/<name>/`` and, at the end, the SAELens folder ``output_dir/<name>/sae/`` (rank 0).
    ``data_settings`` (JSON-serialisable: how the batches were made, e.g. the BOS policy) is recorded in every
    SAE's ``cfg.extra["training"]["data"]`` beside the train config, so ``cfg.json`` says how it was trained.

    Returns:
        ``{name: trained SAE}`` (normalisation folded, on the CPU).
    """
    from saecircuits.saes.io import save_sae

    items = list(saes.items()) if isinstance(saes, dict) else list(saes)
    if not items:
        raise SAEError("give at least one SAE to train")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise SAEError(f"SAE names must be unique, got {names}")
    source = _MultiSource(iter(batches), [s.hook_point for _, s in items])
    out_root = Path(output_dir) if output_dir is not None else None
    trainers = [
        SAETrainer(
            sae,
            view,
            train_cfg,
            checkpoint_dir=(out_root / _safe(name)) if out_root is not None else None,
            resume=resume,
            progress=False,
            wandb_run=wandb_run,
            name=name,
        )
        for (name, sae), view in zip(items, source.views, strict=True)
    ]
    rank, _ = _dist_info()
    start = min(t.step for t in trainers)
    bar = _progress(train_cfg.total_steps, start, "train SAEs", progress and rank == 0)
    try:
        for _ in range(start, train_cfg.total_steps):
            post = {}
            for t in trainers:
                if t.step < train_cfg.total_steps:
                    t.train_step()
                if t.last_metrics:
                    short = t.name.replace("blocks.", "b").replace(".mlp.hook_post", "")
                    post[short] = f"L0 {t.last_metrics['l0']:.1f} MSE {t.last_metrics['mse']:.3g}"
            bar.update(1)
            if post:
                bar.set_postfix(post, refresh=False)
    finally:
        bar.close()
        for t in trainers:
            t.sae.eval()
    result = {}
    for t in trainers:
        sae = t.finished_sae()
        if data_settings:
            sae.cfg.extra["training"]["data"] = dict(data_settings)
        result[t.name] = sae
        if out_root is not None and rank == 0:
            folder = out_root / _safe(t.name) / "sae"
            save_sae(sae, folder)
            logger.info("%s: SAE written to %s", t.name, folder)
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def train_saes_on_model(
    model: Any,
    token_rows: torch.Tensor,
    hook_points: Sequence[str],
    train_cfg: TrainConfig,
    sae_cfgs: SAEConfig | Sequence[SAEConfig] | None = None,
    *,
    expansion_factor: int = 4,
    architecture: str = "standard",
    sae_extra: dict[str, Any] | None = None,
    bos_id: int | Collection[int] | None = None,
    bos_policy: str = "include",
    model_batch_rows: int = 32,
    buffer_size: int | None = None,
    activation_dtype: torch.dtype = torch.float32,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    shard: bool = True,
    model_name: str = "",
    wandb_run: Any = None,
) -> dict[str, SAE]:
    """Train one SAE per hook point from ONE pass of the model over packed token rows (the end-to-end entry point).

    Defaults give the reference notebook's SAE: ReLU (``"standard"``), expansion 4,
    seed-47 init, L1 penalty, unit-norm decoder rows with the parallel gradient removed, Adam lr 1e-4 betas
    (0.9, 0.99) -- set ``train_cfg.loss`` for the penalty.

    Args:
        model: TransformerLens ``TransformerBridge`` (or anything with ``run_with_cache``), ``d_in`` is read from
            the first batch.
        token_rows: int64 ``[n_rows, seq]`` (:func:`saecircuits.data.activations.pack_token_rows`); rows repeat
            (reshuffled, seeded) until ``total_steps`` is reached. Under torchrun each rank takes its own shard.
        hook_points: e.g. ``[f"blocks.{L}.mlp.hook_post" for L in range(n_layers)]``.
        train_cfg: :class:`TrainConfig` (``batch_size`` = tokens per step over all ranks).
        sae_cfgs: one :class:`SAEConfig` per hook point (same order), or ``None`` to build ``architecture`` with
            ``d_sae = expansion_factor * d_in`` and ``cfg.extra = sae_extra`` (e.g. ``{"k": 32}`` for TopK).
        bos_id, bos_policy: the BOS switch (``"include"``/``"exclude"``), see
            :func:`saecircuits.data.activations.bos_keep_mask`.
        model_batch_rows: rows per model forward; buffer_size: rows in the shuffling buffer (default
            ``max(16 * local batch, 2 * local batch)``).
        activation_dtype: storage dtype of activations (fp32 default; bf16 documented option).
        output_dir: checkpoints, metrics and ``<hook>/sae/`` SAELens folders; resume: continue from its checkpoints.

    Returns:
        ``{hook_point: SAE}`` on the CPU, working on raw activations.

    Raises:
        SAEError: hook points and configs disagree; ActivationDataError: bad rows or unknown hook point.
    """
    from saecircuits.data.activations import model_activation_batches, shard_rows
    from saecircuits.saes.processing import record_model_processing
    from saecircuits.saes.registry import build_sae

    hook_points = list(hook_points)
    if len(set(hook_points)) != len(hook_points):
        raise SAEError(f"hook points must be unique, got {hook_points} (use train_saes for sweeps)")
    rank, world = _dist_info()
    rows = shard_rows(token_rows, rank, world) if (shard and world > 1) else token_rows
    local_batch = train_cfg.batch_size // world
    batches = model_activation_batches(
        model,
        rows,
        hook_points,
        local_batch,
        model_batch_rows=model_batch_rows,
        buffer_size=buffer_size or max(16 * local_batch, 2 * local_batch),
        bos_id=bos_id,
        bos_policy=bos_policy,  # type: ignore[arg-type]
        dtype=activation_dtype,
        seed=train_cfg.seed,
        epochs=None,
    )
    if sae_cfgs is None:
        first = next(batches)
        batches = itertools.chain([first], batches)
        cfgs = [
            SAEConfig(
                architecture=architecture,
                d_in=int(first[hp].shape[-1]),
                d_sae=expansion_factor * int(first[hp].shape[-1]),
                hook_point=hp,
                model_name=model_name,
                extra=dict(sae_extra or {}),
            )
            for hp in hook_points
        ]
    else:
        cfgs = [sae_cfgs] if isinstance(sae_cfgs, SAEConfig) else list(sae_cfgs)
        if [c.hook_point for c in cfgs] != hook_points:
            raise SAEError(
                f"sae_cfgs hook points {[c.hook_point for c in cfgs]} must equal hook_points {hook_points} (same order)"
            )
    saes = [(c.hook_point, build_sae(c)) for c in cfgs]
    for _, sae in saes:  # an SAE on a hook that weight processing changes records the model's switches
        record_model_processing(sae, model)
    data_settings = {
        "seq_len": int(token_rows.shape[1]),
        "n_rows": int(token_rows.shape[0]),
        # one id, or the set of special ids (BOS/EOS/PAD) the "exclude" policy leaves out wherever they sit
        "bos_id": None if bos_id is None else (sorted(int(i) for i in bos_id) if isinstance(bos_id, (set, frozenset))
                                               else int(bos_id)),
        "bos_policy": bos_policy,
        "model_batch_rows": int(model_batch_rows),
        "buffer_size": int(buffer_size or max(16 * local_batch, 2 * local_batch)),
        "activation_dtype": str(activation_dtype).removeprefix("torch."),
        "world_size": int(world),
    }
    return train_saes(
        batches, saes, train_cfg, output_dir=output_dir, resume=resume, progress=progress, wandb_run=wandb_run,
        data_settings=data_settings,
    )
