"""Training from sparse codes (saes/sparse_codes.py) equals the dense computation: the loss, the reconstruction and
every parameter gradient of a TopK SAE with AuxK, on random inputs, with ties and zeros among the kept features; and
a short training run reaches the dense path's quality."""

import pytest
import torch

from saecircuits.saes.base import SAEConfig
from saecircuits.saes.losses import LossConfig, sae_training_loss
from saecircuits.saes.registry import build_sae
from saecircuits.saes.sparse_codes import selected_pre_activations, sparse_decode

HOOK = "blocks.0.mlp.hook_post"
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


def _grads(sae, x, loss_cfg, dead, sparse):
    sae.zero_grad(set_to_none=True)
    out = sae_training_loss(sae, x, loss_cfg, dead_mask=dead, sparse=sparse)
    out.total.backward()
    return out, {n: getattr(sae, n).grad.clone() for n in PARAMS}


def _dense_reference(sae, x, dead, aux_k, aux_coefficient):
    """The loss written out with dense matrices and autograd only (no sparse_codes, no loss module)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_hat = f @ sae.W_dec + sae.b_dec
    total = ((x_hat - x) ** 2).sum(-1).mean()
    n_dead = int(dead.sum())
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    a_vals, a_idx = masked.topk(min(aux_k, n_dead), dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, a_idx, torch.relu(a_vals)) @ sae.W_dec
    aux = min(n_dead / aux_k, 1.0) * ((e_hat - (x - x_hat).detach()) ** 2).sum(-1).mean()
    return total + aux_coefficient * aux, x_hat


@pytest.mark.parametrize("case", ["random", "ties_and_zeros"])
# 32 dead latents: aux_k 3 gathers the selected rows (a top-k among them); 16 multiplies over the dead columns with a
# top-k mask (AUXK_DENSE_RATIO); 40 takes them all. In float32 the hand-written reference's own rounding of the
# pre-activations can flip a near-tie at the top-k boundary (aux_k 10, 12 or 20 here, on either path): 3 and 16 have
# none
@pytest.mark.parametrize("aux_k", [3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_loss_equals_dense_loss_and_gradients(dtype, aux_k, case):
    gen = torch.Generator().manual_seed(3)
    d_in, d_sae, k, batch = 12, 48, 5, 64
    sae = build_sae(SAEConfig("topk", d_in, d_sae, HOOK, extra={"k": k}, dtype=str(dtype).removeprefix("torch.")),
                    seed=1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
    x = torch.randn(batch, d_in, generator=gen, dtype=dtype).relu()
    if case == "ties_and_zeros":
        with torch.no_grad():
            # ties: features 3 and 7 share their encoder column and bias, so they tie on every token; on the tokens
            # whose encoder input is 0 (pre-activation = b_enc) they tie for the k-th place, and one is kept
            sae.W_enc[0] = -1.0  # input dimension 0 lowers every pre-activation (the zeros below)
            sae.W_enc[:, 7] = sae.W_enc[:, 3]
            sae.b_enc[[0, 1, 2, 4]] = torch.tensor([2.0, 1.9, 1.8, 1.7], dtype=dtype)
            sae.b_enc[[3, 7]] = 1.0
        x[:4] = sae.b_dec.detach()
        # zeros: tokens whose pre-activations are all negative keep k features that ReLU to exactly 0
        x[4:8] = sae.b_dec.detach()
        x[4:8, 0] += 10.0
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=gen)[:30]] = True
    dead[3] = dead[7] = True  # a dead pair that ties
    loss_cfg = LossConfig("none", (), aux_k=aux_k, aux_coefficient=0.5)

    sparse_out, sparse_g = _grads(sae, x, loss_cfg, dead, sparse=True)
    dense_out, dense_g = _grads(sae, x, loss_cfg, dead, sparse=False)
    if case == "ties_and_zeros":
        assert ((sparse_out.f[4:8] > 0).sum(-1) == 0).all()  # kept features that are exactly 0
        assert (sparse_out.hidden_pre[:, 3] == sparse_out.hidden_pre[:, 7]).all()
        assert (((sparse_out.f[:4, 3] > 0).int() + (sparse_out.f[:4, 7] > 0).int()) == 1).all()  # a tie at k
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(sparse_out.x_hat, dense_out.x_hat, **tol)
    torch.testing.assert_close(sparse_out.f, dense_out.f.detach(), **tol)
    torch.testing.assert_close(sparse_out.total, dense_out.total, **tol)
    assert sparse_out.terms.keys() == dense_out.terms.keys() == {"mse", "auxk", "total"}
    assert sparse_out.terms["auxk"] > 0
    for name in PARAMS:
        torch.testing.assert_close(sparse_g[name], dense_g[name], **tol, msg=name)

    # both equal the loss written out by hand with dense matrices (independent of the loss module's helpers)
    sae.zero_grad(set_to_none=True)
    ref_total, ref_x_hat = _dense_reference(sae, x, dead, aux_k, 0.5)
    ref_total.backward()
    torch.testing.assert_close(sparse_out.total.detach(), ref_total.detach(), **tol)
    torch.testing.assert_close(sparse_out.x_hat.detach(), ref_x_hat.detach(), **tol)
    for name in PARAMS:
        torch.testing.assert_close(sparse_g[name], getattr(sae, name).grad, **tol, msg=name)


def test_sparse_primitives_against_dense_matrices():
    gen = torch.Generator().manual_seed(0)
    batch, d_in, d_sae, m = 7, 5, 11, 4
    w = torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_sae, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, d_sae, (batch, m), generator=gen)
    idx[0] = 2  # one feature repeated within a token: its gradients add up
    pre = x @ w + b
    vals = pre.gather(-1, idx)
    g = torch.randn(batch, m, generator=gen, dtype=torch.float64)
    dense = torch.autograd.grad((vals * g).sum(), (x, w, b))
    got = selected_pre_activations(x, w, b, idx, vals)
    torch.testing.assert_close(got, vals.detach(), rtol=0, atol=0)  # the given values, exactly
    sparse = torch.autograd.grad((got * g).sum(), (x, w, b))
    for a, e in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, e)
    # the decode: rows weighted and summed, as scatter-then-matmul
    acts = torch.randn(batch, m, generator=gen, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    dense_f = torch.zeros(batch, d_sae, dtype=torch.float64).scatter_add(-1, idx, acts)
    out_d = dense_f @ wd
    out_s = sparse_decode(acts, idx, wd)
    torch.testing.assert_close(out_s, out_d)
    h = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad((out_s * h).sum(), (acts, wd)),
                    torch.autograd.grad((out_d * h).sum(), (acts, wd)), strict=True):
        torch.testing.assert_close(a, e)


def test_training_from_sparse_codes_reaches_the_dense_paths_quality(monkeypatch):
    """The pipeline's TopK recipe (AuxK, unit-norm decoder, Adam) on the tiny test model's layer-1 activations,
    trained once from sparse codes and once densely (the trainer's loss forced to sparse=False): explained variance
    on held-out activations, L0 and the dead fraction agree, and the AuxK term was active (dead latents existed)."""
    import functools
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
    from helpers import STORIES, tiny_neo

    from saecircuits.data.activations import model_activation_batches, pack_token_rows
    from saecircuits.models.tokens import encode_documents
    from saecircuits.saes import losses
    from saecircuits.saes.metrics import explained_variance
    from saecircuits.saes.presets import pipeline_recipe
    from saecircuits.saes.trainer import SAETrainer

    model = tiny_neo()
    hook = "blocks.1.mlp.hook_post"
    rows = pack_token_rows(encode_documents(model.tokenizer, STORIES * 8, prepend_bos=False), 32,
                           model.tokenizer.bos_token_id, shuffle_seed=0)
    batch, steps = 128, 60
    stream = model_activation_batches(model, rows, [hook], batch, buffer_size=8 * batch, seed=0)
    data = [next(stream)[hook] for _ in range(steps + 20)]
    train, held_out = data[:steps + 10], torch.cat(data[steps + 10:])  # 10 extra batches set the input scale
    arch, extra, cfg = pipeline_recipe("topk", total_steps=steps, batch_size=batch, k=6)
    cfg.log_every = steps

    def fit(sparse):
        monkeypatch.setattr(losses, "sae_training_loss", functools.partial(real_loss, sparse=sparse))
        sae = build_sae(SAEConfig(arch, 64, 256, hook, extra=extra), seed=0)
        trainer = SAETrainer(sae, iter(train), cfg, progress=False)
        while trainer.step < steps:
            trainer.train_step()
        trained = trainer.finished_sae()
        with torch.no_grad():
            ev = explained_variance(held_out, trained(held_out))
            l0 = float((trained.encode(held_out) > 0).sum(-1).float().mean())
        return ev, l0, trainer.last_metrics

    real_loss = losses.sae_training_loss
    ev_s, l0_s, m_s = fit(True)
    ev_d, l0_d, m_d = fit(False)
    print(f"sparse EV {ev_s:.4f} L0 {l0_s:.2f} dead {m_s['dead_fraction']:.3f}; "
          f"dense EV {ev_d:.4f} L0 {l0_d:.2f} dead {m_d['dead_fraction']:.3f}")
    assert ev_d > 0.5  # the recipe trains on this model at all
    assert m_s["loss/auxk"] > 0 and m_d["loss/auxk"] > 0  # with dead latents, so AuxK took part
    assert abs(ev_s - ev_d) <= 0.02
    assert abs(l0_s - l0_d) <= 0.3
    assert abs(m_s["dead_fraction"] - m_d["dead_fraction"]) <= 0.05


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_dense_training_b_dec_gradient_through_the_encoder_equals_autograd(arch):
    """SAE.hidden_pre in training takes b_dec's encoder gradient as -W_enc @ sum_b grad (no [batch, d_sae] x
    [d_sae, d_in] matmul): the pre-activations are the same floats as the plain formula, and every gradient of a
    ReLU + L1 loss equals plain autograd through x - b_dec; with x needing a gradient too, x's gradient is right."""
    gen = torch.Generator().manual_seed(5)
    sae = build_sae(SAEConfig(arch, 10, 40, HOOK, dtype="float64"), seed=2)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(10, generator=gen, dtype=torch.float64))
        sae.b_enc.copy_(torch.randn(40, generator=gen, dtype=torch.float64) * 0.1)
    x = torch.randn(32, 10, generator=gen, dtype=torch.float64)

    def plain(x):
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        if arch == "jumprelu":
            from saecircuits.saes.jumprelu import _JumpReLUFn

            f = _JumpReLUFn.apply(pre, sae.threshold, sae.bandwidth)
        else:
            f = torch.relu(pre)
        return pre, ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean() + 1e-2 * f.sum(-1).mean()

    pre_plain, loss_plain = plain(x)
    expected = torch.autograd.grad(loss_plain, [getattr(sae, n) for n in PARAMS], allow_unused=True)
    with torch.enable_grad():
        assert torch.equal(sae.hidden_pre(x), pre_plain)  # the same floats
    out = sae_training_loss(sae, x, LossConfig("l1", (1e-2,)))
    got = torch.autograd.grad(out.total, [getattr(sae, n) for n in PARAMS], allow_unused=True)
    for name, g, e in zip(PARAMS, got, expected, strict=True):
        torch.testing.assert_close(g, e, msg=name)
    xg = x.clone().requires_grad_(True)  # an input that needs a gradient takes autograd's path
    gx = torch.autograd.grad(sae_training_loss(sae, xg, LossConfig("l1", (1e-2,))).total, xg)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(plain(xg)[1], xg)[0])


