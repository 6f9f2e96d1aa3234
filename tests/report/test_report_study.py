"""The keys of the rest of the reference study (corpus_stats, loss_comparison, ablation_modes,
max_activating_ablation, feature_geometry, span_ablation; layer_comparison at the top): validated when present,
rendered with their reading notes, every string escaped."""

import copy

import pytest
from report_fixtures import HOSTILE

from saecircuits.report.render import build_report_html
from saecircuits.report.schema import ResultsSchemaError, validate_results

OFF = {"floor": -0.17, "n_ablations": 120, "n_with_off_range": 37, "n_off_range_entries": 512,
       "fraction_with_off_range": 0.3083, "min_value": -1.25}
EX = {"doc_index": 4, "tokens": ["A", HOSTILE, '."'], "activations": [0.1, 0.2, 0.3], "max_activation": 0.3}
STUDY = {
    "corpus_stats": {
        "n_docs": 1000, "n_tokens": 201234, "l0": 41.25, "l0_counts": [1, 2, 3], "n_dead": 17,
        "density_log10_edges": [-3.0, -2.0, -1.0], "density_log10_counts": [5, 7],
        "activation_log10_edges": [-1.0, 0.0, 1.0], "token_fraction": 0.25, "bands": {"lower": 0.1},
        "features": [
            {"feature": 12345, "density": 0.0123, "max_activation": 7.5, "fire_count": 2475, "mean_when_active": 1.75,
             "above_count": 300, "top_tokens": [['."', 210], [HOSTILE, 40]], "top_token_share": 0.7,
             "activation_log10_counts": [10, 20], "top_stories": [{"doc_index": 3, "position": 9, "activation": 7.5}],
             "band_examples": {"lower": [EX], "upper": []}},
        ],
    },
    "loss_comparison": {
        "conditions": ["clean", "mean_ablation", "zero_ablation", "features_ablated", "sae_spliced"],
        "labels": ["clean", "mean ablation", "zero ablation", "top 3 features ablated (residual)", "SAE spliced"],
        "features": [12345, 9001, 2077], "mode": "residual", "n_prompts": 120,
        "mean": [0.4321, 2.3456, 3.9876, 1.6789, 0.5678], "ci95": [0.05, 0.15, 0.2, 0.1, 0.06],
        "diff_vs_clean": [0.0, 1.9135, 3.5555, 1.2468, 0.1357], "diff_vs_clean_ci95": [0.0, 0.1, 0.2, 0.09, 0.02],
        "features_minus_sae": {"mean": 1.1111, "ci95": 0.08, "n": 120},
        "off_range": OFF, "sae_off_range": None,
    },
    "ablation_modes": {
        "features": [12345, 9001], "multi_features": [12345, 9001],
        "rows": [{"feature": 12345, "residual": {"mean": 0.8765, "ci95": 0.1, "n": 118},
                  "reconstruction": {"mean": 0.9876, "ci95": 0.1, "n": 118},
                  "clean_effect": {"mean": 0.6543, "ci95": 0.1, "n": 118}},
                 {"feature": 9001, "residual": {"mean": 0.2468, "ci95": None, "n": 1}}],
        "multi": {"residual": {"mean": 1.5, "ci95": 0.2, "n": 120, "off_range": OFF}},
        "off_range": {"residual": OFF, "reconstruction": None,
                      "clean_effect": {"floor": None, "n_ablations": 3, "n_with_off_range": None}},
        "descriptions": {"residual": "x - f W_dec " + HOSTILE},
    },
    "max_activating_ablation": [
        {"feature": 12345, "mode": "residual", "threshold": 0.75, "n_stories": 2,
         "global": {"mean": 0.0432, "ci95": 0.01, "n": 2}, "per_position": {"mean": 0.3579, "ci95": 0.05, "n": 14},
         "stories": [{"doc_index": 3, "clean_loss": 2.0, "ablated_loss": 2.1, "loss_increase": 0.1}],
         "position_loss_increase": [0.1, 0.5], "position_activation": [1.0, 2.0],
         "per_token": [{"doc_index": 3, "tokens": ["<|endoftext|>", HOSTILE, "x"], "loss_change": [0.0, 0.4, -0.2],
                        "activation": [0.0, 1.0, 0.0]}],
         "off_range": OFF},
    ],
    "feature_geometry": {
        "features": [12345, 9001],
        "cooccurrence": {"threshold": 0.0, "n_prompts": 120, "counts": [[100, 40], [40, 50]],
                         "by_min": [[1.0, 0.8], [0.8, 1.0]], "by_max": [[1.0, 0.4], [0.4, 1.0]]},
        "decoder_cosine": [[1.0, 0.1234], [0.1234, 1.0]], "encoder_cosine": [[1.0, None], [None, None]],
        "token_kurtosis": [12.3456, 0.5],
        "token_kurtosis_all": {"edges": [0.0, 5.0, 10.0], "counts": [3, 4], "median": 4.2, "n_features": 7},
    },
    "span_ablation": {"features": [12345, 9001], "variants": ["clean", "span_zero", "span_mean"], "rank": 2,
                      "mean": [0.4321, 0.9753, 0.8642], "ci95": [0.05, 0.1, 0.1],
                      "diff_vs_clean": [0.0, 0.5432, 0.4321], "diff_vs_clean_ci95": [0.0, 0.05, 0.04],
                      "fraction_kept": 0.1357},
}
LAYERS = {
    "mode": "residual", "n_prompts": 120,
    "runs": [
        {"label": "blocks.0.mlp.hook_post", "hooks": ["blocks.0.mlp.hook_post"], "features": [[1, 2]],
         "loss_increase": {"mean": 0.3141, "ci95": 0.05, "n": 120}, "values": [0.1, 0.5]},
        {"label": HOSTILE, "features": [[3]], "loss_increase": {"mean": 1.6789, "ci95": 0.1, "n": 120},
         "values": [1.0, 2.0]},
    ],
    "paired": [{"a": 0, "b": 1, "mean": -1.3648, "ci95": 0.12, "n": 120}],
}


