"""Gemma 2 and Gemma 3 (text) on the prefix-cached engine, exactly.

Tiny random models built from their ``transformers`` configs (2 layers, d_model 64, GQA, sliding window 8 on layer 0,
global layer 1; Gemma 2 with attention and final-logit soft caps, Gemma 3 with q/k norms and a local rope base), with
random ``(1 + w)`` norm offsets so folding them matters. The references are independent of the engine: the
TransformerBridge's own hooks, one-prompt unpadded bridge forwards, and a plain Hugging Face forward with the SAE edit
applied by a forward pre-hook on the MLP's ``down_proj`` (the input of ``W_out`` is ``blocks.1.mlp.hook_post``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import STORIES, engine_hooks_and_logits, random_sae, tiny_tokenizer, token_rows

from saecircuits.models.engine import Engine
from saecircuits.models.hooks import answer_metrics, row_batches
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.models.load import load_hf_model
from saecircuits.models.tokens import pad_right

WINDOW = 8
LENGTHS = [7, 30, 19, 25]  # every row but the first crosses the 8-token window
HOOK = "blocks.1.mlp.hook_post"
D_MLP = 128


def tiny_gemma_hf(version: int, seed: int = 0):
    """A fresh tiny random Gemma 2 or Gemma 3 (text) causal LM, HF only (no download)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=D_MLP, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=WINDOW,
        query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"], bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )
    if version == 2:  # small caps, so both soft caps bend the numbers visibly
        cfg, cls = Gemma2Config(**common, attn_logit_softcapping=4.0, final_logit_softcapping=6.0), Gemma2ForCausalLM
    else:
        cfg, cls = Gemma3TextConfig(**common, rope_local_base_freq=100.0), Gemma3ForCausalLM
    torch.manual_seed(seed)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))  # the (1 + w) offsets: non-trivial, so folding matters
            else:
                p.mul_(3.0)
    return hf


@functools.cache
def tiny_gemma(version: int):
    """The processed bridge (load_hf_model's default switches) of :func:`tiny_gemma_hf`."""
    return load_hf_model(tiny_gemma_hf(version), tiny_tokenizer(), model_name=f"tiny-gemma{version}")


VERSIONS = [2, 3]


def _all_hooks(model) -> list[str]:
    from saecircuits.models.engine import layer_hook_names

    names = ["hook_embed"]
    for layer in range(model.cfg.n_layers):
        names += [n for n in layer_hook_names(layer) if n in model.hook_dict]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_hook_equals_the_bridge_on_a_padded_batch(version):
    model = tiny_gemma(version)
    engine = Engine.from_bridge(model)
    assert engine.layers[0].window == WINDOW and engine.layers[1].window is None
    assert engine.embed_scale == pytest.approx(64**0.5)
    rows = token_rows(LENGTHS, seed=1)
    tokens, _ = pad_right(rows, pad_id=0)
    names = _all_hooks(model)
    assert {"blocks.0.ln1_post.hook_scale", "blocks.1.ln2_post.hook_normalized"} <= set(names)
    got, logits = engine_hooks_and_logits(engine, tokens, names)
    assert set(got) == set(names)  # every hook the bridge has, the engine fires
    for b, row in enumerate(rows):
        n = len(row)
        with torch.no_grad():
            ref_logits, cache = model.run_with_cache(torch.tensor([row]))
        torch.testing.assert_close(logits[b, :n], ref_logits[0], atol=2e-5, rtol=0)
        for name in names:
            mine = got[name][b]
            if name.endswith("hook_pattern"):
                mine = mine[:, :n, :n]
            elif name.endswith(("hook_q_normed", "hook_k_normed")):  # head-first, as the bridge fires them
                mine = mine[:, :n]
            else:
                mine = mine[:n]
            torch.testing.assert_close(mine, cache[name][0], atol=3e-5, rtol=1e-5, msg=f"gemma{version} {name} {b}")


