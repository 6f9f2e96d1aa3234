"""feature_evidence: one call gives schema-valid, JSON-ready keys that the report renders."""

import json
import math

import torch
from helpers import quote_task, random_sae, tiny_llama, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.evidence import feature_evidence
from saecircuits.report.render import build_report_html
from saecircuits.report.schema import validate_results


def _results(entry_extra, d_sae):
    return {
        "schema_version": 2,
        "model": "tiny",
        "task": {"name": "closing_quote", "n_prompts": 8, "answer_token_ids": [1]},
        "dla": {"labels": [], "mean": [], "completeness_max_abs_error": 0.0},
        "saes": [
            {
                "hook_point": "blocks.1.mlp.hook_post",
                "d_in": 64,
                "d_sae": d_sae,
                "l0": 1.0,
                "clean_loss": 1.0,
                "sae_loss": 1.0,
                "zero_ablation_loss": 2.0,
                "mean_ablation_loss": 1.5,
                "loss_recovered": 1.0,
                "loss_recovered_mean_ablation": 1.0,
                "top_features": [],
                **entry_extra,
            }
        ],
    }


def test_neo_evidence_is_valid_and_renders():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task).dense()
    feats = [int(k) for k in torch.argsort((acts > 0).sum(0), descending=True)[:2]]
    ev = feature_evidence(
        model, sae, task, feats, task.token_ids, max_prompts_per_feature=3, min_token_count=1
    )
    assert set(ev) == {"error_dla", "feature_details", "upstream_ablation", "activation_scaled_dla"}
    json.dumps(ev, allow_nan=False)  # plain JSON, no NaN
    assert [d["feature"] for d in ev["feature_details"]] == feats
    for d in ev["feature_details"]:
        assert set(d) == {"feature", "n_active_prompts", "max_prompts", "prompt_boosts", "weight_boosts",
                          "loss_vs_activation", "dfa"}
        n_active = int((acts[:, d["feature"]] > 0).sum())
        assert d["n_active_prompts"] == n_active and d["max_prompts"] == 3  # the subset is said, not hidden
        assert len(d["loss_vs_activation"]["activation"]) == min(3, n_active)
        assert d["dfa"]["completeness_max_abs_error"] < 1e-4
    assert ev["upstream_ablation"]["hook"] == "blocks.0.mlp.hook_post"
    assert {e["feature"] for e in ev["activation_scaled_dla"]} >= set(feats)
    mean = ev["error_dla"]["mean"]
    assert math.isclose(mean[1] + mean[2], mean[0], abs_tol=1e-5)
    results = _results(ev, sae.d_sae)
    validate_results(results)
    html = build_report_html(results)
    assert 'id="sae-0-details"' in html
    subset = [d for d in ev["feature_details"] if d["n_active_prompts"] > 3]
    assert subset  # the two most often active features of the random SAE are active on more than 3 prompts
    for d in subset:
        assert (f'The views below use the first 3 of the {d["n_active_prompts"]} prompts where feature '
                f'{d["feature"]} is active') in html
    from saecircuits.report.browser import browser_payload

    cards = browser_payload(results)["saes"][0]["cards"]
    assert cards[str(subset[0]["feature"])]["sub"] == [subset[0]["n_active_prompts"], 3]


def test_llama_skips_dfa_but_keeps_the_rest():
    model = tiny_llama()
    task, sae = quote_task(), random_sae(d_in=48)
    ev = feature_evidence(model, sae, task, [0, 1], task.token_ids, max_prompts_per_feature=2)
    assert "dfa" not in ev["feature_details"][0]
    assert {"error_dla", "upstream_ablation", "activation_scaled_dla"} <= set(ev)
