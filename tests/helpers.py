"""Shared test fixtures: a tiny tokenizer, tiny random GPT-Neo / Llama models through TransformerBridge, tiny SAEs.

Everything is built offline in-process and cached per test session (building a bridge costs ~1 s).
- ``tiny_tokenizer()``: byte-level BPE trained on a few story sentences; BOS = EOS = PAD = ``<|endoftext|>`` = 0 (as
  GPT-2 BPE) and ``."``, ``!"``, ``?"`` are single tokens (as in GPT-2 BPE, where ``."`` is 526).
- ``tiny_neo()``: 2-layer GPT-Neo (LayerNorm, learned positions, biases), processed with ``enable_compatibility_mode``
  (fold_ln, center_writing_weights, center_unembed).
- ``tiny_llama()``: 2-layer Llama (RMSNorm, rotary, bias-free, GQA with 2 query heads per KV head).
- ``tiny_gpt2()``: 2-layer GPT-2 (LayerNorm, learned positions, Conv1D weights, scaled attention).
- ``token_rows(n, lengths)``: random token rows (BOS first) of the given lengths, for padded-batch tests.
- ``exact_sae(d_in, hook)``: d_sae = 2 d_in, W_enc = [I, -I], W_dec = [I; -I], biases 0, so decode(encode(x)) =
  ReLU(x) - ReLU(-x) = x exactly. ``zero_sae``: all parameters 0 (reconstruction 0). ``random_sae``: sparse-ish
  random ReLU SAE.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from saecircuits.saes.base import SAE, SAEConfig  # noqa: E402

HOOK = "blocks.1.mlp.hook_post"
D_MLP = 64
SENTENCES = [
    'Tom said, "I like the dog." Then Sue said, "Yes!" They ran home.',
    'Mom said, "Go to bed." He went to bed.',
    'The cat said, "Can I play?" The dog said, "No." The cat was sad.',
    'Lily said, "Look at the big red ball!" Ben smiled.',
    "Once upon a time, there was a little girl named Lily. She liked to play in the park.",
    'The bird said, "I can fly high." Then it flew away. The sun was warm.',
    'Ben asked, "Why?" Sue asked, "Who?" Tom asked, "Can we go?" Mom said, "Wow!"',
]

STORIES = [
    'Once upon a time, Tom said, "I want to play." Mom smiled.',
    'The dog ran. Sue said, "Stop!" The dog said, "Why?" Sue said, "It is late." They went home.',
    'Lily was happy. She said, "Look at the sun." It was warm and big and red.',
    "There was no quote in this story at all.",
    'Ben said, "Hello, friend." He waved.',
    'The bird said, "I can fly high, look at me, I am in the sky." Then it flew away.',
    'Mom said, "Go to bed now, it is very late and the moon is up." Tom went to bed.',
    'Sue said, "Where is the ball?" Tom said, "Here it is." She was glad.',
]


@functools.cache
def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (saved and reloaded from a temp dir, as TL requires)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 30 + STORIES * 5, trainer)
    folder = tempfile.mkdtemp(prefix="saecircuits-tok-")
    special = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special
    ).save_pretrained(folder)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(folder)
    for closing in ('."', '!"', '?"'):
        ids = hf_tok(closing, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"fixture tokenizer must encode {closing!r} as one token, got {ids}"
    return hf_tok


def tiny_neo_hf(seed: int = 0):
    """A fresh tiny random GPT-Neo (d_model 32, 4 heads, d_mlp 64, 2 layers: global + local, window 16), HF only."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    tok = tiny_tokenizer()
    cfg = GPTNeoConfig(
        vocab_size=len(tok),
        max_position_embeddings=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=D_MLP,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    hf = GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init so features and logits vary visibly
        for p in hf.parameters():
            p.mul_(3.0)
    return hf


def _boot(name: str, hf):
    from transformer_lens import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tiny_tokenizer())
    bridge.enable_compatibility_mode()
    return bridge


@functools.cache
def tiny_neo(seed: int = 0):
    """Tiny random GPT-Neo (d_model 32, 4 heads, d_mlp 64, 2 layers: global + local attention) as a bridge."""
    return _boot("tiny-neo", tiny_neo_hf(seed))


