"""``--export``: every figure of the report as PNG (kaleido, with the system Chromium) and every table as CSV."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
from report_chromium import _find
from report_fixtures import _RESULTS

from saecircuits.report import export as export_mod
from saecircuits.report.export import ExportError, write_tables
from saecircuits.report.render import build_report
from saecircuits.report.schema import write_json_atomic


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from saecircuits.cli import _register, app

    _register()
    return CliRunner().invoke(app, args)


def _need_kaleido():
    try:
        import kaleido  # noqa: F401
    except ImportError:
        pytest.skip("--export's PNGs need kaleido: pip install -e '.[export]'")
    if _find("chromium", "chromium-browser") is None:
        pytest.skip("--export's PNGs need Chrome or Chromium (Debian: apt-get install chromium)")


def test_tables_are_the_pages_tables_as_csv(tmp_path, results):
    rep = build_report(results)
    folder = write_tables(rep.tables, tmp_path / "tables")
    names = sorted(p.name for p in folder.iterdir())
    sae0 = "sae-0-blocks-0-mlp-hook-post"  # every name says which SAE (and hook) it shows
    assert len(names) == len(rep.tables) and "dla-1.csv" in names and f"{sae0}-1.csv" in names
    rows = list(csv.reader(open(folder / f"{sae0}-2.csv", encoding="utf-8")))  # the ranked features of SAE 0
    assert rows[0][:3] == ["rank", "feature", "loss increase (nats, 95% CI)"]
    assert [r[1] for r in rows[1:]] == ["12345", "9001", "2077"]
    assert rows[1][2] == "0.8765 \u00b1 0.1000"


def test_an_export_never_replaces_a_folder_of_the_users_own_files(tmp_path, monkeypatch, results):
    # `--export` swapped the user's own figures/ or tables/ for the export's, deleting my_plot.png with the rest
    rep = build_report(results)
    mine = tmp_path / "tables"
    mine.mkdir()
    (mine / "my_data.csv").write_text("a,b\n")
    with pytest.raises(ExportError, match=r"tables holds files an export did not write \(my_data\.csv\); move"):
        write_tables(rep.tables, mine)
    assert os.listdir(mine) == ["my_data.csv"] and (mine / "my_data.csv").read_text() == "a,b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]  # nothing written beside it
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "my_plot.png").write_bytes(b"mine")
    monkeypatch.setattr(export_mod, "_kaleido_installed", lambda: True)  # refused before any drawing
    monkeypatch.setattr(export_mod, "_draw_command", lambda jobs_file: pytest.fail("drew into the user's folder"))
    with pytest.raises(ExportError, match=r"figures holds files an export did not write \(my_plot\.png\)"):
        export_mod.write_figures(rep.figures, figures)
    assert (figures / "my_plot.png").read_bytes() == b"mine"
    # an earlier export (its own names only) is replaced as before
    other = tmp_path / "export2"
    first = write_tables(rep.tables, other / "tables")
    assert sorted(p.name for p in write_tables(rep.tables[:1], first).iterdir()) == [f"{rep.tables[0][0]}.csv"]


def _stub_drawing(monkeypatch, code: str) -> None:
    """Draw the figures with ``python -c code`` (a stand-in for kaleido's child process)."""
    monkeypatch.setattr(export_mod, "_kaleido_installed", lambda: True)
    monkeypatch.setattr(export_mod, "_draw_command", lambda jobs_file: [sys.executable, "-c", code])


def test_a_failed_figure_export_keeps_the_old_figures(tmp_path, monkeypatch, results):
    old = tmp_path / "figures"
    old.mkdir()
    (old / "001-old.png").write_bytes(b"old")
    _stub_drawing(monkeypatch, "import sys; sys.exit('BrowserFailedError: Chromium could not start (simulated)')")
    with pytest.raises(ExportError, match="needs Chrome or Chromium"):
        export_mod.export_report(results, tmp_path)
    assert os.listdir(old) == ["001-old.png"] and (tmp_path / "tables").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "tables"]  # no temporary folder left


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_a_stuck_figure_export_is_stopped_with_its_browser_and_the_report_is_kept(tmp_path, monkeypatch):
    # issue 18 kind 5: kaleido once waited over 240 s on a 5-million-point figure, past its own 90 s timeout
    pids = tmp_path / "pids"
    # the stand-in starts a "browser" (a child of its own) and hangs, as kaleido did
    _stub_drawing(monkeypatch, "import subprocess, sys, time; "
                               "b = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                               f"open({str(pids)!r}, 'w').write(f'{{__import__(\"os\").getpid()}} {{b.pid}}'); "
                               "time.sleep(120)")
    monkeypatch.setenv("SAECIRCUITS_EXPORT_TIMEOUT", "2")
    src = write_json_atomic(tmp_path / "results.json", _RESULTS)
    start = time.monotonic()
    res = _cli(["report", str(src), "--out", str(tmp_path / "out") + "/", "--export"])
    assert time.monotonic() - start < 30
    assert res.exit_code == 2, res.output
    assert "did not finish within 2 s and was stopped" in res.output and "Traceback" not in res.output
    assert "SAECIRCUITS_EXPORT_TIMEOUT=SECONDS" in res.output
    out = tmp_path / "out"
    assert (out / "report.html").stat().st_size > 0 and any((out / "tables").iterdir())  # kept
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "tables"]  # no figures, no temporary folder
    for pid in map(int, pids.read_text().split()):  # the stand-in and its "browser" were both ended
        deadline = time.monotonic() + 5
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), pid


