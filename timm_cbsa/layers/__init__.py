"""The attention layers: CBSA (``cbsa.py``), its family (``family.py``), CRATE's ISTA block (``ista.py``), the
shared base (``base.py``, ``layout.py``: timm's constructor, the representative base and how it learns the patch
grid) and the process-wide backend default (``config.py``)."""
from .base import ProjectedAttention
from .cbsa import CBSA
from .config import BACKENDS, default_backend, get_backend, set_backend, use_backend
from .family import FAMILY_ATTN_LAYERS, MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, LinearAttention
from .ista import ISTA
from .layout import GridAwareAttention, bind_patch_grid

__all__ = [
    'CBSA', 'CBSAStar', 'AgentAttention', 'AgentAttentionQKV', 'MSSA', 'TSSA', 'LinearAttention', 'ISTA',
    'ProjectedAttention', 'GridAwareAttention', 'FAMILY_ATTN_LAYERS', 'bind_patch_grid',
    'BACKENDS', 'default_backend', 'get_backend', 'set_backend', 'use_backend',
]
