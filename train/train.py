#!/usr/bin/env python3
"""Train timm / timm_cbsa image classifiers: a short loop over timm's library pieces.

Run from the repository root::

    python -m train.train --config train/configs/fmnist_quickstart.yaml
    torchrun --nproc_per_node 8 -m train.train --config ... --output runs/x --resume auto

:func:`main` = :func:`setup` (model, data, optimisation, resume) -> :func:`fit` (per epoch :func:`train_one_epoch`,
then :func:`end_epoch`: :func:`evaluate`, summary, checkpoint) -> the optional linear baseline
(:mod:`train.baseline`) -> :func:`finish` (``result.json``, the final line). Flags (timm's names, ``--config`` YAML
defaults, :func:`validate_args`) live in :mod:`train.args`, model building and the model-build record in
:mod:`train.model`, datasets and loaders in :mod:`train.data`, checkpoint files and the run-folder lock in
:mod:`train.checkpoint`, what a checkpoint holds and how a run resumes in :mod:`train.state`, distributed set-up,
the locked run folder, logging and preemption in :mod:`train.run` (shared with other trainers), step hooks (fault
injection for tests) in :mod:`train.hooks`.

timm does: distributed set-up (``init_distributed_device``), seeding (``random_seed``), logging
(``setup_default_logging``), datasets and loaders (``create_dataset``, ``create_loader``, ``PrefetchLoader``,
``RepeatAugSampler``), optimizer / scheduler / EMA / AMP scaler / mixup / losses, ``distribute_bn``,
``update_summary``. What is ours: exact mid-epoch resume (model, optimizer, scheduler, EMA, scaler, sampler position,
RNG), fsync'ed checkpoints and a run-folder lock, a non-finite-loss stop, checkpoint on preemption, the
Fashion-MNIST adapter.

Host syncs: the loop keeps loss, accuracy and a non-finite flag on the device and reads them (one all-reduce, one
copy to the host) only at a *sync point*: every ``--log-interval`` steps, before any checkpoint, at the end of an
epoch, and in distributed runs every ``--preempt-check-interval`` steps, where the ranks also agree on a preemption
signal. A checkpoint is written only after a sync point found no non-finite loss.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from timm.data import Mixup, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn, update_summary

from .args import (  # noqa: F401  (the flag API is also train.train's)
    ConfigError, ModelNotFoundError, build_parser, check_values, parse_args, resolve_lr, validate_args,
)
from .baseline import compare_with_linear_baseline, linear_baseline  # noqa: F401  (linear_baseline: API)
from .checkpoint import CheckpointError, RunFolderError, atomic_write_text, load_checkpoint_file
from .data import build_datasets, build_loaders, dataset_defaults, dataset_kind
from .hooks import FaultInjection, StepHooks
from .model import check_model_config, create_model, load_model_state, model_config
from .run import (  # noqa: F401  (Collectives, setup_distributed: also train.train's API)
    Collectives, NonFiniteLossError, Preemption, distributed, fmt_time, load_resume_checkpoint, locked_run_folder,
    non_finite_loss, plain_args, run_logging, save_args, seed_and_threads, setup_distributed,
)
from .state import Checkpointer, TrainState

_logger = logging.getLogger("train")


# ============================================================================ the run

@dataclass
class Data:
    """Datasets, loaders and the data config of a run."""
    config: Dict[str, Any]  # timm data config (input_size, mean, std, ...)
    train_ds: Any
    eval_ds: Any
    train_loader: Any
    eval_loader: Any
    sampler: Any  # train.data.ResumableSampler; None for streaming data
    num_classes: int

    def start_epoch(self, epoch: int, skip_samples: int) -> None:
        """Shuffle for ``epoch``; a map-style sampler skips the samples already trained (mid-epoch resume)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(skip_samples)
        elif hasattr(self.train_loader.dataset, "set_epoch"):
            self.train_loader.dataset.set_epoch(epoch)


