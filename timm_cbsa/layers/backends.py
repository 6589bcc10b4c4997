"""The one place that decides how CBSA's extraction / contraction / broadcast run.

Backends (``BACKENDS``):

* ``'eager'``    the reference math in ``CBSA.contract_and_broadcast`` (plain autograd, keeps the m×N matrix A).
* ``'fused'``    explicit extraction, but cache-blocked (one batch element / head group at a time, no layout copies)
                 and memory-saving: a custom autograd function that keeps only W, Q_ini, the per-representative
                 log-sum-exp and m×d / m×m tensors for backward and rebuilds A = exp(s·Q_ini Wᵀ − lse) blockwise.
* ``'sdpa'``     the extraction softmax(s·Q_ini Wᵀ) W is an ordinary attention with m queries and N keys: torch SDPA
                 (``_scaled_dot_product_flash_attention_for_cpu`` on CPU, flash / memory-efficient on CUDA)
                 returns it together with its log-sum-exp; the broadcast Aᵀ·Y is rebuilt as exp(s·W Q_iniᵀ − lse)·Y.
                 Same memory-saving backward as 'fused'.
* ``'xformers'`` as 'sdpa', with ``xformers.ops.fmha`` for the extraction ([B, M, H, K] layout). Probed once per
                 (device, dtype, head-dim class), cached; when it cannot run (CPU, missing package, unsupported
                 shape) it falls back to 'sdpa' and logs the reason once.

Selection, highest priority first: the layer's ``backend=`` argument, ``use_backend(...)`` / ``set_backend(...)``,
the environment variable ``TIMM_CBSA_BACKEND`` (read at import), then 'fused' (the default: it matches 'eager' to
~1e-7 in float32 and is the fastest on CPU; 'eager' stays the readable reference). Attention dropout while training
always runs 'eager' (only the reference path has it); TorchScript always runs 'eager' (see ``CBSA.forward``).

Tracing: ``torch.fx`` keeps the fused call as one leaf (``_cb_apply`` below is ``torch.fx.wrap``-ed and registered
with timm's notrace list, because it branches on device and dtype). Under ``torch.compile`` the custom autograd
function is traced whole (no graph break); the per-block Python loop is replaced by one batched block, and the
xformers probe is never run inside the compiled region (the cached answer is used, or 'sdpa' when none exists).

Gradients of the memory-saving function (per head, A = softmax_N(s·R Wᵀ), Z = A W, Q = R + ηZ,
P = softmax(s·Q Qᵀ), C = P Q, out = κ Aᵀ C, G = ∂L/∂out):

    AG = A G;  ∂κ = Σ C⊙AG;  ∂C = κ AG
    ∂Q = Pᵀ∂C + s(∂L Q + ∂Lᵀ Q),  ∂L = P ⊙ (∂C Qᵀ − rowsum(∂C Qᵀ ⊙ P))
    ∂η = Σ ∂Q⊙Z;  ∂Z = η ∂Q;  ∂A = κ C Gᵀ + ∂Z Wᵀ
    D = rowsum(∂A ⊙ A) = rowsum(κC ⊙ AG) + rowsum(∂Z ⊙ Z)            (no m×N reduction needed)
    ∂S = A ⊙ (∂A − D);  ∂R = ∂Q + s ∂S W;  ∂W = Aᵀ ∂Z + s ∂Sᵀ R
"""
import contextlib
import logging
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._fx import register_notrace_function

__all__ = [
    'BACKENDS', 'set_backend', 'get_backend', 'use_backend', 'resolve_backend', 'fused_contract_and_broadcast',
    'xformers_status', 'block_budget_bytes',
]

_logger = logging.getLogger(__name__)

BACKENDS = ('eager', 'fused', 'sdpa', 'xformers')


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f'Unknown CBSA backend {name!r}; choose one of {BACKENDS}.')
    return name


_BACKEND = _check(os.environ.get('TIMM_CBSA_BACKEND', 'fused'))

# size of one block's m×N logits on CPU: small enough to stay in cache while it is reused 3 (fwd) / 5 (bwd) times
_BLOCK_BYTES = int(os.environ.get('TIMM_CBSA_BLOCK_BYTES', str(4 << 20)))


