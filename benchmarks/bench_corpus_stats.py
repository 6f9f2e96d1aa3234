"""Peak memory and time of the corpus feature statistics pass (analysis.corpus_stats), and its speed against the
reference notebook's per-story loop.

Modes:
  --memory   (default) ``--n-docs`` stories (1,000) and ``--n-saes`` random ``--d-sae``-feature SAEs (16,384; one on
             each MLP of the embedded default model, layers 0 and 1) in one streaming pass with every statistic
             (top-k stories, density, L0, log10 histograms, token-wise counts, banded examples, token counts). Prints
             the time and the peak resident memory of the whole process (``resource.getrusage``), next to what the
             notebook's dense tables would need for the same run ([stories x d_sae] max values and int64 positions
             per SAE, and its [d_sae x d_vocab] int32 token counts).
  --compare  the same statistics on ``--compare-docs`` stories (100) the notebook's way (one story per forward,
             dense per-story maxima, a dense token-count table) and streamed; prints both times and checks that the
             per-document maxima agree.

Each SAE is random with its encoder bias set per feature so that the mean L0 over corpus tokens is about ``--l0``
(40): memory depends on how many features fire, not on what they mean.

Examples:
    python benchmarks/bench_corpus_stats.py                      # the 1,000-story x 16,384-feature memory check
    python benchmarks/bench_corpus_stats.py --compare --threads 2
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

from saecircuits.analysis.corpus.statistics import corpus_feature_stats, counted_token_mask, special_ids_of  # noqa: E402
from saecircuits.models.interventions import interventions_for  # noqa: E402
from saecircuits.models.tokens import encode_documents  # noqa: E402
from saecircuits.saes.base import SAE, SAEConfig  # noqa: E402


def peak_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_default(args):
    """The embedded default model and ``n_docs`` stories from its held-out generator, as BOS-first token rows."""
    from saecircuits.data.storygen import generate_stories
    from saecircuits.models.default import DEFAULT_CONFIG, ensure_default_model
    from saecircuits.models.load import load_model

    model = load_model(ensure_default_model(args.workspace, progress=False))
    docs = generate_stories(args.n_docs, seed=DEFAULT_CONFIG.heldout_seed)
    rows = [r for r in encode_documents(model.tokenizer, docs, max_len=int(model.cfg.n_ctx)) if len(r) > 1]
    return model, rows


def corpus_calibrated_sae(model, rows, hook: str, d_sae: int, l0: float, seed: int = 0) -> SAE:
    """A random ReLU SAE whose encoder bias puts each feature's firing rate over corpus tokens near ``l0 / d_sae``."""
    d_in = int(model.cfg.d_mlp)
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig("standard", d_in=d_in, d_sae=d_sae, hook_point=hook))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        W_dec = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        from saecircuits.models.hooks import row_batches

        iv = interventions_for(model)
        xs = []
        for b in row_batches(rows[:50], 0):
            x = iv.read_all(b.tokens, [hook])[hook]
            xs.append(x[counted_token_mask(b.tokens, b.positions + 1, special_ids_of(model))].float())
        xs = torch.cat(xs)[:2000]
        pre = (xs - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, max(0.0, min(1.0, 1 - l0 / d_sae)), dim=0))
    return sae


def bench_memory(args) -> None:
    model, rows = load_default(args)
    n_layers = int(model.cfg.n_layers)
    saes = [corpus_calibrated_sae(model, rows, f"blocks.{layer % n_layers}.mlp.hook_post", args.d_sae, args.l0,
                                  seed=layer) for layer in range(args.n_saes)]
    before = peak_mib()
    t0 = time.perf_counter()
    stats = corpus_feature_stats(model, saes, rows, k=args.k)
    t = time.perf_counter() - t0
    peak = peak_mib()
    n_tok = stats.n_tokens
    d_vocab = int(model.cfg.d_vocab)
    dense_max = len(rows) * args.d_sae * (4 + 8) / 2**20  # float32 maxima + int64 positions, per SAE
    dense_tok = args.d_sae * d_vocab * 4 / 2**20
    print(f"== corpus statistics: {len(rows)} stories ({n_tok} counted tokens), {len(saes)} SAE(s) x {args.d_sae} "
          f"features on the embedded default model, one pass, {torch.get_num_threads()} thread(s)")
    for fs in stats.features:
        print(f"   {fs.hook_point}: L0 {fs.l0:.1f}, dead {int((fs.fire_count == 0).sum())}, "
              f"token events above {fs.token_fraction:.2f} x max {int(fs.above_count.sum())}, "
              f"banded candidates {fs._band_value.numel()}")
    print(f"   time {t:.1f} s ({n_tok / t:.0f} tokens/s)")
    print(f"   peak resident memory {peak:.0f} MiB = {peak / 1024:.2f} GiB ({before:.0f} MiB before the pass); "
          f"limit 4096 MiB: {'OK' if peak < 4096 else 'EXCEEDED'}")
    print(f"   the notebook's dense tables for the same run: {dense_max * len(saes):.0f} MiB of max tables + "
          f"{dense_tok * len(saes):.0f} MiB of token counts (for its 21,990 stories: "
          f"{21990 * args.d_sae * 12 / 2**30 * len(saes):.1f} GiB of max tables)")


