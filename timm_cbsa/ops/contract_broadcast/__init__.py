"""CBSA's contract-and-broadcast operator: one entry point, several implementations, the choice made once.

    out = contract_and_broadcast(w, step_rep, step_x, scale, pool=spec, impl='fused')      # (B, H, N, d)

Per head, with W (N×d) the projected tokens and Q_ini (m×d) the initial representatives (pooled from W as ``pool``
says, or given as ``r``), s the softmax scale, η = ``step_rep`` and κ = ``step_x`` (H, 1, 1):

    A = softmax_N(s·Q_ini Wᵀ)       extraction            Q = Q_ini + η·A W      representative update
    C = softmax_m(s·Q Qᵀ) Q         contraction           out = κ·Aᵀ C           broadcast

Implementations (``IMPLS``; flash-linear-attention's layout):

=============  ==================  =====================================================================================
impl           file                what runs
=============  ==================  =====================================================================================
'eager'        naive.py            the reference, plain autograd (keeps the m×N matrix A for backward)
'fused'        fused.py            one memory-saving autograd function: explicit softmax, cache-blocked on CPU; keeps
                                   W, Q_ini, the log-sum-exp and m×d / m×m tensors, rebuilds A in backward
'sdpa'         fused.py + lse.py   the same, the extraction by torch's SDPA kernels (flash / memory-efficient)
'xformers'     fused.py + lse.py   the same, the extraction by xformers' memory-efficient attention (CUDA)
'triton'       triton/             Triton kernels (CUDA): A lives only on chip, in forward and backward
=============  ==================  =====================================================================================

Choosing (xformers' pattern): ``not_supported_reasons(impl, head_dim, num_reps, dtype, device)`` lists why an
implementation cannot run, from static facts only (device and its capability, dtype, m, d, resource limits, what is
installed). ``select(request, ...)`` turns a request — an implementation, or ``'auto'`` ('triton' on CUDA where it
runs, else 'fused') — into the implementation to use and the reasons the request was not honoured. Layers call
``select`` when they are built and whenever they move to another device, keep the answer as a constant (shown in
their repr) and pass it to every call. Nothing is probed numerically inside a forward: ``python -m timm_cbsa.info
--check`` runs the parity checks on demand.

At run time ``contract_and_broadcast`` only reacts to what a static choice cannot know:
* the dtype of this call (e.g. float64 tokens reaching a CUDA kernel without a float64 variant): 'fused' runs;
* a failure of the implementation at run time, in forward or in backward: it falls back to 'fused' once per cause,
  with a logged reason, and remembers the failure (``TIMM_CBSA_STRICT_BACKEND=1`` raises instead);
* tracing: under ``torch.compile`` the Triton path runs as 'fused' (its autograd function is traced whole); layers
  take the 'eager' path under TorchScript and while exporting.
Under autocast the tokens are cast to the autocast dtype and the implementation runs with autocast off (products in
that dtype, float32 softmax statistics), so neither forward nor backward depends on an enclosing autocast region.
"""
import logging
import os
from typing import List, Optional, Tuple

import torch

from ..tracing import fx_leaf
from . import lse
from .fused import ContractBroadcast, no_autocast
from .naive import naive_contract_and_broadcast
from .pooling import PoolSpec, pool_representatives

__all__ = ['IMPLS', 'REQUESTS', 'PoolSpec', 'check_request', 'contract_and_broadcast', 'not_supported_reasons',
           'select', 'strict', 'warn_once', 'pool_representatives', 'naive_contract_and_broadcast']

_logger = logging.getLogger(__name__)

IMPLS = ('eager', 'fused', 'sdpa', 'xformers', 'triton')
REQUESTS = IMPLS + ('auto',)
# where an implementation that cannot run falls back to ('fused' runs everywhere)
_FALLBACK = {'xformers': 'sdpa', 'sdpa': 'fused', 'triton': 'fused'}


