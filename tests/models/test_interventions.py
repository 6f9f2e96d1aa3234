"""Prefix-cached interventions at P equal full-prompt interventions through the bridge, per architecture.

The reference is computed one prompt at a time, unpadded, through the TransformerBridge with a hook that edits the
prompt's last position (independent of the engine); the prefix-cached results come from right-padded batches of
prompts of different lengths. Loss, log-prob and logit agree to 1e-5 (fp32; relative for values above 1 in size:
a logit of 21 carries float32 steps of 1.9e-6, and the two paths round the SAE encoder's matmuls differently), and
ranks exactly.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHITECTURES, NO_CUDA, PRECISIONS, random_sae, rounding_tolerance, tiny_model, token_rows

from saecircuits.models.engine import EngineError
from saecircuits.models.hooks import answer_metrics, row_batches
from saecircuits.models.interventions import Edit, interventions_for

LENGTHS = [9, 40, 23, 31, 17, 2]  # different lengths, several beyond tiny_neo's 16-token local window
TOL = dict(atol=1e-5, rtol=0)


def _setup(arch: str, layer: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The tiny model of ``arch`` on ``device`` in ``dtype``, a float32 random SAE on its MLP ``layer``, prompts and
    answers."""
    model = tiny_model(arch, device, dtype)
    hook = f"blocks.{layer}.mlp.hook_post"
    sae = random_sae(d_in=int(model.cfg.d_mlp), d_sae=96, hook_point=hook, seed=layer).to(device)
    rows = token_rows(LENGTHS, seed=5)
    gen = torch.Generator().manual_seed(7)
    answers = torch.randint(1, 300, (len(rows),), generator=gen).tolist()
    return model, hook, sae, rows, answers


def _reference(model, row, answer, hook_edits, read=()):
    """One prompt, unpadded, through the bridge: ``hook_edits`` = [(hook, fn(x [d]) -> x')] at the last position."""
    p = len(row) - 1
    store = {}

    def make(fn):
        def hook(value, hook=None):
            new = value.clone()
            new[0, p] = fn(value[0, p])
            return new

        return hook

    def grab(name):
        def hook(value, hook=None):
            store[name] = value[0, p].detach().clone()

        return hook

    with torch.no_grad():
        logits = model.run_with_hooks(
            torch.tensor([row], device=model.W_E.device),
            fwd_hooks=[(n, grab(n)) for n in read] + [(h, make(f)) for h, f in hook_edits],
        )
    m = answer_metrics(logits[:, p], torch.tensor([answer]))
    return {k: float(v[0]) for k, v in m.items()}, store


def _check(metrics_bv, b, v, ref, tol: float | None = None):
    """float32 (``tol`` None): loss, log-prob and logit to 1e-5 (relative above 1), rank exactly. 16-bit: the logit
    within ``tol`` (:func:`rounding_tolerance` of the logits' size), loss and log-prob (a log-sum-exp less the
    logit) within ``2 * tol``; not the rank, which a tie within ``tol`` may swap."""
    for name in ("loss", "logprob", "logit"):
        got = float(metrics_bv[name][b, v])
        bound = 1e-5 * max(1.0, abs(ref[name])) if tol is None else tol * (1 if name == "logit" else 2)
        assert abs(got - ref[name]) <= bound, f"{name}: {got} vs full-prompt {ref[name]} (bound {bound:.3g})"
    if tol is None:
        assert float(metrics_bv["rank"][b, v]) == ref["rank"]


def _tol(dtype: torch.dtype, model, *logits: torch.Tensor) -> float | None:
    """None in float32 (:func:`_check`'s exact bar); else :func:`rounding_tolerance` of the largest |logit|."""
    if dtype == torch.float32:
        return None
    return rounding_tolerance(dtype, max(float(x.float().abs().max()) for x in logits), int(model.cfg.n_layers))


