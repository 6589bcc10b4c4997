"""Attention maps of CBSA models (CBT, cbsa_vit, converted ViTs) and of plain softmax timm ViTs.

For a CBSA layer the paper (§6.7) estimates the full N×N attention of head k as A_k A_kᵀ, where A_k (N×m) is the
extraction matrix. In the code's row convention the layer's ``attn`` is A_kᵀ (m×N), so the estimate is
``attnᵀ attn`` and the class-token row is ``Σ_i attn[i, 0] · attn[i, :]``. For a softmax layer the map is the
attention matrix itself, ``softmax(q kᵀ · s)``.

The maps are recomputed from each attention layer's *input* (captured by forward pre-hooks) with the layer's public
methods (``project`` / ``representatives`` for CBSA, ``qkv`` / ``q_norm`` / ``k_norm`` for timm's ``Attention``), so
they do not depend on the compute backend (eager / sdpa / fused softmax). Converted ViTs (``cbsa_star``, ``agent``,
``linear``, ``mssa`` layers) are handled by duck typing, see ``map_kind``. With the eager CBSA backend they equal what
``timm.utils.AttentionExtract(model, method='hook')`` captures at ``*attn_drop`` (tested). The softmaxes are the
operator's (``ops.contract_broadcast.naive``: ``extraction``, ``attention_weights``).

Heads are compared on one scale by ``head_mean_map``: each head's map divided by its maximum, then averaged.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.contract_broadcast.naive import attention_weights, extraction

__all__ = [
    'LayerTrace', 'ModelTrace', 'attention_layers', 'map_kind', 'qkv_heads', 'trace_model', 'extraction_matrix',
    'full_attention', 'query_attention', 'class_token_maps', 'head_mean_map', 'head_map', 'head_names',
]


def map_kind(module: nn.Module) -> Optional[str]:
    """How a layer's token-to-token map is formed (duck-typed, so converted / family layers work too):

    'representative'  pooled representatives (``representatives`` + ``project``): CBSA, CBSA*, agent attention;
                      A = softmax(R kᵀ s) with R = pool(q), map = Aᵀ A (the paper's A_k A_kᵀ)
    'linear'          kernelised linear attention (``LinearAttention``): map = φ(q) φ(k)ᵀ / normaliser
    'softmax'         softmax attention: timm ``Attention`` (``qkv`` with 3·C outputs) or MSSA (q = k = v)
    None              no token-to-token map (e.g. TSSA's channel attention)
    """
    has_project = callable(getattr(module, 'project', None))
    if has_project and callable(getattr(module, 'representatives', None)):
        return 'representative'
    name = type(module).__name__
    if has_project and name == 'LinearAttention':
        return 'linear'
    if has_project and name == 'MSSA':
        return 'softmax'
    qkv = getattr(module, 'qkv', None)
    if isinstance(qkv, nn.Linear) and hasattr(module, 'num_heads') and hasattr(module, 'head_dim'):
        if qkv.out_features == 3 * module.num_heads * module.head_dim and not has_project:
            return 'softmax'
    return None


def qkv_heads(layer: 'LayerTrace') -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v), each (B, H, N, d), of a layer's input; q = k = v = U_kᵀZ for single-projection layers (CBSA)."""
    mod, x = layer.module, layer.x
    if callable(getattr(mod, 'project', None)):
        out = mod.project(x)
        if isinstance(out, (tuple, list)):
            return out[0], out[1], out[2]
        return out, out, out
    B, N, _ = x.shape
    qkv = mod.qkv(x).reshape(B, N, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return mod.q_norm(q), mod.k_norm(k), v


def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The attention layer of every block (``blocks.i.attn``), in depth order."""
    blocks = getattr(model, 'blocks', None)
    if blocks is None:
        raise ValueError(f'{type(model).__name__} has no .blocks; expected a timm VisionTransformer-like model.')
    out = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, 'attn', None)
        if attn is not None and map_kind(attn) is not None:
            out.append((f'blocks.{i}.attn', attn))
    if not out:
        raise ValueError('No supported attention layers found under model.blocks[i].attn.')
    return out


@dataclass
class LayerTrace:
    name: str
    kind: str
    module: nn.Module
    x: torch.Tensor                          # (B, N, C): the attention layer's input (after the block's norm1)
    ista_out: Optional[torch.Tensor] = None  # (B, N, C): the block's ISTA output (CBT), if any


@dataclass
class ModelTrace:
    layers: List[LayerTrace]
    num_prefix_tokens: int
    grid_size: Tuple[int, int]
    logits: Optional[torch.Tensor] = None
    extra: Dict[str, object] = field(default_factory=dict)


def _grid_and_prefix(model: nn.Module, x: torch.Tensor, n_tokens: int) -> Tuple[Tuple[int, int], int]:
    prefix = int(getattr(model, 'num_prefix_tokens', 0))
    pe = model.patch_embed
    if hasattr(pe, 'dynamic_feat_size'):
        gh, gw = pe.dynamic_feat_size((x.shape[-2], x.shape[-1]))
    else:
        gh, gw = pe.grid_size
    gh, gw = int(gh), int(gw)
    if prefix + gh * gw != n_tokens:
        prefix = n_tokens - gh * gw
    return (gh, gw), prefix


@torch.no_grad()
def trace_model(model: nn.Module, x: torch.Tensor) -> ModelTrace:
    """Run ``model(x)`` once and record every attention layer's input and every ISTA block's output."""
    layers = attention_layers(model)
    captured: Dict[str, torch.Tensor] = {}
    ista: Dict[int, torch.Tensor] = {}
    handles = []
    for name, mod in layers:
        def pre_hook(module, args, kwargs, _name=name):
            captured[_name] = (args[0] if args else kwargs['x']).detach()
        handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
    for i, blk in enumerate(model.blocks):
        if hasattr(blk, 'ista'):
            def hook(module, args, output, _i=i):
                ista[_i] = output.detach()
            handles.append(blk.ista.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    traces = []
    for name, mod in layers:
        idx = int(name.split('.')[1])
        traces.append(LayerTrace(name, map_kind(mod), mod, captured[name], ista.get(idx)))
    grid, prefix = _grid_and_prefix(model, x, traces[0].x.shape[1])
    return ModelTrace(traces, prefix, grid, logits)


def extraction_matrix(layer: LayerTrace) -> torch.Tensor:
    """Extraction matrix A (the code's ``attn``, the paper's A_kᵀ): (B, H, m, N), rows sum to 1 over tokens."""
    if layer.kind != 'representative':
        raise ValueError(f'{layer.name} ({layer.kind}) has no extraction matrix.')
    q, k, _ = qkv_heads(layer)
    return extraction(layer.module.representatives(q), k, layer.module.scale)


def full_attention(layer: LayerTrace) -> torch.Tensor:
    """(B, H, N, N): A_k A_kᵀ for representative layers (paper §6.7), softmax(q kᵀ s) for softmax layers, the
    normalised kernel φ(q)φ(k)ᵀ for linear attention."""
    if layer.kind == 'softmax':
        q, k, _ = qkv_heads(layer)
        return attention_weights(q.float(), k.float(), layer.module.scale)
    if layer.kind == 'linear':
        q, k, _ = qkv_heads(layer)
        q, k = F.elu(q.float()) + 1., F.elu(k.float()) + 1.
        kern = q @ k.transpose(-2, -1)
        return kern / (kern.sum(-1, keepdim=True) + float(getattr(layer.module, 'eps', 0.)))
    a = extraction_matrix(layer).float()
    return a.transpose(-2, -1) @ a


def query_attention(layer: LayerTrace, index: int = 0) -> torch.Tensor:
    """Row ``index`` of the full attention, (B, H, N), without forming the N×N matrix for CBSA layers."""
    if layer.kind != 'representative':
        return full_attention(layer)[:, :, index, :]
    a = extraction_matrix(layer).float()                       # (B, H, m, N)
    return (a[..., index].unsqueeze(-2) @ a).squeeze(-2)       # Σ_i A[i, index] A[i, :]


@torch.no_grad()
def class_token_maps(trace: ModelTrace, query: str = 'cls') -> torch.Tensor:
    """Class-token attention over the patch grid for every layer and head: (L, B, H, gh, gw).

    ``query='cls'`` uses the row of token 0 (the class token); models without prefix tokens, or ``query='mean'``,
    use the mean row (the average token's attention).
    """
    gh, gw = trace.grid_size
    p = trace.num_prefix_tokens
    maps = []
    for layer in trace.layers:
        if query == 'cls' and p > 0:
            row = query_attention(layer, 0)
        else:
            row = full_attention(layer).mean(-2)
        patches = row[..., p:]
        maps.append(patches.reshape(*patches.shape[:2], gh, gw))
    return torch.stack(maps)


def head_mean_map(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, gh, gw) per-head maps -> (..., gh, gw): each head's map divided by its maximum, then the mean over
    the heads (so no head dominates by scale)."""
    peak = maps.flatten(-2).amax(-1).clamp_min(1e-12)
    return (maps / peak[..., None, None]).mean(-3)


def head_names(num_heads: int) -> List[str]:
    """The heads a table reports: '0', '1', ..., and 'mean' (``head_mean_map``)."""
    return [str(h) for h in range(num_heads)] + ['mean']


def head_map(maps: torch.Tensor, head: str) -> torch.Tensor:
    """Map ``head`` (one of ``head_names``) of (..., H, gh, gw) per-head maps -> (..., gh, gw)."""
    return head_mean_map(maps) if head == 'mean' else maps[..., int(head), :, :]
