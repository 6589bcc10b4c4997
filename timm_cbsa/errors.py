"""The base of the errors timm_cbsa raises on purpose: ``except timm_cbsa.CBSAError`` catches any of them. Each
specific error keeps the built-in base it always had, so ``except ValueError`` / ``RuntimeError`` / ``TypeError`` /
``FileNotFoundError`` code keeps working:

    CBSAError(Exception)
    ├── CBSAConfigMismatchError(CBSAError, ValueError)    weights saved with another rep_grid / legacy_pool
    ├── CheckpointLoadError(CBSAError, RuntimeError)      a checkpoint file cannot be read (names the file)
    │   └── UnsafeCheckpointError                         ... it needs a type weights-only loading refuses
    ├── CheckpointMismatchError(CBSAError, RuntimeError)  a checkpoint does not fit the model (key report)
    ├── UnsupportedModelError(CBSAError, TypeError)       convert() / attn_layer= cannot handle the model
    └── DatasetNotFoundError(CBSAError, FileNotFoundError)  dataset files missing or malformed

Each is defined next to the code that raises it and exported by ``timm_cbsa`` (``DatasetNotFoundError``: by
``timm_cbsa.data``).
"""

__all__ = ['CBSAError']


class CBSAError(Exception):
    """Base of timm_cbsa's own errors (see the module docstring for the tree)."""
