"""What ablating the top features of one layer's SAE does to the answer, compared across layers: the
reference notebook ablated the top 6 layer-0 features and the top 3 layer-1 features on the same prompts
and compared the loss increases (mean and std; histograms).

For SAEs ``s_1..s_m`` (e.g. one per layer) and a feature set per SAE, on the same prompts: each set ablated alone at
its SAE's hook at P, and all sets ablated together (one intervention with an edit per hook; a later hook's features
are encoded from its activation after the earlier edits). Per prompt the answer's loss increase (ablated - baseline,
nats, in the chosen mode, :mod:`saecircuits.analysis.ablations.modes`; the answer's log-prob drop is the same number);
per run the mean with a Student-t 95% interval; per pair of runs the paired difference of the loss increases. The
notebook printed mean and ``np.std`` only and ran batch size 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.ablations.feature_effects import features_ablation_edit
from saecircuits.analysis.ablations.modes import baseline_edits, check_mode
from saecircuits.analysis.statistics import MeanCI, mean_ci95
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, answer_metrics, task_batches
from saecircuits.models.interventions import interventions_for
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["LayerComparison", "compare_layer_ablations"]


@dataclass
class LayerComparison(NotebookDisplay):
    """Feature sets of several SAEs ablated alone and together at P, on the same prompts.

    Attributes:
        hooks: each SAE's hook point; features: each SAE's ablated set; mode: the ablation mode.
        labels: one per run: each hook alone, then ``"all together"``.
        loss_increase: float32 ``[n_prompts, m + 1]`` ablated - baseline answer loss (nats), columns = ``labels``.
        summary: per label, :class:`MeanCI` of the loss increase.
        paired: ``{(a, b): MeanCI}`` of ``loss_increase[:, a] - loss_increase[:, b]`` for every pair of runs.
    """

    hooks: list[str]
    features: list[list[int]]
    mode: str
    labels: list[str]
    loss_increase: torch.Tensor
    summary: dict[str, MeanCI]
    paired: dict[tuple[int, int], MeanCI]

    @property
    def interaction(self) -> MeanCI:
        """Per prompt, the loss increase of all sets ablated together minus the sum of each set's alone (nats):
        above 0 super-additive (the sets stand in for each other), below 0 sub-additive (they overlap, or the later
        features depend on the earlier ones), about 0 independent. Mean with its Student-t 95% interval."""
        return mean_ci95(self.loss_increase[:, -1].double() - self.loss_increase[:, :-1].double().sum(1))

    def display_title(self) -> str:
        return f"Top features of {', '.join(self.hooks)} ablated alone and together ({self.mode} mode)"

    def to_pandas(self):
        """One row per run: mean loss increase (nats) with its 95% interval."""
        import pandas as pd

        from saecircuits.display import meanci_rows

        return pd.DataFrame(meanci_rows(self.summary))

    def figure(self):
        """Bars of the mean loss increase per run."""
        from saecircuits.display import bar_figure

        df = self.to_pandas()
        return bar_figure(df["run"], df["mean"].tolist(), low=df["ci95_low"].tolist(), high=df["ci95_high"].tolist(),
                          title=self.display_title(), yaxis="loss increase (nats)", color="#9467bd")


def compare_layer_ablations(
    model,
    saes: Sequence[SAE],
    feature_sets: Sequence[Sequence[int]],
    task: Task,
    *,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> LayerComparison:
    """Each SAE's feature set ablated alone at P, and all together, on every prompt (the layer comparison).

    Args:
        model: a TransformerBridge.
        saes: the SAEs (distinct hook points).
        feature_sets: per SAE, the features ablated together (non-empty).
        task: the prompts.
        mode: ablation mode; for ``"clean_effect"`` each run's baseline splices in the SAEs of that run.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`LayerComparison`.

    Raises:
        ValueError: fewer than one SAE, mismatched lengths, an empty set, an index out of range, two SAEs on one
            hook, or an unknown ``mode``.
    """
    check_mode(mode)
    if not saes or len(saes) != len(feature_sets):
        raise ValueError("give one non-empty feature set per SAE (and at least one SAE)")
    hooks = [s.hook_point for s in saes]
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"two SAEs on one hook point ({hooks}); compare SAEs on different hooks")
    sets = []
    for sae, feats in zip(saes, feature_sets, strict=True):
        fs = [int(k) for k in feats]
        if not fs or min(fs) < 0 or max(fs) >= sae.d_sae:
            raise ValueError(f"{sae.hook_point}: features must be a non-empty list in 0..{sae.d_sae - 1}, got {fs}")
        sets.append(fs)
    m = len(saes)
    runs = [[j] for j in range(m)] + ([list(range(m))] if m > 1 else [])
    labels = hooks + (["all together"] if m > 1 else [])
    n = task.n_prompts
    loss_inc = torch.zeros(n, len(runs))
    iv = interventions_for(model)
    for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
        rows = torch.tensor(batch.indices)
        clean = iv.clean(batch)
        for r, members in enumerate(runs):
            edits = [features_ablation_edit(saes[j], sets[j], mode) for j in members]
            # the baseline (clean, or the members' SAEs spliced in) in the same run as the ablation
            base_edits = [e for j in members for e in baseline_edits(saes[j], mode)]
            run = iv.run_paired(clean, edits, base=base_edits)
            abl = answer_metrics(run.logits[:, 0], batch.answer_ids)["loss"]
            base = answer_metrics(run.base_logits, batch.answer_ids)["loss"]
            loss_inc[rows, r] = (abl - base).cpu()
    summary = {lab: mean_ci95(loss_inc[:, r]) for r, lab in enumerate(labels)}
    paired = {
        (a, b): mean_ci95(loss_inc[:, a] - loss_inc[:, b])
        for a in range(len(runs)) for b in range(a + 1, len(runs))
    }
    return LayerComparison(hooks, sets, mode, labels, loss_inc, summary, paired)
