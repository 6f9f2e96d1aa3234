"""Every figure of the report as a PNG and every table as a CSV, beside the page (``--export``).

Files: ``DIR/figures/<figN>-<title>.png`` (plotly figures, drawn by kaleido) and ``DIR/tables/<section>-<n>.csv``
(cells as the page shows them, escaped nowhere: CSV is plain text). Each folder is written whole into a temporary
folder first and then moved into place, so an interrupted export leaves the previous files (or none), never half.

kaleido (the ``export`` extra: ``pip install -e ".[export]"``) draws the figures in a headless Chrome or Chromium
that it finds on ``PATH`` (``chromium``, ``google-chrome``, ...) or at ``$BROWSER_PATH``; on Debian,
``apt-get install chromium``. It downloads nothing here.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from saecircuits.atomic import remove_dead_temps
from saecircuits.report.render import build_report

__all__ = ["ExportError", "ExportResult", "export_report", "write_tables", "write_figures"]


class ExportError(ValueError):
    """The export cannot run: kaleido or a browser for it is missing (the message says how to install it)."""


@dataclass
class ExportResult:
    """What :func:`export_report` wrote: the folders and the number of files in each."""

    figures_dir: Path | None
    tables_dir: Path | None
    n_figures: int
    n_tables: int


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` (a folder) by ``tmp`` with one rename, the old folder removed after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_tables(tables, out_dir: str | os.PathLike) -> Path:
    """Write each ``(name, headers or None, rows)`` as ``out_dir/<name>.csv`` (UTF-8, header row when given).

    Returns the folder. Written into a temporary folder first, then moved into place."""
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(final.parent)  # what a killed export left
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, headers, rows in tables:
            with open(tmp / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                if headers is not None:
                    w.writerow(headers)
                w.writerows(rows)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_figures(figures, out_dir: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """Write each ``(name, plotly Figure)`` as ``out_dir/<name>.png`` with kaleido (one browser for all of them).

    Raises:
        ExportError: kaleido is not installed, or it found no Chrome/Chromium to draw with.
    """
    try:
        import kaleido
    except ImportError as err:
        raise ExportError('--export needs kaleido to write PNGs: pip install -e ".[export]"') from err
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(final.parent)  # what a killed export left
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        jobs = [{"fig": fig, "path": str(tmp / f"{name}.png"), "opts": {"format": "png", "scale": scale}}
                for name, fig in figures]
        if jobs:
            try:
                kaleido.write_fig_from_object_sync(jobs)
            except Exception as err:  # noqa: BLE001 - choreographer raises its own types for a missing browser
                if "chrom" in type(err).__name__.lower() or "browser" in str(err).lower():
                    raise ExportError(
                        "--export draws figures with kaleido, which needs Chrome or Chromium: install it (Debian: "
                        f"apt-get install chromium) or set BROWSER_PATH to its executable ({err})") from err
                raise
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_report(results: Mapping, out_dir: str | os.PathLike, *, figures: bool = True,
                  tables: bool = True) -> ExportResult:
    """Write every figure of the report as PNG (``out_dir/figures``) and every table as CSV (``out_dir/tables``).

    The figures and tables are the report page's own (:func:`saecircuits.report.render.build_report`), not the
    feature browser's cards, which the page builds in the browser.

    Raises:
        ResultsSchemaError: ``results`` does not match the schema.
        ExportError: figures wanted but kaleido or its browser is missing (tables are written first).
    """
    rep = build_report(results)
    out = Path(out_dir)
    tdir = write_tables(rep.tables, out / "tables") if tables else None
    fdir = write_figures(rep.figures, out / "figures") if figures else None
    return ExportResult(fdir, tdir, len(rep.figures) if figures else 0, len(rep.tables) if tables else 0)
