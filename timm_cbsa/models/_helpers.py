"""Shared by the model files: CBSA-specific model kwargs, applied after timm builds the model."""
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from ..layers.backends import BACKENDS
from ..layers.layout import bind_patch_grid, find_grid_aware_layers
from ..layers.representatives import to_grid

__all__ = ['CBSA_MODEL_KWARGS', 'pop_cbsa_kwargs', 'configure_cbsa']

# kwargs every CBSA model entrypoint accepts on top of the VisionTransformer ones; they carry no parameters, so they
# are applied after the model is built (timm records them in model._model_args, so save_for_hf round-trips them).
CBSA_MODEL_KWARGS = ('rep_grid', 'legacy_pool', 'backend')


def pop_cbsa_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs.pop(k) for k in CBSA_MODEL_KWARGS if k in kwargs}


def _owners(model: nn.Module):
    """Modules that own a patch embedding and prefix tokens (the ViT itself, also inside feature wrappers)."""
    return [m for m in model.modules() if hasattr(m, 'patch_embed') and hasattr(m, 'num_prefix_tokens')]


def configure_cbsa(
        model: nn.Module,
        rep_grid: Optional[Union[int, Tuple[int, int]]] = None,
        legacy_pool: Optional[bool] = None,
        backend: Optional[str] = None,
) -> nn.Module:
    """Set representative grid / legacy pooling / backend on every CBSA layer of ``model`` and bind its patch grid.

    Raises a clear error when the model's patch grid is smaller than the representative grid.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f'Unknown CBSA backend {backend!r}; choose one of {BACKENDS}.')
    for owner in _owners(model):
        layers = find_grid_aware_layers(owner)
        if not layers:
            continue
        bind_patch_grid(owner, layers)
        for layer in layers:
            layer.num_prefix_tokens = int(owner.num_prefix_tokens)
            if rep_grid is not None:
                layer.rep_grid = to_grid(rep_grid)
            if legacy_pool is not None:
                if legacy_pool and owner.num_prefix_tokens != 1:
                    raise ValueError(
                        f'legacy_pool reproduces the released CBSA code, which assumes exactly one class token; this '
                        f'model has {owner.num_prefix_tokens} prefix tokens.')
                layer.legacy_pool = bool(legacy_pool)
            if backend is not None:
                layer.backend = backend
            gh, gw = layer.grid_size
            rh, rw = layer.rep_grid
            if gh < rh or gw < rw:
                raise ValueError(
                    f'The patch grid {gh}x{gw} (img_size {tuple(owner.patch_embed.img_size)}, patch_size '
                    f'{tuple(owner.patch_embed.patch_size)}) is smaller than the representative grid {rh}x{rw}; '
                    f'use a larger img_size, a smaller patch_size or a smaller rep_grid.')
    return model
