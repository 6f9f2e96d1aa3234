"""SAE training loss: reconstruction MSE + sparsity penalty (+ AuxK for dead latents).

Conventions (the reference notebook's ``sparse_coding/autoencoder.py`` and ``sparse_coding/regularization.py``):

* MSE per token = sum over ``d_in`` of the squared error, then the mean over the batch (as the reference notebook).
* Every penalty is computed per token (sum over features of one batch row) and, by default, averaged over the
  batch (``batch_reduction="mean"``), so a coefficient means the same at any batch size. The reference notebook
  summed penalties over the batch: ``batch_reduction="sum"`` reproduces it, so its coefficients
  (e.g. L1 3e-4 at batch 4096 for 54_serene_plasma) equal ``coefficient * batch_size`` in the per-token convention.

Regularizers (``f`` = feature activations of one token, ``a_k = |f_k|``, optionally weighted by decoder norms):

============================  ======================================================================  =========
name                          per-token penalty                                                       coeffs
============================  ======================================================================  =========
``l1``                        ``c * sum_k a_k``                                                         1
``sqrt``                      ``c * sum_k g(a_k)``, ``g(a) = sqrt(a)`` if ``a < 1`` else ``a``          1
``pure_sqrt``                 ``c * sum_k sqrt(a_k)``                                                   1
``hoyer_square``              ``c * (sum_k a_k)^2 / (sum_k a_k^2 + 1e-9)``                              1
``combined_hoyer_l1``         ``l1(c1) + hoyer_square(c2)``                                             2
``combined_hoyer_sqrt``       ``sqrt(c1) + hoyer_square(c2)`` (189_giddy_water: 1e-4, 1.5e-4, "sum")    2
``l0``                        ``c * sum_k H(hidden_pre_k - threshold_k)`` (JumpReLU only, STE)          1
``none``                      no penalty                                                                0
============================  ======================================================================  =========

``sqrt`` and ``pure_sqrt`` follow the later (HEAD) reference code: no ``1e-9`` inside the square root (a
constant offset in the logged penalty), and a square root whose gradient at exactly 0 is 0 instead of ``inf`` (the
reference's 2023-12 NaN-gradient bug). The gradient ``1/(2 sqrt(a))`` still grows for tiny positive activations;
that is the penalty's nature. ``hoyer_square`` keeps the reference's ``1e-9`` denominator epsilon; it is
scale-invariant per row and bounds nothing on its own, hence the combined variants.

``decoder_norm_weighted=True`` replaces ``a_k`` by ``|f_k| * ||W_dec[k]||`` (Anthropic, "Circuits Updates - April
2024": the penalty then cannot be dodged by shrinking ``f`` and growing the decoder row; use it without the
unit-norm decoder constraint). It does not apply to ``l0``.

AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", appendix A.2; SAELens ``TopKTrainingSAE``): the
``aux_k`` largest pre-activations among dead latents (``dead_mask``), ReLU'd and decoded without ``b_dec``, must
reconstruct the (detached) residual ``x - x_hat``; the loss is that squared error (sum over ``d_in``, mean over the
batch) times ``min(n_dead / aux_k, 1)`` times ``aux_coefficient`` (1/32 in the paper).

TopK and BatchTopK SAEs get their sparsity from ``k``: for them the regularizer is ignored (no penalty term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from saecircuits.saes.base import SAE, SAEError

#: regularizer name -> number of coefficients it takes.
REGULARIZERS: dict[str, int] = {
    "none": 0,
    "l1": 1,
    "sqrt": 1,
    "pure_sqrt": 1,
    "hoyer_square": 1,
    "combined_hoyer_l1": 2,
    "combined_hoyer_sqrt": 2,
    "l0": 1,
}

HOYER_EPS = 1e-9


@dataclass
class LossConfig:
    """How :func:`sae_training_loss` penalises sparsity.

    Attributes:
        regularizer: a key of :data:`REGULARIZERS`.
        coefficients: one coefficient per term (two for the ``combined_*`` regularizers, none for ``none``).
        batch_reduction: ``"mean"`` (per-token coefficients, default) or ``"sum"`` (the reference notebook's
            batch-summed penalty). MSE is always averaged over the batch.
        decoder_norm_weighted: weight each ``|f_k|`` by ``||W_dec[k]||`` in the penalty.
        aux_k: number of dead latents used by the AuxK loss (``None`` disables it; Gao et al. use d_in/2 or 512).
        aux_coefficient: weight of the AuxK loss (1/32 in Gao et al. 2024).
    """

    regularizer: str = "l1"
    coefficients: tuple[float, ...] = (1e-3,)
    batch_reduction: Literal["mean", "sum"] = "mean"
    decoder_norm_weighted: bool = False
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32

    def __post_init__(self) -> None:
        if isinstance(self.coefficients, (int, float)):
            self.coefficients = (float(self.coefficients),)
        self.coefficients = tuple(float(c) for c in self.coefficients)
        if self.regularizer not in REGULARIZERS:
            raise SAEError(f"unknown regularizer {self.regularizer!r}; choose one of {sorted(REGULARIZERS)}")
        n = REGULARIZERS[self.regularizer]
        if len(self.coefficients) != n:
            raise SAEError(
                f"regularizer {self.regularizer!r} takes {n} coefficient(s), got {len(self.coefficients)} "
                f"({self.coefficients}); e.g. combined_hoyer_sqrt takes (sqrt_coeff, hoyer_coeff)"
            )
        if any(not math.isfinite(c) or c < 0 for c in self.coefficients):
            raise SAEError(f"coefficients must be finite and >= 0, got {self.coefficients}")
        if self.batch_reduction not in ("mean", "sum"):
            raise SAEError(f"batch_reduction must be 'mean' or 'sum', got {self.batch_reduction!r}")
        if self.aux_k is not None and self.aux_k <= 0:
            raise SAEError(f"aux_k must be a positive number of latents or None, got {self.aux_k}")


@dataclass
class LossOutput:
    """Result of :func:`sae_training_loss`.

    Attributes:
        total: scalar loss to backpropagate.
        terms: float value of every term (``mse``, the penalty terms by name, ``auxk``) and ``total``.
        f: feature activations ``[batch, d_sae]`` (training path). From sparse codes it is built from ``codes`` on
            first use, without gradient (those SAEs take no penalty on ``f``).
        x_hat: reconstruction ``[batch, d_in]``.
        hidden_pre: encoder pre-activations ``[batch, d_sae]`` (without gradient from sparse codes).
        codes: ``(acts [batch, k], idx [batch, k])`` when the loss was computed from sparse codes (else None):
            ``f = scatter(idx, acts)``.
    """

    total: torch.Tensor
    terms: dict[str, float]
    dense_f: torch.Tensor | None
    x_hat: torch.Tensor
    hidden_pre: torch.Tensor | None = field(default=None, repr=False)
    codes: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _counts: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def f(self) -> torch.Tensor:
        if self.dense_f is None:
            acts, idx = self.codes  # type: ignore[misc]
            with torch.no_grad():
                self.dense_f = torch.zeros_like(self.hidden_pre).scatter_(-1, idx, acts.to(self.hidden_pre.dtype))
        return self.dense_f

    def firing_counts(self) -> torch.Tensor:
        """``[d_sae]`` float64: on how many of the batch's tokens each feature fired (``f > 0``); computed once.
        Their sum over features divided by the batch is the batch's L0."""
        if self._counts is None:
            with torch.no_grad():
                if self.codes is not None:
                    acts, idx = self.codes
                    n = self.hidden_pre.shape[-1]  # type: ignore[union-attr]
                    self._counts = torch.bincount(idx[acts > 0], minlength=n).to(torch.float64)
                else:
                    # a float32 column sum (exact for batches under 2**24 tokens) is much faster than a bool one
                    self._counts = (self.f.detach() > 0).to(torch.float32).sum(0).to(torch.float64)
        return self._counts


