"""SAE dtypes (issue 7 item 7): config and weights agree after any move, saving never rounds, thresholds keep
float32 precision, and every setting that affects inference or training is recorded in cfg.json."""

import json

import pytest
import torch

from saecircuits.saes.base import SAEConfig, SAEError, dtype_name
from saecircuits.saes.io import load_sae, save_sae
from saecircuits.saes.registry import build_sae
from saecircuits.saes.trainer import SAETrainer, TrainConfig

HOOK = "blocks.0.mlp.hook_post"
EXTRA = {"standard": {}, "topk": {"k": 3}, "batchtopk": {"k": 3}, "jumprelu": {"threshold_init": 0.3}}
ARCHS = ["standard", "topk", "batchtopk", "jumprelu"]


def _sae(arch="standard", dtype="float32", **extra):
    return build_sae(SAEConfig(arch, 6, 16, HOOK, dtype=dtype, extra={**EXTRA[arch], **extra}))


def _x(n=64, seed=0):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def test_bf16_sae_moved_to_fp32_saves_without_rounding(tmp_path):
    # the input: created in bfloat16, moved with .to(torch.float32), then changed in float32
    sae = _sae(dtype="bfloat16").to(torch.float32)
    assert sae.cfg.dtype == "float32"
    with torch.no_grad():
        sae.W_enc.add_(1e-3 * torch.randn(6, 16, generator=torch.Generator().manual_seed(1)))
    loaded = load_sae(save_sae(sae, tmp_path / "s"))
    assert loaded.cfg.dtype == "float32" and torch.equal(loaded.W_enc, sae.W_enc)
    assert torch.equal(loaded.encode(_x()), sae.encode(_x()))  # encode error 0 (2.6e-2 before the fix)


