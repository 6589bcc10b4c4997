#!/usr/bin/env bash
# GPU checks for CBSA's backends (run on a CUDA machine from the repo root):
#   bash tests/gpu/run_gpu_checks.sh [OUTDIR]
# runs tests/gpu (parity numbers printed with -s), the layer benchmark in bf16 and the model benchmark at 224/512/1024.
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pytest tests/gpu -q -s -rs 2>&1 | tee "$OUT/gpu_tests.log"
python benchmarks/layer_bench.py --device cuda --dtype bf16 --batch 64 --rounds 20 --out "$OUT" 2>&1 | tee "$OUT/gpu_layer.log"
python benchmarks/model_bench.py --device cuda --amp bf16 --img-sizes 224 512 1024 --batch 128 \
    --backends eager fused sdpa xformers --modes train infer --out "$OUT" 2>&1 | tee "$OUT/gpu_model.log"
