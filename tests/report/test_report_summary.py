"""Summary first (the headline in plain words, surprises, readings), the feature browser's payload, the page layout.

Every expected number below is worked out by hand from report_fixtures._RESULTS."""

from __future__ import annotations

import base64
import gzip
import json
import math
import re

from report_fixtures import HOSTILE

from saecircuits.report.browser import browser_payload, embed_json
from saecircuits.report.render import STATIC_FEATURES, build_report, build_report_html
from saecircuits.report.summary import (
    feature_reading,
    headline,
    layer_comparison_reading,
    layer_effect_share,
    model_name,
    ratio_problem,
    surprises,
)


def test_headline_says_the_story_in_words(results):
    h = headline(results)
    assert h[0] == "Behaviour: closing_quote, on 120 prompts; the model should predict “.\"” next."
    # no checks block: p = exp(-0.4321) = 0.649 >= 0.5
    assert h[1] == ("The model's mean answer loss at P is 0.432 nats: it puts probability 0.65 on the answer "
                    "(geometric mean over prompts), so it performs the behaviour.")
    assert h[2] == ("Directly, the answer's logit comes mostly from MLP0 (+6.50 logits), L0H0 (+1.75 logits) and "
                    "embed (+0.50 logits) (direct logit attribution, mean over prompts).")
    # 12345: 0.8765 +- 0.1 -> [0.7765, 0.9765] (binary floats just below: 0.876 to 3 places), active on 98.33% of
    # prompts; 9001 is supported ([0.2, 0.3]); 2077 (0.0123 +- 0.02) is not
    assert h[3] == ("In blocks.0.mlp.hook_post (its SAE recovers 0.962 of the loss vs zero ablation, 95% CI 0.941 to "
                    "0.979), feature 12345 matters most: ablating it alone raises the answer loss by 0.876 nats (95% "
                    "CI 0.776 to 0.976) on the 98% of prompts where it is active; next come feature 9001 (0.247 nats).")
    # joint 1.2345 / (3.9876 - 0.4321 = 3.5555) = 34.7%: not spread thin
    assert h[4] == ("Ablating features 12345, 9001, 2077 together raises it by 1.234 nats (95% CI 1.124 to 1.345), "
                    "35% of what zero-ablating the whole layer costs (3.555 nats).")
    assert not any("spread thin" in s and "blocks.0.mlp" in s for s in h)
    # SAE 1: its only feature has no interval, so nothing is supported; said as such, not as "every 95% CI
    # includes 0" (there is no interval to include it)
    assert "In blocks.0.hook_resid_post no feature's effect has a 95% interval: each is measured on fewer than 2 " \
        "prompts; use more prompts (--max-prompts, a larger corpus) to tell which are supported." in h
    assert not any("every 95% CI includes 0" in s for s in h)


def test_headline_never_rounds_a_share_to_0_or_100_percent(results):
    # a feature active on 1 of 300 prompts (0.33%) and a circuit at 0.998 of the way: "0%" and "100%" would say
    # "never active" and "all the way"; the shares are said as "<1%" and ">99%"
    top = next(t for t in results["saes"][0]["top_features"] if t["feature"] == 12345)
    top["fraction_active"] = 1 / 300
    results["circuit"] = {"selection": {"n_nodes": 3, "faithfulness": 0.998, "rule": "r"}, "nodes": [], "edges": []}
    h = headline(results)
    assert "on the <1% of prompts where it is active" in h[3]
    assert "lies >99% of the way" in h[-1]
    assert not any(" 0% " in s or " 100% " in s for s in h)


def test_headline_says_every_interval_includes_zero_only_when_there_are_intervals(results):
    # with an interval that includes 0 (0.05 +- 0.08 -> [-0.03, 0.13]) the feature is measured but not supported
    results["saes"][1]["top_features"][0]["loss_increase_ci95"] = 0.08
    h = headline(results)
    assert ("In blocks.0.hook_resid_post no feature's effect is supported (every 95% CI includes 0): the effect is "
            "spread thin or too small to measure on these prompts.") in h
    assert not any("has a 95% interval" in s for s in h)


