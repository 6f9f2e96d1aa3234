"""Checkpoints of the SAE trainer: everything needed to continue a run exactly (SAE, optimiser, scheduler, RNG
states, counters), written atomically by rank 0 and restored with a check that it belongs to the same SAE.

:class:`CheckpointMixin` holds :class:`~saecircuits.saes.trainer.SAETrainer`'s ``state_dict``, ``save_checkpoint``
and ``load_checkpoint``; split from :mod:`saecircuits.saes.trainer`, which re-exports the file names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from saecircuits.atomic import atomic_write, atomic_write_text
from saecircuits.saes.base import SAEError
from saecircuits.saes.train_ddp import barrier

logger = logging.getLogger("saecircuits.saes.trainer")  # the trainer's log lines, as before the split

CHECKPOINT_NAME = "checkpoint.pt"
#: cfg.extra settings that steer training steps: a resumed run must have the same.
_RESUME_SETTINGS = ("k", "bandwidth", "threshold_lr")
#: cfg.extra settings of the initialisation only: a resumed run takes the checkpoint's (its weights come from them).
_INIT_SETTINGS = ("seed", "threshold_init")
METRICS_NAME = "metrics.jsonl"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def truncate_metrics(path: Path, step: int) -> None:
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


class CheckpointMixin:
    """``state_dict`` / ``save_checkpoint`` / ``load_checkpoint`` of :class:`~saecircuits.saes.trainer.SAETrainer`
    (they read and restore its attributes: ``sae``, ``cfg``, ``optimizer``, ``scheduler``, ``generator``, the
    counters and ``checkpoint_dir``)."""

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
        barrier(self.world_size)
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
            reason = str(err).split(". ")[0].strip()  # torch's message goes on for several sentences
            raise SAEError(f"cannot read checkpoint {path} ({type(err).__name__}: {reason}); delete it to start "
                           "this SAE over") from err
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
            truncate_metrics(self.checkpoint_dir / METRICS_NAME, self.step)
        logger.info("%s: resumed from %s at step %d", self.name, path, self.step)
