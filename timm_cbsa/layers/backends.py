"""The one place that decides how CBSA's extraction / contraction / broadcast run.

Backends (``BACKENDS``: name -> ``Backend(supported, apply)``):

* ``'eager'``    the reference math in ``CBSA.contract_and_broadcast`` (plain autograd, keeps the m×N matrix A).
* ``'fused'``    one custom autograd function (``fused.py``): explicit extraction, cache-blocked on CPU, memory-saving:
                 it keeps only W, Q_ini, the per-representative log-sum-exp and m×d / m×m tensors for backward and
                 rebuilds A = exp(s·Q_ini Wᵀ − lse) blockwise.
* ``'sdpa'``     the extraction softmax(s·Q_ini Wᵀ) W is an ordinary attention with m queries and N keys: torch SDPA
                 (``_scaled_dot_product_flash_attention_for_cpu`` on CPU, flash / memory-efficient on CUDA)
                 returns it together with its log-sum-exp. Same memory-saving autograd function as 'fused'.
* ``'xformers'`` as 'sdpa', with ``xformers.ops.fmha`` for the extraction.
* ``'triton'``   the Triton kernels in ``timm_cbsa/kernels/cbsa`` (CUDA): A = softmax_N(s·Q_ini Wᵀ) lives only in
                 on-chip memory, token block by token block, in forward and backward. Probed once per (device, dtype,
                 head dim, m) with a parity run against the float64 reference (``triton_probe``).
* ``'auto'``     the default: 'triton' on CUDA where its probe passes, else 'fused' (silently: no fallback is logged).

A kernel is probed once per (kind, device type, dtype, exact head dim) and cached; when it cannot run, or fails at run
time, the call falls back ('xformers' → 'sdpa' → the explicit math of 'fused') and logs the reason once per cause —
never an exception. ``TIMM_CBSA_STRICT_BACKEND=1`` turns a fallback into an error (the GPU parity checks use it).
Adding a backend is one ``register_backend(name, apply, supported)`` call.

The backend is **configuration, decided when a layer is built** (like timm's ``fused_attn``), shown in its repr:

* the layer's ``backend=`` argument wins; otherwise
* 'eager' when timm's fused attention is off (``TIMM_FUSED_ATTN=0``, ``timm.layers.set_fused_attn(False)``,
  ``set_exportable(True)``) or scriptable models are built (``set_scriptable(True)``); otherwise
* the process default: ``set_backend(name)`` / the environment variable ``TIMM_CBSA_BACKEND`` (read at import),
  'auto' when neither is set ('triton' on CUDA where it passes its probe; elsewhere 'fused', which matches 'eager' to
  ~1e-7 in float32 and is the fastest on CPU).

Per model: ``configure_cbsa(model, backend=...)``, or temporarily ``with use_backend(model, 'eager'): ...``. Attention
dropout while training always runs 'eager' (only the reference path has it); TorchScript always runs 'eager'.

Precision: under autocast the fused backends run their products in the autocast dtype (also when W arrives in float32,
e.g. after qk_norm's LayerNorm) with float32 softmax statistics; autocast is off inside the function, so neither its
forward nor its backward depends on an enclosing autocast region.

Tracing: ``torch.fx`` keeps the fused call as one leaf (``_cb_apply``). Under ``torch.compile`` the custom autograd
function is traced whole; the per-block Python loop is replaced by one batched block, and no probe runs inside the
compiled region (the cached answer is used, or the explicit math when none exists).
"""
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ._fx import register_notrace_function
from ..ops.contract_broadcast.fused import LSE_IMPLS, ContractBroadcast, block_budget_bytes, no_autocast
from ..ops.contract_broadcast.pooling import num_representatives

__all__ = [
    'BACKENDS', 'Backend', 'register_backend', 'set_backend', 'get_backend', 'default_backend', 'resolve_backend',
    'use_backend', 'fused_contract_and_broadcast', 'xformers_status', 'block_budget_bytes',
]

_logger = logging.getLogger(__name__)
_STRICT = os.environ.get('TIMM_CBSA_STRICT_BACKEND', '0') not in ('', '0')


@dataclass(frozen=True)
class Backend:
    """``apply(w, r, step_rep, step_x, scale, pool) -> out`` (None for 'eager': the layer's own math);
    ``supported(w, m) -> reason or None``: why the kernel cannot run for these tokens and m representatives (checked
    per call, cached)."""
    apply: Optional[Callable[..., torch.Tensor]] = None
    supported: Optional[Callable[[torch.Tensor, int], Optional[str]]] = None


