"""timm_cbsa: Contract-and-Broadcast Self-Attention for timm.

``import timm_cbsa`` registers the ``cbsa_vit_*`` and ``cbt_*`` models and the ``attn_layer='cbsa'`` string.
"""
from timm.models.vision_transformer import ATTN_LAYERS as _ATTN_LAYERS

from .layers import (
    BACKENDS, CBSA, ISTA, GridAwareAttention, bind_patch_grid, get_backend, pool_representatives, set_backend,
    use_backend,
)

_ATTN_LAYERS['cbsa'] = CBSA

from .models import CheckpointMismatchError, configure_cbsa, load_official_cbt  # noqa: E402  (registers models)

__version__ = '0.1.0'
