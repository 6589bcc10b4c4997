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

Everything around the loop is the classification trainer's (``train.train``), through the same functions:
``--config`` files (``train.args.parse_with_config``), distributed set-up, the locked run folder, logging, seeding,
the resume search and checkpoint on preemption (``train.run``), what a checkpoint holds and how a run resumes
(``train.state.TrainState``), the checkpoint files (``train.state.Checkpointer``: ``last.pth.tar``, the ranked
``checkpoint-<epoch>.pth.tar`` history and ``model_best.pth.tar`` by validation mIoU (higher is better),
``recovery-<epoch>-<batch>.pth.tar`` mid-epoch; fsync'ed atomic writes), the loop's device-side sums and its one
host sync (``train.train.EpochSums`` / ``sync``: the non-finite-loss stop) and the hidden ``--debug-*`` fault
injection (``train.hooks``). ``--resume auto`` continues the newest checkpoint exactly (model, optimizer, scheduler,
position in the epoch, RNG; augmentation is seeded per sample). SIGUSR2 / SIGTERM write a checkpoint at the next
step boundary, then hand the signal to the previous handler (submitit: requeue).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import timm
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler
from timm.utils import NativeScaler, ParseKwargs, distribute_bn, update_summary

from .args import ConfigError, parse_with_config
from .checkpoint import CheckpointError, RunFolderError, atomic_write_text, load_checkpoint_file
from .data import ResumableSampler
from .hooks import FaultInjection
from .model import load_model_state
from .run import (
    Collectives, NonFiniteLossError, Preemption, distributed, load_resume_checkpoint, locked_run_folder,
    plain_args, run_logging, save_args, seed_and_threads,
)
from .state import Checkpointer, TrainState
from .train import EpochSums, Run, _autocast, mid_epoch_sync, sync

_logger = logging.getLogger("train")

EVAL_METRIC = "mIoU"   # ranks the end-of-epoch checkpoints (higher is better)


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
                   help="decoder options, e.g. depth=3 num_heads=3 attn_head_dim=100 rep_grid=10 backend=fused")
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
    g = p.add_argument_group("Run (the run folder of train.train)")
    g.add_argument("--output", default="output/segment")
    g.add_argument("--experiment", default="")
    g.add_argument("--resume", default="", help="'auto' (newest checkpoint of the run folder) or a path")
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in the folder and start over")
    g.add_argument("--checkpoint-interval-steps", type=int, default=0, help="mid-epoch checkpoint every N steps")
    g.add_argument("--checkpoint-hist", type=int, default=3, help="end-of-epoch checkpoints kept (best mIoU first)")
    g.add_argument("--preempt-check-interval", type=int, default=10, help="ranks agree on a signal every N steps")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--quiet", action="store_true")
    for flag, kind, default in (("nan-at-step", int, None), ("step-delay", float, 0.0), ("signal-at-step", int, None),
                                ("signal", int, 15)):   # train.hooks.FaultInjection (tests)
        p.add_argument(f"--debug-{flag}", type=kind, default=default, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Flags over the defaults of ``--config`` (YAML keys = flag names, '-' or '_'); a ConfigError names a bad file."""
    return parse_with_config(build_parser(), argv)[0]


_POSITIVE = ("num_classes", "crop_size", "epochs", "batch_size", "log_interval", "eval_batch", "checkpoint_hist",
             "preempt_check_interval")
_POSITIVE_OR_NONE = ("base_size", "eval_stride", "max_steps", "max_train_samples", "max_val_samples")


def validate_args(args: argparse.Namespace, check_paths: bool = True) -> None:
    """Every check that can run before training (the SLURM launcher runs it before queueing a job)."""
    for name in _POSITIVE + _POSITIVE_OR_NONE:
        value = getattr(args, name)
        if (value is not None or name in _POSITIVE) and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {value!r})")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise ConfigError(f"--ratio-range must satisfy 0 < low <= high (got {args.ratio_range})")
    if args.lr <= 0 or args.min_lr < 0 or args.poly_power <= 0:
        raise ConfigError("--lr and --poly-power must be > 0 and --min-lr >= 0")
    import timm_cbsa  # noqa: F401  (registers cbsa_vit_* / cbt_*)
    if not timm.is_model(args.model):
        raise ConfigError(f"--model {args.model}: no such timm model")
    if check_paths:
        if not args.data_dir or not os.path.isdir(args.data_dir):
            raise ConfigError(f"--data-dir {args.data_dir}: no such folder")
        if args.encoder_checkpoint and not os.path.isfile(args.encoder_checkpoint):
            raise ConfigError(f"--encoder-checkpoint {args.encoder_checkpoint}: no such file")


# ============================================================================ set-up

def build_model(args) -> nn.Module:
    """The Segmenter; ``--encoder-checkpoint`` loads the encoder of another segmentation run, ``--freeze-encoder``
    stops its gradients."""
    from timm_cbsa.segmentation import create_segmenter
    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("img_size", args.crop_size)
    kwargs.setdefault("drop_path_rate", args.drop_path)
    model = create_segmenter(args.model, args.num_classes, decoder=args.decoder, pretrained=args.pretrained,
                             feature_index=args.feature_index, decoder_kwargs=dict(args.decoder_kwargs), **kwargs)
    if args.encoder_checkpoint:
        ckpt = load_checkpoint_file(args.encoder_checkpoint)
        enc = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
        load_model_state(model.encoder, enc, args.encoder_checkpoint, f"--model {args.model} "
                         f"{dict(args.model_kwargs)} (the encoder)")
    if args.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


@dataclass
class Data:
    """The training set with its resumable sampler and loader, and this rank's share of the validation set."""
    train_ds: Any
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    val_share: torch.utils.data.Subset

    def start_epoch(self, epoch: int, skip_batches: int, batch_size: int) -> None:
        """The epoch's order and augmentation; the batches already trained are skipped (mid-epoch resume)."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(skip_batches * batch_size)
        self.train_ds.set_epoch(epoch)


def build_data(args, model: nn.Module, rank: int, world: int) -> Data:
    from timm_cbsa.data.ade20k import ADE20KSegmentation, eval_transform, train_transform
    cfg = getattr(model.encoder, "pretrained_cfg", {}) or {}
    mean, std = args.mean or cfg.get("mean", (0.485, 0.456, 0.406)), args.std or cfg.get("std", (0.229, 0.224, 0.225))
    base = args.base_size or args.crop_size
    train_ds = ADE20KSegmentation(args.data_dir, "training", train_transform(
        args.crop_size, base, args.ratio_range, args.hflip, mean, std), args.max_train_samples, args.seed)
    val_ds = ADE20KSegmentation(args.data_dir, "validation", eval_transform(base, mean, std), args.max_val_samples)
    if len(train_ds) < args.batch_size * world:
        raise ConfigError(f"{len(train_ds)} training images cannot fill one global batch of {args.batch_size * world}")
    sampler = ResumableSampler(train_ds, num_replicas=world, rank=rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=torch.cuda.is_available())
    return Data(train_ds, sampler, loader, torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world)))


def build_optimization(args, model: nn.Module, steps_per_epoch: int, device: torch.device) -> TrainState:
    """timm's optimizer, its poly schedule stepped per optimizer update, the float16 loss scaler on CUDA."""
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    scheduler = PolyLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, power=args.poly_power,
                                lr_min=args.min_lr, warmup_t=args.warmup_steps, warmup_lr_init=args.min_lr,
                                t_in_epochs=False)
    scaler = NativeScaler(device="cuda") if args.amp and args.amp_dtype == "float16" and device.type == "cuda" \
        else None
    return TrainState(model, optimizer, scheduler, scaler=scaler)


