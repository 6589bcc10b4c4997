"""Datasets and loaders for ``train.train``, on timm.data.

* in-memory adapters (``fashion_mnist``, ``synthetic``) and ImageFolder trees: map-style datasets read through a
  :class:`ResumableSampler` (timm's ``RepeatAugSampler`` or torch's ``DistributedSampler`` underneath) so a run can
  restart part-way through an epoch; timm's ``PrefetchLoader`` / ``fast_collate`` on CUDA.
* ``wds/...``, ``hfids/...`` (and any other name ``timm.data.create_dataset`` knows): timm's readers and
  ``timm.data.create_loader``; iterable datasets are sharded per rank and loader worker by timm's readers.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List

import torch
import torch.utils.data
from torch.utils.data.distributed import DistributedSampler

from timm.data import create_dataset, create_loader, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, fast_collate

from timm_cbsa.data import (
    DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetNotFoundError,
    FashionMNIST, SyntheticImages, check_fashion_mnist_dir,
)

_logger = logging.getLogger("train")

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fmnist")
IMAGE_FOLDER_NAMES = ("", "imagefolder", "folder")
STREAMING_PREFIXES = ("wds/", "hfids/", "tfds/")
_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def dataset_kind(name: str) -> str:
    name = (name or "").lower()
    if name in FASHION_MNIST_NAMES:
        return "fashion_mnist"
    if name == "synthetic":
        return "synthetic"
    if name in IMAGE_FOLDER_NAMES:
        return "folder"
    if name.startswith(STREAMING_PREFIXES):
        return "stream"
    return "timm"  # torch/..., hfds/... (map-style) through timm.data.create_dataset


def dataset_defaults(kind: str) -> Dict[str, Any]:
    """Data defaults that apply unless a flag/config overrides them."""
    if kind == "fashion_mnist":
        return dict(num_classes=10, in_chans=1, img_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                    crop_pct=1.0)
    if kind == "synthetic":
        return dict(num_classes=4, in_chans=1, img_size=28, mean=(0.5,), std=(0.25,), crop_pct=1.0)
    return {}


# ---------------------------------------------------------------------------- ImageFolder: one class map

def _split_folder(root: str, split: str) -> str:
    if not root:
        raise DatasetNotFoundError("No --data-dir given: an ImageFolder dataset needs --data-dir pointing at a "
                                   "folder with train/ and val/ sub-folders of class folders.")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"Data directory '{root}' does not exist.")
    candidates = {"validation": ["val", "validation"], "val": ["val", "validation"],
                  "train": ["train", "training"], "training": ["train", "training"]}.get(split, [split])
    for c in candidates:
        if os.path.isdir(os.path.join(root, c)):
            return os.path.join(root, c)
    raise DatasetNotFoundError(
        f"Data directory '{root}' has no '{split}' split folder (looked for {candidates}); "
        f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageFolder layout).")


def _has_image(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(_IMG_EXT) for f in files):
            return True
    return False


def image_folder_class_map(root: str, splits: List[str]) -> Dict[str, int]:
    """One class -> index map for every split of an ImageFolder tree, checked before training starts.

    Raises DatasetNotFoundError naming the folder when a split has no class folders, a class folder holds no
    image, or a class present in one split is missing from another (indices would silently disagree).
    """
    folders = {s: _split_folder(root, s) for s in splits}
    classes = {}
    for s, path in folders.items():
        names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if not names:
            raise DatasetNotFoundError(f"Split folder '{path}' contains no class sub-folders; "
                                       f"expected {path}/<class>/<image>.")
        for n in names:
            if not _has_image(os.path.join(path, n)):
                raise DatasetNotFoundError(
                    f"Class folder '{os.path.join(path, n)}' has no image files ({', '.join(_IMG_EXT)}); "
                    f"remove it or add its images (every split must hold every class).")
        classes[s] = names
    union = sorted(set().union(*classes.values()))
    for s, names in classes.items():
        missing = [c for c in union if c not in names]
        if missing:
            others = [folders[o] for o in classes if o != s and set(missing) & set(classes[o])]
            raise DatasetNotFoundError(
                f"Split folder '{folders[s]}' has no folder for class(es) {missing[:10]} found in {others}; "
                f"every split must hold the same class folders, or labels would not match between splits.")
    return {c: i for i, c in enumerate(union)}


def check_data_source(args) -> None:
    """Cheap check (before the model is built) that the data location exists and looks right."""
    kind = dataset_kind(args.dataset)
    if kind == "fashion_mnist":
        check_fashion_mnist_dir(args.data_dir or DEFAULT_FASHION_MNIST_DIR)
    elif kind == "folder":
        image_folder_class_map(args.data_dir, [args.train_split, args.val_split])
    elif kind in ("timm", "stream") and args.data_dir and not os.path.exists(args.data_dir) \
            and not args.dataset.lower().startswith(("hfds/", "hfids/")):
        raise DatasetNotFoundError(f"Data directory '{args.data_dir}' does not exist.")
    if kind == "stream" and args.dataset.lower().startswith("wds/"):
        try:
            import webdataset  # noqa: F401
        except ImportError:
            raise DatasetNotFoundError("--dataset wds/... needs the webdataset package: pip install webdataset "
                                       "(or pip install 'timm_cbsa[train]').") from None
    if kind == "stream" and args.dataset.lower().startswith("hfids/"):
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DatasetNotFoundError("--dataset hfids/... needs the Hugging Face datasets package: "
                                       "pip install datasets.") from None


# ---------------------------------------------------------------------------- datasets

class _Limit(torch.utils.data.Dataset):
    """First ``n`` samples of a dataset (deterministic subset)."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, min(int(n), len(ds))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.ds[i]

    @property
    def transform(self):
        return self.ds.transform

    @transform.setter
    def transform(self, t):
        self.ds.transform = t


