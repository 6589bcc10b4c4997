"""CRATE's ISTA block (Yu et al. 2023), used by CBT after each CBSA layer.

One proximal-gradient step on  λ‖Z‖₁ − R(Z)  with a learnable dictionary D (d × d), non-negative shrinkage:

    ISTA(z) = ReLU( z + η (z D − z DᵀD) − η λ )        (tokens are rows here)

η = 0.1 and λ = 0.1 are fixed, as in the paper and the released code.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ISTA']


class ISTA(nn.Module):
    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.step_size = step_size
        self.lambd = lambd
        self.weight = nn.Parameter(torch.empty(dim, dim, device=device, dtype=dtype))  # the dictionary D
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight)

    def init_weights(self) -> None:
        """Called by timm's ViT init: keep the paper's kaiming-uniform dictionary (not trunc-normal)."""
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, d) -> (B, N, d)."""
        d = self.weight
        z_d = F.linear(x, d.t())                  # z D
        z_dtd = F.linear(F.linear(x, d), d.t())   # z Dᵀ D
        return F.relu(x + self.step_size * (z_d - z_dtd) - self.step_size * self.lambd)

    def extra_repr(self) -> str:
        return f'dim={self.weight.shape[0]}, step_size={self.step_size}, lambd={self.lambd}'
