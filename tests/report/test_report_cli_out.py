"""`saecircuits report --out`: a trailing slash or a name without .html means a folder, created if missing, with
report.html inside it (issue 7, item 13)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from saecircuits.cli import _register, app
from saecircuits.report.render import build_report_html
from saecircuits.report.schema import write_json_atomic


def _report(src: Path, out: str):
    _register()
    return CliRunner().invoke(app, ["report", str(src), "--out", out])


def test_out_folder_forms(results, tmp_path):
    src = write_json_atomic(tmp_path / "results.json", results)
    expected = build_report_html(results)
    cases = {
        f"{tmp_path}/new-folder/": tmp_path / "new-folder" / "report.html",  # the reported case: trailing slash
        str(tmp_path / "plain-name"): tmp_path / "plain-name" / "report.html",  # no .html: a folder
        str(tmp_path / "a" / "b" / "deep") + "/": tmp_path / "a" / "b" / "deep" / "report.html",
        str(tmp_path / "sub" / "mine.html"): tmp_path / "sub" / "mine.html",  # .html: the file, parents made
        str(tmp_path / "UPPER.HTML"): tmp_path / "UPPER.HTML",
    }
    for out, path in cases.items():
        res = _report(src, out)
        assert res.exit_code == 0, res.output
        assert path.is_file() and path.read_text(encoding="utf-8") == expected, out
        assert f"Wrote {path}" in res.output
    # an existing folder (even one named like a file) is used as a folder
    (tmp_path / "dir.html").mkdir()
    assert _report(src, str(tmp_path / "dir.html")).exit_code == 0
    assert (tmp_path / "dir.html" / "report.html").is_file()


def test_out_that_cannot_be_a_folder_is_one_line_error(results, tmp_path):
    src = write_json_atomic(tmp_path / "results.json", results)
    (tmp_path / "notes").write_text("keep me")
    res = _report(src, str(tmp_path / "notes"))
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: --out {tmp_path / 'notes'} is an existing file without .html; give a name ending in .html, "
        "or a folder"]
    assert (tmp_path / "notes").read_text() == "keep me"
