"""Time the first-slice analyses, batched and prefix-cached, against the reference notebook's one-prompt loops.

For each model class (same model, SAE and prompts on both sides; both at ``--threads`` threads, 1 by default) it
prints the time of every analysis, the speed-up, and the largest disagreement between the two (float noise):

- DLA of every head/MLP/embedding (notebook: ``run_with_cache`` + ``get_full_resid_decomposition`` per prompt);
- the answer loss at P clean / SAE spliced / MLP zero- and mean-ablated (notebook: four forwards per prompt);
- the single-feature ablation table of EVERY feature active at P (notebook: one forward per (prompt, feature) pair;
  the loop is timed on ``--loop-pairs`` random pairs and scaled to all pairs, and says so);
- the top-3 features ablated together (notebook: two forwards per prompt);
- the prompt-based log-prob boosts of the top 3 features on up to 100 active prompts each (two forwards each);
- top activating examples of the top 6 features over ``--n-docs`` corpus documents (one forward per document).

Model classes (``--models``, comma-separated):
  default     the embedded default (2-layer GPT-Neo, d_model 128, 1,140-token BPE), its held-out stories;
  stories260k Karpathy's stories260K llama2.c checkpoint (rotary + GQA), TinyStories validation text;
  gpt2bpe     a random 2-layer GPT-Neo (d_model 128, d_mlp 512, global + local) with the GPT-2 BPE tokenizer
              (50,257 tokens), TinyStories validation text;
  reference   the reference model's shape with random weights: GPT-Neo, 2 layers, d_model 1024, 16 heads,
              d_mlp 4096, 50,257 tokens, local window 256 on layer 1. By default the scale run of issue 17: the
              analyses of a run one by one (DLA, corpus statistics over ``--ref-stories`` stories, per SAE the
              activations, every pair's exact effect, the table and the losses at P, the circuit) with two
              ``--ref-d-sae`` SAEs over ``--ref-prompts`` prompts, the table's matmul rate against the machine's
              fp32 matmul rate, the growth with the prompt count (``--scale-prompts``) and d_sae (``--scale-d-sae``),
              and the peak memory of the corpus statistics over each of ``--memory-stories`` story counts (fresh
              processes, stories cut to ``--memory-story-tokens``); ``memory-full`` (not in the default parts): the
              same pass over ``--memory-full-stories`` whole stories with a narrow random GPT-Neo of the reference's
              tokenizer (``--memory-width``), printing the reference-shape weights to add; ``--ref-parts`` picks the
              parts, ``--dtype``
              the model's and SAEs' dtype; every stage prints its matmul lower bound over the measured rate.
              With ``--ref-compare``: the product-vs-loop comparison, one 16,384-feature SAE, the loop timed on
              ``--ref-loop-prompts`` prompts (and ``--loop-pairs`` pairs) and scaled.
  gemma2, gemma3  random Gemma 2 / Gemma 3 (text) models, 2 layers, d_model 128, GQA, sliding window 64 on layer 0
              (Gemma 2 with its attention and final-logit soft caps), GPT-2 BPE, TinyStories validation text; for
              ``--forward --only`` rows (plain transformers runs Gemma 2 eager: SDPA cannot soft-cap).
Each SAE is random with its encoder bias set per feature so the mean L0 at P is about ``--l0`` (timings depend on
how many features are active, not on what they mean).

Other modes:
  --forward   one clean batched pass per model class: TransformerBridge forward vs the engine's clean pass
              (:mod:`saecircuits.models.engine`, what every analysis now uses) vs plain ``transformers`` (SDPA);
              then one row per architecture of ``--archs`` (Pythia, GPT-J, Qwen 3, OLMo 2, Qwen 2: random 2-layer d128
              models with the GPT-2 BPE vocabulary, on the task's prompts);
  --memory    5,000 prompts and a 16,384-feature SAE on the default model: activations + exact effects of every
              active feature + the table; prints peak resident memory (``resource.getrusage``);
  --table-2cores  the all-features ablation table of a 2,048-feature SAE over 200 prompts at 2 threads;
  --circuit   the whole feature circuit (exact node effects and edges, AtP, IG, faithfulness) on the embedded
              default with two 2,048-feature SAEs over 300 prompts, with the estimates' agreement.

Examples:
    python benchmarks/bench_analyses.py                               # default, stories260k, gpt2bpe
    python benchmarks/bench_analyses.py --models reference --threads 2   # issue 17: scale run, scaling, memory
    python benchmarks/bench_analyses.py --forward --memory --table-2cores
    python benchmarks/bench_analyses.py --forward --only --models gemma2,gemma3
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from saecircuits.cli import threading_defaults  # noqa: E402

threading_defaults()  # as the CLI: OpenMP threads sleep while they wait (set before torch loads)

import torch  # noqa: E402

from saecircuits.analysis.ablations.feature_effects import (  # noqa: E402
    feature_ablation_table,
    feature_activations,
    feature_effects,
)
from saecircuits.analysis.ablations.multi_feature import ablate_features  # noqa: E402
from saecircuits.analysis.corpus.examples import top_activating_examples  # noqa: E402
from saecircuits.analysis.corpus.statistics import DEFAULT_MAX_EVENT_BYTES  # noqa: E402
from saecircuits.analysis.quality.reconstruction import mean_activation, reconstruction_at_prediction  # noqa: E402
from saecircuits.analysis.readouts.boosts import prompt_logprob_boosts  # noqa: E402
from saecircuits.analysis.readouts.dla import direct_logit_attribution  # noqa: E402
from saecircuits.models.interventions import interventions_for  # noqa: E402
from saecircuits.models.tokens import encode_documents  # noqa: E402
from saecircuits.saes.base import SAE, SAEConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VAL = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"


# --------------------------------------------------------------------------------------------------------------
# models, prompts, SAEs


def _gpt2_tokenizer():
    from saecircuits.models.load import gpt2_bpe_tokenizer

    return gpt2_bpe_tokenizer(SHARED / "gpt2-bpe-tokenizer")


RANDOM_NEO = {
    "gpt2bpe": dict(d_model=128, n_heads=4, d_mlp=512, window=256, n_ctx=2048),
    "reference": dict(d_model=1024, n_heads=16, d_mlp=4096, window=256, n_ctx=2048),
}


def _random_neo_hf(*, d_model, n_heads, d_mlp, window, n_ctx, seed=0):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(
        vocab_size=50257, max_position_embeddings=n_ctx, hidden_size=d_model, num_layers=2, num_heads=n_heads,
        intermediate_size=d_mlp, attention_types=[[["global", "local"], 1]], window_size=window,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=50256, eos_token_id=50256,
    )
    torch.manual_seed(seed)
    return GPTNeoForCausalLM(cfg).eval()


def _random_neo(tok, **shape):
    from saecircuits.models.load import load_hf_model

    return load_hf_model(_random_neo_hf(**shape), tok, model_name=f"random-neo-d{shape['d_model']}")


def _arch_common(**kw) -> dict:
    return dict(vocab_size=50257, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=2048, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False, **kw)


def _pythia_hf():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(**_arch_common(intermediate_size=512), rotary_pct=0.25,
                                            use_parallel_residual=True))


def _gptj_hf():
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJForCausalLM(GPTJConfig(vocab_size=50257, n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_inner=512,
                                      n_positions=2048, bos_token_id=50256, eos_token_id=50256))


def _qwen3_hf():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_arch_common(intermediate_size=384), num_key_value_heads=2, head_dim=32,
                                        use_sliding_window=True, sliding_window=256,
                                        layer_types=["full_attention", "sliding_attention"]))


def _olmo2_hf():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM(Olmo2Config(**_arch_common(intermediate_size=384), num_key_value_heads=2))


def _qwen2_hf():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_arch_common(intermediate_size=384), num_key_value_heads=2,
                                        use_sliding_window=True, sliding_window=256,
                                        layer_types=["full_attention", "sliding_attention"]))


ARCHS = {
    "pythia": (_pythia_hf, "Pythia (GPT-NeoX 2L d128: parallel, rotary_pct 0.25)"),
    "gptj": (_gptj_hf, "GPT-J (2L d128: parallel, one norm, rotary_dim 16 pairs)"),
    "qwen3": (_qwen3_hf, "Qwen 3 (2L d128: q/k norms, GQA, window 256)"),
    "olmo2": (_olmo2_hf, "OLMo 2 (2L d128: post-norm, q/k norms, fold_ln off)"),
    "qwen2": (_qwen2_hf, "Qwen 2 (2L d128: q/k/v biases, GQA, window 256)"),
}
"""Tiny random models per architecture with the GPT-2 BPE vocabulary, for ``--forward`` (``--archs``)."""


def _arch_hf(name: str):
    torch.manual_seed(0)
    return ARCHS[name][0]().eval()


RANDOM_GEMMA = {"gemma2": 2, "gemma3": 3}
"""Random Gemma 2 / Gemma 3 (text) models, 2 layers d128 (sliding window 64 on layer 0, global layer 1), GPT-2 BPE."""


def _random_gemma_hf(version: int, seed: int = 0):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    shape = dict(
        vocab_size=50257, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, sliding_window=64, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )
    torch.manual_seed(seed)
    if version == 2:  # Gemma 2's own caps
        return Gemma2ForCausalLM(Gemma2Config(**shape, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**shape)).eval()


def plain_hf(name: str, model):
    """The same network as plain ``transformers`` (no bridge, no weight processing), SDPA attention."""
    from transformers import AutoModelForCausalLM

    from saecircuits.models.load import model_provenance

    if name in RANDOM_NEO:
        hf = _random_neo_hf(**RANDOM_NEO[name])
    elif name in ARCHS:
        hf = _arch_hf(name)
    elif name in RANDOM_GEMMA:  # Gemma 2 soft-caps attention scores, which SDPA cannot: transformers runs eager
        hf = _random_gemma_hf(RANDOM_GEMMA[name])
        hf.config._attn_implementation = "eager" if name == "gemma2" else "sdpa"
        return hf
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_provenance(model).hf_folder)
    hf.config._attn_implementation = "sdpa"
    return hf.eval()


def load_case(name: str, args):
    """(model, task, corpus documents as token rows, label)."""
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model
    from saecircuits.tasks.closing_quote import closing_quote_task

    if name == "default":
        from saecircuits.data.storygen import generate_stories
        from saecircuits.models.default import DEFAULT_CONFIG, ensure_default_model

        folder = ensure_default_model(args.workspace, progress=False)
        model = load_model(folder)
        docs = generate_stories(max(args.n_prompts * 3, args.n_docs), seed=DEFAULT_CONFIG.heldout_seed)
        label = "embedded default (GPT-Neo 2L d128, vocab 1,140)"
    else:
        if not VAL.is_file():
            raise SystemExit(f"{name} needs {VAL} (../shared/data)")
        docs = read_documents(VAL)
        if name == "reference":  # 1,000 prompts need more stories than the validation file's 220 quotes
            docs += read_documents(SHARED / "tinystories-v2-train-head10k-lines" / "tinystories_10k.txt")
        if name == "stories260k":
            model = load_model(SHARED / "stories260K" / "stories260K.bin", cache_dir=Path(args.workspace) / "models")
            label = "stories260K (Llama 5L d64, rotary + GQA, vocab 512)"
        elif name == "gpt2bpe":
            model = _random_neo(_gpt2_tokenizer(), **RANDOM_NEO[name])
            label = "GPT-Neo 2L d128 random, GPT-2 BPE (vocab 50,257)"
        elif name == "reference":
            model = _random_neo(_gpt2_tokenizer(), **RANDOM_NEO[name])
            label = "reference shape random (GPT-Neo 2L d1024 16 heads d_mlp 4096, vocab 50,257)"
        elif name in ARCHS:
            from saecircuits.models.load import load_hf_model

            model = load_hf_model(_arch_hf(name), _gpt2_tokenizer(), model_name=f"random-{name}")
            label = ARCHS[name][1]
        elif name in RANDOM_GEMMA:
            from saecircuits.models.load import load_hf_model

            model = load_hf_model(_random_gemma_hf(RANDOM_GEMMA[name]), _gpt2_tokenizer(), model_name=name)
            label = {"gemma2": "Gemma 2 2L d128 random, window 64, caps (HF eager)",
                     "gemma3": "Gemma 3 2L d128 random, window 64, q/k norms"}[name]
        else:
            raise SystemExit(f"unknown model class {name!r}")
    n_prompts = args.ref_prompts if name == "reference" else args.n_prompts
    task = closing_quote_task(docs, model.tokenizer, max_prompts=n_prompts, max_tokens=int(model.cfg.n_ctx))
    rows = [r for r in encode_documents(model.tokenizer, docs[: args.n_docs], max_len=int(model.cfg.n_ctx))
            if len(r) > 1]
    return model, task, rows, label


def calibrated_sae(model, task, hook: str, d_sae: int, l0: float, seed: int = 0, dtype: str = "float32") -> SAE:
    """A random ReLU SAE whose encoder bias puts the mean L0 at P near ``l0`` (in ``dtype``).

    Each feature's threshold is its pre-activation's mean + ``z`` standard deviations at P over up to 200 prompts,
    one ``z`` for all features, bisected so that the mean L0 over those prompts is ``l0``. (A per-feature empirical
    quantile at ``1 - l0 / d_sae`` needs many more than ``d_sae / l0`` prompts: over 200 it let every feature fire on
    about one of them, an L0 of ``d_sae / 200``, 82 for 16,384 features, whatever ``l0`` asked.)"""
    d_in = int(model.cfg.d_mlp)
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig("standard", d_in=d_in, d_sae=d_sae, hook_point=hook))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        W_dec = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        iv = interventions_for(model)
        from saecircuits.models.hooks import task_batches

        xs = torch.cat([iv.clean(b, read=[hook], logits=False, cache=False).reads[hook].float()
                        for b in task_batches(model, task.subset(range(min(200, task.n_prompts))))])
        sae.to(xs.device)
        pre = (xs - sae.b_dec) @ sae.W_enc
        std = (pre - pre.mean(0)) / pre.std(0).clamp_min(1e-12)  # [prompts, d_sae]
        lo, hi = -10.0, 10.0  # mean L0 falls as z rises
        for _ in range(50):
            z = (lo + hi) / 2
            lo, hi = (z, hi) if float((std > z).sum(1).float().mean()) > l0 else (lo, z)
        sae.b_enc.copy_(-(pre.mean(0) + hi * pre.std(0)))
    return sae if dtype == "float32" else sae.to(getattr(torch, dtype))


# --------------------------------------------------------------------------------------------------------------
# the reference notebook's loops: one prompt per forward, answer appended, read at -2


def _full(task, i, device):
    return torch.tensor([task.token_ids[i] + [task.answer_ids[i]]], device=device)


def _logits_at_p(model, tokens, hooks=()):
    return model.run_with_hooks(tokens, fwd_hooks=list(hooks))[0, -2].float()


def _loss(logits, answer) -> float:
    return float(-torch.log_softmax(logits, -1)[answer])


def _at_p(fn):
    def hook(v, hook=None):
        v = v.clone()
        v[0, -2] = fn(v[0, -2])
        return v

    return hook


def loop_dla(model, task, device):
    out = []
    for i in range(task.n_prompts):
        tokens = _full(task, i, device)
        _, cache = model.run_with_cache(tokens[:, :-1])
        stack = cache.get_full_resid_decomposition(layer=-1, expand_neurons=False, apply_ln=True, pos_slice=-1)
        out.append((stack[:, 0] @ model.W_U[:, tokens[0, -1]]).float().cpu())
    return torch.stack(out)


def loop_mean(model, rows, hook, device):
    """The notebook's mean activation: one forward per document, BOS dropped, token-weighted here."""
    total, count = 0, 0
    for r in rows:
        _, cache = model.run_with_cache(torch.tensor([r], device=device), names_filter=[hook])
        total = total + cache[hook][0, 1:].sum(0)
        count += len(r) - 1
    return total / count


