#!/usr/bin/env python3
"""Train timm / timm_cbsa image classifiers: a short loop over timm's library pieces.

Run from the repository root::

    python -m train.train --config train/configs/fmnist_quickstart.yaml
    torchrun --nproc_per_node 8 -m train.train --config ... --output runs/x --resume auto

Flags follow timm's ``train.py`` names; ``--config FILE.yaml`` sets their defaults (keys are flag names, with ``-``
or ``_``; ``model_kwargs`` / ``opt_kwargs`` given on the command line are merged over the file's).

timm does: distributed set-up (``init_distributed_device``), seeding (``random_seed``), logging
(``setup_default_logging``), datasets and loaders (``create_dataset``, ``create_loader``, ``PrefetchLoader``,
``RepeatAugSampler``), optimizer / scheduler / EMA / AMP scaler / mixup / losses, checkpoint history
(``CheckpointSaver``), ``distribute_bn``, ``update_summary``. What is ours: exact mid-epoch resume (model, optimizer,
scheduler, EMA, scaler, sampler position, RNG), fsync'ed checkpoints and a run-folder lock (:mod:`train.checkpoint`),
a non-finite-loss stop, checkpoint on preemption (:mod:`train.preempt`), the Fashion-MNIST adapter.

Host syncs: the loop keeps loss, accuracy and a non-finite flag on the device and reads them (one all-reduce, one
copy to the host) only at a *sync point*: every ``--log-interval`` steps, before any checkpoint, at the end of an
epoch, and in distributed runs every ``--preempt-check-interval`` steps, where the ranks also agree on a preemption
signal. A checkpoint is written only after a sync point found no non-finite loss.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

import timm
from timm.data import Mixup, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (
    ModelEmaV3, NativeScaler, ParseKwargs, dispatch_clip_grad, distribute_bn, init_distributed_device,
    is_distributed_env, random_seed, setup_default_logging, update_summary,
)

from . import preempt
from .checkpoint import (
    CKPT_FORMAT_VERSION, CheckpointError, RunFolderError, RunLock, Saver, atomic_write_text, clean_stale_tmp,
    find_resume_checkpoint, get_rng_state, load_checkpoint_file, previous_run_files, remove_previous_run,
    set_rng_state,
)
from .data import build_datasets, build_loaders, check_data_source, dataset_defaults, dataset_kind

_logger = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss."""


class ModelNotFoundError(ValueError):
    """--model names no registered model."""


class ConfigError(ValueError):
    """Bad --config file, flag value or flag combination."""


# ============================================================================ arguments

