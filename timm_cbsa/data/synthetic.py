"""A tiny, deterministic, learnable synthetic image-classification dataset (for tests / smoke runs)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from PIL import Image
import torch.utils.data

__all__ = ["SyntheticImages"]


class SyntheticImages(torch.utils.data.Dataset):
    """``num_samples`` grey/RGB images whose class is a stripe pattern (orientation, period) plus noise.

    Entirely generated from ``seed`` (no files); the train and test splits use different seeds.
    Samples are PIL images so the same transforms as for real data apply.
    """

    def __init__(self, num_samples: int = 256, num_classes: int = 4, img_size: int = 28, channels: int = 1,
                 split: str = "train", seed: int = 0, transform: Optional[Callable] = None):
        rng = np.random.default_rng(seed + (0 if split == "train" else 10_000))
        self.targets = rng.integers(0, num_classes, size=num_samples).astype(np.int64)
        # class t -> sinusoidal stripes: orientation t % 2, period 2 + t // 2 pixels, random phase, noise
        yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float64)
        imgs = np.empty((num_samples, img_size, img_size))
        for i, t in enumerate(self.targets):
            coord = yy if t % 2 == 0 else xx
            period = 2.0 + t // 2
            phase = rng.uniform(0, 2 * np.pi)
            imgs[i] = 128 + 80 * np.sin(2 * np.pi * coord / period + phase)
        imgs += rng.normal(0, 25, size=imgs.shape)
        self.images = imgs.clip(0, 255).astype(np.uint8)
        self.channels = channels
        self.classes = tuple(str(c) for c in range(num_classes))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        if self.channels == 3:
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])
