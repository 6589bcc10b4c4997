"""cbt_nano_patch8_32: a small CBT for Fashion-MNIST, with trained weights shipped inside the package.

The architecture of the paper's CBT (``cbt.py``: pre-norm CBSA + ISTA, conv stem, class token, learned position
embedding, class-token head) at a size that trains on a CPU in minutes: 32×32 grey input (Fashion-MNIST's 28×28
resized), a 3-conv stem (patch 8 → a 4×4 token grid), d = 64, 4 layers, 2 heads, a 2×2 representative grid (m = 4),
10 classes. It is the model of the README's main job (``train/configs/fmnist_quickstart.yaml``).

``timm.create_model('cbt_nano_patch8_32.fmnist', pretrained=True)`` loads the weights from the installed package
(``timm_cbsa/models/weights/``; no download). They were trained by ``scripts/train_fmnist_weights.py`` (the quickstart
recipe; see ``FMNIST_WEIGHTS`` for the run and its test accuracy, which ``tests/models/test_pretrained_fmnist.py``
re-measures on the Debian Fashion-MNIST test set).
"""
import json
import os
from functools import partial

from torch import nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from ._helpers import build_cbsa_model, pop_cbsa_kwargs
from .cbt import CBTBlock, ConvStemPatchEmbed

__all__ = ['FMNIST_WEIGHTS', 'WEIGHTS_DIR']

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')

_FILE = 'cbt_nano_patch8_32.fmnist.safetensors'


def _provenance() -> dict:
    """The JSON written next to the weights by scripts/train_fmnist_weights.py (command, recipe, test accuracy)."""
    path = os.path.join(WEIGHTS_DIR, os.path.splitext(_FILE)[0] + '.json')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# Where the shipped weights came from and their Fashion-MNIST test top-1 (%), as recorded by the training script;
# tests/models/test_pretrained_fmnist.py re-measures test_top1.
FMNIST_WEIGHTS = {
    'file': _FILE, 'test_top1': None, 'recipe': 'train/configs/fmnist_quickstart.yaml',
    'command': 'python scripts/train_fmnist_weights.py',
    **{k: v for k, v in _provenance().items()
       if k in ('test_top1', 'recipe', 'command', 'date', 'sha256', 'seed', 'torch', 'timm')},
}

_ARCH = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 10, 'input_size': (1, 32, 32), 'pool_size': None, 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'fixed_input_size': True, 'mean': FASHION_MNIST_MEAN, 'std': FASHION_MNIST_STD,
        'first_conv': 'patch_embed.proj.0.0', 'classifier': 'head', 'license': 'apache-2.0',
        'label_names': FASHION_MNIST_CLASSES, 'paper_ids': 'arXiv:2509.16875',
        'paper_name': 'Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'cbt_nano_patch8_32.fmnist': _cfg(
        file=os.path.join(WEIGHTS_DIR, FMNIST_WEIGHTS['file']),
        description=(f"Fashion-MNIST (Debian dataset-fashion-mnist, 60k train images), test top-1 "
                     f"{FMNIST_WEIGHTS['test_top1']}% on the 10k test images; trained by {FMNIST_WEIGHTS['command']} "
                     f"({FMNIST_WEIGHTS['recipe']})."),
        origin_url='timm_cbsa (this package): ' + FMNIST_WEIGHTS['command'],
        notes=(f"test top-1 {FMNIST_WEIGHTS['test_top1']}%", 'offline: the file is inside the installed package'),
    ),
})


@register_model
def cbt_nano_patch8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CBT-nano for 32×32 grey images: 3-conv stem (patch 8, 4×4 tokens), d=64, 4 layers, 2 heads, m=4, 10 classes."""
    cbsa_kwargs = pop_cbsa_kwargs(kwargs)
    cbsa_kwargs.setdefault('rep_grid', 2)
    out_indices = kwargs.pop('out_indices', 3)
    model_args = dict(
        embed_layer=ConvStemPatchEmbed, block_fn=CBTBlock, qkv_bias=False, norm_layer=partial(nn.LayerNorm, eps=1e-5),
        class_token=True, global_pool='token', **_ARCH)
    return build_cbsa_model(
        cbsa_kwargs,
        VisionTransformer,
        'cbt_nano_patch8_32',
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **dict(model_args, **kwargs),
    )