def _feature_table(sae, x_at_p: torch.Tensor, V: int) -> torch.Tensor:
    """Per prompt, the V most active features at P (ties broken by index)."""
    return torch.topk(sae.encode(x_at_p), V, dim=-1).indices


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("layer", [0, 1])
def test_mlp_edits_at_p_equal_full_prompt_interventions(arch, layer, device, dtype):
    """Zero, splice, one-feature-each and feature-set edits at P (a float32 SAE on the model's activations) equal
    full-prompt bridge forwards with the same edit: exactly as :func:`_check` says in float32, within bfloat16's
    rounding (both paths in bf16) otherwise."""
    model, hook, sae, rows, answers = _setup(arch, layer, device, dtype)
    iv = interventions_for(model)
    assert iv.backend == "engine"
    V = 4
    W_dec = sae.W_dec.detach()
    for batch in row_batches(rows, 0, answer_ids=answers, max_tokens=200, max_batch=4, device=device):
        clean = iv.clean(batch, read=[hook])
        x = clean.reads[hook]
        feats = _feature_table(sae, x, V)  # [B, V]

        def ablate_each(xb, feats=feats):  # one feature per variant: [B, F, d] -> [B, V, d]
            f = sae.encode(xb).expand(-1, V, -1).gather(-1, feats[:, :, None])
            return xb - f * W_dec[feats]

        def ablate_set(xb, feats=feats):  # all V features together, in one variant
            f = sae.encode(xb).gather(-1, feats[:, None, :].expand(-1, xb.shape[1], -1))  # [B, F, V]
            return xb - torch.einsum("bfk,bkd->bfd", f, W_dec[feats])

        cases = {
            "zero": ([Edit(hook, torch.zeros_like)], 1),
            "splice": ([Edit(hook, lambda xb: sae.decode(sae.encode(xb)))], 1),
            "each": ([Edit(hook, ablate_each)], V),
            "set": ([Edit(hook, ablate_set)], 1),
        }
        for name, (edits, n_var) in cases.items():
            logits, _ = iv.run(clean, edits, n_variants=n_var)
            assert logits.shape == (len(batch.indices), n_var, model.cfg.d_vocab)
            m = answer_metrics(logits, batch.answer_ids)
            tol = _tol(dtype, model, logits, clean.logits)
            for b, i in enumerate(batch.indices):
                for v in range(n_var):
                    k = int(feats[b, v])
                    ref_fn = {
                        "zero": lambda xp: torch.zeros_like(xp),
                        "splice": lambda xp: sae.decode(sae.encode(xp)),
                        "each": lambda xp, k=k: xp - sae.encode(xp)[k] * W_dec[k],
                        "set": lambda xp, ks=feats[b]: xp - sae.encode(xp)[ks] @ W_dec[ks],
                    }[name]
                    ref, _ = _reference(model, rows[i], answers[i], [(hook, ref_fn)])
                    _check(m, b, v, ref, tol)
        # the clean logits of the cached pass are the bridge's too
        mc = answer_metrics(clean.logits, batch.answer_ids)
        tol = _tol(dtype, model, clean.logits)
        for b, i in enumerate(batch.indices):
            ref, _ = _reference(model, rows[i], answers[i], [])
            if tol is None:
                for name in ("loss", "logit"):
                    torch.testing.assert_close(mc[name][b].cpu(), torch.tensor(ref[name]), **TOL)
            else:
                _check({k: v[:, None] for k, v in mc.items()}, b, 0, ref, tol)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_upstream_edit_read_downstream_and_attention_edits(arch):
    """Zero MLP0 at P and read MLP1 at P; ablate one head's z; edit the embedding and resid_pre."""
    model, _, _, rows, answers = _setup(arch, 0)
    iv = interventions_for(model)
    up, down = "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8))
    clean = iv.clean(batch)

    def kill_head(z):
        z = z.clone()
        z[..., 1, :] = 0
        return z

    cases = [
        ([(up, torch.zeros_like)], [down]),
        ([("blocks.1.attn.hook_z", kill_head)], ["blocks.1.attn.hook_z"]),
        ([("hook_embed", lambda e: 0.5 * e)], []),
        ([("blocks.0.hook_resid_pre", lambda r: -r)], ["ln_final.hook_scale"]),
        ([("blocks.1.attn.hook_v", lambda v: 2 * v)], []),
    ]
    for edits, read in cases:
        logits, reads = iv.run(clean, [Edit(h, f) for h, f in edits], read=read)
        m = answer_metrics(logits, batch.answer_ids)
        for b, i in enumerate(batch.indices):
            ref, store = _reference(model, rows[i], answers[i], edits, read=read)
            _check(m, b, 0, ref)
            for name in read:
                torch.testing.assert_close(reads[name][b, 0], store[name], **TOL, msg=name)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bridge_backend_gives_the_same_numbers(arch):
    model, hook, sae, rows, answers = _setup(arch, 1)
    fast, slow = interventions_for(model), interventions_for(model, backend="bridge")
    assert slow.backend == "bridge"
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8))
    feats = torch.arange(3)[None].expand(len(batch.indices), 3)

    def ablate_each(xb):
        f = sae.encode(xb).expand(-1, 3, -1).gather(-1, feats[:, :, None])
        return xb - f * sae.W_dec.detach()[feats]

    outs = []
    for iv in (fast, slow):
        clean = iv.clean(batch, read=[hook])
        logits, reads = iv.run(clean, [Edit(hook, ablate_each)], n_variants=3, read=["ln_final.hook_scale"])
        outs.append((clean.logits, clean.reads[hook], logits, reads["ln_final.hook_scale"]))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_read_all_positions_equals_the_bridge():
    model = ARCHITECTURES["llama"]()
    tokens = torch.tensor([r + [0] * (40 - len(r)) for r in token_rows([40, 12, 25])])
    names = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_mid"]
    fast = interventions_for(model).read_all(tokens, names)
    slow = interventions_for(model, backend="bridge").read_all(tokens, names)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], **TOL)


