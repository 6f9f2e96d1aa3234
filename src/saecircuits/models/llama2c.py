"""Karpathy's llama2.c checkpoints and tokenizers, converted to Hugging Face objects.

A llama2.c *legacy* checkpoint (``export.py`` ``legacy_export``; e.g. ``stories260K.bin``) is a header of 7
little-endian int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` followed by float32
weights, every matrix row-major as ``(out_features, in_features)`` with layers stacked::

    tok_embeddings [vocab, dim], attention_norm [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim],
    wv [L, kv_dim, dim], wo [L, dim, dim], ffn_norm [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden],
    w3 [L, hidden, dim], norm [dim], freq_cis_real [seq_len, head_size/2], freq_cis_imag [same],
    (wcls [vocab, dim] only when the header's vocab_size is negative; else the classifier is tok_embeddings)

``kv_dim = dim * n_kv_heads / n_heads``. The model is a Llama: RMSNorm (eps 1e-5), SwiGLU MLP
``w2(silu(w1 x) * w3 x)``, grouped-query attention, RoPE with theta 10000. llama2.c rotates ADJACENT pairs
``(2i, 2i+1)`` of each head; Hugging Face Llama rotates HALVES ``(i, i + d_head/2)``. The two are the same model
after permuting the output rows of ``wq`` and ``wk`` inside each head (even rows first, then odd rows), exactly the
``permute`` of transformers' ``convert_llama_weights_to_hf.py``; q.k dot products are unchanged by a common
permutation of q and k, so nothing else moves.

The llama2.c tokenizer file (``tok512.bin``) is ``int32 max_token_length`` then, per token, ``float32 score,
int32 n_bytes, bytes``. Encoding follows ``run.c``'s ``encode``: BOS, a dummy-prefix ``" "`` token (only for
non-empty text), one token per UTF-8 character (``<0xXX>`` byte pieces, id ``byte + 3``, for characters not in the
vocabulary), then repeatedly merge the adjacent pair whose concatenation is a vocabulary piece with the highest
score (leftmost on ties). :func:`reference_encode` is a line-by-line Python port of that loop;
:func:`llama2c_tokenizer` builds the equivalent Hugging Face fast tokenizer (BPE, merges ranked by the merged piece's
score, byte fallback, no pre-tokenizer, ``Prepend(" ")`` normaliser, ``<s> $A`` template).

Source: karpathy/llama2.c ``run.c`` (``read_checkpoint``, ``memory_map_weights``, ``encode``) and ``export.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from saecircuits.atomic import remove_dead_temps

logger = logging.getLogger(__name__)

BOS_ID = 1
EOS_ID = 2
UNK_ID = 0
_BYTE_OFFSET = 3  # <0x00> is id 3 in a SentencePiece byte-fallback vocabulary
_SPECIAL_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}
_HEADER = struct.Struct("<7i")
_CONVERTER_VERSION = 1  # bump when the conversion changes, so cached folders are rebuilt


class Llama2cError(ValueError):
    """A llama2.c checkpoint or tokenizer file is missing, truncated or inconsistent."""


@dataclass(frozen=True)
class Llama2cConfig:
    """The 7-int header of a llama2.c legacy checkpoint.

    Attributes:
        dim: residual width (d_model).
        hidden_dim: SwiGLU hidden width (d_mlp).
        n_layers, n_heads, n_kv_heads: as in Llama (n_heads % n_kv_heads == 0).
        vocab_size: vocabulary size (absolute value of the header field).
        seq_len: maximum context the model was trained with.
        shared_classifier: True when the header's vocab_size was positive (unembedding = token embedding).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.dim * self.n_kv_heads // self.n_heads

    def expected_floats(self) -> int:
        """Number of float32 values that must follow the header."""
        d, h, n, v, kv = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        count = v * d + n * d + n * d * d + 2 * n * kv * d + n * d * d + n * d + 3 * n * h * d + d
        count += self.seq_len * self.head_size  # freq_cis_real + freq_cis_imag, head_size/2 each
        if not self.shared_classifier:
            count += v * d
        return count


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_llama2c_checkpoint(path: str | os.PathLike[str]) -> tuple[Llama2cConfig, dict[str, torch.Tensor]]:
    """Read a llama2.c legacy ``.bin`` checkpoint into float32 tensors in llama2.c's own layout.

    Returns:
        config: the header.
        weights: ``tok_embeddings [vocab, dim]``, ``attention_norm [L, dim]``, ``wq [L, dim, dim]``,
        ``wk [L, kv_dim, dim]``, ``wv [L, kv_dim, dim]``, ``wo [L, dim, dim]``, ``ffn_norm [L, dim]``,
        ``w1 [L, hidden, dim]``, ``w2 [L, dim, hidden]``, ``w3 [L, hidden, dim]``, ``norm [dim]``,
        ``freq_cis_real``/``freq_cis_imag [seq_len, head_size/2]``, ``wcls [vocab, dim]``.
        Matrices are ``(out_features, in_features)``, i.e. ``y = W @ x``; RoPE rows are still in llama2.c's
        adjacent-pair order.

    Raises:
        FileNotFoundError: no such file.
        Llama2cError: the header is implausible (non-positive sizes, n_heads not a multiple of n_kv_heads) or
            the file size differs from ``28 + 4 * expected_floats`` (truncated, or not a legacy checkpoint: the
            llama2.c "version 1+" exports start with the magic 0x616b3432 and are not supported).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise Llama2cError(f"{path} is {len(data)} bytes, shorter than the 28-byte llama2.c header")
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == 0x616B3432:
        raise Llama2cError(
            f"{path} is a llama2.c version-1+ export (magic 'ak42'); only the legacy format is supported. "
            "Re-export it with llama2.c `export.py --version 0`."
        )
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(data, 0)
    if min(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len) <= 0 or n_heads % n_kv or dim % n_heads:
        raise Llama2cError(
            f"{path}: implausible llama2.c header dim={dim} hidden_dim={hidden} n_layers={n_layers} "
            f"n_heads={n_heads} n_kv_heads={n_kv} vocab_size={vocab} seq_len={seq_len}; is this a llama2.c "
            "legacy checkpoint?"
        )
    cfg = Llama2cConfig(
        dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, shared_classifier=vocab > 0
    )
    expected = _HEADER.size + 4 * cfg.expected_floats()
    if len(data) != expected:
        raise Llama2cError(
            f"{path} is {len(data):,} bytes but its header ({asdict(cfg)}) implies {expected:,} bytes: the file is "
            "truncated or corrupt. Download it again (karpathy/tinyllamas) and check its sha256."
        )
    flat = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=_HEADER.size).copy())
    d, h, n, v, kv, hs = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size, cfg.kv_dim, cfg.head_size
    shapes = [
        ("tok_embeddings", (v, d)),
        ("attention_norm", (n, d)),
        ("wq", (n, d, d)),
        ("wk", (n, kv, d)),
        ("wv", (n, kv, d)),
        ("wo", (n, d, d)),
        ("ffn_norm", (n, d)),
        ("w1", (n, h, d)),
        ("w2", (n, d, h)),
        ("w3", (n, h, d)),
        ("norm", (d,)),
        ("freq_cis_real", (cfg.seq_len, hs // 2)),
        ("freq_cis_imag", (cfg.seq_len, hs // 2)),
    ]
    if not cfg.shared_classifier:
        shapes.append(("wcls", (v, d)))
    weights: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        numel = int(np.prod(shape))
        weights[name] = flat[offset : offset + numel].view(shape)
        offset += numel
    assert offset == flat.numel()
    if cfg.shared_classifier:
        weights["wcls"] = weights["tok_embeddings"]
    return cfg, weights


def rope_theta_from_freqs(cfg: Llama2cConfig, weights: dict[str, torch.Tensor]) -> float:
    """Recover RoPE's theta from the stored ``freq_cis`` tables and check they are the standard ones.

    llama2.c stores ``cos(p * theta^(-2i/head_size))`` / ``sin(...)`` for position p and pair i. The second
    frequency gives ``theta = f_1^(-head_size/2)``; the whole table must then match to 1e-4.

    Raises:
        Llama2cError: the tables are not a standard RoPE table (then the conversion would be wrong).
    """
    hs = cfg.head_size
    real, imag = weights["freq_cis_real"].double(), weights["freq_cis_imag"].double()
    if hs < 4:
        return 10000.0
    f1 = torch.atan2(imag[1, 1], real[1, 1]).item()  # angle at position 1, pair 1
    theta = f1 ** (-hs / 2)
    freqs = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.arange(cfg.seq_len, dtype=torch.float64)[:, None] * freqs[None, :]
    err = max((angles.cos() - real).abs().max().item(), (angles.sin() - imag).abs().max().item())
    if err > 1e-4:
        raise Llama2cError(
            f"freq_cis tables are not a standard RoPE table (max error {err:.2e} for theta={theta})"
        )
    return float(round(theta, 3))


def _permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from adjacent-pair to half-split RoPE, per head.

    ``w [n_heads * d_head, d_in]`` -> same shape, with head rows ordered ``0, 2, 4, ..., 1, 3, 5, ...``
    (transformers ``convert_llama_weights_to_hf.permute``).
    """
    out_dim, in_dim = w.shape
    d_head = out_dim // n_heads
    return w.view(n_heads, d_head // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def llama2c_to_hf(path: str | os.PathLike[str]):
    """Convert a llama2.c legacy checkpoint into a Hugging Face ``LlamaForCausalLM`` (float32, eval mode, CPU).

    The HF model computes the same function as llama2.c's ``run.c`` forward: wq/wk rows are permuted per head
    from adjacent-pair to half-split RoPE (see module docstring); the classifier is tied to the embedding when
    the checkpoint shares it. Token ids: BOS 1, EOS 2.

    Raises:
        FileNotFoundError, Llama2cError: see :func:`read_llama2c_checkpoint` / :func:`rope_theta_from_freqs`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, w = read_llama2c_checkpoint(path)
    theta = rope_theta_from_freqs(cfg, w)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.shared_classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=UNK_ID,
        dtype="float32",
    )
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": w["tok_embeddings"],
        "model.norm.weight": w["norm"],
    }
    sd["lm_head.weight"] = w["wcls"]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["attention_norm"][i]
        sd[p + "post_attention_layernorm.weight"] = w["ffn_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute_rope_rows(w["wq"][i], cfg.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute_rope_rows(w["wk"][i], cfg.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    with torch.device("cpu"):
        model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict({k: v.clone().contiguous() for k, v in sd.items()}, strict=True)
    if cfg.shared_classifier:
        model.tie_weights()
    return model.float().eval()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True)
class Llama2cVocab:
    """A llama2.c tokenizer file: ``pieces[i]`` (raw bytes) with ``scores[i]`` (float32)."""

    pieces: tuple[bytes, ...]
    scores: tuple[float, ...]
    max_token_length: int


def read_llama2c_tokenizer(path: str | os.PathLike[str], vocab_size: int | None = None) -> Llama2cVocab:
    """Read a llama2.c tokenizer ``.bin`` (``int32 max_len``, then per token ``float32 score, int32 len, bytes``).

    Args:
        path: the file.
        vocab_size: number of tokens to expect (the checkpoint's); if None, read to the end of the file.

    Raises:
        FileNotFoundError: no such file.
        Llama2cError: truncated file, trailing bytes, a piece longer than max_token_length, or a piece
            count different from ``vocab_size``.
    """
    path = Path(path)
    _check_tokenizer_file(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise Llama2cError(f"{path} is too short to be a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pos, pieces, scores = 4, [], []
    while pos < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if pos + 8 > len(data):
            raise Llama2cError(f"{path}: truncated record for token {len(pieces)}")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if n < 0 or n > max_len or pos + n > len(data):
            raise Llama2cError(f"{path}: token {len(pieces)} has an invalid length {n} (max {max_len})")
        pieces.append(data[pos : pos + n])
        scores.append(float(score))
        pos += n
    if vocab_size is not None and len(pieces) != vocab_size:
        raise Llama2cError(f"{path} holds {len(pieces)} tokens but the checkpoint expects {vocab_size}")
    if pos != len(data):
        raise Llama2cError(f"{path}: {len(data) - pos} unexpected bytes after {len(pieces)} tokens")
    return Llama2cVocab(tuple(pieces), tuple(scores), max_len)


def reference_encode(text: str, vocab: Llama2cVocab, bos: bool = True, eos: bool = False) -> list[int]:
    """Encode ``text`` exactly as llama2.c ``run.c`` ``encode`` does (a plain-Python port used as a test oracle).

    Steps: optional BOS (1); the dummy-prefix ``" "`` piece if text is non-empty; per UTF-8 character its piece
    id, or its bytes as ``byte + 3``; then while some adjacent pair concatenates to a piece, merge the pair whose
    piece has the highest score (the leftmost on ties, as run.c's strict ``>``); optional EOS (2).

    Returns:
        token ids (list of int).
    """
    lookup: dict[bytes, int] = {}
    for i, p in enumerate(vocab.pieces):
        lookup.setdefault(p, i)
    tokens: list[int] = [BOS_ID] if bos else []
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        if b in lookup:
            tokens.append(lookup[b])
        else:
            tokens.extend(byte + _BYTE_OFFSET for byte in b)
    # run.c looks up the concatenation of every adjacent pair in each round. The pair table (all ways to split a
    # piece into two pieces) and the incrementally updated candidate list only speed that up; the choice is the
    # same: the highest score, the leftmost pair on ties.
    pair: dict[tuple[int, int], tuple[float, int]] = {}
    for i, p in enumerate(vocab.pieces):
        for k in range(1, len(p)):
            left, right = lookup.get(p[:k]), lookup.get(p[k:])
            if left is not None and right is not None and lookup[p] == i:
                pair[(left, right)] = (vocab.scores[i], i)
    none = (float("-inf"), -1)
    cand = [pair.get((tokens[i], tokens[i + 1]), none) for i in range(len(tokens) - 1)]
    while cand:
        best_score = max(c[0] for c in cand)
        if best_score <= -1e10:
            break
        idx = next(i for i, c in enumerate(cand) if c[0] == best_score)
        tokens[idx : idx + 2] = [cand[idx][1]]
        del cand[idx]
        if idx > 0:
            cand[idx - 1] = pair.get((tokens[idx - 1], tokens[idx]), none)
        if idx < len(cand):
            cand[idx] = pair.get((tokens[idx], tokens[idx + 1]), none)
    if eos:
        tokens.append(EOS_ID)
    return tokens


def _hf_piece(i: int, piece: bytes) -> str:
    return _SPECIAL_NAMES.get(i) or piece.decode("utf-8")


def build_llama2c_tokenizer(vocab: Llama2cVocab, save_dir: str | os.PathLike[str]):
    """Build, save and reload a Hugging Face ``PreTrainedTokenizerFast`` equal to run.c's encoder.

    Model: ``tokenizers`` BPE over the llama2.c pieces (ids kept; ids 0/1/2 named ``<unk>``/``<s>``/``</s>``),
    ``byte_fallback=True`` with the ``<0xXX>`` pieces, merges = every split ``(left, right)`` of a piece into two
    pieces, ranked by the merged piece's score (best first). No pre-tokenizer (run.c merges across spaces),
    ``Prepend(" ")`` normaliser (the dummy prefix; tokenizers skips it for empty text, as run.c does),
    ``<s> $A`` post-processor (BOS). Decoder: byte fallback, fuse, strip one leading space (run.c drops the space
    after BOS). Special tokens: BOS ``<s>`` = 1, EOS ``</s>`` = 2, UNK and PAD ``<unk>`` = 0 (never produced by
    encoding, so a pad id never collides with a real token).

    The tokenizer is saved to ``save_dir`` and reloaded from there (TransformerLens needs a ``name_or_path``).

    Raises:
        Llama2cError: the vocabulary lacks the byte pieces or the ``" "`` piece, or has duplicate pieces.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    names = [_hf_piece(i, p) for i, p in enumerate(vocab.pieces)]
    if len(set(names)) != len(names):
        raise Llama2cError("the llama2.c vocabulary has duplicate pieces; cannot build a BPE tokenizer")
    if (
        len(names) < 259
        or any(names[_BYTE_OFFSET + b] != f"<0x{b:02X}>" for b in range(256))
        or " " not in names
    ):
        raise Llama2cError(
            "the llama2.c vocabulary lacks the <0x00>..<0xFF> byte pieces at ids 3..258 or the ' ' piece"
        )
    vocab_map = {n: i for i, n in enumerate(names)}
    ranked: list[tuple[float, int, str, str]] = []
    for i in range(259, len(names)):
        s = names[i]
        for k in range(1, len(s)):
            left, right = s[:k], s[k:]
            if (
                left in vocab_map
                and right in vocab_map
                and vocab_map[left] >= 259
                and vocab_map[right] >= 259
            ):
                ranked.append((-vocab.scores[i], i, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, left, right in ranked]
    bpe = models.BPE(vocab=vocab_map, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Prepend(" ")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,
        padding_side="right",
        model_max_length=10**6,
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def _atomic_convert(bin_path: Path, tok_path: Path, target: Path) -> None:
    """Write the HF model + tokenizer into ``target`` via a temp folder in the same parent, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(target.parent)  # what killed conversions left (the pid is in the name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    cfg, _ = read_llama2c_checkpoint(bin_path)
    model = llama2c_to_hf(bin_path)
    model.save_pretrained(tmp, safe_serialization=True)
    build_llama2c_tokenizer(read_llama2c_tokenizer(tok_path, cfg.vocab_size), tmp)
    meta = {
        "converter_version": _CONVERTER_VERSION,
        "checkpoint": str(bin_path),
        "checkpoint_sha256": sha256_file(bin_path),
        "tokenizer": str(tok_path),
        "tokenizer_sha256": sha256_file(tok_path),
        "llama2c_config": asdict(cfg),
    }
    (tmp / "saecircuits_llama2c.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race and the target exists: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "saecircuits_llama2c.json").is_file():
            raise


def find_llama2c_tokenizer(bin_path: str | os.PathLike[str]) -> Path:
    """The ``tok*.bin`` (or ``tokenizer.bin``) next to a checkpoint.

    Raises:
        Llama2cError: none or several candidates (then pass the tokenizer path explicitly).
    """
    folder = Path(bin_path).parent
    cands = sorted(p for p in folder.glob("tok*.bin") if p.resolve() != Path(bin_path).resolve())
    if len(cands) != 1:
        found = ", ".join(p.name for p in cands) or "none"
        raise Llama2cError(
            f"need exactly one llama2.c tokenizer 'tok*.bin' next to {bin_path} (found: {found}); "
            "pass tokenizer=<path to tok*.bin> explicitly"
        )
    return cands[0]


def _check_tokenizer_file(path: Path) -> None:
    """Raises FileNotFoundError when ``path`` does not exist, Llama2cError when it is a folder (e.g. a Hugging Face
    tokenizer folder given with a llama2.c checkpoint, which was reported as "not found")."""
    if path.is_dir():
        raise Llama2cError(f"the llama2.c tokenizer {path} is a folder; a llama2.c checkpoint needs its tokenizer "
                           "file, a tok*.bin (e.g. --tokenizer ../shared/data/stories260K/tok512.bin)")
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c tokenizer not found: {path}")


def convert_llama2c(
    bin_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert a llama2.c checkpoint + tokenizer into a Hugging Face folder, cached by content.

    The folder is ``<cache_dir>/llama2c-<sha256(checkpoint)[:16]>-<sha256(tokenizer)[:8]>-v<version>`` and holds
    ``config.json``, ``model.safetensors``, the tokenizer files and ``saecircuits_llama2c.json`` (provenance).
    An existing folder is reused. Without ``cache_dir`` a fresh temporary folder is used (not cached).

    Returns:
        the folder, loadable with ``LlamaForCausalLM.from_pretrained`` / ``PreTrainedTokenizerFast.from_pretrained``.

    Raises:
        FileNotFoundError, Llama2cError: unreadable or inconsistent inputs.
    """
    bin_path = Path(bin_path)
    read_llama2c_checkpoint(bin_path)  # validate early: clear error before anything is written
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else find_llama2c_tokenizer(bin_path)
    _check_tokenizer_file(tok_path)
    base = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="saecircuits-llama2c-"))
    key = f"llama2c-{sha256_file(bin_path)[:16]}-{sha256_file(tok_path)[:8]}-v{_CONVERTER_VERSION}"
    target = base / key
    if (target / "saecircuits_llama2c.json").is_file():
        logger.info("using cached llama2.c conversion %s", target)
        return target
    logger.info("converting llama2.c checkpoint %s -> %s", bin_path, target)
    _atomic_convert(bin_path, tok_path, target)
    return target


def load_llama2c_hf(
    bin_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
):
    """Return ``(LlamaForCausalLM in eval mode, PreTrainedTokenizerFast, folder)`` for a llama2.c checkpoint.

    See :func:`convert_llama2c` for the cache; raises what it raises.
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = convert_llama2c(bin_path, tokenizer_path, cache_dir)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    return model, tok, folder
