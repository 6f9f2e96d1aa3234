"""load_model / load_hf_model / gpt2_bpe_tokenizer.

Independent checks: the bridge's log-probs against the raw Hugging Face model's (weight processing must not change
them), processing actually applied (W_U columns centred, LN folded), GPT-2 BPE ids from
shared/data/gpt2-bpe-tokenizer/SOURCE.md (the well-known GPT-2 ids), and the error paths.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from saecircuits.models.load import (  # noqa: E402
    ModelLoadError,
    gpt2_bpe_tokenizer,
    load_hf_model,
    load_model,
    model_provenance,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GPT2_BPE = SHARED / "gpt2-bpe-tokenizer"
TEXTS = [
    'She said, "I want to play!" Then Tom said, "No."',
    "Once upon a time, there was a little girl named Lily.",
    "Hi.",
]


def _need_bpe() -> None:
    if not (GPT2_BPE / "vocab.json").is_file():
        pytest.skip(f"shared data absent: {GPT2_BPE} (tests read ../shared/data relative to the repo root)")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    _need_bpe()
    return gpt2_bpe_tokenizer(GPT2_BPE, save_dir=tmp_path_factory.mktemp("gpt2bpe"))


@pytest.fixture(scope="module")
def neo_folder(tmp_path_factory, bpe):
    """A tiny random GPT-Neo (2 layers: global then local attention, as TinyStories-2Layers) saved as an HF folder."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(
        vocab_size=50257,
        max_position_embeddings=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    torch.manual_seed(0)
    hf = GPTNeoForCausalLM(cfg)  # dropout 0.1 defaults: load_model must put it in eval mode
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.mul_(3.0)
            if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))  # non-trivial LN gains so folding matters
            if name.endswith("ln_1.bias") or name.endswith("ln_f.bias"):
                p.copy_(0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("models") / "tiny-neo-2L"
    hf.save_pretrained(folder)
    bpe.save_pretrained(folder)
    return folder


def _raw_logprobs(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens).logits.log_softmax(-1)


def test_gpt2_bpe_ids_from_source_md(bpe):
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (50256, 50256, 50256)
    assert len(bpe) == 50257
    enc = lambda s: bpe(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("Hello world") == [15496, 995]
    assert enc(TEXTS[0]) == [3347, 531, 11, 366, 40, 765, 284, 711, 2474, 3244, 4186, 531, 11, 366, 2949, 526]
    assert enc(TEXTS[1]) == [7454, 2402, 257, 640, 11, 612, 373, 257, 1310, 2576, 3706, 20037, 13]
    assert enc(" t") == [256]  # the FIRST merge (Ġ t): lost if merges.txt's first line were skipped
    assert enc("<|endoftext|>") == [50256]
    for text in TEXTS:
        assert bpe.decode(enc(text)) == text


def test_hf_folder_logprobs_match_raw_model(neo_folder):
    bridge = load_model(neo_folder)
    prov = model_provenance(bridge)
    assert (prov.kind, prov.model_name, prov.architecture) == (
        "hf_folder",
        "tiny-neo-2L",
        "GPTNeoForCausalLM",
    )
    assert prov.processing["fold_ln"] and prov.processing["center_unembed"]
    assert bridge.cfg.model_name == "tiny-neo-2L"
    tokens = bridge.to_tokens(TEXTS)  # BOS-prefixed, right-padded
    assert (tokens[:, 0] == 50256).all()
    with torch.no_grad():
        got = bridge(tokens).log_softmax(-1)
        raw = bridge.to_tokens(TEXTS[1])  # also unbatched
        got1 = bridge(raw).log_softmax(-1)
    want = _raw_logprobs(neo_folder, tokens)
    lengths = [len(bridge.to_tokens(t)[0]) for t in TEXTS]
    for b, n in enumerate(lengths):  # real positions of each row
        torch.testing.assert_close(got[b, :n], want[b, :n], atol=1e-4, rtol=0)
    torch.testing.assert_close(got1[0], want[1, : got1.shape[1]], atol=1e-4, rtol=0)
    # processing really happened (compare with the unprocessed bridge): unembedding centred over the vocabulary,
    # embeddings centred over d_model, LN gains folded into W_in
    raw_bridge = load_model(neo_folder, fold_ln=False, center_writing_weights=False, center_unembed=False)
    assert bridge.W_U.mean(-1).abs().max() < 1e-5 < raw_bridge.W_U.mean(-1).abs().max()
    assert bridge.W_E.mean(-1).abs().max() < 1e-5 < raw_bridge.W_E.mean(-1).abs().max()
    assert (bridge.W_in - raw_bridge.W_in).abs().max() > 1e-2
    # legacy hook names work
    _, cache = bridge.run_with_cache(
        tokens, names_filter=lambda n: n in {"blocks.1.mlp.hook_post", "blocks.0.attn.hook_z"}
    )
    assert cache["blocks.1.mlp.hook_post"].shape == (3, tokens.shape[1], 64)
    assert cache["blocks.0.attn.hook_z"].shape == (3, tokens.shape[1], 4, 8)


def test_no_processing_keeps_raw_logits(neo_folder):
    bridge = load_model(neo_folder, fold_ln=False, center_writing_weights=False, center_unembed=False)
    tokens = bridge.to_tokens(TEXTS[0])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(neo_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)
    assert not any(model_provenance(bridge).processing[k] for k in ("fold_ln", "center_unembed"))


def test_injected_model_with_unsaved_tokenizer():
    """load_hf_model accepts a tokenizer built in memory (no name_or_path folder): it is saved and reloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdefgh ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    cfg = GPTNeoConfig(
        vocab_size=10,
        max_position_embeddings=16,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        attention_types=[[["global"], 1]],
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(1)
    hf = GPTNeoForCausalLM(cfg)
    bridge = load_hf_model(hf, fast, model_name="toy")
    assert not hf.training
    prov = model_provenance(bridge)
    assert (prov.kind, prov.model_name, prov.source) == ("injected", "toy", "<injected>")
    tokens = bridge.to_tokens("abc d")
    assert tokens.tolist() == [[0, 1, 2, 3, 9, 4]]
    with pytest.raises(ModelLoadError, match="needs the model's tokenizer"):
        load_hf_model(hf, None)


def _write_small_llama2c(folder: Path) -> Path:
    """A random llama2.c checkpoint (dim 16, 4 heads / 2 KV heads) + a 300-piece tokenizer, written by hand."""
    import numpy as np

    rng = np.random.default_rng(3)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = 16, 24, 2, 4, 2, 300, 32
    kv, hs = dim * n_kv // n_heads, dim // n_heads
    parts = [struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv, vocab, seq)]
    shapes = [
        (vocab, dim),
        (n_layers, dim),
        (n_layers, dim, dim),
        (n_layers, kv, dim),
        (n_layers, kv, dim),
        (n_layers, dim, dim),
        (n_layers, dim),
        (n_layers, hidden, dim),
        (n_layers, dim, hidden),
        (n_layers, hidden, dim),
        (dim,),
    ]
    for i, s in enumerate(shapes):
        a = rng.standard_normal(s) * 0.5 + (1.0 if i in (1, 6, 10) else 0.0)  # norms around 1
        parts.append(a.astype("<f4").tobytes())
    ang = np.outer(np.arange(seq), 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs))
    parts += [np.cos(ang).astype("<f4").tobytes(), np.sin(ang).astype("<f4").tobytes()]
    (folder / "m.bin").write_bytes(b"".join(parts))
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces += [b" ", b"a", b"b", b" a", b"ab"] + [f"q{i}".encode() for i in range(vocab - 264)]
    tok = [struct.pack("<i", 7)] + [struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(pieces)]
    (folder / "tok300.bin").write_bytes(b"".join(tok))
    return folder / "m.bin"


def test_llama2c_source_processing_keeps_logprobs(tmp_path):
    """RMSNorm + rotary + GQA model: processed and raw bridges give the same log-probs; provenance has the sha."""
    ckpt = _write_small_llama2c(tmp_path)
    cache = tmp_path / "cache"
    processed = load_model(ckpt, cache_dir=cache)
    raw = load_model(ckpt, cache_dir=cache, fold_ln=False, center_writing_weights=False, center_unembed=False)
    prov = model_provenance(processed)
    assert prov.kind == "llama2c" and prov.model_name == "m" and len(prov.weights_sha256) == 64
    assert Path(prov.hf_folder).parent == cache
    tokens = torch.tensor([[1, 260, 261, 262, 263, 264, 3, 100, 299, 259], [1, 5, 6, 7, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        a, b = processed(tokens).log_softmax(-1), raw(tokens).log_softmax(-1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # " ab a" -> [' ', a, b, ' ', a]; ' a' (262, score -262) beats 'ab' (263, -263), leftmost first, then again
    assert processed.tokenizer("ab a")["input_ids"] == [1, 262, 261, 262]
    # explicit tokenizer path works too
    (tmp_path / "other").mkdir()
    moved = tmp_path / "other" / "m.bin"
    moved.write_bytes(ckpt.read_bytes())
    with pytest.raises(Exception, match="exactly one llama2.c tokenizer"):
        load_model(moved, cache_dir=cache)
    assert (
        model_provenance(load_model(moved, tokenizer=tmp_path / "tok300.bin", cache_dir=cache)).kind
        == "llama2c"
    )


def test_error_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder/file nor a hub name"):
        load_model(tmp_path / "missing-model")
    with pytest.raises(FileNotFoundError):
        load_model("./no/such/checkpoint.bin")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported type"):
        load_model(tmp_path / "weights.pt")
    (tmp_path / "bad.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="shorter than the 28-byte"):
        load_model(tmp_path / "bad.bin")


def test_hub_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(
        ModelLoadError, match=r"'roneneldan/TinyStories-2Layers-33M'.*(HF_HUB_OFFLINE).*local folder"
    ):
        load_model("roneneldan/TinyStories-2Layers-33M")


# ---------------------------------------------------------------------------------------------------------------
# A tokenizer without BOS (issue 7 item 5)

def test_tokenizer_without_bos_gets_no_phantom_bos_and_stays_untouched(tmp_path):
    from helpers import no_bos_folder
    from transformers import PreTrainedTokenizerFast

    from saecircuits.tasks.jsonl import jsonl_task

    folder = no_bos_folder(tmp_path / "nobos")
    caller_tok = PreTrainedTokenizerFast.from_pretrained(folder)
    before = {r: getattr(caller_tok, r) for r in ("bos_token", "eos_token", "pad_token", "unk_token")}
    before_len = len(caller_tok)
    assert before == {"bos_token": None, "eos_token": None, "pad_token": None, "unk_token": "[UNK]"}
    bridge = load_model(folder, tokenizer=caller_tok)
    # the caller's object is untouched (TransformerLens used to set its BOS/EOS/PAD to <|endoftext|> = UNK id 15)
    assert {r: getattr(caller_tok, r) for r in before} == before and len(caller_tok) == before_len
    assert bridge.tokenizer is not caller_tok
    assert bridge.tokenizer.bos_token_id is None and bridge.tokenizer.eos_token_id is None
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a b c", "answer": " d"}\n', encoding="utf-8")
    task = jsonl_task(path, bridge.tokenizer)
    assert task.token_ids == [[0, 1, 2]] and task.answer_ids == [3]  # not [15, 0, 1, 2]
    assert bridge.to_tokens("a b c").tolist() == [[0, 1, 2]]
    # the model loaded from the folder alone behaves the same
    assert load_model(folder).tokenizer.bos_token_id is None


def test_tokenizer_without_any_special_token_pads_with_a_real_id(tmp_path):
    """No BOS/EOS/PAD/UNK: TransformerLens' stand-in <|endoftext|> would be a new id past the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    from saecircuits.analysis.quality.reconstruction import mean_activation
    from saecircuits.models.hooks import pad_id_of

    vocab = {w: i for i, w in enumerate("a b c d e f g h".split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    cfg = GPTNeoConfig(vocab_size=8, max_position_embeddings=16, hidden_size=16, num_layers=1, num_heads=2,
                       intermediate_size=32, attention_types=[[["global"], 1]], bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    GPTNeoForCausalLM(cfg).save_pretrained(tmp_path)
    bridge = load_model(tmp_path)
    assert bridge.tokenizer.bos_token_id is None and 0 <= pad_id_of(bridge) < 8
    rows = [[0, 1, 2, 3], [4, 5]]
    hook = "blocks.0.mlp.hook_post"
    with torch.no_grad():
        by_hand = torch.cat([bridge.run_with_cache(torch.tensor([r]))[1][hook][0] for r in rows]).mean(0)
    torch.testing.assert_close(mean_activation(bridge, rows, hook), by_hand, atol=1e-5, rtol=1e-5)  # padded batch


def test_offline_loads_print_no_kernel_trust_warnings(caplog):
    """Issue 18 kind 10: three 'Skipping publisher trust check ... offline mode' warnings on every offline command."""
    import logging

    from saecircuits.models.default import shipped_model_dir
    from saecircuits.models.load import load_model

    with caplog.at_level(logging.INFO):
        load_model(shipped_model_dir())
        logging.getLogger("kernels._internals.hf_hub").warning("another kernels message")  # others still pass
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "publisher trust check" in m]
    assert "another kernels message" in said
