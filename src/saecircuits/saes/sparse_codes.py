"""Training with sparse codes: a TopK SAE's features as ``k`` (value, index) pairs per token, never as a dense
``[batch, d_sae]`` matrix in a matmul.

A TopK SAE (and the AuxK loss) keeps ``k`` of ``d_sae`` pre-activations per token, so the dense decode
``f @ W_dec`` and its backward (``f^T @ grad`` for ``W_dec``, ``grad @ W_dec^T`` for ``f``) and the encoder's backward
(``x_in^T @ grad_pre`` for ``W_enc``, ``grad_pre @ W_enc^T`` for the input) multiply matrices that are ``k / d_sae``
non-zero (32 of 2,048 by default): almost all of their work is multiplying zeros. Here the same quantities are
computed from the selected rows only:

- :func:`sparse_decode`: ``out[b] = sum_j acts[b, j] * W[idx[b, j]]`` with :func:`torch.nn.functional.embedding_bag`
  (``per_sample_weights``, mode ``"sum"``), whose backward gives ``grad acts[b, j] = grad_out[b] . W[idx[b, j]]``
  and the dense ``grad W`` with only the selected rows non-zero.
- :func:`selected_pre_activations`: the pre-activations ``(x_in @ W_enc + b_enc)[b, idx[b, j]]``, whose values come
  from the dense encode (computed without autograd, as the selection needs all of them) and whose backward touches
  the selected encoder columns only.

Only the dense encode ``x_in @ W_enc`` (which the selection needs) stays a full matmul: a training step does one
instead of six (nine with AuxK over the dead columns; none more when AuxK takes its few positive dead
pre-activations, :func:`saecircuits.saes.losses._auxk_positive`). Measured with ``benchmarks/bench_sae_training.py --recipe topk`` (d_in 512, 2,048
features, batch 2,048, 2 threads): 3.7x the dense path's steps per second, the same explained variance. The results equal the dense computation up to the order of float summation
(``tests/saes/test_sparse_codes.py`` checks outputs and every parameter gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(acts: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_j acts[b, j] * weight[idx[b, j]]``: the dense ``scatter(idx, acts) @ weight`` from the selected rows.

    Args:
        acts: ``[batch, m]`` coefficients (differentiable; cast to ``weight``'s dtype).
        idx: ``[batch, m]`` int64 row indices into ``weight`` (repeats add up).
        weight: ``[n, d]`` (e.g. ``W_dec [d_sae, d_out]``; differentiable).

    Returns:
        ``[batch, d]``. Backward: ``grad acts`` is a dot product per selected row, ``grad weight`` is dense ``[n, d]``
        with the rows that were never selected exactly zero.
    """
    return F.embedding_bag(idx, weight, per_sample_weights=acts.to(weight.dtype), mode="sum")


def nonzero_codes(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, idx)`` ``[..., m]`` of codes ``f [..., d_sae]``: each row's non-zero entries, ``m`` the most of any
    row (at least 1), shorter rows padded with zero values at zero entries, so that ``scatter(idx, values) = f`` and
    ``sparse_decode(values, idx, W_dec) = f @ W_dec`` up to the order of float summation."""
    m = max(1, int((f != 0).sum(-1).max())) if f.numel() else 1
    idx = torch.topk(f.abs(), min(m, f.shape[-1]), dim=-1).indices
    return f.gather(-1, idx), idx


class _SelectedPreActivations(torch.autograd.Function):
    """``pre[b, j] = x_in[b] . W_enc[:, idx[b, j]] + b_enc[idx[b, j]]`` with the values given (see
    :func:`selected_pre_activations`); backward from the selected columns only."""

    @staticmethod
    def forward(ctx, x_in, w_enc, b_enc, idx, values):  # type: ignore[override]
        ctx.save_for_backward(x_in, w_enc, idx)
        ctx.d_sae = b_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_in, w_enc, idx = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.to(w_enc.dtype).contiguous()
        grad_x = grad_w = grad_b = None
        if need_x or need_w:
            # one embedding_bag over the encoder's columns gives both: its output is grad_x[b] = sum_j grad[b, j] *
            # W_enc[:, idx[b, j]], and its weight gradient for the output gradient x_in is grad W_enc^T[i] =
            # sum_{(b, j): idx[b, j] = i} grad[b, j] * x_in[b]
            w_t = w_enc.detach().t().contiguous().requires_grad_(need_w)
            with torch.enable_grad():
                out = sparse_decode(grad, idx, w_t)
                if need_w:
                    (grad_w_t,) = torch.autograd.grad(out, w_t, x_in.detach().to(out.dtype))
                    grad_w = grad_w_t.t()
            if need_x:
                grad_x = out.detach()
        if need_b:
            grad_b = grad.new_zeros(ctx.d_sae).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


def selected_pre_activations(
    x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, idx: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """The encoder pre-activations at ``idx``, differentiable in ``x_in``, ``W_enc`` and ``b_enc``.

    Args:
        x_in: ``[batch, d_in]`` encoder input (``x - b_dec``; a ``b_dec`` gradient flows through it).
        w_enc: ``[d_in, d_sae]``; b_enc: ``[d_sae]``.
        idx: ``[batch, m]`` int64 selected features per token.
        values: ``[batch, m]`` = ``(x_in @ w_enc + b_enc).gather(-1, idx)``, computed by the caller (without
            autograd: the selection needed the whole dense pre-activation anyway). Returned as they are, so the
            forward values are exactly the dense encode's.

    Returns:
        ``[batch, m]`` equal to ``values``; its backward is ``x_in``'s, ``W_enc``'s and ``b_enc``'s gradient through
        the selected columns (``B * m * d_in`` multiply-adds instead of two ``B * d_sae * d_in`` matmuls).
    """
    return _SelectedPreActivations.apply(x_in, w_enc, b_enc, idx, values.detach().to(w_enc.dtype))