@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_auxk_dead_pre_activations_take_the_encodes_values_and_autograds_gradients(input_needs_grad):
    """AuxK's dense path over the dead columns reuses the encode's pre-activations (no forward matmul) and gives
    b_dec its gradient as a matrix-vector product: the values are the encode's columns exactly, and every gradient
    (W_enc, b_enc, b_dec; x's when it needs one) equals plain autograd through x - b_dec, in float64."""
    from saecircuits.saes.losses import _dead_pre_activations

    gen = torch.Generator().manual_seed(11)
    sae = build_sae(SAEConfig("topk", 6, 20, HOOK, extra={"k": 3}, dtype="float64"), seed=4)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
        sae.b_enc.copy_(torch.randn(20, generator=gen, dtype=torch.float64))
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64).requires_grad_(input_needs_grad)
    dead = torch.tensor([1, 4, 5, 13, 19])
    g = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    wrt = [sae.W_enc, sae.b_enc, sae.b_dec] + ([x] if input_needs_grad else [])
    plain = (x - sae.b_dec) @ sae.W_enc[:, dead] + sae.b_enc[dead]
    expected = torch.autograd.grad((plain * g).sum(), wrt)
    with torch.no_grad():
        hidden_pre = sae.hidden_pre(x)
    x_in, _ = sae._encoder_input(x)
    got = _dead_pre_activations(sae, x, x_in, dead, hidden_pre)
    assert torch.equal(got.detach(), hidden_pre[:, dead])  # the encode's values, not a second matmul's
    for name, a, e in zip(["W_enc", "b_enc", "b_dec", "x"], torch.autograd.grad((got * g).sum(), wrt), expected,
                          strict=False):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


