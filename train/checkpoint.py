"""Atomic, resumable checkpoints for ``train.train``.

Layout of an output folder (``--output DIR`` [+ ``--experiment NAME``]):

* ``last.pth.tar``          newest checkpoint (end of epoch *or* mid-epoch with
                            ``--checkpoint-interval-steps``); what ``--resume auto`` picks first.
* ``checkpoint-<E>.pth.tar`` end-of-epoch snapshots, the newest ``--checkpoint-hist`` are kept.
* ``model_best.pth.tar``    end-of-epoch snapshot with the best eval metric.
* ``args.yaml``, ``summary.csv``, ``log.txt``.

Every file is written to a temporary file in the same folder, fsync'ed and moved into
place with :func:`os.replace`, so a crash (even SIGKILL) during a write leaves the
previous file intact. Stale temporaries (``.<name>.*.tmp``) are ignored and cleaned up.

Checkpoints are plain dicts with timm-compatible keys (``state_dict``, ``optimizer``,
``epoch``, ``arch``, ``args``, ``state_dict_ema``, ``amp_scaler``) so
``timm.models.load_checkpoint`` can read them, plus ``scheduler``, ``global_step``,
``batches_done``, ``epoch_complete`` and per-rank ``rng_states`` for exact resume.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
import shutil
import tempfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

_logger = logging.getLogger("train")

LAST_NAME = "last.pth.tar"
BEST_NAME = "model_best.pth.tar"
CKPT_FORMAT_VERSION = 1
_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model / run."""


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


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temp file in ``path``'s folder, fsync, ``os.replace``; the temp file is removed on error."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
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


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically (same protocol as ``atomic_torch_save``)."""
    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)
    _atomic_write(dst, copy)


def clean_stale_tmp(folder: str) -> List[str]:
    """Remove temporaries left by a crash during a write; returns the removed paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if _TMP_RE.match(name):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


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


def _epoch_ckpts(folder: str) -> List[str]:
    files = glob.glob(os.path.join(folder, "checkpoint-*.pth.tar"))

    def key(p):
        m = re.search(r"checkpoint-(\d+)\.pth\.tar$", p)
        return int(m.group(1)) if m else -1
    return sorted(files, key=key, reverse=True)


def find_resume_checkpoint(folder: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Newest complete, loadable checkpoint in ``folder`` (``last.pth.tar`` first), or None."""
    candidates = []
    last = os.path.join(folder, LAST_NAME)
    if os.path.exists(last):
        candidates.append(last)
    candidates += _epoch_ckpts(folder)
    best = None
    for path in candidates:
        try:
            ckpt = load_checkpoint_file(path)
        except CheckpointError as e:
            _logger.warning("Skipping unusable checkpoint: %s", e)
            continue
        step = int(ckpt.get("global_step", -1))
        if best is None or step > best[1].get("global_step", -1):
            best = (path, ckpt)
        if path == last:
            break  # last.pth.tar is always the newest written
    return best


class CheckpointManager:
    """Writes checkpoints of a run into ``folder`` (rank 0 only)."""

    def __init__(self, folder: str, max_history: int = 3, decreasing: bool = False):
        self.folder = folder
        self.max_history = max(0, int(max_history))
        self.decreasing = decreasing
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        os.makedirs(folder, exist_ok=True)

    @property
    def last_path(self) -> str:
        return os.path.join(self.folder, LAST_NAME)

    def _better(self, metric: float) -> bool:
        if self.best_metric is None:
            return True
        return metric < self.best_metric if self.decreasing else metric > self.best_metric

    def save_last(self, state: Dict[str, Any]) -> str:
        state = dict(state, best_metric=self.best_metric, best_epoch=self.best_epoch)
        atomic_torch_save(state, self.last_path)
        return self.last_path

    def save_epoch(self, state: Dict[str, Any], epoch: int, metric: Optional[float]) -> str:
        """End-of-epoch save: last.pth.tar, checkpoint-<epoch>.pth.tar (pruned), model_best.pth.tar."""
        is_best = metric is not None and self._better(metric)
        if is_best:
            self.best_metric, self.best_epoch = float(metric), epoch
        self.save_last(state)
        if self.max_history > 0:
            atomic_copy(self.last_path, os.path.join(self.folder, f"checkpoint-{epoch}.pth.tar"))
            for old in _epoch_ckpts(self.folder)[self.max_history:]:
                try:
                    os.remove(old)
                except OSError:
                    pass
        if is_best:
            atomic_copy(self.last_path, os.path.join(self.folder, BEST_NAME))
        return self.last_path
