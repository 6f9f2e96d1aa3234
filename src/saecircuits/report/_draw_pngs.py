"""Child process of ``--export`` (:func:`saecircuits.report.export.write_figures`): draw PNGs with kaleido.

``python -m saecircuits.report._draw_pngs JOBS.json``: ``JOBS.json`` is a list of ``{"fig": a figure's
``to_json()`` text, "path": str, "opts": {...}}``. Run in its own process session, so that the parent can stop it, and the Chromium it starts,
when it runs past its time limit (kaleido's own timeout does not end a stuck draw). Exit status 0 when every PNG
is written; otherwise 1, with the error on stderr.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import kaleido
    import plotly.io as pio

    with open(argv[0], encoding="utf-8") as fh:
        jobs = json.load(fh)
    jobs = [{**job, "fig": pio.from_json(job["fig"])} for job in jobs]
    try:
        kaleido.write_fig_from_object_sync(jobs)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which names the fix
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
