"""Command-line argument handling that click does not do by itself."""

from saecircuits.cli import expand_multi_value_options


def test_layers_take_several_values_after_one_flag():
    argv = ["run", "--layers", "0", "1", "--out", "x", "--sae", "a", "b"]
    assert expand_multi_value_options(argv) == [
        "run", "--layers", "0", "--layers", "1", "--out", "x", "--sae", "a", "--sae", "b"]


def test_repeated_form_and_other_options_are_unchanged():
    argv = ["run", "--layers", "0", "--layers", "1", "--seed", "3"]
    assert expand_multi_value_options(argv) == argv


def test_flag_without_value_is_kept_for_click_to_report():
    assert expand_multi_value_options(["run", "--layers", "--out", "x"]) == ["run", "--layers", "--out", "x"]
    assert expand_multi_value_options(["run", "--layers"]) == ["run", "--layers"]


def test_run_and_demo_flags_reach_the_run_config(tmp_path, monkeypatch):
    """Every circuit flag of ``run`` and ``demo`` lands in RunConfig (the pipeline's only input)."""
    from typer.testing import CliRunner

    import saecircuits.cli.run as cli_run
    from saecircuits.cli import app

    seen = []
    monkeypatch.setattr(cli_run, "_execute", lambda cfg, export, resume=False: seen.append(cfg))
    monkeypatch.setattr(cli_run, "_threads", lambda n: None)
    corpus = tmp_path / "stories.txt"
    corpus.write_text('Tom said, "Hi."\n', encoding="utf-8")
    argv = ["run", "--model", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "o"),
            "--workspace", str(tmp_path / "ws")]
    for extra, want in (([], (True, 10, True)), (["--no-circuit"], (False, 10, True)),
                        (["--circuit-ig-steps", "4"], (True, 4, True)), (["--no-position-circuit"], (True, 10, False))):
        result = CliRunner().invoke(app, [*argv, *extra])
        assert result.exit_code == 0, result.output
        assert (seen[-1].circuit, seen[-1].circuit_ig_steps, seen[-1].position_circuit) == want
    result = CliRunner().invoke(app, [*argv, "--circuit-ig-steps", "0"])
    assert result.exit_code == 2 and "circuit-ig-steps" in result.output


def test_demo_uses_the_l1_coefficient_tuned_for_the_embedded_default(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import saecircuits.cli.run as cli_run
    from saecircuits.cli import app
    from saecircuits.models.default import DEMO_L1_COEFFICIENT
    from saecircuits.pipeline import RunConfig

    seen = []
    monkeypatch.setattr(cli_run, "_execute", lambda cfg, export, resume=False: seen.append(cfg))
    monkeypatch.setattr(cli_run, "_threads", lambda n: None)
    argv = ["demo", "--workspace", str(tmp_path / "ws"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert seen[-1].l1_coefficient == DEMO_L1_COEFFICIENT != RunConfig.l1_coefficient
    result = CliRunner().invoke(app, [*argv, "--sae-recipe", "reference", "--l1-coefficient", "0.5", "--no-circuit"])
    assert result.exit_code == 0 and seen[-1].l1_coefficient == 0.5 and seen[-1].circuit is False
    assert seen[-1].position_circuit is True
    result = CliRunner().invoke(app, [*argv, "--no-position-circuit"])
    assert result.exit_code == 0 and seen[-1].circuit is True and seen[-1].position_circuit is False
