"""Triton kernels for CBSA's contract-and-broadcast core (see ``function.py`` for the launches and the autograd
wiring, ``../naive.py`` for the plain PyTorch twin they are tested against).

Layout. Program axis 0 is the (batch, head) pair ``pid_bh`` (grid axis 0 has no 65,535 limit), axis 1 a token block or a
chunk of token blocks, axis 2 (where present) a block of representatives. W (N, d) tokens and G = ∂out are read through
their strides, with int64 base offsets. Everything m×d or smaller lives in ACC-dtype buffers of shape (B·H, M_PAD,
D_PAD): m is padded to 16, 64 or 128 and d to 32, 64 or 128 (``M_PAD``, ``D_PAD``, the only shape constexprs: ``M`` and
``D`` are runtime masks), padded rows and columns are zero. Q_ini is kept there in ACC holding values already rounded to
the token dtype, so the m×m kernels do not depend on the token dtype. The m×N matrix A = softmax_N(s·Q_ini Wᵀ) never
reaches global memory: every token kernel rebuilds its block from Q_ini, W and the per-representative log-sum-exp.

Blocks. The token kernels take a representative block ``BM`` and a d chunk ``DK`` (constexprs; BM = M_PAD and
DK = D_PAD: whole tiles). Products over d then run in chunks of DK columns loaded from memory (``_tok_rep``), and the
m-wide ones by blocks of BM representatives: a program per block where the result is per representative (extraction,
A G, ∂S W), a loop over blocks where it is per token (broadcast, ∂W). Whole tiles need no recomputation; blocks hold
far fewer registers (float32 'ieee' products, which run as scalar FMAs with whole-K operand rows per thread, and
m = 128 on sm_80 spill otherwise). ``function.TABLE`` picks, per target and padded size, the first spill-free choice.

Precision. Token products (A·W, W·Q_iniᵀ, …) take the token dtype DT with ``PREC`` ('ieee' or 'tf32' for float32,
following torch's TF32 setting; ignored for bf16 / fp16) and accumulate in ACC (float32; float64 for float64 tokens,
interpreter only). The m×m algebra runs on ACC operands with ``MM_PREC`` ('tf32x3' for float32: three TF32
tensor-core products, float32-accurate to ~1e-6 without the registers of 'ieee' scalar FMAs; 'ieee' for float64), in
row blocks of BM = 16 representatives with the d contraction in chunks of DK columns (``_gram``), so no m×m or long-K
tile lives in registers. Pooling and its adjoint multiply exact 0/1 memberships with the tokens' dtype (float32: two
TF32 products of the high and low bits, ``_dot_01``).

Pooling (``PoolSpec``): the patch tokens are W[P0 : P0 + GH·GW] on a (GH, GW) grid, representative i = (i // RW,
i % RW) averages the adaptive window rows [⌊a·GH/RH⌋, ⌈(a+1)·GH/RH⌉) × columns likewise (equal windows are the case
RH | GH, RW | GW). A token block's 0/1 window membership is built from these bounds, so pooling is a product
Σ membership·W (exact 0/1 weights) divided by the window area, and its adjoint a product membershipᵀ·(∂Q_ini / area).

Kernels (forward, then backward). Token passes that reduce over N run on SPLITS chunks per (batch, head) and write
per-chunk partials that are merged in a fixed order: no atomics anywhere, so every result is bitwise reproducible.
    _pool_partial       (B·H, SPLITS)  Σ over a chunk of the window-averaged tokens → partial Q_ini.
    _extract_partial    (B·H, SPLITS, ⌈m/BM⌉)  logits s·Q_ini Wᵀ, online log-sum-exp, A W (unnormalised) → partial max,
                                                Σexp, Σexp·W.
    _combine_contract   (B·H,)         merges the partials → lse, Z = A W, Q = Q_ini + ηZ; then, by row blocks of
                                       BM representatives, C = softmax(s·Q Qᵀ) Q with an online softmax (its
                                       log-sum-exp ``lse_p`` is kept; the m×m P is rebuilt in backward).
    _broadcast_fwd      (B·H, ⌈N/BLOCK_N⌉)  out = κ·exp(s·W Q_iniᵀ − lse) C: the only N×d write.
    _ag_partial         (B·H, SPLITS, ⌈m/BM⌉)  A G over a chunk.
    _contract_bwd       (B·H,)         merges A G, then the m×m backward by row blocks (formulas in
                                       ``../fused.py``; rowsum(∂C Qᵀ ⊙ P) = ∂C·C needs no m×m reduction):
                                       ∂Q, ∂Z = η∂Q, D = rowsum(∂A ⊙ A), this (batch, head)'s ∂η and ∂κ terms.
    _broadcast_bwd      (B·H, SPLITS)  ∂S = A ⊙ (κC Gᵀ + ∂Z Wᵀ − D); ∂W = Aᵀ ∂Z + s ∂Sᵀ Q_ini (written);
                                       partial s ∂S W (the token sum of ∂Q_ini). One pass, whole tiles.
    _broadcast_bwd_blocks  the same in two passes with blocks: (B·H, ⌈N/BLOCK_N⌉) ∂W, then (B·H, SPLITS, ⌈m/BM⌉)
                                       the partials of s ∂S W; ∂S is rebuilt in each (a second read of W and G).
    _pool_adjoint       (B·H, ⌈GH·GW/BLOCK_N⌉)  ∂W[patch tokens] += poolᵀ(∂Q_ini).

``EMU_BF16`` (interpreter only): the tokens are float32 tensors holding bfloat16 values and every cast to the token
dtype rounds to bfloat16 in float32 (round to nearest even), because Triton's interpreter computes bf16 ``tl.dot``
wrongly and truncates float32 → bf16 casts. Compiled kernels never set it.

Only APIs present in Triton 3.6 and 3.8 (tl.dot with input_precision / out_dtype, masked tl.load / tl.store,
tl.debug_barrier, constexpr block sizes and branches, ``do_not_specialize``); the kernels also run under
``TRITON_INTERPRET=1``.
"""
import triton
import triton.language as tl

