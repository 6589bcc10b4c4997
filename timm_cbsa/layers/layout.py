"""The base of CBSA and the family's pooled layers (``GridAwareAttention``: pooling configuration, backend, the
representatives) and where such layers learn the patch grid — per call, never from state left behind by another call.

A CBSA layer pools the patch tokens on their real (H_p, W_p) grid. timm's ``Block`` hands attention only ``x``
(B, N, C), and with ``dynamic_img_size=True`` the grid changes from call to call (224×224 → 14×14, 160×320 → 10×20,
both possible at once from two threads). So:

* **Static facts are set once, at binding** (``bind_patch_grid(model)``, done by our factories and by
  ``configure_cbsa``): every grid-aware layer gets the model's default grid ``grid_size``, its ``num_prefix_tokens``
  and ``follow_patch_embed=True``; a stateless ``PatchGridHook`` is registered on ``model.patch_embed``.
* **The grid of a call belongs to that call**: the hook records the grid of the batch it just embedded in a
  thread-local slot (each thread — and each ``nn.DataParallel`` replica thread — has its own), and the model's layers
  read it a moment later, in the same forward. A layer uses it only when it matches the token count
  (N = prefix + H_p·W_p); otherwise (FX graphs, TorchScript, a standalone call) it falls back to its static grid, and
  ``check_token_layout`` raises if that does not fit either. Nothing is written into a module during forward, so
  ``copy.deepcopy``, pickling, replicas and ``torch.compile`` see the same modules as before the call.

Binding models built by timm itself: ``timm.create_model('vit_small_patch16_224', attn_layer='cbsa')`` builds the ViT
without calling us, so ``import timm_cbsa`` installs one torch module-registration hook (the smallest hook that sees
the model: it returns at once unless the assigned child is named ``blocks``, its owner has a ``patch_embed``, and the
blocks hold grid-aware layers). It is installed lazily, when the first grid-aware layer is constructed.
``bind_patch_grid(model)`` does the same explicitly and is idempotent. Binding refuses a representative grid larger
than the model's patch grid, so such a model fails when it is built, not at its first forward.

The representative grid and legacy pooling are fixed when a layer is built: by its arguments, by its registered
name (``attn_layer='cbsa_r4'``: ``named.py``), or, for the layers of a model built inside ``pooling_defaults(...)``
(our model entrypoints' ``rep_grid=`` / ``legacy_pool=``), by those defaults — so a model is built with the settings
its pretrained weights were saved with before they are loaded (``settings.py`` checks them).
"""
import contextlib
import contextvars
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..ops.contract_broadcast import check_request, strict
from ..ops.contract_broadcast.pooling import PoolSpec, pool_representatives, to_grid
from ..ops.tracing import fx_leaf, is_fx_tracing
from .base import ProjectedAttention
from .config import resolve_backend
from .named import REP_GRID_NAMES

__all__ = ['GridAwareAttention', 'PatchGridHook', 'bind_patch_grid', 'find_grid_aware_layers', 'current_patch_grid',
           'check_token_layout', 'check_rep_grid_fits', 'pooling_defaults', 'DEFAULT_REP_GRID']

_CALL = threading.local()   # .grid: (H_p, W_p) of the patch embedding that ran last in this thread
DEFAULT_REP_GRID = 8        # m = 64, the paper's
_DEFAULTS: contextvars.ContextVar = contextvars.ContextVar('cbsa_pooling_defaults', default={})


@contextlib.contextmanager
def pooling_defaults(rep_grid: Optional[Union[int, Tuple[int, int]]] = None,
                     legacy_pool: Optional[bool] = None) -> Iterator[None]:
    """Grid-aware layers built inside the block without an explicit ``rep_grid`` / ``legacy_pool`` take these (None:
    unchanged). Like timm's ``set_layer_config``: construction time only; our model entrypoints use it."""
    if legacy_pool is not None and not isinstance(legacy_pool, bool):
        raise ValueError(f'legacy_pool must be True or False, got {legacy_pool!r}.')
    defaults = dict(_DEFAULTS.get())
    if rep_grid is not None:
        defaults['rep_grid'] = to_grid(rep_grid)
    if legacy_pool is not None:
        defaults['legacy_pool'] = legacy_pool
    token = _DEFAULTS.set(defaults)
    try:
        yield
    finally:
        _DEFAULTS.reset(token)


