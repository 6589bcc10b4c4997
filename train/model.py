"""Model building for ``train.train``: ``timm.create_model`` with our flags, and the record of how a model was built
that every checkpoint carries (a checkpoint is refused by a model built differently, naming the argument)."""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

import timm

from .args import ConfigError, ModelNotFoundError, _check_model_name
from .checkpoint import CheckpointError

_logger = logging.getLogger("train")


def create_model(args, num_classes: int, in_chans: int) -> nn.Module:
    name = args.model
    _check_model_name(name)
    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("num_classes", num_classes)
    if in_chans != 3:
        kwargs.setdefault("in_chans", in_chans)
    if args.img_size is not None:
        kwargs.setdefault("img_size", args.img_size)
    if args.drop:
        kwargs.setdefault("drop_rate", args.drop)
    if args.drop_path is not None:
        kwargs.setdefault("drop_path_rate", args.drop_path)
    pcfg = {"file": args.pretrained_path} if args.pretrained_path else None
    try:
        model = timm.create_model(name, pretrained=args.pretrained, pretrained_cfg_overlay=pcfg, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelNotFoundError(str(e)) from e
        raise
    except TypeError as e:
        raise ConfigError(f"Model '{name}' rejected the arguments {kwargs}: {e}") from e
    if args.convert:
        try:
            from timm_cbsa import convert
        except ImportError as e:
            raise ConfigError(f"--convert needs timm_cbsa.convert ({e})") from e
        try:
            model = convert(model, variant=args.convert, rep_grid=args.convert_rep_grid)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--convert {args.convert}: {e}") from e
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"--grad-checkpointing: model '{name}' has no set_grad_checkpointing().")
        model.set_grad_checkpointing(True)
    return model


def model_config(args, model: nn.Module, num_classes: int, in_chans: int) -> Dict[str, Any]:
    """How the model was built (saved in every checkpoint, compared on resume / --initial-checkpoint)."""
    cfg = dict(model=args.model, model_kwargs=dict(args.model_kwargs), num_classes=num_classes, in_chans=in_chans,
               img_size=args.img_size, convert=args.convert, convert_rep_grid=args.convert_rep_grid)
    layer_cfg = getattr(sys.modules.get("timm_cbsa"), "cbsa_config", None)
    if layer_cfg is not None:
        cfg["cbsa"] = layer_cfg(model)
    else:  # effective CBSA settings of the first representative-based layer (defaults included)
        for m in model.modules():
            if hasattr(m, "rep_grid") and hasattr(m, "legacy_pool"):
                cfg["cbsa"] = {"rep_grid": list(m.rep_grid), "legacy_pool": bool(m.legacy_pool)}
                break
    return cfg


_CFG_FLAGS = dict(model="--model", num_classes="--num-classes", in_chans="--in-chans", img_size="--img-size",
                  convert="--convert", convert_rep_grid="--convert-rep-grid")


def check_model_config(saved: Optional[Dict[str, Any]], current: Dict[str, Any], path: str) -> None:
    """Refuse a checkpoint whose model was built differently, naming the argument that differs."""
    if not saved:
        return  # older checkpoint: the state-dict comparison is all we have
    diffs = []
    for key, flag in _CFG_FLAGS.items():
        if key in saved and saved[key] != current.get(key):
            diffs.append(f"{flag} {saved[key]} (this run: {current.get(key)})")
    a, b = saved.get("model_kwargs") or {}, current.get("model_kwargs") or {}
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k] and k != "backend":
            diffs.append(f"--model-kwargs {k}={a[k]!r} (this run: {k}={b[k]!r})")
    ca, cb = saved.get("cbsa") or {}, current.get("cbsa") or {}
    for k in sorted(set(ca) & set(cb)):
        if ca[k] != cb[k] and not any(d.startswith(f"--model-kwargs {k}=") for d in diffs):
            diffs.append(f"{k}={ca[k]!r} in the CBSA layers (this run: {cb[k]!r}; set with --model-kwargs {k}=...)")
    if diffs:
        raise CheckpointError(f"Checkpoint '{path}' was built differently from this run's model: "
                              + "; ".join(diffs) + ". Build the model the same way, or start a fresh run.")


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str, name: str) -> None:
    """Load a checkpoint's state dict into ``model`` through timm_cbsa's checkpoint module (prefixes removed, keys
    checked, the CBSA layers' recorded settings checked); a mismatch is a CheckpointError naming the file."""
    from timm_cbsa.checkpoint import CBSAConfigMismatchError, CheckpointMismatchError, load_weights
    try:
        load_weights(model, state)
    except (CheckpointMismatchError, CBSAConfigMismatchError) as e:
        raise CheckpointError(f"Checkpoint '{path}' is incompatible with model '{name}': {e}") from e
