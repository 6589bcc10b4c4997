"""Checkpoint files and the run folder: atomic writes, the run-folder lock, loading and finding checkpoints.

Layout of a run folder (``--output DIR`` [+ ``--experiment NAME``]), written by rank 0 only (:class:`Saver`, the file
layout of timm's ``CheckpointSaver``):

* ``last.pth.tar``                  the newest checkpoint, end-of-epoch or mid-epoch (a hard link to the newest
                                    recovery file).
* ``checkpoint-<E>.pth.tar``        end-of-epoch checkpoints ranked by the eval metric, ``--checkpoint-hist`` kept.
* ``model_best.pth.tar``            the best of them.
* ``recovery-<E>-<B>.pth.tar``      mid-epoch checkpoints (``--checkpoint-interval-steps``, a preemption signal,
                                    ``--max-steps``; the two newest kept).
* ``args.yaml``, ``summary.csv``, ``log.txt``, ``result.json``, ``.lock``.

Every file is written to a temporary file in the same folder (named after the writing host and pid), fsync'ed and
moved into place with :func:`os.replace`, so a crash (even SIGKILL) during a write leaves the previous file intact;
:func:`find_resume_checkpoint` picks the newest loadable checkpoint; :class:`RunLock` keeps two runs out of one folder.
What a checkpoint holds (model, optimizer, scheduler, EMA, scaler, position, per-rank RNG states, how the model was
built) is put together by :class:`train.state.Checkpointer`.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import random
import re
import shutil
import socket
import time
import uuid
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

_logger = logging.getLogger("train")

LAST_NAME = "last.pth.tar"
BEST_NAME = "model_best.pth.tar"
LOCK_NAME = ".lock"
CKPT_FORMAT_VERSION = 2
RUN_FILES = ("*.pth.tar", "summary.csv", "args.yaml", "result.json")
# .<target>.<host>.<pid>.<random>.tmp
_TMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")
STALE_TMP_FOREIGN_HOST_S = 3600.0


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model / run."""


class RunFolderError(RuntimeError):
    """The run folder is in use by another run, or holds a previous run and neither --resume nor --overwrite was given."""


def _host() -> str:
    return socket.gethostname().split(".")[0].replace(".", "_") or "host"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    """A temporary file next to ``path``, named after the writing host and pid (see :func:`clean_stale_tmp`)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    return os.path.join(folder, f".{os.path.basename(path)}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temp file in ``path``'s folder, fsync, ``os.replace``; the temp file is removed on error."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def clean_stale_tmp(folder: str) -> List[str]:
    """Remove temporaries left by a writer that died; returns the removed names.

    A temporary is removed only when its writer is provably gone: written on this host by a pid that no longer
    exists, or written on another host more than an hour ago. A file being written by a live process is never
    touched (nor is any file that does not follow our temporary-name pattern).
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    host = _host()
    for name in sorted(os.listdir(folder)):
        m = _TMP_RE.match(name)
        if not m:
            continue
        path = os.path.join(folder, name)
        if m["host"] == host:
            stale = not _pid_alive(int(m["pid"]))
        else:
            try:
                stale = time.time() - os.path.getmtime(path) > STALE_TMP_FOREIGN_HOST_S
            except OSError:
                stale = False
        if stale:
            try:
                os.remove(path)
                removed.append(name)
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------------------- run folder lock

