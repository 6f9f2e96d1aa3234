"""Direct feature attribution (DFA): upstream components' contributions to an SAE feature's encoder pre-activation
through the MLP-in path (the reference notebook's ``direction_dla``).

For an SAE on ``blocks.L.mlp.hook_post`` and feature k, at each prompt's prediction position P:

1. The residual stream entering block L's MLP (``resid_mid_L``) is split into components, MLPs not expanded:
   every head of layers ``0..L`` (``0..L-1`` in a parallel attention + MLP block, GPT-NeoX / Pythia, whose MLP reads
   ``resid_pre_L``) (``z @ W_O[l, h]``), ``MLP0..MLP{L-1}`` (``hook_mlp_out``, ``b_out`` included), ``embed``,
   ``pos_embed`` (learned positions only) and ``bias`` (``sum_{l<=L} b_O[l]``; zeros for bias-free models). Labels
   follow ``dla.py``: ``L{l}H{h}``, ``MLP{l}``, ``embed``, ``pos_embed``, ``bias``.
2. ``ln2`` of block L is applied as a linear map with the cached ``blocks.L.ln2.hook_scale`` at P (centred over d_model
   for LayerNorm, times the norm's weight; :mod:`saecircuits.models.norms`), then ``M = components @ W_in[L]``
   ``[C, d_mlp]`` (each component's share of every neuron's pre-activation; ``sum_c M_c + b_in' == hook_pre`` with
   ``b_in' = b_in + ln2.bias @ W_in``, which is ``b_in`` under fold_ln).
3. Notebook variant ("identity GELU"): neurons with ``hook_post <= 0`` are inactive; their column of M is set to 0
   (``inactive="zero"``) or to the mean contribution ``mean_contrib`` (``inactive="mean"``); active neurons pass as if
   the activation function were the identity. ``dfa = M @ W_enc[:, k]`` ``[C]``. b_in, b_dec, b_enc and the GELU
   curvature are ignored, and the target is the encoder pre-activation, not ``f_k``.
4. Completeness report (the notebook had none): the "linearised at the actual pre-activation" variant uses ``act'(pre)`` (the
   activation's derivative at each neuron's actual pre-activation) times each component's contribution, plus rows
   ``b_in`` (``act'(pre) * b_in``), ``act_curvature`` (``post - act'(pre) * pre``, what a tangent at ``pre`` misses),
   ``b_dec`` (``-b_dec @ W_enc[:, k]`` when the SAE subtracts b_dec from its input) and ``b_enc`` (``b_enc[k]``). Their sum
   is compared with the SAE's actual pre-activation ``sae.hidden_pre(post)[k]``: ``completeness_error`` (all rows;
   float rounding if the decomposition is right) and ``tangent_error`` (without the curvature row, i.e. what a pure
   first-order attribution leaves unexplained).

Departures from the notebook: prompts are batched (each read at its own P) and capped with ``max_prompts`` (the
notebook ran every activating prompt one forward each); per-prompt values and t intervals are returned;
the default mean contributions for ``inactive="mean"`` pool all real positions of the given rows except special
tokens (BOS/EOS/PAD anywhere in a row), weighting tokens equally (the notebook averaged per-story means over 100 stories including BOS). Gated MLPs
(Llama's SwiGLU) have no single pre-activation per neuron and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saecircuits.analysis.ablations.feature_effects import activations_or_compute
from saecircuits.analysis.readouts.dla import _attn_bias_sum, _has_pos_embed
from saecircuits.analysis.readouts.error_dla import mlp_post_layer
from saecircuits.analysis.statistics import mean_ci95
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TOKENS,
    _device_of,
    n_ctx_of,
    pad_id_of,
    row_batches,
    task_batches,
)
from saecircuits.models.interventions import interventions_for
from saecircuits.models.norms import mlp_input_norm, norm_params
from saecircuits.models.tokens import special_token_ids, special_token_mask
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = [
    "DFAResult",
    "direct_feature_attribution",
    "dfa_component_labels",
    "dfa_from_components",
    "mean_mlp_in_contributions",
    "activation_derivative",
    "LINEAR_EXTRA_LABELS",
]

LINEAR_EXTRA_LABELS = ["b_in", "act_curvature", "b_dec", "b_enc"]

_ACTS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation_derivative(act_fn: str, pre: torch.Tensor) -> torch.Tensor:
    """Elementwise derivative of the MLP activation ``act_fn`` (TL ``cfg.act_fn`` name) at ``pre`` (same shape).

    Raises:
        ValueError: an activation this module does not know (one of ``gelu_new``, ``gelu_pytorch_tanh``,
            ``gelu_fast``, ``gelu``, ``relu``, ``silu``).
    """
    if act_fn not in _ACTS:
        raise ValueError(f"unsupported MLP activation {act_fn!r}; DFA knows {sorted(_ACTS)}")
    with torch.enable_grad():
        x = pre.detach().double().requires_grad_(True)
        (grad,) = torch.autograd.grad(_ACTS[act_fn](x).sum(), x)
    return grad.to(pre.dtype)


def _check_model(model, layer: int) -> None:
    if getattr(model.cfg, "gated_mlp", False):
        raise ValueError(
            "DFA needs one pre-activation per MLP neuron; this model has a gated MLP (e.g. SwiGLU), which is not "
            "supported. Use a model with a plain MLP (GPT-2 / GPT-Neo style)."
        )
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"SAE layer {layer} is outside the model's 0..{model.cfg.n_layers - 1}")


def _attn_layers_before_mlp(model, layer: int) -> int:
    """How many layers' attention outputs the MLP of block ``layer`` reads: ``layer + 1``, or ``layer`` in a
    parallel attention + MLP block (GPT-NeoX / Pythia), whose MLP reads ``resid_pre`` beside its own attention."""
    return layer if getattr(model.cfg, "parallel_attn_mlp", False) else layer + 1


def dfa_component_labels(model, layer: int) -> list[str]:
    """Labels of the components entering block ``layer``'s MLP, in output order (see the module docstring)."""
    labels = [f"L{lay}H{h}" for lay in range(_attn_layers_before_mlp(model, layer)) for h in range(model.cfg.n_heads)]
    labels += [f"MLP{lay}" for lay in range(layer)] + ["embed"]
    if _has_pos_embed(model):
        labels.append("pos_embed")
    return labels + ["bias"]


