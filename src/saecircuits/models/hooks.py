"""Scoped hook helpers: batched forward passes over a Task, read and edited at each row's own prediction position.

Every analysis goes through these helpers so that one position contract holds (tasks/base.py): rows are right-padded
(``models/tokens.py``), and each row is read *and* edited at its own absolute prediction index ``P_i`` with a gather /
scatter, never at ``-1`` or ``-2`` and never only in batch row 0 (the reference notebook's hooks edited batch row 0,
correct only one prompt at a time, and the activation at index -2 pairs with the loss at index -1). Hooks are
installed with ``model.run_with_hooks`` and removed when the call returns.

Right padding cannot change a real position's value in a causal model (see ``models/tokens.py``), so a row's result
is the same whether it is run alone or in a batch (tested to 1e-5).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from saecircuits.models.tokens import batches_by_length, check_context, pad_right
from saecircuits.tasks.base import Task

__all__ = [
    "TaskBatch",
    "pad_id_of",
    "bos_id_of",
    "n_ctx_of",
    "row_batches",
    "task_batches",
    "with_progress",
    "edit_at_positions",
    "run_at_positions",
    "HEAD_FIRST_HOOKS",
    "query_axis",
    "at_query",
    "answer_metrics",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MAX_BATCH",
    "unknown_hooks",
    "unknown_hook_message",
]

DEFAULT_MAX_TOKENS = 8192
"""Default padded-token budget per forward (logits are ``[batch, pos, d_vocab]``; lower it for big vocabularies)."""
DEFAULT_MAX_BATCH = 64

EditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_COMMON_SITES = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "mlp.hook_post", "attn.hook_z")


def unknown_hooks(model, hooks: Sequence[str]) -> list[str]:
    """The names of ``hooks`` that ``model.hook_dict`` lacks ([] when the model has no ``hook_dict`` to ask)."""
    known = getattr(model, "hook_dict", None)
    return [] if known is None else [h for h in hooks if h not in known]


def unknown_hook_message(model, hooks: Sequence[str], fix: str, n: int = 4) -> str:
    """One line for hooks the model lacks: names them and the model's layers, lists a few valid hooks (the closest
    in spelling to the first one, by :func:`difflib.get_close_matches`, else the common sites of block 0) and ends
    with ``fix``: the option or argument that sets the hook, e.g. "give the hook the SAE reads with --hook HOOK"."""
    import difflib

    names = list(getattr(model, "hook_dict", None) or [])
    near = difflib.get_close_matches(hooks[0], names, n=n, cutoff=0.6) if hooks and names else []
    if not near:
        near = [h for h in (f"blocks.0.{s}" for s in _COMMON_SITES) if h in names][:n]
    cfg = getattr(model, "cfg", None)
    n_layers = getattr(cfg, "n_layers", None)
    layers = f" (its blocks are 0..{int(n_layers) - 1})" if isinstance(n_layers, int) and n_layers > 0 else ""
    missing = ", ".join(repr(h) for h in hooks)
    return (f"this model has no hook {missing}{layers}"
            + (f"; valid hooks include {', '.join(near)} (all: model.hook_dict)" if near else "") + f"; {fix}")


@dataclass
class TaskBatch:
    """One right-padded batch of rows.

    Attributes:
        indices: the row indices (into the caller's row list) in batch order, ``len == b``.
        tokens: int64 ``[b, max_len]``, right-padded.
        positions: int64 ``[b]``, absolute prediction index of each row (its last real token).
        answer_ids: int64 ``[b]`` (``-1`` when the rows have no answers).
    """

    indices: list[int]
    tokens: torch.Tensor
    positions: torch.Tensor
    answer_ids: torch.Tensor


def pad_id_of(model) -> int:
    """Pad id for right padding: the tokenizer's pad id, else its EOS/BOS id, else 0 (its value never matters)."""
    tok = getattr(model, "tokenizer", None)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tok, name, None) if tok is not None else None
        if value is not None:
            return int(value)
    return 0


def bos_id_of(model) -> int | None:
    """BOS id of the model's tokenizer (``None`` when it has none)."""
    tok = getattr(model, "tokenizer", None)
    value = getattr(tok, "bos_token_id", None) if tok is not None else None
    return None if value is None else int(value)


