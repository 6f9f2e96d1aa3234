"""jsonl_task: one-token answers in context, clear errors naming the line and the tokens."""

from __future__ import annotations

import json

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
        TaskError, match=r"t\.jsonl:2.*' smiled'.*4 extra token\(s\) \['Ġs', 'm', 'il', 'ed'\]"
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
