from . import cbsa_vit, cbt, cbt_fmnist
from ..checkpoint import (
    CBSAConfigMismatchError, CheckpointLoadError, CheckpointMismatchError, UnsafeCheckpointError, read_state_dict,
)
from ._helpers import cbsa_config, check_cbsa_config, configure_cbsa
from .cbt import CBTBlock, ConvStemPatchEmbed, cbt_checkpoint_filter_fn, load_official_cbt