def n_ctx_of(model) -> int | None:
    """The model's context length (``cfg.n_ctx``), or None when it does not say."""
    value = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return None if value is None else int(value)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def row_batches(
    token_rows: Sequence[Sequence[int]],
    pad_id: int,
    *,
    answer_ids: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    device: torch.device | str | None = None,
    n_ctx: int | None = None,
    what: str = "token row",
) -> Iterator[TaskBatch]:
    """Right-padded batches of arbitrary token rows, grouped by length; prediction position = last real token.

    Args:
        token_rows: ``n`` non-empty token lists.
        pad_id: padding id.
        answer_ids: optional ``n`` answer ids (else ``-1``).
        max_tokens, max_batch: batch budget (``batches_by_length``).
        device: where the tensors go.
        n_ctx: the model's context (:func:`n_ctx_of`); longer rows are refused before any forward pass.
        what: what a row is, for the error message.

    Yields:
        :class:`TaskBatch`; every row index appears exactly once over all batches.

    Raises:
        ContextLengthError: a row is longer than ``n_ctx`` (``models.tokens.check_context``).
    """
    check_context(token_rows, n_ctx, what)
    for idx in batches_by_length(token_rows, max_tokens=max_tokens, max_batch=max_batch):
        tokens, lengths = pad_right([token_rows[i] for i in idx], pad_id)
        answers = torch.tensor([answer_ids[i] for i in idx] if answer_ids is not None else [-1] * len(idx))
        yield TaskBatch(idx, tokens.to(device), (lengths - 1).to(device), answers.to(device))


