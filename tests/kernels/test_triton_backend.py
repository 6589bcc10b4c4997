"""backend='triton' outside the interpreter on CPU: it falls back to 'fused' with one logged reason and the fused
numbers, and the default ('auto') stays 'fused' on CPU without logging. The kernels themselves are tested in
test_triton_interpreter.py (CPU) and test_triton_cuda.py (CUDA)."""
import logging
import os

import pytest
import torch

from timm_cbsa.layers import backends
from timm_cbsa.layers.cbsa import CBSA

from backend_checks import rel_errors, run_fwd_bwd  # tests/support

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get('TRITON_INTERPRET') == '1',
                                reason='checks the CPU fallback (no CUDA, no interpreter)')


def _layer():
    torch.manual_seed(0)
    return CBSA(32, 2, grid_size=(4, 5), rep_grid=2, num_prefix_tokens=1), torch.randn(2, 21, 32)


def test_triton_falls_back_to_fused_on_cpu_with_one_logged_reason(caplog):
    backends._WARNED.clear()
    layer, x = _layer()
    with caplog.at_level(logging.WARNING, logger='timm_cbsa.layers.backends'):
        ref = run_fwd_bwd(layer, x, 'fused')
        got = run_fwd_bwd(layer, x, 'triton')
        run_fwd_bwd(layer, x, 'triton')
    msgs = [r.getMessage() for r in caplog.records if 'triton' in r.getMessage()]
    assert len(msgs) == 1 and "falling back to 'fused'" in msgs[0] and 'CUDA' in msgs[0], msgs
    assert max(rel_errors(got, ref)) == 0


def test_default_is_auto_and_runs_fused_on_cpu_silently(caplog):
    assert backends.get_backend() == os.environ.get('TIMM_CBSA_BACKEND', 'auto')
    layer, x = _layer()
    with caplog.at_level(logging.WARNING, logger='timm_cbsa.layers.backends'):
        got = run_fwd_bwd(layer, x, 'auto')
    assert not [r for r in caplog.records if 'triton' in r.getMessage()]
    assert max(rel_errors(got, run_fwd_bwd(layer, x, 'fused'))) == 0
