"""How CBSA forms its initial representatives Q_ini from the projected tokens: average pooling on the patch grid.

The paper (§3.2) initialises the m representatives by average pooling the (projected) patch tokens, following Agent
Attention. A ``PoolSpec`` says which tokens are pooled and how:

    tokens (…, N, d) = [ prefix tokens | H_p·W_p patch tokens (raster order) | trailing tokens ]

The patch tokens are laid out on their true (H_p, W_p) grid and pooled onto an (r_h, r_w) grid (m = r_h·r_w).
Prefix tokens (class / register / distillation) and trailing tokens (e.g. the class embeddings a segmentation decoder
appends) are not pooled; they still act as keys/values and receive the broadcast.

The released code pools ``w[:, :-1]`` ("legacy" pooling): with a class token at index 0 that is ``trailing=1`` on a
grid of N-1 tokens, so the class token lands in cell (0, 0), every patch is shifted by one raster position and the
last patch is dropped. The released CBT checkpoints were trained that way.

Windows: when the representative grid tiles the patch grid every window has the same size and pooling is a reshape
and a mean. Otherwise the windows are those of ``adaptive_avg_pool2d`` (rows floor(i·H_p/r_h) .. ceil((i+1)·H_p/r_h)).
While a model is being exported (``torch.onnx.export``, ``torch.export``) they are applied as two small averaging
matrices (rows, then columns), which every exporter understands (the TorchScript-based ONNX exporter has no
``adaptive_avg_pool2d`` for windows of unequal size); the numbers are the same up to rounding.
"""
import numbers
from typing import List, NamedTuple, Tuple, Union

import torch
import torch.nn.functional as F

from ..tracing import is_exporting

__all__ = ['PoolSpec', 'equal_windows', 'num_representatives', 'pool_adjoint', 'pool_representatives', 'pooled_tokens',
           'to_grid', 'window_matrix']


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def to_grid(size: Union[int, Tuple[int, int], List[int]], name: str = 'rep_grid') -> Tuple[int, int]:
    """8 -> (8, 8); (4, 6) -> (4, 6); anything else (0, -1, True, 2.5, (4,)) raises a ValueError naming ``name``."""
    pair = (size, size) if _positive_int(size) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_positive_int(v) for v in pair):
        raise ValueError(f'{name} must be a positive int or a pair of positive ints (rows, cols), got {size!r}.')
    return int(pair[0]), int(pair[1])


class PoolSpec(NamedTuple):
    """Which tokens are pooled into the representatives, and onto which grid.

    grid: (H_p, W_p) patch grid; rep_grid: (r_h, r_w) representative grid; trailing: how many tokens follow the
    pooled H_p·W_p (0 for a ViT; the appended class embeddings of a segmentation decoder; 1 for the released code's
    legacy pooling). Whatever comes before them is prefix. Stated from the end, so the spec does not depend on N.
    (Fields only, and free functions below, so that TorchScript compiles it.)"""
    grid: Tuple[int, int]
    rep_grid: Tuple[int, int]
    trailing: int


def num_representatives(spec: PoolSpec) -> int:
    return spec.rep_grid[0] * spec.rep_grid[1]


def equal_windows(spec: PoolSpec) -> bool:
    """True when the representative grid tiles the patch grid (every pooling window has the same size)."""
    return spec.grid[0] % spec.rep_grid[0] == 0 and spec.grid[1] % spec.rep_grid[1] == 0


def pooled_tokens(w: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """The pooled tokens of (…, N, d) tokens as a (…, H_p, W_p, d) view."""
    gh, gw = spec.grid[0], spec.grid[1]
    return w.narrow(-2, w.shape[-2] - spec.trailing - gh * gw, gh * gw).unflatten(-2, (gh, gw))


def window_matrix(size: int, out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out, size) averaging matrix of 1-D adaptive average pooling: row i averages [floor(i·size/out),
    ceil((i+1)·size/out))."""
    i = torch.arange(out, device=device)
    lo = torch.div(i * size, out, rounding_mode='floor')
    hi = torch.div((i + 1) * size + out - 1, out, rounding_mode='floor')
    j = torch.arange(size, device=device)
    inside = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    return inside.to(dtype) / (hi - lo).to(dtype)[:, None]


def _matrices(spec: PoolSpec, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return (window_matrix(spec.grid[0], spec.rep_grid[0], like.dtype, like.device),
            window_matrix(spec.grid[1], spec.rep_grid[1], like.dtype, like.device))


def pool_representatives(w: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """Average-pool projected tokens to the initial representatives.

    Args:
        w: (B, H, N, d) projected tokens.
        spec: which tokens, on which grid, onto which representative grid.
    Returns:
        (…, m, d) initial representatives Q_ini, m = r_h·r_w, raster order over the representative grid.
    """
    gh, gw, rh, rw = spec.grid[0], spec.grid[1], spec.rep_grid[0], spec.rep_grid[1]
    t = pooled_tokens(w, spec)                                             # (…, H_p, W_p, d), a view
    if equal_windows(spec):                                                # a reshape and a mean
        return t.unflatten(-3, (rh, gh // rh)).unflatten(-2, (rw, gw // rw)).mean(dim=(-4, -2)).flatten(-3, -2)
    if not torch.jit.is_scripting() and is_exporting():                      # rows, then columns, as matrices
        ph, pw = _matrices(spec, w)                                        # (r_h, H_p), (r_w, W_p)
        rows = torch.matmul(ph, t.flatten(-2)).unflatten(-1, (gw, w.shape[-1]))       # (…, r_h, W_p, d)
        return torch.matmul(pw, rows).flatten(-3, -2)                      # (…, m, d)
    # overlapping windows: adaptive pooling with the token dims as channels, channels-last: when w is the usual
    # head-split view of a (B, N, H*d) projection, (B, H_p, W_p, H, d) -> NCHW is a view (no copy kept by autograd)
    # (no branching on the rank: FX traces this function, so w is taken as (B, H, N, d))
    B, H, d = t.shape[0], t.shape[1], t.shape[-1]
    x = t.permute(0, 2, 3, 1, 4).reshape(B, gh, gw, H * d).permute(0, 3, 1, 2)
    reps = F.adaptive_avg_pool2d(x, (rh, rw))                              # (B, H*d, r_h, r_w)
    return reps.reshape(B, H, d, rh * rw).transpose(-2, -1)                # (B, H, m, d)



def pool_adjoint(g: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """The adjoint of ``pool_representatives`` on the pooled tokens: (…, m, d) ∂Q_ini -> (…, H_p, W_p, d)."""
    gh, gw, rh, rw = spec.grid[0], spec.grid[1], spec.rep_grid[0], spec.rep_grid[1]
    g = g.unflatten(-2, (rh, rw))                                          # (…, r_h, r_w, d)
    if equal_windows(spec):
        kh, kw = gh // rh, gw // rw
        g = (g / (kh * kw))[..., :, None, :, None, :].expand(*g.shape[:-3], rh, kh, rw, kw, g.shape[-1])
        return g.reshape(*g.shape[:-5], gh, gw, g.shape[-1])
    ph, pw = _matrices(spec, g)
    cols = torch.matmul(pw.transpose(0, 1), g)                             # (…, r_h, W_p, d)
    return torch.matmul(ph.transpose(0, 1), cols.flatten(-2)).unflatten(-1, (gw, g.shape[-1]))
