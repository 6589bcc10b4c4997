"""The fused contract-and-broadcast: one autograd function for CBSA's extraction, contraction and broadcast. Chosen
by ``backends.py``; it computes what ``CBSA.contract_and_broadcast`` (the reference) computes, to ~1e-7 in float32,
but keeps for backward only W, Q_ini, the per-representative log-sum-exp and m×d / m×m tensors, and rebuilds
A = exp(s·Q_ini Wᵀ − lse) blockwise: the m×N probabilities are never stored.

Gradients (per head, A = softmax_N(s·R Wᵀ), Z = A W, Q = R + ηZ, P = softmax(s·Q Qᵀ), C = P Q, out = κ Aᵀ C,
G = ∂L/∂out):

    AG = A G;  ∂κ = Σ C⊙AG;  ∂C = κ AG
    ∂Q = Pᵀ∂C + s(∂L Q + ∂Lᵀ Q),  ∂L = P ⊙ (∂C Qᵀ − rowsum(∂C Qᵀ ⊙ P))
    ∂η = Σ ∂Q⊙Z;  ∂Z = η ∂Q;  ∂A = κ C Gᵀ + ∂Z Wᵀ
    D = rowsum(∂A ⊙ A) = rowsum(κC ⊙ AG) + rowsum(∂Z ⊙ Z)            (no m×N reduction needed)
    ∂S = A ⊙ (∂A − D);  ∂R = ∂Q + s ∂S W;  ∂W = Aᵀ ∂Z + s ∂Sᵀ R

On CPU the work runs in cache-sized blocks: a few batch elements (their W copied once to (b, H, N, d), so that the
batched products do not each copy it again), or one batch element and a group of heads (strided views of W, no copy).
On GPU and under torch.compile: one batched block. CBSA passes ``pool`` so that the representatives Q_ini are
pooled from each block of W while it is in cache and ∂Q_ini is pooled back into the same block of ∂W (a reshape and a
mean when the windows are equal, adaptive pooling otherwise): no N-wide pooling pass, no separate gradient sum.
"""
import os
from typing import List, Tuple

import torch

from .representatives import equal_windows, pool_representatives, pooled_tokens

__all__ = ['ContractBroadcast', 'block_budget_bytes', 'LSE_IMPLS']

# size of one block's m×N logits on CPU: small enough to stay in cache while it is reused
_BLOCK_BYTES = int(os.environ.get('TIMM_CBSA_BLOCK_BYTES', str(4 << 20)))

# extraction kernels returning (A W, log-sum-exp), filled in by backends.py: name -> fn(q, k, v, scale)
LSE_IMPLS = {}


def block_budget_bytes() -> int:
    return _BLOCK_BYTES


def _stat_dtype(dt: torch.dtype) -> torch.dtype:
    """Softmax statistics and the small m×d / m×m tensors: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _logits(r_s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s·R Wᵀ in statistics precision (float16 is promoted before the product, like the eager path)."""
    sd = _stat_dtype(w.dtype)
    if w.dtype == torch.float16:
        return torch.matmul(r_s.to(sd), w.to(sd).transpose(-2, -1))
    return torch.matmul(r_s, w.transpose(-2, -1)).to(sd)


def _blocks(B: int, H: int, N: int, m: int, device: torch.device) -> List[Tuple[tuple, bool]]:
    """Index blocks ``(idx, batched)`` over (B, H). CPU: blocks whose m×N logits fit the budget; one batch element
    per block uses 3-D strided products without layout copies, several (small N) batched 4-D products. Elsewhere,
    or under torch.compile: one batched block."""
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


def _block_tokens(w: torch.Tensor, idx: tuple) -> torch.Tensor:
    """W (or ∂out) for one block. Several batch elements of the usual (B, N, H, d)-strided layout are copied once to
    (b, H, N, d) (else every batched product would copy them again); single elements stay strided views."""
    wb = w[idx]
    if wb.dim() == 4 and wb.stride(1) < wb.stride(2):
        wb = wb.contiguous()
    return wb


