"""The extraction as ordinary attention with its log-sum-exp: m queries (the representatives) over N keys (the tokens).

    out = softmax(s·Q_ini Wᵀ) W,   lse = logsumexp(s·Q_ini Wᵀ)      (…, m, d) and (…, m) in float32

The memory-saving autograd function (``fused.py``) needs both: ``out`` is A·W, ``lse`` lets backward rebuild A
blockwise. Torch's SDPA kernels and xformers' memory-efficient attention return them, so the ``'sdpa'`` and
``'xformers'`` implementations hand the extraction to those kernels. Which kernel runs is decided statically from
the device, the dtype and the head width (``choose``); nothing is probed numerically.
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ['LSE_FUNCTIONS', 'choose', 'not_supported_reasons']

Lse = Tuple[torch.Tensor, torch.Tensor]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _sdpa_cpu(q, k, v, scale: float) -> Lse:
    if q.dim() == 3:   # one CPU block: (H, L, d)
        out, lse = _sdpa_cpu(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale)
        return out.squeeze(0), lse.squeeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, _f32(lse)


def _sdpa_cuda_flash(q, k, v, scale: float) -> Lse:
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], _f32(res[1][..., :q.shape[-2]])


def _sdpa_cuda_efficient(q, k, v, scale: float) -> Lse:
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], _f32(res[1][..., :q.shape[-2]])


def _xformers(q, k, v, scale: float) -> Lse:
    from xformers.ops import fmha
    # xformers layout is [B, M, H, K]; ours is [B, H, M, K]
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), _f32(lse[..., :q.shape[-2]])


# name -> fn(q, k, v, scale) -> (out, lse)
LSE_FUNCTIONS: Dict[str, Callable[..., Lse]] = {
    'cpu_flash': _sdpa_cpu, 'cuda_flash': _sdpa_cuda_flash, 'cuda_efficient': _sdpa_cuda_efficient,
    'xformers': _xformers,
}

_HALF = (torch.float16, torch.bfloat16)


def _xformers_import_error() -> Optional[str]:
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001  (any import failure means: not usable here)
        return f'xformers is not importable ({type(e).__name__}: {e})'
    return None


def not_supported_reasons(kind: str, head_dim: int, dtype: Optional[torch.dtype], device: torch.device) -> List[str]:
    """Why ``kind`` ('sdpa' or 'xformers') cannot compute the extraction here; [] when it can."""
    reasons = []
    if kind == 'xformers':
        if device.type != 'cuda':
            reasons.append(f'xformers memory_efficient_attention needs a CUDA device (got {device.type})')
        err = _xformers_import_error()
        if err:
            reasons.append(err)
        if dtype == torch.float64:
            reasons.append('xformers has no float64 kernel')
    elif device.type not in ('cpu', 'cuda'):
        reasons.append(f'no SDPA kernel returning the log-sum-exp on {device.type}')
    elif device.type == 'cuda' and dtype == torch.float64:
        reasons.append('the CUDA SDPA kernels have no float64 variant')
    return reasons


def choose(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> str:
    """The ``LSE_FUNCTIONS`` entry for a supported (kind, head width, dtype, device): flash attention on CUDA for
    half precision with a head width it takes (a multiple of 8, at most 256), else memory-efficient attention."""
    if kind == 'xformers':
        return 'xformers'
    if device.type == 'cpu':
        return 'cpu_flash'
    if dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256:
        return 'cuda_flash'
    return 'cuda_efficient'
