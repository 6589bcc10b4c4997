#!/usr/bin/env python3
"""Train timm / timm_cbsa image classifiers with timm's library APIs.

Run from the repository root::

    python -m train.train --config train/configs/fmnist_quickstart.yaml
    torchrun --nproc_per_node 2 -m train.train --config ... --output runs/x --resume auto

Flags follow timm's ``train.py`` names (``--model``, ``--data-dir``, ``--dataset``, ``--opt``, ``--lr``,
``--sched``, ``--model-kwargs``, ...); ``--config FILE.yaml`` sets their defaults (keys are flag names,
with ``-`` or ``_``). Checkpoint layout and resume semantics: see :mod:`train.checkpoint`.

Distributed: env:// (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, as set by
torchrun or a SLURM launcher); NCCL on CUDA, gloo on CPU. Without those variables a single process runs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import random
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import timm
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3, NativeScaler, ParseKwargs, accuracy, update_summary

from .checkpoint import (
    CKPT_FORMAT_VERSION, CheckpointError, CheckpointManager, clean_stale_tmp, find_resume_checkpoint,
    get_rng_state, load_checkpoint_file, set_rng_state,
)
from .data import build_datasets, build_loaders, check_data_source, dataset_defaults, dataset_kind

_logger = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss."""


class ModelNotFoundError(ValueError):
    """--model names no registered model."""


class ConfigError(ValueError):
    """Bad --config file or flag combination."""


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
    g.add_argument("--workers", "-j", type=int, default=0, help="data loader worker processes")
    g.add_argument("--pin-mem", action="store_true", default=False)

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
    g.add_argument("--lr", type=float, default=1e-3)
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
    g.add_argument("--auto-resume", action="store_true", default=False, help="same as --resume auto")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="resume only the model weights (not optimizer/scheduler/EMA/scaler/RNG)")
    g.add_argument("--checkpoint-interval-steps", type=int, default=0,
                   help="also write last.pth.tar every N optimizer steps (mid-epoch, for preemption)")
    g.add_argument("--checkpoint-hist", type=int, default=3, help="end-of-epoch checkpoints to keep")
    g.add_argument("--eval-metric", default="top1")
    g.add_argument("--log-interval", type=int, default=50, help="log every N optimizer steps")
    g.add_argument("--log-tensorboard", action="store_true", default=False, help="TensorBoard logs in DIR/tb")
    g.add_argument("--quiet", action="store_true", default=False, help="only warnings and the final summary")

    # fault injection for tests (hidden)
    p.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
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
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_load_config(known.config, parser))
    args = parser.parse_args(argv)
    if args.auto_resume:
        args.resume = "auto"
    if args.grad_accum_steps < 1:
        raise ConfigError("--grad-accum-steps must be >= 1")
    if isinstance(args.model_kwargs, (list, tuple)) or args.model_kwargs is None:
        args.model_kwargs = {}
    return args


# ============================================================================ distributed

