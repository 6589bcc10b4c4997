#!/usr/bin/env python3
"""Train timm / timm_cbsa image classifiers: a short loop over timm's library pieces.

Run from the repository root::

    python -m train.train --config train/configs/fmnist_quickstart.yaml
    torchrun --nproc_per_node 8 -m train.train --config ... --output runs/x --resume auto

Flags (timm's names, ``--config`` YAML defaults, :func:`validate_args`) live in :mod:`train.args`, model building
and the model-build record in :mod:`train.model`, checkpoints and the run-folder lock in :mod:`train.checkpoint`,
datasets and loaders in :mod:`train.data`.

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

import glob
import json
import logging
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
    ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn, init_distributed_device, is_distributed_env,
    random_seed, setup_default_logging, update_summary,
)

from . import preempt
from .args import (  # noqa: F401  (the flag API is also train.train's)
    ConfigError, ModelNotFoundError, build_parser, check_values, parse_args, resolve_lr, validate_args,
)
from .checkpoint import (
    CKPT_FORMAT_VERSION, CheckpointError, RunFolderError, RunLock, Saver, atomic_write_text, clean_stale_tmp,
    find_resume_checkpoint, get_rng_state, load_checkpoint_file, previous_run_files, remove_previous_run,
    set_rng_state,
)
from .data import build_datasets, build_loaders, dataset_defaults, dataset_kind
from .model import check_model_config, create_model, load_model_state, model_config

_logger = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss."""


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


# ============================================================================ loss

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
        sums[0] += nn.functional.cross_entropy(out, y, reduction="sum")
        sums[1] += hit[:, 0].sum()
        sums[2] += hit.any(dim=-1).sum()
        sums[3] += y.shape[0]  # a Python number: no host-to-device copy
    loss, top1, top5, n = coll.sum_(sums).tolist()
    n = max(n, 1)
    return OrderedDict(loss=loss / n, top1=100 * top1 / n, top5=100 * top5 / n)


def _pixels(ds):
    base = getattr(ds, "ds", ds)  # _Limit
    images, targets = getattr(base, "images", None), getattr(base, "targets", None)
    if images is None or targets is None:
        return None
    n = len(ds)
    x = torch.tensor(images[:n].reshape(n, -1), dtype=torch.float32) / 255.0
    return x, torch.tensor(targets[:n], dtype=torch.long)


def linear_baseline(train_ds, eval_ds, num_classes: int, iters: int = 30) -> Optional[float]:
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
        load_model_state(model, init["state_dict"], args.initial_checkpoint, args.model)
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
        load_model_state(model_raw, ckpt["state_dict"], resume_path, args.model)
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

    def hand_over(epoch, batches_done):
        """After the preemption checkpoint: every rank hands its signal to the handler that was there before."""
        nonlocal handler
        _logger.warning("Preemption signal: checkpoint written at epoch %d, batch %d (optimizer step %d); "
                        "handing over to the scheduler.", epoch, batches_done, global_step)
        coll.barrier()  # nobody leaves before rank 0 has written the checkpoint
        if handler.requested:
            handler.finish()  # submitit: checkpoint() + requeue + exit; no handler before: terminate
            handler = preempt.install()  # the previous handler let the run go on (submitit ignores TERM)

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
                    hand_over(epoch, batch_idx + 1)
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
            if vals[4] > 0:  # signalled during the epoch's last step
                hand_over(epoch, batch_idx + 1)
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
            load_model_state(model_ema.module, ckpt["state_dict_ema"], path, args.model + " (EMA)")
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
