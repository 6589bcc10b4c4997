"""CBSA kernels on the accelerator: every kernel path forced explicitly (CUDA: fused, flash, memory-efficient,
xformers when importable; CPU: fused, CPU flash), in fp32 and under bf16 / fp16 autocast on fp32 parameters, with and
without qk_norm, equal-window and adaptive pooling, N up to 16k on CUDA; a DDP training step (NCCL on CUDA, world size
min(2, #GPUs); gloo with 2 ranks on CPU). A forced kernel that falls back fails the test (strict mode + a call count).
The CPU variants run here too, so the pieces are exercised without a GPU; CUDA-only cases skip with the reason.

Run on a GPU machine with ``bash tests/gpu/run_gpu_checks.sh OUTDIR``."""
import importlib.util
import os

import pytest
import torch

from timm_cbsa.ops.contract_broadcast import fused, lse
from timm_cbsa.layers.cbsa import CBSA

from backend_checks import rel_errors, run_fwd_bwd  # tests/support

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
HAS_XFORMERS = importlib.util.find_spec('xformers') is not None
pytestmark = pytest.mark.gpu

# kernel -> (backend that runs it, LSE implementation the dispatcher is forced to; None: the explicit fused math)
KERNELS = {
    'fused': ('fused', None),
    'cpu_flash': ('sdpa', 'cpu_flash'),
    'cuda_flash': ('sdpa', 'cuda_flash'),
    'cuda_efficient': ('sdpa', 'cuda_efficient'),
    'xformers': ('xformers', 'xformers'),
}
MODES = {'fp32': None, 'bf16_autocast': torch.bfloat16, 'fp16_autocast': torch.float16}


def _skip_reason(kernel: str, mode: str):
    if kernel.startswith('cuda') and not CUDA:
        return 'needs a CUDA device'
    if kernel == 'cpu_flash' and CUDA:
        return 'CPU kernel (the CUDA run covers the CUDA kernels)'
    if kernel == 'xformers' and not (CUDA and HAS_XFORMERS):
        return 'needs CUDA and an importable xformers'
    if kernel == 'cuda_flash' and mode == 'fp32':
        return 'flash attention has no fp32 kernel'
    if not CUDA and mode == 'fp16_autocast':
        return 'fp16 autocast is a CUDA case'
    return None


def _force(monkeypatch, kernel: str, dtype: torch.dtype, d: int):
    """Pin the extraction kernel to ``kernel``, make any fallback an error, and count the kernel's calls (a parity
    test whose kernel never ran must fail, not pass)."""
    backend, impl = KERNELS[kernel]
    monkeypatch.setenv('TIMM_CBSA_STRICT_BACKEND', '1')
    calls = []
    if impl is not None:
        monkeypatch.setattr(lse, 'choose', lambda *a, **k: impl)
        real = lse.LSE_FUNCTIONS[impl]
        monkeypatch.setitem(lse.LSE_FUNCTIONS, impl, lambda *a, **k: calls.append(1) or real(*a, **k))
    else:
        real_apply = fused.ContractBroadcast.apply
        monkeypatch.setattr(fused.ContractBroadcast, 'apply',   # records the LSE implementation argument
                            staticmethod(lambda *a: (calls.append(1) if a[5] == 'fused' else None) or real_apply(*a)))
    return backend, calls


def _case(grid, rep, qk_norm, dim=384, heads=6, batch=2):
    torch.manual_seed(0)
    layer = CBSA(dim, heads, qkv_bias=True, qk_norm=qk_norm, grid_size=grid, rep_grid=rep, num_prefix_tokens=1)
    with torch.no_grad():   # make the extraction non-uniform (timm-like inits make A nearly flat)
        layer.qkv.weight.normal_(0, dim ** -0.5)
    x = torch.randn(batch, 1 + grid[0] * grid[1], dim)
    return layer.to(DEVICE), x.to(DEVICE)


def _run(layer, x, backend, amp):
    if amp is None:
        return run_fwd_bwd(layer, x, backend)
    with torch.autocast(DEVICE, dtype=amp):
        return run_fwd_bwd(layer, x, backend)


POOLING = {'equal': ((16, 16), 8), 'adaptive': ((14, 14), 8)}


