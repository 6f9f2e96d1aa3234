#!/usr/bin/env bash
# The device checks of issue 17 item 2 in one short script: the GPU tests, the demo on CUDA, the reference shape
# on the GPU, and a 2-rank torch.distributed run of the corpus statistics (NCCL with 2 GPUs, else gloo, said so).
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

echo "== 1. GPU tests (every test that names cuda)"
"$PY" -m pytest -q -p no:cacheprovider -n 0 tests -k "cuda or gpu" 2>&1 | tail -n 5

echo "== 2. the demo on cuda"
start=$(date +%s)
"$PY" -m saecircuits.cli demo --out "$OUT/demo" --device cuda > "$OUT/demo.log" 2>&1 || { tail -n 20 "$OUT/demo.log"; exit 1; }
echo "demo: $(( $(date +%s) - start )) s, report $OUT/demo/report.html ($(du -h "$OUT/demo/report.html" | cut -f1))"

echo "== 3. the reference shape (1,000 prompts, two 16,384-feature SAEs) on the GPU"
"$PY" benchmarks/bench_analyses.py --models reference --device cuda --threads 16 --memory-stories 20000

echo "== 4. 2-rank sharded corpus statistics"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/dist_corpus_check.py --docs 203
echo "gpu_check: all checks passed"
