"""Shared by the model files: the size table, entrypoint registration, CBSA-specific model kwargs (applied after timm
builds the model) and the CBSA configuration a saved model records (``cbsa_config`` / ``check_cbsa_config``)."""
import logging
import sys
from typing import Any, Callable, Dict, Optional, Tuple, Union

from torch import nn
from timm.models import register_model

from ..layers.config import resolve_backend
from ..layers.layout import bind_patch_grid, find_grid_aware_layers
from ..ops.contract_broadcast.pooling import to_grid
from ..errors import CBSAError

__all__ = ['CBSA_MODEL_KWARGS', 'VIT_SIZES', 'pop_cbsa_kwargs', 'configure_cbsa', 'finish_cbsa_model', 'cbsa_config',
           'check_cbsa_config', 'register_entrypoints', 'CBSAConfigMismatchError']

_logger = logging.getLogger(__name__)

# ViT-T/S/B/L: width, depth, heads. The paper's CBT-T/S/B/L (Table 3) have the same; cbsa_vit_* are these ViTs.
VIT_SIZES = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
    'large': dict(embed_dim=1024, depth=24, num_heads=16),
}

# kwargs every CBSA model entrypoint accepts on top of the VisionTransformer ones; they carry no parameters, so they
# are applied after the model is built
CBSA_MODEL_KWARGS = ('rep_grid', 'legacy_pool', 'backend')
# the ones that change what the weights compute: recorded in model._model_args (saved by save_for_hf) and checkpoints
CONFIG_KEYS = ('rep_grid', 'legacy_pool')


class CBSAConfigMismatchError(CBSAError, ValueError):
    """Saved weights were trained with another CBSA configuration (rep_grid / legacy_pool) than the model has."""


