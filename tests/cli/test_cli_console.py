"""Console output stays readable in a log file (not a terminal): status lines are never folded at the console
width, so a long path stays on one line (issue 7, item 9)."""

from __future__ import annotations

import logging

from saecircuits.cli.run import _say, _setup_logging


def test_status_line_with_a_long_path_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    path = "/tmp/" + "a-rather-long-folder-name/" * 6 + "results.json"
    _say(f"wrote {path} and {path}")
    assert capsys.readouterr().err == f"saecircuits wrote {path} and {path}\n"


def test_stage_logs_are_plain_lines_when_not_on_a_terminal(capsys):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    _setup_logging(verbose=True)
    try:
        long = "x" * 150
        logging.getLogger("saecircuits.pipeline").info("stage %s", long)
        assert capsys.readouterr().err == f"INFO saecircuits.pipeline: stage {long}\n"
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
