"""timm's ``Attention`` constructor, written once for CBSA and its family: the projections, the norms, the output
projection and, where a layer has them, the per-head step sizes.

    ProjectedAttention                 MSSA, TSSA, LinearAttention (family.py)
    └── GridAwareAttention (layout.py) representatives pooled on the patch grid, backend / impl:
                                       CBSA (cbsa.py), CBSAStar, AgentAttention, AgentAttentionQKV (family.py)

Two class attributes fix a layer's structure (timm passes only its own constructor arguments):

* ``shared_qkv``: True: one projection, q = k = v = Uᵀz, named like CBSA (``qkv`` = Uᵀ of shape H·d × C, ``norm``
  = qk_norm on the projected tokens, ``norm_out`` = scale_norm); False: timm's three projections (``qkv`` of shape
  3·H·d × C, ``q_norm``, ``k_norm``, ``norm`` = scale_norm), so a pretrained ViT's attention weights load unchanged.
  H·d = C unless ``attn_head_dim`` is given (timm's argument: the heads' width independent of the token width).
  The names a layout does not use hold parameter-free ``nn.Identity`` modules (TorchScript compiles both branches).
* ``step_init``: None, or how the per-head step sizes η (``step_rep``) and κ (``step_x``), shape (H, 1, 1), start:
  'randn' (CBSA: sign free) or 'ones' (CBSA*: the released code's two lines exactly).
"""
from typing import Optional, Tuple, Type

import torch
from torch import nn

from ..ops.tracing import fx_leaf
from .settings import RecordedSettings

__all__ = ['ProjectedAttention', 'check_no_mask', 'merge_heads', 'split_heads']


@fx_leaf
def check_no_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """Layers with pooled representatives (and the kernelised ones) cannot honour a mask: the representatives pool
    every patch token and the broadcast reaches every token. (FX: a leaf call; each calling module also calls
    ``torch.fx.wrap('check_no_mask')``.)"""
    if attn_mask is not None or is_causal:
        raise ValueError(
            'CBSA cannot honour attn_mask / is_causal: its representatives pool every patch token and its '
            'broadcast reaches every token. Use a softmax attention layer for masked inputs.')



def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H·d) -> (B, H, N, d), a view."""
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H·d)."""
    B, H, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, H * d)


def _positive_int(module: nn.Module, name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f'{type(module).__name__}: {name} must be a positive int, got {v!r}.')
    return v


class ProjectedAttention(RecordedSettings):
    """Projections in, heads merged and projected out: what every layer of the family has around its operator.
    ``num_heads`` (and, in subclasses, the pooling settings and ``broadcast``) travel in the state dict (``settings.py``).

    Args (timm's ``Attention``):
        dim: token width C.
        num_heads: number of heads = number of subspaces K; softmax scale s = d^-1/2.
        attn_head_dim: head width d (None: C / K). The attention works in H·d dimensions: the input projection maps
            C -> H·d (per projection), the output projection H·d -> C (the released CBT segmentation decoder: 3 heads
            x 100 inside 192- / 384-wide tokens).
        qkv_bias: bias on the input projection(s) (the paper has none; timm's ViTs default to True).
        qk_norm: normalise the projected tokens per head (one projection: ``norm``; three: ``q_norm``, ``k_norm``).
        scale_norm: normalise the merged heads before the output projection.
        proj_bias: bias on the output projection (the paper's ``to_out`` has one).
        attn_drop: dropout on the attention / extraction matrix.
        proj_drop: dropout after the output projection.
        norm_layer: norm for qk_norm / scale_norm (``nn.LayerNorm`` when one is asked for and none given, as timm).
        device, dtype: where and in which dtype the parameters are made.
    """
    # class attributes (see the module docstring); __constants__ (inherited, unlike annotations) makes shared_qkv a
    # TorchScript constant in every subclass
    __constants__ = ['shared_qkv']
    shared_qkv = True
    step_init = None

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_head_dim: Optional[int] = None,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        _positive_int(self, 'dim', dim)
        _positive_int(self, 'num_heads', num_heads)
        if attn_head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f'{type(self).__name__}: dim {dim} is not divisible by num_heads {num_heads} '
                                 '(or give attn_head_dim).')
            attn_head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = _positive_int(self, 'attn_head_dim', attn_head_dim)
        attn_dim = num_heads * self.head_dim                           # H·d, the width inside the attention
        self.scale = self.head_dim ** -0.5
        if (qk_norm or scale_norm) and norm_layer is None:
            norm_layer = nn.LayerNorm
        dd = {'device': device, 'dtype': dtype}
        head_norm = (lambda: norm_layer(self.head_dim, **dd)) if qk_norm else nn.Identity
        if self.shared_qkv:            # Uᵀ for all heads (q = k = v), "proj" in the paper
            self.qkv = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.norm = head_norm()
        else:
            self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias, **dd)
            self.q_norm, self.k_norm = head_norm(), head_norm()
        if self.step_init is not None:
            init = torch.randn if self.step_init == 'randn' else torch.ones
            self.step_rep = nn.Parameter(init(num_heads, 1, 1, **dd))     # η, per head
            self.step_x = nn.Parameter(init(num_heads, 1, 1, **dd))       # κ, per head
        out_norm = norm_layer(attn_dim, **dd) if scale_norm else nn.Identity()
        if self.shared_qkv:
            self.norm_out = out_norm
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()     # unused (parameter-free; TorchScript)
        else:
            self.norm = out_norm
            self.norm_out = nn.Identity()                               # unused (parameter-free; TorchScript)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, bias=proj_bias, **dd)     # over-parameterised U_k ("to_out")
        self.proj_drop = nn.Dropout(proj_drop)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v, each (B, H, N, d); q = k = v = W for a single projection."""
        B, N, C = x.shape
        if self.shared_qkv:
            w = self.norm(split_heads(self.qkv(x), self.num_heads))
            return w, w, w
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) heads -> merged (B, N, H·d), scale-normed, projected (B, N, C)."""
        y = merge_heads(y)
        y = self.norm_out(y) if self.shared_qkv else self.norm(y)
        return self.proj_drop(self.proj(y))
