"""Flags of ``train.train``: timm's names, ``--config`` YAML defaults, and every check that can run before training
(:func:`validate_args`, which the SLURM launcher runs before it queues a job)."""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import timm
from timm.utils import ParseKwargs

from .data import check_data_source, dataset_kind

_logger = logging.getLogger("train")


class ModelNotFoundError(ValueError):
    """--model names no registered model."""


class ConfigError(ValueError):
    """Bad --config file, flag value or flag combination."""


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


def parse_with_config(parser: argparse.ArgumentParser,
                      argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """``parser``'s flags over the defaults of its ``-c/--config`` YAML file (keys = flag names, '-' or '_'; an
    unknown key is a :class:`ConfigError`). Returns the parsed flags and the file's values (by flag ``dest``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    cfg = _load_config(known.config, parser) if known.config else {}
    parser.set_defaults(**cfg)
    return parser.parse_args(argv), cfg


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse flags over the ``--config`` defaults and check the values (:func:`check_values`)."""
    args, cfg = parse_with_config(build_parser(), argv)
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


# ============================================================================ model names

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
