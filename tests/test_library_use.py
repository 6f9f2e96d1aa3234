"""Using the library from a notebook: defaults as in the pipeline, progress, short reprs, SAE folders, result objects
that display themselves; and the pipeline's new keys (supported multi-ablation set, activations at P, --layers auto,
training metrics when SAEs are reused)."""

from __future__ import annotations

import inspect
import io
import math

import pytest
import torch
from helpers import HOOK, STORIES, quote_task, random_sae, tiny_neo

from saecircuits.saes.io import SAEError, find_sae_folders, load_sae, save_sae


def test_library_defaults_match_the_pipeline():
    from saecircuits.analysis.corpus.examples import top_activating_examples
    from saecircuits.pipeline import RunConfig
    from saecircuits.tasks.closing_quote import closing_quote_task

    cfg = RunConfig(model="m", data="d", out="o")
    assert inspect.signature(closing_quote_task).parameters["max_prompts"].default == cfg.max_prompts == 1000
    assert inspect.signature(top_activating_examples).parameters["k"].default == cfg.n_examples == 5
    from saecircuits.analysis.ablations.feature_effects import feature_ablation_table

    p = inspect.signature(feature_ablation_table).parameters
    assert p["min_fraction_active"].default == cfg.min_fraction_active
    assert p["max_candidates"].default == cfg.max_candidates


def test_long_calls_show_progress_on_a_terminal_or_in_a_notebook(monkeypatch):
    from saecircuits import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress.show_progress(None, Tty()) is True
    assert progress.show_progress(None, io.StringIO()) is False  # a log file, a test
    assert progress.show_progress(False, Tty()) is False and progress.show_progress(True, io.StringIO()) is True
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    assert progress.show_progress(None, io.StringIO()) is True
    from saecircuits.analysis.ablations.feature_effects import feature_effects
    from saecircuits.analysis.readouts.dla import direct_logit_attribution

    for fn in (direct_logit_attribution, feature_effects):
        assert inspect.signature(fn).parameters["progress"].default is None


def test_task_prints_a_short_summary():
    task = quote_task()
    text = repr(task)
    assert text.startswith(f"Task('closing-quote': {task.n_prompts} prompts, ")
    assert len(text) < 300 and str(task) == text
    assert task.prompts[1][:30] not in text  # not every prompt


def test_load_sae_on_a_runs_cache_folder_lists_the_sae_folders(tmp_path):
    a = save_sae(random_sae(), tmp_path / "key" / HOOK / "sae")
    b = save_sae(random_sae(hook_point="blocks.0.mlp.hook_post"), tmp_path / "key" / "blocks.0.mlp.hook_post" / "sae")
    assert find_sae_folders(tmp_path / "key") == sorted([a, b])
    with pytest.raises(SAEError, match=r"is not an SAE folder but holds 2 below it: .*blocks\.0\.mlp\.hook_post/sae, "
                                       r".*blocks\.1\.mlp\.hook_post/sae; pass one of them"):
        load_sae(tmp_path / "key")
    assert load_sae(a).hook_point == HOOK


def test_result_objects_display_themselves():
    from saecircuits.analysis.ablations.feature_effects import feature_effects
    from saecircuits.analysis.ablations.multi_feature import ablate_features
    from saecircuits.analysis.quality.reconstruction import reconstruction_at_prediction
    from saecircuits.analysis.readouts.dla import direct_logit_attribution

    model, sae, task = tiny_neo(), random_sae(), quote_task()
    dla = direct_logit_attribution(model, task)
    df = dla.to_pandas()
    assert set(df.component) == set(dla.labels)
    row = df.iloc[0]  # largest |mean| first
    j = dla.labels.index(row.component)
    assert row["mean"] == pytest.approx(float(dla.mean[j])) and abs(row["mean"]) == pytest.approx(
        float(dla.mean.abs().max()))
    html = dla._repr_html_()
    assert "<table" in html and "Direct logit attribution to the answer" in html
    assert len(dla.figure().data[0].x) == len(dla.labels)

    rec = reconstruction_at_prediction(model, sae, task)
    rdf = rec.to_pandas().set_index("quantity")
    assert rdf.loc["loss, clean (nats)", "value"] == pytest.approx(float(rec.clean_loss.mean()))
    lr = rec.loss_recovered_zero
    if lr.defined:
        assert rdf.loc["loss recovered vs zero ablation", "value"] == pytest.approx(lr.value)
    else:  # a random tiny model: ablating the layer may not clearly hurt; NaN with the reason, in the title too
        assert math.isnan(rdf.loc["loss recovered vs zero ablation", "value"])
        assert rdf.loc["loss recovered vs zero ablation", "note"] == lr.reason and lr.reason in rec._repr_html_()
    assert len(rec.figure().data[0].y) == 3 + (rec.mean_loss is not None)  # no mean ablation without mean_act

    eff = feature_effects(model, sae, task)
    assert eff.to_pandas().equals(eff.summary())
    assert "Exact single-feature ablation at P" in eff._repr_html_()
    top = [int(k) for k in eff.summary().feature[:2]]
    abl = ablate_features(model, sae, task, top)
    adf = abl.to_pandas().set_index("measure")
    assert adf.loc["logprob_diff", "mean"] == pytest.approx(float(abl.per_prompt["logprob_diff"].mean()))
    assert abl.figure().data[0].type == "histogram"


