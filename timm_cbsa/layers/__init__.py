"""The attention layers: CBSA (``cbsa.py``), its family (``family.py``), CRATE's ISTA block (``ista.py``), the
shared base (``base.py``, ``layout.py``: timm's constructor, the representative base and how it learns the patch
grid), the settings records in the state dict (``settings.py``), the 'NAME_rR' names (``named.py``) and the
process-wide backend default (``config.py``)."""
from .base import ProjectedAttention
from .cbsa import CBSA
from .config import BACKENDS, default_backend, get_backend, set_backend, use_backend
from .family import FAMILY_ATTN_LAYERS, MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, LinearAttention
from .ista import ISTA
from .layout import GridAwareAttention, bind_patch_grid, pooling_defaults
from .named import grid_named_layers

# 'cbsa_r4', 'cbsa_star_r4', 'agent_r4', 'agent_qkv_r4' (r = 1 … 16): pooled layers with a fixed representative grid
NAMED_ATTN_LAYERS = grid_named_layers(
    {'cbsa': CBSA, 'cbsa_star': CBSAStar, 'agent': AgentAttention, 'agent_qkv': AgentAttentionQKV})

__all__ = [
    'CBSA', 'CBSAStar', 'AgentAttention', 'AgentAttentionQKV', 'MSSA', 'TSSA', 'LinearAttention', 'ISTA',
    'ProjectedAttention', 'GridAwareAttention', 'FAMILY_ATTN_LAYERS', 'NAMED_ATTN_LAYERS', 'bind_patch_grid', 'pooling_defaults',
    'BACKENDS', 'default_backend', 'get_backend', 'set_backend', 'use_backend',
]
