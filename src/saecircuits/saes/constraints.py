"""Unit-norm decoder rows (the reference notebook's SAE; Bricken et al. 2023 "Towards Monosemanticity").

Per training step: ``loss.backward()``; :func:`remove_parallel_grad_component_` (each decoder row's gradient loses
its component along the row, so a small step moves along the unit sphere); ``optimizer.step()``;
:func:`normalize_decoder_rows_` (back onto the sphere exactly). Without the constraint an L1-type penalty could be
dodged by shrinking ``f`` and growing ``W_dec`` rows.
"""

from __future__ import annotations

import torch

from saecircuits.saes.base import SAE

#: guards division for an all-zero row (never happens after initialisation; keeps it finite if it does).
_EPS = 1e-12


@torch.no_grad()
def normalize_decoder_rows_(sae: SAE) -> None:
    """Scale every ``W_dec`` row ``[d_in]`` to unit L2 norm, in place (the reference's ``norm_decoder``)."""
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(_EPS))


@torch.no_grad()
def remove_parallel_grad_component_(sae: SAE) -> None:
    """Replace each ``W_dec.grad`` row ``g_k`` by ``g_k - (g_k . u_k) u_k``, ``u_k = W_dec[k] / ||W_dec[k]||``.

    In place (the reference's ``remove_parallel_component_of_grads``); does nothing when there is no gradient.
    """
    grad = sae.W_dec.grad
    if grad is None:
        return
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(_EPS)
    grad.sub_((grad * unit).sum(dim=1, keepdim=True) * unit)
