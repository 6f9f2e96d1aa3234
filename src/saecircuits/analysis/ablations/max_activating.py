"""Ablating a feature on the corpus stories where it fires most (the reference notebook's "additional ablations"):
does it matter where it is active?

For one feature ``k`` and its top-N corpus stories (from the corpus statistics pass,
:meth:`saecircuits.analysis.corpus.statistics.FeatureStats.top_examples`):

- **global**: ``k`` ablated at every counted position of the story at once (real, non-special positions); the
  next-token loss ``l[t] = -log p(token[t+1] | tokens <= t)`` at every position, clean and ablated, so a per-token
  loss-change view and, per story, the mean over its positions (the notebook's mean full-sequence loss);
- **per position**: for every position ``p`` (not the last, not special) where ``f_k > threshold``, ``k`` ablated at
  ``p`` alone and the loss ``l[p]`` of predicting the token after it (the notebook's threshold: ``0.1 x`` the
  feature's corpus maximum).

Ablations follow the chosen mode (:mod:`saecircuits.analysis.ablations.modes`; for ``"clean_effect"`` the baseline
is the SAE spliced in at the same positions). The global ablation edits every position, so it runs full forwards
(with the engine, :class:`saecircuits.models.engine.Engine`, the layers before the SAE's hook run once for the clean
and ablated variants; without it, batched TransformerBridge forwards). A per-position ablation at ``p`` with the loss
at ``p`` is a prefix-cached intervention at ``p``: with the engine, one clean pass per story keeps every position's
keys/values and residual stream, and each (story, position) pair recomputes position ``p`` alone from the hook on;
without it, the positions become variants of full bridge forwards. Means come with Student-t 95% intervals over stories (global) and over
(story, position) pairs (per position); the notebook printed mean and ``np.std`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from saecircuits.analysis.ablations.modes import (
    OffRange,
    OffRangeCounter,
    ablation_base,
    activation_floor,
    check_mode,
    edit_dtype,
)
from saecircuits.analysis.corpus.statistics import counted_token_mask, special_ids_of
from saecircuits.analysis.statistics import MeanCI, mean_ci95
from saecircuits.display import NotebookDisplay
from saecircuits.models.hooks import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TOKENS,
    _device_of,
    n_ctx_of,
    pad_id_of,
    row_batches,
)
from saecircuits.models.interventions import Interventions, interventions_for
from saecircuits.saes.base import SAE

__all__ = ["StoryAblation", "max_activating_ablation"]

MAX_FLOATS = 1 << 24
"""Budget (floats) for the activations of one chunk of variants and for one chunk of logits."""


@dataclass
class StoryAblation(NotebookDisplay):
    """Ablation of one feature on its max-activating stories.

    Attributes:
        feature, mode: the feature and the ablation mode.
        docs: the story indices (into the corpus rows), in the order given.
        threshold: absolute activation threshold of the per-position ablation (SAE feature units).
        stories: DataFrame, one row per story: ``doc``, ``n_positions`` (losses averaged), ``clean_loss``,
            ``ablated_loss`` (mean next-token loss over the story's positions, nats), ``loss_increase``.
        positions: DataFrame, one row per ablated (story, position): ``doc``, ``position``, ``activation``,
            ``clean_loss``, ``ablated_loss`` (``l[position]``, nats), ``loss_increase``.
        global_increase: :class:`MeanCI` over stories of ``loss_increase`` (nats).
        position_increase: :class:`MeanCI` over (story, position) pairs of ``loss_increase`` (nats).
        per_token: per story, ``{"doc", "tokens" [L] ids, "activation" [L] (0 at special positions),
            "loss_change" [L]}`` where ``loss_change[j]`` is the global ablation's change of the loss of predicting
            token ``j`` (``l[j-1]``; 0 for ``j = 0``), nats.
        off_range: edited activations that left the hook's range (both ablations).
    """

    feature: int
    mode: str
    docs: list[int]
    threshold: float
    stories: pd.DataFrame
    positions: pd.DataFrame
    global_increase: MeanCI
    position_increase: MeanCI
    per_token: list[dict]
    off_range: OffRange

    def display_title(self) -> str:
        return (f"Feature {self.feature} ablated on its {len(self.docs)} max-activating stories ({self.mode} mode): "
                f"global {self.global_increase.mean:.4f}, per position {self.position_increase.mean:.4f} nats")

    def to_pandas(self):
        """One row per story (``stories``: clean and ablated loss, nats)."""
        return self.stories

    def figure(self):
        """Histogram of the loss increase when ablated at one active position."""
        from saecircuits.display import histogram_figure

        return histogram_figure(self.positions["loss_increase"].tolist(),
                                title=f"Feature {self.feature}: loss increase when ablated at one active position",
                                xaxis="loss increase (nats)", yaxis="(story, position) pairs")


def _losses_at(
    iv: Interventions,
    tokens: torch.Tensor,
    hook: str,
    fn: Callable[[torch.Tensor], torch.Tensor] | None,
    V: int,
    query: torch.Tensor,
    capture: tuple[str, dict] | None = None,
) -> torch.Tensor:
    """Next-token losses of full forwards in which ``fn`` edits ``hook`` at any positions, as ``V`` variants.

    Args:
        iv: the model's interventions (engine: variants share the layers before ``hook``; bridge: ``V`` repeats).
        tokens: int64 ``[B, T]`` right-padded stories.
        hook: where ``fn`` edits.
        fn: ``x [B, 1, T, *shape] -> [B, V, T, *shape]`` (the clean activation in, ``V`` edited versions out), or
            None for the clean run (``V = 1``).
        V: number of variants.
        query: int64 ``[B, V, Q]`` positions ``q`` (``0 <= q < T - 1``) whose loss ``-log p(tokens[q+1] | ...)`` is
            wanted in each variant.
        capture: ``(hook_in, store)``: keep ``hook_in``'s clean activation ``[B, 1, T, *shape]`` in
            ``store["x_in"]`` before ``fn`` runs (a transcoder's input).

    Returns:
        float32 ``[B, V, Q]`` (nats).
    """
    with torch.no_grad():
        return _losses_at_impl(iv, tokens, hook, fn, V, query, capture)


def _keep(store: dict):
    def fn(x: torch.Tensor) -> None:
        store["x_in"] = x

    return fn


def _losses_at_impl(iv, tokens, hook, fn, V, query, capture=None) -> torch.Tensor:
    B, T = tokens.shape
    Q = query.shape[-1]
    dev = tokens.device
    query = query.to(dev)
    targets = tokens.gather(1, (query + 1).reshape(B, -1)).reshape(B, V, Q)
    if iv.engine is not None:
        eng = iv.engine
        hooks = {} if fn is None else {hook: [fn]}
        if capture is not None and fn is not None:
            hooks[capture[0]] = [_keep(capture[1])]
        resid = eng.forward_tokens(tokens, hooks)  # [B, F, T, d_model], F in {1, V}
        resid = resid.expand(B, V, T, resid.shape[-1])
        at = resid.gather(2, query[..., None].expand(B, V, Q, resid.shape[-1]))  # [B, V, Q, d_model]
        return eng.losses(at.reshape(-1, at.shape[-1]), targets.reshape(-1)).cpu().reshape(B, V, Q)
    rep = tokens.repeat_interleave(V, 0)

    def bridge_hook(value: torch.Tensor, hook=None) -> torch.Tensor:
        clean = value.reshape(B, V, *value.shape[1:])[:, :1]  # every repeat is clean up to this hook
        return fn(clean).expand(B, V, *value.shape[1:]).reshape(value.shape).to(value.dtype)

    def bridge_capture(value: torch.Tensor, hook=None) -> None:
        capture[1]["x_in"] = value.reshape(B, V, *value.shape[1:])[:, :1]

    fwd = [] if fn is None else [(hook, bridge_hook)]
    if capture is not None and fn is not None:
        fwd.insert(0, (capture[0], bridge_capture))
    logits = iv.model.run_with_hooks(rep, fwd_hooks=fwd).float()  # [B*V, T, d_vocab]
    logits = logits.reshape(B, V, T, -1)
    at = logits.gather(2, query[..., None].expand(B, V, Q, logits.shape[-1]))
    return (-at.log_softmax(-1).gather(-1, targets[..., None])[..., 0]).cpu()  # as Engine.losses


def _single_position_losses(
    iv: Interventions,
    tokens: torch.Tensor,
    hook: str,
    fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    rows: torch.Tensor,
    pos: torch.Tensor,
    capture: tuple[str, dict] | None = None,
) -> torch.Tensor:
    """Next-token losses with ``hook`` edited at one position per pair, reusing one clean pass per story (engine).

    An edit at position ``p`` changes nothing before ``p``, and the loss at ``p`` reads nothing after it: with the
    keys/values of the clean pass (positions ``< p``) and the residual stream at ``p`` entering the hook's
    half-block, only position ``p`` is recomputed from the hook on (the prefix-cached intervention of
    :mod:`saecircuits.models.interventions`, at any position), through the engine's public ``forward_tokens`` /
    ``forward_resid`` / ``logits``.

    Args:
        iv: the model's interventions (engine backend).
        tokens: int64 ``[B, T]`` right-padded stories.
        hook: the edited hook.
        fns: edits ``x [N, 1, 1, *shape] -> [N, 1, 1, *shape]`` (the clean activation at ``p`` in); one loss per
            edit and pair.
        rows, pos: int64 ``[N]``: the story (row of ``tokens``) and position ``p`` of each pair (``p < T - 1``).
        capture: ``(hook_in, store)`` as in :func:`_losses_at` (the recomputation then starts at ``hook_in``).

    Returns:
        float32 ``[len(fns), N]`` losses ``-log p(tokens[row, p + 1] | ...)`` (nats).
    """
    from saecircuits.models.engine import KVPrefix, stage_of_hook

    eng = iv.engine
    with torch.no_grad():
        keep_kv: list = []
        keep_resid: dict = {}
        eng.forward_tokens(tokens, keep_kv=keep_kv, keep_resid=keep_resid)
        start = stage_of_hook(hook, eng.n_layers)
        if capture is not None:
            start = min(start, stage_of_hook(capture[0], eng.n_layers))
        start = eng.restart_stage(start)
        T = tokens.shape[1]
        dev = tokens.device
        rows, pos = rows.to(dev), pos.to(dev)
        out = torch.zeros(len(fns), rows.numel())
        per_pair = sum(k.shape[2] * k[0, 0, 0].numel() * 2 for k, _ in keep_kv) + eng.d_vocab
        step = max(1, MAX_FLOATS // max(1, per_pair))
        for i in range(0, rows.numel(), step):
            r, p = rows[i : i + step], pos[i : i + step]
            valid = torch.arange(T, device=dev)[None] < p[:, None]
            prefixes = [KVPrefix(k[r, 0].transpose(1, 2), v[r, 0].transpose(1, 2), valid) for k, v in keep_kv]
            x0 = keep_resid[start][r, 0, p][:, None, None]  # [n, 1, 1, d_model]
            target = tokens[r, p + 1]
            for j, fn in enumerate(fns):
                hooks = {hook: [fn]}
                if capture is not None:
                    hooks[capture[0]] = [_keep(capture[1])]
                x = eng.forward_resid(x0.clone(), p[:, None], prefixes, hooks, start=start)
                out[j, i : i + step] = eng.losses(x[:, 0, 0], target).cpu()
    return out


def max_activating_ablation(
    model,
    sae: SAE,
    feature: int,
    token_rows: Sequence[Sequence[int]],
    docs: Sequence[int],
    *,
    threshold: float | None = None,
    threshold_fraction: float = 0.1,
    corpus_max: float | None = None,
    mode: str = "residual",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> StoryAblation:
    """Global and per-position ablation of ``feature`` on the stories ``docs``.

    Args:
        model: a TransformerBridge.
        sae: the SAE.
        feature: k.
        token_rows: the corpus rows (BOS first) the statistics were computed on.
        docs: the story indices to use (e.g. the top-N of :meth:`FeatureStats.top_examples`).
        threshold: absolute per-position threshold; default ``threshold_fraction x corpus_max``.
        threshold_fraction: the notebook's 0.1.
        corpus_max: the feature's corpus maximum (:attr:`FeatureStats.max_activation`); default: the maximum over
            the given stories.
        mode: ablation mode (:mod:`saecircuits.analysis.ablations.modes`).
        max_tokens, max_batch: batch budget of the story forwards.

    Returns:
        :class:`StoryAblation` (empty tables and NaN means without stories or positions).

    Raises:
        IndexError: ``feature`` or a story index out of range. ValueError: an unknown ``mode``, or a story shorter
            than two tokens. ContextLengthError: a story longer than the model's context.
    """
    check_mode(mode)
    k = int(feature)
    if not 0 <= k < sae.d_sae:
        raise IndexError(f"feature {k} out of range 0..{sae.d_sae - 1}")
    docs = [int(d) for d in docs]
    if docs and (min(docs) < 0 or max(docs) >= len(token_rows)):
        raise IndexError(f"story index out of range 0..{len(token_rows) - 1}")
    rows = [list(token_rows[d]) for d in docs]
    if any(len(r) < 2 for r in rows):
        raise ValueError("every story needs at least two tokens (a next token to predict)")
    iv = interventions_for(model)
    hook = sae.hook_point_out  # where the ablation writes (a transcoder: the MLP's output)
    store: dict = {}
    capture = (sae.hook_point, store) if sae.is_transcoder else None  # what it reads
    special = special_ids_of(model)
    counter = OffRangeCounter(activation_floor(model, hook))
    kt = torch.tensor([k], device=sae.W_dec.device)
    w_k = sae.W_dec[k]

    # the feature's activation at every position of every story: read by the global pass below, which encodes the
    # clean activation there anyway; a pass of its own only when the threshold needs the stories' maximum
    acts: list[torch.Tensor] = [torch.zeros(0)] * len(rows)
    batches = list(row_batches(rows, pad_id_of(model), max_tokens=max_tokens, max_batch=max_batch,
                               device=_device_of(model), n_ctx=n_ctx_of(model), what="story"))

    def keep_acts(batch, f: torch.Tensor) -> None:
        """``acts`` of the batch's stories from ``f [B, T]`` (the feature at each position; 0 where not counted)."""
        f = f.float() * counted_token_mask(batch.tokens, batch.positions + 1, special).to(f.device)
        for r, i in enumerate(batch.indices):
            acts[i] = f[r, : len(rows[i])].cpu()

    if threshold is None and corpus_max is None:
        for batch in batches:
            x = iv.read_all(batch.tokens, [sae.hook_point])[sae.hook_point]
            with torch.no_grad():
                keep_acts(batch, sae.encode_features(x.to(sae.W_dec.dtype), kt)[..., 0])
    if threshold is None:
        if corpus_max is None:
            corpus_max = max((float(a.max()) for a in acts if a.numel()), default=0.0)
        threshold = threshold_fraction * float(corpus_max)

    def inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_in, x)`` flattened to ``[B, V, T, d]`` (hook_z heads; a transcoder's captured input)."""
        flat = x.flatten(3) if x.dim() > 4 else x
        if capture is None:
            return flat, flat
        x_in = sae.flatten_input(store["x_in"])
        return x_in.expand(*flat.shape[:-1], x_in.shape[-1]), flat

    def ablate(x: torch.Tensor, where: torch.Tensor, batch=None) -> torch.Tensor:
        """``x [B, V, T, d]`` with k ablated (this mode) where ``where [B, V, T]`` is True; with ``batch`` (``x`` the
        clean activation, ``V`` = 1), the feature's activations are kept in ``acts``."""
        x_in, flat = inputs(x)
        dt = edit_dtype(sae, flat)  # encode in the SAE's dtype, subtract in x's: a bf16 SAE never rounds x itself
        f = sae.encode(x_in)
        if batch is not None:
            keep_acts(batch, f[:, 0, :, k])
        out = ablation_base(sae, flat, f, mode, x_in) - f[..., k : k + 1].to(dt) * w_k.to(dt)
        counter.observe(out, where)
        return torch.where(where[..., None], out, flat.to(dt)).reshape(x.shape)

    def baseline(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        if mode != "clean_effect":
            return x
        x_in, flat = inputs(x)
        dt = edit_dtype(sae, flat)
        spliced = sae.decode(sae.encode(x_in), x_in).to(dt)
        return torch.where(where[..., None], spliced, flat.to(dt)).reshape(x.shape)

    story_rows, pos_rows, per_token = [], [], {}
    for batch in batches:
        B, T = batch.tokens.shape
        lengths = batch.positions + 1
        counted = counted_token_mask(batch.tokens, lengths, special)
        # global: every counted position ablated; baseline and ablated as two variants of one pass
        where = counted[:, None].expand(B, 2, T).clone()
        query = torch.arange(T - 1, device=batch.tokens.device).expand(B, 2, T - 1)

        def global_fn(x, where=where, batch=batch):
            base = baseline(x, where[:, :1])
            return torch.cat([base, ablate(x, where[:, 1:], batch)], dim=1)

        losses = _losses_at(iv, batch.tokens, hook, global_fn, 2, query, capture)  # [B, 2, T-1]
        for r, i in enumerate(batch.indices):
            n = int(lengths[r]) - 1
            clean_l, abl_l = losses[r, 0, :n], losses[r, 1, :n]
            story_rows.append((docs[i], n, float(clean_l.mean()), float(abl_l.mean())))
            change = torch.cat([torch.zeros(1), abl_l - clean_l])
            per_token[i] = {"doc": docs[i], "tokens": rows[i], "activation": acts[i].tolist(),
                            "loss_change": change.tolist()}
        # per position: each position above the threshold (not the last) ablated alone
        picks = [
            [p for p in range(len(rows[i]) - 1) if float(acts[i][p]) > threshold] for i in batch.indices
        ]
        V = max((len(p) for p in picks), default=0)
        if V == 0:
            continue
        if iv.engine is not None:  # one clean pass per story, then position p alone from the hook on
            pr = torch.tensor([r for r, ps in enumerate(picks) for _ in ps], dtype=torch.long)
            pp = torch.tensor([p for ps in picks for p in ps], dtype=torch.long)

            def everywhere(x: torch.Tensor) -> torch.Tensor:
                return torch.ones(x.shape[:3], dtype=torch.bool, device=x.device)

            # the baseline (clean, or the SAE spliced in) on the same path as the ablation: one that changes
            # nothing has an increase of exactly 0 (the global pass's clean loss differs by float rounding)
            fns = [lambda x: ablate(x, everywhere(x)), lambda x: baseline(x, everywhere(x))]
            got = _single_position_losses(iv, batch.tokens, hook, fns, pr, pp, capture)
            base = got[1]
            for n, (r, p) in enumerate(zip(pr.tolist(), pp.tolist(), strict=True)):
                i = batch.indices[r]
                pos_rows.append((docs[i], p, float(acts[i][p]), float(base[n]), float(got[0, n])))
            continue
        table = torch.full((B, V), -1, dtype=torch.long)
        for r, p in enumerate(picks):
            table[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        width = max(int(model.cfg.d_model), int(getattr(model.cfg, "d_mlp", 0) or 0))
        chunk = max(1, MAX_FLOATS // max(1, B * T * width))
        for v0 in range(0, V, chunk):
            sub = table[:, v0 : v0 + chunk].to(batch.tokens.device)
            Vc = sub.shape[1]
            at = torch.zeros(B, Vc, T, dtype=torch.bool, device=batch.tokens.device)
            at.scatter_(2, sub.clamp(min=0)[..., None], (sub >= 0)[..., None])

            def pos_fn(x, at=at, Vc=Vc):
                x = x.expand(-1, Vc, *x.shape[2:])
                return ablate(x, at)

            abl = _losses_at(iv, batch.tokens, hook, pos_fn, Vc, sub.clamp(min=0)[..., None], capture)[..., 0]
            # the baseline in a run of the same shape as the ablation (same path: a no-op differs by exactly 0)
            base = _losses_at(iv, batch.tokens, hook, lambda x, at=at, Vc=Vc: baseline(
                x.expand(-1, Vc, *x.shape[2:]), at), Vc, sub.clamp(min=0)[..., None], capture)[..., 0]
            for r, i in enumerate(batch.indices):
                for v in range(Vc):
                    p = int(sub[r, v])
                    if p >= 0:
                        pos_rows.append((docs[i], p, float(acts[i][p]), float(base[r, v]), float(abl[r, v])))
    stories = pd.DataFrame(story_rows, columns=["doc", "n_positions", "clean_loss", "ablated_loss"])
    stories["loss_increase"] = stories["ablated_loss"] - stories["clean_loss"]
    order = {d: j for j, d in enumerate(docs)}
    stories = stories.sort_values("doc", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    positions = pd.DataFrame(pos_rows, columns=["doc", "position", "activation", "clean_loss", "ablated_loss"])
    positions["loss_increase"] = positions["ablated_loss"] - positions["clean_loss"]
    positions = positions.sort_values(["doc", "position"], key=lambda s: s.map(order) if s.name == "doc" else s,
                                      kind="stable").reset_index(drop=True)
    return StoryAblation(
        feature=k,
        mode=mode,
        docs=docs,
        threshold=float(threshold),
        stories=stories,
        positions=positions,
        global_increase=mean_ci95(stories["loss_increase"].to_numpy()),
        position_increase=mean_ci95(positions["loss_increase"].to_numpy()),
        per_token=[per_token[i] for i in range(len(rows))],
        off_range=counter.result(),
    )
