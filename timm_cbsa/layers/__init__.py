from .config import BACKENDS, default_backend, get_backend, set_backend, use_backend
from .cbsa import CBSA
from .ista import ISTA
from .layout import GridAwareAttention, PatchGridHook, bind_patch_grid, current_patch_grid, find_grid_aware_layers
from ..ops.contract_broadcast.pooling import pool_representatives
from .family import (
    FAMILY_ATTN_LAYERS, MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, LinearAttention,
    contract_and_broadcast_general,
)
