"""SAE training: a pure trainer that never sees the language model, and a one-pass helper for many hook points.

:class:`SAETrainer` (SAELens style) consumes an iterator of activation batches ``[batch, d_in]`` and applies the
reference notebook's recipe (``sparse_coding/train_autoencoder.py``) plus modern tricks:

- loss from :func:`saecircuits.saes.losses.sae_training_loss` (MSE summed over d_in, mean over batch; penalties per
  token, or batch-summed to reproduce the original convention);
- unit-norm decoder rows with the parallel gradient component removed (a switch);
- TopK SAEs train from their sparse codes (:mod:`saecircuits.saes.sparse_codes`: the decode and the encoder's
  backward touch the ``k`` selected features per token only);
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

The module is split by idea: the settings (:mod:`saecircuits.saes.train_config`), the training step, metrics and
resampling (here), checkpoints (:mod:`saecircuits.saes.train_checkpoint`), data-parallel plumbing
(:mod:`saecircuits.saes.train_ddp`) and several SAEs from one stream (:mod:`saecircuits.saes.train_many`). Every
name imported from this module before the split still is (``TrainConfig``, ``train_saes_on_model``, ...).

Precision: parameters, optimiser and inputs are fp32 (or fp64); :class:`SAETrainer` refuses an SAE with float16 or
bfloat16 parameters, whose Adam steps of about ``lr`` would be rounded away (8 significant bits). For speed,
``TrainConfig.autocast_dtype="bfloat16"`` runs the SAE forward and loss under ``torch.autocast`` (faster on GPUs with
bf16 tensor cores, ~3 significant digits in the matmuls) while the parameters stay fp32; convert the trained SAE with
``.to(torch.bfloat16)`` afterwards if wanted (thresholds stay fp32). Activations may also be stored in bf16 by the
data path (``dtype=torch.bfloat16``), as the notebook did.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saecircuits.saes.base import SAE, SAEError
from saecircuits.saes.train_checkpoint import CHECKPOINT_NAME, METRICS_NAME, CheckpointMixin, truncate_metrics
from saecircuits.saes.train_config import TrainConfig, dead_window_for
from saecircuits.saes.train_ddp import all_gather_rows, all_reduce_, average_gradients_, dist_info

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- helpers
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
class SAETrainer(CheckpointMixin):
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
        self.rank, self.world_size = dist_info()
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
        elif self.rank == 0 and self.checkpoint_dir is not None:
            # starting at step 0: metrics lines already there belong to a run killed before its first checkpoint
            # (or removed); kept, the resumed log would repeat their steps
            truncate_metrics(self.checkpoint_dir / METRICS_NAME, 0)

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
        return all_reduce_(t, self.world_size, op)

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
        average_gradients_(self.optimizer.param_groups[0]["params"], self.world_size)
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
            fired = out.firing_counts().clone()
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
        x_hat = out.x_hat.detach().float()
        # the float64 metrics convert once (their functions' .double() then returns these tensors as they are)
        x64, x_hat64 = x.detach().double(), x_hat.double()
        freq = self.log_counts / max(self.log_tokens, 1)
        window = min(self.cfg.dead_window, self.step)
        m = {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "lr": self._lr_used,  # the rate of this step's update
            "sparsity_scale": self.sparsity_scale(self.step - 1),
            "loss": float(out.total.detach()),
            "l0": float(out.firing_counts().sum() / x.shape[0]),  # this rank's batch
            # per token, summed over d_in, in the units the SAE sees (scaled when normalize_activations)
            "mse": float((x_hat - x).pow(2).sum(-1).mean()),
            # over this batch's tokens (not results.json's explained_variance_at_p, across prompts at P)
            "explained_variance_tokens": explained_variance(x64, x_hat64),
            # sum ||x_hat|| / sum ||x||: below 1 when the sparsity penalty shrinks reconstructions
            "shrinkage": _shrinkage(x64, x_hat64),
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
            pool.append(all_gather_rows(self._draw(), self.world_size))
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


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    # A tqdm bar on a terminal; whole lines (about ten per run) in a log file.
    from saecircuits.progress import progress_bar

    return progress_bar(total=total, initial=initial, desc=desc, enabled=enabled)


# the names this module had before the split, for ``from saecircuits.saes.trainer import ...``
from saecircuits.saes.train_many import train_saes, train_saes_on_model  # noqa: E402  (train_many imports SAETrainer lazily)

__all__ = [
    "SAETrainer", "TrainConfig", "dead_window_for", "explained_variance", "train_saes",
    "train_saes_on_model", "CHECKPOINT_NAME", "METRICS_NAME",
]
