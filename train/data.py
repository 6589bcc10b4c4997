"""Datasets, transforms and loaders for ``train.train`` (built on timm.data)."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.utils.data
from torch.utils.data.distributed import DistributedSampler

from timm.data import create_dataset, create_transform

from timm_cbsa.data import (
    DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetNotFoundError,
    FashionMNIST, SyntheticImages,
)

_logger = logging.getLogger("train")

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fmnist")
IMAGE_FOLDER_NAMES = ("", "imagefolder", "folder")
_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def dataset_kind(name: str) -> str:
    name = (name or "").lower()
    if name in FASHION_MNIST_NAMES:
        return "fashion_mnist"
    if name == "synthetic":
        return "synthetic"
    if name in IMAGE_FOLDER_NAMES:
        return "folder"
    return "timm"  # torch/..., hfds/..., wds/..., tfds/... handled by timm.data.create_dataset


def dataset_defaults(kind: str) -> Dict[str, Any]:
    """Data defaults that apply unless a flag/config overrides them."""
    if kind == "fashion_mnist":
        return dict(num_classes=10, in_chans=1, img_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                    crop_pct=1.0)
    if kind == "synthetic":
        return dict(num_classes=4, in_chans=1, img_size=28, mean=(0.5,), std=(0.25,), crop_pct=1.0)
    return {}


def _check_image_folder(root: str, split: str) -> str:
    """Return the folder holding the class sub-folders for ``split``; clear error if missing/malformed."""
    if not root:
        raise DatasetNotFoundError("No --data-dir given: an ImageFolder dataset needs --data-dir pointing at a "
                                   "folder with train/ and val/ sub-folders of class folders.")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"Data directory '{root}' does not exist.")
    candidates = [split]
    if split in ("validation", "val"):
        candidates = ["val", "validation"]
    elif split in ("train", "training"):
        candidates = ["train", "training"]
    for c in candidates:
        path = os.path.join(root, c)
        if os.path.isdir(path):
            break
    else:
        raise DatasetNotFoundError(
            f"Data directory '{root}' has no '{split}' split folder (looked for {candidates}); "
            f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageFolder layout).")
    classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if not classes:
        raise DatasetNotFoundError(
            f"Split folder '{path}' contains no class sub-folders; expected {path}/<class>/<image>.")
    has_img = any(f.lower().endswith(_IMG_EXT) for c in classes for f in os.listdir(os.path.join(path, c)))
    if not has_img:
        raise DatasetNotFoundError(f"Split folder '{path}' has class folders {classes[:5]} but no image files "
                                   f"(extensions {', '.join(_IMG_EXT)}).")
    return path


class _Limit(torch.utils.data.Dataset):
    """First ``n`` samples of a dataset (deterministic subset), keeping a ``transform`` passthrough."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, min(int(n), len(ds))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.ds[i]


def check_data_source(args) -> None:
    """Cheap early check (before the model is built) that the data location exists and looks right."""
    kind = dataset_kind(args.dataset)
    if kind == "fashion_mnist":
        from timm_cbsa.data.fashion_mnist import _find, _missing_msg, _FILES
        root = args.data_dir or DEFAULT_FASHION_MNIST_DIR
        if not os.path.isdir(root):
            raise DatasetNotFoundError(_missing_msg(root, "data directory does not exist"))
        for stems in _FILES.values():
            for stem in stems[:2]:
                _find(root, stem)
    elif kind == "folder":
        _check_image_folder(args.data_dir, args.train_split)
        _check_image_folder(args.data_dir, args.val_split)
    elif kind == "timm" and args.data_dir and not os.path.exists(args.data_dir) \
            and not args.dataset.startswith(("hfds/", "hfids/")):
        raise DatasetNotFoundError(f"Data directory '{args.data_dir}' does not exist.")