def test_bad_edit_shape_and_unknown_hooks_are_clear_errors():
    model, hook, _, rows, answers = _setup("gpt_neo", 1)
    iv = interventions_for(model)
    batch = next(row_batches(rows, 0, answer_ids=answers))
    clean = iv.clean(batch)
    with pytest.raises(ValueError, match="must return"):
        iv.run(clean, [Edit(hook, lambda x: x[:, :, :3])])
    with pytest.raises(EngineError, match="not one the engine fires"):
        iv.run(clean, [Edit("blocks.1.attn.hook_result", lambda x: x)])
    with pytest.raises(ValueError, match="backend"):
        interventions_for(model, backend="fast")


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.shared_data
@pytest.mark.parametrize("layer", [0, 4])
def test_stories260k_prefix_cached_ablations_equal_full_prompts(tmp_path_factory, layer):
    """The real llama2.c checkpoint (rotary + GQA, 5 layers) on real closing-quote prompts, L = 0 and the last."""
    ckpt = SHARED / "stories260K" / "stories260K.bin"
    val = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"
    if not (ckpt.is_file() and val.is_file()):
        pytest.skip(f"shared data absent: {ckpt} / {val}")
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model
    from saecircuits.tasks.closing_quote import closing_quote_task

    model = load_model(ckpt, cache_dir=tmp_path_factory.mktemp("llama2c"))
    task = closing_quote_task(read_documents(val)[:200], model.tokenizer, max_prompts=6)
    hook = f"blocks.{layer}.mlp.hook_post"
    sae = random_sae(d_in=int(model.cfg.d_mlp), d_sae=64, hook_point=hook, seed=layer)
    iv = interventions_for(model)
    assert iv.backend == "engine"
    for batch in row_batches(task.token_ids, 0, answer_ids=task.answer_ids, max_tokens=2000, max_batch=3):
        assert len(set(batch.positions.tolist())) > 1
        clean = iv.clean(batch, read=[hook])
        feats = torch.topk(sae.encode(clean.reads[hook]), 2, dim=-1).indices

        def ablate_each(xb, feats=feats):
            f = sae.encode(xb).expand(-1, 2, -1).gather(-1, feats[:, :, None])
            return xb - f * sae.W_dec.detach()[feats]

        for edits, n_var in (([Edit(hook, torch.zeros_like)], 1), ([Edit(hook, ablate_each)], 2)):
            m = answer_metrics(iv.run(clean, edits, n_variants=n_var)[0], batch.answer_ids)
            for b, i in enumerate(batch.indices):
                for v in range(n_var):
                    k = int(feats[b, v])
                    fn = torch.zeros_like if n_var == 1 else (lambda xp, k=k: xp - sae.encode(xp)[k] * sae.W_dec[k])
                    ref, _ = _reference(model, task.token_ids[i], task.answer_ids[i], [(hook, fn)])
                    _check(m, b, v, ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=NO_CUDA))])