@dataclass
class Run:
    """Everything :func:`setup` builds for the loop, and the loop's clock."""
    args: Any
    device: torch.device
    coll: Collectives
    out_dir: str
    state: TrainState
    model: nn.Module  # what the loop calls: state.model, compiled / DDP-wrapped
    data: Data
    loss_fn: nn.Module
    mixup_fn: Optional[Mixup]
    checkpointer: Checkpointer
    hooks: StepHooks
    num_epochs: int
    batches_per_epoch: int
    total_steps: int
    has_bn: bool
    num_params: int
    tb: Any = None  # TensorBoard SummaryWriter (rank 0, --log-tensorboard)
    preemption: Optional[Preemption] = None  # installed by fit()
    t_start: float = 0.0
    steps_this_run: int = 0

    def reached_max_steps(self) -> bool:
        return self.args.max_steps is not None and self.state.global_step >= self.args.max_steps

    def eta(self) -> str:
        elapsed = time.time() - self.t_start
        return fmt_time((self.total_steps - self.state.global_step) * elapsed / max(self.steps_this_run, 1))


# ============================================================================ setup

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


def _data_config(args, model: nn.Module, defaults: Dict[str, Any], in_chans: int) -> Dict[str, Any]:
    """timm's ``resolve_data_config`` over the flags, the dataset's defaults and the model's pretrained cfg."""
    cfg_args = dict(vars(args))
    if defaults.get("mean") and args.mean is None:
        cfg_args.update(mean=defaults["mean"], std=defaults["std"])
    if defaults.get("crop_pct") and args.crop_pct is None:
        cfg_args["crop_pct"] = defaults["crop_pct"]
    cfg_args["input_size"] = args.input_size or ((in_chans, args.img_size, args.img_size) if args.img_size else None)
    data_cfg = resolve_data_config(cfg_args, model=model, verbose=False)
    if len(data_cfg["mean"]) != data_cfg["input_size"][0]:
        data_cfg["mean"] = tuple(data_cfg["mean"][:1]) * data_cfg["input_size"][0]
        data_cfg["std"] = tuple(data_cfg["std"][:1]) * data_cfg["input_size"][0]
    return data_cfg


def build_model_and_data(args, device: torch.device) -> Tuple[nn.Module, Dict[str, Any], Data]:
    """The model (on ``device``, ``--initial-checkpoint`` loaded), its build record, and the datasets with loaders.

    The class count comes from ``--num-classes``, the dataset's defaults or the dataset itself (the model is
    rebuilt when the provisional 1000 was wrong)."""
    defaults = dataset_defaults(dataset_kind(args.dataset))
    in_chans = args.input_size[0] if args.input_size else (args.in_chans or defaults.get("in_chans", 3))
    if args.img_size is None and "img_size" in defaults and not args.input_size:
        args.img_size = defaults["img_size"]
    num_classes = args.num_classes or defaults.get("num_classes")
    model = create_model(args, num_classes or 1000, in_chans)  # provisional class count: data config from it
    data_cfg = _data_config(args, model, defaults, in_chans)
    train_ds, eval_ds, found_classes = build_datasets(args, data_cfg)
    if found_classes and num_classes and num_classes < found_classes:
        raise ConfigError(f"--num-classes {num_classes} but the dataset has {found_classes} classes.")
    if num_classes is None:
        num_classes = found_classes or 1000
        if num_classes != 1000:
            model = create_model(args, num_classes, in_chans)
    model_cfg = model_config(args, model, num_classes, in_chans)
    if args.initial_checkpoint:
        init = load_checkpoint_file(args.initial_checkpoint)
        check_model_config(init.get("model_config"), model_cfg, args.initial_checkpoint)
        load_model_state(model, init["state_dict"], args.initial_checkpoint, args.model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and args.distributed:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm); drop it on CPU.")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loaders = build_loaders(args, data_cfg, train_ds, eval_ds, args.rank, args.world_size, device)
    return model, model_cfg, Data(data_cfg, train_ds, eval_ds, *loaders, num_classes)


def build_optimization(args, model: nn.Module, num_classes: int, updates_per_epoch: int, device: torch.device):
    """timm's optimizer, scheduler, AMP scaler, EMA, mixup and loss: ``(TrainState, num_epochs, mixup_fn, loss)``."""
    opt_kwargs = dict(args.opt_kwargs)
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay,
                                    filter_bias_and_bn=args.filter_bias_and_bn, **opt_kwargs)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        warmup_prefix=args.warmup_prefix, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    scaler = NativeScaler(device="cuda") if args.amp and device.type == "cuda" and \
        args.amp_dtype == "float16" else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    loss_fn = build_loss(args, mixup_fn is not None).to(device)
    return TrainState(model, optimizer, scheduler, ema, scaler), num_epochs, mixup_fn, loss_fn


