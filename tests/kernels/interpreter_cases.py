"""Worker for test_triton_interpreter.py: runs the CBSA Triton kernels under TRITON_INTERPRET=1 (Triton's numpy
interpreter, CPU tensors) against the eager reference ``CBSA.contract_and_broadcast`` and prints one JSON line of
relative errors per case. Run in its own process because TRITON_INTERPRET must be set before the kernels are defined:

    TRITON_INTERPRET=1 python tests/kernels/interpreter_cases.py [case ...]
"""
import json
import os
import sys
import time

import torch

# (name, B, H, d, grid (H_p, W_p), rep_grid, prefix tokens, legacy, w layout, Q_ini)
#   layout 'bnhd': w is the usual head-split view of a (B, N, H·d) projection; 'bhnd': contiguous (B, H, N, d)
#   Q_ini 'pool': pooled from w in torch before the kernels (gradient back through autograd); 'given': an input
CASES = [
    ('m16_d32_equal_prefix1', 2, 2, 32, (8, 8), (4, 4), 1, False, 'bnhd', 'pool'),     # N = 65
    ('m49_d96_adaptive_nonsquare_prefix2', 2, 1, 96, (9, 11), (7, 7), 2, False, 'bnhd', 'pool'),   # N = 101
    ('m64_d64_equal_nonsquare', 2, 1, 64, (8, 16), (8, 8), 0, False, 'bhnd', 'pool'),  # N = 128, 2 token blocks+
    ('m16_d64_legacy_adaptive', 1, 2, 64, (9, 9), (4, 4), 1, True, 'bnhd', 'pool'),    # N = 82
    ('m6_d32_given_r', 3, 2, 32, (6, 6), (2, 3), 1, False, 'bhnd', 'given'),           # N = 37
]
DTYPES = {'fp32': torch.float32, 'fp64': torch.float64, 'fp16': torch.float16}   # bf16: no numpy type
NAMES = ['out', 'dw', 'dr', 'deta', 'dkap']


def run_case(name, B, H, d, grid, rep, prefix, legacy, layout, qini, dtype):
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, naive_contract_and_broadcast
    from timm_cbsa.layers.cbsa import CBSA
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec, pool_representatives
    g = torch.Generator().manual_seed(0)
    N = prefix + grid[0] * grid[1]
    m = rep[0] * rep[1]
    f64 = torch.float64
    if layout == 'bnhd':
        w0 = torch.randn(B, N, H, d, generator=g, dtype=f64).transpose(1, 2)
    else:
        w0 = torch.randn(B, H, N, d, generator=g, dtype=f64)
    r0 = torch.randn(B, H, m, d, generator=g, dtype=f64) if qini == 'given' else None
    eta0 = torch.randn(H, 1, 1, generator=g, dtype=f64)
    kap0 = torch.randn(H, 1, 1, generator=g, dtype=f64)
    grad = torch.randn(B, H, N, d, generator=g, dtype=f64)
    pool = PoolSpec(grid, rep, 1 if legacy else 0)
    scale = d ** -0.5
    # half precision is compared with the float64 reference (the eager layer in float64), like the CUDA tests
    ref_dtype = f64 if dtype == torch.float16 else dtype
    layer = CBSA(H * d, H, rep_grid=rep, legacy_pool=legacy, grid_size=grid).to(ref_dtype)

    def kernel(w, r, eta, kap):
        return contract_and_broadcast_triton(w, eta, kap, scale, pool=None if qini == 'given' else pool, r=r)

    def eager(w, r, eta, kap):
        with torch.no_grad():
            layer.step_rep.copy_(eta)
            layer.step_x.copy_(kap)
        layer.step_rep.grad = layer.step_x.grad = None
        return layer.contract_and_broadcast(w, pool_representatives(w, pool) if r is None else r)

    def naive(w, r, eta, kap):
        return naive_contract_and_broadcast(w, eta, kap, scale, pool=None if qini == 'given' else pool, r=r)

    results = {}
    for tag, fn in (('kernel', kernel), ('eager', eager), ('naive', naive)):
        dt = dtype if tag == 'kernel' else ref_dtype
        w = w0.to(dt).clone().requires_grad_()            # clone: .to() of the same dtype is not a copy
        r = None if r0 is None else r0.to(dt).clone().requires_grad_()
        eta, kap = eta0.to(dt).clone().requires_grad_(), kap0.to(dt).clone().requires_grad_()
        t0 = time.perf_counter()
        out = fn(w, r, eta, kap)
        (out * grad.to(dt)).sum().backward()
        if tag == 'eager':
            eta_g, kap_g = layer.step_rep.grad, layer.step_x.grad
        else:
            eta_g, kap_g = eta.grad, kap.grad
        results[tag] = ([t if t is None else t.double() for t in
                         (out.detach(), w.grad, None if r is None else r.grad, eta_g, kap_g)],
                        time.perf_counter() - t0, out)
    errs = {}
    for tag in ('kernel', 'naive'):
        errs[tag] = {}
        for n, a, b in zip(NAMES, results[tag][0], results['eager'][0]):
            if a is None:
                continue
            errs[tag][n] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return dict(errors=errs['kernel'], naive_errors=errs['naive'], seconds=results['kernel'][1],
                out_layout_bnhd=bool(results['kernel'][2].transpose(1, 2).is_contiguous()) if layout == 'bnhd' else None,
                out_dtype=str(results['kernel'][2].dtype))


