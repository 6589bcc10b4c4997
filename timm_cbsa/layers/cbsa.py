"""Contract-and-Broadcast Self-Attention (Wen, Huang, Li, NeurIPS 2025, arXiv 2509.16875).

Read next to the paper's eq. (8) / Algorithm 1. Per head k, with W = U_kᵀZ the projected tokens:

    Q_ini  = pool(W)                                   representatives: patch tokens average-pooled to r_h×r_w
    A      = softmax_N( Q_ini Wᵀ · s )                 extraction: each representative reads all N tokens
    Q      = Q_ini + η · A W                           representative update (η: per-head step size)
    C      = softmax_m( Q Qᵀ · s ) Q                   contraction: self-attention among the m representatives
    out    = κ · Aᵀ C                                  broadcast: back to every token through the same A
                                                       (no renormalisation over representatives)
    y      = to_out( concat_k out_k )                  independent output projection with bias

(A here is the paper's A_kᵀ: shape m × N, each row a distribution over tokens.) s = d_head^-0.5. Softmax
statistics are computed in float32 for half-precision inputs. Cost: O(N·m·d) per head, linear in N for fixed m.
"""
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.jit import Final

from .backends import fused_contract_and_broadcast, resolve_backend
from ._fx import register_notrace_function
from ._heads import init_heads
from .layout import GridAwareAttention, check_token_layout  # noqa: F401  (check_token_layout: re-exported)
from ..ops.contract_broadcast.pooling import pool_representatives

__all__ = ['CBSA', 'attention_weights', 'similarity']


@register_notrace_function
def similarity(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(q·s) kᵀ as softmax-ready logits: half-precision inputs give float32 logits (fp16 products can overflow
    65504, so they are computed in float32; bf16 products are upcast). FX: a leaf call (it branches on dtype)."""
    if q.dtype == torch.float16:
        q, k = q.float(), k.float()
    logits = (q * scale) @ k.transpose(-2, -1)
    return logits.float() if logits.dtype == torch.bfloat16 else logits


torch.fx.wrap('similarity')


@register_notrace_function
def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax over the last dim of (q·s) kᵀ, in q's dtype; half-precision logits and statistics are float32
    (see ``similarity``). FX: a leaf call."""
    return similarity(q, k, scale).softmax(dim=-1).to(q.dtype)


torch.fx.wrap('attention_weights')


@register_notrace_function
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
        rep_grid: representative grid (int or (r_h, r_w)); m = r_h * r_w. Default 8 → m = 64.
        legacy_pool: pool like the released code (class token pooled, last patch dropped); for its checkpoints.
        grid_size: static patch grid (H_p, W_p); normally set by the owning model, which also gives each call's grid
            (see ``layout.py``).
        num_prefix_tokens: expected number of prefix tokens, or -1 to accept N - H_p*W_p - trailing.
        num_trailing_tokens: tokens after the patch tokens that are not pooled (e.g. a segmentation decoder's
            class embeddings).
        backend: 'eager' (this file's reference math), 'fused', 'sdpa', 'xformers', 'triton', 'auto' (triton on CUDA
            where it runs, else fused; see ``backends.py``), or None: decided now from timm's switches and
            ``set_backend`` (``backends.default_backend``; 'auto' unless set).

    Shapes: forward(x: (B, N, C)) -> (B, N, C), N = prefix tokens + H_p*W_p patch tokens (patches last).
    """
    legacy_pool: Final[bool]

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
            rep_grid: Union[int, Tuple[int, int]] = 8,
            legacy_pool: bool = False,
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
        self.backend = resolve_backend(backend)

        self.qkv = nn.Linear(dim, dim, bias=qkv_bias, **dd)        # Uᵀ for all heads (q = k = v), "proj" in the paper
        self.norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.step_rep = nn.Parameter(torch.randn(num_heads, 1, 1, **dd))  # η, per head, sign free
        self.step_x = nn.Parameter(torch.randn(num_heads, 1, 1, **dd))    # κ, per head, sign free
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm_out = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)      # over-parameterised U_k ("to_out")
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, rep_grid={self.rep_grid}, legacy_pool={self.legacy_pool}, '
                f'grid_size={self.grid_size}, backend={self.backend!r}')

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> (B, H, N, d) projected tokens W = U_kᵀ Z (after qk_norm)."""
        B, N, C = x.shape
        w = self.qkv(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        return self.norm(w)

    def representatives(self, w: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B, H, N, d) projected tokens -> (B, H, m, d) initial representatives Q_ini."""
        return pool_representatives(w, self.pool_spec(w.shape[2], grid_size))

    def contract_and_broadcast(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The reference (eager) path. w: (B, H, N, d) tokens, r: (B, H, m, d) Q_ini -> (B, H, N, d)."""
        # 1. extraction: each representative attends over all N tokens
        # attention_weights written out, so the softmax is a traced node that timm's AttentionExtract finds by its
        # default name '*attn.softmax'
        attn = similarity(r, w, self.scale).softmax(dim=-1).to(w.dtype)   # (B, H, m, N), rows sum to 1 over tokens
        attn = self.attn_drop(attn)
        r = r + self.step_rep * (attn @ w)                        # Q = Q_ini + η·A W          (B, H, m, d)
        # 2. contraction: self-attention among the representatives
        c = attention_weights(r, r, self.scale) @ r           # (B, H, m, d)
        # 3. broadcast through the same extraction matrix, scaled by the step size κ
        return self.step_x * (attn.transpose(-2, -1) @ c)         # (B, H, N, d)

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
        elif self.backend == 'eager' or (self.training and self.attn_drop.p > 0):   # only eager has attn dropout
            y = self.contract_and_broadcast(w, self.representatives(w, grid_size))
        else:
            # the fused function pools the representatives itself, block by block (see fused.py)
            y = fused_contract_and_broadcast(self.backend, w, None, self.step_rep, self.step_x, self.scale,
                                             pool=self.pool_spec(N, grid_size))
        y = y.transpose(1, 2).reshape(B, N, C)
        y = self.norm_out(y)
        y = self.proj(y)
        return self.proj_drop(y)
