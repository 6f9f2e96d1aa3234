"""Every figure of the report as a PNG and every table as a CSV, beside the page (``--export``).

Files: ``DIR/figures/<figN>-<title>.png`` (plotly figures, drawn by kaleido) and ``DIR/tables/<section>-<n>.csv``
(cells as the page shows them, escaped nowhere: CSV is plain text). Each folder is written whole into a temporary
folder first and then moved into place, so an interrupted export leaves the previous files (or none), never half.

kaleido (the ``export`` extra: ``pip install -e ".[export]"``) draws the figures in a headless Chrome or Chromium
that it finds on ``PATH`` (``chromium``, ``google-chrome``, ...) or at ``$BROWSER_PATH``; on Debian,
``apt-get install chromium``. It downloads nothing here.

The figures are drawn in a child process (:mod:`saecircuits.report._draw_pngs`) in its own session, stopped with
everything it started (Chromium included) when it runs past its time limit (:data:`FIGURE_TIMEOUT_S` plus
:data:`FIGURE_TIMEOUT_PER_FIGURE_S` per figure, or ``$SAECIRCUITS_EXPORT_TIMEOUT`` seconds): a figure with millions of points once kept kaleido waiting over
240 s, past kaleido's own 90 s timeout. A stopped export is an :class:`ExportError`; what was written before it
(``report.html``, the tables) stays.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from saecircuits.atomic import remove_dead_temps
from saecircuits.report.render import build_report
from saecircuits.report.sections.common import page_template, with_page_template
from saecircuits.results import Results

__all__ = ["ExportError", "ExportResult", "export_report", "write_tables", "write_figures"]


class ExportError(ValueError):
    """The export cannot run or did not finish: kaleido or a browser for it is missing (the message says how to
    install it), or drawing the figures failed or ran past its time limit."""


#: seconds the figure export may take, plus :data:`FIGURE_TIMEOUT_PER_FIGURE_S` per figure (a usual export of a
#: report's six figures takes a few seconds, most of it Chromium's start).
FIGURE_TIMEOUT_S = 120.0
FIGURE_TIMEOUT_PER_FIGURE_S = 20.0
#: environment variable that sets the whole limit in seconds instead
TIMEOUT_ENV = "SAECIRCUITS_EXPORT_TIMEOUT"


def _default_timeout(n_figures: int) -> float:
    """:data:`TIMEOUT_ENV` if set, else :data:`FIGURE_TIMEOUT_S` + :data:`FIGURE_TIMEOUT_PER_FIGURE_S` per figure.

    Raises:
        ExportError: the variable is set but not a positive number of seconds.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return FIGURE_TIMEOUT_S + FIGURE_TIMEOUT_PER_FIGURE_S * n_figures
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ExportError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _kaleido_installed() -> bool:
    return importlib.util.find_spec("kaleido") is not None


def _draw_command(jobs_file: Path) -> list[str]:
    """The child process that draws the PNGs (a function, so tests can put a stub in its place)."""
    return [sys.executable, "-m", "saecircuits.report._draw_pngs", str(jobs_file)]


