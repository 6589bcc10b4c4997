#!/usr/bin/env python3
"""Train Segmenter-style semantic segmentation (a timm encoder + a CBSA / MHSA mask transformer or a linear decoder)
on data in the ADE20K folder layout: the paper's Fig. 8 recipe (Segmenter's), run from the repository root::

    python -m train.segment --config train/configs/ade20k_vit_small_cbsa.yaml --data-dir /datasets/ADEChallengeData2016
    torchrun --nproc_per_node 8 -m train.segment --config ... --batch-size 1 --output runs/seg --resume auto
    python -m slurm.launch --entry train.segment:main --nodes 1 --gpus-per-node 8 ... -- --config ...

Recipe pieces: SGD (timm ``create_optimizer_v2``), timm's ``PolyLRScheduler`` stepped per optimizer update (power
0.9, min lr 1e-5), pixel cross-entropy ignoring label 255, random resize / crop / flip (``timm_cbsa.data.ade20k``),
single-scale sliding-window evaluation (window = crop, ``--eval-stride``), mIoU / pixel accuracy from a confusion
matrix summed over the whole validation set (all-reduced across ranks) after every epoch.

Run folder (shared with ``train.train``): a ``.lock`` (``train.checkpoint.RunLock``), ``last.pth.tar`` (newest,
end-of-epoch or mid-epoch: ``--checkpoint-interval-steps``, a preemption signal, ``--max-steps``), ``model_best.pth.tar``
(best validation mIoU), ``args.yaml``, ``summary.csv``, ``log.txt``, ``result.json``; every file is written atomically.
``--resume auto`` continues the newest checkpoint exactly (model, optimizer, scheduler, position in the epoch, RNG;
augmentation is seeded per sample). SIGUSR2 / SIGTERM (``train.preempt``) write a checkpoint at the next step
boundary, then hand the signal to the previous handler (submitit: requeue).

Shared with ``train.train`` through ``train.checkpoint`` (lock, atomic writes, resume search, RNG state) and
``train.preempt``. Written here until the trainer's refactored public functions exist (to be replaced by them):
``setup_distributed``, ``all_sum`` (its ``Collectives``), ``_take_run_folder``, ``_setup_logging``, ``_load``
(``load_checkpoint_file``), ``save_checkpoint`` (its ``Saver``: timm's ranked ``checkpoint-*`` history and fsync'ed
recovery files; here only ``last`` / ``model_best``), ``NonFiniteLossError`` and the ``--config`` handling.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

import timm
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler
from timm.utils import (
    NativeScaler, ParseKwargs, init_distributed_device, random_seed, setup_default_logging, update_summary,
)

from . import preempt
from .checkpoint import (
    RunLock, atomic_torch_save, atomic_write_text, clean_stale_tmp, find_resume_checkpoint, get_rng_state,
    set_rng_state,
)

_logger = logging.getLogger("train")

LAST, BEST = "last.pth.tar", "model_best.pth.tar"
RUN_FILES = (LAST, BEST, "summary.csv", "args.yaml", "result.json")


class SegmentConfigError(ValueError):
    """A bad flag, --config file or checkpoint for this run."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / inf loss."""