def resume(args, state: TrainState, model_cfg: Dict[str, Any], out_dir: str, batches_per_epoch: int,
           streaming: bool) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``--resume``: weights (checked against the model-build record), then unless ``--no-resume-opt`` the
    optimisation state and position. Returns the ``(path, checkpoint)`` resumed from, or None."""
    resumed = load_resume_checkpoint(args.resume, out_dir, args.rank)
    if resumed is None:
        return None
    path, ckpt = resumed
    check_model_config(ckpt.get("model_config"), model_cfg, path)
    state.load_weights(ckpt, path, args.model)
    if not args.no_resume_opt:
        state.load(ckpt, path, arch=args.model, batches_per_epoch=batches_per_epoch, batch_size=args.batch_size,
                   world=args.world_size, rank=args.rank, streaming=streaming)
    _logger.info("Resumed from %s: epoch %d, batch %d, global step %d", path, state.start_epoch,
                 state.skip_batches, state.global_step)
    return resumed


def wrap_model(args, model: nn.Module, device: torch.device) -> nn.Module:
    """``--torchcompile``, then DistributedDataParallel in distributed runs."""
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def open_records(args, out_dir: str):
    """Rank 0: ``args.yaml``, Weights & Biases (``--log-wandb``); returns the TensorBoard writer or None."""
    if args.rank != 0:
        return None
    save_args(args, os.path.join(out_dir, "args.yaml"))
    tb = None
    if args.log_tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(os.path.join(out_dir, "tb"))
    if args.log_wandb:
        import wandb
        wandb.init(project=args.experiment or "timm_cbsa", config=plain_args(args), dir=out_dir)
    return tb


def _len(ds) -> str:
    try:
        return str(len(ds))
    except TypeError:
        return "?"


def setup(args, device: torch.device, coll: Collectives, out_dir: str, hooks: StepHooks) -> Run:
    """Seed, build model / data / optimisation (in the order that fixes a fresh run's random numbers), resume,
    checkpointer, DDP, run records."""
    seed_and_threads(args)
    model, model_cfg, data = build_model_and_data(args, device)
    num_params = sum(p.numel() for p in model.parameters())
    batches_per_epoch = len(data.train_loader)
    updates_per_epoch = (batches_per_epoch + args.grad_accum_steps - 1) // args.grad_accum_steps
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    args.lr = resolve_lr(args, global_batch)
    _logger.info("Model %s (%s) %.2fM params, %d classes, input %s; data %s: %s train / %s eval; world %d on %s; "
                 "global batch %d, lr %.3g", args.model, dict(args.model_kwargs), num_params / 1e6,
                 data.num_classes, tuple(data.config["input_size"]), args.dataset, _len(data.train_ds),
                 _len(data.eval_ds), args.world_size, device, global_batch, args.lr)
    state, num_epochs, mixup_fn, loss_fn = build_optimization(args, model, data.num_classes, updates_per_epoch,
                                                              device)
    resumed = resume(args, state, model_cfg, out_dir, batches_per_epoch, streaming=data.sampler is None)
    checkpointer = Checkpointer(
        state, coll, out_dir, rank=args.rank, batch_size=args.batch_size, eval_metric=args.eval_metric,
        max_history=args.checkpoint_hist, resumed=resumed,
        meta={"arch": args.model, "args": plain_args(args), "model_config": model_cfg})
    total_steps = num_epochs * updates_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    return Run(args, device, coll, out_dir, state, wrap_model(args, model, device), data, loss_fn, mixup_fn,
               checkpointer, hooks, num_epochs, batches_per_epoch, total_steps,
               has_bn=any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
               num_params=num_params, tb=open_records(args, out_dir))


# ============================================================================ the loop

def _autocast(args, device):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if (device.type != "cuda" or args.amp_dtype == "bfloat16") else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class EpochSums:
    """An epoch's loss * n, correct, n and non-finite-loss count, and the first step with a non-finite loss, kept on
    the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, device=device)
        self.first_bad = torch.zeros((), device=device, dtype=torch.long)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, out: torch.Tensor, y_hard: torch.Tensor, step: int, count_correct: bool):
        loss = loss.detach().float()
        n = y_hard.shape[0]
        self.sums[0] += loss * n
        self.sums[2] += n
        nonfinite = ~torch.isfinite(loss)
        self.sums[3] += nonfinite.float()
        self.first_bad = torch.where(nonfinite & (self.first_bad == 0), step, self.first_bad)
        if count_correct and y_hard.ndim == 1:
            self.sums[1] += (out.detach().argmax(-1) == y_hard).sum()


