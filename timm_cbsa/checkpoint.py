"""Checkpoints: the one place where timm_cbsa reads a weights file, unwraps a checkpoint and reports keys that do not
fit a model.

* Reading (``read_checkpoint`` / ``read_state_dict`` / ``checkpoint_keys``): ``torch.load(weights_only=True)``
  (``.safetensors`` through safetensors), so a checkpoint can hold tensors, numbers, strings, containers and — like
  timm's loader allows, for timm training checkpoints — ``argparse.Namespace``, never code: a pickle that asks for
  any other type (a class, a function such as ``os.system``) is refused before anything runs. Every failure is a
  :class:`CheckpointLoadError` naming the file (missing, empty, truncated, not a checkpoint) or an
  :class:`UnsafeCheckpointError` naming the refused type.
* Unwrapping (``unwrap_state_dict``): the state dict held under ``state_dict`` / ``model`` / ``model_state_dict`` /
  ``module`` (or ``state_dict_ema`` / ``model_ema``), with DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.``
  prefixes removed (timm's ``clean_state_dict``).
* The released CBT layout (``is_released_layout``): the authors' key names (``transformer.layers.*``,
  ``to_patch_embedding.*``); ``models/cbt.py`` maps them.
* The key report (``check_keys``): missing / unexpected / mis-shaped keys in one :class:`CheckpointMismatchError`.
  The layers' settings records (``layers/settings.py``) are optional here: a state dict without them loads as before,
  and the layers check them when present (:class:`CBSAConfigMismatchError`).
* ``load_weights(model, checkpoint)``: all of the above, then ``model.load_state_dict(strict=True)``.
"""
import argparse
import contextlib
import os
import re
from typing import Any, Dict, List, Union

import torch
from torch import nn

from .errors import CBSAError
from .layers.settings import CBSAConfigMismatchError, settings_keys

__all__ = ['CheckpointLoadError', 'UnsafeCheckpointError', 'CheckpointMismatchError', 'CBSAConfigMismatchError',
           'read_checkpoint', 'read_state_dict', 'checkpoint_keys', 'unwrap_state_dict', 'is_released_layout',
           'check_keys', 'load_weights']

PathLike = Union[str, 'os.PathLike[str]']

# where trainers keep the model's state dict inside a checkpoint, in the order they are looked for
_WRAPPERS = ('state_dict', 'model', 'model_state_dict', 'module')
_EMA_WRAPPERS = ('state_dict_ema', 'model_ema')
_RELEASED_PREFIXES = ('transformer.layers.', 'to_patch_embedding.')


class CheckpointLoadError(CBSAError, RuntimeError):
    """A checkpoint file cannot be read (missing, empty, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint file needs a type that loading with ``weights_only=True`` does not allow (it could run code)."""


class CheckpointMismatchError(CBSAError, RuntimeError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""


def _refused_types(err: BaseException) -> str:
    """The globals a weights-only unpickler refused, from torch's message ('Unsupported globals: posix.system' in
    torch 2.14, 'Unsupported global: GLOBAL posix.system' before); '' when it names none."""
    msg = str(err)
    m = re.search(r'GLOBAL ([\w.]+)', msg) or re.search(r'Unsupported globals?: ([\w., ]+?)\.?(?:\s|$)', msg)
    return m.group(1).strip(' .,') if m else ''


def _torch_load(path: str, mmap: bool = False) -> Any:
    """``torch.load`` weights-only on the CPU, allowing ``argparse.Namespace`` (timm's training checkpoints have
    one)."""
    allow = getattr(torch.serialization, 'safe_globals', None)
    with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap or None)


def _load_safely(path: PathLike, load) -> Any:
    """``load(path)`` with the file checks and the error mapping shared by the readers below."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointLoadError(f'Checkpoint {path!r} does not exist (or is not a file).')
    if os.path.getsize(path) == 0:
        raise CheckpointLoadError(f'Checkpoint {path!r} is empty (0 bytes): an interrupted download or copy?')
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001  (re-raised with the file's name)
        refused = _refused_types(e)
        if refused:
            raise UnsafeCheckpointError(
                f'Refusing to load checkpoint {path!r}: it needs {refused}, which loading with weights_only=True does '
                f'not allow (unpickling such types can run code). timm_cbsa loads tensors, numbers, strings and '
                f'containers only; if you trust this file, load it yourself and pass the state dict.') from None
        raise CheckpointLoadError(
            f'Checkpoint {path!r} is not a readable PyTorch / safetensors checkpoint (truncated or corrupt?): '
            f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}') from e


def read_checkpoint(path: PathLike) -> Any:
    """The whole object saved in ``path`` (e.g. ``save_converted``'s dict with its ``attn_layer`` record, a training
    checkpoint), read weights-only (``.safetensors``: its tensors). Same errors as :func:`read_state_dict`."""
    def load(p):
        if p.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(p, device='cpu')
        return _torch_load(p)
    return _load_safely(path, load)


def read_state_dict(path: PathLike, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights held by ``path`` (``.pth``/``.pth.tar``/``.bin`` or ``.safetensors``), unwrapped
    (:func:`unwrap_state_dict`). Raises :class:`CheckpointLoadError` / :class:`UnsafeCheckpointError` naming the
    file, also when it holds no state dict of tensors."""
    path = os.fspath(path)
    try:
        return unwrap_state_dict(read_checkpoint(path), use_ema=use_ema)
    except CheckpointMismatchError as e:
        raise CheckpointLoadError(f'Checkpoint {path!r}: {e}') from None