def check_segmenter_config(saved: Optional[Dict[str, Any]], current: Dict[str, Any], path: str) -> None:
    """Refuse a checkpoint of a segmenter built differently (encoder, decoder, options, classes)."""
    if saved != current:
        raise CheckpointError(f"Checkpoint '{path}' was built as {saved}, this run builds {current}: build the model "
                              "the same way, or start a fresh run.")


def resume(args, state: TrainState, out_dir: str, steps_per_epoch: int) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``--resume``: the segmenter checked against the checkpoint's record, then weights, optimisation state,
    position and RNG (``TrainState``). Returns the ``(path, checkpoint)`` resumed from, or None."""
    resumed = load_resume_checkpoint(args.resume, out_dir, args.rank)
    if resumed is None:
        return None
    path, ckpt = resumed
    check_segmenter_config(ckpt.get("segmenter_config"), state.model.segmenter_config, path)
    state.load_weights(ckpt, path, args.model)
    state.load(ckpt, path, arch=args.model, batches_per_epoch=steps_per_epoch, batch_size=args.batch_size,
               world=args.world_size, rank=args.rank)
    _logger.info("Resumed from %s: epoch %d, batch %d, step %d", path, state.start_epoch, state.skip_batches,
                 state.global_step)
    return resumed


def setup(args, device: torch.device, coll: Collectives, out_dir: str) -> Run:
    """Seed, model, data, optimisation, resume, checkpointer, DDP, ``args.yaml``: the classification trainer's
    :class:`train.train.Run` (no mixup, no TensorBoard; ``data`` is this module's :class:`Data`)."""
    seed_and_threads(args)
    model = build_model(args).to(device)
    data = build_data(args, model, args.rank, args.world_size)
    steps = len(data.loader)
    state = build_optimization(args, model, steps, device)
    resumed = resume(args, state, out_dir, steps)
    checkpointer = Checkpointer(
        state, coll, out_dir, rank=args.rank, batch_size=args.batch_size, eval_metric=EVAL_METRIC,
        max_history=args.checkpoint_hist, resumed=resumed,
        meta={"arch": args.model, "args": plain_args(args), "segmenter_config": model.segmenter_config})
    total = args.epochs * steps if args.max_steps is None else min(args.epochs * steps, args.max_steps)
    train_model = model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if args.rank == 0:
        save_args(args, os.path.join(out_dir, "args.yaml"))
    n_decoder = sum(p.numel() for p in model.decoder.parameters())
    _logger.info("Segmenter: encoder %s, %s decoder (%.2fM params), %d classes; %d train / %d val images; world %d "
                 "on %s; %d steps", args.model, args.decoder, n_decoder / 1e6, args.num_classes, len(data.train_ds),
                 len(data.val_share.dataset), args.world_size, device, total)
    return Run(args, device, coll, out_dir, state, train_model, data, nn.CrossEntropyLoss(ignore_index=255), None,
               checkpointer, FaultInjection.from_args(args), args.epochs, steps, total,
               has_bn=any(name.endswith("running_mean") for name, _ in model.named_buffers()),
               num_params=sum(p.numel() for p in model.parameters()))


# ============================================================================ evaluation

@torch.no_grad()
def evaluate(model: nn.Module, val_share, args, device: torch.device, coll: Collectives) -> Dict[str, float]:
    """mIoU / pixel accuracy of single-scale sliding-window inference, from the confusion matrix of all ranks."""
    from timm_cbsa.segmentation import equal_size_batches, logits_confusion, segmentation_metrics, slide_inference
    model.eval()
    conf = torch.zeros(args.num_classes, args.num_classes, dtype=torch.int64, device=device)
    stride = args.eval_stride or args.crop_size
    for images, labels in equal_size_batches(val_share, args.eval_batch):
        with _autocast(args, device):
            logits = slide_inference(model, images.to(device), args.crop_size, stride, args.eval_batch)
        conf += logits_confusion(logits, labels, args.num_classes)
    m = segmentation_metrics(coll.sum_(conf))
    return dict(mIoU=m["mIoU"], pixel_acc=m["pixel_acc"], mAcc=m["mAcc"])


# ============================================================================ the loop

def train_step(run: Run, sums: EpochSums, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, backward and optimizer step of one batch; the poly schedule follows the step."""
    args, st = run.args, run.state
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    with _autocast(args, run.device):
        logits = run.model(x)
        loss = run.loss_fn(logits, y)
    loss = run.hooks.on_loss(st.global_step + 1, loss)
    if st.scaler is not None:
        st.scaler(loss, st.optimizer, clip_grad=args.clip_grad, parameters=st.model.parameters())
    else:
        loss.backward()
        if args.clip_grad is not None:
            nn.utils.clip_grad_norm_(st.model.parameters(), args.clip_grad)
        st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    st.global_step += 1
    run.steps_this_run += 1
    st.scheduler.step_update(num_updates=st.global_step)
    sums.add(loss, logits, y, st.global_step, count_correct=False)
    run.hooks.after_step(st.global_step)


def log_progress(run: Run, vals: List[float], prev: List[float], epoch: int, batch_idx: int, t_epoch: float) -> None:
    """The progress line of :func:`train.train.mid_epoch_sync` (``vals`` / ``prev``: the sums of :func:`sync` now and
    at the previous line)."""
    _logger.info("Train %d [%d/%d] step %d/%d | loss %.4f (epoch %.4f) | lr %.3g | %.1f img/s | ETA %s", epoch,
                 batch_idx + 1, run.batches_per_epoch, run.state.global_step, run.total_steps,
                 (vals[0] - prev[0]) / max(vals[2] - prev[2], 1), vals[0] / max(vals[2], 1),
                 run.state.optimizer.param_groups[0]["lr"], vals[2] / max(time.time() - t_epoch, 1e-9), run.eta())


def train_epoch(run: Run, epoch: int, skip: int) -> Tuple[EpochSums, int]:
    """Train ``epoch`` from batch ``skip`` to its end or ``--max-steps``, with the classification trainer's
    :func:`train.train.mid_epoch_sync` after every step (progress line, mid-epoch checkpoint, preemption); returns the
    device-side sums and the number of the epoch's batches done (the end of the epoch syncs, evaluates and saves)."""
    run.data.start_epoch(epoch, skip, run.args.batch_size)
    run.model.train()
    if run.args.freeze_encoder:
        run.state.model.encoder.eval()
    sums, prev, t_epoch, batch_idx = EpochSums(run.device), [0.0] * 5, time.time(), skip - 1
    for batch_idx, (x, y) in enumerate(run.data.loader, start=skip):
        train_step(run, sums, x, y)
        if batch_idx + 1 >= run.batches_per_epoch or run.reached_max_steps():
            break
        prev = mid_epoch_sync(run, sums, prev, epoch, batch_idx, t_epoch, log=log_progress)
    return sums, batch_idx + 1


def end_epoch(run: Run, epoch: int, sums: EpochSums, batches_done: int) -> Dict[str, float]:
    """Sync (a non-finite loss stops here), BatchNorm statistics averaged over the ranks, evaluate, epoch line,
    summary row, checkpoint (ranked by mIoU when the epoch is complete), and the hand-over when a signal came in the
    epoch's last step."""
    vals = sync(run, sums, epoch)
    if run.args.distributed and run.has_bn:
        distribute_bn(run.state.model, run.args.world_size, reduce=True)
    metrics = evaluate(run.model, run.data.val_share, run.args, run.device, run.coll)
    lr, loss = run.state.optimizer.param_groups[0]["lr"], vals[0] / max(vals[2], 1)
    _logger.info("Epoch %d/%d | step %d | train loss %.4f | val mIoU %.2f pixel acc %.2f mAcc %.2f | lr %.3g | ETA %s",
                 epoch + 1, run.num_epochs, run.state.global_step, loss, metrics["mIoU"], metrics["pixel_acc"],
                 metrics["mAcc"], lr, run.eta())
    if run.args.rank == 0:
        update_summary(epoch, dict(loss=loss), metrics, os.path.join(run.out_dir, "summary.csv"), lr=lr)
    run.checkpointer.save(epoch, batches_done, batches_done >= run.batches_per_epoch, metrics)
    if vals[4] > 0:
        run.preemption.hand_over(epoch, batches_done, run.state.global_step)
    return metrics


def fit(run: Run) -> Dict[str, Any]:
    """The remaining epochs (checkpoint on preemption meanwhile); returns the final metrics with ``best_mIoU``
    (rank 0), ``epoch``, ``step``, ``output_dir``, ``decoder``, ``train_time_s``."""
    st = run.state
    run.t_start, epoch, metrics = time.time(), st.start_epoch - 1, {}
    run.preemption = Preemption(run.coll, run.args.preempt_check_interval)
    try:
        for epoch in range(st.start_epoch, run.num_epochs):
            if run.reached_max_steps():
                break
            sums, batches_done = train_epoch(run, epoch, st.skip_batches if epoch == st.start_epoch else 0)
            metrics = end_epoch(run, epoch, sums, batches_done)
    finally:
        run.preemption.close()
    if not metrics:   # nothing left to train: evaluate what was loaded
        metrics = evaluate(run.model, run.data.val_share, run.args, run.device, run.coll)
    return dict(metrics, **run.checkpointer.best(), epoch=epoch, step=st.global_step, output_dir=run.out_dir,
                decoder=run.args.decoder, train_time_s=time.time() - run.t_start)


# ============================================================================ entry points

def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns the final metrics ``{'mIoU', 'pixel_acc', 'mAcc', 'best_mIoU', 'epoch', 'step', ...}``."""
    args = parse_args(argv)
    validate_args(args)
    with distributed(args) as device, locked_run_folder(args, device) as (coll, out_dir):
        with run_logging(out_dir, args.rank, args.quiet):
            result = fit(setup(args, device, coll, out_dir))
        if args.rank == 0:
            atomic_write_text(os.path.join(out_dir, "result.json"), json.dumps(result, indent=1))
            print(f"*** Done: {args.model} + {args.decoder} decoder: val mIoU {result['mIoU']:.2f} pixel acc "
                  f"{result['pixel_acc']:.2f} (best mIoU {result['best_mIoU']}), step {result['step']}; run folder "
                  f"{out_dir}", flush=True)
        return result


def cli(argv: Optional[List[str]] = None) -> int:
    from timm_cbsa.data import DatasetNotFoundError
    try:
        main(argv)
    except (ConfigError, CheckpointError, RunFolderError, NonFiniteLossError, DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
