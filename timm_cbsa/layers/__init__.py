from .config import BACKENDS, default_backend, get_backend, set_backend, use_backend
from .cbsa import CBSA
from .ista import ISTA
from .layout import (
    GridAwareAttention, PatchGridHook, bind_patch_grid, current_patch_grid, find_grid_aware_layers, pooling_defaults,
)
from .settings import CBSAConfigMismatchError, RecordedSettings
from ..ops.contract_broadcast.pooling import pool_representatives
from .family import (
    FAMILY_ATTN_LAYERS, MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, LinearAttention,
    contract_and_broadcast_general,
)
from .named import grid_named_layers

# 'cbsa_r4', 'cbsa_star_r4', 'agent_r4', 'agent_qkv_r4' (r = 1 … 16): pooled layers with a fixed representative grid
NAMED_ATTN_LAYERS = grid_named_layers(
    {'cbsa': CBSA, 'cbsa_star': CBSAStar, 'agent': AgentAttention, 'agent_qkv': AgentAttentionQKV})
