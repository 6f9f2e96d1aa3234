"""The console summary: the behaviour line first, undefined numbers said so (never 0 or an interval), the checks."""

from __future__ import annotations

import math

from saecircuits.cli.run import _summary


def _results(**sae_extra) -> dict:
    sae = {
        "hook_point": "blocks.1.mlp.hook_post", "d_in": 4, "d_sae": 8, "l0": 3.0, "explained_variance_at_p": None,
        "clean_loss": 0.5, "sae_loss": 0.6, "zero_ablation_loss": 0.5001, "mean_ablation_loss": 0.9,
        "loss_recovered": None, "loss_recovered_undefined_reason": "zero ablation barely raises the loss",
        "loss_recovered_mean_ablation": 0.75, "loss_recovered_mean_ablation_ci95": [0.7, 0.8],
        "top_features": [
            {"feature": 5, "loss_increase": 0.25, "loss_increase_ci95": None, "mean_activation": 1.0,
             "fraction_active": 0.05},
            {"feature": 2, "loss_increase": 0.125, "loss_increase_ci95": math.nan, "mean_activation": 1.0,
             "fraction_active": 0.05},
        ],
        "failed_checks": ["loss_recovered_undefined_zero"],
    } | sae_extra
    return {
        "model": "m", "task": {"name": "t", "n_prompts": 20, "answer_token_ids": [1]},
        "dla": {"labels": [], "mean": [], "completeness_max_abs_error": 1e-6},
        "behaviour": {"n_prompts": 20, "top1_accuracy": 0.9, "mean_p_answer": 0.8, "mean_loss": 0.5,
                      "performs": True},
        "checks": [{"id": "loss_recovered_undefined_zero", "scope": "blocks.1.mlp.hook_post",
                    "message": "loss recovered vs zero ablation is undefined", "what_to_try": "read the raw losses"}],
        "saes": [sae],
    }


def test_undefined_numbers_are_never_printed_as_numbers(capsys):
    _summary(_results())
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("the model performs the behaviour: clean top-1 accuracy 90.0%")
    assert "explained variance at P undefined" in out
    assert "loss recovered undefined vs zero / 0.750 [0.700, 0.800] vs mean ablation" in out
    assert "0.0000" not in out and "nan" not in out  # an undefined feature CI is n/a, not a zero-width interval
    assert out.count("n/a") == 2
    assert "clean 0.5000, SAE spliced 0.6000, zero ablation 0.5001, mean ablation 0.9000" in out
    assert "WARNING blocks.1.mlp.hook_post: 1 check(s) failed (loss_recovered_undefined_zero)" in out
    assert "WARNING [blocks.1.mlp.hook_post] loss recovered vs zero ablation is undefined" in out
    assert "try: read the raw losses" in out


def test_all_checks_passed_line(capsys):
    r = _results(failed_checks=[], loss_recovered=0.9, loss_recovered_ci95=[0.85, 0.95],
                 loss_recovered_undefined_reason=None)
    r["checks"] = []
    _summary(r)
    out = capsys.readouterr().out
    assert "checks: all passed" in out and "WARNING" not in out and "0.900 [0.850, 0.950] vs zero" in out


def test_user_strings_are_text_not_rich_markup_and_tokens_use_visible_token(capsys):
    """A task named after a JSONL file 'x[red].jsonl', a hook name with brackets, and top tokens with whitespace:
    printed as given (no markup eaten), tokens as quoted_token(t) (visible form in quotes) like `saecircuits feature`."""
    r = _results(hook_point="blocks.1.mlp.hook_post[bold]")
    r["task"]["name"] = "x[red]"
    r["saes"][0]["loss_comparison"] = {"n_prompts": 20, "labels": ["clean"], "mean": [0.5], "ci95": [0.1],
                                       "diff_vs_clean": [0.0], "diff_vs_clean_ci95": [0.0]}
    r["saes"][0]["corpus_stats"] = {"n_docs": 3, "l0": 2.0, "n_dead": 0, "features": [
        {"feature": 5, "density": 0.01, "max_activation": 4.0, "top_tokens": [[" said", 9], ["\n", 4]]}]}
    _summary(r)
    out = capsys.readouterr().out
    assert "task x[red]: 20 prompts" in out
    assert out.count("blocks.1.mlp.hook_post[bold]") >= 3  # table titles and the warning line
    assert "\u201c\u00b7said\u201d (9), \u201c\u00b6\u201d (4)" in out