def notebook_loop(model, sae, rows, fraction: float):
    """The notebook's way (its max activations and token-wise counts): one story per forward, dense
    [n_docs, d_sae] maxima and [d_sae, d_vocab] counts
    (here with special tokens left out, as the streaming pass does, so the numbers compare)."""
    iv = interventions_for(model)
    special = special_ids_of(model)
    d_vocab = int(model.cfg.d_vocab)
    max_acts = torch.zeros(len(rows), sae.d_sae)
    max_idx = torch.zeros(len(rows), sae.d_sae, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = torch.tensor([row])
        x = iv.read_all(tokens, [sae.hook_point])[sae.hook_point][0]
        with torch.no_grad():
            f = sae.encode(x).float() * counted_token_mask(tokens, torch.tensor([len(row)]), special)[0, :, None]
        max_acts[i], max_idx[i] = f.max(0)
    thr = fraction * max_acts.max(0).values
    counts = torch.zeros(sae.d_sae, d_vocab, dtype=torch.int32)
    for row in rows:
        tokens = torch.tensor([row])
        x = iv.read_all(tokens, [sae.hook_point])[sae.hook_point][0]
        with torch.no_grad():
            f = sae.encode(x).float() * counted_token_mask(tokens, torch.tensor([len(row)]), special)[0, :, None]
        p, k = torch.nonzero(f > thr, as_tuple=True)
        counts.index_put_((k, tokens[0, p]), torch.ones_like(k, dtype=torch.int32), accumulate=True)
    return max_acts, max_idx, counts


def bench_compare(args) -> None:
    a = argparse.Namespace(**vars(args))
    a.n_docs = args.compare_docs
    model, rows = load_default(a)
    sae = corpus_calibrated_sae(model, rows, "blocks.0.mlp.hook_post", args.d_sae, args.l0)
    t0 = time.perf_counter()
    max_acts, _, counts = notebook_loop(model, sae, rows, 0.25)
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs = corpus_feature_stats(model, [sae], rows, k=args.k)[0]
    t_stream = time.perf_counter() - t0
    top = max_acts.max(0).values
    diff = float((top - fs.max_activation).abs().max())
    same_counts = int(counts.sum()) == int(fs.above_count.sum())
    print(f"== {len(rows)} stories x {args.d_sae} features (default model, layer 0), {torch.get_num_threads()} "
          f"thread(s)")
    print(f"   notebook loop (one story per forward, dense tables, two passes): {t_loop:.2f} s")
    print(f"   streaming pass (batched, one pass, every statistic):            {t_stream:.2f} s "
          f"({t_loop / t_stream:.1f}x)")
    print(f"   max |corpus maximum difference| {diff:.2e}; token-count totals equal: {same_counts}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-docs", type=int, default=1000)
    p.add_argument("--n-saes", type=int, default=2, help="SAEs in the pass (one per MLP layer, cycling)")
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--l0", type=float, default=40.0, help="target mean L0 of the random SAEs over corpus tokens")
    p.add_argument("--k", type=int, default=20, help="stories kept per feature in the top-k")
    p.add_argument("--workspace", default=os.environ.get("SAECIRCUITS_WORKSPACE",
                                                         str(Path(tempfile.gettempdir()) / "saecircuits-bench")))
    p.add_argument("--memory", action="store_true", help="the 1,000-story x 16,384-feature memory check (default)")
    p.add_argument("--compare", action="store_true", help="time the notebook's per-story loop against the pass")
    p.add_argument("--compare-docs", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory or not args.compare:
        bench_memory(args)
    if args.compare:
        bench_compare(args)


if __name__ == "__main__":
    main()
