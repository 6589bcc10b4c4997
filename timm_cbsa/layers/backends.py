"""The one place that decides how CBSA's extraction / contraction / broadcast run.

Backends (``BACKENDS``):

* ``'eager'``    the reference math in ``CBSA.contract_and_broadcast`` (plain autograd, keeps the m×N matrix A).
* ``'fused'``    one custom autograd function (``fused.py``): explicit extraction, cache-blocked on CPU (a few batch
                 elements or one batch element's head group at a time, pooling the representatives per block) and
                 memory-saving: it keeps only W, Q_ini,
                 the per-representative log-sum-exp and m×d / m×m tensors for backward and rebuilds
                 A = exp(s·Q_ini Wᵀ − lse) blockwise.
* ``'sdpa'``     the extraction softmax(s·Q_ini Wᵀ) W is an ordinary attention with m queries and N keys: torch SDPA
                 (``_scaled_dot_product_flash_attention_for_cpu`` on CPU, flash / memory-efficient on CUDA)
                 returns it together with its log-sum-exp; the broadcast Aᵀ·Y is rebuilt as exp(s·W Q_iniᵀ − lse)·Y.
                 Same memory-saving autograd function as 'fused'.
* ``'triton'``   the Triton kernels in ``timm_cbsa/kernels/cbsa`` (CUDA): A = softmax_N(s·Q_ini Wᵀ) lives only in
                 on-chip memory, token block by token block, in forward and backward. Probed once per (device, dtype,
                 head dim, m) with a parity run against the float64 reference; where Triton, the device or the shape
                 is unsupported it falls back to 'fused' and logs the reason once. Under torch.compile it runs 'fused'.
* ``'xformers'`` as 'sdpa', with ``xformers.ops.fmha`` for the extraction ([B, M, H, K] layout). Probed once per
                 (device, dtype, head-dim class), cached; when it cannot run (CPU, missing package, unsupported
                 shape) it falls back to 'sdpa' and logs the reason once.

Selection, highest priority first: the layer's ``backend=`` argument, ``use_backend(...)`` / ``set_backend(...)``,
the environment variable ``TIMM_CBSA_BACKEND`` (read at import), then 'auto' (the default: 'triton' on CUDA where
its probe passes, else 'fused', which matches 'eager' to ~1e-7 in float32 and is the fastest on CPU; 'eager' stays
the readable reference). Attention dropout while training
always runs 'eager' (only the reference path has it); TorchScript always runs 'eager' (see ``CBSA.forward``).

Tracing: ``torch.fx`` keeps the fused call as one leaf (``_cb_apply`` below is ``torch.fx.wrap``-ed and registered
with timm's notrace list, because it branches on device and dtype). Under ``torch.compile`` the custom autograd
function is traced whole (no graph break); the per-block Python loop is replaced by one batched block, and the
xformers probe is never run inside the compiled region (the cached answer is used, or 'sdpa' when none exists).

The gradients are written out in ``fused.py``.
"""
import contextlib
import logging
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._fx import register_notrace_function
from .fused import LSE_IMPLS, ContractBroadcast, block_budget_bytes

__all__ = [
    'BACKENDS', 'set_backend', 'get_backend', 'use_backend', 'resolve_backend', 'fused_contract_and_broadcast',
    'xformers_status', 'block_budget_bytes',
]

_logger = logging.getLogger(__name__)

BACKENDS = ('eager', 'fused', 'sdpa', 'xformers', 'triton')


def _check(name: str) -> str:
    if name not in BACKENDS and name != 'auto':
        raise ValueError(f'Unknown CBSA backend {name!r}; choose one of {BACKENDS} or \'auto\'.')
    return name


_BACKEND = _check(os.environ.get('TIMM_CBSA_BACKEND', 'auto'))

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
    """Backend for one call. ``needs_eager``: attention dropout while training (only the eager path has it).

    Decides on Python values only (never on ``w``), so it is safe under torch.fx / torch.compile; device- and
    dtype-dependent fallbacks (xformers on CPU, ...) happen inside the traced leaf ``_cb_apply``.
    """
    if needs_eager:
        return 'eager'
    return _check(module_backend) if module_backend is not None else _BACKEND


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


# probe cache: (kind, device type, dtype, head dim) -> chosen implementation name, or None when it cannot run
_PROBES: Dict[Tuple[str, str, torch.dtype, int], Optional[str]] = {}
LSE_IMPLS.update({    # the registry lives in fused.py, which calls the chosen one
    'explicit': _explicit_lse, 'cpu_flash': _sdpa_lse_cpu, 'cuda_flash': _sdpa_lse_cuda_flash,
    'cuda_efficient': _sdpa_lse_cuda_efficient, 'xformers': _xformers_lse,
})


def _head_dim_class(d: int) -> int:
    return 1 << max(int(d) - 1, 0).bit_length()   # next power of two: 64 -> 64, 48 -> 64, 80 -> 128


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


