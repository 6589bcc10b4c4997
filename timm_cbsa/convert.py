"""Swap CBSA-family attention into a timm ViT that is already built (and usually pretrained), keeping its weights.

    model = timm.create_model('vit_small_patch16_224', pretrained=True)
    model = timm_cbsa.convert(model, variant='agent')          # in place; inplace=False returns a converted copy
    print(model.cbsa_conversion)                               # what was replaced, parameter counts

Variants (paper §3.4 / §6.4, "ViT adaptation"):

=============  ===============  =======================================================================================
variant        ATTN name        weights
=============  ===============  =======================================================================================
'cbsa_star'    'cbsa_star'      CBSA*: pretrained qkv (3 projections) and proj kept; new η, κ per head set to 1
'agent'        'agent_qkv'      CBSA∨ (= released adaptation code): qkv and proj kept, no new parameters
'cbsa'         'cbsa'           single projection Uᵀ := W_v (value rows of qkv, with bias; ``cbsa_init`` picks
                                'v' | 'q' | 'k' | 'qk' = (W_q + W_k)/2); proj kept; η := 1, κ := N / (2m)
'linear'       'linear'         linear attention (φ = elu + 1): qkv and proj kept, no new parameters
=============  ===============  =======================================================================================

Why W_v for 'cbsa': a CBSA head outputs a combination of projected tokens that the output projection reads, and the
pretrained ``proj`` was trained to read value vectors. η = 1 matches the released code's (commented-out) update
``Q = Q + Q_delta``; it makes the representatives a sum of two averages of value vectors (pooled + extracted), and
κ = N/(2m) (N tokens of the model's default input, m representatives) undoes both that factor 2 and the average
broadcast weight m/N of Aᵀ, so every token starts by receiving an update of roughly the size of a value average.

Only timm ``VisionTransformer`` models (vit_*, deit_* including distilled, register-token ViTs, ``dynamic_img_size``,
``no_embed_class``) whose blocks hold timm's ``Attention`` are supported. Eva-family models (eva02_*,
vit_*_rope_*) carry rotary embeddings through their own ``EvaAttention`` and are refused. Everything is validated
before the model is touched: on error nothing is converted.

The converted model records ``attn_layer='<ATTN name>'`` in ``model._model_args``, so ``timm.models.save_for_hf``
writes it to ``config.json`` and ``timm.create_model('local-dir:DIR' or 'hf-hub:ORG/REPO', pretrained=True)``
rebuilds the converted architecture (after ``import timm_cbsa``, which registers the names). timm's ViT constructor
takes no ``rep_grid``, so a square non-default grid is converted to the registered layer that carries it
(``rep_grid=4`` → ``attn_layer='agent_qkv_r4'``, layers/named.py). Every layer also records its settings in the
state dict, and a load with other settings is refused (layers/settings.py).
"""
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .layers.cbsa import CBSA
from .layers.family import FAMILY_ATTN_LAYERS, AgentAttentionQKV, CBSAStar, LinearAttention
from .ops.contract_broadcast.pooling import to_grid
from .checkpoint import CheckpointMismatchError, check_keys, read_checkpoint, unwrap_state_dict
from .layers.named import base_layer_name, grid_layer_name
from .layers.settings import SETTINGS_KEY
from .models._helpers import cbsa_config, check_cbsa_config, configure_cbsa
from .errors import CBSAError

__all__ = [
    'VARIANTS', 'ConversionReport', 'UnsupportedModelError', 'convert', 'create_with_attention', 'attention_kind',
    'load_converted', 'save_converted',
]

_logger = logging.getLogger(__name__)

# convert variant -> (class, ATTN_LAYERS name recorded in model_args)
VARIANTS: Dict[str, Tuple[type, str]] = {
    'cbsa_star': (CBSAStar, 'cbsa_star'),
    'agent': (AgentAttentionQKV, 'agent_qkv'),
    'cbsa': (CBSA, 'cbsa'),
    'linear': (LinearAttention, 'linear'),
}
_CBSA_INITS = ('v', 'q', 'k', 'qk')
_SUPPORTED = ('timm VisionTransformer models whose blocks use timm Attention: vit_* (incl. register-token, '
              'dynamic_img_size, no_embed_class), deit_* (incl. distilled)')
