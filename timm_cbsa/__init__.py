"""timm_cbsa: Contract-and-Broadcast Self-Attention for timm.

``import timm_cbsa`` registers the ``cbsa_vit_*`` and ``cbt_*`` models and the ``attn_layer='cbsa'`` string.
It also registers the family strings 'cbsa_star', 'agent', 'agent_qkv', 'mssa', 'tssa', 'linear' (layers/family.py),
the pooled layers with a fixed representative grid 'cbsa_r4', 'cbsa_star_r4', 'agent_r4', 'agent_qkv_r4' (r = 1 … 16;
layers/named.py), and exposes ``convert(model, variant=...)`` for loaded timm ViTs (convert.py). Load hub / local-dir
exports of these models only after ``import timm_cbsa``. Checkpoints: ``timm_cbsa.checkpoint`` (docs/checkpoints.md).

The public API is ``__all__``: the attention layers, the backend default, model configuration and conversion,
checkpoints, the Hub and segmentation entry points, and the errors (all ``CBSAError``s, errors.py). Everything else is
reached through its module: ``timm_cbsa.layers``, ``timm_cbsa.ops.contract_broadcast`` (the operator),
``timm_cbsa.analysis`` (``python -m timm_cbsa.analysis``), ``timm_cbsa.checkpoint``, ``timm_cbsa.data``,
``timm_cbsa.segmentation``.
"""
from timm.models.vision_transformer import ATTN_LAYERS as _ATTN_LAYERS

from .errors import CBSAError
from .layers import (
    BACKENDS, CBSA, ISTA, MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, GridAwareAttention, LinearAttention,
    bind_patch_grid, get_backend, pooling_defaults, set_backend, use_backend,
)
from .layers import NAMED_ATTN_LAYERS as _NAMED_ATTN_LAYERS
from .layers.family import FAMILY_ATTN_LAYERS as _FAMILY_ATTN_LAYERS

_ATTN_LAYERS['cbsa'] = CBSA
_ATTN_LAYERS.update(_FAMILY_ATTN_LAYERS)   # 'cbsa_star', 'agent', 'agent_qkv', 'mssa', 'tssa', 'linear'
_ATTN_LAYERS.update(_NAMED_ATTN_LAYERS)    # 'cbsa_r4', 'cbsa_star_r4', 'agent_r4', 'agent_qkv_r4', ...

from .checkpoint import (  # noqa: E402
    CBSAConfigMismatchError, CheckpointLoadError, CheckpointMismatchError, UnsafeCheckpointError, load_weights,
    read_state_dict,
)
from .models import cbsa_config, check_cbsa_config, configure_cbsa, load_official_cbt  # noqa: E402  (registers models)

from .convert import (  # noqa: E402  (after the models: convert uses configure_cbsa / CheckpointMismatchError)
    ConversionReport, UnsupportedModelError, attention_kind, convert, create_with_attention, load_converted,
    save_converted,
)

from .hub import push_to_hub, save_to_folder  # noqa: E402  (Hugging Face Hub: weights, config.json, model card)
from .segmentation import create_segmenter  # noqa: E402  (Segmenter-style segmentation, docs/segmentation.md)

__version__ = '0.1.0'

__all__ = [
    # attention layers (also registered as attn_layer names) and CBT's ISTA block
    'CBSA', 'CBSAStar', 'AgentAttention', 'AgentAttentionQKV', 'MSSA', 'TSSA', 'LinearAttention', 'ISTA',
    'GridAwareAttention',
    # the process-wide backend default and per-model backends
    'BACKENDS', 'get_backend', 'set_backend', 'use_backend',
    # models: configuration, patch grid, released weights
    'configure_cbsa', 'cbsa_config', 'check_cbsa_config', 'bind_patch_grid', 'pooling_defaults', 'load_official_cbt',
    # converting timm ViTs
    'convert', 'create_with_attention', 'ConversionReport', 'attention_kind', 'save_converted', 'load_converted',
    # checkpoints and the Hub
    'read_state_dict', 'load_weights', 'push_to_hub', 'save_to_folder',
    # segmentation
    'create_segmenter',
    # errors
    'CBSAError', 'CBSAConfigMismatchError', 'CheckpointLoadError', 'UnsafeCheckpointError', 'CheckpointMismatchError',
    'UnsupportedModelError',
]
