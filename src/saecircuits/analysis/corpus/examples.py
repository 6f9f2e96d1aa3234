"""Top activating examples per SAE feature over a corpus, by a streaming top-k (the reference notebook's
top examples).

For every document (a token row) and feature we take the feature's maximum over the document's real positions,
excluding every special-token position (BOS/EOS/PAD anywhere in the row, ``models.tokens.special_token_mask``) and
padding, and keep per feature the ``k`` documents with the largest positive maxima in a running ``[n_features, k]``
buffer, merged batch by batch. No dense ``[n_docs, d_sae]`` array is stored. A second, small pass over the chosen
documents reads the feature's activations in a window around the maximum. Token strings come from
``models.tokens.token_pieces`` over the whole document, so a character split over byte tokens is shown once and
leading spaces are kept.

Departures from the reference notebook (on purpose): special-token positions are excluded (the notebook kept BOS);
the maxima are streamed instead of a 4 GB pickle keyed by SAE name; only documents with a positive maximum are
returned.
Ties between equal maxima are broken by the lower document index, so results do not depend on batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

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

__all__ = ["Example", "top_activating_examples", "feature_activations_over_rows"]


@dataclass
class Example:
    """One top-activating example of a feature.

    Attributes:
        feature: feature index.
        doc_index: index of the document in the given rows.
        max_position: absolute token index of the maximum in the document.
        max_activation: the feature's activation there.
        window_start: absolute token index of ``tokens[0]``.
        tokens: token strings of the window ``[window_start, window_start + len(tokens))``
            (``models.tokens.token_pieces``).
        activations: the feature's activation at each window token (NaN at a special-token position: not data).
        token_kinds: per window token, ``"text"``, ``"continuation"`` or ``"special"`` (``models.tokens.TOKEN_KINDS``).
    """

    feature: int
    doc_index: int
    max_position: int
    max_activation: float
    window_start: int
    tokens: list[str]
    activations: list[float]
    token_kinds: list[str] = field(default_factory=list)


DEFAULT_N_EXAMPLES = 5
"""Top activating examples per feature, in the library and in the pipeline (``RunConfig.n_examples``)."""


def _valid_mask(tokens: torch.Tensor, lengths: torch.Tensor, special: frozenset[int]) -> torch.Tensor:
    """Real, non-special positions ``[b, pos]``: inside the row's length and not BOS/EOS/PAD (anywhere)."""
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
    return mask & ~special_token_mask(tokens, special)


