"""results.json as typed models (saecircuits.results): lossless round trip of every results dict, typed access, the
shipped JSON Schema and docs/results.md generated from the models (and current), schema versions, issue 16's
"positions" contract."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from test_report_evidence import EVIDENCE
from test_report_study import LAYERS, STUDY

from saecircuits.report.schema import load_results, validate_results
from saecircuits.results import Results, ResultsSchemaError
from saecircuits.results import reference as ref

REPO = Path(__file__).resolve().parents[2]


def _full(results: dict) -> dict:
    """The fixture with every optional SAE key the test suite writes (evidence and study) and a circuit."""
    r = copy.deepcopy(results)
    r["saes"][0].update(copy.deepcopy(EVIDENCE))
    r["saes"][0].update(copy.deepcopy(STUDY))
    r["layer_comparison"] = copy.deepcopy(LAYERS)
    r["circuit"] = copy.deepcopy(CIRCUIT)
    return r


CIRCUIT = {  # pipeline._circuit_summary's keys, as the demo writes them (numbers made up)
    "file": "circuit.json", "metric": "answer log-prob at P (nats)", "n_nodes_total": 3, "n_edges_total": 1,
    "ig_steps": None,
    "selection": {"rule": "smallest size with faithfulness >= 0.8", "n_nodes": 2, "faithfulness": 0.83,
                  "completeness": -0.01, "edge_rule": "|exact edge| >= 0.1 x the largest"},
    "agreement": {"nodes": {"atp": {"n": 3, "top": 3, "spearman": 0.5, "sign_agreement": 1.0, "top_overlap": 1.0,
                                    "top_sign_agreement": None}}},
    "faithfulness": [{"n_nodes": 1, "m_circuit": -4.25, "faithfulness": None, "faithfulness_ci95": [None, None],
                      "undefined_reason": "mean-ablating every node does not lower the log-prob"}],
    "virtual_weights": [{"source": "S0:f1", "target": "S1:f2", "exact": 1.5, "n_prompts": 3, "virtual_raw": 0.25,
                         "virtual_cosine": 0.125}],
    "nodes": [{"id": 0, "label": "embed", "kind": "embed", "layer": -1, "sae": -1, "effect": 1.9, "effect_ci95": 0.2,
               "atp": 0.07, "ig": None, "n_active_prompts": 3, "top_tokens": [], "in_circuit": True}],
    "edges": [{"source": 0, "target": 0, "exact": 2.0, "atp": 1.0, "ig": None, "n_prompts": 3}],
}

# issue 16's reduced copy (/work/wt/I16_CONTRACT.md): every key the contract names, nulls where it allows them
POSITIONS = {
    "target": "log p(answer) at P (nats)", "share": 0.8, "n_prompts": 2, "n_exact_interventions": 40,
    "summary": "most of the evidence comes from the opening quote through L1H3",
    "agreement": {"nodes": {"atp": {"n": 10, "spearman": 0.9}, "ig": {"n": 10, "spearman": None}},
                  "edges": {"atp": {"n": 4, "top_overlap": 0.5}},
                  "by_distance": [{"distance": 0, "n": 5, "spearman": 0.75, "sign": 1.0, "top_k": None},
                                  {"distance": "open_quote", "n": 2, "spearman": None, "sign": None, "top_k": None}]},
    "faithfulness": {"mean": 0.875, "ci95": [0.75, 1.0]}, "completeness": {"mean": None, "ci95": None},
    "aggregated": {
        "columns": ["open_quote", "P-1", "P"],
        "nodes": [{"id": "feature:0:7@P", "kind": "feature", "layer": 0, "column": "P", "label": "S0:f7", "sae": 0,
                   "feature": 7, "head": None, "mean_exact": 0.5, "ci95": [0.25, 0.75], "mean_atp": 0.4,
                   "n_prompts": 2, "in_graph": True},
                  {"id": "head:1:3@open_quote", "kind": "head", "layer": 1, "column": "open_quote", "label": "L1H3",
                   "sae": None, "feature": None, "head": 3, "mean_exact": None, "ci95": None, "mean_atp": 0.1,
                   "n_prompts": 1, "in_graph": False}],
        "edges": [{"src": "head:1:3@open_quote", "dst": "feature:0:7@P", "mean_exact": 0.25, "mean_atp": None,
                   "heads": [{"head": "L1H3", "mean": 0.25}], "in_graph": True},
                  {"src": "feature:0:7@P", "dst": "target", "mean_exact": None, "mean_atp": 0.1, "heads": None,
                   "in_graph": False}],
    },
    "examples": [{
        "prompt_index": 0, "tokens": ["Tom", " said", ",", ' "', "Hi"], "P": 4, "anchors": {"open_quote": 3, "P": 4},
        "nodes": [{"id": "feature:0:7@4", "kind": "feature", "layer": 0, "pos": 4, "label": "S0:f7", "sae": 0,
                   "feature": 7, "head": None, "activation": 2.5, "exact": 0.5, "atp": 0.25, "ig": None,
                   "in_graph": True},
                  {"id": "target:2:0@4", "kind": "target", "layer": 2, "pos": 4, "label": "target", "sae": None,
                   "feature": None, "head": None, "activation": None, "exact": None, "atp": None, "ig": None,
                   "in_graph": True}],
        "edges": [{"src": "feature:0:7@4", "dst": "target:2:0@4", "exact": 0.5, "atp": None,
                   "heads": [{"head": "L1H3", "value": 0.5}], "in_graph": True}],
        "pruning": {"share": 0.8, "node_share_kept": 0.85, "edge_share_kept": 0.9, "n_nodes": 12, "n_edges": 30,
                    "n_nodes_kept": 2, "n_edges_kept": 1, "non_sae_share": 0.0},
    }],
}


def _json(d: dict) -> str:
    """The text the pipeline would write (ints and floats told apart: 3 != 3.0 here)."""
    return json.dumps(d, sort_keys=True, ensure_ascii=False)


@pytest.mark.parametrize("which", ["minimal", "full", "positions"])
def test_every_results_dict_round_trips_exactly(results, which):
    d = {"minimal": lambda: results, "full": lambda: _full(results)}.get(which, lambda: _with_positions(results))()
    d["saes"][0]["l0"] = 24  # an int where a number is expected stays an int (no 24 -> 24.0)
    d["saes"][0]["some_future_key"] = {"kept": [1, 2.5]}  # extra keys are kept, everywhere
    before = copy.deepcopy(d)
    back = Results.model_validate(d).to_json_dict()
    assert back == before and _json(back) == _json(before) and d == before  # the input is not changed
    assert isinstance(back["saes"][0]["l0"], int)
    # pydantic's own dump gives the same dict
    assert Results.model_validate(d).model_dump(mode="json", exclude_unset=True, by_alias=True) == before


def _with_positions(results: dict) -> dict:
    r = _full(results)
    r["circuit"]["positions"] = copy.deepcopy(POSITIONS)
    return r


def test_typed_access_reads_the_same_numbers(results):
    d = _full(results)
    r = Results.model_validate(d)
    sae = r.saes[0]
    assert [t.feature for t in sae.top_features] == [t["feature"] for t in d["saes"][0]["top_features"]]
    assert sae.loss_ci95.zero == d["saes"][0]["loss_ci95"]["zero"]
    assert sae.max_activating_ablation[0].global_.mean == d["saes"][0]["max_activating_ablation"][0]["global"]["mean"]
    assert sae.feature_details[0].prompt_boosts.boosted == d["saes"][0]["feature_details"][0]["prompt_boosts"]["boosted"]
    assert r.dla.labels == d["dla"]["labels"] and r.layer_comparison.runs[1].label == d["layer_comparison"]["runs"][1]["label"]
    assert r.circuit.positions is None  # files written before issue 16 have no "positions"
    assert sae.whole_sequence is None and "whole_sequence" not in r.saes[0].to_json_dict()  # absent stays absent


def test_positions_follow_the_issue_16_contract(results):
    r = Results.model_validate(_with_positions(results))
    pos = r.circuit.positions
    assert pos.completeness.mean is None and pos.faithfulness.ci95 == [0.75, 1.0]
    assert pos.aggregated.nodes[1].sae is None and pos.aggregated.edges[0].heads[0].mean == 0.25
    ex = pos.examples[0]
    assert ex.anchors == {"open_quote": 3, "P": 4} and ex.nodes[1].kind == "target"
    assert pos.agreement.by_distance[1].distance == "open_quote"
    for path, value, expected in [
        (("examples", 0, "nodes", 0, "kind"), "neuron", "['nodes'][0]['kind'] is 'neuron'; it must be"),
        (("examples", 0, "edges", 0, "heads", 0, "value"), "big", "['heads'][0]['value'] must be a number"),
        (("aggregated", "nodes", 0, "ci95"), [0.1], "['aggregated']['nodes'][0]['ci95'] must have exactly 2 items"),
        (("examples", 0, "P"), None, "['examples'][0]['P'] must be an int, got null"),
    ]:
        bad = _with_positions(results)
        target = bad["circuit"]["positions"]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
        with pytest.raises(ResultsSchemaError) as e:
            Results.model_validate(bad)
        assert "results['circuit']['positions']" in str(e.value) and expected in str(e.value)


def test_version_1_is_upgraded_and_other_versions_are_refused_by_name(results, tmp_path):
    v1 = copy.deepcopy(results)
    v1["schema_version"] = 1
    v1["saes"][0]["explained_variance"] = v1["saes"][0].pop("explained_variance_at_p")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(v1), encoding="utf-8")
    r = Results.load(path)
    assert r.schema_version == 2 and r.saes[0].explained_variance_at_p == results["saes"][0]["explained_variance_at_p"]
    assert r.to_json_dict() == results and load_results(path) == results
    with pytest.raises(ResultsSchemaError, match=r"results\['schema_version'\] is 1; .*upgrade it"):
        Results.model_validate(v1)  # model_validate itself reads version 2 only; load / from_dict upgrade
    for version in (0, 3, "2"):
        path.write_text(json.dumps({**results, "schema_version": version}), encoding="utf-8")
        with pytest.raises(ResultsSchemaError, match=rf"results\['schema_version'\] is {version!r}; this saecircuits "
                                                     r"reads versions 1, 2: re-run the pipeline"):
            Results.load(path)


def test_save_is_atomic_and_writes_nan_as_null(results, tmp_path):
    r = Results.model_validate(results)
    r.saes[0].explained_variance_at_p = float("nan")
    out = r.save(tmp_path / "sub" / "results.json")
    back = json.loads(out.read_text(encoding="utf-8"))
    assert back["saes"][0]["explained_variance_at_p"] is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"]
    expected = copy.deepcopy(results)
    expected["saes"][0]["explained_variance_at_p"] = None
    assert back == expected and Results.load(out).to_json_dict() == expected


def test_the_shipped_schema_and_docs_are_generated_from_the_models():
    assert ref.SCHEMA_PATH.read_text(encoding="utf-8") == ref.schema_text(), f"stale: run `{ref.COMMAND}`"
    docs = REPO / "docs" / "results.md"
    assert docs.read_text(encoding="utf-8") == ref.markdown(), f"stale: run `{ref.COMMAND}`"
    assert ref.main(["--check"]) == 0
    # every field is documented (a description with its units/shape), so the reference has no blank cells
    missing = [f"{name}.{key}" for name, d in ref.json_schema()["$defs"].items()
               for key, prop in d.get("properties", {}).items() if not prop.get("description")]
    assert missing == []


def test_check_validates_a_runs_file_naming_every_problem(results, tmp_path, capsys):
    """``python -m saecircuits.results --check FILE|RUN_DIR ...``: a new user expected it to validate a run's file
    (it only compared the generated schema). One line per problem, naming the key; exit 1 when any file fails."""
    run = tmp_path / "run"
    run.mkdir()
    good = run / "results.json"
    good.write_text(json.dumps(results), encoding="utf-8")
    bad_dict = copy.deepcopy(results)
    bad_dict["saes"][0]["l0"] = "23.75"  # two problems, both the schema's (checked against it below when installed)
    del bad_dict["saes"][0]["top_features"][0]["loss_increase"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bad_dict), encoding="utf-8")
    (tmp_path / "torn.json").write_text('{"schema_version": 2, "saes": [', encoding="utf-8")

    assert ref.main(["--check", str(good), str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{good}: valid (results.json schema version 2)", f"{run}: valid (results.json schema version 2)"]

    assert ref.main(["--check", str(good), str(bad), str(tmp_path / "torn.json"), str(tmp_path / "nope.json")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("valid (results.json schema version 2)")
    bad_lines = [line for line in out if line.startswith(f"{bad}: ")]
    assert len(bad_lines) == 2  # each problem its own line, not the first and a count
    assert any("results['saes'][0]['l0']" in line for line in bad_lines)
    assert any("results['saes'][0]['top_features'][0] is missing the required key 'loss_increase'" in line
               for line in bad_lines)
    assert any(line.startswith(f"{tmp_path / 'torn.json'}: not valid JSON") for line in out)
    assert any(line.startswith(f"{tmp_path / 'nope.json'}: no such file") for line in out)
    jsonschema = pytest.importorskip("jsonschema")  # the shipped schema agrees: the good file passes, two errors
    validator = jsonschema.Draft202012Validator(json.loads(ref.SCHEMA_PATH.read_text(encoding="utf-8")))
    assert not list(validator.iter_errors(json.loads(good.read_text(encoding="utf-8"))))
    assert len(list(validator.iter_errors(bad_dict))) == 2


def test_json_schema_accepts_a_results_dict_and_names_the_field_of_a_broken_one(results):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(ref.SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    good = json.loads(json.dumps(_with_positions(results)))  # as read from a file
    assert [e.message for e in validator.iter_errors(good)] == []
    for path, value, field in [
        (("saes", 0, "top_features", 0, "loss_increase"), None, "loss_increase"),  # deleted: required
        (("saes", 0, "l0"), "23.75", "l0"),
        (("dla", "mean", 2), "x", "mean"),
        (("circuit", "positions", "examples", 0, "nodes", 0, "kind"), "neuron", "kind"),
        (("schema_version",), 1, "schema_version"),
    ]:
        bad = copy.deepcopy(good)
        target = bad
        for p in path[:-1]:
            target = target[p]
        if value is None:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        err = jsonschema.exceptions.best_match(validator.iter_errors(bad))
        assert err is not None, path
        where = list(err.absolute_path)
        assert field in err.message or (where and where[-1] == field) or field in map(str, where), (path, err.message)
        # the models refuse the same dict, naming the same key
        with pytest.raises(ResultsSchemaError, match=field):
            validate_results(bad)


def test_validation_is_the_models(results):
    """The dict API (validate_results) and the models give the same verdict and the same message."""
    bad = copy.deepcopy(results)
    bad["saes"][0]["top_features"][1]["fraction_active"] = 1.5
    with pytest.raises(ResultsSchemaError) as a:
        validate_results(bad)
    with pytest.raises(ResultsSchemaError) as b:
        Results.model_validate(bad)
    assert str(a.value) == str(b.value) == "results['saes'][0]['top_features'][1]['fraction_active'] = 1.5 is not in [0, 1]."
    assert math.isnan(Results.model_validate({**results, "timings": {"x": float("nan")}}).timings["x"])


def test_cli_report_reads_through_the_models_and_renders_the_same_page(results, tmp_path):
    """``saecircuits report`` loads with Results.load and renders the dumped dict: the page is the one the dict itself
    gives (every optional section, the circuit with positions, an int where a number is expected, an extra key)."""
    from typer.testing import CliRunner

    import saecircuits.cli.report  # noqa: F401  (registers the sub-command)
    from saecircuits.cli import app
    from saecircuits.report.render import build_report_html
    from saecircuits.report.schema import write_json_atomic

    d = _with_positions(results)
    d["saes"][0]["l0"] = 24
    d["saes"][0]["some_future_key"] = [1, 2]
    src = write_json_atomic(tmp_path / "results.json", d)
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text(encoding="utf-8") == build_report_html(json.loads(src.read_text(encoding="utf-8")))