def tiny_llama_hf(seed: int = 0):
    """A fresh tiny random Llama (RMSNorm, rotary, no biases, 4 query heads sharing 2 KV heads), HF only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))  # non-trivial RMSNorm weights, so folding matters
    return hf


@functools.cache
def tiny_llama(seed: int = 0):
    """Tiny random Llama (RMSNorm, rotary, no biases, 4 query heads sharing 2 KV heads) as a bridge."""
    return _boot("tiny-llama", tiny_llama_hf(seed))


def tiny_gpt2_hf(seed: int = 0):
    """A fresh tiny random GPT-2 (d_model 32, 4 heads, d_mlp 64, 2 layers), HF only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=D_MLP,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3.0)
    return hf


@functools.cache
def tiny_gpt2(seed: int = 0):
    """Tiny random GPT-2 (d_model 32, 4 heads, d_mlp 64, 2 layers) as a processed bridge."""
    return _boot("tiny-gpt2", tiny_gpt2_hf(seed))


ARCHITECTURES = {"gpt_neo": tiny_neo, "gpt2": tiny_gpt2, "llama": tiny_llama}
HF_BUILDERS = {"gpt_neo": tiny_neo_hf, "gpt2": tiny_gpt2_hf, "llama": tiny_llama_hf}
"""The block shapes the prefix-cached engine must reproduce (GPT-Neo global + local, GPT-2, Llama rotary + GQA)."""

NO_CUDA = ("no CUDA device here (torch.cuda.is_available() is False); benchmarks/gpu_check.sh runs these on a GPU")


def _precision(device: str, dtype: torch.dtype):
    import pytest

    marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)] if device == "cuda" else []
    return pytest.param(device, dtype, id=f"{device}-{str(dtype).removeprefix('torch.')}", marks=marks)


PRECISIONS = [_precision(d, t) for d in ("cpu", "cuda") for t in (torch.float32, torch.bfloat16)]
"""``(device, dtype)`` parameters of the engine's exactness tests, ids ``cpu-float32`` ... ``cuda-bfloat16`` (the
CUDA ones skip, saying why, where there is no GPU; ``pytest -k cuda`` selects them)."""


@functools.cache
def tiny_model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The tiny bridge of ``arch`` on ``device`` in ``dtype``: ``ARCHITECTURES[arch]()`` itself on CPU in float32,
    else the same weights (seed 0) loaded by ``load_hf_model`` in ``dtype`` on ``device``."""
    if device == "cpu" and dtype == torch.float32:
        return ARCHITECTURES[arch]()
    from saecircuits.models.load import load_hf_model

    return load_hf_model(HF_BUILDERS[arch](0), tiny_tokenizer(), device=device, dtype=dtype)


def rounding_tolerance(dtype: torch.dtype, scale: float, n_layers: int) -> float:
    """How far two computations of one ``n_layers``-block forward in ``dtype`` may differ when they order or fuse
    their operations differently (the engine against the bridge, a GPU kernel against a CPU one), for values of
    size up to ``scale`` (the largest |value| of the reference tensor).

    Each path rounds every residual-stream write and sum to ``dtype`` (relative error ``eps / 2``, ``eps`` =
    ``torch.finfo(dtype).eps``, 2**-7 for bfloat16): two per block (attention, MLP) and one more for the embedding
    and the unembedding. The two paths' roundings differ by at most ``eps`` each and add up in the worst case, so
    ``2 * (n_layers + 1) * eps * scale``. Measured on the tiny models in bfloat16: at most 2.7 eps * scale (GPT-Neo's
    attention pattern), under half this bound for 2 layers."""
    return 2 * (n_layers + 1) * torch.finfo(dtype).eps * scale


def token_rows(lengths, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    """Random token rows starting with BOS (id 0) of the given lengths (longer than tiny_neo's 16-token window)."""
    gen = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(1, vocab, (n - 1,), generator=gen).tolist() for n in lengths]


def exact_sae(d_in: int = D_MLP, hook_point: str = HOOK) -> SAE:
    """SAE with decode(encode(x)) == x exactly: W_enc = [I, -I], W_dec = [I; -I], all biases 0."""
    sae = SAE(SAEConfig("standard", d_in=d_in, d_sae=2 * d_in, hook_point=hook_point))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def zero_sae(d_in: int = D_MLP, d_sae: int = 16, hook_point: str = HOOK) -> SAE:
    """SAE whose parameters are all zero: encode(x) = 0 and decode(f) = 0 (b_dec = 0)."""
    return SAE(SAEConfig("standard", d_in=d_in, d_sae=d_sae, hook_point=hook_point))


