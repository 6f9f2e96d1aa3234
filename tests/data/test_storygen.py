"""The dialogue-story generator: determinism, the patterns it must contain, and the corpus file format."""

from __future__ import annotations

from saecircuits.data.storygen import (
    EOT,
    dialogue_stats,
    generate_stories,
    generate_story,
    stories_to_text,
    write_corpus,
)


def test_deterministic_by_seed_and_index():
    a = generate_stories(50, seed=3)
    assert a == generate_stories(50, seed=3)
    assert a[17] == generate_story(3, 17)
    b = generate_stories(50, seed=4)
    assert sum(x == y for x, y in zip(a, b, strict=True)) == 0
    # a prefix of a longer stream is the shorter stream
    assert generate_stories(80, seed=3)[:50] == a


def test_dialogue_stats_hand_worked():
    story = ('Tom said, "Hi. Can we play?" "Yes," Mia said. Tom said, "Mom said, \'Be kind.\' I am kind."\n\n'
             'Mia shouted, "Look!" Tom said, "I want')
    s = dialogue_stats([story])
    assert s == dict(stories=1, said_open=3, close_period=1, close_exclaim=1, close_question=1, close_comma=1,
                     nested=1, unfinished=1, multi_sentence=2)


def test_corpus_has_all_dialogue_patterns():
    stories = generate_stories(1000, seed=0)
    s = dialogue_stats(stories)
    n = s["stories"]
    assert s["said_open"] > 1.5 * n  # plenty of `said, "`
    for key in ("close_period", "close_exclaim", "close_question", "close_comma"):
        assert s[key] > 0.5 * n, (key, s)
    assert s["nested"] > 0.2 * n
    assert s["multi_sentence"] > 0.3 * n
    assert 0.05 * n < s["unfinished"] < 0.25 * n
    # an unfinished story ends inside its quote: the text after the last '"' has no closing mark
    for story in stories:
        if story.count('"') % 2:
            tail = story.rsplit('"', 1)[1]
            assert "\n" not in tail and not tail.endswith(('.', '!', '?'))
    # narration sentences end with a bare "." too, so "." vs '."' depends on the quote state
    assert all(st.count('. ') > 0 for st in stories[:100])
    # stories are short (a 256-token context holds most of them) and vary
    lengths = [len(st) for st in stories]
    assert 150 < sum(lengths) / n < 900
    assert len(set(stories)) == n


def test_vocabulary_is_a_few_hundred_words():
    words = set()
    for st in generate_stories(2000, seed=0):
        words.update(w.strip('.,!?"\'').lower() for w in st.split())
    assert 250 <= len(words) <= 800, len(words)


def test_write_corpus_round_trips(tmp_path):
    path = write_corpus(tmp_path / "sub" / "stories.txt", 20, seed=5)
    text = path.read_text()
    assert text == stories_to_text(generate_stories(20, seed=5))
    docs = [d.strip() for d in text.split(EOT) if d.strip()]
    assert docs == generate_stories(20, seed=5)
    assert [p.name for p in path.parent.iterdir()] == ["stories.txt"]  # no temp file left


def test_generator_output_is_pinned_to_its_version():
    """Editing the generator changes this digest: bump GENERATOR_VERSION (and re-ship the default model)."""
    import hashlib

    from saecircuits.data.storygen import GENERATOR_VERSION

    digest = hashlib.sha256(stories_to_text(generate_stories(200, 0)).encode()).hexdigest()
    pinned = {1: "e577c3c529b05205b103cdc7f7dd09a7ee5e5451fddc55b6e80960d6015a41ec"}
    assert pinned.get(GENERATOR_VERSION) == digest, (
        "story text changed without a GENERATOR_VERSION bump; bump it, pin the new digest here, and re-ship "
        "saecircuits/assets/default with `saecircuits train-lm --workspace W`"
    )
