"""Multi-feature ablation at P: logprob / logit / rank deltas against an exact manual intervention."""

from __future__ import annotations

import pytest
import torch
from helpers import HOOK, quote_task, random_sae, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations
from saecircuits.analysis.ablations.multi_feature import ablate_features
from saecircuits.analysis.statistics import t_quantile


def _manual(model, sae, tokens, pos, answer, features):
    """One prompt, batch size 1: h[0, pos] -= sum_k ReLU((h - b_dec) @ W_enc[:, k] + b_enc[k]) W_dec[k]."""

    def hook(act, hook=None):
        act = act.clone()
        h = act[0, pos].clone()  # encode the clean activation for every feature
        for k in features:
            act[0, pos] -= torch.relu((h - sae.b_dec) @ sae.W_enc[:, k] + sae.b_enc[k]) * sae.W_dec[k]
        return act

    out = []
    with torch.no_grad():
        for hooks in ([], [(HOOK, hook)]):
            z = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=hooks)[0, pos].float()
            logprob = float(torch.log_softmax(z, -1)[answer])
            rank = sum(1 for v in z.tolist() if v > z[answer].item())
            out.append((logprob, float(z[answer]), rank))
    return out


def test_matches_manual_intervention_and_batching():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    acts = feature_activations(model, sae, task).dense()
    features = torch.argsort((acts > 0).sum(0), descending=True)[:3].tolist()
    result = ablate_features(model, sae, task, features, max_tokens=200, max_batch=5)
    df = result.per_prompt
    assert len(df) == task.n_prompts and list(df["prompt_index"]) == list(range(task.n_prompts))
    for i in range(task.n_prompts):
        (lp, lg, rk), (alp, alg, ark) = _manual(
            model, sae, task.token_ids[i], task.prediction_pos[i], task.answer_ids[i], features
        )
        row = df.iloc[i]
        assert row["logprob"] == pytest.approx(lp, abs=1e-5) and row["ablated_logprob"] == pytest.approx(
            alp, abs=1e-5
        )
        assert row["logit"] == pytest.approx(lg, abs=1e-5) and row["ablated_logit"] == pytest.approx(
            alg, abs=1e-5
        )
        assert row["rank"] == rk and row["ablated_rank"] == ark
        assert row["logprob_diff"] == pytest.approx(lp - alp, abs=1e-5)
        assert row["rank_diff"] == rk - ark
        single = ablate_features(model, sae, task.subset([i]), features).per_prompt.iloc[0]
        for col in ("logprob_diff", "logit_diff", "rank_diff", "loss_increase"):
            assert row[col] == pytest.approx(single[col], abs=1e-5)
    assert df["logprob_diff"].abs().max() > 1e-3
    s = result.summary["logprob_diff"]
    n = task.n_prompts
    half = t_quantile(0.975, n - 1) * df["logprob_diff"].std(ddof=1) / n**0.5
    assert (
        s.n == n
        and s.mean == pytest.approx(df["logprob_diff"].mean())
        and s.half_width == pytest.approx(half)
    )
    assert result.summary["loss_increase"].mean == pytest.approx(s.mean, abs=1e-6)  # loss = -logprob


def test_rejects_bad_features():
    model, task, sae = tiny_neo(), quote_task(), random_sae()
    with pytest.raises(ValueError, match="features"):
        ablate_features(model, sae, task, [])
    with pytest.raises(ValueError, match="features"):
        ablate_features(model, sae, task, [sae.d_sae])
