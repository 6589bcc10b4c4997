from . import cbsa_vit, cbt, cbt_fmnist
from ._checkpoint import CheckpointLoadError, UnsafeCheckpointError, read_state_dict
from ._helpers import CBSAConfigMismatchError, cbsa_config, check_cbsa_config, configure_cbsa
from .cbt import CBTBlock, CheckpointMismatchError, ConvStemPatchEmbed, cbt_checkpoint_filter_fn, load_official_cbt
