"""Activation-scaled DLA of every SAE feature to the answer (the reference notebook's DLA of each
feature's decoder direction times its mean activation).

For an SAE on ``blocks.L.mlp.hook_post`` with activations ``f_ik`` at each prompt's P and answers ``a_i``:

- ``D = W_dec @ W_out[L]`` ``[d_sae, d_model]``; ``G[k, a] = norm(D[k]) . W_U[:, a]`` (logits per unit activation),
  with ``norm`` the final norm's centring and weight but no scale (the notebook's ``D[k] . W_U[:, a]`` under
  ``fold_ln``; explicit here so every weight-processing switch gives the same numbers);
- ``mean_activation_k = mean_i f_ik`` (unconditional, = the notebook's ``X.mean(0)``);
- ``dla_per_unit_k = mean_i G[k, a_i]`` (one vector when every prompt has the same answer, as in the notebook);
- ``scaled_k = mean_i f_ik G[k, a_i]`` (``= mean_activation_k * dla_per_unit_k`` for a single answer id);
- ``scaled_ln_k = mean_i f_ik G[k, a_i] / s_i`` with ``s_i`` the prompt's cached ``ln_final.hook_scale`` at P (the final
  norm as a linear map, :mod:`saecircuits.models.norms`): the feature's actual direct contribution
  to the answer logit (the notebook used no scale). Summed over k this is the DLA of ``(x_hat - b_dec)
  @ W_out[L]``, i.e. the reconstruction row of ``error_dla.py`` minus the ``b_dec`` term.

Where a norm follows the MLP (Gemma 2/3 and OLMo 2's ``ln2_post``), ``D`` goes through it at unit scale and ``s_i``
is the product of the final norm's and that norm's cached scales at P
(:func:`saecircuits.models.norms.site_post_norm`), so ``scaled_ln`` stays the feature's direct contribution and the
identity with ``error_dla.py`` still holds.

Departures: per-prompt answers; the LN-scaled variant; every prompt read at its own P in batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saecircuits.analysis.readouts.error_dla import mlp_post_layer
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches
from saecircuits.models.interventions import interventions_for
from saecircuits.models.norms import readout_of, site_post_norm
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["ScaledDLAResult", "activation_scaled_dla"]


@dataclass
class ScaledDLAResult:
    """Per-feature activation-scaled DLA (all ``[d_sae]`` float32 on CPU; logits unless stated).

    Attributes:
        mean_activation: mean activation at P over all prompts (SAE feature units).
        dla_per_unit: mean over prompts of ``G[k, a_i]`` (logits per unit activation, no norm scale).
        scaled: ``mean_i f_ik G[k, a_i]`` (logits, no norm scale; the notebook's ``s_k``).
        scaled_ln: the same through the final norm with each prompt's cached scale (logits).
    """

    mean_activation: torch.Tensor
    dla_per_unit: torch.Tensor
    scaled: torch.Tensor
    scaled_ln: torch.Tensor

    def top(self, n: int = 5, *, by: str = "scaled") -> list[int]:
        """Feature indices of the ``n`` largest values of ``by`` (``"scaled"`` or ``"scaled_ln"``), descending."""
        v = getattr(self, by)
        return [int(i) for i in torch.argsort(v, descending=True)[:n]]


def activation_scaled_dla(
    model,
    sae: SAE,
    task: Task,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> ScaledDLAResult:
    """Mean activation, DLA per unit activation and their product for every feature.

    Args:
        model: a TransformerBridge (any weight processing).
        sae: an SAE on ``blocks.L.mlp.hook_post``.
        task: prompts and answers.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`ScaledDLAResult`.

    Raises:
        ValueError: the SAE is not on ``mlp.hook_post``; unsupported final norm.
    """
    layer = mlp_post_layer(sae.hook_point)
    readout = readout_of(model)
    iv = interventions_for(model)
    post = site_post_norm(model, sae.hook_point)  # Gemma: ln2_post's weight in G, its scale with s_i
    answers = sorted(set(int(a) for a in task.answer_ids))
    col = {a: j for j, a in enumerate(answers)}
    d_sae = sae.d_sae
    # per answer column j: sum_i f_i and sum_i f_i / s_i over the prompts with that answer
    f_sum = torch.zeros(len(answers), d_sae, dtype=torch.float64)
    f_scaled_sum = torch.zeros(len(answers), d_sae, dtype=torch.float64)
    counts = torch.zeros(len(answers), dtype=torch.float64)
    with torch.no_grad():
        for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
            names = [sae.hook_point, "ln_final.hook_scale"] + ([post[1]] if post else [])
            read = iv.clean(batch, read=names, logits=False).reads
            f = sae.encode(read[sae.hook_point].to(sae.W_dec.dtype)).double().cpu()  # [b, d_sae]
            s = read["ln_final.hook_scale"].double().reshape(-1).cpu()
            if post is not None:
                s = s * read[post[1]].double().reshape(-1).cpu()
            j = torch.tensor([col[int(a)] for a in batch.answer_ids.tolist()])
            f_sum.index_add_(0, j, f)
            f_scaled_sum.index_add_(0, j, f / s[:, None])
            counts.index_add_(0, j, torch.ones(len(j), dtype=torch.float64))
        W_out = model.W_out[layer].detach().double()
        D = sae.W_dec.detach().double().to(W_out.device) @ W_out  # [d_sae, d_model]
        if post is not None:  # the MLP output's norm at unit scale (its scale is in s above)
            D = post[0].linear(D, torch.ones(1, device=D.device)).double()
        if readout.norm.centre:
            D = D - D.mean(-1, keepdim=True)
        D = D * readout.norm.weight.double().to(D.device)
        U = readout.W_U.detach().double()[:, answers].to(W_out.device)  # [d_model, A]
        G = (D @ U).cpu()  # [d_sae, A]
    n = float(counts.sum())
    return ScaledDLAResult(
        mean_activation=(f_sum.sum(0) / n).float(),
        dla_per_unit=((G * counts[None]).sum(1) / n).float(),
        scaled=((f_sum.T * G).sum(1) / n).float(),
        scaled_ln=((f_scaled_sum.T * G).sum(1) / n).float(),
    )