@pytest.mark.parametrize('qk_norm', [False, True])
@pytest.mark.parametrize('pooling', list(POOLING))
@pytest.mark.parametrize('mode', list(MODES))
@pytest.mark.parametrize('kernel', list(KERNELS))
def test_forced_kernel_parity(kernel, mode, pooling, qk_norm, monkeypatch):
    reason = _skip_reason(kernel, mode)
    if reason:
        pytest.skip(reason)
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
    grid, rep = POOLING[pooling]
    layer, x = _case(grid, rep, qk_norm)
    amp = MODES[mode]
    ref = _run(layer, x, 'eager', amp)
    # the kernels see W in the autocast dtype (the fused path casts float32 W, e.g. after qk_norm, to it)
    backend, calls = _force(monkeypatch, kernel, amp or torch.float32, layer.head_dim)
    got = _run(layer, x, backend, amp)
    assert calls, f'{kernel} was forced but never ran'
    errs = rel_errors(got, ref)
    print(f'{kernel} {mode} {pooling} qk_norm={qk_norm}: rel errors (out, dx, params) '
          + ' '.join(f'{e:.1e}' for e in errs))
    if amp is None:
        assert max(errs) <= 1e-5, errs
    else:   # half precision: no further from float32 than the eager path in the same precision (gradients that are
        # sums over all tokens, e.g. the step sizes or a norm bias, cancel and show bf16 rounding in both)
        ref32 = _run(layer, x, 'eager', None)
        got32, eager32 = rel_errors(got, ref32), rel_errors(ref, ref32)
        print('  vs float32: kernel ' + ' '.join(f'{e:.1e}' for e in got32)
              + ' | eager ' + ' '.join(f'{e:.1e}' for e in eager32))
        for i, (e, e_eager) in enumerate(zip(got32, eager32)):
            assert e <= max(3e-2, 2 * e_eager), (i, got32, eager32)


@pytest.mark.skipif(not CUDA, reason='N = 16k tokens is a CUDA case (minutes on CPU)')
@pytest.mark.parametrize('kernel', ['fused', 'cuda_flash', 'cuda_efficient', 'xformers'])
def test_forced_kernel_long_sequence(kernel, monkeypatch):
    """N = 1 + 128² = 16385 tokens, bf16 autocast on fp32 parameters, against the eager path in float32."""
    if kernel == 'xformers' and not HAS_XFORMERS:
        pytest.skip('xformers is not importable')
    layer, x = _case((128, 128), 8, False, batch=2)
    ref = _run(layer, x, 'eager', None)
    backend, calls = _force(monkeypatch, kernel, torch.bfloat16, layer.head_dim)
    got = _run(layer, x, backend, torch.bfloat16)
    assert calls, f'{kernel} was forced but never ran'
    errs = rel_errors(got[:2], ref[:2])
    print(f'{kernel} N=16385 bf16 autocast vs fp32 eager: out {errs[0]:.1e}, dx {errs[1]:.1e}')
    assert max(errs) <= 5e-2, errs


def _ddp_worker(rank, world, backend, port, out_dir):
    import timm
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import timm_cbsa  # noqa: F401
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device('cuda', rank) if backend == 'nccl' else torch.device('cpu')
    if backend == 'nccl':
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = timm.create_model('cbsa_vit_tiny', img_size=64, depth=2, rep_grid=2, num_classes=10).to(device)
    ref = timm.create_model('cbsa_vit_tiny', img_size=64, depth=2, rep_grid=2, num_classes=10).to(device)
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x_all, y_all = torch.randn(2 * world, 3, 64, 64, generator=g), torch.randint(0, 10, (2 * world,), generator=g)
    x, y = x_all[2 * rank:2 * rank + 2].to(device), y_all[2 * rank:2 * rank + 2].to(device)
    ddp = DDP(model, device_ids=[rank] if backend == 'nccl' else None)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ddp, ref))
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if backend == 'nccl' else torch.autocast('cpu', enabled=False)
    with amp:
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
    loss.backward()
    opt.step()
    with amp:   # the same step without DDP on the whole global batch: DDP averages the ranks' gradients
        loss_ref = torch.nn.functional.cross_entropy(ref(x_all.to(device)), y_all.to(device))
    loss_ref.backward()
    opt_ref.step()
    worst = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-12)).item()
                for p, q in zip(model.parameters(), ref.parameters()))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(t, gathered[0]) for t in gathered)
    with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(f'{torch.isfinite(loss).item()} {same} {worst}\n')
    dist.destroy_process_group()


