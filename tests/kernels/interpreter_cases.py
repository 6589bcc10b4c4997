"""Worker for test_triton_interpreter.py: runs the CBSA Triton kernels under TRITON_INTERPRET=1 (Triton's numpy
interpreter, CPU tensors) against the naive twin in float64 and prints one JSON line per case. Run in its own process
because TRITON_INTERPRET must be set before the kernels are defined:

    TRITON_INTERPRET=1 python tests/kernels/interpreter_cases.py [case ...]

bfloat16 runs through the kernels' interpreter emulation (float32 tensors holding bf16 values, every cast to the
token dtype rounded to bf16: Triton's interpreter computes bf16 ``tl.dot`` wrongly); ``cast`` checks that rounding
against torch's own float32 → bfloat16 conversion.
"""
import contextlib
import json
import os
import sys
import time

import torch

# (name, B, H, d, grid (H_p, W_p), rep_grid, prefix tokens, trailing tokens, w layout, Q_ini, tiles)
#   layout 'bnhd': w is the usual head-split view of a (B, N, H·d) projection; 'bhnd': contiguous (B, H, N, d)
#   Q_ini 'pool': pooled from w inside the kernels (PoolSpec(grid, rep_grid, trailing)); 'given': an input r
#   tiles 'table': the sm_90 TABLE entry (float64: small blocks); 'small': small blocks in every dtype (blocks of 16
#   representatives, d chunks of 16, the backward broadcast in two passes), as the table chooses where tiles spill
CASES = [
    ('m16_d32_equal_prefix1', 2, 2, 32, (8, 8), (4, 4), 1, 0, 'bnhd', 'pool', 'table'),              # N = 65
    ('m49_d96_adaptive_nonsquare_prefix2', 2, 1, 96, (9, 11), (7, 7), 2, 0, 'bnhd', 'pool', 'table'),  # N = 101
    ('m64_d64_equal_nonsquare', 2, 1, 64, (8, 16), (8, 8), 0, 0, 'bhnd', 'pool', 'table'),          # N = 128
    ('m16_d64_legacy_adaptive', 1, 2, 64, (9, 9), (4, 4), 0, 1, 'bnhd', 'pool', 'table'),           # legacy pooling
    ('m6_d32_given_r', 3, 2, 32, (6, 6), (2, 3), 1, 0, 'bhnd', 'given', 'table'),                   # N = 37
    ('m4_d32_trailing150_segdecoder', 1, 2, 32, (4, 4), (2, 2), 1, 150, 'bnhd', 'pool', 'table'),   # 150 class tokens
    ('m100_d128_adaptive_prefix1', 1, 1, 128, (12, 15), (10, 10), 1, 3, 'bnhd', 'pool', 'table'),   # M_PAD 128
    ('m128_d48_given_r', 1, 2, 48, (8, 8), (8, 16), 0, 0, 'bnhd', 'given', 'table'),
    ('m25_d16_pads_64_32', 2, 1, 16, (7, 7), (5, 5), 1, 0, 'bnhd', 'pool', 'table'),               # m, d padded up
    ('m100_d80_small_blocks', 1, 1, 80, (10, 10), (10, 10), 1, 2, 'bnhd', 'pool', 'small'),        # N = 103
]
DTYPES = {'fp32': torch.float32, 'fp64': torch.float64, 'fp16': torch.float16, 'bf16': torch.bfloat16}
NAMES = ['out', 'dw', 'dr', 'deta', 'dkap']