def _float_tuple(n=None):
    return dict(type=float, nargs=n or "+")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.train",
        description="Train timm / timm_cbsa models (CBSA) with timm's library APIs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", metavar="FILE",
                   help="YAML file whose keys (flag names) set the defaults; command-line flags override it")

    g = p.add_argument_group("Dataset")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="dataset root (ImageFolder: DIR/train, DIR/val). fashion_mnist defaults to "
                        "/usr/share/datasets/fashion-mnist")
    g.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist | synthetic | '' or imagefolder (ImageFolder/ImageTar) | any "
                        "timm.data.create_dataset name (torch/..., hfds/...)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--max-train-samples", type=int, default=None, help="use only the first N training samples")
    g.add_argument("--max-val-samples", type=int, default=None, help="use only the first N eval samples")
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--in-chans", type=int, default=None, help="image channels (fashion_mnist: 1)")
    g.add_argument("--img-size", type=int, default=None, help="image size; also passed to the model")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="C H W")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", **_float_tuple(), default=None)
    g.add_argument("--std", **_float_tuple(), default=None)
    g.add_argument("--interpolation", default="", help="eval resize interpolation (default from model)")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch of a streaming dataset (wds/, hfids/) when its info file has none")
    g.add_argument("--val-num-samples", type=int, default=None, help="samples of a streaming eval split")
    g.add_argument("--epoch-repeats", type=float, default=0.0, help="repeat a streaming train split N times an epoch")
    g.add_argument("--workers", "-j", type=int, default=0, help="data loader worker processes (persistent)")
    g.add_argument("--pin-mem", action="store_true", default=False)
    g.add_argument("--no-prefetcher", action="store_true", default=False,
                   help="no timm CUDA prefetcher (uint8 batches normalised on a side stream); CPU never uses it")
    g.add_argument("--linear-baseline", action="store_true", default=False,
                   help="in-memory datasets (fashion_mnist, synthetic): also fit a multinomial logistic regression "
                        "on the raw pixels of the same training set and report its test accuracy next to the model's")

    g = p.add_argument_group("Model")
    g.add_argument("--model", default="cbsa_vit_tiny", help="timm model name (timm_cbsa registers cbsa_vit_*, cbt_*)")
    g.add_argument("--pretrained", action="store_true", default=False, help="load timm pretrained weights")
    g.add_argument("--pretrained-path", default=None, help="local weights file for --pretrained")
    g.add_argument("--initial-checkpoint", default="", help="load model weights (only) from this checkpoint")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra create_model kwargs, e.g. attn_layer=cbsa rep_grid=4 depth=6")
    g.add_argument("--model-import", "--device-modules", dest="model_import", nargs="*", default=["timm_cbsa"],
                   help="modules imported before the model is created (registers models / attention layers)")
    g.add_argument("--convert", default=None, metavar="VARIANT",
                   help="ViT adaptation: after creating (and loading pretrained weights into) a timm ViT, swap its "
                        "attention with timm_cbsa.convert(model, variant=VARIANT): cbsa_star | agent | cbsa | linear")
    g.add_argument("--convert-rep-grid", type=int, default=None, help="rep_grid for --convert (default 8)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument("--grad-checkpointing", action="store_true", default=False,
                   help="activation checkpointing in the model's blocks (model.set_grad_checkpointing)")
    g.add_argument("--sync-bn", action="store_true", default=False,
                   help="SyncBatchNorm across processes (CUDA; the CBT stem has BatchNorm)")
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", ""],
                   help="after each epoch, average ('reduce') or copy from rank 0 ('broadcast') the BatchNorm running "
                        "statistics across processes; '' = leave them (no effect with --sync-bn or one process)")

    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default="adamw", help="timm optimizer name (adamw, lion, sgd, lamb, ...)")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", **_float_tuple(), default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm")
    g.add_argument("--layer-decay", type=float, default=None)
    g.add_argument("--no-filter-bias-and-bn", dest="filter_bias_and_bn", action="store_false", default=True,
                   help="apply weight decay to biases / norms / embeddings too (the paper's CBT recipe)")
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)

    g = p.add_argument_group("Schedule")
    g.add_argument("--sched", default="cosine", help="timm scheduler (cosine, step, multistep, plateau, poly, ...)")
    g.add_argument("--sched-on-updates", action="store_true", default=False, help="step the LR every optimizer update")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: from --lr-base scaled to the global batch, else 1e-3)")
    g.add_argument("--lr-base", type=float, default=None,
                   help="base learning rate for a global batch of --lr-base-size; lr = lr_base * scale "
                        "(used when --lr is not given)")
    g.add_argument("--lr-base-size", type=int, default=256, help="global batch size --lr-base refers to")
    g.add_argument("--lr-base-scale", default="", choices=["", "linear", "sqrt"],
                   help="linear or sqrt scaling of --lr-base with the global batch (default: sqrt for adaptive "
                        "optimizers (ada*, lamb, lion), else linear)")
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--warmup-prefix", action="store_true", default=False)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)

    g = p.add_argument_group("Augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", default=False)
    g.add_argument("--scale", **_float_tuple(2), default=[0.08, 1.0], help="RandomResizedCrop scale")
    g.add_argument("--ratio", **_float_tuple(2), default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", default=None, help="AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--bce-loss", action="store_true", default=False, help="binary cross-entropy (timm BinaryCrossEntropy)")
    g.add_argument("--bce-target-thresh", type=float, default=None, help="threshold binarising soft BCE targets")
    g.add_argument("--aug-repeats", type=float, default=0,
                   help="repeated augmentation (DeiT): each sample N times per epoch on different processes "
                        "(timm RepeatAugSampler); map-style datasets")

    g = p.add_argument_group("Training")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="per-process batch size")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--amp", action="store_true", default=False, help="mixed precision (bf16 on CPU)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--deterministic", action="store_true", default=False,
                   help="torch.use_deterministic_algorithms(True) (bit-exact resume checks)")
    g.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps in total")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")

    g = p.add_argument_group("Output, checkpoints, logging")
    g.add_argument("--output", default="output/train", help="run folder (all checkpoints / logs go here)")
    g.add_argument("--experiment", default="", help="sub-folder of --output")
    g.add_argument("--resume", default="", help="checkpoint path, or 'auto' = newest complete checkpoint in the "
                                                "run folder if any (else start fresh)")
    g.add_argument("--overwrite", action="store_true", default=False,
                   help="start a fresh run in a run folder that holds a previous run: its checkpoints, summary and "
                        "args are deleted first (without this, such a folder is refused unless --resume is given)")
    g.add_argument("--auto-resume", action="store_true", default=False, help="same as --resume auto")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="resume only the model weights (not optimizer/scheduler/EMA/scaler/RNG)")
    g.add_argument("--checkpoint-interval-steps", type=int, default=0,
                   help="also write a mid-epoch recovery checkpoint every N optimizer steps")
    g.add_argument("--preempt-check-interval", type=int, default=10,
                   help="distributed runs: every N optimizer steps the ranks agree (one all-reduce) whether any of "
                        "them got a preemption signal (USR2/TERM); one process checks after every step")
    g.add_argument("--checkpoint-hist", type=int, default=3, help="end-of-epoch checkpoints to keep (best first)")
    g.add_argument("--eval-metric", default="top1")
    g.add_argument("--log-interval", type=int, default=50,
                   help="log (and read the device-side loss / accuracy / non-finite flag) every N optimizer steps")
    g.add_argument("--log-tensorboard", action="store_true", default=False, help="TensorBoard logs in DIR/tb")
    g.add_argument("--log-wandb", action="store_true", default=False,
                   help="log to Weights & Biases (needs `pip install wandb`; project = --experiment or timm_cbsa)")
    g.add_argument("--quiet", action="store_true", default=False, help="only warnings and the final summary")

    # fault injection for tests (hidden)
    p.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-signal-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-signal", type=int, default=15, help=argparse.SUPPRESS)
    return p


def _load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover
        raise ConfigError("--config needs PyYAML: pip install pyyaml") from e
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}' does not exist.")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"Config file '{path}' must be a mapping of flag names to values.")
    dests = {a.dest for a in parser._actions}
    out = {}
    for k, v in cfg.items():
        d = str(k).lstrip("-").replace("-", "_")
        if d not in dests or d in ("help", "config"):
            raise ConfigError(f"Config file '{path}': unknown option '{k}'.")
        out[d] = v
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse flags over the ``--config`` defaults and check the values (:func:`check_values`)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    cfg = _load_config(known.config, parser) if known.config else {}
    parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    for key in ("model_kwargs", "opt_kwargs"):  # command-line kwargs merge over the file's, key by key
        given, from_cfg = getattr(args, key), cfg.get(key)
        if given is None or isinstance(given, (list, tuple)):
            given = {}
        if isinstance(from_cfg, dict) and given is not from_cfg:
            given = {**from_cfg, **given}
        setattr(args, key, dict(given))
    if args.auto_resume:
        args.resume = "auto"
    check_values(args)
    return args


