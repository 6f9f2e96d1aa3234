"""Users do not have the project's analysis catalogue, so nothing they read may cite it (issue 7, item 14): no file
name, no pitfall number, no section or catalogue code ("F3", "E1", "spec 4.2"). Checked in every text file of the
package and the README, in the rendered report (every optional section present) and in every command's ``--help``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import saecircuits
from saecircuits.cli import _register, app

REPORT_TESTS = Path(__file__).parent / "report"

# What a citation of the catalogue looks like. Catalogue codes are a stage letter (A model, B data, D SAE
# statistics, E task prompts, F analyses; stage C has none) and one or two digits, a whole word: hex inside
# identifiers (0xF1, A5.exec) is not a whole word; C4 (a data set) is not a stage letter.
FORBIDDEN = {
    "the catalogue's file": re.compile(r"analysis-spec|environment-notes"),
    "a pitfall number": re.compile(r"\bpitfalls?\s+\d", re.IGNORECASE),
    "a catalogue code": re.compile(r"\b[ABDEF]\d{1,2}\b"),
    "a section of the spec": re.compile(r"\bspec(?:ification)?\s+(?:section\s+)?[A-F]?\d", re.IGNORECASE),
}

TEXT_SUFFIXES = {".py", ".js", ".css", ".html", ".json", ".md"}
# Third-party files shipped unchanged (assets/report/SOURCE.md): minified code is full of names like A5 and F1.
VENDORED = {"plotly-cartesian.min.js"}


def _citations(text: str) -> list[str]:
    found = []
    for what, rx in FORBIDDEN.items():
        for m in rx.finditer(text):
            start = max(0, m.start() - 40)
            found.append(f"{what}: ...{text[start:m.end() + 40]!r}...")
    return found


def _user_files() -> list[Path]:
    pkg = Path(saecircuits.__file__).parent
    files = [p for p in pkg.rglob("*") if p.suffix in TEXT_SUFFIXES and p.name not in VENDORED]
    readme = pkg.parents[1] / "README.md"
    if readme.is_file():  # a source checkout (an installed wheel has no README beside the package)
        files.append(readme)
    return sorted(files)


def test_patterns_catch_the_old_citations_and_spare_the_look_alikes():
    cited = [
        "(analysis-spec F14)",
        "analysis-spec.md section 10",
        "(pitfall 3)",
        "pitfalls 12, 15",
        "loss increase (F18)",
        "(F9/F10 comparison)",
        "prompts built as in E1",
        "counts (D5)",
        "MSE, spec 4.2",
        "see environment-notes.md section 0.4",
    ]
    for text in cited:
        assert _citations(text), text
    for text in ("W_U[:, 526]", "0xF1", "x5F3", "the C4 corpus", "float16", "a pitfall of the notebook",
                 "Cochran, section 6.4", "sha256 79542150855a52c5", "the spec of the figure"):
        assert not _citations(text), text


def test_package_text_files_and_readme_cite_no_catalogue():
    files = _user_files()
    assert any(p.name == "render.py" for p in files) and any(p.name == "page.js" for p in files)
    bad = {str(p): hits for p in files if (hits := _citations(p.read_text(encoding="utf-8")))}
    assert not bad, bad


def _full_results(results: dict) -> dict:
    """The report fixture with every optional key: per-feature evidence, the rest of the study, the layer
    comparison (the data of tests/report/test_report_evidence.py and test_report_study.py)."""
    import sys

    sys.path.insert(0, str(REPORT_TESTS))
    try:
        from test_report_evidence import EVIDENCE
        from test_report_study import LAYERS, STUDY
    finally:
        sys.path.remove(str(REPORT_TESTS))
    r = copy.deepcopy(results)
    r["saes"][0].update(copy.deepcopy(EVIDENCE))
    r["saes"][0].update(copy.deepcopy(STUDY))
    r["layer_comparison"] = copy.deepcopy(LAYERS)
    return r


@pytest.fixture
def results():
    import sys

    sys.path.insert(0, str(REPORT_TESTS))
    try:
        from report_fixtures import _RESULTS
    finally:
        sys.path.remove(str(REPORT_TESTS))
    return copy.deepcopy(_RESULTS)


def test_rendered_report_cites_no_catalogue(results):
    from plotly.offline import get_plotlyjs

    from saecircuits.report.render import build_report_html, plotly_bundle
    from saecircuits.report.schema import validate_results

    full = _full_results(results)
    validate_results(full)
    page = build_report_html(full)
    for section in ('id="sae-0-errdla"', 'id="sae-0-details"', 'id="sae-0-upstream"', 'id="sae-0-scaled"'):
        assert section in page, section  # the captions under test are really on the page
    # plotly.js is inlined as shipped; its minified names are not ours
    for js in (plotly_bundle(set())[0], get_plotlyjs()):
        page = page.replace(js, "")
    assert not _citations(page)


def _commands() -> list[str]:
    _register()
    import typer

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in _commands()])
def test_help_cites_no_catalogue(argv):
    res = CliRunner().invoke(app, argv, env={"COLUMNS": "200"}, terminal_width=200)
    assert res.exit_code == 0, res.output
    assert not _citations(res.output), argv