def sync(run: Run, sums: EpochSums, epoch: int) -> List[float]:
    """The only host read of the loop: ``[loss*n, correct, n, non-finite, preempt]`` summed over the ranks; a
    non-finite loss on any rank stops the run."""
    flag = torch.tensor([run.preemption.flag()], device=run.device)
    vals = run.coll.sum_(torch.cat([sums.sums, flag])).tolist()
    if vals[3] > 0:
        raise non_finite_loss(run.out_dir, int(sums.first_bad.item()), epoch, run.state.global_step)
    return vals


def train_step(run: Run, sums: EpochSums, x: torch.Tensor, y: torch.Tensor, need_update: bool) -> None:
    """Forward / backward of one micro-batch; the optimizer steps when ``need_update``."""
    args, st, accum = run.args, run.state, run.args.grad_accum_steps
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    y_hard = y
    if run.mixup_fn is not None:
        x, y = run.mixup_fn(x, y)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with run.model.no_sync() if (args.distributed and not need_update) else nullcontext():
        with _autocast(args, run.device):
            out = run.model(x)
            loss = run.loss_fn(out, y)
        loss = run.hooks.on_loss(st.global_step + 1, loss)
        if st.scaler is not None:
            st.scaler(loss / accum, st.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                      parameters=st.model.parameters(), need_update=need_update)
        else:
            (loss / accum).backward()
            if need_update:
                if args.clip_grad is not None:
                    dispatch_clip_grad(st.model.parameters(), args.clip_grad, mode=args.clip_mode)
                st.optimizer.step()
    sums.add(loss, out, y_hard, st.global_step + 1, count_correct=run.mixup_fn is None)


def after_update(run: Run) -> None:
    """Bookkeeping after an optimizer step: step count, EMA, per-update LR schedule, hooks."""
    st = run.state
    st.optimizer.zero_grad(set_to_none=True)
    st.global_step += 1
    run.steps_this_run += 1
    if st.ema is not None:
        st.ema.update(st.model, step=st.global_step)
    st.scheduler.step_update(num_updates=st.global_step)
    run.hooks.after_step(st.global_step)


def log_progress(run: Run, vals: List[float], prev: List[float], epoch: int, batch_idx: int, t_epoch: float):
    n = vals[2] - prev[2]
    loss = (vals[0] - prev[0]) / max(n, 1)
    acc = 100 * (vals[1] - prev[1]) / max(n, 1)
    step, total = run.state.global_step, run.total_steps
    lr = run.state.optimizer.param_groups[0]["lr"]
    _logger.info("Train %d [%d/%d] step %d of %d (%.0f%%) | loss %.4f (epoch %.4f) acc %.2f | lr %.3g | "
                 "%.0f img/s | ETA %s", epoch, batch_idx + 1, run.batches_per_epoch, step, total,
                 100.0 * step / max(total, 1), loss, vals[0] / max(vals[2], 1), acc, lr,
                 vals[2] / max(time.time() - t_epoch, 1e-9), run.eta())
    if run.tb is not None:
        run.tb.add_scalar("train/loss", loss, step)
        run.tb.add_scalar("train/lr", lr, step)


