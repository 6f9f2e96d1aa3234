"""closing_quote_task: prompt construction, position contract, agreement with bridge.to_tokens, real GPT-2 BPE data."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import STORIES, tiny_neo, tiny_tokenizer

from saecircuits.tasks.base import TaskError
from saecircuits.tasks.closing_quote import closing_quote_task

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_prompts_cut_at_first_closing_after_first_said_quote():
    tok = tiny_tokenizer()
    task = closing_quote_task(STORIES, tok)
    dot = tok('."', add_special_tokens=False)["input_ids"][0]
    # story 1's first said-quote closes with !" -> no '."' until "It is late."
    assert task.source_index == [0, 1, 2, 4, 5, 6, 7]
    assert task.prompts[0] == 'Once upon a time, Tom said, "I want to play'
    assert task.prompts[1] == 'The dog ran. Sue said, "Stop!" The dog said, "Why?" Sue said, "It is late'
    assert task.prompts[6] == 'Sue said, "Where is the ball?" Tom said, "Here it is'
    assert set(task.answer_ids) == {dot}
    for ids, pos, text in zip(task.token_ids, task.prediction_pos, task.prompts, strict=True):
        assert ids[0] == tok.bos_token_id and pos == len(ids) - 1
        assert tok.decode(ids[1:]) == text


def test_switch_adds_exclamation_and_question_closings():
    tok = tiny_tokenizer()
    task = closing_quote_task(STORIES, tok, closings=('."', '!"', '?"'))
    assert task.prompts[1] == 'The dog ran. Sue said, "Stop'
    assert tok.decode([task.answer_ids[1]]) == '!"'
    assert task.prompts[6] == 'Sue said, "Where is the ball'
    assert tok.decode([task.answer_ids[6]]) == '?"'


def test_tokens_match_bridge_to_tokens():
    model = tiny_neo()
    task = closing_quote_task(STORIES, model.tokenizer)
    for ids, text, answer in zip(task.token_ids, task.prompts, task.answer_ids, strict=True):
        expected = model.to_tokens(text + model.tokenizer.decode([answer]))[0].tolist()
        assert ids + [answer] == expected


def test_drops_prompts_whose_last_token_does_not_close_the_quote():
    tok = tiny_tokenizer()
    # closing '"' alone: the text ends with '."' which is one token, not a suffix of '"' -> dropped
    with pytest.raises(TaskError, match="no closing-quote prompts"):
        closing_quote_task(['Tom said, "Hi."'], tok, closings=('"',))
    task = closing_quote_task(['Tom said, "Hi."', 'Tom said, "Hi x"'], tok, closings=('"',))
    assert task.source_index == [1] and tok.decode([task.answer_ids[0]]) == '"'


def test_limits_and_errors():
    tok = tiny_tokenizer()
    assert closing_quote_task(STORIES, tok, max_prompts=2).source_index == [0, 1]
    short = closing_quote_task(STORIES, tok, max_tokens=20)
    assert all(len(t) + 1 <= 20 for t in short.token_ids) and short.n_prompts < 7
    no_bos = closing_quote_task(STORIES, tok, prepend_bos=False)
    assert no_bos.token_ids[0][0] != tok.bos_token_id
    with pytest.raises(TaskError, match="no closing-quote prompts"):
        closing_quote_task(["No quotes here.", 'He said, "unfinished'], tok)
    with pytest.raises(TaskError, match="ending with"):
        closing_quote_task(STORIES, tok, closings=(".",))


@pytest.mark.shared_data
def test_real_gpt2_bpe_on_tinystories_validation():
    vocab, merges = SHARED / "gpt2-bpe-tokenizer" / "vocab.json", SHARED / "gpt2-bpe-tokenizer" / "merges.txt"
    stories_file = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"
    if not (vocab.exists() and merges.exists() and stories_file.exists()):
        pytest.skip(
            f"shared data not found under {SHARED} (GPT-2 BPE files and TinyStories validation excerpt)"
        )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, pad_token=eot)
    stories = [s.strip() for s in stories_file.read_text(encoding="utf-8").split(eot) if s.strip()]
    task = closing_quote_task(stories, tok)
    # checked by hand on GPT-2 BPE: the first 1000 validation stories give 220 prompts, answer id 526, BOS 50256
    assert task.n_prompts == 220
    assert set(task.answer_ids) == {526}
    assert all(t[0] == 50256 for t in task.token_ids)
    lengths = sorted(len(t) + 1 for t in task.token_ids)
    assert lengths[0] == 35 and lengths[-1] == 562
    assert task.source_index[199] == 822


def test_max_tokens_counts_dropped_prompts_and_drop_too_long_agrees():
    tok = tiny_tokenizer()
    full = closing_quote_task(STORIES, tok)
    lengths = [len(t) + 1 for t in full.token_ids]  # BOS + prompt + answer
    limit = sorted(lengths)[len(lengths) // 2]
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < full.n_prompts
    short = closing_quote_task(STORIES, tok, max_tokens=limit)
    assert short.n_prompts == full.n_prompts - expected and short.n_dropped_too_long == expected
    again = full.drop_too_long(limit)
    assert again.token_ids == short.token_ids and again.n_dropped_too_long == expected
    assert again.subset([0]).n_dropped_too_long == expected
    with pytest.raises(TaskError, match="all 7 prompts are longer than max_tokens=2"):
        full.drop_too_long(2)


def test_special_strings_inside_stories_stay_text():
    tok = tiny_tokenizer()  # <|endoftext|> is BOS = EOS = PAD, id 0
    story = 'Tom ran. <|endoftext|> Sue said, "I like the dog." The end.'
    task = closing_quote_task([story], tok)
    ids = task.token_ids[0]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]  # only the leading BOS is special
    assert task.prompts == ['Tom ran. <|endoftext|> Sue said, "I like the dog']
    assert tok.decode(ids[1:]) == task.prompts[0]


def test_tokenizer_without_bos_gets_no_bos():
    class NoBos:
        """The tiny tokenizer with its BOS hidden (a wrapper: the real tokenizer is not modified)."""

        bos_token_id = None

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, *args, **kwargs):
            return self._tok(*args, **kwargs)

    tok = tiny_tokenizer()
    with_bos = closing_quote_task(STORIES, tok)
    task = closing_quote_task(STORIES, NoBos(tok))
    assert task.token_ids == [t[1:] for t in with_bos.token_ids]  # the same prompts, no stand-in first token
    with pytest.raises(TaskError, match="no BOS token"):
        closing_quote_task(STORIES, NoBos(tok), prepend_bos=True)


@pytest.mark.shared_data
def test_readme_library_path_on_the_default_model_and_tinystories():
    """The README's library example: closing_quote_task, then direct_logit_attribution, on 1000 validation stories."""
    stories_file = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"
    if not stories_file.exists():
        pytest.skip(f"shared data not found: {stories_file}")
    from saecircuits.analysis.readouts.dla import direct_logit_attribution
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.default import shipped_model_dir
    from saecircuits.models.load import load_model
    from saecircuits.models.tokens import ContextLengthError

    model = load_model(shipped_model_dir())
    n_ctx = model.cfg.n_ctx
    assert n_ctx == 256
    docs = read_documents(stories_file)
    everything = closing_quote_task(docs, model.tokenizer)
    too_long = sum(len(t) + 1 > n_ctx for t in everything.token_ids)
    assert (everything.n_prompts, too_long) == (220, 38)  # the count
    # without a limit: a clear error naming the context, not an IndexError from the position embedding
    with pytest.raises(ContextLengthError, match=r"38 of 220 task prompts are longer than the model's context of "
                       r"256 tokens .*max_tokens=256"):
        direct_logit_attribution(model, everything)
    task = closing_quote_task(docs, model.tokenizer, max_tokens=n_ctx)  # the README's call
    assert (task.n_prompts, task.n_dropped_too_long) == (182, 38)
    dla = direct_logit_attribution(model, task)
    assert dla.per_prompt.shape[0] == 182 and dla.max_abs_error < 1e-3
