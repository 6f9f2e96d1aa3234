"""The report reads the typed results (issue 19): a Results is rendered as it is (never validated again), a dict is
validated once, and the typed reading tells apart what the dict did (a key given as null, an empty block)."""

from __future__ import annotations

import copy

import pytest
from test_report_cli_out import _report
from test_report_evidence import EVIDENCE

from saecircuits.report.render import build_report_html
from saecircuits.report.schema import write_json_atomic
from saecircuits.results import Results, SaeEntry


@pytest.fixture
def validations(monkeypatch):
    """Counts of ``Results.model_validate`` and ``SaeEntry.model_validate`` calls (every validation of a whole
    results dict or SAE entry goes through them)."""
    counts = {"Results": 0, "SaeEntry": 0}
    for cls in (Results, SaeEntry):
        orig = cls.model_validate.__func__

        def counted(klass, obj, *args, _orig=orig, _name=cls.__name__, **kwargs):
            counts[_name] += 1
            return _orig(klass, obj, *args, **kwargs)

        monkeypatch.setattr(cls, "model_validate", classmethod(counted))
    return counts


def test_typed_results_are_rendered_without_validating_again(results, validations):
    typed = Results.from_dict(results)
    assert validations == {"Results": 1, "SaeEntry": 0}
    page = build_report_html(typed)
    assert validations == {"Results": 1, "SaeEntry": 0}  # the renderer read the typed results as they are
    assert build_report_html(results) == page  # a dict: validated once, the same page
    assert validations == {"Results": 2, "SaeEntry": 0}


def test_cli_report_validates_the_file_once(results, tmp_path, validations):
    """``saecircuits report`` validated results.json twice (Results.load, then render_report again)."""
    src = write_json_atomic(tmp_path / "results.json", results)
    res = _report(src, str(tmp_path / "out.html"))
    assert res.exit_code == 0, res.output
    assert validations == {"Results": 1, "SaeEntry": 0}
    assert (tmp_path / "out.html").read_text(encoding="utf-8") == build_report_html(results)


def test_a_key_given_as_null_is_not_an_absent_key(results):
    """A typed model reads an absent optional key as None too; the page still tells them apart as the dict did:
    answer_logprob_clean given as null shows the log-probs as n/a, absent shows no such sentence."""
    with_evidence = copy.deepcopy(results)
    with_evidence["saes"][0].update(copy.deepcopy(EVIDENCE))
    pb = with_evidence["saes"][0]["feature_details"][0]["prompt_boosts"]
    pb["answer_logprob_clean"] = None
    assert "Mean answer log-prob: clean n/a, ablated -1.1515 nats." in build_report_html(with_evidence)
    del pb["answer_logprob_clean"]
    assert "Mean answer log-prob" not in build_report_html(with_evidence)


def test_an_empty_block_shows_nothing(results):
    """``{}`` in the file is an empty block (a model of it is always truthy): an empty circuit selection gives the
    circuit no selection line, as when it is absent."""
    results["circuit"] = {"nodes": [], "edges": [], "selection": {}}
    empty = build_report_html(results)
    del results["circuit"]["selection"]
    assert build_report_html(results) == empty
    results["circuit"]["selection"] = {"rule": "smallest size with faithfulness >= 0.8"}
    assert "smallest size with faithfulness &gt;= 0.8" in build_report_html(results)
