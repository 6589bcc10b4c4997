"""How CBSA forms its initial representatives Q_ini from the projected tokens.

The paper (§3.2) initialises the m representatives by average pooling the (projected) patch tokens, following Agent
Attention. We pool the *patch* tokens only, laid out on their true (H_p, W_p) grid, onto an (r_h, r_w) grid
(m = r_h * r_w). Prefix tokens (class / register / distillation) are skipped here; they still act as keys/values
and receive the broadcast.

``legacy=True`` reproduces the released code bit for bit: it pools every token but the *last* one
(``w[:, :-1]``), so with a class token at index 0 the class token lands in grid cell (0, 0), every patch is
shifted by one raster position and the last patch is dropped. The released CBT checkpoints were trained that way.
"""
import numbers
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F


__all__ = ['pool_representatives', 'to_grid']


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def to_grid(size: Union[int, Tuple[int, int], List[int]], name: str = 'rep_grid') -> Tuple[int, int]:
    """8 -> (8, 8); (4, 6) -> (4, 6); anything else (0, -1, True, 2.5, (4,)) raises a ValueError naming ``name``."""
    pair = (size, size) if _positive_int(size) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_positive_int(v) for v in pair):
        raise ValueError(f'{name} must be a positive int or a pair of positive ints (rows, cols), got {size!r}.')
    return int(pair[0]), int(pair[1])


def pooled_tokens(w: torch.Tensor, grid_size: Tuple[int, int], legacy: bool = False) -> torch.Tensor:
    """The tokens that are pooled, as a (…, H_p, W_p, d) view of (…, N, d) tokens: the last H_p*W_p (the patches), or
    with ``legacy`` the first H_p*W_p (the released code: class token in, last patch out)."""
    gh, gw = grid_size[0], grid_size[1]
    start = 0 if legacy else w.shape[-2] - gh * gw
    return w.narrow(-2, start, gh * gw).unflatten(-2, (gh, gw))


def equal_windows(grid_size: Tuple[int, int], rep_grid: Tuple[int, int]) -> bool:
    """True when the representative grid tiles the patch grid (every pooling window has the same size)."""
    return grid_size[0] % rep_grid[0] == 0 and grid_size[1] % rep_grid[1] == 0


def pool_representatives(
        w: torch.Tensor,
        grid_size: Tuple[int, int],
        rep_grid: Tuple[int, int],
        legacy: bool = False,
) -> torch.Tensor:
    """Average-pool projected tokens to initial representatives.

    Args:
        w: (B, H, N, d) projected tokens, prefix tokens first, then the H_p*W_p patch tokens in raster order.
        grid_size: (H_p, W_p) patch grid.
        rep_grid: (r_h, r_w) representative grid, m = r_h * r_w.
        legacy: pool tokens[:-1] instead of the patch tokens (the released code's behaviour).
    Returns:
        (B, H, m, d) initial representatives Q_ini.
    """
    B, H, N, d = w.shape
    gh, gw = grid_size[0], grid_size[1]
    rh, rw = rep_grid[0], rep_grid[1]
    tokens = pooled_tokens(w, grid_size, legacy)                # (B, H, H_p, W_p, d), a view
    if equal_windows(grid_size, rep_grid):                      # a reshape and a mean: no copy, nothing saved
        reps = tokens.unflatten(2, (rh, gh // rh)).unflatten(4, (rw, gw // rw)).mean(dim=(3, 5))
        return reps.flatten(2, 3)                               # (B, H, m, d)
    # overlapping windows: pool the merged heads (B, H_p, W_p, H*d), viewed as channels-last NCHW: when w is the
    # usual head-split view of a (B, N, H*d) projection this is a view, so autograd's saved pooling input costs no
    # memory
    tokens = tokens.permute(0, 2, 3, 1, 4).reshape(B, gh, gw, H * d).permute(0, 3, 1, 2)
    reps = F.adaptive_avg_pool2d(tokens, rep_grid)              # (B, H*d, r_h, r_w)
    return reps.reshape(B, H, d, rh * rw).transpose(-2, -1)     # (B, H, m, d)
