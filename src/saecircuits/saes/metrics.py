"""SAE quality metrics: L0, MSE, explained variance, dead/dense fractions, feature density, shrinkage.

All functions take tensors of shape ``[..., d_in]`` / ``[..., d_sae]`` (leading dims = tokens), optionally with a
``mask`` ``[...]`` of tokens to include (e.g. excluding BOS and padding), and return Python floats or tensors.
Loss recovered needs the language model and lives with the trainer/analyses.
"""

from __future__ import annotations

import torch

from saecircuits.saes.base import SAEError


def _tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[..., d]`` -> ``[n_tokens, d]`` keeping only masked-in tokens."""
    flat = t.reshape(-1, t.shape[-1])
    if mask is None:
        return flat
    if mask.shape != t.shape[:-1]:
        raise SAEError(f"mask shape {tuple(mask.shape)} must equal the token dims {tuple(t.shape[:-1])}")
    return flat[mask.reshape(-1).to(torch.bool)]


def _nonempty(t: torch.Tensor, what: str) -> None:
    if t.shape[0] == 0:
        raise SAEError(f"{what}: no tokens (empty batch or all masked out); pass at least one token")


def l0(f: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean number of non-zero features per token (L0), from ``f [..., d_sae]``.

    Raises:
        SAEError: no tokens.
    """
    t = _tokens(f, mask)
    _nonempty(t, "l0")
    return float((t != 0).sum(dim=-1).float().mean())


