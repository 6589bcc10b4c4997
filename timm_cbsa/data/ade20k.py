"""ADE20K (SceneParsing, ``ADEChallengeData2016``) in its released folder layout, for semantic segmentation::

    ADEChallengeData2016/images/{training,validation}/*.jpg
    ADEChallengeData2016/annotations/{training,validation}/*.png      (same file stems)

Annotation values: 0 = "other" (ignored), 1..150 = the classes; they become ignore index 255 and 0..149. Any folder
in this layout works (the composed garment scenes of ``timm_cbsa.data.garment_scenes`` use it too).

Transforms (Segmenter / mmseg ADE20K recipe, with torchvision's joint image + mask transforms):

* training: random resize of the shorter side to ``base_size`` × U(ratio range, default 0.5..2.0), random
  ``crop`` × ``crop`` crop (padded with the ignore label where the image is smaller), horizontal flip, normalise;
* evaluation: shorter side resized to ``base_size`` (the longer one at most 4×), normalised; the label keeps its
  original size (logits are resized to it, the mmseg protocol).

Training augmentation is seeded per (seed, epoch, sample), so a run resumed mid-epoch sees the same crops and flips.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from .fashion_mnist import DatasetNotFoundError

__all__ = ['ADE20K_FOLDER', 'ADE20K_NUM_CLASSES', 'IGNORE_INDEX', 'ADE20KSegmentation', 'map_labels',
           'train_transform', 'eval_transform']

ADE20K_FOLDER = 'ADEChallengeData2016'
ADE20K_NUM_CLASSES = 150
IGNORE_INDEX = 255
_SPLITS = {'train': 'training', 'training': 'training', 'val': 'validation', 'validation': 'validation',
           'eval': 'validation'}


def map_labels(ann: np.ndarray) -> np.ndarray:
    """ADE20K annotation values -> training labels: 0 -> 255 (ignored), v -> v - 1 (uint8)."""
    if ann.ndim != 2:
        raise ValueError(f'an ADE20K annotation is a 2-D label image, got shape {ann.shape}.')
    return (ann.astype(np.int16) - 1).astype(np.uint8)   # 0 - 1 wraps to 255 = IGNORE_INDEX


def _dataset_root(root: str) -> str:
    sub = os.path.join(root, ADE20K_FOLDER)
    return sub if os.path.isdir(sub) else root


def _pairs(root: str, split: str) -> List[Tuple[str, str]]:
    img_dir, ann_dir = os.path.join(root, 'images', split), os.path.join(root, 'annotations', split)
    for d in (img_dir, ann_dir):
        if not os.path.isdir(d):
            raise DatasetNotFoundError(
                f"ADE20K: no folder '{d}'. Expected the released layout {ADE20K_FOLDER}/images/{{training,validation}}"
                f"/*.jpg and {ADE20K_FOLDER}/annotations/{{training,validation}}/*.png under --data-dir.")
    images = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(('.jpg', '.jpeg', '.png')))
    if not images:
        raise DatasetNotFoundError(f"ADE20K: no images in '{img_dir}'.")
    pairs = []
    for f in images:
        ann = os.path.join(ann_dir, os.path.splitext(f)[0] + '.png')
        if not os.path.isfile(ann):
            raise DatasetNotFoundError(f"ADE20K: image '{f}' has no annotation '{ann}'.")
        pairs.append((os.path.join(img_dir, f), ann))
    return pairs


class ADE20KSegmentation(torch.utils.data.Dataset):
    """(image, label) pairs of one split.

    Args:
        root: the ``ADEChallengeData2016`` folder or its parent.
        split: 'training' / 'validation' (or 'train' / 'val').
        transform: ``transform(image: PIL RGB, label: uint8 array) -> (image, label)``; e.g. ``train_transform``.
        max_samples: use only the first n pairs (sorted by file name).
        seed: with ``set_epoch``, seeds the transform per sample (reproducible augmentation).
    """

    def __init__(self, root: str, split: str = 'training', transform: Optional[Callable] = None,
                 max_samples: Optional[int] = None, seed: int = 0):
        if split not in _SPLITS:
            raise ValueError(f'ADE20K split must be one of {sorted(_SPLITS)}, got {split!r}.')
        self.root, self.split = _dataset_root(root), _SPLITS[split]
        self.samples = _pairs(self.root, self.split)[:max_samples]
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        img_path, ann_path = self.samples[index]
        with Image.open(img_path) as img, Image.open(ann_path) as ann:
            image, label = img.convert('RGB'), map_labels(np.asarray(ann))
        if label.shape != (image.height, image.width):
            raise ValueError(f"ADE20K: annotation '{ann_path}' is {label.shape[1]}x{label.shape[0]}, its image "
                             f"{image.width}x{image.height}.")
        return image, label

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image, label)


def _stats(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """RGB statistics; one value (a grey model's, e.g. Fashion-MNIST's) is used for all three channels."""
    mean, std = tuple(mean), tuple(std)
    return (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)


def _to_tv(image: Image.Image, label: np.ndarray):
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF
    return tv_tensors.Image(TF.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(label.copy())[None])


def train_transform(crop: int, base_size: int, ratio_range: Sequence[float] = (0.5, 2.0), hflip: float = 0.5,
                    mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)
                    ) -> Callable:
    """Random resize (shorter side base_size × ratio), random crop (ignore-padded), flip, normalise ->
    (image (3, crop, crop) float32, label (crop, crop) int64)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    lo, hi = ratio_range
    if not 0 < lo <= hi:
        raise ValueError(f'ratio range must satisfy 0 < low <= high, got {tuple(ratio_range)}.')
    aug = v2.Compose([
        v2.RandomResize(max(1, int(base_size * lo)), int(base_size * hi) + 1),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(*_stats(mean, std)),
    ])

    def apply(image: Image.Image, label: np.ndarray):
        img, mask = aug(*_to_tv(image, label))
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0].long()
    return apply


def eval_transform(base_size: int, mean: Sequence[float] = (0.485, 0.456, 0.406),
                   std: Sequence[float] = (0.229, 0.224, 0.225)) -> Callable:
    """Shorter side resized to base_size, normalised; the label untouched -> (image (3, h, w), label (H, W) int64)."""
    from torchvision.transforms import v2
    aug = v2.Compose([v2.Resize(base_size, max_size=4 * base_size), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(*_stats(mean, std))])

    def apply(image: Image.Image, label: np.ndarray):
        img, _ = _to_tv(image, label[:1, :1])
        return aug(img).as_subclass(torch.Tensor), torch.from_numpy(label.astype(np.int64))
    return apply
