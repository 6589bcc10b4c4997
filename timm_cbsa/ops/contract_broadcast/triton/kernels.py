"""Triton kernels for CBSA's contract-and-broadcast core (see ``function.py`` for the autograd wiring and
``naive.py`` for the plain PyTorch twin they are tested against).

One (batch, head) matrix pair per program (``pid_bh``): W (N, d) tokens, R = Q_ini (m, d) representatives, both read
through their strides. m and d are padded to powers of two ≥ 16 (``M_PAD``, ``D_PAD``, masked loads), tokens are read
in blocks of ``BLOCK_N``. The m×N matrix A = softmax_N(s·R Wᵀ) is never written to global memory: every kernel
rebuilds its block from R, W and the per-representative log-sum-exp.

Precision: products of the tokens (A·W, W·Rᵀ, …) take the input dtype with ``PREC`` ('ieee' for float32 / float64,
'tf32' for bf16 / fp16, where Triton ignores it) and accumulate in the statistics dtype ``ACC`` (float32, float64 for
float64 inputs: the dtype of the ``lse`` buffer); the small m×m / m×d algebra always runs in ``ACC`` with 'ieee'.
Scalars (s, η, κ) are read from ``ACC`` tensors, so float64 runs keep full precision.

Kernels (forward, then backward). The token passes that reduce over N run on SPLITS chunks of tokens per (batch,
head) so that small batches still fill the GPU; a per-(batch, head) kernel merges the chunks' m×d partials:
    _extract_partial    grid (SPLITS, B·H): one pass over a chunk's token blocks: logits s·R Wᵀ with an online
                        log-sum-exp, and A W (unnormalised) → partial max, Σexp, Σexp·W.
    _combine_contract   grid (B·H,): merges the partials → lse, Z = A W; the contraction Q = R + ηZ,
                        P = softmax(s·Q Qᵀ), C = P Q. Stores lse, Z, Q, P, C (padded; m×d and m×m).
    _broadcast_fwd      grid (⌈N/BLOCK_N⌉, B·H): out = κ·exp(s·W Rᵀ − lse) C per token block (the only N×d write).
    _ag_partial         grid (SPLITS, B·H): A G over a chunk, A rebuilt per token block.
    _contract_bwd       grid (B·H,): sums the partials, then the m×m backward: ∂Q, ∂Z = η∂Q, D = rowsum(∂A ⊙ A),
                        and the per-(batch, head) terms of ∂η, ∂κ.
    _broadcast_bwd      grid (⌈N/BLOCK_N⌉, B·H): ∂S = A ⊙ (κC Gᵀ + ∂Z Wᵀ − D) per token block,
                        ∂W = Aᵀ ∂Z + s ∂Sᵀ R (written), ∂R += s ∂S W (atomic add into an ACC buffer).

Only APIs present in Triton 3.6 and 3.8 are used (tl.dot with input_precision / out_dtype, masked tl.load / tl.store,
tl.atomic_add, constexpr block sizes); the kernels also run under ``TRITON_INTERPRET=1`` (the CPU tests).
"""
import triton
import triton.language as tl


@triton.jit
def _load_tile(ptr, rows, cols, s_row, s_col, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.)