# ---------------------------------------------------------------------------------------------- penalties
class _SafeSqrt(torch.autograd.Function):
    """``sqrt(a)`` for ``a >= 0`` with gradient ``1/(2 sqrt(a))`` for ``a > 0`` and ``0`` at ``a == 0``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = a.sqrt()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        safe = torch.where(out > 0, out, torch.ones_like(out))
        return torch.where(out > 0, grad / (2 * safe), torch.zeros_like(grad))


def safe_sqrt(a: torch.Tensor) -> torch.Tensor:
    """Elementwise square root of ``a >= 0`` whose gradient at 0 is 0 (not ``inf``/NaN)."""
    return _SafeSqrt.apply(a)


def l1_per_token(a: torch.Tensor) -> torch.Tensor:
    """``sum_k a_k``: ``[batch, d_sae] -> [batch]`` (``a`` = absolute activations)."""
    return a.sum(dim=-1)


def sqrt_per_token(a: torch.Tensor) -> torch.Tensor:
    """``sum_k g(a_k)``, ``g(a) = sqrt(a)`` below 1 and ``a`` from 1 on: ``[batch, d_sae] -> [batch]``."""
    below = a < 1
    return torch.where(below, safe_sqrt(torch.where(below, a, torch.zeros_like(a))), a).sum(dim=-1)


def pure_sqrt_per_token(a: torch.Tensor) -> torch.Tensor:
    """``sum_k sqrt(a_k)``: ``[batch, d_sae] -> [batch]``."""
    return safe_sqrt(a).sum(dim=-1)


def hoyer_square_per_token(a: torch.Tensor) -> torch.Tensor:
    """``(sum_k a_k)^2 / (sum_k a_k^2 + 1e-9)`` (reference epsilon): ``[batch, d_sae] -> [batch]``."""
    return a.sum(dim=-1) ** 2 / ((a**2).sum(dim=-1) + HOYER_EPS)


_TERMS: dict[str, list[tuple[str, object]]] = {
    "l1": [("l1", l1_per_token)],
    "sqrt": [("sqrt", sqrt_per_token)],
    "pure_sqrt": [("pure_sqrt", pure_sqrt_per_token)],
    "hoyer_square": [("hoyer_square", hoyer_square_per_token)],
    "combined_hoyer_l1": [("l1", l1_per_token), ("hoyer_square", hoyer_square_per_token)],
    "combined_hoyer_sqrt": [("sqrt", sqrt_per_token), ("hoyer_square", hoyer_square_per_token)],
}


def _reduce(per_token: torch.Tensor, how: str) -> torch.Tensor:
    return per_token.mean() if how == "mean" else per_token.sum()


def sparsity_penalties(
    sae: SAE, f: torch.Tensor, hidden_pre: torch.Tensor, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """The penalty terms of ``cfg`` (coefficients applied, batch-reduced): name -> scalar tensor.

    Args:
        sae: the SAE (decoder norms for ``decoder_norm_weighted``, thresholds for ``l0``).
        f: feature activations ``[batch, d_sae]``.
        hidden_pre: pre-activations ``[batch, d_sae]`` (used by ``l0``).
        cfg: the loss configuration.

    Raises:
        SAEError: ``l0`` on an SAE without thresholds.
    """
    if cfg.regularizer == "none" or not sae.uses_sparsity_penalty:
        return {}
    if cfg.regularizer == "l0":
        step = getattr(sae, "heaviside_ste", None)
        if step is None:
            raise SAEError(
                f"regularizer 'l0' needs a JumpReLU SAE (straight-through threshold gradient); "
                f"this SAE is {sae.architecture!r}: use 'l1' or another regularizer"
            )
        return {"l0": cfg.coefficients[0] * _reduce(step(hidden_pre).sum(dim=-1), cfg.batch_reduction)}
    a = f.abs()
    if cfg.decoder_norm_weighted:
        a = a * sae.W_dec.norm(dim=1)
    return {
        name: c * _reduce(fn(a), cfg.batch_reduction)  # type: ignore[operator]
        for (name, fn), c in zip(_TERMS[cfg.regularizer], cfg.coefficients, strict=True)
    }


def _auxk_choice(hidden_pre: torch.Tensor, dead_mask: torch.Tensor, aux_k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """AuxK's choice among the dead latents (``n_dead >= 1``): ``(dead, values, pos, sub)`` with ``dead [n_dead]``
    their indices into ``d_sae``, ``sub [batch, n_dead]`` their pre-activations (``hidden_pre``'s columns ``dead``)
    and ``values, pos [batch, aux_k]`` the largest of them and their positions in ``dead``; ``pos`` is None and
    ``values`` is ``sub`` (all of them) when ``n_dead <= aux_k``."""
    dead = torch.nonzero(dead_mask).flatten()
    sub = hidden_pre.detach().index_select(-1, dead)
    if dead.numel() <= aux_k:
        return dead, sub, None, sub
    # unsorted: the same set (every caller sums over it or masks with it), about half the time of a sorted top-k
    vals, pos = sub.topk(aux_k, dim=-1, sorted=False)
    return dead, vals, pos, sub


def _auxk_select(hidden_pre: torch.Tensor, dead_mask: torch.Tensor, aux_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` ``[batch, min(aux_k, n_dead)]`` of :func:`_auxk_choice`, indices into ``d_sae``."""
    dead, vals, pos, _ = _auxk_choice(hidden_pre, dead_mask, aux_k)
    return vals, (dead.expand(*vals.shape) if pos is None else dead[pos])


AUXK_SPARSE_RATIO = 16
""":func:`auxk_loss_sparse` computes from the dead latents' positive pre-activations alone (:func:`_auxk_positive`)
when each token has at most ``aux_k`` of them and there are at most ``batch * min(n_dead, aux_k) /
AUXK_SPARSE_RATIO`` in all: a dead latent rarely has a positive pre-activation (0.1 to 0.2 per token of 700 dead
on the demo's SAEs), and ReLU makes every other one contribute exactly 0 to the value and the gradients."""


def _auxk_positive(hidden_pre: torch.Tensor, dead_mask: torch.Tensor, aux_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows, cols)`` ``[nnz]``: the (token, latent) pairs of the dead latents' positive pre-activations, when AuxK
    keeps every one of them and they are few enough (:data:`AUXK_SPARSE_RATIO`); else None.

    With at most ``aux_k`` positive dead pre-activations on a token, its top ``aux_k`` among the dead latents holds
    all of them (a positive value outranks every other), and ReLU maps the rest of the choice to 0: AuxK's features
    are exactly ``relu`` of these pairs, the other choices adding 0 to the reconstruction and getting no gradient.
    """
    positive = torch.nonzero((hidden_pre.detach() > 0) & dead_mask)  # [nnz, 2], row-major
    batch, n_dead = hidden_pre.shape[0], int(dead_mask.sum())
    if positive.shape[0] * AUXK_SPARSE_RATIO > batch * min(n_dead, aux_k):
        return None
    rows, cols = positive.unbind(1)
    if n_dead > aux_k and rows.numel() and int(torch.bincount(rows).max()) > aux_k:
        return None  # a token with more positive dead latents than aux_k: the top-k choice drops some
    return rows, cols


class _PairPreActivations(torch.autograd.Function):
    """``pre[i] = x_in[rows[i]] . W_enc[:, cols[i]] + b_enc[cols[i]]`` ``[nnz]`` with the values given (the dense
    encode's entries); backward as autograd's through that formula, touching those rows and columns only."""

    @staticmethod
    def forward(ctx, x_in, w_enc, b_enc, rows, cols, values):  # type: ignore[override]
        ctx.save_for_backward(x_in, w_enc, rows, cols)
        ctx.d_sae = b_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_in, w_enc, rows, cols = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.to(w_enc.dtype).unsqueeze(-1)  # [nnz, 1]
        grad_x = grad_w = grad_b = None
        if need_x:  # grad_x[rows[i]] += grad[i] * W_enc[:, cols[i]]
            src = grad * w_enc.detach().index_select(1, cols).t()
            grad_x = torch.zeros(x_in.shape, dtype=src.dtype, device=src.device).index_add_(0, rows, src)
        if need_w:  # grad W_enc[:, cols[i]] += grad[i] * x_in[rows[i]]
            src = grad * x_in.detach().to(w_enc.dtype).index_select(0, rows)
            grad_w = torch.zeros_like(w_enc).index_add_(1, cols, src.t())
        if need_b:
            grad_b = grad.new_zeros(ctx.d_sae).index_add_(0, cols, grad.squeeze(-1))
        return grad_x, grad_w, grad_b, None, None, None


def auxk_loss(
    sae: SAE,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    hidden_pre: torch.Tensor,
    dead_mask: torch.Tensor,
    aux_k: int,
) -> torch.Tensor:
    """AuxK loss (Gao et al. 2024, A.2): dead latents reconstruct the residual error.

    Args:
        x, x_hat: input and reconstruction ``[batch, d_in]``; the residual ``x - x_hat`` is detached.
        hidden_pre: pre-activations ``[batch, d_sae]``.
        dead_mask: ``[d_sae]`` bool, True for dead latents.
        aux_k: number of dead latents kept per token (capped at the number of dead latents).

    Returns:
        Scalar ``min(n_dead/aux_k, 1) * mean_b sum_d (e_hat - e)^2``; 0 when no latent is dead.
    """
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return hidden_pre.new_zeros(())
    _, idx = _auxk_select(hidden_pre, dead_mask, aux_k)
    residual = (x - x_hat).detach()
    f_aux = torch.zeros_like(hidden_pre).scatter(-1, idx, torch.relu(hidden_pre.gather(-1, idx)))
    e_hat = f_aux @ sae.W_dec
    scale = min(n_dead / aux_k, 1.0)
    return scale * ((e_hat - residual) ** 2).sum(dim=-1).mean()


AUXK_DENSE_RATIO = 4
""":func:`auxk_loss_sparse` multiplies over the dead columns densely when ``aux_k * AUXK_DENSE_RATIO >= n_dead``
(a dense product of ``n_dead`` columns outran gathering ``aux_k`` rows per token up to about this ratio on a CPU:
1.3-1.9x faster steps for 100 to 1,000 dead of 2,048 latents at aux_k 256, d_in 512, batch 2,048, 2 threads)."""


class _DeadPreActivations(torch.autograd.Function):
    """``pre = x_in @ W_enc[:, dead] + b_enc[dead]`` ``[batch, n_dead]`` with the values given (the dense encode's
    columns ``dead``); backward as autograd's through that formula. With ``b_dec`` given, ``x_in`` is the detached
    ``x - b_dec`` of an input without gradient, and ``b_dec`` gets ``-(grad.sum(0) @ W_enc[:, dead]^T)`` (the
    column sum of ``x_in``'s gradient, a matrix-vector product) instead of ``x_in``'s ``[batch, d_in]`` gradient."""

    @staticmethod
    def forward(ctx, x_in, w_enc, b_enc, b_dec, dead, values):  # type: ignore[override]
        ctx.save_for_backward(x_in, w_enc, dead)
        ctx.d_sae = b_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_in, w_enc, dead = ctx.saved_tensors
        need_x, need_w, need_b, need_bdec = ctx.needs_input_grad[:4]
        grad = grad.to(w_enc.dtype)
        grad_x = grad_w = grad_b = grad_bdec = None
        w_dead = w_enc.detach().index_select(1, dead) if (need_x or need_bdec) else None
        if need_x:
            grad_x = grad @ w_dead.t()
        if need_w:
            grad_w = torch.zeros_like(w_enc).index_copy_(1, dead, x_in.detach().t() @ grad)
        col = grad.sum(0) if (need_b or need_bdec) else None
        if need_b:
            grad_b = grad.new_zeros(ctx.d_sae).index_copy_(0, dead, col)
        if need_bdec:
            grad_bdec = -(col @ w_dead.t())
        return grad_x, grad_w, grad_b, grad_bdec, None, None


def _dead_pre_activations(sae: SAE, x: torch.Tensor, x_in: torch.Tensor, dead: torch.Tensor,
                          hidden_pre: torch.Tensor, sub: torch.Tensor | None = None) -> torch.Tensor:
    """The pre-activations of the ``dead`` latents ``[batch, n_dead]`` (values: ``hidden_pre``'s columns, or ``sub``
    when the caller has them already), differentiable in ``W_enc``, ``b_enc`` and ``x_in`` (so ``b_dec``) as
    ``x_in @ W_enc[:, dead] + b_enc[dead]``."""
    values = (hidden_pre.detach().index_select(-1, dead) if sub is None else sub).to(sae.W_enc.dtype)
    if (sae.cfg.apply_b_dec_to_input and sae.input_normalization == "none" and not x.requires_grad
            and sae.b_dec.requires_grad):
        return _DeadPreActivations.apply(x_in.detach(), sae.W_enc, sae.b_enc, sae.b_dec, dead, values)
    return _DeadPreActivations.apply(x_in, sae.W_enc, sae.b_enc, None, dead, values)


def auxk_loss_sparse(
    sae: SAE,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    hidden_pre: torch.Tensor,
    dead_mask: torch.Tensor,
    aux_k: int,
) -> torch.Tensor:
    """:func:`auxk_loss` computed from the selected latents only (:mod:`saecircuits.saes.sparse_codes`): the same
    value and gradients, with ``hidden_pre [batch, d_sae]`` a non-differentiable copy (e.g. from
    :meth:`~saecircuits.saes.topk.TopKSAE.encode_sparse`); the gradient reaches ``W_enc``, ``b_enc`` and ``b_dec``
    through the selected encoder columns.

    Three ways, by the dead latents' numbers: from the few (token, latent) pairs with a positive pre-activation
    (:func:`_auxk_positive`, the usual case in training: ReLU zeroes the rest of AuxK's choice), with matmuls over
    the dead columns (:data:`AUXK_DENSE_RATIO`), or from ``aux_k`` gathered rows per token. The same value and
    gradients up to the order of float summation."""
    from saecircuits.saes.sparse_codes import selected_pre_activations, sparse_decode

    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return hidden_pre.new_zeros(())
    x_in, _ = sae._encoder_input(x)
    residual = (x - x_hat).detach()
    positive = _auxk_positive(hidden_pre, dead_mask, aux_k)
    if positive is not None:
        # the few (token, dead latent) pairs with a positive pre-activation are AuxK's only non-zero features: their
        # decoder rows summed per token, instead of matmuls over [batch, n_dead] entries that are almost all 0
        rows, cols = positive
        pre = _PairPreActivations.apply(x_in, sae.W_enc, sae.b_enc, rows, cols,
                                        hidden_pre.detach()[rows, cols].to(sae.W_enc.dtype))
        src = torch.relu(pre).unsqueeze(-1) * sae.W_dec.index_select(0, cols)
        e_hat = torch.zeros(residual.shape, dtype=src.dtype, device=src.device).index_add(0, rows, src)
    elif aux_k * AUXK_DENSE_RATIO >= n_dead:
        # aux_k is a large share of the dead latents (256 of ~700 on the demo): matmuls over the dead columns do
        # n_dead / aux_k times the multiply-adds of the gathered rows but run far faster per multiply-add on a CPU
        dead, _, pos, sub = _auxk_choice(hidden_pre, dead_mask, aux_k)  # chosen on hidden_pre, as the other paths
        # the dead columns' pre-activations are hidden_pre's (the encode computed them): no matmul forward, and
        # b_dec's gradient as a matrix-vector product where the input is x - b_dec (see _DeadPreActivations)
        pre = _dead_pre_activations(sae, x, x_in, dead, hidden_pre, sub)  # [batch, n_dead]
        f = torch.relu(pre)
        if pos is not None:
            f = f * torch.zeros_like(f, dtype=torch.bool).scatter_(-1, pos, True)
        e_hat = f @ sae.W_dec.index_select(0, dead)
    else:
        vals, idx = _auxk_select(hidden_pre, dead_mask, aux_k)
        pre = selected_pre_activations(x_in, sae.W_enc, sae.b_enc, idx.contiguous(), vals)
        e_hat = sparse_decode(torch.relu(pre), idx.contiguous(), sae.W_dec)
    scale = min(n_dead / aux_k, 1.0)
    return scale * ((e_hat - residual) ** 2).sum(dim=-1).mean()


def sae_training_loss(
    sae: SAE,
    x: torch.Tensor,
    cfg: LossConfig,
    sparsity_scale: float = 1.0,
    dead_mask: torch.Tensor | None = None,
    *,
    sparse: bool = True,
) -> LossOutput:
    """Training loss of one batch (the reference notebook's loss; Gao et al. 2024 for AuxK).

    ``total = mse + sparsity_scale * sum(penalties) + aux_coefficient * auxk``.

    Args:
        sae: any registered SAE; its training path :meth:`SAE.encode_with_hidden_pre` is used.
        x: activations ``[batch, d_in]`` (already scaled by the trainer's normalisation, if any).
        cfg: the loss configuration.
        sparsity_scale: multiplies the penalty terms (the trainer's coefficient warm-up), not MSE or AuxK.
        dead_mask: ``[d_sae]`` bool of dead latents for AuxK (ignored when ``cfg.aux_k`` is None).
        sparse: for an SAE with :meth:`encode_sparse` (TopK), decode and backpropagate from the ``k`` selected
            features per token (:mod:`saecircuits.saes.sparse_codes`; the same loss and gradients up to float
            summation order, several times faster); ``False`` runs the dense path (``f @ W_dec``).

    Returns:
        :class:`LossOutput`; ``terms`` holds ``mse``, each penalty (already times coefficient, before
        ``sparsity_scale``), ``auxk`` (before ``aux_coefficient``) when enabled, and ``total``.

    Raises:
        SAEError: ``x`` is not 2-D ``[batch, d_in]``, ``dead_mask`` has the wrong shape, or ``l0`` on a
            non-JumpReLU SAE.
    """
    if x.ndim != 2:
        raise SAEError(
            f"training batches must be [batch, d_in], got shape {tuple(x.shape)}; flatten batch/pos"
        )
    encode_sparse = getattr(sae, "encode_sparse", None) if sparse else None
    if encode_sparse is not None and not sae.decode_needs_input and not sae.uses_sparsity_penalty:
        from saecircuits.saes.sparse_codes import sparse_decode

        acts, idx, hidden_pre = encode_sparse(x)
        x_hat = sparse_decode(acts, idx, sae.W_dec) + sae.decoder_bias()
        f = None  # no penalty needs the dense features; LossOutput.f builds them if a caller asks
        codes = (acts.detach(), idx)
    else:
        codes = None
        encode_sparse = None
        f, hidden_pre = sae.encode_with_hidden_pre(x)
        x_hat = sae.decode(f)
    mse = ((x_hat - x) ** 2).sum(dim=-1).mean()
    penalties = sparsity_penalties(sae, f, hidden_pre, cfg)
    total = mse
    for p in penalties.values():
        total = total + sparsity_scale * p
    named: dict[str, torch.Tensor] = {"mse": mse, **penalties}
    if cfg.aux_k is not None and dead_mask is not None:
        if dead_mask.shape != (sae.d_sae,) or dead_mask.dtype != torch.bool:
            raise SAEError(
                f"dead_mask must be a bool tensor of shape ({sae.d_sae},), got {dead_mask.dtype} "
                f"{tuple(dead_mask.shape)}"
            )
        aux = (auxk_loss if encode_sparse is None else auxk_loss_sparse)(
            sae, x, x_hat, hidden_pre, dead_mask.to(hidden_pre.device), cfg.aux_k
        )
        total = total + cfg.aux_coefficient * aux
        named["auxk"] = aux
    named["total"] = total
    # one device->host transfer for all logged values (one GPU sync per step, not one per term)
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist()
    terms = dict(zip(named, values, strict=True))
    return LossOutput(total=total, terms=terms, dense_f=f, x_hat=x_hat, hidden_pre=hidden_pre, codes=codes)
