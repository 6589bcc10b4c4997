"""CBSA backends: parity with the eager reference (outputs + gradients), the memory-saving backward, selection,
and tracing (torch.fx, TorchScript, torch.compile(fullgraph=True)). CPU-only and fast; CUDA / xformers runs are in
tests/gpu/."""
import logging
import os
import subprocess
import sys

import pytest
import timm
import torch

import timm_cbsa
from timm_cbsa.layers.config import BACKENDS, get_backend, set_backend, use_backend
from timm_cbsa.ops import contract_broadcast as ops
from timm_cbsa.ops.contract_broadcast import contract_and_broadcast, fused, lse
from timm_cbsa.ops.contract_broadcast.fused import ContractBroadcast
from timm_cbsa.layers.cbsa import CBSA

from backend_checks import rel_errors, run_fwd_bwd  # tests/support

FUSED = [b for b in BACKENDS if b != 'eager']
BACKENDS = list(BACKENDS)


def _layer(grid, rep, prefix, dim=64, heads=4):
    torch.manual_seed(0)
    layer = CBSA(dim, heads, qkv_bias=True, grid_size=grid, rep_grid=rep, num_prefix_tokens=prefix)
    with torch.no_grad():   # signs of the step sizes are free: cover both
        layer.step_rep.copy_(torch.tensor([0.7, -1.2, 0.3, 1.5]).view(4, 1, 1))
        layer.step_x.copy_(torch.tensor([-0.5, 1.1, 0.9, -1.3]).view(4, 1, 1))
    return layer, torch.randn(3, prefix + grid[0] * grid[1], dim)


CASES = [((14, 14), 8, 1), ((5, 7), (2, 3), 0), ((6, 6), 4, 2), ((8, 12), (4, 6), 1)]   # the last: equal windows
STEP_GRADS = (4, 5)   # indices of ∂step_rep, ∂step_x in run_fwd_bwd's list (out, dx, qkv.w, qkv.b, step_rep, step_x, ...)


@pytest.mark.parametrize('backend', FUSED)
@pytest.mark.parametrize('grid,rep,prefix', CASES)
def test_parity_fp32(backend, grid, rep, prefix):
    layer, x = _layer(grid, rep, prefix)
    errs = rel_errors(run_fwd_bwd(layer, x, backend), run_fwd_bwd(layer, x, 'eager'))
    assert max(errs) <= 1e-5, f'{backend}: max relative errors (out, dx, params...) {errs}'


@pytest.mark.parametrize('backend', FUSED)
@pytest.mark.parametrize('grid,rep,prefix', CASES)
def test_parity_bf16(backend, grid, rep, prefix):
    """bf16 vs eager bf16 ≤ 2e-2 on outputs and input grads; every gradient vs a float64 reference ≤ 2e-2, except the
    two per-head step-size gradients (a sum over B·m·d products with cancellation: eager bf16 itself is ~9 % off
    there), held to ≤ 5e-2."""
    layer, x = _layer(grid, rep, prefix)
    ref64 = run_fwd_bwd(layer.double(), x.double(), 'eager')
    layer = layer.bfloat16()
    eager = run_fwd_bwd(layer, x.bfloat16(), 'eager')
    got = run_fwd_bwd(layer, x.bfloat16(), backend)
    vs_eager = rel_errors(got[:2], eager[:2])
    assert max(vs_eager) <= 2e-2, f'{backend} vs eager bf16: {vs_eager}'
    vs_ref = rel_errors(got, ref64)
    for i, e in enumerate(vs_ref):
        assert e <= (5e-2 if i in STEP_GRADS else 2e-2), f'{backend} vs float64: {vs_ref}'


