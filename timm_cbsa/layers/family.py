"""The CBSA family: attention operators the paper (§3.3, Table 2/4, Fig. 9) obtains from CBSA by choosing the
representatives, the extraction and the contraction — as functions (the reductions) and as timm attention layers.

Notation, per head / subspace k with W = U_kᵀZ written token-major (rows are tokens, shape N × p):

    Q  (m × p)   representatives U_kᵀQ, row-major
    A  (N × m)   the paper's A_k: extraction coefficients, U_kᵀQ = U_kᵀZ A_k
    eq. (7)      CBSA_k = Q (I + α QᵀQ)⁻¹ Aᵀ  in the paper's column layout, α = p / (m ε²);
                 row-major: out = A (I_m + α Q Qᵀ)⁻¹ Q                        ``contract(Q, 'exact')``
    eq. (8)      out = A softmax(Q Qᵀ s) Q                                     ``contract(Q, 'softmax')``

``contract_and_broadcast_general(W, Q, A, contraction=..., broadcast=...)`` evaluates these with Q and A given
explicitly. The special cases (tests/layers/test_family.py checks each one numerically in float64):

* softmax / MSSA: Q = W, A = I_N (m = N), eq. (8)  →  softmax(W Wᵀ s) W, i.e. softmax attention with q = k = v;
* linear attention: per-head SVD W = R Σ Lᵀ (the paper's U_kᵀZ = L Σ Rᵀ), Q = Σ Lᵀ (m = p), A = R, eq. (7)
  → eq. (12): F(WᵀW) applied to every token, F(λ) = ε²/(ε² + λ) on the eigenvalues of the p × p covariance
  (α = p/(m ε²) = 1/ε² because m = p);
* channel attention / TSSA: fixed orthogonal representatives (U_k = L_k: the channels are the principal directions)
  → eq. (13): every channel i of head k is rescaled by f(‖u_kiᵀZ‖²);
* agent attention: pooled representatives with the contraction step removed.

Layers, each with timm's ``Attention`` constructor signature and registered in ``timm.models.vision_transformer.
ATTN_LAYERS`` by ``import timm_cbsa`` (so ``create_model('vit_...', attn_layer=NAME)`` works and ``save_for_hf``
can serialise the name):

=============  ======================  ===========  ==========================================================
ATTN name      class                   projections  operator
=============  ======================  ===========  ==========================================================
'cbsa'         ``CBSA`` (cbsa.py)      1 (q=k=v)    eq. (8) / Algorithm 1
'cbsa_star'    ``CBSAStar``            3 (q, k, v)  CBSA*: pooled queries, extraction, update, contraction
'agent'        ``AgentAttention``      1 (q=k=v)    CBSA∨: pooled reps, extraction, no contraction, softmax
                                                    broadcast over the representatives (Agent Attention)
'agent_qkv'    ``AgentAttentionQKV``   3 (q, k, v)  the same with three projections (released adaptation code)
'mssa'         ``MSSA``                1 (q=k=v)    CRATE's MSSA: softmax(W Wᵀ s) W
'tssa'         ``TSSA``                1            ToST's token statistics self-attention (channel attention)
'linear'       ``LinearAttention``     3 (q, k, v)  kernelised linear attention, φ = elu + 1 (Katharopoulos)
=============  ======================  ===========  ==========================================================

The pooled layers ('cbsa', 'cbsa_star', 'agent', 'agent_qkv') are also registered with a fixed representative grid,
'NAME_r1' … 'NAME_r16' (layers/named.py), for ViTs built by string. Every layer records the settings that change its
function without changing a parameter's shape (num_heads, rep_grid, legacy_pool, broadcast) in its state dict
(layers/settings.py).

The constructor (timm's signature), the projections and their parameter names are ``base.ProjectedAttention``'s;
the pooled layers add the pooling arguments of ``layout.GridAwareAttention``. Single-projection layers are named like
``CBSA`` (``qkv`` = Uᵀ of shape C × C, ``norm``, ``norm_out``); three-projection layers like timm's ``Attention``
(``qkv`` of shape 3C × C, ``q_norm``, ``k_norm``, ``norm``), so a pretrained ViT's attention weights load into them
unchanged. Softmax statistics are float32 for half inputs.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.jit import Final

from timm.layers import use_fused_attn
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from ..ops.contract_broadcast.naive import attention_weights, contraction, extraction, update
from ..ops.tracing import fx_leaf
from .base import ProjectedAttention, check_no_mask
from .layout import GridAwareAttention
from .settings import BROADCASTS

__all__ = [
    'contract', 'contract_and_broadcast_general', 'channel_rescale_eq13', 'principal_direction_attention_eq12',
    'agent_broadcast',
    'MSSA', 'TSSA', 'LinearAttention', 'AgentAttention', 'AgentAttentionQKV', 'CBSAStar', 'FAMILY_ATTN_LAYERS',
]

torch.fx.wrap('check_no_mask')   # FX: a leaf call in this module (it branches on its arguments)


# --------------------------------------------------------------------------------------------------------------------
# functional forms (eq. 7 / 8 with explicit representatives and extraction)
# --------------------------------------------------------------------------------------------------------------------

def contract(q: torch.Tensor, mode: Optional[str] = 'softmax', scale: Optional[float] = None,
             eps: float = 1.0) -> torch.Tensor:
    """Contraction of the representatives ``q`` (..., m, p) (rows are representatives).

    mode: 'exact' → (I_m + α Q Qᵀ)⁻¹ Q with α = p / (m ε²), the bracket of eq. (7) (row-major);
          'softmax' → softmax(Q Qᵀ s) Q, eq. (8) (s = p^-0.5 unless ``scale`` is given);
          None / 'none' → Q (no contraction: agent attention).
    """
    if mode is None or mode == 'none':
        return q
    m, p = q.shape[-2], q.shape[-1]
    if mode == 'softmax':
        return contraction(q, p ** -0.5 if scale is None else scale)
    if mode == 'exact':
        alpha = p / (m * eps ** 2)
        gram = alpha * (q @ q.transpose(-2, -1))
        eye = torch.eye(m, dtype=q.dtype, device=q.device)
        return torch.linalg.solve(eye + gram, q)
    raise ValueError(f"Unknown contraction {mode!r}; choose 'exact', 'softmax' or None.")


def contract_and_broadcast_general(
        w: torch.Tensor,
        q: torch.Tensor,
        a: torch.Tensor,
        contraction: Optional[str] = 'softmax',
        broadcast: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        eps: float = 1.0,
) -> torch.Tensor:
    """CBSA of eq. (7) / (8) for one subspace per head, with the representatives and extraction given explicitly.

    Args:
        w: (..., N, p) projected tokens U_kᵀZ (token-major). Only its shape is used: the representatives already
           carry the tokens (U_kᵀQ = U_kᵀZ A_k); it is accepted so the call reads like the paper.
        q: (..., m, p) representatives U_kᵀQ.
        a: (..., N, m) extraction coefficients A_k; the broadcast is A_k (each token receives Σ_j A[i, j] c_j).
        contraction: 'exact' (eq. 7), 'softmax' (eq. 8) or None (no contraction).
        broadcast: optional (..., N, m) matrix used instead of A_k for the broadcast (agent-style broadcast).
        scale, eps: softmax scale (default p^-0.5) and ε of the coding rate (exact mode).
    Returns:
        (..., N, p): per-head output before U_k (the output projection) is applied.
    """
    if a.shape[-2] != w.shape[-2] or a.shape[-1] != q.shape[-2]:
        raise ValueError(f'A must be N x m = {w.shape[-2]} x {q.shape[-2]}, got {tuple(a.shape[-2:])}.')
    c = contract(q, contraction, scale=scale, eps=eps)
    b = a if broadcast is None else broadcast
    return b @ c


def principal_direction_attention_eq12(w: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Eq. (12), right-hand side evaluated as a p × p matrix function: W ↦ W F(WᵀW), F(λ) = ε² / (ε² + λ).

    (Row-major form of U_k F((U_kᵀZ)(U_kᵀZ)ᵀ) U_kᵀZ.) Computed from the eigen-decomposition of the covariance, not
    from an SVD of W, so it is independent of how the representatives are built. w: (..., N, p).
    """
    cov = w.transpose(-2, -1) @ w                                  # (..., p, p)
    lam, vec = torch.linalg.eigh(cov)
    f = eps ** 2 / (eps ** 2 + lam)
    return w @ (vec * f.unsqueeze(-2)) @ vec.transpose(-2, -1)


