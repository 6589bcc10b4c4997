"""Lossy coding rate and the compression step of CBSA (paper §1-2, eqs. 2-8), tokens as *rows*.

The paper writes tokens as columns (Z ∈ R^{d×N}); here, as in the code, Z is (N, d) and a head's projected tokens are
W_k = Z U_k (N, p). With that convention

    R(Z)        = ½ logdet(I_N + d/(N ε²) Z Zᵀ)  = ½ logdet(I_d + d/(N ε²) Zᵀ Z)      (the smaller Gram side is used)
    R^c(Z | U)  = Σ_k R(Z U_k)                     with p = d/K in place of d                   (compression term)
    X_k         = A_kᵀ Z U_k                       the head's representatives, A_kᵀ (m, N) held fixed (= the code's attn)
    f(Z)        = Σ_k ½ logdet(I + α X_kᵀ X_k),    α = p/(m ε²)                                       (eq. 4's Σ_k R(U_kᵀQ))
    ∇f(Z)       = Σ_k A_k [α X_k (I + α X_kᵀ X_k)^{-1}] U_kᵀ                                      (eq. 7, α kept)

so the exact CBSA step ``Z - κ ∇f(Z)`` is eq. (6)/(7) with the constant α written out (the paper folds it into κ).
All rates are computed in float64 with a Cholesky factorisation (falls back to slogdet). ε² = 0.01 as in the paper's
coding-rate hook (§6.8).
"""
from typing import Optional

import torch

__all__ = [
    'EPS2', 'coding_rate', 'coding_rate_gradient', 'head_coding_rates', 'compression_term',
    'representative_objective', 'exact_cbsa_direction', 'exact_cbsa_step', 'orthonormal_heads',
]

EPS2 = 0.01


def _logdet_spd(m: torch.Tensor) -> torch.Tensor:
    """logdet of a batch of symmetric positive-definite matrices (float64)."""
    chol, info = torch.linalg.cholesky_ex(m)
    if bool((info == 0).all()):
        return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return torch.linalg.slogdet(m)[1]


def coding_rate(z: torch.Tensor, eps2: float = EPS2, width: Optional[int] = None) -> torch.Tensor:
    """R(Z) = ½ logdet(I + width/(n ε²) ZᵀZ) for z (..., n, width); returns (...) in float64.

    ``width`` defaults to z's last dim (the paper's d for R(Z), p for a head). n is z's token count.
    """
    z = z.double()
    n, w = z.shape[-2], z.shape[-1]
    alpha = (w if width is None else width) / (n * eps2)
    if w <= n:
        gram = z.transpose(-2, -1) @ z
    else:
        gram = z @ z.transpose(-2, -1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return 0.5 * _logdet_spd(eye + alpha * gram)


def coding_rate_gradient(x: torch.Tensor, eps2: float = EPS2) -> torch.Tensor:
    """∇_X R(X) = α X (I + α XᵀX)⁻¹, α = p/(m ε²), for representatives x (..., m, p): the bracket of eq. (7)."""
    m, p = x.shape[-2], x.shape[-1]
    alpha = p / (m * eps2)
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    return alpha * torch.linalg.solve(eye + alpha * x.transpose(-2, -1) @ x, x.transpose(-2, -1)).transpose(-2, -1)


def head_coding_rates(w: torch.Tensor, eps2: float = EPS2) -> torch.Tensor:
    """R(U_kᵀZ) per head for projected tokens w (..., K, n, p) -> (..., K)."""
    return coding_rate(w, eps2)


def compression_term(w: torch.Tensor, eps2: float = EPS2) -> torch.Tensor:
    """R^c = Σ_k R(U_kᵀZ) for projected tokens w (..., K, n, p) -> (...)."""
    return head_coding_rates(w, eps2).sum(-1)


def orthonormal_heads(d: int, num_heads: int, generator: Optional[torch.Generator] = None,
                      dtype=torch.float64) -> torch.Tensor:
    """K incoherent orthonormal bases U_k (K, d, p), p = d/K, from the QR of a Gaussian matrix."""
    if d % num_heads:
        raise ValueError(f'd={d} is not divisible by num_heads={num_heads}')
    g = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    p = d // num_heads
    return q.reshape(d, num_heads, p).permute(1, 0, 2).contiguous().to(dtype)


def _reps(z: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    # z (N, d), u (K, d, p), attn (K, m, N) -> X (K, m, p) = A_kᵀ Z U_k
    return attn @ (z.unsqueeze(0) @ u)


def representative_objective(z: torch.Tensor, u: torch.Tensor, attn: torch.Tensor, eps2: float = EPS2) -> torch.Tensor:
    """f(Z) = Σ_k R(A_kᵀ Z U_k): the compression term of eq. (4) with fixed extraction matrices.

    z: (N, d) tokens; u: (K, d, p) head bases; attn: (K, m, N) extraction matrices (rows over tokens, the code's A).
    """
    return compression_term(_reps(z.double(), u.double(), attn.double()), eps2)


def exact_cbsa_direction(z: torch.Tensor, u: torch.Tensor, attn: torch.Tensor, eps2: float = EPS2) -> torch.Tensor:
    """Eq. (7) with α written out: Σ_k A_k [α X_k (I + α X_kᵀX_k)^{-1}] U_kᵀ = ∇_Z f(Z), shape (N, d), float64."""
    z, u, attn = z.double(), u.double(), attn.double()
    contraction = coding_rate_gradient(_reps(z, u, attn), eps2)  # (K, m, p)
    broadcast = attn.transpose(-2, -1) @ contraction              # (K, N, p)  = A_k · contraction
    return (broadcast @ u.transpose(-2, -1)).sum(0)               # Σ_k (...) U_kᵀ


def exact_cbsa_step(z: torch.Tensor, u: torch.Tensor, attn: torch.Tensor, kappa: float,
                    eps2: float = EPS2) -> torch.Tensor:
    """One gradient step of eq. (6): Z ← Z − κ·CBSA_exact(Z)  (A held fixed)."""
    return z.double() - kappa * exact_cbsa_direction(z, u, attn, eps2)