_POOLED = (CBSAStar, AgentAttentionQKV, CBSA)


class UnsupportedModelError(CBSAError, TypeError):
    """The model is not a timm ViT whose attention convert() / attn_layer= can replace."""


@dataclass
class ConversionReport:
    """What ``convert`` changed."""
    variant: str
    attn_layer: str
    model: str
    replaced: List[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    init: str = ''

    def __str__(self) -> str:
        return (f"timm_cbsa.convert: {self.model} -> variant '{self.variant}' (attn_layer='{self.attn_layer}'): "
                f"replaced {len(self.replaced)} attention modules ({', '.join(self.replaced[:3])}"
                f"{', ...' if len(self.replaced) > 3 else ''}); params {self.params_before:,} -> "
                f"{self.params_after:,} ({self.params_after - self.params_before:+,}). {self.init}")


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    return f'{arch} ({type(model).__name__})' if arch else type(model).__name__


def _check_model(model: Any) -> List[Tuple[str, nn.Module]]:
    """Return [(name, attention)] of a supported ViT or raise naming what was given and what is supported."""
    from timm.models.vision_transformer import VisionTransformer
    from timm.layers import Attention
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f'convert() needs a timm model (nn.Module), got {type(model).__name__}. '
                                    f'Supported: {_SUPPORTED}.')
    name = _model_name(model)
    try:
        from timm.models.eva import Eva
    except ImportError:  # pragma: no cover
        Eva = ()
    if isinstance(model, Eva):
        raise UnsupportedModelError(
            f'{name} is an Eva-family model (eva02_*, vit_*_rope_*, ...): its EvaAttention applies rotary position '
            f'embeddings that CBSA-family layers do not take, so it is not converted. Supported: {_SUPPORTED}.')
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f'{name} is not a timm VisionTransformer; cannot convert its attention. '
                                    f'Supported: {_SUPPORTED}.')
    found = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, 'attn', None)
        if attn is None:
            raise UnsupportedModelError(
                f'{name}: block {i} ({type(block).__name__}) has no .attn module (parallel / fused blocks are not '
                f'supported). Supported: {_SUPPORTED}.')
        kind = attention_kind_of_module(attn)
        if kind != 'attn':
            known = base_layer_name(kind) in FAMILY_ATTN_LAYERS or base_layer_name(kind) == 'cbsa'
            already = f" (already converted: attn_layer='{kind}')" if known else ''
            raise UnsupportedModelError(
                f'{name}: blocks.{i}.attn is {type(attn).__name__}{already}; convert() starts from timm Attention. '
                f'Supported: {_SUPPORTED}.')
        if type(attn) is not Attention:
            raise UnsupportedModelError(f'{name}: blocks.{i}.attn is {type(attn).__name__}, a subclass of timm '
                                        f'Attention with unknown extras. Supported: {_SUPPORTED}.')
        if getattr(attn, 'gate', None) is not None:
            raise UnsupportedModelError(f'{name}: blocks.{i}.attn is a gated Attention; not supported.')
        dim = attn.proj.out_features
        if attn.qkv.in_features != dim or attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim:
            raise UnsupportedModelError(
                f'{name}: blocks.{i}.attn has attention width {attn.proj.in_features} != model width {dim} '
                f'(attn_head_dim / dim_out); not supported.')
        found.append((f'blocks.{i}.attn', attn))
    if not found:
        raise UnsupportedModelError(f'{name} has no attention blocks to convert.')
    return found