def checkpoint_keys(path: PathLike) -> List[str]:
    """The keys of the state dict in ``path`` without reading its tensors' data (the safetensors header; a memory
    map of a zip-format torch file, else a full read)."""
    def load(p):
        if p.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(p, framework='pt') as f:
                return {k: None for k in f.keys()}
        try:
            return _torch_load(p, mmap=True)
        except RuntimeError:    # not zip format: cannot be memory-mapped
            return _torch_load(p)
    checkpoint = _load_safely(path, load)
    return list(_find_state_dict(checkpoint, use_ema=False) if isinstance(checkpoint, dict) else [])


def _find_state_dict(checkpoint: Dict[str, Any], use_ema: bool) -> Dict[str, Any]:
    for key in (_EMA_WRAPPERS + _WRAPPERS) if use_ema else (_WRAPPERS + _EMA_WRAPPERS):
        if isinstance(checkpoint.get(key), dict):
            return _find_state_dict(checkpoint[key], use_ema)
    return checkpoint


def unwrap_state_dict(checkpoint: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside ``checkpoint`` (held under 'state_dict' / 'model' / 'model_state_dict' / 'module', or
    'state_dict_ema' / 'model_ema' — those first when ``use_ema``), with timm's ``clean_state_dict`` removing DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` prefixes. Raises :class:`CheckpointMismatchError` when it is not a
    dict of tensors."""
    from timm.models import clean_state_dict
    state_dict = _find_state_dict(checkpoint, use_ema) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        got = type(state_dict).__name__
        if isinstance(state_dict, dict):
            got += ' with ' + ', '.join(f'{k!r}: {type(v).__name__}' for k, v in list(state_dict.items())[:4])
        raise CheckpointMismatchError(f'Expected a state dict of tensors (or a dict holding one), got {got}.')
    return clean_state_dict(state_dict)


def is_released_layout(keys) -> bool:
    """True for the key names of the authors' released CBT checkpoints (``transformer.layers.*``,
    ``to_patch_embedding.*``; DDP prefixes removed first)."""
    return any(k.split('module.', 1)[-1].startswith(_RELEASED_PREFIXES) for k in keys)


def check_keys(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise :class:`CheckpointMismatchError` listing the missing, unexpected and mis-shaped keys of ``state_dict``
    for ``model`` (the layers' settings records may be absent; their values are the layers' business)."""
    expected = model.state_dict()
    optional = set(settings_keys(model))
    missing = sorted(k for k in expected if k not in state_dict and k not in optional)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and k not in optional and tuple(v.shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        lines = ['Checkpoint does not match the model:']
        for name, items in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('mis-shaped keys', mismatched)):
            if items:
                shown = ', '.join(items[:12]) + (f', ... ({len(items)} in all)' if len(items) > 12 else '')
                lines.append(f'  {name}: {shown}')
        raise CheckpointMismatchError('\n'.join(lines))


def load_weights(model: nn.Module, checkpoint: Any, use_ema: bool = False) -> nn.Module:
    """Load ``checkpoint`` (a path, a state dict, or a checkpoint dict holding one) into ``model``: read weights-only,
    unwrapped, keys checked (:class:`CheckpointMismatchError`), then ``model.load_state_dict(strict=True)``, whose
    layers check their recorded settings (:class:`CBSAConfigMismatchError`). Returns ``model``."""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, '__fspath__'):
        checkpoint = read_checkpoint(checkpoint)
    state_dict = unwrap_state_dict(checkpoint, use_ema=use_ema)
    check_keys(state_dict, model)
    model.load_state_dict(state_dict, strict=True)
    return model
