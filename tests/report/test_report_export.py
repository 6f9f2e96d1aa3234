"""``--export``: every figure of the report as PNG (kaleido, with the system Chromium) and every table as CSV."""

from __future__ import annotations

import csv
import os

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


def test_a_failed_figure_export_keeps_the_old_figures(tmp_path, monkeypatch, results):
    old = tmp_path / "figures"
    old.mkdir()
    (old / "001-old.png").write_bytes(b"old")

    class Boom:
        @staticmethod
        def write_fig_from_object_sync(jobs):
            raise RuntimeError("Chromium could not start: no browser found (simulated)")

    monkeypatch.setitem(__import__("sys").modules, "kaleido", Boom)
    with pytest.raises(ExportError, match="needs Chrome or Chromium"):
        export_mod.export_report(results, tmp_path)
    assert os.listdir(old) == ["001-old.png"] and (tmp_path / "tables").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "tables"]  # no temporary folder left


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