SWITCHES = [dict(fold_ln=True), dict(fold_ln=False, center_writing_weights=False, center_unembed=False)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("switches", SWITCHES, ids=["default", "none"])
def test_engine_log_probs_equal_plain_transformers(version, switches):
    """The engine on the processed (or raw) bridge gives the unprocessed HF model's log-probs, past the window."""
    raw = tiny_gemma_hf(version)
    rows = token_rows([12, 30], seed=2)
    tokens, _ = pad_right(rows, pad_id=0)
    with torch.no_grad():
        ref = raw(tokens).logits.log_softmax(-1)
    bridge = load_hf_model(tiny_gemma_hf(version), tiny_tokenizer(), **switches)
    engine = Engine.from_bridge(bridge)  # its own check runs 16 tokens, past the window of 8
    with torch.no_grad():
        mine = engine.logits(engine.forward_tokens(tokens))[:, 0].log_softmax(-1)
    for b, row in enumerate(rows):
        torch.testing.assert_close(mine[b, : len(row)], ref[b, : len(row)], atol=5e-5, rtol=0)


def test_gemma2_load_says_center_unembed_is_off_and_records_it(caplog):
    with caplog.at_level("WARNING", logger="saecircuits.models.load"):
        bridge = load_hf_model(tiny_gemma_hf(2), tiny_tokenizer())
    assert any("center_unembed is off" in r.getMessage() for r in caplog.records)
    from saecircuits.models.load import model_provenance

    assert model_provenance(bridge).processing["center_unembed"] is False


def test_a_wrong_window_is_refused_by_the_load_check():
    from saecircuits.models.engine import EngineError

    model = tiny_gemma(2)
    engine = Engine.from_bridge(model)
    assert engine.check_against(model) < 1e-4  # its default length runs 16 tokens past the window of 8
    engine.layers[0].window = None  # pretend layer 0 were global: the default check must notice
    with pytest.raises(EngineError, match="differ from the Hugging Face model"):
        engine.check_against(model)


def test_the_load_check_unembeds_only_the_last_positions(monkeypatch):
    """A long window with a large vocabulary (Gemma 2: 4,096 and 256,000) must not make [tokens, d_vocab] logits:
    the check asks the Hugging Face forward for its last 24 positions only, and crosses the window with them."""
    model = tiny_gemma(2)
    hf = model.original_model
    seen = []
    forward = hf.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((args[0].shape[-1] if args else kwargs["input_ids"].shape[-1], out.logits.shape[1]))
        return out

    monkeypatch.setattr(hf, "forward", spy)
    Engine.from_bridge(model, check=False).check_against(model, seq_len=60)
    assert seen == [(60, 24)]


def _reference(model, row, answer, hook, fn):
    """One prompt, unpadded, through the bridge with ``fn`` applied at the last position of ``hook``."""
    p = len(row) - 1

    def edit(value, hook=None):
        new = value.clone()
        new[0, p] = fn(value[0, p])
        return new

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([row]), fwd_hooks=[(hook, edit)])
    return {k: float(v[0]) for k, v in answer_metrics(logits[:, p], torch.tensor([answer])).items()}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("hook", ["blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "blocks.1.attn.hook_v"])
def test_prefix_cached_edits_equal_full_forwards_past_the_window(version, hook):
    model = tiny_gemma(version)
    iv = interventions_for(model)
    assert iv.backend == "engine"
    rows = token_rows([9, 30, 23, 2], seed=5)
    answers = [5, 17, 200, 33]
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8))
    clean = iv.clean(batch)
    fns = [lambda x: torch.zeros_like(x), lambda x: 2.0 * x]
    for fn in fns:
        logits, _ = iv.run(clean, [Edit(hook, lambda xb, fn=fn: fn(xb))])
        m = answer_metrics(logits, batch.answer_ids)
        for b, i in enumerate(batch.indices):
            ref = _reference(model, rows[i], answers[i], hook, fn)
            for name in ("loss", "logprob", "logit"):
                got = float(m[name][b, 0])
                assert abs(got - ref[name]) <= 2e-5 * max(1.0, abs(ref[name])), (name, got, ref[name])


def _quote_task():
    from saecircuits.tasks.closing_quote import closing_quote_task

    return closing_quote_task(STORIES, tiny_tokenizer(), closings=('."', '!"', '?"'))


