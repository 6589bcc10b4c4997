"""CBT — the paper's Contract-and-Broadcast Transformer (Table 3), as a timm VisionTransformer configuration.

    z = x + CBSA(LN(x));   x = ISTA(LN(z))        (pre-norm; no residual around ISTA, as in the paper's code)

with a 4-conv stem (3×3 stride-2 convs + BatchNorm, GELU between; 16 = 2⁴), a class token, a learned position
embedding and a LayerNorm + Linear head on the class token. Parameter counts at 1000 classes: CBT-T 1,789,192,
CBT-S 6,667,048, CBT-B 25,691,752, CBT-L 83,051,368.

The released checkpoints (``cbt_*_best.pth.tar``) load through timm's pretrained path
(``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)``) or ``load_official_cbt(PATH)``. They were trained with
the released pooling (class token pooled, last patch dropped: ``legacy_pool``) on an 8x8 representative grid. How
they get it, with a filter that only maps the state dict:

* ``cbt_checkpoint_filter_fn`` maps the released key names onto ours and adds each CBSA layer's settings record
  (num_heads, rep_grid 8x8, legacy_pool=True; ``layers/settings.py``), so a model built otherwise refuses them with
  an error naming the setting;
* ``create_model('cbt_*', pretrained=True, ...)`` builds with ``legacy_pool=True`` when the pretrained file (or
  state dict) is in the released key layout and ``legacy_pool`` is not given (one look at its keys);
* ``load_official_cbt`` builds so too (``legacy_pool=False`` switches to the corrected pooling after loading).

Weights saved by timm from such a model (our key names) carry their records and load into a model built with
``legacy_pool=True`` only.
"""
import math
import os
import re
from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed
from timm.models import generate_default_cfgs
from timm.models._builder import resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer

from ..checkpoint import (
    CheckpointMismatchError, check_keys, checkpoint_keys, is_released_layout, read_state_dict, unwrap_state_dict,
)
from ..layers.cbsa import CBSA
from ..layers.ista import ISTA
from ..layers.settings import SETTINGS_KEY
from ._helpers import VIT_SIZES, build_cbsa_model, configure_cbsa, pop_cbsa_kwargs, register_entrypoints

__all__ = ['ConvStemPatchEmbed', 'CBTBlock', 'cbt_checkpoint_filter_fn', 'load_official_cbt', 'CheckpointMismatchError',
           'RELEASED_SETTINGS']


class ConvStemPatchEmbed(PatchEmbed):
    """Patch embedding by log2(patch) 3×3 stride-2 convs (no bias) + BatchNorm, GELU between them.

    patch 16: 3 → d/8 → d/4 → d/2 → d; patch 8: 3 → d/4 → d/2 → d. No norm or activation after the last BatchNorm.
    The forward (size checks, padding, output format) is timm's PatchEmbed.forward.
    """

    def __init__(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            norm_layer=None,
            flatten: bool = True,
            output_fmt: Optional[str] = None,
            bias: bool = True,
            strict_img_size: bool = True,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer,
            flatten=flatten, output_fmt=output_fmt, bias=False, strict_img_size=strict_img_size,
            dynamic_img_pad=dynamic_img_pad, device=device, dtype=dtype)
        ph, pw = self.patch_size
        n = int(round(math.log2(ph)))
        if ph != pw or ph not in (4, 8, 16, 32) or 2 ** n != ph:
            raise ValueError(f'ConvStemPatchEmbed needs a square power-of-two patch size (8 or 16), got {self.patch_size}.')
        if embed_dim % (2 ** (n - 1)) != 0:
            raise ValueError(f'embed_dim {embed_dim} must be divisible by {2 ** (n - 1)} for a {ph}-pixel conv stem.')
        chans = [in_chans] + [embed_dim // 2 ** (n - 1 - i) for i in range(n)]
        dd = {'device': device, 'dtype': dtype}
        layers = []
        for i in range(n):
            layers.append(nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, stride=2, padding=1, bias=False, **dd),
                nn.BatchNorm2d(chans[i + 1], **dd),
            ))
            if i < n - 1:
                layers.append(nn.GELU())
        self.proj = nn.Sequential(*layers)


