"""The autograd function around the Triton kernels (``kernels.py``) and the checks that decide whether they can run.

    out = contract_and_broadcast_triton(w, step_rep, step_x, scale, pool=PoolSpec((H_p, W_p), (r_h, r_w), trailing))

Representative pooling runs in torch *before* the kernels (``pool_representatives``, a reshape + mean for equal
windows, adaptive average pooling otherwise), and torch's autograd pools ∂Q_ini back into ∂W: the extraction pass
needs every representative before its first token block, so the pooling cannot share that pass. It is one O(N·d)
read, against the kernels' O(N·m·d).

Saved for backward: W, Q_ini, the per-representative log-sum-exp and the (padded) m×d / m×m tensors Z, Q, P, C —
nothing m×N. Backward adds ∂Z, ∂Q and D = rowsum(∂A ⊙ A) (m×d / m), and ∂Q_ini's token sum (atomic adds into a
float32 / float64 m×d buffer per (batch, head): its summation order, and so its last bits, may vary between runs).
"""
import functools
import os
from typing import Optional, Tuple

import torch

from ..pooling import pool_representatives

__all__ = ['TritonContractBroadcast', 'contract_and_broadcast_triton', 'triton_unsupported_reason', 'triton_probe',
           'MAX_REPRESENTATIVES', 'MAX_HEAD_DIM']

MAX_REPRESENTATIVES = 128   # m, padded: one program holds m×d and m×m tiles in registers
MAX_HEAD_DIM = 128          # d, padded
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        from . import kernels  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means: Triton unusable here)
        return f'Triton is not importable ({type(e).__name__}: {e})'
    return None


def triton_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int, num_reps: int
                              ) -> Optional[str]:
    """Why the Triton kernels cannot run for this device / dtype / shape, or None. Static checks only (the backend
    adds a one-time numerical probe on top). CPU tensors are accepted only under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if device.type != 'cuda' and not (device.type == 'cpu' and _interpreting()):
        return f'the Triton kernels need a CUDA device (got {device.type}; CPU only under TRITON_INTERPRET=1)'
    if dtype not in DTYPES:
        return f'unsupported dtype {dtype}'
    if dtype == torch.float64 and device.type == 'cuda':
        return 'float64 runs only in the interpreter (TRITON_INTERPRET=1); use the fused backend'
    if not 1 <= num_reps <= MAX_REPRESENTATIVES:
        return f'{num_reps} representatives (the kernels hold at most {MAX_REPRESENTATIVES})'
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f'head dim {head_dim} (the kernels hold at most {MAX_HEAD_DIM})'
    return _import_error()


def _pad(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


def _config(dtype: torch.dtype, m_pad: int, d_pad: int) -> Tuple[int, str, int]:
    """(BLOCK_N, dot input precision, num_warps). Not tuned on a GPU yet: conservative tiles that keep the m×d
    accumulator and a token block in registers."""
    block_n = 64 if m_pad * d_pad <= 64 * 64 and dtype != torch.float32 else 32
    if dtype == torch.float64:
        block_n = 16
    prec = 'ieee' if dtype in (torch.float32, torch.float64) else 'tf32'
    return block_n, prec, 4 if m_pad * d_pad <= 64 * 64 else 8


def _splits(N: int, bh: int, block_n: int, device: torch.device) -> Tuple[int, int]:
    """(SPLITS, CHUNK tokens) for the token passes that reduce over N: enough (batch, head, chunk) programs for about
    two per SM, each chunk ≥ 4 token blocks, none empty. Under the interpreter: up to 3 chunks of one block (so that
    the CPU tests cover the merge)."""
    n_blocks = triton_cdiv(N, block_n)
    if device.type == 'cuda':
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, min(triton_cdiv(2 * sms, bh), n_blocks // 4))
    else:
        want = min(3, n_blocks)
    per = triton_cdiv(n_blocks, want)
    return triton_cdiv(n_blocks, per), per * block_n


def _strides4(x: torch.Tensor):
    return tuple(x.stride())


def _like(w: torch.Tensor) -> torch.Tensor:
    """Empty (B, H, N, d) with w's memory layout ((B, N, H, d) for the usual head-split view: merging heads is free)."""
    if w.stride(1) < w.stride(2):
        B, H, N, d = w.shape
        return torch.empty(B, N, H, d, dtype=w.dtype, device=w.device).transpose(1, 2)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


