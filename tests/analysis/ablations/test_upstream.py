"""Upstream ablation against unbatched manual interventions; a hook that does not feed the SAE changes nothing."""

import pytest
import torch
from helpers import quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.upstream import upstream_ablation_effect

FEATS = [0, 5, 17, 40]


def _manual(model, sae, task, hook, value=None):
    out = []
    for toks in task.token_ids:
        p = len(toks) - 1

        def ablate(v, hook=None, p=p):
            v = v.clone()
            v[0, p] = 0 if value is None else value
            return v

        grabbed = {}

        def read(v, hook=None, grabbed=grabbed):
            grabbed["x"] = v[0, -1].detach().clone()

        with torch.no_grad():
            model.run_with_hooks(torch.tensor([toks]), fwd_hooks=[(hook, ablate), (sae.hook_point, read)])
        out.append(sae.encode(grabbed["x"])[FEATS])
    return torch.stack(out)


def test_zero_ablation_matches_manual_and_changes_something():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    res = upstream_ablation_effect(model, sae, task, FEATS, "blocks.0.mlp.hook_post", "zero")
    torch.testing.assert_close(
        res.ablated, _manual(model, sae, task, "blocks.0.mlp.hook_post"), atol=1e-5, rtol=1e-5
    )
    assert (res.ablated - res.clean).abs().max() > 1e-3
    for j in range(len(FEATS)):
        assert res.clean_mean[j].mean == pytest.approx(float(res.clean[:, j].mean()), abs=1e-6)
        active = res.clean[:, j] > 0
        if active.any():  # conditional means: both sides over the clean-active prompts
            assert res.clean_mean_active[j].n == res.ablated_mean_active[j].n == int(active.sum())
            assert res.ablated_mean_active[j].mean == pytest.approx(
                float(res.ablated[active, j].mean()), abs=1e-6
            )
        assert res.diff_mean[j].mean == pytest.approx(
            float((res.ablated[:, j] - res.clean[:, j]).mean()), abs=1e-6
        )


def test_hook_downstream_of_sae_changes_nothing():
    model, task = tiny_neo(), quote_task()
    sae0 = random_sae(hook_point="blocks.0.mlp.hook_post")
    res = upstream_ablation_effect(model, sae0, task, FEATS, "blocks.1.mlp.hook_post", "zero")
    assert torch.equal(res.clean, res.ablated)


def test_mean_mode():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    zero = upstream_ablation_effect(model, sae, task, FEATS, mode="zero")
    as_mean = upstream_ablation_effect(model, sae, task, FEATS, mode="mean", mean_value=torch.zeros(64))
    torch.testing.assert_close(as_mean.ablated, zero.ablated, atol=1e-6, rtol=0)
    default = upstream_ablation_effect(model, sae, task, FEATS, mode="mean")
    mu = torch.stack(
        [model.run_with_cache(torch.tensor([t]))[1]["blocks.0.mlp.hook_post"][0, -1] for t in task.token_ids]
    ).mean(0)
    torch.testing.assert_close(
        default.ablated,
        _manual(model, sae, task, "blocks.0.mlp.hook_post", mu.detach()),
        atol=1e-5,
        rtol=1e-5,
    )


def test_errors():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    with pytest.raises(ValueError, match="own hook point"):
        upstream_ablation_effect(model, sae, task, FEATS, sae.hook_point)
    # named with valid hooks and the argument that sets it (the one unknown-hook message)
    with pytest.raises(ValueError, match=r"no hook 'blocks.0.mlp.hook_nope' .*valid hooks include .*ablate_hook="):
        upstream_ablation_effect(model, sae, task, FEATS, "blocks.0.mlp.hook_nope")
    with pytest.raises(ValueError, match="mode"):
        upstream_ablation_effect(model, sae, task, FEATS, mode="resample")
    with pytest.raises(ValueError, match="features"):
        upstream_ablation_effect(model, sae, task, [])
