"""models/tokens.py: plain-text encoding, special-token masks, the context check and the one token-display function.

Right values come from the tokenizers' own files, worked by hand: the GPT-2 BPE pieces of ``café 😀`` (vocab.json) and
the llama2.c ids from ``reference_encode`` (a line-by-line port of run.c's encoder, independent of the HF tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_tokenizer

from saecircuits.models.tokens import (
    TOKEN_KINDS,
    ContextLengthError,
    TokenPiece,
    bos_prefix,
    check_context,
    encode_documents,
    encode_texts,
    special_token_ids,
    special_token_mask,
    token_pieces,
    token_string,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GPT2 = SHARED / "gpt2-bpe-tokenizer"
TOK512 = SHARED / "stories260K" / "tok512.bin"

TEXTS = [
    "café 😀",
    "Spot saw the shiny car",
    'He said, "Hi." She said, “Yes!” Zoë ☃\n\n\tThe end.',
    "日本語のテキスト",
    "مرحبا بالعالم",
    "a\U0001f468\u200d\U0001f469\u200d\U0001f467b",  # family emoji: three emoji joined by zero-width joiners
    "  two leading spaces",
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    if not (GPT2 / "vocab.json").is_file():
        pytest.skip(f"shared data absent: {GPT2} (tests read ../shared/data relative to the repo root)")
    from saecircuits.models.load import gpt2_bpe_tokenizer

    return gpt2_bpe_tokenizer(GPT2, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def l2c(tmp_path_factory):
    if not TOK512.is_file():
        pytest.skip(f"shared data absent: {TOK512} (tests read ../shared/data relative to the repo root)")
    from saecircuits.models.llama2c import build_llama2c_tokenizer, read_llama2c_tokenizer

    vocab = read_llama2c_tokenizer(TOK512, 512)
    return build_llama2c_tokenizer(vocab, tmp_path_factory.mktemp("l2c")), vocab


def _text(pieces: list[TokenPiece]) -> str:
    return "".join(p.text for p in pieces if p.kind != "special")


# ---------------------------------------------------------------------------------------------------------------
# Token display (issue 7 item 4, issue 10 item 3)


@pytest.mark.shared_data
def test_gpt2_cafe_emoji_pieces(gpt2):
    # vocab.json: 'c' 66, 'af' 1878, 'Ã©' 2634 (= the bytes C3 A9 of é), 'ĠðŁĺ' 30325 (= 20 F0 9F 98: a space and
    # the first three bytes of 😀 F0 9F 98 80), 'Ģ' 222 (= 80, the emoji's last byte).
    ids = encode_texts(gpt2, ["café 😀"])[0]
    assert ids == [66, 1878, 2634, 30325, 222]
    assert token_pieces(gpt2, ids) == [
        TokenPiece("c"),
        TokenPiece("af"),
        TokenPiece("é"),
        TokenPiece(" 😀"),  # the emoji is shown once, on the piece where its bytes start
        TokenPiece("", "continuation"),
    ]
    # alone, each token shows its own bytes; half a character is written as byte pieces, never U+FFFD
    assert [token_string(gpt2, i) for i in ids] == ["c", "af", "é", " <0xF0><0x9F><0x98>", "<0x80>"]
    with_bos = token_pieces(gpt2, [50256, *ids])
    assert with_bos[0] == TokenPiece("<|endoftext|>", "special") and _text(with_bos) == "café 😀"


@pytest.mark.shared_data
def test_stories260k_pieces_keep_leading_spaces(l2c):
    from saecircuits.models.llama2c import reference_encode

    tok, vocab = l2c
    text = "Spot saw the shiny car"
    ids = reference_encode(text, vocab)  # run.c's encoder: BOS, then the dummy-prefix pieces
    assert encode_documents(tok, [text]) == [ids]
    pieces = token_pieces(tok, ids)
    assert [p.text for p in pieces] == ["<s>", "S", "p", "ot", " saw", " the", " s", "h", "in", "y", " c", "ar"]
    assert [p.kind for p in pieces] == ["special"] + ["text"] * 11
    assert _text(pieces) == text  # not "Spotsawtheshinycar"
    # the answer tokens of the closing-quote task: ' "' (313, opens a quote) and '"' (436, closes one)
    assert token_string(tok, 313) == ' "' and token_string(tok, 436) == '"'
    # a window cut from the middle of a story keeps the space of its first token (it is not the text's start)
    assert token_pieces(tok, ids[4:6], text_start=False) == [TokenPiece(" saw"), TokenPiece(" the")]


@pytest.mark.shared_data
def test_stories260k_byte_fallback_emoji_shown_once(l2c):
    from saecircuits.models.llama2c import reference_encode

    tok, vocab = l2c
    ids = reference_encode("café 😀", vocab)
    # tok512 has no 😀: run.c writes its four UTF-8 bytes as <0xF0> <0x9F> <0x98> <0x80> (ids byte + 3)
    assert ids[-4:] == [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]
    pieces = token_pieces(tok, ids)
    assert [p.text for p in pieces[-4:]] == ["😀", "", "", ""]
    assert [p.kind for p in pieces[-4:]] == ["text", "continuation", "continuation", "continuation"]
    assert _text(pieces) == "café 😀"


@pytest.mark.shared_data
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_back_to_the_text(gpt2, l2c, text):
    for tok in (gpt2, l2c[0], tiny_tokenizer()):
        ids = encode_documents(tok, [text])[0]
        pieces = token_pieces(tok, ids)
        assert len(pieces) == len(ids)
        assert _text(pieces) == tok.decode(ids, skip_special_tokens=True) == text
        assert all(p.kind in TOKEN_KINDS for p in pieces)
        assert all(p.text == "" for p in pieces if p.kind == "continuation")
        assert "\ufffd" not in _text(pieces)


def test_unfinished_character_becomes_one_replacement_char():
    tok = tiny_tokenizer()  # byte-level BPE trained on ASCII stories: 😀 (F0 9F 98 80) is four byte tokens
    ids = encode_texts(tok, ["x😀"])[0]
    assert tok.convert_ids_to_tokens(ids) == ["x", "ð", "Ł", "ĺ", "Ģ"]
    assert token_pieces(tok, ids) == [TokenPiece("x"), TokenPiece("😀")] + [TokenPiece("", "continuation")] * 3
    # without the last byte the character never completes: one U+FFFD on its first piece, as decode() shows it
    cut = token_pieces(tok, ids[:-1])
    assert cut == [TokenPiece("x"), TokenPiece("\ufffd"), TokenPiece("", "continuation"), TokenPiece("", "continuation")]
    assert _text(cut) == tok.decode(ids[:-1]) == "x\ufffd"
    # two continuation bytes with no lead byte: each is invalid on its own, as in decode()
    assert _text(token_pieces(tok, ids[2:4])) == tok.decode(ids[2:4]) == "\ufffd\ufffd"
    # an ASCII token while a character is pending (the fast path for ASCII tokens must not take it): the cut
    # character is one U+FFFD on the piece where it started, the ASCII token keeps its own text
    # (then the emoji's last two bytes have no lead byte: two more U+FFFD, never a completed 😀)
    mixed = [*ids[:3], ids[0], *ids[3:]]
    assert token_pieces(tok, mixed) == [TokenPiece("x"), TokenPiece("\ufffd"), TokenPiece("", "continuation"),
                                        TokenPiece("x"), TokenPiece("\ufffd"), TokenPiece("\ufffd")]
    assert _text(token_pieces(tok, mixed)) == tok.decode(mixed) == "x\ufffdx\ufffd\ufffd"


# ---------------------------------------------------------------------------------------------------------------
# Special tokens and plain-text encoding (issue 7 item 3)


@pytest.mark.shared_data
def test_special_token_ids(gpt2, l2c):
    assert special_token_ids(gpt2) == {50256}  # BOS = EOS = PAD = UNK
    assert special_token_ids(l2c[0]) == {0, 1, 2}  # <unk> (= PAD), <s>, </s>
    assert special_token_ids(None) == frozenset()


def test_special_token_mask_anywhere_in_the_row():
    tokens = torch.tensor([[1, 5, 6, 1, 7, 0], [8, 2, 9, 9, 1, 0]])
    expected = torch.tensor([[True, False, False, True, False, True], [False, True, False, False, True, True]])
    assert torch.equal(special_token_mask(tokens, {0, 1, 2}), expected)
    assert torch.equal(special_token_mask(tokens, 1), tokens == 1)
    assert not special_token_mask(tokens, None).any() and not special_token_mask(tokens, set()).any()


@pytest.mark.shared_data
def test_inline_special_strings_are_plain_text(gpt2, l2c):
    from saecircuits.models.llama2c import reference_encode

    tok, vocab = l2c
    text = "The tag <s> is printed here and"
    # run.c looks up '<', 's', '>' as characters: no BOS id inside the text
    assert encode_texts(tok, [text])[0] == reference_encode(text, vocab, bos=False)
    assert 1 not in encode_texts(tok, [text])[0]
    ids = encode_texts(gpt2, ["Tom ran. <|endoftext|> Sue sat."])[0]
    assert 50256 not in ids and gpt2.decode(ids) == "Tom ran. <|endoftext|> Sue sat."


def test_bos_policy():
    tok = tiny_tokenizer()
    assert bos_prefix(tok) == [tok.bos_token_id] == bos_prefix(tok, True)
    assert bos_prefix(tok, False) == []

    class NoBos:
        bos_token_id = None

    assert bos_prefix(NoBos()) == [] and bos_prefix(NoBos(), False) == []
    with pytest.raises(ValueError, match="no BOS token"):
        bos_prefix(NoBos(), True)


def test_check_context_names_the_limit():
    check_context([[1, 2, 3], [1, 2]], 3)
    check_context([[1] * 10], None)
    with pytest.raises(ContextLengthError, match=r"1 of 2 task prompts are longer than the model's context of 3 "
                       r"tokens \(first: index 1, longest: 4 tokens\); build the task with max_tokens=3"):
        check_context([[1, 2, 3], [1, 2, 3, 4]], 3, "task prompt")
    with pytest.raises(ContextLengthError, match=r"max_len=3"):
        check_context([[1, 2, 3, 4]], 3, "corpus row")


def test_byte_level_table_is_gpt2s():
    from tokenizers import pre_tokenizers

    from saecircuits.models.tokens import _byte_level_chars

    table = _byte_level_chars()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["a"] == 0x61
