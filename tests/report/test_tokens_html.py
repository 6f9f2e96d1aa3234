"""Token heat-map spans: colours hand-worked from the reference notebook's renderer, visible whitespace, escaping."""

from __future__ import annotations

import re

import pytest

from saecircuits.report.tokens_html import token_color, tokens_to_html, visible_token


@pytest.mark.parametrize(
    ("value", "max_value", "rgb", "text"),
    [
        # v = max: g = 255 * (1 - 1) = 0; luminance = 0.299 -> white text.
        (4.0, 4.0, (255, 0, 0), "white"),
        # v = 0: white background, black text.
        (0.0, 4.0, (255, 255, 255), "black"),
        # v = max / 2: g = int(127.5) = 127; luminance = (0.299*255 + 0.701*127) / 255 = 0.648 -> black.
        (2.0, 4.0, (255, 127, 127), "black"),
        # v = 3/4 max: g = int(63.75) = 63; luminance = (76.245 + 0.701*63) / 255 = 0.472 -> white.
        (3.0, 4.0, (255, 63, 63), "white"),
        # v above max is clamped: g = clamp(255 * (1 - 2)) = 0.
        (8.0, 4.0, (255, 0, 0), "white"),
        # negative: r = g = int(255 * (1 - 1/4)) = int(191.25) = 191, b = 255; luminance 0.773 -> black.
        (-1.0, 4.0, (191, 191, 255), "black"),
        # v = -max: (0, 0, 255), luminance 0.114 -> white.
        (-4.0, 4.0, (0, 0, 255), "white"),
        # no usable max / NaN / None: white.
        (1.0, 0.0, (255, 255, 255), "black"),
        (float("nan"), 4.0, (255, 255, 255), "black"),
        (None, 4.0, (255, 255, 255), "black"),
    ],
)
def test_token_color_hand_worked(value, max_value, rgb, text):
    assert token_color(value, max_value) == (rgb, text)


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        ("\n", "\u00b6"),
        ("\n\n", "\u00b6\u00b6"),
        (" hello", "\u00b7hello"),
        ("a  \t b", "a\u00b7\u00b7\u2192\u00b7b"),  # one symbol per character: token lengths stay exact
        ("x\u200dy\u202e", "x<U+200D>y<U+202E>"),  # zero-width joiner and a bidi override made visible
        (" \n ", "\u00b7\u00b6\u00b7"),
        ("plain", "plain"),
        ("", ""),
    ],
)
def test_visible_token(token, shown):
    assert visible_token(token) == shown


def _spans(html_text):
    return re.findall(r'<span class="tok(?: ws)?" style="([^"]*)" title="([^"]*)">([^<]*)</span>', html_text)


def test_tokens_to_html_colours_titles_and_order():
    out = tokens_to_html(["A", " cat", "\n"], [0.0, 2.0, 4.0], max_value=4.0)
    assert out.startswith('<div class="tokens" dir="ltr">') and out.endswith("</div>")
    spans = _spans(out)
    assert [s[2] for s in spans] == ["A", "\u00b7cat", "\u00b6"]
    assert [s[1] for s in spans] == ["Activation: 0.0000", "Activation: 2.0000", "Activation: 4.0000 (whitespace only)"]
    assert "rgb(255, 255, 255); color: black" in spans[0][0]
    assert "rgb(255, 127, 127); color: black" in spans[1][0]
    assert "rgb(255, 0, 0); color: white" in spans[2][0]


def test_tokens_to_html_default_max_is_max_abs():
    # No max given: max |v| = 2 (from the negative value), so v = 1 -> g = int(127.5) = 127 and v = -2 -> blue.
    spans = _spans(tokens_to_html(["a", "b"], [1.0, -2.0]))
    assert "rgb(255, 127, 127)" in spans[0][0]
    assert "rgb(0, 0, 255)" in spans[1][0]
    # All zeros: white, no division by zero.
    spans = _spans(tokens_to_html(["a", "b"], [0.0, 0.0]))
    assert all("rgb(255, 255, 255)" in s[0] for s in spans)


