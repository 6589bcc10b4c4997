"""Contract-and-Broadcast Self-Attention (Wen, Huang, Li, NeurIPS 2025, arXiv 2509.16875).

Read next to the paper's eq. (8) / Algorithm 1. Per head k, with W = U_kᵀZ the projected tokens:

    Q_ini  = pool(W)                                   representatives: patch tokens average-pooled to r_h×r_w
    A      = softmax_N( Q_ini Wᵀ · s )                 extraction: each representative reads all N tokens
    Q      = Q_ini + η · A W                           representative update (η: per-head step size)
    C      = softmax_m( Q Qᵀ · s ) Q                   contraction: self-attention among the m representatives
    out    = κ · Aᵀ C                                  broadcast: back to every token through the same A
                                                       (no renormalisation over representatives)
    y      = to_out( concat_k out_k )                  independent output projection with bias

(A here is the paper's A_kᵀ: shape m × N, each row a distribution over tokens.) s = d_head^-0.5. This module
projects, pools and merges heads; the middle four lines are the operator ``timm_cbsa.ops.contract_broadcast``
(``naive.py`` is the reference the eager path runs). Cost: O(N·m·d) per head, linear in N for fixed m.
"""
from typing import Optional, Tuple, Type, Union

import torch
from torch import nn

from ..ops.contract_broadcast import contract_and_broadcast, select, warn_once
from ..ops.contract_broadcast.naive import attention_weights, extraction, similarity, update_contract_broadcast
from ..ops.contract_broadcast.pooling import pool_representatives
from ..ops.tracing import fx_leaf, is_exporting
from ._heads import init_heads
from .config import resolve_backend
from .layout import GridAwareAttention

__all__ = ['CBSA', 'attention_weights', 'similarity', 'check_no_mask']


@fx_leaf
def check_no_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """CBSA pools every patch token and broadcasts to every token, so it cannot honour a mask."""
    if attn_mask is not None or is_causal:
        raise ValueError(
            'CBSA cannot honour attn_mask / is_causal: its representatives pool every patch token and its '
            'broadcast reaches every token. Use a softmax attention layer for masked inputs.')


torch.fx.wrap('check_no_mask')


