"""What every trainer of this repository does around its loop: distributed set-up, the locked run folder, logging,
seeding, finding the checkpoint to resume from, checkpoint on preemption, the non-finite-loss stop.

``train.train`` (classification) is built on it; a sibling trainer uses it the same way::

    args = parse_args(argv)                     # needs the attributes listed at each function
    with distributed(args) as device, locked_run_folder(args, device) as (coll, out_dir):
        with run_logging(out_dir, args.rank, args.quiet):
            seed_and_threads(args)
            ...                                 # build; resumed = load_resume_checkpoint(args.resume, out_dir, rank)
            preemption = Preemption(coll, args.preempt_check_interval)
            try:
                ...                             # loop: preemption.due(step) -> sync -> checkpoint -> hand_over
            finally:
                preemption.close()

Every collective goes through :class:`Collectives` (tensors on the training device only).
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from timm.utils import init_distributed_device, is_distributed_env, random_seed, setup_default_logging

from . import preempt
from .args import ConfigError
from .checkpoint import (
    RunFolderError, RunLock, atomic_write_text, clean_stale_tmp, find_resume_checkpoint, load_checkpoint_file,
    previous_run_files, remove_previous_run,
)

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
        """``obj`` of every rank, in rank order (one element without a process group)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.sum_(torch.zeros(1, device=self.device)).item()

    def all_agree(self, ok: bool) -> bool:
        """True when ``ok`` is true on every rank."""
        return self.sum_(torch.tensor([1.0 if ok else 0.0], device=self.device)).item() == self.world


def setup_distributed(args) -> torch.device:
    """timm's ``init_distributed_device`` (env:// from torchrun or SLURM), or the process group the caller set up.

    Reads ``args.device`` (None: CUDA if available); sets ``args.device``, ``rank``, ``world_size``, ``local_rank``,
    ``distributed``. Returns the training device (``cuda:LOCAL_RANK`` on GPUs).
    """
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


@contextmanager
def distributed(args) -> Iterator[torch.device]:
    """:func:`setup_distributed`; on exit the process group is destroyed if this call created it."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        yield setup_distributed(args)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ============================================================================ run folder

def run_folder(args) -> str:
    """``--output`` [/ ``--experiment``]."""
    return os.path.join(args.output, args.experiment) if args.experiment else args.output


def _take_folder(out_dir: str, resume: str, overwrite: bool) -> RunLock:
    """Lock ``out_dir``; refuse (or, with ``overwrite``, clear) a previous run unless resuming."""
    lock = RunLock(out_dir).acquire()
    try:
        previous = previous_run_files(out_dir)
        if previous and not resume:
            if not overwrite:
                raise RunFolderError(
                    f"Run folder '{out_dir}' holds a previous run ({', '.join(previous[:6])}). Continue it with "
                    f"--resume auto, start over with --overwrite (deletes those files), or use another "
                    f"--output / --experiment.")
            remove_previous_run(out_dir)
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def locked_run_folder(args, device: torch.device) -> Iterator[Tuple[Collectives, str]]:
    """Rank 0 takes the run folder (:class:`~train.checkpoint.RunLock`; a previous run is refused unless
    ``args.resume``, or deleted with ``args.overwrite``) and every rank learns whether it could; yields the run's
    :class:`Collectives` and the folder. Reads ``args.output``, ``experiment``, ``resume``, ``overwrite``, ``rank``,
    ``world_size``; the lock is released on exit."""
    coll = Collectives(device, args.world_size)
    out_dir = run_folder(args)
    lock, error = None, None
    if args.rank == 0:
        try:
            lock = _take_folder(out_dir, args.resume, args.overwrite)
        except RunFolderError as e:
            error = e
    if not coll.all_agree(error is None):
        raise error or RunFolderError(f"Rank 0 could not take the run folder '{out_dir}' (see its error).")
    try:
        yield coll, out_dir
    finally:
        if lock is not None:
            lock.release()


def load_resume_checkpoint(resume: str, out_dir: str, rank: int) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(path, checkpoint)`` to resume from, or None: ``resume`` is a path, ``'auto'`` (the newest loadable
    checkpoint in ``out_dir``, after rank 0 removed temporaries of a dead writer) or ``''`` (start fresh)."""
    if resume == "auto":
        if rank == 0:
            removed = clean_stale_tmp(out_dir)
            if removed:
                _logger.info("Removed temporary files of a dead writer: %s", removed)
        found = find_resume_checkpoint(out_dir)
        if not found:
            _logger.info("--resume auto: no checkpoint in %s, starting fresh", out_dir)
        return found
    if resume:
        return resume, load_checkpoint_file(resume)
    return None


