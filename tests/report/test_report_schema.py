"""results.json schema v1: validation errors name the key; atomic JSON writing; NaN -> null."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from saecircuits.report import schema
from saecircuits.report.schema import (
    ResultsSchemaError,
    ci_bounds,
    load_results,
    validate_results,
    write_json_atomic,
    write_text_atomic,
)


def _delete(d: dict, path: tuple) -> None:
    for p in path[:-1]:
        d = d[p]
    del d[path[-1]]


def _set(d: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


def test_synthetic_results_validate(results):
    validate_results(results)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("schema_version",), "results is missing the required key 'schema_version'"),
        (("model",), "results is missing the required key 'model'"),
        (("task", "answer_token_ids"), "results['task'] is missing the required key 'answer_token_ids'"),
        (
            ("dla", "completeness_max_abs_error"),
            "results['dla'] is missing the required key 'completeness_max_abs_error'",
        ),
        (
            ("saes", 1, "mean_ablation_loss"),
            "results['saes'][1] is missing the required key 'mean_ablation_loss'",
        ),
        (
            ("saes", 0, "top_features", 2, "loss_increase"),
            "results['saes'][0]['top_features'][2] is missing the required key 'loss_increase'",
        ),
        (
            ("saes", 0, "examples", 1, "examples", 0, "tokens"),
            "results['saes'][0]['examples'][1]['examples'][0] is missing the required key 'tokens'",
        ),
    ],
)
def test_missing_required_key_is_named(results, path, expected):
    _delete(results, path)
    with pytest.raises(ResultsSchemaError) as e:
        validate_results(results)
    assert expected in str(e.value)


def test_optional_keys_may_be_absent(results):
    for key in ("saecircuits_version", "model_info", "timings", "config", "notes"):
        del results[key]
    for key in ("ci95", "answer_logit_mean"):
        del results["dla"][key]
    for key in ("loss_ci95", "loss_recovered_ci95", "multi_ablation", "examples", "training", "architecture"):
        del results["saes"][0][key]
    validate_results(results)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("task", "n_prompts"), "120", "results['task']['n_prompts'] must be an int, got str"),
        (("task", "n_prompts"), 120.0, "results['task']['n_prompts'] must be an int, got float"),
        (("saes", 0, "d_sae"), True, "results['saes'][0]['d_sae'] must be an int, got bool"),
        (("saes", 0, "l0"), "23.75", "results['saes'][0]['l0'] must be a number (or null), got str"),
        (
            ("saes", 0, "clean_loss"),
            False,
            "results['saes'][0]['clean_loss'] must be a number (or null), got bool",
        ),
        (("model",), 3, "results['model'] must be a string, got int"),
        (("dla", "labels"), "embed", "results['dla']['labels'] must be a list, got str"),
        (("dla", "mean", 2), "x", "results['dla']['mean'][2] must be a number"),
        (
            ("saes", 0, "loss_recovered_ci95"),
            [0.9],
            "results['saes'][0]['loss_recovered_ci95'] must have exactly 2",
        ),
        (
            ("saes", 0, "top_features", 0, "loss_increase_ci95"),
            "wide",
            "results['saes'][0]['top_features'][0]['loss_increase_ci95'] must be a CI",
        ),
        (("saes",), {}, "results['saes'] must be a list, got dict"),
        (("timings", "train_sae"), "20 min", "results['timings']['train_sae'] must be a number"),
    ],
)
def test_ill_typed_key_is_named(results, path, value, expected):
    _set(results, path, value)
    with pytest.raises(ResultsSchemaError) as e:
        validate_results(results)
    assert expected in str(e.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ("dla", "mean"),
            [1.0, 2.0],
            "results['dla']['mean'] has 2 items but results['dla']['labels'] has 6",
        ),
        (("dla", "ci95"), [0.1], "results['dla']['ci95'] has 1 items"),
        (("task", "answer_tokens"), ['."', '!"'], "results['task']['answer_tokens'] has 2 items"),
        (("task", "answer_token_ids"), [], "answer_token_ids'] is empty"),
        (
            ("saes", 0, "top_features", 1, "feature"),
            16384,
            "results['saes'][0]['top_features'][1]['feature'] = 16384 is out of range for d_sae = 16384",
        ),
        (("saes", 0, "top_features", 1, "feature"), -1, "out of range"),
        (("saes", 0, "multi_ablation", "features", 0), 99999, "['multi_ablation']['features'][0] = 99999"),
        (
            ("saes", 0, "top_features", 0, "fraction_active"),
            1.5,
            "['fraction_active'] = 1.5 is not in [0, 1]",
        ),
        (
            ("saes", 0, "examples", 0, "examples", 1, "activations"),
            [1.0],
            "['examples'][0]['examples'][1]['activations'] has 1 items but",
        ),
    ],
)
def test_inconsistent_values_are_named(results, path, value, expected):
    _set(results, path, value)
    with pytest.raises(ResultsSchemaError) as e:
        validate_results(results)
    assert expected in str(e.value)


def test_wrong_schema_version_and_non_dict(results):
    results["schema_version"] = 3
    with pytest.raises(ResultsSchemaError, match="reads versions 1, 2: re-run the pipeline"):
        validate_results(results)
    results["schema_version"] = 1  # readable, once upgraded
    with pytest.raises(ResultsSchemaError, match="upgrade it with .*upgrade_results"):
        validate_results(results)
    with pytest.raises(ResultsSchemaError, match="results must be a dict"):
        validate_results([results])


def test_null_floats_and_extra_keys_are_accepted(results):
    results["saes"][0]["loss_ci95"]["clean"] = None
    results["saes"][0]["top_features"][0]["loss_increase_ci95"] = None
    results["saes"][0]["some_future_key"] = {"anything": [1, 2]}
    results["extra_top_level"] = "fine"
    validate_results(results)


def test_write_json_atomic_roundtrip_with_nan_inf_numpy(results, tmp_path):
    results["saes"][0]["explained_variance_at_p"] = float("nan")
    results["saes"][0]["loss_ci95"]["zero"] = float("inf")
    # float32 holds these dyadic values exactly, so the round trip must give them back unchanged.
    results["dla"]["mean"] = np.array(results["dla"]["mean"], dtype=np.float32)
    results["saes"][0]["n_active_features"] = np.int64(311)
    results["saes"][0]["loss_recovered_ci95"] = (0.9412, 0.9788)
    results["timings"]["load_model"] = np.float64(-math.inf)
    out = write_json_atomic(tmp_path / "sub" / "results.json", results)
    assert out == tmp_path / "sub" / "results.json"
    text = out.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["saes"][0]["explained_variance_at_p"] is None
    assert back["saes"][0]["loss_ci95"]["zero"] is None
    assert back["timings"]["load_model"] is None
    assert back["dla"]["mean"] == [0.5, -0.25, 1.75, 0.125, 6.5, -0.0625]
    assert back["saes"][0]["n_active_features"] == 311 and isinstance(
        back["saes"][0]["n_active_features"], int
    )
    assert back["saes"][0]["loss_recovered_ci95"] == [0.9412, 0.9788]
    assert back["saes"][0]["examples"][0]["examples"][1]["tokens"][-1] == "<script>alert(1)</script>"
    assert load_results(out) == back  # and it still validates
    assert os.listdir(out.parent) == ["results.json"]  # no temp files left behind


def _listing(folder):
    return sorted(os.listdir(folder))


def test_atomic_write_unserialisable_object_leaves_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="Cannot write an object of type object"):
        write_json_atomic(path, {"a": 2, "b": object()})
    with pytest.raises(TypeError, match="keys must be str"):
        write_json_atomic(path, {(1, 2): 3})
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["results.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_atomic_write_failure_midway_leaves_no_partial_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"old": True})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(schema.os, failing, boom)
    with pytest.raises(OSError, match=f"simulated {failing} failure"):
        write_json_atomic(path, {"new": list(range(1000))})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["results.json"]
    # A new file that fails to be written does not appear at all.
    monkeypatch.setattr(schema.os, failing, boom)
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "new.html", "<html></html>")
    monkeypatch.undo()
    assert _listing(tmp_path) == ["results.json"]


def test_load_results_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ResultsSchemaError, match="is not valid JSON"):
        load_results(bad)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"schema_version": 1, "model": "m"}), encoding="utf-8")
    with pytest.raises(ResultsSchemaError, match="missing the required key 'task'"):
        load_results(incomplete)
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "absent.json")


def test_ci_bounds():
    assert ci_bounds(1.0, 0.25) == (0.75, 1.25)
    assert ci_bounds(1.0, [0.5, 1.75]) == (0.5, 1.75)
    assert ci_bounds(1.0, None) == (None, None)
    assert ci_bounds(None, 0.1) == (None, None)


def test_token_fields_are_validated(results):
    """Issue 7: token kinds, each example prompt's own answer and the BOS policy are checked when present."""
    results["task"]["example_answers"] = ['."', '."']
    results["task"]["example_answer_ids"] = [526, 526]
    results["task"]["n_dropped_too_long"] = 38
    results["bos_policy"] = {"prepended": True, "token_id": 50256, "token": "<|endoftext|>",
                             "special_token_ids": [50256], "special_positions": "excluded", "statement": "..."}
    ex = results["saes"][0]["examples"][0]["examples"][0]
    ex["token_kinds"] = ["special"] + ["text"] * (len(ex["tokens"]) - 1)
    ex["activations"][0] = None
    validate_results(results)
    for path, value, expected in [
        (("task", "example_answers"), ['."'], "results['task']['example_answers'] has 1 items"),
        (("task", "example_answer_ids"), [1, 2, 3], "results['task']['example_answer_ids'] has 3 items"),
        (("saes", 0, "examples", 0, "examples", 0, "token_kinds"), ["text"], "['token_kinds'] has 1 items"),
        (("saes", 0, "examples", 0, "examples", 0, "token_kinds"), ["bos"] * 8, "holds 'bos'; each kind must be"),
        (("bos_policy", "prepended"), 1, "results['bos_policy']['prepended'] must be true or false"),
        (("bos_policy", "prepended"), False, "'prepended' must be true exactly when 'token_id' is set"),
        (("bos_policy", "special_positions"), "some", "must be 'excluded' or 'included'"),
        (("bos_policy", "token_id"), "50256", "results['bos_policy']['token_id'] must be an int"),
    ]:
        bad = json.loads(json.dumps(results))
        _set(bad, path, value)
        with pytest.raises(ResultsSchemaError) as e:
            validate_results(bad)
        assert expected in str(e.value)
    no_bos = json.loads(json.dumps(results))
    no_bos["bos_policy"].update(prepended=False, token_id=None, token=None)
    validate_results(no_bos)