def test_whole_sequence_quality_is_printed_beside_loss_recovered_at_p(capsys):
    r = _results(whole_sequence={"loss_recovered": 0.812, "loss_recovered_ci95": [0.8, 0.824],
                                 "explained_variance": 0.345, "n_tokens": 900, "n_prompts": 20})
    _summary(r)
    out = capsys.readouterr().out
    assert ("over every position of the prompts: explained variance 0.345, loss recovered 0.812 [0.800, 0.824]"
            in out)


def test_a_number_that_rounds_to_zero_is_printed_without_a_sign(capsys):
    """The top-features ablation's rank change of -0.001 once printed "rank -0.00": a zero carries no sign."""
    from saecircuits.cli import num

    multi = {"features": [5, 2], "logprob_diff": {"mean": 0.045, "ci95": 0.006},
             "logit_diff": {"mean": -0.0004, "ci95": None}, "rank_diff": {"mean": -0.001}}
    _summary(_results(multi_ablation=multi))
    out = capsys.readouterr().out
    assert "answer logprob +0.045 ± 0.006 nats, logit 0.000, rank 0.00 (positive" in out, out
    assert "-0.00" not in out and "+0.00 " not in out
    # the formatter itself: only a value that rounds to zero loses its sign; n/a for missing or NaN
    cases = [(-0.001, "+.2f", "0.00"), (0.001, "+.2f", "0.00"), (-0.004, ".2f", "0.00"), (-0.005001, "+.2f", "-0.01"),
             (0.353, "+.3f", "+0.353"), (-0.0, ".2e", "0.00e+00"), (-1e-9, ".2e", "-1.00e-09"),
             (-0.00001, ".1%", "0.0%"), (-math.inf, "+.2f", "-inf"), (None, ".3f", "n/a"), (math.nan, ".3f", "n/a")]
    assert [num(v, spec) for v, spec, _ in cases] == [want for _, _, want in cases]


def test_the_corpus_table_is_capped_and_the_circuit_is_summarised(capsys):
    """A new user's demo printed ~1,300 lines of corpus-statistics rows and nothing of the circuit: the console now
    shows CONSOLE_FEATURES rows per SAE with a line for the rest, then the circuit at P and across positions."""
    from saecircuits.cli.run import CONSOLE_FEATURES

    r = _results()
    feats = [{"feature": k, "density": 0.01, "max_activation": 4.0, "top_tokens": [[" said", 9]]} for k in range(30)]
    r["saes"][0]["corpus_stats"] = {"n_docs": 3, "l0": 2.0, "n_dead": 0, "features": feats}
    r["circuit"] = {"file": "circuit.json", "selection": {"rule": "smallest size with faithfulness >= 0.8",
                                                          "n_nodes": 20, "faithfulness": 0.802253,
                                                          "faithfulness_ci95": [0.76338, 0.83848],
                                                          "completeness": -0.009681},
                    "positions": {"summary": "Most of the evidence (63%) comes from P itself."}}
    _summary(r)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "\u201c\u00b7said\u201d (9)" in line]
    assert len(rows) == CONSOLE_FEATURES < 30
    assert f"... and {30 - CONSOLE_FEATURES} more features: the report's feature browser and results.json" in out
    assert ("circuit at P: 20 nodes (smallest size with faithfulness >= 0.8), faithfulness 0.802 [0.763, 0.838], "
            "completeness -0.010; the whole graph is in circuit.json") in out
    assert "circuit across positions: Most of the evidence (63%) comes from P itself." in out