def build_datasets(args, data_cfg: Dict[str, Any]) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int]:
    """Train / eval datasets with timm transforms. Returns (train, eval, num_classes_found)."""
    kind = dataset_kind(args.dataset)
    if args.no_aug:
        train_tf = create_transform(
            data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
            mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"])
    else:
        train_tf = create_transform(
            data_cfg["input_size"], is_training=True, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
            vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, mean=data_cfg["mean"], std=data_cfg["std"],
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    eval_tf = create_transform(
        data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"])
    img_mode = "L" if data_cfg["input_size"][0] == 1 else "RGB"
    n_classes = None
    if kind == "fashion_mnist":
        root = args.data_dir or DEFAULT_FASHION_MNIST_DIR
        train_ds = FashionMNIST(root, "train", transform=train_tf, max_samples=args.max_train_samples, img_mode=img_mode)
        eval_ds = FashionMNIST(root, "test", transform=eval_tf, max_samples=args.max_val_samples, img_mode=img_mode)
        n_classes = 10
    elif kind == "synthetic":
        n_classes = args.num_classes or 4
        size = data_cfg["input_size"][-1]
        train_ds = SyntheticImages(args.max_train_samples or 256, n_classes, size, data_cfg["input_size"][0],
                                   "train", seed=0, transform=train_tf)
        eval_ds = SyntheticImages(args.max_val_samples or 128, n_classes, size, data_cfg["input_size"][0],
                                  "test", seed=0, transform=eval_tf)
    else:
        root = args.data_dir
        name = "" if kind == "folder" else args.dataset
        if kind == "folder":
            _check_image_folder(root, args.train_split)
            _check_image_folder(root, args.val_split)
        elif root and not os.path.exists(root) and not args.dataset.startswith(("hfds/", "hfids/")):
            raise DatasetNotFoundError(f"Data directory '{root}' does not exist.")
        try:
            train_ds = create_dataset(name, root=root, split=args.train_split, is_training=True,
                                      batch_size=args.batch_size, seed=args.seed, input_img_mode=img_mode,
                                      download=False)
            eval_ds = create_dataset(name, root=root, split=args.val_split, is_training=False,
                                     batch_size=args.validation_batch_size or args.batch_size,
                                     input_img_mode=img_mode, download=False)
        except (FileNotFoundError, RuntimeError, AssertionError, ValueError) as e:
            raise DatasetNotFoundError(f"Could not open dataset '{args.dataset}' at '{root}': {e}") from e
        if isinstance(train_ds, torch.utils.data.IterableDataset):
            raise DatasetNotFoundError(
                f"Dataset '{args.dataset}' is iterable (streaming); train.train needs a map-style dataset for "
                f"deterministic, resumable sampling. Use timm's train.py for streaming datasets.")
        train_ds.transform = train_tf
        eval_ds.transform = eval_tf
        reader = getattr(train_ds, "reader", None)
        c2i = getattr(reader, "class_to_idx", None)
        if c2i:
            n_classes = len(c2i)
        if args.max_train_samples:
            train_ds = _Limit(train_ds, args.max_train_samples)
        if args.max_val_samples:
            eval_ds = _Limit(eval_ds, args.max_val_samples)
    if len(train_ds) == 0:
        raise DatasetNotFoundError(f"Training split of dataset '{args.dataset}' is empty.")
    if len(eval_ds) == 0:
        raise DatasetNotFoundError(f"Evaluation split of dataset '{args.dataset}' is empty.")
    return train_ds, eval_ds, n_classes


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also used with one process) whose order depends only on (seed, epoch),
    and which can start part-way through an epoch (``set_start``) to resume mid-epoch."""

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return max(0, self.num_samples - self.start)


def build_loaders(args, train_ds, eval_ds, rank: int, world: int, device: torch.device):
    sampler = ResumableSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    # Private generators: creating a loader iterator must not consume the global RNG (exact resume).
    g_train = torch.Generator().manual_seed(args.seed + 17 + rank)
    g_eval = torch.Generator().manual_seed(args.seed + 29 + rank)
    pin = args.pin_mem and device.type == "cuda"
    common = dict(num_workers=args.workers, pin_memory=pin, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True, generator=g_train, **common)
    # evaluation: each rank gets a disjoint, unpadded shard; results are summed across ranks.
    eval_idx = list(range(rank, len(eval_ds), world))
    eval_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(eval_ds, eval_idx), batch_size=args.validation_batch_size or args.batch_size,
        shuffle=False, drop_last=False, generator=g_eval, **common)
    if len(sampler) < args.batch_size:
        raise DatasetNotFoundError(
            f"Training split has {len(train_ds)} samples ({len(sampler)} per process) - fewer than one batch "
            f"of {args.batch_size}; lower --batch-size or raise --max-train-samples.")
    return train_loader, eval_loader, sampler