def current_patch_grid() -> Optional[Tuple[int, int]]:
    """The patch grid of the batch the current thread embedded last (None before any)."""
    return getattr(_CALL, 'grid', None)


# input check: FX keeps it as a leaf call (it branches on sizes); torch.fx.wrap must be called in this module
@fx_leaf
def check_token_layout(
        num_tokens: int,
        grid_size: Tuple[int, int],
        rep_grid: Tuple[int, int],
        num_prefix_tokens: int,
        num_trailing_tokens: int,
        legacy: bool,
) -> None:
    """Raise a clear error when the tokens cannot be laid out as prefix + H_p*W_p patches + trailing tokens, or the
    patch grid is smaller than the representative grid (FX: kept as a leaf call)."""
    gh, gw = grid_size[0], grid_size[1]
    rh, rw = rep_grid[0], rep_grid[1]
    if gh < rh or gw < rw:
        raise ValueError(
            'CBSA: the patch grid ' + str(gh) + 'x' + str(gw) + ' is smaller than the representative grid '
            + str(rh) + 'x' + str(rw) + '; use a larger image or a smaller rep_grid.')
    if num_tokens < gh * gw + num_trailing_tokens:
        raise ValueError(
            'CBSA: got ' + str(num_tokens) + ' tokens but the patch grid ' + str(gh) + 'x' + str(gw)
            + ' needs ' + str(gh * gw) + ' patch tokens (+ ' + str(num_trailing_tokens) + ' trailing).')
    if num_prefix_tokens >= 0 and num_tokens != num_prefix_tokens + gh * gw + num_trailing_tokens:
        raise ValueError(
            'CBSA: got ' + str(num_tokens) + ' tokens, expected ' + str(num_prefix_tokens) + ' prefix + '
            + str(gh) + 'x' + str(gw) + ' patch tokens + ' + str(num_trailing_tokens) + ' trailing.')
    if legacy and (num_tokens != gh * gw + 1 or num_trailing_tokens != 0):
        raise ValueError(
            'CBSA: legacy_pool reproduces the released code, which needs exactly one prefix (class) token and no '
            'trailing tokens; got ' + str(num_tokens - gh * gw - num_trailing_tokens) + ' prefix and '
            + str(num_trailing_tokens) + ' trailing.')


torch.fx.wrap('check_token_layout')


