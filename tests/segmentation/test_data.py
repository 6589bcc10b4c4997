"""The ADE20K-layout reader (ignore label, class ids, transforms) and the composed garment scenes."""
import os

import numpy as np
import pytest
import torch

from timm_cbsa.data import DatasetNotFoundError
from timm_cbsa.data.ade20k import IGNORE_INDEX, ADE20KSegmentation, eval_transform, map_labels, train_transform
from timm_cbsa.data.garment_scenes import BORDER, compose_scene

from seg_data import write_ade_folder


def test_reader_maps_ignore_and_class_ids(tmp_path):
    base, anns = write_ade_folder(tmp_path)
    for root in (str(tmp_path), base):                      # the folder or its parent
        ds = ADE20KSegmentation(root, 'train')
        assert len(ds) == 3
        image, label = ds[1]
        ann = anns[('training', 1)]
        assert image.size == (36, 24) and label.shape == (24, 36)
        assert (label[ann == 0] == IGNORE_INDEX).all()      # 0 = "other": ignored
        assert (label[ann == 1] == 0).all() and (label[ann == 150] == 149).all() and (label[ann == 75] == 74).all()
    assert len(ADE20KSegmentation(str(tmp_path), 'val')) == 2
    assert np.array_equal(map_labels(np.array([[0, 1, 150]], dtype=np.uint8)), [[255, 0, 149]])


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetNotFoundError, match='images/training'):
        ADE20KSegmentation(str(tmp_path), 'training')
    base, _ = write_ade_folder(tmp_path)
    os.remove(os.path.join(base, 'annotations', 'training', 'ADE_training_0001.png'))
    with pytest.raises(DatasetNotFoundError, match='ADE_training_0001.png'):
        ADE20KSegmentation(base, 'training')
    with pytest.raises(ValueError, match='split'):
        ADE20KSegmentation(base, 'test')


def test_transforms(tmp_path):
    write_ade_folder(tmp_path, size=(20, 30))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    ds = ADE20KSegmentation(str(tmp_path), 'training', train_transform(32, 20, (0.5, 0.5), 0.0, mean, std), seed=3)
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and label.shape == (32, 32) and label.dtype == torch.int64
    # ratio 0.5: the image is 10 x 15 px, the rest of the 32 x 32 crop is padding: ignored label, zero pixels
    assert (label == IGNORE_INDEX).float().mean() >= 1 - 10 * 15 / 32 ** 2 - 1e-6
    padded = label == IGNORE_INDEX
    torch.testing.assert_close(img[:, padded][:, 0], -torch.tensor(mean) / torch.tensor(std))
    # seeded per (seed, epoch, sample): the same crop again, another one in another epoch
    ds2 = ADE20KSegmentation(str(tmp_path), 'training', train_transform(8, 20, (0.5, 2.0), 0.5), seed=3)
    a, b = ds2[1], ds2[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds2.set_epoch(1)
    assert any(not torch.equal(ds2[i][0], a[0]) for i in [1])
    # evaluation: shorter side to base_size, label at its original size
    ev = ADE20KSegmentation(str(tmp_path), 'validation', eval_transform(40, mean, std))
    img, label = ev[0]
    assert img.shape == (3, 40, 60) and label.shape == (20, 30)
    with pytest.raises(ValueError, match='ratio'):
        train_transform(8, 8, (2.0, 1.0))


def test_compose_scene_labels():
    """A full 28 x 28 garment block on a black background: garment class inside, blended border ignored (0),
    background 1 outside; a second garment occludes the first."""
    rng = np.random.default_rng(0)
    g = np.zeros((28, 28), dtype=np.uint8)
    g[7:21, 7:21] = 200
    img, label = compose_scene(np.zeros((64, 64, 3), np.float32), [(g, 3)], rng, scale=(0.9, 0.9))   # 2x upscaled
    assert set(np.unique(label)) <= {0, 1, 5}
    assert (label == 5).sum() > 0 and (label == 0).sum() > 0 and (label == 1).sum() > 0
    # the border ring is thin: every ignored pixel touches a garment pixel within 2 px
    ys, xs = np.nonzero(label == 0)
    gy, gx = np.nonzero(label == 5)
    assert all(np.min(np.abs(gy - y) + np.abs(gx - x)) <= 2 for y, x in zip(ys, xs))
    # background pixels are at most BORDER[0]-blended (coverage <= 25 %), garment pixels visible
    assert img[label == 1].max() <= BORDER[0] * 255 + 1 and img[label == 5].min() > 0
    assert BORDER[0] < BORDER[1]


@pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'), reason='Debian dataset-fashion-mnist')
def test_write_garment_scenes(tmp_path):
    from timm_cbsa.data.garment_scenes import write_garment_scenes
    counts = write_garment_scenes(str(tmp_path), num_train=3, num_val=2, size=48, seed=1)
    ds = ADE20KSegmentation(str(tmp_path), 'training')
    assert len(ds) == 3 and len(ADE20KSegmentation(str(tmp_path), 'validation')) == 2
    _, label = ds[0]
    assert label.shape == (48, 48) and set(np.unique(label)) <= set(range(11)) | {IGNORE_INDEX}
    assert counts['training']['background'] > 0 and sum(counts['validation'].values()) == 2 * 48 * 48
