"""GPT-NeoX (Pythia), GPT-J, Qwen 3, OLMo 2 and Qwen 2 on the prefix-cached engine, exactly (issue 15).

Each architecture is a tiny random model built from its ``transformers`` config (2 layers, d_model 64, the test
tokenizer; no download). Three independent references:

- every hook the engine fires equals the TransformerBridge's on a right-padded batch;
- prefix-cached interventions at P (engine) equal the bridge backend's full forwards on right-padded prompts
  longer than the sliding window (Qwen 2/3 use an 8-token window on layer 1);
- the exact feature effects of an SAE on ``blocks.1.mlp.hook_post`` equal a plain Hugging Face forward (a fresh
  copy of the model, never bridged) with the ablation applied at the input of the MLP's down projection by a
  forward pre-hook.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import engine_hooks_and_logits, quote_task, random_sae, tiny_tokenizer, token_rows

from saecircuits.models.engine import Engine, layer_hook_names
from saecircuits.models.hooks import answer_metrics, at_query, row_batches
from saecircuits.models.interventions import Edit, interventions_for
from saecircuits.models.load import load_hf_model, model_provenance
from saecircuits.models.tokens import pad_right

WINDOW = 8
LENGTHS = [7, 30, 23, 17]  # beyond the 8-token sliding window


def _common(**kw):
    return dict(vocab_size=len(tiny_tokenizer()), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                tie_word_embeddings=False, **kw)


def pythia_hf(seed: int = 0):
    """GPT-NeoX as Pythia: parallel attention + MLP, a quarter of each head rotated (rotary_pct), biases."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**_common(intermediate_size=128), rotary_pct=0.25, use_parallel_residual=True,
                        hidden_dropout=0.0, attention_dropout=0.0)
    return _init(GPTNeoXForCausalLM, cfg, seed)


def qwen3_hf(seed: int = 0):
    """Qwen 3: RMSNorm on each head's queries and keys, GQA, layer 1 sliding-window."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**_common(intermediate_size=96), num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                      sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"])
    return _init(Qwen3ForCausalLM, cfg, seed)


def olmo2_hf(seed: int = 0):
    """OLMo 2: norms after attention and after the MLP (none before), q/k RMSNorms over the whole projection."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(**_common(intermediate_size=96), num_key_value_heads=2)
    return _init(Olmo2ForCausalLM, cfg, seed)


def qwen2_hf(seed: int = 0):
    """Qwen 2: q/k/v biases, GQA, layer 1 sliding-window."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**_common(intermediate_size=96), num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"])
    return _init(Qwen2ForCausalLM, cfg, seed)


def gptj_hf(seed: int = 0):
    """GPT-J: parallel block with one norm for attention and MLP, rotary on adjacent pairs of 8 of 16 dims."""
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(vocab_size=len(tiny_tokenizer()), n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=128,
                     n_positions=128, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _init(GPTJForCausalLM, cfg, seed)


def _init(cls, cfg, seed: int):
    torch.manual_seed(seed)
    hf = cls(cfg).eval()
    with torch.no_grad():  # visible logits; non-trivial norm weights and biases, so every term matters
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return hf


BUILDERS = {"pythia": pythia_hf, "gptj": gptj_hf, "qwen3": qwen3_hf, "olmo2": olmo2_hf, "qwen2": qwen2_hf}


def down_proj(hf, layer: int):
    """The Hugging Face module whose input is TransformerLens's ``blocks.L.mlp.hook_post``."""
    if hasattr(hf, "gpt_neox"):
        return hf.gpt_neox.layers[layer].mlp.dense_4h_to_h
    if hasattr(hf, "transformer"):  # GPT-J
        return hf.transformer.h[layer].mlp.fc_out
    return hf.model.layers[layer].mlp.down_proj


