from . import cbsa_vit, cbt, cbt_fmnist
from ._helpers import configure_cbsa
from .cbt import CBTBlock, CheckpointMismatchError, ConvStemPatchEmbed, cbt_checkpoint_filter_fn, load_official_cbt
