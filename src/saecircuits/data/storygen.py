"""A deterministic generator of short children's stories full of dialogue (the embedded default corpus).

The stories imitate the TinyStories register (``Once upon a time, ...``) but are dense in quoted speech so that a
tiny language model trained on a few million tokens has to learn *when* a quotation closes:

- ``Tom said, "I like the red ball."`` -- a quote opened by ``said, "`` closes with ``."`` (or ``!"`` / ``?"``
  when the sentence is an exclamation / question, which the sentence's first words reveal);
- ``"I like the red ball," Tom said.`` -- a quote that opens a sentence closes with ``,"`` when the sentence
  goes on;
- ``"I think," said Tom, "we should go home."`` -- split quotes;
- ``Tom said, "Hello, Mia. Can we play?"`` -- several sentences inside one quote (a ``. `` that does not close);
- ``Tom said, "Mom told me, 'Be careful.' So I will be careful."`` -- nested single quotes;
- a quote left open when the story ends (unfinished quote);
- narration between turns that reuses the vocabulary of the quoted sentences, so the model must track whether it
  is inside a quotation to choose between ``.`` and ``."``.

Every story is a pure function of ``(seed, index)``: :func:`generate_stories` with the same arguments returns the
same list on every machine (``random.Random`` with an integer seed is stable across Python versions). The
held-out split uses a different seed. :data:`GENERATOR_VERSION` changes whenever the output of a given seed
changes; caches key on it.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from saecircuits.atomic import atomic_write_text

GENERATOR_VERSION = 1
"""Bump when the text produced for a given seed changes (it keys the cached default model)."""

EOT = "<|endoftext|>"
"""Document separator written between stories (GPT-2 / GPT-Neo's end-of-text token)."""

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary (a few hundred words)

_GIRLS = ["Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Amy", "Kitty", "Daisy", "Ella", "Rose", "Molly",
          "Sara", "Jane", "Lola", "Ruby", "Kate", "Nina", "Ivy"]
_BOYS = ["Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Bob", "Spot", "Billy", "Joe", "Finn", "Dan", "Jake",
         "Rex", "Toby", "Ned", "Oscar", "Paul", "Roy"]
_KINDS = ["girl", "boy", "dog", "cat", "bunny", "bird", "bear", "frog", "duck", "mouse", "fox", "lion", "pig",
          "puppy", "kitten", "owl"]
_NOUNS = ["ball", "kite", "box", "toy", "car", "hat", "cake", "apple", "book", "flower", "tree", "boat", "rock",
          "shell", "stick", "cookie", "doll", "train", "drum", "bike", "cup", "leaf", "star", "sock", "bell",
          "spoon", "blanket", "picture", "swing", "sandwich", "carrot", "feather", "map", "key", "rope", "bucket",
          "jar", "truck", "balloon", "crayon", "pie", "coat", "shoe", "basket", "egg", "seed", "ring", "lamp",
          "chair", "wagon"]
_ADJS = ["big", "small", "red", "blue", "green", "yellow", "shiny", "soft", "pretty", "funny", "little", "old",
         "new", "happy", "tall", "round", "warm", "cold", "bright", "fast", "slow", "sweet", "tiny", "huge",
         "pink", "purple", "fluffy", "wet", "clean", "dirty", "loud", "quiet", "brave", "kind", "silly"]
_FEELINGS = ["happy", "sad", "scared", "tired", "hungry", "excited", "angry", "proud", "sorry", "glad", "sleepy",
             "worried", "lonely", "surprised", "curious"]
_PLACES = ["park", "garden", "forest", "beach", "pond", "river", "hill", "farm", "house", "school", "shop",
           "kitchen", "yard", "zoo", "lake", "field", "library", "cave", "playground", "castle"]
_FAMILY = ["mom", "dad", "grandma", "grandpa", "sister", "brother", "aunt", "uncle"]
# (base form, past tense)
_VERBS = [("play with", "played with"), ("find", "found"), ("share", "shared"), ("build", "built"),
          ("paint", "painted"), ("fix", "fixed"), ("throw", "threw"), ("catch", "caught"), ("hold", "held"),
          ("carry", "carried"), ("hide", "hid"), ("clean", "cleaned"), ("bake", "baked"), ("draw", "drew"),
          ("wash", "washed"), ("open", "opened"), ("keep", "kept"), ("bring", "brought"), ("give away", "gave away"),
          ("look at", "looked at"), ("pick up", "picked up"), ("push", "pushed"), ("pull", "pulled"),
          ("eat", "ate"), ("buy", "bought"), ("make", "made"), ("sell", "sold"), ("climb", "climbed")]
_INTRANS = [("run", "ran"), ("jump", "jumped"), ("swim", "swam"), ("dance", "danced"), ("sing", "sang"),
            ("play", "played"), ("sleep", "slept"), ("laugh", "laughed"), ("hop", "hopped"), ("read", "read"),
            ("rest", "rested"), ("walk", "walked")]
_TIMES = ["today", "tomorrow", "after lunch", "every day", "all day", "right now", "before dinner"]
_SAY = ["said", "said", "said", "said", "replied", "whispered", "told her friend", "answered"]
_ASK = ["asked", "asked", "wondered", "said"]
_SHOUT = ["shouted", "yelled", "cried", "said", "laughed"]


_NAMES = frozenset(_GIRLS + _BOYS)


def _a(word: str) -> str:
    """``a word`` or ``an word`` (by the first letter)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _lower_first(sentence: str) -> str:
    """Lower-case the first letter unless the first word is ``I`` or a name (for the second half of a split quote)."""
    first = re.split(r"[ ,']", sentence, maxsplit=1)[0]
    if first == "I" or first in _NAMES:
        return sentence
    return sentence[0].lower() + sentence[1:]


@dataclass(frozen=True)
class _Char:
    name: str
    pronoun: str  # "he" / "she"
    possessive: str  # "his" / "her"


class _Story:
    """Builds one story with its own ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng
        n_chars = rng.choice([2, 2, 3])
        girls = rng.sample(_GIRLS, 2)
        boys = rng.sample(_BOYS, 2)
        pool = [_Char(g, "she", "her") for g in girls] + [_Char(b, "he", "his") for b in boys]
        rng.shuffle(pool)
        self.chars = pool[:n_chars]
        self.place = rng.choice(_PLACES)
        self.thing = rng.choice(_NOUNS)

    # -- small pieces -------------------------------------------------------------------------------------------
    def c(self, xs: Sequence[str]) -> str:
        return self.r.choice(xs)

    def obj(self) -> str:
        r = self.r.random()
        if r < 0.35:
            return f"the {self.c(_ADJS)} {self.c(_NOUNS)}"
        if r < 0.55:
            return _a(self.c(_NOUNS))
        if r < 0.75:
            return f"my {self.c(_NOUNS)}"
        if r < 0.85:
            return f"the {self.thing}"
        return f"the {self.c(_NOUNS)}"

    def tail(self) -> str:
        """Optional sentence extension (keeps the end of a sentence from being trivially predictable)."""
        r = self.r.random()
        if r < 0.12:
            return f" in the {self.c(_PLACES)}"
        if r < 0.22:
            return f" {self.c(_TIMES)}"
        return ""

    def other(self, a: _Char) -> _Char:
        return self.r.choice([x for x in self.chars if x is not a])

    # -- sentences spoken (without final punctuation) -------------------------------------------------------------
    def statement(self, a: _Char) -> str:
        b = self.other(a)
        v, _ = self.c(_VERBS)
        iv, _ = self.c(_INTRANS)
        options = [
            lambda: f"I want to {v} {self.obj()}{self.tail()}",
            lambda: f"I like {self.obj()}",
            lambda: f"We can {v} {self.obj()} together",
            lambda: f"The {self.c(_NOUNS)} is so {self.c(_ADJS)}",
            lambda: f"Let's go to the {self.c(_PLACES)}",
            lambda: f"I have {_a(self.c(_ADJS))} {self.c(_NOUNS)}",
            lambda: f"My {self.c(_FAMILY)} gave me {self.obj()}",
            lambda: f"I am {self.c(_FEELINGS)}",
            lambda: f"You are my best friend, {b.name}",
            lambda: f"Thank you for the {self.c(_NOUNS)}",
            lambda: f"Thank you, {b.name}",
            lambda: f"I will {v} {self.obj()} with you",
            lambda: f"It is time to {iv}",
            lambda: f"I see {_a(self.c(_ADJS))} {self.c(_NOUNS)} in the {self.c(_PLACES)}",
            lambda: "We should go home now",
            lambda: f"Please give me {self.obj()}",
            lambda: f"I found {self.obj()} near the {self.c(_PLACES)}",
            lambda: f"I can {iv} very fast",
            lambda: f"{b.name}, I need your help",
            lambda: f"The {self.thing} is mine",
            lambda: f"I am sorry, {b.name}",
            lambda: f"I know where the {self.thing} is",
            lambda: f"We will {iv} in the {self.c(_PLACES)}{self.tail()}",
        ]
        return self.c(options)()

    def question(self, a: _Char) -> str:
        b = self.other(a)
        v, _ = self.c(_VERBS)
        iv, _ = self.c(_INTRANS)
        options = [
            lambda: f"Can I {v} {self.obj()}",
            lambda: f"Where is the {self.c(_NOUNS)}",
            lambda: f"Do you want to {v} {self.obj()}{self.tail()}",
            lambda: "What is that",
            lambda: f"Will you {iv} with me",
            lambda: f"Why are you {self.c(_FEELINGS)}, {b.name}",
            lambda: f"Who has my {self.c(_NOUNS)}",
            lambda: f"Can we go to the {self.c(_PLACES)}",
            lambda: f"Is this your {self.c(_NOUNS)}",
            lambda: f"{b.name}, are you {self.c(_FEELINGS)}",
            lambda: f"How did you {v} the {self.thing}",
            lambda: f"What do you see in the {self.c(_PLACES)}",
        ]
        return self.c(options)()

    def exclamation(self, a: _Char) -> str:
        b = self.other(a)
        v, _ = self.c(_VERBS)
        options = [
            lambda: f"Look at the {self.c(_ADJS)} {self.c(_NOUNS)}",
            lambda: f"Wow, the {self.c(_NOUNS)} is so {self.c(_ADJS)}",
            lambda: "I did it",
            lambda: "Come and see",
            lambda: "Watch out",
            lambda: f"Yay, we can {v} {self.obj()}",
            lambda: f"Oh no, my {self.c(_NOUNS)} is gone",
            lambda: "Hooray",
            lambda: f"Stop, {b.name}",
            lambda: "This is so fun",
            lambda: f"Help me, {b.name}",
            lambda: f"I love the {self.thing}",
        ]
        return self.c(options)()

    def spoken(self, a: _Char) -> tuple[str, str]:
        """One spoken sentence and its end mark (``.``, ``?`` or ``!``), decided by the sentence's form."""
        r = self.r.random()
        if r < 0.55:
            return self.statement(a), "."
        if r < 0.8:
            return self.question(a), "?"
        return self.exclamation(a), "!"

    def quoted_body(self, a: _Char) -> str:
        """The full text of a quotation that closes at its end: one or more sentences, sometimes a nested quote."""
        r = self.r.random()
        if r < 0.1:  # nested quote in the middle
            src = self.c([f"my {self.c(_FAMILY)}", self.other(a).name, "the teacher"])
            s, m = self.spoken(a)
            t, n = self.spoken(a)
            verb = self.c(["told me", "said", "always says", "said to me"])
            return f"{src[0].upper()}{src[1:]} {verb}, '{s}{m}' {t}{n}"
        if r < 0.15:  # nested quote closing together with the outer one
            src = self.c([f"My {self.c(_FAMILY)}", self.other(a).name])
            s, m = self.spoken(a)
            return f"{src} said, '{s}{m}'"
        if r < 0.32:  # two sentences
            s, m = self.spoken(a)
            t, n = self.spoken(a)
            return f"{s}{m} {t}{n}"
        s, m = self.spoken(a)
        return f"{s}{m}"

    # -- narration -----------------------------------------------------------------------------------------------
    def narration(self, a: _Char) -> str:
        b = self.other(a)
        _, vp = self.c(_VERBS)
        _, ivp = self.c(_INTRANS)
        v, _ = self.c(_VERBS)
        options = [
            lambda: f"{a.name} {vp} the {self.c(_NOUNS)}.",
            lambda: f"{a.name} was very {self.c(_FEELINGS)}.",
            lambda: f"They walked to the {self.c(_PLACES)}.",
            lambda: f"The sun was {self.c(['bright', 'warm', 'hot', 'high'])}.",
            lambda: f"{a.name} smiled at {b.name}.",
            lambda: f"{a.name} looked at the {self.c(_ADJS)} {self.c(_NOUNS)}.",
            lambda: f"{a.name} and {b.name} {ivp} all day.",
            lambda: f"{a.name} wanted to {v} {self.obj().replace('my ', a.possessive + ' ')}.",
            lambda: f"{a.pronoun.capitalize()} {ivp} to the {self.c(_PLACES)}{self.tail()}.",
            lambda: f"{b.name} gave {a.name} {_a(self.c(_ADJS))} {self.c(_NOUNS)}.",
            lambda: f"{a.name} thought about the {self.thing}.",
            lambda: f"{a.name} felt {self.c(_FEELINGS)}, so {a.pronoun} {ivp}.",
            lambda: f"Then {a.name} saw {_a(self.c(_KINDS))} near the {self.c(_PLACES)}.",
            lambda: f"{b.name} nodded.",
            lambda: f"{a.name} {ivp} and {ivp} in the {self.c(_PLACES)}.",
        ]
        return self.c(options)()

    # -- dialogue turns ------------------------------------------------------------------------------------------
    def turn(self, a: _Char) -> str:
        b = self.other(a)
        r = self.r.random()
        if r < 0.40:  # Tom said, "...."   (the main pattern)
            intro = self.c([f"{a.name} {self.c(_SAY)}", f"{a.name} said to {b.name}",
                            f"{a.name} smiled and said", f"{a.name} looked at {b.name} and said",
                            f"{a.pronoun.capitalize()} said"])
            intro = intro.replace("told her friend", f"told {a.possessive} friend")
            return f'{intro}, "{self.quoted_body(a)}"'
        if r < 0.50:  # Tom asked, "...?"
            return f'{a.name} {self.c(_ASK)}, "{self.question(a)}?"'
        if r < 0.58:  # Tom shouted, "...!"
            return f'{a.name} {self.c(_SHOUT)}, "{self.exclamation(a)}!"'
        if r < 0.78:  # "...," Tom said.   /  "...?" Tom asked.
            s, m = self.spoken(a)
            close = "," if m == "." else m
            verb = {".": self.c(["said", "replied", "said"]), "?": "asked", "!": self.c(["shouted", "cried"])}[m]
            who = self.c([a.name, a.pronoun]) if self.r.random() < 0.8 else a.name
            if self.r.random() < 0.5:
                return f'"{s}{close}" {who} {verb}.'
            return f'"{s}{close}" {verb} {a.name}.'
        if r < 0.88:  # "...," said Tom, "...."
            s, _ = self.statement(a), "."
            t, n = self.spoken(a)
            return f'"{s}," said {a.name}, "{_lower_first(t)}{n}"'
        # narration then speech in the same sentence group
        return f'{self.narration(a)} {a.pronoun.capitalize()} said, "{self.quoted_body(a)}"'

    def unfinished(self, a: _Char) -> str:
        """A quote left open at the end of the story."""
        s, _ = self.spoken(a)
        words = s.split(" ")
        cut = self.r.randint(1, len(words))
        return f'{a.name} {self.c(_SAY)}, "{" ".join(words[:cut])}'.replace("told her friend", "said")

    # -- the story -----------------------------------------------------------------------------------------------
    def text(self) -> str:
        a = self.chars[0]
        b = self.chars[1]
        opening = self.c([
            f"Once upon a time, there was {_a(self.c(_ADJS))} {self.c(_KINDS)} named {a.name}.",
            f"Once upon a time, {a.name} and {b.name} went to the {self.place}.",
            f"One day, {a.name} found {_a(self.c(_ADJS))} {self.thing} in the {self.place}.",
            f"{a.name} had a friend named {b.name}.",
            f"Once upon a time, in {_a(self.c(_ADJS))} {self.place}, there lived {_a(self.c(_KINDS))} named {a.name}.",
        ])
        paragraphs: list[list[str]] = [[opening]]
        for _ in range(self.r.randint(0, 2)):
            paragraphs[-1].append(self.narration(self.c(self.chars)))
        n_turns = self.r.randint(3, 8)
        speaker = self.c(self.chars)
        for _ in range(n_turns):
            if self.r.random() < 0.3:
                paragraphs.append([])
            if self.r.random() < 0.45:
                paragraphs[-1].append(self.narration(self.c(self.chars)))
            paragraphs[-1].append(self.turn(speaker))
            speaker = self.other(speaker) if self.r.random() < 0.8 else speaker
        r = self.r.random()
        if r < 0.12:
            paragraphs[-1].append(self.unfinished(speaker))
        else:
            ending = self.c([
                f"{a.name} and {b.name} were very happy.",
                f"From that day on, {a.name} and {b.name} were best friends.",
                f"They {self.c(_INTRANS)[1]} together all day.",
                f"{a.name} went home and slept.",
                "The end.",
            ])
            paragraphs.append([ending])
        return "\n\n".join(" ".join(p) for p in paragraphs if p)


def generate_story(seed: int, index: int) -> str:
    """Story number ``index`` of the stream ``seed`` (a pure function of both)."""
    return _Story(random.Random(seed * 1_000_003 + index)).text()


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` stories of the stream ``seed``.

    Args:
        n: number of stories (>= 0).
        seed: stream seed; the default training split uses ``seed=0`` and the held-out split another seed.

    Raises:
        ValueError: ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [generate_story(seed, i) for i in range(n)]


def stories_to_text(stories: Sequence[str]) -> str:
    """Join stories the TinyStories way: each story followed by a line holding ``<|endoftext|>``."""
    return "".join(f"{s}\n{EOT}\n" for s in stories)


def write_corpus(path: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """Write ``n`` stories of stream ``seed`` as one text file (atomically) and return its path."""
    return atomic_write_text(path, stories_to_text(generate_stories(n, seed)))


_NESTED = re.compile(r"""(?:^|[\s"])'[A-Z][^'"]*[.!?]'""")


def dialogue_stats(stories: Sequence[str]) -> dict[str, int]:
    """Counts of the dialogue patterns in ``stories`` (used by tests and to describe a corpus).

    Keys: ``stories``; ``said_open`` (occurrences of ``said, "``); ``close_period`` / ``close_exclaim`` /
    ``close_question`` / ``close_comma`` (``."`` / ``!"`` / ``?"`` / ``,"``); ``nested`` (single-quoted
    sentences inside a double quotation); ``unfinished`` (stories with an odd number of ``"``, i.e. a quote left
    open); ``multi_sentence`` (a ``. `` , ``! `` or ``? `` followed by a capital inside a double quotation).
    """
    out = dict(stories=len(stories), said_open=0, close_period=0, close_exclaim=0, close_question=0,
               close_comma=0, nested=0, unfinished=0, multi_sentence=0)
    for s in stories:
        out["said_open"] += s.count('said, "')
        out["close_period"] += s.count('."')
        out["close_exclaim"] += s.count('!"')
        out["close_question"] += s.count('?"')
        out["close_comma"] += s.count(',"')
        out["unfinished"] += s.count('"') % 2
        # the text inside double quotes is every odd-numbered piece of a split on '"'
        inside = s.split('"')[1::2]
        out["nested"] += sum(len(_NESTED.findall(q)) for q in inside)
        out["multi_sentence"] += sum(len(re.findall(r"[.!?]'? [A-Z]", q)) for q in inside)
    return out