# (flag, test, requirement) for every numeric flag
_CHECKS = (
    ("epochs", lambda v: v >= 1, ">= 1"), ("batch_size", lambda v: v >= 1, ">= 1"),
    ("validation_batch_size", lambda v: v is None or v >= 1, ">= 1"),
    ("lr", lambda v: v is None or v > 0, "> 0"), ("lr_base", lambda v: v is None or v > 0, "> 0"),
    ("lr_base_size", lambda v: v >= 1, ">= 1"), ("grad_accum_steps", lambda v: v >= 1, ">= 1"),
    ("workers", lambda v: v >= 0, ">= 0"), ("checkpoint_interval_steps", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("checkpoint_hist", lambda v: v >= 1, ">= 1"), ("log_interval", lambda v: v >= 1, ">= 1"),
    ("preempt_check_interval", lambda v: v >= 1, ">= 1"), ("max_steps", lambda v: v is None or v >= 1, ">= 1"),
    ("warmup_epochs", lambda v: v >= 0, ">= 0"), ("cooldown_epochs", lambda v: v >= 0, ">= 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"), ("min_lr", lambda v: v >= 0, ">= 0"),
    ("warmup_lr", lambda v: v >= 0, ">= 0"), ("smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("mixup", lambda v: v >= 0, ">= 0"), ("cutmix", lambda v: v >= 0, ">= 0"),
    ("drop", lambda v: 0 <= v < 1, "in [0, 1)"), ("drop_path", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("aug_repeats", lambda v: v == 0 or v >= 1, "0 (off) or >= 1"),
    ("train_num_samples", lambda v: v is None or v >= 1, ">= 1"),
    ("val_num_samples", lambda v: v is None or v >= 1, ">= 1"),
    ("max_train_samples", lambda v: v is None or v >= 1, ">= 1"),
    ("max_val_samples", lambda v: v is None or v >= 1, ">= 1"),
    ("img_size", lambda v: v is None or v >= 1, ">= 1"), ("num_classes", lambda v: v is None or v >= 1, ">= 1"),
    ("in_chans", lambda v: v is None or v >= 1, ">= 1"), ("threads", lambda v: v is None or v >= 1, ">= 1"),
    ("clip_grad", lambda v: v is None or v > 0, "> 0"), ("model_ema_decay", lambda v: 0 < v < 1, "in (0, 1)"),
)


def check_values(args: argparse.Namespace) -> None:
    """Flag values that are wrong whatever the machine: raises ConfigError naming the flag."""
    for dest, ok, need in _CHECKS:
        v = getattr(args, dest)
        if not isinstance(v, (int, float, type(None))) or not ok(v):
            raise ConfigError(f"--{dest.replace('_', '-')} must be {need} (got {v!r}).")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ConfigError(f"--mixup/--cutmix need an even --batch-size (got {args.batch_size}).")


def validate_args(args: argparse.Namespace, check_paths: bool = True) -> None:
    """Everything the trainer can check before it starts (the SLURM launcher runs this before queueing).

    Flag values (:func:`check_values`), the model name (after ``--model-import``), the data location
    (``check_paths=False`` skips it, e.g. when the data exist only on the cluster), optional packages the flags
    need. Raises ConfigError / ModelNotFoundError / DatasetNotFoundError naming the flag or path.
    """
    check_values(args)
    _import_modules(args.model_import)
    _check_model_name(args.model)
    if check_paths:
        check_data_source(args)
    if args.log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--log-wandb needs the wandb package: pip install wandb (or drop --log-wandb).") from None
    if args.log_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("--log-tensorboard needs the tensorboard package: pip install tensorboard.") from None
    if args.linear_baseline and dataset_kind(args.dataset) not in ("fashion_mnist", "synthetic"):
        raise ConfigError(f"--linear-baseline needs an in-memory dataset (fashion_mnist, synthetic), not "
                          f"'{args.dataset}'.")
    if args.aug_repeats and dataset_kind(args.dataset) == "stream":
        raise ConfigError("--aug-repeats needs a map-style dataset; streaming datasets (wds/, hfids/) do not "
                          "support repeated augmentation.")


def resolve_lr(args, global_batch: int) -> float:
    """``--lr``, or ``--lr-base`` scaled to the global batch (timm's rule), or 1e-3."""
    if args.lr is not None:
        return args.lr
    if args.lr_base is None:
        return 1e-3
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb", "lion")) else "linear")
    ratio = global_batch / args.lr_base_size
    return args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


# ============================================================================ distributed

class Collectives:
    """Every collective the trainer runs goes through here, on tensors on the training device (NCCL accepts only
    CUDA tensors; a tensor on another device raises at once instead of hanging or failing on a GPU cluster)."""

    def __init__(self, device: torch.device, world: int):
        self.device, self.world = device, world

    def _check(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise RuntimeError(f"collective handed a tensor on {t.device}; the training device is {self.device}")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce (sum) of ``t``; returns ``t``."""
        self._check(t)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj: Any) -> List[Any]:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.sum_(torch.zeros(1, device=self.device)).item()


def setup_distributed(args) -> torch.device:
    """timm's ``init_distributed_device`` (env:// from torchrun or SLURM); sets args.rank/world_size/distributed."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} requested but CUDA is not available.")
    if dist.is_available() and dist.is_initialized():  # set up by the caller
        args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
        args.local_rank, args.distributed = int(os.environ.get("LOCAL_RANK", 0)), args.world_size > 1
        if args.device.startswith("cuda"):
            args.device = f"cuda:{args.local_rank}"
            torch.cuda.set_device(args.device)
        device = torch.device(args.device)
    else:
        if is_distributed_env():
            for k in ("MASTER_ADDR", "MASTER_PORT"):
                if k not in os.environ:
                    raise ConfigError(f"Distributed run (WORLD_SIZE / SLURM_NTASKS > 1) but {k} is not set.")
        device = init_distributed_device(args)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ============================================================================ model

def _import_modules(mods):
    for m in mods or []:
        try:
            importlib.import_module(m)
        except ImportError as e:
            if m == "timm_cbsa":
                _logger.warning("Could not import timm_cbsa (%s); only plain timm models are available.", e)
            else:
                raise ConfigError(f"--model-import: cannot import module '{m}': {e}") from e


def _check_model_name(name: str) -> None:
    base = name.split(".")[0]
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(base):
        similar = timm.list_models(f"*{base.split('_')[0]}*")[:12]
        raise ModelNotFoundError(
            f"Unknown model '{name}'. Similar registered names: {similar or 'none'}. "
            f"timm_cbsa models: {timm.list_models('*cbsa*') + timm.list_models('cbt_*')}. "
            f"(Models of other packages need --model-import PACKAGE.)")


def create_model(args, num_classes: int, in_chans: int) -> nn.Module:
    name = args.model
    _check_model_name(name)
    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("num_classes", num_classes)
    if in_chans != 3:
        kwargs.setdefault("in_chans", in_chans)
    if args.img_size is not None:
        kwargs.setdefault("img_size", args.img_size)
    if args.drop:
        kwargs.setdefault("drop_rate", args.drop)
    if args.drop_path is not None:
        kwargs.setdefault("drop_path_rate", args.drop_path)
    pcfg = {"file": args.pretrained_path} if args.pretrained_path else None
    try:
        model = timm.create_model(name, pretrained=args.pretrained, pretrained_cfg_overlay=pcfg, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelNotFoundError(str(e)) from e
        raise
    except TypeError as e:
        raise ConfigError(f"Model '{name}' rejected the arguments {kwargs}: {e}") from e
    if args.convert:
        try:
            from timm_cbsa import convert
        except ImportError as e:
            raise ConfigError(f"--convert needs timm_cbsa.convert ({e})") from e
        try:
            model = convert(model, variant=args.convert, rep_grid=args.convert_rep_grid)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--convert {args.convert}: {e}") from e
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"--grad-checkpointing: model '{name}' has no set_grad_checkpointing().")
        model.set_grad_checkpointing(True)
    return model


def model_config(args, model: nn.Module, num_classes: int, in_chans: int) -> Dict[str, Any]:
    """How the model was built (saved in every checkpoint, compared on resume / --initial-checkpoint)."""
    cfg = dict(model=args.model, model_kwargs=dict(args.model_kwargs), num_classes=num_classes, in_chans=in_chans,
               img_size=args.img_size, convert=args.convert, convert_rep_grid=args.convert_rep_grid)
    layer_cfg = getattr(sys.modules.get("timm_cbsa"), "cbsa_config", None)
    if layer_cfg is not None:
        cfg["cbsa"] = layer_cfg(model)
    else:  # effective CBSA settings of the first representative-based layer (defaults included)
        for m in model.modules():
            if hasattr(m, "rep_grid") and hasattr(m, "legacy_pool"):
                cfg["cbsa"] = {"rep_grid": list(m.rep_grid), "legacy_pool": bool(m.legacy_pool)}
                break
    return cfg


_CFG_FLAGS = dict(model="--model", num_classes="--num-classes", in_chans="--in-chans", img_size="--img-size",
                  convert="--convert", convert_rep_grid="--convert-rep-grid")


def check_model_config(saved: Optional[Dict[str, Any]], current: Dict[str, Any], path: str) -> None:
    """Refuse a checkpoint whose model was built differently, naming the argument that differs."""
    if not saved:
        return  # older checkpoint: the state-dict comparison is all we have
    diffs = []
    for key, flag in _CFG_FLAGS.items():
        if key in saved and saved[key] != current.get(key):
            diffs.append(f"{flag} {saved[key]} (this run: {current.get(key)})")
    a, b = saved.get("model_kwargs") or {}, current.get("model_kwargs") or {}
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k] and k != "backend":
            diffs.append(f"--model-kwargs {k}={a[k]!r} (this run: {k}={b[k]!r})")
    ca, cb = saved.get("cbsa") or {}, current.get("cbsa") or {}
    for k in sorted(set(ca) & set(cb)):
        if ca[k] != cb[k] and not any(d.startswith(f"--model-kwargs {k}=") for d in diffs):
            diffs.append(f"{k}={ca[k]!r} in the CBSA layers (this run: {cb[k]!r}; set with --model-kwargs {k}=...)")
    if diffs:
        raise CheckpointError(f"Checkpoint '{path}' was built differently from this run's model: "
                              + "; ".join(diffs) + ". Build the model the same way, or start a fresh run.")


def _load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str, name: str) -> None:
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise CheckpointError(f"Checkpoint '{path}' is incompatible with model '{name}': " + "; ".join(parts) + ".")
    model.load_state_dict(state, strict=True)


def build_loss(args, mixup_active: bool) -> nn.Module:
    """timm's choice of training loss (mixup / smoothing / BCE)."""
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else args.smoothing,
                                  target_threshold=args.bce_target_thresh)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


# ============================================================================ evaluation, baseline

def _autocast(args, device):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if (device.type != "cuda" or args.amp_dtype == "bfloat16") else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, device, args, coll: Collectives) -> Dict[str, float]:
    """Loss / top-1 / top-5 over every rank's shard: sums kept on the device, one all-reduce, one host read."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(args, device):
            out = model(x)
        out = out.float()
        hit = out.topk(min(5, out.shape[-1]), dim=-1).indices.eq(y[:, None])
        sums += torch.stack([nn.functional.cross_entropy(out, y, reduction="sum"), hit[:, 0].sum(),
                             hit.any(dim=-1).sum(), torch.tensor(y.shape[0], device=device)]).double()
    loss, top1, top5, n = coll.sum_(sums).tolist()
    n = max(n, 1)
    return OrderedDict(loss=loss / n, top1=100 * top1 / n, top5=100 * top5 / n)


def _pixels(ds):
    base = getattr(ds, "ds", ds)  # _Limit
    images, targets = getattr(base, "images", None), getattr(base, "targets", None)
    if images is None or targets is None:
        return None
    n = len(ds)
    x = torch.from_numpy(images[:n].reshape(n, -1)).float() / 255.0
    return x, torch.from_numpy(targets[:n]).long()


def linear_baseline(train_ds, eval_ds, num_classes: int, iters: int = 100) -> Optional[float]:
    """Test top-1 of a multinomial logistic regression on the raw pixels of the training set (full-batch L-BFGS,
    features standardised with the training statistics, L2 1e-4). Needs an in-memory dataset (``.images``)."""
    train, test = _pixels(train_ds), _pixels(eval_ds)
    if train is None or test is None:
        return None
    (x, y), (xt, yt) = train, test
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    x, xt = (x - mean) / std, (xt - mean) / std
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((xt @ w + b).argmax(-1) == yt).float().mean().item()


# ============================================================================ logging

def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _setup_logging(out_dir: str, rank: int, quiet: bool) -> Optional[logging.Handler]:
    if not logging.root.handlers:
        setup_default_logging()
    _logger.setLevel(logging.WARNING if (rank != 0 or quiet) else logging.INFO)
    if rank != 0:
        return None
    fh = logging.FileHandler(os.path.join(out_dir, "log.txt"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    fh.setLevel(logging.INFO)
    _logger.addHandler(fh)
    return fh


def _plain(args) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def _save_args(args, path):
    import yaml
    atomic_write_text(path, yaml.safe_dump(_plain(args), sort_keys=False))


# ============================================================================ main

def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns the final metrics ``{'top1', 'top5', 'loss', 'epoch', 'step', ...}``."""
    args = parse_args(argv)
    validate_args(args)
    owns_group = not (dist.is_available() and dist.is_initialized())
    device = setup_distributed(args)
    try:
        return _run_locked(args, device)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run_locked(args, device) -> Dict[str, Any]:
    """Rank 0 takes the run folder (lock; refuse / clear a previous run); every rank learns whether it could."""
    coll = Collectives(device, args.world_size)
    out_dir = os.path.join(args.output, args.experiment) if args.experiment else args.output
    lock, error = None, None
    if args.rank == 0:
        try:
            lock = RunLock(out_dir).acquire()
            previous = previous_run_files(out_dir)
            if previous and not args.resume:
                if not args.overwrite:
                    raise RunFolderError(
                        f"Run folder '{out_dir}' holds a previous run ({', '.join(previous[:6])}). Continue it with "
                        f"--resume auto, start over with --overwrite (deletes those files), or use another "
                        f"--output / --experiment.")
                remove_previous_run(out_dir)
        except RunFolderError as e:
            error = e
            if lock is not None:
                lock.release()
    ok = coll.sum_(torch.tensor([0.0 if error else 1.0], device=device)).item() == args.world_size
    if not ok:
        raise error or RunFolderError(f"Rank 0 could not take the run folder '{out_dir}' (see its error).")
    try:
        return _train(args, device, coll, out_dir)
    finally:
        if lock is not None:
            lock.release()