class GridAwareAttention(ProjectedAttention):
    """The base of the layers with representatives pooled on the patch grid: CBSA and its family (CBSA*, agent).

    Token layout: N = prefix tokens + H_p*W_p patch tokens (raster order) + trailing tokens (e.g. the class
    embeddings a segmentation decoder appends; never pooled). Representatives are the queries (with one projection:
    the projected tokens) average-pooled on the patch grid (``representatives``).

    Args: timm's ``Attention`` arguments (``ProjectedAttention``), and, by keyword:
        rep_grid: representative grid (int or (r_h, r_w)); m = r_h * r_w. None: the class's ``named_rep_grid`` (the
            registered 'cbsa_r4'-style names), else ``pooling_defaults`` (our model entrypoints), else 8 → m = 64.
        legacy_pool: pool like the released code (class token pooled, last patch dropped); for its checkpoints.
            None: ``pooling_defaults``, else False.
        grid_size: static patch grid (H_p, W_p); normally set by the owning model, which also gives each call's grid.
        num_prefix_tokens: expected number of prefix tokens, or -1 to accept N - H_p*W_p - trailing.
        num_trailing_tokens: tokens after the patch tokens that are not pooled.
        backend: the requested implementation ('auto', 'eager', 'fused', 'sdpa', 'xformers', 'triton'); None: the
            default of ``config.py``.

    Attributes (configuration, set at construction, by ``configure_cbsa`` or at binding; never changed by forward):
        rep_grid, legacy_pool, grid_size, num_prefix_tokens, num_trailing_tokens: as above (``rep_grid`` a pair).
        follow_patch_embed: True once bound to a model: use the grid of the model's current patch-embedding call.
        backend: the requested implementation (assigning it re-selects ``impl``).
        impl: the implementation that runs, chosen by ``select_impl`` from static facts when ``backend`` is set and
            whenever the layer moves to another device (``.to()``, ``.cuda()``); ``impl_note``: why it differs from
            the request ('' when it does not).
    """
    __jit_unused_properties__ = ['backend']
    SETTINGS = ('num_heads', 'rep_grid', 'legacy_pool')   # recorded in the state dict (settings.py)
    attn_name = ''           # the ATTN_LAYERS name of the class (for messages and the 'NAME_rR' names)
    named_rep_grid = None    # the grid a registered 'NAME_rR' subclass fixes (named.py)
    rep_grid: Tuple[int, int]
    legacy_pool: bool
    grid_size: Optional[Tuple[int, int]]
    num_prefix_tokens: int
    num_trailing_tokens: int
    follow_patch_embed: bool

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            rep_grid: Optional[Union[int, Tuple[int, int]]] = None,
            legacy_pool: Optional[bool] = None,
            grid_size: Optional[Tuple[int, int]] = None,
            num_prefix_tokens: int = -1,
            num_trailing_tokens: int = 0,
            backend: Optional[str] = None,
            **kwargs,
    ):
        super().__init__(dim, num_heads, **kwargs)
        self.set_pooling(rep_grid, legacy_pool, grid_size, num_prefix_tokens, num_trailing_tokens)
        self.follow_patch_embed = False
        self.backend = resolve_backend(backend)     # selects self.impl
        _install_registration_hook()

    def set_pooling(self, rep_grid, legacy_pool, grid_size, num_prefix_tokens, num_trailing_tokens) -> None:
        """Set (checked) the pooling configuration; see the constructor's arguments (None: the construction
        default)."""
        defaults: Dict[str, Any] = _DEFAULTS.get()
        named = type(self).named_rep_grid
        for source, given in (('rep_grid', rep_grid), ('the model\'s rep_grid', defaults.get('rep_grid'))):
            if named is not None and given is not None and to_grid(given) != named:
                raise ValueError(
                    f"{type(self).__name__} (attn_layer='{self.attn_name}_r{named[0]}') has the representative grid "
                    f'{named[0]}x{named[1]}, but {source}={given!r} was given: use one or the other.')
        self.rep_grid = to_grid(next(g for g in (rep_grid, named, defaults.get('rep_grid'), DEFAULT_REP_GRID)
                                     if g is not None))
        self.legacy_pool = bool(legacy_pool if legacy_pool is not None else defaults.get('legacy_pool', False))
        self.grid_size = None if grid_size is None else to_grid(grid_size, 'grid_size')
        self.num_prefix_tokens = num_prefix_tokens
        if not isinstance(num_trailing_tokens, int) or num_trailing_tokens < 0:
            raise ValueError(f'num_trailing_tokens must be an int >= 0, got {num_trailing_tokens!r}.')
        self.num_trailing_tokens = num_trailing_tokens

    def extra_repr(self) -> str:
        note = f' ({self.impl_note})' if self.impl_note else ''
        return (f'num_heads={self.num_heads}, shared_qkv={self.shared_qkv}, rep_grid={self.rep_grid}, '
                f'legacy_pool={self.legacy_pool}, grid_size={self.grid_size}, backend={self.backend!r}, '
                f'impl={self.impl!r}{note}')

    def representatives(self, q: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B, H, N, d) queries (projected tokens) -> (B, H, m, d) pooled initial representatives Q_ini."""
        return pool_representatives(q, self.pool_spec(q.shape[2], grid_size))

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_request(name)
        self.select_impl()

    def select_impl(self) -> None:
        """Layers without the operator (the family's pooled layers) run torch SDPA unless 'eager' is asked for."""
        self.impl = 'eager' if self._backend == 'eager' else 'sdpa'
        self.impl_note = ''

    def runs_sdpa(self) -> bool:
        """The family's pooled layers: any backend but 'eager' runs torch SDPA (not while attention dropout
        trains, not under TorchScript)."""
        if torch.jit.is_scripting():
            return False
        return self.impl != 'eager' and not (self.training and self.attn_drop.p > 0)

    def check_strict(self) -> None:
        """With TIMM_CBSA_STRICT_BACKEND=1, running another implementation than the requested one is an error."""
        if self.impl_note and strict():
            raise RuntimeError(f'{type(self).__name__}: backend {self.backend!r} cannot run here '
                               f'(TIMM_CBSA_STRICT_BACKEND is set): {self.impl_note}')

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if '_backend' in self.__dict__:   # moved (device / dtype): choose again for where the weights now are
            self.select_impl()
        return module

    def pool_spec(self, num_tokens: int, grid_size: Optional[Tuple[int, int]] = None) -> PoolSpec:
        """The checked pooling of a call with ``num_tokens`` tokens (see ``patch_grid`` for ``grid_size``)."""
        grid = self.patch_grid(num_tokens, grid_size)
        check_token_layout(num_tokens, grid, self.rep_grid, self.num_prefix_tokens, self.num_trailing_tokens,
                           self.legacy_pool)
        return PoolSpec(grid, self.rep_grid, 1 if self.legacy_pool else self.num_trailing_tokens)

    def patch_grid(self, num_tokens: int, grid_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """The (H_p, W_p) grid for a call with ``num_tokens`` tokens: ``grid_size`` if given, else the grid of the
        owning model's current patch-embedding call when it fits N, else the static ``self.grid_size``."""
        if grid_size is not None:
            return grid_size
        if not torch.jit.is_scripting():
            if self.follow_patch_embed and not is_fx_tracing():
                grid = _call_grid(num_tokens - self.num_trailing_tokens, self.num_prefix_tokens)
                if grid is not None:
                    return grid
        static = self.grid_size
        if static is None:
            raise ValueError(
                'This CBSA-family layer does not know the patch grid: use it inside a timm ViT (the model binds it), '
                'call timm_cbsa.bind_patch_grid(model), or pass grid_size=(H_p, W_p) to forward().')
        return static


def _call_grid(num_tokens: int, num_prefix_tokens: int) -> Optional[Tuple[int, int]]:
    grid = current_patch_grid()
    if grid is None:
        return None
    patches = grid[0] * grid[1]
    fits = num_tokens == num_prefix_tokens + patches if num_prefix_tokens >= 0 else num_tokens >= patches
    return grid if fits else None


def find_grid_aware_layers(module: nn.Module) -> List[GridAwareAttention]:
    return [m for m in module.modules() if isinstance(m, GridAwareAttention)]


def _grid_from_patch_embed(module: nn.Module, args, output) -> Tuple[int, int]:
    if output.ndim == 4:
        fmt = str(getattr(module, 'output_fmt', 'NCHW'))
        if fmt.endswith('NHWC'):
            return output.shape[1], output.shape[2]
        return output.shape[2], output.shape[3]
    img = args[0]
    if hasattr(module, 'dynamic_feat_size'):
        gh, gw = module.dynamic_feat_size((img.shape[-2], img.shape[-1]))
        return gh, gw
    gh, gw = module.grid_size
    return int(gh), int(gw)


class PatchGridHook:
    """Forward hook on a patch embedding: records the grid of the batch it just embedded for the current thread.
    Holds no state (no layer references), so deep copies, pickles and replicas of the model stay correct."""

    def __call__(self, module: nn.Module, args, output):
        if not is_fx_tracing():   # traced graphs use the layers' static grid
            _CALL.grid = _grid_from_patch_embed(module, args, output)
        return None


def _is_scriptable() -> bool:
    try:
        from timm.layers import is_scriptable
        return is_scriptable()
    except ImportError:  # pragma: no cover
        return False


def check_rep_grid_fits(patch_embed: nn.Module, layer: GridAwareAttention,
                        rep_grid: Optional[Tuple[int, int]] = None) -> None:
    """Raise a ValueError when ``rep_grid`` (default: the layer's) is larger than the patch grid of ``patch_embed``,
    naming both grids, the image and patch sizes, and the representative grids that fit."""
    gh, gw = (int(g) for g in patch_embed.grid_size)
    rh, rw = rep_grid if rep_grid is not None else layer.rep_grid
    if gh >= rh and gw >= rw:
        return
    r = min(gh, gw, REP_GRID_NAMES[-1])
    names = f"attn_layer='{layer.attn_name}_r{r}' for timm's ViTs, " if layer.attn_name else ''
    raise ValueError(
        f'The patch grid {gh}x{gw} (img_size {tuple(patch_embed.img_size)}, patch_size '
        f'{tuple(patch_embed.patch_size)}) is smaller than the representative grid {rh}x{rw} of '
        f'{type(layer).__name__}: use a representative grid of at most {gh}x{gw} ({names}rep_grid={r} for '
        f"timm_cbsa's models and configure_cbsa), a larger img_size or a smaller patch_size.")


def bind_patch_grid(model: nn.Module, layers: Optional[List[nn.Module]] = None,
                    set_prefix: bool = True) -> List[nn.Module]:
    """Connect ``model.patch_embed`` to the grid-aware layers of ``model`` (or ``layers``): sets their static grid,
    prefix count (``model.num_prefix_tokens``, unless ``set_prefix=False``) and ``follow_patch_embed``, and registers
    a ``PatchGridHook`` (not when building scriptable models). Idempotent. Returns the layers bound. Raises a
    ValueError (``check_rep_grid_fits``) before changing anything when a layer's representative grid does not fit."""
    patch_embed = getattr(model, 'patch_embed', None)
    if patch_embed is None or getattr(patch_embed, 'grid_size', None) is None:
        raise ValueError(
            f'{type(model).__name__} has no patch_embed with a grid_size; CBSA layers need the patch grid. '
            'Pass grid_size= to the layer yourself.')
    layers = find_grid_aware_layers(model) if layers is None else list(layers)
    for layer in layers:
        check_rep_grid_fits(patch_embed, layer)
    grid = tuple(int(g) for g in patch_embed.grid_size)
    prefix = getattr(model, 'num_prefix_tokens', None) if set_prefix else None
    hooked = any(isinstance(h, PatchGridHook) for h in patch_embed._forward_hooks.values())
    if not hooked and not _is_scriptable():   # TorchScript would have to compile the hook: static grid only
        patch_embed.register_forward_hook(PatchGridHook())
        hooked = True
    for layer in layers:
        layer.grid_size = grid
        if prefix is not None:
            layer.num_prefix_tokens = int(prefix)
        layer.follow_patch_embed = hooked   # without the hook another model's grid could be read
    return layers


def _bind_when_blocks_registered(module: nn.Module, name: str, submodule: Optional[nn.Module]):
    """torch module-registration hook: bind a ViT's grid-aware layers as soon as it receives its ``blocks``."""
    if name != 'blocks' or submodule is None:
        return None
    patch_embed = module._modules.get('patch_embed', None)
    if patch_embed is None or getattr(patch_embed, 'grid_size', None) is None:
        return None
    layers = find_grid_aware_layers(submodule)
    if layers:   # the model is half-built (distilled DeiTs add a prefix token later): leave the prefix count open
        bind_patch_grid(module, layers, set_prefix=False)
    return None


_REGISTRATION_HANDLE = None


def _install_registration_hook() -> None:
    global _REGISTRATION_HANDLE
    if _REGISTRATION_HANDLE is None:
        _REGISTRATION_HANDLE = torch.nn.modules.module.register_module_module_registration_hook(
            _bind_when_blocks_registered)
