"""How a run slows down beside one other CPU-bound process, under each thread setting (issue 17, item 4).

A representative slice of the cached demo (the embedded default and its two cached demo SAEs), with the pipeline's
own functions: the corpus pass of both SAEs over ``--docs`` documents, then each SAE's analyses (``analyse_sae`` and
``study_sae``: exact effects, losses, evidence, examples, ...) over ``--prompts`` prompts, and with ``--circuit``
the circuit at P. Each setting runs in its own worker process (OpenMP reads its environment
when torch is imported); the worker loads everything once, warms up, then alternates a quiet trial with a busy one,
during which it runs a neighbour: one CPU-bound process (a pure-Python busy loop; ``--neighbour matmul`` runs a
1-thread matmul loop instead; ``--pin`` pins it to the last core). Medians over ``--reps`` pairs; the
machine may be shared, so compare ratios within one run.

Printed per setting: the median quiet and busy seconds, busy / quiet, and busy / (the quiet time of the first
setting, torch's default): the slowdown a user sees when the machine gets busy.

Settings (``--settings``, comma-separated):
  t2          torch threads = the cores (2 here), libgomp's defaults (what ``saecircuits`` did before this change)
  t1          1 torch thread
  passive     threads = the cores, OMP_WAIT_POLICY=PASSIVE (waiting threads sleep at once, never spin)
  spin0       threads = the cores, GOMP_SPINCOUNT=0
  interop1    threads = the cores, torch.set_num_interop_threads(1)
  cli         what ``saecircuits`` now does by default (``saecircuits.cli.threading_defaults`` before torch is
              imported, then its thread choice)

The workspace must hold the demo's cache: run ``saecircuits demo`` once (``--workspace`` as there; default
``$SAECIRCUITS_WORKSPACE``, else ``~/.cache/saecircuits``).

Example:
    python benchmarks/bench_busy.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "t2": {"env": {}, "threads": "cores", "interop": None},
    "t1": {"env": {}, "threads": 1, "interop": None},
    "passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "threads": "cores", "interop": None},
    "spin0": {"env": {"GOMP_SPINCOUNT": "0"}, "threads": "cores", "interop": None},
    "interop1": {"env": {}, "threads": "cores", "interop": 1},
    "cli": {"env": {}, "threads": "cli", "interop": None},
}
NEIGHBOURS = {
    "loop": "while True: pass",
    "matmul": ("import torch; torch.set_num_threads(1); a = torch.randn(256, 256)\n"
               "while True: a = torch.tanh(a @ a)"),
}


def _workspace_files(ws: Path) -> tuple[Path, Path, list[Path]]:
    """(the default model's folder, the held-out stories, the cached SAE folders) of a demo workspace."""
    models = sorted((ws / "models").glob("default-*"))
    heldout = sorted((ws / "data").glob("default-heldout-*.txt"))
    saes = sorted((ws / "saes").glob("*/blocks.*.mlp.hook_post/sae"), key=lambda p: p.stat().st_mtime)
    if not models or not heldout or len(saes) < 2:
        sys.exit(f"error: {ws} holds no cached demo (model, stories and two SAEs); run 'saecircuits demo' first")
    by_hook: dict[str, Path] = {}
    for p in saes:  # the newest SAE of each hook
        by_hook[p.parent.name] = p
    return models[-1], heldout[-1], [by_hook[h] for h in sorted(by_hook)]


def worker(args: argparse.Namespace) -> None:
    """One setting's process: load, warm up, say so on stdout, then time the workload once per "run" line read from
    stdin (one JSON line of stage seconds each)."""
    setting = SETTINGS[args.worker]
    if setting["threads"] == "cli":
        from saecircuits.cli import threading_defaults

        threading_defaults()
    import torch

    from saecircuits.analysis.circuit import find_circuit
    from saecircuits.analysis.corpus.statistics import corpus_feature_stats
    from saecircuits.data.corpus import read_documents
    from saecircuits.models.load import load_model
    from saecircuits.models.tokens import encode_documents, special_token_ids
    from saecircuits.pipeline.config import RunConfig
    from saecircuits.pipeline.per_sae import analyse_sae, study_sae
    from saecircuits.saes.formats import load_sae
    from saecircuits.tasks.closing_quote import closing_quote_task

    cores = len(os.sched_getaffinity(0))
    if setting["threads"] == "cli":
        from saecircuits.cli.run import _threads

        _threads(None)
    else:
        torch.set_num_threads(cores if setting["threads"] == "cores" else setting["threads"])
    if setting["interop"]:
        torch.set_num_interop_threads(setting["interop"])
    model_dir, heldout, sae_dirs = _workspace_files(Path(args.workspace))
    model = load_model(str(model_dir), cache_dir=Path(args.workspace) / "models")
    saes = [load_sae(p) for p in sae_dirs]
    docs = read_documents(heldout)
    task = closing_quote_task(docs, model.tokenizer, max_prompts=args.prompts, max_tokens=int(model.cfg.n_ctx))
    special = special_token_ids(model.tokenizer)
    rows = encode_documents(model.tokenizer, docs[: args.docs], max_len=int(model.cfg.n_ctx))
    rows = [r for r in rows if any(t not in special for t in r)]  # as the pipeline's task stage

    cfg = RunConfig(model=str(model_dir), data=heldout, out=Path(tempfile.mkdtemp()), max_prompts=args.prompts,
                    n_stat_docs=args.docs, circuit=bool(args.circuit))
    quiet = lambda line: None  # noqa: E731

    def workload() -> dict[str, float]:
        """The cached demo's stages at this size: the corpus pass, each SAE's analyses (optionally the circuit at P)."""
        t = {}
        t0 = time.perf_counter()
        stats = corpus_feature_stats(model, saes, rows, k=max(cfg.n_max_act_stories, cfg.n_examples),
                                     token_fraction=cfg.token_fraction, progress=False)
        t["corpus"] = time.perf_counter() - t0
        for i, sae in enumerate(saes):
            t0 = time.perf_counter()
            entry = analyse_sae(model, sae, task, rows, cfg, quiet, mean_act=stats[i].mean_input,
                                token_counts=stats.token_counts, fs=stats[i])
            study_sae(model, sae, task, rows, entry, stats[i], stats[i].mean_input, cfg, quiet)
            t[f"sae{i}"] = time.perf_counter() - t0
        if args.circuit:
            t0 = time.perf_counter()
            find_circuit(model, saes, task, ig_steps=cfg.circuit_ig_steps, progress=False, corpus_rows=rows)
            t["circuit"] = time.perf_counter() - t0
        t["total"] = sum(t.values())
        return t

    workload()  # warm-up: allocator, kernels, lazy imports
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                      "interop": torch.get_num_interop_threads()}), flush=True)
    for line in sys.stdin:  # the parent sends "run" once per trial and closes stdin at the end
        if line.strip() == "run":
            print(json.dumps(workload()), flush=True)