class CBSA(GridAwareAttention):
    """CBSA attention, a drop-in for timm's ``Attention`` (``attn_layer='cbsa'``).

    Args:
        dim: token width C.
        num_heads: number of heads = number of subspaces K; head width d = C / K.
        qkv_bias: bias on the single projection Uᵀ (the paper has none; timm's ViTs default to True).
        qk_norm: normalise the projected tokens per head before pooling (timm's qk_norm).
        scale_norm: normalise the merged heads before the output projection.
        proj_bias: bias on the output projection (the paper's to_out has one).
        attn_drop: dropout on the extraction matrix A (forces the eager path while training).
        proj_drop: dropout after the output projection.
        norm_layer: norm for qk_norm / scale_norm.
        rep_grid: representative grid (int or (r_h, r_w)); m = r_h * r_w. None: 8 → m = 64 (or the grid of a
            registered 'cbsa_r4'-style name, or the model entrypoint's rep_grid=; see ``GridAwareAttention``).
        legacy_pool: pool like the released code (class token pooled, last patch dropped); for its checkpoints.
            None: False (or the model entrypoint's legacy_pool=).
        grid_size: static patch grid (H_p, W_p); normally set by the owning model, which also gives each call's grid
            (see ``layout.py``).
        num_prefix_tokens: expected number of prefix tokens, or -1 to accept N - H_p*W_p - trailing.
        num_trailing_tokens: tokens after the patch tokens that are not pooled (e.g. a segmentation decoder's
            class embeddings).
        backend: the implementation of the operator: 'eager' (the reference), 'fused', 'sdpa', 'xformers',
            'triton', or 'auto' ('triton' on CUDA where it runs, else 'fused'); None: the default of ``config.py``
            ('auto' unless set). ``impl`` (in the repr) is what runs: chosen now and whenever the layer moves to
            another device, from static checks (``ops.contract_broadcast.select``).

    Shapes: forward(x: (B, N, C)) -> (B, N, C), N = prefix tokens + H_p*W_p patch tokens + trailing tokens.

    num_heads, rep_grid and legacy_pool travel in the state dict and are checked on load (``settings.py``).
    """
    attn_name = 'cbsa'

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            rep_grid: Optional[Union[int, Tuple[int, int]]] = None,
            legacy_pool: Optional[bool] = None,
            grid_size: Optional[Tuple[int, int]] = None,
            num_prefix_tokens: int = -1,
            num_trailing_tokens: int = 0,
            backend: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        super().__init__(rep_grid, legacy_pool, grid_size, num_prefix_tokens, num_trailing_tokens)
        dd = {'device': device, 'dtype': dtype}
        norm_layer = init_heads(self, dim, num_heads, qk_norm, scale_norm, norm_layer)

        self.qkv = nn.Linear(dim, dim, bias=qkv_bias, **dd)        # Uᵀ for all heads (q = k = v), "proj" in the paper
        self.norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.step_rep = nn.Parameter(torch.randn(num_heads, 1, 1, **dd))  # η, per head, sign free
        self.step_x = nn.Parameter(torch.randn(num_heads, 1, 1, **dd))    # κ, per head, sign free
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm_out = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)      # over-parameterised U_k ("to_out")
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = resolve_backend(backend)                    # selects self.impl

    def select_impl(self) -> None:
        """Choose the operator's implementation for this layer's device, head width and m (static checks)."""
        device = self.qkv.weight.device
        self.impl, why = select(self.backend, self.head_dim, self.num_representatives, device)
        self.impl_note = '; '.join(why)
        if why:
            warn_once(('select', self.backend, device.type, self.impl_note),
                      'CBSA: backend %r cannot run here (%s); using %r.', self.backend, self.impl_note, self.impl)

    def extra_repr(self) -> str:
        note = f' ({self.impl_note})' if self.impl_note else ''
        return (f'num_heads={self.num_heads}, rep_grid={self.rep_grid}, legacy_pool={self.legacy_pool}, '
                f'grid_size={self.grid_size}, backend={self.backend!r}, impl={self.impl!r}{note}')

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> (B, H, N, d) projected tokens W = U_kᵀ Z (after qk_norm)."""
        B, N, C = x.shape
        w = self.qkv(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        return self.norm(w)

    def representatives(self, w: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B, H, N, d) projected tokens -> (B, H, m, d) initial representatives Q_ini."""
        return pool_representatives(w, self.pool_spec(w.shape[2], grid_size))

    def contract_and_broadcast(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The reference (eager) path, ``naive.py`` with attention dropout on A. w: (B, H, N, d) tokens,
        r: (B, H, m, d) Q_ini -> (B, H, N, d)."""
        attn = self.attn_drop(extraction(r, w, self.scale))               # A (B, H, m, N); timm's hook point
        return update_contract_broadcast(attn, w, r, self.step_rep, self.step_x, self.scale)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            grid_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        check_no_mask(attn_mask, is_causal)
        B, N, C = x.shape
        w = self.project(x)                                       # (B, H, N, d)
        if torch.jit.is_scripting():
            y = self.contract_and_broadcast(w, self.representatives(w, grid_size))
        elif self.impl == 'eager' or (self.training and self.attn_drop.p > 0) or is_exporting():
            # the reference: the only path with attention dropout, and plain ops for every exporter
            y = self.contract_and_broadcast(w, self.representatives(w, grid_size))
        else:
            # the operator pools the representatives itself (block by block / inside the kernels)
            self.check_strict()
            y = contract_and_broadcast(w, self.step_rep, self.step_x, self.scale,
                                       pool=self.pool_spec(N, grid_size), impl=self.impl)
        y = y.transpose(1, 2).reshape(B, N, C)
        y = self.norm_out(y)
        y = self.proj(y)
        return self.proj_drop(y)