# runtime integers that are sizes or masks: one compiled kernel for all of their values
_SIZES = ['N', 'H', 'M', 'D', 'CHUNK', 'SPLITS', 'P0', 'GH', 'GW', 'RH', 'RW']


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in _SIZES if n in names])


@triton.jit
def _cast(x, DT: tl.constexpr, EMU_BF16: tl.constexpr):
    """x → the token dtype; under EMU_BF16, x rounded to bfloat16 precision and kept in float32 (NaN kept)."""
    if EMU_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, u.to(tl.float32, bitcast=True), x)
    else:
        return x.to(DT)


@triton.jit
def _program(H):
    """This program's (batch, head) index on grid axis 0 and its batch and head, in int64 (offsets pass 2³¹)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    return pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def _load_tile(ptr, rows, cols, s_row, s_col, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.)


@triton.jit
def _md(ptr, pid_bh, rows, rd, M_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Pointers to rows ``rows`` of the (M_PAD, D_PAD) block of ``pid_bh`` in a (B·H, M_PAD, D_PAD) buffer."""
    return ptr + pid_bh * (M_PAD * D_PAD) + rows[:, None] * D_PAD + rd[None, :]


@triton.jit
def _load_md(ptr, pid_bh, rm, rd, M, M_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """The (M_PAD, D_PAD) block of ``pid_bh``, rows ≥ M read as zero (the m×m kernels write only the row blocks
    that hold representatives)."""
    return tl.load(_md(ptr, pid_bh, rm, rd, M_PAD, D_PAD), mask=(rm < M)[:, None], other=0.)


@triton.jit
def _windows(rm, GH, GW, RH, RW):
    """Window bounds (row lo, row hi, col lo, col hi) of representatives rm (adaptive-average-pooling windows)."""
    a = rm // RW
    c = rm % RW
    return (a * GH // RH, ((a + 1) * GH + RH - 1) // RH, c * GW // RW, ((c + 1) * GW + RW - 1) // RW)


@triton.jit
def _membership(t, t_end, GW, r_lo, r_hi, c_lo, c_hi):
    """(M_PAD, BLOCK_N) True where patch token t (< t_end) lies in the representative's window."""
    y = t // GW
    x = t - y * GW
    ok = (t < t_end)[None, :]
    return (ok & (y[None, :] >= r_lo[:, None]) & (y[None, :] < r_hi[:, None])
            & (x[None, :] >= c_lo[:, None]) & (x[None, :] < c_hi[:, None]))


@triton.jit
def _dot_01(a, b, PREC: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b for a 0/1 matrix a (exact in any dtype). SPLIT (float32 b): two TF32 products of b's high 11 bits and
    the rest, float32-accurate to ~2⁻²¹ on tensor cores without the register cost of 'tf32x3' / 'ieee'."""
    if SPLIT:
        hi = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return (tl.dot(a, hi, input_precision='tf32', out_dtype=ACC)
                + tl.dot(a, b - hi, input_precision='tf32', out_dtype=ACC))
    else:
        return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _inv_area(r_lo, r_hi, c_lo, c_hi, ACC: tl.constexpr):
    return 1. / tl.maximum((r_hi - r_lo) * (c_hi - c_lo), 1).to(ACC)


@_jit
def _pool_partial(
        w_ptr, pq_ptr,
        H, D, CHUNK, P0, GH, GW, RH, RW,
        s_wb, s_wh, s_wn, s_wd,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
        EMU_BF16: tl.constexpr,
):
    """Window averages of the patch tokens [pid_s·CHUNK, (pid_s+1)·CHUNK) → one partial Q_ini (ACC)."""
    pid_bh, b, h = _program(H)
    pid_s = tl.program_id(1)
    ACC = pq_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    r_lo, r_hi, c_lo, c_hi = _windows(rm, GH, GW, RH, RW)
    w_base = w_ptr + b * s_wb + h * s_wh + tl.cast(P0, tl.int64) * s_wn
    acc = tl.zeros([M_PAD, D_PAD], ACC)
    t_start = pid_s * CHUNK
    t_end = tl.minimum(GH * GW, t_start + CHUNK)
    for t0 in range(t_start, t_end, BLOCK_N):
        w = _load_tile(w_base + tl.cast(t0, tl.int64) * s_wn, rn, rd, s_wn, s_wd, t_end - t0, D)
        inside = _membership(t0 + rn, t_end, GW, r_lo, r_hi, c_lo, c_hi)
        acc += _dot_01(inside.to(DT), w, PREC, ACC, DT == tl.float32)
    acc = acc * _inv_area(r_lo, r_hi, c_lo, c_hi, ACC)[:, None]
    tl.store(_md(pq_ptr, tl.cast(pid_s, tl.int64) * tl.num_programs(0) + pid_bh, rm, rd, M_PAD, D_PAD), acc)


@_jit
def _extract_partial(
        w_ptr, r_ptr, pmx_ptr, pss_ptr, pacc_ptr,
        N, H, D, CHUNK, scale,
        s_wb, s_wh, s_wn, s_wd,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr,
        PREC: tl.constexpr, EMU_BF16: tl.constexpr,
):
    """Extraction over the tokens [pid_s·CHUNK, (pid_s+1)·CHUNK) for the representatives [pid_r·BM, (pid_r+1)·BM):
    running max, Σ exp(s − max) and Σ exp(s − max) W."""
    pid_bh, b, h = _program(H)
    pid_s = tl.program_id(1)
    ACC = pmx_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rows = tl.program_id(2) * BM + tl.arange(0, BM)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    w_base = w_ptr + b * s_wb + h * s_wh
    mx = tl.full([BM], float('-inf'), ACC)
    ssum = tl.zeros([BM], ACC)
    acc = tl.zeros([BM, D_PAD], ACC)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(N, n_start + CHUNK)
    for n0 in range(n_start, n_end, BLOCK_N):
        w_tok = w_base + tl.cast(n0, tl.int64) * s_wn
        s = _tok_rep(w_tok, s_wn, s_wd, n_end - n0, r_ptr, 1., pid_bh, rows, M_PAD, D, M_PAD, D_PAD, BLOCK_N, BM, DK,
                     PREC, EMU_BF16, True) * scale                                          # (BM, BLOCK_N)
        s = tl.where((n0 + rn < n_end)[None, :], s, float('-inf'))
        mx_new = tl.maximum(mx, tl.max(s, 1))
        alpha = tl.exp(mx - mx_new)
        e = tl.exp(s - mx_new[:, None])
        ssum = ssum * alpha + tl.sum(e, 1)
        w = _load_tile(w_tok, rn, rd, s_wn, s_wd, n_end - n0, D)                           # (BLOCK_N, D_PAD)
        acc = acc * alpha[:, None] + tl.dot(_cast(e, DT, EMU_BF16), w, input_precision=PREC, out_dtype=ACC)
        mx = mx_new
    row = tl.cast(pid_s, tl.int64) * tl.num_programs(0) + pid_bh
    tl.store(pmx_ptr + row * M_PAD + rows, mx)
    tl.store(pss_ptr + row * M_PAD + rows, ssum)
    tl.store(_md(pacc_ptr, row, rows, rd, M_PAD, D_PAD), acc)


@triton.jit
def _merge_extraction(pmx_ptr, pss_ptr, pacc_ptr, pid_bh, BH, SPLITS, rows, rd,
                      M_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """lse and Z = A W for representatives ``rows``, from the SPLITS partials in a fixed order."""
    mx = tl.load(pmx_ptr + pid_bh * M_PAD + rows)
    ssum = tl.load(pss_ptr + pid_bh * M_PAD + rows)
    acc = tl.load(_md(pacc_ptr, pid_bh, rows, rd, M_PAD, D_PAD))
    for sp in range(1, SPLITS):
        row = tl.cast(sp, tl.int64) * BH + pid_bh
        mx_s = tl.load(pmx_ptr + row * M_PAD + rows)
        mx_new = tl.maximum(mx, mx_s)
        a_old = tl.exp(mx - mx_new)
        a_new = tl.exp(mx_s - mx_new)
        ssum = ssum * a_old + tl.load(pss_ptr + row * M_PAD + rows) * a_new
        acc = acc * a_old[:, None] + tl.load(_md(pacc_ptr, row, rows, rd, M_PAD, D_PAD)) * a_new[:, None]
        mx = mx_new
    return mx + tl.log(ssum), acc / ssum[:, None]


@_jit
def _combine_contract(
        r_ptr, eta_ptr, pmx_ptr, pss_ptr, pacc_ptr,
        lse_ptr, z_ptr, q_ptr, c_ptr, lsep_ptr,
        H, M, D, SPLITS, scale,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, MM_PREC: tl.constexpr,
):
    """Merges the partial extractions into lse and Z = A W, forms Q = Q_ini + ηZ (all stored), then C = P Q with
    P = softmax(s·Q Qᵀ) by row blocks of BM representatives and an online softmax over column blocks; stores C and
    P's log-sum-exp. Padded rows of Z, Q, C are zero; padded columns are masked out of the softmax."""
    pid_bh, _, h = _program(H)
    BH = tl.num_programs(0)
    ACC = lse_ptr.dtype.element_ty
    rb = tl.arange(0, BM)
    rd = tl.arange(0, D_PAD)
    eta = tl.load(eta_ptr + h)
    for j0 in range(0, M, BM):
        rows = j0 + rb
        lse, z = _merge_extraction(pmx_ptr, pss_ptr, pacc_ptr, pid_bh, BH, SPLITS, rows, rd, M_PAD, D_PAD)
        z = tl.where((rows < M)[:, None], z, 0.)                                             # Z = A W
        q = tl.load(_md(r_ptr, pid_bh, rows, rd, M_PAD, D_PAD)) + eta * z                    # Q = Q_ini + ηZ
        tl.store(lse_ptr + pid_bh * M_PAD + rows, lse)
        tl.store(_md(z_ptr, pid_bh, rows, rd, M_PAD, D_PAD), z)
        tl.store(_md(q_ptr, pid_bh, rows, rd, M_PAD, D_PAD), q)
    tl.debug_barrier()                                                                       # Q complete
    for j0 in range(0, M, BM):
        rows = j0 + rb
        mx = tl.full([BM], float('-inf'), ACC)
        ssum = tl.zeros([BM], ACC)
        c = tl.zeros([BM, D_PAD], ACC)
        for i0 in range(0, M, BM):
            cols = i0 + rb
            q_i = tl.load(_md(q_ptr, pid_bh, cols, rd, M_PAD, D_PAD))
            s = _gram(q_ptr, q_ptr, pid_bh, rows, cols, D, M_PAD, D_PAD, BM, DK, MM_PREC, ACC) * scale
            s = tl.where((cols < M)[None, :], s, float('-inf'))
            mx_new = tl.maximum(mx, tl.max(s, 1))
            alpha = tl.exp(mx - mx_new)
            e = tl.exp(s - mx_new[:, None])
            ssum = ssum * alpha + tl.sum(e, 1)
            c = c * alpha[:, None] + tl.dot(e, q_i, input_precision=MM_PREC, out_dtype=ACC)
            mx = mx_new
        c = tl.where((rows < M)[:, None], c / ssum[:, None], 0.)                            # C = P Q
        tl.store(_md(c_ptr, pid_bh, rows, rd, M_PAD, D_PAD), c)
        tl.store(lsep_ptr + pid_bh * M_PAD + rows, mx + tl.log(ssum))


@triton.jit
def _gram(x_ptr, y_ptr, pid_bh, rows, cols, D, M_PAD: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
          DK: tl.constexpr, MM_PREC: tl.constexpr, ACC: tl.constexpr):
    """X[rows] Y[cols]ᵀ (BM, BM) for two (B·H, M_PAD, D_PAD) buffers, the contraction over the D valid columns in
    chunks of DK loaded from memory (a long-K dot operand would be replicated in every warp's registers)."""
    acc = tl.zeros([BM, BM], ACC)
    for k0 in range(0, D, DK):
        kd = k0 + tl.arange(0, DK)
        x = tl.load(x_ptr + pid_bh * (M_PAD * D_PAD) + rows[:, None] * D_PAD + kd[None, :])
        y = tl.load(y_ptr + pid_bh * (M_PAD * D_PAD) + cols[:, None] * D_PAD + kd[None, :])
        acc += tl.dot(x, tl.trans(y), input_precision=MM_PREC, out_dtype=ACC)
    return acc


@triton.jit
def _rebuild_at(w, r, lse, n_ok, m_ok, scale, PREC: tl.constexpr, ACC: tl.constexpr):
    """Aᵀ for one token block, (BLOCK_N, M_PAD): exp(s·W Q_iniᵀ − lse), zero outside the valid tokens and
    representatives."""
    t = tl.dot(w, tl.trans(r), input_precision=PREC, out_dtype=ACC) * scale
    return tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(t - lse[None, :]), 0.)


@triton.jit
def _tok_rep(x_tok, s_xn, s_xd, n_valid, y_ptr, y_scale, pid_bh, rows, M, D, M_PAD: tl.constexpr,
             D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, PREC: tl.constexpr,
             EMU_BF16: tl.constexpr, REPS_FIRST: tl.constexpr):
    """X (y_scale·Y[rows])ᵀ for one token block of X (``x_tok``: its first token, ``n_valid`` tokens, read through
    strides) and representatives ``rows`` of a (B·H, M_PAD, D_PAD) ACC buffer Y (rows ≥ M read as zero, the factor
    rounded to the token dtype): (BLOCK_N, BM) in ACC, or its transpose with REPS_FIRST. The d contraction runs in
    chunks of DK columns, so no product holds a long-K operand (float32 'ieee' products keep whole-K operand rows in
    registers)."""
    ACC = y_ptr.dtype.element_ty
    rn = tl.arange(0, BLOCK_N)
    if DK == D_PAD:
        acc = _tok_rep_chunk(x_tok, s_xn, s_xd, n_valid, y_ptr, y_scale, pid_bh, rows, rn, tl.arange(0, DK), M, D,
                             M_PAD, D_PAD, PREC, EMU_BF16, REPS_FIRST)
    else:                                            # a runtime loop: unrolled chunks would all be live at once
        acc = tl.zeros([BM, BLOCK_N] if REPS_FIRST else [BLOCK_N, BM], ACC)
        for k0 in range(0, D, DK):
            acc += _tok_rep_chunk(x_tok, s_xn, s_xd, n_valid, y_ptr, y_scale, pid_bh, rows, rn, k0 + tl.arange(0, DK),
                                  M, D, M_PAD, D_PAD, PREC, EMU_BF16, REPS_FIRST)
    return acc


@triton.jit
def _tok_rep_chunk(x_tok, s_xn, s_xd, n_valid, y_ptr, y_scale, pid_bh, rows, rn, kd, M, D, M_PAD: tl.constexpr,
                   D_PAD: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr, REPS_FIRST: tl.constexpr):
    """``_tok_rep`` over the columns kd."""
    ACC = y_ptr.dtype.element_ty
    x = _load_tile(x_tok, rn, kd, s_xn, s_xd, n_valid, D)
    y = _cast(y_scale * tl.load(_md(y_ptr, pid_bh, rows, kd, M_PAD, D_PAD), mask=(rows < M)[:, None], other=0.),
              x_tok.dtype.element_ty, EMU_BF16)
    if REPS_FIRST:
        return tl.dot(y, tl.trans(x), input_precision=PREC, out_dtype=ACC)
    else:
        return tl.dot(x, tl.trans(y), input_precision=PREC, out_dtype=ACC)


@triton.jit
def _broadcast_block(w_tok, s_wn, s_wd, n_valid, r_ptr, c_ptr, lse_ptr, kap, pid_bh, rows, M, D, scale,
                     M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr,
                     DK: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    """κ Aᵀ[:, rows] C[rows] (BLOCK_N, D_PAD) for one token block and representatives ``rows``."""
    ACC = lse_ptr.dtype.element_ty
    DT = w_tok.dtype.element_ty
    t = _tok_rep(w_tok, s_wn, s_wd, n_valid, r_ptr, 1., pid_bh, rows, M, D, M_PAD, D_PAD, BLOCK_N, BM, DK, PREC,
                 EMU_BF16, False)
    lse = tl.load(lse_ptr + pid_bh * M_PAD + rows)
    at = tl.where((tl.arange(0, BLOCK_N) < n_valid)[:, None] & (rows < M)[None, :], tl.exp(t * scale - lse[None, :]),
                  0.)
    ck = _cast(kap * tl.load(_md(c_ptr, pid_bh, rows, tl.arange(0, D_PAD), M_PAD, D_PAD), mask=(rows < M)[:, None],
                             other=0.), DT, EMU_BF16)
    return tl.dot(_cast(at, DT, EMU_BF16), ck, input_precision=PREC, out_dtype=ACC)


@_jit
def _broadcast_fwd(
        w_ptr, r_ptr, kap_ptr, lse_ptr, c_ptr, out_ptr,
        N, H, M, D, scale,
        s_wb, s_wh, s_wn, s_wd,
        s_ob, s_oh, s_on, s_od,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr,
        PREC: tl.constexpr, EMU_BF16: tl.constexpr,
):
    """out = κ Aᵀ C for one token block, summed over blocks of BM representatives."""
    pid_bh, b, h = _program(H)
    n0 = tl.program_id(1) * BLOCK_N
    rb = tl.arange(0, BM)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    w_tok = w_ptr + b * s_wb + h * s_wh + tl.cast(n0, tl.int64) * s_wn
    kap = tl.load(kap_ptr + h)
    if BM == M_PAD:
        out = _broadcast_block(w_tok, s_wn, s_wd, N - n0, r_ptr, c_ptr, lse_ptr, kap, pid_bh, rb, M, D, scale,
                               M_PAD, D_PAD, BLOCK_N, BM, DK, PREC, EMU_BF16)
    else:
        out = tl.zeros([BLOCK_N, D_PAD], lse_ptr.dtype.element_ty)
        for j0 in range(0, M, BM):
            out += _broadcast_block(w_tok, s_wn, s_wd, N - n0, r_ptr, c_ptr, lse_ptr, kap, pid_bh, j0 + rb, M, D,
                                    scale, M_PAD, D_PAD, BLOCK_N, BM, DK, PREC, EMU_BF16)
    mask = (rn[:, None] < N - n0) & (rd[None, :] < D)
    o_ptr = out_ptr + b * s_ob + h * s_oh + tl.cast(n0, tl.int64) * s_on + rn[:, None] * s_on + rd[None, :] * s_od
    tl.store(o_ptr, _cast(out, out_ptr.dtype.element_ty, EMU_BF16), mask=mask)


@_jit
def _ag_partial(
        w_ptr, r_ptr, g_ptr, lse_ptr, pag_ptr,
        N, H, M, D, CHUNK, scale,
        s_wb, s_wh, s_wn, s_wd,
        s_gb, s_gh, s_gn, s_gd,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr,
        PREC: tl.constexpr, EMU_BF16: tl.constexpr,
):
    """A G over the tokens [pid_s·CHUNK, (pid_s+1)·CHUNK) for the representatives [pid_r·BM, (pid_r+1)·BM), A rebuilt
    per token block."""
    pid_bh, b, h = _program(H)
    pid_s = tl.program_id(1)
    ACC = lse_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rows = tl.program_id(2) * BM + tl.arange(0, BM)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    w_base = w_ptr + b * s_wb + h * s_wh
    g_base = g_ptr + b * s_gb + h * s_gh
    lse = tl.load(lse_ptr + pid_bh * M_PAD + rows)
    ag = tl.zeros([BM, D_PAD], ACC)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(N, n_start + CHUNK)
    for n0 in range(n_start, n_end, BLOCK_N):
        s = _tok_rep(w_base + tl.cast(n0, tl.int64) * s_wn, s_wn, s_wd, n_end - n0, r_ptr, 1., pid_bh, rows, M_PAD, D,
                     M_PAD, D_PAD, BLOCK_N, BM, DK, PREC, EMU_BF16, True) * scale
        a = tl.where((n0 + rn < n_end)[None, :] & (rows < M)[:, None], tl.exp(s - lse[:, None]), 0.)
        g = _load_tile(g_base + tl.cast(n0, tl.int64) * s_gn, rn, rd, s_gn, s_gd, n_end - n0, D)
        ag += tl.dot(_cast(a, DT, EMU_BF16), g, input_precision=PREC, out_dtype=ACC)
    tl.store(_md(pag_ptr, tl.cast(pid_s, tl.int64) * tl.num_programs(0) + pid_bh, rows, rd, M_PAD, D_PAD), ag)


@_jit
def _contract_bwd(
        eta_ptr, kap_ptr, pag_ptr, z_ptr, q_ptr, c_ptr, lsep_ptr,
        dc_ptr, delta_ptr, dz_ptr, dq_ptr, dd_ptr, deta_ptr, dkap_ptr,
        H, M, D, SPLITS, scale,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, MM_PREC: tl.constexpr,
):
    """The m×m backward (``../fused.py``): ∂C = κ·A G (the SPLITS partials summed in order), δ = rowsum(∂C Qᵀ ⊙ P)
    = rowsum(∂C ⊙ C), then by row blocks J over column blocks I with P rebuilt from s·Q Qᵀ and its lse:
    ∂Q_J = Σ_I P_IJᵀ ∂C_I + s (∂L_JI + ∂L_IJᵀ) Q_I, ∂L = P ⊙ (∂C Qᵀ − δ); ∂Z = η∂Q, D = δ + rowsum(∂Z ⊙ Z), and
    this (batch, head)'s Σ ∂Q ⊙ Z (∂η) and Σ C ⊙ A G (∂κ). ``dc``, ``delta``: scratch."""
    pid_bh, _, h = _program(H)
    BH = tl.num_programs(0)
    ACC = z_ptr.dtype.element_ty
    rb = tl.arange(0, BM)
    rd = tl.arange(0, D_PAD)
    eta = tl.load(eta_ptr + h)
    kap = tl.load(kap_ptr + h)
    dkap = tl.zeros([BM], ACC)
    for j0 in range(0, M, BM):
        rows = j0 + rb
        ag = tl.zeros([BM, D_PAD], ACC)
        for sp in range(0, SPLITS):
            ag += tl.load(_md(pag_ptr, tl.cast(sp, tl.int64) * BH + pid_bh, rows, rd, M_PAD, D_PAD))
        c = tl.load(_md(c_ptr, pid_bh, rows, rd, M_PAD, D_PAD))
        dkap += tl.sum(c * ag, 1)
        tl.store(_md(dc_ptr, pid_bh, rows, rd, M_PAD, D_PAD), kap * ag)
        tl.store(delta_ptr + pid_bh * M_PAD + rows, kap * tl.sum(c * ag, 1))
    tl.debug_barrier()                                                                       # ∂C, δ complete
    deta = tl.zeros([BM], ACC)
    for j0 in range(0, M, BM):
        rows = j0 + rb
        delta_j = tl.load(delta_ptr + pid_bh * M_PAD + rows)
        lse_j = tl.load(lsep_ptr + pid_bh * M_PAD + rows)
        dq = tl.zeros([BM, D_PAD], ACC)
        for i0 in range(0, M, BM):
            cols = i0 + rb
            ok = (rows < M)[:, None] & (cols < M)[None, :]
            q_i = tl.load(_md(q_ptr, pid_bh, cols, rd, M_PAD, D_PAD))
            dc_i = tl.load(_md(dc_ptr, pid_bh, cols, rd, M_PAD, D_PAD))
            s = _gram(q_ptr, q_ptr, pid_bh, rows, cols, D, M_PAD, D_PAD, BM, DK, MM_PREC, ACC) * scale
            p_ji = tl.where(ok, tl.exp(s - lse_j[:, None]), 0.)                             # P_JI
            pt_ij = tl.where(ok, tl.exp(s - tl.load(lsep_ptr + pid_bh * M_PAD + cols)[None, :]), 0.)   # P_IJᵀ
            dl = p_ji * (_gram(dc_ptr, q_ptr, pid_bh, rows, cols, D, M_PAD, D_PAD, BM, DK, MM_PREC, ACC)
                         - delta_j[:, None])
            delta_i = tl.load(delta_ptr + pid_bh * M_PAD + cols)
            dl += pt_ij * (_gram(q_ptr, dc_ptr, pid_bh, rows, cols, D, M_PAD, D_PAD, BM, DK, MM_PREC, ACC)
                           - delta_i[None, :])
            dq += tl.dot(pt_ij, dc_i, input_precision=MM_PREC, out_dtype=ACC)
            dq += scale * tl.dot(dl, q_i, input_precision=MM_PREC, out_dtype=ACC)
        z = tl.load(_md(z_ptr, pid_bh, rows, rd, M_PAD, D_PAD))
        dz = eta * dq
        deta += tl.sum(dq * z, 1)
        tl.store(_md(dq_ptr, pid_bh, rows, rd, M_PAD, D_PAD), dq)
        tl.store(_md(dz_ptr, pid_bh, rows, rd, M_PAD, D_PAD), dz)
        tl.store(dd_ptr + pid_bh * M_PAD + rows, delta_j + tl.sum(dz * z, 1))             # rowsum(∂A ⊙ A)
    tl.store(deta_ptr + pid_bh, tl.sum(deta, 0))
    tl.store(dkap_ptr + pid_bh, tl.sum(dkap, 0))


@_jit
def _broadcast_bwd(
        w_ptr, r_ptr, g_ptr, kap_ptr, lse_ptr, c_ptr, dz_ptr, dd_ptr,
        dw_ptr, pdr_ptr,
        N, H, M, D, CHUNK, scale,
        s_wb, s_wh, s_wn, s_wd,
        s_gb, s_gh, s_gn, s_gd,
        s_db, s_dh, s_dn, s_dd,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
        EMU_BF16: tl.constexpr,
):
    """Over the tokens [pid_s·CHUNK, (pid_s+1)·CHUNK): ∂W = Aᵀ ∂Z + s ∂Sᵀ Q_ini per block (written), and the
    chunk's s ∂S W (M_PAD, D_PAD) partial of ∂Q_ini."""
    pid_bh, b, h = _program(H)
    pid_s = tl.program_id(1)
    ACC = lse_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    w_base = w_ptr + b * s_wb + h * s_wh
    g_base = g_ptr + b * s_gb + h * s_gh
    dw_base = dw_ptr + b * s_db + h * s_dh
    r = tl.load(_md(r_ptr, pid_bh, rm, rd, M_PAD, D_PAD)).to(DT)
    lse = tl.load(lse_ptr + pid_bh * M_PAD + rm)
    dd = tl.load(dd_ptr + pid_bh * M_PAD + rm, mask=rm < M, other=0.)
    ck = _cast(tl.load(kap_ptr + h) * _load_md(c_ptr, pid_bh, rm, rd, M, M_PAD, D_PAD), DT, EMU_BF16)
    dz = _cast(_load_md(dz_ptr, pid_bh, rm, rd, M, M_PAD, D_PAD), DT, EMU_BF16)
    dr = tl.zeros([M_PAD, D_PAD], ACC)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(N, n_start + CHUNK)
    for n0 in range(n_start, n_end, BLOCK_N):
        w = _load_tile(w_base + tl.cast(n0, tl.int64) * s_wn, rn, rd, s_wn, s_wd, n_end - n0, D)
        g = _load_tile(g_base + tl.cast(n0, tl.int64) * s_gn, rn, rd, s_gn, s_gd, n_end - n0, D)
        at = _rebuild_at(w, r, lse, rn < n_end - n0, rm < M, scale, PREC, ACC)              # Aᵀ (BLOCK_N, M_PAD)
        dat = (tl.dot(g, tl.trans(ck), input_precision=PREC, out_dtype=ACC)                # ∂Aᵀ = G (κC)ᵀ + W ∂Zᵀ
               + tl.dot(w, tl.trans(dz), input_precision=PREC, out_dtype=ACC))
        dst = _cast(at * (dat - dd[None, :]), DT, EMU_BF16)                                 # ∂Sᵀ
        dw = (tl.dot(_cast(at, DT, EMU_BF16), dz, input_precision=PREC, out_dtype=ACC)     # ∂W = Aᵀ ∂Z + s ∂Sᵀ Q_ini
              + scale * tl.dot(dst, r, input_precision=PREC, out_dtype=ACC))
        mask = (rn[:, None] < n_end - n0) & (rd[None, :] < D)
        tl.store(dw_base + tl.cast(n0, tl.int64) * s_dn + rn[:, None] * s_dn + rd[None, :] * s_dd,
                 _cast(dw, dw_ptr.dtype.element_ty, EMU_BF16), mask=mask)
        dr += tl.dot(tl.trans(dst), w, input_precision=PREC, out_dtype=ACC)                # ∂S W
    tl.store(_md(pdr_ptr, tl.cast(pid_s, tl.int64) * tl.num_programs(0) + pid_bh, rm, rd, M_PAD, D_PAD), scale * dr)


@triton.jit
def _score_grad_block(w_tok, g_tok, n_valid, r_ptr, c_ptr, dz_ptr, lse_ptr, dd_ptr, kap, pid_bh, rows, M, D, scale,
                      s_wn, s_wd, s_gn, s_gd, M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      BM: tl.constexpr, DK: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    """Aᵀ and ∂Sᵀ = Aᵀ ⊙ (G (κC)ᵀ + W ∂Zᵀ − D), (BLOCK_N, BM) in the token dtype, for one token block and the
    representatives ``rows``."""
    DT = w_tok.dtype.element_ty
    t = _tok_rep(w_tok, s_wn, s_wd, n_valid, r_ptr, 1., pid_bh, rows, M, D, M_PAD, D_PAD, BLOCK_N, BM, DK, PREC,
                 EMU_BF16, False)
    dat = (_tok_rep(g_tok, s_gn, s_gd, n_valid, c_ptr, kap, pid_bh, rows, M, D, M_PAD, D_PAD, BLOCK_N, BM, DK, PREC,
                    EMU_BF16, False)
           + _tok_rep(w_tok, s_wn, s_wd, n_valid, dz_ptr, 1., pid_bh, rows, M, D, M_PAD, D_PAD, BLOCK_N, BM, DK, PREC,
                      EMU_BF16, False))
    lse = tl.load(lse_ptr + pid_bh * M_PAD + rows)
    dd = tl.load(dd_ptr + pid_bh * M_PAD + rows, mask=rows < M, other=0.)
    at = tl.where((tl.arange(0, BLOCK_N) < n_valid)[:, None] & (rows < M)[None, :], tl.exp(t * scale - lse[None, :]),
                  0.)
    return _cast(at, DT, EMU_BF16), _cast(at * (dat - dd[None, :]), DT, EMU_BF16)


@_jit
def _broadcast_bwd_blocks(
        w_ptr, r_ptr, g_ptr, kap_ptr, lse_ptr, c_ptr, dz_ptr, dd_ptr,
        dw_ptr, pdr_ptr,
        N, H, M, D, CHUNK, scale,
        s_wb, s_wh, s_wn, s_wd,
        s_gb, s_gh, s_gn, s_gd,
        s_db, s_dh, s_dn, s_dd,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr,
        DR: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
):
    """``_broadcast_bwd`` in two passes with smaller tiles, ∂Sᵀ rebuilt per block of BM representatives in each.
    DR False: ∂W = Σ_blocks Aᵀ ∂Z + s ∂Sᵀ Q_ini for the token block pid_s (CHUNK = BLOCK_N; written). DR True: the
    s ∂S W partial of ∂Q_ini over the tokens [pid_s·CHUNK, (pid_s+1)·CHUNK) for the representatives
    [pid_r·BM, (pid_r+1)·BM)."""
    pid_bh, b, h = _program(H)
    pid_s = tl.program_id(1)
    ACC = lse_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rb = tl.arange(0, BM)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    w_base = w_ptr + b * s_wb + h * s_wh
    g_base = g_ptr + b * s_gb + h * s_gh
    kap = tl.load(kap_ptr + h)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(N, n_start + CHUNK)
    if DR:
        rows = tl.program_id(2) * BM + rb
        dr = tl.zeros([BM, D_PAD], ACC)
        for n0 in range(n_start, n_end, BLOCK_N):
            w_tok = w_base + tl.cast(n0, tl.int64) * s_wn
            _, dst = _score_grad_block(w_tok, g_base + tl.cast(n0, tl.int64) * s_gn, n_end - n0, r_ptr, c_ptr, dz_ptr,
                                       lse_ptr, dd_ptr, kap, pid_bh, rows, M, D, scale, s_wn, s_wd, s_gn, s_gd,
                                       M_PAD, D_PAD, BLOCK_N, BM, DK, PREC, EMU_BF16)
            w = _load_tile(w_tok, rn, rd, s_wn, s_wd, n_end - n0, D)
            dr += tl.dot(tl.trans(dst), w, input_precision=PREC, out_dtype=ACC)              # ∂S W
        row = tl.cast(pid_s, tl.int64) * tl.num_programs(0) + pid_bh
        tl.store(_md(pdr_ptr, row, rows, rd, M_PAD, D_PAD), scale * dr)
    else:
        w_tok = w_base + tl.cast(n_start, tl.int64) * s_wn
        g_tok = g_base + tl.cast(n_start, tl.int64) * s_gn
        dw = tl.zeros([BLOCK_N, D_PAD], ACC)
        for j0 in range(0, M, BM):
            rows = j0 + rb
            at, dst = _score_grad_block(w_tok, g_tok, n_end - n_start, r_ptr, c_ptr, dz_ptr, lse_ptr, dd_ptr, kap,
                                        pid_bh, rows, M, D, scale, s_wn, s_wd, s_gn, s_gd, M_PAD, D_PAD, BLOCK_N, BM,
                                        DK, PREC, EMU_BF16)
            r = tl.load(_md(r_ptr, pid_bh, rows, rd, M_PAD, D_PAD)).to(DT)
            dz = _cast(tl.load(_md(dz_ptr, pid_bh, rows, rd, M_PAD, D_PAD), mask=(rows < M)[:, None], other=0.), DT,
                       EMU_BF16)
            dw += (tl.dot(at, dz, input_precision=PREC, out_dtype=ACC)                       # Aᵀ ∂Z + s ∂Sᵀ Q_ini
                   + scale * tl.dot(dst, r, input_precision=PREC, out_dtype=ACC))
        mask = (rn[:, None] < n_end - n_start) & (rd[None, :] < D)
        tl.store(dw_ptr + b * s_db + h * s_dh + tl.cast(n_start, tl.int64) * s_dn + rn[:, None] * s_dn
                 + rd[None, :] * s_dd, _cast(dw, dw_ptr.dtype.element_ty, EMU_BF16), mask=mask)


@_jit
def _pool_adjoint(
        dr_ptr, dw_ptr,
        H, M, D, P0, GH, GW, RH, RW,
        s_db, s_dh, s_dn, s_dd,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
        EMU_BF16: tl.constexpr,
):
    """∂W[P0 + t] += Σ_i [t ∈ window_i] ∂Q_ini[i] / area_i for one block of patch tokens t."""
    pid_bh, b, h = _program(H)
    t0 = tl.program_id(1) * BLOCK_N
    ACC = dr_ptr.dtype.element_ty
    DT = dw_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    r_lo, r_hi, c_lo, c_hi = _windows(rm, GH, GW, RH, RW)
    dr = _load_md(dr_ptr, pid_bh, rm, rd, M, M_PAD, D_PAD) * _inv_area(r_lo, r_hi, c_lo, c_hi, ACC)[:, None]
    inside = _membership(t0 + rn, GH * GW, GW, r_lo, r_hi, c_lo, c_hi)                     # (M_PAD, BLOCK_N)
    add = _dot_01(tl.trans(inside.to(DT)), _cast(dr, DT, EMU_BF16), PREC, ACC, DT == tl.float32)  # (BLOCK_N, D_PAD)
    mask = (rn[:, None] < GH * GW - t0) & (rd[None, :] < D)
    ptr = (dw_ptr + b * s_db + h * s_dh + tl.cast(P0 + t0, tl.int64) * s_dn
           + rn[:, None] * s_dn + rd[None, :] * s_dd)
    dw = tl.load(ptr, mask=mask, other=0.).to(ACC) + add
    tl.store(ptr, _cast(dw, dw_ptr.dtype.element_ty, EMU_BF16), mask=mask)
