"""The settings that change what a CBSA-family layer computes, without changing any parameter's shape, travel inside
the layer's state dict — so every loader (``model.load_state_dict``, ``timm.models.load_checkpoint``, timm's
pretrained path, ``local-dir:`` / ``hf-hub:``, our trainer) checks them.

Which settings (``SETTINGS`` of each class):

=====================  ===========================================================================================
setting                layers
=====================  ===========================================================================================
``num_heads``          every family layer (for CBSA it is also in ``step_rep``'s shape; for 'agent', 'mssa' and
                       'linear' the weights have the same shapes whatever the head count)
``rep_grid``           the pooled layers (``GridAwareAttention``: 'cbsa', 'cbsa_star', 'agent', 'agent_qkv')
``legacy_pool``        the pooled layers (the released code's pooling: class token pooled, last patch dropped)
``broadcast``          'agent', 'agent_qkv', 'cbsa_star' ('softmax' over the representatives or the extraction Aᵀ)
=====================  ===========================================================================================

Not recorded: the patch grid, prefix and trailing token counts (they describe the *input's* token layout and are set
by the model that owns the layer, so a backbone trained inside a segmenter still loads into a classifier), the
backend (every implementation computes the same function), and constants no model argument reaches (ISTA's η, λ;
LinearAttention's eps).

How: the layer's *extra state* (``get_extra_state``; key ``<layer>._extra_state``) is a 1-D int64 tensor
``[FORMAT, v_1, v_2, ...]`` made from the layer's attributes whenever a state dict is taken. Why extra state rather
than buffers: the attributes stay the only source of truth (nothing to keep in sync, nothing that ``.to()`` moves,
``.half()`` casts or an EMA averages into a non-integer), and it is still a plain tensor, so safetensors, weights-only
``torch.load`` and timm's ``avg_checkpoints.py`` (which casts every entry to float32: the integers survive exactly,
and a float record is accepted when its values are integers) all carry it. TorchScript, FX and ``torch.export`` leave
it out of their graphs.

Loading: a ``load_state_dict`` pre-hook compares the saved record with the layer and raises
``CBSAConfigMismatchError`` naming the layer, the setting, both values and the fix. A state dict without a record
(the released CBT checkpoints, checkpoints of earlier versions of this package, a TorchScript model's state dict)
has nothing to check: the hook fills in the layer's own record and it loads exactly as before. (torch 2.4 has no
public load_state_dict pre-hook: there ``set_extra_state`` checks the record, naming the layer's class rather than
its path, and a load_state_dict post-hook forgives absent records.)
"""
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..errors import CBSAError

__all__ = ['CBSAConfigMismatchError', 'RecordedSettings', 'FORMAT', 'BROADCASTS', 'SETTINGS_KEY',
           'describe_differences', 'settings_keys']

FORMAT = 1                          # first entry of every record; a record of another format is refused by name
SETTINGS_KEY = '_extra_state'       # torch's state-dict key for a module's extra state
BROADCASTS = ('softmax', 'extraction')

# setting -> number of integers it takes in a record
_WIDTH = {'num_heads': 1, 'rep_grid': 2, 'legacy_pool': 1, 'broadcast': 1}


class CBSAConfigMismatchError(CBSAError, ValueError):
    """Weights were saved with other CBSA settings (rep_grid, legacy_pool, num_heads, broadcast) than the model has:
    the same weights would compute a different function."""


def _encode(name: str, value: Any) -> List[int]:
    if name == 'rep_grid':
        return [int(value[0]), int(value[1])]
    if name == 'broadcast':
        return [BROADCASTS.index(value)]
    return [int(value)]


def _decode(name: str, ints: List[int]) -> Any:
    if name == 'rep_grid':
        return ints[0], ints[1]
    if name == 'legacy_pool':
        return bool(ints[0])
    if name == 'broadcast':
        return BROADCASTS[ints[0]] if 0 <= ints[0] < len(BROADCASTS) else f'<unknown broadcast {ints[0]}>'
    return ints[0]


def _show(value: Any) -> str:
    """How a setting reads in messages (grids as lists, as in ``cbsa_config`` / config.json)."""
    return str(list(value)) if isinstance(value, tuple) else repr(value) if isinstance(value, str) else str(value)


def describe_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """'<setting>: saved <v>, model <v>' for every setting present in both that differs."""
    return [f'{k}: saved {_show(saved[k])}, model {_show(current[k])}'
            for k in current if k in saved and saved[k] != current[k]]