def loop_losses(model, sae, task, mean_act, device):
    hook, out = sae.hook_point, []
    for i in range(task.n_prompts):
        tokens, a = _full(task, i, device), task.answer_ids[i]
        edits = ([], [(hook, _at_p(lambda h: sae(h)))], [(hook, _at_p(torch.zeros_like))],
                 [(hook, _at_p(lambda h: mean_act.to(h)))])
        out.append([_loss(_logits_at_p(model, tokens, e), a) for e in edits])
    return torch.tensor(out)


def _ablate_k(sae, k):
    return lambda h: h - torch.relu((h - sae.b_dec) @ sae.W_enc[:, k] + sae.b_enc[k]) * sae.W_dec[k]


def loop_pairs(model, sae, task, pairs, device):
    out, clean = [], {}
    for i, k in pairs:
        tokens, a = _full(task, i, device), task.answer_ids[i]
        if i not in clean:
            clean[i] = _loss(_logits_at_p(model, tokens), a)
        out.append(_loss(_logits_at_p(model, tokens, [(sae.hook_point, _at_p(_ablate_k(sae, k)))]), a) - clean[i])
    return torch.tensor(out)


def loop_multi(model, sae, task, feats, device):
    idx = torch.tensor(feats, device=device)
    fn = lambda h: h - torch.relu((h - sae.b_dec) @ sae.W_enc[:, idx] + sae.b_enc[idx]) @ sae.W_dec[idx]  # noqa: E731
    out = []
    for i in range(task.n_prompts):
        tokens, a = _full(task, i, device), task.answer_ids[i]
        out.append(_loss(_logits_at_p(model, tokens, [(sae.hook_point, _at_p(fn))]), a)
                   - _loss(_logits_at_p(model, tokens), a))
    return torch.tensor(out)