def test_headline_spread_thin_and_behaviour_from_checks(results):
    sae = results["saes"][0]
    sae["multi_ablation"]["logprob_diff"] = {"mean": 0.5, "ci95": 0.1}  # 0.5 / 3.5555 = 14% < 25%
    assert math.isclose(layer_effect_share(sae), 0.5 / 3.5555)
    # the summary reads validated results: a behaviour block has every required key
    results["behaviour"] = {"performs": False, "top1_accuracy": 0.31, "n_prompts": 100, "mean_p_answer": 0.3,
                            "mean_loss": 1.5}
    h = headline(results)
    assert "The model does NOT perform the behaviour: its top-1 prediction is the answer on 31 of the 100 prompts " \
           "(31.0%)." in h
    results["behaviour"] = {"performs": True, "top1_accuracy": 299 / 300, "n_prompts": 300, "mean_p_answer": 0.9,
                            "mean_loss": 0.1}
    h = headline(results)  # a count, never 99.7% rounded to 100%
    assert "The model performs the behaviour: its top-1 prediction is the answer on 299 of the 300 prompts (99.7%)." in h
    assert any(s.startswith("The effect in blocks.0.mlp.hook_post is spread thin") for s in h)


def test_surprises_loss_recovered_above_one_and_mean_worse_than_zero(results):
    sae = results["saes"][0]
    assert surprises(sae, results) == []
    sae.update(loss_recovered=1.05, loss_recovered_ci95=[1.01, 1.09], mean_ablation_loss=5.0)
    results["corpus"] = {"n_tokens": 73974}
    results["bos_policy"] = {"prepended": True, "token_id": 50256, "special_positions": "excluded"}
    said = surprises(sae, results)
    assert said[0].startswith("Loss recovered vs zero ablation at blocks.0.mlp.hook_post is above 1 (1.050): with the "
                              "SAE spliced in, the answer "
                              "loss (0.568 nats) is lower than the clean model's (0.432).")
    assert said[1].startswith("Mean ablation hurts more than zero ablation at blocks.0.mlp.hook_post (5.000 vs 3.988 "
                              "nats). Mean ablation "
                              "replaces the activation at P by its mean over 73974 corpus tokens, special-token "
                              "positions left out")


def test_loss_recovered_above_one_within_its_interval_is_not_a_surprise(results):
    sae = results["saes"][0]
    sae.update(loss_recovered=1.004, loss_recovered_ci95=[0.995, 1.012])
    assert not any("above 1" in s for s in surprises(sae, results))


def test_ratio_problem_when_the_layer_barely_matters(results):
    sae = results["saes"][0]
    assert ratio_problem(sae) is None
    sae["zero_ablation_loss"] = sae["clean_loss"] + 0.005
    assert ratio_problem(sae).startswith("ablating the layer raises the answer loss by only 0.005 nats, so the ratio")
    sae["zero_ablation_loss"] = sae["clean_loss"] - 0.028
    assert ratio_problem(sae).startswith("ablating the layer lowers the answer loss (by 0.028 nats), so the ratio")
    sae["zero_ablation_loss"] = 3.9876
    # one rule, loss_recovered's: the reason results.json gives is what makes the ratio unreadable
    sae["loss_recovered"] = None
    del sae["loss_recovered_ci95"]
    sae["loss_recovered_undefined_reason"] = "the effect's 95% interval includes 0"
    assert ratio_problem(sae) == "the effect's 95% interval includes 0"
    assert "its loss recovered cannot be read" in headline(results)[3]
    assert "(cannot be read: see below)" in build_report_html(results)


def test_a_defined_loss_recovered_with_a_wide_interval_is_a_value_as_on_the_console(results):
    """The report used to flag a defined ratio whose interval reaches below 0 while the console and results.json
    printed it as a value; loss_recovered's rule is the only rule now."""
    from saecircuits.cli.run import _ratio_text

    sae = results["saes"][0]
    sae["loss_recovered"], sae["loss_recovered_ci95"] = 0.05, [-0.02, 0.12]
    assert ratio_problem(sae) is None
    assert _ratio_text(sae, "loss_recovered") == "0.050 [-0.020, 0.120]"
    page = build_report_html(results)
    assert "0.050 [-0.020, 0.120]" in page and "0.050 [-0.020, 0.120] (cannot be read" not in page


def test_layer_effect_share_is_undefined_when_the_layer_barely_matters(results):
    sae = results["saes"][0]
    # joint 1.2345 nats / layer 3.5555 nats, worked by hand
    assert math.isclose(layer_effect_share(sae), 1.2345 / (3.9876 - 0.4321))
    # a 1e-4-nat layer effect: 1.2345 / 1e-4 would read "1234500% of the layer"; below MIN_ABLATION_EFFECT: None
    sae["zero_ablation_loss"] = sae["clean_loss"] + 1e-4
    assert layer_effect_share(sae) is None
    assert not any("of what zero-ablating the whole layer costs" in s for s in headline(results))
    # just above the threshold but loss recovered undefined (its effect's interval includes 0): None
    sae["zero_ablation_loss"] = sae["clean_loss"] + 0.02
    assert math.isclose(layer_effect_share(sae), 1.2345 / 0.02, rel_tol=1e-9)
    sae["loss_recovered"], sae["loss_recovered_undefined_reason"] = None, "the effect's 95% interval includes 0"
    del sae["loss_recovered_ci95"]  # an undefined ratio has no interval (the summary reads validated entries)
    assert layer_effect_share(sae) is None