class CBTBlock(nn.Module):
    """CBT layer: ``z = x + CBSA(LN(x)); return ISTA(LN(z))``. Takes timm's ``block_fn`` keyword arguments: the
    attention ones (qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop) go to ``CBSA``, those of the MLP and layer
    scale that CBT does not have (``IGNORED_BLOCK_ARGS``) are dropped; anything else is an error."""
    IGNORED_BLOCK_ARGS = ('mlp_ratio', 'scale_mlp_norm', 'init_values', 'act_layer', 'mlp_layer', 'attn_layer', 'depth')

    def __init__(self, dim: int, num_heads: int, scale_attn_norm: bool = False, drop_path: float = 0.,
                 norm_layer=nn.LayerNorm, device=None, dtype=None, **kwargs):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        attn_kwargs = {k: v for k, v in kwargs.items() if k not in self.IGNORED_BLOCK_ARGS}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = CBSA(dim, num_heads=num_heads, scale_norm=scale_attn_norm, norm_layer=norm_layer, **attn_kwargs,
                         **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.ista = ISTA(dim, **dd)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return self.ista(self.norm2(x))


# released checkpoint key -> ours (the released model: to_patch_embedding / pos_embedding / cls_token /
# transformer.layers.i.{0: PreNorm(CBSA), 1: PreNorm(ISTA)} / mlp_head.{0: LayerNorm, 1: Linear})
_OFFICIAL_KEY_RULES = [
    (r'^to_patch_embedding\.proj\.', 'patch_embed.proj.'),
    (r'^pos_embedding$', 'pos_embed'),
    (r'^cls_token$', 'cls_token'),
    (r'^transformer\.layers\.(\d+)\.0\.norm\.', r'blocks.\1.norm1.'),
    (r'^transformer\.layers\.(\d+)\.0\.fn\.proj\.', r'blocks.\1.attn.qkv.'),
    (r'^transformer\.layers\.(\d+)\.0\.fn\.to_out\.', r'blocks.\1.attn.proj.'),
    (r'^transformer\.layers\.(\d+)\.0\.fn\.(step_x|step_rep)$', r'blocks.\1.attn.\2'),
    (r'^transformer\.layers\.(\d+)\.1\.norm\.', r'blocks.\1.norm2.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.weight$', r'blocks.\1.ista.weight'),
    (r'^mlp_head\.0\.', 'norm.'),
    (r'^mlp_head\.1\.', 'head.'),
]


# what the released code computes with its weights (m = 64 hard-coded; pools w[:, :-1]: see layers/layout.py)
RELEASED_SETTINGS = dict(rep_grid=(8, 8), legacy_pool=True)


def _map_released(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released key names -> ours, plus each CBSA layer's settings record (RELEASED_SETTINGS, its head count)."""
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _OFFICIAL_KEY_RULES:
            new_k, n = re.subn(pattern, repl, k)
            if n:
                k = new_k
                break
        out[k] = v
    for k, v in list(out.items()):
        layer = re.fullmatch(r'(blocks\.\d+\.attn\.)step_rep', k)      # step_rep: (heads, 1, 1)
        if layer:
            out[layer.group(1) + SETTINGS_KEY] = CBSA.settings_record(num_heads=v.shape[0], **RELEASED_SETTINGS)
    return out


def cbt_checkpoint_filter_fn(checkpoint: Any, model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Map a released CBT checkpoint (DDP ``module.`` keys, released names) or one of ours onto ``model``'s keys.

    A pure function of the checkpoint (``model`` is only read): the released layout gets our key names and the
    settings records of the released code (``RELEASED_SETTINGS``), which the model's layers then check. Resamples the
    position embedding when the model's grid differs; raises ``CheckpointMismatchError`` naming missing / unexpected /
    mis-shaped keys.
    """
    out = unwrap_state_dict(checkpoint)
    if is_released_layout(out):
        out = _map_released(out)
    pos = out.get('pos_embed')
    if pos is not None and pos.shape != model.pos_embed.shape and pos.ndim == 3:
        old_n = pos.shape[1] - model.num_prefix_tokens
        old_side = int(math.isqrt(old_n))
        if old_side * old_side == old_n:
            out['pos_embed'] = resample_abs_pos_embed(
                pos, new_size=model.patch_embed.grid_size, old_size=(old_side, old_side),
                num_prefix_tokens=model.num_prefix_tokens, verbose=True)
    check_keys(out, model)
    return out


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 256 / 224, 'interpolation': 'bilinear', 'fixed_input_size': True,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'patch_embed.proj.0.0', 'classifier': 'head', 'license': 'mit',
        'paper_ids': 'arXiv:2509.16875', 'origin_url': 'https://github.com/QishuaiWen/CBSA',
        'paper_name': 'Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few',
        **kwargs,
    }


# '.official_in1k': the authors' released ImageNet-1k weights. They cannot be downloaded from here; point timm at
# the file: create_model('cbt_small', pretrained=True, pretrained_cfg_overlay=dict(file='cbt_small_best.pth.tar'))
default_cfgs = generate_default_cfgs({
    f'cbt_{size}.official_in1k': _cfg(crop_pct=224 / 256, notes=('released checkpoint; needs legacy_pool',))
    for size in VIT_SIZES
})


def _pretrained_is_released(cfg) -> bool:
    """Whether the weights ``cfg`` points at (a file or a state dict) are in the released key layout."""
    if cfg.state_dict:
        return is_released_layout(unwrap_state_dict(cfg.state_dict))
    return bool(cfg.file) and os.path.isfile(cfg.file) and is_released_layout(checkpoint_keys(cfg.file))


def _create_cbt(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    cbsa_kwargs = pop_cbsa_kwargs(kwargs)
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        if not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            raise RuntimeError(
                f'{variant}: the released CBT weights cannot be downloaded by timm. Download cbt_*_best.pth.tar from '
                f'the authors and pass it: timm.create_model("{variant}", pretrained=True, '
                f'pretrained_cfg_overlay=dict(file=PATH)) or timm_cbsa.load_official_cbt(PATH).')
        if 'legacy_pool' not in cbsa_kwargs and _pretrained_is_released(cfg):
            cbsa_kwargs['legacy_pool'] = True    # the released weights' pooling (module docstring)
    out_indices = kwargs.pop('out_indices', 3)
    size = variant.split('_')[1]
    model_args = dict(
        patch_size=16, embed_layer=ConvStemPatchEmbed, block_fn=CBTBlock, qkv_bias=False,
        norm_layer=partial(nn.LayerNorm, eps=1e-5), class_token=True, global_pool='token', **VIT_SIZES[size])
    return build_cbsa_model(
        cbsa_kwargs,
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=cbt_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **dict(model_args, **kwargs),
    )


# the paper's CBT-T/S/B/L (Table 3): params (M) at 1000 classes and ImageNet-1k top-1 (%) as the paper reports them
register_entrypoints(__name__, _create_cbt, {
    f'cbt_{size}': f"CBT-{size[0].upper()}: d={VIT_SIZES[size]['embed_dim']}, {VIT_SIZES[size]['depth']} layers, "
                   f"{VIT_SIZES[size]['num_heads']} heads, m=64 ({params}M params, {top1}% IN-1k in the paper)."
    for size, (params, top1) in {'tiny': (1.8, 63.2), 'small': (6.7, 71.4), 'base': (25.7, 73.4),
                                 'large': (83.1, 74.4)}.items()
})


def load_official_cbt(
        checkpoint: Union[str, Dict[str, Any]],
        variant: Optional[str] = None,
        num_classes: Optional[int] = None,
        **kwargs,
) -> VisionTransformer:
    """Build a CBT and load a released ``cbt_*_best.pth.tar`` (path or loaded dict).

    The model is built with the pooling the checkpoint was trained with: ``legacy_pool=True`` for the released key
    layout (the filter adds the released settings records, which the layers check), as recorded otherwise. An explicit
    ``legacy_pool`` is applied after loading: ``legacy_pool=False`` evaluates the released weights with the
    corrected pooling (a different function of the same weights).

    A path is read with ``weights_only=True`` (``read_state_dict``): a file that needs any type beyond tensors and
    plain containers is refused with ``UnsafeCheckpointError``; a missing, empty or corrupt file raises
    ``CheckpointLoadError`` naming it.

    ``variant`` (cbt_tiny/small/base/large) is inferred from the checkpoint's width and depth when omitted.
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, '__fspath__'):
        state_dict = read_state_dict(checkpoint)      # weights only: a checkpoint cannot run code (checkpoint.py)
    else:
        state_dict = unwrap_state_dict(checkpoint)
    if variant is None:
        width = state_dict['cls_token'].shape[-1] if 'cls_token' in state_dict else None
        depth = len({k.split('.')[2] for k in state_dict if k.startswith('transformer.layers.')})
        matches = [s for s, a in VIT_SIZES.items() if a['embed_dim'] == width and a['depth'] == depth]
        if not matches:
            raise CheckpointMismatchError(
                f'Cannot tell the CBT variant of this checkpoint (width {width}, depth {depth}); pass variant=.')
        variant = f'cbt_{matches[0]}'
    if num_classes is None:
        head_w = state_dict.get('mlp_head.1.weight', state_dict.get('head.weight'))
        num_classes = head_w.shape[0] if head_w is not None else 1000
    legacy_pool = kwargs.pop('legacy_pool', None)
    from timm import create_model
    model = create_model(variant, num_classes=num_classes, legacy_pool=is_released_layout(state_dict), **kwargs)
    model.load_state_dict(cbt_checkpoint_filter_fn(state_dict, model), strict=True)
    if legacy_pool is not None:  # an explicit choice, after loading
        configure_cbsa(model, legacy_pool=legacy_pool)
    return model
