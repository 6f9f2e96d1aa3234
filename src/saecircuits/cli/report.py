"""``saecircuits report RESULTS_JSON --out report.html``: re-render the HTML report from a saved results.json."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from saecircuits.cli import InputError, SaeCommand, app, user_errors

if TYPE_CHECKING:
    from saecircuits.results import Results

REPORT_NAME = "report.html"


def report_path(out: str | Path) -> Path:
    """Where ``--out`` puts the report: a name ending in ``.html``/``.htm`` is the file itself; anything else (a
    trailing slash, an existing folder, a name without ``.html``) is a folder, created if missing, holding
    ``report.html``.

    Raises:
        InputError: ``out`` is an existing file without ``.html``, or a folder is wanted where a file exists.
        PipelineError: the folder cannot be created (naming why).
    """
    text = str(out)
    path = Path(text).expanduser()
    is_file_name = not text.endswith(("/", "\\")) and path.suffix.lower() in (".html", ".htm")
    if is_file_name and not path.is_dir():
        if path.parent.exists() and not path.parent.is_dir():
            raise InputError(f"--out {out}: {path.parent} is a file, not a folder")
        from saecircuits.pipeline.outputs import make_out_folder

        make_out_folder(path.parent)
        return path
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out} is an existing file without .html; give a name ending in .html, or a folder")
    from saecircuits.pipeline.outputs import make_out_folder

    return make_out_folder(path) / REPORT_NAME


@app.command("report", cls=SaeCommand, short_help="Re-render report.html from a saved results.json.")
def report(
    results_json: Annotated[Path, typer.Argument(
        metavar="RESULTS_JSON", help="results.json written by the pipeline (schema version 2, or 1), or the run's "
                                     "--out folder.", show_default=False)],
    out: Annotated[str, typer.Option(
        "--out", "-o", metavar="FILE|DIR",
        help="The report file (a name ending in .html), or a folder to write report.html into (a trailing slash "
             "or a name without .html; created if missing).")] = REPORT_NAME,
    export: Annotated[bool, typer.Option(
        "--export", show_default="off", help=EXPORT_HELP)] = False,
) -> None:
    """Re-render the self-contained HTML report from a saved results.json (no model or torch needed)."""
    from saecircuits.report.render import render_report
    from saecircuits.results import Results, ResultsSchemaError

    if results_json.is_dir():  # a run's folder: its results.json (what `run --out` wrote)
        if not (results_json / "results.json").is_file():
            raise InputError(f"{results_json} is a folder without results.json; give a run's results.json or the "
                             "--out folder of a run")
        results_json = results_json / "results.json"
    elif not results_json.is_file():
        raise InputError(f"{results_json} does not exist; give a run's results.json or the --out folder of a run")
    try:
        # typed and validated once (a version-1 file upgraded) before --out is created: a bad file leaves nothing
        # behind; the renderer and the export read the typed results as they are
        results = Results.load(results_json)
    except ResultsSchemaError as err:
        msg = str(err) if str(results_json) in str(err) else f"{results_json} is not a valid results file: {err}"
        if "more problem" in msg:  # the message names the first; the checker lists every one
            msg += f" List them all with: python -m saecircuits.results --check {results_json}"
        raise InputError(msg) from err
    with user_errors():
        path = render_report(results, report_path(out))
    typer.echo(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if export:
        run_export(results, path.parent)


EXPORT_HELP = ("Also write every figure as PNG (figures/, needs kaleido and Chrome or Chromium) and every table as CSV "
               "(tables/) beside the report.")


def run_export(results: Results, folder: Path) -> None:
    """``--export``: the report's figures as PNG and tables as CSV in ``folder`` (one line each on stdout)."""
    from saecircuits.report.export import export_report

    with user_errors():
        res = export_report(results, folder)
    typer.echo(f"Wrote {res.n_tables} tables to {res.tables_dir}")
    typer.echo(f"Wrote {res.n_figures} figures to {res.figures_dir}")
