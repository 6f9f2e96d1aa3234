"""The exact effect of ablating each active feature alone at the prediction position, for every prompt, and its table.

Activations at P (:class:`FeatureActs`, :func:`feature_activations`) live in
:mod:`saecircuits.analysis.ablations.activations_at_p`, the single-feature edits and paired loss runs in
:mod:`saecircuits.analysis.ablations.single_feature`; both are importable from here as before.

Exact effects (:func:`feature_effects`): for each prompt and each feature k active at its P, the answer's loss, log-prob,
logit and rank at P with k ablated residual-preservingly at P, ``x_P - f_k(x_P) W_dec[k]`` (the SAE error is kept; only
the feature's decoded contribution is removed, the reference notebook's ablation). Every active feature of every prompt
is computed by default, in batches of features that share the prompt's prefix cache
(:mod:`saecircuits.models.interventions`): one clean pass per batch of prompts, then only position P from the SAE's
layer onward, once per feature; for an SAE on the last layer that is one batched matmul on the residual at P. The
logits of the variants are made and reduced to the answer's metrics a chunk of rows at a time, so one run holds
every variant of a batch of prompts (see ``single_feature._paired_answer_metrics``). The ablation table
(:func:`feature_ablation_table`) summarises the effects per feature.

Every ablation here takes ``mode`` (:mod:`saecircuits.analysis.ablations.modes`): ``"residual"`` (above, the default),
``"reconstruction"`` (the activation becomes the SAE reconstruction with the feature zeroed, the notebook's "encoded" loss) or
``"clean_effect"`` (that, compared with the SAE spliced in rather than with the clean run).

Departures from the reference notebook (on purpose):
- one explicit activity threshold (default 0, i.e. ``f > 0``) for the fraction active, the mean activation and the
  prompts a feature is ablated on (the notebook mixed ``f > 0.1`` and ``f > 0.17 * max``);
- every active prompt of every active feature is ablated (the notebook ablated 100 candidates on their first 200
  active prompts); table candidates need ``min_fraction_active`` (default 0.05, the notebook's 5%) so a feature seen
  on one prompt does not top the ranking on a single number;
- activations and ablation losses use the same BOS-prefixed prompts (the notebook measured the losses without BOS);
- every mean comes with a t-based 95% interval and the actual n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from saecircuits.analysis.ablations.activations_at_p import (  # noqa: F401  (re-exported: the names' old home)
    FeatureActs,
    activations_or_compute,
    feature_activations,
)
from saecircuits.analysis.ablations.modes import (
    OffRange,
    OffRangeCounter,
    activation_floor,
    baseline_edits,
    baseline_logits,
    check_mode,
)
from saecircuits.analysis.ablations.single_feature import (  # noqa: F401  (re-exported)
    MAX_LOGIT_FLOATS,
    MAX_RUN_FLOATS,
    _final_resid_hook,
    _paired_answer_metrics,
    _rows_per_run,
    answer_losses,
    features_ablation_edit,
    one_feature_each_edit,
    single_feature_ablation_losses,
    spliced_losses,
    variant_losses,
)
from saecircuits.analysis.statistics import t_quantile
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, answer_metrics, task_batches
from saecircuits.models.interventions import interventions_for
from saecircuits.models.norms import site_post_norm
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = [
    "FeatureActs",
    "feature_activations",
    "activations_or_compute",
    "answer_losses",
    "spliced_losses",
    "FeatureEffects",
    "feature_effects",
    "single_feature_ablation_losses",
    "feature_ablation_table",
    "features_ablation_edit",
    "TABLE_COLUMNS",
    "MAX_LOGIT_FLOATS",
]

TABLE_COLUMNS = [
    "feature",
    "loss_increase",
    "loss_increase_ci95",
    "mean_activation",
    "fraction_active",
    "n_prompts",
    "logprob_diff",
    "logit_diff",
    "rank_diff",
]


@dataclass
class FeatureEffects(NotebookDisplay):
    """Exact effects of ablating single features at P, one entry per (prompt, active feature) pair.

    Attributes:
        n_prompts, d_sae: of the task and SAE.
        prompt, feature: int64 ``[N]`` the pairs, ordered by prompt then feature.
        activation: float32 ``[N]`` ``f_k`` at P (SAE feature units).
        loss_increase: ``[N]`` ablated minus baseline answer loss (nats; the baseline is the clean run except in
            the ``"clean_effect"`` mode).
        logprob_diff, logit_diff: ``[N]`` baseline minus ablated answer log-prob (nats) / logit (positive = the
            feature helped the answer).
        rank_diff: ``[N]`` baseline minus ablated rank (negative = the ablation pushed the answer down).
        clean_loss: float32 ``[n_prompts]`` clean answer loss (nats).
        selection: how features were chosen (``"all_active"``, ``"top_<N>_dla"`` or ``"given"``).
        mode: the ablation mode (:mod:`saecircuits.analysis.ablations.modes`); the differences above are measured
            against ``baseline_loss``.
        baseline_loss: float32 ``[n_prompts]`` answer loss of the baseline run (nats): ``clean_loss`` for the
            ``"residual"`` and ``"reconstruction"`` modes, the SAE-spliced run's for ``"clean_effect"``.
        off_range: how many of the ablated activations left the hook's range (None when not counted).
    """

    n_prompts: int
    d_sae: int
    prompt: torch.Tensor
    feature: torch.Tensor
    activation: torch.Tensor
    loss_increase: torch.Tensor
    logprob_diff: torch.Tensor
    logit_diff: torch.Tensor
    rank_diff: torch.Tensor
    clean_loss: torch.Tensor
    selection: str = "all_active"
    mode: str = "residual"
    baseline_loss: torch.Tensor | None = None
    off_range: OffRange | None = None

    def of(self, feature: int) -> pd.DataFrame:
        """Per-prompt effects of one feature: columns ``prompt_index``, ``activation``, ``loss_increase``,
        ``logprob_diff``, ``logit_diff``, ``rank_diff`` (prompts ascending)."""
        sel = self.feature == int(feature)
        return pd.DataFrame(
            {
                "prompt_index": self.prompt[sel].numpy(),
                "activation": self.activation[sel].numpy(),
                "loss_increase": self.loss_increase[sel].numpy(),
                "logprob_diff": self.logprob_diff[sel].numpy(),
                "logit_diff": self.logit_diff[sel].numpy(),
                "rank_diff": self.rank_diff[sel].numpy(),
            }
        )

    def summary(self, *, min_prompts: int = 1) -> pd.DataFrame:
        """One row per feature with at least ``min_prompts`` ablated prompts, sorted by mean loss increase (desc).

        Columns: ``feature``, ``n_active_prompts``, ``fraction_active``, ``mean_activation``, ``loss_increase``
        (mean, nats), ``loss_increase_ci95`` (t half-width; NaN for n < 2), ``logprob_diff``, ``logit_diff``,
        ``rank_diff`` (means).
        """
        df = pd.DataFrame(
            {
                "feature": self.feature.numpy(),
                "activation": self.activation.double().numpy(),
                "loss_increase": self.loss_increase.double().numpy(),
                "logprob_diff": self.logprob_diff.double().numpy(),
                "logit_diff": self.logit_diff.double().numpy(),
                "rank_diff": self.rank_diff.double().numpy(),
            }
        )
        g = df.groupby("feature", sort=True)
        out = g.mean()
        n = g.size()
        std = g["loss_increase"].std(ddof=1)
        # Student-t half-width per feature, as stats.mean_ci95 (NaN for n < 2); one quantile per distinct n
        t = n.map(lambda m: t_quantile(0.975, m - 1) if m >= 2 else float("nan"))
        summary = pd.DataFrame(
            {
                "feature": out.index.to_numpy(dtype=np.int64),
                "n_active_prompts": n.to_numpy(),
                "fraction_active": n.to_numpy() / self.n_prompts,
                "mean_activation": out["activation"].to_numpy(),
                "loss_increase": out["loss_increase"].to_numpy(),
                "loss_increase_ci95": (t * std / np.sqrt(n)).to_numpy(),
                "logprob_diff": out["logprob_diff"].to_numpy(),
                "logit_diff": out["logit_diff"].to_numpy(),
                "rank_diff": out["rank_diff"].to_numpy(),
            }
        )
        summary = summary[summary["n_active_prompts"] >= min_prompts]
        return summary.sort_values(["loss_increase", "feature"], ascending=[False, True], kind="stable").reset_index(
            drop=True
        )

    def display_title(self) -> str:
        return (f"Exact single-feature ablation at P ({self.mode} mode): {int(self.prompt.numel())} (prompt, feature) "
                f"pairs over {self.n_prompts} prompts")

    def to_pandas(self):
        """:meth:`summary`: one row per feature, sorted by mean loss increase (nats)."""
        return self.summary()

    def figure(self):
        """Each feature's mean loss increase (nats) against the fraction of prompts where it is active."""
        from saecircuits.display import scatter_figure

        df = self.summary()
        return scatter_figure(df["fraction_active"], df["loss_increase"], text=[f"f{k}" for k in df["feature"]],
                              title="Loss increase when ablated alone vs how often the feature is active",
                              xaxis="fraction of prompts active at P", yaxis="mean loss increase (nats)",
                              color="#1f77b4")


