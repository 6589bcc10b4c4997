"""The CBSA family as modes of one operator: each reduction of the paper (§3.3, Table 2) is checked numerically in
float64, computing both sides independently; and each family layer against a direct computation of its formula."""
import math

import pytest
import torch
import torch.nn.functional as F

import timm_cbsa  # noqa: F401  (registers the ATTN_LAYERS names)
from timm.models.vision_transformer import ATTN_LAYERS
from timm_cbsa.layers.family import (
    MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, LinearAttention, channel_rescale_eq13, contract,
    contract_and_broadcast_general, principal_direction_attention_eq12,
)
from timm_cbsa.layers.cbsa import CBSA

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _softmax(x):
    """Softmax over the last dim written out (exp / sum), independent of torch.softmax."""
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _identity_io(mod, dim):
    """Make the input / output projections identities so the layer's core operator is exposed."""
    with torch.no_grad():
        n = mod.qkv.weight.shape[0] // dim
        mod.qkv.weight.copy_(torch.eye(dim, dtype=DT).repeat(n, 1))
        if mod.qkv.bias is not None:
            mod.qkv.bias.zero_()
        mod.proj.weight.copy_(torch.eye(dim, dtype=DT))
        mod.proj.bias.zero_()
    return mod


def test_registered_names_are_classes_with_timm_signature():
    for name in ('cbsa', 'cbsa_star', 'agent', 'agent_qkv', 'mssa', 'tssa', 'linear'):
        cls = ATTN_LAYERS[name]
        assert isinstance(cls, type)
        m = cls(32, num_heads=4, qkv_bias=True, qk_norm=True, scale_norm=True, proj_bias=True, attn_drop=0.,
                proj_drop=0., norm_layer=torch.nn.LayerNorm, device='cpu', dtype=torch.float32)
        assert isinstance(m.proj, torch.nn.Linear) and isinstance(m.qkv, torch.nn.Linear)


# ---------------------------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------------------------

def test_eq7_is_the_gradient_of_the_representatives_coding_rate():
    """§2.3: ∂/∂Z ½ logdet(I + α XᵀX), X = U_kᵀZ A_k (A_k fixed) = α · eq. (7). Autograd vs the closed form."""
    torch.manual_seed(0)
    p, N, m, eps = 5, 17, 4, 0.8
    alpha = p / (m * eps ** 2)
    W = torch.randn(N, p, dtype=DT, requires_grad=True)          # U_kᵀZ, token-major
    A = torch.rand(N, m, dtype=DT)
    X = (W.T @ A)                                                   # p × m (paper's layout)
    R = 0.5 * torch.logdet(torch.eye(m, dtype=DT) + alpha * X.T @ X)
    (grad,) = torch.autograd.grad(R, W)
    Q = (W.T @ A).T.detach()                                        # representatives, row-major m × p
    closed = contract_and_broadcast_general(W.detach(), Q, A, contraction='exact', eps=eps)
    torch.testing.assert_close(grad, alpha * closed, **TOL)


def test_mssa_is_cbsa_with_self_expressed_representatives():
    """Q = Z (m = N), A = I in eq. (8) → softmax attention with q = k = v; and the MSSA layer computes it."""
    torch.manual_seed(1)
    B, H, N, d = 2, 3, 11, 4
    W = torch.randn(B, H, N, d, dtype=DT)
    eye = torch.eye(N, dtype=DT).expand(B, H, N, N)
    general = contract_and_broadcast_general(W, W, eye, contraction='softmax')
    s = d ** -0.5
    direct = _softmax((W @ W.transpose(-1, -2)) * s) @ W         # softmax(q kᵀ s) v with q = k = v = W
    torch.testing.assert_close(general, direct, **TOL)

    layer = MSSA(H * d, num_heads=H, qkv_bias=True, dtype=DT).eval()
    x = torch.randn(B, N, H * d, dtype=DT)
    w = (x @ layer.qkv.weight.T + layer.qkv.bias).reshape(B, N, H, d).transpose(1, 2)
    heads = contract_and_broadcast_general(w, w, eye, contraction='softmax')
    expected = heads.transpose(1, 2).reshape(B, N, H * d) @ layer.proj.weight.T + layer.proj.bias
    for fused in (True, False):
        layer.fused_attn = fused
        torch.testing.assert_close(layer(x), expected, **TOL)


