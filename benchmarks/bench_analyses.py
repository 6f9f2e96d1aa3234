"""Time the first-slice analyses batched vs a one-prompt-at-a-time loop in the reference notebook's style.

Same model, SAE and prompts for both; prints both times, the speed-up and the largest disagreement between the two
(which should be float noise). Defaults to a tiny random GPT-Neo so it runs anywhere in well under a minute:

    python benchmarks/bench_analyses.py                      # CPU, tiny model
    python benchmarks/bench_analyses.py --model DIR --data stories.txt --sae SAE_DIR   # a real model and SAE
    python benchmarks/bench_analyses.py --device cuda --n-prompts 256 --d-model 256 --d-mlp 1024

Analyses timed: DLA (spec F1), losses at P clean / SAE / zero ablation (F2), the single-feature ablation table over
the top candidates (F5 with F3 ablation) and a multi-feature ablation (F11).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from saecircuits.analysis.ablation import ablate_features  # noqa: E402
from saecircuits.analysis.dla import direct_logit_attribution  # noqa: E402
from saecircuits.analysis.features import feature_ablation_table, feature_activations  # noqa: E402
from saecircuits.analysis.reconstruction import reconstruction_at_prediction  # noqa: E402
from saecircuits.saes.base import SAE, SAEConfig  # noqa: E402
from saecircuits.tasks.base import Task  # noqa: E402


def build_model(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformer_lens import TransformerBridge
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(['Tom said, "I like the dog." Sue said, "Yes!" They ran home.'] * 20, trainer)
    folder = tempfile.mkdtemp(prefix="bench-tok-")
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot
    ).save_pretrained(folder)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(folder)
    cfg = GPTNeoConfig(
        vocab_size=len(hf_tok),
        max_position_embeddings=512,
        hidden_size=args.d_model,
        num_layers=2,
        num_heads=4,
        intermediate_size=args.d_mlp,
        attention_types=[[["global", "local"], 1]],
        window_size=256,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(args.seed)
    hf = GPTNeoForCausalLM(cfg).eval()
    bridge = TransformerBridge.boot_transformers("bench-neo", hf_model=hf, tokenizer=hf_tok)
    bridge.enable_compatibility_mode()
    return bridge.to(args.device)


def build_sae(args, device):
    gen = torch.Generator().manual_seed(args.seed)
    sae = SAE(SAEConfig("standard", d_in=args.d_mlp, d_sae=args.d_sae, hook_point="blocks.1.mlp.hook_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(args.d_mlp, args.d_sae, generator=gen) / args.d_mlp**0.5)
        sae.W_dec.copy_(torch.randn(args.d_sae, args.d_mlp, generator=gen) / args.d_mlp**0.5)
        sae.b_enc.copy_(-0.2 * torch.rand(args.d_sae, generator=gen))
    return sae.to(device)


def build_task(args, vocab: int) -> Task:
    gen = torch.Generator().manual_seed(args.seed + 1)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.n_prompts,), generator=gen).tolist()
    rows = [[0] + torch.randint(1, vocab, (n - 1,), generator=gen).tolist() for n in lengths]
    answers = torch.randint(1, vocab, (args.n_prompts,), generator=gen).tolist()
    return Task("bench", prompts=[""] * len(rows), token_ids=rows, answer_ids=answers)


# --- one prompt at a time, as the reference notebook does (batch of 1, answer appended, positions -2 / -1) ----------


def _full(task, i, device):
    return torch.tensor([task.token_ids[i] + [task.answer_ids[i]]], device=device)


def _loss_at_p(model, tokens, hooks=()):
    logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks))
    return -torch.log_softmax(logits[0, -2].float(), -1)[tokens[0, -1]]


def loop_dla(model, task, device):
    out = []
    for i in range(task.n_prompts):
        tokens = _full(task, i, device)
        _, cache = model.run_with_cache(tokens[:, :-1])
        stack = cache.get_full_resid_decomposition(
            layer=-1, expand_neurons=False, apply_ln=True, pos_slice=-1
        )
        out.append((stack[:, 0] @ model.W_U[:, tokens[0, -1]]).cpu())
    return torch.stack(out)


def loop_reconstruction(model, sae, task, device):
    hook = sae.hook_point
    out = []
    for i in range(task.n_prompts):
        tokens = _full(task, i, device)

        def zero(v, hook=None):
            v = v.clone()
            v[:, -2] = 0.0
            return v

        def splice(v, hook=None):
            v = v.clone()
            v[0, -2] = sae(v[0, -2])
            return v

        out.append([float(_loss_at_p(model, tokens, h)) for h in ([], [(hook, splice)], [(hook, zero)])])
    return torch.tensor(out)


def loop_feature_losses(model, sae, task, features, acts, device):
    out = {}
    for k in features:
        for i in torch.nonzero(acts[:, k] > 0).flatten().tolist():
            tokens = _full(task, i, device)

            def ablate(v, hook=None, k=k):
                v = v.clone()
                h = v[0, -2]
                f_k = torch.relu((h - sae.b_dec) @ sae.W_enc[:, k] + sae.b_enc[k])
                v[:, -2] = h - f_k * sae.W_dec[k]
                return v

            out[(i, k)] = float(
                _loss_at_p(model, tokens, [(sae.hook_point, ablate)]) - _loss_at_p(model, tokens)
            )
    return out


def loop_multi_ablation(model, sae, task, features, device):
    idx = torch.tensor(features, device=device)
    out = []
    for i in range(task.n_prompts):
        tokens = _full(task, i, device)

        def ablate(v, hook=None):
            v = v.clone()
            h = v[0, -2]
            v[:, -2] = h - torch.relu((h - sae.b_dec) @ sae.W_enc[:, idx] + sae.b_enc[idx]) @ sae.W_dec[idx]
            return v

        out.append(float(_loss_at_p(model, tokens, [(sae.hook_point, ablate)]) - _loss_at_p(model, tokens)))
    return torch.tensor(out)


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-prompts", type=int, default=48)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=120)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-mlp", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--n-features", type=int, default=8, help="candidates in the feature table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a real model (HF folder / llama2.c .bin) instead of the tiny random one")
    parser.add_argument("--data", help="with --model: corpus for the closing-quote task")
    parser.add_argument("--sae", help="with --model: an SAE folder (SAELens layout) for that model")
    args = parser.parse_args()

    if args.model:
        from saecircuits.data.corpus import read_documents
        from saecircuits.models.load import load_model
        from saecircuits.saes.io import load_sae
        from saecircuits.tasks.closing_quote import closing_quote_task

        if not (args.data and args.sae):
            parser.error("--model needs --data and --sae")
        model = load_model(args.model, device=args.device)
        sae = load_sae(args.sae, device=args.device)
        task = closing_quote_task(read_documents(args.data), model.tokenizer, max_prompts=args.n_prompts,
                                  max_tokens=int(model.cfg.n_ctx))
        lens = [len(t) for t in task.token_ids]
        args.d_model, args.d_mlp, args.d_sae = model.cfg.d_model, sae.d_in, sae.d_sae
        args.min_len, args.max_len = min(lens), max(lens)
    else:
        model = build_model(args)
        sae = build_sae(args, args.device)
        task = build_task(args, model.cfg.d_vocab)
    acts = feature_activations(model, sae, task)
    active = acts > 0
    mean_act = (acts * active).sum(0) / active.sum(0).clamp(min=1)
    features = torch.argsort(mean_act * (active.float().mean(0) >= 0.05), descending=True)[
        : args.n_features
    ].tolist()
    print(
        f"model d_model={args.d_model} d_mlp={args.d_mlp} vocab={model.cfg.d_vocab}; SAE d_sae={args.d_sae}; "
        f"{task.n_prompts} prompts of {args.min_len}..{args.max_len} tokens; device {args.device}"
    )
    rows = []

    batched, t_b = _timed(lambda: direct_logit_attribution(model, task).per_prompt)
    looped, t_l = _timed(lambda: loop_dla(model, task, args.device))
    rows.append(("DLA (F1)", t_b, t_l, float((batched - looped.float()).abs().max())))

    rec, t_b = _timed(lambda: reconstruction_at_prediction(model, sae, task, n_bootstrap=200))
    looped, t_l = _timed(lambda: loop_reconstruction(model, sae, task, args.device))
    batched = torch.stack([rec.clean_loss, rec.sae_loss, rec.zero_loss], 1)
    rows.append(("losses clean/SAE/zero (F2)", t_b, t_l, float((batched - looped).abs().max())))

    table, t_b = _timed(
        lambda: feature_ablation_table(
            model, sae, task, min_fraction_active=0.05, max_candidates=args.n_features, acts=acts
        )
    )
    table_features = table["feature"].tolist()
    looped, t_l = _timed(lambda: loop_feature_losses(model, sae, task, table_features, acts, args.device))
    loop_means = {
        k: sum(v for (i, kk), v in looped.items() if kk == k) / table["n_prompts"][j]
        for j, k in enumerate(table_features)
    }
    diff = max(abs(loop_means[k] - v) for k, v in zip(table_features, table["loss_increase"], strict=True))
    rows.append((f"feature table, {len(looped)} (prompt x feature) pairs (F5)", t_b, t_l, diff))

    abl, t_b = _timed(lambda: ablate_features(model, sae, task, features))
    looped, t_l = _timed(lambda: loop_multi_ablation(model, sae, task, features, args.device))
    diff = float((torch.tensor(abl.per_prompt["loss_increase"].to_numpy()) - looped).abs().max())
    rows.append((f"ablate {len(features)} features together (F11)", t_b, t_l, diff))

    print(f"{'analysis':58s} {'batched s':>10s} {'loop s':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, tb, tl, d in rows:
        print(f"{name:58s} {tb:10.3f} {tl:10.3f} {tl / tb:8.1f}x {d:11.2e}")
    tb, tl = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'total':58s} {tb:10.3f} {tl:10.3f} {tl / tb:8.1f}x")


if __name__ == "__main__":
    main()
