"""The HTML report: figures, numbers, escaping of every data string, atomic writing, no torch, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs
from report_fixtures import HOSTILE, N_FIGURES

from saecircuits.report import render as render_mod
from saecircuits.report import schema
from saecircuits.report.render import build_report_html, render_report
from saecircuits.report.schema import ResultsSchemaError, write_json_atomic


def _table_rows(page: str, section_id: str) -> list[list[str]]:
    """Cells of the first table after the element with id ``section_id``."""
    start = page.index(f'id="{section_id}"')
    table = page[start : page.index("</table>", start)]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table)
    return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows if "<td" in r]


def _json_script(page: str, element_id: str) -> dict:
    """The JSON of a ``<script type="application/json" id=...>`` element (uncompressed in these small pages)."""
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    assert m, f"no uncompressed #{element_id} element"
    return json.loads(m.group(1))


def test_render_writes_one_self_contained_page(results, tmp_path):
    out = render_report(results, tmp_path / "report.html")
    assert out == tmp_path / "report.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # plotly.js inlined exactly once (the cartesian bundle: these figures need no other), and nothing loaded from
    # the network.
    bundle, name = render_mod.plotly_bundle(set())
    assert name.startswith("cartesian") and page.count(bundle) == 1
    assert get_plotlyjs() not in page
    rest = page.replace(bundle, "")
    assert "cdn.plot.ly" not in rest and "<script src" not in rest and "http" not in rest
    # One lazy div per figure: DLA + (losses, features, multi) for SAE 0 + (losses, features) for SAE 1, and the
    # figures' JSON embedded once, keyed by div id.
    figs = _json_script(page, "sc-figs")["figs"]
    assert sorted(figs) == sorted(f"fig{i}" for i in range(1, N_FIGURES + 1))
    assert sorted(re.findall(r'<div class="plot" data-lazy="1" id="(fig\d+)"', page)) == sorted(figs)
    # Scripts: plotly.js, the figures, the browser's data, the page's own code.
    assert page.count("<script") == 4
    assert os.listdir(tmp_path) == ["report.html"]


def test_report_shows_the_numbers(results, tmp_path):
    page = build_report_html(results)
    # Header.
    assert "roneneldan/TinyStories-1Layer-21M" in page and "closing_quote" in page
    assert (
        '<div class="prompt">Tom said, &quot;I like the dog<mark class="answer"><bdi class="tokstr">.&quot;</bdi>'
        "</mark></div>" in page
    )
    assert ".&quot; (id 526)" in page and ">120<" in page
    # DLA: completeness error, the biggest component first in the summary table.
    assert "= 3.20e-05 logits" in page
    dla_rows = _table_rows(page, "dla")
    assert dla_rows[0] == ["MLP0", "6.5000", "0.9000"] and dla_rows[1] == ["L0H0", "1.7500", "0.3000"]
    # SAE 0 summary with CIs.
    summary = dict((r[0], r[1]) for r in _table_rows(page, "sae-0-summary"))
    assert summary["L0 at P (mean active features at the prediction position, across prompts)"] == "23.75"
    assert summary["clean loss (nats)"] == "0.4321 \u00b1 0.0500"
    assert summary["loss with zero ablation (nats)"] == "3.9876 \u00b1 0.2000"
    assert summary["loss recovered vs zero ablation"] == "0.962 [0.941, 0.979]"
    assert summary["loss recovered vs mean ablation"] == "0.932 [0.901, 0.956]"
    # SAE 1 without optional keys shows n/a rather than failing.
    summary1 = dict((r[0], r[1]) for r in _table_rows(page, "sae-1-summary"))
    assert summary1["explained variance at P (across prompts)"] == "n/a"
    assert summary1["clean loss (nats)"] == "0.4321"
    # Top features sorted by loss increase; the CI column says which exclude 0 (2077: 0.0123 +- 0.02 does not).
    feats = _table_rows(page, "sae-0-features")
    assert [r[1] for r in feats] == ["12345", "9001", "2077"]
    assert feats[0][2] == "0.8765 \u00b1 0.1000" and feats[1][2] == "0.2468 [0.2000, 0.3000]"
    assert [r[3] for r in feats] == ["yes", "yes", "no"]
    assert '"x":["f12345","f9001","f2077"]' in page
    # Multi-feature ablation with its sign convention.
    multi = _table_rows(page, "sae-0-multi")
    assert multi == [
        ["answer log-prob (nats)", "1.2345 \u00b1 0.1100"],
        ["answer logit", "2.3456 \u00b1 0.2200"],
        ["answer rank", "-3.5000 \u00b1 1.2500"],
    ]
    assert "<b>original - ablated</b>" in page
    # Examples in feature order, coloured with the example's max (2.0 / 4.0 -> g = 127).
    assert page.index('id="sae-0-f12345"') < page.index('id="sae-0-f9001"')
    assert (
        'style="background-color: rgb(255, 127, 127); color: black" title="Activation: 2.0000">Hi</span>'
        in page
    )
    assert ">\u00b6</span>" in page and ">\u00b7said</span><wbr><span" in page
    # Appendix.
    assert "train_sae" in page and "1234.5" in page and "Synthetic results for the report tests." in page


def test_every_data_string_is_escaped(results, tmp_path):
    results["model"] = HOSTILE
    results["task"]["name"] = HOSTILE
    results["task"]["answer_tokens"] = [HOSTILE]
    results["task"]["example_prompts"] = [HOSTILE, 'a & b "c"']
    results["dla"]["labels"][0] = HOSTILE
    results["saes"][0]["hook_point"] = HOSTILE
    results["saes"][0]["architecture"] = HOSTILE
    results["model_info"]["architecture"] = HOSTILE
    results["timings"][HOSTILE] = 1.0
    results["config"][HOSTILE] = HOSTILE
    results["saes"][0]["training"][HOSTILE] = HOSTILE
    results["notes"].append(HOSTILE)
    results["saes"][0]["examples"][0]["examples"][0]["tokens"][1] = '" onmouseover="alert(2)'
    page = render_report(results, tmp_path / "r.html").read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert "<script>alert" not in page and 'onmouseover="alert' not in page
    # Only our own script tags: plotly.js, the figures' and the browser's JSON, the page's code.
    assert page.count("<script") == 4
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b &quot;c&quot;" in page
    assert "<title>saecircuits report: &lt;script&gt;" in page
    assert "&quot;\u00b7onmouseover=&quot;alert(2)" in page


def test_invalid_results_write_nothing(results, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("old report", encoding="utf-8")
    del results["saes"][0]["top_features"][0]["feature"]
    with pytest.raises(
        ResultsSchemaError, match=r"\['top_features'\]\[0\] is missing the required key 'feature'"
    ):
        render_report(results, out)
    assert out.read_text(encoding="utf-8") == "old report"
    assert os.listdir(tmp_path) == ["report.html"]


def test_failure_while_writing_keeps_old_report(results, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report", encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(schema.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        render_report(results, out)
    monkeypatch.undo()
    assert out.read_text(encoding="utf-8") == "old report"
    assert os.listdir(tmp_path) == ["report.html"]


def test_figure_failure_writes_nothing(results, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("plotly failed (simulated)")

    from saecircuits.report.sections import sae as sae_section

    monkeypatch.setattr(sae_section, "make_subplots", boom)  # the multi-ablation figure, late in the page
    with pytest.raises(RuntimeError, match="plotly failed"):
        render_report(results, tmp_path / "report.html")
    assert os.listdir(tmp_path) == []


def test_rerender_from_saved_json_is_identical(results, tmp_path):
    path = write_json_atomic(tmp_path / "results.json", results)
    direct = build_report_html(results)
    again = build_report_html(json.loads(path.read_text(encoding="utf-8")))
    assert direct == again


def test_report_modules_do_not_import_torch():
    code = (
        "import sys; import saecircuits.report.render, saecircuits.report.schema, saecircuits.report.tokens_html; "
        "bad = [m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _invoke_cli(args: list[str]):
    from typer.testing import CliRunner

    import saecircuits.cli.report  # noqa: F401  (registers the sub-command)
    from saecircuits.cli import app

    # The root callback in saecircuits.cli makes `app` a group, so the sub-command name is always needed.
    return CliRunner().invoke(app, args)


def test_cli_report_rerenders_from_results_json(results, tmp_path):
    src = write_json_atomic(tmp_path / "results.json", results)
    out = tmp_path / "out" / "report.html"
    res = _invoke_cli(["report", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"Wrote {out}" in res.output
    assert out.read_text(encoding="utf-8") == build_report_html(results)


def test_cli_report_bad_input(results, tmp_path):
    res = _invoke_cli(["report", str(tmp_path / "absent.json"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "does not exist" in res.output
    del results["dla"]
    src = write_json_atomic(tmp_path / "results.json", results)
    res = _invoke_cli(["report", str(src), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "missing the required key 'dla'" in res.output
    assert not Path(tmp_path / "r.html").exists()


def test_cli_report_reads_a_run_folder_and_points_to_the_full_check(results, tmp_path):
    """`saecircuits report runs/demo` (the run's --out folder) was refused as "does not exist or is not a file"
    (found by trying it); a file with several problems names the first and the command that lists them all."""
    run = tmp_path / "run"
    write_json_atomic(run / "results.json", results)
    out = tmp_path / "r.html"
    res = _invoke_cli(["report", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text(encoding="utf-8") == build_report_html(results)
    res = _invoke_cli(["report", str(tmp_path), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "is a folder without results.json" in res.output
    del results["dla"], results["model"]  # two problems
    bad = write_json_atomic(tmp_path / "bad.json", results)
    res = _invoke_cli(["report", str(bad), "--out", str(tmp_path / "y.html")])
    assert res.exit_code == 2 and f"python -m saecircuits.results --check {bad}" in res.output
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "y.html").exists()


def test_section_markers_are_css_escapes_not_control_characters(results):
    """The collapsible sections' triangles are the CSS escapes \\25B8 / \\25BE; written "\\25B8" in a plain Python
    string, "\\25" was an octal escape and the page carried U+0015 followed by "B8"."""
    page = build_report_html(results)
    for js in (render_mod.plotly_bundle(set())[0], get_plotlyjs()):
        page = page.replace(js, "")
    assert 'summary::before { content: "\\25B8";' in page
    assert 'summary::before { content: "\\25BE"; }' in page
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", page)


def test_an_estimate_that_gets_the_largest_effects_wrong_cannot_stand_in():
    from saecircuits.report.render import _stand_in

    good = {"spearman": 0.98, "sign_agreement": 0.99, "top_overlap": 0.9}
    assert _stand_in(good) == "yes"  # results written before top_sign_agreement existed
    assert _stand_in(good | {"top_sign_agreement": 0.95}) == "yes"
    assert _stand_in(good | {"top_sign_agreement": 1 / 6}) == "no"
    assert _stand_in({"spearman": float("nan")}).startswith("undefined")


def test_a_bidi_override_in_a_prompt_is_shown_not_obeyed(results):
    results["task"]["example_prompts"][0] = 'Tom said, "\u202eevil'
    page = build_report_html(results)
    assert "\u202e" not in page and "&lt;U+202E&gt;evil" in page


def test_summary_table_shows_explained_variance_at_p(results):
    """The run summary's "explained variance at P" column reads results.json's ``explained_variance_at_p`` (schema
    2's name). It read version 1's ``explained_variance``, which upgrade_results renames, so every version-2 file
    showed n/a there; the right value is the fixture's own number, rounded to 3 places."""
    page = build_report_html(results)
    start = page.index('id="summary"')
    table = page[page.index("<table", start): page.index("</table>", page.index("<table", page.index("<table", start) + 1))]
    header = re.findall(r"<th[^>]*>(.*?)</th>", table)
    col = header.index("explained variance at P")
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S) if "<td" in r]
    sae_rows = [r for r in rows if r and r[0].startswith("SAE 0")]
    assert sae_rows, "no SAE row in the summary table"
    want = f"{results['saes'][0]['explained_variance_at_p']:.3f}"
    assert sae_rows[0][col] == want