def test_mssa_masks_match_direct_masked_softmax():
    torch.manual_seed(2)
    B, N, C, H = 2, 7, 12, 3
    layer = _identity_io(MSSA(C, num_heads=H, qkv_bias=True, dtype=DT), C).eval()
    x = torch.randn(B, N, C, dtype=DT)
    w = x.reshape(B, N, H, C // H).transpose(1, 2)
    logits = (w @ w.transpose(-1, -2)) * (C // H) ** -0.5
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    expected = (_softmax(logits.masked_fill(~causal, -math.inf)) @ w).transpose(1, 2).reshape(B, N, C)
    for fused in (True, False):
        layer.fused_attn = fused
        torch.testing.assert_close(layer(x, is_causal=True), expected, **TOL)
        torch.testing.assert_close(layer(x, attn_mask=causal), expected, **TOL)


@pytest.mark.parametrize('eps', [0.5, 1.0, 3.0])
def test_principal_direction_representatives_give_eq12(eps):
    """Per-head SVD U_kᵀZ = L Σ Rᵀ; Q = LΣ (m = p), A = R in the exact eq. (7) (α = p/(mε²) = 1/ε²) equals eq. (12),
    F(WᵀW) applied to the tokens with F(λ) = ε²/(ε² + λ) — evaluated from eigh and from a matrix inverse."""
    torch.manual_seed(3)
    B, H, N, p = 2, 3, 23, 6
    W = torch.randn(B, H, N, p, dtype=DT) * torch.linspace(0.3, 3., p, dtype=DT)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)             # W = R Σ Lᵀ: R = U (N×p), L = Vhᵀ
    Q = S.unsqueeze(-1) * Vh                                        # rows of (LΣ)ᵀ = Σ Lᵀ
    lhs = contract_and_broadcast_general(W, Q, U, contraction='exact', eps=eps)
    eq12_eigh = principal_direction_attention_eq12(W, eps)
    eq12_inv = eps ** 2 * W @ torch.linalg.inv(eps ** 2 * torch.eye(p, dtype=DT) + W.transpose(-1, -2) @ W)
    torch.testing.assert_close(lhs, eq12_eigh, **TOL)
    torch.testing.assert_close(lhs, eq12_inv, **TOL)
    # the left-hand side really is "linear": the key-value product WᵀW (p × p) is all it needs of the other tokens
    assert not torch.allclose(lhs, W)


@pytest.mark.parametrize('eps', [0.7, 2.0])
def test_fixed_orthogonal_representatives_give_eq13(eps):
    """U_k = L_k (channels are the principal directions: U_kᵀZ has orthogonal rows) → fixed representatives Q = Σ
    (diagonal), A = R; eq. (7) is then a per-channel rescaling by f(‖u_kiᵀZ‖²) = ε²/(ε² + ‖u_kiᵀZ‖²): eq. (13)."""
    torch.manual_seed(4)
    B, H, N, p = 2, 2, 19, 5
    R, _ = torch.linalg.qr(torch.randn(B, H, N, p, dtype=DT))     # orthonormal columns (N × p)
    sig = torch.rand(B, H, p, dtype=DT) * 3 + 0.1
    W = R * sig.unsqueeze(-2)                                       # channel i = σ_i r_i: orthogonal channels
    Q = torch.diag_embed(sig)                                       # Σ Lᵀ with L = I: fixed, axis-aligned
    lhs = contract_and_broadcast_general(W, Q, R, contraction='exact', eps=eps)
    direct = W * (eps ** 2 / (eps ** 2 + sig ** 2)).unsqueeze(-2)  # Diag[f(σ_i²)] per channel
    torch.testing.assert_close(lhs, direct, **TOL)
    torch.testing.assert_close(channel_rescale_eq13(W, eps), direct, **TOL)
    # for non-orthogonal channels eq. (13) is only the diagonal approximation of eq. (12)
    Wg = torch.randn(B, H, N, p, dtype=DT)
    assert not torch.allclose(channel_rescale_eq13(Wg, eps), principal_direction_attention_eq12(Wg, eps))


def test_tssa_single_head_is_minus_eq13_with_eps2_equal_N():
    """With one head ToST's Π ≡ 1, so TSSA(Z) = −D U ᵀZ with D = Diag[1/(1 + ‖w_i‖²/N)] = eq. (13) with ε² = N."""
    torch.manual_seed(5)
    B, N, C = 3, 13, 6
    layer = _identity_io(TSSA(C, num_heads=1, qkv_bias=True, dtype=DT), C).eval()
    x = torch.randn(B, N, C, dtype=DT)
    expected = -channel_rescale_eq13(x, eps=math.sqrt(N))
    torch.testing.assert_close(layer(x), expected, rtol=1e-8, atol=1e-10)   # ToST's +1e-8 in the Π normaliser


def test_tssa_multi_head_matches_direct_formula():
    torch.manual_seed(6)
    B, N, C, H = 2, 9, 8, 4
    layer = TSSA(C, num_heads=H, qkv_bias=True, dtype=DT).eval()
    with torch.no_grad():
        layer.temp.copy_(torch.rand(H, 1, dtype=DT) * 3)
    x = torch.randn(B, N, C, dtype=DT)
    w = (x @ layer.qkv.weight.T + layer.qkv.bias).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    out = torch.empty_like(w)
    for b in range(B):
        energy = torch.stack([((w[b, h] / w[b, h].norm(dim=0)) ** 2).sum(-1) for h in range(H)])   # (H, N)
        pi = _softmax((energy * layer.temp).T).T                                                  # over heads
        for h in range(H):
            weights = pi[h] / (pi[h].sum() + 1e-8)
            second = (weights[:, None] * w[b, h] ** 2).sum(0)
            out[b, h] = -(w[b, h] * pi[h][:, None]) / (1 + second)
    expected = out.permute(0, 2, 1, 3).reshape(B, N, C) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(layer(x), expected, **TOL)


def _pool(t, grid, rep):
    """Average of each k×k patch block (independent of adaptive pooling; grid divisible by rep)."""
    B, H, N, d = t.shape
    g = t[:, :, N - grid * grid:].reshape(B, H, grid, grid, d)
    k = grid // rep
    return g.reshape(B, H, rep, k, rep, k, d).mean(dim=(3, 5)).reshape(B, H, rep * rep, d)


def test_agent_is_cbsa_without_contraction():
    """Agent attention softmax(q Aᵀ)softmax(A kᵀ)v with pooled agents A equals the general operator with the
    contraction removed; CBSA is the same operator with the contraction kept (plus its step sizes)."""
    torch.manual_seed(7)
    B, N0, grid, rep, C, H = 2, 1, 4, 2, 12, 3
    N, d = N0 + grid * grid, C // H
    s = d ** -0.5
    x = torch.randn(B, N, C, dtype=DT)

    agent = AgentAttention(C, num_heads=H, qkv_bias=True, rep_grid=rep, grid_size=(grid, grid), dtype=DT).eval()
    w = (x @ agent.qkv.weight.T + agent.qkv.bias).reshape(B, N, H, d).transpose(1, 2)
    agents = _pool(w, grid, rep)
    ext = _softmax((agents @ w.transpose(-1, -2)) * s)                 # (B, H, m, N)
    direct = _softmax((w @ agents.transpose(-1, -2)) * s) @ (ext @ w)  # Agent Attention with q = k = v
    general = contract_and_broadcast_general(
        w, ext @ w, ext.transpose(-1, -2), contraction=None, broadcast=_softmax((w @ agents.transpose(-1, -2)) * s))
    torch.testing.assert_close(general, direct, **TOL)
    proj = lambda y: y.transpose(1, 2).reshape(B, N, C) @ agent.proj.weight.T + agent.proj.bias  # noqa: E731
    torch.testing.assert_close(agent(x), proj(direct), **TOL)

    cbsa = CBSA(C, num_heads=H, qkv_bias=True, rep_grid=rep, grid_size=(grid, grid), dtype=DT).eval()
    with torch.no_grad():
        cbsa.qkv.load_state_dict(agent.qkv.state_dict())
        cbsa.proj.load_state_dict(agent.proj.state_dict())
    reps = agents + cbsa.step_rep * (ext @ w)
    with_contraction = contract_and_broadcast_general(w, reps, ext.transpose(-1, -2), contraction='softmax')
    torch.testing.assert_close(cbsa(x), proj(cbsa.step_x * with_contraction), **TOL)
    # the contraction is what separates them
    without = contract_and_broadcast_general(w, reps, ext.transpose(-1, -2), contraction=None)
    assert not torch.allclose(with_contraction, without)


def test_contract_modes():
    torch.manual_seed(8)
    Q = torch.randn(3, 5, 4, dtype=DT)
    torch.testing.assert_close(contract(Q, None), Q)
    exact = contract(Q, 'exact', eps=2.0)
    alpha = 4 / (5 * 4.0)
    torch.testing.assert_close((torch.eye(5, dtype=DT) + alpha * Q @ Q.transpose(-1, -2)) @ exact, Q, **TOL)
    with pytest.raises(ValueError, match='contraction'):
        contract(Q, 'bogus')


# ---------------------------------------------------------------------------------------------------------------
# layers vs direct formulas
# ---------------------------------------------------------------------------------------------------------------

def _split_qkv(layer, x, H):
    B, N, C = x.shape
    qkv = x @ layer.qkv.weight.T + layer.qkv.bias
    q, k, v = qkv.split(C, dim=-1)
    f = lambda t: t.reshape(B, N, H, C // H).transpose(1, 2)  # noqa: E731
    return f(q), f(k), f(v)


@pytest.mark.parametrize('broadcast', ['softmax', 'extraction'])
def test_cbsa_star_matches_direct_formula(broadcast):
    torch.manual_seed(9)
    B, N0, grid, rep, C, H = 2, 2, 6, 3, 12, 2
    N, d = N0 + grid * grid, C // H
    s = d ** -0.5
    layer = CBSAStar(C, num_heads=H, qkv_bias=True, rep_grid=rep, grid_size=(grid, grid), broadcast=broadcast,
                     dtype=DT).eval()
    with torch.no_grad():
        layer.step_rep.copy_(torch.randn(H, 1, 1, dtype=DT))
        layer.step_x.copy_(torch.randn(H, 1, 1, dtype=DT))
    x = torch.randn(B, N, C, dtype=DT)
    q, k, v = _split_qkv(layer, x, H)
    r0 = _pool(q, grid, rep)
    ext = _softmax((r0 @ k.transpose(-1, -2)) * s)
    r = r0 + layer.step_rep * (ext @ v)
    c = _softmax((r @ r.transpose(-1, -2)) * s) @ r
    b = _softmax((q @ r.transpose(-1, -2)) * s) if broadcast == 'softmax' else ext.transpose(-1, -2)
    y = layer.step_x * (b @ c)
    expected = y.transpose(1, 2).reshape(B, N, C) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_agent_qkv_matches_direct_formula_and_sdpa_path():
    torch.manual_seed(10)
    B, N0, grid, rep, C, H = 2, 5, 4, 2, 16, 4
    N, d = N0 + grid * grid, C // H
    s = d ** -0.5
    layer = AgentAttentionQKV(C, num_heads=H, qkv_bias=True, rep_grid=rep, grid_size=(grid, grid), dtype=DT).eval()
    x = torch.randn(B, N, C, dtype=DT)
    q, k, v = _split_qkv(layer, x, H)
    a = _pool(q, grid, rep)
    y = _softmax((q @ a.transpose(-1, -2)) * s) @ (_softmax((a @ k.transpose(-1, -2)) * s) @ v)
    expected = y.transpose(1, 2).reshape(B, N, C) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(layer(x), expected, **TOL)
    for cls in (AgentAttentionQKV, CBSAStar):
        lay = cls(C, num_heads=H, qkv_bias=True, rep_grid=rep, grid_size=(grid, grid), dtype=DT).eval()
        eager = lay(x)
        lay.backend = 'sdpa'
        torch.testing.assert_close(lay(x), eager, **TOL)


def test_linear_attention_matches_quadratic_form():
    torch.manual_seed(11)
    B, N, C, H = 2, 10, 12, 3
    layer = LinearAttention(C, num_heads=H, qkv_bias=True, dtype=DT).eval()
    x = torch.randn(B, N, C, dtype=DT)
    q, k, v = _split_qkv(layer, x, H)
    sim = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)          # N × N kernel, then normalise per row
    y = (sim @ v) / (sim.sum(-1, keepdim=True) + layer.eps)
    expected = y.transpose(1, 2).reshape(B, N, C) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(layer(x), expected, **TOL)


@pytest.mark.parametrize('name', ['cbsa_star', 'agent', 'agent_qkv', 'mssa', 'tssa', 'linear'])
def test_half_precision(name):
    """bfloat16 stays close to float32; float16 with large activations stays finite (float32 logits / statistics)."""
    torch.manual_seed(12)
    kw = dict(rep_grid=2, grid_size=(4, 4)) if name in ('cbsa_star', 'agent', 'agent_qkv') else {}
    layer = ATTN_LAYERS[name](32, num_heads=4, qkv_bias=True, **kw).eval()
    x = torch.randn(2, 17, 32)
    ref = layer(x)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    big = layer.to(torch.float16)(x.to(torch.float16) * 60)     # fp16 products of these overflow 65504
    assert big.dtype == torch.float16 and torch.isfinite(big).all()


def test_pooled_layers_refuse_masks_and_missing_grid():
    layer = AgentAttention(16, num_heads=2, rep_grid=2)
    x = torch.randn(1, 17, 16)
    with pytest.raises(ValueError, match='patch grid'):
        layer(x)
    layer.grid_size = (4, 4)
    with pytest.raises(ValueError, match='attn_mask'):
        layer(x, is_causal=True)
    with pytest.raises(ValueError, match="broadcast"):
        CBSAStar(16, num_heads=2, broadcast='nope')


@pytest.mark.parametrize('name', ['cbsa_star', 'agent', 'agent_qkv', 'mssa', 'tssa', 'linear'])
def test_fx_trace_and_torchscript_in_a_vit(name):
    """timm's FX feature extraction and TorchScript (set_scriptable) both work and give the eager outputs."""
    import timm
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(13)
    x = torch.randn(1, 3, 128, 128)
    model = timm.create_model('vit_tiny_patch16_224', depth=1, img_size=128, attn_layer=name).eval()
    fx = create_feature_extractor(model, {'blocks.0': 'out'}, tracer_kwargs={
        'leaf_modules': list(get_notrace_modules()), 'autowrap_functions': list(get_notrace_functions())})
    with torch.no_grad():
        assert torch.equal(fx(x)['out'], model.blocks(model._pos_embed(model.patch_embed(x))))
        with timm.layers.set_scriptable(True):
            m2 = timm.create_model('vit_tiny_patch16_224', depth=1, img_size=128, attn_layer=name).eval()
        torch.testing.assert_close(torch.jit.script(m2)(x), m2(x), rtol=1e-5, atol=1e-5)