@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_bf16_model_and_bf16_sae_engine_equals_the_bridge(arch, device):
    """A bfloat16 model serves the prefix-cached engine, whose logits (clean and with a bf16 SAE's feature ablated)
    match full bridge forwards within bf16 accuracy (:func:`rounding_tolerance` of the largest |logit|)."""
    from helpers import HF_BUILDERS, tiny_tokenizer

    from saecircuits.analysis.ablations.feature_effects import one_feature_each_edit
    from saecircuits.models.load import load_hf_model

    model = load_hf_model(HF_BUILDERS[arch](seed=4), tiny_tokenizer(), dtype=torch.bfloat16, device=device)
    assert model.W_E.dtype == torch.bfloat16
    hook = "blocks.1.mlp.hook_post"
    sae = random_sae(d_in=int(model.cfg.d_mlp), d_sae=96, hook_point=hook, seed=1).to(device=device,
                                                                                       dtype=torch.bfloat16)
    rows = token_rows(LENGTHS, seed=5)
    answers = torch.randint(1, 300, (len(rows),), generator=torch.Generator().manual_seed(7)).tolist()
    fast, slow = interventions_for(model), interventions_for(model, backend="bridge")
    assert fast.backend == "engine" and slow.backend == "bridge"
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8, device=device))
    table = torch.tensor([[0, 5, 17, -1]], device=device).expand(len(batch.indices), 4)
    outs = []
    for iv in (fast, slow):
        clean = iv.clean(batch)
        logits, _ = iv.run(clean, [one_feature_each_edit(sae, table)], n_variants=4)
        outs.append((clean.logits.float(), logits.float()))
    n_layers = int(model.cfg.n_layers)
    for a, b in zip(*outs, strict=True):
        assert float((a - b).abs().max()) <= rounding_tolerance(torch.bfloat16, float(b.abs().max()), n_layers)
    # the unablated variant (-1) is the clean run on each backend: bit for bit (one path)
    for clean, ablated in outs:
        assert torch.equal(ablated[:, 3], clean)


# ---------------------------------------------------------------------------------------------------------------
# issue 18: in-place edits, attention-pattern rows at P, hooks that never fire


def _in_place_add(x):
    x += 1.5
    return x


def _in_place_zero(x):
    x[...] = 0
    return x


IN_PLACE = {"add": (_in_place_add, lambda x: x + 1.5), "zero": (_in_place_zero, torch.zeros_like),
            "mul": (lambda x: x.mul_(-2.0), lambda x: -2.0 * x)}


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_in_place_edits_never_corrupt_the_kept_clean_pass(arch, backend):
    """``x += v`` at the first recomputed residual hook (a view of the kept clean residual stream in the engine),
    ``x[...] = 0`` and ``x.mul_`` give the full-prompt numbers of the out-of-place edit, twice in a row, and the
    batch's clean logits and reads afterwards are still the bridge's clean ones."""
    model, hook, _, rows, answers = _setup(arch, 1)
    iv = interventions_for(model, backend=backend)
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8))
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", hook]
    for name, (fn, ref_fn) in IN_PLACE.items():
        # hook_resid_mid (where the MLP half starts from the kept stream): the bridge edits only the MLP's input
        # there, not the residual, so the reference is the same backend's out-of-place edit
        mid = "blocks.1.hook_resid_mid"
        clean = iv.clean(batch)
        want, _ = iv.run(clean, [Edit(mid, ref_fn)])
        for _ in range(2):
            got, _ = iv.run(iv.clean(batch), [Edit(mid, fn)])
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for h in hooks:
            for _ in range(2):  # the second analysis of the batch must see an intact clean pass
                clean = iv.clean(batch, read=[h])
                logits, reads = iv.run(clean, [Edit(h, fn)], read=[h])
                m, mc = answer_metrics(logits, batch.answer_ids), answer_metrics(clean.logits, batch.answer_ids)
                for b, i in enumerate(batch.indices):
                    ref, store = _reference(model, rows[i], answers[i], [(h, ref_fn)], read=[h])
                    _check(m, b, 0, ref)
                    # a read of the edited hook is its value before the edit, and equals the clean read
                    torch.testing.assert_close(reads[h][b, 0], store[h], **TOL, msg=f"{name} {h}")
                    torch.testing.assert_close(clean.reads[h][b], store[h], **TOL, msg=f"{name} {h}")
                    clean_ref, _ = _reference(model, rows[i], answers[i], [])
                    assert abs(float(mc["loss"][b]) - clean_ref["loss"]) <= 1e-5 * max(1.0, clean_ref["loss"])
                # reads handed out are the caller's own: writing into them changes nothing kept
                clean.reads[h].add_(3.0)
                reads[h].mul_(-1.0)
                clean.logits.add_(1.0)


