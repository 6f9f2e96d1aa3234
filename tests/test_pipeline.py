"""End-to-end pipeline on a tiny random GPT-Neo: results.json is valid and agrees with independent computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import STORIES, exact_sae, tiny_neo

from saecircuits.data.corpus import read_documents
from saecircuits.pipeline import PipelineError, RunConfig, run_pipeline
from saecircuits.report.schema import validate_results
from saecircuits.results import Results
from saecircuits.saes.io import save_sae


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    return path


def _cfg(tmp_path, corpus, **kw) -> RunConfig:
    base = dict(model="tiny-neo", data=corpus, out=tmp_path / "out", workspace=tmp_path / "ws",
                closings=('."', '!"', '?"'), sae_tokens=2048, sae_batch_size=256, seq_len=32, expansion_factor=4,
                max_candidates=5, n_example_features=2, n_examples=2, seed=0)
    base.update(kw)
    return RunConfig(**base)


def _shipped_schema_accepts(results: dict) -> None:
    """The package's results.schema.json accepts ``results`` (when jsonschema is installed: the dev extra)."""
    try:
        import jsonschema
    except ImportError:
        return
    from saecircuits.results.reference import SCHEMA_PATH

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    assert [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(results)] == []


def _answer_loss_by_hand(model, token_ids, answer_id) -> float:
    """-log p(answer | prompt) from one unbatched forward pass of the raw tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids]))[0, -1]
    return float(-torch.log_softmax(logits.double(), -1)[answer_id])


def test_pipeline_trains_saes_writes_valid_results_and_report(tmp_path, corpus, monkeypatch):
    import saecircuits.analysis.circuit as circuit_mod
    import saecircuits.models.hooks as hooks

    # spy: the circuit stage batches no corpus document (its means come from the corpus statistics pass's sums,
    # over every document that pass read), so it encodes none
    in_circuit, batched, passes = [], [], []
    real_rows, real_find = hooks.row_batches, circuit_mod.find_circuit

    def rows_spy(rows, *a, **kw):  # the prompts are batched too: only the corpus rows themselves count
        batched.extend([rows is in_circuit[-1]] if in_circuit else [])
        return real_rows(rows, *a, **kw)

    def find_spy(*a, **kw):
        passes.append((kw["corpus_stats"], len(kw["corpus_rows"])))
        in_circuit.append(kw["corpus_rows"])
        try:
            return real_find(*a, **kw)
        finally:
            in_circuit.pop()

    monkeypatch.setattr(hooks, "row_batches", rows_spy)
    monkeypatch.setattr(circuit_mod, "find_circuit", find_spy)
    model = tiny_neo()
    results = run_pipeline(_cfg(tmp_path, corpus), model=model, progress=False)
    assert len(passes) == 1 and batched and not any(batched)
    stats, n_rows = passes[0]
    assert stats.n_docs == n_rows and {"hook_embed", "blocks.0.attn.hook_z"} <= set(stats.hook_sums)
    out = tmp_path / "out"
    on_disk = json.loads((out / "results.json").read_text())
    validate_results(on_disk)
    # the typed models read a real results.json (circuit included) and give back exactly the file's text
    typed = Results.model_validate(on_disk)
    assert json.dumps(typed.to_json_dict(), indent=1, ensure_ascii=False) + "\n" == (out / "results.json").read_text()
    assert typed.circuit is not None and typed.saes[1].error_dla.labels == on_disk["saes"][1]["error_dla"]["labels"]
    _shipped_schema_accepts(on_disk)
    assert (out / "report.html").stat().st_size > 100_000  # plotly.js inlined
    assert [s["hook_point"] for s in on_disk["saes"]] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert on_disk["dla"]["completeness_max_abs_error"] < 1e-3

    # The clean answer loss in results.json equals the mean of unbatched forward passes done here.
    from saecircuits.tasks.closing_quote import closing_quote_task

    task = closing_quote_task(STORIES * 3, model.tokenizer, closings=('."', '!"', '?"'))
    assert on_disk["task"]["n_prompts"] == task.n_prompts
    by_hand = sum(_answer_loss_by_hand(model, t, a) for t, a in zip(task.token_ids, task.answer_ids, strict=True)) / task.n_prompts
    for sae in on_disk["saes"]:
        assert sae["clean_loss"] == pytest.approx(by_hand, abs=1e-4)
        assert sae["d_sae"] == 4 * sae["d_in"]
    assert results["saes"][0]["training"]["reused"] is False

    # Per-feature evidence is there, and the SAE-error DLA splits the MLP's DLA exactly (reconstruction + error = MLP).
    layer1 = on_disk["saes"][1]
    mlp, rec, err = layer1["error_dla"]["mean"]
    assert rec + err == pytest.approx(mlp, abs=1e-4)
    assert "upstream_ablation" in layer1 and "upstream_ablation" not in on_disk["saes"][0]
    assert {d["feature"] for d in layer1["feature_details"]} <= {f["feature"] for f in layer1["top_features"]}
    # the circuit across positions (issue 16): whole in circuit.json, pruned examples in results.json
    positions = json.loads((out / "circuit.json").read_text())["positions"]
    assert positions["n_prompts"] == on_disk["task"]["n_prompts"] and positions["examples"]
    kept = on_disk["circuit"]["positions"]["examples"][0]
    assert kept["nodes"] and all(n["in_graph"] for n in kept["nodes"])

    # A second run reuses the cached SAEs.
    again = run_pipeline(_cfg(tmp_path, corpus, out=tmp_path / "out2"), model=model, progress=False)
    assert again["saes"][0]["training"]["reused"] is True
    assert again["saes"][1]["loss_recovered"] == pytest.approx(results["saes"][1]["loss_recovered"], abs=1e-9)


def _clean_by_hand(model, task):
    """(top-1 hits, losses) of unbatched forward passes of the raw tokens, one prompt at a time."""
    hits, losses = [], []
    for ids, answer in zip(task.token_ids, task.answer_ids, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].double()
        hits.append(int(logits.argmax()) == answer)
        losses.append(float(-torch.log_softmax(logits, -1)[answer]))
    return hits, losses


def test_exact_sae_on_a_random_model_reports_undefined_loss_recovered_and_warns(tmp_path, corpus, capsys):
    """tiny_neo is random: zero ablation at P does not clearly hurt (undefined loss recovered, no interval) and the
    model does not perform the behaviour; both are warnings in results.json, the console and the report."""
    from saecircuits.cli.run import _summary
    from saecircuits.tasks.closing_quote import closing_quote_task

    model = tiny_neo()
    folder = save_sae(exact_sae(), tmp_path / "exact")
    results = run_pipeline(_cfg(tmp_path, corpus, sae_paths=[folder]), model=model, progress=False)
    (sae,) = results["saes"]
    assert sae["sae_loss"] == pytest.approx(sae["clean_loss"], abs=1e-6)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    validate_results(on_disk)
    sae = on_disk["saes"][0]
    assert sae["loss_recovered"] is None and "loss_recovered_ci95" not in sae
    assert sae["loss_recovered_undefined_reason"]
    assert "loss_recovered_undefined_zero" in sae["failed_checks"]

    # independent: the model's top-1 accuracy and mean loss from unbatched passes
    task = closing_quote_task(STORIES * 3, model.tokenizer, closings=('."', '!"', '?"'))
    hits, losses = _clean_by_hand(model, task)
    b = on_disk["behaviour"]
    assert b["top1_accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-9) and b["performs"] is False
    assert b["mean_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    ids = [(c["scope"], c["id"]) for c in on_disk["checks"]]
    assert ("task", "behaviour_not_performed") in ids and (sae["hook_point"], "loss_recovered_undefined_zero") in ids
    assert all(c["what_to_try"] for c in on_disk["checks"])

    _summary(on_disk)
    printed = capsys.readouterr().out
    assert "does NOT perform the behaviour" in printed and "undefined" in printed
    assert "checks:" in printed and "try:" in printed and "WARNING blocks.1.mlp.hook_post" in printed
    assert "WARNING [task] the model does not perform" in printed  # the scope is text, not rich markup
    html = (tmp_path / "out" / "report.html").read_text()
    assert "The model does not perform the behaviour" in html and "undefined: " in html
    assert html.count("the feature ranking of this SAE cannot support a conclusion") == 2  # summary + ranking


def test_jsonl_task_the_model_does_not_perform_is_flagged(tmp_path, corpus):
    """Issue 7 item 8b: a JSONL task whose answer the model does not predict (checked by hand first)."""
    model = tiny_neo()
    prompts = ['Tom said, "I want to play', "Once upon a time, there was a little girl named", 'Mom said, "Go to bed']
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": " dog"}) + "\n" for p in prompts))
    from saecircuits.tasks.jsonl import jsonl_task

    task = jsonl_task(path, model.tokenizer)
    hits, losses = _clean_by_hand(model, task)
    assert not any(hits)  # the precondition, by hand: " dog" is never the top prediction
    folder = save_sae(exact_sae(), tmp_path / "exact")
    results = run_pipeline(_cfg(tmp_path, corpus, task=str(path), sae_paths=[folder]), model=model, progress=False)
    b = results["behaviour"]
    assert b["n_prompts"] == 3 and b["top1_accuracy"] == 0.0 and b["performs"] is False
    assert b["mean_loss"] == pytest.approx(sum(losses) / 3, abs=1e-4)
    assert b["mean_p_answer"] == pytest.approx(sum(math.exp(-x) for x in losses) / 3, abs=1e-5)
    (check,) = [c for c in results["checks"] if c["id"] == "behaviour_not_performed"]
    assert check["scope"] == "task" and "0.0%" in check["message"] and "answer token" in check["what_to_try"]


def test_exact_sae_on_the_default_model_recovers_all_loss_and_passes_the_checks(tmp_path):
    """The shipped default on its own stories performs the behaviour; an exact SAE recovers exactly 1."""
    from saecircuits.data.storygen import write_corpus
    from saecircuits.models.default import shipped_model_dir
    from saecircuits.models.load import load_model
    from saecircuits.tasks.closing_quote import closing_quote_task

    model = load_model(shipped_model_dir())
    corpus = write_corpus(tmp_path / "stories.txt", 60, seed=11)
    hook = "blocks.1.mlp.hook_post"
    folder = save_sae(exact_sae(d_in=int(model.cfg.d_mlp), hook_point=hook), tmp_path / "exact")
    cfg = _cfg(tmp_path, corpus, sae_paths=[folder], closings=('."',), max_prompts=40, n_stat_docs=40,
               feature_selection=3, n_evidence_features=0, n_example_features=1)
    results = run_pipeline(cfg, model=model, progress=False)
    (sae,) = results["saes"]
    assert sae["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert sae["loss_recovered_ci95"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert sae["loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=1e-5)
    # over every position of the prompts too: the exact SAE changes nothing
    assert sae["whole_sequence"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert sae["whole_sequence"]["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert sae["whole_sequence"]["ce_sae"] == pytest.approx(sae["whole_sequence"]["ce_clean"], abs=1e-5)
    # every reconstruction check passes; the exact SAE's features are the MLP's neurons, which are dense, and the
    # density check says so
    assert sae["failed_checks"] in ([], ["dense_top_features"])
    assert [c["id"] for c in results["checks"]] == sae["failed_checks"]
    task = closing_quote_task(read_documents(corpus), model.tokenizer, max_prompts=40)
    hits, losses = _clean_by_hand(model, task)
    b = results["behaviour"]
    assert b["n_prompts"] == len(hits) and b["performs"] is True
    assert b["top1_accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-9)
    assert b["mean_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)


def test_sae_that_does_not_fit_the_hook_is_a_clear_error(tmp_path, corpus):
    wrong_width = save_sae(exact_sae(d_in=10), tmp_path / "w")
    with pytest.raises(PipelineError, match="d_in=10"):
        run_pipeline(_cfg(tmp_path, corpus, sae_paths=[wrong_width]), model=tiny_neo(), progress=False)
    unknown = save_sae(exact_sae(hook_point="blocks.7.mlp.hook_post"), tmp_path / "u")
    with pytest.raises(PipelineError, match="blocks.7.mlp.hook_post"):
        run_pipeline(_cfg(tmp_path, corpus, sae_paths=[unknown]), model=tiny_neo(), progress=False)


def test_layers_out_of_range_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(PipelineError, match="out of range"):
        run_pipeline(_cfg(tmp_path, corpus, layers=[5]), model=tiny_neo(), progress=False)


def test_bad_settings_are_refused_before_any_work(tmp_path, corpus):
    with pytest.raises(PipelineError, match="max-prompts"):
        _cfg(tmp_path, corpus, max_prompts=0)
    with pytest.raises(PipelineError, match="--layers chooses"):
        _cfg(tmp_path, corpus, layers=[0], sae_paths=[tmp_path])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PipelineError, match="is a file"):
        _cfg(tmp_path, corpus, out=tmp_path / "afile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without CUDA")
def test_missing_cuda_is_a_clear_error_and_leaves_no_output_folder(tmp_path, corpus):
    with pytest.raises(PipelineError, match="no CUDA"):
        run_pipeline(_cfg(tmp_path, corpus, device="cuda"), model=tiny_neo(), progress=False)
    assert not (tmp_path / "out").exists()


def test_pipeline_runs_the_rest_of_the_reference_study(tmp_path, corpus):
    """The study keys are there, consistent with the first-slice numbers, and shown in the report."""
    model = tiny_neo()
    # the reference recipe's SAEs give both layers a multi-ablation set on this tiny corpus (the layer comparison
    # needs two); the TopK default's 8-step SAEs may leave a layer without supported features
    results = run_pipeline(_cfg(tmp_path, corpus, n_max_act_stories=3, sae_recipe="reference"), model=model,
                           progress=False)
    validate_results(results)
    html = (tmp_path / "out" / "report.html").read_text()
    for sae in results["saes"]:
        lc = sae["loss_comparison"]
        clean, mean, zero, feats, spliced = lc["mean"]
        assert clean == pytest.approx(sae["clean_loss"], abs=1e-5)
        assert spliced == pytest.approx(sae["sae_loss"], abs=1e-5)
        assert zero == pytest.approx(sae["zero_ablation_loss"], abs=1e-5)
        assert mean == pytest.approx(sae["mean_ablation_loss"], abs=1e-5)
        assert lc["features"] == sae.get("multi_ablation", {}).get("features", [])
        cs = sae["corpus_stats"]
        # every listed feature (ranked, then any other with a recorded effect) has its card's statistics; the two
        # top-ranked ones also their stories and band examples
        listed = list(dict.fromkeys([f["feature"] for f in sae["top_features"]]
                                    + [e["feature"] for e in sae["feature_effects"]]))
        assert [f["feature"] for f in cs["features"]] == listed and len(listed) > 2
        assert [f["feature"] for f in cs["features"] if "band_examples" in f] == listed[:2]
        assert all(f["top_examples"] for f in cs["features"] if f["fire_count"])
        assert cs["n_docs"] == results["corpus"]["n_docs"]
        assert sum(cs["l0_counts"]) == cs["n_tokens"]
        modes = sae["ablation_modes"]
        by_feature = {f["feature"]: f for f in sae["top_features"]}
        for row in modes["rows"]:
            assert row["residual"]["mean"] == pytest.approx(by_feature[row["feature"]]["loss_increase"], abs=1e-5)
        assert sae["feature_effects_info"]["ablation_mode"] == "residual"
        assert sae["feature_effects_info"]["off_range"]["floor"] == pytest.approx(-0.17004, abs=1e-4)
        for st in sae["max_activating_ablation"]:
            assert st["n_stories"] <= 3 and len(st["stories"]) == st["n_stories"]
        sid = f"sae-{results['saes'].index(sae)}"
        for slug in ("corpus", "fiveway", "modes", "stories", "geometry", "span"):
            assert f'id="{sid}-{slug}"' in html
    layers = results["layer_comparison"]
    assert [r["label"] for r in layers["runs"]][-1] == "all together"
    for r, sae in zip(layers["runs"], results["saes"], strict=False):
        assert r["loss_increase"]["mean"] == pytest.approx(sae["multi_ablation"]["loss_increase"]["mean"], abs=1e-5)
    assert 'id="layers"' in html


def test_pipeline_records_the_ablation_mode(tmp_path, corpus):
    results = run_pipeline(_cfg(tmp_path, corpus, ablation_mode="clean_effect", n_evidence_features=1,
                                n_max_act_stories=2), model=tiny_neo(), progress=False)
    for sae in results["saes"]:
        assert sae["feature_effects_info"]["ablation_mode"] == "clean_effect"
        assert sae["loss_comparison"]["mode"] == "clean_effect"
        if "multi_ablation" in sae:
            assert sae["multi_ablation"]["mode"] == "clean_effect"
        assert all(st["mode"] == "clean_effect" for st in sae["max_activating_ablation"])
    assert results["corpus"]["ablation_mode"] == "clean_effect"
    with pytest.raises(PipelineError, match="ablation-mode"):
        _cfg(tmp_path, corpus, ablation_mode="zero")


# ---------------------------------------------------------------------------------------------------------------
# Tokens in results.json and the report (issue 7 items 3, 4, 5, 6, 12)


def test_each_example_prompt_shows_its_own_answer(tmp_path, corpus):
    from saecircuits.report.render import build_report_html

    records = [
        {"prompt": 'Tom said, "I like the dog', "answer": '."'},
        {"prompt": 'Sue said, "Stop', "answer": '!"'},
        {"prompt": 'The cat said, "Can I play', "answer": '?"'},
        {"prompt": "Mom", "answer": " said"},
    ]
    task_file = tmp_path / "answers.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    folder = save_sae(exact_sae(), tmp_path / "exact")
    results = run_pipeline(_cfg(tmp_path, corpus, task=str(task_file), sae_paths=[folder]), model=tiny_neo(),
                           progress=False)
    task = results["task"]
    assert task["example_prompts"] == [r["prompt"] for r in records]
    assert task["example_answers"] == [r["answer"] for r in records]  # not the first answer for every prompt
    tok = tiny_neo().tokenizer
    assert task["example_answer_ids"] == [tok(r["answer"], add_special_tokens=False)["input_ids"][0] for r in records]
    page = build_report_html(results)
    for r, shown in zip(records, ['.&quot;', '!&quot;', '?&quot;', "\u00b7said"], strict=True):
        prompt = r["prompt"].replace('"', "&quot;")
        assert f'<div class="prompt">{prompt}<mark class="answer"><bdi class="tokstr">{shown}</bdi></mark></div>' in page


def test_all_closings_examples_and_bos_policy(tmp_path, corpus):
    folder = save_sae(exact_sae(), tmp_path / "exact")
    results = run_pipeline(_cfg(tmp_path, corpus, sae_paths=[folder]), model=tiny_neo(), progress=False)
    task = results["task"]
    docs = STORIES * 3
    # every prompt + its own answer is the start of a story, and the closings differ between prompts
    for prompt, answer in zip(task["example_prompts"], task["example_answers"], strict=True):
        assert any(d.startswith(prompt + answer) for d in docs) and answer in ('."', '!"', '?"')
    assert len(set(task["example_answers"])) > 1
    assert task["n_dropped_too_long"] == 0
    bos = results["bos_policy"]
    assert (bos["prepended"], bos["token_id"], bos["token"]) == (True, 0, "<|endoftext|>")
    assert bos["special_positions"] == "excluded" and bos["special_token_ids"] == [0]
    assert "starts with the tokenizer's BOS token '<|endoftext|>' (id 0)" in bos["statement"]
    for sae in results["saes"]:
        for fe in sae.get("examples", []):
            for ex in fe["examples"]:
                assert len(ex["token_kinds"]) == len(ex["tokens"])
                # BOS is marked, never a value
                for kind, value, token in zip(ex["token_kinds"], ex["activations"], ex["tokens"], strict=True):
                    assert (kind == "special") == (token == "<|endoftext|>")
                    if kind == "special":
                        assert value != value or value is None  # NaN (null in results.json)


def test_over_long_prompts_are_dropped_and_counted(tmp_path):
    from helpers import STORIES as S

    long_story = 'Tom said, "' + "the dog ran and " * 40 + 'it was fun." The end.'
    path = tmp_path / "long.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in [*S * 3, long_story]), encoding="utf-8")
    folder = save_sae(exact_sae(), tmp_path / "exact")
    model = tiny_neo()
    results = run_pipeline(_cfg(tmp_path, path, sae_paths=[folder]), model=model, progress=False)
    assert results["task"]["n_dropped_too_long"] == 1
    assert any("1 prompt was longer than 128 tokens" in n for n in results["notes"])


def test_tokenizer_without_bos_end_to_end(tmp_path):
    from helpers import no_bos_folder

    from saecircuits.models.load import load_model
    from saecircuits.report.render import build_report_html

    model = load_model(no_bos_folder(tmp_path / "nobos"))
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n\n".join(["a b c d e f g said the .", "h i j k the a b said .", "m n o a b c d ."] * 4))
    task_file = tmp_path / "t.jsonl"
    task_file.write_text("".join(json.dumps({"prompt": p, "answer": " d"}) + "\n" for p in ["a b c", "c b a", "o n"]))
    folder = save_sae(exact_sae(d_in=32, hook_point="blocks.0.mlp.hook_post"), tmp_path / "exact")
    results = run_pipeline(_cfg(tmp_path, corpus, task=str(task_file), sae_paths=[folder]), model=model,
                           progress=False)
    bos = results["bos_policy"]
    assert (bos["prepended"], bos["token_id"], bos["token"]) == (False, None, None)
    assert "has no BOS token, so nothing is prepended" in bos["statement"]
    assert results["task"]["example_answer_ids"] == [3, 3, 3]
    (sae,) = results["saes"]
    assert sae["sae_loss"] == pytest.approx(sae["clean_loss"], abs=1e-5)
    assert any(fe["examples"] for fe in sae["examples"])
    for fe in sae["examples"]:
        for ex in fe["examples"]:
            assert "special" not in ex["token_kinds"] and "[UNK]" not in ex["tokens"]  # no phantom BOS shown
    assert "has no BOS token" in build_report_html(results)


def test_a_broken_sae_folder_fails_before_the_model_loads(tmp_path, corpus, monkeypatch):
    import saecircuits.models.load as load_mod
    from saecircuits.saes.base import SAEError

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "cfg.json").write_text("{not json", encoding="utf-8")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the SAE files were read")

    monkeypatch.setattr(load_mod, "load_model", no_model)
    with pytest.raises((SAEError, ValueError)) as err:
        run_pipeline(_cfg(tmp_path, corpus, sae_paths=[folder]), progress=False)
    assert not isinstance(err.value, AssertionError) and "broken" in str(err.value)


def test_an_sae_that_records_another_model_is_flagged(tmp_path, corpus):
    """Issue 18 kind 10: the model an SAE records (cfg.json model_name) is compared with the loaded one."""
    import dataclasses

    model = tiny_neo()
    other = exact_sae()
    other.cfg = dataclasses.replace(other.cfg, model_name="gpt2")
    same = exact_sae()
    same.cfg = dataclasses.replace(same.cfg, model_name="tiny-neo")
    cfg = _cfg(tmp_path, corpus, sae_paths=[save_sae(other, tmp_path / "other")], circuit=False,
               n_evidence_features=0)
    results = run_pipeline(cfg, model=model, progress=False)
    (check,) = [c for c in results["checks"] if c["id"] == "sae_model_mismatch"]
    assert "'gpt2'" in check["message"] and "'tiny-neo'" in check["message"]
    assert "sae_model_mismatch" in results["saes"][0]["failed_checks"]
    validate_results(json.loads((tmp_path / "out" / "results.json").read_text()))
    cfg = _cfg(tmp_path, corpus, sae_paths=[save_sae(same, tmp_path / "same")], circuit=False, n_evidence_features=0,
               out=tmp_path / "out2")
    results = run_pipeline(cfg, model=model, progress=False)
    assert "sae_model_mismatch" not in results["saes"][0]["failed_checks"]


def test_every_listed_feature_gets_density_top_tokens_and_top_examples(tmp_path, corpus):
    """Issue 18 kind 10: the browser had full cards for 6 of 191 features. A feature outside the top ones gets its
    density and top examples, checked against the SAE's activations computed here, document by document."""
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.report.browser import browser_payload
    from saecircuits.saes.io import load_sae

    model = tiny_neo()
    results = run_pipeline(_cfg(tmp_path, corpus, n_example_features=1, circuit=False, n_evidence_features=0),
                           model=model, progress=False)
    sae_entry = results["saes"][1]
    cs = {f["feature"]: f for f in sae_entry["corpus_stats"]["features"]}
    k = next(f for f in cs if f != sae_entry["top_features"][0]["feature"] and cs[f]["fire_count"])
    sae = load_sae(Path(sae_entry["training"]["cache"]) / sae_entry["hook_point"] / "sae")
    special = special_token_ids(model.tokenizer)
    docs = encode_documents(model.tokenizer, read_documents(corpus), max_len=int(model.cfg.n_ctx))
    acts = []
    with torch.no_grad():
        for d in docs:
            _, cache = model.run_with_cache(torch.tensor([d]), names_filter=[sae.hook_point])
            f = sae.encode(cache[sae.hook_point][0])[:, k]
            acts.append(f[torch.tensor([t not in special for t in d])])
    a = torch.cat(acts)
    assert cs[k]["density"] == pytest.approx(float((a > 0).double().mean()), abs=1e-6)
    assert cs[k]["top_examples"][0]["max_activation"] == pytest.approx(float(a.max()), abs=1e-3)
    assert cs[k]["top_tokens"]
    # the browser: every listed feature has a card with its statistics and examples, and search text
    payload = browser_payload(results)["saes"][1]
    card = payload["cards"][str(k)]
    assert card["cs"]["density"] == pytest.approx(cs[k]["density"], rel=1e-3) and card["ex"]
    assert all(row[6] for row in payload["rows"] if cs.get(row[0], {}).get("top_tokens"))


