#!/usr/bin/env bash
# The device checks of issue 17 item 2 in one short script: the GPU tests in float32 and bfloat16, the demo on CUDA
# in both dtypes, the reference shape on the GPU, and a 2-rank torch.distributed run of the corpus statistics (NCCL
# with 2 GPUs, else gloo, said so).
# Prints each check's figures; stops at the first failure. Run from the repository root:
#     bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
PY=${PYTHON:-python}
OUT=${1:-${OUT:-/tmp/saecircuits-gpu-check}}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False, or torch is missing): run this on a machine" \
         "with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'

# Each GPU test's id names its device and dtype (cuda-float32, cuda-bfloat16; tests/helpers.py PRECISIONS); on a
# machine with CUDA none of them may skip for want of CUDA (tests that need a torch build without CUDA do skip).
gpu_tests() {  # $1: label, $2: pytest -k expression
    local log="$OUT/tests-$1.log"
    if ! "$PY" -m pytest -q -p no:cacheprovider -n 0 -rs tests -k "$2" > "$log" 2>&1; then
        tail -n 30 "$log"; echo "gpu_check: the $1 GPU tests failed (log $log)" >&2; exit 1
    fi
    tail -n 1 "$log"
    if grep -q "SKIPPED.*no CUDA device" "$log"; then
        grep "SKIPPED" "$log" | head -n 5; echo "gpu_check: $1 GPU tests skipped on a CUDA machine" >&2; exit 1
    fi
}
echo "== 1. GPU tests: the engine's exactness (every hook, edits at P, no-op edits exactly 0) and a whole run"
echo "-- float32 (to 2e-5, as on the CPU)"
gpu_tests float32 "(cuda or gpu) and not bfloat16 and not bf16"
echo "-- bfloat16 (within bf16's rounding: tests/helpers.py rounding_tolerance)"
gpu_tests bfloat16 "(cuda or gpu) and (bfloat16 or bf16)"

# The headline numbers of a demo run (results.json), one line each: run 2's bf16 figures against float32.
headline() {  # $1: results.json
    "$PY" - "$1" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["timings"]
print(f"  {r['model_info'].get('dtype')} on {r['model_info'].get('device')}: total {t['total']:.0f} s "
      f"({', '.join(f'{k} {v:.0f} s' for k, v in t.items() if k != 'total' and v >= 1)})")
print(f"  behaviour: top-1 {r['behaviour']['top1_accuracy']:.3f}, mean loss at P {r['behaviour']['mean_loss']:.4f} nats; "
      f"DLA completeness error {r['dla']['completeness_max_abs_error']:.2e}")
for s in r["saes"]:
    print(f"  {s['hook_point']}: L0 {s['l0']:.1f}, explained variance at P {s['explained_variance_at_p']:.3f}, "
          f"loss recovered {s['loss_recovered']}, top features "
          + ", ".join(f"{f['feature']} ({f['loss_increase']:+.3f})" for f in s["top_features"][:3]))
PYEOF
}
echo "== 2. the demo on cuda, in float32 then bfloat16"
for dtype in float32 bfloat16; do
    start=$(date +%s)
    "$PY" -m saecircuits.cli demo --out "$OUT/demo-$dtype" --device cuda --dtype "$dtype" > "$OUT/demo-$dtype.log" 2>&1 \
        || { tail -n 20 "$OUT/demo-$dtype.log"; exit 1; }
    echo "demo $dtype: $(( $(date +%s) - start )) s, report $OUT/demo-$dtype/report.html"
    headline "$OUT/demo-$dtype/results.json"
done
"$PY" - "$OUT/demo-float32/results.json" "$OUT/demo-bfloat16/results.json" <<'PYEOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
dla = max(abs(x - y) for x, y in zip(a["dla"]["mean"], b["dla"]["mean"]))
loss = abs(a["behaviour"]["mean_loss"] - b["behaviour"]["mean_loss"])
print(f"demo bf16 vs float32 (the bf16 run trains its own SAEs): max |DLA mean diff| {dla:.2e} logits, "
      f"|mean loss at P diff| {loss:.2e} nats")
PYEOF

echo "== 3. the reference shape (1,000 prompts, two 16,384-feature SAEs) on the GPU"
"$PY" benchmarks/bench_analyses.py --models reference --device cuda --threads 16 --memory-stories 20000

echo "== 4. 2-rank sharded corpus statistics"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/dist_corpus_check.py --docs 203
echo "gpu_check: all checks passed"
