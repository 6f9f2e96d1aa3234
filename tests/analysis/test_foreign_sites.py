"""SAEs on every site the public families use, through the analyses: a skip transcoder that reads the MLP's
normalised input and writes its output, and an attention ``hook_z`` SAE (heads flattened). Each number is checked
against an independent full-prompt forward through the bridge with the edit written out in the test."""

from __future__ import annotations

import pytest
import torch
from helpers import analyses_on_backend, quote_task, tiny_neo

from saecircuits.analysis.ablations.feature_effects import feature_activations, single_feature_ablation_losses
from saecircuits.analysis.circuit import circuit_nodes, exact_effects
from saecircuits.analysis.quality.reconstruction import reconstruction_at_prediction, sequence_loss_recovered
from saecircuits.saes.base import SAE, SAEConfig

IN, OUT, Z = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"


def _random(sae: SAE, seed: int) -> SAE:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        sae.b_enc.copy_(-0.2 * torch.rand(sae.d_sae, generator=gen))
    return sae.eval()


def transcoder() -> SAE:
    cfg = SAEConfig("standard", d_in=32, d_sae=48, hook_point=IN, hook_point_out=OUT, d_out=32,
                    apply_b_dec_to_input=False, extra={"skip_connection": True})
    return _random(SAE(cfg), 1)


def z_sae() -> SAE:
    cfg = SAEConfig("standard", d_in=32, d_sae=40, hook_point=Z, extra={"reshape_activations": "hook_z"})
    return _random(SAE(cfg), 2)


def _f(sae: SAE, x_in: torch.Tensor) -> torch.Tensor:
    """The ReLU SAE's activations written out: ``relu(x_in @ W_enc + b_enc)`` (no b_dec subtraction here)."""
    x_in = x_in.reshape(*x_in.shape[:-2], -1) if x_in.shape[-1] != sae.d_in else x_in
    x_in = x_in - sae.b_dec if sae.cfg.apply_b_dec_to_input else x_in
    return torch.relu(x_in @ sae.W_enc + sae.b_enc)


def _bridge_loss(model, task, i: int, edit) -> float:
    """Answer loss of prompt i with ``edit(x_in, x_out)`` applied at P of the SAE's output hook (full forward)."""
    pos, toks = task.prediction_pos[i], torch.tensor([task.token_ids[i]])
    store = {}

    def grab(act, hook=None):
        store["in"] = act[0, pos].clone()

    def hook(act, hook=None):
        act = act.clone()
        act[0, pos] = edit(store.get("in"), act[0, pos])
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=edit.hooks(grab, hook))
    return float(-torch.log_softmax(logits[0, pos].float(), -1)[task.answer_ids[i]])


class _Ablate:
    def __init__(self, sae, k=None, splice=False):
        self.sae, self.k, self.splice = sae, k, splice

    def hooks(self, grab, hook):
        s = self.sae
        return ([(s.hook_point, grab)] if s.is_transcoder else []) + [(s.hook_point_out, hook)]

    def __call__(self, x_in, x):
        s = self.sae
        shape = x.shape
        x_in = x if x_in is None else x_in
        f = _f(s, x_in)
        flat = x.reshape(-1)
        if self.splice:
            out = f @ s.W_dec + s.b_dec + (x_in @ s.W_skip.T if s.skip_connection else 0)
        else:
            out = flat - f[self.k] * s.W_dec[self.k]
        return out.reshape(shape)


@pytest.mark.parametrize("backend", ["engine", "bridge"])
@pytest.mark.parametrize("make", [transcoder, z_sae], ids=["transcoder", "hook_z"])
def test_feature_ablations_equal_full_prompt_interventions(backend, make):
    model, task, sae = tiny_neo(), quote_task(), make()
    with analyses_on_backend(model, backend):
        acts = feature_activations(model, sae, task).dense()
        pairs = [(i, k) for i in range(task.n_prompts) for k in torch.nonzero(acts[i]).flatten()[:2].tolist()]
        assert len(pairs) > 5
        got = single_feature_ablation_losses(model, sae, task, pairs)
        for j, (i, k) in enumerate(pairs):
            assert float(got[j]) == pytest.approx(_bridge_loss(model, task, i, _Ablate(sae, k)), abs=1e-5)
        rec = reconstruction_at_prediction(model, sae, task)
        for i in range(task.n_prompts):
            assert float(rec.sae_loss[i]) == pytest.approx(_bridge_loss(model, task, i, _Ablate(sae, splice=True)),
                                                           abs=1e-5)


def test_sequence_loss_recovered_splices_the_transcoder_at_every_position():
    model, task, sae = tiny_neo(), quote_task(), transcoder()
    rows = torch.tensor([task.token_ids[0][:12], task.token_ids[1][:12]])
    got = sequence_loss_recovered(model, [sae], rows, bos_id=None, bos_policy="include", n_bootstrap=10)[IN]
    store = {}

    def grab(act, hook=None):
        store["in"] = act

    def splice(act, hook=None):
        x_in = store["in"]
        return _f(sae, x_in) @ sae.W_dec + sae.b_dec + x_in @ sae.W_skip.T

    with torch.no_grad():
        logits = model.run_with_hooks(rows, fwd_hooks=[(IN, grab), (OUT, splice)])
    nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, rows[:, 1:, None])[..., 0]
    assert got["ce_spliced"] == pytest.approx(float(nll.mean()), abs=1e-5)


def test_circuit_with_a_transcoder_and_a_z_sae():
    model, task = tiny_neo(), quote_task()
    saes = [z_sae(), transcoder()]
    acts = [feature_activations(model, s, task) for s in saes]
    nodes, groups = circuit_nodes(model, saes, acts)
    labels = {nd.label for nd in nodes}
    assert "MLP1" not in labels and "MLP0" in labels  # the transcoder stands for MLP 1
    assert not any(nd.kind == "head" and nd.layer == 0 for nd in nodes)  # the z SAE stands for layer 0's heads
    ex = exact_effects(model, saes, task, nodes, groups)
    n = task.n_prompts
    checked = 0
    for nid, nd in enumerate(nodes):
        if nd.kind != "feature" or checked >= 6:
            continue
        sae = saes[nd.sae]
        effect = 0.0
        for i in range(n):
            on = bool(acts[nd.sae].dense()[i, nd.index] != 0)
            clean = _bridge_loss(model, task, i, _Ablate(sae, nd.index)) if on else None
            with torch.no_grad():
                logits = model(torch.tensor([task.token_ids[i]]))[0, task.prediction_pos[i]]
            base = float(-torch.log_softmax(logits.float(), -1)[task.answer_ids[i]])
            effect += ((clean - base) if on else 0.0) / n  # metric = log-prob: effect = loss(ablated) - loss(clean)
        assert float(ex.node_effect[nid]) == pytest.approx(effect, abs=1e-5), nd.label
        checked += 1
    assert checked == 6
