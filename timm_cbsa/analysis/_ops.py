"""Small numerical helpers shared by the analysis modules (independent of the layer's private helpers)."""
import torch

__all__ = ['attention_softmax']


def attention_softmax(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax over the last dim of (q·s) kᵀ, computed in float32 (float64 kept), returned in q's dtype."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q.to(dt) * scale) @ k.to(dt).transpose(-2, -1)
    return logits.softmax(dim=-1).to(q.dtype)
