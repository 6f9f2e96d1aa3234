"""Direct logit attribution (DLA) of every model component to the answer logit (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits"; the reference notebook's ``DLA`` step).

The residual stream at the final norm's input is the sum of the components (MLPs not expanded):
``embed + pos_embed + sum_l sum_h z_{l,h} W_O[l,h] + sum_l b_O[l] + sum_l mlp_out_l``. The final norm is applied as a
linear map with the cached ``ln_final.hook_scale`` of the prompt at P (:mod:`saecircuits.models.norms`): each component
is centred over d_model (LayerNorm only), divided by the scale and multiplied by the norm's weight; the DLA of a
component is that vector dotted with ``W_U[:, answer]``. The norm's bias and ``b_U`` form the constant
``Readout.constant``. So the components plus that constant sum to the answer logit under every weight-processing
switch (completeness, checked per prompt and returned as ``max_abs_error``); with ``fold_ln`` the constant is
``b_U[answer]``, as in TransformerLens.

Block shapes: parallel attention + MLP blocks (GPT-NeoX / Pythia) write the same components. Where a norm follows
each attention output (Gemma 2/3 and OLMo 2's ``ln1_post``), a head's component is its write ``z W_O`` through that
norm as a linear map at the layer's cached ``ln1_post.hook_scale`` at P (``b_O`` likewise, in the ``bias`` row), so
the heads still sum to ``hook_attn_out``; ``hook_mlp_out`` is already the normed MLP output. With soft-capped final
logits (Gemma 2) a capped logit is not linear in the residual stream: the DLA there is of the **pre-cap** answer
logit, and completeness is checked against it (``Readout.pre_cap_logit``).

Departures from the reference notebook: every prompt is read at its own prediction position in a right-padded batch
(the notebook runs one prompt at a time); per-prompt values and 95% t intervals are returned, not just the mean; ``pos_embed`` is absent for rotary models and ``bias`` is zeros for bias-free models (Llama).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saecircuits.analysis.statistics import mean_ci95
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches, with_progress
from saecircuits.models.interventions import interventions_for
from saecircuits.models.norms import readout_of, site_post_norm
from saecircuits.tasks.base import Task

__all__ = ["DLAResult", "direct_logit_attribution", "component_labels"]


@dataclass
class DLAResult(NotebookDisplay):
    """DLA of each component to the answer logit.

    Attributes:
        labels: component names ``[n_components]``: ``L{l}H{h}`` for every layer and head, then ``MLP{l}``, then
            ``embed``, ``pos_embed`` (only with learned positions) and ``bias``.
        per_prompt: float32 ``[n_prompts, n_components]`` (logits), prompts in task order.
        mean: ``[n_components]`` mean over prompts.
        ci95_low, ci95_high: ``[n_components]`` Student-t 95% interval of the mean (``stats.mean_ci95``).
        target_logit: ``[n_prompts]`` answer logit (the pre-cap logit for a soft-capped model) minus the readout constant (``b_U[answer]`` plus the final norm's
            bias read out) from the model's actual forward pass.
        max_abs_error: ``max_i |sum_c per_prompt[i, c] - target_logit[i]|`` (completeness check, logits).
        logit_soft_cap: the model's final-logit soft cap (Gemma 2), or None; when set, every value above is of the
            pre-cap logit (the capped ``cap * tanh(pre / cap)`` is not linear in the residual stream).
    """

    labels: list[str]
    per_prompt: torch.Tensor
    mean: torch.Tensor
    ci95_low: torch.Tensor
    ci95_high: torch.Tensor
    target_logit: torch.Tensor
    max_abs_error: float
    logit_soft_cap: float | None = None

    def display_title(self) -> str:
        return (f"Direct logit attribution to the answer: {len(self.labels)} components over "
                f"{int(self.per_prompt.shape[0])} prompts (logits; completeness error {self.max_abs_error:.2e})")

    def to_pandas(self):
        """One row per component: ``component``, ``mean`` and its 95% interval (logits), sorted by |mean|."""
        import pandas as pd

        df = pd.DataFrame({"component": self.labels, "mean": self.mean.double().numpy(),
                           "ci95_low": self.ci95_low.double().numpy(), "ci95_high": self.ci95_high.double().numpy()})
        return df.reindex(df["mean"].abs().sort_values(ascending=False).index).reset_index(drop=True)

    def figure(self):
        """Bars of the mean DLA per component with 95% intervals."""
        from saecircuits.display import bar_figure

        return bar_figure(self.labels, self.mean.tolist(), low=self.ci95_low.tolist(), high=self.ci95_high.tolist(),
                          title="Direct logit attribution to the answer", yaxis="mean DLA (logits)")


def _has_pos_embed(model) -> bool:
    return getattr(model.cfg, "positional_embedding_type", "standard") == "standard"


def component_labels(model) -> list[str]:
    """Component labels in output order (see :class:`DLAResult`)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    labels = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    labels += [f"MLP{layer}" for layer in range(n_layers)] + ["embed"]
    if _has_pos_embed(model):
        labels.append("pos_embed")
    return labels + ["bias"]


