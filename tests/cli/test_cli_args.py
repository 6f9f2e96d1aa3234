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
