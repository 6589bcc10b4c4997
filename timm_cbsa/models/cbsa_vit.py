"""cbsa_vit_*: timm's VisionTransformer configured with CBSA attention (``attn_layer='cbsa'``) — not a fork.

Widths / depths / heads are those of ViT-T/S/B/L; the MLP, norms, class token and position embedding are timm's.
Extra kwargs: ``rep_grid`` (representative grid, default 8 → m = 64), ``legacy_pool``, ``backend``; the layers are
built with them, before pretrained weights load (their settings records are checked then).
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ._helpers import VIT_SIZES, build_cbsa_model, pop_cbsa_kwargs, register_entrypoints

__all__ = []


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
    **{f'cbsa_vit_{size}_patch16_224': _cfg() for size in VIT_SIZES},
    **{f'cbsa_vit_{size}': _cfg() for size in VIT_SIZES},
})


def _create_cbsa_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    cbsa_kwargs = pop_cbsa_kwargs(kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    model_args = dict(patch_size=16, attn_layer='cbsa', qkv_bias=False, **VIT_SIZES[variant.split('_')[2]])
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


# cbsa_vit_{tiny,small,base,large}_patch16_224 and their short names cbsa_vit_{tiny,small,base,large}
register_entrypoints(__name__, _create_cbsa_vit, {
    name: f"ViT-{size[0].upper()}/16 with CBSA attention (d={a['embed_dim']}, {a['depth']} layers, {a['num_heads']} heads)."
    for size, a in VIT_SIZES.items() for name in (f'cbsa_vit_{size}_patch16_224', f'cbsa_vit_{size}')
})