def _attn_biases(model) -> torch.Tensor:
    """``b_O`` ``[n_layers, d_model]``; zeros for bias-free models (TL raises AttributeError there)."""
    try:
        b_o = model.b_O
    except AttributeError:
        b_o = None
    if b_o is None:
        return torch.zeros(model.cfg.n_layers, model.cfg.d_model, device=model.W_U.device, dtype=model.W_U.dtype)
    return b_o


def _attn_bias_sum(model) -> torch.Tensor:
    """``sum_l b_O[l]`` ``[d_model]`` (float32: a bf16 model's biases are summed in float32); zeros for bias-free
    models (TL raises AttributeError there)."""
    return _attn_biases(model).float().sum(0)


def direct_logit_attribution(
    model,
    task: Task,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
) -> DLAResult:
    """DLA of every attention head, MLP, embedding and the attention-bias sum to the answer logit at P.

    Args:
        model: a TransformerBridge, with any weight processing (the final norm's weight and bias are applied
            explicitly).
        task: prompts, prediction positions and answers.
        max_tokens, max_batch: batch budget.
        progress: show a progress bar over prompts.

    Returns:
        :class:`DLAResult` (logits).

    Raises:
        ValueError: unsupported normalisation type.
    """
    n_layers = model.cfg.n_layers
    readout = readout_of(model)
    pos_embed = _has_pos_embed(model)
    reads = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    reads += [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    reads += ["hook_embed"] + (["hook_pos_embed"] if pos_embed else []) + ["ln_final.hook_scale"]
    # Gemma 2/3, OLMo 2: a norm on each attention output (ln1_post); at its cached scale it is linear, so the heads'
    # writes (and b_O) through it sum to hook_attn_out exactly
    posts = [site_post_norm(model, f"blocks.{layer}.attn.hook_z") for layer in range(n_layers)]
    reads += [post[1] for post in posts if post is not None]
    if readout.softcap is not None:
        reads.append("ln_final.hook_normalized")
    W_O = model.W_O.detach().float()  # [l, h, d_head, d_model]
    b_O = _attn_biases(model).detach().float()  # [l, d_model]
    bias = sum((b_O[layer] for layer in range(n_layers) if posts[layer] is None), torch.zeros_like(b_O[0]))
    iv = interventions_for(model)

    n = task.n_prompts
    per_prompt = torch.zeros(n, len(component_labels(model)))
    target = torch.zeros(n)
    batches = task_batches(model, task, max_tokens=max_tokens, max_batch=max_batch)
    for batch in with_progress(batches, task.n_prompts, "DLA (prompts)", progress):
        clean = iv.clean(batch, read=reads)
        logits, acts = clean.logits, clean.reads
        parts = []
        bias_rows = bias.to(logits.device).expand(len(batch.indices), 1, -1)
        for layer in range(n_layers):
            z = acts[f"blocks.{layer}.attn.hook_z"].float()  # [b, h, d_head]
            heads = torch.einsum("bhd,hdm->bhm", z, W_O[layer])
            if posts[layer] is not None:
                norm, scale_name = posts[layer]
                scale = acts[scale_name]
                heads = norm.linear(heads, scale)
                # this layer's b_O goes through the norm too, and the norm's own bias joins the bias row
                b = b_O[layer].to(logits.device).expand(len(batch.indices), 1, -1)
                bias_rows = bias_rows + norm.linear(b, scale)
                if norm.bias is not None:
                    bias_rows = bias_rows + norm.bias.float().to(logits.device)
            parts.append(heads)
        parts.append(
            torch.stack([acts[f"blocks.{layer}.hook_mlp_out"].float() for layer in range(n_layers)], 1)
        )
        parts.append(acts["hook_embed"].float()[:, None])
        if pos_embed:
            parts.append(acts["hook_pos_embed"].float()[:, None])
        parts.append(bias_rows)
        comps = torch.cat(parts, dim=1)  # [b, n_components, d_model]
        dla = readout.dla(comps, acts["ln_final.hook_scale"], batch.answer_ids)
        rows = torch.arange(len(batch.indices), device=logits.device)
        answers = batch.answer_ids.to(logits.device)
        idx = torch.tensor(batch.indices)
        per_prompt[idx] = dla.cpu()
        answer_logit = logits[rows, answers] if readout.softcap is None else readout.pre_cap_logit(
            acts["ln_final.hook_normalized"], batch.answer_ids).to(logits.device)
        target[idx] = (answer_logit - readout.constant(batch.answer_ids).to(logits.device)).cpu()

    stats = [mean_ci95(per_prompt[:, c]) for c in range(per_prompt.shape[1])]
    return DLAResult(
        labels=component_labels(model),
        per_prompt=per_prompt,
        mean=torch.tensor([s.mean for s in stats]),
        ci95_low=torch.tensor([s.low for s in stats], dtype=torch.float32),
        ci95_high=torch.tensor([s.high for s in stats], dtype=torch.float32),
        target_logit=target,
        max_abs_error=float(np.abs((per_prompt.sum(1) - target).numpy()).max()),
        logit_soft_cap=readout.softcap,
    )
