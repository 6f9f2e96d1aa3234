"""results.json and the report for numbers that cannot support a conclusion: undefined loss recovered, the behaviour
block, the checks block and the warning over a flagged SAE's feature ranking."""

from __future__ import annotations

import re

import pytest
from report_fixtures import HOSTILE

from saecircuits.report.render import build_report_html
from saecircuits.report.schema import ResultsSchemaError, validate_results

REASON = "zero ablation lowers the loss (ablated - clean = -0.6396 nats, below the 0.01-nat floor)"


def _flagged(results: dict) -> dict:
    sae = results["saes"][0]
    sae["loss_recovered"] = None
    sae.pop("loss_recovered_ci95", None)
    sae["loss_recovered_undefined_reason"] = REASON
    sae["failed_checks"] = ["loss_recovered_undefined_zero"]
    results["behaviour"] = {
        "n_prompts": 120, "top1_accuracy": 0.05, "top1_accuracy_ci95": [0.02, 0.1], "mean_p_answer": 0.01,
        "mean_p_answer_ci95": 0.002, "mean_loss": 8.5, "mean_loss_ci95": 0.3, "uniform_loss": 10.825,
        "performs": False, "rule": "performs the behaviour when clean top-1 accuracy >= 0.5",
    }
    results["checks"] = [
        {"id": "behaviour_not_performed", "scope": "task", "message": "the model does not perform " + HOSTILE,
         "what_to_try": "check the answer token", "severity": "warning"},
        {"id": "loss_recovered_undefined_zero", "scope": sae["hook_point"], "message": "loss recovered " + REASON,
         "what_to_try": "read the raw losses instead", "severity": "warning"},
    ]
    return results


def _summary_rows(page: str, sid: str) -> dict:
    start = page.index(f'id="{sid}-summary"')
    table = page[start : page.index("</table>", start)]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr[^>]*>(.*?)</tr>", table)]
    return {r[0]: r[1] for r in rows if r}


def test_undefined_loss_recovered_shows_the_reason_and_no_interval(results):
    page = build_report_html(_flagged(results))
    summary = _summary_rows(page, "sae-0")
    assert summary["loss recovered vs zero ablation"] == "undefined: " + REASON.replace('"', "&quot;")
    assert "[0.941" not in page  # the old interval is gone with the value
    assert summary["loss with zero ablation (nats)"] == "3.9876 \u00b1 0.2000"  # the raw losses stay


def test_checks_block_and_warnings_over_the_flagged_ranking(results):
    page = build_report_html(_flagged(results))
    assert '<h2 id="checks">Checks</h2>' in page and page.index('id="checks"') < page.index('id="dla"')
    assert "The model does not perform the behaviour:</b> clean top-1 accuracy 5.0% of 120 prompts" in page
    assert "8.500 \u00b1 0.300 nats" in page
    checks = page[page.index('id="checks"') : page.index('id="dla"')]
    assert "check the answer token" in checks and "read the raw losses instead" in checks
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in checks
    # both SAEs carry the task warning; SAE 0 also its own; twice each (over the summary and the ranking)
    sae0 = page[page.index('<h2 id="sae-0"') : page.index('<h2 id="sae-1"')]
    assert sae0.count("the feature ranking of this SAE cannot support a conclusion") == 2
    assert sae0.index("cannot support a conclusion", sae0.index('id="sae-0-features"')) < sae0.index("<table",
                                                                                    sae0.index('id="sae-0-features"'))
    assert "2 check(s) failed" in sae0
    # one warning box per SAE; over the ranking a line points back to it (no second near-identical box)
    assert sae0.count('<div class="warn">') == 1
    sae1 = page[page.index('<h2 id="sae-1"') :]
    assert "1 check(s) failed" in sae1
    assert page.count("checks failed</b>") == 2  # in the contents


def test_all_passed_says_so(results):
    results["checks"] = []
    results["behaviour"] = {"n_prompts": 120, "top1_accuracy": 0.99, "mean_p_answer": 0.9, "mean_loss": 0.1,
                            "performs": True}
    page = build_report_html(results)
    assert "All checks passed" in page and "The model performs the behaviour" in page
    assert "cannot support a conclusion" not in page


def test_schema_refuses_an_interval_for_an_undefined_ratio(results):
    bad = _flagged(results)
    bad["saes"][0]["loss_recovered_ci95"] = [0.1, 0.9]
    with pytest.raises(ResultsSchemaError, match="undefined ratio has no interval"):
        validate_results(bad)
    bad["saes"][0]["loss_recovered_ci95"] = [None, None]  # NaN bounds written as null are fine
    validate_results(bad)


def test_schema_refuses_a_reason_beside_a_value(results):
    results["saes"][0]["loss_recovered_undefined_reason"] = "because"
    with pytest.raises(ResultsSchemaError, match="give one or the other"):
        validate_results(results)


def test_schema_checks_the_checks(results):
    flagged = _flagged(results)
    validate_results(flagged)
    flagged["saes"][0]["failed_checks"] = ["negative_explained_variance"]
    with pytest.raises(ResultsSchemaError, match="no entry in results\\['checks'\\]"):
        validate_results(flagged)
    flagged = _flagged(results)
    flagged["behaviour"]["performs"] = "no"
    with pytest.raises(ResultsSchemaError, match="must be true or false"):
        validate_results(flagged)
    flagged = _flagged(results)
    del flagged["checks"][0]["what_to_try"]
    with pytest.raises(ResultsSchemaError, match="what_to_try"):
        validate_results(flagged)
