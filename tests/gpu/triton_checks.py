"""The CBSA Triton kernels on a real GPU, without pytest (run by tests/gpu/run_gpu_checks.sh):

    python tests/gpu/triton_checks.py OUTDIR [--quick]

Sections, each in its own try (a failing section is recorded, the others still run); results go to
OUTDIR/triton_checks.json, the log to stdout:
  parity        fp32 (TF32 off and on), bf16, fp16 against the naive twin in float64 on the same inputs: forward and
                every gradient, over the registered models' (m, d), m = 100 with 150 trailing class tokens (the
                segmentation decoder), d = 128, adaptive non-square windows, a given Q_ini; refused shapes listed
                with their reasons
  sync_free     torch.cuda.set_sync_debug_mode('error') around forward + backward of the operator and of a
                cbsa_vit_small (backend 'triton', bf16 autocast): any host synchronisation raises
  cuda_graph    forward + backward captured in a CUDA graph, replayed on new inputs, equal to the eager run
  deterministic torch.use_deterministic_algorithms(True): two runs give bitwise-equal outputs and gradients
  large_launch  B·H = 70,000 (beyond grid axis 1's 65,535) and N = 65,536 run and match the reference on a slice
Exit status 1 when a section failed. CPU-only machines: every section is skipped with the reason (exit 0)."""
import argparse
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# (name, B, H, d, grid, rep_grid, prefix, trailing, Q_ini)
SHAPES = [
    ('vit_small_224', 4, 6, 64, (14, 14), (8, 8), 1, 0, 'pool'),
    ('cbt_nano_32', 8, 2, 32, (4, 4), (2, 2), 1, 0, 'pool'),
    ('legacy_pool', 2, 6, 64, (14, 14), (8, 8), 0, 1, 'pool'),
    ('adaptive_m49_d96', 3, 2, 96, (9, 11), (7, 7), 2, 0, 'pool'),
    ('segdecoder_m100_trailing150', 2, 6, 64, (32, 32), (10, 10), 0, 150, 'pool'),
    ('d128', 2, 4, 128, (16, 16), (8, 8), 1, 0, 'pool'),
    ('m100_d128', 2, 2, 128, (20, 20), (10, 10), 1, 0, 'pool'),
    ('given_r_m64', 2, 3, 64, (16, 16), (8, 8), 1, 0, 'given'),
]
NAMES = ('out', 'dw', 'dr', 'deta', 'dkap')


