"""The launches and the autograd function around the Triton kernels (``kernels.py``), and the static checks that
decide whether they can run (``not_supported_reasons``).

    out = contract_and_broadcast_triton(w, step_rep, step_x, scale, pool=PoolSpec((H_p, W_p), (r_h, r_w), trailing))

Passes over the N×d token tensors per layer (W, G = ∂out, ∂W; Q_ini pooled inside the kernels):
    forward   3 reads of W + 1 write:  pool (Q_ini must be complete before the first extraction block) →
              extraction (lse and Z must be complete before any output token) → broadcast (writes out).
    backward  2 reads of (W, G) + 1 write of ∂W, then one read-add-write of ∂W's patch tokens: A G (∂Z and D need
              all of it) → ∂W and the token sum of ∂Q_ini → ∂W += poolᵀ(∂Q_ini), which is complete only after the
              previous pass. Each arrow is a reduction over all tokens that the next pass needs, so no pass can be
              merged into its neighbour; with Q_ini given (``r``) the pooling passes drop out. Where the one-pass
              backward broadcast spills (``Config.bwd_rep_block`` < M_PAD), ∂W and ∂Q_ini's token sum are two
              passes: one more read of (W, G).
All reductions over tokens are per-chunk partials merged in a fixed order: results are bitwise reproducible (no
atomics), so ``torch.use_deterministic_algorithms(True)`` needs nothing else. Scalars reach the kernels as arguments
and nothing is read back to the host: no synchronisation, CUDA-graph capturable.

Saved for backward: W, Q_ini (padded, ACC), the per-representative log-sum-exps of A and P and the m×d tensors Z,
Q, C — nothing m×N or m×m — plus the pool spec, the step sizes and the scale, which is all ``naive_backward`` needs to
recompute the gradients with the naive twin if a backward kernel fails.
"""
import functools
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..naive import naive_contract_and_broadcast
from ..pooling import PoolSpec, num_representatives

__all__ = ['TritonContractBroadcast', 'contract_and_broadcast_triton', 'not_supported_reasons', 'naive_backward',
           'MAX_REPRESENTATIVES', 'MAX_HEAD_DIM', 'MAX_TOKENS', 'TABLE', 'config', 'shared_memory_reasons']

_logger = logging.getLogger(__name__)

MAX_REPRESENTATIVES = 128   # m: padded to M_PAD ≤ 128, the largest size with a spill-free TABLE entry
MAX_HEAD_DIM = 128          # d
MAX_TOKENS = 65536          # N: grid axis 1 holds ⌈N / BLOCK_N⌉ ≤ 65,535 token blocks; int32 token indices
COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)     # tl.dot on tensor cores (mma v2 / wgmma), bf16

