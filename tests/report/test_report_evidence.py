"""The optional per-feature / attribution keys (error_dla, feature_details, upstream_ablation, activation_scaled_dla):
validated when present, rendered only when present, every string escaped."""

import copy

import pytest
from report_fixtures import HOSTILE

from saecircuits.report.render import build_report_html
from saecircuits.report.schema import ResultsSchemaError, validate_results

EVIDENCE = {
    "error_dla": {
        "labels": ["MLP", "reconstruction", HOSTILE],
        "mean": [1.25, 0.75, 0.5],
        "ci95": [0.1, 0.1, 0.2],
    },
    "feature_details": [
        {
            "feature": 7,
            "prompt_boosts": {
                "boosted": [['."', 0.3841], [HOSTILE, 0.2812]],
                "deboosted": [[" with", -0.8183]],
                "n_prompts": 100,
                "answer_logprob_clean": -0.8703,
                "answer_logprob_ablated": -1.1515,
            },
            "weight_boosts": {"top": [['!"', 0.57]], "bottom": [[" tool", -0.3217]]},
            "loss_vs_activation": {
                "activation": [0.5, 1.5, 2.5],
                "loss_increase": [0.1, 0.2, 0.4],
                "pearson_r": 0.9819,
            },
            "dfa": {
                "labels": ["L0H0", HOSTILE, "MLP0"],
                "mean": [0.125, -0.5, 2.0],
                "ci95": [0.01, 0.02, 0.3],
                "variant": "zero",
                "n_prompts": 42,
                "completeness_max_abs_error": 3.5e-7,
                "tangent_error_mean": 0.4321,
            },
        }
    ],
    "upstream_ablation": {
        "hook": "blocks.0.mlp.hook_post",
        "mode": "zero",
        "features": [7, 3],
        "clean_mean": [1.5, 0.25],
        "ablated_mean": [0.625, 0.25],
        "diff_ci95": [0.1, 0.0],
        "clean_mean_active": [2.0, 0.5],
        "ablated_mean_active": [0.875, 0.5],
        "fraction_active_clean": [0.75, 0.5],
        "fraction_active_ablated": [0.25, 0.5],
    },
    "activation_scaled_dla": [
        {"feature": 7, "mean_activation": 1.5, "dla_per_unit": 0.4567, "scaled": 0.6851, "scaled_ln": 0.0123},
        {"feature": 3, "mean_activation": 0.25, "dla_per_unit": -0.1, "scaled": -0.025},
    ],
}


@pytest.fixture
def with_evidence(results):
    r = copy.deepcopy(results)
    r["saes"][0].update(copy.deepcopy(EVIDENCE))
    return r


def test_renders_all_evidence_sections_escaped(with_evidence):
    validate_results(with_evidence)
    page = build_report_html(with_evidence)
    for text in (
        'id="sae-0-errdla"',
        'id="sae-0-details"',
        'id="sae-0-detail-f7"',
        'id="sae-0-upstream"',
        'id="sae-0-scaled"',
        "0.3841",  # prompt boost
        "-0.8183",
        "0.5700",  # weight boost
        "Pearson r = 0.982 (n = 3)",  # pearson r with its n (3 points)
        "3.50e-07",  # DFA completeness
        "0.6250",  # upstream ablated mean
        "0.6851",  # scaled DLA
        "0.0123",  # LN-scaled
        "blocks.0.mlp.hook_post",
    ):
        assert text in page, text
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_sections_absent_without_keys(results):
    page = build_report_html(results)
    for slug in ("errdla", "details", "upstream", "scaled"):
        assert f'id="sae-0-{slug}"' not in page


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("error_dla", "mean"), [1.0], "aligned"),
        (("feature_details", 0, "feature"), 10**9, "out of range"),
        (("feature_details", 0, "prompt_boosts", "boosted", 0), ["x"], "token string, number"),
        (("feature_details", 0, "loss_vs_activation", "loss_increase"), [0.1], "aligned"),
        (("feature_details", 0, "dfa", "labels"), "L0H0", "must be a list"),
        (("upstream_ablation", "ablated_mean"), [0.1], "aligned"),
        (("upstream_ablation", "features", 0), -1, "out of range"),
        (("activation_scaled_dla", 0, "scaled"), "big", "must be a number"),
    ],
)
def test_bad_evidence_is_named(with_evidence, path, value, message):
    target = with_evidence["saes"][0]
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    with pytest.raises(ResultsSchemaError, match=message):
        validate_results(with_evidence)
