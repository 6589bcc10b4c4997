"""Segmentation decoders over patch features: Segmenter's mask transformer with CBSA blocks (the paper's CBT decoder,
§3.5 of the spec / Fig. 8) or with Segmenter's MHSA blocks, and Segmenter's linear decoder.

Mask transformer (Strudel et al., ICCV 2021), written from its description:

    X   = proj_dec(F)                          F: (B, H_p·W_p, C_enc) patch features (raster order, no prefix tokens)
    Z   = [ X | E ]                            E: (K, D) learned class embeddings, appended after the patch tokens
    Z   = block_L(… block_1(Z))                MHSA blocks: attention + MLP; CBSA blocks: Z + CBSA(LN(Z)), no MLP
    Z   = LN(Z);  P = Z_patch·W_p,  C = Z_cls·W_c;  P, C L2-normalised per token
    M   = LN_K( P Cᵀ )                         (B, H_p·W_p, K) masks, LayerNorm over the K classes
    out = M as (B, K, H_p, W_p)

In the CBSA blocks the m representatives are pooled from the patch tokens only (``num_trailing_tokens=K``): the class
embeddings never enter Q_ini, but they are keys/values of the extraction and receive the broadcast like every token.
As in the released CBT decoder, the tokens keep the width D (default the encoder's) and each CBSA layer works in
num_heads·attn_head_dim = 3·100 = 300 dimensions inside the attention (Uᵀ: D -> 300, output projection: 300 -> D).
"""
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, trunc_normal_
from timm.models.vision_transformer import Block

from ..layers.cbsa import CBSA

__all__ = ['CBSADecoderBlock', 'MHSADecoderBlock', 'MaskTransformer', 'LinearDecoder', 'DECODER_DEFAULTS',
           'build_decoder']

# per decoder kind: the paper's / Segmenter's configuration (embed_dim None = the encoder width, num_heads None =
# embed_dim // 64 as in Segmenter). CBSA, as released (spec §3.5): 3 layers over tokens of the encoder's width, whose
# attention works in 3 heads x 100 = 300 dimensions (attn_head_dim: Uᵀ is C -> 300, the output projection 300 -> C),
# 10x10 representatives.
DECODER_DEFAULTS: Dict[str, Dict[str, object]] = {
    'cbsa': dict(depth=3, embed_dim=None, num_heads=3, attn_head_dim=100, rep_grid=10),
    'mhsa': dict(depth=2, embed_dim=None, num_heads=None, mlp_ratio=4.0),
    'linear': dict(),
}
_ONLY = {'cbsa': {'rep_grid', 'backend', 'attn_head_dim'}, 'mhsa': {'mlp_ratio', 'dropout'}}   # one block kind's