# The launch configurations, per target (80: sm_80 / Ampere, also used for 8.x; 90: sm_90 / Hopper and newer), token
# kind ('half': bf16 / fp16; 'tf32' / 'ieee': float32 with torch's TF32 switch on / off) and (M_PAD, D_PAD):
# (BLOCK_N, warps, stages, representative block, d chunk) of extraction / broadcast / A G and of the backward
# broadcast, (BLOCK_N, warps, stages) of pooling and its adjoint, and the most shared memory per block any of the
# kernels needs (``Config``). Chosen by compiling candidates ahead of time for both targets (``python
# tests/ops/triton_aot.py --sweep``: the first in order of preference with zero register spills and shared memory
# within 99 KB on 80, so that every 8.x device runs every entry, and 227 KB on 90) and proven by
# tests/ops/test_triton_compile.py (Triton 3.8): every listed configuration compiles with zero spills and within this
# shared memory. A missing entry has no spill-free configuration: ``not_supported_reasons`` refuses it.
TABLE: Dict[Tuple[int, str, int, int], Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...], int]] = {
    (80, 'half', 16, 32): ((64, 4, 2, 16, 32), (64, 8, 2, 16, 32), (64, 4, 2), 15360),
    (80, 'half', 16, 64): ((64, 4, 2, 16, 64), (64, 8, 2, 16, 64), (64, 4, 2), 28672),
    (80, 'half', 16, 128): ((64, 4, 2, 16, 128), (64, 8, 2, 16, 128), (64, 4, 2), 55296),
    (80, 'half', 64, 32): ((64, 4, 2, 64, 32), (64, 8, 2, 64, 32), (64, 4, 2), 36864),
    (80, 'half', 64, 64): ((64, 4, 2, 64, 64), (64, 8, 2, 64, 64), (32, 4, 2), 65536),
    (80, 'half', 64, 128): ((64, 4, 2, 64, 128), (16, 4, 2, 64, 128), (32, 4, 2), 92160),
    (80, 'half', 128, 32): ((64, 4, 2, 128, 32), (32, 4, 2, 32, 32), (32, 4, 2), 22784),
    (80, 'half', 128, 64): ((64, 8, 2, 128, 64), (32, 8, 2, 32, 32), (32, 4, 2), 32768),
    (80, 'half', 128, 128): ((64, 8, 2, 128, 128), (32, 4, 2, 32, 128), (32, 8, 2), 90368),
    (80, 'ieee', 16, 32): ((64, 4, 2, 16, 32), (64, 8, 2, 16, 32), (64, 4, 2), 30720),
    (80, 'ieee', 16, 64): ((64, 4, 2, 16, 64), (16, 8, 2, 16, 64), (64, 4, 2), 40960),
    (80, 'ieee', 16, 128): ((64, 8, 2, 16, 128), (16, 8, 1, 16, 128), (64, 4, 2), 77824),
    (80, 'ieee', 64, 32): ((64, 8, 2, 64, 32), (16, 8, 2, 64, 32), (32, 4, 2), 40960),
    (80, 'ieee', 64, 64): ((32, 8, 2, 64, 64), (16, 8, 1, 64, 64), (32, 4, 2), 61440),
    (80, 'ieee', 64, 128): ((16, 8, 1, 64, 128), (32, 8, 2, 32, 32), (32, 8, 2), 45312),
    (80, 'ieee', 128, 32): ((32, 8, 2, 128, 32), (16, 8, 1, 128, 32), (32, 8, 2), 67584),
    (80, 'ieee', 128, 64): ((16, 8, 1, 128, 64), (32, 8, 2, 32, 32), (32, 8, 2), 45056),
    (80, 'ieee', 128, 128): ((32, 8, 2, 32, 32), (32, 8, 2, 32, 32), (16, 8, 2), 65536),
    (80, 'tf32', 16, 32): ((64, 4, 2, 16, 32), (64, 8, 2, 16, 32), (64, 4, 2), 38912),
    (80, 'tf32', 16, 64): ((64, 4, 2, 16, 64), (32, 4, 2, 16, 64), (64, 4, 2), 45056),
    (80, 'tf32', 16, 128): ((64, 4, 2, 16, 128), (16, 4, 2, 16, 128), (64, 4, 2), 77824),
    (80, 'tf32', 64, 32): ((64, 4, 2, 64, 32), (64, 8, 2, 64, 32), (32, 4, 2), 81920),
    (80, 'tf32', 64, 64): ((64, 4, 2, 64, 64), (16, 8, 2, 64, 64), (32, 4, 2), 98304),
    (80, 'tf32', 64, 128): ((32, 8, 2, 64, 128), (32, 8, 2, 32, 32), (32, 8, 2), 73728),
    (80, 'tf32', 128, 32): ((64, 4, 2, 128, 32), (32, 4, 2, 32, 32), (32, 8, 2), 32768),
    (80, 'tf32', 128, 64): ((64, 8, 2, 128, 64), (32, 4, 2, 32, 64), (32, 8, 2), 65536),
    (80, 'tf32', 128, 128): ((32, 8, 2, 128, 128), (32, 8, 2, 32, 32), (16, 8, 2), 98304),
    (90, 'half', 16, 32): ((64, 4, 2, 16, 32), (64, 8, 2, 16, 32), (64, 4, 2), 15360),
    (90, 'half', 16, 64): ((64, 4, 2, 16, 64), (64, 8, 2, 16, 64), (64, 4, 2), 30720),
    (90, 'half', 16, 128): ((64, 4, 2, 16, 128), (64, 8, 2, 16, 128), (64, 4, 2), 61440),
    (90, 'half', 64, 32): ((64, 4, 2, 64, 32), (64, 8, 2, 64, 32), (64, 4, 2), 24576),
    (90, 'half', 64, 64): ((64, 4, 2, 64, 64), (64, 8, 2, 64, 64), (64, 4, 2), 40960),
    (90, 'half', 64, 128): ((64, 4, 2, 64, 128), (64, 8, 2, 64, 128), (32, 4, 2), 81920),
    (90, 'half', 128, 32): ((64, 4, 2, 128, 32), (64, 8, 2, 128, 32), (32, 4, 2), 45056),
    (90, 'half', 128, 64): ((64, 4, 2, 128, 64), (32, 8, 2, 128, 64), (32, 8, 2), 102400),
    (90, 'half', 128, 128): ((64, 8, 2, 128, 128), (32, 8, 2, 128, 128), (32, 8, 2), 188416),
    (90, 'ieee', 16, 32): ((64, 4, 2, 16, 32), (32, 8, 2, 16, 32), (64, 4, 2), 22528),
    (90, 'ieee', 16, 64): ((64, 4, 2, 16, 64), (16, 8, 2, 16, 64), (64, 4, 2), 40960),
    (90, 'ieee', 16, 128): ((64, 8, 2, 16, 128), (16, 8, 1, 16, 128), (64, 4, 2), 77824),
    (90, 'ieee', 64, 32): ((64, 4, 2, 64, 32), (16, 8, 2, 64, 32), (64, 4, 2), 40960),
    (90, 'ieee', 64, 64): ((32, 8, 2, 64, 64), (32, 8, 2, 32, 32), (32, 4, 2), 40960),
    (90, 'ieee', 64, 128): ((32, 8, 2, 32, 32), (32, 8, 2, 32, 32), (32, 8, 2), 45056),
    (90, 'ieee', 128, 32): ((64, 8, 2, 128, 32), (16, 8, 1, 128, 32), (32, 8, 2), 67584),
    (90, 'ieee', 128, 64): ((16, 8, 1, 128, 64), (32, 8, 2, 32, 32), (32, 8, 2), 45056),
    (90, 'ieee', 128, 128): ((32, 8, 2, 32, 32), (32, 8, 2, 32, 32), (16, 8, 2), 65536),
    (90, 'tf32', 16, 32): ((64, 4, 2, 16, 32), (64, 8, 2, 16, 32), (64, 4, 2), 47104),
    (90, 'tf32', 16, 64): ((64, 4, 2, 16, 64), (64, 8, 2, 16, 64), (64, 4, 2), 90112),
    (90, 'tf32', 16, 128): ((64, 4, 2, 16, 128), (16, 4, 2, 16, 128), (64, 4, 2), 77824),
    (90, 'tf32', 64, 32): ((64, 4, 2, 64, 32), (32, 4, 2, 64, 32), (64, 4, 2), 57344),
    (90, 'tf32', 64, 64): ((64, 4, 2, 64, 64), (32, 8, 2, 64, 64), (32, 4, 2), 114688),
    (90, 'tf32', 64, 128): ((64, 8, 2, 64, 128), (16, 8, 2, 64, 128), (32, 8, 2), 188416),
    (90, 'tf32', 128, 32): ((64, 4, 2, 128, 32), (16, 4, 2, 128, 32), (32, 8, 2), 102400),
    (90, 'tf32', 128, 64): ((64, 8, 2, 128, 64), (32, 8, 2, 128, 64), (32, 8, 2), 212992),
    (90, 'tf32', 128, 128): ((64, 8, 2, 128, 128), (32, 8, 2, 32, 32), (16, 8, 2), 196608),
}