@pytest.mark.parametrize('impl', ['fused', 'cpu_flash', 'explicit'])
def test_gradcheck_float64(impl):
    torch.manual_seed(0)
    B, H, N, d, m = 2, 2, 11, 4, 3
    w = torch.randn(B, N, H, d, dtype=torch.float64).transpose(1, 2).requires_grad_()
    r = torch.randn(B, H, m, d, dtype=torch.float64, requires_grad=True)
    eta = torch.randn(H, 1, 1, dtype=torch.float64, requires_grad=True)
    kap = torch.randn(H, 1, 1, dtype=torch.float64, requires_grad=True)
    impl_ = 'fused' if impl == 'explicit' else impl
    # 'explicit': the single batched block used on GPU and under torch.compile; else one head per block
    old, fused._BLOCK_BYTES = fused._BLOCK_BYTES, (1 << 40) if impl == 'explicit' else 1
    try:
        assert torch.autograd.gradcheck(lambda *a: ContractBroadcast.apply(*a, d ** -0.5, impl_), (w, r, eta, kap))
    finally:
        fused._BLOCK_BYTES = old


@pytest.mark.parametrize('grid,rep,legacy', [((3, 4), (3, 2), False), ((3, 5), (2, 2), True), ((3, 4), (3, 2), True)])
@pytest.mark.parametrize('budget', [1, 1500, 1 << 40])
def test_gradcheck_float64_pooling_inside(grid, rep, legacy, budget):
    """Q_ini pooled inside the function (equal windows / overlapping adaptive windows / legacy), per-head blocks,
    batched blocks of two and one batch element (scratch buffers sliced to each) and one batched block: float64
    gradcheck, and the forward equals pooling outside."""
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec, pool_representatives
    torch.manual_seed(0)
    B, H, d = 3, 2, 3
    N = 1 + grid[0] * grid[1] + (0 if legacy else 1)   # legacy: one class token; else two prefix tokens
    w = torch.randn(B, N, H, d, dtype=torch.float64).transpose(1, 2).requires_grad_()
    eta = torch.randn(H, 1, 1, dtype=torch.float64, requires_grad=True)
    kap = torch.randn(H, 1, 1, dtype=torch.float64, requires_grad=True)
    pool = PoolSpec(grid, rep, 1 if legacy else 0)
    old, fused._BLOCK_BYTES = fused._BLOCK_BYTES, budget
    try:
        blocks = fused._blocks(B, H, N, rep[0] * rep[1], w.device)
        assert len(blocks) == {1: B * H, 1500: 2, 1 << 40: 1}[budget] and blocks[0][1] == (budget > 1)
        fn = lambda *a: ContractBroadcast.apply(a[0], None, a[1], a[2], d ** -0.5, 'fused', pool)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (w, eta, kap))
        r = pool_representatives(w, pool)
        torch.testing.assert_close(fn(w, eta, kap), ContractBroadcast.apply(w, r, eta, kap, d ** -0.5, 'fused'))
    finally:
        fused._BLOCK_BYTES = old


def test_legacy_pool_fused_matches_eager():
    torch.manual_seed(0)
    layer = CBSA(64, 4, grid_size=(8, 8), rep_grid=4, legacy_pool=True)
    x = torch.randn(2, 65, 64)
    assert max(rel_errors(run_fwd_bwd(layer, x, 'fused'), run_fwd_bwd(layer, x, 'eager'))) <= 1e-5


@pytest.mark.parametrize('budget', [1, 10_000, 40_000])
def test_blocking_matches_unblocked(monkeypatch, budget):
    """Tiny block budgets (one head per block; head groups of two and one; several batch elements per block, three
    then two) give the default's numbers."""
    torch.manual_seed(0)
    layer = CBSA(48, 3, grid_size=(8, 8), rep_grid=4, num_prefix_tokens=1)
    x = torch.randn(5, 65, 48)
    ref = run_fwd_bwd(layer, x, 'fused')
    monkeypatch.setattr(fused, '_BLOCK_BYTES', budget)
    assert len(fused._blocks(5, 3, 65, 16, x.device)) == {1: 15, 10_000: 10, 40_000: 2}[budget]
    got = run_fwd_bwd(layer, x, 'fused')
    assert max(rel_errors(got, ref)) < 1e-6