def _reference_pattern_via_z(model, row, answer, layer):
    """One prompt through the bridge with :func:`_pattern_edit`'s effect written on ``hook_z`` at P (independent of
    any pattern hook: head 0's ``z`` doubled, head 1's ``z`` = its value vector at key 0); also the clean query row
    P of ``hook_pattern`` ``[H, P + 1]``."""
    p = len(row) - 1
    store = {}
    n_heads = int(model.cfg.n_heads)

    def grab_v(value, hook=None):
        store["v0"] = value[0, 0].detach().clone()  # [n_kv_heads, d_head] at key 0

    def grab_pattern(value, hook=None):
        store["row"] = value[0, :, p].detach().clone()

    def edit_z(value, hook=None):
        new = value.clone()
        new[0, p, 0] = 2.0 * value[0, p, 0]
        new[0, p, 1] = store["v0"][1 * store["v0"].shape[0] // n_heads]  # query head 1's key/value head
        return new

    name = f"blocks.{layer}.attn"
    hooks = [(f"{name}.hook_v", grab_v), (f"{name}.hook_pattern", grab_pattern), (f"{name}.hook_z", edit_z)]
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([row]), fwd_hooks=hooks)
    m = answer_metrics(logits[:, p], torch.tensor([answer]))
    return {k: float(v[0]) for k, v in m.items()}, store["row"]


def _pattern_edit(pt):
    """Head 1 attends to key 0 alone; head 0's weights doubled (any key length)."""
    pt = pt.clone()
    pt[..., 0, :] *= 2.0
    pt[..., 1, :] = 0.0
    pt[..., 1, 0] = 1.0
    return pt


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_attention_pattern_at_p_is_the_query_row_of_every_head(arch, backend):
    """hook_pattern at P reads and edits query row P of every head (P up to 39 with 4 heads: no IndexError, no
    head P), under the engine's cache as in a full-prompt bridge forward."""
    model, _, _, rows, answers = _setup(arch, 0)
    iv = interventions_for(model, backend=backend)
    n_heads = int(model.cfg.n_heads)
    for layer in (0, 1):
        hook = f"blocks.{layer}.attn.hook_pattern"
        for batch in row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=4):
            clean = iv.clean(batch, read=[hook])
            if backend == "bridge" and arch == "gpt_neo":  # its bridge fires the pattern after using it
                with pytest.raises(ValueError, match="hook_pattern.*discarded"):
                    iv.run(clean, [Edit(hook, _pattern_edit)], read=[hook])
                logits, reads = iv.run(clean, [], read=[hook])
                torch.testing.assert_close(reads[hook][:, 0], clean.reads[hook], rtol=0, atol=0)
                continue
            logits, reads = iv.run(clean, [Edit(hook, _pattern_edit)], read=[hook])
            m = answer_metrics(logits, batch.answer_ids)
            # the same edit as variant 1 of 2 (the pattern edit splits the variants)
            two, _ = iv.run(clean, [Edit(hook, lambda pt: torch.cat([pt, _pattern_edit(pt)], 1))], n_variants=2)
            torch.testing.assert_close(two[:, 1], logits[:, 0], **TOL)
            torch.testing.assert_close(two[:, 0], clean.logits, **TOL)
            T = batch.tokens.shape[1]
            for b, i in enumerate(batch.indices):
                ref, row = _reference_pattern_via_z(model, rows[i], answers[i], layer)
                p = len(rows[i])
                for got in (clean.reads[hook][b], reads[hook][b, 0]):
                    assert got.shape == (n_heads, T)
                    torch.testing.assert_close(got[:, :p], row, **TOL)
                    assert float(got[:, p:].abs().sum()) == 0.0  # keys after P
                _check(m, b, 0, ref)


