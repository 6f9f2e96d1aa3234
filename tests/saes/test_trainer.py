"""SAETrainer against hand computations: one Adam step, schedules, normalisation folding, resampling; one-pass helper."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from saecircuits.saes.base import SAEConfig, SAEError
from saecircuits.saes.registry import build_sae
from saecircuits.saes.trainer import SAETrainer, TrainConfig, explained_variance, train_saes_on_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

D_IN, D_SAE = 8, 24


def _batches(n: int, batch: int = 16, d_in: int = D_IN, seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, d_in, generator=gen) for _ in range(n)]


def _sae(seed: int = 1, d_in: int = D_IN, d_sae: int = D_SAE, arch: str = "standard", **extra):
    return build_sae(SAEConfig(arch, d_in, d_sae, "blocks.0.mlp.hook_post", extra=dict(extra)), seed=seed)


def test_one_step_equals_hand_adam_step():
    """Step 1 of Adam moves every coordinate by lr * g / (|g| + eps') (bias-corrected moments: m_hat = g, v_hat = g^2)."""
    sae = _sae()
    ref = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    x = _batches(1)[0]
    lr, c = 1e-2, 0.1
    cfg = TrainConfig(batch_size=16, total_steps=1, lr=lr, loss={"regularizer": "l1", "coefficients": [c]})
    SAETrainer(sae, iter([x]), cfg, progress=False).train_step()

    params = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    f = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
    x_hat = f @ params["W_dec"] + params["b_dec"]
    loss = ((x_hat - x) ** 2).sum(-1).mean() + c * f.abs().sum(-1).mean()
    loss.backward()
    w = ref["W_dec"] / ref["W_dec"].norm(dim=-1, keepdim=True)
    g_dec = (
        params["W_dec"].grad - (params["W_dec"].grad * w).sum(-1, keepdim=True) * w
    )  # parallel part removed
    grads = {
        "W_enc": params["W_enc"].grad,
        "W_dec": g_dec,
        "b_enc": params["b_enc"].grad,
        "b_dec": params["b_dec"].grad,
    }
    eps = 1e-8
    for k, g in grads.items():
        # Adam step 1: m_hat = g, v_hat = g^2 -> update lr * g / (|g| + eps)
        expected = ref[k] - lr * g / (g.abs() + eps)
        if k == "W_dec":
            expected = expected / expected.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(getattr(sae, k).detach(), expected, rtol=1e-5, atol=1e-6)


def test_a_step_under_no_grad_trains_as_usual():
    """Called from a notebook cell under torch.no_grad(), a training step still computes gradients."""
    x = _batches(1)[0]
    cfg = TrainConfig(batch_size=16, total_steps=1, lr=1e-2, loss={"regularizer": "l1", "coefficients": [0.1]})
    a, b = _sae(), _sae()
    SAETrainer(a, iter([x]), cfg, progress=False).train_step()
    with torch.no_grad():
        SAETrainer(b, iter([x]), cfg, progress=False).train_step()
    assert not torch.equal(a.W_enc, _sae().W_enc)  # the step moved the weights
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)


def test_decoder_rows_stay_unit_norm_after_every_step():
    sae = _sae()
    cfg = TrainConfig(
        batch_size=16, total_steps=6, lr=5e-2, loss={"regularizer": "l1", "coefficients": [1e-2]}
    )
    tr = SAETrainer(sae, iter(_batches(6)), cfg, progress=False)
    for _ in range(6):
        tr.train_step()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), rtol=0, atol=1e-6)


