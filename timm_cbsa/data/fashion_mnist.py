"""Fashion-MNIST as shipped by Debian's ``dataset-fashion-mnist`` package.

The package installs the four original IDX files (gzip) under
``/usr/share/datasets/fashion-mnist/``. They are read with numpy only; nothing
is ever downloaded. Samples are ``PIL.Image`` objects in mode ``"L"`` (28x28
grey), so any torchvision / timm transform can be applied to them.
"""
from __future__ import annotations

import gzip
import os
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image
import torch.utils.data

from ..errors import CBSAError

__all__ = [
    "FashionMNIST",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_APT_PACKAGE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_FILES",
    "DatasetNotFoundError",
    "check_fashion_mnist_dir",
    "find_fashion_mnist_file",
    "fashion_mnist_missing_message",
    "read_idx",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# statistics of the 60k training images, pixel values scaled to [0, 1]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

# split -> (image file stem, label file stem, number of samples); each file is read as STEM.gz or STEM
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "t10k": "test",
                  "val": "test", "validation": "test", "eval": "test"}


class DatasetNotFoundError(CBSAError, FileNotFoundError):
    """Raised when a dataset directory or file is missing or malformed."""


def fashion_mnist_missing_message(root: str, what: str) -> str:
    """The error text for missing Fashion-MNIST data under ``root``: ``what`` is missing, and how to install it
    (the Debian package for the default folder, the expected IDX file names for any other)."""
    msg = f"Fashion-MNIST: {what} ('{root}')."
    if os.path.abspath(root) == os.path.abspath(DEFAULT_FASHION_MNIST_DIR):
        msg += (f" Install the Debian package with: "
                f"`apt-get install -y {FASHION_MNIST_APT_PACKAGE}` (as root), "
                f"or pass --data-dir pointing at a folder with the IDX files.")
    else:
        msg += (f" Expected the IDX files train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
                f"t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz); on Debian/Ubuntu "
                f"`apt-get install -y {FASHION_MNIST_APT_PACKAGE}` installs them in {DEFAULT_FASHION_MNIST_DIR}.")
    return msg


def find_fashion_mnist_file(root: str, stem: str) -> str:
    """Path of the IDX file ``STEM.gz`` (preferred) or ``STEM`` in ``root``; DatasetNotFoundError if neither exists."""
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DatasetNotFoundError(fashion_mnist_missing_message(root, f"file '{stem}.gz' not found"))


def check_fashion_mnist_dir(root: str) -> None:
    """Cheap check that ``root`` holds the four Fashion-MNIST IDX files (nothing is read); raises
    DatasetNotFoundError naming the missing folder or file and how to install the data."""
    if not os.path.isdir(root):
        raise DatasetNotFoundError(fashion_mnist_missing_message(root, "data directory does not exist"))
    for images, labels, _ in FASHION_MNIST_FILES.values():
        find_fashion_mnist_file(root, images)
        find_fashion_mnist_file(root, labels)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX (optionally gzip-compressed) file into a numpy uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetNotFoundError(f"Fashion-MNIST: cannot read IDX file '{path}': {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetNotFoundError(f"Fashion-MNIST: '{path}' is not an IDX file (bad magic number).")
    if data[2] != 0x08:
        raise DatasetNotFoundError(f"Fashion-MNIST: '{path}' has IDX type 0x{data[2]:02x}, expected 0x08 (uint8).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetNotFoundError(f"Fashion-MNIST: '{path}' is truncated (header).")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 0
    if len(data) - header != count:
        raise DatasetNotFoundError(
            f"Fashion-MNIST: '{path}' is truncated or malformed: header says shape {shape} "
            f"({count} bytes) but {len(data) - header} bytes follow.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from local IDX files (default: Debian's install location).

    Args:
        root: folder holding the IDX files (``.gz`` or uncompressed).
        split: ``"train"`` (60k) or ``"test"`` (10k); ``"val"``/``"validation"`` map to test.
        transform: applied to the ``PIL.Image`` (mode ``"L"``, or ``"RGB"`` if ``img_mode="RGB"``).
        target_transform: applied to the integer label.
        max_samples: keep only the first N samples (deterministic subset).
        img_mode: ``"L"`` (default) or ``"RGB"`` (grey replicated to 3 channels).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
            self,
            root: Optional[str] = None,
            split: str = "train",
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            max_samples: Optional[int] = None,
            img_mode: str = "L",
    ):
        root = root or DEFAULT_FASHION_MNIST_DIR
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"Fashion-MNIST: unknown split '{split}', use 'train' or 'test'.")
        self.split = _SPLIT_ALIASES[split]
        if not os.path.isdir(root):
            raise DatasetNotFoundError(fashion_mnist_missing_message(root, "data directory does not exist"))
        self.root = root
        img_stem, lbl_stem, expected = FASHION_MNIST_FILES[self.split]
        images = read_idx(find_fashion_mnist_file(root, img_stem))
        labels = read_idx(find_fashion_mnist_file(root, lbl_stem))
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DatasetNotFoundError(f"Fashion-MNIST: images in '{root}' have shape {images.shape}, expected (N, 28, 28).")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetNotFoundError(
                f"Fashion-MNIST: {labels.shape} labels for {images.shape[0]} images in '{root}'.")
        if labels.size and int(labels.max()) >= 10:
            raise DatasetNotFoundError(f"Fashion-MNIST: label value {int(labels.max())} out of range 0..9 in '{root}'.")
        if max_samples is not None and max_samples > 0:
            images, labels = images[:max_samples], labels[:max_samples]
        self.images = images
        self.targets = labels.astype(np.int64)
        self.transform = transform
        self.target_transform = target_transform
        if img_mode not in ("L", "RGB"):
            raise ValueError(f"img_mode must be 'L' or 'RGB', got {img_mode!r}")
        self.img_mode = img_mode

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Tuple[object, int]:
        img = Image.fromarray(self.images[index])  # uint8 HxW -> mode "L"
        if self.img_mode != "L":
            img = img.convert(self.img_mode)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return f"FashionMNIST(root={self.root!r}, split={self.split!r}, n={len(self)})"
