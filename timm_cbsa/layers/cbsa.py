"""Contract-and-Broadcast Self-Attention (Wen, Huang, Li, NeurIPS 2025, arXiv 2509.16875).

Read next to the paper's eq. (8) / Algorithm 1. Per head k, with W = U_kᵀZ the projected tokens:

    Q_ini  = pool(W)                                   representatives: patch tokens average-pooled to r_h×r_w
    A      = softmax_N( Q_ini Wᵀ · s )                 extraction: each representative reads all N tokens
    Q      = Q_ini + η · A W                           representative update (η: per-head step size)
    C      = softmax_m( Q Qᵀ · s ) Q                   contraction: self-attention among the m representatives
    out    = κ · Aᵀ C                                  broadcast: back to every token through the same A
                                                       (no renormalisation over representatives)
    y      = to_out( concat_k out_k )                  independent output projection with bias

(A here is the paper's A_kᵀ: shape m × N, each row a distribution over tokens.) s = d_head^-0.5. This module
projects, pools and merges heads; the middle four lines are the operator ``timm_cbsa.ops.contract_broadcast``
(``naive.py`` is the reference the eager path runs). Cost: O(N·m·d) per head, linear in N for fixed m.
"""
from typing import Optional, Tuple

import torch

from ..ops.contract_broadcast import contract_and_broadcast, select, warn_once
from ..ops.contract_broadcast.naive import extraction, update_contract_broadcast
from ..ops.tracing import is_exporting
from .base import check_no_mask, split_heads
from .layout import GridAwareAttention

__all__ = ['CBSA']

torch.fx.wrap('check_no_mask')   # FX: a leaf call in this module (it branches on its arguments)


class CBSA(GridAwareAttention):
    """CBSA attention, a drop-in for timm's ``Attention`` (``attn_layer='cbsa'``).

    Args: timm's ``Attention`` arguments (``base.ProjectedAttention``; ``qkv`` is the single projection Uᵀ, q = k =
    v) and the pooling arguments of ``GridAwareAttention`` (``rep_grid``, ``legacy_pool``: None takes a registered
    'cbsa_r4'-style name's grid or the model entrypoint's defaults; ``grid_size``, ``num_prefix_tokens``,
    ``num_trailing_tokens``), with ``backend``: the implementation of the operator: 'eager' (the reference),
    'fused', 'sdpa', 'xformers', 'triton', or 'auto' ('triton' on CUDA where it runs, else 'fused'); None: the
    default of ``config.py`` ('auto' unless set). ``impl`` (in the repr) is what runs: chosen now and whenever the
    layer moves to another device, from static checks (``ops.contract_broadcast.select``). ``attn_drop`` drops
    entries of the extraction matrix A (it forces the eager path while training).

    Parameters: ``qkv`` (Uᵀ), ``norm`` (qk_norm), ``step_rep`` (η) and ``step_x`` (κ), per head and sign free,
    ``norm_out`` (scale_norm), ``proj`` (the over-parameterised U_k, the paper's ``to_out``).

    Shapes: forward(x: (B, N, C)) -> (B, N, C), N = prefix tokens + H_p*W_p patch tokens + trailing tokens.

    num_heads, rep_grid and legacy_pool travel in the state dict and are checked on load (``settings.py``).
    """
    attn_name = 'cbsa'
    step_init = 'randn'

    def select_impl(self) -> None:
        """Choose the operator's implementation for this layer's device, head width and m (static checks)."""
        device = self.qkv.weight.device
        self.impl, why = select(self.backend, self.head_dim, self.num_representatives, device)
        self.impl_note = '; '.join(why)
        if why:
            warn_once(('select', self.backend, device.type, self.impl_note),
                      'CBSA: backend %r cannot run here (%s); using %r.', self.backend, self.impl_note, self.impl)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> (B, H, N, d) projected tokens W = U_kᵀ Z (after qk_norm)."""
        return self.norm(split_heads(self.qkv(x), self.num_heads))

    def contract_and_broadcast(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The reference (eager) path, ``naive.py`` with attention dropout on A. w: (B, H, N, d) tokens,
        r: (B, H, m, d) Q_ini -> (B, H, N, d)."""
        attn = self.attn_drop(extraction(r, w, self.scale))               # A (B, H, m, N); timm's hook point
        return update_contract_broadcast(attn, w, r, self.step_rep, self.step_x, self.scale)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            grid_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        check_no_mask(attn_mask, is_causal)
        w = self.project(x)                                       # (B, H, N, d)
        if torch.jit.is_scripting():
            y = self.contract_and_broadcast(w, self.representatives(w, grid_size))
        elif self.impl == 'eager' or (self.training and self.attn_drop.p > 0) or is_exporting():
            # the reference: the only path with attention dropout, and plain ops for every exporter
            y = self.contract_and_broadcast(w, self.representatives(w, grid_size))
        else:
            # the operator pools the representatives itself (block by block / inside the kernels)
            self.check_strict()
            y = contract_and_broadcast(w, self.step_rep, self.step_x, self.scale,
                                       pool=self.pool_spec(x.shape[1], grid_size), impl=self.impl)
        return self.output(y)
