"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; SAELens ``"topk"``).

Per token, the ``k`` largest pre-activations are kept and ReLU'd, every other feature is 0:
``f = scatter(topk(hidden_pre, k).indices, ReLU(topk(hidden_pre, k).values))``. Sparsity comes from ``k``
(``cfg.extra["k"]``), so the loss adds no penalty; pair it with AuxK (``LossConfig.aux_k``) against dead latents.

ReLU before or after the top-k selection gives the same activations (sparsify takes the top k of the ReLU'd
pre-activations; SAELens and OpenAI ReLU the top k). ``cfg.extra["topk_relu"] = False`` keeps the top-k values as
they are, negative ones included, as circuit-tracer's TopK transcoders do (``x * gate``).
"""

from __future__ import annotations

import torch

from saecircuits.saes.base import SAE, SAEConfig, SAEError


def _k_from_cfg(cfg: SAEConfig) -> int:
    k = cfg.extra.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= cfg.d_sae:
        raise SAEError(
            f"{cfg.architecture} SAE needs an integer cfg.extra['k'] in 1..d_sae={cfg.d_sae}, got {k!r}; "
            "e.g. SAEConfig(..., extra={'k': 32})"
        )
    return k


class TopKSAE(SAE):
    """TopK SAE; ``k = cfg.extra["k"]``. Training and inference paths are the same (per token)."""

    architecture = "topk"
    per_feature_activation = False
    uses_sparsity_penalty = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.k = _k_from_cfg(cfg)
        relu = cfg.extra.get("topk_relu", True)
        if not isinstance(relu, bool):
            raise SAEError(f"cfg.extra['topk_relu'] must be true or false, got {relu!r}")
        self.topk_relu = relu

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, hidden_pre)``, both ``[..., d_sae]``; at most ``k`` non-zero features per token."""
        hidden_pre = self.hidden_pre(x)
        vals, idx = self._select(hidden_pre)
        f = torch.zeros_like(hidden_pre).scatter(-1, idx, self._activate(vals))
        return f, hidden_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(x), x)`` ``[..., d_out]`` of ``x [..., d_in]``, decoded from the ``k``
        selected features alone: per token the sum of their ``k`` decoder rows weighted by their activations
        (:func:`~saecircuits.saes.sparse_codes.sparse_decode`) instead of the ``[..., d_sae]`` code times ``W_dec``,
        ``d_sae / k`` times less work (the whole-prompt splices of loss recovered). The same value up to the order of
        the float sum; a 16-bit SAE takes the dense decode, whose rounding in its dtype is the one SAELens' files are
        checked against."""
        from saecircuits.saes.sparse_codes import sparse_decode

        if self.W_dec.dtype not in (torch.float32, torch.float64):
            return super().forward(x)
        vals, idx = self._select(self.hidden_pre(x))
        vals = self._activate(vals)
        scale = self._output_scale(x)  # a normalising SAE's latents in activation units, as encode
        if scale is not None:
            vals = vals * scale
        out = sparse_decode(vals.reshape(-1, self.k), idx.reshape(-1, self.k), self.W_dec)
        return out.reshape(*idx.shape[:-1], out.shape[-1]) + self.decoder_bias(x)

    def _select(self, hidden_pre: torch.Tensor, *, sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` ``[..., k]`` of the ``k`` largest pre-activations per token (the one selection);
        ``sort=False`` leaves them in any order (the same set; faster)."""
        return hidden_pre.topk(self.k, dim=-1, sorted=sort)

    def _activate(self, vals: torch.Tensor) -> torch.Tensor:
        return torch.relu(vals) if self.topk_relu else vals

    def active_entries(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """:meth:`SAE.active_entries` from the ``k`` selected features per token, without the dense ``[..., d_sae]``
        code (its zeros, scatter and ``nonzero`` scan were about a sixth of the corpus pass): the same entries, in the
        same order (tokens in row-major order, features ascending within a token) and the same float values."""
        vals, idx = self._select(self.hidden_pre(x))  # encode's selection (the same call: the same set on ties)
        vals = self._activate(vals)
        scale = self._output_scale(x)  # a normalising SAE's latents in activation units, as encode
        if scale is not None:
            vals = vals * scale
        idx, order = idx.sort(dim=-1)  # nonzero's order: features ascending within a token
        vals = vals.gather(-1, order).float()
        keep = vals > 0
        if mask is not None:
            keep &= mask[..., None]
        *lead, _ = torch.nonzero(keep, as_tuple=True)
        return (*lead, idx[keep], vals[keep])

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training path in sparse form: ``(acts [batch, k], idx [batch, k], hidden_pre [batch, d_sae])``.

        ``scatter(idx, acts)`` is :meth:`encode_with_hidden_pre`'s ``f`` (the same selection and values);
        ``acts`` is differentiable in ``W_enc``, ``b_enc`` and ``b_dec`` through the selected encoder columns only
        (:func:`saecircuits.saes.sparse_codes.selected_pre_activations`), ``hidden_pre`` carries no gradient.
        For ``x [batch, d_in]`` of an SAE whose decode needs no input (the trainer's SAEs).
        """
        from saecircuits.saes.sparse_codes import selected_pre_activations

        x_in, _ = self._encoder_input(x)
        with torch.no_grad():  # hidden_pre(x)'s x_in @ W_enc + b_enc, the bias added in the matmul (one pass less)
            hidden_pre = torch.addmm(self.b_enc, x_in, self.W_enc)
        vals, idx = self._select(hidden_pre, sort=False)  # the decode sums over them: any order
        pre = selected_pre_activations(x_in, self.W_enc, self.b_enc, idx, vals)
        return self._activate(pre), idx, hidden_pre
