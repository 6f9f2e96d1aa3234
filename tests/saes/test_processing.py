"""SAEs on hooks whose activations depend on weight processing record the model's switches and are refused on a
model loaded with other ones. The rule (which switches move which hook) is checked against the model's own
activations under each switch."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import HF_BUILDERS, random_sae, tiny_tokenizer

from saecircuits.models.load import load_hf_model
from saecircuits.pipeline import _check_sae_fits
from saecircuits.saes.base import SAEError
from saecircuits.saes.io import load_sae, save_sae
from saecircuits.saes.processing import check_model_processing, processing_switches, record_model_processing

HOOKS = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_pre", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid",
         "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.0.hook_attn_out", "blocks.0.ln2.hook_normalized"]


@functools.cache
def _model(**switches):
    return load_hf_model(HF_BUILDERS["gpt_neo"](seed=4), tiny_tokenizer(), **switches)


def test_the_rule_matches_what_each_switch_changes():
    tokens = torch.tensor([[0, 5, 9, 22, 7, 13]])
    with torch.no_grad():
        _, ref = _model().run_with_cache(tokens)
        for switch in ("fold_ln", "center_writing_weights"):
            _, other = _model(**{switch: False}).run_with_cache(tokens)
            for hook in HOOKS:
                moved = float((ref[hook].float() - other[hook].float()).abs().max()) > 1e-4
                # a hook the rule calls free never moves; a residual hook moves with center_writing_weights
                if moved:
                    assert switch in processing_switches(hook), (hook, switch)
                if hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out")):
                    assert moved == (switch == "center_writing_weights"), (hook, switch)
    assert processing_switches("blocks.0.mlp.hook_post") == ()
    assert processing_switches("blocks.0.hook_resid_post") == ("center_writing_weights",)


def test_resid_sae_records_processing_and_is_refused_on_other_switches(tmp_path):
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(d_in=32, hook_point=hook)
    record_model_processing(sae, _model())
    assert sae.cfg.extra["model_processing"] == {"fold_ln": True, "center_writing_weights": True,
                                                 "center_unembed": True, "fold_value_biases": True}
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.cfg.extra["model_processing"] == sae.cfg.extra["model_processing"]
    _check_sae_fits(loaded, _model())  # same switches
    _check_sae_fits(loaded, _model(fold_ln=False))  # fold_ln does not move the residual stream
    with pytest.raises(SAEError, match=r"loaded with center_writing_weights=True, but this model has "
                                       r"center_writing_weights=False.*--no-center-writing-weights"):
        _check_sae_fits(loaded, _model(center_writing_weights=False))


def test_mlp_post_sae_records_nothing_and_fits_every_load(tmp_path):
    sae = random_sae()
    record_model_processing(sae, _model())
    assert "model_processing" not in sae.cfg.extra
    for switches in ({}, {"fold_ln": False}, {"center_writing_weights": False}):
        check_model_processing(sae, _model(**switches))


def test_an_sae_without_the_record_is_warned_about(caplog):
    sae = random_sae(d_in=32, hook_point="blocks.0.hook_resid_pre")
    with caplog.at_level("WARNING"):
        check_model_processing(sae, _model(center_writing_weights=False))
    assert "does not record it" in caplog.text


def test_training_on_the_model_records_the_processing():
    from saecircuits.saes.trainer import TrainConfig, train_saes_on_model

    model = _model(center_writing_weights=False)
    rows = torch.randint(1, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    saes = train_saes_on_model(model, rows, ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"],
                               TrainConfig(batch_size=32, total_steps=2), expansion_factor=2, progress=False)
    assert saes["blocks.0.hook_resid_post"].cfg.extra["model_processing"]["center_writing_weights"] is False
    assert "model_processing" not in saes["blocks.0.mlp.hook_post"].cfg.extra


def test_center_writing_weights_does_not_count_on_rmsnorm_models():
    # TransformerLens skips centring on RMSNorm models: a raw-model SAE must not be refused for the switch
    import types

    from saecircuits.models import load as load_mod
    from saecircuits.saes.processing import model_processing_of

    prov = load_mod.ModelProvenance(source="x", model_name="x", kind="injected",
                                    processing={"fold_ln": True, "center_writing_weights": True})
    for norm, expected in (("RMS", False), ("RMSPre", False), ("LN", True), ("LNPre", True)):
        model = types.SimpleNamespace(cfg=types.SimpleNamespace(normalization_type=norm))
        setattr(model, load_mod._PROVENANCE_ATTR, prov)
        assert model_processing_of(model)["center_writing_weights"] is expected
