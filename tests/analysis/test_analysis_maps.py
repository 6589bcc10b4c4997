"""Attention maps: a known synthetic answer (the class-token map must find a bright rectangle), consistency with
timm's AttentionExtract, A·Aᵀ bookkeeping, softmax ViTs and converted layers."""
import numpy as np
import pytest
import torch

from timm_cbsa import use_backend

import timm
import timm_cbsa  # noqa: F401
from timm.utils import AttentionExtract
from timm_cbsa.analysis import (
    class_token_maps, extraction_matrix, full_attention, head_map, head_mean_map, query_attention, square_finder_model,
    synthetic_square, to_model_input, trace_model, upsample_map, map_to_mask, iou,
)


def _boxes(n=12, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(26, 36, size=2)
        t, l = rng.integers(0, 64 - h), rng.integers(0, 64 - w)
        out.append((int(t), int(l), int(t + h), int(l + w)))
    return out


def _mask_for(model, img):
    tr = trace_model(model, to_model_input(img, (64, 64), (0, 0, 0), (1, 1, 1)))
    maps = class_token_maps(tr)                         # (1, 1, 1, 8, 8)
    up = upsample_map(maps[0, 0, 0], img.shape[:2])
    return map_to_mask(up, 'otsu'), maps[0, 0, 0]


@pytest.mark.parametrize('attention', ['cbsa', 'softmax'])
def test_class_token_map_finds_the_square(attention):
    model = square_finder_model(attention)
    ious = []
    for box in _boxes():
        img, gt = synthetic_square(box=box)
        mask, _ = _mask_for(model, img)
        ious.append(iou(mask, gt))
    assert min(ious) > 0.7, ious
    assert np.mean(ious) > 0.8, ious


@pytest.mark.parametrize('attention', ['cbsa', 'softmax'])
def test_controls_fail(attention):
    box, other = (10, 26, 40, 58), (34, 2, 62, 30)          # disjoint rectangles
    img, gt = synthetic_square(box=box)
    _, gt_other = synthetic_square(box=other)
    model = square_finder_model(attention)
    mask, m = _mask_for(model, img)
    assert iou(mask, gt) > 0.7
    # the mask follows the object: scored against a rectangle elsewhere it fails
    assert iou(mask, gt_other) < 0.1
    # a spatially shuffled map (same values, patches permuted) fails
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = m.flatten()[perm].reshape(8, 8)
    assert iou(map_to_mask(upsample_map(shuffled, gt.shape), 'otsu'), gt) < 0.5
    # a class token that looks like the background selects the background, not the object
    mask_bg, _ = _mask_for(square_finder_model(attention, query='background'), img)
    assert iou(mask_bg, gt) < 0.1 and iou(mask_bg, ~gt) > 0.7
    # background-only image: nothing to find, the map is flat and the mask does not match the rectangle
    empty, _ = synthetic_square(foreground=False)
    mask_e, m_e = _mask_for(model, empty)
    assert float(m_e.max() / m_e.min()) < 1.5 < float(m.max() / m.min())
    assert iou(mask_e, gt) < 0.3


@pytest.fixture(scope='module')
def cbt():
    torch.manual_seed(0)
    return timm.create_model('cbt_tiny', img_size=64, rep_grid=4, num_classes=10).eval()


def _photo(size=64):
    skd = pytest.importorskip('skimage.data')
    return to_model_input(skd.astronaut(), (size, size))


def test_matches_timm_attention_extract_hook(cbt):
    # like timm's own Attention (TIMM_FUSED_ATTN=0), the matrix is only materialised on the eager path
    x = _photo()
    tr = trace_model(cbt, x)
    with use_backend(cbt, 'eager'):
        got = AttentionExtract(cbt, method='hook')(x)        # default '*attn_drop' modules
    assert list(got) == [f'blocks.{i}.attn.attn_drop' for i in range(12)]
    for i, layer in enumerate(tr.layers):
        assert layer.kind == 'representative'
        torch.testing.assert_close(extraction_matrix(layer), got[f'blocks.{i}.attn.attn_drop'], rtol=1e-5, atol=1e-6)
    # the fx route with timm's default names ('*attn.softmax'): the extraction softmax is a traced node
    with use_backend(cbt, 'eager'):
        fx = AttentionExtract(cbt, method='fx')(x)
    assert list(fx) == [f'blocks.{i}.attn.softmax' for i in range(12)]
    torch.testing.assert_close(fx['blocks.0.attn.softmax'], extraction_matrix(tr.layers[0]), rtol=1e-5, atol=1e-6)


def test_full_attention_bookkeeping(cbt):
    tr = trace_model(cbt, _photo())
    layer = tr.layers[3]
    a = extraction_matrix(layer)                         # (1, 3, 16, 17)
    assert a.shape == (1, 3, 16, 17)
    full = full_attention(layer)                         # (1, 3, 17, 17) = Aᵀ A
    torch.testing.assert_close(full, full.transpose(-2, -1))
    # rows of A sum to 1 over tokens, so the entries of Aᵀ A sum to m per head
    torch.testing.assert_close(full.sum((-2, -1)), torch.full((1, 3), 16.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(query_attention(layer, 0), full[:, :, 0], rtol=1e-5, atol=1e-7)
    maps = class_token_maps(tr)
    assert maps.shape == (12, 1, 3, 4, 4)
    torch.testing.assert_close(maps[3, 0], full[0, :, 0, 1:].reshape(3, 4, 4))


def test_softmax_vit_matches_attention_extract():
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=0).eval()
    x = _photo()
    tr = trace_model(vit, x)                              # works with timm's fused attention on
    assert {l.kind for l in tr.layers} == {'softmax'}
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    got = AttentionExtract(vit, method='fx')(x)
    torch.testing.assert_close(full_attention(tr.layers[5]), got['blocks.5.attn.softmax'], rtol=1e-5, atol=1e-6)
    assert class_token_maps(tr).shape == (12, 1, 3, 4, 4)


@pytest.mark.parametrize('name', ['cbsa_star', 'agent', 'mssa', 'linear'])
def test_converted_attention_layers(name):
    from timm.models.vision_transformer import ATTN_LAYERS
    if name not in ATTN_LAYERS:
        pytest.skip(f'attention layer {name!r} not registered in this checkout')
    torch.manual_seed(0)
    layer = f'{name}_r2' if name in ('cbsa_star', 'agent') else name     # 2x2 representatives on the 4x4 grid
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=0, attn_layer=layer).eval()
    tr = trace_model(vit, _photo())
    maps = class_token_maps(tr)
    assert maps.shape == (12, 1, 3, 4, 4) and torch.isfinite(maps).all() and (maps >= 0).all()
    full = full_attention(tr.layers[0])
    if tr.layers[0].kind in ('softmax', 'linear'):          # row-stochastic token-to-token maps
        torch.testing.assert_close(full.sum(-1), torch.ones(full.shape[:-1]), rtol=1e-4, atol=1e-4)


def test_head_mean_map_puts_heads_on_one_scale():
    """Each head's map divided by its own maximum, then averaged: a head with 100x larger values does not dominate."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 4, 5, generator=g), torch.rand(3, 4, 5, generator=g)     # (B, gh, gw) per head
    maps = torch.stack([a, 100 * b], dim=1)                                          # (B, H=2, gh, gw)
    want = torch.stack([(a[i] / a[i].max() + b[i] / b[i].max()) / 2 for i in range(3)])
    torch.testing.assert_close(head_mean_map(maps), want)
    torch.testing.assert_close(head_map(maps, 'mean'), want)
    torch.testing.assert_close(head_map(maps, '1'), 100 * b)
    assert torch.equal(head_mean_map(torch.zeros(2, 4, 5)), torch.zeros(4, 5))     # all-zero maps stay zero
