"""CBSA layer against an independent, deliberately naive implementation of eq. (8) / Algorithm 1.

The reference below loops over batch and heads, computes the adaptive-pooling bins by hand and never calls the
library, so a mistake in the layer (pooling the wrong tokens, a transposed softmax, a missing step size) shows up.
"""
import math

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm_cbsa import CBSA


def _bins(size, out):
    # torch's adaptive pooling rule: bin i covers [floor(i*size/out), ceil((i+1)*size/out))
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def reference_cbsa(x, layer, grid, prefix, legacy=False, head_dim=None):
    """Naive eq. (8): per batch element and head, using the layer's parameters only (heads of width ``head_dim``,
    default C / H)."""
    B, N, C = x.shape
    H = layer.num_heads
    d = head_dim or C // H
    s = d ** -0.5
    rh, rw = layer.rep_grid
    gh, gw = grid
    z = x @ layer.qkv.weight.T
    if layer.qkv.bias is not None:
        z = z + layer.qkv.bias
    rows = []
    for b in range(B):
        heads = []
        for k in range(H):
            w = z[b, :, k * d:(k + 1) * d]                        # N x d projected tokens U_k^T Z
            pooled = w[:N - 1] if legacy else w[prefix:]          # released code: all but the last token
            g = pooled.reshape(gh, gw, d)
            q = torch.stack([g[h0:h1, w0:w1].reshape(-1, d).mean(0)
                             for h0, h1 in _bins(gh, rh) for w0, w1 in _bins(gw, rw)])   # m x d
            a = torch.softmax(q @ w.T * s, dim=1)                 # m x N, each row a distribution over tokens
            q = q + layer.step_rep[k, 0, 0] * (a @ w)
            contraction = torch.softmax(q @ q.T * s, dim=1) @ q   # m x d
            heads.append(layer.step_x[k, 0, 0] * (a.T @ contraction))
        rows.append(torch.cat(heads, dim=1))
    out = torch.stack(rows)
    return out @ layer.proj.weight.T + layer.proj.bias


CASES = [
    # dim, heads, grid, rep_grid, prefix, legacy
    (24, 3, (6, 6), (4, 4), 1, False),
    (24, 2, (5, 7), (3, 5), 0, False),
    (16, 4, (8, 8), (8, 8), 2, False),      # m = number of patches
    (24, 3, (4, 6), (2, 3), 5, False),      # register tokens
    (24, 3, (7, 3), (2, 2), 1, False),      # tall grid
    (24, 3, (6, 6), (4, 4), 1, True),       # released pooling
]