def feature_activations_over_rows(
    model, sae: SAE, tokens: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Activations of ``features`` at every position: ``tokens [b, pos]`` -> float32 ``[b, pos, n_features]``.

    The forward stops after the SAE's block and never unembeds."""
    x = interventions_for(model).read_all(tokens, [sae.hook_point])[sae.hook_point]
    with torch.no_grad():
        return sae.encode_features(x, features).float()


def _keep_top(val: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The ``k`` best candidates per row (``[F, n]`` each) by (value desc, doc asc); doc -1 (no candidate) last."""
    by_doc = torch.argsort(torch.where(doc < 0, torch.iinfo(torch.long).max, doc), dim=1, stable=True)
    val, doc, pos = (t.gather(1, by_doc) for t in (val, doc, pos))
    by_val = torch.argsort(val, dim=1, descending=True, stable=True)[:, :k]
    return tuple(t.gather(1, by_val) for t in (val, doc, pos))


def top_activating_examples(
    model,
    sae: SAE,
    token_rows: Sequence[Sequence[int]],
    features: Sequence[int] | None = None,
    *,
    k: int = DEFAULT_N_EXAMPLES,
    window_before: int = 10,
    window_after: int = 5,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    shard: bool | None = None,
) -> dict[int, list[Example]]:
    """The ``k`` documents with the largest per-document maximum of each feature, with a token window around it.

    Args:
        model: a TransformerBridge (its tokenizer gives the token strings and the special-token ids).
        sae: any :class:`SAE`.
        token_rows: corpus documents as token lists (BOS first, as the model sees them), each at most the model's
            context long (``models.tokens.encode_documents(..., max_len=model.cfg.n_ctx)``).
        features: feature indices (default: all ``d_sae``).
        k: examples per feature.
        window_before, window_after: tokens shown before / after the maximum (clipped to the document).
        max_tokens, max_batch: batch budget (results do not depend on it).
        progress: show a progress bar over documents.
        shard: split the first pass's document batches over the ranks of a sharded run
            (:mod:`saecircuits.distributed`; default: when a process group with more than one rank is initialised):
            every rank's top ``k`` are gathered and merged by the same (value desc, document asc) order, which
            gives one process's top ``k``; the windows are read on every rank.

    Returns:
        ``{feature: [Example, ...]}`` in decreasing ``max_activation``; features that never fire get ``[]``.

    Raises:
        ValueError: ``k < 1`` or a feature index out of range.
        ContextLengthError: a row is longer than the model's context.
    """
    feats = torch.arange(sae.d_sae) if features is None else torch.as_tensor(list(features), dtype=torch.long)
    if k < 1 or (len(feats) and (int(feats.min()) < 0 or int(feats.max()) >= sae.d_sae)):
        raise ValueError(f"need k >= 1 and feature indices in 0..{sae.d_sae - 1}")
    n_f = len(feats)
    device = _device_of(model)
    special = special_token_ids(getattr(model, "tokenizer", None))
    n_ctx = n_ctx_of(model)
    best_val = torch.full((n_f, k), -float("inf"))
    best_doc = torch.full((n_f, k), -1, dtype=torch.long)
    best_pos = torch.zeros((n_f, k), dtype=torch.long)
    from saecircuits.distributed import gather_rows, is_sharded, is_writer, my_batches

    sharded = is_sharded(shard)
    batches = list(my_batches(row_batches(
        token_rows, pad_id_of(model), max_tokens=max_tokens, max_batch=max_batch, device=device, n_ctx=n_ctx
    ), sharded))
    for batch in with_progress(iter(batches), sum(len(b.indices) for b in batches),
                               f"top examples at {sae.hook_point} (documents)", progress if is_writer() else False):
        acts = feature_activations_over_rows(model, sae, batch.tokens, feats)  # [b, pos, F]
        mask = _valid_mask(batch.tokens, batch.positions + 1, special).to(acts.device)
        acts = acts.masked_fill(~mask[..., None], -float("inf"))
        doc_max, doc_pos = acts.max(dim=1)  # [b, F]
        docs = torch.tensor(batch.indices)
        cand_val = torch.cat([best_val, doc_max.T.cpu()], dim=1)  # [F, k + b]
        cand_doc = torch.cat([best_doc, docs[None].expand(n_f, -1)], dim=1)
        cand_pos = torch.cat([best_pos, doc_pos.T.cpu()], dim=1)
        best_val, best_doc, best_pos = _keep_top(cand_val, cand_doc, cand_pos, k)
    if sharded:  # every rank's top k: the top k of their union is one process's (one total order)
        cand_val, cand_doc, cand_pos = (gather_rows(t.T.contiguous(), f"top examples at {sae.hook_point}").T
                                        for t in (best_val, best_doc, best_pos))  # [F, world * k]
        best_val, best_doc, best_pos = _keep_top(cand_val, cand_doc, cand_pos, k)

    # second pass: windows around the maxima, one forward over the distinct chosen documents
    chosen = sorted({int(d) for d, v in zip(best_doc.flatten(), best_val.flatten(), strict=True) if v > 0})
    doc_acts: dict[int, torch.Tensor] = {}
    if chosen:
        rows = [token_rows[d] for d in chosen]
        for batch in row_batches(
            rows, pad_id_of(model), max_tokens=max_tokens, max_batch=max_batch, device=device, n_ctx=n_ctx
        ):
            acts = feature_activations_over_rows(model, sae, batch.tokens, feats).cpu()
            for r, i in enumerate(batch.indices):
                doc_acts[chosen[i]] = acts[r, : int(batch.positions[r]) + 1]
    tok = model.tokenizer
    pieces = {d: token_pieces(tok, token_rows[d]) for d in chosen}  # whole documents: characters are never cut
    result: dict[int, list[Example]] = {}
    for j, feature in enumerate(feats.tolist()):
        examples = []
        for slot in range(k):
            value = float(best_val[j, slot])
            if not value > 0:
                break
            doc, pos = int(best_doc[j, slot]), int(best_pos[j, slot])
            row = list(token_rows[doc])
            start, stop = max(0, pos - window_before), min(len(row), pos + window_after + 1)
            window_acts = doc_acts[doc][start:stop, j].clone()
            window_acts[special_token_mask(torch.tensor(row[start:stop]), special)] = float("nan")
            window = pieces[doc][start:stop]
            examples.append(
                Example(
                    feature=feature,
                    doc_index=doc,
                    max_position=pos,
                    max_activation=value,
                    window_start=start,
                    tokens=[p.text for p in window],
                    activations=window_acts.tolist(),
                    token_kinds=[p.kind for p in window],
                )
            )
        result[feature] = examples
    return result