class RunLock:
    """Exclusive lock on a run folder: ``fcntl.flock`` on ``DIR/.lock``, which records pid, host and start time.

    The kernel drops a flock when its process dies (SIGKILL, node reboot), so a lock left by a dead run is taken
    over without any clean-up. On file systems without working flock the lock degrades to the recorded pid/host
    (check the process is gone, then delete ``DIR/.lock``).
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            finally:
                os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(
                    f"Run folder '{self.folder}' is in use by another run ({holder}). Two runs in one folder "
                    f"overwrite each other's checkpoints: use another --output / --experiment, or wait for that "
                    f"run to end.") from None
            raise RunFolderError(f"Cannot lock run folder '{self.folder}' ({e}); the file system may not "
                                 f"support flock.") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def previous_run_files(folder: str) -> List[str]:
    """Files of an earlier run in ``folder`` (checkpoints, summary, args, result)."""
    found = []
    for pattern in RUN_FILES:
        found += glob.glob(os.path.join(folder, pattern))
    return sorted(os.path.basename(f) for f in found)


def remove_previous_run(folder: str) -> List[str]:
    files = previous_run_files(folder)
    for name in files:
        os.remove(os.path.join(folder, name))
    return files


# ---------------------------------------------------------------------------- RNG state

def _np_state_to_safe(st):
    # numpy arrays are not loadable with torch.load(weights_only=True); store the key as a tensor
    name, keys, pos, has_gauss, cached = st
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _np_state_from_safe(st):
    name, keys, pos, has_gauss, cached = st
    return (name, np.asarray(keys.numpy() if torch.is_tensor(keys) else keys, dtype=np.uint32), pos, has_gauss, cached)


def get_rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _np_state_to_safe(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(_np_state_from_safe(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception as e:  # different GPU count
            _logger.warning("Could not restore CUDA RNG state: %s", e)


# ---------------------------------------------------------------------------- load / find

def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load one of our checkpoint files on CPU with a clear error if it is not one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file '{path}' does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint file '{path}' is unreadable or truncated ({type(e).__name__}: {e}).") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"'{path}' is not a training checkpoint (expected a dict with a 'state_dict' key, "
            f"got {type(ckpt).__name__}{' with keys ' + str(list(ckpt)[:8]) if isinstance(ckpt, dict) else ''}).")
    return ckpt


def _numbered(folder: str, prefix: str) -> List[str]:
    return glob.glob(os.path.join(folder, f"{prefix}-*.pth.tar"))


def find_resume_checkpoint(folder: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The loadable checkpoint with the highest ``global_step`` in ``folder`` (last, recovery-*, checkpoint-*)."""
    candidates = [os.path.join(folder, LAST_NAME)] + _numbered(folder, "recovery") + _numbered(folder, "checkpoint")
    best = None
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            ckpt = load_checkpoint_file(path)
        except CheckpointError as e:
            _logger.warning("Skipping unusable checkpoint: %s", e)
            continue
        if best is None or int(ckpt.get("global_step", -1)) > int(best[1].get("global_step", -1)):
            best = (path, ckpt)
    return best