def _train(args, device, coll: Collectives, out_dir: str) -> Dict[str, Any]:
    rank, world, distributed = args.rank, args.world_size, args.distributed
    log_handler = _setup_logging(out_dir, rank, args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random_seed(args.seed, rank)

    # ---- data config, datasets, model ---------------------------------------
    kind = dataset_kind(args.dataset)
    dd = dataset_defaults(kind)
    in_chans = args.input_size[0] if args.input_size else (args.in_chans or dd.get("in_chans", 3))
    if args.img_size is None and "img_size" in dd and not args.input_size:
        args.img_size = dd["img_size"]
    num_classes = args.num_classes or dd.get("num_classes")
    model = create_model(args, num_classes or 1000, in_chans)  # provisional class count: data config from it
    cfg_args = dict(vars(args))
    if dd.get("mean") and args.mean is None:
        cfg_args.update(mean=dd["mean"], std=dd["std"])
    if dd.get("crop_pct") and args.crop_pct is None:
        cfg_args["crop_pct"] = dd["crop_pct"]
    cfg_args["input_size"] = args.input_size or ((in_chans, args.img_size, args.img_size) if args.img_size else None)
    data_cfg = resolve_data_config(cfg_args, model=model, verbose=False)
    if len(data_cfg["mean"]) != data_cfg["input_size"][0]:
        data_cfg["mean"] = tuple(data_cfg["mean"][:1]) * data_cfg["input_size"][0]
        data_cfg["std"] = tuple(data_cfg["std"][:1]) * data_cfg["input_size"][0]
    train_ds, eval_ds, found_classes = build_datasets(args, data_cfg)
    if found_classes and num_classes and num_classes < found_classes:
        raise ConfigError(f"--num-classes {num_classes} but the dataset has {found_classes} classes.")
    if num_classes is None:
        num_classes = found_classes or 1000
        if num_classes != 1000:
            model = create_model(args, num_classes, in_chans)
    mcfg = model_config(args, model, num_classes, in_chans)
    if args.initial_checkpoint:
        init = load_checkpoint_file(args.initial_checkpoint)
        check_model_config(init.get("model_config"), mcfg, args.initial_checkpoint)
        _load_model_state(model, init["state_dict"], args.initial_checkpoint, args.model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and distributed:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm); drop it on CPU.")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_raw = model
    n_params = sum(p.numel() for p in model.parameters())

    train_loader, eval_loader, sampler = build_loaders(args, data_cfg, train_ds, eval_ds, rank, world, device)
    batches_per_epoch = len(train_loader)
    accum = args.grad_accum_steps
    updates_per_epoch = (batches_per_epoch + accum - 1) // accum
    global_batch = args.batch_size * world * accum
    args.lr = resolve_lr(args, global_batch)
    _logger.info("Model %s (%s) %.2fM params, %d classes, input %s; data %s: %s train / %s eval; world %d on %s; "
                 "global batch %d, lr %.3g", args.model, dict(args.model_kwargs), n_params / 1e6, num_classes,
                 tuple(data_cfg["input_size"]), args.dataset, _len(train_ds), _len(eval_ds), world, device,
                 global_batch, args.lr)

    # ---- optimisation (timm) --------------------------------------------------
    opt_kwargs = dict(args.opt_kwargs)
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model_raw, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay,
                                    filter_bias_and_bn=args.filter_bias_and_bn, **opt_kwargs)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        warmup_prefix=args.warmup_prefix, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    loss_scaler = NativeScaler(device="cuda") if args.amp and device.type == "cuda" and \
        args.amp_dtype == "float16" else None
    model_ema = ModelEmaV3(model_raw, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    train_loss_fn = build_loss(args, mixup_fn is not None).to(device)

    # ---- resume ----------------------------------------------------------------
    start_epoch, skip_batches, global_step = 0, 0, 0
    resume_path, ckpt = None, None
    if args.resume == "auto":
        if rank == 0:
            removed = clean_stale_tmp(out_dir)
            if removed:
                _logger.info("Removed temporary files of a dead writer: %s", removed)
        found = find_resume_checkpoint(out_dir)
        if found:
            resume_path, ckpt = found
        else:
            _logger.info("--resume auto: no checkpoint in %s, starting fresh", out_dir)
    elif args.resume:
        resume_path, ckpt = args.resume, load_checkpoint_file(args.resume)
    if ckpt is not None:
        check_model_config(ckpt.get("model_config"), mcfg, resume_path)
        _load_model_state(model_raw, ckpt["state_dict"], resume_path, args.model)
        if not args.no_resume_opt:
            start_epoch, skip_batches, global_step = _restore(
                ckpt, resume_path, args, optimizer, lr_scheduler, model_ema, model_raw, loss_scaler,
                batches_per_epoch, world, rank, streaming=sampler is None)
        _logger.info("Resumed from %s: epoch %d, batch %d, global step %d", resume_path, start_epoch,
                     skip_batches, global_step)

    # ---- checkpoints (timm's CheckpointSaver, our content) -----------------------
    extra: Dict[str, Any] = {}

    def state_fn(epoch, metric):
        st = {"version": CKPT_FORMAT_VERSION, "arch": args.model, "args": _plain(args), "model_config": mcfg,
              "epoch": epoch, "state_dict": model_raw.state_dict(), "optimizer": optimizer.state_dict(),
              "scheduler": lr_scheduler.state_dict(), "metric": metric, "timm_version": timm.__version__, **extra}
        if model_ema is not None:
            st["state_dict_ema"] = model_ema.module.state_dict()
        if loss_scaler is not None:
            st[loss_scaler.state_dict_key] = loss_scaler.state_dict()
        return st

    saver = Saver(state_fn, out_dir, decreasing=args.eval_metric == "loss",
                  max_history=args.checkpoint_hist) if rank == 0 else None
    if saver is not None and ckpt is not None and ckpt.get("saver") and \
            os.path.dirname(os.path.abspath(resume_path)) == os.path.abspath(out_dir):
        saver.load_state_dict(ckpt["saver"])
    del ckpt

    def save(epoch, batches_done, complete, metrics=None):
        """Every rank calls this (RNG states are gathered); rank 0 writes."""
        rng = coll.gather_objects(get_rng_state())
        if saver is None:
            return
        extra.update(epoch_complete=complete, batches_done=batches_done, global_step=global_step,
                     batch_size=args.batch_size, world_size=world, rng_states=rng, metrics=dict(metrics or {}))
        if complete:
            saver.save_checkpoint(epoch, metric=(metrics or {}).get(args.eval_metric))
            saver.remove_recovery()
        else:
            saver.save_recovery(epoch, batches_done)

    # ---- compile / DDP / loggers ----------------------------------------------------
    model = model_raw
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model_raw.modules())
    tb = None
    if rank == 0:
        _save_args(args, os.path.join(out_dir, "args.yaml"))
        if args.log_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(out_dir, "tb"))
        if args.log_wandb:
            import wandb
            wandb.init(project=args.experiment or "timm_cbsa", config=_plain(args), dir=out_dir)

    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = preempt.install()
    else:
        _logger.warning("train.train.main runs outside the main thread: no checkpoint on preemption signals.")

    # ---- loop ------------------------------------------------------------------------
    total_steps = num_epochs * updates_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if start_epoch > 0 or global_step > 0:  # resumed: put the LR where the interrupted run had it
        lr_scheduler.step(start_epoch)
        lr_scheduler.step_update(num_updates=global_step)
    t_run, steps_this_run = time.time(), 0
    last_epoch, eval_metrics = start_epoch - 1, {}
    stopped = global_step >= total_steps and args.max_steps is not None

    def sync(stats, epoch, batch_idx):
        """The only host read of the loop: [loss*n, correct, n, non-finite, preempt] summed over ranks."""
        flag = torch.tensor([1.0 if handler is not None and handler.requested else 0.0], device=device)
        vals = coll.sum_(torch.cat([stats, flag])).tolist()
        if vals[3] > 0:
            bad = int(first_bad.item())
            ckpts = sorted(glob.glob(os.path.join(out_dir, "*.pth.tar")), key=os.path.getmtime)
            msg = (f"Non-finite loss at optimizer step {bad if bad else '? (on another rank)'} (epoch {epoch}; found "
                   f"by the check after step {global_step}); stopping. Nothing was saved after the last clean check: "
                   + (f"the last good checkpoint is kept: {ckpts[-1]}." if ckpts else "no checkpoint was written.")
                   + " Try a lower --lr, --clip-grad, or disabling --amp.")
            _logger.error(msg)
            raise NonFiniteLossError(msg)
        return vals

    try:
        for epoch in range(start_epoch, num_epochs):
            if stopped:
                break
            skip = skip_batches if epoch == start_epoch else 0
            if sampler is not None:
                sampler.set_epoch(epoch)
                sampler.set_start(skip * args.batch_size)
            elif hasattr(train_loader.dataset, "set_epoch"):
                train_loader.dataset.set_epoch(epoch)
            model.train()
            stats = torch.zeros(4, device=device)  # loss * n, correct, n, non-finite losses
            first_bad = torch.zeros((), device=device, dtype=torch.long)  # first step with a non-finite loss
            prev, t_epoch, batch_idx = [0.0] * 5, time.time(), skip - 1
            optimizer.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(train_loader):
                if skip + i >= batches_per_epoch:
                    break  # streaming data resumed mid-epoch: only the rest of the epoch's batches
                batch_idx = skip + i
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                y_hard = y
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                last_in_epoch = batch_idx + 1 == batches_per_epoch
                need_update = (batch_idx + 1) % accum == 0 or last_in_epoch
                with model.no_sync() if (distributed and not need_update) else nullcontext():
                    with _autocast(args, device):
                        out = model(x)
                        loss = train_loss_fn(out, y)
                    if args.debug_nan_at_step is not None and global_step + 1 >= args.debug_nan_at_step:
                        loss = loss * float("nan")
                    if loss_scaler is not None:
                        loss_scaler(loss / accum, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                    parameters=model_raw.parameters(), need_update=need_update)
                    else:
                        (loss / accum).backward()
                        if need_update:
                            if args.clip_grad is not None:
                                dispatch_clip_grad(model_raw.parameters(), args.clip_grad, mode=args.clip_mode)
                            optimizer.step()
                with torch.no_grad():  # device-side running sums: no host sync here
                    loss = loss.detach().float()
                    stats[0] += loss * x.shape[0]
                    stats[2] += x.shape[0]
                    nonfinite = ~torch.isfinite(loss)
                    stats[3] += nonfinite.float()
                    first_bad = torch.where(nonfinite & (first_bad == 0), global_step + 1, first_bad)
                    if mixup_fn is None and y_hard.ndim == 1:
                        stats[1] += (out.detach().argmax(-1) == y_hard).sum()
                if not need_update:
                    continue
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                steps_this_run += 1
                if model_ema is not None:
                    model_ema.update(model_raw, step=global_step)
                lr_scheduler.step_update(num_updates=global_step)
                if args.debug_step_delay:
                    time.sleep(args.debug_step_delay)
                if args.debug_signal_at_step is not None and global_step == args.debug_signal_at_step:
                    os.kill(os.getpid(), args.debug_signal)
                reached_max = args.max_steps is not None and global_step >= args.max_steps
                if last_in_epoch or reached_max:
                    break  # the end-of-epoch block syncs, evaluates and saves
                log_now = global_step % args.log_interval == 0
                ckpt_now = bool(args.checkpoint_interval_steps) and global_step % args.checkpoint_interval_steps == 0
                if world == 1:
                    check_preempt = handler is not None and handler.requested
                else:
                    check_preempt = handler is not None and global_step % args.preempt_check_interval == 0
                if not (log_now or ckpt_now or check_preempt):
                    continue
                vals = sync(stats, epoch, batch_idx)
                if log_now:
                    _log_progress(vals, prev, t_epoch, t_run, steps_this_run, epoch, batch_idx,
                                  batches_per_epoch, global_step, total_steps, optimizer, tb)
                    prev = vals
                preempting = vals[4] > 0
                if ckpt_now or preempting:
                    save(epoch, batch_idx + 1, False)
                if preempting:
                    _logger.warning("Preemption signal: checkpoint written at epoch %d, batch %d (optimizer step %d); "
                                    "handing over to the scheduler.", epoch, batch_idx + 1, global_step)
                    coll.barrier()  # nobody leaves before rank 0 has written the checkpoint
                    requested_here = handler.requested
                    handler.finish()  # submitit: checkpoint() + requeue + exit; default action: terminate
                    handler = None
                    if world > 1 or not requested_here:
                        raise SystemExit(0)  # the other ranks leave too (no rank may train on alone)
            # ---- end of epoch (or of the run: --max-steps) --------------------------------------
            vals = sync(stats, epoch, batch_idx)
            train_rate = vals[2] / max(time.time() - t_epoch, 1e-9)  # global img/s of the training phase
            complete = batch_idx + 1 >= batches_per_epoch
            train_metrics = OrderedDict(loss=vals[0] / max(vals[2], 1))
            if mixup_fn is None:
                train_metrics["top1"] = 100 * vals[1] / max(vals[2], 1)
            if distributed and has_bn and args.dist_bn and not args.sync_bn:
                distribute_bn(model_raw, world, args.dist_bn == "reduce")
            eval_metrics = evaluate(model, eval_loader, device, args, coll)
            if model_ema is not None:
                eval_metrics.update((f"ema_{k}", v) for k, v in
                                    evaluate(model_ema.module, eval_loader, device, args, coll).items())
            lr = optimizer.param_groups[0]["lr"]
            if complete:
                lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
            elapsed = time.time() - t_run
            _logger.info("Epoch %d/%d | step %d/%d | train loss %.4f%s | eval loss %.4f top1 %.2f top5 %.2f%s | "
                         "lr %.3g | %.0f img/s | ETA %s", epoch + 1, num_epochs, global_step, total_steps,
                         train_metrics["loss"], f" acc {train_metrics['top1']:.2f}" if "top1" in train_metrics else "",
                         eval_metrics["loss"], eval_metrics["top1"], eval_metrics["top5"],
                         f" (EMA top1 {eval_metrics['ema_top1']:.2f})" if "ema_top1" in eval_metrics else "",
                         lr, train_rate, _fmt_time((total_steps - global_step) * elapsed / max(steps_this_run, 1)))
            if rank == 0:
                update_summary(epoch, train_metrics, eval_metrics, os.path.join(out_dir, "summary.csv"), lr=lr,
                               log_wandb=args.log_wandb)
                if tb is not None:
                    for k, v in eval_metrics.items():
                        tb.add_scalar(f"eval/{k}", v, epoch)
                    tb.add_scalar("train/epoch_loss", train_metrics["loss"], epoch)
            save(epoch, batch_idx + 1, complete, eval_metrics)
            last_epoch = epoch
            stopped = args.max_steps is not None and global_step >= args.max_steps
    finally:
        if handler is not None:
            handler.uninstall()
        if tb is not None:
            tb.close()
        if log_handler is not None:
            _logger.removeHandler(log_handler)
            log_handler.close()
    if not eval_metrics:  # nothing left to train (finished / max steps reached): just evaluate
        eval_metrics = evaluate(model, eval_loader, device, args, coll)
    result = dict(eval_metrics)
    result.update(epoch=last_epoch, step=global_step, output_dir=out_dir, num_params=n_params,
                  train_time_s=time.time() - t_run)
    if saver is not None:
        result["best_" + args.eval_metric] = saver.best_metric
        result["best_epoch"] = saver.best_epoch
    baseline = ""
    if args.linear_baseline and rank == 0:
        t0 = time.time()
        result["linear_baseline_top1"] = linear_baseline(train_ds, eval_ds, num_classes)
        baseline = (f"; model {result['top1']:.2f}% vs linear baseline {result['linear_baseline_top1']:.2f}% on raw "
                    f"pixels (logistic regression, {time.time() - t0:.1f} s)")
    if rank == 0:
        atomic_write_text(os.path.join(out_dir, "result.json"), json.dumps(result, indent=1))
        print(f"*** Done: {args.model} on {args.dataset}: test top-1 {result['top1']:.2f}%  top-5 "
              f"{result['top5']:.2f}%  (epoch {last_epoch + 1}, step {global_step}, "
              f"{_fmt_time(result['train_time_s'])}){baseline}; checkpoints in {out_dir}", flush=True)
    return result


