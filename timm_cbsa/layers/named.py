"""Attention-layer names that fix the representative grid: ``attn_layer='cbsa_r4'`` (and 'cbsa_star_r4', 'agent_r4',
'agent_qkv_r4'), for r = 1 … 16.

timm's ViT constructor takes no ``rep_grid``, so a ``vit_*`` / ``deit_*`` built by string (``--model-kwargs
attn_layer=cbsa``, ``create_model(..., attn_layer='cbsa')``) gets the default 8×8 grid, which needs a patch grid of
at least 8×8 (≥ 128 px at patch 16). A registered name carries the grid instead: it works through ``--model-kwargs``
and, being the ``attn_layer`` string that ``save_for_hf`` writes to config.json, survives the round trip to
``create_model('local-dir:…' / 'hf-hub:…')``. Each name is a subclass of the base layer whose only difference is
``named_rep_grid``; it is defined here so that pickling a model finds it (``timm_cbsa.layers.named.CBSAR4``).
"""
from typing import Dict, Optional, Tuple

__all__ = ['REP_GRID_NAMES', 'grid_named_layers', 'grid_layer_name', 'base_layer_name']

REP_GRID_NAMES = range(1, 17)      # 'NAME_r1' … 'NAME_r16'


def grid_named_layers(layers: Dict[str, type]) -> Dict[str, type]:
    """{'NAME_rR': subclass of layers[NAME] with rep_grid (R, R)} for every R in REP_GRID_NAMES."""
    out = {}
    for name, cls in layers.items():
        for r in REP_GRID_NAMES:
            sub = type(f'{cls.__name__}R{r}', (cls,), {
                '__module__': __name__, 'named_rep_grid': (r, r),
                '__doc__': f"``{cls.__name__}`` with the representative grid {r}x{r} (``attn_layer='{name}_r{r}'``)."})
            globals()[sub.__name__] = sub
            out[f'{name}_r{r}'] = sub
    return out


def base_layer_name(name: str) -> str:
    """'cbsa_r4' -> 'cbsa'; other names unchanged."""
    base, _, r = name.rpartition('_r')
    return base if base and r.isdigit() else name


def grid_layer_name(name: str, rep_grid: Tuple[int, int]) -> Optional[str]:
    """The registered name of layer ``name`` with ``rep_grid`` ('cbsa', (4, 4) -> 'cbsa_r4'), None if there is none
    (a rectangular grid, or one outside REP_GRID_NAMES)."""
    rh, rw = rep_grid
    return f'{base_layer_name(name)}_r{rh}' if rh == rw and rh in REP_GRID_NAMES else None
