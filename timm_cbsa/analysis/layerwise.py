"""Per-layer measurements: coding rate R(Z), compression term Σ_k R(U_kᵀZ), ISTA sparsity (paper §6.8, Fig. 5) and
the coding-rate change across one CBSA step per layer and head (Fig. 6).

Conventions (see ``coding_rate.py``): Z is the attention layer's input tokens (after the block's LayerNorm, class token
included), U_kᵀZ its head-k projection (``CBSA.project``: the single projection ``qkv``, q = k = v; for a softmax
layer the value projection is used), ε² = 0.01. Values are averaged over the images of the batch.
"""
import math
from typing import Dict, List

import torch

from ..layers.cbsa import CBSA
from ..ops.contract_broadcast.naive import broadcast, contraction, extraction, update
from .coding_rate import EPS2, coding_rate, coding_rate_gradient, head_coding_rates
from .maps import LayerTrace, ModelTrace, qkv_heads

__all__ = ['projected_tokens', 'layer_coding_rates', 'cbsa_step_rates', 'LAYER_COLUMNS', 'STEP_COLUMNS']

LAYER_COLUMNS = ['layer', 'kind', 'tokens', 'heads', 'R_Z', 'Rc', 'Rc_unit', 'ista_zero_frac', 'ista_l0_frac_mean']
STEP_COLUMNS = [
    'layer', 'head', 'kappa_mode', 'kappa', 'R_tokens_before', 'R_tokens_after', 'dR_tokens',
    'R_reps_before', 'R_reps_after', 'dR_reps', 'dR_reps_exact_step',
]


@torch.no_grad()
def projected_tokens(layer: LayerTrace) -> torch.Tensor:
    """U_kᵀZ per head: (B, H, N, p). Single-projection layers (CBSA, MSSA, agent): ``project(x)``; three-projection
    layers (softmax, CBSA*, linear): the value projection."""
    q, k, v = qkv_heads(layer)
    return v


@torch.no_grad()
def layer_coding_rates(trace: ModelTrace, eps2: float = EPS2) -> List[Dict[str, object]]:
    """One row per layer: R(Z), R^c = Σ_k R(U_kᵀZ), R^c of unit-norm projected tokens, ISTA output sparsity."""
    rows = []
    for i, layer in enumerate(trace.layers):
        w = projected_tokens(layer)
        w_unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        row = {
            'layer': i, 'kind': layer.kind, 'tokens': int(layer.x.shape[1]), 'heads': int(w.shape[1]),
            'R_Z': float(coding_rate(layer.x, eps2).mean()),
            'Rc': float(head_coding_rates(w, eps2).sum(-1).mean()),
            'Rc_unit': float(head_coding_rates(w_unit, eps2).sum(-1).mean()),
            'ista_zero_frac': math.nan, 'ista_l0_frac_mean': math.nan,
        }
        if layer.ista_out is not None:
            z = layer.ista_out
            nz = (z != 0).float()
            row['ista_zero_frac'] = float(1.0 - nz.mean())
            row['ista_l0_frac_mean'] = float(nz.mean(-1).mean())   # mean fraction of non-zeros per token
        rows.append(row)
    return rows


def _exact_rep_decrease(w: torch.Tensor, attn: torch.Tensor, eps2: float, rel_step: float = 1e-3) -> torch.Tensor:
    """Eq. (7) in head coordinates (U_k = I): change of R(A W) after W ← W − κ Aᵀ[αX(I+αXᵀX)^{-1}], κ small.

    w: (B, H, N, p), attn: (B, H, m, N). κ = rel_step·‖W‖/‖step‖ per head. Returns (B, H) float64.
    """
    w, attn = w.double(), attn.double()
    x = attn @ w
    step = attn.transpose(-2, -1) @ coding_rate_gradient(x, eps2)
    kappa = rel_step * w.flatten(-2).norm(dim=-1) / step.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    w_new = w - kappa[..., None, None] * step
    return coding_rate(attn @ w_new, eps2) - coding_rate(x, eps2)


@torch.no_grad()
def cbsa_step_rates(trace: ModelTrace, eps2: float = EPS2) -> List[Dict[str, object]]:
    """Fig. 6: per CBSA layer and head, the coding rate of the projected tokens W = U_kᵀZ and of the representatives
    Q before and after one softmax-form step (eq. 8), in head coordinates:

        tokens:           W  →  W + κ · Aᵀ C,     C = softmax(Q Qᵀ s) Q  (the contraction)
        representatives:  Q  →  Q + κ · C,        Q = Q_ini + η · A W

    for κ = 1 (the paper's setting) and for the layer's learned κ (``step_x``). No sign is implied: the paper folds
    sign and scale of eq. (8) into κ. ``dR_reps_exact_step`` is the change of Σ R(A W) under a small exact step
    (eq. 7) with the same A, which must be negative.
    """
    rows = []
    for i, layer in enumerate(trace.layers):
        if isinstance(layer.module, CBSA):   # the paper's CBSA (one projection, η and κ)
            rows += _step_rows(i, layer.module, layer.x, eps2)
    return rows


def _step_rows(index: int, mod: CBSA, x: torch.Tensor, eps2: float) -> List[Dict[str, object]]:
    """The ``cbsa_step_rates`` rows of one layer: the layer's projection and pooling, the operator's steps."""
    w = mod.project(x)                                             # W (B, H, N, d)
    r0 = mod.representatives(w)                                    # Q_ini (B, H, m, d)
    attn = extraction(r0, w, mod.scale)                            # A (B, H, m, N)
    q = update(attn, w, r0, mod.step_rep)                          # Q = Q_ini + η·A W
    c = contraction(q, mod.scale)                                  # C = softmax(s·Q Qᵀ) Q
    exact = _exact_rep_decrease(w, attn, eps2).mean(0)
    rt0 = coding_rate(w, eps2).mean(0)
    rq0 = coding_rate(q, eps2).mean(0)
    learned = mod.step_x.detach().reshape(-1)
    rows = []
    for mode in ('one', 'learned'):
        kap = torch.ones_like(learned) if mode == 'one' else learned
        k3 = kap.reshape(-1, 1, 1)
        rt1 = coding_rate(w + broadcast(attn, c, k3), eps2).mean(0)   # W + κ·Aᵀ C
        rq1 = coding_rate(q + k3 * c, eps2).mean(0)                   # Q + κ·C
        for h in range(w.shape[1]):
            rows.append({
                'layer': index, 'head': h, 'kappa_mode': mode, 'kappa': float(kap[h]),
                'R_tokens_before': float(rt0[h]), 'R_tokens_after': float(rt1[h]), 'dR_tokens': float(rt1[h] - rt0[h]),
                'R_reps_before': float(rq0[h]), 'R_reps_after': float(rq1[h]), 'dR_reps': float(rq1[h] - rq0[h]),
                'dR_reps_exact_step': float(exact[h]),
            })
    return rows