def build_datasets(args, data_cfg: Dict[str, Any]):
    """Train / eval datasets without transforms (set by :func:`build_loaders`). Returns (train, eval, n_classes)."""
    kind = dataset_kind(args.dataset)
    img_mode = "L" if data_cfg["input_size"][0] == 1 else "RGB"
    if kind == "fashion_mnist":
        root = args.data_dir or DEFAULT_FASHION_MNIST_DIR
        train_ds = FashionMNIST(root, "train", max_samples=args.max_train_samples, img_mode=img_mode)
        eval_ds = FashionMNIST(root, "test", max_samples=args.max_val_samples, img_mode=img_mode)
        return train_ds, eval_ds, 10
    if kind == "synthetic":
        n_classes = args.num_classes or 4
        size, chans = data_cfg["input_size"][-1], data_cfg["input_size"][0]
        train_ds = SyntheticImages(args.max_train_samples or 256, n_classes, size, chans, "train", seed=0)
        eval_ds = SyntheticImages(args.max_val_samples or 128, n_classes, size, chans, "test", seed=0)
        return train_ds, eval_ds, n_classes
    root = args.data_dir
    class_map = image_folder_class_map(root, [args.train_split, args.val_split]) if kind == "folder" else None
    name = "" if kind == "folder" else args.dataset
    common = dict(root=root, input_img_mode=img_mode, download=False, class_map=class_map, seed=args.seed)
    try:
        train_ds = create_dataset(name, split=args.train_split, is_training=True, batch_size=args.batch_size,
                                  num_samples=args.train_num_samples, repeats=args.epoch_repeats, **common)
        eval_ds = create_dataset(name, split=args.val_split, is_training=False,
                                 batch_size=args.validation_batch_size or args.batch_size,
                                 num_samples=args.val_num_samples, **common)
    except (FileNotFoundError, RuntimeError, AssertionError, ValueError) as e:
        raise DatasetNotFoundError(f"Could not open dataset '{args.dataset}' at '{root}': {e}") from e
    n_classes = len(class_map) if class_map else None
    if n_classes is None:
        c2i = getattr(getattr(train_ds, "reader", None), "class_to_idx", None)
        n_classes = len(c2i) if c2i else None
    if not isinstance(train_ds, torch.utils.data.IterableDataset):
        if args.max_train_samples:
            train_ds = _Limit(train_ds, args.max_train_samples)
        if args.max_val_samples:
            eval_ds = _Limit(eval_ds, args.max_val_samples)
    if len(train_ds) == 0:
        raise DatasetNotFoundError(f"Training split of dataset '{args.dataset}' is empty.")
    if not isinstance(eval_ds, torch.utils.data.IterableDataset) and len(eval_ds) == 0:
        raise DatasetNotFoundError(f"Evaluation split of dataset '{args.dataset}' is empty.")
    return train_ds, eval_ds, n_classes


# ---------------------------------------------------------------------------- samplers / loaders