def test_lr_and_sparsity_schedules_hand_values():
    cfg = TrainConfig(
        batch_size=16,
        total_steps=10,
        lr=1.0,
        lr_warmup_steps=4,
        lr_decay_steps=5,
        lr_end_factor=0.0,
        sparsity_warmup_steps=4,
        log_every=1,
    )
    tr = SAETrainer(_sae(), iter(_batches(10)), cfg, progress=False)
    lrs, logged = [], []
    for _ in range(10):
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        logged.append(tr.train_step()["lr"])
    assert logged == lrs  # the metrics line reports the rate used by that step
    # warm-up 1/4, 2/4, 3/4, 1; constant; decay over the last 5 steps: (10 - s) / 5 for s = 5..9
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert [tr.sparsity_scale(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_sparsity_warmup_scales_only_the_penalty():
    """With warm-up 2, step 1 uses half the coefficient: identical to an un-warmed run with coefficient c/2."""
    x = _batches(1)[0]
    a, b = _sae(), _sae()
    cfg_a = TrainConfig(
        batch_size=16, total_steps=1, lr=1e-2, sparsity_warmup_steps=2, loss={"coefficients": [0.4]}
    )
    cfg_b = TrainConfig(batch_size=16, total_steps=1, lr=1e-2, loss={"coefficients": [0.2]})
    SAETrainer(a, iter([x]), cfg_a, progress=False).train_step()
    SAETrainer(b, iter([x]), cfg_b, progress=False).train_step()
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k))


def test_normalisation_scale_estimated_and_folded():
    batches = _batches(8, scale=7.0)
    cfg = TrainConfig(batch_size=16, total_steps=8, lr=1e-2, normalize_activations=True, n_norm_batches=3)
    tr = SAETrainer(_sae(), iter(batches), cfg, progress=False)
    tr.train_step()
    expected = math.sqrt(D_IN) / float(torch.stack([b.norm(dim=-1).mean() for b in batches[:3]]).mean())
    assert tr.scale == pytest.approx(expected, rel=1e-6)
    while tr.step < 8:
        tr.train_step()
    assert tr.batches_consumed == 8  # the norm batches were put back and trained on
    raw = tr.finished_sae()
    x = _batches(1, seed=5, scale=7.0)[0]
    # saved SAE on raw activations == training SAE on scaled activations, divided by the scale
    torch.testing.assert_close(raw(x), tr.sae(x * tr.scale) / tr.scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw.encode(x), tr.sae.encode(x * tr.scale), rtol=1e-5, atol=1e-5)
    assert raw.cfg.extra["folded_activation_scale"] == pytest.approx(tr.scale)


def test_normalising_all_zero_activations_is_a_clear_error():
    """The scale sqrt(d_in) / mean norm has a zero denominator: a clear error, not a ZeroDivisionError."""
    cfg = TrainConfig(batch_size=16, total_steps=2, normalize_activations=True, n_norm_batches=1)
    tr = SAETrainer(_sae(), iter([torch.zeros(16, D_IN)] * 2), cfg, progress=False)
    with pytest.raises(SAEError, match="cannot be normalised"):
        tr.train_step()


def test_resampling_picks_the_only_badly_reconstructed_input():
    """Feature 0 never fires; the pool has one row only feature 0 could reconstruct -> p ~ err^4 must draw it."""
    d_in = 4
    sae = build_sae(SAEConfig("standard", d_in, 2 * d_in, "blocks.0.mlp.hook_post"))
    eye = torch.eye(d_in)
    with (
        torch.no_grad()
    ):  # W_enc = [I, -I], W_dec = [I; -I]: exact wherever the live features cover the signs
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc[0] = -100.0  # feature 0 cannot fire on any input used here
    # column 0 always negative -> feature 0 (positive part of x0) is dead; columns 1..3 take both signs
    train = torch.tensor(
        [[-0.5, 1.0, -1.0, 0.5], [-0.2, -0.7, 0.3, -0.4], [-0.9, 0.2, 0.8, -0.1], [-0.3, -0.5, -0.6, 0.9]]
    )
    pool = train.clone()
    odd = torch.tensor([5.0, 0.0, 0.0, 0.0])  # reconstructed as 0 (feature 0 dead): error 5, weight 625
    pool[2] = odd
    cfg = TrainConfig(
        batch_size=4,
        total_steps=2,
        lr=1e-9,
        resample_window=1,
        dead_frequency=0.0,
        resample_pool_batches=1,
        loss={"regularizer": "none", "coefficients": []},
    )
    tr = SAETrainer(sae, iter([train, pool, train]), cfg, progress=False)
    tr.train_step()
    for st in tr.optimizer.state.values():  # mark the Adam moments to see which entries get reset
        st["exp_avg"].fill_(1.0)
        st["exp_avg_sq"].fill_(1.0)
    assert tr.resample_dead() == 1
    assert tr.n_resampled_total == 1
    torch.testing.assert_close(sae.W_dec[0].detach(), odd / 5.0)
    assert sae.b_enc[0] == 0
    # new encoder column = 0.2 * mean norm of the alive encoder columns (1..7) * the unit decoder row
    enc_norm_alive = sae.W_enc[:, 1:].detach().norm(dim=0).mean()
    torch.testing.assert_close(sae.W_enc[:, 0].detach(), 0.2 * enc_norm_alive * odd / 5.0)
    for p, sel in ((sae.W_enc, (slice(None), 0)), (sae.W_dec, (0,)), (sae.b_enc, (0,))):
        st = tr.optimizer.state[p]
        assert torch.all(st["exp_avg"][sel] == 0) and torch.all(st["exp_avg_sq"][sel] == 0)
    assert torch.all(tr.optimizer.state[sae.W_dec]["exp_avg_sq"][1:] == 1)  # other rows untouched
    assert torch.all(tr.optimizer.state[sae.W_enc]["exp_avg"][:, 1:] == 1)
    assert torch.all(tr.optimizer.state[sae.b_dec]["exp_avg"] == 1)  # b_dec untouched


