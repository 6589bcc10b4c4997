"""The Triton path's static side, without a GPU or the interpreter: ``not_supported_reasons`` names every problem,
shared memory against a device limit, the launch geometry for huge B·H and N, and the float32 product precision that
follows torch's TF32 switch. (Numbers: test_triton_interpreter.py on CPU, test_triton_cuda.py on CUDA; the compiled
kernels: tests/ops/test_triton_compile.py.)"""
import importlib.util
import os

import pytest
import torch

from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
from timm_cbsa.ops.contract_broadcast.triton import function
from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton, not_supported_reasons

needs_triton = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='Triton is not installed')


@needs_triton
@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') == '1', reason='checks the non-interpreted CPU refusal')
def test_cpu_without_interpreter_is_refused_with_reason():
    reasons = not_supported_reasons(64, 64, torch.float32, 'cpu')
    assert len(reasons) == 1 and 'CUDA' in reasons[0], reasons
    w = torch.randn(1, 2, 17, 8)
    with pytest.raises(ValueError, match='need a CUDA device'):
        contract_and_broadcast_triton(w, torch.ones(2, 1, 1), torch.ones(2, 1, 1), 8 ** -0.5,
                                      pool=PoolSpec((4, 4), (2, 2), 0))


@needs_triton
def test_every_static_problem_is_named():
    reasons = not_supported_reasons(160, 256, torch.int32, 'cuda')
    text = ' | '.join(reasons)
    assert len(reasons) == 3 and '256 representatives' in text and 'head dim 160' in text and 'int32' in text, reasons
    assert any('float64' in r for r in not_supported_reasons(64, 64, torch.float64, 'cuda'))
    assert not_supported_reasons(64, 0, None, 'cuda')[0].startswith('0 representatives')
    if not torch.cuda.is_available():
        assert not_supported_reasons(64, 64, None, 'cuda') == ['CUDA is not available']


def test_arguments_that_do_not_fit_are_refused():
    w = torch.randn(1, 2, 10, 8)
    one = torch.ones(2, 1, 1)
    with pytest.raises(ValueError, match='exactly one of r and pool'):
        contract_and_broadcast_triton(w, one, one, 0.3)
    with pytest.raises(ValueError, match='cannot hold the'):
        contract_and_broadcast_triton(w, one, one, 0.3, pool=PoolSpec((3, 3), (1, 1), 2))
    with pytest.raises(ValueError, match=r'r must be \(B, H, m, d\)'):
        contract_and_broadcast_triton(w, one, one, 0.3, r=torch.randn(1, 2, 4, 7))


def test_shared_memory_and_refusals_come_from_the_table(monkeypatch):
    key = (90, 'half', 64, 64)
    need = function.TABLE[key][3]
    assert need > 0
    assert function.shared_memory_reasons(64, 64, torch.bfloat16, 90, need) == []
    reasons = function.shared_memory_reasons(64, 64, torch.float16, 90, need - 1)
    assert len(reasons) == 1 and f'needs {need} B' in reasons[0] and f'allows {need - 1} B' in reasons[0]
    # a configuration the table lacks is refused whatever the limit
    monkeypatch.delitem(function.TABLE, (80, 'half', 128, 64))
    reasons = function.shared_memory_reasons(64, 100, torch.bfloat16, 80, 1 << 30)
    assert len(reasons) == 1 and 'no configuration' in reasons[0] and 'sm_80' in reasons[0], reasons
    # float32 needs both products (the TF32 switch is global and may change after the check)
    both = function.shared_memory_reasons(32, 16, torch.float32, 90, 1 << 30)
    assert both == [] and (90, 'tf32', 16, 32) in function.TABLE and (90, 'ieee', 16, 32) in function.TABLE
    assert len(function.shared_memory_reasons(32, 16, None, 90, 0)) == 4     # fp32 (tf32, ieee), fp16, bf16