def test_report_export_writes_tables_and_figures(tmp_path):
    _need_kaleido()
    src = write_json_atomic(tmp_path / "results.json", _RESULTS)
    res = _cli(["report", str(src), "--out", str(tmp_path / "out") + "/", "--export"])
    assert res.exit_code == 0, res.output
    tables = sorted((tmp_path / "out" / "tables").iterdir())
    figures = sorted((tmp_path / "out" / "figures").iterdir())
    assert f"Wrote {len(tables)} tables" in res.output and f"Wrote {len(figures)} figures" in res.output
    assert len(figures) == 6 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)
    assert figures[0].name == "001-dla-direct-logit-attribution-to-the-answer.png"
    assert all(p.name.split("-", 1)[1].startswith(("dla-", "sae-", "layers-", "circuit-")) for p in figures)
    dla = list(csv.reader(open(tmp_path / "out" / "tables" / "dla-1.csv", encoding="utf-8")))
    assert dla[0] == ["component", "mean DLA (logits)", "95% CI half-width"]
    assert dla[1] == ["MLP0", "6.5000", "0.9000"]  # as the page shows it


def test_the_drawing_process_gets_the_pages_figures(tmp_path, monkeypatch, results):
    # the child process's side, run in-process with a recording kaleido: it draws exactly the page's figures
    from saecircuits.report import _draw_pngs

    drawn = []

    class Recorder:
        @staticmethod
        def write_fig_from_object_sync(jobs):
            for job in jobs:
                drawn.append((job["fig"].to_plotly_json(), job["opts"]))
                open(job["path"], "wb").write(b"\x89PNG")

    def in_process(cmd, timeout):
        monkeypatch.setitem(sys.modules, "kaleido", Recorder)
        return subprocess.CompletedProcess(cmd, _draw_pngs.main(cmd[-1:]), "", "")

    monkeypatch.setattr(export_mod, "_kaleido_installed", lambda: True)
    monkeypatch.setattr(export_mod, "_run_stoppable", in_process)
    rep = build_report(results)
    folder = export_mod.write_figures(rep.figures, tmp_path / "figures")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.png" for name, _ in rep.figures)
    # each figure as the page draws it: the page's template in its layout (set on a copy the way plotly sets it)
    expected = [json.loads(__import__("plotly").graph_objects.Figure(fig).update_layout(template="plotly_white")
                           .to_json()) for _, fig in rep.figures]
    assert all(e["layout"]["template"]["layout"]["plot_bgcolor"] == "white" for e in expected)
    assert [json.loads(json.dumps(d, cls=__import__("plotly").utils.PlotlyJSONEncoder)) for d, _ in drawn] == expected
    assert all(opts == {"format": "png", "scale": 2.0} for _, opts in drawn)


def test_the_time_limit_grows_with_the_figures_and_a_bad_setting_is_named(monkeypatch):
    monkeypatch.delenv("SAECIRCUITS_EXPORT_TIMEOUT", raising=False)
    assert export_mod._default_timeout(6) == export_mod.FIGURE_TIMEOUT_S + 6 * export_mod.FIGURE_TIMEOUT_PER_FIGURE_S
    monkeypatch.setenv("SAECIRCUITS_EXPORT_TIMEOUT", "900")
    assert export_mod._default_timeout(6) == 900.0
    for bad in ("0", "-5", "soon", "inf"):
        monkeypatch.setenv("SAECIRCUITS_EXPORT_TIMEOUT", bad)
        with pytest.raises(ExportError, match="SAECIRCUITS_EXPORT_TIMEOUT must be a positive number"):
            export_mod._default_timeout(6)


def test_figure_and_table_names_say_which_sae_and_feature(results):
    """Issue 18 kind 10: exported names had neither the SAE nor the feature."""
    results["saes"][0]["feature_details"] = [
        {"feature": k, "weight_boosts": {"top": [[" a", 1.0]], "bottom": [[" b", -1.0]]}} for k in (12345, 9001)]
    rep = build_report(results)
    hooks = {f"sae-{i}-" + s["hook_point"].replace(".", "-").replace("_", "-") for i, s in enumerate(results["saes"])}
    for name, _ in rep.figures:
        part = name.split("-", 1)[1]
        assert not part.startswith("sae-") or any(part.startswith(h) for h in hooks), name
    details = [k for s in results["saes"] for k in (d["feature"] for d in s.get("feature_details") or [])]
    assert details
    for k in details:  # each feature's boost tables are named after it
        assert any(name.endswith(f"-f{k}-1") for name, _, _ in rep.tables), k