M_PADS = (16, 64, 128)      # the padded m and d the kernels are compiled for (powers of two; m and d are runtime masks,
D_PADS = (32, 64, 128)      # so three sizes each bound the compiled variants: m = 17..64 all run as M_PAD = 64)


def pad_m(m: int) -> int:
    """m padded for the kernels: the smallest of ``M_PADS`` ≥ m."""
    return next((p for p in M_PADS if m <= p), 2 * M_PADS[-1])


def pad_d(d: int) -> int:
    """d padded for the kernels: the smallest of ``D_PADS`` ≥ d."""
    return next((p for p in D_PADS if d <= p), 2 * D_PADS[-1])


class Config(NamedTuple):
    """Tiles and launch settings for one (token dtype, float32 precision, M_PAD, D_PAD). Token kernels process blocks
    of ``*block_n`` tokens and ``*rep_block`` representatives (M_PAD: all at once) with the products over d in chunks
    of ``*d_chunk`` columns (D_PAD: whole)."""
    block_n: int        # extraction, broadcast, A G
    warps: int          # their num_warps
    stages: int         # their num_stages (software pipelining of the token loops)
    rep_block: int      # extraction and A G: one program per block of representatives; broadcast: a loop over them
    d_chunk: int
    bwd_block_n: int    # backward broadcast (∂W, ∂S W)
    bwd_warps: int
    bwd_stages: int
    bwd_rep_block: int  # M_PAD: one pass; fewer: a ∂W pass and a ∂S W pass (``_broadcast_bwd_blocks``)
    bwd_d_chunk: int    # (the one-pass kernel takes D_PAD only)
    pool_block_n: int   # pooling and its adjoint
    pool_warps: int
    pool_stages: int
    bm: int             # representatives per row block in the m×m kernels
    mm_warps: int       # their num_warps


def kind(dtype: torch.dtype, prec: str) -> str:
    """The table's token kind: 'half' for bf16 / fp16, the float32 product precision ('tf32' / 'ieee') otherwise."""
    return 'half' if dtype in (torch.float16, torch.bfloat16) else prec


def target(capability: Tuple[int, int]) -> int:
    """The compiled target whose table a device of this compute capability uses (90 for 9.0 and newer)."""
    return 90 if capability >= (9, 0) else 80


