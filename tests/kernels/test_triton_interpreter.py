"""The CBSA Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1): forward and every gradient
(∂W including the pooled ∂Q_ini, ∂Q_ini when given, ∂η, ∂κ) against the eager reference ``CBSA.contract_and_broadcast``
in float32 (≤ 1e-4 relative) and float64 (≤ 1e-10), and float16 against the float64 reference (≤ 2e-2; 5e-2 for the
step-size gradients; bf16 has no numpy type, so it is tested on CUDA only), over prefix tokens, equal-window / adaptive / legacy pooling,
non-square grids, m ∈ {6, 16, 49, 64}, d ∈ {32, 64, 96}, odd N and batch > 1 (cases in interpreter_cases.py).

TRITON_INTERPRET must be set before the kernels are defined, so the cases run in one subprocess (started once per
test session); the rest of the suite is unaffected. Skipped where Triton is not installed, or where its interpreter
cannot run these kernels (Triton 3.6's interpreter with numpy 2 fails on any loop bound passed at launch; the worker
checks that first)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from interpreter_cases import CASES, DTYPES  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='Triton is not installed')
TOL = {'fp32': 1e-4, 'fp64': 1e-10, 'fp16': 2e-2}   # fp16: against the float64 reference
STEP_TOL_FP16 = 5e-2   # ∂η, ∂κ in fp16: sums over m·d products with cancellation (as in the layer tests)
IDS = [f'{c[0]}-{dn}' for c in CASES for dn in DTYPES]


@pytest.fixture(scope='module')
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, 'tests', 'support')] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'interpreter_cases.py')], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    if lines and 'interpreter_unusable' in lines[0]:
        pytest.skip(lines[0]['interpreter_unusable'])
    return {res['case']: res for res in lines}


@pytest.mark.parametrize('case', IDS)
def test_kernels_match_eager(interpreter_results, case):
    res = interpreter_results[case]
    assert res['kernel_type'] == 'InterpretedFunction', 'the kernels did not run in the interpreter'
    tol = TOL[case.rsplit('-', 1)[1]]
    expected = {'out', 'dw', 'deta', 'dkap'} | ({'dr'} if 'given_r' in case else set())
    assert set(res['errors']) == expected, res['errors']
    bad = {k: v for k, v in res['errors'].items()
           if not v <= (STEP_TOL_FP16 if case.endswith('fp16') and k in ('deta', 'dkap') else tol)}
    assert not bad, f'{case}: relative errors above {tol}: {bad} (all: {res["errors"]})'
    assert max(res['naive_errors'].values()) <= tol, f'naive twin vs eager: {res["naive_errors"]}'
    assert res['out_dtype'] == str(DTYPES[case.rsplit('-', 1)[1]])
    if res['out_layout_bnhd'] is not None:
        assert res['out_layout_bnhd'], 'output should keep w\'s (B, N, H, d) layout (free head merge)'


def test_layer_backend_triton_runs_the_kernels(interpreter_results):
    """backend='triton' on a CBSA layer goes through the dispatcher to the kernels (no fallback, nothing logged, also when the
    first call comes from an inference_mode forward) and matches backend='eager' in output, input
    gradient and every parameter gradient."""
    res = interpreter_results['layer_backend_triton-fp32']
    assert res['kernel_calls'] >= 2, 'the layer did not run the Triton kernels (two layer calls expected)'
    assert not res['warnings'], res['warnings']
    assert max(res['errors']) <= 1e-4, res['errors']
    assert res['inference_error'] <= 1e-4, 'first call under inference_mode'


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') == '1', reason='checks the non-interpreted CPU refusal')
def test_cpu_without_interpreter_is_refused_with_reason():
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, triton_unsupported_reason
    assert 'CUDA' in triton_unsupported_reason(torch.device('cpu'), torch.float32, 64, 64)
    w = torch.randn(1, 2, 17, 8)
    with pytest.raises(ValueError, match='need a CUDA device'):
        contract_and_broadcast_triton(w, torch.ones(2, 1, 1), torch.ones(2, 1, 1), 8 ** -0.5, pool=PoolSpec((4, 4), (2, 2), 0))


def test_static_limits_name_the_problem():
    from timm_cbsa.ops.contract_broadcast.triton import triton_unsupported_reason
    dev = torch.device('cuda')
    assert 'representatives' in triton_unsupported_reason(dev, torch.float16, 64, 256)
    assert 'head dim' in triton_unsupported_reason(dev, torch.float16, 160, 64)
    assert 'dtype' in triton_unsupported_reason(dev, torch.int32, 64, 64)
    assert 'float64' in triton_unsupported_reason(dev, torch.float64, 64, 64)