@functools.cache
def bridge(arch: str):
    return load_hf_model(BUILDERS[arch](), tiny_tokenizer())


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_engine_runs_the_architecture_and_every_hook_equals_the_bridge(arch):
    model = bridge(arch)
    iv = interventions_for(model)
    assert iv.backend == "engine", iv.reason
    engine = iv.engine
    rows = token_rows(LENGTHS, seed=1)
    tokens, _ = pad_right(rows, pad_id=0)
    names = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
    names += [n for layer in range(2) for n in layer_hook_names(layer) if n in model.hook_dict]
    names = [n for n in names if n in model.hook_dict and not (n.endswith("pre_linear") and not model.cfg.gated_mlp)]
    expected = {"pythia": "blocks.1.ln2.hook_scale", "gptj": "blocks.1.ln1.hook_scale", "qwen3": "blocks.1.attn.hook_q_normed",
                "olmo2": "blocks.1.ln2_post.hook_normalized", "qwen2": "blocks.1.attn.hook_rot_k"}[arch]
    assert expected in names
    got, logits = engine_hooks_and_logits(engine, tokens, names)
    assert set(got) == set(names)
    for b, row in enumerate(rows):
        n = len(row)
        with torch.no_grad():
            ref_logits, cache = model.run_with_cache(torch.tensor([row]))
        torch.testing.assert_close(logits[b, :n], ref_logits[0], atol=3e-5, rtol=0)
        for name in names:
            if name not in cache.keys():  # in hook_dict but never fired by the bridge (GPT-NeoX's hook_rot_q)
                continue
            mine = at_query(got[name][b : b + 1], name)[:, :n]  # pattern and per-head q/k norms: head first
            mine = mine[..., :n] if name.endswith("hook_pattern") else mine
            torch.testing.assert_close(mine, at_query(cache[name], name), atol=3e-5, rtol=1e-5,
                                       msg=f"{arch} {name} row {b}")


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_prefix_cached_edits_equal_full_forwards_past_the_window(arch):
    model = bridge(arch)
    fast, slow = interventions_for(model), interventions_for(model, backend="bridge")
    assert fast.backend == "engine" and slow.backend == "bridge"
    rows = token_rows(LENGTHS, seed=4)
    answers = torch.randint(1, 300, (len(rows),), generator=torch.Generator().manual_seed(3)).tolist()
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8))
    sae = random_sae(d_in=int(model.cfg.d_mlp), d_sae=96, hook_point="blocks.0.mlp.hook_post", seed=2)
    feats = torch.arange(3)

    def ablate_each(x):  # [B, F, d] -> [B, 3, d]: one feature per variant
        f = sae.encode(x).expand(-1, 3, -1)[..., feats]  # [B, 3, 3]
        return x - torch.einsum("bvk,kd->bvd", f * torch.eye(3), sae.W_dec.detach()[feats])

    def kill_head(z):
        z = z.clone()
        z[..., 1, :] = 0
        return z

    # Qwen 3's per-head hook_k_normed is head-first ([batch, head, pos, d_head]) on both backends
    post = {"pythia": "blocks.0.ln2.hook_normalized", "gptj": "blocks.0.ln1.hook_normalized",
            "qwen3": "blocks.1.attn.hook_k_normed",
            "olmo2": "blocks.0.ln1_post.hook_normalized", "qwen2": "blocks.1.attn.hook_v"}[arch]
    cases = [
        ([Edit("blocks.0.mlp.hook_post", ablate_each)], 3, ["blocks.1.hook_resid_pre"]),
        ([Edit("blocks.1.attn.hook_z", kill_head)], 1, ["blocks.1.mlp.hook_post"]),
        ([Edit(post, lambda x: 0.5 * x)], 1, ["ln_final.hook_scale"]),
        ([Edit("blocks.1.mlp.hook_post", lambda x: -x), Edit("blocks.0.hook_resid_pre", lambda x: 1.5 * x)], 1, []),
    ]
    if arch in ("olmo2", "qwen3"):
        cases.append(([Edit("blocks.1.attn.hook_q_normed", lambda x: 0.7 * x)], 1, ["blocks.0.attn.hook_k_normed"]))
    for edits, V, read in cases:
        outs = []
        for iv in (fast, slow):
            clean = iv.clean(batch)
            outs.append(iv.run_paired(clean, edits, n_variants=V, read=read))
        for a, b in zip(outs[0], outs[1], strict=True):
            if isinstance(a, dict):
                for k in a:
                    torch.testing.assert_close(a[k], b[k], atol=3e-5, rtol=1e-5, msg=f"{arch} {k}")
            else:
                torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5, msg=f"{arch} {edits[0].hook}")
        m = answer_metrics(outs[0].logits[:, 0], batch.answer_ids)
        assert torch.isfinite(m["loss"]).all()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_feature_effects_equal_a_plain_hugging_face_forward(arch):
    from saecircuits.analysis.ablations.feature_effects import feature_effects

    model = bridge(arch)
    assert interventions_for(model).backend == "engine"
    hook = "blocks.1.mlp.hook_post"
    sae = random_sae(d_in=int(model.cfg.d_mlp), d_sae=48, hook_point=hook, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.0)  # many features active at P
    task = quote_task()
    eff = feature_effects(model, sae, task, max_tokens=200, max_batch=4)
    assert eff.prompt.numel() >= 10
    raw = BUILDERS[arch]()  # same seed, never bridged
    W_dec = sae.W_dec.detach()

    def loss(i: int, k: int | None) -> float:
        p = task.prediction_pos[i]

        def pre(module, args):
            x = args[0].clone()
            f = sae.encode(x[0, p])
            x[0, p] = x[0, p] - f[k] * W_dec[k]
            return (x,)

        handle = down_proj(raw, 1).register_forward_pre_hook(pre) if k is not None else None
        try:
            with torch.no_grad():
                logits = raw(torch.tensor([task.token_ids[i]])).logits[0, p]
        finally:
            if handle is not None:
                handle.remove()
        return float(-logits.double().log_softmax(-1)[task.answer_ids[i]])

    for j in range(0, eff.prompt.numel(), max(1, eff.prompt.numel() // 8)):
        i, k = int(eff.prompt[j]), int(eff.feature[j])
        ref = loss(i, k) - loss(i, None)
        assert float(eff.loss_increase[j]) == pytest.approx(ref, abs=2e-5), (arch, i, k)


def test_olmo2_loads_without_folding_its_post_norms_and_says_so(caplog):
    """TransformerLens cannot fold OLMo 2's norms (they follow attention and the MLP): the model loads with
    fold_ln off, one logged line, and the provenance records the switches actually applied."""
    import logging

    with caplog.at_level(logging.WARNING, logger="saecircuits.models.load"):
        model = load_hf_model(olmo2_hf(seed=1), tiny_tokenizer())
    assert model_provenance(model).processing["fold_ln"] is False
    assert model_provenance(model).processing["center_unembed"] is True
    notes = [r.getMessage() for r in caplog.records if "fold_ln off" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    Engine.from_bridge(model)  # the engine applies the unfolded norms and passes its check


def test_bloom_alibi_falls_back_with_a_one_line_note(caplog):
    """An architecture the engine cannot compute (BLOOM: ALiBi positions) runs on the bridge, noted once."""
    import logging

    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=len(tiny_tokenizer()), hidden_size=64, n_layer=2, n_head=4, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    model = load_hf_model(_init(BloomForCausalLM, cfg, 0), tiny_tokenizer())
    with caplog.at_level(logging.WARNING, logger="saecircuits.models.interventions"):
        iv = interventions_for(model)
    assert iv.backend == "bridge" and iv.reason
    notes = [r.getMessage() for r in caplog.records if "full bridge forwards" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]


def test_the_circuit_on_the_bridge_fallback_equals_the_engines():
    """Exact effects, attribution patching and integrated gradients (gradients at P from full forwards with
    autograd on) on the bridge backend equal the engine's, on tiny Pythia with two SAEs."""
    from helpers import analyses_on_backend

    from saecircuits.analysis.circuit import find_circuit

    model, task = bridge("pythia"), quote_task()
    d_mlp = int(model.cfg.d_mlp)
    saes = [random_sae(d_in=d_mlp, d_sae=32, hook_point=f"blocks.{layer}.mlp.hook_post", seed=layer)
            for layer in (0, 1)]
    task = task.subset(range(4))
    results = {}
    for backend in ("engine", "bridge"):
        with analyses_on_backend(model, backend):
            results[backend] = find_circuit(model, saes, task, ig_steps=2, ig_edge_targets=2, sizes=[1, 3],
                                            progress=False)
    fast, slow = results["engine"], results["bridge"]
    assert [n.label for n in fast.nodes] == [n.label for n in slow.nodes]
    for a, b in ((fast.exact, slow.exact), (fast.atp, slow.atp), (fast.ig, slow.ig)):
        torch.testing.assert_close(a.node_effect, b.node_effect, atol=2e-5, rtol=1e-4)
        assert a.edges.keys() == b.edges.keys()
        for k in a.edges:
            va, vb = (a.edges[k][0], b.edges[k][0]) if isinstance(a.edges[k], tuple) else (a.edges[k], b.edges[k])
            assert va == pytest.approx(vb, abs=2e-5, rel=1e-4), k
    assert (fast.atp.node_effect.abs() > 1e-4).sum() >= 3  # the gradients are not all zero


@pytest.mark.parametrize("backend", ["engine", "bridge"])
def test_a_whole_run_with_the_circuit_on_tiny_pythia(tmp_path, backend):
    """``run_pipeline`` with two SAEs and the circuit on tiny Pythia: on the engine, and forced onto the bridge
    fallback (where multi-variant edits on two SAEs used to crash and the circuit was skipped)."""
    import json

    from helpers import STORIES, analyses_on_backend

    from saecircuits.pipeline import RunConfig, run_pipeline
    from saecircuits.report.schema import validate_results
    from saecircuits.saes.io import save_sae

    model = load_hf_model(pythia_hf(seed=2), tiny_tokenizer())
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    d_mlp = int(model.cfg.d_mlp)
    folders = [save_sae(random_sae(d_in=d_mlp, d_sae=48, hook_point=f"blocks.{layer}.mlp.hook_post", seed=layer),
                        tmp_path / f"sae{layer}") for layer in (0, 1)]
    cfg = RunConfig(model="tiny-pythia", data=corpus, out=tmp_path / "out", workspace=tmp_path / "ws",
                    closings=('."', '!"', '?"'), sae_paths=folders, max_candidates=5, n_example_features=2,
                    n_examples=2, n_evidence_features=2, n_stat_docs=12, circuit_ig_steps=2, seed=0)
    with analyses_on_backend(model, backend):
        results = run_pipeline(cfg, model=model, progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    validate_results(on_disk)
    assert on_disk["interventions"]["backend"] == backend
    assert on_disk["dla"]["completeness_max_abs_error"] < 1e-3
    assert results["circuit"]["file"] == "circuit.json" and (tmp_path / "out" / "circuit.json").is_file()
    assert len(on_disk["saes"]) == 2
    noted = [n for n in on_disk["notes"] if "full model forwards" in n]
    assert len(noted) == (backend == "bridge")


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_dla_components_sum_to_the_answer_logit(arch):
    """Parallel blocks write the same components; OLMo 2's heads go through ln1_post at its cached scale. The
    check is independent: the components plus the readout constant equal the clean answer logit per prompt."""
    from saecircuits.analysis.readouts.dla import direct_logit_attribution

    res = direct_logit_attribution(bridge(arch), quote_task())
    assert res.max_abs_error < 1e-4, arch
    assert float(res.per_prompt.abs().max()) > 0.1  # components carry real logits


@pytest.mark.parametrize("arch", ["pythia", "gptj"])
@pytest.mark.parametrize("layer", [0, 1])
def test_dfa_of_a_parallel_block_reads_resid_pre(arch, layer):
    """In a parallel block the MLP of layer L reads resid_pre_L: its own layer's heads are not components (GPT-J:
    through ln1, its one norm). Independent check: the zero-variant DFA sums to ((norm_out @ W_in) * active) @
    W_enc[:, k] from the cache."""
    from saecircuits.analysis.ablations.feature_effects import feature_activations
    from saecircuits.analysis.readouts.dfa import dfa_component_labels, direct_feature_attribution

    model, task = bridge(arch), quote_task()
    hook = f"blocks.{layer}.mlp.hook_post"
    sae = random_sae(d_in=int(model.cfg.d_mlp), d_sae=32, hook_point=hook, seed=3)
    labels = dfa_component_labels(model, layer)
    assert f"L{layer}H0" not in labels and (layer == 0 or "L0H0" in labels)
    acts = feature_activations(model, sae, task).dense()
    k = int(torch.argmax((acts > 0).sum(0)))
    res = direct_feature_attribution(model, sae, task, k, acts=acts)
    assert len(res.prompt_indices) >= 2
    assert res.max_completeness_error < 1e-4
    W_in = model.W_in[layer]
    for row, i in enumerate(res.prompt_indices[:3]):
        _, cache = model.run_with_cache(torch.tensor([task.token_ids[i]]))
        normed = cache[f"blocks.{layer}.{'ln1' if arch == 'gptj' else 'ln2'}.hook_normalized"][0, -1]
        post = cache[hook][0, -1]
        expected = (((normed @ W_in) * (post > 0)) @ sae.W_enc[:, k]).detach()
        assert abs(float(res.per_prompt[row].sum()) - float(expected)) < 1e-4


def test_olmo2_mlp_readouts_go_through_the_norm_on_the_mlp_output():
    """OLMo 2 adds ln2_post(h W_out) to the residual stream. Independent reference: the final-norm readout of the
    cached hook_mlp_out at P. The SAE-error DLA's MLP row equals it; the activation-scaled DLA of a b_dec-free SAE
    sums to the reconstruction row; the weight boosts are the post-norm direction at unit scale."""
    from saecircuits.analysis.readouts.boosts import weight_logit_boosts
    from saecircuits.analysis.readouts.error_dla import sae_error_dla
    from saecircuits.analysis.readouts.scaled_dla import activation_scaled_dla
    from saecircuits.models.norms import readout_of

    model, task = bridge("olmo2"), quote_task()
    sae = random_sae(d_in=int(model.cfg.d_mlp), d_sae=48, hook_point="blocks.1.mlp.hook_post", seed=4)
    with torch.no_grad():
        sae.b_dec.zero_()
    res = sae_error_dla(model, sae, task)
    readout = readout_of(model)
    expected = []
    for toks, ans in zip(task.token_ids, task.answer_ids, strict=True):
        _, cache = model.run_with_cache(torch.tensor([toks]))
        out = cache["blocks.1.hook_mlp_out"][0, -1]
        expected.append(float(readout.dla(out[None, None], cache["ln_final.hook_scale"][0, -1], torch.tensor([ans]))))
    torch.testing.assert_close(res.per_prompt[:, 0], torch.tensor(expected), atol=2e-5, rtol=1e-5)
    assert res.max_identity_error < 1e-5
    scaled = activation_scaled_dla(model, sae, task)
    assert float(scaled.scaled_ln.double().sum()) == pytest.approx(float(res.per_prompt[:, 1].mean()), abs=1e-4)
    w = model.blocks[1].ln2_post.weight.detach()
    direction = (sae.W_dec[3] @ model.W_out[1]).detach() * w
    torch.testing.assert_close(weight_logit_boosts(model, sae, 3).boosts, readout.vocab_logits(direction),
                               atol=1e-5, rtol=1e-5)


def test_a_module_layout_the_engine_cannot_read_falls_back_instead_of_a_traceback(monkeypatch, caplog):
    """Before: a block without ln1 (OLMo 2) raised AttributeError out of the engine's construction. Any such
    failure now means the bridge fallback with one line; backend="engine" names it as an EngineError."""
    import logging

    from saecircuits.models import engine as engine_mod
    from saecircuits.models.engine import EngineError

    model = load_hf_model(qwen2_hf(seed=5), tiny_tokenizer())

    def broken(block, name):
        raise AttributeError(f"'BlockBridge' object has no attribute {name!r}")

    monkeypatch.setattr(engine_mod, "_optional_norm", broken)
    with pytest.raises(EngineError, match="cannot read this model's modules"):
        interventions_for(model, backend="engine")
    with caplog.at_level(logging.WARNING, logger="saecircuits.models.interventions"):
        iv = interventions_for(model)
    assert iv.backend == "bridge" and "AttributeError" in iv.reason
    assert len([r for r in caplog.records if "full bridge forwards" in r.getMessage()]) == 1


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_the_load_check_crosses_the_sliding_window(arch):
    """The engine's self-check runs past the config's sliding window (8 tokens here), so a wrong window fails it."""
    from saecircuits.models.engine import EngineError

    model = bridge(arch)
    engine = Engine.from_bridge(model)
    assert engine.check_against(model) < 1e-4
    engine.layers[1].window = 100
    with pytest.raises(EngineError, match="differ from the Hugging Face model"):
        engine.check_against(model)
    engine.layers[1].window = WINDOW


def test_an_olmo2_folder_loads_and_runs_on_the_engine(tmp_path):
    """The issue's report: `saecircuits run --model FOLDER` on OLMo 2 crashed with AttributeError ('BlockBridge'
    object has no attribute 'ln1'). The folder now loads with fold_ln off and its interventions use the engine."""
    from saecircuits.models.load import load_model

    olmo2_hf(seed=3).save_pretrained(tmp_path / "olmo2")
    tiny_tokenizer().save_pretrained(tmp_path / "olmo2")
    model = load_model(tmp_path / "olmo2")
    assert model_provenance(model).processing["fold_ln"] is False
    assert model_provenance(model).architecture == "Olmo2ForCausalLM"
    assert interventions_for(model).backend == "engine"
