"""Representative pooling (ops/contract_broadcast/pooling.py) against window means written out cell by cell."""
from unittest import mock

import pytest
import torch

from timm_cbsa.layers.cbsa import CBSA
from timm_cbsa.ops.contract_broadcast import pooling
from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec, pool_adjoint, pool_representatives, pooled_tokens


def _windows(size, out):
    """adaptive_avg_pool's 1-D windows: [floor(i·size/out), ceil((i+1)·size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _reference(w, grid, rep, first):
    """Q_ini by explicit loops over the representative grid (w: (…, N, d); patch tokens start at ``first``)."""
    gh, gw = grid
    t = w[..., first:first + gh * gw, :].reshape(*w.shape[:-2], gh, gw, w.shape[-1])
    reps = [t[..., r0:r1, c0:c1, :].mean(dim=(-3, -2)) for r0, r1 in _windows(gh, rep[0]) for c0, c1 in _windows(gw, rep[1])]
    return torch.stack(reps, dim=-2)


CASES = [   # grid, rep_grid, prefix, trailing
    ((8, 8), (4, 4), 1, 0),      # equal windows
    ((14, 14), (8, 8), 1, 0),    # overlapping windows (224 px, patch 16)
    ((9, 11), (7, 7), 2, 0),     # non-square, two prefix tokens
    ((5, 7), (5, 7), 0, 3),      # one patch per representative, three trailing tokens
    ((32, 32), (10, 10), 0, 150),   # the segmentation decoder: 512 px, patch 16, m = 100, 150 class embeddings
]


@pytest.mark.parametrize('grid,rep,prefix,trailing', CASES)
def test_pooling_matches_window_means(grid, rep, prefix, trailing):
    w = torch.randn(2, 3, prefix + grid[0] * grid[1] + trailing, 5, dtype=torch.float64)
    spec = PoolSpec(grid, rep, trailing)
    want = _reference(w, grid, rep, prefix)
    torch.testing.assert_close(pool_representatives(w, spec), want, rtol=0, atol=1e-12)
    with mock.patch.object(pooling, 'is_exporting', lambda: True):     # the matrices used while exporting
        torch.testing.assert_close(pool_representatives(w, spec), want, rtol=0, atol=1e-12)


def test_legacy_pooling_is_everything_but_the_last_token():
    """The released code pools w[:, :-1] as an H_p×W_p grid: class token in cell (0, 0), last patch dropped."""
    w = torch.randn(2, 3, 1 + 14 * 14, 4, dtype=torch.float64)
    torch.testing.assert_close(pool_representatives(w, PoolSpec((14, 14), (8, 8), 1)),
                               _reference(w, (14, 14), (8, 8), 0), rtol=0, atol=1e-12)


@pytest.mark.parametrize('grid,rep,prefix,trailing', CASES)
def test_adjoint_is_the_gradient_of_pooling(grid, rep, prefix, trailing):
    spec = PoolSpec(grid, rep, trailing)
    w = torch.randn(2, 3, prefix + grid[0] * grid[1] + trailing, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, rep[0] * rep[1], 4, dtype=torch.float64)
    (dw,) = torch.autograd.grad(pool_representatives(w, spec), w, g)
    torch.testing.assert_close(pool_adjoint(g, spec), pooled_tokens(dw, spec), rtol=0, atol=1e-12)
    outside = torch.ones(w.shape[-2], dtype=torch.bool)
    outside[prefix:prefix + grid[0] * grid[1]] = False
    assert torch.count_nonzero(dw[..., outside, :]) == 0, 'prefix / trailing tokens received a pooling gradient'


@pytest.mark.parametrize('backend', ['eager', 'fused', 'sdpa'])
def test_trailing_tokens_are_never_pooled(backend):
    """A CBSA layer with appended (trailing) tokens: changing them leaves Q_ini unchanged, and the layer equals the
    same computation with Q_ini pooled from the patch tokens alone (written out here)."""
    torch.manual_seed(0)
    grid, n_cls = (6, 5), 4
    layer = CBSA(32, 2, rep_grid=(3, 2), num_prefix_tokens=0, num_trailing_tokens=n_cls, backend=backend).double()
    x = torch.randn(2, grid[0] * grid[1] + n_cls, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -n_cls:] += 5.
    w, w2 = layer.project(x), layer.project(x2)
    torch.testing.assert_close(layer.representatives(w, grid), layer.representatives(w2, grid), rtol=0, atol=0)
    # the whole layer, from the paper's equations with Q_ini from the patches only
    r = _reference(w, grid, (3, 2), 0)
    a = torch.softmax(r @ w.transpose(-2, -1) * layer.scale, dim=-1)
    q = r + layer.step_rep * (a @ w)
    c = torch.softmax(q @ q.transpose(-2, -1) * layer.scale, dim=-1) @ q
    y = (layer.step_x * (a.transpose(-2, -1) @ c)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x, grid_size=grid), layer.proj(y), rtol=1e-9, atol=1e-10)


def test_layer_refuses_a_token_count_that_does_not_fit():
    layer = CBSA(32, 2, rep_grid=2, num_prefix_tokens=0, num_trailing_tokens=3)
    with pytest.raises(ValueError, match=r'needs 16 patch tokens \(\+ 3 trailing\)'):
        layer(torch.randn(1, 16, 32), grid_size=(4, 4))
    with pytest.raises(ValueError, match=r'expected 0 prefix \+ 4x4 patch tokens \+ 3 trailing'):
        layer(torch.randn(1, 20, 32), grid_size=(4, 4))
