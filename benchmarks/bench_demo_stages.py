"""The cached demo's stage times, and the same run of an earlier revision beside it (issue 17, item 4).

Runs ``saecircuits demo`` (SAEs cached in ``--workspace``; run the demo once first) in a fresh process per source
tree: this checkout, and with ``--baseline REV`` that git revision first (checked out in a temporary worktree),
alternating ``--reps`` times; with ``--busy``, beside one CPU-bound process (a pure-Python busy loop) it starts for
each run. Prints each stage's median seconds (``results.json["timings"]``; the report is timed
by the wall clock of the whole command, so it is the difference), and compares the two runs' results.json: every
count equal, every float to ``--rtol`` relative (timings and the output folder left out), listing the keys that
differ.

Examples:
    python benchmarks/bench_demo_stages.py --threads 2                               # this checkout
    python benchmarks/bench_demo_stages.py --baseline HEAD~3 --no-circuit --max-prompts 100 --threads 1
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(src: Path, out: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """One demo run from source tree ``src``: (results.json, wall seconds of the whole command)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(src / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-c", "import sys; from saecircuits.cli import main; main(sys.argv[1:])", "demo",
           "--out", str(out), "--workspace", args.workspace, "--max-prompts", str(args.max_prompts),
           "--threads", str(args.threads)]
    if args.no_circuit:
        cmd.append("--no-circuit")
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if proc.returncode:
        sys.exit(f"error: the demo from {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text()), wall


def _differences(a, b, rtol: float, path: str = "") -> list[str]:
    """Keys where two results.json trees differ: counts and strings exactly, floats to ``rtol`` relative."""
    if path in (".timings", ".config.out"):  # seconds, and the output folder of each run
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in set(a) ^ set(b)]
        for k in sorted(set(a) & set(b)):
            out += _differences(a[k], b[k], rtol, f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, rtol, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=0.0):
                return []
        return [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV", help="also run this git revision (first), for before/after")
    ap.add_argument("--reps", type=int, default=1, help="runs of each source tree (medians printed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-prompts", type=int, default=300, help="the demo's default: 300")
    ap.add_argument("--no-circuit", action="store_true")
    ap.add_argument("--busy", action="store_true", help="run each demo beside one CPU-bound process")
    ap.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of the results.json comparison")
    ap.add_argument("--workspace", default=os.environ.get(
        "SAECIRCUITS_WORKSPACE", str(Path.home() / ".cache" / "saecircuits")))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    trees = {"this checkout": ROOT}
    if args.baseline:
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                       capture_output=True)
        trees = {f"baseline {args.baseline}": base, **trees}
    print(f"cached demo, {args.max_prompts} prompts, {args.threads} threads"
          f"{', no circuit' if args.no_circuit else ''}{', beside a busy loop' if args.busy else ''}, {args.reps} "
          f"run(s) each; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, list[tuple[dict, float]]] = {name: [] for name in trees}
    try:
        for rep in range(args.reps):
            for name, src in trees.items():
                runs[name].append(_run(src, tmp / f"{name.split()[0]}-{rep}", args))
                print(f"  {name} run {rep + 1}: {runs[name][-1][1]:.1f} s wall, load average "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "baseline")],
                           capture_output=True)
    stages = list(dict.fromkeys(k for r in runs.values() for res, _ in r for k in res["timings"] if k != "total"))
    names = list(trees)
    print(f"\n{'stage (median s)':34s}" + "".join(f"{n:>24s}" for n in names))
    rows = [(s, [statistics.median(res["timings"].get(s, 0.0) for res, _ in runs[n]) for n in names]) for s in stages]
    rows.append(("total (results.json)", [statistics.median(res["timings"]["total"] for res, _ in runs[n])
                                          for n in names]))
    rows.append(("report + start-up (wall - total)", [statistics.median(w - res["timings"]["total"]
                                                                        for res, w in runs[n]) for n in names]))
    rows.append(("wall, whole command", [statistics.median(w for _, w in runs[n]) for n in names]))
    for label, values in rows:
        if max(values) >= 0.05:
            print(f"{label:34s}" + "".join(f"{v:24.2f}" for v in values))
    if len(names) == 2:
        diffs = _differences(runs[names[0]][0][0], runs[names[1]][0][0], args.rtol)
        print(f"\nresults.json, {names[0]} vs {names[1]} (floats to {args.rtol:g} relative, timings left out): "
              + ("identical" if not diffs else f"{len(diffs)} difference(s)"))
        for d in diffs[:40]:
            print("  " + d)


if __name__ == "__main__":
    main()
