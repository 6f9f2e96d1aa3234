"""The engine (a forward in TransformerLens's processed basis) gives the bridge's activations, per architecture."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ARCHITECTURES,
    HF_BUILDERS,
    PRECISIONS,
    engine_hooks_and_logits,
    rounding_tolerance,
    tiny_model,
    tiny_neo,
    tiny_tokenizer,
    token_rows,
)

from saecircuits.models.engine import Engine, EngineError, layer_hook_names, stage_of_hook
from saecircuits.models.load import load_hf_model
from saecircuits.models.tokens import pad_right

LENGTHS = [7, 40, 23, 31]  # > tiny_neo's local window of 16, so the window is exercised


def _all_hooks(model) -> list[str]:
    names = ["hook_embed"]
    if model.cfg.positional_embedding_type == "standard":
        names.append("hook_pos_embed")
    for layer in range(model.cfg.n_layers):
        for n in layer_hook_names(layer):
            if n in model.hook_dict and not (n.endswith("pre_linear") and not model.cfg.gated_mlp):
                names.append(n)
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized"]


def test_next_token_losses_equal_the_bridges_log_softmax_whatever_the_chunk():
    """Engine.next_token_losses (log-sum-exp minus the target logit, unembedded in chunks) against the bridge's
    full logits through log_softmax; the chunk size (here 1, 3 and every row at once) changes float rounding only."""
    model = tiny_neo()
    engine = Engine.from_bridge(model)
    tokens, _ = pad_right(token_rows([10, 7, 10]), pad_id=0)
    with torch.no_grad():
        resid = engine.forward_tokens(tokens)[:, 0]
        want = -torch.log_softmax(model(tokens)[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        got = {rows: engine.next_token_losses(resid, tokens, max_floats=rows * engine.d_vocab) for rows in (1, 3, 27)}
    assert got[1].shape == (3, 9)
    torch.testing.assert_close(got[1].double(), want, atol=1e-5, rtol=0)
    for rows in (3, 27):  # a one-row chunk may take another BLAS kernel: float rounding only
        torch.testing.assert_close(got[rows], got[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_hook_equals_the_bridge_on_a_padded_batch(arch, device, dtype):
    """Every hook and the logits of the engine on a padded batch equal one-prompt bridge forwards: to 2e-5 in
    float32; in bfloat16 (both paths in bf16) within :func:`rounding_tolerance` of each tensor's size."""
    model = tiny_model(arch, device, dtype)
    engine = Engine.from_bridge(model)
    rows = token_rows(LENGTHS, seed=1)
    tokens, lengths = pad_right(rows, pad_id=0)
    names = [n for n in _all_hooks(model) if n in model.hook_dict]
    got, logits = engine_hooks_and_logits(engine, tokens.to(device), names)
    n_layers = int(model.cfg.n_layers)

    def close(mine, ref, msg):
        if dtype == torch.float32:
            return torch.testing.assert_close(mine, ref, atol=2e-5, rtol=0, msg=msg)
        mine, ref = mine.float(), ref.float()
        tol = rounding_tolerance(dtype, float(ref.abs().max()), n_layers)
        assert float((mine - ref).abs().max()) <= tol, f"{msg}: {float((mine - ref).abs().max()):.3g} > {tol:.3g}"

    for b, row in enumerate(rows):
        n = len(row)
        with torch.no_grad():
            ref_logits, cache = model.run_with_cache(torch.tensor([row], device=device))
        close(logits[b, :n], ref_logits[0], f"{arch} logits row {b}")
        for name in names:
            ref = cache[name][0]
            mine = got[name][b]
            if name.endswith("hook_pattern"):  # [head, q, k]
                mine = mine[:, :n, :n]
            else:
                mine = mine[:n]
            close(mine, ref, f"{arch} {name} row {b}")


SWITCHES = [
    dict(fold_ln=True, center_writing_weights=True, center_unembed=True),
    dict(fold_ln=False, center_writing_weights=False, center_unembed=False),
    dict(fold_ln=False, center_writing_weights=True, center_unembed=True),
    dict(fold_ln=True, center_writing_weights=False, center_unembed=True),
    dict(fold_ln=True, center_writing_weights=True, center_unembed=False),
]


@pytest.mark.parametrize("arch", sorted(HF_BUILDERS))
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(k for k, v in s.items() if v) or "none")
def test_engine_log_probs_equal_the_unprocessed_model_under_every_switch(arch, switches):
    """Weight processing never changes log-probs; the engine reads whatever the bridge left (norm weights too)."""
    raw = HF_BUILDERS[arch](seed=3)
    rows = token_rows([12, 30], seed=2)
    tokens, _ = pad_right(rows, pad_id=0)
    with torch.no_grad():
        ref = raw(tokens).logits.log_softmax(-1)
    bridge = load_hf_model(HF_BUILDERS[arch](seed=3), tiny_tokenizer(), **switches)
    engine = Engine.from_bridge(bridge)  # includes the check against the bridge's own logits
    with torch.no_grad():
        mine = engine.logits(engine.forward_tokens(tokens))[:, 0].log_softmax(-1)
    for b, row in enumerate(rows):
        torch.testing.assert_close(mine[b, : len(row)], ref[b, : len(row)], atol=5e-5, rtol=0)