def test_schema_token_kinds_match_the_token_module():
    from saecircuits.models.tokens import TOKEN_KINDS

    assert schema.TOKEN_KINDS == TOKEN_KINDS


def test_a_version_1_results_file_still_loads_with_each_explained_variance_named(results, tmp_path):
    # issue 18 kind 8: version 1 called both the EV at P (across prompts) and the training EV (over the batch's
    # tokens) "explained_variance"; version 2 names each, and a version-1 file is read by renaming them
    import copy

    from saecircuits.report.render import build_report_html
    from saecircuits.report.schema import SCHEMA_VERSION, load_results, upgrade_results

    assert SCHEMA_VERSION == 2
    v1 = copy.deepcopy(results)
    v1["schema_version"] = 1
    sae = v1["saes"][0]
    sae["explained_variance"] = sae.pop("explained_variance_at_p")
    sae["training"]["final_metrics"] = {"l0": 35.0, "explained_variance": 0.9069}
    before = copy.deepcopy(v1)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(v1), encoding="utf-8")
    loaded = load_results(path)
    assert loaded["schema_version"] == 2
    assert loaded["saes"][0]["explained_variance_at_p"] == 0.8123 and "explained_variance" not in loaded["saes"][0]
    assert loaded["saes"][0]["training"]["final_metrics"] == {"l0": 35.0, "explained_variance_tokens": 0.9069}
    assert upgrade_results(v1) == loaded and v1 == before  # the caller's dict is not changed
    # the renderer takes a version-1 dict too, and shows both numbers under their names
    page = build_report_html(v1)
    assert 'explained variance at P (across prompts)</td><td class="l">0.8123' in page
    assert "0.9069" in page and page == build_report_html(loaded)