def _mix_forward(q: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """P = softmax(s·Q Qᵀ), C = P Q (m×m and m×d: negligible cost)."""
    p = torch.matmul(q * scale, q.transpose(-2, -1)).softmax(dim=-1)
    return p, torch.matmul(p, q)


def _mix_backward(dc: torch.Tensor, q: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    """∂Q from ∂C for C = softmax(s·Q Qᵀ) Q."""
    dp = torch.matmul(dc, q.transpose(-2, -1))
    dl = p * (dp - (dp * p).sum(-1, keepdim=True))
    return torch.matmul(p.transpose(-2, -1), dc) + scale * (torch.matmul(dl, q) + torch.matmul(dl.transpose(-2, -1), q))


def _pool_adjoint_add_(dwb: torch.Tensor, drb: torch.Tensor, wb: torch.Tensor, pool: tuple) -> None:
    """dwb += poolᵀ(∂Q_ini) for one block, in place (while the block is in cache); the adjoint of
    ``pool_representatives(wb, *pool)``."""
    grid, (rh, rw), legacy = pool
    target = pooled_tokens(dwb, grid, legacy)                                   # (…, H_p, W_p, d) view of ∂W
    if equal_windows(grid, (rh, rw)):
        kh, kw = grid[0] // rh, grid[1] // rw
        g = (drb / (kh * kw)).unflatten(-2, (rh, rw)).unsqueeze(-2).unsqueeze(-4)      # (…, r_h, 1, r_w, 1, d)
        target.unflatten(-3, (rh, kh)).unflatten(-2, (rw, kw)).add_(g)
        return
    t = pooled_tokens(wb, grid, legacy)
    x = t.flatten(0, -4) if t.dim() > 4 else t
    g = drb.reshape((-1, rh, rw, drb.shape[-1])).movedim(-1, -3)
    full = torch.ops.aten._adaptive_avg_pool2d_backward(g, x.movedim(-1, -3))          # (L, d, H_p, W_p)
    target.add_(full.movedim(-3, -1).reshape(target.shape))


class ContractBroadcast(torch.autograd.Function):
    """(w, r, η, κ) -> κ·Aᵀ C per head, (B, H, N, d) with w's memory layout; A rebuilt from the log-sum-exp.

    ``pool``: None (Q_ini is the input ``r``), or ((H_p, W_p), (r_h, r_w), legacy) and ``r`` None: Q_ini is
    ``pool_representatives`` of W, computed block by block inside, and its gradient goes back into ∂W there (no
    N-wide pooling passes)."""

    @staticmethod
    def forward(ctx, w, r, step_rep, step_x, scale: float, lse_impl: str, pool=None):
        B, H, N, d = w.shape
        m = r.shape[-2] if pool is None else pool[1][0] * pool[1][1]
        dt, sd = w.dtype, _stat_dtype(w.dtype)
        eta, kap = step_rep.to(sd), step_x.to(sd)
        blocks = _blocks(B, H, N, m, w.device)
        whole = len(blocks) == 1
        out = None if whole else _like_w(w)
        lse = torch.empty(B, H, m, device=w.device, dtype=sd)
        z = torch.empty(B, H, m, d, device=w.device, dtype=sd)
        q, c = torch.empty_like(z), torch.empty_like(z)
        p = torch.empty(B, H, m, m, device=w.device, dtype=sd)
        if pool is not None:
            r = torch.empty(B, H, m, d, device=w.device, dtype=dt)
        for idx, batched in blocks:
            hs = idx[1]
            wb = _block_tokens(w, idx)
            if pool is None:
                rb = r[idx]
            else:
                rb = pool_representatives(wb, *pool) if batched else pool_representatives(wb[None], *pool)[0]
                r[idx] = rb
            if lse_impl == 'fused':
                s = _logits(rb * scale, wb)                                # (…, m, N) statistics precision
                mx = s.amax(dim=-1, keepdim=True)
                e = s.sub_(mx).exp_()                                      # unnormalised: exp(s − max)
                ssum = e.sum(dim=-1, keepdim=True)
                lse_b = mx + ssum.log()
                inv = ssum.reciprocal()
                e_dt = e if dt == sd else e.to(dt)
                zb = torch.matmul(e_dt, wb).to(sd) * inv                  # A W, normalisation folded into m×d
            else:
                zb, lse_b = LSE_IMPLS[lse_impl](rb, wb, wb, scale)        # SDPA / xformers: A W and log-sum-exp
                zb = zb.to(sd)
                lse_b = lse_b.unsqueeze(-1)
                e = _logits(rb * scale, wb).sub_(lse_b).exp_()            # A itself (normalised)
                e_dt = e if dt == sd else e.to(dt)
                inv = None
            qb = rb.to(sd) + eta[hs] * zb
            pb, cb = _mix_forward(qb, scale)
            ck = kap[hs] * cb if inv is None else kap[hs] * cb * inv     # κ·C (and 1/Σ for the unnormalised rows)
            lse[idx] = lse_b.squeeze(-1)
            z[idx], q[idx], p[idx], c[idx] = zb, qb, pb, cb
            if whole:
                out = torch.matmul(e_dt.transpose(-2, -1), ck.to(dt))
            elif batched:
                out[idx] = torch.matmul(e_dt.transpose(-2, -1), ck.to(dt))
            else:
                torch.bmm(e_dt.transpose(-2, -1), ck.to(dt), out=out[idx])
        ctx.save_for_backward(w, r, step_rep, step_x, lse, z, q, p, c)
        ctx.scale, ctx.pool = scale, pool
        return out

    @staticmethod
    def backward(ctx, grad):
        w, r, step_rep, step_x, lse, z, q, p, c = ctx.saved_tensors
        scale, pool = ctx.scale, ctx.pool
        B, H, N, d = w.shape
        m = r.shape[-2]
        dt, sd = w.dtype, _stat_dtype(w.dtype)
        eta, kap = step_rep.to(sd), step_x.to(sd)
        blocks = _blocks(B, H, N, m, w.device)
        whole = len(blocks) == 1
        dw = None if whole else _like_w(w)
        dr = torch.empty(r.shape, device=r.device, dtype=r.dtype) if pool is None else None
        deta = torch.zeros(H, device=w.device, dtype=sd)
        dkap = torch.zeros(H, device=w.device, dtype=sd)
        for idx, batched in blocks:
            hs = idx[1]
            wb, rb, gb = _block_tokens(w, idx), r[idx], _block_tokens(grad, idx)
            zb, qb, pb, cb = z[idx], q[idx], p[idx], c[idx]
            red = tuple(i for i in range(cb.dim()) if i != cb.dim() - 3)   # every dim but the head's
            a = _logits(rb * scale, wb).sub_(lse[idx].unsqueeze(-1)).exp_()      # A rebuilt (…, m, N)
            a_dt = a if dt == sd else a.to(dt)
            if dt != sd and wb.device.type == 'cpu':
                ag = torch.matmul(a, gb.to(sd))       # A G in float32: ∂κ = Σ C⊙AG cancels, bf16 rounding shows
            else:
                ag = torch.matmul(a_dt, gb).to(sd)                        # A G (…, m, d)
            dkap[hs] += (cb * ag).sum(red)
            dq = _mix_backward(kap[hs] * ag, qb, pb, scale)
            deta[hs] += (dq * zb).sum(red)
            dz = eta[hs] * dq
            ck = kap[hs] * cb
            dd = (ck * ag).sum(-1, keepdim=True) + (dz * zb).sum(-1, keepdim=True)   # rowsum(∂A ⊙ A)
            da = torch.matmul(ck.to(dt), gb.transpose(-2, -1))
            dz_dt = dz.to(dt)
            if dt == sd:
                if da.dim() == 3:
                    da.baddbmm_(dz_dt, wb.transpose(-2, -1))
                else:
                    da.add_(torch.matmul(dz_dt, wb.transpose(-2, -1)))
                ds = da.sub_(dd).mul_(a)                                  # ∂S (…, m, N)
            else:
                da = da.to(sd) + torch.matmul(dz_dt, wb.transpose(-2, -1)).to(sd)
                ds = da.sub_(dd).mul_(a).to(dt)
            drb = (dq + scale * torch.matmul(ds, wb).to(sd)).to(r.dtype)    # ∂Q_ini (…, m, d)
            if pool is None:
                dr[idx] = drb
            if batched:
                dwb = torch.matmul(a_dt.transpose(-2, -1), dz_dt) + scale * torch.matmul(ds.transpose(-2, -1), rb)
                if pool is not None:
                    _pool_adjoint_add_(dwb, drb, wb, pool)
                if whole:
                    dw = dwb
                else:
                    dw[idx] = dwb
            else:
                dwb = dw[idx]
                torch.bmm(a_dt.transpose(-2, -1), dz_dt, out=dwb)
                dwb.baddbmm_(ds.transpose(-2, -1), rb, alpha=scale)
                if pool is not None:
                    _pool_adjoint_add_(dwb, drb, wb, pool)
        return (dw, dr, deta.view(step_rep.shape).to(step_rep.dtype), dkap.view(step_x.shape).to(step_x.dtype),
                None, None, None)
