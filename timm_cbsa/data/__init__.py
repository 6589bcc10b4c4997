"""Dataset adapters for timm_cbsa training (no downloads).

* :class:`FashionMNIST` — Debian's ``dataset-fashion-mnist`` IDX files.
* :class:`SyntheticImages` — generated data for tests and smoke runs.
"""
from .fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_APT_PACKAGE,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DatasetNotFoundError,
    FashionMNIST,
    read_idx,
)
from .synthetic import SyntheticImages

__all__ = [
    "FashionMNIST", "SyntheticImages", "DatasetNotFoundError", "read_idx",
    "DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_APT_PACKAGE", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
]