@pytest.mark.parametrize("version", VERSIONS)
def test_exact_feature_effects_equal_a_plain_hf_forward_edited_at_down_proj(version):
    from saecircuits.analysis.ablations.feature_effects import feature_effects

    model = tiny_gemma(version)
    sae = random_sae(d_in=D_MLP, d_sae=48, hook_point=HOOK, seed=3)
    task = _quote_task()
    fx = feature_effects(model, sae, task)
    assert len(fx.prompt) > 10
    raw = tiny_gemma_hf(version)
    W_dec = sae.W_dec.detach()
    checked = 0
    for j in range(0, len(fx.prompt), max(1, len(fx.prompt) // 12)):
        i, k = int(fx.prompt[j]), int(fx.feature[j])
        ids, answer = task.token_ids[i], task.answer_ids[i]
        p = len(ids) - 1

        def edit(module, args, k=k, p=p):
            x = args[0].clone()
            x[0, p] = x[0, p] - sae.encode(x[0, p])[k] * W_dec[k]
            return (x,)

        with torch.no_grad():
            clean = raw(torch.tensor([ids])).logits[0, p].double().log_softmax(-1)[answer]
            handle = raw.model.layers[1].mlp.down_proj.register_forward_pre_hook(edit)
            try:
                ablated = raw(torch.tensor([ids])).logits[0, p].double().log_softmax(-1)[answer]
            finally:
                handle.remove()
        assert float(fx.logprob_diff[j]) == pytest.approx(float(clean - ablated), abs=2e-5)
        checked += 1
    assert checked >= 10


def test_dla_sums_to_the_pre_cap_logit():
    """Gemma 2 caps its logits: DLA attributes the pre-cap logit, and its components sum to it exactly."""
    from saecircuits.analysis.readouts.dla import direct_logit_attribution

    model = tiny_gemma(2)
    task = _quote_task()
    dla = direct_logit_attribution(model, task)
    assert dla.max_abs_error < 1e-4
    # the pre-cap logit, independently: the raw HF model's final hidden state through lm_head, without the cap
    raw = tiny_gemma_hf(2)
    for i in range(task.n_prompts):
        ids, answer = task.token_ids[i], task.answer_ids[i]
        with torch.no_grad():
            h = raw.model(torch.tensor([ids])).last_hidden_state[0, -1]
            pre = float(raw.lm_head(h)[answer])
            capped = float(raw(torch.tensor([ids])).logits[0, -1, answer])
        assert float(dla.per_prompt[i].sum()) == pytest.approx(pre, abs=1e-4)
        assert capped == pytest.approx(6.0 * torch.tanh(torch.tensor(pre / 6.0)).item(), abs=1e-5)
        assert abs(pre - capped) > 1e-3 or abs(pre) < 0.5  # the cap is not a no-op here


def test_whole_run_with_the_circuit_on_a_tiny_gemma2_folder(tmp_path):
    """A saved tiny Gemma 2 loaded from its folder, as ``saecircuits run --model FOLDER`` does: every stage, the
    circuit included, on the engine; DLA complete against the pre-cap logit."""
    from saecircuits.pipeline import RunConfig, run_pipeline
    from saecircuits.report.schema import validate_results
    from saecircuits.saes.io import save_sae

    folder = tmp_path / "gemma2"
    tiny_gemma_hf(2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    saes = [save_sae(random_sae(d_in=D_MLP, d_sae=48, hook_point=f"blocks.{i}.mlp.hook_post", seed=i),
                     tmp_path / f"sae{i}") for i in (0, 1)]
    cfg = RunConfig(model=str(folder), data=corpus, out=tmp_path / "out", workspace=tmp_path / "ws",
                    closings=('."', '!"', '?"'), sae_paths=saes, seq_len=32, max_candidates=5,
                    n_example_features=2, n_examples=2, seed=0)
    results = run_pipeline(cfg, progress=False)
    validate_results(results)
    assert results["model_info"]["architecture"] == "Gemma2ForCausalLM"
    assert results["interventions"]["backend"] == "engine"
    assert results["dla"]["completeness_max_abs_error"] < 1e-4
    assert results["dla"]["logit_soft_cap"] == 6.0 and results["dla"]["of"] == "pre-cap answer logit"
    assert results["circuit"]["nodes"], "the circuit ran"
    assert results["provenance"]["processing"]["center_unembed"] is False
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<b>pre-cap</b> answer logit" in html


@pytest.mark.parametrize("version", VERSIONS)
def test_readouts_pass_the_post_mlp_norm_exactly(version):
    """SAE-error DLA's MLP row equals DLA's MLP component (read at hook_mlp_out, after ln2_post); the activation-
    scaled DLA of all features sums to the reconstruction row (b_dec = 0); top-N selection runs."""
    from saecircuits.analysis.ablations.feature_effects import feature_effects
    from saecircuits.analysis.readouts.dla import direct_logit_attribution
    from saecircuits.analysis.readouts.error_dla import sae_error_dla
    from saecircuits.analysis.readouts.scaled_dla import activation_scaled_dla

    model = tiny_gemma(version)
    task = _quote_task()
    sae = random_sae(d_in=D_MLP, d_sae=48, hook_point=HOOK, seed=3)
    with torch.no_grad():
        sae.b_dec.zero_()
    err = sae_error_dla(model, sae, task)
    dla = direct_logit_attribution(model, task)
    mlp1 = dla.per_prompt[:, dla.labels.index("MLP1")]
    torch.testing.assert_close(err.per_prompt[:, 0], mlp1, atol=1e-5, rtol=0)
    scaled = activation_scaled_dla(model, sae, task)
    assert float(scaled.scaled_ln.sum()) == pytest.approx(float(err.per_prompt[:, 1].mean()), abs=1e-5)
    top = feature_effects(model, sae, task, features=2)
    assert top.selection == "top_2_dla" and len(top.prompt) > 0


def test_weight_boosts_equal_the_raw_hf_weights():
    """Per-unit boosts of a feature = its decoder row through down_proj, (1 + w) of post_feedforward_layernorm and
    of the final norm, and lm_head, all from the unprocessed Hugging Face weights (Gemma 2: W_U is not centred)."""
    from saecircuits.analysis.readouts.boosts import weight_logit_boosts

    model = tiny_gemma(2)
    sae = random_sae(d_in=D_MLP, d_sae=48, hook_point=HOOK, seed=3)
    raw = tiny_gemma_hf(2)
    layer = raw.model.layers[1]
    with torch.no_grad():
        v = sae.W_dec[5] @ layer.mlp.down_proj.weight.T
        v = v * (1 + layer.post_feedforward_layernorm.weight) * (1 + raw.model.norm.weight)
        expected = v @ raw.lm_head.weight.T
    got = weight_logit_boosts(model, sae, 5).boosts
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_pattern_at_p_under_the_prefix_is_the_bridges_query_row(version):
    """The soft-capped, windowed attention row at P, recomputed under the cached prefix after an edit, equals the
    full edited bridge forward's row (layer 0 is the sliding layer: keys more than 8 back get 0)."""
    model = tiny_gemma(version)
    iv = interventions_for(model)
    rows = token_rows([9, 30, 23], seed=6)
    answers = [5, 17, 200]
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8))
    clean = iv.clean(batch)
    hooks = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    edit = ("blocks.0.hook_resid_pre", lambda x: 1.5 * x)
    _, reads = iv.run(clean, [Edit(edit[0], edit[1])], read=hooks)
    for b, i in enumerate(batch.indices):
        p = len(rows[i]) - 1
        store = {}

        def at_p(value, hook=None, p=p):
            new = value.clone()
            new[0, p] = edit[1](value[0, p])
            return new

        def grab(value, hook, store=store, p=p):
            store[hook.name] = value[0, :, p].clone()

        with torch.no_grad():
            model.run_with_hooks(torch.tensor([rows[i]]), fwd_hooks=[(edit[0], at_p)] + [(h, grab) for h in hooks])
        for h in hooks:
            torch.testing.assert_close(reads[h][b, 0][:, : p + 1], store[h], atol=1e-5, rtol=0, msg=h)
        if p >= WINDOW:
            assert float(reads[hooks[0]][b, 0][:, : p + 1 - WINDOW].abs().sum()) == 0.0
