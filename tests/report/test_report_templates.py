"""The report page built from templates is the page the f-string renderer built: same markup and visible text
(apart from whitespace and the spelling of character references), same figures, same embedded data, same CSS.

The golden, ``tests/report/data/report_golden.json``, is the extraction (:func:`make_golden.extract`, not the whole
page) of the pages the f-string renderer built at commit 196d82c for the fixture results, a fuller variant (study,
evidence, failed checks, a circuit) and one that takes the page's other branches (:func:`make_golden.inputs`). Regenerate it with ``PYTHONPATH=src python tests/report/make_golden.py``
ONLY when a change of the page is intended, and say so in the commit; a failure here otherwise means the page
changed by accident.
"""

import json

import pytest
from make_golden import GOLDEN, extract, inputs

from saecircuits.report.render import build_report_html

_GOLDEN = json.loads(GOLDEN.read_text(encoding="utf-8"))


def _first_difference(got: list[str], want: list[str]) -> str:
    for j, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"event {j}: got {a!r}, want {b!r} (after {want[max(0, j - 3):j]!r})"
    return f"lengths differ: got {len(got)} events, want {len(want)}"


@pytest.mark.parametrize("name", sorted(_GOLDEN))
def test_page_matches_the_golden(name):
    got = extract(build_report_html(inputs()[name]))
    want = _GOLDEN[name]
    assert got["events"] == want["events"], _first_difference(got["events"], want["events"])
    assert got["data"].keys() == want["data"].keys()
    for key in want["data"]:
        assert got["data"][key] == want["data"][key], f"embedded data {key} differs"
    assert got["style"] == want["style"], "the page's CSS differs"


def test_extract_sees_a_change_of_text_markup_and_data():
    """The comparison can fail: one changed character of text, of an attribute or of a figure is seen."""
    page = build_report_html(inputs()["fixture"])
    base = extract(page)
    assert extract(page.replace("Direct logit attribution", "Direct logit attributions", 1))["events"] != base["events"]
    assert extract(page.replace('class="note"', 'class="notes"', 1))["events"] != base["events"]
    assert extract(page.replace('"fig1"', '"fig01"', 1))["events"] != base["events"]
    assert extract(page.replace("Direct logit attribution to the answer", "x", 1))["data"] != base["data"]
    # whitespace between and inside text is not a change
    assert extract(page.replace("</p>", "</p>\n  \n", 3))["events"] == base["events"]


def test_templates_escape_every_value():
    """Escaping is the templates' default and no template switches it off (no ``|safe``, no ``autoescape``): the
    fragments built by trusted code are marked safe in Python (render.py, sections/*.py) with a comment saying why."""
    from saecircuits.report.render import templates

    env = templates()
    assert env.autoescape is True
    names = env.list_templates()
    assert "base.html.j2" in names and "report.html.j2" in names
    for name in names:
        source = env.loader.get_source(env, name)[0]
        assert "|safe" not in source.replace(" ", "") and "autoescape" not in source, name
    # html.escape's spelling, the page's own since before the templates (the hostile-string tests look for it)
    assert env.from_string("<p title='{{ x }}'>{{ x }}</p>").render(x="<b> & \"d\" 's'") == (
        "<p title='&lt;b&gt; &amp; &quot;d&quot; &#x27;s&#x27;'>&lt;b&gt; &amp; &quot;d&quot; &#x27;s&#x27;</p>")