def _qkv_slices(attn: nn.Module, which: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    w, b = attn.qkv.weight, attn.qkv.bias
    C = attn.proj.in_features
    parts = {'q': slice(0, C), 'k': slice(C, 2 * C), 'v': slice(2 * C, 3 * C)}
    if which == 'qk':
        wq, bq = _qkv_slices(attn, 'q')
        wk, bk = _qkv_slices(attn, 'k')
        return (wq + wk) / 2, None if bq is None else (bq + bk) / 2
    s = parts[which]
    return w[s], None if b is None else b[s]


def _flags(attn: nn.Module) -> Dict[str, Any]:
    return dict(
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        scale_norm=not isinstance(attn.norm, nn.Identity),
        proj_bias=attn.proj.bias is not None,
        attn_drop=float(attn.attn_drop.p),
        proj_drop=float(attn.proj_drop.p),
    )


def _build(attn: nn.Module, cls: type, variant: str, rep_grid, cbsa_init: str, num_tokens: int) -> nn.Module:
    """A new ``cls`` attention module for ``attn``, sharing its Linear / norm modules where the variant keeps them."""
    flags = _flags(attn)
    ref = attn.qkv.weight
    kwargs = dict(num_heads=attn.num_heads, **flags, device=ref.device, dtype=ref.dtype)
    if flags['qk_norm'] or flags['scale_norm']:
        kwargs['norm_layer'] = nn.LayerNorm  # placeholder; the pretrained norm modules are moved in below
    if issubclass(cls, _POOLED) and rep_grid is not None:
        kwargs['rep_grid'] = rep_grid
    new = cls(attn.proj.out_features, **kwargs)
    with torch.no_grad():
        if variant == 'cbsa':
            w, b = _qkv_slices(attn, cbsa_init)
            new.qkv.weight.copy_(w)
            if b is not None:
                new.qkv.bias.copy_(b)
            if flags['qk_norm']:  # CBSA normalises its single projection; start from the key norm
                new.norm = copy.deepcopy(attn.k_norm)
            if flags['scale_norm']:
                new.norm_out = attn.norm
            m = new.num_representatives
            new.step_rep.fill_(1.0)
            new.step_x.fill_(num_tokens / (2.0 * m))
        else:
            new.qkv = attn.qkv
            new.q_norm, new.k_norm, new.norm = attn.q_norm, attn.k_norm, attn.norm
        new.proj = attn.proj
    return new


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convert(
        model: nn.Module,
        variant: str = 'cbsa_star',
        inplace: bool = True,
        rep_grid: Optional[Union[int, Tuple[int, int]]] = None,
        cbsa_init: str = 'v',
        return_report: bool = False,
):
    """Replace every attention module of a timm ViT by a CBSA-family layer, reusing its trained weights.

    Args:
        model: a timm ``VisionTransformer`` (vit_*, deit_*, register-token ViTs) with timm ``Attention`` blocks.
        variant: 'cbsa_star', 'agent', 'cbsa' or 'linear' (see the module docstring).
        inplace: modify ``model`` (its qkv / proj modules are moved into the new layers, so their parameters are the
            same objects), or convert a deep copy and leave ``model`` untouched.
        rep_grid: representative grid for the pooled variants (default 8 → m = 64); must fit the patch grid.
        cbsa_init: which pretrained projection initialises the single projection of variant 'cbsa':
            'v' (default), 'q', 'k' or 'qk' (mean of W_q and W_k).
        return_report: return ``(model, report)`` instead of ``model``.
    Returns:
        The converted model (``model`` itself when ``inplace``); the ``ConversionReport`` is also stored as
        ``model.cbsa_conversion`` and logged at INFO level.
    Raises:
        ValueError: unknown variant / cbsa_init, or a representative grid larger than the patch grid.
        UnsupportedModelError: not a supported ViT (names the model family and what is supported).
    """
    if variant not in VARIANTS:
        raise ValueError(f'Unknown CBSA conversion variant {variant!r}; supported: {sorted(VARIANTS)}.')
    if cbsa_init not in _CBSA_INITS:
        raise ValueError(f'Unknown cbsa_init {cbsa_init!r}; supported: {list(_CBSA_INITS)}.')
    targets = _check_model(model)
    cls, attn_layer = VARIANTS[variant]
    pooled = cls in _POOLED
    if pooled and rep_grid is not None and grid_layer_name(attn_layer, to_grid(rep_grid)):
        from timm.models.vision_transformer import ATTN_LAYERS   # the named grid ('cbsa_r4'): config.json keeps it
        attn_layer = grid_layer_name(attn_layer, to_grid(rep_grid))
        cls = ATTN_LAYERS[attn_layer]
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    rg = to_grid(rep_grid) if rep_grid is not None else to_grid(8)
    if pooled and (grid[0] < rg[0] or grid[1] < rg[1]):
        raise ValueError(
            f'{_model_name(model)}: patch grid {grid[0]}x{grid[1]} is smaller than the representative grid '
            f'{rg[0]}x{rg[1]} of variant {variant!r}; pass a smaller rep_grid= to convert().')

    if not inplace:
        model = copy.deepcopy(model)
        targets = _check_model(model)
    before = _count(model)
    num_tokens = int(model.num_prefix_tokens) + grid[0] * grid[1]
    # build everything first (nothing is assigned to the model until all new modules exist)
    new_modules = [(name, _build(attn, cls, variant, rep_grid, cbsa_init, num_tokens)) for name, attn in targets]
    for name, new in new_modules:
        model.get_submodule(name.rsplit('.', 1)[0]).attn = new
    if pooled:
        configure_cbsa(model, rep_grid=rep_grid)
    args = dict(getattr(model, '_model_args', {}) or {})
    args['attn_layer'] = attn_layer
    model._model_args = args

    if variant == 'cbsa':
        init = (f"Single projection U^T := W_{cbsa_init} of the pretrained qkv; step_rep (eta) := 1, "
                f"step_x (kappa) := N/(2m) = {num_tokens}/(2*{new_modules[0][1].num_representatives}).")
    elif variant == 'cbsa_star':
        init = 'Pretrained qkv and proj kept; step_rep (eta) := 1, step_x (kappa) := 1.'
    else:
        init = 'Pretrained qkv and proj kept; no new parameters.'
    report = ConversionReport(
        variant=variant, attn_layer=attn_layer, model=_model_name(model), replaced=[n for n, _ in new_modules],
        params_before=before, params_after=_count(model), init=init)
    model.cbsa_conversion = report
    _logger.info(str(report))
    return (model, report) if return_report else model


def create_with_attention(model_name: str, attn_layer: str, **kwargs) -> nn.Module:
    """``timm.create_model(model_name, attn_layer=attn_layer, **kwargs)`` with a clear error for families whose
    attention cannot be chosen by ``attn_layer`` (Eva-family: eva02_*, vit_*_rope_*; CNNs; ...)."""
    import timm
    from timm.models import is_model, model_entrypoint
    from timm.models.vision_transformer import ATTN_LAYERS
    if attn_layer not in ATTN_LAYERS:
        names = sorted(n for n in ATTN_LAYERS if base_layer_name(n) == n)
        raise ValueError(f'Unknown attn_layer {attn_layer!r}; registered: {names}, and NAME_r1 ... NAME_r16 for the '
                         'pooled ones (import timm_cbsa registers the CBSA family).')
    if not is_model(model_name.split('.')[0]):
        return timm.create_model(model_name, attn_layer=attn_layer, **kwargs)   # local-dir: / hf-hub: / timm's error
    module = model_entrypoint(model_name.split('.')[0]).__module__.rsplit('.', 1)[-1]
    try:
        return timm.create_model(model_name, attn_layer=attn_layer, **kwargs)
    except TypeError as e:
        if 'attn_layer' not in str(e):
            raise
        family = 'Eva-family (eva02_*, vit_*_rope_*)' if module == 'eva' else f'timm.models.{module}'
        raise UnsupportedModelError(
            f"{model_name} belongs to the {family} models, whose attention cannot be selected with attn_layer="
            f"{attn_layer!r}. Supported: {_SUPPORTED}; pretrained ViTs can also be converted after loading with "
            f"timm_cbsa.convert(model, variant=...).") from e


# --------------------------------------------------------------------------------------------------------------------
# checkpoints of converted models
# --------------------------------------------------------------------------------------------------------------------

def attention_kind_of_module(attn: nn.Module) -> str:
    """The ATTN_LAYERS name of an attention module ('attn' for timm's Attention, 'cbsa', 'agent_qkv', ...)."""
    from timm.models.vision_transformer import ATTN_LAYERS
    for name, cls in ATTN_LAYERS.items():
        if name and type(attn) is cls:
            return name
    return type(attn).__name__


def attention_kind(model: nn.Module) -> str:
    """The ATTN_LAYERS name shared by all ``blocks[i].attn`` of ``model`` ('mixed' if they differ)."""
    kinds = {attention_kind_of_module(b.attn) for b in getattr(model, 'blocks', []) if hasattr(b, 'attn')}
    if not kinds:
        return 'none'
    return kinds.pop() if len(kinds) == 1 else 'mixed'


_NORMS = ('norm', 'q_norm', 'k_norm', 'norm_out')


def _signature(keys_shapes: Dict[str, Tuple[int, ...]]) -> Tuple[frozenset, int]:
    """(set of non-norm, non-bias parameter names, qkv width factor) of one attention module's state (settings
    records left out: older checkpoints have none)."""
    names = frozenset(k for k in keys_shapes
                      if not k.endswith('.bias') and k.split('.')[0] not in _NORMS and k != SETTINGS_KEY)
    qkv, proj = keys_shapes.get('qkv.weight'), keys_shapes.get('proj.weight')
    factor = qkv[0] // proj[0] if qkv is not None and proj is not None and proj[0] else 0
    return names, factor


_SIGNATURES: Dict[str, Tuple[frozenset, int]] = {}


def _kind_signatures() -> Dict[str, Tuple[frozenset, int]]:
    from timm.models.vision_transformer import ATTN_LAYERS
    kinds = {'attn': ATTN_LAYERS['attn'], 'cbsa': CBSA, **FAMILY_ATTN_LAYERS}
    if set(_SIGNATURES) != set(kinds):
        for name, cls in kinds.items():
            mod = cls(8, num_heads=2, qkv_bias=True, device='meta')
            _SIGNATURES[name] = _signature({k: tuple(v.shape) for k, v in mod.state_dict().items()})
    return _SIGNATURES


def _checkpoint_kinds(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    prefix = 'blocks.0.attn.'
    sub = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        return []
    sig = _signature(sub)
    return sorted(k for k, s in _kind_signatures().items() if s == sig)


def save_converted(model: nn.Module, path) -> None:
    """``torch.save`` the state dict with the attention kind and the CBSA configuration (``cbsa_config``: rep_grid,
    legacy_pool) recorded, for ``load_converted``."""
    torch.save({'state_dict': model.state_dict(), 'attn_layer': attention_kind(model),
                'cbsa_config': cbsa_config(model)}, path)


def load_converted(model: nn.Module, checkpoint: Union[str, Dict[str, Any]], strict: bool = True):
    """Load a (converted) ViT checkpoint into ``model``, refusing checkpoints of another attention variant.

    ``checkpoint``: a path, a state dict, or a dict holding one (``save_converted`` also records ``attn_layer``).
    The checkpoint's variant is read from that record, otherwise inferred from the attention parameter names and
    shapes. Note: timm Attention, 'agent_qkv' and 'linear' have identical parameters (and so do 'agent' and 'mssa'),
    so a plain state dict cannot tell them apart — record the variant (``save_converted`` / ``save_for_hf``).
    Raises ``CheckpointMismatchError`` naming both variants, or listing missing / unexpected / mis-shaped keys; a file
    that cannot be read, or that asks for code when unpickled, raises ``CheckpointLoadError`` /
    ``UnsafeCheckpointError`` naming it.
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, '__fspath__'):
        checkpoint = read_checkpoint(checkpoint)      # weights_only; bad or unsafe files raise naming the file
    recorded = checkpoint.get('attn_layer') if isinstance(checkpoint, dict) else None
    state_dict = unwrap_state_dict(checkpoint)
    kind = attention_kind(model)
    def _variant(k):
        names = [v for v, (_, a) in VARIANTS.items() if a == k]
        return f"'{k}'" + (f" (convert variant '{names[0]}')" if names else '')
    if recorded is not None and base_layer_name(recorded) != base_layer_name(kind):   # grids: checked below
        raise CheckpointMismatchError(
            f'Checkpoint is for attention {_variant(recorded)} but the model uses {_variant(kind)}. '
            f'Convert the model with the same variant first (supported variants: {sorted(VARIANTS)}).')
    if recorded is None:
        kinds = _checkpoint_kinds(state_dict)
        if kinds and base_layer_name(kind) not in kinds:
            raise CheckpointMismatchError(
                f"Checkpoint attention weights look like {' / '.join(_variant(k) for k in kinds)} but the model uses "
                f'{_variant(kind)}. Convert the model with the same variant first (supported variants: '
                f'{sorted(VARIANTS)}).')
    if isinstance(checkpoint, dict):   # weights trained with another rep_grid / legacy_pool compute other outputs
        check_cbsa_config(model, checkpoint.get('cbsa_config'), strict=strict)
    if strict:
        check_keys(state_dict, model)
    return model.load_state_dict(state_dict, strict=strict)