@triton.jit
def _extract_partial(
        w_ptr, r_ptr, scale_ptr, pmx_ptr, pss_ptr, pacc_ptr,
        N, H, CHUNK,
        s_wb, s_wh, s_wn, s_wd,
        s_rb, s_rh, s_rm, s_rd,
        M: tl.constexpr, D: tl.constexpr, M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
):
    """Extraction over the tokens [pid_s·CHUNK, (pid_s+1)·CHUNK): running max, Σ exp(s − max) and Σ exp(s − max) W."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)             # b·stride can pass 2³¹ elements
    h = pid_bh % H
    ACC = pmx_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr)
    w_base = w_ptr + b * s_wb + h * s_wh
    r = _load_tile(r_ptr + b * s_rb + h * s_rh, rm, rd, s_rm, s_rd, M, D)            # Q_ini (M_PAD, D_PAD)
    mx = tl.full([M_PAD], float('-inf'), ACC)
    ssum = tl.zeros([M_PAD], ACC)
    acc = tl.zeros([M_PAD, D_PAD], ACC)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(N, n_start + CHUNK)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + rn
        w = _load_tile(w_base + n0 * s_wn, rn, rd, s_wn, s_wd, n_end - n0, D)        # (BLOCK_N, D_PAD)
        s = tl.dot(r, tl.trans(w), input_precision=PREC, out_dtype=ACC) * scale     # (M_PAD, BLOCK_N)
        s = tl.where((n < n_end)[None, :], s, float('-inf'))
        mx_new = tl.maximum(mx, tl.max(s, 1))
        alpha = tl.exp(mx - mx_new)
        e = tl.exp(s - mx_new[:, None])
        ssum = ssum * alpha + tl.sum(e, 1)
        acc = acc * alpha[:, None] + tl.dot(e.to(DT), w, input_precision=PREC, out_dtype=ACC)
        mx = mx_new
    row = (pid_s * tl.num_programs(1) + pid_bh) * M_PAD
    tl.store(pmx_ptr + row + rm, mx)
    tl.store(pss_ptr + row + rm, ssum)
    tl.store(pacc_ptr + (row + rm[:, None]) * D_PAD + rd[None, :], acc)


@triton.jit
def _combine_contract(
        r_ptr, eta_ptr, scale_ptr, pmx_ptr, pss_ptr, pacc_ptr,
        lse_ptr, z_ptr, q_ptr, p_ptr, c_ptr,
        H, SPLITS,
        s_rb, s_rh, s_rm, s_rd,
        M: tl.constexpr, D: tl.constexpr, M_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """Merges the SPLITS partial extractions (every split holds ≥ 1 token) into lse and Z = A W, then the contraction
    Q = R + ηZ, P = softmax(s·Q Qᵀ), C = P Q, all in ACC with 'ieee' products."""
    pid_bh = tl.program_id(0)
    BH = tl.num_programs(0)
    b = (pid_bh // H).to(tl.int64)             # b·stride can pass 2³¹ elements
    h = pid_bh % H
    ACC = lse_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    m_ok = rm < M
    scale = tl.load(scale_ptr)
    eta = tl.load(eta_ptr + h)
    mx = tl.load(pmx_ptr + pid_bh * M_PAD + rm)
    ssum = tl.load(pss_ptr + pid_bh * M_PAD + rm)
    acc = tl.load(pacc_ptr + (pid_bh * M_PAD + rm[:, None]) * D_PAD + rd[None, :])
    for sp in range(1, SPLITS):
        row = (sp * BH + pid_bh) * M_PAD
        mx_s = tl.load(pmx_ptr + row + rm)
        mx_new = tl.maximum(mx, mx_s)
        a_old = tl.exp(mx - mx_new)
        a_new = tl.exp(mx_s - mx_new)
        ssum = ssum * a_old + tl.load(pss_ptr + row + rm) * a_new
        acc = acc * a_old[:, None] + tl.load(pacc_ptr + (row + rm[:, None]) * D_PAD + rd[None, :]) * a_new[:, None]
        mx = mx_new
    lse = mx + tl.log(ssum)
    z = tl.where(m_ok[:, None], acc / ssum[:, None], 0.)                                 # Z = A W

    # contraction among the m representatives (padded rows zero, padded columns masked out of the softmax)
    r = _load_tile(r_ptr + b * s_rb + h * s_rh, rm, rd, s_rm, s_rd, M, D)
    q = r.to(ACC) + eta * z                                                              # Q = Q_ini + η Z
    logits = tl.dot(q, tl.trans(q), input_precision='ieee', out_dtype=ACC) * scale
    logits = tl.where(m_ok[None, :], logits, float('-inf'))
    pe = tl.exp(logits - tl.max(logits, 1)[:, None])
    p = pe / tl.sum(pe, 1)[:, None]
    p = tl.where(m_ok[:, None], p, 0.)                                                   # P = softmax(s Q Qᵀ)
    c = tl.dot(p, q, input_precision='ieee', out_dtype=ACC)                              # C = P Q

    md = pid_bh * M_PAD * D_PAD + rm[:, None] * D_PAD + rd[None, :]
    tl.store(lse_ptr + pid_bh * M_PAD + rm, lse)
    tl.store(z_ptr + md, z)
    tl.store(q_ptr + md, q)
    tl.store(c_ptr + md, c)
    tl.store(p_ptr + pid_bh * M_PAD * M_PAD + rm[:, None] * M_PAD + rm[None, :], p)


@triton.jit
def _rebuild_at(w, r, lse, n, N, m_ok, scale, PREC: tl.constexpr, ACC: tl.constexpr):
    """Aᵀ for one token block, (BLOCK_N, M_PAD): exp(s·W Rᵀ − lse), zero outside the valid tokens/representatives."""
    t = tl.dot(w, tl.trans(r), input_precision=PREC, out_dtype=ACC) * scale
    at = tl.exp(t - lse[None, :])
    return tl.where((n < N)[:, None] & m_ok[None, :], at, 0.)


@triton.jit
def _broadcast_fwd(
        w_ptr, r_ptr, kap_ptr, scale_ptr, lse_ptr, c_ptr, out_ptr,
        N, H,
        s_wb, s_wh, s_wn, s_wd,
        s_rb, s_rh, s_rm, s_rd,
        s_ob, s_oh, s_on, s_od,
        M: tl.constexpr, D: tl.constexpr, M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)             # b·stride can pass 2³¹ elements
    h = pid_bh % H
    ACC = lse_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    n0 = pid_n * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr)
    kap = tl.load(kap_ptr + h)
    w = _load_tile(w_ptr + b * s_wb + h * s_wh + n0 * s_wn, rn, rd, s_wn, s_wd, N - n0, D)
    r = _load_tile(r_ptr + b * s_rb + h * s_rh, rm, rd, s_rm, s_rd, M, D)
    lse = tl.load(lse_ptr + pid_bh * M_PAD + rm)
    c = tl.load(c_ptr + pid_bh * M_PAD * D_PAD + rm[:, None] * D_PAD + rd[None, :])
    at = _rebuild_at(w, r, lse, n0 + rn, N, rm < M, scale, PREC, ACC)                 # (BLOCK_N, M_PAD)
    out = tl.dot(at.to(DT), (kap * c).to(DT), input_precision=PREC, out_dtype=ACC)     # κ Aᵀ C
    mask = (rn[:, None] < N - n0) & (rd[None, :] < D)
    o_ptr = out_ptr + b * s_ob + h * s_oh + (n0 + rn[:, None]) * s_on + rd[None, :] * s_od
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ag_partial(
        w_ptr, r_ptr, g_ptr, scale_ptr, lse_ptr, pag_ptr,
        N, H, CHUNK,
        s_wb, s_wh, s_wn, s_wd,
        s_rb, s_rh, s_rm, s_rd,
        s_gb, s_gh, s_gn, s_gd,
        M: tl.constexpr, D: tl.constexpr, M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
):
    """A G over the tokens [pid_s·CHUNK, (pid_s+1)·CHUNK), A rebuilt per token block."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)             # b·stride can pass 2³¹ elements
    h = pid_bh % H
    ACC = lse_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    scale = tl.load(scale_ptr)
    w_base = w_ptr + b * s_wb + h * s_wh
    g_base = g_ptr + b * s_gb + h * s_gh
    r = _load_tile(r_ptr + b * s_rb + h * s_rh, rm, rd, s_rm, s_rd, M, D)
    lse = tl.load(lse_ptr + pid_bh * M_PAD + rm)
    ag = tl.zeros([M_PAD, D_PAD], ACC)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(N, n_start + CHUNK)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + rn
        w = _load_tile(w_base + n0 * s_wn, rn, rd, s_wn, s_wd, n_end - n0, D)
        g = _load_tile(g_base + n0 * s_gn, rn, rd, s_gn, s_gd, n_end - n0, D)
        s = tl.dot(r, tl.trans(w), input_precision=PREC, out_dtype=ACC) * scale
        a = tl.where((n < n_end)[None, :] & m_ok[:, None], tl.exp(s - lse[:, None]), 0.)
        ag += tl.dot(a.to(DT), g.to(DT), input_precision=PREC, out_dtype=ACC)
    tl.store(pag_ptr + ((pid_s * tl.num_programs(1) + pid_bh) * M_PAD + rm[:, None]) * D_PAD + rd[None, :], ag)