BACKENDS: Dict[str, Backend] = {}


def register_backend(name: str, apply: Optional[Callable[..., torch.Tensor]],
                     supported: Optional[Callable[[torch.Tensor, int], Optional[str]]] = None) -> None:
    """Add a backend name for ``backend=`` / ``set_backend``; see ``Backend``."""
    BACKENDS[name] = Backend(apply, supported)


def _check(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f'Unknown CBSA backend {name!r}; choose one of {tuple(BACKENDS)}.')
    return name


_BACKEND = os.environ.get('TIMM_CBSA_BACKEND', 'auto')   # checked once the backends are registered (below)


def set_backend(name: str) -> None:
    """Set the process-wide default backend of CBSA-family layers built from now on (like timm's
    ``set_fused_attn``). Layers already built keep theirs: change a model with ``configure_cbsa(model, backend=)``."""
    global _BACKEND
    _BACKEND = _check(name)


def get_backend() -> str:
    """The process-wide default set by ``set_backend`` / ``TIMM_CBSA_BACKEND``."""
    return _BACKEND


def default_backend() -> str:
    """The backend a CBSA-family layer built now gets when it is not given one: 'eager' when timm's fused attention
    is off or scriptable / exportable models are being built, else ``get_backend()``."""
    from timm.layers import is_scriptable, use_fused_attn
    if not use_fused_attn() or is_scriptable():
        return 'eager'
    return _BACKEND


def resolve_backend(backend: Optional[str] = None) -> str:
    """Construction time: ``backend`` (checked) or ``default_backend()``."""
    return default_backend() if backend is None else _check(backend)


@contextlib.contextmanager
def use_backend(model: nn.Module, name: Optional[str] = None) -> Iterator[nn.Module]:
    """Run ``model``'s CBSA-family layers on ``name`` inside the block, restoring their backends after:
    ``with use_backend(model, 'eager'): model(x)``. (It changes the model, so do not share it with other threads
    meanwhile.) For the default of layers built later, use ``set_backend``."""
    if isinstance(model, str):
        raise TypeError('use_backend takes the model: use_backend(model, name). The default for layers built later '
                        'is set_backend(name); a layer keeps the backend it was built with.')
    _check(name)
    layers = [m for m in model.modules() if hasattr(m, 'backend') and hasattr(m, 'rep_grid')]
    previous = [m.backend for m in layers]
    for m in layers:
        m.backend = name
    try:
        yield model
    finally:
        for m, b in zip(layers, previous):
            m.backend = b


# ---------------------------------------------------------------------------------------------------------------
# attention with log-sum-exp (extraction): out = softmax(s q kᵀ) v, lse = logsumexp(s q kᵀ) (float32, (..., m))
# ---------------------------------------------------------------------------------------------------------------

def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _explicit_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    s = _f32(torch.matmul(q * scale, k.transpose(-2, -1)))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), v)
    return out, lse


def _sdpa_lse_cpu(q, k, v, scale: float):
    if q.dim() == 3:   # one CPU block: (H, L, d)
        out, lse = _sdpa_lse_cpu(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale)
        return out.squeeze(0), lse.squeeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, _f32(lse)


def _sdpa_lse_cuda_flash(q, k, v, scale: float):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], _f32(res[1][..., :q.shape[-2]])


def _sdpa_lse_cuda_efficient(q, k, v, scale: float):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], _f32(res[1][..., :q.shape[-2]])


def _xformers_lse(q, k, v, scale: float):
    from xformers.ops import fmha
    # xformers layout is [B, M, H, K]; ours is [B, H, M, K]
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), _f32(lse[..., :q.shape[-2]])


# probe cache: (kind, device type, dtype, exact head dim) -> chosen implementation name, or None when it cannot run
_PROBES: Dict[Tuple[str, str, torch.dtype, int], Optional[str]] = {}
_REASONS: Dict[Tuple[str, str, torch.dtype, int], str] = {}
LSE_IMPLS.update({    # the registry lives in fused.py, which calls the chosen one
    'explicit': _explicit_lse, 'cpu_flash': _sdpa_lse_cpu, 'cuda_flash': _sdpa_lse_cuda_flash,
    'cuda_efficient': _sdpa_lse_cuda_efficient, 'xformers': _xformers_lse,
})


