#!/usr/bin/env bash
# GPU checks for CBSA, one prepared command for a bare GPU machine (torch + timm preinstalled, no network, no pip
# install of this package, maybe no pytest):
#     bash tests/gpu/run_gpu_checks.sh OUTDIR
# Budget: under 8 minutes on one H100/H200 (each step has its own timeout; a step that fails or times out is logged
# and the next one still runs). Writes to OUTDIR:
#   env.txt                 torch / timm / triton / GPU versions
#   gpu_tests.log(.xml)     tests/gpu and tests/kernels/test_triton_cuda.py (pytest if installed, else
#                           tests/gpu/standalone.py): every kernel forced, the triton and auto backends that must not
#                           fall back, fp32 / bf16 / fp16, DDP, torch.compile, ...
#   triton_checks.json/.log tests/gpu/triton_checks.py: real bf16 / fp16 / fp32 parity against float64 (m = 100 with
#                           150 trailing tokens, d = 128, adaptive windows), set_sync_debug_mode('error') around
#                           forward + backward of the operator and of cbsa_vit_small, CUDA-graph capture, bitwise
#                           deterministic gradients, B·H = 70,000 and N = 65,536 launches
#   model_cuda_bf16.*       training img/s at 224 / 512 / 1024 px, bf16 AMP: cbsa_vit_small and cbt_small (triton)
#                           vs vit_small_patch16_224 (flash SDPA), same batch, ratios next to the targets
#   layer_core_share.*      the CBSA core's share of a CBSA layer's fwd+bwd time at N = 197 / 1025 / 4097 / 16385
# Exit status: non-zero when a test or check step fails (benchmark problems are logged, not fatal).
set -uo pipefail
OUT=${1:?usage: bash tests/gpu/run_gpu_checks.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT:$ROOT/tests/support${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
start=$(date +%s)
python - > "$OUT/env.txt" 2>&1 <<'PY'
import importlib.util, torch, timm, timm_cbsa
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'timm_cbsa', timm_cbsa.__file__)
print('triton', importlib.util.find_spec('triton') and __import__('triton').__version__,
      'xformers importable', importlib.util.find_spec('xformers') is not None)
print('devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('capability', (p.major, p.minor), 'SMs', p.multi_processor_count,
          'smem/block optin', getattr(p, 'shared_memory_per_block_optin', None))
    from timm_cbsa.ops.contract_broadcast.triton import not_supported_reasons
    for m, d in ((64, 64), (4, 32), (100, 64), (64, 128), (100, 128)):
        print(f'triton m={m} d={d}:', not_supported_reasons(d, m, None, 'cuda') or 'runs (fp32, fp16, bf16)')
PY
cat "$OUT/env.txt"
status=0
step() {   # step NAME TIMEOUT_S FATAL(1/0) CMD...: run with a timeout, tee to OUT/NAME.log
    local name=$1 limit=$2 fatal=$3; shift 3
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$name.log"
    if [ "$rc" -ne 0 ] && [ "$fatal" -eq 1 ]; then status=1; fi
}
if python -c 'import pytest' 2>/dev/null; then   # pytest where installed, else our small runner (tests/gpu/standalone.py)
    step gpu_tests 200 1 python -m pytest tests/gpu tests/kernels/test_triton_cuda.py -q -s -rs -p no:cacheprovider \
        --junitxml "$OUT/gpu_tests.xml"
else
    step gpu_tests 200 1 python tests/gpu/standalone.py tests/gpu/test_gpu_backends.py tests/kernels/test_triton_cuda.py
fi
step triton_checks 90 1 python tests/gpu/triton_checks.py "$OUT"
step model_bench 150 0 python benchmarks/model_bench.py --device cuda --amp bf16 --img-sizes 224 512 1024 \
    --batch 128 --backends triton --modes train --rounds 3 --iters 3 --flash-vit --out "$OUT"
step layer_core_share 60 0 python benchmarks/layer_bench.py --device cuda --dtype bf16 --batch 16 \
    --core-share --grids 14 32 64 128 --rounds 5 --out "$OUT"
echo "all took $(( $(date +%s) - start )) s, status $status"
exit $status