MOVES = {
    ".to(torch.float32)": (lambda m: m.to(torch.float32), torch.float32),
    ".to('cpu', torch.bfloat16)": (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    ".to(dtype=torch.float16)": (lambda m: m.to(dtype=torch.float16), torch.float16),
    ".to(tensor)": (lambda m: m.to(torch.zeros(1, dtype=torch.float64)), torch.float64),
    ".float()": (lambda m: m.float(), torch.float32),
    ".half()": (lambda m: m.half(), torch.float16),
    ".bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    ".double()": (lambda m: m.double(), torch.float64),
    ".type(torch.float64)": (lambda m: m.type(torch.float64), torch.float64),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("start", ["float32", "bfloat16"])
@pytest.mark.parametrize("move", sorted(MOVES))
def test_config_follows_every_move(arch, start, move):
    fn, dtype = MOVES[move]
    sae = fn(_sae(arch, start))
    assert sae.cfg.dtype == dtype_name(dtype) and sae.dtype == dtype
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert getattr(sae, name).dtype == dtype
    for name in sae.full_precision_tensors:  # thresholds: float32 at least
        expected = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        assert getattr(sae, name).dtype == expected
    assert sae.encode(_x()).dtype == dtype  # float32 inputs are cast, as SAELens does


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_thresholds_are_not_rounded_by_a_round_trip_through_bf16(arch, tmp_path):
    sae = _sae(arch)
    name = sae.full_precision_tensors[0]
    with torch.no_grad():
        getattr(sae, name).copy_(torch.linspace(0.01234567, 1.7654321, 16))  # not representable in bf16
    before = getattr(sae, name).detach().clone()
    sae.bfloat16()
    assert torch.equal(getattr(sae, name), before)  # kept, not rounded
    loaded = load_sae(save_sae(sae, tmp_path / "s"))
    assert loaded.cfg.dtype == "bfloat16" and torch.equal(loaded.threshold, sae.threshold)
    assert torch.equal(sae.float().__getattr__(name), before)


def test_dtype_strings():
    assert SAEConfig("standard", 4, 8, HOOK, dtype="torch.float32").dtype == "float32"
    assert SAEConfig("standard", 4, 8, HOOK, dtype="torch.bfloat16").dtype == "bfloat16"
    assert SAEConfig("standard", 4, 8, HOOK, dtype=torch.float16).dtype == "float16"
    assert build_sae(SAEConfig("standard", 4, 8, HOOK, dtype="torch.float64")).W_enc.dtype == torch.float64
    for bad in ("int32", "torch.int8", "float8_e4m3fn", "fp32", torch.int64):
        with pytest.raises(SAEError, match="not a supported torch floating-point dtype"):
            SAEConfig("standard", 4, 8, HOOK, dtype=bad)


def test_training_dtype_strings():
    from saecircuits.saes.presets import TrainSAEJob

    assert TrainConfig(autocast_dtype="torch.bfloat16").autocast_dtype == "bfloat16"
    assert TrainSAEJob(activation_dtype="torch.bfloat16").activation_dtype == "bfloat16"
    with pytest.raises(SAEError, match="autocast_dtype"):
        TrainConfig(autocast_dtype="int8")
    with pytest.raises(SAEError, match="activation_dtype"):
        TrainSAEJob(activation_dtype="float64")


def test_float16_autocast_is_refused_naming_bfloat16():
    """fp16 gradients underflow without a GradScaler (an fp16 gradient of 1e-8 is 0): refused, naming bfloat16."""
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0  # the underflow the refusal is about
    for name in ("float16", "torch.float16"):
        with pytest.raises(SAEError, match="'float16' is refused.*use 'bfloat16'"):
            TrainConfig(autocast_dtype=name)


def test_moving_one_sae_does_not_change_another_built_from_the_same_config():
    cfg = SAEConfig("jumprelu", 6, 16, HOOK)
    a, b = build_sae(cfg), build_sae(cfg)
    a.bfloat16()
    assert b.cfg.dtype == "float32" and cfg.dtype == "float32"
    assert cfg.extra == {}  # the caller's config is not filled in either


def test_parameters_of_different_dtypes_are_not_saved(tmp_path):
    sae = _sae()
    sae.W_dec.data = sae.W_dec.data.bfloat16()
    with pytest.raises(SAEError, match="different dtypes.*sae.to"):
        save_sae(sae, tmp_path / "s")


# --------------------------------------------------------------------------- precision under Adam
def test_bf16_jumprelu_threshold_moves_under_adam():
    # the input: a bfloat16 JumpReLU with threshold 1.1; 200 Adam steps
    sae = _sae("jumprelu", "bfloat16", threshold_init=1.1)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    lr, steps = 1e-4, 200
    opt = torch.optim.Adam([sae.threshold], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        sae.threshold.sum().backward()  # constant gradient 1: each Adam step is exactly lr / (1 + eps)
        opt.step()
    expected = 1.1 - steps * lr / (1 + 1e-8)
    # float32 rounding of 200 additions near 1.1 (ulp 1.2e-7): well below the 0.02 moved
    torch.testing.assert_close(sae.threshold.detach(), torch.full((16,), expected), rtol=0, atol=1e-5)
    # the same steps on a bfloat16 parameter are rounded away: it stays at bf16(1.1) = 1.1015625
    frozen = torch.nn.Parameter(torch.full((16,), 1.1, dtype=torch.bfloat16))
    opt = torch.optim.Adam([frozen], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        frozen.sum().backward()
        opt.step()
    assert float(frozen.detach()[0]) == 1.1015625


def test_bf16_jumprelu_threshold_moves_under_its_l0_gradient():
    sae = _sae("jumprelu", "bfloat16", threshold_init=1.1, bandwidth=0.5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(6, 16))
        sae.b_dec.zero_()
    x = torch.full((32, 6), 1.1)  # pre-activations inside the STE window of features 0..5
    opt = torch.optim.Adam([sae.threshold], lr=1e-3)
    for _ in range(50):
        opt.zero_grad()
        sae.heaviside_ste(sae.hidden_pre(x)).sum().backward()  # an L0 penalty pushes the thresholds up
        opt.step()
    moved = sae.threshold.detach()
    # the gradient keeps its sign while the pre-activations stay in the window, so each Adam step adds about lr:
    # 50 steps move it by ~0.05, six bf16 steps of 2**-7 at 1.1 (a bf16 threshold stays put)
    shift = moved[:6] - 1.1
    assert torch.all(shift > 0.045) and torch.all(shift < 0.055)
    torch.testing.assert_close(moved[6:], torch.full((10,), 1.1))  # no gradient there


def test_bf16_batchtopk_threshold_average_is_exact():
    sae = _sae("batchtopk", "bfloat16", threshold_lr=0.01).train()
    assert sae.threshold.dtype == torch.float32
    ema = None
    for seed in range(30):
        x = _x(8, seed)
        f, _ = sae.encode_with_hidden_pre(x)
        smallest = float(f.detach()[f > 0].min())
        ema = smallest if ema is None else 0.99 * ema + 0.01 * smallest  # float64, independently
    torch.testing.assert_close(sae.threshold, torch.full((16,), ema, dtype=torch.float32), rtol=1e-6, atol=0)


def test_trainer_refuses_low_precision_parameters():
    batches = iter([torch.randn(16, 6) for _ in range(3)])
    with pytest.raises(SAEError, match="W_enc is bfloat16: Adam steps.*autocast_dtype='bfloat16'"):
        SAETrainer(_sae(dtype="bfloat16"), batches, TrainConfig(batch_size=16, total_steps=2), progress=False)
    with pytest.raises(SAEError, match="is float16"):
        SAETrainer(_sae(dtype="float16"), batches, TrainConfig(batch_size=16, total_steps=2), progress=False)


# --------------------------------------------------------------------------- every setting is recorded
@pytest.mark.parametrize(
    "arch,recorded",
    [
        ("standard", {"seed": 47}),
        ("topk", {"k": 3, "seed": 47}),
        ("batchtopk", {"k": 3, "threshold_lr": 0.01, "seed": 47}),
        ("jumprelu", {"bandwidth": 0.05, "threshold_init": 0.01, "seed": 47}),
    ],
)
def test_defaults_are_written_to_cfg_json(tmp_path, arch, recorded):
    extra = {"k": 3} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(SAEConfig(arch, 6, 16, HOOK, extra=extra))
    assert sae.cfg.extra == recorded
    d = json.loads((save_sae(sae, tmp_path / "s") / "cfg.json").read_text())
    assert d["saecircuits"]["config"]["extra"] == recorded
    assert load_sae(tmp_path / "s").cfg.extra == recorded


def test_recorded_seed_rebuilds_the_same_initialisation(tmp_path):
    sae = build_sae(SAEConfig("standard", 6, 16, HOOK), seed=5)
    assert sae.cfg.extra["seed"] == 5
    again = build_sae(load_sae(save_sae(sae, tmp_path / "s")).cfg)
    assert torch.equal(again.W_enc, sae.W_enc) and torch.equal(again.W_dec, sae.W_dec)


def test_jumprelu_settings_survive_a_round_trip(tmp_path):
    sae = _sae("jumprelu", bandwidth=0.05, threshold_init=0.2)
    loaded = load_sae(save_sae(sae, tmp_path / "s"))
    assert loaded.bandwidth == 0.05 and loaded.threshold_init == 0.2
    d = json.loads((tmp_path / "s" / "cfg.json").read_text())
    details = d["metadata"]["training_architecture_details"]
    assert details == {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.2}  # SAELens' names


def test_batchtopk_threshold_never_estimated_stays_unestimated_after_a_reload(tmp_path):
    fresh = load_sae(save_sae(_sae("batchtopk"), tmp_path / "fresh")).train()
    assert int(fresh.threshold_updates) == 0
    x = _x(8)
    f, _ = fresh.encode_with_hidden_pre(x)
    # the first update sets the threshold to the smallest kept activation (no average with the unset 0)
    torch.testing.assert_close(fresh.threshold, torch.full((16,), float(f.detach()[f > 0].min())))
    trained = load_sae(save_sae(fresh, tmp_path / "trained"))
    assert int(trained.threshold_updates) == 1
