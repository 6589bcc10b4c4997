"""The CBSA decoder block against the paper's math written out in float64; class embeddings are never pooled; the
backends agree at the paper's m = 100; decoder FLOPs against closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_cbsa.segmentation import CBSADecoderBlock, MaskTransformer, build_decoder, create_segmenter, decoder_flops


def _windows(size: int, out: int):
    """Adaptive average pooling windows along one axis: [floor(i·size/out), ceil((i+1)·size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _pool_patches(w: torch.Tensor, grid, rep_grid) -> torch.Tensor:
    """(N_patch, d) raster patch tokens -> (m, d) window means, written with loops."""
    gh, gw = grid
    t = w.reshape(gh, gw, -1)
    reps = [t[r0:r1, c0:c1].reshape(-1, t.shape[-1]).mean(0)
            for r0, r1 in _windows(gh, rep_grid[0]) for c0, c1 in _windows(gw, rep_grid[1])]
    return torch.stack(reps)


def _reference_block(block: CBSADecoderBlock, x: torch.Tensor, grid, rep_grid) -> torch.Tensor:
    """z + W_o·concat_k(κ_k A_kᵀ C_k) + b_o for one image x (N, D), following the paper (§3.2, eq. 5-8):
    extraction A_k = softmax over tokens of (Q_ini,k W_kᵀ s); update Q_k = Q_ini,k + η_k A_k W_k;
    contraction C_k = softmax over representatives of (Q_k Q_kᵀ s) Q_k; broadcast κ_k A_kᵀ C_k."""
    attn = block.attn
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    xn = (x - mu) / torch.sqrt(var + block.norm.eps) * block.norm.weight + block.norm.bias
    w_all = xn @ attn.qkv.weight.T                                       # U^T z for all heads (no bias)
    n_patch = grid[0] * grid[1]
    d = w_all.shape[1] // attn.num_heads
    s = d ** -0.5
    outs = []
    for k in range(attn.num_heads):
        w = w_all[:, k * d:(k + 1) * d]                                  # (N, d)
        q_ini = _pool_patches(w[:n_patch], grid, rep_grid)               # patch tokens only
        a = torch.softmax(q_ini @ w.T * s, dim=1)                        # (m, N), rows sum to 1 over tokens
        q = q_ini + attn.step_rep[k, 0, 0] * (a @ w)
        c = torch.softmax(q @ q.T * s, dim=1) @ q                        # (m, d)
        outs.append(attn.step_x[k, 0, 0] * (a.T @ c))                    # (N, d)
    return x + torch.cat(outs, dim=1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize('backend', ['eager', 'fused'])
@pytest.mark.parametrize('grid,rep_grid', [((4, 5), (2, 3)), ((6, 6), (3, 3))])
def test_cbsa_block_matches_float64_math(backend, grid, rep_grid):
    torch.manual_seed(0)
    K, D, H = 5, 12, 3
    block = CBSADecoderBlock(D, H, num_classes=K, rep_grid=rep_grid, backend=backend).double()
    with torch.no_grad():
        block.attn.step_rep.normal_()
        block.attn.step_x.normal_()
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_(0, 0.1)
    x = torch.randn(2, grid[0] * grid[1] + K, D, dtype=torch.float64)
    out = block(x, grid)
    for b in range(2):
        ref = _reference_block(block, x[b], grid, rep_grid)
        torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-10)


def test_class_embeddings_are_never_pooled():
    torch.manual_seed(0)
    K, D, grid, rep_grid = 4, 8, (4, 4), (2, 2)
    block = CBSADecoderBlock(D, 2, num_classes=K, rep_grid=rep_grid, backend='eager').double()
    x = torch.randn(1, 16 + K, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 16:] += 10 * torch.randn(1, K, D, dtype=torch.float64)      # other class embeddings, same patches
    attn = block.attn
    r1 = attn.representatives(attn.project(block.norm(x)), grid)
    r2 = attn.representatives(attn.project(block.norm(x2)), grid)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)                  # Q_ini does not see them
    w = attn.project(block.norm(x))[0]                                  # (H, N, d)
    for k in range(2):
        torch.testing.assert_close(r1[0, k], _pool_patches(w[k, :16], grid, rep_grid))
    # ... but they are keys / values: the patch tokens' output depends on them
    assert not torch.allclose(block(x, grid)[:, :16], block(x2, grid)[:, :16])


def test_backends_agree_at_m100():
    """The paper's 10 x 10 = 100 representatives, class embeddings appended: eager and fused, forward and backward."""
    torch.manual_seed(0)
    feats = torch.randn(2, 32, 12, 14)
    dec = {b: build_decoder('cbsa', 32, 7, embed_dim=48, num_heads=3, rep_grid=10, backend=b) for b in ('eager', 'fused')}
    dec['fused'].load_state_dict(dec['eager'].state_dict())
    outs, grads = {}, {}
    for b, m in dec.items():
        f = feats.clone().requires_grad_()
        outs[b] = m(f)
        outs[b].square().sum().backward()
        grads[b] = (f.grad, m.blocks[0].attn.qkv.weight.grad, m.blocks[1].attn.step_rep.grad)
    assert outs['eager'].shape == (2, 7, 12, 14)
    torch.testing.assert_close(outs['fused'], outs['eager'], rtol=1e-4, atol=1e-5)
    for g1, g2 in zip(grads['fused'], grads['eager']):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)