def setup_distributed(args):
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    distributed = world > 1 or "RANK" in env and "WORLD_SIZE" in env
    rank = int(env.get("RANK", "0")) if distributed else 0
    local_rank = int(env.get("LOCAL_RANK", "0")) if distributed else 0
    if args.device:
        dev_type = args.device.split(":")[0]
    else:
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    if dev_type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available.")
        device = torch.device("cuda", local_rank if distributed else (torch.device(args.device).index or 0)
                              if args.device else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device(dev_type)
    if distributed and not dist.is_initialized():
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            if k not in env:
                raise ConfigError(f"Distributed run (WORLD_SIZE={world}) but {k} is not set in the environment.")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return device, rank, world, local_rank, distributed


def _all_reduce_sum(t: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def create_model(args, num_classes: int, in_chans: int):
    name = args.model
    base = name.split(".")[0]
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(base):
        similar = timm.list_models(f"*{base.split('_')[0]}*")[:12]
        raise ModelNotFoundError(
            f"Unknown model '{name}'. Similar registered names: {similar or 'none'}. "
            f"timm_cbsa models: {timm.list_models('*cbsa*') + timm.list_models('cbt_*')}. "
            f"(Models of other packages need --model-import PACKAGE.)")
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
    if args.initial_checkpoint:
        ckpt = load_checkpoint_file(args.initial_checkpoint)
        _load_model_state(model, ckpt["state_dict"], args.initial_checkpoint, name)
    return model


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


# ============================================================================ train / eval

def _autocast(args, device):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if (device.type != "cuda" or args.amp_dtype == "bfloat16") else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, device, args, distributed) -> Dict[str, float]:
    model.eval()
    crit = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, n
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(args, device):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[-1])
        a1, a5 = accuracy(out, y, topk=(1, k))
        n = y.shape[0]
        sums += torch.tensor([crit(out, y).item(), a1.item() * n / 100, a5.item() * n / 100, n], dtype=torch.float64)
    sums = _all_reduce_sum(sums, distributed)
    n = max(sums[3].item(), 1)
    return OrderedDict(loss=sums[0].item() / n, top1=100 * sums[1].item() / n, top5=100 * sums[2].item() / n)


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _setup_logging(out_dir: Optional[str], rank: int, quiet: bool):
    _logger.handlers.clear()
    _logger.propagate = False
    level = logging.WARNING if (rank != 0 or quiet) else logging.INFO
    _logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setLevel(level)
    h.setFormatter(fmt)
    _logger.addHandler(h)
    if out_dir and rank == 0:
        fh = logging.FileHandler(os.path.join(out_dir, "log.txt"))
        fh.setFormatter(fmt)
        fh.setLevel(logging.INFO)
        _logger.addHandler(fh)


