"""The CBSA Triton kernels compiled on CUDA (fp32 / bf16 / fp16) against the eager reference, and the 'triton' backend
of a CBSA layer — which FAILS (does not skip) if it silently fell back to another backend. Skipped with the reason
where there is no CUDA device, no Triton, or TRITON_INTERPRET=1 is set (the CPU interpreter tests are in
test_triton_interpreter.py). Run by tests/gpu/run_gpu_checks.sh:  python -m pytest tests/kernels/test_triton_cuda.py -s
"""
import importlib.util
import logging
import os

import pytest
import torch

from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec

from backend_checks import rel_errors, run_fwd_bwd  # tests/support

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
    pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='Triton is not installed'),
    pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') == '1', reason='TRITON_INTERPRET=1: kernels not compiled'),
]
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# (B, H, d, grid, rep_grid, prefix, trailing): the ViT-S layer at 224 px, m = 49 / d = 96 / adaptive non-square
# windows, the segmentation decoder's m = 100 with 150 trailing class tokens, d = 128
SHAPES = [(4, 6, 64, (14, 14), (8, 8), 1, 0), (3, 2, 96, (9, 11), (7, 7), 2, 0), (2, 6, 64, (32, 32), (10, 10), 0, 150),
          (2, 4, 128, (16, 16), (8, 8), 1, 0)]
STEP = ('deta', 'dkap')


def _tolerance(dtype, name):
    if dtype == torch.float32:
        return 1e-4
    return 5e-2 if name in STEP else 2e-2   # half precision vs float64; step-size gradients are sums with cancellation


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_kernels_are_compiled_not_interpreted():
    from triton.runtime.jit import JITFunction
    from timm_cbsa.ops.contract_broadcast.triton import kernels
    assert isinstance(kernels._broadcast_fwd, JITFunction), type(kernels._broadcast_fwd)


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('shape', SHAPES, ids=['vit_s_224', 'm49_d96_adaptive', 'm100_trailing150', 'd128'])
def test_kernels_match_reference(dtype, shape):
    from timm_cbsa.ops.contract_broadcast.naive import naive_contract_and_broadcast
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, not_supported_reasons
    B, H, d, grid, rep, prefix, trailing = shape
    dt = DTYPES[dtype]
    m, N = rep[0] * rep[1], prefix + grid[0] * grid[1] + trailing
    reasons = not_supported_reasons(d, m, dt, 'cuda')
    if reasons:
        pytest.skip('refused statically: ' + '; '.join(reasons))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(B, N, H, d, generator=g, dtype=torch.float64).transpose(1, 2)
    eta, kap = torch.randn(H, 1, 1, generator=g, dtype=torch.float64), torch.randn(H, 1, 1, generator=g,
                                                                                   dtype=torch.float64)
    grad = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    pool = PoolSpec(grid, rep, trailing)
    res = {}
    for tag, fn, fdt in (('triton', contract_and_broadcast_triton, dt), ('ref64', naive_contract_and_broadcast,
                                                                       torch.float64)):
        args = [t.cuda().to(fdt).requires_grad_() for t in (w, eta, kap)]
        out = fn(args[0], args[1], args[2], d ** -0.5, pool=pool)
        (out * grad.cuda().to(fdt)).sum().backward()
        res[tag] = [out.detach()] + [a.grad for a in args]
    errs = dict(zip(('out', 'dw', 'deta', 'dkap'), rel_errors([t.double() for t in res['triton']], res['ref64'])))
    print(dtype, shape, 'triton vs float64', {k: '%.1e' % v for k, v in errs.items()})
    for k, e in errs.items():
        assert e <= _tolerance(dt, k), (k, errs)


def _layer(d=64, heads=6):
    from timm_cbsa.layers.cbsa import CBSA
    torch.manual_seed(0)
    layer = CBSA(d * heads, heads, qkv_bias=True, grid_size=(14, 14), num_prefix_tokens=1).cuda()
    return layer, torch.randn(4, 197, d * heads, device='cuda')


@pytest.mark.parametrize('backend', ['triton', 'auto'])
@pytest.mark.parametrize('dtype', list(DTYPES))
def test_layer_backend_runs_triton_and_matches_eager(monkeypatch, caplog, backend, dtype):
    """The layer's 'triton' backend and the CUDA default 'auto' must run the kernels where ``not_supported_reasons``
    accepts the layer (every dtype at m = d = 64 on sm_80 / sm_90 tables): a fallback fails this test."""
    from timm_cbsa.ops.contract_broadcast.triton import function, not_supported_reasons
    reasons = not_supported_reasons(64, 64, DTYPES[dtype], 'cuda')
    if reasons:
        pytest.skip('refused statically: ' + '; '.join(reasons))
    calls = []
    apply = function.TritonContractBroadcast.apply
    monkeypatch.setattr(function.TritonContractBroadcast, 'apply', lambda *a: calls.append(1) or apply(*a))
    layer, x = _layer()
    dt = DTYPES[dtype]
    ref64 = run_fwd_bwd(layer.double(), x.double(), 'eager')
    layer, x = layer.to(dt), x.to(dt)
    with caplog.at_level(logging.WARNING, logger='timm_cbsa.ops.contract_broadcast'):
        got = run_fwd_bwd(layer, x, backend)
    assert calls, f'backend={backend!r} fell back instead of running the Triton kernels: ' + \
        '; '.join(r.getMessage() for r in caplog.records)
    errs = rel_errors(got, ref64)
    print(backend, dtype, 'layer vs float64 (out, dx, params...)', ['%.1e' % e for e in errs])
    for i, e in enumerate(errs):   # 4, 5: per-head step-size gradients (sums with cancellation)
        tol = 1e-4 if dt == torch.float32 else (5e-2 if i in (4, 5) else 2e-2)
        assert e <= tol, errs
    if dt == torch.float32:
        assert max(rel_errors(got, run_fwd_bwd(layer, x, 'eager'))) <= 1e-4


def test_autocast_bf16_model_runs_triton(monkeypatch):
    """Under CUDA autocast (the training setting) the default backend runs the kernels on bf16 tokens."""
    import timm
    from timm_cbsa.ops.contract_broadcast.triton import function
    calls = []
    apply = function.TritonContractBroadcast.apply
    monkeypatch.setattr(function.TritonContractBroadcast, 'apply', lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    model = timm.create_model('cbsa_vit_tiny', img_size=64, depth=2, rep_grid=2, num_classes=10).cuda()
    x = torch.randn(2, 3, 64, 64, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    assert calls and torch.isfinite(y).all()
    with torch.autocast('cuda', dtype=torch.bfloat16), torch.no_grad():
        from timm_cbsa import use_backend
        with use_backend(model, 'eager'):
            y_ref = model(x)
    assert rel_errors([y.detach().float()], [y_ref.float()])[0] <= 5e-2