def test_tokens_to_html_escapes_hostile_tokens_and_names():
    hostile = ["<script>alert(1)</script>", "&", '"', "'", '" onmouseover="x']
    out = tokens_to_html(hostile, [1.0] * 5, value_name='<b>"v"</b>', extra_measures={"<i>": [0.5] * 5})
    assert "<script>" not in out and "<b>" not in out and "<i>" not in out
    assert 'onmouseover="x' not in out
    spans = _spans(out)
    assert len(spans) == 5  # nothing broke out of its span or attribute
    assert [s[2] for s in spans] == [
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "&amp;",
        "&quot;",
        "&#x27;",
        "&quot;\u00b7onmouseover=&quot;x",
    ]
    assert spans[0][1] == "&lt;b&gt;&quot;v&quot;&lt;/b&gt;: 1.0000, &lt;i&gt;: 0.5000"


def test_tokens_to_html_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="2 tokens but 3 values"):
        tokens_to_html(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="extra measure 'loss' has 1 values for 2 tokens"):
        tokens_to_html(["a", "b"], [1.0, 2.0], extra_measures={"loss": [1.0]})


def test_special_and_continuation_tokens_are_marked():
    out = tokens_to_html(
        ["<|endoftext|>", "caf", " 😀", "", "x"], [9.0, 1.0, 2.0, 2.0, 0.0], kinds=["special", "text", "text", "continuation", "text"]
    )
    # the special token: its own class, no activation colour and no value, whatever value it was given
    special = re.findall(r'<span class="tok special" title="([^"]*)">([^<]*)</span>', out)
    assert special == [("special token (BOS/EOS/PAD): not text, left out of the statistics", "&lt;|endoftext|&gt;")]
    # the default max ignores the special token's value: 2 is the max, so " 😀" is full red
    spans = _spans(out)
    assert [s[2] for s in spans] == ["caf", "\u00b7😀", "x"]
    assert "rgb(255, 0, 0)" in spans[1][0]
    cont = re.findall(r'<span class="tok cont" style="([^"]*)" title="([^"]*)"></span>', out)
    assert len(cont) == 1 and "rgb(255, 0, 0)" in cont[0][0] and "previous token" in cont[0][1]
    with pytest.raises(ValueError, match="2 tokens but 1 token kinds"):
        tokens_to_html(["a", "b"], [1.0, 2.0], kinds=["text"])


def test_right_to_left_and_long_tokens_cannot_break_the_row():
    from saecircuits.report.tokens_html import TOKENS_CSS, token_html

    rtl, long = "\u0645\u0631\u062d\u0628\u0627", "x" * 500
    out = tokens_to_html(["a", rtl, "\u202e", long], [1.0, 1.0, 1.0, 1.0])
    assert out.startswith('<div class="tokens" dir="ltr">')  # the row runs left to right whatever its tokens
    assert [s[2] for s in _spans(out)] == ["a", rtl, "&lt;U+202E&gt;", long]  # a bidi override is shown, not obeyed
    assert "unicode-bidi: isolate" in TOKENS_CSS and "overflow-wrap: anywhere" in TOKENS_CSS
    assert token_html(" \u05e9") == '<bdi class="tokstr">\u00b7\u05e9</bdi>'


def test_report_page_embeds_the_token_css(results):
    from saecircuits.report.render import build_report_html
    from saecircuits.report.tokens_html import TOKENS_CSS

    assert TOKENS_CSS in build_report_html(results)


def test_visible_text_shows_bidi_controls_and_keeps_whitespace():
    from saecircuits.report.tokens_html import visible_text

    text = "Tom said, \"\u202eevil.\u200d ok\"\n\tnext"
    assert visible_text(text) == "Tom said, \"<U+202E>evil.<U+200D> ok\"\n\tnext"
    assert "\u202e" not in visible_text("\u202e")


# ------------------------------------------------------------------ issue 18 kind 7: blank tokens are marked boxes
def _boxes(html_text):
    """``(class, title, text)`` of every token span of a row."""
    return re.findall(r'<span class="(tok[^"]*)"(?: style="[^"]*")? title="([^"]*)">([^<]*)</span>', html_text)


