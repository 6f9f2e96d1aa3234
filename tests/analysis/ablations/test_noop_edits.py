"""An edit that changes nothing has an effect of exactly 0 in every analysis (issue 18, kind 3).

Each analysis compares its edits with a baseline computed in the same run (``Interventions.run_paired``). The right
value is an identity: a feature whose decoder row is zero is ablated as ``x - f_k * 0 = x`` (bit for bit), an exact
SAE splices ``x`` back, a one-prompt mean is that prompt's own value. Before the fix the baseline came from the full
clean pass and the edits from the recomputation at P, so these effects were float noise (up to ~1e-6 nats), never
exactly 0. Both intervention backends, on the model in float32 and in bfloat16 (exactly 0 there too: the float32 SAE
edit of a bf16 activation gives it back bit for bit), on the CPU and, where there is one, the GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import PRECISIONS, exact_sae, quote_task, random_sae, tiny_model

from saecircuits.analysis.ablations.feature_effects import (
    feature_activations,
    feature_effects,
    variant_losses,
)
from saecircuits.analysis.ablations.layer_comparison import compare_layer_ablations
from saecircuits.analysis.ablations.loss_comparison import loss_comparison
from saecircuits.analysis.ablations.loss_vs_activation import loss_increase_vs_activation
from saecircuits.analysis.ablations.multi_feature import ablate_features
from saecircuits.analysis.ablations.upstream import upstream_ablation_effect
from saecircuits.analysis.circuit import circuit_nodes, exact_effects
from saecircuits.analysis.quality.reconstruction import reconstruction_at_prediction
from saecircuits.analysis.readouts.boosts import prompt_logprob_boosts
from saecircuits.models.interventions import Edit, interventions_for

HOOKS = ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post")


def _silent_sae(hook: str, seed: int, device: str = "cpu"):
    """Random SAE whose even features have a zero decoder row: ablating one of them leaves ``x`` bit for bit."""
    sae = random_sae(hook_point=hook, seed=seed)
    with torch.no_grad():
        sae.W_dec[0::2] = 0.0
    return sae.to(device)


@pytest.fixture(autouse=True)
def _restore_backend(request):
    """_setup may make the shared tiny model's analyses use the bridge: put its interventions back afterwards."""
    params = getattr(request.node, "callspec", None)
    precision = (params.params.get("device", "cpu"), params.params.get("dtype", torch.float32)) if params else None
    if precision is None or (precision[0] == "cuda" and not torch.cuda.is_available()):
        precision = ("cpu", torch.float32)
    model = tiny_model("gpt_neo", *precision)
    saved = model.__dict__.get("_saecircuits_interventions")
    yield
    if saved is None:
        model.__dict__.pop("_saecircuits_interventions", None)
    else:
        model.__dict__["_saecircuits_interventions"] = saved


@functools.cache
def _fixtures(device: str = "cpu", dtype: torch.dtype = torch.float32):
    return (tiny_model("gpt_neo", device, dtype), quote_task(),
            [_silent_sae(h, seed, device) for seed, h in enumerate(HOOKS, start=1)])