def test_autocast_bf16_matches_eager():
    """Under CPU autocast (bf16 tokens, float32 parameters) the fused path, which turns autocast off inside and handles
    precision itself, matches the eager path within bf16 tolerance and returns the same dtype."""
    layer, x = _layer((6, 6), 4, 1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eager = run_fwd_bwd(layer, x, 'eager')
        got = run_fwd_bwd(layer, x, 'fused')
    assert got[0].dtype == eager[0].dtype
    errs = rel_errors(got, eager)
    assert max(errs) <= 5e-2, errs


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_memory_not_above_flash_sdpa():
    """Issue target: saved-for-backward at N=3137 no larger than flash-SDPA attention's (eager CBSA keeps ~1.4×)."""
    from timm.layers import Attention
    torch.manual_seed(0)
    x = torch.randn(1, 3137, 384, requires_grad=True)
    cbsa = CBSA(384, 6, grid_size=(56, 56), num_prefix_tokens=1)
    attn = Attention(384, 6, qkv_bias=True)
    sdpa = _saved_bytes(lambda: attn(x))
    eager = _saved_bytes(lambda: (setattr(cbsa, 'backend', 'eager'), cbsa(x)))
    for b in ('fused', 'sdpa'):
        cbsa.backend = b
        fused = _saved_bytes(lambda: cbsa(x))
        assert fused <= sdpa, f'{b}: saved {fused / 2**20:.1f} MB > SDPA {sdpa / 2**20:.1f} MB'
        assert fused < 0.75 * eager


def test_output_layout_makes_merge_free(monkeypatch):
    """On the blocked CPU path the result has W's (B, N, H, d) memory layout: merging heads is a view, not a copy."""
    monkeypatch.setattr(fused, '_BLOCK_BYTES', 1)
    B, H, N, d, m = 2, 3, 20, 8, 4
    w = torch.randn(B, N, H, d).transpose(1, 2)
    r = torch.randn(B, H, m, d)
    out = contract_and_broadcast(w, torch.ones(H, 1, 1), torch.ones(H, 1, 1), d ** -0.5, r=r, impl='fused')
    assert out.transpose(1, 2).is_contiguous()


def test_backend_is_decided_at_construction_shown_in_repr_and_changeable_per_model():
    default = get_backend()
    before = CBSA(32, 2, grid_size=(4, 4), rep_grid=2)
    set_backend('sdpa')
    try:
        after = CBSA(32, 2, grid_size=(4, 4), rep_grid=2)
        explicit = CBSA(32, 2, grid_size=(4, 4), rep_grid=2, backend='eager')
    finally:
        set_backend(default)
    assert (before.backend, after.backend, explicit.backend) == (default, 'sdpa', 'eager')
    assert "backend='sdpa'" in repr(after)
    model = _tiny('fused')
    with use_backend(model, 'eager'):
        assert {b.attn.backend for b in model.blocks} == {'eager'}
    assert {b.attn.backend for b in model.blocks} == {'fused'}
    timm_cbsa.configure_cbsa(model, backend='sdpa')
    assert {b.attn.backend for b in model.blocks} == {'sdpa'}
    with pytest.raises(ValueError, match='Unknown CBSA backend'):
        set_backend('flash')
    with pytest.raises(ValueError, match='Unknown CBSA backend'):
        CBSA(32, 2, backend='nope')
    with pytest.raises(TypeError, match='use_backend takes the model'):
        with use_backend('sdpa'):
            pass


def _no_fused_calls(monkeypatch):
    monkeypatch.setattr('timm_cbsa.layers.cbsa.contract_and_broadcast',
                        lambda *a, **k: pytest.fail('a fused backend ran where eager was selected'))
    monkeypatch.setattr('timm_cbsa.layers.family.F.scaled_dot_product_attention',
                        lambda *a, **k: pytest.fail('SDPA ran where eager was selected'))


@pytest.mark.parametrize('switch', ['set_fused_attn', 'set_exportable'])
def test_timm_switches_select_the_eager_path(switch, monkeypatch):
    """timm's own switches (set_fused_attn(False), set_exportable(True)) give every CBSA-family layer built under
    them the eager reference path."""
    from timm.layers import config, set_exportable, set_fused_attn
    from timm_cbsa.layers.family import FAMILY_ATTN_LAYERS
    monkeypatch.setattr(config, '_USE_FUSED_ATTN', config._USE_FUSED_ATTN)
    monkeypatch.setattr(config, '_EXPORTABLE', config._EXPORTABLE)
    set_fused_attn(False) if switch == 'set_fused_attn' else set_exportable(True)
    model = timm.create_model('vit_tiny_patch16_224', attn_layer='cbsa', img_size=128, depth=1).eval()
    layers = [model.blocks[0].attn] + [FAMILY_ATTN_LAYERS[n](32, num_heads=2, grid_size=(4, 4), rep_grid=2).eval()
                                       for n in ('cbsa_star', 'agent', 'agent_qkv')]
    assert [getattr(m, 'backend') for m in layers] == ['eager'] * 4
    _no_fused_calls(monkeypatch)
    model(torch.randn(1, 3, 128, 128))
    for m in layers[1:]:
        m(torch.randn(1, 16, 32))


def test_environment_variables():
    code = ('import timm_cbsa.layers.config as b, timm_cbsa; '
            'print(b.get_backend(), timm_cbsa.CBSA(8, 2).backend)')
    for env, want in (({'TIMM_CBSA_BACKEND': 'sdpa'}, 'sdpa sdpa'), ({'TIMM_FUSED_ATTN': '0'}, 'auto eager')):
        out = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, **env), capture_output=True,
                             text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == want, out.stderr