@pytest.mark.parametrize('dim,heads,grid,rep_grid,prefix,legacy', CASES)
def test_forward_and_gradients_match_reference(dim, heads, grid, rep_grid, prefix, legacy):
    layer = CBSA(dim, num_heads=heads, rep_grid=rep_grid, legacy_pool=legacy, backend='eager').double()
    with torch.no_grad():
        layer.proj.bias.normal_()
    n = prefix + grid[0] * grid[1]
    x = torch.randn(2, n, dim, dtype=torch.float64, requires_grad=True)
    out = layer(x, grid_size=grid)
    ref = reference_cbsa(x, layer, grid, prefix, legacy)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    g = torch.randn_like(out)
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((out * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for p, a, b in zip(['x'] + [n for n, _ in layer.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f'gradient of {p}')


@pytest.mark.parametrize('backend', ['eager', 'fused'])
@pytest.mark.parametrize('attn_head_dim', [5, 16])
def test_attn_head_dim_matches_reference(backend, attn_head_dim):
    """timm's ``attn_head_dim``: heads of width d independent of the token width C (Uᵀ: C -> H·d, output projection
    H·d -> C), as in the released segmentation decoder (3 heads x 100 inside 192- / 384-wide tokens)."""
    C, H, grid = 24, 3, (5, 6)
    layer = CBSA(C, num_heads=H, attn_head_dim=attn_head_dim, rep_grid=(2, 3), backend=backend).double()
    assert layer.qkv.weight.shape == (H * attn_head_dim, C) and layer.proj.weight.shape == (C, H * attn_head_dim)
    with torch.no_grad():
        layer.proj.bias.normal_()
    x = torch.randn(2, 1 + grid[0] * grid[1], C, dtype=torch.float64, requires_grad=True)
    out = layer(x, grid_size=grid)
    ref = reference_cbsa(x, layer, grid, 1, head_dim=attn_head_dim)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    params = [x] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_attn_head_dim_none_is_dim_over_heads():
    """The default (None) is C / H: the same parameters, shapes and random initialisation as attn_head_dim = C / H;
    a width that heads do not divide needs attn_head_dim; bad values are refused by name."""
    torch.manual_seed(0)
    default = CBSA(24, num_heads=3).state_dict()
    torch.manual_seed(0)
    explicit = CBSA(24, num_heads=3, attn_head_dim=8).state_dict()
    assert list(default) == list(explicit) and all(torch.equal(default[k], explicit[k]) for k in default)
    assert default['qkv.weight'].shape == (24, 24) and default['proj.weight'].shape == (24, 24)
    with pytest.raises(ValueError, match='not divisible.*attn_head_dim'):
        CBSA(25, num_heads=3)
    layer = CBSA(25, num_heads=3, attn_head_dim=10, rep_grid=2)
    assert layer(torch.randn(1, 16, 25), grid_size=(4, 4)).shape == (1, 16, 25)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match='attn_head_dim must be a positive int'):
            CBSA(24, num_heads=3, attn_head_dim=bad)


def test_every_parameter_matters():
    """Perturbing η, κ, Uᵀ or the output projection changes the output (nothing is silently unused)."""
    layer = CBSA(24, num_heads=3, rep_grid=4).double()
    x = torch.randn(1, 1 + 36, 24, dtype=torch.float64)
    base = layer(x, grid_size=(6, 6))
    for name, p in layer.named_parameters():
        with torch.no_grad():
            p.add_(0.1)
        assert not torch.allclose(layer(x, grid_size=(6, 6)), base), name
        with torch.no_grad():
            p.sub_(0.1)


def test_broadcast_is_not_renormalised():
    """Aᵀ's rows (per token, over representatives) are not normalised: doubling κ doubles the pre-projection output,
    and a token's weights over representatives do not sum to one."""
    layer = CBSA(8, num_heads=1, rep_grid=2, proj_bias=False).double()
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(8))
        layer.qkv.weight.copy_(torch.eye(8))
        layer.step_x.fill_(1.0)
        layer.step_rep.fill_(0.0)
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    w = x[0]
    q = torch.stack([w.reshape(4, 4, 8)[i:i + 2, j:j + 2].reshape(-1, 8).mean(0) for i in (0, 2) for j in (0, 2)])
    a = torch.softmax(q @ w.T / math.sqrt(8), dim=1)
    assert not torch.allclose(a.sum(0), torch.ones(16, dtype=torch.float64))
    y1 = layer(x, grid_size=(4, 4))
    with torch.no_grad():
        layer.step_x.fill_(2.0)
    torch.testing.assert_close(layer(x, grid_size=(4, 4)), 2 * y1)


def test_flops_are_the_closed_form():
    """Counted FLOPs = 2·(2·N·C² + 3·N·m·C + 2·m²·C): projections, extraction ×2, broadcast, contraction ×2."""
    C, N_side, m_side = 48, 12, 4
    layer = CBSA(C, num_heads=4, rep_grid=m_side).eval()
    for n_side in (N_side, 2 * N_side):
        N, m = 1 + n_side * n_side, m_side * m_side
        x = torch.randn(1, N, C)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            layer(x, grid_size=(n_side, n_side))
        assert counter.get_total_flops() == 2 * (2 * N * C * C + 3 * N * m * C + 2 * m * m * C)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_does_not_overflow(dtype):
    """Token norms that push fp16 logits past 65504 still give a finite result close to float32."""
    layer = CBSA(16, num_heads=1, rep_grid=2, proj_bias=False)
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.eye(16))
        layer.proj.weight.copy_(torch.eye(16) / 300.)
        layer.step_x.fill_(1.0)
        layer.step_rep.fill_(0.5)
    x = 300 * torch.randn(1, 1 + 16, 16)     # logits ~ 300² · 16 / 4 ≫ 65504
    ref = layer(x, grid_size=(4, 4))
    out = layer.to(dtype)(x.to(dtype), grid_size=(4, 4)).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_inside_timm_vit_uses_the_true_grid_and_skips_prefix_tokens():
    """A ViT with dynamic_img_size: each block's attention equals the reference at that batch's (non-square) grid."""
    model = timm.create_model(
        'vit_tiny_patch16_224', attn_layer='cbsa', depth=2, reg_tokens=2, dynamic_img_size=True,
        pretrained=False).double().eval()
    for layer in model.modules():
        if isinstance(layer, CBSA):
            layer.rep_grid = (3, 3)
    seen = []
    hook = model.blocks[1].attn.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    for hw, grid in [((64, 96), (4, 6)), ((112, 48), (7, 3))]:
        seen.clear()
        model(torch.randn(1, 3, *hw, dtype=torch.float64))
        x_in, out = seen[0]
        assert x_in.shape[1] == 3 + grid[0] * grid[1]
        torch.testing.assert_close(out, reference_cbsa(x_in, model.blocks[1].attn, grid, prefix=3))
    hook.remove()


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match='dim 30 is not divisible by num_heads 4'):
        CBSA(30, num_heads=4)
    layer = CBSA(16, num_heads=2, rep_grid=8)
    with pytest.raises(ValueError, match=r'patch grid 4x6 is smaller than the representative grid 8x8'):
        layer(torch.randn(1, 25, 16), grid_size=(4, 6))
    layer = CBSA(16, num_heads=2, rep_grid=2)
    with pytest.raises(ValueError, match='does not know the patch grid'):
        layer(torch.randn(1, 17, 16))
    with pytest.raises(ValueError, match=r'got 10 tokens but the patch grid 4x4 needs 16'):
        layer(torch.randn(1, 10, 16), grid_size=(4, 4))
    with pytest.raises(ValueError, match='cannot honour attn_mask'):
        layer(torch.randn(1, 17, 16), attn_mask=torch.zeros(17, 17), grid_size=(4, 4))
    with pytest.raises(ValueError, match='cannot honour attn_mask'):
        layer(torch.randn(1, 17, 16), is_causal=True, grid_size=(4, 4))
    layer.num_prefix_tokens = 1
    with pytest.raises(ValueError, match=r'got 18 tokens, expected 1 prefix \+ 4x4'):
        layer(torch.randn(1, 18, 16), grid_size=(4, 4))
    legacy = CBSA(16, num_heads=2, rep_grid=2, legacy_pool=True)
    with pytest.raises(ValueError, match='exactly one prefix'):
        legacy(torch.randn(1, 18, 16), grid_size=(4, 4))
    with pytest.raises(ValueError, match='Unknown CBSA backend'):
        CBSA(16, num_heads=2, rep_grid=2, backend='nope')


@pytest.mark.parametrize('bad', [0, -1, True, 2.5, (2, 0), (4,), '4', None])
def test_bad_rep_grid_is_refused_at_construction(bad):
    """rep_grid is checked when the layer is built (not a ZeroDivisionError / shape error at forward time)."""
    if bad is None:   # None means the default (8)
        assert CBSA(16, num_heads=2, rep_grid=8).rep_grid == (8, 8)
        return
    with pytest.raises(ValueError, match=r'rep_grid must be a positive int or a pair of positive ints.*got '
                                         + re.escape(repr(bad))):
        CBSA(16, num_heads=2, rep_grid=bad)


@pytest.mark.parametrize('bad', [0, -2, True, 2.0])
def test_bad_num_heads_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match=r'num_heads must be a positive int, got ' + re.escape(repr(bad))):
        CBSA(16, num_heads=bad)
