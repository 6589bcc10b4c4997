"""Fashion-MNIST IDX adapter and data-error handling."""
import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from timm_cbsa.data import (  # noqa: E402
    DEFAULT_FASHION_MNIST_DIR, DatasetNotFoundError, FashionMNIST, SyntheticImages, check_fashion_mnist_dir,
    read_idx,
)


def _write_idx(path, arr, compress=True):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    data = header + arr.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        Path(path).write_bytes(data)


def make_fake_fmnist(folder, n_train=40, n_test=20, compress=True):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 255, (n, 28, 28))
        _write_idx(os.path.join(folder, f"{stem}-images-idx3-ubyte"), x, compress)
        _write_idx(os.path.join(folder, f"{stem}-labels-idx1-ubyte"), y, compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_fmnist_reads_idx_files(tmp_path, compress):
    make_fake_fmnist(tmp_path, compress=compress)
    tr = FashionMNIST(str(tmp_path), "train")
    te = FashionMNIST(str(tmp_path), "test", max_samples=7)
    assert len(tr) == 40 and len(te) == 7
    img, y = tr[3]
    assert img.size == (28, 28) and img.mode == "L"
    assert 0 <= y < 10
    assert np.array_equal(np.asarray(img), tr.images[3])
    rgb, _ = FashionMNIST(str(tmp_path), "val", img_mode="RGB")[0]
    assert rgb.mode == "RGB"


def test_fmnist_missing_dir_names_apt_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path / "nope"), "train")
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(str(tmp_path), "train")  # exists but empty


@pytest.mark.parametrize("compress", [True, False])
def test_check_fashion_mnist_dir_names_the_missing_file(tmp_path, compress):
    make_fake_fmnist(tmp_path, compress=compress)
    check_fashion_mnist_dir(str(tmp_path))  # all four files present (.gz or plain)
    os.remove(tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if compress else "")))
    with pytest.raises(DatasetNotFoundError, match=r"file 't10k-labels-idx1-ubyte.gz' not found"):
        check_fashion_mnist_dir(str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="data directory does not exist"):
        check_fashion_mnist_dir(str(tmp_path / "nope"))


def test_fmnist_malformed_files(tmp_path):
    make_fake_fmnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    with gzip.open(p, "wb") as f:
        f.write(raw[:-100])  # truncated payload
    with pytest.raises(DatasetNotFoundError, match="truncated or malformed"):
        FashionMNIST(str(tmp_path), "train")
    p.write_bytes(b"not a gzip file at all")
    with pytest.raises(DatasetNotFoundError, match="cannot read IDX"):
        read_idx(str(p))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason="apt package dataset-fashion-mnist absent")
def test_real_fmnist_shapes_and_balance():
    tr = FashionMNIST(split="train")
    te = FashionMNIST(split="test")
    assert len(tr) == 60000 and len(te) == 10000
    assert np.bincount(te.targets, minlength=10).tolist() == [1000] * 10
    assert abs(tr.images.mean() / 255 - 0.2860) < 1e-3


def test_synthetic_is_deterministic():
    a, b = SyntheticImages(32, seed=3), SyntheticImages(32, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.images, SyntheticImages(32, seed=3, split="test").images)
