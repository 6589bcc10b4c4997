"""Dataset adapters for timm_cbsa training (no downloads).

* :class:`FashionMNIST` — Debian's ``dataset-fashion-mnist`` IDX files.
* :class:`SyntheticImages` — generated data for tests and smoke runs.
"""
from .fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_APT_PACKAGE,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DatasetNotFoundError,
    FashionMNIST,
    check_fashion_mnist_dir,
    fashion_mnist_missing_message,
    find_fashion_mnist_file,
    read_idx,
)
from .synthetic import SyntheticImages

__all__ = [
    "FashionMNIST", "SyntheticImages", "DatasetNotFoundError", "read_idx",
    "check_fashion_mnist_dir", "find_fashion_mnist_file", "fashion_mnist_missing_message",
    "DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_APT_PACKAGE", "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
]
