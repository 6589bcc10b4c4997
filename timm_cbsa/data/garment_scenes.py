"""Composed segmentation scenes from real images: Fashion-MNIST garments pasted on photo backgrounds.

No segmentation data set can be downloaded here, so this writes one in the ADE20K folder layout (read by
``ADE20KSegmentation``, the same reader as ADE20K itself). It is a *proxy*, not ADE20K:

* backgrounds: random crops of scikit-image's bundled photos and textures (astronaut, cat, coffee, rocket, Hubble
  deep field, microscopy, retina, motorcycle, camera man, coins, moon, grass, gravel, brick, cells, clock), resized
  to ``size`` × ``size``; training scenes crop the left three quarters of each photo, validation scenes the held-out
  right quarter;
* garments: 2-4 Fashion-MNIST images per scene (training split for training scenes, test split for validation
  scenes), each scaled to 35-60 % of the scene side (22-38 px in a 64-px scene: the scale of the Fashion-MNIST
  models of this package, 28 px resized to 32), tinted with a random colour, and pasted at a random position
  (later garments occlude earlier ones). A garment's mask is its non-zero pixels; the mask is upscaled bilinearly,
  so its border is blended with the background.

Labels (annotation PNG values, as in ADE20K): 1 = background, 2..11 = the 10 garment classes (T-shirt/top ... Ankle
boot), 0 = ignored: the blended border pixels whose garment coverage is between 25 % and 75 %. Training labels are
therefore 0 = background, 1..10 = garments, 11 classes in all.

    python -m timm_cbsa.data.garment_scenes --out output/garment_scenes --train 3000 --val 200
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .ade20k import ADE20K_FOLDER
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

__all__ = ['GARMENT_SCENE_CLASSES', 'BACKGROUND_PHOTOS', 'write_garment_scenes', 'compose_scene']

GARMENT_SCENE_CLASSES = ('background',) + FASHION_MNIST_CLASSES
BACKGROUND_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
                     'retina', 'stereo_motorcycle', 'camera', 'coins', 'moon', 'grass', 'gravel', 'brick', 'cell',
                     'clock')
BORDER = (0.25, 0.75)   # garment coverage between these is a blended border pixel: ignored
SCALE = (0.35, 0.60)    # garment side / scene side (22-38 px in a 64-px scene; the Fashion-MNIST models saw 32 px)
GARMENTS = (2, 4)       # garments per scene, inclusive


def load_backgrounds(names: Sequence[str] = BACKGROUND_PHOTOS) -> List[np.ndarray]:
    """scikit-image's bundled photos as uint8 (H, W, 3) arrays (grey ones replicated)."""
    import skimage.data
    out = []
    for name in names:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img          # stereo_motorcycle: (left, right, disparity)
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        out.append(np.ascontiguousarray(img, dtype=np.uint8))
    return out


def _background(photo: np.ndarray, part: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of the left 3/4 ('train') or right 1/4 ('val') of ``photo``, resized to size × size."""
    h, w = photo.shape[:2]
    x0, x1 = (0, 3 * w // 4) if part == 'train' else (3 * w // 4, w)
    side = int(min(h, x1 - x0) * rng.uniform(0.5, 1.0))
    top, left = rng.integers(0, h - side + 1), x0 + rng.integers(0, x1 - x0 - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32)


def _paste(img: np.ndarray, label: np.ndarray, garment: np.ndarray, cls: int, rng: np.random.Generator,
           scale: Tuple[float, float] = SCALE) -> None:
    """Paste one 28 × 28 garment (uint8 grey) in place: tinted, scaled to ``scale`` × the scene side, blended at its
    border; label updated."""
    size = img.shape[0]
    side = max(8, int(size * rng.uniform(*scale)))
    top, left = rng.integers(0, size - side + 1, size=2)
    grey = np.asarray(Image.fromarray(garment).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
    cover = np.asarray(Image.fromarray((garment > 0).astype(np.uint8) * 255).resize((side, side), Image.BILINEAR),
                       dtype=np.float32) / 255                        # soft mask of the non-zero pixels
    colour = 255 * rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    look = colour * (0.25 + 0.75 * grey)[..., None]
    region = img[top:top + side, left:left + side]
    region[:] = cover[..., None] * look + (1 - cover[..., None]) * region
    lab = label[top:top + side, left:left + side]
    lab[cover >= BORDER[1]] = cls + 2                                 # garment classes are 2..11 in the PNG
    lab[(cover > BORDER[0]) & (cover < BORDER[1])] = 0                # blended border: ignored


def compose_scene(background: np.ndarray, garments: Sequence[Tuple[np.ndarray, int]], rng: np.random.Generator,
                  scale: Tuple[float, float] = SCALE) -> Tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float background + [(28 × 28 uint8 garment, class 0..9)] -> (uint8 image, uint8 annotation);
    garment sides ``scale`` × the scene side."""
    img = background.copy()
    label = np.ones(img.shape[:2], dtype=np.uint8)                    # 1 = background
    for garment, cls in garments:
        _paste(img, label, garment, cls, rng, scale)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), label