def _run_stoppable(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; past ``timeout`` seconds kill it and everything it started.

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout`` (the whole process group has been killed).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # the time limit, or Ctrl-C: leave no browser behind
        try:
            if hasattr(os, "killpg"):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: the child and its browser
            else:  # pragma: no cover - Windows has no process groups to kill
                proc.kill()
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@dataclass
class ExportResult:
    """What :func:`export_report` wrote: the folders and the number of files in each."""

    figures_dir: Path | None
    tables_dir: Path | None
    n_figures: int
    n_tables: int


#: the names an export writes (``render.build_report``: figures ``NNN-<slug>``, tables ``<slug>-N``): a folder
#: holding any other file is not an earlier export and is never replaced.
_EXPORT_NAMES = re.compile(r"^(\d{3}-[a-z0-9-]+\.png|[a-z0-9-]+-\d+\.csv)$")


def foreign_files(folder: Path) -> list[str]:
    """The names in ``folder`` that an export does not write (sorted); ``[]`` for an earlier export's folder."""
    return sorted(p.name for p in folder.iterdir() if not (p.is_file() and _EXPORT_NAMES.match(p.name)))


def _check_replaceable(final: Path) -> None:
    """Raises ExportError when ``final`` is a file, or a folder holding a file an export does not write (the user's
    own ``figures/``, say, which the swap used to delete with the rest)."""
    if final.is_dir():
        foreign = foreign_files(final)
        if foreign:
            raise ExportError(
                f"--export: {final} holds files an export did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); move them away or export to another folder, so that they "
                "are not replaced")
    elif final.exists():
        raise ExportError(f"--export: {final} is a file; move it away or export to another folder")


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` (a folder) by ``tmp`` with one rename, the old folder removed after.

    Raises:
        ExportError: ``final`` is not an earlier export (:func:`_check_replaceable`).
    """
    _check_replaceable(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_tables(tables, out_dir: str | os.PathLike) -> Path:
    """Write each ``(name, headers or None, rows)`` as ``out_dir/<name>.csv`` (UTF-8, header row when given).

    Returns the folder. Written into a temporary folder first, then moved into place.

    Raises:
        ExportError: ``out_dir`` is not an earlier export (:func:`_check_replaceable`)."""
    final = Path(out_dir)
    _check_replaceable(final)  # before the work, not after it
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


def write_figures(figures, out_dir: str | os.PathLike, *, scale: float = 2.0,
                  timeout: float | None = None) -> Path:
    """Write each ``(name, plotly Figure)`` as ``out_dir/<name>.png`` with kaleido (one browser for all of them), drawn
    with the page's template (:func:`~saecircuits.report.sections.common.with_page_template`).

    Args:
        timeout: seconds before the drawing is stopped (default: ``$SAECIRCUITS_EXPORT_TIMEOUT``, else
            :data:`FIGURE_TIMEOUT_S` + :data:`FIGURE_TIMEOUT_PER_FIGURE_S` per figure).

    Raises:
        ExportError: kaleido is not installed, it found no Chrome/Chromium to draw with, drawing failed, or it ran
            past ``timeout`` (stopped, browser included; the previous figures folder, if any, is kept), or
            ``out_dir`` is not an earlier export (:func:`_check_replaceable`).
    """
    if not _kaleido_installed():
        raise ExportError('--export needs kaleido to write PNGs: pip install -e ".[export]"')
    figures = list(figures)
    if timeout is None:
        timeout = _default_timeout(len(figures))
    final = Path(out_dir)
    _check_replaceable(final)  # before the work, not after it
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(final.parent)  # what a killed export left
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        template = page_template()
        jobs = [{"fig": with_page_template(fig, template), "path": str(tmp / f"{name}.png"),
                 "opts": {"format": "png", "scale": scale}} for name, fig in figures]
        if jobs:
            jobs_file = tmp / ".jobs.json"
            jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
            try:
                done = _run_stoppable(_draw_command(jobs_file), timeout)
            except subprocess.TimeoutExpired:
                raise ExportError(
                    f"--export: drawing {len(jobs)} figures with kaleido did not finish within {timeout:.0f} s and "
                    "was stopped (browser included); no figures were written. The report and the tables are "
                    f"written; a figure with very many points can take that long: set {TIMEOUT_ENV}=SECONDS to "
                    "allow more") from None
            jobs_file.unlink()
            if done.returncode != 0:
                err = " ".join((done.stderr or "").split()[-60:]) or f"exit status {done.returncode}"
                if "chrom" in err.lower() or "browser" in err.lower():
                    raise ExportError(
                        "--export draws figures with kaleido, which needs Chrome or Chromium: install it (Debian: "
                        f"apt-get install chromium) or set BROWSER_PATH to its executable ({err})")
                raise ExportError(f"--export: drawing the figures with kaleido failed: {err}")
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_report(results: Results | Mapping, out_dir: str | os.PathLike, *, figures: bool = True,
                  tables: bool = True) -> ExportResult:
    """Write every figure of the report as PNG (``out_dir/figures``) and every table as CSV (``out_dir/tables``).

    The figures and tables are the report page's own (:func:`saecircuits.report.render.build_report`), not the
    feature browser's cards, which the page builds in the browser.

    Raises:
        ResultsSchemaError: a dict ``results`` does not match the schema (typed results are read as they are).
        ExportError: figures wanted but kaleido or its browser is missing, or drawing them failed or ran past its
            time limit (tables are written first).
    """
    rep = build_report(results)
    out = Path(out_dir)
    tdir = write_tables(rep.tables, out / "tables") if tables else None
    fdir = write_figures(rep.figures, out / "figures") if figures else None
    return ExportResult(fdir, tdir, len(rep.figures) if figures else 0, len(rep.tables) if tables else 0)
