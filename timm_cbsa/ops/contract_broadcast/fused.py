"""The fused contract-and-broadcast: one autograd function for CBSA's extraction, contraction and broadcast (the
``'fused'``, ``'sdpa'`` and ``'xformers'`` implementations; the last two hand the extraction to ``lse.py``'s kernels).
It computes what ``naive.py`` (the reference) computes, to ~1e-7 in float32,
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
Inside a block every product is a 3-D bmm over the block's (batch, head) matrices; the m×N logits / ∂A and the copies
live in scratch buffers allocated once per call, and the N×d results are written straight into the strided output
and ∂W. On GPU and under torch.compile: one batched block. CBSA passes ``pool`` so that the representatives Q_ini are
pooled from each block of W while it is in cache and ∂Q_ini is pooled back into the same block of ∂W (a reshape and a
mean when the windows are equal, two small averaging matrices otherwise): no N-wide pooling pass, no separate gradient
sum. ``lse_impl``: 'fused' (the explicit softmax, always runs) or an ``lse.LSE_FUNCTIONS`` name.
"""
import contextlib
import os
from typing import List, Optional, Tuple

import torch

from .lse import LSE_FUNCTIONS
from .pooling import PoolSpec, equal_windows, num_representatives, pool_adjoint, pool_representatives, pooled_tokens

__all__ = ['ContractBroadcast', 'no_autocast']

# size of one block's m×N logits on CPU: small enough to stay in cache while it is reused
_BLOCK_BYTES = int(os.environ.get('TIMM_CBSA_BLOCK_BYTES', str(4 << 20)))