def test_blank_tokens_get_a_visible_marked_box():
    tokens = ["<s>", "", " ", "\n", "\t", " \n", "Anna", " went"]
    kinds = ["special"] + ["text"] * 7
    out = tokens_to_html(tokens, [9.0, 2.0, 1.0, 0.5, 0.25, 0.0, 4.0, 0.0], kinds=kinds)
    boxes = _boxes(out)
    assert len(boxes) == len(tokens)  # one box per token, none dropped
    cls, titles, texts = zip(*boxes, strict=True)
    assert all(t for t in texts)  # every box has something to see
    # the empty one shows the empty-set sign, whitespace its visible characters, each marked "ws" with a note
    assert texts[1:6] == ("\u2205", "\u00b7", "\u00b6", "\u2192", "\u00b7\u00b6")
    assert cls[1:6] == ("tok ws",) * 5 and cls[6:] == ("tok", "tok")
    assert titles[1].startswith("Activation: 2.0000 (shows no text here")
    assert titles[2] == "Activation: 1.0000 (whitespace only)"
    # the box is at least a character wide and outlined, whatever the background colour
    from saecircuits.report.tokens_html import TOKENS_CSS

    rule = TOKENS_CSS[TOKENS_CSS.index("span.tok.ws"):]
    assert "min-width: 1ch" in rule and "inset 0 0 0 1px" in rule and "inline-block" in rule
    # a continuation piece ("" too) keeps its own narrow box, not the blank mark
    cont = tokens_to_html(["\u00e9", ""], [1.0, 1.0], kinds=["text", "continuation"])
    assert [c for c, _, _ in _boxes(cont)] == ["tok", "tok cont"]


def test_blank_answer_tokens_are_marked_in_running_html():
    from saecircuits.report.tokens_html import token_html

    assert token_html(" ") == '<bdi class="tokstr ws" title="whitespace only">\u00b7</bdi>'
    assert token_html("").startswith('<bdi class="tokstr ws" title="shows no text here')
    assert token_html("x") == '<bdi class="tokstr">x</bdi>'


def test_stories260k_lone_space_token_is_a_box(tmp_path):
    # the input: "Anna" -> [1, 410, 447, ...]; after BOS the lone space token 410 shows no text
    from pathlib import Path

    tok512 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "stories260K" / "tok512.bin"
    if not tok512.is_file():
        pytest.skip(f"shared data absent: {tok512}")
    from saecircuits.models.llama2c import build_llama2c_tokenizer, read_llama2c_tokenizer
    from saecircuits.models.tokens import token_pieces

    tok = build_llama2c_tokenizer(read_llama2c_tokenizer(tok512, 512), tmp_path)
    ids = [1, 410, 447]
    pieces = token_pieces(tok, ids)
    assert pieces[1].text == "" and pieces[1].kind == "text"  # the dummy-prefix space is not part of the text
    boxes = _boxes(tokens_to_html([p.text for p in pieces], [0.0, 3.0, 1.0], kinds=[p.kind for p in pieces]))
    assert boxes[1][0] == "tok ws" and boxes[1][2] == "\u2205" and boxes[1][1].startswith("Activation: 3.0000")


def test_the_feature_browser_marks_blank_tokens(results):
    # the cards are drawn by page.js from the payload: blank tokens get the kind "w", which it draws as a marked box
    import copy

    from saecircuits.report.browser import browser_payload

    r = copy.deepcopy(results)
    fe = r["saes"][0]["examples"][0]
    ex = fe["examples"][0]
    n = len(ex["tokens"])
    ex["tokens"] = ["", " ", "\n"] + ex["tokens"][3:]
    ex["token_kinds"] = ["text", "text", "text"] + (ex.get("token_kinds") or ["text"] * n)[3:]
    card = browser_payload(r)["saes"][0]["cards"][str(fe["feature"])]
    assert card["ex"][0]["k"][:3] == "www"
    from importlib.resources import files

    js = files("saecircuits").joinpath("assets/report/page.js").read_text(encoding="utf-8")
    assert 'kind === "w" ? "tok ws"' in js and '|| "\\u2205"' in js