def _try_impl(name: str, device: torch.device, dtype: torch.dtype, d: int) -> Optional[str]:
    """Run ``name`` once on a small problem and compare with the explicit math; return a reason string or None."""
    try:
        g = torch.Generator(device='cpu').manual_seed(0)
        q = torch.randn(2, 2, 8, d, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(2, 2, 40, d, generator=g).to(device=device, dtype=dtype)
        out, lse = LSE_IMPLS[name](q, k, k, d ** -0.5)
        ref_out, ref_lse = _explicit_lse(q.double(), k.double(), k.double(), d ** -0.5)
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        if tuple(lse.shape) != tuple(ref_lse.shape) or not torch.allclose(lse.double(), ref_lse, atol=tol, rtol=tol):
            return 'log-sum-exp mismatch'
        if not torch.allclose(out.double(), ref_out, atol=tol * 4, rtol=tol * 4):
            return 'output mismatch'
        return None
    except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
        return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]


def _candidates(kind: str, device: torch.device, dtype: torch.dtype) -> Tuple[List[str], str]:
    """(LSE implementations to try in order, reason when there are none)."""
    if kind == 'xformers':
        if device.type != 'cuda':
            return [], f'xformers memory_efficient_attention needs a CUDA device (got {device.type})'
        try:
            import xformers.ops  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return [], f'xformers is not importable ({type(e).__name__}: {e})'
        return ['xformers'], ''
    if device.type == 'cpu':
        return ['cpu_flash'], ''
    if device.type == 'cuda':
        half = dtype in (torch.float16, torch.bfloat16)
        return (['cuda_flash', 'cuda_efficient'] if half else ['cuda_efficient']), ''
    return [], f'no SDPA kernel returning the log-sum-exp on {device.type}'