def no_autocast(device_type: str):
    """Autocast off for ``device_type`` (a no-op where autocast does not exist, e.g. the meta device)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _stat_dtype(dt: torch.dtype) -> torch.dtype:
    """Softmax statistics and the small m×d / m×m tensors: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _logits(r_s: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s·R Wᵀ (L, m, N) in statistics precision (float16 is promoted before the product, like the eager path); written
    into ``out`` (a reused scratch block, statistics precision) when given."""
    sd = _stat_dtype(w.dtype)
    if w.dtype == torch.float16:
        return torch.bmm(r_s.to(sd), w.to(sd).transpose(-2, -1), out=out)
    if w.dtype != sd:
        return torch.bmm(r_s, w.transpose(-2, -1)).to(sd)
    return torch.bmm(r_s, w.transpose(-2, -1), out=out)


def _blocks(B: int, H: int, N: int, m: int, device: torch.device) -> List[Tuple[tuple, bool]]:
    """Index blocks ``(idx, batched)`` over (B, H). CPU: blocks whose m×N logits fit the budget; one batch element
    per block uses strided views of W without layout copies, several (small N) a (b, H, N, d) copy. Elsewhere, or
    under torch.compile: one batched block."""
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


class _Scratch:
    """Per-call buffers for the CPU blocks, sliced for each block instead of allocating fresh multi-MB tensors per
    block (on CPU a fresh large tensor is new pages, paid for in first-touch faults)."""

    def __init__(self, lmax: int, device: torch.device):
        self.lmax, self.device, self._bufs = lmax, device, {}

    def get(self, name: str, L: int, shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = torch.empty((self.lmax,) + tuple(shape), dtype=dtype, device=self.device)
        return buf[:L]


def _matrices(idx: tuple, batched: bool, B: int, H: int) -> int:
    """How many (batch, head) matrices a block holds."""
    return len(range(B)[idx[0]]) * H if batched else len(range(H)[idx[1]])


def _scratch(blocks, B: int, H: int, device: torch.device) -> Optional[_Scratch]:
    """Buffers reused across the blocks of one call; None for a single block (nothing to reuse)."""
    if len(blocks) == 1:
        return None
    return _Scratch(max(_matrices(idx, batched, B, H) for idx, batched in blocks), device)


def _prepare(w: torch.Tensor, m: int, step_rep: torch.Tensor, step_x: torch.Tensor):
    """What forward and backward both start from: the statistics dtype, η and κ as (H, 1, 1) in it, the blocks and
    their scratch buffers."""
    B, H, N, _ = w.shape
    sd = _stat_dtype(w.dtype)
    blocks = _blocks(B, H, N, m, w.device)
    eta, kap = step_rep.to(sd).reshape(H, 1, 1), step_x.to(sd).reshape(H, 1, 1)
    return sd, eta, kap, blocks, _scratch(blocks, B, H, w.device)


def _block_tokens(w: torch.Tensor, idx: tuple, scratch: Optional[_Scratch] = None, name: str = 'w'
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """W (or ∂out) for one block, as (4-D (b, h, N, d) for pooling and the LSE kernels, 3-D (L, N, d) for the
    products). Several batch elements of the usual (B, N, H, d)-strided layout are copied once (into scratch when
    given), else every batched product would copy them again; a single element's heads stay strided views."""
    wb = w[idx]
    if wb.dim() == 3:
        return wb[None], wb
    if wb.stride(1) < wb.stride(2):
        if scratch is not None:
            b, h, N, d = wb.shape
            wb = scratch.get(name, b * h, (N, d), wb.dtype).view(b, h, N, d).copy_(wb)
        else:
            wb = wb.contiguous()
    return wb, wb.flatten(0, 1)


def _per_matrix(x: torch.Tensor, idx: tuple, batched: bool, nb: int) -> torch.Tensor:
    """(H, 1, 1) per-head values -> (L, 1, 1) for the block's matrices."""
    return x.repeat(nb, 1, 1) if batched else x[idx[1]]


def _head_sum_(acc: torch.Tensor, x: torch.Tensor, idx: tuple, batched: bool) -> None:
    """acc (H,) += the block's per-matrix (L,) values summed per head."""
    if batched:
        acc += x.view(-1, acc.shape[0]).sum(0)
    else:
        acc[idx[1]] += x


def _write_tokens(dst: torch.Tensor, idx: tuple, fn) -> None:
    """dst[idx] (a (…, N, d) block of a strided (B, H, N, d) tensor) = fn(rows, out): the bmm writes straight into
    the strided destination, one batch element at a time for batched blocks."""
    blk = dst[idx]
    if blk.dim() == 3:
        fn(slice(None), blk)
        return
    h = blk.shape[1]
    for j in range(blk.shape[0]):
        fn(slice(j * h, (j + 1) * h), blk[j])


def _mix_forward(q: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """P = softmax(s·Q Qᵀ), C = P Q (m×m and m×d: negligible cost)."""
    p = torch.matmul(q * scale, q.transpose(-2, -1)).softmax(dim=-1)
    return p, torch.matmul(p, q)


def _mix_backward(dc: torch.Tensor, q: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    """∂Q from ∂C for C = softmax(s·Q Qᵀ) Q."""
    dp = torch.matmul(dc, q.transpose(-2, -1))
    dl = p * (dp - (dp * p).sum(-1, keepdim=True))
    return torch.matmul(p.transpose(-2, -1), dc) + scale * (torch.matmul(dl, q) + torch.matmul(dl.transpose(-2, -1), q))


def _pool_adjoint_add_(dwb: torch.Tensor, drb: torch.Tensor, pool: PoolSpec) -> None:
    """dwb += poolᵀ(∂Q_ini) for one block, in place (while the block is in cache); the adjoint of
    ``pool_representatives(wb, pool)``."""
    target = pooled_tokens(dwb, pool)                                                    # (…, H_p, W_p, d) view of ∂W
    if equal_windows(pool):   # add into the window view: no (…, H_p, W_p, d) temporary
        (gh, gw), (rh, rw) = pool.grid, pool.rep_grid
        kh, kw = gh // rh, gw // rw
        g = (drb / (kh * kw)).unflatten(-2, (rh, rw)).unsqueeze(-2).unsqueeze(-4)      # (…, r_h, 1, r_w, 1, d)
        target.unflatten(-3, (rh, kh)).unflatten(-2, (rw, kw)).add_(g)
        return
    target.add_(pool_adjoint(drb.reshape(target.shape[:-3] + drb.shape[-2:]), pool))


class ContractBroadcast(torch.autograd.Function):
    """(w, r, η, κ) -> κ·Aᵀ C per head, (B, H, N, d) with w's memory layout; A rebuilt from the log-sum-exp.

    ``pool``: None (Q_ini is the input ``r``), or a ``PoolSpec`` and ``r`` None: Q_ini is
    ``pool_representatives`` of W, computed block by block inside, and its gradient goes back into ∂W there (no
    N-wide pooling passes). Inside a block every tensor is 3-D, (L, …) over the block's L (batch, head) matrices."""

    @staticmethod
    def forward(ctx, w, r, step_rep, step_x, scale: float, lse_impl: str, pool=None):
        B, H, N, d = w.shape
        ctx.empty = w.numel() == 0
        if ctx.empty:   # an empty batch: nothing to compute, zero gradients
            ctx.save_for_backward(w, r, step_rep, step_x)
            return _like_w(w)
        m = r.shape[-2] if pool is None else num_representatives(pool)
        dt = w.dtype
        sd, eta, kap, blocks, scratch = _prepare(w, m, step_rep, step_x)
        out = None if scratch is None else _like_w(w)
        lse = torch.empty(B, H, m, device=w.device, dtype=sd)
        z = torch.empty(B, H, m, d, device=w.device, dtype=sd)
        q, c = torch.empty_like(z), torch.empty_like(z)
        p = torch.empty(B, H, m, m, device=w.device, dtype=sd)
        if pool is not None:
            r = torch.empty(B, H, m, d, device=w.device, dtype=dt)
        for idx, batched in blocks:
            w4, wb = _block_tokens(w, idx, scratch)                       # (b, h, N, d), (L, N, d)
            L, nb = wb.shape[0], w4.shape[0]
            if pool is not None:
                r[idx] = pool_representatives(w4, pool).view(r[idx].shape)
            r4 = r[idx] if batched else r[idx][None]
            rb = r4.flatten(0, 1)                                          # Q_ini (L, m, d)
            eta_b, kap_b = _per_matrix(eta, idx, batched, nb), _per_matrix(kap, idx, batched, nb)
            buf = None if scratch is None else scratch.get('s', L, (m, N), sd)
            if lse_impl == 'fused':
                s = _logits(rb * scale, wb, buf)                           # (L, m, N) statistics precision
                mx = s.amax(dim=-1, keepdim=True)
                e = s.sub_(mx).exp_()                                      # unnormalised: exp(s − max)
                ssum = e.sum(dim=-1, keepdim=True)
                lse_b = mx + ssum.log()
                inv = ssum.reciprocal()
                e_dt = e if dt == sd else e.to(dt)
                zb = torch.bmm(e_dt, wb).to(sd) * inv                     # A W, normalisation folded into m×d
            else:
                zb4, lse4 = LSE_FUNCTIONS[lse_impl](r4, w4, w4, scale)        # SDPA / xformers: A W and log-sum-exp
                zb, lse_b = zb4.flatten(0, 1).to(sd), lse4.flatten(0, 1).unsqueeze(-1)
                e = _logits(rb * scale, wb, buf).sub_(lse_b).exp_()       # A itself (normalised)
                e_dt = e if dt == sd else e.to(dt)
                inv = None
            qb = rb.to(sd) + eta_b * zb
            pb, cb = _mix_forward(qb, scale)
            ck = (kap_b * cb if inv is None else kap_b * cb * inv).to(dt)   # κ·C (and 1/Σ for the unnormalised rows)
            for t, v in ((lse, lse_b.squeeze(-1)), (z, zb), (q, qb), (p, pb), (c, cb)):
                t[idx] = v.reshape(t[idx].shape)
            if scratch is None:
                out = torch.bmm(e_dt.transpose(-2, -1), ck).view(B, H, N, d)
            else:
                _write_tokens(out, idx, lambda j, o: torch.bmm(e_dt[j].transpose(-2, -1), ck[j], out=o))
        ctx.save_for_backward(w, r, step_rep, step_x, lse, z, q, p, c)
        ctx.scale, ctx.pool = scale, pool
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.empty:
            w, r, step_rep, step_x = ctx.saved_tensors
            dr = None if r is None else torch.zeros_like(r)
            return torch.zeros_like(w), dr, torch.zeros_like(step_rep), torch.zeros_like(step_x), None, None, None
        with no_autocast(grad.device.type):   # the backward does not depend on an enclosing autocast region
            return ContractBroadcast._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        w, r, step_rep, step_x, lse, z, q, p, c = ctx.saved_tensors
        scale, pool = ctx.scale, ctx.pool
        B, H, N, d = w.shape
        m = r.shape[-2]
        dt = w.dtype
        sd, eta, kap, blocks, scratch = _prepare(w, m, step_rep, step_x)
        dw = None if scratch is None else _like_w(w)
        dr = torch.empty(r.shape, device=r.device, dtype=r.dtype) if pool is None else None
        deta = torch.zeros(H, device=w.device, dtype=sd)
        dkap = torch.zeros(H, device=w.device, dtype=sd)
        for idx, batched in blocks:
            w4, wb = _block_tokens(w, idx, scratch)                       # (b, h, N, d), (L, N, d)
            _, gb = _block_tokens(grad, idx, scratch, 'g')
            L, nb = wb.shape[0], w4.shape[0]
            rb = r[idx].reshape(L, m, d)
            zb, qb, pb, cb = (t[idx].reshape(L, m, -1) for t in (z, q, p, c))
            eta_b, kap_b = _per_matrix(eta, idx, batched, nb), _per_matrix(kap, idx, batched, nb)
            a = _logits(rb * scale, wb, None if scratch is None else scratch.get('a', L, (m, N), sd))
            a = a.sub_(lse[idx].reshape(L, m, 1)).exp_()                  # A rebuilt (L, m, N)
            a_dt = a if dt == sd else a.to(dt)
            if dt != sd and wb.device.type == 'cpu':
                ag = torch.bmm(a, gb.to(sd))          # A G in float32: ∂κ = Σ C⊙AG cancels, bf16 rounding shows
            else:
                ag = torch.bmm(a_dt, gb).to(sd)                           # A G (L, m, d)
            _head_sum_(dkap, (cb * ag).sum((1, 2)), idx, batched)
            dq = _mix_backward(kap_b * ag, qb, pb, scale)
            _head_sum_(deta, (dq * zb).sum((1, 2)), idx, batched)
            dz = eta_b * dq
            ck = kap_b * cb
            dd = (ck * ag).sum(-1, keepdim=True) + (dz * zb).sum(-1, keepdim=True)   # rowsum(∂A ⊙ A)
            dz_dt = dz.to(dt)
            if dt == sd:
                buf = None if scratch is None else scratch.get('da', L, (m, N), sd)
                da = torch.bmm(ck, gb.transpose(-2, -1), out=buf)
                ds = da.baddbmm_(dz_dt, wb.transpose(-2, -1)).sub_(dd).mul_(a)   # ∂S (L, m, N)
            else:
                da = torch.bmm(ck.to(dt), gb.transpose(-2, -1)).to(sd) + torch.bmm(dz_dt, wb.transpose(-2, -1)).to(sd)
                ds = da.sub_(dd).mul_(a).to(dt)
            drb = (dq + scale * torch.bmm(ds, wb).to(sd)).to(r.dtype)     # ∂Q_ini (L, m, d)
            if pool is None:
                dr[idx] = drb.reshape(dr[idx].shape)

            def dw_rows(j, o):                                            # ∂W = Aᵀ ∂Z + s ∂Sᵀ Q_ini
                torch.bmm(a_dt[j].transpose(-2, -1), dz_dt[j], out=o)
                o.baddbmm_(ds[j].transpose(-2, -1), rb[j], alpha=scale)

            if scratch is None:
                dw = torch.bmm(a_dt.transpose(-2, -1), dz_dt).baddbmm_(ds.transpose(-2, -1), rb, alpha=scale)
                dw = dw.view(B, H, N, d)
            else:
                _write_tokens(dw, idx, dw_rows)
            if pool is not None:
                dwb = dw[idx] if batched else dw[idx][None]
                _pool_adjoint_add_(dwb, drb.view(nb, -1, m, d), pool)
        return (dw, dr, deta.view(step_rep.shape).to(step_rep.dtype), dkap.view(step_x.shape).to(step_x.dtype),
                None, None, None)