def test_model_name_is_not_a_cache_path():
    assert model_name({"model": "roneneldan/TinyStories-1Layer-21M"}) == "roneneldan/TinyStories-1Layer-21M"
    assert model_name({"model": "../shared/data/stories260K/stories260K.bin"}) == "stories260K"
    assert model_name({"model": "/root/.cache/saecircuits/models/default-17ec2cd4"}) == "default-17ec2cd4"
    assert model_name({"model": "saecircuits default (2-layer GPT-Neo)"}) == "saecircuits default (2-layer GPT-Neo)"


def test_feature_reading(results):
    sae = results["saes"][0]
    sae["corpus_stats"] = {"n_docs": 3, "n_tokens": 30, "l0": 2.0, "features": [
        {"feature": 12345, "density": 0.01, "max_activation": 4.0, "top_tokens": [[" said", 9], ["\n", 4]]}]}
    sae["feature_details"] = [{"feature": 12345, "weight_boosts": {"top": [['."', 2.0]], "bottom": []}}]
    assert feature_reading(sae, 12345) == ("fires on “·said”, “¶”; writes towards “.\"”; ablating it: +0.876 nats "
                                           "[0.776, 0.976]")
    # a token with both quote marks reads as itself, never as Python's repr ('.\\'"')
    sae["feature_details"] = [{"feature": 12345, "weight_boosts": {"top": [[".'\"", 2.0]], "bottom": []}}]
    assert "writes towards “.'\"”;" in feature_reading(sae, 12345)
    assert feature_reading(sae, 42) == ""


def test_browser_payload_lists_every_feature_sorted_by_effect(results):
    sae = results["saes"][0]
    ex = sae["examples"][0]["examples"]
    ex.append(json.loads(json.dumps(ex[0])))  # an identical window: kept once
    sae["feature_effects"] = [
        {"feature": 5, "n_active_prompts": 1, "mean_loss_increase": 2.0, "ci95": None, "fraction_active": 0.01},
        {"feature": 12345, "n_active_prompts": 118, "mean_loss_increase": 0.8765, "ci95": 0.1,
         "fraction_active": 0.98333, "mean_activation": 2.5},
    ]
    p = browser_payload(results)
    s0 = p["saes"][0]
    assert [r[0] for r in s0["rows"]] == [5, 12345, 9001, 2077]  # by effect; 9001 and 2077 from the ranked table
    assert s0["rows"][0][1:4] == [2.0, None, None]  # no interval from one prompt
    assert s0["rows"][1][1:6] == [0.8765, 0.7765, 0.9765, 0.9833, 2.5]
    card = s0["cards"]["12345"]
    assert len(card["ex"]) == 2  # the duplicate window is gone
    strings = p["strings"]
    first = card["ex"][0]
    assert [strings[t] for t in first["t"]] == ["<|endoftext|>", "He", "·said", ",", '·"', "Hi", '."', "¶"]
    assert first["k"] == "tttttttw" and first["a"][6] == 4.0 and first["m"] == 4.0  # the newline: a blank box
    assert HOSTILE in strings  # stored as text, escaped when embedded


def test_embed_json_escapes_and_compresses():
    obj = {"s": "</script><script>alert(1)</script>", "x": list(range(50))}
    small = embed_json("d", obj)
    assert "</script><script>" not in small and small.count("</script>") == 1
    assert json.loads(re.search(r">(.*)</script>$", small).group(1)) == obj
    big = embed_json("d", obj, compress_above=10)
    assert 'data-encoding="gzip-base64"' in big
    blob = re.search(r">(.*)</script>$", big).group(1)
    assert json.loads(gzip.decompress(base64.b64decode(blob))) == obj
    assert embed_json("d", obj, compress_above=10) == big  # deterministic (mtime 0)