def config(dtype: torch.dtype, prec: str, m_pad: int, d_pad: int, arch: Optional[int]) -> Optional[Config]:
    """The launch configuration from ``TABLE`` for target ``arch``; None where refused. ``arch`` None (the
    interpreter): the sm_90 entry, else small blocks (16 representatives, d chunks of 16: every loop and pass)."""
    if dtype == torch.float64 or (arch is None and (90, kind(dtype, prec), m_pad, d_pad) not in TABLE):
        return Config(32, 4, 1, 16, 16, 32, 4, 1, 16, 16, 32, 4, 1, 16, 4)
    entry = TABLE.get((arch or 90, kind(dtype, prec), m_pad, d_pad))
    if entry is None:
        return None
    main, bwd, pool, _ = entry
    return Config(*main, *bwd, *pool, 16, 4)


def _kinds(dtype: Optional[torch.dtype]) -> List[Tuple[torch.dtype, str]]:
    """(dtype, table kind) pairs a dtype must have (float32: both precisions, since the switch is global)."""
    dts = [dtype] if dtype is not None else list(COMPILED_DTYPES)
    return [(dt, k) for dt in dts for k in (['tf32', 'ieee'] if dt == torch.float32 else ['half'])]


def shared_memory_reasons(head_dim: int, num_reps: int, dtype: Optional[torch.dtype], arch: int,
                          limit: int) -> List[str]:
    """Why the compiled kernels for (d, m, dtype; None: every compiled dtype) cannot run on target ``arch`` with
    ``limit`` bytes of shared memory per block: no spill-free configuration in ``TABLE``, or too much shared memory."""
    reasons = []
    for dt, k in _kinds(dtype):
        entry = TABLE.get((arch, k, pad_m(num_reps), pad_d(head_dim)))
        what = f'm={num_reps}, d={head_dim}, {dt}' + (f' ({k} products)' if dt == torch.float32 else '')
        if entry is None:
            reasons.append(f'{what}: no configuration of the kernels compiles without register spills on sm_{arch} '
                           '(tests/ops/test_triton_compile.py)')
        elif entry[3] > limit:
            reasons.append(f'{what} needs {entry[3]} B of shared memory per block, the device allows {limit} B')
    return reasons


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        from . import kernels  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means: Triton unusable here)
        return f'Triton is not importable ({type(e).__name__}: {e})'
    return None


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _device_limits(index: int):
    """(compute capability, shared memory per block with opt-in, SM count) of a CUDA device, read once."""
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, 'shared_memory_per_block_optin', 0) or getattr(p, 'shared_memory_per_block', 0)
    return (p.major, p.minor), int(smem), int(p.multi_processor_count)


def _dtype_reasons(dtype: Optional[torch.dtype], device: torch.device) -> List[str]:
    if dtype is None or dtype in COMPILED_DTYPES:
        return []
    if dtype == torch.float64:
        return [] if device.type == 'cpu' else ['float64 runs only in the interpreter (TRITON_INTERPRET=1)']
    return [f'dtype {dtype} is not supported (float32, float16, bfloat16)']


def not_supported_reasons(head_dim: int, num_reps: int, dtype: Optional[torch.dtype], device) -> List[str]:
    """Why the Triton kernels cannot run for (d, m, dtype, device); empty when they run. Static checks only: Triton
    importable; a CUDA device of compute capability ≥ 8.0 (or the CPU under ``TRITON_INTERPRET=1``); the dtype
    (None: all of float32 / float16 / bfloat16); 1 ≤ m ≤ 128 and 1 ≤ d ≤ 128; and the shared memory the compiled
    kernels need (``TABLE``, proven by the compile matrix) within the device's per-block opt-in limit; a configuration
    the table lacks (no spill-free compile) is refused."""
    device = torch.device(device)
    reasons = []
    err = _import_error()
    if err is not None:
        reasons.append(err)
    on_cuda = device.type == 'cuda'
    if not on_cuda and not (device.type == 'cpu' and _interpreting()):
        reasons.append(f'the Triton kernels need a CUDA device (got {device.type}; CPU only under TRITON_INTERPRET=1)')
    reasons += _dtype_reasons(dtype, device)
    if not (isinstance(num_reps, int) and 1 <= num_reps <= MAX_REPRESENTATIVES):
        reasons.append(f'{num_reps} representatives (the kernels take 1 to {MAX_REPRESENTATIVES})')
    if not (isinstance(head_dim, int) and 1 <= head_dim <= MAX_HEAD_DIM):
        reasons.append(f'head dim {head_dim} (the kernels take 1 to {MAX_HEAD_DIM})')
    if reasons or not on_cuda:
        return reasons
    if not torch.cuda.is_available():
        return ['CUDA is not available']
    cap, smem, _ = _device_limits(_index(device))
    if cap < MIN_CAPABILITY:
        reasons.append(f'compute capability {cap[0]}.{cap[1]} (the kernels need ≥ {MIN_CAPABILITY[0]}.'
                       f'{MIN_CAPABILITY[1]})')
    return reasons + shared_memory_reasons(head_dim, num_reps, dtype, target(cap), smem)