@triton.jit
def _contract_bwd(
        eta_ptr, kap_ptr, scale_ptr, pag_ptr,
        z_ptr, q_ptr, p_ptr, c_ptr,
        dz_ptr, dq_ptr, dd_ptr, deta_ptr, dkap_ptr,
        H, SPLITS,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """Sums the SPLITS partial A G, then the m×m backward (fused.py's docstring): ∂C = κ AG, ∂Q through
    C = softmax(s Q Qᵀ) Q, ∂Z = η ∂Q, D = rowsum(∂A ⊙ A), and this (batch, head)'s terms of ∂η and ∂κ."""
    pid_bh = tl.program_id(0)
    BH = tl.num_programs(0)
    h = pid_bh % H
    ACC = z_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    scale = tl.load(scale_ptr)
    eta = tl.load(eta_ptr + h)
    kap = tl.load(kap_ptr + h)
    ag = tl.zeros([M_PAD, D_PAD], ACC)
    for sp in range(0, SPLITS):
        ag += tl.load(pag_ptr + ((sp * BH + pid_bh) * M_PAD + rm[:, None]) * D_PAD + rd[None, :])
    md = pid_bh * M_PAD * D_PAD + rm[:, None] * D_PAD + rd[None, :]
    z = tl.load(z_ptr + md)
    q = tl.load(q_ptr + md)
    c = tl.load(c_ptr + md)
    p = tl.load(p_ptr + pid_bh * M_PAD * M_PAD + rm[:, None] * M_PAD + rm[None, :])
    dc = kap * ag
    dp = tl.dot(dc, tl.trans(q), input_precision='ieee', out_dtype=ACC)
    dl = p * (dp - tl.sum(dp * p, 1)[:, None])
    dq = (tl.dot(tl.trans(p), dc, input_precision='ieee', out_dtype=ACC)
          + scale * (tl.dot(dl, q, input_precision='ieee', out_dtype=ACC)
                     + tl.dot(tl.trans(dl), q, input_precision='ieee', out_dtype=ACC)))
    dz = eta * dq
    dd = tl.sum(kap * c * ag, 1) + tl.sum(dz * z, 1)                                     # rowsum(∂A ⊙ A)
    tl.store(dz_ptr + md, dz)
    tl.store(dq_ptr + md, dq)
    tl.store(dd_ptr + pid_bh * M_PAD + rm, dd)
    tl.store(dkap_ptr + pid_bh, tl.sum(tl.sum(c * ag, 1), 0))
    tl.store(deta_ptr + pid_bh, tl.sum(tl.sum(dq * z, 1), 0))


@triton.jit
def _broadcast_bwd(
        w_ptr, r_ptr, g_ptr, kap_ptr, scale_ptr,
        lse_ptr, c_ptr, dz_ptr, dd_ptr,
        dw_ptr, dr_ptr,
        N, H,
        s_wb, s_wh, s_wn, s_wd,
        s_rb, s_rh, s_rm, s_rd,
        s_gb, s_gh, s_gn, s_gd,
        s_db, s_dh, s_dn, s_dd,
        M: tl.constexpr, D: tl.constexpr, M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)             # b·stride can pass 2³¹ elements
    h = pid_bh % H
    ACC = lse_ptr.dtype.element_ty
    DT = w_ptr.dtype.element_ty
    rm = tl.arange(0, M_PAD)
    rd = tl.arange(0, D_PAD)
    n0 = pid_n * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr)
    kap = tl.load(kap_ptr + h)
    w = _load_tile(w_ptr + b * s_wb + h * s_wh + n0 * s_wn, rn, rd, s_wn, s_wd, N - n0, D)
    g = _load_tile(g_ptr + b * s_gb + h * s_gh + n0 * s_gn, rn, rd, s_gn, s_gd, N - n0, D).to(DT)
    r = _load_tile(r_ptr + b * s_rb + h * s_rh, rm, rd, s_rm, s_rd, M, D)
    lse = tl.load(lse_ptr + pid_bh * M_PAD + rm)
    dd = tl.load(dd_ptr + pid_bh * M_PAD + rm)
    md = pid_bh * M_PAD * D_PAD + rm[:, None] * D_PAD + rd[None, :]
    ck = (kap * tl.load(c_ptr + md)).to(DT)
    dz = tl.load(dz_ptr + md).to(DT)
    at = _rebuild_at(w, r, lse, n0 + rn, N, rm < M, scale, PREC, ACC)                 # Aᵀ (BLOCK_N, M_PAD)
    dat = (tl.dot(g, tl.trans(ck), input_precision=PREC, out_dtype=ACC)               # ∂Aᵀ = G (κC)ᵀ + W ∂Zᵀ
           + tl.dot(w, tl.trans(dz), input_precision=PREC, out_dtype=ACC))
    dst = (at * (dat - dd[None, :])).to(DT)                                             # ∂Sᵀ
    dw = (tl.dot(at.to(DT), dz, input_precision=PREC, out_dtype=ACC)                   # ∂W = Aᵀ ∂Z + s ∂Sᵀ R
          + scale * tl.dot(dst, r, input_precision=PREC, out_dtype=ACC))
    mask = (rn[:, None] < N - n0) & (rd[None, :] < D)
    tl.store(dw_ptr + b * s_db + h * s_dh + (n0 + rn[:, None]) * s_dn + rd[None, :] * s_dd,
             dw.to(dw_ptr.dtype.element_ty), mask=mask)
    dr = scale * tl.dot(tl.trans(dst), w, input_precision=PREC, out_dtype=ACC)          # s ∂S W (M_PAD, D_PAD)
    tl.atomic_add(dr_ptr + md, dr)
