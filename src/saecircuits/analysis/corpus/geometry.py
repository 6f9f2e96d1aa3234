"""Weight geometry of SAE features: cosine similarities of decoder and encoder directions (a later version of
the reference notebook) and the token kurtosis of each feature's unembedding direction
(``get_token_kurtosis_for_decoder`` in the notebook's ``utils/circuit_discovery_utils.py``).

- :func:`decoder_cosines` / :func:`encoder_cosines`: ``[S, S]`` cosine similarities of ``W_dec[k]`` (what feature
  ``k`` writes) / ``W_enc[:, k]`` (what it reads) for a set of features. Two features with decoder cosine near 1 write
  the same direction (split or duplicated features); encoder cosine near 1 means they read the same direction.
- :func:`token_kurtosis`: per feature, the excess kurtosis over the vocabulary of the cosine similarities between the
  residual direction the feature writes (``W_dec[k] @ W_out[L]`` for an MLP post-activation SAE) and every token's
  unembedding direction. High kurtosis: the feature writes towards a few tokens (a heavy-tailed distribution over
  the vocabulary); near 0: no token stands out (Gaussian-like). The notebook took the processed weights (fold_ln,
  centring); here the final norm's weight and centring are applied explicitly (``models.norms``), which gives the
  processed-basis value under every weight-processing switch: the direction is centred over ``d_model`` (LayerNorm
  only), each unembedding column is ``w * W_U[:, t]`` centred over ``d_model`` (LayerNorm only) and over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saecircuits.analysis.ablations.feature_effects import _feature_write
from saecircuits.models.norms import readout_of
from saecircuits.saes.base import SAE

__all__ = ["cosines", "cosine_matrix", "decoder_cosines", "encoder_cosines", "excess_kurtosis", "token_kurtosis",
           "unembedding_directions"]

MAX_FLOATS = 1 << 24
"""Budget of one chunk of feature x vocabulary cosines."""


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of every row of ``a [m, d]`` with every row of ``b [n, d]``: float64 ``[m, n]``.

    A zero row has no direction, so its cosines are NaN (undefined), never 0. The one cosine formula of the package.
    """
    a, b = a.detach().double(), b.detach().to(a.device).double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    out = (a / na[:, None]) @ (b / nb[:, None]).T
    out[na == 0] = float("nan")
    out[:, nb == 0] = float("nan")
    return out


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``vectors [S, d]``: float64 ``[S, S]`` (NaN for a zero row)."""
    return cosines(vectors, vectors)


def _check(sae: SAE, features: Sequence[int]) -> list[int]:
    feats = [int(k) for k in features]
    if not feats or min(feats) < 0 or max(feats) >= sae.d_sae:
        raise ValueError(f"features must be a non-empty list of indices in 0..{sae.d_sae - 1}, got {feats}")
    return feats


def decoder_cosines(sae: SAE, features: Sequence[int]) -> torch.Tensor:
    """Cosine similarities of the decoder rows ``W_dec[k]`` of ``features``: float64 ``[S, S]``.

    Raises:
        ValueError: no features or an index out of range.
    """
    return cosine_matrix(sae.W_dec[_check(sae, features)])


def encoder_cosines(sae: SAE, features: Sequence[int]) -> torch.Tensor:
    """Cosine similarities of the encoder columns ``W_enc[:, k]`` of ``features``: float64 ``[S, S]``.

    Raises:
        ValueError: no features or an index out of range.
    """
    return cosine_matrix(sae.W_enc[:, _check(sae, features)].T)


def excess_kurtosis(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Population excess kurtosis ``m4 / m2^2 - 3`` along ``dim`` (``m_j``: central moments with 1/n; as
    ``scipy.stats.kurtosis`` with its defaults). NaN where the values are constant."""
    x = x.double()
    c = x - x.mean(dim, keepdim=True)  # a new tensor: the in-place squarings below never touch x
    c.mul_(c)  # c^2 and then c^4 by squaring in place: no pow(c, 4) (a transcendental per element), one buffer
    m2 = c.mean(dim)
    m4 = c.mul_(c).mean(dim)
    return torch.where(m2 > 0, m4 / m2.clamp(min=1e-300) ** 2 - 3.0, torch.full_like(m2, float("nan")))


def unembedding_directions(model) -> torch.Tensor:
    """Each token's unembedding direction in the processed basis: float32 ``[d_model, d_vocab]``, ``w * W_U[:, t]``
    (``w`` the final norm's weight) centred over ``d_model`` (LayerNorm only) and over the vocabulary."""
    ro = readout_of(model)
    u = ro.W_U.detach().float() * ro.norm.weight.detach().float().to(ro.W_U.device)[:, None]
    if ro.norm.centre:
        u = u - u.mean(0, keepdim=True)
    return u - u.mean(1, keepdim=True)


def token_kurtosis(model, sae: SAE, features: Sequence[int] | None = None) -> torch.Tensor:
    """Excess kurtosis over the vocabulary of ``cos(direction_k, unembedding_t)`` per feature.

    Args:
        model: a TransformerBridge (any weight processing).
        sae: an SAE whose features write to the residual stream directly or through ``W_out``
            (``mlp.hook_post``, ``hook_mlp_out``, ``hook_resid_*``).
        features: feature indices (default: all ``d_sae``).

    Returns:
        float64 ``[n_features]`` (NaN for a feature whose direction is zero after centring).

    Raises:
        ValueError: an SAE on another hook point, or a feature index out of range.
    """
    write = _feature_write(model, sae)  # [d_sae, d_model]
    idx = torch.arange(sae.d_sae) if features is None else torch.as_tensor(_check(sae, features))
    ro = readout_of(model)
    u = unembedding_directions(model)
    u = u / u.norm(dim=0, keepdim=True).clamp(min=1e-30)
    out = torch.empty(len(idx), dtype=torch.float64)
    step = max(1, MAX_FLOATS // u.shape[1])
    with torch.no_grad():
        for i in range(0, len(idx), step):
            d = write[idx[i : i + step].to(write.device)].float().to(u.device)
            if ro.norm.centre:
                d = d - d.mean(-1, keepdim=True)
            norm = d.norm(dim=-1, keepdim=True)
            cos = (d / norm.clamp(min=1e-30)) @ u
            k = excess_kurtosis(cos).cpu()
            out[i : i + step] = torch.where(norm[:, 0].cpu() > 0, k, torch.full_like(k, float("nan")))
    return out