def mid_epoch_sync(run: Run, sums: EpochSums, prev: List[float], epoch: int, batch_idx: int, t_epoch: float,
                   log: Callable[..., None] = log_progress) -> List[float]:
    """After an optimizer step: log (``log``, with :func:`log_progress`'s arguments), checkpoint and act on a
    preemption signal when due. Returns the sums of the last progress line."""
    args, step = run.args, run.state.global_step
    log_now = step % args.log_interval == 0
    ckpt_now = bool(args.checkpoint_interval_steps) and step % args.checkpoint_interval_steps == 0
    if not (log_now or ckpt_now or run.preemption.due(step)):
        return prev
    vals = sync(run, sums, epoch)
    if log_now:
        log(run, vals, prev, epoch, batch_idx, t_epoch)
        prev = vals
    preempting = vals[4] > 0
    if ckpt_now or preempting:
        run.checkpointer.save(epoch, batch_idx + 1, False)
    if preempting:
        run.preemption.hand_over(epoch, batch_idx + 1, step)
    return prev


def train_one_epoch(run: Run, epoch: int, skip: int) -> Tuple[EpochSums, int, float]:
    """Train ``epoch`` from batch ``skip`` until its end or ``--max-steps``. Returns the device-side sums, the index
    of the last batch trained and the epoch's start time."""
    st = run.state
    run.data.start_epoch(epoch, skip * run.args.batch_size)
    run.model.train()
    sums = EpochSums(run.device)
    prev, t_epoch, batch_idx = [0.0] * 5, time.time(), skip - 1
    st.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(run.data.train_loader):
        if skip + i >= run.batches_per_epoch:
            break  # streaming data resumed mid-epoch: only the rest of the epoch's batches
        batch_idx = skip + i
        last_in_epoch = batch_idx + 1 == run.batches_per_epoch
        need_update = (batch_idx + 1) % run.args.grad_accum_steps == 0 or last_in_epoch
        train_step(run, sums, x, y, need_update)
        if not need_update:
            continue
        after_update(run)
        if last_in_epoch or run.reached_max_steps():
            break  # end_epoch() syncs, evaluates and saves
        prev = mid_epoch_sync(run, sums, prev, epoch, batch_idx, t_epoch)
    return sums, batch_idx, t_epoch


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


def evaluate_run(run: Run) -> Dict[str, float]:
    """:func:`evaluate` of the model, and of its EMA (``ema_*`` keys) if any."""
    metrics = evaluate(run.model, run.data.eval_loader, run.device, run.args, run.coll)
    if run.state.ema is not None:
        metrics.update((f"ema_{k}", v) for k, v in
                       evaluate(run.state.ema.module, run.data.eval_loader, run.device, run.args, run.coll).items())
    return metrics


def write_summary(run: Run, epoch: int, train_metrics, eval_metrics, lr: float) -> None:
    """Rank 0: a ``summary.csv`` row (timm's ``update_summary``), TensorBoard scalars."""
    if run.args.rank != 0:
        return
    update_summary(epoch, train_metrics, eval_metrics, os.path.join(run.out_dir, "summary.csv"), lr=lr,
                   log_wandb=run.args.log_wandb)
    if run.tb is not None:
        for k, v in eval_metrics.items():
            run.tb.add_scalar(f"eval/{k}", v, epoch)
        run.tb.add_scalar("train/epoch_loss", train_metrics["loss"], epoch)


