"""The one place that decides how CBSA's extraction / contraction / broadcast run: eager, torch SDPA or xformers.

Selection, highest priority first: the layer's ``backend=`` argument, ``use_backend(...)`` / ``set_backend(...)``,
the environment variable ``TIMM_CBSA_BACKEND`` (read at import), then 'eager'.
"""
import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = ['BACKENDS', 'set_backend', 'get_backend', 'use_backend', 'resolve_backend', 'fused_contract_and_broadcast']

BACKENDS = ('eager', 'sdpa', 'xformers')


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f'Unknown CBSA backend {name!r}; choose one of {BACKENDS}.')
    return name


_BACKEND = _check(os.environ.get('TIMM_CBSA_BACKEND', 'eager'))


def set_backend(name: str) -> None:
    """Set the process-wide default CBSA backend."""
    global _BACKEND
    _BACKEND = _check(name)


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily switch the default CBSA backend: ``with use_backend('sdpa'): model(x)``."""
    global _BACKEND
    prev, _BACKEND = _BACKEND, _check(name)
    try:
        yield
    finally:
        _BACKEND = prev


def resolve_backend(module_backend: Optional[str], w: torch.Tensor, needs_eager: bool = False) -> str:
    """Backend for one call. ``needs_eager``: attention dropout while training (only the eager path has it)."""
    if needs_eager:
        return 'eager'
    return _check(module_backend) if module_backend is not None else _BACKEND


def _sdpa(w, r, step_rep, step_x, scale):
    # extraction needs A for the broadcast, so it stays explicit; the contraction is ordinary attention
    attn = ((r * scale) @ w.transpose(-2, -1)).float().softmax(-1).to(w.dtype)    # (B, H, m, N)
    r = r + step_rep * (attn @ w)
    c = F.scaled_dot_product_attention(r, r, r, scale=scale)
    return step_x * (attn.transpose(-2, -1) @ c)


def fused_contract_and_broadcast(backend: str, w, r, step_rep, step_x, scale: float) -> torch.Tensor:
    """w: (B, H, N, d) tokens, r: (B, H, m, d) Q_ini -> (B, H, N, d), same result as ``CBSA.contract_and_broadcast``."""
    if backend == 'sdpa':
        return _sdpa(w, r, step_rep, step_x, scale)
    if backend == 'xformers':
        return _sdpa(w, r, step_rep, step_x, scale)
    raise ValueError(f'Unknown CBSA backend {backend!r}; choose one of {BACKENDS}.')