def fp32_precision() -> str:
    """'tf32' when torch lets float32 matmuls use TF32 (``torch.backends.cuda.matmul.fp32_precision`` /
    ``allow_tf32`` / ``set_float32_matmul_precision('high')``), else 'ieee'."""
    mm = torch.backends.cuda.matmul
    p = getattr(mm, 'fp32_precision', None)   # torch ≥ 2.9; reads the legacy switches too
    if p is None:
        return 'tf32' if mm.allow_tf32 else 'ieee'
    return 'tf32' if p == 'tf32' else 'ieee'


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def splits(n: int, bh: int, block_n: int, device: torch.device) -> int:
    """Chunks per (batch, head) for the token reductions: about two programs per SM in all, each chunk ≥ 4 token
    blocks. Under the interpreter: up to 3 chunks of one block (so that the CPU tests cover the merges)."""
    n_blocks = max(1, cdiv(n, block_n))
    if device.type == 'cuda':
        sms = _device_limits(_index(device))[2]
        want = max(1, min(cdiv(2 * sms, bh), n_blocks // 4))
    else:
        want = min(3, n_blocks)
    return cdiv(n_blocks, cdiv(n_blocks, want))


def chunk(n: int, n_splits: int, block_n: int) -> int:
    """Tokens per chunk (a multiple of block_n) so that ``n_splits`` chunks cover n, none empty."""
    return cdiv(max(1, cdiv(n, block_n)), n_splits) * block_n


def grid(bh: int, n: int, block_n: int):
    """(B·H, token blocks): B·H on axis 0 (2³¹ − 1 programs), the token blocks on axis 1 (≤ 65,535)."""
    return bh, max(1, cdiv(n, block_n))


class _Plan(NamedTuple):
    """Everything a launch needs that does not change between forward and backward."""
    B: int
    H: int
    N: int
    m: int
    d: int
    mp: int
    dp: int
    dt: torch.dtype      # the token dtype the kernels see (float32 for bf16 under the interpreter)
    sd: torch.dtype      # statistics / m×d dtype (ACC)
    prec: str            # token products
    mm_prec: str         # m×m algebra
    pool_prec: str       # pooling products (float32 tokens: two TF32 products instead, see kernels._dot_01)
    emu: bool            # interpreter bf16 emulation
    cfg: Config


def _plan(w: torch.Tensor, m: int, arch: Optional[int] = None) -> _Plan:
    """The launch plan; ``arch``: the target whose table to use (default: the device's; None on CPU)."""
    B, H, N, d = w.shape
    if arch is None and w.device.type == 'cuda':
        arch = target(_device_limits(_index(w.device))[0])
    emu = w.dtype == torch.bfloat16 and _interpreting()
    sd = torch.float64 if w.dtype == torch.float64 else torch.float32
    prec = fp32_precision() if w.dtype == torch.float32 else ('ieee' if w.dtype == torch.float64 else 'tf32')
    mp, dp = pad_m(m), pad_d(d)
    return _Plan(B, H, N, m, d, mp, dp, torch.float32 if emu else w.dtype, sd, prec,
                 'ieee' if sd == torch.float64 else 'tf32x3', 'ieee' if sd == torch.float64 else 'tf32', emu,
                 config(w.dtype, prec, mp, dp, arch))


def _like(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Empty (B, H, N, d) with w's memory layout ((B, N, H, d) for the usual head-split view: merging heads is free)."""
    if w.stride(1) < w.stride(2):
        B, H, N, d = w.shape
        return torch.empty(B, N, H, d, dtype=dtype, device=w.device).transpose(1, 2)
    return torch.empty(w.shape, dtype=dtype, device=w.device)


def _tok(pl: _Plan, kind: str = ''):
    """Launch constants of the token kernels: kind '' (extraction, broadcast, A G), 'bwd_' or 'pool_'."""
    c = pl.cfg
    return dict(M_PAD=pl.mp, D_PAD=pl.dp, BLOCK_N=getattr(c, kind + 'block_n'), num_warps=getattr(c, kind + 'warps'),
                num_stages=getattr(c, kind + 'stages'))


def _blocks(pl: _Plan, kind: str = ''):
    """The representative block and d chunk of kind '' or 'bwd_' (``Config``)."""
    return dict(BM=getattr(pl.cfg, kind + 'rep_block'), DK=getattr(pl.cfg, kind + 'd_chunk'))


def _pool_args(pool: PoolSpec, n: int):
    (gh, gw), (rh, rw) = pool.grid, pool.rep_grid
    return n - pool.trailing - gh * gw, gh, gw, rh, rw


def _representatives(K, pl: _Plan, w: torch.Tensor, r: Optional[torch.Tensor], pool: Optional[PoolSpec],
                     dtype: torch.dtype):
    """Q_ini as a zero-padded (B·H, M_PAD, D_PAD) ACC tensor holding values of the token dtype ``dtype``: the given
    r, or pooled from w by ``_pool_partial`` (partials summed in a fixed order, rounded to ``dtype``)."""
    BH = pl.B * pl.H
    if pool is None:
        q0 = torch.zeros(BH, pl.mp, pl.dp, dtype=pl.sd, device=w.device)
        q0.view(pl.B, pl.H, pl.mp, pl.dp)[:, :, :pl.m, :pl.d] = r.to(dtype)
        return q0
    p0, gh, gw, rh, rw = _pool_args(pool, pl.N)
    n_split = splits(gh * gw, BH, pl.cfg.pool_block_n, w.device)
    pq = torch.empty(n_split, BH, pl.mp, pl.dp, dtype=pl.sd, device=w.device)
    K._pool_partial[(BH, n_split)](
        w, pq, pl.H, pl.d, chunk(gh * gw, n_split, pl.cfg.pool_block_n), p0, gh, gw, rh, rw, *w.stride(),
        PREC=pl.pool_prec, EMU_BF16=pl.emu, **_tok(pl, 'pool_'))
    q0 = pq[0] if n_split == 1 else pq.sum(0)
    return q0 if dtype == pl.sd else q0.to(dtype).to(pl.sd)


def _forward(K, pl: _Plan, w, r0, eta, kap, scale: float):
    """The forward kernels on prepared inputs → (out, lse, z, q, c, lse_p)."""
    BH, dev, sd, mp, dp = pl.B * pl.H, w.device, pl.sd, pl.mp, pl.dp
    n_split = splits(pl.N, BH, pl.cfg.block_n, dev)
    pmx, pss = (torch.empty(n_split, BH, mp, dtype=sd, device=dev) for _ in range(2))
    pacc = torch.empty(n_split, BH, mp, dp, dtype=sd, device=dev)
    K._extract_partial[(BH, n_split, cdiv(pl.m, pl.cfg.rep_block))](
        w, r0, pmx, pss, pacc, pl.N, pl.H, pl.d, chunk(pl.N, n_split, pl.cfg.block_n), scale, *w.stride(),
        PREC=pl.prec, EMU_BF16=pl.emu, **_tok(pl), **_blocks(pl))
    lse, lse_p = (torch.empty(BH, mp, dtype=sd, device=dev) for _ in range(2))
    z, q, c = (torch.empty(BH, mp, dp, dtype=sd, device=dev) for _ in range(3))
    K._combine_contract[(BH,)](
        r0, eta, pmx, pss, pacc, lse, z, q, c, lse_p, pl.H, pl.m, pl.d, n_split, scale,
        M_PAD=mp, D_PAD=dp, BM=pl.cfg.bm, DK=min(dp, 32), MM_PREC=pl.mm_prec, num_warps=pl.cfg.mm_warps, num_stages=1)
    out = _like(w, w.dtype)
    K._broadcast_fwd[grid(BH, pl.N, pl.cfg.block_n)](
        w, r0, kap, lse, c, out, pl.N, pl.H, pl.m, pl.d, scale, *w.stride(), *out.stride(),
        PREC=pl.prec, EMU_BF16=pl.emu, **_tok(pl), **_blocks(pl))
    return out, lse, z, q, c, lse_p


def _backward(K, pl: _Plan, saved: Sequence[torch.Tensor], grad, eta, kap, scale: float, pool: Optional[PoolSpec]):
    """The backward kernels → (∂W in w's layout, ∂Q_ini padded (B·H, M_PAD, D_PAD) ACC, ∂η terms (B, H), ∂κ terms)."""
    w, r0, lse, z, q, c, lse_p = saved
    BH, dev, sd, mp, dp = pl.B * pl.H, w.device, pl.sd, pl.mp, pl.dp
    n_split = splits(pl.N, BH, pl.cfg.block_n, dev)
    ch = chunk(pl.N, n_split, pl.cfg.block_n)
    pag = torch.empty(n_split, BH, mp, dp, dtype=sd, device=dev)
    K._ag_partial[(BH, n_split, cdiv(pl.m, pl.cfg.rep_block))](
        w, r0, grad, lse, pag, pl.N, pl.H, pl.m, pl.d, ch, scale, *w.stride(), *grad.stride(),
        PREC=pl.prec, EMU_BF16=pl.emu, **_tok(pl), **_blocks(pl))
    dc, dz, dq = (torch.empty(BH, mp, dp, dtype=sd, device=dev) for _ in range(3))
    delta, dd = (torch.empty(BH, mp, dtype=sd, device=dev) for _ in range(2))
    deta, dkap = (torch.empty(BH, dtype=sd, device=dev) for _ in range(2))
    K._contract_bwd[(BH,)](
        eta, kap, pag, z, q, c, lse_p, dc, delta, dz, dq, dd, deta, dkap, pl.H, pl.m, pl.d, n_split, scale,
        M_PAD=mp, D_PAD=dp, BM=pl.cfg.bm, DK=min(dp, 32), MM_PREC=pl.mm_prec, num_warps=pl.cfg.mm_warps, num_stages=1)
    dw = _like(w, w.dtype)
    pdr = _broadcast_backward(K, pl, (w, r0, grad, kap, lse, c, dz, dd), dw, scale)
    dr = dq + (pdr[0] if pdr.shape[0] == 1 else pdr.sum(0))   # ∂Q_ini = ∂Q + s ∂S W (fixed order; rows ≥ m unused)
    if pool is not None:
        p0, gh, gw, rh, rw = _pool_args(pool, pl.N)
        K._pool_adjoint[grid(BH, gh * gw, pl.cfg.pool_block_n)](
            dr, dw, pl.H, pl.m, pl.d, p0, gh, gw, rh, rw, *dw.stride(), PREC=pl.pool_prec, EMU_BF16=pl.emu,
            **_tok(pl, 'pool_'))
    return dw, dr, deta.view(pl.B, pl.H), dkap.view(pl.B, pl.H)


def _broadcast_backward(K, pl: _Plan, args: Sequence[torch.Tensor], dw: torch.Tensor, scale: float) -> torch.Tensor:
    """∂W into ``dw`` → the per-chunk partials (SPLITS, B·H, M_PAD, D_PAD) of s ∂S W. One pass over the tokens
    (``bwd_rep_block`` = M_PAD), or a ∂W pass (a program per token block) and a ∂S W pass (a program per chunk and
    block of representatives), which hold smaller tiles at the cost of a second read of W and G."""
    w, grad = args[0], args[2]
    BH, bn, bm = pl.B * pl.H, pl.cfg.bwd_block_n, pl.cfg.bwd_rep_block
    n_split = splits(pl.N, BH, bn, w.device)
    ch = chunk(pl.N, n_split, bn)
    pdr = torch.empty(n_split, BH, pl.mp, pl.dp, dtype=pl.sd, device=w.device)
    strides = (*w.stride(), *grad.stride(), *dw.stride())
    const = dict(PREC=pl.prec, EMU_BF16=pl.emu, **_tok(pl, 'bwd_'))
    if bm >= pl.mp:
        K._broadcast_bwd[(BH, n_split)](*args, dw, pdr, pl.N, pl.H, pl.m, pl.d, ch, scale, *strides, **const)
        return pdr
    const.update(_blocks(pl, 'bwd_'))
    K._broadcast_bwd_blocks[grid(BH, pl.N, bn)](*args, dw, pdr, pl.N, pl.H, pl.m, pl.d, bn, scale, *strides, DR=False,
                                                **const)
    K._broadcast_bwd_blocks[(BH, n_split, cdiv(pl.m, bm))](*args, dw, pdr, pl.N, pl.H, pl.m, pl.d, ch, scale, *strides,
                                                           DR=True, **const)
    return pdr


def _step(x: torch.Tensor, H: int, sd: torch.dtype) -> torch.Tensor:
    return x.detach().reshape(H).to(sd)


class TritonContractBroadcast(torch.autograd.Function):
    """(w (B, H, N, d), r = Q_ini (B, H, m, d) or None, η, κ (H, 1, 1), s, pool) -> κ·Aᵀ C per head, (B, H, N, d)
    in w's layout. With ``pool`` (a ``PoolSpec``) and r None, Q_ini is pooled from w inside the kernels and its
    gradient goes into ∂W there. Gradients as in ``../fused.py``'s docstring."""

    @staticmethod
    def forward(ctx, w, r, step_rep, step_x, scale: float, pool: Optional[PoolSpec]):
        from . import kernels as K
        m = r.shape[-2] if pool is None else num_representatives(pool)
        pl = _plan(w, m)
        wk = w.float() if pl.emu else w
        eta, kap = _step(step_rep, pl.H, pl.sd), _step(step_x, pl.H, pl.sd)
        r0 = _representatives(K, pl, wk, r, pool, w.dtype)
        out, lse, z, q, c, lse_p = _forward(K, pl, wk, r0, eta, kap, scale)
        ctx.save_for_backward(w, r0, step_rep, step_x, lse, z, q, c, lse_p)
        ctx.scale, ctx.pool, ctx.plan, ctx.given_r = scale, pool, pl, r is not None
        return out.to(w.dtype) if pl.emu else out

    @staticmethod
    def backward(ctx, grad):
        w, r0, step_rep, step_x, lse, z, q, c, lse_p = ctx.saved_tensors
        try:
            return TritonContractBroadcast._kernel_backward(ctx, grad)
        except Exception as e:  # noqa: BLE001 (a failing backward kernel: recompute with the naive twin)
            if os.environ.get('TIMM_CBSA_STRICT_BACKEND', '0') == '1':
                raise
            _warn_once(f'CBSA Triton backward failed ({type(e).__name__}: {e}); gradients recomputed with the naive '
                       'reference (set TIMM_CBSA_STRICT_BACKEND=1 to raise instead)')
            r = None if not ctx.given_r else _unpad(r0, ctx.plan).to(w.dtype)
            grads = naive_backward(w, r, step_rep, step_x, ctx.scale, ctx.pool, grad)
            return grads + (None, None)

    @staticmethod
    def _kernel_backward(ctx, grad):
        from . import kernels as K
        w, r0, step_rep, step_x, lse, z, q, c, lse_p = ctx.saved_tensors
        pl = ctx.plan
        wk, gk = (w.float(), grad.float()) if pl.emu else (w, grad.to(w.dtype))
        eta, kap = _step(step_rep, pl.H, pl.sd), _step(step_x, pl.H, pl.sd)
        dw, dr, deta, dkap = _backward(K, pl, (wk, r0, lse, z, q, c, lse_p), gk, eta, kap, ctx.scale, ctx.pool)
        dr = _unpad(dr, pl).to(w.dtype) if ctx.given_r else None
        return (dw.to(w.dtype) if pl.emu else dw, dr, deta.sum(0).view(step_rep.shape).to(step_rep.dtype),
                dkap.sum(0).view(step_x.shape).to(step_x.dtype), None, None)


def _unpad(x: torch.Tensor, pl: _Plan) -> torch.Tensor:
    return x.view(pl.B, pl.H, pl.mp, pl.dp)[:, :, :pl.m, :pl.d]


_WARNED = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        _logger.warning(msg)


def naive_backward(w: torch.Tensor, r: Optional[torch.Tensor], step_rep: torch.Tensor, step_x: torch.Tensor,
                   scale: float, pool: Optional[PoolSpec], grad: torch.Tensor):
    """(∂W, ∂r or None, ∂η, ∂κ) of ``naive_contract_and_broadcast`` against ``grad``: the fallback when a backward
    kernel fails (it materialises the m×N probabilities)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (w, r, step_rep, step_x)]
        out = naive_contract_and_broadcast(leaves[0], leaves[2], leaves[3], scale, pool=pool, r=leaves[1])
        wanted = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype), allow_unused=True))
    return tuple(None if t is None else next(got) for t in leaves)


def contract_and_broadcast_triton(w: torch.Tensor, step_rep: torch.Tensor, step_x: torch.Tensor, scale: float,
                                  pool: Optional[PoolSpec] = None, r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w: (B, H, N, d) tokens -> (B, H, N, d) in w's memory layout: CBSA's contract-and-broadcast computed by the
    Triton kernels, differentiable w.r.t. w, r, step_rep, step_x. Q_ini: ``r`` (B, H, m, d), or pooled from w inside
    the kernels with ``pool`` (a ``PoolSpec``). Expects autocast off and w in the compute dtype. Raises ValueError
    naming the reason where the kernels cannot run (``not_supported_reasons``) or the arguments do not fit."""
    if (r is None) == (pool is None):
        raise ValueError('contract_and_broadcast_triton: pass exactly one of r and pool.')
    if w.dim() != 4 or step_rep.numel() != w.shape[1] or step_x.numel() != w.shape[1]:
        raise ValueError(f'contract_and_broadcast_triton: expected w (B, H, N, d) and step sizes with H values, got '
                         f'w {tuple(w.shape)}, step_rep {tuple(step_rep.shape)}, step_x {tuple(step_x.shape)}.')
    B, H, N, d = w.shape
    if r is not None and tuple(r.shape[:2]) + tuple(r.shape[3:]) != (B, H, d):
        raise ValueError(f'contract_and_broadcast_triton: r must be (B, H, m, d) = ({B}, {H}, m, {d}), got '
                         f'{tuple(r.shape)}.')
    if pool is not None and N - pool.trailing - pool.grid[0] * pool.grid[1] < 0:
        raise ValueError(f'contract_and_broadcast_triton: {N} tokens cannot hold the {pool.grid} patch grid and '
                         f'{pool.trailing} trailing tokens.')
    m = r.shape[-2] if r is not None else num_representatives(pool)
    reasons = not_supported_reasons(d, m, w.dtype, w.device)
    if not 1 <= N <= MAX_TOKENS:
        reasons.append(f'N={N} tokens (the kernels take 1 to {MAX_TOKENS})')
    if reasons:
        raise ValueError('CBSA Triton kernels cannot run here: ' + '; '.join(reasons) + '.')
    if B * H == 0:   # nothing to launch
        return naive_contract_and_broadcast(w, step_rep, step_x, scale, pool=pool, r=r)
    return TritonContractBroadcast.apply(w, r, step_rep, step_x, scale, pool)