def _bias_upto(model, layer: int) -> torch.Tensor:
    try:
        b_o = model.b_O
    except AttributeError:
        b_o = None
    if b_o is None:
        return torch.zeros_like(_attn_bias_sum(model))
    return b_o[: _attn_layers_before_mlp(model, layer)].float().sum(0)  # float32 sum of a bf16 model's biases


def _reads(model, layer: int) -> list[str]:
    reads = [f"blocks.{lay}.attn.hook_z" for lay in range(_attn_layers_before_mlp(model, layer))]
    reads += [f"blocks.{lay}.hook_mlp_out" for lay in range(layer)] + ["hook_embed"]
    if _has_pos_embed(model):
        reads.append("hook_pos_embed")
    return reads


def _components(model, layer: int, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Raw components ``[..., C, d_model]`` from activations read at positions (``[...]`` leading dims)."""
    W_O = model.W_O.detach().float()
    parts = []
    for lay in range(_attn_layers_before_mlp(model, layer)):
        z = acts[f"blocks.{lay}.attn.hook_z"].float()  # [..., h, d_head]
        parts.append(torch.einsum("...hd,hdm->...hm", z, W_O[lay].to(z.device)))
    lead = acts["hook_embed"].shape[:-1]
    for lay in range(layer):
        parts.append(acts[f"blocks.{lay}.hook_mlp_out"].float().unsqueeze(-2))
    parts.append(acts["hook_embed"].float().unsqueeze(-2))
    if _has_pos_embed(model):
        parts.append(acts["hook_pos_embed"].float().unsqueeze(-2))
    bias = _bias_upto(model, layer).detach().float().to(parts[0].device)
    parts.append(bias.expand(*lead, 1, -1))
    return torch.cat(parts, dim=-2)


def dfa_from_components(
    normed: torch.Tensor,
    W_in: torch.Tensor,
    post: torch.Tensor,
    w_enc: torch.Tensor,
    *,
    inactive: str = "zero",
    mean_contrib: torch.Tensor | None = None,
) -> torch.Tensor:
    """The notebook's DFA arithmetic on already-normalised components (steps 2-3 above).

    Args:
        normed: ``[b, C, d_model]`` components after the ln2 linear map (centred, divided by the ln2 scale).
        W_in: ``[d_model, d_mlp]`` of the SAE's layer.
        post: ``[b, d_mlp]`` actual MLP post-activations; neurons with ``post <= 0`` are inactive.
        w_enc: ``[d_mlp]`` the feature's encoder column ``W_enc[:, k]``.
        inactive: ``"zero"`` (inactive neurons contribute 0) or ``"mean"`` (their contributions are ``mean_contrib``).
        mean_contrib: ``[C, d_mlp]`` mean contributions, required for ``"mean"``.

    Returns:
        ``[b, C]`` contributions to the feature's encoder pre-activation (SAE pre-activation units).

    Raises:
        ValueError: unknown ``inactive`` or a missing / wrongly shaped ``mean_contrib``.
    """
    M = torch.einsum("bcm,mn->bcn", normed, W_in)  # [b, C, d_mlp]
    off = (post <= 0)[:, None, :].expand_as(M)
    if inactive == "zero":
        M = M.masked_fill(off, 0.0)
    elif inactive == "mean":
        if mean_contrib is None or tuple(mean_contrib.shape) != tuple(M.shape[1:]):
            raise ValueError(
                f"inactive='mean' needs mean_contrib of shape [C, d_mlp] = {list(M.shape[1:])}, got "
                f"{None if mean_contrib is None else list(mean_contrib.shape)}; see mean_mlp_in_contributions"
            )
        M = torch.where(off, mean_contrib.to(M)[None].expand_as(M), M)
    else:
        raise ValueError(f"inactive must be 'zero' or 'mean', got {inactive!r}")
    return M @ w_enc


def mean_mlp_in_contributions(
    model,
    layer: int,
    token_rows: Sequence[Sequence[int]],
    *,
    exclude_bos: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> torch.Tensor:
    """Mean contribution of each DFA component to each neuron's pre-activation of block ``layer``'s MLP.

    Every real position of every row counts once (padding never; special tokens -- BOS/EOS/PAD anywhere in a row --
    not when ``exclude_bos``); each
    position's components go through ln2 as a linear map with that position's cached scale, then ``W_in[layer]``.
    The notebook's ``get_mean_component_wise_mlp`` averaged per-story means including BOS.

    Returns:
        float32 ``[C, d_mlp]`` on CPU, components in :func:`dfa_component_labels` order.

    Raises:
        ValueError: no usable position, a gated MLP, or a layer out of range.
    """
    _check_model(model, layer)
    ln2_name = mlp_input_norm(model, layer)  # blocks.L.ln2 (GPT-J: ln1)
    ln2 = norm_params(model, ln2_name)
    reads = _reads(model, layer) + [f"{ln2_name}.hook_scale"]
    special = special_token_ids(getattr(model, "tokenizer", None)) if exclude_bos else frozenset()
    iv = interventions_for(model)
    total: torch.Tensor | None = None
    count = 0.0
    for batch in row_batches(
        token_rows,
        pad_id_of(model),
        max_tokens=max_tokens,
        max_batch=max_batch,
        device=_device_of(model),
        n_ctx=n_ctx_of(model),
    ):
        captured = iv.read_all(batch.tokens, reads)
        n_pos = batch.tokens.shape[1]
        mask = torch.arange(n_pos, device=batch.tokens.device)[None] <= batch.positions[:, None]
        mask &= ~special_token_mask(batch.tokens, special)
        weight = mask.float() / captured[f"{ln2_name}.hook_scale"].float().reshape(mask.shape)
        # linear in the components: sum over positions first, then W_O / centring / W_in
        summed = {n: torch.einsum("bp...,bp->...", captured[n].float(), weight) for n in reads[:-1]}
        comps = _components(model, layer, summed)  # [C, d_model] except bias (sum of weights below)
        comps[-1] = comps[-1] * weight.sum()
        total = comps if total is None else total + comps
        count += float(mask.sum())
    if total is None or count == 0:
        raise ValueError("mean_mlp_in_contributions needs at least one real non-special position in token_rows")
    total = ln2.linear(total, torch.ones(1))  # the scale was applied per position above
    W_in = model.W_in[layer].detach().float().to(total.device)
    return (total @ W_in / count).cpu()


@dataclass
class DFAResult(NotebookDisplay):
    """DFA of one feature on the prompts where it is active at P.

    Attributes:
        feature: the feature index k.
        inactive: ``"zero"`` or ``"mean"`` (how inactive neurons were treated in ``per_prompt``).
        labels: component labels ``[C]``.
        prompt_indices: task indices of the prompts used (active at P, first ``max_prompts`` in task order).
        per_prompt: float32 ``[n, C]`` notebook-variant attributions (SAE pre-activation units).
        mean, ci95: ``[C]`` mean over prompts and t 95% half-width (NaN when undefined).
        linear_labels: ``labels + LINEAR_EXTRA_LABELS`` (``[C + 4]``).
        linear_per_prompt: float32 ``[n, C + 4]`` linearised-at-pre attributions (see the module docstring).
        linear_mean: ``[C + 4]``.
        hidden_pre: float32 ``[n]`` the SAE's actual encoder pre-activation of k at P.
        completeness_error: float32 ``[n]`` ``|sum(linear_per_prompt) - hidden_pre|`` (float rounding if right).
        tangent_error: float32 ``[n]`` the same without the ``act_curvature`` row.
    """

    feature: int
    inactive: str
    labels: list[str]
    prompt_indices: list[int]
    per_prompt: torch.Tensor
    mean: torch.Tensor
    ci95: torch.Tensor
    linear_labels: list[str]
    linear_per_prompt: torch.Tensor
    linear_mean: torch.Tensor
    hidden_pre: torch.Tensor
    completeness_error: torch.Tensor
    tangent_error: torch.Tensor

    @property
    def max_completeness_error(self) -> float:
        """``max completeness_error`` (NaN with no prompts)."""
        return float(self.completeness_error.max()) if self.completeness_error.numel() else float("nan")

    def display_title(self) -> str:
        return (f"Direct feature attribution of feature {self.feature} over {len(self.prompt_indices)} prompts "
                f"(inactive neurons: {self.inactive})")

    def to_pandas(self):
        """One row per upstream component: its mean contribution to the feature's encoder pre-activation."""
        import pandas as pd

        return pd.DataFrame({"component": self.labels, "mean": self.mean.double().numpy()})

    def figure(self):
        """Bars of the mean contribution per component."""
        from saecircuits.display import bar_figure

        return bar_figure(self.labels, self.mean.tolist(), title=f"Feature {self.feature}: DFA",
                          yaxis="contribution to pre-activation", color="#8c564b")


def direct_feature_attribution(
    model,
    sae: SAE,
    task: Task,
    feature: int,
    *,
    inactive: str = "zero",
    mean_contrib: torch.Tensor | None = None,
    threshold: float = 0.0,
    max_prompts: int | None = None,
    acts: torch.Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> DFAResult:
    """DFA of every upstream component to feature ``feature``'s encoder pre-activation at P (the notebook's DFA).

    Args:
        model: a TransformerBridge with processed weights (fold_ln), plain (non-gated) MLPs.
        sae: an SAE on ``blocks.L.mlp.hook_post``.
        task: the behaviour; only prompts with ``f_k > threshold`` at P are used.
        feature: k.
        inactive: ``"zero"`` or ``"mean"`` (see :func:`dfa_from_components`).
        mean_contrib: ``[C, d_mlp]`` from :func:`mean_mlp_in_contributions`; for ``"mean"`` without it, it is
            computed from the task's own prompts (all real non-BOS positions).
        threshold: activity threshold (strict).
        max_prompts: use at most this many active prompts (first in task order); ``None`` = all.
        acts: precomputed ``feature_activations`` ``[n_prompts, d_sae]``.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`DFAResult` (empty tensors with NaN means when no prompt is active).

    Raises:
        ValueError: SAE not on ``mlp.hook_post``, a gated MLP, an unknown activation, bad ``inactive``/``acts``.
        IndexError: ``feature`` outside ``0..d_sae-1``.
    """
    layer = mlp_post_layer(sae.hook_point)
    _check_model(model, layer)
    k = int(feature)
    if not 0 <= k < sae.d_sae:
        raise IndexError(f"feature {k} out of range 0..{sae.d_sae - 1}")
    if inactive not in ("zero", "mean"):
        raise ValueError(f"inactive must be 'zero' or 'mean', got {inactive!r}")
    act_fn = str(model.cfg.act_fn)
    if act_fn not in _ACTS:
        raise ValueError(f"unsupported MLP activation {act_fn!r}; DFA knows {sorted(_ACTS)}")
    acts = activations_or_compute(model, sae, task, acts, max_tokens=max_tokens, max_batch=max_batch)
    prompts = acts.active_prompts(k, threshold)[:max_prompts]
    labels = dfa_component_labels(model, layer)
    C = len(labels)
    if inactive == "mean" and mean_contrib is None and prompts:
        mean_contrib = mean_mlp_in_contributions(
            model, layer, task.token_ids, max_tokens=max_tokens, max_batch=max_batch
        )
    ln2_name = mlp_input_norm(model, layer)  # blocks.L.ln2 (GPT-J: ln1)
    ln2 = norm_params(model, ln2_name)
    W_in = model.W_in[layer].detach().float()
    try:
        b_in = model.b_in[layer].detach().float()
    except AttributeError:
        b_in = torch.zeros(W_in.shape[1])
    if ln2.bias is not None:  # unfolded ln2 bias: a constant share of every pre-activation
        b_in = b_in + ln2.bias.float().to(W_in.device) @ W_in
    w_enc = sae.W_enc[:, k].detach().float()
    b_dec_term = -(sae.b_dec.detach().float() @ w_enc) if sae.cfg.apply_b_dec_to_input else torch.zeros(())
    b_enc_term = sae.b_enc[k].detach().float()

    n = len(prompts)
    per_prompt = torch.zeros(n, C)
    linear = torch.zeros(n, C + len(LINEAR_EXTRA_LABELS))
    hidden_pre = torch.zeros(n)
    reads = _reads(model, layer) + [
        f"{ln2_name}.hook_scale",
        f"blocks.{layer}.mlp.hook_pre",
        sae.hook_point,
    ]
    if n:
        sub = task.subset(prompts)
        iv = interventions_for(model)
        with torch.no_grad():
            for batch in task_batches(model, sub, max_tokens=max_tokens, max_batch=max_batch):
                read = iv.clean(batch, read=reads, logits=False).reads
                dev = read[sae.hook_point].device
                comps = _components(model, layer, read)  # [b, C, d_model]
                normed = ln2.linear(comps, read[f"{ln2_name}.hook_scale"])
                post = read[sae.hook_point].float()
                pre = read[f"blocks.{layer}.mlp.hook_pre"].float()
                Wi, we = W_in.to(dev), w_enc.to(dev)
                idx = torch.tensor(batch.indices)
                per_prompt[idx] = dfa_from_components(
                    normed, Wi, post, we, inactive=inactive, mean_contrib=mean_contrib
                ).cpu()
                d = activation_derivative(act_fn, pre)  # [b, d_mlp]
                M = torch.einsum("bcm,mn->bcn", normed, Wi)
                rows = [
                    (M * d[:, None]) @ we,  # [b, C]
                    ((d * b_in.to(dev)) @ we)[:, None],
                    ((post - d * pre) @ we)[:, None],
                    b_dec_term.to(dev).expand(len(idx), 1),
                    b_enc_term.to(dev).expand(len(idx), 1),
                ]
                linear[idx] = torch.cat(rows, 1).cpu()
                hidden_pre[idx] = sae.hidden_pre(post.to(sae.W_enc.dtype))[:, k].float().cpu()
    curv = C + LINEAR_EXTRA_LABELS.index("act_curvature")
    stats = [mean_ci95(per_prompt[:, c]) for c in range(C)]
    return DFAResult(
        feature=k,
        inactive=inactive,
        labels=labels,
        prompt_indices=prompts,
        per_prompt=per_prompt,
        mean=torch.tensor([s.mean for s in stats]),
        ci95=torch.tensor([s.half_width for s in stats], dtype=torch.float32),
        linear_labels=labels + LINEAR_EXTRA_LABELS,
        linear_per_prompt=linear,
        linear_mean=linear.mean(0) if n else torch.full((C + 4,), float("nan")),
        hidden_pre=hidden_pre,
        completeness_error=(linear.sum(1) - hidden_pre).abs(),
        tangent_error=(linear.sum(1) - linear[:, curv] - hidden_pre).abs(),
    )