# ============================================================================ flags

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.segment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file of flag defaults (flag names)")
    g = p.add_argument_group("Data (ADE20K folder layout)")
    g.add_argument("--data-dir", default=None, help="ADEChallengeData2016 folder (or its parent)")
    g.add_argument("--num-classes", type=int, default=150)
    g.add_argument("--crop-size", "--img-size", dest="crop_size", type=int, default=512,
                   help="training crop = evaluation window; also the encoder's img_size")
    g.add_argument("--base-size", type=int, default=None, help="shorter side before random resize (default: crop)")
    g.add_argument("--ratio-range", type=float, nargs=2, default=[0.5, 2.0], help="random resize ratios")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--eval-stride", type=int, default=None, help="sliding-window stride (default: the crop size)")
    g.add_argument("--eval-batch", type=int, default=8, help="windows per forward in evaluation")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="default: the encoder's pretrained cfg")
    g.add_argument("--std", type=float, nargs=3, default=None)
    g.add_argument("--max-train-samples", type=int, default=None)
    g.add_argument("--max-val-samples", type=int, default=None)
    g.add_argument("--workers", "-j", type=int, default=4)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="vit_small_patch16_384", help="timm encoder (timm_cbsa's are registered)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="encoder create_model kwargs")
    g.add_argument("--pretrained", action="store_true", help="timm pretrained encoder weights")
    g.add_argument("--decoder", default="cbsa", choices=("cbsa", "mhsa", "linear"))
    g.add_argument("--decoder-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="decoder options, e.g. depth=3 embed_dim=300 num_heads=3 rep_grid=10 backend=fused")
    g.add_argument("--feature-index", type=int, default=-1, help="encoder block to decode")
    g.add_argument("--drop-path", type=float, default=0.1, help="encoder stochastic depth")
    g.add_argument("--encoder-checkpoint", default="", help="encoder weights from a train.segment checkpoint")
    g.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (encoder in eval mode)")
    g = p.add_argument_group("Optimisation")
    g.add_argument("--epochs", type=int, default=64)
    g.add_argument("--batch-size", "-b", type=int, default=8, help="per process")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--amp", action="store_true")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g = p.add_argument_group("Run")
    g.add_argument("--output", default="output/segment")
    g.add_argument("--experiment", default="")
    g.add_argument("--resume", default="", help="'auto' (newest checkpoint of the run folder) or a path")
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in the folder and start over")
    g.add_argument("--checkpoint-interval-steps", type=int, default=0, help="mid-epoch checkpoint every N steps")
    g.add_argument("--preempt-check-interval", type=int, default=10, help="ranks agree on a signal every N steps")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--quiet", action="store_true")
    g.add_argument("--debug-signal-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Flags, with the defaults of ``--config`` (YAML keys = flag names, '-' or '_') under the command line's."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        import yaml
        try:
            with open(args.config) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SegmentConfigError(f"--config {args.config}: {e}") from e
        dests = {a.dest for a in parser._actions}
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            raise SegmentConfigError(f"--config {args.config}: unknown keys {unknown}")
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace, check_paths: bool = True) -> None:
    """Every check that can run before training (the SLURM launcher runs it before queueing a job)."""
    for name in ("num_classes", "crop_size", "epochs", "batch_size", "log_interval", "eval_batch",
                 "preempt_check_interval"):
        if getattr(args, name) < 1:
            raise SegmentConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    for name in ("base_size", "eval_stride", "max_steps", "max_train_samples", "max_val_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SegmentConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise SegmentConfigError(f"--ratio-range must satisfy 0 < low <= high (got {args.ratio_range})")
    if args.lr <= 0 or args.min_lr < 0 or args.poly_power <= 0:
        raise SegmentConfigError("--lr and --poly-power must be > 0 and --min-lr >= 0")
    import timm_cbsa  # noqa: F401  (registers cbsa_vit_* / cbt_*)
    if not timm.is_model(args.model):
        raise SegmentConfigError(f"--model {args.model}: no such timm model")
    if check_paths:
        if not args.data_dir or not os.path.isdir(args.data_dir):
            raise SegmentConfigError(f"--data-dir {args.data_dir}: no such folder")
        if args.encoder_checkpoint and not os.path.isfile(args.encoder_checkpoint):
            raise SegmentConfigError(f"--encoder-checkpoint {args.encoder_checkpoint}: no such file")


# ============================================================================ set-up

def setup_distributed(args) -> torch.device:
    """timm's ``init_distributed_device`` (env:// from torchrun or the SLURM launcher); CPU when CUDA is absent."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SegmentConfigError(f"--device {args.device} requested but CUDA is not available")
    if dist.is_available() and dist.is_initialized():   # set up by the caller
        args.rank, args.world_size, args.distributed = dist.get_rank(), dist.get_world_size(), True
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{args.local_rank}" if args.device.startswith("cuda") else args.device)
    return init_distributed_device(args)


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def build_model(args) -> nn.Module:
    from timm_cbsa.segmentation import create_segmenter
    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("img_size", args.crop_size)
    kwargs.setdefault("drop_path_rate", args.drop_path)
    model = create_segmenter(args.model, args.num_classes, decoder=args.decoder, pretrained=args.pretrained,
                             feature_index=args.feature_index, decoder_kwargs=dict(args.decoder_kwargs), **kwargs)
    if args.encoder_checkpoint:
        ckpt = _load(args.encoder_checkpoint)
        enc = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
        try:
            model.encoder.load_state_dict(enc, strict=True)
        except RuntimeError as e:
            raise SegmentConfigError(f"--encoder-checkpoint {args.encoder_checkpoint} does not fit --model "
                                     f"{args.model} {dict(args.model_kwargs)}: {e}") from e
    if args.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


class _ResumableSampler(torch.utils.data.DistributedSampler):
    """The epoch's shuffled shard of this rank, from batch ``start`` on (an exact mid-epoch resume)."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


def build_data(args, model: nn.Module, rank: int, world: int):
    """(train dataset, its sampler and loader, this rank's share of the validation set)."""
    from timm_cbsa.data.ade20k import ADE20KSegmentation, eval_transform, train_transform
    cfg = getattr(model.encoder, "pretrained_cfg", {}) or {}
    mean, std = args.mean or cfg.get("mean", (0.485, 0.456, 0.406)), args.std or cfg.get("std", (0.229, 0.224, 0.225))
    base = args.base_size or args.crop_size
    train_ds = ADE20KSegmentation(args.data_dir, "training", train_transform(
        args.crop_size, base, args.ratio_range, args.hflip, mean, std), args.max_train_samples, args.seed)
    val_ds = ADE20KSegmentation(args.data_dir, "validation", eval_transform(base, mean, std), args.max_val_samples)
    if len(train_ds) < args.batch_size * world:
        raise SegmentConfigError(f"{len(train_ds)} training images cannot fill one global batch of "
                                 f"{args.batch_size * world}")
    sampler = _ResumableSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=torch.cuda.is_available())
    val_share = torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world))
    return train_ds, sampler, loader, val_share