# 30 dead: a top-k among them (8; a token has up to 8 positive dead latents), or all of them (40)
@pytest.mark.parametrize("aux_k", [8, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_auxk_from_positive_dead_pre_activations_equals_dense(dtype, aux_k, monkeypatch):
    """When the dead latents' positive pre-activations are few and each token has at most aux_k of them, AuxK is
    computed from those (token, latent) pairs alone: the loss and every gradient equal the dense AuxK (sparse=False)
    and the loss written out with dense matrices."""
    from saecircuits.saes import losses

    monkeypatch.setattr(losses, "AUXK_SPARSE_RATIO", 1)  # take the pairs whenever each token's count fits
    gen = torch.Generator().manual_seed(5)
    d_in, d_sae, k, batch = 12, 48, 5, 64
    sae = build_sae(SAEConfig("topk", d_in, d_sae, HOOK, extra={"k": k}, dtype=str(dtype).removeprefix("torch.")),
                    seed=2)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=gen)[:30]] = True
    x = torch.randn(batch, d_in, generator=gen, dtype=dtype).relu()
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
        pre = (x - sae.b_dec) @ sae.W_enc
        # dead biases that leave about one positive dead pre-activation per token, several on some tokens
        sae.b_enc[dead] = -pre[:, dead].quantile(1 - 1.2 / 30, dim=0)
        hidden_pre = sae.hidden_pre(x)
    positive = losses._auxk_positive(hidden_pre, dead, aux_k)
    assert positive is not None  # the pairs path is taken
    rows, cols = positive
    per_token = torch.bincount(rows, minlength=batch)
    assert rows.numel() > 10 and 5 <= per_token.max() <= 8 and (per_token == 0).any()  # several on a token, or none
    assert dead[cols].all() and (hidden_pre[rows, cols] > 0).all()
    assert rows.numel() == int(((hidden_pre > 0) & dead).sum())
    loss_cfg = LossConfig("none", (), aux_k=aux_k, aux_coefficient=0.5)
    pairs_out, pairs_g = _grads(sae, x, loss_cfg, dead, sparse=True)
    dense_out, dense_g = _grads(sae, x, loss_cfg, dead, sparse=False)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    assert pairs_out.terms["auxk"] > 0
    torch.testing.assert_close(pairs_out.total, dense_out.total, **tol)
    for name in PARAMS:
        torch.testing.assert_close(pairs_g[name], dense_g[name], **tol, msg=name)
    sae.zero_grad(set_to_none=True)
    ref_total, _ = _dense_reference(sae, x, dead, aux_k, 0.5)
    ref_total.backward()
    torch.testing.assert_close(pairs_out.total.detach(), ref_total.detach(), **tol)
    for name in PARAMS:
        torch.testing.assert_close(pairs_g[name], getattr(sae, name).grad, **tol, msg=name)