def task_batches(
    model,
    task: Task,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Iterator[TaskBatch]:
    """Right-padded batches of a Task's prompts on the model's device (``row_batches`` with the task's answers)."""
    yield from row_batches(
        task.token_ids,
        pad_id_of(model),
        answer_ids=task.answer_ids,
        max_tokens=max_tokens,
        max_batch=max_batch,
        device=_device_of(model),
        n_ctx=n_ctx_of(model),
        what="task prompt",
    )


def with_progress(batches: Iterator[TaskBatch], total: int, desc: str, enabled: bool) -> Iterator[TaskBatch]:
    """Yield ``batches`` while a progress bar (tqdm on a terminal, plain lines in a log) counts their rows."""
    from saecircuits.progress import progress_bar

    bar = progress_bar(total=total, desc=desc, enabled=enabled)
    try:
        for batch in batches:
            yield batch
            bar.update(len(batch.indices))
    finally:
        bar.close()


def edit_at_positions(positions: torch.Tensor, edit: EditFn, hook_name: str = "") -> Callable:
    """A hook that edits each row at its own position and leaves every other position untouched.

    Args:
        positions: int64 ``[b]``, absolute index per row.
        edit: ``edit(rows, row_index) -> new_rows`` with ``rows [b, *act_shape]`` the activations of each row at its
            position and ``row_index`` int64 ``[b]`` (0..b-1); must return the same shape. Row-dependent edits
            (e.g. ablating a different feature in each row) use ``row_index`` or closures over per-row tensors.
        hook_name: the hook it goes on; the attention pattern and scores are edited at query row P of every head
            (:func:`query_axis`).

    Returns:
        A TransformerLens hook function ``(value, hook) -> value``.
    """

    def hook(value: torch.Tensor, hook=None) -> torch.Tensor:
        rows = torch.arange(value.shape[0], device=value.device)
        pos = positions.to(value.device)
        new = value.clone()
        at_query(new, hook_name)[rows, pos] = edit(at_query(value, hook_name)[rows, pos], rows).to(value.dtype)
        return new

    return hook


_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")

HEAD_FIRST_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")
"""Hooks whose activation is ``[batch, head, query_pos, key_pos]``: the position axis is the query axis, 2."""


PER_HEAD_NORM_HOOKS = ("attn.hook_q_normed", "attn.hook_k_normed")
"""Queries/keys after a q/k RMSNorm: ``[batch, head, pos, d_head]`` when the norm is per head (Qwen 3, as the bridge
fires them), ``[batch, pos, heads * d_head]`` when it spans the projection (OLMo 2)."""


def query_axis(hook_name: str, ndim: int | None = None, axis_offset: int = 0) -> int:
    """The axis of a hook's ``[batch, ...]`` activation that indexes the (query) position: 1, or 2 for the
    attention pattern and scores (``[batch, head, query, key]``), whose row at P is every head's query row P, and
    for per-head q/k norm outputs (``[batch, head, pos, d_head]``: ``ndim`` 4, plus ``axis_offset``)."""
    if hook_name.endswith(HEAD_FIRST_HOOKS):
        return 2
    if hook_name.endswith(PER_HEAD_NORM_HOOKS) and ndim == 4 + axis_offset:
        return 2
    return 1


def at_query(value: torch.Tensor, hook_name: str, axis_offset: int = 0) -> torch.Tensor:
    """``value`` viewed with its position axis at ``1 + axis_offset`` (a view: writes go through to ``value``).

    ``axis_offset`` counts extra axes after the batch axis (the engine's variant axis ``F``: 1)."""
    q = query_axis(hook_name, value.dim(), axis_offset) + axis_offset
    return value if q == 1 + axis_offset else value.movedim(q, 1 + axis_offset)


def stop_layer_for(hook_points: Sequence[str], n_layers: int | None) -> int | None:
    """The ``stop_at_layer`` that still fires every hook in ``hook_points`` (None: the whole model is needed).

    ``blocks.{L}.*`` hooks need blocks ``0..L`` only, so a forward that just reads them can stop after block
    ``max(L) + 1``; any other hook (``hook_embed``, ``ln_final.*``) needs the whole model.
    """
    layers = []
    for hp in hook_points:
        m = _LAYER_RE.match(hp)
        if m is None:
            return None
        layers.append(int(m.group(1)))
    if not layers:
        return None
    stop = max(layers) + 1
    if n_layers is not None and stop >= n_layers:
        return None
    return stop


def attn_scores_probes(read: Sequence[str]) -> list[str]:
    """The ``hook_pattern`` hooks to read beside each ``hook_attn_scores`` in ``read`` (for :func:`check_attn_scores`)."""
    probes = [n[: -len("hook_attn_scores")] + "hook_pattern" for n in read if n.endswith("attn.hook_attn_scores")]
    return [n for n in dict.fromkeys(probes) if n not in read]


def check_attn_scores(read: Sequence[str], captured: dict[str, torch.Tensor]) -> None:
    """Refuse a ``hook_attn_scores`` read that holds the attention pattern.

    A TransformerBridge that delegates attention to the Hugging Face module (GPT-Neo's) fires ``hook_attn_scores``
    afterwards with the post-softmax weights; the scores and the pattern are never equal in a real forward.

    Raises:
        ValueError: naming the hook and what to read instead.
    """
    for n in read:
        pattern = n[: -len("hook_attn_scores")] + "hook_pattern"
        if n.endswith("attn.hook_attn_scores") and pattern in captured and torch.equal(captured[n], captured[pattern]):
            raise ValueError(f"{n} of this model's TransformerBridge holds the attention pattern, not the scores (it "
                             f"is fired after the HF attention); read {pattern} instead")


def run_at_positions(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    *,
    read: Sequence[str] = (),
    edits: Sequence[tuple[str, Callable]] = (),
    return_logits: bool = True,
    grad: bool = False,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """One forward pass; returns the logits and the named activations, each gathered at every row's position.

    Read hooks run before edit hooks on the same hook point, so ``read`` gives the clean value of an edited hook.
    The attention pattern and scores (``[b, head, query, key]``) are read at each row's query row P (every head).

    Args:
        model: a TransformerBridge (or anything with ``run_with_hooks``).
        tokens: int64 ``[b, pos]`` right-padded.
        positions: int64 ``[b]``.
        read: hook names (TL legacy names are fine) to capture at the positions -> ``[b, *act_shape]``.
        edits: ``(hook_name, hook_fn)`` pairs, e.g. from :func:`edit_at_positions`.
        return_logits: also return the logits at the positions ``[b, d_vocab]`` (float32).
        grad: run with autograd on, so tensors the edits mark with ``requires_grad_`` get gradients from the
            returned logits (the bridge's own parameters stay frozen); reads are detached either way.

    Returns:
        ``(logits_at_positions or None, {name: activation_at_positions})``.

    Raises:
        KeyError: a hook in ``read`` or ``edits`` the model lacks (naming it and a few valid ones:
            :func:`unknown_hook_message`) or that never fired (naming it), never a silently dropped edit.
        ValueError: an edit the bridge fired but discarded (``hook_pattern`` of attention it delegates to the HF
            module, e.g. GPT-Neo's), or a read of ``hook_attn_scores`` that the bridge fills with the pattern.
    """
    unknown = unknown_hooks(model, [*read, *(n for n, _ in edits)])
    if unknown:  # before the bridge's own "does not exist", which names no valid hook
        raise KeyError(unknown_hook_message(model, unknown, "check the hook names"))
    captured: dict[str, torch.Tensor] = {}
    rows = torch.arange(tokens.shape[0], device=tokens.device)

    def reader(name: str) -> Callable:
        def hook(value: torch.Tensor, hook=None) -> None:
            v = at_query(value, name)
            captured[name] = v[rows.to(v.device), positions.to(v.device)].detach().clone()

        return hook

    fired: set[str] = set()

    def recorded(name: str, fn: Callable) -> Callable:
        def hook(value: torch.Tensor, hook=None):
            fired.add(name)
            return fn(value, hook=hook)

        return hook

    probes = attn_scores_probes(read)
    fwd_hooks = [(name, reader(name)) for name in list(read) + probes] + [(n, recorded(n, fn)) for n, fn in edits]
    kwargs = {}
    if not return_logits and not edits:  # reading only: later blocks cannot change what is read
        stop = stop_layer_for(list(read), getattr(getattr(model, "cfg", None), "n_layers", None))
        if stop is not None:
            kwargs["stop_at_layer"] = stop
    with torch.set_grad_enabled(grad), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.run_with_hooks(
            tokens, fwd_hooks=fwd_hooks, return_type="logits" if return_logits else None, **kwargs
        )
    for w in caught:
        text = str(w.message)
        if "edit is discarded" in text:  # the bridge fired the hook after the HF module used the value
            named = [n for n, _ in edits if n.rsplit(".", 1)[-1] in text]
            raise ValueError(
                f"the edit on {named or 'a hook'} is discarded by this model's TransformerBridge (it fires the hook "
                f"after its attention has used the value); edit a hook that feeds the output, e.g. attn.hook_z. "
                f"Bridge: {text}"
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    missing = [n for n in read if n not in captured] + sorted({n for n, _ in edits} - fired)
    if missing:
        raise KeyError(f"hook(s) {missing} never fired; check the hook names against model.hook_dict")
    check_attn_scores(read, captured)
    for n in probes:
        captured.pop(n, None)
    logits = None
    if return_logits:
        logits = out[rows.to(out.device), positions.to(out.device)].float()
    return logits, captured


def answer_metrics(logits: torch.Tensor, answer_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss, log-prob, logit and rank of the answer from the logits at the prediction position.

    Args:
        logits: ``[b, d_vocab]`` at each row's prediction position, or ``[b, V, d_vocab]`` (V edited variants of
            each row, as :meth:`saecircuits.models.interventions.Interventions.run` returns).
        answer_ids: int64 ``[b]`` (shared by a row's variants).

    Returns:
        dict of float32 tensors ``[b]`` (or ``[b, V]``): ``loss`` (nats, ``-logprob``), ``logprob`` (nats),
        ``logit``, and ``rank`` (number of tokens with a strictly higher logit; 0 = top, ties favourable, as the
        reference notebook's rank analysis).
    """
    logits = logits.float()
    ans = answer_ids.to(logits.device).reshape(-1, *([1] * (logits.dim() - 1)))
    ans = ans.expand(*logits.shape[:-1], 1)
    logit = logits.gather(-1, ans)[..., 0]
    flat, flat_logit = logits.reshape(-1, logits.shape[-1]), logit.reshape(-1)
    lse = torch.empty_like(flat_logit)
    rank = torch.zeros_like(flat_logit)
    n, threads = flat.shape[0], torch.get_num_threads()
    if flat.device.type != "cpu" or threads <= 1 or n <= _METRIC_ROWS or torch.is_grad_enabled() and flat.requires_grad:
        _reduce_rows(flat, flat_logit, lse, rank, 0, n)
    else:
        # CPU: each thread reduces its own span of rows single-threaded, a few rows at a time. Letting every
        # few-row op split over the threads instead costs a thread barrier per op (3-5x slower than one thread on a
        # shared machine whose other jobs keep a thread waiting); one span per thread has no barrier.
        from concurrent.futures import ThreadPoolExecutor

        step = -(-n // threads)
        spans = [(s, min(n, s + step)) for s in range(0, n, step)]
        inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

        def work(span: tuple[int, int]) -> None:
            with torch.inference_mode(inference):
                _reduce_rows(flat, flat_logit, lse, rank, *span)

        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(len(spans)) as pool:
                list(pool.map(work, spans))
        finally:
            torch.set_num_threads(threads)
    logprob = logit - lse.reshape(logit.shape)
    return {"loss": -logprob, "logprob": logprob, "logit": logit, "rank": rank.reshape(logit.shape)}


def _reduce_rows(flat: torch.Tensor, flat_logit: torch.Tensor, lse: torch.Tensor, rank: torch.Tensor, start: int,
                 stop: int) -> None:
    """Into ``lse`` / ``rank`` rows ``start:stop``: log-sum-exp and rank of the answer logit of ``flat [n, d_vocab]``.

    A few rows at a time, so that each row's max, exp-sum and rank count read it while it is still in cache (about
    2x faster than whole-tensor ops with a 50,257-token vocabulary; the values are the same)."""
    for s in range(start, stop, _METRIC_ROWS):
        e = min(stop, s + _METRIC_ROWS)
        x, a = flat[s:e], flat_logit[s:e]
        m = x.amax(-1)
        lse[s:e] = (x - m[:, None]).exp_().sum(-1).log_() + m
        if bool((a < m).any()):  # rank 0 where the answer holds the maximum (most rows of a performed task)
            rank[s:e] = (x > a[:, None]).sum(-1, dtype=torch.int32).float()


_METRIC_ROWS = 8
"""Rows of logits :func:`answer_metrics` reduces at a time (8 x 50,257 float32 is 1.6 MB)."""
