"""Corpus-scale statistics of every SAE feature, for every SAE of a run, in one streaming pass (the reference
notebook's max activations, top examples, token-wise counts and common tokens, without its dense arrays).

One forward per batch of corpus documents reads every SAE's hook point at every position (the pass stops after the
last block it needs and never unembeds, and its activations are not kept in the interventions' cache), and each
SAE's features are encoded in chunks of rows so that at most ``encode_floats`` activations exist at once. Nothing of
size ``n_docs x d_sae`` or ``d_sae x d_vocab`` is ever built.
Per SAE and feature ``k`` it keeps:

- ``fire_count``: tokens with ``f_k > 0``, so the density ``fire_count / n_tokens`` (fraction of counted tokens);
- ``activation_sum`` (the mean activation when active is ``activation_sum / fire_count``) and the corpus maximum;
- the per-token L0 distribution (how many features fire on each counted token);
- a histogram of ``log10 f_k`` over the tokens where it fires (fixed bins, see ``hist_range``);
- a streaming top-k of the documents with the largest per-document maximum, with the position of that maximum
  (ties broken by the lower document index, so batching never changes the result);
- token-wise counts: how often each input token carries ``f_k > token_fraction * max_k`` (the maximum over the
  whole corpus), kept as the ``n_top_tokens`` most frequent tokens per feature plus the total (the notebook's dense
  ``[d_sae, d_vocab]`` table was 3.3 GB and skipped the first 10 positions of every story; here every counted
  position counts);
- the notebook's "upper / middle / lower" examples: the documents whose maximum lies just above ``2/3``, ``1/3``
  and ``1/10`` of the feature's corpus maximum (the ``n`` smallest maxima that exceed it), with the fractions as real
  numbers (the notebook used ``max // 3`` on floats, which is 0 for any maximum below 3).

Counted tokens are the real (non-padding) positions whose token is not a special token (BOS/EOS/PAD anywhere in the
row): special positions are out of distribution for SAEs trained without them and inflate maxima (the notebook kept BOS). The
pass also counts every token id over the counted positions (``token_counts``: the common/rare mask of the logit
boosts) and sums each SAE's input hook over the counted positions (its mean, for mean ablation); ``mean_hooks``
asks for the same sums of other hooks, read in the same forward (:meth:`CorpusStats.hook_mean`: the circuit's
mean-ablation values come from them, without a pass of their own).

Exact in one pass although thresholds depend on the final maximum: the running maximum never exceeds the final one,
so every event above ``fraction x final max`` is above ``fraction x running max`` when it is seen. Token events and
band candidates are kept while they exceed the running threshold and pruned after each batch; the final threshold is
applied at the end. Memory therefore grows with the number of (token, feature) activations above
``token_fraction x`` the feature's maximum and of (document, feature) maxima above ``1/10`` of it, not with the corpus
times ``d_sae``; and only up to ``max_event_bytes`` (default 256 MiB): past it the pass stops keeping events,
finishes its counts, maxima, top-k and histograms, and reads the same batches a second time with the final maxima
known, collecting only what the results read: the count of each (feature, token) pair above ``token_fraction x max``
(16 bytes per distinct pair, at most ``d_sae x`` the distinct tokens) and, per feature and band, the
``n_band_examples`` smallest document maxima above the band's fraction (ties to the lower document). The results are
the same; :meth:`FeatureStats.band_examples` then answers up to ``n_band_examples`` examples.

Feature activations are non-negative (every architecture in ``saecircuits.saes`` ends in a ReLU, a TopK of ReLU
outputs or a JumpReLU); padding and special positions count as 0.

Why one module of ~830 lines: the streaming state (:class:`_Accumulator`), the exact merge of two states (shards of
documents, batches) and its ``torch.distributed`` reduction must keep the same fields and the same tie rules, or a
sharded pass stops equalling the single pass; they are kept side by side for that.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from saecircuits.analysis.readouts.boosts import common_from_counts
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TOKENS,
    _device_of,
    n_ctx_of,
    pad_id_of,
    row_batches,
    with_progress,
)
from saecircuits.models.interventions import interventions_for
from saecircuits.models.tokens import special_token_ids, special_token_mask, token_pieces
from saecircuits.saes.base import SAE

__all__ = [
    "BANDS",
    "FeatureStats",
    "CorpusStats",
    "corpus_feature_stats",
    "CorpusPartial",
    "corpus_partial_stats",
    "merge_corpus_partials",
    "special_ids_of",
    "counted_token_mask",
    "example_windows",
]

BANDS: dict[str, float] = {"upper": 2 / 3, "middle": 1 / 3, "lower": 1 / 10}
"""The notebook's example bands as fractions of the feature's corpus maximum (without its floor division)."""


def special_ids_of(model) -> frozenset[int]:
    """Token ids that are never text for this model's tokenizer (``models.tokens.special_token_ids``)."""
    return special_token_ids(getattr(model, "tokenizer", None))


def counted_token_mask(tokens: torch.Tensor, lengths: torch.Tensor, special_ids: Collection[int]) -> torch.Tensor:
    """bool ``[b, T]``: real positions (``t < length``) whose token is not special (the positions statistics count).

    Args:
        tokens: int64 ``[b, T]`` right-padded rows.
        lengths: int64 ``[b]`` real tokens per row.
        special_ids: ids to leave out (:func:`special_ids_of`).
    """
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths.to(tokens.device)[:, None]
    return mask & ~special_token_mask(tokens, special_ids)


