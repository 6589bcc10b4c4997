#!/usr/bin/env bash
# GPU checks for CBSA, one prepared command for a bare GPU machine (torch + timm preinstalled, no network, no pip
# install of this package):
#     bash tests/gpu/run_gpu_checks.sh OUTDIR
# Budget: under 8 minutes on one H100/H200 (each step has its own timeout). Writes to OUTDIR:
#   env.txt              torch / timm / triton / GPU versions
#   gpu_tests.log(.xml)  tests/gpu and tests/kernels/test_triton_cuda.py (with pytest if installed, else
#                        tests/gpu/standalone.py): every kernel forced (fused, flash, memory-efficient, xformers when
#                        importable, the Triton kernels compiled, the triton and auto backends that must not fall back) in
#                        fp32 and bf16 / fp16 autocast on fp32 parameters, qk_norm, equal-window and adaptive pooling,
#                        N up to 16k, a DDP (NCCL) training step, torch.compile, saved memory; a forced kernel that
#                        falls back fails
#   layer_bench.*        a short layer benchmark table (bf16, N = 197 / 785 / 3137)
# Exit status: non-zero when a test step fails (benchmark problems are logged, not fatal).
set -uo pipefail
OUT=${1:?usage: bash tests/gpu/run_gpu_checks.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT:$ROOT/tests/support${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$(date +%s)
python - > "$OUT/env.txt" 2>&1 <<'PY'
import importlib.util, torch, timm, timm_cbsa
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'timm_cbsa', timm_cbsa.__file__)
print('triton', importlib.util.find_spec('triton') and __import__('triton').__version__,
      'xformers importable', importlib.util.find_spec('xformers') is not None)
print('devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
cat "$OUT/env.txt"
status=0
if python -c 'import pytest' 2>/dev/null; then   # pytest where installed, else our small runner (tests/gpu/standalone.py)
    run_tests=(python -m pytest tests/gpu tests/kernels/test_triton_cuda.py -q -s -rs -p no:cacheprovider \
               --junitxml "$OUT/gpu_tests.xml")
else
    run_tests=(python tests/gpu/standalone.py tests/gpu/test_gpu_backends.py tests/kernels/test_triton_cuda.py)
fi
timeout 330 "${run_tests[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "tests took $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_tests.log"
timeout 120 python benchmarks/layer_bench.py --device cuda --dtype bf16 --batch 32 --grids 14 28 56 --rounds 5 \
    --out "$OUT" 2>&1 | tee "$OUT/layer_bench.log" || echo "layer benchmark failed or timed out (see log)"
echo "all took $(( $(date +%s) - start )) s, status $status"
exit $status