def _probe(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> Optional[str]:
    """Chosen LSE implementation for ``kind`` ('sdpa' or 'xformers'), or None (xformers unusable). Cached."""
    key = (kind, device.type, dtype, _head_dim_class(d))
    if key in _PROBES:
        return _PROBES[key]
    if torch.compiler.is_compiling():
        # never probe inside a compiled region: the explicit math for SDPA, SDPA in place of an unprobed xformers
        return 'explicit' if kind == 'sdpa' else None
    choice: Optional[str] = None
    if kind == 'xformers':
        reason = None
        if device.type != 'cuda':
            reason = f'xformers memory_efficient_attention needs a CUDA device (got {device.type})'
        else:
            try:
                import xformers.ops  # noqa: F401
            except Exception as e:  # noqa: BLE001
                reason = f'xformers is not importable ({type(e).__name__}: {e})'
        if reason is None:
            reason = _try_impl('xformers', device, dtype, d)
        if reason is None:
            choice = 'xformers'
        else:
            _logger.warning('CBSA: xformers backend unavailable for %s/%s/d=%d, falling back to sdpa: %s',
                            device.type, dtype, d, reason)
    else:
        if device.type == 'cpu':
            candidates: List[str] = ['cpu_flash']
        elif device.type == 'cuda':
            candidates = (['cuda_flash', 'cuda_efficient'] if dtype in (torch.float16, torch.bfloat16)
                          else ['cuda_efficient'])
        else:
            candidates = []
        reasons = []
        for c in candidates:
            reason = _try_impl(c, device, dtype, d)
            if reason is None:
                choice = c
                break
            reasons.append(f'{c}: {reason}')
        if choice is None:
            choice = 'explicit'
            _logger.warning('CBSA: no SDPA kernel returning the log-sum-exp for %s/%s/d=%d, using explicit math (%s)',
                            device.type, dtype, d, '; '.join(reasons) or 'no candidate for this device')
    _PROBES[key] = choice
    return choice


def xformers_status(device: torch.device, dtype: torch.dtype = torch.float16, d: int = 64) -> Optional[str]:
    """'xformers' if the xformers path runs for this device / dtype / head dim, else None (see the log)."""
    return _probe('xformers', torch.device(device), dtype, d)


@register_notrace_function
def _cb_apply(backend: str, w: torch.Tensor, r: Optional[torch.Tensor], step_rep: torch.Tensor,
              step_x: torch.Tensor, scale: float, pool: Optional[tuple] = None) -> torch.Tensor:
    """FX leaf: picks the extraction kernel from device / dtype (a data-dependent decision) and applies the
    memory-saving contract-and-broadcast (``fused.py``) with autocast off inside: it handles precision itself
    (half-precision products, float32 softmax statistics), the same way in forward and backward."""
    if backend in ('triton', 'auto'):
        if _triton_runs(backend, w, r.shape[-2] if r is not None else pool[1][0] * pool[1][1]):
            from ..kernels.cbsa import contract_and_broadcast_triton
            with torch.autocast(device_type=w.device.type, enabled=False):
                return contract_and_broadcast_triton(w, step_rep, step_x, scale, pool=pool, r=r)
        backend = 'fused'
    if backend == 'fused':
        impl = 'fused'
    else:
        impl = None
        if backend == 'xformers':
            impl = _probe('xformers', w.device, w.dtype, w.shape[-1])
        if impl is None:
            impl = _probe('sdpa', w.device, w.dtype, w.shape[-1])
        if impl == 'explicit':
            impl = 'fused'
    if step_rep.dim() != 3 or step_x.dim() != 3:
        raise ValueError('CBSA fused backends expect step_rep / step_x of shape (H, 1, 1).')
    with torch.autocast(device_type=w.device.type, enabled=False):
        return ContractBroadcast.apply(w, None if r is None else r.to(w.dtype), step_rep, step_x, scale, impl, pool)


torch.fx.wrap('_cb_apply')


_TRITON_LOGGED = set()


def _triton_runs(backend: str, w: torch.Tensor, m: int) -> bool:
    """Whether the Triton kernels take this call ('triton' asked for, or 'auto' on CUDA): their probe is cached per
    (device, dtype, head dim, m); a failing one is logged once per key. Never probes inside torch.compile."""
    if (backend == 'auto' and w.device.type != 'cuda') or torch.compiler.is_compiling():
        return False
    from ..kernels.cbsa import triton_probe
    reason = triton_probe(w.device, w.dtype, w.shape[-1], m)
    key = (w.device.type, w.dtype, w.shape[-1], m)
    if reason is not None and key not in _TRITON_LOGGED:
        _TRITON_LOGGED.add(key)
        _logger.warning('CBSA: triton backend unavailable for %s/%s/d=%d/m=%d, falling back to fused: %s',
                        w.device.type, w.dtype, w.shape[-1], m, reason)
    return reason is None


def fused_contract_and_broadcast(backend: str, w, r, step_rep, step_x, scale: float,
                                 pool: Optional[tuple] = None) -> torch.Tensor:
    """w: (B, H, N, d) tokens, r: (B, H, m, d) Q_ini -> (B, H, N, d), same result as ``CBSA.contract_and_broadcast``.

    With ``r=None`` and ``pool=((H_p, W_p), (r_h, r_w), legacy)`` the function pools Q_ini from w itself, block by
    block (``pool_representatives(w, *pool)``, without its N-wide passes).

    The result has w's memory layout, so ``out.transpose(1, 2).reshape(B, N, C)`` is a view when w came from the
    usual ``qkv(x).reshape(B, N, H, d).transpose(1, 2)``.
    """
    if backend not in ('fused', 'sdpa', 'xformers', 'triton', 'auto'):
        raise ValueError(f'Unknown fused CBSA backend {backend!r}; choose one of {BACKENDS[1:]} or \'auto\'.')
    if (r is None) == (pool is None):
        raise ValueError('fused_contract_and_broadcast: pass either r or pool.')
    return _cb_apply(backend, w, r, step_rep, step_x, scale, pool)