def _probe(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> Optional[str]:
    """LSE implementation for ``kind`` ('sdpa' or 'xformers') on this device / dtype / exact head dim, or None (see
    ``_REASONS``). Cached; never probed inside a compiled region (then None unless cached)."""
    key = (kind, device.type, dtype, int(d))
    if key in _PROBES:
        return _PROBES[key]
    if torch.compiler.is_compiling() or device.type == 'meta':
        return None
    choice, reasons = None, []
    candidates, why_none = _candidates(kind, device, dtype)
    for c in candidates:
        reason = _try_impl(c, device, dtype, d)
        if reason is None:
            choice = c
            break
        reasons.append(f'{c}: {reason}')
    _PROBES[key] = choice
    if choice is None:
        _REASONS[key] = '; '.join(reasons) or why_none
    return choice


def xformers_status(device: torch.device, dtype: torch.dtype = torch.float16, d: int = 64) -> Optional[str]:
    """'xformers' if the xformers path runs for this device / dtype / head dim, else None (see the log)."""
    return _probe('xformers', torch.device(device), dtype, d)


def _kernel_check(kind: str):
    def supported(w: torch.Tensor, m: int) -> Optional[str]:
        if _probe(kind, w.device, w.dtype, w.shape[-1]) is not None:
            return None
        key = (kind, w.device.type, w.dtype, int(w.shape[-1]))
        return _REASONS.get(key, 'not probed inside a compiled region')
    return supported


def _kernel_apply(kind: str):
    def apply(w, r, step_rep, step_x, scale: float, pool):
        impl = 'fused' if kind == 'fused' else _probe(kind, w.device, w.dtype, w.shape[-1])
        return ContractBroadcast.apply(w, r, step_rep, step_x, scale, impl, pool)
    return apply


register_backend('eager', None)
register_backend('fused', _kernel_apply('fused'))
register_backend('sdpa', _kernel_apply('sdpa'), _kernel_check('sdpa'))
register_backend('xformers', _kernel_apply('xformers'), _kernel_check('xformers'))


def _triton_supported(w: torch.Tensor, m: int) -> Optional[str]:
    if torch.compiler.is_compiling():
        return 'not probed inside a compiled region (the fused backend runs there)'
    from ..ops.contract_broadcast.triton import not_supported_reasons
    return '; '.join(not_supported_reasons(w.shape[-1], m, w.dtype, w.device)) or None


def _triton_apply(w, r, step_rep, step_x, scale: float, pool):
    from ..ops.contract_broadcast.triton import contract_and_broadcast_triton
    return contract_and_broadcast_triton(w, step_rep, step_x, scale, pool=pool, r=r)


register_backend('triton', _triton_apply, _triton_supported)
register_backend('auto', None)     # resolved per call in _cb_apply: 'triton' on CUDA where it runs, else 'fused'
_check(_BACKEND)

_FALLBACK = {'xformers': 'sdpa'}   # anything else falls back to 'fused' (the explicit math, always runs)
_WARNED = set()


def _fall_back(name: str, w: torch.Tensor, reason: str) -> str:
    nxt = _FALLBACK.get(name, 'fused')
    if _STRICT:
        raise RuntimeError(f'CBSA backend {name!r} cannot run for {w.device.type}/{w.dtype}/d={w.shape[-1]} '
                           f'(TIMM_CBSA_STRICT_BACKEND is set): {reason}')
    key = (name, w.device.type, w.dtype, int(w.shape[-1]), reason)
    if not torch.compiler.is_compiling() and key not in _WARNED:
        _WARNED.add(key)
        _logger.warning('CBSA: backend %r unavailable for %s/%s/d=%d, falling back to %r: %s',
                        name, w.device.type, w.dtype, w.shape[-1], nxt, reason)
    return nxt


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@register_notrace_function
def _cb_apply(backend: str, w: torch.Tensor, r: Optional[torch.Tensor], step_rep: torch.Tensor,
              step_x: torch.Tensor, scale: float, pool: Optional[tuple] = None) -> torch.Tensor:
    """FX leaf: picks the kernel from device / dtype (a data-dependent decision), falls back with a logged reason,
    and applies the memory-saving contract-and-broadcast (``fused.py``) with autocast off inside: under autocast W is
    cast to the autocast dtype first (the products then run in it, as on the eager path), and the function handles
    precision itself (float32 softmax statistics), the same way in forward and backward."""
    if step_rep.dim() != 3 or step_x.dim() != 3:
        raise ValueError('CBSA fused backends expect step_rep / step_x of shape (H, 1, 1).')
    cast = _autocast_dtype(w.device.type)
    if cast is not None and w.dtype != cast and w.is_floating_point():
        w = w.to(cast)
    if r is not None:
        r = r.to(w.dtype)
    m = r.shape[-2] if r is not None else num_representatives(pool)
    name = backend
    if name == 'auto':
        name = 'triton' if w.device.type == 'cuda' and _triton_supported(w, m) is None else 'fused'
    with no_autocast(w.device.type):
        while True:
            spec = BACKENDS[name]
            reason = None if spec.supported is None else spec.supported(w, m)
            if reason is None:
                if name == 'fused' or torch.compiler.is_compiling():
                    return spec.apply(w, r, step_rep, step_x, scale, pool)
                try:
                    return spec.apply(w, r, step_rep, step_x, scale, pool)
                except Exception as e:  # noqa: BLE001 (a kernel that fails at run time falls back, logged once)
                    reason = f'failed at run time: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            name = _fall_back(name, w, reason[:300])


torch.fx.wrap('_cb_apply')


def fused_contract_and_broadcast(backend: str, w, r, step_rep, step_x, scale: float,
                                 pool: Optional[tuple] = None) -> torch.Tensor:
    """w: (B, H, N, d) tokens, r: (B, H, m, d) Q_ini -> (B, H, N, d), same result as ``CBSA.contract_and_broadcast``.

    With ``r=None`` and ``pool`` a ``PoolSpec`` the function pools Q_ini from w itself, block by
    block (``pool_representatives(w, pool)``, without its N-wide passes).

    The result has w's memory layout, so ``out.transpose(1, 2).reshape(B, N, C)`` is a view when w came from the
    usual ``qkv(x).reshape(B, N, H, d).transpose(1, 2)``.
    """
    if backend == 'eager' or backend not in BACKENDS:   # 'auto' is resolved in _cb_apply
        raise ValueError(f'Unknown fused CBSA backend {backend!r}; choose one of '
                         f'{tuple(b for b in BACKENDS if b != "eager")}.')
    if (r is None) == (pool is None):
        raise ValueError('fused_contract_and_broadcast: pass either r or pool.')
    return _cb_apply(backend, w, r, step_rep, step_x, scale, pool)