def _save_args(args, path):
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns the final metrics ``{'top1', 'top5', 'loss', 'epoch', 'step', ...}``."""
    args = parse_args(argv)
    device, rank, world, local_rank, distributed = setup_distributed(args)
    try:
        return _run(args, device, rank, world, distributed)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, device, rank, world, distributed) -> Dict[str, Any]:
    out_dir = os.path.join(args.output, args.experiment) if args.experiment else args.output
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    if distributed:
        dist.barrier()
    _setup_logging(out_dir, rank, args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed = args.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    _import_modules(args.model_import)
    check_data_source(args)

    # ---- data config -------------------------------------------------------
    kind = dataset_kind(args.dataset)
    dd = dataset_defaults(kind)
    in_chans = args.input_size[0] if args.input_size else (args.in_chans or dd.get("in_chans", 3))
    if args.img_size is None and "img_size" in dd and not args.input_size:
        args.img_size = dd["img_size"]
    num_classes = args.num_classes or dd.get("num_classes")

    # model first with a provisional class count when unknown, data config resolved from the model
    tmp_num_classes = num_classes or 1000
    model = create_model(args, tmp_num_classes, in_chans)
    cfg_args = dict(vars(args))
    if dd.get("mean") and args.mean is None:
        cfg_args["mean"] = dd["mean"]
        cfg_args["std"] = dd["std"]
    if dd.get("crop_pct") and args.crop_pct is None:
        cfg_args["crop_pct"] = dd["crop_pct"]
    cfg_args["input_size"] = args.input_size or ((in_chans, args.img_size, args.img_size) if args.img_size else None)
    data_cfg = resolve_data_config(cfg_args, model=model, verbose=False)
    if len(data_cfg["mean"]) != data_cfg["input_size"][0]:
        data_cfg["mean"] = tuple(data_cfg["mean"][:1]) * data_cfg["input_size"][0]
        data_cfg["std"] = tuple(data_cfg["std"][:1]) * data_cfg["input_size"][0]
    train_ds, eval_ds, found_classes = build_datasets(args, data_cfg)
    if num_classes is None:
        num_classes = found_classes or tmp_num_classes
        if num_classes != tmp_num_classes:
            model = create_model(args, num_classes, in_chans)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model_raw = model

    n_params = sum(p.numel() for p in model.parameters())
    _logger.info("Model %s (%s) %.2fM params, %d classes, input %s; data %s: %d train / %d eval; world %d on %s",
                 args.model, dict(args.model_kwargs), n_params / 1e6, num_classes, tuple(data_cfg["input_size"]),
                 args.dataset, len(train_ds), len(eval_ds), world, device)

    # ---- loaders -----------------------------------------------------------
    train_loader, eval_loader, sampler = build_loaders(args, train_ds, eval_ds, rank, world, device)
    batches_per_epoch = len(train_loader)
    accum = args.grad_accum_steps
    updates_per_epoch = (batches_per_epoch + accum - 1) // accum

    # ---- optimisation ------------------------------------------------------
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
    loss_scaler = None
    if args.amp and device.type == "cuda" and args.amp_dtype == "float16":
        loss_scaler = NativeScaler(device="cuda")
    model_ema = ModelEmaV3(model_raw, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise ConfigError("--mixup/--cutmix need an even --batch-size.")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    # ---- resume ------------------------------------------------------------
    saver = CheckpointManager(out_dir, max_history=args.checkpoint_hist,
                              decreasing=args.eval_metric == "loss") if rank == 0 else None
    start_epoch, skip_batches, global_step = 0, 0, 0
    resume_path, ckpt = None, None
    if args.resume:
        if args.resume == "auto":
            if rank == 0:
                removed = clean_stale_tmp(out_dir)
                if removed:
                    _logger.info("Removed stale temporary files from an interrupted write: %s", removed)
            found = find_resume_checkpoint(out_dir)
            if found:
                resume_path, ckpt = found
            else:
                _logger.info("--resume auto: no checkpoint in %s, starting fresh", out_dir)
        else:
            resume_path, ckpt = args.resume, load_checkpoint_file(args.resume)
    if ckpt is not None:
        _load_model_state(model_raw, ckpt["state_dict"], resume_path, args.model)
        if not args.no_resume_opt:
            try:
                if "optimizer" in ckpt:
                    optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"Checkpoint '{resume_path}': optimizer state does not match "
                                      f"--opt {args.opt} / this model ({e}).") from e
            if model_ema is not None:
                if "state_dict_ema" in ckpt:
                    _load_model_state(model_ema.module, ckpt["state_dict_ema"], resume_path, args.model + " (EMA)")
                else:
                    _logger.warning("Checkpoint has no EMA weights; EMA restarts from the model weights.")
                    model_ema.set(model_raw)
            if loss_scaler is not None and "amp_scaler" in ckpt:
                loss_scaler.load_state_dict(ckpt["amp_scaler"])
            if "scheduler" in ckpt:
                lr_scheduler.load_state_dict(ckpt["scheduler"])
            global_step = int(ckpt.get("global_step", 0))
            epoch = int(ckpt.get("epoch", 0))
            done = int(ckpt.get("batches_done", batches_per_epoch))
            if ckpt.get("epoch_complete", True) or done >= batches_per_epoch:
                start_epoch, skip_batches = epoch + 1, 0
            else:
                start_epoch, skip_batches = epoch, done
                if int(ckpt.get("batch_size", args.batch_size)) != args.batch_size or \
                        int(ckpt.get("world_size", world)) != world:
                    _logger.warning("Batch size / world size changed since the checkpoint; the rest of epoch %d "
                                    "is skipped approximately.", epoch)
            rng = ckpt.get("rng_states")
            if rng and len(rng) == world:
                set_rng_state(rng[rank])
            elif rng:
                _logger.warning("World size changed (%d -> %d): RNG state not restored.", len(rng), world)
            if saver is not None:
                saver.best_metric = ckpt.get("best_metric")
                saver.best_epoch = ckpt.get("best_epoch")
        _logger.info("Resumed from %s: epoch %d, batch %d, global step %d", resume_path, start_epoch,
                     skip_batches, global_step)

    # ---- compile / DDP -----------------------------------------------------
    model = model_raw
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    tb = None
    if args.log_tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            _logger.warning("--log-tensorboard needs the tensorboard package (pip install tensorboard); disabled.")
    if rank == 0:
        _save_args(args, os.path.join(out_dir, "args.yaml"))

    def make_state(epoch, batches_done, complete, metrics=None):
        state = {
            "version": CKPT_FORMAT_VERSION,
            "arch": args.model,
            "args": vars(args).copy(),
            "epoch": epoch,
            "epoch_complete": complete,
            "batches_done": batches_done,
            "global_step": global_step,
            "batch_size": args.batch_size,
            "world_size": world,
            "state_dict": model_raw.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": lr_scheduler.state_dict(),
            "metric": (metrics or {}).get(args.eval_metric),
            "metrics": dict(metrics or {}),
            "timm_version": timm.__version__,
        }
        if model_ema is not None:
            state["state_dict_ema"] = model_ema.module.state_dict()
        if loss_scaler is not None:
            state[loss_scaler.state_dict_key] = loss_scaler.state_dict()
        return state

    def gather_rng():
        st = get_rng_state()
        if distributed:
            lst = [None] * world
            dist.all_gather_object(lst, st)
            return lst
        return [st]

    def save_mid(epoch, batches_done):
        rng = gather_rng()
        if saver is not None:
            st = make_state(epoch, batches_done, False)
            st["rng_states"] = rng
            saver.save_last(st)

    # ---- loop --------------------------------------------------------------
    eval_metrics: Dict[str, float] = {}
    if start_epoch > 0 or global_step > 0:  # resumed: put the LR where the interrupted run had it
        lr_scheduler.step(start_epoch)
        lr_scheduler.step_update(num_updates=global_step)
    max_steps = args.max_steps
    t_run = time.time()
    steps_this_run = 0
    last_epoch = start_epoch - 1
    stopped = max_steps is not None and global_step >= max_steps
    best = None
    for epoch in range(start_epoch, num_epochs):
        if stopped:
            break
        sampler.set_epoch(epoch)
        skip = skip_batches if epoch == start_epoch else 0
        sampler.set_start(skip * args.batch_size)
        model.train()
        loss_m, acc_m = AverageMeter(), AverageMeter()
        t_epoch = time.time()
        n_seen = 0
        batch_idx = skip - 1
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(train_loader):
            batch_idx = skip + i
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            y_hard = y
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_in_epoch = batch_idx + 1 == batches_per_epoch
            need_update = (batch_idx + 1) % accum == 0 or last_in_epoch
            ddp_ctx = model.no_sync() if (distributed and not need_update) else nullcontext()
            with ddp_ctx:
                with _autocast(args, device):
                    out = model(x)
                    loss = train_loss_fn(out, y)
                if args.debug_nan_at_step is not None and global_step + 1 >= args.debug_nan_at_step:
                    loss = loss * float("nan")
                bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0])
                bad = _all_reduce_sum(bad, distributed)
                if bad.item() > 0:
                    last = os.path.join(out_dir, "last.pth.tar")
                    kept = (f"the last good checkpoint is kept: {last}"
                            if os.path.exists(last) else "no checkpoint had been written yet")
                    msg = (f"Non-finite loss ({loss.item()}) at epoch {epoch}, batch {batch_idx}, "
                           f"optimizer step {global_step + 1}; stopping. Nothing was saved from this step; {kept}. "
                           f"Try a lower --lr, --clip-grad, or disabling --amp.")
                    _logger.error(msg)
                    raise NonFiniteLossError(msg)
                scaled = loss / accum
                if loss_scaler is not None:
                    loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                parameters=model_raw.parameters(), need_update=need_update)
                else:
                    scaled.backward()
                    if need_update:
                        if args.clip_grad is not None:
                            from timm.utils import dispatch_clip_grad
                            dispatch_clip_grad(model_raw.parameters(), args.clip_grad, mode=args.clip_mode)
                        optimizer.step()
            n = x.shape[0]
            n_seen += n
            loss_m.update(loss.item(), n)
            if mixup_fn is None:
                acc_m.update(accuracy(out.detach().float(), y_hard, topk=(1,))[0].item(), n)
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
            if args.log_interval and global_step % args.log_interval == 0:
                lr = optimizer.param_groups[0]["lr"]
                rate = n_seen * world / max(time.time() - t_epoch, 1e-9)
                _logger.info("Train %d [%d/%d] step %d loss %.4f (%.4f) lr %.3g %.0f img/s", epoch, batch_idx + 1,
                             batches_per_epoch, global_step, loss_m.val, loss_m.avg, lr, rate)
                if tb is not None:
                    tb.add_scalar("train/loss", loss_m.val, global_step)
                    tb.add_scalar("train/lr", lr, global_step)
            reached_max = max_steps is not None and global_step >= max_steps
            if args.checkpoint_interval_steps and global_step % args.checkpoint_interval_steps == 0 \
                    and not last_in_epoch and not reached_max:
                save_mid(epoch, batch_idx + 1)
            if reached_max:
                stopped = True
                break
        epoch_time = time.time() - t_epoch
        train_metrics = OrderedDict(loss=loss_m.avg)
        if acc_m.count:
            train_metrics["top1"] = acc_m.avg
        eval_metrics = evaluate(model, eval_loader, device, args, distributed)
        if model_ema is not None:
            ema_metrics = evaluate(model_ema.module, eval_loader, device, args, distributed)
            eval_metrics.update((f"ema_{k}", v) for k, v in ema_metrics.items())
        complete = batch_idx + 1 >= batches_per_epoch
        lr = optimizer.param_groups[0]["lr"]
        if complete:
            lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
        rate = n_seen * world / max(epoch_time, 1e-9)
        elapsed = time.time() - t_run
        if max_steps is not None:
            left = max(0, max_steps - global_step) * elapsed / max(steps_this_run, 1)
            left = min(left, (num_epochs - epoch - 1) * epoch_time)
        else:
            left = (num_epochs - epoch - 1) * epoch_time
        _logger.info("Epoch %d/%d | step %d | train loss %.4f%s | eval loss %.4f top1 %.2f top5 %.2f%s | "
                     "lr %.3g | %.0f img/s | %s/epoch | ETA %s",
                     epoch + 1, num_epochs, global_step, train_metrics["loss"],
                     f" acc {train_metrics['top1']:.2f}" if "top1" in train_metrics else "",
                     eval_metrics["loss"], eval_metrics["top1"], eval_metrics["top5"],
                     f" (EMA top1 {eval_metrics['ema_top1']:.2f})" if "ema_top1" in eval_metrics else "",
                     lr, rate, _fmt_time(epoch_time), _fmt_time(left))
        rng = gather_rng()
        if rank == 0:
            update_summary(epoch, train_metrics, eval_metrics, os.path.join(out_dir, "summary.csv"), lr=lr)
            if tb is not None:
                for k, v in eval_metrics.items():
                    tb.add_scalar(f"eval/{k}", v, epoch)
                tb.add_scalar("train/epoch_loss", train_metrics["loss"], epoch)
            st = make_state(epoch, batch_idx + 1, complete, eval_metrics)
            st["rng_states"] = rng
            if complete:
                saver.save_epoch(st, epoch, eval_metrics.get(args.eval_metric))
            else:
                saver.save_last(st)
        last_epoch = epoch
    if tb is not None:
        tb.close()
    if not eval_metrics:  # nothing left to train (already finished / max steps reached): just evaluate
        eval_metrics = evaluate(model, eval_loader, device, args, distributed)
    result = dict(eval_metrics)
    result.update(epoch=last_epoch, step=global_step, output_dir=out_dir, num_params=n_params,
                  train_time_s=time.time() - t_run)
    if saver is not None:
        result["best_" + args.eval_metric] = saver.best_metric
        result["best_epoch"] = saver.best_epoch
    if rank == 0:
        print(f"*** Done: {args.model} on {args.dataset}: test top-1 {result['top1']:.2f}%  top-5 "
              f"{result['top5']:.2f}%  (epoch {last_epoch + 1}, step {global_step}, "
              f"{_fmt_time(result['train_time_s'])}); checkpoints in {out_dir}", flush=True)
    return result


def cli(argv=None) -> int:
    try:
        main(argv)
    except (NonFiniteLossError, ModelNotFoundError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
