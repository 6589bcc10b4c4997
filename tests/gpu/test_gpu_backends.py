"""CBSA backends on CUDA: parity with eager (fp32 ≤ 1e-5, bf16 ≤ 2e-2), the xformers path, torch.compile with
inductor, and saved memory. Skipped (with the reason) where no CUDA device / xformers is available."""
import importlib.util

import pytest
import torch

from timm_cbsa.layers import backends
from timm_cbsa.layers.cbsa import CBSA

from backend_checks import rel_errors, run_fwd_bwd  # tests/support

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]
HAS_XFORMERS = importlib.util.find_spec('xformers') is not None


def _layer(grid=(14, 14), dim=384, heads=6):
    torch.manual_seed(0)
    layer = CBSA(dim, heads, qkv_bias=True, grid_size=grid, num_prefix_tokens=1).cuda()
    x = torch.randn(4, 1 + grid[0] * grid[1], dim, device='cuda')
    return layer, x


@pytest.mark.parametrize('backend', ['fused', 'sdpa', 'xformers'])
def test_parity_fp32_cuda(backend):
    if backend == 'xformers' and not HAS_XFORMERS:
        pytest.skip('xformers not installed')
    torch.backends.cuda.matmul.allow_tf32 = False
    layer, x = _layer()
    errs = rel_errors(run_fwd_bwd(layer, x, backend), run_fwd_bwd(layer, x, 'eager'))
    print(backend, 'fp32 rel errors', ['%.1e' % e for e in errs])
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize('backend', ['fused', 'sdpa', 'xformers'])
def test_parity_bf16_cuda(backend):
    if backend == 'xformers' and not HAS_XFORMERS:
        pytest.skip('xformers not installed')
    layer, x = _layer()
    ref64 = run_fwd_bwd(layer.double(), x.double(), 'eager')
    layer = layer.bfloat16()
    eager = run_fwd_bwd(layer, x.bfloat16(), 'eager')
    got = run_fwd_bwd(layer, x.bfloat16(), backend)
    vs_eager = rel_errors(got[:2], eager[:2])
    vs_ref = rel_errors(got, ref64)
    print(backend, 'bf16 vs eager', ['%.1e' % e for e in vs_eager], 'vs fp64', ['%.1e' % e for e in vs_ref])
    assert max(vs_eager) <= 2e-2, vs_eager
    for i, e in enumerate(vs_ref):   # 4, 5: per-head step-size gradients (sums with cancellation)
        assert e <= (5e-2 if i in (4, 5) else 2e-2), vs_ref


@pytest.mark.skipif(not HAS_XFORMERS, reason='xformers not installed')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_xformers_is_used_on_cuda(dtype):
    backends._PROBES.clear()
    assert backends.xformers_status('cuda', dtype, 64) == 'xformers', 'xformers probe failed: see the log'


def test_sdpa_probe_picks_a_kernel_on_cuda():
    backends._PROBES.clear()
    for dt in (torch.float32, torch.bfloat16):
        assert backends._probe('sdpa', torch.device('cuda'), dt, 64) in ('cuda_flash', 'cuda_efficient')


@pytest.mark.parametrize('backend', ['fused', 'sdpa', 'xformers'])
def test_compile_inductor_fullgraph_cuda(backend):
    torch._dynamo.reset()
    layer, x = _layer()
    layer = layer.bfloat16()
    x = x.bfloat16()
    ref = run_fwd_bwd(layer, x, backend)
    layer.backend = backend
    compiled = torch.compile(layer, fullgraph=True)
    xx = x.clone().requires_grad_()
    y = compiled(xx)
    g = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    (y * g).sum().backward()
    assert max(rel_errors([y.float(), xx.grad.float()], ref[:2])) <= 2e-2


def test_saved_memory_cuda_below_flash_sdpa():
    from timm.layers import Attention
    torch.manual_seed(0)
    x = torch.randn(8, 3137, 384, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    cbsa = CBSA(384, 6, grid_size=(56, 56), num_prefix_tokens=1, backend='fused').cuda().bfloat16()
    attn = Attention(384, 6, qkv_bias=True).cuda().bfloat16()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = fn()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        del y
        return held
    held_sdpa = peak(lambda: attn(x))
    held = {b: peak(lambda: (setattr(cbsa, 'backend', b), cbsa(x))[1]) for b in ('eager', 'fused', 'sdpa')}
    print('memory held after forward (MB): sdpa attention %.1f, ' % (held_sdpa / 2**20)
          + ', '.join(f'cbsa[{b}] {v / 2**20:.1f}' for b, v in held.items()))
    assert held['fused'] <= held_sdpa