def _inputs(B, H, d, grid, rep, prefix, trailing, qini, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, m = prefix + grid[0] * grid[1] + trailing, rep[0] * rep[1]
    f64 = torch.float64
    w = torch.randn(B, N, H, d, generator=g, dtype=f64).transpose(1, 2) * 2
    r = torch.randn(B, H, m, d, generator=g, dtype=f64) if qini == 'given' else None
    eta, kap = torch.randn(H, 1, 1, generator=g, dtype=f64), torch.randn(H, 1, 1, generator=g, dtype=f64)
    grad = torch.randn(B, H, N, d, generator=g, dtype=f64)
    return [None if t is None else t.to(device) for t in (w, r, eta, kap, grad)]


def _fwd_bwd(fn, dtype, w0, r0, eta0, kap0, grad, scale, pool):
    w = w0.to(dtype).detach().clone().requires_grad_()
    r = None if r0 is None else r0.to(dtype).detach().clone().requires_grad_()
    eta, kap = eta0.to(dtype).clone().requires_grad_(), kap0.to(dtype).clone().requires_grad_()
    out = fn(w, eta, kap, scale, pool=pool, r=r)
    (out * grad.to(dtype)).sum().backward()
    return [out.detach(), w.grad, None if r is None else r.grad, eta.grad, kap.grad]


class _TF32:
    """torch's float32 matmul precision set to 'ieee' or 'tf32' inside the block (new API where it exists)."""

    def __init__(self, prec):
        self.prec, self.mm = prec, torch.backends.cuda.matmul

    def __enter__(self):
        if hasattr(self.mm, 'fp32_precision'):
            self.old, self.mm.fp32_precision = self.mm.fp32_precision, self.prec
        else:
            self.old, self.mm.allow_tf32 = self.mm.allow_tf32, self.prec == 'tf32'

    def __exit__(self, *exc):
        setattr(self.mm, 'fp32_precision' if hasattr(self.mm, 'fp32_precision') else 'allow_tf32', self.old)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def parity(dev):
    from timm_cbsa.ops.contract_broadcast.naive import naive_contract_and_broadcast
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, not_supported_reasons
    res, failed = {}, []
    modes = {'fp32_ieee': (torch.float32, 'ieee', 1e-4), 'fp32_tf32': (torch.float32, 'tf32', 1e-2),
             'bf16': (torch.bfloat16, 'ieee', 3e-2), 'fp16': (torch.float16, 'ieee', 2e-2)}
    for name, B, H, d, grid, rep, prefix, trailing, qini in SHAPES:
        w0, r0, eta0, kap0, grad = _inputs(B, H, d, grid, rep, prefix, trailing, qini, dev)
        pool = PoolSpec(grid, rep, trailing) if qini == 'pool' else None
        for mode, (dt, prec, tol) in modes.items():
            key = f'{name}-{mode}'
            why = not_supported_reasons(d, rep[0] * rep[1], dt, dev)
            if why:
                res[key] = {'refused': why}
                continue
            vals = [t if t is None else t.to(dt).double() for t in (w0, r0, eta0, kap0, grad)]
            with _TF32(prec):
                got = _fwd_bwd(contract_and_broadcast_triton, dt, *vals, d ** -0.5, pool)
            ref = _fwd_bwd(naive_contract_and_broadcast, torch.float64, *vals, d ** -0.5, pool)
            errs = {n: _rel(a, b) for n, a, b in zip(NAMES, got, ref) if a is not None}
            bad = {n: e for n, e in errs.items() if not e <= (tol * 2.5 if n in ('deta', 'dkap') else tol)}
            res[key] = {'errors': errs, 'ok': not bad}
            print(key, {n: '%.1e' % e for n, e in errs.items()}, 'OK' if not bad else f'FAIL {bad}', flush=True)
            if bad:
                failed.append(key)
    return res, failed


def _without_sync(step):
    """step() once to compile, then again with torch.cuda.set_sync_debug_mode('error')."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def sync_free(dev):
    import timm
    import timm_cbsa  # noqa: F401 (registers the models)
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, function
    w0, _, eta0, kap0, grad = _inputs(4, 6, 64, (14, 14), (8, 8), 1, 0, 'pool', dev)
    pool = PoolSpec((14, 14), (8, 8), 0)
    _without_sync(lambda: _fwd_bwd(contract_and_broadcast_triton, torch.bfloat16, w0, None, eta0, kap0, grad, 0.125,
                                   pool))
    out = {'operator': 'no sync'}
    model = timm.create_model('cbsa_vit_small', backend='triton', num_classes=10).to(dev)
    x = torch.randn(8, 3, 224, 224, device=dev)
    calls = []
    apply = function.TritonContractBroadcast.apply
    function.TritonContractBroadcast.apply = lambda *a: calls.append(1) or apply(*a)

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
    try:
        _without_sync(step)
    finally:
        del function.TritonContractBroadcast.apply
    out['model'] = f'no sync, {len(calls)} kernel calls'
    if not calls:
        raise RuntimeError('cbsa_vit_small(backend="triton") did not run the Triton kernels')
    return out, []


def cuda_graph(dev):
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton
    pool = PoolSpec((14, 14), (8, 8), 0)
    w0, _, eta0, kap0, grad = _inputs(4, 6, 64, (14, 14), (8, 8), 1, 0, 'pool', dev)
    w = w0.to(torch.bfloat16).clone().requires_grad_()
    eta, kap = eta0.float().clone().requires_grad_(), kap0.float().clone().requires_grad_()
    g = grad.to(torch.bfloat16)

    def f():
        out = contract_and_broadcast_triton(w, eta, kap, 0.125, pool=pool)
        return (out,) + torch.autograd.grad(out, (w, eta, kap), g)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = f()
    w2, _, eta2, kap2, grad2 = _inputs(4, 6, 64, (14, 14), (8, 8), 1, 0, 'pool', dev, seed=1)
    with torch.no_grad():
        w.copy_(w2.to(w.dtype))
        eta.copy_(eta2.float())
        kap.copy_(kap2.float())
        g.copy_(grad2.to(g.dtype))
    graph.replay()
    eager = f()
    equal = [bool(torch.equal(a, b)) for a, b in zip(static, eager)]
    return {'replay_equals_eager': equal}, ([] if all(equal) else ['cuda_graph'])


def deterministic(dev):
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton
    res, failed = {}, []
    torch.use_deterministic_algorithms(True)
    try:
        for dt in (torch.bfloat16, torch.float32):
            w0, _, eta0, kap0, grad = _inputs(4, 6, 64, (32, 32), (8, 8), 1, 0, 'pool', dev)
            runs = [_fwd_bwd(contract_and_broadcast_triton, dt, w0, None, eta0, kap0, grad, 0.125,
                             PoolSpec((32, 32), (8, 8), 0)) for _ in range(2)]
            equal = [bool(torch.equal(a, b)) for a, b in zip(*runs) if a is not None]
            res[str(dt)] = equal
            if not all(equal):
                failed.append(f'deterministic {dt}')
    finally:
        torch.use_deterministic_algorithms(False)
    return res, failed


def large_launch(dev):
    from timm_cbsa.ops.contract_broadcast.naive import naive_contract_and_broadcast
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton
    res, failed = {}, []
    for name, B, H, d, grid, rep, prefix in (('BH70000', 17500, 4, 32, (4, 4), (2, 2), 1),
                                            ('N65536', 1, 2, 64, (256, 256), (8, 8), 0)):
        pool = PoolSpec(grid, rep, 0)
        w0, _, eta0, kap0, grad = _inputs(B, H, d, grid, rep, prefix, 0, 'pool', dev)
        got = _fwd_bwd(contract_and_broadcast_triton, torch.bfloat16, w0, None, eta0, kap0, grad, d ** -0.5, pool)
        sl = slice(B - 2, B)   # the last batch elements: the far end of grid axis 0
        vals = [w0[sl].to(torch.bfloat16).double(), None, eta0.to(torch.bfloat16).double(),
                kap0.to(torch.bfloat16).double(), grad[sl].to(torch.bfloat16).double()]
        ref = _fwd_bwd(naive_contract_and_broadcast, torch.float64, *vals, d ** -0.5, pool)
        errs = {'out': _rel(got[0][sl], ref[0]), 'dw': _rel(got[1][sl], ref[1])}
        res[name] = errs
        print(name, errs, flush=True)
        if not max(errs.values()) <= 3e-2:
            failed.append(name)
        del got
        torch.cuda.empty_cache()
    return res, failed


SECTIONS = {'parity': parity, 'sync_free': sync_free, 'cuda_graph': cuda_graph, 'deterministic': deterministic,
            'large_launch': large_launch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out')
    p.add_argument('--sections', nargs='+', default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument('--shapes', nargs='+', default=None, help='parity shapes by name (default: all)')
    p.add_argument('--device', default='cuda', help="'cpu' dry-runs the parity section under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.shapes:
        SHAPES[:] = [s for s in SHAPES if s[0] in args.shapes]
    report, failed = {}, []
    dry = args.device == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1'
    if not torch.cuda.is_available() and not dry:
        report = {s: {'skipped': 'no CUDA device'} for s in args.sections}
    else:
        dev = torch.device(args.device)
        for name in args.sections:
            t0 = time.time()
            try:
                res, bad = SECTIONS[name](dev)
                report[name] = {'result': res, 'failed': bad}
                failed += bad
            except Exception as e:  # noqa: BLE001 (each section on its own)
                traceback.print_exc()
                report[name] = {'error': f'{type(e).__name__}: {e}'}
                failed.append(name)
            report[name]['seconds'] = round(time.time() - t0, 1)
            print(f'== {name}: {"FAILED" if name in failed or any(f.startswith(name) for f in failed) else "ok"} '
                  f'({report[name]["seconds"]} s)', flush=True)
    with open(os.path.join(args.out, 'triton_checks.json'), 'w') as f:
        json.dump(report, f, indent=1, default=str)
    print('failed:', failed or 'none')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
