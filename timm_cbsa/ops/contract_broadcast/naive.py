"""The plain PyTorch twin of the Triton kernels: CBSA's contract-and-broadcast written out with autograd (the same math
as ``CBSA.contract_and_broadcast``, as a function of explicit tensors), used by the kernel tests."""
from typing import Optional

import torch

from .pooling import pool_representatives

__all__ = ['naive_contract_and_broadcast']


def naive_contract_and_broadcast(w: torch.Tensor, step_rep: torch.Tensor, step_x: torch.Tensor, scale: float,
                                 pool: Optional[tuple] = None, r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w: (B, H, N, d) tokens; step_rep η, step_x κ: (H, 1, 1); Q_ini = ``r`` (B, H, m, d) or pooled from w with
    ``pool`` (a ``PoolSpec``) -> (B, H, N, d). Statistics in float32 for half-precision inputs."""
    if r is None:
        r = pool_representatives(w, pool)
    sd = torch.float64 if w.dtype == torch.float64 else torch.float32
    a = torch.softmax(torch.matmul(r.to(sd) * scale, w.to(sd).transpose(-2, -1)), dim=-1)   # A (B, H, m, N)
    q = r.to(sd) + step_rep.to(sd) * torch.matmul(a, w.to(sd))                             # Q = Q_ini + η A W
    c = torch.matmul(torch.softmax(torch.matmul(q * scale, q.transpose(-2, -1)), dim=-1), q)  # C = softmax(s Q Qᵀ) Q
    return (step_x.to(sd) * torch.matmul(a.transpose(-2, -1), c)).to(w.dtype)              # κ Aᵀ C
