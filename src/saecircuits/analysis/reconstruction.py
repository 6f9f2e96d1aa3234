"""Reconstruction quality of an SAE at the prediction position: losses and loss recovered (analysis-spec.md F2/F13).

Per prompt, the loss (nats) of the answer at P under four runs: clean; SAE spliced in at P (the hook point's
activation at P replaced by ``x_hat = decode(encode(x))``); the hook zero-ablated at P; the hook mean-ablated at P
(a mean activation vector from :func:`mean_activation`). Loss recovered = ``(mean zero - mean sae) / (mean zero -
mean clean)`` (ratio of means, as the notebook), and the same against mean ablation, each with a seeded paired
bootstrap 95% interval over prompts.

Departures from the reference notebook (on purpose): every edit acts on every batch row at that row's own P (the
notebook's splice touched batch row 0 only, pitfall 3); loss recovered gets a CI (pitfall 13); the mean activation is
token-weighted over all real positions of the given rows, special tokens (BOS/EOS/PAD anywhere in a row) and padding
excluded (the notebook averaged per-story means including BOS over 10 or 20 stories, pitfall 12). As in the notebook, zero-ablating ``mlp.hook_post`` still
leaves the MLP's ``b_out`` in its output (pitfall 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.stats import RatioCI, bootstrap_ratio_ci
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
    with_progress,
)
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.models.tokens import special_token_ids, special_token_mask
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["ReconstructionResult", "mean_activation", "reconstruction_at_prediction"]


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
    special = special_token_ids(getattr(model, "tokenizer", None)) if exclude_bos else frozenset()
    iv = interventions_for(model)
    total: torch.Tensor | None = None
    count = 0
    batches = row_batches(
        token_rows,
        pad_id_of(model),
        max_tokens=max_tokens,
        max_batch=max_batch,
        device=_device_of(model),
        n_ctx=n_ctx_of(model),
    )
    for batch in with_progress(batches, len(token_rows), f"mean of {hook_point} (documents)", progress):
        lengths = batch.positions + 1
        mask = torch.arange(batch.tokens.shape[1], device=lengths.device)[None] < lengths[:, None]
        mask &= ~special_token_mask(batch.tokens, special)
        x = iv.read_all(batch.tokens, [hook_point])[hook_point].float()  # stops after the hook's block
        summed = x[mask.to(x.device)].sum(0)
        total = summed if total is None else total + summed
        count += int(mask.sum())
    if total is None or count == 0:
        raise ValueError(
            "mean_activation got no token positions (empty rows, or only special tokens with exclude_bos=True)"
        )
    return total / count


@dataclass
class ReconstructionResult(NotebookDisplay):
    """Losses (nats) of the answer at P, per prompt in task order (``[n_prompts]`` float32), and aggregates.

    Attributes:
        clean_loss, sae_loss, zero_loss: per-prompt losses (clean, SAE spliced in at P, hook zero-ablated at P).
        mean_loss: per-prompt loss with the hook mean-ablated at P (``None`` without a mean vector).
        l0: number of active SAE features (f > 0) at P per prompt.
        explained_variance: ``1 - sum_i |x_i - x_hat_i|^2 / sum_i |x_i - mean_i x_i|^2`` over prompts, at P.
        loss_recovered_zero: ``(mean zero - mean sae) / (mean zero - mean clean)`` with a paired bootstrap 95% CI.
        loss_recovered_mean: the same against mean ablation (``None`` without a mean vector).
    """

    clean_loss: torch.Tensor
    sae_loss: torch.Tensor
    zero_loss: torch.Tensor
    mean_loss: torch.Tensor | None
    l0: torch.Tensor
    explained_variance: float
    loss_recovered_zero: RatioCI
    loss_recovered_mean: RatioCI | None

    def display_title(self) -> str:
        return (f"Answer loss at P with the SAE spliced in, over {int(self.clean_loss.numel())} prompts: loss "
                f"recovered {self.loss_recovered_zero.value:.3f} vs zero ablation")

    def to_pandas(self):
        """One row per condition (clean, SAE, zero, mean ablation): mean answer loss (nats) with its 95% interval,
        then the loss recovered ratios with their bootstrap intervals."""
        import pandas as pd

        from saecircuits.analysis.stats import mean_ci95

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
                rows.append({"quantity": name, "value": r.value, "ci95_low": r.low, "ci95_high": r.high})
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
    """Clean / SAE-spliced / zero-ablated / mean-ablated answer loss at each prompt's P (F2, F13).

    Args:
        model: a TransformerBridge.
        sae: any :class:`SAE`; its ``hook_point`` is edited (only at P, in every batch row).
        task: prompts and answers.
        mean_act: ``[d_in]`` mean activation for mean ablation (from :func:`mean_activation`), or ``None`` to skip.
        n_bootstrap, seed: paired bootstrap over prompts for the loss-recovered intervals.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`ReconstructionResult`.

    Raises:
        ValueError: ``mean_act`` does not have ``sae.d_in`` entries.
    """
    hook = sae.hook_point
    if mean_act is not None and mean_act.shape[-1] != sae.d_in:
        raise ValueError(f"mean_act has width {mean_act.shape[-1]}, the SAE on {hook} has d_in={sae.d_in}")
    n = task.n_prompts
    out = {k: torch.zeros(n) for k in ("clean", "sae", "zero", "mean", "l0", "resid_sq")}
    xs = torch.zeros(n, sae.d_in)

    mean_row = None if mean_act is None else mean_act.detach().reshape(1, 1, -1)

    def variants(x: torch.Tensor) -> torch.Tensor:  # [B, 1, d_in] -> [B, V, d_in]: SAE, zero(, mean)
        x = x.to(sae.W_dec.dtype)
        out = [sae.decode(sae.encode(x)), torch.zeros_like(x)]
        if mean_row is not None:
            out.append(mean_row.to(x).expand_as(x))
        return torch.cat(out, dim=1)

    names = ["sae", "zero"] + (["mean"] if mean_act is not None else [])
    iv = interventions_for(model)
    with torch.no_grad():
        for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
            idx = torch.tensor(batch.indices)
            clean = iv.clean(batch, read=[hook])
            x = clean.reads[hook].float()
            f = sae.encode(x.to(sae.W_dec.dtype))
            x_hat = sae.decode(f).float()
            xs[idx] = x.cpu()
            out["l0"][idx] = (f > 0).sum(-1).float().cpu()
            out["resid_sq"][idx] = ((x - x_hat) ** 2).sum(-1).cpu()
            out["clean"][idx] = answer_metrics(clean.logits, batch.answer_ids)["loss"].cpu()
            logits, _ = iv.run(clean, [Edit(hook, variants)], n_variants=len(names))
            loss = answer_metrics(logits, batch.answer_ids)["loss"].cpu()
            for v, name in enumerate(names):
                out[name][idx] = loss[:, v]

    total_var = ((xs - xs.mean(0)) ** 2).sum()
    ev = float(1 - out["resid_sq"].sum() / total_var) if total_var > 0 else float("nan")
    clean, sae_l, zero = out["clean"], out["sae"], out["zero"]
    lr_zero = bootstrap_ratio_ci(zero - sae_l, zero - clean, n_bootstrap=n_bootstrap, seed=seed)
    lr_mean = None
    if mean_act is not None:
        lr_mean = bootstrap_ratio_ci(
            out["mean"] - sae_l, out["mean"] - clean, n_bootstrap=n_bootstrap, seed=seed
        )
    return ReconstructionResult(
        clean_loss=clean,
        sae_loss=sae_l,
        zero_loss=zero,
        mean_loss=out["mean"] if mean_act is not None else None,
        l0=out["l0"],
        explained_variance=ev,
        loss_recovered_zero=lr_zero,
        loss_recovered_mean=lr_mean,
    )
