"""Prefix-cached interventions at the prediction position: the one intervention layer every analysis uses.

An edit at layer L and position P of a causal model changes nothing at positions before P, and position P only from
layer L onward. So each batch of prompts gets one clean pass (:meth:`Interventions.clean`) that keeps what later
positions need: the keys and values of every layer, and the residual stream at each prompt's own P entering each
half-block. An intervention (:meth:`Interventions.run`) then recomputes only position P, from the earliest edited
or read hook to the unembedding, its query attending to the cached keys/values of positions ``< P`` (each row's own
P, so right padding never matters; local layers keep their window; rotary queries get position P), and unembeds P
alone. Edits are still written on TransformerLens hook names (``blocks.1.mlp.hook_post``), so each analysis keeps its
meaning; many variants of an edit (one per feature, say) run as one batch of ``B x V`` rows that share the cache,
and everything before the first edit is computed once per prompt.

Three rules hold in both backends (issue 18): an edit gets its own copy of the activation at P, so an in-place edit
(``x += v``) never corrupts the kept clean pass or a read; the attention pattern and scores (``[batch, head, query,
key]``) are read and edited at every head's query row P; an edit or read on a hook that never fires (or whose edit
the bridge discards) fails naming the hook. Effects are measured with :meth:`Interventions.run_paired`, whose
baseline is a variant of the same run, so an edit that changes nothing has an effect of exactly 0.

Backends: the fast path is :class:`saecircuits.models.engine.Engine` (GPT-2, GPT-Neo global/local, Llama rotary +
GQA, self-checked against the bridge when it is built). For any model the engine refuses, the same calls run full
TransformerBridge forwards with hooks at each row's P (exact, slower; the engine's reason is logged once).
``tests/models/test_interventions.py`` checks every result of the fast path against full-prompt interventions
through the bridge, on right-padded batches of prompts of different lengths, per architecture.

Cost per prompt and intervention: (layers after the edit) x one query over P cached keys + one ``[d_vocab]``
unembedding, instead of all positions x all layers + ``[pos, d_vocab]`` logits.

Why one module of ~700 lines: the engine path and the bridge path implement the same calls under the same three
rules; side by side, a change of one rule is made (and reviewed) in both at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from saecircuits.models.engine import Engine, EngineError, KVPrefix, stage_of_hook
from saecircuits.models.hooks import (
    HEAD_FIRST_HOOKS,
    TaskBatch,
    at_query,
    attn_scores_probes,
    check_attn_scores,
    query_axis,
    run_at_positions,
    stop_layer_for,
)

logger = logging.getLogger(__name__)

__all__ = ["Edit", "CleanPass", "Paired", "Interventions", "interventions_for"]

_ATTR = "_saecircuits_interventions"


@dataclass(frozen=True)
class Edit:
    """An edit of one hook's activation at each prompt's prediction position P.

    Attributes:
        hook: TransformerLens hook name, e.g. ``blocks.1.mlp.hook_post``.
        fn: ``fn(x) -> x'`` with ``x`` of shape ``[B, F, *act_shape]`` (B prompts of the batch in batch order; ``F``
            is 1 while every variant still shares the value, else ``V``) returning ``[B, F or V, *act_shape]``.
            Returning ``V`` variants turns one prompt into ``V`` edited rows (one ablated feature each, say).
            ``x`` is the edit's own copy: an in-place edit (``x += v``, ``x[...] = 0``) never reaches the kept clean
            pass nor a read of the same hook. For ``blocks.L.attn.hook_pattern`` (``[batch, head, query, key]``)
            ``x`` is every head's query row P: ``[B, F, n_heads, key_pos]``.
            With ``reads``, ``fn(x, *values)`` also gets each named hook's value at P in the same pass (``[B, F',
            *shape]``, after any edits at that hook), e.g. a transcoder's input when editing the MLP's output.
        reads: hooks that fire before ``hook`` whose values ``fn`` needs (empty for most edits).
    """

    hook: str
    fn: Callable[..., torch.Tensor]
    reads: tuple[str, ...] = ()


@dataclass
class CleanPass:
    """One clean forward of a batch, with what interventions at P need.

    Attributes:
        batch: the right-padded batch (``tokens [B, T]``, ``positions [B]`` = each row's P, ``answer_ids [B]``).
        logits: float32 ``[B, d_vocab]`` at P (None when not asked for).
        reads: hook name -> activation at P ``[B, *act_shape]`` (clean; the attention pattern's query row P,
            ``[B, n_heads, key_pos]``).
        kv: per layer, cached keys/values with ``valid = t < P`` (engine backend only).
        resid: ``{(layer, 0): resid_pre, (layer, 1): resid_mid, (n_layers, 0): final resid}`` at P, ``[B, d_model]``
            (engine backend only).

    ``logits`` and ``reads`` are the caller's own tensors; ``kv`` and ``resid`` are the kept cache, shared by every
    later call on the batch: read them, never write into them.
    """

    batch: TaskBatch
    logits: torch.Tensor | None
    reads: dict[str, torch.Tensor]
    kv: list[KVPrefix] | None = None
    resid: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


class Paired(NamedTuple):
    """An intervention and its baseline from one run (:meth:`Interventions.run_paired`).

    Attributes:
        base_logits: float32 ``[B, d_vocab]`` at P of the baseline row (None when logits were not asked for).
        logits: float32 ``[B, V, d_vocab]`` at P of the edited rows (None likewise).
        base_reads: hook -> ``[B, *act_shape]`` in the baseline row.
        reads: hook -> ``[B, V, *act_shape]`` in the edited rows.
        same: bool ``[B, V]``: the variant is the baseline run (every edit left it equal to the baseline row), so its
            logits and reads are the baseline's; None when no edit split the rows (every variant is then the same).
    """

    base_logits: torch.Tensor | None
    logits: torch.Tensor | None
    base_reads: dict[str, torch.Tensor]
    reads: dict[str, torch.Tensor]
    same: torch.Tensor | None = None


class Interventions:
    """Clean passes and prefix-cached interventions at P for one model (get it with :func:`interventions_for`)."""

    def __init__(self, model, engine: Engine | None, reason: str = "", cache_bytes: int = 512 << 20) -> None:
        self.model = model
        self.engine = engine
        self.reason = reason
        self.n_layers = int(model.cfg.n_layers)
        self.cache_bytes = cache_bytes
        self._passes: dict[bytes, CleanPass] = {}
        self._rows: dict[bytes, tuple[bytes, int]] = {}  # a kept row (its tokens to P, P) -> (its pass, its row)
        self._reads: dict[bytes, dict[str, torch.Tensor]] = {}
        self._read_tokens: dict[bytes, torch.Tensor] = {}  # the tokens of each kept read (CPU)
        self._read_rows: dict[bytes, list[tuple[bytes, int]]] = {}  # a row's tokens -> (kept read, its row)
        self._passes_bytes = 0
        self._last: tuple[bytes, CleanPass] | None = None  # the latest pass beyond the budget (keeping_last_pass)
        self._keep_last = 0

    @contextlib.contextmanager
    def keeping_last_pass(self):
        """Within this block, the latest clean pass that did not fit the cache budget is kept until the next one is
        computed, so analyses that step through the same batches in lockstep (each one batch, then the next one the
        same batch) run each batch's clean pass once: one pass more held at a time, never a growing cache."""
        self._keep_last += 1
        try:
            yield self
        finally:
            self._keep_last -= 1
            if not self._keep_last:
                self._last = None

    def clear_cache(self) -> None:
        """Forget the clean passes and corpus reads kept between calls (see :meth:`clean`, :meth:`read_all`)."""
        self._last = None
        self._passes.clear()
        self._rows.clear()
        self._reads.clear()
        self._read_tokens.clear()
        self._read_rows.clear()
        self._passes_bytes = 0

    @property
    def backend(self) -> str:
        """``"engine"`` (prefix-cached, one position) or ``"bridge"`` (full forwards through the bridge)."""
        return "engine" if self.engine is not None else "bridge"

    # ------------------------------------------------------------------------------------------------------------

    def clean(
        self, batch: TaskBatch, read: Sequence[str] = (), *, logits: bool = True, cache: bool = True
    ) -> CleanPass:
        """One clean forward of ``batch``: logits and ``read`` activations at each row's P, plus the prefix cache.

        Args:
            batch: from :func:`saecircuits.models.hooks.task_batches` / ``row_batches``.
            read: hook names to return at P (``[B, *act_shape]``).
            logits: compute the logits at P.
            cache: keep what :meth:`run` needs (otherwise the pass stops after the last block it must run).

        Every analysis of a run reads the same batches, so with the engine the full clean pass of a batch (its
        key/value cache, the residual stream at P, the logits at P) is kept between calls, keyed by the batch's
        tokens and positions, until ``cache_bytes`` (512 MiB) is used; later calls on the same batch then compute
        their ``read`` activations by running position P alone from the cache. Batches that do not fit are
        recomputed each time (never evicted, so a run's first batches stay cached). :meth:`clear_cache` frees it.
        A batch of prompts that are all rows of kept passes (a subset of the task: the prompts where a feature is
        active, say) is assembled from those rows instead of run again: a row's clean pass depends only on its own
        tokens up to P (attention is causal, and the padding after P is never read), not on the rows beside it. It
        equals the batch's own pass up to float rounding (its rows' matmuls ran in other batch shapes), so a
        value can differ in its last bits with what ran before it in the same process.

        Returns:
            :class:`CleanPass`.

        Raises:
            KeyError: a hook in ``read`` that never fired (bridge backend) or EngineError (engine backend).
        """
        read = list(read)
        with torch.no_grad():
            if self.engine is None:
                lg, reads = run_at_positions(self.model, batch.tokens, batch.positions, read=read, return_logits=logits)
                return CleanPass(batch, lg, reads)
            key = _batch_key(batch)
            kept = self._passes.get(key)
            if kept is None and cache and self._last is not None and self._last[0] == key:
                kept = self._last[1]
            if kept is None and cache:
                kept = self._from_kept_rows(batch)
            if kept is None and cache:
                self._last = None  # (its memory free before the next pass is made)
                kept = self._engine_clean(batch, [], logits=True, cache=True)
                size = _pass_bytes(kept)
                if self._passes_bytes + size <= self.cache_bytes:
                    self._passes[key] = kept
                    self._passes_bytes += size
                    tokens, pos = batch.tokens.cpu(), batch.positions.cpu()
                    for r in range(tokens.shape[0]):
                        self._rows.setdefault(_row_key(tokens[r], int(pos[r])), (key, r))
                elif self._keep_last:
                    self._last = (key, kept)
            if kept is None:
                return self._engine_clean(batch, read, logits=logits, cache=cache)
            reads = {}
            if read:  # position P alone, from the cached prefix
                _, got = self._engine_run(kept, [], 1, read, logits=False)
                reads = {k: v[:, 0] for k, v in got.items()}
            # the logits are the caller's own copy; kv and resid stay shared (read-only, see CleanPass)
            return CleanPass(batch, kept.logits.clone() if logits else None, reads, kv=kept.kv, resid=kept.resid)

    def _from_kept_rows(self, batch: TaskBatch) -> CleanPass | None:
        """The clean pass of ``batch`` (logits at P, keys/values, residual stream at P) gathered from the rows of kept
        passes, or None when a row of it is in none. Each row's keys/values are cut or zero-padded to the batch's
        length: only positions ``< P`` are read (``valid``), and those are the row's own."""
        if not self._rows:
            return None
        tokens, pos = batch.tokens.cpu(), batch.positions.cpu()
        B, T = tokens.shape
        where = [self._rows.get(_row_key(tokens[r], int(pos[r]))) for r in range(B)]
        if any(w is None for w in where):
            return None
        groups: dict[bytes, tuple[list[int], list[int]]] = {}  # kept pass -> (rows of this batch, rows there)
        for r, (k, j) in enumerate(where):
            groups.setdefault(k, ([], []))[0].append(r)
            groups[k][1].append(j)
        first = self._passes[where[0][0]]
        dev = batch.tokens.device
        kv = []
        for layer, ref in enumerate(first.kv or []):
            keys = ref.keys.new_zeros(B, *ref.keys.shape[1:2], T, ref.keys.shape[-1])
            values = ref.values.new_zeros(B, *ref.values.shape[1:2], T, ref.values.shape[-1])
            for k, (dst, src) in groups.items():
                got = self._passes[k].kv[layer]  # type: ignore[index]
                m = min(T, got.keys.shape[2])
                d, s = torch.tensor(dst, device=dev), torch.tensor(src, device=dev)
                keys[d, :, :m] = got.keys[s, :, :m]
                values[d, :, :m] = got.values[s, :, :m]
            kv.append(KVPrefix(keys, values, torch.arange(T, device=dev)[None] < batch.positions.to(dev)[:, None]))

        def gather(get) -> torch.Tensor:
            ref = get(first)
            out = ref.new_empty(B, *ref.shape[1:])
            for k, (dst, src) in groups.items():
                out[torch.tensor(dst, device=dev)] = get(self._passes[k])[torch.tensor(src, device=dev)]
            return out

        resid = {stage: gather(lambda p, stage=stage: p.resid[stage]) for stage in first.resid}
        return CleanPass(batch, gather(lambda p: p.logits), {}, kv=kv, resid=resid)

    def run(
        self,
        clean: CleanPass,
        edits: Sequence[Edit],
        *,
        n_variants: int = 1,
        read: Sequence[str] = (),
        logits: bool = True,
        grad: bool = False,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Apply ``edits`` at every row's P and return the logits (and ``read`` activations) at P.

        Only position P is recomputed, from the earliest hook in ``edits``/``read`` on, attending to the clean
        cache of positions ``< P``. Edits at one hook run in the given order, after any read of that hook (a read
        of an edited hook gives its value before the edit).

        Args:
            clean: the batch's :meth:`clean` pass (with ``cache=True``).
            edits: the edits (each hook's ``fn`` may expand to ``n_variants`` rows per prompt).
            n_variants: ``V``; outputs are ``[B, V, ...]``.
            read: hook names to return at P.
            logits: compute the logits at P.
            grad: keep the autograd graph of position P (the cached prefix is constant, which is exact for
                gradients with respect to activations at P): edits may mark tensors with ``requires_grad_`` /
                ``retain_grad`` and the caller back-propagates from the logits (attribution patching, integrated
                gradients). On the bridge backend: a full forward of every row with autograd on; the positions
                before P do not depend on an edit at P, so the gradients are the same.

        Returns:
            ``(logits [B, V, d_vocab] float32 or None, {hook: [B, V, *act_shape]})``.

        Raises:
            EngineError (engine) / KeyError (bridge): an edited or read hook that never fires, named (an edit is
                never silently dropped). ValueError: an edit returned a bad shape.

        An edit's effect is ``metric(run) - metric(clean.logits)`` only up to float rounding: the clean pass and the
        recomputation of P take different paths (about 1e-6 nats). Use :meth:`run_paired` for effects, so that an
        edit that changes nothing gives exactly 0.
        """
        if grad:
            with torch.enable_grad():
                if self.engine is None:
                    return self._bridge_run(clean, list(edits), n_variants, list(read), logits, keep_graph=True)
                return self._engine_run(clean, list(edits), n_variants, list(read), logits, keep_graph=True)
        with torch.no_grad():
            if self.engine is None:
                return self._bridge_run(clean, list(edits), n_variants, list(read), logits)
            return self._engine_run(clean, list(edits), n_variants, list(read), logits)

    def run_paired(
        self,
        clean: CleanPass,
        edits: Sequence[Edit],
        *,
        n_variants: int = 1,
        base: Sequence[Edit] = (),
        read: Sequence[str] = (),
        logits: bool = True,
    ) -> Paired:
        """:meth:`run` with its baseline computed in the same run: the one path every effect is measured on.

        The baseline is one more variant of the same batch (variant 0, with ``base`` edits, none = clean), so it
        takes the same path as the edited variants (recomputed from the same hook, in the same batched kernels):
        an edit that leaves its activation unchanged gives exactly the baseline's logits and reads, bit for bit,
        and an effect of exactly 0 (a variant whose every edited activation equals the baseline's is given the
        baseline's outputs, since batched kernels may round its separate row differently; see ``_PairState``). Comparing :meth:`run` with ``clean.logits`` (the full clean pass) instead
        mixes two paths, off by float rounding (up to ~1e-6 nats).

        Args:
            clean, edits, n_variants, read, logits: as :meth:`run` (edit functions see ``F`` in ``{1, V}``).
            base: edits of the baseline row (e.g. the SAE splice the ``"clean_effect"`` ablation mode compares
                with); each must keep one variant.

        Returns:
            :class:`Paired`.

        Raises:
            As :meth:`run`.
        """
        V = n_variants
        state = _PairState(frozenset(e.hook for e in base))
        paired = [_paired_edit(e, V, True, state) for e in base] + [_paired_edit(e, V, False, state) for e in edits]
        lg, reads = self.run(clean, paired, n_variants=1 + V, read=read, logits=logits)
        if state.same is not None and bool(state.same.any()):  # variants that are the baseline run (_PairState)
            lg = None if lg is None else _as_base(lg, state.same)
            reads = {k: _as_base(v, state.same) for k, v in reads.items()}
        return Paired(
            None if lg is None else lg[:, 0],
            None if lg is None else lg[:, 1:],
            {k: v[:, 0] for k, v in reads.items()},
            {k: v[:, 1:] for k, v in reads.items()},
            state.same,
        )

    def token_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """Clean next-token losses at every position of right-padded ``tokens [B, T]``: float32 ``[B, T - 1]``,
        ``-log p(tokens[:, t + 1] | tokens[:, :t + 1])`` in nats (targets that are padding included: the caller masks
        them).

        Kept between calls like :meth:`read_all` (keyed by the tokens), so analyses that score the same rows clean
        (loss recovered over whole prompts, once per SAE) run the model and its ``[T, d_vocab]`` unembedding once.
        The engine unembeds in chunks (:meth:`~saecircuits.models.engine.Engine.next_token_losses`); the bridge
        backend takes the log-softmax of its full logits.
        """
        key = _tokens_key(tokens, ["\0next-token losses"])
        kept = self._reads.get(key)
        if kept is not None:
            return kept["losses"].clone()
        with torch.no_grad():
            if self.engine is None:
                logits = self.model(tokens)
                out = -torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
            else:
                out = self.engine.next_token_losses(self.engine.forward_tokens(tokens)[:, 0], tokens)
        size = out.numel() * out.element_size()
        if self._passes_bytes + size <= self.cache_bytes:
            self._reads[key] = {"losses": out}
            self._passes_bytes += size
        return out.clone()

    def read_all(
        self, tokens: torch.Tensor, read: Sequence[str], *, keep: bool = True
    ) -> dict[str, torch.Tensor]:
        """Activations of ``read`` at every position of right-padded ``tokens [B, T]`` -> ``{hook: [B, T, *shape]}``.

        The pass stops after the last block it needs and never unembeds (corpus statistics, top examples). Results
        are kept between calls (keyed by the tokens and hook, within the same ``cache_bytes`` budget as clean
        passes, never evicted), so the mean activation, the top examples and the other statistics of a run read
        each corpus batch once. The attention pattern ``[B, head, T, T]`` comes as ``[B, T(query), head, T(key)]``.
        A row that a kept read holds with the same tokens (its padding included, up to this batch's length) is
        copied from it rather than run again (one SAE's top examples re-read documents another's read, in other batches):
        attention is causal, so a position's activations depend only on the tokens up to it. Only the other rows
        are run, as a batch of their own (not kept). Attention pattern and score reads are always run.
        ``keep=False`` reads without adding the result to the cache (what is already kept is still used): for a
        pass that reads each batch once, whose reads would otherwise fill the cache the prompts' clean passes need.

        Raises:
            EngineError (engine) / KeyError (bridge): a hook that never fired, named.
        """
        read = list(read)
        key = _tokens_key(tokens, read)
        kept = self._reads.get(key)
        if kept is not None:
            return dict(kept)
        reuse = not any(n.endswith(HEAD_FIRST_HOOKS) for n in read)  # those have a key axis of length T too
        got = self._read_from_kept_rows(tokens, read) if reuse and self._read_rows else None
        if got is not None:
            return got
        out = self._read_all(tokens, read)
        size = sum(t.numel() * t.element_size() for t in out.values())
        if keep and self._passes_bytes + size <= self.cache_bytes:
            self._reads[key] = out
            self._passes_bytes += size
            if reuse:
                cpu = tokens.cpu()
                self._read_tokens[key] = cpu
                for r in range(cpu.shape[0]):
                    self._read_rows.setdefault(self._read_row_key(cpu[r]), []).append((key, r))
        return dict(out)

    def _read_row_key(self, row: torch.Tensor) -> bytes:
        """Content key of one right-padded row of a read: its tokens without the trailing pad ids (the same
        document padded to other lengths has the same key; a match is then checked token by token)."""
        import hashlib

        from saecircuits.models.hooks import pad_id_of

        real = (row != pad_id_of(self.model)).nonzero()
        n = int(real[-1]) + 1 if real.numel() else 0
        return hashlib.blake2b(row[:n].contiguous().numpy().tobytes(), digest_size=16).digest()

    def _read_from_kept_rows(self, tokens: torch.Tensor, read: list[str]) -> dict[str, torch.Tensor] | None:
        """:meth:`read_all` of ``tokens`` with each row a kept read holds (the same tokens, at least as long) copied
        from it and the others run as one batch; None when no row is kept."""
        cpu = tokens.cpu()
        B, T = cpu.shape
        found: list[tuple[bytes, int] | None] = []
        for r in range(B):
            hit = None
            for k, s in self._read_rows.get(self._read_row_key(cpu[r]), ()):
                src = self._read_tokens[k]
                if src.shape[1] >= T and all(n in self._reads[k] for n in read) and torch.equal(src[s, :T], cpu[r]):
                    hit = (k, s)
                    break
            found.append(hit)
        if all(f is None for f in found):
            return None
        missed = [r for r, f in enumerate(found) if f is None]
        fresh = self._read_all(tokens[torch.tensor(missed, device=tokens.device)], read) if missed else {}
        out = {}
        for name in read:
            ref = next(self._reads[f[0]][name] for f in found if f is not None)
            x = ref.new_empty(B, T, *ref.shape[2:])
            for r, f in enumerate(found):
                if f is not None:
                    x[r] = self._reads[f[0]][name][f[1], :T]
            if missed:
                x[torch.tensor(missed, device=x.device)] = fresh[name]
            out[name] = x
        return out

    def _read_all(self, tokens: torch.Tensor, read: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if self.engine is None:
                store: dict[str, torch.Tensor] = {}

                def grab(name):
                    def hook(value, hook=None):
                        store[name] = at_query(value, name).detach()

                    return hook

                stop = stop_layer_for(read, self.n_layers)
                kwargs = {} if stop is None else {"stop_at_layer": stop}
                probes = attn_scores_probes(read)
                hooks = [(n, grab(n)) for n in read + probes]
                self.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None, **kwargs)
                missing = [n for n in read if n not in store]
                if missing:
                    raise KeyError(f"hook(s) {missing} never fired; check the names against model.hook_dict")
                check_attn_scores(read, store)
                return {n: store[n] for n in read}
            store = {}
            hooks = {n: [self._full_reader(store, n)] for n in read}
            last = max(stage_of_hook(n, self.n_layers) for n in read)
            x = self.engine.forward_tokens(tokens, hooks, stop_after=last if last[0] < self.n_layers else None)
            if last[0] >= self.n_layers:
                self.engine.logits(x, hooks)
            _check_fired(read, store)
            return store

    # ------------------------------------------------------------------------------------------------------------
    # engine backend

    @staticmethod
    def _full_reader(store: dict, name: str):
        def fn(x: torch.Tensor) -> None:
            store[name] = at_query(x[:, 0], name).detach()

        return fn

    def _engine_clean(self, batch: TaskBatch, read: list[str], *, logits: bool, cache: bool) -> CleanPass:
        eng = self.engine
        B, T = batch.tokens.shape
        rows = torch.arange(B, device=batch.tokens.device)
        pos = batch.positions.to(batch.tokens.device)
        reads: dict[str, torch.Tensor] = {}
        resid: dict[tuple[int, int], torch.Tensor] = {}
        hooks: dict[str, list] = {}

        def at_p(store: dict, key, name: str = ""):
            def fn(x: torch.Tensor) -> None:
                store[key] = at_query(x[:, 0], name)[rows, pos].detach()

            return fn

        final_hooks: dict[str, list] = {}
        for name in read:
            if stage_of_hook(name, self.n_layers)[0] == self.n_layers:  # ln_final: run on the gathered rows
                final_hooks.setdefault(name, []).append(self._squeeze_reader(reads, name))
            else:
                hooks.setdefault(name, []).append(at_p(reads, name, name))
        keep_kv: list | None = None
        if cache:
            keep_kv = []
            for layer in range(self.n_layers):
                hooks.setdefault(f"blocks.{layer}.hook_resid_pre", []).append(at_p(resid, (layer, 0)))
                hooks.setdefault(f"blocks.{layer}.hook_resid_mid", []).append(at_p(resid, (layer, 1)))
        stop = None
        if not cache and not logits and not final_hooks and read:
            stop = max(stage_of_hook(n, self.n_layers) for n in read)
        x = eng.forward_tokens(batch.tokens, hooks, stop_after=stop, keep_kv=keep_kv)
        lg = None
        if stop is None:
            final = x[rows, 0, pos]  # [B, d_model]
            resid[(self.n_layers, 0)] = final
            if logits or final_hooks:
                lg = eng.logits(final[:, None, None], final_hooks)[:, 0, 0]
        lg = lg if logits else None
        _check_fired(read, reads)
        kv = None
        if cache:
            valid = torch.arange(T, device=pos.device)[None] < pos[:, None]
            kv = [KVPrefix(k[:, 0].transpose(1, 2), v[:, 0].transpose(1, 2), valid) for k, v in keep_kv]
        return CleanPass(batch, lg, reads, kv=kv, resid=resid if cache else {})

    @staticmethod
    def _squeeze_reader(store: dict, name: str):
        def fn(x: torch.Tensor) -> None:
            store[name] = x[:, 0, 0].detach()

        return fn

    def _engine_run(
        self, clean: CleanPass, edits: list[Edit], V: int, read: list[str], logits: bool, keep_graph: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        eng = self.engine
        if clean.kv is None:
            raise ValueError("this CleanPass has no prefix cache; call clean(batch, cache=True)")
        n = self.n_layers
        stages = [stage_of_hook(h, n) for e in edits for h in (e.hook, *e.reads)] + [stage_of_hook(r, n) for r in read]
        if not stages:
            raise ValueError("run() needs at least one edit or read hook")
        start = eng.restart_stage(min(stages))
        batch = clean.batch
        B = batch.tokens.shape[0]
        pos = batch.positions.to(batch.tokens.device)
        reads: dict[str, torch.Tensor] = {}
        hooks: dict[str, list] = {}
        fired: set[str] = set()
        for name in read:
            hooks.setdefault(name, []).append(_variant_reader(reads, name, detach=not keep_graph))
        captured: dict[str, torch.Tensor] = {}
        for e in edits:
            hooks.setdefault(e.hook, []).append(_edit_at_single_position(e, B, V, fired, captured))
        for name in {h for e in edits for h in e.reads}:  # after every edit there: an edit reads the edited value
            hooks.setdefault(name, []).append(_variant_reader(captured, name, detach=not keep_graph))
        qpos = pos[:, None]
        if start[0] < 0:
            tokens_p = batch.tokens[torch.arange(B, device=pos.device), pos][:, None]
            x = eng.embed(tokens_p, qpos, hooks)[:, :, :, :]
            start = (0, 0)
        else:
            x = clean.resid[start][:, None, None]
        stop = None
        if not logits:
            last = max(stages)
            stop = last if last[0] < n else None
        x = eng.forward_resid(x, qpos, clean.kv, hooks, start=start, stop_after=stop)
        lg = None
        if stop is None and (logits or any(s[0] == n for s in stages)):
            lg = eng.logits(x, hooks)[:, :, 0]
            lg = lg.expand(B, V, lg.shape[-1]) if logits else None
        _check_fired(read, reads, [e.hook for e in edits], fired)
        return lg, {k: _expand_variants(v, B, V) for k, v in reads.items()}

    # ------------------------------------------------------------------------------------------------------------
    # bridge backend (full forwards, exact, slow)

    def _bridge_run(
        self, clean: CleanPass, edits: list[Edit], V: int, read: list[str], logits: bool, keep_graph: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        batch = clean.batch
        B = batch.tokens.shape[0]
        tokens = batch.tokens.repeat_interleave(V, 0)
        pos = batch.positions.repeat_interleave(V, 0)
        captured: dict[str, torch.Tensor] = {}
        fwd = [(e.hook, _edit_hook_full(e, pos, B, V, captured)) for e in edits]
        # after the edits of that hook (TransformerLens runs a hook's functions in order): edits read edited values
        fwd += [(name, _capture_full(captured, name, pos, B, V, detach=not keep_graph))
                for name in {h for e in edits for h in e.reads}]
        lg, reads = run_at_positions(self.model, tokens, pos, read=read, edits=fwd, return_logits=logits,
                                     grad=keep_graph)
        out = {k: v.reshape(B, V, *v.shape[1:]) for k, v in reads.items()}
        return (None if lg is None else lg.reshape(B, V, -1)), out


def _batch_key(batch: TaskBatch) -> bytes:
    """Content key of a batch: its tokens and prediction positions."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for t in (batch.tokens, batch.positions):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def _row_key(tokens: torch.Tensor, position: int) -> bytes:
    """Content key of one row of a batch: its tokens up to its prediction position P, and P."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(f"{position}:{tokens.dtype}".encode())
    h.update(tokens[: position + 1].contiguous().numpy().tobytes())
    return h.digest()


def _tokens_key(tokens: torch.Tensor, read: list[str]) -> bytes:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(("\0".join(read) + str(tuple(tokens.shape))).encode())
    h.update(tokens.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def _pass_bytes(p: CleanPass) -> int:
    tensors = [t for kv in (p.kv or []) for t in (kv.keys, kv.values)] + list(p.resid.values())
    tensors += [p.logits] if p.logits is not None else []
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_fired(read: Sequence[str], got: dict, edited: Sequence[str] = (), fired: set[str] = frozenset()) -> None:
    """Refuse a read or edited hook that never fired (e.g. ``hook_rot_q`` without rotary positions), naming it."""
    missing = [n for n in read if n not in got] + sorted(set(edited) - set(fired))
    if missing:
        raise EngineError(
            f"hook(s) {missing} never fired in this model's forward pass (a read or edit there would be silently "
            "dropped); check the names against model.hook_dict"
        )


def _variant_reader(store: dict, name: str, detach: bool = True):
    """Engine hook that keeps ``[B, F, 1, *shape]`` at P as ``[B, F, *shape]`` (query row P for the pattern)."""

    def fn(x: torch.Tensor) -> None:
        # a copy: at the first recomputed hook x is a view of the kept clean residual stream
        row = at_query(x, name, 1)[:, :, 0]
        store[name] = row.detach().clone() if detach else row.clone()

    return fn


def _expand_variants(x: torch.Tensor, B: int, V: int) -> torch.Tensor:
    """``[B, F, *shape]`` with F in {1, V} -> ``[B, V, *shape]``."""
    return x if x.shape[1] == V else x.expand(B, V, *x.shape[2:])


def _check_edit_output(e: Edit, out: torch.Tensor, x: torch.Tensor, V: int) -> None:
    if out.shape[0] != x.shape[0] or out.shape[1] not in (1, V, x.shape[1]) or out.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"edit on {e.hook} returned shape {list(out.shape)} for input {list(x.shape)}; it must return "
            f"[B, 1 or V={V}, *act_shape]"
        )


def _read_values(e: Edit, captured: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The values of ``e.reads`` captured earlier in the pass (ValueError naming a hook that has not fired yet)."""
    missing = [h for h in e.reads if h not in captured]
    if missing:
        raise ValueError(f"the edit on {e.hook} reads {missing}, which did not fire before it; an edit can read only "
                         "hooks that run before its own")
    return [captured[h] for h in e.reads]


def _edit_at_single_position(e: Edit, B: int, V: int, fired: set[str] | None = None,
                             captured: dict[str, torch.Tensor] | None = None):
    """Engine hook: activations ``[B, F, 1, *shape]`` at P -> the edit's ``[B, F', 1, *shape]``.

    The edit gets a copy of the row at P (one position: cheap): the engine's activation at the first recomputed
    hook is a view of the kept clean residual stream, and a read of the same hook holds a view of it too, so an
    in-place edit (``x += v``) of the activation itself would corrupt both. For the attention pattern the row is
    query row P of every head (``[B, F, n_heads, key_pos]``). ``e.reads`` come from ``captured``.
    """

    def fn(x: torch.Tensor) -> torch.Tensor:
        if fired is not None:
            fired.add(e.hook)
        rows = at_query(x, e.hook, 1)[:, :, 0].clone()
        out = e.fn(rows, *_read_values(e, captured or {}))
        _check_edit_output(e, out, rows, V)
        return out.to(x.dtype).unsqueeze(query_axis(e.hook, x.dim(), 1) + 1)

    return fn


def _shared(rows: torch.Tensor) -> torch.Tensor:
    """``[B, V, *shape]`` -> ``[B, 1, *shape]`` when every variant still holds the same value, as the engine hands
    edits (``F = 1`` until an edit makes the variants differ), so an edit that expands to ``V`` variants sees the
    same shapes on both backends."""
    if rows.shape[1] > 1 and bool((rows == rows[:, :1]).all()):
        return rows[:, :1]
    return rows


def _capture_full(captured: dict[str, torch.Tensor], name: str, pos: torch.Tensor, B: int, V: int,
                  detach: bool = True):
    """Bridge hook on ``[B*V, T, *shape]`` keeping each row's value at its P as ``[B, V, *shape]`` (with its
    autograd graph when ``detach`` is False: gradients at P)."""

    def hook(value: torch.Tensor, hook=None) -> None:
        r = torch.arange(value.shape[0], device=value.device)
        row = value[r, pos.to(value.device)].reshape(B, V, *value.shape[2:])
        captured[name] = _shared(row.detach().clone() if detach else row.clone())

    return hook


@dataclass
class _PairState:
    """What :meth:`Interventions.run_paired` learns while its edits run.

    ``same`` (bool ``[B, V]``): the variant's output equalled the baseline row's value, bit for bit, at every edit
    site so far. Such a variant is the baseline run in exact arithmetic; only the float rounding of its separate
    row (CPU kernels treat rows differently by their place in a batch and by thread) could tell them apart, so it is
    re-aligned with the baseline at each later edit site and given the baseline's logits and reads at the end.
    ``base_hooks``: hooks with a baseline edit (there the variants' inputs are not the baseline's).
    """

    base_hooks: frozenset[str]
    same: torch.Tensor | None = None


def _paired_edit(e: Edit, V: int, base: bool, state: _PairState) -> Edit:
    """``e`` for :meth:`Interventions.run_paired`: activations ``[B, F, *shape]`` -> ``[B, 1 + V, *shape]``.

    A ``base`` edit acts on variant 0 alone, any other on variants ``1..V``. While the variants still share the
    value (``F == 1``) the edit gets its own copy and the other side keeps the value. Every other field of the
    :class:`Edit` is kept (``dataclasses.replace``). Variants that have matched the baseline so far are handed the
    baseline's value (``state``).
    """

    def side(values: tuple, first: bool) -> list:
        # values the edit reads (e.reads) split like x: variant 0 or variants 1..V, unless still shared
        return [a if a.shape[1] == 1 else (a[:, :1] if first else a[:, 1:]) for a in values]

    def fn(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        B = x.shape[0]
        shared = x.shape[1] == 1
        if base:
            mine = x.clone() if shared else x[:, :1]
            out = e.fn(mine, *side(args, True), **kwargs)
            _check_edit_output(e, out, mine, 1)
            if out.shape[1] != 1:
                raise ValueError(f"baseline edit on {e.hook} returned {out.shape[1]} variants; it must keep one")
            rest = x.expand(B, V, *x.shape[2:]) if shared else x[:, 1:]
            return torch.cat([out.to(x.dtype), rest], dim=1)
        if shared:
            mine = x.clone()
        elif V == 1 or torch.equal(x[:, 1:], x[:, 1:2].expand_as(x[:, 1:])):
            # the variants still share their value (only the baseline row was edited here): one row, as the
            # baseline's edit saw it, so a no-op gives the baseline's bits
            mine = x[:, 1:2].clone()
        elif state.same is not None and e.hook not in state.base_hooks:
            keep = state.same.reshape(B, V, *([1] * (x.dim() - 2))).to(x.device)
            mine = torch.where(keep, x[:, :1], x[:, 1:])  # equal in exact arithmetic: drop the rounding noise
        else:
            mine = x[:, 1:]
        out = e.fn(mine, *side(args, False), **kwargs)
        _check_edit_output(e, out, mine, V)
        if shared and out.shape[1] == 1 and torch.equal(out.to(x.dtype), x):
            return x  # an edit that changed nothing keeps the rows shared: one computation for all
        out = _expand_variants(out, B, V).to(x.dtype)
        same = (out == x[:, :1]).reshape(B, V, -1).all(-1)
        state.same = same if state.same is None else state.same & same.to(state.same.device)
        return torch.cat([x[:, :1], out], dim=1)

    return dataclasses.replace(e, fn=fn)


def _as_base(t: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """``t [B, 1 + V, ...]`` with variant ``v``'s values replaced by the baseline's where ``same [B, V]``."""
    keep = same.reshape(*same.shape, *([1] * (t.dim() - 2))).to(t.device)
    return torch.cat([t[:, :1], torch.where(keep, t[:, :1], t[:, 1:])], dim=1)


def _edit_hook_full(e: Edit, pos: torch.Tensor, B: int, V: int, captured: dict[str, torch.Tensor]):
    """Bridge hook on ``[B*V, T, *shape]``: edit each row at its P with the rows viewed as ``[B, V, *shape]``."""

    def hook(value: torch.Tensor, hook=None) -> torch.Tensor:
        r = torch.arange(value.shape[0], device=value.device)
        p = pos.to(value.device)
        at = at_query(value, e.hook)  # the attention pattern: query row P of every head
        rows = _shared(at[r, p].reshape(B, V, *at.shape[2:]))  # a copy: an in-place edit never reaches ``value``
        out = e.fn(rows, *_read_values(e, captured))
        _check_edit_output(e, out, rows, V)
        new = value.clone()
        at_query(new, e.hook)[r, p] = _expand_variants(out, B, V).reshape(B * V, *at.shape[2:]).to(value.dtype)
        return new

    return hook


def interventions_for(model, *, backend: str = "auto") -> Interventions:
    """The model's :class:`Interventions`, built once and kept on the model object.

    Args:
        model: a TransformerBridge (as from :func:`saecircuits.models.load.load_model`).
        backend: ``"auto"`` (the engine when it reproduces the bridge's logits, else the bridge), ``"engine"``
            (raise when the engine cannot serve this model) or ``"bridge"`` (full bridge forwards only).

    Returns:
        :class:`Interventions`. The engine holds references to the weights at the time it was built; after
        editing weights in place, call again with the same ``backend`` on a fresh model.

    Raises:
        EngineError: ``backend="engine"`` for a model the engine cannot compute.
        ValueError: unknown ``backend``.
    """
    if backend not in ("auto", "engine", "bridge"):
        raise ValueError(f"backend must be 'auto', 'engine' or 'bridge', got {backend!r}")
    cached = model.__dict__.get(_ATTR, {})
    if backend in cached:
        return cached[backend]
    if backend == "bridge":
        iv = Interventions(model, None, "bridge backend requested")
    else:
        try:
            iv = Interventions(model, Engine.from_bridge(model))
        except (EngineError, AttributeError, KeyError, IndexError, TypeError, RuntimeError) as err:
            # anything else than EngineError: a module layout the engine does not know how to read
            if not isinstance(err, EngineError):
                err = EngineError(f"the engine cannot read this model's modules ({err.__class__.__name__}: "
                                  f"{(str(err).splitlines() or [''])[0]})")
            if backend == "engine":
                raise err
            logger.warning("prefix-cached interventions unavailable (%s); using full bridge forwards", err)
            iv = Interventions(model, None, str(err))
    cached[backend] = iv
    model.__dict__[_ATTR] = cached
    return iv
