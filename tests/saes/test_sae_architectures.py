"""Architectures: seeded init (reference-equivalent, no global RNG use), TopK/BatchTopK selection, JumpReLU STE,
activation-scale folding."""

import copy
import math

import pytest
import torch

from saecircuits.saes.base import SAEConfig, SAEError, fold_activation_scale
from saecircuits.saes.batchtopk import BatchTopKSAE
from saecircuits.saes.jumprelu import JumpReLUSAE
from saecircuits.saes.registry import architectures, build_sae
from saecircuits.saes.topk import TopKSAE

HOOK = "blocks.0.mlp.hook_post"
EXTRA = {"standard": {}, "topk": {"k": 3}, "batchtopk": {"k": 3}, "jumprelu": {"bandwidth": 0.05}}


def _cfg(arch, d_in=6, d_sae=16, **extra):
    return SAEConfig(arch, d_in, d_sae, HOOK, extra={**EXTRA[arch], **extra})


def _x(n=10, d_in=6, seed=0):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def test_registry_names():
    assert architectures() == ["batchtopk", "gated", "jumprelu", "standard", "topk"]
    with pytest.raises(SAEError, match="unknown SAE architecture 'matching_pursuit'.*standard"):
        build_sae(SAEConfig("matching_pursuit", 4, 8, HOOK))


def test_init_equals_reference_notebook_and_leaves_global_rng_alone():
    # The reference AutoEncoder: torch.manual_seed(47); kaiming_uniform_(W_enc); kaiming_uniform_(W_dec);
    # biases 0; W_dec rows normalised (the notebook's AutoEncoder). Reproduced here on the global RNG, inside fork_rng.
    with torch.random.fork_rng():
        torch.manual_seed(47)
        w_enc = torch.empty(6, 16)
        torch.nn.init.kaiming_uniform_(w_enc)
        w_dec = torch.empty(16, 6)
        torch.nn.init.kaiming_uniform_(w_dec)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    before = torch.get_rng_state()
    sae = build_sae(_cfg("standard"))  # default seed 47
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(sae.W_enc.detach(), w_enc)
    torch.testing.assert_close(sae.W_dec.detach(), w_dec)
    assert torch.all(sae.b_enc == 0) and torch.all(sae.b_dec == 0)
    # kaiming_uniform_ defaults: bound = sqrt(2) * sqrt(3 / fan_in), fan_in = size(1) = d_sae for W_enc
    assert float(sae.W_enc.detach().abs().max()) <= math.sqrt(6 / 16)
    assert not torch.equal(build_sae(_cfg("standard"), seed=48).W_enc, sae.W_enc)


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
def test_every_architecture_shapes_and_unit_decoder_rows(arch):
    sae = build_sae(_cfg(arch))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    x = _x().reshape(2, 5, 6)  # [batch, pos, d_in]
    assert sae.encode(x).shape == (2, 5, 16) and sae(x).shape == (2, 5, 6)
    f, pre = sae.encode_with_hidden_pre(x.reshape(10, 6))
    assert f.shape == pre.shape == (10, 16)
    with pytest.raises(SAEError, match="d_in=6, got 5"):
        sae.encode(torch.zeros(3, 5))


def test_topk_keeps_the_k_largest_preactivations_per_token():
    sae = build_sae(_cfg("topk"))
    assert isinstance(sae, TopKSAE)
    x = _x()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = sae.encode(x)
    for t in range(10):
        order = pre[t].argsort(descending=True)
        top, rest = order[:3], order[3:]
        torch.testing.assert_close(f[t, top], pre[t, top].clamp_min(0))
        assert torch.all(f[t, rest] == 0)


def test_topk_bad_k():
    with pytest.raises(SAEError, match=r"cfg.extra\['k'\]"):
        build_sae(SAEConfig("topk", 4, 8, HOOK))
    with pytest.raises(SAEError, match="1..d_sae=8"):
        build_sae(SAEConfig("batchtopk", 4, 8, HOOK, extra={"k": 9}))


