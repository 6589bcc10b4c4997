"""The process-wide default CBSA backend, like timm's ``set_fused_attn`` (read when a layer is built).

A layer's ``backend=`` argument wins; otherwise it is

* 'eager' when timm's fused attention is off (``TIMM_FUSED_ATTN=0``, ``timm.layers.set_fused_attn(False)``,
  ``set_exportable(True)``) or scriptable models are being built (``set_scriptable(True)``); otherwise
* ``set_backend(name)`` / the environment variable ``TIMM_CBSA_BACKEND`` (read at import), 'auto' when neither is set.

What each name runs, and how a request becomes an implementation, is ``timm_cbsa.ops.contract_broadcast``'s business
(``select``); per model use ``configure_cbsa(model, backend=...)`` or, temporarily, ``with use_backend(model, name):``.
"""
import contextlib
import os
from typing import Iterator, Optional

from torch import nn

from ..ops.contract_broadcast import REQUESTS, check_request

__all__ = ['BACKENDS', 'set_backend', 'get_backend', 'default_backend', 'resolve_backend', 'use_backend']

BACKENDS = REQUESTS   # the names a layer accepts: the implementations and 'auto'

_BACKEND = check_request(os.environ.get('TIMM_CBSA_BACKEND', 'auto'))


def set_backend(name: str) -> None:
    """Set the default backend of CBSA-family layers built from now on. Layers already built keep theirs: change a
    model with ``configure_cbsa(model, backend=)``."""
    global _BACKEND
    _BACKEND = check_request(name)


def get_backend() -> str:
    """The process-wide default set by ``set_backend`` / ``TIMM_CBSA_BACKEND``."""
    return _BACKEND


def default_backend() -> str:
    """The backend a CBSA-family layer built now gets when it is not given one (see the module docstring)."""
    from timm.layers import is_scriptable, use_fused_attn
    if not use_fused_attn() or is_scriptable():
        return 'eager'
    return _BACKEND


def resolve_backend(backend: Optional[str] = None) -> str:
    """Construction time: ``backend`` (checked) or ``default_backend()``."""
    return default_backend() if backend is None else check_request(backend)


@contextlib.contextmanager
def use_backend(model: nn.Module, name: Optional[str] = None) -> Iterator[nn.Module]:
    """Run ``model``'s CBSA-family layers on ``name`` inside the block, restoring their backends after:
    ``with use_backend(model, 'eager'): model(x)``. (It changes the model, so do not share it with other threads
    meanwhile.) For the default of layers built later, use ``set_backend``."""
    from .layout import find_grid_aware_layers
    if isinstance(model, str):
        raise TypeError('use_backend takes the model: use_backend(model, name). The default for layers built later '
                        'is set_backend(name); a layer keeps the backend it was built with.')
    check_request(name)
    layers = find_grid_aware_layers(model)
    previous = [m.backend for m in layers]
    for m in layers:
        m.backend = name
    try:
        yield model
    finally:
        for m, b in zip(layers, previous):
            m.backend = b
