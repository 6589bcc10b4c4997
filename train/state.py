"""The training state a checkpoint holds and a resume restores, and the writer of a run's checkpoints.

:class:`TrainState` is the model (unwrapped), optimizer, timm scheduler, optional EMA and AMP scaler, and the run's
position (optimizer steps, epoch and batch to start from). :class:`Checkpointer` writes it with everything an exact
mid-epoch resume needs (every rank's RNG state, the batch position, the world size) through
:class:`train.checkpoint.Saver`; :meth:`TrainState.load` puts a run back where the checkpoint left it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

import timm

from .checkpoint import CKPT_FORMAT_VERSION, CheckpointError, Saver, get_rng_state, set_rng_state
from .model import load_model_state
from .run import Collectives

_logger = logging.getLogger("train")


@dataclass
class TrainState:
    """What a checkpoint holds besides its metadata, and where the run stands."""
    model: nn.Module  # unwrapped: no DDP, no torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm Scheduler
    ema: Optional[Any] = None  # timm ModelEmaV3
    scaler: Optional[Any] = None  # timm NativeScaler
    global_step: int = 0  # optimizer steps taken
    start_epoch: int = 0  # the epoch training (re)starts in
    skip_batches: int = 0  # batches of start_epoch already trained

    def state_dict(self) -> Dict[str, Any]:
        """Weights and optimisation state, under the keys of timm's checkpoints."""
        st = {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
              "scheduler": self.scheduler.state_dict()}
        if self.ema is not None:
            st["state_dict_ema"] = self.ema.module.state_dict()
        if self.scaler is not None:
            st[self.scaler.state_dict_key] = self.scaler.state_dict()
        return st

    def load_weights(self, ckpt: Dict[str, Any], path: str, arch: str) -> None:
        """The model weights of ``ckpt`` (an error naming the mismatching keys if they do not fit)."""
        load_model_state(self.model, ckpt["state_dict"], path, arch)

    def load(self, ckpt: Dict[str, Any], path: str, *, arch: str, batches_per_epoch: int, batch_size: int,
             world: int, rank: int, streaming: bool = False) -> None:
        """Optimizer, scheduler (and the learning rate where the interrupted run had it), EMA, scaler, this rank's
        RNG state and the position (``global_step``, ``start_epoch``, ``skip_batches``) from ``ckpt``."""
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"Checkpoint '{path}': optimizer state does not match this run's optimizer "
                                  f"({type(self.optimizer).__name__}) / this model ({e}).") from e
        if self.ema is not None:
            if "state_dict_ema" in ckpt:
                load_model_state(self.ema.module, ckpt["state_dict_ema"], path, arch + " (EMA)")
            else:
                _logger.warning("Checkpoint has no EMA weights; EMA restarts from the model weights.")
                self.ema.set(self.model)
        if self.scaler is not None and self.scaler.state_dict_key in ckpt:
            self.scaler.load_state_dict(ckpt[self.scaler.state_dict_key])
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self._load_position(ckpt, batches_per_epoch, batch_size, world, streaming)
        rng = ckpt.get("rng_states")
        if rng and len(rng) == world:
            set_rng_state(rng[rank])
        elif rng:
            _logger.warning("World size changed (%d -> %d): RNG state not restored.", len(rng), world)
        if self.start_epoch > 0 or self.global_step > 0:  # the learning rate where the interrupted run had it
            self.scheduler.step(self.start_epoch)
            self.scheduler.step_update(num_updates=self.global_step)

    def _load_position(self, ckpt, batches_per_epoch: int, batch_size: int, world: int, streaming: bool) -> None:
        epoch, done = int(ckpt.get("epoch", 0)), int(ckpt.get("batches_done", batches_per_epoch))
        self.global_step = int(ckpt.get("global_step", 0))
        if ckpt.get("epoch_complete", True) or done >= batches_per_epoch:
            self.start_epoch, self.skip_batches = epoch + 1, 0
            return
        self.start_epoch, self.skip_batches = epoch, done
        if int(ckpt.get("batch_size", batch_size)) != batch_size or int(ckpt.get("world_size", world)) != world:
            _logger.warning("Batch size / world size changed since the checkpoint; the rest of epoch %d is "
                            "skipped approximately.", epoch)
        if streaming:
            _logger.info("Streaming data: epoch %d restarts its shard stream and trains its remaining %d batches "
                         "(samples of its first %d batches may be seen twice, as many others not at all).",
                         epoch, batches_per_epoch - done, done)


class Checkpointer:
    """Writes a run's checkpoints: every rank calls :meth:`save` (the RNG states of all ranks are gathered), rank 0
    writes with a :class:`~train.checkpoint.Saver` (``saver``; None on other ranks).

    Args:
        state: what is saved.
        coll: the run's collectives.
        folder: the run folder.
        rank: this process's rank.
        meta: entries every checkpoint carries as they are (e.g. ``arch``, ``args``, ``model_config``).
        batch_size: per-process batch size (a resume with another one warns).
        eval_metric: the key of the metrics passed to :meth:`save` that ranks end-of-epoch checkpoints.
        max_history: end-of-epoch checkpoints kept.
        resumed: ``(path, checkpoint)`` the run resumed from: its checkpoint ranking is continued when it lies in
            ``folder``.
    """

    def __init__(self, state: TrainState, coll: Collectives, folder: str, *, rank: int, meta: Dict[str, Any],
                 batch_size: int, eval_metric: str = "top1", max_history: int = 10,
                 resumed: Optional[Tuple[str, Dict[str, Any]]] = None):
        self.state, self.coll, self.meta = state, coll, meta
        self.batch_size, self.eval_metric = batch_size, eval_metric
        self.saver = Saver(folder, decreasing=eval_metric == "loss", max_history=max_history) if rank == 0 else None
        if self.saver is not None and resumed is not None and resumed[1].get("saver") and \
                os.path.dirname(os.path.abspath(resumed[0])) == os.path.abspath(folder):
            self.saver.load_state_dict(resumed[1]["saver"])

    def save(self, epoch: int, batches_done: int, complete: bool, metrics: Optional[Dict[str, float]] = None):
        """End of ``epoch`` (``complete``: ranked checkpoint, recovery files dropped) or a mid-epoch recovery
        checkpoint after ``batches_done`` batches. Every rank must call it."""
        rng = self.coll.gather_objects(get_rng_state())
        if self.saver is None:
            return
        metrics = dict(metrics or {})
        metric = metrics.get(self.eval_metric) if complete else None
        held = self.state.state_dict()
        ckpt = {"version": CKPT_FORMAT_VERSION, **self.meta, "epoch": epoch,
                **{k: held.pop(k) for k in ("state_dict", "optimizer", "scheduler")},
                "metric": metric, "timm_version": timm.__version__, "epoch_complete": complete,
                "batches_done": batches_done, "global_step": self.state.global_step, "batch_size": self.batch_size,
                "world_size": self.coll.world, "rng_states": rng, "metrics": metrics, **held}  # held: EMA, scaler
        if complete:
            self.saver.save_checkpoint(ckpt, epoch, metric)
            self.saver.remove_recovery()
        else:
            self.saver.save_recovery(ckpt, epoch, batches_done)

    def best(self) -> Dict[str, Any]:
        """``{'best_<eval_metric>': ..., 'best_epoch': ...}`` on rank 0, ``{}`` elsewhere."""
        if self.saver is None:
            return {}
        return {"best_" + self.eval_metric: self.saver.best_metric, "best_epoch": self.saver.best_epoch}
