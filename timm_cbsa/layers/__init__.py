from .backends import BACKENDS, get_backend, set_backend, use_backend
from .cbsa import CBSA
from .ista import ISTA
from .layout import GridAwareAttention, PatchGridHook, bind_patch_grid, find_grid_aware_layers
from .representatives import pool_representatives