def random_sae(d_in: int = D_MLP, d_sae: int = 96, hook_point: str = HOOK, seed: int = 0) -> SAE:
    """Random ReLU SAE with a negative encoder bias, so each feature fires on some positions and not others."""
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig("standard", d_in=d_in, d_sae=d_sae, hook_point=hook_point))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) / d_in**0.5)
        sae.b_enc.copy_(-0.3 * torch.rand(d_sae, generator=gen))
        sae.b_dec.copy_(0.05 * torch.randn(d_in, generator=gen))
    return sae


def quote_task(model=None):
    """The closing-quote task over :data:`STORIES` (several prompts of different lengths)."""
    from saecircuits.tasks.closing_quote import closing_quote_task

    return closing_quote_task(STORIES, tiny_tokenizer(), closings=('."', '!"', '?"'))


NO_BOS_WORDS = "a b c d e f g h i j k l m n o [UNK] said the ."


def no_bos_folder(folder):
    """A tiny GPT-Neo whose word-level tokenizer has no BOS, EOS or PAD; ``[UNK]`` is id 15."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(NO_BOS_WORDS.split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    cfg = GPTNeoConfig(
        vocab_size=len(vocab), max_position_embeddings=32, hidden_size=16, num_layers=1, num_heads=2,
        intermediate_size=32, attention_types=[[["global"], 1]], bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    GPTNeoForCausalLM(cfg).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def analyses_on_backend(model, backend: str):
    """Make the analyses' ``interventions_for(model)`` return ``backend`` ("engine" or "bridge") inside the block,
    then put the model's cached interventions back (the tiny models are shared between tests)."""
    from saecircuits.models.interventions import interventions_for

    saved = model.__dict__.pop("_saecircuits_interventions", None)
    try:
        model.__dict__["_saecircuits_interventions"] = {"auto": interventions_for(model, backend=backend)}
        yield
    finally:
        if saved is None:
            model.__dict__.pop("_saecircuits_interventions", None)
        else:
            model.__dict__["_saecircuits_interventions"] = saved


def engine_hooks_and_logits(engine, tokens, names):
    """Run ``engine`` over right-padded ``tokens [B, T]`` keeping every hook in ``names``: ``({name: [B, T, ...]},
    logits [B, T, d_vocab])`` (the engine's variant axis dropped)."""
    got: dict = {}

    def grab(name):
        def fn(x):
            got[name] = x[:, 0].clone()

        return fn

    hooks = {n: [grab(n)] for n in names}
    with torch.no_grad():
        logits = engine.logits(engine.forward_tokens(tokens, hooks), hooks)[:, 0]
    return got, logits


def json_differences(a, b, path: str = "", skip=lambda path, key: False) -> list[str]:
    """Where two JSON trees differ: floats beyond 1e-5 relative (1e-6 absolute near 0), anything else unequal
    (counts, strings, structure), as ``"path: a vs b"``; ``skip(path, key)`` leaves a dict entry out. What the
    sharded tests hold a torchrun run's files to against one process's."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a if not skip(path, k) for d in json_differences(a[k], b[k], f"{path}/{k}", skip)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in json_differences(x, y, f"{path}[{i}]", skip)]
    if isinstance(a, float) and isinstance(b, float):
        ok = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= max(1e-6, 1e-5 * abs(b))
        return [] if ok else [f"{path}: {a} vs {b}"]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} vs {b!r}"]


def ablate_node_by_hand(node, saes, means=None):
    """A circuit node's single ablation at one position, written out by hand for bridge hooks (the independent
    side of the circuit tests): a feature's decoder row times its code removed, an SAE error replaced by the
    reconstruction (``decode(f, x)``: the bias of a skip / normalising SAE depends on x), a head's z zeroed, an
    embedding set to its mean (``means[hook]``), anything else zeroed."""
    if node.kind == "feature":
        sae, k = saes[node.sae], node.index
        return lambda x: x - sae.encode(x)[k] * sae.W_dec[k]
    if node.kind == "error":
        sae = saes[node.sae]
        return lambda x: sae.decode(sae.encode(x), x)
    if node.kind == "head":
        def zero_head(z, h=node.index):
            z = z.clone()
            z[h] = 0
            return z
        return zero_head
    if node.kind in ("embed", "pos_embed"):
        return lambda x: means[node.hook].to(x).expand_as(x).clone()
    return torch.zeros_like