class ResumableSampler(torch.utils.data.Sampler):
    """This rank's indices for an epoch, from timm's ``RepeatAugSampler`` (``--aug-repeats``) or torch's
    ``DistributedSampler`` (also for one process), minus the first ``start`` (mid-epoch resume).

    The order depends only on (seed, epoch), never on the global RNG, so a resumed run sees the same samples.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, aug_repeats: int = 0):
        if aug_repeats:
            self.base = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, num_repeats=aug_repeats)
            self.num_samples = self.base.num_selected_samples
        else:
            self.base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
            self.num_samples = self.base.num_samples
        self.seed = seed
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        # RepeatAugSampler seeds with the epoch alone: fold our seed in
        self.base.set_epoch(epoch if isinstance(self.base, DistributedSampler) else self.seed * 100003 + epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _transforms(args, data_cfg, is_training: bool, use_prefetcher: bool):
    kw = dict(input_size=data_cfg["input_size"], mean=data_cfg["mean"], std=data_cfg["std"],
              use_prefetcher=use_prefetcher)
    if not is_training or args.no_aug:
        return create_transform(**kw, is_training=False, interpolation=data_cfg["interpolation"],
                                crop_pct=data_cfg["crop_pct"])
    return create_transform(**kw, is_training=True, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
                            vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
                            interpolation=args.train_interpolation,
                            re_prob=0.0 if use_prefetcher else args.reprob, re_mode=args.remode,
                            re_count=args.recount)


def build_loaders(args, data_cfg: Dict[str, Any], train_ds, eval_ds, rank: int, world: int, device: torch.device):
    """Returns (train_loader, eval_loader, sampler); ``sampler`` is None for iterable (streaming) data."""
    use_prefetcher = device.type == "cuda" and not args.no_prefetcher
    pin = (args.pin_mem or use_prefetcher) and device.type == "cuda"
    eval_bs = args.validation_batch_size or args.batch_size
    if isinstance(train_ds, torch.utils.data.IterableDataset):
        if args.aug_repeats:
            raise DatasetNotFoundError("--aug-repeats needs a map-style dataset; streaming datasets "
                                       f"({args.dataset}) do not support repeated augmentation.")
        cfg = data_cfg
        common = dict(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"], num_workers=args.workers,
                      distributed=world > 1, pin_memory=pin, device=device, use_prefetcher=use_prefetcher,
                      crop_pct=cfg["crop_pct"])
        train_loader = create_loader(
            train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
            vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, **common)
        eval_loader = create_loader(eval_ds, batch_size=eval_bs, is_training=False,
                                    interpolation=cfg["interpolation"], **common)
        if len(train_loader) < 1:
            raise DatasetNotFoundError(f"Streaming dataset '{args.dataset}': fewer samples per rank than one "
                                       f"batch of {args.batch_size}; set --train-num-samples or lower --batch-size.")
        return train_loader, eval_loader, None

    train_ds.transform = _transforms(args, data_cfg, True, use_prefetcher)
    eval_ds.transform = _transforms(args, data_cfg, False, use_prefetcher)
    sampler = ResumableSampler(train_ds, num_replicas=world, rank=rank, seed=args.seed, aug_repeats=args.aug_repeats)
    # Private generators: creating a loader iterator must not consume the global RNG (exact resume).
    g_train = torch.Generator().manual_seed(args.seed + 17 + rank)
    g_eval = torch.Generator().manual_seed(args.seed + 29 + rank)
    common = dict(num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0,
                  collate_fn=fast_collate if use_prefetcher else None)
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True, generator=g_train, **common)
    # evaluation: each rank gets a disjoint, unpadded shard; the sums are all-reduced.
    eval_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(eval_ds, list(range(rank, len(eval_ds), world))), batch_size=eval_bs,
        shuffle=False, drop_last=False, generator=g_eval, **common)
    if len(sampler) < args.batch_size:
        raise DatasetNotFoundError(
            f"Training split has {len(train_ds)} samples ({len(sampler)} per process) - fewer than one batch "
            f"of {args.batch_size}; lower --batch-size or raise --max-train-samples.")
    if use_prefetcher:
        cfg = data_cfg
        chans = cfg["input_size"][0]
        train_loader = PrefetchLoader(train_loader, mean=cfg["mean"], std=cfg["std"], channels=chans, device=device,
                                      re_prob=0.0 if args.no_aug else args.reprob, re_mode=args.remode,
                                      re_count=args.recount)
        eval_loader = PrefetchLoader(eval_loader, mean=cfg["mean"], std=cfg["std"], channels=chans, device=device)
    return train_loader, eval_loader, sampler

