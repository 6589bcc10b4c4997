"""Fashion-MNIST for the interpretability tools: images, model inputs, garment masks and zero-shot IoU with baselines.

The images are Debian's ``dataset-fashion-mnist`` IDX files (no download). The ground-truth foreground of an image
is the garment: its non-zero pixels (the background of Fashion-MNIST is exactly 0). Zero-shot segmentation thresholds
the upsampled class-token map (Otsu) and is compared with two baselines that use no model: every pixel foreground,
and a centred box whose area is the mean garment area of the evaluated images.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .maps import head_map, head_names
from .zeroshot import iou, map_to_mask, upsample_map

__all__ = ['load_fmnist', 'fmnist_input', 'garment_mask', 'centre_box', 'fmnist_zeroshot', 'to_rgb']


def load_fmnist(indices: Sequence[int], split: str = 'test', root: Optional[str] = None
                ) -> Tuple[List[np.ndarray], List[int]]:
    """Fashion-MNIST images (uint8 (28, 28)) and labels at ``indices`` of ``split``."""
    from ..data import FashionMNIST
    ds = FashionMNIST(root=root, split=split)
    n = len(ds)
    bad = [i for i in indices if not 0 <= int(i) < n]
    if bad:
        raise IndexError(f'Fashion-MNIST {split} has {n} images; indices {bad[:5]} are out of range.')
    return [np.asarray(ds.images[int(i)]) for i in indices], [int(ds.targets[int(i)]) for i in indices]


def fmnist_input(images: Sequence[np.ndarray], size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 in_chans: int = 1) -> torch.Tensor:
    """uint8 (28, 28) images → normalised (B, in_chans, H, W) float32 (bilinear resize when H, W ≠ 28)."""
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).float().div_(255.).unsqueeze(1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)
    x = x.expand(-1, in_chans, -1, -1)
    m = torch.tensor(list(mean)[:1] * in_chans if len(mean) == 1 else list(mean), dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(list(std)[:1] * in_chans if len(std) == 1 else list(std), dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def garment_mask(img: np.ndarray) -> np.ndarray:
    """Ground-truth foreground of a Fashion-MNIST image: the non-zero pixels."""
    return np.asarray(img) > 0


def centre_box(shape: Tuple[int, int], area_frac: float) -> np.ndarray:
    """A centred box with the image's aspect ratio covering ``area_frac`` of the pixels (rounded to whole pixels)."""
    h, w = shape
    frac = float(np.clip(area_frac, 0.0, 1.0))
    bh, bw = int(round(h * frac ** 0.5)), int(round(w * frac ** 0.5))
    mask = np.zeros((h, w), dtype=bool)
    t, l = (h - bh) // 2, (w - bw) // 2
    mask[t:t + bh, l:l + bw] = True
    return mask


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Grey uint8 (H, W) → (H, W, 3) for the photo plots."""
    img = np.asarray(img)
    return np.stack([img] * 3, -1) if img.ndim == 2 else img


def fmnist_zeroshot(maps: torch.Tensor, images: Sequence[np.ndarray], method: str = 'otsu'
                    ) -> Tuple[List[Dict[str, object]], Dict[str, float]]:
    """Mean foreground IoU over ``images`` per layer and head (and ``head='mean'``, ``head_mean_map``), with the two
    baselines.

    maps: (L, B, H, gh, gw) class-token maps of the B images. Returns (rows, baselines) where baselines holds
    ``iou_all_fg`` (mean IoU of marking every pixel foreground), ``iou_centre_box`` and ``centre_box_frac``.
    """
    gts = [garment_mask(im) for im in images]
    if maps.shape[1] != len(gts):
        raise ValueError(f'{maps.shape[1]} maps for {len(gts)} images.')
    frac = float(np.mean([g.mean() for g in gts]))
    box = centre_box(gts[0].shape, frac)
    base = {'iou_all_fg': float(np.mean([iou(np.ones_like(g), g) for g in gts])),
            'iou_centre_box': float(np.mean([iou(box, g) for g in gts])), 'centre_box_frac': frac}
    rows = []
    L, B, H = maps.shape[:3]
    for l in range(L):
        per = maps[l]                                                   # (B, H, gh, gw)
        for head in head_names(H):
            m = head_map(per, head)                                     # (B, gh, gw)
            ious = [iou(map_to_mask(upsample_map(m[b], gts[b].shape), method), gts[b]) for b in range(B)]
            rows.append({'layer': l, 'head': head, 'threshold': method, 'images': B,
                         'iou_fg_mean': float(np.mean(ious)), 'iou_fg_std': float(np.std(ious)), **base})
    return rows, base
