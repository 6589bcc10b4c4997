"""Fashion-MNIST interpretability: garment masks, centre-box baseline, zero-shot IoU on hand-set maps, model inputs,
and the viz CLI on Fashion-MNIST images (small random model; the shipped weights are tested in tests/models)."""
import csv
import os

import numpy as np
import pytest
import torch

from timm_cbsa.analysis.fmnist import centre_box, fmnist_input, fmnist_zeroshot, garment_mask, load_fmnist
from timm_cbsa.analysis.zeroshot import iou
from timm_cbsa.data import DEFAULT_FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR),
                                  reason='Debian dataset-fashion-mnist is not installed')


def _garments(n=3, seed=0):
    """Synthetic 28x28 'garments': non-zero blobs on an exact-zero background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.zeros((28, 28), np.uint8)
        t, l = rng.integers(2, 8, size=2)
        b, r = rng.integers(18, 26, size=2)
        img[t:b, l:r] = rng.integers(1, 255, size=(b - t, r - l))
        out.append(img)
    return out


def test_garment_mask_is_nonzero_pixels():
    img = np.array([[0, 3], [255, 0]], np.uint8)
    np.testing.assert_array_equal(garment_mask(img), [[False, True], [True, False]])


@pytest.mark.parametrize('frac', [0.25, 0.5, 0.81])
def test_centre_box_area_and_centre(frac):
    box = centre_box((28, 28), frac)
    side = int(round(28 * frac ** 0.5))
    assert box.sum() == side * side
    rows, cols = np.nonzero(box)
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 0.5 and abs((cols.min() + cols.max()) / 2 - 13.5) <= 0.5


def test_zeroshot_perfect_map_and_baselines():
    imgs = _garments()
    gts = [garment_mask(im) for im in imgs]
    # a map equal to the garment at full resolution (grid 28x28) is segmented exactly by Otsu
    good = torch.stack([torch.from_numpy(g.astype(np.float32)) for g in gts])[None, :, None]      # (1, B, 1, 28, 28)
    rows, base = fmnist_zeroshot(good, imgs)
    assert [r['head'] for r in rows] == ['0', 'mean']
    assert rows[0]['iou_fg_mean'] == pytest.approx(1.0)
    # the inverted map finds the background: IoU 0 with the garment
    rows_inv, _ = fmnist_zeroshot(1.0 - good, imgs)
    assert rows_inv[0]['iou_fg_mean'] == pytest.approx(0.0)
    # baselines, computed directly
    assert base['iou_all_fg'] == pytest.approx(np.mean([g.mean() for g in gts]))
    frac = np.mean([g.mean() for g in gts])
    box = centre_box((28, 28), frac)
    assert base['iou_centre_box'] == pytest.approx(np.mean([iou(box, g) for g in gts]))


def test_zeroshot_rejects_mismatched_batch():
    with pytest.raises(ValueError, match='2 maps for 3 images'):
        fmnist_zeroshot(torch.rand(1, 2, 1, 7, 7), _garments(3))


def test_fmnist_input_matches_direct_normalisation():
    imgs = _garments(2)
    x = fmnist_input(imgs, (28, 28), (0.2860,), (0.3530,))
    want = (torch.from_numpy(np.stack(imgs)).float() / 255. - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], want)
    x3 = fmnist_input(imgs, (56, 56), (0.5,), (0.25,), in_chans=3)
    assert x3.shape == (2, 3, 56, 56) and torch.equal(x3[:, 0], x3[:, 2])


@needs_fmnist
def test_load_fmnist_bounds():
    imgs, labels = load_fmnist([0, 9999])
    assert imgs[0].shape == (28, 28) and all(0 <= l < 10 for l in labels)
    with pytest.raises(IndexError, match='10000 images'):
        load_fmnist([10000])


@needs_fmnist
def test_viz_cli_fashion_mnist(tmp_path):
    pytest.importorskip('matplotlib')
    from timm_cbsa import viz
    out = tmp_path / 'v'
    s = viz.main(['all', '--model', 'cbt_nano_patch8_32', '--dataset', 'fashion_mnist', '--num-images', '8',
                  '--fmnist-index', '0', '1', '--out', str(out)])
    for f in ('attention_fmnist0.png', 'attention_fmnist_grid.png', 'coding_rate.csv', 'zeroshot_fmnist.csv',
              'zeroshot_fmnist0.png'):
        assert (out / f).is_file(), f
    with open(out / 'zeroshot_fmnist.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 3                                  # 4 layers x (2 heads + mean)
    assert s['fmnist_best_iou'] == pytest.approx(max(float(r['iou_fg_mean']) for r in rows), rel=1e-5)
    assert 0 < s['fmnist_all_fg_iou'] < 1 and 0 < s['fmnist_centre_box_iou'] < 1