def _mhsa_block_flops(n: int, d: int, mlp: float = 4.0) -> int:
    """2 x multiply-adds of a ViT block: qkv 3Nd², Q Kᵀ N²d, A V N²d, proj Nd², MLP 2·mlp·Nd²."""
    return 2 * (3 * n * d * d + 2 * n * n * d + n * d * d + int(2 * mlp * n * d * d))


def _cbsa_block_flops(n: int, c: int, d: int, m: int) -> int:
    """2 x multiply-adds of a CBSA layer over C-wide tokens working in d = heads x head width dimensions (paper §5):
    projections C -> d and d -> C 2NCd, extraction 2Nmd, broadcast Nmd, contraction 2m²d."""
    return 2 * (2 * n * c * d + 3 * n * m * d + 2 * m * m * d)


def test_decoder_flops_closed_form():
    """At the paper's setting (512², patch 16, 150 classes, ViT-T encoder) the counter gives the closed forms; the MHSA
    decoder is Segmenter's 4.2 GFLOPs."""
    with torch.device('meta'):
        cbsa = create_segmenter('vit_tiny_patch16_224', 150, decoder='cbsa', img_size=512)
        mhsa = create_segmenter('vit_tiny_patch16_224', 150, decoder='mhsa', img_size=512)
    n = 32 * 32 + 150
    got = decoder_flops(cbsa, 512)['blocks']
    assert got == 3 * _cbsa_block_flops(n, 192, 300, 100)
    assert math.isclose(got / 1e9, 1.5, rel_tol=0.02)        # the paper's CBT-T decoder: 1.5 GFLOPs
    got = decoder_flops(mhsa, 512)['blocks']
    assert got == 2 * _mhsa_block_flops(n, 192)
    assert math.isclose(got / 1e9, 4.2, rel_tol=0.01)


def test_decoder_options_are_checked():
    with pytest.raises(ValueError, match='rep_grid'):
        build_decoder('mhsa', 16, 3, rep_grid=4)
    with pytest.raises(ValueError, match='mlp_ratio'):
        build_decoder('cbsa', 16, 3, mlp_ratio=2.0)
    with pytest.raises(ValueError, match='Unknown decoder'):
        build_decoder('conv', 16, 3)
    with pytest.raises(ValueError, match='divisible'):
        build_decoder('mhsa', 16, 3, embed_dim=10, num_heads=3)
    with pytest.raises(ValueError, match='attn_head_dim must be a positive int'):
        build_decoder('cbsa', 16, 3, attn_head_dim=0)
    with pytest.raises(ValueError, match='not divisible.*attn_head_dim'):
        build_decoder('cbsa', 16, 3, embed_dim=10, num_heads=3, attn_head_dim=None)
    with pytest.raises(ValueError, match='attn_head_dim is an option of the CBSA'):
        MaskTransformer(16, 3, block='mhsa', attn_head_dim=8)
    block = CBSADecoderBlock(8, 2, num_classes=3, rep_grid=4)
    with pytest.raises(ValueError, match='smaller than the representative grid'):
        block(torch.randn(1, 9 + 3, 8), (3, 3))
    x = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match='tokens'):
        block(x, (4, 4))   # 16 tokens cannot be 4x4 patches + 3 class embeddings
    assert F.mse_loss(block(torch.randn(1, 16 + 3, 8), (4, 4)), torch.zeros(1, 19, 8)).isfinite()


TRITON_CASE = r'''
import json, torch
from timm_cbsa.segmentation import build_decoder
torch.manual_seed(0)
feats = torch.randn(1, 16, 12, 11, dtype=torch.float64)
dec = {b: build_decoder('cbsa', 16, 5, embed_dim=32, num_heads=2, rep_grid=10, depth=1, backend=b).double()
       for b in ('eager', 'triton')}
dec['triton'].load_state_dict(dec['eager'].state_dict())
res = {}
for b, m in dec.items():
    f = feats.clone().requires_grad_()
    out = m(f)
    out.square().sum().backward()
    res[b] = (out, f.grad, m.blocks[0].attn.step_x.grad)
print(json.dumps([float((a - b).abs().max() / b.abs().max()) for a, b in zip(res['triton'], res['eager'])]))
'''


@pytest.mark.slow
def test_triton_kernels_at_m100_with_class_embeddings():
    """The Triton kernels (Triton's CPU interpreter, float64, no fallback allowed) on the decoder's layout: 100
    representatives pooled from a 12 x 11 grid, 5 class embeddings appended; forward and gradients vs eager."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    if importlib.util.find_spec('triton') is None:
        pytest.skip('Triton is not installed')
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET='1', TIMM_CBSA_STRICT_BACKEND='1',
               PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-c', TRITON_CASE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and 'interpreter' in proc.stderr.lower() and 'numpy' in proc.stderr.lower():
        pytest.skip(f'Triton interpreter unusable here: {proc.stderr.strip().splitlines()[-1]}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(errors) < 1e-10, errors
