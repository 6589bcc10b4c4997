"""A tiny, deterministic, learnable synthetic image-classification dataset (for tests / smoke runs)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from PIL import Image
import torch.utils.data

__all__ = ["SyntheticImages"]


class SyntheticImages(torch.utils.data.Dataset):
    """``num_samples`` grey/RGB images whose class is encoded as a bright bar position plus noise.

    Entirely generated from ``seed`` (no files); the train and test splits use different seeds.
    Samples are PIL images so the same transforms as for real data apply.
    """

    def __init__(self, num_samples: int = 256, num_classes: int = 4, img_size: int = 28, channels: int = 1,
                 split: str = "train", seed: int = 0, transform: Optional[Callable] = None):
        rng = np.random.default_rng(seed + (0 if split == "train" else 10_000))
        self.targets = rng.integers(0, num_classes, size=num_samples).astype(np.int64)
        imgs = rng.normal(60, 25, size=(num_samples, img_size, img_size)).clip(0, 255)
        band = max(1, img_size // num_classes)
        for i, t in enumerate(self.targets):
            imgs[i, t * band:(t + 1) * band, :] += 120
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