def test_auxk_positive_pairs_only_when_the_top_k_choice_keeps_them_all(monkeypatch):
    from saecircuits.saes import losses
    from saecircuits.saes.losses import _auxk_positive

    monkeypatch.setattr(losses, "AUXK_SPARSE_RATIO", 1)
    dead = torch.tensor([True, True, True, False, True])
    hidden_pre = torch.tensor([[0.5, -1.0, -2.0, 3.0, -0.1],   # one positive dead latent (0); 3 is alive
                               [-1.0, -1.0, -1.0, -1.0, -1.0],  # none
                               [0.2, 0.3, -1.0, 1.0, 0.0]])     # two (0 and 1); 4 is exactly 0: ReLU gives 0
    rows, cols = _auxk_positive(hidden_pre, dead, 2)
    assert rows.tolist() == [0, 2, 2] and cols.tolist() == [0, 0, 1]
    # aux_k 1 of 4 dead latents: the top-1 choice on token 2 drops one of its two positive latents
    assert _auxk_positive(hidden_pre, dead, 1) is None
    # more pairs than batch * min(n_dead, aux_k) / AUXK_SPARSE_RATIO: the dense paths
    assert _auxk_positive(hidden_pre, dead, 2) is not None
    monkeypatch.setattr(losses, "AUXK_SPARSE_RATIO", 3)  # 3 pairs * 3 > 3 tokens * 2
    assert _auxk_positive(hidden_pre, dead, 2) is None