def block_budget_bytes() -> int:
    return _BLOCK_BYTES


def set_backend(name: str) -> None:
    """Set the process-wide default CBSA backend."""
    global _BACKEND
    _BACKEND = _check(name)


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily switch the default CBSA backend: ``with use_backend('sdpa'): model(x)``."""
    global _BACKEND
    prev, _BACKEND = _BACKEND, _check(name)
    try:
        yield
    finally:
        _BACKEND = prev


def resolve_backend(module_backend: Optional[str], w: torch.Tensor, needs_eager: bool = False) -> str:
    """Backend for one call. ``needs_eager``: attention dropout while training (only the eager path has it).

    Decides on Python values only (never on ``w``), so it is safe under torch.fx / torch.compile; device- and
    dtype-dependent fallbacks (xformers on CPU, ...) happen inside the traced leaf ``_cb_apply``.
    """
    if needs_eager:
        return 'eager'
    return _check(module_backend) if module_backend is not None else _BACKEND


# ---------------------------------------------------------------------------------------------------------------
# attention with log-sum-exp (extraction): out = softmax(s q kᵀ) v, lse = logsumexp(s q kᵀ) (float32, (..., m))
# ---------------------------------------------------------------------------------------------------------------

def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _explicit_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    s = _f32(torch.matmul(q * scale, k.transpose(-2, -1)))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), v)
    return out, lse


def _sdpa_lse_cpu(q, k, v, scale: float):
    if q.dim() == 3:   # one CPU block: (H, L, d)
        out, lse = _sdpa_lse_cpu(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale)
        return out.squeeze(0), lse.squeeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, _f32(lse)


def _sdpa_lse_cuda_flash(q, k, v, scale: float):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], _f32(res[1][..., :q.shape[-2]])


def _sdpa_lse_cuda_efficient(q, k, v, scale: float):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], _f32(res[1][..., :q.shape[-2]])


def _xformers_lse(q, k, v, scale: float):
    from xformers.ops import fmha
    # xformers layout is [B, M, H, K]; ours is [B, H, M, K]
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), _f32(lse[..., :q.shape[-2]])


# probe cache: (kind, device type, dtype, head dim) -> chosen implementation name, or None when it cannot run
_PROBES: Dict[Tuple[str, str, torch.dtype, int], Optional[str]] = {}
_LSE_IMPLS = {
    'explicit': _explicit_lse, 'cpu_flash': _sdpa_lse_cpu, 'cuda_flash': _sdpa_lse_cuda_flash,
    'cuda_efficient': _sdpa_lse_cuda_efficient, 'xformers': _xformers_lse,
}


def _head_dim_class(d: int) -> int:
    return 1 << max(int(d) - 1, 0).bit_length()   # next power of two: 64 -> 64, 48 -> 64, 80 -> 128


def _try_impl(name: str, device: torch.device, dtype: torch.dtype, d: int) -> Optional[str]:
    """Run ``name`` once on a small problem and compare with the explicit math; return a reason string or None."""
    try:
        g = torch.Generator(device='cpu').manual_seed(0)
        q = torch.randn(2, 2, 8, d, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(2, 2, 40, d, generator=g).to(device=device, dtype=dtype)
        out, lse = _LSE_IMPLS[name](q, k, k, d ** -0.5)
        ref_out, ref_lse = _explicit_lse(q.double(), k.double(), k.double(), d ** -0.5)
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        if tuple(lse.shape) != tuple(ref_lse.shape) or not torch.allclose(lse.double(), ref_lse, atol=tol, rtol=tol):
            return 'log-sum-exp mismatch'
        if not torch.allclose(out.double(), ref_out, atol=tol * 4, rtol=tol * 4):
            return 'output mismatch'
        return None
    except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
        return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]


def _probe(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> Optional[str]:
    """Chosen LSE implementation for ``kind`` ('sdpa' or 'xformers'), or None (xformers unusable). Cached."""
    key = (kind, device.type, dtype, _head_dim_class(d))
    if key in _PROBES:
        return _PROBES[key]
    if torch.compiler.is_compiling():
        # never probe inside a compiled region: the explicit math for SDPA, SDPA in place of an unprobed xformers
        return 'explicit' if kind == 'sdpa' else None
    choice: Optional[str] = None
    if kind == 'xformers':
        reason = None
        if device.type != 'cuda':
            reason = f'xformers memory_efficient_attention needs a CUDA device (got {device.type})'
        else:
            try:
                import xformers.ops  # noqa: F401
            except Exception as e:  # noqa: BLE001
                reason = f'xformers is not importable ({type(e).__name__}: {e})'
        if reason is None:
            reason = _try_impl('xformers', device, dtype, d)
        if reason is None:
            choice = 'xformers'
        else:
            _logger.warning('CBSA: xformers backend unavailable for %s/%s/d=%d, falling back to sdpa: %s',
                            device.type, dtype, d, reason)
    else:
        if device.type == 'cpu':
            candidates: List[str] = ['cpu_flash']
        elif device.type == 'cuda':
            candidates = (['cuda_flash', 'cuda_efficient'] if dtype in (torch.float16, torch.bfloat16)
                          else ['cuda_efficient'])
        else:
            candidates = []
        reasons = []
        for c in candidates:
            reason = _try_impl(c, device, dtype, d)
            if reason is None:
                choice = c
                break
            reasons.append(f'{c}: {reason}')
        if choice is None:
            choice = 'explicit'
            _logger.warning('CBSA: no SDPA kernel returning the log-sum-exp for %s/%s/d=%d, using explicit math (%s)',
                            device.type, dtype, d, '; '.join(reasons) or 'no candidate for this device')
    _PROBES[key] = choice
    return choice


def xformers_status(device: torch.device, dtype: torch.dtype = torch.float16, d: int = 64) -> Optional[str]:
    """'xformers' if the xformers path runs for this device / dtype / head dim, else None (see the log)."""
    return _probe('xformers', torch.device(device), dtype, d)


# ---------------------------------------------------------------------------------------------------------------
# the memory-saving contract-and-broadcast
# ---------------------------------------------------------------------------------------------------------------

def _stat_dtype(dt: torch.dtype) -> torch.dtype:
    """Softmax statistics and the small m×d / m×m tensors: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _logits(r_s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s·R Wᵀ in statistics precision (float16 is promoted before the product, like the eager path)."""
    sd = _stat_dtype(w.dtype)
    if w.dtype == torch.float16:
        return torch.matmul(r_s.to(sd), w.to(sd).transpose(-2, -1))
    return torch.matmul(r_s, w.transpose(-2, -1)).to(sd)


def _mix_forward(q: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """P = softmax(s·Q Qᵀ), C = P Q, both float32 (m×m and m×d: negligible cost)."""
    p = torch.matmul(q * scale, q.transpose(-2, -1)).softmax(dim=-1)   # q is already in statistics precision
    return p, torch.matmul(p, q)


def _blocks(B: int, H: int, N: int, m: int, device: torch.device) -> List[Tuple[tuple, bool]]:
    """Index blocks ``(idx, batched)`` over (B, H). CPU: blocks whose m×N logits fit ``_BLOCK_BYTES`` (they stay in
    cache while reused); one batch element per block uses 3-D strided bmm without layout copies, several (small N)
    use batched 4-D products. Elsewhere, or under torch.compile: one batched block."""
    per_head = max(1, m * N * 4)
    if device.type != 'cpu' or torch.compiler.is_compiling() or B * H * per_head <= _BLOCK_BYTES:
        return [((slice(None), slice(None)), True)]
    if H * per_head * 2 <= _BLOCK_BYTES:
        nb = max(1, _BLOCK_BYTES // (H * per_head))
        return [((slice(b, min(B, b + nb)), slice(None)), True) for b in range(0, B, nb)]
    hc = max(1, min(H, _BLOCK_BYTES // per_head))
    return [((b, slice(h, min(H, h + hc))), False) for b in range(B) for h in range(0, H, hc)]


def _like_w(w: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, d) tensor with w's memory layout ((B, N, H, d) when w is the usual transposed view), so
    that the caller's transpose(1, 2).reshape(B, N, C) is free."""
    if w.dim() == 4 and w.stride(1) < w.stride(2):
        B, H, N, d = w.shape
        return torch.empty(B, N, H, d, dtype=w.dtype, device=w.device).transpose(1, 2)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


class _ContractBroadcast(torch.autograd.Function):
    """out = κ·Aᵀ C with A rebuilt from the log-sum-exp; saves W, Q_ini, lse and m×d / m×m tensors only."""

    @staticmethod
    def forward(ctx, w, r, step_rep, step_x, scale: float, lse_impl: str):
        B, H, N, d = w.shape
        m = r.shape[-2]
        dt = w.dtype
        sd = _stat_dtype(dt)
        eta = step_rep.to(sd)
        kap = step_x.to(sd)
        r_s = r * scale
        blocks = _blocks(B, H, N, m, w.device)
        whole = len(blocks) == 1
        out = None if whole else _like_w(w)
        lse = torch.empty(B, H, m, device=w.device, dtype=sd)
        z = torch.empty(B, H, m, d, device=w.device, dtype=sd)
        q = torch.empty_like(z)
        p = torch.empty(B, H, m, m, device=w.device, dtype=sd)
        c = torch.empty_like(z)
        for idx, batched in blocks:
            hs = idx[1]
            wb, rb, rsb = w[idx], r[idx], r_s[idx]
            etab, kapb = (eta[hs], kap[hs])
            if lse_impl == 'fused':
                s = _logits(rsb, wb)                                   # (…, m, N) float32
                mx = s.amax(dim=-1, keepdim=True)
                e = s.sub_(mx).exp_()                                  # unnormalised: exp(s − max)
                ssum = e.sum(dim=-1, keepdim=True)
                lse_b = mx + ssum.log()
                inv = ssum.reciprocal()
                e_dt = e if dt == sd else e.to(dt)
                zb = torch.matmul(e_dt, wb).to(sd) * inv              # A W, normalisation folded into m×d
            else:
                zb, lse_b = _LSE_IMPLS[lse_impl](rb, wb, wb, scale)
                zb = zb.to(sd)
                lse_b = lse_b.unsqueeze(-1)
                e = _logits(rsb, wb).sub_(lse_b).exp_()                # A itself (normalised)
                e_dt = e if dt == sd else e.to(dt)
                inv = None
            qb = rb.to(sd) + etab * zb
            pb, cb = _mix_forward(qb, scale)
            ck = kapb * cb if inv is None else kapb * cb * inv         # κ·C (and 1/Σ for the unnormalised rows)
            lse[idx] = lse_b.squeeze(-1)
            z[idx], q[idx], p[idx], c[idx] = zb, qb, pb, cb
            if whole:
                out = torch.matmul(e_dt.transpose(-2, -1), ck.to(dt))
            elif batched:
                out[idx] = torch.matmul(e_dt.transpose(-2, -1), ck.to(dt))
            else:
                torch.bmm(e_dt.transpose(-2, -1), ck.to(dt), out=out[idx])
        ctx.save_for_backward(w, r, step_rep, step_x, lse, z, q, p, c)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        w, r, step_rep, step_x, lse, z, q, p, c = ctx.saved_tensors
        scale = ctx.scale
        B, H, N, d = w.shape
        m = r.shape[-2]
        dt = w.dtype
        sd = _stat_dtype(dt)
        eta = step_rep.to(sd)
        kap = step_x.to(sd)
        r_s = r * scale
        blocks = _blocks(B, H, N, m, w.device)
        whole = len(blocks) == 1
        dw = None if whole else _like_w(w)
        dr = torch.empty(r.shape, device=r.device, dtype=r.dtype)
        deta = torch.zeros(H, device=w.device, dtype=sd)
        dkap = torch.zeros(H, device=w.device, dtype=sd)
        for idx, batched in blocks:
            hs = idx[1]
            wb, rsb, gb = w[idx], r_s[idx], grad[idx]
            etab, kapb = eta[hs], kap[hs]
            zb, qb, pb, cb = z[idx], q[idx], p[idx], c[idx]
            a = _logits(rsb, wb).sub_(lse[idx].unsqueeze(-1)).exp_()      # A, float32 (…, m, N)
            a_dt = a if dt == sd else a.to(dt)
            if dt != sd and wb.device.type == 'cpu':
                ag = torch.matmul(a, gb.to(sd))       # A G in float32: ∂κ = Σ C⊙AG cancels, bf16 rounding shows
            else:
                ag = torch.matmul(a_dt, gb).to(sd)                       # A G (…, m, d)
            red = (0, 2, 3) if batched else (1, 2)
            dkap[hs] += (cb * ag).sum(red)
            dcu = kapb * ag                                               # ∂C
            dp = torch.matmul(dcu, qb.transpose(-2, -1))
            dl = pb * (dp - (dp * pb).sum(-1, keepdim=True))
            dq = torch.matmul(pb.transpose(-2, -1), dcu)
            dq = dq + scale * (torch.matmul(dl, qb) + torch.matmul(dl.transpose(-2, -1), qb))
            deta[hs] += (dq * zb).sum(red)
            dz = etab * dq
            ck = kapb * cb
            dd = (ck * ag).sum(-1, keepdim=True) + (dz * zb).sum(-1, keepdim=True)   # rowsum(∂A ⊙ A)
            da = torch.matmul(ck.to(dt), gb.transpose(-2, -1))
            dz_dt = dz.to(dt)
            if dt == sd:
                da = da.baddbmm_(dz_dt, wb.transpose(-2, -1)) if not batched else da + torch.matmul(dz_dt, wb.transpose(-2, -1))
                ds = da.sub_(dd).mul_(a)                                  # ∂S (…, m, N)
            else:
                da = da.to(sd) + torch.matmul(dz_dt, wb.transpose(-2, -1)).to(sd)
                ds = da.sub_(dd).mul_(a).to(dt)
            dr[idx] = (dq + scale * torch.matmul(ds, wb).to(sd)).to(dr.dtype)
            if batched:
                dwb = torch.matmul(a_dt.transpose(-2, -1), dz_dt) + scale * torch.matmul(ds.transpose(-2, -1), r[idx])
                if whole:
                    dw = dwb
                else:
                    dw[idx] = dwb
            else:
                dwb = dw[idx]
                torch.bmm(a_dt.transpose(-2, -1), dz_dt, out=dwb)
                dwb.baddbmm_(ds.transpose(-2, -1), r[idx], alpha=scale)
        return (dw, dr, deta.view(step_rep.shape).to(step_rep.dtype), dkap.view(step_x.shape).to(step_x.dtype),
                None, None)


@register_notrace_function
def _cb_apply(backend: str, w: torch.Tensor, r: torch.Tensor, step_rep: torch.Tensor, step_x: torch.Tensor,
              scale: float) -> torch.Tensor:
    """FX leaf: picks the extraction kernel from device / dtype (a data-dependent decision) and applies the
    memory-saving contract-and-broadcast."""
    if backend == 'fused':
        impl = 'fused'
    else:
        impl = None
        if backend == 'xformers':
            impl = _probe('xformers', w.device, w.dtype, w.shape[-1])
        if impl is None:
            impl = _probe('sdpa', w.device, w.dtype, w.shape[-1])
        if impl == 'explicit':
            impl = 'fused'
    if step_rep.dim() != 3 or step_x.dim() != 3:
        raise ValueError('CBSA fused backends expect step_rep / step_x of shape (H, 1, 1).')
    return _ContractBroadcast.apply(w, r, step_rep, step_x, scale, impl)


torch.fx.wrap('_cb_apply')


def fused_contract_and_broadcast(backend: str, w, r, step_rep, step_x, scale: float) -> torch.Tensor:
    """w: (B, H, N, d) tokens, r: (B, H, m, d) Q_ini -> (B, H, N, d), same result as ``CBSA.contract_and_broadcast``.

    The result has w's memory layout, so ``out.transpose(1, 2).reshape(B, N, C)`` is a view when w came from the
    usual ``qkv(x).reshape(B, N, H, d).transpose(1, 2)``.
    """
    if backend not in ('fused', 'sdpa', 'xformers'):
        raise ValueError(f'Unknown fused CBSA backend {backend!r}; choose one of {BACKENDS[1:]}.')
    return _cb_apply(backend, w, r, step_rep, step_x, scale)