def test_batchtopk_selects_over_the_batch_and_estimates_threshold():
    sae = build_sae(_cfg("batchtopk", threshold_lr=0.5))
    assert isinstance(sae, BatchTopKSAE)
    x = _x(n=4)
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    kth = acts.flatten().sort(descending=True).values[3 * 4 - 1]  # k * n_tokens = 12th largest
    assert kth > 0
    sae.train()
    f, _ = sae.encode_with_hidden_pre(x)
    assert int((f > 0).sum()) == 12
    torch.testing.assert_close(f, torch.where(acts >= kth, acts, torch.zeros_like(acts)))
    # first update: threshold = smallest kept activation; second: EMA with rate 0.5
    torch.testing.assert_close(sae.threshold, torch.full((16,), float(kth)))
    x2 = _x(n=4, seed=1)
    acts2 = torch.relu((x2 - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    kth2 = acts2.flatten().sort(descending=True).values[11]
    sae.encode_with_hidden_pre(x2)
    torch.testing.assert_close(sae.threshold, torch.full((16,), 0.5 * float(kth) + 0.5 * float(kth2)))
    # eval mode: no update; inference is a per-token JumpReLU with the threshold
    sae.eval()
    th = sae.threshold.clone()
    sae.encode_with_hidden_pre(x)
    assert torch.equal(sae.threshold, th)
    f_inf = sae.encode(x)
    torch.testing.assert_close(f_inf, torch.where(acts > th, acts, torch.zeros_like(acts)))
    torch.testing.assert_close(sae.encode(x[:1]), f_inf[:1])  # independent of the other tokens
    assert "threshold" in sae.state_dict()


def test_jumprelu_forward_and_straight_through_gradients():
    # d_in = d_sae = 3, identity encoder, threshold 0.5, bandwidth 0.25: rectangle window |pre - 0.5| < 0.125.
    cfg = SAEConfig("jumprelu", 3, 3, HOOK, extra={"bandwidth": 0.25, "threshold_init": 0.5})
    sae = build_sae(cfg)
    assert isinstance(sae, JumpReLUSAE)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
    x = torch.tensor([[0.2, 0.6, 1.0], [0.7, 0.4, 0.55]], requires_grad=True)
    f, _ = sae.encode_with_hidden_pre(x)
    torch.testing.assert_close(f, torch.tensor([[0.0, 0.6, 1.0], [0.7, 0.0, 0.55]]))
    f.sum().backward()
    # d f / d pre = H(pre - theta)
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))
    # d sum(f) / d theta_k = -(theta/eps) * #entries in the window: feature 1 has 0.6 and 0.4, feature 2 has 0.55
    # -> [0, -4, -2] (the threshold is the parameter)
    torch.testing.assert_close(sae.threshold.grad, torch.tensor([0.0, -4.0, -2.0]))
    sae.threshold.grad = None
    x.grad = None
    step = sae.heaviside_ste(sae.hidden_pre(x))
    torch.testing.assert_close(step, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))
    step.sum().backward()
    assert torch.all(x.grad == 0)  # no gradient to the pre-activation through the step
    # d / d theta_k = -(1/eps) * count = [0, -8, -4]
    torch.testing.assert_close(sae.threshold.grad, torch.tensor([0.0, -8.0, -4.0]))


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
def test_fold_activation_scale_makes_the_sae_work_on_raw_activations(arch):
    sae = build_sae(_cfg(arch, threshold_init=0.3))
    with torch.no_grad():
        for p in (sae.b_enc, sae.b_dec):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    scaled = copy.deepcopy(sae).eval()
    s = 3.7
    fold_activation_scale(sae, s)
    sae.eval()
    x = _x() * 10
    torch.testing.assert_close(sae(x), scaled(x * s) / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), scaled.encode(x * s), rtol=1e-5, atol=1e-5)
    assert sae.cfg.extra["folded_activation_scale"] == pytest.approx(s)
    with pytest.raises(SAEError, match="positive finite"):
        sae.fold_activation_scale_(0.0)


def test_bad_dtype_and_sizes():
    with pytest.raises(SAEError, match="floating-point dtype"):
        build_sae(SAEConfig("standard", 4, 8, HOOK, dtype="int32"))
    with pytest.raises(SAEError, match="must be positive"):
        build_sae(SAEConfig("standard", 0, 8, HOOK))
    with pytest.raises(SAEError, match="bandwidth"):
        build_sae(SAEConfig("jumprelu", 4, 8, HOOK, extra={"bandwidth": 0.0}))


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
def test_encode_features_equals_selecting_columns_of_encode(arch):
    sae = build_sae(_cfg(arch, d_in=16, d_sae=40), seed=3)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.5, 0.5, 40))
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    feats = torch.tensor([0, 7, 39, 12, 7])
    with torch.no_grad():
        full = sae.encode(x)
        torch.testing.assert_close(sae.encode_features(x, feats), full[..., feats], atol=1e-6, rtol=0)
    assert (full > 0).any()


@pytest.mark.parametrize("extra", [{}, {"topk_relu": False}, {"input_normalization": "layer_norm"},
                                   {"skip_connection": True}, {"reshape_activations": "hook_z"}],
                         ids=["plain", "no-relu", "layer-norm", "skip", "hook_z"])
def test_topk_forward_from_the_selected_features_equals_the_dense_decode(extra):
    """TopK's reconstruction decoded from its k selected features (a weighted sum of k decoder rows) equals
    ``decode(encode(x), x)`` (the [.., d_sae] code times W_dec), on a [batch, pos, d_in] input, and so do the
    gradients it passes to x, W_dec and W_enc."""
    d_in = 16
    cfg = SAEConfig("topk", d_in, 40, "blocks.0.attn.hook_z" if extra.get("reshape_activations") else HOOK,
                    extra={"k": 5, **extra})
    sae = build_sae(cfg, seed=2)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.5, 0.5, 40))
        sae.b_dec.copy_(torch.linspace(-0.3, 0.3, d_in))
        if sae.skip_connection:
            sae.W_skip.copy_(0.1 * torch.randn(d_in, d_in, generator=torch.Generator().manual_seed(4)))
    shape = (3, 7, 4, 4) if extra.get("reshape_activations") else (3, 7, d_in)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    got = sae(x)
    want = sae.decode(sae.encode(x), x)
    assert got.shape == want.shape == (3, 7, d_in)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    w = torch.randn(3, 7, d_in, generator=torch.Generator().manual_seed(5))
    g_got = torch.autograd.grad((got * w).sum(), (x, sae.W_dec, sae.W_enc))
    g_want = torch.autograd.grad((want * w).sum(), (x, sae.W_dec, sae.W_enc))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