class TritonContractBroadcast(torch.autograd.Function):
    """(w (B, H, N, d), r = Q_ini (B, H, m, d), η, κ (H, 1, 1), s) -> κ·Aᵀ C per head, (B, H, N, d) in w's layout.
    Gradients as in ``timm_cbsa/layers/fused.py``'s docstring, computed by the kernels."""

    @staticmethod
    def forward(ctx, w, r, step_rep, step_x, scale: float):
        from . import kernels as K
        B, H, N, d = w.shape
        m = r.shape[-2]
        sd = torch.float64 if w.dtype == torch.float64 else torch.float32
        mp, dp = _pad(m), _pad(d)
        block_n, prec, warps = _config(w.dtype, mp, dp)
        dev = w.device
        eta = step_rep.detach().reshape(H).to(sd).contiguous()
        kap = step_x.detach().reshape(H).to(sd).contiguous()
        scale_t = torch.tensor([scale], dtype=sd, device=dev)
        r = r.to(w.dtype)
        lse = torch.empty(B * H, mp, dtype=sd, device=dev)
        z, q, c = (torch.empty(B * H, mp, dp, dtype=sd, device=dev) for _ in range(3))
        p = torch.empty(B * H, mp, mp, dtype=sd, device=dev)
        meta = dict(M=m, D=d, M_PAD=mp, D_PAD=dp, BLOCK_N=block_n, PREC=prec, num_warps=warps)
        splits, chunk = _splits(N, B * H, block_n, dev)
        pmx, pss = (torch.empty(splits, B * H, mp, dtype=sd, device=dev) for _ in range(2))
        pacc = torch.empty(splits, B * H, mp, dp, dtype=sd, device=dev)
        K._extract_partial[(splits, B * H)](
            w, r, scale_t, pmx, pss, pacc, N, H, chunk, *_strides4(w), *_strides4(r), **meta)
        K._combine_contract[(B * H,)](
            r, eta, scale_t, pmx, pss, pacc, lse, z, q, p, c, H, splits, *_strides4(r),
            M=m, D=d, M_PAD=mp, D_PAD=dp, num_warps=warps)
        out = _like(w)
        K._broadcast_fwd[(triton_cdiv(N, block_n), B * H)](
            w, r, kap, scale_t, lse, c, out, N, H, *_strides4(w), *_strides4(r), *_strides4(out), **meta)
        ctx.save_for_backward(w, r, step_rep, step_x, lse, z, q, p, c)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        from . import kernels as K
        w, r, step_rep, step_x, lse, z, q, p, c = ctx.saved_tensors
        B, H, N, d = w.shape
        m = r.shape[-2]
        sd = lse.dtype
        mp, dp = _pad(m), _pad(d)
        block_n, prec, warps = _config(w.dtype, mp, dp)
        dev = w.device
        eta = step_rep.detach().reshape(H).to(sd).contiguous()
        kap = step_x.detach().reshape(H).to(sd).contiguous()
        scale_t = torch.tensor([ctx.scale], dtype=sd, device=dev)
        meta = dict(M=m, D=d, M_PAD=mp, D_PAD=dp, BLOCK_N=block_n, PREC=prec, num_warps=warps)
        if grad.dtype != w.dtype:
            grad = grad.to(w.dtype)
        dz, dq = (torch.empty(B * H, mp, dp, dtype=sd, device=dev) for _ in range(2))
        dd = torch.empty(B * H, mp, dtype=sd, device=dev)
        deta, dkap = (torch.empty(B * H, dtype=sd, device=dev) for _ in range(2))
        splits, chunk = _splits(N, B * H, block_n, dev)
        pag = torch.empty(splits, B * H, mp, dp, dtype=sd, device=dev)
        K._ag_partial[(splits, B * H)](
            w, r, grad, scale_t, lse, pag, N, H, chunk, *_strides4(w), *_strides4(r), *_strides4(grad), **meta)
        K._contract_bwd[(B * H,)](
            eta, kap, scale_t, pag, z, q, p, c, dz, dq, dd, deta, dkap, H, splits, M_PAD=mp, D_PAD=dp,
            num_warps=warps)
        dw = _like(w)
        dr_acc = dq.clone()                        # ∂Q_ini = ∂Q + s ∂S W, the token sum added atomically
        K._broadcast_bwd[(triton_cdiv(N, block_n), B * H)](
            w, r, grad, kap, scale_t, lse, c, dz, dd, dw, dr_acc, N, H,
            *_strides4(w), *_strides4(r), *_strides4(grad), *_strides4(dw), **meta)
        dr = dr_acc.view(B, H, mp, dp)[:, :, :m, :d].to(r.dtype)
        deta = deta.view(B, H).sum(0).view(step_rep.shape).to(step_rep.dtype)
        dkap = dkap.view(B, H).sum(0).view(step_x.shape).to(step_x.dtype)
        return dw, dr, deta, dkap, None


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def contract_and_broadcast_triton(w: torch.Tensor, step_rep: torch.Tensor, step_x: torch.Tensor, scale: float,
                                  pool: Optional[tuple] = None, r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w: (B, H, N, d) tokens -> (B, H, N, d), the result of ``CBSA.contract_and_broadcast`` computed by the Triton
    kernels. Q_ini: ``r`` (B, H, m, d), or pooled from w in torch with ``pool`` (a ``PoolSpec``)
    (its gradient flows back into w through torch's autograd). Raises ValueError naming the reason when the kernels
    cannot run for these tensors (see ``triton_unsupported_reason``)."""
    if (r is None) == (pool is None):
        raise ValueError('contract_and_broadcast_triton: pass either r or pool.')
    if w.dim() != 4 or step_rep.numel() != w.shape[1] or step_x.numel() != w.shape[1]:
        raise ValueError(f'contract_and_broadcast_triton: expected w (B, H, N, d) and step sizes with H values, got '
                         f'w {tuple(w.shape)}, step_rep {tuple(step_rep.shape)}, step_x {tuple(step_x.shape)}.')
    if r is None:
        r = pool_representatives(w, pool)
    reason = triton_unsupported_reason(w.device, w.dtype, w.shape[-1], r.shape[-2])
    if reason is not None:
        raise ValueError(f'CBSA Triton kernels cannot run here: {reason}.')
    return TritonContractBroadcast.apply(w, r, step_rep, step_x, scale)


_PROBES = {}


def triton_probe(device, dtype: torch.dtype, head_dim: int, num_reps: int) -> Optional[str]:
    """None when the kernels run for (device, dtype, head dim, m) and match the float64 naive twin on a small problem
    (forward and every gradient: ≤ 1e-4 relative in float32, ≤ 3e-2 in bf16 / fp16), else the reason. The static
    checks first; the numerical run once per key, cached (call it outside torch.compile regions)."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    key = (str(device), dtype, int(head_dim), int(num_reps))
    if key in _PROBES:
        return _PROBES[key]
    reason = triton_unsupported_reason(device, dtype, head_dim, num_reps)
    if reason is None:
        with torch.inference_mode(False), torch.enable_grad():   # the first call may come from an inference forward
            reason = _numerical_probe(device, dtype, head_dim, num_reps)
    _PROBES[key] = reason
    return reason


def _numerical_probe(device: torch.device, dtype: torch.dtype, d: int, m: int) -> Optional[str]:
    from ..naive import naive_contract_and_broadcast
    try:
        g = torch.Generator().manual_seed(0)
        B, H, N = 2, 2, 77                                            # odd N: a partial last token block
        w = torch.randn(B, N, H, d, generator=g, dtype=torch.float64).transpose(1, 2)
        r = torch.randn(B, H, m, d, generator=g, dtype=torch.float64)
        eta, kap = torch.randn(H, 1, 1, generator=g, dtype=torch.float64), torch.randn(H, 1, 1, generator=g,
                                                                                       dtype=torch.float64)
        grad = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
        outs = []
        for fn, dt, dev in ((contract_and_broadcast_triton, dtype, device),
                            (naive_contract_and_broadcast, torch.float64, torch.device('cpu'))):
            args = [t.to(device=dev, dtype=dt).requires_grad_() for t in (w, r, eta, kap)]
            with torch.autocast(device_type=dev.type, enabled=False):
                out = fn(args[0], args[2], args[3], d ** -0.5, r=args[1])
            (out * grad.to(device=dev, dtype=dt)).sum().backward()
            outs.append([out.detach()] + [a.grad for a in args])
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        for name, a, b in zip(('out', 'dw', 'dr', 'deta', 'dkap'), *outs):
            a = a.double().cpu()
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            if not err <= tol:
                return f'parity probe: {name} relative error {err:.1e} > {tol:.0e} against the float64 reference'
        return None
    except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
        return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