def test_page_layout_summary_first_then_browser_and_collapsible_sections(results):
    page = build_report_html(results)
    body = page[page.index("<body>"):]
    order = [body.index(x) for x in ('<section class="summary" id="summary">', 'id="glossary"',
                                     'id="feature-browser"', '<nav class="toc">', '<h2 id="dla">')]
    assert order == sorted(order)
    assert '<details class="section" open id="browser-section">' in page
    for sid in ("dla", "sae-0", "sae-1", "appendix", "glossary"):
        assert re.search(rf'<details class="section"( open)?><summary><h2 id="{sid}">', page), sid
    assert "<dt>DLA</dt>" in page and "<dt>loss recovered</dt>" in page and "<dt>P</dt>" in page
    assert '<a href="#card-sae-0-f12345">f12345</a>' in page  # summary links into the browser
    assert "<title>saecircuits report: closing_quote on roneneldan/TinyStories-1Layer-21M</title>" in page


def test_checks_block_in_the_summary(results):
    assert "check(s) failed" not in build_report_html(results)
    results["checks"] = [{"id": "behaviour_not_performed", "scope": "task", "message": HOSTILE,
                         "what_to_try": "use more prompts"}]
    page = build_report_html(results)
    summary = page[page.index('id="summary"'):page.index("</section>")]
    assert "1 check(s) failed." in summary and "&lt;script&gt;alert(1)&lt;/script&gt;" in summary
    assert "<i>Try:</i> use more prompts" in summary
    results["checks"] = []
    assert "<b>Checks:</b> all passed." in build_report_html(results)


def test_multi_ablation_says_how_its_set_was_chosen(results):
    sae = results["saes"][0]
    sae["multi_ablation_selection"] = {"rule": "the 3 largest loss increases among features whose 95% CI excludes 0",
                                       "n_supported": 2, "n_ranked": 3}
    page = build_report_html(results)
    assert ("Chosen as the 3 largest loss increases among features whose 95% CI excludes 0 (2 of 3 ranked features "
            "are supported).") in page
    del sae["multi_ablation"]
    sae["multi_ablation_selection"]["n_supported"] = 0
    assert "no ranked feature has a supported effect (every 95% CI of the 3 ranked features includes 0)" in \
        build_report_html(results)


def test_sae_quality_labelled_with_where_it_is_measured(results):
    sae = results["saes"][0]
    sae["training"]["final_metrics"] = {"l0": 35.0, "explained_variance_tokens": 0.9069, "shrinkage": 0.882,
                                        "dead_fraction": 0.0, "dense_fraction": 0.0186}
    sae["corpus_stats"] = {"n_docs": 10, "n_tokens": 500, "l0": 30.25, "n_dead": 4096,
                           "density_log10_edges": [-3.0, -2.0, -1.0, 0.0], "density_log10_counts": [5, 3, 2],
                           "features": []}
    rows = dict((r[0], r[1]) for r in _rows_after(build_report_html(results), "quality where it was trained"))
    where = "over its last training batch (100000000 training tokens in all)"
    assert rows[f"explained variance across tokens, {where}"] == "0.9069"
    assert rows[f"shrinkage |x_hat| / |x| {where} (1 = none)"] == "0.882"
    assert rows["L0 over all 500 counted corpus tokens"] == "30.25"
    assert rows["dead fraction over the corpus (never fires)"] == "0.250"  # 4096 / 16384
    assert rows["dense fraction over the corpus (density &gt;= 0.1)"] == "0.000"  # 2 / 16384, to 3 decimals


def _rows_after(page: str, marker: str) -> list[list[str]]:
    start = page.index(marker)
    table = page[start: page.index("</table>", start)]
    return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr[^>]*>(.*?)</tr>", table) if "<td" in r]


def test_static_sections_draw_the_first_features_and_the_browser_has_all(results):
    sae = results["saes"][0]
    ex = sae["examples"][0]["examples"][0]
    sae["examples"] = [{"feature": k, "examples": [ex]} for k in range(100, 100 + STATIC_FEATURES + 2)]
    rep = build_report(results)
    assert len(re.findall(r'<h4 id="sae-0-f\d+">', rep.html)) == STATIC_FEATURES
    assert f"The first {STATIC_FEATURES} of {STATIC_FEATURES + 2} features are shown here" in rep.html
    cards = browser_payload(results)["saes"][0]["cards"]
    assert all("ex" in cards[str(k)] for k in range(100, 100 + STATIC_FEATURES + 2))


def test_identical_example_windows_are_shown_once(results):
    exs = results["saes"][0]["examples"][0]["examples"]
    exs.append(json.loads(json.dumps(exs[0])))
    page = build_report_html(results)
    section = page[page.index('id="sae-0-f12345"'):page.index('id="sae-0-f9001"')]
    assert section.count("doc 17, max activation") == 1 and section.count("doc 3, max activation") == 1