class CBSADecoderBlock(nn.Module):
    """``z = z + drop_path(CBSA(LN(z)))`` over [patch tokens | class embeddings]; no MLP (paper §3.5).

    Args:
        dim: token width D; num_heads: heads (subspaces).
        attn_head_dim: head width d (None: D / num_heads); the attention works in num_heads·d dimensions.
        num_classes: number of class embeddings appended after the patch tokens (never pooled).
        rep_grid: representative grid (10 -> m = 100); grid_size: default patch grid (H_p, W_p).
        drop_path: stochastic depth rate; backend: CBSA backend (None: the process default).
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, rep_grid=10,
                 grid_size: Optional[Tuple[int, int]] = None, drop_path: float = 0., backend: Optional[str] = None,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, attn_head_dim: Optional[int] = None):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = CBSA(dim, num_heads=num_heads, attn_head_dim=attn_head_dim, rep_grid=rep_grid,
                         num_prefix_tokens=0, num_trailing_tokens=num_classes, grid_size=grid_size, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """x: (B, H_p·W_p + K, D) -> (B, H_p·W_p + K, D)."""
        return x + self.drop_path(self.attn(self.norm(x), grid_size=grid_size))


class MHSADecoderBlock(Block):
    """Segmenter's decoder block: timm's pre-norm ViT ``Block`` (softmax MHSA + MLP). The grid is not needed."""

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return super().forward(x)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer with CBSA (``block='cbsa'``) or MHSA (``block='mhsa'``) blocks.

    Args:
        encoder_dim: width C_enc of the encoder features; num_classes: K.
        block: 'cbsa' or 'mhsa'; depth: number of blocks; embed_dim: decoder width D (None: C_enc).
        num_heads: heads (None: D // 64); mlp_ratio: MLP width of the MHSA blocks.
        attn_head_dim, rep_grid, grid_size, backend: CBSA blocks only (see ``CBSADecoderBlock``).
        drop_path_rate: stochastic depth, linearly increasing over the blocks; dropout: MHSA projection dropout.
    """

    def __init__(self, encoder_dim: int, num_classes: int, block: str = 'cbsa', depth: int = 3,
                 embed_dim: Optional[int] = None, num_heads: Optional[int] = None, mlp_ratio: float = 4.0,
                 rep_grid=10, grid_size: Optional[Tuple[int, int]] = None, drop_path_rate: float = 0.,
                 dropout: float = 0., backend: Optional[str] = None, attn_head_dim: Optional[int] = None):
        super().__init__()
        if block not in ('cbsa', 'mhsa'):
            raise ValueError(f"MaskTransformer block must be 'cbsa' or 'mhsa', got {block!r}.")
        embed_dim = embed_dim or encoder_dim
        num_heads = num_heads or max(1, embed_dim // 64)
        if block == 'mhsa':   # (the CBSA layer checks its own widths, attn_head_dim included)
            if attn_head_dim is not None:
                raise ValueError('attn_head_dim is an option of the CBSA decoder blocks, not of the MHSA ones.')
            if embed_dim % num_heads:
                raise ValueError(f'decoder embed_dim {embed_dim} is not divisible by num_heads {num_heads}.')
        self.num_classes, self.embed_dim, self.block = num_classes, embed_dim, block
        self.proj_dec = nn.Linear(encoder_dim, embed_dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        if block == 'cbsa':
            self.blocks = nn.ModuleList(
                CBSADecoderBlock(embed_dim, num_heads, num_classes, rep_grid, grid_size, dpr[i], backend,
                                 attn_head_dim=attn_head_dim) for i in range(depth))
        else:
            self.blocks = nn.ModuleList(
                MHSADecoderBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout,
                                 drop_path=dpr[i]) for i in range(depth))
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.proj_patch = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.proj_classes = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (B, C_enc, H_p, W_p) patch features -> (B, K, H_p, W_p) class masks."""
        B, _, gh, gw = feats.shape
        x = self.proj_dec(feats.flatten(2).transpose(1, 2))                      # (B, H_p·W_p, D)
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)                # [patches | K class embeddings]
        for blk in self.blocks:
            x = blk(x, (gh, gw))
        x = self.decoder_norm(x)
        patches, classes = x[:, :-self.num_classes], x[:, -self.num_classes:]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))                # (B, H_p·W_p, K)
        return masks.transpose(1, 2).reshape(B, self.num_classes, gh, gw)


class LinearDecoder(nn.Module):
    """Segmenter's linear baseline: one Linear layer per patch feature. (B, C_enc, H_p, W_p) -> (B, K, H_p, W_p)."""

    def __init__(self, encoder_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Linear(encoder_dim, num_classes)
        self.apply(_init_weights)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _init_weights(m: nn.Module) -> None:
    """Segmenter's initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_decoder(kind: str, encoder_dim: int, num_classes: int, grid_size: Optional[Tuple[int, int]] = None,
                  **kwargs) -> nn.Module:
    """'cbsa' / 'mhsa' (mask transformer) or 'linear', with ``DECODER_DEFAULTS[kind]`` updated by ``kwargs``."""
    if kind not in DECODER_DEFAULTS:
        raise ValueError(f'Unknown decoder {kind!r}; choose one of {tuple(DECODER_DEFAULTS)}.')
    if kind == 'linear':
        if kwargs:
            raise ValueError(f'The linear decoder takes no options, got {sorted(kwargs)}.')
        return LinearDecoder(encoder_dim, num_classes)
    foreign = sorted(set(kwargs) & _ONLY[('mhsa' if kind == 'cbsa' else 'cbsa')])
    if foreign:
        raise ValueError(f'{foreign} are options of the {"MHSA" if kind == "cbsa" else "CBSA"} decoder, not of the '
                         f'{kind.upper()} decoder.')
    cfg = dict(DECODER_DEFAULTS[kind], **kwargs)
    if kind == 'cbsa':
        cfg['grid_size'] = grid_size
    return MaskTransformer(encoder_dim, num_classes, block=kind, **cfg)
