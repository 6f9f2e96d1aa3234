"""``SAE.active_entries`` (the corpus pass's sparse view of the codes): a TopK SAE's override, which never builds the
dense ``[..., d_sae]`` code, gives exactly the entries and values of the dense code's ``torch.nonzero(f > 0)``, in
its order, for every TopK variant (ReLU or not, layer-norm inputs, bf16), with a mask, ties and non-positive kept
values; and the generic path equals the dense code written out."""

import pytest
import torch

from saecircuits.saes.base import SAE, SAEConfig
from saecircuits.saes.registry import build_sae

HOOK = "blocks.0.mlp.hook_post"


def _sae(arch: str, dtype: str = "float32", **extra):
    gen = torch.Generator().manual_seed(5)
    cfg = SAEConfig(arch, 12, 40, HOOK, dtype=dtype, extra=extra)
    sae = build_sae(cfg, seed=2)
    with torch.no_grad():
        sae.b_enc.copy_((torch.randn(40, generator=gen) * 0.3).to(sae.b_enc.dtype))
        sae.W_enc[:, 7] = sae.W_enc[:, 3]  # features 3 and 7 tie on every token
        sae.b_enc[7] = sae.b_enc[3]
    return sae


def _dense(sae: SAE, x, mask):
    """The codes written out densely: encode, zero the masked rows, every positive entry in nonzero's order."""
    f = sae.encode(x).float()
    f[~mask] = 0.0
    idx = torch.nonzero(f > 0, as_tuple=True)
    return (*idx, f[idx])


@pytest.mark.parametrize("variant", ["relu", "no_relu", "layer_norm", "bf16", "batchtopk", "standard"])
def test_active_entries_equal_the_dense_codes_nonzero(variant):
    gen = torch.Generator().manual_seed(0)
    kw = {"batchtopk": ("batchtopk", {"k": 4}), "standard": ("standard", {})}.get(variant, ("topk", {"k": 6}))
    dtype = "bfloat16" if variant == "bf16" else "float32"
    extra = dict(kw[1])
    if variant == "no_relu":
        extra["topk_relu"] = False  # kept values may be negative: not active
    sae = _sae(kw[0], dtype, **extra)
    if variant == "no_relu":
        with torch.no_grad():
            sae.b_enc -= 1.0  # many kept pre-activations negative
    if variant == "layer_norm":
        sae.input_normalization = "layer_norm"
    x = torch.randn(3, 9, 12, generator=gen).to(sae.W_enc.dtype)
    x[1, 4] = 0.0  # pre-activation = b_enc: the tie and the biases decide
    mask = torch.rand(3, 9, generator=gen) > 0.3
    want = _dense(sae, x, mask)
    got = sae.active_entries(x, mask)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), variant
    assert len(want[0]) > (5 if variant == "no_relu" else 20)  # the case has entries to compare
    if variant == "no_relu":
        assert (sae.encode(x) < 0).any()  # negative kept values exist and are left out
    # no mask: every row
    for g, w in zip(sae.active_entries(x), _dense(sae, x, torch.ones(3, 9, dtype=torch.bool)), strict=True):
        assert torch.equal(g, w)