def test_resampling_is_seeded():
    def run(seed):
        cfg = TrainConfig(
            batch_size=16,
            total_steps=4,
            lr=1e-2,
            seed=seed,
            resample_steps=(2,),
            resample_window=2,
            dead_frequency=0.5,
            resample_pool_batches=2,
        )
        sae = _sae()
        with torch.no_grad():
            sae.b_enc[:12] = -50.0
        tr = SAETrainer(sae, iter(_batches(6)), cfg, progress=False)
        for _ in range(4):
            tr.train_step()
        assert tr.n_resampled_total >= 12
        return sae.W_dec.detach().clone()

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_explained_variance_fixture():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    assert explained_variance(x, x) == pytest.approx(1.0)
    assert explained_variance(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(0.0, abs=1e-7)
    # hand value: residual 1; total sum of squares: column 0 (mean 3) 4+0+4 = 8, column 1 (mean 3) 1+9+4 = 14
    x_hat = x.clone()
    x_hat[0, 0] += 1.0
    assert explained_variance(x, x_hat) == pytest.approx(1 - 1 / 22, rel=1e-6)
    # a batch with no variance: undefined (NaN), not a huge negative number (the old clamp gave -1e38)
    flat = torch.ones(4, 2)
    assert math.isnan(explained_variance(flat, flat + 0.1))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(SAEError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1})
    cfg = TrainConfig(batch_size=16, total_steps=3)
    tr = SAETrainer(_sae(), iter([torch.zeros(16, D_IN + 1)]), cfg, progress=False)
    with pytest.raises(SAEError, match="expected activation batches"):
        tr.train_step()
    tr = SAETrainer(_sae(), iter(_batches(1)), cfg, progress=False)
    with pytest.raises(SAEError, match="ran out"):
        tr.fit()


def test_bf16_autocast_trains():
    cfg = TrainConfig(batch_size=16, total_steps=3, lr=1e-2, autocast_dtype="bfloat16")
    sae = _sae()
    tr = SAETrainer(sae, iter(_batches(3)), cfg, progress=False)
    tr.fit()
    assert sae.W_enc.dtype == torch.float32 and torch.isfinite(sae.W_enc).all()


@pytest.mark.parametrize(
    "arch,extra,loss",
    [
        ("topk", {"k": 4}, {"regularizer": "none", "coefficients": [], "aux_k": 8}),
        ("batchtopk", {"k": 4}, {"regularizer": "none", "coefficients": []}),
        ("jumprelu", {}, {"regularizer": "l0", "coefficients": [1e-2]}),
    ],
)
def test_other_architectures_train(arch, extra, loss):
    from saecircuits.saes.registry import architectures

    if arch not in architectures():
        pytest.skip(f"architecture {arch!r} not registered yet")
    sae = _sae(arch=arch, **extra)
    cfg = TrainConfig(batch_size=16, total_steps=30, lr=1e-2, loss=loss, dead_window_steps=5, log_every=10)
    tr = SAETrainer(sae, iter(_batches(30)), cfg, progress=False)
    first = None
    for _ in range(30):
        m = tr.train_step()
        if m is not None and first is None:
            first = m["mse"]
    assert tr.last_metrics["mse"] < first