# ============================================================================ checkpoints

def _load(path: str) -> Dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, not a checkpoint
        raise SegmentConfigError(f"checkpoint '{path}' is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise SegmentConfigError(f"'{path}' is not a training checkpoint (no 'state_dict')")
    return ckpt


def _plain(args) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


@dataclass
class Run:
    """What the loop and the checkpoints share."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    out_dir: str
    model: nn.Module                 # the Segmenter (not wrapped)
    train_model: nn.Module           # the Segmenter or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: PolyLRScheduler
    steps_per_epoch: int
    total_steps: int
    global_step: int = 0
    best_miou: Optional[float] = None
    scaler: Optional[NativeScaler] = None          # float16 autocast on CUDA: loss scaling
    handler: Optional[preempt.PreemptionHandler] = None


def save_checkpoint(run: Run, epoch: int, batches_done: int, metrics: Optional[Dict[str, float]] = None) -> None:
    """Every rank calls this (RNG states are gathered); rank 0 writes ``last`` (and ``model_best`` on a new best)."""
    rng = get_rng_state()
    rngs = [rng]
    if run.world > 1:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng)
    if run.rank != 0:
        return
    complete = batches_done >= run.steps_per_epoch
    miou = (metrics or {}).get("mIoU")
    best = complete and miou is not None and (run.best_miou is None or miou > run.best_miou)
    if best:
        run.best_miou = miou
    state = dict(version=1, arch=run.args.model, args=_plain(run.args), segmenter_config=run.model.segmenter_config,
                 epoch=epoch, epoch_complete=complete, batches_done=batches_done, global_step=run.global_step,
                 batch_size=run.args.batch_size, world_size=run.world, state_dict=run.model.state_dict(),
                 optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(), rng_states=rngs,
                 metric=miou, metrics=dict(metrics or {}), best_metric=run.best_miou, timm_version=timm.__version__)
    if run.scaler is not None:
        state[run.scaler.state_dict_key] = run.scaler.state_dict()
    atomic_torch_save(state, os.path.join(run.out_dir, LAST))
    if best:
        atomic_torch_save(state, os.path.join(run.out_dir, BEST))


def restore(run: Run, ckpt: Dict[str, Any], path: str) -> tuple:
    """Model, optimizer, scheduler, RNG, best mIoU and position -> (start_epoch, batches to skip)."""
    saved = ckpt.get("segmenter_config")
    if saved != run.model.segmenter_config:
        raise SegmentConfigError(f"checkpoint '{path}' was built as {saved}, this run builds "
                                 f"{run.model.segmenter_config}: build the model the same way or start a fresh run")
    run.model.load_state_dict(ckpt["state_dict"], strict=True)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and run.scaler.state_dict_key in ckpt:
        run.scaler.load_state_dict(ckpt[run.scaler.state_dict_key])
    run.global_step, run.best_miou = int(ckpt["global_step"]), ckpt.get("best_metric")
    rngs = ckpt.get("rng_states") or []
    if len(rngs) == run.world:
        set_rng_state(rngs[run.rank])
    if ckpt.get("epoch_complete", True):
        return int(ckpt["epoch"]) + 1, 0
    if int(ckpt.get("batch_size", -1)) != run.args.batch_size or int(ckpt.get("world_size", -1)) != run.world:
        _logger.warning("Batch / world size changed since the checkpoint: epoch %d resumes at batch %d of the new "
                        "order (approximate).", ckpt["epoch"], ckpt["batches_done"])
    return int(ckpt["epoch"]), int(ckpt["batches_done"])


# ============================================================================ evaluation

@torch.no_grad()
def evaluate(model: nn.Module, val_share, args, device: torch.device, world: int) -> Dict[str, float]:
    """mIoU / pixel accuracy of single-scale sliding-window inference, from the confusion matrix of all ranks."""
    from timm_cbsa.segmentation import equal_size_batches, logits_confusion, segmentation_metrics, slide_inference
    model.eval()
    conf = torch.zeros(args.num_classes, args.num_classes, dtype=torch.int64, device=device)
    stride = args.eval_stride or args.crop_size
    for images, labels in equal_size_batches(val_share, args.eval_batch):
        with _autocast(args, device):
            logits = slide_inference(model, images.to(device), args.crop_size, stride, args.eval_batch)
        conf += logits_confusion(logits, labels, args.num_classes)
    m = segmentation_metrics(all_sum(conf, world))
    return dict(mIoU=m["mIoU"], pixel_acc=m["pixel_acc"], mAcc=m["mAcc"])


def _autocast(args, device):
    if not args.amp:
        return nullcontext()
    dtype = torch.float16 if args.amp_dtype == "float16" and device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ============================================================================ training

def _signalled(run: Run) -> bool:
    """Whether any rank received a preemption signal (all ranks agree, every --preempt-check-interval steps)."""
    h = run.handler
    if run.world == 1:
        return h is not None and h.requested
    if run.global_step % run.args.preempt_check_interval:
        return False
    flag = torch.tensor([1.0 if h is not None and h.requested else 0.0], device=run.device)
    return all_sum(flag, run.world).item() > 0


def _hand_over(run: Run, epoch: int, batches_done: int) -> None:
    _logger.warning("Preemption signal: checkpoint written at epoch %d, batch %d (step %d); handing over.",
                    epoch, batches_done, run.global_step)
    if run.world > 1:
        dist.barrier()
    if run.handler is not None and run.handler.requested:
        run.handler.finish()                  # submitit: checkpoint() + requeue + exit; none before: terminate
        run.handler = preempt.install()       # the previous handler let the run go on


def _step(run: Run, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    with _autocast(run.args, run.device):
        loss = loss_fn(run.train_model(x), y)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler(loss, run.optimizer, clip_grad=run.args.clip_grad, parameters=run.model.parameters())
    else:
        loss.backward()
        if run.args.clip_grad is not None:
            nn.utils.clip_grad_norm_(run.model.parameters(), run.args.clip_grad)
        run.optimizer.step()
    run.global_step += 1
    run.scheduler.step_update(num_updates=run.global_step)
    return loss.detach().float()


def _check_finite(sums: torch.Tensor, run: Run, epoch: int) -> None:
    if not math.isfinite(sums[0].item()):
        raise NonFiniteLossError(f"Non-finite loss before optimizer step {run.global_step} (epoch {epoch}); nothing "
                                 "was saved after the last finite check. Try a lower --lr or --clip-grad.")


def train_epoch(run: Run, loader, epoch: int, skip: int, loss_fn: nn.Module) -> Dict[str, Any]:
    """One epoch (from batch ``skip``); returns {'loss', 'batches_done', 'stopped'} (stopped: max steps / signal)."""
    args = run.args
    run.train_model.train()
    if args.freeze_encoder:
        run.model.encoder.eval()
    sums = torch.zeros(2, device=run.device, dtype=torch.float64)      # loss * n, n
    batch, t0 = skip, time.time()
    for x, y in loader:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        sums += torch.stack([_step(run, x, y, loss_fn).double() * x.shape[0], sums.new_tensor(x.shape[0])])
        batch += 1
        if args.debug_signal_at_step is not None and run.global_step == args.debug_signal_at_step:
            os.kill(os.getpid(), preempt.DEFAULT_SIGNALS[0])
        max_reached = args.max_steps is not None and run.global_step >= args.max_steps
        interval = args.checkpoint_interval_steps and run.global_step % args.checkpoint_interval_steps == 0
        signalled = _signalled(run)
        if run.global_step % args.log_interval == 0 or signalled or interval or max_reached:
            total = all_sum(sums.clone(), run.world)
            _check_finite(total, run, epoch)
            _logger.info("Train %d [%d/%d] step %d/%d | loss %.4f | lr %.3g | %.1f img/s", epoch, batch,
                         run.steps_per_epoch, run.global_step, run.total_steps, (total[0] / total[1]).item(),
                         run.optimizer.param_groups[0]["lr"], total[1].item() / max(time.time() - t0, 1e-9))
        if signalled or (interval and batch < run.steps_per_epoch):   # the epoch's end saves after evaluating
            save_checkpoint(run, epoch, batch)
        if signalled:
            _hand_over(run, epoch, batch)
        if max_reached:
            break
    total = all_sum(sums, run.world)
    _check_finite(total, run, epoch)
    return dict(loss=(total[0] / total[1].clamp_min(1)).item(), batches_done=batch,
                stopped=args.max_steps is not None and run.global_step >= args.max_steps)


# ============================================================================ main

def _take_run_folder(args, out_dir: str, device: torch.device) -> Optional[RunLock]:
    """Rank 0 locks the run folder and refuses (or, with --overwrite, clears) a previous run; every rank learns
    whether it could."""
    lock, error = None, None
    if args.rank == 0:
        try:
            lock = RunLock(out_dir).acquire()
            previous = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
            if previous and not args.resume and not args.overwrite:
                raise SegmentConfigError(
                    f"Run folder '{out_dir}' holds a previous run ({', '.join(previous)}): continue it with --resume "
                    "auto, start over with --overwrite, or use another --output / --experiment.")
            for f in previous if not args.resume else ():
                os.remove(os.path.join(out_dir, f))
        except (SegmentConfigError, RuntimeError) as e:   # RunLock: the folder is in use
            error = e if isinstance(e, SegmentConfigError) else SegmentConfigError(str(e))
            if lock is not None:
                lock.release()
    ok = all_sum(torch.tensor([0.0 if error else 1.0], device=device), args.world_size).item() == args.world_size
    if not ok:
        raise error or SegmentConfigError(f"rank 0 could not take the run folder '{out_dir}' (see its error)")
    return lock


def _setup_logging(out_dir: str, rank: int, quiet: bool) -> Optional[logging.Handler]:
    if not logging.root.handlers:
        setup_default_logging()
    _logger.setLevel(logging.WARNING if (rank != 0 or quiet) else logging.INFO)
    if rank != 0:
        return None
    fh = logging.FileHandler(os.path.join(out_dir, "log.txt"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    _logger.addHandler(fh)
    return fh


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns the final metrics ``{'mIoU', 'pixel_acc', 'best_mIoU', 'epoch', 'step', ...}``."""
    args = parse_args(argv)
    validate_args(args)
    owns_group = not (dist.is_available() and dist.is_initialized())
    device = setup_distributed(args)
    out_dir = os.path.join(args.output, args.experiment) if args.experiment else args.output
    lock, log_handler = None, None
    try:
        lock = _take_run_folder(args, out_dir, device)
        log_handler = _setup_logging(out_dir, args.rank, args.quiet)
        return _train(args, device, out_dir)
    finally:
        if log_handler is not None:
            _logger.removeHandler(log_handler)
            log_handler.close()
        if lock is not None:
            lock.release()
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _build_run(args, device: torch.device, out_dir: str):
    if args.threads:
        torch.set_num_threads(args.threads)
    random_seed(args.seed, args.rank)
    model = build_model(args).to(device)
    train_ds, sampler, loader, val_share = build_data(args, model, args.rank, args.world_size)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    steps = len(loader)
    total = args.epochs * steps if args.max_steps is None else min(args.epochs * steps, args.max_steps)
    scheduler = PolyLRScheduler(optimizer, t_initial=args.epochs * steps, power=args.poly_power, lr_min=args.min_lr,
                                warmup_t=args.warmup_steps, warmup_lr_init=args.min_lr, t_in_epochs=False)
    train_model = model
    if args.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    run = Run(args, device, args.rank, args.world_size, out_dir, model, train_model, optimizer, scheduler, steps, total)
    if args.amp and args.amp_dtype == "float16" and device.type == "cuda":
        run.scaler = NativeScaler(device="cuda")
    n_params = sum(p.numel() for p in model.decoder.parameters())
    _logger.info("Segmenter: encoder %s, %s decoder (%.2fM params), %d classes; %d train / %d val images; world %d "
                 "on %s; %d steps", args.model, args.decoder, n_params / 1e6, args.num_classes, len(train_ds),
                 len(val_share.dataset), args.world_size, device, total)
    return run, train_ds, sampler, loader, val_share


def _resume(run: Run) -> tuple:
    args = run.args
    if not args.resume:
        return 0, 0
    if args.resume == "auto":
        if run.rank == 0:
            clean_stale_tmp(run.out_dir)
        found = find_resume_checkpoint(run.out_dir)
        if found is None:
            _logger.info("--resume auto: no checkpoint in %s, starting fresh", run.out_dir)
            return 0, 0
        path, ckpt = found
    else:
        path, ckpt = args.resume, _load(args.resume)
    start = restore(run, ckpt, path)
    _logger.info("Resumed from %s: epoch %d, batch %d, step %d", path, start[0], start[1], run.global_step)
    return start


def _train(args, device: torch.device, out_dir: str) -> Dict[str, Any]:
    run, train_ds, sampler, loader, val_share = _build_run(args, device, out_dir)
    start_epoch, skip = _resume(run)
    if run.global_step:
        run.scheduler.step_update(num_updates=run.global_step)
    if run.rank == 0:
        import yaml
        atomic_write_text(os.path.join(out_dir, "args.yaml"), yaml.safe_dump(_plain(args), sort_keys=False))
    if threading.current_thread() is threading.main_thread():
        run.handler = preempt.install()
    loss_fn = nn.CrossEntropyLoss(ignore_index=255)
    t0, metrics, epoch = time.time(), {}, start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs):
            if args.max_steps is not None and run.global_step >= args.max_steps:
                break
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            sampler.start = (skip if epoch == start_epoch else 0) * args.batch_size
            train = train_epoch(run, loader, epoch, skip if epoch == start_epoch else 0, loss_fn)
            metrics = evaluate(run.model, val_share, args, device, run.world)
            _end_epoch(run, epoch, train, metrics)
            if train["stopped"]:
                break
    finally:
        if run.handler is not None:
            run.handler.uninstall()
    if not metrics:   # nothing left to train: evaluate what was loaded
        metrics = evaluate(run.model, val_share, args, device, run.world)
    result = dict(metrics, best_mIoU=run.best_miou, epoch=epoch, step=run.global_step, output_dir=out_dir,
                  decoder=args.decoder, train_time_s=time.time() - t0)
    if run.rank == 0:
        atomic_write_text(os.path.join(out_dir, "result.json"), json.dumps(result, indent=1))
        print(f"*** Done: {args.model} + {args.decoder} decoder: val mIoU {metrics['mIoU']:.2f} pixel acc "
              f"{metrics['pixel_acc']:.2f} (best mIoU {run.best_miou}), step {run.global_step}; run folder {out_dir}",
              flush=True)
    return result


def _end_epoch(run: Run, epoch: int, train: Dict[str, Any], metrics: Dict[str, float]) -> None:
    lr = run.optimizer.param_groups[0]["lr"]
    _logger.info("Epoch %d/%d | step %d | train loss %.4f | val mIoU %.2f pixel acc %.2f mAcc %.2f | lr %.3g",
                 epoch + 1, run.args.epochs, run.global_step, train["loss"], metrics["mIoU"], metrics["pixel_acc"],
                 metrics["mAcc"], lr)
    if run.rank == 0:
        update_summary(epoch, dict(loss=train["loss"]), metrics, os.path.join(run.out_dir, "summary.csv"), lr=lr)
    save_checkpoint(run, epoch, train["batches_done"], metrics)


def cli(argv: Optional[List[str]] = None) -> int:
    from timm_cbsa.data import DatasetNotFoundError
    try:
        main(argv)
    except (SegmentConfigError, NonFiniteLossError, DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