@pytest.mark.parametrize("backend", ["engine", "bridge"])
def test_edits_and_reads_on_hooks_that_never_fire_fail_naming_the_hook(backend):
    """hook_pos_embed does not fire in a rotary model: an edit or read there fails, naming it (never dropped)."""
    model = ARCHITECTURES["llama"]()
    rows = token_rows([9, 23], seed=5)
    iv = interventions_for(model, backend=backend)
    batch = next(row_batches(rows, 0, answer_ids=[1, 2]))
    clean = iv.clean(batch)
    for kwargs in (dict(edits=[Edit("hook_pos_embed", torch.zeros_like)]), dict(edits=[], read=["hook_pos_embed"])):
        with pytest.raises((EngineError, KeyError), match="hook_pos_embed.*never fired"):
            iv.run(clean, **kwargs)
    with pytest.raises((EngineError, KeyError), match="hook_pos_embed.*never fired"):
        iv.clean(batch, read=["hook_pos_embed"])


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_run_paired_baseline_is_the_clean_run_and_a_noop_variant_equals_it_exactly(arch, backend, device, dtype):
    """run_paired: variant 0 is the clean run (or the base edits'), the edited variants the full-prompt edits, and
    an edit that leaves the activation unchanged gives the baseline's logits and reads bit for bit, in every dtype
    (so a no-op edit's effect is exactly 0 in bfloat16 too: baseline and edit on one path)."""
    model, hook, sae, rows, answers = _setup(arch, 0, device, dtype)
    iv = interventions_for(model, backend=backend)
    down = "blocks.1.mlp.hook_post"
    splice = Edit(hook, lambda xb: sae.decode(sae.encode(xb)))

    def three(xb):  # [B, F, d] -> [B, 3, d]: unchanged, zeroed, doubled
        return torch.cat([xb.expand(-1, 1, -1), torch.zeros_like(xb[:, :1]), 2 * xb[:, :1]], dim=1)

    for batch in row_batches(rows, 0, answer_ids=answers, max_tokens=200, max_batch=4, device=device):
        clean = iv.clean(batch)
        run = iv.run_paired(clean, [Edit(hook, three)], n_variants=3, read=[down])
        assert torch.equal(run.logits[:, 0], run.base_logits)
        assert torch.equal(run.reads[down][:, 0], run.base_reads[down])
        spliced = iv.run_paired(clean, [Edit(hook, lambda xb: xb)], base=[splice])
        m, mb, ms = (answer_metrics(x, batch.answer_ids) for x in (run.logits, run.base_logits[:, None],
                                                                     spliced.base_logits[:, None]))
        # the no-op variant's effect on every metric is exactly 0
        for name in ("loss", "logprob", "logit", "rank"):
            assert torch.equal(m[name][:, 0], mb[name][:, 0]), name
        tol = _tol(dtype, model, run.logits, spliced.base_logits)
        for b, i in enumerate(batch.indices):
            _check(mb, b, 0, _reference(model, rows[i], answers[i], [])[0], tol)
            _check(ms, b, 0, _reference(model, rows[i], answers[i], [(hook, lambda x: sae.decode(sae.encode(x)))])[0],
                   tol)
            for v, fn in enumerate([lambda x: x, torch.zeros_like, lambda x: 2 * x]):
                _check(m, b, v, _reference(model, rows[i], answers[i], [(hook, fn)])[0], tol)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_attention_scores_at_p_are_every_heads_query_row_or_a_clear_error(arch):
    """hook_attn_scores at P: the engine refuses it by name; the bridge reads query row P of every head (equal to
    the unpadded prompt's run_with_cache row), or refuses where it fills the hook with the pattern (GPT-Neo)."""
    model, _, _, rows, answers = _setup(arch, 0)
    hook = "blocks.1.attn.hook_attn_scores"
    batch = next(row_batches(rows, 0, answer_ids=answers, max_tokens=400, max_batch=8))
    with pytest.raises(EngineError, match="hook_attn_scores"):
        interventions_for(model).clean(batch, read=[hook])
    iv = interventions_for(model, backend="bridge")
    if arch == "gpt_neo":
        for call in (lambda: iv.clean(batch, read=[hook]), lambda: iv.read_all(batch.tokens, [hook])):
            with pytest.raises(ValueError, match="holds the attention pattern"):
                call()
        return
    got = iv.clean(batch, read=[hook]).reads[hook]
    for b, i in enumerate(batch.indices):
        p = len(rows[i]) - 1
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([rows[i]]), names_filter=[hook])
        torch.testing.assert_close(got[b, :, : p + 1], cache[hook][0, :, p], **TOL)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_subset_batch_is_assembled_from_the_kept_rows_and_equals_its_own_pass(arch, monkeypatch):
    """A batch whose prompts were all rows of kept clean passes (reordered, cut from batches of other lengths) is
    served from those rows without a forward, and its logits, reads and edited runs at P equal a fresh clean pass of
    the same batch (a new cache) and the full-prompt bridge forwards."""
    model, hook, sae, rows, answers = _setup(arch, 1)
    pick = [5, 1, 4, 2]  # lengths 2, 40, 17, 23: from three kept batches, in another order
    sub = next(row_batches([rows[i] for i in pick], 0, answer_ids=[answers[i] for i in pick], max_tokens=400,
                           max_batch=8))

    def edit(x):
        return x - sae.encode(x)[..., :8] @ sae.W_dec[:8]

    iv = interventions_for(model)
    iv.clear_cache()  # the straightforward computation: the batch's own clean pass
    want_clean = iv.clean(sub, read=[hook])
    want, want_reads = iv.run(want_clean, [Edit(hook, edit)], read=["blocks.1.hook_resid_post"])
    iv.clear_cache()
    for batch in row_batches(rows, 0, answer_ids=answers, max_tokens=200, max_batch=2):
        iv.clean(batch)  # kept: pairs of rows, each batch padded to its own length

    def no_forward(*a, **k):
        raise AssertionError("a batch of kept rows was run again")

    monkeypatch.setattr(iv, "_engine_clean", no_forward)
    got_clean = iv.clean(sub, read=[hook])
    got, got_reads = iv.run(got_clean, [Edit(hook, edit)], read=["blocks.1.hook_resid_post"])
    torch.testing.assert_close(got_clean.logits, want_clean.logits, **TOL)
    torch.testing.assert_close(got_clean.reads[hook], want_clean.reads[hook], **TOL)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_reads["blocks.1.hook_resid_post"], want_reads["blocks.1.hook_resid_post"], **TOL)
    m = answer_metrics(got, sub.answer_ids)
    for b, i in enumerate(sub.indices):
        ref, _ = _reference(model, rows[pick[i]], answers[pick[i]], [(hook, edit)])
        _check(m, b, 0, ref)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_read_all_copies_the_rows_a_kept_read_holds_and_runs_the_others(arch, monkeypatch):
    """Rows of a read that kept reads hold with the same tokens (cut from longer padded batches, a subset of their
    hooks) are copied; a row padded beyond its kept batch's length and a row never read are run, alone: every
    activation equals a fresh read of the whole batch, padding positions included."""
    from saecircuits.models.tokens import pad_right

    model, hook, _, rows, _ = _setup(arch, 1)
    hooks = ["blocks.0.hook_resid_post", hook]
    iv = interventions_for(model)
    iv.clear_cache()
    kept_rows = rows[:5]  # lengths 9, 40, 23, 31, 17; rows[5] (length 2) is never read before
    for pair in ([1, 4], [2, 3], [0]):  # padded to 40, 31 and 9
        iv.read_all(pad_right([kept_rows[i] for i in pair], 0)[0], hooks)
    # 31 (kept at width 31), 17 (kept at width 40), 2 (never read), 9 (kept at width 9 < 31: run again)
    tokens = pad_right([rows[3], rows[4], rows[5], rows[0]], 0)[0]
    calls = []
    run = iv._read_all
    monkeypatch.setattr(iv, "_read_all", lambda t, r: calls.append(t.shape) or run(t, r))
    got = iv.read_all(tokens, [hook])
    assert calls == [(2, 31)]  # only the rows no kept read holds at this width
    monkeypatch.undo()
    iv.clear_cache()
    want = iv.read_all(tokens, [hook])
    torch.testing.assert_close(got[hook], want[hook], **TOL)
    assert got[hook].shape == want[hook].shape == (4, 31, int(model.cfg.d_mlp))