def test_ddp_training_step(tmp_path):
    """One DDP training step: every rank ends with identical parameters, equal to one plain step on the global batch
    (NCCL on CUDA with min(2, #GPUs) ranks under bf16 autocast; gloo with 2 CPU ranks here)."""
    import socket
    import torch.multiprocessing as mp
    backend = 'nccl' if CUDA else 'gloo'
    world = min(2, torch.cuda.device_count()) if CUDA else 2
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(world, backend, port, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        finite, same, worst = (tmp_path / f'rank{rank}.txt').read_text().split()
        print(f'DDP {backend} world={world} rank {rank}: finite loss {finite}, ranks identical {same}, '
              f'max rel diff vs plain step {float(worst):.1e}')
        assert finite == 'True' and same == 'True'
        assert float(worst) <= (3e-2 if CUDA else 1e-4)


@pytest.mark.skipif(not CUDA, reason='needs a CUDA device')
def test_sdpa_static_choice_runs_on_cuda():
    """The statically chosen SDPA kernel for each dtype runs and matches the explicit log-sum-exp math."""
    q = torch.randn(2, 3, 16, 64, device='cuda')
    k = torch.randn(2, 3, 200, 64, device='cuda')
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        name = lse.choose('sdpa', 64, dt, torch.device('cuda'))
        assert name == ('cuda_efficient' if dt == torch.float32 else 'cuda_flash')
        out, s = lse.LSE_FUNCTIONS[name](q.to(dt), k.to(dt), k.to(dt), 0.125)
        ref_s = torch.logsumexp((q @ k.transpose(-2, -1)).double() * 0.125, dim=-1)
        ref = torch.softmax((q @ k.transpose(-2, -1)).double() * 0.125, dim=-1) @ k.double()
        tol = 1e-4 if dt == torch.float32 else 3e-2
        assert torch.allclose(s.double(), ref_s, atol=tol, rtol=tol) and torch.allclose(out.double(), ref, atol=4 * tol)


@pytest.mark.skipif(not CUDA, reason='needs a CUDA device')
@pytest.mark.parametrize('backend', ['fused', 'sdpa'])
def test_compile_inductor_fullgraph_cuda(backend):
    torch._dynamo.reset()
    layer, x = _case((14, 14), 8, False)
    layer, x = layer.bfloat16(), x.bfloat16()
    ref = run_fwd_bwd(layer, x, backend)
    layer.backend = backend
    compiled = torch.compile(layer, fullgraph=True)
    xx = x.clone().requires_grad_()
    y = compiled(xx)
    g = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    (y * g).sum().backward()
    assert max(rel_errors([y.float(), xx.grad.float()], ref[:2])) <= 2e-2


@pytest.mark.skipif(not CUDA, reason='needs a CUDA device')
def test_saved_memory_cuda_below_flash_sdpa():
    from timm.layers import Attention
    torch.manual_seed(0)
    x = torch.randn(8, 3137, 384, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    cbsa = CBSA(384, 6, grid_size=(56, 56), num_prefix_tokens=1, backend='fused').cuda().bfloat16()
    attn = Attention(384, 6, qkv_bias=True).cuda().bfloat16()

    def held(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = fn()
        torch.cuda.synchronize()
        out = torch.cuda.memory_allocated() - base
        del y
        return out
    held_sdpa = held(lambda: attn(x))
    got = {b: held(lambda: (setattr(cbsa, 'backend', b), cbsa(x))[1]) for b in ('eager', 'fused', 'sdpa')}
    print('memory held after forward (MB): sdpa attention %.1f, ' % (held_sdpa / 2**20)
          + ', '.join(f'cbsa[{b}] {v / 2**20:.1f}' for b, v in got.items()))
    assert got['fused'] <= held_sdpa