def test_no_position_circuit_and_a_task_file_with_anchors_on_some_lines(tmp_path, corpus):
    """--no-position-circuit: circuit.json has the circuit at P but no "positions", and says why; the report still
    renders. A task file where 1 of 3 lines names anchors is accepted with a note counting the 2 without."""
    model = tiny_neo()
    lines = [{"prompt": 'Tom said, "I want to play', "answer": '."', "anchors": {"speaker": 0}},
             {"prompt": 'Mom said, "Go to bed', "answer": '."'},
             {"prompt": 'Sue said, "Look at the dog', "answer": '."'}]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    folder = save_sae(exact_sae(), tmp_path / "exact")
    said: list[str] = []
    results = run_pipeline(_cfg(tmp_path, corpus, task=str(path), sae_paths=[folder], position_circuit=False),
                           model=model, progress=False, log=said.append)
    out = tmp_path / "out"
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["nodes"] and "positions" not in circuit
    assert "--no-position-circuit" in circuit["positions_left_out"]
    assert "positions" not in results["circuit"]
    assert any("--no-position-circuit" in n for n in results["notes"])
    assert not any(s.startswith("circuit across positions") for s in said)  # position_circuit was not run
    assert (out / "report.html").stat().st_size > 100_000
    validate_results(json.loads((out / "results.json").read_text()))
    # the anchors note: counted from the file (2 lines without "anchors"), said at once and kept in the notes
    (note,) = [n for n in results["notes"] if '"anchors"' in n]
    assert note.startswith("2 of 3 prompts") and "distance from P" in note
    assert any(s == f"note: {note}" for s in said)
    from saecircuits.pipeline.task import _anchors_note
    from saecircuits.tasks.jsonl import jsonl_task

    for every in (True, False):  # all lines or none with anchors: no note
        path.write_text("".join(json.dumps({**r, "anchors": {"speaker": 0}} if every else
                                           {k: v for k, v in r.items() if k != "anchors"}) + "\n" for r in lines))
        assert _anchors_note(jsonl_task(path, model.tokenizer)) is None
