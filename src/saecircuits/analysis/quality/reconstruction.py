"""Reconstruction quality of an SAE: losses and loss recovered, at the prediction position and over whole sequences.

Per prompt, the loss (nats) of the answer at P under four runs: clean; SAE spliced in at P (the hook point's
activation at P replaced by ``x_hat = decode(encode(x))``); the hook zero-ablated at P; the hook mean-ablated at P
(a mean activation vector from :func:`mean_activation`). Loss recovered, against zero and against mean ablation, and
the sequence-level variant of ``train-sae`` (:func:`sequence_loss_recovered`) all come from ONE formula,
:func:`loss_recovered`, which also decides when the ratio has no meaning (then it is NaN with a reason).

Departures from the reference notebook (on purpose): every edit acts on every batch row at that row's own P (the
notebook's splice touched batch row 0 only); loss recovered gets a CI (the notebook's came from 200 prompts without
one); the mean activation is token-weighted over all real positions of the given rows, special tokens (BOS/EOS/PAD
anywhere in a row) and padding excluded (the notebook averaged per-story means including BOS over 10 or 20 stories).
As in the notebook, zero-ablating ``mlp.hook_post`` still leaves the MLP's ``b_out`` in its output.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saecircuits.analysis.ablations.modes import sae_edit
from saecircuits.analysis.quality.thresholds import MIN_ABLATION_EFFECT
from saecircuits.analysis.statistics import bootstrap_ratio_ci, t_quantile
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TOKENS,
    _device_of,
    answer_metrics,
    n_ctx_of,
    pad_id_of,
    row_batches,
    task_batches,
    unknown_hook_message,
    unknown_hooks,
    with_progress,
)
from saecircuits.models.interventions import interventions_for
from saecircuits.models.tokens import special_token_ids, special_token_mask
from saecircuits.saes.base import SAE, SAEError
from saecircuits.saes.metrics import explained_variance
from saecircuits.tasks.base import Task

__all__ = [
    "MIN_ABLATION_EFFECT",
    "LossRecovered",
    "ReconstructionResult",
    "loss_recovered",
    "mean_activation",
    "reconstruction_at_prediction",
    "sequence_loss_recovered",
]



@dataclass(frozen=True)
class LossRecovered:
    """Loss recovered ``(ablated - spliced) / (ablated - clean)`` with its 95% interval, or undefined with a reason.

    Attributes:
        value, low, high: the ratio and its paired-bootstrap 95% interval; all NaN when undefined.
        n: number of units (prompts, or token rows for the sequence-level metric).
        reason: ``None`` when defined, else one sentence saying why the ratio has no meaning.
        clean, spliced, ablated: mean losses (nats) of the three runs (weighted as the ratio is); always reported.
        effect, effect_low, effect_high: mean ``ablated - clean`` (nats) and its Student-t 95% interval (NaN when
            ``n < 2``): how much the ablation hurts, the ratio's denominator.
        ablation: what ``ablated`` is (``"zero ablation"``, ``"mean ablation"``), used in ``reason``.
    """

    value: float
    low: float
    high: float
    n: int
    reason: str | None
    clean: float
    spliced: float
    ablated: float
    effect: float
    effect_low: float
    effect_high: float
    ablation: str = "ablation"

    @property
    def defined(self) -> bool:
        """True when the ratio has a meaning (``reason is None``)."""
        return self.reason is None


def _weighted_mean_ci95(d: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Weighted mean ``sum(w d) / sum(w)`` and its Student-t 95% interval (NaN bounds when ``n < 2``).

    Standard error of the ratio estimator, ``se^2 = n / (n - 1) * sum_i w_i^2 (d_i - mean)^2 / (sum_i w_i)^2``
    (Cochran, *Sampling Techniques*, 3rd ed., 1977, section 6.4); with equal weights it is ``std(d, ddof=1) /
    sqrt(n)``, the usual t interval of :func:`saecircuits.analysis.statistics.mean_ci95`.
    """
    n = d.size
    mean = float((w * d).sum() / w.sum())
    if n < 2:
        return mean, float("nan"), float("nan")
    se = math.sqrt(n / (n - 1) * float((w**2 * (d - mean) ** 2).sum())) / float(w.sum())
    half = t_quantile(0.975, n - 1) * se
    return mean, mean - half, mean + half