def test_repr_html_escapes_strings():
    from saecircuits.analysis.readouts.boosts import PromptBoosts, TokenValue

    pb = PromptBoosts(feature=3, prompt_indices=[0], clean_logprob=torch.zeros(1), ablated_logprob=torch.zeros(1),
                      boosts=torch.zeros(1), masked=torch.zeros(1, dtype=torch.bool),
                      boosted=[TokenValue(1, "<script>alert(1)</script>", 0.5)], deboosted=[],
                      answer_logprob_clean=-0.1, answer_logprob_ablated=-0.2)
    html = pb._repr_html_()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.slow
def test_pipeline_supported_multi_set_task_activations_auto_layers_and_reused_metrics(tmp_path):
    from saecircuits.pipeline import RunConfig, run_pipeline
    from saecircuits.report.summary import supported

    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    cfg = dict(model="tiny-neo", data=corpus, workspace=tmp_path / "ws", closings=('."', '!"', '?"'), sae_tokens=2048,
               expansion_factor=4, sae_batch_size=256, seq_len=32, max_candidates=8, n_example_features=2, n_examples=2,
               n_evidence_features=1, n_geometry_features=0, circuit=False, layers="auto", auto_layers=1, seed=0)
    model = tiny_neo()
    first = run_pipeline(RunConfig(out=tmp_path / "a", **cfg), model=model, progress=False)
    # --layers auto: one SAE, on the MLP layer whose mean ablation at P raises the answer's loss the most (the note
    # lists every layer's increase; tests/test_auto_layers.py checks them against per-prompt hooked forwards)
    import re

    said = dict(re.findall(r"MLP(\d+) ([+-][0-9.]+)", first["notes"][0]))
    best = max(said, key=lambda layer: float(said[layer]))
    assert len(said) == 2 and [s["hook_point"] for s in first["saes"]] == [f"blocks.{best}.mlp.hook_post"]
    assert first["notes"][0].startswith(f"--layers auto chose layer(s) {best}: the 1 MLP layer(s) whose mean ablation")
    sae = first["saes"][0]
    # the multi-ablation set: the largest effects among supported features only
    ranked = sae["top_features"]
    want = [t["feature"] for t in ranked if supported(t["loss_increase"], t["loss_increase_ci95"])][:3]
    sel = sae["multi_ablation_selection"]
    assert sel["n_supported"] == sum(supported(t["loss_increase"], t["loss_increase_ci95"]) for t in ranked)
    assert sae.get("multi_ablation", {}).get("features", []) == want
    # activations at P of the shown features: every active prompt once, matching the ranked table's mean
    for ta in sae["task_activations"]:
        t = next(t for t in ranked if t["feature"] == ta["feature"])
        assert len(ta["values"]) == t["n_prompts"]
        assert sum(ta["values"]) / len(ta["values"]) == pytest.approx(t["mean_activation"], abs=1e-3)
    assert set(sae["training"]["final_metrics"]) >= {"explained_variance_tokens", "shrinkage", "dead_fraction"}
    again = run_pipeline(RunConfig(out=tmp_path / "b", **cfg), model=model, progress=False)
    assert again["saes"][0]["training"]["reused"] is True
    assert again["saes"][0]["training"]["final_metrics"] == sae["training"]["final_metrics"]
    lr = again["saes"][0]["loss_recovered"]  # the same SAE, the same analyses: the same number (or undefined)
    assert lr == sae["loss_recovered"] and (lr is None) == ("loss_recovered_undefined_reason" in sae)


def test_boost_bar_labels_are_the_shared_visible_token_and_escaped_for_plotly():
    """Plotly renders <b>/<br> in category labels: the notebook figures escape them, and show whitespace as the
    report and the console do (visible_token: space -> middle dot, newline -> pilcrow)."""
    pytest.importorskip("plotly")
    from saecircuits.analysis.readouts.boosts import PromptBoosts, TokenValue, WeightBoosts

    hostile = [TokenValue(7, "<b>x</b>", 0.5), TokenValue(8, " said\n", 0.25)]
    wb = WeightBoosts(feature=3, boosts=torch.zeros(9), top=hostile, bottom=[])
    pb = PromptBoosts(feature=3, prompt_indices=[0], clean_logprob=torch.zeros(1), ablated_logprob=torch.zeros(1),
                      boosts=torch.zeros(1), masked=torch.zeros(1, dtype=torch.bool), boosted=hostile, deboosted=[],
                      answer_logprob_clean=-0.1, answer_logprob_ablated=-0.2)
    # by hand: the visible form in typographic quotes, then the id; then html-escaped
    want = ["\u201c&lt;b&gt;x&lt;/b&gt;\u201d (7)", "\u201c\u00b7said\u00b6\u201d (8)"]
    for fig in (wb.figure(), pb.figure()):
        assert list(fig.data[0].x) == want


def test_print_of_a_result_shows_its_table_not_whole_tensors(capsys):
    """Issue 18 kind 10: print(result) dumped every tensor of the dataclass."""
    from helpers import quote_task, random_sae, tiny_neo

    from saecircuits.analysis.ablations.multi_feature import ablate_features
    from saecircuits.analysis.quality.reconstruction import reconstruction_at_prediction

    model, task = tiny_neo(), quote_task()
    sae = random_sae()
    for result in (reconstruction_at_prediction(model, sae, task), ablate_features(model, sae, task, [1, 2])):
        print(result)
        out = capsys.readouterr().out
        assert out.startswith(result.display_title())
        assert "tensor(" not in out and len(out.splitlines()) < 40
        assert result.to_pandas().columns[0] in out
