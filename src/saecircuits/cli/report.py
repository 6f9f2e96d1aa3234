"""``saecircuits report RESULTS_JSON --out report.html``: re-render the HTML report from a saved results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saecircuits.cli import app


@app.command("report")
def report(
    results_json: Annotated[
        Path, typer.Argument(help="results.json written by the pipeline (schema version 1).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the HTML report (a file, or a folder to write report.html into).")] = Path(
        "report.html"
    ),
) -> None:
    """Re-render the self-contained HTML report from a saved results.json (no model or torch needed)."""
    from saecircuits.report.render import render_report
    from saecircuits.report.schema import ResultsSchemaError, load_results

    if out.is_dir():
        out = out / "report.html"  # a folder was given: write the page inside it
    if not results_json.is_file():
        typer.echo(f"Error: {results_json} does not exist or is not a file.", err=True)
        raise typer.Exit(code=2)
    try:
        results = load_results(results_json)
        path = render_report(results, out)
    except ResultsSchemaError as e:
        typer.echo(f"Error: {results_json} is not a valid results file: {e}", err=True)
        raise typer.Exit(code=2) from e
    typer.echo(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
