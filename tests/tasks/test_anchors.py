"""Task anchors (issue 16 item 5): named token positions that align prompts of different lengths.

The right positions are worked out by hand from the token pieces written in each test's comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import STORIES, tiny_tokenizer

from saecircuits.models.tokens import token_pieces
from saecircuits.tasks.base import Task, TaskError
from saecircuits.tasks.closing_quote import closing_quote_task
from saecircuits.tasks.jsonl import jsonl_task

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _gpt2_tokenizer():
    vocab, merges = SHARED / "gpt2-bpe-tokenizer" / "vocab.json", SHARED / "gpt2-bpe-tokenizer" / "merges.txt"
    if not (vocab.exists() and merges.exists()):
        pytest.skip(f"shared data not found under {SHARED} (GPT-2 BPE files)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, pad_token=eot)


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.mark.shared_data
def test_closing_quote_anchors_on_real_gpt2_bpe():
    tok = _gpt2_tokenizer()
    task = closing_quote_task(['Tom said, "I want to play." Mom smiled.', 'Sue ran. Tom said, "Hi."'], tok)
    # GPT-2 BPE: <|endoftext|> | Tom | ' said' | ',' | ' "' | I | ' want' | ' to' | ' play'   (answer '."')
    assert [p.text for p in token_pieces(tok, task.token_ids[0])][1:] == [
        "Tom", " said", ",", ' "', "I", " want", " to", " play"
    ]
    assert task.anchors(0) == {"P": 8, "open_quote": 4, "said": 2, "last_word": 7}
    # <|endoftext|> | S | ue | ' ran' | . | ' Tom' | ' said' | , | ' "' | Hi   (answer '."'): the only word in the
    # quotation is P, so the last word before P is ' said', already named 'said'
    assert [p.text for p in token_pieces(tok, task.token_ids[1])][1:] == [
        "S", "ue", " ran", ".", " Tom", " said", ",", ' "', "Hi"
    ]
    assert task.anchors(1) == {"P": 9, "open_quote": 8, "said": 6}
    assert list(task.anchors(0))[0] == "P"


@pytest.mark.shared_data
@pytest.mark.shared_data
def test_closing_quote_anchors_follow_a_later_quotation_and_its_own_said():
    tok = _gpt2_tokenizer()
    docs = ['He said, "Is it yours?" Jack smiled. "No," said Jack, "I like the drum." Then he left.',
            'Tom said, "Hi!" Mom asked, "Are you hungry."']
    task = closing_quote_task(docs, tok)
    # 0 <|endoftext|> 1 He 2 ' said' 3 , 4 ' "' 5 Is ... 8 ?" 9 ' Jack' 10 ' smiled' 11 . 12 ' "' 13 No 14 ,"
    # 15 ' said' 16 ' Jack' 17 , 18 ' "' 19 I 20 ' like' 21 ' the' 22 ' drum' (answer '."'): the answer closes the
    # third quotation, opened at 18 after 'said Jack,'
    pieces = [p.text for p in token_pieces(tok, task.token_ids[0])]
    assert pieces[15:20] == [" said", " Jack", ",", ' "', "I"] and pieces[12] == ' "' and len(pieces) == 23
    assert task.anchors(0) == {"P": 22, "open_quote": 18, "said": 15, "last_word": 21}
    # the quotation the answer closes follows 'asked': no 'said' anchor (the first quotation's is not this one's)
    pieces = [p.text for p in token_pieces(tok, task.token_ids[1])]
    # 0 <|endoftext|> 1 Tom 2 ' said' 3 , 4 ' "' 5 Hi 6 !" 7 ' Mom' 8 ' asked' 9 , 10 ' "' 11 Are 12 ' you' 13 ' hungry'
    assert pieces[8:11] == [" asked", ",", ' "'] and pieces[-1] == " hungry" and len(pieces) == 14
    assert task.anchors(1) == {"P": 13, "open_quote": 10, "last_word": 12}


def test_empty_quotation_keeps_one_name_per_position():
    tok = _gpt2_tokenizer()
    task = closing_quote_task(['Tom said, "." Then he left.'], tok)
    # <|endoftext|> | Tom | ' said' | ',' | ' "'  then '."': P is the opening quote itself
    assert [p.text for p in token_pieces(tok, task.token_ids[0])] == ["<|endoftext|>", "Tom", " said", ",", ' "']
    assert task.anchors(0) == {"P": 4, "said": 2}


def test_closing_quote_anchors_on_tiny_tokenizer_mark_the_quotation_the_answer_closes():
    tok = tiny_tokenizer()
    task = closing_quote_task(STORIES, tok)
    pieces = [p.text for p in token_pieces(tok, task.token_ids[1])]
    # 'The dog ran. Sue said, "Stop!" The dog said, "Why?" Sue said, "It is late': three 'said's; the task was cut at
    # the first, but the answer closes the third quotation, so the anchors are its 'said' and opening quote; the
    # last word piece before P ('e' of ' l|at|e') is 'at'
    assert pieces[6:10] == [" Sue", " said", ",", ' "'] and pieces[17] == " said"
    assert pieces[23:27] == [" Sue", " said", ",", ' "']
    assert pieces[-3:] == [" l", "at", "e"]
    assert task.anchors(1) == {"P": 33, "open_quote": 26, "said": 24, "last_word": 32}
    # every prompt has all four anchors, at distinct positions, and subset / drop_too_long carry them along
    assert all(len(task.anchors(i)) == 4 for i in range(task.n_prompts))
    sub = task.subset([3, 1])
    assert sub.anchors(1) == task.anchors(1) and sub.anchors(0) == task.anchors(3)
    short = task.drop_too_long(30)
    assert [short.anchors(i) for i in range(short.n_prompts)] == [
        task.anchors(i) for i in range(task.n_prompts) if len(task.token_ids[i]) + 1 <= 30
    ]


@pytest.mark.shared_data
def test_closing_quote_anchors_on_llama2c_tok512(tmp_path):
    tok512 = SHARED / "stories260K" / "tok512.bin"
    if not tok512.is_file():
        pytest.skip(f"shared data absent: {tok512}")
    from saecircuits.models.llama2c import build_llama2c_tokenizer, read_llama2c_tokenizer

    tok = build_llama2c_tokenizer(read_llama2c_tokenizer(tok512, 512), tmp_path / "tok")
    task = closing_quote_task(['Tom said, "I like it." Mom smiled.'], tok)
    pieces = [p.text for p in token_pieces(tok, task.token_ids[0])]
    anchors = task.anchors(0)
    # tok512 closes with '"' alone, so P is the '.' and the last word before it is ' it'
    assert pieces[anchors["P"]] == "." and pieces[anchors["last_word"]] == " it"
    assert pieces[anchors["said"]] == " said" and pieces[anchors["open_quote"]] == ' "'
    assert anchors["said"] < anchors["open_quote"] < anchors["last_word"] < anchors["P"]


@pytest.mark.shared_data
def test_jsonl_anchors_map_characters_to_their_tokens(tmp_path):
    tok = _gpt2_tokenizer()
    prompt = 'Tom said, "I want to play'
    # characters: T0 o1 m2 ' '3 s4 a5 i6 d7 ,8 ' '9 "10 I11; GPT-2 puts the space before a word in the word's token
    path = _write(
        tmp_path / "t.jsonl",
        [
            {"prompt": prompt, "answer": '."', "anchors": {"speaker": 0, "verb": 5, "space": 3, "quote": 10}},
            {"prompt": "Mom smiled", "answer": "."},
        ],
    )
    with pytest.raises(TaskError, match=r"t\.jsonl:1: anchors 'verb' and 'space' fall in the same token"):
        jsonl_task(path, tok)
    path = _write(
        tmp_path / "t.jsonl",
        [{"prompt": prompt, "answer": '."', "anchors": {"speaker": 0, "verb": 3, "quote": 10, "I": 11}},
         {"prompt": "Mom smiled", "answer": "."}],
    )
    task = jsonl_task(path, tok)
    assert task.anchors(0) == {"P": 8, "speaker": 1, "verb": 2, "quote": 4, "I": 5}
    assert task.anchors(1) == {"P": 2}


def test_jsonl_anchors_on_tiny_tokenizer_and_without_bos(tmp_path):
    tok = tiny_tokenizer()
    # tiny BPE: 'Mom' | ' said' | ',' | ' "' | 'G' | 'o' | ' to' | ' bed'
    # characters: M0 o1 m2 ' '3 s4 a5 i6 d7 ,8 ' '9 "10 G11 o12: the space at 9 is in the token ' "'
    prompt = 'Mom said, "Go to bed'
    path = _write(tmp_path / "t.jsonl", [{"prompt": prompt, "answer": '."', "anchors": {"quote": 9, "o": 12}}])
    task = jsonl_task(path, tok)
    assert [p.text for p in token_pieces(tok, task.token_ids[0])][1:] == [
        "Mom", " said", ",", ' "', "G", "o", " to", " bed"
    ]
    assert task.anchors(0) == {"P": 8, "quote": 4, "o": 6}
    no_bos = jsonl_task(path, tok, prepend_bos=False)
    assert no_bos.anchors(0) == {"P": 7, "quote": 3, "o": 5}


@pytest.mark.parametrize(
    ("anchors", "message"),
    [
        ({"x": 40}, r"t\.jsonl:2: anchor 'x' at character 40 is outside the prompt \(20 characters, offsets 0-19\)"),
        ({"x": -1}, r"t\.jsonl:2: anchor 'x' at character -1 is outside the prompt"),
        ({"x": "4"}, r"t\.jsonl:2: anchor 'x' must be an integer character offset"),
        ({"x": True}, r"t\.jsonl:2: anchor 'x' must be an integer character offset"),
        ([4], r"t\.jsonl:2: \"anchors\" must be an object of name -> character offset"),
        ({"P": 4}, r"t\.jsonl:2: anchor name 'P' is reserved"),
        ({"P-2": 4}, r"t\.jsonl:2: anchor name 'P-2' is reserved"),
        ({"": 4}, r"t\.jsonl:2: anchor names must be non-empty strings"),
        ({"end": 19}, r"t\.jsonl:2: anchor 'end' \(character 19, 'd'\) falls in the prompt's last token"),
    ],
)
def test_jsonl_bad_anchors_name_the_line_and_the_fix(tmp_path, anchors, message):
    tok = tiny_tokenizer()
    path = _write(
        tmp_path / "t.jsonl",
        [{"prompt": "Mom", "answer": " said"}, {"prompt": 'Mom said, "Go to bed', "answer": '."', "anchors": anchors}],
    )
    with pytest.raises(TaskError, match=message):
        jsonl_task(path, tok)


def test_task_refuses_anchors_outside_the_prompt():
    with pytest.raises(TaskError, match=r"prompt 0: anchor 'a' at token 3 is outside the prompt's 2 tokens"):
        Task(name="t", prompts=["x"], token_ids=[[1, 2]], answer_ids=[3], anchor_positions=[{"a": 3}])
    with pytest.raises(TaskError, match="2 anchor dicts for 1 prompts"):
        Task(name="t", prompts=["x"], token_ids=[[1, 2]], answer_ids=[3], anchor_positions=[{}, {}])
    assert Task(name="t", prompts=["x"], token_ids=[[1, 2]], answer_ids=[3]).anchors(0) == {"P": 1}
