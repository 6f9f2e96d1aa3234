"""DLA of the SAE's MLP layer split into the SAE reconstruction and the SAE error (the reference
notebook's "remainder" DLA).

For an SAE on ``blocks.L.mlp.hook_post`` and each prompt at its own prediction position P, with ``h`` the MLP
post-activation ``[d_mlp]`` and ``x_hat = sae(h)``:

- ``MLP = h @ W_out[L]``, ``reconstruction = x_hat @ W_out[L]``, ``error = (h - x_hat) @ W_out[L]`` (all ``[d_model]``;
  ``b_out[L]`` is excluded from all three, as in the notebook, so ``MLP`` is ``hook_mlp_out - b_out``);
- each vector goes through the final norm as a linear map with the prompt's cached ``ln_final.hook_scale`` at P
  (centred over d_model for LayerNorm, not for RMSNorm, times the norm's weight; :mod:`saecircuits.models.norms`) and
  is dotted with ``W_U[:, answer]`` (as ``dla.py``), so the values do not depend on weight processing;
- where a norm follows the MLP (Gemma 2/3 and OLMo 2's ``ln2_post``), each vector first goes through it as a linear
  map at its cached ``blocks.L.ln2_post.hook_scale`` at P (:func:`saecircuits.models.norms.site_post_norm`), so
  ``MLP`` is the DLA of ``hook_mlp_out`` (less that norm's bias, if any).

Identity: ``reconstruction + error == MLP`` per prompt (exact up to float rounding).

Departures from the notebook: each prompt is read at its own P in right-padded batches (the notebook ran 200 prompts
one at a time, batch row 0, index -2); each prompt uses its own answer id; per-prompt values and t intervals are
returned, not only the mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from saecircuits.analysis.statistics import mean_ci95
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches
from saecircuits.models.interventions import interventions_for
from saecircuits.models.norms import readout_of, site_post_norm
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = ["ErrorDLAResult", "sae_error_dla", "mlp_post_layer"]

ERROR_DLA_LABELS = ["MLP", "reconstruction", "error"]

_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


def mlp_post_layer(hook_point: str) -> int:
    """Layer ``L`` of an SAE hook point ``blocks.L.mlp.hook_post``.

    Raises:
        ValueError: the hook point is not an MLP post-activation (these analyses go through ``W_out[L]``); use an
            SAE trained on ``blocks.L.mlp.hook_post``.
    """
    m = _MLP_POST.match(hook_point)
    if m is None:
        raise ValueError(
            f"this analysis needs an SAE on an MLP post-activation 'blocks.L.mlp.hook_post', got {hook_point!r}; "
            "use an SAE trained on blocks.L.mlp.hook_post"
        )
    return int(m.group(1))


@dataclass
class ErrorDLAResult:
    """DLA (logits) of the SAE layer's MLP output, its SAE reconstruction and the SAE error, per prompt.

    Attributes:
        labels: ``["MLP", "reconstruction", "error"]``.
        per_prompt: float32 ``[n_prompts, 3]`` (logits), prompts in task order.
        mean: ``[3]`` mean over prompts.
        ci95: ``[3]`` half-width of the Student-t 95% interval (NaN for one prompt).
        max_identity_error: ``max_i |reconstruction_i + error_i - MLP_i|`` (logits; float rounding only).
    """

    labels: list[str]
    per_prompt: torch.Tensor
    mean: torch.Tensor
    ci95: torch.Tensor
    max_identity_error: float


def sae_error_dla(
    model,
    sae: SAE,
    task: Task,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> ErrorDLAResult:
    """DLA of the MLP output at P split into the SAE reconstruction's and the SAE error's shares.

    Args:
        model: a TransformerBridge (any weight processing).
        sae: an SAE on ``blocks.L.mlp.hook_post``.
        task: prompts, prediction positions, answers.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`ErrorDLAResult` (logits; ``b_out`` excluded).

    Raises:
        ValueError: the SAE is not on an MLP post-activation, or the model's norm is neither LayerNorm nor RMSNorm.
    """
    layer = mlp_post_layer(sae.hook_point)
    readout = readout_of(model)
    W_out = model.W_out[layer].detach().float()  # [d_mlp, d_model]
    per_prompt = torch.zeros(task.n_prompts, 3)
    iv = interventions_for(model)
    post = site_post_norm(model, sae.hook_point)
    with torch.no_grad():
        for batch in task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch):
            acts = iv.clean(
                batch, read=[sae.hook_point, "ln_final.hook_scale"] + ([post[1]] if post else []), logits=False
            ).reads
            h = acts[sae.hook_point].float()  # [b, d_mlp]
            x_hat = sae(h.to(sae.W_dec.dtype)).float().to(h.device)
            mlp = h @ W_out.to(h.device)
            rec = x_hat @ W_out.to(h.device)
            comps = torch.stack([mlp, rec, mlp - rec], 1)  # [b, 3, d_model]
            if post is not None:  # through the norm on the MLP output, linear at its cached scale
                comps = post[0].linear(comps, acts[post[1]])
            dla = readout.dla(comps, acts["ln_final.hook_scale"], batch.answer_ids)
            per_prompt[torch.tensor(batch.indices)] = dla.cpu()
    stats = [mean_ci95(per_prompt[:, c]) for c in range(3)]
    return ErrorDLAResult(
        labels=list(ERROR_DLA_LABELS),
        per_prompt=per_prompt,
        mean=torch.tensor([s.mean for s in stats]),
        ci95=torch.tensor([s.half_width for s in stats], dtype=torch.float32),
        max_identity_error=float((per_prompt[:, 1] + per_prompt[:, 2] - per_prompt[:, 0]).abs().max()),
    )
