"""Ahead-of-time compile matrix of the CBSA Triton kernels, no GPU needed (tests/ops/triton_aot.py): every kernel ×
{sm_80, sm_90} × {bf16, fp16, fp32 with TF32 on, fp32 with TF32 off} × the (m, d) of the registered models (64, 64),
(4, 32) and m ∈ {16, 25, 49, 64, 100, 128} × d ∈ {16, 32, 48, 64, 80, 96, 128}, through the project's own launch
code.

Asserts, for every configuration ``not_supported_reasons`` accepts (its ``TABLE`` entry): the compiled kernels have
zero local-memory stack (no register spills), no atomics (deterministic), and shared memory within the table's
figure, which is within the target's per-block limit; for every configuration it refuses: a reason naming it. So
accepted ⇔ compiled cleanly (the table's entries were chosen by ``triton_aot.py --sweep``, which compiles candidate
tiles and keeps the first clean one; entries left out had none). The matrix reaches every TABLE entry (asserted), so
each one is compiled here.

Kernels specialise only on the padded sizes (M_PAD ∈ {16, 64, 128}, D_PAD ∈ {32, 64, 128}: m and d are runtime masks),
the tiles and the element types, so each distinct specialisation compiles once (one process per CPU, largest first; 450
compiles, about 1.5 min on 2 idle cores with an empty Triton cache). Runs in a subprocess with TRITON_INTERPRET unset;
skipped with the reason where Triton or its bundled ptxas / cuobjdump are missing."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='Triton is not installed')]


@pytest.fixture(scope='module')
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    problem = subprocess.run([sys.executable, '-c', 'import triton_aot, sys; p = triton_aot.tools_problem(); '
                              'print(p or "")'], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    if problem.returncode != 0 or problem.stdout.strip():
        pytest.skip(problem.stdout.strip() or problem.stderr[-500:])
    out = tmp_path_factory.mktemp('aot') / 'matrix.json'
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'triton_aot.py'), '--json', str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1150)
    assert proc.returncode == 0, f'compile matrix failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return {tuple(int(x) if x.isdigit() else x for x in k.split('/')): v for k, v in json.load(open(out)).items()}


def test_accepted_configurations_compile_cleanly(compiled):
    import triton_aot as A
    from timm_cbsa.ops.contract_broadcast.triton import function
    assert compiled, 'nothing compiled'
    kernels = {'_pool_partial', '_extract_partial', '_combine_contract', '_broadcast_fwd', '_ag_partial',
               '_contract_bwd', '_pool_adjoint'}
    for (mode, m, d, arch), results in compiled.items():
        dtype, prec = A.MODES[mode]
        entry = function.TABLE[(arch, function.kind(dtype, prec), function.pad_m(m), function.pad_d(d))]
        one_pass = entry[1][3] == function.pad_m(m)           # the backward broadcast's representative block
        bwd = {'_broadcast_bwd'} if one_pass else {'_broadcast_bwd_blocks'}
        assert {r['kernel'] for r in results} == kernels | bwd, (mode, m, d, arch)
        if not one_pass:
            assert sum(r['kernel'] == '_broadcast_bwd_blocks' for r in results) == 2, 'the ∂W and ∂S W passes'
        for r in results:
            where = f"{r['kernel']} sm_{arch} {mode} m={m} d={d}"
            assert r['ok'], f"{where}: {r.get('error')}"
            assert r['stack'] == 0 and r['local'] == 0, f"{where} spills: {r}"
            assert r['atomics'] == 0, f'{where} uses atomics'
            assert r['shared'] <= entry[3] <= A.SMEM_LIMIT[arch], f"{where}: {r['shared']} B > table {entry[3]} B"


def test_every_matrix_configuration_is_accepted_or_refused_with_a_reason(compiled):
    import triton_aot as A
    from timm_cbsa.ops.contract_broadcast.triton import function
    refused = []
    for mode, m, d in A.matrix():
        dtype, _ = A.MODES[mode]
        for arch in (80, 90):
            reasons = function.shared_memory_reasons(d, m, dtype, arch, A.SMEM_LIMIT[arch])
            if (mode, m, d, arch) in compiled:
                # fp32: accepted only with both products compiled (the TF32 switch may change after the check)
                other = {'fp32_tf32': 'fp32_ieee', 'fp32_ieee': 'fp32_tf32'}.get(mode)
                assert reasons == [] and (other is None or (other, m, d, arch) in compiled), (mode, m, d, arch)
            else:
                assert reasons and all('sm_%d' % arch in r or 'shared memory' in r for r in reasons), reasons
                refused.append((mode, m, d, arch))
    # the registered models run in every dtype on both targets, the segmentation decoder's m = 100 with d ≤ 128 too
    for arch in (80, 90):
        for mode in A.MODES:
            for m, d in A.MODEL_MD + [(100, 128)]:
                assert (mode, m, d, arch) in compiled, (mode, m, d, arch)
    print(f'{len(compiled)} accepted, {len(refused)} refused')


def test_the_matrix_compiles_every_table_entry(compiled):
    from timm_cbsa.ops.contract_broadcast.triton import function
    import triton_aot as A
    reached = {(arch, mode, function.pad_m(m), function.pad_d(d)) for mode, m, d, arch in compiled}
    wanted = {(arch, mode, mp, dp) for (arch, k, mp, dp) in function.TABLE for mode in A.MODES
              if function.kind(*A.MODES[mode]) == k}   # 'half': bf16 and fp16, compiled with each element type
    assert wanted <= reached, sorted(wanted - reached)