@dataclass
class FeatureStats:
    """Corpus statistics of one SAE's features (see the module docstring for definitions).

    Attributes:
        hook_point, d_sae: of the SAE.
        n_docs: documents in the pass; n_tokens: counted tokens (real, non-special positions).
        fire_count: int64 ``[d_sae]`` counted tokens with ``f > 0``.
        activation_sum: float64 ``[d_sae]`` sum of ``f`` over counted tokens (SAE feature units).
        max_activation: float32 ``[d_sae]`` corpus maximum (0 for a feature that never fires).
        l0_counts: int64 ``[max L0 + 1]``: ``l0_counts[j]`` counted tokens with exactly ``j`` active features.
        hist_edges: float64 ``[n_bins + 1]`` bin edges in log10 units; values below the first edge are counted in
            the first bin, values above the last in the last bin.
        hist: int64 ``[d_sae, n_bins]`` counts of ``log10 f`` over the tokens where the feature fires.
        top_value, top_doc, top_pos: ``[d_sae, k]`` the ``k`` documents with the largest per-document maximum
            (float32 value, int64 document index into the rows given, int64 absolute position of that maximum),
            in decreasing value; slots with value 0 hold no example.
        token_fraction: the token-count threshold as a fraction of each feature's corpus maximum.
        top_tokens, top_token_counts: int64 ``[d_sae, n_top_tokens]`` the input tokens most often above the
            threshold and their counts (most frequent first, ties by lower id; -1 / 0 pad).
        above_count: int64 ``[d_sae]`` counted tokens above the threshold (over all token ids).
        input_sum: float64 ``[d_in]`` sum over counted tokens of the hook's activation.
        bands: the example bands (name -> fraction of the maximum) the pass kept candidates for.
        band_n: 0 when every band candidate was kept (any ``n`` of :meth:`band_examples`), else the examples kept
            per feature and band by a second pass (the largest ``n`` :meth:`band_examples` answers).
    """

    hook_point: str
    d_sae: int
    n_docs: int
    n_tokens: int
    fire_count: torch.Tensor
    activation_sum: torch.Tensor
    max_activation: torch.Tensor
    l0_counts: torch.Tensor
    hist_edges: torch.Tensor
    hist: torch.Tensor
    top_value: torch.Tensor
    top_doc: torch.Tensor
    top_pos: torch.Tensor
    token_fraction: float
    top_tokens: torch.Tensor
    top_token_counts: torch.Tensor
    above_count: torch.Tensor
    input_sum: torch.Tensor
    bands: dict[str, float] = field(default_factory=dict)
    _band_feature: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32), repr=False)
    _band_doc: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32), repr=False)
    _band_pos: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32), repr=False)
    _band_value: torch.Tensor = field(default_factory=lambda: torch.zeros(0), repr=False)
    band_n: int = 0

    @property
    def density(self) -> torch.Tensor:
        """float64 ``[d_sae]``: fraction of counted tokens with ``f > 0`` (NaN without counted tokens)."""
        return self.fire_count.double() / self.n_tokens if self.n_tokens else torch.full((self.d_sae,), math.nan)

    @property
    def l0(self) -> float:
        """Mean number of active features per counted token (NaN without counted tokens)."""
        return float(self.fire_count.sum()) / self.n_tokens if self.n_tokens else math.nan

    @property
    def mean_when_active(self) -> torch.Tensor:
        """float64 ``[d_sae]``: mean activation over the tokens where the feature fires (NaN where it never does)."""
        out = self.activation_sum / self.fire_count.double()
        return out.masked_fill(self.fire_count == 0, math.nan)

    @property
    def mean_input(self) -> torch.Tensor:
        """float32 ``[d_in]``: mean of the hook's activation over counted tokens (a mean-ablation vector).

        Raises:
            ValueError: no counted token.
        """
        if not self.n_tokens:
            raise ValueError("no counted tokens: the corpus rows hold only special tokens or padding")
        return (self.input_sum / self.n_tokens).float()

    def _check(self, feature: int) -> int:
        k = int(feature)
        if not 0 <= k < self.d_sae:
            raise IndexError(f"feature {k} out of range 0..{self.d_sae - 1}")
        return k

    def top_examples(self, feature: int, n: int | None = None) -> list[tuple[int, int, float]]:
        """``(doc, position, value)`` of the documents with the largest maximum of ``feature`` (positive only)."""
        k = self._check(feature)
        out = [
            (int(d), int(p), float(v))
            for d, p, v in zip(self.top_doc[k], self.top_pos[k], self.top_value[k], strict=True)
            if v > 0
        ]
        return out[:n] if n is not None else out

    def band_examples(self, feature: int, band: str, n: int) -> list[tuple[int, int, float]]:
        """The notebook's banded examples: the ``n`` documents with the smallest maximum that still exceeds
        ``bands[band] x`` the feature's corpus maximum, ascending, as ``(doc, position, value)``.

        Raises:
            KeyError: a band the pass did not keep. IndexError: ``feature`` out of range. ValueError: ``n`` above
                the examples a second pass kept (``band_n``).
        """
        k = self._check(feature)
        if band not in self.bands:
            raise KeyError(f"band {band!r} was not kept; the pass kept {sorted(self.bands)}")
        if self.band_n and n > self.band_n:
            raise ValueError(f"the corpus pass kept {self.band_n} band examples per feature (it read the rows twice "
                             f"to stay in its memory budget); ask for n <= {self.band_n} or pass a larger "
                             f"n_band_examples")
        mx = float(self.max_activation[k])
        if not mx > 0:
            return []
        sel = (self._band_feature == k) & (self._band_value > self.bands[band] * mx)
        docs, pos, val = self._band_doc[sel].long(), self._band_pos[sel].long(), self._band_value[sel]
        order = np.lexsort((docs.numpy(), val.numpy()))[:n]  # value ascending, then lower document first
        return [(int(docs[i]), int(pos[i]), float(val[i])) for i in order]

    def top_token_list(self, feature: int) -> list[tuple[int, int]]:
        """``(token id, count)`` of the tokens the feature fires on most often above the threshold."""
        k = self._check(feature)
        return [
            (int(t), int(c))
            for t, c in zip(self.top_tokens[k], self.top_token_counts[k], strict=True)
            if t >= 0 and c > 0
        ]

    def density_histogram(self, edges: Sequence[float]) -> tuple[list[int], int]:
        """Histogram of ``log10 density`` over the features that fire at least once, and the number that never do.

        Args:
            edges: increasing bin edges (log10 units); densities outside go to the first / last bin.

        Returns:
            ``(counts [len(edges) - 1], n_dead)``.
        """
        d = self.density
        alive = self.fire_count > 0
        e = np.asarray(edges, dtype=np.float64)
        v = np.clip(np.log10(d[alive].numpy()), e[0], e[-1])
        counts, _ = np.histogram(v, bins=e)
        return counts.astype(int).tolist(), int((~alive).sum())


@dataclass
class CorpusStats(NotebookDisplay):
    """The result of one pass: corpus-level counts and one :class:`FeatureStats` per SAE hook point.

    Attributes:
        n_docs, n_tokens: documents and counted tokens.
        token_counts: int64 ``[d_vocab]`` occurrences of each token id over counted positions.
        features: one :class:`FeatureStats` per SAE, in the order the SAEs were given.
        special_ids: the token ids left out.
        hook_sums: float64 sum over counted tokens of each ``mean_hooks`` hook's activation (the hook's shape per
            token); :meth:`hook_mean` gives the means.
    """

    n_docs: int
    n_tokens: int
    token_counts: torch.Tensor
    features: list[FeatureStats]
    special_ids: list[int]
    hook_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def hook_mean(self, hook: str) -> torch.Tensor:
        """float32 mean of ``hook``'s activation over the counted tokens (the hook's shape per token, e.g.
        ``[n_heads, d_head]`` for an attention ``hook_z``), from the sums of a pass run with ``mean_hooks``.

        Raises:
            KeyError: the pass did not keep this hook's sum. ValueError: no counted token.
        """
        if hook not in self.hook_sums:
            raise KeyError(f"the corpus pass kept no sum of {hook!r} (it kept {sorted(self.hook_sums)}): run it "
                           f"with mean_hooks=[{hook!r}, ...]")
        if not self.n_tokens:
            raise ValueError("no counted tokens: the corpus rows hold only special tokens or padding")
        return (self.hook_sums[hook] / self.n_tokens).float()

    def __getitem__(self, key: int | str) -> FeatureStats:
        """The statistics of the ``key``-th SAE, or of the (first) SAE on hook point ``key``."""
        if isinstance(key, str):
            for fs in self.features:
                if fs.hook_point == key:
                    return fs
            raise KeyError(f"no SAE on {key!r} in these statistics")
        return self.features[key]

    def common_tokens(self, min_count: int = 100) -> torch.Tensor:
        """bool ``[d_vocab]``: tokens occurring more than ``min_count`` times (the notebook's 100)."""
        return common_from_counts(self.token_counts, min_count)

    def display_title(self) -> str:
        return (f"Corpus statistics of {len(self.features)} SAE(s) over {self.n_docs} documents "
                f"({self.n_tokens} counted tokens)")

    def to_pandas(self):
        """One row per (SAE, feature) that fires at least once: ``hook_point``, ``feature``, ``density``,
        ``max_activation``, ``mean_when_active``, sorted by density."""
        import pandas as pd

        frames = []
        for fs in self.features:
            dens, live = fs.density, fs.fire_count > 0
            idx = torch.nonzero(live).flatten()
            frames.append(pd.DataFrame({"hook_point": fs.hook_point, "feature": idx.numpy(),
                                        "density": dens[idx].double().numpy(),
                                        "max_activation": fs.max_activation[idx].double().numpy(),
                                        "mean_when_active": fs.mean_when_active[idx].double().numpy()}))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return df.sort_values("density", ascending=False, ignore_index=True) if len(df) else df

    def figure(self):
        """Histogram of log10 density of the features that fire, per SAE."""
        import plotly.graph_objects as go

        fig = go.Figure([go.Histogram(x=torch.log10(fs.density[fs.fire_count > 0]).tolist(), name=fs.hook_point,
                                      opacity=0.6, nbinsx=40) for fs in self.features])
        fig.update_layout(barmode="overlay", title="Feature density over the corpus", template="plotly_white",
                          xaxis_title="log10 density (fraction of tokens with f > 0)", yaxis_title="features")
        return fig


_SUMMED = ("fire_count", "activation_sum", "hist", "input_sum")
"""State tensors of one SAE that shards add (counts, float64 sums, histogram counts)."""
_TOK_KEYS = ("tok_feature", "tok_token", "tok_value")
_BAND_KEYS = ("band_feature", "band_doc", "band_pos", "band_value")
_TABLE_KEYS = ("tok_key", "tok_count")
"""The second pass's token table: int64 ``(feature << 32) | token`` keys (ascending, distinct) and their counts."""
_EVENT_BYTES = {"tok": 12, "band": 16}
"""Bytes of one kept token event (feature, token int32, value float32) and one band event (+ document, position)."""
DEFAULT_MAX_EVENT_BYTES = 256 << 20
"""Default budget of the kept events (256 MiB over all SAEs of a pass); above it the pass reads the rows twice."""
DEFAULT_N_BAND_EXAMPLES = 10
"""Band examples kept per feature and band when the pass reads the rows twice (``band_examples``' largest ``n``)."""