def strict() -> bool:
    """TIMM_CBSA_STRICT_BACKEND=1: a fallback from the requested implementation is an error."""
    return os.environ.get('TIMM_CBSA_STRICT_BACKEND', '0') not in ('', '0')


def check_request(name: str) -> str:
    """``name`` if it is an implementation or 'auto', else a ValueError listing the choices."""
    if not isinstance(name, str) or name not in REQUESTS:
        raise ValueError(f'Unknown CBSA backend {name!r}; choose one of {REQUESTS}.')
    return name


def _triton_reasons(head_dim: int, num_reps: int, dtype: Optional[torch.dtype], device: torch.device) -> List[str]:
    if device.type != 'cuda' and not (device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1'):
        return [f'the Triton kernels need a CUDA device (got {device.type}; CPU only under TRITON_INTERPRET=1)']
    from . import triton as tk   # imports Triton lazily, only where it could run
    return list(tk.not_supported_reasons(head_dim, num_reps, dtype, device))


def not_supported_reasons(impl: str, head_dim: int, num_reps: int, dtype: Optional[torch.dtype] = None,
                          device='cpu') -> List[str]:
    """Why ``impl`` cannot run for heads of width ``head_dim`` with ``num_reps`` representatives on ``device``
    (``dtype=None``: for any of float32 / float16 / bfloat16); [] when it can. Static checks only."""
    device = torch.device(device)
    if impl in ('eager', 'fused'):
        return []
    if impl in ('sdpa', 'xformers'):
        return lse.not_supported_reasons(impl, head_dim, dtype, device)
    if impl == 'triton':
        return _triton_reasons(head_dim, num_reps, dtype, device)
    raise ValueError(f'Unknown CBSA implementation {impl!r}; choose one of {IMPLS}.')


def select(request: str, head_dim: int, num_reps: int, device='cpu',
           dtype: Optional[torch.dtype] = None) -> Tuple[str, List[str]]:
    """(implementation to use, reasons the request was not honoured). 'auto' → 'triton' on CUDA where it runs, else
    'fused' (no reasons: 'auto' promises nothing); an implementation that cannot run → the next one down its fallback
    chain ('xformers' → 'sdpa' → 'fused', 'triton' → 'fused'), with the reasons."""
    device = torch.device(device)
    if check_request(request) == 'auto':
        if device.type == 'cuda' and not not_supported_reasons('triton', head_dim, num_reps, dtype, device):
            return 'triton', []
        return 'fused', []
    impl, why = request, []
    while True:
        reasons = not_supported_reasons(impl, head_dim, num_reps, dtype, device)
        if not reasons:
            return impl, why
        why.append(f'{impl}: ' + '; '.join(reasons))
        impl = _FALLBACK[impl]


# failures seen at run time: (impl, device type, dtype, head width) -> reason; such calls go straight to 'fused'
_FAILED = {}
_WARNED = set()


def warn_once(key, msg: str, *args) -> None:
    """Log a warning once per ``key`` (not from inside a compiled region)."""
    if key not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(key)
        _logger.warning(msg, *args)


def _run(impl: str, w, r, step_rep, step_x, scale: float, pool: Optional[PoolSpec]) -> torch.Tensor:
    if impl == 'triton':
        from .triton import contract_and_broadcast_triton
        return contract_and_broadcast_triton(w, step_rep, step_x, scale, pool=pool, r=r)
    lse_impl = 'fused' if impl == 'fused' else lse.choose(impl, w.shape[-1], w.dtype, w.device)
    return ContractBroadcast.apply(w, r, step_rep, step_x, scale, lse_impl, pool)


def _call_impl(impl: str, w: torch.Tensor) -> str:
    """The implementation this call runs: ``impl``, or 'fused' where this call's dtype / device rules it out, where it
    failed before, or inside torch.compile (for 'triton')."""
    if impl == 'fused':
        return impl
    if torch.compiler.is_compiling():
        return 'fused' if impl == 'triton' else impl
    if (impl, w.device.type, w.dtype, w.shape[-1]) in _FAILED:
        return 'fused'
    reasons = (lse.not_supported_reasons(impl, w.shape[-1], w.dtype, w.device) if impl in ('sdpa', 'xformers')
               else ['no float64 Triton kernel on CUDA'] if w.dtype == torch.float64 and w.device.type == 'cuda'
               else [])
    if reasons:
        if strict():
            raise RuntimeError(f'CBSA implementation {impl!r} cannot run for {w.device.type}/{w.dtype} '
                               f'(TIMM_CBSA_STRICT_BACKEND is set): {"; ".join(reasons)}')
        warn_once((impl, w.device.type, w.dtype), "CBSA: implementation %r cannot run for %s/%s, using 'fused': %s",
                  impl, w.device.type, w.dtype, '; '.join(reasons))
        return 'fused'
    return impl


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _dispatch(impl: str, w: torch.Tensor, r: Optional[torch.Tensor], step_rep: torch.Tensor, step_x: torch.Tensor,
              scale: float, pool: Optional[PoolSpec]) -> torch.Tensor:
    """FX leaf: the call's implementation, autocast off inside, a run-time failure → 'fused' (logged once)."""
    if step_rep.dim() != 3 or step_x.dim() != 3:
        raise ValueError('contract_and_broadcast: step_rep / step_x must have shape (H, 1, 1).')
    cast = _autocast_dtype(w.device.type)
    if cast is not None and w.dtype != cast and w.is_floating_point():
        w = w.to(cast)
    if r is not None:
        r = r.to(w.dtype)
    run = _call_impl(impl, w)
    with no_autocast(w.device.type):
        if run == 'fused' or torch.compiler.is_compiling():
            return _run(run, w, r, step_rep, step_x, scale, pool)
        try:
            return _run(run, w, r, step_rep, step_x, scale, pool)
        except Exception as e:  # noqa: BLE001  (a kernel failing at run time falls back, logged once)
            if strict():
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
            reason = f'failed at run time: {type(e).__name__}: {first}'
            _FAILED[(run, w.device.type, w.dtype, w.shape[-1])] = reason
            warn_once((run, reason), "CBSA: implementation %r %s; using 'fused' from now on for %s/%s.",
                      run, reason, w.device.type, w.dtype)
            return _run('fused', w, r, step_rep, step_x, scale, pool)


fx_leaf(_dispatch)   # FX keeps the call as one leaf (it branches on device, dtype and failures)
torch.fx.wrap('_dispatch')


def contract_and_broadcast(w: torch.Tensor, step_rep: torch.Tensor, step_x: torch.Tensor, scale: float,
                           pool: Optional[PoolSpec] = None, r: Optional[torch.Tensor] = None,
                           impl: str = 'fused') -> torch.Tensor:
    """κ·Aᵀ C per head (see the module docstring).

    Args:
        w: (B, H, N, d) projected tokens (any strides; the usual head-split view of a (B, N, H·d) projection works
            best: the result then has its layout, so merging heads is free).
        step_rep, step_x: η and κ, (H, 1, 1).
        scale: softmax scale s.
        pool: a ``PoolSpec``: Q_ini is pooled from w inside the implementation (pass either ``pool`` or ``r``).
        r: (B, H, m, d) Q_ini given explicitly.
        impl: one of ``IMPLS`` (normally the layer's choice from ``select``).
    Returns:
        (B, H, N, d) in w's dtype and memory layout.
    """
    if (r is None) == (pool is None):
        raise ValueError('contract_and_broadcast: pass either r (Q_ini) or pool (a PoolSpec).')
    if impl == 'eager':
        return naive_contract_and_broadcast(w, step_rep, step_x, scale, pool=pool, r=r)
    if impl not in IMPLS:
        raise ValueError(f'Unknown CBSA implementation {impl!r}; choose one of {IMPLS}.')
    return _dispatch(impl, w, r, step_rep, step_x, scale, pool)