def _write_split(root: str, split: str, n: int, size: int, photos: List[np.ndarray], fmnist: FashionMNIST,
                 rng: np.random.Generator) -> Dict[str, int]:
    img_dir, ann_dir = (os.path.join(root, k, split) for k in ('images', 'annotations'))
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    part = 'train' if split == 'training' else 'val'
    counts = np.zeros(12, dtype=np.int64)
    for i in range(n):
        bg = _background(photos[rng.integers(len(photos))], part, size, rng)
        picks = rng.integers(len(fmnist), size=rng.integers(GARMENTS[0], GARMENTS[1] + 1))
        img, label = compose_scene(bg, [(fmnist.images[j], int(fmnist.targets[j])) for j in picks], rng)
        stem = f'scene_{split}_{i:05d}'
        Image.fromarray(img).save(os.path.join(img_dir, stem + '.jpg'), quality=95)
        Image.fromarray(label).save(os.path.join(ann_dir, stem + '.png'))
        counts += np.bincount(label.ravel(), minlength=12)
    return {('ignored' if v == 0 else GARMENT_SCENE_CLASSES[v - 1]): int(c) for v, c in enumerate(counts)}


def write_garment_scenes(out: str, num_train: int = 2000, num_val: int = 200, size: int = 64, seed: int = 0,
                         fmnist_dir: Optional[str] = None) -> Dict[str, Dict[str, int]]:
    """Write ``out/ADEChallengeData2016/{images,annotations}/{training,validation}``; returns the pixel counts per
    label and split. Deterministic for a given seed."""
    if num_train < 1 or num_val < 1 or size < 32:
        raise ValueError(f'need num_train >= 1, num_val >= 1 and size >= 32; got {num_train}, {num_val}, {size}.')
    root = os.path.join(out, ADE20K_FOLDER)
    photos = load_backgrounds()
    rng = np.random.default_rng(seed)
    return {split: _write_split(root, split, n, size, photos, FashionMNIST(fmnist_dir, fm_split), rng)
            for split, n, fm_split in (('training', num_train, 'train'), ('validation', num_val, 'test'))}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='output folder (ADEChallengeData2016/ is created inside)')
    p.add_argument('--train', type=int, default=2000, help='training scenes')
    p.add_argument('--val', type=int, default=200, help='validation scenes')
    p.add_argument('--size', type=int, default=64, help='scene side in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--fmnist-dir', default=None, help='Fashion-MNIST IDX folder (default: the Debian package)')
    a = p.parse_args(argv)
    counts = write_garment_scenes(a.out, a.train, a.val, a.size, a.seed, a.fmnist_dir)
    for split, c in counts.items():
        total = sum(c.values())
        print(f'{split}: ' + ', '.join(f'{k} {100 * v / total:.1f}%' for k, v in c.items()))


if __name__ == '__main__':
    main()
