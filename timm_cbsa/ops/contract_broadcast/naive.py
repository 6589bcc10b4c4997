"""The reference contract-and-broadcast: Algorithm 1 of the paper written out with plain autograd.

Per head, W (N×d) the projected tokens, Q_ini (m×d) the initial representatives, s the scale:

    A   = softmax_N(s·Q_ini Wᵀ)        extraction: each representative reads all N tokens     (m × N)
    Q   = Q_ini + η·A W                representative update, η = step_rep (per head)
    C   = softmax_m(s·Q Qᵀ) Q          contraction: self-attention among the m representatives
    out = κ·Aᵀ C                       broadcast through the same A (no renormalisation), κ = step_x

(A is the paper's A_kᵀ.) Half-precision logits and softmax statistics are float32 (fp16 products can overflow), the
products run in the tokens' dtype. The eager CBSA layer calls this function; every other implementation is tested
against it. It keeps the m×N matrix A for backward (the memory-saving implementations do not).
"""
from typing import Optional

import torch

from ..tracing import fx_leaf
from .pooling import PoolSpec, pool_representatives

__all__ = ['similarity', 'attention_weights', 'extraction', 'update', 'contraction', 'broadcast',
           'update_contract_broadcast', 'naive_contract_and_broadcast']


@fx_leaf
def similarity(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(q·s) kᵀ as softmax-ready logits: half-precision inputs give float32 logits (fp16 products can overflow
    65504, so they are computed in float32; bf16 products are upcast)."""
    if q.dtype == torch.float16:
        q, k = q.float(), k.float()
    logits = (q * scale) @ k.transpose(-2, -1)
    return logits.float() if logits.dtype == torch.bfloat16 else logits


torch.fx.wrap('similarity')   # FX: leaf calls (they branch on the dtype)


@fx_leaf
def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax over the last dim of (q·s) kᵀ, in q's dtype; half-precision statistics in float32."""
    return similarity(q, k, scale).softmax(dim=-1).to(q.dtype)


torch.fx.wrap('attention_weights')


def extraction(r: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """A = softmax_N(s·Q_ini Wᵀ): (B, H, m, N), each representative's distribution over the tokens. The softmax is a
    visible node named 'softmax' (timm's AttentionExtract finds '*attn.softmax' by default)."""
    return similarity(r, w, scale).softmax(dim=-1).to(w.dtype)


def update(attn: torch.Tensor, w: torch.Tensor, r: torch.Tensor, step_rep: torch.Tensor) -> torch.Tensor:
    """Q = Q_ini + η·A W: (B, H, m, d)."""
    return r + step_rep * (attn @ w)


def contraction(q: torch.Tensor, scale: float) -> torch.Tensor:
    """C = softmax_m(s·Q Qᵀ) Q: (B, H, m, d), self-attention among the representatives."""
    return attention_weights(q, q, scale) @ q


def broadcast(attn: torch.Tensor, c: torch.Tensor, step_x: torch.Tensor) -> torch.Tensor:
    """κ·Aᵀ C: (B, H, N, d), back to every token through the extraction matrix (no renormalisation)."""
    return step_x * (attn.transpose(-2, -1) @ c)


def update_contract_broadcast(attn: torch.Tensor, w: torch.Tensor, r: torch.Tensor, step_rep: torch.Tensor,
                              step_x: torch.Tensor, scale: float) -> torch.Tensor:
    """Given the extraction A (B, H, m, N): the update, the contraction and the broadcast -> (B, H, N, d)."""
    return broadcast(attn, contraction(update(attn, w, r, step_rep), scale), step_x)


def naive_contract_and_broadcast(
        w: torch.Tensor,
        step_rep: torch.Tensor,
        step_x: torch.Tensor,
        scale: float,
        pool: Optional[PoolSpec] = None,
        r: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """w: (B, H, N, d) tokens; step_rep η, step_x κ: (H, 1, 1); Q_ini = ``r`` (B, H, m, d) or pooled from w as
    ``pool`` says -> (B, H, N, d)."""
    if r is None:
        assert pool is not None, 'pass either r (Q_ini) or pool (a PoolSpec)'
        r = pool_representatives(w, pool)                                  # Q_ini (B, H, m, d)
    return update_contract_broadcast(extraction(r, w, scale), w, r, step_rep, step_x, scale)