def loop_boosts(model, sae, task, feats, dense_cols, device):
    out = []
    for j, k in enumerate(feats):
        prompts = torch.nonzero(dense_cols[:, j] > 0).flatten().tolist()[:100]
        clean = abl = 0
        for i in prompts:
            tokens = _full(task, i, device)
            clean = clean + torch.log_softmax(_logits_at_p(model, tokens), -1)
            abl = abl + torch.log_softmax(
                _logits_at_p(model, tokens, [(sae.hook_point, _at_p(_ablate_k(sae, k)))]), -1)
        out.append((clean - abl) / max(1, len(prompts)))
    return out


def loop_examples(model, sae, rows, feats, device):
    idx = torch.tensor(feats, device=device)
    best = torch.full((len(feats),), -float("inf"))
    for r in rows:
        _, cache = model.run_with_cache(torch.tensor([r], device=device), names_filter=[sae.hook_point])
        f = sae.encode(cache[sae.hook_point][0, 1:])[:, idx]
        best = torch.maximum(best, f.max(0).values.cpu())
    return best


# --------------------------------------------------------------------------------------------------------------


def timed(fn):
    start = time.perf_counter()
    with torch.no_grad():
        value = fn()
    return value, time.perf_counter() - start


def bench_case(name: str, args) -> list[tuple]:
    model, task, rows, label = load_case(name, args)
    device = "cpu"
    L = args.layer if args.layer >= 0 else int(model.cfg.n_layers) + args.layer
    hook = f"blocks.{L}.mlp.hook_post"
    d_sae = args.ref_d_sae if name == "reference" else args.d_sae
    sae = calibrated_sae(model, task, hook, d_sae, args.l0)
    lens = [len(t) for t in task.token_ids]
    print(f"\n== {label}\n   {task.n_prompts} closing-quote prompts of {min(lens)}..{max(lens)} tokens; SAE on "
          f"{hook}, d_sae {d_sae}; {len(rows)} corpus documents; {torch.get_num_threads()} thread(s)")
    loop_task = task.subset(range(min(task.n_prompts, args.ref_loop_prompts))) if name == "reference" else task
    scale_prompts = task.n_prompts / loop_task.n_prompts
    out = []

    dla, tb = timed(lambda: direct_logit_attribution(model, task).per_prompt)
    ref, tl = timed(lambda: loop_dla(model, loop_task, device))
    out.append(("DLA", tb, tl * scale_prompts, float((dla[: loop_task.n_prompts] - ref).abs().max())))

    def product_losses():
        mean = mean_activation(model, rows, hook)
        return mean, reconstruction_at_prediction(model, sae, task, mean_act=mean, n_bootstrap=200)

    (mean, rec), tb = timed(product_losses)
    loop_mean_act, tm = timed(lambda: loop_mean(model, rows, hook, device))  # once, not per prompt
    ref, tl = timed(lambda: loop_losses(model, sae, loop_task, loop_mean_act, device))
    tl = tl + tm / scale_prompts
    mine = torch.stack([rec.clean_loss, rec.sae_loss, rec.zero_loss, rec.mean_loss], 1)[: loop_task.n_prompts]
    out.append(("losses clean/SAE/zero/mean", tb, tl * scale_prompts, float((mine - ref).abs().max())))

    def product_table():
        acts = feature_activations(model, sae, task)
        eff = feature_effects(model, sae, task, acts=acts)
        return acts, eff, feature_ablation_table(model, sae, task, effects=eff, min_fraction_active=0.05)

    (acts, eff, table), tb = timed(product_table)
    n_pairs = int(eff.prompt.numel())
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(n_pairs, generator=gen)[: args.loop_pairs].sort().values
    pairs = [(int(eff.prompt[j]), int(eff.feature[j])) for j in pick]
    ref, tl = timed(lambda: loop_pairs(model, sae, task, pairs, device))
    diff = float((eff.loss_increase[pick] - ref).abs().max())
    out.append((f"table: all {n_pairs} active pairs (loop: {len(pairs)} timed, scaled)", tb,
                tl * n_pairs / max(1, len(pairs)), diff))

    top = table["feature"].tolist()[:3] or eff.feature[:3].tolist()
    abl, tb = timed(lambda: ablate_features(model, sae, task, top))
    ref, tl = timed(lambda: loop_multi(model, sae, loop_task, top, device))
    mine = torch.tensor(abl.per_prompt["loss_increase"].to_numpy())[: loop_task.n_prompts]
    out.append(("top-3 features ablated together", tb, tl * scale_prompts, float((mine - ref).abs().max())))

    cols = acts.columns(top)
    boosts, tb = timed(lambda: [prompt_logprob_boosts(model, sae, task, k, acts=acts, min_logprob=-1e9).boosts
                                for k in top])
    loop_cols = cols[: loop_task.n_prompts]
    ref, tl = timed(lambda: loop_boosts(model, sae, loop_task, top, loop_cols, device))
    if name == "reference":  # the loop saw fewer prompts: compare nothing, scale the time
        diff, tl = float("nan"), tl * scale_prompts
    else:
        diff = max(float((b - r).abs().max()) for b, r in zip(boosts, ref, strict=True))
    out.append(("log-prob boosts of 3 features", tb, tl, diff))

    shown = table["feature"].tolist()[:6] or eff.feature[:6].tolist()
    ex, tb = timed(lambda: top_activating_examples(model, sae, rows, shown, k=5))
    loop_rows = rows[: max(1, len(rows) // (10 if name == "reference" else 1))]
    ref, tl = timed(lambda: loop_examples(model, sae, loop_rows, shown, device))
    if len(loop_rows) == len(rows):
        mine = torch.tensor([ex[k][0].max_activation if ex[k] else -float("inf") for k in shown])
        diff = float((mine - ref).abs().max()) if torch.isfinite(ref).all() else 0.0
    else:
        diff = float("nan")
    out.append((f"top examples of 6 features over {len(rows)} docs", tb, tl * len(rows) / len(loop_rows), diff))

    print(f"   {'analysis':62s} {'product s':>10s} {'loop s':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    for row, tb, tl, d in out:
        print(f"   {row:62s} {tb:10.2f} {tl:10.2f} {tl / tb:8.1f}x {d:11.2e}")
    tb, tl = sum(r[1] for r in out), sum(r[2] for r in out)
    print(f"   {'total':62s} {tb:10.2f} {tl:10.2f} {tl / tb:8.1f}x")
    return [(label, *r) for r in out]


def bench_forward(args) -> None:
    """One clean batched pass: bridge vs engine (the analyses' path) vs plain transformers with SDPA."""
    print(f"\n== one clean pass over the prompts ({torch.get_num_threads()} thread(s)); seconds. bridge: "
          "TransformerBridge forward (logits at every position); engine: the analyses' clean pass (keys/values "
          "kept, logits at P only); HF: plain transformers with SDPA attention (logits at every position)")
    print(f"   {'model':58s} {'bridge':>8s} {'engine':>8s} {'HF sdpa':>8s} {'bridge/HF':>10s} {'engine/HF':>10s}")
    for name in args.models.split(",") + [a for a in args.archs.split(",") if a]:
        _forward_row(name, args)


def _forward_row(name: str, args) -> None:
    from saecircuits.models.hooks import task_batches

    model, task, _, label = load_case(name, args)
    hf = plain_hf(name, model)
    batches = list(task_batches(model, task))
    iv = interventions_for(model)

    def engine_cold():
        iv.clear_cache()  # the clean pass itself, not a cache hit
        return [iv.clean(b) for b in batches]

    def run(fn):
        fn()
        return timed(fn)[1]

    t_bridge = run(lambda: [model(b.tokens) for b in batches])
    t_engine = run(engine_cold)
    t_hf = run(lambda: [hf(b.tokens) for b in batches])
    if iv.engine is None:
        label = f"{label} [bridge fallback]"
    print(f"   {label:58s} {t_bridge:8.2f} {t_engine:8.2f} {t_hf:8.2f} {t_bridge / t_hf:9.1f}x "
          f"{t_engine / t_hf:9.2f}x")


def bench_memory(args) -> None:
    """5,000 prompts x a 16,384-feature SAE on the default model: activations, exact effects, table; peak RSS."""
    import argparse as ap

    a = ap.Namespace(**vars(args))
    a.n_prompts, a.n_docs = 5000, 10
    model, task, _, _ = load_case("default", a)
    sae = calibrated_sae(model, task, "blocks.0.mlp.hook_post", 16384, args.l0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (eff, table), t = timed(lambda: (lambda e: (e, feature_ablation_table(model, sae, task, effects=e)))(
        feature_effects(model, sae, task)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dense_mb = task.n_prompts * sae.d_sae * 4 / 2**20
    print(f"\n== memory: {task.n_prompts} prompts x 16,384-feature SAE (default model, layer 0), "
          f"{eff.prompt.numel()} active pairs ablated in {t:.1f} s")
    print(f"   peak resident memory {peak:.0f} MiB ({before:.0f} MiB before the analysis); a dense "
          f"[prompts x d_sae] float32 array alone would be {dense_mb:.0f} MiB")


def bench_table_2cores(args) -> None:
    torch.set_num_threads(2)
    a = argparse.Namespace(**vars(args))
    a.n_prompts = 200
    print("\n== all-features ablation table, 2,048-feature SAE, 200 prompts, 2 threads")
    for name in args.models.split(","):
        model, task, _, label = load_case(name, a)
        for layer in (0, int(model.cfg.n_layers) - 1):
            sae = calibrated_sae(model, task, f"blocks.{layer}.mlp.hook_post", 2048, args.l0)
            (eff, _), t = timed(lambda sae=sae, model=model, task=task: _table(model, sae, task))
            print(f"   {label:58s} layer {layer}: {eff.prompt.numel():6d} pairs in {t:6.2f} s")


def _table(model, sae, task):
    eff = feature_effects(model, sae, task)
    return eff, feature_ablation_table(model, sae, task, effects=eff)


def bench_circuit(args) -> None:
    """The whole feature circuit on the embedded default: two 2,048-feature SAEs (layers 0 and 1), 300 prompts."""
    from saecircuits.analysis.circuit import find_circuit

    a = argparse.Namespace(**vars(args))
    a.n_prompts = 300
    model, task, rows, label = load_case("default", a)
    saes = [calibrated_sae(model, task, f"blocks.{layer}.mlp.hook_post", 2048, args.l0, seed=layer)
            for layer in (0, 1)]
    interventions_for(model).clear_cache()
    res, t = timed(lambda: find_circuit(model, saes, task, ig_steps=10, corpus_rows=rows[:300]))  # own corpus means pass
    ag = res.agreement
    print(f"\n== feature circuit, {label}, 2 SAEs x 2,048 features, {task.n_prompts} prompts, "
          f"{torch.get_num_threads()} thread(s): {t:.1f} s")
    print(f"   {len(res.nodes)} nodes, {len(res.exact.edges)} non-zero exact edges; circuit of "
          f"{len(res.circuit)} nodes, faithfulness {res.selection.get('faithfulness', float('nan')):.3f}")
    for what in ("nodes", "edges"):
        for method, a_ in ag[what].items():
            print(f"   {what:5s} {method:3s}: Spearman {a_['spearman']:.3f}, sign agreement "
                  f"{a_['sign_agreement']:.3f}, top-20 overlap {a_['top_overlap']:.2f} (n={a_['n']})")


def bench_positions(args) -> None:
    """The circuit across positions (issue 16) next to today's circuit at P, same case as ``--circuit``."""
    from saecircuits.analysis.circuit import find_circuit
    from saecircuits.analysis.circuit.position_graph import position_circuit

    a = argparse.Namespace(**vars(args))
    a.n_prompts = 300
    model, task, rows, label = load_case("default", a)
    saes = [calibrated_sae(model, task, f"blocks.{layer}.mlp.hook_post", 2048, args.l0, seed=layer)
            for layer in (0, 1)]
    lengths = [p + 1 for p in task.prediction_pos]
    print(f"\n== circuit across positions, {label}, 2 SAEs x 2,048 features, {task.n_prompts} prompts "
          f"(P+1 = {min(lengths)}..{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.0f}), "
          f"{torch.get_num_threads()} thread(s)")
    interventions_for(model).clear_cache()
    _, t_p = timed(lambda: find_circuit(model, saes, task, ig_steps=10, corpus_rows=rows[:300]))
    print(f"   today's circuit at P (find_circuit, corpus means from a pass of their own): {t_p:.1f} s")
    pos, t = timed(lambda: position_circuit(model, saes, task, top_exact=args.top_exact, progress=False))
    ag = pos["agreement"]
    print(f"   position_circuit (top_exact={args.top_exact}): {t:.1f} s ({t / t_p:.2f}x), "
          f"{pos['n_exact_interventions']} exact interventions")
    for what in ("nodes", "edges"):
        a_ = ag[what]["atp"]
        print(f"   {what:5s} atp: Spearman {a_['spearman']}, sign {a_['sign_agreement']}, top-20 {a_['top_overlap']} "
              f"(n={a_['n']})")
    print(f"   faithfulness {pos['faithfulness']}, completeness {pos['completeness']}")


# --------------------------------------------------------------------------------------------------------------
# the reference scale (issue 17 items 3 and 5): the whole run, the table's matmul rate, scaling, corpus memory


def matmul_rate(seconds: float = 2.0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of this machine at the current thread count in ``dtype``: ``[2048, 1024] @ [1024, 4096]`` repeated for
    ``seconds`` (the reference shape's MLP matmul; what the table's rate and the stages' lower bounds use)."""
    a = torch.randn(2048, 1024, device=device).to(dtype)
    b = torch.randn(1024, 4096, device=device).to(dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    a @ b
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    sync()
    return 2 * 2048 * 1024 * 4096 * n / (time.perf_counter() - start) / 1e9


def _block_flops(model) -> float:
    """Matmul FLOPs of one block per token: the attention projections (q, k, v, o) and the MLP's two matmuls
    (attention scores and norms left out)."""
    d, m = int(model.cfg.d_model), int(model.cfg.d_mlp)
    return 2.0 * (4 * d * d + 2 * d * m)


def table_flops(model, sae, n_pairs: int) -> float:
    """Matmul FLOPs the all-features table cannot avoid: per (prompt, feature) pair, position P from the SAE's write
    onward (``W_out`` for an MLP SAE, then every later block's attention projections and MLP at P) and the
    unembedding at P; attention over the prefix and the norms are left out (a lower bound)."""
    cfg = model.cfg
    d, m, v, n = int(cfg.d_model), int(cfg.d_mlp), int(cfg.d_vocab), int(cfg.n_layers)
    layer = int(sae.hook_point.split(".")[1])
    per = 2.0 * (m * d if sae.hook_point.endswith("mlp.hook_post") else 0) + (n - 1 - layer) * _block_flops(model)
    return n_pairs * (per + 2.0 * d * v)


def stage_flops(model, saes, task, rows, pairs: list[int]) -> dict[str, float]:
    """Lower bounds of the matmul FLOPs of each stage of :func:`bench_reference` (what no implementation of the
    analysis can skip; attention scores, norms, elementwise work and the SAE decoders are left out):

    - DLA: one forward of every prompt token through every block;
    - corpus statistics: one forward of every story token through the blocks up to the last SAE's, and each SAE's
      encoder on every token, ``2 x d_in x d_sae`` per token and SAE;
    - per SAE, activations + effects + table: one forward of the prompt tokens up to the SAE's block, its encoder at
      P and :func:`table_flops` of its pairs;
    - per SAE, the losses at P: 4 variants (clean, spliced, zero, mean) per prompt from the SAE's write to the logits;
    - the circuit: its exact node effects alone cover every active (prompt, feature) pair of both SAEs
      (:func:`table_flops`); edges, AtP, IG and faithfulness are left out.
    """
    prompt_tok = sum(len(t) for t in task.token_ids)
    story_tok = sum(len(r) for r in rows)
    n_blocks = int(model.cfg.n_layers)
    last = max(int(s.hook_point.split(".")[1]) for s in saes)
    out = {"DLA": prompt_tok * n_blocks * _block_flops(model),
           "corpus": story_tok * ((last + 1) * _block_flops(model) + sum(2.0 * s.d_in * s.d_sae for s in saes))}
    for sae, n_pairs in zip(saes, pairs, strict=True):
        layer = int(sae.hook_point.split(".")[1])
        out[f"{sae.hook_point} table"] = (prompt_tok * (layer + 1) * _block_flops(model)
                                          + task.n_prompts * 2.0 * sae.d_in * sae.d_sae
                                          + table_flops(model, sae, n_pairs))
        out[f"{sae.hook_point} losses"] = table_flops(model, sae, 4 * task.n_prompts)
    out["circuit"] = sum(table_flops(model, s, n) for s, n in zip(saes, pairs, strict=True))
    return out


def _stories(n: int) -> list[str]:
    """``n`` TinyStories documents from ../shared/data (validation, then the v2 and v1 train heads), cycled when the
    files hold fewer distinct stories."""
    from saecircuits.data.corpus import read_documents

    docs = read_documents(VAL) + read_documents(SHARED / "tinystories-v2-train-head10k-lines" / "tinystories_10k.txt")
    docs += read_documents(SHARED / "tinystories-v1-train-first5000-lowercased" / "tinystories.txt")
    return [docs[i % len(docs)] for i in range(n)]


def _reference_setup(args, n_prompts: int, n_stories: int, story_tokens: int | None = None, shape=None):
    """The reference-shape model (or a random GPT-Neo of ``shape``, :data:`RANDOM_NEO`'s keys) in ``--dtype``,
    ``n_prompts`` closing-quote prompts and ``n_stories`` corpus rows (each cut to its first ``story_tokens``
    tokens when given)."""
    from saecircuits.models.load import load_hf_model
    from saecircuits.tasks.closing_quote import closing_quote_task

    shape = shape or RANDOM_NEO["reference"]
    model = load_hf_model(_random_neo_hf(**shape), _gpt2_tokenizer(), model_name=f"random-neo-d{shape['d_model']}",
                          device=args.device, dtype=getattr(torch, args.dtype))
    docs = _stories(max(n_stories, 6 * n_prompts))  # about one closing quote in 4.5 stories (4 gave 892 of 1,000)
    task = closing_quote_task(docs, model.tokenizer, max_prompts=n_prompts, max_tokens=int(model.cfg.n_ctx))
    max_len = int(model.cfg.n_ctx) if story_tokens is None else min(int(model.cfg.n_ctx), story_tokens)
    rows = [r for r in encode_documents(model.tokenizer, docs[:n_stories], max_len=max_len) if len(r) > 1]
    return model, task, rows


def _prompt_analyses(model, sae, task, keep: list | None = None):
    """Activations at P, the exact effect of every active feature and the table, for one SAE: (seconds, pairs).
    ``keep``: a list the activations are appended to (the circuit reads them, as in the pipeline)."""
    start = time.perf_counter()
    with torch.no_grad():
        acts = feature_activations(model, sae, task)
        eff = feature_effects(model, sae, task, acts=acts)
        feature_ablation_table(model, sae, task, effects=eff)
    if keep is not None:
        keep.append(acts)
    return time.perf_counter() - start, int(eff.prompt.numel())


def _first_prompts(acts, n: int):
    """``acts`` (:class:`FeatureActs`) of the first ``n`` prompts (those of ``task.subset(range(n))``)."""
    keep = acts.prompt < n
    return type(acts)(n, acts.d_sae, acts.prompt[keep], acts.feature[keep], acts.value[keep])


def _uptime() -> str:
    """``uptime``'s load averages (other jobs on a shared machine inflate every time printed next to it)."""
    try:
        return "load average " + ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def bench_reference(args) -> None:
    """Issue 17 item 3: the analyses of a run at the reference shape, one by one (not through the pipeline):
    DLA; per SAE the activations at P, the exact effect of every active feature and its table, the SAE losses at P
    (clean / spliced / zero / mean, mean from the corpus pass); the corpus statistics of both SAEs; the circuit.

    Each stage is printed with its matmul lower bound (:func:`stage_flops`) over the matmul rate measured in the
    run's dtype; the sum of the bounds says whether the 10-minute target is reachable at all on this machine."""
    from saecircuits.analysis.circuit import find_circuit
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats

    dtype = getattr(torch, args.dtype)
    model, task, rows = _reference_setup(args, args.ref_prompts, args.ref_stories)
    if args.ref_cache_mib:  # the clean passes kept between analyses (512 MiB by default: ~200 prompts at this shape)
        interventions_for(model).cache_bytes = args.ref_cache_mib << 20
    hooks = [f"blocks.{layer}.mlp.hook_post" for layer in (0, 1)]
    saes = [calibrated_sae(model, task, h, args.ref_d_sae, args.l0, seed=i, dtype=args.dtype)
            for i, h in enumerate(hooks)]
    print(f"\n== reference scale, {args.dtype} model and SAEs: random GPT-Neo 2L d1024 16 heads d_mlp 4096 vocab "
          f"50,257; {task.n_prompts} prompts ({sum(len(t) for t in task.token_ids):,} tokens); two "
          f"{args.ref_d_sae:,}-feature SAEs ({', '.join(hooks)}), L0 at P asked ~{args.l0:g}; corpus statistics over "
          f"{len(rows)} stories ({sum(len(r) for r in rows):,} tokens); {torch.get_num_threads()} thread(s); analyses "
          f"one by one (not the pipeline); clean-pass cache {interventions_for(model).cache_bytes >> 20} MiB; "
          f"{_uptime()}")
    rate32 = matmul_rate(device=args.device)
    rate = rate32 if dtype == torch.float32 else matmul_rate(device=args.device, dtype=dtype)
    print(f"   matmul rate (2048x1024 @ 1024x4096) before the run: fp32 {rate32:.1f} GFLOP/s"
          + ("" if dtype == torch.float32 else f", {args.dtype} {rate:.1f} GFLOP/s"), flush=True)
    times: list[tuple[str, float, float]] = []

    def step(what: str, t: float, flop: float) -> None:  # printed as it ends: a long run shows its figures on the way
        times.append((what, t, flop))
        print(f"   {what:70s} {t:8.1f} s  (matmul lower bound {flop / 1e12:7.2f} TFLOP = {flop / rate / 1e9:7.1f} s "
              f"at {rate:.0f} GFLOP/s; {_uptime()})", flush=True)

    expect = stage_flops(model, saes, task, rows, [int(args.l0 * task.n_prompts)] * len(saes))
    bound = sum(expect.values()) / rate / 1e9
    print(f"   before the run: the stages' matmul lower bounds (pairs estimated as L0 x prompts) add up to "
          f"{sum(expect.values()) / 1e12:.1f} TFLOP = {bound:.0f} s at {rate:.0f} GFLOP/s ({args.dtype}); corpus "
          f"statistics alone {expect['corpus'] / 1e12:.1f} TFLOP = {expect['corpus'] / rate / 1e9:.0f} s"
          + (": the 10-minute target is out of reach on this machine in this dtype" if bound > 600 else ""), flush=True)
    interventions_for(model).clear_cache()
    _, t = timed(lambda: direct_logit_attribution(model, task))
    step("DLA", t, expect["DLA"])
    stats, t = timed(lambda: corpus_feature_stats(model, saes, rows, k=20))
    step(f"corpus statistics, 2 SAEs, {len(rows)} stories", t, expect["corpus"])
    table_s, table_flop, stage_flop, pairs, acts = 0.0, 0.0, 0.0, [], []
    for sae, fs in zip(saes, stats.features, strict=True):
        (t_tab, n_pairs), _ = timed(lambda sae=sae: _prompt_analyses(model, sae, task, acts))
        pairs.append(n_pairs)
        flop = stage_flops(model, [sae], task, [], [n_pairs])[f"{sae.hook_point} table"]
        step(f"{sae.hook_point}: activations + effects of all {n_pairs} pairs (L0 at P "
             f"{n_pairs / task.n_prompts:.1f}) + table", t_tab, flop)
        table_s, table_flop, stage_flop = table_s + t_tab, table_flop + table_flops(model, sae, n_pairs), stage_flop + flop
        _, t = timed(lambda sae=sae, fs=fs: reconstruction_at_prediction(model, sae, task, mean_act=fs.mean_input,
                                                                          n_bootstrap=200))
        step(f"{sae.hook_point}: losses clean/SAE/zero/mean at P", t, table_flops(model, sae, 4 * task.n_prompts))
    table_rate = table_flop / table_s / 1e9
    print(f"   all-features tables: {sum(pairs)} pairs, {table_flop / 1e12:.2f} TFLOP of unavoidable matmul in "
          f"{table_s:.1f} s = {table_rate:.1f} GFLOP/s = {100 * table_rate / rate:.0f}% of the {args.dtype} matmul "
          f"rate measured before the run, {rate:.1f} GFLOP/s (target >= 50%)", flush=True)
    # the pairs are not the stage's only unavoidable work: each prompt's prefix must be run once (to the SAE's block)
    # for its key/value cache, as much matmul as ~40 pairs at this shape
    print(f"   with the prompts' one unavoidable prefix forward and encoder at P counted too: "
          f"{stage_flop / 1e12:.2f} TFLOP in {table_s:.1f} s = {stage_flop / table_s / 1e9:.1f} GFLOP/s = "
          f"{100 * stage_flop / table_s / 1e9 / rate:.0f}% of the matmul rate", flush=True)
    n_circ = min(task.n_prompts, args.ref_circuit_prompts or task.n_prompts)
    sub = task.subset(range(n_circ))
    # the activations at P the per-SAE analyses computed, as the pipeline passes them
    res, t = timed(lambda: find_circuit(model, saes, sub, acts=[_first_prompts(a, n_circ) for a in acts],
                                        ig_steps=10, corpus_rows=rows[:300]))
    scale = task.n_prompts / n_circ  # the circuit's work is per prompt (its corpus means aside): scaled linearly
    step(f"circuit ({len(res.nodes)} nodes, exact edges, AtP, IG, faithfulness)"
         + (f" on {n_circ} prompts x {scale:.1f}" if n_circ < task.n_prompts else ""), t * scale,
         stage_flops(model, saes, task, [], pairs)["circuit"])
    if n_circ < task.n_prompts:
        print(f"      the circuit ran on the first {n_circ} prompts in {t:.1f} s; the line above scales it to "
              f"{task.n_prompts} (--ref-circuit-prompts; at this shape it costs seconds per prompt on 2 cores)")
    rate_after = matmul_rate(device=args.device, dtype=dtype)
    total = sum(t for _, t, _ in times)
    flop = sum(f for _, _, f in times)
    print(f"   {'whole run':70s} {total:8.1f} s  ({total / 60:.1f} min; target < 10 min at 2 threads); matmul lower "
          f"bound {flop / 1e12:.1f} TFLOP = {flop / rate / 1e9:.0f} s at {rate:.0f} GFLOP/s"
          + (" > 600 s: the target is physically out of reach in this dtype on this machine" if flop / rate / 1e9 > 600
             else ""))
    print(f"   {args.dtype} matmul rate (2048x1024 @ 1024x4096): {rate:.1f} GFLOP/s before, {rate_after:.1f} after; "
          f"the tables ran at {100 * table_rate / max(rate, rate_after):.0f}% of the larger; {_uptime()}")


def bench_scaling(args) -> None:
    """Issue 17 item 3: how the prompt-side analyses (activations, every pair's effect, table; one SAE on layer 0)
    grow with the prompt count and with d_sae; near-linear means time per prompt (per feature) stays flat."""
    counts = [int(x) for x in args.scale_prompts.split(",")]
    sizes = [int(x) for x in args.scale_d_sae.split(",")]
    model, task, _ = _reference_setup(args, max(counts), 0)
    hook = "blocks.0.mlp.hook_post"
    print(f"\n== scaling at the reference shape ({args.dtype}, {torch.get_num_threads()} thread(s)): activations + "
          f"effects of every active pair + table, one SAE on {hook}, L0 ~{args.l0:g}; {_uptime()}")
    sae = calibrated_sae(model, task, hook, args.ref_d_sae, args.l0, dtype=args.dtype)
    base = None
    for n in counts:
        sub = task.subset(range(min(n, task.n_prompts)))
        interventions_for(model).clear_cache()
        t, pairs = _prompt_analyses(model, sae, sub)
        per = t / sub.n_prompts
        base = base or per
        print(f"   {sub.n_prompts:6d} prompts, d_sae {args.ref_d_sae:6d}: {pairs:7d} pairs {t:8.1f} s  "
              f"{1e3 * per:7.1f} ms/prompt ({per / base:.2f}x the first); {_uptime()}", flush=True)
    sub = task.subset(range(min(counts[0], task.n_prompts)))
    first = None
    for d in sizes:
        sae = calibrated_sae(model, task, hook, d, args.l0, dtype=args.dtype)  # L0 ~ --l0 at any d
        interventions_for(model).clear_cache()
        t, pairs = _prompt_analyses(model, sae, sub)
        first = first or (t, d, pairs)
        print(f"   {sub.n_prompts:6d} prompts, d_sae {d:6d}: {pairs:7d} pairs {t:8.1f} s  time {t / first[0]:.2f}x, "
              f"d_sae {d / first[1]:.0f}x, pairs {pairs / max(1, first[2]):.2f}x the first; {_uptime()}", flush=True)


def bench_corpus_memory(args, full: bool = False) -> None:
    """Issue 17 item 5: corpus statistics with two ``--ref-d-sae`` SAEs at the reference shape over each story count
    of ``--memory-stories`` (each story cut to its first ``--memory-story-tokens`` tokens, 0 = whole), each in a
    fresh process so the peak resident memory (``resource.getrusage``) is that pass's. Resident memory flat in the
    story count is what the check shows: the pass's state is ``d_sae``-sized except its kept events (tokens above
    ``token_fraction x`` a feature's maximum, documents above ``1/10`` of it), which are counted and printed, and
    which the pass bounds by ``--memory-event-bytes`` (past it, a second pass over the rows; printed)."""
    import subprocess
    import sys

    widths = [""] if not full else [args.memory_width]
    stories = args.memory_stories if not full else args.memory_full_stories
    for width in widths:
        for n in [int(x) for x in stories.split(",")]:
            cmd = [sys.executable, __file__, "--corpus-memory-child", "--only", "--threads", str(args.threads),
                   "--device", args.device, "--dtype", args.dtype, "--memory-stories", str(n),
                   "--memory-story-tokens", "0" if full else str(args.memory_story_tokens),
                   "--ref-d-sae", str(args.ref_d_sae), "--l0", str(args.l0),
                   "--memory-event-bytes", str(args.memory_event_bytes), "--memory-width", width]
            subprocess.run(cmd, check=True)


def bench_corpus_memory_full(args) -> None:
    """Issue 17 item 5 at full story length (``--ref-parts memory-full``): the corpus statistics of two
    ``--ref-d-sae`` SAEs over ``--memory-full-stories`` whole stories, on a random GPT-Neo with the reference's
    GPT-2 tokenizer (so the same tokens per story and the same 50,257-token vocabulary) but ``--memory-width``
    d_model,d_mlp, the SAEs on both MLP hook_post (d_in = d_mlp) calibrated to ``--l0`` as at the reference shape.

    Why narrower: the pass's own memory (counts, histograms, top-k, the kept events and the per-batch codes) depends
    on d_sae, the stories, their tokens and how often the features fire, not on d_in; d_in sets the weights, which
    are printed for the reference shape so that a reader can add them, and the batch's activations. At the
    reference shape the same pass is about 1 PFLOP of encoder matmuls (hours on 2 cores)."""
    bench_corpus_memory(args, full=True)


def _neo_weight_bytes(shape: dict, dtype: torch.dtype) -> int:
    """Bytes of a random GPT-Neo's parameters of ``shape`` (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        hf = _random_neo_hf(**shape)
    return sum(p.numel() for p in hf.parameters()) * torch.tensor([], dtype=dtype).element_size()


def _sae_weight_bytes(d_in: int, d_sae: int, dtype: torch.dtype) -> int:
    """Bytes of one standard SAE's parameters (W_enc, W_dec, b_enc, b_dec)."""
    return (2 * d_in * d_sae + d_sae + d_in) * torch.tensor([], dtype=dtype).element_size()


def _corpus_memory_child(args) -> None:
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats

    n_stories = int(args.memory_stories)
    shape = None
    if args.memory_width:
        d_model, d_mlp = (int(x) for x in args.memory_width.split(","))
        shape = dict(d_model=d_model, n_heads=4, d_mlp=d_mlp, window=256, n_ctx=2048)
    model, task, rows = _reference_setup(args, 50, n_stories, args.memory_story_tokens or None, shape=shape)
    saes = [calibrated_sae(model, task, f"blocks.{layer}.mlp.hook_post", args.ref_d_sae, args.l0, seed=layer,
                           dtype=args.dtype) for layer in (0, 1)]
    dtype = getattr(torch, args.dtype)
    weights = [sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20 for m in (model, *saes)]
    from saecircuits.analysis.corpus.statistics import _Accumulator

    table: dict[str, int] = {}  # the second pass's (feature, token) table per SAE: the part growing with the corpus
    state = _Accumulator.state
    _Accumulator.state = lambda self: table.__setitem__(self.sae.hook_point, len(self.tok_key)) or state(self)
    before = _status_mib("VmRSS")
    reset = _reset_peak_rss()  # the model's loading peak is not the pass's
    budget = args.memory_event_bytes if args.memory_event_bytes >= 0 else None
    stats, t = timed(lambda: corpus_feature_stats(model, saes, rows, k=20, max_event_bytes=budget))
    peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
           if args.device.startswith("cuda") else "")
    cut = (f"each cut to its first {args.memory_story_tokens} tokens" if args.memory_story_tokens
           else "whole stories")
    events = ", ".join(f"{fs.hook_point}: {int(fs.above_count.sum()):,} token events, {len(fs._band_value):,} band "
                       f"events" for fs in stats.features)
    held = sum(v.numel() * v.element_size() for fs in stats.features for v in vars(fs).values()
               if isinstance(v, torch.Tensor)) / 2**20
    where = "reference shape" if shape is None else (f"random GPT-Neo d_model {shape['d_model']}, d_mlp "
                                                     f"{shape['d_mlp']}, GPT-2 tokenizer")
    print(f"\n== corpus statistics memory: {len(rows):,} stories ({cut}; {stats.n_tokens:,} counted tokens), two "
          f"{args.ref_d_sae:,}-feature {args.dtype} SAEs, {where}, {torch.get_num_threads()} thread(s): "
          f"{t:.1f} s; {_uptime()}")
    print(f"   peak resident memory during the pass {peak:.0f} MiB = {peak / 1024:.2f} GiB "
          f"({'under' if peak < 4096 else 'OVER'} the 4 GiB target; "
          f"{before:.0f} MiB resident before it: model, tokenizer, stories, SAEs; so the pass's own "
          f"{peak - before:.0f} MiB; whole process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
          f"{'' if reset else ', which is what the first figure is: /proc/self/clear_refs was refused'}){gpu}")
    two = bool(stats.features[0].band_n)
    print(f"   kept at the end: {events}; event budget "
          f"{'none' if budget is None else f'{budget / 2**20:.0f} MiB'}: "
          f"{'over it, so a second pass read the rows again' if two else 'within it, one pass'}; the "
          f"statistics returned hold {held:.0f} MiB of tensors", flush=True)
    if two:
        print("   the second pass's token tables (16 bytes per distinct (feature, token) pair above the threshold): "
              + ", ".join(f"{h}: {n:,} pairs" for h, n in table.items()), flush=True)
    print(f"   weights in this process: model {weights[0]:.0f} MiB, SAEs {sum(weights[1:]):.0f} MiB", flush=True)
    if shape is not None:
        ref = RANDOM_NEO["reference"]
        ref_model = _neo_weight_bytes(ref, dtype) / 2**20
        ref_saes = 2 * _sae_weight_bytes(ref["d_mlp"], args.ref_d_sae, dtype) / 2**20
        # the largest batch's activations of both hooks (max_tokens positions) at d_mlp 4096 instead of this d_mlp
        reads = 2 * 8192 * (ref["d_mlp"] - shape["d_mlp"]) * torch.tensor([], dtype=dtype).element_size() / 2**20
        est = peak - sum(weights) + ref_model + ref_saes + reads
        print(f"   at the reference shape the weights are model {ref_model:.0f} MiB + two SAEs {ref_saes:.0f} MiB "
              f"(d_in {ref['d_mlp']}) and one batch's two hook reads up to {reads:.0f} MiB more: this peak with "
              f"them instead of these is about {est:.0f} MiB = {est / 1024:.2f} GiB "
              f"({'under' if est < 4096 else 'OVER'} 4 GiB; not counting the wider forward's other temporaries)",
              flush=True)


def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc/self/status, in MiB (NaN off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux: ``5`` to /proc/self/clear_refs); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default,stories260k,gpt2bpe")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    p.add_argument("--n-prompts", type=int, default=200)
    p.add_argument("--n-docs", type=int, default=200, help="corpus documents for mean activation and examples")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--l0", type=float, default=40.0, help="target mean L0 of the random SAEs at P")
    p.add_argument("--layer", type=int, default=0, help="SAE layer (negative counts from the last)")
    p.add_argument("--loop-pairs", type=int, default=300, help="(prompt, feature) pairs the loop is timed on")
    p.add_argument("--ref-prompts", type=int, default=1000)
    p.add_argument("--ref-d-sae", type=int, default=16384)
    p.add_argument("--ref-loop-prompts", type=int, default=20)
    p.add_argument("--workspace", default=os.environ.get("SAECIRCUITS_WORKSPACE",
                                                         str(Path(tempfile.gettempdir()) / "saecircuits-bench")))
    p.add_argument("--forward", action="store_true", help="also time one clean pass: bridge / engine / plain HF")
    p.add_argument("--archs", default=",".join(ARCHS),
                   help="--forward: also one row per architecture (tiny random models, GPT-2 BPE vocabulary)")
    p.add_argument("--memory", action="store_true", help="also run the 5,000-prompt x 16,384-feature memory check")
    p.add_argument("--table-2cores", action="store_true", help="also time the all-features table at 2 threads")
    p.add_argument("--circuit", action="store_true", help="also time the whole circuit on the embedded default")
    p.add_argument("--positions", action="store_true", help="also time the circuit across positions (issue 16)")
    p.add_argument("--top-exact", type=int, default=200, help="--positions: nodes per prompt with exact effects")
    p.add_argument("--only", action="store_true", help="run only the extra modes given")
    p.add_argument("--ref-stories", type=int, default=2000, help="reference: stories of the corpus statistics")
    p.add_argument("--ref-cache-mib", type=int, default=0,
                   help="reference: clean-pass cache kept between analyses, MiB (0: the product's 512 MiB)")
    p.add_argument("--ref-circuit-prompts", type=int, default=0,
                   help="reference: run the circuit on the first this many prompts and scale its time (0: all)")
    p.add_argument("--ref-compare", action="store_true",
                   help="reference: the product-vs-loop comparison of the other model classes instead of the scale run")
    p.add_argument("--scale-prompts", default="250,500,1000,2000", help="reference: prompt counts of the scaling rows")
    p.add_argument("--scale-d-sae", default="4096,16384,65536", help="reference: d_sae of the scaling rows")
    p.add_argument("--memory-stories", default="2000,20000",
                   help="reference: story counts of the corpus memory check (one fresh process each)")
    p.add_argument("--memory-event-bytes", type=int, default=DEFAULT_MAX_EVENT_BYTES,
                   help="reference memory check: the corpus pass's max_event_bytes (-1: no budget)")
    p.add_argument("--memory-story-tokens", type=int, default=32,
                   help="reference memory check: stories cut to their first this many tokens (0: whole stories)")
    p.add_argument("--memory-width", default="64,128",
                   help="reference memory-full part: d_model,d_mlp of the narrow random GPT-Neo (SAE d_in = d_mlp)")
    p.add_argument("--memory-full-stories", default="20000",
                   help="reference memory-full part: whole-story counts (one fresh process each)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="reference: the model's and the SAEs' dtype (the product's --dtype)")
    p.add_argument("--ref-parts", default="run,scaling,memory",
                   help="reference: which parts to run (run = the whole run, scaling, memory), comma-separated")
    p.add_argument("--device", default="cpu", help="reference scale run: cpu or cuda (the other modes run on cpu)")
    p.add_argument("--corpus-memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.corpus_memory_child:
        return _corpus_memory_child(args)
    if not args.only:
        for name in args.models.split(","):
            if name == "reference" and not args.ref_compare:  # issue 17: the scale run, scaling, corpus memory
                parts = args.ref_parts.split(",")
                if unknown := set(parts) - {"run", "scaling", "memory", "memory-full"}:
                    raise SystemExit(f"--ref-parts: unknown part(s) {sorted(unknown)}; use run, scaling, memory, "
                                     f"memory-full")
                if "run" in parts:
                    bench_reference(args)
                if "scaling" in parts:
                    bench_scaling(args)
                if "memory" in parts:
                    bench_corpus_memory(args)
                if "memory-full" in parts:
                    bench_corpus_memory_full(args)
            else:
                bench_case(name, args)
    if args.forward:
        bench_forward(args)
    if args.memory:
        bench_memory(args)
    if args.table_2cores:
        bench_table_2cores(args)
    if args.circuit:
        bench_circuit(args)
    if args.positions:
        bench_positions(args)


if __name__ == "__main__":
    main()
