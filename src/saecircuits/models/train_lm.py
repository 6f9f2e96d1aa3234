"""Train the embedded default language model: a 2-layer GPT-Neo on generated dialogue stories.

The recipe (one :class:`LMConfig`) fixes everything that determines the result:

1. stories from :mod:`saecircuits.data.storygen` (training stream ``story_seed``, held-out stream
   ``heldout_seed``);
2. a byte-level BPE (``tokenizers``) trained on the first ``n_tokenizer_stories`` training stories, with
   ``<|endoftext|>`` as its only special token, used as BOS = EOS = PAD as in GPT-Neo / GPT-2; the closings
   ``."``, ``!"`` and ``?"`` are single tokens, as in the GPT-2 BPE (``."`` = 526 there);
3. a ``transformers.GPTNeoForCausalLM`` in the image of ``tiny-stories-2L-33M`` (layer 0 global attention,
   layer 1 local attention, ``gelu_new``, learned absolute positions, tied embeddings, no dropout), only smaller;
4. a plain PyTorch loop over packed token rows (AdamW, linear warm-up then cosine decay, gradient clipping);
5. evaluation: mean next-token loss on held-out stories, and the loss / accuracy / rank of ``."`` at the answer
   position of closing-quote prompts built as the reference notebook's test prompts.

:func:`train_lm_to_folder` runs all of it and writes a folder loadable with
``GPTNeoForCausalLM.from_pretrained`` and ``PreTrainedTokenizerFast.from_pretrained`` plus ``train_info.json``.
Nothing here changes process-wide torch settings (thread count, default dtype); the CLI does that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saecircuits.atomic import remove_dead_temps
from saecircuits.data.storygen import EOT, GENERATOR_VERSION, generate_stories
from saecircuits.progress import progress_bar

logger = logging.getLogger(__name__)

CLOSINGS = ('."', '!"', '?"')
"""Closing-quote strings that must be single tokens of the tokenizer."""

TRAIN_INFO = "train_info.json"


class TrainLMError(ValueError):
    """A language-model training recipe or folder is invalid."""


@dataclass(frozen=True)
class LMConfig:
    """Everything that determines the trained default model (its hash keys the cache).

    Stories:
        generator_version: :data:`saecircuits.data.storygen.GENERATOR_VERSION` the stories come from.
        story_seed / n_train_stories: the training stream and its size.
        heldout_seed / n_heldout_stories: the held-out stream (a different seed) and its size.
    Tokenizer:
        vocab_size: BPE vocabulary size including ``<|endoftext|>`` (id 0).
        n_tokenizer_stories: how many training stories the BPE is trained on.
    Model (GPT-Neo, 2 layers: ``attention_types`` = global then local):
        d_model, n_heads, d_mlp: widths (``d_head = d_model // n_heads``).
        n_ctx: learned positions = training row length.
        window_size: the local attention window of layer 1 (tokens).
    Training:
        seed: seeds initialisation and row sampling.
        steps, batch_size: optimiser steps and rows per step (tokens per step = batch_size * n_ctx).
        lr, warmup_steps, min_lr_ratio: peak learning rate, linear warm-up, cosine decay to lr * min_lr_ratio.
        weight_decay, beta1, beta2, grad_clip: AdamW and gradient-norm clipping.
    """

    generator_version: int = GENERATOR_VERSION
    story_seed: int = 0
    n_train_stories: int = 20000
    heldout_seed: int = 1
    n_heldout_stories: int = 600
    vocab_size: int = 2048
    n_tokenizer_stories: int = 4000
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 256
    window_size: int = 128
    seed: int = 0
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.generator_version != GENERATOR_VERSION:
            raise TrainLMError(
                f"generator_version={self.generator_version} but this code generates version {GENERATOR_VERSION}; "
                "older story streams cannot be reproduced: use the current version"
            )
        for name in ("n_train_stories", "n_heldout_stories", "n_tokenizer_stories", "d_model", "n_heads",
                     "d_mlp", "n_ctx", "window_size", "steps", "batch_size", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):  # `<= 0` let a NaN --lr through to torch's bare error
                raise TrainLMError(f"{name} must be a positive finite number, got {value}")
        if self.d_model % self.n_heads:  # after the sign checks: n_heads=0 would divide by zero
            raise TrainLMError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.vocab_size < 300:
            raise TrainLMError(f"vocab_size={self.vocab_size} is too small: the byte alphabet alone needs 257")
        if self.heldout_seed == self.story_seed:
            raise TrainLMError("heldout_seed must differ from story_seed, else the held-out stories are training stories")
        if self.n_tokenizer_stories > self.n_train_stories:
            raise TrainLMError("n_tokenizer_stories must be <= n_train_stories (the BPE sees training stories only)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """sha256 (hex, 16 chars) of the canonical JSON of all fields: equal configs, equal hash."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, save_dir: str | os.PathLike | None = None):
    """Train a GPT-2-style byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` is id 0 and serves as BOS, EOS and PAD (as in GPT-Neo); no token is added automatically
    when encoding (TransformerLens prepends BOS itself). Pre-tokenisation is GPT-2's regex without a prefix space.

    Args:
        texts: training texts (stories, without separators).
        vocab_size: final vocabulary size including the special token.
        save_dir: when given, the tokenizer is saved there and *reloaded from there* (TransformerLens needs a
            tokenizer with a ``name_or_path``).

    Returns:
        ``transformers.PreTrainedTokenizerFast``.

    Raises:
        TrainLMError: one of ``."``, ``!"``, ``?"`` did not become a single token (too few texts or too small a
            vocabulary).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT,
        clean_up_tokenization_spaces=False,
    )
    check_closing_tokens(hf)
    if save_dir is not None:
        hf.save_pretrained(str(save_dir))
        hf = PreTrainedTokenizerFast.from_pretrained(str(save_dir))
    return hf


def check_closing_tokens(tokenizer) -> dict[str, int]:
    """Ids of ``."``, ``!"``, ``?"``; raises :class:`TrainLMError` if one of them is not a single token in context.

    The check encodes ``Tom said, "Hi{c} Then`` and looks for the closing as one token, which is how it appears in
    stories (BPE merges depend on the pre-token, so checking the bare string would not be enough).
    """
    ids: dict[str, int] = {}
    for c in CLOSINGS:
        tid = tokenizer.convert_tokens_to_ids(c)
        (enc,) = encode_stories(tokenizer, [f'Tom said, "Hi{c} Then'])
        if tid is None or tid == tokenizer.unk_token_id or tid not in enc:
            raise TrainLMError(
                f"the tokenizer does not encode {c!r} as one token (got {tokenizer.convert_ids_to_tokens(enc)}); "
                "train the BPE on more dialogue or raise vocab_size"
            )
        ids[c] = int(tid)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: LMConfig, vocab_size: int, eos_id: int = 0):
    """A freshly initialised 2-layer ``GPTNeoForCausalLM`` (global then local attention), in eval mode.

    Dropout probabilities are all 0, so train and eval modes compute the same function. Initialisation is seeded
    with ``cfg.seed`` via a local ``torch.random.fork_rng`` (the global RNG is left untouched).
    """
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    hf_cfg = GPTNeoConfig(
        vocab_size=vocab_size,
        max_position_embeddings=cfg.n_ctx,
        hidden_size=cfg.d_model,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        num_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp,
        window_size=cfg.window_size,
        activation_function="gelu_new",
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPTNeoForCausalLM(hf_cfg)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Data


def encode_stories(tokenizer, stories: Sequence[str]) -> list[list[int]]:
    """Token ids of each story (no special tokens added), by the project's one encoding rule
    (:func:`saecircuits.models.tokens.encode_texts`): ``<|endoftext|>`` typed inside a story is text, never the EOS
    id that separates stories in the packed rows."""
    from saecircuits.models.tokens import encode_texts

    return encode_texts(tokenizer, stories)


def pack_rows(docs: Sequence[Sequence[int]], n_ctx: int, eos_id: int) -> torch.Tensor:
    """Concatenate ``[EOS] doc_0 [EOS] doc_1 ... [EOS]`` and cut it into rows of ``n_ctx`` tokens.

    The tail that does not fill a row is dropped. Returns int64 ``[n_rows, n_ctx]``.

    Raises:
        TrainLMError: the documents hold fewer than ``n_ctx`` tokens in all.
    """
    flat: list[int] = [eos_id]
    for d in docs:
        flat.extend(d)
        flat.append(eos_id)
    n_rows = len(flat) // n_ctx
    if n_rows == 0:
        raise TrainLMError(f"only {len(flat)} tokens, fewer than one row of n_ctx={n_ctx}; generate more stories")
    return torch.tensor(flat[: n_rows * n_ctx], dtype=torch.long).view(n_rows, n_ctx)


def lr_at(step: int, cfg: LMConfig) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up to ``lr``, cosine decay to ``lr*min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


@torch.enable_grad()  # trains even when the caller runs under torch.no_grad()
def train_model(model, rows: torch.Tensor, cfg: LMConfig, progress: bool = True) -> list[float]:
    """Train ``model`` in place on ``rows`` [n_rows, n_ctx] for ``cfg.steps`` steps; returns the loss per step (nats).

    Rows are visited in seeded random epochs (``torch.Generator`` seeded with ``cfg.seed``). The loss is the mean
    next-token cross-entropy over all positions of the batch (packed rows have no padding). The model is left in
    eval mode.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
    )
    order = torch.randperm(rows.shape[0], generator=gen)
    cursor = 0
    losses: list[float] = []
    model.train()
    bar = progress_bar(range(cfg.steps), desc="train-lm", enabled=progress)  # plain lines in a log file
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order = torch.randperm(rows.shape[0], generator=gen)
            cursor = 0
        batch = rows[order[cursor: cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) over all predicted positions of ``rows`` [n_rows, n_ctx]."""
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        b = rows[i: i + batch_size]
        logits = model(input_ids=b).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"))
        count += b[:, 1:].numel()
    return total / count


def closing_quote_prompts(stories: Sequence[str], tokenizer, max_tokens: int | None = None):
    """Closing-quote prompts as the reference notebook's test prompts (its cell In[11]), via
    :func:`saecircuits.tasks.closing_quote.closing_quote_task`.

    For each story containing ``said, "``: start = first occurrence + 7, end = first ``."`` at or after start;
    the prompt text is ``story[:end + 2]``, kept if its BOS-prefixed tokenisation ends with the single token
    ``."``. As in :class:`saecircuits.tasks.base.Task`, the returned token lists are BOS-prefixed and *exclude*
    the answer, so the prediction position is the last index.

    Args:
        stories: story texts.
        tokenizer: a tokenizer whose BOS is ``<|endoftext|>`` and in which ``."`` is one token.
        max_tokens: drop prompts whose token list (with BOS, without the answer) is longer (e.g. ``n_ctx``).

    Returns:
        ``(token_ids, answer_id, source_index)``: lists of BOS-prefixed prompts, the id of ``."``, and the index
        of the story each prompt comes from.
    """
    from saecircuits.tasks.base import TaskError
    from saecircuits.tasks.closing_quote import closing_quote_task

    answer_id = check_closing_tokens(tokenizer)['."']
    try:
        # Task.max_tokens counts the answer token too.
        task = closing_quote_task(stories, tokenizer, max_tokens=None if max_tokens is None else max_tokens + 1)
    except TaskError:
        return [], answer_id, []
    return task.token_ids, answer_id, task.source_index


@torch.no_grad()
def closing_quote_metrics(model, token_ids: Sequence[Sequence[int]], answer_id: int, pad_id: int,
                          max_tokens: int = 8192) -> dict[str, float]:
    """Loss, accuracy and rank of the answer ``."`` at each prompt's prediction position (its last token).

    Prompts are right-padded in length-sorted batches; the logits are read at each row's own last index, so
    padding changes nothing (see :mod:`saecircuits.models.tokens`).

    Returns:
        ``n`` (prompts), ``loss`` (mean -log p(answer), nats), ``accuracy`` (fraction where ``."`` is the argmax),
        ``mean_rank`` (mean 0-based rank of ``."`` among all tokens; 0 = top), ``mean_prob``.

    Raises:
        TrainLMError: no prompts.
    """
    from saecircuits.models.tokens import batches_by_length, gather_positions, pad_right

    if len(token_ids) == 0:
        raise TrainLMError("no closing-quote prompts to evaluate; the stories contain no 'said, \"' ... '.\"'")
    n = len(token_ids)
    loss = torch.empty(n)
    rank = torch.empty(n)
    prob = torch.empty(n)
    for idx in batches_by_length(token_ids, max_tokens=max_tokens):
        toks, lengths = pad_right([token_ids[i] for i in idx], pad_id)
        logits = model(input_ids=toks).logits  # [b, pos, vocab]
        last = gather_positions(logits, lengths - 1).float()  # [b, vocab]
        logp = last.log_softmax(-1)
        target = logp[:, answer_id]
        loss[idx] = -target
        prob[idx] = target.exp()
        rank[idx] = (logp > target[:, None]).sum(-1).float()
    return dict(n=n, loss=float(loss.mean()), accuracy=float((rank == 0).float().mean()),
                mean_rank=float(rank.mean()), mean_prob=float(prob.mean()))


# ---------------------------------------------------------------------------------------------------------------
# The whole recipe


def make_readable(folder: str | os.PathLike) -> None:
    """chmod a model folder to 0755 and its files to 0644 (``mkdtemp`` and some writers create them private)."""
    folder = Path(folder)
    os.chmod(folder, 0o755)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)


def load_lm(folder: str | os.PathLike):
    """Load ``(model, tokenizer)`` from a folder written by :func:`train_lm_to_folder` (model in eval mode).

    Raises:
        FileNotFoundError: ``folder`` has no ``config.json`` / ``model.safetensors``.
    """
    from transformers import GPTNeoForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder} has no {f}; it is not a saecircuits LM folder (run `saecircuits train-lm`)")
    model = GPTNeoForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return model, tokenizer


def read_train_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``train_info.json`` of an LM folder (raises ``FileNotFoundError`` when absent)."""
    return json.loads((Path(folder) / TRAIN_INFO).read_text())


def train_lm_to_folder(out: str | os.PathLike, cfg: LMConfig, progress: bool = True,
                       overwrite: bool = False) -> Path:
    """Run the full recipe of ``cfg`` and write the result to ``out`` atomically.

    Everything is written to a temporary sibling folder first and renamed onto ``out`` at the end, so ``out``
    either does not exist or is complete. ``out`` holds ``config.json`` + ``model.safetensors``
    (``save_pretrained``), the tokenizer files and ``train_info.json`` (config, its hash, seed, steps, tokens
    seen, wall time, per-step training losses, held-out loss in nats/token and closing-quote metrics).

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        TrainLMError: an invalid recipe (see :class:`LMConfig`).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out.parent)  # what killed runs left (the pid is in the name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        t0 = time.perf_counter()
        logger.info("generating %d training and %d held-out stories", cfg.n_train_stories, cfg.n_heldout_stories)
        train_stories = generate_stories(cfg.n_train_stories, cfg.story_seed)
        heldout_stories = generate_stories(cfg.n_heldout_stories, cfg.heldout_seed)
        tokenizer = train_bpe_tokenizer(train_stories[: cfg.n_tokenizer_stories], cfg.vocab_size, save_dir=tmp)
        eos = tokenizer.eos_token_id
        rows = pack_rows(encode_stories(tokenizer, train_stories), cfg.n_ctx, eos)
        heldout_rows = pack_rows(encode_stories(tokenizer, heldout_stories), cfg.n_ctx, eos)
        # the evaluation prompts need only the tokenizer: found before training, so that too few held-out stories
        # fail now, not after the training they would have wasted
        prompts, answer_id, _ = closing_quote_prompts(heldout_stories, tokenizer, max_tokens=cfg.n_ctx)
        if not prompts:
            raise TrainLMError(
                f"the {cfg.n_heldout_stories} held-out stories hold no closing-quote prompt ('said, \"' ... '.\"' "
                f"within n_ctx={cfg.n_ctx} tokens) to evaluate the model on; give more --n-heldout-stories "
                "(default 600)")
        model = build_model(cfg, vocab_size=len(tokenizer), eos_id=eos)
        t_train = time.perf_counter()
        losses = train_model(model, rows, cfg, progress=progress)
        train_s = time.perf_counter() - t_train
        cq = closing_quote_metrics(model, prompts, answer_id, pad_id=eos)
        info = dict(
            config=cfg.to_dict(),
            config_hash=cfg.config_hash(),
            seed=cfg.seed,
            steps=cfg.steps,
            tokens_seen=cfg.steps * cfg.batch_size * cfg.n_ctx,
            train_rows=int(rows.shape[0]),
            train_tokens_available=int(rows.numel()),
            n_params=int(sum(p.numel() for p in model.parameters())),
            train_wall_s=round(train_s, 2),
            total_wall_s=round(time.perf_counter() - t0, 2),
            torch_threads=torch.get_num_threads(),
            final_train_loss=sum(losses[-20:]) / len(losses[-20:]),
            heldout_loss=mean_loss(model, heldout_rows),
            closing_quote=cq,
            closing_token_ids=check_closing_tokens(tokenizer),
            losses=[round(x, 5) for x in losses],
        )
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=1))
        make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("trained LM in %.1f s: held-out loss %.4f, closing-quote loss %.4f",
                info["total_wall_s"], info["heldout_loss"], cq["loss"])
    return out