def _inputs(B, H, d, grid, rep, prefix, trailing, layout, qini, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = prefix + grid[0] * grid[1] + trailing
    m = rep[0] * rep[1]
    f64 = torch.float64
    if layout == 'bnhd':
        w = torch.randn(B, N, H, d, generator=g, dtype=f64).transpose(1, 2)
    else:
        w = torch.randn(B, H, N, d, generator=g, dtype=f64)
    r = torch.randn(B, H, m, d, generator=g, dtype=f64) if qini == 'given' else None
    eta, kap = torch.randn(H, 1, 1, generator=g, dtype=f64), torch.randn(H, 1, 1, generator=g, dtype=f64)
    grad = torch.randn(B, H, N, d, generator=g, dtype=f64)
    return w, r, eta, kap, grad


def _run(fn, dtype, w0, r0, eta0, kap0, grad, scale, pool):
    """Forward + backward of fn in ``dtype`` from float64 inputs → [out, ∂w, ∂r, ∂η, ∂κ] and the output."""
    w = w0.to(dtype).clone().requires_grad_()            # clone: .to() of the same dtype is not a copy
    r = None if r0 is None else r0.to(dtype).clone().requires_grad_()
    eta, kap = eta0.to(dtype).clone().requires_grad_(), kap0.to(dtype).clone().requires_grad_()
    out = fn(w, eta, kap, scale, pool=pool, r=r)
    (out * grad.to(dtype)).sum().backward()
    return [out.detach(), w.grad, None if r is None else r.grad, eta.grad, kap.grad], out


def _rel_errors(got, ref):
    return {n: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for n, a, b in zip(NAMES, got, ref) if a is not None}


@contextlib.contextmanager
def _tiles(tiles):
    """'small': the interpreter's small-block configuration for every dtype (no TABLE entry to take)."""
    from timm_cbsa.ops.contract_broadcast.triton import function
    saved = dict(function.TABLE)
    if tiles == 'small':
        function.TABLE.clear()
    try:
        yield
    finally:
        function.TABLE.update(saved)


def run_case(name, B, H, d, grid, rep, prefix, trailing, layout, qini, tiles, dtype):
    """Kernels in ``dtype`` vs the naive twin in float64 on the same (dtype-rounded) inputs: relative errors."""
    from timm_cbsa.ops.contract_broadcast.naive import naive_contract_and_broadcast
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, function
    w0, r0, eta0, kap0, grad = _inputs(B, H, d, grid, rep, prefix, trailing, layout, qini)
    w0, eta0, kap0, grad = (t.to(dtype).double() for t in (w0, eta0, kap0, grad))   # the same numbers for both
    r0 = None if r0 is None else r0.to(dtype).double()
    pool = None if qini == 'given' else PoolSpec(grid, rep, trailing)
    t0 = time.perf_counter()
    with _tiles(tiles):
        cfg = function._plan(w0.to(dtype), rep[0] * rep[1]).cfg
        got, out = _run(contract_and_broadcast_triton, dtype, w0, r0, eta0, kap0, grad, d ** -0.5, pool)
    secs = time.perf_counter() - t0
    ref, _ = _run(naive_contract_and_broadcast, torch.float64, w0, r0, eta0, kap0, grad, d ** -0.5, pool)
    errs = _rel_errors(got, ref)
    # the naive twin itself in ``dtype``: how far rounding to it alone lands from float64 (∂η sums cancel)
    own, _ = _run(naive_contract_and_broadcast, dtype, w0, r0, eta0, kap0, grad, d ** -0.5, pool)
    return dict(errors=errs, naive_errors=_rel_errors(own, ref), seconds=round(secs, 2), out_dtype=str(out.dtype),
                grad_dtype=str(got[1].dtype), pads=[function.pad_m(rep[0] * rep[1]), function.pad_d(d)],
                blocks=[cfg.rep_block, cfg.d_chunk, cfg.bwd_rep_block, cfg.bwd_d_chunk],
                out_layout_bnhd=bool(out.transpose(1, 2).is_contiguous()) if layout == 'bnhd' else None)


def deterministic_case():
    """Two forward + backward runs under torch.use_deterministic_algorithms(True): bitwise equal?"""
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton
    w0, _, eta0, kap0, grad = _inputs(2, 2, 32, (9, 9), (4, 4), 1, 0, 'bnhd', 'pool', seed=1)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(contract_and_broadcast_triton, torch.float32, w0, None, eta0, kap0, grad, 0.2,
                     PoolSpec((9, 9), (4, 4), 0))[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    return dict(case='deterministic', bitwise_equal=[bool(torch.equal(a, b)) for a, b in zip(*runs) if a is not None])


def no_host_scalars_case():
    """Forward + backward (pooled and given Q_ini) with every way of making a tensor from Python scalars or reading
    one back to the host (torch.tensor / full / as_tensor / scalar_tensor, Tensor.item / cpu / tolist / numpy /
    bool / int / float) patched to fail when called from timm_cbsa's code (Triton's interpreter itself may use
    them): the launch path must create no device scalars and never synchronise."""
    import functools
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton
    calls = []

    def guard(owner, name):
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapped(*a, **k):
            caller = sys._getframe(1).f_globals.get('__name__', '')
            if caller.startswith('timm_cbsa'):
                calls.append(f'{name} from {caller}')
            return real(*a, **k)
        setattr(owner, name, wrapped)
        return owner, name, real

    patched = [guard(torch, n) for n in ('tensor', 'full', 'as_tensor', 'scalar_tensor')]
    patched += [guard(torch.Tensor, n) for n in ('item', 'cpu', 'tolist', 'numpy', '__bool__', '__int__',
                                                   '__float__')]
    try:
        for pooled in (True, False):
            w0, r0, eta0, kap0, grad = _inputs(2, 2, 32, (6, 6), (3, 3), 1, 2, 'bnhd', 'pool' if pooled else 'given')
            _run(contract_and_broadcast_triton, torch.float32, w0, r0, eta0, kap0, grad, 0.2,
                 PoolSpec((6, 6), (3, 3), 2) if pooled else None)
    finally:
        for owner, name, real in patched:
            setattr(owner, name, real)
    return dict(case='no_host_scalars', calls=calls)


def fallback_case():
    """A backward kernel that raises: the gradients are recomputed with the naive twin (one warning logged), or,
    with TIMM_CBSA_STRICT_BACKEND=1, the error propagates."""
    import logging
    from timm_cbsa.ops.contract_broadcast.naive import naive_contract_and_broadcast
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, function
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(function.__name__).addHandler(handler)
    real = function._backward

    def broken(*a, **k):
        raise RuntimeError('simulated backward kernel failure')
    function._backward = broken
    res = dict(case='fallback')
    try:
        for qini in ('pool', 'given'):
            w0, r0, eta0, kap0, grad = _inputs(2, 2, 32, (5, 6), (2, 3), 1, 1, 'bnhd', qini)
            pool = PoolSpec((5, 6), (2, 3), 1) if qini == 'pool' else None
            got, _ = _run(contract_and_broadcast_triton, torch.float64, w0, r0, eta0, kap0, grad, 0.3, pool)
            ref, _ = _run(naive_contract_and_broadcast, torch.float64, w0, r0, eta0, kap0, grad, 0.3, pool)
            res[f'{qini}_max_error'] = max((a - b).abs().max().item() for a, b in zip(got, ref) if a is not None)
        os.environ['TIMM_CBSA_STRICT_BACKEND'] = '1'
        try:
            _run(contract_and_broadcast_triton, torch.float64, w0, r0, eta0, kap0, grad, 0.3, pool)
            res['strict'] = 'no error'
        except RuntimeError as e:
            res['strict'] = str(e)
    finally:
        os.environ.pop('TIMM_CBSA_STRICT_BACKEND', None)
        function._backward = real
    res['warnings'] = [r.getMessage() for r in records]
    return res


def cast_case():
    """The kernels' bf16 emulation rounding (``kernels._cast`` with EMU_BF16) against torch's float32 → bf16 cast:
    ties to even, carries into the exponent, subnormals, ±inf, NaN, overflow to inf."""
    import triton
    import triton.language as tl
    global _cast   # a JIT function finds the functions it calls among its module's globals
    from timm_cbsa.ops.contract_broadcast.triton.kernels import _cast

    @triton.jit
    def _round(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.)
        tl.store(y_ptr + i, _cast(x, tl.float32, True), mask=i < n)

    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x3FFF8000, 0x7F7FFFFF, 0x00018000,
                         0x80008000, 0x7F800000, 0xFF800000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    spread = 10 ** torch.linspace(-40, 38, 4000)
    x = torch.cat([bits, torch.randn(4000, generator=torch.Generator().manual_seed(0)) * spread])
    y = torch.empty_like(x)
    _round[(1,)](x, y, x.numel(), BLOCK=4096)
    ref = x.to(torch.bfloat16).float()
    nan = torch.tensor([float('nan')])
    y_nan = torch.empty_like(nan)
    _round[(1,)](nan, y_nan, 1, BLOCK=16)
    return dict(case='cast', mismatches=int((y != ref).sum()), checked=x.numel(), nan_kept=bool(y_nan.isnan().all()))


def layer_case():
    """A CBSA layer asking for backend='triton' goes through the dispatcher to the kernels (selected at construction,
    no fallback, nothing logged; the first call from an inference_mode forward) and matches backend='eager' in output,
    input gradient and every parameter gradient."""
    import logging
    from backend_checks import rel_errors, run_fwd_bwd   # tests/support
    from timm_cbsa.layers.cbsa import CBSA
    from timm_cbsa.ops.contract_broadcast.triton import function
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger('timm_cbsa').addHandler(handler)
    calls = []
    apply = function.TritonContractBroadcast.apply
    function.TritonContractBroadcast.apply = lambda *a: calls.append(1) or apply(*a)
    torch.manual_seed(0)
    layer = CBSA(64, 2, qkv_bias=True, grid_size=(5, 6), rep_grid=(2, 3), num_prefix_tokens=1, backend='triton')
    with torch.no_grad():
        layer.step_rep.copy_(torch.tensor([0.7, -1.2]).view(2, 1, 1))
        layer.step_x.copy_(torch.tensor([-0.5, 1.1]).view(2, 1, 1))
    x = torch.randn(2, 31, 64)
    impl = layer.impl
    with torch.inference_mode():
        infer = layer(x)
    got = run_fwd_bwd(layer, x, 'triton')
    ref = run_fwd_bwd(layer, x, 'eager')
    return dict(case='layer', impl=impl, errors=rel_errors(got, ref), kernel_calls=len(calls),
                inference_error=rel_errors([infer], [ref[0]])[0], warnings=[r.getMessage() for r in records])


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
    for name, fn in (('deterministic', deterministic_case), ('cast', cast_case),
                     ('no_host_scalars', no_host_scalars_case), ('fallback', fallback_case), ('layer', layer_case)):
        if not wanted or name in wanted:
            print(json.dumps(fn()), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