class RecordedSettings(nn.Module):
    """Base of the CBSA-family layers: the attributes named in ``SETTINGS`` travel in the state dict (module
    docstring) and are checked when one is loaded."""
    SETTINGS: Tuple[str, ...] = ('num_heads',)

    def __init__(self):
        super().__init__()
        if hasattr(self, 'register_load_state_dict_pre_hook'):     # torch >= 2.5
            self.register_load_state_dict_pre_hook(_check_saved_settings)
        else:
            self.register_load_state_dict_post_hook(_forgive_absent_records)

    def recorded_settings(self) -> Dict[str, Any]:
        """The settings this layer records, by name (``rep_grid`` as a tuple)."""
        return {name: getattr(self, name) for name in self.SETTINGS}

    @classmethod
    def settings_record(cls, **settings: Any) -> torch.Tensor:
        """The record a layer of this class with these settings saves (all of ``cls.SETTINGS`` must be given)."""
        ints = [FORMAT]
        for name in cls.SETTINGS:
            ints += _encode(name, settings[name])
        return torch.tensor(ints, dtype=torch.int64)

    def get_extra_state(self) -> torch.Tensor:
        return self.settings_record(**self.recorded_settings())

    def set_extra_state(self, state: Any) -> None:
        """Nothing to set (settings are fixed at construction or by ``configure_cbsa``): check that ``state`` records
        this layer's own. (The load pre-hook has done so already, naming the layer's path.)"""
        _check_record(self, state, type(self).__name__)


def _read_record(layer: RecordedSettings, record: Any, where: str) -> Dict[str, Any]:
    """The settings in a saved record, or a CBSAConfigMismatchError saying why it is not one this layer reads."""
    names = layer.SETTINGS
    size = 1 + sum(_WIDTH[n] for n in names)
    ok = isinstance(record, torch.Tensor) and record.ndim == 1 and record.numel() == size
    if ok and record.is_floating_point():   # timm's avg_checkpoints.py saves every entry as float32
        ok = bool(torch.equal(record, record.round()))
    if not ok or int(record[0]) != FORMAT:
        got = (f'{record.dtype} tensor of shape {tuple(record.shape)}: {record.tolist()}'
               if isinstance(record, torch.Tensor) and record.numel() < 16 else type(record).__name__)
        raise CBSAConfigMismatchError(
            f'{where}: the saved settings record is not one this layer reads (expected '
            f'[{FORMAT}, {", ".join(names)}] as {size} integers, got {got}). Was it saved by another layer type, by '
            f'another version of timm_cbsa, or averaged across checkpoints with different settings?')
    ints = [int(v) for v in record.tolist()[1:]]
    saved = {}
    for name in names:
        saved[name], ints = _decode(name, ints[:_WIDTH[name]]), ints[_WIDTH[name]:]
    return saved


def _fix(layer: RecordedSettings, saved: Dict[str, Any], differing: List[str]) -> str:
    hints = []
    if 'rep_grid' in differing:
        (rh, rw), name = saved['rep_grid'], getattr(layer, 'attn_name', 'cbsa')
        hints.append(f"rep_grid={rh if rh == rw else (rh, rw)} (timm_cbsa's models: create_model(..., "
                     f"rep_grid={rh if rh == rw else (rh, rw)}); timm's ViTs: "
                     + (f"attn_layer='{name}_r{rh}')" if rh == rw else 'configure_cbsa(model, rep_grid=...))'))
    if 'legacy_pool' in differing:
        hints.append(f"legacy_pool={saved['legacy_pool']} (create_model(..., legacy_pool={saved['legacy_pool']}))")
    hints += [f'{n}={_show(saved[n])}' for n in ('num_heads', 'broadcast') if n in differing]
    return ('Build the model with the saved settings: ' + '; '.join(hints)
            + ' (or set them with timm_cbsa.configure_cbsa(model, ...) before loading).')


def _check_saved_settings(layer: RecordedSettings, state_dict: Dict[str, Any], prefix: str, *args) -> None:
    """load_state_dict pre-hook: check the saved record against the layer, or fill in the layer's own when the state
    dict has none (nothing recorded: nothing to check)."""
    key = prefix + SETTINGS_KEY
    if key not in state_dict:
        state_dict[key] = layer.get_extra_state()
    else:
        _check_record(layer, state_dict[key], prefix[:-1] or type(layer).__name__)


def _forgive_absent_records(layer: RecordedSettings, incompatible_keys) -> None:
    """load_state_dict post-hook where torch has no public pre-hook: an absent record is not a missing key."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k.rsplit('.', 1)[-1] != SETTINGS_KEY]


def _check_record(layer: RecordedSettings, record: Any, where: str) -> None:
    """Raise CBSAConfigMismatchError when ``record`` holds other settings than ``layer`` has (``where``: its path)."""
    name = type(layer).__name__
    where = name if where == name else f'{where} ({name})'
    saved = _read_record(layer, record, where)
    current = layer.recorded_settings()
    diffs = describe_differences(saved, current)
    if diffs:
        differing = [n for n in current if saved[n] != current[n]]
        raise CBSAConfigMismatchError(
            f'{where}: the state dict was saved with other settings than this layer has ('
            + '; '.join(diffs) + '): the same weights would compute a different function. '
            + _fix(layer, saved, differing))


def settings_keys(model: nn.Module) -> List[str]:
    """The state-dict keys of ``model``'s settings records (optional on load: absent means not recorded)."""
    return [f'{name}.{SETTINGS_KEY}' if name else SETTINGS_KEY
            for name, m in model.named_modules() if isinstance(m, RecordedSettings)]