def _entrypoint(module: str, name: str, create: Callable[..., nn.Module], doc: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create(name, pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__, entrypoint.__doc__ = module, doc
    return entrypoint


def register_entrypoints(module: str, create: Callable[..., nn.Module], docs: Dict[str, str]) -> None:
    """Register one timm entrypoint per name of ``docs`` (its docstring): ``name(pretrained=False, **kwargs)`` returns
    ``create(name, pretrained, **kwargs)``. It belongs to ``module`` (whose ``default_cfgs`` hold the pretrained cfgs,
    and where it becomes an attribute), as if defined there with ``@register_model``."""
    for name, doc in docs.items():
        setattr(sys.modules[module], name, register_model(_entrypoint(module, name, create, doc)))


def pop_cbsa_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs.pop(k) for k in CBSA_MODEL_KWARGS if k in kwargs}


def finish_cbsa_model(model: nn.Module, cbsa_kwargs: Dict[str, Any]) -> nn.Module:
    """End of our entrypoints: apply the CBSA kwargs (``configure_cbsa``) and refuse a CBSA configuration that differs
    from the one recorded with the weights being loaded (timm's ``pretrained_model_args``, from a saved config)."""
    configure_cbsa(model, **cbsa_kwargs)
    check_cbsa_config(model, getattr(model, 'pretrained_model_args', None))
    return model


def _owners(model: nn.Module):
    """Modules that own a patch embedding and prefix tokens (the ViT itself, also inside feature wrappers)."""
    return [m for m in model.modules() if hasattr(m, 'patch_embed') and hasattr(m, 'num_prefix_tokens')]


def configure_cbsa(
        model: nn.Module,
        rep_grid: Optional[Union[int, Tuple[int, int]]] = None,
        legacy_pool: Optional[bool] = None,
        backend: Optional[str] = None,
) -> nn.Module:
    """Set representative grid / legacy pooling / backend on every CBSA-family layer of ``model`` and bind its patch
    grid (``bind_patch_grid``). Every argument is checked against every layer first: a refused call (ValueError)
    leaves the model unchanged. ``rep_grid`` / ``legacy_pool`` are recorded in ``model._model_args`` for models built
    by our factories (so ``save_for_hf`` saves them); ``cbsa_config(model)`` reads them back from the layers.
    """
    rg = None if rep_grid is None else to_grid(rep_grid)
    if legacy_pool is not None and not isinstance(legacy_pool, bool):
        raise ValueError(f'legacy_pool must be True or False, got {legacy_pool!r}.')
    if backend is not None:
        resolve_backend(backend)   # raises on an unknown name
    plan = []
    for owner in _owners(model):
        layers = find_grid_aware_layers(owner)
        if not layers:
            continue
        if legacy_pool and owner.num_prefix_tokens != 1:
            raise ValueError(
                f'legacy_pool reproduces the released CBSA code, which assumes exactly one class token; this '
                f'model has {owner.num_prefix_tokens} prefix tokens.')
        gh, gw = (int(g) for g in owner.patch_embed.grid_size)
        for layer in layers:
            rh, rw = rg if rg is not None else layer.rep_grid
            if gh < rh or gw < rw:
                raise ValueError(
                    f'The patch grid {gh}x{gw} (img_size {tuple(owner.patch_embed.img_size)}, patch_size '
                    f'{tuple(owner.patch_embed.patch_size)}) is smaller than the representative grid {rh}x{rw}; '
                    f'use a larger img_size, a smaller patch_size or a smaller rep_grid.')
        plan.append((owner, layers))
    for owner, layers in plan:   # everything checked: now change the model
        bind_patch_grid(owner, layers)
        for layer in layers:
            if rg is not None:
                layer.rep_grid = rg
            if legacy_pool is not None:
                layer.legacy_pool = legacy_pool
            layer.backend = layer.backend if backend is None else backend   # (re)selects the implementation for m
    if plan and _is_ours(model):
        model._model_args = dict(getattr(model, '_model_args', {}) or {}, **cbsa_config(model))
    return model


def _is_ours(model: nn.Module) -> bool:
    """Built by one of our entrypoints (whose kwargs include rep_grid / legacy_pool)."""
    from timm.models import is_model, model_entrypoint
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    return bool(arch) and is_model(arch) and model_entrypoint(arch).__module__.startswith('timm_cbsa.')


def cbsa_config(model: nn.Module) -> Dict[str, Any]:
    """The configuration that changes what a CBSA model's weights compute, read from its layers:
    ``{'rep_grid': [r_h, r_w], 'legacy_pool': bool}`` (JSON-serialisable; ``{}`` when the model has no grid-aware
    layers). Save it next to the weights; check it on load with ``check_cbsa_config``."""
    layers = find_grid_aware_layers(model)
    if not layers:
        return {}
    configs = {(tuple(layer.rep_grid), bool(layer.legacy_pool)) for layer in layers}
    if len(configs) > 1:
        raise ValueError(f'The CBSA layers of this model differ in (rep_grid, legacy_pool): {sorted(configs)}; '
                         'set them all with configure_cbsa(model, ...).')
    (rep_grid, legacy_pool), = configs
    return {'rep_grid': list(rep_grid), 'legacy_pool': legacy_pool}


def check_cbsa_config(model: nn.Module, saved: Optional[Dict[str, Any]], strict: bool = True) -> None:
    """Compare the CBSA configuration recorded with saved weights (``cbsa_config`` of the model that saved them, or
    any dict holding 'rep_grid' / 'legacy_pool', e.g. saved model_args) with ``model``'s. A difference raises
    ``CBSAConfigMismatchError`` naming both values (a warning when ``strict=False``); missing keys are not checked."""
    if not saved:
        return
    current = cbsa_config(model)
    diffs = []
    for key in CONFIG_KEYS:
        if key not in saved or saved[key] is None or key not in current:
            continue
        want = list(to_grid(saved[key])) if key == 'rep_grid' else bool(saved[key])
        if want != current[key]:
            diffs.append(f'{key}: saved {want}, model {current[key]}')
    if diffs:
        msg = ('The weights were saved with another CBSA configuration than this model has (' + '; '.join(diffs)
               + '): the same weights would compute different outputs. Build the model with the saved values, '
               'e.g. configure_cbsa(model, rep_grid=..., legacy_pool=...).')
        if strict:
            raise CBSAConfigMismatchError(msg)
        _logger.warning(msg)