# ------------------------------------------------------------------------------------------- one pass of the model
def test_train_saes_on_model_one_pass_two_layers(tmp_path):
    from helpers import STORIES, tiny_neo, tiny_tokenizer

    from saecircuits.data.activations import pack_token_rows
    from saecircuits.saes.io import load_sae

    bridge, tok = tiny_neo(), tiny_tokenizer()
    rows = pack_token_rows(
        [tok.encode(s, add_special_tokens=False) for s in STORIES] * 3, 16, tok.bos_token_id
    )
    calls = []
    original = bridge.run_with_hooks  # the data path's forward (reading hooks, ended after the last one)

    def counting(*args, **kwargs):
        calls.append(kwargs.get("stop_at_layer"))
        return original(*args, **kwargs)

    bridge.run_with_hooks = counting
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    cfg = TrainConfig(
        batch_size=64,
        total_steps=60,
        lr=1e-2,
        log_every=20,
        normalize_activations=True,
        loss={"regularizer": "l1", "coefficients": [1e-3]},
    )
    saes = train_saes_on_model(
        bridge,
        rows,
        hooks,
        cfg,
        bos_id=tok.bos_token_id,
        bos_policy="exclude",
        model_batch_rows=8,
        output_dir=tmp_path,
        progress=False,
    )
    assert set(saes) == set(hooks)
    n_chunks = math.ceil(rows.shape[0] / 8)
    # one forward per chunk serves both hook points; the rows repeat (epochs) until 60 steps are done
    tokens_needed = 60 * 64
    assert len(calls) >= tokens_needed / (rows.shape[0] * 15) * n_chunks * 0.9
    assert len(calls) <= (tokens_needed + 16 * 64) // (8 * 15) + 2 * n_chunks
    for hp in hooks:
        sae = saes[hp]
        assert sae.d_sae == 4 * 64 and sae.hook_point == hp
        lines = [json.loads(s) for s in (tmp_path / hp / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [20, 40, 60]
        assert lines[-1]["mse"] < lines[0]["mse"]
        loaded = load_sae(tmp_path / hp / "sae")
        # how the SAE was trained is in its cfg.json: the train config and how the batches were made
        training = loaded.cfg.extra["training"]
        assert training["steps"] == 60 and training["loss"]["coefficients"] == [1e-3]
        assert training["data"]["bos_policy"] == "exclude" and training["data"]["bos_id"] == tok.bos_token_id
        assert training["data"]["seq_len"] == rows.shape[1] and training["data"]["activation_dtype"] == "float32"
        assert loaded.cfg.extra["seed"] == 47
        _, cache = bridge.run_with_cache(rows[:2], names_filter=[hp])
        act = cache[hp].reshape(-1, 64)
        torch.testing.assert_close(loaded(act), sae(act))
        assert explained_variance(act, sae(act)) > 0.5  # works on RAW activations (scale folded)


def test_presets_follow_spec_section_10():
    from saecircuits.saes.presets import TrainSAEJob, preset

    p54, p189 = preset("54_serene_plasma"), preset("189_giddy_water", train={"total_steps": 7})
    assert p54.hook_points == ["blocks.0.mlp.hook_post"] and p189.hook_points == ["blocks.1.mlp.hook_post"]
    assert p54.train.loss == {"regularizer": "l1", "coefficients": [3e-4], "batch_reduction": "sum"}
    lc = p189.train.loss_config()
    assert (
        lc.regularizer == "combined_hoyer_sqrt"
        and lc.coefficients == (1e-4, 1.5e-4)
        and lc.batch_reduction == "sum"
    )
    assert (p54.train.batch_size, p189.train.batch_size) == (4096, 5080)
    assert p54.train.total_steps == 5 * 10**8 // 4096 and p189.train.total_steps == 7
    assert (
        p54.train.resample_steps == (25_000, 50_000, 75_000, 100_000) and p54.train.resample_window == 12_500
    )
    assert p189.train.resample_steps == (15_000, 25_000, 50_000, 75_000) and p189.train.dead_frequency == 1e-5
    assert p54.train.lr == p189.train.lr == 1e-4 and p54.train.betas == (0.9, 0.99) and p54.train.seed == 47
    assert (p54.bos_policy, p189.bos_policy) == ("include", "exclude_first")
    assert TrainSAEJob.from_dict(p189.to_dict()) == p189  # JSON round trip
    with pytest.raises(SAEError, match="unknown preset"):
        preset("55_serene_plasma")


def test_metrics_log_has_the_log10_density_histogram(tmp_path):
    """Every logged line carries a log10 feature-density histogram over its window; a feature that never fires
    (encoder bias very negative) lands in the first bin, and the bins count every feature once."""
    sae = _sae()
    with torch.no_grad():
        sae.b_enc[0] = -1e6
    cfg = TrainConfig(batch_size=16, total_steps=4, lr=1e-3, log_every=2, loss={"regularizer": "l1", "coefficients": [0.0]})
    SAETrainer(sae, iter(_batches(4)), cfg, checkpoint_dir=tmp_path, progress=False).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        hist = m["log10_density_hist"]["counts"]
        assert 0 < m["shrinkage"] < 2
        assert sum(hist) == D_SAE
        assert hist[0] >= 1


# ------------------------------------------------------------------------------- issue 18: SAEs that must move
def _model_activations():
    """MLP-out activations [tokens, 64] of the tiny GPT-Neo on the fixture stories (BOS dropped)."""
    from helpers import HOOK, SENTENCES, STORIES, tiny_neo, tiny_tokenizer

    bridge, tok = tiny_neo(), tiny_tokenizer()
    acts = []
    with torch.no_grad():
        for text in STORIES + SENTENCES:
            row = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
            _, cache = bridge.run_with_cache(torch.tensor([row]), names_filter=[HOOK])
            acts.append(cache[HOOK][0, 1:])
    return torch.cat(acts), HOOK


def test_jumprelu_l0_responds_to_its_coefficient_within_the_default_steps():
    # issue 18 kind 4: trained as exp(log_threshold), the threshold moved by about threshold * lr per step, so in
    # train-sae's 1,000 default steps it stayed within init * exp(steps * lr) and L0 ignored the coefficient
    acts, hook = _model_activations()
    defaults = TrainConfig()
    steps, lr = defaults.total_steps, defaults.lr
    l0, mean_threshold = {}, {}
    for coefficient in (1e-4, 1e-1):
        sae = build_sae(SAEConfig("jumprelu", 64, 256, hook))
        gen = torch.Generator().manual_seed(0)
        batches = (acts[torch.randint(0, acts.shape[0], (128,), generator=gen)] for _ in range(steps))
        cfg = TrainConfig(batch_size=128, loss={"regularizer": "l0", "coefficients": [coefficient]}, log_every=steps)
        trained = SAETrainer(sae, batches, cfg, progress=False).fit()
        assert cfg.total_steps == steps and cfg.lr == lr  # train-sae's defaults
        with torch.no_grad():
            l0[coefficient] = float((trained.encode(acts) > 0).float().sum(-1).mean())
        mean_threshold[coefficient] = float(trained.threshold.detach().mean())
        assert float(trained.threshold.min()) >= 0  # clamped after every step
    init = trained.cfg.extra["threshold_init"]
    # the bound a log-parametrised threshold could not pass, against one that moves by about lr per step
    assert mean_threshold[1e-1] > 5 * init * math.exp(steps * lr)
    assert l0[1e-1] < 0.8 * l0[1e-4], l0  # clearly sparser (measured: 145 -> 100 of 256)


def test_jumprelu_threshold_is_kept_non_negative_and_old_state_dicts_load():
    sae = _sae(arch="jumprelu", threshold_init=0.01)
    opt = torch.optim.SGD([sae.threshold], lr=1.0)
    sae.threshold.grad = torch.linspace(-0.5, 0.5, D_SAE)
    opt.step()
    sae.after_optimizer_step_()
    expected = (0.01 - torch.linspace(-0.5, 0.5, D_SAE)).clamp(min=0)
    assert torch.equal(sae.threshold.detach(), expected)
    # a state_dict from before the threshold was trained directly holds log_threshold
    old = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    old["log_threshold"] = torch.full((D_SAE,), math.log(0.25))
    fresh = _sae(arch="jumprelu")
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.threshold.detach(), torch.full((D_SAE,), 0.25))


def test_a_checkpoint_with_a_log_threshold_is_refused(tmp_path):
    sae = _sae(arch="jumprelu")
    cfg = TrainConfig(batch_size=16, total_steps=2, checkpoint_every=1, loss={"regularizer": "l0",
                                                                           "coefficients": [1e-3]})
    tr = SAETrainer(sae, iter(_batches(2)), cfg, checkpoint_dir=tmp_path, progress=False)
    tr.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["sae"]["log_threshold"] = state["sae"].pop("threshold").log()
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(SAEError, match="exp\\(log_threshold\\).*delete it"):
        SAETrainer(_sae(arch="jumprelu"), iter(_batches(4)), cfg, checkpoint_dir=tmp_path, resume=True,
                   progress=False)


def test_continued_training_of_a_loaded_batchtopk_moves_its_threshold(tmp_path):
    # issue 18 kind 4: a loaded SAE is in eval mode, where BatchTopK does not update its running threshold
    from saecircuits.saes.io import load_sae, save_sae

    sae = _sae(arch="batchtopk", k=3)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    loaded = load_sae(save_sae(sae, tmp_path / "s"))
    assert not loaded.training
    (x,) = _batches(1, seed=5)
    with torch.no_grad():  # the step's update, by hand: 0.99 * 0.3 + 0.01 * the smallest kept activation
        acts = torch.relu((x - loaded.b_dec) @ loaded.W_enc + loaded.b_enc).flatten()
        kept = acts.topk(3 * x.shape[0]).values
        smallest = float(kept[kept > 0].min())
    tr = SAETrainer(loaded, iter([x]), TrainConfig(batch_size=16, total_steps=1, loss={"regularizer": "none",
                                                                                       "coefficients": []}),
                    progress=False)
    tr.fit()
    torch.testing.assert_close(tr.sae.threshold, torch.full((D_SAE,), 0.99 * 0.3 + 0.01 * smallest))
    assert not tr.sae.training  # back in eval mode after training


def test_training_metrics_name_their_explained_variance_over_tokens(tmp_path):
    # issue 18 kind 8: results.json's explained_variance_at_p is across prompts at P; the training log's is over the
    # batch's tokens, and now says so
    import copy

    from saecircuits.pipeline import _final_metrics

    sae = _sae()
    (x,) = _batches(1, seed=3)
    before = copy.deepcopy(sae)
    tr = SAETrainer(sae, iter([x]), TrainConfig(batch_size=16, total_steps=1, log_every=1), checkpoint_dir=tmp_path,
                    progress=False)
    tr.fit()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "explained_variance" not in line
    with torch.no_grad():  # by hand, with the weights the step's forward pass used
        x_hat = before(x)
        expected = 1 - float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert line["explained_variance_tokens"] == pytest.approx(expected, rel=1e-5)
    # an SAE cached by an older version logged it as "explained_variance": read under the new name
    old = tmp_path / "cache" / "blocks.0.mlp.hook_post"
    old.mkdir(parents=True)
    (old / "metrics.jsonl").write_text(json.dumps({"step": 5, "explained_variance": 0.5}) + "\n")
    assert _final_metrics(tmp_path / "cache", ["blocks.0.mlp.hook_post"]) == {
        "blocks.0.mlp.hook_post": {"step": 5, "explained_variance_tokens": 0.5}}