def test_kernel_failing_at_run_time_falls_back_once_with_a_reason(monkeypatch, caplog):
    layer, x = _layer((6, 6), 4, 2)
    ref = run_fwd_bwd(layer, x, 'fused')

    def broken(*a, **k):
        raise RuntimeError('kernel exploded')

    monkeypatch.setitem(lse.LSE_FUNCTIONS, 'cpu_flash', broken)
    monkeypatch.setattr(ops, '_WARNED', set())
    monkeypatch.setattr(ops, '_FAILED', {})
    with caplog.at_level(logging.WARNING, logger='timm_cbsa.ops.contract_broadcast'):
        got = run_fwd_bwd(layer, x, 'sdpa')
        run_fwd_bwd(layer, x, 'sdpa')
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and 'kernel exploded' in msgs[0] and "using 'fused'" in msgs[0], msgs
    assert max(rel_errors(got, ref)) == 0
    monkeypatch.setattr(ops, '_FAILED', {})
    monkeypatch.setenv('TIMM_CBSA_STRICT_BACKEND', '1')
    with pytest.raises(RuntimeError, match='kernel exploded'):
        run_fwd_bwd(layer, x, 'sdpa')


@pytest.mark.parametrize('backend', FUSED)
def test_autocast_runs_products_in_the_autocast_dtype(backend):
    """CPU autocast (bfloat16) with qk_norm: W reaches the layer in float32 (LayerNorm runs in float32 under
    autocast), the fused path must still compute in bfloat16 like the eager one; its backward does not depend on an
    enclosing autocast region."""
    torch.manual_seed(0)
    layer = CBSA(64, 4, qkv_bias=True, qk_norm=True, grid_size=(6, 6), rep_grid=3, num_prefix_tokens=1)
    x = torch.randn(2, 37, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eager = run_fwd_bwd(layer, x, 'eager')
        got = run_fwd_bwd(layer, x, backend)
    ref32 = run_fwd_bwd(layer, x, 'eager')
    vs_eager, vs_32 = rel_errors(got[:2], eager[:2]), rel_errors(got[:2], ref32[:2])
    assert max(vs_eager) <= 2e-2, vs_eager
    assert vs_32[0] > 1e-4, 'the fused path ran in float32 under autocast'
    # backward inside vs outside an autocast region: the same gradients
    layer.backend = backend
    xx = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(xx)
    g = torch.randn_like(y)
    (dx_out,) = torch.autograd.grad(y, xx, g, retain_graph=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (dx_in,) = torch.autograd.grad(y, xx, g)
    assert torch.equal(dx_in, dx_out)


@pytest.mark.parametrize('backend', BACKENDS)
def test_empty_batch_forward_and_backward(backend):
    layer, x = _layer((6, 6), 4, 2)
    got = run_fwd_bwd(layer, x[:0], backend)
    assert got[0].shape == (0,) + x.shape[1:]
    for g in got[1:]:
        assert torch.count_nonzero(g) == 0


def test_attention_dropout_forces_eager(monkeypatch):
    calls = []
    monkeypatch.setattr('timm_cbsa.layers.cbsa.contract_and_broadcast',
                        lambda *a, **k: calls.append(1) or pytest.fail('fused path used with attn_drop'))
    layer = CBSA(32, 2, grid_size=(4, 4), rep_grid=2, attn_drop=0.1, backend='fused').train()
    layer(torch.randn(2, 17, 32))
    assert not calls


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU fallback of the xformers backend')
def test_xformers_falls_back_on_cpu_at_construction_with_one_logged_reason(caplog, monkeypatch):
    """Decided when the layer is built (and shown in its repr), logged once, the sdpa numbers."""
    monkeypatch.setattr(ops, '_WARNED', set())
    with caplog.at_level(logging.WARNING, logger='timm_cbsa.ops.contract_broadcast'):
        layers = [CBSA(32, 2, grid_size=(4, 4), rep_grid=2, backend='xformers') for _ in range(2)]
    msgs = [r.getMessage() for r in caplog.records if 'xformers' in r.getMessage()]
    assert len(msgs) == 1 and "using 'sdpa'" in msgs[0] and 'CUDA' in msgs[0], msgs
    assert layers[0].impl == 'sdpa' and "impl='sdpa' (xformers:" in repr(layers[0])
    x = torch.randn(2, 17, 32)
    ref = run_fwd_bwd(layers[0], x, 'sdpa')
    assert max(rel_errors(run_fwd_bwd(layers[0], x, 'xformers'), ref)) == 0
    monkeypatch.setenv('TIMM_CBSA_STRICT_BACKEND', '1')
    with pytest.raises(RuntimeError, match='cannot run here'):
        run_fwd_bwd(layers[0], x, 'xformers')


def _tiny(backend, scriptable=False):
    from timm.layers import set_layer_config
    torch.manual_seed(0)
    with set_layer_config(scriptable=scriptable):
        return timm.create_model('cbsa_vit_tiny', img_size=64, depth=2, rep_grid=2, num_classes=10,
                                 backend=backend).eval()


@pytest.mark.parametrize('backend', BACKENDS)
def test_fx_symbolic_trace(backend):
    model = _tiny(backend)
    x = torch.randn(2, 3, 64, 64)
    gm = torch.fx.symbolic_trace(model)
    targets = [getattr(n.target, '__name__', str(n.target)) for n in gm.graph.nodes if n.op == 'call_function']
    if backend != 'eager':
        assert '_dispatch' in targets, 'the operator call must stay one FX leaf'
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_torchscript(backend):
    model = _tiny(backend, scriptable=True)
    x = torch.randn(2, 3, 64, 64)
    scripted = torch.jit.script(model)   # scripting always runs the eager math (CBSA.forward)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = _tiny(backend).train()
    x = torch.randn(2, 3, 64, 64)
    ref_model = _tiny('eager').train()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    y = compiled(x)
    y.square().mean().backward()
    y_ref = ref_model(x)
    y_ref.square().mean().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for (n, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f'{n}: {m}')
