"""timm_cbsa: Contract-and-Broadcast Self-Attention for timm.

``import timm_cbsa`` registers the ``cbsa_vit_*`` and ``cbt_*`` models and the ``attn_layer='cbsa'`` string.
It also registers the family strings 'cbsa_star', 'agent', 'agent_qkv', 'mssa', 'tssa', 'linear' (layers/family.py),
the pooled layers with a fixed representative grid 'cbsa_r4', 'cbsa_star_r4', 'agent_r4', 'agent_qkv_r4' (r = 1 … 16;
layers/named.py), and exposes ``convert(model, variant=...)`` for loaded timm ViTs (convert.py). Load hub / local-dir
exports of these models only after ``import timm_cbsa``. Checkpoints: ``timm_cbsa.checkpoint`` (docs/checkpoints.md).
"""
from timm.models.vision_transformer import ATTN_LAYERS as _ATTN_LAYERS

from .layers import (
    BACKENDS, CBSA, ISTA, GridAwareAttention, bind_patch_grid, default_backend, get_backend, pool_representatives,
    set_backend, use_backend,
)

_ATTN_LAYERS['cbsa'] = CBSA

from .layers.family import (  # noqa: E402  (the CBSA family: 'cbsa_star', 'agent', 'agent_qkv', 'mssa', 'tssa', 'linear')
    FAMILY_ATTN_LAYERS, MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, LinearAttention,
    contract_and_broadcast_general,
)

_ATTN_LAYERS.update(FAMILY_ATTN_LAYERS)

from .layers import NAMED_ATTN_LAYERS  # noqa: E402

_ATTN_LAYERS.update(NAMED_ATTN_LAYERS)

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
