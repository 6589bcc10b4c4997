"""The CBSA Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1): forward and every gradient (∂W
including the pooled ∂Q_ini, ∂Q_ini when given, ∂η, ∂κ) against the naive twin in float64 on the same inputs: float32 (≤
1e-4 relative), float64 (≤ 1e-10), float16 and bfloat16 (≤ 2e-2 / 3e-2; the step-size gradients, sums with cancellation,
≤ 5e-2 / 8e-2; or within twice the error of the naive twin run in that dtype itself). bf16 runs through the kernels'
interpreter emulation, whose rounding is checked against torch's bf16 cast. Cases (interpreter_cases.py): prefix and
trailing tokens (150 class tokens of a segmentation decoder, legacy pooling), equal / adaptive / non-square windows, m ∈
{4, 6, 16, 25, 49, 64, 100, 128}, d from 16 to 128, odd N, batch > 1, the table's tiles and small blocks (blocks of
representatives, d chunks, the two-pass backward broadcast) in every dtype; bitwise-equal gradients across two runs in
deterministic mode.

TRITON_INTERPRET must be set before the kernels are defined, so the cases run in one subprocess (started once per
test session); the rest of the suite is unaffected. Skipped where Triton is not installed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from interpreter_cases import CASES, DTYPES  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='Triton is not installed')
TOL = {'fp32': 1e-4, 'fp64': 1e-10, 'fp16': 2e-2, 'bf16': 3e-2}
STEP_TOL = {'fp16': 5e-2, 'bf16': 8e-2}   # ∂η, ∂κ in half precision: sums over m·d products with cancellation
IDS = [f'{c[0]}-{dn}' for c in CASES for dn in DTYPES]


@pytest.fixture(scope='module')
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, 'tests', 'support')]
        + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'interpreter_cases.py')], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f'interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    if lines and 'interpreter_unusable' in lines[0]:
        pytest.skip(lines[0]['interpreter_unusable'])
    return {res['case']: res for res in lines}


@pytest.mark.slow
@pytest.mark.parametrize('case', IDS)
def test_kernels_match_naive_float64(interpreter_results, case):
    res = interpreter_results[case]
    assert res['kernel_type'] == 'InterpretedFunction', 'the kernels did not run in the interpreter'
    dn = case.rsplit('-', 1)[1]
    expected = {'out', 'dw', 'deta', 'dkap'} | ({'dr'} if 'given_r' in case else set())
    assert set(res['errors']) == expected, res['errors']
    # half precision: within the tolerance, or within twice what the naive twin itself loses in that dtype
    slack = {k: 2 * v for k, v in res['naive_errors'].items()} if dn in STEP_TOL else {}
    bad = {k: v for k, v in res['errors'].items()
           if not v <= max(STEP_TOL.get(dn, TOL[dn]) if k in ('deta', 'dkap') else TOL[dn], slack.get(k, 0))}
    assert not bad, f'{case}: relative errors above {TOL[dn]}: {bad} (all: {res["errors"]})'
    assert res['out_dtype'] == res['grad_dtype'] == str(DTYPES[dn])
    if res['out_layout_bnhd'] is not None:
        assert res['out_layout_bnhd'], 'output should keep w\'s (B, N, H, d) layout (free head merge)'


@pytest.mark.slow
def test_cases_cover_both_backward_paths_blocks_and_padded_sizes(interpreter_results):
    """Every dtype runs the one-pass backward broadcast and the two-pass one with blocks of representatives and d
    chunks (the configurations the table picks where whole tiles spill); m = 25, d = 16 run padded to 64 / 32."""
    for dn in DTYPES:
        runs = [r for name, r in interpreter_results.items() if name.endswith('-' + dn)]
        assert any(r['blocks'][2] == r['pads'][0] for r in runs), f'{dn}: no one-pass backward case'
        assert any(r['blocks'][2] < r['pads'][0] and r['blocks'][3] < r['pads'][1] for r in runs), dn
        assert any(r['blocks'][0] < r['pads'][0] and r['blocks'][1] < r['pads'][1] for r in runs), dn
    small = interpreter_results['m100_d80_small_blocks-bf16']
    assert small['blocks'] == [16, 16, 16, 16] and small['pads'] == [128, 128], small
    assert interpreter_results['m25_d16_pads_64_32-fp32']['pads'] == [64, 32]


@pytest.mark.slow
def test_deterministic_mode_gives_bitwise_equal_gradients(interpreter_results):
    res = interpreter_results['deterministic']
    assert len(res['bitwise_equal']) == 4 and all(res['bitwise_equal']), res


def test_layer_backend_triton_runs_the_kernels(interpreter_results):
    """backend='triton' on a CBSA layer is selected at construction and runs the kernels through the dispatcher (no
    fallback, nothing logged, also from an inference_mode forward), matching backend='eager'."""
    res = interpreter_results['layer']
    assert res['impl'] == 'triton' and res['kernel_calls'] >= 2, res
    assert not res['warnings'], res['warnings']
    assert max(res['errors']) <= 1e-4, res['errors']
    assert res['inference_error'] <= 1e-4, 'first call under inference_mode'


@pytest.mark.slow
def test_bf16_emulation_rounds_like_torch(interpreter_results):
    res = interpreter_results['cast']
    assert res['mismatches'] == 0 and res['checked'] > 4000 and res['nan_kept'], res


@pytest.mark.slow
def test_launch_path_creates_no_host_scalars_and_never_syncs(interpreter_results):
    res = interpreter_results['no_host_scalars']
    assert res['calls'] == [], res['calls']


@pytest.mark.slow
def test_failing_backward_kernel_falls_back_to_naive_or_raises_in_strict_mode(interpreter_results):
    res = interpreter_results['fallback']
    assert res['pool_max_error'] <= 1e-12 and res['given_max_error'] <= 1e-12, res
    assert len(res['warnings']) == 1 and 'recomputed with the naive reference' in res['warnings'][0], res
    assert 'simulated backward kernel failure' in res['strict'], res
