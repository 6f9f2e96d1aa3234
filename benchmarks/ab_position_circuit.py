"""The circuit across positions before and after a change, in ONE run: ``position_circuit`` (as the pipeline calls
it, on the demo's cached workspace, see bench_position_circuit.py) from a baseline commit's ``src`` and from this
tree's, each in a fresh process, alternately (``--rounds`` of each), at ``--threads`` threads. Prints every run's
pass timings with the load average, the medians' ratios, and compares the two outputs: every float to ``--rtol``
relative (and 1e-9 absolute), every count, string and key equal.

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
model, saes, task, rows = BP.demo_case(Path({workspace!r}), {n_prompts})
timings = {{}}
t = time.perf_counter()
pos = PGm.position_circuit(model, saes, task, progress=False, timings=timings, **POSITION_KW)
timings["total"] = time.perf_counter() - t
json.dump({{"timings": timings, "load": os.getloadavg(), "src": PGm.__file__, "pos": pos}}, open({out!r}, "w"))
"""


def run_one(src: Path, out: Path, args) -> dict:
    code = RUNNER.format(bench=str(ROOT / "benchmarks"), threads=args.threads, workspace=args.workspace,
                         n_prompts=args.n_prompts, out=str(out))
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return json.loads(out.read_text())


def compare(a, b, rtol: float, path: str = "", diffs: list | None = None) -> list:
    """Every difference between two JSON values (floats to ``rtol`` relative or 1e-9 absolute)."""
    diffs = [] if diffs is None else diffs
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            diffs.append(f"{path}: keys {sorted(set(a) ^ set(b))[:5]}")
        for k in a:
            if k in b:
                compare(a[k], b[k], rtol, f"{path}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, rtol, f"{path}[{i}]", diffs)
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)):
            diffs.append(f"{path}: {a!r} != {b!r}")
    elif a != b or type(a) is not type(b):
        diffs.append(f"{path}: {a!r} != {b!r}")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="a commit whose src/ is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workspace", default=str(Path.home() / ".cache" / "saecircuits"))
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--rtol", type=float, default=1e-6)
    args = ap.parse_args()
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
        for k in keys + ["B+C"]:
            def med(name, k=k):
                return statistics.median(
                    (t["B: examples, exact"] + t["C: aggregated graph, exact on every prompt"]) if k == "B+C"
                    else t[k] for t in (g["timings"] for g in runs[name]))
            a, b = med("baseline"), med("this tree")
            print(f"   {k:45s} {a:7.2f} -> {b:7.2f}  ({a / b:.2f}x)")
        diffs = compare(runs["baseline"][0]["pos"], runs["this tree"][0]["pos"], args.rtol)
        same = all(g["pos"] == runs["this tree"][0]["pos"] for g in runs["this tree"])
        print(f"outputs: {len(diffs)} difference(s) beyond rtol {args.rtol}; this tree's runs identical to each "
              f"other: {same}")
        for d in diffs[:20]:
            print("   ", d)


if __name__ == "__main__":
    main()