def _setup(backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    model, task, saes = _fixtures(device, dtype)
    if backend == "bridge":  # analyses call interventions_for(model): make that the bridge backend (until the
        # test ends: _restore_backend)
        model.__dict__["_saecircuits_interventions"] = {"auto": interventions_for(model, backend="bridge")}
    assert interventions_for(model).backend == backend
    return model, task, saes


def _active_even(model, task, sae) -> list[int]:
    acts = feature_activations(model, sae, task).dense()
    feats = [k for k in range(0, sae.d_sae, 2) if bool((acts[:, k] > 0).any())]
    assert len(feats) >= 5
    return feats


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize("mode", ["residual", "clean_effect"])
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_feature_effects_ablation_boosts_and_loss_vs_activation(backend, mode, device, dtype):
    model, task, saes = _setup(backend, device, dtype)
    sae = saes[1]
    even = _active_even(model, task, sae)
    eff = feature_effects(model, sae, task, mode=mode)
    silent = (eff.feature % 2) == 0
    assert int(silent.sum()) >= 10
    for name in ("loss_increase", "logprob_diff", "logit_diff", "rank_diff"):
        values = getattr(eff, name)[silent]
        assert bool((values == 0.0).all()), (name, values.abs().max())
    assert bool((eff.loss_increase[~silent] != 0).any())  # the others are real effects
    res = ablate_features(model, sae, task, even[:3], mode=mode)
    for col in ("loss_increase", "logprob_diff", "logit_diff", "rank_diff"):
        assert (res.per_prompt[col] == 0.0).all(), col
    pb = prompt_logprob_boosts(model, sae, task, even[0], mode=mode, common_tokens=None, max_prompts=None)
    assert pb.answer_logprob_clean == pb.answer_logprob_ablated
    assert bool((pb.boosts == 0).all()) and not pb.boosted and not pb.deboosted
    lva = loss_increase_vs_activation(model, sae, task, even[0], mode=mode)
    assert len(lva.table) > 0 and (lva.table["loss_increase"] == 0.0).all()


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_layer_comparison_loss_comparison_and_variant_losses(backend, device, dtype):
    model, task, saes = _setup(backend, device, dtype)
    sets = [_active_even(model, task, s)[:3] for s in saes]
    comp = compare_layer_ablations(model, saes, sets, task)
    assert bool((comp.loss_increase == 0.0).all())  # each alone and all together
    sae = saes[1]
    lc = loss_comparison(model, sae, task, sets[1], torch.zeros(sae.d_in, device=device))
    assert lc.diffs["features_ablated"].mean == 0.0
    # variant_losses (loss comparison, span ablation): identity variants equal the clean column exactly
    losses = variant_losses(model, task, Edit(sae.hook_point, lambda x: x.expand(-1, 3, -1)), 3)
    assert bool((losses[:, 1:] == losses[:, :1]).all())


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_loss_recovered_at_p_with_an_exact_sae(backend, device, dtype):
    model, task, _ = _setup(backend, device, dtype)
    res = reconstruction_at_prediction(model, exact_sae(64, HOOKS[1]).to(device), task)
    assert bool((res.sae_loss == res.clean_loss).all())


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_upstream_mean_ablation_of_a_single_prompt_changes_nothing(backend, device, dtype):
    """Mean-ablating the upstream hook over a one-prompt task writes the prompt's own value back."""
    model, task, saes = _setup(backend, device, dtype)
    one = task.subset([2])
    iv = interventions_for(model)
    from saecircuits.models.hooks import task_batches

    batch = next(task_batches(model, one))
    _, reads = iv.run(iv.clean(batch), [], read=[HOOKS[0]])  # the value the paired run recomputes at P
    res = upstream_ablation_effect(model, saes[1], one, list(range(saes[1].d_sae)), HOOKS[0], "mean",
                                   mean_value=reads[HOOKS[0]][0, 0])
    assert bool((res.ablated == res.clean).all())
    assert bool((res.clean > 0).any())


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_circuit_silent_nodes_have_exactly_zero_effect_and_no_edges(backend, device, dtype):
    model, task, saes = _setup(backend, device, dtype)
    nodes, groups = circuit_nodes(model, saes, [feature_activations(model, s, task) for s in saes])
    ex = exact_effects(model, saes, task, nodes, groups)
    silent = [i for i, nd in enumerate(nodes) if nd.kind == "feature" and nd.index % 2 == 0]
    assert len(silent) >= 10
    assert bool((ex.node_effect[silent] == 0.0).all())
    assert not any(src in set(silent) for src, _ in ex.edges)


SHARED = __import__("pathlib").Path(__file__).resolve().parents[3].parent / "shared" / "data"


@pytest.mark.shared_data
def test_stories260k_silent_ablations_and_exact_splice_give_exactly_zero(tmp_path_factory):
    """The real llama2.c checkpoint (where the issue measured no-op effects up to 6e-6 nats): silent features at
    the first and last layer, and an exact SAE's loss recovered at P."""
    ckpt = SHARED / "stories260K" / "stories260K.bin"
    val = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"
    if not (ckpt.is_file() and val.is_file()):
        pytest.skip(f"shared data absent: {ckpt} / {val}")
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model
    from saecircuits.tasks.closing_quote import closing_quote_task

    model = load_model(ckpt, cache_dir=tmp_path_factory.mktemp("llama2c"))
    task = closing_quote_task(read_documents(val)[:300], model.tokenizer, max_prompts=24)
    d_mlp = int(model.cfg.d_mlp)
    for layer in (0, 4):
        hook = f"blocks.{layer}.mlp.hook_post"
        sae = random_sae(d_in=d_mlp, d_sae=64, hook_point=hook, seed=layer)
        with torch.no_grad():
            sae.W_dec[0::2] = 0.0
        eff = feature_effects(model, sae, task)
        silent = (eff.feature % 2) == 0
        assert int(silent.sum()) >= 10
        assert bool((eff.loss_increase[silent] == 0.0).all()), eff.loss_increase[silent].abs().max()
        res = reconstruction_at_prediction(model, exact_sae(d_mlp, hook), task)
        assert bool((res.sae_loss == res.clean_loss).all())
    # the full circuit (nothing mean-ablated) gives m(M) exactly, the empty one m(empty) (faithfulness itself is
    # undefined on these prompts: mean-ablating every node raises the answer's log-prob; the exact 1 and 0 are in
    # tests/analysis/test_circuit.py::test_faithfulness_identities_and_agreement_statistics)
    from saecircuits.analysis.circuit import faithfulness_curve, node_means

    saes = [random_sae(d_in=d_mlp, d_sae=64, hook_point=f"blocks.{layer}.mlp.hook_post", seed=layer)
            for layer in (1, 3)]
    nodes, groups = circuit_nodes(model, saes, [feature_activations(model, s, task) for s in saes])
    curve = faithfulness_curve(model, task, nodes, groups, list(range(len(nodes))), [0, len(nodes)],
                               means=node_means(model, task, groups))
    assert curve["m_circuit"].iloc[1] == curve["m_clean"].iloc[1]
    assert curve["m_complement_ablated"].iloc[0] == curve["m_clean"].iloc[0]
    assert curve["m_circuit"].iloc[0] == curve["m_empty"].iloc[0]


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize("mode", ["residual", "clean_effect"])
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_max_activating_ablation_of_a_silent_feature(backend, mode, device, dtype):
    """Ablating a feature with a zero decoder row on its top stories: every story and position changes by 0."""
    from helpers import token_rows

    from saecircuits.analysis.ablations.max_activating import max_activating_ablation

    model, _, saes = _setup(backend, device, dtype)
    sae = saes[0]
    rows = token_rows([30, 12, 25, 40, 9, 18], seed=11, vocab=40)
    k = next(k for k in range(0, sae.d_sae, 2)
             if max_activating_ablation(model, sae, k, rows, [0, 1, 2, 3, 4, 5], mode=mode).positions.shape[0] >= 5)
    res = max_activating_ablation(model, sae, k, rows, [0, 1, 2, 3, 4, 5], mode=mode)
    assert (res.positions["loss_increase"] == 0.0).all() and (res.stories["loss_increase"] == 0.0).all()
