"""Benchmark (not a test): load time and peak memory of a big SAE, against the size of its files.

Usage::

    python benchmarks/bench_sae_load.py --threads 1                      # 65,536 x 2,304 bfloat16, SAELens layout
    python benchmarks/bench_sae_load.py --threads 1 --src /path/to/other/checkout/src   # compare another version
    python benchmarks/bench_sae_load.py --d-sae 16384 --keep /tmp/sae    # smaller; keep the files

What is measured: the SAE's files are written once to a temporary folder (random bfloat16 weights, non-zero biases,
in the SAELens 6 layout by ``saecircuits.saes.io.save_sae``; and, when the Gemma Scope family module exists, the same
sizes as a float32 ``params.npz`` as Gemma Scope 1 ships them). Each load then runs in a fresh child process (so
nothing is cached in the process, and its peak is its own): ``saecircuits.saes.formats.load_sae(path)`` on the CPU,
timed with ``time.perf_counter``; its peak resident memory is the process's ``VmHWM`` after the load minus its
resident memory just before it (after the imports), and "held" is the resident memory the loaded SAE
keeps once the load returned (the memory map of the file is released by then). Resident memory counts the file's
pages while they are memory-mapped, so a loader that copies each tensor once into the SAE peaks near twice the
file size; one that also made a float32 copy of every bfloat16 tensor would peak near four times it (float64: six).
The OS page cache is not cleared between runs, so the time is that of a warm read.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_bytes(key: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (this process's peak resident) from ``/proc/self/status``; not
    getrusage's ``ru_maxrss``, which keeps the parent's peak across fork + exec."""
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def child(path: str, hook: str | None, threads: int) -> None:
    """Load ``path`` once and print a JSON line: seconds, peak and held resident bytes above the baseline."""
    import torch

    torch.set_num_threads(threads)
    from saecircuits.saes.formats import load_sae

    base = _status_bytes("VmRSS")
    if _status_bytes("VmHWM") > base + (64 << 20):
        # the imports peaked above the baseline: the high-water mark would hide the load's own peak
        print(json.dumps({"warning": "imports peaked above the baseline; peak is an upper bound"}), file=sys.stderr)
    t = time.perf_counter()
    sae = load_sae(path, hook=hook)
    seconds = time.perf_counter() - t
    peak = _status_bytes("VmHWM") - base
    held = _status_bytes("VmRSS") - base
    print(json.dumps({"seconds": seconds, "peak": peak, "held": held, "dtype": sae.cfg.dtype,
                      "d_in": sae.d_in, "d_sae": sae.d_sae, "version": __import__("saecircuits").__file__}))


def _write_saelens(folder: Path, d_in: int, d_sae: int) -> Path:
    import torch

    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.io import build_empty_sae, save_sae

    sae = build_empty_sae(SAEConfig("standard", d_in, d_sae, "blocks.12.hook_resid_post", dtype="bfloat16"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in (sae.W_enc, sae.W_dec):
            for rows in torch.arange(w.shape[0]).split(512):  # in chunks: float32 randoms for a slice at a time
                w[rows] = (0.02 * torch.randn(len(rows), w.shape[1], generator=gen)).to(w.dtype)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
    return save_sae(sae, folder)


def _write_gemma_scope(folder: Path, d_in: int, d_sae: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = {"W_enc": (0.02 * rng.standard_normal((d_in, d_sae), dtype=np.float32)),
              "W_dec": (0.02 * rng.standard_normal((d_sae, d_in), dtype=np.float32)),
              "b_enc": rng.standard_normal(d_sae, dtype=np.float32),
              "b_dec": rng.standard_normal(d_in, dtype=np.float32),
              "threshold": rng.uniform(0.05, 0.5, d_sae).astype(np.float32)}
    np.savez(folder / "params.npz", **arrays)
    return folder


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _run_child(path: Path, hook: str | None, threads: int, src: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(threads)]
    cmd += ["--hook", hook] if hook else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="loads per file (each in a fresh process)")
    ap.add_argument("--src", default=None, help="import saecircuits from this src folder in the children")
    ap.add_argument("--keep", default=None, help="write the files here and keep them (default: a temp folder)")
    ap.add_argument("--no-npz", action="store_true", help="skip the Gemma Scope float32 .npz")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hook", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.hook, args.threads)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_sae_load."))
    cases = []
    folder = root / "saelens-bf16"
    if not (folder / "cfg.json").is_file():
        _write_saelens(folder, args.d_in, args.d_sae)
    cases.append(("SAELens bfloat16", folder, None))
    if not args.no_npz and importlib.util.find_spec("saecircuits.saes.formats.gemma_scope") is not None:
        gs = root / "gemma-scope-2b-pt-res" / "layer_12" / "width_65k" / "average_l0_80"
        if not (gs / "params.npz").is_file():
            _write_gemma_scope(gs, args.d_in, args.d_sae)
        cases.append(("Gemma Scope float32 .npz", gs, "blocks.12.hook_resid_post"))
    elif not args.no_npz:
        print("(no Gemma Scope family module in this checkout: the .npz case is skipped)")
    print(f"{args.d_sae} x {args.d_in} SAE, {args.threads} thread(s), files in {root}")
    for title, path, hook in cases:
        size = _size(path)
        runs = [_run_child(path, hook, args.threads, args.src) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        peak = max(r["peak"] for r in runs)
        print(f"{title}: files {size / 2**20:.0f} MiB; load {best['seconds']:.2f} s (best of {len(runs)}); "
              f"peak resident +{peak / 2**20:.0f} MiB = {peak / size:.2f} x the files; held after load "
              f"+{best['held'] / 2**20:.0f} MiB; SAE dtype {best['dtype']}; saecircuits from {best['version']}")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