def _neighbour(kind: str, pin: bool) -> subprocess.Popen:
    """Start one CPU-bound process (1 thread; libgomp at its defaults) and give it a second to get going."""
    cmd = [sys.executable, "-c", NEIGHBOURS[kind]]
    if pin:
        cmd = ["taskset", "-c", str(max(os.sched_getaffinity(0))), *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.Popen(cmd, env=dict(env, OMP_NUM_THREADS="1"))
    time.sleep(1.0)
    return proc


def _totals(trials: list[dict[str, float]]) -> str:
    return ", ".join(f"{t['total']:.2f}" for t in trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="t2,t1,passive,spin0,interop1,cli")
    ap.add_argument("--reps", type=int, default=3, help="(quiet, busy) trial pairs per setting")
    ap.add_argument("--docs", type=int, default=100, help="corpus documents of the corpus pass")
    ap.add_argument("--prompts", type=int, default=100, help="task prompts of the analyses")
    ap.add_argument("--circuit", action="store_true", help="also time the circuit at P (find_circuit)")
    ap.add_argument("--neighbour", choices=sorted(NEIGHBOURS), default="loop")
    ap.add_argument("--pin", action="store_true", help="pin the neighbour to the last core")
    ap.add_argument("--workspace", default=os.environ.get(
        "SAECIRCUITS_WORKSPACE", str(Path.home() / ".cache" / "saecircuits")))
    ap.add_argument("--worker", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    names = [s for s in args.settings.split(",") if s]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        sys.exit(f"error: unknown settings {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    _workspace_files(Path(args.workspace))
    print(f"{len(os.sched_getaffinity(0))} cores; {args.docs} documents, {args.prompts} prompts, neighbour "
          f"{args.neighbour}{' pinned' if args.pin else ''}, {args.reps} (quiet, busy) pairs per setting; "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base_env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), base_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    base_env.setdefault("HF_HUB_OFFLINE", "1")
    base_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    workers, info = {}, {}
    for name in names:  # every setting's worker loads and warms up first; idle workers wait on stdin (no CPU)
        cmd = [sys.executable, __file__, "--worker", name, "--docs", str(args.docs), "--prompts", str(args.prompts),
               "--workspace", args.workspace] + (["--circuit"] if args.circuit else [])
        workers[name] = subprocess.Popen(cmd, env=dict(base_env, **SETTINGS[name]["env"]), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        info[name] = json.loads(workers[name].stdout.readline())
    trials: dict[str, dict[str, list]] = {name: {"quiet": [], "busy": []} for name in names}

    def trial(name: str) -> dict[str, float]:
        workers[name].stdin.write("run\n")
        workers[name].stdin.flush()
        line = workers[name].stdout.readline()
        if not line:
            sys.exit(f"error: the worker of setting {name} died")
        return json.loads(line)

    # settings interleaved within each repetition, so that other jobs on a shared machine hit all of them alike
    for rep in range(args.reps):
        for name in names:
            trials[name]["quiet"].append(trial(name))
            neighbour = _neighbour(args.neighbour, args.pin)
            try:
                trials[name]["busy"].append(trial(name))
            finally:
                neighbour.kill()
                neighbour.wait()
        print(f"  repetition {rep + 1}: " + "; ".join(
            f"{n} {trials[n]['quiet'][-1]['total']:.2f}/{trials[n]['busy'][-1]['total']:.2f}" for n in names)
            + f" s (quiet/busy), load average {os.getloadavg()[0]:.2f}", flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    results = [{"setting": n, **info[n], "trials": trials[n]} for n in names]
    base = statistics.median(t["total"] for t in results[0]["trials"]["quiet"])
    print(f"\nslowdown against {results[0]['setting']} quiet ({base:.2f} s), median of {args.reps}:")
    print(f"  {'setting':9s} {'quiet':>7s} {'busy':>7s}  busy/own-quiet  busy/{results[0]['setting']}-quiet   "
          "busy stages")
    for r in results:
        q = statistics.median(t["total"] for t in r["trials"]["quiet"])
        b = statistics.median(t["total"] for t in r["trials"]["busy"])
        stages = [k for k in r["trials"]["busy"][0] if k != "total"]
        parts = ", ".join(f"{k} {statistics.median(t[k] for t in r['trials']['busy']):.2f}" for k in stages)
        print(f"  {r['setting']:9s} {q:7.2f} {b:7.2f}  {b / q:14.2f}x  {b / base:19.2f}x   {parts}")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