def end_epoch(run: Run, epoch: int, sums: EpochSums, batch_idx: int, t_epoch: float) -> Dict[str, float]:
    """End of an epoch (or of the run: ``--max-steps``): sync, BatchNorm statistics, evaluation, LR schedule, epoch
    line, summary row, checkpoint, and the preemption hand-over if a signal came in the last step."""
    args, st = run.args, run.state
    vals = sync(run, sums, epoch)
    train_rate = vals[2] / max(time.time() - t_epoch, 1e-9)  # global img/s of the training phase
    complete = batch_idx + 1 >= run.batches_per_epoch
    train_metrics = OrderedDict(loss=vals[0] / max(vals[2], 1))
    if run.mixup_fn is None:
        train_metrics["top1"] = 100 * vals[1] / max(vals[2], 1)
    if args.distributed and run.has_bn and args.dist_bn and not args.sync_bn:
        distribute_bn(st.model, args.world_size, args.dist_bn == "reduce")
    eval_metrics = evaluate_run(run)
    lr = st.optimizer.param_groups[0]["lr"]
    if complete:
        st.scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
    _logger.info("Epoch %d/%d | step %d/%d | train loss %.4f%s | eval loss %.4f top1 %.2f top5 %.2f%s | "
                 "lr %.3g | %.0f img/s | ETA %s", epoch + 1, run.num_epochs, st.global_step, run.total_steps,
                 train_metrics["loss"], f" acc {train_metrics['top1']:.2f}" if "top1" in train_metrics else "",
                 eval_metrics["loss"], eval_metrics["top1"], eval_metrics["top5"],
                 f" (EMA top1 {eval_metrics['ema_top1']:.2f})" if "ema_top1" in eval_metrics else "",
                 lr, train_rate, run.eta())
    write_summary(run, epoch, train_metrics, eval_metrics, lr)
    run.checkpointer.save(epoch, batch_idx + 1, complete, eval_metrics)
    if vals[4] > 0:  # signalled during the epoch's last step
        run.preemption.hand_over(epoch, batch_idx + 1, st.global_step)
    return eval_metrics


def fit(run: Run) -> Dict[str, Any]:
    """Train the remaining epochs (checkpoint on preemption meanwhile); returns the final metrics with ``epoch``,
    ``step``, ``output_dir``, ``num_params``, ``train_time_s`` and, on rank 0, the best checkpoint's metric."""
    st = run.state
    run.t_start, last_epoch, eval_metrics = time.time(), st.start_epoch - 1, {}
    stopped = st.global_step >= run.total_steps and run.args.max_steps is not None
    run.preemption = Preemption(run.coll, run.args.preempt_check_interval)
    try:
        for epoch in range(st.start_epoch, run.num_epochs):
            if stopped:
                break
            sums, batch_idx, t_epoch = train_one_epoch(run, epoch, st.skip_batches if epoch == st.start_epoch else 0)
            eval_metrics = end_epoch(run, epoch, sums, batch_idx, t_epoch)
            last_epoch, stopped = epoch, run.reached_max_steps()
    finally:
        run.preemption.close()
        if run.tb is not None:
            run.tb.close()
    if not eval_metrics:  # nothing left to train (finished / max steps reached): just evaluate
        eval_metrics = evaluate(run.model, run.data.eval_loader, run.device, run.args, run.coll)
    result = dict(eval_metrics)
    result.update(epoch=last_epoch, step=st.global_step, output_dir=run.out_dir, num_params=run.num_params,
                  train_time_s=time.time() - run.t_start, **run.checkpointer.best())
    return result


def finish(run: Run, result: Dict[str, Any], note: str = "") -> None:
    """Rank 0: ``result.json`` and the final line (``note`` appended, e.g. the linear baseline)."""
    if run.args.rank != 0:
        return
    atomic_write_text(os.path.join(run.out_dir, "result.json"), json.dumps(result, indent=1))
    print(f"*** Done: {run.args.model} on {run.args.dataset}: test top-1 {result['top1']:.2f}%  top-5 "
          f"{result['top5']:.2f}%  (epoch {result['epoch'] + 1}, step {result['step']}, "
          f"{fmt_time(result['train_time_s'])}){note}; checkpoints in {run.out_dir}", flush=True)


# ============================================================================ entry points

def main(argv: Optional[List[str]] = None, hooks: Optional[StepHooks] = None) -> Dict[str, Any]:
    """Train; returns the final metrics ``{'top1', 'top5', 'loss', 'epoch', 'step', ...}``.

    ``hooks`` act on every step (:mod:`train.hooks`); by default the ``--debug-*`` flags' fault injection."""
    args = parse_args(argv)
    validate_args(args)
    with distributed(args) as device, locked_run_folder(args, device) as (coll, out_dir):
        with run_logging(out_dir, args.rank, args.quiet):
            run = setup(args, device, coll, out_dir, hooks or FaultInjection.from_args(args))
            result = fit(run)
        note = ""
        if args.linear_baseline and args.rank == 0:
            note = compare_with_linear_baseline(result, run.data.train_ds, run.data.eval_ds, run.data.num_classes)
        finish(run, result, note)
        return result


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
