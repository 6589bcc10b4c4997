"""Coding rate values and the compression claim of eq. (6)/(7): a small exact CBSA step lowers Σ_k R(U_kᵀQ)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from timm_cbsa.analysis import (
    EPS2, coding_rate, exact_cbsa_direction, exact_cbsa_step, orthonormal_heads, representative_objective,
)


def _naive_rate(z: np.ndarray, eps2: float = EPS2) -> float:
    """½ logdet(I_N + d/(N ε²) Z Zᵀ) on the N×N side, with numpy eigenvalues (independent of the code path)."""
    n, d = z.shape
    g = np.eye(n) + d / (n * eps2) * z @ z.T
    return 0.5 * float(np.sum(np.log(np.linalg.eigvalsh(g))))


def test_coding_rate_closed_form():
    n, d, c = 50, 8, 0.3
    z = torch.zeros(n, d, dtype=torch.float64)
    z[:d] = c * torch.eye(d, dtype=torch.float64)
    expected = d / 2 * math.log(1 + d / (n * EPS2) * c ** 2)
    assert float(coding_rate(z)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('n,d', [(40, 12), (12, 40)])
def test_coding_rate_both_gram_sides_match_naive(n, d):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert float(coding_rate(z)) == pytest.approx(_naive_rate(z.numpy()), rel=1e-10)
    # batched and float32 input give the same value
    zz = torch.stack([z, 2 * z]).float()
    out = coding_rate(zz)
    assert out.dtype == torch.float64 and out.shape == (2,)
    assert float(out[1]) == pytest.approx(_naive_rate(2 * z.numpy()), rel=1e-5)


def _random_problem(n=64, d=16, heads=4, m=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    u = orthonormal_heads(d, heads, generator=g)
    w = z.unsqueeze(0) @ u                                     # (K, N, p)
    q_ini = torch.randn(heads, m, d // heads, generator=g, dtype=torch.float64)
    attn = ((q_ini @ w.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)   # (K, m, N), then held fixed
    return z, u, attn


def _patch_tokens(img: np.ndarray, side=128, patch=8, dim=32):
    """Patch tokens of a real photo: (side/patch)² patches of patch²·3 pixels, centred, PCA to ``dim``."""
    x = torch.from_numpy(img).permute(2, 0, 1).double().unsqueeze(0) / 255.0
    x = F.interpolate(x, size=(side, side), mode='bilinear', align_corners=False, antialias=True)
    p = F.unfold(x, kernel_size=patch, stride=patch)[0].T         # (N, 3·patch²)
    p = p - p.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(p, full_matrices=False)
    return p @ vh[:dim].T                                         # (N, dim)


def _pooled_attn(z, u, grid, rep_grid=4):
    """Extraction as in CBSA: representatives = pooled projected tokens, A = softmax_N(Q_ini Wᵀ s)."""
    w = z.unsqueeze(0) @ u                                         # (K, N, p)
    K, N, p = w.shape
    reps = F.adaptive_avg_pool2d(w.reshape(K, grid, grid, p).permute(0, 3, 1, 2), rep_grid)
    reps = reps.flatten(2).transpose(1, 2)                          # (K, m, p)
    return ((reps @ w.transpose(-2, -1)) * p ** -0.5).softmax(-1)


def test_exact_direction_is_the_gradient():
    z, u, attn = _random_problem()
    direction = exact_cbsa_direction(z, u, attn)
    zz = z.clone().requires_grad_(True)
    representative_objective(zz, u, attn).backward()
    torch.testing.assert_close(direction, zz.grad, rtol=1e-9, atol=1e-12)
    # central finite difference of the objective along a random direction = directional derivative
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    fd = (representative_objective(z + h * v, u, attn) - representative_objective(z - h * v, u, attn)) / (2 * h)
    assert float(fd) == pytest.approx(float((direction * v).sum()), rel=1e-6)


def _check_decrease(z, u, attn):
    f0 = float(representative_objective(z, u, attn))
    g = exact_cbsa_direction(z, u, attn)
    gnorm2 = float((g * g).sum())
    assert gnorm2 > 0
    for rel in (1e-4, 1e-3, 1e-2):
        kappa = rel * float(z.norm()) / math.sqrt(gnorm2)
        f1 = float(representative_objective(exact_cbsa_step(z, u, attn, kappa), u, attn))
        assert f1 < f0, (rel, f0, f1)
    # first order: the decrease is κ‖∇f‖² to within a few percent for the smallest step
    kappa = 1e-4 * float(z.norm()) / math.sqrt(gnorm2)
    f1 = float(representative_objective(exact_cbsa_step(z, u, attn, kappa), u, attn))
    assert (f0 - f1) / (kappa * gnorm2) == pytest.approx(1.0, rel=0.05)
    return f0, f1


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_exact_step_compresses_random_tokens(seed):
    z, u, attn = _random_problem(seed=seed)
    _check_decrease(z, u, attn)


@pytest.mark.parametrize('photo', ['astronaut', 'coffee'])
def test_exact_step_compresses_real_image_tokens(photo):
    skd = pytest.importorskip('skimage.data')
    z = _patch_tokens(getattr(skd, photo)())                       # (256, 32)
    u = orthonormal_heads(32, 4, generator=torch.Generator().manual_seed(0))
    attn = _pooled_attn(z, u, grid=16)                              # (4, 16, 256)
    f0, f1 = _check_decrease(z, u, attn)
    assert f0 > 0