def _tok_key(feature: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """int64 ``(feature << 32) | token``: one key per (feature, token) pair, ordered by feature then token (built in
    place: one int64 array, not four)."""
    key = feature.to(torch.long, copy=True)
    key.bitwise_left_shift_(32)
    return key.bitwise_or_(token)


def _count_keys(keys: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``keys`` (ascending) and the summed ``counts`` of each (``None``: every key counts once, counted by
    ``unique`` itself, without the inverse index and a column of ones: the end of a pass holding millions of token
    events peaked at about seven int64 arrays of their length)."""
    if counts is None:
        uniq, n = torch.unique(keys, return_counts=True)
        return uniq, n.long()
    uniq, inv = torch.unique(keys, return_inverse=True)
    return uniq, torch.zeros(len(uniq), dtype=torch.long).index_add_(0, inv, counts.long())


def _band_threshold(frac: float, maxima: torch.Tensor) -> torch.Tensor:
    """float32 ``frac x max`` rounded once from float64: the threshold :meth:`FeatureStats.band_examples` applies
    (a float32 tensor compared with the Python float ``frac * max``)."""
    return (frac * maxima.double()).float()


def _select_bands(band: Sequence[torch.Tensor], maxima: torch.Tensor, bands: Mapping[str, float],
                  n: int) -> list[torch.Tensor]:
    """Of band events ``(feature, doc, pos, value)``: those among the ``n`` smallest (value, then document,
    ascending) above ``frac x max`` of their feature for some band ``frac``, i.e. every example
    :meth:`FeatureStats.band_examples` returns for any ``n' <= n``. Each document appears once per feature, so
    (value, document) orders the events of a feature strictly and the selection is exact.

    Returns:
        the kept events as the same four columns, ordered by feature, value and document (at most
        ``len(bands) x n`` per feature)."""
    f, doc, pos, v = band
    if not len(v):
        return list(band)
    order = torch.from_numpy(np.lexsort((doc.numpy(), v.numpy(), f.numpy())))
    f, doc, pos, v = (c[order] for c in (f, doc, pos, v))
    keep = torch.zeros(len(v), dtype=torch.bool)
    fl = f.long()
    for frac in bands.values():
        idx = torch.nonzero(v > _band_threshold(frac, maxima)[fl]).flatten()
        fa = fl[idx]  # sorted: the events are ordered by feature
        rank = torch.arange(len(idx)) - torch.searchsorted(fa, fa, side="left")
        keep[idx[rank < n]] = True
    return [f[keep], doc[keep], pos[keep], v[keep]]


def _doc_max(r_i: torch.Tensor, t_i: torch.Tensor, k_i: torch.Tensor, v: torch.Tensor, n_rows: int,
             d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``f.max(dim=1)`` of non-negative codes ``f [n_rows, T, d]`` from their positive entries ``f[r_i, t_i, k_i] =
    v`` only: the per-row maximum (0 where a feature never fires) and the first position holding it (0 where it
    never fires, as ``max`` returns for an all-zero column). The dense reduction over the middle dimension was a
    quarter of the corpus pass's time; this costs the active entries (L0 per token, not d_sae)."""
    flat = r_i * d + k_i
    mx = torch.zeros(n_rows * d, dtype=v.dtype, device=v.device).scatter_reduce_(0, flat, v, "amax")
    at = v == mx[flat]
    pos = torch.zeros(n_rows * d, dtype=torch.long, device=v.device).scatter_reduce_(
        0, flat[at], t_i[at], "amin", include_self=False)
    return mx.view(n_rows, d), pos.view(n_rows, d)


def _no_events(n: int) -> tuple[torch.Tensor, ...]:
    """Empty event columns: ``n - 1`` int32 columns and a float32 value column."""
    return (torch.zeros(0, dtype=torch.int32),) * (n - 1) + (torch.zeros(0),)


def _top_k(val: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor, k: int):
    """The ``k`` best candidates per feature row by (value desc, document asc); empty slots (doc -1) last.

    ``val``/``doc``/``pos``: ``[d_sae, n]``. One order for the batch merge and the shard merge, so neither batching
    nor sharding changes which of two equal maxima is kept."""
    # sort by doc first, then a stable sort by value
    by_doc = torch.argsort(torch.where(doc < 0, torch.iinfo(torch.long).max, doc), dim=1, stable=True)
    val, doc, pos = (t.gather(1, by_doc) for t in (val, doc, pos))
    by_val = torch.argsort(val, dim=1, descending=True, stable=True)[:, :k]
    return tuple(t.gather(1, by_val) for t in (val, doc, pos))


def _pad_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of 1-d count vectors of different lengths (zero-padded at the end)."""
    out = torch.zeros(max(len(p) for p in parts), dtype=parts[0].dtype)
    for p in parts:
        out[: len(p)] += p
    return out


def _merge_states(states: Sequence[Mapping[str, torch.Tensor]], acc: _Accumulator) -> dict[str, torch.Tensor]:
    """One SAE's running states of disjoint document shards -> the state of one pass over their union (``acc``:
    the settings: ``k``, ``token_fraction``, ``bands``).

    Exact: counts, histograms and sums add (float64 sums only reorder), maxima take the maximum, the top-k is
    re-selected by (value desc, document asc) from the union of the shards' top-k (each shard's top-k holds every
    document of the union's top-k that it saw), and the token / band events are pruned again by the merged maximum
    (a shard kept every event above its own threshold, which is never above the merged one). States of a second
    pass (``band_n > 0``: token tables and band selections made with the final maxima) add their tables and
    re-select the band examples from the union of the shards' selections; a state still holding events is
    turned into that form first (:meth:`_Accumulator.select_events`)."""
    out = {name: torch.stack([s[name] for s in states]).sum(0) for name in _SUMMED}
    out["max"] = torch.stack([s["max"] for s in states]).amax(0)
    out["l0_counts"] = _pad_sum([s["l0_counts"] for s in states])
    _merge_selections(out, states, acc)
    return out


def _merge_selections(out: dict[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
                      acc: _Accumulator) -> None:
    """Into ``out`` (which holds the merged ``max``): the top-k and the events of :func:`_merge_states`."""
    out["top_value"], out["top_doc"], out["top_pos"] = _top_k(
        *(torch.cat([s[name] for s in states], dim=1) for name in ("top_value", "top_doc", "top_pos")), acc.k)
    n_sel = max(int(s["band_n"]) for s in states)
    if n_sel:  # second-pass form: every shard's table and selection made with the final maxima
        states = [s if int(s["band_n"]) else acc.select_events(s, out["max"]) for s in states]
        out["tok_key"], out["tok_count"] = _count_keys(torch.cat([s["tok_key"] for s in states]),
                                                       torch.cat([s["tok_count"] for s in states]))
        out.update(zip(_TOK_KEYS, _no_events(3), strict=True))
        band = [torch.cat([s[key] for s in states]) for key in _BAND_KEYS]
        out.update(zip(_BAND_KEYS, _select_bands(band, out["max"], acc.bands, n_sel), strict=True))
        out["band_n"] = torch.tensor(n_sel)
        return
    tok = [torch.cat([s[key] for s in states]) for key in _TOK_KEYS]
    keep = tok[2] > acc.token_fraction * out["max"][tok[0].long()]
    out.update((key, c[keep]) for key, c in zip(_TOK_KEYS, tok, strict=True))
    band = [torch.cat([s[key] for s in states]) for key in _BAND_KEYS]
    if acc.band_floor is not None:
        keep = band[3] > acc.band_floor * out["max"][band[0].long()]
        band = [c[keep] for c in band]
    out.update(zip(_BAND_KEYS, band, strict=True))
    out["tok_key"], out["tok_count"] = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    out["band_n"] = torch.tensor(0)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, chunk_floats: int) -> torch.Tensor:
    """float64 CPU sum of ``x [b, T, ...]`` over the positions where ``mask [b, T]`` holds (shape ``x.shape[2:]``),
    in row chunks of about ``chunk_floats`` values (``x.float()`` of a whole bfloat16 batch would copy all of it):
    each chunk summed in float32 by one einsum, the chunks added in float64."""
    b, T = mask.shape
    flat = x.reshape(b, T, -1)
    maskf = mask.to(x.device)
    out = torch.zeros(flat.shape[-1], dtype=torch.float64)
    rows = max(1, chunk_floats // max(1, T * flat.shape[-1]))
    for r0 in range(0, b, rows):
        out += torch.einsum("btd,bt->d", flat[r0 : r0 + rows].float(), maskf[r0 : r0 + rows].float()).double().cpu()
    return out.reshape(x.shape[2:])


class _Accumulator:
    """The running state of one SAE during the pass."""

    compact_min = 1 << 20
    """The second pass merges its pending token keys / band candidates into the table / selection once they
    outnumber both this and what is kept (amortised: each merge at least doubles what it adds)."""

    def __init__(self, sae: SAE, *, k: int, token_fraction: float, bands: Mapping[str, float],
                 hist_range: tuple[float, float], hist_bins: int, encode_floats: int,
                 n_band_examples: int = DEFAULT_N_BAND_EXAMPLES) -> None:
        d = sae.d_sae
        self.sae = sae
        self.k = k
        self.token_fraction = token_fraction
        self.bands = dict(bands)
        self.band_floor = min(self.bands.values()) if self.bands else None
        self.lo, self.hi = hist_range
        self.n_bins = hist_bins
        self.width = (self.hi - self.lo) / hist_bins
        self.encode_floats = encode_floats
        self.fire_count = torch.zeros(d, dtype=torch.long)
        self.activation_sum = torch.zeros(d, dtype=torch.float64)
        self.max = torch.zeros(d)
        self.l0_counts = torch.zeros(1, dtype=torch.long)
        self.hist = torch.zeros(d * hist_bins, dtype=torch.long)
        self.top_value = torch.zeros(d, k)
        self.top_doc = torch.full((d, k), -1, dtype=torch.long)
        self.top_pos = torch.zeros(d, k, dtype=torch.long)
        self.input_sum = torch.zeros(sae.d_in, dtype=torch.float64)
        self.tok_events: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.band_events: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_band_examples = n_band_examples
        self.keeping = True  # False once the pass is over its event budget: the second pass collects instead
        self.tok_key = torch.zeros(0, dtype=torch.long)  # the second pass's token table (see _TABLE_KEYS)
        self.tok_count = torch.zeros(0, dtype=torch.long)
        self.band_n = 0  # > 0: band events are the second pass's selection of n per feature and band
        self._pending_keys: list[torch.Tensor] = []  # second pass: token keys / band candidates not yet merged
        self._pending_band: list[tuple[torch.Tensor, ...]] = []

    def event_bytes(self) -> int:
        """Bytes of the kept events (token events and band candidates, as pruned after the last batch)."""
        return (sum(len(e[0]) for e in self.tok_events) * _EVENT_BYTES["tok"]
                + sum(len(e[0]) for e in self.band_events) * _EVENT_BYTES["band"])

    def drop_events(self) -> None:
        """Stop keeping events (over budget): counts, maxima, top-k and histograms go on; a second pass with the
        final maxima (:meth:`recount`) collects what the events gave."""
        self.keeping = False
        self.tok_events, self.band_events = [], []

    def _active(self, x: torch.Tensor, mask: torch.Tensor):
        """The SAE's codes of one batch in encode chunks of about ``encode_floats``, for both passes (the same chunks,
        so the same activations): per chunk of rows from ``r0``, ``(r0, mask [r, T], doc max [r, d_sae], its (first)
        position, and the active entries (f > 0) as rows, positions, features and values)``, on the CPU. Padding and
        special positions (``mask`` False) count as 0; everything past the maxima comes from the sparse entries,
        never another dense reduction."""
        sae = self.sae
        b, T = mask.shape
        rows = max(1, self.encode_floats // max(1, T * sae.d_sae))
        for r0 in range(0, b, rows):
            m = mask[r0 : r0 + rows]
            r_i, t_i, k_i, v = sae.active_entries(x[r0 : r0 + rows].to(sae.W_enc.dtype), m)
            mx, pos = _doc_max(r_i, t_i, k_i, v, m.shape[0], sae.d_sae)  # f.max(dim=1), from the active entries
            yield r0, m, mx.cpu(), pos.cpu(), r_i.cpu(), t_i.cpu(), k_i.cpu(), v.cpu()

    def update(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, docs: torch.Tensor) -> None:
        """One batch: ``x [b, T, d_in]`` activations, ``tokens``/``mask`` ``[b, T]``, ``docs [b]`` row indices."""
        sae = self.sae
        b, T = tokens.shape
        d = sae.d_sae
        x = sae.flatten_input(x)  # attention hook_z: [b, T, n_heads, d_head] -> [b, T, d_in]
        maskf = mask.to(x.device)
        self.input_sum += _masked_sum(x, mask, self.encode_floats)
        doc_max, doc_pos = [], []
        tokens_cpu = tokens.cpu()
        with torch.no_grad():
            for r0, m, mx, pos, r_i, t_i, k_i, v in self._active(x, maskf):
                doc_max.append(mx)
                doc_pos.append(pos)
                self.max = torch.maximum(self.max, mx.amax(0))
                self.fire_count += torch.bincount(k_i, minlength=d)
                self.activation_sum.index_add_(0, k_i, v.double())
                per_token = torch.bincount(r_i * T + t_i, minlength=m.shape[0] * T)[m.reshape(-1).cpu()]
                l0 = torch.bincount(per_token)
                if l0.numel() > self.l0_counts.numel():
                    l0[: self.l0_counts.numel()] += self.l0_counts
                    self.l0_counts = l0
                else:
                    self.l0_counts[: l0.numel()] += l0
                bins = ((torch.log10(v.double()) - self.lo) / self.width).floor().clamp(0, self.n_bins - 1).long()
                self.hist.index_add_(0, k_i * self.n_bins + bins, torch.ones_like(bins))
                if self.keeping:
                    keep = v > self.token_fraction * self.max[k_i]
                    tok = tokens_cpu[r0 + r_i[keep], t_i[keep]]
                    self.tok_events.append((k_i[keep].int(), tok.int(), v[keep]))
        dm = torch.cat(doc_max)  # [b, d_sae]
        dp = torch.cat(doc_pos)
        self._merge_top(dm, dp, docs)
        if self.band_floor is not None and self.keeping:
            r_i, k_i = torch.nonzero(dm > self.band_floor * self.max[None], as_tuple=True)
            self.band_events.append((k_i.int(), docs[r_i].int(), dp[r_i, k_i].int(), dm[r_i, k_i]))
        self._prune()

    top_block = 2048
    """Features merged into the top-k at once: each feature's row is independent, so blocks give the same top-k,
    and the sort's temporaries (about ten ``[block, k + b]`` int64 tensors) stay a few MiB instead of ~100 MiB at
    16,384 features."""

    def _merge_top(self, dm: torch.Tensor, dp: torch.Tensor, docs: torch.Tensor) -> None:
        """Merge one batch's per-document maxima ``dm``/``dp [b, d_sae]`` of documents ``docs [b]`` into the top-k,
        in place (the kept arrays never move, so the allocator can give the batch's temporaries back)."""
        b = len(docs)
        for f0 in range(0, self.sae.d_sae, self.top_block):
            sl = slice(f0, f0 + self.top_block)
            n = len(self.top_value[sl])
            new = _top_k(torch.cat([self.top_value[sl], dm[:, sl].T], dim=1),  # [block, k + b]
                         torch.cat([self.top_doc[sl], docs[None].expand(n, b)], dim=1),
                         torch.cat([self.top_pos[sl], dp[:, sl].T], dim=1), self.k)
            for kept, t in zip((self.top_value, self.top_doc, self.top_pos), new, strict=True):
                kept[sl] = t

    def _prune(self) -> None:
        """Drop the kept events that can no longer pass the final threshold (the running maximum only grows)."""
        if self.tok_events:
            k, t, v = (torch.cat(c) for c in zip(*self.tok_events, strict=True))
            keep = v > self.token_fraction * self.max[k.long()]
            self.tok_events = [(k[keep], t[keep], v[keep])]
        if self.band_events:
            k, doc, pos, v = (torch.cat(c) for c in zip(*self.band_events, strict=True))
            keep = v > self.band_floor * self.max[k.long()]
            self.band_events = [(k[keep], doc[keep], pos[keep], v[keep])]

    def recount(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, docs: torch.Tensor,
                maxima: torch.Tensor) -> None:
        """One batch of the second pass (arguments as :meth:`update`; ``maxima``: float32 ``[d_sae]`` the final
        corpus maxima): adds the (feature, token) pairs above ``token_fraction x max`` to the token table and keeps
        the band examples (:func:`_select_bands`). The same batches and encode chunks as the first pass, so the
        same activations. Memory: the table (16 bytes per distinct (feature, token) pair above the threshold, at
        most ``d_sae x`` the distinct tokens) and ``len(bands) x n_band_examples`` band events per feature."""
        sae = self.sae
        b, T = tokens.shape
        x = sae.flatten_input(x)
        maskf = mask.to(x.device)
        keys, doc_max, doc_pos = [], [], []
        tokens_cpu = tokens.cpu()
        with torch.no_grad():
            for r0, _, mx, pos, r_i, t_i, k_i, v in self._active(x, maskf):
                doc_max.append(mx)
                doc_pos.append(pos)
                keep = v > self.token_fraction * maxima[k_i]  # the expression _prune applies with the final max
                keys.append(_tok_key(k_i[keep], tokens_cpu[r0 + r_i[keep], t_i[keep]]))
        self._pending_keys.append(torch.cat(keys))
        if self.band_floor is not None:
            dm, dp = torch.cat(doc_max), torch.cat(doc_pos)
            r_i, k_i = torch.nonzero(dm > self.band_floor * maxima[None], as_tuple=True)  # as the first pass keeps
            self._pending_band.append((k_i.int(), docs[r_i].int(), dp[r_i, k_i].int(), dm[r_i, k_i]))
        self.compact(maxima)

    def compact(self, maxima: torch.Tensor, force: bool = False) -> None:
        """Merge the second pass's pending keys into the token table and its pending band candidates into the
        selection: when they outnumber what is kept and ``compact_min`` (or ``force``, at the end of the pass)."""
        n = sum(len(c) for c in self._pending_keys)
        if n and (force or n > max(len(self.tok_key), self.compact_min)):
            keys, counts = _count_keys(torch.cat(self._pending_keys))  # duplicates first: the merge sorts fewer
            self._pending_keys = []
            self.tok_key, self.tok_count = _count_keys(torch.cat([self.tok_key, keys]),
                                                       torch.cat([self.tok_count, counts]))
        n = sum(len(c[0]) for c in self._pending_band)
        kept = self.band_events[0] if self.band_events else _no_events(4)
        if n and (force or n > max(len(kept[0]), self.compact_min)):
            band = [torch.cat(c) for c in zip(kept, *self._pending_band, strict=True)]
            self.band_events = [tuple(_select_bands(band, maxima, self.bands, self.n_band_examples))]
            self._pending_band = []
        self.band_n = self.n_band_examples

    def select_events(self, state: Mapping[str, torch.Tensor], maxima: torch.Tensor) -> dict[str, torch.Tensor]:
        """A state that kept its events (of :meth:`state`) in the second pass's form with the final ``maxima``:
        its token table and band selection, what :meth:`recount` over its documents would give."""
        out = dict(state)
        k, t, v = (state[key] for key in _TOK_KEYS)
        keep = v > self.token_fraction * maxima[k.long()]
        out["tok_key"], out["tok_count"] = _count_keys(
            torch.cat([state["tok_key"], _tok_key(k[keep], t[keep])]),
            torch.cat([state["tok_count"], torch.ones(int(keep.sum()), dtype=torch.long)]))
        out.update(zip(_TOK_KEYS, _no_events(3), strict=True))
        band = [state[key] for key in _BAND_KEYS]
        if self.band_floor is not None:
            keep = band[3] > self.band_floor * maxima[band[0].long()]
            band = [c[keep] for c in band]
        out.update(zip(_BAND_KEYS, _select_bands(band, maxima, self.bands, self.n_band_examples), strict=True))
        out["band_n"] = torch.tensor(self.n_band_examples)
        return out

    def settings(self) -> tuple:
        """What two states must share to be merged: the SAE's hook point and size and the pass's settings."""
        return (self.sae.hook_point, self.sae.d_sae, self.k, self.token_fraction, sorted(self.bands.items()),
                self.lo, self.hi, self.n_bins, self.n_band_examples)

    def state(self) -> dict[str, torch.Tensor]:
        """The pruned running state as CPU tensors (the keys of :data:`_STATE_KEYS`; events flattened)."""
        self._prune()
        tok = self.tok_events[0] if self.tok_events else _no_events(3)
        band = self.band_events[0] if self.band_events else _no_events(4)
        out = {name: getattr(self, name) for name in _SUMMED + ("max", "l0_counts", "top_value", "top_doc",
                                                                   "top_pos")}
        out.update(zip(_TOK_KEYS, tok, strict=True))
        out.update(zip(_BAND_KEYS, band, strict=True))
        out["tok_key"], out["tok_count"], out["band_n"] = self.tok_key, self.tok_count, torch.tensor(self.band_n)
        return out

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the running state by ``state`` (of :meth:`state` or :func:`_merge_states`)."""
        for name in _SUMMED + ("max", "l0_counts", "top_value", "top_doc", "top_pos"):
            setattr(self, name, state[name])
        self.tok_events = [tuple(state[key] for key in _TOK_KEYS)]
        self.band_events = [tuple(state[key] for key in _BAND_KEYS)]
        self.tok_key, self.tok_count, self.band_n = state["tok_key"], state["tok_count"], int(state["band_n"])

    def finish(self, n_docs: int, n_tokens: int, d_vocab: int, n_top_tokens: int) -> FeatureStats:
        d = self.sae.d_sae
        self._prune()
        top_tokens = torch.full((d, n_top_tokens), -1, dtype=torch.long)
        top_counts = torch.zeros((d, n_top_tokens), dtype=torch.long)
        above = torch.zeros(d, dtype=torch.long)
        uniq, counts = self.tok_key, self.tok_count  # the second pass's table, or empty
        if self.tok_events and len(self.tok_events[0][0]):
            k, t, _ = self.tok_events[0]
            keys, n = _count_keys(_tok_key(k, t))
            uniq, counts = (keys, n) if not len(uniq) else _count_keys(torch.cat([uniq, keys]), torch.cat([counts, n]))
        if len(uniq):
            feat, tok = (uniq >> 32).numpy(), (uniq & 0xFFFFFFFF).numpy()
            cnt = counts.numpy()
            above = torch.zeros(d, dtype=torch.long).index_add_(0, uniq >> 32, counts)
            order = np.lexsort((tok, -cnt, feat))  # by feature, then count desc, then token id asc
            feat, tok, cnt = feat[order], tok[order], cnt[order]
            start = np.searchsorted(feat, feat, side="left")
            rank = np.arange(len(feat)) - start
            sel = rank < n_top_tokens
            top_tokens[feat[sel], rank[sel]] = torch.from_numpy(tok[sel])
            top_counts[feat[sel], rank[sel]] = torch.from_numpy(cnt[sel])
        band = self.band_events[0] if self.band_events else _no_events(4)
        edges = torch.linspace(self.lo, self.hi, self.n_bins + 1, dtype=torch.float64)
        return FeatureStats(
            hook_point=self.sae.hook_point,
            d_sae=d,
            n_docs=n_docs,
            n_tokens=n_tokens,
            fire_count=self.fire_count,
            activation_sum=self.activation_sum,
            max_activation=self.max,
            l0_counts=self.l0_counts,
            hist_edges=edges,
            hist=self.hist.reshape(d, self.n_bins),
            top_value=self.top_value,
            top_doc=self.top_doc,
            top_pos=self.top_pos,
            token_fraction=self.token_fraction,
            top_tokens=top_tokens,
            top_token_counts=top_counts,
            above_count=above,
            input_sum=self.input_sum,
            bands=self.bands,
            _band_feature=band[0],
            _band_doc=band[1],
            _band_pos=band[2],
            _band_value=band[3],
            band_n=self.band_n,
        )


def corpus_feature_stats(
    model,
    saes: Sequence[SAE],
    token_rows: Sequence[Sequence[int]],
    *,
    k: int = 20,
    token_fraction: float = 0.25,
    n_top_tokens: int = 10,
    bands: Mapping[str, float] = BANDS,
    hist_range: tuple[float, float] = (-4.0, 3.0),
    hist_bins: int = 70,
    encode_floats: int = 1 << 24,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
    max_event_bytes: int | None = DEFAULT_MAX_EVENT_BYTES,
    n_band_examples: int = DEFAULT_N_BAND_EXAMPLES,
    mean_hooks: Collection[str] = (),
) -> CorpusStats:
    """Feature statistics of every SAE in ``saes`` over ``token_rows``, in one streaming pass (see the module doc).

    Under ``torch.distributed`` (a process group initialised with more than one rank, every rank calling with the
    same rows and SAEs) each rank reads the batches ``b`` with ``b % world_size == rank`` of the batches one process
    makes (:func:`saecircuits.distributed.my_batches`: every document's activations come from the batch shape one
    process uses, so no value moves across a histogram edge or a threshold); counts, sums and
    histograms are summed with ``all_reduce``, maxima reduced by ``MAX``, and the top-k and the thresholded events
    gathered as tensors and merged (:func:`merge_corpus_partials`). Every rank returns the statistics of the whole
    corpus, equal to one process's (float64 sums up to summation order).

    Args:
        model: a TransformerBridge.
        saes: SAEs of the model (any hook points; SAEs on the same hook share its read).
        token_rows: corpus documents as token lists (BOS first, as the model sees them); none may be empty.
        k: documents kept per feature in the top-k (the notebook's top examples read the top 10-100).
        token_fraction: token-count threshold as a fraction of each feature's corpus maximum (notebook 0.25).
        n_top_tokens: tokens kept per feature for the token-wise counts.
        bands: example bands as fractions of the corpus maximum (default :data:`BANDS`); ``{}`` keeps none.
        hist_range, hist_bins: log10 range and number of the activation-histogram bins (default 1e-4 .. 1e3,
            0.1 decades per bin).
        encode_floats: most feature activations encoded at once (rows of a batch are chunked to stay under it;
            the default, 64 MiB of float32, is large enough for the allocator to hand each chunk back to the system).
        max_tokens, max_batch: batch budget of the forward passes (results do not depend on it).
        progress: show a progress bar over documents.
        shard: split the documents over the ranks of the initialised process group (default: when one with more
            than one rank is initialised); ``False`` makes every rank read every document.
        max_event_bytes: memory budget of the kept token events and band candidates over all SAEs (default
            :data:`DEFAULT_MAX_EVENT_BYTES`, 256 MiB; ``None``: no budget). While they fit the pass is the one pass
            above. Past it the pass drops them, finishes its counts, maxima, top-k and histograms, then reads the
            rows a second time (same batches) with the final maxima known, collecting only the (feature, token)
            counts above ``token_fraction x max`` and ``n_band_examples`` band examples per feature and band:
            the same statistics, with memory bounded by ``d_sae x`` the distinct tokens and ``d_sae x len(bands) x
            n_band_examples`` instead of growing with the corpus. Sharded, the ranks decide together: one rank
            over its budget makes every rank read its documents again (the others' kept events give the same
            tables without a forward).
        n_band_examples: band examples per feature and band a second pass keeps (the largest ``n``
            :meth:`FeatureStats.band_examples` then answers; without a second pass every one is kept).
        mean_hooks: other hooks whose activations are summed over the counted tokens in the same forward (float64,
            :attr:`CorpusStats.hook_sums`; :meth:`CorpusStats.hook_mean` gives their means): e.g. the circuit's
            mean-ablation values (:func:`saecircuits.analysis.circuit.corpus_mean_hooks`). Reading a deeper hook
            makes the forward run to its block.

    Returns:
        :class:`CorpusStats`.

    Raises:
        ValueError: no SAE, an empty row, ``k < 1``, ``token_fraction`` outside ``[0, 1)``, a band fraction outside
            ``(0, 1)``, ``n_band_examples < 1``, a negative ``max_event_bytes``, or token ids outside the
            vocabulary. ContextLengthError: a row longer than the model's context.
    """
    from saecircuits.distributed import is_sharded, world

    rank = world()[0]
    shard = is_sharded(shard)
    partial = corpus_partial_stats(
        model, saes, token_rows, k=k, token_fraction=token_fraction, n_top_tokens=n_top_tokens,
        bands=bands, hist_range=hist_range, hist_bins=hist_bins, encode_floats=encode_floats,
        max_tokens=max_tokens, max_batch=max_batch, progress=progress if rank == 0 else False, shard=shard,
        max_event_bytes=max_event_bytes, n_band_examples=n_band_examples, mean_hooks=mean_hooks)
    if shard:
        from saecircuits.distributed import reduce

        # collective: any rank over budget -> every rank's state takes the second pass's form (merged maxima)
        if int(reduce(torch.tensor([int(partial.overflowed)]), "max", "corpus statistics")):
            maxima = [reduce(st["max"], "max", "corpus statistics") for st in partial.states]
            if partial.overflowed:
                partial.second_pass(model, token_rows, maxima)
            else:
                partial.states = [acc.select_events(st, mx)
                                  for acc, st, mx in zip(partial._accs, partial.states, maxima, strict=True)]
        partial = _all_reduce_partial(partial)
    elif partial.overflowed:
        partial.second_pass(model, token_rows, [st["max"] for st in partial.states])
    return partial.finish()


@dataclass
class CorpusPartial:
    """The mergeable state of a pass over a subset (a shard) of the corpus documents
    (:func:`corpus_partial_stats`); :func:`merge_corpus_partials` joins disjoint shards, :meth:`finish` gives the
    statistics.

    Attributes:
        n_docs: documents of the whole corpus (document indices refer to it).
        docs: how many documents this state covers.
        n_tokens: counted tokens of those documents.
        token_counts: int64 ``[d_vocab]`` counts of each token id over them.
        states: per SAE, the running state as CPU tensors (counts, sums, histogram, top-k, thresholded events).
        special_ids: the token ids left out.
        mean_hooks: the hooks whose sums the pass keeps; hook_sums: float64 sum of each over the counted tokens
            (a hook is missing until a batch was read).
    """

    n_docs: int
    docs: int
    n_tokens: int
    token_counts: torch.Tensor
    states: list[dict[str, torch.Tensor]]
    special_ids: list[int]
    n_top_tokens: int
    _accs: list[_Accumulator] = field(repr=False, default_factory=list)
    overflowed: bool = False
    _read: tuple = field(repr=False, default=())  # (document indices, max_tokens, max_batch, shard) of the pass
    mean_hooks: tuple[str, ...] = ()
    hook_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def second_pass(self, model, token_rows: Sequence[Sequence[int]], maxima: Sequence[torch.Tensor]) -> None:
        """Read this state's documents again (the same batches) with the final corpus maxima ``maxima`` (one
        float32 ``[d_sae]`` per SAE: this state's own when it covers the corpus, else the merged ones of every
        shard) and put each SAE's token table and band selection into the state (:meth:`_Accumulator.recount`).
        Needed when the pass went over ``max_event_bytes`` (``overflowed``)."""
        index, max_tokens, max_batch, shard = self._read
        if len(token_rows) != self.n_docs:
            raise ValueError(f"the state covers a corpus of {self.n_docs} documents but {len(token_rows)} rows "
                             f"were given")
        special = frozenset(self.special_ids)
        iv = interventions_for(model)
        hooks = sorted({a.sae.hook_point for a in self._accs})
        for acc, st in zip(self._accs, self.states, strict=True):
            acc.load_state(st)
            acc.tok_events, acc.band_events = [], []
            acc.tok_key, acc.tok_count = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        global_index = torch.tensor(index, dtype=torch.long)
        batches, n_read = _pass_batches(model, token_rows, index, max_tokens, max_batch, shard)
        for batch in batches:
            mask = counted_token_mask(batch.tokens, batch.positions + 1, special)
            reads = iv.read_all(batch.tokens, hooks, keep=False)
            rows = global_index[torch.tensor(batch.indices, dtype=torch.long)]
            for acc, mx in zip(self._accs, maxima, strict=True):
                acc.recount(reads[acc.sae.hook_point], batch.tokens, mask, rows, mx)
        for acc, mx in zip(self._accs, maxima, strict=True):
            acc.compact(mx, force=True)  # also sets band_n without band candidates or documents
        self.states = [acc.state() for acc in self._accs]
        self.overflowed = False

    def finish(self) -> CorpusStats:
        """The statistics of the documents covered (thresholds applied with the merged maxima).

        Raises:
            ValueError: the pass went over its event budget and :meth:`second_pass` has not run.
        """
        if self.overflowed:
            raise ValueError("this corpus pass went over max_event_bytes: run second_pass(model, token_rows, "
                             "maxima) or merge_corpus_partials(parts, model=..., token_rows=...) first")
        features = []
        for acc, st in zip(self._accs, self.states, strict=True):
            acc.load_state(st)
            features.append(acc.finish(self.n_docs, self.n_tokens, len(self.token_counts), self.n_top_tokens))
        return CorpusStats(self.n_docs, self.n_tokens, self.token_counts, features, self.special_ids,
                           dict(self.hook_sums))


def corpus_partial_stats(
    model,
    saes: Sequence[SAE],
    token_rows: Sequence[Sequence[int]],
    *,
    docs: Iterable[int] | None = None,
    k: int = 20,
    token_fraction: float = 0.25,
    n_top_tokens: int = 10,
    bands: Mapping[str, float] = BANDS,
    hist_range: tuple[float, float] = (-4.0, 3.0),
    hist_bins: int = 70,
    encode_floats: int = 1 << 24,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool = False,
    max_event_bytes: int | None = DEFAULT_MAX_EVENT_BYTES,
    n_band_examples: int = DEFAULT_N_BAND_EXAMPLES,
    mean_hooks: Collection[str] = (),
) -> CorpusPartial:
    """The pass of :func:`corpus_feature_stats` over the documents ``docs`` (indices into ``token_rows``; default
    all), as a mergeable :class:`CorpusPartial` (arguments as there).

    ``shard``: only this rank's share of the batches one process makes of ``docs``
    (:func:`saecircuits.distributed.my_batches`), so every document is read in the batch one process reads it in.

    When the kept events pass ``max_event_bytes`` the state stops keeping them and comes back ``overflowed``:
    :meth:`CorpusPartial.second_pass` with the final maxima (or :func:`merge_corpus_partials` given the model and
    rows) completes it.

    Raises:
        ValueError: as :func:`corpus_feature_stats`, or a document index out of range or repeated.
    """
    if not saes:
        raise ValueError("corpus_feature_stats needs at least one SAE")
    if k < 1 or n_top_tokens < 1 or hist_bins < 1 or not hist_range[0] < hist_range[1]:
        raise ValueError("need k >= 1, n_top_tokens >= 1, hist_bins >= 1 and hist_range low < high")
    if not 0 <= token_fraction < 1:
        raise ValueError(f"token_fraction must be in [0, 1), got {token_fraction}")
    if any(not 0 < f < 1 for f in bands.values()):
        raise ValueError(f"band fractions must lie in (0, 1), got {dict(bands)}")
    if any(len(r) == 0 for r in token_rows):
        raise ValueError("corpus rows must be non-empty token lists (drop empty documents first)")
    if n_band_examples < 1 or (max_event_bytes is not None and max_event_bytes < 0):
        raise ValueError(f"need n_band_examples >= 1 and max_event_bytes >= 0 (or None), got {n_band_examples} "
                         f"and {max_event_bytes}")
    index = list(range(len(token_rows))) if docs is None else [int(i) for i in docs]
    if any(not 0 <= i < len(token_rows) for i in index) or len(set(index)) != len(index):
        raise ValueError(f"docs must be distinct document indices in 0..{len(token_rows) - 1}")
    d_vocab = int(model.cfg.d_vocab)
    special = special_ids_of(model)
    iv = interventions_for(model)
    mean_hooks = tuple(sorted(set(mean_hooks)))
    hooks = sorted({s.hook_point for s in saes} | set(mean_hooks))
    hook_sums: dict[str, torch.Tensor] = {}
    accs = [
        _Accumulator(s, k=k, token_fraction=token_fraction, bands=bands, hist_range=hist_range,
                     hist_bins=hist_bins, encode_floats=encode_floats, n_band_examples=n_band_examples)
        for s in saes
    ]
    token_counts = torch.zeros(d_vocab, dtype=torch.long)
    n_tokens = 0
    global_index = torch.tensor(index, dtype=torch.long)
    batches, n_read = _pass_batches(model, token_rows, index, max_tokens, max_batch, shard)
    overflowed = False
    desc = f"corpus statistics of {len(saes)} SAE(s) (documents)"
    for batch in with_progress(iter(batches), n_read, desc, progress):
        mask = counted_token_mask(batch.tokens, batch.positions + 1, special)
        ids = batch.tokens[mask].cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
            raise ValueError(f"token ids must lie in 0..{d_vocab - 1}; these rows are from another tokenizer")
        token_counts += torch.bincount(ids, minlength=d_vocab)
        n_tokens += int(mask.sum())
        # One forward for every hook point, not kept: kept, the corpus batches' activations ([b, T, d_mlp] per hook)
        # filled the shared 512 MiB read cache, never evicted (at the reference shape 512 MiB resident from the pass
        # on), and the prompts' clean passes of every later analysis no longer fitted in it.
        reads = iv.read_all(batch.tokens, hooks, keep=False)
        rows = global_index[torch.tensor(batch.indices, dtype=torch.long)]  # document indices of the corpus
        for acc in accs:
            acc.update(reads[acc.sae.hook_point], batch.tokens, mask, rows)
        for h in mean_hooks:
            part = _masked_sum(reads[h], mask, encode_floats)
            hook_sums[h] = hook_sums[h] + part if h in hook_sums else part
        if (not overflowed and max_event_bytes is not None
                and sum(acc.event_bytes() for acc in accs) > max_event_bytes):
            overflowed = True  # every SAE stops keeping events: one second pass serves them all
            for acc in accs:
                acc.drop_events()
    return CorpusPartial(len(token_rows), n_read, n_tokens, token_counts, [acc.state() for acc in accs],
                         sorted(special), n_top_tokens, accs, overflowed, (index, max_tokens, max_batch, shard),
                         mean_hooks, hook_sums)


def _pass_batches(model, token_rows, index: list[int], max_tokens: int, max_batch: int, shard: bool):
    """The batches of documents ``index`` a pass reads (this rank's share when ``shard``) and their documents."""
    batches = row_batches([token_rows[i] for i in index], pad_id_of(model), max_tokens=max_tokens,
                          max_batch=max_batch, device=_device_of(model), n_ctx=n_ctx_of(model),
                          what="corpus document")
    if not shard:
        return batches, len(index)
    from saecircuits.distributed import my_batches

    batches = list(my_batches(batches, True))
    return batches, sum(len(b.indices) for b in batches)


def merge_corpus_partials(parts: Sequence[CorpusPartial], *, model=None,
                          token_rows: Sequence[Sequence[int]] | None = None) -> CorpusPartial:
    """The state of one pass over the union of disjoint shards (exact: see :func:`_merge_states`; ties in the
    top-k broken by the lower document index as in one pass, so the result equals the single-process pass).

    A part that went over its event budget (``overflowed``) reads its documents again with the merged maxima
    (:meth:`CorpusPartial.second_pass`), which needs ``model`` and ``token_rows``.

    Raises:
        ValueError: no part, parts of different corpora, SAEs or settings, or an overflowed part without
            ``model`` and ``token_rows``.
    """
    if not parts:
        raise ValueError("merge_corpus_partials needs at least one partial state")
    first = parts[0]
    for p in parts[1:]:
        same_corpus = (p.n_docs, p.n_top_tokens, len(p.token_counts)) == (first.n_docs, first.n_top_tokens,
                                                                          len(first.token_counts))
        same_settings = [a.settings() for a in p._accs] == [a.settings() for a in first._accs]
        if not (same_corpus and same_settings and p.mean_hooks == first.mean_hooks):
            raise ValueError("partial states of different corpora, SAEs or settings cannot be merged")
    if sum(p.docs for p in parts) > first.n_docs:
        raise ValueError("the partial states cover more documents than the corpus has: shards must be disjoint")
    if any(p.overflowed for p in parts):
        if model is None or token_rows is None:
            raise ValueError("a partial state went over max_event_bytes: pass model= and token_rows= so it can "
                             "read its documents again with the merged maxima")
        maxima = [torch.stack([p.states[j]["max"] for p in parts]).amax(0) for j in range(len(first._accs))]
        for p in parts:
            if p.overflowed:
                p.second_pass(model, token_rows, maxima)
    states = [_merge_states([p.states[j] for p in parts], acc) for j, acc in enumerate(first._accs)]
    hook_sums = {h: torch.stack([p.hook_sums[h] for p in parts if h in p.hook_sums]).sum(0)
                 for h in first.mean_hooks if any(h in p.hook_sums for p in parts)}
    return CorpusPartial(first.n_docs, sum(p.docs for p in parts), sum(p.n_tokens for p in parts),
                         torch.stack([p.token_counts for p in parts]).sum(0), states, first.special_ids,
                         first.n_top_tokens, first._accs, mean_hooks=first.mean_hooks, hook_sums=hook_sums)


def _all_reduce_partial(partial: CorpusPartial) -> CorpusPartial:
    """Every rank's :class:`CorpusPartial` -> the merged one, on every rank, by tensor collectives only
    (``all_reduce`` for counts, sums and maxima; ``all_gather`` of padded tensors for the top-k and the events).
    NCCL process groups communicate through the current CUDA device, others (gloo) through the CPU."""
    from saecircuits.distributed import broadcast_json, gather_parts, reduce, world

    size = world()[1]

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        return [p.cpu() for p in gather_parts(t, "corpus statistics")]

    states = []
    for acc, st in zip(partial._accs, partial.states, strict=True):
        merged = {name: reduce(st[name], what="corpus statistics") for name in _SUMMED}
        merged["max"] = reduce(st["max"], "max", "corpus statistics")
        n_l0 = int(reduce(torch.tensor([len(st["l0_counts"])]), "max", "corpus statistics"))
        merged["l0_counts"] = reduce(_pad_sum([st["l0_counts"], torch.zeros(n_l0, dtype=torch.long)]),
                                     what="corpus statistics")
        # prune by the merged maximum before sending (the merge prunes again; this only saves traffic)
        keep = st["tok_value"] > acc.token_fraction * merged["max"][st["tok_feature"].long()]
        local = {key: st[key][keep] for key in _TOK_KEYS}
        keep = (st["band_value"] > acc.band_floor * merged["max"][st["band_feature"].long()]
                if acc.band_floor is not None else torch.ones(len(st["band_value"]), dtype=torch.bool))
        local.update((key, st[key][keep]) for key in _BAND_KEYS)
        local.update((name, st[name]) for name in ("top_value", "top_doc", "top_pos") + _TABLE_KEYS)
        gathered = {key: gather(t) for key, t in local.items()}
        per_rank = [{key: g[r] for key, g in gathered.items()} | {"band_n": st["band_n"]} for r in range(size)]
        _merge_selections(merged, per_rank, acc)
        states.append(merged)
    n_tokens = int(reduce(torch.tensor([partial.n_tokens]), what="corpus statistics"))
    docs = int(reduce(torch.tensor([partial.docs]), what="corpus statistics"))
    # the hook sums' shapes from rank 0 (it reads the first batch, so it has every hook another rank has); a rank
    # without a batch adds zeros
    shapes = broadcast_json({h: list(t.shape) for h, t in partial.hook_sums.items()}, "corpus hook sums' shapes")
    hook_sums = {h: reduce(partial.hook_sums.get(h, torch.zeros(shapes[h], dtype=torch.float64)),
                           what="corpus hook sums") for h in sorted(shapes)}
    return CorpusPartial(partial.n_docs, docs, n_tokens, reduce(partial.token_counts, what="corpus statistics"), states,
                         partial.special_ids, partial.n_top_tokens, partial._accs, mean_hooks=partial.mean_hooks,
                         hook_sums=hook_sums)


def top_examples_from_stats(
    model,
    sae: SAE,
    token_rows: Sequence[Sequence[int]],
    fs: FeatureStats,
    features: Sequence[int],
    *,
    k: int,
    window_before: int = 10,
    window_after: int = 5,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
):
    """What :func:`saecircuits.analysis.corpus.examples.top_activating_examples` returns for ``features``, read
    from a corpus pass instead of a pass of its own: ``fs`` (this SAE's statistics over the same ``token_rows``)
    holds the same top-k, the documents with the largest per-document maxima over the same counted positions with
    ties to the lower document, so the examples are the same documents, positions and maxima; only the windows need
    a forward, over the chosen documents (:func:`example_windows`).

    Args:
        fs: the SAE's :class:`FeatureStats` from :func:`corpus_feature_stats` over ``token_rows``.
        features: feature indices; k: examples per feature (at most the pass's ``k``).

    Returns:
        ``{feature: [Example, ...]}`` in decreasing ``max_activation`` (the pass's value); features that never fire
        get ``[]``.

    Raises:
        ValueError: ``k`` above the documents the pass kept per feature, or ``fs`` from another number of rows.
    """
    if not 1 <= k <= fs.top_doc.shape[1]:
        raise ValueError(f"k must be in 1..{fs.top_doc.shape[1]} (the documents the corpus pass kept per feature), "
                         f"got {k}")
    if fs.n_docs != len(token_rows):
        raise ValueError(f"the corpus statistics cover {fs.n_docs} documents but {len(token_rows)} rows were given")
    tops = {int(f): fs.top_examples(int(f), k) for f in features}
    picks = [(f, d, p) for f, top in tops.items() for d, p, _ in top]
    windows = iter(example_windows(model, sae, token_rows, picks, window_before=window_before,
                                   window_after=window_after, max_tokens=max_tokens, max_batch=max_batch)
                   if picks else [])
    out = {}
    for f, top in tops.items():
        out[f] = []
        for _, _, value in top:
            ex = next(windows)
            ex.max_activation = value  # the pass's maximum, which chose the document (as top_activating_examples)
            out[f].append(ex)
    return out


def example_windows(
    model,
    sae: SAE,
    token_rows: Sequence[Sequence[int]],
    picks: Sequence[tuple[int, int, int]],
    *,
    window_before: int = 10,
    window_after: int = 5,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
):
    """Token windows around chosen (feature, document, position) triples, e.g. from
    :meth:`FeatureStats.top_examples` or :meth:`FeatureStats.band_examples`, with the feature's activation per token.

    One forward over the distinct documents (stops after the SAE's block). Tokens are shown as the package shows
    every token (``models.tokens.token_pieces`` over the whole document) and special positions get activation NaN,
    as in :func:`saecircuits.analysis.corpus.examples.top_activating_examples`.

    Args:
        picks: ``(feature, doc, position)`` triples.

    Returns:
        list of :class:`saecircuits.analysis.corpus.examples.Example` in the order of ``picks``.

    Raises:
        IndexError: a document or position out of range.
    """
    from saecircuits.analysis.corpus.examples import Example

    picks = [(int(k), int(d), int(p)) for k, d, p in picks]
    if any(not 0 <= d < len(token_rows) or not 0 <= p < len(token_rows[d]) for _, d, p in picks):
        raise IndexError("a picked document or position is out of range of the corpus rows")
    docs = sorted({d for _, d, _ in picks})
    feats = sorted({k for k, _, _ in picks})
    col = {k: j for j, k in enumerate(feats)}
    # only the windows' positions are encoded (the corpus pass encoded every position already; encoding dominates)
    shown = {d: torch.zeros(len(token_rows[d]), dtype=torch.bool) for d in docs}
    for _, d, p in picks:
        shown[d][max(0, p - window_before) : p + window_after + 1] = True
    special = special_ids_of(model)
    iv = interventions_for(model)
    acts: dict[int, torch.Tensor] = {}
    rows = [token_rows[d] for d in docs]
    for batch in row_batches(rows, pad_id_of(model), max_tokens=max_tokens, max_batch=max_batch,
                             device=_device_of(model), n_ctx=n_ctx_of(model), what="corpus document"):
        lengths = [int(n) + 1 for n in batch.positions]
        want = counted_token_mask(batch.tokens, batch.positions + 1, special).cpu()
        for r, i in enumerate(batch.indices):
            want[r, : lengths[r]] &= shown[docs[i]]
        x = iv.read_all(batch.tokens, [sae.hook_point])[sae.hook_point]
        a = torch.full((*want.shape, len(feats)), float("nan"))  # NaN: special, padding or outside every window
        with torch.no_grad():
            a[want] = sae.encode_features(x[want.to(x.device)], torch.tensor(feats)).float().cpu()
        for r, i in enumerate(batch.indices):
            acts[docs[i]] = a[r, : lengths[r]]
    pieces = {d: token_pieces(model.tokenizer, token_rows[d]) for d in docs}  # whole documents
    out = []
    for k, d, p in picks:
        start, stop = max(0, p - window_before), min(len(token_rows[d]), p + window_after + 1)
        window = pieces[d][start:stop]
        out.append(
            Example(
                feature=k,
                doc_index=d,
                max_position=p,
                max_activation=float(acts[d][p, col[k]]),
                window_start=start,
                tokens=[q.text for q in window],
                activations=acts[d][start:stop, col[k]].tolist(),
                token_kinds=[q.kind for q in window],
            )
        )
    return out
