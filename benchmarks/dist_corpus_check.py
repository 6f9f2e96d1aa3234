"""Sharded corpus statistics under torchrun equal one process's (issue 17 item 1), on this machine's backend.

Run under ``torchrun --nproc_per_node=N``: NCCL with one GPU per rank when ``N`` GPUs are visible, else gloo on the
CPU. Every rank computes the sharded statistics (documents ``i % N == rank``); rank 0 also computes the
single-process pass with ``shard=False`` and prints the largest differences (counts must be 0, floats ~1e-6
relative) and both times.

    torchrun --nproc_per_node=2 benchmarks/dist_corpus_check.py --docs 203
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from saecircuits.analysis.corpus.statistics import corpus_feature_stats  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=203, help="documents (odd, so the shards cannot be even)")
    p.add_argument("--d-sae", type=int, default=4096)
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if nccl else "gloo")
    device = f"cuda:{rank}" if nccl else "cpu"
    from bench_analyses import RANDOM_NEO, _gpt2_tokenizer, _random_neo_hf, _stories

    from saecircuits.models.load import load_hf_model
    from saecircuits.models.tokens import encode_documents
    from saecircuits.saes.base import SAE, SAEConfig

    tok = _gpt2_tokenizer()
    model = load_hf_model(_random_neo_hf(**RANDOM_NEO["gpt2bpe"]), tok, model_name="random-neo-d128", device=device)
    rows = [r for r in encode_documents(tok, _stories(args.docs), max_len=512) if len(r) > 1]
    saes = []
    for layer in (0, 1):
        gen = torch.Generator().manual_seed(layer)
        sae = SAE(SAEConfig("standard", d_in=512, d_sae=args.d_sae, hook_point=f"blocks.{layer}.mlp.hook_post"))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(512, args.d_sae, generator=gen) / 512**0.5)
            sae.W_dec.copy_(torch.randn(args.d_sae, 512, generator=gen) / 512**0.5)
            sae.b_enc.fill_(-1.0)
        saes.append(sae.to(device))
    start = time.perf_counter()
    sharded = corpus_feature_stats(model, saes, rows, progress=False)
    t_sharded = time.perf_counter() - start
    if rank == 0:
        start = time.perf_counter()
        single = corpus_feature_stats(model, saes, rows, progress=False, shard=False)
        t_single = time.perf_counter() - start
        count_diff, float_rel = 0, 0.0
        for g, w in zip(sharded.features, single.features, strict=True):
            for name in ("fire_count", "l0_counts", "hist", "top_doc", "top_pos", "top_tokens", "above_count"):
                count_diff = max(count_diff, int((getattr(g, name) - getattr(w, name)).abs().max()))
            for name in ("activation_sum", "max_activation", "input_sum", "top_value"):
                a, b = getattr(g, name).double(), getattr(w, name).double()
                float_rel = max(float_rel, float(((a - b).abs() / b.abs().clamp(min=1e-30)).max()))
        print(f"sharded corpus statistics, {world} ranks ({'nccl' if nccl else 'gloo'}), {len(rows)} documents, "
              f"2 SAEs x {args.d_sae}: {t_sharded:.1f} s sharded vs {t_single:.1f} s one process; largest count "
              f"difference {count_diff} (must be 0), largest relative float difference {float_rel:.1e}")
        if count_diff:
            raise SystemExit("sharded corpus statistics differ from one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
