"""The part of timm's ``Attention`` constructor signature that CBSA and the family layers share."""
from typing import Optional, Type

from torch import nn


def init_heads(module: nn.Module, dim: int, num_heads: int, qk_norm: bool, scale_norm: bool,
               norm_layer: Optional[Type[nn.Module]]) -> Optional[Type[nn.Module]]:
    """Check the width, set ``num_heads`` / ``head_dim`` / ``scale`` (d^-1/2) on ``module``, and return the norm layer
    to use (``nn.LayerNorm`` when qk_norm or scale_norm asks for one and none was given, as timm does)."""
    for name, v in (('dim', dim), ('num_heads', num_heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f'{type(module).__name__}: {name} must be a positive int, got {v!r}.')
    if dim % num_heads != 0:
        raise ValueError(f'{type(module).__name__}: dim {dim} is not divisible by num_heads {num_heads}.')
    module.num_heads = num_heads
    module.head_dim = dim // num_heads
    module.scale = module.head_dim ** -0.5
    if (qk_norm or scale_norm) and norm_layer is None:
        norm_layer = nn.LayerNorm
    return norm_layer