def mse(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Per-token squared error summed over ``d_in``, averaged over tokens (the training loss's MSE)."""
    if x.shape != x_hat.shape:
        raise SAEError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape")
    d = _tokens(x - x_hat, mask)
    _nonempty(d, "mse")
    return float((d.float() ** 2).sum(dim=-1).mean())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of the variance of ``x`` explained by ``x_hat``, pooled over tokens and dimensions.

    ``1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t(x)||^2`` where the mean is over the included tokens.
    Predicting the mean explains 0, a perfect reconstruction 1; worse-than-mean reconstructions are negative.

    Raises:
        SAEError: shapes differ, no tokens, or ``x`` has zero variance (the ratio is undefined).
    """
    if x.shape != x_hat.shape:
        raise SAEError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape")
    xt, xh = _tokens(x, mask).double(), _tokens(x_hat, mask).double()
    _nonempty(xt, "explained_variance")
    total = ((xt - xt.mean(dim=0)) ** 2).sum()
    if float(total) == 0.0:
        raise SAEError("explained_variance: x has zero variance over the tokens given; use more tokens")
    return float(1 - ((xt - xh) ** 2).sum() / total)


def shrinkage(
    x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "norm_ratio"
) -> float:
    """Shrinkage of the reconstruction (< 1: ``x_hat`` systematically too small, as L1 penalties cause).

    A ratio of sums over the (masked) tokens, not a mean of per-token ratios, so tokens with a tiny ``||x_t||``
    cannot dominate (one token with ``||x|| = 1e-6`` and ``||x_hat|| = 1e-3`` would add a ratio of 1000). Modes:
        ``"norm_ratio"`` (default): ``sum_t ||x_hat_t|| / sum_t ||x_t||``.
        ``"projection"``: ``sum_t (x_hat_t . x_t) / sum_t ||x_t||^2``, the length of ``x_hat`` along ``x`` relative
        to ``x`` (ignores the orthogonal error, which ``norm_ratio`` counts as length).
    The trainer's logged ``shrinkage`` is this function (``norm_ratio``).

    Raises:
        SAEError: shapes differ, unknown mode, or every token has a zero input norm.
    """
    if x.shape != x_hat.shape:
        raise SAEError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape")
    if mode not in ("norm_ratio", "projection"):
        raise SAEError(f"unknown shrinkage mode {mode!r}; use 'norm_ratio' or 'projection'")
    xt, xh = _tokens(x, mask).double(), _tokens(x_hat, mask).double()
    norm = xt.norm(dim=-1)
    if not bool((norm > 0).any()):
        raise SAEError("shrinkage: no token with a non-zero input norm")
    if mode == "norm_ratio":
        return float(xh.norm(dim=-1).sum() / norm.sum())
    return float((xh * xt).sum() / (norm**2).sum())


def firing_counts(f: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-feature number of tokens with ``f > 0``: ``[..., d_sae] -> [d_sae]`` (int64)."""
    return (_tokens(f, mask) > 0).sum(dim=0).to(torch.long)


def feature_density(counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Firing frequency per feature ``counts / n_tokens`` [d_sae] (float64)."""
    if n_tokens <= 0:
        raise SAEError(f"n_tokens must be positive, got {n_tokens}; count firings over at least one token")
    return counts.double() / n_tokens


def dead_mask(counts: torch.Tensor, n_tokens: int, max_frequency: float = 0.0) -> torch.Tensor:
    """Features whose frequency in the window is ``<= max_frequency`` ([d_sae] bool).

    With the default 0 a feature is dead iff it never fired in the window. The reference notebook used ``<=``
    with 1e-5 (189) or 5e-4 (54) over 10,000 / 12,500 steps; pass those to reproduce it.
    """
    return feature_density(counts, n_tokens) <= max_frequency


def dead_fraction(counts: torch.Tensor, n_tokens: int, max_frequency: float = 0.0) -> float:
    """Fraction of features that are dead (see :func:`dead_mask`)."""
    return float(dead_mask(counts, n_tokens, max_frequency).double().mean())


def dense_fraction(counts: torch.Tensor, n_tokens: int, min_frequency: float = 0.1) -> float:
    """Fraction of features firing on more than ``min_frequency`` of the window's tokens (default 10%)."""
    return float((feature_density(counts, n_tokens) > min_frequency).double().mean())


def log10_feature_density(counts: torch.Tensor, n_tokens: int, eps: float = 1e-10) -> torch.Tensor:
    """``log10(frequency + eps)`` per feature [d_sae] (SAELens' "feature density" plot; dead -> log10(eps))."""
    return torch.log10(feature_density(counts, n_tokens) + eps)


def feature_density_histogram(
    counts: torch.Tensor, n_tokens: int, bins: int = 50, low: float = -10.0, high: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram data of :func:`log10_feature_density`: ``(bin_edges [bins+1], counts [bins])``.

    Values are clamped into ``[low, high]`` so dead features land in the first bin and none are dropped.
    """
    if bins <= 0 or not low < high:
        raise SAEError(f"need bins > 0 and low < high, got bins={bins}, low={low}, high={high}")
    v = log10_feature_density(counts, n_tokens, eps=10.0**low).clamp(low, high)
    hist = torch.histc(v.float(), bins=bins, min=low, max=high).to(torch.long)
    return torch.linspace(low, high, bins + 1, dtype=torch.float64), hist


class FiringCounter:
    """Per-feature firing counts over an explicit window of tokens (for dead/dense fractions and resampling).

    The window is everything passed to :meth:`update` since the last :meth:`reset` (a tumbling window, as the
    reference notebook's resampling counters). ``n_tokens`` and ``n_steps`` say how long the window is.

    Example::

        counter = FiringCounter(sae.d_sae)
        counter.update(f)                    # every step
        if step % 10_000 == 0:
            dead = counter.dead_mask(1e-5); counter.reset()
    """

    def __init__(self, d_sae: int, device: str | torch.device = "cpu") -> None:
        self.counts = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.n_tokens = 0
        self.n_steps = 0

    def update(self, f: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the firings (``f > 0``) of a batch ``f [..., d_sae]``."""
        t = _tokens(f.detach(), mask)
        self.counts += (t > 0).sum(dim=0).to(self.counts.device, torch.long)
        self.n_tokens += t.shape[0]
        self.n_steps += 1

    def reset(self) -> None:
        """Start a new window."""
        self.counts.zero_()
        self.n_tokens = 0
        self.n_steps = 0

    def dead_mask(self, max_frequency: float = 0.0) -> torch.Tensor:
        """[d_sae] bool, see :func:`dead_mask`."""
        return dead_mask(self.counts, self.n_tokens, max_frequency)

    def dead_fraction(self, max_frequency: float = 0.0) -> float:
        """Fraction of dead features in the window, see :func:`dead_fraction`."""
        return dead_fraction(self.counts, self.n_tokens, max_frequency)

    def dense_fraction(self, min_frequency: float = 0.1) -> float:
        """Fraction of dense features in the window, see :func:`dense_fraction`."""
        return dense_fraction(self.counts, self.n_tokens, min_frequency)

    def log10_density(self, eps: float = 1e-10) -> torch.Tensor:
        """Per-feature ``log10(frequency + eps)`` [d_sae] over the window."""
        return log10_feature_density(self.counts, self.n_tokens, eps)

    def state_dict(self) -> dict[str, object]:
        """Checkpointable state (counts on the CPU)."""
        return {"counts": self.counts.cpu().clone(), "n_tokens": self.n_tokens, "n_steps": self.n_steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output. Raises SAEError on a different d_sae."""
        counts = state["counts"]
        assert isinstance(counts, torch.Tensor)
        if counts.shape != self.counts.shape:
            raise SAEError(
                f"FiringCounter state has {counts.shape[0]} features, expected {self.counts.shape[0]}"
            )
        self.counts.copy_(counts)
        self.n_tokens = int(state["n_tokens"])  # type: ignore[arg-type]
        self.n_steps = int(state["n_steps"])  # type: ignore[arg-type]


__all__ = [
    "FiringCounter",
    "dead_fraction",
    "dead_mask",
    "dense_fraction",
    "explained_variance",
    "feature_density",
    "feature_density_histogram",
    "firing_counts",
    "l0",
    "log10_feature_density",
    "mse",
    "shrinkage",
]
