"""Reading checkpoint files safely: the one place where timm_cbsa opens a weights file.

``read_state_dict(path)`` goes through timm's ``load_state_dict`` with ``weights_only=True`` (``.safetensors`` through
safetensors), so a checkpoint can hold tensors, numbers, strings and containers, never code: a pickle that asks for
any other type (a class, a function such as ``os.system``) is refused before anything runs. The released CBT files
(``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer', 'scheduler'}``) need nothing beyond that.

Every failure is a :class:`CheckpointLoadError` that names the file: missing, empty, truncated or not a checkpoint,
or (:class:`UnsafeCheckpointError`) asking for a type outside the allow-list, with the type's name.
"""
import os
import re
from typing import Any, Dict, Union

import torch

from ..errors import CBSAError

__all__ = ['CheckpointLoadError', 'UnsafeCheckpointError', 'read_checkpoint', 'read_state_dict']

PathLike = Union[str, 'os.PathLike[str]']


class CheckpointLoadError(CBSAError, RuntimeError):
    """A checkpoint file cannot be read (missing, empty, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint file needs a type that loading with ``weights_only=True`` does not allow (it could run code)."""


def _refused_types(err: BaseException) -> str:
    """The globals a weights-only unpickler refused, from torch's message ('Unsupported globals: posix.system' in
    torch 2.14, 'Unsupported global: GLOBAL posix.system' before); '' when it names none."""
    msg = str(err)
    m = re.search(r'GLOBAL ([\w.]+)', msg) or re.search(r'Unsupported globals?: ([\w., ]+?)\.?(?:\s|$)', msg)
    return m.group(1).strip(' .,') if m else ''


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
    """The whole object saved in ``path`` (e.g. ``save_converted``'s dict with its ``attn_layer`` record), read with
    ``weights_only=True`` (``.safetensors``: its tensors). Same errors as :func:`read_state_dict`."""
    def load(p):
        if p.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(p, device='cpu')
        return torch.load(p, map_location='cpu', weights_only=True)
    return _load_safely(path, load)


def read_state_dict(path: PathLike) -> Dict[str, Any]:
    """Load the model weights held by ``path`` (``.pth``/``.pth.tar``/``.bin`` or ``.safetensors``).

    A dict holding the weights under ``state_dict`` / ``model`` is unwrapped and DDP's ``module.`` prefix removed
    (timm's ``load_state_dict`` + ``clean_state_dict``). Raises :class:`CheckpointLoadError` /
    :class:`UnsafeCheckpointError` naming the file.
    """
    from timm.models import load_state_dict

    path = os.fspath(path)
    state_dict = _load_safely(path, lambda p: load_state_dict(p, use_ema=False, weights_only=True))
    for key in ('model_state_dict', 'module'):     # other trainers' wrappers (timm unwraps state_dict / model)
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointLoadError(
            f'Checkpoint {path!r} holds no state dict of tensors (got {type(state_dict).__name__}).')
    return state_dict
