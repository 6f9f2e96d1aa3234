"""jsonl_task: one-token answers in context, clear errors naming the line and the tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_tokenizer

from saecircuits.tasks.base import TaskError
from saecircuits.tasks.jsonl import jsonl_task


def _write(path, records):
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8"
    )
    return path


def test_reads_prompts_and_single_token_answers(tmp_path):
    tok = tiny_tokenizer()
    path = _write(
        tmp_path / "t.jsonl",
        [{"prompt": 'Tom said, "I want to play', "answer": '."'}, "", {"prompt": "Mom", "answer": " said"}],
    )
    task = jsonl_task(path, tok)
    assert task.name == "t" and task.n_prompts == 2 and task.source_index == [0, 2]
    assert task.answer_ids == [
        tok('."', add_special_tokens=False)["input_ids"][0],
        tok(" said", add_special_tokens=False)["input_ids"][0],
    ]
    assert task.token_ids[1] == [tok.bos_token_id] + tok("Mom", add_special_tokens=False)["input_ids"]
    assert task.prediction_pos == [len(t) - 1 for t in task.token_ids]


def test_multi_token_answer_names_line_and_tokens(tmp_path):
    tok = tiny_tokenizer()
    path = _write(
        tmp_path / "t.jsonl", [{"prompt": "Mom", "answer": " said"}, {"prompt": "Mom", "answer": " smiled"}]
    )
    with pytest.raises(
        TaskError, match=r"t\.jsonl:2.*' smiled'.*4 extra token\(s\) \[' s', 'm', 'il', 'ed'\]"
    ):
        jsonl_task(path, tok)


def test_answer_merging_into_prompt_is_rejected(tmp_path):
    tok = tiny_tokenizer()
    # 'Mo' + 'm' tokenizes as the single token 'Mom': the prompt's tokens are not a prefix
    path = _write(tmp_path / "t.jsonl", [{"prompt": "Mo", "answer": "m"}])
    with pytest.raises(TaskError, match="not a prefix"):
        jsonl_task(path, tok)


def test_bad_lines_and_empty_file(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(TaskError, match=r":1: not valid JSON"):
        jsonl_task(_write(tmp_path / "a.jsonl", ["{oops"]), tok)
    with pytest.raises(TaskError, match="string fields"):
        jsonl_task(_write(tmp_path / "b.jsonl", [{"prompt": "x"}]), tok)
    with pytest.raises(TaskError, match="no prompts"):
        jsonl_task(_write(tmp_path / "c.jsonl", [""]), tok)
    with pytest.raises(TaskError, match="cannot read"):
        jsonl_task(tmp_path / "missing.jsonl", tok)


def test_empty_prompt_or_answer_is_named_as_such(tmp_path):
    # an empty prompt was reported as "the prompt's tokens are not a prefix ...", an empty answer as "0 extra tokens"
    tok = tiny_tokenizer()
    with pytest.raises(TaskError, match=r'e\.jsonl:2: "prompt" is empty; give the text the model reads'):
        jsonl_task(_write(tmp_path / "e.jsonl", [{"prompt": "Mom", "answer": " said"},
                                                 {"prompt": "", "answer": " said"}]), tok)
    with pytest.raises(TaskError, match=r'f\.jsonl:1: "answer" is empty; give the one token'):
        jsonl_task(_write(tmp_path / "f.jsonl", [{"prompt": "Mom", "answer": ""}]), tok)


# ---------------------------------------------------------------------------------------------------------------
# Special tokens in text (issue 7 item 3) and over-long prompts (item 6)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TOK512 = SHARED / "stories260K" / "tok512.bin"


@pytest.mark.shared_data
def test_special_string_in_prompt_is_text_as_run_c_encodes_it(tmp_path):
    if not TOK512.is_file():
        pytest.skip(f"shared data absent: {TOK512} (tests read ../shared/data relative to the repo root)")
    from saecircuits.models.llama2c import build_llama2c_tokenizer, read_llama2c_tokenizer, reference_encode

    vocab = read_llama2c_tokenizer(TOK512, 512)
    tok = build_llama2c_tokenizer(vocab, tmp_path / "tok")
    prompt = "The tag <s> is printed here and"
    task = jsonl_task(_write(tmp_path / "t.jsonl", [{"prompt": prompt, "answer": " the"}]), tok)
    # run.c: BOS, then '<', 's', '>' as characters; before the fix the HF tokenizer put BOS (1) at position 6
    assert task.token_ids[0] == reference_encode(prompt, vocab)
    assert task.token_ids[0].count(1) == 1 and task.token_ids[0][0] == 1
    assert task.answer_ids == [reference_encode(prompt + " the", vocab)[-1]]
    for answer in ("<s>", " <s>", "</s>", "<unk>"):
        with pytest.raises(TaskError, match=r"t2\.jsonl:1: answer .* is the tokenizer's special token"):
            jsonl_task(_write(tmp_path / "t2.jsonl", [{"prompt": prompt, "answer": answer}]), tok)


def test_answer_equal_to_bos_string_is_refused(tmp_path):
    tok = tiny_tokenizer()  # BOS = EOS = PAD = <|endoftext|>
    path = _write(tmp_path / "t.jsonl", [{"prompt": "Mom", "answer": "<|endoftext|>"}])
    with pytest.raises(TaskError, match=r"answer '<\|endoftext\|>' is the tokenizer's special token"):
        jsonl_task(path, tok)
    # inside a prompt the string is text: no special id after the leading BOS
    task = jsonl_task(_write(tmp_path / "u.jsonl", [{"prompt": "Mom <|endoftext|> Tom", "answer": " said"}]), tok)
    assert task.token_ids[0][0] == tok.bos_token_id and tok.bos_token_id not in task.token_ids[0][1:]
    assert tok.decode(task.token_ids[0][1:]) == "Mom <|endoftext|> Tom"


def test_max_tokens_drops_and_counts(tmp_path):
    tok = tiny_tokenizer()
    long_prompt = " ".join(["Mom"] * 20)
    path = _write(
        tmp_path / "t.jsonl",
        [{"prompt": "Mom", "answer": " said"}, {"prompt": long_prompt, "answer": " said"}, {"prompt": "Tom", "answer": " said"}],
    )
    n_long = 1 + len(tok(long_prompt + " said", add_special_tokens=False)["input_ids"])  # BOS + prompt + answer
    assert n_long > 10
    task = jsonl_task(path, tok, max_tokens=10)
    assert task.n_prompts == 2 and task.n_dropped_too_long == 1 and task.source_index == [0, 2]
    kept = jsonl_task(path, tok, max_tokens=n_long)
    assert kept.n_prompts == 3 and kept.n_dropped_too_long == 0
    with pytest.raises(TaskError, match=r"no prompts of at most max_tokens=2 tokens \(3 longer ones dropped\)"):
        jsonl_task(path, tok, max_tokens=2)