def _len(ds) -> str:
    try:
        return str(len(ds))
    except TypeError:
        return "?"


def _log_progress(vals, prev, t_epoch, t_run, steps_this_run, epoch, batch_idx, batches_per_epoch,
                  global_step, total_steps, optimizer, tb) -> None:
    n = vals[2] - prev[2]
    loss = (vals[0] - prev[0]) / max(n, 1)
    acc = 100 * (vals[1] - prev[1]) / max(n, 1)
    elapsed = time.time() - t_run
    eta = (total_steps - global_step) * elapsed / max(steps_this_run, 1)
    lr = optimizer.param_groups[0]["lr"]
    _logger.info("Train %d [%d/%d] step %d of %d (%.0f%%) | loss %.4f (epoch %.4f) acc %.2f | lr %.3g | "
                 "%.0f img/s | ETA %s", epoch, batch_idx + 1, batches_per_epoch, global_step,
                 total_steps, 100.0 * global_step / max(total_steps, 1), loss, vals[0] / max(vals[2], 1), acc, lr,
                 vals[2] / max(time.time() - t_epoch, 1e-9), _fmt_time(eta))
    if tb is not None:
        tb.add_scalar("train/loss", loss, global_step)
        tb.add_scalar("train/lr", lr, global_step)


def _restore(ckpt, path, args, optimizer, lr_scheduler, model_ema, model_raw, loss_scaler, batches_per_epoch,
             world, rank, streaming: bool):
    """Optimizer, scheduler, EMA, scaler, RNG and position from a checkpoint: (start_epoch, skip_batches, step)."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"Checkpoint '{path}': optimizer state does not match --opt {args.opt} / this "
                              f"model ({e}).") from e
    if model_ema is not None:
        if "state_dict_ema" in ckpt:
            _load_model_state(model_ema.module, ckpt["state_dict_ema"], path, args.model + " (EMA)")
        else:
            _logger.warning("Checkpoint has no EMA weights; EMA restarts from the model weights.")
            model_ema.set(model_raw)
    if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
        loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    if "scheduler" in ckpt:
        lr_scheduler.load_state_dict(ckpt["scheduler"])
    epoch, done = int(ckpt.get("epoch", 0)), int(ckpt.get("batches_done", batches_per_epoch))
    if ckpt.get("epoch_complete", True) or done >= batches_per_epoch:
        start_epoch, skip = epoch + 1, 0
    else:
        start_epoch, skip = epoch, done
        if int(ckpt.get("batch_size", args.batch_size)) != args.batch_size or \
                int(ckpt.get("world_size", world)) != world:
            _logger.warning("Batch size / world size changed since the checkpoint; the rest of epoch %d is "
                            "skipped approximately.", epoch)
        if streaming:
            _logger.info("Streaming data: epoch %d restarts its shard stream and trains its remaining %d batches "
                         "(samples of its first %d batches may be seen twice, as many others not at all).",
                         epoch, batches_per_epoch - done, done)
    rng = ckpt.get("rng_states")
    if rng and len(rng) == world:
        set_rng_state(rng[rank])
    elif rng:
        _logger.warning("World size changed (%d -> %d): RNG state not restored.", len(rng), world)
    return start_epoch, skip, int(ckpt.get("global_step", 0))


def cli(argv=None) -> int:
    from timm_cbsa.data import DatasetNotFoundError
    try:
        main(argv)
    except (NonFiniteLossError, ModelNotFoundError, ConfigError, CheckpointError, RunFolderError,
            DatasetNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