def _feature_write(model, sae: SAE, features: torch.Tensor | None = None) -> torch.Tensor:
    """``[d_sae, d_model]``: what one unit of each feature writes into the residual stream at its layer (Gemma 2/3,
    OLMo 2: through the post-MLP / post-attention norm it passes at unit scale, one factor per position that never
    reorders its features; see :func:`saecircuits.models.norms.site_post_norm`). With ``features`` (int64 ``[n]``):
    those rows only, ``[n, d_model]`` (each row is computed on its own, so a few features cost a few rows)."""
    write = _feature_write_raw(model, sae, features)
    post = site_post_norm(model, sae.hook_point_out)
    return write if post is None else post[0].linear(write, torch.ones(1, device=write.device))


def _feature_write_raw(model, sae: SAE, features: torch.Tensor | None = None) -> torch.Tensor:
    from saecircuits.analysis.readouts.error_dla import mlp_post_layer

    hp = sae.hook_point_out  # a transcoder writes the MLP's output
    W_dec = sae.W_dec.detach() if features is None else sae.W_dec.detach()[features.to(sae.W_dec.device)]
    if hp.endswith("mlp.hook_post"):
        return W_dec.float() @ model.W_out[mlp_post_layer(hp)].detach().float()
    if hp.endswith(("hook_mlp_out", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out")):
        return W_dec.float()
    if hp.endswith("attn.hook_z"):  # flattened heads [H * E] through each head's W_O
        layer = int(hp.split(".")[1])
        W_O = model.W_O[layer].detach().float()  # [H, E, d_model]
        return W_dec.float() @ W_O.reshape(-1, W_O.shape[-1])
    raise ValueError(
        f"top-N selection by |activation x DLA| needs an SAE whose features write to the residual stream directly "
        f"or through W_out / W_O (mlp.hook_post, attn.hook_z, hook_mlp_out, hook_resid_*); got {hp!r}. Use "
        "features='all'."
    )


def feature_effects(
    model,
    sae: SAE,
    task: Task,
    *,
    features: str | int | Sequence[int] = "all",
    threshold: float = 0.0,
    acts: FeatureActs | torch.Tensor | None = None,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
) -> FeatureEffects:
    """Exact single-feature ablation effects at P of every feature active on each prompt.

    For each prompt i and selected feature k with ``f_k > threshold`` at P, the answer metrics with
    ``x_P <- x_P - f_k(x_P) W_dec[k]`` at ``sae.hook_point`` (``mode="residual"``, the reference notebook's
    single-feature ablation; the other modes are in :mod:`saecircuits.analysis.ablations.modes`), via
    prefix-cached interventions: per batch of prompts one clean pass, then ``V`` features per prompt as ``V`` variants
    of position P (runs of at most :data:`MAX_RUN_FLOATS` activation floats, their logits reduced
    :data:`MAX_LOGIT_FLOATS` at a time; without the engine, runs of ``B x V x d_vocab`` logits up to
    :data:`MAX_LOGIT_FLOATS`). The edited activations that
    leave the hook's range (below GELU's minimum, say) are counted in ``off_range``.

    Args:
        model: a TransformerBridge.
        sae: any :class:`SAE` on a hook the intervention layer edits.
        task: prompts and answers.
        features: ``"all"`` (every active feature, default); an int N (per prompt, the N active features with the
            largest ``|f_k x DLA_k|``, the feature's direct effect on the answer logit through the final norm at the
            prompt's scale); or a list of feature indices (those of them that are active).
        threshold: activity threshold (strict).
        acts: precomputed :func:`feature_activations` (avoids one pass).
        mode: ``"residual"`` (default), ``"reconstruction"`` or ``"clean_effect"``.
        max_tokens, max_batch: prompt batch budget.
        progress: show a progress bar over (prompt, feature) pairs with an ETA.
        shard: split the prompt batches over the ranks of a sharded run (:mod:`saecircuits.distributed`; default:
            when a process group with more than one rank is initialised, every rank calling with the same
            arguments). Each rank computes the batches ``b % world_size == rank`` of the single-process batching;
            the pairs and per-prompt losses are gathered, so every rank returns exactly one process's result.

    Returns:
        :class:`FeatureEffects`.

    Raises:
        ValueError: a bad ``features`` value or ``mode``, or top-N selection on an SAE whose features do not write to
            the residual stream (directly or through ``W_out``).
    """
    from saecircuits.distributed import gather_rows, is_sharded, is_writer, my_batches, sum_disjoint
    from saecircuits.models.norms import readout_of

    check_mode(mode)
    counter = OffRangeCounter(activation_floor(model, sae.hook_point_out))

    acts = activations_or_compute(model, sae, task, acts, max_tokens=max_tokens, max_batch=max_batch)
    d_vocab = int(model.cfg.d_vocab)
    top_n: int | None = None
    given: torch.Tensor | None = None
    if isinstance(features, str):
        if features != "all":
            raise ValueError(f"features must be 'all', a positive int or a list of indices, got {features!r}")
        selection = "all_active"
    elif isinstance(features, int):
        if features < 1:
            raise ValueError(f"features (top N) must be at least 1, got {features}")
        top_n, selection = features, f"top_{features}_dla"
        write = _feature_write(model, sae)
        readout = readout_of(model)
    else:
        given = torch.as_tensor(list(features), dtype=torch.long)
        if given.numel() and (int(given.min()) < 0 or int(given.max()) >= sae.d_sae):
            raise ValueError(f"feature indices must lie in 0..{sae.d_sae - 1}")
        selection = "given"
    keep = acts.value > threshold
    if given is not None:
        keep &= torch.isin(acts.feature, given)
    sharded = is_sharded(shard)
    # this rank's share of the single-process batches (all of them in one process)
    batches = list(my_batches(task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch), sharded))
    mine = torch.tensor([i for b in batches for i in b.indices], dtype=torch.long)
    per_prompt = torch.bincount(acts.prompt[keep], minlength=task.n_prompts)[mine]
    total = int(per_prompt.sum() if top_n is None else per_prompt.clamp(max=top_n).sum())
    from saecircuits.progress import progress_bar

    bar = progress_bar(total=total, desc=f"{sae.hook_point}: (prompt, feature) ablations",
                       enabled=progress and is_writer())
    iv = interventions_for(model)
    clean_loss = torch.zeros(task.n_prompts)
    baseline_loss = torch.zeros(task.n_prompts)
    parts: list[tuple[torch.Tensor, ...]] = []
    post = site_post_norm(model, sae.hook_point_out)  # Gemma: the write's own norm scale divides it too
    reads = [sae.hook_point] + (["ln_final.hook_scale"] if top_n is not None else [])
    if top_n is not None and post is not None:
        reads.append(post[1])
    final = _final_resid_hook(iv, sae)
    rows_per_run = _rows_per_run(model, task, d_vocab, final)
    for batch in batches:
        clean = iv.clean(batch, read=reads)
        with torch.no_grad():
            f = sae.encode(clean.reads[sae.hook_point].to(sae.W_dec.dtype)).float()  # [B, d_sae]
        active = f > threshold
        if given is not None:
            active &= torch.isin(torch.arange(sae.d_sae, device=f.device), given.to(f.device))[None]
        score = f.clone()
        if top_n is not None:
            score = (f * _per_feature_dla(readout, write, clean, batch, None if post is None else post[1])).abs()
        score = score.masked_fill(~active, -float("inf"))
        n_act = active.sum(1)
        V = int(n_act.max()) if top_n is None else int(min(top_n, int(n_act.max())))
        idx = torch.tensor(batch.indices)
        clean_loss[idx] = answer_metrics(clean.logits, batch.answer_ids)["loss"].cpu()
        if V == 0:
            baseline_loss[idx] = answer_metrics(baseline_logits(iv, clean, sae, mode), batch.answer_ids)["loss"].cpu()
            continue
        order = torch.topk(score, V, dim=1)  # features by score, inactive last (-inf)
        table = torch.where(torch.isfinite(order.values), order.indices, torch.full_like(order.indices, -1))
        B = table.shape[0]
        chunk = max(1, rows_per_run // max(1, B) - 1)  # + the baseline variant
        for v0 in range(0, V, chunk):
            sub = table[:, v0 : v0 + chunk]
            # the baseline in the same run as the ablations: an inactive feature's effect is exactly 0
            base, m = _paired_answer_metrics(iv, clean, [one_feature_each_edit(sae, sub, mode, counter)],
                                             sub.shape[1], baseline_edits(sae, mode), final)
            if v0 == 0:
                baseline_loss[idx] = base["loss"].cpu()
            ok = sub >= 0
            b_idx, v_idx = torch.nonzero(ok, as_tuple=True)
            k = sub[b_idx, v_idx]
            parts.append(
                (
                    idx[b_idx.cpu()],
                    k.cpu(),
                    f[b_idx, k].cpu(),
                    (m["loss"][b_idx, v_idx] - base["loss"][b_idx]).cpu(),
                    (base["logprob"][b_idx] - m["logprob"][b_idx, v_idx]).cpu(),
                    (base["logit"][b_idx] - m["logit"][b_idx, v_idx]).cpu(),
                    (base["rank"][b_idx] - m["rank"][b_idx, v_idx]).cpu(),
                )
            )
            bar.update(int(ok.sum()))
    bar.close()
    cols = [torch.cat([p[j] for p in parts]) if parts else torch.zeros(0) for j in range(7)]
    cols = [c.long() if j < 2 else c.float() for j, c in enumerate(cols)]
    if sharded:  # every rank's pairs (the order below is one process's) and its prompts' losses (0 elsewhere)
        cols = [gather_rows(c, f"{sae.hook_point}: feature effects") for c in cols]
        clean_loss = sum_disjoint(clean_loss, f"{sae.hook_point}: clean losses")
        baseline_loss = sum_disjoint(baseline_loss, f"{sae.hook_point}: baseline losses")
        counter.merge_ranks()
    prompt, feature = cols[0], cols[1]
    order = torch.argsort(prompt * sae.d_sae + feature)
    return FeatureEffects(
        n_prompts=task.n_prompts,
        d_sae=sae.d_sae,
        prompt=prompt[order],
        feature=feature[order],
        activation=cols[2][order].float(),
        loss_increase=cols[3][order].float(),
        logprob_diff=cols[4][order].float(),
        logit_diff=cols[5][order].float(),
        rank_diff=cols[6][order].float(),
        clean_loss=clean_loss,
        selection=selection,
        mode=mode,
        baseline_loss=baseline_loss,
        off_range=counter.result(),
    )


def _per_feature_dla(readout, write: torch.Tensor, clean, batch, post_scale: str | None = None) -> torch.Tensor:
    """``[B, d_sae]``: DLA per unit activation of every feature on each prompt's answer (final-norm scale at P; times
    the write's post-norm scale at P, read at ``post_scale``, for Gemma)."""
    scale = clean.reads["ln_final.hook_scale"].reshape(-1).float()
    if post_scale is not None:
        scale = scale * clean.reads[post_scale].reshape(-1).float().to(scale.device)
    normed = readout.norm.linear(write.to(scale.device), torch.ones(1))  # centred, weighted; scale applied below
    u = readout.answer_columns(batch.answer_ids).to(normed.device)  # [B, d_model]
    return (u @ normed.T) / scale[:, None]


def feature_ablation_table(
    model,
    sae: SAE,
    task: Task,
    *,
    threshold: float = 0.0,
    min_fraction_active: float = 0.05,
    max_candidates: int | None = None,
    effects: FeatureEffects | None = None,
    acts: FeatureActs | torch.Tensor | None = None,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Features and the mean loss increase at P when each is ablated alone on its active prompts (the reference
    notebook's single-feature ablation table, exact for every active feature).

    Args:
        model, sae, task: the model, any SAE, the behaviour.
        threshold: a feature is active on a prompt when ``f > threshold`` at P (strict).
        min_fraction_active: rows need the feature active on at least this fraction of prompts (notebook: 5%).
        max_candidates: keep only the top this many by mean activation over active prompts before ranking (the
            notebook's 100); None = every feature that passes ``min_fraction_active``.
        effects: precomputed :func:`feature_effects` (else computed for all active features in ``mode``).
        acts: precomputed :func:`feature_activations`.
        mode: ablation mode when the effects are computed here (see :func:`feature_effects`).
        max_tokens, max_batch: batch budget.
        progress: progress bar while computing the effects.

    Returns:
        DataFrame with columns :data:`TABLE_COLUMNS`: ``feature``, ``loss_increase`` (mean over the feature's active
        prompts of ablated - baseline loss, nats; the baseline is the clean run except in ``"clean_effect"``), ``loss_increase_ci95`` (t half-width; NaN for n < 2),
        ``mean_activation`` (over active prompts), ``fraction_active``, ``n_prompts`` (prompts ablated on), and the
        mean ``logprob_diff``, ``logit_diff``, ``rank_diff`` (clean - ablated); sorted by ``loss_increase``
        descending. Empty (same columns) when no feature qualifies.
    """
    if effects is None:
        effects = feature_effects(
            model, sae, task, threshold=threshold, acts=acts, mode=mode, max_tokens=max_tokens, max_batch=max_batch,
            progress=progress,
        )
    summary = effects.summary()
    summary = summary[summary["fraction_active"] >= min_fraction_active]
    if max_candidates is not None:
        summary = summary.sort_values(["mean_activation", "feature"], ascending=[False, True], kind="stable")
        summary = summary.head(max_candidates)
    table = summary.rename(columns={"n_active_prompts": "n_prompts"})[TABLE_COLUMNS]
    return table.sort_values(["loss_increase", "feature"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )
