"""cbsa_vit_*: timm's VisionTransformer configured with CBSA attention (``attn_layer='cbsa'``) — not a fork.

Widths / depths / heads are those of ViT-T/S/B/L; the MLP, norms, class token and position embedding are timm's.
Extra kwargs: ``rep_grid`` (representative grid, default 8 → m = 64), ``legacy_pool``, ``backend``; the layers are
built with them, before pretrained weights load (their settings records are checked then).
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ._helpers import build_cbsa_model, pop_cbsa_kwargs

__all__ = []

_ARCHS = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
    'large': dict(embed_dim=1024, depth=24, num_heads=16),
}


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2509.16875',
        'paper_name': 'Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f'cbsa_vit_{size}_patch16_224': _cfg() for size in _ARCHS},
    **{f'cbsa_vit_{size}': _cfg() for size in _ARCHS},
})


def _create_cbsa_vit(variant: str, size: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    cbsa_kwargs = pop_cbsa_kwargs(kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    model_args = dict(patch_size=16, attn_layer='cbsa', qkv_bias=False, **_ARCHS[size])
    return build_cbsa_model(
        cbsa_kwargs,
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=kwargs.pop('pretrained_strict', True),
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **dict(model_args, **kwargs),
    )


@register_model
def cbsa_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/16 with CBSA attention (d=192, 12 layers, 3 heads)."""
    return _create_cbsa_vit('cbsa_vit_tiny_patch16_224', 'tiny', pretrained, **kwargs)


@register_model
def cbsa_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Small/16 with CBSA attention (d=384, 12 layers, 6 heads)."""
    return _create_cbsa_vit('cbsa_vit_small_patch16_224', 'small', pretrained, **kwargs)


@register_model
def cbsa_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Base/16 with CBSA attention (d=768, 12 layers, 12 heads)."""
    return _create_cbsa_vit('cbsa_vit_base_patch16_224', 'base', pretrained, **kwargs)


@register_model
def cbsa_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Large/16 with CBSA attention (d=1024, 24 layers, 16 heads)."""
    return _create_cbsa_vit('cbsa_vit_large_patch16_224', 'large', pretrained, **kwargs)


@register_model
def cbsa_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Short name of cbsa_vit_tiny_patch16_224."""
    return _create_cbsa_vit('cbsa_vit_tiny', 'tiny', pretrained, **kwargs)


@register_model
def cbsa_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Short name of cbsa_vit_small_patch16_224."""
    return _create_cbsa_vit('cbsa_vit_small', 'small', pretrained, **kwargs)


@register_model
def cbsa_vit_base(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Short name of cbsa_vit_base_patch16_224."""
    return _create_cbsa_vit('cbsa_vit_base', 'base', pretrained, **kwargs)


@register_model
def cbsa_vit_large(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Short name of cbsa_vit_large_patch16_224."""
    return _create_cbsa_vit('cbsa_vit_large', 'large', pretrained, **kwargs)