def test_stop_after_and_kept_kv_shapes():
    model = tiny_neo()
    engine = Engine.from_bridge(model)
    tokens, _ = pad_right(token_rows([10, 6]), pad_id=0)
    kv: list = []
    with torch.no_grad():
        x = engine.forward_tokens(tokens, stop_after=(0, 1), keep_kv=kv)
        _, cache = model.run_with_cache(tokens)
    assert len(kv) == 1  # block 1 never ran
    torch.testing.assert_close(x[:, 0], cache["blocks.0.hook_resid_post"], atol=1e-5, rtol=0)
    k, v = kv[0]
    assert k.shape == (2, 1, 10, model.cfg.n_heads, model.cfg.d_head)
    torch.testing.assert_close(k[:, 0], cache["blocks.0.attn.hook_k"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_a_hook_returning_float32_in_a_bf16_stream_continues_in_the_streams_dtype(device, dtype):
    """An engine hook may return float32 (an SAE edit computed in edit_dtype): the stream goes on in the model's
    dtype, as a bridge forward whose hook casts back, instead of failing at the next matmul (the bf16 pipeline's
    max-activating ablation did: "expected m1 and m2 to have the same dtype")."""
    model = tiny_model("gpt_neo", device, dtype)
    engine = Engine.from_bridge(model)
    tokens = torch.tensor(token_rows([20], seed=3), device=device)
    hook = "blocks.0.mlp.hook_post"
    with torch.no_grad():
        resid = engine.forward_tokens(tokens, {hook: [lambda x: x.float() * 2 + 1]})
        mine = engine.logits(resid)[:, 0]
        ref = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: (x.float() * 2 + 1).to(x.dtype))])
    assert resid.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else rounding_tolerance(dtype, float(ref.float().abs().max()),
                                                                 int(model.cfg.n_layers))
    assert float((mine - ref.float()).abs().max()) <= tol


def test_a_wrong_engine_is_refused_by_its_own_check():
    model = tiny_neo()
    engine = Engine.from_bridge(model)
    engine.layers[1].window = 100  # a wrong window: the check's default length (window + 16) must notice
    with pytest.raises(EngineError, match="differ from the Hugging Face model"):
        engine.check_against(model)
    engine.layers[1].window = 16
    engine.check_against(model)


def test_unknown_hook_names_are_refused_with_the_supported_list():
    assert stage_of_hook("blocks.1.mlp.hook_post", 2) == (1, 1)
    assert stage_of_hook("blocks.0.attn.hook_z", 2) == (0, 0)
    assert stage_of_hook("hook_embed", 2) == (-1, 0)
    assert stage_of_hook("ln_final.hook_scale", 2) == (2, 0)
    with pytest.raises(EngineError, match="hook_resid_pre"):
        stage_of_hook("blocks.0.attn.hook_result", 2)
    with pytest.raises(EngineError):
        stage_of_hook("blocks.5.mlp.hook_post", 2)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_last_positions_equal_every_position_read_there(arch):
    """``forward_resid(last_positions=...)``: the last block at some positions only gives what the whole pass gives
    at those positions (the queries there, keys and values everywhere), from the embeddings, from the last block's
    MLP half, and over a cached prefix (the keys/values of earlier positions, local windows and rotary included);
    hooks of the last block from ``hook_q`` on see the kept positions."""
    from saecircuits.models.engine import KVPrefix

    model = ARCHITECTURES[arch]()
    engine = Engine.from_bridge(model)
    tokens, _ = pad_right(token_rows([40, 33]), pad_id=0)
    B, S = tokens.shape
    L = engine.n_layers
    keep = torch.tensor([0, 5, 17, 30, S - 1])
    pos = torch.arange(S).expand(B, S)
    seen = {}
    hooks = {f"blocks.{L - 1}.mlp.hook_post": [lambda x: seen.__setitem__("post", x.shape[2])]}
    with torch.no_grad():
        kv, resid = [], {}
        full = engine.forward_tokens(tokens, keep_kv=kv, keep_resid=resid)
        x0 = engine.embed(tokens, pos)
        part = engine.forward_resid(x0, pos, None, hooks, last_positions=keep)
        torch.testing.assert_close(part, full[:, :, keep], atol=1e-5, rtol=1e-5)
        assert seen["post"] == len(keep)
        mid = engine.forward_resid(resid[(L - 1, 1)], pos, None, start=(L - 1, 1), last_positions=keep)
        torch.testing.assert_close(mid, full[:, :, keep], atol=1e-5, rtol=1e-5)
        # positions 12..S-1 recomputed over the cached keys/values of 0..11
        t0 = 12
        prefixes = [KVPrefix(k[:, 0].transpose(1, 2), v[:, 0].transpose(1, 2), torch.arange(S)[None] < t0)
                    for k, v in kv]
        rel = torch.tensor([0, 4, S - 1 - t0])
        got = engine.forward_resid(resid[(0, 0)][:, :, t0:], pos[:, t0:], prefixes, last_positions=rel)
        torch.testing.assert_close(got, full[:, :, t0 + rel], atol=1e-5, rtol=1e-5)
