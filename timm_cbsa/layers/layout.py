"""Where CBSA layers learn the patch grid.

A CBSA layer pools the patch tokens on their real (H_p, W_p) grid, so it must know that grid for every batch. timm's
``Block`` only hands attention ``x`` (B, N, C), so the model that owns the patch embedding tells its layers:

* ``bind_patch_grid(model)`` gives every grid-aware layer the model's static grid and registers a forward hook on
  ``model.patch_embed`` that refreshes the grid from each batch (``dynamic_img_size=True``, ``set_input_size()``,
  non-square images). It is idempotent.
* Building any timm ViT whose blocks contain CBSA layers (``create_model('vit_small_patch16_224',
  attn_layer='cbsa')``) binds automatically: a torch module-registration hook notices when a module with a
  ``patch_embed`` receives its ``blocks``.

Prefix tokens are the tokens in front of the H_p*W_p patch tokens (timm's layout), so the layer never needs to guess
a square or the number of prefix tokens. Under TorchScript (``timm.layers.set_scriptable(True)``) no hook is
registered and the static grid is used; pass ``grid_size=`` to the layer to override it.
"""
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from ._fx import is_fx_tracing

__all__ = ['GridAwareAttention', 'PatchGridHook', 'bind_patch_grid', 'find_grid_aware_layers']


class GridAwareAttention(nn.Module):
    """Base class of attention layers that need the patch grid (CBSA and its pooled-representative relatives)."""
    grid_size: Optional[Tuple[int, int]]
    num_prefix_tokens: int  # -1: unknown (then N - H_p*W_p)

    def __init__(self):
        super().__init__()
        self.grid_size = None
        self.num_prefix_tokens = -1


def find_grid_aware_layers(module: nn.Module) -> List[GridAwareAttention]:
    return [m for m in module.modules() if isinstance(m, GridAwareAttention)]


def _grid_from_patch_embed(module: nn.Module, args, output) -> Tuple[int, int]:
    if output.ndim == 4:
        fmt = str(getattr(module, 'output_fmt', 'NCHW'))
        if fmt.endswith('NHWC'):
            return int(output.shape[1]), int(output.shape[2])
        return int(output.shape[2]), int(output.shape[3])
    img = args[0]
    hw = (int(img.shape[-2]), int(img.shape[-1]))
    if hasattr(module, 'dynamic_feat_size'):
        gh, gw = module.dynamic_feat_size(hw)
        return int(gh), int(gw)
    gh, gw = module.grid_size
    return int(gh), int(gw)


class PatchGridHook:
    """Forward hook on a patch embedding: sets ``grid_size`` of its CBSA layers from the batch it just embedded."""

    def __init__(self, layers: Iterable[nn.Module]):
        self.layers = list(layers)

    def __call__(self, module: nn.Module, args, output):
        if is_fx_tracing():  # traced graphs are specialised to the static grid
            return None
        grid = _grid_from_patch_embed(module, args, output)
        for layer in self.layers:
            layer.grid_size = grid
        return None


def _is_scriptable() -> bool:
    try:
        from timm.layers import is_scriptable
        return is_scriptable()
    except ImportError:  # pragma: no cover
        return False


def bind_patch_grid(model: nn.Module, layers: Optional[List[nn.Module]] = None) -> List[nn.Module]:
    """Connect ``model.patch_embed`` to the CBSA layers of ``model`` (or ``layers``). Returns the layers bound."""
    patch_embed = getattr(model, 'patch_embed', None)
    if patch_embed is None or getattr(patch_embed, 'grid_size', None) is None:
        raise ValueError(
            f'{type(model).__name__} has no patch_embed with a grid_size; CBSA layers need the patch grid. '
            'Pass grid_size= to the layer yourself.')
    layers = find_grid_aware_layers(model) if layers is None else list(layers)
    grid = tuple(int(g) for g in patch_embed.grid_size)
    for layer in layers:
        layer.grid_size = grid
    if _is_scriptable():
        return layers
    for hook in patch_embed._forward_hooks.values():
        if isinstance(hook, PatchGridHook):
            hook.layers = layers
            return layers
    patch_embed.register_forward_hook(PatchGridHook(layers))
    return layers


def _bind_when_blocks_registered(module: nn.Module, name: str, submodule: Optional[nn.Module]):
    """torch module-registration hook: bind a ViT's CBSA layers as soon as it receives its ``blocks``."""
    if name != 'blocks' or submodule is None:
        return None
    patch_embed = module._modules.get('patch_embed', None)
    if patch_embed is None or getattr(patch_embed, 'grid_size', None) is None:
        return None
    layers = find_grid_aware_layers(submodule)
    if layers:
        bind_patch_grid(module, layers)
    return None


_REGISTRATION_HANDLE = torch.nn.modules.module.register_module_module_registration_hook(_bind_when_blocks_registered)