def test_headline_never_lists_a_negative_contributor_as_a_source(results):
    results["dla"]["labels"] = ["embed", "MLP0", "L0H0", "MLP1"]
    results["dla"]["mean"] = [0.1, 6.5, -3.25, 1.5]
    del results["dla"]["ci95"]  # aligned with the labels or absent (the summary reads validated results)
    h = headline(results)
    assert h[2] == ("Directly, the answer's logit comes mostly from MLP0 (+6.50 logits) and MLP1 (+1.50 logits), "
                    "while L0H0 (-3.25 logits) pushes it down (direct logit attribution, mean over prompts).")
    results["dla"]["mean"] = [-0.1, -6.5, -3.25, -1.5]
    assert headline(results)[2] == (
        "Directly, no large component raises the answer's logit; MLP0 (-6.50 logits), L0H0 (-3.25 logits) and "
        "MLP1 (-1.50 logits) push it down (direct logit attribution, mean over prompts).")


def test_headline_says_what_faithfulness_means(results):
    results["circuit"] = {"selection": {"n_nodes": 12, "faithfulness": 0.863, "rule": "nodes with |effect| > 0.01"},
                          "nodes": [], "edges": []}
    said = headline(results)[-1]
    # faithfulness = (m(C) - m(empty)) / (m(all) - m(empty)): a position on the scale, not a share of the log-prob
    assert said == ("A circuit of 12 nodes across the SAEs has faithfulness 0.863: with everything else "
                    "mean-ablated, the answer's log-prob lies 86% of the way from its value with every node "
                    "mean-ablated (0) to the clean model's (1) (nodes with |effect| > 0.01).")
    assert "keeps" not in said


def _lc(alone, together, inter, ci):
    runs = [{"label": f"L{i}", "loss_increase": {"mean": m, "ci95": 0.01}} for i, m in enumerate(alone)]
    return {"runs": [*runs, {"label": "all together", "loss_increase": {"mean": together, "ci95": 0.02}}],
            "interaction": {"mean": inter, "ci95": ci, "n": 50}}


def test_layer_comparison_reading_says_super_sub_or_additive():
    # 0.3 + 0.2 = 0.5 alone; together 0.9: +0.4 [0.3, 0.5] per prompt -> super-additive
    said = layer_comparison_reading(_lc([0.3, 0.2], 0.9, 0.4, 0.1))
    assert said.startswith("Ablated together, the layers' top features raise the answer loss by 0.900 nats, against "
                           "0.500 for the sum of each set alone: a difference of +0.400 nats (95% CI +0.300 to +0.500)")
    assert "Super-additive" in said
    assert "Sub-additive" in layer_comparison_reading(_lc([0.3, 0.2], 0.35, -0.15, 0.05))
    assert "act about independently" in layer_comparison_reading(_lc([0.3, 0.2], 0.52, 0.02, 0.05))
    assert layer_comparison_reading({"runs": _lc([0.3, 0.2], 0.9, 0.4, 0.1)["runs"]}) == ""  # older files


def test_glossary_explains_the_circuit_terms(results):
    from saecircuits.report.summary import GLOSSARY

    terms = dict(GLOSSARY)
    for t in ("faithfulness", "completeness", "AtP", "IG"):
        assert t in terms
    assert "not a share of the log-prob" in terms["faithfulness"]
    assert "alone" in terms["IG"] and "submodule" in terms["IG"]
    html = build_report_html(results)
    assert "<dt>faithfulness</dt>" in html and "<dt>IG</dt>" in html


def test_whole_sequence_quality_sits_next_to_loss_recovered(results):
    results["saes"][0]["whole_sequence"] = {"loss_recovered": 0.8125, "loss_recovered_ci95": [0.8, 0.825],
                                            "explained_variance": 0.3456, "ce_clean": 1.5, "ce_sae": 1.6,
                                            "ce_zero": 2.0, "n_tokens": 900, "n_prompts": 120}
    html = build_report_html(results)
    summary = html[html.index('id="summary"'):html.index('id="glossary"')]
    assert "loss recovered over every position (95% CI)" in summary
    assert "explained variance over every position" in summary
    assert "<td>0.812 [0.800, 0.825]</td><td>0.346</td>" in summary  # after loss recovered at P, in its row
    assert "explained variance over every position of the prompts (900 tokens)" in html
