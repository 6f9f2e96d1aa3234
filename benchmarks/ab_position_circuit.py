"""The circuit across positions before and after a change, in ONE run: ``position_circuit`` (as the pipeline calls
it, on the demo's cached workspace, see bench_position_circuit.py) from a baseline commit's ``src`` and from this
tree's, each in a fresh process, alternately (``--rounds`` of each), at ``--threads`` threads. Prints every run's
pass timings (wall; and the process's CPU seconds in passes B and C) with the load average, the medians' ratios, and compares the two outputs: nodes by id and edges by
(src, dst) (lists in another order are counted apart), every count, string and key equal, every float to ``--rtol``
relative or ``--atol`` absolute (and how many differ beyond ``--rtol`` alone).

Example:
    python benchmarks/ab_position_circuit.py --baseline main --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNER = r"""
import json, os, sys, time
sys.path.insert(0, {bench!r})
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from saecircuits.cli import threading_defaults
threading_defaults()
import torch
torch.set_num_threads({threads})
from pathlib import Path
import bench_position_circuit as BP
import saecircuits.analysis.circuit.position_graph as PGm
from saecircuits.pipeline.circuit import POSITION_KW
model, saes, task, rows = BP.demo_case(Path({workspace!r}), {n_prompts}, Path({sae_root!r}))
timings = {{}}
cpu = {{"B cpu": 0.0, "C cpu": 0.0}}  # this process's CPU seconds in passes B and C (less sensitive to other load)
def _cpu(fn, key):
    def wrapped(*a, **k):
        c = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            cpu[key] += time.process_time() - c
    return wrapped
PGm._example_batch = _cpu(PGm._example_batch, "B cpu")
PGm._Verification.run = _cpu(PGm._Verification.run, "C cpu")
t = time.perf_counter()
pos = PGm.position_circuit(model, saes, task, progress=False, timings=timings, **POSITION_KW)
timings["total"] = time.perf_counter() - t
timings.update(cpu)
json.dump({{"timings": timings, "load": os.getloadavg(), "src": PGm.__file__, "pos": pos}}, open({out!r}, "w"))
"""


def run_one(src: Path, out: Path, args) -> dict:
    code = RUNNER.format(bench=str(ROOT / "benchmarks"), threads=args.threads, workspace=args.workspace,
                         n_prompts=args.n_prompts, sae_root=str(args.sae_root), out=str(out))
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return json.loads(out.read_text())


def _key(x):
    """A graph node's or edge's identity (lists of them are compared by it: near-equal values may swap places)."""
    if isinstance(x, dict):
        if "id" in x:
            return ("id", x["id"])
        if "src" in x and "dst" in x:
            return ("edge", x["src"], x["dst"])
    return None


def compare(a, b, rtol: float, atol: float, path: str = "", out: dict | None = None) -> dict:
    """The differences between two JSON values: ``out["values"]`` floats beyond ``rtol`` relative and ``atol``
    absolute, ``out["rel"]`` the number beyond ``rtol`` alone (and 1e-12 absolute), ``out["other"]`` any other
    difference (keys, lengths, counts, strings, node/edge sets), ``out["order"]`` lists of nodes/edges holding the
    same items in another order."""
    out = {"values": [], "rel": 0, "digit": 0, "other": [], "order": 0, "max_abs": 0.0} if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            out["other"].append(f"{path}: keys {sorted(set(a) ^ set(b))[:5]}")
        for k in a:
            if k in b:
                compare(a[k], b[k], rtol, atol, f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        ka, kb = [_key(x) for x in a], [_key(x) for x in b]
        if a and all(k is not None for k in ka + kb):
            if ka != kb:
                if sorted(ka, key=str) != sorted(kb, key=str):
                    out["other"].append(f"{path}: items {sorted(set(ka) ^ set(kb), key=str)[:4]}")
                else:
                    out["order"] += 1
            by_b = dict(zip(kb, b, strict=True))
            for k, x in zip(ka, a, strict=True):
                if k in by_b:
                    compare(x, by_b[k], rtol, atol, f"{path}[{k[1:]}]", out)
            return out
        if len(a) != len(b):
            out["other"].append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            compare(x, y, rtol, atol, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float):
        if a != b:
            out["max_abs"] = max(out["max_abs"], abs(a - b))
            out["rel"] += not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)
            # circuit.json writes 6 significant digits: a change below them can move the last one by a unit
            unit = 10.0 ** (math.floor(math.log10(max(abs(a), abs(b)))) - 5)
            out["digit"] += abs(a - b) > unit * 1.000001
            if not math.isclose(a, b, rel_tol=rtol, abs_tol=atol):
                out["values"].append(f"{path}: {a!r} != {b!r}")
    elif a != b or type(a) is not type(b):
        out["other"].append(f"{path}: {a!r} != {b!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="a commit whose src/ is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workspace", default=str(Path.home() / ".cache" / "saecircuits"))
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-5,
                    help="absolute tolerance: float32 rounding of log-probs of a few nats and activations of a few units "
                         "(the circuit's own batching tests use 1e-5)")
    ap.add_argument("--sae-root", default=None,
                    help="the workspace's saes/<key> directory (default: the first by name, chosen once: a demo run "
                         "beside this one may add another)")
    args = ap.parse_args()
    if args.sae_root is None:
        args.sae_root = sorted((Path(args.workspace) / "saes").glob("*/blocks.0.mlp.hook_post/sae"))[0].parents[1]
    print(f"SAEs: {args.sae_root}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        sides = {"baseline": base / "src", "this tree": ROOT / "src"}
        runs: dict[str, list] = {k: [] for k in sides}
        for r in range(args.rounds):
            for name, src in sides.items():
                got = run_one(src, Path(tmp) / f"{name.replace(' ', '_')}{r}.json", args)
                runs[name].append(got)
                t = got["timings"]
                print(f"round {r} {name:10s} " + ", ".join(f"{k.split(':')[0]} {v:.2f}" for k, v in t.items())
                      + f" s; load {' '.join(f'{x:.2f}' for x in got['load'])}", flush=True)
        keys = list(runs["baseline"][0]["timings"])
        print("medians (s): baseline -> this tree (ratio)")
        sums = {"B+C": ("B: examples, exact", "C: aggregated graph, exact on every prompt"),
                "B+C cpu": ("B cpu", "C cpu")}
        for k in keys + list(sums):
            def med(name, k=k):
                return statistics.median(sum(t[x] for x in sums[k]) if k in sums else t[k]
                                         for t in (g["timings"] for g in runs[name]))
            a, b = med("baseline"), med("this tree")
            print(f"   {k:45s} {a:7.2f} -> {b:7.2f}  ({a / b:.2f}x)")
        d = compare(runs["baseline"][0]["pos"], runs["this tree"][0]["pos"], args.rtol, args.atol)
        same = all(g["pos"] == runs["this tree"][0]["pos"] for g in runs["this tree"])
        print(f"outputs: {len(d['other'])} difference(s) of keys, counts, strings or node/edge sets; "
              f"{len(d['values'])} float(s) beyond rtol {args.rtol} and atol {args.atol}; {d['rel']} beyond rtol "
              f"{args.rtol} alone, {d['digit']} by more than one unit of their 6th (last written) digit; max |difference| {d['max_abs']:.3g}; {d['order']} node/edge list(s) in another "
              f"order (near-equal values swapped); this tree's runs identical to each other: {same}")
        for x in d["other"][:20] + d["values"][:10]:
            print("   ", x)


if __name__ == "__main__":
    main()