def run_layer_case():
    """A CBSA layer with backend='triton' (the dispatcher's hookup) against backend='eager': forward,
    input and parameter gradients, and whether the kernels really ran (no fallback)."""
    import logging
    from backend_checks import rel_errors, run_fwd_bwd   # tests/support
    from timm_cbsa.ops.contract_broadcast.triton import function
    from timm_cbsa.layers.cbsa import CBSA
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger('timm_cbsa.ops.contract_broadcast').addHandler(handler)
    calls = []
    apply = function.TritonContractBroadcast.apply
    function.TritonContractBroadcast.apply = lambda *a: calls.append(1) or apply(*a)
    torch.manual_seed(0)
    layer = CBSA(64, 2, qkv_bias=True, grid_size=(5, 6), rep_grid=(2, 3), num_prefix_tokens=1)
    with torch.no_grad():
        layer.step_rep.copy_(torch.tensor([0.7, -1.2]).view(2, 1, 1))
        layer.step_x.copy_(torch.tensor([-0.5, 1.1]).view(2, 1, 1))
    x = torch.randn(2, 31, 64)
    layer.backend = 'triton'
    with torch.inference_mode():            # first use (and probe) from an inference forward
        infer = layer(x)
    got = run_fwd_bwd(layer, x, 'triton')
    ref = run_fwd_bwd(layer, x, 'eager')
    return dict(case='layer_backend_triton-fp32', errors=rel_errors(got, ref), kernel_calls=len(calls),
                inference_error=rel_errors([infer], [ref[0]])[0],
                warnings=[r.getMessage() for r in records])


def interpreter_problem():
    """None when this Triton's interpreter runs a kernel with a loop bound passed at launch, else why not (Triton
    3.6's interpreter cannot with numpy 2: it calls int() on 1-element arrays)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _loop(x_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for n0 in range(0, n, BLOCK):
            acc += tl.load(x_ptr + n0 + tl.arange(0, BLOCK), mask=n0 + tl.arange(0, BLOCK) < n, other=0.)
        tl.store(x_ptr + tl.arange(0, BLOCK), acc)
    try:
        x = torch.ones(40)
        _loop[(1,)](x, 40, BLOCK=16)
        assert x[:8].tolist() == [3.] * 8 and x[8:16].tolist() == [2.] * 8, x
    except Exception as e:  # noqa: BLE001
        return f'Triton {triton.__version__} interpreter cannot run a launch-time loop bound: {type(e).__name__}: {e}'
    return None


def main(argv):
    if os.environ.get('TRITON_INTERPRET') != '1':
        raise SystemExit('set TRITON_INTERPRET=1 before running this worker')
    problem = interpreter_problem()
    if problem is not None:
        print(json.dumps({'interpreter_unusable': problem}), flush=True)
        return
    from timm_cbsa.ops.contract_broadcast.triton import kernels
    interpreted = type(kernels._broadcast_fwd).__name__   # InterpretedFunction under TRITON_INTERPRET=1
    wanted = set(argv)
    for case in CASES:
        if wanted and case[0] not in wanted:
            continue
        for dn, dt in DTYPES.items():
            res = run_case(*case, dtype=dt)
            res.update(case=f'{case[0]}-{dn}', kernel_type=interpreted)
            print(json.dumps(res), flush=True)
    if not wanted or 'layer' in wanted:
        print(json.dumps(run_layer_case()), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