def channel_rescale_eq13(w: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Eq. (13): D_k U_kᵀZ with D_k = Diag[f(‖u_kiᵀZ‖²)], f(λ) = ε² / (ε² + λ); w: (..., N, p) → (..., N, p)."""
    energy = (w * w).sum(dim=-2, keepdim=True)                     # (..., 1, p): second moment of each channel
    return w * (eps ** 2 / (eps ** 2 + energy))


def agent_broadcast(q: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax over the m representatives of q rᵀ s: (..., N, m), each token's distribution over representatives."""
    return attention_weights(q, r, scale)


@fx_leaf
def float32_if_half(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 → float32 for reductions over tokens; other dtypes unchanged (FX: a leaf call)."""
    if t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        return t.float()
    return t


torch.fx.wrap('float32_if_half')


# --------------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------------

class MSSA(ProjectedAttention):
    """CRATE's multi-head subspace self-attention (``attn_layer='mssa'``): softmax attention with q = k = v = Uᵀz.

    out = proj( concat_k softmax(W_k W_kᵀ s) W_k ). CBSA with self-expressed representatives (Q = Z, A = I).
    Unlike the pooled layers it honours ``attn_mask`` / ``is_causal`` (fused through torch SDPA when timm's fused
    attention is on).
    """
    fused_attn: Final[bool]

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.fused_attn = use_fused_attn()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        w, _, _ = self.project(x)
        if self.fused_attn:
            y = F.scaled_dot_product_attention(
                w, w, w, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.,
                is_causal=is_causal, scale=self.scale)
        else:
            wf = w.float() if w.dtype == torch.float16 else w          # fp16 logits can overflow
            attn = (wf * self.scale) @ wf.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(w.shape[2], attn, attn_mask, is_causal))
            if w.dtype in (torch.float16, torch.bfloat16):               # float32 softmax statistics
                attn = attn.softmax(dim=-1, dtype=torch.float32).to(w.dtype)
            else:
                attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            y = attn @ w
        return self.output(y)


class TSSA(ProjectedAttention):
    """ToST's token statistics self-attention (``attn_layer='tssa'``), channel attention of eq. (13).

    Per head k, with W the projected tokens and Π (B, K, N) a soft assignment of tokens to heads:
        Π      = softmax over heads of  temp_k · Σ_i (W normalised over tokens)²
        D_k    = Diag[ 1 / (1 + Σ_n π̂_kn w_kni²) ],  π̂_k = Π_k / Σ_n Π_kn      (per-channel second moments)
        out_k  = − (Π_k ⊙ W_k) D_k
    With one head (Π ≡ 1) this is −W F, F = diag(ε² / (ε² + ‖w_i‖²)) with ε² = N, i.e. −eq. (13) (tested).
    No masks; no pooled representatives, so no patch grid is needed.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        ref = self.proj.weight
        self.temp = nn.Parameter(torch.ones(num_heads, 1, device=ref.device, dtype=ref.dtype))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        check_no_mask(attn_mask, is_causal)
        w, _, _ = self.project(x)                                  # (B, H, N, d)
        wf = float32_if_half(w)
        energy = F.normalize(wf, dim=-2).pow(2).sum(-1)            # (B, H, N)
        pi = (energy * self.temp.to(wf.dtype)).softmax(dim=1)      # membership of each token over the heads
        pi_hat = pi / (pi.sum(dim=-1, keepdim=True) + 1e-8)
        second = pi_hat.unsqueeze(-2) @ wf.pow(2)                  # (B, H, 1, d) weighted channel second moments
        gain = self.attn_drop(1. / (1. + second))
        y = -(wf * pi.unsqueeze(-1)) * gain
        return self.output(y.to(w.dtype))


class LinearAttention(ProjectedAttention):
    """Kernelised linear attention (``attn_layer='linear'``), the linear-attention baseline of the paper's Fig. 9.

    φ(x) = elu(x) + 1;  out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + 1e-6)   (Katharopoulos et al. 2020)

    Three projections in timm's layout (``qkv`` 3C × C, ``q_norm``, ``k_norm``, ``proj``), so ``convert(model,
    'linear')`` keeps a pretrained ViT's weights unchanged. Cost O(N d²) per head. The reductions are in float32 for
    half inputs. The paper does not say which linear attention it used; this is the standard one. (The linear
    attention *derived* from CBSA, eq. (12), is ``principal_direction_attention_eq12``.) No masks.
    ``attn_drop`` is kept for the signature; there is no attention matrix to drop.
    """

    shared_qkv = False

    def __init__(self, dim: int, num_heads: int = 8, *, eps: float = 1e-6, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        check_no_mask(attn_mask, is_causal)
        q, k, v = self.project(x)
        dtype = v.dtype
        q, k, v = float32_if_half(q), float32_if_half(k), float32_if_half(v)
        q, k = F.elu(q) + 1., F.elu(k) + 1.
        kv = k.transpose(-2, -1) @ v                               # (B, H, d, d)
        z = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)      # (B, H, N, 1)
        y = (q @ kv) / (z + self.eps)
        return self.output(y.to(dtype))


class _PooledQueryAttention(GridAwareAttention):
    """The agent-style layers: representatives R pooled from the queries read the tokens (extraction A =
    softmax_N(R kᵀ s)); each token then reads the representatives (``broadcast='softmax'``: B = softmax_m(q Rᵀ s))
    or receives through Aᵀ (``broadcast='extraction'``, recorded in the state dict). Subclasses give the middle
    (``attend``)."""
    SETTINGS = GridAwareAttention.SETTINGS + ('broadcast',)

    def __init__(self, dim: int, num_heads: int = 8, *, broadcast: str = 'softmax', **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if broadcast not in BROADCASTS:
            raise ValueError(f"broadcast must be one of {BROADCASTS}, got {broadcast!r}.")
        self.broadcast = broadcast

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        check_no_mask(attn_mask, is_causal)
        q, k, v = self.project(x)
        return self.output(self.attend(q, k, v, self.representatives(q, grid_size)))

    def broadcast_matrix(self, q: torch.Tensor, r: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """(B, H, N, m): B = softmax_m(q Rᵀ s), or Aᵀ for ``broadcast='extraction'``."""
        return agent_broadcast(q, r, self.scale) if self.broadcast == 'softmax' else attn.transpose(-2, -1)


class AgentAttention(_PooledQueryAttention):
    """CBSA∨ / Agent Attention (``attn_layer='agent'``): CBSA without the contraction step.

        R   = pool(q)                                   m representatives (agents): pooled queries
        A   = softmax_N(R kᵀ s)                         extraction (m × N)
        V_a = A v                                       extracted representatives (no Q_ini residual, no η)
        B   = softmax_m(q Rᵀ s)                         broadcast: each token's distribution over representatives
        out = proj( concat_k B V_a )

    This is what the released ViT-adaptation code computes (paper §3.4; no new parameters). ``broadcast=
    'extraction'`` uses Aᵀ instead of B (the paper's footnote 8: with q = k = v the extraction matrix can broadcast).
    ``'agent'`` has one projection (q = k = v = Uᵀz, as in the paper's Table 4 fair comparison);
    ``'agent_qkv'`` / ``AgentAttentionQKV`` keeps three (``convert(model, 'agent')``).
    """
    attn_name = 'agent'

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, N, d), r (B, H, m, d) -> (B, H, N, d)."""
        if self.broadcast == 'softmax' and self.runs_sdpa():
            va = F.scaled_dot_product_attention(r, k, v, scale=self.scale)
            return F.scaled_dot_product_attention(q, r, va, scale=self.scale)
        attn = self.attn_drop(extraction(r, k, self.scale))        # A (B, H, m, N)
        return self.broadcast_matrix(q, r, attn) @ (attn @ v)      # B V_a


class AgentAttentionQKV(AgentAttention):
    """``AgentAttention`` with three projections q, k, v (``attn_layer='agent_qkv'``; target of convert 'agent')."""
    attn_name = 'agent_qkv'
    shared_qkv = False


class CBSAStar(_PooledQueryAttention):
    """CBSA* (``attn_layer='cbsa_star'``): CBSA with the three projections of MHSA, contraction kept (paper Fig. 9).

        R0  = pool(q)                                   pooled queries
        A   = softmax_N(R0 kᵀ s)                        extraction (m × N)
        R   = R0 + η ⊙ A v                              representative update (η per head)
        C   = softmax_m(R Rᵀ s) R                       contraction among the representatives
        out = proj( concat_k κ ⊙ B C ),  B = softmax_m(q Rᵀ s)   (``broadcast='softmax'``, default)
                                   or    B = Aᵀ                   (``broadcast='extraction'``, eq. 8's broadcast)

    The paper's CBSA* code is not released; this is the released CBSA∨ code with its two commented-out lines
    (``Q = Q + Q_delta``, ``attention(Q, Q, Q)``) enabled, plus learnable per-head step sizes η, κ initialised to 1
    (so at initialisation it equals those two lines exactly). Parameter names: timm's (``qkv`` 3C × C, ``q_norm``,
    ``k_norm``, ``norm``, ``proj``) plus ``step_rep`` (η) and ``step_x`` (κ) as in ``CBSA``.
    """
    attn_name = 'cbsa_star'
    shared_qkv = False
    step_init = 'ones'

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, N, d), r0 (B, H, m, d) -> (B, H, N, d)."""
        if self.broadcast == 'softmax' and self.runs_sdpa():
            r = r0 + self.step_rep * F.scaled_dot_product_attention(r0, k, v, scale=self.scale)
            c = F.scaled_dot_product_attention(r, r, r, scale=self.scale)
            return self.step_x * F.scaled_dot_product_attention(q, r, c, scale=self.scale)
        attn = self.attn_drop(extraction(r0, k, self.scale))       # A (B, H, m, N)
        r = update(attn, v, r0, self.step_rep)                     # R0 + η·A v
        c = contraction(r, self.scale)                             # softmax(R Rᵀ s) R, eq. (8)
        return self.step_x * (self.broadcast_matrix(q, r, attn) @ c)


# ATTN_LAYERS names registered by ``import timm_cbsa`` (besides 'cbsa')
FAMILY_ATTN_LAYERS = {
    'cbsa_star': CBSAStar,
    'agent': AgentAttention,
    'agent_qkv': AgentAttentionQKV,
    'mssa': MSSA,
    'tssa': TSSA,
    'linear': LinearAttention,
}