@pytest.fixture
def with_study(results):
    r = copy.deepcopy(results)
    r["saes"][0].update(copy.deepcopy(STUDY))
    r["layer_comparison"] = copy.deepcopy(LAYERS)
    return r


def test_renders_every_study_section_with_numbers_escaped(with_study):
    validate_results(with_study)
    page = build_report_html(with_study)
    for text in (
        'id="sae-0-corpus"', 'id="sae-0-fiveway"', 'id="sae-0-modes"', 'id="sae-0-stories"', 'id="sae-0-geometry"',
        'id="sae-0-span"', 'id="layers"', 'id="sae-0-bands-f12345"',
        "1.23e-02",  # density
        "41.25",  # L0
        "2.3456",  # mean-ablation loss
        "1.9135",  # paired difference
        "0.9876",  # reconstruction mode
        "37 of 120",  # off-range count
        "undefined",  # a hook without a bounded range
        "0.3579",  # per-position mean
        "12.35",  # token kurtosis
        "0.5432",  # span ablation
        "-1.3648",  # layer paired difference
        "How to read it",
    ):
        assert text in page, text
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_undefined_off_range_said_once_per_sae(with_study):
    """A hook without a bounded range leaves every off-range record of the SAE undefined (its floor is the hook's):
    the page says so once, not after each of the five ablation records that carry it (a new user's report)."""
    und = {"floor": None, "n_ablations": 5, "n_with_off_range": None}
    sae = with_study["saes"][0]
    sae["loss_comparison"]["off_range"] = und
    sae["loss_comparison"]["sae_off_range"] = und
    sae["ablation_modes"]["off_range"] = {m: und for m in ("residual", "reconstruction", "clean_effect")}
    sae["max_activating_ablation"][0]["off_range"] = und
    validate_results(with_study)
    page = build_report_html(with_study)
    assert page.count("Off-range count") == 1, "one sentence for the SAE's five undefined records"
    assert "37 of 120" not in page  # no counts left over
    # a defined record beside an undefined one keeps its sentence, and the undefined one is still said once
    sae["ablation_modes"]["off_range"]["residual"] = OFF
    page = build_report_html(with_study)
    assert page.count("Off-range count") == 1 and page.count("37 of 120") == 1


def test_study_sections_absent_without_keys(results):
    page = build_report_html(results)
    for slug in ("corpus", "fiveway", "modes", "stories", "geometry", "span"):
        assert f'id="sae-0-{slug}"' not in page
    assert 'id="layers"' not in page


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("corpus_stats", "features", 0, "feature"), 10**9, "out of range"),
        (("corpus_stats", "features", 0, "density"), 1.5, "not in"),
        (("corpus_stats", "density_log10_counts"), [1], "one count per bin"),
        (("corpus_stats", "features", 0, "activation_log10_counts"), [1, 2, 3], "needs 2 counts"),
        (("corpus_stats", "features", 0, "band_examples", "lower", 0, "activations"), [0.1], "aligned"),
        (("corpus_stats", "features", 0, "top_tokens", 0), ["x"], "token string, number"),
        (("loss_comparison", "mean"), [0.1, 0.2], "aligned"),
        (("loss_comparison", "off_range", "n_ablations"), None, "must be an int"),
        (("loss_comparison", "off_range", "n_with_off_range"), 1.5, "int or null"),
        (("ablation_modes", "rows", 0, "feature"), -1, "out of range"),
        (("max_activating_ablation", 0, "per_token", 0, "loss_change"), [0.1], "aligned"),
        (("max_activating_ablation", 0, "position_activation"), [0.1], "aligned"),
        (("feature_geometry", "decoder_cosine"), [[1.0]], "2 x 2 matrix"),
        (("feature_geometry", "cooccurrence", "counts"), [[1, 2], [3]], "2 x 2 matrix"),
        (("feature_geometry", "token_kurtosis"), [1.0], "aligned"),
        (("span_ablation", "mean"), [1.0], "aligned"),
    ],
)
def test_bad_study_keys_are_named(with_study, path, value, message):
    target = with_study["saes"][0]
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    with pytest.raises(ResultsSchemaError, match=message):
        validate_results(with_study)


def test_bad_layer_comparison_is_named(with_study):
    with_study["layer_comparison"]["paired"][0]["b"] = 5
    with pytest.raises(ResultsSchemaError, match="there are 2 runs"):
        validate_results(with_study)
    del with_study["layer_comparison"]["runs"][0]["loss_increase"]
    with pytest.raises(ResultsSchemaError, match="loss_increase"):
        validate_results(with_study)
