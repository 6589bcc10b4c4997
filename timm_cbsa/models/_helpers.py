"""Shared by the model files: the size table and entrypoint registration, building with the CBSA-specific model
kwargs (``build_cbsa_model``), changing them later (``configure_cbsa``), and the model-level CBSA configuration
(``cbsa_config`` / ``check_cbsa_config``).

The settings that change what the weights compute (rep_grid, legacy_pool) are fixed while the layers are built
(``pooling_defaults``), so pretrained weights load into a model that already has them — and every layer checks them
against the record saved with its weights (``layers/settings.py``)."""
import logging
import sys
from typing import Any, Callable, Dict, Optional, Tuple, Union

from torch import nn
from timm.models import build_model_with_cfg, register_model

from ..layers.config import resolve_backend
from ..layers.layout import (
    GridAwareAttention, bind_patch_grid, check_rep_grid_fits, find_grid_aware_layers, pooling_defaults,
)
from ..layers.named import grid_layer_name
from ..layers.settings import CBSAConfigMismatchError, describe_differences
from ..ops.contract_broadcast.pooling import to_grid

__all__ = ['CBSA_MODEL_KWARGS', 'VIT_SIZES', 'pop_cbsa_kwargs', 'build_cbsa_model', 'configure_cbsa', 'cbsa_config',
           'check_cbsa_config', 'register_entrypoints', 'CBSAConfigMismatchError']

_logger = logging.getLogger(__name__)

# ViT-T/S/B/L: width, depth, heads. The paper's CBT-T/S/B/L (Table 3) have the same; cbsa_vit_* are these ViTs.
VIT_SIZES = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
    'large': dict(embed_dim=1024, depth=24, num_heads=16),
}

# kwargs every CBSA model entrypoint accepts on top of the VisionTransformer ones; they carry no parameters
CBSA_MODEL_KWARGS = ('rep_grid', 'legacy_pool', 'backend')


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


def build_cbsa_model(cbsa_kwargs: Dict[str, Any], *args, **kwargs) -> nn.Module:
    """``build_model_with_cfg(*args, **kwargs)`` with the layers built with ``cbsa_kwargs``' rep_grid / legacy_pool
    (before any pretrained weights load), then bound and given their backend (``configure_cbsa``). A CBSA
    configuration that differs from the one a saved config records (timm's ``pretrained_model_args``) is refused."""
    with pooling_defaults(cbsa_kwargs.get('rep_grid'), cbsa_kwargs.get('legacy_pool')):
        model = build_model_with_cfg(*args, **kwargs)
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
        for layer in layers:
            check_rep_grid_fits(owner.patch_embed, layer, rg)
        plan.append((owner, layers))
    for owner, layers in plan:   # everything checked: now change the model
        for layer in layers:
            if rg is not None:
                layer.rep_grid = rg
            if legacy_pool is not None:
                layer.legacy_pool = legacy_pool
            layer.backend = layer.backend if backend is None else backend   # (re)selects the implementation for m
        bind_patch_grid(owner, layers)
    if plan:
        _record_model_args(model)
    return model


def _record_model_args(model: nn.Module) -> None:
    """Keep what ``save_for_hf`` writes to config.json in step with the layers: rep_grid / legacy_pool for our
    models; for a ViT built with ``attn_layer='NAME'``, the registered name of the new grid ('NAME_rR')."""
    args = dict(getattr(model, '_model_args', {}) or {})
    if _is_ours(model):
        args.update(cbsa_config(model))
    elif _names_grid_aware_layer(args.get('attn_layer')) and cbsa_config(model):
        grid = tuple(cbsa_config(model)['rep_grid'])
        name = grid_layer_name(args['attn_layer'], grid)
        if name is None:
            _logger.warning("rep_grid %s has no attn_layer name ('%s_rR' are square, R <= 16): config.json written "
                            'by save_for_hf will not rebuild it, and loading those weights into a model built from '
                            'it is refused.', grid, args['attn_layer'])
        else:
            args['attn_layer'] = name
    model._model_args = args


def _names_grid_aware_layer(name: Any) -> bool:
    from timm.models.vision_transformer import ATTN_LAYERS
    return isinstance(name, str) and isinstance(ATTN_LAYERS.get(name), type) and issubclass(
        ATTN_LAYERS[name], GridAwareAttention)


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
    saved = {k: list(to_grid(v)) if k == 'rep_grid' else bool(v) for k, v in saved.items()
             if k in ('rep_grid', 'legacy_pool') and v is not None}
    diffs = describe_differences(saved, cbsa_config(model))
    if diffs:
        msg = ('The weights were saved with another CBSA configuration than this model has (' + '; '.join(diffs)
               + '): the same weights would compute different outputs. Build the model with the saved values, '
               'e.g. configure_cbsa(model, rep_grid=..., legacy_pool=...).')
        if strict:
            raise CBSAConfigMismatchError(msg)
        _logger.warning(msg)