def plain_args(args) -> Dict[str, Any]:
    """``vars(args)`` with tuples as lists (YAML, weights-only checkpoints)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def save_args(args, path: str) -> None:
    import yaml
    atomic_write_text(path, yaml.safe_dump(plain_args(args), sort_keys=False))


# ============================================================================ logging, seeding

def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def setup_logging(out_dir: str, rank: int, quiet: bool) -> Optional[logging.Handler]:
    """timm's default console logging; the ``train`` logger at INFO on rank 0 (WARNING elsewhere or ``quiet``),
    and on rank 0 a file handler on ``out_dir/log.txt``, returned (None on other ranks)."""
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


@contextmanager
def run_logging(out_dir: str, rank: int, quiet: bool) -> Iterator[None]:
    """:func:`setup_logging` for the duration of the block (the log file is closed on exit)."""
    handler = setup_logging(out_dir, rank, quiet)
    try:
        yield
    finally:
        if handler is not None:
            _logger.removeHandler(handler)
            handler.close()


def seed_and_threads(args) -> None:
    """``args.threads`` (torch threads), ``args.deterministic`` (deterministic algorithms), timm's
    ``random_seed(args.seed, args.rank)``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random_seed(args.seed, args.rank)


# ============================================================================ preemption, non-finite loss

class Preemption:
    """Checkpoint on preemption (:mod:`train.preempt`) for a loop: the handler's flag, when the ranks must agree
    on it, and the hand-over after the checkpoint.

    In the loop, after an optimizer step: if :meth:`due`, all-reduce :meth:`flag` (with the loop's other sums); if
    the sum is > 0, every rank saves the checkpoint, then calls :meth:`hand_over`. :meth:`close` at the end.
    """

    def __init__(self, coll: Collectives, check_interval: int):
        self.coll, self.check_interval = coll, check_interval
        self.handler: Optional[preempt.PreemptionHandler] = None
        if threading.current_thread() is threading.main_thread():
            self.handler = preempt.install()
        else:
            _logger.warning("The trainer runs outside the main thread: no checkpoint on preemption signals.")

    def due(self, step: int) -> bool:
        """Must the ranks agree on the signal after optimizer step ``step``? One process: as soon as it has one;
        several: every ``check_interval`` steps (they stop at the same step)."""
        if self.handler is None:
            return False
        return self.handler.requested if self.coll.world == 1 else step % self.check_interval == 0

    def flag(self) -> float:
        """1.0 if this rank has been signalled (to be summed over the ranks), else 0.0."""
        return 1.0 if self.handler is not None and self.handler.requested else 0.0

    def hand_over(self, epoch: int, batches_done: int, step: int) -> None:
        """After the preemption checkpoint: every rank hands its signal to the handler that was there before
        (submitit: checkpoint + requeue + exit; none: the default action ends the process)."""
        _logger.warning("Preemption signal: checkpoint written at epoch %d, batch %d (optimizer step %d); "
                        "handing over to the scheduler.", epoch, batches_done, step)
        self.coll.barrier()  # nobody leaves before rank 0 has written the checkpoint
        if self.handler is not None and self.handler.requested:
            self.handler.finish()
            self.handler = preempt.install()  # the previous handler let the run go on (submitit ignores TERM)

    def close(self) -> None:
        """Put the previous signal handlers back."""
        if self.handler is not None:
            self.handler.uninstall()


def non_finite_loss(out_dir: str, bad_step: int, epoch: int, step: int) -> NonFiniteLossError:
    """The error for a NaN/inf loss first seen at optimizer step ``bad_step`` (0: on another rank), found by the
    check after ``step``; names the last good checkpoint in ``out_dir``. Logged here, raised by the caller."""
    ckpts = sorted(glob.glob(os.path.join(out_dir, "*.pth.tar")), key=os.path.getmtime)
    msg = (f"Non-finite loss at optimizer step {bad_step if bad_step else '? (on another rank)'} (epoch {epoch}; "
           f"found by the check after step {step}); stopping. Nothing was saved after the last clean check: "
           + (f"the last good checkpoint is kept: {ckpts[-1]}." if ckpts else "no checkpoint was written.")
           + " Try a lower --lr, --clip-grad, or disabling --amp.")
    _logger.error(msg)
    return NonFiniteLossError(msg)