def loss_recovered(
    clean: torch.Tensor | np.ndarray,
    spliced: torch.Tensor | np.ndarray,
    ablated: torch.Tensor | np.ndarray,
    *,
    weights: torch.Tensor | np.ndarray | None = None,
    min_effect: float = MIN_ABLATION_EFFECT,
    ablation: str = "ablation",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> LossRecovered:
    """THE loss-recovered formula (at P vs zero and vs mean ablation, and over whole sequences).

    ``LR = (mean ablated - mean spliced) / (mean ablated - mean clean)``: 1 means splicing the SAE in costs
    nothing, 0 that it is as bad as the ablation (reference notebook; Bricken et al. 2023, "Towards
    Monosemanticity", loss recovered). Means are weighted by ``weights`` (e.g. scored tokens per row) when given.
    The 95% interval is a seeded paired percentile bootstrap over units (:func:`bootstrap_ratio_ci` on the
    weighted values; the weights cancel in the ratio).

    **When it is undefined** (value and interval NaN, ``reason`` set). The ratio only means "fraction of the
    ablation's damage that the SAE avoids" when the ablation clearly does damage. It is undefined when

    1. ``n < 2``: one unit cannot show that the ablation hurts;
    2. the mean effect ``ablated - clean`` is below ``min_effect`` (0.01 nats by default), which includes an
       ablation that lowers the loss: the ratio then divides by (almost) nothing, so any splice error is magnified
       by ``1 / effect`` (100x or more), e.g. ``spliced - clean = 0.3`` over ``ablated - clean = 1e-4`` gives
       -2999;
    3. the effect's Student-t 95% interval includes 0 (the lower bound is <= 0): by Fieller's theorem (Fieller
       1954, JRSS B 16:175-185) a confidence set for a ratio of means is a bounded interval only when the
       denominator differs from 0 at the same level, so no finite interval, and no point value, can be trusted.

    The floor is a choice of this package, not a published constant: below a 1% change of the answer's
    probability the hook barely matters for the answer and "fraction recovered" is not worth reading. The raw
    mean losses (``clean``, ``spliced``, ``ablated``) are always returned; show them instead.

    Args:
        clean, spliced, ablated: per-unit losses (nats), ``[n]`` each (per prompt at P, or per-row mean losses).
        weights: ``[n]`` non-negative unit weights (default: all 1).
        min_effect: the floor of rule 2 (nats).
        ablation: name of the ablation for the reason text (``"zero ablation"``, ``"mean ablation"``).
        n_bootstrap, seed: the paired bootstrap.

    Returns:
        :class:`LossRecovered`.

    Raises:
        ValueError: the arrays are empty or differ in length, or a weight is negative or all are 0.
    """
    c, s, a = (np.asarray(torch.as_tensor(v).detach().cpu().double()).reshape(-1) for v in (clean, spliced, ablated))
    if c.size == 0 or not (c.shape == s.shape == a.shape):
        raise ValueError(f"loss_recovered needs three non-empty arrays of equal length, got {c.size}, {s.size}, {a.size}")
    w = np.ones_like(c) if weights is None else np.asarray(torch.as_tensor(weights).cpu().double()).reshape(-1)
    if w.shape != c.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("loss_recovered weights must be [n], non-negative, and not all 0")
    n = int(c.size)

    def wmean(v: np.ndarray) -> float:
        return float((w * v).sum() / w.sum())

    effect, e_low, e_high = _weighted_mean_ci95(a - c, w)
    nan = float("nan")
    reason = None
    if n < 2:
        reason = f"{n} {'unit' if n == 1 else 'units'}: at least 2 are needed to tell whether {ablation} hurts the loss"
    elif effect < min_effect:
        reason = (
            f"{ablation} {'lowers' if effect < 0 else 'barely raises'} the loss (ablated - clean = {effect:.4g} "
            f"nats, below the {min_effect:g}-nat floor): there is no loss to recover"
        )
    elif not e_low > 0:
        reason = (
            f"the loss increase from {ablation}, {effect:.4g} nats, has a 95% interval [{e_low:.4g}, {e_high:.4g}] "
            "that includes 0, so the ratio has no bounded interval"
        )
    value = low = high = nan
    if reason is None:
        ci = bootstrap_ratio_ci(w * (a - s), w * (a - c), n_bootstrap=n_bootstrap, seed=seed)
        value, low, high = ci.value, ci.low, ci.high
    return LossRecovered(
        value=value, low=low, high=high, n=n, reason=reason, clean=wmean(c), spliced=wmean(s), ablated=wmean(a),
        effect=effect, effect_low=e_low, effect_high=e_high, ablation=ablation,
    )


def mean_activation(
    model,
    token_rows: Sequence[Sequence[int]],
    hook_point: str,
    *,
    exclude_bos: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> torch.Tensor:
    """Mean activation of ``hook_point`` over every real token position of ``token_rows`` (token-weighted).

    Args:
        model: a TransformerBridge.
        token_rows: token lists (e.g. corpus documents, BOS first), each at most the model's context long.
        hook_point: TL hook name, e.g. ``blocks.1.mlp.hook_post``.
        exclude_bos: skip every special-token position (BOS/EOS/PAD, wherever it sits in a row; see
            ``models.tokens.special_token_ids``); False averages every real position. Padding is always skipped.
        progress: show a progress bar over rows.

    Returns:
        float32 ``[*act_shape]`` (e.g. ``[d_mlp]``), on the model's device.

    Raises:
        ValueError: no position is left to average. ContextLengthError: a row is longer than the context.
    """
    return mean_activations(model, token_rows, [hook_point], exclude_bos=exclude_bos, max_tokens=max_tokens,
                            max_batch=max_batch, progress=progress)[hook_point]


#: the most bytes of float32 activations one batch of :func:`mean_activations` reads at once (over its hooks).
READ_BYTES = 512 << 20


def mean_activations(
    model,
    token_rows: Sequence[Sequence[int]],
    hook_points: Sequence[str],
    *,
    exclude_bos: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`mean_activation` of several hooks from ONE pass over ``token_rows``: each batch's forward reads every
    hook (it stops after the last one's block), with the same batches, masks and sums as one pass per hook, so each
    mean is the one :func:`mean_activation` gives. ``--layers auto`` reads every MLP layer's mean: one pass per
    layer ran the first blocks once per layer (5 passes, 15 block forwards per batch on stories260K, instead of 5).

    Returns:
        ``{hook: float32 [*act_shape]}`` on the model's device.

    Raises:
        ValueError: no position is left to average. ContextLengthError: a row is longer than the context.
    """
    hook_points = list(dict.fromkeys(hook_points))
    # a batch's reads of all of them at once must stay small: group the hooks so that each pass holds at most
    # READ_BYTES of float32 reads per batch (the widest width a hook can have, d_mlp, assumed for each)
    width = max(int(getattr(model.cfg, "d_mlp", None) or 0), int(model.cfg.d_model))
    per_pass = max(1, READ_BYTES // (max_tokens * width * 4))
    if len(hook_points) > per_pass:
        out: dict[str, torch.Tensor] = {}
        for i in range(0, len(hook_points), per_pass):
            out.update(mean_activations(model, token_rows, hook_points[i:i + per_pass], exclude_bos=exclude_bos,
                                        max_tokens=max_tokens, max_batch=max_batch, progress=progress))
        return out
    special = special_token_ids(getattr(model, "tokenizer", None)) if exclude_bos else frozenset()
    iv = interventions_for(model)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    batches = row_batches(
        token_rows,
        pad_id_of(model),
        max_tokens=max_tokens,
        max_batch=max_batch,
        device=_device_of(model),
        n_ctx=n_ctx_of(model),
    )
    what = hook_points[0] if len(hook_points) == 1 else f"{len(hook_points)} hooks"
    for batch in with_progress(batches, len(token_rows), f"mean of {what} (documents)", progress):
        lengths = batch.positions + 1
        mask = torch.arange(batch.tokens.shape[1], device=lengths.device)[None] < lengths[:, None]
        mask &= ~special_token_mask(batch.tokens, special)
        reads = iv.read_all(batch.tokens, hook_points)  # stops after the last hook's block
        for hook in hook_points:
            x = reads[hook].float()
            summed = x[mask.to(x.device)].sum(0)
            totals[hook] = summed if hook not in totals else totals[hook] + summed
        count += int(mask.sum())
    if not totals or count == 0:
        raise ValueError(
            "mean_activation got no token positions (empty rows, or only special tokens with exclude_bos=True)"
        )
    return {hook: totals[hook] / count for hook in hook_points}


@dataclass
class ReconstructionResult(NotebookDisplay):
    """Losses (nats) of the answer at P, per prompt in task order (``[n_prompts]`` float32), and aggregates.

    Attributes:
        clean_loss, sae_loss, zero_loss: per-prompt losses (clean, SAE spliced in at P, hook zero-ablated at P).
        mean_loss: per-prompt loss with the hook mean-ablated at P (``None`` without a mean vector).
        l0: number of active SAE features (f > 0) at P per prompt.
        explained_variance: ``1 - sum_i |x_i - x_hat_i|^2 / sum_i |x_i - mean_i x_i|^2`` over prompts, at P
            (:func:`saecircuits.saes.metrics.explained_variance`; NaN when the activations at P do not vary, e.g.
            one prompt). Negative: the reconstruction is further from x than the mean activation is.
        loss_recovered_zero: :func:`loss_recovered` against zero ablation (NaN with a reason when undefined).
        loss_recovered_mean: the same against mean ablation (``None`` without a mean vector).
        relative_error: ``sum_i |x_i - x_hat_i|^2 / sum_i |x_i|^2`` at P (NaN when every x is 0). Unlike explained
            variance it does not divide by the spread of x across prompts, which at one position can be a small
            part of |x|^2, so it says whether a negative explained variance comes from a large error or a small
            spread.
    """

    clean_loss: torch.Tensor
    sae_loss: torch.Tensor
    zero_loss: torch.Tensor
    mean_loss: torch.Tensor | None
    l0: torch.Tensor
    explained_variance: float
    loss_recovered_zero: LossRecovered
    loss_recovered_mean: LossRecovered | None
    relative_error: float = float("nan")

    def display_title(self) -> str:
        r = self.loss_recovered_zero
        said = f"{r.value:.3f}" if r.defined else f"undefined ({r.reason})"
        return (f"Answer loss at P with the SAE spliced in, over {int(self.clean_loss.numel())} prompts: loss "
                f"recovered {said} vs zero ablation")

    def to_pandas(self):
        """One row per condition (clean, SAE, zero, mean ablation): mean answer loss (nats) with its 95% interval,
        then the loss recovered ratios with their bootstrap intervals (NaN, with the reason in ``note``, when
        undefined)."""
        import pandas as pd

        from saecircuits.analysis.statistics import mean_ci95

        rows = []
        for name, v in (("clean", self.clean_loss), ("SAE spliced in", self.sae_loss),
                        ("zero ablation", self.zero_loss), ("mean ablation", self.mean_loss)):
            if v is not None:
                m = mean_ci95(v)
                rows.append({"quantity": f"loss, {name} (nats)", "value": m.mean, "ci95_low": m.low,
                             "ci95_high": m.high})
        for name, r in (("loss recovered vs zero ablation", self.loss_recovered_zero),
                        ("loss recovered vs mean ablation", self.loss_recovered_mean)):
            if r is not None:
                rows.append({"quantity": name, "value": r.value, "ci95_low": r.low, "ci95_high": r.high,
                             "note": r.reason or ""})
        return pd.DataFrame(rows)

    def figure(self):
        """Bars of the four mean answer losses with 95% intervals."""
        from saecircuits.display import bar_figure

        df = self.to_pandas()
        df = df[df["quantity"].str.startswith("loss,")]
        return bar_figure([q[6:-7] for q in df["quantity"]], df["value"].tolist(), low=df["ci95_low"].tolist(),
                          high=df["ci95_high"].tolist(), title="Answer loss at the prediction position",
                          yaxis="cross-entropy (nats)")


def reconstruction_at_prediction(
    model,
    sae: SAE,
    task: Task,
    *,
    mean_act: torch.Tensor | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> ReconstructionResult:
    """Clean / SAE-spliced / zero-ablated / mean-ablated answer loss at each prompt's P.

    Args:
        model: a TransformerBridge.
        sae: any :class:`SAE`; the hook it writes (``hook_point_out``: the MLP's output for a transcoder) is edited
            (only at P, in every batch row).
        task: prompts and answers.
        mean_act: ``[d_out]`` mean activation of that hook for mean ablation (from :func:`mean_activation`), or
            ``None`` to skip.
        n_bootstrap, seed: paired bootstrap over prompts for the loss-recovered intervals.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`ReconstructionResult`.

    Raises:
        ValueError: ``mean_act`` does not have ``sae.d_out`` entries.
    """
    hook_in, hook_out = sae.hook_point, sae.hook_point_out
    if mean_act is not None and mean_act.shape[-1] != sae.d_out:
        raise ValueError(f"mean_act has width {mean_act.shape[-1]}, the SAE writing {hook_out} has "
                         f"d_out={sae.d_out}")
    n = task.n_prompts
    out = {k: torch.zeros(n) for k in ("clean", "sae", "zero", "mean", "l0")}
    xs, xhats = torch.zeros(n, sae.d_out), torch.zeros(n, sae.d_out)

    mean_row = None if mean_act is None else mean_act.detach().reshape(1, 1, -1)

    def variants(x_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # [B, 1, d] -> [B, V, d_out]: SAE, zero(, mean)
        # zero and mean in x's dtype (or wider): a bf16 SAE must not round the mean-ablation vector
        x = x.to(torch.promote_types(x.dtype, sae.W_dec.dtype))
        out = [sae.decode(sae.encode(x_in), x_in).to(x), torch.zeros_like(x)]
        if mean_row is not None:
            out.append(mean_row.to(x).expand_as(x))
        return torch.cat(out, dim=1)

    names = ["sae", "zero"] + (["mean"] if mean_act is not None else [])
    iv = interventions_for(model)
    with torch.no_grad():
        for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
            idx = torch.tensor(batch.indices)
            clean = iv.clean(batch, read=sorted({hook_in, hook_out}))
            x_in = sae.flatten_input(clean.reads[hook_in].float())
            x = clean.reads[hook_out].float().flatten(1)
            f = sae.encode(x_in.to(sae.W_dec.dtype))
            x_hat = sae.decode(f, x_in.to(sae.W_dec.dtype)).float()
            xs[idx] = x.cpu()
            out["l0"][idx] = (f != 0).sum(-1).float().cpu()
            xhats[idx] = x_hat.cpu()
            # the clean loss in the same run as the splice and the ablations (one path for all four)
            run = iv.run_paired(clean, [sae_edit(sae, variants)], n_variants=len(names))
            out["clean"][idx] = answer_metrics(run.base_logits, batch.answer_ids)["loss"].cpu()
            loss = answer_metrics(run.logits, batch.answer_ids)["loss"].cpu()
            for v, name in enumerate(names):
                out[name][idx] = loss[:, v]

    try:
        ev = explained_variance(xs, xhats)
    except SAEError:  # activations at P do not vary (e.g. one prompt): the ratio is undefined
        ev = float("nan")
    norm_sq = float((xs.double() ** 2).sum())
    rel = float(((xs - xhats).double() ** 2).sum()) / norm_sq if norm_sq > 0 else float("nan")
    clean, sae_l, zero = out["clean"], out["sae"], out["zero"]
    boot = dict(n_bootstrap=n_bootstrap, seed=seed)
    lr_zero = loss_recovered(clean, sae_l, zero, ablation="zero ablation", **boot)
    lr_mean = None
    if mean_act is not None:
        lr_mean = loss_recovered(clean, sae_l, out["mean"], ablation="mean ablation", **boot)
    return ReconstructionResult(
        clean_loss=clean,
        sae_loss=sae_l,
        zero_loss=zero,
        mean_loss=out["mean"] if mean_act is not None else None,
        l0=out["l0"],
        explained_variance=ev,
        loss_recovered_zero=lr_zero,
        loss_recovered_mean=lr_mean,
        relative_error=rel,
    )


def full_splice_hooks(sae: SAE, keep: torch.Tensor, observe=None) -> list[tuple[str, Any]]:
    """TransformerLens forward hooks that splice ``sae`` in at every position where ``keep [B, T, 1]`` is True.

    The hook the SAE writes (``hook_point_out``) gets ``decode(encode(x_in), x_in)``; for a transcoder ``x_in`` is
    captured at its input hook earlier in the same pass; an attention ``hook_z`` SAE's output is put back in the
    hook's ``[B, T, n_heads, d_head]`` shape. ``observe(x, x_hat)`` (optional) sees the hook's clean activation and
    the reconstruction, both ``[B, T, d_out]``, before the splice.
    """
    store: dict[str, torch.Tensor] = {}

    def capture(act: torch.Tensor, hook: Any = None) -> None:
        store["x_in"] = act

    def splice(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        x_in = sae.flatten_input(store.get("x_in", act).float())
        x_hat = sae(x_in)
        if observe is not None:
            observe(act.flatten(2) if act.dim() > 3 else act, x_hat)
        x_hat = x_hat.to(act.dtype)
        if act.dim() > 3:
            x_hat = x_hat.unflatten(-1, act.shape[2:])
        k = keep.reshape(*keep.shape[:2], *([1] * (act.dim() - 2)))
        return torch.where(k, x_hat, act)

    hooks: list[tuple[str, Any]] = [(sae.hook_point, capture)] if sae.is_transcoder else []
    return hooks + [(sae.hook_point_out, splice)]


def _run_checked(model, rows: torch.Tensor, fwd_hooks: list[tuple[str, Any]]) -> torch.Tensor:
    """``model.run_with_hooks`` that fails naming any hook that never fired (a misspelt or absent hook would
    otherwise leave the model clean and the 'spliced' loss equal to the clean one)."""
    fired: set[str] = set()
    unknown = unknown_hooks(model, [n for n, _ in fwd_hooks])
    if unknown:
        raise SAEError(unknown_hook_message(model, unknown, "set the hook the SAE reads with --hook HOOK (hook= when "
                                                            "loading it) where its files do not name it"))

    def mark(name, fn):
        def hook(act, hook=None):
            fired.add(name)
            return fn(act, hook)

        return hook

    logits = model.run_with_hooks(rows, fwd_hooks=[(n, mark(n, f)) for n, f in fwd_hooks])
    missing = sorted({n for n, _ in fwd_hooks} - fired)
    if missing:
        raise SAEError(f"hook(s) {missing} never fired in this model's forward pass, so an SAE there changes nothing "
                       "(every loss would equal the clean one); check the SAE's hook names against model.hook_dict")
    return logits


def _engine_starts(iv, saes: Sequence[SAE]) -> list[tuple[int, int]] | None:
    """Per SAE, the engine half-block its whole-sequence runs start from (the earlier of the hooks
    it reads and writes); None when the model has no engine or an SAE sits outside the blocks (embeddings, final
    norm), where full bridge forwards are run instead."""
    from saecircuits.models.engine import EngineError, stage_of_hook

    eng = iv.engine
    if eng is None:
        return None
    out = []
    for sae in saes:
        try:
            stage = min(stage_of_hook(n, eng.n_layers) for n in (sae.hook_point, sae.hook_point_out))
        except EngineError:
            return None
        if not 0 <= stage[0] < eng.n_layers:
            return None
        out.append(eng.restart_stage(stage))
    return out


def _engine_run_checked(eng, rows: torch.Tensor, x0: torch.Tensor, start: tuple[int, int],
                        fwd_hooks: list[tuple[str, Any]]) -> torch.Tensor:
    """Next-token losses ``[B, T - 1]`` (float32, nats) of ``rows`` with TransformerLens-style ``fwd_hooks`` (``fn(act
    [B, T, *shape]) -> act``), run by the engine from half-block ``start`` on the clean residual stream there (``x0
    [B, 1, T, d_model]``); fails as :func:`_run_checked` when a hook never fired."""
    fired: set[str] = set()

    def adapt(name, fn):
        def hook(x: torch.Tensor) -> torch.Tensor | None:  # the engine's [B, F, T, *shape]; F is 1 before any edit
            fired.add(name)
            out = fn(x[:, 0])
            return None if out is None else out[:, None]

        return hook

    hooks: dict[str, list] = {}
    for name, fn in fwd_hooks:
        hooks.setdefault(name, []).append(adapt(name, fn))
    B, T = rows.shape
    pos = torch.arange(T, device=rows.device).expand(B, T)
    x = eng.forward_resid(x0, pos, None, hooks, start=start)
    missing = sorted(set(hooks) - fired)
    if missing:
        raise SAEError(f"hook(s) {missing} never fired in this model's forward pass, so an SAE there changes nothing "
                       "(every loss would equal the clean one); check the SAE's hook names against model.hook_dict")
    return eng.next_token_losses(x[:, 0], rows)


def _ev_from_sums(e: dict[str, Any]) -> float:
    """Explained variance from the running sums of :func:`sequence_loss_recovered` (NaN: no position, or x constant)."""
    if e["n"] == 0:
        return float("nan")
    total = e["x2"] - float((torch.as_tensor(e["x"], dtype=torch.float64) ** 2).sum()) / e["n"]
    return 1.0 - e["err"] / total if total > 0 else float("nan")


@torch.no_grad()
def sequence_loss_recovered(
    model,
    saes: dict[str, SAE] | Sequence[SAE],
    token_rows: torch.Tensor | Sequence[Sequence[int]],
    *,
    bos_id: int | Collection[int] | None,
    pad_id: int | None = None,
    bos_policy: str = "exclude",
    batch_rows: int = 16,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Loss recovered over whole sequences, one SAE spliced in at a time (reference notebook, ``train-sae`` eval).

    For each SAE: mean next-token cross-entropy (nats) of the clean model, of the model with the hook's activation
    replaced by the SAE reconstruction at every data position, and with that activation zero-ablated at the same
    positions; loss recovered from :func:`loss_recovered` with token rows as the units (each row weighted by its
    scored tokens, so the means are per token), undefined with a reason when zero ablation does not clearly hurt.
    Positions the BOS policy excludes keep their original activation; targets that are BOS or padding are not
    scored. Not comparable with the single-position numbers of :func:`reconstruction_at_prediction`.

    With the engine backend (:mod:`saecircuits.models.interventions`) the clean losses of a batch come from
    :meth:`~saecircuits.models.interventions.Interventions.token_losses` (computed once and kept, so calling once per
    SAE costs one clean pass in all), the spliced and zero-ablated runs start at the SAE's half-block from the clean
    residual stream there, and the vocabulary is unembedded in chunks; other models (or an SAE on the embeddings or
    the final norm) run full bridge forwards.

    Args:
        model: TransformerLens model (``__call__`` returns logits ``[batch, pos, d_vocab]``, ``run_with_hooks``).
        saes: ``{name: SAE}`` or a list (named by hook point); each reads ``sae.hook_point`` and writes
            ``sae.hook_point_out`` (the same hook except for transcoders).
        token_rows: int64 ``[n_rows, seq]``, or rows of different lengths (e.g. a task's prompts with their
            answers), batched in order of length and right-padded (positions after a row's end are never spliced,
            scored or counted, and attention is causal, so the padding changes nothing).
        bos_id, pad_id, bos_policy: see :func:`saecircuits.data.activations.bos_keep_mask` (``bos_id`` may be the
            set of special ids, ``models.tokens.special_token_ids``); targets that are any of them are not scored.
        batch_rows: rows per forward pass.
        n_bootstrap, seed: the paired bootstrap over rows.

    Returns:
        ``{name: {"ce_clean", "ce_spliced", "ce_zero" (nats), "loss_recovered" (NaN when undefined),
        "loss_recovered_ci95" ([lo, hi]), "loss_recovered_undefined_reason" (str or None), "explained_variance"
        (over every spliced position, pooled as in :func:`saecircuits.saes.metrics.explained_variance`; NaN when
        undefined), "n_tokens", "n_rows"}}``.

    Raises:
        KeyError: an SAE's hook that never fires in ``model`` (named).
        SAEError: no scored token (every target is BOS or padding).
    """
    from saecircuits.data.activations import bos_keep_mask

    items = list(saes.items()) if isinstance(saes, dict) else [(s.hook_point, s) for s in saes]
    iv = interventions_for(model)
    starts = _engine_starts(iv, [sae for _, sae in items])
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    sums: dict[str, dict[str, list[torch.Tensor]]] = {
        name: {"clean": [], "spliced": [], "zero": []} for name, _ in items
    }
    counts: list[torch.Tensor] = []
    # explained variance over the spliced positions, from running sums (saes.metrics.explained_variance's formula:
    # 1 - sum |x - x_hat|^2 / sum |x - mean x|^2, with sum |x - mean x|^2 = sum |x|^2 - |sum x|^2 / n)
    ev_sums: dict[str, dict[str, Any]] = {name: {"err": 0.0, "x": 0.0, "x2": 0.0, "n": 0.0} for name, _ in items}

    def row_nll(logits: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Summed NLL (nats) of the scored targets of each row: ``[rows]`` float64."""
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, rows[:, 1:, None]).squeeze(-1)
        return (nll.double() * valid).sum(-1).cpu()

    # (rows [B, T], lengths [B] or None): a tensor's rows as they are; rows of different lengths in order of length
    # (shortest first, ties in the given order: the order the bootstrap sees), right-padded per batch of
    # `batch_rows`. Attention is causal, so padding after a row's end changes none of its positions; the padded
    # positions are never spliced, scored or counted.
    batches: list[tuple[torch.Tensor, torch.Tensor | None]]
    if isinstance(token_rows, torch.Tensor):
        batches = [(token_rows[s : s + batch_rows], None) for s in range(0, token_rows.shape[0], batch_rows)]
    else:
        from saecircuits.models.tokens import pad_right

        ordered = sorted(token_rows, key=len)
        batches = [pad_right(ordered[s : s + batch_rows], 0 if pad_id is None else int(pad_id))
                   for s in range(0, len(ordered), batch_rows)]
    for rows, lengths in batches:
        rows = rows.to(device)
        target = rows[:, 1:]
        valid = ~special_token_mask(target, bos_id) & ~special_token_mask(target, pad_id)
        keep = bos_keep_mask(rows, bos_id, bos_policy)[..., None]  # type: ignore[arg-type]
        real = ~special_token_mask(rows, pad_id)[..., None]
        if lengths is not None:
            inside = torch.arange(rows.shape[1], device=device)[None] < lengths.to(device)[:, None]  # [B, T]
            valid = valid & inside[:, 1:]
            keep, real = keep & inside[..., None], real & inside[..., None]
        counts.append(valid.sum(-1).cpu())
        if starts is not None:
            clean = (iv.token_losses(rows).double() * valid).sum(-1).cpu()
            prefix: dict[tuple[int, int], dict] = {}  # the clean residual stream at each SAE's start, per batch
        else:
            clean = row_nll(model(rows), rows, valid)
        for j, (name, sae) in enumerate(items):
            sae_dev = sae.to(device)

            def observe(act: torch.Tensor, x_hat: torch.Tensor, _keep=keep, _ev=ev_sums[name], _real=real) -> None:
                m = (_keep & _real).double()  # the positions spliced in (padding left out)
                x = act.double()
                _ev["err"] += float((((x - x_hat.double()) ** 2) * m).sum())
                _ev["x"] += (x * m).sum((0, 1)).cpu()
                _ev["x2"] += float(((x**2) * m).sum())
                _ev["n"] += float(m.sum())

            def zero(act: torch.Tensor, hook: Any = None, _keep=keep) -> torch.Tensor:
                _keep = _keep.reshape(*_keep.shape, *([1] * (act.dim() - _keep.dim())))
                return torch.where(_keep, torch.zeros_like(act), act)

            sums[name]["clean"].append(clean)
            if starts is not None:
                start = starts[j]
                if start not in prefix:
                    kept: dict = {}
                    iv.engine.forward_tokens(rows, keep_resid=kept, stop_after=start)
                    prefix[start] = kept
                x0 = prefix[start][start]
                for key, fwd in (("spliced", full_splice_hooks(sae_dev, keep, observe)),
                                 ("zero", [(sae.hook_point_out, zero)])):
                    nll = _engine_run_checked(iv.engine, rows, x0, start, fwd)
                    sums[name][key].append((nll.double() * valid).sum(-1).cpu())
                continue
            spliced = _run_checked(model, rows, full_splice_hooks(sae_dev, keep, observe))
            sums[name]["spliced"].append(row_nll(spliced, rows, valid))
            zeroed = _run_checked(model, rows, [(sae.hook_point_out, zero)])
            sums[name]["zero"].append(row_nll(zeroed, rows, valid))
    n_tok = torch.cat(counts).double() if counts else torch.zeros(0, dtype=torch.float64)
    if int(n_tok.sum()) == 0:
        raise SAEError("no scored tokens (all targets are BOS/padding); give longer rows")
    scored = n_tok > 0
    out = {}
    for name, s in sums.items():
        # per-row mean losses, weighted by scored tokens: the weighted means are the per-token means
        per_row = {k: (torch.cat(v)[scored] / n_tok[scored]) for k, v in s.items()}
        lr = loss_recovered(per_row["clean"], per_row["spliced"], per_row["zero"], weights=n_tok[scored],
                            ablation="zero ablation", n_bootstrap=n_bootstrap, seed=seed)
        out[name] = {
            "ce_clean": lr.clean,
            "ce_spliced": lr.spliced,
            "ce_zero": lr.ablated,
            "loss_recovered": lr.value,
            "loss_recovered_ci95": [lr.low, lr.high],
            "loss_recovered_undefined_reason": lr.reason,
            "explained_variance": _ev_from_sums(ev_sums[name]),
            "n_tokens": int(n_tok.sum()),
            "n_rows": int(scored.sum()),
        }
    return out
