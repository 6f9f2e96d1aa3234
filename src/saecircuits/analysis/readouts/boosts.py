"""Which tokens an SAE feature promotes: prompt-based log-prob boosts, weight-based logit
boosts, and the common-token mask both use (the reference notebook's three token-boost steps).

- :func:`common_tokens`: a token is common when it occurs more than ``min_count`` times in a corpus. Departure from
  the notebook: special tokens (BOS/EOS/PAD, anywhere in a row) are not counted (the notebook counted
  the leading BOS), so they are never "common" and never listed.
- :func:`prompt_logprob_boosts`: on the prompts where the feature is active at P (first ``max_prompts``, the
  notebook's 100), the log-probs at P are averaged over prompts clean and with the feature ablated residual-
  preservingly at P (``x - f_k(x) W_dec[k]``, SAE error kept); ``boosts = mean clean - mean ablated`` (nats). As
  in the notebook, log-probs (not probabilities) are averaged and a token's boost is set to 0 where the
  averaged clean log-prob is below ``min_logprob`` or the token is rare. Top lists keep only strictly positive
  (boosted) / strictly negative (deboosted) values (the notebook kept any non-zero value in its top-15).
- :func:`weight_logit_boosts`: ``W_dec[k] @ W_out[L]`` through the final norm's centring and weight, then ``W_U``
  ``[d_vocab]`` (logits per unit activation; no final-norm scale, no activation size, as in the notebook; see ``scaled_dla.py``
  for both). The notebook's ``W_dec[k] @ W_out[L] @ W_U`` assumed ``fold_ln``; applying the norm's weight explicitly
  gives the same values under every weight-processing switch (up to a per-feature constant with ``center_unembed``).
  Rare tokens are set to 0 as in the notebook and left out of the top/bottom lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saecircuits.analysis.ablations.feature_effects import activations_or_compute, features_ablation_edit
from saecircuits.analysis.ablations.modes import baseline_edits, check_mode
from saecircuits.analysis.readouts.error_dla import mlp_post_layer
from saecircuits.display import NotebookDisplay
from saecircuits.models import tokens as _tokens
from saecircuits.models.hooks import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, task_batches
from saecircuits.models.interventions import interventions_for
from saecircuits.models.norms import readout_of, site_post_norm
from saecircuits.saes.base import SAE
from saecircuits.tasks.base import Task

__all__ = [
    "TokenValue",
    "PromptBoosts",
    "WeightBoosts",
    "common_tokens",
    "common_from_counts",
    "prompt_logprob_boosts",
    "weight_logit_boosts",
    "token_string",
]


@dataclass(frozen=True)
class TokenValue:
    """A token id, its display string (``models.tokens.token_string``) and a value (nats or logits, as the producer
    says)."""

    token_id: int
    token: str
    value: float


def token_string(model, token_id: int) -> str:
    """One token as shown to people, leading space kept (``models.tokens.token_string`` of the model's tokenizer;
    ``str(id)`` when the model has no tokenizer)."""
    return _tokens.token_string(getattr(model, "tokenizer", None), token_id)


def common_from_counts(counts: torch.Tensor, min_count: int = 100) -> torch.Tensor:
    """The common-token rule on token counts ``[d_vocab]``: bool ``[d_vocab]``, True where ``count > min_count``
    (the notebook's rule with 100; the corpus statistics pass, ``analysis.corpus_stats``, counts tokens too)."""
    return counts > min_count


def common_tokens(
    model, token_rows: Sequence[Sequence[int]], min_count: int = 100, *, exclude_bos: bool = True
) -> torch.Tensor:
    """Tokens occurring more than ``min_count`` times in ``token_rows`` (the notebook's common tokens used 100).

    Args:
        model: anything with ``cfg.d_vocab`` (and a tokenizer for the special-token ids).
        token_rows: corpus rows of token ids.
        min_count: a token is common when its count is strictly greater.
        exclude_bos: do not count special tokens (BOS/EOS/PAD anywhere in a row; ``models.tokens.special_token_ids``),
            a departure from the notebook, which counted the leading BOS.

    Returns:
        bool ``[d_vocab]`` on CPU.

    Raises:
        ValueError: a token id outside ``0..d_vocab-1``.
    """
    d_vocab = int(model.cfg.d_vocab)
    special = _tokens.special_token_ids(getattr(model, "tokenizer", None)) if exclude_bos else frozenset()
    t = torch.tensor([int(i) for row in token_rows for i in row], dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= d_vocab):
        raise ValueError(f"token ids must lie in 0..{d_vocab - 1}; these rows are from another tokenizer")
    t = t[~_tokens.special_token_mask(t, special)]
    return common_from_counts(torch.bincount(t, minlength=d_vocab)[:d_vocab], min_count)


def _check_mask(mask: torch.Tensor | None, d_vocab: int) -> torch.Tensor:
    if mask is None:
        return torch.ones(d_vocab, dtype=torch.bool)
    if mask.dtype != torch.bool or tuple(mask.shape) != (d_vocab,):
        raise ValueError(
            f"common_tokens must be a bool mask of shape [d_vocab] = [{d_vocab}] (see common_tokens())"
        )
    return mask.cpu()


def _top(model, values: torch.Tensor, eligible: torch.Tensor, n: int, largest: bool) -> list[TokenValue]:
    v = values.clone()
    v[~eligible] = -float("inf") if largest else float("inf")
    vals, ids = torch.topk(v, min(n, int(eligible.sum())), largest=largest)
    return [TokenValue(int(i), token_string(model, int(i)), float(x)) for x, i in zip(vals, ids, strict=True)]


@dataclass
class PromptBoosts(NotebookDisplay):
    """Prompt-based log-prob boosts of one feature (the reference notebook's, over prompts where it is active).

    Attributes:
        feature: k.
        prompt_indices: task indices used (active at P, first ``max_prompts``).
        clean_logprob, ablated_logprob: float32 ``[d_vocab]`` log-probs at P averaged over those prompts (nats).
        boosts: ``[d_vocab]`` ``clean - ablated`` (nats), 0 where masked.
        masked: bool ``[d_vocab]`` True where the boost was zeroed (rare token or clean mean log-prob < min_logprob).
        boosted, deboosted: the top tokens with a strictly positive / negative boost, largest magnitude first.
        answer_logprob_clean, answer_logprob_ablated: mean over the prompts of each prompt's answer log-prob (nats).
    """

    feature: int
    prompt_indices: list[int]
    clean_logprob: torch.Tensor
    ablated_logprob: torch.Tensor
    boosts: torch.Tensor
    masked: torch.Tensor
    boosted: list[TokenValue]
    deboosted: list[TokenValue]
    answer_logprob_clean: float
    answer_logprob_ablated: float

    def display_title(self) -> str:
        return (f"Feature {self.feature}: prompt-based log-prob boosts over {len(self.prompt_indices)} prompts "
                "(clean - ablated, nats)")

    def to_pandas(self):
        """The boosted then the deboosted tokens: ``direction``, ``token``, ``token_id``, ``value`` (nats)."""
        import pandas as pd

        return pd.DataFrame([{"direction": d, "token": t.token, "token_id": t.token_id, "value": t.value}
                             for d, items in (("boosted", self.boosted), ("deboosted", self.deboosted))
                             for t in items])

    def figure(self):
        """Bars of the boosted and deboosted tokens."""
        from saecircuits.display import bar_figure, token_label

        items = list(self.boosted) + list(reversed(self.deboosted))
        return bar_figure([token_label(t.token, t.token_id) for t in items], [t.value for t in items],
                          title=self.display_title(), yaxis="log-prob boost (nats)", color="#2ca02c")


def prompt_logprob_boosts(
    model,
    sae: SAE,
    task: Task,
    feature: int,
    *,
    common_tokens: torch.Tensor | None = None,
    min_logprob: float = -9.0,
    top: int = 15,
    threshold: float = 0.0,
    max_prompts: int | None = 100,
    acts: torch.Tensor | None = None,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> PromptBoosts:
    """Mean log-prob change at P when feature ``feature`` is ablated, on the prompts where it is active.

    Args:
        model, sae, task: any SAE hook point works (the ablation is at ``sae.hook_point``).
        feature: k.
        common_tokens: bool ``[d_vocab]`` from :func:`common_tokens` (``None``: every token counts as common).
        min_logprob: boosts of tokens whose averaged clean log-prob is below this are zeroed (nats; notebook -9).
        top: length of each top list (notebook 15).
        threshold: activity threshold at P (strict).
        max_prompts: at most this many active prompts, first in task order (notebook 100); ``None`` = all.
        acts: precomputed ``feature_activations`` ``[n_prompts, d_sae]``.
        mode: ablation mode (:mod:`saecircuits.analysis.ablations.modes`); with ``"clean_effect"`` the "clean" side
            is the SAE-spliced run.
        max_tokens, max_batch: batch budget.

    Returns:
        :class:`PromptBoosts`; with no active prompt the vectors are NaN and the lists empty.

    Raises:
        IndexError: ``feature`` out of range. ValueError: bad ``common_tokens`` or ``acts`` shape, unknown ``mode``.
    """
    check_mode(mode)
    k = int(feature)
    if not 0 <= k < sae.d_sae:
        raise IndexError(f"feature {k} out of range 0..{sae.d_sae - 1}")
    d_vocab = int(model.cfg.d_vocab)
    mask = _check_mask(common_tokens, d_vocab)
    acts = activations_or_compute(model, sae, task, acts, max_tokens=max_tokens, max_batch=max_batch)
    prompts = acts.active_prompts(k, threshold)[:max_prompts]
    if not prompts:
        nan = torch.full((d_vocab,), float("nan"))
        return PromptBoosts(
            k,
            [],
            nan,
            nan.clone(),
            torch.zeros(d_vocab),
            torch.ones(d_vocab, dtype=torch.bool),
            [],
            [],
            float("nan"),
            float("nan"),
        )
    sub = task.subset(prompts)
    clean_sum = torch.zeros(d_vocab, dtype=torch.float64)
    abl_sum = torch.zeros(d_vocab, dtype=torch.float64)
    ans_clean = ans_abl = 0.0
    edit = features_ablation_edit(sae, [k], mode)
    iv = interventions_for(model)
    with torch.no_grad():
        for batch in task_batches(model, sub, max_tokens=max_tokens, max_batch=max_batch):
            run = iv.run_paired(iv.clean(batch), [edit], base=baseline_edits(sae, mode))  # one path for both
            clean, abl = run.base_logits, run.logits[:, 0]
            rows = torch.arange(len(batch.indices), device=clean.device)
            ans = batch.answer_ids.to(clean.device)
            lp_c, lp_a = clean.float().log_softmax(-1), abl.float().log_softmax(-1)  # bf16 logits: fp32 sums
            clean_sum += lp_c.double().sum(0).cpu()
            abl_sum += lp_a.double().sum(0).cpu()
            ans_clean += float(lp_c[rows, ans].double().sum())
            ans_abl += float(lp_a[rows, ans].double().sum())
    n = len(prompts)
    clean_lp, abl_lp = (clean_sum / n).float(), (abl_sum / n).float()
    masked = (clean_lp < min_logprob) | ~mask
    boosts = (clean_lp - abl_lp).masked_fill(masked, 0.0)
    return PromptBoosts(
        feature=k,
        prompt_indices=prompts,
        clean_logprob=clean_lp,
        ablated_logprob=abl_lp,
        boosts=boosts,
        masked=masked,
        boosted=_top(model, boosts, boosts > 0, top, largest=True),
        deboosted=_top(model, boosts, boosts < 0, top, largest=False),
        answer_logprob_clean=ans_clean / n,
        answer_logprob_ablated=ans_abl / n,
    )


@dataclass
class WeightBoosts(NotebookDisplay):
    """Weight-based logit boosts of one feature (its decoder direction read through the unembedding, as the notebook).

    Attributes:
        feature: k.
        boosts: float32 ``[d_vocab]`` ``W_dec[k] @ W_out[L]`` read out through the final norm's centring and weight
            and ``W_U`` (logits per unit activation), 0 on rare tokens.
        top, bottom: the ``top`` largest / smallest boosts among common tokens.
    """

    feature: int
    boosts: torch.Tensor
    top: list[TokenValue]
    bottom: list[TokenValue]

    def display_title(self) -> str:
        return f"Feature {self.feature}: weight-based logit boosts (logits per unit activation)"

    def to_pandas(self):
        """The top then the bottom tokens: ``direction``, ``token``, ``token_id``, ``value`` (logits)."""
        import pandas as pd

        return pd.DataFrame([{"direction": d, "token": t.token, "token_id": t.token_id, "value": t.value}
                             for d, items in (("top", self.top), ("bottom", self.bottom)) for t in items])

    def figure(self):
        """Bars of the top and bottom tokens."""
        from saecircuits.display import bar_figure, token_label

        items = list(self.top) + list(reversed(self.bottom))
        return bar_figure([token_label(t.token, t.token_id) for t in items], [t.value for t in items],
                          title=self.display_title(), yaxis="logits per unit activation", color="#2ca02c")


def weight_logit_boosts(
    model, sae: SAE, feature: int, *, common_tokens: torch.Tensor | None = None, top: int = 25
) -> WeightBoosts:
    """``W_dec[k] @ W_out[L]`` read out through the final norm's centring and weight and ``W_U``, rare tokens masked
    (the reference notebook's weight-based logit boosts).

    Args:
        model: a TransformerBridge (any weight processing).
        sae: an SAE on ``blocks.L.mlp.hook_post``.
        feature: k.
        common_tokens: bool ``[d_vocab]`` (``None``: all tokens common).
        top: length of the top and bottom lists (notebook 25).

    Returns:
        :class:`WeightBoosts` (logits per unit feature activation, no final-norm scale).

    Raises:
        ValueError: the SAE is not on ``mlp.hook_post``; bad ``common_tokens``. IndexError: ``feature`` out of range.
    """
    layer = mlp_post_layer(sae.hook_point)
    k = int(feature)
    if not 0 <= k < sae.d_sae:
        raise IndexError(f"feature {k} out of range 0..{sae.d_sae - 1}")
    mask = _check_mask(common_tokens, int(model.cfg.d_vocab))
    with torch.no_grad():
        W_out = model.W_out[layer].detach().float()
        d = sae.W_dec[k].detach().float().to(W_out.device)
        write = d @ W_out
        post = site_post_norm(model, sae.hook_point)  # Gemma/OLMo 2: ln2_post at unit scale (per unit, no prompt)
        if post is not None:
            write = post[0].linear(write[None], torch.ones(1, device=write.device))[0]
        boosts = readout_of(model).vocab_logits(write).cpu()
    boosts = boosts.masked_fill(~mask, 0.0)
    return WeightBoosts(
        feature=k,
        boosts=boosts,
        top=_top(model, boosts, mask, top, largest=True),
        bottom=_top(model, boosts, mask, top, largest=False),
    )