def test_table_configurations_launch():
    """Every TABLE entry gives a Config whose blocks the kernels and the m×m merges can use: token blocks ≥ 16,
    representative blocks and d chunks powers of two ≥ 16 dividing M_PAD / D_PAD (the m×m kernels read the token
    kernels' partials by row blocks of 16), the one-pass backward with whole d. The interpreter's None target falls
    back to sm_90 / small blocks."""
    for (arch, k, mp, dp) in function.TABLE:
        dt = torch.bfloat16 if k == 'half' else torch.float32
        cfg = function.config(dt, 'tf32' if k == 'half' else k, mp, dp, arch)
        assert cfg is not None and min(cfg.block_n, cfg.bwd_block_n, cfg.pool_block_n) >= 16
        for bm, dk in ((cfg.rep_block, cfg.d_chunk), (cfg.bwd_rep_block, cfg.bwd_d_chunk)):
            assert 16 <= bm <= mp and mp % bm == 0 and 16 <= dk <= dp and dp % dk == 0, (arch, k, mp, dp, cfg)
            assert bm % cfg.bm == 0
        assert cfg.bwd_rep_block < mp or cfg.bwd_d_chunk == dp
        # sm_80's table serves every 8.x device: within sm_86 / sm_89's 99 KB; sm_90's within 227 KB
        assert function.TABLE[(arch, k, mp, dp)][3] <= {80: 99 * 1024, 90: 227 * 1024}[arch], (arch, k, mp, dp)
    assert function.config(torch.bfloat16, 'tf32', 256, 64, 80) is None
    small = function.config(torch.float64, 'ieee', 128, 128, None)
    assert small is not None and small.rep_block == small.bwd_rep_block == small.d_chunk == 16


def test_padded_sizes_cover_every_m_and_d():
    """m and d map to the smallest compiled padded size that holds them (m = 17..64 runs as M_PAD = 64, d ≤ 32 as
    D_PAD = 32), so every 1 ≤ m, d ≤ 128 has a table key."""
    assert [function.pad_m(m) for m in (1, 16, 17, 25, 64, 65, 100, 128)] == [16, 16, 64, 64, 64, 128, 128, 128]
    assert [function.pad_d(d) for d in (1, 16, 32, 33, 64, 65, 128)] == [32, 32, 32, 64, 64, 128, 128]
    keys = {(mp, dp) for (_, _, mp, dp) in function.TABLE}
    assert {(function.pad_m(m), function.pad_d(d)) for m in range(1, 129) for d in range(1, 129)} <= keys


def test_launch_geometry_holds_huge_batch_heads_and_tokens():
    """B·H sits on grid axis 0 (up to 2³¹ − 1 programs), token blocks on axis 1 (≤ 65,535) for N up to MAX_TOKENS
    with the smallest token block of any configuration."""
    smallest = min(min(e[0][0], e[1][0], e[2][0]) for e in function.TABLE.values())
    bh = 1 << 20                                   # e.g. B = 65,536 images × 16 heads
    g = function.grid(bh, function.MAX_TOKENS, smallest)
    assert g == (bh, function.MAX_TOKENS // smallest) and g[1] <= 65535
    assert function.grid(6, 1, 64) == (6, 1)
    for n in (1, 63, 64, 65, 1000, function.MAX_TOKENS):
        for bh in (1, 7, 4096):
            s = function.splits(n, bh, 64, torch.device('cpu'))
            c = function.chunk(n, s, 64)
            assert c % 64 == 0 and s * c >= n and (s - 1) * c < n, (n, bh, s, c)   # every chunk holds tokens


def test_float32_products_follow_torch_tf32_switch():
    mm = torch.backends.cuda.matmul
    if getattr(mm, 'fp32_precision', None) is None:
        pytest.skip('torch without backends.cuda.matmul.fp32_precision')
    old = mm.fp32_precision
    try:
        mm.fp32_precision = 'tf32'
        assert function.fp32_precision() == 'tf32'
        assert function._plan(torch.empty(1, 1, 4, 8), 4).prec == 'tf32'
        mm.fp32_precision = 'ieee'
        assert function.fp32_precision() == 'ieee'
        assert function._plan(torch.empty(1, 1, 4, 8), 4).prec == 'ieee'
        assert function._plan(torch.empty(1, 1, 4, 8, dtype=torch.bfloat16), 4).prec == 'tf32'   # ignored for bf16
    finally:
        mm.fp32_precision = old
