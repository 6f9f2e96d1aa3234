"""The three ways to ablate SAE features, in one place, and the off-range activations an ablation creates.

Every feature ablation of the package takes ``mode``:

- ``"residual"`` (residual-preserving, the reference notebook's single-feature ablation and the default): ``x - sum_{k in S} f_k(x)
  W_dec[k]``. The SAE error ``x - x_hat`` is kept; only the features' decoded contribution is removed. Compared with
  the clean run.
- ``"reconstruction"`` (the notebook's "encoded" ablation): the activation becomes the SAE reconstruction with the
  features zeroed, ``decode(f with f_S := 0) = x_hat - sum_{k in S} f_k W_dec[k]``. This also drops the SAE error,
  and it is compared with the clean run, so its effect mixes the features' effect with the error's.
- ``"clean_effect"``: the same edited activation as ``"reconstruction"``, compared with the plain reconstruction
  (the SAE spliced in, ``x_hat``) instead of the clean run: the features' effect inside the SAE's own model of the
  layer, with the error's effect taken out.

So an ablation's *baseline* (what "ablated - baseline" is measured against) is the clean run for the first two modes
and the SAE-spliced run for ``"clean_effect"`` (:func:`baseline_edits`). Every effect is measured against a baseline
computed in the same run as its ablations (:meth:`~saecircuits.models.interventions.Interventions.run_paired`), so
an ablation that changes nothing (an inactive feature) has an effect of exactly 0.

Off-range activations: an activation after a fixed elementwise function (the MLP's post-activation of a non-gated MLP,
e.g. GELU, whose minimum is about -0.17) can only take values in that function's range. The residual-preserving
edit subtracts decoder vectors from it and can leave values below the minimum, states the model never sees
(a possible reason why the notebook's three-feature ablation hurt more than zero-ablating the whole MLP). :func:`activation_floor` gives that minimum for a hook (None when the hook has no bounded range: gated
MLPs, the residual stream), and :class:`OffRangeCounter` counts the edited activations below it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.models.interventions import CleanPass, Edit, Interventions
from saecircuits.saes.base import SAE

__all__ = [
    "ABLATION_MODES",
    "MODE_DESCRIPTIONS",
    "check_mode",
    "ablation_base",
    "edit_dtype",
    "sae_edit",
    "splice_edit",
    "baseline_edits",
    "baseline_logits",
    "activation_floor",
    "OffRangeCounter",
    "OffRange",
    "merge_off_range",
]

ABLATION_MODES = ("residual", "reconstruction", "clean_effect")

MODE_DESCRIPTIONS = {
    "residual": "residual-preserving: x - sum f_k W_dec[k] at P (SAE error kept), vs the clean run",
    "reconstruction": "reconstruction: decode(f with the features zeroed) at P (SAE error dropped), vs the clean run",
    "clean_effect": "clean effect: decode(f with the features zeroed) vs decode(f) (the SAE spliced in) at P",
}

OFF_RANGE_TOL = 1e-6
"""Values below ``floor - OFF_RANGE_TOL`` count as off range (float32 rounding of an exact floor is not)."""


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ABLATION_MODES`.

    Raises:
        ValueError: another value, naming the three modes.
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"ablation mode must be one of {', '.join(ABLATION_MODES)}; got {mode!r}")
    return mode


def edit_dtype(sae: SAE, x: torch.Tensor) -> torch.dtype:
    """The dtype an SAE edit computes in: the wider of the activation's and the SAE's.

    The SAE encodes and decodes in its own dtype (as SAELens does), but what an ablation subtracts, and the SAE error,
    are computed in this dtype, so a bfloat16 SAE on a float32 model never rounds the activation itself: ablating an
    inactive feature leaves ``x`` bit-for-bit unchanged, and ``x - f_k W_dec[k]`` carries no rounding of ``x``.
    """
    return torch.promote_types(x.dtype, sae.W_dec.dtype)


def ablation_base(sae: SAE, x: torch.Tensor, f: torch.Tensor, mode: str, x_in: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """What the features' decoded contribution is subtracted from: ``x`` (residual) or ``decode(f)`` (the others).

    Args:
        sae: the SAE.
        x: the activations the SAE stands for, ``[..., d_out]`` (its output hook's), in their own dtype.
        f: ``sae.encode(x_in)`` ``[..., d_sae]``.
        mode: one of :data:`ABLATION_MODES`.
        x_in: what the SAE read (a transcoder's input; default ``x``), for SAEs whose reconstruction depends on it.

    Returns:
        ``[..., d_out]`` in :func:`edit_dtype`; the ablated activation is
        ``ablation_base(...) - sum_{k in S} f_k W_dec[k]`` (computed in that dtype).
    """
    dt = edit_dtype(sae, x)
    return x.to(dt) if check_mode(mode) == "residual" else sae.decode(f, x if x_in is None else x_in).to(dt)


def sae_edit(sae: SAE, fn) -> Edit:
    """The :class:`Edit` that applies ``fn`` where ``sae`` writes, whatever its site.

    ``fn(x_in, x) -> x'`` sees the SAE's input ``x_in [B, F, d_in]`` (what ``encode`` takes) and the activation it
    stands for ``x [B, F', d_out]`` (the same tensor for an SAE that reads and writes one hook), flattened for an
    attention ``hook_z`` SAE, and returns the new ``[B, F' or V, d_out]``. A transcoder's edit runs at its output
    hook (``hook_mlp_out``) and reads its input hook in the same pass, so ablating a feature removes its decoded
    output from the MLP's output, as when the transcoder replaces the MLP.
    """

    def out_shape(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.unflatten(-1, x.shape[2:]) if x.dim() > 3 else y

    if sae.is_transcoder:

        def edit(x: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
            x_in = sae.flatten_input(x_in)
            if x_in.shape[1] != x.shape[1] and x_in.shape[1] == 1:
                x_in = x_in.expand(-1, x.shape[1], *x_in.shape[2:])
            return out_shape(fn(x_in, x.flatten(2)), x)

        return Edit(sae.hook_point_out, edit, reads=(sae.hook_point,))

    def edit(x: torch.Tensor) -> torch.Tensor:
        flat = sae.flatten_input(x)
        return out_shape(fn(flat, flat), x)

    return Edit(sae.hook_point, edit)


def splice_edit(sae: SAE) -> Edit:
    """Edit where ``sae`` writes: the activation at P replaced by its SAE reconstruction ``decode(encode(x), x)``."""

    def fn(x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sae.decode(sae.encode(x_in), x_in).to(edit_dtype(sae, x))

    return sae_edit(sae, fn)


def baseline_edits(sae: SAE, mode: str) -> list[Edit]:
    """The edits of the baseline an ablation in ``mode`` is compared with, for
    :meth:`~saecircuits.models.interventions.Interventions.run_paired`: none (the clean run) for ``"residual"`` and
    ``"reconstruction"``, the SAE splice for ``"clean_effect"``."""
    return [splice_edit(sae)] if check_mode(mode) == "clean_effect" else []


def baseline_logits(iv: Interventions, clean: CleanPass, sae: SAE, mode: str) -> torch.Tensor:
    """Logits at P an ablation in ``mode`` is compared with: ``[B, d_vocab]`` float32, on their own.

    The clean logits for ``"residual"`` and ``"reconstruction"``; the SAE-spliced run's for ``"clean_effect"``. To
    compare with an ablation, compute both in one :meth:`~Interventions.run_paired` with :func:`baseline_edits`
    instead (same path: an ablation that changes nothing differs by exactly 0).
    """
    if check_mode(mode) != "clean_effect":
        return clean.logits
    logits, _ = iv.run(clean, [splice_edit(sae)])
    return logits[:, 0]


def _mlp_act_fn(model):
    """The elementwise activation function of the model's (non-gated) MLPs, or None."""
    from transformers.activations import ACT2FN

    if bool(getattr(model.cfg, "gated_mlp", False)):
        return None
    hf = getattr(model, "original_model", None)
    cfg = getattr(hf, "config", None)
    name = getattr(cfg, "activation_function", None) or getattr(cfg, "hidden_act", None)
    if name is None:
        name = getattr(model.cfg, "act_fn", None)
    return ACT2FN[name] if name in ACT2FN else None


@functools.lru_cache(maxsize=32)
def _function_min(fn) -> float:
    grid = torch.linspace(-30.0, 30.0, 600_001, dtype=torch.float64)
    return float(fn(grid).min())


def activation_floor(model, hook_point: str) -> float | None:
    """The smallest value ``hook_point`` can take in a clean run, or None when it has no lower bound.

    For ``blocks.L.mlp.hook_post`` of a non-gated MLP it is the minimum of the activation function (GELU: -0.16997,
    ReLU: 0, SiLU: -0.27846), found on a fine grid over ``[-30, 30]`` (step 1e-4; the error of such a minimum is
    below 1e-8). Gated MLPs (``act(gate) * linear``) and every other hook are unbounded: None.
    """
    if not hook_point.endswith("mlp.hook_post"):
        return None
    fn = _mlp_act_fn(model)
    if fn is None:
        return None
    return _function_min(fn)


@dataclass(frozen=True)
class OffRange:
    """How many ablated activations left the hook's range.

    Attributes:
        floor: the hook's minimum (None: unbounded, then every count is None: undefined, not zero).
        n_ablations: edited activation vectors looked at (one per (prompt, ablation)).
        n_with_off_range: of those, how many have at least one entry below ``floor``.
        n_off_range_entries: entries below ``floor`` in all of them.
        mean_depth: mean of ``floor - value`` over those entries (how far below the range they go; None when
            undefined or there are none).
        min_value: the smallest edited entry seen (None without ablations).
    """

    floor: float | None
    n_ablations: int
    n_with_off_range: int | None
    n_off_range_entries: int | None
    min_value: float | None
    mean_depth: float | None = None

    @property
    def fraction_with_off_range(self) -> float | None:
        """``n_with_off_range / n_ablations`` (None when undefined)."""
        if self.n_with_off_range is None or self.n_ablations == 0:
            return None
        return self.n_with_off_range / self.n_ablations

    def to_dict(self) -> dict:
        """JSON-ready: the attributes plus ``fraction_with_off_range``."""
        return {
            "floor": self.floor,
            "n_ablations": self.n_ablations,
            "n_with_off_range": self.n_with_off_range,
            "n_off_range_entries": self.n_off_range_entries,
            "fraction_with_off_range": self.fraction_with_off_range,
            "mean_depth": self.mean_depth,
            "min_value": self.min_value,
        }


class OffRangeCounter:
    """Accumulates :class:`OffRange` over the edited activations an ablation produces.

    Args:
        floor: from :func:`activation_floor` (None: nothing is counted, the result says undefined).
    """

    def __init__(self, floor: float | None) -> None:
        self.floor = floor
        self.n = 0
        self.n_any = 0
        self.n_entries = 0
        self.depth_sum = 0.0
        self.min_value = float("inf")

    def observe(self, edited: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count the vectors ``edited [..., d_in]`` (only where ``valid [...]`` is True, when given)."""
        with torch.no_grad():
            e = edited.detach().float().reshape(-1, edited.shape[-1])
            if valid is not None:
                e = e[valid.reshape(-1).to(e.device)]
            if e.shape[0] == 0:
                return
            self.n += int(e.shape[0])
            self.min_value = min(self.min_value, float(e.min()))
            if self.floor is not None:
                below = e < self.floor - OFF_RANGE_TOL
                self.n_any += int(below.any(-1).sum())
                self.n_entries += int(below.sum())
                self.depth_sum += float((self.floor - e[below]).double().sum())

    def merge_ranks(self) -> None:
        """Replace the counts by their totals over the ranks of a sharded run (each rank counted its own prompts;
        nothing in one process). Raises :class:`saecircuits.distributed.ShardError` when a rank is gone."""
        from saecircuits.distributed import reduce, world

        if world()[1] <= 1:
            return
        counts = reduce(torch.tensor([self.n, self.n_any, self.n_entries], dtype=torch.long), what="off-range counts")
        self.n, self.n_any, self.n_entries = (int(c) for c in counts)
        self.depth_sum = float(reduce(torch.tensor([self.depth_sum], dtype=torch.float64), what="off-range depths"))
        self.min_value = float(reduce(torch.tensor([self.min_value], dtype=torch.float64), "min", "off-range minima"))

    def result(self) -> OffRange:
        """The counts so far."""
        defined = self.floor is not None
        return OffRange(
            floor=self.floor,
            n_ablations=self.n,
            n_with_off_range=self.n_any if defined else None,
            n_off_range_entries=self.n_entries if defined else None,
            min_value=self.min_value if self.n else None,
            mean_depth=self.depth_sum / self.n_entries if defined and self.n_entries else None,
        )


def merge_off_range(parts: Sequence[OffRange]) -> OffRange:
    """One :class:`OffRange` from several (same floor)."""
    parts = list(parts)
    if not parts:
        return OffRange(None, 0, None, None, None)
    floor = parts[0].floor
    mins = [p.min_value for p in parts if p.min_value is not None]
    entries = sum(p.n_off_range_entries or 0 for p in parts)
    depth = sum((p.mean_depth or 0.0) * (p.n_off_range_entries or 0) for p in parts)
    return OffRange(
        floor=floor,
        n_ablations=sum(p.n_ablations for p in parts),
        n_with_off_range=None if floor is None else sum(p.n_with_off_range or 0 for p in parts),
        n_off_range_entries=None if floor is None else sum(p.n_off_range_entries or 0 for p in parts),
        min_value=min(mins) if mins else None,
        mean_depth=depth / entries if floor is not None and entries else None,
    )
