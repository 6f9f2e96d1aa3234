"""Big SAEs load without a float32/float64 copy of their tensors, and the unwritten allocation behind it leaves
nothing unset (issue 14, item 6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saecircuits.saes.base import SAEConfig
from saecircuits.saes.io import build_empty_sae, load_sae, save_sae
from saecircuits.saes.registry import build_sae

D, F = 24, 40
CASES = {
    "standard": SAEConfig("standard", D, F, "blocks.0.hook_resid_post"),
    "topk": SAEConfig("topk", D, F, "blocks.0.hook_resid_post", extra={"k": 5}),
    "jumprelu": SAEConfig("jumprelu", D, F, "blocks.0.hook_resid_post"),
    "batchtopk": SAEConfig("batchtopk", D, F, "blocks.0.hook_resid_post", extra={"k": 5}),
    "gated": SAEConfig("gated", D, F, "blocks.0.hook_resid_post"),
    "skip transcoder": SAEConfig("jumprelu", D, F, "blocks.0.ln2.hook_normalized", d_out=16,
                                 hook_point_out="blocks.0.hook_mlp_out", apply_b_dec_to_input=False,
                                 extra={"skip_connection": True}),
}


def _random(cfg: SAEConfig, dtype: str, seed: int = 0):
    sae = build_sae(SAEConfig(**{**cfg.to_dict(), "dtype": dtype}), initialize=False)  # (initialize_ has no d_out)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.5 if "threshold" in name else 0.0))
        if hasattr(sae, "threshold") and not isinstance(type(sae).__dict__.get("threshold"), property):
            sae.threshold.copy_(torch.rand(F, generator=gen) + 0.05)
    return sae


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(CASES))
def test_load_into_unwritten_memory_equals_the_zero_filled_build(arch, dtype, tmp_path, monkeypatch):
    """Poison every fresh allocation (NaN, or -7 for integers): the loaded SAE must equal the one built the old way
    (zero-filled, then the weights copied in), every parameter and buffer, bit for bit."""
    sae = _random(CASES[arch], dtype)
    folder = save_sae(sae, tmp_path / "sae")
    weights = {k: v.clone() for k, v in sae.export_weights().items()}
    reference = build_sae(sae.cfg, initialize=False).import_weights_(weights)  # the zero-filled path

    real_empty = torch.empty

    def poisoned(*shape, dtype=None, **kw):
        t = real_empty(*shape, dtype=dtype, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)
    loaded = load_sae(folder)
    monkeypatch.undo()
    ref_state, state = reference.state_dict(), loaded.state_dict()
    assert sorted(state) == sorted(ref_state)
    for name, value in ref_state.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    assert loaded.cfg.dtype == dtype
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), reference.encode(x))


def test_build_empty_sae_has_the_built_structure():
    for cfg in CASES.values():
        empty, built = build_empty_sae(cfg), build_sae(cfg, initialize=False)
        assert {k: (v.shape, v.dtype, v.device) for k, v in empty.state_dict().items()} == {
            k: (v.shape, v.dtype, v.device) for k, v in built.state_dict().items()}
        assert [n for n, _ in empty.named_parameters()] == [n for n, _ in built.named_parameters()]
        assert all(p.requires_grad for p in empty.parameters())


def test_unfolded_tensors_are_never_upcast(tmp_path, monkeypatch):
    """A bfloat16 SAE with nothing to fold: no tensor of the file goes through float32 or float64."""
    sae = _random(CASES["jumprelu"], "bfloat16")
    folder = save_sae(sae, tmp_path / "sae")
    upcast = []
    for method in ("double", "float"):
        real = getattr(torch.Tensor, method)

        def spy(self, *a, _real=real, **kw):
            upcast.append(tuple(self.shape))
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, method, spy)
    load_sae(folder)
    monkeypatch.undo()
    assert not [s for s in upcast if s in ((D, F), (F, D))], upcast


# VmHWM (this process's peak resident memory), not getrusage's ru_maxrss: the latter keeps the parent's peak across
# fork + exec, so a child of a big pytest process would report the parent's size.
_CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from saecircuits.saes.io import load_sae
def status(key):
    line = next(ln for ln in open('/proc/self/status') if ln.startswith(key + ':'))
    return int(line.split()[1]) * 1024
base = status('VmRSS')
assert status('VmHWM') < base + (16 << 20), 'the imports peaked above the baseline'
sae = load_sae(sys.argv[1])
print(json.dumps({"peak": status('VmHWM') - base, "dtype": sae.cfg.dtype}))
"""


def test_peak_memory_of_a_bf16_load_stays_near_two_copies_of_the_file(tmp_path):
    """Measured in a fresh process: the file's pages (memory-mapped) plus the SAE's own bfloat16 copy, about 2x the
    file; a float32 copy of every tensor on top would be about 4x, the float64 upcast this replaced about 6x."""
    d_in, d_sae = 1024, 16384  # two 32 MiB bfloat16 matrices
    sae = build_empty_sae(SAEConfig("standard", d_in, d_sae, "blocks.0.hook_resid_post", dtype="bfloat16"))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    folder = save_sae(sae, tmp_path / "big")
    size = sum(p.stat().st_size for p in Path(folder).iterdir())
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "bfloat16"
    assert result["peak"] < 3.0 * size, (result["peak"] / size, size)