class Saver:
    """The run folder's checkpoint files, in the layout of timm's :class:`~timm.utils.CheckpointSaver`, every one
    written atomically (temporary file, fsync, :func:`os.replace`; links swapped in the same way).

    * :meth:`save_checkpoint` (end of an epoch): ``last.pth.tar``; ``checkpoint-<epoch>.pth.tar`` (a hard link to it)
      when it ranks among the ``max_history`` best by its metric (higher is better unless ``decreasing``; ties keep
      the earlier epoch; checkpoints without a metric follow the ranked ones, newest first, and never displace one);
      ``model_best.pth.tar`` for the best so far.
    * :meth:`save_recovery` (mid-epoch): ``recovery-<epoch>-<batch>.pth.tar`` (the two newest kept) and
      ``last.pth.tar`` pointed at it, so ``last.pth.tar`` is always the newest checkpoint of the run.
    * :meth:`remove_recovery`: drop the recovery files once an end-of-epoch checkpoint supersedes them.

    Every checkpoint carries the ranking under ``'saver'`` (:meth:`state_dict`, the format of timm's
    ``CheckpointSaver.state_dict``); :meth:`load_state_dict` continues it after a resume into the same folder.
    timm's class is not used itself: it writes with ``torch.save`` straight into the run folder, renames without
    fsync, and takes the checkpoint content only through a private method.
    """

    def __init__(self, folder: str, decreasing: bool = False, max_history: int = 10):
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1 (got {max_history})")
        self.folder, self.decreasing, self.max_history = folder, decreasing, max_history
        self.history: List[Tuple[str, Optional[float]]] = []  # (file name, metric), best first
        self.best_epoch: Optional[int] = None
        self.best_metric: Optional[float] = None
        self.recovery_files: List[str] = []  # this run's recovery files, oldest first

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def state_dict(self, epoch: Optional[int] = None, metric: Optional[float] = None) -> Dict[str, Any]:
        """The ranking before the checkpoint of ``epoch`` (``pending``) is added to it."""
        return {"checkpoint_files": [(name, m) for name, m in self.history], "best_epoch": self.best_epoch,
                "best_metric": self.best_metric, "pending": (epoch, metric)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history = [(os.path.basename(f), m) for f, m in state.get("checkpoint_files", [])
                        if os.path.exists(self._path(os.path.basename(f)))]
        self.best_epoch, self.best_metric = state.get("best_epoch"), state.get("best_metric")
        epoch, metric = state.get("pending", (None, None))
        name = f"checkpoint-{epoch}.pth.tar"
        if epoch is not None and os.path.exists(self._path(name)) and name not in [f for f, _ in self.history]:
            self._track(name, epoch, metric, link_best=False)

    def save_checkpoint(self, state: Dict[str, Any], epoch: int, metric: Optional[float] = None) -> None:
        state["saver"] = self.state_dict(epoch, metric)
        atomic_torch_save(state, self._path(LAST_NAME))
        name = f"checkpoint-{epoch}.pth.tar"
        self.history = [c for c in self.history if c[0] != name]  # the same epoch saved again (resumed earlier)
        worst = self.history[-1][1] if self.history else None
        if len(self.history) < self.max_history or worst is None or \
                (metric is not None and self._better(metric, worst)):
            while len(self.history) >= self.max_history:
                _remove(self._path(self.history.pop()[0]))
            self._link(LAST_NAME, name)
            self._track(name, epoch, metric)

    def _track(self, name: str, epoch: int, metric: Optional[float], link_best: bool = True) -> None:
        """Add a kept checkpoint to the ranking; ``model_best.pth.tar`` follows a new best."""
        ranked = sorted([c for c in self.history if c[1] is not None] + ([(name, metric)] if metric is not None
                        else []), key=lambda c: c[1], reverse=not self.decreasing)  # stable: ties keep the earlier
        unranked = ([(name, None)] if metric is None else []) + [c for c in self.history if c[1] is None]
        self.history = ranked + unranked
        if metric is not None and (self.best_metric is None or self._better(metric, self.best_metric)):
            self.best_epoch, self.best_metric = epoch, metric
            if link_best:
                self._link(LAST_NAME, BEST_NAME)

    def save_recovery(self, state: Dict[str, Any], epoch: int, batch_idx: int = 0) -> None:
        state["saver"] = self.state_dict(epoch)
        name = f"recovery-{epoch}-{batch_idx}.pth.tar"
        atomic_torch_save(state, self._path(name))
        self._link(name, LAST_NAME)
        self.recovery_files = [f for f in self.recovery_files if f != name] + [name]
        while len(self.recovery_files) > 2:
            _remove(self._path(self.recovery_files.pop(0)))

    def remove_recovery(self) -> None:
        for f in _numbered(self.folder, "recovery"):
            _remove(f)
        self.recovery_files = []

    def _link(self, src: str, dst: str) -> None:
        """``dst`` becomes a hard link to ``src`` (a copy where the file system has none), swapped in atomically."""
        src, dst = self._path(src), self._path(dst)
        tmp = _tmp_name(dst)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this file system: an fsync'ed copy
            with open(src, "rb") as f:
                _atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
            return
        os.replace(tmp, dst)
        _fsync_dir(self.folder)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
