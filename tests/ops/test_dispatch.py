"""The operator's dispatch: static reasons, the choice made when a layer is built or moved (shown in its repr), no
check inside a forward, and what happens at run time (this call's dtype, a failing implementation)."""
import logging
import os

import pytest
import torch

from timm_cbsa.layers.cbsa import CBSA
from timm_cbsa.layers.config import get_backend
from timm_cbsa.ops import contract_broadcast as ops
from timm_cbsa.ops.contract_broadcast import lse, not_supported_reasons, select

from backend_checks import rel_errors, run_fwd_bwd  # tests/support

CPU = torch.device('cpu')
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get('TRITON_INTERPRET') == '1',
                             reason='checks the CPU answers (no CUDA, no interpreter)')
LOGGER = 'timm_cbsa.ops.contract_broadcast'


def _layer(**kw):
    torch.manual_seed(0)
    return CBSA(32, 2, grid_size=(4, 5), rep_grid=2, num_prefix_tokens=1, **kw), torch.randn(2, 21, 32)


@NO_CUDA
def test_static_reasons_on_cpu():
    assert not_supported_reasons('eager', 64, 64) == [] and not_supported_reasons('fused', 64, 64) == []
    assert not_supported_reasons('sdpa', 64, 64, torch.float32, CPU) == []
    assert any('CUDA' in r for r in not_supported_reasons('xformers', 64, 64, None, CPU))
    assert any('CUDA' in r for r in not_supported_reasons('triton', 64, 64, None, CPU))
    assert any('float64' in r for r in not_supported_reasons('sdpa', 64, 64, torch.float64, torch.device('cuda')))
    with pytest.raises(ValueError, match='Unknown CBSA implementation'):
        not_supported_reasons('flash', 64, 64)


@NO_CUDA
def test_select_follows_the_fallback_chain_with_reasons():
    assert select('auto', 64, 64, CPU) == ('fused', [])
    impl, why = select('xformers', 64, 64, CPU)
    assert impl == 'sdpa' and len(why) == 1 and why[0].startswith('xformers: ')
    impl, why = select('triton', 64, 64, CPU)
    assert impl == 'fused' and why[0].startswith('triton: ') and 'CUDA' in why[0]
    assert select('sdpa', 64, 64, CPU) == ('sdpa', [])
    with pytest.raises(ValueError, match='Unknown CBSA backend'):
        select('flash', 64, 64, CPU)


@NO_CUDA
def test_triton_request_on_cpu_is_decided_at_construction_logged_once_and_runs_fused(caplog, monkeypatch):
    monkeypatch.setattr(ops, '_WARNED', set())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        layer, x = _layer(backend='triton')
        _layer(backend='triton')
        ref = run_fwd_bwd(_layer(backend='fused')[0], x, 'fused')
        got = [layer(x) for _ in range(2)]
    msgs = [r.getMessage() for r in caplog.records if 'triton' in r.getMessage()]
    assert len(msgs) == 1 and "using 'fused'" in msgs[0] and 'CUDA' in msgs[0], msgs
    assert layer.impl == 'fused' and "backend='triton', impl='fused' (triton:" in repr(layer)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)


@NO_CUDA
def test_default_is_auto_and_runs_fused_on_cpu_silently(caplog):
    assert get_backend() == os.environ.get('TIMM_CBSA_BACKEND', 'auto')
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        layer, x = _layer()
        got = run_fwd_bwd(layer, x, 'auto')
    assert layer.impl == 'fused' and not caplog.records
    assert max(rel_errors(got, run_fwd_bwd(layer, x, 'fused'))) == 0


def test_no_selection_inside_a_forward(monkeypatch):
    """The choice is a constant of the layer: the forward consults no support check and no probe."""
    layer, x = _layer(backend='sdpa')
    for name in ('select', 'not_supported_reasons'):
        monkeypatch.setattr(ops, name, lambda *a, **k: pytest.fail('support checked inside a forward'))
    monkeypatch.setattr('timm_cbsa.layers.cbsa.select', lambda *a, **k: pytest.fail('selected inside a forward'))
    monkeypatch.setattr(lse, 'not_supported_reasons', lambda *a, **k: [])   # this call's cheap dtype check only
    layer(x).sum().backward()


def test_moving_a_layer_selects_again(monkeypatch):
    """.to() / .cuda() / .half() re-run the static choice for where the weights now are; rep_grid changes through
    configure_cbsa do too (m enters the checks)."""
    import timm
    import timm_cbsa
    seen = []
    real = ops.select
    monkeypatch.setattr('timm_cbsa.layers.cbsa.select',
                        lambda req, d, m, dev, *a: seen.append((req, d, m, torch.device(dev).type)) or real(req, d, m, dev))
    layer, _ = _layer(backend='fused')
    layer.to(torch.float64)
    layer.to('meta')
    assert seen == [('fused', 16, 4, 'cpu'), ('fused', 16, 4, 'cpu'), ('fused', 16, 4, 'meta')]
    model = timm.create_model('cbsa_vit_tiny', img_size=64, depth=1, rep_grid=2)
    seen.clear()
    timm_cbsa.configure_cbsa(model, rep_grid=4)
    assert seen == [('auto', 64, 16, 'cpu')]


def test_this_calls_dtype_falls_back_once_with_a_reason(monkeypatch, caplog):
    """An implementation the layer chose but this call's dtype rules out (here: sdpa told float64 is unsupported)
    runs 'fused', logged once; strict mode raises."""
    layer, x = _layer(backend='sdpa')
    layer = layer.double()
    monkeypatch.setattr(lse, 'not_supported_reasons',
                        lambda kind, d, dtype, dev: ['no float64 here'] if dtype == torch.float64 else [])
    monkeypatch.setattr(ops, '_WARNED', set())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = run_fwd_bwd(layer, x.double(), 'sdpa')
        run_fwd_bwd(layer, x.double(), 'sdpa')
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and 'no float64 here' in msgs[0], msgs
    assert max(rel_errors(got, run_fwd_bwd(layer, x.double(), 'fused'))) == 0
    monkeypatch.setenv('TIMM_CBSA_STRICT_BACKEND', '1')
    with pytest.raises(RuntimeError, match='no float64 here'):
        run_fwd_bwd(layer, x.double(), 'sdpa')


def test_operator_arguments_are_checked():
    w = torch.randn(1, 2, 5, 4)
    one = torch.ones(2, 1, 1)
    with pytest.raises(ValueError, match='either r'):
        ops.contract_and_broadcast(w, one, one, 0.5)
    with pytest.raises(ValueError, match=r'\(H, 1, 1\)'):
        ops.contract_and_broadcast(w, torch.ones(2), one, 0.5, r=torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match='Unknown CBSA implementation'):
        ops.contract_and_broadcast(w, one, one, 0.5, r=torch.randn(1, 2, 3, 4), impl='auto')
