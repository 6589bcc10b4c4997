"""Peer attention layers for the layer benchmark, all (B, N, C) -> (B, N, C) with one class token + an H×W grid.

* ``SDPAAttention``: timm's ``Attention`` (fused SDPA), the quadratic anchor.
* ``AgentAttention``: Agent Attention (Han et al., ECCV 2024), written from the paper's description: n = 7×7 agents
  average-pooled from the queries, agent aggregation softmax(A Kᵀ) V, agent broadcast softmax(Q Aᵀ) V_A, plus a
  3×3 depthwise conv on V; the learned position biases are omitted (they do not change the cost class).
* ``PVTLinearSRA``: timm's ``pvt_v2.Attention(linear_attn=True)`` on the patch tokens (it has no class token).
* ``ReLULinearAttention``: EfficientViT LiteMLA-style ReLU linear attention, Q (Kᵀ [V, 1]) normalised, in fp32.
* ``CBSAProjections``: not attention: only CBSA's two C×C projections (Uᵀ without bias, output projection with bias).
  Its time is a floor for any CBSA implementation, so SDPA / floor bounds the reachable SDPA/CBSA ratio.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Attention as TimmAttention


class SDPAAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int]):
        super().__init__()
        self.attn = TimmAttention(dim, num_heads, qkv_bias=True)
        assert self.attn.fused_attn, 'timm fused attention is off (TIMM_FUSED_ATTN=0?)'

    def forward(self, x):
        return self.attn(x)


class AgentAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], agent_grid: int = 7):
        super().__init__()
        self.h, self.d, self.grid, self.agent_grid = num_heads, dim // num_heads, grid, agent_grid
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        gh, gw = self.grid
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)   # (B, h, N, d)
        qp = q[:, :, 1:].reshape(B * self.h, gh, gw, self.d).permute(0, 3, 1, 2)
        agents = F.adaptive_avg_pool2d(qp, self.agent_grid).flatten(2).transpose(1, 2).reshape(B, self.h, -1, self.d)
        agent_v = F.scaled_dot_product_attention(agents, k, v)          # agents read all tokens
        out = F.scaled_dot_product_attention(q, agents, agent_v)        # tokens read the agents
        out = out.transpose(1, 2).reshape(B, N, C)
        vp = v[:, :, 1:].transpose(1, 2).reshape(B, gh, gw, C).permute(0, 3, 1, 2)
        dwc = self.dwc(vp).flatten(2).transpose(1, 2)
        out = torch.cat([out[:, :1], out[:, 1:] + dwc], dim=1)
        return self.proj(out)


class PVTLinearSRA(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int]):
        super().__init__()
        from timm.models.pvt_v2 import Attention as PvtAttention
        self.attn = PvtAttention(dim, num_heads, linear_attn=True, qkv_bias=True)
        self.grid = list(grid)

    def forward(self, x):
        # PVT has no class token: it runs on the H·W patch tokens (N − 1)
        return self.attn(x[:, 1:], self.grid)


class ReLULinearAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], eps: float = 1e-15):
        super().__init__()
        self.h, self.d, self.eps = num_heads, dim // num_heads, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        dt = q.dtype
        q, k, v = F.relu(q).float(), F.relu(k).float(), v.float()
        v = F.pad(v, (0, 1), value=1.0)                                   # ones column -> normaliser
        kv = k.transpose(-2, -1) @ v                                      # (B, h, d, d+1)
        out = q @ kv
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return self.proj(out.to(dt).transpose(1, 2).reshape(B, N, C))


class CBSAProjections(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int]):
        super().__init__()
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.qkv(x))


def make_cbsa(dim: int, num_heads: int, grid: Tuple[int, int], backend: str) -> nn.Module:
    from timm_cbsa.layers.cbsa import CBSA
    return CBSA(dim, num_heads, qkv_bias=False, grid_size=grid, num_prefix_tokens=1, backend=backend)
